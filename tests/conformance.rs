//! finX conformance: every finX flow driven against the simulator the way a plain finX client
//! drives finX, over HTTP only and with the control plane off.
//!
//! Each flow is created with HTTP Basic and the example body of finX's guide or published
//! example for it (verbatim, template placeholders filled in), completed by following the widget
//! page like a browser (submitting the form of its Connect button), its code read off the
//! redirect the way finX's client scripts read it (the first parameter's value), exchanged and
//! refreshed with exactly the bodies the guides show, and then every data endpoint of the
//! flow's product is called. Nothing here knows the simulator's internals: assertions are about
//! the shapes finX documents.

use finx_gateway::sim::{self, SimConfig, SimHandle, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};
use url::Url;

/// The redirect_uri of finX's implementation guides.
const GUIDE_CALLBACK: &str = "https://my-app.example.com/callback";
/// The refresh request of finX's multibanking guide, with its scope.
const GUIDE_SCOPE: &str = "accounts=ro balance=ro transactions=ro offline";

/// A plain finX client: HTTP Basic for the client calls, Bearer for `/rest`.
struct FinxClient {
    base: String,
    http: reqwest::Client,
    _sim: SimHandle,
}

/// What the guides say a token answer holds.
struct Tokens {
    access_token: String,
    refresh_token: String,
}

