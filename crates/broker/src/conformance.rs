//! The conformance suite: every broker guarantee written once, generic over the backend.
//!
//! A backend's test file instantiates all of it with [`conformance_tests!`](crate::conformance_tests),
//! giving an async function that builds a fresh [`Fixture`]. Time only moves through the fixture's
//! [`crate::ManualClock`]; nothing here sleeps to make something happen.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fleetq_core::{
    ConnectorReport, ConnectorStatus, Event, EventKind, FailureCategory, JobError, JobId, JobSpec, JobStatus,
    MachineEvent, MachinePhase, Snapshot, WorkerRegistration, explain,
};
use serde_json::{Value, json};

pub use crate::testing::Fixture;
use crate::{Broker, BrokerError, CancelOutcome, FailOutcome, JobFilter, LeaseRef, QueueFilter};

/// Instantiates every conformance case as a `#[tokio::test]` calling `$make(config).await` for its
/// fixture, with the configuration [`config_for`] gives the case.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@cases $make;
            submit_get_and_idempotency, invalid_submission_changes_nothing, batch_is_all_or_nothing,
            claim_follows_exact_order, claim_needs_registered_worker, matching_rules_through_broker,
            incompatible_heads_do_not_hide_compatible_jobs, workflow_restricted_worker,
            claim_blocks_until_a_job_arrives, claim_wait_expires_empty, fencing_rejects_stale_holder,
            killed_worker_job_comes_back, concurrent_claimers_never_share_a_job, terminal_events_exactly_once,
            snapshot_and_events_converge, retry_backoff_keeps_place, retry_prefers_another_worker,
            attempts_exhausted_and_fatal_errors_fail, cancel_pending_and_running, progress_is_coalesced,
            release_for_shutdown_refunds_attempt, manual_retry_requeues, unworkable_jobs_are_flagged,
            worker_presence_lifecycle, connector_status_changes_only, machine_events_fold,
            job_listing_pages, oversized_result_is_refused, events_after_waits_for_news,
            complete_and_claim_hands_over_next_job, lease_renewal_extends_deadline,
            event_log_is_capped_by_age, matching_workers_explain_the_fleet, queue_depths_per_service,
            queue_position_and_order_at_a_large_backlog, idempotency_keys_are_scoped_by_owner,
            numbers_are_bounded_and_time_limits_defaulted, the_log_epoch_moves_on_once,
            order_holds_across_many_partitions, partitions_come_and_go, worker_classes_follow_registrations,
            fair_share_takes_turns, a_returning_worker_finds_its_pending_work,
            an_ended_attempt_leaves_no_message, service_crashes_spend_no_attempt_until_the_second,
            cancel_is_signalled_to_the_holder, a_retry_can_require_more, the_record_tells_how_each_attempt_ended);
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let fixture = $make($crate::conformance::config_for(stringify!($case))).await;
                $crate::conformance::$case(fixture).await;
            }
        )*
    };
}

/// The broker configuration of a case: [`crate::testing::test_config`], except that the cases about
/// wake-ups re-check only every 120 s — longer than their 60 s waits and 30 s bounds — so only a
/// real wake-up passes them, never a periodic re-check — and the fair share case turns it on.
pub fn config_for(case: &str) -> crate::BrokerConfig {
    let config = crate::testing::test_config();
    match case {
        "claim_blocks_until_a_job_arrives" | "events_after_waits_for_news" => {
            crate::BrokerConfig { claim_recheck_ms: 120_000, ..config }
        }
        "fair_share_takes_turns" => crate::BrokerConfig {
            fair_share: Some(crate::FairShare {
                enabled: true,
                weights: [("gold".to_owned(), 2)].into_iter().collect(),
            }),
            ..config
        },
        _ => config,
    }
}

