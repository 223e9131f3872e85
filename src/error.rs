//! The one mapping from everything that can go wrong inside the gateway to the HTTP answer the
//! caller sees. Domain modules return their own typed errors ([`AuthError`], [`ConnectError`],
//! [`TokenError`], [`TokenFailure`], [`StoreError`]); they become a [`GatewayError`] (the
//! proxy listener) or an [`AdminError`] (the admin listener) through `From` here, and only this
//! module decides an error's status, code and message (`docs/architecture.md` lists them).
//!
//! Depends on the domain modules' error types only; only the proxy and the admin listener
//! depend on it.

use std::borrow::Cow;

use bytes::Bytes;
use http::StatusCode;

use crate::callers::AuthError;
use crate::connect::ConnectError;
use crate::store::{ConnectionKey, StoreError};
use crate::tokens::{TokenError, TokenFailure};

/// An error the gateway answers itself, as `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Malformed path, header, body or id.
    #[error("bad request: {0}")]
    BadRequest(Cow<'static, str>),
    /// Missing or invalid caller credential.
    #[error("caller unauthenticated: {reason}")]
    CallerUnauthenticated {
        reason: &'static str,
        www_authenticate: String,
    },
    /// The caller's policy does not allow this user, route or flow.
    #[error("caller forbidden: {0}")]
    CallerForbidden(&'static str),
    /// The caller exceeded its request rate.
    #[error("caller rate limited")]
    CallerRateLimited { retry_after_secs: u64 },
    /// `/auth/**` and other closed paths.
    #[error("route forbidden: {0}")]
    RouteForbidden(&'static str),
    /// Not in the route table.
    #[error("route not found")]
    RouteNotFound,
    /// No stored connection for that user or flow.
    #[error("connection not found")]
    ConnectionNotFound,
    /// The connection's refresh token is dead; the user must consent again.
    #[error("reauthorization required")]
    ReauthRequired,
    /// finX rejected our client credentials or our token request.
    #[error("gateway misconfigured")]
    GatewayMisconfigured,
    /// finX unreachable, 5xx or 429.
    #[error("upstream unavailable")]
    UpstreamUnavailable { retry_after_secs: u64 },
    /// finX did not answer in time.
    #[error("upstream timeout")]
    UpstreamTimeout { retry_after_secs: u64 },
    /// The token store cannot be read or written.
    #[error("token store unavailable")]
    StoreUnavailable,
    /// A bug: logged with detail where it happens, answered without it.
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    /// A 400 with `why` as its message.
    pub fn bad_request(why: impl Into<Cow<'static, str>>) -> Self {
        Self::BadRequest(why.into())
    }

    /// The answer to a proxying failure pingora reports; `None` when the caller went away and
    /// nothing useful can be written back.
    pub fn from_proxy_failure(error: &pingora::Error) -> Option<Self> {
        use pingora::{ErrorSource, ErrorType::*};
        match (error.esource(), error.etype()) {
            (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
            (ErrorSource::Downstream, _) => {
                Some(Self::bad_request("the request could not be read"))
            }
            (_, ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout) => {
                Some(Self::UpstreamTimeout {
                    retry_after_secs: 1,
                })
            }
            (ErrorSource::Upstream, _) => Some(Self::UpstreamUnavailable {
                retry_after_secs: 1,
            }),
            _ => Some(Self::Internal),
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::CallerUnauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::CallerForbidden(_) | Self::RouteForbidden(_) => StatusCode::FORBIDDEN,
            Self::CallerRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RouteNotFound | Self::ConnectionNotFound => StatusCode::NOT_FOUND,
            Self::ReauthRequired => StatusCode::FAILED_DEPENDENCY,
            Self::GatewayMisconfigured => StatusCode::BAD_GATEWAY,
            Self::UpstreamUnavailable { .. } | Self::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code (the README's error table).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::CallerUnauthenticated { .. } => "caller_unauthenticated",
            Self::CallerForbidden(_) => "caller_forbidden",
            Self::CallerRateLimited { .. } => "caller_rate_limited",
            Self::RouteForbidden(_) => "route_forbidden",
            Self::RouteNotFound => "route_not_found",
            Self::ConnectionNotFound => "connection_not_found",
            Self::ReauthRequired => "reauth_required",
            Self::GatewayMisconfigured => "gateway_misconfigured",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::StoreUnavailable => "store_unavailable",
            Self::Internal => "internal",
        }
    }

    /// Human text for the caller. Never contains a secret: every variant carries only static
    /// text or text the gateway composed itself.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Self::BadRequest(why) => why.clone(),
            Self::CallerUnauthenticated { reason, .. } => {
                Cow::Owned(format!("caller not authenticated: {reason}"))
            }
            Self::CallerForbidden(reason) => Cow::Owned(format!("caller not allowed: {reason}")),
            Self::CallerRateLimited { .. } => "caller exceeded its request rate".into(),
            Self::RouteForbidden(reason) => (*reason).into(),
            Self::RouteNotFound => "no such route on this gateway".into(),
            Self::ConnectionNotFound => "no finX connection is stored for this user or flow".into(),
            Self::ReauthRequired => {
                "the user's finX consent has lapsed; the user must connect their bank again".into()
            }
            Self::GatewayMisconfigured => {
                "finX rejected the gateway's client credentials or token request".into()
            }
            Self::UpstreamUnavailable { .. } => "finX is unavailable; retry later".into(),
            Self::UpstreamTimeout { .. } => "finX did not answer in time; retry later".into(),
            Self::StoreUnavailable => "the token store is unavailable; retry later".into(),
            Self::Internal => "internal error".into(),
        }
    }

    /// Seconds for a `Retry-After` header, where the caller should retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::UpstreamUnavailable { retry_after_secs }
            | Self::UpstreamTimeout { retry_after_secs }
            | Self::CallerRateLimited { retry_after_secs } => Some(*retry_after_secs),
            Self::StoreUnavailable => Some(1),
            _ => None,
        }
    }

    /// The `WWW-Authenticate` challenge of a 401.
    pub fn www_authenticate(&self) -> Option<&str> {
        match self {
            Self::CallerUnauthenticated {
                www_authenticate, ..
            } => Some(www_authenticate),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.message() }
        });
        Bytes::from(body.to_string())
    }
}

