//! Jobs: the submission ([`JobSpec`]), the stored record ([`JobRecord`]), its light summary for
//! lists and events ([`JobSummary`]), statuses and outcomes.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::requirements::Requirements;

/// A job's identity: a UUIDv7 string chosen by the broker at submission.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Default number of attempts a job gets before it fails for good.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What a client submits. Build it with [`crate::validate::parse_job_spec`] from JSON, or directly
/// and then call [`JobSpec::validate`]; backends refuse specs that do not validate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Service name: `comfyui`, `a1111`, `openai`, `rest`, `simulation`, `NAME-sim` or a custom name.
    #[serde(alias = "service_required", alias = "job_type")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", min_length = 1, max_length = 128)
    )]
    pub service: String,
    /// Opaque service payload (a ComfyUI workflow, an A1111 body, …).
    #[serde(default)]
    pub payload: Value,
    /// What a worker must (and must not) have.
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub requirements: Requirements,
    /// Higher runs first; 0 is a valid priority. Any `i32`.
    #[serde(default)]
    pub priority: i32,
    /// Groups the steps of one workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", min_length = 1, max_length = 128)
    )]
    pub workflow_id: Option<String>,
    /// Overrides `priority` for ordering when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_priority: Option<i32>,
    /// Overrides `created_at` (ms since the epoch) for ordering when set, so later steps of a
    /// workflow keep the workflow's place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 281_474_976_710_655_i64))]
    pub workflow_datetime: Option<i64>,
    /// The step of the workflow this job is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 1_000_000))]
    pub step_number: Option<u32>,
    /// Customer the job runs for; checked against workers' allowed/denied customer lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", min_length = 1, max_length = 128)
    )]
    pub customer_id: Option<String>,
    /// Attempts before the job fails for good (1 = no retry).
    #[serde(default = "default_max_attempts")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub max_attempts: u32,
    /// Overall time limit of one attempt, in ms (enforced by the worker). Omitted: the queue's
    /// default (1 h unless configured); at most the queue's maximum (24 h unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub timeout_ms: Option<u64>,
    /// No-sign-of-life limit of one attempt, in ms (enforced by the worker); at most the queue's
    /// maximum (24 h unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub progress_timeout_ms: Option<u64>,
    /// Base of the exponential retry backoff, in ms (attempt n waits base × 2^(n-1), capped at
    /// 5 min or the base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 300_000))]
    pub retry_backoff_ms: Option<u64>,
    /// The same key submitted again by the same owner returns the first job instead of creating
    /// another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 256))]
    pub idempotency_key: Option<String>,
    /// Who submitted it: the API stamps the caller's token name here (overwriting whatever a client
    /// sent), so a `submit` token can cancel only its own jobs. `None` when auth is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// Default retry backoff base when a spec does not set one.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 1_000;
/// Longest wait between two attempts.
pub const MAX_RETRY_BACKOFF_MS: u64 = 300_000;

impl JobSpec {
    /// A spec for `service` with `payload` and every other field at its default.
    pub fn new(service: impl Into<String>, payload: Value) -> Self {
        Self {
            service: service.into(),
            payload,
            requirements: Requirements::default(),
            priority: 0,
            workflow_id: None,
            workflow_priority: None,
            workflow_datetime: None,
            step_number: None,
            customer_id: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_ms: None,
            progress_timeout_ms: None,
            retry_backoff_ms: None,
            idempotency_key: None,
            owner: None,
        }
    }

    /// The key idempotency is judged by: the client's key within its owner's scope, so one token
    /// can neither see nor squat another's keys. Owner-less jobs (auth off) use the key itself.
    /// Unambiguous: validation refuses control characters in keys, and `\u{1f}` separates.
    pub fn idempotency_scope(&self) -> Option<String> {
        let key = self.idempotency_key.as_deref()?;
        Some(match &self.owner {
            Some(owner) => format!("{owner}\u{1f}{key}"),
            None => key.to_owned(),
        })
    }

    /// Priority used for ordering: `workflow_priority` if set, else `priority`.
    pub fn effective_priority(&self) -> i32 {
        self.workflow_priority.unwrap_or(self.priority)
    }

    /// Time used for ordering: `workflow_datetime` if set, else `created_at_ms`.
    pub fn effective_time(&self, created_at_ms: i64) -> i64 {
        self.workflow_datetime.unwrap_or(created_at_ms)
    }

    /// Delay before attempt `next_attempt` (2, 3, …) may run: base × 2^(n-2), capped.
    pub fn retry_delay_ms(&self, next_attempt: u32) -> u64 {
        let base = self.retry_backoff_ms.unwrap_or(DEFAULT_RETRY_BACKOFF_MS);
        // The shift stops at 30 as the broker's function does (`fleetq.lua`).
        crate::backoff::exponential_ms(
            base,
            MAX_RETRY_BACKOFF_MS.max(base),
            next_attempt.saturating_sub(2).min(30),
        )
    }
}

