//! `fleetq chaos --scenario redis-failover`: a primary, a replica and three sentinels on loopback,
//! the primary killed (-9) `--failovers` times while workers drain jobs, a client submits through
//! `fleetq api` and another follows the API's event stream; every process reaches Redis by
//! `redis+sentinel://`.
//!
//! After each kill the sentinels promote the replica; the killed server is restarted as a replica of
//! the new primary, and the next kill waits until the sentinels see it in sync. Counted at the end,
//! from the broker and from what the stream delivered:
//! - `lost`: jobs whose submission was acknowledged (201) but that are missing or never finished;
//! - `completed_twice`: jobs completed more than once in the event log as it ends (a completion
//!   lost with the primary's unreplicated tail, the job run again);
//! - `delivered_twice` and `events_missed`: completions the stream delivered more than once or
//!   never, and `resyncs`, the times it told its client that the log went back: a stream may have
//!   delivered an event of the old primary that its replica never got, and then says so, so that
//!   a client reloads instead of being wrong silently;
//! - `resume_ms`: per failover, from the kill until the stream delivers a completion again.
//!
//! With `--wait-replicas 0` (asynchronous replication) acknowledged writes can be lost: the figures
//! say how many, and the run fails only when the stream went wrong without a resync. With
//! `--wait-replicas 1` nothing acknowledged may be lost or completed twice either, or the run
//! fails.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleetq_client::{Client, FleetEvent};
use fleetq_core::{EventKind, JobStatus};
use serde_json::json;

use crate::chaos::{
    Args, Proc, completions, connect, free_port, spawn, spawn_serving, start_redis_with, tally,
};

const MASTER: &str = "chaos";
/// How long the sentinels wait before they judge the primary down (Sentinel's default is 30 s;
/// the time to resume follows this setting).
const DOWN_AFTER_MS: u64 = 1000;
const FAILOVER_TIMEOUT_MS: u64 = 2000;

fn start_node(bin: &str, port: u16, dir: &Path, replica_of: Option<u16>) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let primary = replica_of.map(|p| p.to_string());
    let mut extra = vec!["--appendfsync", "everysec", "--repl-diskless-sync-delay", "0"];
    if let Some(p) = &primary {
        extra.extend(["--replicaof", "127.0.0.1", p.as_str()]);
    }
    start_redis_with(bin, port, dir, &extra)
}

fn start_sentinel(bin: &str, port: u16, primary: u16, dir: &Path) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\nsentinel parallel-syncs {MASTER} 1\n",
            dir.display()
        ),
    )?;
    spawn(Command::new(bin).arg(&conf).arg("--sentinel"), "redis-server --sentinel", Some(port))
}

/// A sentinel's answer to `SENTINEL args…`.
async fn sentinel(port: u16, args: &[&str]) -> Result<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd("SENTINEL");
    for a in args {
        cmd.arg(*a);
    }
    Ok(cmd.query_async(&mut conn).await?)
}

/// The primary's port as the first answering sentinel names it.
async fn primary_port(sentinels: &[u16]) -> Option<u16> {
    for port in sentinels {
        if let Ok(v) = sentinel(*port, &["GET-MASTER-ADDR-BY-NAME", MASTER]).await
            && let Ok((_, p)) = redis::from_redis_value::<(String, u16)>(v)
        {
            return Some(p);
        }
    }
    None
}

/// Whether the primary has a replica in sync (`state=online` in its `INFO replication`: a
/// diskless full sync starts seconds after a replica connects) and the sentinels know it with a
/// working link (a failover needs one to promote).
async fn replica_in_sync(sentinels: &[u16]) -> bool {
    let Some(primary) = primary_port(sentinels).await else { return false };
    let online = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{primary}/")).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
        Some(info.lines().any(|l| l.starts_with("slave") && l.contains("state=online")))
    };
    if online.await != Some(true) {
        return false;
    }
    let Ok(redis::Value::Array(rows)) = sentinel(sentinels[0], &["REPLICAS", MASTER]).await else {
        return false;
    };
    rows.into_iter().any(|row| {
        let fields: Vec<String> = redis::from_redis_value(row).unwrap_or_default();
        let field = |name: &str| fields.chunks(2).find(|kv| kv[0] == name).and_then(|kv| kv.get(1)).cloned();
        field("flags").as_deref() == Some("slave") && field("master-link-status").as_deref() == Some("ok")
    })
}

