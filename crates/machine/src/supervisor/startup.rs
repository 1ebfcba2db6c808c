//! Start-up: the host reported, GPUs found, setup commands run once, every service launched per
//! GPU and awaited until it answers, then one worker per GPU built (after its warm-ups). Every
//! step is a machine `step` event; a failure stops what was launched and is reported as `error`.

use super::*;
use crate::service::Running;

/// What start-up leaves for supervision and serving.
pub(super) struct Started<B: Broker> {
    /// Every service instance, one per service per GPU, in launch order.
    pub(super) instances: Vec<Instance>,
    /// Their processes, in the same order.
    pub(super) running: Vec<Running>,
    /// Their status channels, in the same order.
    pub(super) statuses: Vec<watch::Sender<ServiceStatus>>,
    /// One worker per GPU.
    pub(super) workers: Vec<Arc<Worker<B>>>,
    /// Their ids, for the local status.
    pub(super) worker_ids: Vec<String>,
}

impl<B: Broker> Supervisor<B> {
    /// Starts the machine up to its workers; `stop` cuts a wait for a slow service short.
    pub(super) async fn start_up(&self, stop: &CancellationToken) -> Result<Started<B>, MachineError> {
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
        let mut statuses = Vec::new();
        for (inst, r) in instances.iter().zip(running.iter_mut()) {
            let began = Instant::now();
            let label = inst.label();
            let broker = self.broker.clone();
            let machine_id = self.spec.machine_id.clone();
            let waited = inst
                .wait_ready(r, self.spec.startup_timeout, WAITING_REPORT, stop, |elapsed, last| {
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

        Ok(Started { instances, running, statuses, workers, worker_ids })
    }
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
async fn stop_all(instances: &[Instance], running: &mut [Running]) {
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
