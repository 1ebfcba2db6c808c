//! The conformance suite against the embedded (SQLite) backend, one fresh store per test.

use std::sync::Arc;

use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::testing::{Fixture, T0};
use fleetq_broker::{BrokerConfig, ManualClock};

#[allow(clippy::unused_async, reason = "the conformance macro awaits every fixture maker; Redis needs async")]
async fn make(config: BrokerConfig) -> Fixture<EmbeddedBroker> {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = ManualClock::new(T0);
    let broker =
        EmbeddedBroker::open_with_clock(dir.path().join("fleetq.db"), config, Arc::new(clock.clone()))
            .expect("open store");
    Fixture { broker: Arc::new(broker), clock, guard: Box::new(dir) }
}

fleetq_broker::conformance_tests!(make);
