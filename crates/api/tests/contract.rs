//! The API's contract as a whole: the OpenAPI document matches what the router serves, is
//! well-formed, and its schemas accept the responses the server really sends; every route × every
//! role (and no token) gets the right answer; malformed and oversized bodies at every POST route get
//! a 4xx and leave the server healthy.

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use common::{app, call, call_raw, submit};
use fleetq_api::{ApiConfig, Role, Tokens, openapi_document};
use fleetq_broker::{Fleet, Queue};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-1";
const SUBMIT: &str = "submit-secret-1";
const READ: &str = "read-secret-1";

fn tokens() -> Tokens {
    Tokens::parse([format!("admin:{ADMIN},submit:{SUBMIT}").as_str(), &format!("read:{READ}")])
        .expect("tokens")
}

/// Every operation the API must serve, with the role it needs: the contract the document and the
/// auth middleware are both checked against (stated here, not read from either).
const EXPECTED: &[(&str, &str, Option<Role>)] = &[
    ("POST", "/api/jobs", Some(Role::Submit)),
    ("GET", "/api/jobs", Some(Role::Read)),
    ("GET", "/api/jobs/{id}", Some(Role::Read)),
    ("POST", "/api/jobs/{id}/cancel", Some(Role::Submit)),
    ("POST", "/api/jobs/{id}/retry", Some(Role::Admin)),
    ("POST", "/api/bulk", Some(Role::Admin)),
    ("POST", "/api/services/{service}/pause", Some(Role::Admin)),
    ("POST", "/api/services/{service}/resume", Some(Role::Admin)),
    ("GET", "/api/jobs/{id}/events", Some(Role::Read)),
    ("GET", "/api/jobs/{id}/matching-workers", Some(Role::Read)),
    ("GET", "/api/jobs/{id}/artifacts/{name}", Some(Role::Read)),
    ("GET", "/api/workers", Some(Role::Read)),
    ("GET", "/api/machines", Some(Role::Read)),
    ("GET", "/api/services", Some(Role::Read)),
    ("GET", "/api/services/{service}/summary", Some(Role::Read)),
    ("GET", "/api/services/{service}/instances", Some(Role::Read)),
    ("GET", "/api/snapshot", Some(Role::Read)),
    ("GET", "/api/stats", Some(Role::Read)),
    ("GET", "/api/events", Some(Role::Read)),
    ("GET", "/api/me", Some(Role::Read)),
    ("GET", "/ws/monitor", Some(Role::Read)),
    ("GET", "/ws/client", Some(Role::Submit)),
    ("GET", "/health", None),
    ("GET", "/ready", Some(Role::Read)),
    ("GET", "/metrics", Some(Role::Read)),
    ("GET", "/openapi.json", Some(Role::Read)),
];

