//! Conformance cases: claim.

use super::*;

/// Priority (workflow priority when set) first, then time (workflow time when set), then submission.
pub(super) async fn claim_follows_exact_order<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("register");
    let mut expected = Vec::new();
    let add = |label: &str, priority: i32, wf_priority: Option<i32>, wf_time: Option<i64>| {
        let mut s = sim(json!(label));
        s.priority = priority;
        s.workflow_priority = wf_priority;
        s.workflow_datetime = wf_time;
        (label.to_owned(), s)
    };
    let specs = vec![
        add("p0-a", 0, None, None),
        add("p5", 5, None, None),
        add("p0-b", 0, None, None),
        add("wf-prio-9", 0, Some(9), None),
        add("p-neg", -3, None, None),
        add("p0-old-wf", 0, None, Some(crate::testing::T0 - 60_000)),
        add("max", i32::MAX, None, None),
        add("min", i32::MIN, None, None),
        add("wf-prio-0-over-5", 5, Some(0), Some(crate::testing::T0 - 1)),
    ];
    for (i, (label, mut spec)) in specs.into_iter().enumerate() {
        // Later submissions are later in time too, except where workflow_datetime says otherwise.
        fx.clock.advance(i as i64);
        // Spread the jobs over three partitions the worker matches: the order is global.
        match i % 3 {
            0 => {}
            1 => spec.customer_id = Some("acme".into()),
            _ => {
                spec.requirements =
                    fleetq_core::Requirements::parse(&json!({"tier": "all"}), "requirements").expect("valid")
            }
        }
        b.submit(spec).await.expect("submit");
        expected.push(label);
    }
    let want = ["max", "wf-prio-9", "p5", "p0-old-wf", "wf-prio-0-over-5", "p0-a", "p0-b", "p-neg", "min"];
    let mut got = Vec::new();
    while let Some(lease) = claim_now(b, "w").await {
        got.push(lease.job.spec.payload.as_str().unwrap_or_default().to_owned());
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    assert_eq!(got, want);
}

/// An unregistered worker cannot claim.
pub(super) async fn claim_needs_registered_worker<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.submit(sim(json!(1))).await.expect("submit");
    assert!(
        matches!(b.claim("ghost", Duration::ZERO).await, Err(BrokerError::UnknownWorker(w)) if w == "ghost")
    );
}

