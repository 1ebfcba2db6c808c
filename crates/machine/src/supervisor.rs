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
        let host = HostInfo::read();
        self.status.send_modify(|s| s.host = host.clone());
        self.say(MachinePhase::Starting, None, Some(format!("startup: {}", host.describe()))).await?;
        self.step(host.describe(), Instant::now()).await?;

        // GPUs.
        let began = Instant::now();
        let (gpus, report_hardware) = match &self.spec.gpus {
            GpuSource::Detect => match gpu::detect(Duration::from_secs(30)).await {
                Ok(g) => (g, true),
                Err(e) => return Err(self.failed("detecting GPUs", e.to_string(), &[]).await),
            },
            GpuSource::Configured { count, memory_gb } => {
                (gpu::configured(*count, memory_gb.unwrap_or(0)), memory_gb.is_some())
            }
        };
        let names: Vec<String> = gpus.iter().map(|g| format!("{} ({} GB)", g.name, g.memory_gb())).collect();
        self.status.send_modify(|s| s.gpus = gpus.clone());
        let found = match &self.spec.gpus {
            GpuSource::Detect => format!("detected {} GPU(s): {}", gpus.len(), names.join(", ")),
            GpuSource::Configured { count, memory_gb: Some(gb) } => {
                format!("{count} configured GPU(s) of {gb} GB")
            }
            GpuSource::Configured { count, memory_gb: None } => {
                format!("{count} worker(s), no GPU detection")
            }
        };
        self.step(found, began).await?;

        // Setup commands, once per service.
        for svc in &self.spec.services {
            for (n, command) in svc.setup.iter().enumerate() {
                let name = format!("setup {} #{} `{}`", svc.name, n + 1, command.join(" "));
                let began = Instant::now();
                let out = run_setup(command, svc.cwd.as_deref(), &svc.env, self.spec.startup_timeout).await;
                match out {
                    Ok(()) => self.step(format!("{name} ok"), began).await?,
                    Err((reason, tail)) => return Err(self.failed(&name, reason, &tail).await),
                }
            }
        }

        // One instance of every service per GPU, launched, then awaited together.
        let mut instances = Vec::new();
        let mut fills = Vec::new();
        for g in &gpus {
            let mut ports = Vec::new();
            for svc in &self.spec.services {
                let port = match svc.port(g.index) {
                    Ok(p) => p,
                    Err(e) => return Err(self.failed("launching services", e.to_string(), &[]).await),
                };
                ports.push((svc.name.clone(), port));
            }
            let fill = Placeholders::new(g, &ports);
            for (svc, (_, port)) in self.spec.services.iter().zip(&ports) {
                instances.push(Instance {
                    name: svc.name.clone(),
                    gpu: g.index,
                    gpu_uuid: g.uuid.clone(),
                    port: *port,
                    command: svc.command.iter().map(|a| fill.fill(a)).collect(),
                    cwd: svc.cwd.clone(),
                    env: svc.env.iter().map(|(k, v)| (k.clone(), fill.fill(v))).collect(),
                    ready_url: fill.fill(&svc.ready_url),
                    restart: svc.restart,
                    stop_timeout: svc.stop_timeout,
                    log_file: self.spec.log_dir.join(format!("{}-gpu{}.log", svc.name, g.index)),
                    log_max_bytes: self.spec.log_max_bytes,
                });
            }
            fills.push(fill);
        }
        let mut running = Vec::new();
        for inst in &instances {
            let began = Instant::now();
            match inst.launch().await {
                Ok(r) => {
                    let pid = r.pid().map_or("?".into(), |p| p.to_string());
                    running.push(r);
                    self.step(format!("launched {} (pid {pid}, port {})", inst.label(), inst.port), began)
                        .await?;
                }
                Err(e) => {
                    stop_all(&instances, &mut running).await;
                    return Err(self
                        .failed(&format!("launching {}", inst.label()), e.to_string(), &[])
                        .await);
                }
            }
        }
        let services_stop = CancellationToken::new();
        let mut statuses = Vec::new();
        for (inst, r) in instances.iter().zip(running.iter_mut()) {
            let began = Instant::now();
            let label = inst.label();
            let broker = self.broker.clone();
            let machine_id = self.spec.machine_id.clone();
            let waited = inst
                .wait_ready(r, self.spec.startup_timeout, WAITING_REPORT, &stop, |elapsed, last| {
                    // A live line on the card: elapsed time and what the service last said.
                    let message = format!(
                        "waiting for {label}: {} s{}",
                        elapsed.as_secs(),
                        last.map_or(String::new(), |l| format!(" — {l}"))
                    );
                    let event = note(&machine_id, message, broker.clock().now_ms());
                    let broker = broker.clone();
                    tokio::spawn(async move { broker.machine_event(event).await });
                })
                .await;
            match waited {
                Ok(_) => self.step(format!("{} ready", inst.label()), began).await?,
                Err(e) => {
                    let tail = e.tail().to_vec();
                    stop_all(&instances, &mut running).await;
                    return Err(self
                        .failed(&format!("waiting for {}", inst.label()), e.to_string(), &tail)
                        .await);
                }
            }
            statuses.push(watch::Sender::new(ServiceStatus {
                name: inst.name.clone(),
                gpu: inst.gpu,
                port: inst.port,
                pid: r.pid(),
                started_at: Some(self.broker.clock().now_ms()),
                ..ServiceStatus::default()
            }));
        }

        // One worker per GPU.
        let mut workers = Vec::new();
        let mut worker_ids = Vec::new();
        for (g, fill) in gpus.iter().zip(&fills) {
            let built =
                worker_file(&self.spec, g, fill, report_hardware).map_err(|e| e.to_string()).and_then(
                    |file| resolve_worker(&file, &WorkerOverrides::default()).map_err(|e| e.to_string()),
                );
            let mut settings = match built {
                Ok(s) => s,
                Err(e) => {
                    stop_all(&instances, &mut running).await;
                    return Err(self.failed(&format!("building the worker of gpu{}", g.index), e, &[]).await);
                }
            };
            settings.worker.shutdown_grace = self.spec.shutdown_grace;
            let id = settings.worker.registration.worker_id.clone();
            for svc in self.spec.services.iter().filter(|s| s.warmup.is_some()) {
                let began = Instant::now();
                let payload = svc.warmup.clone().unwrap_or_default();
                let label = format!("warm-up {} gpu{}", svc.name, g.index);
                match warm_up(&settings.connectors, &svc.name, payload, self.spec.startup_timeout).await {
                    Ok(()) => self.step(format!("{label} ok"), began).await?,
                    Err(reason) => {
                        stop_all(&instances, &mut running).await;
                        return Err(self.failed(&label, reason, &[]).await);
                    }
                }
            }
            match Worker::new(self.broker.clone(), settings.connectors, settings.worker) {
                Ok(w) => {
                    workers.push(Arc::new(w));
                    worker_ids.push(id);
                }
                Err(e) => {
                    stop_all(&instances, &mut running).await;
                    return Err(self.failed(&format!("building worker {id}"), e.to_string(), &[]).await);
                }
            }
        }

        // Supervise the services while the workers serve.
        let mut supervised = tokio::task::JoinSet::new();
        let mut receivers = Vec::new();
        for ((inst, r), tx) in instances.into_iter().zip(running).zip(statuses) {
            receivers.push(tx.subscribe());
            supervised.spawn(inst.supervise(r, self.spec.startup_timeout, services_stop.clone(), tx));
        }
        let mirror = {
            let status = self.status.clone();
            let mut receivers = receivers;
            let broker = self.broker.clone();
            let machine_id = self.spec.machine_id.clone();
            tokio::spawn(async move {
                let mut before: Vec<ServiceStatus> = Vec::new();
                loop {
                    let now: Vec<ServiceStatus> = receivers.iter().map(|r| r.borrow().clone()).collect();
                    // A service crashing, coming back or given up is news for the machine card.
                    for (i, svc) in now.iter().enumerate() {
                        let was = before.get(i).map(|b| b.phase);
                        if let Some(message) = service_news(was, svc) {
                            let event = note(&machine_id, message, broker.clock().now_ms());
                            if let Err(e) = broker.machine_event(event).await {
                                tracing::warn!(error = %e, "could not report a service's change");
                            }
                        }
                    }
                    status.send_modify(|s| s.services = now.clone());
                    before = now;
                    let changed = futures_any(&mut receivers).await;
                    if !changed {
                        return;
                    }
                }
            })
        };
        self.status.send_modify(|s| {
            s.workers = worker_ids;
            s.phase = "ready".into();
        });
        crate::notify::notify("READY=1\nSTATUS=ready");
        let machine = Machine::new(self.broker.clone(), self.spec.machine_id.clone(), workers, None);
        let status = self.status.clone();
        let forced = force.clone();
        let drained = async move {
            status.send_modify(|s| s.phase = "stopping".into());
            crate::notify::notify("STOPPING=1\nSTATUS=workers drained; stopping the services");
            services_stop.cancel();
            let stopping = async { while supervised.join_next().await.is_some() {} };
            tokio::select! {
                () = stopping => {}
                () = force.cancelled() => {}
            }
            mirror.abort();
            let exits: Vec<String> = status
                .borrow()
                .services
                .iter()
                .map(|s| format!("{} gpu{}: {}", s.name, s.gpu, s.last_exit.as_deref().unwrap_or("stopped")))
                .collect();
            status.send_modify(|s| s.phase = "stopped".into());
            Some(if exits.is_empty() {
                "shutdown requested".to_owned()
            } else {
                format!("shutdown requested; services {}", exits.join(", "))
            })
        };
        tokio::select! {
            ran = machine.run_then(stop, false, drained) => ran,
            () = forced.cancelled() => {
                // A second signal: no more waiting for running jobs (they come back when their
                // leases expire); every service's process group is killed now.
                let pids: Vec<u32> = self.status.borrow().services.iter().filter_map(|s| s.pid).collect();
                for pid in pids {
                    crate::service::kill_group(Some(pid), nix::sys::signal::Signal::SIGKILL);
                }
                self.status.send_modify(|s| s.phase = "stopped".into());
                let message = "forced stop (a second signal): services killed; running jobs come back when their leases expire";
                tracing::warn!("{message}");
                self.say(MachinePhase::Stopped, None, Some(message.into())).await
            }
        }
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

