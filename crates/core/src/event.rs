//! Events of the broker's ordered log and the [`Snapshot`] they fold into.
//!
//! Every state change appends exactly one event, in the same atomic step as the change, with a
//! strictly increasing `seq`. A snapshot states the `seq` it is as of; folding the events after it
//! with [`Snapshot::apply`] yields what a fresh snapshot would show. Job events carry the job's full
//! [`JobSummary`] after the change (never payloads or results), so folding needs no other reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::{JobId, JobStatus, JobSummary};
use crate::worker::{ConnectorReport, MachineEvent, MachineState, WorkerInfo};

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Position in the log (strictly increasing, gap-free within one broker).
    pub seq: u64,
    /// When the change happened (ms).
    pub at: i64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A job was submitted.
    JobSubmitted {
        /// The job after the change.
        job: JobSummary,
    },
    /// A worker claimed it.
    JobClaimed {
        /// The job after the change.
        job: JobSummary,
    },
    /// Progress (coalesced; the latest progress always precedes the terminal event).
    JobProgress {
        /// The job after the change.
        job: JobSummary,
    },
    /// Back to pending: retry scheduled, released, or lease expired.
    JobRequeued {
        /// The job after the change.
        job: JobSummary,
        /// `retry`, `released`, `lease_expired` or a worker-given reason.
        reason: String,
    },
    /// Finished with a result.
    JobCompleted {
        /// The job after the change.
        job: JobSummary,
    },
    /// Finished with an error.
    JobFailed {
        /// The job after the change.
        job: JobSummary,
    },
    /// Cancel requested for a running job.
    JobCancelRequested {
        /// The job after the change.
        job: JobSummary,
    },
    /// Cancelled.
    JobCancelled {
        /// The job after the change.
        job: JobSummary,
    },
    /// A failed or cancelled job was put back in the queue by an operator.
    JobRetried {
        /// The job after the change.
        job: JobSummary,
    },
    /// A service's queue was paused (nothing of it is claimed) or resumed.
    ServicePaused {
        /// The service.
        service: String,
        /// Paused now (false: resumed).
        paused: bool,
    },
    /// The unworkable flag of a partition changed: it applies to the partition's pending jobs.
    PartitionWorkability {
        /// Partition key.
        partition: String,
        /// New flag.
        unworkable: bool,
    },
    /// A worker registered (or re-registered).
    WorkerRegistered {
        /// The worker.
        worker: WorkerInfo,
    },
    /// A worker left (deregistered or its presence expired).
    WorkerRemoved {
        /// The worker.
        worker_id: String,
        /// `deregistered` or `expired`.
        reason: String,
    },
    /// A connector's status changed.
    ConnectorStatus {
        /// The reporting worker.
        worker_id: String,
        /// The report.
        report: ConnectorReport,
    },
    /// A machine lifecycle event.
    Machine {
        /// The event.
        event: MachineEvent,
    },
    /// The stored event at this sequence could not be decoded (a bug or a foreign writer). It
    /// keeps its place in the log, so readers move past it; it changes no state.
    Undecodable {
        /// Why it could not be read.
        reason: String,
    },
}

impl EventKind {
    /// The job summary a job event carries.
    pub fn job(&self) -> Option<&JobSummary> {
        match self {
            Self::JobSubmitted { job }
            | Self::JobClaimed { job }
            | Self::JobProgress { job }
            | Self::JobRequeued { job, .. }
            | Self::JobCompleted { job }
            | Self::JobFailed { job }
            | Self::JobCancelRequested { job }
            | Self::JobCancelled { job }
            | Self::JobRetried { job } => Some(job),
            _ => None,
        }
    }

    /// The wire name of the kind (`job_submitted`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::JobSubmitted { .. } => "job_submitted",
            Self::JobClaimed { .. } => "job_claimed",
            Self::JobProgress { .. } => "job_progress",
            Self::JobRequeued { .. } => "job_requeued",
            Self::JobCompleted { .. } => "job_completed",
            Self::JobFailed { .. } => "job_failed",
            Self::JobCancelRequested { .. } => "job_cancel_requested",
            Self::JobCancelled { .. } => "job_cancelled",
            Self::JobRetried { .. } => "job_retried",
            Self::PartitionWorkability { .. } => "partition_workability",
            Self::ServicePaused { .. } => "service_paused",
            Self::WorkerRegistered { .. } => "worker_registered",
            Self::WorkerRemoved { .. } => "worker_removed",
            Self::ConnectorStatus { .. } => "connector_status",
            Self::Machine { .. } => "machine",
            Self::Undecodable { .. } => "undecodable",
        }
    }
}

/// The live state of the fleet as of `seq`: unfinished jobs, workers, machines.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    /// The last event this snapshot includes.
    pub seq: u64,
    /// Jobs that are not finished (pending, assigned, in progress), by id.
    pub jobs: BTreeMap<JobId, JobSummary>,
    /// Registered workers, by id.
    pub workers: BTreeMap<String, WorkerInfo>,
    /// Machines, by id.
    pub machines: BTreeMap<String, MachineState>,
    /// Services whose queue is paused.
    #[serde(default)]
    pub paused: std::collections::BTreeSet<String>,
}

impl Snapshot {
    /// Folds one event. Events at or before `self.seq` are ignored, so replaying an overlap is safe.
    pub fn apply(&mut self, event: &Event) {
        if event.seq <= self.seq {
            return;
        }
        self.seq = event.seq;
        match &event.kind {
            EventKind::PartitionWorkability { partition, unworkable } => {
                for j in self.jobs.values_mut() {
                    if &j.partition == partition && j.status == JobStatus::Pending {
                        j.unworkable = *unworkable;
                    }
                }
            }
            EventKind::ServicePaused { service, paused } => {
                if *paused {
                    self.paused.insert(service.clone());
                } else {
                    self.paused.remove(service);
                }
            }
            EventKind::WorkerRegistered { worker } => {
                self.workers.insert(worker.registration.worker_id.clone(), worker.clone());
            }
            EventKind::WorkerRemoved { worker_id, .. } => {
                self.workers.remove(worker_id);
            }
            EventKind::ConnectorStatus { worker_id, report } => {
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.connectors.insert(report.service.clone(), report.clone());
                }
            }
            EventKind::Machine { event } => {
                self.machines.entry(event.machine_id.clone()).or_default().apply(event);
            }
            kind => {
                if let EventKind::JobCompleted { job } = kind
                    && let Some(w) = job.worker_id.as_ref().and_then(|id| self.workers.get_mut(id))
                {
                    // As the broker counts it.
                    w.completed = w.completed.saturating_add(1);
                }
                if let Some(job) = kind.job() {
                    if job.status.is_terminal() {
                        self.jobs.remove(&job.id);
                    } else {
                        self.jobs.insert(job.id.clone(), job.clone());
                    }
                }
            }
        }
    }
}
