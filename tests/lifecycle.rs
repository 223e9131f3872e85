//! Keeping every consent alive, black-box over real sockets with the simulator's clock: refresh
//! ahead of expiry, the keeper over 200 simulated days, a 401 storm, a token-endpoint outage and
//! store faults. Crashes, stops and upgrades of real processes are in `shutdown.rs` and
//! `failpoints.rs`.

mod support;

use std::time::Duration;

use finx_gateway::sim::{Faults, SimConfig};
use futures::StreamExt;
use support::eventually;
use support::{error_code, Harness, StoreKind};

const DAY: i64 = 86_400;

crate::on_both_stores!(
    under_steady_traffic_tokens_are_refreshed_ahead_and_no_request_waits,
    the_keeper_keeps_idle_connections_alive_for_200_days_and_leaves_dead_ones_alone,
    the_keeper_runs_on_its_own_schedule,
    a_401_storm_refreshes_each_connection_once_replays_gets_and_passes_posts_through,
    during_a_token_endpoint_outage_valid_tokens_serve_expired_ones_fail_and_all_recover,
    store_errors_at_20_percent_fail_closed_and_lose_no_refresh_token,
    finx_429_and_503_on_data_calls_pass_through_untouched,
);

/// Waits until the gateway has no background work in flight (refreshes ahead, touches).
async fn settled(harness: &Harness) {
    eventually(Duration::from_secs(10), "background work", || async {
        harness.gateway().tokens().background_in_flight() == 0
    })
    .await;
}

/// `count` GETs of `/rest/accounts` per user, all at once; their statuses.
async fn storm(harness: &Harness, users: &[String], count: usize) -> Vec<u16> {
    let requests: Vec<&String> = users
        .iter()
        .flat_map(|u| std::iter::repeat_n(u, count))
        .collect();
    futures::stream::iter(requests)
        .map(|user| async move {
            harness
                .get_as(user, "/rest/accounts")
                .await
                .status()
                .as_u16()
        })
        .buffer_unordered(32)
        .collect()
        .await
}

async fn under_steady_traffic_tokens_are_refreshed_ahead_and_no_request_waits(kind: StoreKind) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    let users: Vec<String> = (0..3).map(|i| format!("steady-{i}")).collect();
    for user in &users {
        harness.seed_user(user).await;
    }
    const TOKENS: u64 = 10;
    let target = TOKENS * users.len() as u64;
    // A request per user every simulated minute until every user went through ten tokens.
    for _ in 0..(TOKENS as usize * 62) {
        harness.advance(60).await;
        for user in &users {
            assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
        }
        settled(&harness).await;
        if harness.gateway().tokens().stats().refreshes == target {
            break;
        }
    }
    let stats = harness.gateway().tokens().stats();
    assert_eq!(stats.refreshes, target);
    assert_eq!(stats.refreshes_ahead, target, "every refresh ran ahead");
    assert_eq!(stats.requests_waited, 0, "no request waited for finX");
    for user in &users {
        let sim = harness.control.user_stats(user).await.unwrap();
        assert_eq!(sim.refresh_grants, TOKENS, "{user}: one refresh per token");
        assert_eq!(sim.refresh_reuse_detected, 0);
    }
}

async fn the_keeper_keeps_idle_connections_alive_for_200_days_and_leaves_dead_ones_alone(
    kind: StoreKind,
) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    let idle: Vec<String> = (0..5).map(|i| format!("idle-{i}")).collect();
    for user in &idle {
        harness.import_user(user).await;
    }
    harness.import_user("revoked").await;
    harness.control.revoke("revoked").await.unwrap();
    let keeper = harness
        .gateway()
        .keeper()
        .expect("the keeper is on by default");

    let mut refreshed = 0;
    for _ in 0..200 {
        harness.advance(DAY).await;
        let report = keeper.run_once().await;
        refreshed += report.refreshed;
    }
    let stats = harness.control.stats().await.unwrap();
    assert_eq!(
        stats.invalid_grant_responses, 1,
        "the revoked grant was asked for once, never again"
    );
    assert_eq!(
        stats.families_revoked, 1,
        "only the one revoked by the test"
    );
    for user in &idle {
        let sim = harness.control.user_stats(user).await.unwrap();
        // Due every 30 days: days 31, 62, 93, 124, 155, 186.
        assert_eq!(sim.refresh_grants, 6, "{user}");
        assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
    }
    assert_eq!(refreshed, 6 * idle.len());
    let response = harness.get_as("revoked", "/rest/accounts").await;
    assert_eq!(error_code(response).await, "reauth_required");
}

