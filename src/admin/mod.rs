//! The admin listener (`[admin] address`, default 127.0.0.1:9901): a second pingora service
//! beside the proxy, never on the data port. Probes and metrics are open (`/healthz`, `/readyz`,
//! `/metrics`); everything under `/admin/` needs `Authorization: Bearer <admin credential>`,
//! except the login form, and the status page, which also takes a login session.
//!
//! - `mod.rs`: the application, authentication and the one routing `match`;
//! - [`api`]: the JSON API over connections (list, show, import, revoke, purge);
//! - [`page`]: the server-rendered status page and its login form;
//! - [`session`]: the login session cookie.
//!
//! No answer of this listener carries a token, a code or a key: connections are described by
//! their metadata only.
//!
//! Uses the token manager, the store and the metrics; the gateway assembly builds it.

mod api;
mod keys;
mod page;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{header, HeaderValue, Method, Response, StatusCode};
use percent_encoding::percent_decode_str;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use zeroize::Zeroize;

use crate::clock::{Clock, UnixSeconds};
use crate::error::AdminError;
use crate::metrics::{ConnectionSample, Metrics};
use crate::store::{ConnectionSummary, TokenStore};
use crate::tokens::TokenManager;

/// `[admin]`, validated.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub address: SocketAddr,
    /// The bearer credential of `/admin/`; without one, `/admin/` answers 401 to everyone.
    pub credential: Option<SecretString>,
}

/// The default admin address: loopback, beside the data listener.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";

/// How long a scrape reuses the last connection snapshot instead of listing the store again.
const SNAPSHOT_MAX_AGE_SECS: i64 = 10;
/// The store must answer a readiness probe within this.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest request body the admin API accepts.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A refused body up to this long is still read (and dropped) before the answer.
const DRAIN_LIMIT_BYTES: usize = 1024 * 1024;

/// Whether the gateway is stopping; set by the signal handling, read by `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Marks the gateway as stopping: `/readyz` answers 503 from now on.
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the gateway is stopping.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The admin listener's application.
pub struct AdminApp {
    settings: AdminSettings,
    metrics: Arc<Metrics>,
    tokens: TokenManager,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    draining: Draining,
    /// When the connection metrics were last computed (unix seconds).
    snapshot_at: AtomicI64,
    /// Issues and checks the status page's login sessions.
    sessions: session::Sessions,
    /// The key rotation started through the API, if any.
    rotation: Arc<keys::Rotation>,
}

impl AdminApp {
    /// The admin application over the gateway's parts.
    pub fn new(
        settings: AdminSettings,
        metrics: Arc<Metrics>,
        tokens: TokenManager,
        store: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
        draining: Draining,
    ) -> Self {
        Self {
            settings,
            metrics,
            tokens,
            store,
            clock,
            draining,
            snapshot_at: AtomicI64::new(i64::MIN),
            sessions: session::Sessions::new(),
            rotation: Arc::default(),
        }
    }

    /// `/readyz`: the store answers, nothing is draining. (Keys are loaded and finX's address
    /// is resolved before the listener opens, or the gateway does not start.)
    async fn readiness(&self) -> Response<Vec<u8>> {
        let (ready, store_ok, draining) = self.check_ready().await;
        let body = json!({
            "ready": ready,
            "checks": {
                "store": if store_ok { "ok" } else { "unreachable" },
                "keys": "loaded",
                "upstream": "resolved",
                "draining": draining,
            }
        });
        let status = if ready {
            StatusCode::OK
        } else {
            AdminError::NotReady.status()
        };
        json_answer(status, &body)
    }

    /// Whether the gateway is ready, and why not: (ready, store answered, draining). Also sets
    /// the `finx_gateway_ready` gauge.
    async fn check_ready(&self) -> (bool, bool, bool) {
        let store_ok = matches!(
            tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await,
            Ok(Ok(()))
        );
        let draining = self.draining.is_draining();
        let ready = store_ok && !draining;
        self.metrics.ready.set(i64::from(ready));
        (ready, store_ok, draining)
    }

    /// `/metrics`: refreshes the connection snapshot when it is older than a few seconds (a
    /// metadata listing of the store, never a token), then renders every metric.
    async fn metrics(&self) -> Response<Vec<u8>> {
        let now = self.clock.now();
        let last = self.snapshot_at.load(Ordering::Relaxed);
        // One scrape at a time refreshes the snapshot: it claims the refresh by moving the
        // timestamp first, so concurrent scrapes (or a flood of them) list the store once.
        let claimed = now.saturating_sub(last) >= SNAPSHOT_MAX_AGE_SECS
            && self
                .snapshot_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        if claimed {
            match self.store.list().await {
                Ok(connections) => {
                    let samples: Vec<ConnectionSample> = connections
                        .iter()
                        .map(|c| ConnectionSample {
                            status: c.status.as_str(),
                            refresh_token_age_secs: refresh_token_age_secs(c, now),
                        })
                        .collect();
                    self.metrics.set_connections(&samples);
                }
                Err(error) => {
                    self.snapshot_at.store(last, Ordering::Relaxed);
                    tracing::warn!(%error, "connection metrics not refreshed: the store cannot be listed");
                }
            }
        }
        self.metrics
            .cache_entries
            .set(i64::try_from(self.tokens.cached_entries()).unwrap_or(i64::MAX));
        self.check_ready().await;
        answer(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            self.metrics.render().into_bytes(),
            &[],
        )
    }

