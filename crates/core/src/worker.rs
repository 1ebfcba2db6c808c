//! Workers, their capabilities, connector status and machine events.
//!
//! A worker registers with a [`WorkerRegistration`] (the `worker.json` document of `fleetq explain`).
//! Registration is validated: an empty `worker_id` or `machine_id` is rejected, never patched with a
//! default (the seeds' `machine_id: unknown` corruption). The service list may be empty: a worker
//! whose every service is down advertises none.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::validate::{ValidationError, check_name};

/// A worker's capabilities: a free-form JSON object compared against job requirements.
///
/// Keys with a meaning of their own:
/// - `models`: an array of model names for every service, an object `{service: [names] | "all"}`, or `"all"`;
/// - `customer_isolation`: `"none"` (default), `"loose"` or `"strict"`;
/// - `allowed_customers` / `denied_customers`: arrays of customer ids;
/// - `workflow_id`: restricts the worker to that workflow's jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", schema(value_type = Object))]
pub struct Capabilities(pub Map<String, Value>);

impl Capabilities {
    /// Looks up a dot path, accepting nested objects and dotted keys alike
    /// (`hardware.gpu_memory_gb` finds `{"hardware": {"gpu_memory_gb": …}}` and `{"hardware.gpu_memory_gb": …}`).
    pub fn lookup(&self, path: &str) -> Option<&Value> {
        let segments: Vec<&str> = path.split('.').collect();
        lookup_in(&self.0, &segments)
    }

    /// The worker's `workflow_id` restriction, if any.
    pub fn workflow_restriction(&self) -> Option<&str> {
        self.0.get("workflow_id").and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    /// The worker's customer isolation (`none` when absent).
    pub fn isolation(&self) -> &str {
        self.0.get("customer_isolation").and_then(Value::as_str).unwrap_or("none")
    }

    /// A string list capability (`allowed_customers`, …), `None` when absent.
    pub fn string_list(&self, key: &str) -> Option<Vec<&str>> {
        self.0
            .get(key)
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).collect())
    }
}

impl Capabilities {
    /// These capabilities with `reported` — the models a connector says its service has now —
    /// added to `models` for `service`, so a job requiring one of them matches. Declared models are
    /// kept: `"all"` stays all, a list grows, and a flat list (which applies to every service) is
    /// spread over `services` so the others keep it. Nothing reported, nothing changed.
    pub fn with_reported_models(&self, services: &[String], service: &str, reported: &[String]) -> Self {
        if reported.is_empty() {
            return self.clone();
        }
        let union = |declared: Option<&Value>| -> Value {
            let mut names: Vec<Value> = declared.and_then(Value::as_array).cloned().unwrap_or_default();
            for r in reported {
                if !names.iter().any(|n| n.as_str() == Some(r)) {
                    names.push(Value::String(r.clone()));
                }
            }
            Value::Array(names)
        };
        let mut out = self.clone();
        let models = match self.0.get("models") {
            Some(Value::String(s)) if s == "all" => return out,
            Some(Value::Object(per_service)) => {
                let mut per_service = per_service.clone();
                if per_service.get(service).and_then(Value::as_str) != Some("all") {
                    let grown = union(per_service.get(service));
                    per_service.insert(service.to_owned(), grown);
                }
                per_service
            }
            Some(flat @ Value::Array(_)) => {
                let mut per_service: Map<String, Value> =
                    services.iter().map(|s| (s.clone(), flat.clone())).collect();
                per_service.insert(service.to_owned(), union(Some(flat)));
                per_service
            }
            _ => Map::from_iter([(service.to_owned(), union(None))]),
        };
        out.0.insert("models".into(), Value::Object(models));
        out
    }
}

