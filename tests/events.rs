//! Connection events, black-box over real sockets: a webhook receiver on a loopback port that
//! records every delivery (and fails the first ones on demand), the simulator's control plane
//! revoking a grant, a new consent through the gateway's connect flow, the keeper finding an old
//! refresh token, and the admin listing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use finx_gateway::clock::Clock;
use finx_gateway::config::file::WebhookFile;
use finx_gateway::config::{Config, ConfigFile, SecretRef};
use finx_gateway::sim::SimConfig;
use finx_gateway::store::{ConnectionKey, NewConnection};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use support::webhook::{verify_signature, Receiver};
use support::{eventually, Harness, StoreKind, ADMIN_TOKEN, APP_RETURN};

const DAY: i64 = 86_400;
const WEBHOOK_SECRET: &str = "whsec-events-test-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);

/// A harness whose gateway delivers events to `url` (secret in `dir`), retrying after 10 ms.
fn harness_with_webhook(
    url: String,
    dir: &Path,
    tweak: impl Fn(&mut ConfigFile) + Send + Sync + 'static,
) -> Harness {
    let secret_path = dir.join("webhook-secret");
    std::fs::write(&secret_path, format!("{WEBHOOK_SECRET}\n")).unwrap();
    Harness::with_config(
        StoreKind::Sqlite,
        SimConfig::default().with_control(),
        move |file| {
            file.events.webhooks = vec![WebhookFile {
                url: Some(url.clone()),
                secret: Some(SecretRef::File(secret_path.clone())),
            }];
            file.events.retry_initial = Some(Duration::from_millis(10));
            file.events.retry_max = Some(Duration::from_millis(40));
            file.events.max_attempts = Some(5);
            tweak(file);
        },
    )
}

