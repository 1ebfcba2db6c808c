//! Real-socket tests: per-job and global SSE (with resume after a dropped connection, checked
//! against the broker's own log: nothing lost, nothing repeated), `/ws/monitor`, the legacy
//! `/ws/client` protocol, and two API servers sharing one Redis.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{app, claim, serve, serve_with, worker};
use eventsource_stream::{Event as SseEvent, Eventsource};
use fleetq_api::ApiConfig;
use fleetq_broker::Broker;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::RedisServer;
use fleetq_broker::{Fleet, Log, Queue, Read};
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Guards a read so a broken server fails the test instead of hanging it (not a timing assert).
const PATIENCE: Duration = Duration::from_secs(20);

type Sse = std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, String>> + Send>>;

async fn sse(addr: SocketAddr, path: &str, last_id: Option<&str>) -> Sse {
    let mut req = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.expect("connect");
    assert_eq!(resp.status(), 200, "{path}");
    Box::pin(resp.bytes_stream().eventsource().map(|r| r.map_err(|e| e.to_string())))
}

/// The next event of the log (the periodic `workers_seen` heartbeats are skipped).
async fn next(s: &mut Sse) -> Option<SseEvent> {
    loop {
        let ev = next_any(s).await?;
        if ev.event != "workers_seen" {
            return Some(ev);
        }
    }
}

async fn next_any(s: &mut Sse) -> Option<SseEvent> {
    tokio::time::timeout(PATIENCE, s.next()).await.expect("an event in time").map(|r| r.expect("sse"))
}

async fn submit_http(addr: SocketAddr, body: Value) -> String {
    submit_as(addr, None, body).await
}

/// Submits with a bearer token (`None`: none); the job's id.
async fn submit_as(addr: SocketAddr, token: Option<&str>, body: Value) -> String {
    let mut req = reqwest::Client::new().post(format!("http://{addr}/api/jobs")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let v: Value = req.send().await.expect("post").json().await.expect("json");
    v["id"].as_str().expect("id").to_owned()
}

/// Sequences of the broker's log after `after` (for jobs of `job`, when given).
async fn log_seqs<B: Broker>(b: &B, after: u64, job: Option<&str>) -> Vec<u64> {
    b.events_after(after, 10_000, Duration::ZERO)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| job.is_none_or(|id| e.kind.job().is_some_and(|j| j.id.0 == id)))
        .map(|e| e.seq)
        .collect()
}

#[tokio::test]
async fn job_sse_runs_to_the_terminal_event_and_resumes_after_a_drop() {
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "sim").await;
    let addr = serve(a.broker.clone()).await;
    let id = submit_http(addr, json!({"service": "sim"})).await;
    let mut s = sse(addr, &format!("/api/jobs/{id}/events"), None).await;
    let first = next(&mut s).await.expect("job_state");
    assert_eq!(first.event, "job_state");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["job"]["status"], "pending");
    let lease = claim(a.broker.as_ref(), "w1").await;
    let claimed = next(&mut s).await.expect("claimed");
    assert_eq!(claimed.event, "job_claimed");
    // The connection drops; the job moves on meanwhile.
    drop(s);
    a.broker.progress(&lease.as_ref(), 40.0, Some("step 4".into())).await.unwrap();
    a.broker.complete(&lease.as_ref(), json!({"images": ["a.png"]})).await.unwrap();
    let mut s = sse(addr, &format!("/api/jobs/{id}/events"), Some(&claimed.id)).await;
    let mut seen = Vec::new();
    let mut last = None;
    while let Some(ev) = next(&mut s).await {
        seen.push(ev.id.parse::<u64>().unwrap());
        last = Some(ev);
    }
    let last = last.expect("events after the resume point");
    assert_eq!(last.event, "job_completed", "the stream ends after the terminal event");
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(
        data["outcome"]["value"],
        json!({"images": ["a.png"]}),
        "the terminal event carries the result"
    );
    let expected = log_seqs(a.broker.as_ref(), claimed.id.parse().unwrap(), Some(&id)).await;
    assert_eq!(seen, expected, "exactly the job's events after the resume point");
    // A finished job's stream is its outcome, then the end.
    let mut s = sse(addr, &format!("/api/jobs/{id}/events"), None).await;
    let terminal = next(&mut s).await.expect("terminal");
    assert_eq!(terminal.event, "job_completed");
    // Shaped as every terminal event: `at` (when it finished), the job, its outcome.
    let data: Value = serde_json::from_str(&terminal.data).unwrap();
    let finished = a.broker.job(&fleetq_core::JobId(id.clone())).await.unwrap().unwrap().summary.finished_at;
    assert_eq!(data["at"].as_i64(), finished, "{data}");
    assert_eq!(
        (data["type"].as_str(), data["outcome"]["kind"].as_str()),
        (Some("job_completed"), Some("result"))
    );
    assert!(next(&mut s).await.is_none());
}

