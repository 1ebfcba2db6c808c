//! The `fleetq` command line. The serving commands (`up`, `api`, `worker`, `machine`, `mock`)
//! parse their flags into the libraries' configurations and call their entry points; the client
//! commands (`submit`, `jobs`, `workers`, `services`) are calls of the client library and their
//! printing; `bench` and `chaos` are the tools crate's (the `tools` feature, on by default);
//! `explain` and `openapi` print what the libraries answer.

// Doc comments on clap fields are `--help` text, where `<…>` around a URL would be printed.
#![allow(rustdoc::bare_urls)]

mod client;
mod explain;
mod machine;
mod mock;
mod out;
mod redis_tls;
mod serve;
mod signal;
mod worker;

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc, whose background thread gives freed memory back to the system after a few seconds:
/// with the system allocator, what 300 WebSockets that stopped reading had used stayed with the
/// process once they closed (glibc's arenas), more after each burst.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// fleetq: a job queue and fleet control plane for AI generation work.
#[derive(Debug, Parser)]
#[command(name = "fleetq", version, about)]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, env = "FLEETQ_LOG_FORMAT", value_enum, default_value = "pretty")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs everything on this machine: the API and N simulated workers on the embedded store
    /// (a data directory), or on Redis with --redis. Prints the URL.
    Up(serve::UpArgs),
    /// Runs the API alone against Redis (stateless: run as many as you like).
    Api(serve::ApiOnlyArgs),
    /// Submits a job (or a batch) through the API; --wait follows it to the end.
    Submit(client::SubmitArgs),
    /// Lists, shows, cancels, retries and watches jobs.
    #[command(subcommand)]
    Jobs(client::Jobs),
    /// Lists the registered workers.
    Workers(client::ListArgs),
    /// Lists the services of the fleet; pauses or resumes one's queue.
    Services(client::ServicesArgs),
    /// Explains whether a worker may serve a job: prints {"matches": bool, "reasons": [...]}.
    Explain(explain::Args),
    /// Prints the API's OpenAPI 3.1 document (the same as GET /openapi.json), for client generators.
    Openapi,
    /// Benchmarks.
    #[cfg(feature = "tools")]
    #[command(subcommand)]
    Bench(fleetq_tools::bench::Bench),
    /// Does to real processes what a bad day does (kill -9 of workers or Redis) and reports what
    /// was lost or completed twice; exits non-zero if anything was.
    #[cfg(feature = "tools")]
    Chaos(fleetq_tools::chaos::Args),
    /// Runs one worker against a Redis broker until SIGTERM/SIGINT.
    Worker(worker::Args),
    /// Runs this box as a fleet member: its services and one worker per GPU, from a machine TOML
    /// file, against Redis; SIGTERM drains it, a second SIGTERM forces it.
    Machine(machine::Args),
    /// Runs a mock service (ComfyUI, A1111, OpenAI) for demos and manual tests.
    #[command(subcommand)]
    Mock(mock::Mock),
    /// Prints shell completions: `fleetq completions bash > /etc/bash_completion.d/fleetq`
    /// (zsh: into a directory of `$fpath` as `_fleetq`; fish: `~/.config/fish/completions/fleetq.fish`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Explain(args) => explain::run(&args),
        Command::Openapi => {
            let doc = fleetq_api::openapi_document();
            match serde_json::to_string_pretty(&doc) {
                Ok(text) => {
                    out::line(format_args!("{text}"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fleetq openapi: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "fleetq", &mut script);
            out::line(format_args!("{}", String::from_utf8_lossy(&script).trim_end()));
            ExitCode::SUCCESS
        }
        Command::Up(args) => run_async(cli.log_format, "info", "fleetq up", serve::up(args)),
        Command::Api(args) => run_async(cli.log_format, "info", "fleetq api", serve::api(args)),
        Command::Submit(args) => run_async(cli.log_format, "warn", "fleetq submit", client::submit(args)),
        Command::Jobs(cmd) => run_async(cli.log_format, "warn", "fleetq jobs", client::jobs(cmd)),
        Command::Workers(args) => run_async(cli.log_format, "warn", "fleetq workers", client::workers(args)),
        Command::Services(args) => {
            run_async(cli.log_format, "warn", "fleetq services", client::services(args))
        }
        #[cfg(feature = "tools")]
        Command::Bench(b) => run_async(cli.log_format, "warn", "fleetq bench", fleetq_tools::bench::run(b)),
        #[cfg(feature = "tools")]
        Command::Chaos(args) => {
            run_async(cli.log_format, "warn", "fleetq chaos", fleetq_tools::chaos::run(args))
        }
        Command::Worker(args) => run_async(cli.log_format, "info", "fleetq worker", worker::run(args)),
        Command::Machine(args) => run_async(cli.log_format, "info", "fleetq machine", machine::run(args)),
        Command::Mock(m) => run_async(cli.log_format, "info", "fleetq mock", mock::run(m)),
    }
}

/// Starts logging and the async runtime, runs `work`, and maps its error to exit code 1.
fn run_async(
    format: LogFormat,
    level: &str,
    name: &str,
    work: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    // Colour only on a terminal: escape codes in a log file are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match format {
        LogFormat::Pretty => builder.init(),
        // One flat object per line: the event's fields beside `message`, the spans' fields
        // (job_id, worker_id, …) in `span` and `spans`.
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(true).init()
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Clap's own consistency checks (unique names, valid defaults) over every subcommand.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
