//! A worker's configuration as an operator gives it: a TOML file ([`WorkerFile`]) and overrides
//! ([`Overrides`], from flags and environment variables), resolved into what a worker process
//! needs ([`Settings`]): its [`WorkerConfig`], its built connectors and where its broker is.
//! Precedence: override > file > default. One format for every process that runs workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetq_connectors::Connector;
use fleetq_connectors::spec::{ConnectorKind, ConnectorSpec, Unavailable};
use fleetq_core::{Capabilities, WorkerRegistration};
use serde::Deserialize;
use thiserror::Error;

use crate::WorkerConfig;

/// Where a worker's broker is when nothing says otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// The queue name when nothing says otherwise.
pub const DEFAULT_QUEUE: &str = "fleetq";
/// The shortest lease accepted (renewals need room inside it).
pub const MIN_LEASE_MS: i64 = 100;

/// Why a configuration cannot be used; each names what to fix.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML file does not parse or has an unknown key.
    #[error("in {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key and line.
        message: String,
    },
    /// A value is missing or out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The worker's TOML file. Every key is optional; an unknown key is an error that names it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    /// Redis of the fleet.
    pub redis_url: Option<String>,
    /// CA certificate (PEM) a `rediss://` Redis's certificate must chain to.
    pub redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with a `rediss://` Redis.
    pub redis_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub redis_key: Option<PathBuf>,
    /// Queue name.
    pub queue: Option<String>,
    /// Stable worker identity.
    pub worker_id: Option<String>,
    /// The machine it runs on.
    pub machine_id: Option<String>,
    /// What matching sees.
    pub capabilities: Option<Capabilities>,
    /// Seconds a running job may finish after a shutdown request.
    pub shutdown_grace_s: Option<u64>,
    /// Lease length (ms).
    pub lease_ms: Option<i64>,
    /// Default artifacts directory of the connectors.
    pub artifacts_dir: Option<PathBuf>,
    /// Seconds between connector health checks.
    pub health_interval_s: Option<u64>,
    /// Default progress timeout (s).
    pub progress_timeout_s: Option<u64>,
    /// The connectors, `[[connectors]]`.
    #[serde(default)]
    pub connectors: Vec<ConnectorSpec>,
}

impl WorkerFile {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// Parses a file's text; the error names the key and line.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_toml(text)
    }
}

/// Reads and parses a TOML configuration file (this one's, or a machine's that embeds it).
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_toml(&text).map_err(|message| ConfigError::File { path: path.to_owned(), message })
}

/// Parses TOML text; the error names the key and line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// Values that take precedence over the file (flags and environment variables).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Redis of the fleet.
    pub redis_url: Option<String>,
    /// TLS files of a `rediss://` Redis (each one given replaces the file's).
    pub redis_tls: fleetq_broker::RedisTls,
    /// Queue name.
    pub queue: Option<String>,
    /// Stable worker identity.
    pub worker_id: Option<String>,
    /// The machine it runs on.
    pub machine_id: Option<String>,
    /// Connectors to load by name (`comfyui`, `a1111`, `openai`, `rest`, `simulation`, `NAME-sim`,
    /// or a file entry's service); `None` loads every connector of the file.
    pub connectors: Option<Vec<String>>,
    /// What matching sees.
    pub capabilities: Option<Capabilities>,
    /// Seconds a running job may finish after a shutdown request.
    pub shutdown_grace_s: Option<u64>,
    /// Lease length (ms).
    pub lease_ms: Option<i64>,
    /// ComfyUI base URL for a `comfyui` named in `connectors`.
    pub comfyui_url: Option<String>,
    /// A1111 base URL for an `a1111` named in `connectors`.
    pub a1111_url: Option<String>,
    /// OpenAI-compatible base URL for an `openai` named in `connectors`.
    pub openai_base_url: Option<String>,
    /// Default artifacts directory of the connectors.
    pub artifacts_dir: Option<PathBuf>,
    /// Seconds between connector health checks.
    pub health_interval_s: Option<u64>,
    /// Default progress timeout (s).
    pub progress_timeout_s: Option<u64>,
    /// Step duration of simulation connectors named in `connectors`.
    pub simulation_step_ms: Option<u64>,
}

