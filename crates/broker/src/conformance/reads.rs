//! Conformance cases: reads.

use super::*;

/// Listing pages newest first with a cursor, filtered by status and service.
pub(super) async fn job_listing_pages<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut ids = Vec::new();
    for i in 0..25 {
        fx.clock.advance(1);
        ids.push(b.submit(sim(json!(i))).await.expect("submit").id);
    }
    b.submit(JobSpec::new("other", json!(null))).await.expect("submit");
    let lease = claim_now(b, "w").await.expect("claim");
    let mut seen = Vec::new();
    let mut filter =
        JobFilter { service: Some("simulation".into()), limit: Some(10), ..JobFilter::default() };
    loop {
        let page = b.jobs(&filter).await.expect("list");
        seen.extend(page.jobs.iter().map(|j| j.id.clone()));
        match page.next {
            Some(next) => filter.cursor = Some(next),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every job once, newest first");
    let running =
        b.jobs(&JobFilter { status: Some(JobStatus::Assigned), ..JobFilter::default() }).await.expect("list");
    assert_eq!(
        running.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![lease.job.summary.id.clone()]
    );
    let by_worker =
        b.jobs(&JobFilter { worker: Some("w".into()), ..JobFilter::default() }).await.expect("list");
    assert_eq!(by_worker.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![lease.job.summary.id]);
    let none = JobFilter { worker: Some("nobody".into()), ..JobFilter::default() };
    assert!(b.jobs(&none).await.expect("list").jobs.is_empty());
    let wf = b
        .submit(job(json!({"service": "other", "payload": 1, "workflow_id": "wf-1", "customer_id": "acme"})))
        .await
        .expect("submit")
        .id;
    for filter in [
        JobFilter { workflow: Some("wf-1".into()), ..JobFilter::default() },
        JobFilter { customer: Some("acme".into()), ..JobFilter::default() },
        JobFilter { customer: Some("acme".into()), service: Some("other".into()), ..JobFilter::default() },
    ] {
        let page = b.jobs(&filter).await.expect("list");
        assert_eq!(
            page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            vec![wf.clone()],
            "{filter:?}"
        );
    }
    let miss = JobFilter {
        customer: Some("acme".into()),
        service: Some("simulation".into()),
        ..JobFilter::default()
    };
    assert!(b.jobs(&miss).await.expect("list").jobs.is_empty());
    let bad = JobFilter { cursor: Some("garbage".into()), ..JobFilter::default() };
    assert!(matches!(b.jobs(&bad).await, Err(BrokerError::Invalid(_))));
    // By owner (the token that submitted): in listings newest first and in queue order, and
    // carried on the job's summary.
    let mut owned = sim(json!("alice's"));
    owned.owner = Some("alice".into());
    let alices = b.submit(owned).await.expect("submit").id;
    let page =
        b.jobs(&JobFilter { owner: Some("alice".into()), ..JobFilter::default() }).await.expect("list");
    assert_eq!(page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![alices.clone()]);
    assert_eq!(page.jobs[0].owner.as_deref(), Some("alice"));
    let queued =
        b.queue(&QueueFilter { owner: Some("alice".into()), ..QueueFilter::default() }).await.expect("queue");
    assert_eq!(queued.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![alices]);
    for nobody in [
        JobFilter { owner: Some("bob".into()), ..JobFilter::default() },
        JobFilter { owner: Some("alice".into()), service: Some("other".into()), ..JobFilter::default() },
    ] {
        assert!(b.jobs(&nobody).await.expect("list").jobs.is_empty(), "{nobody:?}");
    }
    let bob = QueueFilter { owner: Some("bob".into()), ..QueueFilter::default() };
    assert!(b.queue(&bob).await.expect("queue").jobs.is_empty());
}

/// Pending, delayed and running counts per service.
pub(super) async fn queue_depths_per_service<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    assert!(b.queue_depths().await.expect("depths").is_empty());
    b.register_worker(worker("w", &["a:b", "other"], json!({"vram": 8}))).await.expect("reg");
    for i in 0..4 {
        b.submit(JobSpec::new("a:b", json!(i))).await.expect("submit");
    }
    b.submit(job(json!({"service": "a:b", "requirements": {"vram": 4}}))).await.expect("submit");
    b.submit(JobSpec::new("other", json!(0))).await.expect("submit");
    b.submit(JobSpec::new("finished", json!(0))).await.expect("submit");
    let done =
        b.jobs(&JobFilter { service: Some("finished".into()), ..JobFilter::default() }).await.expect("list");
    b.cancel(&done.jobs[0].id).await.expect("cancel");
    let _running = claim_now(b, "w").await.expect("claim");
    let mut retry = JobSpec::new("a:b", json!("retry"));
    retry.priority = 100;
    retry.retry_backoff_ms = Some(60_000);
    b.submit(retry).await.expect("submit");
    let failing = claim_now(b, "w").await.expect("claim");
    assert_eq!(failing.job.spec.payload, json!("retry"));
    b.fail(&failing.as_ref(), JobError::retryable(FailureCategory::Service, "later")).await.expect("fail");
    let depths = b.queue_depths().await.expect("depths");
    let want = |pending, delayed, running| crate::ServiceDepth { pending, delayed, running };
    assert_eq!(depths.len(), 2, "{depths:?}");
    assert_eq!(depths["a:b"], want(4, 1, 1), "a:b, whose name has a colon like partition keys");
    assert_eq!(depths["other"], want(1, 0, 0));
}

