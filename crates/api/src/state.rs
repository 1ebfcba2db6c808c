//! What every handler sees: the broker, the configuration, the duration statistics and the event
//! hub, behind one cheaply cloned [`AppState`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use axum::http::StatusCode;
use fleetq_broker::Broker;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::{stats, stream};

/// How long one read snapshot serves the WebSocket sessions that open meanwhile.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(500);

/// What every handler sees.
pub(crate) struct AppState<B> {
    pub(crate) broker: Arc<B>,
    pub(crate) config: ApiConfig,
    pub(crate) stats: Arc<stats::DurationStats>,
    /// The process's one reader of the event log, shared by every stream.
    pub(crate) hub: Arc<stream::Hub>,
    /// One permit per open event stream or WebSocket (`config.max_streams`).
    pub(crate) streams: Arc<Semaphore>,
    /// The last `snapshot` message sent to a `/ws/monitor` session, shared by the sessions that
    /// open within [`SNAPSHOT_REUSE`]: its text is built once, not once per socket.
    pub(crate) snapshot: Arc<tokio::sync::Mutex<Option<(Instant, u64, Utf8Bytes)>>>,
}

impl<B: Broker> AppState<B> {
    /// The state of a router over `broker`.
    pub(crate) fn new(
        broker: Arc<B>,
        config: ApiConfig,
        stats: Arc<stats::DurationStats>,
        hub: Arc<stream::Hub>,
    ) -> Self {
        let streams = Arc::new(Semaphore::new(config.max_streams));
        Self { broker, config, stats, hub, streams, snapshot: Arc::default() }
    }

    /// A place for one more open stream, or 503 with `Retry-After` when the server holds
    /// `config.max_streams` already. The stream holds the permit until it ends.
    pub(crate) fn stream_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.streams.clone().try_acquire_owned().map_err(|_| ApiError {
            retry_after_s: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "this server holds its limit of {} open event streams and WebSockets; try again later or another API process",
                    self.config.max_streams
                ),
            )
        })
    }

    /// The `snapshot` message of `/ws/monitor` and its sequence: the shared one when it is fresh
    /// (at most [`SNAPSHOT_REUSE`] old), else read now — by one session while the others wait.
    pub(crate) async fn snapshot_message(&self) -> Result<(u64, Utf8Bytes), fleetq_broker::BrokerError> {
        let mut cached = self.snapshot.lock().await;
        if let Some((at, seq, text)) = cached.as_ref()
            && at.elapsed() < SNAPSHOT_REUSE
        {
            return Ok((*seq, text.clone()));
        }
        let snap = self.broker.snapshot().await?;
        let seq = snap.seq;
        let epoch = self.hub.epoch();
        let text = Utf8Bytes::from(
            json!({"type": "snapshot", "seq": seq, "epoch": epoch, "snapshot": snap}).to_string(),
        );
        *cached = Some((Instant::now(), seq, text.clone()));
        Ok((seq, text))
    }

    /// Every event after `after`, through the shared hub.
    /// [`ApiConfig::stale_after`] in ms, as the staleness rule
    /// ([`fleetq_core::ConnectorReport::is_stale`]) takes it.
    pub(crate) fn stale_after_ms(&self) -> i64 {
        i64::try_from(self.config.stale_after.as_millis()).unwrap_or(i64::MAX)
    }

    pub(crate) fn feed(&self, after: u64) -> impl futures::Stream<Item = stream::Feed> + Send + use<B> {
        stream::feed(self.broker.clone(), self.hub.clone(), after)
    }

    /// Every event after a client's resume point (a token of another epoch resynchronizes).
    pub(crate) fn feed_from(
        &self,
        after: u64,
        epoch: Option<u64>,
    ) -> impl futures::Stream<Item = stream::Feed> + Send + use<B> {
        stream::feed_at(self.broker.clone(), self.hub.clone(), after, epoch)
    }
}

impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            hub: self.hub.clone(),
            streams: self.streams.clone(),
            snapshot: self.snapshot.clone(),
        }
    }
}
