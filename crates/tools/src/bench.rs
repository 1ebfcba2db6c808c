//! `fleetq bench`: measurements reported as JSON lines.
//!
//! `fleetq bench broker` runs no-op jobs through a real broker, its lines shaped like those of the
//! BullMQ baseline (`scripts/bench-vs-bullmq.sh`) so both can be compared side by side in one run.
//! `fleetq bench worker` times what a worker reports (module `bench_worker`).
//! `fleetq bench api` serves the HTTP API on a loopback port over a fresh embedded store and times
//! submissions and POST → SSE latency.
//!
//! Broker modes:
//! - `throughput`: enqueue N jobs in batches, then drain them with C workers (capability matching
//!   on: every job requires `hardware.gpu_memory_gb >= 16`, every worker has 24) using
//!   complete-and-claim; for Redis also the server CPU spent per job;
//! - `paced`: RATE jobs/s for S seconds, C workers waiting in `claim`; submit → claim latency;
//! - `depth`: claim latency with D jobs pending (e.g. 1k vs 1M);
//! - `position`: with D jobs pending, the cost of `queue_position` (the last job's, the worst case,
//!   and jobs spread through the queue — each checked exact) and of a queue page from the middle;
//! - `partitions`: N jobs spread over P partitions (one customer each: the customer is part of the
//!   partition), drained by C workers: claim latency, drain rate, Redis CPU per job, the Redis CPU
//!   of the idle broker afterwards (workers waiting in `claim`, no job pending), and N plain jobs
//!   drained before and after (the burst must leave nothing behind that slows them).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::{Broker, BrokerConfig, Fleet, Queue};
use fleetq_core::{JobSpec, Requirements, WorkerRegistration};
use serde_json::{Value, json};

use crate::figures::summarize;
pub use crate::figures::{Backend, On};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Broker throughput and latency with no-op jobs.
    Broker(BrokerArgs),
    /// The HTTP API over the embedded store: submissions per second (single and batched) and the
    /// latency from a POST to its event on the SSE stream.
    Api(ApiArgs),
    /// How fast a worker's news reaches the broker: connector `active` after a job starts, a
    /// quiet job's cancel, a dead ComfyUI `offline` and back `idle`.
    Worker(crate::bench_worker::WorkerArgs),
}

/// `fleetq bench api` flags.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Jobs submitted one per request.
    #[arg(long, default_value_t = 5000)]
    jobs: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Jobs per request in the batch mode.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Submissions timed through the SSE stream (one at a time).
    #[arg(long, default_value_t = 500)]
    sse_jobs: usize,
    /// Other clients watching `/api/events` while the SSE latency is timed (each must receive
    /// every event).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Throughput,
    Paced,
    Depth,
    Position,
    Partitions,
}

/// Flags of `fleetq bench broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    #[command(flatten)]
    on: On,
    /// FLUSHDB the Redis before each measurement (like the BullMQ script does).
    #[arg(long)]
    flushdb: bool,
    /// Directory for embedded stores (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// What to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "throughput,paced,depth")]
    modes: Vec<Mode>,
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Worker counts for the throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Paced submissions per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Paced run length in seconds.
    #[arg(long, default_value_t = 10)]
    paced_seconds: u64,
    /// Workers waiting during the paced run.
    #[arg(long, default_value_t = 16)]
    paced_concurrency: usize,
    /// Pending depths for the claim-latency runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    depths: Vec<usize>,
    /// Claims measured per depth.
    #[arg(long, default_value_t = 2000)]
    depth_claims: usize,
    /// Pending depths for the queue-position runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    position_depths: Vec<usize>,
    /// Position queries measured per depth.
    #[arg(long, default_value_t = 200)]
    position_queries: usize,
    /// Partition counts for the partitions runs.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    partitions: Vec<usize>,
    /// Redis: acknowledge each state change only once this many replicas hold it (`WAIT`), to
    /// measure what that costs (the Redis needs that many replicas).
    #[arg(long, default_value_t = 0)]
    wait_replicas: u32,
}

