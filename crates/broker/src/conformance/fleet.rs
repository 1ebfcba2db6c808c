//! Conformance cases: fleet.

use super::*;

/// Registration, heartbeat, invalid re-registration, deregistration and expiry.
pub(super) async fn worker_presence_lifecycle<B: Broker>(fx: Fixture<B>) {
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
pub(super) async fn connector_status_changes_only<B: Broker>(fx: Fixture<B>) {
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
pub(super) async fn machine_events_fold<B: Broker>(fx: Fixture<B>) {
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

/// The fleet view of one job: matching workers first (idle before busy), then the others with reasons.
pub(super) async fn matching_workers_explain_the_fleet<B: Broker>(fx: Fixture<B>) {
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
