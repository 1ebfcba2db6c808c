//! Embedded-store operation: ownership and durability across reopen.

use std::sync::Arc;

use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::testing::{T0, test_config};
use fleetq_broker::{BrokerError, ManualClock};
use fleetq_broker::{Fleet, Log, Queue, Read};
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

/// Reopens the store once the dropped broker's writer thread has released it.
fn reopen(path: &std::path::Path, clock: &ManualClock) -> EmbeddedBroker {
    (0..200)
        .find_map(|_| match EmbeddedBroker::open_with_clock(path, test_config(), Arc::new(clock.clone())) {
            Ok(b) => Some(b),
            Err(BrokerError::StoreInUse(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
            Err(e) => panic!("reopen: {e}"),
        })
        .expect("the store is released after the broker is dropped")
}

/// The jobs a crashed process was running come back at once when the store is reopened (one
/// process owns a store, so their leases are a dead process's), not after their leases.
#[tokio::test]
async fn a_reopened_store_requeues_the_jobs_its_last_owner_was_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetq.db");
    let clock = ManualClock::new(T0);
    let worker = || -> fleetq_core::WorkerRegistration {
        serde_json::from_value(json!({"worker_id": "w", "machine_id": "m", "services": ["simulation"]}))
            .expect("worker")
    };
    let (running, waiting) = {
        let b = EmbeddedBroker::open_with_clock(&path, test_config(), Arc::new(clock.clone())).expect("open");
        b.register_worker(worker()).await.expect("register");
        let running = b.submit(JobSpec::new("simulation", json!(1))).await.expect("submit").id;
        let waiting = b.submit(JobSpec::new("simulation", json!(2))).await.expect("submit").id;
        let lease = b.claim("w", std::time::Duration::ZERO).await.expect("claim").expect("a job");
        assert_eq!(lease.job.summary.id, running);
        (running, waiting)
    };
    // No time passes: the lease (10 s) has not expired.
    let b = reopen(&path, &clock);
    let rec = b.job(&running).await.expect("get").expect("kept");
    assert_eq!(rec.summary.status, JobStatus::Pending, "requeued at open");
    assert_eq!(rec.summary.attempt, 1, "the interrupted attempt counts");
    assert_eq!(b.queue_position(&running).await.expect("position"), Some(1), "it keeps its place");
    assert_eq!(b.job(&waiting).await.expect("get").expect("kept").summary.status, JobStatus::Pending);
    b.register_worker(worker()).await.expect("register");
    let again = b.claim("w", std::time::Duration::ZERO).await.expect("claim").expect("claimable now");
    assert_eq!((again.job.summary.id, again.attempt), (running, 2));
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
    let reopened = reopen(&path, &clock);
    let rec = reopened.job(&id).await.expect("get").expect("kept");
    assert_eq!(rec.summary.status, JobStatus::Pending);
    assert_eq!(rec.spec.payload, json!({"keep": true}));
    assert_eq!(reopened.snapshot().await.expect("snapshot").seq, seq);
}

/// A row that does not decode (a foreign writer, a bad restore) is passed over by listings and the
/// snapshot instead of failing them, and is counted.
#[tokio::test]
async fn an_undecodable_row_is_passed_over_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetq.db");
    let clock = ManualClock::new(T0);
    let (bad, good) = {
        let b = EmbeddedBroker::open_with_clock(&path, test_config(), Arc::new(clock.clone())).expect("open");
        let bad = b.submit(JobSpec::new("simulation", json!("bad"))).await.expect("submit").id;
        let good = b.submit(JobSpec::new("simulation", json!("good"))).await.expect("submit").id;
        (bad, good)
    };
    // Wait for the writer thread to release the file, then break one row behind its back.
    drop(reopen(&path, &clock));
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    conn.execute("UPDATE jobs SET summary = '{broken' WHERE id = ?1", [&bad.0]).expect("corrupt it");
    drop(conn);
    let b = reopen(&path, &clock);
    let before = fleetq_broker::undecodable_records();
    let listed = b.jobs(&fleetq_broker::JobFilter::default()).await.expect("the listing answers");
    assert_eq!(listed.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![good.clone()]);
    let queued = b.queue(&fleetq_broker::QueueFilter::default()).await.expect("the queue answers");
    assert_eq!(queued.jobs.len(), 1);
    let snapshot = b.snapshot().await.expect("the snapshot answers");
    assert!(snapshot.jobs.contains_key(&good) && !snapshot.jobs.contains_key(&bad));
    assert!(fleetq_broker::undecodable_records() >= before + 3, "each pass-over is counted");
    assert!(matches!(b.job(&bad).await, Err(BrokerError::Corrupt(_))), "the job itself shows as corrupt");
}
