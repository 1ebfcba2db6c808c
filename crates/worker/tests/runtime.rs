//! The worker runtime end to end through a real broker (embedded and Redis) with the simulation
//! connector. Waiting is on broker events; the generous bounds only turn a hang into a failure.

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::RedisServer;
use fleetq_broker::{Broker, BrokerConfig};
use fleetq_broker::{Queue, Read};
use fleetq_connectors::simulation::{Simulation, SimulationConfig};
use fleetq_core::{EventKind, FailureCategory, JobId, JobSpec, JobStatus};
use fleetq_worker::WorkerConfig;
use serde_json::{Value, json};

mod common;
use common::{Running, config, events_of, finished, start_with, wait_for};

fn start<B: Broker>(broker: &Arc<B>, config: WorkerConfig, sim: Arc<Simulation>) -> Running {
    start_with(broker, config, vec![sim])
}

fn sim() -> Arc<Simulation> {
    Arc::new(Simulation::new(SimulationConfig { step_ms: 5, steps: 4, ..SimulationConfig::default() }))
}

fn job(payload: Value) -> JobSpec {
    JobSpec::new("simulation", payload)
}

async fn completes_jobs_with_progress<B: Broker>(b: Arc<B>) {
    let w = start(&b, config("w1"), sim());
    let ids: Vec<JobId> = b
        .submit_batch((0..3).map(|i| job(json!({"note": i}))).collect())
        .await
        .expect("submit")
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in &ids {
        let rec = wait_for(b.as_ref(), id, finished).await;
        assert_eq!(rec.summary.status, JobStatus::Completed);
        assert_eq!(rec.summary.progress, 100.0);
        assert_eq!(rec.summary.worker_id.as_deref(), Some("w1"));
        assert_eq!(
            rec.outcome,
            Some(fleetq_core::Outcome::Result { value: json!({"simulated": true, "steps": 4}) })
        );
        assert!(events_of(b.as_ref(), id).await.iter().any(|k| matches!(k, EventKind::JobProgress { .. })));
    }
    w.shutdown().await;
    assert!(b.workers().await.expect("workers").is_empty(), "deregistered on shutdown");
}

async fn connector_errors_are_typed<B: Broker>(b: Arc<B>) {
    let w = start(&b, config("w1"), sim());
    let id = b.submit(job(json!({"fail": "fatal"}))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Failed);
    assert_eq!(rec.summary.attempt, 1, "a fatal error is not retried");
    assert_eq!(rec.summary.error.map(|e| e.category), Some(FailureCategory::Validation));
    w.shutdown().await;
}

async fn progress_timeout_releases_for_another_attempt<B: Broker>(b: Arc<B>) {
    let w = start(&b, config("w1"), sim());
    let mut spec = job(json!({"hang_at_step": 2, "hang_on_attempt": 1}));
    spec.progress_timeout_ms = Some(300);
    let id = b.submit(spec).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed);
    assert_eq!(rec.summary.attempt, 2);
    let released = events_of(b.as_ref(), &id)
        .await
        .iter()
        .any(|k| matches!(k, EventKind::JobRequeued { reason, .. } if reason == "progress_timeout"));
    assert!(released, "the stuck attempt was released, not failed");
    w.shutdown().await;
}

async fn overall_timeout_fails_the_attempt<B: Broker>(b: Arc<B>) {
    let w = start(&b, config("w1"), sim());
    let mut spec = job(json!({"steps": 100_000, "step_ms": 10}));
    spec.timeout_ms = Some(300);
    spec.max_attempts = 1;
    let id = b.submit(spec).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Failed);
    assert_eq!(rec.summary.error.map(|e| e.category), Some(FailureCategory::Timeout));
    w.shutdown().await;
}

async fn cancel_reaches_the_connector<B: Broker>(b: Arc<B>) {
    let w = start(&b, config("w1"), sim());
    let id = b.submit(job(json!({"steps": 100_000, "step_ms": 10}))).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.status == JobStatus::InProgress).await;
    b.cancel(&id).await.expect("cancel");
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Cancelled);
    // The worker carries on with the next job.
    let next = b.submit(job(json!({}))).await.expect("submit").id;
    assert_eq!(wait_for(b.as_ref(), &next, finished).await.summary.status, JobStatus::Completed);
    w.shutdown().await;
}

