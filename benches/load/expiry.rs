//! Scenario (f): steady traffic across token expiries. Users (whose tokens were issued in
//! cohorts spread over a lifetime, as consents are) are served without pause while
//! both clocks (gateway and simulator) run fast, through two whole access-token lifetimes, so
//! every token reaches its refresh-ahead window and then its expiry under load. Reported: how
//! many requests had to wait for a refresh (the goal is none: refresh-ahead replaces every
//! token in the background first), the refreshes finX saw, and every answer's status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use finx_gateway::clock::ManualClock;
use finx_gateway::sim::{SimConfig, SimControl};
use finx_gateway::store::TokenStore;
use finx_gateway::RunningGateway;
use serde::Serialize;

use crate::generator::{self, Authorization, Workload};
use crate::{advance_clocks, check_all_ok, refresh_grants, seed_users, BenchResult, Plan};

/// Connections of the steady load.
const CONNECTIONS: usize = 16;
/// How often the clocks move forward.
const TICK: Duration = Duration::from_millis(10);
/// Token lifetimes the run covers.
const LIFETIMES: i64 = 2;
/// Groups of users whose tokens were issued a tenth of a lifetime apart.
const COHORTS: i64 = 10;

/// Scenario (f)'s result.
#[derive(Serialize)]
pub struct ExpiryResult {
    pub users: usize,
    pub token_lifetime_secs: i64,
    /// Token seconds per wall second.
    pub speedup: f64,
    pub wall_seconds: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub p99_ms: f64,
    /// Refreshes the simulator answered during the run.
    pub refreshes: u64,
    /// Requests that waited for a refresh (the token manager's own count).
    pub requests_waited: u64,
}

/// Runs scenario (f) on the main gateway.
pub fn run(
    plan: &Plan,
    runtime: &tokio::runtime::Runtime,
    control: &SimControl,
    store: &Arc<dyn TokenStore>,
    clock: &ManualClock,
    gateway: &RunningGateway,
    caller_bearer: &str,
) -> BenchResult<ExpiryResult> {
    let lifetime = SimConfig::default().access_ttl.as_secs() as i64;
    let users: Vec<String> = (0..plan.expiry_users)
        .map(|i| format!("steady-{i:05}"))
        .collect();
    let workload = Arc::new(Workload {
        users: Arc::new(users),
        authorization: Authorization::Caller(caller_bearer.to_owned()),
    });
    let wall = Duration::from_secs(plan.expiry_seconds);
    let ticks = (wall.as_millis() / TICK.as_millis()).max(1) as i64;
    let step = (LIFETIMES * lifetime / ticks).max(1);
    runtime.block_on(async {
        // Consents arrive over time, so their tokens expire spread over a lifetime: users are
        // seeded in cohorts, the clocks moved a cohort's share of a lifetime between them.
        // (Seeded at one instant, all 1,000 refreshes would have to fit into one refresh-ahead
        // window, half a second of wall time at this speed.)
        let per_cohort = workload.users.len().div_ceil(COHORTS as usize).max(1);
        for (at, cohort) in workload.users.chunks(per_cohort).enumerate() {
            if at > 0 {
                advance_clocks(control, clock, lifetime / COHORTS).await?;
            }
            seed_users(control, store, clock, cohort).await?;
        }
        check_all_ok(
            &generator::each_user_once(gateway.addr(), workload.clone(), CONNECTIONS).await,
            "warming steady users",
        )?;
        let waited_before = gateway.tokens().stats().requests_waited;
        let refreshes_before = refresh_grants(control).await?;
        let started = Instant::now();
        let load = generator::closed_loop(gateway.addr(), workload.clone(), CONNECTIONS, wall);
        let time_runs = async {
            let mut ticker = tokio::time::interval(TICK);
            for _ in 0..ticks {
                ticker.tick().await;
                advance_clocks(control, clock, step).await?;
            }
            Ok::<_, String>(())
        };
        let (samples, moved) = tokio::join!(load, time_runs);
        moved?;
        let wall_seconds = started.elapsed().as_secs_f64();
        let waited = gateway.tokens().stats().requests_waited - waited_before;
        let refreshes = refresh_grants(control).await? - refreshes_before;
        let summary = samples.summary();
        Ok(ExpiryResult {
            users: workload.users.len(),
            token_lifetime_secs: lifetime,
            speedup: (step * ticks) as f64 / wall_seconds,
            wall_seconds,
            requests: summary.requests,
            non_2xx: summary.non_2xx,
            socket_errors: summary.socket_errors,
            p99_ms: summary.p99_us / 1e3,
            refreshes,
            requests_waited: waited,
        })
    })
}

/// The Markdown section for (f).
pub fn markdown(result: &ExpiryResult) -> String {
    format!(
        "{} users (tokens issued in {COHORTS} cohorts a tenth of a lifetime apart), {} connections \
         of steady load for {:.1} s while both clocks ran {:.0}× fast through {LIFETIMES} token \
         lifetimes of {} s (refresh ahead in the last 10 %):\n\n\
         | measure | value |\n|---|---:|\n\
         | requests (non-2xx / socket errors) | {} ({} / {}) |\n\
         | p99 ms | {:.2} |\n\
         | refreshes at the simulator | {} |\n\
         | requests that waited for a refresh (goal 0) | {} |\n",
        result.users,
        CONNECTIONS,
        result.wall_seconds,
        result.speedup,
        result.token_lifetime_secs,
        result.requests,
        result.non_2xx,
        result.socket_errors,
        result.p99_ms,
        result.refreshes,
        result.requests_waited,
    )
}
