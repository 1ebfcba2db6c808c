//! The routes and the OpenAPI 3.1 document, from one list: [`routes`] registers each handler at the
//! path its `#[utoipa::path]` attribute declares ([`op`]), [`documented_paths`] takes the same
//! declarations without the handlers, so the document needs no broker; [`finish`] adds what the
//! attributes do not say (roles, tags, error answers).

use std::sync::OnceLock;

use axum::Json;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::MethodRouter;
use fleetq_broker::Broker;
use fleetq_core::{Event, Snapshot};
use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::path::Paths;
use utoipa_axum::PathItemExt;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::required_role;
use crate::model::{
    Cancelled, ErrorBody, Instances, JobPage, JobView, Machines, MatchingWorkers, Me, Retried,
    ServiceSummaryReply, Services, SnapshotView, Stats, Status, Submission, SubmitReply, Workers,
};
use crate::state::AppState;
use crate::{bulk, control, fleet, jobs, ops, web, ws};

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
        Me,
        Snapshot,
        SnapshotView,
        Event,
        bulk::BulkRequest,
        bulk::BulkReply,
        control::Paused
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
        let mut api = ApiDoc::openapi();
        api.paths = documented_paths();
        finish(serde_json::to_value(&api).unwrap_or(Value::Null))
    })
    .clone()
}

/// Adds what the handlers' attributes do not say: security and role per operation (from
/// [`required_role`]), tags by area, the version, and the bearer scheme.
fn finish(mut doc: Value) -> Value {
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    doc["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer",
        "description": "A token from --token / FLEETQ_TOKENS; also accepted as the fleetq_token cookie, or as ?access_token= (percent-encoded) on GET event streams and WebSockets"}});
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
                // An event stream's schema describes one SSE event (OpenAPI's convention for
                // `text/event-stream`): `data` is JSON whose schema is the handler's body type, or
                // one of the stream's framing messages (`job_state`, `resync`).
                if let Some(responses) = op["responses"].as_object_mut() {
                    for resp in responses.values_mut() {
                        let sse = &mut resp["content"]["text/event-stream"]["schema"];
                        if sse.is_object() {
                            let payload = sse.take();
                            *sse = json!({
                                "type": "object",
                                "required": ["data"],
                                "properties": {
                                    "event": {"type": "string"},
                                    "id": {"type": "string"},
                                    "retry": {"type": "integer"},
                                    "data": {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": {"anyOf": [payload, {
                                            "type": "object",
                                            "required": ["type"],
                                            "properties": {"type": {"enum": ["job_state", "resync"]}}
                                        }]}
                                    }
                                }
                            });
                        }
                    }
                }
                // Every route that reads the broker answers 503 while the broker is unreachable.
                if path != "/health" && path != "/openapi.json" && op["responses"].get("503").is_none() {
                    op["responses"]["503"] = json!({"description": "The queue (broker) is unavailable", "content": error["content"]});
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

/// Every route, listed once as its `#[utoipa::path]` type (`__path_<fn>`) and its handler: the
/// router registers the handlers at the paths the attributes declare ([`op`]), and the
/// OpenAPI document is built from the same types with no broker at all ([`documented_paths`]).
macro_rules! api_routes {
    ($($path:ty => $handler:expr),* $(,)?) => {
        /// The router's routes with their documentation.
        pub(crate) fn routes<B: Broker>() -> OpenApiRouter<AppState<B>> {
            let r = OpenApiRouter::with_openapi(ApiDoc::openapi());
            $(let r = op::<$path, _, _, _>(r, $handler);)*
            r
        }

        /// The paths of the OpenAPI document: the same list as [`routes`], without a broker.
        pub(crate) fn documented_paths() -> utoipa::openapi::path::Paths {
            let mut paths = utoipa::openapi::path::Paths::new();
            $(paths.add_path_operation(
                <$path as utoipa::Path>::path(),
                <$path as utoipa::Path>::methods(),
                <$path as utoipa::Path>::operation(),
            );)*
            paths
        }
    };
}

api_routes! {
    jobs::__path_submit => jobs::submit::<B>,
    jobs::__path_list => jobs::list::<B>,
    jobs::__path_get => jobs::get::<B>,
    jobs::__path_cancel => jobs::cancel::<B>,
    jobs::__path_retry => jobs::retry::<B>,
    jobs::__path_events => jobs::events::<B>,
    jobs::__path_matching => jobs::matching::<B>,
    jobs::__path_artifact => jobs::artifact::<B>,
    bulk::__path_bulk => bulk::bulk::<B>,
    control::__path_pause => control::pause::<B>,
    control::__path_resume => control::resume::<B>,
    fleet::__path_workers => fleet::workers::<B>,
    fleet::__path_machines => fleet::machines::<B>,
    fleet::__path_services => fleet::services::<B>,
    fleet::__path_summary => fleet::summary::<B>,
    fleet::__path_instances => fleet::instances::<B>,
    fleet::__path_snapshot => fleet::snapshot::<B>,
    fleet::__path_stats => fleet::stats::<B>,
    fleet::__path_events => fleet::events::<B>,
    ws::__path_monitor => ws::monitor::<B>,
    ws::__path_client => ws::client::<B>,
    web::__path_me => web::me,
    ops::__path_health => ops::health,
    ops::__path_ready => ops::ready::<B>,
    ops::__path_metrics => ops::metrics::<B>,
    __path_openapi => openapi,
}
