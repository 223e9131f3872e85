//! Criterion micro benches of the per-request hot path: the access-token
//! cache hit, route classification with path normalisation, the upstream header rewrite, caller
//! JWT verification, and AEAD sealing and opening of a 2 KB token.
//!
//! Run with `cargo bench --bench hot_path`. Each bench measures for a second on 30 samples, so
//! the whole file finishes in well under a minute.
//!
//! First it prints what each step of a cache-hit request allocates, counted by a wrapper
//! around the product's allocator, for finX tokens of 300 and 2,100 characters (the range the
//! simulator issues): nothing on the request path may grow with the token.

#[path = "load/gateway_config.rs"]
mod gateway_config;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion};
use finx_gateway::clock::{Clock, SystemClock};
use finx_gateway::config::Config;
use finx_gateway::proxy::{headers, routes};
use finx_gateway::sim::SimConfig;
use finx_gateway::store::crypto::{EncryptionKey, TokenColumn};
use finx_gateway::store::{AccessToken, ConnectionKey, NewConnection};
use finx_gateway::tokens::{TokenManager, TokenSource};
use gateway_config::{GatewayFiles, ServerTuning};
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use secrecy::SecretString;

/// The product's allocator, counting the allocations and bytes of the thread that asks.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

fn count(bytes: usize) {
    // `try_with`: a thread being torn down has no counter any more.
    let _ = ALLOCATED.try_with(|counter| {
        let (allocations, total) = counter.get();
        counter.set((allocations + 1, total + bytes as u64));
    });
}

// SAFETY: every call is passed on unchanged to the product's allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { finx_gateway::allocator::GLOBAL.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { finx_gateway::allocator::GLOBAL.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { finx_gateway::allocator::GLOBAL.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { finx_gateway::allocator::GLOBAL.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations and bytes per call of `step`, averaged over many calls on this thread.
fn allocated_per_call(mut step: impl FnMut()) -> (f64, f64) {
    const CALLS: u64 = 10_000;
    step();
    let before = ALLOCATED.with(Cell::get);
    for _ in 0..CALLS {
        step();
    }
    let after = ALLOCATED.with(Cell::get);
    (
        (after.0 - before.0) as f64 / CALLS as f64,
        (after.1 - before.1) as f64 / CALLS as f64,
    )
}

/// The steps of a cache-hit user request, with what each allocates, for two token lengths.
fn report_allocations() {
    println!("request path allocations per request (cache hit, remembered caller JWT):\n");
    println!(
        "| step | token 300 chars: allocations / bytes | token 2,100 chars: allocations / bytes |"
    );
    println!("|---|---:|---:|");
    let measured: Vec<Vec<(&str, (f64, f64))>> = [300, 2_100]
        .into_iter()
        .map(allocations_for_token_length)
        .collect();
    for (row, (step, short)) in measured[0].iter().enumerate() {
        let long = measured[1][row].1;
        println!(
            "| {step} | {:.2} / {:.0} | {:.2} / {:.0} |",
            short.0, short.1, long.0, long.1
        );
    }
    println!();
}

