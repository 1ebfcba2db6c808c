//! A mock ComfyUI 0.3.64: HTTP routes (also under `/api`), the `/ws` socket, the prompt queue, the
//! execution cache, history, `/view` files and interrupts, with the message orders of services.md §1.7.
//!
//! Built-in node classes: `EmptyImage`, `EmptyLatentImage`, `ImageInvert`, `SaveImage`,
//! `PreviewImage`, `LoadImage` and the transcripts' probe nodes `ProbeSleepProgress` (steps with
//! progress) and `ProbeRaise` (raises `ValueError`). `EmptyImage` fails with the real allocator
//! error past 2^33 bytes, as in `07_runtime_error.json`.
//!
//! Knobs for tests ([`ComfyMockConfig`]): a delay per executed node, a time scale for the probe
//! nodes' sleeps and a "GC stall" before the tail messages. Observations for tests
//! ([`ComfyMock::interrupts`], [`ComfyMock::prompts`]). [`ComfyMock::stop`] kills the service the
//! way a crash does: sockets drop and new connections are refused.

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
}

impl Default for ComfyMockConfig {
    fn default() -> Self {
        Self {
            node_delay: Duration::ZERO,
            time_scale: 1.0,
            tail_stall: Duration::ZERO,
            reply_after_done: false,
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
            inner: Mutex::new(Inner::default()),
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
        .route(
            "/models",
            get(|| async {
                json_reply(StatusCode::OK, &json!(MODEL_FOLDERS.iter().map(|(f, _)| f).collect::<Vec<_>>()))
            }),
        )
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
    // The real server's cleanup removes the id whichever socket holds it now (services.md §1.5):
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
    if body.get("free_memory").and_then(Value::as_bool) == Some(true) {
        shared.lock().cache.clear();
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

/// Model folders and their files (`GET /models`, `GET /models/{folder}`).
const MODEL_FOLDERS: &[(&str, &[&str])] = &[
    ("checkpoints", &["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]),
    ("loras", &[]),
    ("vae", &[]),
];

async fn models_in(Path(folder): Path<String>) -> Response {
    match MODEL_FOLDERS.iter().find(|(f, _)| *f == folder) {
        Some((_, files)) => json_reply(StatusCode::OK, &json!(files)),
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

// ---------------------------------------------------------------------------------------------
// Validation (ComfyUI `execution.validate_prompt` / `validate_inputs`)

/// An exception raised while validating (the real code's uncaught `KeyError`).
struct Raised {
    message: String,
    kind: &'static str,
}

type Validated = Vec<(String, bool, Vec<Value>)>;

fn memo_get<'a>(validated: &'a Validated, id: &str) -> Option<&'a (String, bool, Vec<Value>)> {
    validated.iter().find(|(k, _, _)| k == id)
}

fn memo_set(validated: &mut Validated, id: &str, ok: bool, errors: Vec<Value>) {
    if let Some(e) = validated.iter_mut().find(|(k, _, _)| k == id) {
        *e = (id.to_owned(), ok, errors);
    } else {
        validated.push((id.to_owned(), ok, errors));
    }
}

fn link_id(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn py_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { format!("{f}") }
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

/// Converts a scalar like Python's `int()` / `float()`; `Err` is the exception message.
fn coerce(kind: &str, v: &Value) -> Result<Option<f64>, String> {
    match kind {
        "INT" => match v {
            Value::Number(n) => Ok(n.as_f64().map(f64::trunc)),
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(|i| Some(i as f64))
                .map_err(|_| format!("invalid literal for int() with base 10: {}", py_repr(v))),
            _ => Err(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                py_type(v)
            )),
        },
        "FLOAT" => match v {
            Value::Number(n) => Ok(n.as_f64()),
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| format!("could not convert string to float: {}", py_repr(v))),
            _ => Err(format!("float() argument must be a string or a real number, not '{}'", py_type(v))),
        },
        _ => Ok(None),
    }
}

fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "dict",
        Value::Array(_) => "list",
        Value::Null => "NoneType",
        Value::String(_) => "str",
        Value::Bool(_) => "bool",
        Value::Number(_) => "int",
    }
}

fn format_number(kind: &str, f: f64) -> String {
    if kind == "INT" { format!("{}", f as i64) } else { py_float(f) }
}

fn validate_inputs(
    prompt: &Map<String, Value>,
    id: &str,
    validated: &mut Validated,
    inner: &Inner,
) -> Result<bool, Raised> {
    if let Some((_, ok, _)) = memo_get(validated, id) {
        return Ok(*ok);
    }
    let node = prompt.get(id).ok_or_else(|| Raised { message: format!("'{id}'"), kind: "KeyError" })?;
    let class = node.get("class_type").and_then(Value::as_str).unwrap_or("");
    let Some(def) = node_def(class) else {
        return Err(Raised { message: format!("'{class}'"), kind: "KeyError" });
    };
    let empty = Map::new();
    let inputs = node.get("inputs").and_then(Value::as_object).unwrap_or(&empty);
    let mut errors = Vec::new();
    let mut valid = true;
    for def_in in &def.inputs {
        let x = def_in.name;
        let config = input_config(def_in);
        let Some(val) = inputs.get(x) else {
            errors.push(json!({"type": "required_input_missing", "message": "Required input is missing", "details": x, "extra_info": {"input_name": x}}));
            continue;
        };
        if let Value::Array(link) = val {
            if link.len() != 2 {
                errors.push(json!({"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": x,
                    "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                continue;
            }
            let o_id = link_id(&link[0]);
            let o_node =
                prompt.get(&o_id).ok_or_else(|| Raised { message: format!("'{o_id}'"), kind: "KeyError" })?;
            let o_class = o_node.get("class_type").and_then(Value::as_str).unwrap_or("");
            let slot = link[1].as_u64().unwrap_or(0) as usize;
            let received = node_def(o_class).and_then(|d| d.outputs.get(slot)).copied().unwrap_or("*");
            if received != def_in.kind && received != "*" && def_in.kind != "*" {
                let details = format!("{x}, received_type({received}) mismatch input_type({})", def_in.kind);
                errors.push(json!({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes", "details": details,
                    "extra_info": {"input_name": x, "input_config": config, "received_type": received, "linked_node": val}}));
                continue;
            }
            match validate_inputs(prompt, &o_id, validated, inner) {
                Ok(true) => {}
                Ok(false) => valid = false,
                Err(ex) => {
                    valid = false;
                    let error = json!({"type": "exception_during_inner_validation", "message": "Exception when validating inner node", "details": ex.message,
                        "extra_info": {"input_name": x, "input_config": config, "exception_message": ex.message, "exception_type": ex.kind,
                            "traceback": ["  File \"<comfyui>/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n"],
                            "linked_node": val}});
                    memo_set(validated, &o_id, false, vec![error]);
                }
            }
            continue;
        }
        if def.class == "LoadImage" && x == "image" {
            let name = val.as_str().unwrap_or("");
            if !inner.files.contains_key(&("input".into(), String::new(), name.to_owned())) {
                errors.push(
                    json!({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                    "details": format!("{x} - Invalid image file: {name}"), "extra_info": {"input_name": x}}),
                );
            }
            continue;
        }
        match coerce(def_in.kind, val) {
            Err(ex) => {
                errors.push(json!({"type": "invalid_input_type", "message": format!("Failed to convert an input value to a {} value", def_in.kind),
                    "details": format!("{x}, {}, {ex}", val.as_str().map_or_else(|| val.to_string(), str::to_owned)),
                    "extra_info": {"input_name": x, "input_config": config, "received_value": val, "exception_message": ex}}));
            }
            Ok(Some(n)) => {
                let min = def_in.config.get("min").and_then(Value::as_f64);
                let max = def_in.config.get("max").and_then(Value::as_f64);
                if let Some(min) = min.filter(|m| n < *m) {
                    errors.push(json!({"type": "value_smaller_than_min",
                        "message": format!("Value {} smaller than min of {}", format_number(def_in.kind, n), format_number(def_in.kind, min)),
                        "details": x, "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                } else if let Some(max) = max.filter(|m| n > *m) {
                    errors.push(json!({"type": "value_bigger_than_max",
                        "message": format!("Value {} bigger than max of {}", format_number(def_in.kind, n), format_number(def_in.kind, max)),
                        "details": x, "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                }
            }
            Ok(None) => {}
        }
    }
    let ok = errors.is_empty() && valid;
    memo_set(validated, id, ok, errors);
    Ok(ok)
}

/// `Ok((outputs to run, node_errors))` or `Err(400 body)`.
fn validate_prompt(
    prompt: &Map<String, Value>,
    targets: Option<&[String]>,
    inner: &Inner,
) -> Result<(Vec<String>, Value), Value> {
    let invalid = |message: String, id: &str| json!({"error": {"type": "invalid_prompt", "message": message, "details": format!("Node ID '#{id}'"), "extra_info": {}}, "node_errors": {}});
    let mut outputs = Vec::new();
    for (id, node) in prompt {
        let Some(class) = node.get("class_type").and_then(Value::as_str) else {
            return Err(invalid(
                "Cannot execute because a node is missing the class_type property.".into(),
                id,
            ));
        };
        let Some(def) = node_def(class) else {
            return Err(invalid(format!("Cannot execute because node {class} does not exist."), id));
        };
        if def.output_node && targets.is_none_or(|t| t.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(
            json!({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": {}}),
        );
    }
    let mut good = Vec::new();
    let mut own_errors: Vec<Value> = Vec::new();
    let mut node_errors = Map::new();
    let mut validated: Validated = Vec::new();
    for o in &outputs {
        let (ok, reasons) = match validate_inputs(prompt, o, &mut validated, inner) {
            Ok(ok) => (ok, memo_get(&validated, o).map(|e| e.2.clone()).unwrap_or_default()),
            Err(ex) => {
                let reasons = vec![
                    json!({"type": "exception_during_validation", "message": "Exception when validating node", "details": ex.message,
                    "extra_info": {"exception_type": ex.kind, "traceback": []}}),
                ];
                memo_set(&mut validated, o, false, reasons.clone());
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        own_errors.extend(reasons);
        for (node_id, ok, reasons) in &validated {
            if *ok || reasons.is_empty() {
                continue;
            }
            let class = prompt.get(node_id).and_then(|n| n.get("class_type")).cloned().unwrap_or(Value::Null);
            let entry = node_errors
                .entry(node_id.clone())
                .or_insert_with(|| json!({"errors": reasons, "dependent_outputs": [], "class_type": class}));
            if let Some(d) = entry.get_mut("dependent_outputs").and_then(Value::as_array_mut) {
                d.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = own_errors
            .iter()
            .map(|e| {
                format!("{}: {}", e["message"].as_str().unwrap_or(""), e["details"].as_str().unwrap_or(""))
            })
            .collect();
        return Err(
            json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
            "details": details.join("\n"), "extra_info": {}}, "node_errors": node_errors}),
        );
    }
    Ok((good, Value::Object(node_errors)))
}

// ---------------------------------------------------------------------------------------------
// Execution

/// Nodes to run for `outputs`, dependencies first (depth-first from each output, inputs in order).
fn execution_order(prompt: &Map<String, Value>, outputs: &[String]) -> Vec<String> {
    fn visit(prompt: &Map<String, Value>, id: &str, out: &mut Vec<String>) {
        if out.iter().any(|x| x == id) {
            return;
        }
        if let Some(inputs) = prompt.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object) {
            for v in inputs.values() {
                if let Value::Array(link) = v
                    && link.len() == 2
                {
                    visit(prompt, &link_id(&link[0]), out);
                }
            }
        }
        out.push(id.to_owned());
    }
    let mut out = Vec::new();
    for o in outputs {
        visit(prompt, o, &mut out);
    }
    out
}

/// A cache key for a node: its class and inputs, with links replaced by the linked node's key.
fn signature(prompt: &Map<String, Value>, id: &str, depth: usize) -> String {
    let Some(node) = prompt.get(id) else { return String::new() };
    let mut s = node.get("class_type").map(Value::to_string).unwrap_or_default();
    if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
        let sorted: BTreeMap<&String, &Value> = inputs.iter().collect();
        for (k, v) in sorted {
            s.push('|');
            s.push_str(k);
            s.push('=');
            match v {
                Value::Array(link) if link.len() == 2 && depth < 64 => {
                    s.push('(');
                    s.push_str(&signature(prompt, &link_id(&link[0]), depth + 1));
                    s.push_str(&link[1].to_string());
                    s.push(')');
                }
                other => s.push_str(&other.to_string()),
            }
        }
    }
    s
}

enum NodeEnd {
    Done(Option<Value>),
    Failed { kind: &'static str, message: String },
    Interrupted,
}

struct Run {
    q: Queued,
    client: Option<String>,
    states: Vec<(String, Value, Value, &'static str)>,
    messages: Vec<Value>,
}

impl Run {
    fn emit(&self, shared: &Shared, kind: &str, data: Value) {
        shared.lock().emit(self.client.as_deref(), kind, data);
    }

    fn set_state(&mut self, node: &str, value: Value, max: Value, state: &'static str) {
        match self.states.iter_mut().find(|s| s.0 == node) {
            Some(s) => *s = (node.to_owned(), value, max, state),
            None => self.states.push((node.to_owned(), value, max, state)),
        }
    }

    fn progress_state(&self, shared: &Shared) {
        let pid = &self.q.prompt_id;
        let nodes: Map<String, Value> = self
            .states
            .iter()
            .map(|(id, value, max, state)| {
                (
                    id.clone(),
                    json!({"value": value, "max": max, "state": state, "node_id": id, "prompt_id": pid,
                    "display_node_id": id, "parent_node_id": null, "real_node_id": id}),
                )
            })
            .collect();
        self.emit(shared, "progress_state", json!({"prompt_id": pid, "nodes": nodes}));
    }

    /// An `execution_*` message: sent and kept for the history entry.
    fn execution_message(&mut self, shared: &Shared, kind: &str, data: Value) {
        self.messages.push(json!([kind, data]));
        self.emit(shared, kind, data);
    }
}

fn interrupted(shared: &Shared) -> bool {
    shared.lock().interrupt
}

async fn run_node(
    shared: &Shared,
    run: &mut Run,
    id: &str,
    class: &str,
    inputs: &Map<String, Value>,
) -> NodeEnd {
    let num = |k: &str| inputs.get(k).and_then(|v| coerce("FLOAT", v).ok().flatten()).unwrap_or(0.0);
    match class {
        "EmptyImage" => {
            let bytes = num("width") * num("height") * num("batch_size") * 4.0;
            if bytes > 8_589_934_592.0 {
                return NodeEnd::Failed {
                    kind: "RuntimeError",
                    message: format!(
                        "[enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate {} bytes. Error code 12 (Cannot allocate memory)\n",
                        bytes as u64
                    ),
                };
            }
            NodeEnd::Done(None)
        }
        "ProbeSleepProgress" => {
            let steps = num("steps").max(0.0) as u64;
            let step =
                Duration::from_secs_f64((num("step_seconds") * shared.config.time_scale).clamp(0.0, 3600.0));
            for i in 1..=steps {
                tokio::time::sleep(step).await;
                if interrupted(shared) {
                    return NodeEnd::Interrupted;
                }
                run.set_state(id, json!(i), json!(steps), "running");
                run.progress_state(shared);
                let pid = run.q.prompt_id.clone();
                run.emit(shared, "progress", json!({"value": i, "max": steps, "prompt_id": pid, "node": id}));
            }
            run.set_state(id, json!(steps), json!(steps), "finished");
            NodeEnd::Done(None)
        }
        "ProbeRaise" => NodeEnd::Failed {
            kind: "ValueError",
            message: format!(
                "{}\n",
                inputs.get("message").and_then(Value::as_str).unwrap_or("probe failure")
            ),
        },
        "SaveImage" | "PreviewImage" => {
            let (kind, prefix) = if class == "SaveImage" {
                (
                    "output",
                    inputs.get("filename_prefix").and_then(Value::as_str).unwrap_or("ComfyUI").to_owned(),
                )
            } else {
                ("temp", "ComfyUI_temp_mock".to_owned())
            };
            let mut inner = shared.lock();
            let counter = inner.file_counters.entry(format!("{kind}/{prefix}")).or_insert(0);
            *counter += 1;
            let filename = format!("{prefix}_{:05}_.png", *counter);
            inner.files.insert((kind.into(), String::new(), filename.clone()), PNG.to_vec());
            NodeEnd::Done(Some(json!({"images": [{"filename": filename, "subfolder": "", "type": kind}]})))
        }
        _ => NodeEnd::Done(None),
    }
}

async fn executor(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut inner = shared.lock();
            heapq::pop(&mut inner.pending).inspect(|q| {
                inner.running = Some((q.clone(), None));
                inner.interrupt = false;
                inner.broadcast_status();
            })
        };
        match next {
            Some(q) => execute(&shared, q).await,
            None => {
                tokio::select! {
                    () = shared.stop.cancelled() => return,
                    () = shared.work.notified() => {}
                }
            }
        }
        if shared.stop.is_cancelled() {
            return;
        }
    }
}

async fn execute(shared: &Shared, q: Queued) {
    let pid = q.prompt_id.clone();
    let client = q.client_id();
    let mut run = Run { q, client, states: Vec::new(), messages: Vec::new() };
    run.execution_message(shared, "execution_start", json!({"prompt_id": pid, "timestamp": now_ms()}));
    let order = execution_order(&run.q.prompt, &run.q.outputs);
    let sigs: Vec<String> = order.iter().map(|id| signature(&run.q.prompt, id, 0)).collect();
    let cached: Vec<String> = {
        let inner = shared.lock();
        order
            .iter()
            .zip(&sigs)
            .filter(|(_, s)| inner.cache.contains_key(*s))
            .map(|(id, _)| id.clone())
            .collect()
    };
    run.execution_message(
        shared,
        "execution_cached",
        json!({"nodes": cached, "prompt_id": pid, "timestamp": now_ms()}),
    );
    let mut executed: Vec<String> = Vec::new();
    let mut outputs = Map::new();
    let mut end: Option<(String, String, NodeEnd)> = None;
    for (id, sig) in order.iter().zip(&sigs) {
        let node = run.q.prompt.get(id).cloned().unwrap_or(Value::Null);
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("").to_owned();
        let inputs = node.get("inputs").and_then(Value::as_object).cloned().unwrap_or_default();
        let is_output = node_def(&class).is_some_and(|d| d.output_node);
        if cached.contains(id) {
            if is_output {
                let ui = shared.lock().cache.get(sig).cloned().flatten();
                run.emit(
                    shared,
                    "executed",
                    json!({"node": id, "display_node": id, "output": ui, "prompt_id": pid}),
                );
                if let Some(ui) = ui {
                    outputs.insert(id.clone(), ui);
                }
                run.set_state(id, json!(1), json!(1), "finished");
                run.progress_state(shared);
            }
            executed.push(id.clone());
            continue;
        }
        if interrupted(shared) {
            end = Some((id.clone(), class, NodeEnd::Interrupted));
            break;
        }
        run.set_state(id, json!(0.0), json!(1.0), "running");
        run.progress_state(shared);
        if let Some((_, current)) = shared.lock().running.as_mut() {
            *current = Some(id.clone());
        }
        run.emit(shared, "executing", json!({"node": id, "display_node": id, "prompt_id": pid}));
        if !shared.config.node_delay.is_zero() {
            tokio::time::sleep(shared.config.node_delay).await;
        }
        match run_node(shared, &mut run, id, &class, &inputs).await {
            NodeEnd::Done(ui) => {
                if let Some(ui) = &ui {
                    run.emit(
                        shared,
                        "executed",
                        json!({"node": id, "display_node": id, "output": ui, "prompt_id": pid}),
                    );
                    outputs.insert(id.clone(), ui.clone());
                }
                if !run.states.iter().any(|s| s.0 == *id && s.3 == "finished") {
                    run.set_state(id, json!(1.0), json!(1.0), "finished");
                }
                run.progress_state(shared);
                shared.lock().cache.insert(sig.clone(), ui);
                executed.push(id.clone());
            }
            other => {
                end = Some((id.clone(), class, other));
                break;
            }
        }
    }
    let executed_set: Vec<&String> = executed.iter().rev().collect();
    let (status_str, completed) = match end {
        None => {
            run.execution_message(
                shared,
                "execution_success",
                json!({"prompt_id": pid, "timestamp": now_ms()}),
            );
            ("success", true)
        }
        Some((node_id, class, NodeEnd::Interrupted)) => {
            let data = json!({"prompt_id": pid, "node_id": node_id, "node_type": class, "executed": executed_set, "timestamp": now_ms()});
            run.execution_message(shared, "execution_interrupted", data);
            ("error", false)
        }
        Some((node_id, class, NodeEnd::Failed { kind, message })) => {
            let inputs = run
                .q
                .prompt
                .get(&node_id)
                .and_then(|n| n.get("inputs"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let current_inputs: Map<String, Value> = inputs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!([if v.is_array() {
                            "tensor(...)".to_owned()
                        } else {
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                        }]),
                    )
                })
                .collect();
            let data = json!({"prompt_id": pid, "node_id": node_id, "node_type": class, "executed": executed_set,
                "exception_message": message, "exception_type": kind,
                "traceback": ["  File \"<comfyui>/execution.py\", line 496, in execute\n"],
                "current_inputs": current_inputs, "current_outputs": order, "timestamp": now_ms()});
            run.execution_message(shared, "execution_error", data);
            ("error", false)
        }
        Some((_, _, NodeEnd::Done(_))) => ("success", true),
    };
    if !shared.config.tail_stall.is_zero() {
        tokio::time::sleep(shared.config.tail_stall).await;
    }
    let meta: Map<String, Value> = outputs
        .keys()
        .map(|k| {
            (k.clone(), json!({"node_id": k, "display_node": k, "parent_node": null, "real_node_id": k}))
        })
        .collect();
    let entry = json!({"prompt": run.q.item(), "outputs": outputs,
        "status": {"status_str": status_str, "completed": completed, "messages": run.messages}, "meta": meta});
    let mut inner = shared.lock();
    inner.history.push((pid.clone(), entry));
    if inner.history.len() > 10_000 {
        inner.history.remove(0);
    }
    inner.running = None;
    inner.broadcast_status();
    inner.emit(run.client.as_deref(), "executing", json!({"node": null, "prompt_id": pid}));
    drop(inner);
    shared.done.notify_waiters();
}
