//! The route table (the README's "Routes") and the one place paths are decoded and judged.
//!
//! Two readings of every path are taken. The *canonical* reading decodes, folds case, turns `\`
//! into `/` and resolves dot segments the way the most lenient server would; if it names
//! `/auth`, the request is refused whatever its spelling. Otherwise a path whose meaning depends
//! on who decodes it (encoded `/`, `\`, `.` or `%`, NUL, `//`, dot segments, control bytes) is
//! refused as ambiguous, and so is any `;` and any segment a lenient server reads as a dot
//! segment (see [`super::path`]); what remains is classified on its once-decoded form and
//! forwarded as it came, so finX decodes exactly what was classified.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::connect::FlowKind;
use crate::error::GatewayError;

/// What a request path is, and so which credential it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/rest/**`: the user's bearer token.
    UserData,
    /// `/category-tree`, `/rpc/categorize`, `/payment-receipts/**`: client Basic auth.
    ClientData,
    /// `/healthz`: answered by the gateway.
    Health,
    /// A connect-flow initiation (`/onetime/*`, `/ongoing/*`): handled by the gateway.
    Flow(FlowKind),
    /// The gateway's callback (path configurable).
    Callback,
}

impl Route {
    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserData => "user_data",
            Self::ClientData => "client_data",
            Self::Health => "health",
            Self::Flow(_) => "connect_flow",
            Self::Callback => "callback",
        }
    }
}

const AUTH_FORBIDDEN: &str = "the finX /auth endpoints are closed to callers";

/// A raw request target, split once: the path (still percent-encoded) and the query ("" when
/// there is none). A fragment, which a client should never send, is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: &'a str,
    pub query: &'a str,
}

/// Splits a raw request target (pingora's, as received) into path and query. The one place a
/// target is split: routing judges its `path`, the callback reads its `query`.
pub fn split_target(raw_target: &[u8]) -> Result<Target<'_>, GatewayError> {
    let target = std::str::from_utf8(raw_target)
        .map_err(|_| GatewayError::bad_request("the request target is not UTF-8"))?;
    let without_fragment = target.split_once('#').map_or(target, |(before, _)| before);
    let (path, query) = without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""));
    Ok(Target { path, query })
}

/// Judges a request path (the raw target's path, still percent-encoded).
pub fn classify(raw_path: &str, callback_path: &str) -> Result<Route, GatewayError> {
    if names_auth(raw_path) {
        return Err(GatewayError::RouteForbidden(AUTH_FORBIDDEN));
    }
    let decoded = decode_unambiguous(raw_path)?;
    let path: &str = &decoded;
    if path == "/healthz" {
        return Ok(Route::Health);
    }
    if path == callback_path {
        return Ok(Route::Callback);
    }
    if path == "/rest" || path.starts_with("/rest/") {
        return Ok(Route::UserData);
    }
    if path == "/category-tree"
        || path == "/rpc/categorize"
        || path
            .strip_prefix("/payment-receipts/")
            .is_some_and(|rest| !rest.is_empty())
    {
        return Ok(Route::ClientData);
    }
    if let Some(kind) = FlowKind::from_path(path) {
        return Ok(Route::Flow(kind));
    }
    Err(GatewayError::RouteNotFound)
}

/// The lenient reading: does any plausible decoding of this path reach `/auth`?
fn names_auth(raw_path: &str) -> bool {
    // Nothing to decode or resolve (the usual request): the first segment is plain text.
    // Bytes, not a char-set search: this runs on every request.
    let needs_decoding = raw_path
        .bytes()
        .any(|b| matches!(b, b'%' | b'\\' | b';' | b'.' | 0));
    if !needs_decoding && !raw_path.contains("//") {
        let first = raw_path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        return first.trim().eq_ignore_ascii_case("auth");
    }
    // Decode twice: a server that double-decodes turns `%2561uth` into `auth`.
    let once = percent_decode_str(raw_path).decode_utf8_lossy();
    let twice = percent_decode_str(&once).decode_utf8_lossy();
    let names =
        |reading: &str| first_segment(reading).is_some_and(|s| s.eq_ignore_ascii_case("auth"));
    names(&once) || names(&twice)
}

