//! The Redis backend: Redis ≥ 7 with server-side functions, for a fleet.
//!
//! Every state change is one `FCALL` into the `fleetq` function library (`fleetq.lua`), which
//! changes the keys and `XADD`s the event in the same atomic call. All keys live under
//! `fleetq:{QUEUE}:` so one hash tag pins a queue to one cluster slot.
//!
//! Connections: one multiplexed connection to the primary carries every non-blocking command (the
//! primary is a fixed address, kept by a reconnecting `ConnectionManager`, or the one Redis Sentinel
//! names, followed across failovers: `primary`); each blocking wait (`BLPOP` on wake lists, `XREAD BLOCK`) borrows a dedicated connection
//! with no response timeout and always a finite block, so the client's default 500 ms timeout never
//! cuts a block short and a dropped waiter never holds the shared connection.
//!
//! Claims scale with the number of worker *classes*, not partitions ([`fleetq_core::ClassSpec`],
//! `docs/design.md` "Claims"). Matching runs here, in Rust, where the data is: a submitter matches a
//! new partition against the live classes (cached, stamped with the `cver` the server moves when
//! a class comes or goes; a stale stamp is answered `refresh` and nothing is written), and a worker
//! whose class is new matches it against the live partitions once, in pages, before it claims. The
//! server keeps, per class, the head of every partition the class matches in claim order (`ch:`),
//! so a claim reads the first members of one sorted set and sends no partition list. A partition
//! whose last unfinished job finishes is removed; a class without a worker for
//! [`fleetq_core::class::CLASS_IDLE_MS`] is dropped by the reaper.
//!
//! Queue order and position: a claimable job is a member `order key ‖ id` (score 0, so members sort
//! by bytes, which is claim order) of its partition's queue `pq:` (claims), its service's `sq:`
//! (listings, `ZRANK` positions in O(log n)) and its workflow's `wfq:`; listings of all services
//! merge the service queues.
//!
//! Wake-ups: a job becoming claimable pushes a token to the wake list of each class matching its
//! partition (capped at 64). A waiting claimer `BLPOP`s its class's list and re-checks at least
//! every `claim_recheck_ms` (due retries, a token taken by a worker that could not use it).

mod codec;
mod fleet;
mod log;
mod primary;
mod queue;
mod reads;
pub mod sentinel_url;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetq_core::job::DEFAULT_RETRY_BACKOFF_MS;
use fleetq_core::{
    ClassKey, ClassSpec, ConnectorReport, Event, EventKind, IllegalTransition, JobError, JobId, JobRecord,
    JobSpec, JobStatus, MachineEvent, MachineState, OrderKey, Outcome, PartitionKey, PartitionSpec,
    Requirements, Snapshot, ValidationError, WorkerInfo, WorkerRegistration,
};
use redis::{Cmd, Value};
use serde_json::Value as Json;
use tokio::time::Instant;

use self::codec::{corrupt, event_from_entry, initial_state, items, pairs, stored_spec, text, text_at};
use crate::{
    Backend, BrokerConfig, BrokerError, CancelOutcome, Clock, FailOutcome, Fleet, JobFilter, JobPage, Lease,
    LeaseRef, LeaseState, Log, Queue, QueueFilter, Read, ReapReport, Result, Submitted, SystemClock,
    new_job_id, page_limit,
};

const LIBRARY: &str = include_str!("fleetq.lua");
/// The version the function library reports (`FCALL fq_version 0`); loading compares the whole code.
pub const LIBRARY_VERSION: &str = "25";

/// Partitions read per call when a pass walks them all (a new class's fill, workability).
const PARTITION_PAGE: usize = 1000;

/// The live worker classes as of one version stamp.
#[derive(Debug, Default)]
struct ClassView {
    cver: String,
    classes: Vec<(ClassKey, ClassSpec)>,
    /// Registered workers per class (0: kept idle, indexes but serves nothing).
    workers: HashMap<ClassKey, i64>,
}

impl ClassView {
    /// The classes matching a partition, comma-separated (the form the functions read).
    fn matching(&self, spec: &PartitionSpec) -> String {
        let keys: Vec<&str> =
            self.classes.iter().filter(|(_, c)| c.matches(spec)).map(|(k, _)| k.0.as_str()).collect();
        keys.join(",")
    }

    /// Whether a class with a registered worker matches the partition.
    fn served(&self, spec: &PartitionSpec) -> bool {
        self.classes.iter().any(|(k, c)| self.workers.get(k).is_some_and(|n| *n > 0) && c.matches(spec))
    }
}

