//! The simulator's HTTP surface: one axum router over [`SimState`], plus the extractors and
//! response helpers every handler shares (size-limited bodies, finX-shaped errors).

mod client_data;
mod control;
mod flows;
mod rest;
mod token;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::FinxError;
use super::state::SimState;
use super::widget;

/// Shared state as handlers receive it.
pub(crate) type Shared = Arc<SimState>;

/// Builds the full router; the `/_sim/*` control plane exists only when enabled.
pub(crate) fn router(state: Shared) -> Router {
    let mut router: Router<Shared> = Router::new()
        .route("/auth/token", post(token::token))
        .route("/widget/{flow_id}", get(widget::page).post(widget::submit))
        .route("/category-tree", get(client_data::category_tree))
        .route("/rpc/categorize", post(client_data::categorize))
        .route("/payment-receipts/{id}", get(client_data::payment_receipt));
    let rest = Router::new()
        .route("/rest/accounts", get(rest::accounts))
        .route("/rest/accounts/{account_id}", get(rest::account))
        .route(
            "/rest/accounts/{account_id}/transactions",
            get(rest::transactions),
        )
        .route(
            "/rest/accounts/{account_id}/contracts",
            get(rest::contracts),
        )
        .route(
            "/rest/accounts/{account_id}/payment-partners",
            get(rest::payment_partners),
        )
        .route(
            "/rest/accounts/{account_id}/categories",
            get(rest::categories),
        )
        .route("/rest/transactions", get(rest::transactions))
        .route("/rest/securities", get(rest::securities))
        .route("/rest/contracts", get(rest::contracts))
        .route(
            "/rest/contracts/{id}",
            get(rest::contract).delete(rest::delete_contract),
        )
        .route("/rest/payment-partners", get(rest::payment_partners))
        .route("/rest/categories", get(rest::categories))
        .route("/rest/timeline", get(rest::timeline))
        .route("/rest/income-report", get(rest::own_income_report))
        .route("/rest/income-reports/{flow_id}", get(rest::income_report))
        .route(
            "/rest/account-verifications/{flow_id}",
            get(rest::account_verification),
        )
        .route("/rest/risk-reports/{flow_id}", get(rest::risk_report))
        // finX authenticates before it routes: a method a /rest path does not support gets
        // 401 with a bad token, 405 with a good one.
        .method_not_allowed_fallback(rest::method_not_allowed);
    router = router.merge(rest);
    for (kind, path) in super::flows::FlowKind::ALL {
        router = router.route(
            path,
            post(move |state, headers, body| flows::initiate(kind, state, headers, body)),
        );
    }
    if state.config.control {
        router = router
            .route("/_sim/stats", get(control::stats))
            .route(
                "/_sim/seen-headers",
                get(control::seen_headers).delete(control::clear_seen_headers),
            )
            .route("/_sim/grants", post(control::create_grant))
            .route("/_sim/clock", get(control::clock))
            .route("/_sim/clock/advance", post(control::advance_clock))
            .route(
                "/_sim/expire-access-tokens",
                post(control::expire_access_tokens),
            )
            .route("/_sim/revoke", post(control::revoke))
            .route(
                "/_sim/faults",
                get(control::faults).post(control::set_faults),
            )
            .route("/_sim/reset", post(control::reset))
            .route(
                "/_sim/widget/{flow_id}/complete",
                post(control::complete_widget),
            );
    }
    router
        .fallback(|| async { FinxError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { FinxError::method_not_allowed() })
        .with_state(state)
}

/// A request body read up to the configured limit (413 beyond it).
pub(crate) struct LimitedBody(pub Bytes);

impl FromRequest<Shared> for LimitedBody {
    type Rejection = FinxError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(FinxError::payload_too_large(limit));
        }
        match axum::body::to_bytes(request.into_body(), limit).await {
            Ok(bytes) => Ok(LimitedBody(bytes)),
            Err(error) => {
                if error.into_inner().is::<http_body_util::LengthLimitError>() {
                    Err(FinxError::payload_too_large(limit))
                } else {
                    Err(FinxError::bad_request("could not read the request body"))
                }
            }
        }
    }
}

/// Parses a JSON body; malformed JSON is a finX 400, never a panic.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, FinxError> {
    serde_json::from_slice(body)
        .map_err(|error| FinxError::bad_request(format!("malformed JSON body: {error}")))
}

/// A path segment; undecodable segments become a finX 400 instead of axum's plain-text one.
pub(crate) struct Segment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = FinxError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(segment)| Segment(segment))
            .map_err(|_| FinxError::bad_request("malformed path"))
    }
}

/// The query string as decoded key/value pairs.
pub(crate) struct QueryPairs(pub Vec<(String, String)>);

impl QueryPairs {
    /// The value of `key`; an empty one (`?since=`) counts as not sent, as a client template
    /// with an enabled but unfilled parameter sends it.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|value| !value.is_empty())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = FinxError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let pairs = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(QueryPairs(pairs))
    }
}

/// 200 with a prebuilt JSON body.
pub(crate) fn json_bytes(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A JSON answer with a status.
pub(crate) fn json_value(status: StatusCode, value: &Value) -> Response {
    (status, axum::Json(value)).into_response()
}