/// Each job goes only to a worker that `explain` says matches, and every job that some worker
/// matches is claimed.
pub(super) async fn matching_rules_through_broker<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let workers = vec![
        worker(
            "big",
            &["comfyui"],
            json!({"hardware": {"gpu_memory_gb": 80, "gpu_model": "A100"}, "models": {"comfyui": ["sdxl", "flux"]}, "region": "us"}),
        ),
        worker(
            "small",
            &["comfyui", "a1111"],
            json!({"hardware": {"gpu_memory_gb": 16, "gpu_model": "RTX 4080"}, "models": ["sd15"], "asset_type": ["image", "video"], "region": "eu"}),
        ),
        worker(
            "strict",
            &["comfyui"],
            json!({"customer_isolation": "strict", "allowed_customers": ["acme"], "hardware": {"gpu_memory_gb": 24}}),
        ),
        worker("deny", &["a1111", "comfyui-sim"], json!({"denied_customers": ["evil"]})),
    ];
    for w in &workers {
        b.register_worker(w.clone()).await.expect("register");
    }
    let jobs = vec![
        json!({"service": "comfyui", "requirements": {"hardware": {"gpu_memory_gb": 40}}}),
        json!({"service": "comfyui", "requirements": {"hardware.gpu_memory_gb": 16}}),
        json!({"service": "comfyui", "requirements": {"models": ["flux"]}}),
        json!({"service": "comfyui", "requirements": {"models": ["sd15"]}}),
        json!({"service": "comfyui", "requirements": {"hardware.gpu_model": "A100"}}),
        json!({"service": "comfyui", "requirements": {"negative_requirements": {"hardware.gpu_memory_gb": 24}}}),
        json!({"service": "comfyui", "requirements": {"customer_isolation": "strict"}, "customer_id": "acme"}),
        json!({"service": "comfyui", "customer_id": "other"}),
        json!({"service": "a1111", "customer_id": "evil"}),
        json!({"service": "a1111", "requirements": {"asset_type": "video"}}),
        json!({"service": "comfyui-sim"}),
        json!({"service": "comfyui", "requirements": {"region": "ap"}}),
        json!({"service": "openai"}),
    ];
    let mut ids = HashMap::new();
    for (i, j) in jobs.iter().enumerate() {
        let id = b.submit(job(j.clone())).await.expect("submit").id;
        ids.insert(id, i);
    }
    let mut claimed_by: HashMap<usize, String> = HashMap::new();
    loop {
        let mut progress = false;
        for w in &workers {
            if let Some(lease) = claim_now(b, &w.worker_id).await {
                let idx = ids[&lease.job.summary.id];
                let verdict = explain(w, &job(jobs[idx].clone()));
                assert!(
                    verdict.matches,
                    "{} claimed job {idx} it does not match: {:?}",
                    w.worker_id, verdict.reasons
                );
                claimed_by.insert(idx, w.worker_id.clone());
                b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    for (idx, j) in jobs.iter().enumerate() {
        let servable = workers.iter().any(|w| explain(w, &job(j.clone())).matches);
        assert_eq!(claimed_by.contains_key(&idx), servable, "job {idx} {j}");
    }
    assert_eq!(claimed_by.len(), 11, "{claimed_by:?}");
}

/// Many better-placed jobs that the worker cannot serve never hide one it can.
pub(super) async fn incompatible_heads_do_not_hide_compatible_jobs<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("small", &["comfyui"], json!({"hardware": {"gpu_memory_gb": 16}})))
        .await
        .expect("reg");
    let mut big = Vec::new();
    for i in 0..2000 {
        let mut s = job(
            json!({"service": "comfyui", "priority": 100, "requirements": {"hardware.gpu_memory_gb": 80}}),
        );
        s.payload = json!(i);
        big.push(s);
    }
    b.submit_batch(big).await.expect("batch");
    let mut fits =
        job(json!({"service": "comfyui", "priority": -5, "requirements": {"hardware.gpu_memory_gb": 8}}));
    fits.payload = json!("fits");
    let id = b.submit(fits).await.expect("submit").id;
    let lease = claim_now(b, "small").await.expect("the compatible job is found");
    assert_eq!(lease.job.summary.id, id);
    assert!(claim_now(b, "small").await.is_none());
}

/// A worker restricted to a workflow takes that workflow's jobs only, in order.
pub(super) async fn workflow_restricted_worker<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("wf", &["simulation"], json!({"workflow_id": "wf-7"}))).await.expect("reg");
    b.submit(sim(json!("other"))).await.expect("submit");
    let mut s1 = sim(json!("step1"));
    s1.workflow_id = Some("wf-7".into());
    let mut s2 = s1.clone();
    s2.payload = json!("step2");
    s2.priority = 3;
    let mut s3 = s1.clone();
    s3.workflow_id = Some("wf-8".into());
    b.submit_batch(vec![s1, s2, s3]).await.expect("batch");
    let first = claim_now(b, "wf").await.expect("workflow job");
    assert_eq!(first.job.spec.payload, json!("step2"));
    let second = claim_now(b, "wf").await.expect("workflow job");
    assert_eq!(second.job.spec.payload, json!("step1"));
    assert!(claim_now(b, "wf").await.is_none(), "other workflows and plain jobs are not taken");
}

/// A waiting claim is woken by a submission (no polling interval involved: the wait is long).
///
/// The fixture re-checks only every 120 s ([`config_for`]): the 30 s bound holds only when the
/// submission wakes the waiting claim.
pub(super) async fn claim_blocks_until_a_job_arrives<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.clone();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.claim("w", Duration::from_secs(60)).await })
    };
    // Let the claim find the queue empty and start waiting (a submission before that would be
    // claimed at once, proving nothing); the assertion below does not depend on this pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "an empty queue keeps the claim waiting");
    let id = b.submit(sim(json!("wake"))).await.expect("submit").id;
    let lease = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("claim returned well before its 60 s wait")
        .expect("task")
        .expect("claim")
        .expect("a job");
    assert_eq!(lease.job.summary.id, id);
}

