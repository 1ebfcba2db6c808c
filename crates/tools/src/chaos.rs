//! `fleetq chaos`: the failures a fleet meets, done to real processes, and what was lost.
//!
//! Each scenario runs a real `redis-server` (append-only file, fsync on every write: the setting
//! under which the broker promises that nothing acknowledged is lost), N no-op simulation jobs and
//! W real `fleetq worker` processes, does its damage while they run, waits until every job has
//! finished, then reads the truth from the broker: jobs not finished (`lost`), jobs whose
//! completion is in the event log more than once (`double_completed`), the attempts histogram and
//! how long the fleet took to complete a job again after the damage (`recover_ms`). It prints one
//! JSON line and exits non-zero when anything was lost or completed twice.
//!
//! Scenarios: `worker-kill` (kill -9 of a random worker every `--kill-every-ms`, restarted at once),
//! `redis-kill` (kill -9 of Redis mid-run, restarted from its files), `embedded-kill` (kill -9 of
//! `fleetq up` on the embedded store mid-run, restarted on the same data directory; counted from
//! the store's file afterwards), `redis-shutdown` (a clean `SHUTDOWN` of Redis mid-run),
//! `api-kill-batch` (kill -9 of `fleetq api` during batch submissions: each batch is all or none),
//! `service-kill` (kill -9 of the ComfyUI a worker drives, under ComfyUI jobs), `redis-failover`
//! (kill -9 of a Sentinel-watched primary, several times: `failover`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::{Broker, BrokerConfig, JobFilter};
use fleetq_broker::{Queue, Read};
use fleetq_client::{Client, JobQuery};
use fleetq_core::job::SERVICE_CRASHES_TO_FAIL;
use fleetq_core::{EventKind, FailureCategory, JobSpec, JobStatus};
use serde_json::json;

/// Which damage to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(clippy::enum_variant_names, reason = "each scenario is named for what it kills")]
pub enum Scenario {
    /// kill -9 of a random worker every --kill-every-ms, restarted at once.
    WorkerKill,
    /// kill -9 of Redis once mid-run, restarted on the same port from its files.
    RedisKill,
    /// kill -9 of `fleetq up` (embedded store) once mid-run, restarted on its data directory.
    EmbeddedKill,
    /// `SHUTDOWN` of Redis once mid-run (a clean stop), restarted on the same port.
    RedisShutdown,
    /// kill -9 of a `fleetq api` while it receives a batch of --jobs, --workers times: every
    /// batch must be stored whole or not at all.
    ApiKillBatch,
    /// ComfyUI jobs on workers each driving its own (mock) ComfyUI process; kill -9 of a random
    /// ComfyUI every --kill-every-ms, restarted on its port.
    ServiceKill,
    /// A primary, a replica and three sentinels; kill -9 of the primary --failovers times while
    /// workers drain and a client submits, every process on redis+sentinel://.
    RedisFailover,
}

/// `fleetq chaos` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The damage.
    #[arg(long, value_enum, default_value = "worker-kill")]
    scenario: Scenario,
    /// Jobs submitted before the damage starts.
    #[arg(long, default_value_t = 1000)]
    pub(crate) jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,
    /// Duration of one simulated step (each job has 5).
    #[arg(long, default_value_t = 10)]
    pub(crate) step_ms: u64,
    /// Pause between two worker kills (worker-kill).
    #[arg(long, default_value_t = 500)]
    kill_every_ms: u64,
    /// Lease length of the workers: how soon a killed worker's job comes back.
    #[arg(long, default_value_t = 1500)]
    pub(crate) lease_ms: i64,
    /// Give up (and report what is unfinished as lost) after this long.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub(crate) redis_server: String,
    /// Failovers to cause (redis-failover).
    #[arg(long, default_value_t = 5)]
    pub(crate) failovers: usize,
    /// Replicas each change waits for before it is acknowledged (redis-failover; the processes'
    /// --wait-replicas).
    #[arg(long, default_value_t = 0)]
    pub(crate) wait_replicas: u32,
}

/// A child process killed (SIGKILL) when dropped.
pub(crate) struct Proc(Child);

