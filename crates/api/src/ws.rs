//! The WebSocket protocols.
//!
//! `/ws/monitor`: a `snapshot` message (unless resuming with `?since=SEQ`), then every event as its
//! own JSON object (`{"seq", "at", "type": "job_progress", …}`) in sequence order. The client may send
//! `{"type":"ping"}` (→ `{"type":"pong","seq":…}`) and `{"type":"subscribe","topics":[…]}`. When the
//! resume point was trimmed from the log, a fresh `snapshot` is sent; apply only events with a
//! larger `seq` than the snapshot's.
//!
//! `/ws/client`: the legacy message protocol existing clients speak. Client → server: `submit_job`,
//! `cancel_job`, `request_job_status`. Server → client: `job_accepted`, `update_job_progress`,
//! `complete_job`, `job_failed`, `job_status`, `error`. A connection hears about the jobs it
//! submitted, cancelled or asked about, until each one ends.

use std::collections::{BTreeSet, HashSet};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use fleetq_broker::{Broker, CancelOutcome};
use fleetq_core::{EventKind, JobId, JobSummary, Outcome};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{check_owner, spec_from};
use crate::model::ErrorBody;
use crate::request::TypedQuery;
use crate::state::AppState;
use crate::stream::FleetStreamQuery;
use crate::stream::{Feed, TOPICS, parse_topics, topic};

fn upgrade(ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> ApiResult<WebSocketUpgrade> {
    ws.map_err(|e| ApiError::new(e.status(), "websocket_required", e.body_text()))
}

async fn send(socket: &mut WebSocket, v: &Value) -> bool {
    socket.send(Message::Text(v.to_string().into())).await.is_ok()
}

/// What a socket read means for a session: it ended, a frame to skip, or a text message.
enum Incoming {
    Closed,
    Skip,
    Text(axum::extract::ws::Utf8Bytes),
}

fn incoming(msg: Option<Result<Message, axum::Error>>) -> Incoming {
    match msg {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Incoming::Closed,
        Some(Ok(Message::Text(t))) => Incoming::Text(t),
        Some(Ok(_)) => Incoming::Skip,
    }
}

fn err_msg(code: &str, message: impl Into<String>) -> Value {
    json!({"type": "error", "error": {"code": code, "message": message.into()}})
}

/// `GET /ws/monitor`.
#[utoipa::path(
    get,
    path = "/ws/monitor",
    operation_id = "ws_monitor",
    summary = "WebSocket: snapshot, then sequenced events; subscribe, ping",
    description = "The server sends `{type: snapshot, seq, snapshot}`, then each Event flat (`{seq, at, type, …}`). Client messages: `{type: subscribe, topics: [...]}`, `{type: ping}` (answered by `{type: pong, seq}`). A resume point trimmed from the log yields a fresh snapshot. With the `workers` or `connectors` topic, `{type: workers_seen, at, workers: {ID: {last_seen, connectors: {SERVICE: at}}}}` comes every third of `--stale-after-s` (the latest heartbeats, not events of the log).",
    params(FleetStreamQuery),
    responses((status = 101, description = "Switched to the WebSocket protocol"), (status = 400, body = ErrorBody), (status = 403, description = "A submit token (its jobs are followed with /api/events)", body = ErrorBody))
)]
pub(crate) async fn monitor<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<axum::Extension<Caller>>,
    TypedQuery(q): TypedQuery<FleetStreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    if crate::jobs::scoped_owner(caller.as_ref().map(|axum::Extension(c)| c)).is_some() {
        // Its snapshot and events are every owner's jobs; /api/snapshot and /api/events serve a
        // submit token its own.
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "/ws/monitor shows every owner's jobs: a submit token follows its own with /api/events (or /ws/client); use a read token for the monitor",
        ));
    }
    let topics = parse_topics(q.topics.as_deref())?;
    let since = crate::stream::resume_point(&axum::http::HeaderMap::new(), q.since.as_deref())?;
    let ws = upgrade(ws)?;
    let permit = st.stream_permit()?;
    let stop = st.config.shutdown.clone();
    Ok(ws
        .on_upgrade(move |socket| async move {
            let _held = permit;
            tokio::select! {
                () = monitor_session(st, socket, since, topics) => {}
                () = stop.cancelled() => {}
            }
        })
        .into_response())
}

/// The `snapshot` message (shared with the sessions opening at the same time) and its sequence,
/// or the error message to send instead.
async fn snapshot_msg<B: Broker>(st: &AppState<B>) -> Result<(u64, Message), Value> {
    match st.snapshot_message().await {
        Ok((seq, text)) => Ok((seq, Message::Text(text))),
        Err(e) => Err(err_msg("unavailable", format!("cannot read the snapshot: {e}"))),
    }
}

