//! The API's event streams (SSE), typed and resuming: when the connection drops, the stream
//! reconnects with `Last-Event-ID` set to the last event it yielded, so across an API restart
//! nothing is missed and nothing is yielded twice. An API that stays unreachable ends the stream
//! with [`ClientError::Unreachable`] after [`MAX_RECONNECTS`] attempts a second apart.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use fleetq_core::{Event, JobId, JobSummary, Outcome};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use crate::{Client, ClientError, Result, refusal, segment};

/// Failed connection attempts in a row before a stream gives up.
pub const MAX_RECONNECTS: u32 = 10;
/// Pause between failed connection attempts.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Pause before reconnecting after the server ended a stream (a restart, a proxy's cut).
const AFTER_END: Duration = Duration::from_millis(500);

type Sse =
    Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, EventStreamError<reqwest::Error>>> + Send>>;

/// What the resuming reader yields.
enum Frame {
    Event(eventsource_stream::Event),
    /// The connection failed; the reader is reconnecting.
    Lost,
    /// Connected again after a loss.
    Resumed,
}

/// One SSE route read across reconnections. Every field changes only after an `.await` finished,
/// so dropping a [`Resuming::next`] future half-way (in a `select!`) loses nothing.
struct Resuming {
    client: Client,
    path: String,
    query: Vec<(&'static str, String)>,
    last_id: Option<String>,
    open: Option<Sse>,
    failures: u32,
    lost: bool,
}

impl Resuming {
    fn new(client: Client, path: String, query: Vec<(&'static str, String)>) -> Self {
        Self { client, path, query, last_id: None, open: None, failures: 0, lost: false }
    }

    async fn next(&mut self) -> Result<Frame> {
        loop {
            if let Some(open) = &mut self.open {
                match open.next().await {
                    Some(Ok(ev)) => {
                        if !ev.id.is_empty() {
                            self.last_id = Some(ev.id.clone());
                        }
                        return Ok(Frame::Event(ev));
                    }
                    // Ended or broken: resume after the last event yielded.
                    _ => {
                        self.open = None;
                        tokio::time::sleep(AFTER_END).await;
                        continue;
                    }
                }
            }
            if let Some(frame) = self.open_once().await? {
                return Ok(frame);
            }
        }
    }

    /// Opens the stream if it is not open: `Some(Resumed)` when that ends a loss, `Some(Lost)` on
    /// the first failure after events were read, `None` when opened (or after a pause before the
    /// next try).
    async fn open_once(&mut self) -> Result<Option<Frame>> {
        if self.open.is_some() {
            return Ok(None);
        }
        let mut r = self.client.request(reqwest::Method::GET, &self.path).query(&self.query);
        if let Some(id) = &self.last_id {
            r = r.header("Last-Event-ID", id);
        }
        match r.send().await {
            Ok(resp) if resp.status().is_success() => {
                self.open = Some(Box::pin(resp.bytes_stream().eventsource()));
                self.failures = 0;
                Ok(std::mem::take(&mut self.lost).then_some(Frame::Resumed))
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                Err(refusal(status, &body))
            }
            Err(e) => {
                self.failures += 1;
                if self.failures > MAX_RECONNECTS {
                    return Err(self.client.unreachable(e));
                }
                if !self.lost && self.last_id.is_some() {
                    self.lost = true;
                    return Ok(Some(Frame::Lost));
                }
                tokio::time::sleep(RECONNECT_EVERY).await;
                Ok(None)
            }
        }
    }

    /// Opens the stream now (retrying as [`Resuming::next`] does), so that what happens from here
    /// on is delivered.
    async fn connect(&mut self) -> Result<()> {
        while self.open.is_none() {
            self.open_once().await?;
        }
        Ok(())
    }
}

fn decode(path: &str, source: serde_json::Error) -> ClientError {
    ClientError::Decode { path: path.to_owned(), source }
}

/// One change of a job, as [`JobEvents`] yields it.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    /// The SSE event id (resume point): `seq`, or `seq.epoch` once the log's epoch moved on.
    pub event_id: String,
    /// The event's name: `job_state` (the state when the stream started), an event kind
    /// (`job_claimed`, `job_progress`, …), or a terminal one (`job_completed`, `job_failed`,
    /// `job_cancelled`).
    pub kind: String,
    /// The job after the change.
    pub job: JobSummary,
    /// The result or error, on the terminal update.
    pub outcome: Option<Outcome>,
    /// The log's event, except on `job_state`.
    pub event: Option<Event>,
    /// The update as the API sent it.
    pub json: Value,
}

impl JobUpdate {
    /// Whether this is the job's last update.
    pub fn is_terminal(&self) -> bool {
        self.job.status.is_terminal()
    }
}

/// The fields every update of a job stream carries.
#[derive(Deserialize)]
struct JobData {
    job: JobSummary,
    #[serde(default)]
    outcome: Option<Outcome>,
}

/// `GET /api/jobs/{id}/events`: the job's state, then each change, ending after the terminal one
/// (which carries the outcome). Call [`JobEvents::next`] until it yields `None`.
pub struct JobEvents {
    inner: Resuming,
    done: bool,
}

impl JobEvents {
    /// Opens the stream now instead of at the first [`JobEvents::next`].
    pub async fn connect(&mut self) -> Result<()> {
        self.inner.connect().await
    }

