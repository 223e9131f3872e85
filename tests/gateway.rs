//! Black-box tests of the gateway core over real sockets: simulator and gateway in-process on
//! ephemeral loopback ports, driven with a real HTTP client.

mod support;

use std::sync::Arc;
use std::time::Duration;

use finx_gateway::sim::SimConfig;
use finx_gateway::store::{ConnectionKey, ConnectionStatus};
use futures::future::join_all;
use support::{error_code, raw_request, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_is_injected_and_caller_credentials_never_reach_finx() {
    let harness = Harness::start();
    let (access_token, _) = harness.seed_user("alice").await;

    // An unmodified finX client keeps its own Authorization; the caller JWT rides in
    // Proxy-Authorization.
    let response = harness
        .http
        .get(harness.url("/rest/accounts?sync=1"))
        .header("x-finx-user", "alice")
        .header("authorization", "Bearer CALLER-OWN-TOKEN")
        .header(
            "proxy-authorization",
            format!("Bearer {}", harness.caller_token),
        )
        .header("cookie", "session=CALLER-COOKIE")
        .header("x-request-id", "req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["accounts"].as_array().is_some_and(|a| !a.is_empty()),
        "{body}"
    );

    let seen = harness.control.seen_headers(50).await.unwrap();
    let last = seen
        .iter()
        .rev()
        .find(|r| r.path.starts_with("/rest/accounts"))
        .expect("sim saw it");
    assert_eq!(
        last.path, "/rest/accounts?sync=1",
        "query passes through untouched"
    );
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {access_token}").as_str())
    );
    assert_eq!(last.header("x-request-id"), Some("req-1"));
    for gone in ["proxy-authorization", "cookie", "x-finx-user"] {
        assert_eq!(last.header(gone), None, "{gone} reached finX");
    }
    let everything = format!("{seen:?}");
    for caller_secret in ["CALLER-OWN-TOKEN", &harness.caller_token, "CALLER-COOKIE"] {
        assert!(
            !everything.contains(caller_secret),
            "{caller_secret} reached finX"
        );
    }

    // Client routes get Basic client auth instead.
    let response = harness
        .request(reqwest::Method::GET, "/category-tree")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = harness.control.seen_headers(50).await.unwrap();
    let last = seen
        .iter()
        .rev()
        .find(|r| r.path == "/category-tree")
        .unwrap();
    assert!(last
        .header("authorization")
        .is_some_and(|v| v.starts_with("Basic ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_share_one_refresh() {
    let harness = Harness::start();
    harness.import_user("bob").await;

    let requests = (0..500).map(|_| harness.get_as("bob", "/rest/accounts"));
    let statuses: Vec<u16> = join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");

    let stats = harness.control.stats().await.unwrap();
    assert_eq!(stats.refresh_grants, 1);
    assert_eq!(stats.refresh_reuse_detected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_users_times_five_refresh_exactly_two_hundred_times() {
    let harness = Harness::start();
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    join_all(users.iter().map(|u| harness.import_user(u))).await;

    let requests = users
        .iter()
        .flat_map(|u| std::iter::repeat_n(u, 5))
        .map(|u| harness.get_as(u, "/rest/accounts"));
    let responses = join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));

    let stats = harness.control.stats().await.unwrap();
    assert_eq!(stats.refresh_grants, 200);
    assert_eq!(stats.refresh_reuse_detected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_token_survives_a_restart() {
    let mut harness = Harness::start();
    let original = harness.import_user("carol").await;
    assert_eq!(
        harness.get_as("carol", "/rest/accounts").await.status(),
        200
    );

    // The rotated token is in the store, encrypted, and differs from the imported one.
    let stored = harness
        .store()
        .load(&ConnectionKey::user("carol").unwrap())
        .await
        .unwrap()
        .unwrap();
    use secrecy::ExposeSecret;
    assert_ne!(stored.refresh_token.expose_secret(), original);

    harness.stop_gateway();
    harness.advance(2 * 3600).await;
    harness.start_gateway();

    assert_eq!(
        harness.get_as("carol", "/rest/accounts").await.status(),
        200
    );
    let stats = harness.control.user_stats("carol").await.unwrap();
    assert_eq!(stats.refresh_grants, 2);
    assert_eq!(stats.refresh_reuse_detected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_refresh_token_keeps_the_old_one() {
    let mut sim = SimConfig::default().with_control();
    sim.omit_refresh_token = true;
    let harness = Harness::with(sim, |_| {});
    let original = harness.import_user("dave").await;

    for _ in 0..3 {
        assert_eq!(harness.get_as("dave", "/rest/accounts").await.status(), 200);
        harness.advance(3600).await;
    }
    let stored = harness
        .store()
        .load(&ConnectionKey::user("dave").unwrap())
        .await
        .unwrap()
        .unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(stored.refresh_token.expose_secret(), original);
    let stats = harness.control.user_stats("dave").await.unwrap();
    assert_eq!(stats.refresh_grants, 3);
    assert_eq!(stats.refresh_reuse_detected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_marks_reauth_required_and_stops_asking_finx() {
    let harness = Harness::start();
    harness.import_user("erin").await;
    harness.import_user("frank").await;
    harness.control.revoke("erin").await.unwrap();

    let response = harness.get_as("erin", "/rest/accounts").await;
    assert_eq!(response.status(), 424);
    assert_eq!(error_code(response).await, "reauth_required");
    let token_calls = harness.control.stats().await.unwrap().token_requests;

    for _ in 0..5 {
        let response = harness.get_as("erin", "/rest/accounts").await;
        assert_eq!(response.status(), 424);
    }
    assert_eq!(
        harness.control.stats().await.unwrap().token_requests,
        token_calls
    );
    let stored = harness
        .store()
        .load(&ConnectionKey::user("erin").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, ConnectionStatus::ReauthRequired);

    assert_eq!(
        harness.get_as("frank", "/rest/accounts").await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_failures_answer_fast_and_keep_the_refresh_token() {
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        file.upstream.token_timeout = Some(Duration::from_millis(300));
    });
    harness.import_user("gina").await;

    // 5xx
    harness
        .control
        .set_faults(&faults(|f| f.token_error_rate = 1.0))
        .await
        .unwrap();
    let response = harness.get_as("gina", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(error_code(response).await, "upstream_unavailable");
    // Backoff: until Retry-After has passed, finX is not asked again for this connection.
    let token_calls = harness.control.stats().await.unwrap().token_requests;
    let response = harness.get_as("gina", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        harness.control.stats().await.unwrap().token_requests,
        token_calls
    );
    harness.clock.advance(1);

    // 429 with Retry-After
    harness
        .control
        .set_faults(&faults(|f| {
            f.token_rate_limit_rate = 1.0;
            f.retry_after_secs = 7;
        }))
        .await
        .unwrap();
    let response = harness.get_as("gina", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "7");
    harness.clock.advance(6);
    let response = harness.get_as("gina", "/rest/accounts").await;
    assert_eq!(
        response.headers()["retry-after"],
        "1",
        "finX's Retry-After is honoured"
    );
    harness.clock.advance(1);

    // slow: past the gateway's token timeout
    harness
        .control
        .set_faults(&faults(|f| f.token_latency_ms = 2_000))
        .await
        .unwrap();
    let response = harness.get_as("gina", "/rest/accounts").await;
    assert_eq!(response.status(), 504);
    // Failures in a row cool the connection down for longer each time; the answer says how
    // long.
    let cool_down: i64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cool_down > 1, "the cool-down grows: {cool_down}");
    assert_eq!(error_code(response).await, "upstream_timeout");
    harness.clock.advance(cool_down);

    // finX recovers: the same refresh token still works, nothing was reused.
    harness.control.reset().await.unwrap();
    let stats_before = harness.control.user_stats("gina").await.unwrap();
    assert_eq!(harness.get_as("gina", "/rest/accounts").await.status(), 200);
    let stats = harness.control.user_stats("gina").await.unwrap();
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert!(stats.refresh_grants > stats_before.refresh_grants);
}

fn faults(set: impl FnOnce(&mut finx_gateway::sim::Faults)) -> finx_gateway::sim::Faults {
    let mut faults = finx_gateway::sim::Faults::default();
    set(&mut faults);
    faults
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_unreachable_is_503() {
    let harness = Harness::with(SimConfig::default().with_control(), |file| {
        let closed = finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).unwrap();
        file.upstream.base_url = Some(format!("http://{closed}"));
    });
    let key = ConnectionKey::user("hank").unwrap();
    let connection = finx_gateway::store::NewConnection {
        refresh_token: "REFRESH-HANK".to_owned().into(),
        access: None,
        scope: None,
    };
    harness
        .store()
        .put_connection(&key, &connection, 0)
        .await
        .unwrap();
    let response = harness.get_as("hank", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert_eq!(error_code(response).await, "upstream_unavailable");
    let stored = harness.store().load(&key).await.unwrap().unwrap();
    assert_eq!(stored.status, ConnectionStatus::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_endpoints_are_unreachable_under_every_spelling() {
    let harness = Harness::start();
    harness.seed_user("ivy").await;
    let before = harness.control.stats().await.unwrap().token_requests;
    let spellings = [
        "/auth/token",
        "/auth/token/",
        "/AUTH/token",
        "/Auth/Token",
        "/%61uth/token",
        "/%41%55%54%48/token",
        "/auth%2ftoken",
        "/auth%2Ftoken",
        "//auth/token",
        "///auth//token",
        "/./auth/token",
        "/rest/../auth/token",
        "/rest/%2e%2e/auth/token",
        "/rest/%2E%2E/auth/token",
        "/rest/..%2fauth/token",
        "/rest/%2e%2e%2fauth%2ftoken",
        "\\auth\\token",
        "/rest\\..\\auth/token",
        "/auth;x=1/token",
        "/%2561uth/token",
        "/rest/%252e%252e/auth/token",
        "/auth%00/token",
        "/auth/revoke?token=x",
        "http://finx.example/auth/token",
    ];
    for path in spellings {
        for method in ["GET", "POST"] {
            let raw = format!(
                "{method} {path} HTTP/1.1\r\nHost: gateway\r\nX-Finx-User: ivy\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
            let status = raw_request(harness.gateway().addr(), &raw);
            assert!(
                status == 403 || status == 400,
                "{method} {path} answered {status}"
            );
        }
    }
    assert_eq!(
        harness.control.stats().await.unwrap().token_requests,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_json_with_the_designed_codes() {
    let harness = Harness::start();
    let cases = [
        ("/rest/accounts", None, 400, "bad_request"),
        ("/rest/accounts", Some("no such user!"), 400, "bad_request"),
        (
            "/rest/accounts",
            Some("nobody"),
            404,
            "connection_not_found",
        ),
        ("/nowhere", None, 404, "route_not_found"),
        ("/auth/token", None, 403, "route_forbidden"),
        ("/ongoing/access", None, 400, "bad_request"),
        ("/onetime/unknown-flow", None, 404, "route_not_found"),
    ];
    for (path, user, status, code) in cases {
        let mut request = harness.request(reqwest::Method::GET, path);
        if let Some(user) = user {
            request = request.header("x-finx-user", user);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(error_code(response).await, code, "{path}");
    }
    let health = harness
        .http
        .get(harness.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finx_401_on_a_get_refreshes_once_and_replays_it() {
    let harness = Harness::start();
    harness.seed_user("jack").await;
    assert_eq!(harness.get_as("jack", "/rest/accounts").await.status(), 200);

    harness.control.expire_access_tokens().await.unwrap();
    let response = harness.get_as("jack", "/rest/accounts").await;
    assert_eq!(response.status(), 200, "replayed with a new token");
    assert_eq!(harness.get_as("jack", "/rest/accounts").await.status(), 200);
    let stats = harness.control.user_stats("jack").await.unwrap();
    assert_eq!(stats.refresh_grants, 1);
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(harness.gateway().tokens().stats().requests_waited, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_by_clock_refreshes_before_use() {
    let harness = Harness::start();
    harness.seed_user("kim").await;
    assert_eq!(harness.get_as("kim", "/rest/accounts").await.status(), 200);
    // Inside the refresh window (less than refresh_skew left): refreshed before use.
    harness.advance(3600 - 30).await;
    assert_eq!(harness.get_as("kim", "/rest/accounts").await.status(), 200);
    assert_eq!(
        harness
            .control
            .user_stats("kim")
            .await
            .unwrap()
            .refresh_grants,
        1
    );
    let _ = Arc::new(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finx_answers_pass_through_unchanged() {
    let harness = Harness::start();
    let (access_token, _) = harness.seed_user("lena").await;
    for path in [
        "/rest/accounts",
        "/rest/transactions?count=500",
        "/rest/contracts",
        "/rest/nope",
    ] {
        let direct = harness
            .http
            .get(format!("{}{path}", harness.sim.base_url()))
            .bearer_auth(&access_token)
            .send()
            .await
            .unwrap();
        let via_gateway = harness.get_as("lena", path).await;
        assert_eq!(via_gateway.status(), direct.status(), "{path}");
        assert_eq!(
            via_gateway.headers().get("content-type"),
            direct.headers().get("content-type"),
            "{path}"
        );
        let (direct, via_gateway) = (
            direct.bytes().await.unwrap(),
            via_gateway.bytes().await.unwrap(),
        );
        assert_eq!(via_gateway, direct, "{path}");
    }
}

/// finX rotated the refresh token but its answer never arrived. With a reuse grace window the
/// gateway's retry with the old token recovers; with strict rotation the grant is lost and the
/// connection says so (424) instead of failing forever with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_refresh_answer_recovers_within_a_grace_window_and_is_reported_without_one() {
    let lose_next_answer = finx_gateway::sim::Faults {
        lost_response_rate: 1.0,
        budget: Some(1),
        ..Default::default()
    };

    let mut sim = SimConfig::default().with_control();
    sim.grace_window = Duration::from_secs(30);
    let lenient = Harness::with(sim, |_| {});
    lenient.import_user("mia").await;
    lenient.control.set_faults(&lose_next_answer).await.unwrap();
    let response = lenient.get_as("mia", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert_eq!(error_code(response).await, "upstream_unavailable");
    lenient.clock.advance(1); // past the backoff
    assert_eq!(lenient.get_as("mia", "/rest/accounts").await.status(), 200);
    let stats = lenient.control.stats().await.unwrap();
    assert_eq!((stats.grace_reuses, stats.families_revoked), (1, 0));

    let strict = Harness::start();
    strict.import_user("noah").await;
    strict.control.set_faults(&lose_next_answer).await.unwrap();
    assert_eq!(strict.get_as("noah", "/rest/accounts").await.status(), 503);
    strict.clock.advance(1);
    let response = strict.get_as("noah", "/rest/accounts").await;
    assert_eq!(response.status(), 424);
    assert_eq!(error_code(response).await, "reauth_required");
    assert_eq!(strict.control.stats().await.unwrap().families_revoked, 1);
}

/// finX rotated the token but the store could not take it: the new grant is kept and stored
/// before finX is ever asked again, so the spent token is never presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_the_store_refused_is_committed_before_finx_is_asked_again() {
    let harness = Harness::start();
    harness.import_user("olga").await;
    // Every attempt of the first commit fails (the gateway retries a few times).
    harness
        .failing_commits
        .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    let response = harness.get_as("olga", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    assert_eq!(error_code(response).await, "store_unavailable");
    // Still failing: finX is not asked again.
    assert_eq!(harness.get_as("olga", "/rest/accounts").await.status(), 503);
    assert_eq!(
        harness
            .control
            .user_stats("olga")
            .await
            .unwrap()
            .refresh_grants,
        1
    );

    harness
        .failing_commits
        .store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(harness.get_as("olga", "/rest/accounts").await.status(), 200);
    let stats = harness.control.user_stats("olga").await.unwrap();
    assert_eq!((stats.refresh_grants, stats.refresh_reuse_detected), (1, 0));
    // The stored token is the rotated one: the next refresh works.
    harness.advance(3600).await;
    assert_eq!(harness.get_as("olga", "/rest/accounts").await.status(), 200);
    let stats = harness.control.user_stats("olga").await.unwrap();
    assert_eq!((stats.refresh_grants, stats.refresh_reuse_detected), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_store_is_refused() {
    let harness = Harness::start();
    let mut config = harness.config();
    config.listen = finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).unwrap();
    let store = finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).unwrap();
    let clock: std::sync::Arc<dyn finx_gateway::clock::Clock> =
        std::sync::Arc::new(harness.clock.clone());
    let refused = finx_gateway::RunningGateway::start(config, store, clock);
    let message = refused.err().expect("second gateway refused").to_string();
    assert!(
        message.contains("another finx-gateway process"),
        "{message}"
    );
    // The first keeps serving.
    assert_eq!(
        harness
            .http
            .get(harness.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