async fn the_keeper_runs_on_its_own_schedule(kind: StoreKind) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |file| {
        file.keeper.interval = Some(Duration::from_millis(50));
    });
    harness.import_user("scheduled").await;
    harness.advance(31 * DAY).await;
    // finX counts the grant before the keeper's pass ends and counts itself: wait for both.
    eventually(
        Duration::from_secs(20),
        "a keeper pass refreshing it",
        || async {
            harness
                .control
                .user_stats("scheduled")
                .await
                .unwrap()
                .refresh_grants
                == 1
                && harness.gateway().keeper().unwrap().passes() > 0
        },
    )
    .await;
}

async fn a_401_storm_refreshes_each_connection_once_replays_gets_and_passes_posts_through(
    kind: StoreKind,
) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |file| {
        file.callers.services[0]
            .routes
            .push("POST /rest/accounts".into());
    });
    let readers: Vec<String> = (0..20).map(|i| format!("reader-{i}")).collect();
    let writers: Vec<String> = (0..10).map(|i| format!("writer-{i}")).collect();
    for user in readers.iter().chain(&writers) {
        harness.seed_user(user).await;
        assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
    }
    harness.control.expire_access_tokens().await.unwrap();
    let before = harness.control.stats().await.unwrap();

    // GETs meet the 401 concurrently: one refresh per connection, every GET replayed.
    let statuses = storm(&harness, &readers, 5).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // A POST is never replayed: the caller sees finX's 401; the token is dropped, so the next
    // GET refreshes (once) and works.
    for user in &writers {
        let response = harness
            .request(reqwest::Method::POST, "/rest/accounts")
            .header("x-finx-user", user)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{user}");
        assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
    }

    let after = harness.control.stats().await.unwrap();
    let users = (readers.len() + writers.len()) as u64;
    assert_eq!(after.refresh_grants - before.refresh_grants, users);
    assert_eq!(
        after.token_requests - before.token_requests,
        users,
        "no loop"
    );
    assert_eq!(after.refresh_reuse_detected, 0);
    for user in readers.iter().chain(&writers) {
        assert_eq!(
            harness
                .control
                .user_stats(user)
                .await
                .unwrap()
                .refresh_grants,
            1
        );
    }
    let stats = harness.gateway().tokens().stats();
    assert_eq!(stats.refreshes, users);
    println!(
        "finX answer → durable (journal fsync): mean {} µs, max {} µs over {} refreshes",
        stats.commit_window_total_us / stats.refreshes.max(1),
        stats.commit_window_max_us,
        stats.refreshes
    );
}

