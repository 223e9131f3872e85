//! Caller authentication (JWT) and per-service policy.
//!
//! Anyone who can reach the sidecar could act for every finX user, so each request must prove
//! which internal service sent it ([`CallerAuth::authenticate`]) and that service's policy then
//! limits the users, routes and connect flows it may use ([`Caller`]).
//!
//! Outcomes map to HTTP as follows: [`AuthError::Unauthenticated`] → 401 with
//! [`AuthError::www_authenticate`]; [`AuthError::Forbidden`] → 403 (this includes a valid token
//! whose `iss`/`sub` matches no policy: the credential is fine, the caller is just not allowed);
//! [`AuthError::RateLimited`] → 429 with `Retry-After`.

pub mod config;
mod keys;
mod listener;
mod policy;
mod rate;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, AUTHORIZATION, PROXY_AUTHORIZATION};
use http::{HeaderMap, Method};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{AlgorithmFamily, Header};
use serde_json::{Map, Value};

pub use crate::config::SecretRef;
pub use config::{CallersFile, KeyFile, RateLimitFile, ServiceFile, TrustedLocalFile};

use keys::{JwksSource, SigningKey, VerifyKey};
use policy::{ServicePolicy, UserRule};

/// Tokens longer than this are refused before parsing; real caller tokens are well under 2 KiB.
const MAX_TOKEN_LEN: usize = 8 * 1024;
const DEFAULT_LEEWAY_SECS: u64 = 30;
const DEFAULT_JWKS_POLL: Duration = Duration::from_secs(1);
const REALM: &str = "finx-gateway";

/// Why a request was refused. Reasons are fixed strings: they never echo token content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No valid credential: answer 401 with [`AuthError::www_authenticate`].
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// Short reason such as "missing credential", "expired", "bad signature".
        reason: &'static str,
    },
    /// Valid credential, but the caller's policy does not allow this: answer 403.
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Short reason such as "route not allowed".
        reason: &'static str,
    },
    /// The service exceeded its rate limit: answer 429 with `Retry-After`.
    #[error("rate limited; retry after {retry_after_secs} s")]
    RateLimited {
        /// Whole seconds until a request would be admitted (at least 1).
        retry_after_secs: u64,
    },
}

impl AuthError {
    fn unauthenticated(reason: &'static str) -> Self {
        AuthError::Unauthenticated { reason }
    }

    fn forbidden(reason: &'static str) -> Self {
        AuthError::Forbidden { reason }
    }

    /// The HTTP status this outcome maps to (401, 403 or 429).
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Unauthenticated { .. } => 401,
            AuthError::Forbidden { .. } => 403,
            AuthError::RateLimited { .. } => 429,
        }
    }

    /// The `WWW-Authenticate` value for a 401, `None` for other outcomes.
    ///
    /// Per RFC 6750 §3.1 a request without any credential gets no error code.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            AuthError::Unauthenticated {
                reason: "missing credential",
            } => Some(format!("Bearer realm=\"{REALM}\"")),
            AuthError::Unauthenticated { reason } => Some(format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{reason}\""
            )),
            _ => None,
        }
    }
}

/// Failure of [`CallerAuth::mint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// No HMAC key with this kid is configured (asymmetric keys are verify-only here).
    #[error("no HMAC key with kid {0:?} is configured")]
    UnknownKey(String),
    /// `ttl` was zero or absurdly large.
    #[error("ttl must be between 1 second and 1 year")]
    BadTtl,
    /// Signing failed.
    #[error("cannot sign token: {0}")]
    Signing(String),
}

#[derive(Debug)]
enum Mode {
    Jwt,
    /// Every request runs under this one policy, without a credential.
    TrustedLocal(Arc<ServicePolicy>),
}

