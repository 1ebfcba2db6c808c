//! Conformance cases: log.

use super::*;

/// Every job gets exactly one terminal event, whatever path it took.
pub(super) async fn terminal_events_exactly_once<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut once = sim(json!("fails"));
    once.max_attempts = 1;
    let ids: Vec<JobId> = b
        .submit_batch(vec![sim(json!("ok")), once, sim(json!("cancel"))])
        .await
        .expect("batch")
        .into_iter()
        .map(|s| s.id)
        .collect();
    b.cancel(&ids[2]).await.expect("cancel");
    b.cancel(&ids[2]).await.expect("cancel twice");
    while let Some(lease) = claim_now(b, "w").await {
        if lease.job.spec.payload == json!("ok") {
            b.complete(&lease.as_ref(), json!(1)).await.expect("complete");
            assert!(b.complete(&lease.as_ref(), json!(2)).await.is_err(), "second completion refused");
        } else {
            b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Service, "boom"))
                .await
                .expect("fail");
        }
    }
    fx.clock.advance(b.config().lease_ms * 3);
    b.reap().await.expect("reap");
    let mut terminal: HashMap<JobId, usize> = HashMap::new();
    for e in all_events(b).await {
        if let Some(j) = e.kind.job().filter(|j| j.status.is_terminal()) {
            *terminal.entry(j.id.clone()).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(terminal.get(id), Some(&1), "job {id}");
    }
    assert_eq!(status(b, &ids[0]).await, JobStatus::Completed);
    assert_eq!(status(b, &ids[1]).await, JobStatus::Failed);
    assert_eq!(status(b, &ids[2]).await, JobStatus::Cancelled);
}

fn normalized(mut s: Snapshot) -> Snapshot {
    for w in s.workers.values_mut() {
        w.last_seen = 0;
        for c in w.connectors.values_mut() {
            c.at = 0;
        }
    }
    s
}

/// A snapshot plus the events after it equals a fresh snapshot.
pub(super) async fn snapshot_and_events_converge<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.machine_event(MachineEvent {
        machine_id: "m1".into(),
        phase: MachinePhase::Starting,
        step: None,
        message: None,
        at: 1,
    })
    .await
    .expect("machine");
    b.register_worker(worker("early", &["simulation"], json!({}))).await.expect("reg");
    b.submit(sim(json!("before"))).await.expect("submit");
    let early = b.snapshot().await.expect("snapshot");
    // Everything below happens after the early snapshot.
    b.machine_event(MachineEvent {
        machine_id: "m1".into(),
        phase: MachinePhase::Step,
        step: Some("pull".into()),
        message: None,
        at: 2,
    })
    .await
    .expect("machine");
    b.register_worker(worker("late", &["simulation", "other"], json!({}))).await.expect("reg");
    b.report_connector(
        "late",
        ConnectorReport {
            service: "simulation".into(),
            status: ConnectorStatus::Idle,
            message: None,
            at: 3,
            info: None,
        },
    )
    .await
    .expect("report");
    let ids: Vec<JobId> = b
        .submit_batch((0..6).map(|i| sim(json!(i))).collect())
        .await
        .expect("batch")
        .into_iter()
        .map(|s| s.id)
        .collect();
    b.submit(JobSpec::new("nobody-serves-this", json!(null))).await.expect("submit");
    b.evaluate_workability().await.expect("evaluate");
    let l1 = claim_now(b, "early").await.expect("claim");
    b.progress(&l1.as_ref(), 40.0, Some("sampling".into())).await.expect("progress");
    b.complete(&l1.as_ref(), json!(null)).await.expect("complete");
    let l2 = claim_now(b, "late").await.expect("claim");
    b.progress(&l2.as_ref(), 10.0, None).await.expect("progress");
    b.cancel(&ids[5]).await.expect("cancel");
    let l3 = claim_now(b, "late").await.expect("claim");
    b.complete(&l3.as_ref(), json!(null)).await.expect("complete");
    // Re-registering keeps what it completed.
    b.register_worker(worker("late", &["simulation", "other"], json!({}))).await.expect("reg");
    let _l4 = claim_now(b, "late").await.expect("claim");
    b.deregister_worker("early").await.expect("deregister");
    let mut folded = early.clone();
    for e in b.events_after(early.seq, 10_000, Duration::ZERO).await.expect("events") {
        folded.apply(&e);
    }
    let fresh = b.snapshot().await.expect("snapshot");
    assert_eq!(folded.seq, fresh.seq);
    assert_eq!(normalized(folded), normalized(fresh.clone()));
    assert_eq!(fresh.workers.len(), 1);
    assert_eq!(fresh.workers["late"].completed, 1, "counted by the broker, folded from the events alike");
    assert_eq!(b.workers().await.expect("workers")[0].completed, 1);
    assert!(fresh.jobs.values().any(|j| j.unworkable), "the unservable job is flagged");
    assert_eq!(fresh.machines["m1"].steps, vec!["pull"]);
    // Folding everything from zero converges too.
    let mut from_zero = Snapshot::default();
    for e in all_events(b).await {
        from_zero.apply(&e);
    }
    assert_eq!(normalized(from_zero), normalized(fresh));
}

