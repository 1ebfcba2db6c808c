//! Submission validation. A bad job is rejected at submission with an error naming the field, so
//! nothing downstream (matching, the broker's scripts) ever has to cope with malformed stored data.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{JobSpec, MAX_RETRY_BACKOFF_MS};
use crate::order::MAX_TIME_MS;
use crate::requirements::{Requirements, kind};

pub use crate::error::ValidationError;

/// The largest `step_number` accepted.
pub const MAX_STEP_NUMBER: u32 = 1_000_000;

/// Limits and defaults applied at submission, queue-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest payload, as serialized JSON bytes.
    pub max_payload_bytes: usize,
    /// `timeout_ms` of a job that sets none: nothing runs unbounded by default.
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` accepted.
    pub max_timeout_ms: u64,
    /// `progress_timeout_ms` of a job that sets none (`None`: the worker's own default applies).
    pub default_progress_timeout_ms: Option<u64>,
    /// Largest `progress_timeout_ms` accepted.
    pub max_progress_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4 * 1024 * 1024,
            default_timeout_ms: 3_600_000,
            max_timeout_ms: 24 * 3_600_000,
            default_progress_timeout_ms: None,
            max_progress_timeout_ms: 24 * 3_600_000,
        }
    }
}

/// Longest service, worker, machine, customer or workflow name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks an identifier: non-empty, at most [`MAX_NAME_LEN`] bytes, ASCII letters, digits and `._-:`,
/// starting with a letter or digit.
pub fn check_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(field, format!("longer than {MAX_NAME_LEN} characters")));
    }
    let ok_first = value.as_bytes()[0].is_ascii_alphanumeric();
    let ok_rest = value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !ok_first || !ok_rest {
        return Err(ValidationError::new(
            field,
            format!(
                "{value:?} is not a valid name: use letters, digits and . _ - : (starting with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// Parses and validates the JSON body of a submission (`POST /api/jobs`, `fleetq explain --job`).
pub fn parse_job_spec(text: &str, limits: &Limits) -> Result<JobSpec, ValidationError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ValidationError::new("body", format!("not valid JSON: {e}")))?;
    job_spec_from_value(value, limits)
}

/// Parses and validates an already parsed JSON submission.
pub fn job_spec_from_value(value: Value, limits: &Limits) -> Result<JobSpec, ValidationError> {
    let spec = job_spec_shape(value)?;
    spec.validate(limits)?;
    Ok(spec)
}

/// The most jobs one batch submission may hold (the API's own limit may be lower).
pub const MAX_BATCH: usize = 10_000;

/// Admits every spec of a batch ([`JobSpec::admit`]); an error names the item
/// (`[3].requirements.models`). The broker's check of a batch, before anything is stored.
pub fn admit_batch(specs: &mut [JobSpec], limits: &Limits) -> Result<(), ValidationError> {
    if specs.len() > MAX_BATCH {
        return Err(ValidationError::new(
            "body",
            format!("a batch of {} jobs is over the limit of {MAX_BATCH}", specs.len()),
        ));
    }
    for (i, spec) in specs.iter_mut().enumerate() {
        spec.admit(limits).map_err(|e| e.within(&format!("[{i}]")))?;
    }
    Ok(())
}

/// Reads a JSON submission into a spec — its shape and the requirements' grammar, each error
/// naming its field — without the value checks of [`JobSpec::validate`], which the broker runs
/// on every submission (so a server parses once and the broker is the one guard).
pub fn job_spec_shape(mut value: Value) -> Result<JobSpec, ValidationError> {
    let Some(obj) = value.as_object_mut() else {
        return Err(ValidationError::new("body", format!("must be an object, got {}", kind(&value))));
    };
    // Requirements get their own parser so its errors name the exact nested field.
    let requirements = obj.remove("requirements").unwrap_or(Value::Null);
    let mut spec: JobSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde names a missing field only in its message; name it as the field too.
        let missing = message.strip_prefix("missing field `").and_then(|m| m.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(name)) => name.to_owned(),
            (".", None) => "body".to_owned(),
            (_, Some(name)) => format!("{path}.{name}"),
            _ => path,
        };
        ValidationError::new(&field, message)
    })?;
    spec.requirements = Requirements::parse(&requirements, "requirements")?;
    Ok(spec)
}

