//! Scenario (e): three gateway replicas (sidecars) on one shared PostgreSQL token store, in front
//! of one simulator. The database is the only link between the replicas: each has its own
//! listener, its own pool (`pool_size` [`POOL_SIZE`]) and its own token cache.
//!
//! * Cache hits: `many_users` users, seeded with fresh access tokens into the PostgreSQL store and
//!   into the single SQLite gateway's store (the same grants), are cached in all four gateways.
//!   Then, for each total concurrency, rounds rotated as in (a)/(b): the SQLite gateway alone,
//!   each replica alone, and the three replicas at once with the connections split between them
//!   (one load generator per replica, all started together; their req/s summed per round).
//! * Refresh storm: `replica_storm_users` users whose grants exist at the simulator but whose
//!   stored connections hold a refresh token only (no access token). Every replica is sent one
//!   request for every user, all at once (user-major, so the replicas race for the same users),
//!   with the simulator's token endpoint slowed down as in (d). Checked: the simulator counts
//!   exactly one refresh per user, no refresh-token reuse, no revoked family, and every request
//!   answered 200. A replica waiting for another one's row lock holds one of its pool
//!   connections meanwhile, so with every replica asking for the same users in the same order
//!   the storm proceeds at about one pool's worth of refreshes per token round trip; a request
//!   that waits longer than `store.connect_timeout` (15 s here, 5 s by default) for a pool
//!   connection is answered 503, which fails the check.
//!
//! The scenario creates a database of its own (`finx_bench_<random>`) on the server named by
//! `FINX_TEST_DATABASE_URL` (default [`DEFAULT_ADMIN_URL`]) and drops it at the end. A server
//! that cannot be reached fails the run; it is never skipped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use finx_gateway::clock::ManualClock;
use finx_gateway::config::{Config, SecretRef};
use finx_gateway::sim::{Faults, SimConfig, SimControl, SimStats};
use finx_gateway::store::TokenStore;
use finx_gateway::RunningGateway;
use futures::{StreamExt, TryStreamExt};
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::affinity::{started_on, CoreLayout};
use crate::gateway_config::{GatewayFiles, ServerTuning};
use crate::generator::{
    self, spawn_wave, Authorization, ConcurrentRun, Generator, KeptConnection, RunResult, Workload,
};
use crate::report::Cell;
use crate::{BenchResult, Plan};

/// Gateway replicas sharing the store.
pub const REPLICAS: usize = 3;
/// PostgreSQL connections each replica's pool opens at most; a refresh holds one for finX's
/// answer time, so this is also the refreshes one replica runs at once (sized for the storm, as
/// the README advises). Three replicas, plus three connections each for intents and liveness,
/// stay below the server's `max_connections` (100 here).
pub const POOL_SIZE: u32 = 16;
/// The server the bench database is created on when `FINX_TEST_DATABASE_URL` is unset.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

const SCENARIO: &str = "e: 3 replicas, PostgreSQL store";
const SINGLE: &str = "gateway (SQLite)";
const ALONE: [&str; REPLICAS] = ["replica 1 alone", "replica 2 alone", "replica 3 alone"];
const AT_ONCE: [&str; REPLICAS] = [
    "replica 1 (3 at once)",
    "replica 2 (3 at once)",
    "replica 3 (3 at once)",
];

