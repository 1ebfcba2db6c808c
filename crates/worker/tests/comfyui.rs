//! ComfyUI jobs end to end: a real broker (embedded and Redis), real workers, the ComfyUI connector
//! and the mock ComfyUI. Waiting is on broker events; the bounds only turn a hang into a failure.

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::Broker;
use fleetq_connectors::comfyui::{ComfyUi, ComfyUiConfig};
use fleetq_core::{ConnectorStatus, EventKind, JobSpec, JobStatus, Outcome};
use fleetq_mocks::comfyui::{ComfyMock, ComfyMockConfig};
use fleetq_worker::WorkerConfig;
use serde_json::{Value, json};

mod common;
use common::{Running, events_of, finished, start_with, wait_for, wait_worker};

fn workflow(steps: u32, step_seconds: f64, prefix: &str) -> Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3_368_601}},
        "2": {"class_type": "ProbeSleepProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_seconds": step_seconds, "send_preview": false, "send_text": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    }})
}

fn comfy_worker<B: Broker>(b: &Arc<B>, id: &str, mock: &ComfyMock) -> Running {
    comfy_worker_with(b, id, mock, json!({}))
}

fn comfy_worker_with<B: Broker>(b: &Arc<B>, id: &str, mock: &ComfyMock, capabilities: Value) -> Running {
    let mut config: WorkerConfig = common::config(id);
    config.registration.services = vec!["comfyui".into()];
    config.registration.capabilities = serde_json::from_value(capabilities).expect("capabilities");
    let connector = ComfyUi::new(ComfyUiConfig { url: mock.url(), poll_ms: 200, ..ComfyUiConfig::default() })
        .expect("connector");
    start_with(b, config, vec![Arc::new(connector)])
}

fn result(outcome: Option<Outcome>) -> Value {
    match outcome {
        Some(Outcome::Result { value }) => value,
        other => panic!("expected a result, got {other:?}"),
    }
}

async fn a_comfyui_job_reports_progress_and_outputs<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    let id = b.submit(JobSpec::new("comfyui", workflow(5, 0.02, "e2e"))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed, "{rec:?}");
    let value = result(rec.outcome);
    assert_eq!(value["outputs"]["3"]["images"][0]["filename"], "e2e_00001_.png");
    let progress: Vec<f64> = events_of(b.as_ref(), &id)
        .await
        .into_iter()
        .filter_map(|k| match k {
            EventKind::JobProgress { job } => Some(job.progress),
            _ => None,
        })
        .collect();
    assert!(
        progress.iter().any(|p| *p > 0.0 && *p < 100.0),
        "intermediate progress reached the broker: {progress:?}"
    );
    w.shutdown().await;
}

async fn a_cached_prompt_completes_through_the_history_check<B: Broker>(b: Arc<B>) {
    let config = ComfyMockConfig { reply_after_done: true, ..ComfyMockConfig::default() };
    let mock = ComfyMock::start(config).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    for _ in 0..2 {
        let id = b.submit(JobSpec::new("comfyui", workflow(1, 0.0, "cached"))).await.expect("submit").id;
        let rec = wait_for(b.as_ref(), &id, finished).await;
        assert_eq!(result(rec.outcome)["completion"], "history_check");
    }
    w.shutdown().await;
}

