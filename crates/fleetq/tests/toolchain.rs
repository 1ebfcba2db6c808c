//! The Rust version the workspace declares (`rust-version`, stated in the README) is one every
//! locked dependency builds with: a dependency update that needs a newer compiler fails here,
//! instead of on a newcomer's machine.
//!
//! The metadata is filtered to the host's platform: a fresh machine has downloaded only the
//! packages its own builds use, and `--offline` must not need the Windows-only rest of the lock file.

use serde_json::Value;

/// `1.89` and `1.89.0` alike, as (major, minor, patch).
fn version(text: &str) -> (u64, u64, u64) {
    let mut n = text.split('.').map(|n| n.parse().unwrap_or(0));
    (n.next().unwrap_or(0), n.next().unwrap_or(0), n.next().unwrap_or(0))
}

/// The host's target triple, from `rustc -vV` (`host: x86_64-unknown-linux-gnu`).
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .trim()
        .to_owned()
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_the_workspace_declares() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform"])
        .arg(host_triple())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let ours = packages
        .iter()
        .find(|p| p["name"] == "fleetq")
        .and_then(|p| p["rust_version"].as_str())
        .expect("the workspace declares rust-version");
    let newer: Vec<String> = packages
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["rust_version"].as_str()?)))
        .filter(|(_, v)| version(v) > version(ours))
        .map(|(n, v)| format!("{n} needs {v}"))
        .collect();
    assert!(newer.is_empty(), "rust-version {ours} is too old: {newer:?}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).expect("README");
    assert!(readme.contains(&format!("Rust toolchain ({ours}+")), "the README states rust-version {ours}");
}
