//! Unit tests of the event recorder: signatures, ids, de-duplication, the near-lapse check, the
//! listing and the bounded queue. Delivery over real sockets is tested in `tests/events.rs`.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use super::*;
use crate::clock::ManualClock;

const DAY: i64 = 24 * 3600;

fn key(user: &str) -> ConnectionKey {
    ConnectionKey::user(user).unwrap()
}

fn events() -> (Events, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let events = Events::new(
        EventSettings::default(),
        metrics.clone(),
        Arc::new(ManualClock::default()),
    );
    (events, metrics)
}

fn summary(user: &str, status: ConnectionStatus, issued: UnixSeconds) -> ConnectionSummary {
    ConnectionSummary {
        key: key(user),
        status,
        version: 1,
        created_at: issued - DAY,
        refreshed_at: Some(issued),
        synced_at: None,
        updated_at: issued,
        last_used_at: None,
        scope: None,
    }
}

#[test]
fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
    // Computed independently (Python's hmac module).
    assert_eq!(
        signature(b"whsec-test-0123456789", 1_700_000_000, br#"{"id":"x"}"#),
        "58d28fbf086fbde99f454837fdfb2969fcf8a373b8c67bbf7e0c796c15ba40bf"
    );
}

#[test]
fn every_kind_is_a_metric_label() {
    let labels: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
    assert_eq!(labels, crate::metrics::EVENT_KINDS);
}

#[test]
fn an_event_is_the_documented_json_and_nothing_more() {
    let (events, _) = events();
    events.record_occurrence(EventKind::ReauthRequired, &key("alice"), "invalid_grant", 3);
    let event = events.recent(1).remove(0);
    let body = serde_json::to_value(&event).unwrap();
    let mut fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["connection", "id", "kind", "reason", "status", "time"]
    );
    assert_eq!(body["kind"], "reauth_required");
    assert_eq!(body["status"], "reauth_required");
    assert_eq!(body["connection"], "alice");
    assert_eq!(body["reason"], "invalid_grant");
    assert_eq!(event.id.len(), 32);
}

#[test]
fn ids_are_stable_per_occurrence_and_random_otherwise() {
    let (first, _) = events();
    let (second, _) = events();
    let a = first.record_occurrence(EventKind::ReauthRequired, &key("alice"), "invalid_grant", 7);
    let b = second.record_occurrence(EventKind::ReauthRequired, &key("alice"), "invalid_grant", 7);
    assert!(a.is_some());
    assert_eq!(a, b, "two replicas announcing one occurrence use one id");
    let other = second.record_occurrence(EventKind::Recovered, &key("alice"), "consent", 7);
    assert_ne!(other, a);
    let random = first.record(EventKind::Revoked, &key("bob"), "operator");
    let again = second.record(EventKind::Revoked, &key("bob"), "operator");
    assert_ne!(random, again);
}

#[test]
fn a_condition_is_announced_once_until_the_connection_recovers() {
    let (events, metrics) = events();
    let alice = key("alice");
    assert!(events
        .record_occurrence(EventKind::ReauthRequired, &alice, "invalid_grant", 4)
        .is_some());
    assert!(events
        .record_occurrence(EventKind::ReauthRequired, &alice, "invalid_grant", 4)
        .is_none());
    assert!(events
        .record(EventKind::Revoked, &alice, "operator")
        .is_some());
    assert!(events
        .record(EventKind::Revoked, &alice, "operator")
        .is_none());
    // A later grant that died is a new occurrence.
    assert!(events
        .record_occurrence(EventKind::ReauthRequired, &alice, "invalid_grant", 9)
        .is_some());
    assert!(events
        .record_occurrence(EventKind::Recovered, &alice, "consent_after_revoked", 10)
        .is_some());
    assert!(events
        .record(EventKind::Revoked, &alice, "operator")
        .is_some());
    assert_eq!(events.recent(HISTORY).len(), 5);
    let text = metrics.render();
    assert!(text.contains("finx_gateway_events_total{kind=\"reauth_required\"} 2"));
    assert!(text.contains("finx_gateway_events_total{kind=\"revoked\"} 2"));
    assert!(text.contains("finx_gateway_events_total{kind=\"recovered\"} 1"));
}

