//! finX-shaped error answers.
//!
//! Every error the simulator sends goes through [`FinxError`], so all of them share the nested
//! body `{"error":{"code","group","name","message","description","data"},"status"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// One error answer in finX's nested format.
#[derive(Debug, Clone)]
pub(crate) struct FinxError {
    status: StatusCode,
    code: u32,
    name: &'static str,
    description: String,
    data: Map<String, Value>,
    retry_after_secs: Option<u64>,
    www_authenticate: Option<&'static str>,
}

impl FinxError {
    fn new(
        status: StatusCode,
        code: u32,
        name: &'static str,
        description: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            name,
            description: description.into(),
            data: Map::new(),
            retry_after_secs: None,
            www_authenticate: None,
        }
    }

    /// 400: the body or query could not be parsed at all.
    pub(crate) fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 1000, "bad_request", description)
    }

    /// 400: field validation failed. Each bad field is named with what is wrong with it, as a
    /// list of messages the way finX answers: `"data": {"redirect_uri": ["Not a valid URL."]}`.
    pub(crate) fn validation<F, M>(fields: impl IntoIterator<Item = (F, M)>) -> Self
    where
        F: Into<String>,
        M: Into<String>,
    {
        let data: Map<String, Value> = fields
            .into_iter()
            .map(|(field, message)| (field.into(), json!([message.into()])))
            .collect();
        let names: Vec<&str> = data.keys().map(String::as_str).collect();
        let mut error = Self::new(
            StatusCode::BAD_REQUEST,
            1000,
            "validation_error",
            format!("invalid fields: {}", names.join(", ")),
        );
        error.data = data;
        error
    }

    /// 400: one bad field.
    pub(crate) fn field(field: &str, message: &str) -> Self {
        Self::validation([(field, message)])
    }

    /// 401 on client-auth endpoints other than `/auth/token`.
    pub(crate) fn unauthorized_client() -> Self {
        let mut error = Self::new(
            StatusCode::UNAUTHORIZED,
            1002,
            "unauthorized",
            "missing or invalid client credentials (HTTP Basic)",
        );
        error.www_authenticate = Some("Basic realm=\"finX\"");
        error
    }

    /// 401 on `/auth/token`: OAuth's `invalid_client`.
    pub(crate) fn invalid_client() -> Self {
        let mut error = Self::new(
            StatusCode::UNAUTHORIZED,
            1002,
            "invalid_client",
            "missing or invalid client credentials (HTTP Basic)",
        );
        error.www_authenticate = Some("Basic realm=\"finX\"");
        error
    }

    /// 401 on `/rest/*`: unknown, expired or revoked access token.
    pub(crate) fn invalid_token(description: &str) -> Self {
        let mut error = Self::new(StatusCode::UNAUTHORIZED, 1003, "invalid_token", description);
        error.www_authenticate = Some("Bearer realm=\"finX\", error=\"invalid_token\"");
        error
    }

    /// 404.
    pub(crate) fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, 1004, "not_found", description)
    }

    /// 405.
    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            1005,
            "method_not_allowed",
            "method not allowed on this path",
        )
    }

    /// 409: e.g. a widget flow that has already finished.
    pub(crate) fn conflict(description: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, 1006, "conflict", description)
    }

    /// 413: body over the configured limit.
    pub(crate) fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            1007,
            "payload_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    }

    /// 429 with `Retry-After` (fault injection).
    pub(crate) fn too_many_requests(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            1008,
            "too_many_requests",
            "rate limit exceeded",
        );
        error.retry_after_secs = Some(retry_after_secs);
        error
    }

    /// 400 `invalid_grant`: unknown, used, expired, revoked or mismatched code or refresh token.
    pub(crate) fn invalid_grant(description: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 1010, "invalid_grant", description)
    }

    /// 400 `unsupported_grant_type`.
    pub(crate) fn unsupported_grant_type() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            1011,
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )
    }

    /// 400 `invalid_request`: a token request lacking a parameter.
    pub(crate) fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            1012,
            "invalid_request",
            description,
        )
    }

    /// 400 `invalid_scope`: a refresh asked for more than the grant has.
    pub(crate) fn invalid_scope() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            1013,
            "invalid_scope",
            "requested scope exceeds the granted scope",
        )
    }

    /// A 5xx answer (fault injection); `status` outside 500..=599 falls back to 500.
    pub(crate) fn server_error(status: u16) -> Self {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(StatusCode::is_server_error)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, 2000, "server_error", "simulated upstream failure")
    }

    /// The OAuth / finX error name, e.g. `invalid_grant`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }
}

impl IntoResponse for FinxError {
    fn into_response(self) -> Response {
        let group = if self.status.is_server_error() {
            "server"
        } else {
            "client"
        };
        let body = json!({
            "error": {
                "code": self.code,
                "group": group,
                "name": self.name,
                "message": self.name,
                "description": self.description,
                "data": Value::Object(self.data),
            },
            "status": self.status.as_u16(),
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.www_authenticate {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}