/// Validated caller-authentication configuration; cheap to share between worker threads.
///
/// `Debug` lists key ids and algorithms, never key material.
#[derive(Debug)]
pub struct CallerAuth {
    mode: Mode,
    header: HeaderName,
    leeway_secs: i64,
    max_token_age_secs: Option<i64>,
    issuers: Option<Vec<String>>,
    audiences: Option<Vec<String>>,
    static_keys: Vec<VerifyKey>,
    signing_keys: Vec<SigningKey>,
    jwks: Option<JwksSource>,
    services: Vec<Arc<ServicePolicy>>,
    /// Tokens verified recently: callers send the same JWT with every request, and verifying
    /// it again (signature, JSON) would be most of the gateway's own per-request cost.
    verified: VerifiedCache,
}

/// Verified tokens by their text. `Debug` shows the count only: the keys are tokens.
struct VerifiedCache(moka::sync::Cache<Box<str>, VerifiedCaller>);

impl std::fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifiedCache({} entries)", self.0.entry_count())
    }
}

/// A verified token's outcome and the window in which it stays valid without re-verification.
#[derive(Clone)]
struct VerifiedCaller {
    policy: Arc<ServicePolicy>,
    claims: Arc<Map<String, Value>>,
    /// Valid while `not_before <= now < valid_until` (leeway included).
    not_before: i64,
    valid_until: i64,
    /// The JWKS generation it was verified under; a reload invalidates it.
    jwks_generation: u64,
}

