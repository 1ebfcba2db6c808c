//! The ComfyUI connector, following docs/services.md §1.8:
//!
//! - one long-lived WebSocket per connector, opened before any prompt is posted and reconnected
//!   with backoff. Every connection uses a **fresh clientId**: reusing one races the old socket's
//!   cleanup, which unregisters the id and silences the new socket (transcript 17);
//! - the connector chooses the `prompt_id` and registers a route for it before the POST, so events
//!   that arrive before the HTTP reply (a cached prompt finishes in ~12 ms) are never lost;
//! - done = `executing{node:null}` for our prompt, or a non-empty `/history/{id}`, checked right
//!   after submission, after every reconnect, and whenever the socket is quiet for `poll_every`;
//!   the outcome and outputs always come from the history entry (the source of truth);
//! - `node_errors` on a 400 *or* a 200 fail the job fatally with the node, class and input named
//!   (a partial run is not what the client asked for; the queued remainder is deleted);
//! - out of memory: `POST /free` (models and cache) and one more try on this GPU, unless the
//!   allocation is larger than the device; the error carries the allocation's size, so the worker
//!   can ask for a larger GPU (`fleetq_core::oom`);
//! - cancellation and timeouts: `POST /interrupt {prompt_id}` and `POST /queue {delete}`, then a
//!   bounded wait until ComfyUI no longer holds the prompt (its queue is the truth for "is the GPU
//!   free"); a prompt that succeeded anyway is returned as a result (`after_interrupt`);
//! - outputs are returned by reference (`/view` URL), and copied into the artifacts directory when
//!   one is configured.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleetq_core::backoff::Backoff;
use fleetq_core::{FailureCategory, JobRecord};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::artifacts::Artifacts;
use crate::http::{Auth, HttpConfig, HttpTransport};
use crate::{CancellationToken, Health, JobError, ProgressSink, Service};

/// Settings of one ComfyUI connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComfyUiConfig {
    /// Service name served (`comfyui` unless a fleet names several).
    pub service: String,
    /// Base URL, e.g. `http://127.0.0.1:8188`.
    pub url: String,
    /// History poll period while the socket is quiet.
    pub poll_ms: u64,
    /// Timeout of one HTTP request.
    pub request_timeout_ms: u64,
    /// After a cancel or timeout, how long to wait for ComfyUI to stop running the prompt (its
    /// interrupt lands only between nodes and inside samplers) before giving the job up anyway.
    pub stop_wait_ms: u64,
    /// Where outputs are copied (`<dir>/<job id>/<file>`); `None` returns references only.
    pub artifacts_dir: Option<PathBuf>,
    /// Credentials for a ComfyUI behind an authenticating proxy.
    pub auth: Auth,
}

impl Default for ComfyUiConfig {
    fn default() -> Self {
        Self {
            service: "comfyui".into(),
            url: "http://127.0.0.1:8188".into(),
            poll_ms: 1000,
            request_timeout_ms: 30_000,
            stop_wait_ms: 60_000,
            artifacts_dir: None,
            auth: Auth::None,
        }
    }
}

/// How a job's completion was detected (returned in the result as `completion`, for tests and
/// operators: a cached prompt must finish through `history_check`, never through a timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    HistoryCheck,
    Websocket,
    HistoryPoll,
    Reconnect,
    /// The prompt succeeded although it was interrupted (the interrupt came too late).
    AfterInterrupt,
}

