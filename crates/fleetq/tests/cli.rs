//! The offline commands as an operator runs them: `fleetq explain` and `fleetq openapi`.

mod common;

use common::fleetq;
use serde_json::{Value, json};

fn explain(worker: &Value, job: &str) -> (i32, Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("worker.json");
    let j = dir.path().join("job.json");
    std::fs::write(&w, worker.to_string()).expect("write");
    std::fs::write(&j, job).expect("write");
    let out =
        fleetq().args(["explain", "--worker"]).arg(&w).arg("--job").arg(&j).output().expect("run fleetq");
    let stdout = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn worker() -> Value {
    json!({"worker_id": "w1", "machine_id": "m1", "services": ["comfyui"],
           "capabilities": {"hardware": {"gpu_memory_gb": 16}}})
}

#[test]
fn match_and_mismatch_exit_zero() {
    let (code, out, _) =
        explain(&worker(), r#"{"service": "comfyui", "requirements": {"hardware.gpu_memory_gb": 8}}"#);
    assert_eq!((code, out), (0, json!({"matches": true, "reasons": []})));
    let (code, out, _) =
        explain(&worker(), r#"{"service": "a1111", "requirements": {"hardware.gpu_memory_gb": 80}}"#);
    assert_eq!(code, 0);
    assert_eq!(out["matches"], json!(false));
    assert_eq!(out["reasons"].as_array().map(Vec::len), Some(2), "{out}");
}

#[test]
fn invalid_input_exits_two_naming_the_problem() {
    let (code, _, err) = explain(&worker(), r#"{"service": "comfyui", "requirements": {"gpu": "16"}}"#);
    assert_eq!(code, 2);
    assert!(err.contains("requirements.gpu"), "{err}");
    let mut bad = worker();
    bad["machine_id"] = json!("");
    let (code, _, err) = explain(&bad, r#"{"service": "comfyui"}"#);
    assert_eq!(code, 2);
    assert!(err.contains("machine_id"), "{err}");
    let (code, _, err) = explain(&worker(), "not json");
    assert_eq!(code, 2);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn openapi_prints_the_served_document() {
    let out = fleetq().arg("openapi").output().expect("run fleetq");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(doc, fleetq_api::openapi_document());
    assert!(doc["paths"]["/api/jobs"]["post"]["requestBody"].is_object());
}

/// `fleetq bench worker` measures every figure it names (a short run: the figures themselves are
/// for the README, not for a test).
#[test]
fn bench_worker_reports_each_figure() {
    let out = fleetq().args(["bench", "worker", "--tries", "2"]).output().expect("run fleetq");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let figures: Vec<&str> = lines.iter().filter_map(|l| l["figure"].as_str()).collect();
    assert_eq!(figures, ["activity", "cancel", "offline", "recovered"]);
    assert!(lines.iter().all(|l| l["latency"]["n"] == 2), "{lines:?}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, mark) in [("bash", "_fleetq()"), ("zsh", "#compdef fleetq"), ("fish", "complete -c fleetq")] {
        let out = fleetq().args(["completions", shell]).output().expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(mark) && text.contains("machine"),
            "{shell}: {text:.200}"
        );
    }
}
