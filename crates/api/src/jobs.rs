//! Job routes: submit (one or a batch, `Idempotency-Key`), get (with queue position and ETA), list,
//! cancel, retry, the per-job SSE stream, matching workers and artifact download.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fleetq_broker::{Broker, CancelOutcome, JobFilter, QueueFilter, fleet};
use fleetq_core::{Event, JobId, JobSpec, JobStatus, ValidationError, job_spec_shape};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::model::{
    BatchSubmitted, CancelResult, Cancelled, ErrorBody, Estimate, JobPage, JobView, MatchingWorkers, Retried,
    Submission, SubmitReply, Submitted, Verdict, WorkerVerdict,
};
use crate::request::{TypedQuery, body_bytes, json_body};
use crate::state::AppState;
use crate::stats::{eta_ms, workers_serving};
use crate::stream::{Feed, resume_point};

/// A job spec from a submission object (legacy clients' `job_type` and `service_required` are
/// accepted for `service`), owned by the caller: whatever `owner` a client sent is overwritten.
/// Only parsed here: the broker validates every submission.
pub(crate) fn spec_from(value: Value, caller: Option<&Caller>) -> Result<JobSpec, ValidationError> {
    let mut spec = job_spec_shape(value)?;
    spec.owner = caller.map(|c| c.name.clone());
    Ok(spec)
}

/// Whether `caller` may read a job owned by `owner`: a `submit` token reads only the jobs it
/// submitted; `read` and `admin` tokens (and auth off) read every job.
pub(crate) fn may_read(owner: Option<&str>, caller: Option<&Caller>) -> bool {
    scoped_owner(caller).is_none_or(|name| owner == Some(name))
}

/// The owner a `submit` caller's reads are scoped to (its own token name); `None` for `read`,
/// `admin` and auth off, which read every job.
pub(crate) fn scoped_owner(caller: Option<&Caller>) -> Option<&str> {
    caller.filter(|c| c.role == Role::Submit).map(|c| c.name.as_str())
}

/// One job's record for `caller`: another owner's job is "not found" to a `submit` token (its
/// existence is not its business either).
pub(crate) async fn readable_job<B: Broker>(
    broker: &B,
    id: &JobId,
    caller: Option<&Caller>,
) -> ApiResult<fleetq_core::JobRecord> {
    broker
        .job(id)
        .await?
        .filter(|rec| may_read(rec.spec.owner.as_deref(), caller))
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

/// A `submit` caller may touch only the jobs it submitted; `admin` (and auth off) any job.
pub(crate) async fn check_owner<B: Broker>(broker: &B, id: &JobId, caller: Option<&Caller>) -> ApiResult<()> {
    let Some(c) = caller.filter(|c| c.role < Role::Admin) else { return Ok(()) };
    let rec = broker.job(id).await?.ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    if rec.spec.owner.as_deref() == Some(c.name.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "job {id} was not submitted by this token ({}); a submit token acts only on its own jobs",
                c.name
            ),
        ))
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key =
        v.to_str().ok().map(str::trim).filter(|k| !k.is_empty() && k.len() <= 200).ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key", "must be 1–200 visible ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

