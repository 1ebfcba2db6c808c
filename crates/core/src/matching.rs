//! Matching: may this worker serve this job? One pure function, [`explain`], used by the broker to
//! pick claimable partitions, by the API to list matching and incompatible workers, and by
//! `fleetq explain`. It never errors: submissions are validated, so stored data always matches or not.
//!
//! Rules (the test vectors are this module's tests):
//! 1. the job's service is one of the worker's services (exact, case-sensitive);
//! 2. every positive requirement holds, no negative one does;
//! 3. a value `R` against the capability `W` at the same path: `R == "all"` holds (even when `W` is
//!    missing); `W` missing fails; `R` array needs `W` an array containing all of `R`; `W` array and `R`
//!    scalar needs `R` in `W`; `R` number needs `W` a number ≥ `R`; otherwise strict equality;
//! 4. `models`: every listed model is in the worker's models for the job's service (`"all"`/`[]` hold);
//! 5. `customer_isolation: "strict"` needs a strict worker; other values ask for nothing;
//! 6. `denied_customers` always refuse; `allowed_customers` admits only listed customers;
//! 7. a worker restricted to a `workflow_id` takes only that workflow's jobs.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::JobSpec;
use crate::partition::PartitionSpec;
use crate::worker::{Capabilities, WorkerRegistration};

/// The verdict of [`explain`]: `matches` and, when it does not, every reason why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Match {
    /// True when the worker may serve the job.
    pub matches: bool,
    /// Why not (empty when it matches).
    pub reasons: Vec<String>,
}

/// Decides whether `worker` may serve `job`, with every reason when it may not.
pub fn explain(worker: &WorkerRegistration, job: &JobSpec) -> Match {
    let mut reasons = partition_reasons(worker, &PartitionSpec::of(job));
    if let Some(wf) = worker.capabilities.workflow_restriction()
        && job.workflow_id.as_deref() != Some(wf)
    {
        reasons.push(format!(
            "worker is restricted to workflow {wf:?}, job is {}",
            job.workflow_id
                .as_deref()
                .map_or("not in a workflow".to_owned(), |w| format!("in workflow {w:?}"))
        ));
    }
    Match { matches: reasons.is_empty(), reasons }
}

/// [`explain`] without the workflow rule: whether the worker may serve the jobs of a partition.
/// Brokers keep this per (worker class, partition); workflow restriction is applied per job.
pub fn matches_partition(worker: &WorkerRegistration, p: &PartitionSpec) -> bool {
    serves_partition(&worker.services, &worker.capabilities, p)
}

/// [`matches_partition`] on what matching reads of a worker: its services and capabilities (a
/// [`crate::ClassSpec`] has just these).
pub(crate) fn serves_partition(services: &[String], caps: &Capabilities, p: &PartitionSpec) -> bool {
    partition_reasons_of(services, caps, p).is_empty()
}

fn partition_reasons(worker: &WorkerRegistration, p: &PartitionSpec) -> Vec<String> {
    partition_reasons_of(&worker.services, &worker.capabilities, p)
}

fn partition_reasons_of(services: &[String], caps: &Capabilities, p: &PartitionSpec) -> Vec<String> {
    let mut reasons = Vec::new();
    if !services.iter().any(|s| s == &p.service) {
        reasons.push(format!(
            "service {:?} is not served (worker serves {})",
            p.service,
            services.join(", ")
        ));
    }
    for (path, r) in &p.requirements.positive {
        if let Err(why) = holds(caps, &p.service, path, r) {
            reasons.push(format!("requirement {path}: {why}"));
        }
    }
    for (path, r) in &p.requirements.negative {
        if holds(caps, &p.service, path, r).is_ok() {
            reasons.push(format!("negative requirement {path}: worker has {}", describe(caps, path)));
        }
    }
    if let Some(customer) = &p.customer_id {
        if caps.string_list("denied_customers").is_some_and(|d| d.contains(&customer.as_str())) {
            reasons.push(format!("customer {customer:?} is in denied_customers"));
        }
        if let Some(allowed) = caps.string_list("allowed_customers")
            && !allowed.contains(&customer.as_str())
        {
            reasons.push(format!("customer {customer:?} is not in allowed_customers"));
        }
    }
    reasons
}

fn describe(caps: &Capabilities, path: &str) -> String {
    match path {
        "customer_isolation" => format!("{:?}", caps.isolation()),
        _ => caps.lookup(path).map_or_else(|| "it".to_owned(), Value::to_string),
    }
}

