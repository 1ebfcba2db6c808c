//! The mock A1111 speaks docs/services.md §2 on the wire: an interrupted txt2img still returns 200 with
//! images and no mark; `/progress` when idle looks like "done"; `info` is a JSON string; errors
//! and 404s have the documented shapes; every reply carries `X-Process-Time`.

use std::time::Duration;

use fleetq_mocks::a1111::{A1111Mock, A1111MockConfig};
use serde_json::{Value, json};

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("get");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_interrupted_generation_returns_200_with_images_and_no_mark() {
    let config = A1111MockConfig { step_delay: Duration::from_millis(10), ..A1111MockConfig::default() };
    let mock = A1111Mock::start(config).await.expect("mock");
    let client = reqwest::Client::new();
    let url = mock.url();
    let (status, idle) = get(&format!("{url}/sdapi/v1/progress")).await;
    assert_eq!(status, 200);
    assert_eq!((idle["progress"].as_f64(), idle["state"]["job_count"].as_i64()), (Some(0.0), Some(0)));

    let call = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let r = client
                .post(format!("{url}/sdapi/v1/txt2img"))
                .json(&json!({"prompt": "x", "steps": 500}))
                .send()
                .await
                .expect("txt2img");
            assert!(r.headers().contains_key("x-process-time"));
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        })
    };
    loop {
        let (_, p) = get(&format!("{url}/sdapi/v1/progress")).await;
        if p["state"]["sampling_step"].as_i64().unwrap_or(0) > 0 {
            assert!(p["progress"].as_f64().is_some_and(|v| v > 0.01 && v < 1.0), "{p}");
            assert_eq!(p["state"]["job"], "scripts_txt2img");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = client.post(format!("{url}/sdapi/v1/interrupt")).send().await.expect("interrupt");
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.ok()), (200, Some(json!({}))));
    let (status, body) = call.await.expect("join");
    assert_eq!(status, 200);
    assert_eq!(body["images"].as_array().map(Vec::len), Some(1));
    let info: Value =
        serde_json::from_str(body["info"].as_str().expect("info is a string")).expect("info json");
    assert_eq!(info["steps"], 500);
    assert!(body.get("interrupted").is_none() && info.get("interrupted").is_none());
    // Idle again, and only /progress remembers the interrupt.
    let (_, after) = get(&format!("{url}/sdapi/v1/progress")).await;
    assert_eq!(after["state"]["job_count"], 0);
    assert_eq!(after["state"]["interrupted"], true);
}

#[tokio::test]
async fn the_mock_answers_errors_in_a1111s_own_shapes() {
    let mock = A1111Mock::start(A1111MockConfig::default()).await.expect("mock");
    let url = mock.url();
    let (status, body) = get(&format!("{url}/sdapi/v1/nope")).await;
    assert_eq!((status, body), (404, json!({"detail": "Not Found"})));
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| client.post(format!("{url}{path}")).json(&body).send();
    let r = post("/sdapi/v1/txt2img", json!({"sampler_name": "nope"})).await.expect("post");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"error": "HTTPException", "detail": "Sampler not found", "body": "", "errors": "400: Sampler not found"})
    );
    let r = post("/sdapi/v1/options", json!({"sd_model_checkpoint": "x"})).await.expect("post");
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(r.json::<Value>().await.expect("json")["errors"], "model 'x' not found");
    let r = post("/sdapi/v1/txt2img", json!({"steps": 1.5})).await.expect("post");
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(r.json::<Value>().await.expect("json")["detail"][0]["loc"], json!(["body", "steps"]));
}
