//! One service process on one GPU (a ComfyUI), supervised: started as the leader of its own
//! process group so its helpers stop with it, its output captured line by line (prefixed with the
//! service and GPU in the log, kept as a tail for failure reports, written to a size-rotated file),
//! readiness polled on a URL whose answer must be JSON, crashes restarted by
//! [`fleetq_core::restart`], and stopped with SIGTERM to the group, then SIGKILL.
//!
//! While it is down, its worker's connector finds the service gone and reports `offline`, so the
//! worker stops claiming for it; nothing here talks to the worker.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetq_connectors::CancellationToken;
use fleetq_core::{RestartDecision, RestartPolicy, RestartTracker};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::sync::watch;

/// Lines of output kept for failure reports.
pub const TAIL_LINES: usize = 40;
/// Longest line kept (bytes); a longer one is cut (bounded memory on a binary blob).
pub const MAX_LINE: usize = 4096;

/// Why a service could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The program could not be spawned.
    #[error("{service}: cannot start {program:?}: {source}")]
    Spawn {
        /// `name gpuN`.
        service: String,
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its port is held by another process.
    #[error("{service}: port {port} is already in use{holder}")]
    PortTaken {
        /// `name gpuN`.
        service: String,
        /// The port.
        port: u16,
        /// ` by pid N (cmd)` when found.
        holder: String,
    },
    /// It exited while starting.
    #[error("{service}: exited before it was ready ({exit})")]
    Exited {
        /// `name gpuN`.
        service: String,
        /// Exit code or signal.
        exit: String,
        /// Its last output lines.
        tail: Vec<String>,
    },
    /// It did not become ready within the ceiling.
    #[error("{service}: not ready after {seconds} s")]
    NotReady {
        /// `name gpuN`.
        service: String,
        /// The ceiling.
        seconds: u64,
        /// Its last output lines.
        tail: Vec<String>,
    },
    /// Asked to stop while starting.
    #[error("{0}: stopped while starting")]
    Stopped(String),
}

impl ServiceError {
    /// The output lines that explain it, when there are any.
    pub fn tail(&self) -> &[String] {
        match self {
            Self::Exited { tail, .. } | Self::NotReady { tail, .. } => tail,
            _ => &[],
        }
    }
}

/// Where a service instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ServicePhase {
    /// Launched, not ready yet.
    #[default]
    Starting,
    /// Ready.
    Ready,
    /// Crashed; waiting its backoff before a restart.
    Restarting,
    /// Given up (the reason is in `last_error`).
    Failed,
    /// Stopped on request.
    Stopped,
}

/// What the machine's status endpoint shows of one service instance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStatus {
    /// `comfyui`.
    pub name: String,
    /// Its GPU index.
    pub gpu: u32,
    /// Its port.
    pub port: u16,
    /// Its phase.
    pub phase: ServicePhase,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// When the current process started (ms).
    pub started_at: Option<i64>,
    /// Restarts so far.
    pub restarts: u32,
    /// How the last process ended (exit code or signal).
    pub last_exit: Option<String>,
    /// Its last output lines when it ended.
    pub last_lines: Vec<String>,
    /// The last error (a failed start, giving up).
    pub last_error: Option<String>,
}

/// One service on one GPU, ready to be launched.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `comfyui`.
    pub name: String,
    /// GPU index.
    pub gpu: u32,
    /// GPU UUID (`CUDA_VISIBLE_DEVICES`).
    pub gpu_uuid: String,
    /// Its port.
    pub port: u16,
    /// Program and arguments, placeholders filled.
    pub command: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment, placeholders filled.
    pub env: BTreeMap<String, String>,
    /// Readiness URL, placeholders filled.
    pub ready_url: String,
    /// Restart rule.
    pub restart: RestartPolicy,
    /// SIGTERM → SIGKILL wait.
    pub stop_timeout: Duration,
    /// Its log file.
    pub log_file: PathBuf,
    /// Rotation size.
    pub log_max_bytes: u64,
}

/// A launched process.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pid: Option<u32>,
    started: Instant,
    tail: Arc<Mutex<Tail>>,
}

/// The last lines of output.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    fn push(&mut self, line: String) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

impl Running {
    /// The last output lines.
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().map(|t| t.lines.iter().cloned().collect()).unwrap_or_default()
    }

    /// The last output line.
    pub fn last_line(&self) -> Option<String> {
        self.tail.lock().ok().and_then(|t| t.lines.back().cloned())
    }

    /// Its pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

