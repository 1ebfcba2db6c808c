//! Where the primary is, and the connections to it.
//!
//! A `redis://` or `rediss://` URL names the primary directly. A `redis+sentinel://` URL names
//! Redis Sentinels: the primary is the one they name, asked at connect and asked again
//! - when a command meets a replica (`READONLY`, `MASTERDOWN`: the old primary came back as a
//!   replica, or the address now belongs to one) — nothing ran, so the command is sent again to
//!   the new primary;
//! - when the connection to the primary is lost or times out — a read is sent again, a state
//!   change is not (it may have run: the caller sees the error, as on any connection loss);
//! - when a sentinel announces `+switch-master` for this primary, and every few seconds by asking
//!   one (so a process that only reads, or whose subscription was cut, follows a failover too).
//!
//! Every connection — the shared multiplexed one and the blocking ones (claims' wake-ups, cancel
//! signals, event waits) — goes to the current primary; blocking connections opened to an earlier
//! one are dropped, not reused. Reads stay on the primary as well (no replica reads).

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind,
};
use tokio::time::Instant;

use super::sentinel_url::SentinelUrl;
use crate::{BrokerError, Result};

/// How often a process asks a sentinel where the primary is, besides `+switch-master`.
const SENTINEL_CHECK: Duration = Duration::from_secs(5);
/// Asking again sooner than this after a failed ask waits: a failover takes seconds, and
/// every failing command would otherwise ask.
const RESOLVE_SPACING: Duration = Duration::from_millis(200);

/// The shared connection's settings: reconnecting, with a bounded wait for each reply.
pub(super) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2))
}

/// The shared connection to a primary. A fixed address keeps a [`ConnectionManager`], which
/// reconnects to that address by itself. A primary named by Sentinel keeps a plain multiplexed
/// connection that never reconnects by itself: after a loss the sentinels are asked first, so a
/// process never goes back to an address that may now be an empty restarted server or a replica.
#[derive(Clone)]
pub(super) enum Conn {
    Managed(ConnectionManager),
    Plain(MultiplexedConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Managed(c) => c.req_packed_command(cmd),
            Self::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Plain(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Managed(c) => c.get_db(),
            Self::Plain(c) => c.get_db(),
        }
    }
}

/// The settings of a primary's plain shared connection: a bounded wait for each reply.
fn plain_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)))
}

/// One primary and the shared connection to it.
pub(super) struct Primary {
    pub(super) client: redis::Client,
    pub(super) conn: Conn,
    /// Moves each time another primary is found.
    pub(super) generation: u64,
    /// `host:port`, for log lines.
    pub(super) addr: String,
}

/// The current primary, how to find it again, and the pooled blocking connections to it.
pub(super) struct Link {
    current: RwLock<Arc<Primary>>,
    sentinel: Option<Sentinels>,
    blocking: Mutex<Vec<(u64, MultiplexedConnection)>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("Link")
            .field("primary", &current.addr)
            .field("generation", &current.generation)
            .field("sentinel", &self.sentinel.as_ref().map(|s| &s.url.master))
            .finish()
    }
}

struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
    url: SentinelUrl,
    /// When an ask last failed (asks are spaced by [`RESOLVE_SPACING`] after a failure).
    failed_at: Mutex<Option<Instant>>,
}

/// Whether an error says the server is not (or no longer) the primary: the command did not run.
pub(super) fn is_replica_answer(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown))
}

