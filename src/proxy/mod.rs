//! The pingora `ProxyHttp` implementation. Each phase method only delegates: routing to
//! [`routes`], the upstream rewrite to [`headers`], credentials to the token manager, answers to
//! [`respond`]. All async work happens once per request, in `request_filter`.

pub mod headers;
pub mod host;
mod path;
pub mod respond;
pub mod routes;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use crate::callers::{Caller, CallerAuth};
use crate::clock::{Clock, SystemClock};
use crate::connect::{ConnectService, FlowKind, MAX_FLOW_BODY};
use crate::error::GatewayError;
use crate::metrics::{CallerDecision, Metrics};
use crate::store::ConnectionKey;
use crate::tokens::{Credential, TokenManager};
use routes::Route;

/// The finX sidecar proxy.
pub struct FinxProxy {
    parts: ProxyParts,
}

/// Everything the proxy is built from, prepared once at start-up.
pub struct ProxyParts {
    pub tokens: TokenManager,
    /// Caller authentication and policies; replaced whole by a reload (SIGHUP).
    pub callers: Arc<ArcSwap<CallerAuth>>,
    /// Built once: resolved address, TLS, SNI, timeouts.
    pub peer: HttpPeer,
    pub host: HeaderValue,
    pub path_prefix: String,
    /// `Basic base64(client_id:client_secret)`, marked sensitive.
    pub client_basic: HeaderValue,
    pub user_header: HeaderName,
    pub flow_header: HeaderName,
    /// Connect flows and the callback; `None` keeps them closed.
    pub connect: Option<Arc<ConnectService>>,
    /// Request bodies up to this size may be replayed after a finX 401.
    pub replay_body_limit: usize,
    /// Where requests and caller decisions are counted.
    pub metrics: Arc<Metrics>,
}

/// What one request learned on its way through the phases.
pub struct RequestCtx {
    started: Instant,
    route: Option<Route>,
    caller: Option<Caller>,
    /// The caller settings this request was admitted under: a reload meanwhile must not change
    /// which credential header is stripped before finX.
    callers: Option<Arc<CallerAuth>>,
    connection: Option<ConnectionKey>,
    credential: Option<Credential>,
    upstream_started: Option<Instant>,
    upstream_status: Option<u16>,
    /// The code of the error the gateway answered, if it answered one itself.
    gateway_error: Option<&'static str>,
    /// Whether this request may be replayed after a finX 401 (idempotent, body small enough).
    replayable: bool,
    /// The request was replayed once with a new credential after a finX 401.
    replayed: bool,
    /// The current upstream attempt was ended by the gateway to replay it.
    replay_pending: bool,
}

impl FinxProxy {
    /// Assembles the proxy from its already-built parts.
    pub fn new(parts: ProxyParts) -> Self {
        Self { parts }
    }

