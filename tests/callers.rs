//! Caller authentication and policy, black box over HTTP: every refusal happens before any
//! token work or finX call, and says no more than a short reason.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use finx_gateway::callers::RateLimitFile;
use finx_gateway::config::ConfigFile;
use finx_gateway::sim::SimConfig;
use futures::future::join_all;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rand::{Rng, SeedableRng};
use serde_json::json;
use support::{add_service_like_demo, error_code, Harness};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Adds a backend-for-frontend that may act only for the user named in its token's `user` claim,
/// and a rate-limited service.
fn with_bff_and_limited(file: &mut ConfigFile) {
    let bff = add_service_like_demo(file, "bff");
    bff.connections = vec!["claim:user".into()];
    bff.routes = vec!["GET /rest/**".into()];
    add_service_like_demo(file, "limited").rate_limit = Some(RateLimitFile {
        per_second: 1,
        burst: Some(2),
    });
}

fn hmac_key(harness: &Harness) -> Vec<u8> {
    std::fs::read_to_string(harness.dir.path().join("caller.key"))
        .unwrap()
        .trim()
        .as_bytes()
        .to_vec()
}

fn sign(harness: &Harness, header: Header, claims: serde_json::Value) -> String {
    encode(
        &header,
        &claims,
        &EncodingKey::from_secret(&hmac_key(harness)),
    )
    .unwrap()
}

fn hs256() -> Header {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("demo-hmac".into());
    header
}

async fn get_with(harness: &Harness, token: &str, user: &str) -> reqwest::Response {
    harness
        .http
        .get(harness.url("/rest/accounts"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-finx-user", user)
        .send()
        .await
        .unwrap()
}

async fn assert_unauthenticated(harness: &Harness, token: &str, what: &str) {
    let response = get_with(harness, token, "alice").await;
    assert_eq!(response.status(), 401, "{what}");
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.starts_with("Bearer realm=\"finx-gateway\""),
        "{challenge}"
    );
    assert!(!challenge.contains(token), "the challenge echoes the token");
    assert_eq!(
        error_code(response).await,
        "caller_unauthenticated",
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_caller_tokens_are_refused_before_any_finx_call() {
    let harness = Harness::with(SimConfig::default().with_control(), with_bff_and_limited);
    harness.seed_user("alice").await;
    let before = harness.control.stats().await.unwrap();
    let claims = |extra: serde_json::Value| {
        let mut claims = json!({"iss": "demo", "sub": "demo-service", "exp": now() + 300});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        claims
    };

    // No credential at all.
    let response = harness
        .http
        .get(harness.url("/rest/accounts"))
        .header("x-finx-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));

    let expired = sign(&harness, hs256(), claims(json!({"exp": now() - 3600})));
    assert_unauthenticated(&harness, &expired, "expired").await;
    let not_yet = sign(&harness, hs256(), claims(json!({"nbf": now() + 3600})));
    assert_unauthenticated(&harness, &not_yet, "nbf in the future").await;
    let wrong_issuer = sign(&harness, hs256(), claims(json!({"iss": "someone-else"})));
    assert_unauthenticated(&harness, &wrong_issuer, "wrong iss").await;
    let mut unknown_kid = hs256();
    unknown_kid.kid = Some("no-such-key".into());
    let unknown_kid = sign(&harness, unknown_kid, claims(json!({})));
    assert_unauthenticated(&harness, &unknown_kid, "unknown kid").await;
    let forged = encode(
        &hs256(),
        &claims(json!({})),
        &EncodingKey::from_secret(b"not-the-key-not-the-key-not-the-key"),
    )
    .unwrap();
    assert_unauthenticated(&harness, &forged, "bad signature").await;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT", "kid": "demo-hmac"})),
        b64(claims(json!({})))
    );
    assert_unauthenticated(&harness, &alg_none, "alg none").await;
    let mut hs512 = hs256();
    hs512.alg = Algorithm::HS512;
    let wrong_alg = sign(&harness, hs512, claims(json!({})));
    assert_unauthenticated(
        &harness,
        &wrong_alg,
        "algorithm outside the key's allow-list",
    )
    .await;

    // A valid token of a service no policy names.
    let stranger = sign(&harness, hs256(), claims(json!({"sub": "stranger"})));
    let response = get_with(&harness, &stranger, "alice").await;
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "caller_forbidden");

    let after = harness.control.stats().await.unwrap();
    assert_eq!(after.token_requests, before.token_requests);
    assert_eq!(after.rest_requests, before.rest_requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_bound_tokens_act_only_for_their_user_and_routes_are_enforced() {
    let harness = Harness::with(SimConfig::default().with_control(), with_bff_and_limited);
    harness.seed_user("alice").await;
    harness.seed_user("bob").await;
    let alice_bff = sign(
        &harness,
        hs256(),
        json!({"iss": "demo", "sub": "bff", "user": "alice", "exp": now() + 300}),
    );
    assert_eq!(get_with(&harness, &alice_bff, "alice").await.status(), 200);
    let before = harness.control.stats().await.unwrap();
    let response = get_with(&harness, &alice_bff, "bob").await;
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "caller_forbidden");

    // The demo service may not POST to /rest.
    let response = harness
        .request(reqwest::Method::POST, "/rest/accounts")
        .header("x-finx-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "caller_forbidden");
    let after = harness.control.stats().await.unwrap();
    assert_eq!(after.rest_requests, before.rest_requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_its_rate_gets_429() {
    let harness = Harness::with(SimConfig::default().with_control(), with_bff_and_limited);
    harness.seed_user("alice").await;
    let limited = sign(
        &harness,
        hs256(),
        json!({"iss": "demo", "sub": "limited", "exp": now() + 300}),
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            get_with(&harness, &limited, "alice")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_credentials_all_get_401() {
    let harness = Harness::start();
    harness.seed_user("alice").await;
    let valid = harness.caller_token.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ,;:\"'{}[]%!*"
            .chars()
            .collect();
    let mut headers = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let random: String = (0..rng.random_range(0..300))
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        let header = match i % 6 {
            0 => format!("Bearer {random}"),
            1 => random,
            2 => format!("Bearer {}", &valid[..rng.random_range(0..valid.len())]),
            3 => {
                let mut bytes = valid.clone().into_bytes();
                // Not the last character: its low bits are base64 padding a decoder may ignore.
                let at = rng.random_range(0..bytes.len() - 1);
                bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
                format!("Bearer {}", String::from_utf8(bytes).unwrap())
            }
            4 => format!("Basic {random}"),
            _ => format!("bearer {}.{}.{}", random, random.len(), random),
        };
        headers.push(header.trim().to_owned());
    }
    for chunk in headers.chunks(64) {
        let responses = join_all(chunk.iter().map(|value| {
            harness
                .http
                .get(harness.url("/rest/accounts"))
                .header("authorization", value.as_str())
                .header("x-finx-user", "alice")
                .send()
        }))
        .await;
        for (value, response) in chunk.iter().zip(responses) {
            let status = response.expect("gateway answers").status();
            assert_eq!(status, 401, "credential {value:?}");
        }
    }
    // The gateway is still healthy.
    assert_eq!(
        harness.get_as("alice", "/rest/accounts").await.status(),
        200
    );
}
