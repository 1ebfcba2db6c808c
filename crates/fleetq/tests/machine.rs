//! `fleetq machine` and `fleetq up --config / --comfyui` as processes, whose services are the mock
//! ComfyUI started as real child processes, one per GPU (TEST_MODE, NUM_GPUS): startup steps in
//! order, workers bound to their GPU's port, a killed service restarted while its job finishes,
//! SIGTERM draining the box, kill -9 of the supervisor, startup failures reported and not looped.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{Guard, fleetq, free_port};
use fleetq_broker::BrokerConfig;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::RedisServer;
use fleetq_broker::{Log, Queue, Read};
use fleetq_core::{
    ConnectorStatus, JobId, JobRecord, JobSpec, JobStatus, MachinePhase, MachineState, WorkerInfo,
};
use serde_json::{Value, json};

/// A ComfyUI workflow that runs `steps` steps of `step_seconds` and saves an image.
fn workflow(steps: u32, step_seconds: f64) -> Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3_368_601}},
        "2": {"class_type": "ProbeSleepProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_seconds": step_seconds, "send_preview": false, "send_text": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}}
    }})
}

/// A base port whose next `n` ports are free now.
fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base < 65_000 && (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// Polls `check` (every 100 ms, at most `tries` times) until it answers `Some`.
async fn until<T>(what: &str, tries: u32, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..tries {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: never happened");
}

/// The machine file of the tests: the mock ComfyUI per GPU, its worker pointing at it.
fn machine_file(dir: &Path, base_port: u16, status_port: u16, extra: &str) -> std::path::PathBuf {
    let bin = env!("CARGO_BIN_EXE_fleetq");
    let text = format!(
        r#"test_gpu_memory_gb = 24
status_listen = "127.0.0.1:{status_port}"
log_dir = "{logs}"
shutdown_grace_s = 0
{extra}
[[services]]
name = "comfyui"
command = ["{bin}", "mock", "comfyui", "--port", "{{port}}"]
base_port = {base_port}
setup = [["sh", "-c", "echo custom nodes installed"]]
stop_timeout_s = 5
warmup = {{ prompt = {{ "1" = {{ class_type = "EmptyImage", inputs = {{ width = 8, height = 8, batch_size = 1, color = 0 }} }}, "2" = {{ class_type = "SaveImage", inputs = {{ images = ["1", 0], filename_prefix = "warm" }} }} }} }}
[services.restart]
backoff_base_ms = 1500

[worker]
health_interval_s = 1
[[worker.connectors]]
type = "comfyui"
url = "http://127.0.0.1:{{port:comfyui}}"
"#,
        logs = dir.join("logs").display(),
    );
    let path = dir.join("machine.toml");
    std::fs::write(&path, text).expect("write machine.toml");
    path
}

fn spawn_machine(config: &Path, redis: &str, queue: &str, log: &Path) -> Child {
    fleetq()
        .args(["machine", "--config"])
        .arg(config)
        .args(["--redis", redis, "--queue", queue])
        .env("MACHINE_ID", "box-t")
        .env("NUM_GPUS", "2")
        .env("TEST_MODE", "true")
        .env("FLEETQ_LEASE_MS", "2000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("start fleetq machine")
}

async fn machine(b: &RedisBroker) -> Option<MachineState> {
    b.machines().await.expect("machines").into_iter().find(|m| m.machine_id == "box-t")
}

async fn worker(b: &RedisBroker, id: &str) -> Option<WorkerInfo> {
    b.workers().await.expect("workers").into_iter().find(|w| w.registration.worker_id == id)
}

async fn job(b: &RedisBroker, id: &JobId) -> JobRecord {
    b.job(id).await.expect("job query").expect("job exists")
}

async fn health(http: &reqwest::Client, port: u16) -> Value {
    http.get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json")
}

/// The pids of the machine's services, from its `/health`.
async fn service_pids(http: &reqwest::Client, port: u16) -> Vec<u64> {
    let status = health(http, port).await;
    status["services"].as_array().expect("services").iter().map(|s| s["pid"].as_u64().expect("pid")).collect()
}

fn alive(pid: u64) -> bool {
    // A zombie awaiting its reaper counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

fn signal(child: &Child, sig: &str) {
    std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill");
}

/// One box, two GPUs, a ComfyUI each: started in order, a crash restarted while its job finishes
/// elsewhere, SIGTERM draining, kill -9 of the supervisor and a restart that clears its leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_runs_a_service_per_gpu_restarts_crashes_and_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RedisServer::shared();
    let queue = "machine-sup";
    let broker = RedisBroker::connect(&server.url, queue, BrokerConfig::default()).await.expect("connect");
    let base = free_ports(2);
    let status_port = free_port();
    let config = machine_file(dir.path(), base, status_port, "");
    let log = dir.path().join("machine.log");
    let mut sup = spawn_machine(&config, &server.url, queue, &log);
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    // Startup: steps in order, each with its duration; ready.
    let m = until("the machine is ready", 600, async || {
        machine(&broker).await.filter(|m| m.phase == MachinePhase::Ready)
    })
    .await;
    let expected = [
        "host ",
        "2 configured GPU(s) of 24 GB",
        "setup comfyui #1 `sh -c echo custom nodes installed` ok",
        "launched comfyui gpu0",
        "launched comfyui gpu1",
        "comfyui gpu0 ready",
        "comfyui gpu1 ready",
        "warm-up comfyui gpu0 ok",
        "warm-up comfyui gpu1 ok",
    ];
    assert_eq!(m.steps.len(), expected.len(), "{:?}", m.steps);
    for (step, want) in m.steps.iter().zip(expected) {
        assert!(step.starts_with(want) && step.ends_with(" ms)"), "{step:?} should start with {want:?}");
    }

    // Each GPU's worker talks to its own instance and reports its GPU.
    for gpu in 0..2u16 {
        let w = until("the worker's connector is idle", 300, async || {
            worker(&broker, &format!("box-t-gpu{gpu}"))
                .await
                .filter(|w| w.connectors.get("comfyui").is_some_and(|c| c.status == ConnectorStatus::Idle))
        })
        .await;
        let url = w.connectors["comfyui"].info.as_ref().and_then(|i| i["url"].as_str()).map(str::to_owned);
        assert_eq!(url.as_deref(), Some(format!("http://127.0.0.1:{}", base + gpu).as_str()));
        assert_eq!(w.registration.capabilities.lookup("hardware.gpu_memory_gb"), Some(&json!(24)));
        assert_eq!(
            w.registration.capabilities.lookup("hardware.gpu_uuid"),
            Some(&json!(format!("TEST-GPU-{gpu}")))
        );
    }
    let http = reqwest::Client::new();
    let status = health(&http, status_port).await;
    assert_eq!(status["phase"], "ready", "{status}");
    let pids = service_pids(&http, status_port).await;
    assert_eq!(pids.len(), 2);

    // A service killed mid-job: its connector goes offline, the service comes back after its
    // backoff, and the job finishes.
    let spec = JobSpec::new("comfyui", workflow(30, 0.1));
    let id = broker.submit(spec).await.expect("submit").id;
    let running = until("the job runs", 300, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status == JobStatus::InProgress)
    })
    .await;
    let on = running.summary.worker_id.clone().expect("a worker");
    let gpu: usize = on.trim_start_matches("box-t-gpu").parse().expect("gpu index");
    std::process::Command::new("kill").args(["-9", &pids[gpu].to_string()]).status().expect("kill -9");
    until("the killed service's connector is offline", 300, async || {
        worker(&broker, &on)
            .await
            .filter(|w| w.connectors.get("comfyui").is_some_and(|c| c.status == ConnectorStatus::Offline))
    })
    .await;
    let done = until("the job ends", 600, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status.is_terminal())
    })
    .await;
    assert_eq!(done.summary.status, JobStatus::Completed, "{:?}\n{}", done.summary, dump());
    // Released by the dead service without spending an attempt, finished on the other GPU.
    let (first, last) = (done.history.first().expect("an attempt"), done.history.last().expect("an attempt"));
    assert_eq!(first.worker_id.as_deref(), Some(on.as_str()), "{:?}", done.history);
    assert_eq!(first.reason.as_deref(), Some("service_offline"), "{:?}", done.history);
    assert_ne!(last.worker_id.as_deref(), Some(on.as_str()), "{:?}", done.history);
    assert_eq!(done.summary.attempt, 1, "{:?}", done.summary);
    let restarted = until("the service is restarted", 300, async || {
        let s = health(&http, status_port).await;
        let svc = s["services"][gpu].clone();
        (svc["phase"] == "ready" && svc["restarts"] == 1).then_some(svc)
    })
    .await;
    assert!(restarted["last_exit"].as_str().is_some_and(|e| e.contains("SIGKILL")), "{restarted}");
    let said =
        restarted["last_lines"].as_array().map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>());
    assert!(said.is_some_and(|l| l.iter().any(|l| l.contains("mock ComfyUI listening"))), "{restarted}");
    // The machine card says so.
    let back = format!("comfyui gpu{gpu} is back (restart 1)");
    until("the machine reports the service back", 300, async || {
        machine(&broker).await.filter(|m| m.message.as_deref() == Some(back.as_str()))
    })
    .await;
    until("the restarted service's connector is idle", 300, async || {
        worker(&broker, &on)
            .await
            .filter(|w| w.connectors.get("comfyui").is_some_and(|c| c.status == ConnectorStatus::Idle))
    })
    .await;

    // SIGTERM with a job in flight: released (not failed), services' groups gone, `stopped`.
    let id = broker.submit(JobSpec::new("comfyui", workflow(100, 0.1))).await.expect("submit").id;
    until("the second job runs", 300, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status == JobStatus::InProgress)
    })
    .await;
    let pids = service_pids(&http, status_port).await;
    signal(&sup, "-TERM");
    let exit = sup.wait().expect("wait");
    assert!(exit.success(), "SIGTERM drains and exits 0: {exit}\n{}", dump());
    let rec = job(&broker, &id).await;
    assert_eq!(rec.summary.status, JobStatus::Pending, "released for another machine: {:?}", rec.summary);
    assert_eq!(rec.summary.attempt, 0, "a drain spends no attempt: {:?}", rec.summary);
    for pid in pids {
        assert!(!alive(pid), "service pid {pid} is gone");
    }
    let m = machine(&broker).await.expect("machine");
    assert_eq!(m.phase, MachinePhase::Stopped);
    assert!(m.message.as_deref().is_some_and(|t| t.contains("shutdown requested")), "{m:?}");

    // Back up; then kill -9 of the supervisor: its services are orphans holding the ports, its
    // jobs come back through lease expiry, and the next start clears the leftovers.
    sup = spawn_machine(&config, &server.url, queue, &log);
    until("the job runs again", 600, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status == JobStatus::InProgress)
    })
    .await;
    let orphans = service_pids(&http, status_port).await;
    sup.kill().expect("kill -9");
    sup.wait().expect("reap");
    let sup = Guard(spawn_machine(&config, &server.url, queue, &log));
    let done = until("the job completes on the restarted machine", 900, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status.is_terminal())
    })
    .await;
    assert_eq!(done.summary.status, JobStatus::Completed, "{:?}\n{}", done.summary, dump());
    for pid in orphans {
        assert!(!alive(pid), "the orphaned service {pid} was cleared from its port");
    }
    assert!(dump().contains("a leftover of this service holds its port"), "{}", dump());
    assert!(
        done.history.len() >= 2,
        "the killed machine's attempt came back by its lease: {:?}",
        done.history
    );
    signal(&sup.0, "-TERM");
}