    /// Who is asking, as far as `/admin/` is concerned.
    fn access(&self, session: &ServerSession) -> Access {
        let Some(expected) = &self.settings.credential else {
            return Access::None;
        };
        let headers = &session.req_header().headers;
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let presented = value
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or("");
            return if constant_time_eq(presented.as_bytes(), expected.expose_secret().as_bytes()) {
                Access::Bearer
            } else {
                Access::WrongBearer
            };
        }
        let now = self.clock.now();
        let logged_in = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == session::COOKIE_NAME)
            .any(|(_, value)| self.sessions.verify(expected, value, now));
        if logged_in {
            Access::Session
        } else {
            Access::None
        }
    }

    /// `/admin` and `/admin/…`. The login form is open; the status page takes the bearer
    /// credential or a login session; every other endpoint takes the bearer credential only,
    /// so a browser's cookie can change nothing (no cross-site request forgery).
    async fn admin(
        &self,
        session: &mut ServerSession,
        method: &Method,
        path: &str,
    ) -> Response<Vec<u8>> {
        let segments = match admin_segments(path) {
            Ok(segments) => segments,
            Err(error) => return error_answer(&error),
        };
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match segments.as_slice() {
            ["login"] => return page::login(self, session, method).await,
            ["logout"] => return page::logout(method),
            _ => {}
        }
        let status_page = segments.is_empty() && *method == Method::GET;
        match self.access(session) {
            Access::Bearer => {}
            Access::Session if status_page => {}
            Access::None if status_page => return page::to_login(),
            Access::Session | Access::None | Access::WrongBearer => {
                return error_answer(&AdminError::Unauthenticated)
            }
        }
        let query = session.req_header().uri.query().map(str::to_owned);
        // The one table of admin endpoints: one arm per path, the methods inside.
        match segments.as_slice() {
            [] => match *method {
                Method::GET => page::status(self).await,
                _ => method_not_allowed("GET"),
            },
            ["connections"] => match *method {
                Method::GET => api::list(self, query.as_deref()).await,
                _ => method_not_allowed("GET"),
            },
            ["connections", key] => match *method {
                Method::GET => api::show(self, key).await,
                Method::DELETE => api::purge(self, key).await,
                _ => method_not_allowed("GET, DELETE"),
            },
            ["connections", key, "import"] => match *method {
                Method::POST => api::import(self, session, key).await,
                _ => method_not_allowed("POST"),
            },
            ["connections", key, "revoke"] => match *method {
                Method::POST => api::revoke(self, key).await,
                _ => method_not_allowed("POST"),
            },
            ["keys"] => match *method {
                Method::GET => keys::status(self).await,
                _ => method_not_allowed("GET"),
            },
            ["keys", "rotate"] => match *method {
                Method::POST => keys::start(self),
                _ => method_not_allowed("POST"),
            },
            ["events"] => match *method {
                Method::GET => match self.tokens.events().admin_listing(query.as_deref()) {
                    Ok(body) => json_answer(StatusCode::OK, &body),
                    Err(invalid) => error_answer(&AdminError::bad_request(
                        "invalid_limit",
                        invalid.to_string(),
                    )),
                },
                _ => method_not_allowed("GET"),
            },
            _ => error_answer(&AdminError::NotFound),
        }
    }

    /// Recent connection events for the status page, newest first, at most `limit`.
    async fn recent_events(&self, limit: usize) -> Vec<serde_json::Value> {
        self.tokens
            .events()
            .recent(limit)
            .iter()
            .filter_map(|event| serde_json::to_value(event).ok())
            .collect()
    }
}

/// How a request to `/admin/` authenticated itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// `Authorization: Bearer <admin credential>`.
    Bearer,
    /// A valid login session cookie (opens the status page only).
    Session,
    /// An `Authorization` header with anything else.
    WrongBearer,
    /// Nothing (or no credential is configured).
    None,
}

#[async_trait]
impl ServeHttp for AdminApp {
    /// Routes one admin-listener request; never answers a secret.
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => json_answer(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.readiness().await,
            (&Method::GET, "/metrics") => self.metrics().await,
            (_, admin) if admin == "/admin" || admin.starts_with("/admin/") => {
                self.admin(session, &method, &path).await
            }
            _ => error_answer(&AdminError::NotFound),
        }
    }
}

