//! The client CLI over the HTTP API: `submit`, `jobs ls|show|cancel|retry|watch`, `workers`,
//! `services`. Human tables by default, `--json` for scripts.

use crate::out::outln;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args as ClapArgs, Subcommand};
use eventsource_stream::Eventsource;
use fleetq_api::model::{
    Activity, Cancelled, JobPage, JobView, MatchingWorkers, Retried, Services, Verdict, Workers,
};
use fleetq_api::stats::rfc3339;
use fleetq_broker::Clock as _;
use futures::StreamExt;
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
    /// Follows one job until it ends, or every job event without an id.
    Watch(WatchArgs),
}

/// `fleetq jobs ls`.
#[derive(Debug, ClapArgs)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only this status (pending, assigned, in_progress, completed, failed, cancelled).
    #[arg(long)]
    status: Option<String>,
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

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(conn: &Conn) -> Result<Self> {
        if !(conn.api.starts_with("http://") || conn.api.starts_with("https://")) {
            bail!("--api / FLEETQ_API must be a URL like http://127.0.0.1:7777 (got {:?})", conn.api);
        }
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
        Ok(Self { base: conn.api.trim_end_matches('/').to_owned(), token: conn.token.clone(), http })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<Value> {
        let resp = r.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let e = &body["error"];
        let field = e["field"].as_str().map(|f| format!(" ({f})")).unwrap_or_default();
        Err(anyhow!(
            "{} {}{field}: {}",
            status.as_u16(),
            e["code"].as_str().unwrap_or("error"),
            e["message"].as_str().unwrap_or("no details")
        ))
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the fleetq API at {}: {e} (is `fleetq up` running? set --api or FLEETQ_API)",
            self.base
        )
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.req(reqwest::Method::GET, path)).await
    }

    async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut r = self.req(reqwest::Method::POST, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        self.send(r).await
    }
}

impl Api {
    /// GET `path` read as the API's own reply type, so the CLI cannot drift from the API.
    async fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let v = self.get(path).await?;
        serde_json::from_value(v).with_context(|| {
            format!("the API's reply to {path} does not read as expected (a different fleetq version?)")
        })
    }

    async fn job(&self, id: &str) -> Result<JobView> {
        self.get_as(&format!("/api/jobs/{}", enc(id))).await
    }

    /// Why a pending job is not running, from the fleet's verdicts: `None` when a worker could
    /// take it now; otherwise counts per reason (`2 workers: service "comfyui" is not served …`).
    async fn why_waiting(&self, id: &str) -> Result<Option<String>> {
        let verdicts: MatchingWorkers =
            self.get_as(&format!("/api/jobs/{}/matching-workers", enc(id))).await?;
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
}

