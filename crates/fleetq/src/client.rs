//! The client commands: `submit`, `jobs ls|show|cancel|retry|watch`, `workers`, `services` —
//! calls of the typed client library ([`fleetq_client`]) and their printing: human tables by
//! default, `--json` for scripts.

use crate::out::outln;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};
use fleetq_api::model::{Activity, SubmitReply, Verdict};
use fleetq_broker::Clock as _;
use fleetq_client::{Client, ClientError, FleetEvent, JobQuery, JobUpdate};
use fleetq_core::clock::rfc3339;
use fleetq_core::{JobId, JobStatus};
use serde_json::{Value, json};

/// Where the API is and how to talk to it.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct Conn {
    /// API base URL.
    #[arg(long, env = "FLEETQ_API", default_value = "http://127.0.0.1:7777")]
    api: String,
    /// Bearer token.
    #[arg(long, env = "FLEETQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `fleetq submit`.
#[derive(Debug, ClapArgs)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    conn: Conn,
    /// A JSON file with the job (object) or a batch (array); flags below are then ignored.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Service name.
    #[arg(long, default_value = "simulation")]
    service: String,
    /// Payload as JSON (or @file).
    #[arg(long)]
    payload: Option<String>,
    /// Requirements as JSON (or @file).
    #[arg(long)]
    requirements: Option<String>,
    /// Priority (higher first).
    #[arg(long)]
    priority: Option<i32>,
    /// Workflow id.
    #[arg(long)]
    workflow_id: Option<String>,
    /// Customer id.
    #[arg(long)]
    customer_id: Option<String>,
    /// Most attempts.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Submit this many copies as one batch.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Idempotency key (a retry of the same submission returns the same job).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait for the job, showing its progress; exit non-zero when it fails or is cancelled.
    #[arg(long)]
    wait: bool,
}

/// `fleetq jobs …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Jobs {
    /// Lists jobs (newest first, or --queue for pending jobs in claim order).
    Ls(LsArgs),
    /// Shows one job with payload and outcome.
    Show(IdArgs),
    /// Cancels a job.
    Cancel(IdArgs),
    /// Puts a failed or cancelled job back in the queue.
    Retry(IdArgs),
    /// Cancels or retries every job of a status matching filters, on the server (admin).
    Bulk(BulkArgs),
    /// Follows one job until it ends, or every job event without an id.
    Watch(WatchArgs),
}

/// `fleetq jobs ls`.
#[derive(Debug, ClapArgs)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only this status (pending, assigned, in_progress, completed, failed, cancelled).
    #[arg(long, value_parser = parse_status)]
    status: Option<JobStatus>,
    #[command(flatten)]
    only: OnlyArgs,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Continue from a cursor.
    #[arg(long)]
    cursor: Option<String>,
    /// Pending jobs in the order workers will claim them.
    #[arg(long)]
    queue: bool,
}

/// The filters a listing and a bulk action share.
#[derive(Debug, ClapArgs)]
pub(crate) struct OnlyArgs {
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// Only jobs of this worker.
    #[arg(long)]
    worker: Option<String>,
    /// Only this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Only this customer.
    #[arg(long)]
    customer: Option<String>,
}

/// `fleetq jobs bulk`.
#[derive(Debug, ClapArgs)]
pub(crate) struct BulkArgs {
    #[command(flatten)]
    conn: Conn,
    /// cancel (pending, assigned, in_progress) or retry (failed, cancelled).
    #[arg(value_parser = ["cancel", "retry"])]
    action: String,
    /// The status the jobs have now.
    #[arg(long, value_parser = parse_status)]
    status: JobStatus,
    #[command(flatten)]
    only: OnlyArgs,
    /// Only count them.
    #[arg(long)]
    dry_run: bool,
}

/// A command about one job.
#[derive(Debug, ClapArgs)]
pub(crate) struct IdArgs {
    #[command(flatten)]
    conn: Conn,
    /// Job id.
    id: String,
}

/// `fleetq jobs watch`.
#[derive(Debug, ClapArgs)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Job id (omit to follow every job event).
    id: Option<String>,
}