fn worker(id: &str, services: &[&str], caps: Value) -> WorkerRegistration {
    WorkerRegistration {
        worker_id: id.into(),
        machine_id: "m1".into(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        capabilities: serde_json::from_value(caps).expect("capabilities object"),
    }
}

fn job(v: Value) -> JobSpec {
    fleetq_core::job_spec_from_value(v, &fleetq_core::Limits::default()).expect("valid job")
}

fn sim(payload: Value) -> JobSpec {
    JobSpec::new("simulation", payload)
}

async fn all_events<B: Broker>(b: &B) -> Vec<Event> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = b.events_after(after, 1000, Duration::ZERO).await.expect("events");
        match page.last() {
            Some(last) => after = last.seq,
            None => return out,
        }
        out.extend(page);
    }
}

async fn status<B: Broker>(b: &B, id: &JobId) -> JobStatus {
    b.job(id).await.expect("job query").expect("job exists").summary.status
}

async fn claim_now<B: Broker>(b: &B, worker: &str) -> Option<crate::Lease> {
    b.claim(worker, Duration::ZERO).await.expect("claim")
}

/// Submit returns ids; get returns the record; an idempotency key returns the first job.
pub async fn submit_get_and_idempotency<B: Broker>(fx: Fixture<B>) {
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
pub async fn invalid_submission_changes_nothing<B: Broker>(fx: Fixture<B>) {
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
pub async fn batch_is_all_or_nothing<B: Broker>(fx: Fixture<B>) {
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

/// Priority (workflow priority when set) first, then time (workflow time when set), then submission.
pub async fn claim_follows_exact_order<B: Broker>(fx: Fixture<B>) {
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
pub async fn claim_needs_registered_worker<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.submit(sim(json!(1))).await.expect("submit");
    assert!(
        matches!(b.claim("ghost", Duration::ZERO).await, Err(BrokerError::UnknownWorker(w)) if w == "ghost")
    );
}

/// Each job goes only to a worker that `explain` says matches, and every job that some worker
/// matches is claimed.
pub async fn matching_rules_through_broker<B: Broker>(fx: Fixture<B>) {
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
pub async fn incompatible_heads_do_not_hide_compatible_jobs<B: Broker>(fx: Fixture<B>) {
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
pub async fn workflow_restricted_worker<B: Broker>(fx: Fixture<B>) {
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
pub async fn claim_blocks_until_a_job_arrives<B: Broker>(fx: Fixture<B>) {
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
pub async fn claim_wait_expires_empty<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    assert!(b.claim("w", Duration::from_millis(50)).await.expect("claim").is_none());
}

/// The seeds' timeout-vs-completion race: a job times out, is re-claimed, and the first holder's late
/// completion is rejected without changing anything.
pub async fn fencing_rejects_stale_holder<B: Broker>(fx: Fixture<B>) {
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
pub async fn killed_worker_job_comes_back<B: Broker>(fx: Fixture<B>) {
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
pub async fn concurrent_claimers_never_share_a_job<B: Broker>(fx: Fixture<B>) {
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

/// Every job gets exactly one terminal event, whatever path it took.
pub async fn terminal_events_exactly_once<B: Broker>(fx: Fixture<B>) {
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
pub async fn snapshot_and_events_converge<B: Broker>(fx: Fixture<B>) {
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
    let _l3 = claim_now(b, "late").await.expect("claim");
    b.deregister_worker("early").await.expect("deregister");
    let mut folded = early.clone();
    for e in b.events_after(early.seq, 10_000, Duration::ZERO).await.expect("events") {
        folded.apply(&e);
    }
    let fresh = b.snapshot().await.expect("snapshot");
    assert_eq!(folded.seq, fresh.seq);
    assert_eq!(normalized(folded), normalized(fresh.clone()));
    assert_eq!(fresh.workers.len(), 1);
    assert!(fresh.jobs.values().any(|j| j.unworkable), "the unservable job is flagged");
    assert_eq!(fresh.machines["m1"].steps, vec!["pull"]);
    // Folding everything from zero converges too.
    let mut from_zero = Snapshot::default();
    for e in all_events(b).await {
        from_zero.apply(&e);
    }
    assert_eq!(normalized(from_zero), normalized(fresh));
}

/// A retryable failure waits out its backoff and keeps its place in the order.
pub async fn retry_backoff_keeps_place<B: Broker>(fx: Fixture<B>) {
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
pub async fn retry_prefers_another_worker<B: Broker>(fx: Fixture<B>) {
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
pub async fn attempts_exhausted_and_fatal_errors_fail<B: Broker>(fx: Fixture<B>) {
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
pub async fn cancel_pending_and_running<B: Broker>(fx: Fixture<B>) {
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
pub async fn progress_is_coalesced<B: Broker>(fx: Fixture<B>) {
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
pub async fn release_for_shutdown_refunds_attempt<B: Broker>(fx: Fixture<B>) {
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
pub async fn manual_retry_requeues<B: Broker>(fx: Fixture<B>) {
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

/// A job nobody can serve is flagged, and unflagged when a capable worker arrives.
pub async fn unworkable_jobs_are_flagged<B: Broker>(fx: Fixture<B>) {
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

/// Registration, heartbeat, invalid re-registration, deregistration and expiry.
pub async fn worker_presence_lifecycle<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let w = worker("w1", &["comfyui"], json!({"gpu": "A100"}));
    b.register_worker(w.clone()).await.expect("reg");
    let mut bad = w.clone();
    bad.machine_id = String::new();
    assert!(matches!(b.register_worker(bad).await, Err(BrokerError::Invalid(e)) if e.field == "machine_id"));
    let listed = b.workers().await.expect("workers");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].registration, w, "a rejected re-registration blanks nothing");
    fx.clock.advance(b.config().worker_ttl_ms / 2);
    b.heartbeat("w1").await.expect("heartbeat");
    b.register_worker(worker("w2", &["a1111"], json!({}))).await.expect("reg");
    fx.clock.advance(b.config().worker_ttl_ms / 2 + 1);
    assert_eq!(b.reap().await.expect("reap").workers_expired, 0);
    b.heartbeat("w2").await.expect("heartbeat");
    fx.clock.advance(b.config().worker_ttl_ms / 2 + 1);
    let report = b.reap().await.expect("reap");
    assert_eq!(report.workers_expired, 1, "w1 went silent");
    assert!(matches!(b.heartbeat("w1").await, Err(BrokerError::UnknownWorker(_))));
    b.deregister_worker("w2").await.expect("deregister");
    assert!(b.workers().await.expect("workers").is_empty());
    let reasons: Vec<String> = all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::WorkerRemoved { worker_id, reason } => Some(format!("{worker_id}:{reason}")),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec!["w1:expired", "w2:deregistered"]);
}

/// Connector reports are stored, and only changes are evented.
pub async fn connector_status_changes_only<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["comfyui"], json!({}))).await.expect("reg");
    let report =
        |status, at| ConnectorReport { service: "comfyui".into(), status, message: None, at, info: None };
    for (s, at) in [
        (ConnectorStatus::Starting, 1),
        (ConnectorStatus::Idle, 2),
        (ConnectorStatus::Idle, 3),
        (ConnectorStatus::Idle, 4),
        (ConnectorStatus::Offline, 5),
    ] {
        b.report_connector("w", report(s, at)).await.expect("report");
    }
    // A refresh with the same status updates the time and service info without an event.
    let refresh = ConnectorReport { info: Some(json!({"queue": 1})), ..report(ConnectorStatus::Offline, 6) };
    b.report_connector("w", refresh).await.expect("refresh");
    let statuses: Vec<ConnectorStatus> = all_events(b)
        .await
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ConnectorStatus { report, .. } => Some(report.status),
            _ => None,
        })
        .collect();
    assert_eq!(statuses, vec![ConnectorStatus::Starting, ConnectorStatus::Idle, ConnectorStatus::Offline]);
    let w = b.workers().await.expect("workers").remove(0);
    assert_eq!(w.connectors["comfyui"].status, ConnectorStatus::Offline);
    assert_eq!(w.connectors["comfyui"].at, 6);
    assert_eq!(w.connectors["comfyui"].info, Some(json!({"queue": 1})));
    assert!(matches!(
        b.report_connector("ghost", report(ConnectorStatus::Idle, 1)).await,
        Err(BrokerError::UnknownWorker(_))
    ));
}

/// Machine events fold into machine state.
pub async fn machine_events_fold<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    let ev = |phase: MachinePhase, step: Option<&str>| MachineEvent {
        machine_id: "box1".into(),
        phase,
        step: step.map(Into::into),
        message: None,
        at: 5,
    };
    for e in [
        ev(MachinePhase::Starting, None),
        ev(MachinePhase::Step, Some("comfyui-gpu0")),
        ev(MachinePhase::Step, Some("comfyui-gpu1")),
        ev(MachinePhase::Ready, None),
    ] {
        b.machine_event(e).await.expect("machine");
    }
    let mut bad = ev(MachinePhase::Ready, None);
    bad.machine_id = "no spaces".into();
    assert!(matches!(b.machine_event(bad).await, Err(BrokerError::Invalid(e)) if e.field == "machine_id"));
    let machines = b.machines().await.expect("machines");
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0].phase, MachinePhase::Ready);
    assert_eq!(machines[0].steps, vec!["comfyui-gpu0", "comfyui-gpu1"]);
}

/// Listing pages newest first with a cursor, filtered by status and service.
pub async fn job_listing_pages<B: Broker>(fx: Fixture<B>) {
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
}

/// A result over the limit is refused and the job stays with its holder.
pub async fn oversized_result_is_refused<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    b.register_worker(worker("w", &["simulation"], json!({}))).await.expect("reg");
    let id = b.submit(sim(json!(1))).await.expect("submit").id;
    let lease = claim_now(b, "w").await.expect("claim");
    let big = json!("x".repeat(b.config().max_result_bytes + 1));
    assert!(matches!(b.complete(&lease.as_ref(), big).await, Err(BrokerError::ResultTooLarge { .. })));
    assert_eq!(status(b, &id).await, JobStatus::Assigned);
    b.complete(&lease.as_ref(), json!({"images": ["ref://bucket/1.png"]})).await.expect("complete");
}

/// `events_after` blocks until an event arrives; the subscription stream continues without gaps.
///
/// A 60 s wait bounded by 30 s: only a wake-up on the new event passes, not a backend that waits
/// out its wait (or a re-check, which the fixture sets to 120 s).
pub async fn events_after_waits_for_news<B: Broker>(fx: Fixture<B>) {
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

/// Completing can hand back the worker's next job in the same step.
pub async fn complete_and_claim_hands_over_next_job<B: Broker>(fx: Fixture<B>) {
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
pub async fn lease_renewal_extends_deadline<B: Broker>(fx: Fixture<B>) {
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

/// `reap` drops events older than the age cap; newer ones and the sequence are untouched.
pub async fn event_log_is_capped_by_age<B: Broker>(fx: Fixture<B>) {
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

/// The fleet view of one job: matching workers first (idle before busy), then the others with reasons.
pub async fn matching_workers_explain_the_fleet<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    for (id, vram) in [("a-small", 8), ("b-big", 48), ("c-big", 48)] {
        b.register_worker(worker(id, &["comfyui"], json!({"vram": vram}))).await.expect("reg");
    }
    let busy_job = b
        .submit(job(json!({"service": "comfyui", "priority": 9, "requirements": {"vram": 40}})))
        .await
        .expect("submit")
        .id;
    let lease = claim_now(b, "b-big").await.expect("claim");
    assert_eq!(lease.job.summary.id, busy_job);
    let id =
        b.submit(job(json!({"service": "comfyui", "requirements": {"vram": 24}}))).await.expect("submit").id;
    let verdicts = crate::fleet::matching_workers(b, &id).await.expect("matching workers");
    let summary: Vec<(String, bool, bool)> = verdicts
        .iter()
        .map(|v| (v.worker.registration.worker_id.clone(), v.verdict.matches, v.busy))
        .collect();
    assert_eq!(
        summary,
        vec![("c-big".into(), true, false), ("b-big".into(), true, true), ("a-small".into(), false, false)]
    );
    assert_eq!(verdicts[2].verdict.reasons, vec!["requirement vram: needs at least 24, worker has 8"]);
    assert!(matches!(
        crate::fleet::matching_workers(b, &JobId("nope".into())).await,
        Err(BrokerError::JobNotFound(_))
    ));
}

/// Pending, delayed and running counts per service.
pub async fn queue_depths_per_service<B: Broker>(fx: Fixture<B>) {
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
pub async fn queue_position_and_order_at_a_large_backlog<B: Broker>(fx: Fixture<B>) {
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

/// An idempotency key belongs to its owner: another owner's job with the same key is a new job,
/// not a replay of the first (which it could neither see nor squat).
pub async fn idempotency_keys_are_scoped_by_owner<B: Broker>(fx: Fixture<B>) {
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
pub async fn numbers_are_bounded_and_time_limits_defaulted<B: Broker>(fx: Fixture<B>) {
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

/// The log's epoch starts at 0 and moves on once per going-back, however many processes noticed it.
pub async fn the_log_epoch_moves_on_once<B: Broker>(fx: Fixture<B>) {
    let b = fx.broker.as_ref();
    assert_eq!(b.log_epoch().await.expect("epoch"), 0);
    assert_eq!(b.advance_log_epoch(0).await.expect("advance"), 1);
    assert_eq!(b.advance_log_epoch(0).await.expect("a second noticer"), 1, "moved on once");
    assert_eq!(b.log_epoch().await.expect("epoch"), 1);
    assert_eq!(b.advance_log_epoch(1).await.expect("the next going-back"), 2);
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
pub async fn order_holds_across_many_partitions<B: Broker>(fx: Fixture<B>) {
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
pub async fn partitions_come_and_go<B: Broker>(fx: Fixture<B>) {
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
pub async fn worker_classes_follow_registrations<B: Broker>(fx: Fixture<B>) {
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
pub async fn fair_share_takes_turns<B: Broker>(fx: Fixture<B>) {
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
pub async fn a_returning_worker_finds_its_pending_work<B: Broker>(fx: Fixture<B>) {
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

/// A message belongs to its attempt: a completed job and a job given back for another attempt no
/// longer show the ended attempt's last message ("queued in ComfyUI", "node 4").
pub async fn an_ended_attempt_leaves_no_message<B: Broker>(fx: Fixture<B>) {
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
pub async fn service_crashes_spend_no_attempt_until_the_second<B: Broker>(fx: Fixture<B>) {
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

/// A cancel of a running job is signalled to its holder at once: a worker waiting for signals is
/// woken with the job's id (the bound is 30 s; the signal comes with the cancel). Other workers
/// hear nothing, a pending job's cancel signals nobody, and a signal is delivered once.
pub async fn cancel_is_signalled_to_the_holder<B: Broker>(fx: Fixture<B>) {
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

/// A failure that raises the job's requirements (out of memory: more GPU memory) moves its retry
/// to the partition of the new requirements: only a worker meeting them takes it, the rest of the
/// spec is kept, and the old partition serves new jobs as before. A job that is not retried keeps
/// its requirements; raised past every worker, it is flagged unworkable.
pub async fn a_retry_can_require_more<B: Broker>(fx: Fixture<B>) {
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
pub async fn the_record_tells_how_each_attempt_ended<B: Broker>(fx: Fixture<B>) {
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
}
