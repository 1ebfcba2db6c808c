//! Test support: a real `redis-server` on a free loopback port, and the one way every crate's tests
//! get a fresh broker — [`embedded`] and [`redis`] on the system clock, [`embedded_fixture`] and
//! [`redis_fixture`] on a [`ManualClock`] for the conformance suite. Only compiled with the
//! `test-utils` feature (the backends with theirs).
//!
//! The server is started through `sh`, which kills it when the test process's end of a pipe
//! closes, so a panicking or killed test binary never leaves a Redis behind.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU16;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, OnceLock};

use crate::{BrokerConfig, ManualClock};

/// A running `redis-server` owned by this process.
#[derive(Debug)]
pub struct RedisServer {
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    /// The server's port.
    pub port: u16,
    _child: Mutex<Child>,
    _dir: tempfile::TempDir,
}

/// The error message when Redis cannot run: tests fail, they never skip.
pub const MISSING_REDIS: &str = "redis-server is required for the Redis tests (Debian: apt-get install -y redis-server); .ci/run installs it";

impl RedisServer {
    /// Starts a throwaway server (no persistence) on a free port and waits until it accepts commands.
    ///
    /// Ports come from a per-process counter, never reused: a test that stops its server and
    /// restarts it on the same port must not race another test handed that port meanwhile.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(Self::free_port()?)
    }

    /// Starts a throwaway server on `port` (to restart one where clients expect it).
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        Self::launch(port, "--save '' --appendonly no")
    }

    /// Starts a server on `port` that keeps its data in `dir` (AOF, fsync always), so a restart
    /// on the same port and directory finds everything acknowledged before it.
    pub fn start_persistent(port: u16, dir: &std::path::Path) -> std::io::Result<Self> {
        Self::launch(
            port,
            &format!("--save '' --appendonly yes --appendfsync always --dir '{}'", dir.display()),
        )
    }

    /// Starts a server on `port` with `args` added to its command line (shell words: quote paths
    /// with spaces), e.g. a password or TLS ports; waits until the plain port listens.
    pub fn start_with(port: u16, args: &str) -> std::io::Result<Self> {
        Self::launch(port, &format!("--save '' --appendonly no {args}"))
    }

    /// Starts a throwaway replica (no persistence) of the server on `primary_port`.
    pub fn start_replica_of(primary_port: u16) -> std::io::Result<Self> {
        Self::launch(
            Self::free_port()?,
            &format!("--save '' --appendonly no --replicaof 127.0.0.1 {primary_port}"),
        )
    }

    /// A free loopback port, never handed out twice by this process.
    pub fn free_port() -> std::io::Result<u16> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 2_000) as u16 * 16, SeqCst, SeqCst);
        for _ in 0..1000 {
            let port = NEXT.fetch_add(1, SeqCst);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no free loopback port for redis-server"))
    }

    fn launch(port: u16, persistence: &str) -> std::io::Result<Self> {
        // Its own directory (a later --dir of `persistence` wins): a replica writes the data it
        // receives there, never into the tests' working directory.
        let dir = tempfile::tempdir()?;
        let child = spawn_listening(
            port,
            &format!(
                "redis-server --port {port} --bind 127.0.0.1 --dir '{}' {persistence} --daemonize no \
                 --loglevel warning --protected-mode yes",
                dir.path().display()
            ),
        )?;
        Ok(Self { url: format!("redis://127.0.0.1:{port}/"), port, _child: Mutex::new(child), _dir: dir })
    }

    /// Stops the server at once (`SHUTDOWN NOSAVE`), as a crash or restart would.
    pub fn shutdown(&self) -> std::io::Result<()> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.write_all(b"SHUTDOWN NOSAVE\r\n")?;
        // Wait for the server to close the connection (it exits).
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut buf);
        Ok(())
    }

    /// One server shared by every test of this process (each test uses its own key prefix).
    /// Panics with [`MISSING_REDIS`] when `redis-server` cannot be started.
    pub fn shared() -> Arc<RedisServer> {
        static SERVER: OnceLock<Arc<RedisServer>> = OnceLock::new();
        SERVER
            .get_or_init(|| {
                let found =
                    Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
                assert!(found, "{MISSING_REDIS}");
                Arc::new(RedisServer::start().unwrap_or_else(|e| panic!("{MISSING_REDIS}: {e}")))
            })
            .clone()
    }
}

/// Runs `command` through `sh` (killed when this process's end of the pipe closes) and waits until
/// something listens on `port`.
fn spawn_listening(port: u16, command: &str) -> std::io::Result<Child> {
    // `read` returns when our stdin pipe closes (this process exited), then the server is killed.
    let script = format!("{command} >/dev/null 2>&1 & pid=$!; echo started; read _; kill $pid");
    let mut child =
        Command::new("sh").arg("-c").arg(script).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Err(std::io::Error::other(format!("redis-server did not listen on port {port}")))
}

