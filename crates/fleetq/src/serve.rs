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
use fleetq_machine::config::{GpusSetting, MachineFile, MachineSpec, Overrides as MachineOverrides, resolve};
use fleetq_machine::simulated::SimulatedMachine;
use fleetq_worker::config::capabilities_arg;

use crate::out::announce;
use crate::signal::{stop_on_signal, stop_then_force};

/// Flags every API process takes.
#[derive(Debug, ClapArgs)]
pub(crate) struct ApiArgs {
    /// Address to listen on. A non-loopback address needs tokens (or --insecure).
    #[arg(long, env = "FLEETQ_LISTEN", default_value = "127.0.0.1:7777")]
    listen: String,
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
    /// Seconds a client may take to send a request's head, or keep a connection idle between
    /// requests; then the connection is closed.
    #[arg(long, env = "FLEETQ_HEADER_TIMEOUT_S", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout_s: u64,
    /// Seconds a request may take up to its response head, body included (408 beyond). Event
    /// streams and WebSockets answer at once and are not bounded by it.
    #[arg(long, env = "FLEETQ_REQUEST_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    request_timeout_s: u64,
    /// Most connections open at once (one beyond is closed at accept).
    #[arg(long, env = "FLEETQ_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
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
        let listen = self.listen_addr()?;
        if tokens.is_empty() && !listen.ip().is_loopback() && !self.insecure {
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
            header_timeout: Duration::from_secs(self.header_timeout_s),
            request_timeout: Duration::from_secs(self.request_timeout_s),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            ..ApiConfig::default()
        })
    }
}

impl ApiArgs {
    /// `--listen` as an address: `HOST:PORT` where the host may be a name (`localhost:7823`);
    /// the first address it resolves to.
    fn listen_addr(&self) -> Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        let mut addrs = self.listen.to_socket_addrs().with_context(|| {
            format!("--listen {:?}: give HOST:PORT, e.g. 127.0.0.1:7777 or localhost:7777", self.listen)
        })?;
        addrs.next().with_context(|| format!("--listen {:?} resolves to no address", self.listen))
    }

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
        let addr = self.listen_addr()?;
        let resolved = if addr.to_string() == self.listen { String::new() } else { format!(" ({addr})") };
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {}{resolved}", self.listen))
    }
}

/// `fleetq up` flags.
#[derive(Debug, ClapArgs)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    tls: crate::redis_tls::RedisTlsArgs,
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
    #[arg(long, env = "SIMULATION_STEP_MS", default_value_t = crate::worker::SIMULATION_STEP_MS)]
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
    /// Lease length (ms).
    #[arg(long, env = "FLEETQ_LEASE_MS", default_value_t = 30_000)]
    lease_ms: i64,
    /// Run a real machine from this TOML file (services per GPU, one worker per GPU; see
    /// examples/machine.toml) instead of simulated workers.
    #[arg(long, env = "MACHINE_CONFIG", conflicts_with_all = ["comfyui", "a1111", "openai"])]
    config: Option<PathBuf>,
    /// One worker serving the ComfyUI at this URL (e.g. http://127.0.0.1:8188) instead of
    /// simulated workers.
    #[arg(long)]
    comfyui: Option<String>,
    /// One worker serving the AUTOMATIC1111 webui at this URL (e.g. http://127.0.0.1:7860).
    #[arg(long)]
    a1111: Option<String>,
    /// One worker serving the OpenAI-compatible API at this base URL (key from OPENAI_API_KEY).
    #[arg(long)]
    openai: Option<String>,
    #[command(flatten)]
    machine: crate::machine::MachineOverrides,
}

