//! Embedded-store operation: ownership and durability across reopen.

use std::sync::Arc;

use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::testing::{T0, test_config};
use fleetq_broker::{Broker, BrokerError, ManualClock};
use fleetq_core::{JobSpec, JobStatus};
use serde_json::json;

/// A second opener of the same store gets a clear error instead of silently diverging caches.
#[tokio::test]
async fn a_store_has_one_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetq.db");
    let _owner = EmbeddedBroker::open(&path, test_config()).expect("first open");
    match EmbeddedBroker::open(&path, test_config()) {
        Err(BrokerError::StoreInUse(p)) => assert!(p.ends_with("fleetq.db")),
        other => panic!("expected StoreInUse, got {other:?}"),
    }
}

/// Everything acknowledged survives closing and reopening the store, events included.
#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetq.db");
    let clock = ManualClock::new(T0);
    let (id, seq) = {
        let b = EmbeddedBroker::open_with_clock(&path, test_config(), Arc::new(clock.clone())).expect("open");
        let id = b.submit(JobSpec::new("simulation", json!({"keep": true}))).await.expect("submit").id;
        (id, b.snapshot().await.expect("snapshot").seq)
    };
    // The writer thread finishes and releases the store when the last handle is dropped.
    let reopened = (0..200)
        .find_map(|_| match EmbeddedBroker::open_with_clock(&path, test_config(), Arc::new(clock.clone())) {
            Ok(b) => Some(b),
            Err(BrokerError::StoreInUse(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
            Err(e) => panic!("reopen: {e}"),
        })
        .expect("the store is released after the broker is dropped");
    let rec = reopened.job(&id).await.expect("get").expect("kept");
    assert_eq!(rec.summary.status, JobStatus::Pending);
    assert_eq!(rec.spec.payload, json!({"keep": true}));
    assert_eq!(reopened.snapshot().await.expect("snapshot").seq, seq);
}
