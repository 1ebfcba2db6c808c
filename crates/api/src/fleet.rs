//! Fleet routes: workers, machines, services (seed 000's fleet shapes with `stale` added), the
//! snapshot, duration statistics and the global SSE stream.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use fleetq_broker::{Broker, ServiceDepth, fleet};
use fleetq_core::{ConnectorStatus, Event, JobId, WorkerInfo};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::model::{
    self, Activity, ConnectorView, ErrorBody, Instances, MachineView, Machines, ServiceSummary,
    ServiceSummaryReply, Services, SnapshotView, Stats, WorkerView, Workers,
};
use crate::request::TypedQuery;
use crate::state::AppState;
use crate::stream::FleetStreamQuery;
use crate::stream::{Feed, parse_topics, resume_point, topic};
use fleetq_core::clock::rfc3339;

fn worker_view(w: &WorkerInfo, running: &[JobId], stale_ms: i64, now: i64) -> WorkerView {
    WorkerView {
        registration: w.registration.clone(),
        registered_at: w.registered_at,
        last_seen: w.last_seen,
        connectors: w
            .connectors
            .iter()
            .map(|(service, r)| {
                (service.clone(), ConnectorView { report: r.clone(), stale: r.is_stale(now, stale_ms) })
            })
            .collect(),
        status: if running.is_empty() { Activity::Idle } else { Activity::Busy },
        current_jobs: running.to_vec(),
    }
}

/// `GET /api/workers`: every registered worker, with `status` (idle/busy), `current_jobs` and a
/// `stale` flag on each connector report.
#[utoipa::path(
    get,
    path = "/api/workers",
    operation_id = "list_workers",
    summary = "Registered workers with status, current jobs and connector reports",
    responses((status = 200, body = Workers))
)]
pub(crate) async fn workers<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Workers>> {
    let snap = st.broker.snapshot().await?;
    let running = fleet::running_by_worker(snap.jobs.values());
    let (stale, now) = (st.stale_after_ms(), st.broker.clock().now_ms());
    let list = snap
        .workers
        .values()
        .map(|w| {
            worker_view(
                w,
                running.get(w.registration.worker_id.as_str()).map_or(&[], Vec::as_slice),
                stale,
                now,
            )
        })
        .collect();
    Ok(Json(Workers { workers: list, seq: snap.seq }))
}

/// `GET /api/machines`: machines with their phase, startup steps and worker ids.
#[utoipa::path(
    get,
    path = "/api/machines",
    operation_id = "list_machines",
    summary = "Machines with phase, startup steps and workers",
    responses((status = 200, body = Machines))
)]
pub(crate) async fn machines<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Machines>> {
    let snap = st.broker.snapshot().await?;
    let mut by_machine: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for w in snap.workers.values() {
        by_machine.entry(&w.registration.machine_id).or_default().push(w.registration.worker_id.clone());
    }
    let mut out = Vec::new();
    for m in snap.machines.values() {
        let workers = by_machine.remove(m.machine_id.as_str()).unwrap_or_default();
        out.push(MachineView::from_state(m, workers));
    }
    // Machines known only through their workers (no lifecycle events yet).
    for (m, workers) in by_machine {
        out.push(MachineView {
            machine_id: m.to_owned(),
            phase: "unknown".into(),
            steps: Vec::new(),
            message: None,
            updated_at: None,
            workers,
        });
    }
    Ok(Json(Machines { machines: out, seq: snap.seq }))
}

/// One connector instance of a service.
struct Instance<'a> {
    worker: &'a WorkerInfo,
    status: ConnectorStatus,
    message: Option<&'a str>,
    at: i64,
    stale: bool,
    info: Option<&'a Value>,
}

fn instances_of<'a>(
    workers: &'a [WorkerInfo],
    stale_ms: i64,
    now: i64,
) -> BTreeMap<String, Vec<Instance<'a>>> {
    let mut out: BTreeMap<String, Vec<Instance<'a>>> = BTreeMap::new();
    for w in workers {
        for (service, r) in &w.connectors {
            out.entry(service.clone()).or_default().push(Instance {
                worker: w,
                status: r.status,
                message: r.message.as_deref(),
                at: r.at,
                stale: r.is_stale(now, stale_ms),
                info: r.info.as_ref(),
            });
        }
    }
    out
}