/// `fleetq up --comfyui URL` runs a ComfyUI job end to end on the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_comfyui_runs_a_workflow_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _mock = Guard(
        fleetq()
            .args(["mock", "comfyui", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock"),
    );
    let comfy = format!("http://127.0.0.1:{port}");
    let (_up, url) = common::fleetq_up(&["up", "--comfyui", &comfy], dir.path(), Stdio::null());
    let client = fleetq_client::Client::new(&url).expect("the API's URL");
    let job = fleetq_core::JobSpec::new("comfyui", workflow(3, 0.05));
    let id = client.submit(&job, None).await.expect("submit").id;
    let rec = until("the job ends", 600, async || {
        let r = client.job(&id).await.ok()?;
        r.record.summary.status.is_terminal().then_some(r)
    })
    .await;
    let rec = serde_json::to_value(&rec).expect("JSON");
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["worker_id"], "local-gpu0", "{rec}");
    let images = &rec["outcome"]["value"]["outputs"]["3"]["images"];
    assert!(images.as_array().is_some_and(|a| a.len() == 1), "{rec}");
}

/// A failing setup step and a service that exits before it is ready stop the startup with the
/// output that explains it; the service is not restarted in a loop.
#[test]
fn startup_failures_are_reported_with_their_output_and_not_looped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |file: &Path| {
        fleetq()
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(file)
            .env("TEST_MODE", "true")
            .env("NUM_GPUS", "1")
            .env_remove("FLEETQ_TOKENS")
            .env_remove("HUB_REDIS_URL")
            .env_remove("MACHINE_ID")
            .stdout(Stdio::null())
            .output()
            .expect("fleetq up")
    };
    let setup = dir.path().join("setup.toml");
    std::fs::write(
        &setup,
        "[[services]]\nname = \"comfyui\"\ncommand = [\"sleep\", \"60\"]\nbase_port = 1\n\
         setup = [[\"sh\", \"-c\", \"echo resolving nodes; echo boom: node not found >&2; exit 4\"]]\n",
    )
    .expect("write");
    let out = run(&setup);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("startup failed at setup comfyui #1")
            && err.contains("exit code 4")
            && err.contains("boom: node not found"),
        "{err}"
    );

    let logs = dir.path().join("logs");
    let never = dir.path().join("never.toml");
    std::fs::write(
        &never,
        format!(
            "log_dir = \"{}\"\n[[services]]\nname = \"comfyui\"\ncommand = [\"sh\", \"-c\", \"echo loading models; exit 1\"]\nbase_port = {}\n\
             [services.restart]\nbackoff_base_ms = 10\n",
            logs.display(),
            free_port()
        ),
    )
    .expect("write");
    let out = run(&never);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("exited before it was ready (exit code 1)") && err.contains("loading models"),
        "{err}"
    );
    let log = std::fs::read_to_string(logs.join("comfyui-gpu0.log")).expect("service log");
    assert_eq!(log.matches("loading models").count(), 1, "launched once, not in a loop: {log}");

    // A warm-up the service refuses: the startup fails naming it, with the service's reason.
    let bin = env!("CARGO_BIN_EXE_fleetq");
    let warm = dir.path().join("warm.toml");
    std::fs::write(
        &warm,
        format!(
            "log_dir = \"{}\"\n[[services]]\nname = \"comfyui\"\ncommand = [\"{bin}\", \"mock\", \"comfyui\", \"--port\", \"{{port}}\"]\n\
             base_port = {}\nwarmup = {{ prompt = {{ \"1\" = {{ class_type = \"NoSuchNode\", inputs = {{}} }} }} }}\n\
             [[worker.connectors]]\ntype = \"comfyui\"\nurl = \"http://127.0.0.1:{{port}}\"\n",
            logs.display(),
            free_port()
        ),
    )
    .expect("write");
    let out = run(&warm);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("startup failed at warm-up comfyui gpu0") && err.contains("NoSuchNode"), "{err}");

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "gpu = 2\n").expect("write");
    let out = run(&unknown);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown field `gpu`"), "{err}");
}

