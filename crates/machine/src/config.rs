//! A machine's TOML file ([`MachineFile`]) and the seeds' environment names ([`Overrides`]:
//! `MACHINE_ID`, `NUM_GPUS`, `TEST_MODE`), resolved into a [`MachineSpec`]. Its `[worker]` table is
//! the file `fleetq worker --config` reads (one format, not two), with `{gpu}`, `{gpu_uuid}`,
//! `{port}` and `{port:NAME}` filled in per GPU. Unknown keys are refused with the key named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetq_core::RestartPolicy;
use fleetq_worker::config::WorkerFile;
use serde::Deserialize;

use crate::gpu::Gpu;

/// Why a machine configuration cannot be used; each names what to fix (the worker's error type:
/// a machine file embeds a worker file).
pub use fleetq_worker::config::ConfigError;

/// `gpus = "auto"` (detect) or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GpusSetting {
    /// A fixed count of stand-in GPUs (CPU boxes, tests).
    Count(u32),
    /// `"auto"`: detect them.
    Auto(AutoWord),
}

/// The word `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    /// Detect the GPUs.
    Auto,
}

/// The machine's file. Every key is optional except what a service needs.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    /// The machine's id (`MACHINE_ID`); default: the host name.
    pub machine_id: Option<String>,
    /// `"auto"` or a count (`NUM_GPUS`); default `"auto"`, or 1 in test mode.
    pub gpus: Option<GpusSetting>,
    /// Stand-in GPUs instead of detection (`TEST_MODE`).
    pub test_mode: Option<bool>,
    /// Memory of each stand-in GPU (GB), reported to matching when set.
    pub test_gpu_memory_gb: Option<u64>,
    /// The ceiling on a service's wait for readiness (s) while its process lives; default 1800.
    pub startup_timeout_s: Option<u64>,
    /// Seconds running jobs may finish after SIGTERM before they are released; default 25.
    pub shutdown_grace_s: Option<u64>,
    /// Where the local status endpoint (`GET /health`) listens; unset: none.
    pub status_listen: Option<SocketAddr>,
    /// Directory of the services' log files; default `logs`.
    pub log_dir: Option<PathBuf>,
    /// A log file is rotated (one `.1` kept) past this size; default 10 MiB.
    pub log_max_bytes: Option<u64>,
    /// The services started on every GPU, `[[services]]`.
    #[serde(default)]
    pub services: Vec<ServiceFile>,
    /// Every GPU's worker: the `fleetq worker --config` format, placeholders filled per GPU.
    pub worker: Option<toml::Table>,
}

/// One service run per GPU, `[[services]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Its name, e.g. `comfyui` (log prefix, `{port:NAME}`).
    pub name: String,
    /// The program and its arguments, with `{gpu}`, `{gpu_uuid}`, `{port}`.
    pub command: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment (`CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER` are set for it).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Its port on GPU 0; GPU `i` gets `base_port + i`.
    pub base_port: u16,
    /// Readiness: a URL (with `{port}`) whose answer must be JSON, e.g.
    /// `http://127.0.0.1:{port}/system_stats`. Default: that URL.
    pub ready_url: Option<String>,
    /// Commands run once before the first start (each must exit 0), e.g. installing nodes.
    #[serde(default)]
    pub setup: Vec<Vec<String>>,
    /// How crashes are restarted.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL to its process group; default 10.
    pub stop_timeout_s: Option<u64>,
    /// A job payload run once on every GPU through its worker's connector for this service, after
    /// the service is ready and before the worker claims (loads the model into GPU memory). It
    /// must succeed, or the startup fails with its error.
    pub warmup: Option<serde_json::Value>,
}

impl MachineFile {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        fleetq_worker::config::load_toml(path)
    }

    /// Parses a file's text; the error names the key and line.
    pub fn parse(text: &str) -> Result<Self, String> {
        fleetq_worker::config::parse_toml(text)
    }
}

/// Values that take precedence over the file (flags and the seeds' environment names).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `MACHINE_ID`.
    pub machine_id: Option<String>,
    /// `NUM_GPUS`.
    pub num_gpus: Option<u32>,
    /// `TEST_MODE`.
    pub test_mode: Option<bool>,
}

