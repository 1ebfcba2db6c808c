//! Partitions of the pending queue. Jobs that every worker judges alike — same service, same
//! requirements, same customer — share a partition, ordered by [`crate::OrderKey`]. Brokers index
//! the *head* of each partition under every worker class that matches it ([`crate::ClassSpec`]), so
//! incompatible jobs at the front of the queue can never hide a compatible job behind them, however
//! many there are, and matching runs once per (class, partition) rather than once per job.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobSpec;
use crate::requirements::Requirements;

/// Everything matching depends on except the workflow (applied per job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionSpec {
    /// Service name.
    pub service: String,
    /// Requirements.
    #[serde(default)]
    pub requirements: Requirements,
    /// Customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
}

impl PartitionSpec {
    /// The partition of a job.
    pub fn of(job: &JobSpec) -> Self {
        Self {
            service: job.service.clone(),
            requirements: job.requirements.clone(),
            customer_id: job.customer_id.clone(),
        }
    }

    /// Its stable key.
    pub fn key(&self) -> PartitionKey {
        let mut h = Sha256::new();
        h.update(self.service.as_bytes());
        h.update([0]);
        h.update(self.requirements.canonical().as_bytes());
        h.update([0]);
        h.update(self.customer_id.as_deref().unwrap_or("").as_bytes());
        let digest = h.finalize();
        let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
        PartitionKey(format!("{}:{hex}", self.service))
    }
}

/// A partition's key: `service:` + 80 bits of SHA-256 over the canonical partition spec. Stable
/// across processes and versions (it is stored).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionKey(pub String);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn same_meaning_same_key() {
        let mut a = JobSpec::new("comfyui", json!(1));
        a.requirements = Requirements::parse(&json!({"hardware": {"gpu_memory_gb": 16}}), "r").unwrap();
        let mut b = JobSpec::new("comfyui", json!(2));
        b.requirements = Requirements::parse(&json!({"hardware.gpu_memory_gb": 16}), "r").unwrap();
        b.priority = 9;
        b.workflow_id = Some("wf".into());
        assert_eq!(PartitionSpec::of(&a).key(), PartitionSpec::of(&b).key());
        b.customer_id = Some("acme".into());
        assert_ne!(PartitionSpec::of(&a).key(), PartitionSpec::of(&b).key());
        assert!(PartitionSpec::of(&a).key().0.starts_with("comfyui:"));
    }
}
