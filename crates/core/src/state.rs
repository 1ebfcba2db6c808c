//! The job state machine. Every backend computes a job's next status with [`JobStatus::apply`]
//! (or, for Redis, a server-side function that the conformance suite holds to the same table), so an
//! illegal change — completing a cancelled job, claiming a running one — is an error, never a write.
//!
//! ```text
//! pending ──claim──▶ assigned ──progress──▶ in_progress
//!    ▲  │               │  │                   │  │
//!    │  └─cancel─▶ cancelled ◀─confirm_cancel──┘  │
//!    │                  │                         │
//!    └──requeue (retryable fail, release, lease expiry with attempts left)
//!                       ├──complete──▶ completed
//!                       └──fail─────▶ failed ──retry──▶ pending (also from cancelled)
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::job::JobStatus;

/// Something that happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A worker claims the pending job.
    Claim,
    /// The holder reports progress.
    Progress,
    /// The holder finishes with a result.
    Complete,
    /// The holder (or the reaper) fails it for good.
    Fail,
    /// Back to the queue: retryable failure, release, or expired lease with attempts left.
    Requeue,
    /// A client cancels. Pending jobs are cancelled at once; running jobs keep their status and get
    /// `cancel_requested` until the worker confirms.
    Cancel,
    /// The worker (or the reaper) confirms the cancel of a running job.
    ConfirmCancel,
    /// An operator re-runs a failed or cancelled job.
    Retry,
}

impl Action {
    /// The action as a verb in a sentence (`retry`, `confirm the cancel of`).
    pub fn verb(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Progress => "report progress on",
            Self::Complete => "complete",
            Self::Fail => "fail",
            Self::Requeue => "requeue",
            Self::Cancel => "cancel",
            Self::ConfirmCancel => "confirm the cancel of",
            Self::Retry => "retry",
        }
    }
}

/// The action is not allowed in the job's current status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("cannot {} a job that is {from}", action.verb())]
pub struct IllegalTransition {
    /// Status the job was in.
    pub from: JobStatus,
    /// Action attempted.
    pub action: Action,
}

impl JobStatus {
    /// The status after `action`, or an error when the action is illegal from `self`.
    pub fn apply(self, action: Action) -> Result<JobStatus, IllegalTransition> {
        use Action as A;
        use JobStatus as S;
        let next = match (self, action) {
            (S::Pending, A::Claim) => S::Assigned,
            (S::Assigned | S::InProgress, A::Progress) => S::InProgress,
            (S::Assigned | S::InProgress, A::Complete) => S::Completed,
            (S::Assigned | S::InProgress, A::Fail) => S::Failed,
            (S::Assigned | S::InProgress, A::Requeue) => S::Pending,
            (S::Pending, A::Cancel) => S::Cancelled,
            (s @ (S::Assigned | S::InProgress), A::Cancel) => s,
            (S::Assigned | S::InProgress, A::ConfirmCancel) => S::Cancelled,
            (S::Failed | S::Cancelled, A::Retry) => S::Pending,
            (from, action) => return Err(IllegalTransition { from, action }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [Action; 8] = [
        Action::Claim,
        Action::Progress,
        Action::Complete,
        Action::Fail,
        Action::Requeue,
        Action::Cancel,
        Action::ConfirmCancel,
        Action::Retry,
    ];

    /// The whole table, written out once more by hand: any change to `apply` must change this too.
    #[test]
    fn only_the_listed_transitions_are_allowed() {
        use Action as A;
        use JobStatus as S;
        let allowed: &[(S, A, S)] = &[
            (S::Pending, A::Claim, S::Assigned),
            (S::Pending, A::Cancel, S::Cancelled),
            (S::Assigned, A::Progress, S::InProgress),
            (S::Assigned, A::Complete, S::Completed),
            (S::Assigned, A::Fail, S::Failed),
            (S::Assigned, A::Requeue, S::Pending),
            (S::Assigned, A::Cancel, S::Assigned),
            (S::Assigned, A::ConfirmCancel, S::Cancelled),
            (S::InProgress, A::Progress, S::InProgress),
            (S::InProgress, A::Complete, S::Completed),
            (S::InProgress, A::Fail, S::Failed),
            (S::InProgress, A::Requeue, S::Pending),
            (S::InProgress, A::Cancel, S::InProgress),
            (S::InProgress, A::ConfirmCancel, S::Cancelled),
            (S::Failed, A::Retry, S::Pending),
            (S::Cancelled, A::Retry, S::Pending),
        ];
        for from in JobStatus::ALL {
            for action in ACTIONS {
                let expected =
                    allowed.iter().find(|(f, a, _)| *f == from && *a == action).map(|(_, _, to)| *to);
                match (from.apply(action), expected) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{from} {action:?}"),
                    (Err(e), None) => assert_eq!(e, IllegalTransition { from, action }),
                    (got, want) => panic!("{from} {action:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn completed_is_final() {
        for action in ACTIONS {
            assert!(JobStatus::Completed.apply(action).is_err());
        }
    }
}