/// How long a verified token is trusted without re-verification, at most.
const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl CallerAuth {
    /// Validates the `[callers]` table; relative paths are resolved against `base_dir` (the
    /// config file's directory). Returns every problem found, not just the first.
    pub fn from_file(file: &CallersFile, base_dir: &Path) -> Result<CallerAuth, Vec<String>> {
        let mut errors = Vec::new();
        let trusted_local = match file.mode.as_deref() {
            None | Some("jwt") => {
                if file.trusted_local.is_some() {
                    errors.push(
                        "callers.trusted_local is set but mode is not \"trusted-local\"".into(),
                    );
                }
                false
            }
            Some("trusted-local") => true,
            Some(other) => {
                errors.push(format!(
                    "callers.mode {other:?}: expected \"jwt\" or \"trusted-local\""
                ));
                false
            }
        };
        let header_text = file.header.as_deref().unwrap_or("authorization");
        let header = HeaderName::from_bytes(header_text.to_ascii_lowercase().as_bytes())
            .unwrap_or_else(|_| {
                errors.push(format!(
                    "callers.header {header_text:?} is not a header name"
                ));
                AUTHORIZATION
            });
        let leeway = file.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS);
        if leeway > 600 {
            errors.push(format!(
                "callers.leeway_secs {leeway}: more than 600 s of clock skew defeats expiry"
            ));
        }
        if file.max_token_age_secs == Some(0) {
            errors.push("callers.max_token_age_secs must be at least 1".into());
        }
        for (name, list) in [("issuer", &file.issuer), ("audience", &file.audience)] {
            if let Some(list) = list {
                if list.is_empty() || list.iter().any(String::is_empty) {
                    errors.push(format!(
                        "callers.{name}: empty list or empty value; omit it to skip the check"
                    ));
                }
            }
        }

        let mut static_keys = Vec::new();
        let mut signing_keys = Vec::new();
        for (index, key_file) in file.keys.iter().enumerate() {
            if file.keys[..index].iter().any(|k| k.kid == key_file.kid) {
                errors.push(format!("callers.keys: duplicate kid {:?}", key_file.kid));
            }
            match keys::load_static_key(key_file, base_dir) {
                Ok((verify, signing)) => {
                    static_keys.push(verify);
                    signing_keys.extend(signing);
                }
                Err(key_errors) => errors.extend(key_errors),
            }
        }

        let jwks = match (&file.jwks_file, &file.jwks_algorithms) {
            (None, None) => None,
            (None, Some(_)) => {
                errors.push("callers.jwks_algorithms is set without callers.jwks_file".into());
                None
            }
            (Some(_), None) => {
                errors.push(
                    "callers.jwks_file needs callers.jwks_algorithms, e.g. [\"RS256\"]".into(),
                );
                None
            }
            (Some(path), Some(names)) => match keys::parse_algorithms(names) {
                Err(err) => {
                    errors.push(format!("callers.jwks_algorithms: {err}"));
                    None
                }
                Ok(algorithms) if algorithms[0].family() == AlgorithmFamily::Hmac => {
                    errors.push(
                        "callers.jwks_algorithms: JWKS keys are public keys; HMAC is not allowed"
                            .into(),
                    );
                    None
                }
                Ok(algorithms) => {
                    let poll = file
                        .jwks_poll_interval_ms
                        .map_or(DEFAULT_JWKS_POLL, Duration::from_millis);
                    let static_kids = static_keys.iter().map(|k| k.kid.clone()).collect();
                    JwksSource::open(base_dir.join(path), algorithms, poll, static_kids)
                        .map_err(|err| errors.push(err))
                        .ok()
                }
            },
        };
        if !trusted_local && file.keys.is_empty() && file.jwks_file.is_none() {
            errors.push("callers: no keys and no jwks_file; no caller could authenticate".into());
        }

        let mut services: Vec<Arc<ServicePolicy>> = Vec::new();
        for service_file in &file.services {
            if let Some(policy) = ServicePolicy::from_file(service_file, &mut errors) {
                services.push(Arc::new(policy));
            }
        }
        for (index, service) in services.iter().enumerate() {
            let earlier = &services[..index];
            if earlier.iter().any(|s| s.name == service.name) {
                errors.push(format!(
                    "callers.services: duplicate name {:?}",
                    service.name
                ));
            }
            if earlier.iter().any(|s| {
                s.issuer == service.issuer
                    && s.subject == service.subject
                    && s.subject_claim == service.subject_claim
            }) {
                errors.push(format!(
                    "callers.services {:?}: another service has the same issuer and subject",
                    service.name
                ));
            }
            if let Some(issuers) = &file.issuer {
                if !issuers.contains(&service.issuer) {
                    errors.push(format!(
                        "callers.services {:?}: issuer {:?} is not in callers.issuer",
                        service.name, service.issuer
                    ));
                }
            }
            for kid in service.keys.iter().flatten() {
                let known = file.keys.iter().any(|k| &k.kid == kid) || file.jwks_file.is_some();
                if !known {
                    errors.push(format!(
                        "callers.services {:?}: keys names unknown kid {kid:?}",
                        service.name
                    ));
                }
            }
        }
        if file.services.is_empty() {
            errors.push("callers.services is empty; every caller would be forbidden".into());
        }

        let mode = if trusted_local {
            match &file.trusted_local {
                None => {
                    errors.push(
                        "callers.mode = \"trusted-local\" needs [callers.trusted_local] service = \"…\""
                            .into(),
                    );
                    Mode::Jwt
                }
                Some(local) => match services.iter().find(|s| s.name == local.service) {
                    Some(policy) => {
                        if policy.users.iter().any(|u| matches!(u, UserRule::Claim(_))) {
                            errors.push(format!(
                                "callers.trusted_local: service {:?} uses claim: connections, which need a token",
                                local.service
                            ));
                        }
                        Mode::TrustedLocal(Arc::clone(policy))
                    }
                    None => {
                        errors.push(format!(
                            "callers.trusted_local.service {:?} is not a configured service",
                            local.service
                        ));
                        Mode::Jwt
                    }
                },
            }
        } else {
            Mode::Jwt
        };

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CallerAuth {
            mode,
            header,
            leeway_secs: i64::try_from(leeway).unwrap_or(i64::MAX),
            max_token_age_secs: file
                .max_token_age_secs
                .map(|age| i64::try_from(age).unwrap_or(i64::MAX)),
            issuers: file.issuer.clone(),
            audiences: file.audience.clone(),
            static_keys,
            signing_keys,
            jwks,
            services,
            verified: VerifiedCache(
                moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(VERIFIED_TTL)
                    .build(),
            ),
        })
    }

    /// Whether requests run without a credential (`mode = "trusted-local"`).
    pub fn is_trusted_local(&self) -> bool {
        matches!(self.mode, Mode::TrustedLocal(_))
    }

    /// The configured credential header; the gateway strips it (and `Proxy-Authorization`)
    /// before forwarding to finX.
    pub fn credential_header(&self) -> &HeaderName {
        &self.header
    }

    /// Refuses trusted-local mode unless `listener` is loopback (127.0.0.0/8, ::1, localhost)
    /// or a Unix socket path. Always `Ok` in JWT mode.
    pub fn check_listener(&self, listener: &str) -> Result<(), String> {
        match self.mode {
            Mode::Jwt => Ok(()),
            Mode::TrustedLocal(_) if listener::is_local(listener) => Ok(()),
            Mode::TrustedLocal(_) => Err(format!(
                "callers.mode = \"trusted-local\" accepts unauthenticated requests, so the listener \
                 must be loopback or a Unix socket, not {listener:?}"
            )),
        }
    }

    /// Re-reads the JWKS file now, even if its mtime looks unchanged (tests, SIGHUP).
    pub fn reload_jwks_now(&self) {
        if let Some(jwks) = &self.jwks {
            jwks.reload(true);
        }
    }

    /// Key ids currently usable for verification (static keys, then JWKS keys).
    pub fn key_ids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.static_keys.iter().map(|k| k.kid.clone()).collect();
        if let Some(jwks) = &self.jwks {
            kids.extend(jwks.kids());
        }
        kids
    }

    /// Authenticates a request from its headers at time `now_unix` (seconds).
    ///
    /// Hot path: a token seen before (within its validity) costs one cache lookup; a new one is
    /// verified in full and remembered. The only I/O is the JWKS mtime check, at most once per
    /// poll interval across all threads.
    pub fn authenticate(&self, headers: &HeaderMap, now_unix: i64) -> Result<Caller, AuthError> {
        if let Mode::TrustedLocal(policy) = &self.mode {
            return Ok(Caller {
                policy: Arc::clone(policy),
                identity: Identity::TrustedLocal,
                used_proxy_authorization: false,
            });
        }
        let (token, used_proxy_authorization) = self.credential(headers)?;
        if token.len() > MAX_TOKEN_LEN || !looks_like_jws(token) {
            return Err(AuthError::unauthenticated("invalid token"));
        }
        let jwks_generation = self.jwks.as_ref().map_or(0, JwksSource::current_generation);
        if let Some(hit) = self.verified.0.get(token) {
            if hit.jwks_generation == jwks_generation
                && hit.not_before <= now_unix
                && now_unix < hit.valid_until
            {
                return Ok(Caller {
                    policy: hit.policy,
                    identity: Identity::Token(hit.claims),
                    used_proxy_authorization,
                });
            }
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::unauthenticated("invalid token"))?;
        let verified = self.verify(token, &header)?;
        let kid = header
            .kid
            .as_deref()
            .or(verified.kid_if_absent_from_header.as_deref())
            .unwrap_or("");
        let claims = self.check_claims(verified.claims, now_unix)?;

        let policy = self
            .services
            .iter()
            .find(|s| {
                claims.get("iss").and_then(Value::as_str) == Some(s.issuer.as_str())
                    && claims.get(&s.subject_claim).and_then(Value::as_str)
                        == Some(s.subject.as_str())
            })
            .ok_or(AuthError::forbidden("no policy for this caller"))?;
        if !policy.allows_key(kid) {
            return Err(AuthError::forbidden("key not allowed for this caller"));
        }
        let claims = Arc::new(claims);
        self.verified.0.insert(
            token.into(),
            VerifiedCaller {
                policy: Arc::clone(policy),
                claims: Arc::clone(&claims),
                not_before: self.valid_from(&claims),
                valid_until: self.valid_until(&claims),
                jwks_generation,
            },
        );
        Ok(Caller {
            policy: Arc::clone(policy),
            identity: Identity::Token(claims),
            used_proxy_authorization,
        })
    }

    /// Picks the credential: `Proxy-Authorization` wins over the configured header.
    fn credential<'h>(&self, headers: &'h HeaderMap) -> Result<(&'h str, bool), AuthError> {
        if let Some(token) = single_credential(headers, &PROXY_AUTHORIZATION, true)? {
            return Ok((token, true));
        }
        let needs_scheme = self.header == AUTHORIZATION;
        match single_credential(headers, &self.header, needs_scheme)? {
            Some(token) => Ok((token, false)),
            None => Err(AuthError::unauthenticated("missing credential")),
        }
    }

    /// Finds the key, enforces its allow-list and checks the signature.
    fn verify(&self, token: &str, header: &Header) -> Result<Verified, AuthError> {
        let verify_with =
            |key: &VerifyKey| -> Result<(Map<String, Value>, Option<String>), AuthError> {
                // Checked here as well as by jsonwebtoken so that a disallowed algorithm never
                // reaches any verifier, whatever the library does with it.
                if !key.allows(header.alg) {
                    return Err(AuthError::unauthenticated("algorithm not allowed"));
                }
                let data =
                    jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation)
                        .map_err(|err| {
                            AuthError::unauthenticated(match err.kind() {
                                ErrorKind::InvalidSignature => "bad signature",
                                ErrorKind::InvalidAlgorithm => "algorithm not allowed",
                                _ => "invalid token",
                            })
                        })?;
                // Only a kid-less token needs the key's name copied out for the policy check.
                let kid = header.kid.is_none().then(|| key.kid.clone());
                Ok((data.claims, kid))
            };
        let outcome = match header.kid.as_deref() {
            Some(kid) => match self.static_keys.iter().find(|k| k.kid == kid) {
                Some(key) => Some(verify_with(key)),
                None => self
                    .jwks
                    .as_ref()
                    .and_then(|jwks| jwks.with_key(kid, verify_with)),
            },
            // Without a kid the choice is only unambiguous when exactly one key exists.
            None => match (self.static_keys.as_slice(), &self.jwks) {
                ([only], None) => Some(verify_with(only)),
                ([], Some(jwks)) => jwks.single_key(verify_with),
                _ => None,
            },
        };
        let (claims, chosen_kid) = outcome.ok_or(AuthError::unauthenticated("unknown key"))??;
        Ok(Verified {
            claims,
            kid_if_absent_from_header: chosen_kid,
        })
    }

    /// Time, issuer and audience checks against the request's clock.
    /// The first second `check_claims` accepts these (already checked) claims.
    fn valid_from(&self, claims: &Map<String, Value>) -> i64 {
        let claim = |name| numeric_claim(claims, name).ok().flatten();
        let nbf = claim("nbf").unwrap_or(i64::MIN);
        let iat = match self.max_token_age_secs {
            Some(_) => claim("iat").unwrap_or(i64::MIN),
            None => i64::MIN,
        };
        nbf.max(iat).saturating_sub(self.leeway_secs)
    }

    /// The first second `check_claims` refuses these (already checked) claims.
    fn valid_until(&self, claims: &Map<String, Value>) -> i64 {
        let exp = numeric_claim(claims, "exp")
            .ok()
            .flatten()
            .unwrap_or(i64::MIN);
        let mut until = exp.saturating_add(self.leeway_secs);
        if let Some(max_age) = self.max_token_age_secs {
            let iat = numeric_claim(claims, "iat")
                .ok()
                .flatten()
                .unwrap_or(i64::MIN);
            until = until.min(
                iat.saturating_add(max_age)
                    .saturating_add(self.leeway_secs)
                    .saturating_add(1),
            );
        }
        until
    }

    fn check_claims(
        &self,
        claims: Map<String, Value>,
        now: i64,
    ) -> Result<Map<String, Value>, AuthError> {
        let leeway = self.leeway_secs;
        let exp =
            numeric_claim(&claims, "exp")?.ok_or(AuthError::unauthenticated("missing exp"))?;
        if now.saturating_sub(leeway) >= exp {
            return Err(AuthError::unauthenticated("expired"));
        }
        if let Some(nbf) = numeric_claim(&claims, "nbf")? {
            if now.saturating_add(leeway) < nbf {
                return Err(AuthError::unauthenticated("not yet valid"));
            }
        }
        if let Some(max_age) = self.max_token_age_secs {
            let iat =
                numeric_claim(&claims, "iat")?.ok_or(AuthError::unauthenticated("missing iat"))?;
            if iat > now.saturating_add(leeway) {
                return Err(AuthError::unauthenticated("issued in the future"));
            }
            if now.saturating_sub(iat) > max_age.saturating_add(leeway) {
                return Err(AuthError::unauthenticated("token too old"));
            }
        }
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(AuthError::unauthenticated("missing iss"))?;
        if let Some(issuers) = &self.issuers {
            if !issuers.iter().any(|allowed| allowed == iss) {
                return Err(AuthError::unauthenticated("wrong issuer"));
            }
        }
        if let Some(audiences) = &self.audiences {
            let accepted = |aud: &Value| {
                aud.as_str()
                    .is_some_and(|a| audiences.iter().any(|x| x == a))
            };
            let ok = match claims.get("aud") {
                Some(Value::Array(values)) => values.iter().any(accepted),
                Some(value) => accepted(value),
                None => false,
            };
            if !ok {
                return Err(AuthError::unauthenticated("wrong audience"));
            }
        }
        Ok(claims)
    }

    /// Signs a caller token with a configured HMAC key (`finx-gateway token mint`, dev only).
    ///
    /// `extra_claims` cannot override `iss`, `sub`, `aud`, `iat` or `exp`.
    pub fn mint(
        &self,
        key_name: &str,
        iss: &str,
        sub: &str,
        aud: Option<&str>,
        ttl: Duration,
        extra_claims: Map<String, Value>,
    ) -> Result<String, MintError> {
        let key = self
            .signing_keys
            .iter()
            .find(|k| k.kid == key_name)
            .ok_or_else(|| MintError::UnknownKey(key_name.to_owned()))?;
        if ttl.is_zero() || ttl > Duration::from_secs(366 * 24 * 3600) {
            return Err(MintError::BadTtl);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| MintError::Signing("system clock is before 1970".into()))?
            .as_secs();
        let mut claims = extra_claims;
        claims.insert("iss".into(), Value::from(iss));
        claims.insert("sub".into(), Value::from(sub));
        match aud {
            Some(aud) => claims.insert("aud".into(), Value::from(aud)),
            None => claims.remove("aud"),
        };
        claims.insert("iat".into(), Value::from(now));
        claims.insert("exp".into(), Value::from(now.saturating_add(ttl.as_secs())));
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.key)
            .map_err(|err| MintError::Signing(err.to_string()))
    }
}

