//! `fleetq up` (API + a local machine of simulated workers on the embedded store, or Redis) and
//! `fleetq api` (the API alone against Redis): flags to configurations, then the libraries'
//! `fleetq_api::serve` and `fleetq_machine`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use fleetq_api::{ApiConfig, Tokens};
use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::{Broker, BrokerConfig, FairShare};
use fleetq_connectors::CancellationToken;
use fleetq_core::Capabilities;
use fleetq_machine::simulated::SimulatedMachine;
use fleetq_worker::config::capabilities_arg;

use crate::signal::stop_on_signal;

/// Flags every API process takes.
#[derive(Debug, ClapArgs)]
pub(crate) struct ApiArgs {
    /// Address to listen on. A non-loopback address needs tokens (or --insecure).
    #[arg(long, env = "FLEETQ_LISTEN", default_value = "127.0.0.1:7777")]
    listen: SocketAddr,
    /// Access tokens `role:secret` (roles read, submit, admin); comma-separated or repeated.
    #[arg(long = "token", env = "FLEETQ_TOKENS", value_delimiter = ',')]
    tokens: Vec<String>,
    /// Serve a non-loopback address without tokens (anyone who can reach it controls the queue).
    #[arg(long)]
    insecure: bool,
    /// Origins allowed to call the API from a browser (CORS), e.g. https://ops.example.com.
    #[arg(long = "cors-origin", env = "FLEETQ_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds after which a connector report counts as stale.
    #[arg(long, default_value_t = 15)]
    stale_after_s: u64,
    /// How often this process reaps expired leases and due retries (ms).
    #[arg(long, default_value_t = 1000)]
    reap_every_ms: u64,
    /// Most event streams and WebSockets open at once (beyond: 503 with Retry-After).
    #[arg(long, env = "FLEETQ_MAX_STREAMS", default_value_t = 1024)]
    max_streams: usize,
    /// Fair share between customers of equal priority: they take turns instead of strict
    /// submission order (on/off). Unset leaves the queue's setting (off for a new queue).
    #[arg(long, env = "FLEETQ_FAIR_SHARE", value_parser = clap::builder::BoolishValueParser::new())]
    fair_share: Option<bool>,
    /// Fair share weight `customer=N` (1..1000 turns per round, default 1); comma-separated or
    /// repeated. Needs --fair-share on.
    #[arg(long = "customer-weight", env = "FLEETQ_CUSTOMER_WEIGHTS", value_delimiter = ',')]
    customer_weights: Vec<String>,
}

impl ApiArgs {
    fn config(&self, artifacts_dir: Option<PathBuf>, shutdown: CancellationToken) -> Result<ApiConfig> {
        let tokens = Tokens::parse(self.tokens.iter().map(String::as_str)).map_err(anyhow::Error::msg)?;
        if tokens.is_empty() && !self.listen.ip().is_loopback() && !self.insecure {
            bail!(
                "refusing to serve {} without tokens: anyone who reaches it could submit and cancel jobs. \
                 Give --token admin:<secret> (or FLEETQ_TOKENS), listen on 127.0.0.1, or pass --insecure",
                self.listen
            );
        }
        Ok(ApiConfig {
            tokens,
            cors_origins: self.cors_origins.clone(),
            max_body_bytes: self.max_body_bytes,
            stale_after: Duration::from_secs(self.stale_after_s.max(1)),
            artifacts_dir,
            shutdown,
            reap_every: Duration::from_millis(self.reap_every_ms.max(10)),
            max_streams: self.max_streams.max(1),
            ..ApiConfig::default()
        })
    }
}

impl ApiArgs {
    /// The queue's fair share setting as these flags give it (`None`: leave it).
    fn fair_share(&self) -> Result<Option<FairShare>> {
        match self.fair_share {
            None | Some(false) if !self.customer_weights.is_empty() => {
                bail!("--customer-weight needs --fair-share on")
            }
            None => Ok(None),
            Some(false) => Ok(Some(FairShare::default())),
            Some(true) => Ok(Some(
                FairShare::with_weights(self.customer_weights.iter().map(String::as_str))
                    .map_err(anyhow::Error::msg)?,
            )),
        }
    }