#[test]
fn near_lapse_is_announced_once_per_refresh_token_issue() {
    let (events, _) = events();
    let now = 1_000 * DAY;
    let old = now - 84 * DAY;
    let connections = vec![
        summary("old", ConnectionStatus::Active, old),
        summary("young", ConnectionStatus::Active, now - 80 * DAY),
        summary("dead", ConnectionStatus::ReauthRequired, now - 89 * DAY),
        summary("gone", ConnectionStatus::Revoked, now - 89 * DAY),
    ];
    assert_eq!(events.check_near_lapse(&connections, now), 1);
    assert_eq!(events.check_near_lapse(&connections, now + 3600), 0);
    let event = events.recent(1).remove(0);
    assert_eq!(event.kind, EventKind::NearLapse);
    assert_eq!(event.connection, "old");
    assert_eq!(event.status, "active");
    assert_eq!(event.lapses_at, Some(old + 90 * DAY));

    // Refreshed (a new issue), then near lapse again: announced again.
    let refreshed = vec![summary("old", ConnectionStatus::Active, now)];
    assert_eq!(events.check_near_lapse(&refreshed, now), 0);
    let later = now + 84 * DAY;
    assert_eq!(events.check_near_lapse(&refreshed, later), 1);
    assert_eq!(events.check_near_lapse(&refreshed, later), 0);
}

#[test]
fn the_listing_is_newest_first_bounded_and_checks_its_limit() {
    let (events, _) = events();
    for n in 0..(HISTORY + 5) {
        events.record(EventKind::Revoked, &key(&format!("user-{n}")), "operator");
    }
    assert_eq!(events.recent(usize::MAX).len(), HISTORY);
    let body = events
        .admin_listing(Some("limit=2"))
        .expect("a valid limit");
    let listed = body["events"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["connection"], format!("user-{}", HISTORY + 4));
    assert_eq!(listed[1]["connection"], format!("user-{}", HISTORY + 3));
    assert_eq!(listed[0]["deliveries"]["pending"], 0, "no webhooks");
    let body = events.admin_listing(None).expect("no limit");
    assert_eq!(body["events"].as_array().unwrap().len(), DEFAULT_LIST_LIMIT);
    let body = events
        .admin_listing(Some("limit=1000000"))
        .expect("a large limit");
    assert_eq!(body["events"].as_array().unwrap().len(), HISTORY);
    for bad in ["limit=0", "limit=-1", "limit=ten", "limit="] {
        assert_eq!(events.admin_listing(Some(bad)), Err(InvalidLimit), "{bad}");
    }
}

#[test]
fn a_full_queue_drops_events_for_the_webhooks_and_counts_them() {
    let metrics = Arc::new(Metrics::new());
    let settings = EventSettings {
        webhooks: vec![Webhook {
            url: url::Url::parse("http://127.0.0.1:9/hook").unwrap(),
            secret: SecretString::from("0123456789abcdef".to_owned()),
        }],
        ..EventSettings::default()
    };
    // Never started: nothing takes events off the queue.
    let events = Events::new(settings, metrics.clone(), Arc::new(ManualClock::default()));
    for n in 0..(QUEUE + 3) {
        events.record(EventKind::Revoked, &key(&format!("user-{n}")), "operator");
    }
    assert_eq!(events.dropped(), 3);
    assert!(metrics
        .render()
        .contains("finx_gateway_webhook_deliveries_total{outcome=\"failed\"} 3"));
    let body = events
        .admin_listing(Some("limit=1"))
        .expect("a valid limit");
    assert_eq!(body["dropped"], 3);
    assert_eq!(body["events"][0]["deliveries"]["failed"], 1);
}

#[test]
fn backoff_doubles_with_jitter_up_to_its_cap() {
    let settings = DeliverySettings {
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(10),
        ..DeliverySettings::default()
    };
    for (attempt, base) in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)] {
        let pause = delivery::backoff(&settings, attempt).as_secs_f64();
        assert!(
            (base * 0.8..=base * 1.2).contains(&pause),
            "{attempt}: {pause}"
        );
    }
    for attempt in [5, 6, 30, u32::MAX] {
        let pause = delivery::backoff(&settings, attempt).as_secs_f64();
        assert!((8.0..=10.0).contains(&pause), "{attempt}: {pause}");
    }
}

#[test]
fn a_webhook_is_described_without_path_query_or_secret() {
    let webhook = Webhook {
        url: url::Url::parse("https://hooks.example:8443/T000/B000/XXXX?token=abc").unwrap(),
        secret: SecretString::from("s3cr3t-s3cr3t-s3cr3t".to_owned()),
    };
    assert_eq!(webhook.describe(), "https://hooks.example:8443");
    let debug = format!("{webhook:?}");
    assert!(!debug.contains("s3cr3t") && !debug.contains("XXXX") && !debug.contains("abc"));
}