impl Completion {
    fn as_str(self) -> &'static str {
        match self {
            Self::HistoryCheck => "history_check",
            Self::Websocket => "websocket",
            Self::HistoryPoll => "history_poll",
            Self::Reconnect => "reconnect",
            Self::AfterInterrupt => "after_interrupt",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct SocketState {
    /// The clientId of the open socket; `None` while disconnected.
    client_id: Option<String>,
    /// Bumped on every (re)connection.
    epoch: u64,
}

#[derive(Debug)]
struct Inner {
    config: ComfyUiConfig,
    http: HttpTransport,
    artifacts: Artifacts,
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>,
    socket: watch::Sender<SocketState>,
    /// Bumped when the socket connects or drops: the worker re-checks health at once.
    signal: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Inner {
    fn routes(&self) -> MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Value>>> {
        self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The ComfyUI connector. Dropping it closes its socket.
#[derive(Debug)]
pub struct ComfyUi {
    inner: Arc<Inner>,
}

impl Drop for ComfyUi {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl ComfyUi {
    /// Creates the connector and starts its socket task (which keeps retrying while ComfyUI is
    /// down). Must run inside a tokio runtime.
    pub fn new(config: ComfyUiConfig) -> Result<Self, JobError> {
        let mut http = HttpConfig::new(config.url.clone());
        http.timeout = Duration::from_millis(config.request_timeout_ms.max(1));
        http.auth = config.auth.clone();
        let inner = Arc::new(Inner {
            http: HttpTransport::new(http)?,
            artifacts: Artifacts::new(config.artifacts_dir.clone(), 0),
            config,
            routes: Mutex::new(HashMap::new()),
            socket: watch::Sender::new(SocketState::default()),
            signal: watch::Sender::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(socket_loop(inner.clone()));
        Ok(Self { inner })
    }

    /// Whether the WebSocket is connected now.
    pub fn socket_connected(&self) -> bool {
        self.inner.socket.borrow().client_id.is_some()
    }
}

/// Folders of `GET /models` that hold no models.
const NOT_MODEL_FOLDERS: &[&str] = &["configs", "custom_nodes"];
/// Bounds on what one health check reads of a service's model lists.
const MAX_MODEL_FOLDERS: usize = 64;
const MAX_MODELS_PER_FOLDER: usize = 10_000;

fn ws_url(base: &str, client_id: &str) -> String {
    let base = base.replacen("https://", "wss://", 1).replacen("http://", "ws://", 1);
    format!("{base}/ws?clientId={client_id}")
}

async fn socket_loop(inner: Arc<Inner>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !inner.stop.is_cancelled() {
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let url = ws_url(&inner.config.url, &client_id);
        let connect = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url));
        let connected = tokio::select! {
            () = inner.stop.cancelled() => return,
            r = connect => r,
        };
        if let Ok(Ok((socket, _))) = connected {
            backoff.reset();
            inner.socket.send_modify(|s| {
                s.client_id = Some(client_id.clone());
                s.epoch += 1;
            });
            inner.signal.send_modify(|n| *n = n.wrapping_add(1));
            debug!(url = %inner.config.url, "comfyui socket connected");
            let (mut sink, mut stream) = socket.split();
            // ComfyUI never pings; idle sockets behind proxies need ours.
            let mut ping = tokio::time::interval(Duration::from_secs(20));
            loop {
                tokio::select! {
                    () = inner.stop.cancelled() => {
                        let _ = sink.close().await;
                        return;
                    }
                    _ = ping.tick() => {
                        if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                            break;
                        }
                    }
                    msg = stream.next() => match msg {
                        Some(Ok(Message::Text(text))) => route(&inner, text.as_str()),
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        // Binary frames (previews, progress text) and pongs carry nothing we need.
                        Some(Ok(_)) => {}
                    },
                }
            }
            inner.socket.send_modify(|s| s.client_id = None);
            // A lost socket is often the first sign that ComfyUI died.
            inner.signal.send_modify(|n| *n = n.wrapping_add(1));
            debug!(url = %inner.config.url, "comfyui socket lost; reconnecting");
        }
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Hands a message to the job waiting for its prompt. Messages without a prompt_id (`status`, the
/// reconnect form of `executing`) and for prompts nobody waits on are dropped.
fn route(inner: &Inner, text: &str) {
    let Ok(msg) = serde_json::from_str::<Value>(text) else { return };
    let Some(pid) = msg.get("data").and_then(|d| d.get("prompt_id")).and_then(Value::as_str) else { return };
    if let Some(tx) = inner.routes().get(pid) {
        let _ = tx.send(msg);
    }
}

/// Removes a prompt's route when the job ends, however it ends.
struct RouteGuard<'a> {
    inner: &'a Inner,
    prompt_id: String,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.inner.routes().remove(&self.prompt_id);
    }
}

/// Node-weighted progress: each node of the graph counts equally; a running node counts by its
/// own progress bar.
#[derive(Debug, Default)]
struct Progress {
    total: usize,
    nodes: HashMap<String, f64>,
}

impl Progress {
    fn set(&mut self, node: &str, fraction: f64) {
        let f = self.nodes.entry(node.to_owned()).or_insert(0.0);
        *f = f.max(fraction.clamp(0.0, 1.0));
    }

    fn percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        // A fold from +0: `sum` of no values is -0.0, which reads as "-0" in events.
        (100.0 * self.nodes.values().fold(0.0, |a, b| a + b) / self.total as f64).min(99.0)
    }

    /// Applies one socket message; returns a message worth showing for it.
    fn apply(&mut self, kind: &str, data: &Value) -> Option<String> {
        match kind {
            "execution_cached" => {
                for n in data
                    .get("nodes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    self.set(n, 1.0);
                }
                None
            }
            "executing" => {
                let node = data.get("node").and_then(Value::as_str)?;
                self.set(node, 0.0);
                Some(format!("node {node}"))
            }
            "progress_state" => {
                for (id, n) in data.get("nodes").and_then(Value::as_object).into_iter().flatten() {
                    let finished = n.get("state").and_then(Value::as_str) == Some("finished");
                    let value = n.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                    let max = n.get("max").and_then(Value::as_f64).unwrap_or(1.0);
                    self.set(
                        id,
                        if finished {
                            1.0
                        } else if max > 0.0 {
                            value / max
                        } else {
                            0.0
                        },
                    );
                }
                None
            }
            "progress" => {
                let node = data.get("node").and_then(Value::as_str).unwrap_or("");
                let value = data.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                let max = data.get("max").and_then(Value::as_f64).unwrap_or(1.0);
                if max > 0.0 {
                    self.set(node, value / max);
                }
                Some(format!("node {node}: step {value} of {max}"))
            }
            _ => None,
        }
    }
}

/// A JSON object (a workflow, or its extra data).
type Workflow = Map<String, Value>;

/// The workflow and extra data in a job payload: `{"prompt": {...}, "extra_data": {...}}`,
/// `{"workflow": {...}}`, or the API-format workflow itself.
fn parse_payload(payload: &Value) -> Result<(Workflow, Workflow), JobError> {
    let bad = |m: &str| JobError::fatal(FailureCategory::Validation, m.to_owned());
    let obj =
        payload.as_object().ok_or_else(|| bad("payload must be an object holding a ComfyUI workflow"))?;
    let extra = obj.get("extra_data").and_then(Value::as_object).cloned().unwrap_or_default();
    let workflow = match obj.get("prompt").or_else(|| obj.get("workflow")) {
        Some(Value::Object(w)) => w.clone(),
        Some(_) => return Err(bad("payload.prompt must be an API-format workflow object")),
        None => obj.clone(),
    };
    if workflow.is_empty()
        || !workflow.values().all(|n| n.get("class_type").is_some() || n.get("inputs").is_some())
    {
        return Err(bad(
            "payload is not an API-format ComfyUI workflow (an object of nodes with class_type and inputs); \
             export it with \"Save (API Format)\"",
        ));
    }
    Ok((workflow, extra))
}

/// A readable, fatal error from ComfyUI's validation reply (400, or 200 with `node_errors`).
fn describe_validation(body: &Value) -> String {
    let mut parts = Vec::new();
    for (id, node) in body.get("node_errors").and_then(Value::as_object).into_iter().flatten() {
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("?");
        for e in node.get("errors").and_then(Value::as_array).into_iter().flatten() {
            let input = e.pointer("/extra_info/input_name").and_then(Value::as_str).unwrap_or("");
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            let details = e.get("details").and_then(Value::as_str).unwrap_or("");
            let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
            let mut p = format!("node {id} ({class})");
            if !input.is_empty() {
                p.push_str(&format!(" input '{input}'"));
            }
            p.push_str(&format!(": {message}"));
            if !details.is_empty() && details != input {
                p.push_str(&format!(" ({details})"));
            }
            p.push_str(&format!(" [{kind}]"));
            parts.push(p);
        }
    }
    if parts.is_empty() {
        let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("rejected");
        let details = body.pointer("/error/details").and_then(Value::as_str).unwrap_or("");
        let kind = body.pointer("/error/type").and_then(Value::as_str).unwrap_or("");
        let mut p = format!("ComfyUI rejected the workflow: {message}");
        if !details.is_empty() {
            p.push_str(&format!(" ({details})"));
        }
        if !kind.is_empty() {
            p.push_str(&format!(" [{kind}]"));
        }
        return p;
    }
    format!("ComfyUI rejected the workflow: {}", parts.join("; "))
}

/// The job's error from a failed history entry.
fn history_error(entry: &Value) -> JobError {
    let messages = entry.pointer("/status/messages").and_then(Value::as_array);
    let last = messages.and_then(|m| {
        m.iter().rev().find(|x| {
            matches!(x.get(0).and_then(Value::as_str), Some("execution_error" | "execution_interrupted"))
        })
    });
    let kind = last.and_then(|l| l.get(0)).and_then(Value::as_str).unwrap_or("");
    let data = last.and_then(|l| l.get(1)).cloned().unwrap_or(Value::Null);
    let node = data.get("node_id").and_then(Value::as_str).unwrap_or("?");
    let class = data.get("node_type").and_then(Value::as_str).unwrap_or("?");
    if kind == "execution_interrupted" {
        return JobError::retryable(
            FailureCategory::Service,
            format!("interrupted on the ComfyUI server at node {node} ({class})"),
        );
    }
    let etype = data.get("exception_type").and_then(Value::as_str).unwrap_or("error");
    let emsg = data.get("exception_message").and_then(Value::as_str).unwrap_or("").trim_end();
    let message = format!("node {node} ({class}) raised {etype}: {emsg}");
    let lower = format!("{etype} {emsg}").to_lowercase();
    if lower.contains("outofmemory")
        || lower.contains("out of memory")
        || lower.contains("can't allocate memory")
    {
        // The same GPU with its memory freed, or a larger one, may have the memory.
        JobError {
            alloc_bytes: fleetq_core::oom::allocation_in(emsg),
            ..JobError::retryable(FailureCategory::Oom, message)
        }
    } else {
        JobError::fatal(FailureCategory::Service, message)
    }
}

impl ComfyUi {
    async fn history(&self, prompt_id: &str) -> Result<Option<Value>, JobError> {
        let (status, body) = self.inner.http.get_json(&format!("/history/{prompt_id}")).await?;
        if status != StatusCode::OK {
            return Err(JobError::retryable(
                FailureCategory::Service,
                format!("GET /history replied {status}"),
            ));
        }
        Ok(body.get(prompt_id).cloned())
    }

    /// Where ComfyUI's queue holds the prompt: `Some(true)` running, `Some(false)` pending.
    async fn queued(&self, prompt_id: &str) -> Result<Option<bool>, JobError> {
        let (_, q) = self.inner.http.get_json("/queue").await?;
        let holds = |k: &str| {
            q.get(k)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|item| item.get(1).and_then(Value::as_str) == Some(prompt_id))
        };
        Ok(if holds("queue_running") {
            Some(true)
        } else if holds("queue_pending") {
            Some(false)
        } else {
            None
        })
    }

    /// Stops the prompt wherever it is: interrupt if running, delete if pending.
    async fn interrupt(&self, prompt_id: &str) {
        let http = &self.inner.http;
        if let Err(e) = http.post_json("/interrupt", &json!({"prompt_id": prompt_id})).await {
            warn!(error = %e, "comfyui interrupt failed");
        }
        let _ = http.post_json("/queue", &json!({"delete": [prompt_id]})).await;
    }

    /// Interrupts the prompt and waits, within `stop_wait_ms`, until ComfyUI no longer holds it, so
    /// the worker takes no new job while the GPU is still busy with this one. A prompt that
    /// succeeded before the interrupt landed is returned as a result (its outputs are real).
    async fn stop_prompt(
        &self,
        job: &JobRecord,
        prompt_id: &str,
        rx: &mut mpsc::UnboundedReceiver<Value>,
        sink: &ProgressSink,
        percent: f64,
    ) -> Result<Value, JobError> {
        let stopped = || JobError::fatal(FailureCategory::Cancelled, "interrupted");
        self.interrupt(prompt_id).await;
        let give_up =
            tokio::time::Instant::now() + Duration::from_millis(self.inner.config.stop_wait_ms.max(1));
        let every = Duration::from_millis(self.inner.config.poll_ms.clamp(10, 250));
        let mut interrupted_running = false;
        loop {
            // Written when the prompt ends, however it ends. An unreachable ComfyUI runs nothing.
            let Ok(entry) = self.history(prompt_id).await else { return Err(stopped()) };
            if let Some(entry) = entry {
                let succeeded =
                    entry.pointer("/status/status_str").and_then(Value::as_str) == Some("success");
                if succeeded {
                    warn!(
                        prompt_id,
                        "ComfyUI finished the prompt before the interrupt landed; keeping its outputs"
                    );
                    return self.finish(job, prompt_id, &entry, Completion::AfterInterrupt).await;
                }
                return Err(stopped());
            }
            match self.queued(prompt_id).await {
                // Neither queued nor in history: deleted while pending, or just ending (its entry is
                // written before it leaves the queue, so look once more).
                Ok(None) => {
                    return match self.history(prompt_id).await {
                        Ok(Some(entry))
                            if entry.pointer("/status/status_str").and_then(Value::as_str)
                                == Some("success") =>
                        {
                            self.finish(job, prompt_id, &entry, Completion::AfterInterrupt).await
                        }
                        _ => Err(stopped()),
                    };
                }
                // Started between the delete and the interrupt (each is ignored in the other state).
                Ok(Some(running)) if running && !interrupted_running => {
                    interrupted_running = true;
                    self.interrupt(prompt_id).await;
                }
                Ok(Some(_)) => {}
                Err(_) => return Err(stopped()),
            }
            if tokio::time::Instant::now() >= give_up {
                warn!(prompt_id, "ComfyUI still holds the interrupted prompt; giving the job up anyway");
                return Err(stopped());
            }
            // A sign of life for the worker, which is waiting for this call to return.
            sink.report(percent, Some("stopping: waiting for ComfyUI to end the prompt".into()));
            // Look again after `every`, or at once when the socket says the prompt ended.
            let next = tokio::time::sleep(every);
            tokio::pin!(next);
            loop {
                tokio::select! {
                    Some(msg) = rx.recv() => {
                        let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
                        let ended = matches!(kind, "execution_interrupted" | "execution_success" | "execution_error")
                            || (kind == "executing" && msg.pointer("/data/node").is_some_and(Value::is_null));
                        if ended { break }
                    }
                    () = &mut next => break,
                }
            }
        }
    }

    async fn finish(
        &self,
        job: &JobRecord,
        prompt_id: &str,
        entry: &Value,
        how: Completion,
    ) -> Result<Value, JobError> {
        if entry.pointer("/status/status_str").and_then(Value::as_str) == Some("error") {
            return Err(history_error(entry));
        }
        let mut outputs = Map::new();
        for (node, out) in entry.get("outputs").and_then(Value::as_object).into_iter().flatten() {
            let mut node_out = Map::new();
            for (key, items) in out.as_object().into_iter().flatten() {
                let Some(items) = items.as_array() else {
                    node_out.insert(key.clone(), items.clone());
                    continue;
                };
                let mut refs = Vec::new();
                for item in items {
                    refs.push(self.output_ref(job, item).await?);
                }
                node_out.insert(key.clone(), Value::Array(refs));
            }
            outputs.insert(node.clone(), Value::Object(node_out));
        }
        Ok(json!({"prompt_id": prompt_id, "outputs": outputs, "completion": how.as_str()}))
    }

    /// A file output as a reference (`url`), copied into the artifacts directory if configured.
    async fn output_ref(&self, job: &JobRecord, item: &Value) -> Result<Value, JobError> {
        let Some(filename) = item.get("filename").and_then(Value::as_str) else { return Ok(item.clone()) };
        let subfolder = item.get("subfolder").and_then(Value::as_str).unwrap_or("");
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("output");
        let path = format!(
            "/view?filename={}&subfolder={}&type={}",
            fleetq_core::url::component(filename),
            fleetq_core::url::component(subfolder),
            fleetq_core::url::component(kind)
        );
        let mut r = item.clone();
        if let Some(o) = r.as_object_mut() {
            o.insert("url".into(), json!(self.inner.http.url(&path)));
        }
        if !self.inner.artifacts.has_dir() {
            return Ok(r);
        }
        let (status, bytes) = self.inner.http.get_bytes(&path).await?;
        if status != StatusCode::OK {
            return Err(JobError::retryable(
                FailureCategory::Service,
                format!("GET {path} replied {status}"),
            ));
        }
        let Some(rel) = self.inner.artifacts.write_file(&job.summary.id.0, filename, &bytes).await? else {
            return Ok(r);
        };
        if let Some(o) = r.as_object_mut() {
            o.insert("artifact".into(), json!(rel));
            o.insert("bytes".into(), json!(bytes.len()));
        }
        Ok(r)
    }

    /// The model files ComfyUI has, per folder (`GET /models`, then `GET /models/{folder}` for every
    /// folder that holds models), `None` when it does not say.
    async fn models(&self) -> Option<BTreeMap<String, Vec<String>>> {
        let http = &self.inner.http;
        let Ok((StatusCode::OK, Value::Array(folders))) = http.get_json("/models").await else { return None };
        let folders: Vec<String> = folders
            .iter()
            .filter_map(Value::as_str)
            .filter(|f| !NOT_MODEL_FOLDERS.contains(f) && !f.is_empty() && !f.contains(['/', '?', '#', '%']))
            .take(MAX_MODEL_FOLDERS)
            .map(str::to_owned)
            .collect();
        let paths: Vec<String> = folders.iter().map(|f| format!("/models/{f}")).collect();
        let lists = futures::future::join_all(paths.iter().map(|p| http.get_json(p))).await;
        let mut out = BTreeMap::new();
        for (folder, list) in folders.into_iter().zip(lists) {
            if let Ok((StatusCode::OK, Value::Array(files))) = list {
                let files: Vec<String> = files
                    .iter()
                    .filter_map(Value::as_str)
                    .take(MAX_MODELS_PER_FOLDER)
                    .map(str::to_owned)
                    .collect();
                out.insert(folder, files);
            }
        }
        Some(out)
    }

    /// What ComfyUI says about itself: version, memory per device, queue length, models per folder.
    async fn service_info(&self, stats: &Value, models: Option<&BTreeMap<String, Vec<String>>>) -> Value {
        let http = &self.inner.http;
        let queue = match http.get_json("/queue").await {
            Ok((StatusCode::OK, q)) => {
                let len = |k: &str| q.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                json!({"running": len("queue_running"), "pending": len("queue_pending")})
            }
            _ => Value::Null,
        };
        let devices: Vec<Value> = stats
            .pointer("/devices")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .map(|d| json!({"name": d.get("name"), "vram_total": d.get("vram_total"), "vram_free": d.get("vram_free")}))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "url": self.inner.config.url,
            "version": stats.pointer("/system/comfyui_version"),
            "ram_free": stats.pointer("/system/ram_free"),
            "devices": devices,
            "queue": queue,
            "models": models,
        })
    }

    /// The memory of ComfyUI's device (`/system_stats`, the first device's `vram_total`).
    async fn device_memory(&self) -> Option<u64> {
        let (status, stats) = self.inner.http.get_json("/system_stats").await.ok()?;
        (status == StatusCode::OK).then_some(())?;
        stats.pointer("/devices/0/vram_total")?.as_u64()
    }

    async fn run_prompt(
        &self,
        job: &JobRecord,
        sink: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        let (workflow, extra_data) = parse_payload(&job.spec.payload)?;
        let mut socket = self.inner.socket.subscribe();
        // Give a (re)connecting socket a moment: events flow only to a registered clientId. If it
        // stays down the job still completes through history polling.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), socket.wait_for(|s| s.client_id.is_some())).await;
        let state = socket.borrow_and_update().clone();
        let client_id = state.client_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.inner.routes().insert(prompt_id.clone(), tx);
        let _guard = RouteGuard { inner: &self.inner, prompt_id: prompt_id.clone() };
        let mut progress = Progress { total: workflow.len(), ..Progress::default() };

        let body = json!({"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id, "extra_data": extra_data});
        let (status, reply) = self.inner.http.post_json("/prompt", &body).await?;
        let reply: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        match status {
            StatusCode::OK => {
                if reply.get("node_errors").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                    // Partially valid: ComfyUI would silently skip the failing outputs.
                    self.interrupt(&prompt_id).await;
                    return Err(JobError::fatal(FailureCategory::Validation, describe_validation(&reply)));
                }
            }
            StatusCode::BAD_REQUEST => {
                return Err(JobError::fatal(FailureCategory::Validation, describe_validation(&reply)));
            }
            other => {
                return Err(JobError::retryable(
                    FailureCategory::Service,
                    format!("POST /prompt replied {other}"),
                ));
            }
        }
        sink.report(0.0, Some("queued in ComfyUI".into()));
        // A cached prompt can be finished before we read the reply.
        if let Some(entry) = self.history(&prompt_id).await? {
            return self.finish(job, &prompt_id, &entry, Completion::HistoryCheck).await;
        }
        let poll_every = Duration::from_millis(self.inner.config.poll_ms.max(10));
        let mut quiet = tokio::time::Instant::now() + poll_every;
        let mut epoch = state.epoch;
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    return self.stop_prompt(job, &prompt_id, &mut rx, &sink, progress.percent()).await;
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { continue };
                    quiet = tokio::time::Instant::now() + poll_every;
                    let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
                    let data = msg.get("data").cloned().unwrap_or(Value::Null);
                    if kind == "executing" && data.get("node").is_some_and(Value::is_null) {
                        // History is written before the terminal marker is sent.
                        for _ in 0..20 {
                            if let Some(entry) = self.history(&prompt_id).await? {
                                return self.finish(job, &prompt_id, &entry, Completion::Websocket).await;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        return Err(JobError::retryable(FailureCategory::Service, "prompt finished without a history entry"));
                    }
                    let message = progress.apply(kind, &data);
                    sink.report(progress.percent(), message);
                }
                () = tokio::time::sleep_until(quiet) => {
                    quiet = tokio::time::Instant::now() + poll_every;
                    if let Some(entry) = self.history(&prompt_id).await? {
                        return self.finish(job, &prompt_id, &entry, Completion::HistoryPoll).await;
                    }
                    match self.queued(&prompt_id).await? {
                        // Waiting behind other prompts in ComfyUI's own queue is not a hang. A
                        // running prompt shows life only through its events, so a stuck node
                        // still trips the progress timeout.
                        Some(false) => sink.report(progress.percent(), Some("queued in ComfyUI".into())),
                        Some(true) => {}
                        // Neither queued, running nor finished: ComfyUI restarted under the job
                        // (its queue and history are in memory). That is the service going away,
                        // not the job failing: the worker gives the job back without spending
                        // an attempt, as when the service cannot be reached.
                        None if self.history(&prompt_id).await?.is_none() => {
                            return Err(JobError::retryable(FailureCategory::Connection, "the prompt vanished from ComfyUI (restarted?)"));
                        }
                        None => {}
                    }
                }
                changed = socket.changed() => {
                    if changed.is_err() { continue }
                    let now = socket.borrow_and_update().clone();
                    if now.epoch != epoch {
                        epoch = now.epoch;
                        // Events sent while disconnected are lost: reconcile with history.
                        if let Some(entry) = self.history(&prompt_id).await? {
                            return self.finish(job, &prompt_id, &entry, Completion::Reconnect).await;
                        }
                    }
                }
            }
        }
    }
}

impl Service for ComfyUi {
    fn name(&self) -> &str {
        &self.inner.config.service
    }

    async fn check(&self) -> Health {
        match self
            .inner
            .http
            .request(reqwest::Method::GET, "/system_stats")
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let stats: Value = r.json().await.unwrap_or(Value::Null);
                let mut health = Health::idle();
                health.message = (!self.socket_connected())
                    .then(|| "websocket reconnecting; using history polling".to_owned());
                let models = self.models().await;
                health.info = Some(self.service_info(&stats, models.as_ref()).await);
                health.models = models.map(|m| {
                    let names: BTreeSet<String> = m.into_values().flatten().collect();
                    names.into_iter().collect()
                });
                health
            }
            Ok(r) => Health::error(format!("GET /system_stats replied {}", r.status())),
            Err(e) => Health::offline(crate::http::unreachable(&self.inner.config.url, &e).message),
        }
    }