impl FinxClient {
    fn start() -> FinxClient {
        let sim = sim::spawn(SimConfig::default()).expect("simulator starts");
        FinxClient {
            base: sim.base_url(),
            // A browser-like client that shows us each redirect instead of following it.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            _sim: sim,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST` a raw JSON body with client auth.
    async fn post_basic(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .basic_auth(DEMO_CLIENT_ID, Some(DEMO_CLIENT_SECRET))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request")
    }

    /// Creates a flow: 201 with `location` and `id`.
    async fn create_flow(&self, path: &str, body: &str) -> (String, String) {
        let response = self.post_basic(path, body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{path}: {body}");
        let answer: Value = response.json().await.expect("json");
        let location = text(&answer["location"]).to_owned();
        let id = text(&answer["id"]).to_owned();
        (id, location)
    }

    /// Opens the widget at `location` and presses the button labelled `label`; returns the URL
    /// the browser is sent back to.
    async fn widget(&self, location: &str, label: &str) -> Url {
        let page_url = Url::parse(location).expect("location is a URL");
        let page = self.http.get(page_url.clone()).send().await.expect("page");
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.expect("html");
        let form = Form::parse(&html, label).expect("the widget has a form with that button");
        assert!(form.method.eq_ignore_ascii_case("post"), "{}", form.method);
        let submit = self
            .http
            .post(page_url.join(&form.action).expect("form action"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&form.fields)
                    .finish(),
            )
            .send()
            .await
            .expect("submit");
        assert!(submit.status().is_redirection(), "{}", submit.status());
        let back = submit.headers()[header::LOCATION]
            .to_str()
            .expect("location header");
        Url::parse(back).expect("redirect is a URL")
    }

    /// `POST /auth/token`: 200 with the fields the guides show.
    async fn token(&self, body: &Value) -> Tokens {
        let response = self.post_basic("/auth/token", &body.to_string()).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["expires_in"], 3600, "{answer}");
        assert_eq!(answer["token_type"], "Bearer");
        assert_eq!(answer["scope"], GUIDE_SCOPE);
        Tokens {
            access_token: text(&answer["access_token"]).to_owned(),
            refresh_token: text(&answer["refresh_token"]).to_owned(),
        }
    }

    /// The code exchange of the guides, then the refresh of the multibanking guide (its answer
    /// replaces the first pair).
    async fn exchange_and_refresh(&self, code: &str, redirect_uri: &str) -> Tokens {
        let first = self
            .token(&json!({
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri
            }))
            .await;
        self.refresh(first).await
    }

    /// The refresh of the multibanking guide: a new pair, both tokens rotated.
    async fn refresh(&self, old: Tokens) -> Tokens {
        let renewed = self
            .token(&json!({
                "grant_type": "refresh_token",
                "refresh_token": old.refresh_token,
                "scope": GUIDE_SCOPE
            }))
            .await;
        assert_ne!(renewed.refresh_token, old.refresh_token, "rotated");
        assert_ne!(renewed.access_token, old.access_token);
        renewed
    }

    /// `GET` with a Bearer token: 200 JSON.
    async fn rest(&self, path: &str, tokens: &Tokens) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&tokens.access_token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.json().await.expect("json")
    }

    /// `GET` with client auth: 200 JSON.
    async fn get_basic(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .basic_auth(DEMO_CLIENT_ID, Some(DEMO_CLIENT_SECRET))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.json().await.expect("json")
    }
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The code as finX's client scripts read it: `callback.split('&')[0].split('=')[1]`.
fn code_as_finx_scripts_read_it(callback: &Url) -> String {
    let code = callback
        .as_str()
        .split('&')
        .next()
        .and_then(|first| first.split('=').nth(1))
        .expect("a first parameter")
        .to_owned();
    assert_eq!(Some(&code), param(callback, "code").as_ref(), "{callback}");
    code
}

/// Checks a successful return for the flow `flow_id`.
fn assert_success(callback: &Url, flow_id: &str, state: Option<&str>) {
    assert_eq!(
        param(callback, "success").as_deref(),
        Some("true"),
        "{callback}"
    );
    assert_eq!(param(callback, "flow_id").as_deref(), Some(flow_id));
    assert_eq!(param(callback, "state").as_deref(), state);
    assert_ne!(param(callback, "abort").as_deref(), Some("true"));
}

/// A flow from creation to refreshed tokens; returns the flow id and the tokens.
async fn consent(
    client: &FinxClient,
    path: &str,
    body: &str,
    state: Option<&str>,
    exchange_redirect_uri: &str,
) -> (String, Tokens) {
    let (flow_id, location) = client.create_flow(path, body).await;
    let callback = client.widget(&location, "Connect").await;
    assert_success(&callback, &flow_id, state);
    let code = code_as_finx_scripts_read_it(&callback);
    let tokens = client
        .exchange_and_refresh(&code, exchange_redirect_uri)
        .await;
    (flow_id, tokens)
}

/// The endpoints of finX's financial-data product: accounts, one account, its transactions,
/// all transactions, securities.
async fn financial_data(client: &FinxClient, tokens: &Tokens) -> String {
    let accounts = client.rest("/rest/accounts", tokens).await;
    let first = &accounts["accounts"][0];
    let account_id = text(&first["account_id"]).to_owned();
    assert!(first["balance"]["balance"].is_number(), "{first}");
    let account = client
        .rest(&format!("/rest/accounts/{account_id}"), tokens)
        .await;
    assert_eq!(account["account_id"], account_id.as_str());
    let own = client
        .rest(
            &format!("/rest/accounts/{account_id}/transactions?include_statistics=true"),
            tokens,
        )
        .await;
    let own_transactions = own["transactions"].as_array().expect("transactions");
    // Paged as the guides page: count and offset.
    let mut paged = Vec::new();
    for offset in (0..own_transactions.len().max(1)).step_by(2) {
        let page = client
            .rest(
                &format!("/rest/accounts/{account_id}/transactions?count=2&offset={offset}"),
                tokens,
            )
            .await;
        let page = page["transactions"].as_array().expect("a page").clone();
        assert!(page.len() <= 2, "{page:?}");
        paged.extend(page);
    }
    assert_eq!(
        &paged, own_transactions,
        "the pages add up to the whole list"
    );
    let all = client.rest("/rest/transactions", tokens).await;
    for transaction in all["transactions"].as_array().expect("transactions") {
        assert!(transaction["transaction_id"].is_string(), "{transaction}");
        assert!(transaction["amount"].is_number(), "{transaction}");
    }
    let securities = client.rest("/rest/securities", tokens).await;
    assert!(securities["securities"].is_array(), "{securities}");
    account_id
}

#[tokio::test]
async fn one_time_account_information() {
    let client = FinxClient::start();
    // The one-time financial-data guide (both of its versions show this body).
    let body = r#"{
"redirect_uri": "https://my-app.example.com/callback",
"language": "de",
"accounts": [],
"sync_period": 90
}"#;
    let (flow_id, location) = client.create_flow("/onetime/access", body).await;
    let callback = client.widget(&location, "Connect").await;
    // ?code=…&success=true&flow_id=…&abort=false (no state was sent).
    assert!(callback.as_str().starts_with(GUIDE_CALLBACK), "{callback}");
    assert_success(&callback, &flow_id, None);
    assert_eq!(param(&callback, "abort").as_deref(), Some("false"));
    let code = code_as_finx_scripts_read_it(&callback);
    let tokens = client.exchange_and_refresh(&code, GUIDE_CALLBACK).await;
    financial_data(&client, &tokens).await;
}

#[tokio::test]
async fn one_time_income_report() {
    let client = FinxClient::start();
    // The income-report guide.
    let body = r#"{
  "redirect_uri": "https://my-app.example.com/callback",
  "accounts": [],
  "sync_period": 180
}"#;
    let (flow_id, tokens) = consent(
        &client,
        "/onetime/income-report",
        body,
        None,
        GUIDE_CALLBACK,
    )
    .await;
    let report = client
        .rest(&format!("/rest/income-reports/{flow_id}"), &tokens)
        .await;
    assert!(report.is_object(), "{report}");
    // The older spelling finX's example collection uses.
    let same = client.rest("/rest/income-report", &tokens).await;
    assert_eq!(same, report);
}

