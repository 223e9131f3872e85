//! Encryption-key rotation: re-sealing every stored token under the primary key while gateways
//! keep serving, then moving the store's key-check record to the primary key.
//!
//! The steps are [`TokenStore`] methods, so every store implements them over its own locking:
//!
//! - [`TokenStore::key_status`] counts connections by the key ids their tokens are sealed under
//!   (read from each value's first bytes; see [`super::crypto`]). Key ids only, never keys.
//! - [`TokenStore::reencrypt_batch`] re-seals, under the primary key, up to `limit` connections
//!   that hold a token under another key (or in format 1), in key order after a cursor. It
//!   never bumps a row's version, so a refresh in flight still commits (compare-and-swap on the
//!   version it read); and it writes a row only if that row still has the version and
//!   ciphertexts it read (PostgreSQL: under the row lock, skipping rows a refresh holds), so a
//!   write that lands in between is never overwritten: that row is left for the next pass.
//! - [`TokenStore::complete_rotation`] rewrites the key-check record under the primary key once
//!   no connection holds a token under another key. From then on the store opens with the
//!   primary key alone, and previous keys can be dropped from every config.
//!
//! [`rotate`] drives the steps to completion: passes over the table until a pass leaves
//! nothing behind, then the completion. `store rotate-key` runs it; its future is `Send`, so a
//! serving process can run it as a task of its own. Callers that want one step per call (an
//! HTTP endpoint) use the three methods directly, handing back the [`RotationCursor`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use secrecy::SecretString;

use super::crypto::{KeyRing, TokenColumn};
use super::{ConnectionKey, StoreError, TokenStore};

/// How a store's connections are sealed, by key id (never key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The key every write of this process seals under.
    pub primary_key_id: String,
    /// The key the store's key-check record is sealed under: a process whose keys do not
    /// include it cannot open the store. It moves to the primary key when a rotation completes.
    pub check_key_id: String,
    /// Connections whose every token is sealed under the primary key.
    pub current: u64,
    /// Connections holding a token under another key, or in format 1 (which names no key; a
    /// rotation re-seals those too).
    pub pending: u64,
    /// For each key id, the connections holding at least one token sealed under it; format-1
    /// tokens count under `check_key_id`.
    pub by_key_id: BTreeMap<String, u64>,
    /// Connections holding at least one format-1 token.
    pub format1: u64,
}

impl KeyStatus {
    /// Whether nothing is left to rotate: every token is under the primary key and so is the
    /// key-check record. Previous keys are then no longer needed.
    pub fn is_complete(&self) -> bool {
        self.pending == 0 && self.check_key_id == self.primary_key_id
    }

    /// Key ids other than the primary one that some connection still uses.
    pub fn other_key_ids(&self) -> Vec<String> {
        self.by_key_id
            .keys()
            .filter(|id| **id != self.primary_key_id)
            .cloned()
            .collect()
    }

    /// Counts connections from groups of `(refresh label, access label, connections)`, where a
    /// label is a key id in hex, [`LABEL_FORMAT1`] for a format-1 (or unrecognisable) value and
    /// [`LABEL_NONE`] for no token. Both stores compute the labels in SQL.
    pub(crate) fn tally(
        primary_key_id: String,
        check_key_id: String,
        groups: impl IntoIterator<Item = (String, String, i64)>,
    ) -> Self {
        let mut status = Self {
            primary_key_id,
            check_key_id,
            current: 0,
            pending: 0,
            by_key_id: BTreeMap::new(),
            format1: 0,
        };
        for (refresh, access, count) in groups {
            let count = u64::try_from(count).unwrap_or(0);
            let labels: BTreeSet<&str> = [refresh.as_str(), access.as_str()]
                .into_iter()
                .filter(|label| *label != LABEL_NONE)
                .collect();
            let mut keys = BTreeSet::new();
            for label in &labels {
                if *label == LABEL_FORMAT1 {
                    keys.insert(status.check_key_id.clone());
                } else {
                    keys.insert((*label).to_owned());
                }
            }
            if labels.contains(LABEL_FORMAT1) {
                status.format1 += count;
            }
            if labels.iter().all(|label| *label == status.primary_key_id) {
                status.current += count;
            } else {
                status.pending += count;
            }
            for key in keys {
                *status.by_key_id.entry(key).or_default() += count;
            }
        }
        status
    }
}

/// The SQL label of a value that names no key (see [`KeyStatus::tally`]).
pub(crate) const LABEL_FORMAT1: &str = "1";
/// The SQL label of a missing token (no access token yet).
pub(crate) const LABEL_NONE: &str = "";

/// Where a pass of [`TokenStore::reencrypt_batch`] resumes: after this connection, in the
/// store's key order. Pass back what a batch returned; its text (a stored connection key, not a
/// secret) may travel through an API and come back with [`RotationCursor::new`].
#[derive(Clone, PartialEq, Eq)]
pub struct RotationCursor(pub(crate) String);

