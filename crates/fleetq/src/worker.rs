//! `fleetq worker`: one worker process against a Redis broker. Stops on SIGTERM/SIGINT after
//! draining (the running job finishes within the grace period or is released).

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_connectors::spec::{ConnectorKind, ConnectorSpec, Unavailable};
use fleetq_connectors::{CancellationToken, Connector};
use fleetq_core::{Capabilities, WorkerRegistration};
use fleetq_worker::{Worker, WorkerConfig};
use serde::Deserialize;

/// Flags of `fleetq worker`. Each is also read from the environment variable shown in `--help`;
/// precedence: flag > environment > `--config` file > default.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// TOML file: identity, capabilities, settings and `[[connectors]]` (see README).
    #[arg(long, env = "WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Redis of the fleet [default: redis://127.0.0.1:6379/].
    #[arg(long, env = "HUB_REDIS_URL")]
    redis_url: Option<String>,
    /// Queue name (keys `fleetq:{QUEUE}:…`) [default: fleetq].
    #[arg(long, env = "FLEETQ_QUEUE")]
    queue: Option<String>,
    /// Stable worker identity, e.g. `box1-gpu0`. Required: never defaulted.
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// The machine this worker runs on. Required: never defaulted.
    #[arg(long, env = "MACHINE_ID")]
    machine_id: Option<String>,
    /// Connectors to load, comma-separated: `comfyui`, `a1111`, `openai`, `rest`, `simulation`,
    /// `NAME-sim`, or the service name of a `[[connectors]]` entry of the config file. Without it,
    /// every connector of the file is loaded.
    #[arg(long, env = "WORKER_CONNECTORS", value_delimiter = ',')]
    connectors: Option<Vec<String>>,
    /// Capabilities as a JSON object, or `@path` to a JSON file.
    #[arg(long, env = "WORKER_CAPABILITIES")]
    capabilities: Option<String>,
    /// Seconds a running job may finish after SIGTERM before it is released [default: 30].
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_S")]
    shutdown_grace_s: Option<u64>,
    /// Lease length: a job whose worker stops renewing comes back after this long [default: 30000].
    #[arg(long, env = "FLEETQ_LEASE_MS")]
    lease_ms: Option<i64>,
    /// ComfyUI base URL for `comfyui` named in WORKER_CONNECTORS [default: http://127.0.0.1:8188].
    #[arg(long, env = "COMFYUI_URL")]
    comfyui_url: Option<String>,
    /// A1111 base URL for `a1111` named in WORKER_CONNECTORS [default: http://127.0.0.1:7860].
    #[arg(long, env = "A1111_URL")]
    a1111_url: Option<String>,
    /// OpenAI-compatible base URL for `openai` named in WORKER_CONNECTORS (key from OPENAI_API_KEY)
    /// [default: https://api.openai.com/v1].
    #[arg(long, env = "OPENAI_BASE_URL")]
    openai_base_url: Option<String>,
    /// Directory where outputs are written (`<dir>/<job id>/<file>`), for connectors without their
    /// own; unset = references, or small files inline.
    #[arg(long, env = "FLEETQ_ARTIFACTS_DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Seconds between connector health checks [default: 5].
    #[arg(long = "health-interval-s", env = "WORKER_SERVICE_HEALTH_CHECK_INTERVAL")]
    health_interval_s: Option<u64>,
    /// Release a job that shows no progress for this many seconds (jobs may set their own).
    #[arg(long = "progress-timeout-s", env = "WORKER_JOB_PROGRESS_TIMEOUT_SECONDS")]
    progress_timeout_s: Option<u64>,
    /// Duration of one simulated step, for simulation connectors named in WORKER_CONNECTORS
    /// [default: 100].
    #[arg(long, env = "SIMULATION_STEP_MS")]
    simulation_step_ms: Option<u64>,
}

/// The worker's TOML file. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    redis_url: Option<String>,
    queue: Option<String>,
    worker_id: Option<String>,
    machine_id: Option<String>,
    capabilities: Option<Capabilities>,
    shutdown_grace_s: Option<u64>,
    lease_ms: Option<i64>,
    artifacts_dir: Option<PathBuf>,
    health_interval_s: Option<u64>,
    progress_timeout_s: Option<u64>,
    #[serde(default)]
    connectors: Vec<ConnectorSpec>,
}

