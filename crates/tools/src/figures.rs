//! What the benchmarks share: the broker they run on and how a list of latencies is summarized.

use serde_json::{Value, json};

/// The broker a benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The embedded store (SQLite) in a temporary directory.
    Embedded,
    /// The Redis `--redis` names.
    Redis,
}

/// Which broker a benchmark runs on, as flags (`--backend`, `--redis`).
#[derive(Debug, Clone, clap::Args)]
pub struct On {
    /// Which backend to measure.
    #[arg(long, value_enum, default_value = "embedded")]
    pub backend: Backend,
    /// Redis to use with `--backend redis` (a broker benchmark leaves its data under
    /// `fleetq:{bench-…}:` unless --flushdb). Not HUB_REDIS_URL: a benchmark may flush its
    /// database, so it never picks up the fleet's Redis from the environment.
    #[arg(
        long = "redis",
        visible_alias = "redis-url",
        env = "FLEETQ_BENCH_REDIS",
        default_value = "redis://127.0.0.1:6390/"
    )]
    pub redis_url: String,
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
