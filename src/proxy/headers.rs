//! The upstream request rewrite: caller credentials out, finX credential and `Host` in.
//! Runs on a fresh copy of the caller's headers for every attempt, so it must be idempotent
//! and must not do I/O.

use http::header::{AUTHORIZATION, COOKIE, HOST, PROXY_AUTHORIZATION};
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, OrErr, Result};

/// Prefix of the gateway's own request headers (`X-Finx-User`, `X-Finx-Flow`, …); finX never
/// sees them.
const GATEWAY_HEADER_PREFIX: &str = "x-finx-";

/// Rewrites `request` for finX.
pub fn rewrite_for_upstream(
    request: &mut RequestHeader,
    host: &HeaderValue,
    path_prefix: &str,
    caller_header: &HeaderName,
    credential: Option<&HeaderValue>,
) -> Result<()> {
    request.remove_header(&AUTHORIZATION);
    request.remove_header(&PROXY_AUTHORIZATION);
    request.remove_header(&COOKIE);
    request.remove_header(caller_header);
    // An empty Vec does not allocate: the usual request, without gateway headers, pays nothing.
    let gateway_headers: Vec<_> = request
        .headers
        .keys()
        .filter(|name| name.as_str().starts_with(GATEWAY_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in &gateway_headers {
        request.remove_header(name);
    }
    request.insert_header(HOST, host.clone())?;
    if let Some(credential) = credential {
        // Named by a static string: pingora copies a `HeaderName` it has no spelling for
        // (`authorization`) into a new buffer on every request; a static name is used as is.
        request.insert_header("Authorization", credential.clone())?;
    }
    // Forward origin-form only (an absolute-form target would name the caller's view of the
    // host) and put finX's base path in front.
    if !path_prefix.is_empty() || request.uri.scheme().is_some() {
        let path_and_query = request
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let uri = format!("{path_prefix}{path_and_query}")
            .parse::<http::Uri>()
            .or_err(ErrorType::InternalError, "rebuilding upstream URI")?;
        request.set_uri(uri);
    }
    Ok(())
}

/// The error that fails a request closed (no credential for a route that needs one).
pub fn header_error(context: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: HeaderName = HeaderName::from_static("x-caller-token");

    #[test]
    fn caller_credentials_never_go_upstream() {
        let mut request = RequestHeader::build("GET", b"/rest/accounts?x=1", None).unwrap();
        for (name, value) in [
            ("authorization", "Bearer caller"),
            ("proxy-authorization", "Bearer caller"),
            ("cookie", "session=1"),
            ("x-finx-user", "u1"),
            ("X-Finx-Flow", "f1"),
            ("x-request-id", "keep-me"),
            ("x-caller-token", "caller-jwt"),
        ] {
            request.append_header(name, value).unwrap();
        }
        let host = HeaderValue::from_static("api.example");
        let credential = HeaderValue::from_static("Bearer finx");
        rewrite_for_upstream(&mut request, &host, "", &CALLER, Some(&credential)).unwrap();
        // Idempotent: a retry runs it again on a fresh copy, and running twice changes nothing.
        rewrite_for_upstream(&mut request, &host, "", &CALLER, Some(&credential)).unwrap();
        let headers = &request.headers;
        assert_eq!(headers.get_all("authorization").iter().count(), 1);
        assert_eq!(headers["authorization"], "Bearer finx");
        assert!(headers.get("proxy-authorization").is_none());
        assert!(headers.get("cookie").is_none());
        assert!(headers.get("x-caller-token").is_none());
        assert!(headers.get("x-finx-user").is_none());
        assert!(headers.get("x-finx-flow").is_none());
        assert_eq!(headers["x-request-id"], "keep-me");
        assert_eq!(headers["host"], "api.example");
        assert_eq!(request.uri, "/rest/accounts?x=1");
    }

    #[test]
    fn base_path_is_prefixed() {
        let mut request = RequestHeader::build("GET", b"/rest/accounts?x=1", None).unwrap();
        let host = HeaderValue::from_static("api.example");
        rewrite_for_upstream(&mut request, &host, "/v1", &CALLER, None).unwrap();
        assert_eq!(request.uri, "/v1/rest/accounts?x=1");
    }
}
