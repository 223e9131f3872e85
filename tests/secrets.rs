//! Secrets never reach a log line: one full run through every token path with canary values,
//! with every log record of the process (gateway, pingora, simulator, HTTP clients) captured at
//! trace level, then searched for each secret.

mod support;

use base64::Engine;
use finx_gateway::sim::SimConfig;
use finx_gateway::store::ConnectionKey;
use finx_gateway::tokens::TokenClient;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;
use support::{captured_logs, Harness};

const CLIENT_SECRET: &str = "CANARY-CLIENT-SECRET-d41d8cd98f00b204e9800998ecf8427e";
const CODE: &str = "CANARY-AUTHORIZATION-CODE-0cc175b9c0f1b6a831c399e269772661";
const CALLER_GARBAGE: &str = "CANARY.CALLER.TOKEN";
const QUERY_CANARY: &str = "CANARY-CODE-IN-A-QUERY-92eb5ffee6ae2fec3ad71c777531578f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line() {
    let mut sim = SimConfig::default().with_control();
    sim.client_secret = CLIENT_SECRET.to_owned();
    let harness = Harness::with(sim, |_| {});
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.to_owned(),
        CODE.to_owned(),
        CALLER_GARBAGE.to_owned(),
        harness.caller_token.clone(),
        base64::engine::general_purpose::STANDARD.encode(format!("demo-client:{CLIENT_SECRET}")),
    ];

    // Import → refresh → cache hit → expiry → refresh again.
    secrets.push(harness.import_user("canary-user").await);
    for _ in 0..2 {
        assert_eq!(
            harness
                .get_as("canary-user", "/rest/accounts")
                .await
                .status(),
            200
        );
        harness.advance(3600).await;
    }
    // A user with both tokens stored, then finX's 401: refreshed and replayed.
    let (access, refresh) = harness.seed_user("canary-seeded").await;
    secrets.extend([access, refresh]);
    harness.control.expire_access_tokens().await.unwrap();
    assert_eq!(
        harness
            .get_as("canary-seeded", "/rest/accounts")
            .await
            .status(),
        200
    );
    assert_eq!(
        harness
            .get_as("canary-seeded", "/rest/accounts")
            .await
            .status(),
        200
    );
    // invalid_grant, 5xx and timeouts at the token endpoint.
    secrets.push(harness.import_user("canary-revoked").await);
    harness.control.revoke("canary-revoked").await.unwrap();
    assert_eq!(
        harness
            .get_as("canary-revoked", "/rest/accounts")
            .await
            .status(),
        424
    );
    secrets.push(harness.import_user("canary-flaky").await);
    let faults = finx_gateway::sim::Faults {
        token_error_rate: 1.0,
        ..Default::default()
    };
    harness.control.set_faults(&faults).await.unwrap();
    assert_eq!(
        harness
            .get_as("canary-flaky", "/rest/accounts")
            .await
            .status(),
        503
    );
    harness.control.reset().await.unwrap();
    // Client routes (Basic auth) and a caller with a garbage token.
    let response = harness
        .request(reqwest::Method::GET, "/category-tree")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = harness
        .http
        .get(harness.url("/rest/accounts"))
        .header("authorization", format!("Bearer {CALLER_GARBAGE}"))
        .header("x-finx-user", "canary-user")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // A code exchange that finX refuses.
    let config = harness.config();
    let client = TokenClient::new(
        &config.upstream.base_url,
        &config.client.id,
        config.client.secret.clone(),
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap();
    let refused = client
        .exchange_code(&SecretString::from(CODE), "https://app.example/cb", 0)
        .await;
    assert!(refused.is_err());

    // A connect flow: finX's code passes through the callback and must not be logged.
    let started: serde_json::Value = harness
        .request(reqwest::Method::POST, "/ongoing/access")
        .json(&serde_json::json!({"redirect_uri": support::APP_RETURN, "user_id": "canary-flow"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let flow_id = started["id"].as_str().expect("flow started");
    let callback = harness
        .control
        .complete_widget(flow_id, "success")
        .await
        .unwrap();
    let callback = url::Url::parse(&callback).unwrap();
    let code = callback
        .query_pairs()
        .find(|(name, _)| name == "code")
        .map(|(_, value)| value.into_owned())
        .expect("code");
    secrets.push(code);
    let state = callback
        .query_pairs()
        .find(|(name, _)| name == "state")
        .map(|(_, value)| value.into_owned())
        .expect("state");
    secrets.push(state);
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    assert_eq!(
        browser
            .get(callback.as_str())
            .send()
            .await
            .unwrap()
            .status(),
        302
    );

    // A request that fails upstream: pingora logs its own error line about it, which must not
    // carry the target's query (a callback's carries the code).
    let impatient = Harness::with(SimConfig::default().with_control(), |file| {
        file.upstream.read_timeout = Some(Duration::from_millis(200));
    });
    impatient.seed_user("canary-slow").await;
    let slow_data = finx_gateway::sim::Faults {
        data_latency_ms: 2_000,
        ..Default::default()
    };
    impatient.control.set_faults(&slow_data).await.unwrap();
    let response = impatient
        .get_as(
            "canary-slow",
            &format!("/rest/accounts?code={QUERY_CANARY}"),
        )
        .await;
    assert_eq!(response.status(), 504);

    // Every token the store holds now (the rotated ones) is a secret too.
    for user in [
        "canary-user",
        "canary-seeded",
        "canary-revoked",
        "canary-flaky",
    ] {
        let stored = harness
            .store()
            .load(&ConnectionKey::user(user).unwrap())
            .await
            .unwrap()
            .unwrap();
        secrets.push(stored.refresh_token.expose_secret().to_owned());
        if let Some(access) = stored.access {
            secrets.push(access.token.expose_secret().to_owned());
        }
    }

    let logs = captured_logs();
    if let Ok(path) = std::env::var("FINX_DUMP_LOGS") {
        std::fs::write(path, &logs).unwrap();
    }
    // The capture works and saw the interesting paths, so this test can fail.
    for expected in [
        "refreshed finX access token",
        "finx_gateway::access",
        "invalid_grant",
    ] {
        assert!(logs.contains(expected), "logs lack {expected:?}");
    }
    // pingora's own error line about the failed request describes it by our summary alone.
    // (Its DEBUG line about the upstream request shows a proxied /rest target, which carries no
    // secret: callbacks are answered by the gateway and never proxied.)
    let error_lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("\"level\":\"ERROR\"") && line.contains("GET user_data"))
        .collect();
    assert!(
        !error_lines.is_empty(),
        "pingora logged no error line with our summary"
    );
    assert!(error_lines.iter().all(|line| !line.contains(QUERY_CANARY)));
    for (index, secret) in secrets.iter().enumerate() {
        assert!(secret.len() >= 16, "canary too short to mean anything");
        assert!(
            !logs.contains(secret.as_str()),
            "secret #{index} reached the logs"
        );
    }
}

const MALFORMED_JWT: &str = "CANARY-JWT-IN-A-MALFORMED-REQUEST-8277e0910d750195b448797616e091ad";
const MALFORMED_CODE: &str = "CANARY-CODE-IN-A-MALFORMED-REQUEST-e4da3b7fbbce2345d7772b0674a318d5";

/// A request pingora cannot parse is answered 400 before the gateway sees it; at DEBUG and
/// TRACE (the harness captures both) no record may carry its raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_leave_no_secret_in_debug_or_trace_logs() {
    use std::io::{Read, Write};

    let harness = Harness::start();
    let addr = harness.gateway().addr();
    let target = format!("/callback?code={MALFORMED_CODE}&state=s");
    let auth = format!("Authorization: Bearer {MALFORMED_JWT}");
    let malformed = [
        // A header line without a colon.
        format!("GET {target} HTTP/1.1\r\nHost: gateway\r\n{auth}\r\nno colon here\r\n\r\n"),
        // An unknown HTTP version (pingora first tries to escape the request line).
        format!("GET {target} HTTP/7.7\r\nHost: gateway\r\n{auth}\r\n\r\n"),
        // A control byte in a header value.
        format!("GET {target} HTTP/1.1\r\nHost: gateway\r\n{auth}\r\nX-Bad: a\u{1}b\r\n\r\n"),
        // A space in a header name.
        format!("GET {target} HTTP/1.1\r\n{auth}\r\nBad Name: x\r\n\r\n"),
        // The credential in a header pingora refuses, the code in a target it rewrites.
        format!("GET {target}\" HTTP/1.1\r\nHost: gateway\r\nX-Bad\u{7f}: {MALFORMED_JWT}\r\n\r\n"),
    ];
    for request in &malformed {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
    }
    // A well-formed request after them, so the logs are known to have caught up to here.
    let marker = harness.get_as("nobody-malformed", "/rest/accounts").await;
    assert_eq!(marker.status(), 404);
    support::eventually(Duration::from_secs(10), "the access line", || async {
        captured_logs().contains("nobody-malformed")
    })
    .await;

    let logs = captured_logs();
    // DEBUG records of the dependencies are kept: the capture does look at that level.
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "no DEBUG record was captured"
    );
    for secret in [MALFORMED_JWT, MALFORMED_CODE] {
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "a log record carries a canary: {leaks:?}");
    }
}