/// What the stream delivered.
#[derive(Default)]
struct Seen {
    completions: HashMap<String, usize>,
    resyncs: usize,
    /// When each delivered completion happened (`at`, ms since the epoch: the time to resume).
    completed_at: Vec<i64>,
}

fn start_process(exe: &Path, args: &[&str], env: &[(&str, String)], what: &str) -> Result<Proc> {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn(&mut cmd, what, None)
}

/// Runs the scenario (see the module doc) and prints its report line.
pub(crate) async fn run(args: &Args, exe: &Path) -> Result<()> {
    let bin = &args.redis_server;
    let dir = tempfile::tempdir()?;
    let ports = [free_port()?, free_port()?];
    let mut nodes: HashMap<u16, Proc> = HashMap::new();
    nodes.insert(ports[0], start_node(bin, ports[0], &dir.path().join("n0"), None)?);
    nodes.insert(ports[1], start_node(bin, ports[1], &dir.path().join("n1"), Some(ports[0]))?);
    let sentinel_ports = [free_port()?, free_port()?, free_port()?];
    let _sentinels: Vec<Proc> = sentinel_ports
        .iter()
        .enumerate()
        .map(|(i, p)| start_sentinel(bin, *p, ports[0], &dir.path().join(format!("s{i}"))))
        .collect::<Result<_>>()?;
    let hosts: Vec<String> = sentinel_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+sentinel://{}/{MASTER}", hosts.join(","));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !replica_in_sync(&sentinel_ports).await {
        if Instant::now() > deadline {
            bail!("the sentinels did not see the replica in sync within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let wait = args.wait_replicas.to_string();
    let env = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("HUB_REDIS_URL", url.clone()),
            ("FLEETQ_QUEUE", "chaos".to_owned()),
            ("FLEETQ_WAIT_REPLICAS", wait.clone()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let mut cmd = Command::new(exe);
    cmd.args(["api", "--listen", "127.0.0.1:0"]);
    for (k, v) in env(&[]) {
        cmd.env(k, v);
    }
    let (_api, api_url) = spawn_serving(&mut cmd, "fleetq api")?;
    let api = Client::new(&api_url)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.ready().await.is_err() {
        if Instant::now() > deadline {
            bail!("fleetq api did not answer at {}", api.base());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _workers: Vec<Proc> = (0..args.workers)
        .map(|i| {
            start_process(
                exe,
                &["worker"],
                &env(&[
                    ("WORKER_CONNECTORS", "simulation".into()),
                    ("WORKER_ID", format!("failover-w{i}")),
                    ("MACHINE_ID", "chaos".into()),
                    ("SIMULATION_STEP_MS", args.step_ms.to_string()),
                    ("FLEETQ_LEASE_MS", args.lease_ms.to_string()),
                ]),
                "a fleetq worker",
            )
        })
        .collect::<Result<_>>()?;

    // The follower: every completion the API's stream delivers.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut events = api.events(&["jobs"]);
    events.connect().await.context("following /api/events")?;
    let follower = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(item) = events.next().await {
                let Ok(mut s) = seen.lock() else { return };
                match item {
                    FleetEvent::Event { event, .. } => {
                        if let EventKind::JobCompleted { job } = &event.kind {
                            *s.completions.entry(job.id.0.clone()).or_default() += 1;
                            s.completed_at.push(event.at);
                        }
                    }
                    FleetEvent::Resync { .. } => s.resyncs += 1,
                    FleetEvent::Lost | FleetEvent::Resumed { .. } | FleetEvent::WorkersSeen(_) => {}
                }
            }
        })
    };

    // The submitter: batches of 10 every 50 ms through the API (about what the workers drain, so
    // submissions go on through every failover) until the last failover or --jobs; each
    // acknowledged job is remembered.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitter = {
        let (acked, stop, api, total) = (acked.clone(), stop.clone(), api.clone(), args.jobs);
        tokio::spawn(async move {
            let mut n = 0usize;
            while n < total && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<serde_json::Value> = (n..(n + 10).min(total))
                    .map(|i| json!({"service": "simulation", "payload": {"note": i, "steps": 5}, "max_attempts": 100}))
                    .collect();
                let size = batch.len();
                let reply = api.submit_json(&serde_json::Value::Array(batch), None).await;
                if let Ok(fleetq_api::model::SubmitReply::Batch(b)) = reply
                    && let Ok(mut a) = acked.lock()
                {
                    a.extend(b.jobs.into_iter().map(|s| s.id.0));
                    n += size;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let started = Instant::now();
    let mut resume_ms = Vec::new();
    for round in 0..args.failovers {
        // Wait for a replica in sync, then kill the primary.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !replica_in_sync(&sentinel_ports).await {
            if Instant::now() > deadline {
                bail!("round {round}: no replica in sync within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Sentinels start another failover of the same primary only 2 × failover-timeout after the
        // last one: the next kill comes when they will act on it.
        tokio::time::sleep(Duration::from_millis(2 * FAILOVER_TIMEOUT_MS + 500)).await;
        let old = primary_port(&sentinel_ports).await.context("no sentinel names a primary")?;
        if let Some(mut p) = nodes.remove(&old) {
            p.kill();
        }
        let killed_at = Instant::now();
        let killed_ms = fleetq_core::clock::Clock::now_ms(&fleetq_core::clock::SystemClock);
        let deadline = killed_at + Duration::from_secs(60);
        let new = loop {
            match primary_port(&sentinel_ports).await {
                Some(p) if p != old => break p,
                _ if Instant::now() > deadline => bail!("round {round}: no failover within 60 s"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // The killed server comes back as a replica of the new primary (its own files are
        // replaced by a full sync).
        nodes.insert(old, start_node(bin, old, &dir.path().join(format!("n{round}-{old}")), Some(new))?);
        let deadline = killed_at + Duration::from_secs(60);
        // The first completion that happened after the kill (not one written before it and
        // delivered late).
        let resumed = loop {
            let after =
                seen.lock().ok().and_then(|s| s.completed_at.iter().find(|t| **t > killed_ms).copied());
            if let Some(at) = after {
                break at;
            }
            if Instant::now() > deadline {
                bail!("round {round}: no completion within 60 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        resume_ms.push(resumed.saturating_sub(killed_ms));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = submitter.await;

    // Every acknowledged job finishes (or the wait ends), then the truth is read.
    let broker = connect(&url).await?;
    let acked: Vec<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let (mut lost, mut statuses) = (acked.len(), HashMap::new());
    while Instant::now() < deadline {
        statuses.clear();
        let mut filter = fleetq_broker::JobFilter { limit: Some(1000), ..Default::default() };
        loop {
            let page = fleetq_broker::Read::jobs(&broker, &filter).await?;
            for j in page.jobs {
                statuses.insert(j.id.0, j.status);
            }
            match page.next {
                Some(n) => filter.cursor = Some(n),
                None => break,
            }
        }
        lost = acked.iter().filter(|id| !statuses.get(*id).is_some_and(|s| s.is_terminal())).count();
        let unfinished = statuses.values().filter(|s| !s.is_terminal()).count();
        if lost == 0 && unfinished == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stream delivers the last completions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    follower.abort();
    let t = tally(&broker).await?;
    let completed_twice = completions(&broker).await?.values().filter(|n| **n > 1).count();
    let s = seen.lock().map_err(|_| anyhow::anyhow!("the follower panicked"))?;
    let delivered_twice = s.completions.values().filter(|n| **n > 1).count();
    let completed: HashSet<&String> =
        statuses.iter().filter(|(_, st)| **st == JobStatus::Completed).map(|(id, _)| id).collect();
    let missed = completed.iter().filter(|id| !s.completions.contains_key(**id)).count();
    let line = json!({
        "scenario": "redis-failover", "wait_replicas": args.wait_replicas, "failovers": args.failovers,
        "down_after_ms": DOWN_AFTER_MS, "workers": args.workers,
        "acked": acked.len(), "completed": t.completed, "failed": t.failed, "lost": lost,
        "completed_twice": completed_twice, "delivered_twice": delivered_twice,
        "events_missed": missed, "resyncs": s.resyncs,
        "resume_ms": resume_ms, "elapsed_ms": started.elapsed().as_millis(),
        "note": if args.wait_replicas == 0 {
            "asynchronous replication: a failover may lose what the primary acknowledged but had not yet sent to its replica"
        } else {
            "every acknowledged change was on a replica before its reply"
        },
    });
    crate::report(&line.to_string());
    if (missed > 0 || delivered_twice > 0) && s.resyncs == 0 {
        bail!(
            "{missed} completions never delivered, {delivered_twice} delivered twice, and the stream never said to resynchronize"
        );
    }
    if args.wait_replicas > 0 && (lost > 0 || completed_twice > 0) {
        bail!(
            "{lost} acknowledged jobs lost, {completed_twice} completed twice, with --wait-replicas {}",
            args.wait_replicas
        );
    }
    Ok(())
}
