//! Replays transcripts captured from a real ComfyUI 0.3.64 (`tests/comfyui-transcripts/`, with their
//! index in `00_index.json`) against the mock: the same client actions, in the same order, must get
//! the same replies and the same WebSocket messages in the same order.
//!
//! Values that differ between runs by nature are normalised on both sides: prompt ids (bound as
//! they first appear), timestamps, queue numbers (only int-vs-float is kept), the counter in saved
//! file names, tracebacks and tensor dumps, and the set-ordered `executed` lists (sorted).

#![allow(clippy::unwrap_used, reason = "a test harness: a failed unwrap is a failed replay")]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use fleetq_mocks::comfyui::{ComfyMock, ComfyMockConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Ws = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

struct Conn {
    sink: Ws,
    rx: mpsc::UnboundedReceiver<Value>,
}

/// Canonical names for prompt ids, one map per side.
#[derive(Default)]
struct Ids {
    names: HashMap<String, String>,
}

impl Ids {
    fn bind(&mut self, id: &str, name: String) {
        self.names.entry(id.to_owned()).or_insert(name);
    }
}

fn normalise(v: &Value, ids: &Ids, key: Option<&str>) -> Value {
    match v {
        Value::String(s) => {
            if let Some(n) = ids.names.get(s) {
                return json!(n);
            }
            if key == Some("filename") {
                return json!(normalise_filename(s));
            }
            v.clone()
        }
        Value::Number(_) if key == Some("timestamp") => json!(0),
        Value::Number(n) if key == Some("number") => json!(if n.is_f64() { "<float>" } else { "<int>" }),
        Value::Array(a) => {
            if matches!(key, Some("traceback")) {
                return json!([]);
            }
            let mut items: Vec<Value> = a.iter().map(|x| normalise(x, ids, None)).collect();
            if matches!(key, Some("executed" | "current_outputs")) {
                items.sort_by_key(ToString::to_string);
            }
            // The queue number is the first element of a queue/history item.
            if items.len() == 5 && items[1].is_string() && items[0].is_number() {
                items[0] = json!(if items[0].is_f64() { "<float>" } else { "<int>" });
            }
            Value::Array(items)
        }
        Value::Object(m) => {
            if key == Some("current_inputs") {
                return json!({});
            }
            Value::Object(
                m.iter()
                    .map(|(k, x)| {
                        let k2 = ids.names.get(k).cloned().unwrap_or_else(|| k.clone());
                        (k2, normalise(x, ids, Some(k)))
                    })
                    .collect(),
            )
        }
        _ => v.clone(),
    }
}

fn normalise_filename(s: &str) -> String {
    // `prefix_00001_.png` → `prefix_N_.png`
    let bytes = s.as_bytes();
    if s.ends_with("_.png") && s.len() > 11 && bytes[s.len() - 11] == b'_' {
        format!("{}_N_.png", &s[..s.len() - 11])
    } else {
        s.to_owned()
    }
}

fn replace_ids(s: &str, map: &HashMap<String, String>) -> String {
    let mut out = s.to_owned();
    for (from, to) in map {
        out = out.replace(from, to);
    }
    out
}