async fn shutdown_gives_the_running_job_back<B: Broker>(b: Arc<B>) {
    let mut c = config("w1");
    c.shutdown_grace = Duration::from_millis(100);
    let w = start(&b, c, sim());
    let id = b.submit(job(json!({"steps": 100_000, "step_ms": 10}))).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.status == JobStatus::InProgress).await;
    w.shutdown().await;
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Pending, "released, not failed");
    assert_eq!(rec.summary.attempt, 0, "the interrupted attempt is not counted");
    // The queue carries on with another worker.
    b.cancel(&id).await.expect("cancel the long job");
    let w2 = start(&b, config("w2"), sim());
    let short = b.submit(job(json!({}))).await.expect("submit").id;
    assert_eq!(wait_for(b.as_ref(), &short, finished).await.summary.worker_id.as_deref(), Some("w2"));
    w2.shutdown().await;
}

both_backends!(
    completes_jobs_with_progress,
    connector_errors_are_typed,
    progress_timeout_releases_for_another_attempt,
    overall_timeout_fails_the_attempt,
    cancel_reaches_the_connector,
    shutdown_gives_the_running_job_back,
    an_offline_connector_stops_claiming,
    a_connector_runs_up_to_its_concurrency_limit,
    a_connector_that_cannot_be_built_is_registered_offline,
    activity_is_reported_at_once,
);

/// The statuses reported for `worker`'s `simulation` connector, in order, waiting (on events, up
/// to 60 s) until `until` is among them.
async fn statuses_until<B: Broker>(
    b: &B,
    worker: &str,
    after: &mut u64,
    until: fleetq_core::ConnectorStatus,
) -> Vec<fleetq_core::ConnectorStatus> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.contains(&until) {
        if tokio::time::Instant::now() >= give_up {
            let all: Vec<String> = b
                .events_after(0, 1000, Duration::ZERO)
                .await
                .expect("events")
                .iter()
                .map(|e| format!("{}:{}", e.seq, e.kind.name()))
                .collect();
            panic!("never reported {until:?}: {seen:?}; after {after}; log {all:?}");
        }
        for e in b.events_after(*after, 1000, Duration::from_millis(500)).await.expect("events") {
            *after = e.seq;
            if let EventKind::ConnectorStatus { worker_id, report } = &e.kind
                && worker_id == worker
            {
                seen.push(report.status);
            }
        }
    }
    seen
}

/// A job starting makes the connector `active` and its end `idle` again at once: the health check
/// runs every 120 s here, longer than the 60 s the test waits, so only the immediate reports can
/// pass it.
async fn activity_is_reported_at_once<B: Broker>(b: Arc<B>) {
    use fleetq_core::ConnectorStatus::{Active, Idle};
    let mut c = config("w1");
    c.health_every = Duration::from_secs(120);
    let w = start(&b, c, sim());
    let mut after = 0;
    statuses_until(b.as_ref(), "w1", &mut after, Idle).await;
    let id = b.submit(job(json!({"steps": 100_000, "step_ms": 10}))).await.expect("submit").id;
    assert_eq!(statuses_until(b.as_ref(), "w1", &mut after, Active).await, vec![Active]);
    b.cancel(&id).await.expect("cancel");
    assert_eq!(wait_for(b.as_ref(), &id, finished).await.summary.status, JobStatus::Cancelled);
    assert_eq!(statuses_until(b.as_ref(), "w1", &mut after, Idle).await, vec![Idle]);
    w.shutdown().await;
}