/// Claims whose signature checked out, before time/issuer/audience checks.
struct Verified {
    claims: Map<String, Value>,
    /// The kid of the key used when the token header had none (the only configured key).
    kid_if_absent_from_header: Option<String>,
}

/// Reads at most one value of `name`; two values are refused rather than guessed between.
fn single_credential<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    needs_bearer_scheme: bool,
) -> Result<Option<&'h str>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::unauthenticated("ambiguous credential"));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::unauthenticated("invalid token"))?
        .trim();
    let token = match strip_bearer(text) {
        Some(token) => token,
        None if needs_bearer_scheme => {
            return Err(AuthError::unauthenticated("not a bearer credential"))
        }
        None => text,
    };
    if token.is_empty() {
        return Err(AuthError::unauthenticated("missing credential"));
    }
    Ok(Some(token))
}

fn strip_bearer(text: &str) -> Option<&str> {
    let scheme = text.get(..7)?;
    if scheme.eq_ignore_ascii_case("bearer ") {
        Some(text[7..].trim_start())
    } else {
        None
    }
}

/// Compact JWS shape: three base64url parts. Cheap pre-filter before any decoding.
fn looks_like_jws(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A NumericDate claim as whole seconds; present but not a number is an invalid token.
fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(whole), _) => Ok(Some(whole)),
            (None, Some(float)) if float.is_finite() => Ok(Some(float.floor() as i64)),
            _ => Err(AuthError::unauthenticated("invalid token")),
        },
        Some(_) => Err(AuthError::unauthenticated("invalid token")),
    }
}

