//! Conformance cases: attempts.

use super::*;

/// A retryable failure waits out its backoff and keeps its place in the order.
pub(super) async fn retry_backoff_keeps_place<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut first = sim(json!("first"));
    first.retry_backoff_ms = Some(2_000);
    let id = b.submit(first).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    let out = b
        .fail(&lease.as_ref(), JobError::retryable(FailureCategory::Connection, "down"))
        .await
        .expect("fail");
    assert_eq!(out, FailOutcome::Retrying { run_at: crate::testing::T0 + 2_000 });
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Pending);
    assert_eq!(rec.summary.error.as_ref().map(|e| e.category), Some(FailureCategory::Connection));
    fx.clock.advance(1);
    let later = b.submit(sim(json!("later"))).await.expect("submit").id;
    let meanwhile = claim_now(b, "w").await.expect("the later job runs during the backoff");
    assert_eq!(meanwhile.job.summary.id, later);
    b.complete(&meanwhile.as_ref(), json!(null)).await.expect("complete");
    b.submit(sim(json!("latest"))).await.expect("submit");
    fx.clock.advance(2_000);
    // The only worker gets its own retry (no other worker matches), ahead of the newer job.
    let retried = claim_now(b, "w").await.expect("claim after backoff");
    assert_eq!(retried.job.summary.id, id);
    assert_eq!(retried.attempt, 2);
}

/// A retried job goes to another matching worker when there is one.
pub(super) async fn retry_prefers_another_worker<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("a", &["simulation"], json!({}))).await.expect("reg");
    b.register_worker(worker("b", &["simulation"], json!({}))).await.expect("reg");
    let mut spec = sim(json!(1));
    spec.retry_backoff_ms = Some(0);
    let id = b.submit(spec).await.expect("submit").id;
    let lease = claim_now(b, "a").await.expect("claim");
    b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Service, "oom")).await.expect("fail");
    assert!(claim_now(b, "a").await.is_none(), "the failing worker does not get it straight back");
    let other = claim_now(b, "b").await.expect("another worker takes it");
    assert_eq!(other.job.summary.id, id);
    b.fail(&other.as_ref(), JobError::retryable(FailureCategory::Service, "oom")).await.expect("fail");
    fx.clock.advance(b.config().retry_avoid_ms);
    let back = claim_now(b, "b").await.expect("after the avoidance window anyone may take it");
    assert_eq!(back.attempt, 3);
}

/// Attempts run out, and a fatal error fails at once.
pub(super) async fn attempts_exhausted_and_fatal_errors_fail<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut spec = sim(json!("retry"));
    spec.max_attempts = 2;
    spec.retry_backoff_ms = Some(0);
    let id = b.submit(spec).await.expect("submit").id;
    let l1 = claim_now(b, "w").await.expect("claim");
    let r = b.fail(&l1.as_ref(), JobError::retryable(FailureCategory::Service, "1")).await.expect("fail");
    assert!(matches!(r, FailOutcome::Retrying { .. }));
    let l2 = claim_now(b, "w").await.expect("only worker retakes it");
    let r = b.fail(&l2.as_ref(), JobError::retryable(FailureCategory::Service, "2")).await.expect("fail");
    assert_eq!(r, FailOutcome::Failed);
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Failed);
    assert_eq!(rec.summary.attempt, 2);
    assert!(matches!(rec.outcome, Some(fleetq_core::Outcome::Error { ref error }) if error.message == "2"));
    let fatal = b.submit(sim(json!("fatal"))).await.expect("submit").id;
    let l = claim_now(b, "w").await.expect("claim");
    let r = b
        .fail(&l.as_ref(), JobError::fatal(FailureCategory::Validation, "bad workflow"))
        .await
        .expect("fail");
    assert_eq!(r, FailOutcome::Failed);
    assert_eq!(status(b, &fatal).await, JobStatus::Failed);
    // Lease expiry with no attempts left fails too.
    let mut once = sim(json!("once"));
    once.max_attempts = 1;
    let once = b.submit(once).await.expect("submit").id;
    claim_now(b, "w").await.expect("claim");
    fx.clock.advance(b.config().lease_ms + 1);
    assert_eq!(b.reap().await.expect("reap").finished, 1);
    let rec = b.job(&once).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Failed);
    assert_eq!(rec.summary.error.map(|e| e.category), Some(FailureCategory::LeaseExpired));
}