fn summary_of(
    list: &[Instance<'_>],
    depth: Option<&ServiceDepth>,
    durations: Option<crate::stats::Durations>,
    paused: bool,
) -> ServiceSummary {
    // A stale instance counts as stale only: the counts add up to the total.
    let count = |s: ConnectorStatus| list.iter().filter(|i| !i.stale && i.status == s).count();
    ServiceSummary {
        total: list.len(),
        starting: count(ConnectorStatus::Starting),
        idle: count(ConnectorStatus::Idle),
        active: count(ConnectorStatus::Active),
        error: count(ConnectorStatus::Error),
        offline: count(ConnectorStatus::Offline),
        stale: list.iter().filter(|i| i.stale).count(),
        paused,
        last_update: list.iter().map(|i| i.at).max().map(rfc3339),
        queue: depth.copied().unwrap_or_default().into(),
        durations,
    }
}

/// What the service routes read: workers with their connector reports, and queue depths.
struct Fleet {
    workers: Vec<WorkerInfo>,
    depths: BTreeMap<String, ServiceDepth>,
    paused: BTreeSet<String>,
    now: i64,
    stale_ms: i64,
}

impl Fleet {
    async fn read<B: Broker>(st: &AppState<B>) -> ApiResult<Self> {
        let workers = st.broker.workers().await?;
        let depths = st.broker.queue_depths().await?;
        let paused = st.broker.paused_services().await?;
        Ok(Self { workers, depths, paused, now: st.broker.clock().now_ms(), stale_ms: st.stale_after_ms() })
    }

    fn instances(&self) -> BTreeMap<String, Vec<Instance<'_>>> {
        instances_of(&self.workers, self.stale_ms, self.now)
    }
}

/// The instances of one service, or 404 when neither a worker nor a job knows it.
fn known<'a>(
    fleet: &Fleet,
    inst: &'a BTreeMap<String, Vec<Instance<'a>>>,
    service: &str,
) -> ApiResult<&'a [Instance<'a>]> {
    if !inst.contains_key(service) && !fleet.depths.contains_key(service) {
        return Err(ApiError::not_found(format!("no worker or job knows the service {service:?}")));
    }
    Ok(inst.get(service).map_or(&[][..], Vec::as_slice))
}

/// `GET /api/services`: per service, instance counts by connector status (+ stale), queue depth and
/// duration statistics.
#[utoipa::path(
    get,
    path = "/api/services",
    operation_id = "list_services",
    summary = "Per service: instances by connector status, stale, queue depth, durations",
    responses((status = 200, body = Services))
)]
pub(crate) async fn services<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Services>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let names: BTreeSet<&String> =
        inst.keys().chain(fleet.depths.keys()).chain(fleet.paused.iter()).collect();
    let services = names
        .into_iter()
        .map(|s| {
            let list = inst.get(s).map_or(&[][..], Vec::as_slice);
            let paused = fleet.paused.contains(s);
            (s.clone(), summary_of(list, fleet.depths.get(s), st.stats.estimate(s, None), paused))
        })
        .collect();
    Ok(Json(Services { success: true, services, timestamp: rfc3339(fleet.now) }))
}

/// `GET /api/services/{service}/summary`.
#[utoipa::path(
    get,
    path = "/api/services/{service}/summary",
    operation_id = "service_summary",
    summary = "One service's summary",
    params(("service" = String, Path, description = "Service name")),
    responses((status = 200, body = ServiceSummaryReply), (status = 404, body = ErrorBody))
)]
pub(crate) async fn summary<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<ServiceSummaryReply>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let list = known(&fleet, &inst, &service)?;
    let paused = fleet.paused.contains(&service);
    let summary = summary_of(list, fleet.depths.get(&service), st.stats.estimate(&service, None), paused);
    Ok(Json(ServiceSummaryReply {
        success: true,
        service_type: service,
        timestamp: rfc3339(fleet.now),
        summary,
    }))
}

/// `GET /api/services/{service}/instances`.
#[utoipa::path(
    get,
    path = "/api/services/{service}/instances",
    operation_id = "service_instances",
    summary = "One service's connector instances",
    params(("service" = String, Path, description = "Service name")),
    responses((status = 200, body = Instances), (status = 404, body = ErrorBody))
)]
pub(crate) async fn instances<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Instances>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let list: Vec<model::Instance> = known(&fleet, &inst, &service)?
        .iter()
        .map(|i| {
            let reg = &i.worker.registration;
            model::Instance {
                id: format!("{}:{}", reg.machine_id, reg.worker_id),
                machine_id: reg.machine_id.clone(),
                worker_id: reg.worker_id.clone(),
                status: i.status,
                last_update: rfc3339(i.at),
                error_message: i.message.map(str::to_owned),
                stale: i.stale,
                info: i.info.cloned(),
            }
        })
        .collect();
    Ok(Json(Instances {
        success: true,
        service_type: service,
        total: list.len(),
        instances: list,
        timestamp: rfc3339(fleet.now),
    }))
}

