//! The demo page: a small web app of its own, on its own listener, that uses the gateway exactly
//! as any service would. A person clicks "Connect bank"; the page starts finX's ongoing-access
//! flow through the gateway over HTTP (with the demo service's caller token), the browser goes
//! to the simulator's widget, comes back through the gateway's callback to `/demo/done`, and the
//! page shows the accounts it fetched through the gateway.
//!
//! The proxy knows nothing of this page. Because it runs on a developer's machine, it answers
//! only requests addressed to a loopback host name (so a web page that rebinds its own name to
//! 127.0.0.1 cannot drive it), and starts a flow only for a same-origin browser request.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use crate::html::escape;
use crate::proxy::host::is_loopback_host;
use crate::server_thread::ServerThread;

/// The end user the demo page connects.
pub const DEMO_BROWSER_USER: &str = "demo-browser-user";

/// What the page needs to act as a service of the gateway.
struct PageState {
    /// `http://ip:port` of the gateway's data listener.
    gateway: String,
    /// `http://ip:port` of this page, the origin browsers see.
    origin: String,
    /// The demo service's caller token (a JWT).
    caller_token: String,
    http: reqwest::Client,
}

/// Serves the page on `listener` on a thread of its own; dropping the handle stops it.
pub fn spawn(
    listener: std::net::TcpListener,
    gateway: String,
    caller_token: String,
) -> std::io::Result<ServerThread> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let state = Arc::new(PageState {
        gateway,
        origin: format!("http://{addr}"),
        caller_token,
        http: reqwest::Client::new(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    ServerThread::spawn("finx-demo-page", addr, move |stop| {
        let served = runtime.block_on(async move {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(async move {
                    let _ = stop.await;
                })
                .await
        });
        if let Err(error) = served {
            tracing::error!(%error, "the demo page stopped");
        }
    })
}

fn router(state: Arc<PageState>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/demo") }))
        .route("/demo", get(start_page))
        .route("/demo/connect", post(connect))
        .route("/demo/done", get(done))
        .with_state(state)
}

/// Refuses requests not addressed to a loopback name (DNS rebinding) and, for a state-changing
/// request, browser requests from another site (the `Sec-Fetch-Site` and `Origin` headers
/// browsers send; a request without them, such as curl's, is not a browser's cross-site one).
fn guard(
    headers: &HeaderMap,
    state: &PageState,
    changes_state: bool,
) -> Result<(), (StatusCode, &'static str)> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            "the demo page answers only on a loopback address",
        ));
    }
    if !changes_state {
        return Ok(());
    }
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let same_site = matches!(site, None | Some("same-origin") | Some("none"));
    let same_origin =
        origin.is_none_or(|origin| origin == state.origin || origin == format!("http://{host}"));
    if same_site && same_origin {
        Ok(())
    } else {
        Err((StatusCode::FORBIDDEN, "cross-site request refused"))
    }
}

async fn start_page(State(state): State<Arc<PageState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = guard(&headers, &state, false) {
        return refused.into_response();
    }
    Html(layout(
        "<p>This page plays an app that uses finx-gateway. Connecting a bank starts finX's \
         ongoing-access flow through the gateway; the simulator's widget stands in for the bank.</p>\
         <form method=\"post\" action=\"/demo/connect\">\
         <button id=\"connect-bank\" type=\"submit\">Connect bank</button></form>",
    ))
    .into_response()
}

/// Starts the flow through the gateway and sends the browser to the widget.
async fn connect(State(state): State<Arc<PageState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = guard(&headers, &state, true) {
        return refused.into_response();
    }
    let body = serde_json::json!({
        "redirect_uri": format!("{}/demo/done", state.origin),
        "user_id": DEMO_BROWSER_USER,
        "state": "demo-page",
    });
    let started = state
        .http
        .post(format!("{}/ongoing/access", state.gateway))
        .bearer_auth(&state.caller_token)
        .json(&body)
        .send()
        .await;
    let location = match started {
        Ok(answer) if answer.status() == reqwest::StatusCode::CREATED => answer
            .json::<Value>()
            .await
            .ok()
            .and_then(|created| created["location"].as_str().map(str::to_owned)),
        _ => None,
    };
    match location {
        Some(location) => Redirect::to(&location).into_response(),
        None => message_page("finX refused to start the flow.").into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DoneQuery {
    success: Option<String>,
}

/// Where the gateway's callback sends the browser back to.
async fn done(
    State(state): State<Arc<PageState>>,
    headers: HeaderMap,
    Query(query): Query<DoneQuery>,
) -> Response {
    if let Err(refused) = guard(&headers, &state, false) {
        return refused.into_response();
    }
    if query.success.as_deref() != Some("true") {
        return message_page("The bank connection was not completed.").into_response();
    }
    accounts_page(&state).await.into_response()
}

/// The user's accounts, fetched through the gateway like any service would.
async fn accounts_page(state: &PageState) -> Html<String> {
    let fetched = async {
        let response = state
            .http
            .get(format!("{}/rest/accounts", state.gateway))
            .bearer_auth(&state.caller_token)
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

fn message_page(message: &str) -> Html<String> {
    layout(&format!(
        "<p id=\"message\">{}</p><p><a href=\"/demo\">Try again</a></p>",
        escape(message)
    ))
}

fn layout(body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>finx-gateway demo</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}\
         td,th{{padding:.3em 1em;text-align:left}}.balance{{text-align:right}}</style></head>\
         <body><h1>finx-gateway demo</h1>{body}</body></html>"
    ))
}
