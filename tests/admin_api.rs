//! The admin API, its CLI and the status page, black-box over real sockets: every endpoint's
//! answers and errors, paging and filtering, what revoke and purge do to data requests, the
//! login session (and that it changes nothing), and that no answer, page, CLI output or log line
//! carries a token (canary tokens and the simulator's tokens are looked for everywhere).

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use reqwest::{header, Method, StatusCode};
use serde_json::Value;
use support::{Harness, ADMIN_TOKEN};

/// A client of the admin listener that follows no redirect.
struct Admin {
    http: reqwest::Client,
    base: String,
}

/// One answer, read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Asserts a JSON error with this status and code, and a message.
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/json",
            "{}",
            self.body
        );
        assert_eq!(self.error_code(), code, "{}", self.body);
        assert!(
            self.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
    }
}

impl Admin {
    fn new(harness: &Harness) -> Self {
        Self {
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: harness.gateway().admin_url(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("admin listener answers");
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.expect("body"),
        }
    }

    /// `method path` with the admin credential and an optional JSON body.
    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.to_owned());
        }
        self.send(request).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    async fn import(&self, key: &str, refresh_token: &str) -> Answer {
        let body = serde_json::json!({ "refresh_token": refresh_token }).to_string();
        self.call(
            Method::POST,
            &format!("/admin/connections/{key}/import"),
            Some(&body),
        )
        .await
    }
}

/// Fails when `text` holds any of `secrets`.
fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} holds a token ({secret}):\n{text}"
        );
    }
}

