//! The embedded backend: SQLite in WAL mode, for one box (and the tests).
//!
//! One writer thread owns the connection. Operations are closures sent to it; it runs every
//! operation waiting in its channel inside *one* `BEGIN IMMEDIATE` transaction (group commit), each
//! under its own savepoint so a failing operation rolls back alone, and answers the callers only
//! after `COMMIT` succeeded — a reply means the change is durable. Events are rows of the `events`
//! table inserted by the same savepoint as the change. Claim wake-ups and event subscriptions are
//! in-process (`Notify`, `watch`).

mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use fleetq_core::{
    ConnectorReport, Event, JobError, JobId, JobRecord, JobSpec, MachineEvent, MachineState, Requirements,
    Snapshot, WorkerInfo, WorkerRegistration,
};
use serde_json::Value;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use self::state::State;
use crate::{
    Backend, BrokerConfig, BrokerError, CancelOutcome, Clock, FailOutcome, Fleet, JobFilter, JobPage, Lease,
    LeaseRef, LeaseState, Log, Queue, QueueFilter, Read, ReapReport, Result, Submitted, SystemClock,
};

type Reply = Box<dyn FnOnce(bool) + Send>;
type Cmd = Box<dyn FnOnce(&mut State) -> Reply + Send>;

/// Most operations folded into one transaction.
const MAX_GROUP: usize = 256;

/// SQLite-backed [`Broker`](crate::Broker). Cheap to share behind an `Arc`; dropping the last handle stops the
/// writer thread after it finished the queued operations.
#[derive(Debug)]
pub struct EmbeddedBroker {
    tx: mpsc::Sender<Cmd>,
    config: BrokerConfig,
    /// Signalled after a commit that made a job claimable.
    job_wake: Arc<Notify>,
    /// The last committed event sequence.
    seq_rx: watch::Receiver<u64>,
    clock: Arc<dyn Clock>,
    /// Committed cancel signals per holding worker, and their wake-up.
    signals: Arc<Signals>,
}

/// Cancel signals handed from the writer thread (after the commit that requested the cancel) to
/// the workers waiting in [`Log::cancel_signals`].
#[derive(Debug, Default)]
struct Signals {
    by_worker: std::sync::Mutex<HashMap<String, Vec<JobId>>>,
    wake: Notify,
}

impl Signals {
    fn take(&self, worker_id: &str) -> Vec<JobId> {
        self.by_worker.lock().map(|mut m| m.remove(worker_id).unwrap_or_default()).unwrap_or_default()
    }
}

impl EmbeddedBroker {
    /// Opens (creating if needed) the store at `path` with the system clock.
    pub fn open(path: impl AsRef<Path>, config: BrokerConfig) -> Result<Self> {
        Self::open_with_clock(path, config, Arc::new(SystemClock))
    }

    /// Opens the store with a given clock (tests use [`crate::ManualClock`]).
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let job_wake = Arc::new(Notify::new());
        let state = State::open(path.as_ref(), config.clone(), clock.clone())?;
        let (seq_tx, seq_rx) = watch::channel(state.committed_seq());
        let (tx, rx) = mpsc::channel::<Cmd>();
        let wake = job_wake.clone();
        let signals = Arc::new(Signals::default());
        let sent = signals.clone();
        std::thread::Builder::new()
            .name("fleetq-sqlite".into())
            .spawn(move || writer_loop(state, rx, wake, seq_tx, sent))
            .map_err(|e| BrokerError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(Self { tx, config, job_wake, seq_rx, clock, signals })
    }

    /// Runs `f` on the writer thread inside a savepoint; resolves after the commit.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<R>>();
        let cmd: Cmd = Box::new(move |st: &mut State| {
            let out = st.savepoint(f);
            Box::new(move |committed: bool| {
                let out = if committed { out } else { out.and(Err(BrokerError::CommitFailed)) };
                let _ = reply_tx.send(out);
            })
        });
        self.tx.send(cmd).map_err(|_| BrokerError::Closed)?;
        reply_rx.await.map_err(|_| BrokerError::Closed)?
    }

    /// One claim attempt, no waiting.
    async fn try_claim(&self, worker_id: &str) -> Result<Option<Lease>> {
        let worker_id = worker_id.to_owned();
        self.call(move |st| st.claim(&worker_id)).await
    }
}