impl Instance {
    /// Makes sure its port is free: a leftover of this same command is killed (with its group),
    /// anything else is an error naming the holder.
    async fn clear_port(&self) -> Result<(), ServiceError> {
        let taken = |port| matches!(std::net::TcpListener::bind(("127.0.0.1", port)), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
        if !taken(self.port) {
            return Ok(());
        }
        let holder = port_holder(self.port);
        let ours = holder.as_ref().is_some_and(|(_, cmd)| same_command(cmd, &self.command));
        if let (true, Some((pid, cmd))) = (ours, &holder) {
            tracing::warn!(service = %self.label(), pid, %cmd, port = self.port, "a leftover of this service holds its port: killing it");
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Bounded: the kernel frees the port once the process is gone.
            for _ in 0..50 {
                if !taken(self.port) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(ServiceError::PortTaken {
            service: self.label(),
            port: self.port,
            holder: holder.map(|(pid, cmd)| format!(" by pid {pid} ({cmd})")).unwrap_or_default(),
        })
    }

    /// `comfyui gpu0`, the prefix of its log lines and messages.
    pub fn label(&self) -> String {
        format!("{} gpu{}", self.name, self.gpu)
    }

    /// Starts the process as the leader of a new process group, output captured. A process
    /// already holding its port is killed first when it runs this very command (a leftover of an
    /// earlier supervisor that died without stopping it); anything else there is reported.
    pub async fn launch(&self) -> Result<Running, ServiceError> {
        self.clear_port().await?;
        let program = self.command.first().cloned().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&self.command[1..])
            .env("CUDA_VISIBLE_DEVICES", &self.gpu_uuid)
            .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|source| ServiceError::Spawn {
            service: self.label(),
            program: program.clone(),
            source,
        })?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        let log = Arc::new(Mutex::new(LogFile::new(self.log_file.clone(), self.log_max_bytes)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, self.label(), tail.clone(), log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, self.label(), tail.clone(), log));
        }
        let pid = child.id();
        tracing::info!(service = %self.label(), pid, port = self.port, "service launched");
        Ok(Running { child, pid, started: Instant::now(), tail })
    }

