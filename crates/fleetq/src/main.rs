//! The `fleetq` command line: wiring only. Each subcommand parses its flags and calls into the
//! library crates.

mod bench;
mod explain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fleetq: a job queue and fleet control plane for AI generation work.
#[derive(Debug, Parser)]
#[command(name = "fleetq", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Explains whether a worker may serve a job: prints {"matches": bool, "reasons": [...]}.
    Explain(explain::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Explain(args) => explain::run(&args),
        Command::Bench(b) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fleetq: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(bench::run(b)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fleetq bench: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