/// `events_after` blocks until an event arrives; the subscription stream continues without gaps.
///
/// A 60 s wait bounded by 30 s: only a wake-up on the new event passes, not a backend that waits
/// out its wait (or a re-check, which the fixture sets to 120 s).
pub(super) async fn events_after_waits_for_news<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.clone();
    b.submit(sim(json!(0))).await.expect("submit");
    let head = b.snapshot().await.expect("snapshot").seq;
    for past_the_end in [head, head + 1, i64::MAX as u64, u64::MAX - 1, u64::MAX] {
        let none = b.events_after(past_the_end, 10, Duration::ZERO).await.expect("events");
        assert!(none.is_empty(), "nothing after {past_the_end}: {none:?}");
    }
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.events_after(head, 10, Duration::from_secs(60)).await })
    };
    // Let the read find nothing and start waiting; the assertion does not depend on this pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "no news keeps the read waiting");
    b.submit(sim(json!(1))).await.expect("submit");
    let got = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken")
        .expect("task")
        .expect("events");
    assert_eq!(got.first().map(|e| e.seq), Some(head + 1));
    use futures::StreamExt;
    let stream = crate::subscribe(b.clone(), 0);
    tokio::pin!(stream);
    for i in 2..5 {
        b.submit(sim(json!(i))).await.expect("submit");
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let e = stream.next().await.expect("stream continues").expect("event");
        seqs.push(e.seq);
    }
    let first = seqs[0];
    assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>(), "gap-free and ordered");
}

/// `reap` drops events older than the age cap; newer ones and the sequence are untouched.
pub(super) async fn event_log_is_capped_by_age<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    for i in 0..3 {
        b.submit(sim(json!(i))).await.expect("submit");
    }
    let old = all_events(b).await.len();
    assert!(old >= 3);
    fx.clock.advance(b.config().max_event_age_ms / 2);
    b.submit(sim(json!("recent"))).await.expect("submit");
    let head = b.snapshot().await.expect("snapshot").seq;
    assert_eq!(b.reap().await.expect("reap").events_trimmed, 0, "nothing is old yet");
    fx.clock.advance(b.config().max_event_age_ms / 2 + 1);
    assert_eq!(b.reap().await.expect("reap").events_trimmed, old);
    let left: Vec<u64> = all_events(b).await.iter().map(|e| e.seq).collect();
    assert_eq!(left, vec![head], "only the recent event is left, with its sequence");
    b.submit(sim(json!("after"))).await.expect("submit");
    assert_eq!(b.snapshot().await.expect("snapshot").seq, head + 1, "the sequence continues");
    assert_eq!(b.jobs(&JobFilter::default()).await.expect("list").jobs.len(), 5, "jobs are untouched");
}

/// The log's epoch starts at 0 and moves on once per going-back, however many processes noticed it.
pub(super) async fn the_log_epoch_moves_on_once<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    assert_eq!(b.log_epoch().await.expect("epoch"), 0);
    assert_eq!(b.advance_log_epoch(0).await.expect("advance"), 1);
    assert_eq!(b.advance_log_epoch(0).await.expect("a second noticer"), 1, "moved on once");
    assert_eq!(b.log_epoch().await.expect("epoch"), 1);
    assert_eq!(b.advance_log_epoch(1).await.expect("the next going-back"), 2);
}

/// A cancel of a running job is signalled to its holder at once: a worker waiting for signals is
/// woken with the job's id (the bound is 30 s; the signal comes with the cancel). Other workers
/// hear nothing, a pending job's cancel signals nobody, and a signal is delivered once.
pub(super) async fn cancel_is_signalled_to_the_holder<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.clone();
    for w in ["holder", "other"] {
        b.register_worker(worker(w, &["simulation"], json!({}))).await.expect("register");
    }
    let id = b.submit(sim(json!("long"))).await.expect("submit").id;
    let lease = claim_now(b.as_ref(), "holder").await.expect("claim");
    let pending = b.submit(sim(json!("waiting"))).await.expect("submit").id;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.cancel_signals("holder", Duration::from_secs(30)).await })
    };
    // The waiter may start before or after the cancel: either way it gets the signal.
    assert_eq!(b.cancel(&pending).await.expect("cancel pending"), CancelOutcome::Cancelled);
    assert_eq!(b.cancel(&id).await.expect("cancel running"), CancelOutcome::Requested);
    let got = tokio::time::timeout(Duration::from_secs(30), waiter).await.expect("signalled").expect("task");
    assert_eq!(got.expect("signals"), vec![id.clone()]);
    assert!(b.cancel_signals("other", Duration::ZERO).await.expect("signals").is_empty());
    assert!(b.cancel_signals("holder", Duration::ZERO).await.expect("signals").is_empty(), "delivered once");
    // A repeated cancel signals nothing new.
    assert_eq!(b.cancel(&id).await.expect("cancel again"), CancelOutcome::Requested);
    assert!(b.cancel_signals("holder", Duration::ZERO).await.expect("signals").is_empty());
    b.fail(&lease.as_ref(), JobError::fatal(FailureCategory::Cancelled, "cancelled")).await.expect("end");
    assert_eq!(status(b.as_ref(), &id).await, JobStatus::Cancelled);
}