    /// Runs the job's prompt; out of memory, once more after freeing ComfyUI's memory (models and
    /// cache), unless the allocation is larger than the whole device.
    async fn run(
        &self,
        job: &JobRecord,
        sink: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        let e = match self.run_prompt(job, sink.clone(), cancel.clone()).await {
            Err(e) if e.category == FailureCategory::Oom && !cancel.is_cancelled() => e,
            other => return other,
        };
        if let (Some(bytes), Some(total)) = (e.alloc_bytes, self.device_memory().await)
            && bytes > total
        {
            let message = format!(
                "{}; larger than this device's {:.1} GiB, so it cannot fit here",
                e.message,
                total as f64 / 1_073_741_824.0
            );
            return Err(JobError { message, ..e });
        }
        warn!(error = %e.message, "out of memory; freeing ComfyUI's memory and trying once more");
        if let Err(free) =
            self.inner.http.post_json("/free", &json!({"unload_models": true, "free_memory": true})).await
        {
            warn!(error = %free, "POST /free failed");
        }
        sink.report(0.0, Some("out of memory: freed ComfyUI's memory, trying once more".into()));
        self.run_prompt(job, sink, cancel).await
    }

    fn health_signal(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.signal.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_name_node_class_and_input() {
        let body = json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value -5 smaller than min of 1", "details": "width",
                "extra_info": {"input_name": "width"}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}});
        assert_eq!(
            describe_validation(&body),
            "ComfyUI rejected the workflow: node 1 (EmptyImage) input 'width': Value -5 smaller than min of 1 [value_smaller_than_min]"
        );
        let whole = json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#2'", "extra_info": {}}, "node_errors": {}});
        assert_eq!(
            describe_validation(&whole),
            "ComfyUI rejected the workflow: Cannot execute because node NoSuchNode does not exist. (Node ID '#2') [invalid_prompt]"
        );
    }

    #[test]
    fn a_workflow_is_accepted_bare_or_wrapped() {
        let wf = json!({"1": {"class_type": "EmptyImage", "inputs": {}}});
        assert_eq!(parse_payload(&wf).map(|p| p.0.len()).ok(), Some(1));
        assert_eq!(
            parse_payload(&json!({"prompt": wf, "extra_data": {"a": 1}})).map(|p| p.1.len()).ok(),
            Some(1)
        );
        assert!(parse_payload(&json!({"workflow": wf})).is_ok());
        assert!(
            parse_payload(&json!({"nodes": [], "links": []})).is_err(),
            "UI-format workflows are refused"
        );
        assert!(parse_payload(&json!([1])).is_err());
        assert!(parse_payload(&json!({})).is_err());
    }

    #[test]
    fn oom_is_retryable_other_errors_are_fatal() {
        let entry = |etype: &str, msg: &str| json!({"status": {"status_str": "error", "messages": [["execution_error", {"node_id": "1", "node_type": "EmptyImage", "exception_type": etype, "exception_message": msg}]]}});
        let oom = history_error(&entry(
            "RuntimeError",
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. Error code 12\n",
        ));
        assert!(oom.retryable);
        assert_eq!(oom.category, FailureCategory::Oom);
        assert_eq!(oom.alloc_bytes, Some(68_719_476_736), "the allocation's size travels with the error");
        let e = history_error(&entry("ValueError", "probe failure\n"));
        assert!(!e.retryable);
        assert_eq!(e.message, "node 1 (EmptyImage) raised ValueError: probe failure");
    }

    #[test]
    fn progress_is_node_weighted() {
        let mut p = Progress { total: 4, ..Progress::default() };
        assert!(p.percent().is_sign_positive(), "no node yet is 0, not -0");
        p.apply("execution_cached", &json!({"nodes": ["1"]}));
        assert!((p.percent() - 25.0).abs() < 1e-9);
        p.apply("progress", &json!({"node": "2", "value": 5, "max": 10}));
        assert!((p.percent() - 37.5).abs() < 1e-9);
        p.apply("progress_state", &json!({"nodes": {"2": {"state": "finished", "value": 10, "max": 10}}}));
        assert!((p.percent() - 50.0).abs() < 1e-9);
    }
}
