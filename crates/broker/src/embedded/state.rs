//! The writer thread's state and every operation of the embedded backend, run inside a savepoint
//! of the current group transaction (see the parent module).
//!
//! Claims read an in-memory index kept per worker class ([`fleetq_core::ClassSpec`]): the head of
//! every live partition the class matches, in claim order, so a claim costs O(log partitions)
//! plus one row read, whatever the number of partitions. Each live partition remembers its head
//! and its matching classes; a write that makes a job claimable or takes one moves that
//! partition's entry in its classes' indexes. A partition whose last unfinished job finishes is
//! removed (row, flag, index entries); a class whose last worker leaves is dropped.

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

const SCHEMA: &str = include_str!("schema.sql");
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
     ORDER BY order_key LIMIT ?5";
/// Claimable jobs of one workflow in claim order, after a cursor.
const QUEUE_WORKFLOW_SQL: &str = "SELECT summary FROM jobs INDEXED BY jobs_wf
     WHERE claimable = 1 AND workflow_id = ?3 AND order_key > ?2
       AND (?1 IS NULL OR service = ?1) AND (?4 IS NULL OR json_extract(summary, '$.customer_id') = ?4)
     ORDER BY order_key LIMIT ?5";
/// Every claimable job in claim order, after a cursor.
const QUEUE_ALL_SQL: &str = "SELECT summary FROM jobs INDEXED BY jobs_order
     WHERE claimable = 1 AND order_key > ?2 AND (?1 IS NULL OR service = ?1) AND (?3 IS NULL OR workflow_id = ?3)
       AND (?4 IS NULL OR json_extract(summary, '$.customer_id') = ?4)
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

    pub(super) fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, at, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = stmt.query_map(
            params![i64::try_from(after).unwrap_or(i64::MAX), limit.clamp(1, 10_000) as i64],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)),
        )?;
        rows.map(|row| {
            let (seq, at, body) = row?;
            Ok(Event { seq: seq as u64, at, kind: from_json(&body)? })
        })
        .collect()
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

    // ----- submission and claiming ---------------------------------------------------------------

    pub(super) fn submit(&mut self, spec: JobSpec) -> Result<Submitted> {
        let idempotency = spec.idempotency_scope();
        if let Some(key) = &idempotency {
            let existing: Option<String> = self
                .conn
                .prepare_cached("SELECT id FROM jobs WHERE idempotency_key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?;
            if let Some(id) = existing {
                return Ok(Submitted { id: JobId(id), created: false });
            }
        }
        let now = self.now();
        let id = new_job_id();
        let pspec = PartitionSpec::of(&spec);
        let pkey = pspec.key();
        let unworkable = self.ensure_partition(&pkey, pspec)?;
        let seq: i64 = self
            .conn
            .prepare_cached("UPDATE meta SET v = v + 1 WHERE k = 'job_seq' RETURNING v")?
            .query_row([], |r| r.get(0))?;
        let time = match self.config.fair() {
            Some(_) => self.fair_time(&spec, now)?,
            None => spec.effective_time(now),
        };
        let order = OrderKey::new(spec.effective_priority(), time, seq as u64).encode();
        let mut summary = JobSummary::new_pending(id.clone(), &spec, now);
        self.derive(&mut summary);
        self.conn
            .prepare_cached(
                "INSERT INTO jobs(id, service, status, partition, order_key, claimable, workflow_id,
                   idempotency_key, created_at, summary, spec)
                 VALUES (?1, ?2, 'pending', ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                id.0,
                spec.service,
                pkey.0,
                order,
                spec.workflow_id,
                idempotency,
                now,
                to_json(&summary)?,
                to_json(&spec)?,
            ])?;
        self.wake = true;
        self.head_added(&pkey, (order, id.0.clone()));
        self.emit(EventKind::JobSubmitted { job: summary })?;
        if unworkable {
            self.emit(EventKind::PartitionWorkability { partition: pkey.0, unworkable })?;
        }
        Ok(Submitted { id, created: true })
    }

    /// The job `worker_id` should take: the first head of its class's index it may take (a job it
    /// gave back avoids it for a while when another worker can serve it), or for a
    /// workflow-restricted worker the first such job of that workflow in a partition it matches.
    fn choose(&self, worker_id: &str, now: i64) -> Result<Option<Row>> {
        let Some(key) = self.worker_class.get(worker_id) else { return Ok(None) };
        let Some(class) = self.classes.get(key) else { return Ok(None) };
        let usable = |row: &Row| {
            let avoided =
                row.avoid_worker.as_deref() == Some(worker_id) && row.avoid_until.is_some_and(|t| now < t);
            !avoided || !self.others_match(&PartitionKey(row.summary.partition.clone()))
        };
        if let Some(wf) = class.spec.workflow_restriction() {
            let ids: Vec<(String, String)> = {
                let mut stmt = self.conn.prepare_cached(WORKFLOW_SQL)?;
                let rows = stmt.query_map([wf], |r| Ok((r.get(1)?, r.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (id, part) in ids {
                let matched =
                    self.partitions.get(&PartitionKey(part)).is_some_and(|p| p.classes.contains(key));
                if matched
                    && let Some(row) = self.load(&JobId(id))?
                    && usable(&row)
                {
                    return Ok(Some(row));
                }
            }
            return Ok(None);
        }
        // Only a head this worker must avoid sends the walk further.
        for (_, id) in class.heads.iter().take(256) {
            if let Some(row) = self.load(&JobId(id.clone()))?
                && usable(&row)
            {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// The order key's time component of a job under fair share ([`fleetq_core::fair`]).
    fn fair_time(&mut self, spec: &JobSpec, now: i64) -> Result<i64> {
        use fleetq_core::fair;
        if let Some(wf) = &spec.workflow_id {
            let kept: Option<i64> = self
                .conn
                .prepare_cached("SELECT t FROM fair_workflows WHERE workflow_id = ?1 AND expires_at >= ?2")?
                .query_row(params![wf, now], |r| r.get(0))
                .optional()?;
            if let Some(t) = kept {
                return Ok(t);
            }
        }
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT v FROM fair_clock WHERE service = ?1")?
            .query_row([&spec.service], |r| r.get(0))
            .optional()?;
        let v = match v {
            Some(v) => u64::try_from(v).unwrap_or(0),
            None => {
                let head: Option<String> = self
                    .conn
                    .prepare_cached(
                        "SELECT order_key FROM jobs INDEXED BY jobs_queue WHERE claimable = 1 AND service = ?1
                         ORDER BY order_key LIMIT 1",
                    )?
                    .query_row([&spec.service], |r| r.get(0))
                    .optional()?;
                let v = fair::initial_virtual_time(
                    head.and_then(|h| OrderKey::decode(&h)).map(|k| k.time_ms),
                    now,
                );
                self.conn
                    .prepare_cached("INSERT INTO fair_clock(service, v) VALUES (?1, ?2)")?
                    .execute(params![spec.service, i64::try_from(v).unwrap_or(i64::MAX)])?;
                v
            }
        };
        let customer = spec.customer_id.as_deref().unwrap_or("");
        let finish: Option<i64> = self
            .conn
            .prepare_cached("SELECT finish FROM fair_finish WHERE service = ?1 AND customer = ?2")?
            .query_row([&spec.service, customer], |r| r.get(0))
            .optional()?;
        let start = fair::start_tag(finish.and_then(|f| u64::try_from(f).ok()).unwrap_or(0), v);
        let weight = self.config.fair().and_then(|f| f.weights.get(customer)).copied().unwrap_or(1);
        self.conn
            .prepare_cached(
                "INSERT INTO fair_finish(service, customer, finish) VALUES (?1, ?2, ?3)
                 ON CONFLICT(service, customer) DO UPDATE SET finish = excluded.finish",
            )?
            .execute(params![
                spec.service,
                customer,
                i64::try_from(fair::finish_tag(start, weight)).unwrap_or(i64::MAX)
            ])?;
        let t = fair::key_time(start);
        if let Some(wf) = &spec.workflow_id {
            self.conn
                .prepare_cached(
                    "INSERT INTO fair_workflows(workflow_id, t, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(workflow_id) DO UPDATE SET t = excluded.t, expires_at = excluded.expires_at",
                )?
                .execute(params![wf, t, now.saturating_add(self.config.retention_ms)])?;
        }
        Ok(t)
    }

    /// A claimed job moves its service's virtual time to its start tag.
    fn fair_claimed(&mut self, row: &Row) -> Result<()> {
        let Some(key) = OrderKey::decode(&row.order_key) else { return Ok(()) };
        let tag = i64::try_from(fleetq_core::fair::tag_of_key_time(key.time_ms)).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached("UPDATE fair_clock SET v = MAX(v, ?2) WHERE service = ?1")?
            .execute(params![row.summary.service, tag])?;
        Ok(())
    }

    pub(super) fn claim(&mut self, worker_id: &str) -> Result<Option<Lease>> {
        if !self.workers.contains_key(worker_id) {
            return Err(BrokerError::UnknownWorker(worker_id.to_owned()));
        }
        let now = self.now();
        self.reap_leases(now, 64)?;
        self.promote(now)?;
        let Some(mut row) = self.choose(worker_id, now)? else { return Ok(None) };
        if self.config.fair().is_some() {
            self.fair_claimed(&row)?;
        }
        Self::transition(&mut row, Action::Claim, now)?;
        let s = &mut row.summary;
        s.attempt += 1;
        s.worker_id = Some(worker_id.to_owned());
        s.started_at = Some(now);
        s.progress = 0.0;
        s.message = None;
        s.cancel_requested = false;
        s.unworkable = false;
        s.run_at = None;
        let deadline = now.saturating_add(self.config.lease_ms);
        row.lease_deadline = Some(deadline);
        row.progress_evt_at = None;
        row.progress_dirty = false;
        row.avoid_worker = None;
        row.avoid_until = None;
        self.store(&row, OutcomeChange::Keep)?;
        self.emit(EventKind::JobClaimed { job: row.summary.clone() })?;
        let spec: JobSpec = from_json(&row.spec)?;
        Ok(Some(Lease {
            attempt: row.summary.attempt,
            worker_id: worker_id.to_owned(),
            deadline_ms: deadline,
            job: JobRecord { summary: row.summary, spec, outcome: None, history: Vec::new() },
        }))
    }

    // ----- the holder's operations ---------------------------------------------------------------

    pub(super) fn renew(
        &mut self,
        lease: &LeaseRef,
        progress: Option<(f64, Option<String>)>,
    ) -> Result<LeaseState> {
        let now = self.now();
        let mut row = self.held(lease)?;
        let deadline = now.saturating_add(self.config.lease_ms);
        row.lease_deadline = Some(deadline);
        if let Some((p, message)) = progress {
            let was = row.summary.status;
            Self::transition(&mut row, Action::Progress, now)?;
            row.summary.progress = p;
            row.summary.message = message;
            let due = was != row.summary.status
                || row.progress_evt_at.is_none_or(|t| now - t >= self.config.progress_coalesce_ms);
            if due {
                row.progress_evt_at = Some(now);
                row.progress_dirty = false;
                self.emit(EventKind::JobProgress { job: row.summary.clone() })?;
            } else {
                row.progress_dirty = true;
            }
        }
        self.store(&row, OutcomeChange::Keep)?;
        Ok(LeaseState { deadline_ms: deadline, cancel_requested: row.summary.cancel_requested })
    }

    pub(super) fn complete(&mut self, lease: &LeaseRef, result: String) -> Result<()> {
        let now = self.now();
        let mut row = self.held(lease)?;
        self.flush_progress(&mut row)?;
        Self::transition(&mut row, Action::Complete, now)?;
        self.note_attempt(&row, row.summary.attempt, JobStatus::Completed, None, None, now)?;
        row.summary.progress = 100.0;
        row.summary.finished_at = Some(now);
        // The attempt's last message ("queued in ComfyUI", "node 4") is not the job's state now.
        row.summary.message = None;
        self.store(&row, OutcomeChange::Set(crate::result_outcome(&result)))?;
        self.emit(EventKind::JobCompleted { job: row.summary })
    }

    pub(super) fn fail(
        &mut self,
        lease: &LeaseRef,
        error: JobError,
        reason: Option<&str>,
    ) -> Result<FailOutcome> {
        let now = self.now();
        let mut row = self.held(lease)?;
        self.flush_progress(&mut row)?;
        self.give_back(&mut row, error, now, reason.unwrap_or("retry"), true, false)
    }

    pub(super) fn fail_requiring(
        &mut self,
        lease: &LeaseRef,
        error: JobError,
        requirements: Requirements,
    ) -> Result<FailOutcome> {
        let now = self.now();
        let mut row = self.held(lease)?;
        self.flush_progress(&mut row)?;
        let s = &row.summary;
        if !s.cancel_requested && error.retryable && s.attempt < s.max_attempts {
            self.move_partition(&mut row, requirements)?;
        }
        self.give_back(&mut row, error, now, "retry", true, false)
    }

    /// Gives a running job new requirements: its spec changes and it moves to their partition
    /// (created if need be); the one it leaves is removed if that was its last unfinished job.
    fn move_partition(&mut self, row: &mut Row, requirements: Requirements) -> Result<()> {
        let mut spec: JobSpec = from_json(&row.spec)?;
        spec.requirements = requirements;
        let pspec = PartitionSpec::of(&spec);
        let key = pspec.key();
        let old = PartitionKey(row.summary.partition.clone());
        if key == old {
            return Ok(());
        }
        let unworkable = self.ensure_partition(&key, pspec)?;
        row.spec = to_json(&spec)?;
        row.summary.partition = key.0.clone();
        self.conn
            .prepare_cached("UPDATE jobs SET partition = ?1, spec = ?2 WHERE id = ?3")?
            .execute(params![key.0, row.spec, row.summary.id.0])?;
        self.release_partition(&old)?;
        if unworkable {
            self.emit(EventKind::PartitionWorkability { partition: key.0, unworkable })?;
        }
        Ok(())
    }

    pub(super) fn release(&mut self, lease: &LeaseRef, reason: &str) -> Result<FailOutcome> {
        let now = self.now();
        let mut row = self.held(lease)?;
        self.flush_progress(&mut row)?;
        if reason == crate::RELEASE_SERVICE_OFFLINE {
            row.summary.service_crashes = row.summary.service_crashes.saturating_add(1);
            if row.summary.service_crashes >= fleetq_core::job::SERVICE_CRASHES_TO_FAIL {
                return self.give_back(&mut row, crate::service_crash_error(), now, reason, false, false);
            }
        }
        let error = crate::release_error(reason);
        self.give_back(&mut row, error, now, reason, false, crate::release_refunds(reason))
    }

    /// The end of an attempt that did not complete: cancel if requested, else retry while allowed,
    /// else fail. `backoff` applies the spec's retry delay (failures) or not (releases, expiry);
    /// `refund` gives the attempt back (it is not counted).
    fn give_back(
        &mut self,
        row: &mut Row,
        error: JobError,
        now: i64,
        reason: &str,
        backoff: bool,
        refund: bool,
    ) -> Result<FailOutcome> {
        let holder = row.summary.worker_id.clone();
        let ran = row.summary.attempt;
        if refund {
            row.summary.attempt = ran.saturating_sub(1);
        }
        // The message was the ended attempt's.
        row.summary.message = None;
        if row.summary.cancel_requested {
            self.note_attempt(row, ran, JobStatus::Cancelled, None, None, now)?;
            Self::transition(row, Action::ConfirmCancel, now)?;
            row.summary.finished_at = Some(now);
            let outcome =
                to_json(&Outcome::Error { error: JobError::fatal(FailureCategory::Cancelled, "cancelled") })?;
            self.store(row, OutcomeChange::Set(outcome))?;
            self.emit(EventKind::JobCancelled { job: row.summary.clone() })?;
            return Ok(FailOutcome::Cancelled);
        }
        if error.retryable && row.summary.attempt < row.summary.max_attempts {
            Self::transition(row, Action::Requeue, now)?;
            let delay = if backoff {
                let spec: JobSpec = from_json(&row.spec)?;
                i64::try_from(spec.retry_delay_ms(row.summary.attempt + 1)).unwrap_or(i64::MAX)
            } else {
                0
            };
            let run_at = now.saturating_add(delay);
            row.summary.run_at = (delay > 0).then_some(run_at);
            row.summary.progress = 0.0;
            self.note_attempt(row, ran, JobStatus::Pending, Some(reason), Some(&error), now)?;
            row.summary.error = Some(error);
            row.avoid_worker = holder;
            row.avoid_until = Some(run_at.saturating_add(self.config.retry_avoid_ms));
            self.store(row, OutcomeChange::Keep)?;
            self.emit(EventKind::JobRequeued { job: row.summary.clone(), reason: reason.to_owned() })?;
            return Ok(FailOutcome::Retrying { run_at });
        }
        Self::transition(row, Action::Fail, now)?;
        row.summary.finished_at = Some(now);
        // No attempt is left: the recorded error is not retryable any more, whatever it was.
        let error = JobError { retryable: false, ..error };
        self.note_attempt(row, ran, JobStatus::Failed, Some(reason), Some(&error), now)?;
        row.summary.error = Some(error.clone());
        let outcome = to_json(&Outcome::Error { error })?;
        self.store(row, OutcomeChange::Set(outcome))?;
        self.emit(EventKind::JobFailed { job: row.summary.clone() })?;
        Ok(FailOutcome::Failed)
    }

    /// Appends how attempt `ran` ended to the job's history (the newest [`HISTORY_LEN`] are kept).
    fn note_attempt(
        &mut self,
        row: &Row,
        ran: u32,
        end: JobStatus,
        reason: Option<&str>,
        error: Option<&JobError>,
        now: i64,
    ) -> Result<()> {
        let s = &row.summary;
        let entry = AttemptEnd {
            attempt: ran,
            worker_id: s.worker_id.clone(),
            started_at: s.started_at,
            ended_at: now,
            end,
            reason: reason.map(str::to_owned),
            error: error.cloned(),
        };
        let mut entries = self.history(&s.id)?;
        entries.push(entry);
        let drop = entries.len().saturating_sub(HISTORY_LEN);
        entries.drain(..drop);
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO job_history(job_id, entries) VALUES (?1, ?2)")?
            .execute(params![s.id.0, to_json(&entries)?])?;
        Ok(())
    }

    fn history(&self, id: &JobId) -> Result<Vec<AttemptEnd>> {
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT entries FROM job_history WHERE job_id = ?1")?
            .query_row([&id.0], |r| r.get(0))
            .optional()?;
        text.map_or(Ok(Vec::new()), |t| from_json(&t))
    }

    // ----- client and operator operations --------------------------------------------------------

    pub(super) fn cancel(&mut self, id: &JobId) -> Result<CancelOutcome> {
        let now = self.now();
        let mut row = self.must_load(id)?;
        match row.summary.status {
            JobStatus::Pending => {
                Self::transition(&mut row, Action::Cancel, now)?;
                row.summary.finished_at = Some(now);
                self.store(&row, OutcomeChange::Keep)?;
                self.emit(EventKind::JobCancelled { job: row.summary })?;
                Ok(CancelOutcome::Cancelled)
            }
            s if s.is_running() => {
                if !row.summary.cancel_requested {
                    Self::transition(&mut row, Action::Cancel, now)?;
                    row.summary.cancel_requested = true;
                    self.store(&row, OutcomeChange::Keep)?;
                    if let Some(holder) = &row.summary.worker_id {
                        self.cancels.push((holder.clone(), id.clone()));
                    }
                    self.emit(EventKind::JobCancelRequested { job: row.summary })?;
                }
                Ok(CancelOutcome::Requested)
            }
            _ => Ok(CancelOutcome::AlreadyFinished),
        }
    }

    pub(super) fn retry(&mut self, id: &JobId) -> Result<()> {
        let now = self.now();
        let mut row = self.must_load(id)?;
        Self::transition(&mut row, Action::Retry, now)?;
        let spec: JobSpec = from_json(&row.spec)?;
        let s = &mut row.summary;
        // A fresh budget of attempts, numbered on from the last: the attempt number is the lease's
        // fence, so it never repeats for a job (a holder of an attempt from before the retry stays
        // fenced out).
        s.max_attempts = s.attempt.saturating_add(spec.max_attempts);
        s.progress = 0.0;
        s.message = None;
        s.finished_at = None;
        s.started_at = None;
        s.run_at = None;
        s.cancel_requested = false;
        s.error = None;
        s.worker_id = None;
        row.avoid_worker = None;
        row.avoid_until = None;
        // Its partition was removed when it finished, unless another job kept it live.
        let pkey = PartitionKey(row.summary.partition.clone());
        let unworkable = self.ensure_partition(&pkey, PartitionSpec::of(&spec))?;
        row.summary.unworkable = unworkable;
        self.store(&row, OutcomeChange::Clear)?;
        self.emit(EventKind::JobRetried { job: row.summary })?;
        if unworkable {
            self.emit(EventKind::PartitionWorkability { partition: pkey.0, unworkable })?;
        }
        Ok(())
    }

    pub(super) fn reap(&mut self) -> Result<ReapReport> {
        let now = self.now();
        let mut report = ReapReport::default();
        loop {
            let (requeued, finished) = self.reap_leases(now, 500)?;
            report.requeued += requeued;
            report.finished += finished;
            if requeued + finished < 500 {
                break;
            }
        }
        report.promoted = self.promote(now)?;
        let expired: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.last_seen < now - self.config.worker_ttl_ms)
            .map(|w| w.registration.worker_id.clone())
            .collect();
        for id in &expired {
            self.remove_worker(id, "expired")?;
        }
        report.workers_expired = expired.len();
        self.drop_idle_classes(now)?;
        self.conn.execute(
            "DELETE FROM job_history WHERE job_id IN
               (SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1)",
            [now - self.config.retention_ms],
        )?;
        self.conn.execute(
            "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1",
            [now - self.config.retention_ms],
        )?;
        report.events_trimmed = self.trim_old_events(now - self.config.max_event_age_ms)?;
        // Finish tags the virtual time has passed mean what no tag means; kept workflow places
        // expire with retention.
        self.conn.execute(
            "DELETE FROM fair_finish WHERE finish <= (SELECT v FROM fair_clock c WHERE c.service = fair_finish.service)",
            [],
        )?;
        self.conn.execute("DELETE FROM fair_workflows WHERE expires_at < ?1", [now])?;
        Ok(report)
    }

    /// Drops the oldest events while they are older than `cutoff` (ms). Times follow the sequence,
    /// so the old events are a prefix: walk it in chunks instead of scanning by time.
    fn trim_old_events(&mut self, cutoff: i64) -> Result<usize> {
        let mut trimmed = 0;
        for _ in 0..16 {
            let chunk: Vec<(i64, i64)> = {
                let mut stmt =
                    self.conn.prepare_cached("SELECT seq, at FROM events ORDER BY seq LIMIT 1000")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let old = chunk.iter().take_while(|(_, at)| *at < cutoff).count();
            if let Some((last, _)) = old.checked_sub(1).map(|i| chunk[i]) {
                trimmed += self.conn.execute("DELETE FROM events WHERE seq <= ?1", [last])?;
            }
            if old < 1000 {
                break;
            }
        }
        Ok(trimmed)
    }

    /// Ends up to `limit` expired leases. Returns (requeued, finished).
    fn reap_leases(&mut self, now: i64, limit: usize) -> Result<(usize, usize)> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare_cached(EXPIRED_SQL)?;
            let rows = stmt.query_map(params![now, limit as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let (mut requeued, mut finished) = (0, 0);
        for id in ids {
            let mut row = self.must_load(&JobId(id))?;
            self.flush_progress(&mut row)?;
            let error =
                JobError::retryable(FailureCategory::LeaseExpired, "lease expired: worker stopped reporting");
            match self.give_back(&mut row, error, now, "lease_expired", false, false)? {
                FailOutcome::Retrying { .. } => requeued += 1,
                _ => finished += 1,
            }
        }
        Ok((requeued, finished))
    }

    /// Makes due delayed retries claimable.
    fn promote(&mut self, now: i64) -> Result<usize> {
        let due: Vec<(String, String, String)> = {
            let mut stmt = self.conn.prepare_cached(PROMOTE_SQL)?;
            let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (partition, order, id) in &due {
            self.head_added(&PartitionKey(partition.clone()), (order.clone(), id.clone()));
        }
        self.wake |= !due.is_empty();
        Ok(due.len())
    }

    // ----- workers and machines ------------------------------------------------------------------

    pub(super) fn register_worker(&mut self, registration: WorkerRegistration) -> Result<()> {
        let now = self.now();
        let id = registration.worker_id.clone();
        let (registered_at, connectors) = match self.workers.get(&id) {
            Some(old) => (old.registered_at, old.connectors.clone()),
            None => (now, BTreeMap::new()),
        };
        let info = WorkerInfo { registration, registered_at, last_seen: now, connectors };
        self.conn.execute(
            "INSERT INTO workers(id, info, last_seen) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
            params![id, to_json(&info)?, now],
        )?;
        let spec = ClassSpec::of(&info.registration);
        let key = spec.key();
        self.workers.insert(id.clone(), info.clone());
        self.emit(EventKind::WorkerRegistered { worker: info })?;
        if self.worker_class.get(&id) == Some(&key) {
            return Ok(());
        }
        let workable = Self::join_class(&mut self.classes, &mut self.partitions, key.clone(), spec);
        if let Some(old) = self.worker_class.insert(id, key) {
            self.leave_class(&old)?;
        }
        for p in workable {
            self.set_flag(&p, false)?;
        }
        Ok(())
    }

    fn touch_worker(&mut self, id: &str, now: i64) -> Result<()> {
        let n = self
            .conn
            .prepare_cached("UPDATE workers SET last_seen = ?1 WHERE id = ?2")?
            .execute(params![now, id])?;
        if n == 0 {
            return Err(BrokerError::UnknownWorker(id.to_owned()));
        }
        if let Some(w) = self.workers.get_mut(id) {
            w.last_seen = now;
        }
        Ok(())
    }

    pub(super) fn heartbeat(&mut self, id: &str) -> Result<()> {
        let now = self.now();
        self.touch_worker(id, now)
    }

    pub(super) fn remove_worker(&mut self, id: &str, reason: &str) -> Result<()> {
        if self.workers.remove(id).is_none() {
            return Err(BrokerError::UnknownWorker(id.to_owned()));
        }
        self.conn.execute("DELETE FROM workers WHERE id = ?1", [id])?;
        self.emit(EventKind::WorkerRemoved { worker_id: id.to_owned(), reason: reason.to_owned() })?;
        if let Some(key) = self.worker_class.remove(id) {
            self.leave_class(&key)?;
        }
        Ok(())
    }

    pub(super) fn report_connector(&mut self, worker_id: &str, report: ConnectorReport) -> Result<()> {
        let now = self.now();
        let Some(info) = self.workers.get_mut(worker_id) else {
            return Err(BrokerError::UnknownWorker(worker_id.to_owned()));
        };
        let changed = info
            .connectors
            .get(&report.service)
            .is_none_or(|old| old.status != report.status || old.message != report.message);
        info.connectors.insert(report.service.clone(), report.clone());
        info.last_seen = now;
        let text = to_json(&*info)?;
        self.conn.execute(
            "UPDATE workers SET info = ?1, last_seen = ?2 WHERE id = ?3",
            params![text, now, worker_id],
        )?;
        if changed {
            self.emit(EventKind::ConnectorStatus { worker_id: worker_id.to_owned(), report })?;
        }
        Ok(())
    }

    pub(super) fn machine_event(&mut self, event: MachineEvent) -> Result<()> {
        let mut state: MachineState = self
            .conn
            .prepare_cached("SELECT state FROM machines WHERE id = ?1")?
            .query_row([&event.machine_id], |r| r.get::<_, String>(0))
            .optional()?
            .map(|s| from_json(&s))
            .transpose()?
            .unwrap_or_default();
        state.apply(&event);
        self.conn.execute(
            "INSERT INTO machines(id, state) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET state = excluded.state",
            params![event.machine_id, to_json(&state)?],
        )?;
        self.emit(EventKind::Machine { event })
    }

    // ----- queries -------------------------------------------------------------------------------

    pub(super) fn job(&mut self, id: &JobId) -> Result<Option<JobRecord>> {
        self.conn
            .prepare_cached("SELECT summary, spec, outcome FROM jobs WHERE id = ?1")?
            .query_row([&id.0], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
            })
            .optional()?
            .map(|(summary, spec, outcome)| {
                Ok(JobRecord {
                    summary: self.parse_summary(&summary)?,
                    spec: from_json(&spec)?,
                    outcome: outcome.map(|o| from_json(&o)).transpose()?,
                    history: self.history(id)?,
                })
            })
            .transpose()
    }

    pub(super) fn jobs(&mut self, filter: &JobFilter) -> Result<JobPage> {
        let limit = page_limit(filter);
        let (c_at, c_id) = match &filter.cursor {
            Some(c) => {
                let (at, id) = c.split_once(':').ok_or_else(|| {
                    BrokerError::Invalid(fleetq_core::ValidationError::new(
                        "cursor",
                        "not a cursor of this broker",
                    ))
                })?;
                let at: i64 = at.parse().map_err(|_| {
                    BrokerError::Invalid(fleetq_core::ValidationError::new(
                        "cursor",
                        "not a cursor of this broker",
                    ))
                })?;
                (at, id.to_owned())
            }
            None => (i64::MAX, String::new()),
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT summary FROM jobs
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR service = ?2)
               AND (created_at < ?3 OR (created_at = ?3 AND ?4 <> '' AND id < ?4))
               AND (?6 IS NULL OR json_extract(summary, '$.worker_id') = ?6)
               AND (?7 IS NULL OR workflow_id = ?7)
               AND (?8 IS NULL OR json_extract(summary, '$.customer_id') = ?8)
             ORDER BY created_at DESC, id DESC LIMIT ?5",
        )?;
        // One row more than the page tells whether another page follows.
        let rows = stmt.query_map(
            params![
                filter.status.map(|s| s.as_str()),
                filter.service,
                c_at,
                c_id,
                (limit + 1) as i64,
                filter.worker,
                filter.workflow,
                filter.customer
            ],
            |r| r.get::<_, String>(0),
        )?;
        let mut jobs = self.listed(rows)?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        let next = jobs.last().filter(|_| more).map(|last| format!("{}:{}", last.created_at, last.id));
        Ok(JobPage { jobs, next })
    }

    pub(super) fn queue_position(&mut self, id: &JobId) -> Result<Option<u64>> {
        let row: Option<(String, String, bool)> = self
            .conn
            .prepare_cached("SELECT service, order_key, claimable FROM jobs WHERE id = ?1")?
            .query_row([&id.0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((service, order, true)) = row else { return Ok(None) };
        let ahead: i64 =
            self.conn.prepare_cached(POSITION_SQL)?.query_row(params![service, order], |r| r.get(0))?;
        Ok(Some(ahead as u64 + 1))
    }

    pub(super) fn queue(&mut self, filter: &QueueFilter) -> Result<JobPage> {
        let limit = filter.page_limit();
        let after = filter.checked_cursor()?.unwrap_or("");
        let sql = match (&filter.workflow, &filter.service) {
            (Some(_), _) => QUEUE_WORKFLOW_SQL,
            (None, Some(_)) => QUEUE_SERVICE_SQL,
            (None, None) => QUEUE_ALL_SQL,
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        // One row more than the page tells whether another page follows.
        let rows = stmt.query_map(
            params![filter.service, after, filter.workflow, filter.customer, (limit + 1) as i64],
            |r| r.get::<_, String>(0),
        )?;
        let mut jobs = self.listed(rows)?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        let next = match jobs.last().filter(|_| more) {
            Some(last) => Some(
                self.conn
                    .prepare_cached("SELECT order_key FROM jobs WHERE id = ?1")?
                    .query_row([&last.id.0], |r| r.get::<_, String>(0))?,
            ),
            None => None,
        };
        Ok(JobPage { jobs, next })
    }

    pub(super) fn log_epoch(&mut self) -> Result<u64> {
        let v: i64 = self.conn.query_row("SELECT v FROM meta WHERE k = 'log_epoch'", [], |r| r.get(0))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    pub(super) fn advance_log_epoch(&mut self, seen: u64) -> Result<u64> {
        self.conn.execute(
            "UPDATE meta SET v = v + 1 WHERE k = 'log_epoch' AND v = ?1",
            [i64::try_from(seen).unwrap_or(i64::MAX)],
        )?;
        self.log_epoch()
    }

    pub(super) fn workers(&mut self) -> Result<Vec<WorkerInfo>> {
        let mut out: Vec<WorkerInfo> = self.workers.values().cloned().collect();
        out.sort_by(|a, b| a.registration.worker_id.cmp(&b.registration.worker_id));
        Ok(out)
    }

    pub(super) fn queue_depths(&mut self) -> Result<BTreeMap<String, crate::ServiceDepth>> {
        let mut out: BTreeMap<String, crate::ServiceDepth> = BTreeMap::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT service, status, claimable, COUNT(*) FROM jobs
             WHERE status IN ('pending', 'assigned', 'in_progress') GROUP BY service, status, claimable",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?, r.get::<_, i64>(3)?))
        })?;
        for row in rows {
            let (service, status, claimable, n) = row?;
            let d = out.entry(service).or_default();
            let n = n as u64;
            match (status.as_str(), claimable) {
                ("pending", true) => d.pending += n,
                ("pending", false) => d.delayed += n,
                _ => d.running += n,
            }
        }
        Ok(out)
    }

    pub(super) fn machines(&mut self) -> Result<Vec<MachineState>> {
        let mut stmt = self.conn.prepare_cached("SELECT state FROM machines ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| from_json(&r?)).collect()
    }

    pub(super) fn snapshot(&mut self) -> Result<Snapshot> {
        let seq = self.max_seq()?;
        let mut jobs = BTreeMap::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT summary FROM jobs WHERE status IN ('assigned', 'in_progress')
                 UNION ALL
                 SELECT summary FROM (SELECT summary FROM jobs WHERE status = 'pending' ORDER BY created_at LIMIT ?1)",
            )?;
            let rows =
                stmt.query_map([self.config.snapshot_pending_limit as i64], |r| r.get::<_, String>(0))?;
            for row in rows {
                let Some(s) = self.listed_one(&row?) else { continue };
                jobs.insert(s.id.clone(), s);
            }
        }
        let workers = self.workers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let machines = self.machines()?.into_iter().map(|m| (m.machine_id.clone(), m)).collect();
        Ok(Snapshot { seq, jobs, workers, machines })
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
                    .replace("?5", "10"),
            );
            assert!(p.contains(&format!("INDEX {index}")), "{index}: {p}");
            assert!(!p.contains("TEMP B-TREE"), "{index} sorts: {p}");
            assert!(!p.starts_with("SCAN"), "{index} scans: {p}");
        }
    }
}
