//! `/rest/*` user-data endpoints: Bearer checks, then deterministic data.
//!
//! `GET /rest/accounts` is the benchmarked hot path: one sharded read lock, a few atomics and a
//! clone of a prebuilt body.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{json_bytes, json_value, QueryPairs, Segment, Shared};
use crate::sim::data::{in_date_range, is_date_filter, Frequency, TimelineQuery};
use crate::sim::error::FinxError;
use crate::sim::faults::FaultTarget;
use crate::sim::flows::{Flow, FlowKind};
use crate::sim::grants::{Family, Owner};
use crate::sim::reports;
use crate::sim::stats::bump;

type RestResult = Result<Response, FinxError>;

/// Checks the bearer token of a `/rest/*` call and returns its grant family.
async fn authorize(state: &Shared, headers: &HeaderMap) -> Result<Arc<Family>, FinxError> {
    bump(&state.counters.rest_requests);
    state.faults.before(FaultTarget::Data).await?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let result = match token {
        Some(token) if !token.is_empty() => state.grants.authenticate(token, state.now()),
        _ => Err("missing bearer token"),
    };
    result.map_err(|reason| {
        bump(&state.counters.rest_unauthorized);
        FinxError::invalid_token(reason)
    })
}

/// `count` / `offset` paging; `count` defaults to and is capped at 1000.
fn page<T: Clone>(items: &[T], query: &QueryPairs) -> Result<Vec<T>, FinxError> {
    let number = |key: &str, default: usize, max: usize| -> Result<usize, FinxError> {
        match query.get(key) {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    FinxError::field(key, &format!("Must be an integer between 0 and {max}."))
                }),
        }
    };
    let offset = number("offset", 0, usize::MAX)?;
    let count = number("count", 1000, 1000)?;
    Ok(items.iter().skip(offset).take(count).cloned().collect())
}

/// An optional date filter: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
fn date_filter<'q>(query: &'q QueryPairs, key: &str) -> Result<Option<&'q str>, FinxError> {
    match query.get(key) {
        Some(date) if !is_date_filter(date) => Err(FinxError::field(
            key,
            "Must be a date (YYYY, YYYY-MM or YYYY-MM-DD).",
        )),
        other => Ok(other),
    }
}

/// An optional comma-separated list.
fn list_filter(query: &QueryPairs, key: &str) -> Option<Vec<String>> {
    query
        .get(key)
        .map(|list| list.split(',').map(str::to_owned).collect())
}

fn ok(value: &Value) -> Response {
    json_value(StatusCode::OK, value)
}

/// The `{account_id}` of account-scoped routes (`/rest/accounts/{account_id}/…`), if any.
pub(crate) struct AccountScope(Option<String>);

impl AccountScope {
    /// The scoped account id, checked to be one of the family's accounts.
    fn account<'a>(&'a self, family: &Family) -> Result<Option<&'a str>, FinxError> {
        match &self.0 {
            Some(id) if family.data.account(id).is_none() => {
                Err(FinxError::not_found("unknown account"))
            }
            scope => Ok(scope.as_deref()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AccountScope {
    type Rejection = FinxError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Routes without parameters have no map; they are unscoped.
        let params = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Path(params)| params)
            .unwrap_or_default();
        Ok(AccountScope(params.get("account_id").cloned()))
    }
}

/// `GET /rest/accounts`.
pub(crate) async fn accounts(State(state): State<Shared>, headers: HeaderMap) -> RestResult {
    let family = authorize(&state, &headers).await?;
    Ok(json_bytes(family.data.accounts_json.clone()))
}

/// `GET /rest/accounts/{account_id}`.
pub(crate) async fn account(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let account = family
        .data
        .account(&id)
        .ok_or_else(|| FinxError::not_found("unknown account"))?;
    Ok(ok(account))
}

fn transactions_answer(
    family: &Family,
    account_id: Option<&str>,
    query: &QueryPairs,
) -> RestResult {
    let since = date_filter(query, "since")?;
    let until = date_filter(query, "until")?;
    let ascending = match query.get("sort") {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return Err(FinxError::field("sort", "Must be asc or desc.")),
    };
    let mut selected: Vec<_> = family
        .data
        .transactions()
        .iter()
        .filter(|tx| account_id.is_none_or(|id| tx.account_id == id))
        .filter(|tx| in_date_range(&tx.booking_date, since, until))
        .collect();
    if ascending {
        selected.reverse();
    }
    let total = selected.len();
    let paged = page(&selected, query)?;
    let mut body = json!({ "transactions": paged });
    if matches!(query.get("include_statistics"), Some("true" | "1")) {
        let (income, expenses) = selected.iter().fold((0.0, 0.0), |(i, e), tx| {
            if tx.amount >= 0.0 {
                (i + tx.amount, e)
            } else {
                (i, e + tx.amount)
            }
        });
        body["statistics"] = json!({
            "total_count": total,
            "income": (income * 100.0_f64).round() / 100.0,
            "expenses": (expenses * 100.0_f64).round() / 100.0,
            "currency": "EUR",
        });
    }
    Ok(ok(&body))
}

/// `GET /rest/transactions` and `GET /rest/accounts/{account_id}/transactions`.
pub(crate) async fn transactions(
    State(state): State<Shared>,
    headers: HeaderMap,
    scope: AccountScope,
    query: QueryPairs,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    transactions_answer(&family, scope.account(&family)?, &query)
}

/// `GET /rest/securities`.
pub(crate) async fn securities(
    State(state): State<Shared>,
    headers: HeaderMap,
    query: QueryPairs,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    Ok(ok(
        &json!({ "securities": page(family.data.securities(), &query)? }),
    ))
}

