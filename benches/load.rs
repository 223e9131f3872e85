//! Load harness: the gateway against a plain pingora passthrough, nginx and the simulator
//! itself ("direct", the ceiling), under the same HTTP/1.1 keep-alive load. The headline is
//! each target's CPU time per request (`load/cpu.rs`); req/s and latency stand beside it, and
//! the gateway's own time per request comes from its access lines (`load/access_log.rs`).
//!
//! One run starts the finX simulator (upstream), the gateway (warm cache), the passthrough
//! (`load/passthrough.rs`) and, when installed, nginx (`load/nginx.rs`), then measures:
//!
//! * (a) one user, cache hit, and (b) 10,000 users chosen uniformly at random, at concurrency
//!   1, 16 and 64, each target for a fixed time per round, targets rotated every round so that
//!   drift cancels; medians of the rounds with their spread;
//! * (c) resident memory per cached connection, warming 100,000 users through a fresh gateway,
//!   also as bytes beyond the token's own; (m), only when asked for, the same with a million;
//! * (d) a refresh storm: 1,000 users × 10 concurrent requests whose access tokens all expire
//!   at once, with 50 ms added to the simulator's token endpoint, while other users keep
//!   sending paced requests;
//! * (e) three gateway replicas on one shared PostgreSQL store (`load/replicas.rs`): cache-hit
//!   throughput of each replica alone and of the three at once, against the single SQLite
//!   gateway; and a refresh storm that sends every replica a request for every user at once;
//! * (f) steady traffic across token expiries (`load/expiry.rs`): requests that waited for a
//!   refresh.
//!
//! Output: Markdown on stdout and `$CARGO_TARGET_DIR/bench/load.json` (default
//! `target/bench/load.json`). `cargo bench --bench load -- --quick` is a smoke run of a minute
//! or two (one round of one second, fewer users). `--scenario a,b,e` (or `--scenario e`) runs
//! only those scenarios; all but (m) by default. `--threads N` sets the proxies' threads and
//! `--work-stealing on|off` their runtime flavour; `--rounds N` and `--seconds S` change the
//! plan.
//!
//! Performance targets are reported, not enforced. Scenario (e) checks correctness: exactly one
//! refresh per user, no refresh-token reuse, no revoked family, every request answered; a
//! failed check is reported, then the run exits non-zero. (e) needs PostgreSQL at
//! `FINX_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and fails,
//! before anything else runs, when it cannot create its database there.

#[path = "load/access_log.rs"]
mod access_log;
#[path = "load/affinity.rs"]
mod affinity;
#[path = "load/cpu.rs"]
mod cpu;
#[path = "load/expiry.rs"]
mod expiry;
#[path = "load/gateway_config.rs"]
mod gateway_config;
#[path = "load/generator.rs"]
mod generator;
#[path = "load/heap.rs"]
mod heap;
#[path = "load/nginx.rs"]
mod nginx;
#[path = "load/passthrough.rs"]
mod passthrough;
#[path = "load/replicas.rs"]
mod replicas;
#[path = "load/report.rs"]
mod report;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use finx_gateway::clock::{Clock, ManualClock};
use finx_gateway::config::Config;
use finx_gateway::sim::{Faults, SimConfig, SimControl};
use finx_gateway::store::{AccessToken, ConnectionKey, NewConnection, TokenStore};
use finx_gateway::RunningGateway;
use futures::{StreamExt, TryStreamExt};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::json;

use affinity::{pin_current_thread, resident_kib, started_on, CoreLayout};
use gateway_config::{GatewayFiles, ServerTuning};
use generator::{Authorization, Generator, KeptConnection, Samples, Workload};
use report::Cell;

/// The product's allocator: the gateway and the passthrough in this process use what the
/// `finx-gateway` binary uses (counted only while (c) or (m) measures: `load/heap.rs`).
#[global_allocator]
static ALLOCATOR: heap::Counted = heap::Counted;

/// How much to measure: the full run or the `--quick` smoke run.
struct Plan {
    rounds: usize,
    seconds_per_run: u64,
    /// A discarded run per target and scenario that fills the upstream pools (0: none).
    warm_up_seconds: u64,
    concurrencies: [usize; 3],
    many_users: usize,
    rss_users: usize,
    storm_users: usize,
    storm_fanout: usize,
    calm_users: usize,
    calm_seconds: u64,
    /// (e): total connections of the cache-hit runs (split over the replicas when at once).
    replica_concurrencies: [usize; 2],
    /// (e): users in the refresh storm across the replicas.
    replica_storm_users: usize,
    /// (f): users under steady load, and the wall seconds of the run.
    expiry_users: usize,
    expiry_seconds: u64,
}

/// (m): cached connections of the long memory run.
const MILLION_USERS: usize = 1_000_000;

impl Plan {
    fn full() -> Self {
        Self {
            rounds: 3,
            seconds_per_run: 3,
            warm_up_seconds: 1,
            concurrencies: [1, 16, 64],
            many_users: 10_000,
            rss_users: 100_000,
            storm_users: 1_000,
            storm_fanout: 10,
            calm_users: 200,
            calm_seconds: 2,
            replica_concurrencies: [16, 64],
            replica_storm_users: 1_000,
            expiry_users: 1_000,
            expiry_seconds: 12,
        }
    }

    fn quick() -> Self {
        Self {
            rounds: 1,
            seconds_per_run: 1,
            // The smoke run keeps under a minute; its first requests open upstream connections.
            warm_up_seconds: 0,
            concurrencies: [1, 16, 64],
            many_users: 2_000,
            rss_users: 5_000,
            storm_users: 100,
            storm_fanout: 10,
            calm_users: 50,
            calm_seconds: 1,
            replica_concurrencies: [16, 64],
            replica_storm_users: 300,
            expiry_users: 200,
            expiry_seconds: 2,
        }
    }
}

