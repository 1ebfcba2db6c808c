//! A mock ComfyUI 0.3.64: HTTP routes (also under `/api`), the `/ws` socket, the prompt queue, the
//! execution cache, history, `/view` files and interrupts, with the message orders of docs/services.md §1.7.
//!
//! Built-in node classes: `EmptyImage`, `EmptyLatentImage`, `ImageInvert`, `SaveImage`,
//! `PreviewImage`, `LoadImage` and the transcripts' probe nodes `ProbeSleepProgress` (steps with
//! progress) and `ProbeRaise` (raises `ValueError`). `EmptyImage` fails with the real allocator
//! error past [`ComfyMockConfig::memory_limit`] (2^33 bytes by default), as in
//! `07_runtime_error.json`.
//!
//! Knobs for tests ([`ComfyMockConfig`]): a delay per executed node, a time scale for the probe
//! nodes' sleeps and a "GC stall" before the tail messages. Observations for tests
//! ([`ComfyMock::interrupts`], [`ComfyMock::prompts`]). [`ComfyMock::stop`] kills the service the
//! way a crash does: sockets drop and new connections are refused.

mod execute;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{PNG, empty, empty_ok, json_reply, now_ms};

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct ComfyMockConfig {
    /// Extra time every executed (not cached) node takes.
    pub node_delay: Duration,
    /// Multiplies the probe nodes' `step_seconds` (0 makes them instant).
    pub time_scale: f64,
    /// Delay before the tail messages (`status`, `executing{null}`), like the real server's GC stall.
    pub tail_stall: Duration,
    /// Hold each `POST /prompt` reply until that prompt has finished: the worst case of the race
    /// where a cached prompt's whole run is sent before the client reads the reply (§1.6).
    pub reply_after_done: bool,
    /// The largest allocation (bytes) `EmptyImage` gets; a larger one fails with the CPU
    /// allocator's out-of-memory error, as in `07_runtime_error.json`.
    pub memory_limit: u64,
}

impl Default for ComfyMockConfig {
    fn default() -> Self {
        Self {
            node_delay: Duration::ZERO,
            time_scale: 1.0,
            tail_stall: Duration::ZERO,
            reply_after_done: false,
            memory_limit: 1 << 33,
        }
    }
}

/// One input of a node class.
struct InputDef {
    name: &'static str,
    kind: &'static str,
    config: Value,
}

/// A node class the mock knows.
struct NodeDef {
    class: &'static str,
    inputs: Vec<InputDef>,
    outputs: &'static [&'static str],
    output_node: bool,
    category: &'static str,
}

fn int(default: i64, min: i64, max: i64, step: Option<i64>) -> Value {
    let mut m = Map::new();
    m.insert("default".into(), default.into());
    m.insert("min".into(), min.into());
    m.insert("max".into(), max.into());
    if let Some(step) = step {
        m.insert("step".into(), step.into());
    }
    Value::Object(m)
}

fn input(name: &'static str, kind: &'static str, config: Value) -> InputDef {
    InputDef { name, kind, config }
}

