//! The REST connector against a small in-test service: sync calls with a result pointer, async
//! submit → poll → result with progress, remote failures, cancellation reaching the service,
//! status classes and health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use fleetq_connectors::rest::{Rest, RestAsync, RestConfig};
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::{ConnectorStatus, FailureCategory};
use serde_json::{Value, json};

mod common;
use common::run;

#[derive(Default)]
struct Remote {
    /// id → (payload, polls so far)
    jobs: Mutex<HashMap<String, (Value, u32)>>,
    cancelled: Mutex<Vec<String>>,
}

async fn service() -> (String, Arc<Remote>) {
    let remote = Arc::new(Remote::default());
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/run",
            post(|Json(body): Json<Value>| async move {
                match body.get("status").and_then(Value::as_u64) {
                    Some(code) => (
                        StatusCode::from_u16(code as u16).unwrap_or(StatusCode::OK),
                        Json(json!({"error": "as asked"})),
                    ),
                    None => (StatusCode::OK, Json(json!({"output": {"echo": body}}))),
                }
            }),
        )
        .route(
            "/jobs",
            post(|State(r): State<Arc<Remote>>, Json(body): Json<Value>| async move {
                let mut jobs = r.jobs.lock().expect("lock");
                let id = format!("r{}", jobs.len() + 1);
                jobs.insert(id.clone(), (body, 0));
                Json(json!({"id": id}))
            }),
        )
        .route(
            "/jobs/{id}",
            get(|State(r): State<Arc<Remote>>, Path(id): Path<String>| async move {
                let mut jobs = r.jobs.lock().expect("lock");
                let Some((payload, polls)) = jobs.get_mut(&id) else {
                    return (StatusCode::NOT_FOUND, Json(json!({"error": "no such job"})));
                };
                *polls += 1;
                let polls = *polls;
                let hang = payload.get("hang").and_then(Value::as_bool) == Some(true);
                let body = match polls {
                    1 => json!({"state": {"name": "queued"}}),
                    _ if hang => json!({"state": {"name": "running", "pct": 10}}),
                    2 | 3 => json!({"state": {"name": "running", "pct": polls * 30}}),
                    _ if payload.get("fail").is_some() => {
                        json!({"state": {"name": "failed", "why": "out of cheese"}})
                    }
                    _ => json!({"state": {"name": "finished"}}),
                };
                (StatusCode::OK, Json(body))
            }),
        )
        .route(
            "/jobs/{id}/result",
            get(|State(r): State<Arc<Remote>>, Path(id): Path<String>| async move {
                let jobs = r.jobs.lock().expect("lock");
                Json(json!({"data": {"input": jobs.get(&id).map(|j| j.0.clone())}}))
            }),
        )
        .route(
            "/jobs/{id}/cancel",
            post(|State(r): State<Arc<Remote>>, Path(id): Path<String>| async move {
                r.cancelled.lock().expect("lock").push(id);
                Json(json!({}))
            }),
        )
        .with_state(remote.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, remote)
}

fn async_config(url: &str) -> RestConfig {
    RestConfig {
        base_url: url.into(),
        path: "/jobs".into(),
        health_path: Some("/health".into()),
        result_pointer: "/data".into(),
        polling: Some(RestAsync {
            status_pointer: "/state/name".into(),
            done: vec!["finished".into()],
            failed: vec!["failed".into()],
            progress_pointer: Some("/state/pct".into()),
            progress_scale: 100.0,
            error_pointer: "/state/why".into(),
            result_path: Some("/jobs/{id}/result".into()),
            poll_ms: 10,
            cancel_path: Some("/jobs/{id}/cancel".into()),
            ..RestAsync::default()
        }),
        ..RestConfig::default()
    }
}

