//! The machine of `fleetq up` without real services: N workers whose connectors simulate the named
//! services (steps, durations with jitter, a failure rate), so the whole fleet — claims, progress,
//! retries, the monitor — can be seen and measured on any laptop.

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::Broker;
use fleetq_connectors::Connector;
use fleetq_connectors::simulation::{Simulation, SimulationConfig};
use fleetq_core::{Capabilities, WorkerRegistration};
use fleetq_worker::{Worker, WorkerConfig};

use crate::{Machine, MachineError};

/// What the simulated machine is made of.
#[derive(Debug, Clone)]
pub struct SimulatedMachine {
    /// The machine's id; worker `i` is `<machine_id>-gpu<i>`.
    pub machine_id: String,
    /// How many workers.
    pub workers: usize,
    /// The services every worker simulates.
    pub services: Vec<String>,
    /// Progress steps per job.
    pub steps: u32,
    /// Duration of one step (ms).
    pub step_ms: u64,
    /// Spread of job durations (0–1).
    pub jitter: f64,
    /// Share of attempts (0–1) that fail with a retryable error.
    pub failure_rate: f64,
    /// What matching sees of every worker.
    pub capabilities: Capabilities,
    /// How long a running job may finish after a stop was asked.
    pub shutdown_grace: Duration,
}

impl Default for SimulatedMachine {
    fn default() -> Self {
        Self {
            machine_id: "local".into(),
            workers: 2,
            services: vec!["simulation".into()],
            steps: 10,
            step_ms: 300,
            jitter: 0.2,
            failure_rate: 0.0,
            capabilities: Capabilities::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl SimulatedMachine {
    /// Builds the machine's workers against `broker` (no I/O yet: [`Machine::run`] starts them).
    pub fn build<B: Broker>(&self, broker: Arc<B>) -> Result<Machine<B>, MachineError> {
        let mut workers = Vec::with_capacity(self.workers);
        for i in 0..self.workers {
            let connectors: Vec<Arc<dyn Connector>> = self
                .services
                .iter()
                .map(|s| {
                    Arc::new(Simulation::new(SimulationConfig {
                        service: s.trim().to_owned(),
                        steps: self.steps.max(1),
                        step_ms: self.step_ms,
                        jitter: self.jitter,
                        failure_rate: self.failure_rate,
                        ..SimulationConfig::default()
                    })) as Arc<dyn Connector>
                })
                .collect();
            let registration = WorkerRegistration {
                worker_id: format!("{}-gpu{i}", self.machine_id),
                machine_id: self.machine_id.clone(),
                services: Vec::new(),
                capabilities: self.capabilities.clone(),
            };
            let mut config = WorkerConfig::new(registration);
            config.shutdown_grace = self.shutdown_grace;
            workers.push(Arc::new(Worker::new(broker.clone(), connectors, config)?));
        }
        let description = format!("{} simulated workers", self.workers);
        Ok(Machine::new(broker, self.machine_id.clone(), workers, Some(description)))
    }
}

#[cfg(test)]
mod tests {
    use fleetq_broker::embedded::EmbeddedBroker;
    use fleetq_broker::testing::test_config;
    use fleetq_broker::{Queue, Read};
    use fleetq_connectors::CancellationToken;
    use fleetq_core::{JobSpec, JobStatus, MachinePhase};

    use super::*;

    /// The machine runs its workers, which run jobs, and the fleet sees it start, get ready, stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_simulated_machine_runs_jobs_and_reports_its_life() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = Arc::new(EmbeddedBroker::open(dir.path().join("m.db"), test_config()).expect("open"));
        let spec = SimulatedMachine {
            machine_id: "box1".into(),
            step_ms: 1,
            steps: 2,
            ..SimulatedMachine::default()
        };
        let machine = spec.build(broker.clone()).expect("build");
        assert_eq!(machine.worker_count(), 2);
        let stop = CancellationToken::new();
        let running = tokio::spawn(machine.run(stop.clone()));
        let id = broker.submit(JobSpec::new("simulation", serde_json::json!({}))).await.expect("submit").id;
        let mut done = false;
        for _ in 0..500 {
            let status = broker.job(&id).await.expect("job").expect("exists").summary.status;
            if status == JobStatus::Completed {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(done, "a worker of the machine ran the job");
        let machines = broker.machines().await.expect("machines");
        assert_eq!(machines[0].phase, MachinePhase::Ready);
        let workers = broker.workers().await.expect("workers");
        let ids: Vec<&str> = workers.iter().map(|w| w.registration.worker_id.as_str()).collect();
        assert_eq!(ids, ["box1-gpu0", "box1-gpu1"]);
        stop.cancel();
        running.await.expect("task").expect("ran");
        assert_eq!(broker.machines().await.expect("machines")[0].phase, MachinePhase::Stopped);
        assert!(broker.workers().await.expect("workers").is_empty(), "the drained workers deregistered");
    }
}
