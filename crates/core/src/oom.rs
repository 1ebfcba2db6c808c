//! Where a job that ran out of memory may run next: a rule apart from I/O.
//!
//! Out-of-memory is retried only where another try can help. The connector tries once more on the
//! same worker after freeing the service's memory (unless the allocation is larger than the whole
//! device). After that the job runs again only on a worker with more GPU memory than the one that
//! failed: its positive requirement `hardware.gpu_memory_gb` is raised to at least one whole
//! gigabyte (GiB) more than that worker declares, and at least the failed allocation's size when the
//! service said it. A worker that declares no memory gives nothing to compare with, so the job fails
//! with the reason; so does a raised requirement that no worker of the fleet meets (the caller
//! checks the fleet, see [`crate::explain`]).

use serde_json::Value;

use crate::requirements::Requirements;

/// The capability and requirement path of a worker's GPU memory, in GiB.
pub const GPU_MEMORY_PATH: &str = "hardware.gpu_memory_gb";

/// Bytes in the gigabyte of `gpu_memory_gb` (GiB: a "24 GB" card holds 24 GiB).
const GIB: f64 = 1_073_741_824.0;

/// Largest memory requirement this rule writes (GiB): larger numbers are not a GPU's.
const MAX_GB: f64 = 1_048_576.0;

/// The requirements for the next attempt of a job that ran out of memory on a worker whose
/// `hardware.gpu_memory_gb` capability is `worker_memory_gb`, when an allocation of `alloc_bytes`
/// failed. `Err` says why no worker can be asked for more.
pub fn raised_requirements(
    current: &Requirements,
    worker_memory_gb: Option<&Value>,
    alloc_bytes: Option<u64>,
) -> Result<Requirements, String> {
    let had = match worker_memory_gb {
        None => {
            return Err(format!(
                "the worker declares no {GPU_MEMORY_PATH}, so no worker with more memory can be chosen \
                 (declare it on every GPU worker)"
            ));
        }
        Some(v) => v
            .as_f64()
            .filter(|m| m.is_finite() && *m >= 0.0)
            .ok_or_else(|| format!("the worker's {GPU_MEMORY_PATH} is {v}, not a number of GiB"))?,
    };
    let mut need = (had.floor() + 1.0).min(MAX_GB);
    if let Some(bytes) = alloc_bytes {
        need = need.max((bytes as f64 / GIB).ceil()).min(MAX_GB);
    }
    match current.positive.get(GPU_MEMORY_PATH) {
        None => {}
        Some(r) => match r.as_f64() {
            Some(r) => need = need.max(r),
            None => {
                return Err(format!(
                    "the job requires {GPU_MEMORY_PATH} = {r}, which cannot be raised to a larger number"
                ));
            }
        },
    }
    let mut next = current.clone();
    // A whole number of GiB: `need` is an integer at most MAX_GB here.
    next.positive.insert(GPU_MEMORY_PATH.to_owned(), Value::from(need as u64));
    Ok(next)
}

/// The size in bytes of the allocation an out-of-memory message names: PyTorch's CPU allocator
/// (`you tried to allocate 4398046511104 bytes`) and its CUDA allocator (`Tried to allocate
/// 20.00 GiB`). `None` when the message names none.
pub fn allocation_in(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("tried to allocate ")? + "tried to allocate ".len();
    let rest = &lower[at..];
    let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let number: f64 = rest[..number_end].parse().ok()?;
    let unit = rest[number_end..].trim_start();
    let scale = [
        ("bytes", 1.0),
        ("kib", 1024.0),
        ("mib", 1_048_576.0),
        ("gib", GIB),
        ("tib", GIB * 1024.0),
        ("b", 1.0),
    ]
    .into_iter()
    .find(|(u, _)| unit.starts_with(u))
    .map(|(_, s)| s)?;
    let bytes = number * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn reqs(v: Value) -> Requirements {
        Requirements::parse(&v, "requirements").expect("requirements")
    }

    #[test]
    fn raises_above_the_failed_worker() {
        let r = raised_requirements(&reqs(json!({"models": ["x"]})), Some(&json!(24)), None).expect("raised");
        assert_eq!(r.positive.get(GPU_MEMORY_PATH), Some(&json!(25)));
        assert_eq!(r.positive.get("models"), Some(&json!(["x"])), "other requirements stay");
        let r = raised_requirements(&Requirements::default(), Some(&json!(23.5)), None).expect("raised");
        assert_eq!(r.positive.get(GPU_MEMORY_PATH), Some(&json!(24)));
    }

    #[test]
    fn raises_to_the_allocation_when_known() {
        let four_tb = 4_398_046_511_104;
        let r =
            raised_requirements(&Requirements::default(), Some(&json!(24)), Some(four_tb)).expect("raised");
        assert_eq!(r.positive.get(GPU_MEMORY_PATH), Some(&json!(4096)));
        let small =
            raised_requirements(&Requirements::default(), Some(&json!(24)), Some(1024)).expect("raised");
        assert_eq!(
            small.positive.get(GPU_MEMORY_PATH),
            Some(&json!(25)),
            "never below the failed worker + 1"
        );
    }

    #[test]
    fn keeps_a_higher_requirement() {
        let r =
            raised_requirements(&reqs(json!({"hardware": {"gpu_memory_gb": 40}})), Some(&json!(24)), None)
                .expect("raised");
        assert_eq!(r.positive.get(GPU_MEMORY_PATH), Some(&json!(40)));
    }

    #[test]
    fn fails_with_the_reason_when_nothing_can_be_raised() {
        let none = raised_requirements(&Requirements::default(), None, None).expect_err("no memory declared");
        assert!(none.contains("declares no hardware.gpu_memory_gb"), "{none}");
        let text =
            raised_requirements(&Requirements::default(), Some(&json!("big")), None).expect_err("text");
        assert!(text.contains("not a number"), "{text}");
        let fixed =
            raised_requirements(&reqs(json!({"hardware.gpu_memory_gb": [24]})), Some(&json!(24)), None)
                .expect_err("a list requirement");
        assert!(fixed.contains("cannot be raised"), "{fixed}");
    }

    #[test]
    fn reads_both_allocator_messages() {
        let cpu = "[enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate memory: \
                   you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)";
        assert_eq!(allocation_in(cpu), Some(4_398_046_511_104));
        let cuda = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 23.65 GiB";
        assert_eq!(allocation_in(cuda), Some(20 * 1_073_741_824));
        assert_eq!(allocation_in("Tried to allocate 512.00 MiB (GPU 0)"), Some(512 * 1_048_576));
        assert_eq!(allocation_in("CUDA out of memory"), None);
        assert_eq!(allocation_in("tried to allocate lots"), None);
    }

    proptest! {
        /// The next worker always has more memory than the one that failed, and enough for the
        /// allocation when its size is known.
        #[test]
        fn the_next_worker_has_more(had in 0.0f64..4096.0, bytes in proptest::option::of(0u64..(1 << 45))) {
            let r = raised_requirements(&Requirements::default(), Some(&json!(had)), bytes).expect("raised");
            let need = r.positive.get(GPU_MEMORY_PATH).and_then(Value::as_f64).expect("a number");
            prop_assert!(need > had);
            if let Some(b) = bytes {
                prop_assert!(need * GIB >= b as f64);
            }
        }

        #[test]
        fn any_message_is_safe(message in ".{0,200}") {
            let _ = allocation_in(&message);
        }
    }
}