/// `GET /api/snapshot`: unfinished jobs, workers and machines as of `seq`.
#[utoipa::path(
    get,
    path = "/api/snapshot",
    operation_id = "snapshot",
    summary = "Unfinished jobs, workers and machines as of a sequence",
    responses((status = 200, body = SnapshotView))
)]
pub(crate) async fn snapshot<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
) -> ApiResult<Json<SnapshotView>> {
    let mut snapshot = st.broker.snapshot().await?;
    // A submit token sees its own jobs only (the fleet's workers and machines as everyone).
    if let Some(owner) = crate::jobs::scoped_owner(caller.as_ref().map(|axum::Extension(c)| c)) {
        snapshot.jobs.retain(|_, j| j.owner.as_deref() == Some(owner));
    }
    Ok(Json(SnapshotView { snapshot, stale_after_ms: st.stale_after_ms() }))
}

/// `GET /api/stats`: rolling run-time statistics per service.
#[utoipa::path(
    get,
    path = "/api/stats",
    operation_id = "stats",
    summary = "Rolling run-time statistics (p50/p90) per service",
    responses((status = 200, body = Stats))
)]
pub(crate) async fn stats<B: Broker>(State(st): State<AppState<B>>) -> Json<Stats> {
    Json(Stats { services: st.stats.services() })
}

/// `GET /api/events`: SSE of every event (`id` = sequence, `event` = kind), filtered by
/// `topics=jobs,workers,connectors,machines`, resumable with `Last-Event-ID` or `since`. Without a
/// resume point it starts at the present; a resume point trimmed from the log yields a `resync`
/// event (reload `/api/snapshot`).
#[utoipa::path(
    get,
    path = "/api/events",
    operation_id = "events",
    summary = "SSE of all events; topics filter; Last-Event-ID resume",
    description = "Each SSE event has `id` = event id (`seq`, or `seq.epoch` after the log went back), `event` = the kind, `data` = the Event. A resume point trimmed from the log, or past its end, yields one `resync` event (`{type, after, first}`): reload `/api/snapshot`. With the `workers` or `connectors` topic, a `workers_seen` event without id comes every third of `--stale-after-s`: `{type, at, workers: {ID: {last_seen, connectors: {SERVICE: at}}}}`, the latest heartbeats (which are not events of the log).",
    params(
        FleetStreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id: `seq`, or `seq.epoch` once the log's epoch moved on; an id of another epoch yields `resync`"),
    ),
    responses((status = 200, description = "text/event-stream; each `data` is an Event", content_type = "text/event-stream", body = Event), (status = 400, body = ErrorBody))
)]
pub(crate) async fn events<B: Broker>(
    State(st): State<AppState<B>>,
    headers: HeaderMap,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    TypedQuery(q): TypedQuery<FleetStreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let topics = parse_topics(q.topics.as_deref())?;
    // A submit token follows its own jobs' events only.
    let owner: Option<String> =
        crate::jobs::scoped_owner(caller.as_ref().map(|axum::Extension(c)| c)).map(str::to_owned);
    let resume = resume_point(&headers, q.since.as_deref())?;
    // The place among the open streams first: a client that will be refused costs no snapshot.
    let permit = st.stream_permit()?;
    let (after, epoch) = match resume {
        Some(r) => (r.seq, Some(r.epoch)),
        None => (st.broker.snapshot().await?.seq, None),
    };
    let hub = st.hub.clone();
    let stream = st
        .feed_from(after, epoch)
        .filter_map(move |item| {
            // The stream holds its place among the server's open streams until it ends.
            let _held = &permit;
            let out = match item {
                Feed::Gap { after, first } => Some(
                    SseEvent::default()
                        .event("resync")
                        .data(json!({"type": "resync", "after": after, "first": first}).to_string()),
                ),
                Feed::Event(ev)
                    if topics.contains(topic(&ev.kind))
                        && owner
                            .as_deref()
                            .is_none_or(|o| ev.kind.job().is_none_or(|j| j.owner.as_deref() == Some(o))) =>
                {
                    Some(
                        SseEvent::default()
                            .id(hub.event_id(ev.seq))
                            .event(ev.kind.name())
                            .data(serde_json::to_string(&*ev).unwrap_or_default()),
                    )
                }
                Feed::Event(_) => None,
                Feed::Seen(seen) if topics.contains("workers") || topics.contains("connectors") => {
                    // No id: it is no event of the log, and a resume never asks for it.
                    Some(SseEvent::default().event("workers_seen").data(seen.json.clone()))
                }
                Feed::Seen(_) => None,
            };
            std::future::ready(out.map(Ok))
        })
        .take_until(st.config.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
