//! The HTTP transport every HTTP-speaking connector shares: one pooled `reqwest` client per
//! connector with connect and request timeouts, authentication, retries of idempotent reads with
//! backoff, and the mapping of transport failures onto [`JobError`]s.

use std::time::Duration;

use fleetq_core::FailureCategory;
use fleetq_core::backoff::Backoff;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::JobError;

/// How requests authenticate. Its `Debug` shows the kind and names, never a secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        token: String,
    },
    /// HTTP Basic.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// Any header, e.g. `x-api-key`.
    Header {
        /// Header name.
        name: String,
        /// Header value.
        value: String,
    },
}

/// Whether `path` is an absolute http(s) URL rather than a path on the service.
fn is_absolute(path: &str) -> bool {
    path.starts_with("http://") || path.starts_with("https://")
}

/// Whether two URLs share an origin (scheme, host and port, the scheme's default port filled in).
/// Unparsable URLs share nothing.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Bearer { .. } => f.write_str("Bearer { token: *** }"),
            Self::Basic { username, .. } => write!(f, "Basic {{ username: {username:?}, password: *** }}"),
            Self::Header { name, .. } => write!(f, "Header {{ name: {name:?}, value: *** }}"),
        }
    }
}

/// Transport settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8188`.
    pub base_url: String,
    /// Longest a single request may take (reqwest has no default total timeout).
    pub timeout: Duration,
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
    /// Extra attempts for idempotent reads after a connection error or a 5xx.
    pub retries: u32,
    /// Credentials.
    pub auth: Auth,
}

impl HttpConfig {
    /// Defaults for `base_url`: 30 s requests, 5 s connects, 2 retries, no auth.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retries: 2,
            auth: Auth::None,
        }
    }
}

/// A pooled client bound to one service.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    config: HttpConfig,
}

impl HttpTransport {
    /// Builds the client. `no_proxy`: connectors talk to services on the machine or a known host;
    /// a stray `HTTP_PROXY` must not reroute them.
    pub fn new(config: HttpConfig) -> Result<Self, JobError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| JobError::fatal(FailureCategory::Internal, format!("http client: {e}")))?;
        Ok(Self { client, config })
    }

    /// The configured base URL.
    pub fn base_url(&self) -> &str {
        &self.config.base_url
    }

    /// `base_url` + `path` (an absolute URL is used as is).
    pub fn url(&self, path: &str) -> String {
        if is_absolute(path) { path.to_owned() } else { format!("{}{path}", self.config.base_url) }
    }

    /// A request, with the credentials when it goes to the configured service's own origin — an
    /// absolute URL elsewhere (a link the service returned) never receives them.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = self.url(path);
        // A path is the service's own by construction; only an absolute URL needs comparing.
        let ours = !is_absolute(path) || same_origin(&url, &self.config.base_url);
        let rb = self.client.request(method, url);
        if !ours {
            return rb;
        }
        match &self.config.auth {
            Auth::None => rb,
            Auth::Bearer { token } => rb.bearer_auth(token),
            Auth::Basic { username, password } => rb.basic_auth(username, Some(password)),
            Auth::Header { name, value } => rb.header(name.as_str(), value.as_str()),
        }
    }

    /// GET → (status, JSON body; `null` when the body is not JSON), retried with backoff on
    /// connection errors, timeouts and 5xx.
    pub async fn get_json(&self, path: &str) -> Result<(StatusCode, Value), JobError> {
        let (status, body) = self.get(path).await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// GET raw bytes (downloads), retried like [`Self::get_json`].
    pub async fn get_bytes(&self, path: &str) -> Result<(StatusCode, Vec<u8>), JobError> {
        self.get(path).await
    }

    /// One GET with the transport's retries: an idempotent read is tried again, with doubling
    /// pauses (100 ms up to 2 s), while the service is unreachable or answers 5xx.
    async fn get(&self, path: &str) -> Result<(StatusCode, Vec<u8>), JobError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut attempt = 0;
        loop {
            let result = self.request(Method::GET, path).send().await;
            let retry = match &result {
                Ok(r) => r.status().is_server_error(),
                Err(e) => e.is_connect() || e.is_timeout(),
            };
            if !retry || attempt >= self.config.retries {
                let response = result.map_err(|e| unreachable(self.base_url(), &e))?;
                let status = response.status();
                let body = response.bytes().await.map_err(|e| unreachable(self.base_url(), &e))?;
                return Ok((status, body.to_vec()));
            }
            attempt += 1;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// POST a JSON body once (not idempotent: never retried here) → (status, raw body).
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<(StatusCode, Vec<u8>), JobError> {
        let response = self
            .request(Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| unreachable(self.base_url(), &e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| unreachable(self.base_url(), &e))?;
        Ok((status, bytes.to_vec()))
    }
}

/// A transport failure: the service is down or not answering (retryable, `service_offline`).
pub fn unreachable(base: &str, e: &reqwest::Error) -> JobError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "refused the connection"
    } else {
        "failed"
    };
    JobError::retryable(FailureCategory::Connection, format!("{base} {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert!(same_origin("http://127.0.0.1:8188/view?x=1", "http://127.0.0.1:8188"));
        assert!(same_origin("https://api.openai.com/v1/files/x", "https://api.openai.com:443/v1"));
        assert!(!same_origin("http://127.0.0.1:7845/cdn/img.png", "http://127.0.0.1:8188"));
        assert!(!same_origin("http://api.openai.com/v1", "https://api.openai.com/v1"));
        assert!(!same_origin("https://evil.example/api.openai.com", "https://api.openai.com/v1"));
        assert!(!same_origin("not a url", "https://api.openai.com/v1"));
    }

    #[test]
    fn credentials_go_only_to_the_services_own_origin() {
        let mut config = HttpConfig::new("https://api.example.com/v1");
        config.auth = Auth::Bearer { token: "sk-secret".into() };
        let t = HttpTransport::new(config).expect("transport");
        let auth = |path: &str| {
            let request = t.request(Method::GET, path).build().expect("a request");
            request.headers().get("authorization").map(|v| v.to_str().unwrap_or("").to_owned())
        };
        assert_eq!(auth("/models").as_deref(), Some("Bearer sk-secret"));
        assert_eq!(auth("https://api.example.com/v1/files/1").as_deref(), Some("Bearer sk-secret"));
        assert_eq!(auth("https://cdn.example.net/img.png"), None, "another host gets no key");
        assert_eq!(auth("http://api.example.com/v1/files/1"), None, "nor the same host over plain http");
    }
}
