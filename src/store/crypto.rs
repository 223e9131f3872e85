//! AEAD encryption of tokens at rest.
//!
//! One [`EncryptionKey`] (32 bytes, XChaCha20-Poly1305) encrypts every token the store writes.
//! The key comes from a file or an environment variable holding it as standard base64, never
//! from the configuration file inline. It is identified in logs, errors and the database by its
//! [`EncryptionKey::key_id`], a truncated domain-separated SHA-256 that reveals nothing usable.
//!
//! Stored format of a sealed value: `version (1 byte) || nonce (24 bytes) || ciphertext || tag
//! (16 bytes)`. The associated data binds a token to its connection and column
//! ([`token_associated_data`]), so a ciphertext copied into another row or column fails to
//! decrypt instead of handing one user's token to another.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::ConnectionKey;

/// Length of an encryption key in bytes.
pub const KEY_LEN: usize = 32;

/// First byte of every sealed value; bump it when the format or the AEAD changes so old rows
/// can still be recognised (and migrated) rather than misread.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + NONCE_LEN;

/// Domain separation for key ids: the id is a hash of the key, so it must never be a hash any
/// other system computes over the same bytes.
const KEY_ID_DOMAIN: &[u8] = b"finx-gateway key id v1";

/// Which encrypted column of a connection a ciphertext belongs to; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenColumn {
    /// The (rotating) refresh token.
    RefreshToken,
    /// The latest access token.
    AccessToken,
}

impl TokenColumn {
    /// The column's name, as bound into the associated data and used in the schema.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RefreshToken => "refresh_token",
            Self::AccessToken => "access_token",
        }
    }
}

/// The associated data for a token of `key` stored in `column`:
/// `"finx-gateway/v1/" + connection_key + "/" + column`.
///
/// Connection keys never contain `/` (see [`ConnectionKey::user`]), so the encoding is
/// unambiguous.
pub fn token_associated_data(key: &ConnectionKey, column: TokenColumn) -> Vec<u8> {
    format!("finx-gateway/v1/{}/{}", key.as_str(), column.as_str()).into_bytes()
}

/// Where an encryption key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the base64 key (surrounding whitespace and a trailing newline are fine).
    File(PathBuf),
    /// An environment variable holding the base64 key.
    Env(String),
}

impl KeySource {
    /// Reads and decodes the key.
    pub fn load(&self) -> Result<EncryptionKey, KeyError> {
        match self {
            Self::File(path) => EncryptionKey::from_file(path),
            Self::Env(var) => EncryptionKey::from_env(var),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// Why an encryption key could not be loaded. Messages name the source, never its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file is missing or unreadable.
    #[error("cannot read the encryption key file {}: {reason}", path.display())]
    FileUnreadable { path: PathBuf, reason: String },
    /// The environment variable is not set.
    #[error("the environment variable {var} that should hold the encryption key is not set")]
    EnvVarMissing { var: String },
    /// The content is not standard base64 (the decoder's detail is left out: it quotes input).
    #[error(
        "the encryption key in {origin} is not valid standard base64 \
         (expected {KEY_LEN} bytes encoded as 44 characters, padding included)"
    )]
    BadEncoding { origin: KeySource },
    /// The content decodes to the wrong number of bytes.
    #[error("the encryption key in {origin} decodes to {actual} bytes; expected {KEY_LEN}")]
    WrongLength { origin: KeySource, actual: usize },
}

/// A sealed value failed to open: tampered with, truncated, moved to another row or column, or
/// written with another key. Deliberately carries no detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ciphertext failed to decrypt (tampered, misplaced or encrypted with another key)")]
pub struct DecryptError;

/// Encryption failed; XChaCha20-Poly1305 only refuses plaintexts of hundreds of gigabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("encryption failed (plaintext too large)")]
pub struct EncryptError;

/// The key that encrypts tokens at rest.
///
/// Boxed so moves never leave copies of the key on the stack; zeroized on drop; `Debug` shows
/// only the key id.
pub struct EncryptionKey {
    bytes: Box<Zeroizing<[u8; KEY_LEN]>>,
}

impl EncryptionKey {
    /// A fresh random key (for `finx-gateway` key generation, the demo and tests).
    pub fn generate() -> Self {
        let mut bytes = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        rand::rng().fill_bytes(&mut bytes[..]);
        Self { bytes }
    }