/// (METHOD, path, x-fleetq-role) of every operation in the document.
fn documented() -> BTreeSet<(String, String, Option<String>)> {
    let doc = openapi_document();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let role = op["x-fleetq-role"].as_str().map(str::to_owned);
            out.insert((method.to_uppercase(), path.clone(), role));
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_expected_operations_and_roles() {
    let expected: BTreeSet<(String, String, Option<String>)> = EXPECTED
        .iter()
        .map(|(m, p, r)| ((*m).to_owned(), (*p).to_owned(), r.map(|r| r.as_str().to_owned())))
        .collect();
    assert_eq!(documented(), expected);
}

/// A concrete path for a route template.
fn concrete(path: &str, job: &str) -> String {
    path.replace("{id}", job).replace("{service}", "sim").replace("{name}", "out.png")
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let a = app(ApiConfig::default());
    let job = submit(&a.router, json!({"service": "sim"})).await;
    for (method, path, _) in documented() {
        let (s, v) = call(&a.router, &method, &concrete(&path, &job), Some("{}"), &[]).await;
        let unrouted = v["error"]["message"].as_str().is_some_and(|m| m.contains("no such route"))
            || s == StatusCode::METHOD_NOT_ALLOWED;
        assert!(!unrouted, "{method} {path} is documented but not served ({s})");
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
                .map_or(&[][..], Vec::as_slice)
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
    assert_eq!(count, EXPECTED.len(), "one operation per route");
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

/// The document states the constraints the server enforces, so a client generated from it (or
/// a fuzzer reading it) refuses what the server would refuse.
#[test]
fn the_document_states_the_servers_constraints() {
    let doc = openapi_document();
    let spec = &doc["components"]["schemas"]["JobSpec"]["properties"];
    assert_eq!(spec["service"]["pattern"], "^[A-Za-z0-9][A-Za-z0-9._:-]*$");
    assert_eq!(
        (spec["service"]["minLength"].as_u64(), spec["service"]["maxLength"].as_u64()),
        (Some(1), Some(128))
    );
    assert_eq!(
        (spec["max_attempts"]["minimum"].as_u64(), spec["max_attempts"]["maximum"].as_u64()),
        (Some(1), Some(100))
    );
    assert_eq!(spec["timeout_ms"]["minimum"].as_u64(), Some(1));
    assert_eq!(spec["retry_backoff_ms"]["maximum"].as_u64(), Some(300_000));
    let list = doc["paths"]["/api/jobs"]["get"]["parameters"].as_array().expect("parameters");
    let limit = list.iter().find(|p| p["name"] == "limit").expect("limit");
    assert_eq!(
        (limit["schema"]["minimum"].as_u64(), limit["schema"]["maximum"].as_u64()),
        (Some(1), Some(1000))
    );
    // Every route that takes an id or a query can answer 400, and every broker-backed route 503.
    for (path, method) in [
        ("/api/jobs/{id}", "get"),
        ("/api/jobs/{id}/cancel", "post"),
        ("/api/jobs/{id}/retry", "post"),
        ("/api/jobs/{id}/events", "get"),
        ("/api/jobs/{id}/matching-workers", "get"),
        ("/api/jobs", "get"),
    ] {
        let responses = &doc["paths"][path][method]["responses"];
        assert!(responses.get("400").is_some(), "{method} {path} documents its 400");
        assert!(responses.get("503").is_some(), "{method} {path} documents its 503");
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
        // The page: its cookie, and the Origin a browser sends with it (its own).
        (
            "admin cookie",
            Some(Role::Admin),
            vec![
                ("cookie", format!("theme=dark; fleetq_token={ADMIN}")),
                ("host", "api.test:7777".into()),
                ("origin", "http://api.test:7777".into()),
            ],
        ),
    ];
    for &(method, path, need) in EXPECTED {
        for (name, role, headers) in &who {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = (method == "POST").then_some(r#"{"service":"sim"}"#);
            let (s, v) = call(&a.router, method, &concrete(path, &job), body, &headers).await;
            let expected = match (need, role) {
                (None, _) => None,
                (Some(_), None) => Some(StatusCode::UNAUTHORIZED),
                (Some(need), Some(have)) if *have < need => Some(StatusCode::FORBIDDEN),
                // Every owner's jobs: a submit token follows its own with /api/events instead.
                (Some(_), Some(Role::Submit)) if path == "/ws/monitor" => Some(StatusCode::FORBIDDEN),
                _ => None,
            };
            match expected {
                Some(code) => {
                    assert_eq!(s, code, "{method} {path} as {name}: {v}");
                    assert!(v["error"]["code"].is_string(), "JSON error");
                }
                None => assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{method} {path} as {name} should pass auth, got {s}: {v}"
                ),
            }
        }
    }
    // Browsers' EventSource and WebSocket cannot send headers: on event streams the query token
    // works too (an unknown job's stream answers 404, past auth)…
    let (s, _) =
        call(&a.router, "GET", &format!("/api/jobs/nope/events?access_token={READ}"), None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // …and nowhere else, so tokens stay out of the access logs of ordinary requests.
    let (s, _) = call(&a.router, "GET", &format!("/api/jobs?access_token={READ}"), None, &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
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
    let posts: Vec<String> = documented()
        .into_iter()
        .filter(|(m, ..)| m == "POST")
        .map(|(_, p, _)| p.replace("{id}", &job))
        .collect();
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
    // Reads of one job: another owner's job does not exist for a submit token.
    for path in [
        format!("/api/jobs/{id}"),
        format!("/api/jobs/{id}/matching-workers"),
        format!("/api/jobs/{id}/events"),
    ] {
        let (s, e) = call(&a.router, "GET", &path, None, &[("authorization", &bob)]).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "bob reads {path}"
        );
        let (s, _) = call(&a.router, "GET", &path, None, &[("authorization", &alice)]).await;
        assert_eq!(s, StatusCode::OK, "alice reads {path}");
        let (s, _) = call(&a.router, "GET", &path, None, &[("authorization", &admin)]).await;
        assert_eq!(s, StatusCode::OK, "admin reads {path}");
    }
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

    // Listings: a submit token lists its own jobs (newest first and in queue order); read and
    // admin tokens list everyone's, and may narrow by owner.
    let (_, v) =
        call(&a.router, "POST", "/api/jobs", Some(r#"{"service": "sim"}"#), &[("authorization", &alice)])
            .await;
    let alices_pending = v["id"].as_str().expect("id").to_owned();
    let (_, v) =
        call(&a.router, "POST", "/api/jobs", Some(r#"{"service": "sim"}"#), &[("authorization", &bob)]).await;
    let bobs_pending = v["id"].as_str().expect("id").to_owned();
    let owners = |page: &Value| -> BTreeSet<String> {
        page["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["owner"].as_str().unwrap_or("-").to_owned())
            .collect()
    };
    for list in ["/api/jobs", "/api/jobs?order=queue", "/api/jobs?owner=bob"] {
        let (s, page) = call(&a.router, "GET", list, None, &[("authorization", &bob)]).await;
        assert_eq!(s, StatusCode::OK, "{list}: {page}");
        assert_eq!(owners(&page), BTreeSet::from(["bob".to_owned()]), "bob lists {list}");
    }
    let (s, e) = call(&a.router, "GET", "/api/jobs?owner=alice", None, &[("authorization", &bob)]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("owner")), "{e}");
    let (_, page) = call(&a.router, "GET", "/api/jobs", None, &[("authorization", &admin)]).await;
    assert_eq!(owners(&page), BTreeSet::from(["alice".to_owned(), "bob".to_owned()]));
    let (_, page) = call(&a.router, "GET", "/api/jobs?owner=alice", None, &[("authorization", &admin)]).await;
    assert_eq!(owners(&page), BTreeSet::from(["alice".to_owned()]));
    // The snapshot: a submit token's holds its own unfinished jobs (and the fleet).
    let (_, snap) = call(&a.router, "GET", "/api/snapshot", None, &[("authorization", &bob)]).await;
    let ids: Vec<&String> = snap["jobs"].as_object().expect("jobs").keys().collect();
    assert_eq!(ids, vec![&bobs_pending], "{snap}");
    let (_, snap) = call(&a.router, "GET", "/api/snapshot", None, &[("authorization", &admin)]).await;
    assert!(snap["jobs"].as_object().expect("jobs").contains_key(&alices_pending));
    // The monitor's WebSocket carries every owner's jobs: not for a submit token.
    let (s, e) = call(&a.router, "GET", "/ws/monitor", None, &[("authorization", &bob)]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{e}");
}

/// Validates `body` against the schema the document gives for `method path` answering `status`
/// (JSON Schema 2020-12, which OpenAPI 3.1 schemas are; `$ref`s resolve inside the document).
fn conforms(doc: &Value, method: &str, path: &str, status: StatusCode, body: &Value) {
    let errors = schema_errors(doc, method, path, status, body);
    assert!(errors.is_empty(), "{method} {path} {status}: {errors:?}\n{body}");
}

/// The document with undocumented fields refused: `unevaluatedProperties: false` on every object
/// schema, except the components that other schemas flatten into themselves (members of an `allOf`,
/// directly or through a `oneOf`), whose fields the flattening schema evaluates instead.
fn strict(doc: &Value) -> Value {
    fn flattened(v: &Value, out: &mut BTreeSet<String>) {
        fn member(m: &Value, out: &mut BTreeSet<String>) {
            if let Some(r) = m["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
                out.insert(r.to_owned());
            }
            for alt in ["oneOf", "anyOf"].iter().filter_map(|k| m[*k].as_array()).flatten() {
                member(alt, out);
            }
        }
        match v {
            Value::Object(m) => {
                for x in m.get("allOf").and_then(Value::as_array).into_iter().flatten() {
                    member(x, out);
                }
                m.values().for_each(|x| flattened(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| flattened(x, out)),
            _ => {}
        }
    }
    fn tighten(v: &mut Value) {
        let Some(m) = v.as_object_mut() else { return };
        if m.contains_key("properties") || m.contains_key("allOf") {
            m.insert("unevaluatedProperties".into(), json!(false));
        }
        // Not into allOf members: their fields are evaluated by this schema.
        for (k, x) in m.iter_mut() {
            match k.as_str() {
                "properties" => x.as_object_mut().into_iter().flat_map(|p| p.values_mut()).for_each(tighten),
                "items" | "additionalProperties" => tighten(x),
                "oneOf" | "anyOf" => x.as_array_mut().into_iter().flatten().for_each(tighten),
                _ => {}
            }
        }
    }
    let mut doc = doc.clone();
    let mut skip = BTreeSet::new();
    flattened(&doc, &mut skip);
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            if !skip.contains(name) {
                tighten(schema);
            }
        }
    }
    doc
}

fn schema_errors(doc: &Value, method: &str, path: &str, status: StatusCode, body: &Value) -> Vec<String> {
    let pointer = format!(
        "#/paths/{}/{}/responses/{}/content/application~1json/schema",
        path.replace('~', "~0").replace('/', "~1").replace('{', "%7B").replace('}', "%7D"),
        method.to_lowercase(),
        status.as_u16()
    );
    assert!(
        doc.pointer(&pointer[1..].replace("%7B", "{").replace("%7D", "}")).is_some(),
        "{method} {path} answered {status}, which the document does not describe: {body}"
    );
    let mut root = strict(doc);
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["$ref"] = json!(pointer);
    let validator = jsonschema::validator_for(&root).expect("the document is a valid schema");
    validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

#[tokio::test]
async fn live_responses_conform_to_the_documented_schemas() {
    let doc = openapi_document();
    let a = app(ApiConfig::default());
    let b = a.broker.as_ref();
    common::worker(b, "w1", "sim").await;
    b.machine_event(fleetq_core::MachineEvent {
        machine_id: "m1".into(),
        phase: fleetq_core::MachinePhase::Ready,
        step: Some("workers".into()),
        message: Some("all up".into()),
        at: common::now_ms(),
    })
    .await
    .unwrap();
    // A completed job (statistics, an outcome), a running one, a failed one, pending ones.
    let done =
        submit(&a.router, json!({"service": "sim", "workflow_id": "wf", "payload": {"note": 1}})).await;
    let lease = common::claim(b, "w1").await;
    b.complete(&lease.as_ref(), json!({"images": ["a.png"]})).await.unwrap();
    let failed = submit(&a.router, json!({"service": "sim", "max_attempts": 1})).await;
    let lease = common::claim(b, "w1").await;
    b.fail(&lease.as_ref(), fleetq_core::JobError::fatal(fleetq_core::FailureCategory::Service, "boom"))
        .await
        .unwrap();
    let running = submit(&a.router, json!({"service": "sim", "customer_id": "c1"})).await;
    let lease = common::claim(b, "w1").await;
    b.progress(&lease.as_ref(), 40.0, Some("step 2/5".into())).await.unwrap();
    let pending =
        submit(&a.router, json!({"service": "sim", "requirements": {"hardware": {"gpu_memory_gb": 8}}}))
            .await;

    let gets: Vec<String> = vec![
        "/api/jobs".into(),
        "/api/jobs?order=queue".into(),
        "/api/jobs?status=completed&limit=1".into(),
        format!("/api/jobs/{done}"),
        format!("/api/jobs/{failed}"),
        format!("/api/jobs/{running}"),
        format!("/api/jobs/{pending}"),
        format!("/api/jobs/{pending}/matching-workers"),
        "/api/jobs/missing".into(),
        "/api/jobs?status=bogus".into(),
        "/api/workers".into(),
        "/api/machines".into(),
        "/api/services".into(),
        "/api/services/sim/summary".into(),
        "/api/services/sim/instances".into(),
        "/api/services/none/summary".into(),
        "/api/snapshot".into(),
        "/api/stats".into(),
        "/health".into(),
        "/ready".into(),
    ];
    for uri in &gets {
        let (s, v) = call(&a.router, "GET", uri, None, &[]).await;
        let path = route_of(uri);
        conforms(&doc, "GET", &path, s, &v);
    }
    let posts: Vec<(String, String)> = vec![
        ("/api/jobs".into(), json!({"service": "sim"}).to_string()),
        ("/api/jobs".into(), json!([{"service": "sim"}, {"service": "sim", "priority": 3}]).to_string()),
        ("/api/jobs".into(), json!({"service": ""}).to_string()),
        ("/api/jobs".into(), "{".into()),
        (format!("/api/jobs/{pending}/cancel"), String::new()),
        (format!("/api/jobs/{running}/cancel"), String::new()),
        (format!("/api/jobs/{done}/cancel"), String::new()),
        (format!("/api/jobs/{failed}/retry"), String::new()),
        (format!("/api/jobs/{done}/retry"), String::new()),
    ];
    for (uri, body) in &posts {
        let (s, v) = call(&a.router, "POST", uri, Some(body), &[]).await;
        conforms(&doc, "POST", &route_of(uri), s, &v);
    }
    // The check has teeth: a job whose status is not a status, with an undocumented field, or
    // without its spec, is refused.
    let (_, mut job) = call(&a.router, "GET", &format!("/api/jobs/{done}"), None, &[]).await;
    job["status"] = json!("finished");
    assert!(!schema_errors(&doc, "GET", "/api/jobs/{id}", StatusCode::OK, &job).is_empty());
    job["status"] = json!("completed");
    let mut undocumented = job.clone();
    undocumented["colour"] = json!("blue");
    assert!(
        !schema_errors(
            &doc,
            "GET",
            "/api/workers",
            StatusCode::OK,
            &json!({"workers": [], "seq": 1, "x": 1})
        )
        .is_empty()
    );
    assert!(!schema_errors(&doc, "GET", "/api/jobs/{id}", StatusCode::OK, &undocumented).is_empty());
    job.as_object_mut().unwrap().remove("spec");
    assert!(!schema_errors(&doc, "GET", "/api/jobs/{id}", StatusCode::OK, &job).is_empty());
    // An idempotent replay answers 200 with the same shape.
    let key = [("idempotency-key", "k-1")];
    for _ in 0..2 {
        let (s, v) = call(&a.router, "POST", "/api/jobs", Some(r#"{"service":"sim"}"#), &key).await;
        conforms(&doc, "POST", "/api/jobs", s, &v);
    }
}

/// The documented route template of a concrete request URI.
fn route_of(uri: &str) -> String {
    let path = uri.split('?').next().unwrap_or(uri);
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "api", "jobs", _] => "/api/jobs/{id}".into(),
        ["", "api", "jobs", _, rest] => format!("/api/jobs/{{id}}/{rest}"),
        ["", "api", "services", _, rest] => format!("/api/services/{{service}}/{rest}"),
        _ => path.to_owned(),
    }
}

/// The pages and their files are open with auth on (they hold no data); `/api/me` names the
/// caller's role, and asks for a token like every other API route.
#[tokio::test]
async fn the_pages_are_open_and_me_names_the_role() {
    let a = app(ApiConfig { tokens: tokens(), ..ApiConfig::default() });
    for path in ["/", "/client", "/web/js/monitor.js", "/web/style.css"] {
        let (s, body) = call_raw(&a.router, "GET", path, None, &[]).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    let (s, _) = call(&a.router, "GET", "/web/nothing.js", None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&a.router, "GET", "/api/me", None, &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let bearer = format!("Bearer {READ}");
    let (s, me) = call(&a.router, "GET", "/api/me", None, &[("authorization", &bearer)]).await;
    assert_eq!((s, me["auth"].clone(), me["role"].clone()), (StatusCode::OK, json!(true), json!("read")));
    let open = app(ApiConfig::default());
    let (_, me) = call(&open.router, "GET", "/api/me", None, &[]).await;
    assert_eq!((me["auth"].clone(), me["role"].clone()), (json!(false), json!("admin")));
}

/// Cross-site request forgery: a write from another origin's page is refused whatever carries the
/// token (with auth off too), a write authenticated by the page cookie must name its origin, and
/// clients that are not browsers (no Origin, a header token) and the API's own pages still write.
#[tokio::test]
async fn only_the_apis_own_pages_may_write() {
    let body = Some(r#"{"service": "sim"}"#);
    let host = ("host", "127.0.0.1:7777");
    let cookie = ("cookie", "fleetq_token=submit-secret-1");
    for tokens in [Tokens::default(), tokens()] {
        let auth_on = !tokens.is_empty();
        let a = app(ApiConfig {
            tokens,
            cors_origins: vec!["https://studio.example".into()],
            ..ApiConfig::default()
        });
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut h = vec![host];
            if auth_on && !extra.iter().any(|(k, _)| *k == "cookie") {
                h.push(("authorization", "Bearer submit-secret-1"));
            }
            h.extend_from_slice(extra);
            h
        };
        // A same-site page on another port (a ComfyUI beside the API), text/plain or not.
        let other = [("origin", "http://127.0.0.1:8188"), ("content-type", "text/plain")];
        let (s, e) = call(&a.router, "POST", "/api/jobs", body, &with(&other)).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("cross_origin")),
            "auth {auth_on}"
        );
        let (s, _) = call(&a.router, "POST", "/api/jobs/x/cancel", None, &with(&other)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "a cancel from another origin, auth {auth_on}");
        // The API's own page, a configured CORS origin, and curl.
        for ok in
            [vec![("origin", "http://127.0.0.1:7777")], vec![("origin", "https://studio.example")], vec![]]
        {
            let (s, v) = call(&a.router, "POST", "/api/jobs", body, &with(&ok)).await;
            assert_eq!(s, StatusCode::CREATED, "{ok:?}, auth {auth_on}: {v}");
        }
        if auth_on {
            let (s, e) = call(&a.router, "POST", "/api/jobs", body, &with(&[cookie])).await;
            assert_eq!(
                (s, e["error"]["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("cross_origin")),
                "a cookie write without Origin"
            );
            let own = [cookie, ("origin", "http://127.0.0.1:7777")];
            let (s, v) = call(&a.router, "POST", "/api/jobs", body, &with(&own)).await;
            assert_eq!(s, StatusCode::CREATED, "the page itself: {v}");
        }
    }
}