/// Where the GPUs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    /// Detect them (`nvidia-smi`).
    Detect,
    /// Stand-ins: a count, and the memory reported for each (if any).
    Configured {
        /// How many.
        count: u32,
        /// GB each, for matching; `None` reports no GPU hardware.
        memory_gb: Option<u64>,
    },
}

/// A service as the supervisor runs it (placeholders still to fill per GPU).
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Its name.
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Port on GPU 0.
    pub base_port: u16,
    /// Readiness URL template.
    pub ready_url: String,
    /// Setup commands.
    pub setup: Vec<Vec<String>>,
    /// Restart rule.
    pub restart: RestartPolicy,
    /// SIGTERM → SIGKILL wait.
    pub stop_timeout: Duration,
    /// The warm-up job's payload.
    pub warmup: Option<serde_json::Value>,
}

impl ServiceSpec {
    /// Its port on `gpu`, or an error when it would pass 65535.
    pub fn port(&self, gpu: u32) -> Result<u16, ConfigError> {
        u16::try_from(gpu).ok().and_then(|g| self.base_port.checked_add(g)).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "service {}: base_port {} + GPU {gpu} is past 65535",
                self.name, self.base_port
            ))
        })
    }
}

pub use crate::gpu::MAX_GPUS;

/// What a machine runs, resolved.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Its id.
    pub machine_id: String,
    /// Its GPUs' source.
    pub gpus: GpuSource,
    /// Services per GPU.
    pub services: Vec<ServiceSpec>,
    /// The worker table (placeholders unfilled).
    pub worker: toml::Table,
    /// Readiness ceiling.
    pub startup_timeout: Duration,
    /// Drain grace.
    pub shutdown_grace: Duration,
    /// Local status address.
    pub status_listen: Option<SocketAddr>,
    /// Log directory.
    pub log_dir: PathBuf,
    /// Rotation size.
    pub log_max_bytes: u64,
}

/// Resolves a file and its overrides. `default_id` names the machine when nothing else does.
pub fn resolve(file: &MachineFile, over: &Overrides, default_id: &str) -> Result<MachineSpec, ConfigError> {
    let machine_id =
        over.machine_id.clone().or_else(|| file.machine_id.clone()).unwrap_or_else(|| default_id.into());
    fleetq_core::validate::check_name("machine_id", &machine_id)
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let test_mode = over.test_mode.or(file.test_mode).unwrap_or(false);
    let count = over.num_gpus.or(match file.gpus {
        Some(GpusSetting::Count(n)) => Some(n),
        _ => None,
    });
    let gpus = match (count, test_mode) {
        (Some(n), _) if n > MAX_GPUS => {
            return Err(ConfigError::Invalid(format!("gpus (NUM_GPUS) is {n}: at most {MAX_GPUS}")));
        }
        (Some(0), _) => return Err(ConfigError::Invalid("gpus (NUM_GPUS) must be at least 1".into())),
        (Some(n), _) => GpuSource::Configured { count: n, memory_gb: file.test_gpu_memory_gb },
        (None, true) => GpuSource::Configured { count: 1, memory_gb: file.test_gpu_memory_gb },
        (None, false) => GpuSource::Detect,
    };
    let mut services = Vec::new();
    for s in &file.services {
        fleetq_core::validate::check_name("services.name", &s.name)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if s.command.is_empty() || s.command[0].trim().is_empty() {
            return Err(ConfigError::Invalid(format!("service {}: command is empty", s.name)));
        }
        if services.iter().any(|o: &ServiceSpec| o.name == s.name) {
            return Err(ConfigError::Invalid(format!("service {} is declared twice", s.name)));
        }
        services.push(ServiceSpec {
            name: s.name.clone(),
            command: s.command.clone(),
            cwd: s.cwd.clone(),
            env: s.env.clone(),
            base_port: s.base_port,
            ready_url: s.ready_url.clone().unwrap_or_else(|| "http://127.0.0.1:{port}/system_stats".into()),
            setup: s.setup.clone(),
            restart: s.restart,
            stop_timeout: Duration::from_secs(s.stop_timeout_s.unwrap_or(10).clamp(1, 600)),
            warmup: s.warmup.clone(),
        });
    }
    let worker = file.worker.clone().unwrap_or_default();
    for key in ["worker_id", "machine_id", "redis_url", "queue"] {
        if worker.contains_key(key) {
            return Err(ConfigError::Invalid(format!(
                "worker.{key}: a machine names its workers and its broker itself; remove it"
            )));
        }
    }
    Ok(MachineSpec {
        machine_id,
        gpus,
        services,
        worker,
        startup_timeout: Duration::from_secs(file.startup_timeout_s.unwrap_or(1800).clamp(1, 86_400)),
        shutdown_grace: Duration::from_secs(file.shutdown_grace_s.unwrap_or(25).min(3600)),
        status_listen: file.status_listen,
        log_dir: file.log_dir.clone().unwrap_or_else(|| "logs".into()),
        log_max_bytes: file.log_max_bytes.unwrap_or(10 * 1024 * 1024).max(4096),
    })
}