/// Pending jobs cancel at once; running ones after the worker hears of it.
pub(super) async fn cancel_pending_and_running<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let running = b.submit(sim(json!("run"))).await.expect("submit").id;
    let pending = b.submit(sim(json!("wait"))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    assert_eq!(lease.job.summary.id, running);
    assert_eq!(b.cancel(&pending).await.expect("cancel"), CancelOutcome::Cancelled);
    assert_eq!(status(b, &pending).await, JobStatus::Cancelled);
    assert!(claim_now(b, "w").await.is_none(), "a cancelled job is never claimed");
    assert_eq!(b.cancel(&running).await.expect("cancel"), CancelOutcome::Requested);
    let state = b.progress(&lease.as_ref(), 30.0, None).await.expect("progress");
    assert!(state.cancel_requested);
    assert!(b.renew(&lease.as_ref()).await.expect("renew").cancel_requested);
    let out = b
        .fail(&lease.as_ref(), JobError::retryable(FailureCategory::Service, "interrupted"))
        .await
        .expect("fail");
    assert_eq!(out, FailOutcome::Cancelled);
    assert_eq!(status(b, &running).await, JobStatus::Cancelled);
    assert_eq!(b.cancel(&running).await.expect("cancel"), CancelOutcome::AlreadyFinished);
    assert!(matches!(b.cancel(&JobId("missing".into())).await, Err(BrokerError::JobNotFound(_))));
}

/// Progress events are coalesced, but the latest progress always precedes the terminal event.
pub(super) async fn progress_is_coalesced<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    for p in 1..=20 {
        b.progress(&lease.as_ref(), f64::from(p) * 4.0, Some(format!("step {p}"))).await.expect("progress");
    }
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.progress, 80.0, "the stored progress is always the latest");
    assert_eq!(rec.summary.status, JobStatus::InProgress);
    fx.clock.advance(b.config().progress_coalesce_ms);
    b.progress(&lease.as_ref(), 90.0, None).await.expect("progress");
    b.progress(&lease.as_ref(), 95.0, Some("almost".into())).await.expect("progress");
    b.complete(&lease.as_ref(), json!("done")).await.expect("complete");
    let progress: Vec<(f64, Option<String>)> = all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::JobProgress { job } => Some((job.progress, job.message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        vec![(4.0, Some("step 1".into())), (90.0, None), (95.0, Some("almost".into()))],
        "superseded progress is dropped; the held-back latest precedes completion"
    );
    let kinds: Vec<&str> = all_events(b)
        .await
        .iter()
        .map(|e| e.kind.name())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .take(2)
        .collect();
    assert_eq!(kinds, vec!["job_completed", "job_progress"]);
}

/// Releasing for shutdown gives the job back without spending an attempt.
pub(super) async fn release_for_shutdown_refunds_attempt<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut spec = sim(json!(1));
    spec.max_attempts = 1;
    let id = b.submit(spec).await.expect("submit").id;
    for _ in 0..3 {
        let lease = claim_now(b, "w").await.expect("claim");
        assert_eq!(lease.attempt, 1);
        assert!(matches!(
            b.release(&lease.as_ref(), "shutdown").await.expect("release"),
            FailOutcome::Retrying { .. }
        ));
    }
    let lease = claim_now(b, "w").await.expect("claim");
    let out = b.release(&lease.as_ref(), "progress_timeout").await.expect("release");
    assert_eq!(out, FailOutcome::Failed, "a counted release with no attempts left fails");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.error.map(|e| e.category), Some(FailureCategory::Timeout));
}

