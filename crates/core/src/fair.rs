//! Fair share between customers: among jobs of equal effective priority, customers take turns —
//! weighted round robin, FIFO inside a customer — instead of strict submission order. A queue
//! setting; off keeps the exact order of [`crate::order`].
//!
//! The rule is start-time fair queueing with unit-cost jobs, applied once, when a job is
//! submitted, so the result is just the time component of its [`crate::OrderKey`] and every index
//! that sorts by order key (claims, positions, listings) follows it unchanged:
//! - each service has a virtual time `V`: the largest start tag among the jobs claimed so far;
//! - each (service, customer) has a finish tag `F`: where its next job may start;
//! - a job's start tag is `S = max(F, V)`, and then `F = S + ROUND / weight`.
//!
//! A customer with nothing pending starts at `V`, right behind the jobs being claimed now, so one
//! customer's backlog delays another's single job by at most the jobs already started (one per
//! worker). A customer's jobs are `ROUND / weight` apart, so backlogged customers are served in
//! proportion to their weights. A workflow's later steps take the start tag of its first step
//! (they keep the workflow's place) and do not advance `F`. Jobs without a customer share the
//! customer `""`.
//!
//! Tags are integers in units of `1 / ROUND` of a turn; the key's time component is `S / UNIT`
//! (ms-sized, so a turn is 1,000 of them). `V` starts, on a service's first fair submission, at its
//! head's time (or now), so jobs keyed by submission time before the setting was turned on keep
//! their place relative to the new ones.

use crate::order::MAX_TIME_MS;

/// Tag units per turn at weight 1.
pub const ROUND: u64 = 1_000_000;
/// Tag units per unit of the order key's time component.
pub const UNIT: u64 = 1_000;
/// The largest customer weight.
pub const MAX_WEIGHT: u32 = 1_000;

/// The start tag of a customer's next job: `max(F, V)`.
pub fn start_tag(finish: u64, virtual_time: u64) -> u64 {
    finish.max(virtual_time)
}

/// The customer's finish tag after a job started at `start` with `weight` (clamped to
/// `1..=MAX_WEIGHT`).
pub fn finish_tag(start: u64, weight: u32) -> u64 {
    start.saturating_add(ROUND / u64::from(weight.clamp(1, MAX_WEIGHT)))
}

/// The order key's time component for a start tag (clamped into the encodable range).
pub fn key_time(start: u64) -> i64 {
    i64::try_from(start / UNIT).unwrap_or(MAX_TIME_MS).min(MAX_TIME_MS)
}

/// The start tag a key's time component stands for (a claimed job moves `V` to it).
pub fn tag_of_key_time(time_ms: i64) -> u64 {
    u64::try_from(time_ms.max(0)).unwrap_or(0).saturating_mul(UNIT)
}