/// `max_concurrent_jobs = 3`: three jobs run at once on one worker, never a fourth.
async fn a_connector_runs_up_to_its_concurrency_limit<B: Broker>(b: Arc<B>) {
    let mut c = config("w1");
    c.max_concurrent.insert("simulation".into(), 3);
    // Three jobs that hang until cancelled go first, then three short ones.
    let mut hanging = Vec::new();
    for _ in 0..3 {
        let mut spec = job(json!({"hang_at_step": 1}));
        spec.priority = 10;
        hanging.push(b.submit(spec).await.expect("submit").id);
    }
    let short: Vec<JobId> = b
        .submit_batch((0..3).map(|_| job(json!({"steps": 2}))).collect())
        .await
        .expect("submit")
        .into_iter()
        .map(|s| s.id)
        .collect();
    let w = start(&b, c, sim());
    for id in &hanging {
        wait_for(b.as_ref(), id, |r| matches!(r.summary.status, JobStatus::Assigned | JobStatus::InProgress))
            .await;
    }
    for id in &short {
        let rec = b.job(id).await.expect("get").expect("exists");
        assert_eq!(rec.summary.status, JobStatus::Pending, "no slot for a fourth job");
    }
    for id in &hanging {
        b.cancel(id).await.expect("cancel");
    }
    for id in hanging.iter().chain(&short) {
        wait_for(b.as_ref(), id, finished).await;
    }
    // Replay the event log: the most jobs in progress at once on w1.
    let (mut now, mut most) = (0i32, 0i32);
    for e in b.events_after(0, 10_000, Duration::ZERO).await.expect("events") {
        match e.kind {
            EventKind::JobClaimed { .. } => now += 1,
            EventKind::JobCompleted { .. }
            | EventKind::JobFailed { .. }
            | EventKind::JobCancelled { .. }
            | EventKind::JobRequeued { .. } => now -= 1,
            _ => {}
        }
        most = most.max(now);
    }
    assert_eq!(most, 3);
    w.shutdown().await;
}

/// A configured connector that cannot run is registered and reported `offline` with the reason,
/// after `starting`; the worker serves its other connectors.
async fn a_connector_that_cannot_be_built_is_registered_offline<B: Broker>(b: Arc<B>) {
    let broken: Arc<dyn fleetq_connectors::Connector> =
        Arc::new(fleetq_connectors::spec::Unavailable::new("comfyui", "unknown connector type \"comfy\""));
    let w = common::start_with(&b, config("w1"), vec![sim(), broken]);
    let id = b.submit(job(json!({}))).await.expect("submit").id;
    assert_eq!(wait_for(b.as_ref(), &id, finished).await.summary.status, JobStatus::Completed);
    let reports: Vec<(String, fleetq_core::ConnectorStatus, Option<String>)> = b
        .events_after(0, 10_000, Duration::ZERO)
        .await
        .expect("events")
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ConnectorStatus { report, .. } => {
                Some((report.service, report.status, report.message))
            }
            _ => None,
        })
        .filter(|r| r.0 == "comfyui")
        .collect();
    assert_eq!(
        reports,
        vec![
            ("comfyui".into(), fleetq_core::ConnectorStatus::Starting, None),
            (
                "comfyui".into(),
                fleetq_core::ConnectorStatus::Offline,
                Some("unknown connector type \"comfy\"".into())
            ),
        ]
    );
    let worker = b.workers().await.expect("workers").remove(0);
    assert_eq!(worker.connectors["comfyui"].status, fleetq_core::ConnectorStatus::Offline);
    assert!(matches!(
        worker.connectors["simulation"].status,
        fleetq_core::ConnectorStatus::Idle | fleetq_core::ConnectorStatus::Active
    ));
    w.shutdown().await;
}

#[tokio::test]
async fn a_zero_concurrency_limit_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Arc::new(
        fleetq_broker::embedded::EmbeddedBroker::open(dir.path().join("w.db"), BrokerConfig::default())
            .expect("open"),
    );
    let mut c = config("w1");
    c.max_concurrent.insert("simulation".into(), 0);
    let sim: Arc<dyn fleetq_connectors::Connector> = sim();
    let err = fleetq_worker::Worker::new(b, vec![sim], c).err().map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("max_concurrent_jobs")));
}

/// Renewals alone keep a quiet job's lease: 600 ms leases, 1.5 s between progress reports, and an
/// idle second worker whose claims reap any lease that lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_a_quiet_job() {
    let server = RedisServer::shared();
    let short = BrokerConfig { lease_ms: 600, ..BrokerConfig::default() };
    let b = Arc::new(RedisBroker::connect(&server.url, "w-quiet", short).await.expect("connect"));
    let w = start(&b, config("w1"), sim());
    let idle = start(&b, config("w2"), sim());
    let id = b.submit(job(json!({"steps": 2, "step_ms": 1500}))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!((rec.summary.status, rec.summary.attempt), (JobStatus::Completed, 1));
    let requeued =
        events_of(b.as_ref(), &id).await.iter().any(|k| matches!(k, EventKind::JobRequeued { .. }));
    assert!(!requeued, "the lease never lapsed");
    w.shutdown().await;
    idle.shutdown().await;
}

