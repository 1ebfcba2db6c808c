//! The machine's local status endpoint: `GET /health` answers the supervisor's own view (GPUs,
//! services with pid, uptime, restarts and last exit, workers, last error) as JSON — for an
//! operator on the box, a load balancer or a platform health check, even when the fleet's broker
//! is unreachable.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::watch;

use crate::supervisor::LocalStatus;

/// Serves `GET /health` on `listener` until `stop`: 200 while the machine is ready, 503 otherwise
/// (starting, stopping, failed), with the same body.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: watch::Receiver<LocalStatus>,
    stop: fleetq_connectors::CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route("/health", axum::routing::get(health)).with_state(status);
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
}

async fn health(State(status): State<watch::Receiver<LocalStatus>>) -> impl IntoResponse {
    let now = status.borrow().clone();
    let code = if now.phase == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(now))
}
