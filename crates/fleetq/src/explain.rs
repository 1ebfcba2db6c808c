//! `fleetq explain --worker worker.json --job job.json`: why a job does (not) match a worker.
//! Exit 0 with the verdict either way; exit 2 with a message naming the problem on invalid input.

use crate::out::outln;
use std::path::PathBuf;
use std::process::ExitCode;

use fleetq_core::{Limits, WorkerRegistration, explain, parse_job_spec};

/// Flags of `fleetq explain`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The document a worker registers with (worker_id, machine_id, services, capabilities).
    #[arg(long)]
    worker: PathBuf,
    /// A job as `POST /api/jobs` accepts it (service, payload, requirements, …).
    #[arg(long)]
    job: PathBuf,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    match verdict(args) {
        Ok(json) => {
            outln!("{json}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("fleetq explain: {message}");
            ExitCode::from(2)
        }
    }
}

fn verdict(args: &Args) -> Result<String, String> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let worker_text = read(&args.worker)?;
    let worker: WorkerRegistration = serde_json::from_str(&worker_text)
        .map_err(|e| format!("{}: not a worker registration: {e}", args.worker.display()))?;
    worker.validate().map_err(|e| format!("{}: {e}", args.worker.display()))?;
    let job = parse_job_spec(&read(&args.job)?, &Limits::default())
        .map_err(|e| format!("{}: {e}", args.job.display()))?;
    serde_json::to_string(&explain(&worker, &job)).map_err(|e| e.to_string())
}
