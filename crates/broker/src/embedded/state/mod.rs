//! The writer thread's state and every operation of the embedded backend, run inside a savepoint
//! of the current group transaction (see the parent module).
//!
//! Claims read an in-memory index kept per worker class ([`fleetq_core::ClassSpec`]): the head of
//! every live partition the class matches, in claim order, so a claim costs O(log partitions)
//! plus one row read, whatever the number of partitions. Each live partition remembers its head
//! and its matching classes; a write that makes a job claimable or takes one moves that
//! partition's entry in its classes' indexes. A partition whose last unfinished job finishes is
//! removed (row, flag, index entries); a class whose last worker leaves is dropped.

mod fleet;
mod queue;
mod reads;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use fleetq_core::job::HISTORY_LEN;
use fleetq_core::{
    Action, AttemptEnd, ClassKey, ClassSpec, ConnectorReport, Event, EventKind, FailureCategory, JobError,
    JobId, JobRecord, JobSpec, JobStatus, JobSummary, MachineEvent, MachineState, OrderKey, Outcome,
    PartitionKey, PartitionSpec, Requirements, Snapshot, WorkerInfo, WorkerRegistration,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    BrokerConfig, BrokerError, CancelOutcome, Clock, FailOutcome, JobFilter, JobPage, Lease, LeaseRef,
    LeaseState, QueueFilter, ReapReport, Result, Submitted, new_job_id, page_limit,
};

const SCHEMA: &str = include_str!("../schema.sql");
const SCHEMA_VERSION: i64 = 1;

// The statements every claim runs. Their plans are pinned by a test: a full scan here makes each
// claim cost O(backlog).

/// The best claimable job of one partition.
const HEAD_SQL: &str = "SELECT order_key, id FROM jobs
     WHERE claimable = 1 AND partition = ?1 ORDER BY order_key LIMIT 1";
/// Whether a partition still has an unfinished job (else it is removed).
const LIVE_SQL: &str = "SELECT 1 FROM jobs INDEXED BY jobs_live
     WHERE finished_at IS NULL AND partition = ?1 LIMIT 1";
/// The best claimable jobs of one workflow (workflow-restricted workers).
const WORKFLOW_SQL: &str = "SELECT order_key, id, partition, avoid_worker, avoid_until FROM jobs
     WHERE claimable = 1 AND workflow_id = ?1 ORDER BY order_key LIMIT 256";
/// A claimable job's place among its service's claimable jobs: an index range count.
const POSITION_SQL: &str = "SELECT COUNT(*) FROM jobs INDEXED BY jobs_queue
     WHERE claimable = 1 AND service = ?1 AND order_key < ?2";
/// Claimable jobs of one service in claim order, after a cursor.
const QUEUE_SERVICE_SQL: &str = "SELECT summary FROM jobs INDEXED BY jobs_queue
     WHERE claimable = 1 AND service = ?1 AND order_key > ?2
       AND (?3 IS NULL OR workflow_id = ?3) AND (?4 IS NULL OR json_extract(summary, '$.customer_id') = ?4)
       AND (?6 IS NULL OR json_extract(summary, '$.owner') = ?6)
     ORDER BY order_key LIMIT ?5";
/// Claimable jobs of one workflow in claim order, after a cursor.
const QUEUE_WORKFLOW_SQL: &str = "SELECT summary FROM jobs INDEXED BY jobs_wf
     WHERE claimable = 1 AND workflow_id = ?3 AND order_key > ?2
       AND (?1 IS NULL OR service = ?1) AND (?4 IS NULL OR json_extract(summary, '$.customer_id') = ?4)
       AND (?6 IS NULL OR json_extract(summary, '$.owner') = ?6)
     ORDER BY order_key LIMIT ?5";
