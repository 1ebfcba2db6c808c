//! The worker's loops: claim, supervise, heartbeat, health. What they share is one [`Known`]
//! behind one lock; how an attempt ends is [`verdict`]'s rule.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::{Broker, BrokerError, Lease, LeaseRef, LeaseState};
use fleetq_connectors::{CancellationToken, Connector, ProgressSink};
use fleetq_core::backoff::Backoff;
use fleetq_core::oom::{GPU_MEMORY_PATH, raised_requirements};
use fleetq_core::{
    ConnectorReport, ConnectorStatus, FailureCategory, JobError, JobSpec, ValidationError, WorkerRegistration,
};
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, info, info_span, warn};

use crate::state::Known;
use crate::verdict::{Action, Ending, Stop, verdict};

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

/// How long a service's last job must have ended before it is reported `idle` (a next job that
/// starts meanwhile keeps it `active`: one change, not two).
const ACTIVITY_SETTLE: Duration = Duration::from_millis(50);

/// A worker: a broker, its connectors (one per service) and its configuration.
#[derive(Debug)]
pub struct Worker<B: Broker> {
    broker: Arc<B>,
    connectors: BTreeMap<String, Arc<dyn Connector>>,
    config: WorkerConfig,
    /// What the loops share. A std mutex, held only to read or change it and never across an
    /// `.await` (no I/O happens under it), so it cannot stall a loop.
    known: std::sync::Mutex<Known>,
    /// Held from deciding a connector report to sending it, so that one worker's reports reach
    /// the broker in the order they were decided (a health check's and an activity change's never
    /// overtake each other).
    report_order: tokio::sync::Mutex<()>,
    /// Held from computing a registration to sending it, for the same reason.
    register_order: tokio::sync::Mutex<()>,
    /// Woken when a job ends (a slot frees up) or health changes.
    wake: Notify,
}

