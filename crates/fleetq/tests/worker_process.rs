//! `fleetq worker` as a process: it works jobs from Redis and drains on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::RedisServer;
use fleetq_broker::{Log, Queue, Read};
use fleetq_core::{JobId, JobRecord, JobSpec, JobStatus};
use serde_json::json;

async fn wait_for(b: &RedisBroker, id: &JobId, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let mut after = 0;
    for _ in 0..120 {
        let rec = b.job(id).await.expect("job query").expect("job exists");
        if done(&rec) {
            return rec;
        }
        if let Some(last) =
            b.events_after(after, 1000, Duration::from_millis(500)).await.expect("events").last()
        {
            after = last.seq;
        }
    }
    panic!("job {id} never reached the expected state");
}

/// Starts `fleetq worker` on `queue` with 1 s leases, 5 ms simulation steps and no shutdown grace.
fn spawn_worker(url: &str, queue: &str, id: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["worker", "--queue", queue, "--redis", url])
        .env("WORKER_ID", id)
        .env("MACHINE_ID", "proc-box")
        .env("WORKER_CONNECTORS", "simulation")
        .env("SIMULATION_STEP_MS", "5")
        .env("FLEETQ_LEASE_MS", "1000")
        .env("WORKER_SHUTDOWN_GRACE_S", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleetq worker")
}

/// A worker killed with SIGKILL mid-job: the job comes back when its lease expires and completes
/// exactly once, on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_completes_once_elsewhere() {
    let server = RedisServer::shared();
    let broker = Arc::new(
        RedisBroker::connect(&server.url, "cli-kill", BrokerConfig::default()).await.expect("connect"),
    );
    let mut first = spawn_worker(&server.url, "cli-kill", "doomed");
    let id = broker.submit(JobSpec::new("simulation", json!({"steps": 200}))).await.expect("submit").id;
    wait_for(&broker, &id, |r| r.summary.status == JobStatus::InProgress).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap the killed process");
    let mut second = spawn_worker(&server.url, "cli-kill", "survivor");
    let rec = wait_for(&broker, &id, |r| r.summary.status.is_terminal()).await;
    assert_eq!(rec.summary.status, JobStatus::Completed);
    assert_eq!((rec.summary.worker_id.as_deref(), rec.summary.attempt), (Some("survivor"), 2));
    let completions = broker
        .events_after(0, 10_000, Duration::ZERO)
        .await
        .expect("events")
        .iter()
        .filter(|e| matches!(&e.kind, fleetq_core::EventKind::JobCompleted { job } if job.id == id))
        .count();
    assert_eq!(completions, 1);
    second.kill().expect("stop the survivor");
    second.wait().expect("reap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_jobs_and_drains_on_sigterm() {
    let server = RedisServer::shared();
    let broker = Arc::new(
        RedisBroker::connect(&server.url, "cli-worker", BrokerConfig::default()).await.expect("connect"),
    );
    let mut child = spawn_worker(&server.url, "cli-worker", "proc-w1");

    let quick = broker.submit(JobSpec::new("simulation", json!({"steps": 3}))).await.expect("submit").id;
    let rec = wait_for(&broker, &quick, |r| r.summary.status.is_terminal()).await;
    assert_eq!(
        (rec.summary.status, rec.summary.worker_id.as_deref()),
        (JobStatus::Completed, Some("proc-w1"))
    );

    let long =
        broker.submit(JobSpec::new("simulation", json!({"steps": 1_000_000}))).await.expect("submit").id;
    wait_for(&broker, &long, |r| r.summary.status == JobStatus::InProgress).await;
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(status.success(), "fleetq worker exits 0 after draining: {status}");
    let rec = broker.job(&long).await.expect("get").expect("exists");
    assert_eq!(
        (rec.summary.status, rec.summary.attempt),
        (JobStatus::Pending, 0),
        "released, attempt refunded"
    );
    assert!(broker.workers().await.expect("workers").is_empty(), "deregistered");
}