    /// Classifies the request and obtains its credential. `Ok(true)` when already answered.
    ///
    /// Order matters: the caller is authenticated and authorised before any token work or
    /// finX call, so an unauthorised caller cannot even learn whether a connection exists.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool, GatewayError> {
        let parts = &self.parts;
        let request = session.req_header();
        // Judge the request target as received (pingora's raw target), not the parsed URI,
        // which a target such as `\auth\token` does not even produce.
        let path = routes::split_target(request.raw_path())?.path;
        let callback_path = parts
            .connect
            .as_ref()
            .map_or("/callback", |c| c.callback_path());
        let route = routes::classify(path, callback_path)?;
        ctx.route = Some(route);
        match route {
            Route::Health => {
                respond::send_json(session, StatusCode::OK, r#"{"status":"ok"}"#)
                    .await
                    .map_err(|_| GatewayError::Internal)?;
                return Ok(true);
            }
            // The browser coming back from finX carries no caller credential; the signed
            // state is what authorises it.
            Route::Callback if request.method == Method::GET => {
                self.browser_callback(session).await?;
                return Ok(true);
            }
            _ => {}
        }

        // Without a credential to check, a page that rebound its name to 127.0.0.1 must not
        // pass for a local caller: only loopback host names are answered.
        let callers = parts.callers.load_full();
        ctx.callers = Some(callers.clone());
        if callers.is_trusted_local() {
            host::require_loopback_host(&request.headers, &request.uri)
                .map_err(GatewayError::CallerForbidden)?;
        }
        // Caller JWTs are judged by the wall clock, not the token clock tests may move.
        let caller = callers.authenticate(&request.headers, SystemClock.now())?;
        ctx.caller = Some(caller.clone());
        caller.check_rate()?;
        match route {
            Route::Flow(kind) => {
                self.start_flow(session, kind, &caller).await?;
                Ok(true)
            }
            Route::Callback => {
                self.service_callback(session, &caller).await?;
                Ok(true)
            }
            Route::UserData => {
                caller.authorize_route(&request.method, path)?;
                let named = self.connection_named(request, &caller)?;
                ctx.replayable = replayable(request, parts.replay_body_limit);
                self.credential(named, ctx).await?;
                Ok(false)
            }
            Route::ClientData => {
                caller.authorize_route(&request.method, path)?;
                Ok(false)
            }
            Route::Health => Err(GatewayError::Internal),
        }
    }

    fn connect(&self) -> Result<&ConnectService, GatewayError> {
        self.parts
            .connect
            .as_deref()
            .ok_or(GatewayError::RouteForbidden(
                "connect flows are not configured on this gateway",
            ))
    }

    /// `POST /onetime/*`, `/ongoing/*`: checked, rewritten and forwarded by the connect service;
    /// finX's answer goes back unchanged.
    async fn start_flow(
        &self,
        session: &mut Session,
        kind: FlowKind,
        caller: &Caller,
    ) -> Result<(), GatewayError> {
        let connect = self.connect()?;
        if session.req_header().method != Method::POST {
            return Err(GatewayError::bad_request(
                "connect flows are started with POST",
            ));
        }
        caller.authorize_flow(kind.name())?;
        let body = read_body(session, MAX_FLOW_BODY).await?;
        let answer = connect.start_flow(kind, caller, &body).await?;
        respond::send_upstream_answer(
            session,
            answer.status,
            answer.content_type.as_deref(),
            answer.body,
        )
        .await
        .map_err(|_| GatewayError::Internal)
    }

    /// `GET /callback` from the user's browser: completes the flow, then redirects to the
    /// caller's own `redirect_uri`.
    async fn browser_callback(&self, session: &mut Session) -> Result<(), GatewayError> {
        let connect = self.connect()?;
        let query = routes::split_target(session.req_header().raw_path())?
            .query
            .to_owned();
        let completion = connect.complete(&query, None).await?;
        respond::send_redirect(session, completion.redirect.as_str())
            .await
            .map_err(|_| GatewayError::Internal)
    }

    /// `POST /callback` from a service whose app received the browser itself: the query string
    /// comes in the URL or as a form body; the answer is JSON.
    async fn service_callback(
        &self,
        session: &mut Session,
        caller: &Caller,
    ) -> Result<(), GatewayError> {
        let connect = self.connect()?;
        let mut query = routes::split_target(session.req_header().raw_path())?
            .query
            .to_owned();
        if query.is_empty() {
            let body = read_body(session, MAX_FLOW_BODY).await?;
            query = String::from_utf8(body)
                .map_err(|_| GatewayError::bad_request("the callback body is not UTF-8"))?;
        }
        let completion = connect.complete(query.trim(), Some(caller)).await?;
        let body = serde_json::json!({
            "success": completion.success,
            "flow_id": completion.flow_id,
            "connection": completion.connection.as_ref().map(ConnectionKey::as_str),
            "error": completion.error,
        });
        respond::send_json_value(session, StatusCode::OK, &body)
            .await
            .map_err(|_| GatewayError::Internal)
    }