/// Whether an error says the connection to the server was lost or never came.
pub(super) fn is_connection_loss(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn addr_of(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

impl Link {
    /// A link to the fixed primary of `client`.
    pub(super) async fn fixed(client: redis::Client) -> Result<Arc<Self>> {
        let conn = Conn::Managed(client.get_connection_manager_with_config(manager_config()).await?);
        let addr = addr_of(&client);
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(Primary { client, conn, generation: 0, addr })),
            sentinel: None,
            blocking: Mutex::new(Vec::new()),
        }))
    }

    /// A link to the primary the sentinels of `url` name, watched for failovers from now on.
    pub(super) async fn sentinel(url: SentinelUrl, shown: &str) -> Result<Arc<Self>> {
        let addrs = url.sentinels.iter().map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
        let mut builder = SentinelClientBuilder::new(addrs, &url.master, SentinelServerType::Master)
            .map_err(|e| BrokerError::Connect(format!("{shown}: {e}")))?
            .set_client_to_redis_db(url.db);
        if let Some(u) = &url.username {
            builder = builder.set_client_to_redis_username(u);
        }
        if let Some(p) = &url.password {
            builder = builder.set_client_to_redis_password(p);
        }
        if let Some(u) = &url.sentinel_username {
            builder = builder.set_client_to_sentinel_username(u);
        }
        if let Some(p) = &url.sentinel_password {
            builder = builder.set_client_to_sentinel_password(p);
        }
        let mut sentinel = builder.build().map_err(|e| BrokerError::Connect(format!("{shown}: {e}")))?;
        let client = match tokio::time::timeout(Duration::from_secs(10), sentinel.async_get_client()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                let why = e.detail().map_or_else(|| e.to_string(), str::to_owned);
                return Err(BrokerError::Connect(format!(
                    "no sentinel of {shown} named a reachable primary {:?}: {why}: are the sentinels running and monitoring that name (`sentinel monitor {} HOST PORT QUORUM`)?",
                    url.master, url.master
                )));
            }
            Err(_) => {
                return Err(BrokerError::Connect(format!(
                    "no sentinel of {shown} answered within 10 s: are the sentinels running there?"
                )));
            }
        };
        let conn = Conn::Plain(client.get_multiplexed_async_connection_with_config(&plain_config()).await?);
        let addr = addr_of(&client);
        tracing::info!(primary = %addr, master = %url.master, "Redis Sentinel named the primary");
        let link = Arc::new(Self {
            current: RwLock::new(Arc::new(Primary { client, conn, generation: 0, addr })),
            sentinel: Some(Sentinels {
                client: tokio::sync::Mutex::new(sentinel),
                url,
                failed_at: Mutex::new(None),
            }),
            blocking: Mutex::new(Vec::new()),
        });
        tokio::spawn(watch(Arc::downgrade(&link)));
        Ok(link)
    }

    /// The current primary.
    pub(super) fn current(&self) -> Arc<Primary> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the primary can move (a Sentinel URL).
    pub(super) fn follows_failovers(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Asks the sentinels where the primary is, once `seen` (the generation a command failed on)
    /// is still current, and connects to it anew (a new generation, even at the same address);
    /// true when a connection other than `seen`'s is now current.
    pub(super) async fn resolve(&self, seen: u64) -> bool {
        let Some(s) = &self.sentinel else { return false };
        let mut sentinel = s.client.lock().await;
        if self.current().generation != seen {
            return true;
        }
        let recently_failed =
            s.failed_at.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < RESOLVE_SPACING);
        if recently_failed {
            tokio::time::sleep(RESOLVE_SPACING).await;
        }
        let found = tokio::time::timeout(Duration::from_secs(5), sentinel.async_get_client()).await;
        let client = match found {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, master = %s.url.master, "no sentinel names a reachable primary yet");
                self.note_failure(s);
                return false;
            }
            Err(_) => {
                tracing::warn!(master = %s.url.master, "no sentinel answered within 5 s");
                self.note_failure(s);
                return false;
            }
        };
        self.adopt(s, client).await
    }

    /// Connects to the primary `client` names and makes it current (a new generation).
    async fn adopt(&self, s: &Sentinels, client: redis::Client) -> bool {
        let addr = addr_of(&client);
        let old = self.current();
        // A new connection even to the same address: the old one is lost or went to a replica.
        let conn = match client.get_multiplexed_async_connection_with_config(&plain_config()).await {
            Ok(conn) => Conn::Plain(conn),
            Err(e) => {
                tracing::warn!(error = %e, primary = %addr, "cannot connect to the primary the sentinels name");
                self.note_failure(s);
                return false;
            }
        };
        let generation = old.generation.wrapping_add(1);
        let next = Arc::new(Primary { client, conn, generation, addr: addr.clone() });
        match self.current.write() {
            Ok(mut slot) => *slot = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        if let Ok(mut pool) = self.blocking.lock() {
            pool.retain(|(g, _)| *g == generation);
        }
        if addr == old.addr {
            tracing::info!(primary = %addr, "reconnected to the Redis primary");
        } else {
            tracing::warn!(from = %old.addr, to = %addr, master = %s.url.master, "the Redis primary moved; following it");
        }
        true
    }

    fn note_failure(&self, s: &Sentinels) {
        if let Ok(mut t) = s.failed_at.lock() {
            *t = Some(Instant::now());
        }
    }

    /// Whether the sentinels name another primary than the current one (asked every few
    /// seconds by the watcher); follows it when they do.
    async fn check(&self) {
        let Some(s) = &self.sentinel else { return };
        // Asked and followed under the sentinels' lock, as `resolve` does: the answer is used,
        // not asked for twice.
        let mut sentinel = s.client.lock().await;
        let named = tokio::time::timeout(Duration::from_secs(5), sentinel.async_get_client()).await;
        if let Ok(Ok(client)) = named
            && addr_of(&client) != self.current().addr
        {
            self.adopt(s, client).await;
        }
        drop(sentinel);
    }

    /// A connection for a blocking command (no reply timeout) to the current primary, and its
    /// generation (to give it back with).
    pub(super) async fn blocking_conn(&self) -> Result<(u64, MultiplexedConnection)> {
        let primary = self.current();
        if let Some(found) = self.blocking.lock().ok().and_then(|mut pool| {
            let at = pool.iter().rposition(|(g, _)| *g == primary.generation)?;
            Some(pool.swap_remove(at))
        }) {
            return Ok(found);
        }
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = primary.client.get_multiplexed_async_connection_with_config(&config).await;
        match conn {
            Ok(conn) => Ok((primary.generation, conn)),
            Err(e) => {
                self.failed(primary.generation, &e).await;
                Err(e.into())
            }
        }
    }

    /// Gives a blocking connection back to the pool (unless its primary is no longer current).
    pub(super) fn return_conn(&self, generation: u64, conn: MultiplexedConnection) {
        if generation != self.current().generation {
            return;
        }
        if let Ok(mut pool) = self.blocking.lock()
            && pool.len() < 64
        {
            pool.push((generation, conn));
        }
    }

    /// After a command on generation `seen` failed with `e`: asks the sentinels again when the
    /// error says the primary may have moved. True when another primary is now current.
    pub(super) async fn failed(&self, seen: u64, e: &RedisError) -> bool {
        if self.sentinel.is_none() || !(is_replica_answer(e) || is_connection_loss(e)) {
            return false;
        }
        self.resolve(seen).await
    }
}

