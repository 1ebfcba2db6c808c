//! Fetching a URL on a job's behalf under the [`OutboundPolicy`]: the scheme checked, the host's
//! addresses checked after DNS resolution (the connection goes only to the addresses that passed,
//! so a name cannot resolve to a public address for the check and a private one for the
//! connection), every redirect checked again, the body cut at the size cap, the whole fetch bounded
//! in time. It never sends credentials: those go only to a connector's own service
//! ([`crate::http::HttpTransport`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fleetq_core::outbound::{OutboundPolicy, Refusal};
use fleetq_core::{FailureCategory, JobError};
use futures::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{StatusCode, Url};

/// A client for URLs from outside the operator's configuration.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: OutboundPolicy,
}

/// Resolves names and keeps only the addresses the policy allows.
#[derive(Debug)]
struct CheckedResolver {
    policy: OutboundPolicy,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.iter().copied().filter(|a| policy.check_ip(a.ip()).is_ok()).collect();
            if allowed.is_empty() {
                let why = match found.first() {
                    Some(a) => policy.check_ip(a.ip()).err().map_or_else(String::new, |r| r.to_string()),
                    None => "no address".to_owned(),
                };
                return Err(format!("{host}: {why}").into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// A URL's scheme, and its host when that is an address (a name is checked when it resolves).
fn check_url(policy: &OutboundPolicy, url: &Url) -> Result<(), Refusal> {
    policy.check_scheme(url.scheme())?;
    let literal =
        url.host_str().and_then(|h| h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok());
    literal.map_or(Ok(()), |ip| policy.check_ip(ip))
}

fn refused(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::fatal(FailureCategory::Validation, format!("{what}: refused by the outbound policy: {e}"))
}

impl Fetcher {
    /// A fetcher under `policy`. Proxies from the environment are ignored: the policy judges the
    /// addresses actually connected to.
    pub fn new(policy: OutboundPolicy) -> Result<Self, JobError> {
        let redirects = usize::from(policy.max_redirects);
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > redirects {
                return attempt.error(format!("more than {redirects} redirects"));
            }
            match check_url(&policy, attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { policy }))
            .redirect(redirect)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_millis(policy.timeout_ms.max(1)))
            .build()
            .map_err(|e| JobError::fatal(FailureCategory::Internal, format!("http client: {e}")))?;
        Ok(Self { client, policy })
    }

    /// The policy in force.
    pub fn policy(&self) -> &OutboundPolicy {
        &self.policy
    }

    /// GETs `url` (`what` names it in errors): its body, at most the policy's `max_bytes`. A URL
    /// the policy refuses is a fatal validation error (trying again cannot help); a transport
    /// failure or a 5xx is retryable, another status a service error.
    pub async fn get(&self, what: &str, url: &str) -> Result<Vec<u8>, JobError> {
        let parsed = Url::parse(url).map_err(|e| refused(what, format!("{url:?} is not a URL ({e})")))?;
        check_url(&self.policy, &parsed).map_err(|e| refused(what, e))?;
        let response = self.client.get(parsed).send().await.map_err(|e| {
            if e.is_redirect() || e.is_connect() && is_refusal(&e) {
                refused(what, source_text(&e))
            } else {
                JobError::retryable(FailureCategory::Service, format!("{what}: {}", source_text(&e)))
            }
        })?;
        let status = response.status();
        if status != StatusCode::OK {
            let retry = status.is_server_error();
            let e = format!("{what}: the server replied {status}");
            return Err(if retry {
                JobError::retryable(FailureCategory::Service, e)
            } else {
                JobError::fatal(FailureCategory::Service, e)
            });
        }
        let max = self.policy.max_bytes;
        if response.content_length().is_some_and(|n| n > max) {
            return Err(JobError::fatal(
                FailureCategory::Service,
                format!("{what}: over the {max}-byte limit"),
            ));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                JobError::retryable(FailureCategory::Service, format!("{what}: {}", source_text(&e)))
            })?;
            if body.len() as u64 + chunk.len() as u64 > max {
                return Err(JobError::fatal(
                    FailureCategory::Service,
                    format!("{what}: over the {max}-byte limit"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Whether a connect error came from the policy (the resolver kept no address).
fn is_refusal(e: &reqwest::Error) -> bool {
    source_text(e).contains("is not a public address")
}

/// The error and its causes, in one line.
fn source_text(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_judged_by_its_scheme_and_its_literal_address() {
        let p = OutboundPolicy::default();
        let url = |s: &str| Url::parse(s).expect("a URL");
        assert!(check_url(&p, &url("https://example.com/x.png")).is_ok(), "names are checked when resolved");
        assert!(check_url(&p, &url("http://127.0.0.1:8080/admin")).is_err());
        assert!(check_url(&p, &url("http://[::1]/")).is_err());
        assert!(check_url(&p, &url("http://169.254.169.254/latest/meta-data")).is_err());
        assert!(check_url(&p, &url("file:///etc/passwd")).is_err());
        assert!(check_url(&p, &url("http://8.8.8.8/")).is_ok());
    }
}
