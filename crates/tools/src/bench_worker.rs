//! `fleetq bench worker`: how fast what a worker knows reaches the broker, the place `/api/workers`
//! and the job routes read from. One worker over a real broker (embedded, or Redis with
//! `--backend redis`) with a 120 s health interval, so no figure can come from the health timer.
//! Each figure is a JSON line with p50/p90/p99/max over `--tries`:
//!
//! - `activity`: a simulated job's start (first read seeing it running) → its connector `active`;
//! - `cancel`: a quiet job (no progress, nothing to renew on) cancelled → `cancelled`;
//! - `offline`: a mock ComfyUI killed → its connector `offline` (and no service advertised);
//! - `recovered`: the mock started again on its port → `idle` without the reconnecting note.
//!
//! Reads poll the broker every `--poll-us`: a figure's resolution is one poll plus one read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleetq_broker::Broker;
use fleetq_connectors::CancellationToken;
use fleetq_connectors::Connector;
use fleetq_connectors::comfyui::{ComfyUi, ComfyUiConfig};
use fleetq_connectors::simulation::{Simulation, SimulationConfig};
use fleetq_core::{ConnectorStatus, JobId, JobSpec, JobStatus, WorkerInfo, WorkerRegistration};
use fleetq_mocks::comfyui::{ComfyMock, ComfyMockConfig};
use fleetq_worker::{Worker, WorkerConfig};
use serde_json::json;

/// Flags of `fleetq bench worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    on: crate::figures::On,
    /// Tries per figure.
    #[arg(long, default_value_t = 20)]
    tries: usize,
    /// Pause between two reads of the broker, in microseconds.
    #[arg(long, default_value_t = 1000)]
    poll_us: u64,
}

pub(crate) async fn run(args: WorkerArgs) -> Result<()> {
    if args.tries == 0 || args.tries > 10_000 {
        bail!("--tries must be 1 to 10000");
    }
    let poll = Duration::from_micros(args.poll_us.clamp(10, 1_000_000));
    match args.on.backend {
        crate::figures::Backend::Embedded => {
            let dir = tempfile::tempdir()?;
            let broker = fleetq_broker::embedded::EmbeddedBroker::open(
                dir.path().join("bench.db"),
                fleetq_broker::BrokerConfig::default(),
            )?;
            measure(Arc::new(broker), "embedded", args.tries, poll).await
        }
        crate::figures::Backend::Redis => {
            let queue = format!("bench-worker-{}", std::process::id());
            let broker = fleetq_broker::redis::RedisBroker::connect(
                &args.on.redis_url,
                &queue,
                fleetq_broker::BrokerConfig::default(),
            )
            .await?;
            measure(Arc::new(broker), "redis", args.tries, poll).await
        }
    }
}

/// A worker task over `connectors`, with a health interval no figure can come from.
fn start<B: Broker>(
    broker: &Arc<B>,
    id: &str,
    connectors: Vec<Arc<dyn Connector>>,
) -> Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let registration = WorkerRegistration {
        worker_id: id.into(),
        machine_id: "bench".into(),
        services: Vec::new(),
        capabilities: fleetq_core::Capabilities::default(),
    };
    let mut config = WorkerConfig::new(registration);
    config.health_every = Duration::from_secs(120);
    let worker = Arc::new(Worker::new(broker.clone(), connectors, config)?);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            if let Err(e) = worker.run(stop).await {
                tracing::warn!(error = %e, "bench worker stopped");
            }
        }
    });
    Ok((stop, task))
}

/// Polls `read` until it returns `Some`, within 30 s.
async fn until<T, F, Fut>(poll: Duration, what: &str, mut read: F) -> Result<(T, Instant)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = read().await? {
            return Ok((v, Instant::now()));
        }
        if Instant::now() > give_up {
            bail!("{what} was not seen within 30 s");
        }
        tokio::time::sleep(poll).await;
    }
}

async fn report_of<B: Broker>(
    b: &B,
    worker: &str,
    service: &str,
) -> Result<Option<(WorkerInfo, ConnectorStatus)>> {
    let w = b.workers().await?.into_iter().find(|w| w.registration.worker_id == worker);
    Ok(w.and_then(|w| {
        let status = w.connectors.get(service)?.status;
        Some((w, status))
    }))
}

