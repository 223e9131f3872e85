//! Which `Host` a request without a credential may be addressed to.
//!
//! A web page can rebind its own name to 127.0.0.1 and then send requests to a loopback
//! listener from the user's browser; they carry the page's name in `Host`. Where the gateway
//! answers without a caller credential (trusted-local mode, the demo page), only the plain
//! loopback names are accepted, so such a page never gets an answer.

use http::header::HOST;
use http::{HeaderMap, Uri};

/// Why a request was refused.
pub const NOT_LOOPBACK: &str =
    "without a caller credential only requests to localhost, 127.0.0.1 or [::1] are answered";

/// Whether `authority` (a `Host` value or a URI authority) is `localhost` (any case),
/// `127.0.0.1` or `[::1]`, optionally followed by `:port`. Nothing else: not other loopback
/// spellings (`127.0.0.2`, `2130706433`, `[::ffff:127.0.0.1]`), not `localhost.` or
/// `*.localhost`, not user info.
pub fn is_loopback_host(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, after)) => (&authority[..inside.len() + 2], after),
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, _)) => (host, &authority[host.len()..]),
            None => (authority, ""),
        },
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            !digits.is_empty()
                && digits.len() <= 5
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits.parse::<u16>().is_ok()
        }
    };
    port_ok && (host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "[::1]")
}

/// Refuses a request unless it has exactly one `Host` header naming a loopback host (see
/// [`is_loopback_host`]) and, when its target is in absolute form, a loopback authority there
/// too. Returns [`NOT_LOOPBACK`] on refusal.
pub fn require_loopback_host(headers: &HeaderMap, uri: &Uri) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err(NOT_LOOPBACK);
    };
    let host_ok = host.to_str().is_ok_and(|h| is_loopback_host(h.trim()));
    let authority_ok = uri
        .authority()
        .is_none_or(|authority| is_loopback_host(authority.as_str()));
    if host_ok && authority_ok {
        Ok(())
    } else {
        Err(NOT_LOOPBACK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_plain_loopback_names() {
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:65535",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.",
            "localhost.evil.example",
            "app.localhost",
            "127.0.0.1.evil.example",
            "127.0.0.2",
            "2130706433",
            "0x7f000001",
            "[::ffff:127.0.0.1]",
            "[0:0:0:0:0:0:0:1]",
            "::1",
            "[::1",
            "[::1]x",
            "localhost:",
            "localhost:x",
            "localhost:65536",
            "localhost:+80",
            "localhost:8080:80",
            "user@localhost",
            "localhost@evil.example",
        ] {
            assert!(!is_loopback_host(host), "{host:?}");
        }
    }

    #[test]
    fn one_loopback_host_header_and_a_loopback_authority() {
        let headers = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for value in values {
                map.append(HOST, value.parse().unwrap());
            }
            map
        };
        let origin_form: Uri = "/rest/accounts".parse().unwrap();
        assert_eq!(
            require_loopback_host(&headers(&["localhost:8080"]), &origin_form),
            Ok(())
        );
        for values in [&[][..], &["evil.example"], &["localhost", "evil.example"]] {
            assert!(require_loopback_host(&headers(values), &origin_form).is_err());
        }
        let absolute: Uri = "http://evil.example/rest/accounts".parse().unwrap();
        assert!(require_loopback_host(&headers(&["localhost"]), &absolute).is_err());
        let absolute: Uri = "http://127.0.0.1:8080/rest/accounts".parse().unwrap();
        assert_eq!(
            require_loopback_host(&headers(&["localhost"]), &absolute),
            Ok(())
        );
    }
}