async fn during_a_token_endpoint_outage_valid_tokens_serve_expired_ones_fail_and_all_recover(
    kind: StoreKind,
) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    let users: Vec<String> = (0..10).map(|i| format!("outage-{i}")).collect();
    for user in &users {
        harness.seed_user(user).await;
    }
    let faults = Faults {
        token_error_rate: 1.0,
        error_status: 503,
        ..Faults::default()
    };
    harness.control.set_faults(&faults).await.unwrap();
    let before = harness.control.stats().await.unwrap();

    // Well inside their lives, then inside refresh_skew but not expired: still served.
    for offset in [1800, 3600 - 1800 - 30] {
        harness.advance(offset).await;
        let statuses = storm(&harness, &users, 3).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        settled(&harness).await;
    }
    // Expired: never forwarded, 503 with Retry-After.
    harness.advance(60).await;
    for user in &users {
        for _ in 0..3 {
            let response = harness.get_as(user, "/rest/accounts").await;
            assert_eq!(response.status(), 503, "{user}");
            assert!(response.headers().contains_key("retry-after"));
        }
    }
    settled(&harness).await;
    let during = harness.control.stats().await.unwrap();
    let calls = during.token_requests - before.token_requests;
    // Per user: one refresh ahead, one inside the skew, one after expiry, each retrying an
    // explicit 503 at most four times within its budget, and nothing during the cool-downs.
    assert!(
        calls <= users.len() as u64 * 3 * 5,
        "finX was hammered: {calls} token calls"
    );
    assert_eq!(
        during.rest_unauthorized, 0,
        "no expired token was forwarded"
    );

    harness
        .control
        .set_faults(&Faults::default())
        .await
        .unwrap();
    harness.advance(301).await;
    let statuses = storm(&harness, &users, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let after = harness.control.stats().await.unwrap();
    assert_eq!(after.refresh_reuse_detected, 0);
    assert_eq!(after.families_revoked, 0);
}

async fn store_errors_at_20_percent_fail_closed_and_lose_no_refresh_token(kind: StoreKind) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    let users: Vec<String> = (0..50).map(|i| format!("faulty-{i}")).collect();
    for user in &users {
        harness.import_user(user).await;
    }
    harness.store_faults().set_error_rate(0.2);
    let mut answered = std::collections::BTreeMap::<u16, u64>::new();
    // 20 rounds of 500 requests, each round after every token expired.
    for _ in 0..20 {
        for status in storm(&harness, &users, 10).await {
            *answered.entry(status).or_default() += 1;
        }
        harness.advance(3600).await;
    }
    let total: u64 = answered.values().sum();
    assert_eq!(total, 10_000);
    assert!(
        answered.keys().all(|s| *s == 200 || *s == 503),
        "only success or store_unavailable: {answered:?}"
    );
    assert!(harness.store_faults().injected() > 0);
    let stats = harness.control.stats().await.unwrap();
    assert_eq!(
        stats.rest_unauthorized, 0,
        "nothing went upstream without a valid credential"
    );

    // Faults off: every connection still works, nothing was spent twice.
    harness.store_faults().set_error_rate(0.0);
    harness.advance(301).await;
    let statuses = storm(&harness, &users, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = harness.control.stats().await.unwrap();
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.families_revoked, 0);
    assert_eq!(stats.invalid_grant_responses, 0);
    println!("store faults at 20 %: {answered:?} over {total} requests");
}

async fn finx_429_and_503_on_data_calls_pass_through_untouched(kind: StoreKind) {
    let harness = Harness::with_store(kind, SimConfig::default().with_control(), |_| {});
    harness.seed_user("busy").await;
    assert_eq!(harness.get_as("busy", "/rest/accounts").await.status(), 200);
    let before = harness.control.stats().await.unwrap();
    harness
        .control
        .set_faults(&Faults {
            data_rate_limit_rate: 1.0,
            retry_after_secs: 7,
            ..Faults::default()
        })
        .await
        .unwrap();
    let response = harness.get_as("busy", "/rest/accounts").await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    harness
        .control
        .set_faults(&Faults {
            data_error_rate: 1.0,
            error_status: 503,
            retry_after_secs: 3,
            ..Faults::default()
        })
        .await
        .unwrap();
    let response = harness.get_as("busy", "/rest/accounts").await;
    assert_eq!(response.status(), 503);
    // finX's own answer, not the gateway's: no gateway error body.
    let body = response.text().await.unwrap();
    assert!(!body.contains("upstream_unavailable"), "{body}");
    harness
        .control
        .set_faults(&Faults::default())
        .await
        .unwrap();
    assert_eq!(harness.get_as("busy", "/rest/accounts").await.status(), 200);
    let after = harness.control.stats().await.unwrap();
    assert_eq!(
        after.token_requests, before.token_requests,
        "the token was kept"
    );
}
