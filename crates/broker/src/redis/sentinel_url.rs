//! The `redis+sentinel://` URL: the sentinels to ask, the name of the primary they watch, and the
//! credentials of each side. A pure parser, apart from any connection.
//!
//! `redis+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB][?sentinel_username=U&sentinel_password=P]`
//!
//! The user and password before `@` are those of the Redis servers (primary and replicas), as in a
//! `redis://` URL; the sentinels' own, when they need any, are the query's `sentinel_username` and
//! `sentinel_password`. A sentinel's port defaults to 26379.

use percent_encoding::percent_decode_str;

/// The scheme of a Sentinel URL.
pub const SCHEME: &str = "redis+sentinel://";

/// The default port of a sentinel.
const SENTINEL_PORT: u16 = 26379;

/// A parsed `redis+sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, `(host, port)`, in the order given (asked in that order).
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels know the primary by (`sentinel monitor NAME …`).
    pub master: String,
    /// The Redis database number on the primary.
    pub db: i64,
    /// The Redis servers' user name and password.
    pub username: Option<String>,
    /// See `username`.
    pub password: Option<String>,
    /// The sentinels' user name and password.
    pub sentinel_username: Option<String>,
    /// See `sentinel_username`.
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    // The passwords are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password.as_ref().map(|_| "***"))
            .finish()
    }
}

const FORM: &str = "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]";

fn decoded(part: &str, what: &str) -> Result<String, String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} is not valid UTF-8 once percent-decoded"))
}

impl SentinelUrl {
    /// Whether `url` is of this form (by its scheme).
    pub fn is_sentinel(url: &str) -> bool {
        url.get(..SCHEME.len()).is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
    }

    /// Parses a `redis+sentinel://` URL; the error says what is wrong and the form to write.
    pub fn parse(url: &str) -> Result<Self, String> {
        if !Self::is_sentinel(url) {
            return Err(format!("a Sentinel URL starts with {SCHEME}: {FORM}"));
        }
        let rest = &url[SCHEME.len()..];
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(format!("a Sentinel URL has no fragment (#): {FORM}"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (Some(decoded(user, "user name")?), Some(decoded(pw, "password")?)),
                None => (Some(decoded(u, "user name")?), None),
            },
        };
        let username = username.filter(|u| !u.is_empty());
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            if host.is_empty() {
                return Err(format!("no sentinel address (HOST:PORT) before the master name: {FORM}"));
            }
            let port_of = |text: &str| {
                text.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("sentinel {host:?}: the port must be a number from 1 to 65535"))
            };
            // `[v6]`, `[v6]:port`, `name`, `name:port`.
            let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
                let (name, rest) = bracketed
                    .split_once(']')
                    .ok_or_else(|| format!("sentinel {host:?}: an IPv6 address ends with ]"))?;
                match rest.strip_prefix(':') {
                    Some(port) => (name, port_of(port)?),
                    None if rest.is_empty() => (name, SENTINEL_PORT),
                    None => return Err(format!("sentinel {host:?}: expected :PORT after the address")),
                }
            } else {
                match host.rsplit_once(':') {
                    Some((name, port)) => (name, port_of(port)?),
                    None => (host, SENTINEL_PORT),
                }
            };
            if name.is_empty() {
                return Err(format!("sentinel {host:?} has no host name: {FORM}"));
            }
            sentinels.push((name.to_owned(), port));
        }
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let master = segments.next().map(|m| decoded(m, "master name")).transpose()?.ok_or_else(|| {
            format!("the URL names no master (the name in `sentinel monitor NAME …`): {FORM}")
        })?;
        let db = match segments.next() {
            None => 0,
            Some(d) => d
                .parse::<i64>()
                .ok()
                .filter(|d| (0..=1_000_000).contains(d))
                .ok_or_else(|| format!("the database {d:?} is not a number: {FORM}"))?,
        };
        if let Some(extra) = segments.next() {
            return Err(format!("unexpected path segment {extra:?} after the database: {FORM}"));
        }
        let mut url = Self {
            sentinels,
            master,
            db,
            username,
            password,
            sentinel_username: None,
            sentinel_password: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decoded(value, key)?;
            match key {
                "sentinel_username" => url.sentinel_username = Some(value).filter(|v| !v.is_empty()),
                "sentinel_password" => url.sentinel_password = Some(value),
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?} (accepted: sentinel_username, sentinel_password)"
                    ));
                }
            }
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinels_master_db_and_both_credentials_are_read() {
        let url = SentinelUrl::parse(
            "redis+sentinel://fq:p%40ss@10.0.0.1:26379,10.0.0.2,s3.local:26380/mymaster/2?sentinel_password=sp&sentinel_username=su",
        )
        .unwrap();
        assert_eq!(
            url.sentinels,
            vec![("10.0.0.1".into(), 26379), ("10.0.0.2".into(), 26379), ("s3.local".into(), 26380)]
        );
        assert_eq!(url.master, "mymaster");
        assert_eq!(url.db, 2);
        assert_eq!(url.username.as_deref(), Some("fq"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(url.sentinel_username.as_deref(), Some("su"));
        assert_eq!(url.sentinel_password.as_deref(), Some("sp"));
        let shown = format!("{url:?}");
        assert!(!shown.contains("p@ss") && !shown.contains("\"sp\""), "{shown}");
    }

    #[test]
    fn a_password_without_user_and_ipv6_sentinels() {
        let url = SentinelUrl::parse("REDIS+SENTINEL://:pw@[::1]:26379,[::1]/m").unwrap();
        assert_eq!(url.username, None);
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!(url.sentinels, vec![("::1".into(), 26379), ("::1".into(), 26379)]);
        assert_eq!(url.db, 0);
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://127.0.0.1:26379", "names no master"),
            ("redis+sentinel://127.0.0.1:26379/", "names no master"),
            ("redis+sentinel:///m", "no sentinel address"),
            ("redis+sentinel://a:1,,b:2/m", "no sentinel address"),
            ("redis+sentinel://a:0/m", "port must be"),
            ("redis+sentinel://a:x/m", "port must be"),
            ("redis+sentinel://a:1/m/x", "database \"x\""),
            ("redis+sentinel://a:1/m/1/2", "unexpected path segment"),
            ("redis+sentinel://a:1/m?password=x", "unknown query parameter \"password\""),
            ("redis://a:1/m", "starts with redis+sentinel://"),
        ] {
            let err = SentinelUrl::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
