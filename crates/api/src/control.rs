//! Operator controls over the fleet's queues (admin role): pause and resume a service.

use axum::Json;
use axum::extract::{Path, State};
use fleetq_broker::Broker;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiResult;
use crate::model::ErrorBody;
use crate::state::AppState;

/// `POST /api/services/{service}/pause` and `/resume` reply.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Paused {
    /// The service.
    pub service: String,
    /// Its queue is paused now.
    pub paused: bool,
    /// Whether this request changed it (false: it already was).
    pub changed: bool,
}

async fn set<B: Broker>(st: &AppState<B>, service: String, paused: bool) -> ApiResult<Json<Paused>> {
    let changed = st.broker.pause_service(&service, paused).await.map_err(crate::jobs::query_error)?;
    Ok(Json(Paused { service, paused, changed }))
}

/// `POST /api/services/{service}/pause` (admin): nothing of the service is claimed until resumed;
/// running jobs finish. Its pending jobs keep their order.
#[utoipa::path(
    post,
    path = "/api/services/{service}/pause",
    operation_id = "pause_service",
    summary = "Pause a service's queue: nothing of it is claimed until resumed",
    params(("service" = String, Path, description = "Service name")),
    responses((status = 200, body = Paused), (status = 400, description = "Not a service name", body = ErrorBody))
)]
pub(crate) async fn pause<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Paused>> {
    set(&st, service, true).await
}

/// `POST /api/services/{service}/resume` (admin): its jobs are claimed again, in their order.
#[utoipa::path(
    post,
    path = "/api/services/{service}/resume",
    operation_id = "resume_service",
    summary = "Resume a paused service's queue",
    params(("service" = String, Path, description = "Service name")),
    responses((status = 200, body = Paused), (status = 400, description = "Not a service name", body = ErrorBody))
)]
pub(crate) async fn resume<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Paused>> {
    set(&st, service, false).await
}
