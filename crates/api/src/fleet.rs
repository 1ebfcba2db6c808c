//! Fleet routes: workers, machines, services (seed 000's fleet shapes with `stale` added), the
//! snapshot, duration statistics and the global SSE stream.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use fleetq_broker::{Broker, ServiceDepth};
use fleetq_core::{ConnectorStatus, Snapshot, WorkerInfo};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{Params, now_ms, params};
use crate::stats::rfc3339;
use crate::stream::{Feed, feed, parse_topics, resume_point, topic};

/// Running job ids per worker, from a snapshot.
fn running_by_worker(snap: &Snapshot) -> BTreeMap<&str, Vec<&str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for j in snap.jobs.values().filter(|j| j.status.is_running()) {
        if let Some(w) = &j.worker_id {
            out.entry(w.as_str()).or_default().push(j.id.0.as_str());
        }
    }
    out
}

fn worker_json(w: &WorkerInfo, running: &[&str], stale_ms: i64, now: i64) -> Value {
    let mut v = serde_json::to_value(w).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("status".into(), json!(if running.is_empty() { "idle" } else { "busy" }));
        obj.insert("current_jobs".into(), json!(running));
        if let Some(conns) = obj.get_mut("connectors").and_then(Value::as_object_mut) {
            for (service, c) in conns.iter_mut() {
                let stale = w.connectors.get(service).is_some_and(|r| now - r.at > stale_ms);
                if let Some(c) = c.as_object_mut() {
                    c.insert("stale".into(), json!(stale));
                }
            }
        }
    }
    v
}

/// `GET /api/workers`: every registered worker, with `status` (idle/busy), `current_jobs` and a
/// `stale` flag on each connector report.
pub(crate) async fn workers<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Value>> {
    let snap = st.broker.snapshot().await?;
    let running = running_by_worker(&snap);
    let (stale, now) = (st.config.stale_after.as_millis() as i64, now_ms());
    let list: Vec<Value> = snap
        .workers
        .values()
        .map(|w| {
            worker_json(
                w,
                running.get(w.registration.worker_id.as_str()).map_or(&[], Vec::as_slice),
                stale,
                now,
            )
        })
        .collect();
    Ok(Json(json!({"workers": list, "seq": snap.seq})))
}

/// `GET /api/machines`: machines with their phase, startup steps and worker ids.
pub(crate) async fn machines<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Value>> {
    let snap = st.broker.snapshot().await?;
    let mut by_machine: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in snap.workers.values() {
        by_machine.entry(&w.registration.machine_id).or_default().push(&w.registration.worker_id);
    }
    let mut out: Vec<Value> = Vec::new();
    let mut seen = BTreeSet::new();
    for m in snap.machines.values() {
        seen.insert(m.machine_id.as_str());
        let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "workers".into(),
                json!(by_machine.get(m.machine_id.as_str()).cloned().unwrap_or_default()),
            );
        }
        out.push(v);
    }
    // Machines known only through their workers (no lifecycle events yet).
    for (m, ws) in &by_machine {
        if !seen.contains(m) {
            out.push(json!({"machine_id": m, "phase": "unknown", "steps": [], "workers": ws}));
        }
    }
    Ok(Json(json!({"machines": out, "seq": snap.seq})))
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
                stale: now - r.at > stale_ms,
                info: r.info.as_ref(),
            });
        }
    }
    out
}

