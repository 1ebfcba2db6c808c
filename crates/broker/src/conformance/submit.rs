//! Conformance cases: submit.

use super::*;

/// Submit returns ids; get returns the record; an idempotency key returns the first job.
pub(super) async fn submit_get_and_idempotency<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let mut spec = sim(json!({"steps": 3}));
    spec.idempotency_key = Some("order-42".into());
    spec.customer_id = Some("acme".into());
    let first = b.submit(spec.clone()).await.expect("submit");
    assert!(first.created);
    let again = b.submit(spec.clone()).await.expect("resubmit");
    assert_eq!(again, crate::Submitted { id: first.id.clone(), created: false });
    let rec = b.job(&first.id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Pending);
    assert_eq!(rec.summary.attempt, 0);
    assert_eq!(rec.summary.created_at, crate::testing::T0);
    assert_eq!(rec.spec.payload, json!({"steps": 3}));
    assert_eq!(rec.spec.customer_id.as_deref(), Some("acme"));
    assert!(b.job(&JobId("nope".into())).await.expect("get").is_none());
    let submitted =
        all_events(b).await.iter().filter(|e| matches!(e.kind, EventKind::JobSubmitted { .. })).count();
    assert_eq!(submitted, 1, "an idempotent resubmission appends no event");
}

/// A bad job is rejected with its field named, and nothing is stored or evented.
pub(super) async fn invalid_submission_changes_nothing<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let mut bad = sim(json!({}));
    bad.service = "no spaces allowed".into();
    match b.submit(bad).await {
        Err(BrokerError::Invalid(e)) => assert_eq!(e.field, "service"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let mut huge = sim(json!("x".repeat(70 * 1024)));
    huge.priority = 1;
    assert!(matches!(b.submit(huge).await, Err(BrokerError::Invalid(e)) if e.field == "payload"));
    assert!(all_events(b).await.is_empty());
    assert!(b.jobs(&JobFilter::default()).await.expect("list").jobs.is_empty());
}

/// One invalid spec rejects the whole batch.
pub(super) async fn batch_is_all_or_nothing<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let mut bad = sim(json!(2));
    bad.max_attempts = 0;
    let err = b.submit_batch(vec![sim(json!(1)), bad]).await.expect_err("batch with a bad job");
    assert!(matches!(err, BrokerError::Invalid(ref e) if e.field == "[1].max_attempts"), "{err}");
    assert!(b.jobs(&JobFilter::default()).await.expect("list").jobs.is_empty());
    let ok = b.submit_batch((0..5).map(|i| sim(json!(i))).collect()).await.expect("batch");
    assert_eq!(ok.len(), 5);
    assert_eq!(b.jobs(&JobFilter::default()).await.expect("list").jobs.len(), 5);
}

/// A result over the limit is refused and the job stays with its holder.
pub(super) async fn oversized_result_is_refused<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    let big = json!("x".repeat(b.config().max_result_bytes + 1));
    assert!(matches!(b.complete(&lease.as_ref(), big).await, Err(BrokerError::ResultTooLarge { .. })));
    assert_eq!(status(b, &id).await, JobStatus::Assigned);
    b.complete(&lease.as_ref(), json!({"images": ["ref://bucket/1.png"]})).await.expect("complete");
}

/// An idempotency key belongs to its owner: another owner's job with the same key is a new job,
/// not a replay of the first (which it could neither see nor squat).
pub(super) async fn idempotency_keys_are_scoped_by_owner<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let spec = |owner: Option<&str>, payload: &str| {
        let mut s = sim(json!(payload));
        s.idempotency_key = Some("order-42".into());
        s.owner = owner.map(Into::into);
        s
    };
    let alice = b.submit(spec(Some("alice"), "a")).await.expect("alice");
    let bob = b.submit(spec(Some("bob"), "b")).await.expect("bob");
    let anonymous = b.submit(spec(None, "n")).await.expect("no owner");
    assert!(alice.created && bob.created && anonymous.created, "three owners, three jobs");
    assert_ne!(alice.id, bob.id);
    assert_ne!(alice.id, anonymous.id);
    let again = b.submit(spec(Some("alice"), "a2")).await.expect("alice again");
    assert_eq!(again, crate::Submitted { id: alice.id.clone(), created: false }, "alice's replay");
    let batch = b.submit_batch(vec![spec(Some("bob"), "b2"), spec(Some("carol"), "c")]).await.expect("batch");
    assert_eq!(batch[0], crate::Submitted { id: bob.id.clone(), created: false }, "bob's replay in a batch");
    assert!(batch[1].created, "carol's first use of the key");
    let bob_job = b.job(&bob.id).await.expect("get").expect("exists");
    assert_eq!(bob_job.spec.payload, json!("b"), "bob's job is his own");
    let mut control = spec(Some("alice"), "x");
    control.idempotency_key = Some("bad\u{1f}key".into());
    assert!(matches!(b.submit(control).await, Err(BrokerError::Invalid(e)) if e.field == "idempotency_key"));
}

/// Every number a client sends is bounded at submission (the field named), so no retry is
/// scheduled past the end of time and no job runs unbounded: a job without `timeout_ms` gets the
/// queue's default, stored with it so every worker applies the same limit.
pub(super) async fn numbers_are_bounded_and_time_limits_defaulted<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let limits = b.config().limits;
    for (field, value) in [
        ("retry_backoff_ms", json!(u64::MAX)),
        ("retry_backoff_ms", json!(1_000_000_000_000_000u64)),
        ("timeout_ms", json!(u64::MAX)),
        ("progress_timeout_ms", json!(limits.max_progress_timeout_ms + 1)),
    ] {
        let mut spec = sim(json!({}));
        match field {
            "retry_backoff_ms" => spec.retry_backoff_ms = value.as_u64(),
            "timeout_ms" => spec.timeout_ms = value.as_u64(),
            _ => spec.progress_timeout_ms = value.as_u64(),
        }
        match b.submit(spec.clone()).await {
            Err(BrokerError::Invalid(e)) => assert_eq!(e.field, field, "{value}"),
            other => panic!("{field} = {value}: expected Invalid, got {other:?}"),
        }
        match b.submit_batch(vec![sim(json!(1)), spec]).await {
            Err(BrokerError::Invalid(e)) => assert_eq!(e.field, format!("[1].{field}")),
            other => panic!("batch with {field} = {value}: expected Invalid, got {other:?}"),
        }
    }
    assert!(all_events(b).await.is_empty(), "nothing refused was stored");
    let id = b.submit(sim(json!({}))).await.expect("submit").id;
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.spec.timeout_ms, Some(limits.default_timeout_ms), "the queue's default time limit");
    // The longest backoff allowed schedules the retry exactly that far ahead.
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut slow = sim(json!("slow"));
    slow.retry_backoff_ms = Some(fleetq_core::job::MAX_RETRY_BACKOFF_MS);
    let slow = b.submit(slow).await.expect("submit").id;
    let mut lease = claim_now(b, "w").await.expect("claim");
    if lease.job.summary.id != slow {
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
        lease = claim_now(b, "w").await.expect("claim");
    }
    let out = b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Connection, "down")).await;
    let expect = crate::testing::T0 + fleetq_core::job::MAX_RETRY_BACKOFF_MS as i64;
    assert_eq!(out.expect("fail"), FailOutcome::Retrying { run_at: expect });
    assert_eq!(b.job(&slow).await.expect("get").expect("exists").summary.run_at, Some(expect));
    let snapshot = b.snapshot().await.expect("every job still reads back");
    assert!(snapshot.jobs.contains_key(&slow));
}
