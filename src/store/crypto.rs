//! AEAD encryption of tokens at rest, and the key ring that makes key rotation possible.
//!
//! An [`EncryptionKey`] (32 bytes, XChaCha20-Poly1305) comes from a file or an environment
//! variable holding it as standard base64, never from the configuration file inline. It is
//! identified in logs, errors and the database by its [`EncryptionKey::key_id`], a truncated
//! domain-separated SHA-256 that reveals nothing usable.
//!
//! # Sealed format
//!
//! Format 2, written by every seal: `2 || key id (8 bytes) || nonce (24 bytes) || ciphertext ||
//! tag (16 bytes)`. The version byte and the key id are authenticated too (they precede the
//! associated data). Format 1, written by earlier builds and still read: `1 || nonce ||
//! ciphertext || tag`; it does not say which key sealed it, so a store opens it with the key its
//! key-check record is sealed under (by definition the key it was sealed with: builds that wrote
//! format 1 had exactly one key, the store's).
//!
//! The associated data binds a token to its connection and column ([`token_associated_data`]), so
//! a ciphertext copied into another row or column fails to decrypt instead of handing one user's
//! token to another.
//!
//! # Key rotation: why the key id is in the value, not in a column
//!
//! A [`KeyRing`] holds the primary key (every seal uses it) and previous keys (still opened). Each
//! sealed value names its key, so one value is enough to know how to open it: a row may hold a
//! refresh token sealed under the old key next to an access token sealed under the new one (a
//! refresh that returned no new refresh token writes only the access token), which a per-row
//! key-id column could not describe without re-sealing on the refresh path. No schema migration
//! is needed either; the stores count values by key id straight from the first bytes of each
//! value (see [`sealed_by`]). The connections table's `key_id` column stays what it was: the
//! primary key id of the row's last write, for operators, never used to decrypt.

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
use crate::secret::SecretRef;

/// Length of an encryption key in bytes.
pub const KEY_LEN: usize = 32;

/// First byte of every sealed value; bump it when the format or the AEAD changes so old rows
/// can still be recognised (and migrated) rather than misread.
const FORMAT_V1: u8 = 1;
/// Format 2: the key id follows the version byte (see the module docs).
const FORMAT_V2: u8 = 2;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Length of a key id in bytes (16 hex characters in text).
pub const KEY_ID_LEN: usize = 8;
const V1_HEADER_LEN: usize = 1 + NONCE_LEN;
/// `version || key id`, authenticated as a prefix of the associated data.
const V2_PREFIX_LEN: usize = 1 + KEY_ID_LEN;
const V2_HEADER_LEN: usize = V2_PREFIX_LEN + NONCE_LEN;

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

/// A key id as text: 16 lowercase hex characters.
fn hex_id(id: &[u8; KEY_ID_LEN]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Format 2's associated data: the authenticated prefix (`version || key id`), then the
/// caller's. The prefix has a fixed length, so the concatenation is unambiguous.
fn v2_associated_data(prefix: &[u8], associated_data: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(prefix.len() + associated_data.len());
    aad.extend_from_slice(prefix);
    aad.extend_from_slice(associated_data);
    aad
}

/// Which key a sealed value says sealed it, read from its first bytes (nothing is decrypted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedBy {
    /// Format 1: names no key (the key of the store's key-check record, by definition).
    Format1,
    /// Format 2, sealed under the key with these id bytes.
    Key([u8; KEY_ID_LEN]),
    /// Neither format: damaged.
    Unrecognised,
}

impl SealedBy {
    /// The key id as text (`None` for format 1 and damaged values).
    pub fn key_id(&self) -> Option<String> {
        match self {
            Self::Key(id) => Some(hex_id(id)),
            Self::Format1 | Self::Unrecognised => None,
        }
    }
}

/// Reads which key sealed `sealed` (see [`SealedBy`]).
pub fn sealed_by(sealed: &[u8]) -> SealedBy {
    match sealed.first() {
        Some(&FORMAT_V1) => SealedBy::Format1,
        Some(&FORMAT_V2) if sealed.len() >= V2_PREFIX_LEN => {
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&sealed[1..V2_PREFIX_LEN]);
            SealedBy::Key(id)
        }
        _ => SealedBy::Unrecognised,
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
    BadEncoding { origin: SecretRef },
    /// The content decodes to the wrong number of bytes.
    #[error("the encryption key in {origin} decodes to {actual} bytes; expected {KEY_LEN}")]
    WrongLength { origin: SecretRef, actual: usize },
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
    /// The key id's bytes, computed once.
    id: [u8; KEY_ID_LEN],
}

