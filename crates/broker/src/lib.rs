//! # fleetq-broker
//!
//! The broker contract ([`Broker`]) and its two backends, held to one conformance suite, each
//! behind a cargo feature so crates that need only the contract compile neither:
//! - `embedded::EmbeddedBroker` (feature `embedded`): SQLite (WAL) in one process — the default
//!   for one box;
//! - `redis::RedisBroker` (feature `redis`): Redis ≥ 7 with server-side functions — for a fleet.
//!
//! # Core promises (docs/design.md §4)
//! - **One path for truth.** Every state change happens atomically and appends exactly one event to
//!   the ordered log in the same step ([`Event::seq`] strictly increases). [`Log::snapshot`] states
//!   the sequence it is as of; [`Log::events_after`] continues from there without gaps.
//! - **Fenced leases.** Only the holder of a job's *current* attempt may renew, report progress,
//!   complete, fail or release it; anyone else gets [`BrokerError::LeaseLost`] and changes nothing.
//! - **Exact order.** Pending jobs are ordered by [`fleetq_core::OrderKey`] within partitions
//!   ([`fleetq_core::PartitionSpec`]); a claim takes the best head among the partitions the worker
//!   matches, so incompatible jobs never hide compatible ones. A job's queue position and the
//!   queue listing come from the same order ([`Read::queue_position`], [`Read::queue`]), by
//!   index, exact at any backlog. With [`FairShare`] on, customers of equal priority take turns
//!   ([`fleetq_core::fair`]): the rule sets the order key's time, the indexes are the same.
//! - **Claims that scale with the fleet, not the partitions.** Both backends keep, per worker class
//!   ([`fleetq_core::ClassSpec`]: workers that match alike), the head of every live partition the
//!   class matches in claim order; a claim reads the front of that one index, O(log partitions).
//!   A partition lives while it has an unfinished job and is removed with its workability flag
//!   after; a class lives while it has a worker. Adding a partition matches it against the classes
//!   only. The design and its costs: `docs/design.md`, "Claims: an index per worker class".
//! - **Blocking claims.** [`Queue::claim`] waits on a wake-up signal, never by sleep-polling.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use fleetq_broker::BrokerConfig;
//! use fleetq_broker::embedded::EmbeddedBroker;
//! use fleetq_broker::prelude::*;
//! use fleetq_core::{JobSpec, WorkerRegistration};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let broker = EmbeddedBroker::open(dir.path().join("fleetq.db"), BrokerConfig::default())?;
//! let worker: WorkerRegistration = serde_json::from_value(json!({
//!     "worker_id": "box1-gpu0", "machine_id": "box1", "services": ["simulation"]
//! }))?;
//! broker.register_worker(worker).await?;
//! let id = broker.submit(JobSpec::new("simulation", json!({"steps": 10}))).await?.id;
//!
//! let lease = broker.claim("box1-gpu0", Duration::from_secs(5)).await?.expect("a job");
//! broker.progress(&lease.as_ref(), 50.0, Some("halfway".into())).await?;
//! broker.complete(&lease.as_ref(), json!({"images": ["ref://out/1.png"]})).await?;
//! assert_eq!(broker.job(&id).await?.map(|j| j.summary.status), Some(fleetq_core::JobStatus::Completed));
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`Broker`], the sum of the capability traits [`Queue`], [`Fleet`], [`Read`] and [`Log`] over
//!   [`Backend`] ([`prelude`] imports them all), and the types they speak ([`Lease`], [`LeaseRef`], …),
//!   [`BrokerError`];
//! - [`Clock`] (from core): wall time behind a trait so tests control it; [`Backend::clock`] is the
//!   one every caller of a broker reads;
//! - `embedded`, `redis`: the backends (features of the same names);
//! - [`subscribe`]: a live event stream on top of any backend;
//! - [`fleet`]: fleet queries on top of any backend (matching workers for a job);
//! - `conformance` and `testing` (feature `test-utils`): the suite and a `redis-server` harness.

#[cfg(feature = "embedded")]
pub mod embedded;
pub mod fleet;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "embedded", feature = "redis"))]
mod shared;

mod subscribe;