/// Runs one benchmark, printing its figures as JSON lines.
pub async fn run(b: Bench) -> Result<()> {
    let args = match b {
        Bench::Broker(args) => args,
        Bench::Api(args) => return api(args).await,
        Bench::Worker(args) => return crate::bench_worker::run(args).await,
    };
    let args = Arc::new(args);
    match args.on.backend {
        Backend::Embedded => {
            let a = args.clone();
            run_modes(&args, move || make_embedded(a.clone())).await
        }
        Backend::Redis => {
            let a = args.clone();
            run_modes(&args, move || make_redis(a.clone())).await
        }
    }
}

type Made<B> = (Arc<B>, Option<redis::Client>, Box<dyn std::any::Any + Send>);

fn bench_config() -> BrokerConfig {
    BrokerConfig { claim_recheck_ms: 1000, max_events: 200_000, ..BrokerConfig::default() }
}

#[allow(clippy::unused_async, reason = "same shape as make_redis for run_modes")]
async fn make_embedded(args: Arc<BrokerArgs>) -> Result<Made<EmbeddedBroker>> {
    let dir = match &args.data_dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let broker = EmbeddedBroker::open(dir.path().join("bench.db"), bench_config())?;
    Ok((Arc::new(broker), None, Box::new(dir)))
}

async fn make_redis(args: Arc<BrokerArgs>) -> Result<Made<RedisBroker>> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let client = redis::Client::open(args.on.redis_url.as_str())?;
    if args.flushdb {
        // A synchronous flush of a large database (1M jobs ≈ 1 GB) takes seconds: no response
        // timeout here (the client's default is 500 ms).
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut c = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("FLUSHDB").query_async::<()>(&mut c).await.context("FLUSHDB before the measurement")?;
    }
    let queue = format!("bench-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let config = BrokerConfig { wait_replicas: args.wait_replicas, wait_timeout_ms: 5_000, ..bench_config() };
    let broker = RedisBroker::connect(&args.on.redis_url, &queue, config).await?;
    Ok((Arc::new(broker), Some(client), Box::new(())))
}

async fn run_modes<B, F, Fut>(args: &BrokerArgs, make: F) -> Result<()>
where
    B: Broker,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Made<B>>>,
{
    let backend = format!("{:?}", args.on.backend).to_lowercase();
    for mode in &args.modes {
        match mode {
            Mode::Throughput => {
                for &c in &args.concurrency {
                    let made = make().await?;
                    let line = throughput(&made, args.jobs, c).await?;
                    emit(&backend, line);
                }
            }
            Mode::Paced => {
                let made = make().await?;
                emit(&backend, paced(&made, args.rate, args.paced_seconds, args.paced_concurrency).await?);
            }
            Mode::Depth => {
                for &d in &args.depths {
                    let made = make().await?;
                    emit(&backend, depth(&made, d, args.depth_claims).await?);
                }
            }
            Mode::Position => {
                for &d in &args.position_depths {
                    let made = make().await?;
                    emit(&backend, position(&made, d, args.position_queries).await?);
                }
            }
            Mode::Partitions => {
                for &p in &args.partitions {
                    let made = make().await?;
                    let workers = args.concurrency.last().copied().unwrap_or(16);
                    emit(&backend, partitions(&made, args.jobs, p, workers).await?);
                }
            }
        }
    }
    Ok(())
}

fn emit(backend: &str, mut line: Value) {
    if let Some(obj) = line.as_object_mut() {
        obj.insert("system".into(), json!("fleetq"));
        obj.insert("backend".into(), json!(backend));
    }
    crate::report(&line.to_string());
}

fn bench_job(i: usize) -> JobSpec {
    let mut spec = JobSpec::new("bench", json!({ "i": i }));
    spec.requirements =
        Requirements::parse(&json!({"hardware": {"gpu_memory_gb": 16}}), "requirements").unwrap_or_default();
    spec
}

