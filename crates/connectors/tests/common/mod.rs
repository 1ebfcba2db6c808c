//! Helpers shared by the connector tests: a job record, one run of a connector with the progress
//! it reported, and unwrapping an expected failure.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use fleetq_connectors::{CancellationToken, Connector, JobError, ProgressSink};
use fleetq_core::{JobId, JobRecord, JobSpec, JobSummary};
use serde_json::Value;

/// A pending job record for `service` with `payload`.
pub(crate) fn job(service: &str, payload: Value) -> JobRecord {
    let spec = JobSpec::new(service, payload);
    let summary = JobSummary::new_pending(JobId("job-1".into()), &spec, 0);
    JobRecord { summary, spec, outcome: None, history: Vec::new() }
}

/// Runs one job on `c` to its end: the outcome and every progress report, in order.
pub(crate) async fn run(
    c: &dyn Connector,
    payload: Value,
) -> (Result<Value, JobError>, Vec<(f64, Option<String>)>) {
    let (sink, mut rx) = ProgressSink::channel();
    let out = c.process(&job(c.service(), payload), sink, CancellationToken::new()).await;
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        seen.push(p);
    }
    (out, seen)
}

/// The error of a run that had to fail.
pub(crate) fn failure(r: Result<Value, JobError>) -> JobError {
    match r {
        Ok(v) => panic!("expected a failure, got {v}"),
        Err(e) => e,
    }
}
