//! Stopping and upgrading real gateway processes with real signals: a refresh started is a
//! refresh stored, whatever the signal short of SIGKILL. finX (the simulator, in this process)
//! rotates strictly: a rotated refresh token the gateway failed to store would show up as reuse.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use finx_gateway::sim::{Faults, SimConfig, SimControl};
use rand::Rng;
use support::eventually;
use support::process::{get, import_users, GatewayProcess, Rig};
use support::StoreKind;

crate::on_both_stores!(
    ten_stops_under_refresh_load_by_sigterm_and_sigint_lose_no_refresh_token,
    sigterm_during_a_refresh_storm_commits_every_answered_refresh_and_cuts_no_request,
    a_graceful_upgrade_refuses_no_connection_and_refreshes_nothing_still_valid,
);

fn strict_sim(access_ttl: Duration) -> SimConfig {
    SimConfig {
        grace_window: Duration::ZERO,
        access_ttl,
        ..SimConfig::default().with_control()
    }
}

async fn token_requests(control: &SimControl) -> u64 {
    control.stats().await.unwrap().token_requests
}

/// Requests for random users through `base` until `stop` is set; statuses counted (0: the
/// connection failed, e.g. the process is gone).
fn traffic(
    base: String,
    token: String,
    users: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    counts: Arc<std::sync::Mutex<BTreeMap<u16, u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        while !stop.load(Ordering::Relaxed) {
            let user = &users[rand::rng().random_range(0..users.len())];
            let status = get(&http, &base, &token, user)
                .await
                .map_or(0, |r| r.status().as_u16());
            *counts.lock().unwrap().entry(status).or_default() += 1;
            if status == 0 {
                // The process is going away: pace the retries instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

async fn ten_stops_under_refresh_load_by_sigterm_and_sigint_lose_no_refresh_token(kind: StoreKind) {
    let rig = Rig::new(kind, strict_sim(Duration::from_secs(4)));
    let (control, setup, store, addr) = (&rig.control, &rig.setup, &rig.store, rig.addr);
    let config = setup.config(
        "gw",
        addr,
        &store.fragment(setup, "gw"),
        "[tokens]\nrefresh_skew = \"1s\"\n[server]\ngrace_period = \"1s\"",
    );
    let users: Arc<Vec<String>> = Arc::new((0..40).map(|i| format!("stop-{i}")).collect());
    import_users(setup, &config, control, &users).await;
    // Every answer from the token endpoint arrives 400 ms after the rotation took effect.
    control
        .set_faults(&Faults {
            token_answer_delay_ms: 400,
            ..Faults::default()
        })
        .await
        .unwrap();
    let token = setup.caller_token(&config);
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::<u16, u64>::new()));

    for round in 0..10 {
        let mut gateway = GatewayProcess::spawn(&config, addr, &format!("round-{round}"), &[], &[]);
        gateway.wait_until_serving();
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                traffic(
                    gateway.base_url(),
                    token.clone(),
                    users.clone(),
                    stop.clone(),
                    counts.clone(),
                )
            })
            .collect();
        // Stop while refreshes are in flight: finX has been asked and has not answered yet.
        let asked = token_requests(control).await;
        eventually(Duration::from_secs(20), "refreshes in flight", || async {
            token_requests(control).await >= asked + 3
        })
        .await;
        let signal = if round % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        gateway.signal(signal);
        let status = gateway.wait_exit(Duration::from_secs(30)).await;
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.await.unwrap();
        }
        assert!(
            status.success(),
            "round {round}: {status}\n{}",
            gateway.log()
        );
        assert!(
            gateway.log().contains("every refresh in flight finished"),
            "round {round}: {}",
            gateway.log()
        );
    }

    control.set_faults(&Faults::default()).await.unwrap();
    let gateway = GatewayProcess::spawn(&config, addr, "after", &[], &[]);
    gateway.wait_until_serving();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for user in users.iter() {
        let response = get(&http, &gateway.base_url(), &token, user).await.unwrap();
        assert_eq!(response.status(), 200, "{user}: {}", gateway.log());
    }
    let stats = control.stats().await.unwrap();
    println!(
        "10 stops: {} refreshes, answers during the rounds {:?}",
        stats.refresh_grants,
        counts.lock().unwrap()
    );
    assert!(
        stats.refresh_grants > 40,
        "refreshes happened during the rounds"
    );
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.families_revoked, 0);
}

