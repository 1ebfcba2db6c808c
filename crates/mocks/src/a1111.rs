//! A mock AUTOMATIC1111 webui API (`/sdapi/v1/*`, v1.10 era) following docs/services.md §2:
//!
//! - `txt2img` / `img2img` **block** until generation ends, serialized by one global lock; each
//!   sampling step takes [`A1111MockConfig::step_delay`];
//! - `/progress` computes `progress` and `eta_relative` as the real server does, and looks like
//!   "done" when idle (never a completion signal);
//! - `/interrupt` stops the job at the next step, and the blocked request then returns **200 with
//!   the partial images** and nothing marking it interrupted;
//! - `info` is a JSON string inside the JSON; a grid is prepended when a request makes several
//!   images (`index_of_first_image` = 1);
//! - errors use the custom handler shape `{error, detail, body, errors}`; request-body type errors
//!   use FastAPI's `{"detail": [{loc, msg, type}]}`; every reply carries `X-Process-Time`;
//! - optional HTTP Basic auth as with `--api-auth`.
//!
//! Test knobs: a prompt containing `__oom__` fails with the CUDA out-of-memory shape; `__crash__`
//! fails with a `RuntimeError`. [`A1111Mock::kill`] drops every connection like a crashed process.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::{Server, json_reply};

/// The mocks' 1×1 PNG as A1111 sends images: plain base64, no `data:` prefix.
fn png_b64() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(super::PNG)
}

/// The checkpoints the mock "has".
const MODELS: &[(&str, &str, &str)] = &[
    ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "v1-5-pruned-emaonly", "6ce0161689"),
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", "sd_xl_base_1.0", "31e35c80fc"),
];

/// Sampler names (and aliases) the mock accepts.
const SAMPLERS: &[(&str, &[&str])] = &[
    ("DPM++ 2M", &["k_dpmpp_2m"]),
    ("Euler a", &["k_euler_a", "k_euler_ancestral"]),
    ("Euler", &["k_euler"]),
    ("DDIM", &[]),
];

/// Prompt markers that make a generation fail halfway: (marker, exception class, message).
const FAULTS: &[(&str, &str, &str)] = &[
    (
        "__oom__",
        "OutOfMemoryError",
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity; 21.10 GiB already allocated)",
    ),
    ("__crash__", "RuntimeError", "Expected all tensors to be on the same device"),
];

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct A1111MockConfig {
    /// Time one sampling step takes.
    pub step_delay: Duration,
    /// `--api-auth user:pass`: HTTP Basic credentials every route requires.
    pub auth: Option<(String, String)>,
}

impl Default for A1111MockConfig {
    fn default() -> Self {
        Self { step_delay: Duration::from_millis(5), auth: None }
    }
}