/// The start tag `V` begins at on a service's first fair submission: its head's key time, or now.
pub fn initial_virtual_time(head_time_ms: Option<i64>, now_ms: i64) -> u64 {
    tag_of_key_time(head_time_ms.unwrap_or(now_ms))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::OrderKey;

    /// One service's fair queue as a broker keeps it: tags assigned at submission, claims in key
    /// order, `V` moved by each claim.
    #[derive(Default)]
    struct Model {
        v: Option<u64>,
        finish: HashMap<String, u64>,
        workflows: HashMap<String, i64>,
        weights: HashMap<String, u32>,
        /// (order key, customer, label)
        pending: BTreeSet<(String, String, usize)>,
        seq: u64,
    }

    impl Model {
        fn submit(&mut self, customer: &str, priority: i32, workflow: Option<&str>, now: i64, label: usize) {
            let head =
                self.pending.iter().next().and_then(|(k, _, _)| OrderKey::decode(k)).map(|k| k.time_ms);
            let v = *self.v.get_or_insert_with(|| initial_virtual_time(head, now));
            let time = match workflow.and_then(|w| self.workflows.get(w)) {
                Some(t) => *t,
                None => {
                    let f = self.finish.get(customer).copied().unwrap_or(0);
                    let s = start_tag(f, v);
                    let w = self.weights.get(customer).copied().unwrap_or(1);
                    self.finish.insert(customer.to_owned(), finish_tag(s, w));
                    let t = key_time(s);
                    if let Some(w) = workflow {
                        self.workflows.insert(w.to_owned(), t);
                    }
                    t
                }
            };
            self.seq += 1;
            let key = OrderKey::new(priority, time, self.seq).encode();
            self.pending.insert((key, customer.to_owned(), label));
        }

        fn claim(&mut self) -> Option<(String, usize)> {
            let first = self.pending.iter().next().cloned()?;
            self.pending.remove(&first);
            let tag = tag_of_key_time(OrderKey::decode(&first.0).map_or(0, |k| k.time_ms));
            self.v = Some(self.v.map_or(tag, |v| v.max(tag)));
            Some((first.1, first.2))
        }
    }

    const NOW: i64 = 1_764_000_000_000;

    #[derive(Debug, Clone)]
    enum Op {
        Submit { customer: u8, burst: u16 },
        Claim { n: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 1u16..300).prop_map(|(customer, burst)| Op::Submit { customer, burst }),
            (1u8..40).prop_map(|n| Op::Claim { n }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Within a customer, jobs are claimed in submission order.
        #[test]
        fn fifo_inside_a_customer(ops in prop::collection::vec(op(), 1..60)) {
            let mut m = Model::default();
            let mut label = 0;
            let mut last: BTreeMap<String, usize> = BTreeMap::new();
            let mut check = |claimed: Option<(String, usize)>| -> Result<(), TestCaseError> {
                if let Some((c, l)) = claimed
                    && let Some(prev) = last.insert(c.clone(), l)
                {
                    prop_assert!(prev < l, "customer {} got {} after {}", c, l, prev);
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Submit { customer, burst } => {
                        for _ in 0..burst {
                            m.submit(&format!("c{customer}"), 0, None, NOW, label);
                            label += 1;
                        }
                    }
                    Op::Claim { n } => {
                        for _ in 0..n {
                            check(m.claim())?;
                        }
                    }
                }
            }
            while let Some(c) = m.claim() {
                check(Some(c))?;
            }
        }

        /// A customer's single job waits behind at most one job of another customer's backlog,
        /// however large, whatever part of it was claimed already (the jobs claimed meanwhile are
        /// the workers' current ones: one per worker).
        #[test]
        fn a_backlog_does_not_delay_another_customer(backlog in 1usize..5_000, started in 0usize..200) {
            let mut m = Model::default();
            for i in 0..backlog {
                m.submit("big", 0, None, NOW, i);
            }
            let started = started.min(backlog);
            for _ in 0..started {
                m.claim();
            }
            m.submit("small", 0, None, NOW, usize::MAX);
            let mut ahead = 0;
            loop {
                let (c, _) = m.claim().expect("the small job is pending");
                if c == "small" { break }
                ahead += 1;
            }
            prop_assert!(ahead <= 1, "{} big jobs went first", ahead);
        }

        /// Backlogged customers are served in proportion to their weights, within a turn each.
        #[test]
        fn turns_follow_weights(weights in prop::collection::vec(1u32..8, 2..5), claims in 50usize..400) {
            let mut m = Model::default();
            for (i, w) in weights.iter().enumerate() {
                m.weights.insert(format!("c{i}"), *w);
            }
            let total: u32 = weights.iter().sum();
            let per = claims + 10;
            for k in 0..per {
                for i in 0..weights.len() {
                    m.submit(&format!("c{i}"), 0, None, NOW, k);
                }
            }
            let mut got: HashMap<String, usize> = HashMap::new();
            for _ in 0..claims {
                let (c, _) = m.claim().expect("backlogged");
                *got.entry(c).or_default() += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let want = claims as f64 * f64::from(*w) / f64::from(total);
                let have = got.get(&format!("c{i}")).copied().unwrap_or(0) as f64;
                // Each customer is at most about one turn off its share: the bound is one job per
                // customer in the race.
                prop_assert!((have - want).abs() <= weights.len() as f64 + 1.0,
                    "customer c{} (weight {}) got {} of {}, want ~{:.1}", i, w, have, claims, want);
            }
        }
    }

    #[test]
    fn priority_still_comes_first_and_workflows_keep_their_place() {
        let mut m = Model::default();
        for i in 0..10 {
            m.submit("a", 0, None, NOW, i);
        }
        m.submit("b", 0, Some("wf"), NOW, 100);
        m.submit("b", 5, None, NOW, 200);
        assert_eq!(m.claim().map(|c| c.1), Some(200), "higher priority first");
        assert_eq!(m.claim().map(|c| c.1), Some(0));
        assert_eq!(m.claim().map(|c| c.1), Some(100), "b's turn");
        // The workflow's second step keeps the first step's place: ahead of a's backlog.
        m.submit("b", 0, Some("wf"), NOW, 101);
        assert_eq!(m.claim().map(|c| c.1), Some(101));
        assert_eq!(m.claim().map(|c| c.1), Some(1));
    }

    #[test]
    fn tags_stay_in_range() {
        assert_eq!(finish_tag(u64::MAX, 1), u64::MAX);
        assert_eq!(finish_tag(0, 0), ROUND, "weight 0 counts as 1");
        assert_eq!(finish_tag(0, 5_000), ROUND / u64::from(MAX_WEIGHT));
        assert_eq!(key_time(u64::MAX), MAX_TIME_MS);
        assert_eq!(tag_of_key_time(-5), 0);
        assert_eq!(initial_virtual_time(None, 7), 7 * UNIT);
    }
}