async fn replay(file: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/comfyui-transcripts").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let transcript: Value = serde_json::from_str(&text).unwrap();
    let events = transcript["events"].as_array().unwrap();
    let mut config = ComfyMockConfig::default();
    if file.starts_with("14_") {
        // The late socket must join while the prompt runs (the real run took a few ms; the socket
        // connects within about one).
        config.node_delay = Duration::from_millis(200);
    }
    let mock = ComfyMock::start(config).await.unwrap();
    let base = mock.url();
    let ws_base = base.replacen("http", "ws", 1);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let mut conns: HashMap<String, Conn> = HashMap::new();
    let mut theirs = Ids::default();
    let mut ours = Ids::default();
    // Transcript prompt id → our prompt id, for paths and bodies of later requests.
    let mut id_map: HashMap<String, String> = HashMap::new();
    let mut last_response: Option<(u16, String, Vec<u8>)> = None;
    let mut n = 0;
    let mut skip_response = false;
    let mut anonymous: Vec<String> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let at = format!(
            "{file} event {i}: {}",
            serde_json::to_string(e).unwrap().chars().take(300).collect::<String>()
        );
        match e["kind"].as_str().unwrap() {
            "ws_connect" => {
                let url = format!("{ws_base}{}", e["url"].as_str().unwrap());
                if !url.contains("clientId=") {
                    anonymous.push(e["conn"].as_str().unwrap().to_owned());
                }
                let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let (sink, mut stream) = socket.split();
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        if let Message::Text(t) = m {
                            let _ = tx.send(serde_json::from_str::<Value>(t.as_str()).unwrap());
                        }
                    }
                });
                conns.insert(e["conn"].as_str().unwrap().to_owned(), Conn { sink, rx });
            }
            "ws_send" => {
                let conn = conns.get_mut(e["conn"].as_str().unwrap()).unwrap();
                conn.sink.send(Message::Text(e["message"].to_string().into())).await.unwrap();
            }
            "ws_closed" => {
                if let Some(mut conn) = conns.remove(e["conn"].as_str().unwrap()) {
                    let _ = conn.sink.close().await;
                }
            }
            "http_request" if e["path"].as_str().unwrap().contains("preview=") => {
                // The mock serves files as stored; it does not re-encode previews.
                skip_response = true;
            }
            "http_response" if skip_response => skip_response = false,
            "http_request" => {
                let method = e["method"].as_str().unwrap();
                let url = format!("{base}{}", replace_ids(e["path"].as_str().unwrap(), &id_map));
                let mut req = http.request(method.parse().unwrap(), url);
                match &e["body"] {
                    Value::Null => {}
                    Value::String(raw) => req = req.body(raw.clone()),
                    body => {
                        let body: Value =
                            serde_json::from_str(&replace_ids(&body.to_string(), &id_map)).unwrap();
                        if let Some(pid) = body.get("prompt_id").and_then(Value::as_str)
                            && e["path"].as_str().unwrap().ends_with("prompt")
                        {
                            // A client-chosen id is used verbatim by the server.
                            n += 1;
                            theirs.bind(pid, format!("<pid{n}>"));
                            ours.bind(pid, format!("<pid{n}>"));
                        }
                        req = req.header("content-type", "application/json").body(body.to_string());
                    }
                }
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let bytes = resp.bytes().await.unwrap().to_vec();
                last_response = Some((status, ct, bytes));
            }
            "http_response" => {
                let (status, ct, bytes) = last_response.take().expect("a response follows a request");
                assert_eq!(status, e["status"].as_u64().unwrap() as u16, "{at}");
                assert_eq!(ct, e["content_type"].as_str().unwrap_or(""), "{at}");
                if let Some(expected) = e.get("body")
                    && expected != "(omitted)"
                {
                    let actual: Value =
                        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{at}: not JSON"));
                    if let (Some(t), Some(o)) = (
                        expected.get("prompt_id").and_then(Value::as_str),
                        actual.get("prompt_id").and_then(Value::as_str),
                    ) {
                        n += 1;
                        theirs.bind(t, format!("<pid{n}>"));
                        ours.bind(o, format!("<pid{n}>"));
                        id_map.insert(t.to_owned(), o.to_owned());
                    }
                    assert_eq!(normalise(&actual, &ours, None), normalise(expected, &theirs, None), "{at}");
                } else if let Some(text) = e.get("body_text").and_then(Value::as_str) {
                    assert_eq!(String::from_utf8_lossy(&bytes), text, "{at}");
                } else if let Some(hex) = e.get("body_head_hex").and_then(Value::as_str) {
                    let head: String = bytes.iter().take(hex.len() / 2).map(|b| format!("{b:02x}")).collect();
                    assert_eq!(head, hex, "{at}");
                }
            }
            "ws_recv" => {
                let label = e["conn"].as_str().unwrap();
                let conn = conns.get_mut(label).unwrap();
                let lossy = file.starts_with("12_");
                loop {
                    let actual = tokio::time::timeout(Duration::from_secs(10), conn.rx.recv())
                        .await
                        .unwrap_or_else(|_| panic!("{at}: nothing received"))
                        .unwrap_or_else(|| panic!("{at}: socket closed"));
                    if anonymous.iter().any(|a| a == label)
                        && let (Some(t), Some(o)) =
                            (e["message"]["data"]["sid"].as_str(), actual["data"]["sid"].as_str())
                    {
                        // A socket without clientId gets a server-made id.
                        n += 1;
                        theirs.bind(t, format!("<sid{n}>"));
                        ours.bind(o, format!("<sid{n}>"));
                    }
                    let expected = normalise(&e["message"], &theirs, None);
                    let actual = normalise(&actual, &ours, None);
                    if lossy
                        && actual != expected
                        && matches!(actual["type"].as_str(), Some("progress" | "progress_state"))
                    {
                        // Reconnect scenario: how many progress messages are lost depends on timing.
                        continue;
                    }
                    assert_eq!(actual, expected, "{at}");
                    break;
                }
            }
            _ => {}
        }
    }
}

macro_rules! transcripts {
    ($($name:ident => $file:literal,)*) => {$(
        #[tokio::test]
        async fn $name() {
            replay($file).await;
        }
    )*};
}

transcripts! {
    normal_run => "01_normal_run.json",
    cached_rerun => "02_cached_rerun.json",
    late_subscriber_cached => "03_late_subscriber_cached.json",
    no_client_id_broadcast => "04_no_client_id_broadcast.json",
    other_client_isolation => "05_other_client_isolation.json",
    validation_errors => "06_validation_errors.json",
    runtime_error => "07_runtime_error.json",
    interrupt => "10_interrupt.json",
    queue_ops => "11_queue_ops.json",
    reconnect_mid_run => "12_reconnect_mid_run.json",
    node_exception_after_progress => "13_node_exception_after_progress.json",
    late_subscriber_fresh => "14_late_subscriber_fresh.json",
    client_chosen_prompt_id_and_number => "16_client_chosen_prompt_id_and_number.json",
}

/// `17_overlapping_reconnect_same_clientid.json`: when the old socket of a clientId closes after a
/// new one took the id, the id is unregistered and the new socket hears nothing.
#[tokio::test]
async fn overlapping_reconnect_silences_the_new_socket() {
    let mock = ComfyMock::start(ComfyMockConfig::default()).await.unwrap();
    let url = format!("{}/ws?clientId=abc", mock.url().replacen("http", "ws", 1));
    let (mut old, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_new, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    old.next().await.unwrap().unwrap();
    assert_eq!(mock.connected_clients(), vec!["abc".to_owned()]);
    old.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !mock.connected_clients().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the id stayed registered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
