//! Minting caller tokens with a configured HMAC key, for `finx-gateway token mint` and the demo.
//!
//! Production callers get their tokens from their own issuer; the gateway signs only so that a
//! developer can try it without one. Asymmetric keys are verify-only here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Header;
use serde_json::{Map, Value};

use super::{CallerAuth, MintError};

/// Longest `ttl` accepted: a minted token is a dev convenience, not a long-lived credential.
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

impl CallerAuth {
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
        if ttl.is_zero() || ttl > MAX_TTL {
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
