//! A mock OpenAI-style API (`/v1/*`) following docs/services.md §3: bearer auth, chat completions
//! (plain, and streamed as SSE `data:` lines ending with `data: [DONE]`, usage in one extra final
//! chunk only with `stream_options.include_usage`, a `: keep-alive` comment and chunks split across
//! writes), image generation (`b64_json` or short-lived `url`), `/v1/models`, the error body
//! `{"error": {message, type, param, code}}` and the rate-limit headers.
//!
//! Replies are deterministic: the assistant answers `"You said: <last user message>"`, one word per
//! chunk. Tests script failures of the next requests with [`OpenAiMock::fail_next`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Server, json_reply, now_ms};

/// Models the mock serves.
const MODELS: &[&str] = &["gpt-4o-mini", "gpt-image-1", "dall-e-3", "dall-e-2"];

/// A scripted failure for the next request to a generation endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 `rate_limit_exceeded` with the given headers (`retry-after`, `retry-after-ms`, …).
    RateLimit(Vec<(String, String)>),
    /// 429 `insufficient_quota` (never clears by itself).
    InsufficientQuota,
    /// 500 `server_error`.
    ServerError,
    /// 503 with an HTML body, as a proxy in front would send.
    Unavailable,
    /// A stream that sends a few chunks and then an `{"error": …}` data line.
    StreamError,
    /// A stream that sends a few chunks and then closes without `[DONE]`.
    StreamDrop,
}

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct OpenAiMockConfig {
    /// The only accepted API key.
    pub api_key: String,
    /// Delay between two streamed chunks.
    pub chunk_delay: Duration,
}

impl Default for OpenAiMockConfig {
    fn default() -> Self {
        Self { api_key: "sk-test-key".into(), chunk_delay: Duration::from_millis(2) }
    }
}

#[derive(Debug)]
struct Shared {
    config: OpenAiMockConfig,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<(String, Value, u64)>>,
    base: Mutex<String>,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, VecDeque<Fault>> {
        self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn requests(&self) -> MutexGuard<'_, Vec<(String, Value, u64)>> {
        self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running mock OpenAI API.
#[derive(Debug)]
pub struct OpenAiMock {
    server: Server,
    shared: Arc<Shared>,
}

impl OpenAiMock {
    /// Starts on a free loopback port.
    pub async fn start(config: OpenAiMockConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr, config: OpenAiMockConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            config,
            faults: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            base: Mutex::new(String::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/images/generations", post(images))
            .route("/v1/models", get(models))
            .route("/v1/models/{id}", get(model))
            .route("/files/{name}", get(file))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "Invalid URL", "invalid_request_error", None) })
            .layer(middleware::from_fn_with_state(shared.clone(), auth_and_headers))
            .with_state(shared.clone());
        let server = Server::start(addr, app).await?;
        *shared.base.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            format!("http://{}", server.addr());
        Ok(Self { server, shared })
    }

    /// The base URL a client uses: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.server.addr())
    }

    /// Queues a failure for the next generation request (chat or images), in order.
    pub fn fail_next(&self, fault: Fault) {
        self.shared.faults().push_back(fault);
    }

    /// Every generation request: (path, body, arrival time in ms).
    pub fn requests(&self) -> Vec<(String, Value, u64)> {
        self.shared.requests().clone()
    }

    /// Dies like a crashed process: every connection drops, new ones are refused.
    pub async fn kill(self) {
        self.server.kill().await;
    }
}

/// The error body every failure uses.
fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    json_reply(status, &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}

