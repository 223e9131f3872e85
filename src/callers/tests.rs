//! End-to-end tests of authentication and policy through the public API.
//!
//! Asymmetric test keys are generated with the `openssl` CLI once per test process, so no key
//! material is committed.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::*;

const NOW: i64 = 1_750_000_000;
const HMAC_SECRET: &str = "test-only-hmac-secret-0123456789abcdef";

/// PEM pairs (private PKCS#8, public SPKI) made by openssl.
struct TestKeys {
    rsa: (Vec<u8>, Vec<u8>),
    ec: (Vec<u8>, Vec<u8>),
    ed_a: (Vec<u8>, Vec<u8>),
    ed_b: (Vec<u8>, Vec<u8>),
}

fn generate(args: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("key.pem");
    let public = dir.path().join("key.pub.pem");
    let status = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&private)
        .status()
        .expect("the openssl CLI is needed to generate test keys");
    assert!(status.success());
    let status = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(status.success());
    (
        std::fs::read(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

fn test_keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys {
        rsa: generate(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ec: generate(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        ed_a: generate(&["-algorithm", "ED25519"]),
        ed_b: generate(&["-algorithm", "ED25519"]),
    })
}

/// The JWK `x` of an Ed25519 SPKI PEM: its last 32 bytes.
fn ed_jwk(kid: &str, public_pem: &[u8]) -> Value {
    let text = std::str::from_utf8(public_pem).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let x = URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]);
    json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "x": x })
}

/// A temp dir with the secret and PEM files a standard config refers to.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let keys = test_keys();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("hmac.secret"), format!("{HMAC_SECRET}\n")).unwrap();
        std::fs::write(p.join("rsa.pub.pem"), &keys.rsa.1).unwrap();
        std::fs::write(p.join("ec.pub.pem"), &keys.ec.1).unwrap();
        std::fs::write(p.join("ed.pub.pem"), &keys.ed_a.1).unwrap();
        let jwks = json!({ "keys": [ed_jwk("jwks-1", &keys.ed_a.1)] });
        std::fs::write(p.join("jwks.json"), jwks.to_string()).unwrap();
        Fixture { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn auth(&self, toml_text: &str) -> CallerAuth {
        let file: CallersFile = toml::from_str(toml_text).unwrap();
        CallerAuth::from_file(&file, self.path()).unwrap()
    }
}

const CONFIG: &str = r#"
issuer = ["https://auth.internal"]
audience = ["finx-gateway"]
jwks_file = "jwks.json"
jwks_algorithms = ["EdDSA"]
jwks_poll_interval_ms = 0

[[keys]]
kid = "hmac-1"
algorithms = ["HS256"]
secret = { file = "hmac.secret" }

[[keys]]
kid = "rsa-1"
algorithms = ["RS256", "PS256"]
public_key_pem = "rsa.pub.pem"

[[keys]]
kid = "ec-1"
algorithms = ["ES256"]
public_key_pem = "ec.pub.pem"

[[keys]]
kid = "ed-1"
algorithms = ["EdDSA"]
public_key_pem = "ed.pub.pem"

[[services]]
name = "ledger"
issuer = "https://auth.internal"
subject = "svc-ledger"
connections = ["any"]
routes = ["GET /rest/**", "* /category-tree"]
flows = ["ongoing/access"]

[[services]]
name = "bff"
issuer = "https://auth.internal"
subject = "svc-bff"
keys = ["hmac-1", "jwks-1", "jwks-2"]
connections = ["claim:user_id", "team-a-*"]
routes = ["GET /rest/**", "POST /ongoing/access"]
flows = ["ongoing/access", "onetime/income-report"]
rate_limit = { per_second = 1, burst = 2 }
"#;

