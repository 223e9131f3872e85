//! Connect flows through the gateway, for every flow kind finX offers: the service starts
//! the flow at the gateway, the user completes the simulator's widget, the browser returns to
//! the gateway's callback, and the app's redirect carries no code while the connection works.

mod support;

use finx_gateway::sim::SimConfig;
use finx_gateway::store::ConnectionKey;
use serde_json::{json, Value};
use support::{add_service_like_demo, error_code, Harness, StoreKind, APP_RETURN};
use url::Url;

/// A client that does not follow redirects, like a test of where they point.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

fn payment() -> Value {
    json!({
        "creditor": {"iban": "DE02120300000000202051", "name": "Shop GmbH"},
        "amount": {"value": 12.5, "currency": "EUR"},
        "purpose": "Order 42"
    })
}

/// A valid body for `kind` returning to the app with `state`.
fn body_for(kind: &str, user: &str) -> Value {
    let mut body = json!({"redirect_uri": APP_RETURN, "state": format!("app-state-{kind}")});
    let extra = match kind {
        "onetime/income-report" => json!({"sync_period": 180}),
        "onetime/account-verification" => json!({"name": "Max Mustermann"}),
        "onetime/payment" => json!({"payment": payment()}),
        "ongoing/access" | "ongoing/risk-report" => json!({"user_id": user}),
        "ongoing/payment" => json!({"user_id": user, "payment": payment()}),
        _ => json!({}),
    };
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Starts `kind` through the gateway; returns finX's flow id.
async fn start(harness: &Harness, kind: &str, body: &Value) -> String {
    let response = harness
        .request(reqwest::Method::POST, &format!("/{kind}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{kind}: {answer}");
    assert!(
        answer["location"]
            .as_str()
            .is_some_and(|l| l.contains("token=")),
        "{answer}"
    );
    answer["id"].as_str().unwrap().to_owned()
}

/// Ends the widget with `outcome`; returns where the simulator sends the browser.
async fn widget(harness: &Harness, flow_id: &str, outcome: &str) -> Url {
    let redirect = harness
        .control
        .complete_widget(flow_id, outcome)
        .await
        .unwrap();
    let url = Url::parse(&redirect).unwrap();
    assert_eq!(
        url.path(),
        "/callback",
        "finX returns to the gateway, not the app"
    );
    url
}

/// The browser's visit to the gateway's callback; returns the app redirect (302 Location).
async fn follow(url: &Url) -> Url {
    let response = no_redirects().get(url.as_str()).send().await.unwrap();
    assert_eq!(
        response.status(),
        302,
        "{}",
        response.text().await.unwrap_or_default()
    );
    Url::parse(response.headers()["location"].to_str().unwrap()).unwrap()
}

/// `url` with the value of its query parameter `name` replaced.
fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == name {
                value.to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut replaced = url.clone();
    replaced.query_pairs_mut().clear().extend_pairs(pairs);
    replaced
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn assert_returns_to_app(app: &Url, kind: &str, flow_id: &str, success: bool) {
    assert!(app.as_str().starts_with(APP_RETURN), "{app}");
    assert_eq!(
        param(app, "code"),
        None,
        "the app redirect carries a code: {app}"
    );
    assert_eq!(
        param(app, "state").as_deref(),
        Some(format!("app-state-{kind}").as_str())
    );
    assert_eq!(param(app, "flow_id").as_deref(), Some(flow_id));
    assert_eq!(
        param(app, "success").as_deref(),
        Some(if success { "true" } else { "false" })
    );
}

/// The data call that proves the stored connection works for `kind`.
async fn use_connection(
    harness: &Harness,
    kind: &str,
    user: &str,
    flow_id: &str,
) -> reqwest::Response {
    let (path, header, id) = match kind {
        "onetime/income-report" => (
            format!("/rest/income-reports/{flow_id}"),
            "x-finx-flow",
            flow_id,
        ),
        "onetime/account-verification" => (
            format!("/rest/account-verifications/{flow_id}"),
            "x-finx-flow",
            flow_id,
        ),
        "onetime/risk-report" => (
            format!("/rest/risk-reports/{flow_id}"),
            "x-finx-flow",
            flow_id,
        ),
        "ongoing/risk-report" => (format!("/rest/risk-reports/{flow_id}"), "x-finx-user", user),
        k if k.starts_with("onetime/") => ("/rest/accounts".to_owned(), "x-finx-flow", flow_id),
        _ => ("/rest/accounts".to_owned(), "x-finx-user", user),
    };
    harness
        .request(reqwest::Method::GET, &path)
        .header(header, id)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_kind_completes_end_to_end_without_the_code_reaching_the_app() {
    let harness = Harness::start();
    for kind in [
        "onetime/access",
        "onetime/income-report",
        "onetime/account-verification",
        "onetime/risk-report",
        "onetime/payment",
        "ongoing/access",
        "ongoing/risk-report",
        "ongoing/payment",
    ] {
        let user = format!("user-{}", kind.replace('/', "-"));
        let flow_id = start(&harness, kind, &body_for(kind, &user)).await;
        let callback = widget(&harness, &flow_id, "success").await;
        assert!(
            param(&callback, "code").is_some(),
            "finX sends the code to the gateway"
        );
        let app = follow(&callback).await;
        assert_returns_to_app(&app, kind, &flow_id, true);
        let response = use_connection(&harness, kind, &user, &flow_id).await;
        let status = response.status();
        assert_eq!(status, 200, "{kind}: {}", response.text().await.unwrap());
    }
    assert_eq!(harness.control.stats().await.unwrap().code_grants, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_sync_goes_through_state_and_callback_and_keeps_the_tokens() {
    let harness = Harness::start();
    let flow_id = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "sync-user"),
    )
    .await;
    follow(&widget(&harness, &flow_id, "success").await).await;
    let key = ConnectionKey::user("sync-user").unwrap();
    let before = harness.store().load(&key).await.unwrap().unwrap();
    assert_eq!(before.synced_at, None);

    let accounts: Value = harness
        .get_as("sync-user", "/rest/accounts")
        .await
        .json()
        .await
        .unwrap();
    let account_ids: Vec<Value> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["account_id"].clone())
        .collect();
    let body = json!({
        "redirect_uri": APP_RETURN, "state": "app-state-ongoing/sync",
        "user_id": "sync-user", "account_ids": account_ids,
    });
    let sync_id = start(&harness, "ongoing/sync", &body).await;
    let callback = widget(&harness, &sync_id, "success").await;
    assert_eq!(param(&callback, "code"), None, "a sync returns no code");
    let app = follow(&callback).await;
    assert_returns_to_app(&app, "ongoing/sync", &sync_id, true);

    let after = harness.store().load(&key).await.unwrap().unwrap();
    assert!(after.synced_at.is_some());
    assert_eq!(after.version, before.version, "the tokens were kept");
    assert_eq!(
        harness.get_as("sync-user", "/rest/accounts").await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancel_and_error_store_nothing() {
    let harness = Harness::start();
    for (outcome, aborted) in [("abort", true), ("error", false)] {
        let user = format!("quitter-{outcome}");
        let flow_id = start(
            &harness,
            "ongoing/access",
            &body_for("ongoing/access", &user),
        )
        .await;
        let app = follow(&widget(&harness, &flow_id, outcome).await).await;
        assert_returns_to_app(&app, "ongoing/access", &flow_id, false);
        let flag = |name| param(&app, name).as_deref() == Some("true");
        assert_eq!(flag("abort"), aborted, "{app}");
        assert_eq!(flag("cancel"), aborted, "{app}");
        let stored = harness
            .store()
            .load(&ConnectionKey::user(&user).unwrap())
            .await
            .unwrap();
        assert!(stored.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_tampered_and_expired_states_are_refused() {
    let harness = Harness::start();
    // Replay.
    let flow_id = start(&harness, "onetime/access", &body_for("onetime/access", "")).await;
    let callback = widget(&harness, &flow_id, "success").await;
    follow(&callback).await;
    let replay = no_redirects().get(callback.as_str()).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert_eq!(error_code(replay).await, "bad_request");

    // Tampering: another character in the signed state.
    let flow_id = start(&harness, "onetime/access", &body_for("onetime/access", "")).await;
    let callback = widget(&harness, &flow_id, "success").await;
    let state = param(&callback, "state").unwrap();
    let middle = state.len() / 2;
    let flipped = if &state[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    let mut tampered_state = state.clone();
    tampered_state.replace_range(middle..=middle, flipped);
    let tampered = with_param(&callback, "state", &tampered_state);
    let response = no_redirects().get(tampered.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 400);

    // Expiry: the gateway's clock moves past the state's life (30 minutes by default).
    harness.clock.advance(31 * 60);
    let response = no_redirects().get(callback.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    assert_eq!(
        harness.control.stats().await.unwrap().code_grants,
        1,
        "only the first flow exchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_redirects_are_refused_before_finx_is_asked() {
    let harness = Harness::start();
    for redirect in [
        "https://evil.example/finx/return",
        "http://app.example/finx/return",
        "https://app.example:8443/finx/return",
        "https://app.example.evil.example/finx/return",
        "https://app.example/finxevil",
        "https://user@app.example/finx/return",
        "javascript:alert(1)",
        "/finx/return",
    ] {
        let mut body = body_for("onetime/access", "");
        body["redirect_uri"] = json!(redirect);
        let response = harness
            .request(reqwest::Method::POST, "/onetime/access")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{redirect}");
    }
    // A deeper path under the allowed prefix is fine.
    let mut body = body_for("onetime/access", "");
    body["redirect_uri"] = json!(format!("{APP_RETURN}/deeper?keep=1"));
    start(&harness, "onetime/access", &body).await;
    assert_eq!(
        harness.control.stats().await.unwrap().widget_links_created,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_or_a_failing_exchange_returns_success_false() {
    let harness = Harness::start();
    // Code expiry is finX's: its clock moves past the 5-minute code life.
    let flow_id = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "late"),
    )
    .await;
    let callback = widget(&harness, &flow_id, "success").await;
    harness.control.advance_clock(301).await.unwrap();
    let app = follow(&callback).await;
    assert_eq!(param(&app, "success").as_deref(), Some("false"));
    assert_eq!(param(&app, "error").as_deref(), Some("exchange_failed"));
    assert_eq!(param(&app, "code"), None);
    assert!(harness
        .store()
        .load(&ConnectionKey::user("late").unwrap())
        .await
        .unwrap()
        .is_none());

    // finX failing at the exchange.
    let flow_id = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "unlucky"),
    )
    .await;
    let callback = widget(&harness, &flow_id, "success").await;
    let faults = finx_gateway::sim::Faults {
        token_error_rate: 1.0,
        ..Default::default()
    };
    harness.control.set_faults(&faults).await.unwrap();
    let app = follow(&callback).await;
    assert_eq!(param(&app, "error").as_deref(), Some("exchange_failed"));
    assert!(harness
        .store()
        .load(&ConnectionKey::user("unlucky").unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_to_server_callback_answers_json_and_binds_the_caller() {
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        add_service_like_demo(file, "other");
    });
    let flow_id = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "s2s-user"),
    )
    .await;
    let callback = widget(&harness, &flow_id, "success").await;
    let query = callback.query().unwrap().to_owned();

    // Another service cannot complete this flow.
    let other = harness.token_for("other");
    let response = harness
        .http
        .post(harness.url("/callback"))
        .bearer_auth(&other)
        .body(query.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "caller_forbidden");

    let flow_id2 = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "s2s-user"),
    )
    .await;
    let query = widget(&harness, &flow_id2, "success")
        .await
        .query()
        .unwrap()
        .to_owned();
    let response = harness
        .request(reqwest::Method::POST, &format!("/callback?{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["flow_id"], flow_id2.as_str());
    assert_eq!(answer["connection"], "s2s-user");
    assert!(!answer.to_string().contains("code"), "{answer}");
    assert_eq!(
        harness.get_as("s2s-user", "/rest/accounts").await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconsent_replaces_a_dead_grant() {
    let harness = Harness::start();
    harness.import_user("lapsed").await;
    harness.control.revoke("lapsed").await.unwrap();
    assert_eq!(
        harness.get_as("lapsed", "/rest/accounts").await.status(),
        424
    );

    let flow_id = start(
        &harness,
        "ongoing/access",
        &body_for("ongoing/access", "lapsed"),
    )
    .await;
    // Until the user completes the flow, requests still get 424.
    assert_eq!(
        harness.get_as("lapsed", "/rest/accounts").await.status(),
        424
    );
    let app = follow(&widget(&harness, &flow_id, "success").await).await;
    assert_eq!(param(&app, "success").as_deref(), Some("true"));
    assert_eq!(
        harness.get_as("lapsed", "/rest/accounts").await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_checked_against_the_callers_policy() {
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        let reader = add_service_like_demo(file, "reader");
        reader.flows = vec!["onetime/access".into()];
        reader.connections = vec!["reader-*".into()];
    });
    let reader = harness.token_for("reader");
    let post = |path: &str, body: Value| {
        harness
            .http
            .post(harness.url(path))
            .bearer_auth(&reader)
            .json(&body)
            .send()
    };
    let response = post(
        "/onetime/income-report",
        body_for("onetime/income-report", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 403, "flow not allowed");
    let response = post("/ongoing/access", body_for("ongoing/access", "someone"))
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "flow and user not allowed");
    let response = post("/onetime/access", body_for("onetime/access", ""))
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        harness.control.stats().await.unwrap().widget_links_created,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flow_requests_get_clear_errors() {
    let harness = Harness::start();
    for body in [
        "not json",
        "[1,2]",
        r#"{"state":"x"}"#,
        r#"{"redirect_uri":5}"#,
    ] {
        let response = harness
            .request(reqwest::Method::POST, "/onetime/access")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
    }
    let response = harness
        .request(reqwest::Method::POST, "/ongoing/access")
        .json(&json!({"redirect_uri": APP_RETURN}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "ongoing flows need a user_id");
    let big = "x".repeat(70 * 1024);
    let response = harness
        .request(reqwest::Method::POST, "/onetime/access")
        .json(&json!({"redirect_uri": APP_RETURN, "state": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // finX's own validation errors pass through unchanged.
    let response = harness
        .request(reqwest::Method::POST, "/onetime/account-verification")
        .json(&json!({"redirect_uri": APP_RETURN}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"]["data"].get("name").is_some(), "{answer}");
}

// One-time connections and their retention work the same on both stores.
crate::on_both_stores!(one_time_connections_are_removed_after_their_retention);

async fn one_time_connections_are_removed_after_their_retention(kind: StoreKind) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    let flow_id = start(&harness, "onetime/access", &body_for("onetime/access", "")).await;
    follow(&widget(&harness, &flow_id, "success").await).await;
    let key = ConnectionKey::flow("demo-service", &flow_id).unwrap();
    assert!(harness.store().load(&key).await.unwrap().is_some());

    harness.advance(3601).await;
    let response = harness
        .request(reqwest::Method::GET, "/rest/accounts")
        .header("x-finx-flow", &flow_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "connection_not_found");
    assert!(harness.store().load(&key).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_cannot_swap_in_another_flow_id() {
    let harness = Harness::start();
    let victim = start(
        &harness,
        "onetime/income-report",
        &body_for("onetime/income-report", ""),
    )
    .await;
    let attacker = start(
        &harness,
        "onetime/income-report",
        &body_for("onetime/income-report", ""),
    )
    .await;
    let callback = widget(&harness, &attacker, "success").await;
    // The attacker's browser returns with the victim's flow id in place of its own.
    let swapped = with_param(&callback, "flow_id", &victim);
    let response = no_redirects().get(swapped.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let victim_key = ConnectionKey::flow("demo-service", &victim).unwrap();
    assert!(harness.store().load(&victim_key).await.unwrap().is_none());
    assert_eq!(harness.control.stats().await.unwrap().code_grants, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_flow_belongs_to_the_service_that_started_it() {
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        add_service_like_demo(file, "other");
    });
    let flow_id = start(&harness, "onetime/access", &body_for("onetime/access", "")).await;
    follow(&widget(&harness, &flow_id, "success").await).await;
    let own = use_connection(&harness, "onetime/access", "", &flow_id).await;
    assert_eq!(own.status(), 200);

    let other = harness.token_for("other");
    let response = harness
        .http
        .get(harness.url("/rest/accounts"))
        .bearer_auth(&other)
        .header("x-finx-flow", &flow_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "connection_not_found");
}
