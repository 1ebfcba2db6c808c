//! `fleetq up` as a process, driven by the client CLI the way the README shows: submit --wait
//! (exit 0 on success, non-zero on failure), jobs ls, workers, services; jobs survive a restart;
//! a public address without tokens is refused.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Guard, fleetq};
use serde_json::Value;

/// Starts `fleetq up` on a free port and returns it with its URL (read from its first line).
fn up(data: &Path) -> (Guard, String) {
    up_with(data, &["up", "--workers", "2", "--reap-every-ms", "100"])
}

/// Starts `fleetq <args> --step-ms 5` on the embedded store in `data` (its log in `<data>/up.log`)
/// and returns it with its URL.
fn up_with(data: &Path, args: &[&str]) -> (Guard, String) {
    let log = std::fs::File::create(data.join("up.log")).expect("log file");
    common::fleetq_up(&[args, &["--step-ms", "5"]].concat(), data, log)
}

fn cli(url: &str, args: &[&str]) -> Output {
    fleetq().args(args).env("FLEETQ_API", url).env_remove("FLEETQ_TOKEN").output().expect("run the CLI")
}

fn stop(mut up: Guard) {
    Command::new("kill").args(["-INT", &up.0.id().to_string()]).status().expect("kill -INT");
    let status = up.0.wait().expect("wait");
    assert!(status.success(), "fleetq up exits cleanly on SIGINT: {status}");
}

