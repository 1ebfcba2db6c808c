//! The AUTOMATIC1111 webui connector, following docs/services.md §2:
//!
//! - a job's payload is the `txt2img` / `img2img` request body, plus an optional `"endpoint"`
//!   (`"txt2img"` or `"img2img"`; default `img2img` when `init_images` is present, else `txt2img`);
//! - the generation call **blocks** until the images are ready, so it runs with a long timeout while
//!   `/sdapi/v1/progress` is polled beside it. Progress is only a sign of life when it moves, and
//!   never a completion signal (idle looks like "done");
//! - cancellation and timeouts call `/sdapi/v1/interrupt`. A1111 then returns 200 with the partial
//!   images and nothing marking them interrupted, so the connector remembers that it interrupted and
//!   never reports such a result as success;
//! - `info` (a JSON string inside the JSON) is parsed; images become artifacts (files, or inline
//!   under a size limit), a prepended grid is marked `grid: true`, and each image gets its seed;
//! - errors: 400/404/422 and bad images are fatal validation errors, CUDA out-of-memory is
//!   retryable (`oom`), other 5xx are retryable service errors, an unreachable server is
//!   `service_offline`;
//! - health from `/sdapi/v1/options` (current checkpoint), models from `/sdapi/v1/sd-models`.

use std::path::PathBuf;
use std::time::Duration;

use fleetq_core::{FailureCategory, JobRecord};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::debug;

use crate::artifacts::{Artifacts, DEFAULT_INLINE_LIMIT, decode_base64};
use crate::http::{Auth, HttpConfig, HttpTransport};
use crate::{CancellationToken, Health, JobError, ProgressSink, Service};

/// Settings of one A1111 connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct A1111Config {
    /// Service name served.
    pub service: String,
    /// Base URL, e.g. `http://127.0.0.1:7860`.
    pub url: String,
    /// `/progress` poll period while a generation is in flight.
    pub progress_poll_ms: u64,
    /// Longest one generation call may block (A1111 has no job id to come back to).
    pub generation_timeout_ms: u64,
    /// Where images are written (`<dir>/<job id>/<n>.png`); `None` inlines small ones.
    pub artifacts_dir: Option<PathBuf>,
    /// Largest image inlined as base64 without an artifacts directory.
    pub inline_limit_bytes: usize,
    /// Credentials (`--api-auth` is HTTP Basic).
    pub auth: Auth,
}

impl Default for A1111Config {
    fn default() -> Self {
        Self {
            service: "a1111".into(),
            url: "http://127.0.0.1:7860".into(),
            progress_poll_ms: 500,
            generation_timeout_ms: 3_600_000,
            artifacts_dir: None,
            inline_limit_bytes: DEFAULT_INLINE_LIMIT,
            auth: Auth::None,
        }
    }
}

/// The A1111 connector.
#[derive(Debug)]
pub struct A1111 {
    config: A1111Config,
    http: HttpTransport,
    artifacts: Artifacts,
}

impl A1111 {
    /// Builds the connector (no I/O).
    pub fn new(config: A1111Config) -> Result<Self, JobError> {
        let mut http = HttpConfig::new(config.url.clone());
        http.timeout = Duration::from_millis(config.generation_timeout_ms.max(1));
        http.auth = config.auth.clone();
        let artifacts = Artifacts::new(config.artifacts_dir.clone(), config.inline_limit_bytes);
        Ok(Self { http: HttpTransport::new(http)?, artifacts, config })
    }

    async fn interrupt(&self) {
        let sent = self
            .http
            .request(Method::POST, "/sdapi/v1/interrupt")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Err(e) = sent {
            debug!(error = %e, "a1111 interrupt failed");
        }
    }

    /// One `/progress` reading: (percent, step message, a key that changes when work moves).
    async fn read_progress(&self) -> Option<(f64, String, (i64, i64, String))> {
        let r = self
            .http
            .request(Method::GET, "/sdapi/v1/progress?skip_current_image=true")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let body: Value = r.json().await.ok()?;
        let state = body.get("state")?;
        let job_count = state.get("job_count").and_then(Value::as_i64).unwrap_or(0);
        if job_count <= 0 {
            return None; // idle or setting up: says nothing about our job
        }
        let step = state.get("sampling_step").and_then(Value::as_i64).unwrap_or(0);
        let steps = state.get("sampling_steps").and_then(Value::as_i64).unwrap_or(0);
        let job_no = state.get("job_no").and_then(Value::as_i64).unwrap_or(0);
        let stamp = state.get("job_timestamp").and_then(Value::as_str).unwrap_or("").to_owned();
        let p = body.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
        let message = format!("step {step}/{steps}, image {}/{job_count}", job_no + 1);
        Some(((p * 100.0).clamp(0.0, 99.0), message, (job_no, step, stamp)))
    }