/// An operator re-runs a failed job; it keeps its place.
pub(super) async fn manual_retry_requeues<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    assert!(matches!(b.retry(&id).await, Err(BrokerError::Illegal(_))), "pending jobs cannot be retried");
    let lease = claim_now(b, "w").await.expect("claim");
    b.fail(&lease.as_ref(), JobError::fatal(FailureCategory::Service, "x")).await.expect("fail");
    fx.clock.advance(10);
    b.submit(sim(json!(2))).await.expect("submit");
    b.retry(&id).await.expect("retry");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!((rec.summary.status, rec.outcome), (JobStatus::Pending, None));
    assert_eq!((rec.summary.attempt, rec.summary.max_attempts), (1, 1 + 3), "a fresh budget of attempts");
    let again = claim_now(b, "w").await.expect("claim");
    assert_eq!(again.job.summary.id, id, "retried job keeps its original place");
    assert_eq!(again.attempt, 2, "numbered on: an attempt number never repeats for a job");
    // The holder of the attempt from before the retry is fenced out, whatever it sends.
    let stale = lease.as_ref();
    assert!(matches!(b.renew(&stale).await, Err(BrokerError::LeaseLost(_))));
    assert!(matches!(b.progress(&stale, 50.0, None).await, Err(BrokerError::LeaseLost(_))));
    assert!(matches!(b.complete(&stale, json!("stale")).await, Err(BrokerError::LeaseLost(_))));
    b.complete(&again.as_ref(), json!("fresh")).await.expect("the current holder completes");
}

/// A message belongs to its attempt: a completed job and a job given back for another attempt no
/// longer show the ended attempt's last message ("queued in ComfyUI", "node 4").
pub(super) async fn an_ended_attempt_leaves_no_message<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("register");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    b.progress(&lease.as_ref(), 40.0, Some("node 4".into())).await.expect("progress");
    assert_eq!(b.job(&id).await.expect("get").expect("exists").summary.message.as_deref(), Some("node 4"));
    b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Service, "boom")).await.expect("fail");
    let requeued = b.job(&id).await.expect("get").expect("exists").summary;
    assert_eq!((requeued.status, requeued.message), (JobStatus::Pending, None));
    fx.clock.advance(60_000);
    let lease = claim_now(b, "w").await.expect("claim again");
    b.progress(&lease.as_ref(), 10.0, Some("queued in ComfyUI".into())).await.expect("progress");
    b.complete(&lease.as_ref(), json!("done")).await.expect("complete");
    let done = b.job(&id).await.expect("get").expect("exists").summary;
    assert_eq!((done.status, done.message, done.progress), (JobStatus::Completed, None, 100.0));
}

/// A service dying under a job gives the job back without spending an attempt (recorded as
/// `service_offline`); the second death under the same job fails it as `service_crash`, not
/// retryable. A job whose attempts ran out is never recorded `retryable`.
pub(super) async fn service_crashes_spend_no_attempt_until_the_second<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    for w in ["w1", "w2"] {
        b.register_worker(worker(w, &["simulation"], json!({}))).await.expect("register");
    }
    let mut spec = sim(json!("poison"));
    spec.max_attempts = 1;
    let id = b.submit(spec).await.expect("submit").id;
    let lease = claim_now(b, "w1").await.expect("claim");
    let out = b.release(&lease.as_ref(), crate::RELEASE_SERVICE_OFFLINE).await.expect("release");
    assert!(matches!(out, FailOutcome::Retrying { .. }), "{out:?}");
    let s = b.job(&id).await.expect("get").expect("exists").summary;
    assert_eq!((s.status, s.attempt, s.service_crashes), (JobStatus::Pending, 0, 1), "no attempt spent");
    assert_eq!(s.error.as_ref().map(|e| e.category), Some(FailureCategory::Connection));
    let lease = claim_now(b, "w2").await.expect("another worker takes it");
    assert_eq!(lease.attempt, 1);
    let out = b.release(&lease.as_ref(), crate::RELEASE_SERVICE_OFFLINE).await.expect("release");
    assert_eq!(out, FailOutcome::Failed);
    let rec = b.job(&id).await.expect("get").expect("exists");
    let error = rec.summary.error.clone().expect("error");
    assert_eq!(
        (rec.summary.status, error.category, error.retryable),
        (JobStatus::Failed, FailureCategory::ServiceCrash, false)
    );
    assert!(
        matches!(rec.outcome, Some(fleetq_core::Outcome::Error { ref error }) if error.category == FailureCategory::ServiceCrash)
    );
    // Attempts running out: the last retryable error is recorded as not retryable.
    let mut spec = sim(json!("flaky"));
    spec.max_attempts = 1;
    let id = b.submit(spec).await.expect("submit").id;
    let lease = claim_now(b, "w1").await.expect("claim");
    let out = b
        .fail(&lease.as_ref(), JobError::retryable(FailureCategory::Oom, "out of memory"))
        .await
        .expect("fail");
    assert_eq!(out, FailOutcome::Failed);
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.error.map(|e| (e.category, e.retryable)), Some((FailureCategory::Oom, false)));
    assert!(matches!(rec.outcome, Some(fleetq_core::Outcome::Error { ref error }) if !error.retryable));
}

