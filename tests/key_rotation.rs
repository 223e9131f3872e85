//! Encryption-key rotation with real processes: a gateway serves traffic with the new key as
//! its primary key and the old one as a previous key, while `finx-gateway store rotate-key`
//! re-encrypts the same store from another process. No request fails, no refresh token is lost
//! (the simulator rotates strictly: a refresh the store lost would show up as reuse), nothing
//! secret reaches the command's output, and afterwards the store opens with the new key alone.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finx_gateway::sim::SimConfig;
use finx_gateway::store::crypto::EncryptionKey;
use rand::Rng;
use secrecy::ExposeSecret;
use support::eventually;
use support::process::{get, import, GatewayProcess, Rig};
use support::StoreKind;

crate::on_both_stores!(
    a_rotation_while_a_gateway_serves_fails_no_request_and_leaves_only_the_new_key,
    a_rotation_started_through_the_admin_api_fails_no_request_and_leaves_only_the_new_key,
);

/// Who runs the rotation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// `finx-gateway store rotate-key`, another process.
    Cli,
    /// `POST /admin/keys/rotate` on the serving gateway's admin listener.
    AdminApi,
}

async fn a_rotation_while_a_gateway_serves_fails_no_request_and_leaves_only_the_new_key(
    kind: StoreKind,
) {
    rotation_while_serving(kind, Trigger::Cli).await;
}

async fn a_rotation_started_through_the_admin_api_fails_no_request_and_leaves_only_the_new_key(
    kind: StoreKind,
) {
    rotation_while_serving(kind, Trigger::AdminApi).await;
}

/// The admin listener's address in a config `ProcessSetup` wrote.
fn admin_url(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let address = text
        .split("[admin]")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .expect("an [admin] address");
    format!("http://{address}")
}

/// Polls `GET /admin/keys` until the rotation the API started has ended; its last answer.
async fn admin_rotation(admin: &str) -> (bool, String) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = http
        .post(format!("{admin}/admin/keys/rotate"))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer: serde_json::Value = http
            .get(format!("{admin}/admin/keys"))
            .bearer_auth(support::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match answer["rotation"]["report"]["state"].as_str() {
            Some("complete") => return (true, answer.to_string()),
            Some("failed") => return (false, answer.to_string()),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not finish: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests for random users until `stop` is set, statuses counted (0: no answer).
fn traffic(
    base: String,
    token: String,
    users: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<BTreeMap<u16, u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        while !stop.load(Ordering::Relaxed) {
            let user = &users[rand::rng().random_range(0..users.len())];
            let status = get(&http, &base, &token, user)
                .await
                .map_or(0, |r| r.status().as_u16());
            *counts.lock().unwrap().entry(status).or_default() += 1;
        }
    })
}

fn total(counts: &Mutex<BTreeMap<u16, u64>>) -> u64 {
    counts.lock().unwrap().values().sum()
}

