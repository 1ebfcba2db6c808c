//! Values placed into URLs: the one escaping rule for a path segment or query value built from
//! data (a job id, a file name a service returned), so that it stays one component whatever it
//! holds.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Every byte but RFC 3986's unreserved characters (`A-Z a-z 0-9 - _ . ~`) is escaped.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `url` with its passwords replaced by `***`, for every place a URL is printed (startup lines,
/// errors, diagnostics): `redis://fq:pw@host:6379/` → `redis://fq:***@host:6379/`, and the value
/// of any query parameter whose name ends in `password` (`?sentinel_password=…`). The user name
/// stays (it says which account); a URL without credentials comes back unchanged, and so does text
/// that is not a URL.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let tail = redacted_query(tail);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return format!("{scheme}://{authority}{tail}");
    };
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    };
    format!("{scheme}://{user}@{host}{tail}")
}

/// The path, query and fragment of a URL with the values of `…password` parameters hidden.
fn redacted_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_owned() };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().ends_with("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    format!("{path}?{}{fragment}", params.join("&"))
}

/// `s` percent-encoded as one URL component (path segment or query value).
pub fn component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_leaves_redacted() {
        assert_eq!(redacted("redis://fq:s3cret@10.0.0.5:6379/0"), "redis://fq:***@10.0.0.5:6379/0");
        assert_eq!(redacted("redis://:s3cret@127.0.0.1:6379/"), "redis://:***@127.0.0.1:6379/");
        assert_eq!(redacted("rediss://u:p@w:rd@host/x?y=1"), "rediss://u:***@host/x?y=1");
        assert_eq!(redacted("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(redacted("redis://user@host/"), "redis://user@host/");
        assert_eq!(redacted("not a url"), "not a url");
        assert_eq!(redacted("http://h/path@x"), "http://h/path@x", "an @ after the host is not userinfo");
        assert_eq!(
            redacted("redis+sentinel://:pw@a:1,b:2/m/0?sentinel_username=s&sentinel_password=sp#f"),
            "redis+sentinel://:***@a:1,b:2/m/0?sentinel_username=s&sentinel_password=***#f"
        );
        assert_eq!(
            redacted("redis+sentinel://a:1/m?sentinel_password=sp"),
            "redis+sentinel://a:1/m?sentinel_password=***"
        );
    }

    #[test]
    fn a_component_escapes_everything_but_unreserved_characters() {
        assert_eq!(component("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(component("a/b?c#d e%&="), "a%2Fb%3Fc%23d%20e%25%26%3D");
        assert_eq!(component("é"), "%C3%A9");
    }
}