/// Follows `+switch-master` announcements of the sentinels (one subscription at a time, moving
/// to the next sentinel when one is lost), and asks every [`SENTINEL_CHECK`] regardless. Ends
/// when the link is dropped.
async fn watch(link: Weak<Link>) {
    let (sentinels, master) = match link.upgrade().as_ref().and_then(|l| l.sentinel.as_ref()) {
        Some(s) => (s.url.clone(), s.url.master.clone()),
        None => return,
    };
    let mut next = 0usize;
    let mut tick = tokio::time::interval(SENTINEL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some((host, port)) = sentinels.sentinels.get(next % sentinels.sentinels.len().max(1)).cloned()
        else {
            return;
        };
        next = next.wrapping_add(1);
        let Ok(info) = ConnectionAddr::Tcp(host, port).into_connection_info() else { return };
        let mut redis_info = redis::RedisConnectionInfo::default();
        if let Some(u) = &sentinels.sentinel_username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = &sentinels.sentinel_password {
            redis_info = redis_info.set_password(p);
        }
        let info = info.set_redis_settings(redis_info);
        let subscribed = async {
            let client = redis::Client::open(info).ok()?;
            let mut pubsub =
                tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub()).await.ok()?.ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub)
        }
        .await;
        let Some(pubsub) = subscribed else {
            // This sentinel is not there: the periodic ask still runs while the next is tried.
            tick.tick().await;
            match link.upgrade() {
                Some(l) => l.check().await,
                None => return,
            }
            continue;
        };
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    // "<master name> <old ip> <old port> <new ip> <new port>"
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if payload.split(' ').next() != Some(master.as_str()) {
                        continue;
                    }
                    let Some(l) = link.upgrade() else { return };
                    let seen = l.current().generation;
                    l.resolve(seen).await;
                }
                _ = tick.tick() => {
                    let Some(l) = link.upgrade() else { return };
                    l.check().await;
                }
            }
        }
    }
}
