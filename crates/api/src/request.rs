//! Reading a request: the query string (unknown parameters refused by name), the body (413 over
//! the limit) and JSON bodies, each failure a JSON error naming what was wrong.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// Query parameters in order, with a JSON error for a malformed query string.
pub(crate) type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Unpacks the query, refusing parameters the route does not know (a typo should not silently
/// widen a listing) and parameters given twice (`limit=1&limit=2` has no one meaning).
pub(crate) fn params(q: Params, known: &[&str]) -> ApiResult<HashMap<String, String>> {
    let Query(pairs) = q.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad_request(&k, format!("unknown parameter; known: {}", known.join(", "))));
        }
        if map.contains_key(&k) {
            return Err(ApiError::bad_request(&k, "given more than once"));
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// The body bytes, with 413 for an oversized body and a JSON error for anything else.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the request body is over the size limit")
        } else {
            ApiError::bad_request("body", e.body_text())
        }
    })
}

/// Parses a JSON body.
pub(crate) fn json_body(bytes: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(bytes).map_err(|e| ApiError {
        field: Some("body".into()),
        ..ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON: {e}"))
    })
}
