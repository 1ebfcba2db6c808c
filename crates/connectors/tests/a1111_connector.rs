//! The A1111 connector against the mock A1111 (docs/services.md §2): a blocking txt2img with polled
//! progress, images as artifacts with seeds, img2img, error shapes, interrupt on cancel (the
//! partial 200 is never a success), out-of-memory, auth, a server that dies mid-generation, health.

use std::time::Duration;

use fleetq_connectors::a1111::{A1111, A1111Config};
use fleetq_connectors::http::Auth;
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::{ConnectorStatus, FailureCategory};
use fleetq_mocks::a1111::{A1111Mock, A1111MockConfig};
use serde_json::json;

mod common;
use common::{failure, run};

fn connector(mock: &A1111Mock, artifacts: Option<&std::path::Path>) -> A1111 {
    let config = A1111Config {
        url: mock.url(),
        progress_poll_ms: 20,
        artifacts_dir: artifacts.map(std::path::Path::to_path_buf),
        ..A1111Config::default()
    };
    A1111::new(config).expect("connector")
}

async fn mock(step_ms: u64) -> A1111Mock {
    let config = A1111MockConfig { step_delay: Duration::from_millis(step_ms), ..A1111MockConfig::default() };
    A1111Mock::start(config).await.expect("mock")
}

#[tokio::test]
async fn txt2img_polls_progress_and_returns_images_with_seeds() {
    let mock = mock(10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = connector(&mock, Some(dir.path()));
    let payload =
        json!({"prompt": "a cat", "steps": 20, "batch_size": 2, "seed": 1234, "sampler_name": "k_euler_a"});
    let (out, progress) = run(&c, payload).await;
    let out = out.expect("success");
    // The grid comes first; the two images carry their seeds.
    let images = out["images"].as_array().expect("images");
    assert_eq!(images.len(), 3);
    assert_eq!(images[0]["grid"], true);
    assert_eq!((images[1]["seed"].as_i64(), images[2]["seed"].as_i64()), (Some(1234), Some(1235)));
    let file = dir.path().join(images[1]["artifact"].as_str().expect("artifact"));
    assert_eq!(&std::fs::read(file).expect("written")[..4], b"\x89PNG");
    // `info` was a JSON string inside the JSON.
    assert_eq!(out["info"]["sampler_name"], "Euler a");
    assert_eq!(out["info"]["all_seeds"], json!([1234, 1235]));
    // Progress moved through the steps while the call blocked, and never went back.
    let percents: Vec<f64> = progress.iter().map(|p| p.0).collect();
    assert!(percents.iter().any(|p| *p > 10.0 && *p < 99.0), "intermediate progress: {progress:?}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "monotonic: {percents:?}");
    assert!(progress.iter().any(|p| p.1.as_deref().is_some_and(|m| m.starts_with("step "))));
    // The request went out without our `endpoint` key.
    assert!(mock.generations()[0].get("endpoint").is_none());
}

#[tokio::test]
async fn without_an_artifacts_dir_small_images_are_inlined() {
    let mock = mock(0).await;
    let c = connector(&mock, None);
    let (out, _) = run(&c, json!({"prompt": "x", "steps": 2})).await;
    let out = out.expect("success");
    let image = &out["images"][0];
    assert!(image["b64"].as_str().is_some_and(|b| b.starts_with("iVBOR")), "{image}");
}

#[tokio::test]
async fn img2img_is_chosen_by_init_images_and_errors_are_fatal_and_readable() {
    let mock = mock(0).await;
    let c = connector(&mock, None);
    // A1111 only needs the init image to decode (a `data:` prefix is allowed).
    let png = "data:image/png;base64,aGk=";
    let (ok, _) = run(&c, json!({"prompt": "x", "steps": 2, "init_images": [png]})).await;
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(mock.generations().len(), 1);

    for (payload, needle) in [
        (json!({"endpoint": "img2img", "prompt": "x"}), "Init image not found"),
        (json!({"prompt": "x", "sampler_name": "Nope"}), "Sampler not found"),
        (json!({"prompt": "x", "steps": "many"}), "body.steps: value is not a valid integer"),
        (json!({"prompt": "x", "init_images": ["%%%"]}), "Invalid encoded image"),
        (
            json!({"prompt": "x", "override_settings": {"sd_model_checkpoint": "missing"}}),
            "model 'missing' not found",
        ),
        (json!({"endpoint": "upscale"}), "payload.endpoint"),
    ] {
        let e = failure(run(&c, payload.clone()).await.0);
        assert_eq!((e.category, e.retryable), (FailureCategory::Validation, false), "{payload}: {e:?}");
        assert!(e.message.contains(needle), "{payload}: {}", e.message);
    }
}

#[tokio::test]
async fn cancel_interrupts_a1111_and_the_partial_result_is_not_a_success() {
    let mock = mock(20).await;
    let c = connector(&mock, None);
    let (sink, mut rx) = ProgressSink::channel();
    let cancel = CancellationToken::new();
    let job = common::job("a1111", json!({"prompt": "x", "steps": 100}));
    let work = c.process(&job, sink, cancel.clone());
    tokio::pin!(work);
    // Cancel once a sampling step has been seen.
    loop {
        tokio::select! {
            r = &mut work => panic!("finished before cancel: {r:?}"),
            p = rx.recv() => if p.and_then(|p| p.1).is_some_and(|m| m.starts_with("step ")) { break },
        }
    }
    cancel.cancel();
    let e = failure(work.await);
    assert_eq!(e.category, FailureCategory::Cancelled);
    assert_eq!(mock.interrupts(), 1);
    // A1111 stops at its next step and is free again.
    tokio::time::timeout(Duration::from_secs(5), async {
        while mock.is_busy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("A1111 stopped generating");
}

#[tokio::test]
async fn out_of_memory_is_retryable_and_other_runtime_errors_are_service_errors() {
    let mock = mock(0).await;
    let c = connector(&mock, None);
    let e = failure(run(&c, json!({"prompt": "__oom__", "steps": 4})).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Oom, true));
    assert!(e.message.contains("CUDA out of memory"), "{}", e.message);
    let e = failure(run(&c, json!({"prompt": "__crash__", "steps": 4})).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, true));
}

#[tokio::test]
async fn basic_auth_is_sent_and_wrong_credentials_are_fatal() {
    let config = A1111MockConfig { auth: Some(("u".into(), "p".into())), ..A1111MockConfig::default() };
    let mock = A1111Mock::start(config).await.expect("mock");
    let with = |auth: Auth| {
        A1111::new(A1111Config { url: mock.url(), auth, ..A1111Config::default() }).expect("connector")
    };
    let good = with(Auth::Basic { username: "u".into(), password: "p".into() });
    assert!(run(&good, json!({"prompt": "x", "steps": 1})).await.0.is_ok());
    assert_eq!(good.health().await.status, ConnectorStatus::Idle);

    let bad = with(Auth::Basic { username: "u".into(), password: "wrong".into() });
    let e = failure(run(&bad, json!({"prompt": "x", "steps": 1})).await.0);
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, false));
    assert!(e.message.contains("Incorrect username or password"), "{}", e.message);
    assert_eq!(bad.health().await.status, ConnectorStatus::Error);
    let none = with(Auth::None);
    assert!(failure(run(&none, json!({"prompt": "x"})).await.0).message.contains("Not authenticated"));
}

