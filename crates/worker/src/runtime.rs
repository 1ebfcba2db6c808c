//! The worker's loops: claim, supervise, heartbeat, health.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::{Broker, BrokerError, Lease, LeaseRef, LeaseState};
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::backoff::Backoff;
use fleetq_core::oom::{GPU_MEMORY_PATH, raised_requirements};
use fleetq_core::{
    ConnectorReport, ConnectorStatus, FailureCategory, JobError, JobId, JobSpec, ValidationError,
    WorkerRegistration,
};
use thiserror::Error;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, info, info_span, warn};

/// Errors that stop a worker.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration is unusable.
    #[error("invalid worker configuration: {0}")]
    Config(#[from] ValidationError),
    /// The broker refused an operation the worker cannot do without.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Identity and capabilities. `services` is replaced by the services of the loaded connectors.
    pub registration: WorkerRegistration,
    /// Longest single blocking claim (shutdown is noticed between two).
    pub claim_wait: Duration,
    /// Heartbeat period (keep it well under the broker's worker TTL).
    pub heartbeat_every: Duration,
    /// Health check period of every connector.
    pub health_every: Duration,
    /// Progress timeout for jobs that do not set `progress_timeout_ms`.
    pub default_progress_timeout: Option<Duration>,
    /// How long a running job may finish after shutdown was asked.
    pub shutdown_grace: Duration,
    /// How long an interrupted connector may take to return before its task is aborted.
    pub interrupt_grace: Duration,
    /// Jobs each service's connector may run at once; services not listed run one at a time.
    pub max_concurrent: BTreeMap<String, usize>,
}

impl WorkerConfig {
    /// Defaults for `registration`.
    pub fn new(registration: WorkerRegistration) -> Self {
        Self {
            registration,
            claim_wait: Duration::from_secs(1),
            heartbeat_every: Duration::from_secs(10),
            health_every: Duration::from_secs(5),
            default_progress_timeout: None,
            shutdown_grace: Duration::from_secs(30),
            interrupt_grace: Duration::from_secs(10),
            max_concurrent: BTreeMap::new(),
        }
    }
}

/// Why the worker stopped a job before the connector finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Timeout,
    ProgressTimeout,
    Shutdown,
    LeaseLost,
}

impl Stop {
    /// Its name in logs.
    fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::ProgressTimeout => "progress_timeout",
            Self::Shutdown => "shutdown",
            Self::LeaseLost => "lease_lost",
        }
    }
}

/// How long a service's last job must have ended before it is reported `idle` (a next job that
/// starts meanwhile keeps it `active`: one change, not two).
const ACTIVITY_SETTLE: Duration = Duration::from_millis(50);

/// A worker: a broker, its connectors (one per service) and its configuration.
#[derive(Debug)]
pub struct Worker<B: Broker> {
    broker: Arc<B>,
    connectors: BTreeMap<String, Arc<dyn Connector>>,
    config: WorkerConfig,
    /// Services whose connector is healthy.
    healthy: Mutex<BTreeSet<String>>,
    /// Jobs running per service.
    running: Mutex<BTreeMap<String, usize>>,
    /// The services the broker was last told this worker claims for.
    advertised: Mutex<Vec<String>>,
    /// Woken when a job ends (a slot frees up) or health changes.
    wake: Notify,
    /// The last status seen per service (changes are logged).
    reported: Mutex<BTreeMap<String, (ConnectorStatus, Option<String>)>>,
    /// The last report sent per service (activity changes are sent from it at once).
    last_report: Mutex<BTreeMap<String, ConnectorReport>>,
    /// The status each connector's last health check returned.
    health_status: Mutex<BTreeMap<String, ConnectorStatus>>,
    /// Per running job: fired when the broker signals that its cancel was requested.
    cancels: std::sync::Mutex<BTreeMap<JobId, CancellationToken>>,
    /// Per service: the models its connector last said the service has (added to the `models`
    /// capability at registration).
    models: Mutex<BTreeMap<String, Vec<String>>>,
}

