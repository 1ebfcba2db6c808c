//! The fleet's reports on Redis: worker registration and presence, connector reports, machine
//! events.

use super::*;

impl Fleet for RedisBroker {
    async fn register_worker(&self, registration: WorkerRegistration) -> Result<()> {
        registration.validate()?;
        self.register(&registration).await
    }

    async fn heartbeat(&self, worker_id: &str) -> Result<()> {
        let mut cmd = self.fcall("fq_heartbeat", false);
        cmd.arg(self.now()).arg(worker_id);
        match text(&self.run(&cmd).await?).as_deref() {
            Some("ok") => Ok(()),
            _ => Err(BrokerError::UnknownWorker(worker_id.to_owned())),
        }
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<()> {
        let event =
            EventKind::WorkerRemoved { worker_id: worker_id.to_owned(), reason: "deregistered".into() };
        let mut cmd = self.fcall("fq_deregister", false);
        cmd.arg(self.now()).arg(worker_id).arg(serde_json::to_string(&event).map_err(corrupt)?);
        match text(&self.run(&cmd).await?).as_deref() {
            Some("ok") => Ok(()),
            Some("changed") => self.evaluate_workability().await.map(|_| ()),
            _ => Err(BrokerError::UnknownWorker(worker_id.to_owned())),
        }
    }

    async fn report_connector(&self, worker_id: &str, report: ConnectorReport) -> Result<()> {
        self.cas("workers", worker_id, true, |old, _now| {
            let Some(old) = old else { return Err(BrokerError::UnknownWorker(worker_id.to_owned())) };
            let mut info: WorkerInfo =
                serde_json::from_str(old).map_err(|e| corrupt(format!("worker: {e}")))?;
            let changed = info
                .connectors
                .get(&report.service)
                .is_none_or(|o| o.status != report.status || o.message != report.message);
            info.connectors.insert(report.service.clone(), report.clone());
            let text = serde_json::to_string(&info).map_err(corrupt)?;
            let event = changed.then(|| EventKind::ConnectorStatus {
                worker_id: worker_id.to_owned(),
                report: report.clone(),
            });
            Ok(Some((text, event)))
        })
        .await
    }

    async fn machine_event(&self, event: MachineEvent) -> Result<()> {
        event.validate()?;
        let id = event.machine_id.clone();
        self.cas("machines", &id, false, |old, _now| {
            let mut state: MachineState = old
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt(format!("machine: {e}")))?
                .unwrap_or_default();
            state.apply(&event);
            let text = serde_json::to_string(&state).map_err(corrupt)?;
            Ok(Some((text, Some(EventKind::Machine { event: event.clone() }))))
        })
        .await
    }
}