#[cfg(feature = "test-utils")]
pub mod conformance;
#[cfg(feature = "test-utils")]
pub mod testing;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetq_core::{
    ConnectorReport, Event, IllegalTransition, JobError, JobId, JobRecord, JobSpec, JobStatus, JobSummary,
    Limits, MachineEvent, MachineState, Requirements, Snapshot, ValidationError, WorkerInfo,
    WorkerRegistration,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
#[cfg(any(feature = "embedded", feature = "redis"))]
pub(crate) use shared::*;

pub use subscribe::subscribe;
use thiserror::Error;

pub use fleetq_core::clock::{Clock, ManualClock, SystemClock};

/// Errors of every broker operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The input was rejected; nothing changed.
    #[error("invalid input: {0}")]
    Invalid(#[from] ValidationError),
    /// The caller does not hold the job's current attempt (it timed out, was re-queued or re-claimed);
    /// nothing changed.
    #[error("lease lost for job {0}")]
    LeaseLost(JobId),
    /// No such job.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The worker is not registered (or its presence expired): register again.
    #[error("worker {0} is not registered")]
    UnknownWorker(String),
    /// The operation is illegal in the job's status.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// A result over the configured limit; store large artefacts elsewhere and return a reference.
    #[error("result of {size} bytes is over the limit of {limit} bytes")]
    ResultTooLarge {
        /// Size of the result.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// SQLite failed.
    #[cfg(feature = "embedded")]
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The embedded store is open in another process (one process owns a store).
    #[error("the store {0} is in use by another fleetq process")]
    StoreInUse(String),
    /// Redis failed. (Its error is in the message, not also the source, so a printed chain
    /// says it once.)
    #[cfg(feature = "redis")]
    #[error("redis: {0}")]
    Redis(::redis::RedisError),
    /// Redis could not be reached or its URL is malformed, at connect time: the message says
    /// where and what to do.
    #[error("{0}")]
    Connect(String),
    /// Stored data could not be decoded (a bug or a foreign writer).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The change was made on the Redis primary but fewer replicas than `wait_replicas` confirmed
    /// it in time: it may be lost in a failover. Submitting again with the same idempotency key
    /// is safe.
    #[error("the change is on the primary but only {got} of {wanted} replicas confirmed it in time")]
    NotReplicated {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that confirmed.
        got: u32,
    },
    /// The embedded store's group transaction did not commit (disk full, I/O error): nothing of
    /// the operation was kept; it may succeed when tried again.
    #[error("the store could not commit the change; nothing was kept")]
    CommitFailed,
    /// The backend was shut down.
    #[error("broker is closed")]
    Closed,
}

#[cfg(feature = "redis")]
impl From<::redis::RedisError> for BrokerError {
    fn from(e: ::redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

impl BrokerError {
    /// The operation may succeed when tried again unchanged: the backend was briefly unreachable,
    /// busy or failed to write (a Redis restart or network blip, a locked or full SQLite file).
    /// Answers about the operation itself (invalid, lease lost, not found, …) are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::CommitFailed => true,
            #[cfg(feature = "redis")]
            Self::Redis(_) => true,
            #[cfg(feature = "embedded")]
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::OutOfMemory
                )
            ),
            _ => false,
        }
    }
}

static UNDECODABLE: AtomicU64 = AtomicU64::new(0);

/// Records that a stored record could not be decoded and was passed over.
#[cfg_attr(
    not(feature = "redis"),
    allow(dead_code, reason = "only the Redis backend reads foreign-writable records")
)]
pub(crate) fn note_undecodable(what: &str, reason: &str) {
    UNDECODABLE.fetch_add(1, Ordering::Relaxed);
    tracing::error!(record = what, reason, "a stored record could not be decoded; passed over");
}

/// How many stored records this process passed over because they could not be decoded (a bug or
/// a foreign writer); the API's `/ready` and `/metrics` report it.
pub fn undecodable_records() -> u64 {
    UNDECODABLE.load(Ordering::Relaxed)
}

/// The reason a worker gives when it releases a job because its service went away under it
/// ([`Queue::release`]): the attempt is given back, and a job whose service died under it
/// [`fleetq_core::job::SERVICE_CRASHES_TO_FAIL`] times fails as `service_crash`.
pub const RELEASE_SERVICE_OFFLINE: &str = "service_offline";