/// The generation state `/progress` reads (A1111's `shared.state`).
#[derive(Debug, Default)]
struct GenState {
    job: String,
    job_count: i64,
    job_no: i64,
    sampling_step: i64,
    sampling_steps: i64,
    job_timestamp: String,
    interrupted: bool,
    started: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    config: A1111MockConfig,
    state: Mutex<GenState>,
    /// The global generation lock.
    generation: tokio::sync::Mutex<()>,
    checkpoint: Mutex<String>,
    interrupts: Mutex<u32>,
    generations: Mutex<Vec<Value>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, GenState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running mock A1111.
#[derive(Debug)]
pub struct A1111Mock {
    server: Server,
    shared: Arc<Shared>,
}

impl A1111Mock {
    /// Starts on a free loopback port.
    pub async fn start(config: A1111MockConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr, config: A1111MockConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(GenState::default()),
            generation: tokio::sync::Mutex::new(()),
            checkpoint: Mutex::new(MODELS[0].0.to_owned()),
            interrupts: Mutex::new(0),
            generations: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/sdapi/v1/txt2img", post(txt2img))
            .route("/sdapi/v1/img2img", post(img2img))
            .route("/sdapi/v1/progress", get(progress))
            .route("/sdapi/v1/interrupt", post(interrupt))
            .route("/sdapi/v1/skip", post(|| async { json_reply(StatusCode::OK, &Value::Null) }))
            .route("/sdapi/v1/options", get(get_options).post(set_options))
            .route("/sdapi/v1/sd-models", get(sd_models))
            .route("/sdapi/v1/samplers", get(samplers))
            .fallback(|| async { json_reply(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"})) })
            .layer(middleware::from_fn_with_state(shared.clone(), auth_and_timing))
            .with_state(shared.clone());
        let server = Server::start(addr, app).await?;
        Ok(Self { server, shared })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// How many times `/interrupt` was called.
    pub fn interrupts(&self) -> u32 {
        *self.shared.interrupts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The request bodies of every generation started, in order.
    pub fn generations(&self) -> Vec<Value> {
        self.shared.generations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether a generation is running now.
    pub fn is_busy(&self) -> bool {
        self.shared.state().job_count > 0
    }

    /// Dies like a crashed process: every connection drops, new ones are refused.
    pub async fn kill(self) {
        self.server.kill().await;
    }
}

/// The custom exception handler's shape (docs/services.md §2.6).
fn api_error(status: StatusCode, error: &str, detail: &str, errors: &str) -> Response {
    json_reply(status, &json!({"error": error, "detail": detail, "body": "", "errors": errors}))
}

fn http_exception(status: StatusCode, detail: &str) -> Response {
    api_error(status, "HTTPException", detail, &format!("{}: {detail}", status.as_u16()))
}

async fn auth_and_timing(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut response = match &shared.config.auth {
        Some((user, pass)) => match basic_credentials(request.headers()) {
            None => with_www_authenticate(http_exception(StatusCode::UNAUTHORIZED, "Not authenticated")),
            Some((u, p)) if &u == user && &p == pass => next.run(request).await,
            Some(_) => with_www_authenticate(http_exception(
                StatusCode::UNAUTHORIZED,
                "Incorrect username or password",
            )),
        },
        None => next.run(request).await,
    };
    if let Ok(v) = HeaderValue::from_str(&format!("{}", started.elapsed().as_secs_f64())) {
        response.headers_mut().insert("x-process-time", v);
    }
    response
}

fn with_www_authenticate(mut r: Response) -> Response {
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    r
}

/// Whether an `init_images` entry decodes, as A1111's `decode_base64_to_image` reads it: base64,
/// with or without a `data:…;base64,` prefix.
fn decodes_as_image_data(text: &str) -> bool {
    use base64::Engine as _;
    let body = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD.decode(body.trim()).is_ok()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// Parses a request body the way FastAPI/pydantic does for the fields the mock looks at.
#[allow(clippy::result_large_err, reason = "the error is the reply itself, built once per request")]
fn parse_body(body: &Bytes) -> Result<Map<String, Value>, Response> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        json_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"detail": [{"loc": ["body", 0], "msg": format!("Expecting value: {e}"), "type": "value_error.jsondecode"}]}),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(json_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"detail": [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]}),
        ));
    };
    for field in ["steps", "batch_size", "n_iter", "width", "height", "seed"] {
        if let Some(v) = map.get(field)
            && !v.is_null()
            && v.as_i64().is_none()
        {
            return Err(json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"detail": [{"loc": ["body", field], "msg": "value is not a valid integer", "type": "type_error.integer"}]}),
            ));
        }
    }
    Ok(map)
}

async fn txt2img(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_body(&body) {
        Ok(req) => generate(&shared, req, "scripts_txt2img").await,
        Err(r) => r,
    }
}

async fn img2img(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(images) = req.get("init_images").and_then(Value::as_array) else {
        return http_exception(StatusCode::NOT_FOUND, "Init image not found");
    };
    for image in images {
        let ok = image.as_str().is_some_and(decodes_as_image_data);
        if !ok {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "HTTPException",
                "Invalid encoded image",
                "500: Invalid encoded image",
            );
        }
    }
    generate(&shared, req, "scripts_img2img").await
}

fn int(req: &Map<String, Value>, field: &str, default: i64) -> i64 {
    req.get(field).and_then(Value::as_i64).unwrap_or(default)
}

/// Runs a generation to its end even if the client hangs up, as A1111's worker thread does.
async fn generate(shared: &Arc<Shared>, req: Map<String, Value>, job: &'static str) -> Response {
    let shared = shared.clone();
    match tokio::spawn(async move { generate_to_end(&shared, req, job).await }).await {
        Ok(r) => r,
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "RuntimeError", "", &e.to_string()),
    }
}