/// Runs `payload` once through the connector serving `service` (bounded by `timeout`).
async fn warm_up(
    connectors: &[Arc<dyn fleetq_connectors::Connector>],
    service: &str,
    payload: serde_json::Value,
    timeout: Duration,
) -> Result<(), String> {
    let Some(connector) = connectors.iter().find(|c| c.service() == service) else {
        return Err(format!("no connector of the worker serves {service:?}"));
    };
    let spec = fleetq_core::JobSpec::new(service, payload);
    let id = fleetq_core::JobId(format!("warmup-{service}"));
    let summary = fleetq_core::JobSummary::new_pending(id, &spec, 0);
    let job = fleetq_core::JobRecord { summary, spec, outcome: None, history: Vec::new() };
    let (sink, _progress) = fleetq_connectors::ProgressSink::channel();
    let cancel = CancellationToken::new();
    match tokio::time::timeout(timeout, connector.process(&job, sink, cancel.clone())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{}: {}", e.category.as_str(), e.message)),
        Err(_) => {
            cancel.cancel();
            Err(format!("no result after {} s", timeout.as_secs()))
        }
    }
}

/// Stops every launched instance (startup failed part-way).
async fn stop_all(instances: &[Instance], running: &mut [crate::service::Running]) {
    for (inst, r) in instances.iter().zip(running.iter_mut()) {
        inst.stop_process(r).await;
    }
}

/// Runs one setup command to its end (bounded by `timeout`); `Err((reason, output tail))` unless it
/// exits 0.
async fn run_setup(
    command: &[String],
    cwd: Option<&std::path::Path>,
    env: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), (String, Vec<String>)> {
    let Some(program) = command.first() else { return Err(("empty command".into(), Vec::new())) };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&command[1..]).envs(env).stdin(std::process::Stdio::null()).kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => return Err((format!("still running after {} s", timeout.as_secs()), Vec::new())),
        Ok(Err(e)) => return Err((format!("cannot run {program:?}: {e}"), Vec::new())),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let tail: Vec<String> = text
        .lines()
        .rev()
        .take(FAILURE_TAIL)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_owned)
        .collect();
    Err((crate::service::describe(out.status), tail))
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