fn claims(sub: &str) -> Map<String, Value> {
    let value = json!({
        "iss": "https://auth.internal",
        "sub": sub,
        "aud": "finx-gateway",
        "exp": NOW + 300,
        "iat": NOW,
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    claims: &Map<String, Value>,
    key: &EncodingKey,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn hs(claims: &Map<String, Value>) -> String {
    sign(
        Algorithm::HS256,
        Some("hmac-1"),
        claims,
        &EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    )
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

fn refusal(auth: &CallerAuth, token: &str) -> AuthError {
    auth.authenticate(&bearer(token), NOW).unwrap_err()
}

fn unauthenticated(reason: &'static str) -> AuthError {
    AuthError::Unauthenticated { reason }
}

#[test]
fn valid_hmac_token_authenticates_and_exposes_identity() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let caller = auth
        .authenticate(&bearer(&hs(&claims("svc-ledger"))), NOW)
        .unwrap();
    assert_eq!(caller.iss(), "https://auth.internal");
    assert_eq!(caller.sub(), "svc-ledger");
    assert_eq!(caller.service(), "ledger");
    assert!(!caller.used_proxy_authorization());
    assert!(caller.authorize_user("anyone").is_ok());
    assert!(caller
        .authorize_route(&Method::GET, "/rest/v1/accounts")
        .is_ok());
    assert!(caller
        .authorize_route(&Method::PATCH, "/category-tree")
        .is_ok());
    assert!(caller.authorize_flow("ongoing/access").is_ok());
    assert!(caller.check_rate().is_ok());
}

#[test]
fn asymmetric_keys_from_pem_verify() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let keys = test_keys();
    let rsa = EncodingKey::from_rsa_pem(&keys.rsa.0).unwrap();
    let ec = EncodingKey::from_ec_pem(&keys.ec.0).unwrap();
    let ed = EncodingKey::from_ed_pem(&keys.ed_a.0).unwrap();
    let c = claims("svc-ledger");
    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::PS256, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-1", &ec),
        (Algorithm::EdDSA, "ed-1", &ed),
    ] {
        let token = sign(alg, Some(kid), &c, key);
        let caller = auth.authenticate(&bearer(&token), NOW);
        assert!(caller.is_ok(), "{alg:?}: {caller:?}");
    }
    // RS512 is an RSA algorithm but not in rsa-1's allow-list.
    let token = sign(Algorithm::RS512, Some("rsa-1"), &c, &rsa);
    assert_eq!(
        refusal(&auth, &token),
        AuthError::Unauthenticated {
            reason: "algorithm not allowed"
        }
    );
}

#[test]
fn time_issuer_and_audience_checks() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let check = |edit: &dyn Fn(&mut Map<String, Value>)| {
        let mut c = claims("svc-ledger");
        edit(&mut c);
        auth.authenticate(&bearer(&hs(&c)), NOW)
    };
    assert_eq!(
        check(&|c| {
            c.insert("exp".into(), json!(NOW - 31));
        })
        .unwrap_err(),
        unauthenticated("expired")
    );
    // Within the default 30 s leeway.
    assert!(check(&|c| {
        c.insert("exp".into(), json!(NOW - 10));
    })
    .is_ok());
    assert_eq!(
        check(&|c| {
            c.remove("exp");
        })
        .unwrap_err(),
        unauthenticated("missing exp")
    );
    assert_eq!(
        check(&|c| {
            c.insert("exp".into(), json!("soon"));
        })
        .unwrap_err(),
        unauthenticated("invalid token")
    );
    assert_eq!(
        check(&|c| {
            c.insert("nbf".into(), json!(NOW + 120));
        })
        .unwrap_err(),
        unauthenticated("not yet valid")
    );
    assert!(check(&|c| {
        c.insert("nbf".into(), json!(NOW + 20));
    })
    .is_ok());
    assert_eq!(
        check(&|c| {
            c.insert("aud".into(), json!("someone-else"));
        })
        .unwrap_err(),
        unauthenticated("wrong audience")
    );
    assert!(check(&|c| {
        c.insert("aud".into(), json!(["x", "finx-gateway"]));
    })
    .is_ok());
    assert_eq!(
        check(&|c| {
            c.remove("aud");
        })
        .unwrap_err(),
        unauthenticated("wrong audience")
    );
    assert_eq!(
        check(&|c| {
            c.insert("iss".into(), json!("https://evil"));
        })
        .unwrap_err(),
        unauthenticated("wrong issuer")
    );
    assert_eq!(
        check(&|c| {
            c.remove("iss");
        })
        .unwrap_err(),
        unauthenticated("missing iss")
    );
}

