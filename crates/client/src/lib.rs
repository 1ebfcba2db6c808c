//! A typed client of fleetq's HTTP API, for Rust programs that submit and follow jobs: the `fleetq`
//! command line, the benchmarks and the fault-injection runs use it, and so can you.
//!
//! Every reply is read as the API's own model type ([`fleetq_api::model`]) or the broker's
//! [`Event`], so a client and a server of the same version cannot disagree on a field. Event streams
//! ([`Client::job_events`], [`Client::events`]) resume after the last event they yielded when the
//! connection drops (`Last-Event-ID`), so nothing is missed or seen twice across an API restart.
//!
//! # Layout
//! - [`Client`] (this module): the calls, one method per route.
//! - [`stream`]: the resuming event streams.
//! - [`ClientError`]: what can go wrong, told apart (unreachable, refused with the API's code, an
//!   unreadable reply).
//!
//! # Example
//!
//! Submit a job, find it in the list, cancel it and follow its events to the end (this runs as a
//! test, against an API served in-process over a temporary embedded store with no worker):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let store = fleetq_broker::embedded::EmbeddedBroker::open(dir.path().join("q.db"), Default::default())?;
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let url = format!("http://{}", listener.local_addr()?);
//! # let config = fleetq_api::ApiConfig::default();
//! # let _stop = config.shutdown.clone().drop_guard();
//! # tokio::spawn(fleetq_api::serve(listener, std::sync::Arc::new(store), config));
//! use fleetq_client::{Client, JobQuery};
//! use fleetq_core::{JobSpec, JobStatus};
//!
//! let client = Client::new(&url)?.with_token(std::env::var("FLEETQ_TOKEN").ok());
//! let job = client.submit(&JobSpec::new("simulation", serde_json::json!({"steps": 3})), None).await?;
//!
//! let pending = JobQuery { status: Some(JobStatus::Pending), ..JobQuery::default() };
//! assert!(client.all_jobs(&pending).await?.iter().any(|j| j.id == job.id));
//!
//! let mut events = client.job_events(&job.id);
//! client.cancel(&job.id).await?;
//! while let Some(update) = events.next().await? {
//!     println!("{} {} {:.0}%", update.kind, update.job.status.as_str(), update.job.progress);
//! }
//! assert_eq!(client.job(&job.id).await?.record.summary.status, JobStatus::Cancelled);
//! # Ok(()) }
//! ```

pub mod stream;

use std::time::Duration;

use fleetq_api::model::{
    BatchSubmitted, Cancelled, ErrorBody, JobPage, JobView, Machines, MatchingWorkers, Retried, Services,
    SubmitReply, Submitted, Workers,
};
use fleetq_core::{JobId, JobSpec, JobStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use fleetq_core::Event;
pub use stream::{FleetEvent, FleetEvents, JobEvents, JobUpdate, WorkerSeen, WorkersSeen};

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an `http(s)://` URL.
    #[error("the API URL must be a URL like http://127.0.0.1:7777 (got {0:?})")]
    BadUrl(String),
    /// The HTTP client could not be built (TLS roots, resolver).
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    /// No answer from the API (refused, reset, timed out).
    #[error("cannot reach the fleetq API at {base}: {source}")]
    Unreachable {
        /// The API's base URL.
        base: String,
        /// What the transport said.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status and its error body.
    #[error("{status} {code}{}: {message}", field.as_deref().map(|f| format!(" ({f})")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's stable error code (`invalid`, `not_found`, `conflict`, …), or `error`.
        code: String,
        /// Its message.
        message: String,
        /// The offending input, when one is to blame.
        field: Option<String>,
    },
    /// The reply does not read as the expected type (a client and server of different versions).
    #[error("the API's reply to {path} does not read as expected (a different fleetq version?): {source}")]
    Decode {
        /// The route asked.
        path: String,
        /// What did not read.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status of an API refusal (`None` for transport and decoding errors).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A `Result` of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// One path segment, percent-encoded (a job id or service name taken from a user is never trusted
/// to be URL-safe).
pub(crate) fn segment(s: &str) -> String {
    fleetq_core::url::component(s)
}

/// Filters and paging of [`Client::jobs`] (`GET /api/jobs`).
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Only this status.
    pub status: Option<JobStatus>,
    /// Only this service.
    pub service: Option<String>,
    /// Only jobs of this worker.
    pub worker: Option<String>,
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only this customer.
    pub customer: Option<String>,
    /// Page size (the API takes 1–1000; default 100).
    pub limit: Option<usize>,
    /// Continue after this cursor ([`JobPage::next`]).
    pub cursor: Option<String>,
    /// Pending jobs in the order workers will claim them, instead of newest first.
    pub queue_order: bool,
}

impl JobQuery {
    /// The query string's pairs, in a stable order.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = self.status {
            q.push(("status", s.as_str().to_owned()));
        }
        for (k, v) in [
            ("service", &self.service),
            ("worker", &self.worker),
            ("workflow", &self.workflow),
            ("customer", &self.customer),
            ("cursor", &self.cursor),
        ] {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if self.queue_order {
            q.push(("order", "queue".to_owned()));
        }
        q
    }
}