async fn generate_to_end(shared: &Shared, mut req: Map<String, Value>, job: &str) -> Response {
    let sampler = req
        .get("sampler_name")
        .and_then(Value::as_str)
        .or_else(|| req.get("sampler_index").and_then(Value::as_str))
        .unwrap_or("Euler")
        .to_owned();
    let Some(sampler) = SAMPLERS
        .iter()
        .find(|(name, aliases)| *name == sampler || aliases.contains(&sampler.as_str()))
        .map(|(name, _)| (*name).to_owned())
    else {
        return http_exception(StatusCode::BAD_REQUEST, "Sampler not found");
    };
    let checkpoint = match req.get("override_settings").and_then(|o| o.get("sd_model_checkpoint")) {
        Some(Value::String(wanted)) => match find_model(wanted) {
            Some(title) => title,
            None => {
                return api_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "RuntimeError",
                    "",
                    &format!("model '{wanted}' not found"),
                );
            }
        },
        _ => shared.checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
    };
    let steps = int(&req, "steps", 50).clamp(1, 10_000);
    let batch_size = int(&req, "batch_size", 1).clamp(1, 8);
    let n_iter = int(&req, "n_iter", 1).clamp(1, 8);
    let width = int(&req, "width", 512);
    let height = int(&req, "height", 512);
    let prompt = req.get("prompt").and_then(Value::as_str).unwrap_or("").to_owned();
    let seed = match int(&req, "seed", -1) {
        -1 => i64::from(rand_seed()),
        s => s,
    };

    let _lock = shared.generation.lock().await;
    shared
        .generations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Value::Object(req.clone()));
    let timestamp = chrono_like_timestamp();
    {
        let mut st = shared.state();
        // A new job clears the previous interrupt (state.begin()).
        *st = GenState {
            job: job.to_owned(),
            job_count: n_iter,
            job_timestamp: timestamp.clone(),
            sampling_steps: steps,
            started: Some(Instant::now()),
            ..GenState::default()
        };
    }
    let mut failure = None;
    'outer: for it in 0..n_iter {
        shared.state().job_no = it;
        for step in 0..steps {
            if shared.state().interrupted {
                break 'outer;
            }
            tokio::time::sleep(shared.config.step_delay).await;
            shared.state().sampling_step = step + 1;
            if step == steps / 2
                && let Some((_, error, errors)) = FAULTS.iter().find(|(marker, _, _)| prompt.contains(marker))
            {
                failure = Some(api_error(StatusCode::INTERNAL_SERVER_ERROR, error, "", errors));
                break 'outer;
            }
        }
    }
    let interrupted = shared.state().interrupted;
    {
        // state.end(): back to the idle shape (which looks like "done"); `interrupted` stays.
        let mut st = shared.state();
        st.job = String::new();
        st.job_count = 0;
        st.job_no = 0;
        st.sampling_step = 0;
        st.sampling_steps = 0;
        st.started = None;
    }
    if let Some(f) = failure {
        return f;
    }
    // An interrupted run still returns what was produced so far.
    let made = if interrupted { batch_size } else { batch_size * n_iter };
    let mut images: Vec<Value> = Vec::new();
    let grid = made > 1;
    if grid {
        images.push(json!(png_b64()));
    }
    for _ in 0..made {
        images.push(json!(png_b64()));
    }
    let all_seeds: Vec<i64> = (0..made).map(|i| seed + i).collect();
    let (model_name, hash) =
        MODELS.iter().find(|(t, _, _)| *t == checkpoint).map_or(("unknown", ""), |(_, n, h)| (*n, *h));
    let info = json!({
        "prompt": prompt, "all_prompts": vec![prompt.clone(); made as usize],
        "negative_prompt": req.get("negative_prompt").cloned().unwrap_or(json!("")),
        "seed": seed, "all_seeds": all_seeds, "subseed": 99, "all_subseeds": vec![99; made as usize],
        "subseed_strength": 0, "width": width, "height": height, "sampler_name": sampler,
        "cfg_scale": req.get("cfg_scale").cloned().unwrap_or(json!(7.0)), "steps": steps,
        "batch_size": batch_size, "restore_faces": false, "face_restoration_model": null,
        "sd_model_name": model_name, "sd_model_hash": hash, "sd_vae_name": null, "sd_vae_hash": null,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": req.get("denoising_strength").cloned().unwrap_or(Value::Null),
        "extra_generation_params": {}, "index_of_first_image": i64::from(grid),
        "infotexts": vec![format!("{prompt}\nSteps: {steps}, Sampler: {sampler}, Seed: {seed}"); made as usize],
        "styles": [], "job_timestamp": timestamp, "clip_skip": 1,
        "is_using_inpainting_conditioning": false, "version": "v1.10.1"
    });
    if req.get("send_images").and_then(Value::as_bool) == Some(false) {
        images.clear();
    }
    if !req.get("include_init_images").and_then(Value::as_bool).unwrap_or(false) {
        if req.contains_key("init_images") {
            req.insert("init_images".into(), Value::Null);
        }
        if req.contains_key("mask") {
            req.insert("mask".into(), Value::Null);
        }
    }
    req.insert("steps".into(), json!(steps));
    req.insert("sampler_name".into(), json!(sampler));
    json_reply(StatusCode::OK, &json!({"images": images, "parameters": req, "info": info.to_string()}))
}

