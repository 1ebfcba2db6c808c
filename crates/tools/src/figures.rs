//! What the benchmarks share: the broker they run on and how a list of latencies is summarized.

use serde_json::{Value, json};

/// The broker a benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The embedded store (SQLite) in a temporary directory.
    Embedded,
    /// The Redis of `FLEETQ_BENCH_REDIS` (flushed).
    Redis,
}

/// Latencies (ms) as `{n, p50_ms, p90_ms, p99_ms, max_ms}` (nearest rank), `null` when empty.
pub(crate) fn summarize(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        let x = v[i.clamp(1, v.len()) - 1];
        (x * 1000.0).round() / 1000.0
    };
    json!({"n": v.len(), "p50_ms": pct(50.0), "p90_ms": pct(90.0), "p99_ms": pct(99.0), "max_ms": pct(100.0)})
}
