//! The API's contract as a whole: the OpenAPI document matches what the router serves and is
//! well-formed; every route × every role (and no token) gets the right answer; malformed and
//! oversized bodies at every POST route get a 4xx and leave the server healthy.

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use common::{app, call, call_raw, submit};
use fleetq_api::{ApiConfig, ROUTES, Role, Tokens, openapi_document};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-1";
const SUBMIT: &str = "submit-secret-1";
const READ: &str = "read-secret-1";

fn tokens() -> Tokens {
    Tokens::parse([format!("admin:{ADMIN},submit:{SUBMIT}").as_str(), &format!("read:{READ}")])
        .expect("tokens")
}

/// A concrete path for a route template.
fn concrete(path: &str, job: &str) -> String {
    path.replace("{id}", job).replace("{service}", "sim").replace("{name}", "out.png")
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let a = app(ApiConfig::default());
    let job = submit(&a.router, json!({"service": "sim"})).await;
    for r in ROUTES {
        let (s, v) = call(&a.router, r.method, &concrete(r.path, &job), Some("{}"), &[]).await;
        let unrouted = v["error"]["message"].as_str().is_some_and(|m| m.contains("no such route"))
            || s == StatusCode::METHOD_NOT_ALLOWED;
        assert!(!unrouted, "{} {} is documented but not served ({s})", r.method, r.path);
    }
}

#[test]
fn openapi_document_is_well_formed() {
    let doc = openapi_document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().unwrap();
    let mut op_ids = BTreeSet::new();
    let mut count = 0;
    for (path, item) in paths {
        assert!(path.starts_with('/'), "{path}");
        let templated: BTreeSet<&str> =
            path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        for (method, op) in item.as_object().unwrap() {
            assert!(["get", "post", "put", "delete", "patch"].contains(&method.as_str()), "{method}");
            count += 1;
            assert!(op_ids.insert(op["operationId"].as_str().unwrap().to_owned()), "operationIds are unique");
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "path parameters are required");
                    p["name"].as_str().unwrap()
                })
                .collect();
            assert_eq!(declared, templated, "{method} {path}: every path parameter declared");
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty());
            for (code, resp) in responses {
                assert!(code.len() == 3 && code.parse::<u16>().is_ok(), "{code}");
                assert!(resp["description"].is_string(), "{method} {path} {code}");
            }
        }
    }
    assert_eq!(count, ROUTES.len(), "one operation per route");
    // Every $ref resolves inside the document.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} resolves");
    }
}

#[tokio::test]
async fn openapi_is_served() {
    let a = app(ApiConfig::default());
    let (s, v) = call(&a.router, "GET", "/openapi.json", None, &[]).await;
    assert_eq!((s, v), (StatusCode::OK, openapi_document()));
}

