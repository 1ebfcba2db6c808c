//! Bearer-token auth with three roles. A route's needed role comes from its method and path; a token
//! is read from `Authorization: Bearer`, the `fleetq_token` cookie (pages) or `access_token` in the
//! query (browsers cannot set headers on `EventSource` and `WebSocket`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// GET routes, event streams, pages.
    Read,
    /// Read, plus submitting and cancelling jobs (HTTP and the legacy WebSocket).
    Submit,
    /// Everything (retry, …).
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Submit, Role::Admin];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Submit => "submit",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (read, submit or admin)"))
    }
}

/// Who is calling: put in the request's extensions by the auth middleware when auth is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's role.
    pub role: Role,
    /// The token's name (`role:name:secret`); an unnamed token is named by its role and its place
    /// among that role's unnamed tokens (`submit#1`, `submit#2`). Jobs record it as owner.
    pub name: String,
}

/// The configured tokens. Empty means auth is off.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Vec<(Digest, Caller)>>);

/// A token as kept: its SHA-256, so the secrets themselves are not held, and every comparison is
/// of two 32-byte values (no early return on a length or a first differing byte).
type Digest = [u8; 32];

fn digest(secret: &str) -> Digest {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secrets.
        f.debug_struct("Tokens").field("count", &self.0.len()).finish()
    }
}

impl Tokens {
    /// Parses `role:secret` or `role:name:secret` entries (`admin:s3cret…`, `submit:alice:…`).
    /// Secrets must be at least 8 characters. Every token is its own identity: an unnamed one is
    /// `role#n`, the n-th unnamed token of its role in the order given (so keep the order stable,
    /// or name the tokens).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut out = Vec::new();
        let mut unnamed = std::collections::HashMap::<Role, usize>::new();
        for entry in entries.into_iter().flat_map(|e| e.split(',')).map(str::trim).filter(|e| !e.is_empty()) {
            let (role, secret) = entry
                .split_once(':')
                .ok_or_else(|| "a token is written role:secret (e.g. admin:…)".to_owned())?;
            let role: Role = role.parse()?;
            let (name, secret) = match secret.split_once(':') {
                Some((name, _)) if name.contains('#') => {
                    return Err(format!("token name {name:?}: '#' is kept for unnamed tokens"));
                }
                Some((name, secret)) if !name.is_empty() => (name.to_owned(), secret),
                _ => {
                    let n = unnamed.entry(role).or_default();
                    *n += 1;
                    (format!("{role}#{n}"), secret)
                }
            };
            if secret.len() < 8 {
                return Err(format!("the {role} token is shorter than 8 characters"));
            }
            out.push((digest(secret), Caller { role, name }));
        }
        Ok(Self(Arc::new(out)))
    }

    /// True when no token is configured (auth off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The role of `secret`, comparing digests in constant time per configured token.
    pub fn role_of(&self, secret: &str) -> Option<Role> {
        self.caller(secret).map(|c| c.role)
    }

    /// The caller holding `secret`, comparing digests in constant time per configured token.
    pub fn caller(&self, secret: &str) -> Option<Caller> {
        let presented = digest(secret);
        self.0
            .iter()
            .filter(|(kept, _)| bool::from(kept.ct_eq(&presented)))
            .map(|(_, c)| c.clone())
            .max_by_key(|c| c.role)
    }
}

/// Whether a path is one of the pages or their files (open without a token: they hold no data).
fn is_page(path: &str) -> bool {
    path == "/" || path == "/client" || path.starts_with("/web/")
}

/// The role a request needs, or `None` for open routes (`/health`, and the pages, which hold no
/// data: they ask for a token when the API does).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/health" || (method == Method::GET && is_page(path)) {
        return None;
    }
    if path == "/ws/client" {
        return Some(Role::Submit);
    }
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        return Some(Role::Read);
    }
    let submit = method == Method::POST
        && (path == "/api/jobs" || (path.starts_with("/api/jobs/") && path.ends_with("/cancel")));
    Some(if submit { Role::Submit } else { Role::Admin })
}

/// Whether a route takes its token from the query string (`?access_token=`): only GET event
/// streams and WebSockets, which browsers open without headers (`EventSource`, `WebSocket`).
/// Anywhere else a token in the URL would only end up in access logs.
pub fn query_token_allowed(method: &Method, path: &str) -> bool {
    method == Method::GET && (path.starts_with("/ws/") || path == "/api/events" || path.ends_with("/events"))
}