impl JobSpec {
    /// What a broker does with every submission: fills the queue's defaults (`timeout_ms`,
    /// `progress_timeout_ms`) and validates every field.
    pub fn admit(&mut self, limits: &Limits) -> Result<(), ValidationError> {
        self.timeout_ms.get_or_insert(limits.default_timeout_ms);
        if self.progress_timeout_ms.is_none() {
            self.progress_timeout_ms = limits.default_progress_timeout_ms;
        }
        self.validate(limits)
    }

    /// Validates every field, each number within its bounds (named in the error).
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        check_name("service", &self.service)?;
        for (field, v) in [("customer_id", &self.customer_id), ("workflow_id", &self.workflow_id)] {
            if let Some(v) = v {
                check_name(field, v)?;
            }
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 256 || key.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "idempotency_key",
                "must be 1 to 256 characters, none of them control characters",
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(ValidationError::new("max_attempts", "must be between 1 and 100"));
        }
        if let Some(t) = self.workflow_datetime
            && !(0..=MAX_TIME_MS).contains(&t)
        {
            return Err(ValidationError::new(
                "workflow_datetime",
                "must be milliseconds since the Unix epoch (0 ..= 2^48-1)",
            ));
        }
        // Priorities are bounded by their type (i32: a larger number does not parse, the field
        // named), and the order key encodes every i32 exactly.
        if self.step_number.is_some_and(|n| n > MAX_STEP_NUMBER) {
            return Err(ValidationError::new("step_number", format!("must be at most {MAX_STEP_NUMBER}")));
        }
        if self.retry_backoff_ms.is_some_and(|b| b > MAX_RETRY_BACKOFF_MS) {
            return Err(ValidationError::new(
                "retry_backoff_ms",
                format!("must be at most {MAX_RETRY_BACKOFF_MS} (5 minutes)"),
            ));
        }
        for (field, v, max) in [
            ("timeout_ms", self.timeout_ms, limits.max_timeout_ms),
            ("progress_timeout_ms", self.progress_timeout_ms, limits.max_progress_timeout_ms),
        ] {
            match v {
                Some(0) => {
                    return Err(ValidationError::new(
                        field,
                        "must be greater than 0 (omit it for the default)",
                    ));
                }
                Some(v) if v > max => {
                    return Err(ValidationError::new(
                        field,
                        format!("must be at most {max} ms (the queue's limit)"),
                    ));
                }
                _ => {}
            }
        }
        let size = serde_json::to_vec(&self.payload).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > limits.max_payload_bytes {
            return Err(ValidationError::new(
                "payload",
                format!("{size} bytes is over the limit of {} bytes", limits.max_payload_bytes),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn field_of(v: Value) -> String {
        parse_job_spec(&v.to_string(), &Limits { max_payload_bytes: 64, ..Limits::default() })
            .expect_err(&v.to_string())
            .field
    }

    #[test]
    fn accepts_a_full_submission() {
        let spec = parse_job_spec(
            &json!({
                "service": "comfyui", "payload": {"prompt": {}}, "priority": 0,
                "requirements": {"hardware": {"gpu_memory_gb": 16}},
                "workflow_id": "wf-1", "workflow_priority": 5, "workflow_datetime": 1_700_000_000_000i64,
                "step_number": 2, "customer_id": "acme", "max_attempts": 2, "timeout_ms": 60000,
                "idempotency_key": "abc"
            })
            .to_string(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(spec.workflow_priority, Some(5));
        assert_eq!(spec.requirements.positive.len(), 1);
    }

    #[test]
    fn legacy_service_field_name() {
        let spec = parse_job_spec(r#"{"service_required":"a1111"}"#, &Limits::default()).unwrap();
        assert_eq!(spec.service, "a1111");
    }

    #[test]
    fn rejections_name_the_field() {
        let cases = [
            (json!([]), "body"),
            (json!({"payload": {}}), "service"),
            (json!({"service": ""}), "service"),
            (json!({"service": "comfy ui"}), "service"),
            (json!({"service": "-x"}), "service"),
            (json!({"service": 5}), "service"),
            (json!({"service": "x", "customer_id": ""}), "customer_id"),
            (json!({"service": "x", "priority": "5"}), "priority"),
            (json!({"service": "x", "priority": 1.5}), "priority"),
            (json!({"service": "x", "priority": 4_000_000_000u64}), "priority"),
            (json!({"service": "x", "requirements": "gpu"}), "requirements"),
            (
                json!({"service": "x", "requirements": {"hardware": {"gpu_memory_gb": "16"}}}),
                "requirements.hardware.gpu_memory_gb",
            ),
            (json!({"service": "x", "requirements": {"models": 3}}), "requirements.models"),
            (
                json!({"service": "x", "requirements": {"positive_requirements": {"a": 1}, "b": 2}}),
                "requirements.b",
            ),
            (json!({"service": "x", "payload": "x".repeat(100)}), "payload"),
            (json!({"service": "x", "max_attempts": 0}), "max_attempts"),
            (json!({"service": "x", "workflow_datetime": -1}), "workflow_datetime"),
            (json!({"service": "x", "timeout_ms": 0}), "timeout_ms"),
            (json!({"service": "x", "idempotency_key": ""}), "idempotency_key"),
            (json!({"service": "x", "surprise": 1}), "surprise"),
            // Every number is bounded, whatever its type allows.
            (json!({"service": "x", "retry_backoff_ms": u64::MAX}), "retry_backoff_ms"),
            (json!({"service": "x", "retry_backoff_ms": 1_000_000_000_000_000u64}), "retry_backoff_ms"),
            (json!({"service": "x", "retry_backoff_ms": 300_001}), "retry_backoff_ms"),
            (json!({"service": "x", "timeout_ms": u64::MAX}), "timeout_ms"),
            (json!({"service": "x", "progress_timeout_ms": u64::MAX}), "progress_timeout_ms"),
            (json!({"service": "x", "workflow_priority": -3_000_000_000i64}), "workflow_priority"),
            (json!({"service": "x", "step_number": 2_000_000}), "step_number"),
            (json!({"service": "x", "workflow_datetime": 1i64 << 50}), "workflow_datetime"),
            (json!({"service": "x", "max_attempts": 101}), "max_attempts"),
        ];
        for (v, field) in cases {
            assert_eq!(field_of(v.clone()), field, "{v}");
        }
        assert_eq!(parse_job_spec("{", &Limits::default()).unwrap_err().field, "body");
    }

    #[test]
    fn admission_fills_the_queue_defaults_and_keeps_the_edges() {
        let limits = Limits { default_progress_timeout_ms: Some(60_000), ..Limits::default() };
        let mut spec = JobSpec::new("x", json!(null));
        spec.admit(&limits).unwrap();
        assert_eq!((spec.timeout_ms, spec.progress_timeout_ms), (Some(3_600_000), Some(60_000)));
        let mut own = JobSpec::new("x", json!(null));
        own.timeout_ms = Some(limits.max_timeout_ms);
        own.retry_backoff_ms = Some(MAX_RETRY_BACKOFF_MS);
        own.priority = i32::MAX;
        own.admit(&limits).unwrap();
        assert_eq!(
            own.timeout_ms,
            Some(limits.max_timeout_ms),
            "the client's own value, at the limit, is kept"
        );
        let mut batch = vec![JobSpec::new("x", json!(1)), JobSpec::new("x", json!(2))];
        batch[1].timeout_ms = Some(limits.max_timeout_ms + 1);
        assert_eq!(admit_batch(&mut batch, &limits).unwrap_err().field, "[1].timeout_ms");
    }
}