#[tokio::test]
async fn ongoing_multibanking_with_manual_synchronization() {
    let client = FinxClient::start();
    // The multibanking guide's body; its redirect_uri is a blank for the client to fill in,
    // and its user_id is the guide's (an address the guide's web page had obfuscated).
    let body = format!(
        r#"{{
  "state": "b0bc2e10-838f-4955-b8a6-733666049655",
  "redirect_uri": "{GUIDE_CALLBACK}",
  "tracking_id": "string",
  "language": "de",
  "provider_id": "74bab9d2-9f60-4ab1-be63-706e67b99f58",
  "accounts": [],
  "account_types": [],
  "allow_multi_selection": true,
  "sync_period": 90,
  "save_secrets": false,
  "user_id": "[email protected]"
}}"#
    );
    // The guide's exchange sends "redirect_uri": "" as it stands.
    let (_, tokens) = consent(
        &client,
        "/ongoing/access",
        &body,
        Some("b0bc2e10-838f-4955-b8a6-733666049655"),
        "",
    )
    .await;

    // Multibanking and PFM: every data endpoint.
    let account_id = financial_data(&client, &tokens).await;
    let contracts = client.rest("/rest/contracts", &tokens).await;
    let contract_id = text(&contracts[0]["id"]).to_owned();
    let of_account = client
        .rest(&format!("/rest/accounts/{account_id}/contracts"), &tokens)
        .await;
    assert!(of_account.is_array(), "{of_account}");
    let contract = client
        .rest(&format!("/rest/contracts/{contract_id}"), &tokens)
        .await;
    assert_eq!(contract["id"], contract_id.as_str());
    let deleted = client
        .http
        .delete(client.url(&format!("/rest/contracts/{contract_id}")))
        .bearer_auth(&tokens.access_token)
        .send()
        .await
        .expect("request");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let partners = client.rest("/rest/payment-partners", &tokens).await;
    assert!(partners[0]["id"].is_string(), "{partners}");
    let partners_of_account = client
        .rest(
            &format!("/rest/accounts/{account_id}/payment-partners"),
            &tokens,
        )
        .await;
    assert!(partners_of_account.is_array());
    assert!(client.rest("/rest/categories", &tokens).await.is_array());
    assert!(client
        .rest(&format!("/rest/accounts/{account_id}/categories"), &tokens)
        .await
        .is_array());
    let timeline = client.rest("/rest/timeline", &tokens).await;
    assert!(
        timeline["accounts"][0]["account_id"].is_string(),
        "{timeline}"
    );
    let tree = client.get_basic("/category-tree").await;
    assert!(tree.is_object(), "{tree}");

    // A manual synchronization of the connected account (finX's example body): it returns
    // with success=true and no code.
    let sync = json!({
        "state": "test123",
        "redirect_uri": "http://localhost",
        "language": "en",
        "sync_period": 90,
        "save_secrets": false,
        "account_ids": [account_id],
        "user_id": "[email protected]"
    });
    let (sync_id, location) = client.create_flow("/ongoing/sync", &sync.to_string()).await;
    let callback = client.widget(&location, "Connect").await;
    assert_success(&callback, &sync_id, Some("test123"));
    assert_eq!(param(&callback, "code"), None);
}

#[tokio::test]
async fn one_time_account_verification() {
    let client = FinxClient::start();
    // The account-verification guide.
    let body = r#"{
  "redirect_uri": "https://my-app.example.com/callback",
  "language": "de",
  "name": "Max Mustermann",
  "account": "DE93300308800013441006",
  "readout": []
}"#;
    let (flow_id, tokens) = consent(
        &client,
        "/onetime/account-verification",
        body,
        None,
        GUIDE_CALLBACK,
    )
    .await;
    let report = client
        .rest(&format!("/rest/account-verifications/{flow_id}"), &tokens)
        .await;
    assert_eq!(report["id"], flow_id.as_str());
    // finX's example then reads the verified account and its transactions.
    financial_data(&client, &tokens).await;
}