/// `GET /admin/events[?query]` with the admin credential; the body as text.
async fn admin_events(harness: &Harness, query: &str) -> String {
    let answer = reqwest::Client::new()
        .get(format!(
            "{}/admin/events{query}",
            harness.gateway().admin_url()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap()
}

/// `/metrics` as text.
async fn metrics(harness: &Harness) -> String {
    reqwest::get(format!("{}/metrics", harness.gateway().admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A new consent for `user` through the gateway: the service starts an ongoing flow, the user
/// completes finX's widget, the browser returns to the gateway's callback.
async fn consent_again(harness: &Harness, user: &str) {
    let answer = harness
        .request(reqwest::Method::POST, "/ongoing/access")
        .json(&json!({"redirect_uri": APP_RETURN, "state": "app-state", "user_id": user}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
    let flow: Value = answer.json().await.unwrap();
    let callback = harness
        .control
        .complete_widget(flow["id"].as_str().unwrap(), "success")
        .await
        .unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let back = browser.get(callback).send().await.unwrap();
    assert_eq!(back.status(), 302);
    let app = back.headers()["location"].to_str().unwrap().to_owned();
    assert!(app.contains("success=true"), "{app}");
}

/// The stored tokens of `user` (to prove no answer carries them).
async fn stored_tokens(harness: &Harness, user: &str) -> Vec<String> {
    let connection = harness
        .store()
        .load(&ConnectionKey::user(user).unwrap())
        .await
        .unwrap()
        .unwrap();
    let mut tokens = vec![connection.refresh_token.expose_secret().to_owned()];
    tokens.extend(
        connection
            .access
            .map(|access| access.token.expose_secret().to_owned()),
    );
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_is_announced_once_signed_and_delivered_once_after_two_failures_then_its_recovery(
) {
    let (receiver, url) = Receiver::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let harness = harness_with_webhook(url, dir.path(), |_| {});
    let (access, refresh) = harness.seed_user("alice").await;
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        200
    );

    // The user revokes the grant at finX; once the access token expires, the refresh gets
    // invalid_grant.
    harness.control.revoke("alice").await.unwrap();
    harness.advance(3600).await;
    for _ in 0..3 {
        assert_eq!(
            harness.get_as("alice", "/rest/accounts").await.status(),
            424
        );
    }
    eventually(WAIT, "the reauth_required event is accepted", || async {
        !receiver.accepted("reauth_required").is_empty()
    })
    .await;

    let seen = receiver.seen();
    assert_eq!(
        seen.len(),
        3,
        "two failed attempts, then the accepted one: {seen:#?}"
    );
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    let event = seen[2].event();
    assert_eq!(event["kind"], "reauth_required");
    assert_eq!(event["connection"], "alice");
    assert_eq!(event["status"], "reauth_required");
    assert_eq!(event["reason"], "invalid_grant");
    assert!(event["time"].as_i64().unwrap() >= harness.clock.now() - 60);
    let id = event["id"].as_str().unwrap();
    for attempt in &seen {
        assert_eq!(
            attempt.body, seen[2].body,
            "every attempt sends the same event"
        );
        assert_eq!(attempt.event_id, id, "X-Finx-Event-Id is the event's id");
        verify_signature(attempt, WEBHOOK_SECRET);
        for token in [&access, &refresh] {
            assert!(
                !attempt.body.contains(token.as_str()),
                "a token in {}",
                attempt.body
            );
        }
    }

    // Still dead on the next request: not announced again.
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        424
    );
    let text = metrics(&harness).await;
    assert!(
        text.contains("finx_gateway_events_total{kind=\"reauth_required\"} 1"),
        "{text}"
    );
    assert!(text.contains("finx_gateway_webhook_deliveries_total{outcome=\"retried\"} 2"));
    assert!(text.contains("finx_gateway_webhook_deliveries_total{outcome=\"delivered\"} 1"));
    assert!(text.contains("finx_gateway_webhook_deliveries_total{outcome=\"failed\"} 0"));

    // The user consents again through the gateway: the connection recovers.
    consent_again(&harness, "alice").await;
    eventually(WAIT, "the recovered event is accepted", || async {
        !receiver.accepted("recovered").is_empty()
    })
    .await;
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        200
    );
    let recovered = receiver.accepted("recovered");
    assert_eq!(recovered.len(), 1);
    verify_signature(&recovered[0], WEBHOOK_SECRET);
    let event = recovered[0].event();
    assert_eq!(event["connection"], "alice");
    assert_eq!(event["status"], "active");
    assert_eq!(event["reason"], "consent_after_reauth_required");
    assert_ne!(event["id"], id);
    assert_eq!(receiver.accepted("reauth_required").len(), 1);
    assert_eq!(receiver.seen().len(), 4);

    // The admin listing: newest first, no token anywhere, behind the admin credential.
    let listed = admin_events(&harness, "").await;
    let body: Value = serde_json::from_str(&listed).unwrap();
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{listed}");
    assert_eq!(events[0]["kind"], "recovered");
    assert_eq!(events[1]["kind"], "reauth_required");
    assert_eq!(events[1]["id"], id);
    assert_eq!(events[1]["deliveries"]["delivered"], 1);
    assert_eq!(body["dropped"], 0);
    let mut tokens = stored_tokens(&harness, "alice").await;
    tokens.extend([access, refresh]);
    for token in &tokens {
        assert!(!listed.contains(token.as_str()), "a token in the listing");
    }
    let one: Value = serde_json::from_str(&admin_events(&harness, "?limit=1").await).unwrap();
    assert_eq!(one["events"].as_array().unwrap().len(), 1);
    assert_eq!(one["events"][0]["kind"], "recovered");
    let anonymous = reqwest::get(format!("{}/admin/events", harness.gateway().admin_url()))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // The webhook secret is never logged.
    assert!(!support::captured_logs().contains(WEBHOOK_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_refresh_token_is_announced_near_lapse_once() {
    let (receiver, url) = Receiver::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let harness = harness_with_webhook(url, dir.path(), |file| {
        // The keeper leaves connections alone until 89 days, so one can age into the window.
        file.keeper.max_refresh_age = Some(Duration::from_secs(89 * DAY as u64));
        file.keeper.max_idle = Some(Duration::from_secs(89 * DAY as u64));
    });
    harness.import_user("aging").await;
    let consented_at = harness.clock.now();
    harness.advance(84 * DAY).await;
    // A connection consented just now is far from lapsing.
    harness
        .store()
        .put_connection(
            &ConnectionKey::user("fresh").unwrap(),
            &NewConnection {
                refresh_token: SecretString::from("fresh-refresh-token".to_owned()),
                access: None,
                scope: None,
            },
            harness.clock.now(),
        )
        .await
        .unwrap();

    let keeper = harness.gateway().keeper().expect("the keeper is on");
    let report = keeper.run_once().await;
    assert_eq!(report.refreshed, 0, "nothing is due before 89 days");
    assert_eq!(report.near_lapse, 1);
    eventually(WAIT, "the near_lapse event is accepted", || async {
        !receiver.accepted("near_lapse").is_empty()
    })
    .await;
    let near = receiver.accepted("near_lapse");
    verify_signature(&near[0], WEBHOOK_SECRET);
    let event = near[0].event();
    assert_eq!(event["connection"], "aging");
    assert_eq!(event["status"], "active");
    assert_eq!(event["reason"], "refresh_token_age");
    let lapses_at = event["lapses_at"].as_i64().unwrap();
    assert!(
        (lapses_at - (consented_at + 90 * DAY)).abs() <= 5,
        "lapses at {lapses_at}"
    );

    // The next pass (a day later, still the same refresh token) does not repeat it.
    harness.advance(DAY).await;
    assert_eq!(keeper.run_once().await.near_lapse, 0);
    let listed: Value = serde_json::from_str(&admin_events(&harness, "").await).unwrap();
    let events = listed["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{listed}");
    assert_eq!(events[0]["kind"], "near_lapse");
    let text = metrics(&harness).await;
    assert!(
        text.contains("finx_gateway_events_total{kind=\"near_lapse\"} 1"),
        "{text}"
    );
    assert_eq!(receiver.seen().len(), 1);
    let tokens = stored_tokens(&harness, "aging").await;
    for token in &tokens {
        assert!(!near[0].body.contains(token.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_settings_are_checked_offline_and_their_secrets_read_online() {
    let harness = Harness::start();
    let dir = tempfile::tempdir().unwrap();
    let mut file = harness.config_file();
    file.events.near_lapse_days = Some(90);
    file.events.retry_initial = Some(Duration::from_secs(10));
    file.events.retry_max = Some(Duration::from_secs(1));
    file.events.webhooks = vec![
        WebhookFile {
            url: Some("ftp://hooks.example/finx".into()),
            secret: None,
        },
        WebhookFile {
            url: Some("https://user:pass@hooks.example/finx".into()),
            secret: Some(SecretRef::Env("FINX_TEST_UNSET_WEBHOOK_SECRET".into())),
        },
    ];
    let errors = Config::check(&file, Path::new("."))
        .unwrap_err()
        .to_string();
    for expected in [
        "events.near_lapse_days",
        "events.retry_max",
        "events.webhooks[0].url",
        "events.webhooks[0].secret: required",
        "events.webhooks[1].url",
    ] {
        assert!(
            errors.contains(expected),
            "{expected} missing from {errors}"
        );
    }
    assert!(!errors.contains("user:pass"), "{errors}");

    // Offline, a secret reference is not read; online it is, and a short one is refused.
    let short: PathBuf = dir.path().join("short-secret");
    std::fs::write(&short, "too-short-key").unwrap();
    let mut file = harness.config_file();
    file.events.webhooks = vec![WebhookFile {
        url: Some("https://hooks.example/finx".into()),
        secret: Some(SecretRef::File(short)),
    }];
    Config::check(&file, Path::new(".")).expect("the check reads no secret");
    let errors = Config::from_file(&file, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("events.webhooks[0].secret: must be at least 16 bytes"),
        "{errors}"
    );
    assert!(!errors.contains("too-short-key"), "{errors}");
    file.events.webhooks[0].secret = Some(SecretRef::File(dir.path().join("missing")));
    let errors = Config::from_file(&file, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(errors.contains("events.webhooks[0].secret"), "{errors}");
}