    async fn result(&self, job: &JobRecord, reply: &Value) -> Result<Value, JobError> {
        let info = match reply.get("info") {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
            Some(other) => other.clone(),
            None => Value::Null,
        };
        let first = info.get("index_of_first_image").and_then(Value::as_u64).unwrap_or(0) as usize;
        let seeds = info.get("all_seeds").and_then(Value::as_array).cloned().unwrap_or_default();
        let images = reply.get("images").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut out = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let Some(text) = image.as_str() else { continue };
            let bytes = decode_base64(text).map_err(|e| {
                JobError::retryable(FailureCategory::Service, format!("image {i} is not base64: {e}"))
            })?;
            let grid = i < first;
            let name = if grid { format!("grid-{i}.png") } else { format!("{i}.png") };
            let mut entry = self.artifacts.store(&job.summary.id.0, &name, &bytes).await?;
            if let Some(o) = entry.as_object_mut() {
                o.insert("grid".into(), json!(grid));
                if !grid && let Some(seed) = seeds.get(i - first) {
                    o.insert("seed".into(), seed.clone());
                }
            }
            out.push(entry);
        }
        Ok(
            json!({"images": out, "info": info, "parameters": reply.get("parameters").cloned().unwrap_or(Value::Null)}),
        )
    }

    /// The checkpoints A1111 lists: their titles (what `sd_model_checkpoint` takes) and, as names
    /// a job may require, both the title and the short `model_name`.
    async fn models(&self) -> Option<(Vec<Value>, Vec<String>)> {
        let (status, list) = self.http.get_json("/sdapi/v1/sd-models").await.ok()?;
        if status != StatusCode::OK {
            return None;
        }
        let list = list.as_array()?;
        let titles = list.iter().filter_map(|m| m.get("title").cloned()).collect();
        let names = list
            .iter()
            .flat_map(|m| ["title", "model_name"].map(|k| m.get(k).and_then(Value::as_str)))
            .flatten()
            .map(str::to_owned)
            .collect::<std::collections::BTreeSet<_>>();
        Some((titles, names.into_iter().collect()))
    }
}

/// Splits a payload into the endpoint and the request body.
fn parse_payload(payload: &Value) -> Result<(&'static str, Value), JobError> {
    let Value::Object(map) = payload else {
        return Err(JobError::fatal(
            FailureCategory::Validation,
            "a1111 payload must be an object: the txt2img/img2img request body",
        ));
    };
    let mut body: Map<String, Value> = map.clone();
    let endpoint = match body.remove("endpoint") {
        None if body.contains_key("init_images") => "img2img",
        None => "txt2img",
        Some(Value::String(s)) if s == "txt2img" => "txt2img",
        Some(Value::String(s)) if s == "img2img" => "img2img",
        Some(other) => {
            return Err(JobError::fatal(
                FailureCategory::Validation,
                format!("payload.endpoint must be \"txt2img\" or \"img2img\", not {other}"),
            ));
        }
    };
    Ok((endpoint, Value::Object(body)))
}

/// A non-200 generation reply as a typed failure (docs/services.md §2.6).
fn classify_error(status: StatusCode, body: &Value, path: &str) -> JobError {
    let error = body.get("error").and_then(Value::as_str).unwrap_or("");
    let detail = match body.get("detail") {
        Some(Value::String(s)) => s.clone(),
        // FastAPI's validation shape: [{loc, msg, type}]
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                let loc: Vec<String> = i
                    .get("loc")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter().map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned)).collect()
                    })
                    .unwrap_or_default();
                format!("{}: {}", loc.join("."), i.get("msg").and_then(Value::as_str).unwrap_or("invalid"))
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::new(),
    };
    let errors = body.get("errors").and_then(Value::as_str).unwrap_or("");
    let what = [error, detail.as_str(), errors]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(": ");
    let message = format!("POST {path} replied {status}: {what}");
    let lower = what.to_lowercase();
    match status.as_u16() {
        401 | 403 => JobError::fatal(
            FailureCategory::Service,
            format!("{message} (check the connector's credentials)"),
        ),
        400 | 404 | 422 => JobError::fatal(FailureCategory::Validation, message),
        _ if error == "OutOfMemoryError" || lower.contains("out of memory") => JobError {
            alloc_bytes: fleetq_core::oom::allocation_in(&what),
            ..JobError::retryable(FailureCategory::Oom, message)
        },
        _ if lower.contains("invalid encoded image")
            || lower.contains("invalid image format")
            || lower.contains("not found") =>
        {
            JobError::fatal(FailureCategory::Validation, message)
        }
        _ => JobError::retryable(FailureCategory::Service, message),
    }
}