/// Starts a one-time access flow through the gateway and consents it at the simulator
/// directly (no callback: nothing is stored); its flow id and tokens.
async fn consented_flow(harness: &Harness) -> (String, finx_gateway::sim::GrantTokens) {
    let started = harness
        .request(Method::POST, "/onetime/access")
        .json(&serde_json::json!({ "redirect_uri": support::APP_RETURN, "state": "s" }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::CREATED);
    let flow_id = started.json::<Value>().await.unwrap()["id"]
        .as_str()
        .expect("flow id")
        .to_owned();
    let grant = harness.control.create_flow_grant(&flow_id).await.unwrap();
    (flow_id, grant)
}

fn keys(listed: &Value) -> Vec<String> {
    listed["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["key"].as_str().expect("key").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_filters_and_describes_metadata_only() {
    let harness = Harness::start();
    let (alice_access, alice_refresh) = harness.seed_user("alice").await;
    let (bob_access, bob_refresh) = harness.seed_user("bob").await;
    let carol_refresh = harness.import_user("carol").await;
    let secrets = vec![
        alice_access,
        alice_refresh,
        bob_access,
        bob_refresh,
        carol_refresh,
    ];
    let admin = Admin::new(&harness);
    assert_eq!(
        admin
            .call(Method::POST, "/admin/connections/bob/revoke", None)
            .await
            .status,
        StatusCode::OK
    );

    let all = admin.get("/admin/connections").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_no_secret("the list", &all.body, &secrets);
    let listed = all.json();
    assert_eq!(keys(&listed), ["alice", "bob", "carol"]);
    assert_eq!(
        (&listed["total"], &listed["page"], &listed["per_page"]),
        (&Value::from(3), &Value::from(1), &Value::from(100))
    );
    let alice = &listed["connections"][0];
    assert_eq!(alice["status"], "active");
    assert_eq!(alice["kind"], "user");
    assert_eq!(alice["refresh_token_age_days"], 0);
    assert!(
        matches!(alice["days_until_lapse"].as_i64(), Some(89 | 90)),
        "{alice}"
    );
    assert!(alice["lapses_in_secs"].as_i64().unwrap() > 89 * 24 * 3600);
    assert!(alice["created_at"].is_i64() && alice["last_used_at"].is_null());
    assert!(
        alice["scope"]
            .as_str()
            .is_some_and(|scope| !scope.is_empty()),
        "the scope finX granted: {alice}"
    );
    for field in ["refresh_token", "access_token", "token"] {
        assert!(alice.get(field).is_none(), "{alice}");
    }
    assert_eq!(listed["connections"][1]["status"], "revoked");

    let second = admin
        .get("/admin/connections?per_page=2&page=2")
        .await
        .json();
    assert_eq!(keys(&second), ["carol"]);
    assert_eq!(
        (second["total"].as_u64(), second["page"].as_u64()),
        (Some(3), Some(2))
    );
    let first = admin
        .get("/admin/connections?page=1&per_page=2")
        .await
        .json();
    assert_eq!(keys(&first), ["alice", "bob"]);
    let beyond = admin.get("/admin/connections?page=7").await.json();
    assert!(keys(&beyond).is_empty());
    assert_eq!(beyond["total"], 3);

    let revoked = admin.get("/admin/connections?status=revoked").await.json();
    assert_eq!(keys(&revoked), ["bob"]);
    assert_eq!(revoked["total"], 1);
    let active = admin.get("/admin/connections?status=active").await.json();
    assert_eq!(keys(&active), ["alice", "carol"]);
    let reauth = admin
        .get("/admin/connections?status=reauth_required")
        .await
        .json();
    assert!(keys(&reauth).is_empty());

    for bad in [
        "status=gone",
        "status=",
        "page=0",
        "page=two",
        "per_page=0",
        "per_page=1001",
        "sort=key",
        "status=active&status=revoked",
    ] {
        admin
            .get(&format!("/admin/connections?{bad}"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    }
    let max = admin.get("/admin/connections?per_page=1000").await;
    assert_eq!(max.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_revoke_and_purge_decide_what_data_requests_get() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    let admin = Admin::new(&harness);

    // Show.
    let alice = admin.get("/admin/connections/alice").await;
    assert_eq!(alice.status, StatusCode::OK, "{}", alice.body);
    assert_eq!(alice.json()["key"], "alice");
    assert_eq!(alice.json()["status"], "active");
    admin
        .get("/admin/connections/nobody")
        .await
        .assert_error(StatusCode::NOT_FOUND, "connection_not_found");
    admin
        .get("/admin/connections/a%20b")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");

    // Import, then the data request refreshes with the imported token.
    let grant = harness.control.create_grant("dave").await.unwrap();
    let imported = admin.import("dave", &grant.refresh_token).await;
    assert_eq!(imported.status, StatusCode::OK, "{}", imported.body);
    assert_no_secret(
        "the import answer",
        &imported.body,
        &[grant.refresh_token.clone(), grant.access_token.clone()],
    );
    let described = imported.json();
    assert_eq!(
        (&described["key"], &described["status"]),
        (&Value::from("dave"), &Value::from("active"))
    );
    assert_eq!(
        harness.get_as("dave", "/rest/accounts").await.status(),
        StatusCode::OK
    );
    // The access token is now cached; a second request is served from memory.
    assert_eq!(
        harness.get_as("dave", "/rest/accounts").await.status(),
        StatusCode::OK
    );

    // Revoke: the cached token is forgotten, requests are refused as needing a new consent.
    let revoked = admin
        .call(Method::POST, "/admin/connections/dave/revoke", None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    assert_eq!(revoked.json()["status"], "revoked");
    let refused = harness.get_as("dave", "/rest/accounts").await;
    assert_eq!(refused.status(), StatusCode::FAILED_DEPENDENCY);
    assert_eq!(support::error_code(refused).await, "reauth_required");
    assert_eq!(
        admin.get("/admin/connections/dave").await.json()["status"],
        "revoked"
    );
    admin
        .call(Method::POST, "/admin/connections/nobody/revoke", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "connection_not_found");

    // A new import makes it active again.
    let again = harness.control.create_grant("dave").await.unwrap();
    assert_eq!(
        admin.import("dave", &again.refresh_token).await.json()["status"],
        "active"
    );
    assert_eq!(
        harness.get_as("dave", "/rest/accounts").await.status(),
        StatusCode::OK
    );

    // Purge: the grant is gone from the store and from memory.
    let purged = admin
        .call(Method::DELETE, "/admin/connections/dave", None)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.body);
    assert_eq!(purged.json()["purged"], true);
    let gone = harness.get_as("dave", "/rest/accounts").await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(support::error_code(gone).await, "connection_not_found");
    admin
        .get("/admin/connections/dave")
        .await
        .assert_error(StatusCode::NOT_FOUND, "connection_not_found");
    admin
        .call(Method::DELETE, "/admin/connections/dave", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "connection_not_found");
    let stored = harness.store().list().await.unwrap();
    assert_eq!(
        stored.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(),
        ["alice"]
    );

    // Alice was never touched.
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_keys_are_named_encoded_or_plain() {
    let harness = Harness::start();
    let admin = Admin::new(&harness);
    let (flow_id, grant) = consented_flow(&harness).await;
    let key = format!("flow:demo-service/{flow_id}");
    let imported = admin
        .import(
            &format!("flow:demo-service%2F{flow_id}"),
            &grant.refresh_token,
        )
        .await;
    assert_eq!(imported.status, StatusCode::OK, "{}", imported.body);
    assert_eq!(imported.json()["key"], key.as_str());
    assert_eq!(imported.json()["kind"], "flow");
    let answer = harness
        .request(Method::GET, "/rest/accounts")
        .header("x-finx-flow", &flow_id)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);

    let shown = admin.get(&format!("/admin/connections/{key}")).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    assert_eq!(shown.json()["key"], key.as_str());
    let revoked = admin
        .call(
            Method::POST,
            &format!("/admin/connections/flow%3Ademo-service%2F{flow_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(revoked.json()["status"], "revoked", "{}", revoked.body);
    let refused = harness
        .request(Method::GET, "/rest/accounts")
        .header("x-finx-flow", &flow_id)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FAILED_DEPENDENCY);
    let purged = admin
        .call(Method::DELETE, &format!("/admin/connections/{key}"), None)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.body);
    admin
        .get("/admin/connections/flow:demo-service")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_400_wrong_methods_a_405_and_nothing_changes() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    let admin = Admin::new(&harness);
    let canary = "canary-7d1e4b-refresh-token";
    let import = |body: String| {
        let admin = &admin;
        async move {
            admin
                .call(Method::POST, "/admin/connections/alice/import", Some(&body))
                .await
        }
    };

    for (body, code) in [
        ("not json".to_owned(), "invalid_body"),
        (String::new(), "invalid_body"),
        (format!("\"{canary}\""), "invalid_body"),
        (
            format!(r#"{{"refresh_token": ["{canary}"]}}"#),
            "invalid_body",
        ),
        (
            format!(r#"{{"refresh_token": "{canary}", "note": "{canary}"}}"#),
            "invalid_body",
        ),
        (format!(r#"{{"token": "{canary}"}}"#), "invalid_body"),
        (format!(r#"{{"refresh_token": "{canary}""#), "invalid_body"),
        (
            r#"{"refresh_token": ""}"#.to_owned(),
            "invalid_refresh_token",
        ),
        (
            format!(r#"{{"refresh_token": "{canary} {canary}"}}"#),
            "invalid_refresh_token",
        ),
        (
            format!(r#"{{"refresh_token": "{}"}}"#, "x".repeat(70 * 1024)),
            "body_too_large",
        ),
    ] {
        let answer = import(body.clone()).await;
        answer.assert_error(StatusCode::BAD_REQUEST, code);
        assert!(!answer.body.contains("canary"), "{}", answer.body);
    }
    // A body over the limit without a declared length (chunked) is refused too, and the
    // connection still gets its answer.
    let address: std::net::SocketAddr = admin.base.trim_start_matches("http://").parse().unwrap();
    let mut raw = format!(
        "POST /admin/connections/alice/import HTTP/1.1\r\nHost: admin\r\n\
         Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..80 {
        raw.push_str(&format!("400\r\n{}\r\n", " ".repeat(1024)));
    }
    raw.push_str("0\r\n\r\n");
    let status = tokio::task::spawn_blocking(move || support::raw_request(address, &raw))
        .await
        .unwrap();
    assert_eq!(status, 400, "a chunked body over the limit");
    // Far over the limit: refused without reading it all (the client may then see its
    // connection reset instead of the answer).
    let huge = admin
        .http
        .post(format!("{}/admin/connections/alice/import", admin.base))
        .bearer_auth(ADMIN_TOKEN)
        .body("x".repeat(2 * 1024 * 1024))
        .send()
        .await;
    if let Ok(huge) = huge {
        assert_eq!(huge.status(), StatusCode::BAD_REQUEST);
    }
    admin
        .import("a%2Fb", "valid-token")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");
    admin
        .get("/admin/connections/%FF")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_path");

    for (method, path, allowed) in [
        (Method::PUT, "/admin/connections", "GET"),
        (Method::POST, "/admin/connections", "GET"),
        (Method::POST, "/admin/connections/alice", "GET, DELETE"),
        (Method::GET, "/admin/connections/alice/import", "POST"),
        (Method::DELETE, "/admin/connections/alice/revoke", "POST"),
        (Method::DELETE, "/admin/", "GET"),
    ] {
        let answer = admin.call(method.clone(), path, None).await;
        answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(answer.headers[header::ALLOW], allowed, "{method} {path}");
    }
    for path in [
        "/admin/nope",
        "/admin/connections/alice/nope",
        "/admin/connections/",
    ] {
        let answer = admin.get(path).await;
        assert!(
            matches!(
                answer.status,
                StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST
            ),
            "{path}: {}",
            answer.status
        );
        assert!(
            answer.json()["error"]["code"].is_string(),
            "{}",
            answer.body
        );
    }

    // Nothing was stored or changed, and the gateway still serves.
    let alice = harness
        .store()
        .load(&finx_gateway::store::ConnectionKey::user("alice").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alice.version, 1);
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        StatusCode::OK
    );
    assert!(!support::captured_logs().contains(canary));
}

/// The login form's body for `credential`.
fn form(credential: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("credential", credential)
        .finish()
}

/// Logs in through the form; the session cookie's `name=value`.
async fn log_in(admin: &Admin) -> String {
    let answer = admin
        .send(
            admin
                .http
                .post(format!("{}/admin/login", admin.base))
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form(ADMIN_TOKEN)),
        )
        .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    assert_eq!(answer.headers[header::LOCATION], "/admin/");
    let cookie = answer.headers[header::SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains(ADMIN_TOKEN), "{cookie}");
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_takes_a_login_that_can_change_nothing() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    let admin = Admin::new(&harness);
    let page_url = format!("{}/admin/", admin.base);

    // Without credentials: to the login form (the API itself answers 401).
    for path in ["/admin/", "/admin"] {
        let anonymous = admin
            .send(admin.http.get(format!("{}{path}", admin.base)))
            .await;
        assert_eq!(anonymous.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(anonymous.headers[header::LOCATION], "/admin/login");
    }
    let login_form = admin
        .send(admin.http.get(format!("{}/admin/login", admin.base)))
        .await;
    assert_eq!(login_form.status, StatusCode::OK);
    assert!(
        login_form.body.contains("name=\"credential\""),
        "{}",
        login_form.body
    );
    let wrong = admin
        .send(
            admin
                .http
                .post(format!("{}/admin/login", admin.base))
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form("not-the-credential")),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());

    let cookie = log_in(&admin).await;
    let page = admin
        .send(admin.http.get(&page_url).header(header::COOKIE, &cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let policy = page.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    for part in [
        "connections-by-status",
        "age-histogram",
        "limit-90-days",
        "near-lapse",
        "events",
        "counters",
        ">alice<",
    ] {
        assert!(page.body.contains(part), "{part} missing:\n{}", page.body);
    }
    assert!(!page.body.contains("<script"), "no script on the page");

    // The bearer credential opens the page as well.
    assert_eq!(admin.get("/admin/").await.status, StatusCode::OK);

    // The cookie opens nothing else: every API endpoint wants the bearer credential.
    for (method, path) in [
        (Method::GET, "/admin/connections"),
        (Method::GET, "/admin/connections/alice"),
        (Method::POST, "/admin/connections/alice/revoke"),
        (Method::POST, "/admin/connections/alice/import"),
        (Method::DELETE, "/admin/connections/alice"),
        (Method::POST, "/admin/"),
    ] {
        let answer = admin
            .send(
                admin
                    .http
                    .request(method.clone(), format!("{}{path}", admin.base))
                    .header(header::COOKIE, &cookie)
                    .header(header::ORIGIN, admin.base.as_str())
                    .json(&serde_json::json!({ "refresh_token": "from-a-cookie" })),
            )
            .await;
        answer.assert_error(StatusCode::UNAUTHORIZED, "admin_unauthenticated");
        assert!(
            answer.headers.contains_key(header::WWW_AUTHENTICATE),
            "{method} {path}"
        );
    }
    assert_eq!(
        admin.get("/admin/connections/alice").await.json()["status"],
        "active"
    );

    // A wrong bearer header is refused even with a good cookie; a forged cookie opens nothing.
    let both = admin
        .send(
            admin
                .http
                .get(&page_url)
                .header(header::COOKIE, &cookie)
                .bearer_auth("wrong"),
        )
        .await;
    assert_eq!(both.status, StatusCode::UNAUTHORIZED);
    let (name, value) = cookie.split_once('=').unwrap();
    let flipped = if value.ends_with('0') { '1' } else { '0' };
    let forged = format!("{name}={}{flipped}", &value[..value.len() - 1]);
    let forged = admin
        .send(admin.http.get(&page_url).header(header::COOKIE, forged))
        .await;
    assert_eq!(forged.status, StatusCode::SEE_OTHER);
    let credential_as_cookie = admin
        .send(
            admin
                .http
                .get(&page_url)
                .header(header::COOKIE, format!("{name}={ADMIN_TOKEN}")),
        )
        .await;
    assert_eq!(credential_as_cookie.status, StatusCode::SEE_OTHER);

    // Logging out clears the cookie.
    let out = admin
        .send(
            admin
                .http
                .post(format!("{}/admin/logout", admin.base))
                .header(header::COOKIE, &cookie),
        )
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(out.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

/// `finx-gateway args…` with `stdin`, the environment variable `env` set or removed.
fn cli(args: &[&str], stdin: Option<&str>, credential_env: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_finx-gateway"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FINX_ADMIN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(credential) = credential_env {
        command.env("FINX_ADMIN_TOKEN", credential);
    }
    let mut child = command.spawn().expect("binary runs");
    if let Some(input) = stdin {
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// Runs the CLI off the runtime's threads.
async fn cli_async(
    args: Vec<String>,
    stdin: Option<String>,
    credential_env: Option<&'static str>,
) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, stdin.as_deref(), credential_env)
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_admin_api_and_never_prints_a_token() {
    let harness = Harness::start();
    let (alice_access, alice_refresh) = harness.seed_user("alice").await;
    let grant = harness.control.create_grant("erin").await.unwrap();
    let secrets = vec![
        alice_access,
        alice_refresh,
        grant.refresh_token.clone(),
        grant.access_token.clone(),
        ADMIN_TOKEN.to_owned(),
    ];
    let url = harness.gateway().admin_url();
    let credential_file = harness.dir.path().join("admin-token");
    let with_file = |rest: &[&str]| -> Vec<String> {
        let mut args = vec![
            "admin".to_owned(),
            "--url".to_owned(),
            url.clone(),
            "--credential-file".to_owned(),
            credential_file.display().to_string(),
            "connections".to_owned(),
        ];
        args.extend(rest.iter().map(|s| (*s).to_owned()));
        args
    };
    let mut outputs = Vec::new();

    let imported = cli_async(
        with_file(&["import", "erin"]),
        Some(format!("{}\n", grant.refresh_token)),
        None,
    )
    .await;
    assert!(imported.status.success(), "{}", stderr(&imported));
    let described: Value = serde_json::from_str(&stdout(&imported)).expect("JSON");
    assert_eq!(described["key"], "erin");
    assert_eq!(described["status"], "active");
    outputs.push(imported);
    assert_eq!(
        harness.get_as("erin", "/rest/accounts").await.status(),
        StatusCode::OK
    );

    let table = cli_async(with_file(&["list"]), None, None).await;
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.starts_with("connection"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("alice ") && l.contains("active")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("erin ")), "{text}");
    assert!(text.contains("2 in all"), "{text}");
    outputs.push(table);

    let paged = cli_async(
        with_file(&["list", "--json", "--per-page", "1", "--page", "2"]),
        None,
        None,
    )
    .await;
    assert!(paged.status.success(), "{}", stderr(&paged));
    let listed: Value = serde_json::from_str(&stdout(&paged)).expect("JSON");
    assert_eq!(keys(&listed), ["erin"]);
    assert_eq!(listed["total"], 2);
    outputs.push(paged);

    let shown = cli_async(with_file(&["show", "alice"]), None, None).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&shown)).unwrap()["key"],
        "alice"
    );
    outputs.push(shown);

    let revoked = cli_async(with_file(&["revoke", "erin"]), None, None).await;
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&revoked)).unwrap()["status"],
        "revoked"
    );
    outputs.push(revoked);
    assert_eq!(
        harness.get_as("erin", "/rest/accounts").await.status(),
        StatusCode::FAILED_DEPENDENCY
    );
    let filtered = cli_async(with_file(&["list", "--status", "revoked"]), None, None).await;
    assert!(
        stdout(&filtered).lines().any(|l| l.starts_with("erin ")),
        "{}",
        stdout(&filtered)
    );
    assert!(!stdout(&filtered).lines().any(|l| l.starts_with("alice ")));
    outputs.push(filtered);

    let purged = cli_async(with_file(&["purge", "erin"]), None, None).await;
    assert!(purged.status.success(), "{}", stderr(&purged));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&purged)).unwrap()["purged"],
        true
    );
    outputs.push(purged);

    let keys_args = |command: &str| -> Vec<String> {
        let mut args = with_file(&[]);
        args.pop();
        args.extend(["keys".to_owned(), command.to_owned()]);
        args
    };
    let status = cli_async(keys_args("status"), None, None).await;
    assert!(status.status.success(), "{}", stderr(&status));
    let described: Value = serde_json::from_str(&stdout(&status)).expect("JSON");
    assert_eq!(described["keys"]["complete"], true, "{described}");
    outputs.push(status);
    let rotate = cli_async(keys_args("rotate"), None, None).await;
    assert!(rotate.status.success(), "{}", stderr(&rotate));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&rotate)).unwrap()["started"],
        true
    );
    outputs.push(rotate);

    // Failures: non-zero, the API's message on stderr.
    let missing = cli_async(with_file(&["show", "erin"]), None, None).await;
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("connection_not_found"),
        "{}",
        stderr(&missing)
    );
    outputs.push(missing);
    let bad_status = cli_async(with_file(&["list", "--status", "gone"]), None, None).await;
    assert!(!bad_status.status.success());
    assert!(
        stderr(&bad_status).contains("invalid_query"),
        "{}",
        stderr(&bad_status)
    );
    let bad_token = cli_async(
        with_file(&["import", "erin"]),
        Some("two tokens".into()),
        None,
    )
    .await;
    assert!(!bad_token.status.success());
    outputs.push(bad_token);

    // The credential from the environment; none at all; a wrong one.
    let args = |rest: &[&str]| -> Vec<String> {
        ["admin", "--url", &url, "connections"]
            .iter()
            .chain(rest)
            .map(|s| (*s).to_owned())
            .collect()
    };
    let from_env = cli_async(args(&["show", "alice"]), None, Some(ADMIN_TOKEN)).await;
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    outputs.push(from_env);
    let without = cli_async(args(&["show", "alice"]), None, None).await;
    assert!(!without.status.success());
    assert!(
        stderr(&without).contains("FINX_ADMIN_TOKEN"),
        "{}",
        stderr(&without)
    );
    let wrong = cli_async(args(&["show", "alice"]), None, Some("not-the-credential")).await;
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("401"), "{}", stderr(&wrong));
    let unreachable = cli_async(
        vec![
            "admin".into(),
            "--url".into(),
            "http://127.0.0.1:9".into(),
            "connections".into(),
            "list".into(),
        ],
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert!(!unreachable.status.success());
    assert!(
        stderr(&unreachable).contains("did not answer"),
        "{}",
        stderr(&unreachable)
    );

    for output in &outputs {
        assert_no_secret("CLI stdout", &stdout(output), &secrets);
        assert_no_secret("CLI stderr", &stderr(output), &secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_answer_page_or_log_line_holds_a_token() {
    let harness = Harness::start();
    let admin = Admin::new(&harness);
    let mut secrets = vec![ADMIN_TOKEN.to_owned()];
    for user in ["alice", "bob"] {
        let (access, refresh) = harness.seed_user(user).await;
        secrets.extend([access, refresh]);
    }
    secrets.push(harness.import_user("carol").await);
    let canary = format!("canary-{:016x}-refresh", rand::random::<u64>());
    secrets.push(canary.clone());
    let (flow_id, flow) = consented_flow(&harness).await;
    secrets.extend([flow.refresh_token.clone(), flow.access_token.clone()]);

    let mut answers = Vec::new();
    answers.push(admin.import("canary-user", &canary).await);
    let flow_key = format!("flow:demo-service%2F{flow_id}");
    answers.push(admin.import(&flow_key, &flow.refresh_token).await);
    // Traffic: carol refreshes (a rotated token the test does not know: the store's row must
    // still not show up), alice is served from the cache, the canary user fails at finX.
    for user in ["alice", "carol", "canary-user"] {
        let _ = harness.get_as(user, "/rest/accounts").await;
    }
    for path in [
        "/admin/connections",
        "/admin/connections?status=active",
        "/admin/connections?status=reauth_required",
        "/admin/connections/alice",
        "/admin/connections/carol",
        "/admin/connections/canary-user",
        format!("/admin/connections/{flow_key}").as_str(),
        "/admin/",
    ] {
        let answer = admin.get(path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
        answers.push(answer);
    }
    answers.push(
        admin
            .call(Method::POST, "/admin/connections/bob/revoke", None)
            .await,
    );
    answers.push(
        admin
            .call(Method::DELETE, "/admin/connections/canary-user", None)
            .await,
    );
    let metrics = reqwest::get(format!("{}/metrics", admin.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    for answer in &answers {
        assert_no_secret("an admin answer", &answer.body, &secrets);
        for (name, value) in &answer.headers {
            assert_no_secret(
                &format!("header {name}"),
                value.to_str().unwrap_or_default(),
                &secrets,
            );
        }
    }
    assert_no_secret("the metrics", &metrics, &secrets);
    let page = &answers[answers.len() - 3];
    assert!(
        page.body.contains("canary-user"),
        "the imported key is shown"
    );
    assert_no_secret("the captured logs", &support::captured_logs(), &[canary]);
}
