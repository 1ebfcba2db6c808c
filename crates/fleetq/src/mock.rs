//! `fleetq mock <service>`: runs a mock service (for demos and manual tests) until Ctrl-C.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fleetq_connectors::mock::comfyui::{ComfyMock, ComfyMockConfig};

/// The mock services.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Mock {
    /// A mock ComfyUI 0.3.64 (HTTP + /ws), faithful to the real server's message orders.
    Comfyui {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (8188 is ComfyUI's default).
        #[arg(long, default_value_t = 8188)]
        port: u16,
        /// Extra milliseconds every executed node takes.
        #[arg(long, default_value_t = 0)]
        node_delay_ms: u64,
    },
}

pub(crate) async fn run(mock: Mock) -> Result<()> {
    match mock {
        Mock::Comfyui { host, port, node_delay_ms } => {
            let config = ComfyMockConfig {
                node_delay: std::time::Duration::from_millis(node_delay_ms),
                ..ComfyMockConfig::default()
            };
            let server = ComfyMock::start_on(SocketAddr::new(host, port), config)
                .await
                .with_context(|| format!("binding {host}:{port}"))?;
            println!("mock ComfyUI listening on {}", server.url());
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            server.stop().await;
            Ok(())
        }
    }
}
