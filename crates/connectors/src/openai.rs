//! The OpenAI-style connector (any OpenAI-compatible base URL), following docs/services.md §3:
//!
//! - a job's payload is the request body of `POST /chat/completions` (has `messages`) or
//!   `POST /images/generations` (has `prompt`), with an optional `"endpoint": "chat" | "images"`;
//! - chats are **streamed** (unless the payload sets `"stream": false`) with
//!   `stream_options.include_usage`, so every token is a sign of life, progress follows the token
//!   count, and the usage is recorded. Tool-call pieces are joined per index. An `{"error": …}`
//!   data line or a stream without `[DONE]` is a failure;
//! - retries as the official SDK does (408, 409, 429, 5xx, connection errors; `x-should-retry`
//!   overrides), waiting `retry-after-ms`, `retry-after` (0–60 s), the `x-ratelimit-reset-*`
//!   durations, or an exponential backoff. **`insufficient_quota` is never retried** (fatal), nor
//!   is 401 (fatal: the key is wrong); 400/404/422 and content-policy refusals are fatal
//!   validation errors;
//! - image results (`b64_json`, or `url`s that expire in an hour and are downloaded at once) become
//!   artifacts;
//! - health from `GET /models` (the cheapest call that checks the key).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use eventsource_stream::Eventsource as _;
use fleetq_core::{FailureCategory, JobRecord};
use futures::StreamExt as _;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{debug, info};

use crate::artifacts::{Artifacts, DEFAULT_INLINE_LIMIT, decode_base64};
use crate::http::{Auth, HttpConfig, HttpTransport};
use crate::outbound::Fetcher;
use crate::{CancellationToken, Health, JobError, ProgressSink, Service};

/// Settings of one OpenAI-style connector.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Service name served.
    pub service: String,
    /// Base URL including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// API key (sent as `Authorization: Bearer`). Prefer `api_key_env` in files.
    pub api_key: Option<String>,
    /// Environment variable holding the API key (default `OPENAI_API_KEY`).
    pub api_key_env: String,
    /// `OpenAI-Organization` header.
    pub organization: Option<String>,
    /// `OpenAI-Project` header.
    pub project: Option<String>,
    /// Longest one request may take.
    pub request_timeout_ms: u64,
    /// Retries of one request (the SDK's default is 2).
    pub max_retries: u32,
    /// Where images are written; `None` inlines small ones.
    pub artifacts_dir: Option<PathBuf>,
    /// Largest image inlined as base64 without an artifacts directory.
    pub inline_limit_bytes: usize,
    /// What an image URL the provider names may reach when it is not on `base_url`'s own origin
    /// (a CDN): public http(s) addresses only unless `allow_private`; no credentials are sent.
    pub outbound: fleetq_core::outbound::OutboundPolicy,
}

impl std::fmt::Debug for OpenAiConfig {
    /// Every field but the key's value (`api_key: Some(***)`): a logged configuration must not
    /// carry the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("service", &self.service)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("api_key_env", &self.api_key_env)
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("artifacts_dir", &self.artifacts_dir)
            .field("inline_limit_bytes", &self.inline_limit_bytes)
            .field("outbound", &self.outbound)
            .finish()
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            service: "openai".into(),
            base_url: "https://api.openai.com/v1".into(),
            api_key: None,
            api_key_env: "OPENAI_API_KEY".into(),
            organization: None,
            project: None,
            request_timeout_ms: 600_000,
            max_retries: 2,
            artifacts_dir: None,
            inline_limit_bytes: DEFAULT_INLINE_LIMIT,
            outbound: fleetq_core::outbound::OutboundPolicy::default(),
        }
    }
}

/// Which endpoint a payload calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Images,
}

/// The OpenAI-style connector.
#[derive(Debug)]
pub struct OpenAi {
    config: OpenAiConfig,
    http: HttpTransport,
    /// Downloads from anywhere but the provider itself, under `config.outbound`.
    fetcher: Fetcher,
    artifacts: Artifacts,
    /// The latest `x-ratelimit-*` headers, shown in health info.
    rate_limits: Mutex<Map<String, Value>>,
}

