//! Redis Sentinel (`redis+sentinel://`) against real processes: a primary, a replica and three
//! `redis-server --sentinel` on loopback. The broker finds the primary through the sentinels,
//! follows a switch-over (the old primary demoted to a replica: writes meet `READONLY`) and a crash
//! of the primary, and keeps every change acknowledged with `wait_replicas = 1`. A fixed URL
//! pointed at a replica is refused with a message naming the way out.

use std::time::{Duration, Instant};

use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::{RedisServer, SentinelServer, test_config};
use fleetq_broker::{BrokerConfig, Log, Queue, Read};
use fleetq_core::{JobId, JobSpec};
use serde_json::json;

const NAME: &str = "fq";

struct Cluster {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<SentinelServer>,
}

impl Cluster {
    fn start() -> Self {
        let primary = RedisServer::start().expect("primary");
        let replica = RedisServer::start_replica_of(primary.port).expect("replica");
        let sentinels = (0..3)
            // Down after 2 s: short enough for a test, long enough that a loaded CI machine does
            // not fail over on its own.
            .map(|_| SentinelServer::start(primary.port, NAME, 2, 2000, 2000).expect("sentinel"))
            .collect();
        Self { primary, replica, sentinels }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{NAME}", hosts.join(","))
    }

    async fn sentinel(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/", self.sentinels[0].port)).expect("url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("a sentinel");
        let mut cmd = redis::cmd("SENTINEL");
        for a in args {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// A switch-over, asked until the sentinels have a replica fit to promote (they learn its
    /// replication link from its INFO, read every few seconds).
    async fn switch_over(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.sentinel(&["FAILOVER", NAME]).await {
                Ok(_) => return,
                Err(e) => assert!(Instant::now() < deadline, "no switch-over within 60 s: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the sentinels know a replica with a working link (a failover needs one).
    async fn replica_known(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(redis::Value::Array(rows)) = self.sentinel(&["REPLICAS", NAME]).await {
                let fit = rows.iter().any(|row| {
                    let fields: Vec<String> = match row {
                        redis::Value::Array(f) => f
                            .iter()
                            .map(|v| redis::from_redis_value::<String>(v.clone()).unwrap_or_default())
                            .collect(),
                        _ => Vec::new(),
                    };
                    let field = |name: &str| {
                        fields.chunks(2).find(|kv| kv[0] == name).and_then(|kv| kv.get(1)).cloned()
                    };
                    field("flags").as_deref() == Some("slave")
                        && field("master-link-status").as_deref() == Some("ok")
                });
                if fit {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the sentinels never saw a working replica");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn config() -> BrokerConfig {
    BrokerConfig { wait_replicas: 1, wait_timeout_ms: 2000, ..test_config() }
}

/// Submits until the broker acknowledges (it refuses while the primary moves, and says when too
/// few replicas confirmed in time); the idempotency key makes asking again safe. At most 60 s.
async fn submit(broker: &RedisBroker, note: &str) -> JobId {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spec = JobSpec::new("simulation", json!({ "note": note }));
    spec.idempotency_key = Some(note.to_owned());
    loop {
        match broker.submit(spec.clone()).await {
            Ok(s) => return s.id,
            Err(e) => {
                let retry = e.is_transient() || matches!(e, fleetq_broker::BrokerError::NotReplicated { .. });
                assert!(retry, "a failover is transient, not {e}");
                assert!(Instant::now() < deadline, "no primary took the write within 60 s: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The server's `ROLE` ("master", "slave"), or "" while it does not answer (a switch-over closes
/// its clients' connections).
async fn role(port: u16) -> String {
    let asked = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("ROLE").query_async::<Vec<redis::Value>>(&mut conn).await
    };
    match asked.await.ok().as_ref().and_then(|r| r.first()) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_follows_the_primary_the_sentinels_name() {
    let cluster = Cluster::start();
    cluster.replica_known().await;
    let broker =
        RedisBroker::connect(&cluster.url(), "sentinel", config()).await.expect("connect by sentinel");
    let reader = RedisBroker::connect(&cluster.url(), "sentinel", config()).await.expect("a second process");
    assert_eq!(broker.log_source(), 0);
    let before = submit(&broker, "before").await;

    // A switch-over: the primary is demoted to a replica, alive; writes to it meet READONLY.
    cluster.switch_over().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(cluster.replica.port).await != "master" || role(cluster.primary.port).await != "slave" {
        assert!(Instant::now() < deadline, "the replica was never promoted, or the primary never demoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = submit(&broker, "during").await;
    assert_ne!(broker.log_source(), 0, "the writer follows the new primary");
    // The process that only read follows too (a sentinel's `+switch-master`, or its periodic ask),
    // and reads what the writer wrote there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.log_source() == 0 {
        assert!(Instant::now() < deadline, "the reading process never followed the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reader.job(&during).await.expect("read").is_some());

    // A crash of the new primary: the demoted one is promoted back.
    cluster.replica_known().await;
    let moved = broker.log_source();
    cluster.replica.shutdown().expect("crash the primary");
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(cluster.primary.port).await != "master" {
        assert!(Instant::now() < deadline, "the old primary was never promoted back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The crashed server comes back as a replica, so a write can be confirmed by one again.
    let _back = RedisServer::start_with(
        cluster.replica.port,
        &format!("--replicaof 127.0.0.1 {}", cluster.primary.port),
    )
    .expect("restart the crashed server");
    let after = submit(&broker, "after").await;
    assert_ne!(broker.log_source(), moved, "the writer followed the second failover");
    for (id, what) in [(&before, "before"), (&during, "during"), (&after, "after")] {
        let job = broker.job(id).await.expect("read").unwrap_or_else(|| panic!("the job {what} was lost"));
        assert_eq!(job.spec.payload["note"], what);
    }
    // Claims go on against the new primary.
    let pending = broker.jobs(&fleetq_broker::JobFilter::default()).await.expect("list");
    assert_eq!(pending.jobs.len(), 3);
    let events = broker.events_after(0, 100, Duration::ZERO).await.expect("the log");
    assert!(events.len() >= 3, "the log came along: {}", events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_url_to_a_replica_is_refused_with_the_way_out() {
    let primary = RedisServer::start().expect("primary");
    let replica = RedisServer::start_replica_of(primary.port).expect("replica");
    let err = RedisBroker::connect(&replica.url, "sentinel", test_config()).await.expect_err("a replica");
    let msg = err.to_string();
    assert!(msg.contains("read-only replica") && msg.contains("redis+sentinel://"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_urls_that_cannot_work_are_refused_clearly() {
    let primary = RedisServer::start().expect("primary");
    let sentinel = SentinelServer::start(primary.port, NAME, 1, 500, 1000).expect("sentinel");
    // A master name the sentinel does not monitor.
    let url = format!("redis+sentinel://:s3cret@127.0.0.1:{}/other", sentinel.port);
    let msg =
        RedisBroker::connect(&url, "sentinel", test_config()).await.expect_err("unknown name").to_string();
    assert!(msg.contains("\"other\"") && msg.contains("sentinel monitor"), "{msg}");
    assert!(!msg.contains("s3cret"), "the password is not printed: {msg}");
    // No sentinel there.
    let port = RedisServer::free_port().expect("port");
    let url = format!("redis+sentinel://127.0.0.1:{port}/{NAME}");
    let msg = RedisBroker::connect(&url, "sentinel", test_config()).await.expect_err("nobody").to_string();
    assert!(msg.contains("sentinel"), "{msg}");
    // Malformed, and TLS files that cannot apply.
    let msg = RedisBroker::connect("redis+sentinel://127.0.0.1:1", "q", test_config())
        .await
        .expect_err("no name")
        .to_string();
    assert!(msg.contains("names no master"), "{msg}");
    let tls = BrokerConfig {
        redis_tls: fleetq_broker::RedisTls { ca_file: Some("ca.crt".into()), ..Default::default() },
        ..test_config()
    };
    let url = format!("redis+sentinel://127.0.0.1:{}/{NAME}", sentinel.port);
    let msg = RedisBroker::connect(&url, "q", tls).await.expect_err("TLS files").to_string();
    assert!(msg.contains("not supported"), "{msg}");
}
