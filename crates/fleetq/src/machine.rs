//! `fleetq machine`: one GPU box as a member of a Redis fleet — its services and one worker per
//! GPU, from a machine TOML file (see `examples/machine.toml`), until SIGTERM drains it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::{Broker, BrokerConfig};
use fleetq_connectors::CancellationToken;
use fleetq_machine::config::{MachineFile, MachineSpec, Overrides, resolve};
use fleetq_machine::supervisor::{Supervisor, hostname};

use crate::signal::stop_then_force;

/// Flags of `fleetq machine`; each is also read from the environment variable shown in `--help`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    tls: crate::redis_tls::RedisTlsArgs,
    /// The machine's TOML file: GPUs, services per GPU, the worker per GPU (see examples/machine.toml).
    #[arg(long, env = "MACHINE_CONFIG")]
    config: PathBuf,
    /// Redis of the fleet.
    #[arg(long, env = "HUB_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// Queue name (keys `fleetq:{QUEUE}:…`).
    #[arg(long, env = "FLEETQ_QUEUE", default_value = "fleetq")]
    queue: String,
    #[command(flatten)]
    machine: MachineOverrides,
    /// Lease length (ms): a job whose worker stops renewing comes back after this long.
    #[arg(long, env = "FLEETQ_LEASE_MS", default_value_t = 30_000)]
    lease_ms: i64,
}

/// The seeds' environment names, over the file.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MachineOverrides {
    /// The machine's id [default: the file's machine_id, else the host name; `local` for
    /// `fleetq up` without a file].
    #[arg(long, env = "MACHINE_ID")]
    pub(crate) machine_id: Option<String>,
    /// Stand-in GPUs instead of detection (with TEST_MODE on a box without NVIDIA GPUs).
    #[arg(long, env = "NUM_GPUS")]
    num_gpus: Option<u32>,
    /// Test mode: configured stand-in GPUs, no detection.
    #[arg(long, env = "TEST_MODE", value_parser = clap::builder::BoolishValueParser::new())]
    test_mode: Option<bool>,
}

impl MachineOverrides {
    /// The id given, or `local` (the one-box default of `fleetq up`).
    pub(crate) fn id_or_local(&self) -> &str {
        self.machine_id.as_deref().unwrap_or("local")
    }

    /// Reads `path` and resolves it with these overrides.
    pub(crate) fn spec(&self, path: &std::path::Path) -> Result<MachineSpec> {
        let file = MachineFile::load(path)?;
        let over = Overrides {
            machine_id: self.machine_id.clone(),
            num_gpus: self.num_gpus,
            test_mode: self.test_mode,
        };
        Ok(resolve(&file, &over, &hostname())?)
    }
}

pub(crate) async fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.lease_ms >= 100, "the lease (--lease-ms) must be at least 100 ms");
    let spec = args.machine.spec(&args.config)?;
    let config =
        BrokerConfig { lease_ms: args.lease_ms, redis_tls: args.tls.files(), ..BrokerConfig::default() };
    let broker = RedisBroker::connect(&args.redis, &args.queue, config).await?;
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    tokio::spawn(stop_then_force(stop.clone(), force.clone()));
    supervise(Arc::new(broker), spec, stop, force).await
}

/// Runs `spec` on `broker` until `stop` (its local status endpoint too, when configured).
pub(crate) async fn supervise<B: Broker>(
    broker: Arc<B>,
    spec: MachineSpec,
    stop: CancellationToken,
    force: CancellationToken,
) -> Result<()> {
    let listen = spec.status_listen;
    let supervisor = Supervisor::new(broker, spec);
    if let Some(addr) = listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("status endpoint on {addr}"))?;
        tracing::info!(%addr, "machine status at GET /health");
        tokio::spawn(fleetq_machine::status::serve(listener, supervisor.status(), stop.clone()));
    }
    supervisor.run(stop, force).await?;
    Ok(())
}
