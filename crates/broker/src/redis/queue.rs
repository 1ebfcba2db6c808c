//! The queue on Redis: each operation one `FCALL` of the function library (claims block on the
//! wake-up list, not by polling).

use super::*;

impl Queue for RedisBroker {
    async fn submit(&self, mut spec: JobSpec) -> Result<Submitted> {
        spec.admit(&self.config.limits)?;
        let mut out = self.submit_valid(std::slice::from_ref(&spec)).await?;
        out.pop().ok_or_else(|| corrupt("submit returned nothing"))
    }

    async fn submit_batch(&self, mut specs: Vec<JobSpec>) -> Result<Vec<Submitted>> {
        fleetq_core::admit_batch(&mut specs, &self.config.limits)?;
        self.submit_valid(&specs).await
    }

    async fn claim(&self, worker_id: &str, wait: Duration) -> Result<Option<Lease>> {
        let deadline = Instant::now() + wait;
        loop {
            let class = match self.try_claim(worker_id).await? {
                ClaimReply::Job(lease) => return Ok(Some(*lease)),
                ClaimReply::Unknown => return Err(BrokerError::UnknownWorker(worker_id.to_owned())),
                ClaimReply::Empty(class) => class,
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let slice = (deadline - now).min(Duration::from_millis(self.config.claim_recheck_ms));
            self.wait_wake(&[self.key(&format!("wake:c:{class}"))], slice).await?;
        }
    }

    async fn renew(&self, lease: &LeaseRef) -> Result<LeaseState> {
        self.renew_inner(lease, None).await
    }

    async fn progress(&self, lease: &LeaseRef, progress: f64, message: Option<String>) -> Result<LeaseState> {
        let progress = crate::check_progress(progress)?;
        self.renew_inner(lease, Some((progress, message))).await
    }

    async fn complete(&self, lease: &LeaseRef, result: Json) -> Result<()> {
        self.complete_inner(lease, result, false).await.map(|_| ())
    }

    async fn complete_and_claim(&self, lease: &LeaseRef, result: Json) -> Result<Option<Lease>> {
        self.complete_inner(lease, result, true).await
    }

    async fn fail(&self, lease: &LeaseRef, error: JobError) -> Result<FailOutcome> {
        self.give_back(lease, error, true, "retry", false).await
    }

    async fn fail_requiring(
        &self,
        lease: &LeaseRef,
        error: JobError,
        requirements: Requirements,
    ) -> Result<FailOutcome> {
        let Some(job) = self.job(&lease.job_id).await? else {
            return Err(BrokerError::JobNotFound(lease.job_id.clone()));
        };
        let mut spec = job.spec;
        spec.requirements = requirements;
        let pspec = PartitionSpec::of(&spec);
        let cancel = JobError::fatal(fleetq_core::FailureCategory::Cancelled, "cancelled");
        // A stale class view is refreshed and the call made again (nothing was written).
        for fresh in [false, true, true, true] {
            let view = self.view(fresh).await?;
            let mut cmd = self.fcall("fq_fail_requiring", false);
            Self::fenced(&mut cmd, self.now(), lease);
            cmd.arg(to_json(&error)?)
                .arg(to_json(&Outcome::Error { error: error.clone() })?)
                .arg(to_json(&Outcome::Error { error: cancel.clone() })?)
                .arg(&view.cver)
                .arg(&pspec.key().0)
                .arg(to_json(&pspec)?)
                .arg(view.matching(&pspec))
                .arg(stored_spec(&spec)?);
            let reply = items(self.run(&cmd).await?);
            if text(reply.first().unwrap_or(&Value::Nil)).as_deref() != Some("refresh") {
                return Self::fail_outcome(&reply, lease);
            }
        }
        Err(corrupt("the worker classes kept changing under a failing job"))
    }

    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<FailOutcome> {
        self.give_back(lease, crate::release_error(reason), false, reason, crate::release_refunds(reason))
            .await
    }

    async fn cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let mut cmd = self.fcall("fq_cancel", false);
        cmd.arg(self.now()).arg(&id.0);
        match text(&self.run(&cmd).await?).as_deref() {
            Some("cancelled") => Ok(CancelOutcome::Cancelled),
            Some("requested") => Ok(CancelOutcome::Requested),
            Some("finished") => Ok(CancelOutcome::AlreadyFinished),
            Some("missing") => Err(BrokerError::JobNotFound(id.clone())),
            other => Err(corrupt(format!("cancel reply {other:?}"))),
        }
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let mut cmd = self.fcall("fq_retry", false);
        cmd.arg(self.now()).arg(&id.0);
        let mut reply = text(&self.run(&cmd).await?);
        // Its partition was removed when it finished: match it again and recreate it.
        for fresh in [false, true, true, true] {
            if !matches!(reply.as_deref(), Some("partition" | "refresh")) {
                break;
            }
            let Some(job) = self.job(id).await? else { return Err(BrokerError::JobNotFound(id.clone())) };
            let pspec = PartitionSpec::of(&job.spec);
            let view = self.view(fresh).await?;
            let mut cmd = self.fcall("fq_retry", false);
            cmd.arg(self.now()).arg(&id.0).arg(&view.cver).arg(to_json(&pspec)?).arg(view.matching(&pspec));
            reply = text(&self.run(&cmd).await?);
        }
        match reply.as_deref() {
            Some("ok") => Ok(()),
            Some("missing") => Err(BrokerError::JobNotFound(id.clone())),
            Some(status) => match JobStatus::parse(status) {
                Some(from) => Err(IllegalTransition { from, action: fleetq_core::Action::Retry }.into()),
                None => Err(corrupt(format!("retry reply {status:?}"))),
            },
            None => Err(corrupt("retry reply")),
        }
    }

