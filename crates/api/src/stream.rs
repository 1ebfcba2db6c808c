//! Event feeds for SSE and WebSocket: one [`Hub`] per API process reads the log and broadcasts it;
//! each [`feed`] resumes after a sequence (reading the log, then joining the hub), notices when the
//! log was trimmed past the resume point (so the client re-reads the snapshot instead of silently
//! missing events), and the topic filter.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::HeaderMap;
use fleetq_broker::Log;
use fleetq_core::{Event, EventKind};
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// What a feed yields.
#[derive(Debug, Clone)]
pub(crate) enum Feed {
    /// The next event.
    Event(Arc<Event>),
    /// The fleet's latest heartbeats (not an event of the log: no sequence, nothing to resume).
    Seen(Arc<Seen>),
    /// Events after the resume point were trimmed from the log; the client must reload the snapshot.
    Gap {
        /// The resume point asked for.
        after: u64,
        /// The first event still available.
        first: u64,
    },
}

/// Live events a lagging client may fall behind by before it reads from the log instead.
const HUB_CAPACITY: usize = 1024;

/// The one reader of the event log in this API process: it long-polls the broker and broadcasts
/// each event to every open stream, so a thousand watchers cost one poll, not a thousand.
pub(crate) struct Hub {
    /// The sender and the sequence of the last event sent, changed together under the lock so a
    /// joining stream knows exactly which events it will receive live and which it must read.
    state: Mutex<HubState>,
    /// Set once the hub knows where the log ends.
    ready: watch::Sender<bool>,
}

struct HubState {
    tx: broadcast::Sender<HubItem>,
    last: u64,
    /// The log's epoch as this hub knows it ([`Log::log_epoch`]); carried in event ids.
    epoch: u64,
}

/// The `workers_seen` message: each worker's last heartbeat and the time of each of its connector
/// reports, as the broker has them now. Heartbeats and unchanged health reports are not events of
/// the log (at a thousand workers they would flood it), so an open page would see healthy workers
/// go stale; the hub reads them once per refresh for every stream of the process instead.
#[derive(Debug)]
pub(crate) struct Seen {
    /// `{"type": "workers_seen", "at", "workers": {id: {"last_seen", "connectors": {service: at}}}}`.
    pub(crate) json: String,
}

impl Seen {
    fn of(workers: &[fleetq_core::WorkerInfo], at: i64) -> Self {
        let workers: serde_json::Map<String, serde_json::Value> = workers
            .iter()
            .map(|w| {
                let connectors: serde_json::Map<String, serde_json::Value> =
                    w.connectors.iter().map(|(service, r)| (service.clone(), r.at.into())).collect();
                let seen = serde_json::json!({"last_seen": w.last_seen, "connectors": connectors});
                (w.registration.worker_id.clone(), seen)
            })
            .collect();
        let json = serde_json::json!({"type": "workers_seen", "at": at, "workers": workers}).to_string();
        Self { json }
    }
}

/// What the hub broadcasts.
#[derive(Debug, Clone)]
enum HubItem {
    /// The next event of the log.
    Event(Arc<Event>),
    /// The fleet's latest heartbeats.
    Seen(Arc<Seen>),
    /// The log went back (a restore, a failover that lost writes): sequences up to the hub's
    /// last may now name other events. Streams resynchronize and go on after `head`.
    Reset {
        /// Where the log ends now.
        head: u64,
    },
}