/// A handle on one API. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// How long connecting may take before the API counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// A client of the API at `base` (`http://HOST:PORT`, a trailing `/` allowed).
    pub fn new(base: &str) -> Result<Self> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token: None, http })
    }

    /// The same client sending `Authorization: Bearer <token>` (none when `None`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` (starting with `/`), with the token.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable { base: self.base.clone(), source }
    }

    /// Sends `r` and reads a success's body as JSON; an error status becomes [`ClientError::Api`].
    async fn send(&self, r: reqwest::RequestBuilder) -> Result<Value> {
        let resp = r.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            return Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        }
        Err(refusal(status.as_u16(), &bytes))
    }

    async fn send_as<T: DeserializeOwned>(&self, path: &str, r: reqwest::RequestBuilder) -> Result<T> {
        let v = self.send(r).await?;
        serde_json::from_value(v).map_err(|source| ClientError::Decode { path: path.to_owned(), source })
    }

    /// `GET path` as untyped JSON, for callers that print the reply as it came (`--json`).
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send_as(path, self.request(reqwest::Method::GET, path)).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send_as(path, self.request(reqwest::Method::POST, path)).await
    }

    /// `POST /api/jobs` with any JSON body (one job object or an array of them), as a job file
    /// holds it; `idempotency_key` makes a retried submission return the same job.
    pub async fn submit_json(&self, body: &Value, idempotency_key: Option<&str>) -> Result<SubmitReply> {
        self.submit_body(body, idempotency_key).await
    }

    /// Submits one job.
    pub async fn submit(&self, job: &JobSpec, idempotency_key: Option<&str>) -> Result<Submitted> {
        match self.submit_body(job, idempotency_key).await? {
            SubmitReply::One(s) => Ok(s),
            SubmitReply::Batch(mut b) if b.jobs.len() == 1 => Ok(b.jobs.remove(0)),
            SubmitReply::Batch(b) => Err(ClientError::Api {
                status: 201,
                code: "unexpected".into(),
                message: format!("one job was submitted but the API answered with {}", b.jobs.len()),
                field: None,
            }),
        }
    }

    /// Submits a batch, all or nothing; the ids come back in the order of `jobs`.
    pub async fn submit_batch(&self, jobs: &[JobSpec]) -> Result<BatchSubmitted> {
        match self.submit_body(jobs, None).await? {
            SubmitReply::Batch(b) => Ok(b),
            SubmitReply::One(s) => Ok(BatchSubmitted { jobs: vec![s] }),
        }
    }

    async fn submit_body<T: Serialize + ?Sized>(&self, body: &T, key: Option<&str>) -> Result<SubmitReply> {
        let mut r = self.request(reqwest::Method::POST, "/api/jobs").json(body);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        self.send_as("/api/jobs", r).await
    }

    /// `GET /api/jobs/{id}`: the record, with queue position and ETA while unfinished.
    pub async fn job(&self, id: &JobId) -> Result<JobView> {
        self.get(&format!("/api/jobs/{}", segment(&id.0))).await
    }

    /// `GET /api/jobs`: one page; follow [`JobPage::next`] with [`JobQuery::cursor`].
    pub async fn jobs(&self, query: &JobQuery) -> Result<JobPage> {
        let r = self.request(reqwest::Method::GET, "/api/jobs").query(&query.pairs());
        self.send_as("/api/jobs", r).await
    }

    /// `GET /api/jobs` as it came, for printing.
    pub async fn jobs_json(&self, query: &JobQuery) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, "/api/jobs").query(&query.pairs())).await
    }

    /// Every job of `query`, following the cursors to the last page.
    pub async fn all_jobs(&self, query: &JobQuery) -> Result<Vec<fleetq_core::JobSummary>> {
        let mut q = query.clone();
        let mut out = Vec::new();
        loop {
            let page = self.jobs(&q).await?;
            out.extend(page.jobs);
            match page.next {
                Some(next) => q.cursor = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// `POST /api/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: &JobId) -> Result<Cancelled> {
        self.post(&format!("/api/jobs/{}/cancel", segment(&id.0))).await
    }

    /// `POST /api/jobs/{id}/retry`: a failed or cancelled job back in the queue.
    pub async fn retry(&self, id: &JobId) -> Result<Retried> {
        self.post(&format!("/api/jobs/{}/retry", segment(&id.0))).await
    }

    /// `POST /api/services/{service}/pause` or `/resume` (admin): nothing of the service is
    /// claimed while it is paused.
    pub async fn pause_service(&self, service: &str, paused: bool) -> Result<fleetq_api::control::Paused> {
        let verb = if paused { "pause" } else { "resume" };
        self.post(&format!("/api/services/{}/{verb}", segment(service))).await
    }

    /// `POST /api/bulk` (admin): cancels or retries every job a filter or a list of ids selects,
    /// on the server; `dry_run` only counts them.
    pub async fn bulk(&self, request: &fleetq_api::bulk::BulkRequest) -> Result<fleetq_api::bulk::BulkReply> {
        self.send_as("/api/bulk", self.request(reqwest::Method::POST, "/api/bulk").json(request)).await
    }

    /// `GET /api/jobs/{id}/matching-workers`: each worker's verdict on the job, with reasons.
    pub async fn matching_workers(&self, id: &JobId) -> Result<MatchingWorkers> {
        self.get(&format!("/api/jobs/{}/matching-workers", segment(&id.0))).await
    }

    /// `GET /api/workers`.
    pub async fn workers(&self) -> Result<Workers> {
        self.get("/api/workers").await
    }

    /// `GET /api/machines`.
    pub async fn machines(&self) -> Result<Machines> {
        self.get("/api/machines").await
    }

    /// `GET /api/services`.
    pub async fn services(&self) -> Result<Services> {
        self.get("/api/services").await
    }

    /// `GET /ready`: whether the API answers and its broker is reachable.
    pub async fn ready(&self) -> Result<()> {
        self.send(self.request(reqwest::Method::GET, "/ready")).await.map(drop)
    }

    /// One job's events until its end (see [`JobEvents`]).
    pub fn job_events(&self, id: &JobId) -> JobEvents {
        JobEvents::new(self.clone(), id.clone())
    }

    /// Every event of the fleet from now on, of the given topics (`jobs`, `workers`, `connectors`,
    /// `machines`; all when empty) — see [`FleetEvents`].
    pub fn events(&self, topics: &[&str]) -> FleetEvents {
        FleetEvents::new(self.clone(), topics)
    }
}

/// An error status and body as [`ClientError::Api`] (the API's `{"error": {...}}`, or the status
/// alone when the body is something else).
fn refusal(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => {
            ClientError::Api { status, code: b.error.code, message: b.error.message, field: b.error.field }
        }
        Err(_) => ClientError::Api {
            status,
            code: "error".into(),
            message: String::from_utf8_lossy(body).chars().take(200).collect::<String>().trim().to_owned(),
            field: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_the_api_error_body_or_keeps_the_text() {
        let e = refusal(400, br#"{"error":{"code":"invalid","message":"bad","field":"service"}}"#);
        assert_eq!(e.to_string(), "400 invalid (service): bad");
        let e = refusal(502, b"<html>bad gateway</html>");
        assert_eq!(e.to_string(), "502 error: <html>bad gateway</html>");
        assert_eq!(e.status(), Some(502));
    }

    #[test]
    fn a_base_url_needs_a_scheme() {
        assert!(matches!(Client::new("127.0.0.1:7777"), Err(ClientError::BadUrl(_))));
        let c = Client::new("http://127.0.0.1:7777/").expect("a valid URL");
        assert_eq!(c.base(), "http://127.0.0.1:7777");
    }

    #[test]
    fn a_query_names_only_what_is_set() {
        let q = JobQuery {
            status: Some(JobStatus::Pending),
            service: Some("a b".into()),
            limit: Some(5),
            queue_order: true,
            ..JobQuery::default()
        };
        let pairs: Vec<String> = q.pairs().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(pairs, ["status=pending", "service=a b", "limit=5", "order=queue"]);
    }
}