/// A Redis restart in the middle of a job (with persistence) loses nothing: the worker rides out
/// the outage and the job completes once, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_job_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = RedisServer::free_port().expect("port");
    let first = RedisServer::start_persistent(port, dir.path()).expect(fleetq_broker::testing::MISSING_REDIS);
    let b = Arc::new(
        RedisBroker::connect(&first.url, "restart", BrokerConfig::default()).await.expect("connect"),
    );
    let w = start(&b, config("w1"), sim());
    let id = b.submit(job(json!({"steps": 40, "step_ms": 25}))).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.status == JobStatus::InProgress).await;
    first.shutdown().expect("stop redis");
    // Stay down past the job's end (40 × 25 ms): the result is delivered after the restart. (The
    // client's reconnect loop already holds requests through short outages; the worker's own
    // retry of the attempt's end covers longer ones and is not isolated by this test.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _second = RedisServer::start_persistent(port, dir.path()).expect("restart redis");
    // The test's own calls may fail while the connection comes back; only the outcome matters.
    let mut rec = None;
    for _ in 0..600 {
        match b.job(&id).await {
            Ok(Some(r)) if r.summary.status.is_terminal() => {
                rec = Some(r);
                break;
            }
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let rec = rec.expect("the job finished after the restart");
    assert_eq!((rec.summary.status, rec.summary.attempt), (JobStatus::Completed, 1));
    let completions = events_of(b.as_ref(), &id)
        .await
        .iter()
        .filter(|k| matches!(k, EventKind::JobCompleted { .. }))
        .count();
    assert_eq!(completions, 1);
    w.shutdown().await;
}

/// A worker whose connector is down does not claim for its service (the job waits for a healthy
/// worker instead of failing in a loop), and claims again once the connector recovers.
async fn an_offline_connector_stops_claiming<B: Broker>(b: Arc<B>) {
    let down = sim();
    down.set_healthy(false);
    let a = start(&b, config("a-down"), down.clone());
    // Wait until A has reported its connector offline.
    let mut after = 0;
    let mut seen_offline = false;
    for _ in 0..120 {
        for e in b.events_after(after, 1000, Duration::from_millis(500)).await.expect("events") {
            after = e.seq;
            if let EventKind::ConnectorStatus { worker_id, report } = &e.kind {
                seen_offline |=
                    worker_id == "a-down" && report.status == fleetq_core::ConnectorStatus::Offline;
            }
        }
        if seen_offline {
            break;
        }
    }
    assert!(seen_offline, "the outage was reported");
    // A worker whose every service is down advertises none: a job only it could serve is unworkable.
    for _ in 0..120 {
        let me =
            b.workers().await.expect("workers").into_iter().find(|w| w.registration.worker_id == "a-down");
        if me.is_some_and(|w| w.registration.services.is_empty()) {
            break;
        }
        b.events_after(after, 1000, Duration::from_millis(500)).await.expect("events");
    }
    let id = b.submit(job(json!({}))).await.expect("submit").id;
    let a_down =
        b.workers().await.expect("workers").into_iter().find(|w| w.registration.worker_id == "a-down");
    assert_eq!(a_down.map(|w| w.registration.services), Some(vec![]), "A advertises no service");
    assert!(b.job(&id).await.expect("get").expect("exists").summary.unworkable, "nobody can serve it");
    let healthy = start(&b, config("b-up"), sim());
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(
        (rec.summary.worker_id.as_deref(), rec.summary.attempt),
        (Some("b-up"), 1),
        "A never tried it"
    );
    healthy.shutdown().await;
    // Recovery: A claims again.
    down.set_healthy(true);
    let next = b.submit(job(json!({}))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &next, finished).await;
    assert_eq!(
        (rec.summary.status, rec.summary.worker_id.as_deref()),
        (JobStatus::Completed, Some("a-down"))
    );
    a.shutdown().await;
}
