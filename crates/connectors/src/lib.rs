//! # fleetq-connectors
//!
//! A connector owns one service on the worker's machine and turns a claimed job into work on it.
//! This crate holds the [`Connector`] contract and the services: [`simulation`] (tests, benchmarks
//! and `NAME-sim` services), [`comfyui`], [`a1111`], [`openai`] and [`rest`]; the shared [`http`]
//! transport and [`artifacts`] store; and [`spec`], connectors described as data (config files)
//! and built (docs/design.md §6). Clients only: the mock servers the tests drive are `fleetq-mocks`.
//!
//! Contract: [`Connector::process`] runs one job, reports progress through a [`ProgressSink`], and
//! stops promptly when its [`CancellationToken`] fires (cancel requested, timeout, shutdown). Its
//! error is the broker's typed [`JobError`] itself: its category and whether another attempt may
//! succeed ([`JobError::retryable`]) travel to the broker unchanged, never parsed from text.

pub mod a1111;
pub mod artifacts;
pub mod comfyui;
pub mod http;
pub mod openai;
pub mod outbound;
pub mod rest;
pub mod simulation;
pub mod spec;

use std::fmt;
use std::future::Future;

pub use fleetq_core::JobError;
use fleetq_core::{ConnectorStatus, JobRecord};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
pub use tokio_util::sync::CancellationToken;

/// A connector's health as a check sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// `idle`/`active` when reachable and working, `error` when reachable but failing, `offline`
    /// when unreachable.
    pub status: ConnectorStatus,
    /// Reason for `error` / `offline`.
    pub message: Option<String>,
    /// What the service says about itself (url, models, queue length, memory…), when reachable.
    pub info: Option<Value>,
    /// The model names the service has now (sorted, no duplicates), when it says: the worker adds
    /// them to its `models` capability for this service, so jobs requiring one find it.
    pub models: Option<Vec<String>>,
}

impl Health {
    /// Reachable and working (`idle` or `active`).
    pub fn up(status: ConnectorStatus) -> Self {
        Self { status, message: None, info: None, models: None }
    }
    /// Reachable and working, as a connector's check says it (`active` is the worker's to add).
    pub fn idle() -> Self {
        Self::up(ConnectorStatus::Idle)
    }
    /// Reachable but failing.
    pub fn error(message: impl Into<String>) -> Self {
        Self { status: ConnectorStatus::Error, message: Some(message.into()), info: None, models: None }
    }
    /// Unreachable, or the connector could not be built.
    pub fn offline(message: impl Into<String>) -> Self {
        Self { status: ConnectorStatus::Offline, message: Some(message.into()), info: None, models: None }
    }
}

/// Where a running job's progress goes (0–100 plus an optional message). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProgressSink(mpsc::UnboundedSender<(f64, Option<String>)>);

impl ProgressSink {
    /// A sink and the receiver the worker reads from.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<(f64, Option<String>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
    /// Reports progress; silently dropped once the worker stopped listening.
    pub fn report(&self, progress: f64, message: Option<String>) {
        let _ = self.0.send((progress, message));
    }
}

/// The contract every service connector implements.
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    /// The service name this connector serves (`comfyui`, `simulation`, `comfyui-sim`, …).
    fn service(&self) -> &str;

    /// Checks the service now.
    fn health(&self) -> BoxFuture<'_, Health>;

    /// Changes whenever the connector learns, without being asked, that its service's health may
    /// have changed (ComfyUI: its socket was lost or restored). The worker then checks this
    /// connector at once instead of at the next health tick. `None`: it learns only from checks.
    fn health_signal(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Runs one job to its result. Must return soon after `cancel` fires: with an error, or with
    /// the result when the service finished the work before it could be stopped (the worker then
    /// records the result instead of dropping it). A connector that can learn whether its service
    /// still runs the work waits (bounded) until it does not, so the worker takes no new job while
    /// the service is still busy with the abandoned one.
    fn process<'a>(
        &'a self,
        job: &'a JobRecord,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, JobError>>;
}

/// What a service's connector writes: its name, a health check and one job's run. Every `Service`
/// is a [`Connector`] through the blanket implementation below, which boxes the futures for the
/// worker's `dyn Connector`. A health check says whether the service is up (`idle`), failing or
/// unreachable; whether one of the worker's jobs runs on it (`active`) is the worker's to count.
pub trait Service: Send + Sync + fmt::Debug + 'static {
    /// The service name this connector serves (`comfyui`, `simulation`, `comfyui-sim`, …).
    fn name(&self) -> &str;

    /// Checks the service now.
    fn check(&self) -> impl Future<Output = Health> + Send;

    /// Runs one job to its result, as [`Connector::process`] says.
    fn run(
        &self,
        job: &JobRecord,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<Value, JobError>> + Send;

    /// As [`Connector::health_signal`].
    fn health_signal(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

impl<S: Service> Connector for S {
    fn service(&self) -> &str {
        self.name()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.check())
    }

    fn health_signal(&self) -> Option<watch::Receiver<u64>> {
        Service::health_signal(self)
    }

    fn process<'a>(
        &'a self,
        job: &'a JobRecord,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, JobError>> {
        Box::pin(self.run(job, progress, cancel))
    }
}
