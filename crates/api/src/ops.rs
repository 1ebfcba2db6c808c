//! Operations routes (`/health`, `/ready`, `/metrics`), the process's Prometheus recorder and the
//! JSON 404/405 fallbacks.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetq_broker::Broker;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;
use crate::model::{ErrorBody, Status};
use crate::state::AppState;

/// `GET /health`: the process is up.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    summary = "The process is up (the one route open without a token)",
    responses((status = 200, body = Status))
)]
pub(crate) async fn health() -> Json<Status> {
    Json(Status { status: "ok".into(), message: None })
}

/// `GET /ready`: the broker answers (503 otherwise); `degraded` when records were passed over.
#[utoipa::path(
    get,
    path = "/ready",
    operation_id = "ready",
    summary = "The broker answers",
    responses((status = 200, body = Status), (status = 503, description = "The broker does not answer", body = ErrorBody))
)]
pub(crate) async fn ready<B: Broker>(State(st): State<AppState<B>>) -> Response {
    match st.broker.queue_depths().await {
        Ok(_) => Json(match fleetq_broker::undecodable_records() {
            0 => Status { status: "ready".into(), message: None },
            n => Status {
                status: "degraded".into(),
                message: Some(format!(
                    "{n} stored records could not be decoded and were passed over (see the error log)"
                )),
            },
        })
        .into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the broker does not answer: {e}"),
        )
        .into_response(),
    }
}

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// `None` when another recorder was installed first.
pub fn install_metrics_recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let seconds =
                [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];
            PrometheusBuilder::new()
                .set_buckets(&seconds)
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| tracing::warn!(error = %e, "metrics: no Prometheus recorder"))
                .ok()
        })
        .as_ref()
}

/// `GET /metrics`: gauges read from the broker now, plus the counters and histograms recorded.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain"))
)]
pub(crate) async fn metrics<B: Broker>(State(st): State<AppState<B>>) -> Response {
    let Some(handle) = install_metrics_recorder() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_metrics",
            "no Prometheus recorder is installed",
        )
        .into_response();
    };
    let depths = st.broker.queue_depths().await;
    let snap = st.broker.snapshot().await;
    match (depths, snap) {
        (Ok(depths), Ok(snap)) => {
            for (service, d) in &depths {
                for (state, n) in [("pending", d.pending), ("delayed", d.delayed), ("running", d.running)] {
                    metrics::gauge!("fleetq_queue_depth", "service" => service.clone(), "state" => state)
                        .set(n as f64);
                }
            }
            let busy = fleetq_broker::fleet::running_by_worker(snap.jobs.values());
            let n_busy = snap.workers.keys().filter(|w| busy.contains_key(w.as_str())).count();
            metrics::gauge!("fleetq_workers", "status" => "busy").set(n_busy as f64);
            metrics::gauge!("fleetq_workers", "status" => "idle").set((snap.workers.len() - n_busy) as f64);
            let mut conns: std::collections::BTreeMap<(String, &str), usize> = Default::default();
            for w in snap.workers.values() {
                for (service, r) in &w.connectors {
                    *conns.entry((service.clone(), r.status.as_str())).or_default() += 1;
                }
            }
            // Every status of every known service, so a status that empties drops to 0.
            let services: std::collections::BTreeSet<String> = conns.keys().map(|(s, _)| s.clone()).collect();
            for service in services {
                for status in fleetq_core::ConnectorStatus::ALL.map(fleetq_core::ConnectorStatus::as_str) {
                    let n = conns.get(&(service.clone(), status)).copied().unwrap_or(0);
                    metrics::gauge!("fleetq_connectors", "service" => service.clone(), "status" => status)
                        .set(n as f64);
                }
            }
            metrics::gauge!("fleetq_broker_up").set(1.0);
            metrics::gauge!("fleetq_undecodable_records").set(fleetq_broker::undecodable_records() as f64);
        }
        _ => metrics::gauge!("fleetq_broker_up").set(0.0),
    }
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// JSON 404 for unknown paths.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

/// JSON 405.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