/// What a worker process runs with.
pub struct Settings {
    /// The worker's configuration (identity, capabilities, timings, concurrency).
    pub worker: WorkerConfig,
    /// Its connectors, built.
    pub connectors: Vec<Arc<dyn Connector>>,
    /// Its broker's Redis.
    pub redis_url: String,
    /// The TLS files of a `rediss://` Redis.
    pub redis_tls: fleetq_broker::RedisTls,
    /// Its queue.
    pub queue: String,
    /// Its lease length (ms).
    pub lease_ms: i64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("worker", &self.worker)
            .field("connectors", &self.connectors.iter().map(|c| c.service()).collect::<Vec<_>>())
            .field("redis_url", &fleetq_core::url::redacted(&self.redis_url))
            .field("redis_tls", &self.redis_tls)
            .field("queue", &self.queue)
            .field("lease_ms", &self.lease_ms)
            .finish()
    }
}

/// Capabilities given on a command line: a JSON object, or `@path` to a JSON file.
pub fn capabilities_arg(text: &str) -> Result<Capabilities, ConfigError> {
    let json = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: PathBuf::from(path), source })?,
        None => text.to_owned(),
    };
    serde_json::from_str(&json)
        .map_err(|e| ConfigError::Invalid(format!("capabilities must be a JSON object: {e}")))
}

/// Resolves a file and its overrides into a worker's settings, building its connectors.
pub fn resolve(file: &WorkerFile, over: &Overrides) -> Result<Settings, ConfigError> {
    let worker_id = over.worker_id.clone().or_else(|| file.worker_id.clone()).ok_or_else(|| {
        ConfigError::Invalid(
            "a worker needs a stable identity: set WORKER_ID (or --worker-id, or worker_id in the config file)"
                .into(),
        )
    })?;
    let machine_id = over.machine_id.clone().or_else(|| file.machine_id.clone()).ok_or_else(|| {
        ConfigError::Invalid(
            "a worker needs its machine: set MACHINE_ID (or --machine-id, or machine_id in the config file)"
                .into(),
        )
    })?;
    let capabilities = over.capabilities.clone().or_else(|| file.capabilities.clone()).unwrap_or_default();
    let lease_ms = over.lease_ms.or(file.lease_ms).unwrap_or(30_000);
    if lease_ms < MIN_LEASE_MS {
        return Err(ConfigError::Invalid(format!(
            "the lease (--lease-ms, FLEETQ_LEASE_MS, lease_ms) must be at least {MIN_LEASE_MS} ms"
        )));
    }
    let artifacts_dir = over.artifacts_dir.clone().or_else(|| file.artifacts_dir.clone());
    let mut connectors = Vec::new();
    let mut max_concurrent = BTreeMap::new();
    for (connector, limit) in build_connectors(over, file, artifacts_dir.as_deref())? {
        max_concurrent.insert(connector.service().to_owned(), limit);
        connectors.push(connector);
    }
    let registration = WorkerRegistration { worker_id, machine_id, services: Vec::new(), capabilities };
    let mut worker = WorkerConfig::new(registration);
    worker.max_concurrent = max_concurrent;
    worker.shutdown_grace =
        Duration::from_secs(over.shutdown_grace_s.or(file.shutdown_grace_s).unwrap_or(30));
    worker.health_every =
        Duration::from_secs(over.health_interval_s.or(file.health_interval_s).unwrap_or(5).max(1));
    worker.default_progress_timeout =
        over.progress_timeout_s.or(file.progress_timeout_s).map(Duration::from_secs);
    Ok(Settings {
        worker,
        connectors,
        redis_url: over
            .redis_url
            .clone()
            .or_else(|| file.redis_url.clone())
            .unwrap_or_else(|| DEFAULT_REDIS_URL.into()),
        redis_tls: fleetq_broker::RedisTls {
            ca_file: over.redis_tls.ca_file.clone().or_else(|| file.redis_ca.clone()),
            cert_file: over.redis_tls.cert_file.clone().or_else(|| file.redis_cert.clone()),
            key_file: over.redis_tls.key_file.clone().or_else(|| file.redis_key.clone()),
        },
        queue: over.queue.clone().or_else(|| file.queue.clone()).unwrap_or_else(|| DEFAULT_QUEUE.into()),
        lease_ms,
    })
}