/// The placeholders of one GPU: `{gpu}`, `{gpu_uuid}`, `{port}` (the first service's port) and
/// `{port:NAME}`.
#[derive(Debug, Clone)]
pub struct Placeholders {
    pairs: Vec<(String, String)>,
}

impl Placeholders {
    /// The placeholders of `gpu` given the services' ports on it (first = `{port}`).
    pub fn new(gpu: &Gpu, ports: &[(String, u16)]) -> Self {
        let mut pairs =
            vec![("{gpu}".to_owned(), gpu.index.to_string()), ("{gpu_uuid}".into(), gpu.uuid.clone())];
        if let Some((_, port)) = ports.first() {
            pairs.push(("{port}".into(), port.to_string()));
        }
        for (name, port) in ports {
            pairs.push((format!("{{port:{name}}}"), port.to_string()));
        }
        Self { pairs }
    }

    /// `text` with every placeholder filled.
    pub fn fill(&self, text: &str) -> String {
        self.pairs.iter().fold(text.to_owned(), |t, (k, v)| t.replace(k.as_str(), v))
    }

    /// Fills every string of a TOML value.
    fn fill_value(&self, v: &mut toml::Value) {
        match v {
            toml::Value::String(s) => *s = self.fill(s),
            toml::Value::Array(a) => a.iter_mut().for_each(|x| self.fill_value(x)),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| self.fill_value(x)),
            _ => {}
        }
    }
}

