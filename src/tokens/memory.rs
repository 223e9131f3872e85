//! What the token manager remembers about a connection between requests, beyond its cached
//! access token: one entry per connection, keyed to the row version it concerns, so a newer row
//! (a new consent on any replica, an operator's import) makes every remembered verdict about
//! the older grant obsolete at once.
//!
//! Entries exist only for connections with something to remember (a dead grant, a rejected
//! access token, a backoff, a forced refresh, an uncommitted grant); an entry that carries
//! nothing any more is removed when it is next looked at, and by [`Memory::prune`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::clock::UnixSeconds;
use crate::store::{ConnectionKey, TokenGrant};

/// A grant finX issued whose commit failed: the refresh token it replaced is spent, so finX is
/// not asked again for the connection until this grant is stored.
#[derive(Debug, Clone)]
pub struct Uncommitted {
    /// The row version it was refreshed from (its compare-and-swap guard).
    pub expected_version: i64,
    pub grant: TokenGrant,
    pub refreshed_at: UnixSeconds,
    /// Its entry in the write-ahead journal, to be marked done once committed.
    pub journal_seq: Option<u64>,
}

/// Everything remembered about one connection.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    /// The highest row version the verdicts below concern.
    pub version: i64,
    /// finX answered `invalid_grant` for that version's refresh token.
    pub dead: bool,
    /// finX answered 401 to that version's access token.
    pub rejected: bool,
    /// Not before this time is finX asked again (retryable failures).
    pub backoff_until: UnixSeconds,
    /// Consecutive retryable failures, for the growing cool-down.
    pub failures: u32,
    /// Consecutive grants whose access token could not be used (missing, or inside
    /// `refresh_skew`). Each is a new row version, so this is kept across versions.
    pub unusable_grants: u32,
    /// The last refresh forced by a finX 401, and the version it replaced.
    pub forced_at: Option<UnixSeconds>,
    pub forced_version: i64,
    pub uncommitted: Option<Uncommitted>,
}

impl Entry {
    /// Whether the verdicts of this entry apply to a row of `version`.
    pub fn concerns(&self, version: i64) -> bool {
        version <= self.version
    }

    /// Whether this entry still carries anything worth keeping at `now`.
    fn carries_anything(&self, now: UnixSeconds, forced_interval_secs: i64) -> bool {
        self.dead
            || self.rejected
            || self.backoff_until > now
            || self.uncommitted.is_some()
            || self.unusable_grants > 0
            || self
                .forced_at
                .is_some_and(|at| at + forced_interval_secs > now)
    }
}

/// The per-connection memory of one token manager.
#[derive(Default)]
pub struct Memory {
    entries: Mutex<HashMap<ConnectionKey, Entry>>,
}

impl Memory {
    fn lock(&self) -> MutexGuard<'_, HashMap<ConnectionKey, Entry>> {
        // Every update is a plain field write: a panic elsewhere cannot leave an entry half
        // changed, so a poisoned lock is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of `key`'s entry (default when there is none).
    pub fn get(&self, key: &ConnectionKey) -> Entry {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    /// Changes `key`'s entry (creating it), returning what `change` returns.
    pub fn update<T>(&self, key: &ConnectionKey, change: impl FnOnce(&mut Entry) -> T) -> T {
        change(self.lock().entry(key.clone()).or_default())
    }

    /// Records a verdict about the row of `version`: an entry about an older version is reset
    /// first (its verdicts are obsolete), one about a newer version is left alone.
    pub fn judge_version(
        &self,
        key: &ConnectionKey,
        version: i64,
        verdict: impl FnOnce(&mut Entry),
    ) {
        self.update(key, |entry| {
            if entry.version < version {
                let uncommitted = entry.uncommitted.take();
                let (forced_at, forced_version) = (entry.forced_at, entry.forced_version);
                *entry = Entry {
                    version,
                    uncommitted,
                    forced_at,
                    forced_version,
                    unusable_grants: entry.unusable_grants,
                    ..Entry::default()
                };
            }
            if entry.version == version {
                verdict(entry);
            }
        });
    }

    /// Forgets everything about `key` except an uncommitted grant (a new consent was stored).
    pub fn forget(&self, key: &ConnectionKey) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(key) {
            let uncommitted = entry.uncommitted.take();
            match uncommitted {
                Some(uncommitted) => {
                    *entry = Entry {
                        uncommitted: Some(uncommitted),
                        ..Entry::default()
                    }
                }
                None => {
                    entries.remove(key);
                }
            }
        }
    }

    /// Every uncommitted grant, for the journal.
    pub fn uncommitted(&self) -> Vec<(ConnectionKey, Uncommitted)> {
        self.lock()
            .iter()
            .filter_map(|(key, entry)| Some((key.clone(), entry.uncommitted.clone()?)))
            .collect()
    }

    /// Removes entries that carry nothing any more.
    pub fn prune(&self, now: UnixSeconds, forced_interval_secs: i64) {
        self.lock()
            .retain(|_, entry| entry.carries_anything(now, forced_interval_secs));
    }

    /// Number of entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ConnectionKey {
        ConnectionKey::user("u").unwrap()
    }

    #[test]
    fn a_newer_version_makes_old_verdicts_obsolete() {
        let memory = Memory::default();
        memory.judge_version(&key(), 3, |e| e.dead = true);
        assert!(memory.get(&key()).dead);
        assert!(memory.get(&key()).concerns(3));
        assert!(!memory.get(&key()).concerns(4));
        // A verdict about an older version than the one remembered changes nothing.
        memory.judge_version(&key(), 2, |e| e.rejected = true);
        assert!(!memory.get(&key()).rejected);
        // A newer one resets the old verdicts.
        memory.judge_version(&key(), 5, |e| e.rejected = true);
        let entry = memory.get(&key());
        assert!(!entry.dead && entry.rejected && entry.version == 5);
    }

    #[test]
    fn empty_entries_are_pruned_but_uncommitted_grants_never() {
        let memory = Memory::default();
        memory.judge_version(&key(), 1, |e| e.backoff_until = 10);
        memory.prune(5, 60);
        assert_eq!(memory.len(), 1);
        memory.prune(10, 60);
        assert_eq!(memory.len(), 0);
        memory.update(&key(), |e| {
            e.uncommitted = Some(Uncommitted {
                expected_version: 1,
                grant: TokenGrant {
                    access: crate::store::AccessToken {
                        token: "a".into(),
                        expires_at: 1,
                    },
                    refresh_token: None,
                    scope: None,
                },
                refreshed_at: 0,
                journal_seq: None,
            })
        });
        memory.forget(&key());
        memory.prune(1_000_000, 60);
        assert_eq!(memory.uncommitted().len(), 1);
    }
}