/// Result alias of this crate.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// TLS material for a `rediss://` Redis, as PEM files: a CA to trust instead of the system's
/// roots, and a client certificate and key for mutual TLS. Only for `rediss://` URLs (the Redis
/// backend refuses it with a `redis://` URL rather than ignore it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisTls {
    /// The CA certificate(s) the server's certificate must chain to.
    pub ca_file: Option<std::path::PathBuf>,
    /// This client's certificate (mutual TLS), with `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// This client's private key (mutual TLS), with `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl RedisTls {
    /// Whether any file is given.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Tunables shared by both backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerConfig {
    /// How long this process's claims and renewals hold a job (a property of the caller, also with
    /// Redis: processes of one queue may use different leases).
    pub lease_ms: i64,
    /// A worker not heard from for this long is removed.
    pub worker_ttl_ms: i64,
    /// Progress events of one job are at most this often (the latest progress is still stored).
    pub progress_coalesce_ms: i64,
    /// Event log length cap (older events are trimmed).
    pub max_events: usize,
    /// Event log age cap: `reap` drops events older than this (ms).
    pub max_event_age_ms: i64,
    /// Largest stored result document.
    pub max_result_bytes: usize,
    /// Finished jobs are kept this long.
    pub retention_ms: i64,
    /// Most pending jobs a snapshot lists (running ones are always listed).
    pub snapshot_pending_limit: usize,
    /// Longest a claim blocks between two re-checks (delayed retries becoming due, missed wake-ups).
    pub claim_recheck_ms: u64,
    /// A job given back by a worker (failure, release, lease expiry) is not offered to that same
    /// worker for this long after it becomes claimable, so another matching worker gets it first.
    pub retry_avoid_ms: i64,
    /// Submission limits.
    pub limits: Limits,
    /// Redis: a write is acknowledged only once this many replicas hold it (`WAIT` after each
    /// state change); 0, the default, acknowledges once the primary holds it. See the README's
    /// durability section for what each setting guarantees.
    pub wait_replicas: u32,
    /// Redis: how long a write waits for `wait_replicas` before failing with
    /// [`BrokerError::NotReplicated`] (the write stays on the primary).
    pub wait_timeout_ms: u64,
    /// Fair share between customers of equal priority ([`fleetq_core::fair`]), a queue setting.
    /// `None`, the default, leaves it as the queue has it: with Redis the stored setting (off for
    /// a new queue), so workers never change it; the embedded store is off. `Some` sets it (with
    /// Redis, for every process of the queue).
    pub fair_share: Option<FairShare>,
    /// TLS files for a `rediss://` Redis (the embedded store has no use for them).
    #[serde(default)]
    pub redis_tls: RedisTls,
}

/// Fair share between customers: among jobs of equal effective priority, customers take turns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FairShare {
    /// On, or off (the exact order).
    pub enabled: bool,
    /// Turns per round of a customer (1 to [`fleetq_core::fair::MAX_WEIGHT`]); a customer not
    /// listed has 1, and jobs without a customer share one customer, `""`.
    pub weights: BTreeMap<String, u32>,
}

impl FairShare {
    /// On, with weights parsed from `customer=weight` items (the bad one is named).
    pub fn with_weights<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> std::result::Result<Self, ValidationError> {
        let mut weights = BTreeMap::new();
        for item in items {
            let bad = || {
                ValidationError::new(
                    "customer_weight",
                    format!("{item:?}: want customer=weight, weight 1..={}", fleetq_core::fair::MAX_WEIGHT),
                )
            };
            let (customer, w) = item.split_once('=').ok_or_else(bad)?;
            let w: u32 = w.trim().parse().map_err(|_| bad())?;
            if !(1..=fleetq_core::fair::MAX_WEIGHT).contains(&w) {
                return Err(bad());
            }
            weights.insert(customer.trim().to_owned(), w);
        }
        Ok(Self { enabled: true, weights })
    }
}

impl BrokerConfig {
    /// The fair share in force when this process decides it (on, with its weights), else `None`.
    pub fn fair(&self) -> Option<&FairShare> {
        self.fair_share.as_ref().filter(|f| f.enabled)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            worker_ttl_ms: 30_000,
            progress_coalesce_ms: 250,
            max_events: 100_000,
            max_event_age_ms: 24 * 3600 * 1000,
            max_result_bytes: 1024 * 1024,
            retention_ms: 7 * 24 * 3600 * 1000,
            snapshot_pending_limit: 1000,
            claim_recheck_ms: 1000,
            retry_avoid_ms: 5_000,
            limits: Limits::default(),
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
            fair_share: None,
            redis_tls: RedisTls::default(),
        }
    }
}

