//! What a worker knows of its services and running jobs, in one place: [`Known`], read and changed
//! as one under one lock, so that no reader ever sees one part of it updated and another not.

use std::collections::BTreeMap;

use fleetq_connectors::CancellationToken;
use fleetq_core::{ConnectorReport, ConnectorStatus, JobId};

/// What the worker knows of one service.
#[derive(Debug, Default)]
pub(crate) struct Service {
    /// The status its connector's last health check returned (`None` before the first).
    pub(crate) health: Option<ConnectorStatus>,
    /// This worker's jobs of it running now.
    pub(crate) running: usize,
    /// The last status and message logged (a change is logged once).
    pub(crate) logged: Option<(ConnectorStatus, Option<String>)>,
    /// The last report sent (an activity change is sent from it at once).
    pub(crate) last_report: Option<ConnectorReport>,
    /// The models its connector last said the service has (added to the `models` capability).
    pub(crate) models: Option<Vec<String>>,
}

impl Service {
    /// Whether jobs of it may be claimed: its last health check found it up.
    pub(crate) fn usable(&self) -> bool {
        matches!(self.health, Some(ConnectorStatus::Idle | ConnectorStatus::Active))
    }

    /// The status to report: a usable connector with one of this worker's jobs running is `active`
    /// whatever its own count says (the count is the worker's to know; the connector's next check
    /// says what it thinks).
    pub(crate) fn status_to_report(&self, checked: ConnectorStatus) -> ConnectorStatus {
        match checked {
            ConnectorStatus::Idle if self.running > 0 => ConnectorStatus::Active,
            other => other,
        }
    }
}

/// Everything the worker's loops share.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// Per service of a loaded connector.
    pub(crate) services: BTreeMap<String, Service>,
    /// The services the broker was last told this worker claims for.
    pub(crate) advertised: Vec<String>,
    /// Per running job: fired when the broker signals that its cancel was requested.
    pub(crate) cancels: BTreeMap<JobId, CancellationToken>,
}

impl Known {
    /// One entry per service, nothing checked yet.
    pub(crate) fn new<'a>(services: impl IntoIterator<Item = &'a String>) -> Self {
        Self {
            services: services.into_iter().map(|s| (s.clone(), Service::default())).collect(),
            ..Self::default()
        }
    }

    /// Usable services with a free slot (`limit` per service): what this worker may claim for now.
    pub(crate) fn claimable(&self, limit: impl Fn(&str) -> usize) -> Vec<String> {
        self.services
            .iter()
            .filter(|(name, s)| s.usable() && s.running < limit(name))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Usable services.
    pub(crate) fn usable(&self) -> Vec<String> {
        self.services.iter().filter(|(_, s)| s.usable()).map(|(name, _)| name.clone()).collect()
    }

    /// Whether any health check has run yet.
    pub(crate) fn checked(&self) -> bool {
        self.services.values().any(|s| s.health.is_some())
    }

    /// The entry of `service` (created if the worker did not load it, which the runtime never asks).
    pub(crate) fn service(&mut self, service: &str) -> &mut Service {
        self.services.entry(service.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_usable_services_with_a_free_slot_are_claimable() {
        let names = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let mut k = Known::new(&names);
        assert!(k.claimable(|_| 1).is_empty() && !k.checked(), "nothing before the first check");
        k.service("a").health = Some(ConnectorStatus::Idle);
        k.service("b").health = Some(ConnectorStatus::Offline);
        k.service("c").health = Some(ConnectorStatus::Active);
        k.service("c").running = 1;
        assert_eq!(k.claimable(|_| 1), ["a"]);
        assert_eq!(k.claimable(|s| if s == "c" { 2 } else { 1 }), ["a", "c"]);
        assert_eq!(k.usable(), ["a", "c"]);
        assert!(k.checked());
    }

    #[test]
    fn a_usable_connector_running_a_job_is_active() {
        let mut s = Service { running: 1, ..Service::default() };
        assert_eq!(s.status_to_report(ConnectorStatus::Idle), ConnectorStatus::Active);
        assert_eq!(s.status_to_report(ConnectorStatus::Offline), ConnectorStatus::Offline);
        s.running = 0;
        assert_eq!(s.status_to_report(ConnectorStatus::Idle), ConnectorStatus::Idle);
    }
}