impl<B: Broker> Worker<B> {
    /// Checks the configuration: a valid identity and at least one connector, one per service.
    pub fn new(
        broker: Arc<B>,
        connectors: Vec<Arc<dyn Connector>>,
        mut config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        let mut map = BTreeMap::new();
        for c in connectors {
            if map.insert(c.service().to_owned(), c).is_some() {
                return Err(
                    ValidationError::new("connectors", "two connectors serve the same service").into()
                );
            }
        }
        if map.is_empty() {
            return Err(ValidationError::new("connectors", "a worker needs at least one connector").into());
        }
        config.registration.services = map.keys().cloned().collect();
        config.registration.validate()?;
        if let Some((service, _)) = config.max_concurrent.iter().find(|(_, n)| **n == 0) {
            return Err(ValidationError::new(
                "max_concurrent_jobs",
                format!("{service}: must be at least 1"),
            )
            .into());
        }
        let healthy = Mutex::new(BTreeSet::new());
        Ok(Self {
            broker,
            connectors: map,
            config,
            healthy,
            running: Mutex::new(BTreeMap::new()),
            advertised: Mutex::new(Vec::new()),
            wake: Notify::new(),
            reported: Mutex::new(BTreeMap::new()),
            cancels: std::sync::Mutex::new(BTreeMap::new()),
            last_report: Mutex::new(BTreeMap::new()),
            health_status: Mutex::new(BTreeMap::new()),
            models: Mutex::new(BTreeMap::new()),
        })
    }

    fn limit(&self, service: &str) -> usize {
        self.config.max_concurrent.get(service).copied().unwrap_or(1).max(1)
    }

    /// Healthy services with a free slot: what this worker may claim for now.
    async fn claimable(&self) -> Vec<String> {
        let healthy = self.healthy.lock().await.clone();
        let running = self.running.lock().await;
        healthy.into_iter().filter(|s| running.get(s).copied().unwrap_or(0) < self.limit(s)).collect()
    }

    fn id(&self) -> &str {
        &self.config.registration.worker_id
    }

    /// Registers with the services this worker can claim for now. With none because every
    /// connector is down, it advertises none: nothing matches it, so jobs only it could serve are
    /// flagged unworkable and get no ETA until a service comes back. With none because they are
    /// all busy it keeps the last list (busy is not unavailable); before the first health check,
    /// all of them.
    async fn register(&self) -> Result<(), BrokerError> {
        let services = self.claimable().await;
        let checked = !self.health_status.lock().await.is_empty();
        let all_down = checked && self.healthy.lock().await.is_empty();
        let mut reg = self.config.registration.clone();
        let all: Vec<String> = self.connectors.keys().cloned().collect();
        for (service, names) in self.models.lock().await.iter() {
            reg.capabilities = reg.capabilities.with_reported_models(&all, service, names);
        }
        let mut advertised = self.advertised.lock().await;
        if !services.is_empty() {
            reg.services = services;
        } else if all_down {
            reg.services = Vec::new();
        } else if !advertised.is_empty() {
            reg.services = advertised.clone();
        }
        self.broker.register_worker(reg.clone()).await?;
        *advertised = reg.services;
        Ok(())
    }

    /// Re-registers when the claimable services differ from what the broker has (a service filled
    /// its slots or freed one). Single-service workers never need to: they just stop claiming.
    async fn advertise(&self, claimable: &[String]) -> Result<(), BrokerError> {
        let stale = *self.advertised.lock().await != claimable;
        if stale { self.register().await } else { Ok(()) }
    }

