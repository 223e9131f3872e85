//! The gateway's flow state: what the gateway puts in finX's `state` parameter. It is signed
//! (HS256), expires, is single use, and binds the flow kind, the user, the calling service and
//! the caller's own `redirect_uri` and `state`, so the callback needs no server-side session.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::clock::UnixSeconds;

/// The claims of a flow state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowState {
    /// The flow kind's name (`ongoing/access`).
    pub kind: String,
    /// The user of an ongoing flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The calling service's policy name.
    pub svc: String,
    /// The caller's own `redirect_uri`.
    pub ru: String,
    /// The caller's own `state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub st: Option<String>,
    pub iat: UnixSeconds,
    pub exp: UnixSeconds,
    /// Unique id; a state is accepted once.
    pub jti: String,
}

/// Why a state was refused. Deliberately coarse: the message goes back to the browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the flow state is invalid")]
    Invalid,
    #[error("the flow state has expired")]
    Expired,
}

/// Signs and verifies flow states with the configured key.
pub struct StateSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl StateSigner {
    /// A signer over an HMAC key.
    pub fn new(key: &SecretString) -> Self {
        let secret = key.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is judged against the gateway's clock below, not the library's.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The signed token for `state`.
    pub fn sign(&self, state: &FlowState) -> Result<String, StateError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), state, &self.encoding)
            .map_err(|_| StateError::Invalid)
    }

    /// Verifies signature and expiry (single use is the caller's job).
    pub fn verify(&self, token: &str, now: UnixSeconds) -> Result<FlowState, StateError> {
        let state = jsonwebtoken::decode::<FlowState>(token, &self.decoding, &self.validation)
            .map_err(|_| StateError::Invalid)?
            .claims;
        if state.exp <= now {
            return Err(StateError::Expired);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(key: &str) -> StateSigner {
        StateSigner::new(&SecretString::from(key.to_owned()))
    }

    fn state() -> FlowState {
        FlowState {
            kind: "ongoing/access".into(),
            user: Some("alice".into()),
            svc: "web".into(),
            ru: "https://app.example/cb".into(),
            st: Some("xyz".into()),
            iat: 100,
            exp: 200,
            jti: "j1".into(),
        }
    }

    #[test]
    fn round_trips_and_refuses_tampering_expiry_and_other_keys() {
        let a = signer("0123456789abcdef0123456789abcdef");
        let token = a.sign(&state()).unwrap();
        assert_eq!(a.verify(&token, 150), Ok(state()));
        assert_eq!(a.verify(&token, 200), Err(StateError::Expired));
        let b = signer("fedcba9876543210fedcba9876543210");
        assert_eq!(b.verify(&token, 150), Err(StateError::Invalid));
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let flipped = if parts[1].as_bytes()[5] == b'A' {
            "B"
        } else {
            "A"
        };
        parts[1].replace_range(5..6, flipped);
        assert_eq!(a.verify(&parts.join("."), 150), Err(StateError::Invalid));
        assert_eq!(a.verify("garbage", 150), Err(StateError::Invalid));
    }
}