/// The service behind worker A dies mid-job: A's connector goes offline, the job is released (not
/// failed, its only attempt not spent) and worker B, whose ComfyUI is up, completes it.
async fn a_service_that_dies_mid_job_hands_the_job_to_another_worker<B: Broker>(b: Arc<B>) {
    let mock_a = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock a");
    let mock_b = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock b");
    let a = comfy_worker(&b, "gpu-a", &mock_a);
    let mut spec = JobSpec::new("comfyui", workflow(40, 0.05, "dies"));
    spec.max_attempts = 1;
    let id = b.submit(spec).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| {
        r.summary.worker_id.as_deref() == Some("gpu-a") && r.summary.progress > 0.0
    })
    .await;
    let b_worker = comfy_worker(&b, "gpu-b", &mock_b);
    mock_a.stop().await;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!((rec.summary.status, rec.summary.worker_id.as_deref()), (JobStatus::Completed, Some("gpu-b")));
    assert_eq!((rec.summary.attempt, rec.summary.service_crashes), (1, 1), "the crash spent no attempt");
    let events = b.events_after(0, 10_000, Duration::ZERO).await.expect("events");
    assert!(
        events.iter().any(|e| matches!(&e.kind, EventKind::ConnectorStatus { worker_id, report }
            if worker_id == "gpu-a" && report.status == ConnectorStatus::Offline)),
        "A reported its connector offline"
    );
    assert!(
        events_of(b.as_ref(), &id)
            .await
            .iter()
            .any(|k| matches!(k, EventKind::JobRequeued { reason, job } if reason == "service_offline"
                && job.error.as_ref().is_some_and(|e| e.category == fleetq_core::FailureCategory::Connection))),
        "the job was released as service_offline, not failed"
    );
    a.shutdown().await;
    b_worker.shutdown().await;
}

async fn cancel_reaches_comfyui_as_an_interrupt<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    let id = b.submit(JobSpec::new("comfyui", workflow(1000, 0.01, "cancel"))).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.progress > 0.0).await;
    b.cancel(&id).await.expect("cancel");
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Cancelled);
    let prompt_id = mock.prompts()[0]["prompt_id"].clone();
    assert!(
        mock.interrupts().iter().any(|i| i["prompt_id"] == prompt_id),
        "ComfyUI saw /interrupt for the prompt"
    );
    w.shutdown().await;
}

/// A cancel that reaches ComfyUI during its last node lands too late: the prompt succeeds, and
/// the job records that result (cancel requested, completed) instead of dropping real outputs.
async fn a_cancel_that_lands_too_late_keeps_the_outputs<B: Broker>(b: Arc<B>) {
    // Long enough for the poll below to see node 2 running.
    let config = ComfyMockConfig { node_delay: Duration::from_secs(1), ..ComfyMockConfig::default() };
    let mock = ComfyMock::start(config).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    let wf = json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "late"}}
    }});
    let id = b.submit(JobSpec::new("comfyui", wf)).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.message.as_deref() == Some("node 2")).await;
    b.cancel(&id).await.expect("cancel");
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed, "{rec:?}");
    assert!(rec.summary.cancel_requested, "the record says a cancel was asked");
    let value = result(rec.outcome);
    assert_eq!(value["completion"], "after_interrupt");
    assert_eq!(value["outputs"]["2"]["images"][0]["filename"], "late_00001_.png");
    assert_eq!(mock.prompts().len(), 1, "run once");
    w.shutdown().await;
}

/// A node that stops reporting (one 3 s step) trips the progress timeout: the worker interrupts
/// ComfyUI, which can stop the node only when its step ends; then the job is released for another
/// attempt (the GPU is free by then).
async fn a_stuck_prompt_is_released_after_the_progress_timeout<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    let mut spec = JobSpec::new("comfyui", workflow(1, 3.0, "stuck"));
    spec.progress_timeout_ms = Some(700);
    let id = b.submit(spec).await.expect("submit").id;
    // Released, then claimed again: the second attempt has started.
    wait_for(b.as_ref(), &id, |r| r.summary.attempt >= 2).await;
    assert!(!mock.interrupts().is_empty(), "ComfyUI was interrupted");
    let requeued = events_of(b.as_ref(), &id)
        .await
        .iter()
        .any(|k| matches!(k, EventKind::JobRequeued { reason, .. } if reason == "progress_timeout"));
    assert!(requeued, "released with reason progress_timeout");
    b.cancel(&id).await.expect("cancel");
    w.shutdown().await;
}

/// The comfyui connector's report of worker `id`.
fn comfy_report(w: &fleetq_core::WorkerInfo) -> Option<&fleetq_core::ConnectorReport> {
    w.connectors.get("comfyui")
}