/// A claim on an empty queue returns nothing once its wait is over.
pub(super) async fn claim_wait_expires_empty<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    assert!(b.claim("w", Duration::from_millis(50)).await.expect("claim").is_none());
}

/// The seeds' timeout-vs-completion race: a job times out, is re-claimed, and the first holder's late
/// completion is rejected without changing anything.
pub(super) async fn fencing_rejects_stale_holder<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w1", &["simulation"], json!({}))).await.expect("reg");
    b.register_worker(worker("w2", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let first = claim_now(b, "w1").await.expect("claim");
    fx.clock.advance(b.config().lease_ms + 1);
    let reaped = b.reap().await.expect("reap");
    assert_eq!(reaped.requeued, 1);
    fx.clock.advance(b.config().retry_avoid_ms + 1);
    let second = claim_now(b, "w2").await.expect("re-claim");
    assert_eq!(second.attempt, 2);
    let before = b.job(&id).await.expect("get");
    let events_before = all_events(b).await.len();
    let stale = first.as_ref();
    assert!(matches!(b.complete(&stale, json!("late")).await, Err(BrokerError::LeaseLost(_))));
    assert!(matches!(
        b.fail(&stale, JobError::fatal(FailureCategory::Service, "x")).await,
        Err(BrokerError::LeaseLost(_))
    ));
    assert!(matches!(b.progress(&stale, 50.0, None).await, Err(BrokerError::LeaseLost(_))));
    assert!(matches!(b.renew(&stale).await, Err(BrokerError::LeaseLost(_))));
    assert!(matches!(b.release(&stale, "x").await, Err(BrokerError::LeaseLost(_))));
    let forged = LeaseRef { worker_id: "w1".into(), ..second.as_ref() };
    assert!(matches!(b.complete(&forged, json!(1)).await, Err(BrokerError::LeaseLost(_))));
    assert_eq!(b.job(&id).await.expect("get"), before, "stale calls changed nothing");
    assert_eq!(all_events(b).await.len(), events_before, "stale calls appended no event");
    b.complete(&second.as_ref(), json!("ok")).await.expect("current holder completes");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert_eq!(rec.summary.status, JobStatus::Completed);
    assert_eq!(rec.outcome, Some(fleetq_core::Outcome::Result { value: json!("ok") }));
}

/// A worker that dies: its job comes back by itself when the lease expires (claims reap too).
pub(super) async fn killed_worker_job_comes_back<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("dies", &["simulation"], json!({}))).await.expect("reg");
    b.register_worker(worker("lives", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let _lost = claim_now(b, "dies").await.expect("claim");
    assert!(claim_now(b, "lives").await.is_none(), "held while the lease runs");
    fx.clock.advance(b.config().lease_ms + 1);
    let lease = claim_now(b, "lives").await.expect("claim reaps the expired lease itself");
    assert_eq!(lease.job.summary.id, id);
    assert_eq!(lease.attempt, 2);
    let evs = all_events(b).await;
    assert!(
        evs.iter()
            .any(|e| matches!(&e.kind, EventKind::JobRequeued { reason, .. } if reason == "lease_expired"))
    );
}

/// 32 concurrent claimers never receive the same job, and together drain the queue.
pub(super) async fn concurrent_claimers_never_share_a_job<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.clone();
    for i in 0..32 {
        b.register_worker(worker(&format!("w{i}"), &["simulation"], json!({}))).await.expect("reg");
    }
    let n = 400;
    b.submit_batch((0..n).map(|i| sim(json!(i))).collect()).await.expect("batch");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(lease) = b.claim(&format!("w{i}"), Duration::ZERO).await.expect("claim") {
                got.push(lease.job.summary.id.clone());
                b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
            }
            got
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for id in t.await.expect("task") {
            assert!(seen.insert(id.clone()), "job {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), n);
}

/// A job nobody can serve is flagged, and unflagged when a capable worker arrives.
pub(super) async fn unworkable_jobs_are_flagged<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("small", &["comfyui"], json!({"vram": 8}))).await.expect("reg");
    let id =
        b.submit(job(json!({"service": "comfyui", "requirements": {"vram": 24}}))).await.expect("submit").id;
    let ok = b.submit(job(json!({"service": "comfyui"}))).await.expect("submit").id;
    b.evaluate_workability().await.expect("evaluate");
    assert!(b.job(&id).await.expect("get").expect("exists").summary.unworkable);
    assert!(!b.job(&ok).await.expect("get").expect("exists").summary.unworkable);
    assert_eq!(b.evaluate_workability().await.expect("evaluate"), 0, "unchanged flags are not re-published");
    b.register_worker(worker("big", &["comfyui"], json!({"vram": 48}))).await.expect("reg");
    b.evaluate_workability().await.expect("evaluate");
    let rec = b.job(&id).await.expect("get").expect("exists");
    assert!(!rec.summary.unworkable);
    assert_eq!(rec.summary.status, JobStatus::Pending);
    let partition = rec.summary.partition.clone();
    let flags: Vec<bool> = all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PartitionWorkability { partition: p, unworkable } if *p == partition => {
                Some(*unworkable)
            }
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![true, false]);
}

