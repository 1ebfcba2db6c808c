//! Per-service duration statistics and the ETA built on them from a job's queue position (which the
//! broker answers, [`fleetq_broker::Read::queue_position`]). Pure functions over summaries and
//! samples, so they are tested without I/O; the API feeds them from the event stream (`fold`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use fleetq_core::{ConnectorStatus, JobStatus, JobSummary, WorkerInfo};
use serde::Serialize;

/// Samples kept per key: a rolling window, so estimates follow the fleet as it changes.
pub const WINDOW: usize = 200;
/// A workflow's own statistics are used once it has this many samples; before, the service's.
pub const MIN_WORKFLOW_SAMPLES: usize = 5;

/// (service, workflow): `None` is the service as a whole.
type Key = (String, Option<String>);

/// Rolling duration statistics of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Durations {
    /// Median run time (ms).
    pub p50_ms: u64,
    /// 90th percentile run time (ms).
    pub p90_ms: u64,
    /// Samples behind the figures.
    pub samples: usize,
}

/// Run times of completed jobs by service and by (service, workflow).
#[derive(Debug, Default)]
pub struct DurationStats {
    by_key: Mutex<BTreeMap<Key, VecDeque<u64>>>,
}

impl DurationStats {
    /// Records one completed run of `ms` milliseconds.
    pub fn record(&self, service: &str, workflow: Option<&str>, ms: u64) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let mut push = |key: Key| {
            let q = map.entry(key).or_default();
            if q.len() == WINDOW {
                q.pop_front();
            }
            q.push_back(ms);
        };
        push((service.to_owned(), None));
        if let Some(w) = workflow {
            push((service.to_owned(), Some(w.to_owned())));
        }
    }

    /// Records a job's run if it completed with both timestamps.
    pub fn record_job(&self, job: &JobSummary) {
        if let (JobStatus::Completed, Some(start), Some(end)) = (job.status, job.started_at, job.finished_at)
        {
            self.record(&job.service, job.workflow_id.as_deref(), end.saturating_sub(start).max(0) as u64);
        }
    }

    /// The statistics of a workflow when it has enough samples, else of its service.
    pub fn estimate(&self, service: &str, workflow: Option<&str>) -> Option<Durations> {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let of = |k: &Key| map.get(k).and_then(|q| durations(q.iter().copied()));
        workflow
            .and_then(|w| of(&(service.to_owned(), Some(w.to_owned()))))
            .filter(|d| d.samples >= MIN_WORKFLOW_SAMPLES)
            .or_else(|| of(&(service.to_owned(), None)))
    }

    /// The statistics of every service.
    pub fn services(&self) -> BTreeMap<String, Durations> {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|((_, w), _)| w.is_none())
            .filter_map(|((s, _), q)| Some((s.clone(), durations(q.iter().copied())?)))
            .collect()
    }
}