/// `fleetq workers` / `fleetq services`.
#[derive(Debug, ClapArgs)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    conn: Conn,
}

/// A client of the API `conn` names.
fn connect(conn: &Conn) -> Result<Client> {
    Ok(Client::new(&conn.api)
        .map_err(|_| {
            anyhow::anyhow!(
                "--api / FLEETQ_API must be a URL like http://127.0.0.1:7777 (got {:?})",
                conn.api
            )
        })?
        .with_token(conn.token.clone()))
}

/// A client error as the CLI says it: an unreachable API with the hint where to point it.
fn said(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Unreachable { .. } => {
            anyhow::anyhow!("{e} (is `fleetq up` running? set --api or FLEETQ_API)")
        }
        e => e.into(),
    }
}

fn parse_status(s: &str) -> Result<JobStatus, String> {
    JobStatus::parse(s).ok_or_else(|| {
        format!("{s:?} is not a status (pending, assigned, in_progress, completed, failed, cancelled)")
    })
}

/// Why a pending job is not running, from the fleet's verdicts: `None` when a worker could take
/// it now; otherwise counts per reason (`2 workers: service "comfyui" is not served …`).
async fn why_waiting(api: &Client, id: &JobId) -> Result<Option<String>> {
    let verdicts = api.matching_workers(id).await.map_err(said)?;
    let workers = &verdicts.workers;
    if workers.is_empty() {
        return Ok(Some("no worker is registered".into()));
    }
    if workers.iter().any(|w| matches!(w.verdict, Verdict::Matches)) {
        return Ok(None);
    }
    let busy = workers.iter().filter(|w| matches!(w.verdict, Verdict::Busy)).count();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for reason in workers.iter().flat_map(|w| &w.reasons) {
        match counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => counts.push((reason, 1)),
        }
    }
    let mut parts: Vec<String> = Vec::new();
    if busy > 0 {
        parts.push(format!("{busy} able worker(s) busy"));
    }
    parts.extend(counts.into_iter().map(|(r, n)| format!("{n} × {r}")));
    Ok(Some(format!("0/{} workers can take it now: {}", workers.len(), parts.join("; "))))
}

/// What a job is waiting for, in one line: queue position and ETA, the attempt on a retry, and
/// why nobody can run it when the fleet cannot.
async fn waiting_line(api: &Client, id: &JobId) -> Result<String> {
    let job = api.job(id).await.map_err(said)?;
    let s = &job.record.summary;
    let mut parts = Vec::new();
    let estimate = job.estimate.as_ref();
    if let Some(p) = estimate.and_then(|e| e.queue_position) {
        parts.push(format!("position {p}"));
    }
    if let Some(eta) = estimate.and_then(|e| e.eta_ms) {
        parts.push(format!("ETA {}", short_duration(eta)));
    }
    if s.attempt >= 1 {
        parts.push(format!("attempt {}/{} next", s.attempt + 1, s.max_attempts));
    }
    if let Some(at) = s.run_at {
        parts.push(format!("retry at {}", rfc3339(at)));
    }
    if s.unworkable {
        let why = why_waiting(api, id).await?.unwrap_or_else(|| "no registered worker can serve it".into());
        parts.push(format!("UNWORKABLE — {why}"));
    }
    Ok(parts.join(", "))
}