    /// Waits until the readiness URL answers JSON, while the process lives, up to `ceiling`.
    /// `waiting(elapsed, last line)` is called every `report_every`.
    pub async fn wait_ready(
        &self,
        running: &mut Running,
        ceiling: Duration,
        report_every: Duration,
        stop: &CancellationToken,
        mut waiting: impl FnMut(Duration, Option<String>),
    ) -> Result<Duration, ServiceError> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok();
        let began = Instant::now();
        let mut last_report = Instant::now();
        loop {
            if let Ok(Some(status)) = running.child.try_wait() {
                // Let the output pumps catch the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ServiceError::Exited {
                    service: self.label(),
                    exit: describe(status),
                    tail: running.tail(),
                });
            }
            if let Some(http) = &http
                && ready(http, &self.ready_url).await
            {
                return Ok(began.elapsed());
            }
            if began.elapsed() >= ceiling {
                return Err(ServiceError::NotReady {
                    service: self.label(),
                    seconds: ceiling.as_secs(),
                    tail: running.tail(),
                });
            }
            if last_report.elapsed() >= report_every {
                last_report = Instant::now();
                waiting(began.elapsed(), running.last_line());
            }
            tokio::select! {
                () = stop.cancelled() => return Err(ServiceError::Stopped(self.label())),
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Supervises a ready process until `stop`: a crash is restarted after the policy's backoff
    /// (a restart that does not become ready within `ceiling` counts as another crash), or given
    /// up. On `stop` the process group is stopped. Every change is published on `status`.
    pub async fn supervise(
        self,
        mut running: Running,
        ceiling: Duration,
        stop: CancellationToken,
        status: watch::Sender<ServiceStatus>,
    ) {
        let mut tracker = RestartTracker::new(self.restart);
        status.send_modify(|s| {
            s.phase = ServicePhase::Ready;
            s.pid = running.pid;
        });
        loop {
            let exit = tokio::select! {
                () = stop.cancelled() => {
                    let exit = self.stop_process(&mut running).await;
                    let tail = running.tail();
                    status.send_modify(|s| {
                        s.phase = ServicePhase::Stopped;
                        s.pid = None;
                        s.last_exit = Some(exit);
                        s.last_lines = tail.into_iter().rev().take(10).rev().collect();
                    });
                    return;
                }
                exit = running.child.wait() => exit,
            };
            let exit = exit.map_or_else(|e| format!("wait failed: {e}"), describe);
            // Helpers of the crashed process must not keep the GPU or the port.
            kill_group(running.pid, Signal::SIGKILL);
            let tail = running.tail();
            tracing::warn!(service = %self.label(), %exit, tail = %tail.join(" | "), "service exited");
            status.send_modify(|s| {
                s.pid = None;
                s.last_exit = Some(exit);
                s.last_lines = tail.into_iter().rev().take(10).rev().collect();
            });
            let mut ran = running.started.elapsed();
            running = loop {
                let ran_ms = u64::try_from(ran.as_millis()).unwrap_or(u64::MAX);
                match tracker.on_exit(now_epoch_ms(), ran_ms, true, unit()) {
                    RestartDecision::GiveUp { reason } => {
                        tracing::error!(service = %self.label(), %reason, "service given up");
                        status.send_modify(|s| {
                            s.phase = ServicePhase::Failed;
                            s.last_error = Some(reason);
                        });
                        stop.cancelled().await;
                        return;
                    }
                    RestartDecision::Restart { after_ms, crash } => {
                        tracing::info!(service = %self.label(), after_ms, crash, "service restarts after its backoff");
                        status.send_modify(|s| s.phase = ServicePhase::Restarting);
                        tokio::select! {
                            () = stop.cancelled() => {
                                status.send_modify(|s| s.phase = ServicePhase::Stopped);
                                return;
                            }
                            () = tokio::time::sleep(Duration::from_millis(after_ms)) => {}
                        }
                    }
                }
                match self.relaunch(ceiling, &stop, &status).await {
                    Some(r) => break r,
                    None if stop.is_cancelled() => {
                        status.send_modify(|s| s.phase = ServicePhase::Stopped);
                        return;
                    }
                    // A restart that never became ready counts as one more crash.
                    None => ran = Duration::ZERO,
                }
            };
        }
    }

    /// Launches again and waits for readiness; `None` (with the reason published) if it failed.
    async fn relaunch(
        &self,
        ceiling: Duration,
        stop: &CancellationToken,
        status: &watch::Sender<ServiceStatus>,
    ) -> Option<Running> {
        status.send_modify(|s| {
            s.phase = ServicePhase::Starting;
            s.restarts = s.restarts.saturating_add(1);
        });
        let mut running = match self.launch().await {
            Ok(r) => r,
            Err(e) => {
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                return None;
            }
        };
        status.send_modify(|s| {
            s.pid = running.pid;
            s.started_at = Some(now_epoch_ms());
        });
        match self.wait_ready(&mut running, ceiling, Duration::from_secs(3600), stop, |_, _| {}).await {
            Ok(took) => {
                tracing::info!(service = %self.label(), ms = took.as_millis() as u64, "service ready again");
                status.send_modify(|s| {
                    s.phase = ServicePhase::Ready;
                    s.last_error = None;
                });
                Some(running)
            }
            Err(e) => {
                let _ = self.stop_process(&mut running).await;
                status.send_modify(|s| {
                    s.pid = None;
                    s.last_error = Some(e.to_string());
                });
                None
            }
        }
    }

    /// SIGTERM to the process group, up to `stop_timeout` for it to exit, then SIGKILL. Returns
    /// how it ended.
    pub async fn stop_process(&self, running: &mut Running) -> String {
        kill_group(running.pid, Signal::SIGTERM);
        let exit = match tokio::time::timeout(self.stop_timeout, running.child.wait()).await {
            Ok(Ok(status)) => describe(status),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                kill_group(running.pid, Signal::SIGKILL);
                match running.child.wait().await {
                    Ok(status) => format!("{} after SIGKILL", describe(status)),
                    Err(e) => format!("wait failed: {e}"),
                }
            }
        };
        // Whatever of the group outlived its leader goes too.
        kill_group(running.pid, Signal::SIGKILL);
        tracing::info!(service = %self.label(), %exit, "service stopped");
        exit
    }
}

/// The epoch in ms (the project's one clock).
fn now_epoch_ms() -> i64 {
    fleetq_core::Clock::now_ms(&fleetq_core::SystemClock)
}