/// Added latency of the simulator's token endpoint during the storms of (d) and (e).
const STORM_TOKEN_LATENCY_MS: u64 = 50;
/// (a): users seeded to pick the one whose token has the median length.
const ONE_USER_CANDIDATES: usize = 65;
/// Connections (and parallel seeding calls) used to warm caches and seed users.
const WARM_CONNECTIONS: usize = 64;

type BenchResult<T> = Result<T, String>;

/// Every scenario, in the order they run; all but (m) run by default.
const SCENARIOS: &str = "abcdefm";
const DEFAULT_SCENARIOS: &str = "abcdef";

/// The scenarios to run: `--scenario a,b,e`, `--scenario=e` or several `--scenario` options;
/// all of them when there is none.
struct Selection(BTreeSet<char>);

impl Selection {
    fn parse(args: &[String]) -> BenchResult<Self> {
        let mut chosen = BTreeSet::new();
        let mut any = false;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let list = if arg == "--scenario" || arg == "--scenarios" {
                iter.next().ok_or("--scenario needs a list such as a,b,e")?
            } else if let Some(list) = arg
                .strip_prefix("--scenario=")
                .or_else(|| arg.strip_prefix("--scenarios="))
            {
                list
            } else {
                continue;
            };
            any = true;
            for name in list.split([',', ' ']).filter(|name| !name.is_empty()) {
                let letter = name.to_ascii_lowercase();
                match letter.chars().next() {
                    Some(c) if letter.len() == 1 && SCENARIOS.contains(c) => {
                        chosen.insert(c);
                    }
                    _ => {
                        return Err(format!(
                            "unknown scenario {name:?}: choose from a, b, c, d, e, f, m"
                        ))
                    }
                }
            }
        }
        if !any {
            chosen.extend(DEFAULT_SCENARIOS.chars());
        }
        if chosen.is_empty() {
            return Err("--scenario: no scenario given".into());
        }
        Ok(Self(chosen))
    }

    fn has(&self, scenario: char) -> bool {
        self.0.contains(&scenario)
    }

    fn describe(&self) -> String {
        self.0.iter().collect()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let run_options =
        match Selection::parse(&args).and_then(|selection| Ok((selection, options(&args)?))) {
            Ok(parsed) => parsed,
            Err(error) => {
                eprintln!("load bench: {error}");
                std::process::exit(2);
            }
        };
    let (selection, (quick, plan, tuning)) = run_options;
    if let Err(error) = run(plan, quick, tuning, &selection) {
        eprintln!("load bench failed: {error}");
        std::process::exit(1);
    }
}

/// The value after `--name` (or in `--name=value`), parsed.
fn option<T: std::str::FromStr>(args: &[String], name: &str) -> BenchResult<Option<T>> {
    let inline = format!("{name}=");
    let value = args.iter().enumerate().find_map(|(at, arg)| {
        if arg == name {
            Some(args.get(at + 1).map(String::as_str).unwrap_or(""))
        } else {
            arg.strip_prefix(&inline)
        }
    });
    value
        .map(|value| {
            value
                .parse()
                .map_err(|_| format!("{name}: cannot use {value:?}"))
        })
        .transpose()
}

/// `--quick`; `--rounds N` and `--seconds S` (per target and concurrency) to change the plan;
/// `--threads N` (pingora threads of gateway and passthrough, nginx workers) and
/// `--work-stealing on|off` to change the proxies (default: the gateway's defaults).
fn options(args: &[String]) -> BenchResult<(bool, Plan, ServerTuning)> {
    let quick = args.iter().any(|arg| arg == "--quick");
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    if let Some(rounds) = option::<usize>(args, "--rounds")? {
        plan.rounds = rounds.max(1);
    }
    if let Some(seconds) = option::<u64>(args, "--seconds")? {
        plan.seconds_per_run = seconds.max(1);
    }
    let work_stealing = match option::<String>(args, "--work-stealing")?.as_deref() {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(other) => return Err(format!("--work-stealing: on or off, not {other:?}")),
    };
    let tuning = ServerTuning {
        threads: option(args, "--threads")?,
        work_stealing,
    };
    Ok((quick, plan, tuning))
}

/// One proxy (or the simulator itself) and the requests it is sent.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    workload: Arc<Workload>,
    script: PathBuf,
    /// Whose CPU time is this target's.
    account: cpu::Account,
}