fn json_arg(text: &str, what: &str) -> Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => text.to_owned(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `fleetq submit`.
pub(crate) async fn submit(args: SubmitArgs) -> Result<()> {
    let api = connect(&args.conn)?;
    let body = match &args.file {
        Some(path) => json_arg(&format!("@{}", path.display()), "the job file")?,
        None => {
            let mut job = json!({"service": args.service});
            if let Some(p) = &args.payload {
                job["payload"] = json_arg(p, "--payload")?;
            }
            if let Some(r) = &args.requirements {
                job["requirements"] = json_arg(r, "--requirements")?;
            }
            for (k, v) in [
                ("priority", args.priority.map(Value::from)),
                ("max_attempts", args.max_attempts.map(Value::from)),
            ] {
                if let Some(v) = v {
                    job[k] = v;
                }
            }
            for (k, v) in [("workflow_id", &args.workflow_id), ("customer_id", &args.customer_id)] {
                if let Some(v) = v {
                    job[k] = json!(v);
                }
            }
            if args.count > 1 { Value::Array(vec![job; args.count]) } else { job }
        }
    };
    let reply = api.submit_json(&body, args.idempotency_key.as_deref()).await.map_err(said)?;
    let ids: Vec<JobId> = match &reply {
        SubmitReply::One(one) => vec![one.id.clone()],
        SubmitReply::Batch(batch) => batch.jobs.iter().map(|j| j.id.clone()).collect(),
    };
    if !args.wait {
        if args.conn.json {
            print_json(&serde_json::to_value(&reply)?);
        } else {
            ids.iter().for_each(|id| outln!("{id}"));
        }
        return Ok(());
    }
    let [id] = ids.as_slice() else { bail!("--wait follows one job; this submission made {}", ids.len()) };
    if !args.conn.json {
        eprintln!("submitted {id}");
    }
    follow(&api, id, args.conn.json).await
}

/// Follows one job's event stream to its end (the client resumes it when the connection drops),
/// saying what a pending job waits for. Prints the outcome; fails when the job did not complete.
async fn follow(api: &Client, id: &JobId, as_json: bool) -> Result<()> {
    let tty = std::io::stderr().is_terminal() && !as_json;
    let mut events = api.job_events(id);
    // While the job waits, say what for (position, ETA, unworkable with why), refreshed.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut pending = true;
    loop {
        let update = tokio::select! {
            update = events.next() => update.map_err(said)?,
            _ = tick.tick(), if pending && !as_json => {
                if let Ok(line) = waiting_line(api, id).await {
                    draw(tty, "pending", 0.0, Some(&line));
                }
                continue;
            }
        };
        let Some(update) = update else { bail!("the job's event stream ended before the job did") };
        let job = &update.job;
        pending = job.status == JobStatus::Pending;
        if !as_json && !pending {
            let message = job.message.as_deref().unwrap_or("");
            let line = if job.attempt > 1 {
                format!("attempt {}/{} {message}", job.attempt, job.max_attempts)
            } else {
                message.to_owned()
            };
            draw(tty, job.status.as_str(), job.progress, Some(&line));
        }
        if update.is_terminal() {
            if tty {
                eprintln!();
            }
            return finish(&update, as_json);
        }
    }
}

fn draw(tty: bool, status: &str, progress: f64, message: Option<&str>) {
    let width = 30;
    let filled = ((progress.clamp(0.0, 100.0) / 100.0) * width as f64).round() as usize;
    let bar = format!(
        "[{}{}] {progress:5.1}% {status:<11} {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        message.unwrap_or("")
    );
    if tty {
        eprint!("\r{bar:<90}");
        std::io::stderr().flush().ok();
    } else {
        eprintln!("{bar}");
    }
}

fn finish(update: &JobUpdate, as_json: bool) -> Result<()> {
    if as_json {
        print_json(&update.json);
    }
    match (&update.outcome, update.job.status) {
        (Some(fleetq_core::Outcome::Result { value }), JobStatus::Completed) => {
            if !as_json {
                print_json(value);
            }
            Ok(())
        }
        (_, JobStatus::Completed) => Ok(()),
        (Some(fleetq_core::Outcome::Error { error }), JobStatus::Failed) => {
            bail!("job failed ({}): {}", error.category.as_str(), error.message)
        }
        (_, JobStatus::Failed) => bail!("job failed (unknown)"),
        _ => bail!("job was cancelled"),
    }
}

/// `fleetq jobs …`.
pub(crate) async fn jobs(cmd: Jobs) -> Result<()> {
    match cmd {
        Jobs::Ls(a) => ls(a).await,
        Jobs::Show(a) => {
            let api = connect(&a.conn)?;
            let id = JobId(a.id);
            if a.conn.json {
                print_json(&serde_json::to_value(api.job(&id).await.map_err(said)?)?);
                Ok(())
            } else {
                show(&api, &id).await
            }
        }
        Jobs::Cancel(a) => {
            let done = connect(&a.conn)?.cancel(&JobId(a.id)).await.map_err(said)?;
            if a.conn.json {
                print_json(&serde_json::to_value(&done)?);
                return Ok(());
            }
            outln!("{} {}", done.id, serde_json::to_value(done.outcome)?.as_str().unwrap_or(""));
            Ok(())
        }
        Jobs::Retry(a) => {
            let done = connect(&a.conn)?.retry(&JobId(a.id)).await.map_err(said)?;
            if a.conn.json {
                print_json(&serde_json::to_value(&done)?);
                return Ok(());
            }
            outln!("{} {}", done.id, done.status.as_str());
            Ok(())
        }
        Jobs::Bulk(a) => {
            use fleetq_api::bulk::{BulkAction, BulkFilter, BulkRequest};
            let action = if a.action == "retry" { BulkAction::Retry } else { BulkAction::Cancel };
            let filter = BulkFilter {
                status: Some(a.status),
                service: a.only.service,
                worker: a.only.worker,
                workflow: a.only.workflow,
                customer: a.only.customer,
                owner: None,
            };
            let request = BulkRequest { action, filter: Some(filter), ids: None, dry_run: a.dry_run };
            let reply = connect(&a.conn)?.bulk(&request).await.map_err(said)?;
            if a.conn.json {
                print_json(&serde_json::to_value(&reply)?);
                return Ok(());
            }
            if a.dry_run {
                outln!(
                    "{} jobs would be {}",
                    reply.matched,
                    if a.action == "retry" { "retried" } else { "cancelled" }
                );
            } else {
                outln!(
                    "{} of {} done, {} already finished, {} refused{}",
                    reply.done,
                    reply.matched,
                    reply.already_finished,
                    reply.failed,
                    if reply.truncated { " (more matched: run it again)" } else { "" }
                );
                for e in &reply.errors {
                    outln!("  {} {}", e.id, e.error);
                }
            }
            Ok(())
        }
        Jobs::Watch(a) => {
            let api = connect(&a.conn)?;
            match a.id {
                Some(id) => follow(&api, &JobId(id), a.conn.json).await,
                None => watch_all(&api, a.conn.json).await,
            }
        }
    }
}

async fn ls(a: LsArgs) -> Result<()> {
    let api = connect(&a.conn)?;
    let query = JobQuery {
        status: a.status,
        service: a.only.service,
        worker: a.only.worker,
        workflow: a.only.workflow,
        customer: a.only.customer,
        limit: Some(a.limit),
        cursor: a.cursor,
        queue_order: a.queue,
    };
    if a.conn.json {
        print_json(&api.jobs_json(&query).await.map_err(said)?);
        return Ok(());
    }
    let page = api.jobs(&query).await.map_err(said)?;
    let now = fleetq_broker::SystemClock.now_ms();
    let rows: Vec<Vec<String>> = page
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                if j.status == fleetq_core::JobStatus::Pending && j.unworkable {
                    "pending (UNWORKABLE)".to_owned()
                } else {
                    j.status.as_str().to_owned()
                },
                j.service.clone(),
                format!("{:.0}%", j.progress),
                j.worker_id.clone().unwrap_or_else(|| "-".into()),
                j.priority.to_string(),
                age(now, Some(j.created_at)),
            ]
        })
        .collect();
    table(&["ID", "STATUS", "SERVICE", "PROGRESS", "WORKER", "PRIORITY", "AGE"], &rows);
    if rows.iter().any(|r| r[1].contains("UNWORKABLE")) {
        outln!("UNWORKABLE: no registered worker can serve it; `fleetq jobs show <id>` says why");
    }
    if let Some(next) = &page.next {
        outln!("more: --cursor {next}");
    }
    Ok(())
}