/// A client of `url`: `redis://` plain, `rediss://` over TLS (the system's roots, or the CA file
/// of `tls`, and a client certificate for mutual TLS). TLS files with a plain URL are refused.
fn open_client(url: &str, shown: &str, tls: &crate::RedisTls) -> Result<redis::Client> {
    let unreadable = |e: redis::RedisError| {
        BrokerError::Connect(format!(
            "{shown:?} is not a Redis URL ({}): write it as redis://HOST:PORT/ (rediss://HOST:PORT/ over TLS; redis://USER:PASSWORD@HOST:PORT/ with credentials)",
            e.detail().unwrap_or("unreadable")
        ))
    };
    let secure = url.starts_with("rediss://");
    if secure {
        // The process-wide TLS provider (an error only says one is installed already: fine).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    if !tls.is_set() {
        return redis::Client::open(url).map_err(unreadable);
    }
    if !secure {
        return Err(BrokerError::Connect(format!(
            "TLS files (--redis-ca, --redis-cert, --redis-key) apply to rediss:// URLs; {shown} is not one"
        )));
    }
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            BrokerError::Connect(format!("cannot read the Redis TLS {what} {}: {e}", path.display()))
        })
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("certificate", cert)?,
            client_key: read("key", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(BrokerError::Connect(
                "mutual TLS needs both a client certificate (--redis-cert) and its key (--redis-key)".into(),
            ));
        }
    };
    let root_cert = tls.ca_file.as_deref().map(|p| read("CA", p)).transpose()?;
    redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert }).map_err(unreadable)
}

/// Whether a command changes state (an `FCALL`, not an `FCALL_RO` or a plain read).
fn writes(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(b"FCALL")))
}

/// One plain connection first, so a Redis that is not there is said at once, in one line,
/// instead of after the connection manager's retries.
async fn reachable(client: &redis::Client, shown: &str) -> Result<()> {
    let not_there = "is redis-server running there? (Debian: apt install redis-server; or use `fleetq up` without --redis / HUB_REDIS_URL for the embedded store)";
    match tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection()).await {
        Err(_) => {
            Err(BrokerError::Connect(format!("no answer from Redis at {shown} within 5 s: {not_there}")))
        }
        Ok(Err(e)) => {
            let why = e.detail().map_or_else(|| e.to_string(), str::to_owned);
            let (why, hint) = if e.is_connection_refusal() {
                ("connection refused".to_owned(), not_there)
            } else if e.kind() == redis::ErrorKind::AuthenticationFailed
                || why.contains("WRONGPASS")
                || why.contains("NOAUTH")
            {
                (why, "check the user name and password in the URL (redis://USER:PASSWORD@HOST:PORT/)")
            } else {
                (why, not_there)
            };
            Err(BrokerError::Connect(format!("cannot reach Redis at {shown}: {why}: {hint}")))
        }
        Ok(Ok(_)) => Ok(()),
    }
}

/// Redis-backed [`Broker`](crate::Broker).
#[derive(Debug)]
pub struct RedisBroker {
    link: Arc<primary::Link>,
    prefix: String,
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    view: Mutex<Option<Arc<ClassView>>>,
}

enum ClaimReply {
    Job(Box<Lease>),
    /// Nothing to take; the worker's class (whose wake list to wait on).
    Empty(String),
    /// The worker has no class: it is not registered (or was, with an older library).
    Unknown,
}

impl RedisBroker {
    /// Connects to `url` (`redis://host:port/db`), using queue `queue` (keys `fleetq:{queue}:…`),
    /// loads the function library when missing or of another version, and stores the queue's
    /// tunables (lease, coalescing, retention…) where the functions read them.
    pub async fn connect(url: &str, queue: &str, config: BrokerConfig) -> Result<Self> {
        Self::connect_with_clock(url, queue, config, Arc::new(SystemClock)).await
    }

