//! The pingora `ProxyHttp` implementation. Each phase method only delegates: routing to
//! [`routes`], the upstream rewrite to [`headers`], credentials to the token manager, answers to
//! [`respond`]. All async work happens once per request, in `request_filter`.

pub mod headers;
pub mod respond;
pub mod routes;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::callers::{Caller, CallerAuth};
use crate::clock::{Clock, SystemClock};
use crate::connect::{ConnectService, FlowKind, MAX_FLOW_BODY};
use crate::error::GatewayError;
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
    pub callers: Arc<CallerAuth>,
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
}

/// What one request learned on its way through the phases.
pub struct RequestCtx {
    started: Instant,
    route: Option<Route>,
    caller: Option<Caller>,
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
        let path = routes::request_path(request.raw_path())?;
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
            Route::Demo => return crate::demo::page::serve(session, parts).await,
            _ => {}
        }

        // Caller JWTs are judged by the wall clock, not the token clock tests may move.
        let caller = parts
            .callers
            .authenticate(&request.headers, SystemClock.now())?;
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
                let key = self.connection_key(request, &caller)?;
                ctx.replayable = replayable(request, parts.replay_body_limit);
                ctx.connection = Some(key.clone());
                ctx.credential = Some(parts.tokens.bearer(&key).await?);
                Ok(false)
            }
            Route::ClientData => {
                caller.authorize_route(&request.method, path)?;
                Ok(false)
            }
            Route::Health | Route::Demo => Err(GatewayError::Internal),
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
            return Err(GatewayError::BadRequest(
                "connect flows are started with POST".into(),
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
        let query = query_of(session.req_header().raw_path())?.to_owned();
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
        let mut query = query_of(session.req_header().raw_path())?.to_owned();
        if query.is_empty() {
            let body = read_body(session, MAX_FLOW_BODY).await?;
            query = String::from_utf8(body)
                .map_err(|_| GatewayError::BadRequest("the callback body is not UTF-8".into()))?;
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
    /// caller's own flows only.
    fn connection_key(
        &self,
        request: &RequestHeader,
        caller: &Caller,
    ) -> Result<ConnectionKey, GatewayError> {
        let single = |name: &HeaderName| -> Result<Option<&str>, GatewayError> {
            let mut values = request.headers.get_all(name).iter();
            let Some(first) = values.next() else {
                return Ok(None);
            };
            if values.next().is_some() {
                return Err(GatewayError::BadRequest(
                    format!("{name} must be sent once").into(),
                ));
            }
            first
                .to_str()
                .map(Some)
                .map_err(|_| GatewayError::BadRequest(format!("{name} is not ASCII").into()))
        };
        let invalid = |name: &HeaderName| {
            GatewayError::BadRequest(
                format!("{name}: ids are 1 to 128 characters of A-Z a-z 0-9 . _ @ -").into(),
            )
        };
        let (user_header, flow_header) = (&self.parts.user_header, &self.parts.flow_header);
        match (single(user_header)?, single(flow_header)?) {
            (Some(user), None) => {
                let key = ConnectionKey::user(user).map_err(|_| invalid(user_header))?;
                caller.authorize_user(user)?;
                Ok(key)
            }
            (None, Some(flow)) => {
                ConnectionKey::flow(caller.service(), flow).map_err(|_| invalid(flow_header))
            }
            (Some(_), Some(_)) => Err(GatewayError::BadRequest(
                format!("send either {user_header} or {flow_header}, not both").into(),
            )),
            (None, None) => Err(GatewayError::BadRequest(
                format!("{user_header} or {flow_header} is required for /rest").into(),
            )),
        }
    }

    /// The gateway error for a proxying failure pingora reports.
    fn proxy_failure(error: &Error) -> Option<GatewayError> {
        use ErrorType::*;
        match (error.esource(), error.etype()) {
            // The caller went away or sent garbage: nothing useful can be written back.
            (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
            (ErrorSource::Downstream, _) => Some(GatewayError::BadRequest(
                "the request could not be read".into(),
            )),
            (_, ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout) => {
                Some(GatewayError::UpstreamTimeout {
                    retry_after_secs: 1,
                })
            }
            (ErrorSource::Upstream, _) => Some(GatewayError::UpstreamUnavailable {
                retry_after_secs: 1,
            }),
            _ => Some(GatewayError::Internal),
        }
    }
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

/// The query string of a raw request target ("" when there is none).
fn query_of(raw_target: &[u8]) -> Result<&str, GatewayError> {
    let target = std::str::from_utf8(raw_target)
        .map_err(|_| GatewayError::BadRequest("the request target is not UTF-8".into()))?;
    Ok(target.split_once('?').map_or("", |(_, query)| query))
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> Result<Vec<u8>, GatewayError> {
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| GatewayError::BadRequest("the request body could not be read".into()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(GatewayError::BadRequest(
                format!("the request body is larger than {limit} bytes").into(),
            ));
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

    /// Runs once per request, before anything goes upstream: normalises and classifies the path,
    /// answers the gateway's own endpoints, resolves the connection and awaits its credential
    /// (cache hit, stored token or the shared refresh). Returns `Ok(true)` when the gateway has
    /// answered (health, or a JSON error), `Ok(false)` to proxy.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
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
        headers::rewrite_for_upstream(
            upstream_request,
            &self.parts.host,
            &self.parts.path_prefix,
            self.parts.callers.credential_header(),
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
        let answer = Self::proxy_failure(error);
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

    /// Runs last for every request: one access (and audit) line, never a secret.
    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        let request = session.req_header();
        tracing::info!(
            target: "finx_gateway::access",
            method = %request.method,
            route = ctx.route.map_or("-", Route::as_str),
            service = ctx.caller.as_ref().map_or("-", Caller::service),
            caller_iss = ctx.caller.as_ref().map_or("-", Caller::iss),
            caller_sub = ctx.caller.as_ref().map_or("-", Caller::sub),
            connection = ctx.connection.as_ref().map_or("-", ConnectionKey::as_str),
            status,
            upstream_status = ctx.upstream_status.unwrap_or(0),
            upstream_ms = ctx.upstream_started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
            total_ms = ctx.started.elapsed().as_secs_f64() * 1e3,
            token = ctx.credential.as_ref().map_or("-", |c| c.source.as_str()),
            replayed = ctx.replayed,
            error = ctx.gateway_error.unwrap_or("-"),
            failure = error.map(|e| e.etype().as_str()).unwrap_or("-"),
        );
    }
}