fn lookup_in<'a>(obj: &'a Map<String, Value>, segments: &[&str]) -> Option<&'a Value> {
    for i in 1..=segments.len() {
        let key = segments[..i].join(".");
        if let Some(v) = obj.get(&key) {
            let rest = &segments[i..];
            if rest.is_empty() {
                return Some(v);
            }
            if let Some(found) = v.as_object().and_then(|inner| lookup_in(inner, rest)) {
                return Some(found);
            }
        }
    }
    None
}

/// What a worker registers with (`worker.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerRegistration {
    /// Stable identity, e.g. `box1-gpu0`.
    pub worker_id: String,
    /// The machine this worker runs on.
    pub machine_id: String,
    /// Services this worker's connectors serve (`comfyui`, `a1111-sim`, …).
    pub services: Vec<String>,
    /// Capabilities compared against requirements.
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl WorkerRegistration {
    /// Rejects a registration with missing or malformed identity fields. An empty service list is
    /// valid: a worker whose every service is down advertises none (it stays visible, matching
    /// nothing, until one comes back).
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("worker_id", &self.worker_id)?;
        check_name("machine_id", &self.machine_id)?;
        for (i, s) in self.services.iter().enumerate() {
            check_name(&format!("services[{i}]"), s)?;
        }
        for key in ["allowed_customers", "denied_customers"] {
            if let Some(v) = self.capabilities.0.get(key)
                && !v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
            {
                return Err(ValidationError::new(
                    &format!("capabilities.{key}"),
                    "must be an array of strings",
                ));
            }
        }
        if let Some(v) = self.capabilities.0.get("customer_isolation")
            && !matches!(v.as_str(), Some("none" | "loose" | "strict"))
        {
            return Err(ValidationError::new(
                "capabilities.customer_isolation",
                "must be \"none\", \"loose\" or \"strict\"",
            ));
        }
        if let Some(v) = self.capabilities.0.get("workflow_id")
            && !v.is_string()
        {
            return Err(ValidationError::new("capabilities.workflow_id", "must be a string"));
        }
        if let Some(v) = self.capabilities.0.get("models") {
            let ok = |v: &Value| v == "all" || v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
            let valid = ok(v) || v.as_object().is_some_and(|o| o.values().all(ok));
            if !valid {
                return Err(ValidationError::new(
                    "capabilities.models",
                    "must be \"all\", an array of strings, or an object of service → array/\"all\"",
                ));
            }
        }
        Ok(())
    }
}

/// A connector's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ConnectorStatus {
    /// Constructing / first health check pending.
    Starting,
    /// Healthy, no job.
    Idle,
    /// Running a job.
    Active,
    /// Reachable but failing.
    Error,
    /// Unreachable (or failed to construct).
    Offline,
}

impl ConnectorStatus {
    /// Every status, in the monitor's order.
    pub const ALL: [ConnectorStatus; 5] =
        [Self::Starting, Self::Idle, Self::Active, Self::Error, Self::Offline];

    /// The wire name (`starting`, `idle`, …), as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Idle => "idle",
            Self::Active => "active",
            Self::Error => "error",
            Self::Offline => "offline",
        }
    }
}

/// One connector status report from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectorReport {
    /// The connector's service name.
    pub service: String,
    /// Its status.
    pub status: ConnectorStatus,
    /// Reason, for `error` and `offline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the worker observed it (ms). Reports are refreshed every health interval, so an old
    /// `at` means the worker stopped reporting (the API shows it as stale).
    pub at: i64,
    /// What the service says about itself (url, models, queue length, memory…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl ConnectorReport {
    /// Whether the report is older than `stale_after_ms` at `now_ms`: the worker stopped
    /// refreshing it, so its status can no longer be believed. The one staleness rule; the API
    /// applies it to its views and hands the threshold to the pages with the snapshot.
    pub fn is_stale(&self, now_ms: i64, stale_after_ms: i64) -> bool {
        now_ms.saturating_sub(self.at) > stale_after_ms
    }
}