#[test]
fn max_token_age_requires_iat() {
    let fixture = Fixture::new();
    let auth = fixture.auth(&format!(
        "max_token_age_secs = 60\nleeway_secs = 0\n{CONFIG}"
    ));
    let mut c = claims("svc-ledger");
    assert!(auth.authenticate(&bearer(&hs(&c)), NOW + 60).is_ok());
    assert_eq!(
        auth.authenticate(&bearer(&hs(&c)), NOW + 61).unwrap_err(),
        AuthError::Unauthenticated {
            reason: "token too old"
        }
    );
    c.remove("iat");
    assert_eq!(
        auth.authenticate(&bearer(&hs(&c)), NOW).unwrap_err(),
        AuthError::Unauthenticated {
            reason: "missing iat"
        }
    );
}

#[test]
fn bad_signature_is_rejected() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let forged = sign(
        Algorithm::HS256,
        Some("hmac-1"),
        &claims("svc-ledger"),
        &EncodingKey::from_secret(b"another-secret-that-is-long-enough-xx"),
    );
    assert_eq!(
        refusal(&auth, &forged),
        AuthError::Unauthenticated {
            reason: "bad signature"
        }
    );
    // A valid token with its payload swapped keeps the old signature.
    let valid = hs(&claims("svc-ledger"));
    let parts: Vec<&str> = valid.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("svc-bff")).unwrap());
    let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
    assert_eq!(
        refusal(&auth, &tampered),
        AuthError::Unauthenticated {
            reason: "bad signature"
        }
    );
}

#[test]
fn alg_none_is_rejected() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"hmac-1"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("svc-ledger")).unwrap());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        let err = refusal(&auth, &token);
        assert!(matches!(err, AuthError::Unauthenticated { .. }), "{err:?}");
    }
}

#[test]
fn hmac_with_rsa_public_key_as_secret_is_rejected() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let public_pem = &test_keys().rsa.1;
    let confused = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &claims("svc-ledger"),
        &EncodingKey::from_secret(public_pem),
    );
    assert_eq!(
        refusal(&auth, &confused),
        AuthError::Unauthenticated {
            reason: "algorithm not allowed"
        }
    );
}

#[test]
fn unknown_or_missing_kid_is_rejected() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let key = EncodingKey::from_secret(HMAC_SECRET.as_bytes());
    for kid in [Some("nope"), None] {
        let token = sign(Algorithm::HS256, kid, &claims("svc-ledger"), &key);
        assert_eq!(
            refusal(&auth, &token),
            AuthError::Unauthenticated {
                reason: "unknown key"
            }
        );
    }
}

#[test]
fn token_without_kid_uses_the_only_key() {
    let fixture = Fixture::new();
    let single = r#"
[[keys]]
kid = "only"
algorithms = ["HS256"]
secret = { file = "hmac.secret" }
[[services]]
name = "s"
issuer = "https://auth.internal"
subject = "svc-ledger"
keys = ["only"]
connections = ["any"]
routes = ["GET /**"]
"#;
    let auth = fixture.auth(single);
    let key = EncodingKey::from_secret(HMAC_SECRET.as_bytes());
    let token = sign(Algorithm::HS256, None, &claims("svc-ledger"), &key);
    assert_eq!(
        auth.authenticate(&bearer(&token), NOW).unwrap().service(),
        "s"
    );
}