/// A failure that raises the job's requirements (out of memory: more GPU memory) moves its retry
/// to the partition of the new requirements: only a worker meeting them takes it, the rest of the
/// spec is kept, and the old partition serves new jobs as before. A job that is not retried keeps
/// its requirements; raised past every worker, it is flagged unworkable.
pub(super) async fn a_retry_can_require_more<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("small", &["simulation"], json!({"hardware": {"gpu_memory_gb": 24}})))
        .await
        .expect("register");
    b.register_worker(worker("big", &["simulation"], json!({"hardware": {"gpu_memory_gb": 48}})))
        .await
        .expect("register");
    let raised = |gb: u64| {
        fleetq_core::Requirements::parse(&json!({"hardware": {"gpu_memory_gb": gb}}), "requirements")
            .expect("requirements")
    };
    let oom = || JobError::retryable(FailureCategory::Oom, "out of memory");
    let mut spec = sim(json!({"big": true}));
    spec.retry_backoff_ms = Some(0);
    spec.max_attempts = 5;
    let id = b.submit(spec).await.expect("submit").id;
    let before = b.job(&id).await.expect("get").expect("exists");
    let lease = claim_now(b, "small").await.expect("claim");
    let out = b.fail_requiring(&lease.as_ref(), oom(), raised(25)).await.expect("fail");
    assert!(matches!(out, FailOutcome::Retrying { .. }), "{out:?}");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.spec.requirements, raised(25));
    assert_eq!(
        (rec.spec.payload.clone(), rec.spec.max_attempts),
        (json!({"big": true}), 5),
        "the rest is kept"
    );
    assert_ne!(rec.summary.partition, before.summary.partition);
    assert!(!rec.summary.unworkable, "the big worker serves it");
    fx.clock.advance(b.config().retry_avoid_ms + 1);
    assert!(claim_now(b, "small").await.is_none(), "the small worker no longer matches");
    let lease = claim_now(b, "big").await.expect("the big worker takes it");
    assert_eq!((lease.job.summary.id.clone(), lease.attempt), (id.clone(), 2));
    // Past every worker: flagged, and taken by nobody.
    b.fail_requiring(&lease.as_ref(), oom(), raised(49)).await.expect("fail");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert!(rec.summary.unworkable, "no worker has 49 GiB");
    fx.clock.advance(b.config().retry_avoid_ms + 1);
    assert!(claim_now(b, "big").await.is_none());
    assert_eq!(b.cancel(&id).await.expect("cancel"), CancelOutcome::Cancelled);
    // The old shape is served as before.
    let plain = b.submit(sim(json!("plain"))).await.expect("submit").id;
    assert_eq!(
        b.job(&plain).await.expect("get").expect("exists").summary.partition,
        before.summary.partition
    );
    let lease = claim_now(b, "small").await.expect("the old partition serves new jobs");
    assert_eq!(lease.job.summary.id, plain);
    // Not retried (no attempt left): the requirements stay.
    let mut last = sim(json!("last"));
    last.max_attempts = 1;
    let last = b.submit(last).await.expect("submit").id;
    b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    let lease = claim_now(b, "small").await.expect("claim");
    assert_eq!(lease.job.summary.id, last);
    assert_eq!(
        b.fail_requiring(&lease.as_ref(), oom(), raised(25)).await.expect("fail"),
        FailOutcome::Failed
    );
    let rec = b.job(&last).await.expect("get").expect("exists");
    assert!(rec.spec.requirements.is_empty(), "{:?}", rec.spec.requirements);
}

