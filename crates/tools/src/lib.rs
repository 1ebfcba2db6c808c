//! fleetq's tools, apart from the product: `fleetq bench` (measurements as JSON lines, shaped
//! to be compared side by side with a peer's) and `fleetq chaos` (real processes killed under
//! load, then what was lost or done twice, counted from the broker). The `fleetq` binary calls
//! them behind its `tools` feature, so `redis` and `tempfile` are not the product's runtime
//! dependencies when it is built without.

pub mod bench;
mod bench_worker;
pub mod chaos;
mod failover;
mod figures;

use std::io::Write;

/// Writes one report line to stdout. A reader that closed the pipe (`fleetq bench … | head -1`)
/// has what it wanted: the run ends quietly with 0 instead of panicking.
fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("fleetq: cannot write to stdout: {e}");
        }
        std::process::exit(i32::from(e.kind() != std::io::ErrorKind::BrokenPipe));
    }
}
