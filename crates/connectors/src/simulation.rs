//! The simulation connector: a stand-in service with configurable steps, step duration (and its
//! spread across jobs), failure rate and health flapping, for tests, benchmarks, `fleetq up` and
//! `NAME-sim` services.
//!
//! A job's payload may steer one run (all optional): `{"steps": 5, "step_ms": 20,
//! "fail": "retryable" | "fatal", "hang_at_step": 3, "hang_on_attempt": 1, "note": …}` (`note`
//! is ignored: a tag or padding); any other key is
//! refused, naming these. A hanging job stops reporting progress and waits for cancellation, as a
//! stuck service would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetq_core::{FailureCategory, JobRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{CancellationToken, Health, JobError, ProgressSink, Service};

/// The keys a simulation payload may hold; anything else is refused, naming these.
pub const PAYLOAD_KEYS: [&str; 6] = ["steps", "step_ms", "fail", "hang_at_step", "hang_on_attempt", "note"];

/// Refuses a payload the simulation would otherwise silently ignore (`{"fail": true}`, a ComfyUI
/// workflow sent to a simulated `comfyui`): not an object, an unknown key, or a value of the wrong
/// kind — fatal, naming the field and what is accepted.
fn check_payload(p: &Value) -> Result<(), JobError> {
    let refuse = |m: String| Err(JobError::fatal(FailureCategory::Validation, m));
    let obj = match p {
        Value::Null => return Ok(()),
        Value::Object(o) => o,
        _ => return refuse("payload: a simulation takes an object (or nothing)".into()),
    };
    for (k, v) in obj {
        let ok = match k.as_str() {
            "fail" => matches!(v.as_str(), Some("retryable" | "fatal")),
            "steps" | "step_ms" | "hang_at_step" | "hang_on_attempt" => v.is_u64(),
            // Anything, ignored: to tag or pad a job in tests and benchmarks.
            "note" => true,
            _ => {
                return refuse(format!(
                    "payload.{k}: not a simulation setting (this service is simulated; it accepts {})",
                    PAYLOAD_KEYS.join(", ")
                ));
            }
        };
        if !ok {
            let want = if k == "fail" { "\"retryable\" or \"fatal\"" } else { "a whole number" };
            return refuse(format!("payload.{k}: {v} given; {want} expected"));
        }
    }
    Ok(())
}

/// The longest simulated step a payload may ask for (ms): a step of `u64::MAX` would hold a
/// worker for ever.
pub const MAX_STEP_MS: u64 = 60_000;

/// Defaults of a simulated service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulationConfig {
    /// The service name served (`simulation`, `comfyui-sim`, …).
    pub service: String,
    /// Progress steps per job.
    pub steps: u32,
    /// Duration of one step.
    pub step_ms: u64,
    /// Share of jobs (0–1) that fail with a retryable error, chosen deterministically per attempt.
    pub failure_rate: f64,
    /// Spread of a job's duration: each job's steps last `step_ms × (1 ± jitter)`, uniformly and
    /// deterministically per job (0 = every job alike).
    pub jitter: f64,
    /// Health flapping: every `flap_every_ms` the service goes `offline` for `flap_down_ms`.
    pub flap_every_ms: Option<u64>,
    /// How long each flap lasts.
    pub flap_down_ms: u64,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            service: "simulation".into(),
            steps: 10,
            step_ms: 100,
            failure_rate: 0.0,
            jitter: 0.0,
            flap_every_ms: None,
            flap_down_ms: 1000,
        }
    }
}

/// The simulation connector.
#[derive(Debug)]
pub struct Simulation {
    config: SimulationConfig,
    healthy: AtomicBool,
    born: tokio::time::Instant,
}

impl Simulation {
    /// A healthy simulated service.
    pub fn new(config: SimulationConfig) -> Self {
        Self { config, healthy: AtomicBool::new(true), born: tokio::time::Instant::now() }
    }

