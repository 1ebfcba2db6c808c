//! fleetq's HTTP API over any [`Broker`]: jobs (submit, batch, get, list, cancel, retry, per-job SSE,
//! matching workers, artifacts), the fleet (workers, machines, services, snapshot, global SSE), the
//! WebSocket protocols (`/ws/monitor`, legacy `/ws/client`), auth, `/health`, `/ready`, `/metrics`,
//! `/openapi.json`, and the monitor and client pages (`/`, `/client`).
//!
//! The API keeps no state of its own beyond caches it rebuilds from the broker (duration statistics,
//! metrics), so any number of API processes can serve one Redis.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let broker = Arc::new(fleetq_broker::embedded::EmbeddedBroker::open("jobs.db", Default::default())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7777").await?;
//! // Until the config's `shutdown` token fires: then streams end and requests drain.
//! fleetq_api::serve(listener, broker, fleetq_api::ApiConfig::default()).await?;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod bulk;
mod config;
pub mod control;
mod error;
mod fleet;
mod fold;
mod jobs;
pub mod model;
mod openapi;
mod ops;
mod request;
mod state;
pub mod stats;
mod stream;
mod web;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use fleetq_broker::Broker;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use auth::{Caller, Role, Tokens};
pub use config::ApiConfig;
pub use error::{ApiError, ApiResult};
pub use openapi::openapi_document;
use openapi::routes;
pub use ops::install_metrics_recorder;
use state::AppState;

/// Serves the API on `listener` until `config.shutdown` fires, then drains: the router, this
/// process's share of the queue's upkeep ([`maintain`] every `config.reap_every`), and a graceful
/// shutdown in which every event stream ends. Cancels `config.shutdown` when serving fails, so
/// whatever else the caller runs under that token stops too.
pub async fn serve<B: Broker>(
    listener: tokio::net::TcpListener,
    broker: Arc<B>,
    config: ApiConfig,
) -> std::io::Result<()> {
    let stop = config.shutdown.clone();
    let every = config.reap_every.max(Duration::from_millis(10));
    let upkeep = tokio::spawn(maintain(broker.clone(), every, stop.clone()));
    let limits = (config.header_timeout, config.max_connections);
    let served = accept_loop(listener, router(broker, config), limits, stop.clone()).await;
    stop.cancel();
    upkeep.await.ok();
    served
}

/// Serves connections until `stop`, then lets them finish (event streams end at `stop` too).
/// Unlike `axum::serve`, a connection is bounded: at most `max_connections` at once (one beyond is
/// closed at accept), and a request head — or the next one on a kept-alive connection — must
/// arrive within `header_timeout`.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    (header_timeout, max_connections): (Duration, usize),
    stop: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of descriptors and the like: pause rather than spin, as axum::serve does.
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(max_connections, "connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            // A new connection must say something within the header timeout too: hyper's timer
            // starts only once the protocol is known, which takes the first bytes.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The whole API as an axum router. Spawns the event hub (one reader of the event log shared by
/// every stream) and the statistics fold (needs a Tokio runtime); both stop at `config.shutdown`
/// or when the router is dropped.
pub fn router<B: Broker>(broker: Arc<B>, config: ApiConfig) -> Router {
    let stats = Arc::new(stats::DurationStats::default());
    let hub = stream::Hub::spawn(broker.clone(), config.shutdown.clone());
    // Heartbeats reach open pages three times within the staleness threshold.
    let refresh = (config.stale_after / 3).max(std::time::Duration::from_millis(500));
    hub.spawn_refresh(broker.clone(), refresh, config.shutdown.clone());
    fold::spawn(broker.clone(), hub.clone(), &stats);
    let tokens = config.tokens.clone();
    let cors = cors_layer(&config.cors_origins);
    let trusted = auth::TrustedOrigins(Arc::new(config.cors_origins.clone()));
    let body_limit = config.max_body_bytes;
    let request_timeout = config.request_timeout;
    let state = AppState::new(broker, config, stats, hub);
    let (router, _) = routes::<B>().split_for_parts();
    router
        .route("/", axum::routing::get(web::monitor))
        .route("/client", axum::routing::get(web::client))
        .route("/web/{*path}", axum::routing::get(web::file))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(tokens, auth::require))
        .layer(axum::middleware::from_fn_with_state(trusted, auth::same_origin_writes))
        .layer(cors)
        .layer(axum::middleware::from_fn(access_log))
        .with_state(state)
}

/// One log line per request (target `fleetq_api::access`): method, route (the pattern, not the
/// ids in it), status, milliseconds to the response head, and the token's name — never the token.
async fn access_log(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let began = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "(unmatched)".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let caller = resp.extensions().get::<auth::Caller>().map_or("-", |c| c.name.as_str());
    tracing::info!(
        target: "fleetq_api::access",
        method = method.as_str(),
        route,
        status = resp.status().as_u16(),
        ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
        token = caller,
        "request"
    );
    resp
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let allowed: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
        ])
}

/// Keeps the queue healthy from this process: reaps expired leases, due retries and silent workers
/// every `every`, until `stop`. Safe to run in every process. (Workability flags are kept by the
/// broker as partitions and worker classes come and go, so an idle queue costs one reap a tick.)
pub async fn maintain<B: Broker>(broker: Arc<B>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match broker.reap().await {
            Ok(r) if r.requeued + r.finished + r.workers_expired > 0 => {
                tracing::info!(
                    requeued = r.requeued,
                    finished = r.finished,
                    workers_expired = r.workers_expired,
                    "reaped"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reap failed"),
        }
    }
}