#[tokio::test]
async fn a_sync_call_returns_the_value_at_the_result_pointer() {
    let (url, _) = service().await;
    let c = Rest::new(RestConfig {
        base_url: url,
        path: "/run".into(),
        result_pointer: "/output/echo".into(),
        ..RestConfig::default()
    })
    .expect("connector");
    let (out, _) = run(&c, json!({"x": 1})).await;
    assert_eq!(out.expect("success"), json!({"x": 1}));
    let e = run(&c, json!({"status": 422})).await.0.expect_err("422");
    assert_eq!((e.category, e.retryable), (FailureCategory::Validation, false));
    assert!(e.message.contains("422") && e.message.contains("as asked"), "{}", e.message);
    let e = run(&c, json!({"status": 503})).await.0.expect_err("503");
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, true));
}

#[tokio::test]
async fn an_async_job_is_polled_to_its_result_with_progress() {
    let (url, _) = service().await;
    let c = Rest::new(async_config(&url)).expect("connector");
    let (out, progress) = run(&c, json!({"prompt": "x"})).await;
    assert_eq!(out.expect("success"), json!({"input": {"prompt": "x"}}));
    let seen: Vec<(f64, String)> = progress.into_iter().map(|(p, m)| (p, m.unwrap_or_default())).collect();
    assert_eq!(
        seen,
        vec![
            (0.0, "remote status queued".into()),
            (60.0, "remote status running".into()),
            (90.0, "remote status running".into())
        ]
    );
}

#[tokio::test]
async fn a_remote_failure_is_reported_with_its_reason() {
    let (url, _) = service().await;
    let c = Rest::new(async_config(&url)).expect("connector");
    let e = run(&c, json!({"fail": true})).await.0.expect_err("failed remotely");
    assert_eq!((e.category, e.retryable), (FailureCategory::Service, false));
    assert!(e.message.contains("ended failed: out of cheese"), "{}", e.message);
}

#[tokio::test]
async fn cancel_reaches_the_service_and_a_stuck_job_stops_showing_life() {
    let (url, remote) = service().await;
    let c = Rest::new(async_config(&url)).expect("connector");
    let (sink, mut rx) = ProgressSink::channel();
    let cancel = CancellationToken::new();
    let job = common::job("rest", json!({"hang": true}));
    let work = c.process(&job, sink, cancel.clone());
    tokio::pin!(work);
    // queued, then running at 10% — and nothing more while it hangs (only changes are signs of life).
    let mut seen = Vec::new();
    while seen.len() < 2 {
        tokio::select! {
            r = &mut work => panic!("finished: {r:?}"),
            p = rx.recv() => seen.extend(p),
        }
    }
    // Many more polls happen without a new sign of life.
    tokio::time::timeout(Duration::from_secs(5), async {
        while remote.jobs.lock().expect("lock").get("r1").map_or(0, |j| j.1) < 10 {
            tokio::select! {
                r = &mut work => panic!("finished: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await
    .expect("polled");
    assert!(rx.try_recv().is_err(), "no progress while the status does not change");
    // Its check says whether the service is up, job or no job: `active` is the worker's to count.
    let h = tokio::select! {
        r = &mut work => panic!("finished: {r:?}"),
        h = c.health() => h,
    };
    assert_eq!(h.status, ConnectorStatus::Idle, "the service is up while the job runs");
    cancel.cancel();
    let e = work.await.expect_err("cancelled");
    assert_eq!(c.health().await.status, ConnectorStatus::Idle, "and after it ended");
    assert_eq!(e.category, FailureCategory::Cancelled);
    assert_eq!(remote.cancelled.lock().expect("lock").clone(), vec!["r1".to_owned()]);
}

#[tokio::test]
async fn health_uses_the_health_path_and_goes_offline_when_unreachable() {
    let (url, _) = service().await;
    assert_eq!(Rest::new(async_config(&url)).expect("c").health().await.status, ConnectorStatus::Idle);
    let missing = RestConfig { health_path: Some("/nope".into()), ..async_config(&url) };
    assert_eq!(Rest::new(missing).expect("c").health().await.status, ConnectorStatus::Error);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let h = Rest::new(async_config(&closed)).expect("c").health().await;
    assert_eq!(h.status, ConnectorStatus::Offline);
}
