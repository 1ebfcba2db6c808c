//! The generic REST connector: a service described in configuration instead of code.
//!
//! - **sync**: one call (`method` `path`, the job's payload as the JSON body); the result is the
//!   reply, or the part of it at `result_pointer` (a JSON pointer, RFC 6901);
//! - **async** (an `[async]` table): the call submits; the remote job id is read at `id_pointer`;
//!   `status_path` (with `{id}`) is polled every `poll_ms`; `status_pointer` says where the status
//!   is, `done` / `failed` list the terminal values, `progress_pointer` (scaled by
//!   `progress_scale`) feeds progress, `error_pointer` names the failure; the result comes from
//!   `result_path` when set, else from the final status reply at `result_pointer`. Cancellation
//!   calls `cancel_path` when set.
//!
//! Only a *change* of status or progress counts as a sign of life, so a remote job stuck in one
//! state trips the worker's progress timeout. Replies: 2xx ok; 408, 429 and 5xx retryable;
//! other 4xx fatal validation errors; an unreachable service is `service_offline`.

use std::time::Duration;

use fleetq_core::{FailureCategory, JobRecord};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{Auth, HttpConfig, HttpTransport};
use crate::{CancellationToken, Health, JobError, ProgressSink, Service};

/// Settings of one REST connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// Service name served.
    pub service: String,
    /// Base URL, e.g. `http://127.0.0.1:9000`.
    pub base_url: String,
    /// Credentials.
    pub auth: Auth,
    /// Longest one request may take.
    pub request_timeout_ms: u64,
    /// `GET` path whose 2xx means healthy; `None` checks that the base URL answers at all.
    pub health_path: Option<String>,
    /// Method of the call (or the submission, for async services).
    pub method: String,
    /// Path of the call; the job's payload is its JSON body.
    pub path: String,
    /// Where the result is in the (final) reply; empty = all of it.
    pub result_pointer: String,
    /// Present for services that answer with a job id to poll.
    #[serde(rename = "async")]
    pub polling: Option<RestAsync>,
}

impl Default for RestConfig {
    fn default() -> Self {
        Self {
            service: "rest".into(),
            base_url: "http://127.0.0.1:9000".into(),
            auth: Auth::None,
            request_timeout_ms: 300_000,
            health_path: None,
            method: "POST".into(),
            path: "/".into(),
            result_pointer: String::new(),
            polling: None,
        }
    }
}

/// The asynchronous half of a REST service description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestAsync {
    /// Where the remote job id is in the submission reply.
    pub id_pointer: String,
    /// Status path, `{id}` replaced by the remote id.
    pub status_path: String,
    /// Where the status string is in the status reply.
    pub status_pointer: String,
    /// Status values meaning success.
    pub done: Vec<String>,
    /// Status values meaning failure.
    pub failed: Vec<String>,
    /// Where progress is in the status reply.
    pub progress_pointer: Option<String>,
    /// What progress counts up to (1.0 for fractions, 100 for percents).
    pub progress_scale: f64,
    /// Where the failure message is in the status reply.
    pub error_pointer: String,
    /// `GET` path of the result (`{id}` replaced); `None` reads it from the final status reply.
    pub result_path: Option<String>,
    /// Poll period.
    pub poll_ms: u64,
    /// `POST` path that cancels the remote job (`{id}` replaced).
    pub cancel_path: Option<String>,
}

impl Default for RestAsync {
    fn default() -> Self {
        Self {
            id_pointer: "/id".into(),
            status_path: "/jobs/{id}".into(),
            status_pointer: "/status".into(),
            done: ["succeeded", "completed", "done", "success"].map(String::from).to_vec(),
            failed: ["failed", "error", "cancelled", "canceled"].map(String::from).to_vec(),
            progress_pointer: Some("/progress".into()),
            progress_scale: 1.0,
            error_pointer: "/error".into(),
            result_path: None,
            poll_ms: 1000,
            cancel_path: None,
        }
    }
}

/// The REST connector.
#[derive(Debug)]
pub struct Rest {
    config: RestConfig,
    method: Method,
    http: HttpTransport,
}

