//! The demo page (`/demo`), served only when `[connect] demo_page = true` (`finx-gateway demo`
//! sets it): a person clicks "Connect bank", completes the simulator's widget, comes back
//! through the gateway's callback and sees their accounts, fetched through the gateway itself.
//!
//! It acts as the demo service: it mints that service's caller token with the demo key, so
//! every request it makes goes through the same authentication and policy as any caller's.

use std::time::Duration;

use http::{Method, StatusCode};
use pingora::proxy::Session;
use serde_json::Value;

use crate::callers::Caller;
use crate::clock::{Clock, SystemClock};
use crate::connect::FlowKind;
use crate::error::GatewayError;
use crate::proxy::{respond, ProxyParts};

/// The end user the demo page connects.
pub const DEMO_BROWSER_USER: &str = "demo-browser-user";

/// Answers `/demo`, `/demo/connect` and `/demo/done`. `Ok(true)`: answered.
pub async fn serve(session: &mut Session, parts: &ProxyParts) -> Result<bool, GatewayError> {
    let Some(connect) = parts.connect.as_deref().filter(|c| c.demo_page()) else {
        return Err(GatewayError::RouteNotFound);
    };
    let request = session.req_header();
    let target = String::from_utf8_lossy(request.raw_path()).into_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let origin = connect.callback_origin();
    let page = match (&request.method, path) {
        (&Method::GET, "/demo") => Page::Html(start_page()),
        (&Method::POST, "/demo/connect") => {
            let caller = demo_caller(parts)?;
            let body = serde_json::json!({
                "redirect_uri": format!("{origin}/demo/done"),
                "user_id": DEMO_BROWSER_USER,
                "state": "demo-page",
            });
            let answer = connect
                .start_flow(
                    FlowKind::OngoingAccess,
                    &caller,
                    body.to_string().as_bytes(),
                )
                .await?;
            let created: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
            match created["location"].as_str() {
                Some(location) if answer.status == 201 => Page::Redirect(location.to_owned()),
                _ => Page::Html(message_page("finX refused to start the flow.")),
            }
        }
        (&Method::GET, "/demo/done") => {
            let success = url::form_urlencoded::parse(query.as_bytes())
                .any(|(name, value)| name == "success" && value == "true");
            if success {
                Page::Html(accounts_page(&origin, parts).await)
            } else {
                Page::Html(message_page("The bank connection was not completed."))
            }
        }
        _ => return Err(GatewayError::RouteNotFound),
    };
    let sent = match page {
        Page::Html(html) => respond::send_html(session, StatusCode::OK, html).await,
        Page::Redirect(location) => respond::send_redirect(session, &location).await,
    };
    sent.map_err(|_| GatewayError::Internal)?;
    Ok(true)
}

enum Page {
    Html(String),
    Redirect(String),
}

fn demo_token(parts: &ProxyParts) -> Result<String, GatewayError> {
    super::mint_demo_token(&parts.callers, Duration::from_secs(300))
        .map_err(|_| GatewayError::Internal)
}

fn demo_caller(parts: &ProxyParts) -> Result<Caller, GatewayError> {
    let mut headers = http::HeaderMap::new();
    let value = format!("Bearer {}", demo_token(parts)?);
    headers.insert(
        http::header::AUTHORIZATION,
        value.parse().map_err(|_| GatewayError::Internal)?,
    );
    Ok(parts.callers.authenticate(&headers, SystemClock.now())?)
}

/// The user's accounts, fetched through the gateway's own listener like any service would.
async fn accounts_page(origin: &str, parts: &ProxyParts) -> String {
    let fetched = async {
        let token = demo_token(parts).map_err(|_| "cannot mint the demo token".to_owned())?;
        let response = reqwest::Client::new()
            .get(format!("{origin}/rest/accounts"))
            .bearer_auth(token)
            .header("x-finx-user", DEMO_BROWSER_USER)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("bad answer: {e}"))?;
        if !status.is_success() {
            return Err(format!("the gateway answered {status}"));
        }
        Ok(body)
    }
    .await;
    let accounts = match fetched {
        Ok(body) => body["accounts"].as_array().cloned().unwrap_or_default(),
        Err(problem) => {
            return message_page(&format!(
                "Connected, but fetching accounts failed: {problem}"
            ))
        }
    };
    let rows: String = accounts
        .iter()
        .map(|account| {
            format!(
                "<tr><td>{}</td><td>{}</td><td class=\"balance\">{} {}</td></tr>",
                escape(account["name"].as_str().unwrap_or("")),
                escape(account["iban"].as_str().unwrap_or("")),
                escape(&account["balance"]["balance"].to_string()),
                escape(account["balance"]["currency"].as_str().unwrap_or("")),
            )
        })
        .collect();
    layout(&format!(
        "<p id=\"connected\">Bank connected. Your accounts, fetched through finx-gateway:</p>\
         <table id=\"accounts\"><tr><th>Account</th><th>IBAN</th><th>Balance</th></tr>{rows}</table>\
         <p><a href=\"/demo\">Start again</a></p>"
    ))
}

fn start_page() -> String {
    layout(
        "<p>This page plays an app that uses finx-gateway. Connecting a bank starts finX's \
         ongoing-access flow through the gateway; the simulator's widget stands in for the bank.</p>\
         <form method=\"post\" action=\"/demo/connect\">\
         <button id=\"connect-bank\" type=\"submit\">Connect bank</button></form>",
    )
}

fn message_page(message: &str) -> String {
    layout(&format!(
        "<p id=\"message\">{}</p><p><a href=\"/demo\">Try again</a></p>",
        escape(message)
    ))
}

fn layout(body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>finx-gateway demo</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}\
         td,th{{padding:.3em 1em;text-align:left}}.balance{{text-align:right}}</style></head>\
         <body><h1>finx-gateway demo</h1>{body}</body></html>"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
