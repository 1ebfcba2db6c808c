//! Values placed into URLs: the one escaping rule for a path segment or query value built from
//! data (a job id, a file name a service returned), so that it stays one component whatever it
//! holds.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Every byte but RFC 3986's unreserved characters (`A-Z a-z 0-9 - _ . ~`) is escaped.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `s` percent-encoded as one URL component (path segment or query value).
pub fn component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_escapes_everything_but_unreserved_characters() {
        assert_eq!(component("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(component("a/b?c#d e%&="), "a%2Fb%3Fc%23d%20e%25%26%3D");
        assert_eq!(component("é"), "%C3%A9");
    }
}
