//! How an attempt ends: what the connector's work came to ([`Ending`]), why the worker stopped it
//! if it did ([`Stop`]), and the one rule ([`verdict`]) that turns the two into what the broker is
//! told and which failure is counted. Pure: the runtime does the telling.

use fleetq_broker::RELEASE_SERVICE_OFFLINE;
use fleetq_core::{FailureCategory, JobError};
use serde_json::Value;

/// Why the worker stopped a job before the connector finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A client cancelled it.
    Cancelled,
    /// Its overall `timeout_ms` ran out.
    Timeout,
    /// No progress within its progress timeout.
    ProgressTimeout,
    /// The worker is shutting down and the grace ran out.
    Shutdown,
    /// The broker no longer holds this attempt for this worker.
    LeaseLost,
}

impl Stop {
    /// Its name in logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::ProgressTimeout => "progress_timeout",
            Self::Shutdown => "shutdown",
            Self::LeaseLost => "lease_lost",
        }
    }
}

/// What the connector's work came to.
#[derive(Debug)]
pub(crate) enum Ending {
    /// It returned a result.
    Done(Value),
    /// It returned an error.
    Failed(JobError),
    /// Its task panicked.
    Crashed(String),
    /// It ignored an interrupt past the grace and was aborted.
    Stuck,
}

/// What the broker is told about the attempt.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Nothing: the attempt is someone else's now.
    Drop,
    /// Complete with the result.
    Complete(Value),
    /// Give the job back (the reason decides whether the attempt is spent).
    Release(&'static str),
    /// Fail the attempt.
    Fail(JobError),
    /// Out of memory: retried only where more memory is ([`fleetq_core::oom`]), which needs a look
    /// at the fleet.
    AfterOom(JobError),
}

/// An attempt's end: the action, and the failure it counts (none for a success or a shutdown).
#[derive(Debug, PartialEq)]
pub(crate) struct Verdict {
    /// What to tell the broker.
    pub(crate) action: Action,
    /// The failure counted in the metrics and the log.
    pub(crate) failure: Option<FailureCategory>,
}

/// The one rule for ending an attempt. A result beats a late stop: a service that finished before
/// the interrupt landed (ComfyUI interrupts only between nodes) did the work, and running it again
/// would waste it — except when the lease is lost, where the result is no longer this worker's.
pub(crate) fn verdict(stop: Option<Stop>, ending: Ending, elapsed_ms: u64) -> Verdict {
    let failed = |error: JobError| Verdict { failure: Some(error.category), action: Action::Fail(error) };
    match (stop, ending) {
        (Some(Stop::LeaseLost), _) => {
            Verdict { action: Action::Drop, failure: Some(FailureCategory::LeaseExpired) }
        }
        (_, Ending::Done(value)) => Verdict { action: Action::Complete(value), failure: None },
        (Some(Stop::Shutdown), _) => Verdict { action: Action::Release("shutdown"), failure: None },
        (Some(Stop::ProgressTimeout), _) => Verdict {
            action: Action::Release("progress_timeout"),
            failure: Some(FailureCategory::ProgressTimeout),
        },
        (Some(Stop::Timeout), _) => {
            failed(JobError::retryable(FailureCategory::Timeout, format!("timed out after {elapsed_ms} ms")))
        }
        (Some(Stop::Cancelled), _) => failed(JobError::fatal(FailureCategory::Cancelled, "cancelled")),
        // The service went away under the job: give it back for a healthy worker instead of
        // spending one of its attempts.
        (None, Ending::Failed(e)) if e.category == FailureCategory::Connection => Verdict {
            action: Action::Release(RELEASE_SERVICE_OFFLINE),
            failure: Some(FailureCategory::Connection),
        },
        (None, Ending::Failed(e)) if e.category == FailureCategory::Oom && e.retryable => {
            Verdict { failure: Some(FailureCategory::Oom), action: Action::AfterOom(e) }
        }
        (None, Ending::Failed(e)) => failed(e),
        (None, Ending::Crashed(panic)) => {
            failed(JobError::retryable(FailureCategory::Internal, format!("connector crashed: {panic}")))
        }
        (None, Ending::Stuck) => {
            Verdict { action: Action::Release("connector_stuck"), failure: Some(FailureCategory::Internal) }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn error(category: FailureCategory, retryable: bool) -> JobError {
        JobError { retryable, ..JobError::fatal(category, "boom") }
    }

    #[test]
    fn a_result_is_recorded_unless_the_lease_is_lost() {
        for stop in [None, Some(Stop::Cancelled), Some(Stop::Timeout), Some(Stop::Shutdown)] {
            let v = verdict(stop, Ending::Done(json!(1)), 5);
            assert_eq!(v, Verdict { action: Action::Complete(json!(1)), failure: None }, "{stop:?}");
        }
        let lost = verdict(Some(Stop::LeaseLost), Ending::Done(json!(1)), 5);
        assert_eq!(lost.action, Action::Drop);
        assert_eq!(lost.failure, Some(FailureCategory::LeaseExpired));
    }

    #[test]
    fn stops_end_the_attempt_as_their_kind_says() {
        let v = verdict(Some(Stop::Shutdown), Ending::Stuck, 5);
        assert_eq!(v, Verdict { action: Action::Release("shutdown"), failure: None });
        let v =
            verdict(Some(Stop::ProgressTimeout), Ending::Failed(error(FailureCategory::Service, true)), 5);
        assert_eq!(v.action, Action::Release("progress_timeout"));
        let v = verdict(Some(Stop::Timeout), Ending::Stuck, 1234);
        assert!(
            matches!(&v.action, Action::Fail(e) if e.retryable && e.message == "timed out after 1234 ms")
        );
        let v = verdict(Some(Stop::Cancelled), Ending::Crashed("x".into()), 5);
        assert!(
            matches!(&v.action, Action::Fail(e) if !e.retryable && e.category == FailureCategory::Cancelled)
        );
    }

    #[test]
    fn the_services_own_failures_are_told_apart() {
        let offline = verdict(None, Ending::Failed(error(FailureCategory::Connection, true)), 5);
        assert_eq!(
            offline.action,
            Action::Release(RELEASE_SERVICE_OFFLINE),
            "an offline service spends no attempt"
        );
        let oom = verdict(None, Ending::Failed(error(FailureCategory::Oom, true)), 5);
        assert!(matches!(oom.action, Action::AfterOom(_)));
        let final_oom = verdict(None, Ending::Failed(error(FailureCategory::Oom, false)), 5);
        assert!(matches!(final_oom.action, Action::Fail(_)), "an OOM that cannot be helped fails");
        let crashed = verdict(None, Ending::Crashed("panicked".into()), 5);
        assert!(matches!(&crashed.action, Action::Fail(e) if e.retryable && e.message.contains("panicked")));
        let stuck = verdict(None, Ending::Stuck, 5);
        assert_eq!(
            stuck,
            Verdict { action: Action::Release("connector_stuck"), failure: Some(FailureCategory::Internal) }
        );
    }
}
