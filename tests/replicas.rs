//! Many replicas, one truth: gateways sharing one PostgreSQL store and one strict simulator
//! (grace window 0). Exactly one refresh per expiry across replicas, a replica killed while it
//! holds refresh locks, the database going away and coming back, a connect flow finishing on
//! another replica, and `store copy` between the two kinds of store.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use finx_gateway::config::ConfigFile;
use finx_gateway::sim::{Faults, SimConfig};
use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::{ConnectionKey, ConnectionStatus, NewConnection};
use futures::StreamExt;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use support::eventually;
use support::pg::{OutageProxy, TestDatabase};
use support::process::{free_port, get, GatewayProcess, ProcessSetup};
use support::{error_code, Harness, StoreKind};

fn strict_sim() -> SimConfig {
    SimConfig {
        grace_window: Duration::ZERO,
        ..SimConfig::default().with_control()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_each_user_exactly_once_per_expiry() {
    const USERS: usize = 300;
    const EXPIRIES: u64 = 20;
    let harness = Harness::with_store(StoreKind::Postgres, strict_sim(), |_| {});
    let replica_b = harness.start_replica();
    let replica_c = harness.start_replica();
    let bases = [
        harness.gateway().base_url(),
        replica_b.base_url(),
        replica_c.base_url(),
    ];
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i:03}")).collect();
    futures::stream::iter(&users)
        .for_each_concurrent(16, |user| async {
            harness.import_user(user).await;
        })
        .await;

    let mut answered = 0u64;
    // Round 0 spends each imported refresh token once; every later round follows an expiry.
    for round in 0..=EXPIRIES {
        if round > 0 {
            harness.advance(3600).await;
        }
        // Every user twice, each time through a random replica, all at once.
        let mut requests: Vec<(String, usize)> = users
            .iter()
            .flat_map(|user| [(user.clone(), 0), (user.clone(), 0)])
            .collect();
        for request in &mut requests {
            request.1 = rand::rng().random_range(0..bases.len());
        }
        let statuses: Vec<u16> = futures::stream::iter(requests)
            .map(|(user, replica)| {
                let request = harness
                    .http
                    .get(format!("{}/rest/accounts", bases[replica]))
                    .bearer_auth(&harness.caller_token)
                    .header("x-finx-user", user);
                async move { request.send().await.map_or(0, |r| r.status().as_u16()) }
            })
            .buffer_unordered(48)
            .collect()
            .await;
        let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
        assert!(failed.is_empty(), "round {round}: not 200: {failed:?}");
        answered += statuses.len() as u64;
    }

    let stats = harness.control.stats().await.unwrap();
    println!(
        "3 replicas, {USERS} users, {EXPIRIES} expiries: {answered} requests answered 200, \
         {} refreshes, reuse detected {}, families revoked {}",
        stats.refresh_grants, stats.refresh_reuse_detected, stats.families_revoked
    );
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.families_revoked, 0);
    let counts: Vec<u64> = futures::stream::iter(&users)
        .map(|user| async {
            harness
                .control
                .user_stats(user)
                .await
                .unwrap()
                .refresh_grants
        })
        .buffered(16)
        .collect()
        .await;
    for (user, count) in users.iter().zip(&counts) {
        assert_eq!(*count, EXPIRIES + 1, "{user}: one refresh per expiry");
    }
    assert_eq!(stats.refresh_grants, (EXPIRIES + 1) * USERS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_keeps_cached_users_served_and_recovers_without_a_restart() {
    let mut harness = Harness::with_store(StoreKind::Postgres, strict_sim(), |file| {
        file.store.connect_timeout = Some(Duration::from_millis(500));
    });
    let proxy = OutageProxy::start();
    // A password in the URL (trust auth ignores it) must never reach a log line.
    harness.restart_via(|url| {
        let mut routed = url::Url::parse(&proxy.route(url)).unwrap();
        routed.set_password(Some(PASSWORD_CANARY)).unwrap();
        routed.to_string()
    });
    let cached: Vec<String> = (0..5).map(|i| format!("cached-{i}")).collect();
    let cold: Vec<String> = (0..5).map(|i| format!("cold-{i}")).collect();
    for user in cached.iter().chain(&cold) {
        harness.import_user(user).await;
    }
    for user in &cached {
        assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
    }
    let before = harness.control.stats().await.unwrap();

    proxy.cut();
    for user in &cached {
        assert_eq!(
            harness.get_as(user, "/rest/accounts").await.status(),
            200,
            "a cached user needs no database"
        );
    }
    for user in &cold {
        let response = harness.get_as(user, "/rest/accounts").await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(error_code(response).await, "store_unavailable");
    }
    let during = harness.control.stats().await.unwrap();
    // Only the cached users' requests reached finX, each with a credential; no refresh was
    // attempted without the store.
    assert_eq!(
        during.rest_requests - before.rest_requests,
        cached.len() as u64
    );
    assert_eq!(during.rest_unauthorized, before.rest_unauthorized);
    assert_eq!(during.token_requests, before.token_requests);
    assert_eq!(during.invalid_grant_responses, 0);

    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "recovery after the outage",
        || async { harness.get_as(&cold[0], "/rest/accounts").await.status() == 200 },
    )
    .await;
    for user in cached.iter().chain(&cold) {
        assert_eq!(harness.get_as(user, "/rest/accounts").await.status(), 200);
    }
    let after = harness.control.stats().await.unwrap();
    assert_eq!(
        (after.refresh_reuse_detected, after.families_revoked),
        (0, 0)
    );
    let logs = support::captured_logs();
    assert!(
        logs.contains("token store failure"),
        "the outage was logged"
    );
    assert!(
        !logs.contains(PASSWORD_CANARY),
        "the database password reached a log line"
    );
}

const PASSWORD_CANARY: &str = "pw-CANARY-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_started_on_one_replica_completes_on_another_and_replays_are_refused() {
    let harness = Harness::with_store(StoreKind::Postgres, strict_sim(), |_| {});
    let replica_b = harness.start_replica();
    let replica_c = harness.start_replica();
    let started = harness
        .request(reqwest::Method::POST, "/ongoing/access")
        .json(&serde_json::json!({
            "user_id": "flora",
            "redirect_uri": support::APP_RETURN,
            "state": "app-state",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    let flow: serde_json::Value = started.json().await.unwrap();
    let flow_id = flow["id"].as_str().unwrap();
    let redirect = harness
        .control
        .complete_widget(flow_id, "success")
        .await
        .unwrap();
    let mut callback = url::Url::parse(&redirect).unwrap();
    // The browser comes back to replica B instead of the one that started the flow.
    callback.set_port(Some(replica_b.addr().port())).unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let answer = browser.get(callback.as_str()).send().await.unwrap();
    assert_eq!(answer.status(), 302, "{:?}", answer.text().await);
    let app = url::Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
    assert!(app.as_str().starts_with(support::APP_RETURN), "{app}");
    assert!(app
        .query_pairs()
        .any(|(k, v)| k == "success" && v == "true"));
    assert!(!app.query_pairs().any(|(k, _)| k == "code"));

    // The same state replayed on replica C is refused.
    callback.set_port(Some(replica_c.addr().port())).unwrap();
    let replay = browser.get(callback.as_str()).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert_eq!(error_code(replay).await, "bad_request");

    // The consent stored through B serves on C.
    let data = harness
        .http
        .get(format!("{}/rest/accounts", replica_c.base_url()))
        .bearer_auth(&harness.caller_token)
        .header("x-finx-user", "flora")
        .send()
        .await
        .unwrap();
    assert_eq!(data.status(), 200);
}

/// A replica learns of another replica's `reauth_required` and of a new consent at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_and_new_consents_are_seen_by_every_replica() {
    let harness = Harness::with_store(StoreKind::Postgres, strict_sim(), |_| {});
    let replica_b = harness.start_replica();
    harness.import_user("rita").await;
    harness.control.revoke("rita").await.unwrap();
    // A refreshes, finX says invalid_grant: A marks the connection reauth_required.
    let response = harness.get_as("rita", "/rest/accounts").await;
    assert_eq!(error_code(response).await, "reauth_required");
    let via_b = |user: &'static str| {
        harness
            .http
            .get(format!("{}/rest/accounts", replica_b.base_url()))
            .bearer_auth(&harness.caller_token)
            .header("x-finx-user", user)
            .send()
    };
    assert_eq!(
        error_code(via_b("rita").await.unwrap()).await,
        "reauth_required"
    );
    let stats = harness.control.stats().await.unwrap();
    assert_eq!(stats.invalid_grant_responses, 1, "B did not ask finX again");

    // A new consent (stored through A's store) revives the connection on both.
    harness.import_user("rita").await;
    assert_eq!(via_b("rita").await.unwrap().status(), 200);
    assert_eq!(harness.get_as("rita", "/rest/accounts").await.status(), 200);
}

// --- Processes: a crash is a SIGKILL of a real gateway process. ---

/// The `[store]` body of a replica named `name` on the database at `url`.
fn shared_store(setup: &ProcessSetup, name: &str, url: &str) -> String {
    std::fs::write(setup.dir.path().join(format!("{name}.url")), url).unwrap();
    format!(
        "kind = \"postgres\"\nurl = {{ file = \"{name}.url\" }}\njournal = \"{name}.journal\"\n\
         pool_size = 4\ntls = \"disable\"\nconnect_timeout = \"1s\"\nlock_timeout = \"1s\""
    )
}

/// A replica's config file.
fn replica(setup: &ProcessSetup, name: &str, listen: std::net::SocketAddr, url: &str) -> PathBuf {
    let store = shared_store(setup, name, url);
    setup.config(name, listen, &store, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_holding_refresh_locks_loses_no_refresh_token() {
    let sim = finx_gateway::sim::spawn(strict_sim()).unwrap();
    let control = sim.control();
    let db = TestDatabase::create();
    let setup = ProcessSetup::new(sim.base_url());
    let (addr_a, addr_b, addr_c) = (free_port(), free_port(), free_port());
    let config_a = replica(&setup, "a", addr_a, &db.url);
    let config_b = replica(&setup, "b", addr_b, &db.url);
    let config_c = replica(&setup, "c", addr_c, &db.url);
    let a = GatewayProcess::spawn(&config_a, addr_a, "a", &[], &[]);
    let b = GatewayProcess::spawn(&config_b, addr_b, "b", &[], &[]);
    let c = GatewayProcess::spawn(&config_c, addr_c, "c", &[], &[]);
    for replica in [&a, &b, &c] {
        replica.wait_until_serving();
    }
    let token = setup.caller_token(&config_a);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // Users with refresh tokens only: their first request must refresh.
    let store = setup.store(&config_a);
    let users: Vec<String> = (0..12).map(|i| format!("kim-{i}")).collect();
    for user in &users {
        let grant = control.create_grant(user).await.unwrap();
        let new = NewConnection {
            refresh_token: SecretString::from(grant.refresh_token),
            access: None,
            scope: None,
        };
        store
            .put_connection(&ConnectionKey::user(user).unwrap(), &new, 0)
            .await
            .unwrap();
    }

    // finX is slow: A's refreshes sit inside their locked transactions, waiting for it.
    control
        .set_faults(&Faults {
            token_latency_ms: 60_000,
            ..Faults::default()
        })
        .await
        .unwrap();
    let in_flight: Vec<_> = users
        .iter()
        .map(|user| {
            let (http, base, token, user) =
                (http.clone(), a.base_url(), token.clone(), user.clone());
            tokio::spawn(async move { get(&http, &base, &token, &user).await.map(|r| r.status()) })
        })
        .collect();
    let holding = || {
        db.query_text(
            "SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'finx-gateway' \
             AND state = 'idle in transaction'",
        )
    };
    eventually(Duration::from_secs(20), "A holds refresh locks", || async {
        holding() == Some("4".into())
    })
    .await;
    let locked: Vec<String> = {
        let unlocked = db
            .query_text(
                "SELECT coalesce(string_agg(key, ','), '') FROM \
                 (SELECT key FROM connections FOR UPDATE SKIP LOCKED) AS free",
            )
            .unwrap_or_default();
        users
            .iter()
            .filter(|user| !unlocked.split(',').any(|free| free == user.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(locked.len(), 4, "A's pool of 4 holds 4 row locks");

    // B waits for A's lock at most lock_timeout, then answers 503 without spending anything.
    let waited = Instant::now();
    let response = get(&http, &b.base_url(), &token, &locked[0]).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(error_code(response).await, "store_unavailable");
    assert!(waited.elapsed() >= Duration::from_millis(900));

    // A crashes with the locks held.
    drop(a);
    for task in in_flight {
        let _ = task.await;
    }
    control.set_faults(&Faults::default()).await.unwrap();

    // The others carry on at once: every user is served through B or C.
    for (i, user) in users.iter().enumerate() {
        let base = if i % 2 == 0 {
            b.base_url()
        } else {
            c.base_url()
        };
        let response = get(&http, &base, &token, user).await.unwrap();
        assert_eq!(response.status(), 200, "{user}: {}", b.log());
    }
    let stats = control.stats().await.unwrap();
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.families_revoked, 0);
    for user in &users {
        let connection = store
            .load(&ConnectionKey::user(user).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(connection.status, ConnectionStatus::Active, "{user}");
        assert_eq!(
            control.user_stats(user).await.unwrap().refresh_grants,
            1,
            "{user}: refreshed exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_the_database_is_down_waits_and_then_serves() {
    let sim = finx_gateway::sim::spawn(strict_sim()).unwrap();
    let control = sim.control();
    let db = TestDatabase::create();
    let proxy = OutageProxy::start();
    let setup = ProcessSetup::new(sim.base_url());
    let addr = free_port();
    let config = replica(&setup, "down", addr, &proxy.route(&db.url));
    let direct = replica(&setup, "direct", free_port(), &db.url);

    proxy.cut();
    let gateway = GatewayProcess::spawn(&config, addr, "down", &[], &[]);
    eventually(
        Duration::from_secs(20),
        "a log line saying it waits",
        || async { gateway.log().contains("PostgreSQL is not reachable yet") },
    )
    .await;
    assert!(!gateway.log().contains(&db.url), "the URL is never logged");

    proxy.restore();
    gateway.wait_until_serving();
    let store = setup.store(&direct);
    let grant = control.create_grant("wendy").await.unwrap();
    store
        .put_connection(
            &ConnectionKey::user("wendy").unwrap(),
            &NewConnection {
                refresh_token: SecretString::from(grant.refresh_token),
                access: None,
                scope: None,
            },
            0,
        )
        .await
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = setup.caller_token(&config);
    assert_eq!(
        get(&http, &gateway.base_url(), &token, "wendy")
            .await
            .unwrap()
            .status(),
        200
    );
}

// --- `store copy` and `store migrate`, as an operator runs them. ---

fn run(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{args:?}: {text}");
    text
}

/// A config named `name` whose store (`[store]` body `store`) has an encryption key of its own.
fn store_config(setup: &ProcessSetup, name: &str, store: &str) -> PathBuf {
    std::fs::write(
        setup.dir.path().join(format!("{name}.key")),
        EncryptionKey::generate().to_base64().expose_secret(),
    )
    .unwrap();
    let store = format!("encryption_key = {{ file = \"{name}.key\" }}\n{store}");
    setup.config(name, free_port(), &store, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_round_trips_sqlite_postgres_sqlite_with_different_keys() {
    let db = TestDatabase::create();
    let setup = ProcessSetup::new("http://127.0.0.1:9".into());
    std::fs::write(setup.dir.path().join("pg.url"), &db.url).unwrap();
    let first = store_config(&setup, "first", r#"path = "first.db""#);
    let shared = store_config(
        &setup,
        "shared",
        "kind = \"postgres\"\nurl = { file = \"pg.url\" }\ntls = \"disable\"\npool_size = 2",
    );
    let last = store_config(&setup, "last", r#"path = "last.db""#);
    let open = |config: &Path| {
        let config = finx_gateway::config::Config::load(config).unwrap();
        finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).unwrap()
    };

    // Migrations: applied once, a second run is a no-op.
    assert!(
        run(&["store", "migrate", "--config", shared.to_str().unwrap()]).contains("2 migration")
    );
    assert!(
        run(&["store", "migrate", "--config", shared.to_str().unwrap()]).contains("0 migration")
    );

    let source = open(&first);
    let keys = [
        ConnectionKey::user("ann").unwrap(),
        ConnectionKey::user("ben").unwrap(),
        ConnectionKey::flow("svc", "f-1").unwrap(),
    ];
    for (i, key) in keys.iter().enumerate() {
        let new = NewConnection {
            refresh_token: SecretString::from(format!("refresh-{i}-{}", "x".repeat(3000))),
            access: (i != 1).then(|| finx_gateway::store::AccessToken {
                token: SecretString::from(format!("access-{i}")),
                expires_at: 2_000_000_000,
            }),
            scope: Some("accounts".into()),
        };
        source
            .put_connection(key, &new, 1_700_000_000 + i as i64)
            .await
            .unwrap();
    }
    source
        .set_status(&keys[1], ConnectionStatus::ReauthRequired, 1_700_000_100)
        .await
        .unwrap();
    drop(source);

    let (first_s, shared_s, last_s) = (
        first.to_str().unwrap(),
        shared.to_str().unwrap(),
        last.to_str().unwrap(),
    );
    assert!(run(&["store", "copy", "--from", first_s, "--to", shared_s]).contains("copied 3"));
    assert!(run(&["connections", "list", "--config", shared_s]).contains("reauth_required"));
    let mut import = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
        .args([
            "connections",
            "import",
            "--config",
            shared_s,
            "--user",
            "zed",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut import.stdin.take().unwrap(), b"refresh-zed\n").unwrap();
    assert!(import.wait().unwrap().success());
    let imported = open(&shared)
        .load(&ConnectionKey::user("zed").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(imported.refresh_token.expose_secret(), "refresh-zed");
    assert!(run(&["store", "copy", "--from", shared_s, "--to", last_s]).contains("copied 4"));

    let (source, target) = (open(&first), open(&last));
    for key in &keys {
        let a = source.load(key).await.unwrap().unwrap();
        let b = target.load(key).await.unwrap().unwrap();
        assert_eq!(
            a.refresh_token.expose_secret(),
            b.refresh_token.expose_secret()
        );
        assert_eq!(
            a.access
                .map(|t| (t.token.expose_secret().to_owned(), t.expires_at)),
            b.access
                .map(|t| (t.token.expose_secret().to_owned(), t.expires_at))
        );
        assert_eq!(
            (a.status, a.scope, a.created_at, a.updated_at),
            (b.status, b.scope, b.created_at, b.updated_at)
        );
    }

    // A row the shared store changed since is not overwritten by an older copy.
    let shared_store = open(&shared);
    let ann = shared_store.load(&keys[0]).await.unwrap().unwrap();
    shared_store
        .record_sync(&keys[0], ann.updated_at + 1_000)
        .await
        .unwrap();
    let output = run(&["store", "copy", "--from", first_s, "--to", shared_s]);
    assert!(output.contains("copied 2"), "{output}");
    assert!(output.contains("not overwritten: ann"), "{output}");
    // No token in any output.
    assert!(!output.contains("refresh-0"));
}

/// The harness config keeps working for `ConfigFile` tweaks on PostgreSQL (used above).
#[test]
fn postgres_store_settings_are_validated() {
    let mut file = ConfigFile::default();
    file.store.kind = Some("postgres".into());
    file.store.path = Some("tokens.db".into());
    file.store.lock_timeout = Some(Duration::from_secs(20));
    file.store.statement_timeout = Some(Duration::from_secs(5));
    file.store.tls = Some("sometimes".into());
    file.store.pool_size = Some(0);
    let errors = finx_gateway::config::Config::from_file(&file, Path::new("."))
        .unwrap_err()
        .to_string();
    for expected in [
        "store.path: only for kind = \"postgres\"",
        "store.url: required",
        "store.pool_size: must be at least 1",
        "store.lock_timeout: must be shorter",
        "store.tls: \"sometimes\"",
    ] {
        let expected =
            expected.replace("only for kind = \"postgres\"", "only for kind = \"sqlite\"");
        assert!(
            errors.contains(&expected),
            "{expected} missing from {errors}"
        );
    }
    let mut sqlite = ConfigFile::default();
    sqlite.store.url = Some(finx_gateway::secret::SecretRef::Env("X".into()));
    let errors = finx_gateway::config::Config::from_file(&sqlite, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("store.url: only for kind = \"postgres\""),
        "{errors}"
    );
}