impl UpArgs {
    /// The real machine these flags ask for, if any: `--config`, or the one-flag services.
    fn real_machine(&self) -> Result<Option<MachineSpec>> {
        if let Some(path) = &self.config {
            return self.machine.spec(path).map(Some);
        }
        let mut connectors = Vec::new();
        for (kind, url, key) in [
            ("comfyui", &self.comfyui, "url"),
            ("a1111", &self.a1111, "url"),
            ("openai", &self.openai, "base_url"),
        ] {
            if let Some(url) = url {
                let url = url.trim_end_matches('/');
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("--{kind} needs an http:// or https:// URL, got {url:?}");
                }
                let mut connector = toml::Table::new();
                connector.insert("type".into(), toml::Value::String(kind.into()));
                connector.insert(key.into(), toml::Value::String(url.into()));
                connectors.push(toml::Value::Table(connector));
            }
        }
        if connectors.is_empty() {
            return Ok(None);
        }
        let mut worker = toml::Table::new();
        worker.insert("connectors".into(), toml::Value::Array(connectors));
        let file =
            MachineFile { gpus: Some(GpusSetting::Count(1)), worker: Some(worker), ..MachineFile::default() };
        let over =
            MachineOverrides { machine_id: self.machine.machine_id.clone(), ..MachineOverrides::default() };
        let mut spec = resolve(&file, &over, self.machine.id_or_local())?;
        spec.shutdown_grace = Duration::from_secs(10);
        Ok(Some(spec))
    }
}

/// `fleetq api` flags.
#[derive(Debug, ClapArgs)]
pub(crate) struct ApiOnlyArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    tls: crate::redis_tls::RedisTlsArgs,
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
    let real = args.real_machine()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let artifacts = args.data_dir.join("artifacts");
    let stop = CancellationToken::new();
    let config = args.api.config(Some(artifacts), stop.clone())?;
    if args.redis.is_none() && args.tls.files().is_set() {
        bail!(
            "--redis-ca, --redis-cert and --redis-key apply to a rediss:// Redis (--redis); the embedded store has no TLS"
        );
    }
    let broker_config = BrokerConfig {
        lease_ms: args.lease_ms,
        wait_replicas: args.wait_replicas,
        redis_tls: args.tls.files(),
        fair_share: args.api.fair_share()?,
        ..BrokerConfig::default()
    };
    match &args.redis {
        Some(url) => {
            let broker = RedisBroker::connect(url, &args.queue, broker_config).await?;
            let store = store_name(url, &args.queue);
            stack(Arc::new(broker), &args, real, &caps, config, stop, &store).await
        }
        None => {
            let path = args.data_dir.join("fleetq.db");
            let broker = EmbeddedBroker::open(&path, broker_config)
                .with_context(|| format!("opening the store {}", path.display()))?;
            let store = format!("embedded store {}", path.display());
            stack(Arc::new(broker), &args, real, &caps, config, stop, &store).await
        }
    }
}