/// `POST /api/jobs`: one job object, or an array of them as a batch (all or nothing).
#[utoipa::path(
    post,
    path = "/api/jobs",
    operation_id = "submit_jobs",
    summary = "Submit one job (object) or a batch (array, all or nothing)",
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays answer 200 with the same id; batch item i gets `key:i`")),
    request_body = Submission,
    responses(
        (status = 201, description = "Created (one job, or a batch with at least one new job)", body = SubmitReply),
        (status = 200, description = "An idempotent replay: nothing new was created", body = SubmitReply),
        (status = 400, description = "Malformed JSON or header", body = ErrorBody),
        (status = 413, description = "Body or batch over the limit", body = ErrorBody),
        (status = 422, description = "A field is invalid (`field` names it)", body = ErrorBody),
    )
)]
pub(crate) async fn submit<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let value = json_body(&body_bytes(body)?)?;
    let key = idempotency_key(&headers)?;
    let caller = caller.map(|Extension(c)| c);
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::invalid(ValidationError::new("body", "an empty batch")));
            }
            if items.len() > st.config.max_batch {
                return Err(ApiError::too_large(format!(
                    "a batch of {} jobs is over the limit of {}",
                    items.len(),
                    st.config.max_batch
                )));
            }
            let mut specs = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let mut spec = spec_from(item, caller.as_ref())
                    .map_err(|e| ApiError::invalid(e.within(&format!("[{i}]"))))?;
                if let (Some(k), None) = (&key, &spec.idempotency_key) {
                    spec.idempotency_key = Some(format!("{k}:{i}"));
                }
                specs.push(spec);
            }
            let done = st.broker.submit_batch(specs).await?;
            let status = if done.iter().any(|s| s.created) { StatusCode::CREATED } else { StatusCode::OK };
            let jobs = done.into_iter().map(|s| Submitted { id: s.id, created: s.created }).collect();
            Ok((status, Json(SubmitReply::Batch(BatchSubmitted { jobs }))).into_response())
        }
        value => {
            let mut spec = spec_from(value, caller.as_ref()).map_err(ApiError::invalid)?;
            if spec.idempotency_key.is_none() {
                spec.idempotency_key = key;
            }
            let s = st.broker.submit(spec).await?;
            let status = if s.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok((status, Json(SubmitReply::One(Submitted { id: s.id, created: s.created }))).into_response())
        }
    }
}

fn job_id(id: String) -> ApiResult<JobId> {
    if id.is_empty() || id.len() > 200 {
        return Err(ApiError::bad_request("id", "not a job id"));
    }
    Ok(JobId(id))
}

/// `GET /api/jobs/{id}`: the record, plus `queue_position` and `eta_ms` while it is unfinished.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}",
    operation_id = "get_job",
    summary = "One job with payload, outcome, queue position and ETA",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobView), (status = 400, description = "A malformed id or query parameter (`field` names it)", body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub(crate) async fn get<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let id = job_id(id)?;
    let rec = readable_job(st.broker.as_ref(), &id, caller.as_ref().map(|Extension(c)| c)).await?;
    let s = &rec.summary;
    let mut estimate = None;
    if !s.status.is_terminal() {
        let now = st.broker.clock().now_ms();
        let stats = st.stats.estimate(&s.service, s.workflow_id.as_deref());
        let mut position = None;
        let mut workers = 0;
        if s.status == JobStatus::Pending {
            position = st.broker.queue_position(&id).await?.map(|p| usize::try_from(p).unwrap_or(usize::MAX));
            workers = workers_serving(st.broker.workers().await?.iter(), &s.service);
        }
        estimate = Some(Estimate {
            queue_position: position,
            eta_ms: eta_ms(s, position, stats, workers, now),
            durations: stats,
        });
    }
    Ok(Json(JobView { record: rec, estimate }))
}

/// `GET /api/jobs` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this status.
    status: Option<JobStatus>,
    /// Only this service.
    service: Option<String>,
    /// Only jobs of this worker.
    worker: Option<String>,
    /// Only this workflow id.
    workflow: Option<String>,
    /// Only this customer id.
    customer: Option<String>,
    /// Only jobs submitted by this token name. A `submit` token lists only its own jobs (this
    /// parameter may only name it).
    owner: Option<String>,
    /// 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next` of the previous page.
    cursor: Option<String>,
    /// `newest` (default) or `queue`: claimable pending jobs in claim order (its own cursors).
    #[param(inline)]
    order: Option<ListOrder>,
}

/// The order of a job listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ListOrder {
    /// Newest first.
    #[default]
    Newest,
    /// Claimable pending jobs in claim order.
    Queue,
    /// Finished jobs (completed, failed, cancelled), the latest to finish first.
    Finished,
}

/// A job event stream's query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamQuery {
    /// Resume after this event id (as Last-Event-ID).
    since: Option<String>,
    /// The token, for a browser's EventSource, which cannot send headers (prefer `Authorization`).
    #[allow(dead_code, reason = "read by the auth layer; listed so that it is documented and accepted")]
    access_token: Option<String>,
}