async fn register_workers<B: Fleet>(b: &B, n: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("bench-w{i}");
        let reg: WorkerRegistration = serde_json::from_value(json!({
            "worker_id": id, "machine_id": "bench", "services": ["bench"],
            "capabilities": {"hardware": {"gpu_memory_gb": 24, "gpu_model": "bench"}}
        }))?;
        b.register_worker(reg).await?;
        ids.push(id);
    }
    Ok(ids)
}

async fn submit_all<B: Queue>(b: &B, n: usize) -> Result<f64> {
    submit_built(b, n, bench_job).await
}

/// Submits jobs `0..n` built by `job`, in batches of 1,000; the seconds it took.
async fn submit_built<B: Queue>(b: &B, n: usize, job: impl Fn(usize) -> JobSpec) -> Result<f64> {
    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        b.submit_batch((i..end).map(&job).collect()).await?;
        i = end;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Redis server CPU (user + sys) in ms, from INFO.
/// The memory of the bench queue's event log (the only `…:ev` key after `--flushdb`).
async fn redis_event_log_bytes(client: &Option<redis::Client>) -> Result<Option<f64>> {
    let Some(client) = client else { return Ok(None) };
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("fleetq:{bench-*}:ev").query_async(&mut c).await?;
    let mut total = 0.0;
    for key in keys {
        let n: Option<f64> =
            redis::cmd("MEMORY").arg("USAGE").arg(&key).arg("SAMPLES").arg(0).query_async(&mut c).await?;
        total += n.unwrap_or(0.0);
    }
    Ok(Some(total))
}

/// Redis's `used_memory` in bytes.
async fn redis_memory(client: &Option<redis::Client>) -> Result<Option<f64>> {
    let Some(client) = client else { return Ok(None) };
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    Ok(info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()))
}

