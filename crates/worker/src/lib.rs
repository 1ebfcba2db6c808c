//! # fleetq-worker
//!
//! The worker runtime: one [`Worker`] per GPU drives its connectors against a [`Broker`](fleetq_broker::Broker).
//!
//! - **Identity.** It registers once with a validated identity (never defaulted) and the services
//!   of its loaded connectors, heartbeats, and registers again if the broker forgot it (presence
//!   expiry, a Redis restart without persistence).
//! - **Claiming.** It blocks in [`Queue::claim`](fleetq_broker::Queue::claim) on the broker's wake-up, in short slices so that
//!   shutdown is noticed, and only for services whose connector is healthy: a connector found
//!   `offline`/`error` by the health loop is withdrawn from the registration until it recovers.
//! - **Supervision** of each job: lease renewal; an overall timeout (fail, retryable); a progress
//!   timeout (no progress for N ms: interrupt and release for another worker); a cancel requested
//!   through the broker interrupts the connector; a lost lease drops the result.
//! - **Shutdown.** Stop claiming; let the running job finish within a grace period, else interrupt it
//!   and release it back to pending without spending an attempt; deregister.
//! - **Configuration** ([`config`]): the worker's TOML file and its overrides, resolved into a
//!   [`WorkerConfig`] and built connectors.

pub mod config;
mod runtime;
mod state;
mod verdict;

pub use runtime::{Worker, WorkerConfig, WorkerError};