impl EncryptionKey {
    fn from_bytes(bytes: Box<Zeroizing<[u8; KEY_LEN]>>) -> Self {
        let digest = Sha256::new()
            .chain_update(KEY_ID_DOMAIN)
            .chain_update(&bytes[..])
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self { bytes, id }
    }

    /// A fresh random key (for `finx-gateway` key generation, the demo and tests).
    pub fn generate() -> Self {
        let mut bytes = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        rand::rng().fill_bytes(&mut bytes[..]);
        Self::from_bytes(bytes)
    }

    /// Decodes a standard-base64 key; surrounding whitespace is ignored. `origin` only names
    /// where it came from in errors.
    pub fn from_base64(encoded: &str, origin: SecretRef) -> Result<Self, KeyError> {
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
        Ok(Self::from_bytes(bytes))
    }

    /// Reads and decodes the key from where `source` names.
    pub fn load(source: &SecretRef) -> Result<Self, KeyError> {
        match source {
            SecretRef::File(path) => Self::from_file(path),
            SecretRef::Env(var) => Self::from_env(var),
        }
    }

    /// Reads the key from a file holding it as standard base64.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let content =
            Zeroizing::new(std::fs::read(path).map_err(|e| KeyError::FileUnreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?);
        let origin = SecretRef::File(path.to_path_buf());
        // Non-UTF-8 content cannot be base64 anyway; report it as such without echoing it.
        let text = std::str::from_utf8(&content).map_err(|_| KeyError::BadEncoding {
            origin: origin.clone(),
        })?;
        Self::from_base64(text, origin)
    }