/// With a 120 s health interval the connector's status still follows ComfyUI at once: its socket
/// lost with the service reports `offline` (and the worker advertises nothing); the service back
/// reports `idle` without the "websocket reconnecting" note, and the worker serves it again.
async fn connector_status_follows_the_service_without_the_health_timer<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let addr = mock.addr();
    let mut config: WorkerConfig = common::config("gpu0");
    config.health_every = Duration::from_secs(120);
    let connector = ComfyUi::new(ComfyUiConfig { url: mock.url(), poll_ms: 200, ..ComfyUiConfig::default() })
        .expect("connector");
    let w = start_with(&b, config, vec![Arc::new(connector)]);
    let up = |w: &fleetq_core::WorkerInfo| {
        comfy_report(w).is_some_and(|r| r.status == ConnectorStatus::Idle && r.message.is_none())
            && w.registration.services == ["comfyui"]
    };
    wait_worker(b.as_ref(), "gpu0", up).await;
    mock.stop().await;
    wait_worker(b.as_ref(), "gpu0", |w| {
        comfy_report(w).is_some_and(|r| r.status == ConnectorStatus::Offline)
            && w.registration.services.is_empty()
    })
    .await;
    let mock = ComfyMock::start_on(addr, ComfyMockConfig::default()).await.expect("mock again");
    wait_worker(b.as_ref(), "gpu0", up).await;
    let id = b.submit(JobSpec::new("comfyui", workflow(2, 0.01, "back"))).await.expect("submit").id;
    assert_eq!(wait_for(b.as_ref(), &id, finished).await.summary.status, JobStatus::Completed);
    w.shutdown().await;
    drop(mock);
}

/// A workflow whose `EmptyImage` allocates `batch` × 1 GiB.
fn allocating(batch: u64) -> Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": batch, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}
    }})
}

const GIB: u64 = 1 << 30;

/// Out of memory on a 24 GiB worker: ComfyUI's memory is freed and the prompt tried once more
/// there; out of memory again, the job runs next only on a worker with more memory (its
/// requirement raised to 25 GiB), which completes it.
async fn out_of_memory_moves_to_a_worker_with_more<B: Broker>(b: Arc<B>) {
    // Slow enough for the larger worker to register before the small one gives the job up.
    let small_config = ComfyMockConfig {
        memory_limit: 8 * GIB,
        node_delay: Duration::from_millis(500),
        ..ComfyMockConfig::default()
    };
    let small = ComfyMock::start(small_config).await.expect("mock");
    let large = ComfyMock::start(ComfyMockConfig { memory_limit: 64 * GIB, ..ComfyMockConfig::default() })
        .await
        .expect("mock");
    let a = comfy_worker_with(&b, "gpu-24", &small, json!({"hardware": {"gpu_memory_gb": 24}}));
    let id = b.submit(JobSpec::new("comfyui", allocating(16))).await.expect("submit").id;
    wait_for(b.as_ref(), &id, |r| r.summary.worker_id.as_deref() == Some("gpu-24")).await;
    let c = comfy_worker_with(&b, "gpu-48", &large, json!({"hardware": {"gpu_memory_gb": 48}}));
    wait_worker(b.as_ref(), "gpu-48", |w| w.registration.services == ["comfyui"]).await;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(
        (rec.summary.status, rec.summary.worker_id.as_deref()),
        (JobStatus::Completed, Some("gpu-48"))
    );
    assert_eq!(rec.summary.attempt, 2);
    assert_eq!(rec.spec.requirements.positive.get("hardware.gpu_memory_gb"), Some(&json!(25)));
    assert_eq!(small.prompts().len(), 2, "tried once more on the same GPU");
    assert_eq!(
        small.frees(),
        vec![json!({"unload_models": true, "free_memory": true})],
        "after freeing memory"
    );
    assert!(
        events_of(b.as_ref(), &id).await.iter().any(|k| matches!(k, EventKind::JobRequeued { job, .. }
            if job.error.as_ref().is_some_and(|e| e.category == fleetq_core::FailureCategory::Oom))),
        "requeued as oom"
    );
    a.shutdown().await;
    c.shutdown().await;
}