/// A service that keeps crashing after it became ready is given up (the machine card says so, it
/// is not restarted forever), while the other GPU serves; a second SIGTERM stops the machine at
/// once although a running job still had most of its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_given_up_and_a_second_signal_forces_the_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RedisServer::shared();
    let queue = "machine-force";
    let broker = RedisBroker::connect(&server.url, queue, BrokerConfig::default()).await.expect("connect");
    let bin = env!("CARGO_BIN_EXE_fleetq");
    let base = free_ports(2);
    let status_port = free_port();
    // GPU 1's service dies two seconds after each start; GPU 0's lives.
    let text = format!(
        r#"test_gpu_memory_gb = 24
status_listen = "127.0.0.1:{status_port}"
log_dir = "{logs}"
shutdown_grace_s = 60
[[services]]
name = "comfyui"
command = ["sh", "-c", "if [ {{gpu}} = 1 ]; then (sleep 2; kill $$) & fi; exec {bin} mock comfyui --port {{port}}"]
base_port = {base}
stop_timeout_s = 5
[services.restart]
backoff_base_ms = 200
max_crashes = 1
window_ms = 60000
[worker]
health_interval_s = 1
[[worker.connectors]]
type = "comfyui"
url = "http://127.0.0.1:{{port}}"
"#,
        logs = dir.path().join("logs").display(),
    );
    let config = dir.path().join("machine.toml");
    std::fs::write(&config, text).expect("write");
    let log = dir.path().join("machine.log");
    let sup = spawn_machine(&config, &server.url, queue, &log);
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();
    let given_up = until("the crashing service is given up", 600, async || {
        machine(&broker)
            .await
            .filter(|m| m.message.as_deref().is_some_and(|t| t.starts_with("comfyui gpu1 failed")))
    })
    .await;
    let said = given_up.message.unwrap_or_default();
    assert!(said.contains("2 crashes within 60 s"), "{said}\n{}", dump());
    let http = reqwest::Client::new();
    let status = health(&http, status_port).await;
    assert_eq!(status["services"][1]["phase"], "failed", "{status}");
    assert_eq!(status["services"][1]["restarts"], 1, "restarted once, then given up: {status}");
    // The other GPU serves; a long job runs there.
    let id = broker.submit(JobSpec::new("comfyui", workflow(600, 0.1))).await.expect("submit").id;
    let running = until("the job runs", 300, async || {
        Some(job(&broker, &id).await).filter(|r| r.summary.status == JobStatus::InProgress)
    })
    .await;
    assert_eq!(running.summary.worker_id.as_deref(), Some("box-t-gpu0"));
    let pid = status["services"][0]["pid"].as_u64().expect("gpu0's service pid");
    signal(&sup, "-TERM");
    until("the machine is stopping", 300, async || {
        machine(&broker).await.filter(|m| m.phase == MachinePhase::Stopping)
    })
    .await;
    signal(&sup, "-TERM");
    let mut sup = Guard(sup);
    let exit = sup.0.wait().expect("wait");
    assert!(exit.success(), "{exit}\n{}", dump());
    let m = machine(&broker).await.expect("machine");
    assert_eq!(m.phase, MachinePhase::Stopped);
    assert!(m.message.as_deref().is_some_and(|t| t.contains("forced stop")), "{m:?}");
    assert!(!alive(pid), "gpu0's service was killed");
    assert_ne!(job(&broker, &id).await.summary.status, JobStatus::Completed, "the job did not get to finish");
}