/// A TOML config file: connectors from `[[connectors]]` with `max_concurrent_jobs`, selected and
/// extended by `WORKER_CONNECTORS`; an unknown name is registered `offline` with the reason
/// instead of stopping the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_with_connectors_and_an_unknown_name() {
    let server = RedisServer::shared();
    let broker = Arc::new(
        RedisBroker::connect(&server.url, "cli-config", BrokerConfig::default()).await.expect("connect"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("worker.toml");
    let toml = format!(
        "redis_url = \"{}\"\nqueue = \"cli-config\"\nworker_id = \"from-file\"\nmachine_id = \"box\"\nshutdown_grace_s = 0\n\n\
         [capabilities]\ngpu = \"rtx4090\"\n\n\
         [[connectors]]\ntype = \"simulation\"\nservice = \"upscale-sim\"\nstep_ms = 5\nsteps = 2\nmax_concurrent_jobs = 2\n",
        server.url
    );
    std::fs::write(&file, toml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["worker", "--config"])
        .arg(&file)
        .env("WORKER_CONNECTORS", "upscale-sim,midjourney")
        .env_remove("WORKER_ID")
        .env_remove("MACHINE_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleetq worker");
    let id = broker.submit(JobSpec::new("upscale-sim", json!({}))).await.expect("submit").id;
    let rec = wait_for(&broker, &id, |r| r.summary.status.is_terminal()).await;
    assert_eq!(
        (rec.summary.status, rec.summary.worker_id.as_deref()),
        (JobStatus::Completed, Some("from-file"))
    );
    let worker = broker.workers().await.expect("workers").remove(0);
    assert_eq!(worker.registration.capabilities.0.get("gpu"), Some(&json!("rtx4090")));
    let bogus = &worker.connectors["midjourney"];
    assert_eq!(bogus.status, fleetq_core::ConnectorStatus::Offline);
    assert!(bogus.message.as_deref().is_some_and(|m| m.contains("unknown connector \"midjourney\"")));
    child.kill().expect("stop");
    child.wait().expect("reap");
}

/// Missing identity and bad files are refused with a message that says what to set.
#[test]
fn missing_identity_and_bad_files_are_clear_errors() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetq"));
        cmd.arg("worker").args(args).env_remove("WORKER_ID").env_remove("MACHINE_ID");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[], &[("WORKER_CONNECTORS", "simulation"), ("MACHINE_ID", "m")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("set WORKER_ID"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "worker_id = \"w\"\nmachine_id = \"m\"\n[[connectors]]\ntype = \"comfyui\"\nurll = \"x\"\n",
    )
    .expect("write");
    let (code, err) = run(&["--config", file.to_str().expect("utf-8 path")], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("urll") && err.contains("bad.toml"), "{err}");
}

/// No Redis where the worker looks: one line saying so, with what to do; a URL without its
/// scheme: a line saying how to write it.
#[test]
fn a_missing_redis_is_said_once_with_a_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let run = |url: String| {
        Command::new(env!("CARGO_BIN_EXE_fleetq"))
            .args(["worker", "--redis", &url])
            .env("WORKER_ID", "w")
            .env("MACHINE_ID", "m")
            .env("WORKER_CONNECTORS", "simulation")
            .output()
            .expect("run fleetq worker")
    };
    let out = run(format!("redis://127.0.0.1:{port}/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("connection refused").count(), 1, "{err}");
    assert!(err.contains("cannot reach Redis") && err.contains("redis-server"), "{err}");
    let out = run(format!("127.0.0.1:{port}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("redis://HOST:PORT/"), "{err}");
}

/// A Redis with a password: the password reaches no log line or error of a worker or an API run
/// against it (JSON logs at debug level, read whole), a wrong one is said as a credentials problem
/// (not "is redis-server running?"), and the API's banner shows the URL redacted.
#[test]
fn no_password_reaches_a_log_line() {
    const SECRET: &str = "S3cret-Pa55word";
    let redis = RedisServer::start_with(
        RedisServer::free_port().expect("a port"),
        &format!("--requirepass {SECRET}"),
    )
    .expect("redis-server");
    let port = redis.port;
    let url = format!("redis://:{SECRET}@127.0.0.1:{port}/");
    let wrong = format!("redis://:not-{SECRET}@127.0.0.1:{port}/");

    // A worker that registers, runs, and is stopped: every line it wrote.
    let worker = Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["--log-format", "json", "worker", "--redis", &url, "--queue", "secrets"])
        .env("WORKER_ID", "w-secret")
        .env("MACHINE_ID", "m")
        .env("WORKER_CONNECTORS", "simulation")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleetq worker");
    let broker = tokio::runtime::Runtime::new().expect("runtime").block_on(async {
        let b = fleetq_broker::redis::RedisBroker::connect(
            &url,
            "secrets",
            fleetq_broker::BrokerConfig::default(),
        )
        .await
        .expect("connect");
        for _ in 0..200 {
            if b.workers().await.expect("workers").iter().any(|w| w.registration.worker_id == "w-secret") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(broker, "the worker registered");
    Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().expect("kill");
    let out = worker.wait_with_output().expect("worker output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().count() > 3, "the worker logged: {text}");
    assert!(!text.contains(SECRET), "a worker log line holds the password:\n{text}");

    // The API's banner and every line it logs, and a wrong password's error.
    let api = Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["api", "--redis", &url, "--queue", "secrets", "--listen", "127.0.0.1:0"])
        .env_remove("FLEETQ_TOKENS")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleetq api");
    let mut api = common::Guard(api);
    let banner = common::lines(&mut api.0).recv_timeout(Duration::from_secs(60)).expect("the banner");
    assert!(banner.contains("redis://:***@127.0.0.1") && !banner.contains(SECRET), "{banner}");
    Command::new("kill").args(["-TERM", &api.0.id().to_string()]).status().expect("kill");
    let mut logged = String::new();
    if let Some(mut stderr) = api.0.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut logged).expect("the API's log");
    }
    assert!(logged.lines().count() > 1, "the API logged: {logged}");
    assert!(!logged.contains(SECRET), "an API log line holds the password:\n{logged}");
    // A Sentinel URL's passwords (the servers' and the sentinels'), where no sentinel answers.
    let sentinel = format!(
        "redis+sentinel://:{SECRET}@127.0.0.1:{}/m?sentinel_password={SECRET}",
        RedisServer::free_port().expect("a port")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["worker", "--redis", &sentinel])
        .env("WORKER_ID", "w")
        .env("MACHINE_ID", "m")
        .env("WORKER_CONNECTORS", "simulation")
        .env("RUST_LOG", "debug")
        .output()
        .expect("fleetq worker");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("sentinel"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetq"))
        .args(["worker", "--redis", &wrong])
        .env("WORKER_ID", "w")
        .env("MACHINE_ID", "m")
        .env("WORKER_CONNECTORS", "simulation")
        .output()
        .expect("fleetq worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains(SECRET), "{err}");
    assert!(err.contains("password") && !err.contains("redis-server running"), "{err}");
}
