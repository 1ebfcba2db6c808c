//! The queue's operations on the writer's state: submit, claim (with the class indexes and fair
//! share), renew, the ends of an attempt, cancel, retry and the reaper.

use super::*;

impl State {
    // ----- submission and claiming ---------------------------------------------------------------

    pub(in crate::embedded) fn submit(&mut self, spec: JobSpec) -> Result<Submitted> {
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
    pub(super) fn choose(&self, worker_id: &str, now: i64) -> Result<Option<Row>> {
        let Some(key) = self.worker_class.get(worker_id) else { return Ok(None) };
        let Some(class) = self.classes.get(key) else { return Ok(None) };
        let usable = |row: &Row| {
            if self.paused.contains(&row.summary.service) {
                return false;
            }
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
    pub(super) fn fair_time(&mut self, spec: &JobSpec, now: i64) -> Result<i64> {
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
    pub(super) fn fair_claimed(&mut self, row: &Row) -> Result<()> {
        let Some(key) = OrderKey::decode(&row.order_key) else { return Ok(()) };
        let tag = i64::try_from(fleetq_core::fair::tag_of_key_time(key.time_ms)).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached("UPDATE fair_clock SET v = MAX(v, ?2) WHERE service = ?1")?
            .execute(params![row.summary.service, tag])?;
        Ok(())
    }

    pub(in crate::embedded) fn claim(&mut self, worker_id: &str) -> Result<Option<Lease>> {
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

    pub(in crate::embedded) fn renew(
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

    pub(in crate::embedded) fn complete(&mut self, lease: &LeaseRef, result: String) -> Result<()> {
        let now = self.now();
        let mut row = self.held(lease)?;
        self.flush_progress(&mut row)?;
        Self::transition(&mut row, Action::Complete, now)?;
        self.note_attempt(&row, row.summary.attempt, JobStatus::Completed, None, None, now)?;
        row.summary.progress = 100.0;
        row.summary.finished_at = Some(now);
        // The attempt's last message ("queued in ComfyUI", "node 4") is not the job's state now,
        // nor is an earlier attempt's error (it lives in the history).
        row.summary.message = None;
        row.summary.error = None;
        self.count_completed(&lease.worker_id)?;
        self.store(&row, OutcomeChange::Set(crate::result_outcome(&result)))?;
        self.emit(EventKind::JobCompleted { job: row.summary })
    }

    pub(in crate::embedded) fn fail(
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

    pub(in crate::embedded) fn fail_requiring(
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
    pub(super) fn move_partition(&mut self, row: &mut Row, requirements: Requirements) -> Result<()> {
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

    pub(in crate::embedded) fn release(&mut self, lease: &LeaseRef, reason: &str) -> Result<FailOutcome> {
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
    pub(super) fn give_back(
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
        // "retry" is how a failure asks to be retried; the last one was not, so it names no reason.
        let reason = (reason != "retry").then_some(reason);
        self.note_attempt(row, ran, JobStatus::Failed, reason, Some(&error), now)?;
        row.summary.error = Some(error.clone());
        let outcome = to_json(&Outcome::Error { error })?;
        self.store(row, OutcomeChange::Set(outcome))?;
        self.emit(EventKind::JobFailed { job: row.summary.clone() })?;
        Ok(FailOutcome::Failed)
    }

    /// Appends how attempt `ran` ended to the job's history (the newest [`HISTORY_LEN`] are kept).
    pub(super) fn note_attempt(
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

    pub(super) fn history(&self, id: &JobId) -> Result<Vec<AttemptEnd>> {
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT entries FROM job_history WHERE job_id = ?1")?
            .query_row([&id.0], |r| r.get(0))
            .optional()?;
        text.map_or(Ok(Vec::new()), |t| from_json(&t))
    }

    // ----- client and operator operations --------------------------------------------------------

    pub(in crate::embedded) fn cancel(&mut self, id: &JobId) -> Result<CancelOutcome> {
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

    pub(in crate::embedded) fn pause_service(&mut self, service: &str, paused: bool) -> Result<bool> {
        fleetq_core::validate::check_name("service", service)?;
        let changed = if paused {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO paused_services(service) VALUES (?1)")?
                .execute([service])?
                > 0
        } else {
            self.conn.prepare_cached("DELETE FROM paused_services WHERE service = ?1")?.execute([service])?
                > 0
        };
        if !changed {
            return Ok(false);
        }
        if paused {
            self.paused.insert(service.to_owned());
        } else {
            self.paused.remove(service);
            // Its jobs are claimable again: waiting workers look.
            self.wake = true;
        }
        self.emit(EventKind::ServicePaused { service: service.to_owned(), paused })?;
        Ok(true)
    }

    pub(in crate::embedded) fn paused_services(&self) -> std::collections::BTreeSet<String> {
        self.paused.clone()
    }

    pub(in crate::embedded) fn retry(&mut self, id: &JobId) -> Result<()> {
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

    pub(in crate::embedded) fn reap(&mut self) -> Result<ReapReport> {
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
    pub(super) fn trim_old_events(&mut self, cutoff: i64) -> Result<usize> {
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
    pub(super) fn reap_leases(&mut self, now: i64, limit: usize) -> Result<(usize, usize)> {
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
    pub(super) fn promote(&mut self, now: i64) -> Result<usize> {
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
}
