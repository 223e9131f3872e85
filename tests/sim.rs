//! Black-box tests of the finX simulator over real sockets: each test spawns its own simulator
//! on 127.0.0.1:0 and drives it with reqwest. Expiry is driven by the simulator's clock, never by
//! waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use finx_gateway::sim::{self, Faults, SimConfig, SimControl, SimHandle};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

const CLIENT_ID: &str = "demo-client";
const CLIENT_SECRET: &str = "demo-secret";
const REDIRECT: &str = "https://app.example/callback?tenant=7";

struct Sim {
    handle: SimHandle,
    http: reqwest::Client,
    ctl: SimControl,
}

impl Sim {
    fn start(config: SimConfig) -> Sim {
        let handle = sim::spawn(config).expect("simulator starts");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let ctl = handle.control();
        Sim { handle, http, ctl }
    }

    fn with_control() -> Sim {
        Sim::start(SimConfig::default().with_control())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.base_url())
    }

    async fn post_basic(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    async fn token(&self, body: &Value) -> reqwest::Response {
        self.post_basic("/auth/token", body).await
    }

    async fn rest(&self, path: &str, access_token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(access_token)
            .send()
            .await
            .expect("request")
    }

    /// Starts a flow and returns its id and widget location.
    async fn flow(&self, path: &str, body: Value) -> (String, String) {
        let response = self.post_basic(path, &body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{path}");
        let body: Value = response.json().await.expect("json");
        let id = body["id"].as_str().expect("id").to_owned();
        let location = body["location"].as_str().expect("location").to_owned();
        (id, location)
    }

    /// Starts a flow, completes its widget successfully and returns the flow id and the code.
    async fn consented(&self, path: &str, body: Value) -> (String, String) {
        let (flow_id, _) = self.flow(path, body).await;
        let redirect = self
            .ctl
            .complete_widget(&flow_id, "success")
            .await
            .expect("complete");
        let code = query_of(&redirect)["code"].clone();
        (flow_id, code)
    }

    /// Runs an ongoing consent for `user` through the widget and exchanges the code.
    async fn connect(&self, user: &str) -> Value {
        let (_, code) = self
            .consented(
                "/ongoing/access",
                json!({ "redirect_uri": REDIRECT, "user_id": user }),
            )
            .await;
        let response = self
            .token(&json!({ "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT }))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("json")
    }

    /// Completes a widget successfully and returns the raw answer (for error statuses).
    async fn complete_raw(&self, flow_id: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/_sim/widget/{flow_id}/complete")))
            .json(&json!({ "outcome": "success" }))
            .send()
            .await
            .expect("request")
    }

    async fn receipt(&self, flow_id: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/payment-receipts/{flow_id}")))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .send()
            .await
            .expect("request")
    }

    async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        self.token(&json!({ "grant_type": "refresh_token", "refresh_token": refresh_token }))
            .await
    }
}

fn query_of(url: &str) -> HashMap<String, String> {
    let url = url::Url::parse(url).expect("redirect is a URL");
    url.query_pairs().into_owned().collect()
}

fn text(value: &Value) -> &str {
    value.as_str().expect("string")
}

async fn error_name(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("json error body");
    assert_eq!(body["error"]["group"], "client", "{body}");
    assert!(body["status"].is_u64(), "{body}");
    body["error"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn assert_invalid_grant(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["name"], "invalid_grant", "{body}");
    assert_eq!(body["error"]["message"], "invalid_grant", "{body}");
    assert_eq!(body["status"], 400);
    assert!(body["error"]["data"].is_object());
}

fn flow_bodies() -> Vec<(&'static str, Value, Vec<&'static str>)> {
    let payment = json!({
        "creditor": { "iban": "DE02120300000000202051", "name": "Shop" },
        "amount": { "value": 12.5, "currency": "EUR" },
        "purpose": "Order 1",
    });
    vec![
        (
            "/onetime/access",
            json!({ "redirect_uri": REDIRECT }),
            vec!["redirect_uri"],
        ),
        (
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT }),
            vec!["redirect_uri"],
        ),
        (
            "/ongoing/access",
            json!({ "redirect_uri": REDIRECT, "user_id": "u1" }),
            vec!["redirect_uri", "user_id"],
        ),
        (
            "/ongoing/sync",
            json!({ "user_id": "u1", "account_ids": ["A1"] }),
            vec!["user_id", "account_ids"],
        ),
        (
            "/onetime/account-verification",
            json!({ "redirect_uri": REDIRECT, "name": "Jane Doe" }),
            vec!["redirect_uri", "name"],
        ),
        (
            "/onetime/risk-report",
            json!({ "redirect_uri": REDIRECT }),
            vec!["redirect_uri"],
        ),
        (
            "/ongoing/risk-report",
            json!({ "redirect_uri": REDIRECT, "user_id": "u1" }),
            vec!["redirect_uri", "user_id"],
        ),
        (
            "/onetime/payment",
            json!({ "redirect_uri": REDIRECT, "payment": payment }),
            vec!["redirect_uri", "payment"],
        ),
        (
            "/ongoing/payment",
            json!({ "redirect_uri": REDIRECT, "user_id": "u1", "payment": payment }),
            vec!["redirect_uri", "user_id", "payment"],
        ),
    ]
}

// ---------------------------------------------------------------- 1. client auth

#[tokio::test]
async fn every_client_auth_endpoint_refuses_missing_or_wrong_basic_auth() {
    let sim = Sim::start(SimConfig::default());
    let mut endpoints: Vec<(reqwest::Method, &str)> = flow_bodies()
        .into_iter()
        .map(|(path, _, _)| (reqwest::Method::POST, path))
        .collect();
    endpoints.push((reqwest::Method::GET, "/category-tree"));
    endpoints.push((reqwest::Method::POST, "/rpc/categorize"));
    endpoints.push((reqwest::Method::GET, "/payment-receipts/flow_x"));
    for (method, path) in endpoints {
        for secret in [None, Some("wrong-secret")] {
            let mut request = sim
                .http
                .request(method.clone(), sim.url(path))
                .json(&json!({}));
            if let Some(secret) = secret {
                request = request.basic_auth(CLIENT_ID, Some(secret));
            }
            let response = request.send().await.expect("request");
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{path} {secret:?}"
            );
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
            assert_eq!(error_name(response).await, "unauthorized");
        }
    }
    for auth in [
        None,
        Some(("demo-client", "nope")),
        Some(("other", "demo-secret")),
    ] {
        let mut request = sim
            .http
            .post(sim.url("/auth/token"))
            .json(&json!({ "grant_type": "refresh_token", "refresh_token": "x" }));
        if let Some((id, secret)) = auth {
            request = request.basic_auth(id, Some(secret));
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(error_name(response).await, "invalid_client");
    }
}

#[tokio::test]
async fn configured_client_pair_replaces_the_demo_pair() {
    let sim = Sim::start(SimConfig {
        client_id: "svc".into(),
        client_secret: "s3cret".into(),
        ..SimConfig::default()
    });
    let demo = sim
        .post_basic("/onetime/access", &json!({ "redirect_uri": REDIRECT }))
        .await;
    assert_eq!(demo.status(), StatusCode::UNAUTHORIZED);
    let configured = sim
        .http
        .post(sim.url("/onetime/access"))
        .basic_auth("svc", Some("s3cret"))
        .json(&json!({ "redirect_uri": REDIRECT }))
        .send()
        .await
        .expect("request");
    assert_eq!(configured.status(), StatusCode::CREATED);
}

// ---------------------------------------------------------------- 2. flow initiation

#[tokio::test]
async fn every_flow_validates_its_required_fields_and_answers_a_widget_link() {
    let sim = Sim::with_control();
    for (path, valid, required) in flow_bodies() {
        let response = sim.post_basic(path, &json!({})).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["name"], "validation_error");
        for field in &required {
            assert!(
                body["error"]["data"].get(*field).is_some(),
                "{path}: {field} not named in {body}"
            );
        }
        for field in required {
            let mut missing = valid.clone();
            missing.as_object_mut().expect("object").remove(field);
            let response = sim.post_basic(path, &missing).await;
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{path} without {field}"
            );
            let body: Value = response.json().await.expect("json");
            assert!(body["error"]["data"].get(field).is_some(), "{path}: {body}");
        }
        let (id, location) = sim.flow(path, valid).await;
        assert!(
            location.starts_with(&format!("{}/widget/{id}?token=", sim.handle.base_url())),
            "{location}"
        );
    }
    assert_eq!(
        sim.ctl.stats().await.expect("stats").widget_links_created,
        9
    );
}