    /// The connection named by exactly one of the user and flow headers.
    /// A user must be one the caller's policy allows; a one-time flow is looked up among the
    /// caller's own flows only. A user's key is only checked here, not built (see
    /// [`Self::credential`]).
    fn connection_named<'r>(
        &self,
        request: &'r RequestHeader,
        caller: &Caller,
    ) -> Result<Named<'r>, GatewayError> {
        let single = |name: &HeaderName| -> Result<Option<&'r str>, GatewayError> {
            let mut values = request.headers.get_all(name).iter();
            let Some(first) = values.next() else {
                return Ok(None);
            };
            if values.next().is_some() {
                return Err(GatewayError::bad_request(format!(
                    "{name} must be sent once"
                )));
            }
            first
                .to_str()
                .map(Some)
                .map_err(|_| GatewayError::bad_request(format!("{name} is not ASCII")))
        };
        let invalid = |name: &HeaderName| {
            GatewayError::bad_request(format!(
                "{name}: ids are 1 to 128 characters of A-Z a-z 0-9 . _ @ -"
            ))
        };
        let (user_header, flow_header) = (&self.parts.user_header, &self.parts.flow_header);
        match (single(user_header)?, single(flow_header)?) {
            (Some(user), None) => {
                let name = ConnectionKey::user_name(user).map_err(|_| invalid(user_header))?;
                caller.authorize_user(user)?;
                Ok(Named::User(name))
            }
            (None, Some(flow)) => ConnectionKey::flow(caller.service(), flow)
                .map(Named::Flow)
                .map_err(|_| invalid(flow_header)),
            (Some(_), Some(_)) => Err(GatewayError::bad_request(format!(
                "send either {user_header} or {flow_header}, not both"
            ))),
            (None, None) => Err(GatewayError::bad_request(format!(
                "{user_header} or {flow_header} is required for /rest"
            ))),
        }
    }

    /// Records the named connection's key and credential in `ctx`; the key first, so the
    /// access line names the connection even when its credential cannot be had. A cached
    /// user's comes straight from the cache, which also hands out its key: a cache hit
    /// allocates nothing.
    async fn credential(&self, named: Named<'_>, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let tokens = &self.parts.tokens;
        let key = match named {
            Named::User(name) => {
                if let Some((key, credential)) = tokens.cached_bearer(name).await {
                    ctx.connection = Some(key);
                    ctx.credential = Some(credential);
                    return Ok(());
                }
                ConnectionKey::user(name).map_err(|_| GatewayError::Internal)?
            }
            Named::Flow(key) => key,
        };
        let key = ctx.connection.insert(key);
        ctx.credential = Some(tokens.bearer(key).await?);
        Ok(())
    }
}

/// A connection as a request names it: a checked user id (its key's stored form, borrowed
/// from the request) or a one-time flow's key.
enum Named<'r> {
    User(&'r str),
    Flow(ConnectionKey),
}

/// Whether a request may be sent to finX a second time after a 401: safe methods always;
/// idempotent ones with a body pingora keeps for retries (at most `body_limit` bytes, declared
/// by `Content-Length`); never POST or PATCH.
fn replayable(request: &RequestHeader, body_limit: usize) -> bool {
    let method = &request.method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    if !matches!(*method, Method::PUT | Method::DELETE) {
        return false;
    }
    let length = request
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = request
        .headers
        .contains_key(http::header::TRANSFER_ENCODING);
    !chunked && length.unwrap_or(0) <= body_limit
}

