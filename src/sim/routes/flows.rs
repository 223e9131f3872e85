//! Flow initiation endpoints (`/onetime/*`, `/ongoing/*`): Basic client auth, body validation,
//! and the widget link in the 201 answer.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::{json_value, parse_json, LimitedBody, Shared};
use crate::sim::error::FinxError;
use crate::sim::flows::{validate, FlowKind};
use crate::sim::stats::bump;

/// Handles `POST /onetime/*` and `POST /ongoing/*` for one flow kind.
pub(crate) async fn initiate(
    kind: FlowKind,
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<LimitedBody, FinxError>,
) -> Result<Response, FinxError> {
    if !state.client_authenticated(&headers) {
        return Err(FinxError::unauthorized_client());
    }
    let LimitedBody(body) = body?;
    let request = validate(kind, &parse_json::<Value>(&body)?)?;
    let now = state.now();
    let onetime_ttl = i64::try_from(state.config.onetime_data_ttl.as_secs()).unwrap_or(i64::MAX);
    let flow = state
        .flows
        .create(kind, request, &state.config.client_id, now, onetime_ttl);
    bump(&state.counters.widget_links_created);
    tracing::debug!(flow_id = %flow.id, ?kind, "sim: flow initiated");
    let location = format!(
        "{}/widget/{}?token={}",
        state.base_url, flow.id, flow.widget_token
    );
    Ok(json_value(
        StatusCode::CREATED,
        &json!({ "location": location, "id": flow.id }),
    ))
}
