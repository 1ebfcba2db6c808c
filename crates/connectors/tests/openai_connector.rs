//! The OpenAI connector against the mock OpenAI API (docs/services.md §3): streamed chat with usage,
//! retries that honour `retry-after`, `insufficient_quota` and 401 never retried, broken streams,
//! images by `b64_json` and by expiring `url`, cancellation during a retry wait, health.

use std::time::Duration;

use fleetq_connectors::openai::{OpenAi, OpenAiConfig};
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::{ConnectorStatus, FailureCategory};
use fleetq_mocks::openai::{Fault, OpenAiMock, OpenAiMockConfig};
use serde_json::{Value, json};

mod common;
use common::{failure, run};

async fn mock(chunk_ms: u64) -> OpenAiMock {
    let config =
        OpenAiMockConfig { chunk_delay: Duration::from_millis(chunk_ms), ..OpenAiMockConfig::default() };
    OpenAiMock::start(config).await.expect("mock")
}

fn connector(mock: &OpenAiMock, key: &str, artifacts: Option<&std::path::Path>) -> OpenAi {
    OpenAi::new(OpenAiConfig {
        base_url: mock.base_url(),
        api_key: Some(key.into()),
        artifacts_dir: artifacts.map(std::path::Path::to_path_buf),
        ..OpenAiConfig::default()
    })
    .expect("connector")
}

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]})
}

#[tokio::test]
async fn a_streamed_chat_returns_the_text_and_usage_and_reports_tokens() {
    let mock = mock(15).await;
    let c = connector(&mock, "sk-test-key", None);
    let (out, progress) = run(&c, chat("one two three four five six seven eight nine ten")).await;
    let out = out.expect("success");
    assert_eq!(out["content"], "You said: one two three four five six seven eight nine ten");
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["usage"]["completion_tokens"], 12);
    assert_eq!(out["model"], "gpt-4o-mini-2024-07-18");
    // The connector asked for a stream with usage.
    let (_, sent, _) = &mock.requests()[0];
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The stream lasts > 26 × 15 ms, so the 250 ms throttle lets token progress through.
    assert!(progress.iter().any(|p| p.1.as_deref().is_some_and(|m| m.ends_with(" tokens"))), "{progress:?}");
}

#[tokio::test]
async fn a_non_streamed_chat_and_max_tokens() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    let mut payload = chat("a b c d");
    payload["stream"] = json!(false);
    payload["max_tokens"] = json!(3);
    let out = run(&c, payload).await.0.expect("success");
    assert_eq!(out["content"], "You said: a");
    assert_eq!(out["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn a_rate_limit_waits_as_asked_then_succeeds() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    mock.fail_next(Fault::RateLimit(vec![("retry-after-ms".into(), "150".into())]));
    let out = run(&c, chat("hi")).await.0.expect("success after the retry");
    assert_eq!(out["content"], "You said: hi");
    let arrivals: Vec<u64> = mock.requests().iter().map(|r| r.2).collect();
    assert_eq!(arrivals.len(), 2);
    assert!(arrivals[1] - arrivals[0] >= 150, "waited retry-after-ms: {arrivals:?}");
}

#[tokio::test]
async fn insufficient_quota_and_a_bad_key_are_never_retried() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    mock.fail_next(Fault::InsufficientQuota);
    let e = failure(run(&c, chat("hi")).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, false));
    assert!(e.message.contains("insufficient_quota"), "{}", e.message);
    assert_eq!(mock.requests().len(), 1);

    let bad = connector(&mock, "sk-wrong-key-123", None);
    let e = failure(run(&bad, chat("hi")).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, false));
    assert!(e.message.contains("Incorrect API key provided: sk-…123"), "{}", e.message);
    let h = bad.health().await;
    assert_eq!(h.status, ConnectorStatus::Error);
    assert!(h.message.is_some_and(|m| m.contains("API key")));
}

#[tokio::test]
async fn server_errors_are_retried_up_to_the_limit() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    mock.fail_next(Fault::ServerError);
    mock.fail_next(Fault::Unavailable);
    assert!(run(&c, chat("hi")).await.0.is_ok(), "2 failures then success within 2 retries");
    assert_eq!(mock.requests().len(), 3);
    for _ in 0..3 {
        mock.fail_next(Fault::Unavailable);
    }
    let e = failure(run(&c, chat("hi")).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, true));
    assert!(e.message.contains("503"), "{}", e.message);
    assert_eq!(mock.requests().len(), 6);
}

#[tokio::test]
async fn a_stream_that_errors_or_drops_is_a_retryable_failure() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    mock.fail_next(Fault::StreamError);
    let e = failure(run(&c, chat("one two three")).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, true));
    assert!(e.message.contains("server_error"), "{}", e.message);
    mock.fail_next(Fault::StreamDrop);
    let e = failure(run(&c, chat("one two three")).await.0);
    assert!(e.retryable && e.message.contains("without [DONE]"), "{e:?}");
}