async fn auth_and_headers(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let public = request.uri().path().starts_with("/files/");
    let mut response = match key {
        _ if public => next.run(request).await,
        None => error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
        ),
        Some(k) if k != shared.config.api_key => {
            let shown =
                if k.len() > 8 { format!("{}…{}", &k[..3], &k[k.len() - 3..]) } else { "***".into() };
            error(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."
                ),
                "invalid_request_error",
                Some("invalid_api_key"),
            )
        }
        Some(_) => next.run(request).await,
    };
    let h = response.headers_mut();
    for (name, value) in [
        ("openai-version", "2020-10-01".to_owned()),
        ("openai-processing-ms", "12".to_owned()),
        ("x-request-id", format!("req_{:x}", now_ms())),
        ("x-ratelimit-limit-requests", "5000".to_owned()),
        ("x-ratelimit-remaining-requests", "4999".to_owned()),
        ("x-ratelimit-reset-requests", "12ms".to_owned()),
        ("x-ratelimit-limit-tokens", "160000".to_owned()),
        ("x-ratelimit-remaining-tokens", "159976".to_owned()),
        ("x-ratelimit-reset-tokens", "6m0s".to_owned()),
    ] {
        if !h.contains_key(name)
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            h.insert(name, v);
        }
    }
    response
}

/// Applies a scripted fault that fails the request outright (stream faults are applied later).
#[allow(clippy::result_large_err, reason = "the error is the reply itself, built once per request")]
fn take_fault(shared: &Shared) -> Result<Option<Fault>, Response> {
    let Some(fault) = shared.faults().pop_front() else { return Ok(None) };
    match fault {
        Fault::RateLimit(headers) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for gpt-4o-mini in organization org-mock on tokens per min (TPM): Limit 200000, Used 199000, Requested 1500. Please try again in 450ms.",
                "tokens",
                Some("rate_limit_exceeded"),
            );
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (header::HeaderName::try_from(k), HeaderValue::from_str(&v)) {
                    r.headers_mut().insert(k, v);
                }
            }
            Err(r)
        }
        Fault::InsufficientQuota => Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        )),
        Fault::ServerError => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )),
        Fault::Unavailable => {
            let mut r = Response::new(Body::from(
                "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
            ));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            Err(r)
        }
        f @ (Fault::StreamError | Fault::StreamDrop) => Ok(Some(f)),
    }
}

#[allow(clippy::result_large_err, reason = "the error is the reply itself, built once per request")]
fn parse(shared: &Shared, path: &str, body: &Bytes) -> Result<serde_json::Map<String, Value>, Response> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
        )
    })?;
    shared.requests().push((path.to_owned(), value.clone(), now_ms()));
    let Value::Object(map) = value else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Invalid body: expected an object",
            "invalid_request_error",
            None,
        ));
    };
    let model = map.get("model").and_then(Value::as_str).unwrap_or("");
    if model.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
        ));
    }
    if !MODELS.contains(&model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        ));
    }
    Ok(map)
}

async fn chat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse(&shared, "/v1/chat/completions", &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Invalid value for 'messages': expected a non-empty array.",
            "invalid_request_error",
            Some("invalid_value"),
        );
    };
    let fault = match take_fault(&shared) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or("");
    let prompt_tokens: usize = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.split_whitespace().count() + 4)
        .sum();
    let mut words: Vec<String> =
        format!("You said: {last_user}").split_whitespace().map(str::to_owned).collect();
    let limit = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |n| n as usize);
    let finish = if words.len() > limit { "length" } else { "stop" };
    words.truncate(limit);
    let model = req.get("model").and_then(Value::as_str).unwrap_or("gpt-4o-mini");
    let dated = if model == "gpt-4o-mini" { "gpt-4o-mini-2024-07-18".to_owned() } else { model.to_owned() };
    let id = format!("chatcmpl-mock{:x}", now_ms());
    let created = now_ms() / 1000;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": words.len(), "total_tokens": prompt_tokens + words.len()});
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_reply(
            StatusCode::OK,
            &json!({"id": id, "object": "chat.completion", "created": created, "model": dated,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" "), "refusal": null, "annotations": []},
                             "logprobs": null, "finish_reason": finish}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_mock"}),
        );
    }
    let include_usage =
        req.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool) == Some(true);
    let chunk = |choices: Value, usage: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": dated,
               "system_fingerprint": "fp_mock", "choices": choices, "usage": usage})
    };
    let mut frames: Vec<String> = vec![": keep-alive\n\n".into()];
    frames.push(format!(
        "data: {}\n\n",
        chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]), Value::Null)
    ));
    for (i, w) in words.iter().enumerate() {
        let piece = if i == 0 { w.clone() } else { format!(" {w}") };
        frames.push(format!(
            "data: {}\n\n",
            chunk(
                json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]),
                Value::Null
            )
        ));
        if i == 1 && fault.is_some() {
            break;
        }
    }
    match fault {
        Some(Fault::StreamError) => frames.push(format!(
            "data: {}\n\n",
            json!({"error": {"message": "The server had an error while processing your request. Sorry about that!", "type": "server_error", "param": null, "code": null}})
        )),
        Some(_) => {}
        None => {
            frames.push(format!(
                "data: {}\n\n",
                chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}]), Value::Null)
            ));
            if include_usage {
                frames.push(format!("data: {}\n\n", chunk(json!([]), usage)));
            }
            frames.push("data: [DONE]\n\n".into());
        }
    }
    let delay = shared.config.chunk_delay;
    // Every frame goes out in two writes split mid-line: a client must reassemble lines.
    let stream =
        futures::stream::unfold(frames.into_iter().flat_map(split_in_two), move |mut it| async move {
            let next = it.next()?;
            tokio::time::sleep(delay).await;
            Some((Ok::<_, Infallible>(Bytes::from(next)), it))
        });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    r
}

