//! Operations routes (`/health`, `/ready`, `/metrics`, `/openapi.json`), the JSON 404/405 fallbacks,
//! and [`ROUTES`]: the one table of every route, from which the OpenAPI document is generated and
//! against which the tests check the router (so the document cannot drift from what is served).

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetq_broker::Broker;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Role;
use crate::error::ApiError;

/// One route of the API, as documented.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path with `{param}` placeholders.
    pub path: &'static str,
    /// Role needed when auth is on (`None`: open).
    pub role: Option<Role>,
    /// One-line summary.
    pub summary: &'static str,
    /// Query parameters.
    pub query: &'static [&'static str],
    /// Takes a JSON body.
    pub body: bool,
    /// Answers with a stream (`text/event-stream` or a WebSocket upgrade).
    pub stream: bool,
}

const fn r(method: &'static str, path: &'static str, role: Option<Role>, summary: &'static str) -> Route {
    Route { method, path, role, summary, query: &[], body: false, stream: false }
}

/// Every route the API serves.
pub const ROUTES: &[Route] = &[
    Route {
        body: true,
        ..r(
            "POST",
            "/api/jobs",
            Some(Role::Submit),
            "Submit one job (object) or a batch (array); Idempotency-Key header",
        )
    },
    Route {
        query: &["status", "service", "worker", "workflow", "customer", "limit", "cursor", "order"],
        ..r("GET", "/api/jobs", Some(Role::Read), "List jobs, newest first (cursor paging) or order=queue")
    },
    r("GET", "/api/jobs/{id}", Some(Role::Read), "One job with payload, outcome, queue position and ETA"),
    r("POST", "/api/jobs/{id}/cancel", Some(Role::Submit), "Cancel a pending job, or ask its worker to stop"),
    r("POST", "/api/jobs/{id}/retry", Some(Role::Admin), "Put a failed or cancelled job back in the queue"),
    Route {
        query: &["since"],
        stream: true,
        ..r(
            "GET",
            "/api/jobs/{id}/events",
            Some(Role::Read),
            "SSE of one job until its terminal event; Last-Event-ID resume",
        )
    },
    r(
        "GET",
        "/api/jobs/{id}/matching-workers",
        Some(Role::Read),
        "Every worker judged against the job: matches, busy or incompatible, with reasons",
    ),
    r(
        "GET",
        "/api/jobs/{id}/artifacts/{name}",
        Some(Role::Read),
        "Download a file a worker stored for the job",
    ),
    r(
        "GET",
        "/api/workers",
        Some(Role::Read),
        "Registered workers with status, current jobs and connector reports",
    ),
    r("GET", "/api/machines", Some(Role::Read), "Machines with phase, startup steps and workers"),
    r(
        "GET",
        "/api/services",
        Some(Role::Read),
        "Per service: instances by connector status, stale, queue depth, durations",
    ),
    r("GET", "/api/services/{service}/summary", Some(Role::Read), "One service's summary"),
    r("GET", "/api/services/{service}/instances", Some(Role::Read), "One service's connector instances"),
    r("GET", "/api/snapshot", Some(Role::Read), "Unfinished jobs, workers and machines as of a sequence"),
    r("GET", "/api/stats", Some(Role::Read), "Rolling run-time statistics (p50/p90) per service"),
    Route {
        query: &["topics", "since"],
        stream: true,
        ..r("GET", "/api/events", Some(Role::Read), "SSE of all events; topics filter; Last-Event-ID resume")
    },
    Route {
        query: &["since", "topics"],
        stream: true,
        ..r(
            "GET",
            "/ws/monitor",
            Some(Role::Read),
            "WebSocket: snapshot, then sequenced events; subscribe, ping",
        )
    },
    Route {
        stream: true,
        ..r(
            "GET",
            "/ws/client",
            Some(Role::Submit),
            "WebSocket: legacy client protocol (submit_job, cancel_job, request_job_status)",
        )
    },
    r("GET", "/health", None, "The process is up"),
    r("GET", "/ready", Some(Role::Read), "The broker answers"),
    r("GET", "/metrics", Some(Role::Read), "Prometheus metrics"),
    r("GET", "/openapi.json", Some(Role::Read), "This document"),
];

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn openapi_document() -> Value {
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(
            route
                .query
                .iter()
                .map(|q| json!({"name": q, "in": "query", "required": false, "schema": {"type": "string"}})),
        );
        let ok = if route.stream {
            json!({"description": "A stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}})
        } else {
            json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}})
        };
        let mut op = json!({
            "summary": route.summary,
            "operationId": format!("{}_{}", route.method.to_lowercase(), route.path.trim_start_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": params,
            "responses": {"200": ok, "400": error, "401": error, "403": error, "404": error},
        });
        if route.body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {
                "oneOf": [{"$ref": "#/components/schemas/JobSubmission"}, {"type": "array", "items": {"$ref": "#/components/schemas/JobSubmission"}}]
            }}}});
            op["responses"]["201"] = json!({"description": "Created"});
            op["responses"]["413"] = error.clone();
            op["responses"]["422"] = error.clone();
        }
        if route.method == "POST" && !route.body {
            op["responses"]["409"] = error.clone();
        }
        if let Some(role) = route.role {
            op["security"] = json!([{"bearer": []}]);
            op["x-fleetq-role"] = json!(role.as_str());
        }
        let entry = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        entry[route.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "fleetq API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}
                }}},
                "JobSubmission": {"type": "object", "required": ["service"], "properties": {
                    "service": {"type": "string"}, "payload": {}, "requirements": {"type": "object"},
                    "priority": {"type": "integer"}, "workflow_id": {"type": "string"},
                    "workflow_priority": {"type": "integer"}, "workflow_datetime": {"type": "integer"},
                    "step_number": {"type": "integer"}, "customer_id": {"type": "string"},
                    "max_attempts": {"type": "integer"}, "timeout_ms": {"type": "integer"},
                    "progress_timeout_ms": {"type": "integer"}, "retry_backoff_ms": {"type": "integer"},
                    "idempotency_key": {"type": "string"}
                }}
            }
        }
    })
}

/// `GET /openapi.json`.
pub(crate) async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// `GET /health`: the process is up.
pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: the broker answers (503 otherwise).
pub(crate) async fn ready<B: Broker>(State(st): State<AppState<B>>) -> Response {
    match st.broker.queue_depths().await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
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
            let busy: std::collections::BTreeSet<&str> = snap
                .jobs
                .values()
                .filter(|j| j.status.is_running())
                .filter_map(|j| j.worker_id.as_deref())
                .collect();
            let n_busy = snap.workers.keys().filter(|w| busy.contains(w.as_str())).count();
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
