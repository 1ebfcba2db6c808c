//! The conformance suite against the embedded (SQLite) backend, one fresh store per test.

fleetq_broker::conformance_tests!(fleetq_broker::testing::embedded_fixture);
