//! A real box as one member of the fleet: report the host (`starting`), detect the GPUs, run each
//! service's setup commands once, launch one instance of every service per GPU and wait until each
//! answers, then run one worker per GPU whose connectors point at that GPU's instances — every step
//! reported as a machine `step` event with its duration, a failure as `error` with the step's
//! output tail. While it runs, services are supervised and restarted by their policy; on stop the
//! workers drain first (running jobs finish within the grace or are released), then the services'
//! process groups are stopped, then `stopped` says how.
//!
//! `fleetq machine` (Redis) and `fleetq up --config` / `--comfyui` (embedded or Redis) both run
//! this, so the one-box demo and a production box share one path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetq_broker::Broker;
use fleetq_connectors::CancellationToken;
use fleetq_core::{MachineEvent, MachinePhase};
use fleetq_worker::Worker;
use fleetq_worker::config::{Overrides as WorkerOverrides, resolve as resolve_worker};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{GpuSource, MachineSpec, Placeholders, worker_file};
use crate::gpu::{self, Gpu};
use crate::service::{Instance, ServicePhase, ServiceStatus};
use crate::{Machine, MachineError};

mod running;
mod startup;

/// Lines of a failing step's output put into its `error` event.
const FAILURE_TAIL: usize = 15;
/// How often a service still starting is reported (elapsed time and its last line).
const WAITING_REPORT: Duration = Duration::from_secs(5);

/// What the machine's local status shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LocalStatus {
    /// The machine.
    pub machine_id: String,
    /// Host facts.
    pub host: HostInfo,
    /// Its GPUs.
    pub gpus: Vec<Gpu>,
    /// Its service instances.
    pub services: Vec<ServiceStatus>,
    /// Its workers' ids.
    pub workers: Vec<String>,
    /// The phase (`starting`, `ready`, `stopping`, `stopped`, `error`).
    pub phase: String,
    /// The last error.
    pub last_error: Option<String>,
}

/// The host as `starting` reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostInfo {
    /// Host name.
    pub hostname: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory (MiB), when known.
    pub memory_mib: Option<u64>,
}

impl HostInfo {
    /// Reads this host's facts.
    pub fn read() -> Self {
        let hostname = hostname();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let memory_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb / 1024)
        });
        Self { hostname, cpus, memory_mib }
    }

    fn describe(&self) -> String {
        let memory = self.memory_mib.map_or(String::new(), |m| format!(", {:.1} GiB RAM", m as f64 / 1024.0));
        format!("host {}, {} CPUs{memory}", self.hostname, self.cpus)
    }
}

/// This host's name (`unknown` when it cannot be read): a machine's default id.
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// Runs a machine until `stop`; `force` (a second signal) stops services at once.
pub struct Supervisor<B: Broker> {
    broker: Arc<B>,
    spec: MachineSpec,
    status: watch::Sender<LocalStatus>,
}

impl<B: Broker> std::fmt::Debug for Supervisor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("machine_id", &self.spec.machine_id).finish_non_exhaustive()
    }
}

impl<B: Broker> Supervisor<B> {
    /// A supervisor of `spec` against `broker`.
    pub fn new(broker: Arc<B>, spec: MachineSpec) -> Self {
        let status = watch::Sender::new(LocalStatus {
            machine_id: spec.machine_id.clone(),
            phase: "starting".into(),
            ..LocalStatus::default()
        });
        Self { broker, spec, status }
    }

    /// The machine's own view, kept current (for `GET /health`).
    pub fn status(&self) -> watch::Receiver<LocalStatus> {
        self.status.subscribe()
    }

    async fn say(
        &self,
        phase: MachinePhase,
        step: Option<String>,
        message: Option<String>,
    ) -> Result<(), MachineError> {
        let event = MachineEvent {
            machine_id: self.spec.machine_id.clone(),
            phase,
            step,
            message,
            at: self.broker.clock().now_ms(),
        };
        self.broker.machine_event(event).await?;
        Ok(())
    }

