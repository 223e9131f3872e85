//! The local write-ahead journal of rotated grants: the first durable copy of every grant finX
//! issues. As soon as finX answers a refresh, the grant is appended here (sealed with the
//! store's key) and fsynced; only then is it committed to the store, after which a "done" mark
//! is appended. A crash, a stop or a store outage anywhere after finX's answer therefore leaves
//! the grant in the journal, and the next start commits it (compare-and-swap on the row version
//! it was refreshed from, so a grant whose row has moved on since is dropped, never applied
//! twice). What remains at risk is only the time between finX's answer and this one append.
//!
//! The file is a sequence of JSON lines. A torn last line (a crash mid-append) is ignored: its
//! grant was never acknowledged as durable. The file is compacted (rewritten with only the
//! grants still pending, atomically) when it grows and at start-up.
//!
//! This module may depend on `store` (types and crypto) only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::memory::Uncommitted;
use crate::store::crypto::KeyRing;
use crate::store::{AccessToken, ConnectionKey, TokenGrant};

/// Compact once the file is larger than this.
const COMPACT_AT_BYTES: u64 = 4 * 1024 * 1024;

/// Why the journal could not be read or written. Never contains a token.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("journal {}: an entry does not decrypt with the store's key or is damaged", path.display())]
    Damaged { path: PathBuf },
}

/// One line of the file.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    /// A grant finX issued, not yet known to be committed. Tokens sealed, base64.
    Grant {
        seq: u64,
        key: String,
        expected_version: i64,
        refreshed_at: i64,
        access: String,
        expires_at: i64,
        refresh: Option<String>,
        scope: Option<String>,
    },
    /// The grant `seq` is committed to the store, or was dropped.
    Done { seq: u64 },
}

/// The open file and the grants still pending in it.
struct State {
    file: Option<File>,
    next_seq: u64,
    /// Pending grants by sequence number, as their serialized lines.
    pending: BTreeMap<u64, String>,
    size: u64,
}

/// The journal file and the key its entries are sealed with. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Seals under the store's primary key; opens entries an earlier run sealed under a key
    /// that is now a previous key (a restart in the middle of a key rotation).
    key: KeyRing,
    state: Mutex<State>,
}

fn associated_data(key: &ConnectionKey, column: &str) -> Vec<u8> {
    format!("finx-gateway/v1/journal/{}/{column}", key.as_str()).into_bytes()
}

impl Journal {
    pub fn new(path: PathBuf, key: impl Into<KeyRing>) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                key: key.into(),
                state: Mutex::new(State {
                    file: None,
                    next_seq: 1,
                    pending: BTreeMap::new(),
                    size: 0,
                }),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn io(&self, reason: impl std::fmt::Display) -> JournalError {
        JournalError::Io {
            path: self.inner.path.clone(),
            reason: reason.to_string(),
        }
    }

