//! Worker classes: workers that every partition judges alike. Matching reads only a worker's
//! services and capabilities, so workers with equal ones (the GPUs of a fleet's identical boxes)
//! form one class and share one match result per partition. Brokers index pending work per class
//! (the head of every partition the class matches, in claim order), so a claim reads one ordered
//! index whatever the number of partitions, and a new partition is matched against the few classes
//! instead of every worker rebuilding its view.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::matching::serves_partition;
use crate::partition::PartitionSpec;
use crate::worker::{Capabilities, WorkerRegistration};

/// How long (ms) a class without a worker is kept before the reaper drops it. A worker moving
/// between classes (its services fill up and free up, it restarts) finds them ready instead of
/// matching every partition again; the partitions only such a class matched are flagged
/// unworkable when it is dropped.
pub const CLASS_IDLE_MS: i64 = 60_000;

/// What matching reads of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// Services, sorted and deduplicated.
    pub services: Vec<String>,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Capabilities,
}

/// A class's stable key: 64 bits of SHA-256 over the canonical class spec, in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClassKey(pub String);

impl ClassSpec {
    /// The class of a registration.
    pub fn of(reg: &WorkerRegistration) -> Self {
        let mut services = reg.services.clone();
        services.sort();
        services.dedup();
        Self { services, capabilities: reg.capabilities.clone() }
    }

    /// Its stable key. Object keys are hashed sorted, so equal meanings hash alike whatever the
    /// order a worker wrote them in.
    pub fn key(&self) -> ClassKey {
        let mut h = Sha256::new();
        for s in &self.services {
            h.update(s.as_bytes());
            h.update([0]);
        }
        h.update([1]);
        h.update(canonical(&Value::Object(self.capabilities.0.clone())).as_bytes());
        let digest = h.finalize();
        ClassKey(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
    }

    /// Whether workers of this class may serve the partition's jobs (the workflow rule aside).
    pub fn matches(&self, partition: &PartitionSpec) -> bool {
        serves_partition(&self.services, &self.capabilities, partition)
    }

    /// The workflow a worker of this class is restricted to.
    pub fn workflow_restriction(&self) -> Option<&str> {
        self.capabilities.workflow_restriction()
    }
}

/// JSON text with every object's keys sorted.
fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&map[k]))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn reg(id: &str, services: &[&str], caps: serde_json::Value) -> WorkerRegistration {
        WorkerRegistration {
            worker_id: id.into(),
            machine_id: format!("m-{id}"),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            capabilities: serde_json::from_value(caps).unwrap(),
        }
    }

    #[test]
    fn identity_is_not_part_of_the_class() {
        let a = reg("a", &["comfyui", "a1111"], json!({"gpu": {"vram": 24}, "models": ["sdxl"]}));
        let b = reg("b", &["a1111", "comfyui", "comfyui"], json!({"models": ["sdxl"], "gpu": {"vram": 24}}));
        assert_eq!(ClassSpec::of(&a).key(), ClassSpec::of(&b).key());
        let c = reg("c", &["comfyui", "a1111"], json!({"gpu": {"vram": 48}, "models": ["sdxl"]}));
        assert_ne!(ClassSpec::of(&a).key(), ClassSpec::of(&c).key());
        assert_eq!(ClassSpec::of(&a).key().0.len(), 16);
    }

    #[test]
    fn a_class_matches_as_its_workers_do() {
        let w = reg("a", &["comfyui"], json!({"vram": 24}));
        let class = ClassSpec::of(&w);
        for (vram, want) in [(16, true), (24, true), (48, false)] {
            let p = PartitionSpec {
                service: "comfyui".into(),
                requirements: crate::Requirements::parse(&json!({"vram": vram}), "r").unwrap(),
                customer_id: None,
            };
            assert_eq!(class.matches(&p), want);
            assert_eq!(class.matches(&p), crate::matches_partition(&w, &p));
        }
    }
}