#[derive(Clone)]
enum Identity {
    /// Verified claims of the caller's token.
    Token(Arc<Map<String, Value>>),
    /// Trusted-local mode: the identity is the configured service's.
    TrustedLocal,
}

/// An authenticated caller and its policy. `Debug` shows identity only, never claims or token.
#[derive(Clone)]
pub struct Caller {
    policy: Arc<ServicePolicy>,
    identity: Identity,
    used_proxy_authorization: bool,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("service", &self.service())
            .field("iss", &self.iss())
            .field("sub", &self.sub())
            .field("used_proxy_authorization", &self.used_proxy_authorization)
            .finish()
    }
}

impl Caller {
    fn claim(&self, name: &str) -> Option<&str> {
        match &self.identity {
            Identity::Token(claims) => claims.get(name).and_then(Value::as_str),
            Identity::TrustedLocal => None,
        }
    }

    /// The token's `iss` (the policy's issuer in trusted-local mode), for the access log.
    pub fn iss(&self) -> &str {
        self.claim("iss").unwrap_or(&self.policy.issuer)
    }

    /// The caller's subject: the value of the policy's `subject_claim` (default `sub`).
    pub fn sub(&self) -> &str {
        self.claim(&self.policy.subject_claim)
            .unwrap_or(&self.policy.subject)
    }