/// How one HTTP attempt ended, before retries are decided.
enum Attempt {
    Ok(reqwest::Response),
    Failed { error: JobError, retry: bool, wait: Option<Duration> },
}

impl OpenAi {
    /// Builds the connector (no I/O). Without a key (config or environment) requests go out
    /// unauthenticated, which suits local OpenAI-compatible servers.
    pub fn new(config: OpenAiConfig) -> Result<Self, JobError> {
        let mut http = HttpConfig::new(config.base_url.clone());
        http.timeout = Duration::from_millis(config.request_timeout_ms.max(1));
        let key = config
            .api_key
            .clone()
            .or_else(|| std::env::var(&config.api_key_env).ok())
            .filter(|k| !k.is_empty());
        http.auth = key.map_or(Auth::None, |token| Auth::Bearer { token });
        let artifacts = Artifacts::new(config.artifacts_dir.clone(), config.inline_limit_bytes);
        Ok(Self {
            http: HttpTransport::new(http)?,
            fetcher: Fetcher::new(config.outbound)?,
            artifacts,
            config,
            rate_limits: Mutex::new(Map::new()),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, path);
        if let Some(org) = &self.config.organization {
            rb = rb.header("OpenAI-Organization", org);
        }
        if let Some(project) = &self.config.project {
            rb = rb.header("OpenAI-Project", project);
        }
        rb
    }

    fn remember_rate_limits(&self, headers: &HeaderMap) {
        let mut seen = self.rate_limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, value) in headers {
            if name.as_str().starts_with("x-ratelimit-")
                && let Ok(v) = value.to_str()
            {
                seen.insert(name.as_str().to_owned(), json!(v));
            }
        }
    }