/// Longest payload text `jobs show` prints (the rest is cut; `--json` has it whole).
const SHOW_PAYLOAD: usize = 4000;

async fn show(api: &Client, id: &JobId) -> Result<()> {
    let job = api.job(id).await.map_err(said)?;
    let r = &job.record;
    let s = &r.summary;
    let row = |k: &str, v: String| outln!("{k:<13} {v}");
    row("id", s.id.to_string());
    row("service", s.service.clone());
    let status = if s.status == fleetq_core::JobStatus::Pending && s.unworkable {
        "pending (UNWORKABLE)".to_owned()
    } else {
        s.status.as_str().to_owned()
    };
    row("status", status);
    row("attempt", format!("{}/{}", s.attempt, s.max_attempts));
    row("priority", s.priority.to_string());
    for (k, v) in [("workflow", &s.workflow_id), ("customer", &s.customer_id), ("worker", &s.worker_id)] {
        if let Some(v) = v {
            row(k, v.clone());
        }
    }
    if !s.status.is_terminal() {
        row(
            "progress",
            format!(
                "{:.0}%{}",
                s.progress,
                s.message.as_deref().map(|m| format!("  {m}")).unwrap_or_default()
            ),
        );
        let line = waiting_line(api, id).await?;
        if !line.is_empty() {
            row("waiting", line);
        }
    }
    row("submitted", rfc3339(s.created_at));
    if let Some(t) = s.started_at {
        row("started", rfc3339(t));
    }
    if let Some(t) = s.finished_at {
        let ran = t.saturating_sub(s.started_at.unwrap_or(s.created_at));
        row("finished", format!("{} (ran {})", rfc3339(t), short_duration(u64::try_from(ran).unwrap_or(0))));
    }
    // The last error matters while retrying or once failed; on a completed job it is history.
    if let Some(e) = s.error.as_ref().filter(|_| s.status != fleetq_core::JobStatus::Completed) {
        row("error", format!("{} ({})", e.message, e.category.as_str()));
    }
    let payload = serde_json::to_string(&r.spec.payload).unwrap_or_default();
    let cut = payload.char_indices().nth(SHOW_PAYLOAD).map_or(payload.len(), |(i, _)| i);
    let more = if cut < payload.len() {
        format!(" … ({} bytes; --json for all)", payload.len())
    } else {
        String::new()
    };
    row("payload", format!("{}{more}", &payload[..cut]));
    if !r.history.is_empty() {
        outln!("attempts");
        for a in &r.history {
            let how = a
                .reason
                .as_deref()
                .map_or_else(|| a.end.as_str().to_owned(), |why| format!("{} ({why})", a.end.as_str()));
            let error = a.error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default();
            outln!(
                "  {:>2}  {:<14} {}  {how}{error}",
                a.attempt,
                a.worker_id.as_deref().unwrap_or("-"),
                rfc3339(a.ended_at)
            );
        }
    }
    if let Some(fleetq_core::Outcome::Result { value }) = &r.outcome {
        outln!("result");
        print_json(value);
    }
    Ok(())
}

