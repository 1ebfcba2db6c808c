//! The monitor and client pages in a real browser: Debian's `chromium` driven through
//! `chromium-driver` (WebDriver), against real `fleetq` processes. What is compared is the
//! rendered state (the `data-` attributes the pages put on machines, workers, badges and job rows),
//! never screenshots. Waits poll the page; their bounds only turn a hang into a failure.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Guard, api_at, fleetq, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use fleetq_broker::testing::RedisServer;
use serde_json::{Value, json};

/// A headless chromium session; the driver process goes with it.
struct Browser {
    client: Client,
    _driver: Guard,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/test installs it)");
        let driver = Guard(driver);
        let caps = json!({"goog:chromeOptions": {"args": [
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"
        ]}});
        let caps = caps.as_object().cloned().unwrap_or_default();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut builder = ClientBuilder::rustls().expect("TLS setup");
            match builder.capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(client) => return Self { client, _driver: driver },
                Err(e) => {
                    assert!(tokio::time::Instant::now() < give_up, "chromedriver never answered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Runs `script` (a function body) in the page until it returns something truthy.
    async fn until(&self, what: &str, script: &str) -> Value {
        self.until_within(what, script, Duration::from_secs(30)).await
    }

    async fn until_within(&self, what: &str, script: &str, bound: Duration) -> Value {
        let give_up = tokio::time::Instant::now() + bound;
        loop {
            let v = self.client.execute(script, vec![]).await.expect("script runs");
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(tokio::time::Instant::now() < give_up, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("page loads");
        self.until("a live stream", r#"return document.getElementById("conn").dataset.state === "live";"#)
            .await;
    }

    /// Clicks the element `css` names, found and clicked in one script: the page redraws whole
    /// sections, so an element found in one call may be gone by the next.
    async fn click(&self, css: &str) {
        let quoted = serde_json::to_string(css).expect("a string");
        let script = format!(
            "const e = document.querySelector({quoted}); if (!e) return false; e.click(); return true;"
        );
        self.until(&format!("{css} to click"), &script).await;
    }

    /// Keeps `token` in the `fleetq_token` cookie, as the page's token dialog does.
    async fn token(&self, token: &str) {
        let script = format!("document.cookie = 'fleetq_token={token}; path=/; SameSite=Strict';");
        self.client.execute(&script, vec![]).await.expect("cookie set");
    }

    async fn picture(&self) -> Value {
        self.client.execute(PICTURE, vec![]).await.expect("picture")
    }

    async fn close(self) {
        self.client.close().await.ok();
    }
}

/// What the monitor shows, as data: machines, workers with their badges, the tabs' counts and the
/// rows of the open tab.
const PICTURE: &str = r##"
const q = (s, root = document) => [...root.querySelectorAll(s)];
return {
  machines: q("[data-machine-id]").map((m) => [m.dataset.machineId, m.dataset.phase]),
  workers: q("[data-worker-id]").map((w) => [w.dataset.workerId, w.dataset.status,
    q(".badge", w).map((b) => `${b.dataset.service}:${b.dataset.status}:${b.dataset.stale}`)]),
  counts: q(".tabs .count").map((c) => c.textContent),
  rows: q("#jobs tr[data-job-id]").map((r) => `${r.dataset.jobId}:${r.dataset.status}`).sort(),
};"##;

/// Starts `fleetq worker` (simulation, 100 ms steps) on Redis `queue`, health reports every 4 s (so
/// a live worker's badge is never stale, and a 1 s job's `active` and `idle` come from the
/// worker's activity reports, not from the timer).
fn worker(redis: &str, queue: &str, id: &str, machine: &str) -> Guard {
    worker_with(redis, queue, id, machine, &[("WORKER_CONNECTORS", "simulation")])
}

fn worker_with(redis: &str, queue: &str, id: &str, machine: &str, env: &[(&str, &str)]) -> Guard {
    let child = fleetq()
        .args(["worker", "--queue", queue, "--redis", redis])
        .env("WORKER_ID", id)
        .env("MACHINE_ID", machine)
        .env("SIMULATION_STEP_MS", "100")
        .env("WORKER_SERVICE_HEALTH_CHECK_INTERVAL", "4")
        .env("WORKER_SHUTDOWN_GRACE_S", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleetq worker");
    Guard(child)
}

/// Starts `fleetq up` on the embedded store in `data` with `extra` flags; returns it with its URL.
fn up(data: &std::path::Path, extra: &[&str]) -> (Guard, String) {
    common::fleetq_up(&[&["up"], extra].concat(), data, Stdio::null())
}

/// Starts `fleetq mock comfyui` on `port`.
fn comfy_mock(port: u16) -> Guard {
    let child = fleetq()
        .args(["mock", "comfyui", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetq mock comfyui");
    Guard(child)
}

/// The API at `url` through the client library, with `token` when auth is on.
fn client(url: &str, token: Option<&str>) -> fleetq_client::Client {
    fleetq_client::Client::new(url).expect("an API URL").with_token(token.map(str::to_owned))
}

async fn submit(url: &str, body: Value) -> String {
    submit_as(url, None, body).await
}

/// `GET /api/jobs/{id}` as JSON, with `token` when auth is on.
async fn get_job(url: &str, token: Option<&str>, id: &str) -> Value {
    let job = client(url, token).job(&fleetq_core::JobId(id.to_owned())).await.expect("get");
    serde_json::to_value(job).expect("JSON")
}

/// Submits `body`, with `token` when auth is on; returns the job's id.
async fn submit_as(url: &str, token: Option<&str>, body: Value) -> String {
    match client(url, token).submit_json(&body, None).await.expect("submit") {
        fleetq_api::model::SubmitReply::One(one) => one.id.0,
        fleetq_api::model::SubmitReply::Batch(b) => panic!("one job, not a batch of {}", b.jobs.len()),
    }
}

/// Flow 1, flow 2 and a dropped stream, on Redis with a worker process:
/// - the page is open before the machine starts; the machine, its worker and the worker's badge
///   appear; a job runs and the badge goes `active` and back `idle` (the health timer is 120 s);
/// - with a job in flight and others queued, a page opened now shows the same picture;
/// - the API process restarts on the same port while jobs are submitted elsewhere: the page
///   resumes its stream and shows each job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_follows_the_fleet_live() {
    let redis = RedisServer::shared();
    let queue = format!("pages-{}", std::process::id());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A stale threshold above the page's old built-in 15 s: the page must take the API's.
    let stale_after = ["--stale-after-s", "20"];
    let (api, url) = api_at(&redis.url, &queue, &listen, &stale_after);
    let (_other, other_url) = api_at(&redis.url, &queue, "127.0.0.1:0", &stale_after);
    let http = reqwest::Client::new();
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;

    // Flow 1: the machine starts under the open page.
    let w = worker(&redis.url, &queue, "box1-gpu0", "box1");
    page.until(
        "the worker with an idle badge",
        r#"return !!document.querySelector('[data-machine-id="box1"] [data-worker-id="box1-gpu0"] .badge[data-service="simulation"][data-status="idle"]');"#,
    )
    .await;
    page.client
        .execute(
            r#"window.seen = [];
            new MutationObserver(() => {
              const b = document.querySelector('[data-worker-id="box1-gpu0"] .badge[data-service="simulation"]');
              const w = document.querySelector('[data-worker-id="box1-gpu0"]');
              const now = `${w && w.dataset.status}/${b && b.dataset.status}`;
              if (window.seen[window.seen.length - 1] !== now) window.seen.push(now);
            }).observe(document.getElementById("machines"), {subtree: true, childList: true, attributes: true});"#,
            vec![],
        )
        .await
        .expect("observer");
    let id = submit(&url, json!({"service": "simulation", "payload": {"steps": 10}})).await;
    page.until(
        "the job running on the worker",
        &format!(r#"return !!document.querySelector('[data-worker-id="box1-gpu0"] [data-open="{id}"]');"#),
    )
    .await;
    let seen = page
        .until(
            "the badge back to idle after the job",
            r#"const s = window.seen; return s.length > 1 && s[s.length - 1] === "idle/idle" && s;"#,
        )
        .await;
    let seen: Vec<String> = serde_json::from_value(seen).expect("strings");
    let busy =
        seen.iter().position(|s| s == "busy/active").unwrap_or_else(|| panic!("never busy/active: {seen:?}"));
    assert!(seen[busy..].iter().any(|s| s == "idle/idle"), "{seen:?}");
    page.click(r#".tabs button[data-tab="finished"]"#).await;
    page.until(
        "the job completed",
        &format!(
            r#"return !!document.querySelector('#jobs tr[data-job-id="{id}"][data-status="completed"]');"#
        ),
    )
    .await;
    page.click(&format!(r#"#jobs tr[data-job-id="{id}"]"#)).await;
    page.until(
        "its timeline",
        r#"return !!document.querySelector('#timeline tr[data-attempt="1"][data-end="completed"]');"#,
    )
    .await;
    page.client.execute(r#"document.getElementById("job-dialog").close();"#, vec![]).await.expect("close");

    // Flow 2: a job in flight (it hangs at its first step) and three queued behind it.
    let running = submit(&url, json!({"service": "simulation", "payload": {"hang_at_step": 1}})).await;
    let mut queued = Vec::new();
    for i in 0..3 {
        queued.push(submit(&url, json!({"service": "simulation", "payload": {"note": i}})).await);
    }
    page.click(r#".tabs button[data-tab="pending"]"#).await;
    page.until(
        "three pending",
        r#"return document.querySelectorAll('#jobs tr[data-status="pending"]').length === 3;"#,
    )
    .await;
    let positions = page
        .until("queue positions", r#"const p = [...document.querySelectorAll('#jobs tr[data-status="pending"] td:nth-child(5)')].map((c) => c.textContent).sort();
            return p.join() === "1,2,3" && p;"#)
        .await;
    assert_eq!(positions, json!(["1", "2", "3"]), "the pending rows carry the broker's positions");
    let before = page.picture().await;
    // For people to look at (the README's picture comes from here).
    page.until(
        "the services card",
        r#"return !!document.querySelector('#services tr[data-service="simulation"]');"#,
    )
    .await;
    std::fs::create_dir_all("../../target").ok();
    if let Ok(png) = page.client.screenshot().await {
        std::fs::write("../../target/monitor.png", png).ok();
    }
    let fresh = Browser::start().await;
    fresh.goto(&format!("{url}/")).await;
    let after = fresh
        .until(
            "the same pending rows",
            &format!("const p = (() => {{{PICTURE}}})(); return p.rows.length === 3 && p;"),
        )
        .await;
    assert_eq!(before, after, "a page opened mid-run shows what the open page shows");
    fresh.close().await;

    // The stream dropped and resumed: the API restarts on its port; jobs arrive meanwhile through
    // another API process.
    drop(api);
    page.until(
        "the stream lost, the data said to be as of when it was",
        r#"const p = document.getElementById("conn"); return p.dataset.state !== "live" && /data as of/.test(p.textContent);"#,
    )
        .await;
    for i in 0..4 {
        queued.push(submit(&other_url, json!({"service": "simulation", "payload": {"note": i}})).await);
    }
    let (_api, _) = api_at(&redis.url, &queue, &listen, &[]);
    page.until("the stream back", r#"return document.getElementById("conn").dataset.state === "live";"#)
        .await;
    let rows = page.until("seven pending, each once", r#"const r = [...document.querySelectorAll('#jobs tr[data-status="pending"]')].map((r) => r.dataset.jobId);
        return r.length === 7 && r;"#).await;
    let mut rows: Vec<String> = serde_json::from_value(rows).expect("ids");
    rows.sort();
    queued.sort();
    assert_eq!(rows, queued, "every queued job once, none lost across the restart");
    // Bulk: every pending job matching the filter, cancelled after the count is confirmed.
    page.client
        .execute("window.asked = []; window.confirm = (m) => { window.asked.push(m); return true; }; window.alert = () => {};", vec![])
        .await
        .expect("dialogs answered");
    page.click("#bulk-action").await;
    page.until("no pending job left", r#"return document.querySelectorAll('#jobs tr[data-status="pending"]').length === 0 && document.querySelector('.tabs [data-tab="pending"] .count').textContent === "(0)";"#).await;
    let asked = page.client.execute("return window.asked;", vec![]).await.expect("asked");
    assert_eq!(asked, json!(["cancel 7 jobs?"]), "the count is shown before confirming");
    for id in &queued {
        let rec = get_job(&other_url, None, id).await;
        assert_eq!(rec["status"], "cancelled", "{id}");
    }
    client(&other_url, None).cancel(&fleetq_core::JobId(running.clone())).await.expect("cancel");

    // The worker killed (kill -9): its reports stop, and its badge turns stale once its last report
    // is older than the API's threshold (20 s), not earlier.
    let fresh =
        r#"return !!document.querySelector('[data-worker-id="box1-gpu0"] .badge[data-stale="false"]');"#;
    page.until("a live worker's badge fresh", fresh).await;
    drop(w);
    page.until_within(
        "the badge stale",
        r#"return !!document.querySelector('[data-worker-id="box1-gpu0"] .badge[data-service="simulation"][data-stale="true"]');"#,
        Duration::from_secs(60),
    )
    .await;
    let reply = http.get(format!("{other_url}/api/workers")).send().await.expect("workers");
    // The server's clock, to the second (the page estimates it from the same header).
    let server_now = reply
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .expect("a Date header");
    // The report the page judged (its `at`; unchanged reports are not evented, so it may be older
    // than the broker's latest).
    let at = page
        .client
        .execute(
            r#"return Number(document.querySelector('[data-worker-id="box1-gpu0"] .badge[data-service="simulation"]').dataset.at);"#,
            vec![],
        )
        .await
        .expect("the badge's report time")
        .as_i64()
        .expect("a number");
    // Whole seconds on both sides of the page's estimate: 2 s of slack, far below the 5 s between
    // the old built-in 15 s and the API's 20 s.
    assert!(
        server_now + 1000 - at >= 18_000,
        "the page marked a report stale {} ms after it, before the API's 20 s threshold",
        server_now - at
    );
    page.close().await;
}

/// A ComfyUI that dies and comes back: its worker's badge turns `offline` and back `idle` on the
/// page (from the connector's own signal: the worker's health timer is 4 s, the page follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_going_offline_and_back_is_shown() {
    let redis = RedisServer::shared();
    let queue = format!("pages-comfy-{}", std::process::id());
    let (_api, url) = api_at(&redis.url, &queue, "127.0.0.1:0", &[]);
    let port = free_port();
    let mock = comfy_mock(port);
    let comfy = format!("http://127.0.0.1:{port}");
    let _w = worker_with(
        &redis.url,
        &queue,
        "box2-gpu0",
        "box2",
        &[("WORKER_CONNECTORS", "comfyui"), ("COMFYUI_URL", &comfy)],
    );
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;
    let badge = |status: &str| {
        format!(
            r#"return !!document.querySelector('[data-worker-id="box2-gpu0"] .badge[data-service="comfyui"][data-status="{status}"]');"#
        )
    };
    page.until("ComfyUI idle", &badge("idle")).await;
    drop(mock);
    page.until("ComfyUI offline", &badge("offline")).await;
    let _mock = comfy_mock(port);
    page.until("ComfyUI idle again", &badge("idle")).await;
    page.close().await;
}

/// A page left open on an idle, healthy worker: its health reports change nothing (no event), yet
/// its badge never turns stale — the API sends the latest heartbeats to open pages three times per
/// `--stale-after-s` (here 3 s, watched for 9 s: three thresholds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_left_open_keeps_a_live_worker_fresh() {
    let redis = RedisServer::shared();
    let queue = format!("pages-fresh-{}", std::process::id());
    let (_api, url) = api_at(&redis.url, &queue, "127.0.0.1:0", &["--stale-after-s", "3"]);
    let _w = worker_with(
        &redis.url,
        &queue,
        "fresh-gpu0",
        "fresh",
        &[("WORKER_CONNECTORS", "simulation"), ("WORKER_SERVICE_HEALTH_CHECK_INTERVAL", "1")],
    );
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;
    let badge = r#"[data-worker-id="fresh-gpu0"] .badge[data-service="simulation"]"#;
    page.until(
        "the worker's badge, fresh",
        &format!(r#"return !!document.querySelector('{badge}[data-stale="false"]');"#),
    )
    .await;
    page.client
        .execute(
            &format!(
                r#"window.sawStale = 0; window.watch = setInterval(() => {{
                     if (document.querySelector('{badge}[data-stale="true"]')) window.sawStale += 1; }}, 100);"#
            ),
            vec![],
        )
        .await
        .expect("watch the badge");
    // An observation window, not a timing assertion: three thresholds with nothing changing.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let stale = page
        .client
        .execute("clearInterval(window.watch); return window.sawStale;", vec![])
        .await
        .expect("seen");
    assert_eq!(stale, json!(0), "a live worker's badge turned stale on a page left open");
    page.close().await;
}

/// A box whose workers die without a word (kill -9): on a page open before and on one opened
/// after, its workers read `silent` and the box `lost`, with how long ago it was last heard —
/// judged from the data both pages have, not from what one of them happened to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_killed_reads_lost_on_pages_opened_before_and_after() {
    let redis = RedisServer::shared();
    let queue = format!("pages-lost-{}", std::process::id());
    let (_api, url) = api_at(&redis.url, &queue, "127.0.0.1:0", &["--stale-after-s", "3"]);
    let fast = [("WORKER_CONNECTORS", "simulation"), ("WORKER_SERVICE_HEALTH_CHECK_INTERVAL", "1")];
    let mut workers = vec![
        worker_with(&redis.url, &queue, "boxk-gpu0", "boxk", &fast),
        worker_with(&redis.url, &queue, "boxk-gpu1", "boxk", &fast),
    ];
    let before = Browser::start().await;
    before.goto(&format!("{url}/")).await;
    before
        .until(
            "the box ready, two workers heard",
            r#"const m = document.querySelector('[data-machine-id="boxk"]');
               return !!m && m.dataset.phase === "ready" && m.querySelectorAll('.worker[data-status="idle"]').length === 2;"#,
        )
        .await;
    for w in &mut workers {
        w.0.kill().expect("kill -9");
    }
    let lost = r#"const m = document.querySelector('[data-machine-id="boxk"]');
        return !!m && m.dataset.phase === "lost" && m.querySelectorAll('.worker[data-status="silent"]').length === 2
          && /last heard \d+ s ago/.test(m.textContent);"#;
    before.until_within("the box lost on the page open before", lost, Duration::from_secs(30)).await;
    let after = Browser::start().await;
    after.goto(&format!("{url}/")).await;
    after.until_within("the box lost on a page opened after", lost, Duration::from_secs(30)).await;
    // For a person to look at (not compared).
    if let Ok(png) = after.client.screenshot().await {
        std::fs::write("../../target/monitor-lost.png", png).ok();
    }
    after.close().await;
    before.close().await;
}

/// The open job detail follows its job: opened while it runs, it turns `completed`, with its
/// outcome, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_job_detail_follows_the_job() {
    let dir = tempfile::tempdir().expect("dir");
    let (_up, url) = up(dir.path(), &["--workers", "1", "--step-ms", "400", "--steps", "5", "--jitter", "0"]);
    let id = submit(&url, json!({"service": "simulation", "payload": {"steps": 5}})).await;
    let page = Browser::start().await;
    page.goto(&format!("{url}/?job={id}")).await;
    page.until(
        "the detail shows the job running",
        r##"return document.getElementById("job-dialog").open
             && !!document.querySelector('#job-body .status[data-status="in_progress"], #job-body .status[data-status="assigned"]');"##,
    )
    .await;
    page.until_within(
        "the detail turns completed, with its outcome",
        r##"return !!document.querySelector('#job-body > p .status[data-status="completed"]')
             && [...document.querySelectorAll("#job-body summary")].some((s) => s.textContent === "Outcome");"##,
        Duration::from_secs(30),
    )
    .await;
    // The worker's count is the broker's: a page opened now says the same as the one open before.
    let done =
        r#"return [...document.querySelectorAll(".worker")].some((w) => / 1 done/.test(w.textContent));"#;
    page.until("the open page counts the completion", done).await;
    let later = Browser::start().await;
    later.goto(&format!("{url}/")).await;
    later.until("a page opened afterwards counts it too", done).await;
    later.close().await;
    page.close().await;
}

/// The Pending tab counts what the broker counts, not the 1,000 jobs the snapshot carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_count_is_the_brokers() {
    let dir = tempfile::tempdir().expect("dir");
    let (_up, url) = up(dir.path(), &["--workers", "1"]);
    let batch: Vec<Value> =
        (0..1200).map(|i| json!({"service": "nobody-serves-this", "payload": i})).collect();
    client(&url, None).submit_json(&Value::Array(batch[..600].to_vec()), None).await.expect("submit");
    client(&url, None).submit_json(&Value::Array(batch[600..].to_vec()), None).await.expect("submit");
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;
    page.until(
        "the tab counts 1,200 and the list says how many more",
        r##"return document.querySelector('.tabs [data-tab="pending"] .count').textContent === "(1200)"
             && /and \d+ more in the queue/.test(document.querySelector("#jobs .foot").textContent);"##,
    )
    .await;
    // A filter naming no known service says so, and the known ones are offered.
    page.goto(&format!("{url}/?service=nobody-serve")).await;
    page.until(
        "the mistyped service named, the known ones offered",
        r#"return /no service is named "nobody-serve"/.test(document.getElementById("filter-note").textContent)
             && !!document.querySelector('#known-services option[value="nobody-serves-this"]');"#,
    )
    .await;
    page.close().await;
}

/// A paused service: its pending job reads `paused` (no ETA), the fleet table offers Resume, and
/// a click on it lets the job run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_service_is_shown_and_resumed_from_the_page() {
    let dir = tempfile::tempdir().expect("dir");
    let (_up, url) = up(dir.path(), &["--workers", "1", "--step-ms", "50"]);
    client(&url, None).pause_service("simulation", true).await.expect("pause");
    let id = submit(&url, json!({"service": "simulation", "payload": {"steps": 2}})).await;
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;
    page.until(
        "the job paused, Resume offered",
        &format!(
            r#"return !!document.querySelector('#jobs tr[data-job-id="{id}"] .status[data-status="paused"]')
                 && !!document.querySelector('[data-pause="simulation"][data-paused="true"]');"#
        ),
    )
    .await;
    page.click(r#"[data-pause="simulation"]"#).await;
    page.until(
        "the job ran once resumed",
        &format!(
            r#"return !document.querySelector('#jobs tr[data-job-id="{id}"]')
                 && !!document.querySelector('[data-pause="simulation"][data-paused="false"]');"#
        ),
    )
    .await;
    // A guard against a hang, not a timing assertion.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while get_job(&url, None, &id).await["status"] != "completed" {
        assert!(tokio::time::Instant::now() < give_up, "the resumed job never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    page.close().await;
}

/// The client page says when no worker can serve a job, links each job to the monitor's detail,
/// and keeps its jobs across a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_page_shows_unworkable_links_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().expect("dir");
    let (_up, url) = up(dir.path(), &["--workers", "1"]);
    let page = Browser::start().await;
    page.goto(&format!("{url}/client")).await;
    let service = page.client.find(Locator::Css("input[name=service]")).await.expect("service");
    service.clear().await.expect("clear");
    service.send_keys("nobody-serves-this").await.expect("type");
    page.click("#submit button[type=submit]").await;
    let unworkable = r##"const r = document.querySelector('#mine tr[data-status="pending"]');
        return !!r && !!r.querySelector('.status[data-status="unworkable"]')
          && r.querySelector("a").getAttribute("href") === "/?job=" + r.dataset.jobId && r.dataset.jobId;"##;
    let id = page.until("the job unworkable, linked to the monitor", unworkable).await;
    page.goto(&format!("{url}/client")).await;
    let again = page.until("the job kept across the reload", unworkable).await;
    assert_eq!(again, id);
    page.close().await;
}

/// With auth on, a read-only token sees no action and the API refuses one; an admin token submits
/// from the client page, watches a job to completion and cancels a running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_the_actions_and_the_client_page_submits_and_cancels() {
    let data = tempfile::tempdir().expect("tempdir");
    let tokens = ["--token", "read:viewer:look-only", "--token", "admin:boss:all-powers"];
    let (_up, url) =
        up(data.path(), &["--workers", "1", "--step-ms", "100", tokens[0], tokens[1], tokens[2], tokens[3]]);
    let http = reqwest::Client::new();
    let id =
        submit_as(&url, Some("all-powers"), json!({"service": "simulation", "payload": {"hang_at_step": 1}}))
            .await;

    let page = Browser::start().await;
    // Without a token the monitor says what it needs, not that the API is offline.
    page.client.goto(&format!("{url}/")).await.expect("page");
    page.until(
        "the pill asks for a token",
        r#"const p = document.getElementById("conn"); return p.dataset.state === "unauthorized" && p.textContent === "needs a token";"#,
    )
    .await;
    page.client.goto(&format!("{url}/client")).await.expect("page");
    page.token("look-only").await;
    page.goto(&format!("{url}/?job={id}")).await;
    page.until(
        "who is signed in",
        r#"return document.getElementById("me").textContent === "viewer (read)";"#,
    )
    .await;
    page.until("the job detail", r#"return document.getElementById("job-dialog").open && !!document.querySelector('#job-body [data-action="cancel"]');"#).await;
    let visible = page
        .client
        .execute(r#"return [...document.querySelectorAll("[data-admin]")].filter((b) => b.offsetParent !== null).length;"#, vec![])
        .await
        .expect("script");
    assert_eq!(visible, json!(0), "a read-only token sees no action");
    let refused =
        http.post(format!("{url}/api/jobs/{id}/cancel")).bearer_auth("look-only").send().await.expect("post");
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);

    page.token("all-powers").await;
    page.goto(&format!("{url}/?job={id}")).await;
    page.until("the cancel button", r#"const b = document.querySelector('#job-body [data-action="cancel"]'); return b && b.offsetParent !== null;"#).await;
    page.until(
        "the running attempt in the timeline",
        r#"return !!document.querySelector('#timeline tbody tr');"#,
    )
    .await;
    page.click(r#"#job-body [data-action="cancel"]"#).await;
    page.until(
        "the job cancelled",
        r#"return /cancel sent/.test(document.getElementById("action-result").textContent);"#,
    )
    .await;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rec = get_job(&url, Some("all-powers"), &id).await;
        if rec["status"] == "cancelled" {
            assert_eq!(rec["history"][0]["end"], "cancelled", "{rec}");
            break;
        }
        assert!(tokio::time::Instant::now() < give_up, "the cancel from the page never took: {rec}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The client page: one job to completion, one cancelled while it runs.
    page.goto(&format!("{url}/client")).await;
    let payload = page.client.find(Locator::Css("textarea[name=payload]")).await.expect("payload");
    let submit_from_page = async |json: &str| {
        payload.clear().await.expect("clear");
        payload.send_keys(json).await.expect("type");
        page.click("#submit button[type=submit]").await;
    };
    submit_from_page(r#"{"steps": 3}"#).await;
    page.until(
        "the job completed",
        r#"return !!document.querySelector('#mine tr[data-status="completed"]');"#,
    )
    .await;
    submit_from_page(r#"{"steps": 1000}"#).await;
    page.until(
        "the job running",
        r#"return !!document.querySelector('#mine tr[data-status="in_progress"] [data-cancel]');"#,
    )
    .await;
    page.click(r#"#mine tr[data-status="in_progress"] [data-cancel]"#).await;
    page.until(
        "the job cancelled",
        r#"return !!document.querySelector('#mine tr[data-status="cancelled"]');"#,
    )
    .await;
    // A field the API refuses is named on the page.
    page.client
        .execute(r#"document.querySelector("input[name=priority]").value = "1e12";"#, vec![])
        .await
        .expect("script");
    submit_from_page("{}").await;
    let error =
        page.until("the refusal", r#"return document.getElementById("submit-error").textContent;"#).await;
    assert!(error.as_str().is_some_and(|e| e.starts_with("priority")), "{error}");
    page.close().await;
}

/// Every `/api/…` path the pages call is in the OpenAPI document, and every event kind the
/// monitor folds is one the broker emits.
#[test]
fn the_pages_speak_the_documented_api() {
    let out = fleetq().arg("openapi").output().expect("fleetq openapi");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("OpenAPI JSON");
    let documented: Vec<String> = doc["paths"].as_object().expect("paths").keys().cloned().collect();
    let pattern = |p: &str| -> Vec<String> {
        p.split('/').map(|s| if s.starts_with('{') { "*".into() } else { s.into() }).collect()
    };
    let documented: Vec<Vec<String>> = documented.iter().map(|p| pattern(p)).collect();
    let mut called = Vec::new();
    for file in ["api.js", "monitor.js", "client.js"] {
        let text = std::fs::read_to_string(format!("../../web/js/{file}")).expect("page script");
        for (i, _) in text.match_indices("/api/") {
            let path: String =
                text[i..].chars().take_while(|c| !matches!(c, '"' | '`' | '?' | '\'' | ' ')).collect();
            // `${…}` is a parameter; a trailing one (`/${action}`) names a documented action.
            let path = path
                .replace("${encodeURIComponent(id)}", "{id}")
                .replace("${encodeURIComponent(j.id)}", "{id}")
                .replace("${encodeURIComponent(jobId)}", "{id}")
                .replace("${encodeURIComponent(name)}", "{name}")
                .replace("${encodeURIComponent(service)}", "{service}");
            called.push(path);
        }
    }
    assert!(called.len() >= 8, "{called:?}");
    for path in &called {
        let candidates: Vec<String> = if path.contains("${action}") || path.contains("${verb}") {
            ["cancel", "retry"].iter().map(|a| path.replace("${action}", a).replace("${verb}", a)).collect()
        } else if path.contains("${toggle}") {
            ["pause", "resume"].iter().map(|a| path.replace("${toggle}", a)).collect()
        } else {
            vec![path.clone()]
        };
        for c in candidates {
            let want = pattern(&c);
            assert!(
                documented.iter().any(|d| d.len() == want.len()
                    && d.iter()
                        .zip(&want)
                        .all(|(a, b)| a == "*" || b == "*" || a == b || b.starts_with('{'))),
                "the pages call {c}, which /openapi.json does not document"
            );
        }
    }
    let text = std::fs::read_to_string("../../web/js/api.js").expect("api.js");
    let start = text.find("EVENT_KINDS = [").expect("EVENT_KINDS");
    let list = &text[start..text[start..].find("];").map_or(text.len(), |e| start + e)];
    let folded: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    let emitted: Vec<String> = doc["components"]["schemas"]["EventKind"]["oneOf"]
        .as_array()
        .expect("EventKind is a oneOf")
        .iter()
        .filter_map(|k| k["properties"]["type"]["enum"][0].as_str().map(str::to_owned))
        .collect();
    assert!(emitted.len() >= 10, "event kinds in the document: {emitted:?}");
    let mut a: Vec<&str> = folded.clone();
    let mut b: Vec<&str> = emitted.iter().map(String::as_str).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "the kinds the monitor folds are the kinds the broker emits");
}

/// The monitor under load — a benchmark, not run by default (`cargo test -p fleetq --test pages --
/// --ignored --nocapture`): `fleetq up` with 100 simulated workers (`FLEETQ_BENCH_WORKERS`) and 10,000
/// unfinished jobs.
/// Prints the time to the first full picture and, over 10 s of live events, the time from an
/// event's `at` to the frame that drew it (the page's own `fleetqStats`), as one JSON line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn monitor_under_load() {
    let data = tempfile::tempdir().expect("tempdir");
    // FLEETQ_BENCH_WORKERS sets the fleet's size (100 by default).
    let workers =
        std::env::var("FLEETQ_BENCH_WORKERS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(100);
    let (_up, url) = up(data.path(), &["--workers", &workers.to_string(), "--step-ms", "1000"]);
    let http = reqwest::Client::new();
    for _ in 0..10 {
        let batch: Vec<Value> =
            (0..1000).map(|_| json!({"service": "simulation", "payload": {"steps": 60}})).collect();
        let s = http.post(format!("{url}/api/jobs")).json(&batch).send().await.expect("batch").status();
        assert!(s.is_success(), "{s}");
    }
    let page = Browser::start().await;
    page.goto(&format!("{url}/")).await;
    let first = page.until("the first picture", "return window.fleetqStats.firstRenderMs;").await;
    page.client
        .execute("window.fleetqStats.lagMs = []; window.fleetqStats.drawMs = [];", vec![])
        .await
        .expect("reset");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let shown = page.picture().await;
    let lags = page.client.execute("return window.fleetqStats.lagMs;", vec![]).await.expect("lags");
    let mut lags: Vec<f64> = serde_json::from_value(lags).expect("numbers");
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags.get(((p * lags.len() as f64).ceil() as usize).saturating_sub(1)).copied();
    let draws = page.client.execute("return window.fleetqStats.drawMs;", vec![]).await.expect("draws");
    let mut draws: Vec<f64> = serde_json::from_value(draws).expect("numbers");
    draws.sort_by(f64::total_cmp);
    let draw_pct = |p: f64| draws.get(((p * draws.len() as f64).ceil() as usize).saturating_sub(1)).copied();
    let workers = shown["workers"].as_array().map_or(0, Vec::len);
    println!(
        "{}",
        json!({"bench": "monitor", "workers": workers, "tabs": shown["counts"], "first_render_ms": first,
            "events": lags.len(), "event_to_dom_p50_ms": pct(0.5), "event_to_dom_p99_ms": pct(0.99),
            "frames": draws.len(), "draw_p50_ms": draw_pct(0.5), "draw_p99_ms": draw_pct(0.99)})
    );
    let png = page.client.screenshot().await.expect("screenshot");
    std::fs::write("../../target/monitor-load.png", png).ok();
    page.close().await;
}
