//! # fleetq-machine
//!
//! A machine is one box of the fleet: its workers (one per GPU) run together, and the fleet learns
//! of the box's life through machine events — `starting`, `ready`, `stopping`, `stopped` — so the
//! monitor shows workers inside their machine and a machine that shut down as such.
//!
//! - [`Machine`]: runs a set of workers as one machine until a stop is asked, then drains them
//!   (each finishes or releases its job within its grace period) and reports it stopped.
//! - [`simulated`]: the machine of `fleetq up` without services — N workers whose connectors
//!   simulate services.
//! - [`supervisor`]: a real box — GPUs detected ([`gpu`]), one service per GPU started, supervised
//!   and restarted ([`service`]), one worker per GPU, all from one TOML file ([`config`]) — with
//!   its startup steps reported as machine events.
//!
//! `fleetq up` and `fleetq machine` both run their box through this crate, so the demo and a real
//! GPU box share one path.

pub mod config;
pub mod gpu;
pub mod notify;
pub mod service;
pub mod simulated;
pub mod status;
pub mod supervisor;

use std::sync::Arc;

use fleetq_broker::{Broker, BrokerError};
use fleetq_connectors::CancellationToken;
use fleetq_core::{MachineEvent, MachinePhase};
use fleetq_worker::{Worker, WorkerError};
use thiserror::Error;

/// Why a machine could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MachineError {
    /// The broker refused a machine event.
    #[error("machine event: {0}")]
    Broker(#[from] BrokerError),
    /// A worker could not be built.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// Startup failed at a step (already reported to the fleet as the machine's `error`).
    #[error("startup failed at {step}: {reason}")]
    Startup {
        /// The step.
        step: String,
        /// Why, with the step's output tail.
        reason: String,
    },
}

/// One box's workers, run as one member of the fleet.
pub struct Machine<B: Broker> {
    broker: Arc<B>,
    machine_id: String,
    workers: Vec<Arc<Worker<B>>>,
    /// Said with `starting` (what the machine is made of).
    description: Option<String>,
}

impl<B: Broker> std::fmt::Debug for Machine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("machine_id", &self.machine_id)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl<B: Broker> Machine<B> {
    /// A machine of `workers` (already built against `broker`).
    pub fn new(
        broker: Arc<B>,
        machine_id: impl Into<String>,
        workers: Vec<Arc<Worker<B>>>,
        description: Option<String>,
    ) -> Self {
        Self { broker, machine_id: machine_id.into(), workers, description }
    }

    /// How many workers it runs.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    fn event(&self, phase: MachinePhase, message: Option<String>) -> MachineEvent {
        MachineEvent {
            machine_id: self.machine_id.clone(),
            phase,
            step: None,
            message,
            at: self.broker.clock().now_ms(),
        }
    }

    /// Reports `starting`, runs every worker, reports `ready`; when `stop` fires, reports
    /// `stopping`, drains every worker and reports `stopped`. A machine without workers reports
    /// nothing (there is no box to show). Worker failures are logged: one worker's end does not
    /// stop the others.
    pub async fn run(self, stop: CancellationToken) -> Result<(), MachineError> {
        self.run_then(stop, true, async { None }).await
    }

    /// [`Machine::run`] for a supervisor: `announce_start` false when it already reported
    /// `starting` and its steps; `after_drain` runs once the workers are drained (stopping the
    /// services) and its text is the `stopped` event's message.
    pub async fn run_then(
        self,
        stop: CancellationToken,
        announce_start: bool,
        after_drain: impl Future<Output = Option<String>>,
    ) -> Result<(), MachineError> {
        let announce = !self.workers.is_empty();
        if announce && announce_start {
            self.broker.machine_event(self.event(MachinePhase::Starting, self.description.clone())).await?;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for worker in &self.workers {
            let (worker, stop) = (worker.clone(), stop.clone());
            tasks.spawn(async move { worker.run(stop).await });
        }
        if announce {
            self.broker.machine_event(self.event(MachinePhase::Ready, None)).await?;
        }
        stop.cancelled().await;
        if announce {
            let said = self.broker.machine_event(self.event(MachinePhase::Stopping, None)).await;
            if let Err(e) = said {
                tracing::warn!(error = %e, "could not report the machine stopping");
            }
        }
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(Err(e)) => tracing::warn!(error = %e, "worker stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "worker task failed"),
                Ok(Ok(())) => {}
            }
        }
        let said = after_drain.await;
        if announce {
            self.broker.machine_event(self.event(MachinePhase::Stopped, said)).await?;
        }
        Ok(())
    }
}
