//! The conformance suite: every broker guarantee written once, generic over the backend.
//!
//! A backend's test file instantiates all of it with [`conformance_tests!`](crate::conformance_tests),
//! giving an async function that builds a fresh [`Fixture`]. Time only moves through the fixture's
//! [`crate::ManualClock`]; nothing here sleeps to make something happen.
//!
//! The cases live by the broker's groups: `submit` (submission, idempotency, limits),
//! `claim` (order, matching, blocking claims, leases, partitions, fair share), `attempts` (how an
//! attempt ends: retries, failures, cancels, progress, release), `fleet` (workers, connectors,
//! machines), `log` (events, the snapshot, epochs, cancel signals) and `reads` (listings, depths,
//! queue position). Each case is private to its group and listed once, in the `suite!` call below,
//! which declares both the tests a backend gets and the dispatcher that calls the cases: a case left
//! out of the list is dead code, which the lints refuse.

mod attempts;
mod claim;
mod fleet;
mod log;
mod reads;
mod submit;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fleetq_core::{
    ConnectorReport, ConnectorStatus, Event, EventKind, FailureCategory, JobError, JobId, JobSpec, JobStatus,
    MachineEvent, MachinePhase, Snapshot, WorkerRegistration, explain,
};
use serde_json::{Value, json};

use crate::prelude::*;
pub use crate::testing::Fixture;
use crate::{BrokerError, CancelOutcome, FailOutcome, JobFilter, LeaseRef, QueueFilter};

/// Declares the suite from its one list of `group::case` entries: the exported
/// `conformance_tests!` (one `#[tokio::test]` per case for a backend's test file), the [`Case`]
/// names and [`run`], which calls a case. (`$d` is a `$`, for the macro this one writes.)
macro_rules! suite {
    ($d:tt; $($group:ident :: $case:ident),* $(,)?) => {
        /// Instantiates every conformance case as a `#[tokio::test]` calling `$make(config).await`
        /// for its fixture, with the configuration [`config_for`] gives the case.
        #[macro_export]
        macro_rules! conformance_tests {
            ($d make:path) => {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $case() {
                        let fixture = $d make($d crate::conformance::config_for(stringify!($case))).await;
                        $d crate::conformance::run($d crate::conformance::Case::$case, fixture).await;
                    }
                )*
            };
        }

        /// Every case of the suite, by name.
        #[allow(non_camel_case_types, reason = "a case is named as its test is")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Case {
            $(
                #[doc = concat!("`", stringify!($group), "::", stringify!($case), "`")]
                $case,
            )*
        }

        /// Runs one case against a fresh fixture.
        pub async fn run<B: Broker>(case: Case, fx: Fixture<B>) {
            match case {
                $(Case::$case => $group::$case(fx).await,)*
            }
        }
    };
}

suite! {
    $;
    submit::submit_get_and_idempotency,
    submit::invalid_submission_changes_nothing,
    submit::batch_is_all_or_nothing,
    claim::claim_follows_exact_order,
    claim::claim_needs_registered_worker,
    claim::a_paused_service_is_not_claimed,
    claim::matching_rules_through_broker,
    claim::incompatible_heads_do_not_hide_compatible_jobs,
    claim::workflow_restricted_worker,
    claim::claim_blocks_until_a_job_arrives,
    claim::claim_wait_expires_empty,
    claim::fencing_rejects_stale_holder,
    claim::killed_worker_job_comes_back,
    claim::concurrent_claimers_never_share_a_job,
    log::terminal_events_exactly_once,
    log::snapshot_and_events_converge,
    attempts::retry_backoff_keeps_place,
    attempts::retry_prefers_another_worker,
    attempts::attempts_exhausted_and_fatal_errors_fail,
    attempts::cancel_pending_and_running,
    attempts::progress_is_coalesced,
    attempts::release_for_shutdown_refunds_attempt,
    attempts::manual_retry_requeues,
    claim::unworkable_jobs_are_flagged,
    fleet::worker_presence_lifecycle,
    fleet::connector_status_changes_only,
    fleet::machine_events_fold,
    reads::job_listing_pages,
    reads::finished_jobs_by_end_time,
    submit::oversized_result_is_refused,
    log::events_after_waits_for_news,
    claim::complete_and_claim_hands_over_next_job,
    claim::lease_renewal_extends_deadline,
    log::event_log_is_capped_by_age,
    fleet::matching_workers_explain_the_fleet,
    reads::queue_depths_per_service,
    reads::queue_position_and_order_at_a_large_backlog,
    submit::idempotency_keys_are_scoped_by_owner,
    submit::numbers_are_bounded_and_time_limits_defaulted,
    log::the_log_epoch_moves_on_once,
    claim::order_holds_across_many_partitions,
    claim::partitions_come_and_go,
    claim::worker_classes_follow_registrations,
    claim::fair_share_takes_turns,
    claim::a_returning_worker_finds_its_pending_work,
    attempts::an_ended_attempt_leaves_no_message,
    attempts::service_crashes_spend_no_attempt_until_the_second,
    log::cancel_is_signalled_to_the_holder,
    attempts::a_retry_can_require_more,
    attempts::the_record_tells_how_each_attempt_ended,
}

/// The broker configuration of a case: [`crate::testing::test_config`], except that the cases about
/// wake-ups re-check only every 120 s — longer than their 60 s waits and 30 s bounds — so only a
/// real wake-up passes them, never a periodic re-check — and the fair share case turns it on.
pub fn config_for(case: &str) -> crate::BrokerConfig {
    let config = crate::testing::test_config();
    match case {
        "claim_blocks_until_a_job_arrives" | "events_after_waits_for_news" => {
            crate::BrokerConfig { claim_recheck_ms: 120_000, ..config }
        }
        "fair_share_takes_turns" => crate::BrokerConfig {
            fair_share: Some(crate::FairShare {
                enabled: true,
                weights: [("gold".to_owned(), 2)].into_iter().collect(),
            }),
            ..config
        },
        _ => config,
    }
}

pub(super) fn worker(id: &str, services: &[&str], caps: Value) -> WorkerRegistration {
    WorkerRegistration {
        worker_id: id.into(),
        machine_id: "m1".into(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        capabilities: serde_json::from_value(caps).expect("capabilities object"),
    }
}

pub(super) fn job(v: Value) -> JobSpec {
    fleetq_core::job_spec_from_value(v, &fleetq_core::Limits::default()).expect("valid job")
}

pub(super) fn sim(payload: Value) -> JobSpec {
    JobSpec::new("simulation", payload)
}

pub(super) async fn all_events<B: Broker>(b: &B) -> Vec<Event> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = b.events_after(after, 1000, Duration::ZERO).await.expect("events");
        match page.last() {
            Some(last) => after = last.seq,
            None => return out,
        }
        out.extend(page);
    }
}

pub(super) async fn status<B: Broker>(b: &B, id: &JobId) -> JobStatus {
    b.job(id).await.expect("job query").expect("job exists").summary.status
}

pub(super) async fn claim_now<B: Broker>(b: &B, worker: &str) -> Option<crate::Lease> {
    b.claim(worker, Duration::ZERO).await.expect("claim")
}