/// A registered worker as the broker knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerInfo {
    /// What it registered with.
    #[serde(flatten)]
    pub registration: WorkerRegistration,
    /// First registration time (ms).
    pub registered_at: i64,
    /// Last heartbeat (ms). Heartbeats are not evented; a snapshot carries the latest value.
    pub last_seen: i64,
    /// Latest report per connector.
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorReport>,
    /// Jobs it completed, counted by the broker (kept across its re-registrations while its
    /// presence lasts), so every viewer shows the same number.
    #[serde(default)]
    pub completed: u64,
}

/// Where a machine is in its life, as its supervisor reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MachinePhase {
    /// Starting up (a new start clears the steps).
    #[default]
    Starting,
    /// One startup step done (the event names it); the machine is still starting.
    Step,
    /// Started: its workers serve.
    Ready,
    /// Shutting down.
    Stopping,
    /// Shut down.
    Stopped,
    /// Startup or operation failed (the message says why).
    Error,
}

impl MachinePhase {
    /// Every phase.
    pub const ALL: [Self; 6] =
        [Self::Starting, Self::Step, Self::Ready, Self::Stopping, Self::Stopped, Self::Error];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Step => "step",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }
}

/// A machine lifecycle event (startup steps, ready, shutdown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineEvent {
    /// The machine.
    pub machine_id: String,
    /// The phase it entered (`step`: one more startup step, still starting).
    pub phase: MachinePhase,
    /// A startup step's name, for `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When (ms).
    pub at: i64,
}

impl MachineEvent {
    /// Rejects an event with a malformed machine id.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("machine_id", &self.machine_id)
    }
}

/// A machine's folded state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineState {
    /// The machine.
    pub machine_id: String,
    /// Latest phase (a `step` leaves it as it was: the machine is still starting).
    pub phase: MachinePhase,
    /// Startup steps seen since the last `starting`, in order.
    pub steps: Vec<String>,
    /// Latest message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Time of the latest event (ms).
    pub updated_at: i64,
}