fn run(plan: Plan, quick: bool, tuning: ServerTuning, selection: &Selection) -> BenchResult<()> {
    // Scenario (e)'s database first: without PostgreSQL the run fails before measuring anything.
    // Declared first, so it is dropped last, after every replica.
    let database = if selection.has('e') {
        Some(replicas::BenchDatabase::create()?)
    } else {
        None
    };
    let open_files = affinity::raise_open_file_limit(131_072);
    let machine = machine_description();
    let layout = CoreLayout::detect();
    let generator = Generator::detect();
    let nginx_binary = nginx::find_nginx();

    // Servers are started on the server core; their threads inherit it.
    pin_current_thread(layout.servers);
    let sim_config = SimConfig::default().with_control();
    let sim = finx_gateway::sim::spawn(sim_config.clone()).map_err(|e| e.to_string())?;
    let files = GatewayFiles::new().map_err(|e| e.to_string())?;
    let mut access_log = access_log::AccessLog::install(files.file("access.log"))?;
    let config = files.config(&sim.base_url(), &sim_config, tuning)?;
    let clock = ManualClock::default();
    let store = finx_gateway::open_store(&config, finx_gateway::OpenWait::Once)
        .map_err(|e| e.to_string())?;
    let gateway = RunningGateway::start(config.clone(), store.clone(), Arc::new(clock.clone()))
        .map_err(|e| e.to_string())?;
    let passthrough = passthrough::Passthrough::start(&config)?;
    // Everything else (the load generator, wrk, the orchestration) runs on the load core.
    pin_current_thread(layout.load);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let control = sim.control();
    let caller_bearer = caller_bearer(&config)?;
    let scripts = tempfile::Builder::new()
        .prefix("finx-bench-scripts-")
        .tempdir()
        .map_err(|e| e.to_string())?;

    println!(
        "# finx-gateway load bench{}\n",
        if quick { " (--quick smoke run)" } else { "" }
    );
    println!("- machine: {machine}");
    println!("- placement: {}", layout.describe());
    println!("- load generator: {}", generator.describe());
    println!(
        "- proxies: pingora threads = {}, work stealing {} (gateway and passthrough), upstream keep-alive pool {}, allocator {}; gateway access log JSON at info to a file; nginx {}",
        config.server.threads,
        if config.server.work_stealing { "on" } else { "off" },
        config.upstream.pool_size,
        finx_gateway::allocator::NAME,
        match &nginx_binary {
            Some(path) => format!("{} with worker_processes {}", path.display(), config.server.threads),
            None => "not installed: skipped".into(),
        }
    );
    println!(
        "- runs: {} round(s) × {} s per target and concurrency, targets rotated each round; open-file limit {open_files}",
        plan.rounds, plan.seconds_per_run
    );
    println!(
        "- CPU per request: {}",
        if cpu::available() {
            "the target's threads' run time (schedstat) over the run ÷ requests answered"
        } else {
            "not available (no /proc/<pid>/schedstat)"
        }
    );
    println!("- scenarios: {}\n", selection.describe());

    let mut cells: Vec<Cell> = Vec::new();
    for (scenario, prefix, user_count) in [
        ("a: 1 user", "one", 1),
        ("b: many users", "many", plan.many_users),
    ]
    .into_iter()
    .filter(|(scenario, _, _)| selection.has(scenario.chars().next().unwrap_or(' ')))
    {
        // (a)'s one user is the median-length token of a few candidates: the simulator draws
        // token lengths at random, and a short or long single token would make (a) and (b)
        // differ by the bytes every request carries rather than by the number of users.
        let candidates = if user_count == 1 {
            ONE_USER_CANDIDATES
        } else {
            user_count
        };
        let seeding = Instant::now();
        let mut seeded: Vec<(String, String)> = {
            let names: Vec<String> = (0..candidates)
                .map(|i| format!("{prefix}-{i:06}"))
                .collect();
            let tokens = runtime.block_on(seed_users(&control, &store, &clock, &names))?;
            names.into_iter().zip(tokens).collect()
        };
        if user_count == 1 {
            seeded.sort_by_key(|(_, token)| token.len());
            seeded = vec![seeded.swap_remove(seeded.len() / 2)];
        }
        let (users, access_tokens): (Vec<String>, Vec<String>) = seeded.into_iter().unzip();
        let users = Arc::new(users);
        let bearers: Arc<Vec<String>> = Arc::new(
            access_tokens
                .iter()
                .map(|t| format!("Bearer {t}"))
                .collect(),
        );
        let per_user = Arc::new(Workload {
            users: users.clone(),
            authorization: Authorization::PerUser(bearers.clone()),
        });
        let as_caller = Arc::new(Workload {
            users: users.clone(),
            authorization: Authorization::Caller(caller_bearer.clone()),
        });
        let warm = runtime.block_on(generator::each_user_once(
            gateway.addr(),
            as_caller.clone(),
            WARM_CONNECTIONS,
        ));
        check_all_ok(&warm, "warming the gateway cache")?;
        eprintln!(
            "{scenario}: {user_count} user(s) seeded and cached in {:.1} s",
            seeding.elapsed().as_secs_f64()
        );
        let token_bytes: usize = access_tokens.iter().map(String::len).sum();
        println!(
            "- {scenario}: mean finX token length {:.0} characters",
            token_bytes as f64 / access_tokens.len().max(1) as f64
        );
        let nginx = match &nginx_binary {
            Some(binary) => {
                let pairs: Vec<(String, String)> =
                    users.iter().cloned().zip(bearers.iter().cloned()).collect();
                Some(started_on(layout.servers, layout.load, || {
                    nginx::Nginx::start(binary, sim.addr(), config.server.threads, &pairs)
                })?)
            }
            None => None,
        };
        let mut targets = vec![
            ("direct", sim.addr(), per_user.clone(), cpu::SIMULATOR),
            (
                "passthrough",
                passthrough.addr(),
                per_user.clone(),
                cpu::PASSTHROUGH,
            ),
            ("gateway", gateway.addr(), as_caller.clone(), cpu::GATEWAY),
        ];
        if let Some(nginx) = &nginx {
            targets.push((
                "nginx",
                nginx.addr(),
                as_caller.clone(),
                cpu::Account::ProcessTree(nginx.pid()),
            ));
        }
        let targets: Vec<Target> = targets
            .into_iter()
            .map(|(name, addr, workload, account)| {
                let script = generator
                    .prepare(&workload, scripts.path(), &format!("{prefix}-{name}"))
                    .map_err(|e| e.to_string())?;
                Ok(Target {
                    name,
                    addr,
                    workload,
                    script,
                    account,
                })
            })
            .collect::<BenchResult<_>>()?;
        // One discarded run per target fills every upstream pool before measuring.
        for target in targets.iter().filter(|_| plan.warm_up_seconds > 0) {
            generator.run(
                &runtime,
                target.addr,
                &target.workload,
                &target.script,
                16,
                plan.warm_up_seconds,
            )?;
        }
        access_log.skip(&runtime, gateway.addr())?;
        for &concurrency in &plan.concurrencies {
            let first = cells.len();
            for target in &targets {
                cells.push(Cell {
                    scenario,
                    target: target.name,
                    concurrency,
                    rounds: Vec::new(),
                });
            }
            for round in 0..plan.rounds {
                for offset in 0..targets.len() {
                    let index = (round + offset) % targets.len();
                    let target = &targets[index];
                    let cpu_before = target.account.cpu_ns();
                    let mut result = generator.run(
                        &runtime,
                        target.addr,
                        &target.workload,
                        &target.script,
                        concurrency,
                        plan.seconds_per_run,
                    )?;
                    let cpu_ns = target.account.cpu_ns().saturating_sub(cpu_before);
                    if cpu::available() && result.requests > 0 {
                        result.cpu_us_per_request =
                            Some(cpu_ns as f64 / 1e3 / result.requests as f64);
                    }
                    if target.name == "gateway" {
                        let own = access_log.overhead(&runtime, target.addr)?;
                        result.overhead_p50_us = Some(own.p50_us);
                        result.overhead_p99_us = Some(own.p99_us);
                    }
                    cells[first + index].rounds.push(result);
                }
            }
            eprintln!("{scenario}: concurrency {concurrency} done");
        }
    }

    let memory = if selection.has('c') {
        Some(cached_connection_memory(
            plan.rss_users,
            &layout,
            &runtime,
            &sim,
            &sim_config,
        )?)
    } else {
        None
    };
    let million = if selection.has('m') {
        Some(cached_connection_memory(
            MILLION_USERS,
            &layout,
            &runtime,
            &sim,
            &sim_config,
        )?)
    } else {
        None
    };
    let storm = if selection.has('d') {
        Some(refresh_storm(
            open_files,
            &plan,
            &layout,
            &runtime,
            &control,
            &store,
            &clock,
            &gateway,
            &caller_bearer,
        )?)
    } else {
        None
    };
    let expiry = if selection.has('f') {
        Some(expiry::run(
            &plan,
            &runtime,
            &control,
            &store,
            &clock,
            &gateway,
            &caller_bearer,
        )?)
    } else {
        None
    };
    let replicated = match &database {
        Some(database) => {
            let replica_configs =
                replicas::replica_configs(&files, &sim.base_url(), &sim_config, tuning, database)?;
            let bench = replicas::Bench {
                plan: &plan,
                layout: &layout,
                runtime: &runtime,
                generator: &generator,
                scripts: scripts.path(),
                control: &control,
                clock: &clock,
                open_files,
                single: &gateway,
                single_store: &store,
                caller_bearer: &caller_bearer,
            };
            Some(replicas::run(
                &bench,
                &replica_configs,
                database,
                &mut cells,
            )?)
        }
        None => None,
    };

    let ratios = report::ratios(&cells);
    if !cells.is_empty() {
        println!("## CPU per request (µs, median over rounds)\n");
        println!("{}", report::markdown_cpu(&cells));
        println!("## Throughput and latency\n");
        println!("{}", report::markdown_table(&cells));
        println!("spread = ±half the range of req/s over the rounds, in % of the median; latencies are medians over rounds.\n");
    }
    if !ratios.is_empty() {
        println!("## Gateway ratios\n");
        println!("{}", report::markdown_ratios(&ratios));
    }
    if let Some(memory) = &memory {
        print_memory("Memory per cached connection (c)", memory);
    }
    if let Some(million) = &million {
        print_memory("A million cached connections (m)", million);
    }
    if let Some(storm) = &storm {
        print_storm(storm);
    }
    if let Some(expiry) = &expiry {
        println!("## Steady traffic across expiries (f)\n");
        println!("{}", expiry::markdown(expiry));
    }
    if let Some(replicated) = &replicated {
        println!("## Replicas on one PostgreSQL store (e)\n");
        println!("{}", replicas::markdown(replicated));
    }

    let document = json!({
        "quick": quick,
        "scenarios": selection.describe(),
        "machine": machine,
        "placement": layout.describe(),
        "generator": generator.describe(),
        "nginx": nginx_binary.as_ref().map(|p| p.display().to_string()),
        "pingora_threads": config.server.threads,
        "work_stealing": config.server.work_stealing,
        "allocator": finx_gateway::allocator::NAME,
        "rounds": plan.rounds,
        "seconds_per_run": plan.seconds_per_run,
        "cells": cells.iter().map(|c| json!({
            "scenario": c.scenario, "target": c.target, "concurrency": c.concurrency,
            "median": c.medians(), "rounds": c.rounds,
        })).collect::<Vec<_>>(),
        "ratios": ratios,
        "memory": memory,
        "million": million,
        "expiry": expiry,
        "storm": storm,
        "replicas": replicated,
    });
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let out = out_dir.join("load.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!("JSON: {}", out.display());
    drop(passthrough);
    drop(gateway);
    match replicated {
        Some(replicated) if !replicated.checks_failed.is_empty() => Err(format!(
            "scenario e: {}",
            replicated.checks_failed.join("; ")
        )),
        _ => Ok(()),
    }
}

fn print_memory(title: &str, memory: &MemoryResult) {
    println!("## {title}\n");
    println!(
        "{} users warmed through a fresh gateway: VmRSS of the bench process {} KiB → {} KiB, \
         **{:.0} bytes per cached connection, of which the `Authorization` value is {:.0} (mean) \
         and everything else {:.0}** ({} cache entries; store page cache and allocator slack \
         included)\n",
        memory.users_warmed,
        memory.rss_before_kib,
        memory.rss_after_kib,
        memory.bytes_per_connection,
        memory.mean_header_bytes,
        memory.overhead_bytes,
        memory.cached_entries
    );
    if memory.bytes_per_connection < memory.heap_bytes_per_connection {
        println!(
            "VmRSS grew by less than the heap the warming kept: pages freed earlier (seeding the \
             simulator and the store in this process) were reused, so the RSS figure above says \
             nothing per connection in this run; the heap figure below is the measure.\n"
        );
    }
    println!(
        "Heap left allocated by the warming (sizes asked of the allocator, net of frees; no \
         rounding or fragmentation): **{:.0} bytes per cached connection, {:.0} beyond the \
         `Authorization` value**, {:.0} MiB for all of them\n",
        memory.heap_bytes_per_connection,
        memory.heap_overhead_bytes,
        memory.heap_bytes_per_connection * memory.users_warmed as f64 / (1024.0 * 1024.0)
    );
    println!(
        "Process total after the warming: {:.1} GiB VmRSS (the gateway with its cache, and in the \
         same process the simulator holding every user's grant and the store's connection)\n",
        memory.rss_after_kib as f64 / (1024.0 * 1024.0)
    );
}

fn print_storm(storm: &StormResult) {
    println!("## Refresh storm (d)\n");
    println!(
        "{} users × {} concurrent requests ({} in flight at once), tokens expired together, token endpoint +{} ms:\n\n\
         | measure | value |\n|---|---:|\n\
         | simulator refreshes (must be {}) | {} |\n\
         | storm requests: p50 / p99 / max ms | {:.1} / {:.1} / {:.1} |\n\
         | storm requests: non-2xx / socket errors | {} / {} |\n\
         | storm wall time ms | {:.0} |\n\
         | other users, calm: p99 ms ({} req) | {:.2} |\n\
         | other users, during storm: p99 ms ({} req) | {:.2} |\n\
         | during ÷ calm p99 | {:.2} |\n\
         | same burst, tokens fresh: p99 / wall ms | {:.1} / {:.0} |\n\
         | other users, during that burst: p99 ms ({} req) | {:.2} |\n\
         | during storm ÷ during equal burst p99 | {:.2} |\n",
        storm.users,
        storm.fanout,
        storm.in_flight,
        storm.token_latency_ms,
        storm.users,
        storm.refresh_count,
        storm.storm_p50_ms,
        storm.storm_p99_ms,
        storm.storm_max_ms,
        storm.storm_non_2xx,
        storm.storm_socket_errors,
        storm.storm_wall_ms,
        storm.calm_requests,
        storm.calm_p99_ms,
        storm.during_requests,
        storm.during_p99_ms,
        storm.during_p99_ms / storm.calm_p99_ms,
        storm.equal_burst_p99_ms,
        storm.equal_burst_wall_ms,
        storm.during_equal_burst_requests,
        storm.during_equal_burst_p99_ms,
        storm.during_p99_ms / storm.during_equal_burst_p99_ms
    );
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{model}, {cpus} CPUs, {mem_gib:.0} GiB RAM, Linux")
}

fn check_all_ok(samples: &Samples, what: &str) -> BenchResult<()> {
    if samples.non_2xx > 0 || samples.socket_errors > 0 {
        return Err(format!(
            "{what}: {} non-2xx answers and {} socket errors",
            samples.non_2xx, samples.socket_errors
        ));
    }
    Ok(())
}

/// Consents every user at the simulator and stores both tokens in the gateway's store (as
/// `tests/support` `seed_user` does); returns the access tokens in user order.
async fn seed_users(
    control: &SimControl,
    store: &Arc<dyn TokenStore>,
    clock: &ManualClock,
    users: &[String],
) -> BenchResult<Vec<String>> {
    seed_users_into(control, &[store], clock, users, true).await
}

/// Consents every user at the simulator and stores the grant in each of `stores`: with its
/// access token when `with_access`, else its refresh token only (the first request refreshes).
/// Returns the access tokens in user order.
async fn seed_users_into(
    control: &SimControl,
    stores: &[&Arc<dyn TokenStore>],
    clock: &ManualClock,
    users: &[String],
    with_access: bool,
) -> BenchResult<Vec<String>> {
    futures::stream::iter(users.iter().map(|user| async move {
        let grant = control
            .create_grant(user)
            .await
            .map_err(|e| format!("sim grant: {e}"))?;
        let key = ConnectionKey::user(user).map_err(|_| format!("bad user id {user}"))?;
        let connection = NewConnection {
            refresh_token: SecretString::from(grant.refresh_token),
            access: with_access.then(|| AccessToken {
                token: SecretString::from(grant.access_token.clone()),
                expires_at: clock.now() + grant.expires_in as i64,
            }),
            scope: None,
        };
        for store in stores {
            store
                .put_connection(&key, &connection, clock.now())
                .await
                .map_err(|e| format!("store put: {e}"))?;
        }
        Ok::<_, String>(grant.access_token)
    }))
    .buffered(WARM_CONNECTIONS)
    .try_collect()
    .await
}

/// Scenario (c)'s (and (m)'s) result.
#[derive(Serialize)]
struct MemoryResult {
    users_warmed: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    bytes_per_connection: f64,
    /// Mean length of a cached `Authorization` value (`Bearer ` + the finX token).
    mean_header_bytes: f64,
    /// `bytes_per_connection − mean_header_bytes`: what a cached connection costs beyond its
    /// token.
    overhead_bytes: f64,
    /// The heap the warming left allocated (`load/heap.rs`), per cached connection.
    heap_bytes_per_connection: f64,
    /// `heap_bytes_per_connection − mean_header_bytes`: the cache's own data structures.
    heap_overhead_bytes: f64,
    cached_entries: u64,
    seed_seconds: f64,
    warm_seconds: f64,
}

/// Scenario (c) (and (m), with a million users): a fresh gateway and store, `user_count`
/// users seeded; VmRSS is read after a small first batch (connections and buffers exist) and
/// after every other user was cached. The access log is at `warn` meanwhile: its lines in
/// flight are not a cached connection's cost.
fn cached_connection_memory(
    user_count: usize,
    layout: &CoreLayout,
    runtime: &tokio::runtime::Runtime,
    sim: &finx_gateway::sim::SimHandle,
    sim_config: &SimConfig,
) -> BenchResult<MemoryResult> {
    let files = GatewayFiles::new().map_err(|e| e.to_string())?;
    let mut config: Config = files.config(&sim.base_url(), sim_config, ServerTuning::default())?;
    // Room for every user: nothing is evicted while measuring.
    config.tokens.cache_capacity = config.tokens.cache_capacity.max(user_count as u64 * 2);
    // A fresh gateway has a fresh caller key, so it needs a caller token of its own.
    let caller_bearer = caller_bearer(&config)?;
    let clock = ManualClock::default();
    let store = finx_gateway::open_store(&config, finx_gateway::OpenWait::Once)
        .map_err(|e| e.to_string())?;
    let gateway = started_on(layout.servers, layout.load, || {
        RunningGateway::start(config.clone(), store.clone(), Arc::new(clock.clone()))
    })
    .map_err(|e| e.to_string())?;
    let users: Vec<String> = (0..user_count).map(|i| format!("rss-{i:07}")).collect();
    let seeding = Instant::now();
    let access_tokens = runtime.block_on(seed_users(&sim.control(), &store, &clock, &users))?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    let first_batch = (WARM_CONNECTIONS * 4).min(user_count / 2);
    let header_bytes: usize = access_tokens[first_batch..]
        .iter()
        .map(|token| "Bearer ".len() + token.len())
        .sum();
    drop(access_tokens);
    let workload = |users: &[String]| {
        Arc::new(Workload {
            users: Arc::new(users.to_vec()),
            authorization: Authorization::Caller(caller_bearer.clone()),
        })
    };
    // Both workloads exist before the first reading: their user lists are the bench's memory.
    let (first, rest) = (
        workload(&users[..first_batch]),
        workload(&users[first_batch..]),
    );
    let warm = runtime.block_on(generator::each_user_once(
        gateway.addr(),
        first,
        WARM_CONNECTIONS,
    ));
    check_all_ok(&warm, "warming the first batch")?;
    finx_gateway::telemetry::set_level("warn")?;
    let rss_before_kib = resident_kib().ok_or("VmRSS unreadable")?;
    let window = heap::Window::open();
    let warming = Instant::now();
    let warm = runtime.block_on(generator::each_user_once(
        gateway.addr(),
        rest,
        WARM_CONNECTIONS,
    ));
    let warm_seconds = warming.elapsed().as_secs_f64();
    let heap_bytes = window.close();
    let rss_after_kib = resident_kib().ok_or("VmRSS unreadable")?;
    finx_gateway::telemetry::set_level("info")?;
    check_all_ok(&warm, "warming the users")?;
    let users_warmed = users.len() - first_batch;
    eprintln!(
        "memory: {} users seeded in {seed_seconds:.1} s, warmed in {warm_seconds:.1} s",
        users.len()
    );
    let bytes_per_connection =
        (rss_after_kib as f64 - rss_before_kib as f64) * 1024.0 / users_warmed as f64;
    let mean_header_bytes = header_bytes as f64 / users_warmed as f64;
    Ok(MemoryResult {
        users_warmed,
        rss_before_kib,
        rss_after_kib,
        bytes_per_connection,
        mean_header_bytes,
        overhead_bytes: bytes_per_connection - mean_header_bytes,
        heap_bytes_per_connection: heap_bytes as f64 / users_warmed as f64,
        heap_overhead_bytes: heap_bytes as f64 / users_warmed as f64 - mean_header_bytes,
        cached_entries: gateway.tokens().cached_entries(),
        seed_seconds,
        warm_seconds,
    })
}

/// Scenario (d)'s result.
#[derive(Serialize)]
struct StormResult {
    users: usize,
    fanout: usize,
    /// Requests in flight at once (all of them unless the open-file limit is lower).
    in_flight: usize,
    token_latency_ms: u64,
    refresh_count: u64,
    storm_p50_ms: f64,
    storm_p99_ms: f64,
    storm_max_ms: f64,
    storm_non_2xx: u64,
    storm_socket_errors: u64,
    storm_wall_ms: f64,
    calm_requests: usize,
    calm_p99_ms: f64,
    during_requests: usize,
    during_p99_ms: f64,
    /// The same burst with fresh tokens: its own p99, wall time, and other users' p99 during it.
    equal_burst_p99_ms: f64,
    equal_burst_wall_ms: f64,
    during_equal_burst_requests: usize,
    during_equal_burst_p99_ms: f64,
}

/// Paced requests for other (unexpired) users: each of `CALM_CONNECTIONS` connections sends
/// one request every `CALM_PERIOD`, so the latencies show service time, not self-made queues.
const CALM_CONNECTIONS: usize = 8;
const CALM_PERIOD: Duration = Duration::from_millis(2);

/// Each calm request's start and latency.
type TimedSamples = Vec<(Instant, Duration, u16)>;

/// Runs the paced calm load on a thread of its own (pinned to `core`) until `stop` is set or
/// `limit` passes; reports on `started` once every connection has answered once.
fn spawn_calm_load(
    core: Option<usize>,
    target: SocketAddr,
    workload: Arc<Workload>,
    stop: Arc<AtomicBool>,
    limit: Duration,
    started: mpsc::Sender<()>,
) -> std::thread::JoinHandle<TimedSamples> {
    std::thread::spawn(move || {
        pin_current_thread(core);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("calm runtime");
        runtime.block_on(async move {
            let deadline = Instant::now() + limit;
            let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CALM_CONNECTIONS);
            let tasks: Vec<_> = (0..CALM_CONNECTIONS)
                .map(|connection_index| {
                    let (workload, stop, ready) =
                        (workload.clone(), stop.clone(), ready_tx.clone());
                    tokio::spawn(async move {
                        let mut samples = TimedSamples::new();
                        let Ok(mut connection) = KeptConnection::open(target).await else {
                            return samples;
                        };
                        let mut ticks = tokio::time::interval(CALM_PERIOD);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let mut announced = false;
                        let mut user = connection_index;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            ticks.tick().await;
                            user = (user + CALM_CONNECTIONS) % workload.users.len();
                            let at = Instant::now();
                            let (status, latency) = connection
                                .send(workload.request(user))
                                .await
                                .unwrap_or((0, at.elapsed()));
                            samples.push((at, latency, status));
                            if !announced {
                                announced = true;
                                let _ = ready.send(()).await;
                            }
                        }
                        samples
                    })
                })
                .collect();
            drop(ready_tx);
            for _ in 0..CALM_CONNECTIONS {
                if ready_rx.recv().await.is_none() {
                    break;
                }
            }
            let _ = started.send(());
            let mut all = TimedSamples::new();
            for task in tasks {
                all.extend(task.await.unwrap_or_default());
            }
            all
        })
    })
}

