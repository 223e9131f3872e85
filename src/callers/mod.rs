//! Caller authentication (JWT) and per-service policy.
//!
//! Anyone who can reach the sidecar could act for every finX user, so each request must prove
//! which internal service sent it ([`CallerAuth::authenticate`]) and that service's policy then
//! limits the users, routes and connect flows it may use ([`Caller`]).
//!
//! Configuration comes in two steps: [`CallerSettings::check`] validates the `[callers]` table
//! without any I/O and reports every mistake; [`CallerAuth::resolve`] then reads the key files,
//! secrets and JWKS file it names. [`CallerAuth::from_file`] does both.
//!
//! A refusal is an [`AuthError`]: no valid credential ([`AuthError::Unauthenticated`], with its
//! [`AuthError::www_authenticate`] challenge), a caller its policy does not allow
//! ([`AuthError::Forbidden`], which includes a valid token whose `iss`/`sub` matches no policy:
//! the credential is fine, the caller is just not allowed) or a service over its rate
//! ([`AuthError::RateLimited`]). Which HTTP status each becomes is decided in one place, the
//! gateway's error module, not here.
//!
//! Where things are: `config` (the file structs, syntax only), `settings` (the pure check),
//! `keys` (reading keys, the JWKS file, `resolve`), `verify` (`authenticate`), `policy` (service
//! policies and the `authorize_*` methods), `rate` (per-service rate limit), `mint` (tokens for
//! the dev helper), `listener` (what counts as a local listener).
//!
//! Dependencies: only `crate::secret`, `crate::clock` and external crates. The gateway's config,
//! error, proxy, tokens and connect modules use this one, never the other way round, so that
//! caller authentication can be read, tested and changed on its own.

pub mod config;
mod keys;
mod listener;
mod mint;
mod policy;
mod rate;
mod settings;
mod verify;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use http::header::HeaderName;
use serde_json::{Map, Value};

pub use config::{CallersFile, KeyFile, RateLimitFile, ServiceFile, TrustedLocalFile};
pub use settings::CallerSettings;

use keys::{JwksSource, SigningKey, VerifyKey};
use policy::ServicePolicy;
use verify::{ClaimRules, VerifiedCache};

const REALM: &str = "finx-gateway";

/// Why a request was refused. Reasons are fixed strings: they never echo token content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No valid credential; the answer carries [`AuthError::www_authenticate`].
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// Short reason such as "missing credential", "expired", "bad signature".
        reason: &'static str,
    },
    /// Valid credential, but the caller's policy does not allow this.
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Short reason such as "route not allowed".
        reason: &'static str,
    },
    /// The service exceeded its rate limit; the answer carries `Retry-After`.
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
    claim_rules: ClaimRules,
    static_keys: Vec<VerifyKey>,
    signing_keys: Vec<SigningKey>,
    jwks: Option<JwksSource>,
    services: Vec<Arc<ServicePolicy>>,
    /// Tokens verified recently: callers send the same JWT with every request, and verifying
    /// it again (signature, JSON) would be most of the gateway's own per-request cost.
    verified: VerifiedCache,
}

impl CallerAuth {
    /// [`CallerSettings::check`] then [`CallerAuth::resolve`]: validates the `[callers]` table
    /// and, if it is valid, reads the keys it names. Relative paths are resolved against
    /// `base_dir` (the config file's directory). Returns every problem the failing step found.
    pub fn from_file(file: &CallersFile, base_dir: &Path) -> Result<CallerAuth, Vec<String>> {
        CallerAuth::resolve(CallerSettings::check(file, base_dir)?)
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
}

#[derive(Clone)]
enum Identity {
    /// Verified claims of the caller's token.
    Token(Arc<Map<String, Value>>),
    /// Trusted-local mode: the identity is the configured service's.
    TrustedLocal,
}

/// An authenticated caller and its policy. `Debug` shows identity only, never claims or token.
///
/// What it may do is asked with the `authorize_*` methods (in `policy.rs`) and
/// [`Caller::check_rate`] (in `rate.rs`).
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
}
