//! SIGHUP reloads the config file of a real gateway process: an invalid file is refused (every
//! error logged, the running config keeps serving), a valid one applies in place without
//! dropping a request in flight, and a webhook added by a reload gets the next event.

mod support;

use std::time::Duration;

use finx_gateway::sim::{Faults, SimConfig};
use support::eventually;
use support::process::{free_port, import_users, GatewayProcess, ProcessSetup};
use support::webhook::{verify_signature, Receiver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_bad_file_and_applies_a_good_one_without_dropping_requests() {
    let sim = finx_gateway::sim::spawn(SimConfig::default().with_control()).unwrap();
    let control = sim.control();
    let setup = ProcessSetup::new(sim.base_url());
    let addr = free_port();
    let config = setup.config("gateway", addr, ProcessSetup::sqlite_store(), "");
    import_users(&setup, &config, &control, &["alice".to_owned()]).await;
    let original = std::fs::read_to_string(&config).unwrap();
    let token = setup.caller_token(&config);

    let gateway = GatewayProcess::spawn(&config, addr, "reload", &[], &[]);
    gateway.wait_until_serving();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &'static str| {
        let request = http
            .get(format!("{}{path}", gateway.base_url()))
            .bearer_auth(&token)
            .header("x-finx-user", "alice");
        async move { request.send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(get("/rest/accounts").await.unwrap(), 200);
    assert_eq!(
        get("/category-tree").await.unwrap(),
        403,
        "not in the policy yet"
    );

    // A file with mistakes: refused, everything listed, the old config keeps serving.
    std::fs::write(
        &config,
        format!("{original}\n[tokens]\ncache_capacity = 0\nrefresh_ahead = 5.0\n"),
    )
    .unwrap();
    gateway.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the bad file is refused",
        || async { gateway.log().contains("the new configuration is invalid") },
    )
    .await;
    let log = gateway.log();
    assert!(log.contains("tokens.cache_capacity"), "{log}");
    assert!(log.contains("tokens.refresh_ahead"), "{log}");
    assert_eq!(get("/rest/accounts").await.unwrap(), 200);
    assert_eq!(get("/category-tree").await.unwrap(), 403);

    // A request in flight while the good file is applied.
    control
        .set_faults(&Faults {
            data_latency_ms: 1500,
            ..Faults::default()
        })
        .await
        .unwrap();
    let in_flight = tokio::spawn(get("/rest/accounts"));
    eventually(
        Duration::from_secs(10),
        "the slow request reached finX",
        || async { control.stats().await.unwrap().rest_requests >= 3 },
    )
    .await;

    let widened = original.replace(
        r#"routes = ["GET /rest/**"]"#,
        r#"routes = ["GET /rest/**", "GET /category-tree"]"#,
    );
    assert_ne!(widened, original, "the test config names its routes");
    std::fs::write(&config, widened).unwrap();
    gateway.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the good file is applied",
        || async { gateway.log().contains("configuration reloaded") },
    )
    .await;
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the request in flight finished"
    );
    control.set_faults(&Faults::default()).await.unwrap();
    assert_eq!(get("/category-tree").await.unwrap(), 200, "the new policy");
    assert_eq!(get("/rest/accounts").await.unwrap(), 200);
    let reloaded = gateway
        .log()
        .lines()
        .find(|line| line.contains("configuration reloaded"))
        .map(str::to_owned)
        .unwrap();
    assert!(reloaded.contains(r#"\"callers\""#), "{reloaded}");
    assert!(reloaded.contains(r#""needs_restart":"[]""#), "{reloaded}");

    // What only a restart changes is named, and left as it runs.
    let threads = format!(
        "{}\n[server]\nthreads = 3\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, threads).unwrap();
    gateway.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the restart-only change is named",
        || async {
            gateway.log().lines().any(|line| {
                line.contains("configuration reloaded") && line.contains(r#"\"server\""#)
            })
        },
    )
    .await;
    assert_eq!(get("/rest/accounts").await.unwrap(), 200);
}

/// Webhooks change in place: a gateway started without any delivers the next connection event
/// to the webhook a SIGHUP added, signed with that webhook's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_webhook_that_gets_the_next_event() {
    const SECRET: &str = "whsec-reload-test-0123456789abcdef";
    let sim = finx_gateway::sim::spawn(SimConfig::default().with_control()).unwrap();
    let control = sim.control();
    let setup = ProcessSetup::new(sim.base_url());
    let addr = free_port();
    // The first request's refresh must not hold off the forced refresh after finX's 401.
    let extra = "[tokens]\nforced_refresh_interval = \"1ms\"\n";
    let config = setup.config("gateway", addr, ProcessSetup::sqlite_store(), extra);
    import_users(&setup, &config, &control, &["alice".to_owned()]).await;
    let token = setup.caller_token(&config);
    let gateway = GatewayProcess::spawn(&config, addr, "reload-webhook", &[], &[]);
    gateway.wait_until_serving();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let alice = || {
        let request = http
            .get(format!("{}/rest/accounts", gateway.base_url()))
            .bearer_auth(&token)
            .header("x-finx-user", "alice");
        async move { request.send().await.map(|r| r.status().as_u16()).unwrap() }
    };
    assert_eq!(alice().await, 200);

    let (receiver, url) = Receiver::start(0).await;
    std::fs::write(setup.dir.path().join("webhook-secret"), SECRET).unwrap();
    let with_webhook = format!(
        "{}\n[[events.webhooks]]\nurl = \"{url}\"\nsecret = {{ file = \"webhook-secret\" }}\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, with_webhook).unwrap();
    gateway.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the webhook is applied in place",
        || async {
            gateway.log().lines().any(|line| {
                line.contains("configuration reloaded") && line.contains("events.webhooks")
            })
        },
    )
    .await;

    // The user revokes the grant at finX: the next request meets finX's 401 and its forced
    // refresh is refused, so the connection needs a new consent.
    control.revoke("alice").await.unwrap();
    control.expire_access_tokens().await.unwrap();
    assert_eq!(alice().await, 401, "finX's answer, as it came");
    assert_eq!(alice().await, 424);
    eventually(
        Duration::from_secs(20),
        "the reauth_required event reaches the new webhook",
        || async { !receiver.accepted("reauth_required").is_empty() },
    )
    .await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "delivered once: {seen:#?}");
    assert_eq!(seen[0].event()["connection"], "alice");
    verify_signature(&seen[0], SECRET);
}