#[test]
fn jwks_rotation_is_picked_up_by_mtime() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let keys = test_keys();
    let new_key = EncodingKey::from_ed_pem(&keys.ed_b.0).unwrap();
    let token = sign(
        Algorithm::EdDSA,
        Some("jwks-2"),
        &claims("svc-bff"),
        &new_key,
    );
    assert_eq!(
        refusal(&auth, &token),
        AuthError::Unauthenticated {
            reason: "unknown key"
        }
    );

    let path = fixture.path().join("jwks.json");
    let rotated = json!({ "keys": [ed_jwk("jwks-2", &keys.ed_b.1)] });
    std::fs::write(&path, rotated.to_string()).unwrap();
    let later = SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later)
        .unwrap();

    // Poll interval is 0 in this config, so this request notices the new mtime itself.
    let caller = auth.authenticate(&bearer(&token), NOW).unwrap();
    assert_eq!(caller.service(), "bff");
    let old_key = EncodingKey::from_ed_pem(&keys.ed_a.0).unwrap();
    let old = sign(
        Algorithm::EdDSA,
        Some("jwks-1"),
        &claims("svc-bff"),
        &old_key,
    );
    assert_eq!(
        refusal(&auth, &old),
        AuthError::Unauthenticated {
            reason: "unknown key"
        }
    );

    // A broken rewrite keeps the last good keys.
    std::fs::write(&path, "{ not json").unwrap();
    auth.reload_jwks_now();
    assert!(auth.authenticate(&bearer(&token), NOW).is_ok());
}

#[test]
fn claim_bound_user_and_prefixes() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let mut c = claims("svc-bff");
    c.insert("user_id".into(), json!("user-42"));
    let caller = auth.authenticate(&bearer(&hs(&c)), NOW).unwrap();
    assert!(caller.authorize_user("user-42").is_ok());
    assert!(caller.authorize_user("team-a-7").is_ok());
    assert_eq!(
        caller.authorize_user("user-43").unwrap_err(),
        AuthError::Forbidden {
            reason: "user not allowed"
        }
    );
    assert!(caller.authorize_user("").is_err());
}

#[test]
fn route_and_flow_not_allowed() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let caller = auth
        .authenticate(&bearer(&hs(&claims("svc-bff"))), NOW)
        .unwrap();
    assert!(caller
        .authorize_route(&Method::POST, "/ongoing/access")
        .is_ok());
    assert_eq!(
        caller
            .authorize_route(&Method::DELETE, "/rest/v1/x")
            .unwrap_err(),
        AuthError::Forbidden {
            reason: "route not allowed"
        }
    );
    assert_eq!(
        caller
            .authorize_route(&Method::GET, "/category-tree")
            .unwrap_err(),
        AuthError::Forbidden {
            reason: "route not allowed"
        }
    );
    assert!(caller.authorize_flow("onetime/income-report").is_ok());
    assert_eq!(
        caller.authorize_flow("onetime/account-check").unwrap_err(),
        AuthError::Forbidden {
            reason: "flow not allowed"
        }
    );
}

#[test]
fn unmatched_caller_and_disallowed_key_are_forbidden() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    assert_eq!(
        auth.authenticate(&bearer(&hs(&claims("svc-unknown"))), NOW)
            .unwrap_err(),
        AuthError::Forbidden {
            reason: "no policy for this caller"
        }
    );
    // bff only trusts hmac-1 and its JWKS keys, not the RSA key.
    let rsa = EncodingKey::from_rsa_pem(&test_keys().rsa.0).unwrap();
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims("svc-bff"), &rsa);
    assert_eq!(
        refusal(&auth, &token),
        AuthError::Forbidden {
            reason: "key not allowed for this caller"
        }
    );
}

#[test]
fn rate_limit_per_service() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let caller = auth
        .authenticate(&bearer(&hs(&claims("svc-bff"))), NOW)
        .unwrap();
    // 1 per second with a burst of 2, on the real clock: the third request comes well within
    // the second that refills one.
    assert!(caller.check_rate().is_ok());
    assert!(caller.check_rate().is_ok());
    assert_eq!(
        caller.check_rate().unwrap_err(),
        AuthError::RateLimited {
            retry_after_secs: 1
        }
    );
    // The limit belongs to the service, not to one Caller value.
    let again = auth
        .authenticate(&bearer(&hs(&claims("svc-bff"))), NOW)
        .unwrap();
    assert!(again.check_rate().is_err());
}

