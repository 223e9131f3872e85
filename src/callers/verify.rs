//! Authentication of one request: credential header extraction, JWS verification, claims checks
//! and the cache of recently verified tokens.
//!
//! This runs on every request. A token seen before (within its validity) costs one cache lookup
//! and no allocation; a new one is verified in full and remembered.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION, PROXY_AUTHORIZATION};
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Header;
use serde_json::{Map, Value};

use super::keys::{JwksSource, VerifyKey};
use super::policy::ServicePolicy;
use super::{AuthError, Caller, CallerAuth, Identity, Mode};

/// Tokens longer than this are refused before parsing; real caller tokens are well under 2 KiB.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// How long a verified token is trusted without re-verification, at most.
const VERIFIED_TTL: Duration = Duration::from_secs(60);

/// Verified tokens by their text. `Debug` shows the count only: the keys are tokens.
pub(super) struct VerifiedCache(
    moka::sync::Cache<Box<str>, VerifiedCaller, foldhash::quality::RandomState>,
);

impl VerifiedCache {
    pub(super) fn new() -> Self {
        VerifiedCache(
            moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                // foldhash, not SipHash: a token is inserted only once fully verified, so a
                // sender of junk only causes lookups, which cannot grow a collision chain.
                .build_with_hasher(foldhash::quality::RandomState::default()),
        )
    }
}

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

/// What a token's registered claims must satisfy, besides its signature.
#[derive(Debug)]
pub(super) struct ClaimRules {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub(super) leeway_secs: i64,
    /// When set, tokens must carry `iat` and be at most this old.
    pub(super) max_token_age_secs: Option<i64>,
    /// Accepted `iss` values; `None` skips the check.
    pub(super) issuers: Option<Vec<String>>,
    /// Accepted `aud` values; `None` skips the check.
    pub(super) audiences: Option<Vec<String>>,
}

impl CallerAuth {
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
        if token.len() > MAX_TOKEN_LEN {
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
        // Checked only for tokens not seen before: a remembered one was verified whole.
        if !looks_like_jws(token) {
            return Err(AuthError::unauthenticated("invalid token"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::unauthenticated("invalid token"))?;
        let verified = self.verify(token, &header)?;
        let kid = header
            .kid
            .as_deref()
            .or(verified.kid_if_absent_from_header.as_deref())
            .unwrap_or("");
        let claims = self.claim_rules.check(verified.claims, now_unix)?;

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
                not_before: self.claim_rules.valid_from(&claims),
                valid_until: self.claim_rules.valid_until(&claims),
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
}

impl ClaimRules {
    /// The first second `check` accepts these (already checked) claims.
    fn valid_from(&self, claims: &Map<String, Value>) -> i64 {
        let claim = |name| numeric_claim(claims, name).ok().flatten();
        let nbf = claim("nbf").unwrap_or(i64::MIN);
        let iat = match self.max_token_age_secs {
            Some(_) => claim("iat").unwrap_or(i64::MIN),
            None => i64::MIN,
        };
        nbf.max(iat).saturating_sub(self.leeway_secs)
    }

    /// The first second `check` refuses these (already checked) claims.
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

    /// Time, issuer and audience checks against the request's clock.
    fn check(&self, claims: Map<String, Value>, now: i64) -> Result<Map<String, Value>, AuthError> {
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