#[tokio::test]
async fn images_by_b64_and_by_url_become_artifacts() {
    let mock = mock(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = connector(&mock, "sk-test-key", Some(dir.path()));
    let out = run(&c, json!({"model": "gpt-image-1", "prompt": "a fox", "n": 2})).await.0.expect("b64");
    assert_eq!(out["images"].as_array().map(Vec::len), Some(2));
    assert_eq!(out["usage"]["total_tokens"], 100);
    let file = dir.path().join(out["images"][1]["artifact"].as_str().expect("artifact"));
    assert_eq!(&std::fs::read(file).expect("written")[..4], b"\x89PNG");

    let out = run(&c, json!({"model": "dall-e-3", "prompt": "a fox", "response_format": "url"}))
        .await
        .0
        .expect("url");
    let image = &out["images"][0];
    assert!(image["revised_prompt"].as_str().is_some_and(|p| p.contains("a fox")));
    let file = dir.path().join(image["artifact"].as_str().expect("downloaded"));
    assert_eq!(&std::fs::read(file).expect("written")[..4], b"\x89PNG");

    let e = failure(run(&c, json!({"model": "dall-e-3", "prompt": "something forbidden"})).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Validation, false));
    assert!(e.message.contains("content_policy_violation"), "{}", e.message);
    let e = failure(run(&c, json!({"model": "nope", "prompt": "x"})).await.0);
    assert!(e.message.contains("model_not_found"), "{}", e.message);
}

#[tokio::test]
async fn cancel_stops_a_retry_wait() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    mock.fail_next(Fault::RateLimit(vec![("retry-after".into(), "60".into())]));
    let cancel = CancellationToken::new();
    let (sink, _rx) = ProgressSink::channel();
    let job = common::job("openai", chat("hi"));
    let work = c.process(&job, sink, cancel.clone());
    tokio::pin!(work);
    // Wait until the first (rate-limited) request has been answered, then cancel.
    loop {
        tokio::select! {
            r = &mut work => panic!("finished during a 60 s wait: {r:?}"),
            () = tokio::time::sleep(Duration::from_millis(5)) => if !mock.requests().is_empty() { break },
        }
    }
    cancel.cancel();
    let e = tokio::time::timeout(Duration::from_secs(10), work).await.expect("returned without the wait");
    assert_eq!(failure(e).category, FailureCategory::Cancelled);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn health_lists_models_and_rate_limits() {
    let mock = mock(0).await;
    let c = connector(&mock, "sk-test-key", None);
    let h = c.health().await;
    assert_eq!(h.status, ConnectorStatus::Idle);
    let info = h.info.expect("info");
    assert!(info["models"].as_array().is_some_and(|m| m.contains(&json!("gpt-4o-mini"))));
    assert_eq!(info["rate_limits"]["x-ratelimit-reset-tokens"], "6m0s");
    mock.kill().await;
    assert_eq!(c.health().await.status, ConnectorStatus::Offline);
}

/// A provider whose image URLs point at another host (a "CDN" it names, or one a job chose through
/// a provider that echoes a field), and that host, recording what reached it.
struct ElsewhereImages {
    provider_base: String,
    cdn_hits: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

async fn provider_naming_another_host() -> ElsewhereImages {
    use axum::routing::{get, post};
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let cdn_hits = hits.clone();
    let cdn = axum::Router::new().route(
        "/cdn/img.png",
        get(move |headers: axum::http::HeaderMap| {
            let hits = hits.clone();
            async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                hits.lock().expect("lock").push(auth);
                b"\x89PNG\r\n\x1a\n not really".to_vec()
            }
        }),
    );
    let cdn_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let cdn_url = format!("http://{}/cdn/img.png", cdn_listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(cdn_listener, cdn).await });
    let provider = axum::Router::new().route(
        "/v1/images/generations",
        post(move || {
            let url = cdn_url.clone();
            async move { axum::Json(json!({"created": 1, "data": [{"url": url}]})) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let provider_base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, provider).await });
    ElsewhereImages { provider_base, cdn_hits }
}

/// The API key goes only to the provider's own origin, and a URL the provider names elsewhere is
/// fetched only under the outbound policy: a loopback "CDN" is refused by default (nothing reaches
/// it), and when an admin allows private addresses it is fetched without the key.
#[tokio::test]
async fn the_key_stays_with_the_provider_and_other_hosts_pass_the_outbound_policy() {
    let fake = provider_naming_another_host().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |allow_private: bool| OpenAiConfig {
        base_url: fake.provider_base.clone(),
        api_key: Some("sk-secret-key".into()),
        artifacts_dir: Some(dir.path().to_path_buf()),
        outbound: fleetq_core::outbound::OutboundPolicy {
            allow_private,
            ..fleetq_core::outbound::OutboundPolicy::default()
        },
        ..OpenAiConfig::default()
    };
    let payload = json!({"model": "dall-e-3", "prompt": "a fox", "response_format": "url"});

    let strict = OpenAi::new(config(false)).expect("connector");
    let e = failure(run(&strict, payload.clone()).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Validation, false), "{e:?}");
    assert!(e.message.contains("outbound policy") && e.message.contains("127.0.0.1"), "{}", e.message);
    assert!(fake.cdn_hits.lock().expect("lock").is_empty(), "nothing reached the refused host");

    let open = OpenAi::new(config(true)).expect("connector");
    let out = run(&open, payload).await.0.expect("downloaded");
    assert!(out["images"][0]["artifact"].is_string(), "{out}");
    assert_eq!(*fake.cdn_hits.lock().expect("lock"), vec![None], "fetched once, and without the key");
}