impl From<TokenError> for GatewayError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::NotFound => Self::ConnectionNotFound,
            TokenError::ReauthRequired => Self::ReauthRequired,
            TokenError::InvalidClient => Self::GatewayMisconfigured,
            TokenError::Unavailable { retry_after_secs } => {
                Self::UpstreamUnavailable { retry_after_secs }
            }
            TokenError::Timeout { retry_after_secs } => Self::UpstreamTimeout { retry_after_secs },
            TokenError::Store => Self::StoreUnavailable,
            TokenError::Internal => Self::Internal,
        }
    }
}

impl From<TokenFailure> for GatewayError {
    /// A finX call the gateway made for the caller (a flow start) that failed.
    fn from(failure: TokenFailure) -> Self {
        match failure {
            TokenFailure::Timeout => Self::UpstreamTimeout {
                retry_after_secs: 1,
            },
            TokenFailure::Unavailable {
                retry_after_secs, ..
            } => Self::UpstreamUnavailable { retry_after_secs },
            TokenFailure::InvalidGrant | TokenFailure::Rejected(_) => Self::GatewayMisconfigured,
        }
    }
}

impl From<ConnectError> for GatewayError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::BadRequest(why) => Self::BadRequest(why),
            ConnectError::State(state) => Self::BadRequest(state.to_string().into()),
            ConnectError::Caller(auth) => auth.into(),
            ConnectError::Upstream(failure) => failure.into(),
            ConnectError::Store => Self::StoreUnavailable,
            ConnectError::Internal => Self::Internal,
        }
    }
}

impl From<AuthError> for GatewayError {
    fn from(error: AuthError) -> Self {
        match &error {
            AuthError::Unauthenticated { reason } => Self::CallerUnauthenticated {
                reason,
                www_authenticate: error
                    .www_authenticate()
                    .unwrap_or_else(|| "Bearer realm=\"finx-gateway\"".to_owned()),
            },
            AuthError::Forbidden { reason } => Self::CallerForbidden(reason),
            AuthError::RateLimited { retry_after_secs } => Self::CallerRateLimited {
                retry_after_secs: *retry_after_secs,
            },
        }
    }
}

/// An error the admin listener answers (API, status page, probes), as
/// `{"error": {"code", "message"}}` or, on the status page, as HTML with the same status.
/// Messages never repeat what a request sent: a token pasted in the wrong place must not come
/// back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// A malformed path, query or body; `code` names what was wrong.
    #[error("bad admin request: {code}")]
    BadRequest {
        code: &'static str,
        message: Cow<'static, str>,
    },
    /// No admin credential, or a wrong one.
    #[error("admin request unauthenticated")]
    Unauthenticated,
    /// The status page's login form got a wrong credential.
    #[error("admin login refused")]
    LoginRefused,
    /// No such endpoint on the admin listener.
    #[error("no such admin endpoint")]
    NotFound,
    /// The endpoint exists but takes other methods (the `Allow` header's value).
    #[error("method not allowed")]
    MethodNotAllowed { allowed: &'static str },
    /// No stored connection under that key.
    #[error("connection not found")]
    ConnectionNotFound(ConnectionKey),
    /// A key rotation is already running.
    #[error("key rotation already running")]
    RotationRunning,
    /// A stored row no configured key opens (tampered, or sealed under an unknown key).
    #[error("stored connection unreadable")]
    ConnectionUnreadable(ConnectionKey),
    /// The token store cannot be read or written now.
    #[error("token store unavailable")]
    StoreUnavailable,
    /// `/readyz`: the store does not answer or the gateway is draining.
    #[error("not ready")]
    NotReady,
}

