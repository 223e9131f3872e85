//! The widget: a plain HTML page (no JavaScript) at the `location` of a flow, with Connect and
//! Cancel buttons that end the flow and redirect the browser to its `redirect_uri`.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::error::FinxError;
use super::flows::{Flow, Outcome};
use super::routes::{LimitedBody, QueryPairs, Segment, Shared};
use crate::html::escape;

/// The flow, if it exists and `token` is its widget token.
fn widget_flow(state: &Shared, flow_id: &str, token: Option<&str>) -> Result<Flow, FinxError> {
    state
        .flows
        .get(flow_id, state.now())
        .filter(|flow| token == Some(flow.widget_token.as_str()))
        .ok_or_else(|| FinxError::not_found("unknown or expired widget link"))
}

/// `GET /widget/{flow_id}?token=…`.
pub(crate) async fn page(
    State(state): State<Shared>,
    Segment(flow_id): Segment,
    query: QueryPairs,
) -> Result<Response, FinxError> {
    let flow = widget_flow(&state, &flow_id, query.get("token"))?;
    if flow.outcome.is_some() {
        return Ok(finished_page("This flow has already finished."));
    }
    let data = state.grants.owner_data(&flow.owner());
    let accounts: String = data
        .accounts()
        .iter()
        .map(|account| {
            format!(
                "<li class=\"account\">{} &middot; {} &middot; {} EUR</li>",
                escape(account["name"].as_str().unwrap_or_default()),
                escape(account["iban"].as_str().unwrap_or_default()),
                account["balance"]["balance"]
            )
        })
        .collect();
    let hints = if flow.request.account_hints.is_empty() {
        String::new()
    } else {
        format!(
            "<p>Suggested accounts: {}</p>",
            escape(&flow.request.account_hints.join(", "))
        )
    };
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>finX simulator: {title}</title></head>
<body>
<h1>{title}</h1>
<p>Bank: <strong>Simulated Bank</strong> (BIC SIMBDEMMXXX)</p>
<p>Flow <code>{flow_id}</code></p>
{hints}
<ul id="accounts">{accounts}</ul>
<form method="post" action="/widget/{flow_id}">
<input type="hidden" name="token" value="{token}">
<button type="submit" name="outcome" value="success" id="connect">Connect</button>
<button type="submit" name="outcome" value="abort" id="cancel">Cancel</button>
<button type="submit" name="outcome" value="error" id="error">Simulate a bank error</button>
</form>
</body>
</html>
"#,
        title = escape(flow.kind.title()),
        flow_id = escape(&flow.id),
        token = escape(&flow.widget_token),
    );
    Ok(Html(html).into_response())
}

/// `POST /widget/{flow_id}` (form: `token`, `outcome`): ends the flow, 303 to `redirect_uri`.
pub(crate) async fn submit(
    State(state): State<Shared>,
    Segment(flow_id): Segment,
    body: Result<LimitedBody, FinxError>,
) -> Result<Response, FinxError> {
    let LimitedBody(body) = body?;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    widget_flow(&state, &flow_id, field("token"))?;
    let outcome = field("outcome")
        .and_then(Outcome::parse)
        .ok_or_else(|| FinxError::bad_request("outcome must be success, abort or error"))?;
    let redirect = state
        .flows
        .complete(&flow_id, outcome, &state.grants, state.now())?;
    Ok(match redirect {
        Some(url) => match HeaderValue::from_str(url.as_str()) {
            Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
            Err(_) => {
                return Err(FinxError::bad_request(
                    "redirect_uri cannot be used as a header",
                ))
            }
        },
        None => finished_page("Done. You can close this window."),
    })
}

fn finished_page(message: &str) -> Response {
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>finX simulator</title></head>\
         <body><p id=\"finished\">{}</p></body></html>\n",
        escape(message)
    ))
    .into_response()
}
