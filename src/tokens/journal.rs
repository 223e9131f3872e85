//! The local journal of uncommitted grants: when the store refuses a rotated refresh token
//! (finX has already spent the old one), the grant is written here, encrypted with the store's
//! key and fsynced, before anything else happens. The next start reads it back and commits it,
//! so a store outage followed by a restart (or a crash) does not lose the consent.
//!
//! The file is rewritten whole (write, fsync, rename, fsync the directory) on every change and
//! removed when nothing is left to commit. It is small: entries exist only while the store is
//! failing.
//!
//! This module may depend on `store` (types and crypto) only.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::memory::Uncommitted;
use crate::store::crypto::EncryptionKey;
use crate::store::{AccessToken, ConnectionKey, TokenGrant};

/// Why the journal could not be read or written. Never contains a token.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("journal {}: an entry does not decrypt with the store's key or is damaged", path.display())]
    Damaged { path: PathBuf },
}

/// One uncommitted grant as written to the file; tokens sealed, base64.
#[derive(Serialize, Deserialize)]
struct Record {
    key: String,
    expected_version: i64,
    refreshed_at: i64,
    access: String,
    expires_at: i64,
    refresh: Option<String>,
    scope: Option<String>,
}

/// The journal file and the key its entries are sealed with.
pub struct Journal {
    path: PathBuf,
    key: EncryptionKey,
}

fn associated_data(key: &ConnectionKey, column: &str) -> Vec<u8> {
    format!("finx-gateway/v1/journal/{}/{column}", key.as_str()).into_bytes()
}

impl Journal {
    pub fn new(path: PathBuf, key: EncryptionKey) -> Self {
        Self { path, key }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, reason: impl std::fmt::Display) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    fn seal(
        &self,
        key: &ConnectionKey,
        column: &str,
        token: &SecretString,
    ) -> Result<String, JournalError> {
        self.key
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
        let damaged = || JournalError::Damaged {
            path: self.path.clone(),
        };
        let bytes = STANDARD.decode(sealed).map_err(|_| damaged())?;
        let plain = self
            .key
            .decrypt(&bytes, &associated_data(key, column))
            .map_err(|_| damaged())?;
        let text = std::str::from_utf8(&plain).map_err(|_| damaged())?;
        Ok(SecretString::from(text))
    }

    /// The grants a previous run could not commit (none when there is no file).
    pub fn load(&self) -> Result<Vec<(ConnectionKey, Uncommitted)>, JournalError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let records: Vec<Record> =
            serde_json::from_str(&text).map_err(|_| JournalError::Damaged {
                path: self.path.clone(),
            })?;
        records
            .into_iter()
            .map(|record| {
                let key =
                    ConnectionKey::from_stored(&record.key).map_err(|_| JournalError::Damaged {
                        path: self.path.clone(),
                    })?;
                let grant = TokenGrant {
                    access: AccessToken {
                        token: self.open(&key, "access", &record.access)?,
                        expires_at: record.expires_at,
                    },
                    refresh_token: record
                        .refresh
                        .as_deref()
                        .map(|sealed| self.open(&key, "refresh", sealed))
                        .transpose()?,
                    scope: record.scope,
                };
                Ok((
                    key,
                    Uncommitted {
                        expected_version: record.expected_version,
                        grant,
                        refreshed_at: record.refreshed_at,
                    },
                ))
            })
            .collect()
    }

    /// Makes the file hold exactly `entries`, durably; removes it when there are none.
    pub fn save(&self, entries: &[(ConnectionKey, Uncommitted)]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => self.sync_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io(e)),
            };
        }
        let records = entries
            .iter()
            .map(|(key, pending)| {
                Ok(Record {
                    key: key.as_str().to_owned(),
                    expected_version: pending.expected_version,
                    refreshed_at: pending.refreshed_at,
                    access: self.seal(key, "access", &pending.grant.access.token)?,
                    expires_at: pending.grant.access.expires_at,
                    refresh: pending
                        .grant
                        .refresh_token
                        .as_ref()
                        .map(|token| self.seal(key, "refresh", token))
                        .transpose()?,
                    scope: pending.grant.scope.clone(),
                })
            })
            .collect::<Result<Vec<_>, JournalError>>()?;
        let text = serde_json::to_vec(&records).map_err(|e| self.io(e))?;
        let mut temporary = self.path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary).map_err(|e| self.io(e))?;
        file.write_all(&text).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&temporary, &self.path).map_err(|e| self.io(e))?;
        self.sync_dir()
    }

    /// A rename or removal is durable only once its directory is.
    fn sync_dir(&self) -> Result<(), JournalError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_encrypted_and_disappears_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let journal = Journal::new(dir.path().join("j"), key);
        assert!(journal.load().unwrap().is_empty());
        let alice = ConnectionKey::user("alice").unwrap();
        let pending = Uncommitted {
            expected_version: 4,
            grant: TokenGrant {
                access: AccessToken {
                    token: SecretString::from("access-CANARY"),
                    expires_at: 99,
                },
                refresh_token: Some(SecretString::from("refresh-CANARY")),
                scope: Some("s".into()),
            },
            refreshed_at: 7,
        };
        journal.save(&[(alice.clone(), pending)]).unwrap();
        let raw = std::fs::read_to_string(dir.path().join("j")).unwrap();
        assert!(!raw.contains("CANARY"), "{raw}");
        let loaded = journal.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].0, alice);
        assert_eq!(loaded[0].1.expected_version, 4);
        assert_eq!(
            loaded[0]
                .1
                .grant
                .refresh_token
                .as_ref()
                .unwrap()
                .expose_secret(),
            "refresh-CANARY"
        );
        journal.save(&[]).unwrap();
        assert!(!dir.path().join("j").exists());
        let other = Journal::new(dir.path().join("j"), EncryptionKey::generate());
        journal.save(&loaded).unwrap();
        assert!(matches!(other.load(), Err(JournalError::Damaged { .. })));
    }
}