/// Whether the requirement `r` at `path` holds against the capabilities; `Err(why)` when not.
fn holds(caps: &Capabilities, service: &str, path: &str, r: &Value) -> Result<(), String> {
    match path {
        "models" => models_hold(caps, service, r),
        "customer_isolation" => {
            if r == "strict" && caps.isolation() != "strict" {
                Err(format!("needs strict customer isolation, worker has {:?}", caps.isolation()))
            } else {
                Ok(())
            }
        }
        _ => {
            if r == "all" {
                return Ok(());
            }
            let Some(w) = caps.lookup(path) else {
                return Err("worker lacks it".to_owned());
            };
            compare(r, w)
        }
    }
}

/// Rule 3 for one leaf.
fn compare(r: &Value, w: &Value) -> Result<(), String> {
    match (r, w) {
        (Value::Array(need), Value::Array(have)) => {
            let missing: Vec<&Value> = need.iter().filter(|x| !have.contains(x)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("worker lacks {}", Value::Array(missing.into_iter().cloned().collect())))
            }
        }
        (Value::Array(_), _) => Err(format!("needs a list, worker has {w}")),
        (_, Value::Array(have)) => {
            if have.contains(r) {
                Ok(())
            } else {
                Err(format!("needs {r}, worker has {w}"))
            }
        }
        (Value::Number(need), _) => match (need.as_f64(), w.as_f64()) {
            (Some(n), Some(h)) if h >= n => Ok(()),
            (Some(_), Some(_)) => Err(format!("needs at least {r}, worker has {w}")),
            _ => Err(format!("needs a number ≥ {r}, worker has {w}")),
        },
        _ if r == w => Ok(()),
        _ => Err(format!("needs {r}, worker has {w}")),
    }
}