#[tokio::test]
async fn a_submit_token_follows_only_its_own_jobs_on_the_fleet_stream() {
    let tokens =
        fleetq_api::Tokens::parse(["submit:alice:alice-secret,submit:bob:bob-secret,read:ops:ops-secret"])
            .expect("tokens");
    let a = app(ApiConfig::default());
    let addr = serve_with(a.broker.clone(), ApiConfig { tokens, ..ApiConfig::default() }).await;
    let open = |token: &'static str| async move {
        let resp = reqwest::Client::new()
            .get(format!("http://{addr}/api/events?topics=jobs"))
            .bearer_auth(token)
            .send()
            .await
            .expect("connect");
        assert_eq!(resp.status(), 200);
        Box::pin(resp.bytes_stream().eventsource().map(|r| r.map_err(|e| e.to_string()))) as Sse
    };
    let (mut bob, mut ops) = (open("bob-secret").await, open("ops-secret").await);
    let alices = submit_as(addr, Some("alice-secret"), json!({"service": "sim"})).await;
    let bobs = submit_as(addr, Some("bob-secret"), json!({"service": "sim"})).await;
    // The next job event (partition events carry no job and no owner).
    async fn next_job(s: &mut Sse) -> Value {
        loop {
            let v: Value = serde_json::from_str(&next(s).await.expect("an event").data).expect("json");
            if v["job"].is_object() {
                return v;
            }
        }
    }
    // Bob's first job event is his own job's: alice's, submitted before, was not sent to him.
    let first = next_job(&mut bob).await;
    assert_eq!(first["job"]["id"], bobs.as_str(), "{first}");
    // A read token sees both, in order.
    let seen = [next_job(&mut ops).await["job"]["id"].clone(), next_job(&mut ops).await["job"]["id"].clone()];
    assert_eq!(seen, [json!(alices), json!(bobs)]);
}

#[tokio::test]
async fn a_fleet_stream_carries_the_latest_heartbeats_without_an_id() {
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "sim").await;
    let config = ApiConfig { stale_after: Duration::from_millis(1500), ..ApiConfig::default() };
    let addr = serve_with(a.broker.clone(), config).await;
    let mut s = sse(addr, "/api/events?topics=connectors", None).await;
    // A health refresh that changes nothing: no event of the log, but the next heartbeat says it.
    let reported = fleetq_core::ConnectorReport {
        service: "sim".into(),
        status: fleetq_core::ConnectorStatus::Idle,
        message: None,
        at: a.broker.workers().await.unwrap()[0].connectors["sim"].at + 1,
        info: None,
    };
    let before = a.broker.snapshot().await.unwrap().seq;
    a.broker.report_connector("w1", reported.clone()).await.unwrap();
    assert_eq!(a.broker.snapshot().await.unwrap().seq, before, "an unchanged report is no event");
    loop {
        let ev = next_any(&mut s).await.expect("a heartbeat");
        assert_eq!(ev.event, "workers_seen", "only heartbeats on an idle fleet: {ev:?}");
        assert!(ev.id.is_empty(), "no resume point: {ev:?}");
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        if data["workers"]["w1"]["connectors"]["sim"] == json!(reported.at) {
            assert!(data["workers"]["w1"]["last_seen"].is_i64() && data["at"].is_i64(), "{data}");
            break;
        }
    }
}

