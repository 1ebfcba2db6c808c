//! `fleetq worker`: one worker process against a Redis broker. Stops on SIGTERM/SIGINT after
//! draining (the running job finishes within the grace period or is released).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_connectors::comfyui::{ComfyUi, ComfyUiConfig};
use fleetq_connectors::simulation::{Simulation, SimulationConfig};
use fleetq_connectors::{CancellationToken, Connector};
use fleetq_core::{Capabilities, WorkerRegistration};
use fleetq_worker::{Worker, WorkerConfig};

/// Flags of `fleetq worker` (each also read from the environment variable shown in `--help`).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Redis of the fleet.
    #[arg(long, env = "HUB_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Queue name (keys `fleetq:{QUEUE}:…`).
    #[arg(long, env = "FLEETQ_QUEUE", default_value = "fleetq")]
    queue: String,
    /// Stable worker identity, e.g. `box1-gpu0`. Required: never defaulted.
    #[arg(long, env = "WORKER_ID")]
    worker_id: String,
    /// The machine this worker runs on. Required: never defaulted.
    #[arg(long, env = "MACHINE_ID")]
    machine_id: String,
    /// Connectors to load, comma-separated: `comfyui`, `simulation`, `NAME-sim`.
    #[arg(long, env = "WORKER_CONNECTORS", value_delimiter = ',', required = true)]
    connectors: Vec<String>,
    /// Capabilities as a JSON object, or `@path` to a JSON file.
    #[arg(long, env = "WORKER_CAPABILITIES")]
    capabilities: Option<String>,
    /// Seconds a running job may finish after SIGTERM before it is released.
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_S", default_value_t = 30)]
    shutdown_grace_s: u64,
    /// Lease length: a job whose worker stops renewing comes back after this long.
    #[arg(long, env = "FLEETQ_LEASE_MS", default_value_t = 30_000)]
    lease_ms: i64,
    /// ComfyUI base URL (the `comfyui` connector).
    #[arg(long, env = "COMFYUI_URL", default_value = "http://127.0.0.1:8188")]
    comfyui_url: String,
    /// Directory where ComfyUI outputs are copied (`<dir>/<job id>/<file>`); unset = references only.
    #[arg(long, env = "FLEETQ_ARTIFACTS_DIR")]
    artifacts_dir: Option<std::path::PathBuf>,
    /// Seconds between connector health checks.
    #[arg(long, env = "WORKER_SERVICE_HEALTH_CHECK_INTERVAL", default_value_t = 5)]
    health_interval_s: u64,
    /// Release a job that shows no progress for this many seconds (jobs may set their own).
    #[arg(long, env = "WORKER_JOB_PROGRESS_TIMEOUT_SECONDS")]
    progress_timeout_s: Option<u64>,
    /// Duration of one simulated step (simulation connectors).
    #[arg(long, env = "SIMULATION_STEP_MS", default_value_t = 100)]
    simulation_step_ms: u64,
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let capabilities: Capabilities = match args.capabilities.as_deref() {
        None => Capabilities::default(),
        Some(text) => {
            let json = match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                None => text.to_owned(),
            };
            serde_json::from_str(&json).context("--capabilities must be a JSON object")?
        }
    };
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    for name in args.connectors.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if name == "simulation" || name.ends_with("-sim") {
            let config = SimulationConfig {
                service: name.to_owned(),
                step_ms: args.simulation_step_ms,
                ..Default::default()
            };
            connectors.push(Arc::new(Simulation::new(config)));
        } else if name == "comfyui" {
            let config = ComfyUiConfig {
                url: args.comfyui_url.clone(),
                artifacts_dir: args.artifacts_dir.clone(),
                ..ComfyUiConfig::default()
            };
            connectors.push(Arc::new(ComfyUi::new(config).context("comfyui connector")?));
        } else {
            bail!(
                "connector {name:?} is not available in this build yet (available: comfyui, simulation, NAME-sim)"
            );
        }
    }
    let registration = WorkerRegistration {
        worker_id: args.worker_id,
        machine_id: args.machine_id,
        services: Vec::new(),
        capabilities,
    };
    let mut config = WorkerConfig::new(registration);
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_s);
    config.health_every = Duration::from_secs(args.health_interval_s.max(1));
    config.default_progress_timeout = args.progress_timeout_s.map(Duration::from_secs);
    if args.lease_ms < 100 {
        bail!("--lease-ms must be at least 100");
    }
    let broker_config = BrokerConfig { lease_ms: args.lease_ms, ..BrokerConfig::default() };
    let broker = RedisBroker::connect(&args.redis_url, &args.queue, broker_config)
        .await
        .with_context(|| format!("connecting to {}", args.redis_url))?;
    let worker = Arc::new(Worker::new(Arc::new(broker), connectors, config)?);
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    worker.run(stop).await?;
    Ok(())
}

/// Fires `stop` on SIGINT or SIGTERM.
async fn stop_on_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested; draining");
    stop.cancel();
}