static CATALOG: LazyLock<Vec<NodeDef>> = LazyLock::new(|| {
    let size = || int(512, 1, 16384, Some(1));
    let latent_size = || json!({"default": 512, "min": 16, "max": 16384, "step": 8});
    vec![
        NodeDef {
            class: "EmptyImage",
            inputs: vec![
                input("width", "INT", size()),
                input("height", "INT", size()),
                input("batch_size", "INT", int(1, 1, 4096, None)),
                input(
                    "color",
                    "INT",
                    json!({"default": 0, "min": 0, "max": 16_777_215, "step": 1, "display": "color"}),
                ),
            ],
            outputs: &["IMAGE"],
            output_node: false,
            category: "image",
        },
        NodeDef {
            class: "EmptyLatentImage",
            inputs: vec![
                input("width", "INT", latent_size()),
                input("height", "INT", latent_size()),
                input("batch_size", "INT", int(1, 1, 4096, None)),
            ],
            outputs: &["LATENT"],
            output_node: false,
            category: "latent",
        },
        NodeDef {
            class: "ImageInvert",
            inputs: vec![input("image", "IMAGE", json!({}))],
            outputs: &["IMAGE"],
            output_node: false,
            category: "image",
        },
        NodeDef {
            class: "SaveImage",
            inputs: vec![
                input("images", "IMAGE", json!({"tooltip": "The images to save."})),
                input(
                    "filename_prefix",
                    "STRING",
                    json!({"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}),
                ),
            ],
            outputs: &[],
            output_node: true,
            category: "image",
        },
        NodeDef {
            class: "PreviewImage",
            inputs: vec![input("images", "IMAGE", json!({}))],
            outputs: &[],
            output_node: true,
            category: "image",
        },
        NodeDef {
            class: "LoadImage",
            inputs: vec![input("image", "COMBO", json!({"image_upload": true}))],
            outputs: &["IMAGE", "MASK"],
            output_node: false,
            category: "image",
        },
        NodeDef {
            class: "ProbeSleepProgress",
            inputs: vec![
                input("image", "IMAGE", json!({})),
                input("steps", "INT", int(10, 1, 10000, None)),
                input("step_seconds", "FLOAT", json!({"default": 0.05, "min": 0.0, "max": 60.0})),
                input("send_preview", "BOOLEAN", json!({"default": false})),
                input("send_text", "BOOLEAN", json!({"default": false})),
            ],
            outputs: &["IMAGE"],
            output_node: false,
            category: "probe",
        },
        NodeDef {
            class: "ProbeRaise",
            inputs: vec![
                input("image", "IMAGE", json!({})),
                input("message", "STRING", json!({"default": "probe failure"})),
            ],
            outputs: &["IMAGE"],
            output_node: false,
            category: "probe",
        },
    ]
});

fn node_def(class: &str) -> Option<&'static NodeDef> {
    CATALOG.iter().find(|d| d.class == class)
}

fn input_config(def: &InputDef) -> Value {
    if def.kind == "COMBO" { json!([[], def.config]) } else { json!([def.kind, def.config]) }
}

fn object_info(def: &NodeDef) -> Value {
    let mut required = Map::new();
    for i in &def.inputs {
        required.insert(i.name.into(), input_config(i));
    }
    let names: Vec<&str> = def.inputs.iter().map(|i| i.name).collect();
    json!({
        "input": {"required": required},
        "input_order": {"required": names},
        "output": def.outputs,
        "output_is_list": def.outputs.iter().map(|_| false).collect::<Vec<_>>(),
        "output_name": def.outputs,
        "name": def.class,
        "display_name": def.class,
        "description": "",
        "python_module": if def.category == "probe" { "custom_nodes.probe_nodes" } else { "nodes" },
        "category": def.category,
        "output_node": def.output_node,
    })
}

/// A prompt in the queue.
#[derive(Debug, Clone)]
struct Queued {
    number: Value,
    prompt_id: String,
    prompt: Map<String, Value>,
    extra_data: Map<String, Value>,
    outputs: Vec<String>,
}

impl Queued {
    fn client_id(&self) -> Option<String> {
        self.extra_data.get("client_id").and_then(Value::as_str).map(str::to_owned)
    }
    fn item(&self) -> Value {
        json!([self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs])
    }
    /// Python's tuple order on the queue item `(number, prompt_id, …)`.
    fn less(&self, other: &Self) -> bool {
        let (a, b) = (self.number.as_f64().unwrap_or(0.0), other.number.as_f64().unwrap_or(0.0));
        a < b || (a == b && self.prompt_id < other.prompt_id)
    }
}

/// The pending queue as ComfyUI keeps it: a binary heap with Python `heapq`'s exact algorithms, so
/// `GET /queue` lists items in the same (heap, not sorted) order as the real server.
mod heapq {
    use super::Queued;

    fn sift_down(heap: &mut [Queued], start: usize, mut pos: usize) {
        while pos > start {
            let parent = (pos - 1) >> 1;
            if heap[pos].less(&heap[parent]) {
                heap.swap(pos, parent);
                pos = parent;
            } else {
                break;
            }
        }
    }

    fn sift_up(heap: &mut [Queued], mut pos: usize) {
        let end = heap.len();
        let start = pos;
        let mut child = 2 * pos + 1;
        while child < end {
            let right = child + 1;
            if right < end && !heap[child].less(&heap[right]) {
                child = right;
            }
            heap.swap(pos, child);
            pos = child;
            child = 2 * pos + 1;
        }
        sift_down(heap, start, pos);
    }

    pub(super) fn push(heap: &mut Vec<Queued>, item: Queued) {
        heap.push(item);
        let last = heap.len() - 1;
        sift_down(heap, 0, last);
    }

    pub(super) fn pop(heap: &mut Vec<Queued>) -> Option<Queued> {
        let last = heap.pop()?;
        if heap.is_empty() {
            return Some(last);
        }
        let top = std::mem::replace(&mut heap[0], last);
        sift_up(heap, 0);
        Some(top)
    }

    pub(super) fn heapify(heap: &mut [Queued]) {
        for i in (0..heap.len() / 2).rev() {
            sift_up(heap, i);
        }
    }
}

#[derive(Debug)]
struct Socket {
    tx: mpsc::UnboundedSender<Message>,
}

#[derive(Debug, Default)]
struct Inner {
    counter: i64,
    pending: Vec<Queued>,
    running: Option<(Queued, Option<String>)>,
    interrupt: bool,
    history: Vec<(String, Value)>,
    cache: HashMap<String, Option<Value>>,
    sockets: HashMap<String, Socket>,
    files: HashMap<(String, String, String), Vec<u8>>,
    file_counters: HashMap<String, u32>,
    interrupts: Vec<Value>,
    prompts: Vec<Value>,
    frees: Vec<Value>,
    /// Model folders and their files (`GET /models`, `GET /models/{folder}`).
    models: BTreeMap<String, Vec<String>>,
}

impl Inner {
    fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    fn send_to(&self, client: &str, text: &str) {
        if let Some(s) = self.sockets.get(client) {
            let _ = s.tx.send(Message::Text(text.into()));
        }
    }

    fn broadcast(&self, text: &str) {
        for s in self.sockets.values() {
            let _ = s.tx.send(Message::Text(text.into()));
        }
    }

    /// Routes a message the way ComfyUI does: to the prompt's client, or (for the few broadcast
    /// kinds) to everyone when the prompt has no client; dropped when nobody listens.
    fn emit(&self, client: Option<&str>, kind: &str, data: Value) {
        let text = json!({"type": kind, "data": data}).to_string();
        match client {
            Some(c) => self.send_to(c, &text),
            None if matches!(kind, "progress" | "progress_state" | "execution_interrupted") => {
                self.broadcast(&text)
            }
            None => {}
        }
    }

    fn broadcast_status(&self) {
        let text = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}})
            .to_string();
        self.broadcast(&text);
    }
}

