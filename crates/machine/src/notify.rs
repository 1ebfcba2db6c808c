//! systemd's readiness protocol for `Type=notify` units: a datagram to `$NOTIFY_SOCKET` —
//! `READY=1` once the machine serves, `STATUS=…` for each startup step (shown by `systemctl
//! status`), `STOPPING=1` when it drains. Without `NOTIFY_SOCKET` (not under systemd) nothing is
//! sent. A few lines of std instead of a dependency.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening. Failures are logged, never fatal:
/// the machine runs the same without its supervisor's readiness.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        // `@name` is a socket in Linux's abstract namespace.
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::debug!(error = %e, state, "systemd notification not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The datagram arrives as systemd would read it (the variable is set for this test's
    /// process only through a child, so other tests never see it).
    #[test]
    fn states_reach_the_notify_socket() {
        if std::env::var_os("FLEETQ_NOTIFY_CHILD").is_some() {
            notify("READY=1");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new(exe)
            .args(["--exact", "notify::tests::states_reach_the_notify_socket", "--nocapture"])
            .env("FLEETQ_NOTIFY_CHILD", "1")
            .env("NOTIFY_SOCKET", &path)
            .status()
            .expect("child");
        assert!(status.success());
        let mut buf = [0u8; 64];
        listener.set_nonblocking(true).expect("nonblocking");
        let n = listener.recv(&mut buf).expect("a datagram was sent");
        assert_eq!(&buf[..n], b"READY=1");
    }
}