/// Job status. `unworkable` is a flag on pending jobs ([`JobSummary::unworkable`]), not a status,
/// because such a job is still waiting and becomes claimable as soon as the fleet changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting in the queue (possibly delayed by a retry backoff).
    Pending,
    /// Claimed by a worker, no progress yet.
    Assigned,
    /// The worker reported progress.
    InProgress,
    /// Finished with a result.
    Completed,
    /// Finished with an error, no attempts left (or not retryable).
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 6] =
        [Self::Pending, Self::Assigned, Self::InProgress, Self::Completed, Self::Failed, Self::Cancelled];

    /// The wire name (`pending`, `in_progress`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for completed, failed and cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// True while a worker holds the job.
    pub fn is_running(self) -> bool {
        matches!(self, Self::Assigned | Self::InProgress)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed, for metrics and for deciding what an operator should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureCategory {
    /// The service rejected the job (bad workflow, missing model): retrying will not help.
    Validation,
    /// The service failed while running it (`service_error`).
    #[default]
    #[serde(rename = "service_error", alias = "service")]
    Service,
    /// The service could not be reached (`service_offline`).
    #[serde(rename = "service_offline", alias = "connection")]
    Connection,
    /// The job exceeded its overall timeout.
    Timeout,
    /// The job showed no sign of life for its progress timeout.
    ProgressTimeout,
    /// The worker's lease expired: the worker died, hung or lost the broker (`lost_lease`).
    #[serde(rename = "lost_lease", alias = "lease_expired")]
    LeaseExpired,
    /// Cancelled through the broker.
    Cancelled,
    /// The service ran out of (GPU or host) memory; another machine may succeed.
    Oom,
    /// The service died under this job [`SERVICE_CRASHES_TO_FAIL`] times: the job itself is the
    /// likely cause, so it is not offered to another GPU again.
    ServiceCrash,
    /// Anything else.
    Internal,
}

/// How many times a job's service may die under it before the job is failed as
/// [`FailureCategory::ServiceCrash`]. Each earlier death gives the job back without spending an
/// attempt: the worker's service went away, the job did nothing wrong — unless it keeps happening.
pub const SERVICE_CRASHES_TO_FAIL: u32 = 2;

impl FailureCategory {
    /// Every category, for metrics that must show zero counts too.
    pub const ALL: [Self; 10] = [
        Self::Validation,
        Self::Service,
        Self::Connection,
        Self::Timeout,
        Self::ProgressTimeout,
        Self::LeaseExpired,
        Self::Cancelled,
        Self::Oom,
        Self::ServiceCrash,
        Self::Internal,
    ];

    /// The wire and metrics name (`service_offline`, `lost_lease`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::Service => "service_error",
            Self::Connection => "service_offline",
            Self::Timeout => "timeout",
            Self::ProgressTimeout => "progress_timeout",
            Self::LeaseExpired => "lost_lease",
            Self::Cancelled => "cancelled",
            Self::Oom => "oom",
            Self::ServiceCrash => "service_crash",
            Self::Internal => "internal",
        }
    }
}

/// A typed error outcome: what a connector returns when a job fails and what the broker records.
/// The broker decides requeue-or-fail from `retryable`, never from text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", category.as_str())]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobError {
    /// Human-readable message.
    pub message: String,
    /// Failure category.
    #[serde(default)]
    pub category: FailureCategory,
    /// Whether another attempt may succeed.
    #[serde(default)]
    pub retryable: bool,
    /// `oom`: the size in bytes of the allocation that failed, when the service said
    /// (see [`crate::oom`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_bytes: Option<u64>,
}

impl JobError {
    /// A retryable error of `category`.
    pub fn retryable(category: FailureCategory, message: impl Into<String>) -> Self {
        Self { message: message.into(), category, retryable: true, alloc_bytes: None }
    }
    /// A fatal (not retryable) error of `category`.
    pub fn fatal(category: FailureCategory, message: impl Into<String>) -> Self {
        Self { message: message.into(), category, retryable: false, alloc_bytes: None }
    }
}

/// How a finished job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Completed with this result.
    Result {
        /// The service's result document (size-limited; large artefacts are stored by reference).
        value: Value,
    },
    /// Failed with this error.
    Error {
        /// The error.
        error: JobError,
    },
}