struct Shared {
    config: ComfyMockConfig,
    inner: Mutex<Inner>,
    work: Notify,
    /// Wakes replies held by `reply_after_done` when a prompt finishes.
    done: Notify,
    stop: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the mock's data half-written in a way that
        // matters to a test; keep serving.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running mock ComfyUI.
pub struct ComfyMock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ComfyMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyMock").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ComfyMock {
    /// Starts on a free loopback port.
    pub async fn start(config: ComfyMockConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr, config: ComfyMockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner {
                models: MODEL_FOLDERS
                    .iter()
                    .map(|(f, files)| ((*f).to_owned(), files.iter().map(|m| (*m).to_owned()).collect()))
                    .collect(),
                ..Inner::default()
            }),
            work: Notify::new(),
            done: Notify::new(),
            stop: CancellationToken::new(),
        });
        let app = router(shared.clone());
        tokio::spawn(executor(shared.clone()));
        let stop = shared.stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        Ok(Self { addr, shared, server })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bodies of every `POST /interrupt` received (`{}` for an empty body).
    pub fn interrupts(&self) -> Vec<Value> {
        self.shared.lock().interrupts.clone()
    }

    /// The bodies of every `POST /free` that parsed as JSON.
    pub fn frees(&self) -> Vec<Value> {
        self.shared.lock().frees.clone()
    }

    /// The bodies of every `POST /prompt` that parsed as JSON.
    pub fn prompts(&self) -> Vec<Value> {
        self.shared.lock().prompts.clone()
    }

    /// The clientIds that have a registered socket (ids whose events would be delivered).
    pub fn connected_clients(&self) -> Vec<String> {
        self.shared.lock().sockets.keys().cloned().collect()
    }

    /// Closes every open WebSocket (a network blip); the service stays up and clients may reconnect.
    pub fn drop_sockets(&self) {
        self.shared.lock().sockets.clear();
    }

    /// Puts a model file into `folder` (as a download into ComfyUI's models directory would).
    pub fn add_model(&self, folder: &str, file: &str) {
        self.shared.lock().models.entry(folder.to_owned()).or_default().push(file.to_owned());
    }

    /// Whether a prompt is running now.
    pub fn is_busy(&self) -> bool {
        self.shared.lock().running.is_some()
    }

    /// Kills the service: open sockets drop, the listener closes, the running prompt is abandoned.
    pub async fn stop(mut self) {
        self.shared.stop.cancel();
        self.shared.lock().sockets.clear();
        let server = std::mem::replace(&mut self.server, tokio::spawn(async {}));
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
}