/// The token a request carries: `Authorization: Bearer …` (the scheme in any case), else the
/// `fleetq_token` cookie, else — on the routes [`query_token_allowed`] names — `?access_token=`
/// (percent-decoded). Another scheme in `Authorization` (e.g. `Basic` from a proxy) is not a
/// token and does not hide the cookie.
pub fn token_of(req: &Request) -> Option<String> {
    token_with_source(req).map(|(token, _)| token)
}

fn token_source(req: &Request) -> Option<Source> {
    token_with_source(req).map(|(_, source)| source)
}

fn token_with_source(req: &Request) -> Option<(String, Source)> {
    let headers = req.headers();
    for v in headers.get_all(header::AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()) {
        if let Some((scheme, token)) = v.trim().split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some((token.trim().to_owned(), Source::Header));
        }
    }
    for cookies in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
        for c in cookies.split(';') {
            if let Some(t) = c.trim().strip_prefix("fleetq_token=") {
                return Some((decode(t), Source::Cookie));
            }
        }
    }
    if !query_token_allowed(req.method(), req.uri().path()) {
        return None;
    }
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(decode)))
        .map(|t| (t, Source::Query))
}

/// The origins besides the API's own whose pages may write (`--cors-origin`), for
/// [`same_origin_writes`].
#[derive(Debug, Clone, Default)]
pub struct TrustedOrigins(pub Arc<Vec<String>>);

/// Middleware against cross-site request forgery. A browser names the page that sent a request in
/// `Origin`; a write (anything but GET, HEAD and OPTIONS — and the legacy WebSocket, through which
/// jobs are submitted) whose `Origin` is neither the API's own (its `Host`) nor a configured CORS
/// origin is refused with 403, whatever authenticates it: a page on another port of the same host
/// (a ComfyUI) is same-site, so the `SameSite=Strict` cookie alone does not stop it, and with auth
/// off nothing else would. A write authenticated by the `fleetq_token` cookie must carry an
/// `Origin` at all (browsers always send one on such requests). Clients that are not browsers
/// (curl, the CLI) send no `Origin` and authenticate with a header: unaffected.
pub async fn same_origin_writes(State(trusted): State<TrustedOrigins>, req: Request, next: Next) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.uri().path() == "/ws/client";
    if !write {
        return next.run(req).await;
    }
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let cookie = token_source(&req) == Some(Source::Cookie);
    let verdict = match origin {
        None if cookie => {
            Err("a write authenticated by the page's cookie must come from a page (no Origin)".to_owned())
        }
        None => Ok(()),
        Some(o) if trusted.0.iter().any(|t| t == o) => Ok(()),
        Some(o) if host.is_some_and(|h| authority_of(o) == Some(h)) => Ok(()),
        Some(o) => {
            Err(format!("a write from the page at {o} is refused: only this API's own pages may write"))
        }
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(message) => ApiError::new(StatusCode::FORBIDDEN, "cross_origin", message).into_response(),
    }
}

/// `host[:port]` of an origin (`http://127.0.0.1:7777` → `127.0.0.1:7777`).
fn authority_of(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'))
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Cookie,
    Query,
}