fn p99_ms(latencies: impl Iterator<Item = Duration>) -> (usize, f64) {
    let mut micros: Vec<u32> = latencies
        .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        .collect();
    micros.sort_unstable();
    (micros.len(), generator::percentile(&micros, 99.0) / 1e3)
}

fn health_request() -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get("/healthz")
        .header(http::header::HOST, "127.0.0.1")
        .body(http_body_util::Empty::new())
        .expect("valid request")
}

/// Scenario (d), on the main gateway; see the module docs.
#[allow(clippy::too_many_arguments)]
fn refresh_storm(
    open_files: u64,
    plan: &Plan,
    layout: &CoreLayout,
    runtime: &tokio::runtime::Runtime,
    control: &SimControl,
    store: &Arc<dyn TokenStore>,
    clock: &ManualClock,
    gateway: &RunningGateway,
    caller_bearer: &str,
) -> BenchResult<StormResult> {
    let access_ttl = SimConfig::default().access_ttl.as_secs() as i64;
    let as_caller = |users: Vec<String>| {
        Arc::new(Workload {
            users: Arc::new(users),
            authorization: Authorization::Caller(caller_bearer.to_owned()),
        })
    };
    let storm = as_caller(
        (0..plan.storm_users)
            .map(|i| format!("storm-{i:05}"))
            .collect(),
    );
    let calm = as_caller(
        (0..plan.calm_users)
            .map(|i| format!("calm-{i:05}"))
            .collect(),
    );
    runtime.block_on(async {
        // Storm users get tokens now; ten minutes before they expire, calm users get theirs,
        // so that moving both clocks past the storm tokens' expiry leaves the calm ones fresh.
        seed_users(control, store, clock, &storm.users).await?;
        check_all_ok(
            &generator::each_user_once(gateway.addr(), storm.clone(), WARM_CONNECTIONS).await,
            "warming storm users",
        )?;
        advance_clocks(control, clock, access_ttl - 600).await?;
        seed_users(control, store, clock, &calm.users).await?;
        check_all_ok(
            &generator::each_user_once(gateway.addr(), calm.clone(), WARM_CONNECTIONS).await,
            "warming calm users",
        )?;
        control
            .set_faults(&Faults {
                token_latency_ms: STORM_TOKEN_LATENCY_MS,
                ..Faults::default()
            })
            .await
            .map_err(|e| format!("sim faults: {e}"))
    })?;

    // Calm baseline: the same paced load with no storm.
    let (started_tx, started_rx) = mpsc::channel();
    let baseline = spawn_calm_load(
        layout.load,
        gateway.addr(),
        calm.clone(),
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(plan.calm_seconds),
        started_tx,
    )
    .join()
    .map_err(|_| "calm load panicked")?;
    drop(started_rx);
    let (calm_requests, calm_p99_ms) = p99_ms(baseline.iter().map(|s| s.1));

    let requests = plan.storm_users * plan.storm_fanout;
    // Each in-flight request holds four descriptors in this process (client, gateway
    // downstream, gateway upstream, simulator); keep 2,000 spare.
    let in_flight = requests
        .min((open_files.saturating_sub(2_000) / 4) as usize)
        .max(1);
    let burst_plan = BurstPlan {
        gateway: gateway.addr(),
        storm: storm.clone(),
        fanout: plan.storm_fanout,
        requests,
        in_flight,
        calm: calm.clone(),
        calm_core: layout.load,
    };
    runtime.block_on(async {
        let refreshes_before = refresh_grants(control).await?;
        // The storm: every storm user's token expires at once.
        let storm_burst = burst(&burst_plan, Some((control, clock, 600 + 100))).await?;
        let refresh_count = refresh_grants(control).await? - refreshes_before;
        // The same burst again, tokens now fresh: what the load alone does to other users.
        let equal_burst = burst(&burst_plan, None).await?;
        control
            .set_faults(&Faults::default())
            .await
            .map_err(|e| format!("sim faults: {e}"))?;
        let micros = &storm_burst.micros;
        Ok::<_, String>(StormResult {
            users: plan.storm_users,
            fanout: plan.storm_fanout,
            in_flight,
            token_latency_ms: STORM_TOKEN_LATENCY_MS,
            refresh_count,
            storm_p50_ms: generator::percentile(micros, 50.0) / 1e3,
            storm_p99_ms: generator::percentile(micros, 99.0) / 1e3,
            storm_max_ms: generator::percentile(micros, 100.0) / 1e3,
            storm_non_2xx: storm_burst.non_2xx,
            storm_socket_errors: storm_burst.socket_errors,
            storm_wall_ms: storm_burst.wall_ms,
            calm_requests,
            calm_p99_ms,
            during_requests: storm_burst.calm_requests,
            during_p99_ms: storm_burst.calm_p99_ms,
            equal_burst_p99_ms: generator::percentile(&equal_burst.micros, 99.0) / 1e3,
            equal_burst_wall_ms: equal_burst.wall_ms,
            during_equal_burst_requests: equal_burst.calm_requests,
            during_equal_burst_p99_ms: equal_burst.calm_p99_ms,
        })
    })
}