/// The light view of a job: everything but payload and result. Lists, snapshots and events carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummary {
    /// Identity.
    pub id: JobId,
    /// Service name.
    pub service: String,
    /// The partition of the pending queue the job belongs to (see [`crate::PartitionSpec`]).
    #[serde(default)]
    pub partition: String,
    /// Current status.
    pub status: JobStatus,
    /// Attempts started so far (0 before the first claim).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Submitted priority.
    pub priority: i32,
    /// Workflow fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Workflow priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_priority: Option<i32>,
    /// Workflow time (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_datetime: Option<i64>,
    /// Workflow step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_number: Option<u32>,
    /// Customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// The token that submitted it ([`JobSpec::owner`]); `None` when auth is off. A `submit`
    /// token lists, reads and follows only the jobs it owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Worker holding (or last holding) the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Progress 0–100 of the current attempt.
    pub progress: f64,
    /// Latest progress message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Submission time (ms since epoch).
    pub created_at: i64,
    /// Time of the last change (ms).
    pub updated_at: i64,
    /// When the current attempt was claimed (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When the job reached a terminal status (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// A pending job waiting for its retry backoff is not claimable before this time (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<i64>,
    /// A cancel was requested while the job was running.
    #[serde(default)]
    pub cancel_requested: bool,
    /// No registered worker could serve this pending job when the fleet was last evaluated. Derived
    /// from the job's partition (one flag per partition), never stored per job.
    #[serde(default)]
    pub unworkable: bool,
    /// Last error (of the final attempt when failed, of the previous attempt while retrying; none
    /// once completed: earlier attempts' errors are in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// How many times the service died while running this job (each gave it back without
    /// spending an attempt; at [`SERVICE_CRASHES_TO_FAIL`] it fails).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub service_crashes: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The full stored job: its spec (with payload), its summary and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobRecord {
    /// Mutable state.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The submitted spec, payload included.
    pub spec: JobSpec,
    /// Result or error once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// How its attempts ended, oldest first (the last [`HISTORY_LEN`]); empty in a lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptEnd>,
}

/// How many attempt ends a job's record keeps (the newest).
pub const HISTORY_LEN: usize = 50;

/// How one attempt ended: an entry of a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttemptEnd {
    /// The attempt's number (a refunded attempt's number is used again by the next one).
    pub attempt: u32,
    /// The worker that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// When it was claimed (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When it ended (ms).
    pub ended_at: i64,
    /// The job's status after it: `completed`, `pending` (given back: a retry, a release, a lost
    /// lease), `failed` or `cancelled`.
    pub end: JobStatus,
    /// Why it was given back (`retry`, `progress_timeout`, `service_offline`, `lease_expired`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The attempt's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

impl JobSummary {
    /// The summary of a freshly submitted job.
    pub fn new_pending(id: JobId, spec: &JobSpec, now_ms: i64) -> Self {
        Self {
            id,
            service: spec.service.clone(),
            partition: crate::PartitionSpec::of(spec).key().0,
            status: JobStatus::Pending,
            attempt: 0,
            max_attempts: spec.max_attempts,
            priority: spec.priority,
            workflow_id: spec.workflow_id.clone(),
            workflow_priority: spec.workflow_priority,
            workflow_datetime: spec.workflow_datetime,
            step_number: spec.step_number,
            customer_id: spec.customer_id.clone(),
            owner: spec.owner.clone(),
            worker_id: None,
            progress: 0.0,
            message: None,
            created_at: now_ms,
            updated_at: now_ms,
            started_at: None,
            finished_at: None,
            run_at: None,
            cancel_requested: false,
            unworkable: false,
            error: None,
            service_crashes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(Value::String(s.as_str().into())));
        }
        assert_eq!(JobStatus::parse("queued"), None);
    }

    #[test]
    fn retry_delay_grows_and_caps() {
        let mut spec = JobSpec::new("x", Value::Null);
        spec.retry_backoff_ms = Some(100);
        assert_eq!(spec.retry_delay_ms(2), 100);
        assert_eq!(spec.retry_delay_ms(3), 200);
        assert_eq!(spec.retry_delay_ms(4), 400);
        assert_eq!(spec.retry_delay_ms(60), MAX_RETRY_BACKOFF_MS);
        spec.retry_backoff_ms = Some(0);
        assert_eq!(spec.retry_delay_ms(5), 0);
    }

    #[test]
    fn workflow_fields_override_priority_and_time() {
        let mut spec = JobSpec::new("x", Value::Null);
        spec.priority = 5;
        assert_eq!(spec.effective_priority(), 5);
        assert_eq!(spec.effective_time(10), 10);
        spec.workflow_priority = Some(0);
        spec.workflow_datetime = Some(3);
        assert_eq!(spec.effective_priority(), 0);
        assert_eq!(spec.effective_time(10), 3);
    }
}
