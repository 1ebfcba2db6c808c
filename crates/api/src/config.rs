//! How the API behaves: [`ApiConfig`], with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;

/// How the API behaves.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Tokens with roles; empty turns auth off.
    pub tokens: Tokens,
    /// Origins allowed by CORS (exact `scheme://host:port`). Empty allows none (same-origin only).
    pub cors_origins: Vec<String>,
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Most jobs in one batch submission (413 above).
    pub max_batch: usize,
    /// A connector report older than this is `stale` (the worker stopped refreshing it).
    pub stale_after: Duration,
    /// Where workers store artifacts (`<dir>/<job>/<name>`); enables artifact download.
    pub artifacts_dir: Option<PathBuf>,
    /// Cancelled when the server shuts down: event streams and WebSocket sessions end, so a
    /// graceful shutdown does not wait forever on a watcher.
    pub shutdown: CancellationToken,
    /// How often [`crate::serve`] reaps expired leases and due retries from this process.
    pub reap_every: Duration,
    /// Most event streams (SSE) and WebSockets open at once; beyond, 503 with `Retry-After`.
    pub max_streams: usize,
    /// How long a client may take to send a request's head — and how long a kept-alive connection
    /// may sit idle before its next one: past it the connection is closed (a slow client cannot
    /// hold a descriptor for ever).
    pub header_timeout: Duration,
    /// How long a request may take from its head to its response head, its body included (408).
    /// Event streams and WebSockets answer at once, so their length is not bounded by it.
    pub request_timeout: Duration,
    /// Most connections open at once; a connection beyond is closed at accept.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: Tokens::default(),
            cors_origins: Vec::new(),
            max_body_bytes: 8 * 1024 * 1024,
            max_batch: 1000,
            // Three default health intervals (5 s).
            stale_after: Duration::from_secs(15),
            artifacts_dir: None,
            shutdown: CancellationToken::new(),
            reap_every: Duration::from_secs(1),
            max_streams: 1024,
            header_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}
