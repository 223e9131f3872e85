//! `POST /auth/token`: the authorization-code and refresh-token grants.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::{parse_json, LimitedBody, Shared};
use crate::sim::error::FinxError;
use crate::sim::faults::FaultTarget;
use crate::sim::grants::IssuedTokens;
use crate::sim::server::DropConnection;
use crate::sim::stats::bump;

/// The token request's parameters, from a JSON or a form-encoded body.
struct TokenParams(Map<String, Value>);

impl TokenParams {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, FinxError> {
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        if is_form {
            let pairs = url::form_urlencoded::parse(body)
                .into_owned()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            return Ok(TokenParams(pairs));
        }
        match parse_json::<Value>(body)? {
            Value::Object(map) => Ok(TokenParams(map)),
            _ => Err(FinxError::bad_request("request body must be a JSON object")),
        }
    }

    /// A string parameter; present but not a string counts as malformed.
    fn get(&self, key: &str) -> Result<Option<&str>, FinxError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(FinxError::invalid_request(format!(
                "{key} must be a string"
            ))),
        }
    }

    fn require(&self, key: &str) -> Result<&str, FinxError> {
        self.get(key)?
            .filter(|text| !text.is_empty())
            .ok_or_else(|| FinxError::invalid_request(format!("{key} is required")))
    }
}

/// Handles `POST /auth/token`.
pub(crate) async fn token(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<LimitedBody, FinxError>,
) -> Response {
    bump(&state.counters.token_requests);
    match grant(&state, &headers, body).await {
        Ok(tokens) => {
            // The grant has taken effect; only its answer is late.
            let delay = state.faults.answer_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut response = success(&tokens);
            if state.faults.lose_response() {
                bump(&state.counters.lost_responses);
                response.extensions_mut().insert(DropConnection);
            }
            response
        }
        Err(error) => {
            match error.name() {
                "invalid_grant" => bump(&state.counters.invalid_grant_responses),
                "invalid_client" => bump(&state.counters.invalid_client_responses),
                _ => {}
            }
            error.into_response()
        }
    }
}

async fn grant(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<LimitedBody, FinxError>,
) -> Result<IssuedTokens, FinxError> {
    state.faults.before(FaultTarget::Token).await?;
    if !state.client_authenticated(headers) {
        return Err(FinxError::invalid_client());
    }
    let LimitedBody(body) = body?;
    let params = TokenParams::parse(headers, &body)?;
    let client_id = state.config.client_id.as_str();
    let now = state.now();
    match params.require("grant_type")? {
        "authorization_code" => {
            let code = params.require("code")?;
            // Optional, as in finX's own examples; an empty one (the multibanking guide's
            // placeholder `"redirect_uri": ""`) counts as not sent. A non-empty one must match.
            let redirect_uri = params.get("redirect_uri")?.filter(|uri| !uri.is_empty());
            state
                .grants
                .exchange_code(client_id, code, redirect_uri, now, &state.counters)
        }
        "refresh_token" => {
            let refresh_token = params.require("refresh_token")?;
            let scope = params.get("scope")?;
            state
                .grants
                .refresh(client_id, refresh_token, scope, now, &state.counters)
        }
        _ => Err(FinxError::unsupported_grant_type()),
    }
}

fn success(tokens: &IssuedTokens) -> Response {
    let mut body = json!({
        "access_token": tokens.access_token,
        "expires_in": tokens.expires_in,
        "scope": tokens.scope,
        "token_type": "Bearer",
    });
    if let (Some(refresh), Some(map)) = (&tokens.refresh_token, body.as_object_mut()) {
        map.insert("refresh_token".into(), Value::String(refresh.clone()));
    }
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}