/// Follows every job event until interrupted. The client resumes a dropped stream after the last
/// event shown (`Last-Event-ID`, so nothing is missed or shown twice); an API gone for good ends
/// it with an error, not silently.
async fn watch_all(api: &Client, as_json: bool) -> Result<()> {
    let mut events = api.events(&["jobs"]);
    loop {
        let item = events.next().await.map_err(|e| said(e).context("the event stream was lost"))?;
        let (id, event) = match item {
            FleetEvent::Event { id, event } => (id, event),
            FleetEvent::Lost => {
                eprintln!("event stream lost; reconnecting…");
                continue;
            }
            FleetEvent::Resumed { after } => {
                eprintln!("reconnected; resuming after event {}", after.as_deref().unwrap_or("0"));
                continue;
            }
            FleetEvent::Resync { after, first } => {
                eprintln!("events after {after} are gone from the log; resuming at {first}");
                continue;
            }
            // Heartbeats come with the workers topic only.
            FleetEvent::WorkersSeen(_) => continue,
        };
        if as_json {
            outln!("{}", serde_json::to_string(&event)?);
            continue;
        }
        let Some(job) = event.kind.job() else { continue };
        outln!(
            "{:>8} {:<22} {:<38} {:<12} {:>5.1}% {}",
            id,
            event.kind.name(),
            job.id,
            job.status.as_str(),
            job.progress,
            job.message.as_deref().unwrap_or("")
        );
    }
}

