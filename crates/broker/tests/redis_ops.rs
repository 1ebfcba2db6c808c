//! Redis-specific operation: restarts, long blocking waits, large backlogs.

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::BrokerError;
use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::{RedisServer, test_config};
use fleetq_broker::{Fleet, Log, Queue, Read};
use fleetq_core::{JobSpec, JobStatus, WorkerRegistration};
use serde_json::json;

fn worker(id: &str) -> WorkerRegistration {
    serde_json::from_value(json!({"worker_id": id, "machine_id": "m", "services": ["simulation"]}))
        .expect("worker")
}

/// A Redis restart (no persistence: keys and functions gone) is survived: the connection comes back
/// and the function library is reloaded on first use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_restart() {
    let server = RedisServer::start().expect(fleetq_broker::testing::MISSING_REDIS);
    let broker = RedisBroker::connect(&server.url, "restart", test_config()).await.expect("connect");
    broker.register_worker(worker("w")).await.expect("register");
    broker.submit(JobSpec::new("simulation", json!(1))).await.expect("submit before restart");
    server.shutdown().expect("shutdown");
    let _again = RedisServer::start_on(server.port).expect("restart on the same port");
    let mut spec = JobSpec::new("simulation", json!(2));
    spec.idempotency_key = Some("after-restart".into());
    let mut outcome = None;
    // The first calls may fail while the manager reconnects; each failure must be a Redis error.
    for _ in 0..100 {
        match broker.submit(spec.clone()).await {
            Ok(s) => {
                outcome = Some(s);
                break;
            }
            Err(BrokerError::Redis(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(other) => panic!("unexpected error after restart: {other}"),
        }
    }
    let submitted = outcome.expect("the broker reconnected");
    let rec = broker.job(&submitted.id).await.expect("get").expect("stored on the new server");
    assert_eq!(rec.summary.status, JobStatus::Pending);
    // The worker registration was lost with the data: claiming says so instead of hanging.
    assert!(matches!(broker.claim("w", Duration::ZERO).await, Err(BrokerError::UnknownWorker(_))));
    broker.register_worker(worker("w")).await.expect("register again");
    let lease = broker.claim("w", Duration::ZERO).await.expect("claim").expect("job");
    assert_eq!(lease.job.summary.id, submitted.id);
}

/// A claim may block far longer than the client's default 500 ms response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_blocking_claim_and_event_wait() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "longwait", test_config()).await.expect("connect");
    broker.register_worker(worker("w")).await.expect("register");
    let got = broker.claim("w", Duration::from_millis(1500)).await.expect("a 1.5 s wait is not an error");
    assert!(got.is_none());
    let head = broker.snapshot().await.expect("snapshot").seq;
    let events =
        broker.events_after(head, 10, Duration::from_millis(1200)).await.expect("a 1.2 s wait is fine");
    assert!(events.is_empty());
}

/// Backlogs far above the sizes that break scripts which unpack whole lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_backlog_claims_and_snapshots() {
    let server = RedisServer::shared();
    let broker =
        Arc::new(RedisBroker::connect(&server.url, "backlog", test_config()).await.expect("connect"));
    broker.register_worker(worker("w")).await.expect("register");
    let n = 20_000;
    for chunk in 0..n / 1000 {
        let specs = (0..1000).map(|i| JobSpec::new("simulation", json!(chunk * 1000 + i))).collect();
        broker.submit_batch(specs).await.expect("batch");
    }
    let first = broker.claim("w", Duration::ZERO).await.expect("claim").expect("job");
    assert_eq!(first.job.spec.payload, json!(0), "oldest first");
    let snap = broker.snapshot().await.expect("snapshot");
    assert_eq!(snap.jobs.len(), test_config().snapshot_pending_limit + 1, "running + capped pending");
    let page = broker
        .jobs(&fleetq_broker::JobFilter { limit: Some(1000), ..Default::default() })
        .await
        .expect("list");
    assert_eq!(page.jobs.len(), 1000);
    assert!(page.next.is_some());
}