fn allocations_for_token_length(token_length: usize) -> Vec<(&'static str, (f64, f64))> {
    let files = GatewayFiles::new().expect("bench dir");
    let (config, caller_token) = bench_config(&files);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store =
        finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).expect("store opens");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let tokens: TokenManager =
        finx_gateway::build_token_manager(&config, store.clone(), clock.clone()).unwrap();
    let user = "user-0001";
    let key = ConnectionKey::user(user).unwrap();
    runtime.block_on(async {
        let connection = NewConnection {
            refresh_token: SecretString::from("r".repeat(64)),
            access: Some(AccessToken {
                token: SecretString::from("a".repeat(token_length)),
                expires_at: clock.now() + 3600,
            }),
            scope: None,
        };
        store
            .put_connection(&key, &connection, clock.now())
            .await
            .unwrap();
        tokens.bearer(&key).await.expect("stored token");
    });
    let request = caller_request(&caller_token);
    let headers: HeaderMap = request.headers.clone();
    let now = SystemClock.now();
    let callers = &config.callers;
    let host = HeaderValue::from_static("finx.example:443");
    let caller_header: HeaderName = callers.credential_header().clone();
    let credential = runtime
        .block_on(tokens.cached_bearer(user))
        .expect("cached")
        .1
        .header;
    let mut upstream = request.clone();
    vec![
        (
            "route: split target, classify",
            allocated_per_call(|| {
                let path = routes::split_target(black_box(b"/rest/accounts?count=50"))
                    .unwrap()
                    .path;
                black_box(routes::classify(path, "/callback").unwrap());
            }),
        ),
        (
            "caller: authenticate, rate, route and user policy",
            allocated_per_call(|| {
                let caller = callers.authenticate(black_box(&headers), now).unwrap();
                caller.check_rate().unwrap();
                caller
                    .authorize_route(&http::Method::GET, "/rest/accounts")
                    .unwrap();
                caller.authorize_user(user).unwrap();
                black_box(caller);
            }),
        ),
        (
            "connection key and credential (cache hit)",
            allocated_per_call(|| {
                let name = ConnectionKey::user_name(black_box(user)).unwrap();
                black_box(runtime.block_on(tokens.cached_bearer(name)).unwrap());
            }),
        ),
        (
            "upstream header rewrite (on pingora's copy)",
            allocated_per_call(|| {
                headers::rewrite_for_upstream(
                    &mut upstream,
                    &host,
                    "",
                    &caller_header,
                    Some(&credential),
                )
                .unwrap();
            }),
        ),
    ]
}

/// Nothing listens here: every bench below is served without calling finX.
const UNUSED_UPSTREAM: &str = "http://127.0.0.1:9";

/// A config over a throwaway store and the demo caller token it accepts.
fn bench_config(files: &GatewayFiles) -> (Config, String) {
    let config = files
        .config(
            UNUSED_UPSTREAM,
            &SimConfig::default(),
            ServerTuning::default(),
        )
        .expect("bench config is valid");
    let caller_token = finx_gateway::demo::mint_demo_token(
        &config.callers,
        std::time::Duration::from_secs(24 * 3600),
    )
    .expect("caller token");
    (config, caller_token)
}

/// A request as a caller sends it: a few ordinary headers, the caller JWT and the user header.
fn caller_request(caller_token: &str) -> RequestHeader {
    let mut request = RequestHeader::build("GET", b"/rest/accounts?count=50", None).unwrap();
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("x-request-id", "0f5c2d0e-8d8b-4a53-9d39-6f1f3f0c4e21"),
        ("x-finx-user", "user-0001"),
    ] {
        request.append_header(name, value).unwrap();
    }
    request
        .append_header("authorization", format!("Bearer {caller_token}"))
        .unwrap();
    request
}

fn token_cache_hit(c: &mut Criterion) {
    let files = GatewayFiles::new().expect("bench dir");
    let (config, _) = bench_config(&files);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store =
        finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).expect("store opens");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let tokens: TokenManager =
        finx_gateway::build_token_manager(&config, store.clone(), clock.clone()).unwrap();
    let key = ConnectionKey::user("user-0001").unwrap();
    runtime.block_on(async {
        let connection = NewConnection {
            refresh_token: SecretString::from("r".repeat(64)),
            access: Some(AccessToken {
                token: SecretString::from("a".repeat(64)),
                expires_at: clock.now() + 3600,
            }),
            scope: None,
        };
        store
            .put_connection(&key, &connection, clock.now())
            .await
            .unwrap();
        let first = tokens.bearer(&key).await.expect("stored token");
        assert_eq!(first.source, TokenSource::Store);
        let second = tokens.bearer(&key).await.expect("cached token");
        assert_eq!(second.source, TokenSource::Cache);
    });
    c.bench_function("tokens/bearer_cache_hit", |b| {
        // One block_on per batch, so the runtime's entry cost is not part of the figure.
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    black_box(tokens.bearer(black_box(&key)).await.unwrap());
                }
                started.elapsed()
            })
        })
    });
}