async fn status_of<B: Broker>(b: &B, id: &JobId) -> Result<JobStatus> {
    Ok(b.job(id).await?.context("job vanished")?.summary.status)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn line(backend: &str, figure: &str, samples: Vec<f64>) {
    crate::report(
        &json!({"bench": "worker", "backend": backend, "figure": figure, "latency": crate::figures::summarize(samples)})
            .to_string(),
    );
}

async fn measure<B: Broker>(b: Arc<B>, backend: &str, tries: usize, poll: Duration) -> Result<()> {
    // Activity and cancel, with the simulation connector.
    let sim: Arc<dyn Connector> = Arc::new(Simulation::new(SimulationConfig::default()));
    let (stop, task) = start(&b, "bench-sim", vec![sim])?;
    until(poll, "the simulation connector idle", || async {
        Ok(report_of(b.as_ref(), "bench-sim", "simulation").await?.filter(|r| r.1 == ConnectorStatus::Idle))
    })
    .await?;
    let (mut activity, mut cancel) = (Vec::new(), Vec::new());
    for _ in 0..tries {
        let id = b.submit(JobSpec::new("simulation", json!({"hang_at_step": 1}))).await?.id;
        let (_, running) = until(poll, "the job running", || async {
            Ok(status_of(b.as_ref(), &id).await?.is_running().then_some(()))
        })
        .await?;
        let (_, active) = until(poll, "the connector active", || async {
            Ok(report_of(b.as_ref(), "bench-sim", "simulation")
                .await?
                .filter(|r| r.1 == ConnectorStatus::Active))
        })
        .await?;
        activity.push(ms(active.saturating_duration_since(running)));
        let asked = Instant::now();
        b.cancel(&id).await?;
        let (_, done) = until(poll, "the job cancelled", || async {
            Ok((status_of(b.as_ref(), &id).await? == JobStatus::Cancelled).then_some(()))
        })
        .await?;
        cancel.push(ms(done - asked));
        until(poll, "the connector idle again", || async {
            Ok(report_of(b.as_ref(), "bench-sim", "simulation")
                .await?
                .filter(|r| r.1 == ConnectorStatus::Idle))
        })
        .await?;
    }
    stop.cancel();
    let _ = task.await;
    line(backend, "activity", activity);
    line(backend, "cancel", cancel);

    // A ComfyUI that dies and comes back.
    let mut mock = ComfyMock::start(ComfyMockConfig::default()).await?;
    let addr: SocketAddr = mock.addr();
    let comfy: Arc<dyn Connector> =
        Arc::new(ComfyUi::new(ComfyUiConfig { url: mock.url(), ..ComfyUiConfig::default() })?);
    let (stop, task) = start(&b, "bench-comfy", vec![comfy])?;
    let up = |r: &(WorkerInfo, ConnectorStatus)| {
        r.1 == ConnectorStatus::Idle
            && r.0.connectors.get("comfyui").is_some_and(|c| c.message.is_none())
            && r.0.registration.services == ["comfyui"]
    };
    until(poll, "ComfyUI idle", || async {
        Ok(report_of(b.as_ref(), "bench-comfy", "comfyui").await?.filter(up))
    })
    .await?;
    let (mut offline, mut recovered) = (Vec::new(), Vec::new());
    for _ in 0..tries {
        let killed = Instant::now();
        mock.stop().await;
        let (_, seen) = until(poll, "ComfyUI offline", || async {
            Ok(report_of(b.as_ref(), "bench-comfy", "comfyui")
                .await?
                .filter(|r| r.1 == ConnectorStatus::Offline && r.0.registration.services.is_empty()))
        })
        .await?;
        offline.push(ms(seen - killed));
        let restarted = Instant::now();
        mock = ComfyMock::start_on(addr, ComfyMockConfig::default()).await?;
        let (_, seen) = until(poll, "ComfyUI back", || async {
            Ok(report_of(b.as_ref(), "bench-comfy", "comfyui").await?.filter(up))
        })
        .await?;
        recovered.push(ms(seen - restarted));
    }
    stop.cancel();
    let _ = task.await;
    line(backend, "offline", offline);
    line(backend, "recovered", recovered);
    Ok(())
}