/// `GET /api/jobs`: newest first with cursor paging, `order=queue` (pending jobs in claim order) or
/// `order=finished` (finished jobs, the latest to finish first).
#[utoipa::path(
    get,
    path = "/api/jobs",
    operation_id = "list_jobs",
    summary = "List jobs, newest first (cursor paging), order=queue or order=finished",
    params(ListQuery),
    responses((status = 200, body = JobPage), (status = 400, body = ErrorBody))
)]
pub(crate) async fn list<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    TypedQuery(q): TypedQuery<ListQuery>,
) -> ApiResult<Json<JobPage>> {
    if q.limit.is_some_and(|n| !(1..=1000).contains(&n)) {
        return Err(ApiError::bad_request("limit", "must be 1–1000"));
    }
    let owner = match scoped_owner(caller.as_ref().map(|Extension(c)| c)) {
        None => q.owner,
        Some(name) if q.owner.as_deref().is_none_or(|o| o == name) => Some(name.to_owned()),
        Some(name) => {
            return Err(ApiError::bad_request(
                "owner",
                format!("a submit token lists only its own jobs: owner may only be {name:?}"),
            ));
        }
    };
    let filter = JobFilter {
        owner,
        status: q.status,
        service: q.service,
        worker: q.worker,
        workflow: q.workflow,
        customer: q.customer,
        limit: q.limit,
        cursor: q.cursor,
    };
    match q.order.unwrap_or_default() {
        ListOrder::Newest => {
            let page = st.broker.jobs(&filter).await.map_err(query_error)?;
            Ok(Json(JobPage { jobs: page.jobs, next: page.next }))
        }
        ListOrder::Finished => {
            if filter.status.is_some_and(|s| !s.is_terminal()) {
                return Err(ApiError::bad_request(
                    "order",
                    "finished order lists completed, failed or cancelled jobs",
                ));
            }
            let page = st.broker.finished(&filter).await.map_err(query_error)?;
            Ok(Json(JobPage { jobs: page.jobs, next: page.next }))
        }
        ListOrder::Queue => {
            if filter.status.is_some_and(|s| s != JobStatus::Pending) {
                return Err(ApiError::bad_request("order", "queue order lists pending jobs"));
            }
            if filter.worker.is_some() {
                return Err(ApiError::bad_request("worker", "pending jobs have no worker; drop order=queue"));
            }
            let queue = QueueFilter {
                service: filter.service,
                workflow: filter.workflow,
                customer: filter.customer,
                owner: filter.owner,
                limit: filter.limit,
                cursor: filter.cursor,
            };
            let page = st.broker.queue(&queue).await.map_err(query_error)?;
            Ok(Json(JobPage { jobs: page.jobs, next: page.next }))
        }
    }
}

/// The broker's refusal of one of a request's parameters (a cursor of another broker, a name that
/// is not one) is the request's fault: 400 naming the field, like every other bad parameter.
pub(crate) fn query_error(e: fleetq_broker::BrokerError) -> ApiError {
    match e {
        fleetq_broker::BrokerError::Invalid(v) => ApiError::bad_request(&v.field, v.message),
        other => other.into(),
    }
}