async fn sigterm_during_a_refresh_storm_commits_every_answered_refresh_and_cuts_no_request(
    kind: StoreKind,
) {
    let rig = Rig::new(kind, strict_sim(Duration::from_secs(3600)));
    let (control, setup, store, addr) = (&rig.control, &rig.setup, &rig.store, rig.addr);
    let config = setup.config(
        "gw",
        addr,
        &store.fragment(setup, "gw"),
        "[server]\ngrace_period = \"3s\"",
    );
    let users: Vec<String> = (0..100).map(|i| format!("storm-{i}")).collect();
    import_users(setup, &config, control, &users).await;
    control
        .set_faults(&Faults {
            token_answer_delay_ms: 200,
            ..Faults::default()
        })
        .await
        .unwrap();
    let token = setup.caller_token(&config);
    let mut gateway = GatewayProcess::spawn(&config, addr, "storm", &[], &[]);
    gateway.wait_until_serving();

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let requests: Vec<_> = users
        .iter()
        .map(|user| {
            let (http, base, token, user) = (
                http.clone(),
                gateway.base_url(),
                token.clone(),
                user.clone(),
            );
            tokio::spawn(async move { get(&http, &base, &token, &user).await.map(|r| r.status()) })
        })
        .collect();
    eventually(
        Duration::from_secs(20),
        "the storm reaching finX",
        || async { token_requests(control).await >= 50 },
    )
    .await;
    gateway.signal(libc::SIGTERM);
    // Every request sent before the signal is answered in full within the grace period.
    for request in requests {
        let status = request.await.unwrap().expect("no request is cut off");
        assert_eq!(status, 200);
    }
    assert!(gateway.wait_exit(Duration::from_secs(30)).await.success());
    let answered = control.stats().await.unwrap().refresh_grants;
    assert_eq!(answered, users.len() as u64);

    // Restarted, the gateway finds every rotated token stored: no refresh, no reuse.
    control.set_faults(&Faults::default()).await.unwrap();
    let gateway = GatewayProcess::spawn(&config, addr, "after", &[], &[]);
    gateway.wait_until_serving();
    for user in &users {
        let response = get(&http, &gateway.base_url(), &token, user).await.unwrap();
        assert_eq!(response.status(), 200, "{user}");
    }
    let stats = control.stats().await.unwrap();
    assert_eq!(
        stats.refresh_grants, answered,
        "stored access tokens were used"
    );
    assert_eq!(stats.refresh_reuse_detected, 0);
}

async fn a_graceful_upgrade_refuses_no_connection_and_refreshes_nothing_still_valid(
    kind: StoreKind,
) {
    let rig = Rig::new(kind, strict_sim(Duration::from_secs(3600)));
    let (control, setup, store, addr) = (&rig.control, &rig.setup, &rig.store, rig.addr);
    let socket = setup.dir.path().join("upgrade.sock");
    let config = setup.config(
        "gw",
        addr,
        &store.fragment(setup, "gw"),
        &format!(
            "[server]\ngrace_period = \"1s\"\nupgrade_sock = \"{}\"",
            socket.display()
        ),
    );
    let users: Arc<Vec<String>> = Arc::new((0..20).map(|i| format!("upgrade-{i}")).collect());
    import_users(setup, &config, control, &users).await;
    let token = setup.caller_token(&config);
    let mut old = GatewayProcess::spawn(&config, addr, "old", &[], &[]);
    old.wait_until_serving();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for user in users.iter() {
        let response = get(&http, &old.base_url(), &token, user).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let refreshed = control.stats().await.unwrap().refresh_grants;
    assert_eq!(refreshed, users.len() as u64);

    // Traffic on fresh connections all through the upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::<u16, u64>::new()));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, counts, served, users, token) = (
                stop.clone(),
                counts.clone(),
                served.clone(),
                users.clone(),
                token.clone(),
            );
            let base = format!("http://{addr}");
            tokio::spawn(async move {
                // No pooled connections: every request opens one, so a refused one shows.
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let user = &users[rand::rng().random_range(0..users.len())];
                    // 0: refused (no connection made); 1: the connection failed later.
                    let status = match get(&http, &base, &token, user).await {
                        Ok(response) => response.status().as_u16(),
                        Err(e) if e.is_connect() => 0,
                        Err(e) => {
                            eprintln!("upgrade: request failed after connecting: {e:?}");
                            1
                        }
                    };
                    *counts.lock().unwrap().entry(status).or_default() += 1;
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let new = GatewayProcess::spawn(&config, addr, "new", &["--upgrade"], &[]);
    eventually(
        Duration::from_secs(20),
        "the new process waiting for the sockets",
        || {
            let ready = socket.exists();
            async move { ready }
        },
    )
    .await;
    old.signal(libc::SIGQUIT);
    assert!(
        old.wait_exit(Duration::from_secs(30)).await.success(),
        "{}",
        old.log()
    );
    // The new process carries on alone.
    let after_exit = served.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(20),
        "requests served by the new process",
        || {
            let now = served.load(Ordering::Relaxed);
            async move { now >= after_exit + 100 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    println!("upgrade: answers {counts:?} (0: refused, 1: closed before an answer)");
    assert_eq!(counts.get(&0), None, "no connection is refused: {counts:?}");
    let total: u64 = counts.values().sum();
    let answered = counts.get(&200).copied().unwrap_or(0);
    let dropped = counts.get(&1).copied().unwrap_or(0);
    assert_eq!(
        answered + dropped,
        total,
        "every answer is 200: {counts:?}\n{}",
        new.log()
    );
    // pingora closes a connection the old process accepted but had not read a request from
    // when its graceful shutdown starts (a window of microseconds); clients see it as a reset
    // of a fresh connection. It stays rare.
    assert!(
        dropped * 1000 <= total,
        "too many connections closed early: {counts:?}"
    );
    let stats = control.stats().await.unwrap();
    assert_eq!(
        stats.refresh_grants, refreshed,
        "no valid token was refreshed again"
    );
    assert_eq!(stats.refresh_reuse_detected, 0);
}