fn writer_loop(
    mut st: State,
    rx: mpsc::Receiver<Cmd>,
    job_wake: Arc<Notify>,
    seq_tx: watch::Sender<u64>,
    signals: Arc<Signals>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let began = st.begin();
        let mut replies = Vec::with_capacity(batch.len());
        for cmd in batch {
            replies.push(cmd(&mut st));
        }
        let committed = began.is_ok() && st.commit().is_ok();
        if !committed {
            tracing::error!("sqlite commit failed; the group's operations were rolled back");
            st.rollback();
        }
        for reply in replies {
            reply(committed);
        }
        let woke = st.take_wake();
        let cancels = st.take_cancels();
        seq_tx.send_replace(st.committed_seq());
        if committed && woke {
            job_wake.notify_waiters();
        }
        if committed && !cancels.is_empty() {
            if let Ok(mut m) = signals.by_worker.lock() {
                for (worker, id) in cancels {
                    let queued = m.entry(worker).or_default();
                    if queued.len() < 256 {
                        queued.push(id);
                    }
                }
            }
            signals.wake.notify_waiters();
        }
    }
}

impl Backend for EmbeddedBroker {
    fn config(&self) -> &BrokerConfig {
        &self.config
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

impl Queue for EmbeddedBroker {
    async fn submit(&self, mut spec: JobSpec) -> Result<Submitted> {
        spec.admit(&self.config.limits)?;
        self.call(move |st| st.submit(spec)).await
    }

    async fn submit_batch(&self, mut specs: Vec<JobSpec>) -> Result<Vec<Submitted>> {
        fleetq_core::admit_batch(&mut specs, &self.config.limits)?;
        self.call(move |st| specs.into_iter().map(|s| st.submit(s)).collect()).await
    }

    async fn claim(&self, worker_id: &str, wait: Duration) -> Result<Option<Lease>> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a wake-up between the look and the wait is kept.
            let notified = self.job_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_claim(worker_id).await? {
                return Ok(Some(lease));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let recheck = now + Duration::from_millis(self.config.claim_recheck_ms);
            let _ = tokio::time::timeout_at(deadline.min(recheck), notified).await;
        }
    }

    async fn renew(&self, lease: &LeaseRef) -> Result<LeaseState> {
        let lease = lease.clone();
        self.call(move |st| st.renew(&lease, None)).await
    }

    async fn progress(&self, lease: &LeaseRef, progress: f64, message: Option<String>) -> Result<LeaseState> {
        let progress = crate::check_progress(progress)?;
        let lease = lease.clone();
        self.call(move |st| st.renew(&lease, Some((progress, message)))).await
    }

    async fn complete(&self, lease: &LeaseRef, result: Value) -> Result<()> {
        let text = crate::encode_result(&self.config, &result)?;
        let lease = lease.clone();
        self.call(move |st| st.complete(&lease, text)).await
    }

    async fn complete_and_claim(&self, lease: &LeaseRef, result: Value) -> Result<Option<Lease>> {
        let text = crate::encode_result(&self.config, &result)?;
        let lease = lease.clone();
        self.call(move |st| {
            st.complete(&lease, text)?;
            st.claim(&lease.worker_id)
        })
        .await
    }

    async fn fail(&self, lease: &LeaseRef, error: JobError) -> Result<FailOutcome> {
        let lease = lease.clone();
        self.call(move |st| st.fail(&lease, error, None)).await
    }

    async fn fail_requiring(
        &self,
        lease: &LeaseRef,
        error: JobError,
        requirements: Requirements,
    ) -> Result<FailOutcome> {
        let lease = lease.clone();
        self.call(move |st| st.fail_requiring(&lease, error, requirements)).await
    }

    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<FailOutcome> {
        let lease = lease.clone();
        let reason = reason.to_owned();
        self.call(move |st| st.release(&lease, &reason)).await
    }

    async fn cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let id = id.clone();
        self.call(move |st| st.cancel(&id)).await
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let id = id.clone();
        self.call(move |st| st.retry(&id)).await
    }