/// Every claimable job in claim order, after a cursor.
const QUEUE_ALL_SQL: &str = "SELECT summary FROM jobs INDEXED BY jobs_order
     WHERE claimable = 1 AND order_key > ?2 AND (?1 IS NULL OR service = ?1) AND (?3 IS NULL OR workflow_id = ?3)
       AND (?4 IS NULL OR json_extract(summary, '$.customer_id') = ?4)
       AND (?6 IS NULL OR json_extract(summary, '$.owner') = ?6)
     ORDER BY order_key LIMIT ?5";
/// Expired leases.
const EXPIRED_SQL: &str = "SELECT id FROM jobs WHERE lease_deadline IS NOT NULL AND lease_deadline <= ?1
     ORDER BY lease_deadline LIMIT ?2";
/// Due delayed retries become claimable. INDEXED BY: without statistics the planner prefers
/// jobs_status and scans every pending job (measured: 370 jobs/s at a 20k backlog).
const PROMOTE_SQL: &str = "UPDATE jobs INDEXED BY jobs_delayed SET claimable = 1, run_at = NULL
     WHERE status = 'pending' AND claimable = 0 AND run_at IS NOT NULL AND run_at <= ?1
     RETURNING partition, order_key, id";

fn corrupt(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Corrupt(e.to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(corrupt)
}

/// A job row as the operations need it.
struct Row {
    summary: JobSummary,
    spec: String,
    order_key: String,
    lease_deadline: Option<i64>,
    progress_evt_at: Option<i64>,
    progress_dirty: bool,
    avoid_worker: Option<String>,
    avoid_until: Option<i64>,
}

/// A claimable job as the indexes hold it: (order key, id), so sets of them sort in claim order.
type Head = (String, String);

/// A live partition: one with an unfinished job.
struct Part {
    spec: PartitionSpec,
    unworkable: bool,
    /// The live classes matching it.
    classes: Vec<ClassKey>,
    /// Its best claimable job.
    head: Option<Head>,
}

/// A live worker class: one with a registered worker.
struct Class {
    spec: ClassSpec,
    workers: usize,
    /// Since when it has no worker ([`fleetq_core::class::CLASS_IDLE_MS`] later it is dropped).
    idle_since: Option<i64>,
    /// The head of every live partition it matches.
    heads: BTreeSet<Head>,
}

/// How a stored row's outcome column changes.
enum OutcomeChange {
    Keep,
    Set(String),
    Clear,
}

pub(super) struct State {
    conn: Connection,
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    /// The live partitions. Mirrors the `partitions` table.
    partitions: HashMap<PartitionKey, Part>,
    /// The live classes, derived from `workers`.
    classes: HashMap<ClassKey, Class>,
    /// Registered workers. Mirrors the `workers` table.
    workers: HashMap<String, WorkerInfo>,
    /// Each registered worker's class.
    worker_class: HashMap<String, ClassKey>,
    /// Services whose queue is paused. Mirrors the `paused_services` table.
    paused: std::collections::BTreeSet<String>,
    /// A savepoint rolled back after touching the caches: reload them before the next operation.
    caches_dirty: bool,
    committed_seq: u64,
    /// A job became claimable in the current group.
    wake: bool,
    /// Cancels requested in the current group: (holding worker, job), signalled after the commit.
    cancels: Vec<(String, JobId)>,
    events_since_trim: usize,
}

impl State {
    pub(super) fn open(path: &Path, config: BrokerConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let conn = Connection::open(path)?;
        // One process owns the store: its in-memory caches (partitions, workers) must be the only
        // writer's. EXCLUSIVE keeps the lock from the first write on; taking it here turns a second
        // opener's later surprise into a clear error now.
        conn.execute_batch(
            "PRAGMA busy_timeout = 200; PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .and_then(|()| conn.execute_batch("BEGIN IMMEDIATE; COMMIT;"))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                BrokerError::StoreInUse(path.display().to_string())
            }
            _ => e.into(),
        })?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(BrokerError::Corrupt(format!(
                "store schema version {version} is newer than this fleetq ({SCHEMA_VERSION})"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        // Partitions without an unfinished job (stores written before partitions were removed).
        conn.execute_batch(
            "DELETE FROM partitions WHERE NOT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_live
               WHERE jobs.finished_at IS NULL AND jobs.partition = partitions.key)",
        )?;
        let mut st = Self {
            conn,
            config,
            clock,
            partitions: HashMap::new(),
            classes: HashMap::new(),
            workers: HashMap::new(),
            worker_class: HashMap::new(),
            paused: std::collections::BTreeSet::new(),
            caches_dirty: true,
            committed_seq: 0,
            wake: false,
            cancels: Vec::new(),
            events_since_trim: 0,
        };
        st.reload_caches()?;
        st.begin()?;
        let orphans = st.requeue_orphans();
        match orphans {
            Ok(_) => st.commit()?,
            Err(_) => st.rollback(),
        }
        if let Ok(n @ 1..) = orphans {
            tracing::info!(jobs = n, "requeued the jobs the store's previous process was running");
        }
        orphans?;
        st.committed_seq = st.max_seq()?;
        Ok(st)
    }

    /// One process owns the store, so at open every lease belongs to a process that is gone (a
    /// crash, a kill -9): its jobs go back to the queue now — the attempt counted, as for any lease
    /// lost — instead of waiting out the lease.
    fn requeue_orphans(&mut self) -> Result<usize> {
        let now = self.now();
        self.conn.execute(
            "UPDATE jobs SET lease_deadline = ?1 WHERE lease_deadline IS NOT NULL AND lease_deadline > ?1",
            [now],
        )?;
        let mut total = 0;
        loop {
            let (requeued, finished) = self.reap_leases(now, 1000)?;
            if requeued + finished == 0 {
                return Ok(total);
            }
            total += requeued + finished;
        }
    }

    /// Rebuilds the in-memory partitions, workers, classes and head indexes from the tables.
    fn reload_caches(&mut self) -> Result<()> {
        let mut partitions = HashMap::new();
        {
            let mut stmt = self.conn.prepare("SELECT key, spec, unworkable FROM partitions")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?)))?;
            for row in rows {
                let (key, spec, unworkable) = row?;
                let part = Part { spec: from_json(&spec)?, unworkable, classes: Vec::new(), head: None };
                partitions.insert(PartitionKey(key), part);
            }
            // SQLite returns the id of the row that holds the MIN.
            let mut stmt = self.conn.prepare(
                "SELECT partition, MIN(order_key), id FROM jobs INDEXED BY jobs_claim
                 WHERE claimable = 1 GROUP BY partition",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))?;
            for row in rows {
                let (key, order, id) = row?;
                if let Some(part) = partitions.get_mut(&PartitionKey(key)) {
                    part.head = Some((order, id));
                }
            }
        }
        self.paused = {
            let mut stmt = self.conn.prepare("SELECT service FROM paused_services")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut workers = HashMap::new();
        {
            let mut stmt = self.conn.prepare("SELECT id, info, last_seen FROM workers")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?)))?;
            for row in rows {
                let (id, info, last_seen) = row?;
                let mut info: WorkerInfo = from_json(&info)?;
                info.last_seen = last_seen;
                workers.insert(id, info);
            }
        }
        self.partitions = partitions;
        self.classes.clear();
        self.worker_class.clear();
        for (id, info) in &workers {
            let spec = ClassSpec::of(&info.registration);
            let key = spec.key();
            Self::join_class(&mut self.classes, &mut self.partitions, key.clone(), spec);
            self.worker_class.insert(id.clone(), key);
        }
        self.workers = workers;
        self.caches_dirty = false;
        Ok(())
    }

    fn max_seq(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    pub(super) fn committed_seq(&self) -> u64 {
        self.committed_seq
    }

    pub(super) fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    pub(super) fn take_cancels(&mut self) -> Vec<(String, JobId)> {
        std::mem::take(&mut self.cancels)
    }

    pub(super) fn begin(&mut self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    pub(super) fn commit(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        self.committed_seq = self.max_seq()?;
        Ok(())
    }

    pub(super) fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        self.wake = false;
        self.cancels.clear();
        self.caches_dirty = true;
        if let Ok(seq) = self.max_seq() {
            self.committed_seq = seq;
        }
    }

    /// Runs one operation under a savepoint: its writes roll back alone when it fails.
    pub(super) fn savepoint<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        if self.caches_dirty {
            self.reload_caches()?;
        }
        self.conn.execute_batch("SAVEPOINT op")?;
        let out = f(self);
        if out.is_ok() {
            self.conn.execute_batch("RELEASE op")?;
        } else {
            self.conn.execute_batch("ROLLBACK TO op; RELEASE op")?;
            self.caches_dirty = true;
        }
        out
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    // ----- events --------------------------------------------------------------------------------

    fn emit(&mut self, kind: EventKind) -> Result<()> {
        let body = to_json(&kind)?;
        self.conn
            .prepare_cached("INSERT INTO events(at, body) VALUES (?1, ?2)")?
            .execute(params![self.now(), body])?;
        self.events_since_trim += 1;
        if self.events_since_trim >= 1024 {
            self.events_since_trim = 0;
            let last = self.conn.last_insert_rowid();
            self.conn
                .execute("DELETE FROM events WHERE seq <= ?1", [last - self.config.max_events as i64])?;
        }
        Ok(())
    }

    // ----- job rows ------------------------------------------------------------------------------

    fn load(&self, id: &JobId) -> Result<Option<Row>> {
        self.conn
            .prepare_cached(
                "SELECT summary, spec, lease_deadline, progress_evt_at, progress_dirty, avoid_worker, avoid_until,
                   order_key
                 FROM jobs WHERE id = ?1",
            )?
            .query_row([&id.0], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(7)?),
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()?
            .map(|((summary, spec, order_key), lease_deadline, progress_evt_at, dirty, avoid_worker, avoid_until)| {
                Ok(Row {
                    summary: self.parse_summary(&summary)?,
                    spec,
                    order_key,
                    lease_deadline,
                    progress_evt_at,
                    progress_dirty: dirty,
                    avoid_worker,
                    avoid_until,
                })
            })
            .transpose()
    }

    fn must_load(&self, id: &JobId) -> Result<Row> {
        self.load(id)?.ok_or_else(|| BrokerError::JobNotFound(id.clone()))
    }

    /// Loads the job only if `lease` holds its current attempt.
    fn held(&self, lease: &LeaseRef) -> Result<Row> {
        let row = self.must_load(&lease.job_id)?;
        let s = &row.summary;
        if !s.status.is_running()
            || s.attempt != lease.attempt
            || s.worker_id.as_deref() != Some(&lease.worker_id)
        {
            return Err(BrokerError::LeaseLost(lease.job_id.clone()));
        }
        Ok(row)
    }

    fn store(&mut self, row: &Row, outcome: OutcomeChange) -> Result<()> {
        let now = self.now();
        let s = &row.summary;
        let pending = s.status == JobStatus::Pending;
        let run_at = s.run_at.filter(|t| pending && *t > now);
        let claimable = pending && run_at.is_none();
        self.wake |= claimable;
        let lease_deadline = if s.status.is_running() { row.lease_deadline } else { None };
        let (set_outcome, outcome_text) = match outcome {
            OutcomeChange::Keep => (false, None),
            OutcomeChange::Set(t) => (true, Some(t)),
            OutcomeChange::Clear => (true, None),
        };
        self.conn
            .prepare_cached(
                "UPDATE jobs SET status = ?1, claimable = ?2, run_at = ?3, lease_deadline = ?4, finished_at = ?5,
                   progress_evt_at = ?6, progress_dirty = ?7, avoid_worker = ?8, avoid_until = ?9, summary = ?10,
                   outcome = CASE WHEN ?11 THEN ?12 ELSE outcome END
                 WHERE id = ?13",
            )?
            .execute(params![
                s.status.as_str(),
                claimable,
                run_at,
                lease_deadline,
                s.finished_at,
                row.progress_evt_at,
                row.progress_dirty,
                row.avoid_worker,
                row.avoid_until,
                to_json(s)?,
                set_outcome,
                outcome_text,
                s.id.0,
            ])?;
        let partition = PartitionKey(s.partition.clone());
        if claimable {
            self.head_added(&partition, (row.order_key.clone(), s.id.0.clone()));
        } else {
            self.head_removed(&partition, &s.id.0)?;
        }
        if s.status.is_terminal() {
            self.release_partition(&partition)?;
        }
        Ok(())
    }

    /// Emits the progress that coalescing held back, so it precedes the terminal event.
    fn flush_progress(&mut self, row: &mut Row) -> Result<()> {
        if row.progress_dirty {
            row.progress_dirty = false;
            self.emit(EventKind::JobProgress { job: row.summary.clone() })?;
        }
        Ok(())
    }

    fn transition(row: &mut Row, action: Action, now: i64) -> Result<()> {
        row.summary.status = row.summary.status.apply(action)?;
        row.summary.updated_at = now;
        Ok(())
    }

    // ----- partitions, classes and head indexes -------------------------------------------------

    /// Moves partition `key`'s entry in its classes' indexes to `head`.
    fn set_head(&mut self, key: &PartitionKey, head: Option<Head>) {
        let Some(part) = self.partitions.get_mut(key) else { return };
        if part.head == head {
            return;
        }
        for c in &part.classes {
            if let Some(class) = self.classes.get_mut(c) {
                if let Some(old) = &part.head {
                    class.heads.remove(old);
                }
                if let Some(new) = &head {
                    class.heads.insert(new.clone());
                }
            }
        }
        part.head = head;
    }

    /// A job of the partition became claimable: it is the head if it orders first.
    fn head_added(&mut self, key: &PartitionKey, job: Head) {
        let better = self.partitions.get(key).is_some_and(|p| p.head.as_ref().is_none_or(|h| job < *h));
        if better {
            self.set_head(key, Some(job));
        }
    }

    /// A job of the partition stopped being claimable: when it was the head, the next one is.
    fn head_removed(&mut self, key: &PartitionKey, id: &str) -> Result<()> {
        let was_head = self.partitions.get(key).and_then(|p| p.head.as_ref()).is_some_and(|h| h.1 == id);
        if was_head {
            let next = self
                .conn
                .prepare_cached(HEAD_SQL)?
                .query_row([&key.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            self.set_head(key, next);
        }
        Ok(())
    }

    /// Makes the partition live (its spec recorded, its classes matched) unless it is. Returns
    /// true when it is new and no worker can serve it.
    fn ensure_partition(&mut self, key: &PartitionKey, spec: PartitionSpec) -> Result<bool> {
        if self.partitions.contains_key(key) {
            return Ok(false);
        }
        let classes: Vec<ClassKey> =
            self.classes.iter().filter(|(_, c)| c.spec.matches(&spec)).map(|(k, _)| k.clone()).collect();
        let unworkable = !classes.iter().any(|c| self.classes.get(c).is_some_and(|c| c.workers > 0));
        self.conn.execute(
            "INSERT OR REPLACE INTO partitions(key, spec, unworkable) VALUES (?1, ?2, ?3)",
            params![key.0, to_json(&spec)?, unworkable],
        )?;
        self.partitions.insert(key.clone(), Part { spec, unworkable, classes, head: None });
        Ok(unworkable)
    }

    /// Removes the partition when none of its jobs is unfinished.
    fn release_partition(&mut self, key: &PartitionKey) -> Result<()> {
        if !self.partitions.contains_key(key) {
            return Ok(());
        }
        let live = self.conn.prepare_cached(LIVE_SQL)?.query_row([&key.0], |_| Ok(())).optional()?;
        if live.is_none() {
            self.set_head(key, None);
            self.partitions.remove(key);
            self.conn.prepare_cached("DELETE FROM partitions WHERE key = ?1")?.execute([&key.0])?;
        }
        Ok(())
    }

    /// Adds a worker to class `key`; a new class is matched against every live partition and
    /// takes their heads into its index. Returns the partitions that became workable.
    fn join_class(
        classes: &mut HashMap<ClassKey, Class>,
        partitions: &mut HashMap<PartitionKey, Part>,
        key: ClassKey,
        spec: ClassSpec,
    ) -> Vec<PartitionKey> {
        let mut workable = Vec::new();
        if let Some(class) = classes.get_mut(&key) {
            class.workers += 1;
            if class.idle_since.take().is_some() {
                // Revived: its partitions may be served again (the caller unflags the flagged).
                workable.extend(
                    partitions.iter().filter(|(_, p)| p.classes.contains(&key)).map(|(k, _)| k.clone()),
                );
            }
            return workable;
        }
        let mut heads = BTreeSet::new();
        for (pkey, part) in partitions.iter_mut() {
            if spec.matches(&part.spec) {
                part.classes.push(key.clone());
                heads.extend(part.head.clone());
                workable.push(pkey.clone());
            }
        }
        classes.insert(key, Class { spec, workers: 1, idle_since: None, heads });
        workable
    }

    /// A worker left class `key`; the last one leaves it idle, kept for the reaper, and the
    /// partitions no worker serves any more are flagged.
    fn leave_class(&mut self, key: &ClassKey) -> Result<()> {
        let now = self.now();
        let Some(class) = self.classes.get_mut(key) else { return Ok(()) };
        class.workers = class.workers.saturating_sub(1);
        if class.workers > 0 {
            return Ok(());
        }
        class.idle_since = Some(now);
        let matched: Vec<PartitionKey> =
            self.partitions.iter().filter(|(_, p)| p.classes.contains(key)).map(|(k, _)| k.clone()).collect();
        for p in matched {
            if !self.served(&p) {
                self.set_flag(&p, true)?;
            }
        }
        Ok(())
    }

    /// Drops the classes idle for [`fleetq_core::class::CLASS_IDLE_MS`] and flags the partitions
    /// no class matches any more. Returns how many classes went.
    fn drop_idle_classes(&mut self, now: i64) -> Result<usize> {
        let idle: Vec<ClassKey> = self
            .classes
            .iter()
            .filter(|(_, c)| {
                c.idle_since.is_some_and(|t| now.saturating_sub(t) >= fleetq_core::class::CLASS_IDLE_MS)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &idle {
            for p in self.drop_class(key) {
                self.set_flag(&p, true)?;
            }
        }
        Ok(idle.len())
    }

    /// Removes class `key`. Returns the partitions no class matches any more.
    fn drop_class(&mut self, key: &ClassKey) -> Vec<PartitionKey> {
        self.classes.remove(key);
        let mut orphaned = Vec::new();
        for (pkey, part) in &mut self.partitions {
            if let Some(i) = part.classes.iter().position(|c| c == key) {
                part.classes.swap_remove(i);
                if part.classes.is_empty() {
                    orphaned.push(pkey.clone());
                }
            }
        }
        orphaned
    }

    /// Stores and events a partition's flag when it changed.
    fn set_flag(&mut self, key: &PartitionKey, unworkable: bool) -> Result<bool> {
        let Some(part) = self.partitions.get_mut(key) else { return Ok(false) };
        if part.unworkable == unworkable {
            return Ok(false);
        }
        part.unworkable = unworkable;
        self.conn
            .execute("UPDATE partitions SET unworkable = ?1 WHERE key = ?2", params![unworkable, key.0])?;
        self.emit(EventKind::PartitionWorkability { partition: key.0.clone(), unworkable })?;
        Ok(true)
    }

    /// Whether a registered worker may serve the partition's jobs (a class kept idle does not).
    fn served(&self, partition: &PartitionKey) -> bool {
        self.partitions
            .get(partition)
            .is_some_and(|p| p.classes.iter().any(|c| self.classes.get(c).is_some_and(|c| c.workers > 0)))
    }

    /// Whether a registered worker other than `worker_id` may serve the partition's jobs.
    fn others_match(&self, partition: &PartitionKey) -> bool {
        let Some(part) = self.partitions.get(partition) else { return false };
        let workers: usize = part.classes.iter().filter_map(|c| self.classes.get(c)).map(|c| c.workers).sum();
        workers > 1
    }

    /// Re-derives every live partition's flag from the classes (they are kept up to date as
    /// partitions and classes come and go: this repairs, and returns what it changed).
    pub(super) fn evaluate_workability(&mut self) -> Result<usize> {
        let flags: Vec<(PartitionKey, bool)> =
            self.partitions.keys().map(|k| (k.clone(), !self.served(k))).collect();
        let mut changed = 0;
        for (key, unworkable) in flags {
            changed += usize::from(self.set_flag(&key, unworkable)?);
        }
        Ok(changed)
    }

    /// Decodes a stored summary and fills its derived fields.
    /// The summaries of a listing's rows, passing over (counted, logged) any that do not decode:
    /// one bad row never hides the others. An error of the store itself is still an error.
    fn listed(&self, rows: impl Iterator<Item = rusqlite::Result<String>>) -> Result<Vec<JobSummary>> {
        let mut out = Vec::new();
        for row in rows {
            out.extend(self.listed_one(&row?));
        }
        Ok(out)
    }

    fn listed_one(&self, text: &str) -> Option<JobSummary> {
        self.parse_summary(text)
            .map_err(|e| crate::note_undecodable("a job in a listing", &e.to_string()))
            .ok()
    }

    fn parse_summary(&self, text: &str) -> Result<JobSummary> {
        let mut s: JobSummary = from_json(text)?;
        self.derive(&mut s);
        Ok(s)
    }

    /// Fills the fields derived at read time (`unworkable`, from the job's partition).
    fn derive(&self, s: &mut JobSummary) {
        s.unworkable = s.status == JobStatus::Pending
            && self.partitions.get(&PartitionKey(s.partition.clone())).is_some_and(|p| p.unworkable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("explain");
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).expect("plan rows");
        rows.map(|r| r.expect("row")).collect::<Vec<_>>().join(" | ")
    }

    /// The claim path's statements use their indexes and never sort: each claim costs
    /// O(log backlog), not O(backlog).
    #[test]
    fn hot_statements_use_their_indexes() {
        let conn = Connection::open_in_memory().expect("sqlite");
        conn.execute_batch(SCHEMA).expect("schema");
        for (sql, index) in [
            (HEAD_SQL, "jobs_claim"),
            (LIVE_SQL, "jobs_live"),
            (WORKFLOW_SQL, "jobs_wf"),
            (EXPIRED_SQL, "jobs_lease"),
            (PROMOTE_SQL, "jobs_delayed"),
            (POSITION_SQL, "jobs_queue"),
            (QUEUE_SERVICE_SQL, "jobs_queue"),
            (QUEUE_WORKFLOW_SQL, "jobs_wf"),
            (QUEUE_ALL_SQL, "jobs_order"),
        ] {
            let p = plan(
                &conn,
                &sql.replace("?1", "'s'")
                    .replace("?2", "''")
                    .replace("?3", "'w'")
                    .replace("?4", "NULL")
                    .replace("?5", "10")
                    .replace("?6", "NULL"),
            );
            assert!(p.contains(&format!("INDEX {index}")), "{index}: {p}");
            assert!(!p.contains("TEMP B-TREE"), "{index} sorts: {p}");
            assert!(!p.starts_with("SCAN"), "{index} scans: {p}");
        }
    }
}
