//! Fleet queries built on any [`Broker`]: which workers could serve a job, and why the others
//! cannot. One implementation for every backend, from the same `explain()` the claim path uses.

use fleetq_core::{JobId, JobStatus, Match, WorkerInfo, explain};
use serde::{Deserialize, Serialize};

use crate::{Broker, BrokerError, JobFilter, Result};

/// One registered worker judged against one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerVerdict {
    /// The worker.
    pub worker: WorkerInfo,
    /// Whether it may serve the job, and why not.
    #[serde(flatten)]
    pub verdict: Match,
    /// It is running a job right now (so a match will not start the job at once).
    pub busy: bool,
}

/// Every registered worker judged against job `id`: matching ones first (idle before busy), then
/// the incompatible ones with their reasons.
pub async fn matching_workers<B: Broker>(broker: &B, id: &JobId) -> Result<Vec<WorkerVerdict>> {
    let job = broker.job(id).await?.ok_or_else(|| BrokerError::JobNotFound(id.clone()))?;
    let mut busy_workers = std::collections::HashSet::new();
    for status in [JobStatus::Assigned, JobStatus::InProgress] {
        let mut filter = JobFilter { status: Some(status), limit: Some(1000), ..JobFilter::default() };
        loop {
            let page = broker.jobs(&filter).await?;
            busy_workers.extend(page.jobs.into_iter().filter_map(|j| j.worker_id));
            match page.next {
                Some(next) => filter.cursor = Some(next),
                None => break,
            }
        }
    }
    let mut out: Vec<WorkerVerdict> = broker
        .workers()
        .await?
        .into_iter()
        .map(|w| {
            let verdict = explain(&w.registration, &job.spec);
            let busy = busy_workers.contains(&w.registration.worker_id);
            WorkerVerdict { worker: w, verdict, busy }
        })
        .collect();
    out.sort_by_key(|v| (!v.verdict.matches, v.busy, v.worker.registration.worker_id.clone()));
    Ok(out)
}