    /// Decodes a standard-base64 key; surrounding whitespace is ignored. `origin` only names
    /// where it came from in errors.
    pub fn from_base64(encoded: &str, origin: KeySource) -> Result<Self, KeyError> {
        let decoded =
            Zeroizing::new(
                STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| KeyError::BadEncoding {
                        origin: origin.clone(),
                    })?,
            );
        let array: &[u8; KEY_LEN] =
            decoded
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::WrongLength {
                    origin,
                    actual: decoded.len(),
                })?;
        let mut bytes = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        bytes.copy_from_slice(array);
        Ok(Self { bytes })
    }

    /// Reads the key from a file holding it as standard base64.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let content =
            Zeroizing::new(std::fs::read(path).map_err(|e| KeyError::FileUnreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?);
        let origin = KeySource::File(path.to_path_buf());
        // Non-UTF-8 content cannot be base64 anyway; report it as such without echoing it.
        let text = std::str::from_utf8(&content).map_err(|_| KeyError::BadEncoding {
            origin: origin.clone(),
        })?;
        Self::from_base64(text, origin)
    }

    /// Reads the key from the environment variable `var`, holding it as standard base64.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let origin = KeySource::Env(var.to_owned());
        match std::env::var(var) {
            Ok(value) => {
                let value = Zeroizing::new(value);
                Self::from_base64(&value, origin)
            }
            Err(std::env::VarError::NotPresent) => Err(KeyError::EnvVarMissing {
                var: var.to_owned(),
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err(KeyError::BadEncoding { origin }),
        }
    }

    /// The key as standard base64, the form [`EncryptionKey::from_base64`] and the key file
    /// expect. Returned as a secret so it is not printed by accident.
    pub fn to_base64(&self) -> SecretString {
        SecretString::from(STANDARD.encode(&self.bytes[..]))
    }

    /// The key's public identifier: the first 16 hex characters of
    /// `SHA-256("finx-gateway key id v1" || key)`. Safe to log and store.
    pub fn key_id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(KEY_ID_DOMAIN)
            .chain_update(&self.bytes[..])
            .finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // The cipher keeps its own copy of the key and zeroizes it on drop.
        XChaCha20Poly1305::new(Key::from_slice(&self.bytes[..]))
    }

    /// Encrypts `plaintext` under a fresh random nonce, binding it to `associated_data`.
    pub fn encrypt(
        &self,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<Vec<u8>, EncryptError> {
        // One allocation of the final size, encrypted in place: no reallocation ever leaves a
        // stray plaintext copy behind in freed memory.
        let mut sealed = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        sealed.push(FORMAT_V1);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                associated_data,
                &mut sealed[HEADER_LEN..],
            )
            .map_err(|_| EncryptError)?;
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    /// Decrypts a value sealed by [`EncryptionKey::encrypt`] with the same associated data.
    pub fn decrypt(
        &self,
        sealed: &[u8],
        associated_data: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        if sealed.len() < HEADER_LEN + TAG_LEN || sealed[0] != FORMAT_V1 {
            return Err(DecryptError);
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        self.cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(&header[1..]),
                associated_data,
                &mut plaintext[..],
                Tag::from_slice(tag),
            )
            .map_err(|_| DecryptError)?;
        Ok(plaintext)
    }

    /// Encrypts a token for `column` of connection `key`.
    pub fn seal_token(
        &self,
        key: &ConnectionKey,
        column: TokenColumn,
        token: &SecretString,
    ) -> Result<Vec<u8>, EncryptError> {
        self.encrypt(
            token.expose_secret().as_bytes(),
            &token_associated_data(key, column),
        )
    }

    /// Decrypts a token sealed by [`EncryptionKey::seal_token`] for the same key and column.
    pub fn open_token(
        &self,
        key: &ConnectionKey,
        column: TokenColumn,
        sealed: &[u8],
    ) -> Result<SecretString, DecryptError> {
        let plaintext = self.decrypt(sealed, &token_associated_data(key, column))?;
        let text = std::str::from_utf8(&plaintext).map_err(|_| DecryptError)?;
        Ok(SecretString::from(text))
    }
}

/// The known constant every store seals under its key when it is created, and its associated data
/// (distinct from every token's, so a token ciphertext can never pass as the key check or the
/// reverse).
const KEY_CHECK_PLAINTEXT: &[u8] = b"finx-gateway key check v1";
const KEY_CHECK_AD: &[u8] = b"finx-gateway/v1/meta/key_check";

/// How a store's key-check record compares with the key a process was started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The record decrypts: this is the store's key.
    Matches,
    /// Same key id but the record does not decrypt: the record was altered, the key is (almost
    /// surely) right. Saying "wrong key" would send the operator hunting for another key.
    Damaged,
    /// Another key: the store was created with `expected_key_id`.
    WrongKey { expected_key_id: String },
}

