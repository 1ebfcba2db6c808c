//! The wire shapes of the API: the request and response bodies the handlers serialize. The same
//! types produce the schemas of `/openapi.json` (utoipa `ToSchema`), so the document describes what
//! is actually sent; the contract tests validate live responses against it.

use std::collections::BTreeMap;

use fleetq_broker::ServiceDepth;
use fleetq_core::{
    ConnectorReport, JobId, JobRecord, JobSpec, JobStatus, JobSummary, MachineState, WorkerRegistration,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::stats::Durations;

/// Every error: a stable `code`, a message, and the offending input `field` when one is to blame.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`invalid`, `malformed_json`, `not_found`, `conflict`, …).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Dot path of the offending input (`service`, `[3].priority`, `Idempotency-Key`, a query name).
    pub field: Option<String>,
}

/// `POST /api/jobs` body: one job, or an array of jobs submitted all or nothing.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "describes the body in the OpenAPI document; the handler parses bytes")]
#[serde(untagged)]
pub enum Submission {
    /// One job.
    One(Box<JobSpec>),
    /// A batch.
    Batch(Vec<JobSpec>),
}

/// A submitted job (`created` is false when an idempotency key named an existing job).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    /// The job id.
    pub id: JobId,
    /// Whether this request created it.
    pub created: bool,
}

/// `POST /api/jobs` reply: what was submitted, shaped like the request (an object or a batch).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitReply {
    /// One job was submitted.
    One(Submitted),
    /// A batch was submitted.
    Batch(BatchSubmitted),
}

/// A submitted batch, in the order of the request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchSubmitted {
    /// One entry per submitted job.
    pub jobs: Vec<Submitted>,
}

/// `GET /api/snapshot`: the broker's snapshot and how to read it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotView {
    /// Unfinished jobs, workers and machines as of `seq`.
    #[serde(flatten)]
    pub snapshot: fleetq_core::Snapshot,
    /// A connector report older than this (ms) is stale: its worker stopped refreshing it
    /// (`fleetq api --stale-after-s`). Pages mark such reports instead of believing them.
    pub stale_after_ms: i64,
}

/// `GET /api/jobs/{id}`: the stored record, plus estimates while it is unfinished.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// The record: summary fields, `spec` and `outcome`.
    #[serde(flatten)]
    pub record: JobRecord,
    /// Present while the job is unfinished.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// Queue position and ETA of an unfinished job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Estimate {
    /// 1-based place among pending jobs of its service in claim order (null when running).
    pub queue_position: Option<usize>,
    /// Milliseconds until it is expected to finish (null without enough statistics).
    pub eta_ms: Option<u64>,
    /// The run-time statistics behind the ETA.
    pub durations: Option<Durations>,
}

/// `GET /api/jobs`: a page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobSummary>,
    /// Cursor of the next page (`cursor=`); null on the last page.
    pub next: Option<String>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelResult {
    /// The pending job was cancelled.
    Cancelled,
    /// The running job's worker was asked to stop; `job_cancelled` follows.
    Requested,
    /// The job had already finished; nothing changed.
    AlreadyFinished,
}

/// `POST /api/jobs/{id}/cancel`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cancelled {
    /// The job.
    pub id: JobId,
    /// What happened.
    pub outcome: CancelResult,
}

/// `POST /api/jobs/{id}/retry`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Retried {
    /// The job.
    pub id: JobId,
    /// Always `pending`.
    pub status: JobStatus,
}

/// How a worker stands against a job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Could claim it now.
    Matches,
    /// Could serve it, but is running a job.
    Busy,
    /// Cannot serve it (see `reasons`).
    Incompatible,
}

/// One worker judged against a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerVerdict {
    /// Worker id.
    pub worker_id: String,
    /// Its machine.
    pub machine_id: String,
    /// Services it serves.
    pub services: Vec<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// Whether it is running a job.
    pub busy: bool,
    /// Why it does not match (empty when it does).
    pub reasons: Vec<String>,
}

/// `GET /api/jobs/{id}/matching-workers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MatchingWorkers {
    /// The job.
    pub job_id: JobId,
    /// Every registered worker.
    pub workers: Vec<WorkerVerdict>,
}

/// Whether a worker is running anything.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// No job.
    Idle,
    /// At least one job.
    Busy,
}

/// A connector report with its freshness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectorView {
    /// The report as the worker sent it.
    #[serde(flatten)]
    pub report: ConnectorReport,
    /// The worker stopped refreshing it (older than the API's `--stale-after-s`).
    pub stale: bool,
}

/// A registered worker.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    /// Id, machine, services and capabilities.
    #[serde(flatten)]
    pub registration: WorkerRegistration,
    /// First registration (ms since the epoch).
    pub registered_at: i64,
    /// Last heartbeat (ms since the epoch).
    pub last_seen: i64,
    /// Connector reports by service.
    pub connectors: BTreeMap<String, ConnectorView>,
    /// Idle or busy.
    pub status: Activity,
    /// Ids of the jobs it runs.
    pub current_jobs: Vec<JobId>,
}