/// What [`Queue::submit`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// The job's id.
    pub id: JobId,
    /// False when an idempotency key matched an existing job (whose id this is).
    pub created: bool,
}

/// Identifies one attempt of one job held by one worker: what fenced operations present.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    /// The job.
    pub job_id: JobId,
    /// The attempt the holder claimed.
    pub attempt: u32,
    /// The holder.
    pub worker_id: String,
}

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The job, payload included.
    pub job: JobRecord,
    /// Which attempt this is (1-based).
    pub attempt: u32,
    /// The holder.
    pub worker_id: String,
    /// Lease expiry (ms); renew or report progress before it.
    pub deadline_ms: i64,
}

impl Lease {
    /// The reference fenced operations take.
    pub fn as_ref(&self) -> LeaseRef {
        LeaseRef {
            job_id: self.job.summary.id.clone(),
            attempt: self.attempt,
            worker_id: self.worker_id.clone(),
        }
    }
}

/// State of a held lease after a renewal or a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    /// New expiry (ms).
    pub deadline_ms: i64,
    /// A client asked to cancel: interrupt the service, then call [`Queue::fail`] or [`Queue::release`].
    pub cancel_requested: bool,
}

/// What [`Queue::fail`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FailOutcome {
    /// Another attempt will run, not before `run_at` (ms).
    Retrying {
        /// Earliest time of the next attempt.
        run_at: i64,
    },
    /// The job failed for good.
    Failed,
    /// A cancel had been requested: the job is cancelled.
    Cancelled,
}

/// What [`Queue::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job was pending and is now cancelled.
    Cancelled,
    /// The job is running; its worker was asked to stop.
    Requested,
    /// The job had already finished; nothing changed.
    AlreadyFinished,
}

/// What [`Queue::reap`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapReport {
    /// Expired leases put back in the queue.
    pub requeued: usize,
    /// Expired leases whose job failed (no attempts left) or was cancelled (cancel requested).
    pub finished: usize,
    /// Delayed retries that became claimable.
    pub promoted: usize,
    /// Workers removed for missing heartbeats.
    pub workers_expired: usize,
    /// Events dropped for age.
    pub events_trimmed: usize,
}

/// How much work one service has in the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDepth {
    /// Pending and claimable now.
    pub pending: u64,
    /// Pending, waiting for a retry backoff.
    pub delayed: u64,
    /// Held by a worker (assigned or in progress).
    pub running: u64,
}

/// A page request over jobs, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFilter {
    /// Only this status.
    pub status: Option<JobStatus>,
    /// Only this service.
    pub service: Option<String>,
    /// Only jobs last held by this worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Only this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Only this customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Only jobs submitted by this token (the API sets it for a `submit` caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Continue after this cursor (from [`JobPage::next`]).
    pub cursor: Option<String>,
}

/// A page request over claimable pending jobs, in claim order ([`fleetq_core::OrderKey`]: effective
/// priority, effective time, submission). Jobs waiting for a retry backoff are not in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueFilter {
    /// Only this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Only this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Only this customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Only jobs submitted by this token (the API sets it for a `submit` caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Page size (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Continue after this cursor (from [`JobPage::next`] of a queue page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<JobSummary>,
    /// Cursor of the next page, if any.
    pub next: Option<String>,
}

/// The capability traits, for `use fleetq_broker::prelude::*;` where a concrete broker's methods
/// are called.
pub mod prelude {
    pub use crate::{Backend, Broker, Fleet, Log, Queue, Read};
}

/// The broker contract: the sum of its capabilities ([`Queue`], [`Fleet`], [`Read`], [`Log`],
/// over the [`Backend`] they share). Both backends implement every one and pass `conformance`; a
/// consumer names only the capabilities it uses (a worker needs no [`Read`], a machine only
/// [`Fleet`]), so a test double implements only those.
///
/// Futures are `Send` so callers can spawn them; implementations may write `async fn`.
pub trait Broker: Queue + Fleet + Read + Log {}

impl<T: Queue + Fleet + Read + Log> Broker for T {}

/// What every capability shares: the configuration and the clock.
pub trait Backend: Send + Sync + 'static {
    /// The configuration in force.
    fn config(&self) -> &BrokerConfig;

    /// The clock this broker stamps times with; callers computing with broker times (leases, ETAs,
    /// staleness) read this one, so a test's [`ManualClock`] moves them all.
    fn clock(&self) -> &Arc<dyn Clock>;
}

