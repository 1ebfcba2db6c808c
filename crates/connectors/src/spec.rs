//! Connectors described in configuration (`[[connectors]]` tables of the worker's TOML file) and
//! built from that description. A connector that cannot be built is not dropped: it becomes an
//! [`Unavailable`] connector that reports `offline` with the reason, so the fleet view shows it.

use std::path::Path;
use std::sync::Arc;

use fleetq_core::{FailureCategory, JobRecord};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::a1111::{A1111, A1111Config};
use crate::comfyui::{ComfyUi, ComfyUiConfig};
use crate::openai::{OpenAi, OpenAiConfig};
use crate::rest::{Rest, RestConfig};
use crate::simulation::{Simulation, SimulationConfig};
use crate::{CancellationToken, Connector, Health, JobError, ProgressSink};

/// One connector's description: its type and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant, reason = "built once per connector at start-up")]
pub enum ConnectorKind {
    /// The simulated service.
    Simulation(SimulationConfig),
    /// ComfyUI.
    Comfyui(ComfyUiConfig),
    /// AUTOMATIC1111 webui.
    A1111(A1111Config),
    /// An OpenAI-compatible API.
    Openai(OpenAiConfig),
    /// A generic REST service.
    Rest(RestConfig),
}

/// A connector as configured: what it is and how many jobs it may run at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorSpec {
    /// Type and settings.
    #[serde(flatten)]
    pub kind: ConnectorKind,
    /// Jobs this connector runs at the same time (default 1: one job per GPU).
    #[serde(default = "one")]
    pub max_concurrent_jobs: usize,
}

fn one() -> usize {
    1
}

impl ConnectorSpec {
    /// A spec with one job at a time.
    pub fn new(kind: ConnectorKind) -> Self {
        Self { kind, max_concurrent_jobs: 1 }
    }

    /// The default spec for a name in `WORKER_CONNECTORS`: `comfyui`, `a1111`, `openai`, `rest`,
    /// `simulation` or `NAME-sim`. `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        let kind = match name {
            "comfyui" => ConnectorKind::Comfyui(ComfyUiConfig::default()),
            "a1111" => ConnectorKind::A1111(A1111Config::default()),
            "openai" => ConnectorKind::Openai(OpenAiConfig::default()),
            "rest" => ConnectorKind::Rest(RestConfig::default()),
            n if n == "simulation" || n.ends_with("-sim") => ConnectorKind::Simulation(SimulationConfig {
                service: n.to_owned(),
                ..SimulationConfig::default()
            }),
            _ => return None,
        };
        Some(Self::new(kind))
    }

    /// The service this connector serves.
    pub fn service(&self) -> &str {
        match &self.kind {
            ConnectorKind::Simulation(c) => &c.service,
            ConnectorKind::Comfyui(c) => &c.service,
            ConnectorKind::A1111(c) => &c.service,
            ConnectorKind::Openai(c) => &c.service,
            ConnectorKind::Rest(c) => &c.service,
        }
    }

    /// Sets the artifacts directory of connectors that produce files and have none configured.
    pub fn default_artifacts_dir(&mut self, dir: &Path) {
        let slot = match &mut self.kind {
            ConnectorKind::Comfyui(c) => &mut c.artifacts_dir,
            ConnectorKind::A1111(c) => &mut c.artifacts_dir,
            ConnectorKind::Openai(c) => &mut c.artifacts_dir,
            ConnectorKind::Simulation(_) | ConnectorKind::Rest(_) => return,
        };
        if slot.is_none() {
            *slot = Some(dir.to_path_buf());
        }
    }

    /// Builds the connector. Must run inside a tokio runtime (ComfyUI starts its socket task).
    /// A connector that cannot be built comes back as [`Unavailable`] with the reason.
    pub fn build(&self) -> Arc<dyn Connector> {
        let built: Result<Arc<dyn Connector>, JobError> = match &self.kind {
            ConnectorKind::Simulation(c) => Ok(Arc::new(Simulation::new(c.clone()))),
            ConnectorKind::Comfyui(c) => ComfyUi::new(c.clone()).map(|c| Arc::new(c) as Arc<dyn Connector>),
            ConnectorKind::A1111(c) => A1111::new(c.clone()).map(|c| Arc::new(c) as Arc<dyn Connector>),
            ConnectorKind::Openai(c) => OpenAi::new(c.clone()).map(|c| Arc::new(c) as Arc<dyn Connector>),
            ConnectorKind::Rest(c) => Rest::new(c.clone()).map(|c| Arc::new(c) as Arc<dyn Connector>),
        };
        built.unwrap_or_else(|e| Arc::new(Unavailable::new(self.service(), e.message)))
    }
}