    pub(crate) fn new(client: Client, id: JobId) -> Self {
        let path = format!("/api/jobs/{}/events", segment(&id.0));
        Self { inner: Resuming::new(client, path, Vec::new()), done: false }
    }

    /// The next update, `None` after the terminal one. Cancel-safe: it may be raced in a
    /// `select!` and called again.
    pub async fn next(&mut self) -> Result<Option<JobUpdate>> {
        if self.done {
            return Ok(None);
        }
        loop {
            let Frame::Event(ev) = self.inner.next().await? else { continue };
            let json: Value = serde_json::from_str(&ev.data).map_err(|e| decode(&self.inner.path, e))?;
            let data = JobData::deserialize(&json).map_err(|e| decode(&self.inner.path, e))?;
            let event = serde_json::from_value::<Event>(json.clone()).ok();
            self.done = data.job.status.is_terminal();
            return Ok(Some(JobUpdate {
                event_id: ev.id,
                kind: ev.event,
                job: data.job,
                outcome: data.outcome,
                event,
                json,
            }));
        }
    }
}

/// What [`FleetEvents`] yields.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// The next event of the log.
    Event {
        /// The resume point of this event (its SSE id).
        id: String,
        /// The event (boxed: it is the large variant).
        event: Box<Event>,
    },
    /// Events after the resume point are gone from the log (trimmed, or the log went back after a
    /// restore or failover): reload the state (`GET /api/snapshot`) and go on.
    Resync {
        /// The resume point asked for.
        after: u64,
        /// The first event still available.
        first: u64,
    },
    /// The fleet's latest heartbeats (with the `workers` or `connectors` topic, every third of the
    /// API's `--stale-after-s`): heartbeats and unchanged connector reports are not events of the
    /// log, so a view kept up to date by events alone would see live workers go stale.
    WorkersSeen(Box<WorkersSeen>),
    /// The connection was lost; the stream is reconnecting (nothing to do).
    Lost,
    /// Reconnected after a loss; the stream resumes after `after` (the last event yielded).
    Resumed {
        /// The last event id yielded before the loss.
        after: Option<String>,
    },
}

/// A `workers_seen` message: each worker's last heartbeat and the time of each connector report.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkersSeen {
    /// When the API read them (ms since the epoch).
    pub at: i64,
    /// By worker id.
    pub workers: std::collections::BTreeMap<String, WorkerSeen>,
}

/// One worker in [`WorkersSeen`].
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSeen {
    /// Its last heartbeat (ms).
    pub last_seen: i64,
    /// The time of its latest report, by service (ms).
    #[serde(default)]
    pub connectors: std::collections::BTreeMap<String, i64>,
}

/// `GET /api/events`: every event from now on (of the chosen topics), resuming across drops.
pub struct FleetEvents {
    inner: Resuming,
}

#[derive(Deserialize)]
struct ResyncData {
    after: u64,
    first: u64,
}

impl FleetEvents {
    pub(crate) fn new(client: Client, topics: &[&str]) -> Self {
        let query = if topics.is_empty() { Vec::new() } else { vec![("topics", topics.join(","))] };
        Self { inner: Resuming::new(client, "/api/events".into(), query) }
    }

    /// Opens the stream now instead of at the first [`FleetEvents::next`]: the stream starts at
    /// the present, so events from this point on are delivered.
    pub async fn connect(&mut self) -> Result<()> {
        self.inner.connect().await
    }

    /// The next item; the stream ends only with an error (the API gone, or a refusal).
    /// Cancel-safe, like [`JobEvents::next`].
    pub async fn next(&mut self) -> Result<FleetEvent> {
        match self.inner.next().await? {
            Frame::Lost => Ok(FleetEvent::Lost),
            Frame::Resumed => Ok(FleetEvent::Resumed { after: self.inner.last_id.clone() }),
            Frame::Event(ev) if ev.event == "workers_seen" => {
                let seen: WorkersSeen =
                    serde_json::from_str(&ev.data).map_err(|e| decode("/api/events", e))?;
                Ok(FleetEvent::WorkersSeen(Box::new(seen)))
            }
            Frame::Event(ev) if ev.event == "resync" => {
                let r: ResyncData = serde_json::from_str(&ev.data).map_err(|e| decode("/api/events", e))?;
                Ok(FleetEvent::Resync { after: r.after, first: r.first })
            }
            Frame::Event(ev) => {
                let event: Event = serde_json::from_str(&ev.data).map_err(|e| decode("/api/events", e))?;
                Ok(FleetEvent::Event { id: ev.id, event: Box::new(event) })
            }
        }
    }
}