/// A server holding a different `fleetq` library — even one claiming the same version — gets ours
/// on connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_library_is_replaced_on_connect() {
    let server = RedisServer::start().expect(fleetq_broker::testing::MISSING_REDIS);
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    // It even claims our version: only comparing the code tells them apart.
    let impostor = format!(
        "#!lua name=fleetq\nredis.register_function('fq_probe', function() return 'old' end)\n\
         redis.register_function{{function_name = 'fq_version', flags = {{'no-writes'}}, \
         callback = function() return '{}' end}}",
        fleetq_broker::redis::LIBRARY_VERSION
    );
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(impostor)
        .query_async::<()>(&mut conn)
        .await
        .expect("load impostor");
    let _broker = RedisBroker::connect(&server.url, "lib", test_config()).await.expect("connect");
    let probe: redis::RedisResult<String> =
        redis::cmd("FCALL").arg("fq_probe").arg(0).query_async(&mut conn).await;
    assert!(probe.is_err(), "the impostor library was replaced");
    let version: String =
        redis::cmd("FCALL").arg("fq_version").arg(0).query_async(&mut conn).await.expect("ours");
    assert!(!version.is_empty());
}

/// The lease length belongs to the caller: two processes on one queue hold jobs for their own
/// configured lease, whichever connected last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_holds_jobs_for_its_own_lease() {
    let server = RedisServer::shared();
    let clock = fleetq_broker::ManualClock::new(fleetq_broker::testing::T0);
    let connect = |lease_ms| {
        let config = fleetq_broker::BrokerConfig { lease_ms, ..test_config() };
        RedisBroker::connect_with_clock(&server.url, "leases", config, Arc::new(clock.clone()))
    };
    let long = connect(50_000).await.expect("connect");
    let short = connect(1_000).await.expect("connect");
    for (b, id) in [(&long, "long-w"), (&short, "short-w")] {
        b.register_worker(worker(id)).await.expect("register");
        b.submit(JobSpec::new("simulation", json!(id))).await.expect("submit");
    }
    let a = long.claim("long-w", Duration::ZERO).await.expect("claim").expect("job");
    let b = short.claim("short-w", Duration::ZERO).await.expect("claim").expect("job");
    assert_eq!(a.deadline_ms, fleetq_broker::testing::T0 + 50_000);
    assert_eq!(b.deadline_ms, fleetq_broker::testing::T0 + 1_000);
    assert_eq!(
        long.renew(&a.as_ref()).await.expect("renew").deadline_ms,
        fleetq_broker::testing::T0 + 50_000
    );
}

/// A queue written before the service queues existed (library < 13: no `sq:`/`aq`, no marker) is
/// indexed once on connect, so its pending jobs have exact positions and a queue listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_queue_is_indexed_for_positions_on_connect() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "reindex", test_config()).await.expect("connect");
    let mut ids = Vec::new();
    for i in 0..30 {
        let mut spec = JobSpec::new(if i % 3 == 0 { "other" } else { "simulation" }, json!(i));
        spec.priority = i % 2;
        ids.push((spec.priority, i, broker.submit(spec).await.expect("submit").id));
    }
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let prefix = broker.prefix().to_owned();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}sq:*")).query_async(&mut conn).await.expect("keys");
    assert_eq!(keys.len(), 2, "one queue per service: {keys:?}");
    let mut del = redis::cmd("DEL");
    del.arg(&keys).arg(format!("{prefix}aq")).arg(format!("{prefix}qix"));
    del.query_async::<()>(&mut conn).await.expect("forget the index");
    let gone = broker.queue_position(&ids[1].2).await.expect("position");
    assert_eq!(gone, None, "without the index the job has no place: the index is what answers");

    let again = RedisBroker::connect(&server.url, "reindex", test_config()).await.expect("reconnect");
    // simulation jobs: i % 3 != 0; priority 1 first, then submission order.
    let mut sim: Vec<_> = ids.iter().filter(|(_, i, _)| i % 3 != 0).collect();
    sim.sort_by_key(|(p, i, _)| (std::cmp::Reverse(*p), *i));
    for (place, (_, _, id)) in sim.iter().enumerate() {
        assert_eq!(again.queue_position(id).await.expect("position"), Some(place as u64 + 1));
    }
    let page = again.queue(&fleetq_broker::QueueFilter::default()).await.expect("queue");
    assert_eq!(page.jobs.len(), 30);
}