#[tokio::test]
async fn global_sse_resume_loses_and_repeats_nothing() {
    let a = app(ApiConfig::default());
    let addr = serve(a.broker.clone()).await;
    let start = a.broker.snapshot().await.unwrap().seq;
    let mut s = sse(addr, "/api/events", None).await;
    for i in 0..10 {
        submit_http(addr, json!({"service": "sim", "payload": i})).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..4 {
        seen.push(next(&mut s).await.expect("event").id.parse().unwrap());
    }
    drop(s);
    for i in 0..5 {
        submit_http(addr, json!({"service": "other", "payload": i})).await;
    }
    worker(a.broker.as_ref(), "w1", "sim").await;
    let expected = log_seqs(a.broker.as_ref(), start, None).await;
    let last = seen.last().unwrap().to_string();
    let mut s = sse(addr, "/api/events", Some(&last)).await;
    while seen.len() < expected.len() {
        seen.push(next(&mut s).await.expect("event").id.parse().unwrap());
    }
    assert_eq!(seen, expected, "the two connections together saw the log exactly once");
    // Topic filters.
    let mut s = sse(addr, &format!("/api/events?topics=workers&since={start}"), None).await;
    let ev = next(&mut s).await.expect("worker event");
    assert_eq!(ev.event, "worker_registered");
    let bad = reqwest::get(format!("http://{addr}/api/events?topics=nope")).await.unwrap();
    assert_eq!(bad.status(), 400);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(addr: SocketAddr, path: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.expect("ws connect").0
}

/// The next message, skipping partition workability flags (the broker emits them as the fleet
/// changes; these tests are about other messages).
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let v = recv_any(ws).await;
        if v["type"] != "partition_workability" && v["type"] != "workers_seen" {
            return v;
        }
    }
}

async fn recv_any(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("ws");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("json");
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.expect("send");
}

#[tokio::test]
async fn ws_monitor_snapshot_events_ping_subscribe_and_resume() {
    let a = app(ApiConfig::default());
    let addr = serve(a.broker.clone()).await;
    let mut m = ws(addr, "/ws/monitor").await;
    let snap = recv(&mut m).await;
    assert_eq!(snap["type"], "snapshot");
    let s0 = snap["seq"].as_u64().unwrap();
    let id = submit_http(addr, json!({"service": "sim"})).await;
    let ev = recv(&mut m).await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64(), ev["job"]["id"].as_str()),
        (Some("job_submitted"), Some(s0 + 1), Some(id.as_str()))
    );
    send(&mut m, json!({"type": "ping"})).await;
    let pong = recv(&mut m).await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["seq"].as_u64().unwrap() > s0, "the pong states the last sequence sent: {pong}");
    send(&mut m, json!({"type": "subscribe", "topics": ["workers"]})).await;
    assert_eq!(recv(&mut m).await["type"], "subscribed");
    submit_http(addr, json!({"service": "sim"})).await;
    worker(a.broker.as_ref(), "w1", "sim").await;
    let ev = recv(&mut m).await;
    assert_eq!(ev["type"], "worker_registered", "the job event was filtered out: {ev}");
    send(&mut m, json!({"type": "dance"})).await;
    assert_eq!(recv(&mut m).await["type"], "error");
    send(&mut m, json!({"type": "subscribe", "topics": ["nope"]})).await;
    assert_eq!(recv(&mut m).await["type"], "error");
    drop(m);
    // Resume: no snapshot, the events after the sequence in order.
    let mut m = ws(addr, &format!("/ws/monitor?since={s0}")).await;
    let expected = log_seqs(a.broker.as_ref(), s0, None).await;
    for seq in expected {
        assert_eq!(recv_any(&mut m).await["seq"].as_u64(), Some(seq));
    }
}