    /// Binds the address, first of all, so a taken port is reported before anything else starts.
    async fn bind(&self) -> Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("listening on {}", self.listen))
    }
}

/// `fleetq up` flags.
#[derive(Debug, ClapArgs)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Directory of the embedded store and the artifacts (created if missing).
    #[arg(long, env = "FLEETQ_DATA_DIR", default_value = "fleetq-data")]
    data_dir: PathBuf,
    /// Use this Redis instead of the embedded store.
    #[arg(long, env = "HUB_REDIS_URL")]
    redis: Option<String>,
    /// Queue name (key prefix) in Redis.
    #[arg(long, env = "FLEETQ_QUEUE", default_value = "fleetq")]
    queue: String,
    /// With Redis: acknowledge a change only once this many replicas hold it (see the README's
    /// durability section).
    #[arg(long, env = "FLEETQ_WAIT_REPLICAS", default_value_t = 0)]
    wait_replicas: u32,
    /// Simulated workers on the local machine (0 runs the API only).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Services each worker simulates (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "simulation")]
    services: Vec<String>,
    /// Progress steps per simulated job.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Duration of one step (ms).
    #[arg(long, env = "SIMULATION_STEP_MS", default_value_t = 300)]
    step_ms: u64,
    /// Spread of job durations (0–1).
    #[arg(long, default_value_t = 0.2)]
    jitter: f64,
    /// Share of attempts (0–1) that fail with a retryable error.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Capabilities of every worker (JSON object, or @file).
    #[arg(long)]
    capabilities: Option<String>,
    /// The local machine's id.
    #[arg(long, env = "MACHINE_ID", default_value = "local")]
    machine_id: String,
    /// Lease length (ms).
    #[arg(long, env = "FLEETQ_LEASE_MS", default_value_t = 30_000)]
    lease_ms: i64,
}

/// `fleetq api` flags.
#[derive(Debug, ClapArgs)]
pub(crate) struct ApiOnlyArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Redis URL.
    #[arg(long, env = "HUB_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// Queue name (key prefix) in Redis.
    #[arg(long, env = "FLEETQ_QUEUE", default_value = "fleetq")]
    queue: String,
    /// Where workers store artifacts (shared storage), to serve them for download.
    #[arg(long, env = "FLEETQ_ARTIFACTS_DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Acknowledge a change only once this many replicas hold it (see the README's durability
    /// section).
    #[arg(long, env = "FLEETQ_WAIT_REPLICAS", default_value_t = 0)]
    wait_replicas: u32,
}

/// `fleetq up`.
pub(crate) async fn up(args: UpArgs) -> Result<()> {
    if args.services.is_empty() || args.services.iter().any(|s| s.trim().is_empty()) {
        bail!("--services needs at least one service name");
    }
    if !(0.0..=1.0).contains(&args.jitter) || !(0.0..=1.0).contains(&args.failure_rate) {
        bail!("--jitter and --failure-rate are between 0 and 1");
    }
    if args.lease_ms < 100 {
        bail!("the lease (--lease-ms) must be at least 100 ms");
    }
    let caps = args.capabilities.as_deref().map(capabilities_arg).transpose()?.unwrap_or_default();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let artifacts = args.data_dir.join("artifacts");
    let stop = CancellationToken::new();
    let config = args.api.config(Some(artifacts), stop.clone())?;
    let broker_config = BrokerConfig {
        lease_ms: args.lease_ms,
        wait_replicas: args.wait_replicas,
        fair_share: args.api.fair_share()?,
        ..BrokerConfig::default()
    };
    match &args.redis {
        Some(url) => {
            let broker = RedisBroker::connect(url, &args.queue, broker_config)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            stack(
                Arc::new(broker),
                &args,
                &caps,
                config,
                stop,
                &format!("redis {url} (queue {})", args.queue),
            )
            .await
        }
        None => {
            let path = args.data_dir.join("fleetq.db");
            let broker = EmbeddedBroker::open(&path, broker_config)
                .with_context(|| format!("opening the store {}", path.display()))?;
            stack(Arc::new(broker), &args, &caps, config, stop, &format!("embedded store {}", path.display()))
                .await
        }
    }
}