impl RotationCursor {
    /// A cursor from the text [`RotationCursor::as_str`] gave.
    pub fn new(after: impl Into<String>) -> Self {
        Self(after.into())
    }

    /// The stored key of the last connection a batch read.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RotationCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A connection key, not a secret.
        write!(f, "RotationCursor({:?})", self.0)
    }
}

/// What one [`TokenStore::reencrypt_batch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReencryptBatch {
    /// Connections due for re-sealing that this batch read.
    pub examined: u64,
    /// Of those, re-sealed under the primary key.
    pub resealed: u64,
    /// Of those, written by someone else between this batch's read and its write: left as
    /// they are (the writer sealed under its own primary key), looked at again next pass.
    pub raced: u64,
    /// Of those, tokens no key of the ring opens (tampered, or sealed under a key not
    /// configured): left alone, and they keep the rotation from completing.
    pub unreadable: Vec<ConnectionKey>,
    /// Where the next batch of this pass starts; `None` when this batch reached the end.
    pub next: Option<RotationCursor>,
}

/// A connection due for re-sealing, as read.
pub(crate) struct DueRow {
    pub stored_key: String,
    pub version: i64,
    pub refresh: Vec<u8>,
    pub access: Option<Vec<u8>>,
}

/// A due connection's tokens re-sealed under the primary key, with what it held when read (the
/// write compares against it).
pub(crate) struct Resealed {
    pub key: ConnectionKey,
    pub version: i64,
    pub old_refresh: Vec<u8>,
    pub old_access: Option<Vec<u8>>,
    pub refresh: Vec<u8>,
    pub access: Option<Vec<u8>>,
}

/// Opens each due row with the ring and seals its tokens again under the primary key. Rows
/// whose tokens do not open are recorded in `batch.unreadable`; `batch.examined` and
/// `batch.next` are set from `rows` (`limit` rows read means there may be more).
pub(crate) fn reseal_rows(
    ring: &KeyRing,
    rows: Vec<DueRow>,
    limit: u32,
    batch: &mut ReencryptBatch,
) -> Result<Vec<Resealed>, StoreError> {
    batch.examined = rows.len() as u64;
    batch.next = (rows.len() >= limit as usize)
        .then(|| {
            rows.last()
                .map(|row| RotationCursor(row.stored_key.clone()))
        })
        .flatten();
    let mut resealed = Vec::with_capacity(rows.len());
    for row in rows {
        let Ok(key) = ConnectionKey::from_stored(&row.stored_key) else {
            tracing::warn!("token store holds a row with an invalid connection key; not re-sealed");
            continue;
        };
        let open = |column, sealed: &[u8]| ring.open_token(&key, column, sealed).ok();
        let refresh = open(TokenColumn::RefreshToken, &row.refresh);
        let access = match &row.access {
            Some(sealed) => open(TokenColumn::AccessToken, sealed).map(Some),
            None => Some(None),
        };
        let (Some(refresh), Some(access)) = (refresh, access) else {
            tracing::warn!(
                connection = %key,
                "stored token opens with no configured key (tampered, or another key); not re-sealed"
            );
            batch.unreadable.push(key);
            continue;
        };
        let seal = |column, token: &SecretString| {
            ring.seal_token(&key, column, token)
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        };
        let refresh = seal(TokenColumn::RefreshToken, &refresh)?;
        let access = access
            .map(|token| seal(TokenColumn::AccessToken, &token))
            .transpose()?;
        resealed.push(Resealed {
            version: row.version,
            old_refresh: row.refresh,
            old_access: row.access,
            refresh,
            access,
            key,
        });
    }
    Ok(resealed)
}

/// How [`rotate`] paces itself.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Connections per batch (each batch is one short write transaction).
    pub batch_size: u32,
    /// Passes over the table before giving up on connections that keep being left behind.
    pub max_passes: u32,
    /// Pause before a pass that follows one which re-sealed nothing (a refresh may be holding
    /// the rows left).
    pub idle_pause: Duration,
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self {
            batch_size: 200,
            max_passes: 20,
            idle_pause: Duration::from_millis(500),
        }
    }
}

/// Where a running [`rotate`] stands, reported after every batch.
#[derive(Debug, Clone, Default)]
pub struct RotationProgress {
    /// The pass over the table, from 1.
    pub pass: u32,
    /// Batches run so far, over every pass.
    pub batches: u64,
    /// Connections re-sealed so far.
    pub resealed: u64,
    /// Connections written by someone else while being re-sealed so far (retried next pass).
    pub raced: u64,
    /// The batch just run.
    pub last: ReencryptBatch,
}