/// The queue: jobs submitted, claimed under a lease, renewed, ended, cancelled and retried, and the
/// upkeep that moves expired leases and due retries on.
pub trait Queue: Backend {
    /// Validates and enqueues a job. An idempotency key already used returns that job.
    fn submit(&self, spec: JobSpec) -> impl Future<Output = Result<Submitted>> + Send;

    /// Validates every spec first, then enqueues them all (all or nothing on validation).
    fn submit_batch(&self, specs: Vec<JobSpec>) -> impl Future<Output = Result<Vec<Submitted>>> + Send;

    /// Claims the best pending job `worker_id` may serve, waiting up to `wait` for one.
    fn claim(&self, worker_id: &str, wait: Duration) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Extends the lease.
    fn renew(&self, lease: &LeaseRef) -> impl Future<Output = Result<LeaseState>> + Send;

    /// Records progress (0–100) and extends the lease.
    fn progress(
        &self,
        lease: &LeaseRef,
        progress: f64,
        message: Option<String>,
    ) -> impl Future<Output = Result<LeaseState>> + Send;

    /// Finishes the job with `result`.
    fn complete(&self, lease: &LeaseRef, result: Value) -> impl Future<Output = Result<()>> + Send;

    /// Finishes the job with `result` and claims the worker's next job in the same step (no wait).
    fn complete_and_claim(
        &self,
        lease: &LeaseRef,
        result: Value,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Fails the attempt: retried with backoff while `error.retryable` and attempts remain.
    fn fail(&self, lease: &LeaseRef, error: JobError) -> impl Future<Output = Result<FailOutcome>> + Send;

    /// Fails the attempt like [`Queue::fail`]; when the job is retried, its requirements become
    /// `requirements` (it moves to that partition), so only workers meeting them take it — e.g.
    /// more GPU memory after running out ([`fleetq_core::oom`]). A job that is not retried keeps
    /// its requirements.
    fn fail_requiring(
        &self,
        lease: &LeaseRef,
        error: JobError,
        requirements: Requirements,
    ) -> impl Future<Output = Result<FailOutcome>> + Send;

    /// Gives the job back at once (progress timeout, shutdown). `reason == "shutdown"` refunds the
    /// attempt; other reasons count it and fail the job when attempts are exhausted.
    fn release(&self, lease: &LeaseRef, reason: &str) -> impl Future<Output = Result<FailOutcome>> + Send;

    /// Cancels a pending job at once, or asks the worker of a running job to stop.
    fn cancel(&self, id: &JobId) -> impl Future<Output = Result<CancelOutcome>> + Send;

    /// Puts a failed or cancelled job back in the queue with a fresh budget of `spec.max_attempts`
    /// attempts, numbered on from its last (a spent attempt's number is never used again).
    fn retry(&self, id: &JobId) -> impl Future<Output = Result<()>> + Send;

    /// Pauses (`paused`) or resumes a service's queue: while paused, nothing of it is claimed;
    /// resumed, it goes on in the same order. Evented (`service_paused`) when it changes; returns
    /// whether it did.
    fn pause_service(&self, service: &str, paused: bool) -> impl Future<Output = Result<bool>> + Send;

    /// The services whose queue is paused.
    fn paused_services(&self) -> impl Future<Output = Result<std::collections::BTreeSet<String>>> + Send;

    /// Re-queues or finishes jobs whose lease expired, promotes due retries, expires silent workers.
    /// Idempotent; safe from every process. Claims do the lease part themselves.
    fn reap(&self) -> impl Future<Output = Result<ReapReport>> + Send;

    /// Re-evaluates, over every live partition, which ones no registered worker can serve and flags
    /// their jobs. Returns the number of partitions whose flag changed. Brokers keep the flags as
    /// partitions and workers come and go; this is a full pass (O(partitions)) that repairs.
    fn evaluate_workability(&self) -> impl Future<Output = Result<usize>> + Send;
}

/// The fleet's own reports: workers registering, alive and leaving, their connectors' status, and
/// machines' lifecycle events.
pub trait Fleet: Backend {
    /// Registers (or re-registers, replacing every field) a worker.
    fn register_worker(&self, registration: WorkerRegistration) -> impl Future<Output = Result<()>> + Send;

