//! Process signals: SIGINT or SIGTERM asks a long-running command to drain and stop; for a
//! machine, a second one forces it.

use fleetq_connectors::CancellationToken;

/// Waits for SIGINT or SIGTERM.
async fn one_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = term => {}
    }
}

/// Fires `stop` on SIGINT or SIGTERM.
pub(crate) async fn stop_on_signal(stop: CancellationToken) {
    one_signal().await;
    tracing::info!("shutdown requested; draining");
    stop.cancel();
}

/// Fires `stop` on the first SIGINT or SIGTERM and `force` on the second.
pub(crate) async fn stop_then_force(stop: CancellationToken, force: CancellationToken) {
    stop_on_signal(stop).await;
    one_signal().await;
    tracing::warn!("second signal: stopping at once");
    force.cancel();
}