impl Rest {
    /// Checks the description and builds the client (no I/O).
    pub fn new(config: RestConfig) -> Result<Self, JobError> {
        let invalid = |m: String| JobError::fatal(FailureCategory::Validation, m);
        let method = Method::from_bytes(config.method.to_uppercase().as_bytes()).map_err(|_| {
            invalid(format!("rest connector {}: bad method {:?}", config.service, config.method))
        })?;
        let pointers = [Some(config.result_pointer.as_str())]
            .into_iter()
            .chain(config.polling.iter().flat_map(|p| {
                [
                    Some(p.id_pointer.as_str()),
                    Some(p.status_pointer.as_str()),
                    Some(p.error_pointer.as_str()),
                    p.progress_pointer.as_deref(),
                ]
            }))
            .flatten();
        for p in pointers {
            if !p.is_empty() && !p.starts_with('/') {
                return Err(invalid(format!(
                    "rest connector {}: {p:?} is not a JSON pointer (it must start with '/')",
                    config.service
                )));
            }
        }
        let mut http = HttpConfig::new(config.base_url.clone());
        http.timeout = Duration::from_millis(config.request_timeout_ms.max(1));
        http.auth = config.auth.clone();
        Ok(Self { http: HttpTransport::new(http)?, method, config })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, JobError> {
        let mut rb = self.http.request(method.clone(), path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let response = rb.send().await.map_err(|e| crate::http::unreachable(self.http.base_url(), &e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| crate::http::unreachable(self.http.base_url(), &e))?;
        if !status.is_success() {
            let excerpt: String = text.chars().take(300).collect();
            let message = format!("{method} {path} replied {status}: {excerpt}");
            return Err(
                if matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS)
                    || status.is_server_error()
                {
                    JobError::retryable(FailureCategory::Service, message)
                } else {
                    JobError::fatal(FailureCategory::Validation, message)
                },
            );
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            JobError::retryable(FailureCategory::Service, format!("{method} {path}: reply is not JSON: {e}"))
        })
    }
}

fn cancelled() -> JobError {
    JobError::fatal(FailureCategory::Cancelled, "cancelled")
}

/// The value at `pointer` ("" = all of it).
fn pick(reply: &Value, pointer: &str) -> Result<Value, JobError> {
    if pointer.is_empty() {
        return Ok(reply.clone());
    }
    reply.pointer(pointer).cloned().ok_or_else(|| {
        JobError::fatal(FailureCategory::Service, format!("the reply has nothing at {pointer}: {reply}"))
    })
}

impl Service for Rest {
    fn name(&self) -> &str {
        &self.config.service
    }

    async fn check(&self) -> Health {
        let path = self.config.health_path.as_deref().unwrap_or("/");
        let sent = self.http.request(Method::GET, path).timeout(Duration::from_secs(5)).send().await;
        match sent {
            // Without a health path, any answer means the service is up.
            Ok(r) if r.status().is_success() || self.config.health_path.is_none() => {
                let mut h = Health::idle();
                h.info = Some(json!({"url": self.config.base_url}));
                h
            }
            Ok(r) => Health::error(format!("GET {path} replied {}", r.status())),
            Err(e) => Health::offline(crate::http::unreachable(&self.config.base_url, &e).message),
        }
    }

    async fn run(
        &self,
        job: &JobRecord,
        sink: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        let payload = &job.spec.payload;
        let reply = tokio::select! {
            () = cancel.cancelled() => return Err(cancelled()),
            r = self.call(self.method.clone(), &self.config.path, Some(payload)) => r?,
        };
        let Some(polling) = &self.config.polling else {
            return pick(&reply, &self.config.result_pointer);
        };
        let id = match reply.pointer(&polling.id_pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(JobError::fatal(
                    FailureCategory::Service,
                    format!("the submission reply has no job id at {}: {reply}", polling.id_pointer),
                ));
            }
        };
        let status_path = polling.status_path.replace("{id}", &id);
        let mut tick = tokio::time::interval(Duration::from_millis(polling.poll_ms.max(10)));
        let mut last: Option<(String, Option<f64>)> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    if let Some(path) = &polling.cancel_path {
                        let _ = self.call(Method::POST, &path.replace("{id}", &id), None).await;
                    }
                    return Err(cancelled());
                }
                _ = tick.tick() => {}
            }
            let state = self.call(Method::GET, &status_path, None).await?;
            let status = match state.pointer(&polling.status_pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            if polling.done.contains(&status) {
                return match &polling.result_path {
                    Some(path) => {
                        let result = self.call(Method::GET, &path.replace("{id}", &id), None).await?;
                        pick(&result, &self.config.result_pointer)
                    }
                    None => pick(&state, &self.config.result_pointer),
                };
            }
            if polling.failed.contains(&status) {
                let why = match state.pointer(&polling.error_pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) if !v.is_null() => v.to_string(),
                    _ => "no reason given".to_owned(),
                };
                return Err(JobError::fatal(
                    FailureCategory::Service,
                    format!("remote job {id} ended {status}: {why}"),
                ));
            }
            let progress = polling
                .progress_pointer
                .as_deref()
                .and_then(|p| state.pointer(p))
                .and_then(Value::as_f64)
                .map(|p| (p / polling.progress_scale.max(f64::MIN_POSITIVE) * 100.0).clamp(0.0, 99.0));
            let now = (status, progress);
            if last.as_ref() != Some(&now) {
                sink.report(now.1.unwrap_or(0.0), Some(format!("remote status {}", now.0)));
                last = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_checked() {
        assert!(Rest::new(RestConfig::default()).is_ok());
        let bad_method = RestConfig { method: "P OST".into(), ..RestConfig::default() };
        assert!(Rest::new(bad_method).is_err());
        let bad_pointer = RestConfig { result_pointer: "output".into(), ..RestConfig::default() };
        assert!(Rest::new(bad_pointer).err().is_some_and(|e| e.message.contains("JSON pointer")));
        let bad_async = RestConfig {
            polling: Some(RestAsync { status_pointer: "status".into(), ..RestAsync::default() }),
            ..RestConfig::default()
        };
        assert!(Rest::new(bad_async).is_err());
    }

    #[test]
    fn pick_by_pointer() {
        let v = json!({"a": {"b": [1, 2]}});
        assert_eq!(pick(&v, "").ok(), Some(v.clone()));
        assert_eq!(pick(&v, "/a/b/1").ok(), Some(json!(2)));
        assert!(pick(&v, "/x").is_err());
    }
}
