//! The conformance suite against the Redis backend: one real `redis-server` for this test binary,
//! a fresh queue (key prefix) per test. Fails, never skips, when `redis-server` is missing.

fleetq_broker::conformance_tests!(fleetq_broker::testing::redis_fixture);
