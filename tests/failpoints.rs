//! Crashes at exact moments of a refresh: a real gateway process is killed (SIGKILL) while it
//! sits at a named fail point, then started again, under a strict simulator (no grace window).
//! Counted per point: connections that lost their refresh token (the restarted gateway answers
//! `reauth_required`, or finX saw a rotated token presented twice).
//!
//! Needs the binary built with the `failpoints` feature: `cargo test --features failpoints`
//! (as `.ci/run` does). Without it this file fails loudly instead of skipping.

mod support;

#[cfg(not(feature = "failpoints"))]
#[test]
fn fail_point_tests_need_the_failpoints_feature() {
    panic!(
        "the crash tests kill the gateway at named fail points; run them with \
         `cargo test --features failpoints` (as .ci/run does)"
    );
}

#[cfg(feature = "failpoints")]
mod crashes {
    use std::time::{Duration, Instant};

    use finx_gateway::sim::SimConfig;

    use crate::support::process::{get, import_users, GatewayProcess, Rig};
    use crate::support::StoreKind;

    /// Kills per fail point.
    const ITERATIONS: usize = 50;

    crate::on_both_stores!(
        a_crash_before_the_token_call_loses_nothing,
        a_crash_during_the_commit_loses_nothing,
        a_crash_after_the_commit_loses_nothing,
        a_crash_between_finx_answer_and_the_journal_is_reported,
        with_a_grace_window_a_crash_after_finx_answer_loses_nothing,
    );

    /// What the crashes at one point cost.
    #[derive(Debug)]
    struct Report {
        point: &'static str,
        kills: usize,
        lost: Vec<String>,
    }

    /// Kills a gateway at `point` once per user, then checks every user on a clean start (or,
    /// with `check_each`, right after each kill: finX's grace window is short).
    async fn crash_at(
        kind: StoreKind,
        point: &'static str,
        grace: Duration,
        check_each: bool,
    ) -> Report {
        let sim = SimConfig {
            grace_window: grace,
            ..SimConfig::default().with_control()
        };
        let rig = Rig::new(kind, sim);
        let (control, setup, store, addr) = (&rig.control, &rig.setup, &rig.store, rig.addr);
        let extra = "[server]\ngrace_period = \"0s\"\n[keeper]\nenabled = false\n\
                     [tokens]\nrefresh_ahead = 0.0";
        let config = setup.config("gw", addr, &store.fragment(setup, "gw"), extra);
        // `rotation_grace` tells the gateway how long finX accepts a just-rotated token again.
        if !grace.is_zero() {
            let text = std::fs::read_to_string(&config).unwrap().replace(
                "[upstream]\n",
                &format!("[upstream]\nrotation_grace = \"{}s\"\n", grace.as_secs()),
            );
            std::fs::write(&config, text).unwrap();
        }
        let users: Vec<String> = (0..ITERATIONS).map(|i| format!("crash-{i}")).collect();
        import_users(setup, &config, control, &users).await;
        let token = setup.caller_token(&config);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let fail_point = format!("{point}=sleep(60000)");
        let mut lost = Vec::new();
        let check = |gateway: &GatewayProcess, user: &str| {
            let (http, base, token, user) = (
                http.clone(),
                gateway.base_url(),
                token.clone(),
                user.to_owned(),
            );
            async move {
                let status = get(&http, &base, &token, &user)
                    .await
                    .map_or(0, |r| r.status().as_u16());
                (user, status)
            }
        };
        for (i, user) in users.iter().enumerate() {
            let gateway = GatewayProcess::spawn(
                &config,
                addr,
                &format!("kill-{i}"),
                &[],
                &[("FAILPOINTS", fail_point.as_str())],
            );
            gateway.wait_until_serving();
            let request = {
                let (http, base, token, user) = (
                    http.clone(),
                    gateway.base_url(),
                    token.clone(),
                    user.clone(),
                );
                tokio::spawn(async move { get(&http, &base, &token, &user).await.is_ok() })
            };
            // Every fail point logs when it is passed; wait for this one, which then sleeps.
            let reached = format!("fail point reached: {point}\n");
            let deadline = Instant::now() + Duration::from_secs(20);
            while !gateway.log().contains(&reached) {
                assert!(
                    Instant::now() < deadline,
                    "{point} never reached:\n{}",
                    gateway.log()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gateway.kill();
            let _ = request.await;
            if check_each {
                let clean = GatewayProcess::spawn(&config, addr, &format!("check-{i}"), &[], &[]);
                clean.wait_until_serving();
                let (user, status) = check(&clean, user).await;
                if status != 200 {
                    lost.push(user);
                }
            }
        }
        if !check_each {
            let clean = GatewayProcess::spawn(&config, addr, "check", &[], &[]);
            clean.wait_until_serving();
            for user in &users {
                let (user, status) = check(&clean, user).await;
                if status != 200 {
                    lost.push(user);
                }
            }
        }
        for user in &users {
            let reused = control
                .user_stats(user)
                .await
                .unwrap()
                .refresh_reuse_detected;
            if reused > 0 && !lost.contains(user) {
                lost.push(user.clone());
            }
        }
        let report = Report {
            point,
            kills: users.len(),
            lost,
        };
        println!(
            "{kind:?}, fail point {}: {} kills, {} connections lost their refresh token",
            report.point,
            report.kills,
            report.lost.len()
        );
        report
    }

    async fn a_crash_before_the_token_call_loses_nothing(kind: StoreKind) {
        let report = crash_at(kind, "refresh-before-token-call", Duration::ZERO, false).await;
        assert!(report.lost.is_empty(), "{report:?}");
    }

    async fn a_crash_during_the_commit_loses_nothing(kind: StoreKind) {
        let report = crash_at(kind, "refresh-during-commit", Duration::ZERO, false).await;
        assert!(report.lost.is_empty(), "{report:?}");
    }

    async fn a_crash_after_the_commit_loses_nothing(kind: StoreKind) {
        let report = crash_at(kind, "refresh-after-commit", Duration::ZERO, false).await;
        assert!(report.lost.is_empty(), "{report:?}");
    }

    /// The one window left: finX has rotated the token and answered, the gateway has not yet
    /// written the answer anywhere. Under strict rotation those consents are lost (counted and
    /// reported, and each is marked `reauth_required` instead of failing forever).
    async fn a_crash_between_finx_answer_and_the_journal_is_reported(kind: StoreKind) {
        let report = crash_at(kind, "refresh-after-answer", Duration::ZERO, false).await;
        // finX rotated every one of these tokens and no answer was written down: each
        // connection is lost, and said so (424 `reauth_required`), never retried forever.
        assert_eq!(report.lost.len(), report.kills, "{report:?}");
        println!(
            "strict rotation, crash after finX's answer: {} of {} consents lost",
            report.lost.len(),
            report.kills
        );
    }

    /// With finX's grace window (5 s here) the restarted gateway presents the old token once
    /// more, inside the window, and nothing is lost.
    async fn with_a_grace_window_a_crash_after_finx_answer_loses_nothing(kind: StoreKind) {
        let report = crash_at(kind, "refresh-after-answer", Duration::from_secs(5), true).await;
        assert!(report.lost.is_empty(), "{report:?}");
    }
}