    /// Runs until `shutdown` fires, then drains and deregisters.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        // Subscribed before the first check, so a change seen after it is not missed.
        let signals: Vec<_> = self
            .connectors
            .iter()
            .filter_map(|(service, c)| c.health_signal().map(|rx| (service.clone(), rx)))
            .collect();
        // Visible at once with every connector `starting`; claiming starts only after the first
        // health check, so a connector that is down at start never claims a job.
        self.register().await?;
        for service in self.connectors.keys() {
            let report = ConnectorReport {
                service: service.clone(),
                status: ConnectorStatus::Starting,
                message: None,
                at: self.broker.clock().now_ms(),
                info: None,
            };
            if let Err(e) = self.broker.report_connector(self.id(), report).await {
                warn!(service = %service, error = %e, "connector report failed");
            }
        }
        self.check_health(None).await;
        if self.healthy.lock().await.is_empty() {
            // Every service was down at the first check: stop advertising them (that check saw
            // no change of availability to re-register for).
            if let Err(e) = self.register().await {
                warn!(error = %e, "re-registration failed");
            }
        }
        let span =
            info_span!("worker", worker_id = %self.id(), machine_id = %self.config.registration.machine_id);
        let background = CancellationToken::new();
        let presence = tokio::spawn(self.clone().presence_loop(background.clone()).instrument(span.clone()));
        let cancels = tokio::spawn(self.clone().signal_loop(background.clone()).instrument(span.clone()));
        let watches: Vec<_> = signals
            .into_iter()
            .map(|(service, rx)| {
                tokio::spawn(
                    self.clone().health_watch(service, rx, background.clone()).instrument(span.clone()),
                )
            })
            .collect();
        let result = self.claim_loop(&shutdown).instrument(span).await;
        background.cancel();
        let _ = presence.await;
        let _ = cancels.await;
        for w in watches {
            let _ = w.await;
        }
        if let Err(e) = self.broker.deregister_worker(self.id()).await {
            warn!(worker_id = %self.id(), error = %e, "deregistration failed");
        }
        result
    }

    async fn claim_loop(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        let mut jobs = JoinSet::new();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            while jobs.try_join_next().is_some() {}
            let claimable = self.claimable().await;
            if claimable.is_empty() {
                // Every connector is down or busy: wait for a slot, a health change or shutdown.
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.health_every) => {}
                }
                continue;
            }
            if let Err(e) = self.advertise(&claimable).await {
                warn!(error = %e, "re-registration failed");
            }
            let asked = std::time::Instant::now();
            match self.broker.claim(self.id(), self.config.claim_wait).await {
                Ok(Some(lease)) => {
                    let service = lease.job.summary.service.clone();
                    // With work waiting this is the broker's claim latency; when the queue was
                    // empty it includes the wait for a job to arrive (the claim long-polls).
                    metrics::histogram!("fleetq_claim_latency_seconds", "service" => service.clone())
                        .record(asked.elapsed().as_secs_f64());
                    *self.running.lock().await.entry(service.clone()).or_default() += 1;
                    let (me, stop) = (self.clone(), shutdown.clone());
                    jobs.spawn(async move {
                        me.report_activity(&service).await;
                        me.execute(lease, &stop).await;
                        if let Some(n) = me.running.lock().await.get_mut(&service) {
                            *n = n.saturating_sub(1);
                        }
                        me.wake.notify_one();
                        // Idle only if no next job starts meanwhile: a burst is one change.
                        tokio::time::sleep(ACTIVITY_SETTLE).await;
                        me.report_activity(&service).await;
                    });
                }
                Ok(None) => {}
                Err(BrokerError::UnknownWorker(_)) => {
                    warn!("the broker forgot this worker; registering again");
                    if let Err(e) = self.register().await {
                        break Err(e.into());
                    }
                }
                Err(e) => {
                    warn!(error = %e, "claim failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Drain: every running job finishes within the grace period or is released.
        while jobs.join_next().await.is_some() {}
        result
    }

    /// Hears the broker's cancel signals for this worker's jobs and fires the running job's token at
    /// once (its renewal would tell it too, up to 2 s later), until `stop` fires.
    async fn signal_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let heard = tokio::select! {
                () = stop.cancelled() => return,
                heard = self.broker.cancel_signals(self.id(), Duration::from_secs(5)) => heard,
            };
            match heard {
                Ok(ids) => {
                    let running = self.cancels.lock().map(|m| m.clone()).unwrap_or_default();
                    for id in ids {
                        if let Some(token) = running.get(&id) {
                            token.cancel();
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "listening for cancel signals failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Checks `service` as soon as its connector signals a change it saw by itself (a socket lost
    /// or restored) rather than at the next health tick; a burst of signals is one check.
    async fn health_watch(
        self: Arc<Self>,
        service: String,
        mut signal: tokio::sync::watch::Receiver<u64>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = signal.changed() => if changed.is_err() { return },
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(ACTIVITY_SETTLE) => {}
            }
            signal.borrow_and_update();
            self.check_health(Some(&service)).await;
        }
    }

    /// Heartbeats and connector health checks until `stop` fires.
    async fn presence_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_every);
        let mut health = tokio::time::interval(self.config.health_every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = heartbeat.tick() => {
                    match self.broker.heartbeat(self.id()).await {
                        Err(BrokerError::UnknownWorker(_)) => {
                            if let Err(e) = self.register().await {
                                warn!(error = %e, "re-registration failed");
                            }
                        }
                        Err(e) => warn!(error = %e, "heartbeat failed"),
                        Ok(()) => {}
                    }
                }
                _ = health.tick() => self.check_health(None).await,
            }
        }
    }

    /// Records whether `service` may be claimed for, from its connector's health. Returns true when
    /// that changed.
    async fn mark_usable(&self, service: &str, health: &fleetq_connectors::Health) -> bool {
        let usable = matches!(health.status, ConnectorStatus::Idle | ConnectorStatus::Active);
        let mut healthy = self.healthy.lock().await;
        if usable { healthy.insert(service.to_owned()) } else { healthy.remove(service) }
    }

    /// Reports `service` `active` while this worker runs a job of it and `idle` once none runs — at
    /// once, not at the next health check — when that check found it usable. An unchanged status
    /// sends nothing.
    async fn report_activity(&self, service: &str) {
        // Held until the report is sent: reports of one worker go out in the order they are
        // decided, so a health check's and an activity change's never overtake each other.
        let mut last = self.last_report.lock().await;
        let running = self.running.lock().await.get(service).copied().unwrap_or(0);
        // Only a usable service changes with activity; an unhealthy one is the health check's.
        let Some(health) = self.health_status.lock().await.get(service).copied() else { return };
        if !matches!(health, ConnectorStatus::Idle | ConnectorStatus::Active) {
            return;
        }
        let Some(report) = last.get_mut(service) else { return };
        // A connector's `active` counts this worker's jobs; a check during one said so, but the
        // count is ours to know now (the next check says what the connector thinks).
        let status = if running > 0 { ConnectorStatus::Active } else { ConnectorStatus::Idle };
        if report.status == status {
            return;
        }
        report.status = status;
        report.at = self.broker.clock().now_ms();
        let report = report.clone();
        if let Err(e) = self.broker.report_connector(self.id(), report).await {
            warn!(service = %service, error = %e, "connector report failed");
        }
    }

    /// Checks every connector (or only `only`) and reports each one to the broker — every time, so
    /// the report's time stays fresh (the broker events only changes) — then re-registers when the
    /// set of usable services changed. A usable connector with one of this worker's jobs running is
    /// `active` whatever its own count says (the two may not agree for a moment).
    async fn check_health(&self, only: Option<&str>) {
        let mut changed_availability = false;
        for (service, connector) in &self.connectors {
            if only.is_some_and(|o| o != service) {
                continue;
            }
            let h = connector.health().await;
            changed_availability |= self.mark_usable(service, &h).await;
            if let Some(names) = &h.models {
                let mut models = self.models.lock().await;
                if models.get(service) != Some(names) {
                    info!(service = %service, models = names.len(), "the service's models changed");
                    models.insert(service.clone(), names.clone());
                    changed_availability = true;
                }
            }
            let now = (h.status, h.message.clone());
            let previous = self.reported.lock().await.insert(service.clone(), now.clone());
            if previous.as_ref() != Some(&now) {
                // `note`, not `message`: a field named `message` would collide with the event's own.
                let note = h.message.as_deref().unwrap_or("");
                info!(service = %service, connector_id = %service, status = h.status.as_str(), note, "connector status");
            }
            // Held until sent (see `report_activity`).
            let mut last = self.last_report.lock().await;
            let running = self.running.lock().await.get(service).copied().unwrap_or(0);
            self.health_status.lock().await.insert(service.clone(), h.status);
            let status = match h.status {
                ConnectorStatus::Idle if running > 0 => ConnectorStatus::Active,
                other => other,
            };
            let report = ConnectorReport {
                service: service.clone(),
                status,
                message: h.message,
                at: self.broker.clock().now_ms(),
                info: h.info,
            };
            last.insert(service.clone(), report.clone());
            if let Err(e) = self.broker.report_connector(self.id(), report).await {
                warn!(service = %service, error = %e, "connector report failed");
            }
            drop(last);
        }
        if changed_availability {
            let services = self.healthy.lock().await.clone();
            let services = services.iter().map(String::as_str).collect::<Vec<_>>().join(",");
            info!(services, "registering the services whose connectors are healthy, with their models");
            if let Err(e) = self.register().await {
                warn!(error = %e, "re-registration failed");
            }
            self.wake.notify_one();
        }
    }

    /// Runs one claimed job under supervision and ends its attempt in the broker.
    async fn execute(&self, lease: Lease, shutdown: &CancellationToken) {
        let lref = lease.as_ref();
        let service = lease.job.summary.service.clone();
        // `connector_id` names the connector instance: one per service on a worker.
        let span = info_span!("job", job_id = %lref.job_id, attempt = lref.attempt, service = %service, connector_id = %service, worker_id = %self.id());
        async {
            let Some(connector) = self.connectors.get(&service).cloned() else {
                // Cannot happen while registrations list only loaded connectors; give it back.
                let _ = self.broker.release(&lref, "no connector").await;
                return;
            };
            let spec = &lease.job.spec;
            let started = Instant::now();
            let overall = spec.timeout_ms.map(|ms| started + Duration::from_millis(ms));
            let quiet = spec.progress_timeout_ms.map(Duration::from_millis).or(self.config.default_progress_timeout);
            let cancel = CancellationToken::new();
            let signalled = CancellationToken::new();
            if let Ok(mut m) = self.cancels.lock() {
                m.insert(lref.job_id.clone(), signalled.clone());
            }
            let (sink, mut progress) = ProgressSink::channel();
            let mut work = {
                let (job, cancel) = (lease.job.clone(), cancel.clone());
                tokio::spawn(async move { connector.process(&job, sink, cancel).await })
            };
            // Renew at a third of the lease actually granted (the deadline is what counts: it
            // already lost the claim's round trip).
            let granted_ms = (lease.deadline_ms - self.broker.clock().now_ms()).clamp(30, self.broker.config().lease_ms.max(30));
            // At most every 2 s: a renewal is also how a quiet job hears that it was cancelled.
            let renew_every = Duration::from_millis((granted_ms / 3).min(2000) as u64);
            let mut renew = tokio::time::interval_at(started + renew_every, renew_every);
            let mut last_sign = started;
            let mut stop: Option<Stop> = None;
            let mut grace: Option<Instant> = None;
            let far = started + Duration::from_secs(100 * 365 * 24 * 3600);
            let outcome = loop {
                let interrupt_by = stop.map(|_| last_sign.max(Instant::now()) + self.config.interrupt_grace);
                tokio::select! {
                    res = &mut work => break Some(res),
                    Some((p, message)) = progress.recv() => {
                        last_sign = Instant::now();
                        let state = self.broker.progress(&lref, p, message).await;
                        self.on_lease_state(state, &mut stop, &cancel);
                    }
                    _ = renew.tick() => {
                        let state = self.broker.renew(&lref).await;
                        self.on_lease_state(state, &mut stop, &cancel);
                    }
                    () = signalled.cancelled(), if stop.is_none() => {
                        info!("cancel signalled; interrupting the service");
                        stop = Some(Stop::Cancelled);
                        cancel.cancel();
                    }
                    () = sleep_until(overall.unwrap_or(far)), if stop.is_none() && overall.is_some() => {
                        stop = Some(Stop::Timeout);
                        cancel.cancel();
                    }
                    () = sleep_until(quiet.map_or(far, |q| last_sign + q)), if stop.is_none() && quiet.is_some() => {
                        stop = Some(Stop::ProgressTimeout);
                        cancel.cancel();
                    }
                    () = shutdown.cancelled(), if grace.is_none() => {
                        grace = Some(Instant::now() + self.config.shutdown_grace);
                    }
                    () = sleep_until(grace.unwrap_or(far)), if stop.is_none() && grace.is_some() => {
                        stop = Some(Stop::Shutdown);
                        cancel.cancel();
                    }
                    () = sleep_until(interrupt_by.unwrap_or(far)), if interrupt_by.is_some() => {
                        warn!("connector ignored the interrupt; aborting it");
                        work.abort();
                        break None;
                    }
                }
            };
            if let Ok(mut m) = self.cancels.lock() {
                m.remove(&lref.job_id);
            }
            let offline = matches!(&outcome, Some(Ok(Err(e))) if e.category == FailureCategory::Connection);
            self.finish(&lref, &lease.job.spec, stop, outcome, started).await;
            if offline {
                // Look at the service now rather than at the next health tick, so this worker
                // stops claiming for it before it takes the job (or another one) again.
                self.check_health(Some(&service)).await;
            }
        }
        .instrument(span)
        .await;
    }

    fn on_lease_state(
        &self,
        state: Result<LeaseState, BrokerError>,
        stop: &mut Option<Stop>,
        cancel: &CancellationToken,
    ) {
        match state {
            Ok(s) if s.cancel_requested && stop.is_none() => {
                info!("cancel requested; interrupting the service");
                *stop = Some(Stop::Cancelled);
                cancel.cancel();
            }
            Ok(_) => {}
            Err(BrokerError::LeaseLost(_) | BrokerError::JobNotFound(_)) => {
                warn!("lease lost; the result will be dropped");
                *stop = Some(Stop::LeaseLost);
                cancel.cancel();
            }
            Err(e) => warn!(error = %e, "lease renewal failed; retrying at the next tick"),
        }
    }

    async fn finish(
        &self,
        lease: &LeaseRef,
        spec: &JobSpec,
        stop: Option<Stop>,
        outcome: Option<Result<Result<serde_json::Value, JobError>, tokio::task::JoinError>>,
        started: Instant,
    ) {
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(category) = failure_category(stop, &outcome) {
            metrics::counter!("fleetq_worker_job_failures_total", "service" => spec.service.clone(), "category" => category.as_str())
                .increment(1);
            info!(category = category.as_str(), "job attempt failed");
        }
        // The attempt's end is retried through backend outages (a Redis restart, a network blip):
        // giving up would lose a finished result and rerun the job. A definite answer (done,
        // LeaseLost, …) ends the loop; so does the lease running out, after which the job is
        // someone else's anyway.
        let give_up = Instant::now() + Duration::from_millis(self.broker.config().lease_ms.max(1000) as u64);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let result = self.end_attempt(lease, spec, stop, &outcome, elapsed_ms).await;
            match result {
                Ok(()) => {
                    info!(elapsed_ms, stop = stop.map_or("none", Stop::as_str), "job attempt ended");
                    return;
                }
                Err(e) if e.is_transient() && Instant::now() < give_up => {
                    warn!(error = %e, "could not end the job attempt; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    warn!(error = %e, stop = stop.map_or("none", Stop::as_str), "could not end the job attempt; its lease will expire");
                    return;
                }
            }
        }
    }

    /// One try at ending the attempt the way `stop`/`outcome` say.
    async fn end_attempt(
        &self,
        lease: &LeaseRef,
        spec: &JobSpec,
        stop: Option<Stop>,
        outcome: &Option<Result<Result<serde_json::Value, JobError>, tokio::task::JoinError>>,
        elapsed_ms: u64,
    ) -> Result<(), BrokerError> {
        match (stop, outcome) {
            (Some(Stop::LeaseLost), _) => Ok(()),
            // Stopped too late: the service finished the work (a ComfyUI interrupt lands only
            // between nodes). Its result is real; record it rather than drop it and run it again.
            (Some(stop), Some(Ok(Ok(value)))) => {
                warn!(
                    stop = stop.as_str(),
                    "the service finished the job before it could be stopped; recording its result"
                );
                self.broker.complete(lease, value.clone()).await
            }
            (Some(Stop::Shutdown), _) => self.broker.release(lease, "shutdown").await.map(drop),
            (Some(Stop::ProgressTimeout), _) => {
                self.broker.release(lease, "progress_timeout").await.map(drop)
            }
            (Some(Stop::Timeout), _) => {
                let error =
                    JobError::retryable(FailureCategory::Timeout, format!("timed out after {elapsed_ms} ms"));
                self.broker.fail(lease, error).await.map(drop)
            }
            (Some(Stop::Cancelled), _) => {
                let error = JobError::fatal(FailureCategory::Cancelled, "cancelled");
                self.broker.fail(lease, error).await.map(drop)
            }
            (None, Some(Ok(Ok(value)))) => self.broker.complete(lease, value.clone()).await,
            // The service went away under the job: give it back for a healthy worker instead of
            // spending one of its attempts.
            (None, Some(Ok(Err(e)))) if e.category == FailureCategory::Connection => {
                warn!(error = %e.message, "service offline; releasing the job");
                self.broker.release(lease, fleetq_broker::RELEASE_SERVICE_OFFLINE).await.map(drop)
            }
            (None, Some(Ok(Err(e)))) if e.category == FailureCategory::Oom && e.retryable => {
                self.after_oom(lease, spec, e).await
            }
            (None, Some(Ok(Err(e)))) => self.broker.fail(lease, e.clone()).await.map(drop),
            (None, Some(Err(panic))) => {
                let error =
                    JobError::retryable(FailureCategory::Internal, format!("connector crashed: {panic}"));
                self.broker.fail(lease, error).await.map(drop)
            }
            (None, None) => self.broker.release(lease, "connector_stuck").await.map(drop),
        }
    }
}

