//! `fleetq worker`: one worker process against a Redis broker. Stops on SIGTERM/SIGINT after
//! draining (the running job finishes within the grace period or is released).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_connectors::CancellationToken;
use fleetq_worker::Worker;
use fleetq_worker::config::{self, Overrides, WorkerFile, capabilities_arg};

use crate::signal::stop_on_signal;

/// A simulated step's default duration (ms): the same in `fleetq up` and `fleetq worker`.
pub(crate) const SIMULATION_STEP_MS: u64 = 300;

/// Flags of `fleetq worker`. Each is also read from the environment variable shown in `--help`;
/// precedence: flag > environment > `--config` file > default.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    tls: crate::redis_tls::RedisTlsArgs,
    /// TOML file: identity, capabilities, settings and `[[connectors]]` (see README).
    #[arg(long, env = "WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Redis of the fleet [default: redis://127.0.0.1:6379/].
    #[arg(long = "redis", visible_alias = "redis-url", env = "HUB_REDIS_URL")]
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
    /// [default: 300, as in `fleetq up`].
    #[arg(long, env = "SIMULATION_STEP_MS")]
    simulation_step_ms: Option<u64>,
    /// Acknowledge a change (a completion, …) only once this many Redis replicas hold it.
    #[arg(long, env = "FLEETQ_WAIT_REPLICAS", default_value_t = 0)]
    wait_replicas: u32,
}

impl Args {
    /// The flags and environment variables as the worker configuration's overrides.
    fn overrides(&self) -> Result<Overrides> {
        Ok(Overrides {
            redis_url: self.redis_url.clone(),
            redis_tls: self.tls.files(),
            queue: self.queue.clone(),
            worker_id: self.worker_id.clone(),
            machine_id: self.machine_id.clone(),
            connectors: self.connectors.clone(),
            capabilities: self.capabilities.as_deref().map(capabilities_arg).transpose()?,
            shutdown_grace_s: self.shutdown_grace_s,
            lease_ms: self.lease_ms,
            comfyui_url: self.comfyui_url.clone(),
            a1111_url: self.a1111_url.clone(),
            openai_base_url: self.openai_base_url.clone(),
            artifacts_dir: self.artifacts_dir.clone(),
            health_interval_s: self.health_interval_s,
            progress_timeout_s: self.progress_timeout_s,
            simulation_step_ms: Some(self.simulation_step_ms.unwrap_or(SIMULATION_STEP_MS)),
        })
    }
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let file = match &args.config {
        None => WorkerFile::default(),
        Some(path) => WorkerFile::load(path)?,
    };
    let settings = config::resolve(&file, &args.overrides()?)?;
    let broker_config = BrokerConfig {
        lease_ms: settings.lease_ms,
        wait_replicas: args.wait_replicas,
        redis_tls: settings.redis_tls.clone(),
        ..BrokerConfig::default()
    };
    let broker = RedisBroker::connect(&settings.redis_url, &settings.queue, broker_config).await?;
    let worker = Arc::new(Worker::new(Arc::new(broker), settings.connectors, settings.worker)?);
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    worker.run(stop).await?;
    Ok(())
}