/// A job's record keeps how each attempt ended: who ran it, when, how it ended and why.
pub(super) async fn the_record_tells_how_each_attempt_ended<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    for w in ["w1", "w2"] {
        b.register_worker(worker(w, &["simulation"], json!({}))).await.expect("register");
    }
    let mut spec = sim(json!("history"));
    spec.retry_backoff_ms = Some(0);
    spec.max_attempts = 5;
    let id = b.submit(spec).await.expect("submit").id;
    assert!(b.job(&id).await.expect("get").expect("exists").history.is_empty(), "nothing ran yet");
    let lease = claim_now(b, "w1").await.expect("claim");
    let started = b.clock().now_ms();
    fx.clock.advance(10);
    b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Service, "boom")).await.expect("fail");
    let lease = claim_now(b, "w2").await.expect("claim");
    b.release(&lease.as_ref(), "shutdown").await.expect("release");
    fx.clock.advance(b.config().retry_avoid_ms);
    let lease = claim_now(b, "w2").await.expect("claim");
    assert_eq!(lease.attempt, 2, "the refunded attempt's number is used again");
    b.complete(&lease.as_ref(), json!(1)).await.expect("complete");
    let history = b.job(&id).await.expect("get").expect("exists").history;
    let brief: Vec<_> = history
        .iter()
        .map(|h| {
            (
                h.attempt,
                h.worker_id.as_deref(),
                h.end,
                h.reason.as_deref(),
                h.error.as_ref().map(|e| e.category),
            )
        })
        .collect();
    assert_eq!(
        brief,
        vec![
            (1, Some("w1"), JobStatus::Pending, Some("retry"), Some(FailureCategory::Service)),
            (2, Some("w2"), JobStatus::Pending, Some("shutdown"), Some(FailureCategory::Internal)),
            (2, Some("w2"), JobStatus::Completed, None, None),
        ]
    );
    assert_eq!((history[0].started_at, history[0].ended_at), (Some(started), started + 10));
    let done = b.job(&id).await.expect("get").expect("exists").summary;
    assert_eq!(done.error, None, "a completed job has no error: the first attempt's is in the history");
    // Cancelled while running; failed with no attempt left.
    let id = b.submit(sim(json!("cancel me"))).await.expect("submit").id;
    let lease = claim_now(b, "w1").await.expect("claim");
    b.cancel(&id).await.expect("cancel");
    b.fail(&lease.as_ref(), JobError::fatal(FailureCategory::Cancelled, "cancelled")).await.expect("fail");
    let h = b.job(&id).await.expect("get").expect("exists").history;
    assert_eq!(h.iter().map(|h| (h.attempt, h.end)).collect::<Vec<_>>(), vec![(1, JobStatus::Cancelled)]);
    let mut once = sim(json!("once"));
    once.max_attempts = 1;
    let id = b.submit(once).await.expect("submit").id;
    let lease = claim_now(b, "w1").await.expect("claim");
    b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Oom, "oom")).await.expect("fail");
    let h = b.job(&id).await.expect("get").expect("exists").history;
    assert_eq!(h.len(), 1);
    assert_eq!((h[0].end, h[0].error.as_ref().map(|e| e.retryable)), (JobStatus::Failed, Some(false)));
    assert_eq!(h[0].reason, None, "a failure that was not retried gives no retry as its reason");
    let mut fatal = sim(json!("fatal"));
    fatal.max_attempts = 3;
    let id = b.submit(fatal).await.expect("submit").id;
    let lease = claim_now(b, "w1").await.expect("claim");
    b.fail(&lease.as_ref(), JobError::fatal(FailureCategory::Validation, "bad input")).await.expect("fail");
    let h = b.job(&id).await.expect("get").expect("exists").history;
    assert_eq!((h.len(), h[0].end, h[0].reason.as_deref()), (1, JobStatus::Failed, None));
}
