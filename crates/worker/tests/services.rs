//! A1111 and OpenAI jobs end to end: a real broker (embedded and Redis), a real worker, the
//! connectors and their mock services. Waiting is on broker events.

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::Broker;
use fleetq_connectors::a1111::{A1111, A1111Config};
use fleetq_connectors::openai::{OpenAi, OpenAiConfig};
use fleetq_core::{FailureCategory, JobSpec, JobStatus, Outcome};
use fleetq_mocks::a1111::{A1111Mock, A1111MockConfig};
use fleetq_mocks::openai::{Fault, OpenAiMock, OpenAiMockConfig};
use serde_json::json;

mod common;
use common::{Running, finished, start_with, wait_for};

fn worker<B: Broker>(
    b: &Arc<B>,
    service: &str,
    connector: Arc<dyn fleetq_connectors::Connector>,
    max: usize,
) -> Running {
    let mut config = common::config(&format!("{service}-worker"));
    config.registration.services = vec![service.into()];
    config.max_concurrent.insert(service.into(), max);
    start_with(b, config, vec![connector])
}

async fn an_a1111_job_completes_and_cancel_interrupts_it<B: Broker>(b: Arc<B>) {
    let config = A1111MockConfig { step_delay: Duration::from_millis(10), ..A1111MockConfig::default() };
    let mock = A1111Mock::start(config).await.expect("mock");
    let connector =
        A1111::new(A1111Config { url: mock.url(), progress_poll_ms: 20, ..A1111Config::default() })
            .expect("connector");
    let w = worker(&b, "a1111", Arc::new(connector), 1);

    let id = b
        .submit(JobSpec::new("a1111", json!({"prompt": "a cat", "steps": 10, "seed": 7})))
        .await
        .expect("submit")
        .id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed, "{rec:?}");
    let Some(Outcome::Result { value }) = rec.outcome else { panic!("a result") };
    assert_eq!(value["images"][0]["seed"], 7);

    let long =
        b.submit(JobSpec::new("a1111", json!({"prompt": "x", "steps": 100_000}))).await.expect("submit").id;
    wait_for(b.as_ref(), &long, |r| r.summary.status == JobStatus::InProgress).await;
    b.cancel(&long).await.expect("cancel");
    let rec = wait_for(b.as_ref(), &long, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Cancelled);
    assert_eq!(mock.interrupts(), 1, "the cancel reached A1111 as /interrupt");
    w.shutdown().await;
}

async fn openai_jobs_run_concurrently_and_quota_errors_fail_at_once<B: Broker>(b: Arc<B>) {
    let mock = OpenAiMock::start(OpenAiMockConfig::default()).await.expect("mock");
    let connector = OpenAi::new(OpenAiConfig {
        base_url: mock.base_url(),
        api_key: Some("sk-test-key".into()),
        ..OpenAiConfig::default()
    })
    .expect("connector");
    let w = worker(&b, "openai", Arc::new(connector), 4);
    let chat = |text: &str| json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]});
    let ids: Vec<_> = b
        .submit_batch((0..8).map(|i| JobSpec::new("openai", chat(&format!("n{i}")))).collect())
        .await
        .expect("submit")
        .into_iter()
        .map(|s| s.id)
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let rec = wait_for(b.as_ref(), id, finished).await;
        let Some(Outcome::Result { value }) = rec.outcome else { panic!("a result: {rec:?}") };
        assert_eq!(value["content"], format!("You said: n{i}"));
        assert!(value["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0));
    }
    mock.fail_next(Fault::InsufficientQuota);
    let id = b.submit(JobSpec::new("openai", chat("x"))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!((rec.summary.status, rec.summary.attempt), (JobStatus::Failed, 1), "never retried");
    assert_eq!(rec.summary.error.map(|e| e.category), Some(FailureCategory::Service));
    w.shutdown().await;
}

both_backends!(
    an_a1111_job_completes_and_cancel_interrupts_it,
    openai_jobs_run_concurrently_and_quota_errors_fail_at_once
);
