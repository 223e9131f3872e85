//! File form of the `[callers]` configuration, exactly as written in the gateway's TOML.
//!
//! These types only describe syntax; [`super::CallerSettings::check`] validates them and reports
//! every problem at once, and [`super::CallerAuth::resolve`] reads the keys they name.

use std::path::PathBuf;

use serde::Deserialize;

use crate::secret::SecretRef;

/// The `[callers]` table.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct CallersFile {
    /// `"jwt"` (default) or `"trusted-local"`.
    pub mode: Option<String>,
    /// Header carrying the caller JWT; default `authorization`. `Proxy-Authorization` is always
    /// accepted too and wins when both are present.
    pub header: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`; default 30 seconds.
    pub leeway_secs: Option<u64>,
    /// When set, tokens must carry `iat` and be at most this old.
    pub max_token_age_secs: Option<u64>,
    /// Accepted `iss` values; when set, every token's `iss` must be one of them.
    pub issuer: Option<Vec<String>>,
    /// Accepted `aud` values; when set, every token must name at least one of them.
    pub audience: Option<Vec<String>>,
    /// Statically configured verification keys.
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// JWKS file with public keys, re-read when its modification time changes.
    pub jwks_file: Option<PathBuf>,
    /// Algorithms accepted for keys from `jwks_file` (required with it; asymmetric only).
    pub jwks_algorithms: Option<Vec<String>>,
    /// How often the JWKS file's mtime is checked, in milliseconds; default 1000.
    pub jwks_poll_interval_ms: Option<u64>,
    /// One policy per calling service.
    #[serde(default)]
    pub services: Vec<ServiceFile>,
    /// Settings for `mode = "trusted-local"`.
    pub trusted_local: Option<TrustedLocalFile>,
}

/// One `[[callers.keys]]` entry: exactly one of `secret` (HMAC) or `public_key_pem`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Key id matched against the token header's `kid`; also the name used by `token mint`.
    pub kid: String,
    /// Explicit allow-list, e.g. `["HS256"]` or `["RS256", "PS256"]`; all of one family.
    pub algorithms: Vec<String>,
    /// HMAC secret reference (HS256/384/512 only).
    pub secret: Option<SecretRef>,
    /// PEM file with an RSA, EC or Ed25519 public key, relative to the config directory.
    pub public_key_pem: Option<PathBuf>,
}

/// One `[[callers.services]]` entry: who the caller is and what it may do.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Policy name, used in logs and by `trusted_local.service`.
    pub name: String,
    /// Token `iss` this policy applies to.
    pub issuer: String,
    /// Value of `subject_claim` this policy applies to.
    pub subject: String,
    /// Claim identifying the caller within the issuer; default `sub`.
    pub subject_claim: Option<String>,
    /// Key ids allowed to authenticate this service; default: any configured key.
    pub keys: Option<Vec<String>>,
    /// Users the service may act for: `"any"`, `"claim:<name>"`, `"user-123"`, `"team-a-*"`.
    #[serde(default)]
    pub connections: Vec<String>,
    /// `"METHOD /path/pattern"` entries; `*` as method matches any method.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Connect flows the service may start, e.g. `"ongoing/access"`.
    #[serde(default)]
    pub flows: Vec<String>,
    /// Optional request rate limit for the whole service.
    pub rate_limit: Option<RateLimitFile>,
}

/// `rate_limit = { per_second = 50, burst = 100 }`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Most requests admitted at once after an idle spell; default `per_second`.
    pub burst: Option<u32>,
}

/// `[callers.trusted_local]`: the fixed identity used when no JWT is required.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrustedLocalFile {
    /// Name of the `[[callers.services]]` policy every request runs under.
    pub service: String,
}
