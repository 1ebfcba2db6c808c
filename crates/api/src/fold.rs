//! The API process's own fold of the event stream: duration statistics for ETAs and the Prometheus
//! counters and histograms of job outcomes. Each API process folds independently from the moment it
//! starts (Prometheus sums across instances), after seeding the statistics from recent completions.

use std::sync::{Arc, Weak};

use fleetq_broker::{Broker, JobFilter};
use fleetq_core::{EventKind, JobStatus};
use futures::StreamExt;

use crate::stats::DurationStats;
use crate::stream::{Feed, Hub, feed};

/// Starts the fold. It ends when `stats` is dropped (the router went away).
pub(crate) fn spawn<B: Broker>(broker: Arc<B>, hub: Arc<Hub>, stats: &Arc<DurationStats>) {
    let weak = Arc::downgrade(stats);
    tokio::spawn(run(broker, hub, weak));
}

async fn run<B: Broker>(broker: Arc<B>, hub: Arc<Hub>, stats: Weak<DurationStats>) {
    // The sequence first, then the history: a completion in between is counted twice at worst,
    // never missed. The hub already knows where the log ends; no second read of it.
    let head = hub.position().await;
    let seed = JobFilter { status: Some(JobStatus::Completed), limit: Some(1000), ..JobFilter::default() };
    if let (Ok(page), Some(s)) = (broker.jobs(&seed).await, stats.upgrade()) {
        // Oldest first, so the rolling window keeps the newest.
        for job in page.jobs.iter().rev() {
            s.record_job(job);
        }
    }
    let mut events = std::pin::pin!(feed(broker, hub, head));
    while let Some(item) = events.next().await {
        let Some(s) = stats.upgrade() else { return };
        let Feed::Event(ev) = item else { continue };
        observe(&s, &ev.kind, ev.at);
    }
}

/// Folds one event into the statistics and the metrics.
pub(crate) fn observe(stats: &DurationStats, kind: &EventKind, at: i64) {
    let secs = |ms: i64| ms.max(0) as f64 / 1000.0;
    match kind {
        EventKind::JobSubmitted { job } => {
            metrics::counter!("fleetq_jobs_submitted_total", "service" => job.service.clone()).increment(1);
        }
        // First attempts only: a retry's wait includes its backoff.
        EventKind::JobClaimed { job } if job.attempt <= 1 => {
            metrics::histogram!("fleetq_job_queue_wait_seconds", "service" => job.service.clone())
                .record(secs(at - job.created_at));
        }
        EventKind::JobCompleted { job } => {
            stats.record_job(job);
            metrics::counter!("fleetq_jobs_finished_total", "service" => job.service.clone(),
                "outcome" => "completed", "category" => "")
            .increment(1);
            if let (Some(start), Some(end)) = (job.started_at, job.finished_at) {
                metrics::histogram!("fleetq_job_duration_seconds", "service" => job.service.clone())
                    .record(secs(end - start));
            }
        }
        EventKind::JobFailed { job } | EventKind::JobCancelled { job } => {
            let outcome = if job.status == JobStatus::Cancelled { "cancelled" } else { "failed" };
            let category = job.error.as_ref().map(|e| e.category.as_str()).unwrap_or("");
            metrics::counter!("fleetq_jobs_finished_total", "service" => job.service.clone(),
                "outcome" => outcome, "category" => category)
            .increment(1);
        }
        EventKind::JobRequeued { job, reason } => {
            metrics::counter!("fleetq_jobs_requeued_total", "service" => job.service.clone(),
                "reason" => reason.clone())
            .increment(1);
        }
        _ => {}
    }
}
