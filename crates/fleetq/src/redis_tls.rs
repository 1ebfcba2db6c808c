//! The `--redis-ca`, `--redis-cert` and `--redis-key` flags every command that talks to Redis
//! shares, for a `rediss://` Redis.

use std::path::PathBuf;

use fleetq_broker::RedisTls;

/// TLS files for a `rediss://` Redis.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct RedisTlsArgs {
    /// CA certificate (PEM) that a rediss:// Redis's certificate must chain to [default: the
    /// system's roots].
    #[arg(long, env = "FLEETQ_REDIS_CA")]
    redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with a rediss:// Redis, with --redis-key.
    #[arg(long, env = "FLEETQ_REDIS_CERT")]
    redis_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS, with --redis-cert.
    #[arg(long, env = "FLEETQ_REDIS_KEY")]
    redis_key: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// The files, as the broker takes them.
    pub(crate) fn files(&self) -> RedisTls {
        RedisTls {
            ca_file: self.redis_ca.clone(),
            cert_file: self.redis_cert.clone(),
            key_file: self.redis_key.clone(),
        }
    }
}