    /// Reads the key from the environment variable `var`, holding it as standard base64.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let origin = SecretRef::Env(var.to_owned());
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
        hex_id(&self.id)
    }

    /// Whether this is the key with id `key_id` (as [`EncryptionKey::key_id`] spells it).
    pub fn has_key_id(&self, key_id: &str) -> bool {
        hex_id(&self.id) == key_id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // The cipher keeps its own copy of the key and zeroizes it on drop.
        XChaCha20Poly1305::new(Key::from_slice(&self.bytes[..]))
    }

    /// Encrypts `plaintext` under a fresh random nonce, binding it to `associated_data`, in
    /// format 2 (which names this key).
    pub fn encrypt(
        &self,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<Vec<u8>, EncryptError> {
        // One allocation of the final size, encrypted in place: no reallocation ever leaves a
        // stray plaintext copy behind in freed memory.
        let mut sealed = Vec::with_capacity(V2_HEADER_LEN + plaintext.len() + TAG_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        sealed.push(FORMAT_V2);
        sealed.extend_from_slice(&self.id);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let aad = v2_associated_data(&sealed[..V2_PREFIX_LEN], associated_data);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut sealed[V2_HEADER_LEN..],
            )
            .map_err(|_| EncryptError)?;
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    /// Decrypts a value sealed by [`EncryptionKey::encrypt`] with the same associated data: a
    /// format-2 value only if it names this key, a format-1 value (which names no key) by trying.
    pub fn decrypt(
        &self,
        sealed: &[u8],
        associated_data: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        match sealed_by(sealed) {
            SealedBy::Key(id) if id == self.id => {
                let aad = v2_associated_data(&sealed[..V2_PREFIX_LEN], associated_data);
                self.open_at(sealed, V2_HEADER_LEN, &aad)
            }
            SealedBy::Format1 => self.open_at(sealed, V1_HEADER_LEN, associated_data),
            SealedBy::Key(_) | SealedBy::Unrecognised => Err(DecryptError),
        }
    }

    /// Opens `sealed`, whose nonce ends at `header_len`.
    fn open_at(
        &self,
        sealed: &[u8],
        header_len: usize,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        if sealed.len() < header_len + TAG_LEN {
            return Err(DecryptError);
        }
        let (header, rest) = sealed.split_at(header_len);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        self.cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(&header[header_len - NONCE_LEN..]),
                aad,
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

    /// Whether `sealed` is a key-check record sealed under this key.
    fn opens_key_check(&self, sealed: &[u8]) -> bool {
        self.decrypt(sealed, KEY_CHECK_AD)
            .is_ok_and(|plain| plain.as_slice() == KEY_CHECK_PLAINTEXT)
    }

    /// Compares a store's key-check record (`stored_key_id`, `sealed`) with this key.
    pub fn check_against(&self, stored_key_id: &str, sealed: &[u8]) -> KeyCheck {
        if self.opens_key_check(sealed) {
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

/// The keys a store decrypts with: the primary key, which seals every write, and previous keys,
/// which only open what they sealed (until a rotation has re-sealed it under the primary key).
///
/// Opening picks the key a value names (format 2); a format-1 value, which names none, is
/// opened with the key the store's key-check record matched ([`KeyRing::accept_key_check`]), or
/// by trying every key when no store said (the local journal).
pub struct KeyRing {
    /// The primary key first, then the previous keys; no key twice.
    keys: Vec<EncryptionKey>,
    /// The index in `keys` of the key format-1 values are opened with.
    format1: Option<usize>,
}

impl KeyRing {
    /// A ring sealing under `primary` and opening what any of `previous` sealed too. A previous
    /// key given twice, or equal to the primary key, is kept once.
    pub fn new(primary: EncryptionKey, previous: impl IntoIterator<Item = EncryptionKey>) -> Self {
        let mut keys = vec![primary];
        for key in previous {
            if !keys.iter().any(|known| known.id == key.id) {
                keys.push(key);
            }
        }
        Self {
            keys,
            format1: None,
        }
    }

    /// The key every seal uses.
    pub fn primary(&self) -> &EncryptionKey {
        &self.keys[0]
    }

    /// The primary key's id.
    pub fn primary_key_id(&self) -> String {
        self.primary().key_id()
    }

    /// Every key's id, the primary key's first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(EncryptionKey::key_id).collect()
    }

    /// The ids for messages: `"<primary>"`, or `"<primary>; previous key ids <a>, <b>"`.
    pub fn describe(&self) -> String {
        let mut text = self.primary_key_id();
        if self.keys.len() > 1 {
            let previous: Vec<String> = self.keys[1..].iter().map(EncryptionKey::key_id).collect();
            text.push_str("; previous key ids ");
            text.push_str(&previous.join(", "));
        }
        text
    }

    /// The first bytes of every value sealed under the primary key in the current format
    /// (`2 || primary key id`): a value starting otherwise is due for re-sealing.
    pub fn current_prefix(&self) -> [u8; V2_PREFIX_LEN] {
        let mut prefix = [0u8; V2_PREFIX_LEN];
        prefix[0] = FORMAT_V2;
        prefix[1..].copy_from_slice(&self.primary().id);
        prefix
    }

    /// Whether `sealed` is sealed under the primary key in the current format.
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed.starts_with(&self.current_prefix())
    }

    /// Compares a store's key-check record with every key of the ring. On a match, the matching
    /// key becomes the one format-1 values are opened with (they were sealed under the store's
    /// key, and the record is sealed under it).
    pub fn accept_key_check(&mut self, stored_key_id: &str, sealed: &[u8]) -> KeyCheck {
        let matching = self.keys.iter().position(|key| key.opens_key_check(sealed));
        if let Some(index) = matching {
            self.format1 = Some(index);
            KeyCheck::Matches
        } else if self.keys.iter().any(|key| key.has_key_id(stored_key_id)) {
            KeyCheck::Damaged
        } else {
            KeyCheck::WrongKey {
                expected_key_id: stored_key_id.to_owned(),
            }
        }
    }

    /// Encrypts under the primary key (see [`EncryptionKey::encrypt`]).
    pub fn encrypt(
        &self,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<Vec<u8>, EncryptError> {
        self.primary().encrypt(plaintext, associated_data)
    }

    /// Decrypts a value sealed under any key of the ring, choosing the key the value names.
    pub fn decrypt(
        &self,
        sealed: &[u8],
        associated_data: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        match sealed_by(sealed) {
            SealedBy::Key(id) => self
                .keys
                .iter()
                .find(|key| key.id == id)
                .ok_or(DecryptError)?
                .decrypt(sealed, associated_data),
            SealedBy::Format1 => match self.format1.and_then(|index| self.keys.get(index)) {
                Some(key) => key.decrypt(sealed, associated_data),
                None => self
                    .keys
                    .iter()
                    .find_map(|key| key.decrypt(sealed, associated_data).ok())
                    .ok_or(DecryptError),
            },
            SealedBy::Unrecognised => Err(DecryptError),
        }
    }

    /// Encrypts a token for `column` of connection `key` under the primary key.
    pub fn seal_token(
        &self,
        key: &ConnectionKey,
        column: TokenColumn,
        token: &SecretString,
    ) -> Result<Vec<u8>, EncryptError> {
        self.primary().seal_token(key, column, token)
    }

    /// Decrypts a token sealed for the same connection and column under any key of the ring.
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

    /// The key-check record of a new store, or of one whose rotation completed: sealed under
    /// the primary key.
    pub fn seal_key_check(&self) -> Result<Vec<u8>, EncryptError> {
        self.primary().seal_key_check()
    }
}

impl From<EncryptionKey> for KeyRing {
    /// A ring of one key: no rotation in progress.
    fn from(primary: EncryptionKey) -> Self {
        Self::new(primary, [])
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl EncryptionKey {
    /// A value in format 1, as builds before key rotation sealed it (for tests of old stores).
    pub(crate) fn encrypt_format1(&self, plaintext: &[u8], associated_data: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut sealed = vec![FORMAT_V1];
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                associated_data,
                &mut sealed[V1_HEADER_LEN..],
            )
            .expect("small plaintext");
        sealed.extend_from_slice(&tag);
        sealed
    }

    /// A key-check record in format 1.
    pub(crate) fn seal_key_check_format1(&self) -> Vec<u8> {
        self.encrypt_format1(KEY_CHECK_PLAINTEXT, KEY_CHECK_AD)
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
        assert_eq!(sealed.len(), V2_HEADER_LEN + 5000 + TAG_LEN);
        assert_eq!(sealed[0], FORMAT_V2);
        assert_eq!(sealed[1..V2_PREFIX_LEN], key.id);
        assert_eq!(sealed_by(&sealed).key_id(), Some(key.key_id()));
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
        assert_ne!(
            a[V2_PREFIX_LEN..V2_HEADER_LEN],
            b[V2_PREFIX_LEN..V2_HEADER_LEN]
        );
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

    fn seal_v1(key: &EncryptionKey, plaintext: &[u8], ad: &[u8]) -> Vec<u8> {
        key.encrypt_format1(plaintext, ad)
    }

    fn copy(key: &EncryptionKey) -> EncryptionKey {
        EncryptionKey::from_base64(key.to_base64().expose_secret(), SecretRef::Env("T".into()))
            .unwrap()
    }

    #[test]
    fn format_1_values_still_open() {
        let key = EncryptionKey::generate();
        let old = seal_v1(&key, b"old token", b"ad");
        assert_eq!(sealed_by(&old), SealedBy::Format1);
        assert_eq!(&key.decrypt(&old, b"ad").unwrap()[..], b"old token");
        assert_eq!(key.decrypt(&old, b"other").unwrap_err(), DecryptError);
        let other = EncryptionKey::generate();
        assert_eq!(other.decrypt(&old, b"ad").unwrap_err(), DecryptError);
    }

    #[test]
    fn the_version_byte_and_key_id_are_authenticated() {
        let (a, b) = (EncryptionKey::generate(), EncryptionKey::generate());
        let ring = KeyRing::new(copy(&a), [copy(&b)]);
        let sealed = a.encrypt(b"secret", b"ad").unwrap();
        // Naming another key of the ring does not make it open.
        let mut renamed = sealed.clone();
        renamed[1..V2_PREFIX_LEN].copy_from_slice(&b.id);
        assert_eq!(ring.decrypt(&renamed, b"ad").unwrap_err(), DecryptError);
        // Nor does relabelling it format 1.
        let mut relabelled = sealed.clone();
        relabelled[0] = FORMAT_V1;
        assert_eq!(ring.decrypt(&relabelled, b"ad").unwrap_err(), DecryptError);
        assert_eq!(&ring.decrypt(&sealed, b"ad").unwrap()[..], b"secret");
    }

    #[test]
    fn a_ring_seals_under_its_primary_and_opens_what_any_of_its_keys_sealed() {
        let (old, new, stranger) = (
            EncryptionKey::generate(),
            EncryptionKey::generate(),
            EncryptionKey::generate(),
        );
        let ring = KeyRing::new(copy(&new), [copy(&old), copy(&new), copy(&old)]);
        assert_eq!(ring.key_ids(), vec![new.key_id(), old.key_id()]);
        assert_eq!(
            ring.describe(),
            format!("{}; previous key ids {}", new.key_id(), old.key_id())
        );
        let token = SecretString::from("token");
        let alice = user("alice");
        let by_old = old
            .seal_token(&alice, TokenColumn::RefreshToken, &token)
            .unwrap();
        let opened = ring
            .open_token(&alice, TokenColumn::RefreshToken, &by_old)
            .unwrap();
        assert_eq!(opened.expose_secret(), "token");
        assert!(!ring.is_current(&by_old));

        let by_ring = ring
            .seal_token(&alice, TokenColumn::RefreshToken, &token)
            .unwrap();
        assert!(ring.is_current(&by_ring));
        assert_eq!(sealed_by(&by_ring).key_id(), Some(new.key_id()));
        assert!(new
            .open_token(&alice, TokenColumn::RefreshToken, &by_ring)
            .is_ok());
        assert!(old
            .open_token(&alice, TokenColumn::RefreshToken, &by_ring)
            .is_err());

        let by_stranger = stranger
            .seal_token(&alice, TokenColumn::RefreshToken, &token)
            .unwrap();
        assert!(ring
            .open_token(&alice, TokenColumn::RefreshToken, &by_stranger)
            .is_err());
        assert!(!format!("{ring:?}").contains(new.to_base64().expose_secret()));
    }

    #[test]
    fn format_1_values_open_with_the_key_the_key_check_matched() {
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let v1 = seal_v1(&old, b"legacy", b"ad");
        // No store said which key: every key is tried (the journal).
        let ring = KeyRing::new(copy(&new), [copy(&old)]);
        assert_eq!(&ring.decrypt(&v1, b"ad").unwrap()[..], b"legacy");

        let mut ring = KeyRing::new(copy(&new), [copy(&old)]);
        let check = seal_v1(&old, KEY_CHECK_PLAINTEXT, KEY_CHECK_AD);
        assert_eq!(
            ring.accept_key_check(&old.key_id(), &check),
            KeyCheck::Matches
        );
        assert_eq!(&ring.decrypt(&v1, b"ad").unwrap()[..], b"legacy");
        assert!(!ring.is_current(&v1));

        // The record sealed under the primary key: format 1 now means the primary key.
        let mut ring = KeyRing::new(copy(&new), [copy(&old)]);
        let check = new.seal_key_check().unwrap();
        assert_eq!(
            ring.accept_key_check(&new.key_id(), &check),
            KeyCheck::Matches
        );
        assert_eq!(ring.decrypt(&v1, b"ad").unwrap_err(), DecryptError);
    }

    #[test]
    fn a_key_check_accepts_any_key_of_the_ring_and_nothing_else() {
        let (old, new, stranger) = (
            EncryptionKey::generate(),
            EncryptionKey::generate(),
            EncryptionKey::generate(),
        );
        let check = old.seal_key_check().unwrap();
        let mut ring = KeyRing::new(copy(&new), [copy(&old)]);
        assert_eq!(
            ring.accept_key_check(&old.key_id(), &check),
            KeyCheck::Matches
        );
        let mut alone = KeyRing::from(copy(&new));
        assert_eq!(
            alone.accept_key_check(&old.key_id(), &check),
            KeyCheck::WrongKey {
                expected_key_id: old.key_id()
            }
        );
        let mut damaged = check.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(
            ring.accept_key_check(&old.key_id(), &damaged),
            KeyCheck::Damaged
        );
        let mut strangers = KeyRing::from(stranger);
        assert!(matches!(
            strangers.accept_key_check(&old.key_id(), &check),
            KeyCheck::WrongKey { .. }
        ));
    }

    #[test]
    fn base64_round_trip_and_key_id() {
        let key = EncryptionKey::generate();
        let encoded = key.to_base64();
        assert_eq!(encoded.expose_secret().len(), 44);
        let again = EncryptionKey::from_base64(
            &format!("  {}\n", encoded.expose_secret()),
            SecretRef::Env("TEST".into()),
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
            SecretRef::Env("TEST".into()),
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