    async fn reap(&self) -> Result<ReapReport> {
        self.call(|st| st.reap()).await
    }

    async fn evaluate_workability(&self) -> Result<usize> {
        self.call(|st| st.evaluate_workability()).await
    }

    async fn pause_service(&self, service: &str, paused: bool) -> Result<bool> {
        let service = service.to_owned();
        self.call(move |st| st.pause_service(&service, paused)).await
    }

    async fn paused_services(&self) -> Result<std::collections::BTreeSet<String>> {
        self.call(|st| Ok(st.paused_services())).await
    }
}

impl Fleet for EmbeddedBroker {
    async fn register_worker(&self, registration: WorkerRegistration) -> Result<()> {
        registration.validate()?;
        self.call(move |st| st.register_worker(registration)).await
    }

    async fn heartbeat(&self, worker_id: &str) -> Result<()> {
        let id = worker_id.to_owned();
        self.call(move |st| st.heartbeat(&id)).await
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<()> {
        let id = worker_id.to_owned();
        self.call(move |st| st.remove_worker(&id, "deregistered")).await
    }

    async fn report_connector(&self, worker_id: &str, report: ConnectorReport) -> Result<()> {
        let id = worker_id.to_owned();
        self.call(move |st| st.report_connector(&id, report)).await
    }

    async fn machine_event(&self, event: MachineEvent) -> Result<()> {
        event.validate()?;
        self.call(move |st| st.machine_event(event)).await
    }
}

impl Read for EmbeddedBroker {
    async fn job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let id = id.clone();
        self.call(move |st| st.job(&id)).await
    }

    async fn jobs(&self, filter: &JobFilter) -> Result<JobPage> {
        let filter = filter.clone();
        self.call(move |st| st.jobs(&filter)).await
    }

    async fn finished(&self, filter: &JobFilter) -> Result<JobPage> {
        let filter = filter.clone();
        self.call(move |st| st.finished(&filter)).await
    }

    async fn queue_position(&self, id: &JobId) -> Result<Option<u64>> {
        let id = id.clone();
        self.call(move |st| st.queue_position(&id)).await
    }

    async fn queue(&self, filter: &QueueFilter) -> Result<JobPage> {
        let filter = filter.clone();
        self.call(move |st| st.queue(&filter)).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.call(|st| st.workers()).await
    }

    async fn queue_depths(&self) -> Result<std::collections::BTreeMap<String, crate::ServiceDepth>> {
        self.call(|st| st.queue_depths()).await
    }

    async fn machines(&self) -> Result<Vec<MachineState>> {
        self.call(|st| st.machines()).await
    }
}

impl Log for EmbeddedBroker {
    async fn log_epoch(&self) -> Result<u64> {
        self.call(|st| st.log_epoch()).await
    }

    async fn advance_log_epoch(&self, seen: u64) -> Result<u64> {
        self.call(move |st| st.advance_log_epoch(seen)).await
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        self.call(|st| st.snapshot()).await
    }

    async fn cancel_signals(&self, worker_id: &str, wait: Duration) -> Result<Vec<JobId>> {
        let deadline = Instant::now() + wait;
        loop {
            // Registered before looking, so a signal published in between still wakes this.
            let woken = self.signals.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let got = self.signals.take(worker_id);
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(self.signals.take(worker_id));
            }
        }
    }

    async fn events_after(&self, after: u64, limit: usize, wait: Duration) -> Result<Vec<Event>> {
        let mut seq_rx = self.seq_rx.clone();
        let deadline = Instant::now() + wait;
        loop {
            seq_rx.borrow_and_update();
            let events = self.call(move |st| st.events_after(after, limit)).await?;
            if !events.is_empty() || Instant::now() >= deadline {
                return Ok(events);
            }
            match tokio::time::timeout_at(deadline, seq_rx.wait_for(|seq| *seq > after)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(BrokerError::Closed),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }
}