/// `GET /api/workers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Workers {
    /// Every registered worker.
    pub workers: Vec<WorkerView>,
    /// The event sequence this was read at.
    pub seq: u64,
}

/// A machine: its lifecycle and its workers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineView {
    /// Machine id.
    pub machine_id: String,
    /// Latest phase (`starting`, `ready`, `stopped`, …; `unknown` when only its workers are known).
    pub phase: String,
    /// Startup steps so far.
    pub steps: Vec<String>,
    /// Latest message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Time of the latest machine event (absent when only its workers are known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    /// Ids of its registered workers.
    pub workers: Vec<String>,
}

impl MachineView {
    /// A machine from its lifecycle state.
    pub fn from_state(m: &MachineState, workers: Vec<String>) -> Self {
        Self {
            machine_id: m.machine_id.clone(),
            phase: m.phase.as_str().to_owned(),
            steps: m.steps.clone(),
            message: m.message.clone(),
            updated_at: Some(m.updated_at),
            workers,
        }
    }
}

/// `GET /api/machines`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Machines {
    /// Machines known by their events or their workers.
    pub machines: Vec<MachineView>,
    /// The event sequence this was read at.
    pub seq: u64,
}

/// How much work one service has in the queue.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct QueueDepth {
    /// Pending and claimable now.
    pub pending: u64,
    /// Pending, waiting for a retry backoff.
    pub delayed: u64,
    /// Held by a worker.
    pub running: u64,
}

impl From<ServiceDepth> for QueueDepth {
    fn from(d: ServiceDepth) -> Self {
        Self { pending: d.pending, delayed: d.delayed, running: d.running }
    }
}

/// One service across the fleet (seed 000's summary shape, with `stale`, `queue`, `durations`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceSummary {
    /// Connector instances: `starting + idle + active + error + offline + stale` (an instance whose
    /// report is stale counts as stale only: its last status is not known to hold).
    pub total: usize,
    /// Instances starting.
    pub starting: usize,
    /// Instances idle.
    pub idle: usize,
    /// Instances running a job.
    pub active: usize,
    /// Instances in error.
    pub error: usize,
    /// Instances offline.
    pub offline: usize,
    /// Instances whose report is older than `--stale-after-s`.
    pub stale: usize,
    /// Its queue is paused: nothing of it is claimed (`POST /api/services/{service}/resume`).
    #[serde(default)]
    pub paused: bool,
    /// Newest report (RFC 3339).
    pub last_update: Option<String>,
    /// Queue depth.
    pub queue: QueueDepth,
    /// Run-time statistics.
    pub durations: Option<Durations>,
}

/// `GET /api/services`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Services {
    /// Always true (seed 000's shape).
    pub success: bool,
    /// By service name.
    pub services: BTreeMap<String, ServiceSummary>,
    /// Read time (RFC 3339).
    pub timestamp: String,
}

/// `GET /api/services/{service}/summary`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceSummaryReply {
    /// Always true.
    pub success: bool,
    /// The service.
    pub service_type: String,
    /// Read time (RFC 3339).
    pub timestamp: String,
    /// The summary.
    #[serde(flatten)]
    pub summary: ServiceSummary,
}

/// One connector instance of a service.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// `machine:worker`.
    pub id: String,
    /// Machine id.
    pub machine_id: String,
    /// Worker id.
    pub worker_id: String,
    /// Connector status.
    pub status: fleetq_core::ConnectorStatus,
    /// Report time (RFC 3339).
    pub last_update: String,
    /// The connector's message (an error's text).
    pub error_message: Option<String>,
    /// The report is stale.
    pub stale: bool,
    /// What the connector reported of its service (version, models, queue).
    pub info: Option<Value>,
}

/// `GET /api/services/{service}/instances`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Instances {
    /// Always true.
    pub success: bool,
    /// The service.
    pub service_type: String,
    /// Its instances.
    pub instances: Vec<Instance>,
    /// Number of instances.
    pub total: usize,
    /// Read time (RFC 3339).
    pub timestamp: String,
}

/// `GET /api/stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Rolling run-time statistics by service.
    pub services: BTreeMap<String, Durations>,
}

/// `GET /health` and `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok` (health), `ready`, or `degraded` (ready, but something needs an operator: `message`).
    pub status: String,
    /// What is degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Who the caller is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    /// Whether tokens are required by this API (without them every caller may do everything).
    pub auth: bool,
    /// The token's role: `read`, `submit` or `admin` (`admin` when auth is off).
    #[schema(pattern = "^(read|submit|admin)$")]
    pub role: String,
    /// The token's name, the owner stamped on its jobs (none when auth is off).
    pub name: Option<String>,
}
