//! Operating the gateway through its admin listener: probes, Prometheus metrics, the admin
//! credential, request ids. Black-box over real sockets.

mod support;

use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use reqwest::StatusCode;
use support::pg::OutageProxy;
use support::{eventually, Harness, StoreKind, ADMIN_TOKEN};

/// Scrapes `/metrics` and parses it with a Prometheus text parser.
async fn scrape(harness: &Harness) -> Scrape {
    let text = reqwest::get(format!("{}/metrics", harness.gateway().admin_url()))
        .await
        .expect("admin listener answers")
        .text()
        .await
        .expect("metrics body");
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("valid exposition format")
}

/// The samples of metric `name` whose labels include `labels`.
fn samples<'s>(
    scrape: &'s Scrape,
    name: &'s str,
    labels: &'s [(&str, &str)],
) -> impl Iterator<Item = &'s prometheus_parse::Sample> {
    scrape.samples.iter().filter(move |sample| {
        sample.metric == name
            && labels
                .iter()
                .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
    })
}

/// The value of the counter or gauge `name` whose labels include `labels` (0 when absent).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, name, labels)
        .map(|sample| match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The observation count of histogram `name` whose labels include `labels`.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> u64 {
    samples(scrape, name, labels)
        .map(|sample| match &sample.value {
            Value::Histogram(buckets) => buckets.last().map_or(0, |b| b.count as u64),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_present_and_move_with_traffic() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    harness.import_user("bob").await;
    let before = scrape(&harness).await;
    assert_eq!(
        value(&before, "finx_gateway_build_info", &[]),
        1.0,
        "build info"
    );
    assert_eq!(value(&before, "finx_gateway_ready", &[]), 1.0);

    for _ in 0..3 {
        let answer = harness.get_as("alice", "/rest/accounts").await;
        assert_eq!(answer.status(), StatusCode::OK);
    }
    // bob's first request refreshes at finX.
    assert_eq!(
        harness.get_as("bob", "/rest/accounts").await.status(),
        StatusCode::OK
    );
    let unauthenticated = reqwest::Client::new()
        .get(harness.url("/rest/accounts"))
        .header("x-finx-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);

    let after = scrape(&harness).await;
    let ok = [("route", "user_data"), ("method", "GET"), ("status", "200")];
    assert_eq!(
        value(&after, "finx_gateway_requests_total", &ok)
            - value(&before, "finx_gateway_requests_total", &ok),
        4.0
    );
    assert!(
        histogram_count(
            &after,
            "finx_gateway_overhead_duration_seconds",
            &[("route", "user_data")]
        ) >= 4
    );
    assert!(
        histogram_count(
            &after,
            "finx_gateway_upstream_duration_seconds",
            &[("route", "user_data")]
        ) >= 4
    );
    assert!(value(&after, "finx_gateway_token_cache_hits_total", &[]) >= 2.0);
    assert!(value(&after, "finx_gateway_token_cache_misses_total", &[]) >= 2.0);
    assert_eq!(
        value(&after, "finx_gateway_refreshes_total", &[("outcome", "ok")]),
        1.0,
        "bob's refresh"
    );
    assert_eq!(
        value(&after, "finx_gateway_requests_waited_on_refresh_total", &[]),
        1.0
    );
    assert_eq!(
        histogram_count(&after, "finx_gateway_refresh_duration_seconds", &[]),
        1
    );
    assert_eq!(
        value(
            &after,
            "finx_gateway_caller_decisions_total",
            &[("decision", "unauthenticated")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "finx_gateway_caller_decisions_total",
            &[("decision", "allowed")]
        ) >= 4.0
    );
    assert_eq!(
        value(&after, "finx_gateway_connections", &[("status", "active")]),
        2.0
    );
    assert_eq!(
        histogram_count(&after, "finx_gateway_refresh_token_age_seconds", &[]),
        2
    );
    assert_eq!(
        value(&after, "finx_gateway_connections_near_lapse", &[]),
        0.0
    );
    assert!(
        histogram_count(
            &after,
            "finx_gateway_store_operation_duration_seconds",
            &[("operation", "commit_refresh")]
        ) >= 1,
        "bob's refresh was committed"
    );
    assert_eq!(value(&after, "finx_gateway_store_errors_total", &[]), 0.0);
    // Bounded labels: no user id anywhere in the exposition.
    let text = reqwest::get(format!("{}/metrics", harness.gateway().admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("alice") && !text.contains("bob"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_the_admin_api_needs_its_credential() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    let admin = harness.gateway().admin_url();
    let http = reqwest::Client::new();

    let health = http.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = http.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let anonymous = http
        .get(format!("{admin}/admin/connections"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = http
        .get(format!("{admin}/admin/connections"))
        .bearer_auth("not-the-admin-credential-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let prefix = http
        .get(format!("{admin}/admin/connections"))
        .bearer_auth(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])
        .send()
        .await
        .unwrap();
    assert_eq!(prefix.status(), StatusCode::UNAUTHORIZED);

    let listed = http
        .get(format!("{admin}/admin/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let body = listed.text().await.unwrap();
    assert!(body.contains("\"alice\""), "{body}");

    // The data listener serves no admin routes.
    let on_data_port = http
        .get(harness.url("/admin/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_ne!(on_data_port.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_and_draining() {
    let mut harness = Harness::with_store(
        StoreKind::Postgres,
        finx_gateway::sim::SimConfig::default().with_control(),
        |file| {
            file.store.connect_timeout = Some(Duration::from_millis(500));
        },
    );
    let proxy = OutageProxy::start();
    harness.restart_via(|url| proxy.route(url));
    let ready_url = format!("{}/readyz", harness.gateway().admin_url());
    let status =
        |url: String| async move { reqwest::get(url).await.map(|answer| answer.status()).ok() };
    assert_eq!(status(ready_url.clone()).await, Some(StatusCode::OK));

    proxy.cut();
    eventually(Duration::from_secs(20), "readiness turns false", || {
        let url = ready_url.clone();
        async move { status(url).await == Some(StatusCode::SERVICE_UNAVAILABLE) }
    })
    .await;
    let health = reqwest::get(format!("{}/healthz", harness.gateway().admin_url()))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK, "alive while not ready");

    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "readiness turns true again",
        || {
            let url = ready_url.clone();
            async move { status(url).await == Some(StatusCode::OK) }
        },
    )
    .await;

    harness.gateway().start_draining();
    assert_eq!(
        status(ready_url.clone()).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_travels_from_the_caller_to_finx_and_back() {
    let harness = Harness::start();
    harness.seed_user("alice").await;

    let answer = harness
        .request(reqwest::Method::GET, "/rest/accounts")
        .header("x-finx-user", "alice")
        .header("x-request-id", "trace-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["x-request-id"], "trace-4711");
    let seen = harness.control.last_request().await.unwrap().unwrap();
    assert_eq!(seen.header("x-request-id"), Some("trace-4711"));

    // Without one (or with an unusable one) the gateway makes one up and uses it the same way.
    let answer = harness
        .request(reqwest::Method::GET, "/rest/accounts")
        .header("x-finx-user", "alice")
        .header("x-request-id", "")
        .send()
        .await
        .unwrap();
    let generated = answer.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 32, "{generated}");
    let seen = harness.control.last_request().await.unwrap().unwrap();
    assert_eq!(seen.header("x-request-id"), Some(generated.as_str()));

    // The gateway's own answers carry it too.
    let refused = harness
        .request(reqwest::Method::GET, "/rest/accounts")
        .header("x-request-id", "trace-4712")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.headers()["x-request-id"], "trace-4712");

    eventually(
        Duration::from_secs(5),
        "the access line has the id",
        || async { support::captured_logs().contains("trace-4711") },
    )
    .await;
}