    /// Makes the service look down (`offline`) or back up, as health flapping would.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Up unless switched off or inside a flap window.
    fn is_up(&self) -> bool {
        if !self.healthy.load(Ordering::SeqCst) {
            return false;
        }
        match self.config.flap_every_ms {
            Some(every) if every > 0 => {
                let t = self.born.elapsed().as_millis() as u64 % every;
                t + self.config.flap_down_ms.min(every) < every
            }
            _ => true,
        }
    }
}

/// A deterministic number in [0, 1) from a job id and attempt (FNV-1a), so failures reproduce.
fn roll(id: &str, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(attempt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl Service for Simulation {
    fn name(&self) -> &str {
        &self.config.service
    }

    async fn check(&self) -> Health {
        if self.is_up() { Health::idle() } else { Health::offline("simulated outage") }
    }

    async fn run(
        &self,
        job: &JobRecord,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        {
            if !self.is_up() {
                return Err(JobError::retryable(FailureCategory::Connection, "simulated service is offline"));
            }
            let p = &job.spec.payload;
            check_payload(p)?;
            let get = |k: &str| p.get(k).and_then(Value::as_u64);
            let steps = get("steps").map_or(self.config.steps, |n| n.min(10_000) as u32).max(1);
            let step_ms = get("step_ms").unwrap_or(self.config.step_ms);
            if step_ms > MAX_STEP_MS {
                return Err(JobError::fatal(
                    FailureCategory::Validation,
                    format!("payload.step_ms: {step_ms} is over the simulation's limit of {MAX_STEP_MS} ms"),
                ));
            }
            let base = step_ms as f64;
            // A per-job factor in [1 - jitter, 1 + jitter], fixed by the job id.
            let spread = self.config.jitter.clamp(0.0, 1.0) * (2.0 * roll(&job.summary.id.0, 0) - 1.0);
            let step = Duration::from_secs_f64((base * (1.0 + spread)).max(0.0) / 1000.0);
            let attempt = job.summary.attempt;
            let hang_at = get("hang_at_step")
                .filter(|_| get("hang_on_attempt").is_none_or(|a| a == u64::from(attempt)));
            let interrupted = || JobError::retryable(FailureCategory::Service, "interrupted");
            for i in 1..=steps {
                if hang_at == Some(u64::from(i)) {
                    cancel.cancelled().await;
                    return Err(interrupted());
                }
                tokio::select! {
                    () = tokio::time::sleep(step) => {}
                    () = cancel.cancelled() => return Err(interrupted()),
                }
                progress.report(f64::from(i) * 100.0 / f64::from(steps), Some(format!("step {i}/{steps}")));
            }
            match p.get("fail").and_then(Value::as_str) {
                Some("fatal") => {
                    return Err(JobError::fatal(FailureCategory::Validation, "simulated fatal failure"));
                }
                Some(_) => {
                    return Err(JobError::retryable(FailureCategory::Service, "simulated failure"));
                }
                None => {}
            }
            if roll(&job.summary.id.0, attempt) < self.config.failure_rate {
                return Err(JobError::retryable(FailureCategory::Service, "simulated random failure"));
            }
            Ok(json!({"simulated": true, "steps": steps}))
        }
    }
}

impl Simulation {}

#[cfg(test)]
mod tests {
    use crate::Connector;
    use fleetq_core::{ConnectorStatus, JobId, JobSpec, JobSummary};

    use super::*;

    fn job(payload: Value, attempt: u32) -> JobRecord {
        let spec = JobSpec::new("simulation", payload);
        let mut summary = JobSummary::new_pending(JobId("j".into()), &spec, 0);
        summary.attempt = attempt;
        JobRecord { summary, spec, outcome: None, history: Vec::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_every_step_then_succeeds() {
        let sim = Simulation::new(SimulationConfig::default());
        let (sink, mut rx) = ProgressSink::channel();
        let out =
            sim.process(&job(json!({"steps": 4, "step_ms": 50}), 1), sink, CancellationToken::new()).await;
        assert_eq!(out, Ok(json!({"simulated": true, "steps": 4})));
        let mut seen = Vec::new();
        while let Ok((p, _)) = rx.try_recv() {
            seen.push(p);
        }
        assert_eq!(seen, vec![25.0, 50.0, 75.0, 100.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn hangs_until_cancelled_only_on_the_chosen_attempt() {
        let sim = Simulation::new(SimulationConfig::default());
        let cancel = CancellationToken::new();
        let payload = json!({"steps": 3, "step_ms": 10, "hang_at_step": 2, "hang_on_attempt": 1});
        let j1 = job(payload.clone(), 1);
        let run = sim.process(&j1, ProgressSink::channel().0, cancel.clone());
        let (out, ()) = tokio::join!(run, async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            cancel.cancel();
        });
        assert!(out.is_err_and(|e| e.retryable && e.message == "interrupted"));
        let j2 = job(payload, 2);
        assert!(sim.process(&j2, ProgressSink::channel().0, CancellationToken::new()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_typed_and_outages_reported() {
        let sim = Simulation::new(SimulationConfig { step_ms: 1, ..SimulationConfig::default() });
        let (sink, _rx) = ProgressSink::channel();
        let forever = job(json!({"step_ms": u64::MAX}), 1);
        let e = sim.process(&forever, sink, CancellationToken::new()).await.expect_err("refused");
        assert_eq!((e.category, e.retryable), (FailureCategory::Validation, false));
        assert!(e.message.contains("payload.step_ms"), "{}", e.message);
        for (bad, field) in [
            (json!({"fail": true}), "payload.fail"),
            (json!({"prompt": {}}), "payload.prompt"),
            (json!([1]), "payload"),
        ] {
            let e = sim
                .process(&job(bad, 1), ProgressSink::channel().0, CancellationToken::new())
                .await
                .expect_err("refused");
            assert!(!e.retryable && e.message.starts_with(field), "{}", e.message);
        }
        let failing = job(json!({"fail": "fatal"}), 1);
        let fatal = sim.process(&failing, ProgressSink::channel().0, CancellationToken::new());
        assert!(fatal.await.is_err_and(|e| !e.retryable));
        sim.set_healthy(false);
        assert_eq!(sim.health().await.status, ConnectorStatus::Offline);
        let plain = job(json!({}), 1);
        let down = sim.process(&plain, ProgressSink::channel().0, CancellationToken::new());
        assert!(down.await.is_err_and(|e| e.retryable && e.category == FailureCategory::Connection));
    }

    #[tokio::test(start_paused = true)]
    async fn health_flaps_on_schedule() {
        let config =
            SimulationConfig { flap_every_ms: Some(1000), flap_down_ms: 200, ..SimulationConfig::default() };
        let sim = Simulation::new(config);
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(sim.health().await.status == ConnectorStatus::Offline);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // The last 200 ms of every second are down.
        assert_eq!(seen, [false, false, false, false, false, false, false, false, true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_durations_per_job() {
        let config = SimulationConfig { jitter: 0.5, step_ms: 100, steps: 1, ..SimulationConfig::default() };
        let sim = Simulation::new(config);
        let mut took = Vec::new();
        for i in 0..20 {
            let mut j = job(json!({}), 1);
            j.summary.id = JobId(format!("job-{i}"));
            let start = tokio::time::Instant::now();
            assert!(sim.process(&j, ProgressSink::channel().0, CancellationToken::new()).await.is_ok());
            took.push(start.elapsed().as_millis());
        }
        assert!(took.iter().all(|t| (50..=150).contains(t)), "{took:?}");
        assert!(took.iter().max() > took.iter().min(), "durations differ: {took:?}");
    }

    #[test]
    fn failure_rate_is_deterministic_and_roughly_right() {
        let failing = (0..10_000).filter(|i| roll(&format!("job-{i}"), 1) < 0.2).count();
        assert!((1_700..2_300).contains(&failing), "{failing}");
        assert_eq!(roll("x", 1), roll("x", 1));
        assert_ne!(roll("x", 1), roll("x", 2));
    }
}