/// A random number in `[0, 1)` for the restart jitter (std's per-process random hash keys).
fn unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_epoch_ms());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Signals the process group led by `pid` (its pgid is its pid); a group already gone is fine.
pub(crate) fn kill_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// `exit code 1`, `signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        (None, None) => "ended".into(),
    }
}

/// Whether `url` answers 2xx with a JSON body (a port that answers HTML is not ready).
async fn ready(http: &reqwest::Client, url: &str) -> bool {
    let Ok(resp) = http.get(url).send().await else { return false };
    if !resp.status().is_success() {
        return false;
    }
    match resp.bytes().await {
        Ok(body) => {
            body.len() <= 4 * 1024 * 1024 && serde_json::from_slice::<serde_json::Value>(&body).is_ok()
        }
        Err(_) => false,
    }
}

/// Reads output, splitting lines (cut at [`MAX_LINE`]), into the log, the tail and the file.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    label: String,
    tail: Arc<Mutex<Tail>>,
    file: Arc<Mutex<LogFile>>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line).trim_end_matches('\r').to_owned();
        line.clear();
        tracing::info!(target: "fleetq_machine::service_log", "[{label}] {text}");
        if let Ok(mut f) = file.lock() {
            f.write_line(&format!("[{label}] {text}"));
        }
        if let Ok(mut t) = tail.lock() {
            t.push(text);
        }
    };
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                emit(&mut line);
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}

/// A log file rotated by size: past `max`, it becomes `<file>.1` (replacing the older one).
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    max: u64,
    file: Option<std::fs::File>,
    size: u64,
    warned: bool,
}

impl LogFile {
    fn new(path: PathBuf, max: u64) -> Self {
        Self { path, max, file: None, size: 0, warned: false }
    }

    fn write_line(&mut self, line: &str) {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => {
                    self.size = f.metadata().map_or(0, |m| m.len());
                    self.file = Some(f);
                }
                Err(e) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot write the service log file");
                    }
                    return;
                }
            }
        }
        if self.size >= self.max {
            self.file = None;
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            self.size = 0;
            return self.write_line(line);
        }
        if let Some(f) = &mut self.file
            && writeln!(f, "{line}").is_ok()
        {
            self.size = self.size.saturating_add(line.len() as u64 + 1);
        }
    }
}

/// `<file>.1`.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Whether a process's command line (`/proc/<pid>/cmdline`, NULs as spaces) is `ours`: the same
/// arguments and a program of the same file name (a launcher may resolve `python3` to a full path).
fn same_command(cmdline: &str, ours: &[String]) -> bool {
    let theirs: Vec<&str> = cmdline.split_whitespace().collect();
    let ours: Vec<&str> = ours.iter().flat_map(|a| a.split_whitespace()).collect();
    let name = |p: &str| Path::new(p).file_name().map(std::ffi::OsStr::to_owned);
    theirs.len() == ours.len()
        && !ours.is_empty()
        && theirs[1..] == ours[1..]
        && name(theirs[0]) == name(ours[0])
}

