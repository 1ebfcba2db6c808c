//! The GPUs of a box, keyed by UUID (device order can change between boots): detected through
//! NVML (`nvml-wrapper` loads the driver's library at run time, so a GPU-less box builds and runs),
//! else from `nvidia-smi`'s CSV query, or a configured count for CPU boxes and tests
//! (`TEST_MODE`, `NUM_GPUS`). The CSV parser is pure and tested on recorded output; a box without
//! the driver fails detection with a message that says how to configure a count instead.

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

/// Most GPUs one machine may declare or detect (a bound on a number from outside).
pub const MAX_GPUS: u32 = 64;

/// The columns asked of `nvidia-smi`, in the order [`parse_nvidia_smi`] reads them.
pub const NVIDIA_SMI_QUERY: &str = "index,uuid,pci.bus_id,name,memory.total,driver_version";

/// One GPU as the machine reports it and matching sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// Its index on this box (the `{gpu}` of templates; worker `<machine>-gpu<index>`).
    pub index: u32,
    /// Its stable identity (`GPU-…`; `TEST-GPU-<i>` for a configured count).
    pub uuid: String,
    /// PCI bus id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// Model name, e.g. `NVIDIA GeForce RTX 4090`.
    pub name: String,
    /// Total memory (MiB).
    pub memory_mib: u64,
    /// Driver version, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
}

impl Gpu {
    /// Memory in whole GB as matching compares it (`hardware.gpu_memory_gb`).
    pub fn memory_gb(&self) -> u64 {
        // nvidia-smi's MiB: 24564 MiB is sold as "24 GB"; round to the nearest.
        (self.memory_mib + 512) / 1024
    }
}

/// Why GPUs could not be detected.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GpuError {
    /// `nvidia-smi` could not be run or failed.
    #[error(
        "cannot detect GPUs with nvidia-smi ({0}); on a box without NVIDIA GPUs set NUM_GPUS (gpus = N) with TEST_MODE=true"
    )]
    Unavailable(String),
    /// Its output did not parse.
    #[error("nvidia-smi line {line}: {message}")]
    Parse {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// It answered, with no GPU.
    #[error("nvidia-smi lists no GPU")]
    None,
}

/// Parses `nvidia-smi --query-gpu=<NVIDIA_SMI_QUERY> --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(text: &str) -> Result<Vec<Gpu>, GpuError> {
    let mut gpus = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| GpuError::Parse { line: i + 1, message };
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        // The name may itself hold a comma; the fixed columns are at both ends.
        if cols.len() < 6 {
            return Err(err(format!("expected 6 columns ({NVIDIA_SMI_QUERY}), found {}", cols.len())));
        }
        let n = cols.len();
        let index = cols[0].parse::<u32>().map_err(|e| err(format!("index {:?}: {e}", cols[0])))?;
        let memory_mib =
            cols[n - 2].parse::<u64>().map_err(|e| err(format!("memory.total {:?}: {e}", cols[n - 2])))?;
        let known = |s: &str| (!s.is_empty() && !s.starts_with('[')).then(|| s.to_owned());
        gpus.push(Gpu {
            index,
            uuid: known(cols[1]).ok_or_else(|| err("no uuid".into()))?,
            pci_bus_id: known(cols[2]),
            name: cols[3..n - 2].join(", "),
            memory_mib,
            driver_version: known(cols[n - 1]),
        });
    }
    if gpus.is_empty() {
        return Err(GpuError::None);
    }
    gpus.sort_by_key(|g| g.index);
    Ok(gpus)
}

/// `count` stand-in GPUs for CPU boxes and tests, each with `memory_gb`.
pub fn configured(count: u32, memory_gb: u64) -> Vec<Gpu> {
    (0..count)
        .map(|index| Gpu {
            index,
            uuid: format!("TEST-GPU-{index}"),
            pci_bus_id: None,
            name: "test".into(),
            memory_mib: memory_gb.saturating_mul(1024),
            driver_version: None,
        })
        .collect()
}

/// Detects the GPUs: NVML first, `nvidia-smi` (bounded by `timeout`) when NVML cannot be loaded.
pub async fn detect(timeout: Duration) -> Result<Vec<Gpu>, GpuError> {
    match tokio::task::spawn_blocking(nvml).await {
        Ok(Ok(gpus)) if !gpus.is_empty() => return Ok(gpus),
        Ok(Ok(_)) => tracing::info!("NVML lists no GPU; asking nvidia-smi"),
        Ok(Err(e)) => tracing::info!(error = %e, "NVML unavailable; asking nvidia-smi"),
        Err(e) => tracing::warn!(error = %e, "NVML detection panicked; asking nvidia-smi"),
    }
    nvidia_smi(timeout).await
}