#[tokio::test]
async fn risk_reports_one_time_and_ongoing() {
    let client = FinxClient::start();
    // finX's published risk-insights example: numbers and booleans as strings.
    let onetime = r#"{
    "state": "test123",
    "redirect_uri": "http://localhost",
    "language": "de",
    "account_types": ["Giro account"],
    "name": "Hans-Peter Meier",
    "reporting_period": "12",
    "allow_multi_selection": "true"
}"#;
    let ongoing = r#"{
    "state": "test123",
    "redirect_uri": "http://localhost",
    "language": "de",
    "account_types": ["Giro account"],
    "name": "Hans-Peter Meier",
    "reporting_period": "12",
    "allow_multi_selection": "true",
    "user_id": "postman-risk-report-1@qwist.com"
}"#;
    for (path, body) in [
        ("/onetime/risk-report", onetime),
        ("/ongoing/risk-report", ongoing),
    ] {
        // finX's example exchanges the code without a redirect_uri.
        let (flow_id, location) = client.create_flow(path, body).await;
        let callback = client.widget(&location, "Connect").await;
        assert_success(&callback, &flow_id, Some("test123"));
        let code = code_as_finx_scripts_read_it(&callback);
        let first = client
            .token(&json!({ "grant_type": "authorization_code", "code": code }))
            .await;
        let tokens = client.refresh(first).await;
        let report = client
            .rest(&format!("/rest/risk-reports/{flow_id}"), &tokens)
            .await;
        assert_eq!(report["id"], flow_id.as_str(), "{path}");
    }
}

#[tokio::test]
async fn payments_one_time_and_ongoing() {
    let client = FinxClient::start();
    // finX's published payment examples (the ongoing one sends "save_secrets": "false").
    let onetime = r#"{
  "state": "b0bc2e10-838f-4955-b8a6-733666049655",
  "redirect_uri": "http://localhost",
  "language": "de",
  "payment": {
    "creditor": {
      "iban": "DE86990003540000002000",
      "name": "Peter Jackson"
    },
    "debtor": {
      "iban": "DE07900948150000002000"
    },
    "amount": {
      "value": 57.99,
      "currency": "EUR"
    },
    "purpose": "Thank you for the fish",
    "end_to_end_reference": "124/473294/384785"
  }
}"#;
    let ongoing = r#"{
  "state": "b0bc2e10-838f-4955-b8a6-733666049655",
  "redirect_uri": "http://localhost",
  "language": "de",
  "save_secrets": "false",
  "user_id": "postman-collection-1@qwist.com",
  "payment": {
    "creditor": {
      "iban": "DE86990003540000002000",
      "name": "Peter Jackson"
    },
    "amount": {
      "value": 0.25,
      "currency": "EUR"
    },
    "purpose": "Thank you for the fish"
  }
}"#;
    for (path, body, value) in [
        ("/onetime/payment", onetime, 57.99),
        ("/ongoing/payment", ongoing, 0.25),
    ] {
        let (receipt_id, location) = client.create_flow(path, body).await;
        let receipt_path = format!("/payment-receipts/{receipt_id}");
        let pending = client.get_basic(&receipt_path).await;
        assert_eq!(pending["status"], "pending", "{path}: {pending}");
        let callback = client.widget(&location, "Connect").await;
        assert_success(
            &callback,
            &receipt_id,
            Some("b0bc2e10-838f-4955-b8a6-733666049655"),
        );
        let receipt = client.get_basic(&receipt_path).await;
        assert_eq!(receipt["id"], receipt_id.as_str());
        assert_eq!(receipt["status"], "executed", "{path}: {receipt}");
        assert_eq!(receipt["amount"]["value"], value);
        assert_eq!(receipt["amount"]["currency"], "EUR");
        assert_eq!(receipt["creditor"]["iban"], "DE86990003540000002000");
        assert_eq!(receipt["purpose"], "Thank you for the fish");
        assert!(receipt["debtor"]["iban"].is_string(), "{receipt}");
        assert!(receipt["submitted_at"].is_string(), "{receipt}");
    }
}