/// The process listening on TCP `port` (any local address), from `/proc`: its pid and command.
pub fn port_holder(port: u16) -> Option<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // local_address is `ADDR:PORT` in hex; state 0A is LISTEN; inode is column 9.
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let on_port =
                local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                let cmd = std::fs::read(proc_dir.path().join("cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_owned())
                    .unwrap_or_default();
                return Some((pid, cmd));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, port: u16, dir: &Path) -> Instance {
        Instance {
            name: "svc".into(),
            gpu: 0,
            gpu_uuid: "TEST-GPU-0".into(),
            port,
            command: vec!["sh".into(), "-c".into(), script.into()],
            cwd: None,
            env: BTreeMap::new(),
            ready_url: format!("http://127.0.0.1:{port}/"),
            restart: RestartPolicy::default(),
            stop_timeout: Duration::from_secs(2),
            log_file: dir.join("svc-gpu0.log"),
            log_max_bytes: 4096,
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    }

    #[tokio::test]
    async fn a_process_that_exits_while_starting_is_reported_with_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = sh(
            "echo loading; echo 'ImportError: no module named torch' >&2; exit 3",
            free_port(),
            dir.path(),
        );
        let mut running = svc.launch().await.expect("launch");
        let stop = CancellationToken::new();
        let err = svc
            .wait_ready(&mut running, Duration::from_secs(60), Duration::from_secs(60), &stop, |_, _| {})
            .await
            .expect_err("it exits");
        assert!(err.to_string().contains("exit code 3"), "{err}");
        assert!(err.tail().iter().any(|l| l.contains("ImportError")), "{:?}", err.tail());
        let log = std::fs::read_to_string(dir.path().join("svc-gpu0.log")).expect("log file");
        assert!(log.contains("[svc gpu0] loading"), "{log}");
    }

    /// A port that answers HTML (a web server, not the service's API yet) is not ready.
    #[tokio::test]
    async fn a_port_answering_html_is_not_ready() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let command: Vec<String> = ["python3", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]
            .map(String::from)
            .into();
        let svc =
            Instance { command, ready_url: format!("http://127.0.0.1:{port}/"), ..sh("", port, dir.path()) };
        let mut running = svc.launch().await.expect("launch");
        let mut answered = false;
        for _ in 0..200 {
            let body = reqwest::get(format!("http://127.0.0.1:{port}/")).await.ok();
            if let Some(b) = body {
                answered = b.text().await.is_ok_and(|t| t.contains("<html") || t.contains("<!DOCTYPE"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(answered, "the port answers HTML");
        let stop = CancellationToken::new();
        let err = svc
            .wait_ready(&mut running, Duration::from_secs(1), Duration::from_secs(60), &stop, |_, _| {})
            .await
            .expect_err("HTML is not ready");
        assert!(matches!(err, ServiceError::NotReady { .. }), "{err}");
        svc.stop_process(&mut running).await;
    }

    #[tokio::test]
    async fn stopping_ends_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A leader that ignores SIGTERM, with a helper child: both must be gone after stop.
        let svc = sh("trap '' TERM; sleep 300 & echo helper $!; wait", free_port(), dir.path());
        let svc = Instance { stop_timeout: Duration::from_millis(300), ..svc };
        let mut running = svc.launch().await.expect("launch");
        let mut helper = None;
        for _ in 0..500 {
            helper = running
                .last_line()
                .and_then(|l| l.strip_prefix("helper ").and_then(|p| p.parse::<i32>().ok()));
            if helper.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let helper = helper.expect("the service printed its helper's pid");
        let exit = svc.stop_process(&mut running).await;
        assert!(exit.contains("SIGKILL"), "the leader ignored SIGTERM: {exit}");
        // The helper is gone (or a zombie awaiting its reaper): signal 0 fails or /proc says Z.
        let mut gone = false;
        for _ in 0..100 {
            let state = std::fs::read_to_string(format!("/proc/{helper}/stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "the helper of the group was killed");
    }

    #[tokio::test]
    async fn a_taken_port_names_its_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let err = sh("exit 0", port, dir.path()).launch().await.expect_err("port taken");
        let text = err.to_string();
        assert!(
            text.contains(&format!("port {port}")) && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_leftover_of_the_same_command_is_killed_before_the_launch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let command: Vec<String> = ["python3", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]
            .map(String::from)
            .into();
        // A leftover: the same command, started by someone else (a supervisor that died).
        let mut leftover = std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let svc =
            Instance { command, ready_url: format!("http://127.0.0.1:{port}/"), ..sh("", port, dir.path()) };
        let mut bound = false;
        for _ in 0..200 {
            if port_holder(port).is_some() {
                bound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(bound, "the leftover listens");
        let mut running = svc.launch().await.expect("the leftover is cleared and the service starts");
        let status = leftover.wait().expect("the leftover ended");
        assert!(!status.success(), "the leftover was killed: {status}");
        svc.stop_process(&mut running).await;
        // Something else on the port is never killed.
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let svc = Instance { port: other.local_addr().expect("addr").port(), ..svc };
        assert!(matches!(svc.launch().await, Err(ServiceError::PortTaken { .. })));
    }

    #[test]
    fn the_log_file_rotates_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.log");
        let mut log = LogFile::new(path.clone(), 100);
        for i in 0..30 {
            log.write_line(&format!("line {i:04}"));
        }
        let now = std::fs::metadata(&path).expect("current").len();
        let old = std::fs::metadata(rotated(&path)).expect("rotated").len();
        assert!(now <= 110 && old <= 110, "{now} {old}");
    }
}
