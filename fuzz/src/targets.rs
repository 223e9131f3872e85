//! The fuzz targets: every parser that sees bytes from a caller (or from finX, or from an
//! operator's config file), each a function that panics when one of its invariants breaks.
//!
//! This file is compiled twice: by the `fuzz/` crate, whose `cargo fuzz` targets (libFuzzer,
//! nightly) call these functions, and by `tests/fuzz_targets.rs` in the gateway's own suite,
//! which runs every target over its seed corpus in `fuzz/corpus/<target>/` plus generated
//! inputs on stable. So it may use only the gateway and crates the gateway itself depends on.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use finx_gateway::callers::{CallerAuth, CallersFile, KeyFile, ServiceFile, TrustedLocalFile};
use finx_gateway::config::{Config, ConfigFile};
use finx_gateway::connect::callback::CallbackQuery;
use finx_gateway::connect::state::{FlowState, StateSigner};
use finx_gateway::proxy::routes::{self, Route};
use finx_gateway::secret::SecretRef;
use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::ConnectionKey;
use finx_gateway::tokens::client::{classify_error, parse_grant};
use finx_gateway::tokens::TokenFailure;
use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};

/// The fixed "now" every target judges time against.
pub const NOW: i64 = 1_900_000_000;
/// The fixtures' caller key (HS256) and flow-state key: test keys, not secrets.
pub const CALLER_KEY: &str = "fuzz-caller-key-0123456789abcdef0123456789abcdef";
pub const STATE_KEY: &str = "fuzz-state-key-0123456789abcdef0123456789abcdef";
/// The caller policy the JWT target authenticates against.
pub const CALLER_KID: &str = "fuzz-hmac";
pub const CALLER_ISS: &str = "fuzz";
pub const CALLER_SUB: &str = "fuzz-caller";

/// The target names, as directories of `fuzz/corpus/` and binaries of `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 5] = ["route", "jwt", "callback", "token_answer", "config"];

