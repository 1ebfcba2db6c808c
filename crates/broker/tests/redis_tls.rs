//! Redis over TLS (`rediss://`) against a real `redis-server --tls-port` with certificates made by
//! the test (Debian's `openssl`): a CA file trusted, a wrong CA refused with a clear error, mutual
//! TLS with a client certificate, and TLS files given with a plain URL refused rather than ignored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleetq_broker::redis::RedisBroker;
use fleetq_broker::testing::{RedisServer, test_config};
use fleetq_broker::{BrokerConfig, Queue, Read, RedisTls};
use fleetq_core::JobSpec;
use serde_json::json;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes `name.crt`/`name.key` in `dir`, signed by CA `ca` (self-signed when `ca` is `None`), for
/// `127.0.0.1`.
fn certificate(dir: &Path, name: &str, ca: Option<&str>) {
    let key = format!("{name}.key");
    let crt = format!("{name}.crt");
    let subject = format!("/CN={name}");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key];
    match ca {
        None => {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-out", &crt, "-days", "2", "-subj", &subject]);
            args.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ]);
            openssl(dir, &args);
        }
        Some(ca) => {
            let csr = format!("{name}.csr");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-out", &csr, "-subj", &subject]);
            openssl(dir, &args);
            std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
            let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_crt,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-out",
                    &crt,
                ]
                .into_iter()
                .chain(["-days", "2", "-extfile", "ext.cnf"])
                .collect::<Vec<_>>(),
            );
        }
    }
}

/// A `redis-server` that also listens with TLS (certificates in `dir`); `clients` is its
/// `--tls-auth-clients` (yes, no). Returns the harness (which owns the process) and the TLS port.
fn tls_redis(dir: &Path, clients: &str) -> (RedisServer, u16) {
    let tls_port = RedisServer::free_port().expect("a port");
    let file = |name: &str| format!("'{}'", dir.join(name).display());
    let args = format!(
        "--tls-port {tls_port} --tls-cert-file {} --tls-key-file {} --tls-ca-cert-file {} --tls-auth-clients {clients}",
        file("server.crt"),
        file("server.key"),
        file("ca.crt")
    );
    let server = RedisServer::start_with(RedisServer::free_port().expect("a port"), &args)
        .expect("redis-server (Debian's is built with TLS)");
    // The TLS port opens with the plain one; a bound on a hang, not a timing assertion.
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    (server, tls_port)
}

fn files(dir: &Path, ca: Option<&str>, client: bool) -> RedisTls {
    let p = |n: &str| -> PathBuf { dir.join(n) };
    RedisTls {
        ca_file: ca.map(|c| p(&format!("{c}.crt"))),
        cert_file: client.then(|| p("client.crt")),
        key_file: client.then(|| p("client.key")),
    }
}

async fn connect(port: u16, tls: RedisTls) -> Result<RedisBroker, fleetq_broker::BrokerError> {
    let config = BrokerConfig { redis_tls: tls, ..test_config() };
    RedisBroker::connect(&format!("rediss://127.0.0.1:{port}/"), "tls", config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    certificate(d, "ca", None);
    certificate(d, "server", Some("ca"));
    certificate(d, "client", Some("ca"));
    certificate(d, "other-ca", None);

    let (_server, port) = tls_redis(d, "no");
    let broker = connect(port, files(d, Some("ca"), false)).await.expect("trusted by the CA file");
    let id = broker.submit(JobSpec::new("simulation", json!({}))).await.expect("submit").id;
    assert!(broker.job(&id).await.expect("read").is_some(), "a job round-trips over TLS");

    let wrong = connect(port, files(d, Some("other-ca"), false)).await.expect_err("a wrong CA is refused");
    let text = wrong.to_string();
    assert!(text.contains("cannot reach Redis") && text.to_lowercase().contains("certificate"), "{text}");

    let plain = RedisBroker::connect(
        &format!("redis://127.0.0.1:{port}/"),
        "tls",
        BrokerConfig { redis_tls: files(d, Some("ca"), false), ..test_config() },
    )
    .await
    .expect_err("TLS files with a plain URL are refused");
    assert!(plain.to_string().contains("apply to rediss:// URLs"), "{plain}");

    let half = RedisTls { key_file: None, ..files(d, Some("ca"), true) };
    let e = connect(port, half).await.expect_err("a certificate without its key");
    assert!(e.to_string().contains("--redis-key"), "{e}");

    let (_mutual, mutual) = tls_redis(d, "yes");
    assert!(connect(mutual, files(d, Some("ca"), false)).await.is_err(), "no client certificate, no entry");
    let broker = connect(mutual, files(d, Some("ca"), true)).await.expect("mutual TLS");
    broker.submit(JobSpec::new("simulation", json!({}))).await.expect("submit over mutual TLS");
}
