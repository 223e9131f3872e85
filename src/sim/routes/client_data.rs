//! Client-level data calls with HTTP Basic auth: `GET /category-tree`, `POST /rpc/categorize`,
//! `GET /payment-receipts/{id}` (finx-api.md §2, §6).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{json_value, parse_json, LimitedBody, Segment, Shared};
use crate::sim::data::{categorize as categorize_text, CATEGORIES};
use crate::sim::error::FinxError;
use crate::sim::faults::FaultTarget;
use crate::sim::flows::{FlowKind, Outcome};
use crate::sim::stats::bump;

async fn authorize_client(state: &Shared, headers: &HeaderMap) -> Result<(), FinxError> {
    bump(&state.counters.client_data_requests);
    state.faults.before(FaultTarget::Data).await?;
    if state.client_authenticated(headers) {
        Ok(())
    } else {
        Err(FinxError::unauthorized_client())
    }
}

/// `GET /category-tree`: top-level categories with their children.
pub(crate) async fn category_tree(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, FinxError> {
    authorize_client(&state, &headers).await?;
    let tree: Vec<Value> = CATEGORIES
        .iter()
        .filter(|c| c.parent_id.is_none())
        .map(|top| {
            let children: Vec<Value> = CATEGORIES
                .iter()
                .filter(|c| c.parent_id == Some(top.id))
                .map(|c| json!({ "id": c.id, "name": c.name, "children": [] }))
                .collect();
            json!({ "id": top.id, "name": top.name, "children": children })
        })
        .collect();
    Ok(json_value(StatusCode::OK, &json!({ "categories": tree })))
}

/// `POST /rpc/categorize` with `{"transactions":[{"id", "name"?, "purpose"?, "amount"?}]}`.
pub(crate) async fn categorize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<LimitedBody, FinxError>,
) -> Result<Response, FinxError> {
    authorize_client(&state, &headers).await?;
    let LimitedBody(body) = body?;
    let body: Value = parse_json(&body)?;
    let invalid = || {
        let mut fields = Map::new();
        fields.insert(
            "transactions".into(),
            Value::String("Must be a list of objects with a string id.".into()),
        );
        FinxError::validation(fields)
    };
    let items = body
        .get("transactions")
        .and_then(Value::as_array)
        .ok_or_else(invalid)?;
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let id = item.get("id").and_then(Value::as_str).ok_or_else(invalid)?;
        let text = ["name", "purpose"]
            .iter()
            .filter_map(|key| item.get(*key).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let category = categorize_text(&text, item.get("amount").and_then(Value::as_f64));
        answers.push(json!({ "id": id, "category": category }));
    }
    Ok(json_value(
        StatusCode::OK,
        &json!({ "transactions": answers }),
    ))
}

/// `GET /payment-receipts/{id}`: the receipt of a successful payment flow.
pub(crate) async fn payment_receipt(
    State(state): State<Shared>,
    headers: HeaderMap,
    Segment(id): Segment,
) -> Result<Response, FinxError> {
    authorize_client(&state, &headers).await?;
    let flow = state
        .flows
        .get(&id, state.now())
        .filter(|flow| {
            matches!(
                flow.kind,
                FlowKind::OnetimePayment | FlowKind::OngoingPayment
            ) && flow.outcome == Some(Outcome::Success)
                && flow.client_id == state.config.client_id
        })
        .ok_or_else(|| FinxError::not_found("no such payment receipt"))?;
    Ok(json_value(
        StatusCode::OK,
        &json!({
            "id": flow.id,
            "status": "executed",
            "payment": flow.request.payment,
            "created_at": flow.created_at,
        }),
    ))
}