/// A built connector and how many jobs it may run at once.
type Built = (Arc<dyn Connector>, usize);

/// The connectors to load, from the names asked for and the file's entries, built, with their
/// concurrency limits. A name that matches no connector is loaded as [`Unavailable`] (registered
/// `offline` with the reason) so the fleet view shows the mistake instead of the worker refusing
/// to start.
fn build_connectors(
    over: &Overrides,
    file: &WorkerFile,
    artifacts_dir: Option<&Path>,
) -> Result<Vec<Built>, ConfigError> {
    let build = |mut spec: ConnectorSpec| -> Built {
        if let Some(dir) = artifacts_dir {
            spec.default_artifacts_dir(dir);
        }
        (spec.build(), spec.max_concurrent_jobs)
    };
    let Some(names) = &over.connectors else {
        if file.connectors.is_empty() {
            return Err(ConfigError::Invalid(
                "no connectors: set WORKER_CONNECTORS (e.g. comfyui) or add [[connectors]] to the config file"
                    .into(),
            ));
        }
        return Ok(file.connectors.iter().cloned().map(build).collect());
    };
    let mut built = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if let Some(spec) = file.connectors.iter().find(|c| c.service() == name) {
            built.push(build(spec.clone()));
            continue;
        }
        let Some(mut spec) = ConnectorSpec::from_name(name) else {
            let reason = format!(
                "unknown connector {name:?}: not a [[connectors]] service of the config file, nor one of comfyui, a1111, openai, rest, simulation, NAME-sim"
            );
            tracing::error!(connector = name, "{reason}");
            built.push((Arc::new(Unavailable::new(name, reason)), 1));
            continue;
        };
        match &mut spec.kind {
            ConnectorKind::Comfyui(c) => {
                if let Some(url) = &over.comfyui_url {
                    c.url.clone_from(url);
                }
            }
            ConnectorKind::A1111(c) => {
                if let Some(url) = &over.a1111_url {
                    c.url.clone_from(url);
                }
            }
            ConnectorKind::Openai(c) => {
                if let Some(url) = &over.openai_base_url {
                    c.base_url.clone_from(url);
                }
            }
            ConnectorKind::Simulation(c) => {
                if let Some(ms) = over.simulation_step_ms {
                    c.step_ms = ms;
                }
            }
            ConnectorKind::Rest(_) => {}
        }
        built.push(build(spec));
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Overrides {
        Overrides {
            worker_id: Some("box1-gpu0".into()),
            machine_id: Some("box1".into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn overrides_win_over_the_file_and_defaults_fill_the_rest() {
        let file = WorkerFile::parse(
            r#"
            worker_id = "from-file"
            machine_id = "box1"
            queue = "q1"
            lease_ms = 5000
            health_interval_s = 2
            redis_ca = "/etc/fleetq/ca.pem"
            redis_key = "/etc/fleetq/client.key"
            [capabilities]
            gpu = "rtx4090"
            [[connectors]]
            type = "simulation"
            service = "simulation"
            max_concurrent_jobs = 3
            "#,
        )
        .expect("parses");
        let over = Overrides {
            worker_id: Some("from-flag".into()),
            lease_ms: Some(7000),
            redis_tls: fleetq_broker::RedisTls {
                key_file: Some("/run/key.pem".into()),
                ..Default::default()
            },
            ..Overrides::default()
        };
        let s = resolve(&file, &over).expect("resolves");
        assert_eq!(s.redis_tls.ca_file.as_deref(), Some(Path::new("/etc/fleetq/ca.pem")), "from the file");
        assert_eq!(s.redis_tls.key_file.as_deref(), Some(Path::new("/run/key.pem")), "the flag wins");
        assert_eq!(s.redis_tls.cert_file, None);
        assert_eq!(s.worker.registration.worker_id, "from-flag");
        assert_eq!(s.worker.registration.machine_id, "box1");
        assert_eq!((s.queue.as_str(), s.lease_ms, s.redis_url.as_str()), ("q1", 7000, DEFAULT_REDIS_URL));
        assert_eq!(s.worker.health_every, Duration::from_secs(2));
        assert_eq!(s.worker.shutdown_grace, Duration::from_secs(30));
        assert_eq!(s.worker.max_concurrent.get("simulation"), Some(&3));
        assert_eq!(s.connectors.len(), 1);
        assert_eq!(s.worker.registration.capabilities.lookup("gpu"), Some(&serde_json::json!("rtx4090")));
    }

    /// The README's example file stays one fleetq accepts.
    #[test]
    fn the_example_file_loads() {
        let file = WorkerFile::parse(include_str!("../../../examples/worker.toml")).expect("parses");
        assert_eq!(file.worker_id.as_deref(), Some("box1-gpu0"));
        assert_eq!(file.connectors.len(), 3);
        assert_eq!(file.connectors[1].max_concurrent_jobs, 8);
        // The README shows the same file.
        let example = include_str!("../../../examples/worker.toml");
        let body: String =
            example.lines().skip_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        assert!(include_str!("../../../README.md").contains(&body), "README and examples/worker.toml differ");
    }

    #[test]
    fn errors_name_what_to_fix() {
        let unknown = WorkerFile::parse("worker_idd = \"x\"").expect_err("an unknown key");
        assert!(unknown.contains("worker_idd"), "{unknown}");
        let no_id = resolve(&WorkerFile::default(), &Overrides::default()).expect_err("no identity");
        assert!(no_id.to_string().contains("WORKER_ID"), "{no_id}");
        let none = resolve(&WorkerFile::default(), &ids()).expect_err("no connectors");
        assert!(none.to_string().contains("WORKER_CONNECTORS"), "{none}");
        let short = Overrides { lease_ms: Some(5), connectors: Some(vec!["simulation".into()]), ..ids() };
        assert!(
            resolve(&WorkerFile::default(), &short).expect_err("short lease").to_string().contains("lease")
        );
        assert!(capabilities_arg("[1]").is_err(), "capabilities are an object");
        assert!(matches!(capabilities_arg("@/nonexistent/caps.json"), Err(ConfigError::Read { .. })));
    }

    // The ComfyUI connector starts its socket task when built: a runtime is needed.
    #[tokio::test]
    async fn named_connectors_are_built_and_an_unknown_name_is_kept_offline() {
        let over = Overrides {
            connectors: Some(vec!["comfyui".into(), "bogus".into(), "flux-sim".into()]),
            comfyui_url: Some("http://127.0.0.1:9999".into()),
            ..ids()
        };
        let s = resolve(&WorkerFile::default(), &over).expect("resolves");
        let services: Vec<&str> = s.connectors.iter().map(|c| c.service()).collect();
        assert_eq!(services, ["comfyui", "bogus", "flux-sim"]);
        let bogus = s.connectors[1].health().await;
        assert_eq!(bogus.status, fleetq_core::ConnectorStatus::Offline);
        assert!(bogus.message.is_some_and(|m| m.contains("unknown connector")), "the reason is shown");
    }
}
