//! The ComfyUI connector against the mock ComfyUI (which replays the real server's message orders):
//! normal run, cached race, validation errors (400 and partial 200), runtime errors, cancellation,
//! a dropped socket, and health.

use std::time::Duration;

use fleetq_connectors::comfyui::{ComfyUi, ComfyUiConfig};
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::{ConnectorStatus, FailureCategory};
use fleetq_mocks::comfyui::{ComfyMock, ComfyMockConfig};
use serde_json::{Value, json};

mod common;

fn workflow(steps: u32, step_seconds: f64, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3_368_601}},
        "2": {"class_type": "ProbeSleepProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_seconds": step_seconds, "send_preview": false, "send_text": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

fn connector(mock: &ComfyMock, artifacts: Option<&std::path::Path>) -> ComfyUi {
    let config = ComfyUiConfig {
        url: mock.url(),
        poll_ms: 200,
        artifacts_dir: artifacts.map(std::path::Path::to_path_buf),
        ..ComfyUiConfig::default()
    };
    ComfyUi::new(config).expect("connector")
}

async fn run(c: &ComfyUi, payload: Value) -> (Result<Value, fleetq_connectors::JobError>, Vec<f64>) {
    let (out, seen) = common::run(c, payload).await;
    (out, seen.into_iter().map(|p| p.0).collect())
}

#[tokio::test]
async fn a_workflow_reports_progress_and_returns_its_outputs() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let dir = tempfile::tempdir().expect("tempdir");
    let c = connector(&mock, Some(dir.path()));
    let (out, progress) = run(&c, workflow(4, 0.01, "normal")).await;
    let out = out.expect("success");
    assert_eq!(out["completion"], "websocket");
    let image = &out["outputs"]["3"]["images"][0];
    assert_eq!(image["filename"], "normal_00001_.png");
    assert_eq!(image["type"], "output");
    assert!(image["url"].as_str().expect("url").contains("/view?filename=normal_00001_.png"));
    let file = dir.path().join(image["artifact"].as_str().expect("artifact"));
    assert_eq!(&std::fs::read(file).expect("artifact written")[..4], b"\x89PNG");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {progress:?}");
    assert!(progress.iter().any(|p| *p > 30.0 && *p < 100.0), "intermediate progress reported: {progress:?}");
    // The prompt went out with our socket's clientId and our prompt_id.
    let posted = &mock.prompts()[0];
    assert!(posted["prompt_id"].is_string() && posted["client_id"].is_string());
}

#[tokio::test]
async fn a_prompt_finished_before_the_reply_is_read_completes_through_the_history_check() {
    let config = ComfyMockConfig { reply_after_done: true, ..ComfyMockConfig::default() };
    let mock = ComfyMock::start(config).await.expect("mock");
    let c = connector(&mock, None);
    let (first, _) = run(&c, workflow(1, 0.0, "cached")).await;
    let (again, _) = run(&c, workflow(1, 0.0, "cached")).await;
    let (first, again) = (first.expect("first run"), again.expect("cached run"));
    assert_eq!(first["completion"], "history_check");
    assert_eq!(again["completion"], "history_check");
    // A cached re-run reports the first run's file.
    assert_eq!(again["outputs"]["3"]["images"][0]["filename"], "cached_00001_.png");
}

#[tokio::test]
async fn validation_errors_are_fatal_and_name_the_node_and_input() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let c = connector(&mock, None);
    let mut bad = workflow(1, 0.0, "bad");
    bad["1"]["inputs"]["width"] = json!(-5);
    let (out, _) = run(&c, bad).await;
    let e = out.expect_err("400");
    assert!(!e.retryable);
    assert_eq!(e.category, FailureCategory::Validation);
    assert!(
        e.message.contains("node 1 (EmptyImage) input 'width': Value -5 smaller than min of 1"),
        "{}",
        e.message
    );

    // Partially valid (200 with node_errors): refused too, and the queued rest is removed.
    let mut partial = workflow(50, 0.01, "ok");
    partial["5"] = json!({"class_type": "LoadImage", "inputs": {"image": "nope.png"}});
    partial["6"] = json!({"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}});
    let (out, _) = run(&c, partial).await;
    let e = out.expect_err("partial");
    assert!(!e.retryable);
    assert!(e.message.contains("node 5 (LoadImage) input 'image'"), "{}", e.message);
    assert!(
        mock.interrupts().iter().any(|i| i["prompt_id"].is_string()),
        "the queued remainder was interrupted"
    );

    let (out, _) = run(&c, json!({"nodes": [], "links": []})).await;
    assert_eq!(out.expect_err("ui format").category, FailureCategory::Validation);
}

#[tokio::test]
async fn runtime_errors_name_the_node_and_oom_is_retryable() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let c = connector(&mock, None);
    let mut raising = workflow(1, 0.0, "raise");
    raising["4"] =
        json!({"class_type": "ProbeRaise", "inputs": {"image": ["2", 0], "message": "probe failure"}});
    raising["3"]["inputs"]["images"] = json!(["4", 0]);
    let e = run(&c, raising).await.0.expect_err("raises");
    assert!(!e.retryable);
    assert_eq!(e.message, "node 4 (ProbeRaise) raised ValueError: probe failure");

    let mut oom = workflow(1, 0.0, "oom");
    oom["1"]["inputs"] = json!({"width": 16384, "height": 16384, "batch_size": 4096, "color": 0});
    let e = run(&c, oom).await.0.expect_err("oom");
    assert!(e.retryable);
    assert_eq!(e.category, FailureCategory::Oom);
}

