//! Helpers of the process tests: the binary under test, the URL a server prints first, children
//! killed when a test ends, a free port, and `fleetq up` or `fleetq api` started and awaited.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `fleetq` binary built for these tests.
pub fn fleetq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetq"))
}

/// The `http://…` URL in the banner line `fleetq up` / `fleetq api` print first.
pub fn url_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned()
}

/// Kills the child when the test ends, passed or not.
pub struct Guard(pub Child);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Lines of a child's stdout, read on a thread.
pub fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A loopback port free now. Another process may take it before it is bound: only for a program
/// that cannot bind port 0 itself and say which port it got.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `fleetq <args> --data-dir <data>` (`args` name `up` and its flags; `--listen
/// 127.0.0.1:0` is added when they name no address) with no token, Redis or machine file taken
/// from the environment, its log to `stderr`; returns it with the URL its first line prints.
pub fn fleetq_up(args: &[&str], data: &Path, stderr: impl Into<Stdio>) -> (Guard, String) {
    let mut cmd = fleetq();
    cmd.args(args);
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(data)
        .env_remove("FLEETQ_TOKENS")
        .env_remove("HUB_REDIS_URL")
        .env_remove("MACHINE_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start fleetq up");
    let rx = lines(&mut child);
    let up = Guard(child);
    // A guard against a hang, not a timing assertion.
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("fleetq up prints its URL");
    (up, url_in(&line))
}

/// Starts `fleetq api` on Redis `queue` at `listen` (`127.0.0.1:0` for a free port) with `extra`
/// flags; returns it with its URL (its first line).
pub fn api_at(redis: &str, queue: &str, listen: &str, extra: &[&str]) -> (Guard, String) {
    let mut child = fleetq()
        .args(["api", "--listen", listen, "--redis", redis, "--queue", queue])
        .args(extra)
        .env_remove("FLEETQ_TOKENS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleetq api");
    let rx = lines(&mut child);
    // A guard against a hang, not a timing assertion.
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("fleetq api prints its URL");
    let url = url_in(&line);
    (Guard(child), url)
}

/// Starts `fleetq api` on a free port.
pub fn api(redis: &str, queue: &str) -> (Guard, String) {
    api_at(redis, queue, "127.0.0.1:0", &[])
}