async fn stack<B: Broker>(
    broker: Arc<B>,
    args: &UpArgs,
    caps: &Capabilities,
    config: ApiConfig,
    stop: CancellationToken,
    store: &str,
) -> Result<()> {
    let listener = args.api.bind().await?;
    let addr = listener.local_addr()?;
    fleetq_api::install_metrics_recorder();
    tokio::spawn(stop_on_signal(stop.clone()));
    let machine = SimulatedMachine {
        machine_id: args.machine_id.clone(),
        workers: args.workers,
        services: args.services.iter().map(|s| s.trim().to_owned()).collect(),
        steps: args.steps,
        step_ms: args.step_ms,
        jitter: args.jitter,
        failure_rate: args.failure_rate,
        capabilities: caps.clone(),
        shutdown_grace: Duration::from_secs(10),
    }
    .build(broker.clone())?;
    let running = tokio::spawn(machine.run(stop.clone()));
    announce(&up_banner(&addr.to_string(), store, &args.machine_id, args.workers, &args.services));
    let served = fleetq_api::serve(listener, broker, config).await;
    // Whatever ended serving, the machine drains its workers before the process exits.
    stop.cancel();
    match running.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the machine stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "the machine task failed"),
        Ok(Ok(())) => {}
    }
    served.context("serving HTTP")
}

/// What `fleetq up` prints once it serves: where, on what, and what it runs.
fn up_banner(addr: &str, store: &str, machine: &str, workers: usize, services: &[String]) -> String {
    let first = services.first().map_or("simulation", String::as_str);
    let fleet = match workers {
        0 => "no local workers: run `fleetq worker` to serve jobs".to_owned(),
        1 => format!("machine {machine} with 1 worker serving {}", services.join(", ")),
        n => format!("machine {machine} with {n} workers serving {}", services.join(", ")),
    };
    format!(
        "fleetq is up at http://{addr}  ({store}; {fleet})\n  \
         submit: fleetq submit --service {first} --wait    (or POST http://{addr}/api/jobs)"
    )
}

/// `fleetq api`.
pub(crate) async fn api(args: ApiOnlyArgs) -> Result<()> {
    let stop = CancellationToken::new();
    let config = args.api.config(args.artifacts_dir.clone(), stop.clone())?;
    let broker_config = BrokerConfig {
        wait_replicas: args.wait_replicas,
        fair_share: args.api.fair_share()?,
        ..BrokerConfig::default()
    };
    let broker = RedisBroker::connect(&args.redis, &args.queue, broker_config)
        .await
        .with_context(|| format!("connecting to {}", args.redis))?;
    let listener = args.api.bind().await?;
    let addr = listener.local_addr()?;
    fleetq_api::install_metrics_recorder();
    tokio::spawn(stop_on_signal(stop));
    announce(&format!("fleetq api at http://{addr}  (redis {}, queue {})", args.redis, args.queue));
    fleetq_api::serve(listener, Arc::new(broker), config).await.context("serving HTTP")
}

/// Prints the startup line. A closed stdout (`fleetq up | head -1`, a supervisor that stopped
/// reading) must not stop the server, so write errors are ignored where `println!` would panic.
fn announce(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_says_what_runs() {
        let sim = vec!["simulation".to_owned()];
        let none = up_banner("127.0.0.1:7777", "embedded store ./d", "box", 0, &sim);
        assert!(none.contains("no local workers") && !none.contains("serving"), "{none}");
        let one = up_banner("127.0.0.1:7777", "embedded store ./d", "box", 1, &sim);
        assert!(one.contains("machine box with 1 worker serving simulation"), "{one}");
        let two = up_banner("127.0.0.1:7777", "redis", "box", 2, &["a".into(), "b".into()]);
        assert!(two.contains("2 workers serving a, b") && two.contains("--service a"), "{two}");
    }
}