/// `fleetq workers`.
pub(crate) async fn workers(a: ListArgs) -> Result<()> {
    let list = connect(&a.conn)?.workers().await.map_err(said)?;
    if a.conn.json {
        print_json(&serde_json::to_value(&list)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .workers
        .iter()
        .map(|w| {
            let conns = w
                .connectors
                .iter()
                .map(|(s, c)| {
                    format!("{s}:{}{}", c.report.status.as_str(), if c.stale { " (stale)" } else { "" })
                })
                .collect::<Vec<_>>()
                .join(" ");
            let jobs = w.current_jobs.iter().map(|j| j.0.as_str()).collect::<Vec<_>>().join(",");
            vec![
                w.registration.worker_id.clone(),
                w.registration.machine_id.clone(),
                match w.status {
                    Activity::Idle => "idle".into(),
                    Activity::Busy => "busy".into(),
                },
                conns,
                if jobs.is_empty() { "-".into() } else { jobs },
            ]
        })
        .collect();
    table(&["WORKER", "MACHINE", "STATUS", "CONNECTORS", "JOBS"], &rows);
    Ok(())
}

/// `fleetq services [pause|resume SERVICE]`.
#[derive(Debug, ClapArgs)]
pub(crate) struct ServicesArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    action: Option<ServiceAction>,
}

/// What to do to a service's queue (admin).
#[derive(Debug, Subcommand)]
pub(crate) enum ServiceAction {
    /// Pauses it: nothing of it is claimed until resumed; running jobs finish.
    Pause {
        /// The service.
        service: String,
    },
    /// Resumes it: its jobs are claimed again, in their order.
    Resume {
        /// The service.
        service: String,
    },
}

/// `fleetq services`.
pub(crate) async fn services(a: ServicesArgs) -> Result<()> {
    let api = connect(&a.conn)?;
    if let Some(action) = a.action {
        let (service, paused) = match action {
            ServiceAction::Pause { service } => (service, true),
            ServiceAction::Resume { service } => (service, false),
        };
        let done = api.pause_service(&service, paused).await.map_err(said)?;
        if a.conn.json {
            print_json(&serde_json::to_value(&done)?);
        } else {
            let state = if done.paused { "paused" } else { "resumed" };
            outln!("{} {state}{}", done.service, if done.changed { "" } else { " (it already was)" });
        }
        return Ok(());
    }
    let list = api.services().await.map_err(said)?;
    if a.conn.json {
        print_json(&serde_json::to_value(&list)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .services
        .iter()
        .map(|(name, s)| {
            let p50 = s.durations.as_ref().map_or("-".into(), |d| short_duration(d.p50_ms));
            vec![
                if s.paused { format!("{name} (paused)") } else { name.clone() },
                s.total.to_string(),
                s.idle.to_string(),
                s.active.to_string(),
                s.error.to_string(),
                s.offline.to_string(),
                s.stale.to_string(),
                s.queue.pending.to_string(),
                s.queue.running.to_string(),
                p50,
            ]
        })
        .collect();
    table(
        &["SERVICE", "TOTAL", "IDLE", "ACTIVE", "ERROR", "OFFLINE", "STALE", "PENDING", "RUNNING", "P50"],
        &rows,
    );
    Ok(())
}

/// A duration as a person reads it: `11ms`, `2.4s`, `3m05s`, `1h02m`.
fn short_duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", ms / 1000, ms % 1000 / 100),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let out: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", out.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn age(now: i64, at: Option<i64>) -> String {
    let Some(at) = at else { return "-".into() };
    let s = (now - at).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        let got: Vec<String> =
            [0, 11, 999, 1_000, 2_449, 59_999, 185_000, 3_720_000].map(short_duration).into();
        assert_eq!(got, ["0ms", "11ms", "999ms", "1.0s", "2.4s", "59.9s", "3m05s", "1h02m"]);
    }
}
