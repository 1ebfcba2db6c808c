//! Rules both backends apply the same way: page sizes and cursors, job ids, progress values,
//! stored outcomes and the release error.

use fleetq_core::{JobError, JobId, ValidationError};
use serde_json::Value;

use crate::{BrokerConfig, BrokerError, JobFilter, QueueFilter, Result};

impl QueueFilter {
    /// The page size, clamped like [`JobFilter::limit`].
    pub(crate) fn page_limit(&self) -> usize {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }

    /// The cursor, refused unless it is an encoded order key.
    pub(crate) fn checked_cursor(&self) -> Result<Option<&str>> {
        match self.cursor.as_deref() {
            None => Ok(None),
            Some(c)
                if c.len() == fleetq_core::order::ENCODED_LEN && c.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(Some(c))
            }
            Some(_) => Err(ValidationError::new("cursor", "not a queue cursor of this broker").into()),
        }
    }
}

/// Clamps a page size.
pub(crate) fn page_limit(filter: &JobFilter) -> usize {
    filter.limit.unwrap_or(100).clamp(1, 1000)
}

/// A fresh job id (UUIDv7: time-ordered, unique across processes).
pub(crate) fn new_job_id() -> JobId {
    JobId(uuid::Uuid::now_v7().to_string())
}

/// Validates a progress value (a finite number, clamped to 0–100).
pub(crate) fn check_progress(progress: f64) -> Result<f64> {
    if !progress.is_finite() {
        return Err(ValidationError::new("progress", "must be a finite number between 0 and 100").into());
    }
    // `+ 0.0` turns -0.0 (an empty float sum is -0.0) into 0, which is what readers expect to see.
    Ok(progress.clamp(0.0, 100.0) + 0.0)
}

/// The stored outcome of a completion, from the result's JSON text.
pub(crate) fn result_outcome(result_json: &str) -> String {
    format!(r#"{{"kind":"result","value":{result_json}}}"#)
}

/// The error recorded when a holder releases a job.
pub(crate) fn release_error(reason: &str) -> JobError {
    let category = if reason == crate::RELEASE_SERVICE_OFFLINE {
        fleetq_core::FailureCategory::Connection
    } else if reason.contains("timeout") {
        fleetq_core::FailureCategory::Timeout
    } else {
        fleetq_core::FailureCategory::Internal
    };
    JobError::retryable(category, format!("released: {reason}"))
}

/// Whether a release gives the attempt back: the holder stopped for a reason of its own
/// (`shutdown`), or the service died under the job (counted: see [`service_crash_error`]).
pub(crate) fn release_refunds(reason: &str) -> bool {
    reason == "shutdown" || reason == crate::RELEASE_SERVICE_OFFLINE
}

/// The error of a job whose service died under it [`fleetq_core::job::SERVICE_CRASHES_TO_FAIL`]
/// times: likely the job's own doing, so it is not offered to another GPU again.
pub(crate) fn service_crash_error() -> JobError {
    JobError::fatal(
        fleetq_core::FailureCategory::ServiceCrash,
        format!(
            "the service died while running this job {} times; not retried, so one job cannot take down the fleet one GPU at a time",
            fleetq_core::job::SERVICE_CRASHES_TO_FAIL
        ),
    )
}

/// Checks a result against the size limit and returns its JSON text.
pub(crate) fn encode_result(config: &BrokerConfig, result: &Value) -> Result<String> {
    let text = serde_json::to_string(result).map_err(|e| BrokerError::Corrupt(e.to_string()))?;
    if text.len() > config.max_result_bytes {
        return Err(BrokerError::ResultTooLarge { size: text.len(), limit: config.max_result_bytes });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_bounded_and_never_negative_zero() {
        let zero = check_progress(-0.0).expect("valid");
        assert!(zero == 0.0 && zero.is_sign_positive(), "{zero}");
        assert_eq!(check_progress(-5.0).expect("valid"), 0.0);
        assert_eq!(check_progress(250.0).expect("valid"), 100.0);
        assert!(check_progress(f64::NAN).is_err());
    }
}