async fn monitor_session<B: Broker>(
    st: AppState<B>,
    mut socket: WebSocket,
    since: Option<crate::stream::Resume>,
    mut topics: BTreeSet<&'static str>,
) {
    let after = match since {
        Some(s) => s.seq,
        None => match snapshot_msg(&st).await {
            Ok((seq, msg)) => {
                if socket.send(msg).await.is_err() {
                    return;
                }
                seq
            }
            Err(msg) => {
                send(&mut socket, &msg).await;
                return;
            }
        },
    };
    let mut last = after;
    let mut events = std::pin::pin!(st.feed_from(after, since.map(|s| s.epoch)));
    loop {
        tokio::select! {
            item = events.next() => {
                let out = match item {
                    None => return,
                    Some(Feed::Gap { .. }) => match snapshot_msg(&st).await {
                        Ok((_, msg)) => {
                            if socket.send(msg).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Err(msg) => msg,
                    },
                    Some(Feed::Event(ev)) => {
                        last = ev.seq;
                        if !topics.contains(topic(&ev.kind)) {
                            continue;
                        }
                        serde_json::to_value(&*ev).unwrap_or(Value::Null)
                    }
                    Some(Feed::Seen(seen)) => {
                        if !(topics.contains("workers") || topics.contains("connectors")) {
                            continue;
                        }
                        if socket.send(Message::Text(seen.json.clone().into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                if !send(&mut socket, &out).await {
                    return;
                }
            }
            msg = socket.recv() => {
                let text = match incoming(msg) {
                    Incoming::Closed => return,
                    Incoming::Skip => continue,
                    Incoming::Text(t) => t,
                };
                let reply = match serde_json::from_str::<Value>(&text) {
                    Err(e) => err_msg("malformed_json", format!("not JSON: {e}")),
                    Ok(v) => match v.get("type").and_then(Value::as_str) {
                        Some("ping") => json!({"type": "pong", "seq": last}),
                        Some("subscribe") => {
                            let list = v.get("topics").and_then(Value::as_array).map(|a| {
                                a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")
                            });
                            match parse_topics(list.as_deref()) {
                                Ok(t) => {
                                    topics = t;
                                    json!({"type": "subscribed", "topics": topics})
                                }
                                Err(e) => err_msg("bad_request", e.message),
                            }
                        }
                        _ => err_msg("unknown_message", format!("monitor messages are ping and subscribe (topics: {})", TOPICS.join(", "))),
                    },
                };
                if !send(&mut socket, &reply).await {
                    return;
                }
            }
        }
    }
}

/// `GET /ws/client`: the legacy client protocol.
#[utoipa::path(
    get,
    path = "/ws/client",
    operation_id = "ws_client",
    summary = "WebSocket: legacy client protocol (submit_job, cancel_job, request_job_status)",
    description = "Client messages: `submit_job` (a job, `job_type`/`service_required` accepted for `service`), `cancel_job` and `request_job_status` (`job_id`), each with an optional `message_id` echoed in replies. Server messages: `job_accepted`, `update_job_progress`, `complete_job`, `job_failed`, `job_status`, `error`.",
    responses((status = 101, description = "Switched to the WebSocket protocol"), (status = 400, body = ErrorBody))
)]
pub(crate) async fn client<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<axum::Extension<Caller>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = upgrade(ws)?;
    let permit = st.stream_permit()?;
    let stop = st.config.shutdown.clone();
    Ok(ws
        .on_upgrade(move |socket| async move {
            let _held = permit;
            tokio::select! {
                () = client_session(st, socket, caller.map(|axum::Extension(c)| c)) => {}
                () = stop.cancelled() => {}
            }
        })
        .into_response())
}

/// What the legacy protocol says about a job's change.
fn legacy_message(kind: &EventKind, job: &JobSummary, outcome: Option<Outcome>) -> Value {
    match kind {
        EventKind::JobCompleted { .. } => {
            let result = match outcome {
                Some(Outcome::Result { value }) => value,
                _ => Value::Null,
            };
            json!({"type": "complete_job", "job_id": job.id, "status": "completed", "worker_id": job.worker_id, "result": result})
        }
        EventKind::JobFailed { .. } | EventKind::JobCancelled { .. } => json!({
            "type": "job_failed", "job_id": job.id, "status": job.status, "worker_id": job.worker_id,
            "error": job.error.as_ref().map_or_else(|| "cancelled".to_owned(), |e| e.message.clone()),
            "category": job.error.as_ref().map(|e| e.category),
        }),
        _ => json!({
            "type": "update_job_progress", "job_id": job.id, "status": job.status, "progress": job.progress,
            "message": job.message, "worker_id": job.worker_id,
        }),
    }
}

fn status_msg(job: &JobSummary, outcome: Option<&Outcome>, message_id: &Value) -> Value {
    let mut v = json!({
        "type": "job_status", "job_id": job.id, "status": job.status, "progress": job.progress,
        "message": job.message, "worker_id": job.worker_id, "message_id": message_id,
    });
    match outcome {
        Some(Outcome::Result { value }) => v["result"] = value.clone(),
        Some(Outcome::Error { error }) => v["error"] = json!(error.message),
        None => {}
    }
    v
}

async fn client_session<B: Broker>(st: AppState<B>, mut socket: WebSocket, caller: Option<Caller>) {
    let broker = st.broker.clone();
    let after = match broker.snapshot().await {
        Ok(s) => s.seq,
        Err(e) => {
            send(&mut socket, &err_msg("unavailable", format!("the queue is unavailable: {e}"))).await;
            return;
        }
    };
    let mut watching: HashSet<JobId> = HashSet::new();
    let mut events = std::pin::pin!(st.feed(after));
    loop {
        tokio::select! {
            item = events.next() => {
                let Some(Feed::Event(ev)) = item else {
                    if item.is_none() { return; }
                    continue;
                };
                let Some(job) = ev.kind.job() else { continue };
                // `job_accepted` already told the client about the submission.
                if !watching.contains(&job.id) || matches!(ev.kind, EventKind::JobSubmitted { .. }) {
                    continue;
                }
                let outcome = if matches!(ev.kind, EventKind::JobCompleted { .. }) {
                    broker.job(&job.id).await.ok().flatten().and_then(|r| r.outcome)
                } else {
                    None
                };
                if job.status.is_terminal() {
                    watching.remove(&job.id);
                }
                if !send(&mut socket, &legacy_message(&ev.kind, job, outcome)).await {
                    return;
                }
            }
            msg = socket.recv() => {
                let text = match incoming(msg) {
                    Incoming::Closed => return,
                    Incoming::Skip => continue,
                    Incoming::Text(t) => t,
                };
                let reply = client_message(&st, &text, &mut watching, caller.as_ref()).await;
                if !send(&mut socket, &reply).await {
                    return;
                }
            }
        }
    }
}

async fn client_message<B: Broker>(
    st: &AppState<B>,
    text: &str,
    watching: &mut HashSet<JobId>,
    caller: Option<&Caller>,
) -> Value {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return err_msg("malformed_json", format!("not JSON: {e}")),
    };
    let message_id = v.get("message_id").or_else(|| v.get("id")).cloned().unwrap_or(Value::Null);
    let with_id = |mut reply: Value| {
        reply["message_id"] = message_id.clone();
        reply
    };
    let job_id =
        || v.get("job_id").and_then(Value::as_str).filter(|s| !s.is_empty()).map(|s| JobId(s.to_owned()));
    match v.get("type").and_then(Value::as_str) {
        Some("submit_job") => {
            let mut body = v.clone();
            if let Some(obj) = body.as_object_mut() {
                for k in ["type", "message_id", "id", "timestamp"] {
                    obj.remove(k);
                }
            }
            let spec = match spec_from(body, caller) {
                Ok(s) => s,
                Err(e) => {
                    return with_id(
                        json!({"type": "error", "error": {"code": "invalid", "message": e.message, "field": e.field}}),
                    );
                }
            };
            match st.broker.submit(spec).await {
                Ok(s) => {
                    watching.insert(s.id.clone());
                    with_id(
                        json!({"type": "job_accepted", "job_id": s.id, "status": "pending", "created": s.created}),
                    )
                }
                Err(e) => with_id(ApiError::from(e).body_with_type()),
            }
        }
        Some("cancel_job") => {
            let Some(id) = job_id() else {
                return with_id(err_msg("bad_request", "cancel_job needs job_id"));
            };
            if let Err(e) = check_owner(st.broker.as_ref(), &id, caller).await {
                return with_id(e.body_with_type());
            }
            match st.broker.cancel(&id).await {
                Ok(CancelOutcome::AlreadyFinished) => {
                    with_id(err_msg("conflict", format!("job {id} had already finished")))
                }
                Ok(outcome) => {
                    watching.insert(id.clone());
                    let status =
                        if outcome == CancelOutcome::Cancelled { "cancelled" } else { "cancel_requested" };
                    with_id(json!({"type": "job_status", "job_id": id, "status": status}))
                }
                Err(e) => with_id(ApiError::from(e).body_with_type()),
            }
        }
        Some("request_job_status") => {
            let Some(id) = job_id() else {
                return with_id(err_msg("bad_request", "request_job_status needs job_id"));
            };
            match st.broker.job(&id).await {
                // Another owner's job is not found to a submit token, as over HTTP.
                Ok(Some(rec)) if crate::jobs::may_read(rec.spec.owner.as_deref(), caller) => {
                    if !rec.summary.status.is_terminal() {
                        watching.insert(id);
                    }
                    status_msg(&rec.summary, rec.outcome.as_ref(), &message_id)
                }
                Ok(_) => with_id(err_msg("not_found", format!("job {id} not found"))),
                Err(e) => with_id(ApiError::from(e).body_with_type()),
            }
        }
        Some(other) => with_id(err_msg(
            "unknown_message",
            format!("unknown message type {other:?}; send submit_job, cancel_job or request_job_status"),
        )),
        None => with_id(err_msg("bad_request", "a message needs a \"type\"")),
    }
}

impl ApiError {
    /// The error as a WebSocket message (`{"type":"error","error":{…}}`).
    pub(crate) fn body_with_type(&self) -> Value {
        let mut v = serde_json::to_value(self.body()).unwrap_or(Value::Null);
        v["type"] = json!("error");
        v
    }
}