#[tokio::test]
async fn nested_and_typed_fields_are_validated_by_name() {
    let sim = Sim::start(SimConfig::default());
    let response = sim
        .post_basic(
            "/onetime/payment",
            &json!({ "redirect_uri": "not a url", "language": "xx", "payment": { "creditor": { "name": "Shop" }, "amount": { "value": -1, "currency": "EUR" }, "purpose": "p" } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    let data = &body["error"]["data"];
    for field in [
        "redirect_uri",
        "language",
        "payment.creditor.iban",
        "payment.amount.value",
    ] {
        assert!(data.get(field).is_some(), "{field} missing in {body}");
    }
    let response = sim
        .post_basic(
            "/onetime/income-report",
            &json!({ "redirect_uri": REDIRECT, "reporting_period": 3 }),
        )
        .await;
    let body: Value = response.json().await.expect("json");
    assert!(body["error"]["data"].get("reporting_period").is_some());
}

// ---------------------------------------------------------------- 3. widget

#[tokio::test]
async fn widget_success_redirects_with_state_success_code_and_flow_id_keeping_the_query() {
    let sim = Sim::with_control();
    let (flow_id, _) = sim
        .flow(
            "/onetime/access",
            json!({ "redirect_uri": REDIRECT, "state": "st-1" }),
        )
        .await;
    let redirect = sim
        .ctl
        .complete_widget(&flow_id, "success")
        .await
        .expect("complete");
    assert!(
        redirect.starts_with("https://app.example/callback?"),
        "{redirect}"
    );
    let query = query_of(&redirect);
    assert_eq!(query["tenant"], "7");
    assert_eq!(query["state"], "st-1");
    assert_eq!(query["success"], "true");
    assert_eq!(query["flow_id"], flow_id);
    assert!(!query["code"].is_empty());
    assert_eq!(query["abort"], "false");
    assert!(!query.contains_key("cancel"));
    // A flow ends once.
    let again = sim.complete_raw(&flow_id).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn widget_cancel_and_error_redirect_without_code() {
    let sim = Sim::with_control();
    let (cancelled, _) = sim
        .flow("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let query = query_of(
        &sim.ctl
            .complete_widget(&cancelled, "abort")
            .await
            .expect("complete"),
    );
    assert_eq!(query["success"], "false");
    assert_eq!(query["abort"], "true");
    assert_eq!(query["cancel"], "true");
    assert_eq!(query["flow_id"], cancelled);
    assert!(!query.contains_key("code") && !query.contains_key("state"));

    let (failed, _) = sim
        .flow(
            "/onetime/access",
            json!({ "redirect_uri": REDIRECT, "state": "s" }),
        )
        .await;
    let query = query_of(
        &sim.ctl
            .complete_widget(&failed, "error")
            .await
            .expect("complete"),
    );
    assert_eq!(query["success"], "false");
    assert_eq!(query["state"], "s");
    assert_eq!(query["abort"], "false", "a failure is no cancel");
    assert!(!query.contains_key("code") && !query.contains_key("cancel"));
}

#[tokio::test]
async fn ongoing_sync_success_redirects_without_a_code() {
    let sim = Sim::with_control();
    let (flow_id, _) = sim
        .flow(
            "/ongoing/sync",
            json!({ "user_id": "u1", "account_ids": ["A1"], "redirect_uri": REDIRECT }),
        )
        .await;
    let query = query_of(
        &sim.ctl
            .complete_widget(&flow_id, "success")
            .await
            .expect("complete"),
    );
    assert_eq!(query["success"], "true");
    assert!(!query.contains_key("code"));
}

#[tokio::test]
async fn widget_html_page_has_buttons_and_its_form_redirects() {
    let sim = Sim::start(SimConfig::default());
    let (flow_id, location) = sim
        .flow(
            "/ongoing/access",
            json!({ "redirect_uri": REDIRECT, "user_id": "html-user", "state": "abc" }),
        )
        .await;
    let page = sim.http.get(&location).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    let html = page.text().await.expect("html");
    assert!(
        html.contains("id=\"connect\"") && html.contains("id=\"cancel\""),
        "{html}"
    );
    assert!(html.contains("Simulated Bank") && html.contains("class=\"account\""));
    assert!(html.contains(&format!("action=\"/widget/{flow_id}\"")));
    let token = query_of(&location)["token"].clone();
    assert!(html.contains(&format!("name=\"token\" value=\"{token}\"")));

    // A wrong widget token is refused.
    let wrong = sim
        .http
        .get(sim.url(&format!("/widget/{flow_id}?token=nope")))
        .send()
        .await
        .expect("page");
    assert_eq!(wrong.status(), StatusCode::NOT_FOUND);

    // Submitting the form as a browser would (Connect button).
    let submit = sim
        .http
        .post(sim.url(&format!("/widget/{flow_id}")))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={token}&outcome=success"))
        .send()
        .await
        .expect("submit");
    assert_eq!(submit.status(), StatusCode::SEE_OTHER);
    let location = submit.headers()[header::LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    let query = query_of(&location);
    assert_eq!(query["success"], "true");
    assert_eq!(query["state"], "abc");
    assert_eq!(query["tenant"], "7");
    let code = query["code"].clone();
    let exchanged = sim
        .token(&json!({ "grant_type": "authorization_code", "code": code }))
        .await;
    assert_eq!(exchanged.status(), StatusCode::OK);

    // The Cancel button on another flow.
    let (other, location) = sim
        .flow("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let token = query_of(&location)["token"].clone();
    let cancel = sim
        .http
        .post(sim.url(&format!("/widget/{other}")))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={token}&outcome=abort"))
        .send()
        .await
        .expect("submit");
    assert_eq!(cancel.status(), StatusCode::SEE_OTHER);
    let query = query_of(
        cancel.headers()[header::LOCATION]
            .to_str()
            .expect("location"),
    );
    assert_eq!(query["abort"], "true");
    assert_eq!(query["success"], "false");
}

// ---------------------------------------------------------------- 4 + 5. codes and the token endpoint

#[tokio::test]
async fn token_answer_has_the_documented_shape_and_variable_url_safe_tokens() {
    let sim = Sim::with_control();
    let mut lengths = Vec::new();
    for n in 0..6 {
        let tokens = sim.connect(&format!("shape-{n}")).await;
        let mut keys: Vec<&str> = tokens
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "access_token",
                "expires_in",
                "refresh_token",
                "scope",
                "token_type"
            ]
        );
        assert_eq!(tokens["expires_in"], 3600);
        assert_eq!(tokens["token_type"], "Bearer");
        assert_eq!(
            tokens["scope"],
            "accounts=ro balance=ro transactions=ro offline"
        );
        for key in ["access_token", "refresh_token"] {
            let token = text(&tokens[key]);
            assert!((300..=2100).contains(&token.len()), "{}", token.len());
            assert!(token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            lengths.push(token.len());
        }
    }
    lengths.dedup();
    assert!(lengths.len() > 1, "token lengths vary");
    let stats = sim.ctl.stats().await.expect("stats");
    assert_eq!(stats.code_grants, 6);
    assert_eq!(stats.token_requests, 6);
}

#[tokio::test]
async fn codes_are_single_use_and_reuse_revokes_what_they_issued() {
    let sim = Sim::with_control();
    let (_, code) = sim
        .consented("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let first = sim
        .token(&json!({ "grant_type": "authorization_code", "code": code }))
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    let tokens: Value = first.json().await.expect("json");
    assert_eq!(
        sim.rest("/rest/accounts", text(&tokens["access_token"]))
            .await
            .status(),
        StatusCode::OK
    );
    assert_invalid_grant(
        sim.token(&json!({ "grant_type": "authorization_code", "code": code }))
            .await,
    )
    .await;
    assert_eq!(
        sim.rest("/rest/accounts", text(&tokens["access_token"]))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_invalid_grant(sim.refresh(text(&tokens["refresh_token"])).await).await;
    assert_invalid_grant(
        sim.token(&json!({ "grant_type": "authorization_code", "code": "made-up" }))
            .await,
    )
    .await;
    let stats = sim.ctl.stats().await.expect("stats");
    assert_eq!(stats.invalid_grant_responses, 3);
    assert_eq!(stats.families_revoked, 1);
}

#[tokio::test]
async fn codes_expire_by_the_simulated_clock() {
    let sim = Sim::start(SimConfig {
        code_ttl: Duration::from_secs(120),
        ..SimConfig::default().with_control()
    });
    let (_, code) = sim
        .consented("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    sim.ctl.advance_clock(121).await.expect("advance");
    assert_invalid_grant(
        sim.token(&json!({ "grant_type": "authorization_code", "code": code }))
            .await,
    )
    .await;
}

#[tokio::test]
async fn codes_are_bound_to_the_flows_redirect_uri() {
    let sim = Sim::with_control();
    let (_, code) = sim
        .consented("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let wrong = sim
        .token(&json!({ "grant_type": "authorization_code", "code": code, "redirect_uri": "https://evil.example/cb" }))
        .await;
    assert_invalid_grant(wrong).await;
    let right = sim
        .token(
            &json!({ "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT }),
        )
        .await;
    assert_eq!(right.status(), StatusCode::OK);
}

#[tokio::test]
async fn token_endpoint_accepts_form_bodies_and_rejects_unknown_grants() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("form-user").await.expect("grant");
    let form = format!(
        "grant_type=refresh_token&refresh_token={}",
        grant.refresh_token
    );
    let response = sim
        .http
        .post(sim.url("/auth/token"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let unknown = sim
        .token(&json!({ "grant_type": "client_credentials" }))
        .await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_name(unknown).await, "unsupported_grant_type");
    let missing = sim.token(&json!({ "refresh_token": "x" })).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_name(missing).await, "invalid_request");
}

// ---------------------------------------------------------------- 6. rotation

#[tokio::test]
async fn refresh_rotates_both_tokens_and_the_old_refresh_token_dies() {
    let sim = Sim::with_control();
    let first = sim.connect("rotate-user").await;
    let response = sim.refresh(text(&first["refresh_token"])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let second: Value = response.json().await.expect("json");
    assert_ne!(second["access_token"], first["access_token"]);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_eq!(second["expires_in"], 3600);
    let third = sim.refresh(text(&second["refresh_token"])).await;
    assert_eq!(third.status(), StatusCode::OK);
    let user = sim.ctl.user_stats("rotate-user").await.expect("stats");
    assert_eq!((user.refresh_grants, user.refresh_reuse_detected), (2, 0));
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_revokes_the_whole_family() {
    let sim = Sim::with_control();
    let other = sim.ctl.create_grant("bystander").await.expect("grant");
    let first = sim.connect("victim").await;
    let second: Value = sim
        .refresh(text(&first["refresh_token"]))
        .await
        .json()
        .await
        .expect("json");
    for token in [&first["access_token"], &second["access_token"]] {
        assert_eq!(
            sim.rest("/rest/accounts", text(token)).await.status(),
            StatusCode::OK
        );
    }
    assert_invalid_grant(sim.refresh(text(&first["refresh_token"])).await).await;
    // Every token of the family is dead now, including the newest pair.
    for token in [&first["access_token"], &second["access_token"]] {
        assert_eq!(
            sim.rest("/rest/accounts", text(token)).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_invalid_grant(sim.refresh(text(&second["refresh_token"])).await).await;
    // Other families are untouched.
    assert_eq!(
        sim.rest("/rest/accounts", &other.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        sim.refresh(&other.refresh_token).await.status(),
        StatusCode::OK
    );

    let stats = sim.ctl.stats().await.expect("stats");
    assert_eq!(stats.refresh_reuse_detected, 1);
    assert_eq!(stats.families_revoked, 1);
    assert_eq!(stats.invalid_grant_responses, 2);
    let user = sim.ctl.user_stats("victim").await.expect("stats");
    assert_eq!((user.refresh_grants, user.refresh_reuse_detected), (1, 1));
}

#[tokio::test]
async fn grace_window_allows_one_reuse_of_a_just_rotated_token() {
    let sim = Sim::start(SimConfig {
        grace_window: Duration::from_secs(30),
        ..SimConfig::default().with_control()
    });
    let grant = sim.ctl.create_grant("grace-user").await.expect("grant");
    let lost: Value = sim
        .refresh(&grant.refresh_token)
        .await
        .json()
        .await
        .expect("json");
    sim.ctl.advance_clock(10).await.expect("advance");
    let retried = sim.refresh(&grant.refresh_token).await;
    assert_eq!(retried.status(), StatusCode::OK);
    let retried: Value = retried.json().await.expect("json");
    assert_ne!(retried["refresh_token"], lost["refresh_token"]);
    assert_eq!(
        sim.rest("/rest/accounts", text(&retried["access_token"]))
            .await
            .status(),
        StatusCode::OK
    );
    // Only once.
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
    assert_eq!(
        sim.rest("/rest/accounts", text(&retried["access_token"]))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(sim.ctl.stats().await.expect("stats").grace_reuses, 1);

    // Outside the window a reuse is reuse.
    let grant = sim.ctl.create_grant("late-user").await.expect("grant");
    assert_eq!(
        sim.refresh(&grant.refresh_token).await.status(),
        StatusCode::OK
    );
    sim.ctl.advance_clock(31).await.expect("advance");
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
}

#[tokio::test]
async fn without_grace_window_an_immediate_reuse_is_detected() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("strict-user").await.expect("grant");
    assert_eq!(
        sim.refresh(&grant.refresh_token).await.status(),
        StatusCode::OK
    );
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
}

#[tokio::test]
async fn omit_refresh_token_mode_keeps_the_old_refresh_token_valid() {
    let sim = Sim::start(SimConfig {
        omit_refresh_token: true,
        ..SimConfig::default().with_control()
    });
    let grant = sim.ctl.create_grant("omit-user").await.expect("grant");
    for _ in 0..3 {
        let response = sim.refresh(&grant.refresh_token).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        assert!(body.get("refresh_token").is_none(), "{body}");
        assert_eq!(
            sim.rest("/rest/accounts", text(&body["access_token"]))
                .await
                .status(),
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn refresh_tokens_expire_after_their_lifetime() {
    let sim = Sim::start(SimConfig {
        refresh_ttl: Duration::from_secs(1000),
        ..SimConfig::default().with_control()
    });
    let grant = sim.ctl.create_grant("ttl-user").await.expect("grant");
    sim.ctl.advance_clock(900).await.expect("advance");
    let renewed: Value = sim
        .refresh(&grant.refresh_token)
        .await
        .json()
        .await
        .expect("json");
    sim.ctl.advance_clock(900).await.expect("advance");
    assert_eq!(
        sim.refresh(text(&renewed["refresh_token"])).await.status(),
        StatusCode::OK
    );

    let lapsing = sim.ctl.create_grant("ttl-user-2").await.expect("grant");
    sim.ctl.advance_clock(1000).await.expect("advance");
    assert_invalid_grant(sim.refresh(&lapsing.refresh_token).await).await;
}

#[tokio::test]
async fn default_refresh_lifetime_is_ninety_days() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("ninety").await.expect("grant");
    sim.ctl
        .advance_clock(90 * 24 * 3600)
        .await
        .expect("advance");
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
}

#[tokio::test]
async fn grants_lapse_after_the_inactivity_limit_and_data_calls_count_as_activity() {
    let sim = Sim::start(SimConfig {
        inactivity_limit: Duration::from_secs(100),
        ..SimConfig::default().with_control()
    });
    let idle = sim.ctl.create_grant("idle-user").await.expect("grant");
    let busy = sim.ctl.create_grant("busy-user").await.expect("grant");
    sim.ctl.advance_clock(60).await.expect("advance");
    assert_eq!(
        sim.rest("/rest/accounts", &busy.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    sim.ctl.advance_clock(60).await.expect("advance");
    assert_invalid_grant(sim.refresh(&idle.refresh_token).await).await;
    assert_eq!(
        sim.refresh(&busy.refresh_token).await.status(),
        StatusCode::OK
    );
}

// ---------------------------------------------------------------- 7. data

#[tokio::test]
async fn access_tokens_expire_and_unknown_tokens_are_refused() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("expiry-user").await.expect("grant");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    // The simulated clock also follows wall time, so "still valid" checks keep a wide margin.
    sim.ctl.advance_clock(3500).await.expect("advance");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    sim.ctl.advance_clock(100).await.expect("advance");
    let expired = sim.rest("/rest/accounts", &grant.access_token).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_name(expired).await, "invalid_token");
    assert_eq!(
        sim.rest("/rest/accounts", "made-up").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let missing = sim
        .http
        .get(sim.url("/rest/accounts"))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let basic = sim
        .http
        .get(sim.url("/rest/accounts"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .send()
        .await
        .expect("request");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    let stats = sim.ctl.stats().await.expect("stats");
    assert_eq!((stats.rest_requests, stats.rest_unauthorized), (6, 4));
}

#[tokio::test]
async fn expire_access_tokens_and_revoke_act_at_once() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("ctl-user").await.expect("grant");
    sim.ctl.expire_access_tokens().await.expect("expire");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let renewed: Value = sim
        .refresh(&grant.refresh_token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        sim.rest("/rest/accounts", text(&renewed["access_token"]))
            .await
            .status(),
        StatusCode::OK
    );
    sim.ctl.revoke("ctl-user").await.expect("revoke");
    assert_eq!(
        sim.rest("/rest/accounts", text(&renewed["access_token"]))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_invalid_grant(sim.refresh(text(&renewed["refresh_token"])).await).await;
}

#[tokio::test]
async fn one_time_flow_data_and_tokens_vanish_an_hour_after_the_flow() {
    let sim = Sim::with_control();
    let (flow_id, code) = sim
        .consented(
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT, "reporting_period": 6 }),
        )
        .await;
    let tokens: Value = sim
        .token(&json!({ "grant_type": "authorization_code", "code": code }))
        .await
        .json()
        .await
        .expect("json");
    let report = sim
        .rest(
            &format!("/rest/income-reports/{flow_id}"),
            text(&tokens["access_token"]),
        )
        .await;
    assert_eq!(report.status(), StatusCode::OK);
    let report: Value = report.json().await.expect("json");
    assert_eq!(report["id"], flow_id.as_str());
    assert_eq!(report["period"], 6);
    assert_eq!(
        sim.rest("/rest/income-report", text(&tokens["access_token"]))
            .await
            .status(),
        StatusCode::OK
    );

    sim.ctl.advance_clock(1800).await.expect("advance");
    let renewed: Value = sim
        .refresh(text(&tokens["refresh_token"]))
        .await
        .json()
        .await
        .expect("json");
    sim.ctl.advance_clock(1800).await.expect("advance");
    // The renewed access token would live another half hour, but the flow's data is gone.
    assert_eq!(
        sim.rest("/rest/accounts", text(&renewed["access_token"]))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_invalid_grant(sim.refresh(text(&renewed["refresh_token"])).await).await;
    let late = sim.complete_raw(&flow_id).await;
    assert_eq!(late.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn transactions_page_with_count_and_offset() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("paging-user").await.expect("grant");
    let all: Value = sim
        .rest("/rest/transactions", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    let all = all["transactions"].as_array().expect("array").clone();
    assert!(all.len() > 20);
    let page: Value = sim
        .rest("/rest/transactions?count=10&offset=5", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        page["transactions"].as_array().expect("array")[..],
        all[5..15]
    );
    let tail: Value = sim
        .rest(
            &format!("/rest/transactions?offset={}", all.len() - 3),
            &grant.access_token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(tail["transactions"].as_array().expect("array").len(), 3);
    let bad = sim
        .rest("/rest/transactions?count=abc", &grant.access_token)
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: Value = bad.json().await.expect("json");
    assert!(body["error"]["data"].get("count").is_some());

    let accounts: Value = sim
        .rest("/rest/accounts", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    let account_id = text(&accounts["accounts"][0]["account_id"]).to_owned();
    let scoped: Value = sim
        .rest(
            &format!("/rest/accounts/{account_id}/transactions?count=5&include_statistics=true"),
            &grant.access_token,
        )
        .await
        .json()
        .await
        .expect("json");
    let scoped_list = scoped["transactions"].as_array().expect("array");
    assert_eq!(scoped_list.len(), 5);
    assert!(scoped_list
        .iter()
        .all(|tx| tx["account_id"] == account_id.as_str()));
    assert!(scoped["statistics"]["total_count"].as_u64().expect("count") >= 5);

    let contracts: Value = sim
        .rest("/rest/contracts?count=2&offset=1", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(contracts.as_array().expect("top-level array").len(), 2);
}

#[tokio::test]
async fn every_data_endpoint_answers_deterministic_data() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("data-user").await.expect("grant");
    let again = sim.ctl.create_grant("data-user").await.expect("grant");
    let token = grant.access_token.as_str();
    let first = sim
        .rest("/rest/accounts", token)
        .await
        .text()
        .await
        .expect("body");
    let second = sim
        .rest("/rest/accounts", &again.access_token)
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(first, second, "same user, same data");
    let other = sim.ctl.create_grant("someone-else").await.expect("grant");
    assert_ne!(
        sim.rest("/rest/accounts", &other.access_token)
            .await
            .text()
            .await
            .expect("body"),
        first
    );

    let accounts: Value = serde_json::from_str(&first).expect("json");
    let account = &accounts["accounts"][0];
    assert!(account["balance"]["balance"].is_number());
    let account_id = text(&account["account_id"]).to_owned();
    for path in [
        format!("/rest/accounts/{account_id}"),
        format!("/rest/accounts/{account_id}/contracts"),
        format!("/rest/accounts/{account_id}/payment-partners"),
        format!("/rest/accounts/{account_id}/categories"),
        "/rest/securities".to_owned(),
        "/rest/payment-partners".to_owned(),
        "/rest/categories".to_owned(),
        "/rest/timeline?frequency=weekly&since=2025-01-01".to_owned(),
        "/rest/transactions?since=2025-05-01&until=2025-06-30&sort=asc".to_owned(),
    ] {
        assert_eq!(
            sim.rest(&path, token).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    assert_eq!(
        sim.rest("/rest/accounts/nope", token).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.rest("/rest/timeline?since=yesterday", token)
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );

    let contracts: Value = sim
        .rest("/rest/contracts", token)
        .await
        .json()
        .await
        .expect("json");
    let contract_id = text(&contracts[0]["id"]).to_owned();
    assert_eq!(
        sim.rest(&format!("/rest/contracts/{contract_id}"), token)
            .await
            .status(),
        StatusCode::OK
    );
    let deleted = sim
        .http
        .delete(sim.url(&format!("/rest/contracts/{contract_id}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        sim.rest(&format!("/rest/contracts/{contract_id}"), token)
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let remaining: Value = sim
        .rest("/rest/contracts", token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        remaining.as_array().expect("array").len() + 1,
        contracts.as_array().expect("array").len()
    );
}

#[tokio::test]
async fn reports_are_readable_by_their_own_grant_only() {
    let sim = Sim::with_control();
    let (verification, _) = sim
        .flow(
            "/onetime/account-verification",
            json!({ "redirect_uri": REDIRECT, "name": "Jane Doe" }),
        )
        .await;
    let grant = sim
        .ctl
        .create_flow_grant(&verification)
        .await
        .expect("grant");
    let report: Value = sim
        .rest(
            &format!("/rest/account-verifications/{verification}"),
            &grant.access_token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(report["matched"]["affinity"], "VERY_HIGH");
    assert_eq!(report["provided"]["name"], "Jane Doe");

    let (risk, _) = sim
        .flow(
            "/ongoing/risk-report",
            json!({ "redirect_uri": REDIRECT, "user_id": "risky" }),
        )
        .await;
    let risky = sim.ctl.create_flow_grant(&risk).await.expect("grant");
    let report: Value = sim
        .rest(&format!("/rest/risk-reports/{risk}"), &risky.access_token)
        .await
        .json()
        .await
        .expect("json");
    assert!(report["score"].is_u64());
    // Someone else's grant cannot read it.
    let stranger = sim.ctl.create_grant("stranger").await.expect("grant");
    assert_eq!(
        sim.rest(
            &format!("/rest/risk-reports/{risk}"),
            &stranger.access_token
        )
        .await
        .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.rest(
            &format!("/rest/account-verifications/{verification}"),
            &stranger.access_token
        )
        .await
        .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn client_level_data_calls_work_with_basic_auth() {
    let sim = Sim::with_control();
    let tree = sim
        .http
        .get(sim.url("/category-tree"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .send()
        .await
        .expect("request");
    assert_eq!(tree.status(), StatusCode::OK);
    let tree: Value = tree.json().await.expect("json");
    assert!(!tree["categories"].as_array().expect("array").is_empty());

    let categorized = sim
        .post_basic("/rpc/categorize", &json!({ "transactions": [{ "id": "t1", "name": "REWE Markt Berlin", "amount": -12.3 }] }))
        .await;
    assert_eq!(categorized.status(), StatusCode::OK);
    let categorized: Value = categorized.json().await.expect("json");
    assert_eq!(
        categorized["transactions"][0]["category"]["name"],
        "Groceries"
    );
    let invalid = sim
        .post_basic("/rpc/categorize", &json!({ "transactions": "no" }))
        .await;
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);

    let (payment, _) = sim
        .flow("/onetime/payment", json!({ "redirect_uri": REDIRECT, "payment": { "creditor": { "iban": "DE02120300000000202051", "name": "Shop" }, "amount": { "value": 9.99, "currency": "EUR" }, "purpose": "Order 7" } }))
        .await;
    sim.ctl
        .complete_widget(&payment, "success")
        .await
        .expect("complete");
    let receipt = sim.receipt(&payment).await;
    assert_eq!(receipt.status(), StatusCode::OK);
    let receipt: Value = receipt.json().await.expect("json");
    assert_eq!(receipt["purpose"], "Order 7");
}

// ---------------------------------------------------------------- 8. control plane and faults

#[tokio::test]
async fn control_plane_is_off_by_default() {
    let sim = Sim::start(SimConfig::default());
    for path in ["/_sim/stats", "/_sim/seen-headers"] {
        assert_eq!(
            sim.http
                .get(sim.url(path))
                .send()
                .await
                .expect("request")
                .status(),
            StatusCode::NOT_FOUND
        );
    }
    for path in [
        "/_sim/grants",
        "/_sim/clock/advance",
        "/_sim/faults",
        "/_sim/reset",
        "/_sim/revoke",
        "/_sim/expire-access-tokens",
        "/_sim/widget/x/complete",
    ] {
        let response = sim
            .http
            .post(sim.url(path))
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert!(sim.ctl.stats().await.is_err());
}

#[tokio::test]
async fn seen_headers_show_what_reached_the_simulator() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("seen-user").await.expect("grant");
    sim.http
        .get(sim.url("/rest/accounts"))
        .bearer_auth(&grant.access_token)
        .header("x-trace", "t-1")
        .send()
        .await
        .expect("request");
    let last = sim
        .ctl
        .last_request()
        .await
        .expect("seen")
        .expect("one request");
    assert_eq!(last.method, "GET");
    assert_eq!(last.path, "/rest/accounts");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {}", grant.access_token).as_str())
    );
    assert_eq!(last.header("X-Trace"), Some("t-1"));
    assert!(last.header("cookie").is_none());
    // Control-plane calls are not recorded.
    sim.ctl.stats().await.expect("stats");
    assert_eq!(sim.ctl.seen_headers(10).await.expect("seen").len(), 1);
}

#[tokio::test]
async fn latency_fault_delays_but_still_answers() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("slow-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            token_latency_ms: 150,
            data_latency_ms: 150,
            ..Faults::default()
        })
        .await
        .expect("faults");
    let started = Instant::now();
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(
        sim.refresh(&grant.refresh_token).await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn error_faults_answer_5xx_and_leave_tokens_alone() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("flaky-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            token_error_rate: 1.0,
            data_error_rate: 1.0,
            error_status: 503,
            ..Faults::default()
        })
        .await
        .expect("faults");
    let refused = sim.refresh(&grant.refresh_token).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["group"], "server");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    sim.ctl.reset().await.expect("reset");
    // The refused refresh did not rotate anything.
    assert_eq!(
        sim.refresh(&grant.refresh_token).await.status(),
        StatusCode::OK
    );
    assert!(sim.ctl.stats().await.expect("stats").faults_injected >= 2);
}

#[tokio::test]
async fn rate_limit_fault_answers_429_with_retry_after_within_its_budget() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("limited-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            token_rate_limit_rate: 1.0,
            data_rate_limit_rate: 1.0,
            retry_after_secs: 7,
            budget: Some(2),
            ..Faults::default()
        })
        .await
        .expect("faults");
    let limited = sim.refresh(&grant.refresh_token).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()[header::RETRY_AFTER], "7");
    let limited = sim.rest("/rest/accounts", &grant.access_token).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()[header::RETRY_AFTER], "7");
    // Budget spent: back to normal.
    assert_eq!(
        sim.refresh(&grant.refresh_token).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn lost_response_fault_closes_the_connection_after_rotating() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("lost-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            lost_response_rate: 1.0,
            budget: Some(1),
            ..Faults::default()
        })
        .await
        .expect("faults");
    let outcome = sim
        .http
        .post(sim.url("/auth/token"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .json(&json!({ "grant_type": "refresh_token", "refresh_token": grant.refresh_token }))
        .send()
        .await;
    assert!(
        outcome.is_err(),
        "expected a connection error, got {outcome:?}"
    );
    let stats = sim.ctl.stats().await.expect("stats");
    assert_eq!((stats.refresh_grants, stats.lost_responses), (1, 1));
    // The refresh happened: the old refresh token is rotated, so using it is reuse.
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
    assert_eq!(
        sim.ctl.stats().await.expect("stats").refresh_reuse_detected,
        1
    );
}

#[tokio::test]
async fn delayed_token_answers_rotate_at_once_and_answer_later() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("slow-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            token_answer_delay_ms: 60_000,
            ..Faults::default()
        })
        .await
        .expect("faults");
    // A client that gives up before the answer arrives...
    let outcome = sim
        .http
        .post(sim.url("/auth/token"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .timeout(std::time::Duration::from_millis(300))
        .json(&json!({ "grant_type": "refresh_token", "refresh_token": grant.refresh_token }))
        .send()
        .await;
    assert!(outcome.is_err(), "expected a timeout, got {outcome:?}");
    // ...has already rotated the token: the grant took effect before the answer was sent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.ctl.stats().await.expect("stats").refresh_grants != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the grant never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    sim.ctl
        .set_faults(&Faults::default())
        .await
        .expect("faults");
    assert_invalid_grant(sim.refresh(&grant.refresh_token).await).await;
}

#[tokio::test]
async fn reset_clears_faults_and_optionally_state() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("reset-user").await.expect("grant");
    sim.ctl
        .set_faults(&Faults {
            data_error_rate: 1.0,
            ..Faults::default()
        })
        .await
        .expect("faults");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    sim.ctl.reset().await.expect("reset");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::OK
    );
    sim.ctl.reset_all().await.expect("reset");
    assert_eq!(
        sim.rest("/rest/accounts", &grant.access_token)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(sim.ctl.stats().await.expect("stats").rest_requests, 1);
}

// ---------------------------------------------------------------- 9. robustness

#[tokio::test]
async fn malformed_json_is_a_finx_400() {
    let sim = Sim::with_control();
    for path in [
        "/auth/token",
        "/onetime/access",
        "/rpc/categorize",
        "/_sim/grants",
    ] {
        let response = sim
            .http
            .post(sim.url(path))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .header(header::CONTENT_TYPE, "application/json")
            .body("{\"grant_type\": ")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_name(response).await, "bad_request");
    }
    for body in ["[]", "42", "\"x\""] {
        let response = sim
            .http
            .post(sim.url("/onetime/access"))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let sim = Sim::start(SimConfig {
        max_body_bytes: 1024,
        ..SimConfig::default()
    });
    let big = format!("{{\"redirect_uri\": \"{}\"}}", "a".repeat(4096));
    for path in ["/auth/token", "/onetime/access"] {
        let response = sim
            .http
            .post(sim.url(path))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .header(header::CONTENT_TYPE, "application/json")
            .body(big.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["status"], 413);
    }
    // Chunked (no Content-Length) bodies are cut off too.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .expect("connect");
    let request = format!(
        "POST /onetime/access HTTP/1.1\r\nHost: sim\r\nAuthorization: Basic ZGVtby1jbGllbnQ6ZGVtby1zZWNyZXQ=\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_finx_errors() {
    let sim = Sim::with_control();
    let missing = sim
        .http
        .get(sim.url("/nope"))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_name(missing).await, "not_found");
    let wrong_method = sim
        .http
        .get(sim.url("/auth/token"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_name(wrong_method).await, "method_not_allowed");
    // On /rest, authentication comes before routing: an unsupported method with a bad token is
    // 401, with a good one 405.
    let grant = sim.ctl.create_grant("method-user").await.expect("grant");
    let post = |token: &str| {
        sim.http
            .post(sim.url("/rest/accounts"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        post("not-a-token").await.expect("request").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&grant.access_token).await.expect("request").status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    let odd = sim
        .http
        .get(sim.url("/rest/accounts/%FF%FE"))
        .bearer_auth("x")
        .send()
        .await
        .expect("request");
    assert!(odd.status().is_client_error());
}

// ---------------------------------------------------------------- 10. as finX's guides and examples have it

#[tokio::test]
async fn flow_bodies_take_booleans_and_numbers_spelled_as_strings() {
    let sim = Sim::with_control();
    // finX's own risk-report and ongoing-payment examples, as published.
    let risk = json!({
        "state": "test123",
        "redirect_uri": "http://localhost",
        "language": "de",
        "account_types": ["Giro account"],
        "name": "Hans-Peter Meier",
        "reporting_period": "12",
        "allow_multi_selection": "true",
        "user_id": "postman-risk-report@qwist.com",
    });
    sim.flow("/ongoing/risk-report", risk.clone()).await;
    let mut onetime_risk = risk;
    onetime_risk
        .as_object_mut()
        .expect("object")
        .remove("user_id");
    let (risk_flow, _) = sim.flow("/onetime/risk-report", onetime_risk).await;
    let payment = json!({
        "state": "b0bc2e10-838f-4955-b8a6-733666049655",
        "redirect_uri": "http://localhost",
        "language": "de",
        "save_secrets": "false",
        "user_id": "postman-collection@qwist.com",
        "payment": {
            "creditor": { "iban": "DE86990003540000002000", "name": "Peter Jackson" },
            "debtor": { "iban": "DE07900948150000002000" },
            "amount": { "value": 57.99, "currency": "EUR" },
            "purpose": "Thank you for the fish",
            "end_to_end_reference": "124/473294/384785",
        },
    });
    sim.flow("/ongoing/payment", payment).await;
    // Every usual spelling, wherever a boolean or a number is expected.
    let (_, location) = sim
        .flow(
            "/ongoing/access",
            json!({ "redirect_uri": REDIRECT, "user_id": "u1", "allow_multi_selection": "False", "save_secrets": "TRUE", "sync_period": "365" }),
        )
        .await;
    assert!(location.contains("/widget/"));
    sim.flow(
        "/onetime/income-report",
        json!({ "redirect_uri": REDIRECT, "reporting_period": "6" }),
    )
    .await;
    let (amount_as_text, _) = sim
        .flow("/onetime/payment", json!({ "redirect_uri": REDIRECT, "payment": { "creditor": { "iban": "DE86990003540000002000", "name": "P" }, "amount": { "value": "0.25", "currency": "EUR" }, "purpose": "p" } }))
        .await;
    sim.ctl
        .complete_widget(&amount_as_text, "success")
        .await
        .expect("complete");
    let receipt: Value = sim
        .receipt(&amount_as_text)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(receipt["amount"]["value"], 0.25, "stored as a number");
    // The spelled-out number is the number.
    let grant = sim.ctl.create_flow_grant(&risk_flow).await.expect("grant");
    let report: Value = sim
        .rest(
            &format!("/rest/risk-reports/{risk_flow}"),
            &grant.access_token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(report["period"], 12);
}

#[tokio::test]
async fn flow_bodies_still_refuse_what_is_no_boolean_or_number_in_any_spelling() {
    let sim = Sim::start(SimConfig::default());
    let response = sim
        .post_basic(
            "/ongoing/access",
            &json!({ "redirect_uri": REDIRECT, "user_id": "u1", "allow_multi_selection": "yes", "save_secrets": 1, "sync_period": "90 days" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    let data = &body["error"]["data"];
    assert_eq!(data["allow_multi_selection"], json!(["Must be a boolean."]));
    assert_eq!(data["save_secrets"], json!(["Must be a boolean."]));
    assert!(data["sync_period"][0].is_string(), "{body}");
    for (path, body, field) in [
        (
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT, "reporting_period": "12.5" }),
            "reporting_period",
        ),
        (
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT, "reporting_period": "3" }),
            "reporting_period",
        ),
        (
            "/onetime/access",
            json!({ "redirect_uri": REDIRECT, "sync_period": [90] }),
            "sync_period",
        ),
        (
            "/onetime/access",
            json!({ "redirect_uri": REDIRECT, "sync_period": "-1" }),
            "sync_period",
        ),
        (
            "/onetime/payment",
            json!({ "redirect_uri": REDIRECT, "payment": { "creditor": { "iban": "DE86990003540000002000", "name": "P" }, "amount": { "value": "1e3", "currency": "EUR" }, "purpose": "p" } }),
            "payment.amount.value",
        ),
        (
            "/onetime/account-verification",
            json!({ "redirect_uri": REDIRECT, "name": "N", "readout": true }),
            "readout",
        ),
        (
            "/onetime/account-verification",
            json!({ "redirect_uri": REDIRECT, "name": "N", "readout": ["EVERYTHING"] }),
            "readout",
        ),
    ] {
        let response = sim.post_basic(path, &body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.expect("json");
        assert!(
            answer["error"]["data"][field][0].is_string(),
            "{field} not named in {answer}"
        );
    }
}

#[tokio::test]
async fn flow_bodies_take_finx_s_other_documented_shapes() {
    let sim = Sim::start(SimConfig::default());
    // `readout` is a list; no upper limit on the history asked for (a bank gives what it has).
    sim.flow(
        "/onetime/account-verification",
        json!({ "redirect_uri": REDIRECT, "language": "de", "name": "Max Mustermann", "account": "DE93300308800013441006", "readout": [] }),
    )
    .await;
    sim.flow(
        "/onetime/payment",
        json!({ "redirect_uri": REDIRECT, "readout": ["ACCOUNTS", "TRANSACTIONS"], "payment": { "creditor": { "iban": "DE86990003540000002000", "name": "P" }, "amount": { "value": 1, "currency": "EUR" }, "purpose": "p" } }),
    )
    .await;
    sim.flow(
        "/onetime/access",
        json!({ "redirect_uri": REDIRECT, "sync_period": 3650 }),
    )
    .await;
    let (flow_id, _) = sim
        .flow(
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT, "reporting_period": 36 }),
        )
        .await;
    // Flow ids look like finX's: UUIDs.
    let groups: Vec<usize> = flow_id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{flow_id}");
    assert!(flow_id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn payment_receipts_follow_the_flow_from_pending_to_executed_cancelled_or_failed() {
    let sim = Sim::with_control();
    let order = |extra: Value| {
        let mut body = json!({ "redirect_uri": REDIRECT, "user_id": "payer", "payment": { "creditor": { "iban": "DE86990003540000002000", "name": "Peter Jackson" }, "amount": { "value": 57.99, "currency": "EUR" }, "purpose": "Thank you for the fish" } });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                body["payment"][key] = value;
            }
        }
        body
    };
    let (executed, _) = sim
        .flow(
            "/onetime/payment",
            order(json!({ "sepa_purpose_code": "GDDS" })),
        )
        .await;
    let pending: Value = sim.receipt(&executed).await.json().await.expect("json");
    assert_eq!(pending["id"], executed.as_str());
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["submitted_at"], Value::Null);
    assert_eq!(pending["creditor"]["name"], "Peter Jackson");
    sim.ctl
        .complete_widget(&executed, "success")
        .await
        .expect("complete");
    let receipt: Value = sim.receipt(&executed).await.json().await.expect("json");
    assert_eq!(receipt["status"], "executed");
    assert_eq!(
        receipt["amount"],
        json!({ "value": 57.99, "currency": "EUR" })
    );
    assert_eq!(receipt["purpose"], "Thank you for the fish");
    assert_eq!(receipt["sepa_purpose_code"], "GDDS");
    assert_eq!(receipt["type"], "SEPA transfer");
    assert!(text(&receipt["debtor"]["iban"]).starts_with("DE"));
    assert!(!text(&receipt["end_to_end_reference"]).is_empty());
    let submitted = text(&receipt["submitted_at"]);
    assert!(
        submitted.len() == 20 && submitted.ends_with('Z'),
        "{submitted}"
    );

    let (cancelled, _) = sim
        .flow(
            "/ongoing/payment",
            order(json!({ "debtor": { "iban": "DE07900948150000002000" }, "end_to_end_reference": "124/473294/384785" })),
        )
        .await;
    sim.ctl
        .complete_widget(&cancelled, "abort")
        .await
        .expect("complete");
    let receipt: Value = sim.receipt(&cancelled).await.json().await.expect("json");
    assert_eq!(receipt["status"], "cancelled");
    assert_eq!(receipt["debtor"]["iban"], "DE07900948150000002000");
    assert_eq!(receipt["end_to_end_reference"], "124/473294/384785");
    assert_eq!(receipt["submitted_at"], Value::Null);

    let (failed, _) = sim.flow("/ongoing/payment", order(json!({}))).await;
    sim.ctl
        .complete_widget(&failed, "error")
        .await
        .expect("complete");
    let receipt: Value = sim.receipt(&failed).await.json().await.expect("json");
    assert_eq!(receipt["status"], "failed");

    // Only payment flows have receipts.
    let (access, _) = sim
        .flow("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    for id in [access.as_str(), "3ca31c37-986a-454e-ad64-8e97143c86bc"] {
        assert_eq!(sim.receipt(id).await.status(), StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn categorize_takes_finx_s_bare_array_and_answers_in_kind() {
    let sim = Sim::start(SimConfig::default());
    let response = sim
        .post_basic(
            "/rpc/categorize",
            &json!([
                { "currency": "EUR", "name": "REWE Hamburg EppenHamburg", "amount": -36.10, "booked": true, "id": "T1.45", "purpose": "Bargeld" },
                { "currency": "EUR", "name": "Hansen Immobilien KG", "amount": "4450.00", "id": "T1.50", "purpose": "Lohn/Gehalt" },
            ]),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("json");
    let items = answer.as_array().expect("an array for an array");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "T1.45");
    assert_eq!(items[0]["booked"], true, "other fields pass through");
    assert_eq!(items[0]["category"]["name"], "Groceries");
    assert_eq!(
        items[1]["category"]["name"], "Income",
        "a text amount is a number"
    );
    for bad in [json!([{ "name": "no id" }]), json!([1]), json!("x")] {
        let response = sim.post_basic("/rpc/categorize", &bad).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn validation_errors_list_their_messages_per_field() {
    let sim = Sim::start(SimConfig::default());
    let response = sim
        .post_basic("/onetime/access", &json!({ "redirect_uri": "not a url" }))
        .await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], 1000);
    assert_eq!(body["error"]["group"], "client");
    assert_eq!(
        body["error"]["data"],
        json!({ "redirect_uri": ["Must be an absolute http(s) URL."] })
    );
}

/// The query of a redirect as ordered (name, value) pairs.
fn pairs_of(url: &str) -> Vec<(String, String)> {
    let url = url::Url::parse(url).expect("redirect is a URL");
    url.query_pairs().into_owned().collect()
}

fn names(pairs: &[(String, String)]) -> Vec<&str> {
    pairs.iter().map(|(name, _)| name.as_str()).collect()
}

#[tokio::test]
async fn redirect_parameters_come_in_the_order_of_finx_s_guides() {
    let sim = Sim::with_control();
    let start = |state: Option<&str>| {
        let mut body = json!({ "redirect_uri": "http://localhost" });
        if let Some(state) = state {
            body["state"] = json!(state);
        }
        sim.flow("/onetime/access", body)
    };
    // Success: code first, then state, success, flow_id and abort=false.
    let (flow_id, _) = start(Some("7fe78733")).await;
    let callback = sim
        .ctl
        .complete_widget(&flow_id, "success")
        .await
        .expect("complete");
    let pairs = pairs_of(&callback);
    assert_eq!(
        names(&pairs),
        ["code", "state", "success", "flow_id", "abort"],
        "{callback}"
    );
    assert_eq!(pairs[1].1, "7fe78733");
    assert_eq!(
        (pairs[2].1.as_str(), pairs[4].1.as_str()),
        ("true", "false")
    );
    assert_eq!(pairs[3].1, flow_id);
    // The way finX's client scripts read the code: the first parameter's value.
    let first_value = callback
        .split('&')
        .next()
        .and_then(|first| first.split('=').nth(1))
        .expect("a first parameter");
    assert_eq!(first_value, pairs[0].1);
    let exchanged = sim
        .token(&json!({ "grant_type": "authorization_code", "code": first_value }))
        .await;
    assert_eq!(exchanged.status(), StatusCode::OK);

    // Cancel: no code; success=false&cancel=true&abort=true.
    let (flow_id, _) = start(Some("s")).await;
    let callback = sim
        .ctl
        .complete_widget(&flow_id, "abort")
        .await
        .expect("complete");
    let pairs = pairs_of(&callback);
    assert_eq!(
        pairs,
        [
            ("state".to_owned(), "s".to_owned()),
            ("success".to_owned(), "false".to_owned()),
            ("cancel".to_owned(), "true".to_owned()),
            ("abort".to_owned(), "true".to_owned()),
            ("flow_id".to_owned(), flow_id.clone()),
        ]
    );

    // A failure is no cancel; without a state there is no state parameter.
    let (flow_id, _) = start(None).await;
    let callback = sim
        .ctl
        .complete_widget(&flow_id, "error")
        .await
        .expect("complete");
    assert_eq!(
        pairs_of(&callback),
        [
            ("success".to_owned(), "false".to_owned()),
            ("flow_id".to_owned(), flow_id.clone()),
            ("abort".to_owned(), "false".to_owned()),
        ]
    );

    // A redirect_uri's own query stays in front.
    let (flow_id, _) = sim
        .flow("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let callback = sim
        .ctl
        .complete_widget(&flow_id, "success")
        .await
        .expect("complete");
    assert_eq!(
        names(&pairs_of(&callback)),
        ["tenant", "code", "success", "flow_id", "abort"]
    );
}

#[tokio::test]
async fn timeline_breaks_the_totals_down_per_account() {
    let sim = Sim::with_control();
    // A user with three accounts (the data is deterministic per user id).
    let mut user = None;
    for n in 0..20 {
        let grant = sim
            .ctl
            .create_grant(&format!("timeline-{n}"))
            .await
            .expect("grant");
        let accounts: Value = sim
            .rest("/rest/accounts", &grant.access_token)
            .await
            .json()
            .await
            .expect("json");
        if accounts["accounts"].as_array().expect("array").len() == 3 {
            user = Some((grant, accounts));
            break;
        }
    }
    let (grant, accounts) = user.expect("a user with three accounts");
    let ids: Vec<&str> = accounts["accounts"]
        .as_array()
        .expect("array")
        .iter()
        .map(|a| text(&a["account_id"]))
        .collect();
    let timeline: Value = sim
        .rest("/rest/timeline", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(timeline["frequency"], "monthly");
    let per_account = timeline["accounts"].as_array().expect("accounts[]");
    let listed: Vec<&str> = per_account.iter().map(|a| text(&a["account_id"])).collect();
    assert_eq!(
        listed, ids,
        "one entry per account, even without transactions"
    );
    // The totals are the sums of the accounts' periods.
    for period in timeline["timeline"].as_array().expect("totals") {
        let name = &period["period"];
        let income: f64 = per_account
            .iter()
            .flat_map(|a| a["timeline"].as_array().expect("array"))
            .filter(|p| p["period"] == *name)
            .map(|p| p["income"].as_f64().expect("number"))
            .sum();
        let total = period["income"].as_f64().expect("number");
        assert!(
            (income - total).abs() < 0.011,
            "{name}: {income} vs {total}"
        );
    }
    // The filters restrict both; the documented frequencies and coarse dates are taken.
    let filtered: Value = sim
        .rest(
            &format!(
                "/rest/timeline?accounts={}&frequency=quarterly&since=2025&until=2025-05",
                ids[1]
            ),
            &grant.access_token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(filtered["accounts"].as_array().expect("array").len(), 1);
    assert_eq!(filtered["accounts"][0]["account_id"], ids[1]);
    for period in filtered["timeline"].as_array().expect("array") {
        assert!(
            ["2025-Q1", "2025-Q2"].contains(&text(&period["period"])),
            "{period}"
        );
    }
    let yearly: Value = sim
        .rest("/rest/timeline?frequency=yearly", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    assert!(yearly["timeline"]
        .as_array()
        .expect("array")
        .iter()
        .all(|p| text(&p["period"]).len() == 4));
    let partners: Value = sim
        .rest("/rest/payment-partners", &grant.access_token)
        .await
        .json()
        .await
        .expect("json");
    let partner = text(&partners[0]["id"]);
    let one_partner = sim
        .rest(
            &format!("/rest/timeline?payment_partners={partner}&categories=11,21,22"),
            &grant.access_token,
        )
        .await;
    assert_eq!(one_partner.status(), StatusCode::OK);
    for (query, field) in [
        ("frequency=hourly", "frequency"),
        ("since=2025-6", "since"),
        ("categories=food", "categories"),
    ] {
        let bad = sim
            .rest(&format!("/rest/timeline?{query}"), &grant.access_token)
            .await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = bad.json().await.expect("json");
        assert!(body["error"]["data"][field][0].is_string(), "{body}");
    }
}

#[tokio::test]
async fn control_plane_refuses_unknown_fields_and_names_them() {
    let sim = Sim::with_control();
    // A misspelt fault injects nothing and says so.
    let response = sim
        .http
        .post(sim.url("/_sim/faults"))
        .json(&json!({ "token_eror_rate": 1.0 }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["error"]["data"]["token_eror_rate"],
        json!(["Unknown field."])
    );
    assert_eq!(sim.ctl.stats().await.expect("stats").faults_injected, 0);
    let faults: Faults = sim
        .http
        .get(sim.url("/_sim/faults"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(faults, Faults::default());

    let (flow_id, _) = sim
        .flow("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    for (path, body, field) in [
        ("/_sim/grants", json!({ "user": "u1" }), "user"),
        (
            "/_sim/grants",
            json!({ "user_id": "u1", "scope": "x" }),
            "scope",
        ),
        ("/_sim/clock/advance", json!({ "secs": 10 }), "secs"),
        ("/_sim/clock/advance", json!({}), "seconds"),
        (
            "/_sim/revoke",
            json!({ "user_id": "u1", "all": true }),
            "all",
        ),
        ("/_sim/reset", json!({ "states": true }), "states"),
        (
            "/_sim/expire-access-tokens",
            json!({ "user_id": "u1" }),
            "user_id",
        ),
        (
            &format!("/_sim/widget/{flow_id}/complete"),
            json!({ "outcome": "success", "state": "x" }),
            "state",
        ),
    ] {
        let response = sim
            .http
            .post(sim.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        let answer: Value = response.json().await.expect("json");
        assert!(
            answer["error"]["data"][field][0].is_string(),
            "{path}: {field} not named in {answer}"
        );
    }
    for query in [
        "stats?usr=u1",
        "seen-headers?limt=5",
        "seen-headers?limit=many",
    ] {
        let response = sim
            .http
            .get(sim.url(&format!("/_sim/{query}")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    // Nothing of the refused calls took effect: the flow is still pending.
    let redirect = sim
        .ctl
        .complete_widget(&flow_id, "success")
        .await
        .expect("complete");
    assert!(redirect.contains("code="));
    // Empty bodies still work where every field is optional.
    for path in ["/_sim/reset", "/_sim/expire-access-tokens"] {
        let response = sim.http.post(sim.url(path)).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "{path}");
    }
}

#[tokio::test]
async fn code_exchange_takes_an_empty_redirect_uri_as_not_sent() {
    let sim = Sim::with_control();
    let (_, code) = sim
        .consented("/onetime/access", json!({ "redirect_uri": REDIRECT }))
        .await;
    let exchanged = sim
        .token(&json!({ "grant_type": "authorization_code", "code": code, "redirect_uri": "" }))
        .await;
    assert_eq!(exchanged.status(), StatusCode::OK);
}

#[tokio::test]
async fn reports_have_the_shape_of_finx_s_published_examples() {
    let sim = Sim::with_control();
    let report = |path: String, token: String| {
        let sim = &sim;
        async move {
            let response = sim.rest(&path, &token).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            response.json::<Value>().await.expect("json")
        }
    };
    let summary_keys = ["average", "count", "high", "low", "total"];
    let keys = |value: &Value| -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
        keys.sort_unstable();
        keys
    };

    let (income, _) = sim
        .flow(
            "/onetime/income-report",
            json!({ "redirect_uri": REDIRECT, "reporting_period": 12 }),
        )
        .await;
    let grant = sim.ctl.create_flow_grant(&income).await.expect("grant");
    let income = report(format!("/rest/income-reports/{income}"), grant.access_token).await;
    assert_eq!(income["period"], 12);
    assert_eq!(keys(&income["income"]["summary"]), summary_keys);
    assert!(
        income["income"]["summary"]["count"]
            .as_u64()
            .expect("count")
            > 0
    );
    let primary = &income["income"]["primary"];
    assert!(primary["category"]["name"].is_string(), "{primary}");
    assert!(primary["payment_partner"].is_string(), "{primary}");
    for group in ["regular_expenses", "variable_expenses"] {
        for entry in income[group].as_array().expect(group) {
            assert_eq!(keys(&entry["summary"]), summary_keys);
            let stream = &entry["streams"][0];
            assert!(stream["first_booked_on"].as_str() <= stream["last_booked_on"].as_str());
        }
    }
    let disposable = &income["disposable_income"];
    let discretionary = &income["discretionary_income"];
    assert!(disposable["ratio"].is_number() && discretionary["ratio"].is_number());
    assert!(
        discretionary["total"].as_f64() <= disposable["total"].as_f64(),
        "{income}"
    );

    let (verification, _) = sim
        .flow(
            "/onetime/account-verification",
            json!({ "redirect_uri": REDIRECT, "name": "Max Mismatch", "account": "DE93300308800013441006" }),
        )
        .await;
    let grant = sim
        .ctl
        .create_flow_grant(&verification)
        .await
        .expect("grant");
    let verification = report(
        format!("/rest/account-verifications/{verification}"),
        grant.access_token,
    )
    .await;
    assert_eq!(
        verification["provided"],
        json!({ "name": "Max Mismatch", "iban": "DE93300308800013441006" })
    );
    assert_eq!(verification["matched"]["affinity"], "LOW");
    assert!(verification["matched"]["name"].is_string());
    assert_eq!(
        keys(&verification["account"]),
        ["currency", "iban", "name", "owners", "type"]
    );

    let (risk, _) = sim
        .flow(
            "/onetime/risk-report",
            json!({ "redirect_uri": REDIRECT, "name": "Hans-Peter Meier" }),
        )
        .await;
    let grant = sim.ctl.create_flow_grant(&risk).await.expect("grant");
    let risk = report(format!("/rest/risk-reports/{risk}"), grant.access_token).await;
    assert_eq!(risk["period"], 12, "the default");
    let account = &risk["accounts"][0];
    assert_eq!(account["is_main_account"], true);
    assert!(account["balance"]["average"]["three_months"].is_number());
    assert_eq!(
        account["verification_result"]["provided"]["name"],
        "Hans-Peter Meier"
    );
    assert_eq!(keys(&risk["income"]["regular"]["summary"]), summary_keys);
    assert!(risk["income"]["variable"]["streams"].is_array());
}

#[test]
fn spawn_and_drop_from_sync_code() {
    let handle = sim::spawn(SimConfig::default()).expect("spawn");
    assert_eq!(handle.addr().ip().to_string(), "127.0.0.1");
    assert_ne!(handle.addr().port(), 0);
    assert_eq!(handle.base_url(), format!("http://{}", handle.addr()));
    drop(handle);
}

#[tokio::test]
async fn codes_vary_in_length_like_finx_s_jwt_codes() {
    let sim = Sim::with_control();
    let mut lengths = Vec::new();
    for _ in 0..6 {
        let (_, code) = sim
            .consented("/onetime/access", json!({ "redirect_uri": REDIRECT }))
            .await;
        assert!((200..=1200).contains(&code.len()), "{}", code.len());
        assert!(code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        lengths.push(code.len());
    }
    lengths.sort_unstable();
    lengths.dedup();
    assert!(lengths.len() > 1, "code lengths vary: {lengths:?}");
}

#[tokio::test]
async fn an_empty_refresh_scope_keeps_the_granted_scope() {
    let sim = Sim::with_control();
    let first = sim.connect("empty-scope").await;
    let response = sim
        .token(&json!({
            "grant_type": "refresh_token",
            "refresh_token": text(&first["refresh_token"]),
            "scope": ""
        }))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let renewed: Value = response.json().await.expect("json");
    assert_eq!(renewed["scope"], first["scope"], "as if no scope was sent");
    // A scope beyond the grant is still refused.
    let widened = sim
        .token(&json!({
            "grant_type": "refresh_token",
            "refresh_token": text(&renewed["refresh_token"]),
            "scope": "accounts=rw"
        }))
        .await;
    assert_eq!(widened.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn empty_query_parameters_count_as_not_sent() {
    let sim = Sim::with_control();
    let grant = sim.ctl.create_grant("empty-query").await.expect("grant");
    for (path, plain) in [
        (
            "/rest/timeline?since=&until=&frequency=&currency=",
            "/rest/timeline",
        ),
        (
            "/rest/transactions?since=&until=&offset=&count=",
            "/rest/transactions",
        ),
        ("/rest/categories?since=", "/rest/categories"),
    ] {
        let with_empty = sim.rest(path, &grant.access_token).await;
        assert_eq!(with_empty.status(), StatusCode::OK, "{path}");
        let with_empty: Value = with_empty.json().await.expect("json");
        let without: Value = sim
            .rest(plain, &grant.access_token)
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(with_empty, without, "{path}");
    }
    // A value that is there is still checked.
    assert_eq!(
        sim.rest("/rest/timeline?since=yesterday", &grant.access_token)
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
}