/// `POST /api/jobs/{id}/cancel` (a `submit` token: its own jobs only).
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/cancel",
    operation_id = "cancel_job",
    summary = "Cancel a pending job, or ask its worker to stop (a submit token: its own jobs only)",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Cancelled), (status = 400, description = "A malformed id or query parameter (`field` names it)", body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub(crate) async fn cancel<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Cancelled>> {
    let id = job_id(id)?;
    check_owner(st.broker.as_ref(), &id, caller.as_ref().map(|Extension(c)| c)).await?;
    let outcome = st.broker.cancel(&id).await?;
    let outcome = match outcome {
        CancelOutcome::Cancelled => CancelResult::Cancelled,
        CancelOutcome::Requested => CancelResult::Requested,
        CancelOutcome::AlreadyFinished => CancelResult::AlreadyFinished,
    };
    Ok(Json(Cancelled { id, outcome }))
}

/// `POST /api/jobs/{id}/retry`: a failed or cancelled job back to the queue.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/retry",
    operation_id = "retry_job",
    summary = "Put a failed or cancelled job back in the queue",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Retried), (status = 400, description = "A malformed id or query parameter (`field` names it)", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "The job is not failed or cancelled", body = ErrorBody))
)]
pub(crate) async fn retry<B: Broker>(
    State(st): State<AppState<B>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Retried>> {
    let id = job_id(id)?;
    st.broker.retry(&id).await?;
    Ok(Json(Retried { id, status: JobStatus::Pending }))
}

/// `GET /api/jobs/{id}/matching-workers`.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}/matching-workers",
    operation_id = "matching_workers",
    summary = "Every worker judged against the job: matches, busy or incompatible, with reasons",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = MatchingWorkers), (status = 400, description = "A malformed id or query parameter (`field` names it)", body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub(crate) async fn matching<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<MatchingWorkers>> {
    let id = job_id(id)?;
    readable_job(st.broker.as_ref(), &id, caller.as_ref().map(|Extension(c)| c)).await?;
    let verdicts = fleet::matching_workers(st.broker.as_ref(), &id).await?;
    let workers = verdicts
        .into_iter()
        .map(|v| {
            let verdict = match (v.verdict.matches, v.busy) {
                (true, false) => Verdict::Matches,
                (true, true) => Verdict::Busy,
                (false, _) => Verdict::Incompatible,
            };
            let reg = v.worker.registration;
            WorkerVerdict {
                worker_id: reg.worker_id,
                machine_id: reg.machine_id,
                services: reg.services,
                verdict,
                busy: v.busy,
                reasons: v.verdict.reasons,
            }
        })
        .collect();
    Ok(Json(MatchingWorkers { job_id: id, workers }))
}

/// A path segment that cannot leave its directory.
fn safe_segment(field: &str, s: &str) -> ApiResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && !s.contains(['/', '\\', '\0'])
        && !s.starts_with('.');
    if ok { Ok(()) } else { Err(ApiError::bad_request(field, "not a valid name")) }
}

/// `GET /api/jobs/{id}/artifacts/{name}`: a file a worker stored for the job.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}/artifacts/{name}",
    operation_id = "get_artifact",
    summary = "Download a file a worker stored for the job",
    params(("id" = String, Path, description = "Job id"), ("name" = String, Path, description = "File name")),
    responses(
        (status = 200, description = "The file, typed by its extension", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn artifact<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    safe_segment("id", &id)?;
    safe_segment("name", &name)?;
    let dir = st
        .config
        .artifacts_dir
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this API has no artifacts directory (--artifacts-dir)"))?;
    let jid = job_id(id.clone())?;
    readable_job(st.broker.as_ref(), &jid, caller.as_ref().map(|Extension(c)| c)).await?;
    let path = dir.join(&id).join(&name);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("job {id} has no artifact {name:?}")))?;
    let mime = match name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

/// One SSE event from a job summary, named after the change.
fn job_sse(id: String, name: &str, data: &Value) -> SseEvent {
    SseEvent::default().id(id).event(name).data(data.to_string())
}

fn terminal_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Completed => "job_completed",
        JobStatus::Failed => "job_failed",
        _ => "job_cancelled",
    }
}

