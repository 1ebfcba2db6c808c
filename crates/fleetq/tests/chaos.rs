//! The reduced chaos suite CI runs: `fleetq chaos` against real processes and a real Redis
//! (fsync always, where nothing acknowledged may be lost) must lose nothing and complete nothing
//! twice. The full runs (`--jobs 1000` and more) are the README's reliability figures.

mod common;

use serde_json::Value;

fn chaos(args: &[&str]) -> Value {
    let out = common::fleetq()
        .arg("chaos")
        .args(args)
        .output()
        .expect("run fleetq chaos (needs redis-server: Debian apt-get install -y redis-server)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no report ({e}): {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "fleetq chaos failed: {report} {}", String::from_utf8_lossy(&out.stderr));
    report
}

fn assert_nothing_lost(r: &Value, jobs: u64) {
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["double_completed"], 0, "{r}");
    assert_eq!(r["completed"].as_u64(), Some(jobs), "{r}");
    assert!(r["kills"].as_u64().unwrap_or(0) > 0, "the damage was done: {r}");
}

#[test]
fn killed_workers_lose_nothing_and_run_nothing_twice() {
    let r =
        chaos(&["--scenario", "worker-kill", "--jobs", "200", "--workers", "3", "--kill-every-ms", "300"]);
    assert_nothing_lost(&r, 200);
}

#[test]
fn a_killed_redis_loses_nothing_acknowledged() {
    let r = chaos(&["--scenario", "redis-kill", "--jobs", "200", "--workers", "3"]);
    assert_nothing_lost(&r, 200);
    assert!(r["recover_ms"].is_u64(), "the fleet completed jobs again after the restart: {r}");
}

#[test]
fn a_killed_fleetq_up_loses_nothing_on_the_embedded_store() {
    let r = chaos(&["--scenario", "embedded-kill", "--jobs", "200", "--workers", "3"]);
    assert_nothing_lost(&r, 200);
    assert!(r["recover_ms"].is_u64(), "jobs completed again after the restart: {r}");
}

#[test]
fn a_redis_shutdown_loses_nothing() {
    let r = chaos(&["--scenario", "redis-shutdown", "--jobs", "200", "--workers", "3"]);
    assert_nothing_lost(&r, 200);
}

#[test]
fn an_api_killed_during_a_batch_stores_it_whole_or_not_at_all() {
    let r = chaos(&["--scenario", "api-kill-batch", "--jobs", "1000", "--workers", "12"]);
    assert_eq!(r["stored_partly"], serde_json::json!([]), "{r}");
    let whole = r["stored_whole"].as_u64().unwrap_or(0);
    let none = r["stored_none"].as_u64().unwrap_or(0);
    assert_eq!(whole + none, 12, "{r}");
}

#[test]
fn a_killed_comfyui_loses_nothing_and_runs_nothing_twice() {
    let r = chaos(&[
        "--scenario",
        "service-kill",
        "--jobs",
        "60",
        "--workers",
        "2",
        "--kill-every-ms",
        "500",
        "--step-ms",
        "30",
    ]);
    // A job whose service died under it twice fails as service_crash by design (a poison
    // workflow must not take down the fleet): each such job is accounted for, none is lost.
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["double_completed"], 0, "{r}");
    assert_eq!(r["failed"], r["service_crash"], "only service crashes fail: {r}");
    assert_eq!(r["completed"].as_u64().zip(r["service_crash"].as_u64()).map(|(c, s)| c + s), Some(60), "{r}");
    assert!(r["kills"].as_u64().unwrap_or(0) > 0, "the damage was done: {r}");
}

#[test]
fn a_sentinel_failover_with_one_replica_confirming_loses_nothing() {
    // Reduced: one failover; `fleetq chaos --scenario redis-failover` runs five by default.
    let r = chaos(&[
        "--scenario",
        "redis-failover",
        "--failovers",
        "1",
        "--jobs",
        "300",
        "--workers",
        "2",
        "--wait-replicas",
        "1",
    ]);
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["completed_twice"], 0, "{r}");
    // (A batch answered 503 `not_replicated` may be stored all the same: more may complete.)
    assert!(r["completed"].as_u64() >= r["acked"].as_u64(), "every acknowledged job completed: {r}");
    assert!(r["acked"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(
        r["resume_ms"].as_array().map(Vec::len),
        Some(1),
        "the failover happened and jobs resumed: {r}"
    );
    let anomalies = r["events_missed"].as_u64().unwrap_or(1) + r["delivered_twice"].as_u64().unwrap_or(1);
    assert!(anomalies == 0 || r["resyncs"].as_u64() > Some(0), "a stream that went wrong said resync: {r}");
}
