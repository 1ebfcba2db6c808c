//! Standard output for pipes: a reader that stops reading (`fleetq jobs ls | head -1`) ends the
//! command quietly, where `println!` would panic with "failed printing to stdout: Broken pipe".

use std::io::Write;

/// Writes one line to stdout; exits 0 at once when the reader closed the pipe.
pub(crate) fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("fleetq: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// Prints a server's startup line. A closed stdout (`fleetq up | head -1`, a supervisor that
/// stopped reading) must not stop the server, so write errors are ignored.
pub(crate) fn announce(text: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).ok();
}

/// `println!` that ends quietly on a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}
pub(crate) use outln;