fn route_classification(c: &mut Criterion) {
    let mut group = c.benchmark_group("routes/request_path+classify");
    for (name, target) in [
        ("plain", &b"/rest/accounts?count=50"[..]),
        (
            "encoded",
            b"/rest/accounts/A%20B/transactions?from=2024-01-01",
        ),
        ("client_data", b"/payment-receipts/42"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let path = routes::split_target(black_box(target)).unwrap().path;
                black_box(routes::classify(path, "/callback").unwrap())
            })
        });
    }
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let files = GatewayFiles::new().expect("bench dir");
    let (config, caller_token) = bench_config(&files);
    let request = caller_request(&caller_token);
    let host = HeaderValue::from_static("finx.example:443");
    let mut credential = HeaderValue::try_from(format!("Bearer {}", "a".repeat(64))).unwrap();
    credential.set_sensitive(true);
    let caller_header: HeaderName = config.callers.credential_header().clone();
    c.bench_function("headers/rewrite_for_upstream", |b| {
        b.iter_batched(
            || request.clone(),
            |mut upstream| {
                headers::rewrite_for_upstream(
                    &mut upstream,
                    &host,
                    "",
                    &caller_header,
                    Some(&credential),
                )
                .unwrap();
                upstream
            },
            BatchSize::SmallInput,
        )
    });
}

fn caller_jwt(c: &mut Criterion) {
    let files = GatewayFiles::new().expect("bench dir");
    let (config, caller_token) = bench_config(&files);
    let request = caller_request(&caller_token);
    let headers: HeaderMap = request.headers.clone();
    let now = SystemClock.now();
    assert!(config.callers.authenticate(&headers, now).is_ok());
    // Callers send the same JWT with every request: after the first, it is remembered.
    c.bench_function("callers/authenticate_hs256_remembered", |b| {
        b.iter(|| {
            black_box(
                config
                    .callers
                    .authenticate(black_box(&headers), now)
                    .unwrap(),
            )
        })
    });
    // A token the gateway has not seen: signature, JSON and claims checked in full.
    c.bench_function("callers/authenticate_hs256_first_sight", |b| {
        // By reference: building and dropping the config stay outside the timing.
        b.iter_batched_ref(
            || bench_config(&files).0,
            |fresh| {
                black_box(
                    fresh
                        .callers
                        .authenticate(black_box(&headers), now)
                        .unwrap(),
                )
            },
            BatchSize::PerIteration,
        )
    });
}

fn aead_2kb_token(c: &mut Criterion) {
    let key = EncryptionKey::generate();
    let connection = ConnectionKey::user("user-0001").unwrap();
    let token = SecretString::from("t".repeat(2048));
    let sealed = key
        .seal_token(&connection, TokenColumn::AccessToken, &token)
        .unwrap();
    let mut group = c.benchmark_group("store/aead_2kb_token");
    group.bench_function("seal", |b| {
        b.iter(|| {
            black_box(
                key.seal_token(&connection, TokenColumn::AccessToken, black_box(&token))
                    .unwrap(),
            )
        })
    });
    group.bench_function("open", |b| {
        b.iter(|| {
            black_box(
                key.open_token(&connection, TokenColumn::AccessToken, black_box(&sealed))
                    .unwrap(),
            )
        })
    });
    group.finish();
}

fn quick_criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = hot_path;
    config = quick_criterion();
    targets = token_cache_hit, route_classification, header_rewrite, caller_jwt, aead_2kb_token
}
fn main() {
    report_allocations();
    hot_path();
    Criterion::default().configure_from_args().final_summary();
}