    fn damaged(&self) -> JournalError {
        JournalError::Damaged {
            path: self.inner.path.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic mid-append leaves at worst a torn last line, which readers ignore.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn seal(
        &self,
        key: &ConnectionKey,
        column: &str,
        token: &SecretString,
    ) -> Result<String, JournalError> {
        self.inner
            .key
            .encrypt(
                token.expose_secret().as_bytes(),
                &associated_data(key, column),
            )
            .map(|sealed| STANDARD.encode(sealed))
            .map_err(|e| self.io(e))
    }

    fn open(
        &self,
        key: &ConnectionKey,
        column: &str,
        sealed: &str,
    ) -> Result<SecretString, JournalError> {
        let bytes = STANDARD.decode(sealed).map_err(|_| self.damaged())?;
        let plain = self
            .inner
            .key
            .decrypt(&bytes, &associated_data(key, column))
            .map_err(|_| self.damaged())?;
        let text = std::str::from_utf8(&plain).map_err(|_| self.damaged())?;
        Ok(SecretString::from(text))
    }

    /// Reads what earlier runs left pending and rewrites the file with exactly that. Call once,
    /// at start-up, before anything is recorded.
    pub fn recover(&self) -> Result<Vec<(ConnectionKey, Uncommitted)>, JournalError> {
        let text = match std::fs::read_to_string(&self.inner.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.io(e)),
        };
        let mut grants = BTreeMap::new();
        let mut highest = 0;
        for line in text.lines() {
            // A torn last line is a grant that was never acknowledged: skip it.
            let Ok(parsed) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            match parsed {
                Line::Grant { seq, .. } => {
                    highest = highest.max(seq);
                    grants.insert(seq, line.to_owned());
                }
                Line::Done { seq } => {
                    grants.remove(&seq);
                }
            }
        }
        let mut pending = Vec::new();
        for (seq, line) in &grants {
            let seq = *seq;
            if let Ok(Line::Grant {
                key,
                expected_version,
                refreshed_at,
                access,
                expires_at,
                refresh,
                scope,
                ..
            }) = serde_json::from_str::<Line>(line)
            {
                let key = ConnectionKey::from_stored(&key).map_err(|_| self.damaged())?;
                let grant = TokenGrant {
                    access: AccessToken {
                        token: self.open(&key, "access", &access)?,
                        expires_at,
                    },
                    refresh_token: refresh
                        .as_deref()
                        .map(|sealed| self.open(&key, "refresh", sealed))
                        .transpose()?,
                    scope,
                };
                pending.push((
                    key,
                    Uncommitted {
                        expected_version,
                        grant,
                        refreshed_at,
                        journal_seq: Some(seq),
                    },
                ));
            }
        }
        let mut state = self.lock();
        state.next_seq = highest + 1;
        state.pending = grants;
        self.compact(&mut state)?;
        Ok(pending)
    }

    /// Appends `pending` and makes it durable; returns its sequence number for [`Self::done`].
    /// Blocking (an fsync): call it from a blocking context.
    pub fn record(&self, key: &ConnectionKey, pending: &Uncommitted) -> Result<u64, JournalError> {
        let access = self.seal(key, "access", &pending.grant.access.token)?;
        let refresh = pending
            .grant
            .refresh_token
            .as_ref()
            .map(|token| self.seal(key, "refresh", token))
            .transpose()?;
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        let line = serde_json::to_string(&Line::Grant {
            seq,
            key: key.as_str().to_owned(),
            expected_version: pending.expected_version,
            refreshed_at: pending.refreshed_at,
            access,
            expires_at: pending.grant.access.expires_at,
            refresh,
            scope: pending.grant.scope.clone(),
        })
        .map_err(|e| self.io(e))?;
        self.append(&mut state, &line, true)?;
        state.pending.insert(seq, line);
        Ok(seq)
    }

    /// Marks `seq` committed (or dropped). Not fsynced: if the mark is lost, the next start
    /// finds the row moved on and drops the grant. Blocking.
    pub fn done(&self, seq: u64) -> Result<(), JournalError> {
        let mut state = self.lock();
        if state.pending.remove(&seq).is_none() {
            return Ok(());
        }
        let line = serde_json::to_string(&Line::Done { seq }).map_err(|e| self.io(e))?;
        self.append(&mut state, &line, false)?;
        if state.size > COMPACT_AT_BYTES {
            self.compact(&mut state)?;
        }
        Ok(())
    }

    /// Grants recorded and not yet done.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn append(&self, state: &mut State, line: &str, durable: bool) -> Result<(), JournalError> {
        if state.file.is_none() {
            let file = private_options()
                .append(true)
                .open(&self.inner.path)
                .map_err(|e| self.io(e))?;
            state.size = file.metadata().map(|m| m.len()).unwrap_or(0);
            state.file = Some(file);
        }
        let Some(file) = state.file.as_mut() else {
            return Err(self.io("not open"));
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        file.write_all(&bytes).map_err(|e| self.io(e))?;
        if durable {
            file.sync_data().map_err(|e| self.io(e))?;
        }
        state.size += bytes.len() as u64;
        Ok(())
    }

    /// Rewrites the file with only the pending grants (write, fsync, rename, fsync the
    /// directory); removes it when none are pending.
    fn compact(&self, state: &mut State) -> Result<(), JournalError> {
        state.file = None;
        let path = &self.inner.path;
        if state.pending.is_empty() {
            return match std::fs::remove_file(path) {
                Ok(()) => self.sync_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io(e)),
            };
        }
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut file = private_options()
            .write(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|e| self.io(e))?;
        let mut size = 0;
        for line in state.pending.values() {
            file.write_all(line.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .map_err(|e| self.io(e))?;
            size += line.len() as u64 + 1;
        }
        file.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&temporary, path).map_err(|e| self.io(e))?;
        state.size = size;
        self.sync_dir()
    }