#[tokio::test]
async fn ws_client_speaks_the_legacy_protocol() {
    let a = app(ApiConfig::default());
    worker(a.broker.as_ref(), "w1", "sim").await;
    let addr = serve(a.broker.clone()).await;
    let mut c = ws(addr, "/ws/client").await;
    send(&mut c, json!({"type": "submit_job", "message_id": "m-1", "job_type": "sim", "payload": {"prompt": "a cat"}, "priority": 5})).await;
    let accepted = recv(&mut c).await;
    assert_eq!(
        (accepted["type"].as_str(), accepted["message_id"].as_str()),
        (Some("job_accepted"), Some("m-1"))
    );
    let id = accepted["job_id"].as_str().unwrap().to_owned();
    let lease = claim(a.broker.as_ref(), "w1").await;
    assert_eq!(lease.job.summary.id.0, id);
    let m = recv(&mut c).await;
    assert_eq!((m["type"].as_str(), m["status"].as_str()), (Some("update_job_progress"), Some("assigned")));
    a.broker.progress(&lease.as_ref(), 50.0, Some("half".into())).await.unwrap();
    a.broker.complete(&lease.as_ref(), json!({"url": "x.png"})).await.unwrap();
    let mut m = recv(&mut c).await;
    while m["type"] == "update_job_progress" {
        assert_eq!(m["job_id"], id.as_str());
        m = recv(&mut c).await;
    }
    assert_eq!((m["type"].as_str(), &m["result"]), (Some("complete_job"), &json!({"url": "x.png"})));
    send(&mut c, json!({"type": "request_job_status", "job_id": id, "message_id": 7})).await;
    let st = recv(&mut c).await;
    assert_eq!(
        (st["type"].as_str(), st["status"].as_str(), &st["message_id"]),
        (Some("job_status"), Some("completed"), &json!(7))
    );
    // Cancel a pending job: the answer, then job_failed with status cancelled.
    send(&mut c, json!({"type": "submit_job", "service": "nobody-serves-this"})).await;
    let id2 = recv(&mut c).await["job_id"].as_str().unwrap().to_owned();
    send(&mut c, json!({"type": "cancel_job", "job_id": id2})).await;
    let mut got = [recv(&mut c).await, recv(&mut c).await];
    got.sort_by_key(|m| m["type"].as_str().unwrap_or("").to_owned());
    assert_eq!((got[0]["type"].as_str(), got[0]["status"].as_str()), (Some("job_failed"), Some("cancelled")));
    assert_eq!((got[1]["type"].as_str(), got[1]["status"].as_str()), (Some("job_status"), Some("cancelled")));
    for (bad, code) in [
        (json!({"type": "request_job_status", "job_id": "missing"}), "not_found"),
        (json!({"type": "submit_job", "payload": 1}), "invalid"),
        (json!({"type": "cancel_job"}), "bad_request"),
        (json!({"type": "launch_rocket"}), "unknown_message"),
        (json!({"no": "type"}), "bad_request"),
    ] {
        send(&mut c, bad.clone()).await;
        let e = recv(&mut c).await;
        assert_eq!((e["type"].as_str(), e["error"]["code"].as_str()), (Some("error"), Some(code)), "{bad}");
    }
    c.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(recv(&mut c).await["error"]["code"], "malformed_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_servers_share_one_redis() {
    let server = RedisServer::shared();
    let queue = format!("api-{}", std::process::id());
    let connect = || RedisBroker::connect(&server.url, &queue, fleetq_broker::testing::test_config());
    let (b1, b2) = (Arc::new(connect().await.unwrap()), Arc::new(connect().await.unwrap()));
    let a1 = serve(b1.clone()).await;
    let a2 = serve(b2.clone()).await;
    let mut watch = sse(a2, "/api/events?topics=jobs", None).await;
    let id = submit_http(a1, json!({"service": "sim"})).await;
    let ev = next(&mut watch).await.expect("event");
    assert_eq!(ev.event, "job_submitted");
    assert!(ev.data.contains(&id), "server 2 streams what server 1 accepted");
    let got: Value = reqwest::get(format!("http://{a2}/api/jobs/{id}")).await.unwrap().json().await.unwrap();
    assert_eq!(got["status"], "pending");
    let r = reqwest::Client::new().post(format!("http://{a2}/api/jobs/{id}/cancel")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let got: Value = reqwest::get(format!("http://{a1}/api/jobs/{id}")).await.unwrap().json().await.unwrap();
    assert_eq!(got["status"], "cancelled", "server 1 sees server 2's cancel");
    let mut ev = next(&mut watch).await.expect("event");
    while ev.event == "partition_workability" {
        ev = next(&mut watch).await.expect("event");
    }
    assert_eq!(ev.event, "job_cancelled");
}

/// Open streams are capped: past `max_streams` an SSE or a WebSocket gets 503 with `Retry-After`,
/// and a place comes back when a stream ends.
#[tokio::test]
async fn streams_beyond_the_limit_get_503_with_retry_after() {
    let a = app(ApiConfig::default());
    let addr =
        common::serve_with(a.broker.clone(), ApiConfig { max_streams: 2, ..ApiConfig::default() }).await;
    let first = sse(addr, "/api/events", None).await;
    let mut monitor = ws(addr, "/ws/monitor").await;
    assert_eq!(recv(&mut monitor).await["type"], "snapshot");
    let over = reqwest::Client::new().get(format!("http://{addr}/api/events")).send().await.expect("connect");
    assert_eq!(over.status(), 503);
    assert_eq!(over.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
    let body: Value = over.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams");
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/monitor")).await;
    assert!(refused.is_err(), "a WebSocket past the limit is refused");
    drop(first);
    // The server notices the closed stream when it next writes to it (an event or a keep-alive).
    submit_http(addr, json!({"service": "sim"})).await;
    let mut again = None;
    for _ in 0..200 {
        let r =
            reqwest::Client::new().get(format!("http://{addr}/api/events")).send().await.expect("connect");
        if r.status() == 200 {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(again.is_some(), "the closed stream's place came back");
}