impl MachineState {
    /// Folds one event into the state.
    pub fn apply(&mut self, e: &MachineEvent) {
        self.machine_id.clone_from(&e.machine_id);
        if e.phase == MachinePhase::Starting {
            self.steps.clear();
        }
        if let Some(step) = &e.step {
            self.steps.push(step.clone());
        }
        if e.phase != MachinePhase::Step {
            self.phase = e.phase;
        }
        self.message.clone_from(&e.message);
        self.updated_at = e.at;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_is_stale_only_past_the_threshold() {
        let r = super::ConnectorReport {
            service: "s".into(),
            status: super::ConnectorStatus::Idle,
            message: None,
            at: 1_000,
            info: None,
        };
        assert!(!r.is_stale(16_000, 15_000), "exactly at the threshold is still fresh");
        assert!(r.is_stale(16_001, 15_000));
        assert!(!r.is_stale(0, 15_000), "a report from a clock ahead is not stale");
        assert!(r.is_stale(i64::MAX, 15_000) && !r.is_stale(i64::MIN, 15_000), "no overflow");
    }

    use serde_json::json;

    use super::*;

    fn caps(v: Value) -> Capabilities {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn lookup_nested_and_dotted() {
        let c =
            caps(json!({"hardware": {"gpu_memory_gb": 24}, "location.region": "eu", "a": {"b.c": {"d": 1}}}));
        assert_eq!(c.lookup("hardware.gpu_memory_gb"), Some(&json!(24)));
        assert_eq!(c.lookup("location.region"), Some(&json!("eu")));
        assert_eq!(c.lookup("a.b.c.d"), Some(&json!(1)));
        assert_eq!(c.lookup("hardware.gpu_model"), None);
        assert_eq!(c.lookup("hardware"), Some(&json!({"gpu_memory_gb": 24})));
    }

    #[test]
    fn registrations_are_validated_field_by_field() {
        let ok = WorkerRegistration {
            worker_id: "w1".into(),
            machine_id: "m1".into(),
            services: vec!["comfyui".into()],
            capabilities: caps(json!({"customer_isolation": "strict", "models": {"comfyui": ["sdxl"]}})),
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.machine_id = String::new();
        assert_eq!(bad.validate().unwrap_err().field, "machine_id");
        let mut none = ok.clone();
        none.services.clear();
        assert!(none.validate().is_ok(), "a worker whose every service is down advertises none");
        let mut bad = ok.clone();
        bad.services = vec![String::new()];
        assert_eq!(bad.validate().unwrap_err().field, "services[0]");
        let mut bad = ok.clone();
        bad.capabilities = caps(json!({"customer_isolation": "very"}));
        assert_eq!(bad.validate().unwrap_err().field, "capabilities.customer_isolation");
        let mut bad = ok;
        bad.capabilities = caps(json!({"models": {"comfyui": "sdxl"}}));
        assert_eq!(bad.validate().unwrap_err().field, "capabilities.models");
    }

    #[test]
    fn reported_models_join_the_declared_ones() {
        let services = ["comfyui".to_owned(), "a1111".to_owned()];
        let got = |declared: Value| {
            let c = caps(declared).with_reported_models(&services, "comfyui", &["x.safetensors".into()]);
            c.0.get("models").cloned()
        };
        assert_eq!(got(json!({})), Some(json!({"comfyui": ["x.safetensors"]})));
        assert_eq!(got(json!({"models": "all"})), Some(json!("all")));
        assert_eq!(
            got(json!({"models": ["sdxl"]})),
            Some(json!({"comfyui": ["sdxl", "x.safetensors"], "a1111": ["sdxl"]})),
            "a flat list still applies to the other services"
        );
        assert_eq!(
            got(json!({"models": {"comfyui": ["x.safetensors", "y"], "a1111": "all"}})),
            Some(json!({"comfyui": ["x.safetensors", "y"], "a1111": "all"})),
            "no duplicates"
        );
        assert_eq!(got(json!({"models": {"comfyui": "all"}})), Some(json!({"comfyui": "all"})));
        let none = caps(json!({"models": ["sdxl"]})).with_reported_models(&services, "comfyui", &[]);
        assert_eq!(none.0.get("models"), Some(&json!(["sdxl"])), "nothing reported, nothing changed");
        let reg = WorkerRegistration {
            worker_id: "w".into(),
            machine_id: "m".into(),
            services: services.to_vec(),
            capabilities: caps(json!({"models": ["sdxl"]})).with_reported_models(
                &services,
                "comfyui",
                &["z".into()],
            ),
        };
        assert!(reg.validate().is_ok(), "the result is a valid models capability");
    }

    #[test]
    fn machine_events_fold_into_the_machine_state() {
        let mut m = MachineState::default();
        let ev = |phase: MachinePhase, step: Option<&str>| MachineEvent {
            machine_id: "m".into(),
            phase,
            step: step.map(Into::into),
            message: None,
            at: 1,
        };
        m.apply(&ev(MachinePhase::Step, Some("pull")));
        assert_eq!(m.phase, MachinePhase::Starting, "a step is part of starting");
        m.apply(&ev(MachinePhase::Starting, None));
        assert!(m.steps.is_empty(), "a new start clears the steps");
        m.apply(&ev(MachinePhase::Step, Some("pull")));
        m.apply(&ev(MachinePhase::Step, Some("comfyui")));
        m.apply(&ev(MachinePhase::Ready, None));
        assert_eq!(m.phase, MachinePhase::Ready);
        assert_eq!(m.steps, vec!["pull", "comfyui"]);
        for p in MachinePhase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), json!(p.as_str()));
        }
        let unknown: Result<MachineEvent, _> =
            serde_json::from_value(json!({"machine_id": "m", "phase": "exploded", "at": 1}));
        assert!(unknown.is_err(), "an unknown phase does not parse");
    }
}
