//! Two `fleetq api` processes on one Redis, driven by the CLI: a job submitted through one is seen,
//! cancelled and streamed through the other, because neither keeps state of its own.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::{Guard, api, fleetq, lines};
use fleetq_broker::testing::RedisServer;
use serde_json::Value;

fn cli(url: &str, args: &[&str]) -> Output {
    let out =
        fleetq().args(args).env("FLEETQ_API", url).env_remove("FLEETQ_TOKEN").output().expect("run the CLI");
    assert!(out.status.success(), "fleetq {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn submit(url: &str) -> String {
    let out = cli(url, &["submit", "--service", "sim", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["id"].as_str().expect("id").to_owned()
}

#[test]
fn two_api_processes_on_one_redis_serve_the_same_jobs_and_events() {
    let redis = RedisServer::shared();
    let queue = format!("two-apis-{}", std::process::id());
    let (_a, a) = api(&redis.url, &queue);
    let (_b, b) = api(&redis.url, &queue);
    assert_ne!(a, b);

    // B's event stream, as a client follows it.
    let mut watch = fleetq()
        .args(["jobs", "watch", "--json"])
        .env("FLEETQ_API", &b)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleetq jobs watch");
    let events = lines(&mut watch);
    let _watch = Guard(watch);
    // The stream starts at the present: probe through A until B's watcher shows one.
    let mut connected = false;
    for _ in 0..100 {
        submit(&a);
        if events.recv_timeout(Duration::from_millis(300)).is_ok() {
            connected = true;
            break;
        }
    }
    assert!(connected, "B's event stream carries a job submitted through A");
    while events.try_recv().is_ok() {}

    // Submitted through A, cancelled through B, streamed by B, read back through A.
    let id = submit(&a);
    cli(&b, &["jobs", "cancel", &id]);
    let mut seen = Vec::new();
    while !seen.contains(&"job_cancelled".to_owned()) {
        let line = events.recv_timeout(Duration::from_secs(30)).expect("B streams the job's events");
        let ev: Value = serde_json::from_str(&line).expect("JSON event");
        if ev["job"]["id"] == id.as_str() {
            seen.push(ev["type"].as_str().unwrap_or("").to_owned());
        }
    }
    assert_eq!(seen, ["job_submitted", "job_cancelled"]);
    let show = cli(&a, &["jobs", "show", &id, "--json"]);
    let job: Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(job["status"], "cancelled");
}