/// Keeps the caller's `X-Request-Id` when it is a plausible id (1 to 128 visible ASCII
/// characters, sent once); otherwise gives the request a new random one. Either way the id is
/// in the request header from here on: forwarded to finX, echoed on the answer, logged.
fn ensure_request_id(session: &mut Session) -> Result<()> {
    let headers = &session.req_header().headers;
    let mut sent = headers.get_all(respond::REQUEST_ID).iter();
    let usable = match (sent.next(), sent.next()) {
        (Some(id), None) => {
            let bytes = id.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
        }
        _ => false,
    };
    if !usable {
        // 32 lowercase hex digits of a random 128-bit number, without the formatting machinery.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bits = rand::random::<u128>();
        let id: [u8; 32] = std::array::from_fn(|at| HEX[((bits >> (124 - 4 * at)) & 0xf) as usize]);
        session
            .req_header_mut()
            .insert_header(respond::REQUEST_ID, &id[..])?;
    }
    Ok(())
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Vec<u8>, GatewayError> {
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| GatewayError::bad_request("the request body could not be read"))?
    {
        if body.len() + chunk.len() > limit {
            return Err(GatewayError::bad_request(format!(
                "the request body is larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[async_trait]
impl ProxyHttp for FinxProxy {
    type CTX = RequestCtx;

    /// Creates the empty per-request context.
    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            route: None,
            caller: None,
            callers: None,
            connection: None,
            credential: None,
            upstream_started: None,
            upstream_status: None,
            gateway_error: None,
            replayable: false,
            replayed: false,
            replay_pending: false,
        }
    }

    /// Runs once per request, before anything goes upstream: gives the request its id (the
    /// caller's `X-Request-Id`, or a new one), normalises and classifies the path, answers the
    /// gateway's own endpoints, resolves the connection and awaits its credential (cache hit,
    /// stored token or the shared refresh). Returns `Ok(true)` when the gateway has answered
    /// (health, or a JSON error), `Ok(false)` to proxy.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ensure_request_id(session)?;
        match self.admit(session, ctx).await {
            Ok(answered) => Ok(answered),
            Err(error) => {
                ctx.gateway_error = Some(error.code());
                respond::send_error(session, &error).await?;
                Ok(true)
            }
        }
    }

    /// Returns the pre-built finX peer; no DNS and no I/O here.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(self.parts.peer.clone()))
    }

    /// Runs on a fresh copy of the caller's headers for every upstream attempt: strips the
    /// caller's credentials and the gateway's own headers, sets `Host`, inserts the finX
    /// credential. Idempotent, no I/O. An error fails the request.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let credential = match ctx.route {
            Some(Route::UserData) => ctx.credential.as_ref().map(|c| &c.header),
            Some(Route::ClientData) => Some(&self.parts.client_basic),
            _ => None,
        };
        // Fail closed: a route that needs a credential never goes out without one.
        if credential.is_none() {
            return Err(headers::header_error(
                "no credential for an upstream request",
            ));
        }
        let callers = match &ctx.callers {
            Some(callers) => callers.clone(),
            None => self.parts.callers.load_full(),
        };
        headers::rewrite_for_upstream(
            upstream_request,
            &self.parts.host,
            &self.parts.path_prefix,
            callers.credential_header(),
            credential,
        )
    }

    /// Runs when finX's response header arrives, before anything reaches the caller; the
    /// response passes through unchanged, except a 401 on a user route: finX no longer accepts
    /// that access token. A replayable request (see `replayable`) that has not been replayed
    /// yet gets a new credential (one refresh shared by every request that met the same 401,
    /// at most one per connection per `forced_refresh_interval`) and this attempt ends with a
    /// retryable error, so pingora sends it again; otherwise the token is dropped and the 401
    /// goes to the caller as it came.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        if status != 401 {
            return Ok(());
        }
        let (Some(key), Some(credential)) = (&ctx.connection, &ctx.credential) else {
            return Ok(());
        };
        let tokens = &self.parts.tokens;
        if !ctx.replayable || ctx.replayed || session.as_ref().retry_buffer_truncated() {
            tokens.reject(key, credential.version).await;
            return Ok(());
        }
        let Some(replacement) = tokens.replacement(key, credential.version).await else {
            return Ok(());
        };
        ctx.credential = Some(replacement);
        ctx.replayed = true;
        ctx.replay_pending = true;
        let mut replay = Error::explain(
            ErrorType::HTTPStatus(401),
            "finX rejected the access token; replaying with a new one",
        );
        replay.set_retry(true);
        Err(replay)
    }

    /// Runs on finX's response header on its way to the caller: returns the request's id.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        respond::echo_request_id(session, upstream_response)
    }

    /// Decides whether a failed upstream attempt is tried again. The gateway's own replay after
    /// a finX 401 always is (once); anything else follows pingora's default policy: only
    /// idempotent requests whose body is still buffered, on a reused connection.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        error: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut error = error.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.replay_pending) {
            error.set_retry(true);
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            error.set_retry(false);
        } else {
            error.retry.decide_reuse(client_reused);
        }
        error
    }

    /// Runs when proxying failed fatally: answers the JSON error for the failure (503 when finX
    /// is unreachable, 504 on timeouts) unless the caller is gone or a response already started.
    /// Returns the status for the access log.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let answer = GatewayError::from_proxy_failure(error);
        let status = match &answer {
            Some(gateway_error) if session.response_written().is_none() => {
                ctx.gateway_error = Some(gateway_error.code());
                if respond::send_error(session, gateway_error).await.is_err() {
                    tracing::debug!("could not write error response to the caller");
                }
                gateway_error.status().as_u16()
            }
            _ => 0,
        };
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Describes the request in pingora's own error log lines. The default prints the full
    /// target, and a callback's query carries finX's authorization code: only the method and
    /// route class are given.
    fn request_summary(&self, session: &Session, ctx: &Self::CTX) -> String {
        format!(
            "{} {}",
            session.req_header().method,
            ctx.route.map_or("-", Route::as_str)
        )
    }

    /// Runs last for every request: counts it in the metrics and writes one access (and audit)
    /// line, never a secret.
    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        let request = session.req_header();
        let route = ctx.route.map_or("-", Route::as_str);
        let upstream_secs = ctx.upstream_started.map(|t| t.elapsed().as_secs_f64());
        let total_secs = ctx.started.elapsed().as_secs_f64();
        let metrics = &self.parts.metrics;
        metrics.record_request(
            route,
            Metrics::method_label(&request.method),
            status,
            upstream_secs,
            total_secs,
        );
        match ctx.gateway_error {
            Some("caller_unauthenticated") => {
                metrics.record_caller(CallerDecision::Unauthenticated)
            }
            Some("caller_forbidden") => metrics.record_caller(CallerDecision::Forbidden),
            Some("caller_rate_limited") => metrics.record_caller(CallerDecision::RateLimited),
            _ if ctx.caller.is_some() => metrics.record_caller(CallerDecision::Allowed),
            _ => {}
        }
        tracing::info!(
            target: "finx_gateway::access",
            request_id = request
                .headers
                .get(respond::REQUEST_ID)
                .and_then(|id| id.to_str().ok())
                .unwrap_or("-"),
            method = %request.method,
            route,
            service = ctx.caller.as_ref().map_or("-", Caller::service),
            caller_iss = ctx.caller.as_ref().map_or("-", Caller::iss),
            caller_sub = ctx.caller.as_ref().map_or("-", Caller::sub),
            connection = ctx.connection.as_ref().map_or("-", ConnectionKey::as_str),
            status,
            upstream_status = ctx.upstream_status.unwrap_or(0),
            upstream_ms = upstream_secs.unwrap_or(0.0) * 1e3,
            total_ms = total_secs * 1e3,
            token = ctx.credential.as_ref().map_or("-", |c| c.source.as_str()),
            replayed = ctx.replayed,
            error = ctx.gateway_error.unwrap_or("-"),
            failure = error.map(|e| e.etype().as_str()).unwrap_or("-"),
        );
    }
}