/// The worker file of one GPU: the `[worker]` table with its placeholders filled, its identity set
/// (`<machine>-gpu<i>`), and the GPU's model and memory added to its capabilities.
pub fn worker_file(
    spec: &MachineSpec,
    gpu: &Gpu,
    fill: &Placeholders,
    report_hardware: bool,
) -> Result<WorkerFile, ConfigError> {
    let mut table = toml::Value::Table(spec.worker.clone());
    fill.fill_value(&mut table);
    let mut file: WorkerFile = table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(format!("[worker]: {}", e.message())))?;
    file.worker_id = Some(format!("{}-gpu{}", spec.machine_id, gpu.index));
    file.machine_id = Some(spec.machine_id.clone());
    if report_hardware {
        let caps = file.capabilities.get_or_insert_with(Default::default);
        let hardware = caps
            .0
            .entry("hardware".to_owned())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(h) = hardware {
            h.entry("gpu_memory_gb").or_insert_with(|| gpu.memory_gb().into());
            h.entry("gpu_model").or_insert_with(|| gpu.name.clone().into());
            h.entry("gpu_uuid").or_insert_with(|| gpu.uuid.clone().into());
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu;

    const EXAMPLE: &str = r#"
        machine_id = "box1"
        gpus = 2
        test_gpu_memory_gb = 24
        [[services]]
        name = "comfyui"
        command = ["python", "main.py", "--port", "{port}", "--cuda-device", "{gpu}"]
        base_port = 8188
        setup = [["true"]]
        [services.restart]
        max_crashes = 3
        [worker]
        health_interval_s = 2
        [[worker.connectors]]
        type = "comfyui"
        service = "comfyui"
        url = "http://127.0.0.1:{port:comfyui}"
    "#;

    #[test]
    fn a_file_resolves_and_fills_each_gpu() {
        let file = MachineFile::parse(EXAMPLE).expect("parses");
        let spec = resolve(&file, &Overrides::default(), "host").expect("resolves");
        assert_eq!(spec.machine_id, "box1");
        assert_eq!(spec.gpus, GpuSource::Configured { count: 2, memory_gb: Some(24) });
        assert_eq!(spec.services[0].restart.max_crashes, 3);
        assert_eq!(spec.services[0].restart.backoff_base_ms, RestartPolicy::default().backoff_base_ms);
        let gpus = gpu::configured(2, 24);
        let port = spec.services[0].port(1).expect("port");
        assert_eq!(port, 8189);
        let fill = Placeholders::new(&gpus[1], &[("comfyui".into(), port)]);
        assert_eq!(
            fill.fill(&spec.services[0].command.join(" ")),
            "python main.py --port 8189 --cuda-device 1"
        );
        let worker = worker_file(&spec, &gpus[1], &fill, true).expect("worker");
        assert_eq!(worker.worker_id.as_deref(), Some("box1-gpu1"));
        assert_eq!(worker.connectors.len(), 1);
        let caps = worker.capabilities.expect("capabilities");
        assert_eq!(caps.lookup("hardware.gpu_memory_gb"), Some(&serde_json::json!(24)));
        let spec_text = format!("{:?}", worker.connectors[0]);
        assert!(spec_text.contains("http://127.0.0.1:8189"), "{spec_text}");
    }

    /// The README's example stays a file fleetq accepts.
    #[test]
    fn the_example_file_resolves() {
        let file = MachineFile::parse(include_str!("../../../examples/machine.toml")).expect("parses");
        let spec = resolve(&file, &Overrides::default(), "host").expect("resolves");
        assert_eq!(spec.gpus, GpuSource::Detect);
        let g = &gpu::configured(2, 24)[1];
        let port = spec.services[0].port(1).expect("port");
        let fill = Placeholders::new(g, &[("comfyui".into(), port)]);
        let worker = worker_file(&spec, g, &fill, true).expect("worker");
        assert!(format!("{:?}", worker.connectors[0]).contains("http://127.0.0.1:8189"));
    }

    #[test]
    fn environment_names_win_and_mistakes_are_named() {
        let file = MachineFile::parse(EXAMPLE).expect("parses");
        let over = Overrides { machine_id: Some("m2".into()), num_gpus: Some(4), test_mode: None };
        let spec = resolve(&file, &over, "host").expect("resolves");
        assert_eq!(
            (spec.machine_id.as_str(), &spec.gpus),
            ("m2", &GpuSource::Configured { count: 4, memory_gb: Some(24) })
        );
        let unknown = MachineFile::parse("gpu = 2").expect_err("unknown key");
        assert!(unknown.contains("gpu"), "{unknown}");
        let nested = MachineFile::parse("[[services]]\nname='a'\ncommand=['x']\nbase_port=1\nreadyurl='x'")
            .expect_err("unknown service key");
        assert!(nested.contains("readyurl"), "{nested}");
        let many = resolve(&file, &Overrides { num_gpus: Some(1000), ..Overrides::default() }, "h")
            .expect_err("many");
        assert!(many.to_string().contains("NUM_GPUS"), "{many}");
        let auto = resolve(&MachineFile::parse("gpus = \"auto\"").expect("auto"), &Overrides::default(), "h")
            .expect("resolves");
        assert_eq!(auto.gpus, GpuSource::Detect);
        let named = resolve(
            &MachineFile::parse("[worker]\nworker_id = 'x'").expect("parses"),
            &Overrides::default(),
            "h",
        )
        .expect_err("worker id");
        assert!(named.to_string().contains("worker.worker_id"), "{named}");
        let spec = resolve(&file, &Overrides::default(), "h").expect("resolves");
        let mut bad = spec.clone();
        bad.worker.insert("lease_mss".into(), toml::Value::Integer(1));
        let fill = Placeholders::new(&gpu::configured(1, 1)[0], &[]);
        let e = worker_file(&bad, &gpu::configured(1, 1)[0], &fill, false).expect_err("unknown worker key");
        assert!(e.to_string().contains("lease_mss"), "{e}");
        let port =
            ServiceSpec { base_port: 65535, ..spec.services[0].clone() }.port(1).expect_err("overflow");
        assert!(port.to_string().contains("65535"), "{port}");
    }
}
