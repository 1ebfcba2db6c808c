//! Serving: the services supervised (restarted by their policy, their changes mirrored into the
//! local status and onto the machine card) while the workers claim; then the shutdown — workers
//! drained, services stopped, `stopped` with each service's exit — or, on a second signal, every
//! service's process group killed at once.

use super::*;
use crate::service::Running;

/// The services under supervision.
pub(super) struct Supervision {
    /// One supervising task per service instance.
    supervised: tokio::task::JoinSet<()>,
    /// Mirrors the services' statuses into the local status and the machine card.
    mirror: tokio::task::JoinHandle<()>,
    /// Tells every supervising task to stop its service.
    services_stop: CancellationToken,
}

impl<B: Broker> Supervisor<B> {
    /// Supervises each instance (restarts by its policy) and mirrors their statuses.
    pub(super) fn supervise(
        &self,
        instances: Vec<Instance>,
        running: Vec<Running>,
        statuses: Vec<watch::Sender<ServiceStatus>>,
    ) -> Supervision {
        let services_stop = CancellationToken::new();
        let mut supervised = tokio::task::JoinSet::new();
        let mut receivers = Vec::new();
        for ((inst, r), tx) in instances.into_iter().zip(running).zip(statuses) {
            receivers.push(tx.subscribe());
            supervised.spawn(inst.supervise(r, self.spec.startup_timeout, services_stop.clone(), tx));
        }
        let mirror = {
            let status = self.status.clone();
            let mut receivers = receivers;
            let broker = self.broker.clone();
            let machine_id = self.spec.machine_id.clone();
            tokio::spawn(async move {
                let mut before: Vec<ServiceStatus> = Vec::new();
                loop {
                    let now: Vec<ServiceStatus> = receivers.iter().map(|r| r.borrow().clone()).collect();
                    // A service crashing, coming back or given up is news for the machine card.
                    for (i, svc) in now.iter().enumerate() {
                        let was = before.get(i).map(|b| b.phase);
                        if let Some(message) = service_news(was, svc) {
                            let event = note(&machine_id, message, broker.clock().now_ms());
                            if let Err(e) = broker.machine_event(event).await {
                                tracing::warn!(error = %e, "could not report a service's change");
                            }
                        }
                    }
                    status.send_modify(|s| s.services = now.clone());
                    before = now;
                    let changed = futures_any(&mut receivers).await;
                    if !changed {
                        return;
                    }
                }
            })
        };
        Supervision { supervised, mirror, services_stop }
    }

    /// Serves with `workers` until `stop`, then drains them and stops the services; `force` (a
    /// second signal) kills the services at once.
    pub(super) async fn serve(
        &self,
        workers: Vec<Arc<Worker<B>>>,
        supervision: Supervision,
        stop: CancellationToken,
        force: CancellationToken,
    ) -> Result<(), MachineError> {
        let Supervision { mut supervised, mirror, services_stop } = supervision;
        let machine = Machine::new(self.broker.clone(), self.spec.machine_id.clone(), workers, None);
        let status = self.status.clone();
        let forced = force.clone();
        let drained = async move {
            status.send_modify(|s| s.phase = "stopping".into());
            crate::notify::notify("STOPPING=1\nSTATUS=workers drained; stopping the services");
            services_stop.cancel();
            let stopping = async { while supervised.join_next().await.is_some() {} };
            tokio::select! {
                () = stopping => {}
                () = force.cancelled() => {}
            }
            mirror.abort();
            let exits: Vec<String> = status
                .borrow()
                .services
                .iter()
                .map(|s| format!("{} gpu{}: {}", s.name, s.gpu, s.last_exit.as_deref().unwrap_or("stopped")))
                .collect();
            status.send_modify(|s| s.phase = "stopped".into());
            Some(if exits.is_empty() {
                "shutdown requested".to_owned()
            } else {
                format!("shutdown requested; services {}", exits.join(", "))
            })
        };
        tokio::select! {
            ran = machine.run_then(stop, false, drained) => ran,
            () = forced.cancelled() => {
                // A second signal: no more waiting for running jobs (they come back when their
                // leases expire); every service's process group is killed now.
                let pids: Vec<u32> = self.status.borrow().services.iter().filter_map(|s| s.pid).collect();
                for pid in pids {
                    crate::service::kill_group(Some(pid), nix::sys::signal::Signal::SIGKILL);
                }
                self.status.send_modify(|s| s.phase = "stopped".into());
                let message = "forced stop (a second signal): services killed; running jobs come back when their leases expire";
                tracing::warn!("{message}");
                self.say(MachinePhase::Stopped, None, Some(message.into())).await
            }
        }
    }
}
