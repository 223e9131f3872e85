//! The `/_sim/*` control plane: counters, seen headers, direct grants, clock, revocation, faults,
//! reset and widget completion. Mounted only when the simulator runs with `--control`.
//!
//! Unlike finX's own endpoints it is strict about what it is sent: an unknown body field or
//! query parameter is a 400 naming it, so a test that misspells a fault or an option fails
//! instead of silently proving nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_value, parse_json, LimitedBody, QueryPairs, Segment, Shared};
use crate::sim::error::FinxError;
use crate::sim::faults::Faults;
use crate::sim::flows::Outcome;
use crate::sim::grants::{CodeOrigin, Owner};

type ControlResult = Result<Response, FinxError>;

fn ok(value: &Value) -> Response {
    json_value(StatusCode::OK, value)
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Parses a control-plane body into a `deny_unknown_fields` type; an empty body counts as `{}`.
/// Unknown and missing fields are 400s naming the field.
fn control_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FinxError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let value: Value = parse_json(body)?;
    serde_json::from_value(value).map_err(|error| {
        // serde's wording: "unknown field `x`, expected …" / "missing field `x`".
        let message = error.to_string();
        let named = |prefix: &str| message.strip_prefix(prefix)?.split('`').next();
        if let Some(field) = named("unknown field `") {
            FinxError::field(field, "Unknown field.")
        } else if let Some(field) = named("missing field `") {
            FinxError::field(field, "This field is required.")
        } else {
            FinxError::bad_request(format!("unexpected body: {message}"))
        }
    })
}

/// Refuses query parameters other than `known`.
fn known_query(query: &QueryPairs, known: &[&str]) -> Result<(), FinxError> {
    match query
        .0
        .iter()
        .find(|(key, _)| !known.contains(&key.as_str()))
    {
        Some((key, _)) => Err(FinxError::field(key, "Unknown query parameter.")),
        None => Ok(()),
    }
}

/// A body that must be empty or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// `GET /_sim/stats` or `GET /_sim/stats?user=ID`.
pub(crate) async fn stats(State(state): State<Shared>, query: QueryPairs) -> ControlResult {
    known_query(&query, &["user"])?;
    Ok(match query.get("user") {
        Some(user) => ok(&to_value(&state.grants.user_stats(user))),
        None => ok(&to_value(&state.counters.snapshot(state.faults.injected()))),
    })
}

/// `GET /_sim/seen-headers?limit=N`: the last N requests (default 20), oldest first.
pub(crate) async fn seen_headers(State(state): State<Shared>, query: QueryPairs) -> ControlResult {
    known_query(&query, &["limit"])?;
    let limit = match query.get("limit") {
        None => 20,
        Some(text) => text
            .parse()
            .map_err(|_| FinxError::field("limit", "Must be a whole number."))?,
    };
    Ok(ok(&json!({ "requests": state.seen.last(limit) })))
}

/// `DELETE /_sim/seen-headers`.
pub(crate) async fn clear_seen_headers(State(state): State<Shared>) -> Response {
    state.seen.clear();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    user_id: Option<String>,
    flow_id: Option<String>,
}

/// `POST /_sim/grants` with `{"user_id"}` (ongoing) or `{"flow_id"}` (that flow's consent).
pub(crate) async fn create_grant(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let request: GrantRequest = control_body(&body)?;
    let now = state.now();
    let origin = match (request.user_id, request.flow_id) {
        (Some(user), None) if !user.is_empty() => CodeOrigin {
            client_id: state.config.client_id.clone(),
            redirect_uri: None,
            owner: Owner::User(user.as_str().into()),
            vanishes_at: None,
        },
        (None, Some(flow_id)) => {
            let flow = state.flows.consent(&flow_id, now)?;
            CodeOrigin {
                client_id: flow.client_id.clone(),
                redirect_uri: flow.request.redirect_uri.clone(),
                owner: flow.owner(),
                vanishes_at: flow.vanishes_at,
            }
        }
        _ => {
            return Err(FinxError::bad_request(
                "send exactly one of user_id or flow_id",
            ))
        }
    };
    let tokens = state.grants.seed(&origin, now, &state.counters);
    Ok(ok(&json!({
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_in": tokens.expires_in,
        "scope": tokens.scope,
        "token_type": "Bearer",
    })))
}

/// `GET /_sim/clock`: the simulator's current Unix time.
pub(crate) async fn clock(State(state): State<Shared>) -> Response {
    ok(&json!({ "now": state.now() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    seconds: i64,
}

/// `POST /_sim/clock/advance` with `{"seconds": N}`.
pub(crate) async fn advance_clock(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let Advance { seconds } = control_body(&body)?;
    state.clock.advance(seconds);
    Ok(ok(&json!({ "now": state.now() })))
}

/// `POST /_sim/expire-access-tokens`: every access token issued so far stops working.
pub(crate) async fn expire_access_tokens(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let NoFields {} = control_body(&body)?;
    state.grants.expire_access_tokens();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    user_id: String,
}

/// `POST /_sim/revoke` with `{"user_id"}`: revokes all of the user's grant families.
pub(crate) async fn revoke(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let Revoke { user_id } = control_body(&body)?;
    let revoked = state.grants.revoke_user(&user_id, &state.counters);
    Ok(ok(&json!({ "families_revoked": revoked })))
}

/// `GET /_sim/faults`.
pub(crate) async fn faults(State(state): State<Shared>) -> Response {
    ok(&to_value(&state.faults.get()))
}

/// `POST /_sim/faults` with a [`Faults`] object (missing fields are off, unknown ones a 400);
/// replaces the settings.
pub(crate) async fn set_faults(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let faults: Faults = control_body(&body)?;
    state.faults.set(faults);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Reset {
    state: bool,
}

/// `POST /_sim/reset`: clears faults; with `{"state": true}` also drops flows, codes, grants,
/// counters and seen headers. The clock offset is kept (time never runs backwards).
pub(crate) async fn reset(
    State(state): State<Shared>,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let reset: Reset = control_body(&body)?;
    state.faults.set(Faults::default());
    if reset.state {
        state.flows.clear();
        state.grants.clear();
        state.counters.clear();
        state.seen.clear();
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Complete {
    outcome: String,
}

/// `POST /_sim/widget/{flow_id}/complete` with `{"outcome": "success"|"abort"|"error"}`:
/// what pressing a widget button does, answered as `{"redirect": URL}` (`null` when the flow
/// has no redirect_uri).
pub(crate) async fn complete_widget(
    State(state): State<Shared>,
    Segment(flow_id): Segment,
    body: Result<LimitedBody, FinxError>,
) -> ControlResult {
    let LimitedBody(body) = body?;
    let Complete { outcome } = control_body(&body)?;
    let outcome = Outcome::parse(&outcome)
        .ok_or_else(|| FinxError::field("outcome", "Must be success, abort or error."))?;
    let redirect = state
        .flows
        .complete(&flow_id, outcome, &state.grants, state.now())?;
    Ok(ok(&json!({ "redirect": redirect.map(String::from) })))
}