    /// Marks a worker alive.
    fn heartbeat(&self, worker_id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Removes a worker (its running jobs come back when their leases expire).
    fn deregister_worker(&self, worker_id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Records a connector's status; only changes are evented.
    fn report_connector(
        &self,
        worker_id: &str,
        report: ConnectorReport,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Records a machine lifecycle event.
    fn machine_event(&self, event: MachineEvent) -> impl Future<Output = Result<()>> + Send;
}

/// Reads for people and tools: jobs, the queue in claim order and a job's place in it, depths,
/// workers and machines.
pub trait Read: Backend {
    /// One job with payload and outcome.
    fn job(&self, id: &JobId) -> impl Future<Output = Result<Option<JobRecord>>> + Send;

    /// A page of jobs, newest first.
    fn jobs(&self, filter: &JobFilter) -> impl Future<Output = Result<JobPage>> + Send;

    /// A page of finished jobs (completed, failed, cancelled), the latest to finish first.
    fn finished(&self, filter: &JobFilter) -> impl Future<Output = Result<JobPage>> + Send;

    /// The 1-based place of a claimable pending job among its service's claimable jobs, in claim
    /// order; `None` when the job is not waiting in the queue (delayed by a retry backoff, running,
    /// finished, or unknown). Exact at any backlog; an index count, never a scan of the jobs.
    fn queue_position(&self, id: &JobId) -> impl Future<Output = Result<Option<u64>>> + Send;

    /// A page of claimable pending jobs in claim order (see [`QueueFilter`]).
    fn queue(&self, filter: &QueueFilter) -> impl Future<Output = Result<JobPage>> + Send;

    /// Registered workers.
    fn workers(&self) -> impl Future<Output = Result<Vec<WorkerInfo>>> + Send;

    /// Unfinished jobs per service (services with none are absent).
    fn queue_depths(&self) -> impl Future<Output = Result<BTreeMap<String, ServiceDepth>>> + Send;

    /// Known machines.
    fn machines(&self) -> impl Future<Output = Result<Vec<MachineState>>> + Send;
}

/// The ordered event log and what is read beside it: the snapshot it folds into, its epoch, and the
/// cancel signals a worker waits on.
pub trait Log: Backend {
    /// The live state, as of a stated sequence.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot>> + Send;

    /// The epoch of the event log: it changes when the log is found to have gone back (a restore,
    /// a failover that lost writes), so that sequence numbers from before — resume tokens — are
    /// known to name other events. Starts at 0.
    fn log_epoch(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Moves the epoch on from `seen` (once: a caller that saw an older epoch gets the current one
    /// unchanged, so every process that noticed the same going-back agrees). Returns the epoch.
    fn advance_log_epoch(&self, seen: u64) -> impl Future<Output = Result<u64>> + Send;

    /// Which server's copy of the log is read: a number that changes when the backend starts
    /// reading another one (a Redis primary followed across a failover), after which the log may
    /// hold fewer events than were read before — a reader checks, as after an outage. Constant
    /// where the log cannot move (the default).
    fn log_source(&self) -> u64 {
        0
    }

    /// Up to `limit` events with `seq > after`, waiting up to `wait` for the first one.
    fn events_after(
        &self,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send;

    /// The jobs held by `worker_id` whose cancel was requested since its last call, waiting up to
    /// `wait` for the first: how a worker hears a cancel at once, not at its next renewal (which
    /// still tells it too, should a signal be lost). A signal for a job the worker no longer holds
    /// means nothing.
    fn cancel_signals(
        &self,
        worker_id: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<JobId>>> + Send;
}

#[cfg(all(test, feature = "embedded", feature = "redis"))]
mod tests {
    use super::*;

    fn sqlite(code: i32) -> BrokerError {
        BrokerError::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None))
    }

    #[test]
    fn transient_errors_are_the_backends_not_the_operations() {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL: the embedded store's busy and I/O errors.
        for code in [5, 6, 10, 13] {
            assert!(sqlite(code).is_transient(), "sqlite code {code}");
        }
        assert!(BrokerError::CommitFailed.is_transient());
        let io = ::redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(BrokerError::Redis(io).is_transient());
        // SQLITE_CONSTRAINT and the operation's own answers are final.
        assert!(!sqlite(19).is_transient());
        assert!(!BrokerError::LeaseLost(JobId("j".into())).is_transient());
        assert!(!BrokerError::Closed.is_transient());
        assert!(!BrokerError::Corrupt("x".into()).is_transient());
        assert!(!BrokerError::Invalid(ValidationError::new("f", "bad")).is_transient());
    }
}