/// What a job is waiting for, in one line: queue position and ETA, the attempt on a retry, and
/// why nobody can run it when the fleet cannot.
async fn waiting_line(api: &Api, id: &str) -> Result<String> {
    let job = api.job(id).await?;
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
        let why = api.why_waiting(id).await?.unwrap_or_else(|| "no registered worker can serve it".into());
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

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `fleetq submit`.
pub(crate) async fn submit(args: SubmitArgs) -> Result<()> {
    let api = Api::new(&args.conn)?;
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
    let mut req = api.req(reqwest::Method::POST, "/api/jobs").json(&body);
    if let Some(k) = &args.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let reply = api.send(req).await?;
    let ids: Vec<String> = match reply.get("jobs").and_then(Value::as_array) {
        Some(list) => list.iter().filter_map(|j| j["id"].as_str().map(str::to_owned)).collect(),
        None => reply["id"].as_str().map(str::to_owned).into_iter().collect(),
    };
    if !args.wait {
        if args.conn.json {
            print_json(&reply);
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

/// Follows one job's SSE stream to its end, resuming with `Last-Event-ID` when the connection drops.
/// Prints the outcome; fails when the job did not complete.
async fn follow(api: &Api, id: &str, as_json: bool) -> Result<()> {
    let tty = std::io::stderr().is_terminal() && !as_json;
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    loop {
        let mut req = api.req(reqwest::Method::GET, &format!("/api/jobs/{}/events", enc(id)));
        if let Some(l) = &last_id {
            req = req.header("Last-Event-ID", l);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                bail!(
                    "{}: {}",
                    status.as_u16(),
                    body["error"]["message"].as_str().unwrap_or("cannot follow the job")
                );
            }
            Err(e) => {
                failures += 1;
                if failures > 10 {
                    return Err(api.unreachable(e));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut events = resp.bytes_stream().eventsource();
        // While the job waits, say what for (position, ETA, unworkable with why), refreshed.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut pending = true;
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = tick.tick(), if pending && !as_json => {
                    if let Ok(line) = waiting_line(api, id).await {
                        draw(tty, "pending", 0.0, Some(&line));
                    }
                    continue;
                }
            };
            let Some(Ok(ev)) = ev else { break };
            failures = 0;
            if !ev.id.is_empty() {
                last_id = Some(ev.id.clone());
            }
            let Ok(data) = serde_json::from_str::<Value>(&ev.data) else { continue };
            let job = &data["job"];
            let status = job["status"].as_str().unwrap_or("");
            pending = status == "pending";
            if !as_json && !pending {
                let attempt = job["attempt"].as_u64().unwrap_or(1);
                let max = job["max_attempts"].as_u64().unwrap_or(1);
                let message = job["message"].as_str().unwrap_or("");
                let line = if attempt > 1 {
                    format!("attempt {attempt}/{max} {message}")
                } else {
                    message.to_owned()
                };
                draw(tty, status, job["progress"].as_f64().unwrap_or(0.0), Some(&line));
            }
            if matches!(status, "completed" | "failed" | "cancelled") {
                if tty {
                    eprintln!();
                }
                return finish(&data, status, as_json);
            }
        }
        // The stream dropped before the end: resume after the last event seen.
        tokio::time::sleep(Duration::from_millis(500)).await;
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

fn finish(data: &Value, status: &str, as_json: bool) -> Result<()> {
    let outcome = &data["outcome"];
    if as_json {
        print_json(data);
    } else if status == "completed" {
        print_json(&outcome["value"]);
    }
    match status {
        "completed" => Ok(()),
        "failed" => {
            let e = &outcome["error"];
            bail!(
                "job failed ({}): {}",
                e["category"].as_str().unwrap_or("unknown"),
                e["message"].as_str().unwrap_or("")
            )
        }
        _ => bail!("job was cancelled"),
    }
}

/// `fleetq jobs …`.
pub(crate) async fn jobs(cmd: Jobs) -> Result<()> {
    match cmd {
        Jobs::Ls(a) => ls(a).await,
        Jobs::Show(a) => {
            let api = Api::new(&a.conn)?;
            if a.conn.json {
                print_json(&api.get(&format!("/api/jobs/{}", enc(&a.id))).await?);
                Ok(())
            } else {
                show(&api, &a.id).await
            }
        }
        Jobs::Cancel(a) => {
            let r = Api::new(&a.conn)?.post(&format!("/api/jobs/{}/cancel", enc(&a.id)), None).await?;
            if a.conn.json {
                print_json(&r);
                return Ok(());
            }
            let done: Cancelled = serde_json::from_value(r).context("the API's cancel reply")?;
            outln!("{} {}", done.id, serde_json::to_value(done.outcome)?.as_str().unwrap_or(""));
            Ok(())
        }
        Jobs::Retry(a) => {
            let r = Api::new(&a.conn)?.post(&format!("/api/jobs/{}/retry", enc(&a.id)), None).await?;
            if a.conn.json {
                print_json(&r);
                return Ok(());
            }
            let done: Retried = serde_json::from_value(r).context("the API's retry reply")?;
            outln!("{} {}", done.id, done.status.as_str());
            Ok(())
        }
        Jobs::Watch(a) => {
            let api = Api::new(&a.conn)?;
            match &a.id {
                Some(id) => follow(&api, id, a.conn.json).await,
                None => watch_all(&api, a.conn.json).await,
            }
        }
    }
}

async fn ls(a: LsArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("status", &a.status),
        ("service", &a.service),
        ("worker", &a.worker),
        ("workflow", &a.workflow),
        ("customer", &a.customer),
        ("cursor", &a.cursor),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(v)));
        }
    }
    if a.queue {
        q.push("order=queue".into());
    }
    let path = format!("/api/jobs?{}", q.join("&"));
    if a.conn.json {
        print_json(&api.get(&path).await?);
        return Ok(());
    }
    let page: JobPage = api.get_as(&path).await?;
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

async fn show(api: &Api, id: &str) -> Result<()> {
    let job = api.job(id).await?;
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

/// Follows every job event until interrupted. A dropped stream is resumed after the last event
/// seen (`Last-Event-ID`, so nothing is missed or shown twice); an API gone for good ends it with
/// an error, not silently.
async fn watch_all(api: &Api, as_json: bool) -> Result<()> {
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let mut req = api.req(reqwest::Method::GET, "/api/events?topics=jobs");
        if let Some(l) = &last_id {
            req = req.header("Last-Event-ID", l);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => bail!("{}: cannot follow events", r.status().as_u16()),
            Err(e) => {
                failures += 1;
                if failures > 10 {
                    return Err(api.unreachable(e).context("the event stream was lost"));
                }
                if failures == 1 {
                    eprintln!("event stream lost; reconnecting…");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if failures > 0 {
            eprintln!("reconnected; resuming after event {}", last_id.as_deref().unwrap_or("0"));
        }
        failures = 0;
        let mut events = resp.bytes_stream().eventsource();
        while let Some(Ok(ev)) = events.next().await {
            if !ev.id.is_empty() {
                last_id = Some(ev.id.clone());
            }
            let Ok(data) = serde_json::from_str::<Value>(&ev.data) else { continue };
            if as_json {
                outln!("{data}");
                continue;
            }
            let job = &data["job"];
            outln!(
                "{:>8} {:<22} {:<38} {:<12} {:>5.1}% {}",
                ev.id,
                ev.event,
                job["id"].as_str().unwrap_or(""),
                job["status"].as_str().unwrap_or(""),
                job["progress"].as_f64().unwrap_or(0.0),
                job["message"].as_str().unwrap_or("")
            );
        }
        // The stream ended (the API restarted or a proxy cut it): resume.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `fleetq workers`.
pub(crate) async fn workers(a: ListArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    if a.conn.json {
        print_json(&api.get("/api/workers").await?);
        return Ok(());
    }
    let list: Workers = api.get_as("/api/workers").await?;
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

/// `fleetq services`.
pub(crate) async fn services(a: ListArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    if a.conn.json {
        print_json(&api.get("/api/services").await?);
        return Ok(());
    }
    let list: Services = api.get_as("/api/services").await?;
    let rows: Vec<Vec<String>> = list
        .services
        .iter()
        .map(|(name, s)| {
            let p50 = s.durations.as_ref().map_or("-".into(), |d| short_duration(d.p50_ms));
            vec![
                name.clone(),
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