impl<B: Broker> Worker<B> {
    /// Out of memory (the connector already tried once more after freeing memory): the job may
    /// run again only on a worker with more GPU memory than this one ([`fleetq_core::oom`]), and
    /// only if the fleet has such a worker; else it fails now, saying why.
    async fn after_oom(&self, lease: &LeaseRef, spec: &JobSpec, e: &JobError) -> Result<(), BrokerError> {
        let fatal = |why: String| JobError {
            message: format!("{}; {why}", e.message),
            retryable: false,
            ..e.clone()
        };
        let mine = self.config.registration.capabilities.lookup(GPU_MEMORY_PATH);
        let raised = match raised_requirements(&spec.requirements, mine, e.alloc_bytes) {
            Ok(raised) => raised,
            Err(why) => return self.broker.fail(lease, fatal(why)).await.map(drop),
        };
        let need = raised.positive.get(GPU_MEMORY_PATH).cloned().unwrap_or_default();
        let next = JobSpec { requirements: raised.clone(), ..spec.clone() };
        let fleet = self.broker.workers().await?;
        if fleet.iter().any(|w| fleetq_core::explain(&w.registration, &next).matches) {
            info!(gpu_memory_gb = %need, "out of memory; the job will run again only on a worker with more memory");
            self.broker.fail_requiring(lease, e.clone(), raised).await.map(drop)
        } else {
            let why = format!(
                "it needs a worker with at least {need} GiB of GPU memory ({GPU_MEMORY_PATH}) and no worker of the fleet that serves it has that"
            );
            self.broker.fail(lease, fatal(why)).await.map(drop)
        }
    }
}

/// The failure category of an attempt's end, if it did not succeed.
fn failure_category(
    stop: Option<Stop>,
    outcome: &Option<Result<Result<serde_json::Value, JobError>, tokio::task::JoinError>>,
) -> Option<FailureCategory> {
    match (stop, outcome) {
        (Some(Stop::LeaseLost), _) => Some(FailureCategory::LeaseExpired),
        (Some(Stop::Shutdown), _) | (_, Some(Ok(Ok(_)))) => None,
        (Some(Stop::ProgressTimeout), _) => Some(FailureCategory::ProgressTimeout),
        (Some(Stop::Timeout), _) => Some(FailureCategory::Timeout),
        (Some(Stop::Cancelled), _) => Some(FailureCategory::Cancelled),
        (None, Some(Ok(Err(e)))) => Some(e.category),
        (None, Some(Err(_)) | None) => Some(FailureCategory::Internal),
    }
}