/// Percent-decodes a token (`%2B` → `+`; a `+` stays a `+`: tokens are not form data).
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// Middleware: 401 without a known token, 403 with a too-weak one.
pub async fn require(State(tokens): State<Tokens>, mut req: Request, next: Next) -> Response {
    if tokens.is_empty() {
        return next.run(req).await;
    }
    let Some(needed) = required_role(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let given = token_of(&req);
    match given.as_deref().and_then(|t| tokens.caller(t)) {
        None => {
            let message = if given.is_some() {
                "the token given is not one this API knows: check FLEETQ_TOKEN (CLI) or the token you \
                 gave the page against the API's --token / FLEETQ_TOKENS"
            } else {
                "a token is required: Authorization: Bearer <token> (the CLI sends FLEETQ_TOKEN), the \
                 fleetq_token cookie, or ?access_token= on event streams"
            };
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
        Some(c) if c.role < needed => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this route needs the {needed} role; the token has {}", c.role),
        )
        .into_response(),
        Some(c) => {
            req.extensions_mut().insert(c.clone());
            let mut resp = next.run(req).await;
            // For the access log, which sees only the response.
            resp.extensions_mut().insert(c);
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_of_routes() {
        assert_eq!(required_role(&Method::GET, "/health"), None);
        assert_eq!(required_role(&Method::GET, "/api/jobs"), Some(Role::Read));
        assert_eq!(required_role(&Method::GET, "/ws/monitor"), Some(Role::Read));
        assert_eq!(required_role(&Method::GET, "/ws/client"), Some(Role::Submit));
        assert_eq!(required_role(&Method::POST, "/api/jobs"), Some(Role::Submit));
        assert_eq!(required_role(&Method::POST, "/api/jobs/x/cancel"), Some(Role::Submit));
        assert_eq!(required_role(&Method::POST, "/api/jobs/x/retry"), Some(Role::Admin));
        assert_eq!(required_role(&Method::DELETE, "/api/jobs/x"), Some(Role::Admin));
    }

    fn req(method: Method, uri: &str, headers: &[(header::HeaderName, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(k, *v);
        }
        b.body(axum::body::Body::empty()).expect("request")
    }

    #[test]
    fn where_a_token_is_read() {
        let auth = header::AUTHORIZATION;
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let r = req(Method::POST, "/api/jobs", &[(auth.clone(), &format!("{scheme} s3cret+/="))]);
            assert_eq!(token_of(&r).as_deref(), Some("s3cret+/="), "{scheme}");
        }
        // A Basic header (a proxy's) does not hide the cookie.
        let r = req(
            Method::GET,
            "/api/jobs",
            &[(auth, "Basic dXNlcjpwYXNz"), (header::COOKIE, "a=1; fleetq_token=c%2Bookie")],
        );
        assert_eq!(token_of(&r).as_deref(), Some("c+ookie"));
        // The query only on streams, percent-decoded, a '+' kept.
        let q = "access_token=%72eadsecret1%2B%26%3D%25+x";
        assert_eq!(
            token_of(&req(Method::GET, &format!("/api/events?{q}"), &[])).as_deref(),
            Some("readsecret1+&=%+x")
        );
        assert!(token_of(&req(Method::GET, &format!("/ws/monitor?{q}"), &[])).is_some());
        assert!(token_of(&req(Method::GET, &format!("/api/jobs/j1/events?{q}"), &[])).is_some());
        assert_eq!(token_of(&req(Method::POST, &format!("/api/jobs?{q}"), &[])), None, "not on a submission");
        assert_eq!(token_of(&req(Method::GET, &format!("/api/jobs?{q}"), &[])), None, "not on a listing");
    }

    #[test]
    fn tokens_parse_and_match() {
        let t = Tokens::parse(["admin:aaaaaaaa,read:bbbbbbbb", "submit:cccccccc"]).unwrap();
        assert_eq!(t.role_of("aaaaaaaa"), Some(Role::Admin));
        assert_eq!(t.role_of("bbbbbbbb"), Some(Role::Read));
        assert_eq!(t.role_of("cccccccc"), Some(Role::Submit));
        assert_eq!(t.role_of("aaaaaaa"), None);
        assert_eq!(t.role_of(""), None);
        assert!(Tokens::parse(["admin"]).is_err());
        assert!(Tokens::parse(["root:aaaaaaaa"]).is_err());
        assert!(Tokens::parse(["read:short"]).is_err());
        assert!(Tokens::parse([""]).unwrap().is_empty());
        assert!(!format!("{t:?}").contains("aaaa"), "secrets never printed");
        let named = Tokens::parse(["submit:alice:dddddddd"]).unwrap();
        assert_eq!(named.caller("dddddddd"), Some(Caller { role: Role::Submit, name: "alice".into() }));
        assert_eq!(t.caller("cccccccc").map(|c| c.name), Some("submit#1".into()));
        // Unnamed tokens are distinct identities (so they cannot cancel each other's jobs).
        let two = Tokens::parse(["submit:eeeeeeee,submit:ffffffff,read:gggggggg"]).unwrap();
        let names: Vec<String> = ["eeeeeeee", "ffffffff", "gggggggg"]
            .iter()
            .filter_map(|s| two.caller(s))
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["submit#1", "submit#2", "read#1"]);
        assert!(Tokens::parse(["submit:a#b:hhhhhhhh"]).is_err(), "'#' is kept for unnamed tokens");
    }
}