/// `GET /api/jobs/{id}/events`: SSE of the job's changes. Starts with a `job_state` event (its
/// current state) unless resuming with `Last-Event-ID`; ends after the terminal event, which carries
/// the outcome (result or error). A resume point trimmed from the log yields a fresh `job_state`.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}/events",
    operation_id = "job_events",
    summary = "SSE of one job until its terminal event; Last-Event-ID resume",
    description = "SSE `id` = event id (`seq`, or `seq.epoch` after the log went back), `event` = kind. First `job_state` (`{type, seq, job, outcome}`: the current state; skipped when resuming), then each change as an Event (`job_claimed`, `job_progress`, …), then `job_completed`, `job_failed` or `job_cancelled`: an Event with `outcome` added. The stream then ends. A job already finished when the stream opens gets its terminal event at once (`at` = when it finished, `seq` = the log position it was read at).",
    params(
        ("id" = String, Path, description = "Job id"),
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id: `seq`, or `seq.epoch` once the log's epoch moved on; an id of another epoch yields a fresh `job_state`"),
    ),
    responses((status = 200, description = "text/event-stream: Events, framed by `job_state` and the terminal event", content_type = "text/event-stream", body = Event), (status = 400, description = "A malformed id or query parameter (`field` names it)", body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub(crate) async fn events<B: Broker>(
    State(st): State<AppState<B>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    TypedQuery(q): TypedQuery<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let id = job_id(id)?;
    let resume = resume_point(&headers, q.since.as_deref())?;
    let broker = st.broker.clone();
    let caller = caller.as_ref().map(|Extension(c)| c);
    // The place among the open streams first: a client that will be refused costs no reads.
    let permit = st.stream_permit()?;
    let epoch = resume.map(|r| r.epoch);
    let (after, first) = match resume {
        Some(r) => {
            readable_job(broker.as_ref(), &id, caller).await?;
            (r.seq, None)
        }
        None => {
            // The sequence first, then the state: nothing between them can be missed.
            let seq = broker.snapshot().await?.seq;
            let rec = readable_job(broker.as_ref(), &id, caller).await?;
            (seq, Some(rec))
        }
    };
    let stream = job_stream(st.feed_from(after, epoch), broker, st.hub.clone(), id, after, first)
        // The stream holds its place among the server's open streams until it ends.
        .map(move |item| {
            let _held = &permit;
            item
        })
        .take_until(st.config.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn job_stream<B: Broker>(
    feed: impl Stream<Item = Feed> + Send + 'static,
    broker: Arc<B>,
    hub: Arc<crate::stream::Hub>,
    id: JobId,
    after: u64,
    first: Option<fleetq_core::JobRecord>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct St<S, B> {
        feed: std::pin::Pin<Box<S>>,
        broker: Arc<B>,
        hub: Arc<crate::stream::Hub>,
        id: JobId,
        first: Option<fleetq_core::JobRecord>,
        seq: u64,
        done: bool,
    }
    let feed = Box::pin(feed);
    let st = St { feed, broker, hub, id, first, seq: after, done: false };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(rec) = st.first.take() {
            let terminal = rec.summary.status.is_terminal();
            let name = if terminal { terminal_name(rec.summary.status) } else { "job_state" };
            st.done = terminal;
            // A finished job's stream is its terminal event, shaped as every Event (`at` is when it
            // finished); its `seq` is the log position it was read at, the resume point.
            let data = if terminal {
                let at = rec.summary.finished_at.unwrap_or(rec.summary.updated_at);
                json!({"type": name, "seq": st.seq, "at": at, "job": rec.summary, "outcome": rec.outcome})
            } else {
                json!({"type": name, "seq": st.seq, "job": rec.summary, "outcome": rec.outcome})
            };
            return Some((Ok(job_sse(st.hub.event_id(st.seq), name, &data)), st));
        }
        loop {
            match st.feed.next().await? {
                Feed::Gap { .. } => {
                    let rec = st.broker.job(&st.id).await.ok().flatten()?;
                    st.first = Some(rec);
                    return Some((Ok(SseEvent::default().comment("resync: events were trimmed")), st));
                }
                Feed::Seen(_) => {}
                Feed::Event(ev) => {
                    st.seq = ev.seq;
                    let Some(job) = ev.kind.job() else { continue };
                    if job.id != st.id {
                        continue;
                    }
                    let mut data = serde_json::to_value(&*ev).unwrap_or(Value::Null);
                    if job.status.is_terminal() {
                        st.done = true;
                        let outcome = st.broker.job(&st.id).await.ok().flatten().and_then(|r| r.outcome);
                        if let Some(obj) = data.as_object_mut() {
                            obj.insert("outcome".into(), json!(outcome));
                        }
                    }
                    return Some((Ok(job_sse(st.hub.event_id(ev.seq), ev.kind.name(), &data)), st));
                }
            }
        }
    })
}
