//! Reading a request: the query string as the route's type (unknown parameters refused by name),
//! the body (413 over the limit) and JSON bodies, each failure a JSON error naming what was wrong.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;
use utoipa::IntoParams;
use utoipa::openapi::path::ParameterIn;

use crate::error::{ApiError, ApiResult};

/// A route's query parameters read as its type `T`, whose fields are the route's documented
/// parameters (`IntoParams`, so the OpenAPI document lists exactly what is read). A parameter `T`
/// does not have is refused by its name (a typo should not silently widen a listing), one given
/// twice too (`limit=1&limit=2` has no one meaning), and a value that does not read names its
/// parameter.
#[derive(Debug)]
pub(crate) struct TypedQuery<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for TypedQuery<T>
where
    T: DeserializeOwned + IntoParams,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        read_query(parts.uri.query().unwrap_or("")).map(TypedQuery)
    }
}

/// [`TypedQuery`]'s reading of a query string.
fn read_query<T: DeserializeOwned + IntoParams>(query: &str) -> ApiResult<T> {
    let known: Vec<String> =
        T::into_params(|| Some(ParameterIn::Query)).into_iter().map(|p| p.name).collect();
    let mut seen = HashSet::new();
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        if !known.iter().any(|k| *k == name) {
            let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
            return Err(ApiError::bad_request(&name, format!("unknown parameter; known: {known}")));
        }
        if !seen.insert(name.clone()) {
            return Err(ApiError::bad_request(&name, "given more than once"));
        }
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { "query".to_owned() } else { field };
        ApiError::bad_request(&field, e.into_inner().to_string())
    })
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

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// A query of the shape the routes use.
    #[derive(Debug, Deserialize, IntoParams)]
    #[allow(dead_code, reason = "read by the assertions through Debug")]
    struct Q {
        /// A number.
        limit: Option<usize>,
        /// A word.
        name: Option<String>,
    }

    fn field(r: ApiResult<Q>) -> Option<String> {
        r.err().and_then(|e| e.field)
    }

    #[test]
    fn a_query_reads_as_its_type_and_names_what_is_wrong() {
        let q: Q = read_query("limit=5&name=a%20b").expect("a valid query");
        assert_eq!((q.limit, q.name.as_deref()), (Some(5), Some("a b")));
        assert!(read_query::<Q>("").is_ok());
        assert_eq!(field(read_query("limt=5")), Some("limt".into()), "a typo is named");
        assert_eq!(field(read_query("limit=1&limit=2")), Some("limit".into()), "no silent pick");
        assert_eq!(field(read_query("limit=many")), Some("limit".into()), "a bad value names its parameter");
    }
}
