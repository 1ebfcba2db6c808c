//! Reads of the writer's state: jobs, listings, queue position and page, depths, workers,
//! machines, the snapshot, the event log and its epoch.

use super::*;

/// The filters every listing takes: status and service (?1, ?2), worker, workflow, customer and
/// owner (?6–?9).
macro_rules! listing_filters {
    () => {
        " AND (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR service = ?2)
          AND (?6 IS NULL OR json_extract(summary, '$.worker_id') = ?6)
          AND (?7 IS NULL OR workflow_id = ?7)
          AND (?8 IS NULL OR json_extract(summary, '$.customer_id') = ?8)
          AND (?9 IS NULL OR json_extract(summary, '$.owner') = ?9) "
    };
}

/// Jobs newest first, after a `created_at:id` cursor (?3, ?4), ?5 rows.
const NEWEST_SQL: &str = concat!(
    "SELECT summary FROM jobs WHERE (created_at < ?3 OR (created_at = ?3 AND ?4 <> '' AND id < ?4))",
    listing_filters!(),
    "ORDER BY created_at DESC, id DESC LIMIT ?5"
);

/// Finished jobs, the latest to finish first, after a `finished_at:id` cursor (?3, ?4), ?5 rows.
const FINISHED_SQL: &str = concat!(
    "SELECT summary FROM jobs INDEXED BY jobs_done WHERE finished_at IS NOT NULL
       AND (finished_at < ?3 OR (finished_at = ?3 AND ?4 <> '' AND id < ?4))",
    listing_filters!(),
    "ORDER BY finished_at DESC, id DESC LIMIT ?5"
);

impl State {
    pub(in crate::embedded) fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<Event>> {
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

    // ----- queries -------------------------------------------------------------------------------

    pub(in crate::embedded) fn job(&mut self, id: &JobId) -> Result<Option<JobRecord>> {
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

    /// Finished jobs, the latest to finish first.
    pub(in crate::embedded) fn finished(&mut self, filter: &JobFilter) -> Result<JobPage> {
        self.page_by_time(filter, FINISHED_SQL, |s| s.finished_at.unwrap_or(0))
    }

    /// Jobs, newest first.
    pub(in crate::embedded) fn jobs(&mut self, filter: &JobFilter) -> Result<JobPage> {
        self.page_by_time(filter, NEWEST_SQL, |s| s.created_at)
    }

    /// A page of `sql` (ordered by a time, then id, both descending, from a `time:id` cursor: the
    /// parameters of [`NEWEST_SQL`]); the next page's cursor is taken with `time_of`.
    fn page_by_time(
        &mut self,
        filter: &JobFilter,
        sql: &str,
        time_of: fn(&JobSummary) -> i64,
    ) -> Result<JobPage> {
        let limit = page_limit(filter);
        let bad = || {
            BrokerError::Invalid(fleetq_core::ValidationError::new("cursor", "not a cursor of this broker"))
        };
        let (c_at, c_id) = match &filter.cursor {
            Some(c) => {
                let (at, id) = c.split_once(':').ok_or_else(bad)?;
                (at.parse::<i64>().map_err(|_| bad())?, id.to_owned())
            }
            None => (i64::MAX, String::new()),
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
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
                filter.customer,
                filter.owner
            ],
            |r| r.get::<_, String>(0),
        )?;
        let mut jobs = self.listed(rows)?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        let next = jobs.last().filter(|_| more).map(|last| format!("{}:{}", time_of(last), last.id));
        Ok(JobPage { jobs, next })
    }

    pub(in crate::embedded) fn queue_position(&mut self, id: &JobId) -> Result<Option<u64>> {
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

    pub(in crate::embedded) fn queue(&mut self, filter: &QueueFilter) -> Result<JobPage> {
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
            params![
                filter.service,
                after,
                filter.workflow,
                filter.customer,
                (limit + 1) as i64,
                filter.owner
            ],
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

    pub(in crate::embedded) fn log_epoch(&mut self) -> Result<u64> {
        let v: i64 = self.conn.query_row("SELECT v FROM meta WHERE k = 'log_epoch'", [], |r| r.get(0))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    pub(in crate::embedded) fn advance_log_epoch(&mut self, seen: u64) -> Result<u64> {
        self.conn.execute(
            "UPDATE meta SET v = v + 1 WHERE k = 'log_epoch' AND v = ?1",
            [i64::try_from(seen).unwrap_or(i64::MAX)],
        )?;
        self.log_epoch()
    }

    pub(in crate::embedded) fn workers(&mut self) -> Result<Vec<WorkerInfo>> {
        let mut out: Vec<WorkerInfo> = self.workers.values().cloned().collect();
        out.sort_by(|a, b| a.registration.worker_id.cmp(&b.registration.worker_id));
        Ok(out)
    }

    pub(in crate::embedded) fn queue_depths(&mut self) -> Result<BTreeMap<String, crate::ServiceDepth>> {
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

    pub(in crate::embedded) fn machines(&mut self) -> Result<Vec<MachineState>> {
        let mut stmt = self.conn.prepare_cached("SELECT state FROM machines ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| from_json(&r?)).collect()
    }

    pub(in crate::embedded) fn snapshot(&mut self) -> Result<Snapshot> {
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
        Ok(Snapshot { seq, jobs, workers, machines, paused: self.paused.clone() })
    }
}