#[test]
fn proxy_authorization_wins() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    let token = hs(&claims("svc-ledger"));
    headers.insert(
        PROXY_AUTHORIZATION,
        HeaderValue::from_str(&format!("bearer {token}")).unwrap(),
    );
    let caller = auth.authenticate(&headers, NOW).unwrap();
    assert!(caller.used_proxy_authorization());

    headers.remove(PROXY_AUTHORIZATION);
    assert_eq!(
        auth.authenticate(&headers, NOW).unwrap_err(),
        AuthError::Unauthenticated {
            reason: "not a bearer credential"
        }
    );
    assert_eq!(
        auth.authenticate(&HeaderMap::new(), NOW).unwrap_err(),
        AuthError::Unauthenticated {
            reason: "missing credential"
        }
    );
    let mut twice = bearer(&token);
    twice.append(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    assert_eq!(
        auth.authenticate(&twice, NOW).unwrap_err(),
        AuthError::Unauthenticated {
            reason: "ambiguous credential"
        }
    );
}

#[test]
fn custom_header_accepts_bare_token() {
    let fixture = Fixture::new();
    let auth = fixture.auth(&format!("header = \"X-Caller-Token\"\n{CONFIG}"));
    let token = hs(&claims("svc-ledger"));
    let mut headers = HeaderMap::new();
    headers.insert("x-caller-token", HeaderValue::from_str(&token).unwrap());
    assert!(auth.authenticate(&headers, NOW).is_ok());
    // The default header is no longer consulted.
    assert!(auth.authenticate(&bearer(&token), NOW).is_err());
}

#[test]
fn trusted_local_only_on_loopback() {
    let fixture = Fixture::new();
    let local = r#"
mode = "trusted-local"
[trusted_local]
service = "dev"
[[services]]
name = "dev"
issuer = "local"
subject = "developer"
connections = ["any"]
routes = ["* /**"]
flows = ["ongoing/access"]
"#;
    let settings = CallerSettings::check(&toml::from_str(local).unwrap(), fixture.path()).unwrap();
    assert!(settings.check_listener("0.0.0.0:8080").is_err());
    assert!(settings.check_listener("127.0.0.1:8080").is_ok());
    assert!(settings.check_listener("/run/finx-gateway.sock").is_ok());
    let auth = fixture.auth(local);
    assert!(auth.is_trusted_local());
    let caller = auth.authenticate(&HeaderMap::new(), NOW).unwrap();
    assert_eq!(
        (caller.iss(), caller.sub(), caller.service()),
        ("local", "developer", "dev")
    );
    assert!(caller.authorize_user("user-1").is_ok());

    let jwt = CallerSettings::check(&toml::from_str(CONFIG).unwrap(), fixture.path()).unwrap();
    assert!(jwt.check_listener("0.0.0.0:8080").is_ok());
}

