//! A Redis whose log goes back — restarted from an older append-only file, as after a crash inside
//! the `appendfsync everysec` window or a failover that lost writes — reuses sequence numbers the
//! API already sent. A connected event stream is told to resynchronize instead of silently
//! skipping the new events that reuse the old numbers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::Eventsource;
use fleetq_api::ApiConfig;
use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::{RedisServer, test_config};
use fleetq_broker::{Log, Queue};
use fleetq_core::JobSpec;
use futures::StreamExt;
use serde_json::{Value, json};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The first event of a job stream resumed with `token`.
async fn first_event_after(addr: std::net::SocketAddr, token: &str) -> eventsource_stream::Event {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/api/events?topics=jobs"))
        .header("Last-Event-ID", token)
        .send()
        .await
        .expect("sse");
    let mut stream = Box::pin(resp.bytes_stream().eventsource());
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an event in time")
        .expect("stream open")
        .expect("sse")
}

async fn submit(b: &RedisBroker, tag: &str) {
    for i in 0..3 {
        let done = b.submit(JobSpec::new("sim", json!({"tag": tag, "i": i}))).await;
        if done.is_err() {
            // The connection manager may still be reconnecting after the restart.
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.submit(JobSpec::new("sim", json!({"tag": tag, "i": i}))).await.expect("submit");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_went_back_makes_streams_resync_instead_of_skipping() {
    let data = tempfile::tempdir().expect("tempdir");
    let saved = tempfile::tempdir().expect("tempdir");
    let port = RedisServer::free_port().expect("port");
    let server =
        RedisServer::start_persistent(port, data.path()).expect(fleetq_broker::testing::MISSING_REDIS);
    let config = BrokerConfig { ..test_config() };
    let broker = Arc::new(RedisBroker::connect(&server.url, "rollback", config).await.expect("connect"));
    let addr = common::serve_with(broker.clone(), ApiConfig::default()).await;
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/api/events?topics=jobs"))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    let mut sse = Box::pin(resp.bytes_stream().eventsource());
    // The next event, past the partitions' workability flags (not what this test is about).
    let mut next = async move || -> (String, Value) {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), sse.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("sse");
            if ev.event != "partition_workability" {
                let mut data: Value = serde_json::from_str(&ev.data).expect("json");
                data["sse_id"] = json!(ev.id);
                return (ev.event, data);
            }
        }
    };

    submit(&broker, "kept").await;
    for _ in 0..3 {
        assert_eq!(next().await.0, "job_submitted");
    }
    // The append-only file as it is now: the point the log will go back to.
    copy_dir(data.path(), saved.path());
    submit(&broker, "lost").await;
    let mut lost_seqs = Vec::new();
    let mut old_token = String::new();
    for _ in 0..3 {
        let (kind, ev) = next().await;
        assert_eq!(kind, "job_submitted");
        lost_seqs.push(ev["seq"].as_u64().expect("seq"));
        old_token = ev["sse_id"].as_str().expect("id").to_owned();
    }
    assert_eq!(old_token, lost_seqs[2].to_string(), "epoch 0: the id is the sequence");
    server.shutdown().expect("shutdown");
    std::fs::remove_dir_all(data.path().join("appendonlydir")).expect("remove the newer file");
    copy_dir(&saved.path().join("appendonlydir"), &data.path().join("appendonlydir"));
    let _again = RedisServer::start_persistent(port, data.path()).expect("restart from the older file");
    // New events now take the sequences of the lost ones.
    submit(&broker, "new").await;

    let (kind, resync) = next().await;
    assert_eq!(kind, "resync", "the stream is told its picture is not the log's: {resync}");
    // After it, the stream goes on with events the log really holds.
    submit(&broker, "later").await;
    let (kind, ev) = next().await;
    assert_eq!(kind, "job_submitted");
    let seq = ev["seq"].as_u64().expect("seq");
    let held = broker.events_after(seq - 1, 1, Duration::ZERO).await.expect("log");
    assert_eq!(held.first().map(|e| e.seq), Some(seq), "an event of the log as it is now");
    assert_eq!(held[0].kind.job().map(|j| j.id.0.as_str()), ev["job"]["id"].as_str());
    assert!(lost_seqs.iter().any(|s| *s >= seq - 6), "sequence numbers were reused: {lost_seqs:?} / {seq}");
    assert_eq!(ev["sse_id"], format!("{seq}.1"), "ids carry the log's new epoch");
    assert_eq!(broker.log_epoch().await.expect("epoch"), 1, "the epoch moved on once");

    // A client that comes back with a token from before the going-back — its number now names
    // another event — is told to resynchronize, not served from that number.
    let first = first_event_after(addr, &old_token).await;
    assert_eq!(first.event, "resync", "an old-epoch token: {}", first.data);
    // A token of this epoch resumes as usual.
    let first = first_event_after(addr, &format!("{}.1", seq - 1)).await;
    assert_eq!((first.event.as_str(), first.id.clone()), ("job_submitted", format!("{seq}.1")));
}