/// A service that takes a while to load: the machine card gets a live line with the seconds waited
/// and the service's last log line while it waits, and no timeout cuts it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_is_reported_while_it_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RedisServer::shared();
    let queue = "machine-slow";
    let broker = RedisBroker::connect(&server.url, queue, BrokerConfig::default()).await.expect("connect");
    let bin = env!("CARGO_BIN_EXE_fleetq");
    let text = format!(
        r#"log_dir = "{logs}"
[[services]]
name = "comfyui"
command = ["sh", "-c", "echo loading 212 custom nodes; sleep 8; exec {bin} mock comfyui --port {{port}}"]
base_port = {base}
[[worker.connectors]]
type = "comfyui"
url = "http://127.0.0.1:{{port}}"
"#,
        logs = dir.path().join("logs").display(),
        base = free_port(),
    );
    let config = dir.path().join("machine.toml");
    std::fs::write(&config, text).expect("write");
    let log = dir.path().join("machine.log");
    let mut child = fleetq()
        .args(["machine", "--config"])
        .arg(&config)
        .args(["--redis", &server.url, "--queue", queue])
        .env("MACHINE_ID", "box-slow")
        .env("NUM_GPUS", "1")
        .env("TEST_MODE", "true")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start fleetq machine");
    until("the slow machine is ready", 600, async || {
        broker
            .machines()
            .await
            .expect("machines")
            .into_iter()
            .find(|m| m.machine_id == "box-slow" && m.phase == MachinePhase::Ready)
    })
    .await;
    let events = broker.events_after(0, 10_000, Duration::from_millis(10)).await.expect("events");
    let notes: Vec<String> = events
        .into_iter()
        .filter_map(|e| match e.kind {
            fleetq_core::EventKind::Machine { event } if event.machine_id == "box-slow" => event.message,
            _ => None,
        })
        .filter(|m| m.starts_with("waiting for comfyui gpu0"))
        .collect();
    // "waiting for comfyui gpu0: <seconds> s — <its last line>", reported every 5 s.
    let waited = notes.iter().find_map(|m| {
        let rest = m.strip_prefix("waiting for comfyui gpu0: ")?;
        let (secs, line) = rest.split_once(" s — ")?;
        (line == "loading 212 custom nodes").then(|| secs.parse::<u64>().ok()).flatten()
    });
    assert!(waited.is_some_and(|s| s >= 5), "{notes:?}");
    signal(&child, "-TERM");
    assert!(child.wait().expect("wait").success());
}
