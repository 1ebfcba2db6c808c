//! The conformance suite against the Redis backend: one real `redis-server` for this test binary,
//! a fresh queue (key prefix) per test. Fails, never skips, when `redis-server` is missing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::{Fixture, RedisServer, T0};
use fleetq_broker::{BrokerConfig, ManualClock};

async fn make(config: BrokerConfig) -> Fixture<RedisBroker> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::shared();
    let queue = format!("t{}", NEXT.fetch_add(1, Ordering::SeqCst));
    let clock = ManualClock::new(T0);
    let broker = RedisBroker::connect_with_clock(&server.url, &queue, config, Arc::new(clock.clone()))
        .await
        .expect("connect to the test redis");
    Fixture { broker: Arc::new(broker), clock, guard: Box::new(server) }
}

fleetq_broker::conformance_tests!(make);