/// The first path segment after `\`→`/`, empty and dot segments removed, `..` resolved and
/// `;params` dropped; `None` for the root.
fn first_segment(path: &str) -> Option<String> {
    let unified = path.replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in unified.split('/') {
        let segment = segment
            .split(';')
            .next()
            .unwrap_or("")
            .trim_matches(|c: char| c.is_whitespace() || c == '\0');
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    segments.first().map(|s| (*s).to_owned())
}

/// Decodes a path once, refusing every spelling whose meaning depends on the decoder.
fn decode_unambiguous(raw_path: &str) -> Result<Cow<'_, str>, GatewayError> {
    if !raw_path.starts_with('/') {
        return Err(GatewayError::bad_request(
            "the request path must start with /",
        ));
    }
    let bytes = raw_path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(GatewayError::bad_request(
                    "truncated percent-encoding in path",
                ))?;
                let value = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(GatewayError::bad_request(
                        "invalid percent-encoding in path",
                    ))?;
                // `?` and `#` too: a server that decodes before it splits off the query would
                // serve a shorter path than the one classified.
                if matches!(value, b'/' | b'\\' | b'.' | b'%' | b';' | b'?' | b'#')
                    || value < 0x20
                    || value == 0x7f
                {
                    return Err(GatewayError::bad_request(
                        "the path encodes a separator, dot, percent, '?', '#' or control byte",
                    ));
                }
                i += 3;
            }
            b'\\' => {
                return Err(GatewayError::bad_request(
                    "backslashes are not allowed in paths",
                ))
            }
            b if b <= b' ' || b == 0x7f => {
                return Err(GatewayError::bad_request(
                    "control bytes and spaces are not allowed in paths",
                ))
            }
            _ => i += 1,
        }
    }
    if raw_path.contains("//") {
        return Err(GatewayError::bad_request(
            "empty path segments (//) are not allowed",
        ));
    }
    if raw_path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(GatewayError::bad_request(
            "dot segments are not allowed in paths",
        ));
    }
    // `;`, dot segments in lenient spellings (`..;`, `..%20`), Unicode that folds to ASCII.
    super::path::check_segments(raw_path).map_err(GatewayError::bad_request)?;
    percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| GatewayError::bad_request("the path does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_split_once_into_path_and_query() {
        fn split(raw: &str) -> Target<'_> {
            split_target(raw.as_bytes()).unwrap()
        }
        assert_eq!(
            split("/callback?code=a&state=b"),
            Target {
                path: "/callback",
                query: "code=a&state=b"
            }
        );
        assert_eq!(split("/rest/accounts").query, "");
        assert_eq!(split("/a?b=1#frag").query, "b=1");
        assert_eq!(split("/a#frag?b=1").path, "/a");
        assert_eq!(split("/a#frag?b=1").query, "");
        assert!(split_target(&[b'/', 0xff]).is_err());
    }

    fn classify_default(path: &str) -> Result<Route, GatewayError> {
        classify(path, "/callback")
    }

    #[test]
    fn routes_of_the_design() {
        assert_eq!(classify_default("/rest/accounts"), Ok(Route::UserData));
        assert_eq!(
            classify_default("/rest/accounts/A%20B/transactions"),
            Ok(Route::UserData)
        );
        assert_eq!(classify_default("/category-tree"), Ok(Route::ClientData));
        assert_eq!(classify_default("/rpc/categorize"), Ok(Route::ClientData));
        assert_eq!(
            classify_default("/payment-receipts/42"),
            Ok(Route::ClientData)
        );
        assert_eq!(classify_default("/healthz"), Ok(Route::Health));
        assert_eq!(
            classify_default("/payment-receipts/"),
            Err(GatewayError::RouteNotFound)
        );
        assert_eq!(
            classify_default("/restful"),
            Err(GatewayError::RouteNotFound)
        );
        assert_eq!(classify_default("/"), Err(GatewayError::RouteNotFound));
        assert_eq!(
            classify_default("/ongoing/access"),
            Ok(Route::Flow(FlowKind::OngoingAccess))
        );
        assert_eq!(
            classify_default("/onetime/income-report"),
            Ok(Route::Flow(FlowKind::OnetimeIncomeReport))
        );
        assert_eq!(
            classify_default("/onetime/nothing"),
            Err(GatewayError::RouteNotFound)
        );
        assert_eq!(classify_default("/callback"), Ok(Route::Callback));
        assert_eq!(classify("/gw/cb", "/gw/cb"), Ok(Route::Callback));
        assert_eq!(
            classify_default("/demo/done"),
            Err(GatewayError::RouteNotFound)
        );
    }

    #[test]
    fn auth_is_forbidden_under_every_spelling() {
        for path in [
            "/auth/token",
            "/auth",
            "/auth/",
            "/AUTH/token",
            "/Auth/Token",
            "/%61uth/token",
            "/%41UTH/token",
            "/auth%2ftoken",
            "/auth%2Ftoken",
            "//auth/token",
            "///auth//token",
            "/./auth/token",
            "/rest/../auth/token",
            "/rest/%2e%2e/auth/token",
            "/rest/%2E%2E/auth/token",
            "/rest/..%2fauth/token",
            "\\auth\\token",
            "/rest\\..\\auth/token",
            "/auth;x=1/token",
            "/%2561uth/token",
            "/auth%00/token",
            "/ auth/token",
            "/rest/%252e%252e/auth/token",
        ] {
            let verdict = classify_default(path);
            assert!(
                matches!(verdict, Err(GatewayError::RouteForbidden(_))),
                "{path} gave {verdict:?}"
            );
        }
    }

    #[test]
    fn ambiguous_paths_are_bad_requests() {
        for path in [
            "/rest/accounts%2f1",
            "/rest/./accounts",
            "/rest/x/../accounts",
            "/rest//accounts",
            "/rest/acc%00ounts",
            "/rest/%zz",
            "/rest/%4",
            "/rest/%25",
            "rest/accounts",
            "/rest/\u{7f}",
            "/rest/accounts/a%3F/transactions",
            "/rest/accounts/a%23x",
            "/rest/a b",
        ] {
            assert!(
                matches!(classify_default(path), Err(GatewayError::BadRequest(_))),
                "{path} gave {:?}",
                classify_default(path)
            );
        }
    }
}