    /// [`RedisBroker::connect`] with a given clock (tests use [`crate::ManualClock`]). Every
    /// process of one queue must share a clock source (NTP): times are sent by the caller.
    pub async fn connect_with_clock(
        url: &str,
        queue: &str,
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        fleetq_core::validate::check_name("queue", queue)?;
        // Printed only redacted: a URL's password must not reach a log line.
        let shown = fleetq_core::url::redacted(url);
        let link = if sentinel_url::SentinelUrl::is_sentinel(url) {
            if config.redis_tls.is_set() {
                return Err(BrokerError::Connect(
                    "TLS files (--redis-ca, --redis-cert, --redis-key) do not apply to redis+sentinel:// URLs: Sentinel over TLS is not supported"
                        .into(),
                ));
            }
            let parsed = sentinel_url::SentinelUrl::parse(url)
                .map_err(|why| BrokerError::Connect(format!("{shown:?} is not a Sentinel URL: {why}")))?;
            primary::Link::sentinel(parsed, &shown).await?
        } else {
            let client = open_client(url, &shown, &config.redis_tls)?;
            reachable(&client, &shown).await?;
            primary::Link::fixed(client).await?
        };
        let broker =
            Self { link, prefix: format!("fleetq:{{{queue}}}:"), config, clock, view: Mutex::new(None) };
        broker.init().await?;
        Ok(broker)
    }

    /// The key prefix of this queue.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Loads the library unless the server holds exactly this code (compared whole, so an edited
    /// library is never kept by mistake), and writes the queue's tunables.
    async fn init(&self) -> Result<()> {
        let primary = self.link.current();
        let mut conn = primary.conn.clone();
        let replica = |e: redis::RedisError| {
            if primary::is_replica_answer(&e) && !self.link.follows_failovers() {
                BrokerError::Connect(format!(
                    "Redis at {} is a read-only replica: point fleetq at the primary, or name the sentinels with redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME to follow failovers",
                    primary.addr
                ))
            } else {
                e.into()
            }
        };
        let listed: Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg("fleetq")
            .arg("WITHCODE")
            .query_async(&mut conn)
            .await?;
        if loaded_code(listed).as_deref() != Some(LIBRARY) {
            tracing::info!(version = LIBRARY_VERSION, "loading the fleetq function library");
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(LIBRARY)
                .query_async::<()>(&mut conn)
                .await
                .map_err(replica)?;
        }
        let c = &self.config;
        redis::cmd("HSET")
            .arg(format!("{}cfg", self.prefix))
            .arg(&[
                ("max_events", c.max_events.to_string()),
                ("avoid_ms", c.retry_avoid_ms.to_string()),
                ("coalesce_ms", c.progress_coalesce_ms.to_string()),
                ("retention_ms", c.retention_ms.to_string()),
                ("worker_ttl_ms", c.worker_ttl_ms.to_string()),
                ("max_event_age_ms", c.max_event_age_ms.to_string()),
            ])
            .query_async::<()>(&mut conn)
            .await
            .map_err(replica)?;
        // Fair share only when this process sets it: a worker never turns it off.
        if let Some(fair) = &c.fair_share {
            let mut set = redis::pipe();
            set.atomic()
                .cmd("HSET")
                .arg(self.key("cfg"))
                .arg("fair")
                .arg(if fair.enabled { "1" } else { "0" })
                .cmd("DEL")
                .arg(self.key("fw"));
            if !fair.weights.is_empty() {
                set.cmd("HSET").arg(self.key("fw")).arg(&fair.weights);
            }
            set.query_async::<()>(&mut conn).await?;
        }
        self.warn_about_durability(&mut conn).await;
        // Queues written before library 13 lack the service queues; built once, then a no-op.
        let indexed: i64 = self.fcall("fq_reindex", false).query_async(&mut conn).await?;
        if indexed > 0 {
            tracing::info!(jobs = indexed, "indexed pending jobs by service for queue order and position");
        }
        // Queues written before library 16 keep every partition ever seen; counted once.
        let removed: i64 = self.fcall("fq_upgrade", false).query_async(&mut conn).await?;
        if removed > 0 {
            tracing::info!(partitions = removed, "removed partitions without unfinished jobs");
        }
        Ok(())
    }

