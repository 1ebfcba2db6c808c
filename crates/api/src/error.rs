//! The one error shape every route answers with: `{"error": {"code", "message", "field"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetq_broker::BrokerError;
use fleetq_core::ValidationError;

use crate::model::{ErrorBody, ErrorDetail};

/// An HTTP error with a stable machine-readable `code` and, for bad input, the offending `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`invalid`, `malformed_json`, `not_found`, `conflict`, …).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Dot path of the offending input field, when one is to blame.
    pub field: Option<String>,
    /// Seconds after which trying again may succeed (`Retry-After`), for a 503 of a full server.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after_s: None }
    }

    /// 400 about one field of the query or body.
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        Self { field: Some(field.to_owned()), ..Self::new(StatusCode::BAD_REQUEST, "bad_request", message) }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 422 from a validation error (the field is kept).
    pub fn invalid(e: ValidationError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid",
            message: e.message,
            field: Some(e.field),
            retry_after_s: None,
        }
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// The body of this error: the [`ErrorBody`] the OpenAPI document describes.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Invalid(v) => Self::invalid(v),
            BrokerError::JobNotFound(id) => Self::not_found(format!("job {id} not found")),
            BrokerError::UnknownWorker(w) => Self::not_found(format!("worker {w} is not registered")),
            BrokerError::Illegal(t) => Self::new(StatusCode::CONFLICT, "conflict", t.to_string()),
            BrokerError::LeaseLost(id) => {
                Self::new(StatusCode::CONFLICT, "conflict", format!("lease lost for job {id}"))
            }
            BrokerError::ResultTooLarge { .. } => Self::too_large(e.to_string()),
            other => {
                tracing::warn!(error = %other, "broker unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("the queue is unavailable: {other}"),
                )
            }
        }
    }
}

/// Result alias of the handlers.
pub type ApiResult<T> = Result<T, ApiError>;