/// Every page of a queue listing, in order.
async fn queue_walk<B: Broker>(b: &B, mut filter: QueueFilter) -> Vec<JobId> {
    let mut out = Vec::new();
    loop {
        let page = b.queue(&filter).await.expect("queue page");
        out.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(next) => filter.cursor = Some(next),
            None => return out,
        }
    }
}

/// Queue positions and the queue listing come from the broker's own order, exact well above the
/// snapshot's 1,000 pending jobs: ties of priority and time are broken by submission, workflow
/// fields win, other services, partitions, delayed, running and finished jobs are counted right.
pub(super) async fn queue_position_and_order_at_a_large_backlog<B: Broker>(fx: Fixture<B>) {
    const N: usize = 2_500;
    let b = fx.broker.as_ref();
    let t0 = crate::testing::T0;
    // (service, effective priority, effective time, submission index, customer, workflow)
    let mut specs = Vec::with_capacity(N);
    let mut keys = Vec::with_capacity(N);
    for i in 0..N {
        let service = if i % 5 == 0 { "other" } else { "simulation" };
        let mut spec = JobSpec::new(service, json!(i));
        spec.priority = (i % 3) as i32 - 1;
        if i % 2 == 1 {
            spec.requirements =
                fleetq_core::Requirements::parse(&json!({"gpu": "a"}), "requirements").expect("requirements");
        }
        if i % 11 == 0 {
            spec.customer_id = Some("acme".into());
        }
        if i % 7 == 0 {
            spec.workflow_id = Some("wf".into());
            spec.workflow_priority = Some(5);
            spec.workflow_datetime = Some(t0 - 1000 * (i % 4) as i64);
        }
        keys.push((
            service,
            std::cmp::Reverse(spec.effective_priority()),
            spec.effective_time(t0),
            i,
            spec.customer_id.clone(),
            spec.workflow_id.clone(),
        ));
        specs.push(spec);
    }
    let mut ids = Vec::with_capacity(N);
    for chunk in specs.chunks(500) {
        ids.extend(b.submit_batch(chunk.to_vec()).await.expect("batch").into_iter().map(|s| s.id));
    }
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by_key(|&i| (keys[i].1, keys[i].2, keys[i].3));
    let expect = |pred: &dyn Fn(usize) -> bool| -> Vec<JobId> {
        order.iter().copied().filter(|&i| pred(i)).map(|i| ids[i].clone()).collect()
    };
    let sim_order = expect(&|i| keys[i].0 == "simulation");
    let position_of =
        |id: &JobId, in_order: &[JobId]| in_order.iter().position(|x| x == id).map(|p| p as u64 + 1);

    for i in (0..N).step_by(97).chain([N - 1]) {
        let service_order = expect(&|k| keys[k].0 == keys[i].0);
        assert_eq!(
            b.queue_position(&ids[i]).await.expect("position"),
            position_of(&ids[i], &service_order),
            "job {i}"
        );
    }
    let sim = QueueFilter { service: Some("simulation".into()), limit: Some(1000), ..QueueFilter::default() };
    assert_eq!(queue_walk(b, sim.clone()).await, sim_order, "one service, paged");
    assert_eq!(queue_walk(b, QueueFilter::default()).await, expect(&|_| true), "every service, paged");
    let wf = QueueFilter { workflow: Some("wf".into()), limit: Some(50), ..QueueFilter::default() };
    assert_eq!(queue_walk(b, wf).await, expect(&|i| keys[i].5.is_some()), "one workflow");
    let acme = QueueFilter {
        service: Some("other".into()),
        customer: Some("acme".into()),
        limit: Some(7),
        ..QueueFilter::default()
    };
    assert_eq!(
        queue_walk(b, acme).await,
        expect(&|i| keys[i].0 == "other" && keys[i].4.is_some()),
        "one customer of one service"
    );

    // The head runs: it leaves the queue and every later job moves up by one.
    b.register_worker(worker("w", &["simulation"], json!({"gpu": "a"}))).await.expect("reg");
    let lease = claim_now(b, "w").await.expect("claim");
    assert_eq!(lease.job.summary.id, sim_order[0], "the claim takes the queue's head");
    assert_eq!(b.queue_position(&sim_order[0]).await.expect("position"), None, "running");
    assert_eq!(b.queue_position(&sim_order[1]).await.expect("position"), Some(1));
    assert_eq!(b.queue_position(&sim_order[1500]).await.expect("position"), Some(1500));
    // A retry backoff takes it out of the queue; finished and unknown jobs have no place.
    let out = b.fail(&lease.as_ref(), JobError::retryable(FailureCategory::Connection, "down")).await;
    assert!(matches!(out, Ok(FailOutcome::Retrying { .. })), "{out:?}");
    assert_eq!(b.queue_position(&sim_order[0]).await.expect("position"), None, "delayed");
    assert_eq!(
        b.queue(&sim).await.expect("page").jobs.first().map(|j| j.id.clone()),
        Some(sim_order[1].clone())
    );
    b.cancel(&sim_order[1]).await.expect("cancel");
    assert_eq!(b.queue_position(&sim_order[1]).await.expect("position"), None, "cancelled");
    assert_eq!(b.queue_position(&sim_order[2]).await.expect("position"), Some(1));
    assert_eq!(b.queue_position(&JobId("nope".into())).await.expect("position"), None);
    let bad = QueueFilter { cursor: Some("garbage".into()), ..QueueFilter::default() };
    assert!(matches!(b.queue(&bad).await, Err(BrokerError::Invalid(e)) if e.field == "cursor"));
}