    /// A rename or removal is durable only once its directory is.
    fn sync_dir(&self) -> Result<(), JournalError> {
        let dir = self
            .inner
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }
}

/// Owner-only permissions for a new journal file.
fn private_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::crypto::EncryptionKey;

    fn pending(version: i64, refresh: &str) -> Uncommitted {
        Uncommitted {
            expected_version: version,
            grant: TokenGrant {
                access: AccessToken {
                    token: SecretString::from("access-CANARY"),
                    expires_at: 99,
                },
                refresh_token: Some(SecretString::from(refresh.to_owned())),
                scope: Some("s".into()),
            },
            refreshed_at: 7,
            journal_seq: None,
        }
    }

    #[test]
    fn pending_grants_survive_a_restart_encrypted_and_done_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let key = EncryptionKey::generate();
        let b64 = key.to_base64();
        let reopen = || {
            Journal::new(
                path.clone(),
                EncryptionKey::from_base64(
                    b64.expose_secret(),
                    crate::secret::SecretRef::Env("T".into()),
                )
                .unwrap(),
            )
        };
        let journal = reopen();
        assert!(journal.recover().unwrap().is_empty());
        let alice = ConnectionKey::user("alice").unwrap();
        let bob = ConnectionKey::user("bob").unwrap();
        let first = journal
            .record(&alice, &pending(4, "refresh-CANARY-a"))
            .unwrap();
        journal
            .record(&bob, &pending(9, "refresh-CANARY-b"))
            .unwrap();
        journal.done(first).unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(!raw.contains("CANARY"), "{raw}");
        // A crash mid-append leaves a torn line behind.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"op\":\"grant\",\"seq\":7,\"ke")
            .unwrap();

        let journal = reopen();
        let recovered = journal.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].0, bob);
        assert_eq!(recovered[0].1.expected_version, 9);
        assert_eq!(
            recovered[0]
                .1
                .grant
                .refresh_token
                .as_ref()
                .unwrap()
                .expose_secret(),
            "refresh-CANARY-b"
        );
        // Compacted to the one pending grant; new sequence numbers continue above the old.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let next = journal.record(&alice, &pending(5, "r")).unwrap();
        assert!(next > 2);
        journal.done(next).unwrap();
        assert_eq!(journal.pending(), 1);

        let other = Journal::new(path.clone(), EncryptionKey::generate());
        assert!(matches!(other.recover(), Err(JournalError::Damaged { .. })));
    }

    /// A restart in the middle of a key rotation (the new key primary, the old one previous)
    /// recovers what the last run sealed under the old key.
    #[test]
    fn grants_sealed_under_a_previous_key_are_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let copy = |key: &EncryptionKey| {
            EncryptionKey::from_base64(
                key.to_base64().expose_secret(),
                crate::secret::SecretRef::Env("T".into()),
            )
            .unwrap()
        };
        let journal = Journal::new(path.clone(), copy(&old));
        assert!(journal.recover().unwrap().is_empty());
        let alice = ConnectionKey::user("alice").unwrap();
        journal
            .record(&alice, &pending(4, "refresh-CANARY-a"))
            .unwrap();

        let rotated = Journal::new(path.clone(), KeyRing::new(copy(&new), [copy(&old)]));
        let recovered = rotated.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        let refresh = recovered[0].1.grant.refresh_token.as_ref().unwrap();
        assert_eq!(refresh.expose_secret(), "refresh-CANARY-a");
        assert!(matches!(
            Journal::new(path, copy(&new)).recover(),
            Err(JournalError::Damaged { .. })
        ));
    }
}