/// The GPUs NVML sees (blocking: the library is loaded and queried synchronously).
fn nvml() -> Result<Vec<Gpu>, nvml_wrapper::error::NvmlError> {
    let nvml = nvml_wrapper::Nvml::init()?;
    let driver_version = nvml.sys_driver_version().ok();
    let count = nvml.device_count()?.min(MAX_GPUS);
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index)?;
        gpus.push(Gpu {
            index,
            uuid: device.uuid()?,
            pci_bus_id: device.pci_info().ok().map(|p| p.bus_id),
            name: device.name()?,
            memory_mib: device.memory_info()?.total / (1024 * 1024),
            driver_version: driver_version.clone(),
        });
    }
    Ok(gpus)
}

/// Runs `nvidia-smi` (bounded by `timeout`) and parses its answer.
async fn nvidia_smi(timeout: Duration) -> Result<Vec<Gpu>, GpuError> {
    let run = tokio::process::Command::new("nvidia-smi")
        .arg(format!("--query-gpu={NVIDIA_SMI_QUERY}"))
        .arg("--format=csv,noheader,nounits")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| GpuError::Unavailable(format!("no answer within {} s", timeout.as_secs())))?
        .map_err(|e| GpuError::Unavailable(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(GpuError::Unavailable(format!("{}: {}", out.status, err.trim())));
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two GPUs as `nvidia-smi` 550 prints them, listed out of order.
    const RECORDED: &str = "\
1, GPU-5b0e3c1a-9f2d-4e7b-8c61-2d4f0a9e7b13, 00000000:41:00.0, NVIDIA GeForce RTX 4090, 24564, 550.54.14
0, GPU-3f1b1c4e-8a2b-11ee-b962-0242ac120002, 00000000:01:00.0, NVIDIA RTX A6000, 49140, 550.54.14
";

    #[test]
    fn recorded_output_parses_keyed_by_uuid() {
        let gpus = parse_nvidia_smi(RECORDED).expect("parses");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert_eq!(gpus[0].uuid, "GPU-3f1b1c4e-8a2b-11ee-b962-0242ac120002");
        assert_eq!(gpus[0].name, "NVIDIA RTX A6000");
        assert_eq!(gpus[0].memory_gb(), 48);
        assert_eq!(gpus[1].memory_gb(), 24);
        assert_eq!(gpus[1].pci_bus_id.as_deref(), Some("00000000:41:00.0"));
        assert_eq!(gpus[1].driver_version.as_deref(), Some("550.54.14"));
    }

    #[test]
    fn odd_output_is_named_not_panicked_on() {
        assert!(matches!(parse_nvidia_smi("\n\n"), Err(GpuError::None)));
        let short = parse_nvidia_smi("0, GPU-x, 24564").expect_err("short");
        assert!(short.to_string().contains("line 1") && short.to_string().contains("6 columns"), "{short}");
        let bad = parse_nvidia_smi("zero, GPU-x, 0:1, n, 1, d").expect_err("bad index");
        assert!(bad.to_string().contains("index"), "{bad}");
        // A name with a comma, and fields nvidia-smi could not read.
        let odd = parse_nvidia_smi("0, GPU-y, [N/A], Tesla T4, PCIe, 15360, [N/A]").expect("parses");
        assert_eq!(odd[0].name, "Tesla T4, PCIe");
        assert_eq!((odd[0].pci_bus_id.as_deref(), odd[0].driver_version.as_deref()), (None, None));
    }

    /// On a box without the NVIDIA driver both ways fail, and the error says what to set.
    #[tokio::test]
    async fn without_a_driver_detection_says_how_to_configure() {
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return; // a GPU box: detection is expected to work here
        }
        let e = detect(Duration::from_secs(10)).await.expect_err("no driver here");
        assert!(e.to_string().contains("NUM_GPUS"), "{e}");
    }

    #[test]
    fn a_configured_count_stands_in() {
        let gpus = configured(2, 24);
        assert_eq!(gpus.iter().map(|g| g.uuid.as_str()).collect::<Vec<_>>(), ["TEST-GPU-0", "TEST-GPU-1"]);
        assert_eq!(gpus[1].memory_gb(), 24);
    }
}