/// Why [`rotate`] stopped before completing.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Connections whose tokens no configured key opens keep older key ids in use.
    #[error(
        "{} connection(s) cannot be decrypted with any configured key (tampered, or sealed \
         under a key that is not configured): {}; they keep key id(s) {} in use. Delete or \
         re-import them (or add their key to previous_keys) and run the rotation again",
        keys.len(),
        join(keys),
        status.other_key_ids().join(", ")
    )]
    Unreadable {
        keys: Vec<ConnectionKey>,
        status: KeyStatus,
    },
    /// Connections kept being left behind, pass after pass.
    #[error(
        "{} connection(s) are still sealed under other keys (key id(s) {}) after {passes} \
         passes: refreshes kept them busy, or a gateway still seals under an older primary \
         key (every gateway must have the new key as its primary key before rotating); run the \
         rotation again",
        status.pending,
        status.other_key_ids().join(", ")
    )]
    Incomplete { status: KeyStatus, passes: u32 },
}

fn join(keys: &[ConnectionKey]) -> String {
    const SHOWN: usize = 20;
    let mut text: Vec<&str> = keys.iter().take(SHOWN).map(ConnectionKey::as_str).collect();
    if keys.len() > SHOWN {
        text.push("…");
    }
    text.join(", ")
}

/// Re-seals every connection of `store` under its primary key, pass after pass, while the
/// store keeps serving; then completes the rotation (the key-check record moves to the primary
/// key) and returns the final counts. `progress` hears of every batch.
pub async fn rotate(
    store: &dyn TokenStore,
    options: &RotationOptions,
    mut progress: impl FnMut(&RotationProgress),
) -> Result<KeyStatus, RotationError> {
    let batch_size = options.batch_size.max(1);
    let mut report = RotationProgress::default();
    let mut last_status = None;
    for pass in 1..=options.max_passes.max(1) {
        report.pass = pass;
        let (mut cursor, mut unreadable) = (None, BTreeSet::new());
        let resealed_before = report.resealed;
        loop {
            let batch = store.reencrypt_batch(cursor.as_ref(), batch_size).await?;
            report.batches += 1;
            report.resealed += batch.resealed;
            report.raced += batch.raced;
            unreadable.extend(batch.unreadable.iter().cloned());
            cursor = batch.next.clone();
            report.last = batch;
            progress(&report);
            if cursor.is_none() {
                break;
            }
        }
        let status = store.complete_rotation().await?;
        if status.is_complete() {
            return Ok(status);
        }
        if status.pending <= unreadable.len() as u64 {
            return Err(RotationError::Unreadable {
                keys: unreadable.into_iter().collect(),
                status,
            });
        }
        if report.resealed == resealed_before {
            tokio::time::sleep(options.idle_pause).await;
        }
        last_status = Some(status);
    }
    match last_status {
        Some(status) => Err(RotationError::Incomplete {
            status,
            passes: options.max_passes.max(1),
        }),
        None => Err(RotationError::Store(StoreError::Unavailable(
            "key rotation ran no pass".to_owned(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(list: &[(&str, &str, i64)]) -> Vec<(String, String, i64)> {
        list.iter()
            .map(|(r, a, n)| ((*r).to_owned(), (*a).to_owned(), *n))
            .collect()
    }

    #[test]
    fn tally_counts_connections_by_key_id() {
        let status = KeyStatus::tally(
            "bbbb".into(),
            "aaaa".into(),
            groups(&[
                ("bbbb", "bbbb", 5),
                ("bbbb", "", 2),
                ("aaaa", "bbbb", 3),
                ("1", "", 4),
                ("cccc", "cccc", 1),
            ]),
        );
        assert_eq!(status.current, 7);
        assert_eq!(status.pending, 8);
        assert_eq!(status.format1, 4);
        assert_eq!(status.by_key_id["bbbb"], 10);
        assert_eq!(status.by_key_id["aaaa"], 7);
        assert_eq!(status.by_key_id["cccc"], 1);
        assert_eq!(status.other_key_ids(), vec!["aaaa", "cccc"]);
        assert!(!status.is_complete());

        let done = KeyStatus::tally("bbbb".into(), "bbbb".into(), groups(&[("bbbb", "", 1)]));
        assert!(done.is_complete());
        // Format 1 under the primary key's record is still re-sealed (into format 2).
        let legacy = KeyStatus::tally("bbbb".into(), "bbbb".into(), groups(&[("1", "", 1)]));
        assert_eq!(legacy.pending, 1);
        assert!(!legacy.is_complete());
    }

    /// A serving process can spawn a rotation as a task of its own.
    #[test]
    fn a_rotation_is_a_send_future() {
        fn assert_send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(
            &dir.path().join("t.db"),
            crate::store::crypto::EncryptionKey::generate(),
        )
        .unwrap();
        let store: std::sync::Arc<dyn TokenStore> = std::sync::Arc::new(store);
        let options = RotationOptions::default();
        let mut batches = 0;
        let rotation = rotate(store.as_ref(), &options, |_| batches += 1);
        assert_send(&rotation);
    }
}