impl<B: Broker> Worker<B> {}

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
        let known = std::sync::Mutex::new(Known::new(map.keys()));
        Ok(Self {
            broker,
            connectors: map,
            config,
            known,
            report_order: tokio::sync::Mutex::new(()),
            register_order: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }

    /// The shared state, for a moment. A poisoned lock (a panic while it was held) still holds
    /// consistent data: every change under it is a plain assignment.
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn limit(&self, service: &str) -> usize {
        self.config.max_concurrent.get(service).copied().unwrap_or(1).max(1)
    }

    /// Healthy services with a free slot: what this worker may claim for now.
    fn claimable(&self) -> Vec<String> {
        self.known().claimable(|s| self.limit(s))
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
        let _order = self.register_order.lock().await;
        let mut reg = self.config.registration.clone();
        {
            let known = self.known();
            let services = known.claimable(|s| self.limit(s));
            let all_down = known.checked() && known.usable().is_empty();
            let all: Vec<String> = self.connectors.keys().cloned().collect();
            for (service, s) in &known.services {
                if let Some(names) = &s.models {
                    reg.capabilities = reg.capabilities.with_reported_models(&all, service, names);
                }
            }
            if !services.is_empty() {
                reg.services = services;
            } else if all_down {
                reg.services = Vec::new();
            } else if !known.advertised.is_empty() {
                reg.services = known.advertised.clone();
            }
        }
        self.broker.register_worker(reg.clone()).await?;
        self.known().advertised = reg.services;
        Ok(())
    }

    /// Re-registers when the claimable services differ from what the broker has (a service filled
    /// its slots or freed one). Single-service workers never need to: they just stop claiming.
    async fn advertise(&self, claimable: &[String]) -> Result<(), BrokerError> {
        let stale = self.known().advertised != claimable;
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
        let none_usable = self.known().usable().is_empty();
        if none_usable {
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
            let claimable = self.claimable();
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
                    self.known().service(&service).running += 1;
                    let (me, stop) = (self.clone(), shutdown.clone());
                    jobs.spawn(async move {
                        me.report_activity(&service).await;
                        me.execute(lease, &stop).await;
                        {
                            let mut known = me.known();
                            let s = known.service(&service);
                            s.running = s.running.saturating_sub(1);
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
                    let known = self.known();
                    for id in ids {
                        if let Some(token) = known.cancels.get(&id) {
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

    /// Reports `service` `active` while this worker runs a job of it and `idle` once none runs — at
    /// once, not at the next health check — when that check found it usable. An unchanged status
    /// sends nothing.
    async fn report_activity(&self, service: &str) {
        let _order = self.report_order.lock().await;
        let report = {
            let mut known = self.known();
            let s = known.service(service);
            // Only a usable service changes with activity; an unhealthy one is the health check's.
            if !s.usable() {
                return;
            }
            let status = if s.running > 0 { ConnectorStatus::Active } else { ConnectorStatus::Idle };
            let Some(report) = s.last_report.as_mut() else { return };
            if report.status == status {
                return;
            }
            report.status = status;
            report.at = self.broker.clock().now_ms();
            report.clone()
        };
        if let Err(e) = self.broker.report_connector(self.id(), report).await {
            warn!(service = %service, error = %e, "connector report failed");
        }
    }

    /// Checks every connector (or only `only`) and reports each one to the broker — every time, so
    /// the report's time stays fresh (the broker events only changes) — then re-registers when the
    /// set of usable services or their models changed.
    async fn check_health(&self, only: Option<&str>) {
        let mut changed_availability = false;
        for (service, connector) in &self.connectors {
            if only.is_some_and(|o| o != service) {
                continue;
            }
            let h = connector.health().await;
            let _order = self.report_order.lock().await;
            let report = {
                let mut known = self.known();
                let s = known.service(service);
                let was_usable = s.usable();
                s.health = Some(h.status);
                changed_availability |= s.usable() != was_usable;
                if let Some(names) = &h.models
                    && s.models.as_ref() != Some(names)
                {
                    info!(service = %service, models = names.len(), "the service's models changed");
                    s.models = Some(names.clone());
                    changed_availability = true;
                }
                let now = (h.status, h.message.clone());
                if s.logged.as_ref() != Some(&now) {
                    // `note`, not `message`: a field named `message` would collide with the event's own.
                    let note = h.message.as_deref().unwrap_or("");
                    info!(service = %service, connector_id = %service, status = h.status.as_str(), note, "connector status");
                    s.logged = Some(now);
                }
                let report = ConnectorReport {
                    service: service.clone(),
                    status: s.status_to_report(h.status),
                    message: h.message,
                    at: self.broker.clock().now_ms(),
                    info: h.info,
                };
                s.last_report = Some(report.clone());
                report
            };
            if let Err(e) = self.broker.report_connector(self.id(), report).await {
                warn!(service = %service, error = %e, "connector report failed");
            }
        }
        if changed_availability {
            let services = self.known().usable().join(",");
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
            self.known().cancels.insert(lref.job_id.clone(), signalled.clone());
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
            let ending = loop {
                let interrupt_by = stop.map(|_| last_sign.max(Instant::now()) + self.config.interrupt_grace);
                tokio::select! {
                    res = &mut work => break match res {
                        Ok(Ok(value)) => Ending::Done(value),
                        Ok(Err(e)) => Ending::Failed(e),
                        Err(panic) => Ending::Crashed(panic.to_string()),
                    },
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
                        break Ending::Stuck;
                    }
                }
            };
            self.known().cancels.remove(&lref.job_id);
            let offline = matches!(&ending, Ending::Failed(e) if e.category == FailureCategory::Connection);
            self.finish(&lref, &lease.job.spec, stop, ending, started).await;
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

    /// Ends the attempt as [`verdict`] says, retried through backend outages.
    async fn finish(
        &self,
        lease: &LeaseRef,
        spec: &JobSpec,
        stop: Option<Stop>,
        ending: Ending,
        started: Instant,
    ) {
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let verdict = verdict(stop, ending, elapsed_ms);
        if let Some(category) = verdict.failure {
            metrics::counter!("fleetq_worker_job_failures_total", "service" => spec.service.clone(), "category" => category.as_str())
                .increment(1);
            info!(category = category.as_str(), "job attempt failed");
        }
        if let (Some(stop), Action::Complete(_)) = (stop, &verdict.action) {
            warn!(
                stop = stop.as_str(),
                "the service finished the job before it could be stopped; recording its result"
            );
        }
        // The attempt's end is retried through backend outages (a Redis restart, a network blip):
        // giving up would lose a finished result and rerun the job. A definite answer (done,
        // LeaseLost, …) ends the loop; so does the lease running out, after which the job is
        // someone else's anyway.
        let give_up = Instant::now() + Duration::from_millis(self.broker.config().lease_ms.max(1000) as u64);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            match self.end_attempt(lease, spec, &verdict.action).await {
                Ok(()) => {
                    info!(elapsed_ms, stop = stop.map_or("none", Stop::as_str), "job attempt ended");
                    return;
                }
                // Not confirmed by a replica: the end is on the primary, which a failover may
                // lose; told again (the lease fences it), it is kept either way.
                Err(e)
                    if (e.is_transient() || matches!(e, BrokerError::NotReplicated { .. }))
                        && Instant::now() < give_up =>
                {
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

    /// One try at telling the broker `action`.
    async fn end_attempt(
        &self,
        lease: &LeaseRef,
        spec: &JobSpec,
        action: &Action,
    ) -> Result<(), BrokerError> {
        match action {
            Action::Drop => Ok(()),
            Action::Complete(value) => self.broker.complete(lease, value.clone()).await,
            Action::Release(reason) => {
                if *reason == fleetq_broker::RELEASE_SERVICE_OFFLINE {
                    warn!("service offline; releasing the job");
                }
                self.broker.release(lease, reason).await.map(drop)
            }
            Action::Fail(error) => self.broker.fail(lease, error.clone()).await.map(drop),
            Action::AfterOom(error) => self.after_oom(lease, spec, error).await,
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