/// p50/p90 (nearest rank) of some samples; `None` when there are none.
pub fn durations(samples: impl Iterator<Item = u64>) -> Option<Durations> {
    let mut v: Vec<u64> = samples.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = |p: usize| v[((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1];
    Some(Durations { p50_ms: rank(50), p90_ms: rank(90), samples: v.len() })
}

/// Estimated milliseconds until `job` finishes.
///
/// - running: from its progress rate when it reported progress, else the median minus its elapsed time;
/// - pending: the jobs ahead spread over the workers serving the service, each taking the median,
///   plus its own run. `None` without statistics, when no worker with a healthy connector serves
///   the service, or when the job is unworkable (no registered worker may take it).
pub fn eta_ms(
    job: &JobSummary,
    position: Option<usize>,
    stats: Option<Durations>,
    workers: usize,
    now: i64,
) -> Option<u64> {
    match job.status {
        s if s.is_running() => {
            let elapsed = now.saturating_sub(job.started_at?).max(0) as f64;
            if job.progress > 0.0 && job.progress < 100.0 {
                return Some((elapsed * (100.0 - job.progress) / job.progress) as u64);
            }
            let p50 = stats?.p50_ms as f64;
            Some((p50 - elapsed).max(0.0) as u64)
        }
        JobStatus::Pending if job.unworkable => None,
        JobStatus::Pending => {
            let p50 = stats?.p50_ms;
            let position = position? as u64;
            if workers == 0 {
                return None;
            }
            let rounds = position.div_ceil(workers as u64);
            Some(rounds.saturating_mul(p50))
        }
        _ => None,
    }
}

/// How many registered workers serve `service` with a connector that is not offline or in error
/// (one that has not reported yet counts: it is starting).
pub fn workers_serving<'a>(workers: impl IntoIterator<Item = &'a WorkerInfo>, service: &str) -> usize {
    workers
        .into_iter()
        .filter(|w| w.registration.services.iter().any(|s| s == service))
        .filter(|w| {
            w.connectors
                .get(service)
                .is_none_or(|r| !matches!(r.status, ConnectorStatus::Offline | ConnectorStatus::Error))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetq_core::{JobId, JobSpec};

    fn job(id: &str, service: &str, priority: i32, created_at: i64) -> JobSummary {
        let mut spec = JobSpec::new(service, serde_json::json!(null));
        spec.priority = priority;
        let mut s = JobSummary::new_pending(JobId(id.into()), &spec, created_at);
        s.status = JobStatus::Pending;
        s
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(durations(std::iter::empty()), None);
        assert_eq!(durations([7].into_iter()), Some(Durations { p50_ms: 7, p90_ms: 7, samples: 1 }));
        let d = durations((1..=10).rev()).unwrap();
        assert_eq!((d.p50_ms, d.p90_ms, d.samples), (5, 9, 10));
        let d = durations((1..=100).map(|x| x * 10)).unwrap();
        assert_eq!((d.p50_ms, d.p90_ms), (500, 900));
    }

    #[test]
    fn window_rolls_and_workflow_falls_back_to_service() {
        let s = DurationStats::default();
        for _ in 0..WINDOW {
            s.record("sim", None, 1000);
        }
        for _ in 0..WINDOW {
            s.record("sim", None, 10);
        }
        assert_eq!(s.estimate("sim", None).unwrap().p90_ms, 10, "old samples rolled out");
        for _ in 0..MIN_WORKFLOW_SAMPLES - 1 {
            s.record("sim", Some("wf"), 500);
        }
        assert_eq!(s.estimate("sim", Some("wf")).unwrap().p50_ms, 10, "too few workflow samples");
        s.record("sim", Some("wf"), 500);
        assert_eq!(s.estimate("sim", Some("wf")).unwrap().p50_ms, 500);
        assert_eq!(s.estimate("other", None), None);
        assert_eq!(s.services().len(), 1);
    }

    #[test]
    fn eta_of_pending_and_running() {
        let stats = Some(Durations { p50_ms: 1000, p90_ms: 2000, samples: 10 });
        let pending = job("a", "sim", 0, 0);
        assert_eq!(eta_ms(&pending, Some(1), stats, 2, 0), Some(1000));
        assert_eq!(eta_ms(&pending, Some(3), stats, 2, 0), Some(2000));
        assert_eq!(eta_ms(&pending, Some(4), stats, 2, 0), Some(2000));
        assert_eq!(eta_ms(&pending, Some(1), stats, 0, 0), None, "nobody serves it");
        assert_eq!(eta_ms(&pending, Some(1), None, 2, 0), None, "no statistics yet");
        let mut unworkable = pending;
        unworkable.unworkable = true;
        assert_eq!(eta_ms(&unworkable, Some(1), stats, 2, 0), None, "nobody may take it");
        let mut running = job("r", "sim", 0, 0);
        running.status = JobStatus::InProgress;
        running.started_at = Some(1000);
        running.progress = 25.0;
        assert_eq!(eta_ms(&running, None, None, 1, 2000), Some(3000), "1 s for 25 % → 3 s left");
        running.progress = 0.0;
        running.status = JobStatus::Assigned;
        assert_eq!(eta_ms(&running, None, stats, 1, 1400), Some(600));
        assert_eq!(eta_ms(&running, None, stats, 1, 9000), Some(0), "over the median");
        running.status = JobStatus::Completed;
        assert_eq!(eta_ms(&running, None, stats, 1, 0), None);
    }

    #[test]
    fn only_workers_with_a_healthy_connector_serve() {
        let worker = |id: &str, status: Option<ConnectorStatus>| {
            let registration: fleetq_core::WorkerRegistration = serde_json::from_value(serde_json::json!({
                "worker_id": id, "machine_id": "m", "services": ["comfyui"]
            }))
            .unwrap();
            let mut info = WorkerInfo {
                registration,
                registered_at: 0,
                last_seen: 0,
                connectors: Default::default(),
                completed: 0,
            };
            if let Some(status) = status {
                let report = fleetq_core::ConnectorReport {
                    service: "comfyui".into(),
                    status,
                    message: None,
                    at: 0,
                    info: None,
                };
                info.connectors.insert("comfyui".into(), report);
            }
            info
        };
        let fleet = [
            worker("new", None),
            worker("idle", Some(ConnectorStatus::Idle)),
            worker("busy", Some(ConnectorStatus::Active)),
            worker("down", Some(ConnectorStatus::Offline)),
            worker("broken", Some(ConnectorStatus::Error)),
        ];
        assert_eq!(workers_serving(fleet.iter(), "comfyui"), 3);
        assert_eq!(workers_serving(fleet[3..].iter(), "comfyui"), 0, "no ETA when every connector is down");
        assert_eq!(workers_serving(fleet.iter(), "a1111"), 0);
    }
}
