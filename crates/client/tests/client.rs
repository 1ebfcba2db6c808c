//! The client against a real API served in-process over the embedded store: every call reads the
//! API's reply as its type, and the event streams resume across a restart of the API.

use std::sync::Arc;
use std::time::Duration;

use fleetq_api::ApiConfig;
use fleetq_api::model::CancelResult;
use fleetq_broker::BrokerConfig;
use fleetq_broker::Queue;
use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::testing;
use fleetq_client::{Client, ClientError, FleetEvent, JobQuery};
use fleetq_core::{EventKind, JobId, JobSpec, JobStatus};
use serde_json::json;

/// Serves the API over `broker` on `addr` (`127.0.0.1:0` for a free port) until the returned
/// config's shutdown fires; returns the bound address.
async fn serve(broker: Arc<EmbeddedBroker>, addr: &str) -> (std::net::SocketAddr, Server) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let at = listener.local_addr().expect("addr");
    let config = ApiConfig::default();
    let stop = config.shutdown.clone();
    let task = tokio::spawn(fleetq_api::serve(listener, broker, config));
    (at, Server { stop, task })
}

/// A served API: stopped (its port closed) by [`Server::stop`], or when the test's runtime ends.
struct Server {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self) {
        self.stop.cancel();
        within(self.task).await.expect("the server task").expect("served");
    }
}

/// A guard against a hang, not a timing assertion.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.expect("no answer within 30 s")
}

#[tokio::test]
async fn every_call_reads_the_api_reply_as_its_type() {
    let (store, _dir) = testing::embedded(BrokerConfig::default());
    let (at, _server) = serve(store, "127.0.0.1:0").await;
    let client = Client::new(&format!("http://{at}")).expect("client");
    within(client.ready()).await.expect("ready");

    let one = client.submit(&JobSpec::new("sim", json!({"n": 1})), Some("key-1")).await.expect("submit");
    assert!(one.created);
    let again = client.submit(&JobSpec::new("sim", json!({"n": 1})), Some("key-1")).await.expect("again");
    assert_eq!((again.id.clone(), again.created), (one.id.clone(), false), "the idempotency key is sent");
    let batch = client
        .submit_batch(&[JobSpec::new("sim", json!({"n": 2})), JobSpec::new("other", json!({"n": 3}))])
        .await
        .expect("batch");
    assert_eq!(batch.jobs.len(), 2);

    let view = client.job(&one.id).await.expect("job");
    assert_eq!(view.record.summary.status, JobStatus::Pending);
    assert_eq!(view.estimate.and_then(|e| e.queue_position), Some(1));

    let q = JobQuery { service: Some("sim".into()), limit: Some(1), ..JobQuery::default() };
    let first = client.jobs(&q).await.expect("page");
    assert_eq!(first.jobs.len(), 1);
    assert!(first.next.is_some(), "a second page");
    let all = client.all_jobs(&q).await.expect("all pages");
    assert_eq!(all.len(), 2, "both sim jobs, across pages");

    let verdicts = client.matching_workers(&one.id).await.expect("verdicts");
    assert!(verdicts.workers.is_empty(), "no worker is registered");
    assert!(client.workers().await.expect("workers").workers.is_empty());
    assert!(client.services().await.expect("services").services.contains_key("sim"));

    let cancelled = client.cancel(&one.id).await.expect("cancel");
    assert!(matches!(cancelled.outcome, CancelResult::Cancelled));
    let retried = client.retry(&one.id).await.expect("retry");
    assert_eq!(retried.status, JobStatus::Pending);

    let missing = client.job(&JobId("no-such-job".into())).await.expect_err("unknown id");
    assert_eq!(missing.status(), Some(404), "{missing}");
    let odd = client.job(&JobId("a/../b?c".into())).await.expect_err("an id needing escapes");
    assert!(matches!(odd, ClientError::Api { .. }), "the id reaches the API as one segment: {odd}");
    let invalid = client.submit(&JobSpec::new("bad name!", json!({})), None).await.expect_err("invalid");
    assert!(
        matches!(&invalid, ClientError::Api { status: 422, field: Some(f), .. } if f == "service"),
        "{invalid}"
    );
}

#[tokio::test]
async fn a_job_stream_starts_with_the_state_and_ends_with_the_outcome() {
    let (store, _dir) = testing::embedded(BrokerConfig::default());
    let (at, _server) = serve(store, "127.0.0.1:0").await;
    let client = Client::new(&format!("http://{at}")).expect("client");
    let job = within(client.submit(&JobSpec::new("sim", json!({})), None)).await.expect("submit");
    let mut events = client.job_events(&job.id);
    let state = within(events.next()).await.expect("first").expect("an update");
    assert_eq!((state.kind.as_str(), state.job.status), ("job_state", JobStatus::Pending));
    assert!(state.event.is_none());
    client.cancel(&job.id).await.expect("cancel");
    let end = within(events.next()).await.expect("end").expect("an update");
    assert_eq!(end.kind, "job_cancelled");
    assert!(end.is_terminal());
    assert!(matches!(end.event.map(|e| e.kind), Some(EventKind::JobCancelled { .. })));
    assert!(within(events.next()).await.expect("after the end").is_none(), "nothing after the end");
}

#[tokio::test]
async fn the_fleet_stream_resumes_across_an_api_restart_without_repeats() {
    let (store, _dir) = testing::embedded(BrokerConfig::default());
    let (at, server) = serve(store.clone(), "127.0.0.1:0").await;
    let client = Client::new(&format!("http://{at}")).expect("client");
    let mut events = client.events(&["jobs"]);
    // The stream starts at the present: open it before the first submission.
    within(events.connect()).await.expect("connect");
    let submitted = [within(client.submit(&JobSpec::new("sim", json!({})), None)).await.expect("submit").id];
    let first = within(events.next()).await;
    let first = match first {
        Ok(FleetEvent::Event { event, .. }) => match *event {
            fleetq_core::Event { seq, kind: EventKind::JobSubmitted { job }, .. } => (seq, job.id),
            other => panic!("a job_submitted event: {other:?}"),
        },
        other => panic!("an event: {other:?}"),
    };
    assert_eq!(first.1, submitted[0]);
    let mut seqs = vec![first.0];
    let mut seen = Vec::new();

    server.stop().await;
    // Written while no API serves: the resumed stream must still deliver it.
    let meanwhile = store.submit(JobSpec::new("sim", json!({"while": "down"}))).await.expect("submit");
    let mut expected: Vec<JobId> = vec![meanwhile.id];
    let (_, _server) = serve(store, &at.to_string()).await;
    let second = within(client.submit(&JobSpec::new("sim", json!({"after": "restart"})), None))
        .await
        .expect("submit after the restart");
    expected.push(second.id.clone());
    loop {
        match within(events.next()).await.expect("the stream resumes") {
            FleetEvent::Event { event, .. } => {
                seqs.push(event.seq);
                if let EventKind::JobSubmitted { job } = &event.kind {
                    seen.push(job.id.clone());
                    if job.id == second.id {
                        break;
                    }
                }
            }
            FleetEvent::Lost | FleetEvent::Resumed { .. } | FleetEvent::WorkersSeen(_) => {}
            FleetEvent::Resync { .. } => panic!("nothing was trimmed"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "each event once, in order: {seqs:?}");
    assert_eq!(seen, expected, "every submission after the first seen, none missed across the restart");
}