    async fn reap(&self) -> Result<ReapReport> {
        let mut cmd = self.fcall("fq_reap", false);
        cmd.arg(self.now());
        let reply = items(self.run(&cmd).await?);
        let n = |i: usize| -> Result<usize> { text_at(&reply, i, "reap count")?.parse().map_err(corrupt) };
        let report = ReapReport {
            requeued: n(0)?,
            finished: n(1)?,
            promoted: n(2)?,
            workers_expired: n(3)?,
            events_trimmed: n(4)?,
        };
        if n(5)? > 0 {
            self.evaluate_workability().await?;
        }
        Ok(report)
    }

    /// A full pass over the live partitions (a page per call). Flags are kept up to date as
    /// partitions and classes come and go; this pass runs when a class was dropped, and repairs.
    async fn pause_service(&self, service: &str, paused: bool) -> Result<bool> {
        fleetq_core::validate::check_name("service", service)?;
        let event = EventKind::ServicePaused { service: service.to_owned(), paused };
        let mut cmd = self.fcall("fq_pause", false);
        cmd.arg(self.now()).arg(service).arg(if paused { "1" } else { "0" }).arg(to_json(&event)?);
        Ok(matches!(self.run(&cmd).await?, Value::Int(1)))
    }

    async fn paused_services(&self) -> Result<std::collections::BTreeSet<String>> {
        let mut cmd = redis::cmd("HKEYS");
        cmd.arg(self.key("paused"));
        Ok(items(self.run(&cmd).await?).iter().filter_map(text).collect())
    }

    async fn evaluate_workability(&self) -> Result<usize> {
        for fresh in [true, true, true, true] {
            let view = self.view(fresh).await?;
            let mut changed = 0;
            let mut cursor = "0".to_owned();
            let stale = loop {
                let (next, specs) = self.partition_page(&cursor).await?;
                if !specs.is_empty() {
                    let mut cmd = self.fcall("fq_workability", false);
                    cmd.arg(self.now()).arg(&view.cver).arg(specs.len());
                    for (key, spec) in &specs {
                        let unworkable = !view.served(spec);
                        cmd.arg(key).arg(if unworkable { "1" } else { "0" });
                    }
                    match self.run(&cmd).await? {
                        Value::Int(n) => changed += usize::try_from(n).unwrap_or(0),
                        _ => break true,
                    }
                }
                if next == "0" {
                    break false;
                }
                cursor = next;
            };
            if !stale {
                return Ok(changed);
            }
        }
        Err(corrupt("worker classes kept changing under a workability pass"))
    }
}
