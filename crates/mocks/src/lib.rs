//! # fleetq-mocks
//!
//! Mock servers of the services fleetq's connectors drive — ComfyUI ([`comfyui`]), AUTOMATIC1111
//! ([`a1111`]) and OpenAI-style APIs ([`openai`]) — faithful to `docs/services.md`: the connectors'
//! tests run against them, and `fleetq mock <service>` serves them for demos. Test doubles only:
//! nothing in a worker depends on this crate.
//!
//! They are small re-implementations of each service's *wire behaviour* (message orders, reply shapes,
//! status codes, races), not recordings: the ComfyUI mock executes a workflow graph so that every
//! order captured from a real ComfyUI (normal, cached, validation error, runtime error, interrupt,
//! reconnect) comes out of one engine. A conformance test replays the real transcripts against it.

pub mod a1111;
pub mod comfyui;
pub mod openai;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// A 1×1 PNG: every image the mocks produce.
pub(crate) const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00,
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53, 0xde, 0x00,
    0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x30, 0x4e, 0x9b, 0x09, 0x00, 0x02, 0x02,
    0x01, 0x33, 0x56, 0x87, 0xe2, 0x54, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60,
    0x82,
];

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

/// A mock HTTP server that can die like a crashed process: [`Server::kill`] drops every open
/// connection (a blocked request sees its connection reset), where a graceful shutdown would let
/// in-flight requests finish.
#[derive(Debug)]
pub(crate) struct Server {
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free one) and serves `app` until killed.
    pub(crate) async fn start(addr: std::net::SocketAddr, app: axum::Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, app, stop.clone()));
        Ok(Self { addr, stop, task })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops accepting and drops every connection at once.
    pub(crate) async fn kill(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the set aborts every connection task: the sockets close mid-request.
    connections.abort_all();
}