/// Completing can hand back the worker's next job in the same step.
pub(super) async fn complete_and_claim_hands_over_next_job<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let ids: Vec<JobId> = b
        .submit_batch((0..3).map(|i| sim(json!(i))).collect())
        .await
        .expect("batch")
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut lease = claim_now(b, "w").await.expect("claim");
    let mut done = vec![lease.job.summary.id.clone()];
    while let Some(next) = b.complete_and_claim(&lease.as_ref(), json!("ok")).await.expect("complete+claim") {
        done.push(next.job.summary.id.clone());
        lease = next;
    }
    assert_eq!(done, ids);
    for id in &ids {
        assert_eq!(status(b, id).await, JobStatus::Completed);
    }
}

/// Renewal and progress push the deadline out, so a live worker keeps its job.
pub(super) async fn lease_renewal_extends_deadline<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    let lease_ms = b.config().lease_ms;
    for _ in 0..5 {
        fx.clock.advance(lease_ms - 1);
        let st = b.renew(&lease.as_ref()).await.expect("renew");
        assert_eq!(st.deadline_ms, crate::Clock::now_ms(&fx.clock) + lease_ms);
        assert_eq!(b.reap().await.expect("reap").requeued, 0);
    }
    fx.clock.advance(lease_ms - 1);
    b.progress(&lease.as_ref(), 50.0, None).await.expect("progress");
    fx.clock.advance(lease_ms - 1);
    b.reap().await.expect("reap");
    assert_eq!(status(b, &id).await, JobStatus::InProgress);
}

fn shaped(service: &str, vram: u32, customer: Option<String>, priority: i32, label: usize) -> JobSpec {
    let mut s = JobSpec::new(service, json!(label));
    s.requirements = fleetq_core::Requirements::parse(&json!({"vram": vram}), "requirements").expect("valid");
    s.customer_id = customer;
    s.priority = priority;
    s
}

/// The workability flags published for one partition, in order.
async fn flags_of<B: Broker>(b: &B, partition: &str) -> Vec<bool> {
    all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PartitionWorkability { partition: p, unworkable } if p == partition => {
                Some(*unworkable)
            }
            _ => None,
        })
        .collect()
}

