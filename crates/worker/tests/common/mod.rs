//! Helpers shared by the worker's end-to-end tests: running a worker, waiting on broker events,
//! and running one case against both backends.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::Broker;
use fleetq_connectors::{CancellationToken, Connector};
use fleetq_core::{EventKind, JobId, JobRecord, WorkerInfo, WorkerRegistration};
use fleetq_worker::{Worker, WorkerConfig};
use serde_json::json;
use tokio::task::JoinHandle;

/// A worker task and the token that stops it.
pub(crate) struct Running {
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<Result<(), fleetq_worker::WorkerError>>,
}

impl Running {
    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.expect("worker task").expect("worker ran cleanly");
    }
}

/// A test worker configuration: short claim slices and health checks.
pub(crate) fn config(id: &str) -> WorkerConfig {
    let reg: WorkerRegistration = serde_json::from_value(
        json!({"worker_id": id, "machine_id": "test-box", "services": ["simulation"]}),
    )
    .expect("registration");
    let mut c = WorkerConfig::new(reg);
    c.claim_wait = Duration::from_millis(200);
    c.health_every = Duration::from_millis(100);
    c
}

/// Starts a worker over `connectors`.
pub(crate) fn start_with<B: Broker>(
    broker: &Arc<B>,
    config: WorkerConfig,
    connectors: Vec<Arc<dyn Connector>>,
) -> Running {
    let worker = Arc::new(Worker::new(broker.clone(), connectors, config).expect("worker config"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone()));
    Running { stop, task }
}

/// Waits (on events) until the job satisfies `done`.
pub(crate) async fn wait_for<B: Broker>(b: &B, id: &JobId, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let mut after = 0;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rec = b.job(id).await.expect("job query").expect("job exists");
        if done(&rec) {
            return rec;
        }
        assert!(tokio::time::Instant::now() < give_up, "job never reached the expected state: {rec:?}");
        if let Some(last) =
            b.events_after(after, 1000, Duration::from_millis(500)).await.expect("events").last()
        {
            after = last.seq;
        }
    }
}

/// Waits (on events) until worker `id` is registered and satisfies `done`.
pub(crate) async fn wait_worker<B: Broker>(
    b: &B,
    id: &str,
    done: impl Fn(&WorkerInfo) -> bool,
) -> WorkerInfo {
    let mut after = 0;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = b.workers().await.expect("workers").into_iter().find(|w| w.registration.worker_id == id);
        if let Some(w) = found.filter(|w| done(w)) {
            return w;
        }
        assert!(tokio::time::Instant::now() < give_up, "worker {id} never reached the expected state");
        if let Some(last) =
            b.events_after(after, 1000, Duration::from_millis(200)).await.expect("events").last()
        {
            after = last.seq;
        }
    }
}

/// Every event about job `id` so far.
pub(crate) async fn events_of<B: Broker>(b: &B, id: &JobId) -> Vec<EventKind> {
    b.events_after(0, 10_000, Duration::ZERO)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k.job().is_some_and(|j| &j.id == id))
        .collect()
}

/// Whether the job has ended.
pub(crate) fn finished(r: &JobRecord) -> bool {
    r.summary.status.is_terminal()
}

/// Runs each named `async fn(Arc<B>)` once on a fresh embedded store and once on Redis.
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (b, _dir) = fleetq_broker::testing::embedded(fleetq_broker::BrokerConfig::default());
                    super::$case(b).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = fleetq_broker::testing::redis(fleetq_broker::BrokerConfig::default()).await;
                    super::$case(b).await;
                }
            )*
        }
    };
}