#[tokio::test]
async fn cancellation_interrupts_the_prompt_on_the_service() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let c = connector(&mock, None);
    let (sink, mut rx) = ProgressSink::channel();
    let cancel = CancellationToken::new();
    let job = common::job("comfyui", workflow(1000, 0.01, "long"));
    let work = c.process(&job, sink, cancel.clone());
    let watcher = async {
        // Cancel once the node reports its first step.
        while let Some((p, _)) = rx.recv().await {
            if p > 0.0 && p < 100.0 && mock.is_busy() {
                cancel.cancel();
                break;
            }
        }
    };
    let (out, ()) = tokio::join!(work, watcher);
    let e = out.expect_err("cancelled");
    assert_eq!(e.category, FailureCategory::Cancelled);
    assert!(!mock.is_busy(), "the connector returned only once ComfyUI had stopped the prompt");
    let posted = mock.prompts()[0]["prompt_id"].clone();
    assert!(mock.interrupts().iter().any(|i| i["prompt_id"] == posted), "{:?}", mock.interrupts());
}

/// ComfyUI checks for an interrupt only between nodes and inside samplers: one that arrives
/// during the last node (here a slow SaveImage) lands too late and the prompt succeeds. The
/// connector waits for that end and returns the outputs, marked `after_interrupt`.
#[tokio::test]
async fn an_interrupt_that_lands_too_late_returns_the_outputs() {
    let config = ComfyMockConfig { node_delay: Duration::from_millis(300), ..ComfyMockConfig::default() };
    let mock = ComfyMock::start(config).await.expect("mock");
    let c = connector(&mock, None);
    let (sink, mut rx) = ProgressSink::channel();
    let cancel = CancellationToken::new();
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "late"}}
    });
    let job = common::job("comfyui", wf);
    let work = c.process(&job, sink, cancel.clone());
    let watcher = async {
        while let Some((_, message)) = rx.recv().await {
            if message.as_deref() == Some("node 3") {
                cancel.cancel();
                break;
            }
        }
    };
    let (out, ()) = tokio::join!(work, watcher);
    let out = out.expect("the prompt succeeded despite the interrupt");
    assert!(!mock.is_busy(), "returned only once ComfyUI had ended the prompt");
    assert_eq!(out["completion"], "after_interrupt");
    assert_eq!(out["outputs"]["3"]["images"][0]["filename"], "late_00001_.png");
    let posted = mock.prompts()[0]["prompt_id"].clone();
    assert!(mock.interrupts().iter().all(|i| i["prompt_id"] == posted), "{:?}", mock.interrupts());
}

#[tokio::test]
async fn a_dropped_socket_is_reconnected_and_the_job_still_completes() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let c = connector(&mock, None);
    let (sink, mut rx) = ProgressSink::channel();
    let job = common::job("comfyui", workflow(30, 0.01, "blip"));
    let work = c.process(&job, sink, CancellationToken::new());
    let blip = async {
        while let Some((p, _)) = rx.recv().await {
            if p > 40.0 {
                mock.drop_sockets();
                break;
            }
        }
        while rx.recv().await.is_some() {}
    };
    let (out, ()) = tokio::join!(work, blip);
    let out = out.expect("completes");
    assert!(matches!(out["completion"].as_str(), Some("reconnect" | "history_poll" | "websocket")), "{out}");
    assert_eq!(out["outputs"]["3"]["images"][0]["filename"], "blip_00001_.png");
}

#[tokio::test]
async fn health_follows_the_service() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let c = connector(&mock, None);
    assert_eq!(c.health().await.status, ConnectorStatus::Idle);
    mock.stop().await;
    let h = c.health().await;
    assert_eq!(h.status, ConnectorStatus::Offline);
    assert!(h.message.expect("reason").contains("refused"));
}

/// ComfyUI restarted under a running prompt (a fresh process: empty queue and history) is the
/// service going away, not the job failing: the error is `Connection`, so the worker gives the
/// job back without spending an attempt.
#[tokio::test]
async fn a_service_restarted_under_the_prompt_is_the_service_going_away() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let addr = mock.addr();
    let c = connector(&mock, None);
    let restart = async {
        for _ in 0..200 {
            if !mock.prompts().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        mock.stop().await;
        ComfyMock::start_on(addr, ComfyMockConfig::default()).await.expect("restarted on the same port")
    };
    let ((out, _), _fresh) = tokio::join!(run(&c, workflow(50, 0.1, "restarted")), restart);
    let e = out.expect_err("the prompt is gone");
    assert_eq!(e.category, FailureCategory::Connection, "{e:?}");
    assert!(e.retryable, "{e:?}");
}
