//! The fleet's reports on the writer's state: workers registering, alive and leaving, connector
//! reports and machine events.

use super::*;

impl State {
    // ----- workers and machines ------------------------------------------------------------------

    pub(in crate::embedded) fn register_worker(&mut self, registration: WorkerRegistration) -> Result<()> {
        let now = self.now();
        let id = registration.worker_id.clone();
        let (registered_at, connectors, completed) = match self.workers.get(&id) {
            Some(old) => (old.registered_at, old.connectors.clone(), old.completed),
            None => (now, BTreeMap::new(), 0),
        };
        let info = WorkerInfo { registration, registered_at, last_seen: now, connectors, completed };
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

    pub(super) fn touch_worker(&mut self, id: &str, now: i64) -> Result<()> {
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

    /// Counts a job completed by worker `id` (a worker already gone counts nothing).
    pub(super) fn count_completed(&mut self, id: &str) -> Result<()> {
        let Some(w) = self.workers.get_mut(id) else { return Ok(()) };
        w.completed = w.completed.saturating_add(1);
        let info = to_json(&*w)?;
        self.conn.prepare_cached("UPDATE workers SET info = ?1 WHERE id = ?2")?.execute(params![info, id])?;
        Ok(())
    }

    pub(in crate::embedded) fn heartbeat(&mut self, id: &str) -> Result<()> {
        let now = self.now();
        self.touch_worker(id, now)
    }

    pub(in crate::embedded) fn remove_worker(&mut self, id: &str, reason: &str) -> Result<()> {
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

    pub(in crate::embedded) fn report_connector(
        &mut self,
        worker_id: &str,
        report: ConnectorReport,
    ) -> Result<()> {
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

    pub(in crate::embedded) fn machine_event(&mut self, event: MachineEvent) -> Result<()> {
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
}