/// The server named by `FINX_TEST_DATABASE_URL`, or the default.
fn admin_url() -> String {
    std::env::var("FINX_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// A URL as it may be printed: without its password.
fn redacted(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// The database this run's replicas share; dropped (`WITH (FORCE)`) when this value is.
pub struct BenchDatabase {
    name: String,
    url: String,
    shown: String,
}

impl BenchDatabase {
    /// Creates `finx_bench_<random>` on the admin server, or says clearly why it cannot.
    pub fn create() -> BenchResult<Self> {
        let admin = admin_url();
        let mut url = url::Url::parse(&admin)
            .map_err(|e| format!("scenario e: FINX_TEST_DATABASE_URL is not a URL: {e}"))?;
        let server = redacted(&url);
        let name = format!(
            "finx_bench_{}",
            Alphanumeric
                .sample_string(&mut rand::rng(), 12)
                .to_lowercase()
        );
        run_sql(&admin, &format!("CREATE DATABASE {name}")).map_err(|e| {
            format!(
                "scenario e needs PostgreSQL and could not create a database on {server} \
                 (FINX_TEST_DATABASE_URL, default {DEFAULT_ADMIN_URL}): {e}. Start PostgreSQL \
                 there or point FINX_TEST_DATABASE_URL at a server, or leave scenario e out with \
                 --scenario a,b,c,d"
            )
        })?;
        url.set_path(&format!("/{name}"));
        let database = Self {
            shown: redacted(&url),
            url: url.to_string(),
            name,
        };
        eprintln!("e: created database {}", database.shown);
        Ok(database)
    }

    /// Where the database is, password hidden.
    pub fn describe(&self) -> &str {
        &self.shown
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        match run_sql(&admin_url(), &sql) {
            Ok(()) => eprintln!("e: dropped database {}", self.name),
            Err(e) => eprintln!(
                "warning: could not drop the bench database {}: {e}",
                self.name
            ),
        }
    }
}

/// Runs one statement on a connection of its own, on a runtime of its own (callable from
/// anywhere, a `Drop` included).
fn run_sql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(sqlx::Error::Io)?
            .block_on(async move {
                let mut connection =
                    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url))
                        .await
                        .map_err(|_| sqlx::Error::PoolTimedOut)??;
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&mut connection)
                    .await?;
                connection.close().await
            })
    })
    .join()
    .unwrap_or_else(|_| Err(sqlx::Error::WorkerCrashed))
}

/// The replicas' configs: the bench gateway's (same caller and store keys, same simulator),
/// with `[store] kind = "postgres"` on `database`, each with a journal of its own.
pub fn replica_configs(
    files: &GatewayFiles,
    sim_base_url: &str,
    sim: &SimConfig,
    tuning: ServerTuning,
    database: &BenchDatabase,
) -> BenchResult<Vec<Config>> {
    let url_path = files.file("database-url");
    std::fs::write(&url_path, &database.url).map_err(|e| e.to_string())?;
    (1..=REPLICAS)
        .map(|replica| {
            let mut file = files.config_file(sim_base_url, sim, tuning)?;
            file.store.kind = Some("postgres".into());
            file.store.path = None;
            file.store.url = Some(SecretRef::File(url_path.clone()));
            file.store.pool_size = Some(POOL_SIZE);
            // A storm queues for pool connections; let a request wait that long for one.
            file.store.connect_timeout = Some(std::time::Duration::from_secs(15));
            file.store.tls = Some("disable".into());
            file.store.journal = Some(files.file(&format!("replica-{replica}.journal")));
            Config::from_file(&file, Path::new(".")).map_err(|e| format!("replica config: {e}"))
        })
        .collect()
}

/// What scenario (e) runs against, all owned by the harness.
pub struct Bench<'a> {
    pub plan: &'a Plan,
    pub layout: &'a CoreLayout,
    pub runtime: &'a tokio::runtime::Runtime,
    pub generator: &'a Generator,
    pub scripts: &'a Path,
    pub control: &'a SimControl,
    pub clock: &'a ManualClock,
    pub open_files: u64,
    /// The single gateway on its SQLite store, to compare with.
    pub single: &'a RunningGateway,
    pub single_store: &'a Arc<dyn TokenStore>,
    pub caller_bearer: &'a str,
}

/// Scenario (e)'s result (the per-run cells go to the main table).
#[derive(Serialize)]
pub struct ReplicaResult {
    pub database: String,
    pub replicas: usize,
    pub pool_size: u32,
    pub cache_hit: CacheHitResult,
    pub storm: ReplicaStorm,
    /// Every check that failed (the run exits non-zero after reporting when this is not empty).
    pub checks_failed: Vec<String>,
}