/// The exact order (priority, effective time, submission) holds across hundreds of partitions,
/// incompatible ones among them never hide compatible jobs, and a worker of a new class finds the
/// work already pending for it, in order.
pub(super) async fn order_holds_across_many_partitions<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("mid", &["simulation"], json!({"vram": 24}))).await.expect("register");
    // 100 customers × 3 shapes; the 48 GB shape is beyond "mid".
    let (mut fits, mut big) = (Vec::new(), Vec::new());
    let mut batch = Vec::new();
    for i in 0..1500usize {
        if i % 7 == 0 {
            fx.clock.advance(1);
        }
        let vram = [8, 16, 48][i % 3];
        let priority = ((i * 7919) % 5) as i32 - 2;
        let spec = shaped("simulation", vram, Some(format!("c{}", i % 100)), priority, i);
        // Order: priority first, then submission time and sequence (i grows with both).
        let key = (-priority, i);
        if vram == 48 {
            big.push(key)
        } else {
            fits.push(key)
        }
        batch.push(spec);
        if batch.len() == 100 {
            b.submit_batch(std::mem::take(&mut batch)).await.expect("batch");
        }
    }
    fits.sort();
    big.sort();
    let mut got = Vec::new();
    while let Some(lease) = claim_now(b, "mid").await {
        got.push(lease.job.spec.payload.as_u64().expect("label") as usize);
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    assert_eq!(got, fits.iter().map(|k| k.1).collect::<Vec<_>>(), "claim order across partitions");
    b.register_worker(worker("large", &["simulation"], json!({"vram": 64}))).await.expect("register");
    let mut got = Vec::new();
    while let Some(lease) = claim_now(b, "large").await {
        got.push(lease.job.spec.payload.as_u64().expect("label") as usize);
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    assert_eq!(got, big.iter().map(|k| k.1).collect::<Vec<_>>(), "a new class sees what was pending");
}

/// A partition lives while it has an unfinished job: removed when its last one finishes (its flag
/// with it), recreated by the next submission or retry — also when the submission races the last
/// job's completion. Nothing is lost either way.
pub(super) async fn partitions_come_and_go<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let w = worker("w", &["simulation"], json!({"vram": 24}));
    let spec = |label: usize| shaped("simulation", 16, Some("acme".into()), 0, label);
    let first = b.submit(spec(0)).await.expect("submit").id;
    let partition = b.job(&first).await.expect("get").expect("exists").summary.partition;
    assert!(b.job(&first).await.expect("get").expect("exists").summary.unworkable, "nobody serves it yet");
    b.register_worker(w.clone()).await.expect("register");
    let lease = claim_now(b, "w").await.expect("claim");
    b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    // Removed with the job: the worker leaving (and its class, once idle long enough) flags nothing.
    b.deregister_worker("w").await.expect("deregister");
    fx.clock.advance(fleetq_core::class::CLASS_IDLE_MS);
    b.reap().await.expect("reap");
    b.evaluate_workability().await.expect("evaluate");
    assert_eq!(flags_of(b, &partition).await, vec![true, false]);
    // Recreated, flagged again (no worker), then served.
    let second = b.submit(spec(1)).await.expect("submit").id;
    assert!(b.job(&second).await.expect("get").expect("exists").summary.unworkable);
    b.register_worker(w.clone()).await.expect("register");
    assert_eq!(flags_of(b, &partition).await, vec![true, false, true, false]);
    let lease = claim_now(b, "w").await.expect("the recreated partition is claimable");
    assert_eq!(lease.job.summary.id, second);
    b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    // A retried job recreates its removed partition.
    let third = b.submit(spec(2)).await.expect("submit").id;
    assert_eq!(b.cancel(&third).await.expect("cancel"), CancelOutcome::Cancelled);
    b.retry(&third).await.expect("retry");
    let lease = claim_now(b, "w").await.expect("the retried job is claimable");
    assert_eq!(lease.job.summary.id, third);
    b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    // Submissions racing the completion of the partition's last job.
    let mut submitted = HashSet::new();
    let mut done = HashSet::new();
    let mut running = b.submit(spec(100)).await.expect("submit").id;
    submitted.insert(running.clone());
    for round in 0..40usize {
        let lease = claim_now(b, "w").await.expect("one job is pending");
        assert_eq!(lease.job.summary.id, running);
        let held = lease.as_ref();
        let (completed, next) = tokio::join!(b.complete(&held, json!(null)), b.submit(spec(101 + round)));
        completed.expect("complete");
        done.insert(running);
        running = next.expect("submit").id;
        submitted.insert(running.clone());
    }
    let lease = claim_now(b, "w").await.expect("the last submission is claimable");
    b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    done.insert(lease.job.summary.id);
    assert_eq!(done, submitted, "every racing submission was served");
    assert!(claim_now(b, "w").await.is_none());
}