fn contracts_answer(family: &Family, account_id: Option<&str>, query: &QueryPairs) -> RestResult {
    let contracts: Vec<Value> = family
        .data
        .contracts()
        .into_iter()
        .filter(|c| account_id.is_none_or(|id| c["account_id"] == id))
        .collect();
    Ok(ok(&Value::Array(page(&contracts, query)?)))
}

/// `GET /rest/contracts` and `GET /rest/accounts/{account_id}/contracts`.
pub(crate) async fn contracts(
    State(state): State<Shared>,
    headers: HeaderMap,
    scope: AccountScope,
    query: QueryPairs,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    contracts_answer(&family, scope.account(&family)?, &query)
}

/// `GET /rest/contracts/{id}`.
pub(crate) async fn contract(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let contract = family
        .data
        .contracts()
        .into_iter()
        .find(|c| c["id"] == id.as_str())
        .ok_or_else(|| FinxError::not_found("unknown contract"))?;
    Ok(ok(&contract))
}

/// `DELETE /rest/contracts/{id}`: 204, then the contract is gone for this owner.
/// A method the path does not support: 401 for a missing or invalid token (authentication
/// comes first), else 405.
pub(crate) async fn method_not_allowed(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> RestResult {
    authorize(&state, &headers).await?;
    Err(FinxError::method_not_allowed())
}

pub(crate) async fn delete_contract(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    if family.data.delete_contract(&id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(FinxError::not_found("unknown contract"))
    }
}

/// `GET /rest/payment-partners` and `GET /rest/accounts/{account_id}/payment-partners`.
pub(crate) async fn payment_partners(
    State(state): State<Shared>,
    headers: HeaderMap,
    scope: AccountScope,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let account = scope.account(&family)?;
    Ok(ok(&Value::Array(family.data.payment_partners(account))))
}

/// `GET /rest/categories`.
pub(crate) async fn categories(State(state): State<Shared>, headers: HeaderMap) -> RestResult {
    let family = authorize(&state, &headers).await?;
    Ok(ok(&Value::Array(family.data.categories(None))))
}

/// `GET /rest/timeline?since&until&frequency&currency&accounts&categories&payment_partners`:
/// the totals per period (`timeline`) and the same per account (`accounts[]`).
pub(crate) async fn timeline(
    State(state): State<Shared>,
    headers: HeaderMap,
    query: QueryPairs,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let frequency = match query.get("frequency") {
        None => Frequency::Monthly,
        Some(text) => Frequency::parse(text).ok_or_else(|| {
            FinxError::field(
                "frequency",
                "Must be daily, weekly, monthly, quarterly or yearly.",
            )
        })?,
    };
    if query.get("currency").is_some_and(|c| c != "EUR") {
        return Err(FinxError::field("currency", "Only EUR is available."));
    }
    let categories = match list_filter(&query, "categories") {
        None => None,
        Some(ids) => Some(
            ids.iter()
                .map(|id| id.parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    FinxError::field(
                        "categories",
                        "Must be a comma-separated list of category ids.",
                    )
                })?,
        ),
    };
    let (timeline, accounts) = family.data.timeline(&TimelineQuery {
        frequency,
        since: date_filter(&query, "since")?,
        until: date_filter(&query, "until")?,
        accounts: list_filter(&query, "accounts"),
        categories,
        payment_partners: list_filter(&query, "payment_partners"),
    });
    Ok(ok(&json!({
        "frequency": frequency.name(),
        "currency": "EUR",
        "timeline": timeline,
        "accounts": accounts,
    })))
}

/// A finished flow of one of `kinds` that `family` may read.
fn readable_flow(
    state: &Shared,
    family: &Family,
    flow_id: &str,
    kinds: &[FlowKind],
) -> Result<Flow, FinxError> {
    let now = state.now();
    state
        .flows
        .get(flow_id, now)
        .filter(|flow| kinds.contains(&flow.kind) && flow.readable_by(&family.owner, now))
        .ok_or_else(|| FinxError::not_found("no such report"))
}

fn income_report_of(state: &Shared, family: &Family, flow_id: &str) -> RestResult {
    let flow = readable_flow(state, family, flow_id, &[FlowKind::OnetimeIncomeReport])?;
    Ok(ok(&reports::income_report(&family.data, &flow)))
}

/// `GET /rest/income-reports/{flow_id}`.
pub(crate) async fn income_report(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    income_report_of(&state, &family, &id)
}

/// `GET /rest/income-report` (older spelling): the report of the token's own one-time flow.
pub(crate) async fn own_income_report(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    match &family.owner {
        Owner::Flow(flow_id) => income_report_of(&state, &family, flow_id),
        Owner::User(_) => Err(FinxError::not_found("no such report")),
    }
}

/// `GET /rest/account-verifications/{flow_id}`.
pub(crate) async fn account_verification(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let flow = readable_flow(
        &state,
        &family,
        &id,
        &[FlowKind::OnetimeAccountVerification],
    )?;
    Ok(ok(&reports::account_verification(&family.data, &flow)))
}

/// `GET /rest/risk-reports/{flow_id}`.
pub(crate) async fn risk_report(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> RestResult {
    let family = authorize(&state, &headers).await?;
    let flow = readable_flow(
        &state,
        &family,
        &id,
        &[FlowKind::OnetimeRiskReport, FlowKind::OngoingRiskReport],
    )?;
    Ok(ok(&reports::risk_report(&family.data, &flow)))
}
