//! Where a connector puts the files a job produced: copied into the artifacts directory the API
//! serves (`<dir>/<job id>/<file>`) and returned by reference, or — with no directory configured —
//! inlined as base64 only under a size limit, so a job result never carries megabytes of image.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use fleetq_core::FailureCategory;
use serde_json::{Value, json};

use crate::JobError;

/// Largest file inlined as base64 when no artifacts directory is configured.
pub const DEFAULT_INLINE_LIMIT: usize = 256 * 1024;

/// A connector's artifact store.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: Option<PathBuf>,
    inline_limit: usize,
}

impl Artifacts {
    /// Files go to `dir` when set; otherwise files up to `inline_limit` bytes are inlined.
    pub fn new(dir: Option<PathBuf>, inline_limit: usize) -> Self {
        Self { dir, inline_limit }
    }

    /// Whether files are written to disk.
    pub fn has_dir(&self) -> bool {
        self.dir.is_some()
    }

    /// Stores `bytes` produced by job `job_id` under `name` and describes it:
    /// `{"artifact": "<job>/<name>", "bytes": n}` with a directory, else `{"b64": …, "bytes": n}`
    /// under the limit, else `{"bytes": n, "omitted": "<why>"}`.
    pub async fn store(&self, job_id: &str, name: &str, bytes: &[u8]) -> Result<Value, JobError> {
        if let Some(rel) = self.write_file(job_id, name, bytes).await? {
            return Ok(json!({"name": name, "artifact": rel, "bytes": bytes.len()}));
        }
        if bytes.len() <= self.inline_limit {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            return Ok(json!({"name": name, "b64": b64, "bytes": bytes.len()}));
        }
        Ok(json!({
            "name": name,
            "bytes": bytes.len(),
            "omitted": format!("larger than the inline limit of {} bytes; configure an artifacts directory", self.inline_limit),
        }))
    }

    /// Writes a downloaded file for job `job_id` and returns its path relative to the directory, or
    /// `None` when no directory is configured.
    pub async fn write_file(
        &self,
        job_id: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<Option<String>, JobError> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let rel = format!("{job_id}/{}", safe_name(name));
        let target = dir.join(&rel);
        write(&target, bytes).await.map_err(|e| {
            JobError::retryable(FailureCategory::Internal, format!("writing {}: {e}", target.display()))
        })?;
        Ok(Some(rel))
    }
}

/// Names come from services and payloads: keep only the last path component, never `..`.
fn safe_name(name: &str) -> String {
    let last = Path::new(name).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    if last.is_empty() || last == ".." { "output".to_owned() } else { last }
}

async fn write(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::write(target, bytes).await
}

/// Decodes base64 as services send it: plain, or with a `data:<mime>;base64,` prefix.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let body = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD.decode(body.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_job_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("a/b/c.png"), "c.png");
        assert_eq!(safe_name(".."), "output");
        assert_eq!(safe_name(""), "output");
    }

    #[test]
    fn base64_with_or_without_data_prefix() {
        assert_eq!(decode_base64("aGk=").ok(), Some(b"hi".to_vec()));
        assert_eq!(decode_base64("data:image/png;base64,aGk=").ok(), Some(b"hi".to_vec()));
        assert!(decode_base64("not base64!").is_err());
    }

    #[tokio::test]
    async fn inline_under_the_limit_omitted_over_it_files_with_a_dir() {
        let inline = Artifacts::new(None, 4);
        let small = inline.store("j", "a.png", b"1234").await.ok();
        assert_eq!(small.as_ref().and_then(|v| v["b64"].as_str()), Some("MTIzNA=="));
        let big = inline.store("j", "a.png", b"12345").await.ok();
        assert!(big.as_ref().is_some_and(|v| v["omitted"].is_string() && v.get("b64").is_none()));

        let dir = tempfile::tempdir().expect("tempdir");
        let on_disk = Artifacts::new(Some(dir.path().to_owned()), 0);
        let v = on_disk.store("job1", "../x.png", b"12345").await.ok();
        assert_eq!(v.as_ref().and_then(|v| v["artifact"].as_str()), Some("job1/x.png"));
        assert_eq!(std::fs::read(dir.path().join("job1/x.png")).ok(), Some(b"12345".to_vec()));
    }
}