impl AdminError {
    /// A 400 with a machine-readable `code` and a message that does not repeat the input.
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated | Self::LoginRefused => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::ConnectionNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RotationRunning => StatusCode::CONFLICT,
            Self::ConnectionUnreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::StoreUnavailable | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code (`docs/admin-api.md`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::Unauthenticated => "admin_unauthenticated",
            Self::LoginRefused => "admin_login_refused",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::ConnectionNotFound(_) => "connection_not_found",
            Self::RotationRunning => "rotation_running",
            Self::ConnectionUnreadable(_) => "connection_unreadable",
            Self::StoreUnavailable => "store_unavailable",
            Self::NotReady => "not_ready",
        }
    }

    /// Human text: static, or composed by the gateway from a validated connection key.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Self::BadRequest { message, .. } => message.clone(),
            Self::Unauthenticated => {
                "this endpoint needs Authorization: Bearer <admin credential>".into()
            }
            Self::LoginRefused => "That is not the admin credential.".into(),
            Self::NotFound => "no such endpoint".into(),
            Self::MethodNotAllowed { allowed } => format!("this endpoint takes {allowed}").into(),
            Self::ConnectionNotFound(key) => format!("no stored connection {key}").into(),
            Self::RotationRunning => "a key rotation is already running".into(),
            Self::ConnectionUnreadable(key) => format!(
                "stored connection {key} is unreadable (tampered or encrypted with another key)"
            )
            .into(),
            Self::StoreUnavailable => "the token store is unavailable; try again".into(),
            Self::NotReady => "the gateway is not ready".into(),
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 from the API.
    pub fn www_authenticate(&self) -> Option<&'static str> {
        matches!(self, Self::Unauthenticated).then_some("Bearer realm=\"finx-gateway-admin\"")
    }

    /// The `Allow` header of a 405.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            Self::MethodNotAllowed { allowed } => Some(allowed),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code(), "message": self.message() } })
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(key) => Self::ConnectionNotFound(key),
            StoreError::Corrupt(key) => Self::ConnectionUnreadable(key),
            _ => Self::StoreUnavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_documented_status() {
        let cases = [
            (GatewayError::BadRequest("x".into()), 400, "bad_request"),
            (GatewayError::RouteForbidden("x"), 403, "route_forbidden"),
            (GatewayError::RouteNotFound, 404, "route_not_found"),
            (
                GatewayError::ConnectionNotFound,
                404,
                "connection_not_found",
            ),
            (GatewayError::ReauthRequired, 424, "reauth_required"),
            (
                GatewayError::GatewayMisconfigured,
                502,
                "gateway_misconfigured",
            ),
            (
                GatewayError::UpstreamUnavailable {
                    retry_after_secs: 3,
                },
                503,
                "upstream_unavailable",
            ),
            (
                GatewayError::UpstreamTimeout {
                    retry_after_secs: 1,
                },
                504,
                "upstream_timeout",
            ),
            (GatewayError::StoreUnavailable, 503, "store_unavailable"),
            (GatewayError::Internal, 500, "internal"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code);
            let body: serde_json::Value = serde_json::from_slice(&error.body()).unwrap();
            assert_eq!(body["error"]["code"], code);
        }
    }

    #[test]
    fn domain_errors_map_to_one_answer_each() {
        use crate::connect::state::StateError;
        let cases: [(GatewayError, u16); 5] = [
            (ConnectError::State(StateError::Expired).into(), 400),
            (ConnectError::Upstream(TokenFailure::Timeout).into(), 504),
            (ConnectError::Store.into(), 503),
            (
                ConnectError::Caller(AuthError::Forbidden { reason: "x" }).into(),
                403,
            ),
            (TokenError::ReauthRequired.into(), 424),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
    }

    #[test]
    fn admin_errors_have_one_status_and_code_each() {
        let key = ConnectionKey::user("alice").expect("valid key");
        let cases: [(AdminError, u16, &str); 10] = [
            (
                AdminError::bad_request("invalid_key", "x"),
                400,
                "invalid_key",
            ),
            (AdminError::Unauthenticated, 401, "admin_unauthenticated"),
            (AdminError::LoginRefused, 401, "admin_login_refused"),
            (AdminError::NotFound, 404, "not_found"),
            (
                AdminError::MethodNotAllowed { allowed: "GET" },
                405,
                "method_not_allowed",
            ),
            (
                StoreError::NotFound(key.clone()).into(),
                404,
                "connection_not_found",
            ),
            (AdminError::RotationRunning, 409, "rotation_running"),
            (
                StoreError::Corrupt(key).into(),
                500,
                "connection_unreadable",
            ),
            (AdminError::StoreUnavailable, 503, "store_unavailable"),
            (AdminError::NotReady, 503, "not_ready"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code);
            assert_eq!(error.body()["error"]["code"], code);
        }
        assert!(AdminError::Unauthenticated.www_authenticate().is_some());
        assert_eq!(
            AdminError::MethodNotAllowed { allowed: "POST" }.allow(),
            Some("POST")
        );
    }
}