#[tokio::test]
async fn a_server_that_dies_mid_generation_is_service_offline() {
    let mock = mock(20).await;
    let c = connector(&mock, None);
    let (sink, mut rx) = ProgressSink::channel();
    let job = common::job("a1111", json!({"prompt": "x", "steps": 200}));
    let work = c.process(&job, sink, CancellationToken::new());
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => panic!("finished before the crash: {r:?}"),
            p = rx.recv() => if p.and_then(|p| p.1).is_some_and(|m| m.starts_with("step ")) { break },
        }
    }
    mock.kill().await;
    let e = failure(work.await);
    assert_eq!((e.category, e.retryable), (FailureCategory::Connection, true), "{e:?}");
    let h = c.health().await;
    assert_eq!(h.status, ConnectorStatus::Offline);
    assert!(h.message.is_some_and(|m| m.contains("refused")));
}

#[tokio::test]
async fn health_reports_the_checkpoint_and_models() {
    let mock = mock(0).await;
    let c = connector(&mock, None);
    let h = c.health().await;
    assert_eq!(h.status, ConnectorStatus::Idle);
    let info = h.info.expect("service info");
    assert_eq!(info["checkpoint"], "v1-5-pruned-emaonly.safetensors [6ce0161689]");
    assert_eq!(info["models"].as_array().map(Vec::len), Some(2));
}