fn split_in_two(frame: String) -> Vec<String> {
    let mid = (1..frame.len() / 2).rev().find(|i| frame.is_char_boundary(*i));
    match mid {
        Some(m) => vec![frame[..m].to_owned(), frame[m..].to_owned()],
        None => vec![frame],
    }
}

async fn images(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse(&shared, "/v1/images/generations", &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(r) = take_fault(&shared) {
        return r;
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let prompt = req.get("prompt").and_then(Value::as_str).unwrap_or("");
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1);
    if prompt.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'prompt'.",
            "invalid_request_error",
            Some("missing_required_parameter"),
        );
    }
    if model == "dall-e-3" && n != 1 {
        return error(
            StatusCode::BAD_REQUEST,
            "Invalid 'n': integer above maximum value. Expected a value <= 1, but got 2 instead.",
            "invalid_request_error",
            Some("integer_above_max_value"),
        );
    }
    if prompt.contains("forbidden") {
        return error(
            StatusCode::BAD_REQUEST,
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            Some("content_policy_violation"),
        );
    }
    let wants_url =
        model.starts_with("dall-e") && req.get("response_format").and_then(Value::as_str) == Some("url");
    let base = shared.base.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let data: Vec<Value> = (0..n.min(10))
        .map(|i| {
            let mut entry = if wants_url {
                json!({"url": format!("{base}/files/img-{}-{i}.png", now_ms())})
            } else {
                use base64::Engine as _;
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(super::PNG)})
            };
            if model == "dall-e-3"
                && let Some(o) = entry.as_object_mut()
            {
                o.insert("revised_prompt".into(), json!(format!("A detailed rendering of {prompt}")));
            }
            entry
        })
        .collect();
    let mut reply = json!({"created": now_ms() / 1000, "data": data});
    if model.starts_with("gpt-image")
        && let Some(o) = reply.as_object_mut()
    {
        o.insert("usage".into(), json!({"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}));
    }
    json_reply(StatusCode::OK, &reply)
}

async fn file(Path(name): Path<String>) -> Response {
    if !name.ends_with(".png") {
        return error(StatusCode::NOT_FOUND, "Not found", "invalid_request_error", None);
    }
    let mut r = Response::new(Body::from(super::PNG));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    r
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_721_172_741, "owned_by": "system"})
}

async fn models() -> Response {
    let data: Vec<Value> = MODELS.iter().map(|m| model_object(m)).collect();
    json_reply(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn model(Path(id): Path<String>) -> Response {
    if MODELS.contains(&id.as_str()) {
        json_reply(StatusCode::OK, &model_object(&id))
    } else {
        error(
            StatusCode::NOT_FOUND,
            &format!("The model `{id}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        )
    }
}