    /// One try of `POST path`.
    async fn attempt(&self, path: &str, body: &Value) -> Attempt {
        let sent = self.request(Method::POST, path).json(body).send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    error: crate::http::unreachable(self.http.base_url(), &e),
                    retry: true,
                    wait: None,
                };
            }
        };
        self.remember_rate_limits(response.headers());
        if let Some(id) = response.headers().get("x-request-id").and_then(|v| v.to_str().ok()) {
            debug!(request_id = id, status = %response.status(), "openai reply");
        }
        let status = response.status();
        if status.is_success() {
            return Attempt::Ok(response);
        }
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let error = classify(status, &body, &text, path);
        let should = headers.get("x-should-retry").and_then(|v| v.to_str().ok());
        let retry = match should {
            Some("true") => true,
            Some("false") => false,
            _ => error.retryable && matches!(status.as_u16(), 408 | 409 | 429 | 500..=599),
        };
        Attempt::Failed { error, retry, wait: retry_delay(&headers) }
    }

    /// `POST path` with the SDK's retry policy; stops waiting when `cancel` fires.
    async fn post(
        &self,
        path: &str,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<reqwest::Response, JobError> {
        let mut tries = 0u32;
        loop {
            let attempt = tokio::select! {
                () = cancel.cancelled() => return Err(cancelled()),
                a = self.attempt(path, body) => a,
            };
            match attempt {
                Attempt::Ok(r) => return Ok(r),
                Attempt::Failed { error, retry, wait } => {
                    if !retry || tries >= self.config.max_retries {
                        return Err(error);
                    }
                    let pause = wait.unwrap_or_else(|| backoff(tries));
                    info!(error = %error.message, wait_ms = pause.as_millis() as u64, "openai request failed; retrying");
                    tries += 1;
                    tokio::select! {
                        () = cancel.cancelled() => return Err(cancelled()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    async fn read_stream(
        &self,
        response: reqwest::Response,
        max_tokens: Option<u64>,
        sink: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Value, JobError> {
        let mut events = response.bytes_stream().eventsource();
        let mut chat = ChatAccumulator::default();
        let mut last_report = tokio::time::Instant::now();
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return Err(cancelled()),
                e = events.next() => e,
            };
            let event = match event {
                None => {
                    return Err(JobError::retryable(
                        FailureCategory::Service,
                        format!("the stream ended without [DONE] after {} chunks", chat.chunks),
                    ));
                }
                Some(Err(e)) => {
                    return Err(JobError::retryable(
                        FailureCategory::Connection,
                        format!("stream broken: {e}"),
                    ));
                }
                Some(Ok(ev)) => ev,
            };
            if event.data.trim() == "[DONE]" {
                return Ok(chat.into_result());
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
                debug!(data = %event.data, "unparseable stream line ignored");
                continue;
            };
            if chunk.get("error").is_some() {
                let e = classify(StatusCode::INTERNAL_SERVER_ERROR, &chunk, &event.data, "stream");
                return Err(e);
            }
            chat.apply(&chunk);
            // Throttled: a token is a sign of life, but not worth a broker write each.
            if last_report.elapsed() >= Duration::from_millis(250) {
                last_report = tokio::time::Instant::now();
                let p = match max_tokens {
                    Some(max) if max > 0 => (chat.chunks as f64 / max as f64 * 100.0).min(99.0),
                    _ => 99.0 * (1.0 - 1.0 / (1.0 + chat.chunks as f64 / 100.0)),
                };
                sink.report(p, Some(format!("{} tokens", chat.chunks)));
            }
        }
    }

    async fn images_result(
        &self,
        job: &JobRecord,
        reply: &Value,
        cancel: &CancellationToken,
    ) -> Result<Value, JobError> {
        let data = reply.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut out = Vec::with_capacity(data.len());
        for (i, item) in data.iter().enumerate() {
            let bytes = if let Some(b64) = item.get("b64_json").and_then(Value::as_str) {
                decode_base64(b64).map_err(|e| {
                    JobError::retryable(FailureCategory::Service, format!("image {i} is not base64: {e}"))
                })?
            } else if let Some(url) = item.get("url").and_then(Value::as_str) {
                // The URL expires in about an hour: fetch it now — from the provider itself with
                // its credentials, from anywhere else (a CDN) under the outbound policy, without.
                let what = format!("downloading image {i}");
                tokio::select! {
                    () = cancel.cancelled() => return Err(cancelled()),
                    r = self.download(&what, url) => r?,
                }
            } else {
                continue;
            };
            let mut entry = self.artifacts.store(&job.summary.id.0, &format!("{i}.png"), &bytes).await?;
            if let (Some(o), Some(rp)) = (entry.as_object_mut(), item.get("revised_prompt")) {
                o.insert("revised_prompt".into(), rp.clone());
            }
            out.push(entry);
        }
        Ok(json!({"images": out, "usage": reply.get("usage").cloned().unwrap_or(Value::Null)}))
    }
}

impl OpenAi {
    /// An image the provider named by URL: on the provider's own origin through its transport
    /// (credentials and all), anywhere else through the outbound [`Fetcher`] (no credentials).
    async fn download(&self, what: &str, url: &str) -> Result<Vec<u8>, JobError> {
        if !crate::http::same_origin(url, self.http.base_url()) {
            return self.fetcher.get(what, url).await;
        }
        let (status, body) = self.http.get_bytes(url).await?;
        if status != StatusCode::OK {
            return Err(JobError::retryable(FailureCategory::Service, format!("{what} replied {status}")));
        }
        Ok(body)
    }
}

fn cancelled() -> JobError {
    JobError::fatal(FailureCategory::Cancelled, "cancelled")
}

/// The SDK's backoff: 0.5 s doubling up to 8 s, with up to 25 % jitter taken off.
fn backoff(tries: u32) -> Duration {
    let base = fleetq_core::backoff::exponential_ms(500, 8_000, tries) as f64 / 1000.0;
    // uuid v4 is our random source already; its low 32 bits are uniform.
    let unit = f64::from(uuid::Uuid::new_v4().as_u128() as u32) / f64::from(u32::MAX);
    let jitter = 1.0 - 0.25 * unit;
    Duration::from_secs_f64(base * jitter)
}

/// The wait a reply asks for: `retry-after-ms`, `retry-after` (seconds, only within 0–60 s), then
/// the shorter `x-ratelimit-reset-*` duration.
fn retry_delay(headers: &HeaderMap) -> Option<Duration> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && (0.0..=60_000.0).contains(&ms)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(s) = header("retry-after").and_then(|v| v.parse::<f64>().ok())
        && (0.0..=60.0).contains(&s)
    {
        return Some(Duration::from_secs_f64(s));
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|n| header(n).and_then(parse_go_duration))
        .filter(|d| *d <= Duration::from_secs(60))
        .min()
}

/// Parses Go-style durations as in the rate-limit headers: `12ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (scale, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with("us") || rest.starts_with("µs") {
            (0.000_001, if rest.starts_with("us") { 2 } else { "µs".len() })
        } else if rest.starts_with("ns") {
            (0.000_000_001, 2)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        total += number * scale;
        rest = &rest[len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// An error reply as a typed failure (docs/services.md §3.5).
fn classify(status: StatusCode, body: &Value, raw: &str, path: &str) -> JobError {
    let err = body.get("error");
    let field = |k: &str| err.and_then(|e| e.get(k)).and_then(Value::as_str).unwrap_or("");
    let (message, kind, code) = (field("message"), field("type"), field("code"));
    let what = if message.is_empty() {
        raw.chars().take(200).collect::<String>()
    } else {
        format!("{message} ({})", if code.is_empty() { kind } else { code })
    };
    let text = format!("{path} replied {status}: {what}");
    if code == "insufficient_quota" || kind == "insufficient_quota" {
        return JobError::fatal(FailureCategory::Service, format!("{text} — quota exhausted; not retried"));
    }
    match status.as_u16() {
        401 => JobError::fatal(FailureCategory::Service, format!("{text} — check the connector's API key")),
        403 => JobError::fatal(FailureCategory::Service, text),
        400 | 404 | 422 => JobError::fatal(FailureCategory::Validation, text),
        408 | 409 | 429 => JobError::retryable(FailureCategory::Service, text),
        500..=599 => JobError::retryable(FailureCategory::Service, text),
        _ => JobError::fatal(FailureCategory::Service, text),
    }
}

fn parse_payload(payload: &Value) -> Result<(Endpoint, Map<String, Value>), JobError> {
    let Value::Object(map) = payload else {
        return Err(JobError::fatal(
            FailureCategory::Validation,
            "openai payload must be an object: a chat or image request body",
        ));
    };
    let mut body = map.clone();
    let endpoint = match body.remove("endpoint") {
        Some(Value::String(s)) if s == "chat" => Endpoint::Chat,
        Some(Value::String(s)) if s == "images" => Endpoint::Images,
        Some(other) => {
            return Err(JobError::fatal(
                FailureCategory::Validation,
                format!("payload.endpoint must be \"chat\" or \"images\", not {other}"),
            ));
        }
        None if body.contains_key("messages") => Endpoint::Chat,
        None if body.contains_key("prompt") => Endpoint::Images,
        None => {
            return Err(JobError::fatal(
                FailureCategory::Validation,
                "openai payload needs `messages` (chat) or `prompt` (images)",
            ));
        }
    };
    Ok((endpoint, body))
}

/// Joins a chat stream's chunks.
#[derive(Debug, Default)]
struct ChatAccumulator {
    id: Option<Value>,
    model: Option<Value>,
    content: String,
    finish_reason: Option<Value>,
    /// Tool calls by index: (id, name, arguments).
    tool_calls: std::collections::BTreeMap<u64, (String, String, String)>,
    usage: Option<Value>,
    chunks: u64,
}

impl ChatAccumulator {
    fn apply(&mut self, chunk: &Value) {
        self.id = self.id.take().or_else(|| chunk.get("id").cloned());
        self.model = self.model.take().or_else(|| chunk.get("model").cloned());
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
            return;
        };
        if let Some(f) = choice.get("finish_reason").filter(|f| !f.is_null()) {
            self.finish_reason = Some(f.clone());
        }
        let Some(delta) = choice.get("delta") else { return };
        if let Some(piece) = delta.get("content").and_then(Value::as_str)
            && !piece.is_empty()
        {
            self.content.push_str(piece);
            self.chunks += 1;
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let entry = self.tool_calls.entry(index).or_default();
            if let Some(id) = call.get("id").and_then(Value::as_str) {
                entry.0 = id.to_owned();
            }
            if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                entry.1.push_str(name);
            }
            if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                entry.2.push_str(args);
                self.chunks += 1;
            }
        }
    }

    fn into_result(self) -> Value {
        let tool_calls: Vec<Value> = self
            .tool_calls
            .into_values()
            .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
            .collect();
        let mut out = json!({
            "id": self.id, "model": self.model, "content": self.content,
            "finish_reason": self.finish_reason, "usage": self.usage,
        });
        if !tool_calls.is_empty()
            && let Some(o) = out.as_object_mut()
        {
            o.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        out
    }
}

fn chat_result_from_reply(reply: &Value) -> Value {
    let message = reply.pointer("/choices/0/message");
    let mut out = json!({
        "id": reply.get("id"), "model": reply.get("model"),
        "content": message.and_then(|m| m.get("content")).cloned().unwrap_or(Value::Null),
        "finish_reason": reply.pointer("/choices/0/finish_reason"),
        "usage": reply.get("usage"),
    });
    if let (Some(o), Some(calls)) = (out.as_object_mut(), message.and_then(|m| m.get("tool_calls"))) {
        o.insert("tool_calls".into(), calls.clone());
    }
    out
}

impl Service for OpenAi {
    fn name(&self) -> &str {
        &self.config.service
    }

    async fn check(&self) -> Health {
        let sent = self.request(Method::GET, "/models").timeout(Duration::from_secs(10)).send().await;
        match sent {
            Ok(r) if r.status().is_success() => {
                self.remember_rate_limits(r.headers());
                let list: Value = r.json().await.unwrap_or(Value::Null);
                let models: Vec<Value> = list
                    .get("data")
                    .and_then(Value::as_array)
                    .map(|d| d.iter().filter_map(|m| m.get("id").cloned()).take(100).collect())
                    .unwrap_or_default();
                let status = fleetq_core::ConnectorStatus::Idle;
                let limits =
                    self.rate_limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                let mut health = Health::up(status);
                health.info =
                    Some(json!({"url": self.config.base_url, "models": models, "rate_limits": limits}));
                health
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Health::error(classify(status, &body, &text, "GET /models").message)
            }
            Err(e) => Health::offline(crate::http::unreachable(&self.config.base_url, &e).message),
        }
    }

    async fn run(
        &self,
        job: &JobRecord,
        sink: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        let (endpoint, mut body) = parse_payload(&job.spec.payload)?;
        match endpoint {
            Endpoint::Images => {
                sink.report(0.0, Some("image generation sent".into()));
                let response = self.post("/images/generations", &Value::Object(body), &cancel).await?;
                let reply: Value = tokio::select! {
                    () = cancel.cancelled() => return Err(cancelled()),
                    r = response.json() => r.map_err(|e| JobError::retryable(FailureCategory::Service, format!("reading the image reply: {e}")))?,
                };
                self.images_result(job, &reply, &cancel).await
            }
            Endpoint::Chat => {
                let stream = body.get("stream").and_then(Value::as_bool) != Some(false);
                if stream {
                    body.insert("stream".into(), json!(true));
                    let options = body.entry("stream_options").or_insert_with(|| json!({}));
                    if let Some(o) = options.as_object_mut() {
                        o.insert("include_usage".into(), json!(true));
                    }
                }
                let max_tokens = body
                    .get("max_completion_tokens")
                    .or_else(|| body.get("max_tokens"))
                    .and_then(Value::as_u64);
                sink.report(0.0, Some("chat sent".into()));
                let response = self.post("/chat/completions", &Value::Object(body), &cancel).await?;
                if !stream {
                    let reply: Value = tokio::select! {
                        () = cancel.cancelled() => return Err(cancelled()),
                        r = response.json() => r.map_err(|e| JobError::retryable(FailureCategory::Service, format!("reading the chat reply: {e}")))?,
                    };
                    return Ok(chat_result_from_reply(&reply));
                }
                self.read_stream(response, max_tokens, &sink, &cancel).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_parse_and_nonsense_does_not() {
        let ms = |s: &str| parse_go_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("12ms"), Some(12));
        assert_eq!(ms("1s"), Some(1000));
        assert_eq!(ms("6m0s"), Some(360_000));
        assert_eq!(ms("1h2m3.5s"), Some(3_723_500));
        assert_eq!(ms("0.5s"), Some(500));
        assert_eq!(ms(""), None);
        assert_eq!(ms("5"), None);
        assert_eq!(ms("s"), None);
        assert_eq!(ms("3x"), None);
    }

    #[test]
    fn retry_delay_prefers_ms_then_seconds_then_reset_headers() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, reqwest::header::HeaderValue::from_static(v));
            }
            h
        };
        let d = |pairs: &[(&'static str, &'static str)]| retry_delay(&headers(pairs)).map(|d| d.as_millis());
        assert_eq!(d(&[("retry-after-ms", "250"), ("retry-after", "3")]), Some(250));
        assert_eq!(d(&[("retry-after", "3")]), Some(3000));
        assert_eq!(d(&[("retry-after", "120")]), None, "outside 0–60 s is ignored");
        assert_eq!(
            d(&[("x-ratelimit-reset-requests", "12ms"), ("x-ratelimit-reset-tokens", "6m0s")]),
            Some(12)
        );
        assert_eq!(d(&[]), None);
    }

    #[test]
    fn openai_errors_are_classed_and_quota_is_never_retried() {
        let c = |status: u16, code: &str, kind: &str| {
            let body = json!({"error": {"message": "m", "type": kind, "param": null, "code": code}});
            let e =
                classify(StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT), &body, "", "/x");
            (e.category, e.retryable)
        };
        assert_eq!(c(429, "rate_limit_exceeded", "tokens"), (FailureCategory::Service, true));
        assert_eq!(c(429, "insufficient_quota", "insufficient_quota"), (FailureCategory::Service, false));
        assert_eq!(c(401, "invalid_api_key", "invalid_request_error"), (FailureCategory::Service, false));
        assert_eq!(
            c(400, "content_policy_violation", "invalid_request_error"),
            (FailureCategory::Validation, false)
        );
        assert_eq!(c(404, "model_not_found", "invalid_request_error"), (FailureCategory::Validation, false));
        assert_eq!(c(500, "", "server_error"), (FailureCategory::Service, true));
        assert_eq!(c(503, "", ""), (FailureCategory::Service, true));
    }

    #[test]
    fn stream_chunks_join_content_tool_calls_and_usage() {
        let mut acc = ChatAccumulator::default();
        for chunk in [
            json!({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}], "usage": null}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}], "usage": null}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}], "usage": null}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"a\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        ] {
            acc.apply(&chunk);
        }
        let r = acc.into_result();
        assert_eq!(r["content"], "Hello");
        assert_eq!(r["finish_reason"], "stop");
        assert_eq!(r["usage"]["total_tokens"], 5);
        assert_eq!(r["tool_calls"][0]["function"]["arguments"], "{\"a\": 1}");
        assert_eq!(r["tool_calls"][0]["id"], "call_1");
    }

    #[test]
    fn the_endpoint_comes_from_the_payload() {
        let ep = |v: Value| parse_payload(&v).map(|(e, _)| e);
        assert_eq!(ep(json!({"messages": []})).ok(), Some(Endpoint::Chat));
        assert_eq!(ep(json!({"prompt": "x"})).ok(), Some(Endpoint::Images));
        assert_eq!(ep(json!({"endpoint": "images", "messages": []})).ok(), Some(Endpoint::Images));
        assert!(ep(json!({"endpoint": "audio"})).is_err());
        assert!(ep(json!({})).is_err());
        assert!(ep(json!([])).is_err());
    }
}