#[test]
fn malformed_credentials_never_panic() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let valid = hs(&claims("svc-ledger"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";
    let mut checked = 0;
    for round in 0..10_000 {
        let value: Vec<u8> = match round % 4 {
            0 => (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect(),
            1 => {
                let segments = rng.random_range(1..5);
                let parts: Vec<String> = (0..segments)
                    .map(|_| {
                        let raw: Vec<u8> =
                            (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
                        URL_SAFE_NO_PAD.encode(raw)
                    })
                    .collect();
                format!("Bearer {}", parts.join(".")).into_bytes()
            }
            2 => {
                let cut = rng.random_range(0..valid.len());
                format!("Bearer {}", &valid[..cut]).into_bytes()
            }
            _ => {
                let text: Vec<u8> = (0..rng.random_range(0..120))
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect();
                [b"Bearer ".as_slice(), &text].concat()
            }
        };
        let Ok(header) = HeaderValue::from_bytes(&value) else {
            continue;
        };
        let mut headers = HeaderMap::new();
        let name = if round % 2 == 0 {
            AUTHORIZATION
        } else {
            PROXY_AUTHORIZATION
        };
        headers.insert(name, header);
        let outcome = auth.authenticate(&headers, NOW);
        assert!(
            matches!(outcome, Err(AuthError::Unauthenticated { .. })),
            "round {round}: {outcome:?}"
        );
        checked += 1;
    }
    assert!(
        checked > 5_000,
        "only {checked} inputs were valid header values"
    );
}

#[test]
fn config_validation_reports_every_error() {
    let fixture = Fixture::new();
    let bad = r#"
mode = "jwt-ish"
leeway_secs = 9999
jwks_algorithms = ["RS256"]

[[keys]]
kid = "weak"
algorithms = ["HS256"]
secret = { file = "missing.secret" }

[[keys]]
kid = "mixed"
algorithms = ["HS256", "RS256"]
public_key_pem = "rsa.pub.pem"

[[keys]]
kid = "none"
algorithms = ["none"]
secret = { env = "FINX_GATEWAY_TEST_SURELY_UNSET" }

[[keys]]
kid = "hmac-with-pem"
algorithms = ["HS512"]
public_key_pem = "rsa.pub.pem"

[[services]]
name = "s"
issuer = ""
subject = "x"
connections = ["*"]
routes = ["GET rest"]
flows = ["bad flow"]
rate_limit = { per_second = 0 }
"#;
    let file: CallersFile = toml::from_str(bad).unwrap();
    let errors = CallerAuth::from_file(&file, fixture.path()).unwrap_err();
    let joined = errors.join("\n");
    // Key "weak" is well-formed: its missing file is the I/O step's to find, which only runs on
    // a valid table (see `check_reads_nothing_and_resolve_names_what_it_cannot_read`).
    assert!(!joined.contains("missing.secret"), "{joined}");
    for expected in [
        "callers.mode",
        "leeway_secs",
        "jwks_algorithms is set without",
        "mix key families",
        "\"none\" is never accepted",
        "need a secret",
        "issuer is empty",
        "write \"any\"",
        "GET rest",
        "bad flow",
        "rate_limit",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    assert!(errors.len() >= 11, "{joined}");
}

#[test]
fn check_reads_nothing_and_resolve_names_what_it_cannot_read() {
    let fixture = Fixture::new();
    let unreadable = r#"
jwks_file = "missing-jwks.json"
jwks_algorithms = ["EdDSA"]

[[keys]]
kid = "file-secret"
algorithms = ["HS256"]
secret = { file = "missing.secret" }

[[keys]]
kid = "env-secret"
algorithms = ["HS256"]
secret = { env = "FINX_GATEWAY_TEST_SURELY_UNSET" }

[[keys]]
kid = "pem"
algorithms = ["RS256"]
public_key_pem = "missing.pub.pem"

[[services]]
name = "s"
issuer = "i"
subject = "x"
connections = ["any"]
routes = ["GET /**"]
"#;
    let file: CallersFile = toml::from_str(unreadable).unwrap();
    // None of the files exists and the variable is unset: passing proves nothing was read.
    let settings = CallerSettings::check(&file, fixture.path()).unwrap();
    let errors = CallerAuth::resolve(settings).unwrap_err();
    let joined = errors.join("\n");
    assert_eq!(errors.len(), 4, "{joined}");
    for expected in [
        fixture.path().join("missing.secret").display().to_string(),
        "FINX_GATEWAY_TEST_SURELY_UNSET".to_owned(),
        fixture.path().join("missing.pub.pem").display().to_string(),
        fixture
            .path()
            .join("missing-jwks.json")
            .display()
            .to_string(),
    ] {
        assert!(
            joined.contains(&expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    // `from_file` is the same two steps.
    assert_eq!(
        CallerAuth::from_file(&file, fixture.path()).unwrap_err(),
        errors
    );
}

#[test]
fn config_refuses_short_hmac_secret_and_unknown_fields() {
    let fixture = Fixture::new();
    std::fs::write(fixture.path().join("short"), "too-short").unwrap();
    let short = r#"
[[keys]]
kid = "k"
algorithms = ["HS256"]
secret = { file = "short" }
[[services]]
name = "s"
issuer = "i"
subject = "x"
connections = ["any"]
routes = ["GET /**"]
"#;
    let file: CallersFile = toml::from_str(short).unwrap();
    let errors = CallerAuth::from_file(&file, fixture.path()).unwrap_err();
    assert!(errors[0].contains("shorter than 32 bytes"), "{errors:?}");
    assert!(!errors[0].contains("too-short"));
    assert!(toml::from_str::<CallersFile>("secret_inline = \"x\"").is_err());
}

#[test]
fn mint_round_trips_and_debug_hides_secrets() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let mut extra = Map::new();
    extra.insert("user_id".into(), json!("user-7"));
    extra.insert("exp".into(), json!(0));
    let token = auth
        .mint(
            "hmac-1",
            "https://auth.internal",
            "svc-bff",
            Some("finx-gateway"),
            Duration::from_secs(600),
            extra,
        )
        .unwrap();
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let caller = auth.authenticate(&bearer(&token), now).unwrap();
    assert!(caller.authorize_user("user-7").is_ok());
    assert!(matches!(
        auth.mint("rsa-1", "i", "s", None, Duration::from_secs(60), Map::new()),
        Err(MintError::UnknownKey(_))
    ));

    let debug = format!("{auth:?} {caller:?}");
    assert!(!debug.contains(HMAC_SECRET), "{debug}");
    assert!(!debug.contains(&token));
    assert!(!debug.contains("user-7"));
}

#[test]
fn www_authenticate_values() {
    let missing = AuthError::Unauthenticated {
        reason: "missing credential",
    };
    assert_eq!(
        missing.www_authenticate().as_deref(),
        Some("Bearer realm=\"finx-gateway\"")
    );
    let expired = AuthError::Unauthenticated { reason: "expired" };
    assert_eq!(
        expired.www_authenticate().as_deref(),
        Some(
            "Bearer realm=\"finx-gateway\", error=\"invalid_token\", error_description=\"expired\""
        )
    );
    let forbidden = AuthError::Forbidden {
        reason: "route not allowed",
    };
    assert_eq!(forbidden.www_authenticate(), None);
    let limited = AuthError::RateLimited {
        retry_after_secs: 1,
    };
    assert_eq!(limited.www_authenticate(), None);
}

#[test]
fn a_remembered_verification_never_outlives_the_tokens_time_window() {
    let fixture = Fixture::new();
    let auth = fixture.auth(CONFIG);
    let mut c = claims("svc-ledger");
    c.insert("nbf".into(), json!(NOW - 5));
    let token = hs(&c);
    // Verified once (and remembered), then presented around the edges of its window.
    assert!(auth.authenticate(&bearer(&token), NOW).is_ok());
    assert!(auth.authenticate(&bearer(&token), NOW + 300 + 29).is_ok());
    assert_eq!(
        auth.authenticate(&bearer(&token), NOW + 300 + 30)
            .unwrap_err(),
        unauthenticated("expired")
    );
    assert_eq!(
        auth.authenticate(&bearer(&token), NOW - 5 - 31)
            .unwrap_err(),
        unauthenticated("not yet valid")
    );
    // The proxy-header flag belongs to the request, not to the remembered token.
    let mut headers = HeaderMap::new();
    headers.insert(
        PROXY_AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    assert!(auth
        .authenticate(&headers, NOW)
        .unwrap()
        .used_proxy_authorization());
    assert!(!auth
        .authenticate(&bearer(&token), NOW)
        .unwrap()
        .used_proxy_authorization());
}