#[test]
fn up_serves_the_cli_and_keeps_jobs_across_restarts() {
    let data = tempfile::tempdir().expect("tempdir");
    let (child, url) = up(data.path());
    let ok = cli(&url, &["submit", "--payload", r#"{"steps": 3}"#, "--wait", "--json"]);
    assert!(
        ok.status.success(),
        "{}\n--- fleetq up's log:\n{}",
        String::from_utf8_lossy(&ok.stderr),
        std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default()
    );
    let done: Value = serde_json::from_slice(&ok.stdout).expect("JSON");
    assert_eq!(done["type"], "job_completed");
    assert_eq!(done["outcome"]["value"]["steps"], 3);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/simulation-job.json");
    let from_file = cli(&url, &["submit", "-f", example, "--wait"]);
    assert!(
        from_file.status.success(),
        "the README's job file runs: {}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    let bad = cli(&url, &["submit", "--payload", r#"{"fail": "fatal"}"#, "--wait"]);
    assert!(!bad.status.success(), "a failed job exits non-zero");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("job failed"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let invalid = cli(&url, &["submit", "--service", "bad name!"]);
    assert!(!invalid.status.success());
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("422 invalid (service)"),
        "{}",
        String::from_utf8_lossy(&invalid.stderr)
    );
    let ls = cli(&url, &["jobs", "ls", "--json"]);
    let page: Value = serde_json::from_slice(&ls.stdout).expect("JSON");
    assert_eq!(page["jobs"].as_array().expect("jobs").len(), 3);
    let table = String::from_utf8_lossy(&cli(&url, &["jobs", "ls"]).stdout).into_owned();
    assert!(table.starts_with("ID") && table.contains("completed") && table.contains("failed"), "{table}");
    let workers = String::from_utf8_lossy(&cli(&url, &["workers"]).stdout).into_owned();
    assert!(workers.contains("local-gpu0") && workers.contains("local-gpu1"), "{workers}");
    let services = String::from_utf8_lossy(&cli(&url, &["services"]).stdout).into_owned();
    assert!(services.contains("simulation"), "{services}");
    let id = page["jobs"][0]["id"].as_str().expect("id").to_owned();
    let show = cli(&url, &["jobs", "show", &id]);
    assert!(show.status.success() && String::from_utf8_lossy(&show.stdout).contains(&id));
    stop(child);
    let (child, url) = up(data.path());
    let ls = cli(&url, &["jobs", "ls", "--json"]);
    let page: Value = serde_json::from_slice(&ls.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&ls.stderr)));
    assert_eq!(page["jobs"].as_array().expect("jobs").len(), 3, "the jobs survived the restart");
    stop(child);
}

#[test]
fn up_refuses_a_public_address_without_tokens() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = fleetq()
        .args(["up", "--listen", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("FLEETQ_TOKENS")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without tokens") && err.contains("--insecure"), "{err}");
}

#[test]
fn up_names_a_bad_fair_share_weight() {
    let data = tempfile::tempdir().expect("tempdir");
    for (args, want) in [
        (vec!["--customer-weight", "acme=2"], "--customer-weight needs --fair-share on"),
        (vec!["--fair-share", "on", "--customer-weight", "acme=0"], "\"acme=0\": want customer=weight"),
        (vec!["--fair-share", "on", "--customer-weight", "acme"], "customer_weight"),
    ] {
        let out = fleetq()
            .args(["up", "--listen", "127.0.0.1:0", "--workers", "0"])
            .args(&args)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn cli_names_an_unreachable_api() {
    let out = cli("http://127.0.0.1:9", &["jobs", "ls"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the fleetq API"));
    let out = cli("127.0.0.1:7777", &["jobs", "ls"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("must be a URL like http://"), "{err}");
}

/// A job no worker can serve says so at once, with why, in `submit --wait`, `jobs ls` and
/// `jobs show`; a refused action reads as a sentence; `--listen` takes a host name.
#[test]
fn the_cli_says_why_a_job_waits() {
    let data = tempfile::tempdir().expect("tempdir");
    let (child, url) = up_with(data.path(), &["up", "--listen", "localhost:0", "--workers", "1"]);
    let mut wait = fleetq()
        .args(["submit", "--service", "comfyui", "--wait"])
        .env("FLEETQ_API", &url)
        .env_remove("FLEETQ_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("submit --wait");
    let mut said = String::new();
    let mut err = BufReader::new(wait.stderr.take().expect("stderr"));
    for _ in 0..20 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        said.push_str(&line);
        // (A first line may come before the worker registered: "no worker is registered".)
        if line.contains("is not served") {
            break;
        }
    }
    wait.kill().ok();
    wait.wait().ok();
    assert!(
        said.contains(r#"UNWORKABLE — 0/1 workers can take it now: 1 × service "comfyui" is not served"#),
        "{said}"
    );
    let id = said.lines().find_map(|l| l.strip_prefix("submitted ")).expect("the id").trim().to_owned();
    let ls = String::from_utf8_lossy(&cli(&url, &["jobs", "ls"]).stdout).into_owned();
    assert!(ls.contains("pending (UNWORKABLE)"), "{ls}");
    let show = String::from_utf8_lossy(&cli(&url, &["jobs", "show", &id]).stdout).into_owned();
    assert!(show.contains("waiting") && show.contains("not served") && show.contains("payload"), "{show}");
    let retry = cli(&url, &["jobs", "retry", &id]);
    let err = String::from_utf8_lossy(&retry.stderr);
    assert!(!retry.status.success() && err.contains("cannot retry a job that is pending"), "{err}");
    stop(child);
}

/// `fleetq jobs ls | head -1`: the reader closes the pipe after one line; the command ends quietly
/// (no "Broken pipe" panic, exit 0) instead of exit 101.
#[test]
fn the_cli_ends_quietly_on_a_closed_pipe() {
    let data = tempfile::tempdir().expect("tempdir");
    let (child, url) = up(data.path());
    // Enough rows that the table outgrows the pipe's buffer (64 KiB).
    let batch = cli(&url, &["submit", "--payload", r#"{"steps": 1000}"#, "--count", "1000"]);
    assert!(batch.status.success(), "{}", String::from_utf8_lossy(&batch.stderr));
    let mut ls = fleetq()
        .args(["jobs", "ls", "--limit", "1000"])
        .env("FLEETQ_API", &url)
        .env_remove("FLEETQ_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobs ls");
    let mut first = String::new();
    BufReader::new(ls.stdout.take().expect("stdout")).read_line(&mut first).expect("a line");
    // The reader is dropped here: the pipe is closed with most of the table unread.
    assert!(first.starts_with("ID"), "{first}");
    let out = ls.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{}: {err}", out.status);
    stop(child);
}

/// `--log-format json`: every line one valid object, each key once, numbers as numbers, one access
/// line per request (method, route pattern, status, ms, token name), job lines naming their worker.
#[test]
fn json_logs_are_valid_typed_and_complete() {
    let data = tempfile::tempdir().expect("tempdir");
    let log = data.path().join("up.log");
    let (child, url) =
        up_with(data.path(), &["--log-format", "json", "up", "--listen", "127.0.0.1:0", "--workers", "1"]);
    let done = cli(&url, &["submit", "--payload", r#"{"steps": 2}"#, "--wait"]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    stop(child);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains('\u{1b}'), "no colour codes in a file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| {
            assert_eq!(l.matches("\"message\":").count(), 1, "one message per line: {l}");
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .collect();
    let access = lines
        .iter()
        .find(|l| l["target"] == "fleetq_api::access" && l["route"] == "/api/jobs" && l["method"] == "POST")
        .unwrap_or_else(|| panic!("an access line for the submission:\n{text}"));
    assert_eq!(access["status"], 201, "{access}");
    assert!(access["ms"].is_u64() && access["token"] == "-", "{access}");
    let ended = lines
        .iter()
        .find(|l| l["message"] == "job attempt ended")
        .unwrap_or_else(|| panic!("a job line:\n{text}"));
    assert!(ended["elapsed_ms"].is_u64(), "{ended}");
    assert_eq!(ended["span"]["worker_id"], "local-gpu0", "{ended}");
    let status = lines.iter().find(|l| l["message"] == "connector status").expect("a connector status line");
    assert_eq!(status["status"], "idle", "{status}");
}

/// `fleetq jobs watch` across an API restart: it resumes after the last event it printed (the
/// next job's events arrive, nothing twice), and when the API is gone for good it exits non-zero
/// saying so instead of 0 in silence.
#[test]
fn jobs_watch_resumes_across_a_restart_and_fails_loudly_when_the_api_is_gone() {
    let data = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = || up_with(data.path(), &["up", "--listen", &listen, "--workers", "1"]);
    let (child, url) = start();
    let mut watch = fleetq()
        .args(["jobs", "watch", "--json"])
        .env("FLEETQ_API", &url)
        .env_remove("FLEETQ_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobs watch");
    let events = common::lines(&mut watch);
    let seen = std::cell::RefCell::new(Vec::new());
    let completed_of = |id: &str| {
        for _ in 0..200 {
            let Ok(line) = events.recv_timeout(Duration::from_secs(30)) else { break };
            let v: Value = serde_json::from_str(&line).expect("a JSON event");
            seen.borrow_mut().push(v["seq"].as_u64().expect("seq"));
            if v["type"] == "job_completed" && v["job"]["id"] == id {
                return true;
            }
        }
        false
    };
    let submit = |url: &str| {
        let out = cli(url, &["submit", "--payload", r#"{"steps": 2}"#]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let first = submit(&url);
    assert!(completed_of(&first), "the first job's completion is watched");
    stop(child);
    let (child, url) = start();
    let second = submit(&url);
    assert!(completed_of(&second), "after the restart the watch resumed and saw the next job");
    let mut seqs = seen.borrow().clone();
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "no event shown twice: {:?}", seen.borrow());
    stop(child);
    let status = watch.wait().expect("the watch ends once the API is gone");
    assert!(!status.success(), "an API gone for good is an error: {status}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(err.contains("event stream was lost"), "{err}");
}

/// `fleetq jobs bulk`: counts with --dry-run, then cancels on the server what the filters select.
#[test]
fn the_cli_cancels_in_bulk_on_the_server() {
    let data = tempfile::tempdir().expect("tempdir");
    let (child, url) = up(data.path());
    for _ in 0..3 {
        let out = cli(&url, &["submit", "--service", "nobody-serves-this"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let args = ["jobs", "bulk", "cancel", "--status", "pending", "--service", "nobody-serves-this"];
    let dry = cli(&url, &[&args[..], &["--dry-run"]].concat());
    let said = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success() && said.contains("3 jobs would be cancelled"), "{said}");
    let real = cli(&url, &args);
    let said = String::from_utf8_lossy(&real.stdout).into_owned();
    assert!(real.status.success() && said.starts_with("3 of 3 done"), "{said}");
    let ls = cli(&url, &["jobs", "ls", "--status", "cancelled", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(3), "{page}");
    stop(child);
}

/// `fleetq services pause|resume`: a paused service's job waits, the listing says paused, and it
/// runs once resumed.
#[test]
fn the_cli_pauses_and_resumes_a_service() {
    let data = tempfile::tempdir().expect("tempdir");
    let (child, url) = up(data.path());
    let out = cli(&url, &["services", "pause", "simulation"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "simulation paused");
    let again = cli(&url, &["services", "pause", "simulation"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("(it already was)"));
    let listed = String::from_utf8_lossy(&cli(&url, &["services"]).stdout).into_owned();
    assert!(listed.contains("simulation (paused)"), "{listed}");
    let out = cli(&url, &["submit", "--payload", r#"{"steps": 1}"#, "--json"]);
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let out = cli(&url, &["services", "resume", "simulation"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "simulation resumed");
    let wait = cli(&url, &["jobs", "watch", &id, "--json"]);
    assert!(wait.status.success(), "the job ran once resumed: {}", String::from_utf8_lossy(&wait.stderr));
    stop(child);
}