impl Hub {
    /// Starts the reader (needs a Tokio runtime). It stops at `stop` or when the hub is dropped.
    pub(crate) fn spawn<B: Log>(broker: Arc<B>, stop: CancellationToken) -> Arc<Self> {
        let (tx, _) = broadcast::channel(HUB_CAPACITY);
        let hub = Arc::new(Self {
            state: Mutex::new(HubState { tx, last: 0, epoch: 0 }),
            ready: watch::channel(false).0,
        });
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            tokio::select! {
                () = Self::run(broker, weak) => {}
                () = stop.cancelled() => {}
            }
        });
        hub
    }

    /// Every `every`, reads the workers once and sends their latest heartbeats to every stream
    /// ([`Seen`]): one read per API process, whatever the number of open pages. Stops at `stop` or
    /// when the hub is dropped.
    pub(crate) fn spawn_refresh<B: fleetq_broker::Read>(
        self: &Arc<Self>,
        broker: Arc<B>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let hub = Arc::downgrade(self);
        tokio::spawn(async move {
            let every = every.max(Duration::from_millis(100));
            // The first refresh one period in: a stream opening now has just read the snapshot.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                let Some(h) = hub.upgrade() else { return };
                let Ok(workers) = broker.workers().await else { continue };
                if workers.is_empty() {
                    continue;
                }
                let at = fleetq_core::clock::Clock::now_ms(&fleetq_core::clock::SystemClock);
                let seen = Arc::new(Seen::of(&workers, at));
                let st = h.lock();
                // No receiver is not an error: nobody is watching right now.
                let _ = st.tx.send(HubItem::Seen(seen));
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run<B: Log>(broker: Arc<B>, hub: Weak<Self>) {
        let (head, epoch) = loop {
            match (broker.snapshot().await, broker.log_epoch().await) {
                (Ok(s), Ok(epoch)) => break (s.seq, epoch),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "event hub: cannot read the log's end; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if hub.strong_count() == 0 {
                return;
            }
        };
        match hub.upgrade() {
            Some(h) => {
                let mut st = h.lock();
                (st.last, st.epoch) = (head, epoch);
                drop(st);
                h.ready.send_replace(true);
            }
            None => return,
        }
        let mut from = head;
        // The last event broadcast (at first the log's last), to check after a read failure that
        // the log still holds it.
        let mut last_sent: Option<Arc<Event>> = broker
            .events_after(head.saturating_sub(1), 1, Duration::ZERO)
            .await
            .ok()
            .and_then(|evs| evs.into_iter().next())
            .filter(|ev| ev.seq == head)
            .map(Arc::new);
        // Where the log is read from: when it changes (a Redis primary followed across a
        // failover), what was read before may be gone, as after an outage.
        let mut source = broker.log_source();
        'subscription: loop {
            let mut events = std::pin::pin!(fleetq_broker::subscribe(broker.clone(), from));
            let mut failed = false;
            while let Some(item) = events.next().await {
                let Some(h) = hub.upgrade() else { return };
                match item {
                    Ok(_) if broker.log_source() != source => {
                        // Read from another server than the events before it: not broadcast
                        // until that server is known to hold them (below); then read again.
                        source = broker.log_source();
                        failed = true;
                        if last_sent.is_none() {
                            tracing::warn!(
                                "event hub: the log moved to another server; clients resynchronize"
                            );
                            let head = loop {
                                match broker.snapshot().await {
                                    Ok(s) => break s.seq,
                                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                                }
                                if hub.strong_count() == 0 {
                                    return;
                                }
                            };
                            Self::reset(broker.as_ref(), &h, head).await;
                            from = head;
                            continue 'subscription;
                        }
                    }
                    Ok(ev) => {
                        let ev = Arc::new(ev);
                        let mut st = h.lock();
                        st.last = ev.seq;
                        last_sent = Some(ev.clone());
                        // No receiver is not an error: nobody is watching right now.
                        let _ = st.tx.send(HubItem::Event(ev));
                        failed = false;
                    }
                    Err(e) if !failed => {
                        failed = true;
                        tracing::warn!(error = %e, "event hub: read failed; retrying");
                    }
                    Err(_) => {}
                }
                // After an outage (a restart, a failover) the log may have gone back: once the
                // broker answers again, the event last broadcast must still be there, unchanged,
                // or every stream resynchronizes.
                if failed && let Some(last) = last_sent.clone() {
                    let head = loop {
                        match Self::went_back(broker.as_ref(), &last).await {
                            Ok(verdict) => break verdict,
                            Err(()) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                        if hub.strong_count() == 0 {
                            return;
                        }
                    };
                    if let Some(head) = head {
                        tracing::warn!(
                            broadcast = last.seq,
                            log_head = head,
                            "event hub: the event log went back (restored or failed over with lost writes); clients resynchronize"
                        );
                        Self::reset(broker.as_ref(), &h, head).await;
                        from = head;
                        last_sent = None;
                        continue 'subscription;
                    }
                    // Read on from the last event broadcast, now known to be there (an event read
                    // from a moved source was held back, not sent).
                    from = last.seq;
                    continue 'subscription;
                }
            }
            return;
        }
    }

    /// Tells every stream to resynchronize at `head`, under a new epoch, so that resume tokens
    /// from before name no event of the log as it is now (every hub that noticed agrees on one).
    async fn reset<B: Log>(broker: &B, h: &Self, head: u64) {
        let seen = h.epoch();
        let epoch = broker.advance_log_epoch(seen).await.unwrap_or(seen + 1);
        let mut st = h.lock();
        (st.last, st.epoch) = (head, epoch);
        let _ = st.tx.send(HubItem::Reset { head });
    }

    /// `Some(head)` when the log no longer holds `last` as it was broadcast (it ends before it,
    /// or another event took its sequence), `None` when it does; `Err` while the log cannot be
    /// read.
    async fn went_back<B: Log>(broker: &B, last: &Event) -> Result<Option<u64>, ()> {
        let now = broker.events_after(last.seq.saturating_sub(1), 1, Duration::ZERO).await.map_err(drop)?;
        if now.first().is_some_and(|ev| ev == last) {
            return Ok(None);
        }
        broker.snapshot().await.map(|s| Some(s.seq)).map_err(drop)
    }

    /// The log's epoch as this hub knows it.
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The SSE id of event `seq`: the sequence, and the log's epoch once it moved on from 0
    /// (`seq.epoch`), so a resume token from before a going-back is told apart.
    pub(crate) fn event_id(&self, seq: u64) -> String {
        match self.epoch() {
            0 => seq.to_string(),
            e => format!("{seq}.{e}"),
        }
    }

    /// The sequence of the last event the hub has sent (once it knows where the log ends).
    pub(crate) async fn position(&self) -> u64 {
        self.join().await.1
    }

    /// A receiver of live events and the sequence of the last event sent before it joined: events
    /// up to that sequence must be read from the log, later ones arrive on the receiver.
    async fn join(&self) -> (broadcast::Receiver<HubItem>, u64) {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`, so this cannot fail while `self` exists.
        let _ = ready.wait_for(|r| *r).await;
        let st = self.lock();
        (st.tx.subscribe(), st.last)
    }
}

/// Every event after `after`, in order, forever: first read from the log up to where the hub
/// stands, then from the hub. A stream that lags behind the hub's buffer goes back to the log, so a
/// slow client misses nothing while the log still holds its events; a resume point trimmed from the
/// log yields one [`Feed::Gap`] first.
pub(crate) fn feed<B: Log>(broker: Arc<B>, hub: Arc<Hub>, after: u64) -> impl Stream<Item = Feed> + Send {
    feed_at(broker, hub, after, None)
}

/// [`feed`] from a client's resume token: a token of another epoch than the log's (from before the
/// log went back) yields one [`Feed::Gap`] first, and the feed goes on from the log's end.
pub(crate) fn feed_at<B: Log>(
    broker: Arc<B>,
    hub: Arc<Hub>,
    after: u64,
    epoch: Option<u64>,
) -> impl Stream<Item = Feed> + Send {
    struct St<B> {
        broker: Arc<B>,
        hub: Arc<Hub>,
        after: u64,
        delivered: u64,
        checked: bool,
        live: Option<broadcast::Receiver<HubItem>>,
        read_until: u64,
        buf: VecDeque<Arc<Event>>,
        epoch: Option<u64>,
    }
    let st = St {
        broker,
        hub,
        after,
        delivered: after,
        checked: after == 0,
        live: None,
        read_until: 0,
        buf: VecDeque::new(),
        epoch,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.buf.pop_front() {
                if !std::mem::replace(&mut st.checked, true) && ev.seq > st.after + 1 {
                    let gap = Feed::Gap { after: st.after, first: ev.seq };
                    st.buf.push_front(ev);
                    return Some((gap, st));
                }
                st.delivered = ev.seq;
                return Some((Feed::Event(ev), st));
            }
            let Some(rx) = st.live.as_mut() else {
                let (rx, at) = st.hub.join().await;
                st.live = Some(rx);
                st.read_until = at;
                // A resume point past the end of this log (another log's, or one that went back):
                // the client's picture is not this log's, so it reloads the snapshot and the feed
                // goes on from where the log ends — never silence. (The hub may only lag behind
                // the log: the log itself says whether event `after` exists.)
                let other_epoch = st.epoch.take().is_some_and(|e| e != st.hub.epoch());
                if other_epoch || (!st.checked && st.after > at) {
                    let probe = match other_epoch {
                        true => Ok(Vec::new()),
                        false => st.broker.events_after(st.after - 1, 1, Duration::ZERO).await,
                    };
                    if matches!(&probe, Ok(evs) if evs.is_empty()) {
                        st.checked = true;
                        let end = st.broker.snapshot().await.map_or(at, |s| s.seq);
                        let gap = Feed::Gap { after: st.after, first: end + 1 };
                        (st.after, st.delivered) = (end, end);
                        return Some((gap, st));
                    }
                }
                continue;
            };
            if st.delivered < st.read_until {
                match st.broker.events_after(st.delivered, 256, Duration::ZERO).await {
                    Ok(evs) if !evs.is_empty() => st.buf.extend(evs.into_iter().map(Arc::new)),
                    // The log has nothing more (it ends where the hub stands): go live.
                    Ok(_) => st.read_until = st.delivered,
                    Err(e) => {
                        tracing::warn!(error = %e, "event feed: read failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                continue;
            }
            match rx.recv().await {
                Ok(HubItem::Seen(seen)) => return Some((Feed::Seen(seen), st)),
                Ok(HubItem::Event(ev)) if ev.seq <= st.delivered => {}
                Ok(HubItem::Event(ev)) => st.buf.push_back(ev),
                // The log went back: what this stream delivered may no longer be the log's. The
                // client reloads the snapshot; the stream goes on after the log's new end.
                Ok(HubItem::Reset { head }) => {
                    let gap = Feed::Gap { after: st.delivered, first: head + 1 };
                    st.buf.clear();
                    (st.delivered, st.after, st.read_until) = (head, head, head);
                    return Some((gap, st));
                }
                // Fell behind the hub's buffer: rejoin, reading the missed events from the log.
                Err(broadcast::error::RecvError::Lagged(_)) => st.live = None,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// Topics a client can filter the global stream by.
pub(crate) const TOPICS: [&str; 4] = ["jobs", "workers", "connectors", "machines"];

/// The topic of an event.
pub(crate) fn topic(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::WorkerRegistered { .. } | EventKind::WorkerRemoved { .. } => "workers",
        EventKind::ConnectorStatus { .. } => "connectors",
        EventKind::Machine { .. } => "machines",
        _ => "jobs",
    }
}

/// Parses a comma-separated topic list; empty or absent means all topics.
/// The query of the fleet's event streams (`/api/events`, `/ws/monitor`).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FleetStreamQuery {
    /// Comma list of jobs, workers, connectors, machines (default all).
    pub(crate) topics: Option<String>,
    /// Resume after this event id (`seq`, or `seq.epoch` once the log's epoch moved on), as
    /// Last-Event-ID; an id of another epoch resynchronizes.
    pub(crate) since: Option<String>,
    /// The token, for a browser's EventSource or WebSocket, which cannot send headers (prefer
    /// `Authorization`).
    #[allow(dead_code, reason = "read by the auth layer; listed so that it is documented and accepted")]
    pub(crate) access_token: Option<String>,
}

pub(crate) fn parse_topics(text: Option<&str>) -> Result<BTreeSet<&'static str>, ApiError> {
    let mut out = BTreeSet::new();
    for t in text.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let known = TOPICS.iter().find(|k| **k == t).ok_or_else(|| {
            ApiError::bad_request("topics", format!("unknown topic {t:?}; topics are {}", TOPICS.join(", ")))
        })?;
        out.insert(*known);
    }
    if out.is_empty() {
        out.extend(TOPICS);
    }
    Ok(out)
}

/// The resume point: the `Last-Event-ID` header (what `EventSource` sends on reconnect), else the
/// `since` query parameter. `None` means "from now".
/// A client's resume token: the sequence of the last event it has, and the log's epoch then
/// (`seq` or `seq.epoch`, as [`Hub::event_id`] writes them; a bare sequence is of epoch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    /// The last event the client has.
    pub(crate) seq: u64,
    /// The log's epoch it was read in.
    pub(crate) epoch: u64,
}

impl Resume {
    fn parse(text: &str) -> Option<Self> {
        let (seq, epoch) = match text.trim().split_once('.') {
            Some((s, e)) => (s.parse().ok()?, e.parse().ok()?),
            None => (text.trim().parse().ok()?, 0),
        };
        Some(Self { seq, epoch })
    }
}

/// The resume point of a stream request: `Last-Event-ID`, else `since`.
pub(crate) fn resume_point(headers: &HeaderMap, since: Option<&str>) -> Result<Option<Resume>, ApiError> {
    if let Some(v) = headers.get("last-event-id") {
        let text = v.to_str().unwrap_or("");
        return Resume::parse(text).map(Some).ok_or_else(|| {
            ApiError::bad_request("Last-Event-ID", "must be an event id (a sequence, or sequence.epoch)")
        });
    }
    since
        .map(|s| {
            Resume::parse(s).ok_or_else(|| {
                ApiError::bad_request("since", "must be an event id (a sequence, or sequence.epoch)")
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetq_broker::BrokerConfig;
    use fleetq_broker::embedded::EmbeddedBroker;
    use fleetq_broker::{Log, Queue};
    use fleetq_core::{JobSpec, Limits, job_spec_from_value};

    fn spec() -> JobSpec {
        job_spec_from_value(serde_json::json!({"service": "sim"}), &Limits::default()).unwrap()
    }

    fn broker(max_events: usize) -> (Arc<EmbeddedBroker>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig { max_events, ..BrokerConfig::default() };
        (Arc::new(EmbeddedBroker::open(dir.path().join("q.db"), config).unwrap()), dir)
    }

    /// Waits until the hub has broadcast event `seq` (a condition, not a timing assertion).
    async fn hub_reaches(hub: &Hub, seq: u64) {
        while hub.lock().last < seq {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn take(feed: impl Stream<Item = Feed>, n: usize) -> Vec<u64> {
        let items: Vec<Feed> = feed.take(n).collect().await;
        items
            .into_iter()
            .map(|f| match f {
                Feed::Event(ev) => ev.seq,
                Feed::Gap { .. } => panic!("unexpected gap"),
                Feed::Seen(_) => panic!("no refresh runs in these tests"),
            })
            .collect()
    }

    #[tokio::test]
    async fn many_streams_share_one_reader_and_each_sees_every_event_once_in_order() {
        let (b, _dir) = broker(100_000);
        let hub = Hub::spawn(b.clone(), CancellationToken::new());
        let _ = hub.join().await;
        // Streams joining at different points: from the start, mid-way, and at the end.
        b.submit_batch((0..50).map(|_| spec()).collect()).await.unwrap();
        let early: Vec<_> =
            (0..20).map(|_| tokio::spawn(take(feed(b.clone(), hub.clone(), 0), 300))).collect();
        let late: Vec<_> =
            (0..20).map(|_| tokio::spawn(take(feed(b.clone(), hub.clone(), 50), 250))).collect();
        // Submitted while the streams run, in small batches so reads and broadcasts interleave.
        for _ in 0..25 {
            b.submit_batch((0..10).map(|_| spec()).collect()).await.unwrap();
        }
        for t in early {
            assert_eq!(t.await.unwrap(), (1..=300).collect::<Vec<u64>>());
        }
        for t in late {
            assert_eq!(t.await.unwrap(), (51..=300).collect::<Vec<u64>>());
        }
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_the_hub_reads_the_rest_from_the_log() {
        let (b, _dir) = broker(100_000);
        let hub = Hub::spawn(b.clone(), CancellationToken::new());
        let mut slow = Box::pin(feed(b.clone(), hub.clone(), 0));
        b.submit(spec()).await.unwrap();
        assert!(matches!(slow.next().await, Some(Feed::Event(ev)) if ev.seq == 1));
        // More than the hub buffers, while the slow stream does not read.
        let n = HUB_CAPACITY as u64 * 3;
        for _ in 0..3 {
            b.submit_batch((0..HUB_CAPACITY).map(|_| spec()).collect()).await.unwrap();
        }
        hub_reaches(&hub, n + 1).await;
        assert_eq!(take(slow, n as usize).await, (2..=n + 1).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn a_resume_point_trimmed_from_the_log_yields_a_gap_then_the_events_kept() {
        let (b, _dir) = broker(100);
        let hub = Hub::spawn(b.clone(), CancellationToken::new());
        // The embedded store trims every 1024 events down to the last `max_events`.
        b.submit_batch((0..1100).map(|_| spec()).collect()).await.unwrap();
        let first = b.events_after(0, 1, Duration::ZERO).await.unwrap()[0].seq;
        assert!(first > 11, "the log was trimmed (first kept: {first})");
        let mut f = Box::pin(feed(b.clone(), hub.clone(), 10));
        match f.next().await {
            Some(Feed::Gap { after: 10, first: got }) => assert_eq!(got, first),
            other => panic!("expected a gap, got {other:?}"),
        }
        assert!(matches!(f.next().await, Some(Feed::Event(ev)) if ev.seq == first));
    }

    #[tokio::test]
    async fn a_resume_point_past_the_end_of_the_log_yields_a_gap_then_live_events() {
        let (b, _dir) = broker(100_000);
        let hub = Hub::spawn(b.clone(), CancellationToken::new());
        b.submit_batch((0..5).map(|_| spec()).collect()).await.unwrap();
        let head = b.snapshot().await.unwrap().seq;
        hub_reaches(&hub, head).await;
        let mut f = Box::pin(feed(b.clone(), hub.clone(), u64::MAX));
        match f.next().await {
            Some(Feed::Gap { after: u64::MAX, first }) => assert_eq!(first, head + 1),
            other => panic!("expected a gap, got {other:?}"),
        }
        b.submit(spec()).await.unwrap();
        assert!(matches!(f.next().await, Some(Feed::Event(ev)) if ev.seq == head + 1), "then the next event");
    }

    #[tokio::test]
    async fn a_token_of_another_epoch_yields_a_gap_then_live_events() {
        let (b, _dir) = broker(100_000);
        let hub = Hub::spawn(b.clone(), CancellationToken::new());
        b.submit_batch((0..5).map(|_| spec()).collect()).await.unwrap();
        let head = b.snapshot().await.unwrap().seq;
        hub_reaches(&hub, head).await;
        // The same epoch: the events after the token, no gap.
        let mut same = Box::pin(feed_at(b.clone(), hub.clone(), 2, Some(0)));
        assert!(matches!(same.next().await, Some(Feed::Event(ev)) if ev.seq == 3));
        // A token from another epoch names no event of this log: resync from its end.
        let mut other = Box::pin(feed_at(b.clone(), hub.clone(), 2, Some(7)));
        match other.next().await {
            Some(Feed::Gap { after: 2, first }) => assert_eq!(first, head + 1),
            got => panic!("expected a gap, got {got:?}"),
        }
        b.submit(spec()).await.unwrap();
        assert!(matches!(other.next().await, Some(Feed::Event(ev)) if ev.seq == head + 1));
    }

    #[test]
    fn topics_parse_and_an_unknown_one_names_the_field() {
        assert_eq!(parse_topics(None).unwrap().len(), 4);
        assert_eq!(
            parse_topics(Some("jobs, workers")).unwrap().into_iter().collect::<Vec<_>>(),
            ["jobs", "workers"]
        );
        let e = parse_topics(Some("jobs,nope")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("topics"));
    }

    #[test]
    fn resume_from_header_or_query() {
        let mut h = HeaderMap::new();
        let at = |seq, epoch| Some(Resume { seq, epoch });
        assert_eq!(resume_point(&h, None).unwrap(), None);
        assert_eq!(resume_point(&h, Some("7")).unwrap(), at(7, 0));
        assert_eq!(resume_point(&h, Some("7.2")).unwrap(), at(7, 2));
        assert!(resume_point(&h, Some("x")).is_err());
        assert!(resume_point(&h, Some("7.")).is_err());
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(resume_point(&h, Some("7")).unwrap(), at(42, 0), "the header wins");
        h.insert("last-event-id", "-1".parse().unwrap());
        assert!(resume_point(&h, None).is_err());
    }
}
