//! The exact ordering of pending jobs: higher effective priority first, then older effective time,
//! then submission sequence.
//!
//! The key is encoded as 36 lowercase hex digits whose *byte order* is that order, so both backends
//! sort by plain byte comparison: SQLite compares the TEXT column with BINARY collation, Redis keeps
//! members of one score in lexicographic order. No floating-point score is involved, so no two jobs
//! can tie or misorder however large the priority or timestamp (Redis scores are doubles and lose
//! integers above 2^53).
//!
//! Layout: `!(priority ^ 0x8000_0000)` (8 hex) · time ms (12 hex, `0 ..= 2^48-1`, year 10889) · seq (16 hex).

use std::cmp::Ordering;

/// Largest encodable time (ms since the epoch). Validation rejects `workflow_datetime` above it.
pub const MAX_TIME_MS: i64 = (1 << 48) - 1;
/// Length of an encoded key.
pub const ENCODED_LEN: usize = 36;
/// Length of [`OrderKey::prefix`]: priority (8 hex) and time (12 hex), without the sequence.
pub const PREFIX_LEN: usize = 20;

/// The ordering key of a pending job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    /// Effective priority (higher first).
    pub priority: i32,
    /// Effective time in ms (older first), clamped to `0..=MAX_TIME_MS`.
    pub time_ms: i64,
    /// Submission sequence (lower first).
    pub seq: u64,
}

impl OrderKey {
    /// Builds a key, clamping the time into the encodable range.
    pub fn new(priority: i32, time_ms: i64, seq: u64) -> Self {
        Self { priority, time_ms: time_ms.clamp(0, MAX_TIME_MS), seq }
    }

    /// The byte-ordered text form.
    pub fn encode(&self) -> String {
        format!("{}{:016x}", self.prefix(), self.seq)
    }

    /// The key without its sequence ([`PREFIX_LEN`] characters): what a backend that assigns the
    /// sequence itself (Redis, inside its function) is given.
    pub fn prefix(&self) -> String {
        let p = !((self.priority as u32) ^ 0x8000_0000);
        format!("{p:08x}{:012x}", self.time_ms)
    }

    /// Parses [`OrderKey::encode`]'s output (the first 36 characters of `s`).
    pub fn decode(s: &str) -> Option<Self> {
        let s = s.get(..ENCODED_LEN)?;
        let p = u32::from_str_radix(&s[..8], 16).ok()?;
        let time_ms = i64::from_str_radix(&s[8..PREFIX_LEN], 16).ok()?;
        let seq = u64::from_str_radix(&s[PREFIX_LEN..], 16).ok()?;
        Some(Self { priority: (!p ^ 0x8000_0000) as i32, time_ms, seq })
    }
}

impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.time_ms.cmp(&other.time_ms))
            .then(self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// 2000-01-01 .. 2100-01-01 in ms: a century of timestamps.
    const Y2000: i64 = 946_684_800_000;
    const Y2100: i64 = 4_102_444_800_000;

    fn key() -> impl Strategy<Value = OrderKey> {
        (any::<i32>(), Y2000..Y2100, any::<u64>()).prop_map(|(p, t, s)| OrderKey::new(p, t, s))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn byte_order_is_key_order(a in key(), b in key()) {
            prop_assert_eq!(a.encode().as_bytes().cmp(b.encode().as_bytes()), a.cmp(&b));
        }

        #[test]
        fn neighbours_never_tie(p in any::<i32>(), t in Y2000..Y2100, s in 0u64..u64::MAX) {
            // Adjacent values of each component must still order strictly.
            let base = OrderKey::new(p, t, s);
            prop_assert!(base.encode() < OrderKey::new(p, t, s + 1).encode());
            prop_assert!(base.encode() < OrderKey::new(p, t + 1, 0).encode());
            if p > i32::MIN {
                prop_assert!(base.encode() < OrderKey::new(p - 1, Y2000, 0).encode());
            }
        }

        #[test]
        fn a_key_decodes_to_itself(k in key()) {
            let enc = k.encode();
            prop_assert_eq!(enc.len(), ENCODED_LEN);
            prop_assert_eq!(OrderKey::decode(&enc), Some(k));
        }
    }

    #[test]
    fn extreme_priorities_and_times_still_order_and_decode() {
        let hi = OrderKey::new(i32::MAX, MAX_TIME_MS, u64::MAX);
        let lo = OrderKey::new(i32::MIN, 0, 0);
        assert!(hi.encode() < lo.encode(), "higher priority sorts first");
        assert!(OrderKey::new(0, 0, 0).encode() < OrderKey::new(-1, 0, 0).encode());
        assert_eq!(OrderKey::new(0, -5, 0).time_ms, 0);
        assert_eq!(OrderKey::decode(&hi.encode()), Some(hi));
    }
}