/// Runs the target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "route" => route(data),
        "jwt" => jwt(data),
        "callback" => callback(data),
        "token_answer" => token_answer(data),
        "config" => config(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// route: raw request target → route classification, the /auth guard and route policies

/// Route patterns each checked on its own (a policy with that one route).
const PATTERNS: [&str; 6] = [
    "GET /rest/accounts/**",
    "GET /rest/accounts/*/transactions",
    "GET /rest/accounts",
    "GET /rest/*/balances",
    "GET /category-tree",
    "GET /payment-receipts/*",
];

/// A raw request target (as pingora hands it over) through the gateway's path judgement.
///
/// - Whatever is accepted, no lenient reading of it (see [`readings`]) names `/auth`.
/// - Whatever is forwarded keeps its shape under every reading: as many segments, none of them
///   a dot segment, so a policy pattern that matched it as sent matches every reading too.
/// - Differential: the `url` crate's resolution (WHATWG) of a forwarded path changes none of
///   its segments, and a path that it resolves to `/auth` is never accepted.
pub fn route(data: &[u8]) {
    let Ok(routes::Target { path, .. }) = routes::split_target(data) else {
        return;
    };
    let verdict = routes::classify(path, "/callback");
    let readings = readings(path);
    if let Some(reading) = readings.iter().find(|r| names_auth(r)) {
        assert!(
            verdict.is_err(),
            "{path:?} was accepted as {verdict:?}, but reads as {reading:?}"
        );
    }
    let forwarded = matches!(verdict, Ok(Route::UserData | Route::ClientData));
    if forwarded {
        let sent: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for reading in &readings {
            let resolved = resolve(reading);
            assert_eq!(
                resolved.len(),
                sent.len(),
                "{path:?} is forwarded, but reads as {reading:?} = {resolved:?}"
            );
        }
        for (pattern, caller) in policies() {
            if caller.authorize_route(&Method::GET, path).is_err() {
                continue;
            }
            for reading in &readings {
                let resolved = resolve(reading);
                assert!(
                    pattern_matches(pattern, &resolved),
                    "{path:?} matched {pattern:?}, but reads as {reading:?} = {resolved:?}"
                );
            }
        }
    }
    differential_url(path, forwarded, &verdict);
}

/// Every reading a lenient server could take of a path: as sent, percent-decoded once or
/// twice, each then with any combination of Unicode folding (fullwidth forms to ASCII), `\` as
/// `/`, `;params` removed and case folding.
pub fn readings(path: &str) -> Vec<String> {
    let once = percent_decode_str(path).decode_utf8_lossy().into_owned();
    let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
    let mut readings = Vec::new();
    for base in [path.to_owned(), once, twice] {
        for mask in 0u8..16 {
            let mut reading = base.clone();
            if mask & 1 != 0 {
                reading = reading.chars().map(fold_fullwidth).collect();
            }
            if mask & 2 != 0 {
                reading = reading.replace('\\', "/");
            }
            if mask & 4 != 0 {
                reading = reading
                    .split('/')
                    .map(|segment| segment.split(';').next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("/");
            }
            if mask & 8 != 0 {
                reading = reading.to_lowercase();
            }
            readings.push(reading);
        }
    }
    readings.sort();
    readings.dedup();
    readings
}

/// A fullwidth ASCII variant (U+FF01..U+FF5E) as the ASCII character NFKC makes of it.
fn fold_fullwidth(c: char) -> char {
    match u32::from(c) {
        code @ 0xFF01..=0xFF5E => char::from_u32(code - 0xFEE0).unwrap_or(c),
        0x2024 | 0xFE52 => '.',
        0xFE68 => '\\',
        _ => c,
    }
}

/// The segments a lenient server serves for a reading: cut at `?` or `#` (a server that
/// decodes before splitting off the query), whitespace and control characters trimmed, empty
/// and `.` segments dropped, `..` (and Windows' `...`) climbing, trailing dots dropped.
pub fn resolve(reading: &str) -> Vec<String> {
    let reading = reading.split(['?', '#']).next().unwrap_or("");
    let mut resolved: Vec<String> = Vec::new();
    for segment in reading.split('/') {
        let segment = segment.trim_matches(|c: char| c.is_whitespace() || c.is_control());
        match segment {
            "" | "." => {}
            dots if dots.bytes().all(|b| b == b'.') => {
                resolved.pop();
            }
            other => resolved.push(other.trim_end_matches(['.', ' ']).to_owned()),
        }
    }
    resolved
}

fn names_auth(reading: &str) -> bool {
    resolve(reading)
        .first()
        .is_some_and(|first| first.eq_ignore_ascii_case("auth"))
}

/// Matches resolved segments against a pattern (`*` one segment, `**` the rest), literals
/// compared without case: the pattern's own reading of the path, independent of the gateway's.
fn pattern_matches(pattern: &str, resolved: &[String]) -> bool {
    let path = pattern.split_whitespace().nth(1).unwrap_or("/");
    let mut segments = resolved.iter();
    for piece in path.trim_start_matches('/').split('/') {
        match piece {
            "**" => return true,
            "*" => {
                if segments.next().is_none() {
                    return false;
                }
            }
            literal => {
                if !segments
                    .next()
                    .is_some_and(|s| s.eq_ignore_ascii_case(literal))
                {
                    return false;
                }
            }
        }
    }
    segments.next().is_none()
}

/// One trusted-local caller per pattern, to ask the gateway's own policy matcher.
fn policies() -> &'static [(&'static str, Caller)] {
    static POLICIES: OnceLock<Vec<(&'static str, Caller)>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        PATTERNS
            .iter()
            .map(|pattern| {
                let file = CallersFile {
                    mode: Some("trusted-local".into()),
                    trusted_local: Some(TrustedLocalFile {
                        service: "policy".into(),
                    }),
                    services: vec![service("policy", pattern)],
                    ..CallersFile::default()
                };
                let auth = CallerAuth::from_file(&file, fixtures())
                    .unwrap_or_else(|errors| panic!("policy fixture: {errors:?}"));
                let caller = auth
                    .authenticate(&HeaderMap::new(), NOW)
                    .unwrap_or_else(|error| panic!("policy fixture: {error}"));
                (*pattern, caller)
            })
            .collect()
    })
}

/// The gateway's caller type, named here so the policy table can hold it.
pub type Caller = finx_gateway::callers::Caller;

