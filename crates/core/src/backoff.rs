//! Capped exponential backoff: the one rule behind every "wait longer each time" in fleetq — a
//! transport's retries, the ComfyUI socket's reconnects, OpenAI's rate-limit retries, a worker
//! ending an attempt through a backend outage, a service's restarts and a job's retry delay.

use std::time::Duration;

/// The `n`-th wait (0-based) of a backoff starting at `base_ms` and doubling: `base · 2^n`, at most
/// `max_ms`. Saturates instead of overflowing for any `n`.
pub fn exponential_ms(base_ms: u64, max_ms: u64, n: u32) -> u64 {
    let factor = 1u64.checked_shl(n.min(63)).unwrap_or(u64::MAX);
    base_ms.saturating_mul(factor).min(max_ms)
}

/// The waits of one retry loop: [`Backoff::next_delay`] returns `base`, `2·base`, `4·base`, …, at
/// most `max`; [`Backoff::reset`] starts over after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    tries: u32,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self { base_ms: ms(base), max_ms: ms(max), tries: 0 }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let ms = exponential_ms(self.base_ms, self.max_ms, self.tries);
        self.tries = self.tries.saturating_add(1);
        Duration::from_millis(ms)
    }

    /// Back to `base` (the thing retried worked).
    pub fn reset(&mut self) {
        self.tries = 0;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_on_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn never_above_the_cap_never_overflows(base in any::<u64>(), max in any::<u64>(), n in any::<u32>()) {
            let d = exponential_ms(base, max, n);
            prop_assert!(d <= max);
            prop_assert!(d >= base.min(max), "never below the first wait (within the cap)");
        }

        #[test]
        fn each_wait_at_least_the_one_before(base in 0u64..1_000_000, max in 0u64..10_000_000, n in 0u32..100) {
            prop_assert!(exponential_ms(base, max, n + 1) >= exponential_ms(base, max, n));
        }
    }
}