impl EncryptionKey {
    /// The key-check record a new store keeps beside its key id.
    pub fn seal_key_check(&self) -> Result<Vec<u8>, EncryptError> {
        self.encrypt(KEY_CHECK_PLAINTEXT, KEY_CHECK_AD)
    }

    /// Compares a store's key-check record (`stored_key_id`, `sealed`) with this key.
    pub fn check_against(&self, stored_key_id: &str, sealed: &[u8]) -> KeyCheck {
        let matches = self
            .decrypt(sealed, KEY_CHECK_AD)
            .is_ok_and(|plain| plain.as_slice() == KEY_CHECK_PLAINTEXT);
        if matches {
            KeyCheck::Matches
        } else if stored_key_id == self.key_id() {
            KeyCheck::Damaged
        } else {
            KeyCheck::WrongKey {
                expected_key_id: stored_key_id.to_owned(),
            }
        }
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> ConnectionKey {
        ConnectionKey::user(id).unwrap()
    }

    #[test]
    fn seal_and_open_round_trip() {
        let key = EncryptionKey::generate();
        let token = SecretString::from("x".repeat(5000));
        let sealed = key
            .seal_token(&user("alice"), TokenColumn::RefreshToken, &token)
            .unwrap();
        assert_eq!(sealed.len(), HEADER_LEN + 5000 + TAG_LEN);
        assert_eq!(sealed[0], FORMAT_V1);
        let opened = key
            .open_token(&user("alice"), TokenColumn::RefreshToken, &sealed)
            .unwrap();
        assert_eq!(opened.expose_secret(), token.expose_secret());
    }

    #[test]
    fn every_encryption_uses_a_fresh_nonce() {
        let key = EncryptionKey::generate();
        let a = key.encrypt(b"same", b"ad").unwrap();
        let b = key.encrypt(b"same", b"ad").unwrap();
        assert_ne!(a[1..HEADER_LEN], b[1..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn associated_data_binds_row_and_column() {
        let key = EncryptionKey::generate();
        let token = SecretString::from("token");
        let sealed = key
            .seal_token(&user("alice"), TokenColumn::RefreshToken, &token)
            .unwrap();
        assert_eq!(
            key.open_token(&user("bob"), TokenColumn::RefreshToken, &sealed)
                .unwrap_err(),
            DecryptError
        );
        assert_eq!(
            key.open_token(&user("alice"), TokenColumn::AccessToken, &sealed)
                .unwrap_err(),
            DecryptError
        );
        let flow = ConnectionKey::flow("svc", "alice").unwrap();
        assert!(key
            .open_token(&flow, TokenColumn::RefreshToken, &sealed)
            .is_err());
    }

    #[test]
    fn tampering_truncation_and_other_keys_fail_without_panicking() {
        let key = EncryptionKey::generate();
        let sealed = key.encrypt(b"secret", b"ad").unwrap();
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 0x01;
            assert_eq!(key.decrypt(&flipped, b"ad").unwrap_err(), DecryptError);
        }
        for len in 0..sealed.len() {
            assert_eq!(
                key.decrypt(&sealed[..len], b"ad").unwrap_err(),
                DecryptError
            );
        }
        let other = EncryptionKey::generate();
        assert_eq!(other.decrypt(&sealed, b"ad").unwrap_err(), DecryptError);
    }

    #[test]
    fn base64_round_trip_and_key_id() {
        let key = EncryptionKey::generate();
        let encoded = key.to_base64();
        assert_eq!(encoded.expose_secret().len(), 44);
        let again = EncryptionKey::from_base64(
            &format!("  {}\n", encoded.expose_secret()),
            KeySource::Env("TEST".into()),
        )
        .unwrap();
        assert_eq!(again.key_id(), key.key_id());
        assert_eq!(key.key_id().len(), 16);
        assert!(key.key_id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(key.key_id(), EncryptionKey::generate().key_id());
    }

    #[test]
    fn key_id_is_domain_separated_sha256() {
        let key = EncryptionKey::from_base64(
            &STANDARD.encode([7u8; KEY_LEN]),
            KeySource::Env("TEST".into()),
        )
        .unwrap();
        let mut input = KEY_ID_DOMAIN.to_vec();
        input.extend_from_slice(&[7u8; KEY_LEN]);
        let expected: String = Sha256::digest(&input)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key.key_id(), expected);
        let plain: String = Sha256::digest([7u8; KEY_LEN])[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(key.key_id(), plain);
    }

    #[test]
    fn debug_shows_only_the_key_id() {
        let key = EncryptionKey::generate();
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.key_id()));
        assert!(!debug.contains(key.to_base64().expose_secret()));
        assert!(!debug.contains(&format!("{:?}", &key.bytes[..])));
    }
}