/// Workers that match alike share a class. A new class is matched against the partitions already
/// pending; when its last worker leaves, the partitions only it served are flagged at once and the
/// class is kept for [`fleetq_core::class::CLASS_IDLE_MS`], then dropped; a worker that re-registers
/// with other capabilities changes class.
pub(super) async fn worker_classes_follow_registrations<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    for id in ["a1", "a2"] {
        b.register_worker(worker(id, &["simulation"], json!({"vram": 24}))).await.expect("register");
    }
    let mut ids = Vec::new();
    for i in 0..20usize {
        let vram = if i % 2 == 0 { 8 } else { 48 };
        ids.push(
            b.submit(shaped("simulation", vram, Some(format!("c{}", i % 5)), 0, i)).await.expect("submit").id,
        );
    }
    let big = b.job(&ids[1]).await.expect("get").expect("exists").summary.partition;
    let small = b.job(&ids[0]).await.expect("get").expect("exists").summary.partition;
    assert_eq!(flags_of(b, &big).await, vec![true]);
    b.register_worker(worker("b", &["simulation"], json!({"vram": 64}))).await.expect("register");
    assert_eq!(flags_of(b, &big).await, vec![true, false], "the new class serves it");
    // The last worker of a class leaving flags what only it served at once; the class itself is
    // kept a while (a worker coming back finds it ready), then the reaper drops it.
    b.deregister_worker("b").await.expect("deregister");
    assert_eq!(flags_of(b, &big).await, vec![true, false, true], "nobody serves it now");
    fx.clock.advance(fleetq_core::class::CLASS_IDLE_MS);
    for w in ["a1", "a2"] {
        b.heartbeat(w).await.expect("heartbeat");
    }
    b.reap().await.expect("reap");
    assert_eq!(flags_of(b, &big).await, vec![true, false, true], "dropping the idle class changes nothing");
    b.deregister_worker("a1").await.expect("deregister");
    assert!(flags_of(b, &small).await.is_empty(), "a2 still serves the small shape");
    // a2 upgrades: its class changes, the old one (now empty) is dropped.
    b.register_worker(worker("a2", &["simulation"], json!({"vram": 96}))).await.expect("register");
    assert_eq!(flags_of(b, &big).await, vec![true, false, true, false]);
    let mut got = Vec::new();
    while let Some(lease) = claim_now(b, "a2").await {
        got.push(lease.job.summary.id.clone());
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    assert_eq!(got, ids, "a2 serves both shapes, in order");
}

/// With fair share on (weights: gold 2), customers of equal priority take turns: one customer's
/// backlog delays another's single job by at most one job, backlogged customers are served by
/// weight, each customer's jobs stay in order, priority still comes first and a workflow's later
/// step keeps its first step's place.
pub(super) async fn fair_share_takes_turns<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("register");
    let job_of = |customer: &str, label: &str| {
        let mut s = sim(json!(label));
        s.customer_id = Some(customer.to_owned());
        s
    };
    let backlog: Vec<JobSpec> = (0..300).map(|i| job_of("big", &format!("big-{i}"))).collect();
    b.submit_batch(backlog).await.expect("batch");
    let mut log: Vec<String> = Vec::new();
    let take = async |n: usize, log: &mut Vec<String>| {
        for _ in 0..n {
            let lease = claim_now(b, "w").await.expect("pending work");
            log.push(lease.job.spec.payload.as_str().unwrap_or_default().to_owned());
            b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
        }
    };
    take(3, &mut log).await;
    fx.clock.advance(1);
    b.submit(job_of("small", "small-0")).await.expect("submit");
    take(2, &mut log).await;
    assert!(log[3..5].contains(&"small-0".to_owned()), "small waits behind at most one job: {log:?}");
    // Weighted turns between two backlogs: gold (weight 2) and big (1).
    let gold: Vec<JobSpec> = (0..100).map(|i| job_of("gold", &format!("gold-{i}"))).collect();
    b.submit_batch(gold).await.expect("batch");
    let before = log.len();
    take(60, &mut log).await;
    let golds = log[before..].iter().filter(|l| l.starts_with("gold")).count();
    assert!((38..=42).contains(&golds), "gold took {golds} of 60 turns, want ~40: {:?}", &log[before..]);
    // Priority first; a workflow's second step keeps the first step's place.
    let mut urgent = job_of("big", "urgent");
    urgent.priority = 5;
    let mut step1 = job_of("small", "step-1");
    step1.workflow_id = Some("wf-1".into());
    b.submit_batch(vec![urgent, step1.clone()]).await.expect("batch");
    take(1, &mut log).await;
    assert_eq!(log.last().map(String::as_str), Some("urgent"));
    take(2, &mut log).await;
    assert!(log[log.len() - 2..].contains(&"step-1".to_owned()), "step 1 has its turn: {log:?}");
    take(5, &mut log).await;
    let mut step2 = step1;
    step2.payload = json!("step-2");
    b.submit(step2).await.expect("submit");
    take(1, &mut log).await;
    assert_eq!(log.last().map(String::as_str), Some("step-2"), "the workflow kept its place");
    // Drain: every customer's jobs came in submission order.
    while let Some(lease) = claim_now(b, "w").await {
        log.push(lease.job.spec.payload.as_str().unwrap_or_default().to_owned());
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    for customer in ["big", "gold"] {
        let seen: Vec<usize> = log
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{customer}-")).and_then(|n| n.parse().ok()))
            .collect();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{customer} out of order: {seen:?}");
        assert_eq!(seen.len(), if customer == "big" { 300 } else { 100 });
    }
}

