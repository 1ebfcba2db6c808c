//! Helpers of the API tests: a router over a fresh embedded store, one-shot requests, a real socket,
//! and a hand-driven worker (register, claim, progress, complete) so job lifecycles are exact.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset; pub for the test modules")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetq_api::ApiConfig;
use fleetq_broker::embedded::EmbeddedBroker;
use fleetq_broker::{Broker, BrokerConfig, Lease};
use fleetq_core::{ConnectorReport, ConnectorStatus, WorkerRegistration};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A router over its own store.
pub struct App {
    pub router: Router,
    pub broker: Arc<EmbeddedBroker>,
    pub dir: tempfile::TempDir,
}

pub fn app(config: ApiConfig) -> App {
    let (broker, dir) = fleetq_broker::testing::embedded(BrokerConfig::default());
    let router = fleetq_api::router(broker.clone(), config);
    App { router, broker, dir }
}

/// One request through the router without a socket: status and JSON body (`Null` when not JSON).
pub async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, bytes) = call_raw(router, method, uri, body.map(|b| b.as_bytes().to_vec()), headers).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

pub async fn call_raw(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.map(Body::from).unwrap_or_else(Body::empty)).expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let is_stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
    if is_stream {
        return (status, Vec::new());
    }
    let bytes = resp.into_body().collect().await.expect("body").to_bytes().to_vec();
    (status, bytes)
}

/// Serves the API over `broker` on a free loopback port, as `fleetq up` and `fleetq api` do.
pub async fn serve<B: Broker>(broker: Arc<B>) -> SocketAddr {
    serve_with(broker, ApiConfig::default()).await
}

/// [`serve`] with a configuration.
pub async fn serve_with<B: Broker>(broker: Arc<B>, config: ApiConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(fleetq_api::serve(listener, broker, config));
    addr
}

/// Registers worker `id` for `service` with a fresh `idle` connector report.
pub async fn worker<B: Broker>(broker: &B, id: &str, service: &str) {
    broker
        .register_worker(WorkerRegistration {
            worker_id: id.into(),
            machine_id: "m1".into(),
            services: vec![service.into()],
            capabilities: serde_json::from_value(json!({"gpu": "rtx4090"})).expect("caps"),
        })
        .await
        .expect("register");
    broker
        .report_connector(
            id,
            ConnectorReport {
                service: service.into(),
                status: ConnectorStatus::Idle,
                message: None,
                at: now_ms(),
                info: None,
            },
        )
        .await
        .expect("report");
}

pub async fn claim<B: Broker>(broker: &B, worker: &str) -> Lease {
    broker.claim(worker, Duration::from_secs(5)).await.expect("claim").expect("a job to claim")
}

pub fn now_ms() -> i64 {
    use fleetq_broker::Clock;
    fleetq_broker::SystemClock.now_ms()
}

pub async fn submit(router: &Router, body: Value) -> String {
    let (status, v) = call(router, "POST", "/api/jobs", Some(&body.to_string()), &[]).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["id"].as_str().expect("id").to_owned()
}
