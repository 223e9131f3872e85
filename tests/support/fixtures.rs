//! Building blocks of the store tests: keys, tokens, consents and grants.

use finx_gateway::secret::SecretRef;
use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::{AccessToken, ConnectionKey, NewConnection, TokenGrant};
use secrecy::{ExposeSecret, SecretString};

/// The time every store test writes at.
pub const NOW: i64 = 1_700_000_000;

pub fn user(id: &str) -> ConnectionKey {
    ConnectionKey::user(id).unwrap()
}

pub fn secret(s: &str) -> SecretString {
    SecretString::from(s)
}

/// A consent with the standard scope; `access` is (token, expiry).
pub fn new_connection(refresh: &str, access: Option<(&str, i64)>) -> NewConnection {
    NewConnection {
        refresh_token: secret(refresh),
        access: access.map(|(token, expires_at)| AccessToken {
            token: secret(token),
            expires_at,
        }),
        scope: Some("accounts transactions".to_owned()),
    }
}

/// A refresh's result, without scope.
pub fn grant(access: &str, expires_at: i64, refresh: Option<&str>) -> TokenGrant {
    TokenGrant {
        access: AccessToken {
            token: secret(access),
            expires_at,
        },
        refresh_token: refresh.map(secret),
        scope: None,
    }
}

/// A second handle on the same key, as a restart reading the same key file would have.
pub fn same_key(key: &EncryptionKey) -> EncryptionKey {
    EncryptionKey::from_base64(
        key.to_base64().expose_secret(),
        SecretRef::Env("TEST".into()),
    )
    .unwrap()
}