async fn redis_cpu_ms(client: &Option<redis::Client>) -> Result<Option<f64>> {
    let Some(client) = client else { return Ok(None) };
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await?;
    let mut total = 0.0;
    for line in info.lines() {
        for key in ["used_cpu_sys:", "used_cpu_user:"] {
            if let Some(v) = line.strip_prefix(key) {
                total += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(Some(total * 1000.0))
}

async fn throughput<B: Broker>(made: &Made<B>, n: usize, workers: usize) -> Result<Value> {
    let (b, client, _) = made;
    let ids = register_workers(b.as_ref(), workers).await?;
    let cpu0 = redis_cpu_ms(client).await?;
    let enqueue_s = submit_all(b.as_ref(), n).await?;
    let cpu1 = redis_cpu_ms(client).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for id in ids {
        let b = b.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut lease = b.claim(&id, Duration::ZERO).await?;
            while let Some(l) = lease {
                let next = b.complete_and_claim(&l.as_ref(), Value::Null).await?;
                done.fetch_add(1, Ordering::Relaxed);
                lease = match next {
                    Some(n) => Some(n),
                    None => b.claim(&id, Duration::ZERO).await?,
                };
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let drain_s = t0.elapsed().as_secs_f64();
    let cpu2 = redis_cpu_ms(client).await?;
    let completed = done.load(Ordering::Relaxed);
    if completed != n {
        bail!("drained {completed} of {n} jobs");
    }
    let mut line = json!({
        "mode": "throughput", "n": n, "concurrency": workers, "matching": true,
        "enqueue_jobs_per_s": (n as f64 / enqueue_s).round(), "enqueue_ms": (enqueue_s * 1000.0).round(),
        "drain_jobs_per_s": (n as f64 / drain_s).round(), "drain_ms": (drain_s * 1000.0).round(),
        "completed": completed,
    });
    if let (Some(c0), Some(c1), Some(c2), Some(obj)) = (cpu0, cpu1, cpu2, line.as_object_mut()) {
        obj.insert("enqueue_redis_cpu_ms".into(), json!((c1 - c0).round()));
        obj.insert("drain_redis_cpu_ms".into(), json!((c2 - c1).round()));
        obj.insert(
            "drain_redis_cpu_us_per_job".into(),
            json!(((c2 - c1) * 1000.0 / n as f64 * 10.0).round() / 10.0),
        );
    }
    Ok(line)
}

async fn paced<B: Broker>(made: &Made<B>, rate: u64, seconds: u64, workers: usize) -> Result<Value> {
    let (b, _, _) = made;
    let ids = register_workers(b.as_ref(), workers).await?;
    let total = (rate * seconds) as usize;
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in ids {
        let (b, stop, seen) = (b.clone(), stop.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(lease) = b.claim(&id, Duration::from_millis(500)).await? {
                    let sent_ns = lease.job.spec.payload["t"].as_u64().unwrap_or(0);
                    let now_ns = base.elapsed().as_nanos() as u64;
                    lat.push(now_ns.saturating_sub(sent_ns) as f64 / 1e6);
                    b.complete(&lease.as_ref(), Value::Null).await?;
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(lat)
        }));
    }
    // Let every worker reach its blocking claim before the first submission.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(t0 + Duration::from_nanos(i as u64 * 1_000_000_000 / rate.max(1))).await;
        let mut spec = bench_job(i);
        spec.payload = json!({"i": i, "t": base.elapsed().as_nanos() as u64});
        b.submit(spec).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(json!({
        "mode": "paced", "rate": rate, "seconds": seconds, "concurrency": workers,
        "completed": seen.load(Ordering::Relaxed), "add_to_start": summarize(all),
    }))
}

async fn depth<B: Broker>(made: &Made<B>, pending: usize, claims: usize) -> Result<Value> {
    let (b, client, _) = made;
    let ids = register_workers(b.as_ref(), 1).await?;
    let mem0 = redis_memory(client).await?;
    let fill_s = submit_all(b.as_ref(), pending).await?;
    let mem1 = redis_memory(client).await?;
    let mut lat = Vec::with_capacity(claims);
    for i in 0..claims {
        let t = Instant::now();
        let lease = b.claim(&ids[0], Duration::ZERO).await?.context("queue unexpectedly empty")?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        b.complete(&lease.as_ref(), Value::Null).await?;
        b.submit(bench_job(pending + i)).await?;
    }
    let mut line = json!({
        "mode": "depth", "pending": pending, "fill_jobs_per_s": (pending as f64 / fill_s).round(),
        "claim_latency": summarize(lat),
    });
    if let (Some(m0), Some(m1), Some(log), Some(obj)) =
        (mem0, mem1, redis_event_log_bytes(client).await?, line.as_object_mut())
    {
        // What a pending job holds: its state, spec and index entries. The event log is apart:
        // capped at max_events whatever the number of jobs.
        let per_job = (m1 - m0 - log) / pending.max(1) as f64;
        obj.insert("redis_bytes_per_pending_job".into(), json!(per_job.round()));
        obj.insert("redis_event_log_mb".into(), json!((log / 1e5).round() / 10.0));
    }
    Ok(line)
}

/// Every worker claims and completes until the queue is empty. Returns the claim latencies (ms)
/// and the seconds it took.
async fn drain<B: Broker>(b: &Arc<B>, ids: &[String], n: usize) -> Result<(Vec<f64>, f64)> {
    let t0 = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in ids {
        let (b, done, id) = (b.clone(), done.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                let Some(l) = b.claim(&id, Duration::ZERO).await? else { break };
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                b.complete(&l.as_ref(), Value::Null).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let completed = done.load(Ordering::Relaxed);
    if completed != n {
        bail!("drained {completed} of {n} jobs");
    }
    Ok((lat, t0.elapsed().as_secs_f64()))
}

/// Plain jobs (one partition) drained before and after a burst of jobs spread over `parts`
/// partitions, and the broker idle in between: what many partitions cost while they are pending
/// and whether anything of them is left once they drained.
async fn partitions<B: Broker>(made: &Made<B>, n: usize, parts: usize, workers: usize) -> Result<Value> {
    let (b, client, _) = made;
    if parts == 0 {
        bail!("--partitions must be at least 1");
    }
    let ids = register_workers(b.as_ref(), workers).await?;
    submit_built(b.as_ref(), n, bench_job).await?;
    let (_, plain_before_s) = drain(b, &ids, n).await?;
    submit_built(b.as_ref(), n, |k| {
        let mut spec = bench_job(k);
        spec.customer_id = Some(format!("c{}", k % parts));
        spec
    })
    .await?;
    let cpu0 = redis_cpu_ms(client).await?;
    let (lat, drain_s) = drain(b, &ids, n).await?;
    let cpu1 = redis_cpu_ms(client).await?;
    // Idle: every worker waits in claim with nothing pending, for 3 s.
    let idle_for = Duration::from_secs(3);
    let idle = ids.iter().cloned().map(|id| {
        let b = b.clone();
        tokio::spawn(async move {
            let until = Instant::now() + idle_for;
            while Instant::now() < until {
                b.claim(&id, Duration::from_millis(500)).await?;
            }
            anyhow::Ok(())
        })
    });
    let idle: Vec<_> = idle.collect();
    for t in idle {
        t.await??;
    }
    let cpu2 = redis_cpu_ms(client).await?;
    submit_built(b.as_ref(), n, bench_job).await?;
    let (_, plain_after_s) = drain(b, &ids, n).await?;
    let mut line = json!({
        "mode": "partitions", "n": n, "partitions": parts, "concurrency": workers,
        "drain_jobs_per_s": (n as f64 / drain_s).round(), "claim_latency": summarize(lat),
        "plain_before_jobs_per_s": (n as f64 / plain_before_s).round(),
        "plain_after_jobs_per_s": (n as f64 / plain_after_s).round(),
    });
    if let (Some(c0), Some(c1), Some(c2), Some(obj)) = (cpu0, cpu1, cpu2, line.as_object_mut()) {
        obj.insert("drain_redis_cpu_us_per_job".into(), json!(((c1 - c0) * 1000.0 / n as f64).round()));
        obj.insert(
            "idle_redis_cpu_percent".into(),
            json!(((c2 - c1) / idle_for.as_millis() as f64 * 1000.0).round() / 10.0),
        );
    }
    Ok(line)
}

async fn position<B: Broker>(made: &Made<B>, pending: usize, queries: usize) -> Result<Value> {
    let (b, _, _) = made;
    if pending == 0 {
        bail!("--position-depths must be at least 1");
    }
    let fill_s = submit_all(b.as_ref(), pending.saturating_sub(1)).await?;
    // One job of each service's shape goes last: every other pending job is ahead of it.
    let last = b.submit(bench_job(pending)).await?.id;
    let (mut worst, mut spread) = (Vec::with_capacity(queries), Vec::with_capacity(queries));
    for _ in 0..queries {
        let t = Instant::now();
        let p = b.queue_position(&last).await?;
        worst.push(t.elapsed().as_secs_f64() * 1000.0);
        if p != Some(pending as u64) {
            bail!("the last of {pending} pending jobs was placed at {p:?}");
        }
    }
    // Jobs through the queue, found by walking queue pages (which also checks their positions).
    let mut filter = fleetq_broker::QueueFilter { limit: Some(1000), ..Default::default() };
    let (mut seen, mut sample, mut page_ms) = (0u64, Vec::new(), Vec::new());
    let every = (pending / queries.max(1)).max(1) as u64;
    loop {
        let t = Instant::now();
        let page = b.queue(&filter).await?;
        page_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        for j in page.jobs {
            seen += 1;
            if seen % every == 0 {
                sample.push((j.id, seen));
            }
        }
        match page.next {
            Some(n) => filter.cursor = Some(n),
            None => break,
        }
    }
    if seen != pending as u64 {
        bail!("the queue listed {seen} of {pending} pending jobs");
    }
    for (id, expect) in sample {
        let t = Instant::now();
        let p = b.queue_position(&id).await?;
        spread.push(t.elapsed().as_secs_f64() * 1000.0);
        if p != Some(expect) {
            bail!("job {id} is {expect}th in the queue listing but placed at {p:?}");
        }
    }
    Ok(json!({
        "mode": "position", "pending": pending, "fill_jobs_per_s": (pending as f64 / fill_s.max(1e-9)).round(),
        "position_last": summarize(worst), "position_spread": summarize(spread),
        "queue_page_1000": summarize(page_ms),
    }))
}

/// `fleetq bench api`: a real server on a loopback port over a fresh embedded store, driven
/// through the client library.
async fn api(args: ApiArgs) -> Result<()> {
    use fleetq_client::{Client, FleetEvent};

    let dir = tempfile::tempdir()?;
    let broker = Arc::new(EmbeddedBroker::open(dir.path().join("bench.db"), bench_config())?);
    let config = fleetq_api::ApiConfig::default();
    // Dropped at the end of the run: the server stops with the benchmark.
    let _stop = config.shutdown.clone().drop_guard();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let client = Client::new(&format!("http://{}", listener.local_addr()?))?;
    tokio::spawn(fleetq_api::serve(listener, broker, config));
    let body = |i: usize| json!({"service": "bench", "payload": {"note": i}});

    // One job per request, `concurrency` clients.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per = args.jobs.div_ceil(args.concurrency.max(1));
    for c in 0..args.concurrency.max(1) {
        let client = client.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let t = Instant::now();
                client.submit_json(&body(c * per + i), None).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let secs = started.elapsed().as_secs_f64();
    emit(
        "embedded",
        json!({"mode": "api_submit", "jobs": lat.len(), "clients": args.concurrency,
        "jobs_per_s": (lat.len() as f64 / secs).round(), "request": summarize(lat)}),
    );

    // Batches.
    let batch = args.batch.max(1);
    let requests = args.jobs.div_ceil(batch);
    let started = Instant::now();
    for r in 0..requests {
        let jobs: Vec<Value> = (0..batch).map(|i| body(r * batch + i)).collect();
        client.submit_json(&Value::Array(jobs), None).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    emit(
        "embedded",
        json!({"mode": "api_batch", "jobs": requests * batch, "batch": batch,
        "jobs_per_s": ((requests * batch) as f64 / secs).round()}),
    );

    // Watchers: each drains `/api/events` and counts the `job_submitted` events it saw. Each is
    // connected before the timed submissions start.
    let mut watchers = tokio::task::JoinSet::new();
    for _ in 0..args.watchers {
        let mut events = client.events(&["jobs"]);
        events.connect().await?;
        let expect = args.sse_jobs;
        watchers.spawn(async move {
            let mut seen = 0;
            while seen < expect {
                match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                    Ok(Ok(FleetEvent::Event { event, .. })) if event.kind.name() == "job_submitted" => {
                        seen += 1
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
            seen
        });
    }

    // POST → its `job_submitted` on the global SSE stream.
    let mut events = client.events(&["jobs"]);
    events.connect().await?;
    let mut lat = Vec::with_capacity(args.sse_jobs);
    for i in 0..args.sse_jobs {
        let t = Instant::now();
        let id = match client.submit_json(&body(i), None).await? {
            fleetq_api::model::SubmitReply::One(one) => one.id,
            fleetq_api::model::SubmitReply::Batch(_) => bail!("one job was answered as a batch"),
        };
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .context("no event within 10 s")??;
            if let FleetEvent::Event { event, .. } = item
                && matches!(&event.kind, fleetq_core::EventKind::JobSubmitted { job } if job.id == id)
            {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let jobs = lat.len();
    let mut complete = 0;
    while let Some(seen) = watchers.join_next().await {
        if seen? == jobs {
            complete += 1;
        }
    }
    emit(
        "embedded",
        json!({"mode": "api_sse", "jobs": jobs, "watchers": args.watchers,
        "watchers_with_every_event": complete, "post_to_event": summarize(lat)}),
    );
    Ok(())
}