impl Drop for ComfyMock {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let routes: Router<Arc<Shared>> = Router::new()
        .route("/ws", get(ws))
        .route("/prompt", post(post_prompt).get(get_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{id}", get(get_history_one))
        .route("/view", get(view))
        .route("/system_stats", get(system_stats))
        .route("/object_info", get(object_info_all))
        .route("/object_info/{class}", get(object_info_one))
        .route("/features", get(features))
        .route("/embeddings", get(|| async { json_reply(StatusCode::OK, &json!([])) }))
        .route("/models", get(model_folders))
        .route("/models/{folder}", get(models_in));
    Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .layer(middleware::from_fn(origin_guard))
        .with_state(shared)
}

/// ComfyUI's CSRF guard: on a loopback `Host`, an `Origin` whose host differs gets 403, empty body.
async fn origin_guard(request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let loopback = ["127.0.0.1", "localhost", "[::1]"].iter().any(|l| host.split(':').next() == Some(l))
        || host.starts_with("[::1]");
    if let Some(origin) = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && loopback
    {
        let origin_host = origin.split("://").nth(1).unwrap_or(origin);
        if origin_host != host {
            return empty(StatusCode::FORBIDDEN);
        }
    }
    next.run(request).await
}

fn server_error() -> Response {
    let mut r =
        (StatusCode::INTERNAL_SERVER_ERROR, "500 Internal Server Error\n\nServer got itself in trouble")
            .into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn ws(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = q
        .get("clientId")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| serve_socket(shared, socket, sid))
}

async fn serve_socket(shared: Arc<Shared>, socket: WebSocket, sid: String) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    {
        let mut inner = shared.lock();
        let first = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": inner.queue_remaining()}}, "sid": sid}});
        let _ = tx.send(Message::Text(first.to_string().into()));
        if let Some((q, Some(node))) = &inner.running
            && q.client_id().as_deref() == Some(sid.as_str())
        {
            let _ = tx
                .send(Message::Text(json!({"type": "executing", "data": {"node": node}}).to_string().into()));
        }
        // One socket per clientId: a new one replaces the registration.
        inner.sockets.insert(sid.clone(), Socket { tx });
    }
    let stop = shared.stop.clone();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(m) => if sink.send(m).await.is_err() { break },
                    None => break,
                },
            }
        }
        let _ = sink.close().await;
    });
    let mut first = true;
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if first
                        && let Ok(v) = serde_json::from_str::<Value>(text.as_str())
                        && v.get("type").and_then(Value::as_str) == Some("feature_flags")
                    {
                        let reply = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104_857_600}});
                        shared.lock().send_to(&sid, &reply.to_string());
                    }
                    first = false;
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => first = false,
            }
        }
    }
    // The real server's cleanup removes the id whichever socket holds it now (docs/services.md §1.5):
    // a newer socket with the same clientId goes silent.
    shared.lock().sockets.remove(&sid);
    writer.abort();
}

async fn get_prompt(State(shared): State<Arc<Shared>>) -> Response {
    let qr = shared.lock().queue_remaining();
    json_reply(StatusCode::OK, &json!({"exec_info": {"queue_remaining": qr}}))
}