async fn stack<B: Broker>(
    broker: Arc<B>,
    args: &UpArgs,
    real: Option<MachineSpec>,
    caps: &Capabilities,
    config: ApiConfig,
    stop: CancellationToken,
    store: &str,
) -> Result<()> {
    let listener = args.api.bind().await?;
    let addr = listener.local_addr()?;
    fleetq_api::install_metrics_recorder();
    let banner;
    let running = match real {
        Some(spec) => {
            let force = CancellationToken::new();
            tokio::spawn(stop_then_force(stop.clone(), force.clone()));
            let services: Vec<String> = spec.services.iter().map(|s| s.name.clone()).collect();
            banner = format!(
                "fleetq is up at http://{addr}  ({store}; machine {} starting{})\n  \
                 watch it at http://{addr}/ ; submit at http://{addr}/client",
                spec.machine_id,
                if services.is_empty() {
                    String::new()
                } else {
                    format!(" its services {}", services.join(", "))
                }
            );
            let broker = broker.clone();
            let stop = stop.clone();
            tokio::spawn(async move { crate::machine::supervise(broker, spec, stop, force).await })
        }
        None => {
            tokio::spawn(stop_on_signal(stop.clone()));
            let machine = SimulatedMachine {
                machine_id: args.machine.id_or_local().to_owned(),
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
            banner =
                up_banner(&addr.to_string(), store, args.machine.id_or_local(), args.workers, &args.services);
            let stop = stop.clone();
            tokio::spawn(async move { machine.run(stop).await.map_err(anyhow::Error::from) })
        }
    };
    announce(&banner);
    let stop_api = stop.clone();
    let stop_machine = stop.clone();
    // Whatever ends serving, the machine drains its workers before the process exits.
    let served = async {
        let served = fleetq_api::serve(listener, broker, config).await;
        stop_machine.cancel();
        served
    };
    // The API serves until a signal; a machine whose startup failed stops the process with its
    // error (the API first drains).
    let machine_end = async {
        let end = running.await;
        stop_api.cancel();
        end
    };
    let (served, ended) = tokio::join!(served, machine_end);
    stop.cancel();
    match ended {
        Ok(Err(e)) => {
            served.context("serving HTTP")?;
            return Err(e.context("the machine"));
        }
        Err(e) => tracing::warn!(error = %e, "the machine task failed"),
        Ok(Ok(())) => {}
    }
    served.context("serving HTTP")
}

/// What `fleetq up` prints once it serves: where, on what, and what it runs. A simulated service
/// under a real service's name is said to be simulated, so nobody mistakes its results for real.
fn up_banner(addr: &str, store: &str, machine: &str, workers: usize, services: &[String]) -> String {
    let first = services.first().map_or("simulation", String::as_str);
    let fleet = match workers {
        0 => "no local workers: run `fleetq worker` to serve jobs".to_owned(),
        1 => format!("machine {machine} with 1 simulated worker serving {}", services.join(", ")),
        n => format!("machine {machine} with {n} simulated workers serving {}", services.join(", ")),
    };
    let mut text = format!(
        "fleetq is up at http://{addr}  ({store}; {fleet})\n  \
         monitor: http://{addr}/   submit: fleetq submit --service {first} --wait    (or POST http://{addr}/api/jobs)"
    );
    let posing: Vec<&str> =
        services.iter().map(String::as_str).filter(|s| *s != "simulation" && !s.ends_with("-sim")).collect();
    if workers > 0 && !posing.is_empty() {
        text.push_str(&format!(
            "\n  SIMULATED: {} here is a simulation — jobs get {{\"simulated\": true}}, not real outputs. \
             For a real service: fleetq up --comfyui URL (or --a1111, --openai, --config machine.toml)",
            posing.join(", ")
        ));
    }
    text
}

/// How the store is named in the banner; Redis chosen by a `HUB_REDIS_URL` left in the
/// environment (not by `--redis`) is said so, loudly.
fn store_name(redis: &str, queue: &str) -> String {
    let from_flag = std::env::args().any(|a| a == "--redis" || a.starts_with("--redis="));
    let from_env = std::env::var("HUB_REDIS_URL").is_ok_and(|v| v == redis);
    let redis = fleetq_core::url::redacted(redis);
    if !from_flag && from_env {
        format!(
            "REDIS {redis} (queue {queue}) FROM THE HUB_REDIS_URL ENVIRONMENT VARIABLE — unset it for the embedded store"
        )
    } else {
        format!("redis {redis} (queue {queue})")
    }
}

/// `fleetq api`.
pub(crate) async fn api(args: ApiOnlyArgs) -> Result<()> {
    let stop = CancellationToken::new();
    let config = args.api.config(args.artifacts_dir.clone(), stop.clone())?;
    let broker_config = BrokerConfig {
        wait_replicas: args.wait_replicas,
        redis_tls: args.tls.files(),
        fair_share: args.api.fair_share()?,
        ..BrokerConfig::default()
    };
    let broker = RedisBroker::connect(&args.redis, &args.queue, broker_config).await?;
    let listener = args.api.bind().await?;
    let addr = listener.local_addr()?;
    fleetq_api::install_metrics_recorder();
    tokio::spawn(stop_on_signal(stop));
    let redis = fleetq_core::url::redacted(&args.redis);
    announce(&format!("fleetq api at http://{addr}  (redis {redis}, queue {})", args.queue));
    fleetq_api::serve(listener, Arc::new(broker), config).await.context("serving HTTP")
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
        assert!(one.contains("machine box with 1 simulated worker serving simulation"), "{one}");
        assert!(!one.contains("SIMULATED:"), "{one}");
        let two = up_banner("127.0.0.1:7777", "redis", "box", 2, &["a-sim".into(), "comfyui".into()]);
        assert!(
            two.contains("2 simulated workers serving a-sim, comfyui") && two.contains("--service a-sim"),
            "{two}"
        );
        assert!(two.contains("SIMULATED: comfyui here is a simulation"), "{two}");
    }
}