impl Service for A1111 {
    fn name(&self) -> &str {
        &self.config.service
    }

    async fn check(&self) -> Health {
        let sent =
            self.http.request(Method::GET, "/sdapi/v1/options").timeout(Duration::from_secs(5)).send().await;
        match sent {
            Ok(r) if r.status().is_success() => {
                let options: Value = r.json().await.unwrap_or(Value::Null);
                let status = fleetq_core::ConnectorStatus::Idle;
                let (titles, names) = self.models().await.unzip();
                let info = json!({
                    "url": self.config.url,
                    "checkpoint": options.get("sd_model_checkpoint"),
                    "models": titles,
                });
                Health { status, message: None, info: Some(info), models: names }
            }
            Ok(r) => Health::error(format!(
                "GET /sdapi/v1/options replied {} (is the server started with --api?)",
                r.status()
            )),
            Err(e) => Health::offline(crate::http::unreachable(&self.config.url, &e).message),
        }
    }

    async fn run(
        &self,
        job: &JobRecord,
        sink: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        let (endpoint, body) = parse_payload(&job.spec.payload)?;
        let path = format!("/sdapi/v1/{endpoint}");
        let call = self.http.post_json(&path, &body);
        tokio::pin!(call);
        let poll_every = Duration::from_millis(self.config.progress_poll_ms.max(10));
        let mut tick = tokio::time::interval(poll_every);
        let mut last_key = None;
        sink.report(0.0, Some(format!("{endpoint} sent")));
        let (status, reply) = loop {
            tokio::select! {
                r = &mut call => break r?,
                () = cancel.cancelled() => {
                    // The blocked call would return 200 with partial images: never a success.
                    self.interrupt().await;
                    return Err(JobError::fatal(FailureCategory::Cancelled, "interrupted"));
                }
                _ = tick.tick() => {
                    if let Some((p, message, key)) = self.read_progress().await
                        && last_key.as_ref() != Some(&key)
                    {
                        last_key = Some(key);
                        sink.report(p, Some(message));
                    }
                }
            }
        };
        let reply: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        if status != StatusCode::OK {
            return Err(classify_error(status, &reply, &path));
        }
        self.result(job, &reply).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_comes_from_the_payload() {
        let ep = |v: Value| parse_payload(&v).map(|(e, b)| (e, b.get("endpoint").is_none()));
        assert_eq!(ep(json!({"prompt": "a cat"})).ok(), Some(("txt2img", true)));
        assert_eq!(ep(json!({"init_images": ["x"]})).ok(), Some(("img2img", true)));
        assert_eq!(ep(json!({"endpoint": "img2img", "prompt": "x"})).ok(), Some(("img2img", true)));
        assert!(ep(json!({"endpoint": "extras"})).is_err());
        assert!(ep(json!("a cat")).is_err());
    }

    #[test]
    fn a1111_errors_are_classed_and_only_transient_ones_retried() {
        let c = |s: u16, b: Value| {
            let e = classify_error(StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT), &b, "/x");
            (e.category, e.retryable)
        };
        let shape = |error: &str, detail: &str, errors: &str| json!({"error": error, "detail": detail, "body": "", "errors": errors});
        assert_eq!(
            c(400, shape("HTTPException", "Sampler not found", "")),
            (FailureCategory::Validation, false)
        );
        assert_eq!(
            c(404, shape("HTTPException", "Init image not found", "")),
            (FailureCategory::Validation, false)
        );
        assert_eq!(
            c(
                422,
                json!({"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"}]})
            ),
            (FailureCategory::Validation, false)
        );
        assert_eq!(
            c(500, shape("OutOfMemoryError", "", "CUDA out of memory.")),
            (FailureCategory::Oom, true)
        );
        assert_eq!(
            c(500, shape("HTTPException", "Invalid encoded image", "")),
            (FailureCategory::Validation, false)
        );
        assert_eq!(
            c(500, shape("RuntimeError", "", "model 'x' not found")),
            (FailureCategory::Validation, false)
        );
        assert_eq!(c(500, shape("RuntimeError", "", "device mismatch")), (FailureCategory::Service, true));
        assert_eq!(
            c(401, shape("HTTPException", "Not authenticated", "")),
            (FailureCategory::Service, false)
        );
        assert_eq!(c(503, Value::Null), (FailureCategory::Service, true));
        let e = classify_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer"}]}),
            "/x",
        );
        assert!(e.message.contains("body.steps: value is not a valid integer"), "{}", e.message);
    }
}