    /// Says at connect what this server's settings cost in durability (as Sidekiq does): without
    /// AOF a restart loses everything since the last snapshot, and an eviction policy other than
    /// `noeviction` lets Redis delete jobs under memory pressure. Servers that refuse `INFO` (some
    /// managed ones) are not judged.
    async fn warn_about_durability(&self, conn: &mut primary::Conn) {
        let Ok(info) = redis::cmd("INFO").arg("persistence").arg("memory").query_async::<String>(conn).await
        else {
            return;
        };
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(str::trim)
        };
        if field("aof_enabled") == Some("0") {
            tracing::warn!(
                "Redis runs without AOF (appendonly no): a restart loses every job and event written since its last snapshot; set appendonly yes"
            );
        }
        if let Some(policy) = field("maxmemory_policy").filter(|p| *p != "noeviction") {
            tracing::warn!(
                policy,
                "Redis may evict keys under memory pressure (maxmemory-policy is not noeviction): jobs can vanish; set maxmemory-policy noeviction"
            );
        }
    }

    /// Runs a command; when the server lost the library (a restart without persistence, a new
    /// node) it reloads it once and retries. When the primary moved (Sentinel), the command goes
    /// to the new one if it cannot have run on the old: a replica refused it, or it only reads.
    async fn run(&self, cmd: &Cmd) -> Result<Value> {
        let primary = self.link.current();
        match self.exec_reloading(&primary.conn, cmd).await {
            Err(BrokerError::Redis(e))
                if self.link.failed(primary.generation, &e).await
                    && (primary::is_replica_answer(&e) || !writes(cmd)) =>
            {
                self.exec_reloading(&self.link.current().conn, cmd).await
            }
            other => other,
        }
    }

    /// [`Self::exec`], reloading the function library once when the server lacks it.
    async fn exec_reloading(&self, conn: &primary::Conn, cmd: &Cmd) -> Result<Value> {
        match self.exec(conn, cmd).await {
            Err(BrokerError::Redis(e)) if e.to_string().contains("Function not found") => {
                tracing::warn!("fleetq functions missing on the server; reloading");
                self.init().await?;
                self.exec(&self.link.current().conn, cmd).await
            }
            other => other,
        }
    }

    /// One command; a state change (`FCALL`) is followed on the same connection by `WAIT` when
    /// `wait_replicas` asks for it, and is acknowledged only once enough replicas hold it.
    async fn exec(&self, conn: &primary::Conn, cmd: &Cmd) -> Result<Value> {
        let mut conn = conn.clone();
        let wanted = self.config.wait_replicas;
        if wanted == 0 || !writes(cmd) {
            return Ok(cmd.query_async::<Value>(&mut conn).await?);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone()).cmd("WAIT").arg(wanted).arg(self.config.wait_timeout_ms.max(1));
        let (value, got): (Value, i64) = pipe.query_async(&mut conn).await?;
        let got = u32::try_from(got).unwrap_or(0);
        if got < wanted {
            return Err(BrokerError::NotReplicated { wanted, got });
        }
        Ok(value)
    }

    /// A blocking command (`BLPOP`, `XREAD BLOCK`) on a pooled connection to the primary; a
    /// connection loss or a replica's answer sends the link to the sentinels (the caller waits
    /// again, as after any error).
    async fn run_blocking(&self, cmd: &Cmd) -> Result<Value> {
        let (generation, mut conn) = self.link.blocking_conn().await?;
        match cmd.query_async::<Value>(&mut conn).await {
            Ok(v) => {
                self.link.return_conn(generation, conn);
                Ok(v)
            }
            Err(e) => {
                self.link.failed(generation, &e).await;
                Err(e.into())
            }
        }
    }

    fn fcall(&self, name: &str, read_only: bool) -> Cmd {
        let mut cmd = redis::cmd(if read_only { "FCALL_RO" } else { "FCALL" });
        cmd.arg(name).arg(1).arg(&self.prefix);
        cmd
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    // ----- classes -------------------------------------------------------------------------------

    fn invalidate(&self) {
        if let Ok(mut v) = self.view.lock() {
            *v = None;
        }
    }

    async fn view(&self, fresh: bool) -> Result<Arc<ClassView>> {
        if !fresh && let Some(v) = self.view.lock().ok().and_then(|v| v.clone()) {
            return Ok(v);
        }
        let reply = items(self.run(&self.fcall("fq_classes", true)).await?);
        let cver = text_at(&reply, 0, "class version")?;
        let mut it = reply.into_iter().skip(1);
        let mut classes = Vec::new();
        for (k, v) in pairs(it.next().unwrap_or(Value::Nil)) {
            let spec: ClassSpec = serde_json::from_str(&v).map_err(|e| corrupt(format!("class {k}: {e}")))?;
            classes.push((ClassKey(k), spec));
        }
        let workers = pairs(it.next().unwrap_or(Value::Nil))
            .into_iter()
            .map(|(k, n)| (ClassKey(k), n.parse().unwrap_or(0)))
            .collect();
        let view = Arc::new(ClassView { cver, classes, workers });
        if let Ok(mut slot) = self.view.lock() {
            *slot = Some(view.clone());
        }
        Ok(view)
    }

    /// One page of the live partitions from `cursor` ("0" to start); the next cursor is "0" at the
    /// end. (`HSCAN`: a partition live for the whole walk is seen at least once; one created
    /// meanwhile is matched by its submitter instead.)
    async fn partition_page(&self, cursor: &str) -> Result<(String, Vec<(String, PartitionSpec)>)> {
        let mut cmd = redis::cmd("HSCAN");
        cmd.arg(self.key("parts")).arg(cursor).arg("COUNT").arg(PARTITION_PAGE);
        let reply = items(self.run(&cmd).await?);
        let next = text_at(&reply, 0, "scan cursor")?;
        let mut specs = Vec::new();
        for (k, v) in pairs(reply.into_iter().nth(1).unwrap_or(Value::Nil)) {
            match serde_json::from_str::<PartitionSpec>(&v) {
                Ok(spec) => specs.push((k, spec)),
                Err(e) => crate::note_undecodable("a partition", &format!("{k}: {e}")),
            }
        }
        Ok((next, specs))
    }

    /// Declares the class of a registration and, when it is new, matches it against every live
    /// partition before marking it ready. Returns false when the class was dropped meanwhile.
    async fn declare_class(&self, key: &ClassKey, spec: &ClassSpec) -> Result<bool> {
        let mut cmd = self.fcall("fq_class", false);
        cmd.arg(self.now()).arg(&key.0).arg(to_json(spec)?).arg(spec.workflow_restriction().unwrap_or(""));
        let state = text(&self.run(&cmd).await?).unwrap_or_default();
        if state == "ready" {
            return Ok(true);
        }
        self.invalidate();
        let mut cursor = "0".to_owned();
        loop {
            let (next, specs) = self.partition_page(&cursor).await?;
            let matched: Vec<&str> =
                specs.iter().filter(|(_, p)| spec.matches(p)).map(|(k, _)| k.as_str()).collect();
            if !matched.is_empty() {
                let mut cmd = self.fcall("fq_class_fill", false);
                cmd.arg(self.now()).arg(&key.0).arg(matched.len()).arg(&matched);
                if text(&self.run(&cmd).await?).as_deref() == Some("gone") {
                    return Ok(false);
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let mut cmd = self.fcall("fq_class_ready", false);
        cmd.arg(&key.0);
        Ok(text(&self.run(&cmd).await?).as_deref() == Some("ok"))
    }

    fn parse_claim(&self, list: &[Value], worker_id: &str) -> Result<ClaimReply> {
        match list.first().and_then(text).as_deref() {
            Some("empty") => Ok(ClaimReply::Empty(text_at(list, 1, "class")?)),
            Some("unknown") => Ok(ClaimReply::Unknown),
            Some("job") => {
                let spec_text = text_at(list, 1, "spec")?;
                let spec: JobSpec =
                    serde_json::from_str(&spec_text).map_err(|e| corrupt(format!("spec: {e}")))?;
                let deadline_ms = text_at(list, 2, "deadline")?.parse::<i64>().map_err(corrupt)?;
                let summary =
                    codec::summary_from_state(&text_at(list, 3, "job state")?, &text_at(list, 4, "flag")?)?;
                Ok(ClaimReply::Job(Box::new(Lease {
                    attempt: summary.attempt,
                    worker_id: worker_id.to_owned(),
                    deadline_ms,
                    job: JobRecord { summary, spec, outcome: None, history: Vec::new() },
                })))
            }
            other => Err(corrupt(format!("claim reply {other:?}"))),
        }
    }

    async fn try_claim(&self, worker_id: &str) -> Result<ClaimReply> {
        let mut cmd = self.fcall("fq_claim", false);
        cmd.arg(self.now()).arg(self.config.lease_ms).arg(worker_id);
        let reply = items(self.run(&cmd).await?);
        self.parse_claim(&reply, worker_id)
    }

    /// Blocks on the wake lists for at most `timeout`.
    async fn wait_wake(&self, keys: &[String], timeout: Duration) -> Result<()> {
        let secs = timeout.as_secs_f64().max(0.001);
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(keys).arg(format!("{secs:.3}"));
        self.run_blocking(&cmd).await.map(drop)
    }

    // ----- fenced operations ---------------------------------------------------------------------

    fn fenced(cmd: &mut Cmd, now: i64, lease: &LeaseRef) {
        cmd.arg(now).arg(&lease.job_id.0).arg(lease.attempt).arg(&lease.worker_id);
    }

    fn fence_error(status: &str, lease: &LeaseRef) -> BrokerError {
        match status {
            "missing" => BrokerError::JobNotFound(lease.job_id.clone()),
            _ => BrokerError::LeaseLost(lease.job_id.clone()),
        }
    }

    async fn give_back(
        &self,
        lease: &LeaseRef,
        error: JobError,
        backoff: bool,
        reason: &str,
        refund: bool,
    ) -> Result<FailOutcome> {
        let cancel = JobError::fatal(fleetq_core::FailureCategory::Cancelled, "cancelled");
        let mut cmd = self.fcall("fq_fail", false);
        Self::fenced(&mut cmd, self.now(), lease);
        cmd.arg(to_json(&error)?)
            .arg(if error.retryable { "1" } else { "0" })
            .arg(if backoff { "1" } else { "0" })
            .arg(reason)
            .arg(if refund { "1" } else { "0" })
            .arg(to_json(&Outcome::Error { error: error.clone() })?)
            .arg(to_json(&Outcome::Error { error: cancel })?);
        if reason == crate::RELEASE_SERVICE_OFFLINE {
            let crash = crate::service_crash_error();
            cmd.arg(fleetq_core::job::SERVICE_CRASHES_TO_FAIL)
                .arg(to_json(&crash)?)
                .arg(to_json(&Outcome::Error { error: crash })?);
        }
        Self::fail_outcome(&items(self.run(&cmd).await?), lease)
    }

    /// The reply of `fq_fail` / `fq_fail_requiring`.
    fn fail_outcome(reply: &[Value], lease: &LeaseRef) -> Result<FailOutcome> {
        match text_at(reply, 0, "fail status")?.as_str() {
            "retrying" => {
                Ok(FailOutcome::Retrying { run_at: text_at(reply, 1, "run_at")?.parse().map_err(corrupt)? })
            }
            "failed" => Ok(FailOutcome::Failed),
            "cancelled" => Ok(FailOutcome::Cancelled),
            other => Err(Self::fence_error(other, lease)),
        }
    }

    // ----- compare-and-set writes ----------------------------------------------------------------

    /// Stores a worker's registration in its class (declared first), folding registered-at and
    /// connector reports from the stored one.
    async fn register(&self, registration: &WorkerRegistration) -> Result<()> {
        let spec = ClassSpec::of(registration);
        let key = spec.key();
        let id = &registration.worker_id;
        for _ in 0..8 {
            if !self.declare_class(&key, &spec).await? {
                continue;
            }
            for _ in 0..32 {
                let old = self.hget("workers", id).await?;
                let now = self.now();
                let prior: Option<WorkerInfo> = old
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|e| corrupt(format!("worker {id}: {e}")))?;
                // What it completed so far, for the registration's event (the count lives in
                // `wdone`; a registering worker completes nothing meanwhile).
                let completed = self.hget("wdone", id).await?.and_then(|n| n.parse().ok()).unwrap_or(0);
                let info = WorkerInfo {
                    registration: registration.clone(),
                    registered_at: prior.as_ref().map_or(now, |o| o.registered_at),
                    last_seen: now,
                    connectors: prior.map(|o| o.connectors).unwrap_or_default(),
                    completed,
                };
                let event = EventKind::WorkerRegistered { worker: info.clone() };
                let mut cmd = self.fcall("fq_register", false);
                cmd.arg(now)
                    .arg(id)
                    .arg(old.unwrap_or_default())
                    .arg(to_json(&info)?)
                    .arg(to_json(&event)?)
                    .arg(&key.0);
                match text(&self.run(&cmd).await?).as_deref() {
                    Some("ok") => return Ok(()),
                    Some("changed") => return self.evaluate_workability().await.map(|_| ()),
                    Some("gone") => break,
                    _ => continue,
                }
            }
        }
        Err(corrupt(format!("worker {id}: its class kept being dropped under concurrent writers")))
    }

    async fn hget(&self, hash: &str, field: &str) -> Result<Option<String>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.key(hash)).arg(field);
        Ok(text(&self.run(&cmd).await?))
    }

    /// Folds a new value from the current one and stores it with its event, retrying on conflict.
    async fn cas<F>(&self, hash: &str, field: &str, touch: bool, mut fold: F) -> Result<()>
    where
        F: FnMut(Option<&str>, i64) -> Result<Option<(String, Option<EventKind>)>> + Send,
    {
        for _ in 0..32 {
            let old = self.hget(hash, field).await?;
            let now = self.now();
            let Some((new, event)) = fold(old.as_deref(), now)? else { return Ok(()) };
            let (etype, ejson) = match &event {
                Some(kind) => (kind.name(), serde_json::to_string(kind).map_err(corrupt)?),
                None => ("", String::new()),
            };
            let mut cmd = self.fcall("fq_cas", false);
            cmd.arg(now)
                .arg(hash)
                .arg(field)
                .arg(old.unwrap_or_default())
                .arg(new)
                .arg(etype)
                .arg(ejson)
                .arg(if touch { "1" } else { "0" });
            if text(&self.run(&cmd).await?).as_deref() == Some("ok") {
                return Ok(());
            }
        }
        Err(corrupt(format!("{hash}/{field} kept changing under concurrent writers")))
    }

    async fn epoch_call(&self, seen: &str) -> Result<u64> {
        let mut cmd = self.fcall("fq_epoch", false);
        cmd.arg(seen);
        match self.run(&cmd).await? {
            Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
            other => Err(corrupt(format!("log epoch: {other:?}"))),
        }
    }

    /// Stores already validated specs in one function call: a batch is all or nothing (a refused
    /// call — out of memory, a lost connection — creates none of its jobs). Its size is bounded by
    /// validation ([`fleetq_core::validate::MAX_BATCH`]). Each distinct partition is matched
    /// against the live classes here, once per call.
    async fn submit_valid(&self, specs: &[JobSpec]) -> Result<Vec<Submitted>> {
        for fresh in [false, true, true, true] {
            let view = self.view(fresh).await?;
            let now = self.now();
            let mut index: HashMap<PartitionKey, usize> = HashMap::new();
            let mut partitions: Vec<(PartitionKey, PartitionSpec)> = Vec::new();
            let mut jobs = Vec::with_capacity(specs.len());
            for spec in specs {
                let pspec = PartitionSpec::of(spec);
                let pkey = pspec.key();
                let at = *index.entry(pkey.clone()).or_insert_with(|| {
                    partitions.push((pkey, pspec));
                    partitions.len()
                });
                jobs.push((spec, at));
            }
            let mut cmd = self.fcall("fq_submit", false);
            cmd.arg(now).arg(&view.cver).arg(partitions.len()).arg(jobs.len());
            for (key, pspec) in &partitions {
                cmd.arg(&key.0).arg(to_json(pspec)?).arg(&pspec.service).arg(view.matching(pspec));
            }
            for (spec, at) in jobs {
                let id = new_job_id();
                let summary = fleetq_core::JobSummary::new_pending(id.clone(), spec, now);
                let order = OrderKey::new(spec.effective_priority(), spec.effective_time(now), 0).prefix();
                // (`ckey`, the creation-time key of its listing entries, is derived from
                // `created_at` by the functions.)
                // (`backoff` left out is the default, which the functions fill in.)
                let mut extra = Vec::new();
                if let Some(ms) = spec.retry_backoff_ms.filter(|ms| *ms != DEFAULT_RETRY_BACKOFF_MS) {
                    extra.push(("backoff", ms.to_string()));
                }
                let idempotency = spec.idempotency_scope();
                if let Some(key) = &idempotency {
                    extra.push(("idem", key.clone()));
                }
                cmd.arg(initial_state(&summary, &extra)?)
                    .arg(stored_spec(spec)?)
                    .arg(at)
                    .arg(&order)
                    .arg(idempotency.as_deref().unwrap_or(""));
            }
            let reply = items(self.run(&cmd).await?);
            if text_at(&reply, 0, "submit status")? == "refresh" {
                continue;
            }
            let mut results = Vec::with_capacity(specs.len());
            for pair in reply[1..].chunks_exact(2) {
                let id = text(&pair[0]).ok_or_else(|| corrupt("submit id"))?;
                results.push(Submitted { id: JobId(id), created: text(&pair[1]).as_deref() == Some("1") });
            }
            return Ok(results);
        }
        Err(corrupt("worker classes kept changing under a submission"))
    }
}