#[derive(Serialize)]
pub struct CacheHitResult {
    pub users: usize,
    pub seed_seconds: f64,
    /// Refreshes at the simulator while the four caches were warmed (must be 0).
    pub warm_refreshes: u64,
    pub rows: Vec<ThroughputRow>,
}

/// Medians over the rounds at one total concurrency.
#[derive(Serialize)]
pub struct ThroughputRow {
    pub concurrency: usize,
    /// Connections per replica when the three run at once.
    pub split: Vec<usize>,
    pub single_rps: f64,
    pub single_p99_us: f64,
    pub alone_rps: Vec<f64>,
    pub at_once_rps: Vec<f64>,
    pub at_once_p99_us: Vec<f64>,
    /// Median over rounds of the three replicas' summed req/s.
    pub at_once_sum_rps: f64,
    pub at_once_sum_rounds: Vec<f64>,
    /// `at_once_sum_rps` ÷ `single_rps`.
    pub sum_over_single: f64,
}

#[derive(Serialize)]
pub struct ReplicaStorm {
    pub users: usize,
    /// Requests: one per user per replica.
    pub requests: usize,
    /// Requests in flight at once (all unless the open-file limit is lower).
    pub in_flight: usize,
    pub token_latency_ms: u64,
    /// Successful refresh grants at the simulator during the storm (must equal `users`).
    pub refresh_count: u64,
    /// Storm users the simulator refreshed exactly once (must equal `users`).
    pub users_refreshed_once: usize,
    pub refresh_reuse_detected: u64,
    pub families_revoked: u64,
    pub grace_reuses: u64,
    pub invalid_grant_responses: u64,
    pub answered_200: u64,
    pub other_status: u64,
    /// How often each status other than 200 was answered.
    pub other_statuses: BTreeMap<u16, u64>,
    pub socket_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub wall_ms: f64,
    /// `refresh_count` ÷ wall time: refreshes the replicas completed per second together.
    pub refreshes_per_sec: f64,
    pub per_replica_p99_ms: Vec<f64>,
}

/// One replica: a gateway on a store of its own opening (its own pool).
struct Replica {
    gateway: RunningGateway,
    store: Arc<dyn TokenStore>,
}