fn models_hold(caps: &Capabilities, service: &str, r: &Value) -> Result<(), String> {
    let wanted: Vec<&str> = match r {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()), // "all" (validation admits nothing else)
    };
    if wanted.is_empty() {
        return Ok(());
    }
    let have = match caps.0.get("models") {
        Some(Value::Object(per_service)) => per_service.get(service),
        other => other,
    };
    let have: Vec<&str> = match have {
        Some(Value::String(s)) if s == "all" => return Ok(()),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let missing: Vec<&str> = wanted.into_iter().filter(|m| !have.contains(m)).collect();
    if missing.is_empty() { Ok(()) } else { Err(format!("worker lacks models {missing:?} for {service}")) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::validate::parse_job_spec;

    fn worker(services: &[&str], caps: Value) -> WorkerRegistration {
        WorkerRegistration {
            worker_id: "w".into(),
            machine_id: "m".into(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            capabilities: serde_json::from_value(caps).unwrap(),
        }
    }

    fn job(v: Value) -> JobSpec {
        parse_job_spec(&v.to_string(), &crate::Limits::default()).unwrap()
    }

    fn gpu_worker() -> WorkerRegistration {
        worker(
            &["comfyui", "a1111-sim"],
            json!({
                "hardware": {"gpu_memory_gb": 24, "gpu_model": "RTX 4090"},
                "location": {"region": "eu-west"},
                "asset_type": ["image", "video"],
                "models": {"comfyui": ["sdxl", "flux"], "a1111-sim": "all"},
                "debug": false
            }),
        )
    }

    /// (job, expected match) against `gpu_worker()`.
    #[test]
    fn matching_follows_the_rules_case_by_case() {
        let w = gpu_worker();
        let cases: Vec<(Value, bool)> = vec![
            // rule 1
            (json!({"service": "comfyui"}), true),
            (json!({"service": "ComfyUI"}), false),
            (json!({"service": "a1111"}), false),
            (json!({"service": "a1111-sim"}), true),
            (json!({"service": "comfyui-sim"}), false),
            // rule 3: numbers are minimums
            (json!({"service": "comfyui", "requirements": {"hardware": {"gpu_memory_gb": 16}}}), true),
            (json!({"service": "comfyui", "requirements": {"hardware.gpu_memory_gb": 24}}), true),
            (json!({"service": "comfyui", "requirements": {"hardware.gpu_memory_gb": 24.5}}), false),
            (json!({"service": "comfyui", "requirements": {"hardware.gpu_memory_gb": 80}}), false),
            // strings equal, gpu_model is compared like any key
            (json!({"service": "comfyui", "requirements": {"hardware.gpu_model": "RTX 4090"}}), true),
            (json!({"service": "comfyui", "requirements": {"hardware.gpu_model": "A100"}}), false),
            (json!({"service": "comfyui", "requirements": {"location": {"region": "eu-west"}}}), true),
            (json!({"service": "comfyui", "requirements": {"location.region": "us-east"}}), false),
            // missing capability
            (json!({"service": "comfyui", "requirements": {"tier": "premium"}}), false),
            (json!({"service": "comfyui", "requirements": {"tier": "all"}}), true),
            // arrays
            (json!({"service": "comfyui", "requirements": {"asset_type": "video"}}), true),
            (json!({"service": "comfyui", "requirements": {"asset_type": "3d"}}), false),
            (json!({"service": "comfyui", "requirements": {"asset_type": ["image", "video"]}}), true),
            (json!({"service": "comfyui", "requirements": {"asset_type": ["image", "3d"]}}), false),
            (json!({"service": "comfyui", "requirements": {"location.region": ["eu-west"]}}), false),
            // booleans strict
            (json!({"service": "comfyui", "requirements": {"debug": false}}), true),
            (json!({"service": "comfyui", "requirements": {"debug": true}}), false),
            // rule 4: models per service
            (json!({"service": "comfyui", "requirements": {"models": ["sdxl"]}}), true),
            (json!({"service": "comfyui", "requirements": {"models": ["sdxl", "flux"]}}), true),
            (json!({"service": "comfyui", "requirements": {"models": ["sd15"]}}), false),
            (json!({"service": "comfyui", "requirements": {"models": "all"}}), true),
            (json!({"service": "comfyui", "requirements": {"models": []}}), true),
            (json!({"service": "a1111-sim", "requirements": {"models": ["anything"]}}), true),
            // rules 2 and 5: negative
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"hardware.gpu_memory_gb": 80}}}),
                true,
            ),
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"hardware.gpu_memory_gb": 16}}}),
                false,
            ),
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"location.region": "eu-west"}}}),
                false,
            ),
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"tier": "premium"}}}),
                true,
            ),
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"asset_type": "video"}}}),
                false,
            ),
            (
                json!({"service": "comfyui", "requirements": {
                "positive_requirements": {"asset_type": "image"},
                "negative_requirements": {"debug": true}}}),
                true,
            ),
            (
                json!({"service": "comfyui", "requirements": {"positive_requirements": {"asset_type": "3d"}}}),
                false,
            ),
            // rule 6 (worker has no customer lists, no isolation)
            (json!({"service": "comfyui", "customer_id": "acme"}), true),
            (json!({"service": "comfyui", "requirements": {"customer_isolation": "strict"}}), false),
            (json!({"service": "comfyui", "requirements": {"customer_isolation": "none"}}), true),
            // rule 7 (worker unrestricted)
            (json!({"service": "comfyui", "workflow_id": "wf-1"}), true),
        ];
        for (spec, want) in cases {
            let got = explain(&w, &job(spec.clone()));
            assert_eq!(got.matches, want, "{spec}: {:?}", got.reasons);
            assert_eq!(got.reasons.is_empty(), want, "{spec}");
        }
    }

    #[test]
    fn customers_and_isolation() {
        let strict = worker(
            &["comfyui"],
            json!({"customer_isolation": "strict", "allowed_customers": ["acme"], "denied_customers": ["evil"]}),
        );
        let cases = [
            (json!({"service": "comfyui", "customer_id": "acme"}), true),
            (json!({"service": "comfyui", "customer_id": "other"}), false),
            (json!({"service": "comfyui"}), true),
            (
                json!({"service": "comfyui", "customer_id": "acme", "requirements": {"customer_isolation": "strict"}}),
                true,
            ),
            (
                json!({"service": "comfyui", "requirements": {"negative_requirements": {"customer_isolation": "strict"}}}),
                false,
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(explain(&strict, &job(spec.clone())).matches, want, "{spec}");
        }
        let denying = worker(&["comfyui"], json!({"denied_customers": ["evil"]}));
        assert!(!explain(&denying, &job(json!({"service": "comfyui", "customer_id": "evil"}))).matches);
        assert!(explain(&denying, &job(json!({"service": "comfyui", "customer_id": "good"}))).matches);
        let loose = worker(&["comfyui"], json!({"customer_isolation": "loose"}));
        assert!(
            !explain(
                &loose,
                &job(json!({"service": "comfyui", "requirements": {"customer_isolation": "strict"}}))
            )
            .matches
        );
    }

    #[test]
    fn negative_only_matches_workers_lacking_it() {
        let j = job(json!({"service": "comfyui", "requirements": {"negative_requirements": {"gpu": "old"}}}));
        assert!(explain(&worker(&["comfyui"], json!({})), &j).matches);
        assert!(!explain(&worker(&["comfyui"], json!({"gpu": "old"})), &j).matches);
        assert!(explain(&worker(&["comfyui"], json!({"gpu": "new"})), &j).matches);
    }

    #[test]
    fn a_workflow_bound_worker_takes_only_that_workflow() {
        let w = worker(&["comfyui"], json!({"workflow_id": "wf-1"}));
        assert!(explain(&w, &job(json!({"service": "comfyui", "workflow_id": "wf-1"}))).matches);
        assert!(!explain(&w, &job(json!({"service": "comfyui", "workflow_id": "wf-2"}))).matches);
        assert!(!explain(&w, &job(json!({"service": "comfyui"}))).matches);
    }

    #[test]
    fn every_reason_is_listed() {
        let w = worker(&["a1111"], json!({}));
        let m = explain(&w, &job(json!({"service": "comfyui", "requirements": {"a": 1, "b": "x"}})));
        assert_eq!(m.reasons.len(), 3, "{:?}", m.reasons);
    }

    #[test]
    fn models_as_flat_list_apply_to_every_service() {
        let w = worker(&["comfyui", "a1111"], json!({"models": ["sdxl"]}));
        assert!(explain(&w, &job(json!({"service": "a1111", "requirements": {"models": ["sdxl"]}}))).matches);
        let none = worker(&["comfyui"], json!({}));
        assert!(
            !explain(&none, &job(json!({"service": "comfyui", "requirements": {"models": ["sdxl"]}})))
                .matches
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::requirements::Requirements;

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0u32..100).prop_map(|n| json!(n)),
            (0u32..100).prop_map(|n| json!(f64::from(n) / 4.0)),
            prop::sample::select(vec!["a", "b", "c", "all"]).prop_map(|s| json!(s)),
            any::<bool>().prop_map(|b| json!(b)),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![scalar(), prop::collection::vec(scalar(), 0..4).prop_map(Value::Array)]
    }

    fn worker(caps: Value) -> WorkerRegistration {
        WorkerRegistration {
            worker_id: "w".into(),
            machine_id: "m".into(),
            services: vec!["svc".into()],
            capabilities: serde_json::from_value(caps).expect("object"),
        }
    }

    fn job(requirements: Value) -> Option<JobSpec> {
        let mut spec = JobSpec::new("svc", Value::Null);
        spec.requirements = Requirements::parse(&requirements, "requirements").ok()?;
        Some(spec)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Rule 5: a negative requirement rejects exactly the workers its positive form accepts.
        #[test]
        fn negative_is_the_complement_of_positive(
            r in value(), w in prop::option::of(value()), key in prop::sample::select(vec!["gpu", "hw.mem", "tags"])
        ) {
            let caps = match &w {
                Some(w) => json!({ key: w.clone() }),
                None => json!({}),
            };
            let worker = worker(caps);
            let (Some(pos), Some(neg)) = (
                job(json!({ key: r })),
                job(json!({"negative_requirements": { key: r }})),
            ) else {
                return Ok(()); // not a valid requirement (e.g. a number-like string): rejected at submission
            };
            prop_assert_ne!(explain(&worker, &pos).matches, explain(&worker, &neg).matches);
        }

        /// Nested objects and dotted keys, in requirements and in capabilities, mean the same thing.
        #[test]
        fn nested_and_dotted_agree(r in scalar(), w in value()) {
            let nested = worker(json!({"hw": {"mem": w}}));
            let dotted = worker(json!({"hw.mem": w}));
            let (Some(a), Some(b)) = (job(json!({"hw": {"mem": r}})), job(json!({"hw.mem": r}))) else {
                return Ok(());
            };
            let verdict = explain(&nested, &a).matches;
            prop_assert_eq!(verdict, explain(&nested, &b).matches);
            prop_assert_eq!(verdict, explain(&dotted, &a).matches);
        }

        /// A verdict is `matches` exactly when there is no reason against it.
        #[test]
        fn verdict_and_reasons_agree(r in value(), w in value(), serve in any::<bool>()) {
            let mut worker = worker(json!({"k": w}));
            if !serve {
                worker.services = vec!["other".into()];
            }
            if let Some(spec) = job(json!({"k": r})) {
                let m = explain(&worker, &spec);
                prop_assert_eq!(m.matches, m.reasons.is_empty());
            }
        }
    }
}