/// Workers from the `workers` hash, with `last_seen` from the presence set.
fn decode_workers(
    raw: Vec<(String, String)>,
    seen: &[(String, String)],
    done: &[(String, String)],
) -> Result<HashMap<String, WorkerInfo>> {
    let seen: HashMap<&str, i64> =
        seen.iter().filter_map(|(k, v)| Some((k.as_str(), v.parse::<f64>().ok()? as i64))).collect();
    let done: HashMap<&str, u64> =
        done.iter().filter_map(|(k, v)| Some((k.as_str(), v.parse().ok()?))).collect();
    let mut out = HashMap::new();
    for (id, text) in raw {
        let mut info: WorkerInfo =
            serde_json::from_str(&text).map_err(|e| corrupt(format!("worker {id}: {e}")))?;
        if let Some(t) = seen.get(id.as_str()) {
            info.last_seen = *t;
        }
        // Counted by the functions (`wdone`), not in the stored registration.
        info.completed = done.get(id.as_str()).copied().unwrap_or(0);
        out.insert(id, info);
    }
    Ok(out)
}

/// A page of jobs from `{next cursor ('' at the end), [job views…]}` (`fq_jobs`, `fq_queue`).
fn page_reply(reply: Value) -> Result<JobPage> {
    let reply = items(reply);
    let next = reply.first().and_then(text).filter(|c| !c.is_empty());
    let jobs = codec::summaries(reply.into_iter().nth(1).unwrap_or(Value::Nil));
    Ok(JobPage { jobs, next })
}

