//! Operations routes (`/health`, `/ready`, `/metrics`, `/openapi.json`), the JSON 404/405 fallbacks,
//! and the OpenAPI document: [`op`] registers each handler at the path its `#[utoipa::path]`
//! attribute declares, so the router and the document come from the same declarations.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetq_broker::Broker;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::MethodRouter;
use fleetq_core::{Event, Snapshot};
use utoipa::OpenApi;
use utoipa::openapi::path::Paths;
use utoipa_axum::PathItemExt;
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;
use crate::auth::required_role;
use crate::error::ApiError;
use crate::model::{
    Cancelled, ErrorBody, Instances, JobPage, JobView, Machines, MatchingWorkers, Retried,
    ServiceSummaryReply, Services, Stats, Status, Submission, SubmitReply, Workers,
};

/// The document's fixed parts; paths come from the handlers' `#[utoipa::path]` attributes.
#[derive(OpenApi)]
#[openapi(
    info(title = "fleetq API", description = "Job queue and fleet control plane for AI generation work."),
    components(schemas(
        ErrorBody,
        Submission,
        SubmitReply,
        JobView,
        JobPage,
        Cancelled,
        Retried,
        MatchingWorkers,
        Workers,
        Machines,
        Services,
        ServiceSummaryReply,
        Instances,
        Stats,
        Status,
        Snapshot,
        Event
    ))
)]
pub(crate) struct ApiDoc;

/// Registers `handler` at the path and methods its `#[utoipa::path]` attribute (`P`, the
/// `__path_<fn>` type the attribute generates) declares: the router and the document are built
/// from one declaration, so neither can list a route the other lacks.
pub(crate) fn op<P, H, T, S>(router: OpenApiRouter<S>, handler: H) -> OpenApiRouter<S>
where
    P: utoipa::Path,
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    let methods = P::methods();
    let method_router =
        methods.iter().fold(MethodRouter::new(), |r, m| r.on(m.to_method_filter(), handler.clone()));
    let mut paths = Paths::new();
    paths.add_path_operation(P::path(), methods, P::operation());
    router.routes((Vec::new(), paths, method_router))
}

/// The OpenAPI 3.1 document of the API: every route the router serves (see [`crate::router`]),
/// with the role each needs (`x-fleetq-role`, from the auth middleware's own rule) and the
/// request and response schemas of the types the handlers serialize.
pub fn openapi_document() -> Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        // The document does not depend on the broker type; any concrete one builds it.
        let api = crate::routes::<fleetq_broker::embedded::EmbeddedBroker>().into_openapi();
        finish(serde_json::to_value(&api).unwrap_or(Value::Null))
    })
    .clone()
}

/// Adds what the handlers' attributes do not say: security and role per operation (from
/// [`required_role`]), tags by area, the version, and the bearer scheme.
fn finish(mut doc: Value) -> Value {
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    doc["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer",
        "description": "A token from --token / FLEETQ_TOKENS; also accepted as the fleetq_token cookie or ?access_token="}});
    open_flattened(&mut doc);
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else { continue };
            for (method, op) in item.iter_mut() {
                let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else { continue };
                let tag = if path.starts_with("/api/jobs") {
                    "jobs"
                } else if path.starts_with("/api/") {
                    "fleet"
                } else if path.starts_with("/ws/") {
                    "websocket"
                } else {
                    "ops"
                };
                op["tags"] = json!([tag]);
                // OpenAPI requires a description on every response: the reason phrase by default.
                if let Some(responses) = op["responses"].as_object_mut() {
                    for (code, resp) in responses.iter_mut() {
                        if resp["description"].as_str().is_none_or(str::is_empty) {
                            let reason = code
                                .parse::<u16>()
                                .ok()
                                .and_then(|c| StatusCode::from_u16(c).ok())
                                .and_then(|c| c.canonical_reason())
                                .unwrap_or("Response");
                            resp["description"] = json!(reason);
                        }
                    }
                }
                if let Some(role) = required_role(&m, path) {
                    op["security"] = json!([{"bearer": []}]);
                    op["x-fleetq-role"] = json!(role.as_str());
                    let below = format!("The token's role is below {}", role.as_str());
                    for (code, text) in [("401", "No token, or an unknown one"), ("403", below.as_str())] {
                        if op["responses"].get(code).is_none() {
                            op["responses"][code] = json!({"description": text, "content": error["content"]});
                        }
                    }
                }
            }
        }
    }
    doc
}

/// A type with `deny_unknown_fields` (a worker registration) gets `additionalProperties: false`,
/// which is right where it stands alone, but where a response flattens it (`allOf`) it would reject
/// the sibling fields. Such schemas are opened; the API itself still refuses unknown input fields.
fn open_flattened(doc: &mut Value) {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for member in m.get("allOf").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(r) =
                        member["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/"))
                    {
                        out.push(r.to_owned());
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut flattened = Vec::new();
    walk(doc, &mut flattened);
    for name in flattened {
        if let Some(schema) = doc["components"]["schemas"].get_mut(&name).and_then(Value::as_object_mut) {
            schema.remove("additionalProperties");
        }
    }
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// `GET /health`: the process is up.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    summary = "The process is up (the one route open without a token)",
    responses((status = 200, body = Status))
)]
pub(crate) async fn health() -> Json<Status> {
    Json(Status { status: "ok".into() })
}

/// `GET /ready`: the broker answers (503 otherwise).
#[utoipa::path(
    get,
    path = "/ready",
    operation_id = "ready",
    summary = "The broker answers",
    responses((status = 200, body = Status), (status = 503, description = "The broker does not answer", body = ErrorBody))
)]
pub(crate) async fn ready<B: Broker>(State(st): State<AppState<B>>) -> Response {
    match st.broker.queue_depths().await {
        Ok(_) => Json(Status { status: "ready".into() }).into_response(),
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
