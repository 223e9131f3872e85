//! The request path's refusals, black box over real sockets: dot segments with parameters,
//! the trusted-local Host check, service names that cannot own a connection, finX answers whose
//! access token cannot be used, and hop-by-hop headers.
//!
//! Requests that a normal client would rewrite are written byte for byte on a TCP socket.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use finx_gateway::config::{Config, ConfigFile};
use finx_gateway::sim::SimConfig;
use serde_json::{json, Value};
use support::{add_service_like_demo, error_code, Harness, APP_RETURN};

/// One raw HTTP/1.1 exchange: `head` (request line and headers, without the final blank line)
/// is sent as written, with `Connection: close` unless it has a `Connection` header of its own;
/// returns the status and the body.
fn exchange(addr: SocketAddr, head: &str) -> (u16, String) {
    exchange_with_body(addr, head, "")
}

/// As [`exchange`], with a request body (and its `Content-Length`).
fn exchange_with_body(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    // A test that sends its own `Connection` header names `close` in it.
    let close = if head.to_ascii_lowercase().contains("\r\nconnection:") {
        ""
    } else {
        "Connection: close\r\n"
    };
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(
            format!(
                "{head}\r\nContent-Length: {}\r\n{close}\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .expect("write");
    let mut response = Vec::new();
    // The gateway closes the connection after its answer (`Connection: close`).
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

fn code_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A service that may only read accounts, as the policy scenario of a path escape needs.
fn with_account_reader(file: &mut ConfigFile) {
    let reader = add_service_like_demo(file, "reader");
    reader.routes = vec!["GET /rest/accounts/**".into()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_with_parameters_and_semicolons_are_refused() {
    let harness = Harness::with(SimConfig::default().with_control(), with_account_reader);
    harness.seed_user("dora").await;
    let reader = harness.token_for("reader");
    let addr = harness.gateway().addr();
    let before = harness.control.seen_headers(100).await.unwrap().len();

    let spellings = [
        "/rest/accounts/..;/payments",
        "/rest/accounts/..;x=1/payments",
        "/rest/accounts/.;x/payments",
        "/rest/accounts/..%3B/payments",
        "/rest/accounts/..%3b/payments",
        "/rest/accounts/%2e%2e;/payments",
        "/rest/accounts/..%20/payments",
        "/rest/accounts/.. /payments",
        "/rest/accounts/..%09/payments",
        "/rest/accounts/...",
        "/rest/accounts/.../payments",
        "/rest/accounts/%EF%BC%8E%EF%BC%8E/payments",
        "/rest/accounts;jsessionid=1",
        "/rest/accounts/a;b",
        "/rest;/accounts",
        "/rest/accounts/%20/x",
        "/rest/accounts/a%3F/transactions",
        "/rest/accounts/a%23/transactions",
    ];
    for path in spellings {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {reader}\r\nX-Finx-User: dora"
        );
        let (status, body) = exchange(addr, &head);
        assert_eq!(status, 400, "{path:?} answered {status}: {body}");
        assert_eq!(code_of(&body), "bad_request", "{path:?}: {body}");
    }
    // Nothing reached finX, so it could not serve `/rest/payments` for any of them.
    let seen = harness.control.seen_headers(100).await.unwrap();
    assert_eq!(seen.len(), before, "finX saw {:?}", &seen[before..]);

    // The policy still admits what it names, and a dot inside a segment is just a character.
    for path in ["/rest/accounts", "/rest/accounts/acc.1/transactions"] {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {reader}\r\nX-Finx-User: dora"
        );
        let (status, body) = exchange(addr, &head);
        assert!(
            status != 400 && status != 403,
            "{path} answered {status}: {body}"
        );
    }
}

/// Trusted-local mode under the demo service's policy.
fn trusted_local(file: &mut ConfigFile) {
    file.callers.mode = Some("trusted-local".into());
    file.callers.trusted_local = Some(finx_gateway::callers::TrustedLocalFile {
        service: "demo-service".into(),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_local_mode_answers_only_loopback_host_names() {
    let harness = Harness::with(SimConfig::default().with_control(), trusted_local);
    harness.seed_user("lou").await;
    let addr = harness.gateway().addr();
    let port = addr.port();
    let get = |host_lines: &str| {
        exchange(
            addr,
            &format!("GET /rest/accounts HTTP/1.1\r\n{host_lines}X-Finx-User: lou"),
        )
    };

    for host in [
        "localhost".to_owned(),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = get(&format!("Host: {host}\r\n"));
        assert_eq!(status, 200, "Host {host}: {body}");
    }

    // A page whose name was rebound to 127.0.0.1 sends its own name; so does anything else
    // that is not plainly this machine.
    for host_lines in [
        format!("Host: rebind.example:{port}\r\n"),
        "Host: rebind.example\r\n".to_owned(),
        format!("Host: localhost.rebind.example:{port}\r\n"),
        format!("Host: 127.0.0.1.rebind.example:{port}\r\n"),
        format!("Host: localhost.:{port}\r\n"),
        format!("Host: 127.0.0.2:{port}\r\n"),
        format!("Host: 2130706433:{port}\r\n"),
        format!("Host: 0x7f000001:{port}\r\n"),
        format!("Host: [::ffff:127.0.0.1]:{port}\r\n"),
        "Host: localhost:notaport\r\n".to_owned(),
        "Host: localhost:\r\n".to_owned(),
        "Host: localhost@rebind.example\r\n".to_owned(),
        "Host: \r\n".to_owned(),
        String::new(),
        format!("Host: localhost:{port}\r\nHost: rebind.example\r\n"),
    ] {
        let (status, body) = get(&host_lines);
        assert!(
            status == 403 || status == 400,
            "{host_lines:?} answered {status}: {body}"
        );
        assert!(!body.contains("accounts\""), "{host_lines:?} read data");
    }
    let (status, body) = get(&format!("Host: rebind.example:{port}\r\n"));
    assert_eq!((status, code_of(&body).as_str()), (403, "caller_forbidden"));

    // Starting a connect flow is refused the same way.
    let flow = json!({"redirect_uri": APP_RETURN, "user_id": "lou"}).to_string();
    let (status, _) = exchange_with_body(
        addr,
        &format!(
            "POST /ongoing/access HTTP/1.1\r\nHost: rebind.example:{port}\r\nContent-Type: application/json"
        ),
        &flow,
    );
    assert_eq!(status, 403);

    // The health answer carries nothing and stays open to any probe.
    let (status, _) = exchange(addr, "GET /healthz HTTP/1.1\r\nHost: probe.internal");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_accepts_any_host() {
    let harness = Harness::start();
    harness.seed_user("jo").await;
    let (status, body) = exchange(
        harness.gateway().addr(),
        &format!(
            "GET /rest/accounts HTTP/1.1\r\nHost: finx-gateway.mesh.internal\r\nAuthorization: Bearer {}\r\nX-Finx-User: jo",
            harness.caller_token
        ),
    );
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_names_that_cannot_own_a_connection_are_refused_at_load() {
    let harness = Harness::start();
    for name in [
        "billing eu",
        "team/a",
        "team:a",
        "svc\u{e9}",
        " billing",
        &"x".repeat(129),
    ] {
        let mut file = harness.config_file();
        add_service_like_demo(&mut file, name).subject = "other-subject".into();
        let Err(errors) = Config::from_file(&file, Path::new(".")) else {
            panic!("{name:?} was accepted");
        };
        let errors = errors.to_string();
        assert!(
            errors.contains("A-Z a-z 0-9 . _ @ -"),
            "{name:?} refused for another reason: {errors}"
        );
    }

    // A name using every allowed character owns one-time connections end to end.
    let edgy = "billing.eu_1@team-a";
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        add_service_like_demo(file, "billing.eu_1@team-a");
    });
    let token = harness.token_for(edgy);
    let started: Value = harness
        .http
        .post(harness.url("/onetime/access"))
        .bearer_auth(&token)
        .json(&json!({"redirect_uri": APP_RETURN}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let flow_id = started["id"].as_str().expect("flow started").to_owned();
    let callback = harness
        .control
        .complete_widget(&flow_id, "success")
        .await
        .unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let back = browser.get(&callback).send().await.unwrap();
    assert_eq!(back.status(), 302);
    let app = url::Url::parse(back.headers()["location"].to_str().unwrap()).unwrap();
    assert!(
        app.query_pairs()
            .any(|(k, v)| k == "success" && v == "true"),
        "{app}"
    );
    let response = harness
        .http
        .get(harness.url("/rest/accounts"))
        .bearer_auth(&token)
        .header("x-finx-flow", &flow_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_shorter_than_the_skew_is_not_refreshed_on_every_request() {
    // finX issues 30 s tokens; the gateway refreshes 60 s before expiry.
    let sim = SimConfig {
        access_ttl: Duration::from_secs(30),
        ..SimConfig::default().with_control()
    };
    let harness = Harness::with(sim, |_| {});
    harness.import_user("shorty").await;
    for attempt in 0..10 {
        let response = harness.get_as("shorty", "/rest/accounts").await;
        // The token still has 30 s to live: it is used rather than thrown away.
        assert_eq!(response.status(), 200, "attempt {attempt}");
    }
    assert_eq!(
        harness
            .control
            .user_stats("shorty")
            .await
            .unwrap()
            .refresh_grants,
        1,
        "every request refreshed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_access_token_backs_off_with_retry_after() {
    // finX issues tokens that expire at once: nothing can be served, and asking again at once
    // would only spend another refresh token.
    let sim = SimConfig {
        access_ttl: Duration::from_secs(1),
        ..SimConfig::default().with_control()
    };
    let harness = Harness::with(sim, |_| {});
    harness.import_user("blink").await;
    let mut waits = Vec::new();
    for _ in 0..10 {
        let response = harness.get_as("blink", "/rest/accounts").await;
        assert_eq!(response.status(), 503);
        let wait: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(wait >= 1);
        waits.push(wait);
        assert_eq!(error_code(response).await, "upstream_unavailable");
    }
    let grants = || async {
        harness
            .control
            .user_stats("blink")
            .await
            .unwrap()
            .refresh_grants
    };
    assert_eq!(grants().await, 1, "every request refreshed again");

    // After the backoff the next request asks once more, and the next backoff is longer.
    harness.advance(waits[0] as i64 + 1).await;
    let response = harness.get_as("blink", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    let second: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(grants().await, 2);
    assert!(second >= 2, "backoff did not grow: {second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_never_reach_finx() {
    let harness = Harness::start();
    harness.seed_user("hop").await;
    let (status, body) = exchange(
        harness.gateway().addr(),
        &format!(
            "GET /rest/accounts HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nX-Finx-User: hop\r\nX-Hop-Secret: CANARY-HOP\r\nKeep-Alive: timeout=5\r\nConnection: close, X-Hop-Secret",
            harness.caller_token
        ),
    );
    assert_eq!(status, 200, "{body}");
    let seen = harness.control.seen_headers(20).await.unwrap();
    let last = seen
        .iter()
        .rev()
        .find(|r| r.path == "/rest/accounts")
        .expect("finX saw the request");
    for gone in ["x-hop-secret", "keep-alive"] {
        assert_eq!(last.header(gone), None, "{gone} reached finX");
    }
    assert!(
        last.header("connection")
            .is_none_or(|v| !v.to_ascii_lowercase().contains("x-hop-secret")),
        "the Connection header named a caller header to finX"
    );
}
