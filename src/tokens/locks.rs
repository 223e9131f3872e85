//! One async lock per connection key, held while a connection's tokens are read, refreshed and
//! committed. It makes "a refresh token is spent at most once" hold inside the process even when
//! the cache's request coalescing is bypassed (a cancelled waiter, an entry invalidated twice).
//! Only the refresh path takes it; cache hits never do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::store::ConnectionKey;

/// A map of per-key async mutexes that forgets a key once nobody holds or waits for it.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<ConnectionKey, Arc<AsyncMutex<()>>>>,
}

/// Holds one key's lock; releases it and prunes the map on drop.
pub struct KeyedGuard<'a> {
    owner: &'a KeyedLocks,
    key: ConnectionKey,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for and takes `key`'s lock.
    pub async fn lock(&self, key: &ConnectionKey) -> KeyedGuard<'_> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyedGuard {
            owner: self,
            key: key.clone(),
            guard: Some(guard),
        }
    }

    /// Number of keys currently tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map itself still holds the mutex: nobody waits, so the entry can go.
        if locks
            .get(&self.key)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_are_pruned_after_use() {
        let locks = KeyedLocks::default();
        let key = ConnectionKey::user("u1").unwrap();
        {
            let _held = locks.lock(&key).await;
            assert_eq!(locks.tracked(), 1);
        }
        assert_eq!(locks.tracked(), 0);
    }
}