/// A worker that leaves and comes back (a restart after its registration expired: its class is
/// dropped and declared again) finds the work still pending for it, in order.
pub(super) async fn a_returning_worker_finds_its_pending_work<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let w = worker("w", &["simulation"], json!({"vram": 24}));
    b.register_worker(w.clone()).await.expect("register");
    let mut ids = Vec::new();
    for i in 0..6usize {
        ids.push(
            b.submit(shaped("simulation", 16, Some(format!("c{}", i % 3)), 0, i)).await.expect("submit").id,
        );
    }
    for _ in 0..3 {
        b.deregister_worker("w").await.expect("deregister");
        b.register_worker(w.clone()).await.expect("register again");
    }
    let mut got = Vec::new();
    while let Some(lease) = claim_now(b, "w").await {
        got.push(lease.job.summary.id.clone());
        b.complete(&lease.as_ref(), json!(null)).await.expect("complete");
    }
    assert_eq!(got, ids);
}

/// A paused service's jobs are not claimed (another service's are); resumed, they are claimed in
/// their order; the pause is evented, in the snapshot, and listed.
pub(super) async fn a_paused_service_is_not_claimed<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation", "other"], json!({}))).await.expect("register");
    let first = b.submit(sim(json!("first"))).await.expect("submit").id;
    let second = b.submit(sim(json!("second"))).await.expect("submit").id;
    assert!(b.pause_service("simulation", true).await.expect("pause"), "paused now");
    assert!(!b.pause_service("simulation", true).await.expect("pause"), "already paused: no change");
    let other = b.submit(JobSpec::new("other", json!(null))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("the other service's job");
    assert_eq!(lease.job.summary.id, other);
    assert!(claim_now(b, "w").await.is_none(), "nothing of the paused service is claimed");
    let snap = b.snapshot().await.expect("snapshot");
    assert!(snap.paused.contains("simulation"));
    assert_eq!(
        b.paused_services().await.expect("paused").into_iter().collect::<Vec<_>>(),
        vec!["simulation"]
    );
    assert!(b.pause_service("simulation", false).await.expect("resume"));
    let order: Vec<JobId> = [claim_now(b, "w").await, claim_now(b, "w").await]
        .into_iter()
        .map(|l| l.expect("claimed after the resume").job.summary.id)
        .collect();
    assert_eq!(order, vec![first, second], "in the same order as before the pause");
    let kinds: Vec<(String, bool)> = all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ServicePaused { service, paused } => Some((service.clone(), *paused)),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec![("simulation".to_owned(), true), ("simulation".to_owned(), false)]);
    let mut folded = snap;
    for e in b.events_after(folded.seq, 1000, Duration::ZERO).await.expect("events") {
        folded.apply(&e);
    }
    assert!(folded.paused.is_empty(), "the fold resumes it too");
    assert!(matches!(b.pause_service("", true).await, Err(BrokerError::Invalid(_))));
}