impl Proc {
    /// kill -9, and reaped.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns a `fleetq up` or `fleetq api` told to listen on `127.0.0.1:0` and returns it with the
/// URL its first line prints (the port it bound: no port is picked, released and raced for).
pub(crate) fn spawn_serving(cmd: &mut Command, what: &str) -> Result<(Proc, String)> {
    let mut child = cmd
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("its stdout")?;
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // The rest is read and dropped, so the process never blocks on a full pipe.
        for _ in lines {}
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .and_then(Result::ok)
        .with_context(|| format!("{what} printed no address within 30 s"))?;
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("{what} printed no address: {first:?}"))?
        .trim_end_matches('/')
        .to_owned();
    Ok((proc, url))
}

/// A loopback port free now: only for the servers that cannot bind port 0 and say which port they
/// got (`redis-server`, a sentinel, the mock ComfyUI restarted on its port).
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Spawns `cmd` quietly (`what` names it in errors); with `port`, waits until it listens there.
pub(crate) fn spawn(cmd: &mut Command, what: &str, port: Option<u16>) -> Result<Proc> {
    let child = cmd
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let proc = Proc(child);
    if let Some(port) = port {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("{what} did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(proc)
}

fn start_redis(bin: &str, port: u16, dir: &Path) -> Result<Proc> {
    start_redis_with(bin, port, dir, &["--appendfsync", "always"])
}

/// A `redis-server` on loopback `port` with an append-only file in `dir` and `extra` arguments.
pub(crate) fn start_redis_with(bin: &str, port: u16, dir: &Path, extra: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
        .arg("--dir")
        .arg(dir)
        .args(["--loglevel", "warning"])
        .args(extra);
    spawn(&mut cmd, &format!("{bin} (Debian: apt-get install -y redis-server)"), Some(port))
}

fn start_comfy(exe: &Path, port: u16) -> Result<Proc> {
    spawn(
        Command::new(exe).args(["mock", "comfyui", "--port", &port.to_string()]),
        "a mock ComfyUI",
        Some(port),
    )
}

fn start_worker(exe: &Path, url: &str, i: usize, args: &Args) -> Result<Proc> {
    start_worker_with(exe, url, i, args, None)
}

/// A worker process: simulation, or (`comfy_port`) the ComfyUI connector on that port.
fn start_worker_with(exe: &Path, url: &str, i: usize, args: &Args, comfy_port: Option<u16>) -> Result<Proc> {
    let mut cmd = Command::new(exe);
    match comfy_port {
        Some(port) => cmd
            .env("WORKER_CONNECTORS", "comfyui")
            .env("COMFYUI_URL", format!("http://127.0.0.1:{port}"))
            .env("WORKER_SERVICE_HEALTH_CHECK_INTERVAL", "1"),
        None => cmd.env("WORKER_CONNECTORS", "simulation"),
    };
    cmd.arg("worker")
        .env("HUB_REDIS_URL", url)
        .env("FLEETQ_QUEUE", "chaos")
        .env("WORKER_ID", format!("chaos-w{i}"))
        .env("MACHINE_ID", "chaos")
        .env("SIMULATION_STEP_MS", args.step_ms.to_string())
        .env("FLEETQ_LEASE_MS", args.lease_ms.to_string());
    spawn(&mut cmd, "a fleetq worker", None)
}

/// A small deterministic generator (which worker to kill), seeded by the clock.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// What the broker says once the run is over.
pub(crate) struct Tally {
    finished: usize,
    pub(crate) completed: usize,
    pub(crate) failed: usize,
    /// Of the failed: jobs whose service died under them twice (`service_crash`, by design).
    service_crash: usize,
    attempts: BTreeMap<u32, usize>,
}

pub(crate) async fn tally<B: Broker>(b: &B) -> Result<Tally> {
    let mut t = Tally { finished: 0, completed: 0, failed: 0, service_crash: 0, attempts: BTreeMap::new() };
    let mut filter = JobFilter { limit: Some(1000), ..JobFilter::default() };
    loop {
        let page = b.jobs(&filter).await?;
        for j in &page.jobs {
            if j.status.is_terminal() {
                t.finished += 1;
            }
            match j.status {
                JobStatus::Completed => t.completed += 1,
                JobStatus::Failed => {
                    t.failed += 1;
                    let crashed =
                        j.error.as_ref().is_some_and(|e| e.category == FailureCategory::ServiceCrash);
                    t.service_crash += usize::from(crashed && j.service_crashes >= SERVICE_CRASHES_TO_FAIL);
                }
                _ => {}
            }
            *t.attempts.entry(j.attempt).or_default() += 1;
        }
        match page.next {
            Some(n) => filter.cursor = Some(n),
            None => return Ok(t),
        }
    }
}

/// Completions per job in the whole event log.
pub(crate) async fn completions<B: Broker>(b: &B) -> Result<HashMap<String, usize>> {
    let mut out: HashMap<String, usize> = HashMap::new();
    let mut after = 0;
    loop {
        let page = b.events_after(after, 10_000, Duration::ZERO).await?;
        let Some(last) = page.last() else { return Ok(out) };
        after = last.seq;
        for ev in &page {
            if let EventKind::JobCompleted { job } = &ev.kind {
                *out.entry(job.id.0.clone()).or_default() += 1;
            }
        }
    }
}

/// Connects, retrying while Redis restarts.
pub(crate) async fn connect(url: &str) -> Result<RedisBroker> {
    let config = BrokerConfig { max_events: 1_000_000, ..BrokerConfig::default() };
    let mut last = None;
    for _ in 0..100 {
        match RedisBroker::connect(url, "chaos", config.clone()).await {
            Ok(b) => return Ok(b),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no connection"), anyhow::Error::from))
}

fn report(
    args: &Args,
    kills: usize,
    t: &Tally,
    doubles: usize,
    recover_ms: Option<u128>,
    elapsed_ms: u128,
) -> Result<()> {
    let lost = args.jobs.saturating_sub(t.finished);
    let mut line = json!({
        "scenario": clap::ValueEnum::to_possible_value(&args.scenario).map(|v| v.get_name().to_owned()),
        "jobs": args.jobs, "workers": args.workers,
        "kills": kills, "completed": t.completed, "failed": t.failed, "service_crash": t.service_crash, "lost": lost,
        "double_completed": doubles, "attempts": t.attempts, "recover_ms": recover_ms, "elapsed_ms": elapsed_ms,
    });
    if matches!(args.scenario, Scenario::RedisKill | Scenario::RedisShutdown) {
        // What the figure does not cover, said where it is read.
        line["note"] = json!(
            "the Redis process is killed, not the machine: what it wrote stays in the OS's page cache, so this proves reconnection and recovery from the append-only file, not durability across a power loss"
        );
    }
    crate::report(&line.to_string());
    if lost > 0 || doubles > 0 {
        bail!("{lost} jobs lost, {doubles} completed twice");
    }
    Ok(())
}

fn start_up(exe: &Path, data: &Path, args: &Args) -> Result<(Proc, Client)> {
    let mut cmd = Command::new(exe);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--workers", &args.workers.to_string()])
        .args(["--step-ms", &args.step_ms.to_string(), "--steps", "5", "--jitter", "0"])
        .args(["--lease-ms", &args.lease_ms.to_string()])
        .env_remove("HUB_REDIS_URL");
    let (proc, url) = spawn_serving(&mut cmd, "fleetq up")?;
    Ok((proc, Client::new(&url)?))
}

/// Finished jobs, as `fleetq up`'s API lists them (`None` while it does not answer).
async fn finished_over_http(api: &Client) -> Option<usize> {
    let mut n = 0;
    for status in [JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled] {
        let q = JobQuery { status: Some(status), limit: Some(1000), ..JobQuery::default() };
        n += api.all_jobs(&q).await.ok()?.len();
    }
    Some(n)
}

async fn embedded_kill(args: &Args, exe: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut up, mut api) = start_up(exe, dir.path(), args)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_s);
    while finished_over_http(&api).await.is_none() {
        if Instant::now() > deadline {
            bail!("fleetq up did not answer at {}", api.base());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jobs: Vec<serde_json::Value> = (0..args.jobs)
        .map(|i| json!({"service": "simulation", "payload": {"note": i, "steps": 5}, "max_attempts": 100}))
        .collect();
    for chunk in jobs.chunks(1000) {
        api.submit_json(&serde_json::Value::Array(chunk.to_vec()), None).await.context("submitting")?;
    }
    let (mut kills, mut damaged_at, mut recover_ms, mut before) = (0, None::<Instant>, None, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let done = finished_over_http(&api).await;
        if let (Some(at), None, Some(d)) = (damaged_at, recover_ms, done)
            && d > before
        {
            recover_ms = Some(now.duration_since(at).as_millis());
        }
        let done = done.unwrap_or(0);
        if done >= args.jobs || now > deadline {
            break;
        }
        if kills == 0 && done >= args.jobs / 3 {
            before = done;
            let killed = Instant::now();
            up.kill();
            // Restarted on its data directory; it binds another port, which it prints.
            (up, api) = start_up(exe, dir.path(), args)?;
            kills += 1;
            damaged_at = Some(killed);
        }
    }
    let elapsed_ms = started.elapsed().as_millis();
    up.kill();
    // Counted from the store itself, once its process is gone.
    let store = dir.path().join("fleetq.db");
    let broker = (0..100)
        .find_map(|_| match fleetq_broker::embedded::EmbeddedBroker::open(&store, BrokerConfig::default()) {
            Ok(b) => Some(b),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                None
            }
        })
        .context("opening the store after the run")?;
    let t = tally(&broker).await?;
    let doubles = completions(&broker).await?.values().filter(|n| **n > 1).count();
    report(args, kills, &t, doubles, recover_ms, elapsed_ms)
}

fn start_api(exe: &Path, url: &str) -> Result<(Proc, Client)> {
    let mut cmd = Command::new(exe);
    cmd.arg("api").args(["--redis", url, "--queue", "chaos", "--listen", "127.0.0.1:0"]);
    let (proc, url) = spawn_serving(&mut cmd, "fleetq api")?;
    Ok((proc, Client::new(&url)?))
}

/// `--workers` rounds: a `fleetq api` receives a batch of `--jobs` and is killed (-9) after a
/// growing delay, so the kill falls before, during and after the batch's store. Each round's batch
/// (its jobs are told apart by a round tag) must be stored whole or not at all.
async fn api_kill_batch(args: &Args, exe: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("redis://127.0.0.1:{port}/");
    let _redis = start_redis(&args.redis_server, port, dir.path())?;
    let broker = connect(&url).await?;
    let started = Instant::now();
    let (mut whole, mut none, mut partial) = (0usize, 0usize, Vec::new());
    for round in 0..args.workers {
        let (mut api, client) = start_api(exe, &url)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.ready().await.is_err() {
            if Instant::now() > deadline {
                bail!("fleetq api did not answer at {}", client.base());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tag = format!("round{round}");
        let batch: Vec<serde_json::Value> = (0..args.jobs)
            .map(|i| json!({"service": "chaos-batch", "customer_id": tag, "payload": {"note": format!("{i} {}", "x".repeat(200))}}))
            .collect();
        let post =
            tokio::spawn(async move { client.submit_json(&serde_json::Value::Array(batch), None).await });
        // From 0 to ~60 ms: before the request is read, while it is stored, after the reply.
        tokio::time::sleep(Duration::from_millis((round as u64 * 7) % 60)).await;
        api.kill();
        let _ = post.await;
        let mut filter = JobFilter { customer: Some(tag.clone()), limit: Some(1000), ..JobFilter::default() };
        let mut stored = 0;
        loop {
            let page = broker.jobs(&filter).await?;
            stored += page.jobs.len();
            match page.next {
                Some(n) => filter.cursor = Some(n),
                None => break,
            }
        }
        match stored {
            0 => none += 1,
            n if n == args.jobs => whole += 1,
            n => partial.push(n),
        }
    }
    let line = json!({
        "scenario": "api-kill-batch", "rounds": args.workers, "batch": args.jobs,
        "stored_whole": whole, "stored_none": none, "stored_partly": partial,
        "elapsed_ms": started.elapsed().as_millis(),
    });
    crate::report(&line.to_string());
    if !partial.is_empty() {
        bail!("{} batches were stored in part: {partial:?}", partial.len());
    }
    Ok(())
}

/// Runs one scenario, prints its report as a JSON line, and fails when anything was lost or done
/// twice.
pub async fn run(args: Args) -> Result<()> {
    if args.jobs == 0 || args.workers == 0 {
        bail!("--jobs and --workers must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the fleetq binary")?;
    match args.scenario {
        Scenario::EmbeddedKill => return embedded_kill(&args, &exe).await,
        Scenario::ApiKillBatch => return api_kill_batch(&args, &exe).await,
        Scenario::RedisFailover => return crate::failover::run(&args, &exe).await,
        _ => {}
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("redis://127.0.0.1:{port}/");
    let mut redis = start_redis(&args.redis_server, port, dir.path())?;
    let broker = Arc::new(connect(&url).await?);
    let started = Instant::now();
    let mut specs = Vec::with_capacity(args.jobs);
    let comfy = args.scenario == Scenario::ServiceKill;
    for i in 0..args.jobs {
        let mut spec = if comfy {
            let steps = 3;
            let step_seconds = args.step_ms as f64 / 1000.0;
            JobSpec::new(
                "comfyui",
                json!({"prompt": {
                    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
                    "2": {"class_type": "ProbeSleepProgress", "inputs": {"image": ["1", 0], "steps": steps,
                          "step_seconds": step_seconds, "send_preview": false, "send_text": false}},
                    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": format!("chaos{i}")}}
                }}),
            )
        } else {
            JobSpec::new("simulation", json!({"note": i, "steps": 5}))
        };
        // Every kill spends the attempt of the job the worker held: leave room for many.
        spec.max_attempts = 100;
        specs.push(spec);
    }
    for chunk in specs.chunks(1000) {
        broker.submit_batch(chunk.to_vec()).await?;
    }
    let comfy_ports: Vec<u16> =
        if comfy { (0..args.workers).map(|_| free_port()).collect::<Result<_>>()? } else { Vec::new() };
    let mut services: Vec<Proc> = comfy_ports.iter().map(|p| start_comfy(&exe, *p)).collect::<Result<_>>()?;
    let mut workers: Vec<Proc> = (0..args.workers)
        .map(|i| start_worker_with(&exe, &url, i, &args, comfy_ports.get(i).copied()))
        .collect::<Result<_>>()?;
    let mut rng = Rng(u64::try_from(started.elapsed().as_nanos()).unwrap_or(1) | 1);
    let deadline = started + Duration::from_secs(args.timeout_s);
    let (mut kills, mut damaged_at, mut recover_ms) = (0usize, None::<Instant>, None::<u128>);
    let mut completed_before = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(args.kill_every_ms);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        let done = match tally(broker.as_ref()).await {
            Ok(t) => {
                if let Some(at) = damaged_at
                    && recover_ms.is_none()
                    && t.completed > completed_before
                {
                    recover_ms = Some(now.duration_since(at).as_millis());
                }
                if damaged_at.is_none() {
                    completed_before = t.completed;
                }
                t.finished
            }
            // Redis restarting: the damage itself.
            Err(_) => 0,
        };
        if done >= args.jobs || now > deadline {
            break;
        }
        match args.scenario {
            Scenario::WorkerKill if now >= next_kill => {
                let i = rng.below(workers.len());
                workers[i].kill();
                workers[i] = start_worker(&exe, &url, i, &args)?;
                kills += 1;
                damaged_at.get_or_insert(now);
                next_kill = now + Duration::from_millis(args.kill_every_ms);
            }
            Scenario::ServiceKill if now >= next_kill => {
                let i = rng.below(services.len());
                services[i].kill();
                services[i] = start_comfy(&exe, comfy_ports[i])?;
                kills += 1;
                damaged_at.get_or_insert(now);
                next_kill = now + Duration::from_millis(args.kill_every_ms);
            }
            Scenario::EmbeddedKill | Scenario::ApiKillBatch | Scenario::RedisFailover => {}
            Scenario::RedisKill | Scenario::RedisShutdown if kills == 0 && done >= args.jobs / 3 => {
                if args.scenario == Scenario::RedisShutdown {
                    let mut c = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
                    // The server closes the connection as it stops: no reply is the answer.
                    let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut c).await;
                    let _ = redis.0.wait();
                }
                redis.kill();
                redis = start_redis(&args.redis_server, port, dir.path())?;
                kills += 1;
                damaged_at = Some(Instant::now());
            }
            _ => {}
        }
    }
    let elapsed_ms = started.elapsed().as_millis();
    drop(workers);
    drop(services);
    let t = tally(broker.as_ref()).await?;
    let doubles = completions(broker.as_ref()).await?.values().filter(|n| **n > 1).count();
    drop(redis);
    report(&args, kills, &t, doubles, recover_ms, elapsed_ms)
}