    /// Reports a failed step as the machine's `error` and returns it as the error.
    async fn failed(&self, step: &str, reason: String, tail: &[String]) -> MachineError {
        let tail: Vec<&str> = tail.iter().rev().take(FAILURE_TAIL).rev().map(String::as_str).collect();
        let reason = if tail.is_empty() { reason } else { format!("{reason}\n{}", tail.join("\n")) };
        tracing::error!(step, %reason, "machine startup failed");
        crate::notify::notify(&format!("STATUS=startup failed at {step}"));
        self.status.send_modify(|s| {
            s.phase = "error".into();
            s.last_error = Some(reason.clone());
        });
        let said =
            self.say(MachinePhase::Error, None, Some(format!("startup failed at {step}: {reason}"))).await;
        if let Err(e) = said {
            tracing::warn!(error = %e, "could not report the failed startup");
        }
        MachineError::Startup { step: step.to_owned(), reason }
    }

    /// Starts the machine, serves until `stop`, drains and stops. `force` (a second signal) skips
    /// the workers' grace and stops the services at once.
    pub async fn run(self, stop: CancellationToken, force: CancellationToken) -> Result<(), MachineError> {
        let started = self.start_up(&stop).await?;
        let supervision = self.supervise(started.instances, started.running, started.statuses);
        self.status.send_modify(|s| {
            s.workers = started.worker_ids;
            s.phase = "ready".into();
        });
        crate::notify::notify("READY=1\nSTATUS=ready");
        self.serve(started.workers, supervision, stop, force).await
    }

    async fn step(&self, text: String, began: Instant) -> Result<(), MachineError> {
        let ms = began.elapsed().as_millis();
        tracing::info!(ms = ms as u64, "{text}");
        crate::notify::notify(&format!("STATUS={text}"));
        self.say(MachinePhase::Step, Some(format!("{text} ({ms} ms)")), None).await
    }
}

/// A live line on the machine card: a `step` event without a step, so the list of steps stays
/// and the message shows.
fn note(machine_id: &str, message: String, at: i64) -> MachineEvent {
    MachineEvent {
        machine_id: machine_id.to_owned(),
        phase: MachinePhase::Step,
        step: None,
        message: Some(message),
        at,
    }
}

/// What the machine card should say when a service's phase moved from `was` to its current one.
fn service_news(was: Option<ServicePhase>, now: &ServiceStatus) -> Option<String> {
    let label = format!("{} gpu{}", now.name, now.gpu);
    let exit = now.last_exit.as_deref().unwrap_or("exited");
    match (was, now.phase) {
        (Some(a), b) if a == b => None,
        (Some(ServicePhase::Ready), ServicePhase::Restarting) => {
            Some(format!("{label} crashed ({exit}); restarting"))
        }
        (Some(_), ServicePhase::Ready) => Some(format!("{label} is back (restart {})", now.restarts)),
        (_, ServicePhase::Failed) => {
            Some(format!("{label} failed: {}", now.last_error.as_deref().unwrap_or(exit)))
        }
        _ => None,
    }
}

/// Waits until one of the receivers changes; `false` when all senders are gone.
async fn futures_any(receivers: &mut [watch::Receiver<ServiceStatus>]) -> bool {
    if receivers.is_empty() {
        std::future::pending::<()>().await;
    }
    let changes = receivers.iter_mut().map(|r| Box::pin(r.changed()));
    matches!(futures::future::select_all(changes).await, (Ok(()), _, _))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_changes_become_machine_news() {
        let svc = |phase, restarts| ServiceStatus {
            name: "comfyui".into(),
            gpu: 1,
            phase,
            restarts,
            last_exit: Some("signal 9 (SIGKILL)".into()),
            last_error: Some("6 crashes within 600 s: given up (more than 5 allowed)".into()),
            ..ServiceStatus::default()
        };
        assert_eq!(service_news(None, &svc(ServicePhase::Ready, 0)), None);
        assert_eq!(service_news(Some(ServicePhase::Ready), &svc(ServicePhase::Ready, 0)), None);
        assert_eq!(
            service_news(Some(ServicePhase::Ready), &svc(ServicePhase::Restarting, 0)).as_deref(),
            Some("comfyui gpu1 crashed (signal 9 (SIGKILL)); restarting")
        );
        assert_eq!(
            service_news(Some(ServicePhase::Starting), &svc(ServicePhase::Ready, 1)).as_deref(),
            Some("comfyui gpu1 is back (restart 1)")
        );
        let failed =
            service_news(Some(ServicePhase::Restarting), &svc(ServicePhase::Failed, 5)).expect("news");
        assert!(failed.contains("failed: 6 crashes"), "{failed}");
    }
}