fn service(name: &str, route: &str) -> ServiceFile {
    ServiceFile {
        name: name.into(),
        issuer: CALLER_ISS.into(),
        subject: CALLER_SUB.into(),
        subject_claim: None,
        keys: None,
        connections: vec!["any".into()],
        routes: vec![route.into()],
        flows: Vec::new(),
        rate_limit: None,
    }
}

/// The `url` crate as the second, independent normaliser.
fn differential_url(
    path: &str,
    forwarded: bool,
    verdict: &Result<Route, finx_gateway::error::GatewayError>,
) {
    if !path.starts_with('/') {
        return;
    }
    let Ok(url) = url::Url::parse(&format!("http://gateway.invalid{path}")) else {
        return;
    };
    let theirs: Vec<String> = url
        .path_segments()
        .map(|segments| {
            segments
                .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if theirs
        .first()
        .is_some_and(|first| first.eq_ignore_ascii_case("auth"))
    {
        assert!(
            verdict.is_err(),
            "{path:?} was accepted as {verdict:?}; the url crate resolves it to {}",
            url.path()
        );
    }
    if forwarded {
        let ours: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        assert_eq!(
            theirs,
            ours,
            "{path:?} is forwarded, but the url crate reads it as {}",
            url.path()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// jwt: caller credential header → JWT verification

/// A caller credential header value through authentication. The first byte picks where the
/// rest goes: `Authorization`, `Proxy-Authorization` (next to a valid `Authorization`), or
/// `Authorization` twice. Only a token signed with the fixture key may pass, never two values.
pub fn jwt(data: &[u8]) {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let winner = match selector % 3 {
        0 => {
            headers.insert(AUTHORIZATION, value.clone());
            Some(value)
        }
        1 => {
            let valid = format!("Bearer {}", valid_caller_token());
            let valid = HeaderValue::from_str(&valid)
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer x"));
            headers.insert(AUTHORIZATION, valid);
            headers.insert(PROXY_AUTHORIZATION, value.clone());
            Some(value)
        }
        _ => {
            headers.append(AUTHORIZATION, value.clone());
            headers.append(AUTHORIZATION, value);
            None
        }
    };
    let outcome = caller_auth().authenticate(&headers, NOW);
    let Ok(caller) = outcome else {
        return;
    };
    let Some(winner) = winner else {
        panic!("two Authorization values were accepted: {headers:?}");
    };
    let text = winner.to_str().unwrap_or_default().trim();
    let token = match text.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => text[7..].trim_start(),
        _ => panic!("a credential without the Bearer scheme was accepted: {text:?}"),
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &DecodingKey::from_secret(CALLER_KEY.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|error| panic!("{token:?} was accepted but does not verify: {error}"))
    .claims;
    assert!(
        claims["exp"]
            .as_f64()
            .is_some_and(|exp| exp > (NOW - 30) as f64),
        "an expired token was accepted: {claims}"
    );
    assert_eq!(caller.service(), "fuzz-service");
    assert_eq!(caller.iss(), CALLER_ISS);
}

/// A caller token the fixture accepts at [`NOW`].
pub fn valid_caller_token() -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(CALLER_KID.into());
    let claims = serde_json::json!({
        "iss": CALLER_ISS,
        "sub": CALLER_SUB,
        "iat": NOW - 60,
        "exp": NOW + 3600,
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(CALLER_KEY.as_bytes()),
    )
    .unwrap_or_default()
}

fn caller_auth() -> &'static CallerAuth {
    static AUTH: OnceLock<CallerAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let file = CallersFile {
            issuer: Some(vec![CALLER_ISS.into()]),
            keys: vec![KeyFile {
                kid: CALLER_KID.into(),
                algorithms: vec!["HS256".into()],
                secret: Some(SecretRef::File(PathBuf::from("caller.key"))),
                public_key_pem: None,
            }],
            services: vec![service("fuzz-service", "GET /rest/**")],
            ..CallersFile::default()
        };
        CallerAuth::from_file(&file, fixtures())
            .unwrap_or_else(|errors| panic!("caller fixture: {errors:?}"))
    })
}

// ---------------------------------------------------------------------------------------------
// callback: connect callback query → parameters → flow state verification

const CALLBACK_PARAMETERS: [&str; 6] = ["state", "success", "code", "flow_id", "abort", "cancel"];

/// A callback query string through the gateway's parser and the state verification.
///
/// - A parameter the gateway reads is refused when repeated, and only then.
/// - The parsed query's `Debug` never shows the code.
/// - A state verifies only if it is signed with the fixture key and has not expired.
pub fn callback(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = CallbackQuery::parse(query);
    let repeated = CALLBACK_PARAMETERS.iter().any(|name| {
        url::form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == name)
            .count()
            > 1
    });
    assert_eq!(parsed.is_err(), repeated, "{query:?}: {parsed:?}");
    let Ok(parsed) = parsed else {
        return;
    };
    if let Some(code) = &parsed.code {
        let code = code.expose_secret();
        let elsewhere = [
            &parsed.state,
            &parsed.flow_id,
            &parsed.abort,
            &parsed.cancel,
        ]
        .iter()
        .any(|value| value.as_deref().is_some_and(|v| v.contains(code)));
        if code.len() >= 8 && !elsewhere {
            assert!(
                !format!("{parsed:?}").contains(code),
                "Debug shows the code"
            );
        }
    }
    let Some(state) = &parsed.state else {
        return;
    };
    let Ok(flow) = state_signer().verify(state, NOW) else {
        return;
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Value>(
        state,
        &DecodingKey::from_secret(STATE_KEY.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|error| panic!("{state:?} verified but its signature does not: {error}"));
    assert!(flow.exp > NOW, "an expired state verified: {flow:?}");
}

/// A flow state the fixture signer accepts at [`NOW`].
pub fn valid_state() -> String {
    let state = FlowState {
        kind: "ongoing/access".into(),
        user: Some("alice".into()),
        svc: "fuzz-service".into(),
        ru: "https://app.example/return".into(),
        st: Some("app-state".into()),
        iat: NOW - 10,
        exp: NOW + 600,
        jti: "fuzzjti0000000000000001".into(),
    };
    state_signer().sign(&state).unwrap_or_default()
}

fn state_signer() -> &'static StateSigner {
    static SIGNER: OnceLock<StateSigner> = OnceLock::new();
    SIGNER.get_or_init(|| StateSigner::new(&SecretString::from(STATE_KEY)))
}

// ---------------------------------------------------------------------------------------------
// token_answer: finX's token endpoint answer → grant or failure class

/// A token endpoint body through the success parser and the error classifier.
///
/// - A grant's expiry lies in `[NOW, NOW + 24 h]`, `NOW` exactly when it has no access token;
///   it has an access or a refresh token, and no empty refresh token.
/// - A grant's `Debug` shows neither token.
/// - An unreadable success body is a retryable failure that may have been processed.
/// - Only a 4xx answer can kill a grant (`invalid_grant`); a 429 or 503 is never processed.
pub fn token_answer(data: &[u8]) {
    match parse_grant(data, NOW) {
        Ok(grant) => {
            let access = grant.access.token.expose_secret();
            let refresh = grant.refresh_token.as_ref().map(|r| r.expose_secret());
            assert!(
                (NOW..=NOW + 24 * 3600).contains(&grant.access.expires_at),
                "expiry {} out of range",
                grant.access.expires_at
            );
            if access.is_empty() {
                assert_eq!(grant.access.expires_at, NOW);
                assert!(refresh.is_some(), "a grant with no token at all");
            }
            assert!(refresh.is_none_or(|r| !r.is_empty()));
            let shown = format!("{grant:?}");
            for secret in [Some(access), refresh].into_iter().flatten() {
                let in_scope = grant.scope.as_deref().is_some_and(|s| s.contains(secret));
                if secret.len() >= 8 && !in_scope {
                    assert!(!shown.contains(secret), "Debug shows a token");
                }
            }
        }
        Err(failure) => assert!(
            matches!(
                failure,
                TokenFailure::Unavailable {
                    not_processed: false,
                    ..
                }
            ),
            "{failure:?}"
        ),
    }
    for status in [400, 401, 403, 404, 429, 500, 502, 503] {
        let failure = classify_error(status, data, 7);
        if failure == TokenFailure::InvalidGrant {
            assert!((400..500).contains(&status), "{status} killed a grant");
        }
        if matches!(status, 429 | 503) {
            assert!(
                matches!(
                    failure,
                    TokenFailure::Unavailable {
                        not_processed: true,
                        retry_after_secs: 7,
                        ..
                    } | TokenFailure::Rejected("invalid_client")
                ),
                "{status}: {failure:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config: TOML → validated config

/// A config file through TOML parsing and validation, confined first (see [`confine`]) so
/// that validation reads only fixture files and resolves no name over the network.
///
/// - Validation either succeeds or names at least one problem.
/// - A valid config's services all have names a connection key can carry, its refresh skew is
///   under an hour and its state key has at least 32 bytes.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut file) = toml::from_str::<ConfigFile>(text) else {
        return;
    };
    confine(&mut file);
    match Config::from_file(&file, fixtures()) {
        Ok(config) => {
            for service in &file.callers.services {
                assert!(
                    ConnectionKey::flow(&service.name, "flow").is_ok(),
                    "service name {:?} was accepted",
                    service.name
                );
            }
            assert!(config.tokens.refresh_skew.as_secs() < 3600);
            if let Some(connect) = &config.connect {
                assert!(connect.state_key.expose_secret().len() >= 32);
            }
        }
        Err(errors) => assert!(!errors.0.is_empty(), "refused without a reason"),
    }
}

/// Keeps validation local: every file reference becomes a file name in the fixture directory,
/// environment references other than `FINX_FUZZ_*` an unset variable, and a base URL host that
/// is not an IP address or `localhost` becomes 127.0.0.1.
pub fn confine(file: &mut ConfigFile) {
    fn local(path: &mut PathBuf) {
        *path = PathBuf::from(path.file_name().unwrap_or("missing".as_ref()));
    }
    fn secret(reference: &mut Option<SecretRef>) {
        match reference {
            Some(SecretRef::File(path)) => local(path),
            Some(SecretRef::Env(name)) if !name.starts_with("FINX_FUZZ_") => {
                *name = "FINX_FUZZ_UNSET".into();
            }
            _ => {}
        }
    }
    if let Some(base) = &file.upstream.base_url {
        if let Ok(mut url) = url::Url::parse(base) {
            if matches!(url.host(), Some(url::Host::Domain(d)) if d != "localhost") {
                let _ = url.set_host(Some("127.0.0.1"));
                file.upstream.base_url = Some(url.into());
            }
        }
    }
    secret(&mut file.client.secret);
    secret(&mut file.store.encryption_key);
    secret(&mut file.store.url);
    for path in [
        &mut file.store.path,
        &mut file.store.ca_file,
        &mut file.store.journal,
        &mut file.callers.jwks_file,
        &mut file.server.upgrade_sock,
    ]
    .into_iter()
    .flatten()
    {
        local(path);
    }
    for key in &mut file.callers.keys {
        secret(&mut key.secret);
        if let Some(path) = &mut key.public_key_pem {
            local(path);
        }
    }
    if let Some(connect) = &mut file.connect {
        secret(&mut connect.state_key);
    }
}

// ---------------------------------------------------------------------------------------------
// fixtures

/// A directory with the files the fixtures and the config seeds name: `client-secret`,
/// `store.key`, `caller.key`, `state.key`. Written once per process (atomically, so parallel
/// processes may share it) under the test target's temporary directory, else the system's.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join("finx-gateway-fuzz-fixtures");
        let store_key = EncryptionKey::generate().to_base64();
        let files = [
            ("client-secret", "fuzz-client-secret"),
            ("store.key", store_key.expose_secret()),
            ("caller.key", CALLER_KEY),
            ("state.key", STATE_KEY),
        ];
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            files.iter().try_for_each(|(name, content)| {
                let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
                std::fs::write(&partial, content)?;
                std::fs::rename(&partial, dir.join(name))
            })
        });
        if let Err(error) = written {
            panic!("fuzz fixtures in {}: {error}", dir.display());
        }
        dir
    })
}