async fn pending(b: &RedisBroker) -> u64 {
    b.queue_depths().await.expect("depths").get("simulation").map_or(0, |d| d.pending)
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

/// A batch is one atomic step: at Redis's `maxmemory` it is stored whole or refused whole, never
/// cut where one call of several was refused. The limit is swept from just above the memory in use
/// to well past what the batch needs, so that some limit falls between the writes of any first
/// part of the batch and the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_at_the_memory_limit_is_all_or_nothing() {
    let server = RedisServer::start().expect(fleetq_broker::testing::MISSING_REDIS);
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let batch = |n: usize| -> Vec<JobSpec> { (0..n).map(|i| JobSpec::new("simulation", json!(i))).collect() };
    let config = |conn: &mut redis::aio::MultiplexedConnection, key: &'static str, value: String| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg(key).arg(value);
        let conn = conn.clone();
        async move {
            let mut conn = conn;
            cmd.query_async::<()>(&mut conn).await.expect("config set")
        }
    };
    config(&mut conn, "maxmemory-policy", "noeviction".into()).await;
    let (mut whole, mut refused) = (0, 0);
    for step in 0..24u64 {
        config(&mut conn, "maxmemory", "0".into()).await;
        redis::cmd("FLUSHDB").query_async::<()>(&mut conn).await.expect("flush");
        let broker =
            RedisBroker::connect(&server.url, &format!("oom{step}"), test_config()).await.expect("connect");
        broker.submit_batch(batch(10)).await.expect("warm-up batch");
        let limit = used_memory(&mut conn).await + 100_000 * step;
        config(&mut conn, "maxmemory", limit.to_string()).await;
        let outcome = broker.submit_batch(batch(1000)).await;
        let stored = pending(&broker).await - 10;
        match outcome {
            Ok(done) => {
                assert_eq!((done.len(), stored), (1000, 1000), "limit +{} kB: stored whole", step * 100);
                whole += 1;
            }
            Err(e) => {
                assert_eq!(
                    stored,
                    0,
                    "limit +{} kB: refused ({e}), yet {stored} jobs were stored",
                    step * 100
                );
                refused += 1;
            }
        }
    }
    config(&mut conn, "maxmemory", "0".into()).await;
    assert!(whole > 0 && refused > 0, "the sweep crossed the limit: {whole} stored, {refused} refused");
}

/// One undecodable record (here a job whose retry time overflows, and an event of garbage) takes
/// nothing else down: listings, the snapshot and the event log skip it, count it and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_passed_over_not_fatal() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "corrupt", test_config()).await.expect("connect");
    let bad = broker.submit(JobSpec::new("simulation", json!("bad"))).await.expect("submit").id;
    let good = broker.submit(JobSpec::new("simulation", json!("good"))).await.expect("submit").id;
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let key = format!("{}J", broker.prefix());
    let state: String = redis::cmd("HGET").arg(&key).arg(&bad.0).query_async(&mut conn).await.expect("state");
    let mut state: serde_json::Value = serde_json::from_str(&state).expect("json");
    state["run_at"] = json!("18446745869843628032");
    redis::cmd("HSET")
        .arg(&key)
        .arg(&bad.0)
        .arg(state.to_string())
        .query_async::<()>(&mut conn)
        .await
        .expect("corrupt it");
    let head = broker.snapshot().await.expect("snapshot").seq;
    redis::cmd("XADD")
        .arg(format!("{}ev", broker.prefix()))
        .arg("0-*")
        .arg(&["t", "job_submitted", "at", "1", "j", "{not json"])
        .query_async::<()>(&mut conn)
        .await
        .expect("a garbage event");
    broker.submit(JobSpec::new("simulation", json!("after"))).await.expect("submit");
    let before = fleetq_broker::undecodable_records();

    let listed = broker.jobs(&fleetq_broker::JobFilter::default()).await.expect("the listing answers");
    let ids: Vec<_> = listed.jobs.iter().map(|j| j.id.clone()).collect();
    assert!(ids.contains(&good) && !ids.contains(&bad), "the good jobs, without the bad one: {ids:?}");
    let snapshot = broker.snapshot().await.expect("the snapshot answers");
    assert!(snapshot.jobs.contains_key(&good) && !snapshot.jobs.contains_key(&bad));
    let events = broker.events_after(head, 10, Duration::ZERO).await.expect("the log answers");
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds, ["undecodable", "job_submitted"], "the bad event keeps its place, the next follows");
    assert_eq!(events[1].seq, events[0].seq + 1);
    assert!(fleetq_broker::undecodable_records() >= before + 2, "each passed-over record is counted");
    assert!(
        matches!(broker.job(&bad).await, Err(BrokerError::Corrupt(_))),
        "the job itself shows as corrupt"
    );
}