/// A configured connector that cannot run (unknown type, bad settings): it stays registered and
/// reports `offline` with the reason, and never takes a job.
#[derive(Debug)]
pub struct Unavailable {
    service: String,
    reason: String,
}

impl Unavailable {
    /// A connector for `service` that is down for `reason`.
    pub fn new(service: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { service: service.into(), reason: reason.into() }
    }
}

impl Connector for Unavailable {
    fn service(&self) -> &str {
        &self.service
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move { Health::offline(self.reason.clone()) })
    }

    fn process<'a>(
        &'a self,
        _job: &'a JobRecord,
        _progress: ProgressSink,
        _cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, JobError>> {
        Box::pin(async move { Err(JobError::retryable(FailureCategory::Connection, self.reason.clone())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        connectors: Vec<ConnectorSpec>,
    }

    #[test]
    fn a_toml_connector_list_parses_with_defaults() {
        let text = r#"
            [[connectors]]
            type = "comfyui"
            url = "http://10.0.0.2:8188"

            [[connectors]]
            type = "openai"
            base_url = "http://127.0.0.1:8000/v1"
            max_concurrent_jobs = 4

            [[connectors]]
            type = "rest"
            service = "upscale"
            path = "/jobs"
            [connectors.async]
            status_path = "/jobs/{id}"
            poll_ms = 500

            [[connectors]]
            type = "simulation"
            service = "comfyui-sim"
            step_ms = 5
        "#;
        let file: File = toml::from_str(text).expect("parses");
        let services: Vec<&str> = file.connectors.iter().map(ConnectorSpec::service).collect();
        assert_eq!(services, ["comfyui", "openai", "upscale", "comfyui-sim"]);
        assert_eq!(file.connectors[0].max_concurrent_jobs, 1);
        assert_eq!(file.connectors[1].max_concurrent_jobs, 4);
        let ConnectorKind::Rest(rest) = &file.connectors[2].kind else { panic!("rest") };
        assert_eq!(rest.polling.as_ref().map(|p| p.poll_ms), Some(500));
    }

    #[test]
    fn unknown_types_and_keys_are_errors_that_name_them() {
        let err = |text: &str| toml::from_str::<File>(text).err().map(|e| e.to_string()).unwrap_or_default();
        let e = err("[[connectors]]\ntype = \"midjourney\"\n");
        assert!(e.contains("midjourney"), "{e}");
        let e = err("[[connectors]]\ntype = \"comfyui\"\nurll = \"x\"\n");
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn names_from_the_environment() {
        for (name, service) in [
            ("comfyui", "comfyui"),
            ("a1111", "a1111"),
            ("openai", "openai"),
            ("rest", "rest"),
            ("x-sim", "x-sim"),
        ] {
            assert_eq!(
                ConnectorSpec::from_name(name).map(|s| s.service().to_owned()),
                Some(service.to_owned())
            );
        }
        assert!(ConnectorSpec::from_name("midjourney").is_none());
    }

    #[tokio::test]
    async fn a_connector_that_cannot_be_built_reports_offline_with_the_reason() {
        let spec = ConnectorSpec::new(ConnectorKind::Rest(RestConfig {
            method: "BAD METHOD".into(),
            ..RestConfig::default()
        }));
        let c = spec.build();
        assert_eq!(c.service(), "rest");
        let h = c.health().await;
        assert_eq!(h.status, fleetq_core::ConnectorStatus::Offline);
        assert!(h.message.is_some_and(|m| m.contains("bad method")));
    }
}