/// Scenario (e); see the module docs. Its per-run cells are appended to `cells`.
pub fn run(
    bench: &Bench<'_>,
    configs: &[Config],
    database: &BenchDatabase,
    cells: &mut Vec<Cell>,
) -> BenchResult<ReplicaResult> {
    // Replicas run on the server core with everything else under test (their store runtimes
    // included); the orchestration stays on the load core. Each config listens on
    // 127.0.0.1:0, so `RunningGateway::start` reserves a port of its own for each replica
    // (`reserve_port`), and each replica opens the store itself: a pool of its own.
    let replicas: Vec<Replica> = configs
        .iter()
        .map(|config| {
            started_on(bench.layout.servers, bench.layout.load, || {
                let store = finx_gateway::open_store(config, finx_gateway::OpenWait::Once)
                    .map_err(|e| format!("replica store: {e}"))?;
                let gateway = RunningGateway::start(
                    config.clone(),
                    store.clone(),
                    Arc::new(bench.clock.clone()),
                )
                .map_err(|e| format!("replica: {e}"))?;
                Ok::<_, String>(Replica { gateway, store })
            })
        })
        .collect::<BenchResult<_>>()?;
    eprintln!(
        "e: {REPLICAS} replicas on {} ({})",
        database.describe(),
        replicas
            .iter()
            .map(|r| r.gateway.addr().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut checks_failed = Vec::new();
    let cache_hit = cache_hits(bench, &replicas, cells, &mut checks_failed)?;
    let storm = refresh_storm(bench, &replicas)?;
    let requests = storm.requests as u64;
    for (failed, what) in [
        (
            storm.refresh_count != storm.users as u64,
            format!(
                "storm: {} refreshes at the simulator for {} users (must be exactly one each)",
                storm.refresh_count, storm.users
            ),
        ),
        (
            storm.users_refreshed_once != storm.users,
            format!(
                "storm: {} of {} users refreshed exactly once",
                storm.users_refreshed_once, storm.users
            ),
        ),
        (
            storm.refresh_reuse_detected != 0,
            format!(
                "storm: {} refresh-token reuses detected",
                storm.refresh_reuse_detected
            ),
        ),
        (
            storm.families_revoked != 0,
            format!("storm: {} grant families revoked", storm.families_revoked),
        ),
        (
            storm.answered_200 != requests,
            format!(
                "storm: {} of {requests} requests answered 200 (other statuses {:?}, {} socket errors)",
                storm.answered_200, storm.other_statuses, storm.socket_errors
            ),
        ),
    ] {
        if failed {
            checks_failed.push(what);
        }
    }
    drop(replicas);
    Ok(ReplicaResult {
        database: database.describe().to_owned(),
        replicas: REPLICAS,
        pool_size: POOL_SIZE,
        cache_hit,
        storm,
        checks_failed,
    })
}

async fn sim_stats(control: &SimControl) -> BenchResult<SimStats> {
    control.stats().await.map_err(|e| format!("sim stats: {e}"))
}

/// `total` connections split as evenly as possible over the replicas.
fn split(total: usize) -> Vec<usize> {
    (0..REPLICAS)
        .map(|i| (total / REPLICAS + usize::from(i < total % REPLICAS)).max(1))
        .collect()
}

/// Part 1: cache-hit throughput, replicas alone and at once against the SQLite gateway.
fn cache_hits(
    bench: &Bench<'_>,
    replicas: &[Replica],
    cells: &mut Vec<Cell>,
    checks_failed: &mut Vec<String>,
) -> BenchResult<CacheHitResult> {
    let (plan, runtime, control) = (bench.plan, bench.runtime, bench.control);
    let users: Arc<Vec<String>> = Arc::new(
        (0..plan.many_users)
            .map(|i| format!("replica-{i:06}"))
            .collect(),
    );
    let workload = Arc::new(Workload {
        users: users.clone(),
        authorization: Authorization::Caller(bench.caller_bearer.to_owned()),
    });
    let seeding = Instant::now();
    runtime.block_on(crate::seed_users_into(
        control,
        &[bench.single_store, &replicas[0].store],
        bench.clock,
        &users,
        true,
    ))?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    let refreshes_before = runtime.block_on(sim_stats(control))?.refresh_grants;
    let addrs: Vec<SocketAddr> = std::iter::once(bench.single.addr())
        .chain(replicas.iter().map(|r| r.gateway.addr()))
        .collect();
    for (index, addr) in addrs.iter().enumerate() {
        let warm = runtime.block_on(generator::each_user_once(
            *addr,
            workload.clone(),
            crate::WARM_CONNECTIONS,
        ));
        crate::check_all_ok(&warm, &format!("e: warming gateway {index}"))?;
    }
    let warm_refreshes = runtime.block_on(sim_stats(control))?.refresh_grants - refreshes_before;
    if warm_refreshes != 0 {
        checks_failed.push(format!(
            "cache hits: warming the caches refreshed {warm_refreshes} tokens (stored tokens were fresh)"
        ));
    }
    eprintln!(
        "e: {} users seeded in {seed_seconds:.1} s and cached in the SQLite gateway and {REPLICAS} replicas",
        users.len()
    );
    let script = bench
        .generator
        .prepare(&workload, bench.scripts, "replicas")
        .map_err(|e| e.to_string())?;
    // One discarded run per gateway fills every upstream pool before measuring.
    for addr in &addrs {
        bench
            .generator
            .run(runtime, *addr, &workload, &script, 16, 1)?;
    }
    let mut rows = Vec::new();
    for &concurrency in &plan.replica_concurrencies {
        let first = cells.len();
        for target in std::iter::once(SINGLE).chain(ALONE).chain(AT_ONCE) {
            cells.push(Cell {
                scenario: SCENARIO,
                target,
                concurrency,
                rounds: Vec::new(),
            });
        }
        let shares = split(concurrency);
        let mut sums = Vec::new();
        // Slots: the SQLite gateway, each replica alone, the replicas at once; rotated.
        let slots = REPLICAS + 2;
        for round in 0..plan.rounds {
            for offset in 0..slots {
                let slot = (round + offset) % slots;
                if slot < REPLICAS + 1 {
                    let result = bench.generator.run(
                        runtime,
                        addrs[slot],
                        &workload,
                        &script,
                        concurrency,
                        plan.seconds_per_run,
                    )?;
                    cells[first + slot].rounds.push(result);
                } else {
                    let runs: Vec<ConcurrentRun<'_>> = replicas
                        .iter()
                        .zip(&shares)
                        .map(|(replica, &connections)| ConcurrentRun {
                            target: replica.gateway.addr(),
                            workload: &workload,
                            script: &script,
                            connections,
                        })
                        .collect();
                    let results = bench
                        .generator
                        .run_many(runtime, &runs, plan.seconds_per_run)?;
                    sums.push(results.iter().map(|r| r.requests_per_sec).sum::<f64>());
                    for (k, result) in results.into_iter().enumerate() {
                        cells[first + 1 + REPLICAS + k].rounds.push(result);
                    }
                }
            }
        }
        let ours = &cells[first..];
        for cell in ours {
            let failures: u64 = cell
                .rounds
                .iter()
                .map(|r: &RunResult| r.non_2xx + r.socket_errors)
                .sum();
            if failures > 0 {
                checks_failed.push(format!(
                    "cache hits: {} at concurrency {concurrency}: {failures} failed requests",
                    cell.target
                ));
            }
        }
        let medians: Vec<_> = ours.iter().map(Cell::medians).collect();
        let single = medians[0];
        let at_once_sum_rps = median(sums.clone());
        rows.push(ThroughputRow {
            concurrency,
            split: shares,
            single_rps: single.requests_per_sec,
            single_p99_us: single.p99_us,
            alone_rps: medians[1..=REPLICAS]
                .iter()
                .map(|m| m.requests_per_sec)
                .collect(),
            at_once_rps: medians[1 + REPLICAS..]
                .iter()
                .map(|m| m.requests_per_sec)
                .collect(),
            at_once_p99_us: medians[1 + REPLICAS..].iter().map(|m| m.p99_us).collect(),
            at_once_sum_rps,
            at_once_sum_rounds: sums,
            sum_over_single: at_once_sum_rps / single.requests_per_sec,
        });
        eprintln!("e: cache hits at concurrency {concurrency} done");
    }
    Ok(CacheHitResult {
        users: users.len(),
        seed_seconds,
        warm_refreshes,
        rows,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn percentile_ms(sorted_micros: &[u32], p: f64) -> f64 {
    generator::percentile(sorted_micros, p) / 1e3
}

/// Part 2: the refresh storm across the replicas.
fn refresh_storm(bench: &Bench<'_>, replicas: &[Replica]) -> BenchResult<ReplicaStorm> {
    let (runtime, control) = (bench.runtime, bench.control);
    let users = bench.plan.replica_storm_users;
    let workload = Arc::new(Workload {
        users: Arc::new(
            (0..users)
                .map(|i| format!("replica-storm-{i:05}"))
                .collect(),
        ),
        authorization: Authorization::Caller(bench.caller_bearer.to_owned()),
    });
    let requests = users * REPLICAS;
    // Each in-flight request holds four descriptors in this process (client, gateway
    // downstream, gateway upstream, simulator); keep 2,000 spare. Connection j sends to replica
    // j mod REPLICAS, so the number of connections is a multiple of it.
    let in_flight =
        (requests.min((bench.open_files.saturating_sub(2_000) / 4) as usize) / REPLICAS * REPLICAS)
            .max(REPLICAS);
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.gateway.addr()).collect();
    runtime.block_on(async {
        // Grants exist at the simulator; the store holds their refresh tokens only.
        crate::seed_users_into(
            control,
            &[&replicas[0].store],
            bench.clock,
            &workload.users,
            false,
        )
        .await?;
        control
            .set_faults(&Faults {
                token_latency_ms: crate::STORM_TOKEN_LATENCY_MS,
                ..Faults::default()
            })
            .await
            .map_err(|e| format!("sim faults: {e}"))
    })?;
    eprintln!("e: {users} storm users imported with refresh tokens only");

    let outcome = runtime.block_on(async {
        let before = sim_stats(control).await?;
        // Kept-alive connections, opened (and used once for /healthz) beforehand; connection j
        // is to replica j mod REPLICAS and sends requests j, j + in_flight, …, where request r
        // is for user r / REPLICAS: the replicas are asked for the same users at the same time.
        let connections: Vec<KeptConnection> = futures::stream::iter(0..in_flight)
            .map(|j| {
                let addr = addrs[j % REPLICAS];
                async move {
                    let mut connection = KeptConnection::open(addr).await?;
                    connection.send(crate::health_request()).await?;
                    Ok::<_, String>(connection)
                }
            })
            .buffered(256)
            .try_collect()
            .await?;
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(first, connection)| {
                spawn_wave(
                    connection,
                    first,
                    requests,
                    in_flight,
                    REPLICAS,
                    workload.clone(),
                    go_rx.clone(),
                )
            })
            .collect();
        let started = Instant::now();
        let _ = go_tx.send(true);
        let mut micros = Vec::with_capacity(requests);
        let mut per_replica: Vec<Vec<u32>> = vec![Vec::new(); REPLICAS];
        let (mut answered_200, mut other_status, mut socket_errors) = (0u64, 0u64, 0u64);
        let mut other_statuses = BTreeMap::new();
        for (first, task) in tasks.into_iter().enumerate() {
            for outcome in task.await.map_err(|e| e.to_string())? {
                match outcome {
                    Ok((status, latency)) => {
                        if status == 200 {
                            answered_200 += 1;
                        } else {
                            other_status += 1;
                            *other_statuses.entry(status).or_insert(0) += 1;
                        }
                        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                        micros.push(us);
                        per_replica[first % REPLICAS].push(us);
                    }
                    Err(_) => socket_errors += 1,
                }
            }
        }
        let wall = started.elapsed();
        let after = sim_stats(control).await?;
        control
            .set_faults(&Faults::default())
            .await
            .map_err(|e| format!("sim faults: {e}"))?;
        // Exactly one refresh for each storm user (the totals could hide a double refresh of
        // one user and none of another).
        let refreshed_once: Vec<bool> = futures::stream::iter(workload.users.iter())
            .map(|user| async move {
                control
                    .user_stats(user)
                    .await
                    .map(|s| s.refresh_grants == 1 && s.refresh_reuse_detected == 0)
                    .map_err(|e| format!("sim user stats: {e}"))
            })
            .buffered(crate::WARM_CONNECTIONS)
            .try_collect()
            .await?;
        micros.sort_unstable();
        for latencies in &mut per_replica {
            latencies.sort_unstable();
        }
        let refresh_count = after.refresh_grants - before.refresh_grants;
        Ok::<_, String>(ReplicaStorm {
            users,
            requests,
            in_flight,
            token_latency_ms: crate::STORM_TOKEN_LATENCY_MS,
            refresh_count,
            users_refreshed_once: refreshed_once.iter().filter(|once| **once).count(),
            refresh_reuse_detected: after.refresh_reuse_detected - before.refresh_reuse_detected,
            families_revoked: after.families_revoked - before.families_revoked,
            grace_reuses: after.grace_reuses - before.grace_reuses,
            invalid_grant_responses: after.invalid_grant_responses - before.invalid_grant_responses,
            answered_200,
            other_status,
            other_statuses,
            socket_errors,
            p50_ms: percentile_ms(&micros, 50.0),
            p99_ms: percentile_ms(&micros, 99.0),
            max_ms: percentile_ms(&micros, 100.0),
            wall_ms: wall.as_secs_f64() * 1e3,
            refreshes_per_sec: refresh_count as f64 / wall.as_secs_f64(),
            per_replica_p99_ms: per_replica
                .iter()
                .map(|latencies| percentile_ms(latencies, 99.0))
                .collect(),
        })
    })?;
    eprintln!("e: refresh storm done");
    Ok(outcome)
}

fn joined(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Scenario (e)'s Markdown section.
pub fn markdown(result: &ReplicaResult) -> String {
    let mut out = format!(
        "{} gateway replicas, each with its own listener, token cache and PostgreSQL pool of {} \
         ({}), one simulator; the single gateway is the SQLite one of (a)–(d), same threads.\n\n\
         Cache hits, {} users cached everywhere; \"at once\" splits the connections over the \
         replicas, one load generator each, started together:\n\n\
         | conc. (total) | SQLite gateway req/s | replica 1 / 2 / 3 alone req/s | at once: split | \
         at once: replica 1 / 2 / 3 req/s | at once: sum req/s | sum ÷ SQLite gateway | \
         p99 µs: SQLite / at once 1 / 2 / 3 |\n\
         |---:|---:|---:|---|---:|---:|---:|---:|\n",
        result.replicas, result.pool_size, result.database, result.cache_hit.users,
    );
    for row in &result.cache_hit.rows {
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | **{:.0}** | {:.2} | {:.0} / {} |\n",
            row.concurrency,
            row.single_rps,
            joined(&row.alone_rps, 0),
            row.split
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" + "),
            joined(&row.at_once_rps, 0),
            row.at_once_sum_rps,
            row.sum_over_single,
            row.single_p99_us,
            joined(&row.at_once_p99_us, 0),
        ));
    }
    let storm = &result.storm;
    out.push_str(&format!(
        "\nRefresh storm: {} users stored with refresh tokens only, every replica sent one request \
         per user, all at once ({} requests, {} in flight at once), token endpoint +{} ms:\n\n\
         | measure | value |\n|---|---:|\n\
         | simulator refreshes (must be {}) | {} |\n\
         | users refreshed exactly once (must be {}) | {} |\n\
         | refresh-token reuse detected (must be 0) | {} |\n\
         | grant families revoked (must be 0) | {} |\n\
         | grace-window reuses / invalid_grant answers | {} / {} |\n\
         | requests answered 200 (must be {}) / other status / socket errors | {} / {} / {} |\n\
         | storm requests: p50 / p99 / max ms | {:.1} / {:.1} / {:.1} |\n\
         | storm requests p99 per replica ms | {} |\n\
         | storm wall time ms / refreshes per second | {:.0} / {:.0} |\n",
        storm.users,
        storm.requests,
        storm.in_flight,
        storm.token_latency_ms,
        storm.users,
        storm.refresh_count,
        storm.users,
        storm.users_refreshed_once,
        storm.refresh_reuse_detected,
        storm.families_revoked,
        storm.grace_reuses,
        storm.invalid_grant_responses,
        storm.requests,
        storm.answered_200,
        if storm.other_statuses.is_empty() {
            "0".to_owned()
        } else {
            format!(
                "{} ({})",
                storm.other_status,
                storm
                    .other_statuses
                    .iter()
                    .map(|(status, count)| format!("{status}: {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        storm.socket_errors,
        storm.p50_ms,
        storm.p99_ms,
        storm.max_ms,
        joined(&storm.per_replica_p99_ms, 1),
        storm.wall_ms,
        storm.refreshes_per_sec,
    ));
    if result.checks_failed.is_empty() {
        out.push_str("\nAll checks of (e) passed.\n");
    } else {
        out.push_str("\n**Failed checks:**\n\n");
        for failed in &result.checks_failed {
            out.push_str(&format!("- {failed}\n"));
        }
    }
    out
}
