//! The outbound policy: which URLs fleetq may fetch or call on a job's behalf — a URL a service
//! names in its reply (an image to download), and the inputs by URL and webhooks that come later.
//! Such a URL is chosen by someone outside the operator's control (a provider, or a job through a
//! provider that echoes it), so by default it may reach only public `http(s)` addresses: never
//! loopback, private, link-local or otherwise special ranges, unless an admin allows them. The
//! addresses are checked after DNS resolution and on every redirect (the I/O side is
//! `fleetq_connectors::outbound`); this module holds the rules, pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// What outbound fetches may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundPolicy {
    /// Allow loopback, private, link-local and the other non-public ranges (an admin's choice, e.g.
    /// a CDN on the private network).
    pub allow_private: bool,
    /// Largest body read (bytes).
    pub max_bytes: u64,
    /// Longest one fetch may take, redirects included (ms).
    pub timeout_ms: u64,
    /// Most redirects followed.
    pub max_redirects: u8,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        Self { allow_private: false, max_bytes: 64 * 1024 * 1024, timeout_ms: 60_000, max_redirects: 5 }
    }
}

/// Why a URL may not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not `http` or `https`.
    #[error("only http and https URLs may be fetched, not {0:?}")]
    Scheme(String),
    /// The address is loopback, private, link-local or otherwise not public.
    #[error(
        "{0} is not a public address (loopback, private and link-local ranges are refused unless an admin allows them)"
    )]
    NotPublic(IpAddr),
}

impl OutboundPolicy {
    /// Whether a URL of `scheme` may be fetched.
    pub fn check_scheme(&self, scheme: &str) -> Result<(), Refusal> {
        match scheme {
            "http" | "https" => Ok(()),
            other => Err(Refusal::Scheme(other.to_owned())),
        }
    }

    /// Whether `ip` may be connected to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.allow_private || is_public(ip) { Ok(()) } else { Err(Refusal::NotPublic(ip)) }
    }
}

/// Whether `ip` is a globally routable unicast address: not loopback, private (RFC 1918, unique
/// local), shared (CGNAT), link-local, unspecified, broadcast, multicast, documentation,
/// benchmarking or reserved — the ranges through which a fetch could reach the operator's own
/// network or machine. An IPv4 address inside IPv6 (mapped or compatible) is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped().or_else(|| compatible_v4(v6)) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0                                  // "this network"
        || (a == 100 && (64..128).contains(&b))    // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0)          // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))      // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00      // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80      // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0      // site-local (deprecated) fec0::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64: may embed a private IPv4
}

/// The IPv4 of an IPv4-compatible IPv6 address (`::a.b.c.d`, deprecated but still routable to v4).
fn compatible_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    (s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1))
        .then(|| Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn the_operators_own_network_is_refused_and_the_internet_is_not() {
        for s in [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "ff02::1",
        ] {
            assert!(!is_public(ip(s)), "{s} is not public");
        }
        for s in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(s)), "{s} is public");
        }
    }

    #[test]
    fn an_admin_may_allow_private_addresses_but_never_other_schemes() {
        let open = OutboundPolicy { allow_private: true, ..OutboundPolicy::default() };
        assert!(open.check_ip(ip("127.0.0.1")).is_ok());
        assert!(OutboundPolicy::default().check_ip(ip("127.0.0.1")).is_err());
        assert!(open.check_scheme("https").is_ok());
        assert_eq!(open.check_scheme("file"), Err(Refusal::Scheme("file".into())));
        assert!(open.check_scheme("gopher").is_err());
    }

    proptest! {
        #[test]
        fn a_mapped_address_is_judged_as_its_ipv4(a in any::<u32>()) {
            let v4 = Ipv4Addr::from(a);
            prop_assert_eq!(is_public(IpAddr::V6(v4.to_ipv6_mapped())), is_public(IpAddr::V4(v4)));
        }
    }
}