#[tokio::test]
async fn auth_matrix_every_route_every_role() {
    let a = app(ApiConfig { tokens: tokens(), ..ApiConfig::default() });
    let job = {
        let (s, v) = call(
            &a.router,
            "POST",
            "/api/jobs",
            Some(r#"{"service":"sim"}"#),
            &[("authorization", &format!("Bearer {SUBMIT}"))],
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        v["id"].as_str().unwrap().to_owned()
    };
    type Caller = (&'static str, Option<Role>, Vec<(&'static str, String)>);
    let who: [Caller; 6] = [
        ("no token", None, vec![]),
        ("unknown token", None, vec![("authorization", "Bearer not-a-token".into())]),
        ("read", Some(Role::Read), vec![("authorization", format!("Bearer {READ}"))]),
        ("submit", Some(Role::Submit), vec![("authorization", format!("Bearer {SUBMIT}"))]),
        ("admin", Some(Role::Admin), vec![("authorization", format!("Bearer {ADMIN}"))]),
        ("admin cookie", Some(Role::Admin), vec![("cookie", format!("theme=dark; fleetq_token={ADMIN}"))]),
    ];
    for r in ROUTES {
        for (name, role, headers) in &who {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = (r.method == "POST").then_some(r#"{"service":"sim"}"#);
            let (s, v) = call(&a.router, r.method, &concrete(r.path, &job), body, &headers).await;
            let expected = match (r.role, role) {
                (None, _) => None,
                (Some(_), None) => Some(StatusCode::UNAUTHORIZED),
                (Some(need), Some(have)) if *have < need => Some(StatusCode::FORBIDDEN),
                _ => None,
            };
            match expected {
                Some(code) => {
                    assert_eq!(s, code, "{} {} as {name}: {v}", r.method, r.path);
                    assert!(v["error"]["code"].is_string(), "JSON error");
                }
                None => assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{} {} as {name} should pass auth, got {s}: {v}",
                    r.method,
                    r.path
                ),
            }
        }
    }
    // Browsers' EventSource and WebSocket cannot send headers: the query token works too.
    let (s, _) = call(&a.router, "GET", &format!("/api/jobs?access_token={READ}"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn auth_off_without_tokens() {
    let a = app(ApiConfig::default());
    let (s, _) = call(&a.router, "POST", "/api/jobs", Some(r#"{"service":"sim"}"#), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
}

/// A small deterministic generator for the fuzz bodies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_4xx_and_the_server_stays_healthy() {
    let limit = 32 * 1024;
    let a = app(ApiConfig { max_body_bytes: limit, ..ApiConfig::default() });
    let job = submit(&a.router, json!({"service": "sim"})).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut bodies: Vec<Vec<u8>> = [
        "",
        "null",
        "{",
        "}",
        "[",
        "[]",
        "[[]]",
        "\"x\"",
        "0",
        "-1e999",
        "1e999",
        "true",
        "{\"service\":}",
        "{\"service\": null}",
        "{\"service\": 5}",
        "{\"service\": \"\"}",
        "{\"service\": \"a b\"}",
        "{\"service\": \"sim\", \"priority\": 99999999999}",
        "{\"service\": \"sim\", \"max_attempts\": 0}",
        "{\"service\": \"sim\", \"timeout_ms\": -5}",
        "{\"service\": \"sim\", \"requirements\": []}",
        "{\"service\": \"sim\", \"requirements\": {\"models\": 5}}",
        "{\"service\": \"sim\", \"unknown\": 1}",
        "[{\"service\": \"sim\"}, 5]",
        "{\"service\":\"sim\"}{\"service\":\"sim\"}",
        "\u{0}",
        "\u{feff}{}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    bodies.push("[".repeat(100_000).into_bytes());
    bodies.push(
        format!("{{\"service\":\"sim\",\"payload\":{}1{}}}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
    );
    bodies.push(vec![b'x'; limit + 1]);
    bodies.push(format!("{{\"service\":\"sim\",\"payload\":\"{}\"}}", "a".repeat(limit)).into_bytes());
    for n in [1, 7, 64, 1000, 20_000] {
        for _ in 0..4 {
            bodies.push(rng.bytes(n));
        }
    }
    let posts: Vec<String> =
        ROUTES.iter().filter(|r| r.method == "POST").map(|r| r.path.replace("{id}", &job)).collect();
    assert!(posts.len() >= 3);
    for path in &posts {
        for body in &bodies {
            for ct in ["application/json", "text/plain"] {
                let (s, bytes) =
                    call_raw(&a.router, "POST", path, Some(body.clone()), &[("content-type", ct)]).await;
                let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
                if path == "/api/jobs" {
                    assert!(s.is_client_error(), "POST {path} {shown:?} → {s}");
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    assert!(v["error"]["code"].is_string(), "POST {path} {shown:?} → a JSON error, got {v}");
                } else {
                    // cancel / retry take no body: whatever is sent, they answer (never 5xx).
                    assert!(!s.is_server_error(), "POST {path} {shown:?} → {s}");
                }
            }
        }
    }
    let (s, _) = call(&a.router, "GET", "/health", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&a.router, "GET", "/ready", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (_, page) = call(&a.router, "GET", "/api/jobs?status=pending", None, &[]).await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "no garbage was enqueued");
}

#[tokio::test]
async fn submit_tokens_act_only_on_their_own_jobs() {
    let tokens =
        Tokens::parse(["submit:alice:alice-secret,submit:bob:bob-secret", &format!("admin:{ADMIN}")])
            .expect("tokens");
    let a = app(ApiConfig { tokens, ..ApiConfig::default() });
    let as_ = |t: &str| format!("Bearer {t}");
    let (alice, bob, admin) = (as_("alice-secret"), as_("bob-secret"), as_(ADMIN));
    // A client cannot claim another owner: the API stamps the caller.
    let body = r#"{"service": "sim", "owner": "bob"}"#;
    let (s, v) = call(&a.router, "POST", "/api/jobs", Some(body), &[("authorization", &alice)]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    let (_, job) =
        call(&a.router, "GET", &format!("/api/jobs/{id}"), None, &[("authorization", &admin)]).await;
    assert_eq!(job["spec"]["owner"], "alice");
    let cancel = format!("/api/jobs/{id}/cancel");
    let (s, e) = call(&a.router, "POST", &cancel, None, &[("authorization", &bob)]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "bob cannot cancel alice's job"
    );
    let (s, v) = call(&a.router, "POST", &cancel, None, &[("authorization", &alice)]).await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("cancelled")));
    let (s, v) =
        call(&a.router, "POST", "/api/jobs", Some(r#"{"service": "sim"}"#), &[("authorization", &bob)]).await;
    assert_eq!(s, StatusCode::CREATED);
    let theirs = format!("/api/jobs/{}/cancel", v["id"].as_str().expect("id"));
    let (s, _) = call(&a.router, "POST", &theirs, None, &[("authorization", &admin)]).await;
    assert_eq!(s, StatusCode::OK, "admin cancels any job");
    let (s, _) = call(&a.router, "POST", "/api/jobs/missing/cancel", None, &[("authorization", &bob)]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