fn find_model(wanted: &str) -> Option<String> {
    MODELS
        .iter()
        .find(|(title, name, hash)| *title == wanted || *name == wanted || *hash == wanted)
        .map(|(title, _, _)| (*title).to_owned())
}

fn rand_seed() -> u32 {
    // Seeds only need to differ between runs.
    (super::now_ms() % 4_294_967_291) as u32
}

fn chrono_like_timestamp() -> String {
    // A1111 formats `%Y%m%d%H%M%S`; the mock only needs a stable 14-digit shape.
    format!("{:014}", super::now_ms() / 1000 % 100_000_000_000_000)
}

async fn progress(State(shared): State<Arc<Shared>>) -> Response {
    let st = shared.state();
    let (progress, eta) = if st.job_count > 0 && st.sampling_steps > 0 {
        let job_count = st.job_count as f64;
        let p = (0.01
            + st.job_no as f64 / job_count
            + (1.0 / job_count) * (st.sampling_step as f64 / st.sampling_steps as f64))
            .min(1.0);
        let elapsed = st.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        (p, elapsed / p - elapsed)
    } else {
        (0.0, 0.0)
    };
    let body = json!({
        "progress": progress, "eta_relative": eta,
        "state": {"skipped": false, "interrupted": st.interrupted, "stopping_generation": false,
                  "job": st.job, "job_count": st.job_count, "job_timestamp": st.job_timestamp,
                  "job_no": st.job_no, "sampling_step": st.sampling_step, "sampling_steps": st.sampling_steps},
        "current_image": null, "textinfo": null
    });
    json_reply(StatusCode::OK, &body)
}

async fn interrupt(State(shared): State<Arc<Shared>>) -> Response {
    *shared.interrupts.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
    shared.state().interrupted = true;
    json_reply(StatusCode::OK, &json!({}))
}

async fn get_options(State(shared): State<Arc<Shared>>) -> Response {
    let checkpoint = shared.checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    json_reply(
        StatusCode::OK,
        &json!({"sd_model_checkpoint": checkpoint, "samples_format": "png", "CLIP_stop_at_last_layers": 1,
                "return_grid": true, "live_previews_enable": false}),
    )
}

async fn set_options(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(wanted) = req.get("sd_model_checkpoint").and_then(Value::as_str) {
        let Some(title) = find_model(wanted) else {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "RuntimeError",
                "",
                &format!("model '{wanted}' not found"),
            );
        };
        *shared.checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = title;
    }
    json_reply(StatusCode::OK, &Value::Null)
}

async fn sd_models() -> Response {
    let list: Vec<Value> = MODELS
        .iter()
        .map(|(title, name, hash)| {
            json!({"title": title, "model_name": name, "hash": hash, "sha256": null,
                   "filename": format!("/models/Stable-diffusion/{name}.safetensors"), "config": null})
        })
        .collect();
    json_reply(StatusCode::OK, &Value::Array(list))
}

async fn samplers() -> Response {
    let list: Vec<Value> = SAMPLERS
        .iter()
        .map(|(name, aliases)| json!({"name": name, "aliases": aliases, "options": {}}))
        .collect();
    json_reply(StatusCode::OK, &Value::Array(list))
}
