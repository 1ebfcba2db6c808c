//! Helpers of the process tests: the binary under test and the URL a server prints first.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

use std::process::Command;

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