    /// Name of the matched `[[callers.services]]` policy.
    pub fn service(&self) -> &str {
        &self.policy.name
    }

    /// Whether the credential came from `Proxy-Authorization` (the gateway then discards the
    /// caller's `Authorization` instead of treating it as the credential).
    pub fn used_proxy_authorization(&self) -> bool {
        self.used_proxy_authorization
    }

    /// Allows `method` on `path` as sent (percent-encoding kept, without query) if a route
    /// pattern matches; a path that would only match once decoded does not (fail closed).
    pub fn authorize_route(&self, method: &Method, path: &str) -> Result<(), AuthError> {
        if self.policy.allows_route(method, path) {
            Ok(())
        } else {
            Err(AuthError::forbidden("route not allowed"))
        }
    }

    /// Allows acting for `user_id` per the policy's `connections`.
    pub fn authorize_user(&self, user_id: &str) -> Result<(), AuthError> {
        let allowed = !user_id.is_empty()
            && self.policy.users.iter().any(|rule| match rule {
                UserRule::Any => true,
                UserRule::Exact(id) => id == user_id,
                UserRule::Prefix(prefix) => user_id.starts_with(prefix.as_str()),
                UserRule::Claim(name) => self.claim(name) == Some(user_id),
            });
        if allowed {
            Ok(())
        } else {
            Err(AuthError::forbidden("user not allowed"))
        }
    }

    /// Allows starting the connect flow `flow_kind` (e.g. `"ongoing/access"`).
    pub fn authorize_flow(&self, flow_kind: &str) -> Result<(), AuthError> {
        if self.policy.allows_flow(flow_kind) {
            Ok(())
        } else {
            Err(AuthError::forbidden("flow not allowed"))
        }
    }

    /// Counts one request against the service's rate limit, if it has one.
    pub fn check_rate(&self) -> Result<(), AuthError> {
        self.check_rate_at(std::time::Instant::now())
    }

    fn check_rate_at(&self, now: std::time::Instant) -> Result<(), AuthError> {
        match &self.policy.rate_limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_at(now)
                .map_err(|wait| AuthError::RateLimited {
                    retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }),
        }
    }
}