#[tokio::test]
async fn a_cancelled_flow_returns_without_a_code() {
    let client = FinxClient::start();
    let (flow_id, location) = client
        .create_flow(
            "/onetime/access",
            r#"{"redirect_uri": "https://my-app.example.com/callback", "state": "7fe78733"}"#,
        )
        .await;
    let callback = client.widget(&location, "Cancel").await;
    assert_eq!(param(&callback, "success").as_deref(), Some("false"));
    assert_eq!(param(&callback, "state").as_deref(), Some("7fe78733"));
    assert_eq!(
        param(&callback, "flow_id").as_deref(),
        Some(flow_id.as_str())
    );
    // The older guide's flag and the newer one's.
    assert_eq!(param(&callback, "cancel").as_deref(), Some("true"));
    assert_eq!(param(&callback, "abort").as_deref(), Some("true"));
    assert_eq!(param(&callback, "code"), None);
}

#[tokio::test]
async fn standalone_categorization() {
    let client = FinxClient::start();
    // finX's published categorization example (three of its transactions), a bare array.
    let body = r#"[
        {
            "currency": "EUR",
            "name": "PayPal (Europe) S.a.r.l. et Cie., S.C.A.",
            "amount": -9.99,
            "booked": true,
            "id": "T855975904752173059.55",
            "iban": "DE88500700100175526303",
            "account_number": "175526303",
            "creditor_id": "LU96ZZZ0000000000000000058",
            "bank_code": "50070010",
            "booked_at": "2023-04-03T00:00:00.000Z",
            "bic": "DEUTDEFFXXX",
            "purpose": "PP.8419.PP . SPOTIFY,Ihr Einkauf bei SPOTIFY"
        },
        {
            "currency": "EUR",
            "name": "Hansen Immobilien Verwaltung GmbH+ Co. KG",
            "amount": -1480.00,
            "booked": true,
            "id": "T855975904752173059.53",
            "iban": "DE94200505501238211682",
            "booked_at": "2023-04-03T00:00:00.000Z",
            "bic": "HASPDEHHXXX",
            "purpose": "Miete VERTRAGSNR. 0297-1021-03"
        },
        {
            "currency": "EUR",
            "name": "REWE Hamburg EppenHamburg",
            "amount": -36.10,
            "booked": true,
            "id": "T855975904752173059.45",
            "iban": "DE21700202700015820754",
            "account_number": "15820754",
            "bank_code": "70020270",
            "booked_at": "2023-03-16T00:00:00.000Z",
            "bic": "HYVEDEMMXXX",
            "purpose": "SVWZ+2022-12-19T12.41 21912Debitk.0 2022-12 Bargeldausz. 120,00ABWA+REWE SAGT DANKE. 41400673//Hamburg Ottensen/DE"
        }
    ]"#;
    let response = client.post_basic("/rpc/categorize", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let categorized: Value = response.json().await.expect("json");
    let items = categorized.as_array().expect("an array");
    assert_eq!(items.len(), 3);
    for item in items {
        assert!(item["id"].is_string(), "{item}");
        assert!(item["category"]["name"].is_string(), "{item}");
    }
    let tree = client.get_basic("/category-tree").await;
    assert!(tree.is_object(), "{tree}");
}

/// An HTML form as a browser submits it when one of its buttons is pressed.
struct Form {
    method: String,
    action: String,
    fields: Vec<(String, String)>,
}

impl Form {
    /// The first form with a button labelled `label`: its named inputs plus that button's
    /// name and value.
    fn parse(html: &str, label: &str) -> Option<Form> {
        for chunk in html.split("<form").skip(1) {
            let (open_tag, rest) = chunk.split_once('>')?;
            let inner = rest.split("</form>").next()?;
            let mut fields: Vec<(String, String)> = inner
                .split("<input")
                .skip(1)
                .filter_map(|tag| {
                    let tag = tag.split('>').next()?;
                    Some((attribute(tag, "name")?, attribute(tag, "value")?))
                })
                .collect();
            let button = inner.split("<button").skip(1).find_map(|tag| {
                let (attributes, after) = tag.split_once('>')?;
                let caption = after.split("</button>").next()?.trim();
                (caption == label).then_some(attributes)
            });
            if let Some(button) = button {
                if let (Some(name), Some(value)) =
                    (attribute(button, "name"), attribute(button, "value"))
                {
                    fields.push((name, value));
                }
                return Some(Form {
                    method: attribute(open_tag, "method").unwrap_or_else(|| "get".into()),
                    action: attribute(open_tag, "action").unwrap_or_default(),
                    fields,
                });
            }
        }
        None
    }
}

/// A double-quoted attribute of a tag, entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let value = tag[start..].split('"').next()?;
    Some(
        value
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}