fn summary_json(
    list: &[Instance<'_>],
    depth: Option<&ServiceDepth>,
    durations: Option<crate::stats::Durations>,
) -> Value {
    let count = |s: ConnectorStatus| list.iter().filter(|i| i.status == s).count();
    let last = list.iter().map(|i| i.at).max();
    json!({
        "total": list.len(),
        "starting": count(ConnectorStatus::Starting),
        "idle": count(ConnectorStatus::Idle),
        "active": count(ConnectorStatus::Active),
        "error": count(ConnectorStatus::Error),
        "offline": count(ConnectorStatus::Offline),
        "stale": list.iter().filter(|i| i.stale).count(),
        "last_update": last.map(rfc3339),
        "queue": depth.copied().unwrap_or_default(),
        "durations": durations,
    })
}

/// What the service routes read: workers with their connector reports, and queue depths.
struct Fleet {
    workers: Vec<WorkerInfo>,
    depths: BTreeMap<String, ServiceDepth>,
    now: i64,
    stale_ms: i64,
}

impl Fleet {
    async fn read<B: Broker>(st: &AppState<B>) -> ApiResult<Self> {
        let workers = st.broker.workers().await?;
        let depths = st.broker.queue_depths().await?;
        Ok(Self { workers, depths, now: now_ms(), stale_ms: st.config.stale_after.as_millis() as i64 })
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
pub(crate) async fn services<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Value>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let names: BTreeSet<&String> = inst.keys().chain(fleet.depths.keys()).collect();
    let services: serde_json::Map<String, Value> = names
        .into_iter()
        .map(|s| {
            let list = inst.get(s).map_or(&[][..], Vec::as_slice);
            (s.clone(), summary_json(list, fleet.depths.get(s), st.stats.estimate(s, None)))
        })
        .collect();
    Ok(Json(json!({"success": true, "services": services, "timestamp": rfc3339(fleet.now)})))
}

/// `GET /api/services/{service}/summary`.
pub(crate) async fn summary<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Value>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let list = known(&fleet, &inst, &service)?;
    let mut v = summary_json(list, fleet.depths.get(&service), st.stats.estimate(&service, None));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("success".into(), json!(true));
        obj.insert("service_type".into(), json!(service));
        obj.insert("timestamp".into(), json!(rfc3339(fleet.now)));
    }
    Ok(Json(v))
}

/// `GET /api/services/{service}/instances`.
pub(crate) async fn instances<B: Broker>(
    State(st): State<AppState<B>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Value>> {
    let fleet = Fleet::read(&st).await?;
    let inst = fleet.instances();
    let list: Vec<Value> = known(&fleet, &inst, &service)?
        .iter()
        .map(|i| {
            let reg = &i.worker.registration;
            json!({
                "id": format!("{}:{}", reg.machine_id, reg.worker_id),
                "machine_id": reg.machine_id,
                "worker_id": reg.worker_id,
                "status": i.status,
                "last_update": rfc3339(i.at),
                "error_message": i.message,
                "stale": i.stale,
                "info": i.info,
            })
        })
        .collect();
    let total = list.len();
    Ok(Json(json!({
        "success": true, "service_type": service, "instances": list, "total": total, "timestamp": rfc3339(fleet.now),
    })))
}

/// `GET /api/snapshot`: unfinished jobs, workers and machines as of `seq`.
pub(crate) async fn snapshot<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Snapshot>> {
    Ok(Json(st.broker.snapshot().await?))
}

/// `GET /api/stats`: rolling run-time statistics per service.
pub(crate) async fn stats<B: Broker>(State(st): State<AppState<B>>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"services": st.stats.services()})))
}

/// `GET /api/events`: SSE of every event (`id` = sequence, `event` = kind), filtered by
/// `topics=jobs,workers,connectors,machines`, resumable with `Last-Event-ID` or `since`. Without a
/// resume point it starts at the present; a resume point trimmed from the log yields a `resync`
/// event (reload `/api/snapshot`).
pub(crate) async fn events<B: Broker>(
    State(st): State<AppState<B>>,
    headers: HeaderMap,
    q: Params,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let p = params(q, &["topics", "since", "access_token"])?;
    let topics = parse_topics(p.get("topics").map(String::as_str))?;
    let after = match resume_point(&headers, p.get("since").map(String::as_str))? {
        Some(a) => a,
        None => st.broker.snapshot().await?.seq,
    };
    let stream = feed(st.broker.clone(), after)
        .filter_map(move |item| {
            let out = match item {
                Feed::Gap { after, first } => Some(
                    SseEvent::default()
                        .event("resync")
                        .data(json!({"type": "resync", "after": after, "first": first}).to_string()),
                ),
                Feed::Event(ev) if topics.contains(topic(&ev.kind)) => Some(
                    SseEvent::default()
                        .id(ev.seq.to_string())
                        .event(ev.kind.name())
                        .data(serde_json::to_string(&*ev).unwrap_or_default()),
                ),
                Feed::Event(_) => None,
            };
            std::future::ready(out.map(Ok))
        })
        .take_until(st.config.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