/// With `wait_replicas`, a state change is acknowledged only once a replica holds it: with the
/// replica up a submission succeeds; with it gone, the submission fails as not replicated (the job
/// is on the primary, and a resubmission with its idempotency key finds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_replicas_when_asked() {
    let primary = RedisServer::start().expect(fleetq_broker::testing::MISSING_REDIS);
    let replica = RedisServer::start_replica_of(primary.port).expect("replica");
    let client = redis::Client::open(primary.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let mut synced = false;
    for _ in 0..400 {
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.expect("info");
        if info.lines().any(|l| l.trim() == "connected_slaves:1") && info.contains("state=online") {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(synced, "the replica connected");
    // 2 s for a replica's acknowledgement: a loaded CI machine took more than 300 ms.
    let config = fleetq_broker::BrokerConfig { wait_replicas: 1, wait_timeout_ms: 2000, ..test_config() };
    let broker = RedisBroker::connect(&primary.url, "wait", config).await.expect("connect");
    let mut spec = JobSpec::new("simulation", json!(1));
    spec.idempotency_key = Some("k1".into());
    let first = broker.submit(spec.clone()).await.expect("acknowledged: the replica holds it");
    replica.shutdown().expect("stop the replica");
    let mut second = JobSpec::new("simulation", json!(2));
    second.idempotency_key = Some("k2".into());
    match broker.submit(second.clone()).await {
        Err(BrokerError::NotReplicated { wanted: 1, got: 0 }) => {}
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    let again = broker.submit(second).await;
    assert!(matches!(again, Err(BrokerError::NotReplicated { .. })), "still no replica: {again:?}");
    let listed = broker.jobs(&fleetq_broker::JobFilter::default()).await.expect("reads need no replica");
    assert_eq!(listed.jobs.len(), 2, "the unconfirmed job is on the primary, once");
    assert!(listed.jobs.iter().any(|j| j.id == first.id));
}

/// Counts the keys of a queue matching `pattern` (after the prefix) and the fields of its hash `h`.
async fn keys_and_fields(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    pattern: &str,
    h: &str,
) -> (usize, usize) {
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}{pattern}")).query_async(conn).await.expect("keys");
    let fields: usize = redis::cmd("HLEN").arg(format!("{prefix}{h}")).query_async(conn).await.expect("hlen");
    (keys.len(), fields)
}

/// Once the jobs of a thousand partitions are done, nothing of those partitions is left: no spec,
/// no class list, no queue, no head — an idle queue has nothing to walk. A queue written by
/// library 15, which kept every partition ever seen, is cleaned once on connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_partitions_leave_nothing_behind() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "drained", test_config()).await.expect("connect");
    broker.register_worker(worker("w")).await.expect("register");
    let specs: Vec<JobSpec> = (0..1000)
        .map(|i| {
            let mut s = JobSpec::new("simulation", json!(i));
            s.customer_id = Some(format!("c{i}"));
            s
        })
        .collect();
    broker.submit_batch(specs).await.expect("batch");
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let prefix = broker.prefix().to_owned();
    assert_eq!(keys_and_fields(&mut conn, &prefix, "pq:*", "parts").await, (1000, 1000));
    while let Some(lease) = broker.claim("w", std::time::Duration::ZERO).await.expect("claim") {
        broker.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    for (pattern, hash) in [("pq:*", "parts"), ("pcl:*", "pn"), ("ch:*", "punw"), ("sq:*", "svcs")] {
        assert_eq!(keys_and_fields(&mut conn, &prefix, pattern, hash).await, (0, 0), "{pattern} / {hash}");
    }
    // As library 15 left it: a partition without jobs, no counts, no layout marker.
    let mut old = redis::pipe();
    old.cmd("HSET").arg(format!("{prefix}parts")).arg("ghost:00").arg(r#"{"service":"ghost"}"#);
    old.cmd("HSET").arg(format!("{prefix}punw")).arg("ghost:00").arg("1");
    old.cmd("DEL").arg(format!("{prefix}layout"));
    old.query_async::<()>(&mut conn).await.expect("write an old layout");
    let live = broker.submit(JobSpec::new("simulation", json!("live"))).await.expect("submit").id;
    old.clear();
    old.cmd("DEL").arg(format!("{prefix}pn")).arg(format!("{prefix}layout")).arg(format!("{prefix}svcs"));
    old.query_async::<()>(&mut conn).await.expect("forget the counts");
    let again = RedisBroker::connect(&server.url, "drained", test_config()).await.expect("reconnect");
    assert_eq!(keys_and_fields(&mut conn, &prefix, "pq:*", "parts").await, (1, 1), "the ghost is gone");
    let lease = again.claim("w", std::time::Duration::ZERO).await.expect("claim").expect("the live job");
    assert_eq!(lease.job.summary.id, live);
    again.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    assert_eq!(keys_and_fields(&mut conn, &prefix, "pq:*", "parts").await, (0, 0), "counted right");
}

/// A queue written by library 16 kept each job in keys of its own (`j:`, `s:`, `o:`, the state
/// with its id and service in it); connecting moves them into the hashes once, and every job
/// reads, lists and claims as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_keys_of_an_older_library_move_into_hashes() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "per-job-keys", test_config()).await.expect("connect");
    broker.register_worker(worker("w")).await.expect("register");
    let done = broker.submit(JobSpec::new("simulation", json!("done"))).await.expect("submit").id;
    let lease = broker.claim("w", Duration::ZERO).await.expect("claim").expect("a job");
    broker.complete(&lease.as_ref(), json!({"out": 1})).await.expect("complete");
    let mut spec = JobSpec::new("simulation", json!({"big": "x".repeat(300)}));
    spec.priority = 5;
    spec.max_attempts = 7;
    let pending = broker.submit(spec).await.expect("submit").id;
    let before = [broker.job(&done).await.expect("job"), broker.job(&pending).await.expect("job")];
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let prefix = broker.prefix().to_owned();
    for record in before.iter().flatten() {
        let id = &record.summary.id.0;
        for (hash, key) in [("J", "j:"), ("S", "s:"), ("O", "o:")] {
            let raw: Option<String> = redis::cmd("HGET")
                .arg(format!("{prefix}{hash}"))
                .arg(id)
                .query_async(&mut conn)
                .await
                .expect("hget");
            let Some(mut raw) = raw else { continue };
            if hash == "J" {
                // Library 16 stored the id and the service in the state.
                let mut state: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&raw).expect("state json");
                state.insert("id".into(), json!(id));
                state.insert("service".into(), json!("simulation"));
                raw = serde_json::to_string(&state).expect("encode");
            }
            let mut old = redis::pipe();
            old.cmd("SET").arg(format!("{prefix}{key}{id}")).arg(raw);
            old.cmd("HDEL").arg(format!("{prefix}{hash}")).arg(id);
            old.query_async::<()>(&mut conn).await.expect("write an old layout");
        }
    }
    redis::cmd("SET")
        .arg(format!("{prefix}layout"))
        .arg("16")
        .query_async::<()>(&mut conn)
        .await
        .expect("layout");
    assert!(broker.job(&done).await.expect("job").is_none(), "the old layout is not read");
    let again = RedisBroker::connect(&server.url, "per-job-keys", test_config()).await.expect("reconnect");
    let after = [again.job(&done).await.expect("job"), again.job(&pending).await.expect("job")];
    assert_eq!(after, before);
    for pattern in ["j:*", "s:*", "o:*"] {
        let left: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}{pattern}")).query_async(&mut conn).await.expect("keys");
        assert!(left.is_empty(), "{pattern}: {left:?}");
    }
    let listed = again.jobs(&Default::default()).await.expect("list");
    assert_eq!(listed.jobs.len(), 2);
    let lease = again.claim("w", Duration::ZERO).await.expect("claim").expect("the pending job");
    assert_eq!(lease.job.summary.id, pending);
    assert_eq!((lease.job.spec.priority, lease.job.spec.max_attempts), (5, 7));
}

