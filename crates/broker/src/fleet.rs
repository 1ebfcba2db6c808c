//! Fleet queries built on any [`Broker`]: which workers are busy, which could serve a job, and why
//! the others cannot. One implementation for every backend, from the same `explain()` the claim
//! path uses.

use std::collections::BTreeMap;

use fleetq_core::{JobId, JobStatus, JobSummary, Match, WorkerInfo, explain};
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

/// The running jobs of each worker that holds one (a worker is busy when it is in this map): the
/// one rule every view of the fleet uses.
pub fn running_by_worker<'a>(jobs: impl IntoIterator<Item = &'a JobSummary>) -> BTreeMap<String, Vec<JobId>> {
    let mut out: BTreeMap<String, Vec<JobId>> = BTreeMap::new();
    for j in jobs.into_iter().filter(|j| j.status.is_running()) {
        if let Some(w) = &j.worker_id {
            out.entry(w.clone()).or_default().push(j.id.clone());
        }
    }
    out
}

/// [`running_by_worker`] over every running job of the broker (paged listings, not a snapshot).
pub async fn busy_workers<B: Broker>(broker: &B) -> Result<BTreeMap<String, Vec<JobId>>> {
    let mut running = Vec::new();
    for status in [JobStatus::Assigned, JobStatus::InProgress] {
        let mut filter = JobFilter { status: Some(status), limit: Some(1000), ..JobFilter::default() };
        loop {
            let page = broker.jobs(&filter).await?;
            running.extend(page.jobs);
            match page.next {
                Some(next) => filter.cursor = Some(next),
                None => break,
            }
        }
    }
    Ok(running_by_worker(&running))
}

/// Every registered worker judged against job `id`: matching ones first (idle before busy), then
/// the incompatible ones with their reasons.
pub async fn matching_workers<B: Broker>(broker: &B, id: &JobId) -> Result<Vec<WorkerVerdict>> {
    let job = broker.job(id).await?.ok_or_else(|| BrokerError::JobNotFound(id.clone()))?;
    let busy_workers = busy_workers(broker).await?;
    let mut out: Vec<WorkerVerdict> = broker
        .workers()
        .await?
        .into_iter()
        .map(|w| {
            let verdict = explain(&w.registration, &job.spec);
            let busy = busy_workers.contains_key(&w.registration.worker_id);
            WorkerVerdict { worker: w, verdict, busy }
        })
        .collect();
    out.sort_by_key(|v| (!v.verdict.matches, v.busy, v.worker.registration.worker_id.clone()));
    Ok(out)
}