async fn refresh_grants(control: &SimControl) -> BenchResult<u64> {
    Ok(control
        .stats()
        .await
        .map_err(|e| format!("sim stats: {e}"))?
        .refresh_grants)
}

/// One burst of scenario (d): `requests` requests for the storm users, all in flight at once
/// (up to `in_flight`), while paced calm load runs for other users.
struct BurstPlan {
    gateway: SocketAddr,
    storm: Arc<Workload>,
    fanout: usize,
    requests: usize,
    in_flight: usize,
    calm: Arc<Workload>,
    calm_core: Option<usize>,
}

/// What a burst measured.
struct BurstOutcome {
    /// Burst request latencies, sorted, in µs.
    micros: Vec<u32>,
    non_2xx: u64,
    socket_errors: u64,
    wall_ms: f64,
    /// Calm requests started during the burst, and their p99.
    calm_requests: usize,
    calm_p99_ms: f64,
}

/// Runs one burst; with `expire`, both clocks move forward by that many seconds just before it.
async fn burst(
    plan: &BurstPlan,
    expire: Option<(&SimControl, &ManualClock, i64)>,
) -> BenchResult<BurstOutcome> {
    let (requests, in_flight) = (plan.requests, plan.in_flight);
    // `in_flight` kept-alive connections, opened (and used once for /healthz) beforehand.
    // Requests are numbered user-major (user × fanout + k) and connection j sends requests
    // j, j + in_flight, …: each wave holds all requests of its users.
    let connections: Vec<KeptConnection> = futures::stream::iter(0..in_flight)
        .map(|_| async {
            let mut connection = KeptConnection::open(plan.gateway).await?;
            connection.send(health_request()).await?;
            Ok::<_, String>(connection)
        })
        .buffer_unordered(256)
        .try_collect()
        .await?;
    if let Some((control, clock, seconds)) = expire {
        advance_clocks(control, clock, seconds).await?;
    }
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(first, connection)| {
            generator::spawn_wave(
                connection,
                first,
                requests,
                in_flight,
                plan.fanout,
                plan.storm.clone(),
                go_rx.clone(),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = mpsc::channel();
    let calm_thread = spawn_calm_load(
        plan.calm_core,
        plan.gateway,
        plan.calm.clone(),
        stop.clone(),
        Duration::from_secs(60),
        started_tx,
    );
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "calm load did not start")?;
    let started = Instant::now();
    let _ = go_tx.send(true);
    let mut micros = Vec::with_capacity(requests);
    let (mut non_2xx, mut socket_errors) = (0, 0);
    for task in tasks {
        for outcome in task.await.map_err(|e| e.to_string())? {
            match outcome {
                Ok((status, latency)) => {
                    non_2xx += u64::from(!(200..300).contains(&status));
                    micros.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                }
                Err(_) => socket_errors += 1,
            }
        }
    }
    let ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let calm_samples = calm_thread.join().map_err(|_| "calm load panicked")?;
    let during = calm_samples
        .iter()
        .filter(|(at, _, _)| *at >= started && *at <= ended)
        .map(|s| s.1);
    let (calm_requests, calm_p99_ms) = p99_ms(during);
    micros.sort_unstable();
    Ok(BurstOutcome {
        micros,
        non_2xx,
        socket_errors,
        wall_ms: (ended - started).as_secs_f64() * 1e3,
        calm_requests,
        calm_p99_ms,
    })
}

/// `Bearer <caller JWT>` of the demo service, for a gateway running `config`.
fn caller_bearer(config: &Config) -> BenchResult<String> {
    let token = finx_gateway::demo::mint_demo_token(
        &config.callers,
        std::time::Duration::from_secs(24 * 3600),
    )?;
    Ok(format!("Bearer {token}"))
}

/// Moves the simulator's and the gateway's clocks forward together.
async fn advance_clocks(
    control: &SimControl,
    clock: &ManualClock,
    seconds: i64,
) -> BenchResult<()> {
    control
        .advance_clock(seconds)
        .await
        .map_err(|e| format!("sim clock: {e}"))?;
    clock.advance(seconds);
    Ok(())
}
