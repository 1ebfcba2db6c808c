//! `fleetq mock <service>`: runs a mock service (for demos and manual tests) until Ctrl-C.

use crate::out::announce;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use fleetq_mocks::a1111::{A1111Mock, A1111MockConfig};
use fleetq_mocks::comfyui::{ComfyMock, ComfyMockConfig};
use fleetq_mocks::openai::{OpenAiMock, OpenAiMockConfig};

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
    /// A mock AUTOMATIC1111 webui API (`/sdapi/v1/*`): blocking txt2img/img2img, /progress,
    /// /interrupt. A prompt containing `__oom__` fails with CUDA out-of-memory.
    A1111 {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (7860 is A1111's default).
        #[arg(long, default_value_t = 7860)]
        port: u16,
        /// Milliseconds one sampling step takes.
        #[arg(long, default_value_t = 50)]
        step_delay_ms: u64,
    },
    /// A mock OpenAI-style API (`/v1/chat/completions` streamed or not, `/v1/images/generations`,
    /// `/v1/models`); it answers "You said: …".
    Openai {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The API key it accepts.
        #[arg(long, default_value = "sk-test-key")]
        api_key: String,
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
            announce(&format!("mock ComfyUI listening on {}", server.url()));
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            server.stop().await;
            Ok(())
        }
        Mock::A1111 { host, port, step_delay_ms } => {
            let config = A1111MockConfig {
                step_delay: std::time::Duration::from_millis(step_delay_ms),
                ..A1111MockConfig::default()
            };
            let server = A1111Mock::start_on(SocketAddr::new(host, port), config)
                .await
                .with_context(|| format!("binding {host}:{port}"))?;
            announce(&format!("mock A1111 listening on {}", server.url()));
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            server.kill().await;
            Ok(())
        }
        Mock::Openai { host, port, api_key } => {
            let config = OpenAiMockConfig { api_key, ..OpenAiMockConfig::default() };
            let server = OpenAiMock::start_on(SocketAddr::new(host, port), config)
                .await
                .with_context(|| format!("binding {host}:{port}"))?;
            announce(&format!("mock OpenAI API listening on {}", server.base_url()));
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            server.kill().await;
            Ok(())
        }
    }
}