/// The connectors to load, from `WORKER_CONNECTORS` names and the file's entries, built, with their
/// concurrency limits. A name that matches no connector is loaded as [`Unavailable`] (registered
/// `offline` with the reason) so the fleet view shows the mistake instead of the worker refusing
/// to start.
fn build_connectors(
    args: &Args,
    file: &FileConfig,
    artifacts_dir: Option<&std::path::Path>,
) -> Result<Vec<(Arc<dyn Connector>, usize)>> {
    let build = |mut spec: ConnectorSpec| -> (Arc<dyn Connector>, usize) {
        if let Some(dir) = artifacts_dir {
            spec.default_artifacts_dir(dir);
        }
        (spec.build(), spec.max_concurrent_jobs)
    };
    let Some(names) = &args.connectors else {
        if file.connectors.is_empty() {
            bail!(
                "no connectors: set WORKER_CONNECTORS (e.g. comfyui) or add [[connectors]] to the config file"
            );
        }
        return Ok(file.connectors.iter().cloned().map(build).collect());
    };
    let mut built = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if let Some(spec) = file.connectors.iter().find(|c| c.service() == name) {
            built.push(build(spec.clone()));
            continue;
        }
        let Some(mut spec) = ConnectorSpec::from_name(name) else {
            let reason = format!(
                "unknown connector {name:?}: not a [[connectors]] service of the config file, nor one of comfyui, a1111, openai, rest, simulation, NAME-sim"
            );
            tracing::error!(connector = name, "{reason}");
            built.push((Arc::new(Unavailable::new(name, reason)), 1));
            continue;
        };
        match &mut spec.kind {
            ConnectorKind::Comfyui(c) => {
                if let Some(url) = &args.comfyui_url {
                    c.url.clone_from(url);
                }
            }
            ConnectorKind::A1111(c) => {
                if let Some(url) = &args.a1111_url {
                    c.url.clone_from(url);
                }
            }
            ConnectorKind::Openai(c) => {
                if let Some(url) = &args.openai_base_url {
                    c.base_url.clone_from(url);
                }
            }
            ConnectorKind::Simulation(c) => {
                if let Some(ms) = args.simulation_step_ms {
                    c.step_ms = ms;
                }
            }
            ConnectorKind::Rest(_) => {}
        }
        built.push(build(spec));
    }
    Ok(built)
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let file: FileConfig = match &args.config {
        None => FileConfig::default(),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
        }
    };
    let capabilities: Capabilities = match args.capabilities.as_deref() {
        None => file.capabilities.clone().unwrap_or_default(),
        Some(text) => {
            let json = match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                None => text.to_owned(),
            };
            serde_json::from_str(&json).context("--capabilities must be a JSON object")?
        }
    };
    let worker_id = args.worker_id.clone().or(file.worker_id.clone()).context(
        "a worker needs a stable identity: set WORKER_ID (or --worker-id, or worker_id in the config file)",
    )?;
    let machine_id = args.machine_id.clone().or(file.machine_id.clone()).context(
        "a worker needs its machine: set MACHINE_ID (or --machine-id, or machine_id in the config file)",
    )?;
    let artifacts_dir = args.artifacts_dir.clone().or(file.artifacts_dir.clone());
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    let mut max_concurrent = BTreeMap::new();
    for (connector, limit) in build_connectors(&args, &file, artifacts_dir.as_deref())? {
        max_concurrent.insert(connector.service().to_owned(), limit);
        connectors.push(connector);
    }
    let registration = WorkerRegistration { worker_id, machine_id, services: Vec::new(), capabilities };
    let mut config = WorkerConfig::new(registration);
    config.max_concurrent = max_concurrent;
    config.shutdown_grace =
        Duration::from_secs(args.shutdown_grace_s.or(file.shutdown_grace_s).unwrap_or(30));
    config.health_every =
        Duration::from_secs(args.health_interval_s.or(file.health_interval_s).unwrap_or(5).max(1));
    config.default_progress_timeout =
        args.progress_timeout_s.or(file.progress_timeout_s).map(Duration::from_secs);
    let lease_ms = args.lease_ms.or(file.lease_ms).unwrap_or(30_000);
    if lease_ms < 100 {
        bail!("the lease (--lease-ms, FLEETQ_LEASE_MS, lease_ms) must be at least 100 ms");
    }
    let redis_url =
        args.redis_url.clone().or(file.redis_url.clone()).unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let queue = args.queue.clone().or(file.queue.clone()).unwrap_or_else(|| "fleetq".into());
    let broker_config = BrokerConfig { lease_ms, ..BrokerConfig::default() };
    let broker = RedisBroker::connect(&redis_url, &queue, broker_config)
        .await
        .with_context(|| format!("connecting to {redis_url}"))?;
    let worker = Arc::new(Worker::new(Arc::new(broker), connectors, config)?);
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    worker.run(stop).await?;
    Ok(())
}

/// Fires `stop` on SIGINT or SIGTERM.
pub(crate) async fn stop_on_signal(stop: CancellationToken) {
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
