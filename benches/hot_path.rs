//! Criterion micro benches of the per-request hot path: the access-token
//! cache hit, route classification with path normalisation, the upstream header rewrite, caller
//! JWT verification, and AEAD sealing and opening of a 2 KB token.
//!
//! Run with `cargo bench --bench hot_path`. Each bench measures for a second on 30 samples, so
//! the whole file finishes in well under a minute.

#[path = "load/gateway_config.rs"]
mod gateway_config;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
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

/// Nothing listens here: every bench below is served without calling finX.
const UNUSED_UPSTREAM: &str = "http://127.0.0.1:9";

/// A config over a throwaway store and the demo caller token it accepts.
fn bench_config(files: &GatewayFiles) -> (Config, String) {
    let config = files
        .config(UNUSED_UPSTREAM, &SimConfig::default(), ServerTuning::default())
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
criterion_main!(hot_path);
