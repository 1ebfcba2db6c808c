//! What a slow or greedy client can hold: a request head (or an idle kept-alive connection) must
//! arrive within the header timeout, and connections beyond the cap are closed at accept — while a
//! normal request still answers. Real sockets against `fleetq_api::serve`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use fleetq_api::ApiConfig;
use fleetq_broker::BrokerConfig;

async fn serve(config: ApiConfig) -> (SocketAddr, tempfile::TempDir) {
    let (broker, dir) = fleetq_broker::testing::embedded(BrokerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let at = listener.local_addr().expect("addr");
    tokio::spawn(fleetq_api::serve(listener, broker, config));
    (at, dir)
}

/// Reads until the server closes the connection; what it sent. The read timeout only turns a hang
/// into a failure.
fn read_to_close(s: &mut TcpStream) -> Result<Vec<u8>, std::io::Error> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn get_health(at: SocketAddr) -> String {
    let mut s = TcpStream::connect(at).expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").expect("write");
    String::from_utf8_lossy(&read_to_close(&mut s).expect("a reply")).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_idle_client_is_cut_off_and_others_are_served() {
    let config = ApiConfig { header_timeout: Duration::from_secs(1), ..ApiConfig::default() };
    let (at, _dir) = serve(config).await;
    tokio::task::spawn_blocking(move || {
        // A head sent a byte at a time, never finished; and a connection that says nothing.
        let mut slow = TcpStream::connect(at).expect("connect");
        slow.write_all(b"GET /health HTTP/1.1\r\nHo").expect("write");
        let mut idle = TcpStream::connect(at).expect("connect");
        assert!(get_health(at).starts_with("HTTP/1.1 200"), "a normal request answers meanwhile");
        let cut = read_to_close(&mut slow);
        assert!(
            cut.as_ref().map_or(true, |b| !b.starts_with(b"HTTP/1.1 200")),
            "the slow head got no answer: {cut:?}"
        );
        read_to_close(&mut idle).expect("the idle connection is closed");
        assert!(get_health(at).starts_with("HTTP/1.1 200"), "and the server still answers");
    })
    .await
    .expect("the client thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_accept() {
    let config = ApiConfig { max_connections: 2, ..ApiConfig::default() };
    let (at, _dir) = serve(config).await;
    tokio::task::spawn_blocking(move || {
        let keep = |at| {
            let mut s = TcpStream::connect(at).expect("connect");
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").expect("write");
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).expect("an answer");
            assert_eq!(&buf, b"HTTP/1.1 200");
            s
        };
        let first = keep(at);
        let _second = keep(at);
        let mut third = TcpStream::connect(at).expect("connect");
        third.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").ok();
        let reply = read_to_close(&mut third).unwrap_or_default();
        assert!(reply.is_empty(), "the third connection got no answer: {}", String::from_utf8_lossy(&reply));
        drop(first);
        // The slot frees when the server sees the close; a bounded retry, not a timing assertion.
        let served = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            get_health(at).starts_with("HTTP/1.1 200")
        });
        assert!(served, "a freed slot serves again");
    })
    .await
    .expect("the client thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_gets_408() {
    let config = ApiConfig { request_timeout: Duration::from_secs(1), ..ApiConfig::default() };
    let (at, _dir) = serve(config).await;
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(at).expect("connect");
        let head = "POST /api/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
        s.write_all(head.as_bytes()).expect("write");
        let reply = read_to_close(&mut s).unwrap_or_default();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(get_health(at).starts_with("HTTP/1.1 200"), "others are still served");
    })
    .await
    .expect("the client thread");
}