/// A class whose registrant died after declaring it (ready, no worker) is dropped by the next
/// reap instead of being kept up to date forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_class_is_dropped_by_reap() {
    let server = RedisServer::shared();
    let broker = RedisBroker::connect(&server.url, "orphan-class", test_config()).await.expect("connect");
    broker.register_worker(worker("w")).await.expect("register");
    let client = redis::Client::open(server.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let prefix = broker.prefix().to_owned();
    for (f, args) in [
        ("fq_class", vec!["0", "deadbeefdeadbeef", r#"{"services":["x"]}"#, ""]),
        ("fq_class_ready", vec!["deadbeefdeadbeef"]),
    ] {
        redis::cmd("FCALL")
            .arg(f)
            .arg(1)
            .arg(&prefix)
            .arg(&args)
            .query_async::<()>(&mut conn)
            .await
            .expect(f);
    }
    let classes = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut cmd = redis::cmd("HKEYS");
        cmd.arg(format!("{prefix}classes"));
        let mut conn = conn.clone();
        async move { cmd.query_async::<Vec<String>>(&mut conn).await.expect("classes") }
    };
    assert_eq!(classes(&mut conn).await.len(), 2);
    broker.reap().await.expect("reap");
    let left = classes(&mut conn).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0], "deadbeefdeadbeef");
    broker.submit(JobSpec::new("simulation", json!(1))).await.expect("submit");
    assert!(
        broker.claim("w", std::time::Duration::ZERO).await.expect("claim").is_some(),
        "w's class is intact"
    );
}