/// `finx-gateway ARGS…`, run to completion.
fn gateway_command(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read_key(path: &Path) -> EncryptionKey {
    EncryptionKey::from_file(path).unwrap()
}

async fn rotation_while_serving(kind: StoreKind, trigger: Trigger) {
    let sim = SimConfig {
        grace_window: Duration::ZERO,
        access_ttl: Duration::from_secs(3),
        ..SimConfig::default().with_control()
    };
    let rig = Rig::new(kind, sim);
    let (control, setup, store, addr) = (&rig.control, &rig.setup, &rig.store, rig.addr);
    let dir = setup.dir.path();
    std::fs::write(
        dir.join("new.key"),
        EncryptionKey::generate().to_base64().expose_secret(),
    )
    .unwrap();
    let (old_key, new_key) = (
        read_key(&dir.join("store.key")),
        read_key(&dir.join("new.key")),
    );
    let fragment = store.fragment(setup, "gw");
    // Frequent refreshes: the gateway writes while the rotation runs.
    let tokens = "[tokens]\nrefresh_skew = \"1s\"";
    let old_config = setup.config("old", addr, &fragment, tokens);
    let rotating_config = setup.config(
        "rotating",
        addr,
        &format!(
            "encryption_key = {{ file = \"new.key\" }}\n\
             previous_keys = [{{ file = \"store.key\" }}]\n{fragment}"
        ),
        tokens,
    );
    let new_config = setup.config(
        "new",
        addr,
        &format!("encryption_key = {{ file = \"new.key\" }}\n{fragment}"),
        tokens,
    );

    // Users consented while the old key was the store's only key.
    let users: Arc<Vec<String>> = Arc::new((0..150).map(|i| format!("rot-{i}")).collect());
    let mut refresh_tokens = Vec::new();
    {
        let old_store = setup.store(&old_config);
        for user in users.iter() {
            let grant = control.create_grant(user).await.unwrap();
            refresh_tokens.push(grant.refresh_token.clone());
            import(&old_store, user, grant.refresh_token).await;
        }
    }

    let mut serving = GatewayProcess::spawn(&rotating_config, addr, "rotating", &[], &[]);
    serving.wait_until_serving();
    let token = setup.caller_token(&rotating_config);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            traffic(
                serving.base_url(),
                token.clone(),
                users.clone(),
                stop.clone(),
                counts.clone(),
            )
        })
        .collect();
    eventually(
        Duration::from_secs(30),
        "traffic through the gateway",
        || {
            let counts = counts.clone();
            async move { total(&counts) >= 50 }
        },
    )
    .await;

    // The rotation, as another process, in batches of one: it takes a while.
    let (requests_before, refreshes_before) = (
        total(&counts),
        control.stats().await.unwrap().refresh_grants,
    );
    let started = Instant::now();
    let (succeeded, output) = match trigger {
        Trigger::Cli => {
            let stdout_path = dir.join("rotate.stdout");
            let stderr_path = dir.join("rotate.stderr");
            let mut rotation = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
                .args(["store", "rotate-key", "--batch-size", "1", "--config"])
                .arg(&rotating_config)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&stdout_path).unwrap())
                .stderr(std::fs::File::create(&stderr_path).unwrap())
                .spawn()
                .unwrap();
            let exit = loop {
                if let Some(exit) = rotation.try_wait().unwrap() {
                    break exit;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "the rotation did not finish"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let output = format!(
                "{}{}",
                std::fs::read_to_string(&stdout_path).unwrap(),
                std::fs::read_to_string(&stderr_path).unwrap()
            );
            assert!(output.contains("rotation complete"), "{output}");
            (exit.success(), output)
        }
        Trigger::AdminApi => admin_rotation(&admin_url(&rotating_config)).await,
    };
    let took = started.elapsed();
    let (requests_during, refreshes_during) = (
        total(&counts) - requests_before,
        control.stats().await.unwrap().refresh_grants - refreshes_before,
    );
    assert!(succeeded, "{output}\n{}", serving.log());
    assert!(output.contains(&new_key.key_id()), "{output}");

    // Traffic goes on a little after the rotation, then every answer is counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    println!(
        "rotation took {took:?}: {requests_during} requests and {refreshes_during} refreshes \
         meanwhile; answers {counts:?}"
    );
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        vec![&200],
        "{counts:?}\n{}",
        serving.log()
    );
    assert!(requests_during > 0, "no request during the rotation");
    assert!(
        refreshes_during > 0,
        "no refresh committed during the rotation"
    );
    let stats = control.stats().await.unwrap();
    assert_eq!(stats.refresh_reuse_detected, 0, "{stats:?}");
    assert_eq!(stats.invalid_grant_responses, 0, "{stats:?}");

    // Nothing secret in what the commands print.
    let status = gateway_command(&[
        "store",
        "key-status",
        "--config",
        new_config.to_str().unwrap(),
    ]);
    let status_text = text(&status);
    assert!(status.status.success(), "{status_text}");
    assert!(status_text.contains("nothing to rotate"), "{status_text}");
    for printed in [&output, &status_text] {
        for key in [&old_key, &new_key] {
            assert!(!printed.contains(key.to_base64().expose_secret()));
        }
        for refresh in &refresh_tokens {
            assert!(
                !printed.contains(refresh.as_str()),
                "a refresh token printed"
            );
        }
    }

    // The new key alone opens the store and lists every user; the old key alone is refused.
    let listed = gateway_command(&[
        "connections",
        "list",
        "--config",
        new_config.to_str().unwrap(),
    ]);
    let listed_text = text(&listed);
    assert!(listed.status.success(), "{listed_text}");
    for user in users.iter() {
        assert!(
            listed_text
                .lines()
                .any(|line| line.starts_with(&format!("{user} "))),
            "{user} missing:\n{listed_text}"
        );
    }
    let refused = gateway_command(&[
        "connections",
        "list",
        "--config",
        old_config.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("does not match"),
        "{}",
        text(&refused)
    );

    // A gateway with the new key alone serves every user: every token decrypts and every
    // refresh token is still the one finX expects.
    serving.signal(libc::SIGTERM);
    assert!(serving.wait_exit(Duration::from_secs(30)).await.success());
    let after = GatewayProcess::spawn(&new_config, addr, "new", &[], &[]);
    after.wait_until_serving();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for user in users.iter() {
        let response = get(&http, &after.base_url(), &token, user).await.unwrap();
        assert_eq!(response.status(), 200, "{user}: {}", after.log());
    }
    let stats = control.stats().await.unwrap();
    assert_eq!(stats.refresh_reuse_detected, 0, "{stats:?}");
}