/// An allocation that can never fit (4 TiB on a 24 GiB device, in a fleet whose largest GPU has
/// 48 GiB) is not tried again at all: the job fails at its first attempt, saying why.
async fn an_allocation_that_never_fits_fails_at_once<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let large = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let a = comfy_worker_with(&b, "gpu-24", &mock, json!({"hardware": {"gpu_memory_gb": 24}}));
    let c = comfy_worker_with(&b, "gpu-48", &large, json!({"hardware": {"gpu_memory_gb": 48}}));
    let id = b.submit(JobSpec::new("comfyui", allocating(4096))).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!((rec.summary.status, rec.summary.attempt), (JobStatus::Failed, 1), "{rec:?}");
    let error = rec.summary.error.expect("error");
    assert_eq!((error.category, error.retryable), (fleetq_core::FailureCategory::Oom, false));
    assert!(error.message.contains("cannot fit here"), "{}", error.message);
    assert!(error.message.contains("at least 4096 GiB"), "{}", error.message);
    let tried: usize = mock.prompts().len() + large.prompts().len();
    assert_eq!(tried, 1, "no second try anywhere");
    assert!(
        mock.frees().is_empty() && large.frees().is_empty(),
        "nothing freed for an allocation that cannot fit"
    );
    a.shutdown().await;
    c.shutdown().await;
}

/// A `comfyui` job requiring `models`.
fn needing(models: &[&str]) -> JobSpec {
    let mut spec = JobSpec::new("comfyui", workflow(1, 0.0, "models"));
    spec.requirements =
        fleetq_core::Requirements::parse(&json!({ "models": models }), "requirements").expect("requirements");
    spec
}

/// The worker's `models` for ComfyUI are what ComfyUI reports, every folder (checkpoints, LoRAs,
/// diffusion models…): a job requiring models the service has runs; one requiring a model it
/// lacks is unworkable until the file appears, then runs.
async fn models_come_from_what_the_service_reports<B: Broker>(b: Arc<B>) {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.expect("mock");
    let w = comfy_worker(&b, "gpu0", &mock);
    let has = needing(&["sd_xl_base_1.0.safetensors", "detail-tweaker.safetensors", "flux1-dev.safetensors"]);
    let id = b.submit(has).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed, "{rec:?}");
    let id = b.submit(needing(&["new-style.safetensors"])).await.expect("submit").id;
    let rec = wait_for(b.as_ref(), &id, |r| r.summary.unworkable).await;
    assert_eq!(rec.summary.status, JobStatus::Pending);
    mock.add_model("loras", "new-style.safetensors");
    let rec = wait_for(b.as_ref(), &id, finished).await;
    assert_eq!(rec.summary.status, JobStatus::Completed, "{rec:?}");
    let worker = wait_worker(b.as_ref(), "gpu0", |_| true).await;
    let models = worker.registration.capabilities.lookup("models.comfyui").cloned().unwrap_or_default();
    assert!(!models.to_string().contains("v1-inference.yaml"), "configs are not models: {models}");
    w.shutdown().await;
}

both_backends!(
    out_of_memory_moves_to_a_worker_with_more,
    an_allocation_that_never_fits_fails_at_once,
    models_come_from_what_the_service_reports,
    connector_status_follows_the_service_without_the_health_timer,
    a_comfyui_job_reports_progress_and_outputs,
    a_cached_prompt_completes_through_the_history_check,
    a_service_that_dies_mid_job_hands_the_job_to_another_worker,
    cancel_reaches_comfyui_as_an_interrupt,
    a_cancel_that_lands_too_late_keeps_the_outputs,
    a_stuck_prompt_is_released_after_the_progress_timeout,
);