async fn post_prompt(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let (prompt_id, reply) = match accept_prompt(&shared, &body) {
        Ok(accepted) => accepted,
        Err(rejected) => return rejected,
    };
    shared.work.notify_one();
    if shared.config.reply_after_done {
        loop {
            let done = shared.done.notified();
            if shared.lock().history.iter().any(|(k, _)| *k == prompt_id) || shared.stop.is_cancelled() {
                break;
            }
            done.await;
        }
    }
    reply
}

#[allow(clippy::result_large_err, reason = "both arms are HTTP replies, built once per request")]
/// Parses, validates and queues a prompt: `Ok((prompt_id, reply))` when queued, `Err(reply)` otherwise.
fn accept_prompt(shared: &Shared, body: &Bytes) -> Result<(String, Response), Response> {
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(body) else {
        return Err(server_error());
    };
    let mut inner = shared.lock();
    inner.prompts.push(Value::Object(body.clone()));
    let number = match body.get("number") {
        Some(n) => match n.as_f64() {
            Some(f) => json!(f),
            None => return Err(server_error()),
        },
        None => {
            let n = inner.counter;
            inner.counter += 1;
            if body.get("front").and_then(Value::as_bool) == Some(true) { json!(-n) } else { json!(n) }
        }
    };
    let Some(prompt) = body.remove("prompt") else {
        let error = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
        return Err(json_reply(StatusCode::BAD_REQUEST, &json!({"error": error, "node_errors": {}})));
    };
    let Value::Object(prompt) = prompt else {
        return Err(server_error());
    };
    let prompt_id = match body.get("prompt_id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let targets: Option<Vec<String>> = body
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).collect());
    match validate_prompt(&prompt, targets.as_deref(), &inner) {
        Err(error) => Err(json_reply(StatusCode::BAD_REQUEST, &error)),
        Ok((outputs, node_errors)) => {
            let mut extra_data = match body.get("extra_data") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            extra_data.remove("auth_token_comfy_org");
            extra_data.remove("api_key_comfy_org");
            if let Some(c) = body.get("client_id") {
                extra_data.insert("client_id".into(), c.clone());
            }
            let q =
                Queued { number: number.clone(), prompt_id: prompt_id.clone(), prompt, extra_data, outputs };
            heapq::push(&mut inner.pending, q);
            inner.broadcast_status();
            let reply = json_reply(
                StatusCode::OK,
                &json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}),
            );
            Ok((prompt_id, reply))
        }
    }
}

async fn get_queue(State(shared): State<Arc<Shared>>) -> Response {
    let inner = shared.lock();
    let running: Vec<Value> = inner.running.iter().map(|(q, _)| q.item()).collect();
    let pending: Vec<Value> = inner.pending.iter().map(Queued::item).collect();
    json_reply(StatusCode::OK, &json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return server_error();
    };
    let mut inner = shared.lock();
    if body.get("clear").and_then(Value::as_bool) == Some(true) {
        inner.pending.clear();
        inner.broadcast_status();
    }
    if let Some(ids) = body.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            if let Some(x) = inner.pending.iter().position(|q| q.prompt_id == id) {
                inner.pending.remove(x);
                heapq::heapify(&mut inner.pending);
                inner.broadcast_status();
            }
        }
    }
    empty_ok()
}

async fn post_interrupt(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = serde_json::from_slice::<Value>(&body).unwrap_or_else(|_| json!({}));
    let mut inner = shared.lock();
    inner.interrupts.push(body.clone());
    match body.get("prompt_id").and_then(Value::as_str) {
        Some(id) => {
            if inner.running.as_ref().is_some_and(|(q, _)| q.prompt_id == id) {
                inner.interrupt = true;
            }
        }
        None => inner.interrupt = true,
    }
    empty_ok()
}

async fn post_free(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return server_error();
    };
    let mut inner = shared.lock();
    inner.frees.push(body.clone());
    if body.get("free_memory").and_then(Value::as_bool) == Some(true) {
        inner.cache.clear();
    }
    empty_ok()
}

async fn get_history(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let inner = shared.lock();
    let len = inner.history.len();
    let max = q.get("max_items").and_then(|m| m.parse::<usize>().ok()).unwrap_or(len);
    let offset = q.get("offset").and_then(|m| m.parse::<usize>().ok());
    let start = offset.unwrap_or_else(|| len.saturating_sub(max)).min(len);
    let end = (start + max).min(len);
    let map: Map<String, Value> = inner.history[start..end].iter().cloned().collect();
    json_reply(StatusCode::OK, &Value::Object(map))
}