/// Finished jobs the latest to finish first, whatever their submission order, paged and filtered.
pub(super) async fn finished_jobs_by_end_time<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let mut ids = Vec::new();
    for i in 0..3 {
        fx.clock.advance(1);
        ids.push(b.submit(sim(json!(i))).await.expect("submit").id);
    }
    let mut leases = Vec::new();
    for _ in 0..2 {
        leases.push(claim_now(b, "w").await.expect("claim"));
    }
    // The last submitted is cancelled first, then the first completes, then the second fails.
    fx.clock.advance(10);
    b.cancel(&ids[2]).await.expect("cancel");
    fx.clock.advance(10);
    b.complete(&leases[0].as_ref(), json!(null)).await.expect("complete");
    fx.clock.advance(10);
    let mut error = JobError::fatal(FailureCategory::Service, "boom");
    error.retryable = false;
    b.fail(&leases[1].as_ref(), error).await.expect("fail");
    b.submit(sim(json!("still pending"))).await.expect("submit");
    let all = b.finished(&JobFilter::default()).await.expect("finished");
    assert_eq!(
        all.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![ids[1].clone(), ids[0].clone(), ids[2].clone()],
        "the latest to finish first; nothing unfinished"
    );
    let mut filter = JobFilter { limit: Some(2), ..JobFilter::default() };
    let mut paged = Vec::new();
    loop {
        let page = b.finished(&filter).await.expect("page");
        paged.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(n) => filter.cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(paged, vec![ids[1].clone(), ids[0].clone(), ids[2].clone()], "every one once across pages");
    let failed = b
        .finished(&JobFilter { status: Some(JobStatus::Failed), ..JobFilter::default() })
        .await
        .expect("failed");
    assert_eq!(failed.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![ids[1].clone()]);
    let bad = JobFilter { cursor: Some("garbage".into()), ..JobFilter::default() };
    assert!(matches!(b.finished(&bad).await, Err(BrokerError::Invalid(_))));
}
