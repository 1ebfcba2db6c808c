//! The restart rule of a supervised service (a ComfyUI per GPU): after the process exits, restart
//! it, after how long, or give up — decided here from the exit history alone, so the supervisor
//! only does I/O.
//!
//! - A service whose launch never became ready is not restarted: a broken install or a wrong
//!   command would otherwise loop forever, and its output says what is wrong.
//! - Otherwise each crash waits a capped exponential backoff (`base · 2^(n-1)`, at most `max`),
//!   with jitter so a box of eight GPUs does not restart eight services in the same instant.
//! - A run that stayed up for `stable_after` resets the count: an occasional crash after hours
//!   restarts quickly again.
//! - More than `max_crashes` crashes inside `window` gives up: the service shows `failed`.

use serde::{Deserialize, Serialize};

/// How a service is restarted. Durations in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// The first backoff.
    pub backoff_base_ms: u64,
    /// The longest backoff.
    pub backoff_max_ms: u64,
    /// A run at least this long resets the crash count.
    pub stable_after_ms: u64,
    /// Crashes allowed inside `window_ms`; one more gives up.
    pub max_crashes: u32,
    /// The window crashes are counted in.
    pub window_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            stable_after_ms: 300_000,
            max_crashes: 5,
            window_ms: 600_000,
        }
    }
}

/// What to do after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start it again after this many milliseconds.
    Restart {
        /// The wait before the start.
        after_ms: u64,
        /// Which crash of the current count this is (1 = the first).
        crash: u32,
    },
    /// Leave it stopped; the reason is shown as the service's `failed` state.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// The crash history of one service under a [`RestartPolicy`].
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// When the crashes that still count happened (ms), oldest first.
    crashes: Vec<i64>,
}

impl RestartTracker {
    /// A tracker with no crashes yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self { policy, crashes: Vec::new() }
    }

    /// The policy it applies.
    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// How many crashes count now.
    pub fn crashes(&self) -> usize {
        self.crashes.len()
    }

    /// Decides after the process exited at `now` having run `ran_ms`. `ever_ready` says whether
    /// this launch became ready; `unit` is a random number in `[0, 1)` for the jitter (the caller
    /// owns randomness, so the rule stays reproducible).
    pub fn on_exit(&mut self, now: i64, ran_ms: u64, ever_ready: bool, unit: f64) -> RestartDecision {
        let p = self.policy;
        if !ever_ready {
            return RestartDecision::GiveUp {
                reason: "it exited before it ever became ready: not restarted (check its command and log)"
                    .into(),
            };
        }
        if ran_ms >= p.stable_after_ms {
            self.crashes.clear();
        }
        let window = i64::try_from(p.window_ms).unwrap_or(i64::MAX);
        let since = now.saturating_sub(window);
        self.crashes.retain(|&at| at > since);
        self.crashes.push(now);
        let count = u32::try_from(self.crashes.len()).unwrap_or(u32::MAX);
        if count > p.max_crashes {
            return RestartDecision::GiveUp {
                reason: format!(
                    "{count} crashes within {} s: given up (more than {} allowed)",
                    p.window_ms / 1000,
                    p.max_crashes
                ),
            };
        }
        RestartDecision::Restart { after_ms: backoff(&p, count, unit), crash: count }
    }
}

/// The wait before restart number `crash` (1-based): `base · 2^(crash-1)` capped at `max`, then
/// spread by up to ±25 % with `unit` (never above `max`).
pub fn backoff(policy: &RestartPolicy, crash: u32, unit: f64) -> u64 {
    let raw = crate::backoff::exponential_ms(
        policy.backoff_base_ms,
        policy.backoff_max_ms,
        crash.saturating_sub(1),
    );
    let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.5 };
    // ±25 %: a factor in [0.75, 1.25).
    let spread = (raw as f64) * (0.75 + unit * 0.5);
    (spread as u64).min(policy.backoff_max_ms)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_base_ms: 1_000,
            backoff_max_ms: 8_000,
            stable_after_ms: 60_000,
            max_crashes: 3,
            window_ms: 120_000,
        }
    }

    #[test]
    fn a_launch_that_never_became_ready_is_not_restarted() {
        let mut t = RestartTracker::new(policy());
        let d = t.on_exit(1_000, 500, false, 0.5);
        assert!(
            matches!(d, RestartDecision::GiveUp { reason } if reason.contains("before it ever became ready"))
        );
    }

    #[test]
    fn crashes_back_off_then_give_up_inside_the_window() {
        let mut t = RestartTracker::new(policy());
        let waits: Vec<RestartDecision> =
            (0..3).map(|i| t.on_exit(10_000 + i * 1_000, 1_000, true, 0.5)).collect();
        assert_eq!(
            waits,
            [
                RestartDecision::Restart { after_ms: 1_000, crash: 1 },
                RestartDecision::Restart { after_ms: 2_000, crash: 2 },
                RestartDecision::Restart { after_ms: 4_000, crash: 3 },
            ]
        );
        assert!(
            matches!(t.on_exit(14_000, 1_000, true, 0.5), RestartDecision::GiveUp { reason } if reason.contains("4 crashes"))
        );
    }

    #[test]
    fn a_stable_run_or_an_old_crash_no_longer_counts() {
        let mut t = RestartTracker::new(policy());
        for i in 0..3 {
            t.on_exit(i * 1_000, 1_000, true, 0.5);
        }
        // A run past `stable_after` resets the count.
        assert_eq!(
            t.on_exit(100_000, 60_000, true, 0.5),
            RestartDecision::Restart { after_ms: 1_000, crash: 1 }
        );
        // Crashes older than the window fall out of it.
        let mut t = RestartTracker::new(policy());
        for i in 0..3 {
            t.on_exit(i * 1_000, 1_000, true, 0.5);
        }
        assert_eq!(
            t.on_exit(200_000, 1_000, true, 0.5),
            RestartDecision::Restart { after_ms: 1_000, crash: 1 }
        );
    }

    proptest! {
        /// Whatever the history, a wait is within ±25 % of the capped exponential and never
        /// above the cap, and the count never exceeds `max_crashes` while restarting.
        #[test]
        fn waits_are_bounded(exits in proptest::collection::vec((0i64..1_000_000, 0u64..200_000, 0.0f64..1.0), 1..40)) {
            let p = policy();
            let mut t = RestartTracker::new(p);
            let mut now = 0i64;
            for (gap, ran, unit) in exits {
                now = now.saturating_add(gap % 50_000);
                match t.on_exit(now, ran, true, unit) {
                    RestartDecision::Restart { after_ms, crash } => {
                        prop_assert!(crash >= 1 && crash <= p.max_crashes);
                        prop_assert!(after_ms <= p.backoff_max_ms);
                        let raw = (p.backoff_base_ms << (crash - 1)).min(p.backoff_max_ms);
                        prop_assert!(after_ms as f64 >= raw as f64 * 0.75 - 1.0);
                    }
                    RestartDecision::GiveUp { .. } => prop_assert!(t.crashes() > p.max_crashes as usize),
                }
            }
        }

        #[test]
        fn backoff_never_overflows(crash in 0u32..u32::MAX, base in 0u64..u64::MAX, unit in proptest::num::f64::ANY) {
            let p = RestartPolicy { backoff_base_ms: base, backoff_max_ms: 60_000, ..RestartPolicy::default() };
            prop_assert!(backoff(&p, crash, unit) <= 60_000);
        }
    }
}
