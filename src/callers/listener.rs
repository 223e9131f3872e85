//! Recognising listener addresses that only local processes can reach.
//!
//! Trusted-local mode skips authentication entirely, which is only defensible when nothing off
//! the host can connect.

use std::net::{IpAddr, SocketAddr};

/// True for loopback addresses (127.0.0.0/8, ::1, `localhost`) with or without a port, and for
/// Unix socket paths (`/path`, `unix:/path`).
pub(crate) fn is_local(listener: &str) -> bool {
    let listener = listener.trim();
    if listener.starts_with('/') || listener.starts_with("unix:") {
        return true;
    }
    if let Ok(addr) = listener.parse::<SocketAddr>() {
        return addr.ip().to_canonical().is_loopback();
    }
    if let Ok(ip) = listener.trim_matches(['[', ']']).parse::<IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    let host = match listener.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => listener,
    };
    host.eq_ignore_ascii_case("localhost")
}

#[cfg(test)]
mod tests {
    use super::is_local;

    #[test]
    fn loopback_and_unix_only() {
        for local in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:8080",
            "::1",
            "localhost:8080",
            "LOCALHOST",
            "/run/finx.sock",
            "unix:/run/finx.sock",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.0.0.1:8080",
            "localhost.evil.com:80",
            "example.com:80",
            "",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
    }
}
