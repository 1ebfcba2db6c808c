//! Mock servers for the services fleetq's connectors drive, faithful to
//! `../shared/protocols/services.md`: usable from tests and from `fleetq mock <service>` for demos.
//!
//! They are small re-implementations of each service's *wire behaviour* (message orders, reply shapes,
//! status codes, races), not recordings: the ComfyUI mock executes a workflow graph so that every
//! order captured from a real ComfyUI (normal, cached, validation error, runtime error, interrupt,
//! reconnect) comes out of one engine. A conformance test replays the real transcripts against it.

pub mod comfyui;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// A JSON reply with the content type aiohttp/FastAPI send.
pub(crate) fn json_reply(status: StatusCode, value: &Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

/// 200 with an empty body and no content type (ComfyUI's `/queue`, `/interrupt`, `/free`, `/history` POSTs).
pub(crate) fn empty_ok() -> Response {
    empty(StatusCode::OK)
}

/// `status` with an empty body and no content type, as aiohttp sends bare statuses.
pub(crate) fn empty(status: StatusCode) -> Response {
    let mut response = status.into_response();
    response.headers_mut().remove(header::CONTENT_TYPE);
    response
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
