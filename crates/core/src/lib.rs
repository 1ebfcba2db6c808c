//! # fleetq-core
//!
//! The domain of fleetq with no I/O: what a job, a worker and an event are, and the pure rules that
//! decide everything else (validation, matching, ordering, state transitions). The broker backends,
//! the worker runtime and the API all call into this crate so that a rule exists in exactly one place.
//!
//! # Layout
//! - [`job`]: [`JobSpec`] (what a client submits), [`JobRecord`] (what the broker stores), statuses,
//!   outcomes and failure categories.
//! - [`state`]: the job state machine; every status change in every backend goes through
//!   [`JobStatus::apply`].
//! - [`validate`]: submission validation with errors that name the offending field.
//! - [`requirements`]: parsed [`Requirements`] and their canonical form.
//! - [`worker`]: worker registration, capabilities, connector status and machine events.
//! - [`matching`]: [`explain`], the one rule deciding whether a worker may serve a job.
//! - [`order`]: the exact ordering key of pending jobs ([`OrderKey`]).
//! - [`partition`]: the partition a pending job lives in (service + everything matching depends on).
//! - [`restart`]: when a supervised service is restarted, after how long, or given up.
//! - [`event`]: the events appended to the broker's ordered log, and [`Snapshot`] folding.
//!
//! # Example
//!
//! ```
//! use fleetq_core::{Limits, WorkerRegistration, explain, parse_job_spec};
//!
//! let job = parse_job_spec(
//!     r#"{"service": "comfyui", "requirements": {"hardware": {"gpu_memory_gb": 16}}}"#,
//!     &Limits::default(),
//! )?;
//! let worker: WorkerRegistration = serde_json::from_str(
//!     r#"{"worker_id": "box1-gpu0", "machine_id": "box1", "services": ["comfyui"],
//!         "capabilities": {"hardware": {"gpu_memory_gb": 12}}}"#,
//! )?;
//! let verdict = explain(&worker, &job);
//! assert!(!verdict.matches);
//! assert_eq!(verdict.reasons, ["requirement hardware.gpu_memory_gb: needs at least 16, worker has 12"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backoff;
pub mod class;
pub mod clock;
pub mod error;
pub mod event;
pub mod fair;
pub mod job;
pub mod matching;
pub mod oom;
pub mod order;
pub mod outbound;
pub mod partition;
pub mod requirements;
pub mod restart;
pub mod state;
pub mod url;
pub mod validate;
pub mod worker;

pub use class::{ClassKey, ClassSpec};
pub use clock::{Clock, ManualClock, SystemClock, rfc3339};
pub use event::{Event, EventKind, Snapshot};
pub use job::{
    AttemptEnd, FailureCategory, JobError, JobId, JobRecord, JobSpec, JobStatus, JobSummary, Outcome,
};
pub use matching::{Match, explain, matches_partition};
pub use order::OrderKey;
pub use partition::{PartitionKey, PartitionSpec};
pub use requirements::Requirements;
pub use restart::{RestartDecision, RestartPolicy, RestartTracker};
pub use state::{Action, IllegalTransition};
pub use validate::{
    Limits, ValidationError, admit_batch, job_spec_from_value, job_spec_shape, parse_job_spec,
};
pub use worker::{
    Capabilities, ConnectorReport, ConnectorStatus, MachineEvent, MachinePhase, MachineState, WorkerInfo,
    WorkerRegistration,
};