async fn get_history_one(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let inner = shared.lock();
    let mut map = Map::new();
    if let Some((k, v)) = inner.history.iter().find(|(k, _)| *k == id) {
        map.insert(k.clone(), v.clone());
    }
    json_reply(StatusCode::OK, &Value::Object(map))
}

async fn post_history(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return server_error();
    };
    let mut inner = shared.lock();
    if body.get("clear").and_then(Value::as_bool) == Some(true) {
        inner.history.clear();
    }
    if let Some(ids) = body.get("delete").and_then(Value::as_array) {
        let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
        inner.history.retain(|(k, _)| !ids.contains(&k.as_str()));
    }
    empty_ok()
}

async fn view(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(filename) = q.get("filename") else { return empty(StatusCode::BAD_REQUEST) };
    if filename.contains("..") || filename.starts_with('/') {
        return empty(StatusCode::BAD_REQUEST);
    }
    let subfolder = q.get("subfolder").cloned().unwrap_or_default();
    if subfolder.contains("..") || subfolder.starts_with('/') {
        return empty(StatusCode::FORBIDDEN);
    }
    let kind = q.get("type").cloned().unwrap_or_else(|| "output".into());
    let Some(bytes) = shared.lock().files.get(&(kind, subfolder, filename.clone())).cloned() else {
        return empty(StatusCode::NOT_FOUND);
    };
    let mut r = bytes.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    if let Ok(v) = HeaderValue::from_str(&format!("filename=\"{filename}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// The model folders a fresh mock starts with, in the real server's order, and their files.
const MODEL_FOLDERS: &[(&str, &[&str])] = &[
    ("checkpoints", &["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]),
    ("configs", &["v1-inference.yaml"]),
    ("loras", &["detail-tweaker.safetensors"]),
    ("vae", &[]),
    ("text_encoders", &[]),
    ("diffusion_models", &["flux1-dev.safetensors"]),
    ("clip_vision", &[]),
    ("embeddings", &[]),
    ("controlnet", &[]),
    ("upscale_models", &[]),
    ("custom_nodes", &[]),
];

async fn model_folders(State(shared): State<Arc<Shared>>) -> Response {
    let inner = shared.lock();
    // Insertion order is the real server's; a folder added later goes last.
    let mut folders: Vec<&str> = MODEL_FOLDERS.iter().map(|(f, _)| *f).collect();
    folders.extend(
        inner.models.keys().map(String::as_str).filter(|f| !MODEL_FOLDERS.iter().any(|(d, _)| d == f)),
    );
    json_reply(StatusCode::OK, &json!(folders))
}

async fn models_in(State(shared): State<Arc<Shared>>, Path(folder): Path<String>) -> Response {
    match shared.lock().models.get(&folder) {
        Some(files) => json_reply(StatusCode::OK, &json!(files)),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn system_stats() -> Response {
    json_reply(
        StatusCode::OK,
        &json!({"system": {"os": "posix", "ram_total": 25_276_502_016_u64, "ram_free": 23_270_227_968_u64, "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (fleetq mock)", "pytorch_version": "2.8.0+cu128", "embedded_python": false,
            "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"]},
            "devices": [{"name": "cpu", "type": "cpu", "index": null, "vram_total": 25_276_502_016_u64, "vram_free": 23_270_227_968_u64,
                "torch_vram_total": 25_276_502_016_u64, "torch_vram_free": 23_270_227_968_u64}]}),
    )
}

async fn object_info_all() -> Response {
    let map: Map<String, Value> = CATALOG.iter().map(|d| (d.class.to_owned(), object_info(d))).collect();
    json_reply(StatusCode::OK, &Value::Object(map))
}

async fn object_info_one(Path(class): Path<String>) -> Response {
    let mut map = Map::new();
    if let Some(d) = node_def(&class) {
        map.insert(class, object_info(d));
    }
    json_reply(StatusCode::OK, &Value::Object(map))
}

async fn features() -> Response {
    json_reply(StatusCode::OK, &json!({"supports_preview_metadata": true, "max_upload_size": 104_857_600}))
}

use self::execute::*;
use self::validate::*;