/// The `library_code` of the `fleetq` library in a `FUNCTION LIST … WITHCODE` reply (RESP2 or RESP3).
fn loaded_code(listed: Value) -> Option<String> {
    for library in items(listed) {
        let fields = items(library);
        for kv in fields.chunks_exact(2) {
            if text(&kv[0]).as_deref() == Some("library_code") {
                return text(&kv[1]);
            }
        }
    }
    None
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(corrupt)
}

impl Backend for RedisBroker {
    fn config(&self) -> &BrokerConfig {
        &self.config
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

impl RedisBroker {
    async fn renew_inner(
        &self,
        lease: &LeaseRef,
        progress: Option<(f64, Option<String>)>,
    ) -> Result<LeaseState> {
        let mut cmd = self.fcall("fq_renew", false);
        Self::fenced(&mut cmd, self.now(), lease);
        match &progress {
            Some((p, message)) => cmd
                .arg("1")
                .arg(p.to_string())
                .arg(message.as_deref().unwrap_or(""))
                .arg(if message.is_some() { "1" } else { "0" }),
            None => cmd.arg("0").arg("0").arg("").arg("0"),
        };
        cmd.arg(self.config.lease_ms);
        let reply = items(self.run(&cmd).await?);
        match text_at(&reply, 0, "renew status")?.as_str() {
            "ok" => Ok(LeaseState {
                deadline_ms: text_at(&reply, 1, "deadline")?.parse().map_err(corrupt)?,
                cancel_requested: text_at(&reply, 2, "cancel flag")? == "1",
            }),
            other => Err(Self::fence_error(other, lease)),
        }
    }

    async fn complete_inner(
        &self,
        lease: &LeaseRef,
        result: Json,
        claim_next: bool,
    ) -> Result<Option<Lease>> {
        let text_result = crate::encode_result(&self.config, &result)?;
        let mut cmd = self.fcall("fq_complete", false);
        Self::fenced(&mut cmd, self.now(), lease);
        cmd.arg(crate::result_outcome(&text_result));
        if claim_next {
            cmd.arg(self.config.lease_ms);
        }
        let reply = items(self.run(&cmd).await?);
        match text_at(&reply, 0, "complete status")?.as_str() {
            "ok" => Ok(None),
            "next" => match self.parse_claim(&reply[1..], &lease.worker_id)? {
                ClaimReply::Job(next) => Ok(Some(*next)),
                ClaimReply::Empty(_) | ClaimReply::Unknown => Ok(None),
            },
            other => Err(Self::fence_error(other, lease)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version the client checks must be the one the library reports, or every connect
    /// would reload (or, worse, keep) the wrong library.
    #[test]
    fn library_version_matches_the_lua_source() {
        assert!(LIBRARY.contains(&format!("local VERSION = '{LIBRARY_VERSION}'")));
        assert!(LIBRARY.starts_with("#!lua name=fleetq"));
        assert!(LIBRARY.contains(&format!("local CLASS_IDLE_MS = {}\n", fleetq_core::class::CLASS_IDLE_MS)));
        // The defaults a new job's stored state and spec leave out.
        let max = fleetq_core::job::DEFAULT_MAX_ATTEMPTS;
        assert!(LIBRARY.contains(&format!("local DEFAULT_MAX_ATTEMPTS = '{max}'\n")));
        assert!(LIBRARY.contains(&format!("local DEFAULT_BACKOFF = '{DEFAULT_RETRY_BACKOFF_MS}'\n")));
        // The retry delay's cap (`JobSpec::retry_delay_ms`), and where the time sits in an order key.
        let cap = fleetq_core::job::MAX_RETRY_BACKOFF_MS;
        assert!(LIBRARY.contains(&format!("local MAX_BACKOFF = {cap}\n")));
        let prefix = fleetq_core::order::PREFIX_LEN;
        assert!(LIBRARY.contains(&format!("local ORDER_TIME = {{9, {prefix}}}\n")));
    }
}