/// A running Redis Sentinel (`redis-server --sentinel`) owned by this process, watching one
/// primary.
#[derive(Debug)]
pub struct SentinelServer {
    /// The sentinel's port.
    pub port: u16,
    _child: Mutex<Child>,
    _dir: tempfile::TempDir,
}

impl SentinelServer {
    /// Starts a sentinel on a free port watching the primary on `primary_port` under `name`, with
    /// `quorum`, judging the primary down after `down_after_ms` and giving a failover
    /// `failover_timeout_ms` (a sentinel rewrites its configuration file: it gets its own).
    pub fn start(
        primary_port: u16,
        name: &str,
        quorum: u32,
        down_after_ms: u64,
        failover_timeout_ms: u64,
    ) -> std::io::Result<Self> {
        let port = RedisServer::free_port()?;
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\nloglevel warning\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {name} {down_after_ms}\n\
                 sentinel failover-timeout {name} {failover_timeout_ms}\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.path().display()
            ),
        )?;
        let child = spawn_listening(port, &format!("redis-server '{}' --sentinel", conf.display()))?;
        Ok(Self { port, _child: Mutex::new(child), _dir: dir })
    }
}

/// What a conformance case gets: a broker, the clock it reads, and whatever keeps its store alive.
pub struct Fixture<B> {
    /// The broker under test.
    pub broker: Arc<B>,
    /// Its clock.
    pub clock: ManualClock,
    /// Keeps the store alive (a temp dir, a server).
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// The configuration conformance cases run with (small limits so edges are reachable).
pub fn test_config() -> BrokerConfig {
    BrokerConfig {
        lease_ms: 10_000,
        worker_ttl_ms: 60_000,
        progress_coalesce_ms: 250,
        max_events: 100_000,
        max_event_age_ms: 3_600_000,
        max_result_bytes: 4096,
        retention_ms: 3_600_000,
        snapshot_pending_limit: 1000,
        claim_recheck_ms: 200,
        retry_avoid_ms: 5_000,
        limits: fleetq_core::Limits { max_payload_bytes: 64 * 1024, ..fleetq_core::Limits::default() },
        ..BrokerConfig::default()
    }
}

/// The time conformance cases start at (2023-11-14).
pub const T0: i64 = 1_700_000_000_000;

/// A fresh embedded store with `config` in a temporary directory that lives as long as the
/// returned guard.
#[cfg(feature = "embedded")]
pub fn embedded(config: BrokerConfig) -> (Arc<crate::embedded::EmbeddedBroker>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = crate::embedded::EmbeddedBroker::open(dir.path().join("fleetq.db"), config)
        .expect("open the test store");
    (Arc::new(broker), dir)
}

/// A broker with `config` on this test binary's shared Redis ([`RedisServer::shared`]), on a
/// queue of its own.
#[cfg(feature = "redis")]
pub async fn redis(config: BrokerConfig) -> Arc<crate::redis::RedisBroker> {
    let server = RedisServer::shared();
    let broker = crate::redis::RedisBroker::connect(&server.url, &fresh_queue(), config)
        .await
        .expect("connect to the test redis");
    Arc::new(broker)
}

/// A fixture for the conformance suite: a fresh embedded store on a [`ManualClock`] at [`T0`].
#[cfg(feature = "embedded")]
#[allow(clippy::unused_async, reason = "the conformance macro awaits every fixture maker; Redis needs async")]
pub async fn embedded_fixture(config: BrokerConfig) -> Fixture<crate::embedded::EmbeddedBroker> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(T0);
    let broker = crate::embedded::EmbeddedBroker::open_with_clock(
        dir.path().join("fleetq.db"),
        config,
        Arc::new(clock.clone()),
    )
    .expect("open the test store");
    Fixture { broker: Arc::new(broker), clock, guard: Box::new(dir) }
}

/// A fixture for the conformance suite: a queue of its own on the shared Redis, on a
/// [`ManualClock`] at [`T0`].
#[cfg(feature = "redis")]
pub async fn redis_fixture(config: BrokerConfig) -> Fixture<crate::redis::RedisBroker> {
    let server = RedisServer::shared();
    let clock = ManualClock::new(T0);
    let broker = crate::redis::RedisBroker::connect_with_clock(
        &server.url,
        &fresh_queue(),
        config,
        Arc::new(clock.clone()),
    )
    .await
    .expect("connect to the test redis");
    Fixture { broker: Arc::new(broker), clock, guard: Box::new(server) }
}

/// A queue name no other broker of this process uses.
#[cfg(feature = "redis")]
fn fresh_queue() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, SeqCst))
}
