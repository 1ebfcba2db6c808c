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

/// Parses a JSON body. A key given twice in one object is refused (`{"service": "a", "service":
/// "b"}` has no one meaning; a parser that keeps the last lets a check see one value and the
/// store another).
pub(crate) fn json_body(bytes: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice::<Unique>(bytes).map(|u| u.0).map_err(|e| ApiError {
        field: Some("body".into()),
        ..ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON: {e}"))
    })
}

/// A JSON value whose objects have no repeated key.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("the key {key:?} is given twice")));
            }
            let Unique(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
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
    fn a_key_given_twice_is_refused_at_any_depth() {
        assert!(json_body(br#"{"service":"a","payload":{"x":[1,{"y":null}]}}"#).is_ok());
        for body in [
            &br#"{"service":"simulation","service":"other"}"#[..],
            br#"{"payload":{"a":1,"a":2}}"#,
            br#"[{"service":"a"},{"k":1,"k":1}]"#,
        ] {
            let e = json_body(body).expect_err("a repeated key");
            assert!(e.message.contains("given twice"), "{}", e.message);
            assert_eq!(e.field.as_deref(), Some("body"));
        }
        let v = json_body(br#"{"n": 1.5, "big": 18446744073709551615, "neg": -3}"#).expect("numbers");
        assert_eq!(v, serde_json::json!({"n": 1.5, "big": 18_446_744_073_709_551_615_u64, "neg": -3}));
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
