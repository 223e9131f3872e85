//! Client-level data calls with HTTP Basic auth: `GET /category-tree`, `POST /rpc/categorize`,
//! `GET /payment-receipts/{id}`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::{json_value, parse_json, LimitedBody, Segment, Shared};
use crate::sim::data::{categorize as categorize_text, iso_timestamp, CATEGORIES};
use crate::sim::error::FinxError;
use crate::sim::faults::FaultTarget;
use crate::sim::flows::{Flow, FlowKind, Outcome, Payment};
use crate::sim::lenient;
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

/// `POST /rpc/categorize`: the transactions, each with a `category` added. finX's example sends
/// a bare JSON array (answered as an array); `{"transactions": [...]}` is answered in kind.
/// Each transaction needs a string `id`; `name` and `purpose` are read, `amount` may be a
/// number or a decimal string; other fields are passed through.
pub(crate) async fn categorize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<LimitedBody, FinxError>,
) -> Result<Response, FinxError> {
    authorize_client(&state, &headers).await?;
    let LimitedBody(body) = body?;
    let invalid = || {
        FinxError::field(
            "transactions",
            "Must be a list of objects with a string id.",
        )
    };
    let (items, wrapped) = match parse_json::<Value>(&body)? {
        Value::Array(items) => (items, false),
        Value::Object(mut object) => match object.remove("transactions") {
            Some(Value::Array(items)) => (items, true),
            _ => return Err(invalid()),
        },
        _ => return Err(invalid()),
    };
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(mut transaction) = item else {
            return Err(invalid());
        };
        if !transaction.get("id").is_some_and(Value::is_string) {
            return Err(invalid());
        }
        let text = ["name", "purpose"]
            .iter()
            .filter_map(|key| transaction.get(*key).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let amount = transaction.get("amount").and_then(lenient::number);
        transaction.insert("category".into(), json!(categorize_text(&text, amount)));
        answers.push(Value::Object(transaction));
    }
    let answer = if wrapped {
        json!({ "transactions": answers })
    } else {
        Value::Array(answers)
    };
    Ok(json_value(StatusCode::OK, &answer))
}

/// `GET /payment-receipts/{flow_id}`: the receipt of one of this client's payment flows, from
/// its initiation on (one-time flows vanish with their data after an hour). `status` is
/// `pending` until the widget ends the flow, then `executed`, `cancelled` (the user cancelled)
/// or `failed` (the bank refused); the other fields follow finX's published receipt.
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
            ) && flow.client_id == state.config.client_id
        })
        .ok_or_else(|| FinxError::not_found("no such payment receipt"))?;
    let payment = flow
        .request
        .payment
        .as_ref()
        .ok_or_else(|| FinxError::not_found("no such payment receipt"))?;
    Ok(json_value(StatusCode::OK, &receipt(&state, &flow, payment)))
}

fn receipt(state: &Shared, flow: &Flow, payment: &Payment) -> Value {
    let executed = flow.outcome == Some(Outcome::Success);
    let status = match flow.outcome {
        None => "pending",
        Some(Outcome::Success) => "executed",
        Some(Outcome::Abort) => "cancelled",
        Some(Outcome::Error) => "failed",
    };
    // An executed payment left some account: the one named, else the user's first one.
    let debtor_iban = payment.debtor_iban.clone().or_else(|| {
        executed
            .then(|| state.grants.owner_data(&flow.owner()))
            .and_then(|data| data.accounts().first()?["iban"].as_str().map(str::to_owned))
    });
    // The bank assigns a reference on submission when the client gave none.
    let end_to_end_reference = payment.end_to_end_reference.clone().or_else(|| {
        executed.then(|| {
            let hex: String = flow.id.chars().filter(|c| *c != '-').take(16).collect();
            hex.to_ascii_uppercase()
        })
    });
    let mut receipt = json!({
        "id": flow.id,
        "status": status,
        "debtor": { "iban": debtor_iban },
        "creditor": { "iban": payment.creditor_iban, "name": payment.creditor_name },
        "amount": { "value": payment.value, "currency": payment.currency },
        "purpose": payment.purpose,
        "end_to_end_reference": end_to_end_reference,
        "submitted_at": flow.ended_at.filter(|_| executed).map(iso_timestamp),
        "type": "SEPA transfer",
    });
    if let Some(code) = &payment.sepa_purpose_code {
        receipt["sepa_purpose_code"] = json!(code);
    }
    receipt
}