/// Seconds since the connection's refresh token was issued (its consent or its last refresh).
fn refresh_token_age_secs(connection: &ConnectionSummary, now: UnixSeconds) -> i64 {
    now - connection.refreshed_at.unwrap_or(connection.created_at)
}

/// The decoded path segments after `/admin` (`/admin` and `/admin/` have none). A flow's key
/// is one segment whether its `/` is percent-encoded (`flow:<service>%2F<flow id>`, as the
/// CLI sends it) or not.
fn admin_segments(path: &str) -> Result<Vec<String>, AdminError> {
    let rest = path.strip_prefix("/admin").unwrap_or(path);
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let decode = |segment: &str| {
        percent_decode_str(segment)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| {
                AdminError::bad_request(
                    "invalid_path",
                    "the path is not valid percent-encoded UTF-8",
                )
            })
    };
    let mut segments = Vec::new();
    let mut raw = rest.split('/');
    while let Some(segment) = raw.next() {
        let mut decoded = decode(segment)?;
        // Ids never contain `/` or `:`, so a `flow:<service>` segment is always followed by its
        // flow id.
        if decoded.starts_with("flow:") && !decoded.contains('/') {
            if let Some(flow_id) = raw.next() {
                decoded.push('/');
                decoded.push_str(&decode(flow_id)?);
            }
        }
        segments.push(decoded);
    }
    Ok(segments)
}

/// Compares a presented secret with the expected one without revealing, by timing, how much of
/// it matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// An answer with its length (so the connection can be kept alive), never cached.
fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    extra: &[(header::HeaderName, HeaderValue)],
) -> Response<Vec<u8>> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    for (name, value) in extra {
        builder = builder.header(name, value);
    }
    builder
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response<Vec<u8>> {
    answer(
        status,
        "application/json",
        body.to_string().into_bytes(),
        &[],
    )
}

/// The admin listener's answer to `error` (its status, code and message are decided in
/// `crate::error`): JSON, with the bearer challenge on a 401 and `Allow` on a 405.
fn error_answer(error: &AdminError) -> Response<Vec<u8>> {
    let mut answer = json_answer(error.status(), &error.body());
    if let Some(challenge) = error.www_authenticate() {
        answer.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    if let Some(allowed) = error.allow() {
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
    }
    answer
}

/// 405 naming the methods the endpoint takes.
fn method_not_allowed(allowed: &'static str) -> Response<Vec<u8>> {
    error_answer(&AdminError::MethodNotAllowed { allowed })
}

/// Reads the request body, at most [`MAX_BODY_BYTES`]. A longer one is refused; it is still
/// read to its end (and dropped) when it is not much longer, so the client gets the answer
/// rather than a reset connection, and the connection can be reused; a far longer one is not
/// read on, and the connection is closed.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, AdminError> {
    let too_large = || {
        AdminError::bad_request(
            "body_too_large",
            format!(
                "the request body is limited to {} KiB",
                MAX_BODY_BYTES / 1024
            ),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<usize>().ok());
    if declared.is_some_and(|length| length > DRAIN_LIMIT_BYTES) {
        session.set_keepalive(None);
        return Err(too_large());
    }
    let mut body = Vec::new();
    let (mut received, mut over) = (0usize, false);
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                received = received.saturating_add(chunk.len());
                if received > DRAIN_LIMIT_BYTES {
                    session.set_keepalive(None);
                    body.zeroize();
                    return Err(too_large());
                }
                if over {
                    continue;
                }
                if received > MAX_BODY_BYTES {
                    over = true;
                    body.zeroize();
                } else {
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) if over => return Err(too_large()),
            Ok(None) => return Ok(body),
            Err(_) => {
                session.set_keepalive(None);
                body.zeroize();
                return Err(AdminError::bad_request(
                    "unreadable_body",
                    "the request body could not be read",
                ));
            }
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Vec<u8>> {
    let mut answer = Response::new(text.as_bytes().to_vec());
    *answer.status_mut() = status;
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_and_keep_a_flow_key_whole() {
        let cases: &[(&str, &[&str])] = &[
            ("/admin", &[]),
            ("/admin/", &[]),
            ("/admin/connections", &["connections"]),
            ("/admin/connections/alice", &["connections", "alice"]),
            (
                "/admin/connections/flow:demo%2Ff-1/revoke",
                &["connections", "flow:demo/f-1", "revoke"],
            ),
            (
                "/admin/connections/flow%3Ademo/f-1/import",
                &["connections", "flow:demo/f-1", "import"],
            ),
            ("/admin/connections/", &["connections", ""]),
        ];
        for (path, expected) in cases {
            let segments = admin_segments(path).expect("valid path");
            assert_eq!(segments, *expected, "{path}");
        }
        assert!(admin_segments("/admin/connections/%FF").is_err());
    }
}
