//! Router tests without sockets: every route's answers and errors, over a real embedded store.

mod common;

use axum::http::StatusCode;
use common::{app, call, claim, submit, worker};
use fleetq_api::ApiConfig;
use fleetq_broker::{Fleet, Queue};
use fleetq_core::{FailureCategory, JobError};
use serde_json::{Value, json};

#[tokio::test]
async fn submit_get_and_list() {
    let a = app(ApiConfig::default());
    let id =
        submit(&a.router, json!({"service": "sim", "payload": {"note": 1}, "customer_id": "acme"})).await;
    let (s, job) = call(&a.router, "GET", &format!("/api/jobs/{id}"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(job["status"], "pending");
    assert_eq!(job["spec"]["payload"], json!({"note": 1}));
    assert_eq!(job["queue_position"], 1);
    assert_eq!(job["eta_ms"], Value::Null, "no statistics and no worker yet");
    let (s, page) = call(&a.router, "GET", "/api/jobs?customer=acme&limit=5", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let (_, page) = call(&a.router, "GET", "/api/jobs?customer=other", None, &[]).await;
    assert!(page["jobs"].as_array().unwrap().is_empty());
    let (s, e) = call(&a.router, "GET", "/api/jobs?status=weird", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("status")));
    let (s, e) = call(&a.router, "GET", "/api/jobs?limt=5", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limt")), "typos are named");
    let (s, e) = call(&a.router, "GET", "/api/jobs?limit=0", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")));
    let (s, e) = call(&a.router, "GET", "/api/jobs?cursor=garbage", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("cursor")));
    let (s, e) = call(&a.router, "GET", "/api/jobs?order=queue&cursor=garbage", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("cursor")));
    let (s, e) = call(&a.router, "GET", "/api/jobs?limit=1&limit=2", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")), "no silent pick");
    let (s, e) = call(&a.router, "GET", "/api/jobs/nope", None, &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

#[tokio::test]
async fn queue_order_position_and_eta() {
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "sim").await;
    // One completed run gives the statistics an ETA needs.
    let first = submit(&a.router, json!({"service": "sim"})).await;
    let lease = claim(a.broker.as_ref(), "w1").await;
    assert_eq!(lease.job.summary.id.0, first);
    a.broker.complete(&lease.as_ref(), json!({"ok": true})).await.unwrap();
    let low = submit(&a.router, json!({"service": "sim", "priority": 1})).await;
    let high = submit(&a.router, json!({"service": "sim", "priority": 9})).await;
    let (_, page) = call(&a.router, "GET", "/api/jobs?order=queue", None, &[]).await;
    let order: Vec<&str> =
        page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(order, [high.as_str(), low.as_str()]);
    // Paged with the queue's own cursors: the second page starts where the first ended.
    let (_, first_page) = call(&a.router, "GET", "/api/jobs?order=queue&limit=1", None, &[]).await;
    assert_eq!(first_page["jobs"][0]["id"], high.as_str());
    let next = first_page["next"].as_str().expect("a cursor to the second page");
    let (_, second) =
        call(&a.router, "GET", &format!("/api/jobs?order=queue&limit=1&cursor={next}"), None, &[]).await;
    assert_eq!(second["jobs"][0]["id"], low.as_str());
    assert_eq!(second["next"], Value::Null, "the last page");
    let (_, job) = call(&a.router, "GET", &format!("/api/jobs/{low}"), None, &[]).await;
    assert_eq!(job["queue_position"], 2);
    // The statistics fold runs beside the router; wait for it to see the completion.
    let mut eta = Value::Null;
    for _ in 0..100 {
        let (_, job) = call(&a.router, "GET", &format!("/api/jobs/{low}"), None, &[]).await;
        eta = job["eta_ms"].clone();
        if !eta.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(eta.is_u64(), "an ETA once a run completed and a worker serves the service: {eta}");
    let (s, _) = call(&a.router, "GET", "/api/jobs?order=queue&status=completed", None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&a.router, "GET", "/api/jobs?order=sideways", None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn submission_errors_name_the_field() {
    let a = app(ApiConfig { max_body_bytes: 64 * 1024, max_batch: 3, ..ApiConfig::default() });
    let cases: &[(&str, StatusCode, &str, Option<&str>)] = &[
        ("{", StatusCode::BAD_REQUEST, "malformed_json", Some("body")),
        ("", StatusCode::BAD_REQUEST, "malformed_json", Some("body")),
        ("42", StatusCode::UNPROCESSABLE_ENTITY, "invalid", Some("body")),
        (r#"{"payload": 1}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid", Some("service")),
        (
            r#"{"service": "sim", "priority": "high"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("priority"),
        ),
        (
            r#"{"service": "sim", "requirements": {"models": 3}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("requirements.models"),
        ),
        ("[]", StatusCode::UNPROCESSABLE_ENTITY, "invalid", Some("body")),
        (
            r#"[{"service": "sim"}, {"service": "sim", "max_attempts": -1}]"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("[1].max_attempts"),
        ),
        (
            r#"[{"service": "a"}, {"service": "a"}, {"service": "a"}, {"service": "a"}]"#,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            None,
        ),
    ];
    for (body, status, code, field) in cases {
        let (s, e) = call(&a.router, "POST", "/api/jobs", Some(body), &[]).await;
        assert_eq!(s, *status, "{body}: {e}");
        assert_eq!(e["error"]["code"], *code, "{body}: {e}");
        assert_eq!(e["error"]["field"].as_str(), *field, "{body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = format!(r#"{{"service": "sim", "payload": "{}"}}"#, "x".repeat(70 * 1024));
    let (s, e) = call(&a.router, "POST", "/api/jobs", Some(&big), &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
    let (_, page) = call(&a.router, "GET", "/api/jobs", None, &[]).await;
    assert!(page["jobs"].as_array().unwrap().is_empty(), "nothing was enqueued by a refused submission");
}

#[tokio::test]
async fn batches_and_idempotency_keys() {
    let a = app(ApiConfig::default());
    let body = json!([{"service": "sim"}, {"service": "sim"}]).to_string();
    let key = [("idempotency-key", "order-7")];
    let (s, first) = call(&a.router, "POST", "/api/jobs", Some(&body), &key).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, again) = call(&a.router, "POST", "/api/jobs", Some(&body), &key).await;
    assert_eq!(s, StatusCode::OK, "a replay creates nothing");
    assert_eq!(first["jobs"].as_array().unwrap().len(), 2);
    for (f, g) in first["jobs"].as_array().unwrap().iter().zip(again["jobs"].as_array().unwrap()) {
        assert_eq!(f["id"], g["id"]);
        assert_eq!((f["created"].as_bool(), g["created"].as_bool()), (Some(true), Some(false)));
    }
    let one = json!({"service": "sim"}).to_string();
    let (s1, a1) = call(&a.router, "POST", "/api/jobs", Some(&one), &[("idempotency-key", "single")]).await;
    let (s2, a2) = call(&a.router, "POST", "/api/jobs", Some(&one), &[("idempotency-key", "single")]).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(a1["id"], a2["id"]);
    let long = "k".repeat(201);
    let (s, e) = call(&a.router, "POST", "/api/jobs", Some(&one), &[("idempotency-key", &long)]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("Idempotency-Key")));
    let (_, page) = call(&a.router, "GET", "/api/jobs", None, &[]).await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn cancel_retry_and_conflicts() {
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "sim").await;
    let pending = submit(&a.router, json!({"service": "other"})).await;
    let (s, v) = call(&a.router, "POST", &format!("/api/jobs/{pending}/cancel"), None, &[]).await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("cancelled")));
    let (s, v) = call(&a.router, "POST", &format!("/api/jobs/{pending}/cancel"), None, &[]).await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("already_finished")));
    let (s, _) = call(&a.router, "POST", &format!("/api/jobs/{pending}/retry"), None, &[]).await;
    assert_eq!(s, StatusCode::OK, "a cancelled job can be retried");
    let (_, job) = call(&a.router, "GET", &format!("/api/jobs/{pending}"), None, &[]).await;
    assert_eq!(job["status"], "pending");
    let running = submit(&a.router, json!({"service": "sim", "max_attempts": 1})).await;
    let lease = claim(a.broker.as_ref(), "w1").await;
    let (s, e) = call(&a.router, "POST", &format!("/api/jobs/{running}/retry"), None, &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    let (s, v) = call(&a.router, "POST", &format!("/api/jobs/{running}/cancel"), None, &[]).await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("requested")));
    a.broker.fail(&lease.as_ref(), JobError::fatal(FailureCategory::Service, "boom")).await.unwrap();
    let (s, _) = call(&a.router, "POST", "/api/jobs/missing/cancel", None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn fleet_views_and_matching_workers() {
    let a = app(ApiConfig { stale_after: std::time::Duration::from_secs(60), ..ApiConfig::default() });
    worker(a.broker.as_ref(), "w1", "sim").await;
    worker(a.broker.as_ref(), "w2", "sim").await;
    worker(a.broker.as_ref(), "w3", "other").await;
    // w2's report is old: the worker stopped refreshing it.
    a.broker
        .report_connector(
            "w2",
            fleetq_core::ConnectorReport {
                service: "sim".into(),
                status: fleetq_core::ConnectorStatus::Error,
                message: Some("connection refused".into()),
                at: common::now_ms() - 120_000,
                info: None,
            },
        )
        .await
        .unwrap();
    let id = submit(&a.router, json!({"service": "sim"})).await;
    let _lease = claim(a.broker.as_ref(), "w1").await;
    submit(&a.router, json!({"service": "sim"})).await;
    let (s, v) = call(&a.router, "GET", "/api/services", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let sim = &v["services"]["sim"];
    assert_eq!(
        (sim["total"].as_u64(), sim["idle"].as_u64(), sim["error"].as_u64(), sim["stale"].as_u64()),
        (Some(2), Some(1), Some(0), Some(1)),
        "a stale instance counts as stale only: its last status is not known to hold"
    );
    assert_eq!((sim["queue"]["pending"].as_u64(), sim["queue"]["running"].as_u64()), (Some(1), Some(1)));
    assert_eq!(v["success"], true);
    let (s, v) = call(&a.router, "GET", "/api/services/sim/summary", None, &[]).await;
    assert_eq!((s, v["service_type"].as_str(), v["total"].as_u64()), (StatusCode::OK, Some("sim"), Some(2)));
    let (s, v) = call(&a.router, "GET", "/api/services/sim/instances", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2);
    let w2 = inst.iter().find(|i| i["worker_id"] == "w2").unwrap();
    assert_eq!(
        (w2["id"].as_str(), w2["stale"].as_bool(), w2["error_message"].as_str()),
        (Some("m1:w2"), Some(true), Some("connection refused"))
    );
    assert!(w2["last_update"].as_str().unwrap().ends_with('Z'));
    let (s, _) = call(&a.router, "GET", "/api/services/nothing/summary", None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = call(&a.router, "GET", "/api/workers", None, &[]).await;
    let ws = v["workers"].as_array().unwrap();
    let w1 = ws.iter().find(|w| w["worker_id"] == "w1").unwrap();
    assert_eq!((w1["status"].as_str(), w1["current_jobs"][0].as_str()), (Some("busy"), Some(id.as_str())));
    let (_, v) = call(&a.router, "GET", "/api/machines", None, &[]).await;
    assert_eq!(v["machines"][0]["workers"].as_array().unwrap().len(), 3);
    let (_, v) = call(&a.router, "GET", "/api/snapshot", None, &[]).await;
    assert!(v["seq"].as_u64().unwrap() > 0);
    let pending = submit(&a.router, json!({"service": "sim", "requirements": {"gpu": "a100"}})).await;
    let (s, v) = call(&a.router, "GET", &format!("/api/jobs/{pending}/matching-workers"), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let verdict =
        |w: &str| v["workers"].as_array().unwrap().iter().find(|x| x["worker_id"] == w).unwrap().clone();
    assert_eq!(verdict("w1")["verdict"], "incompatible");
    assert!(!verdict("w1")["reasons"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(verdict("w3")["verdict"], "incompatible");
    let open = submit(&a.router, json!({"service": "sim"})).await;
    let (_, v) = call(&a.router, "GET", &format!("/api/jobs/{open}/matching-workers"), None, &[]).await;
    let verdict = |w: &str| {
        v["workers"].as_array().unwrap().iter().find(|x| x["worker_id"] == w).unwrap()["verdict"].clone()
    };
    assert_eq!(
        (verdict("w1"), verdict("w2"), verdict("w3")),
        (json!("busy"), json!("matches"), json!("incompatible"))
    );
}

#[tokio::test]
async fn artifacts_are_served_safely() {
    let dir = tempfile::tempdir().unwrap();
    let a = app(ApiConfig { artifacts_dir: Some(dir.path().to_owned()), ..ApiConfig::default() });
    let id = submit(&a.router, json!({"service": "sim"})).await;
    std::fs::create_dir_all(dir.path().join(&id)).unwrap();
    std::fs::write(dir.path().join(&id).join("out.png"), b"\x89PNG-bytes").unwrap();
    std::fs::write(dir.path().join("secret.txt"), b"no").unwrap();
    let (s, bytes) =
        common::call_raw(&a.router, "GET", &format!("/api/jobs/{id}/artifacts/out.png"), None, &[]).await;
    assert_eq!((s, bytes.as_slice()), (StatusCode::OK, &b"\x89PNG-bytes"[..]));
    for bad in ["..%2Fsecret.txt", "%2E%2E", ".hidden", "missing.png"] {
        let (s, _) = call(&a.router, "GET", &format!("/api/jobs/{id}/artifacts/{bad}"), None, &[]).await;
        assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND, "{bad}: {s}");
    }
    let (s, _) = call(&a.router, "GET", "/api/jobs/..%2F/artifacts/secret.txt", None, &[]).await;
    assert!(s.is_client_error());
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let a = app(ApiConfig::default());
    let (s, e) = call(&a.router, "GET", "/api/nothing", None, &[]).await;
    assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (s, e) = call(&a.router, "DELETE", "/api/jobs", None, &[]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (s, e) = call(&a.router, "GET", "/ws/monitor", None, &[]).await;
    assert!(s.is_client_error(), "a plain GET on a WebSocket route: {s}");
    assert_eq!(e["error"]["code"], "websocket_required");
    let (s, v) = call(&a.router, "GET", "/health", None, &[]).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = call(&a.router, "GET", "/ready", None, &[]).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ready")));
}

#[tokio::test]
async fn metrics_show_queue_depth_and_outcomes() {
    fleetq_api::install_metrics_recorder().expect("recorder");
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "metered").await;
    // The API counts the events after its fold started (which is asynchronous to the router's
    // creation): run jobs until one is counted from its claim (queue wait) to its end, then leave
    // one pending. (A job claimed before the fold started is counted finished without its wait.)
    for _ in 0..100 {
        submit(&a.router, json!({"service": "metered"})).await;
        let lease = claim(a.broker.as_ref(), "w1").await;
        a.broker.complete(&lease.as_ref(), json!(1)).await.unwrap();
        let (s, bytes) = common::call_raw(&a.router, "GET", "/metrics", None, &[]).await;
        assert_eq!(s, StatusCode::OK);
        let text = String::from_utf8(bytes).unwrap();
        if text.contains(r#"fleetq_jobs_finished_total{service="metered",outcome="completed""#)
            && text.contains(r#"fleetq_job_queue_wait_seconds_bucket{service="metered""#)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    submit(&a.router, json!({"service": "metered"})).await;
    let (_, bytes) = common::call_raw(&a.router, "GET", "/metrics", None, &[]).await;
    let text = String::from_utf8(bytes).unwrap();
    for needle in [
        r#"fleetq_queue_depth{service="metered",state="pending"} 1"#,
        r#"fleetq_jobs_finished_total{service="metered",outcome="completed",category=""} "#,
        r#"fleetq_job_duration_seconds_bucket{service="metered""#,
        r#"fleetq_job_queue_wait_seconds_bucket{service="metered""#,
        r#"fleetq_connectors{service="metered",status="idle"} 1"#,
        "fleetq_workers{status=",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn bulk_cancel_and_retry_on_the_server_with_a_dry_run() {
    let a = app(ApiConfig::default());
    let mut a_ids = Vec::new();
    for _ in 0..2 {
        a_ids.push(submit(&a.router, json!({"service": "a"})).await);
    }
    let mut b_ids = Vec::new();
    for _ in 0..3 {
        b_ids.push(submit(&a.router, json!({"service": "b", "customer_id": "acme"})).await);
    }
    let bulk = |body: Value| {
        let router = a.router.clone();
        async move { call(&router, "POST", "/api/bulk", Some(&body.to_string()), &[]).await }
    };
    let by_filter =
        json!({"action": "cancel", "filter": {"status": "pending", "service": "b"}, "dry_run": true});
    let (s, v) = bulk(by_filter.clone()).await;
    assert_eq!((s, v["matched"].as_u64(), v["done"].as_u64()), (StatusCode::OK, Some(3), Some(0)), "{v}");
    let status = |id: String| {
        let router = a.router.clone();
        async move { call(&router, "GET", &format!("/api/jobs/{id}"), None, &[]).await.1["status"].clone() }
    };
    assert_eq!(status(b_ids[0].clone()).await, "pending", "a dry run changes nothing");
    let mut real = by_filter;
    real["dry_run"] = json!(false);
    let (s, v) = bulk(real).await;
    assert_eq!(
        (s, v["matched"].as_u64(), v["done"].as_u64(), v["failed"].as_u64()),
        (StatusCode::OK, Some(3), Some(3), Some(0)),
        "{v}"
    );
    for id in &b_ids {
        assert_eq!(status(id.clone()).await, "cancelled");
    }
    for id in &a_ids {
        assert_eq!(status(id.clone()).await, "pending", "another service's jobs are untouched");
    }
    // By ids: retry two of them; one id that cannot be retried is counted, not fatal.
    let body = json!({"action": "retry", "ids": [b_ids[0], b_ids[1], a_ids[0]]});
    let (s, v) = bulk(body).await;
    assert_eq!((s, v["done"].as_u64(), v["failed"].as_u64()), (StatusCode::OK, Some(2), Some(1)), "{v}");
    assert_eq!(v["errors"][0]["id"], a_ids[0].as_str());
    assert_eq!(status(b_ids[0].clone()).await, "pending");
    // Refusals name the field.
    for (body, field) in [
        (json!({"action": "cancel", "filter": {"service": "a"}}), "filter.status"),
        (json!({"action": "retry", "filter": {"status": "pending"}}), "filter.status"),
        (json!({"action": "cancel"}), "filter"),
        (json!({"action": "cancel", "ids": [], "filter": {"status": "pending"}}), "filter"),
        (json!({"action": "purge", "ids": []}), "body"),
    ] {
        let (s, v) = bulk(body.clone()).await;
        assert_eq!((s, v["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{body}: {v}");
    }
}

#[tokio::test]
async fn finished_jobs_list_the_latest_to_finish_first() {
    let a = app(ApiConfig::default());
    let first = submit(&a.router, json!({"service": "sim"})).await;
    let second = submit(&a.router, json!({"service": "sim"})).await;
    submit(&a.router, json!({"service": "sim"})).await;
    // The second submitted ends first, then the first.
    for id in [&second, &first] {
        let (s, _) = call(&a.router, "POST", &format!("/api/jobs/{id}/cancel"), None, &[]).await;
        assert_eq!(s, StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let (s, page) = call(&a.router, "GET", "/api/jobs?order=finished", None, &[]).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let ids: Vec<&str> =
        page["jobs"].as_array().expect("jobs").iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids, vec![first.as_str(), second.as_str()], "the latest to finish first, nothing unfinished");
    let (s, e) = call(&a.router, "GET", "/api/jobs?order=finished&status=pending", None, &[]).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("order")), "{e}");
}
