//! The token manager: hands out a valid finX bearer credential for a connection.
//!
//! Cache hits cost one moka lookup and a clock read. A miss (or an access token about to expire)
//! loads the connection from the store and, when its stored access token is not fresh either,
//! refreshes it at finX exactly once: concurrent misses for one connection are coalesced by
//! moka into one load whose result every waiter shares, and the load itself runs in its own
//! task under a per-connection lock, so neither a cancelled caller nor a racing invalidation can
//! make the gateway spend a refresh token twice. The rotated refresh token is committed to the
//! store before the new access token is returned to anyone.
//!
//! Across replicas (a shared store), the refresh itself runs under the store's refresh lease
//! ([`crate::store::RefreshLease`]): the row is read again under the lock, a fresh access token
//! another replica stored meanwhile is used as is, and otherwise finX is called and the result
//! committed while the lock is still held. What the manager remembers in memory (dead grants,
//! rejected access tokens, uncommitted grants) is keyed to the row version it concerns, so a
//! newer row written by any replica is honoured at once.
//!
//! This module may depend on `store` and `clock`; `proxy` and `connect` build on it.

pub mod client;
mod locks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use moka::future::Cache;
use moka::Expiry;
use secrecy::{ExposeSecret, SecretString};

use crate::clock::{Clock, UnixSeconds};
use crate::store::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, NewConnection, RefreshLease,
    StoreError, TokenGrant, TokenStore,
};
pub use client::{TokenClient, TokenFailure};
use locks::KeyedLocks;

/// Why no credential could be produced. Each maps to one answer in `crate::error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no stored connection")]
    NotFound,
    #[error("connection needs re-consent")]
    ReauthRequired,
    #[error("finX rejected the client credentials or token request")]
    InvalidClient,
    #[error("finX token endpoint unavailable")]
    Unavailable { retry_after_secs: u64 },
    #[error("finX token endpoint timed out")]
    Timeout,
    #[error("token store unavailable")]
    Store,
    #[error("internal error")]
    Internal,
}

/// Where a credential came from, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The in-memory cache.
    Cache,
    /// The store's still-fresh access token (after a restart or eviction).
    Store,
    /// A refresh at finX (this request triggered it or waited for it).
    Refresh,
}

impl TokenSource {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Store => "store",
            Self::Refresh => "refresh",
        }
    }
}

/// A ready-to-send `Authorization` value for one connection.
#[derive(Clone)]
pub struct Credential {
    /// `Bearer <access token>`, marked sensitive.
    pub header: HeaderValue,
    /// The store version the token belongs to; names it when finX rejects it.
    pub version: i64,
    pub source: TokenSource,
}

#[derive(Clone)]
struct CachedToken {
    header: HeaderValue,
    expires_at: UnixSeconds,
    version: i64,
    source: TokenSource,
}

/// Evicts a cached token when it enters its refresh window.
struct RefreshWindowExpiry {
    clock: Arc<dyn Clock>,
    skew_secs: i64,
}

impl Expiry<ConnectionKey, CachedToken> for RefreshWindowExpiry {
    fn expire_after_create(
        &self,
        _key: &ConnectionKey,
        value: &CachedToken,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let remaining = value.expires_at - self.skew_secs - self.clock.now();
        Some(Duration::from_secs(remaining.max(0) as u64))
    }
}

/// Hands out fresh bearer credentials; see the module docs.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache<ConnectionKey, CachedToken>,
    /// Highest store version whose access token finX answered 401 for.
    rejected: moka::sync::Cache<ConnectionKey, i64>,
    store: Arc<dyn TokenStore>,
    client: TokenClient,
    clock: Arc<dyn Clock>,
    skew_secs: i64,
    one_time_retention_secs: i64,
    locks: KeyedLocks,
    /// Grants finX issued whose commit failed, by connection: the old refresh token is spent,
    /// so finX is not asked again for that connection until this grant is stored.
    uncommitted: Mutex<HashMap<ConnectionKey, Uncommitted>>,
    /// When finX may be asked again for a connection after a retryable failure.
    backoff_until: moka::sync::Cache<ConnectionKey, UnixSeconds>,
    /// Connections finX declared dead, with the highest row version that grant had: finX is not
    /// asked again for it even if its status could not be stored, while a newer row (a new
    /// consent on any replica, an operator's import) is honoured at once.
    dead: moka::sync::Cache<ConnectionKey, i64>,
}

/// What [`Inner::judge`] decided about a stored connection.
enum Verdict {
    /// Its stored access token is fresh: use it.
    Use(CachedToken),
    /// It needs a refresh at finX.
    Refresh,
    /// A one-time connection past its retention: delete it.
    Expired,
}

/// A grant waiting to be committed over the row version it was refreshed from.
struct Uncommitted {
    expected_version: i64,
    grant: TokenGrant,
    refreshed_at: UnixSeconds,
}

/// Longest backoff after a retryable failure, whatever finX's `Retry-After` says.
const MAX_BACKOFF_SECS: u64 = 300;

impl TokenManager {
    /// Builds a manager over `store`, refreshing through `client`.
    pub fn new(
        store: Arc<dyn TokenStore>,
        client: TokenClient,
        clock: Arc<dyn Clock>,
        refresh_skew: Duration,
        one_time_retention: Duration,
        capacity: u64,
    ) -> Self {
        let skew_secs = refresh_skew.as_secs() as i64;
        let cache = Cache::builder()
            .max_capacity(capacity)
            .expire_after(RefreshWindowExpiry {
                clock: clock.clone(),
                skew_secs,
            })
            .build();
        let rejected = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(Duration::from_secs(2 * 3600))
            .build();
        Self {
            inner: Arc::new(Inner {
                cache,
                rejected,
                store,
                client,
                clock,
                skew_secs,
                one_time_retention_secs: one_time_retention.as_secs() as i64,
                locks: KeyedLocks::default(),
                uncommitted: Mutex::new(HashMap::new()),
                backoff_until: moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(Duration::from_secs(MAX_BACKOFF_SECS))
                    .build(),
                dead: moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(Duration::from_secs(24 * 3600))
                    .build(),
            }),
        }
    }

    /// A fresh credential for `key`: from the cache, else the store, else one shared refresh.
    pub async fn bearer(&self, key: &ConnectionKey) -> Result<Credential, TokenError> {
        let inner = &self.inner;
        if let Some(hit) = inner.cache.get(key).await {
            if inner.is_fresh(hit.expires_at) {
                return Ok(Credential {
                    header: hit.header,
                    version: hit.version,
                    source: TokenSource::Cache,
                });
            }
            inner.cache.invalidate(key).await;
        }
        let task_inner = inner.clone();
        let task_key = key.clone();
        let loaded = inner
            .cache
            .try_get_with(key.clone(), async move {
                // A task of its own: if every waiting request goes away mid-refresh, the refresh
                // still completes and commits the rotated token.
                tokio::spawn(async move { task_inner.load_or_refresh(&task_key).await })
                    .await
                    .unwrap_or(Err(TokenError::Internal))
            })
            .await
            .map_err(|shared: Arc<TokenError>| (*shared).clone())?;
        Ok(Credential {
            header: loaded.header,
            version: loaded.version,
            source: loaded.source,
        })
    }

    /// finX answered 401 to the access token of `version`: forget it so the next request
    /// refreshes instead of reusing it.
    pub async fn reject(&self, key: &ConnectionKey, version: i64) {
        let inner = &self.inner;
        let highest = inner.rejected.get(key).map_or(version, |v| v.max(version));
        inner.rejected.insert(key.clone(), highest);
        if let Some(cached) = inner.cache.get(key).await {
            if cached.version <= version {
                inner.cache.invalidate(key).await;
            }
        }
    }

    /// Stores a new consent for `key` (a completed connect flow) under the connection's lock,
    /// so it cannot interleave with a refresh of the grant it replaces, and forgets everything
    /// known about that older grant.
    pub async fn store_consent(
        &self,
        key: &ConnectionKey,
        consent: &NewConnection,
    ) -> Result<Connection, StoreError> {
        let inner = &self.inner;
        let _held = inner.locks.lock(key).await;
        let stored = inner
            .store
            .put_connection(key, consent, inner.clock.now())
            .await?;
        inner.lock_uncommitted().remove(key);
        inner.backoff_until.invalidate(key);
        inner.dead.invalidate(key);
        inner.cache.invalidate(key).await;
        Ok(stored)
    }

    /// Number of cached access tokens (approximate; for metrics and benches).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.entry_count()
    }
}

impl Inner {
    fn is_fresh(&self, expires_at: UnixSeconds) -> bool {
        expires_at - self.skew_secs > self.clock.now()
    }

    fn usable_stored_access<'c>(&self, connection: &'c Connection) -> Option<&'c AccessToken> {
        let access = connection.access.as_ref()?;
        let rejected = self
            .rejected
            .get(&connection.key)
            .is_some_and(|version| connection.version <= version);
        (!rejected && self.is_fresh(access.expires_at)).then_some(access)
    }

    fn lock_uncommitted(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionKey, Uncommitted>> {
        self.uncommitted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to do with a connection as stored.
    fn judge(&self, connection: &Connection, now: UnixSeconds) -> Result<Verdict, TokenError> {
        let key = &connection.key;
        if key.is_flow() && connection.created_at + self.one_time_retention_secs <= now {
            // finX has deleted a one-time flow's data by now; so does the gateway.
            return Ok(Verdict::Expired);
        }
        let dead = self
            .dead
            .get(key)
            .is_some_and(|version| connection.version <= version);
        if connection.status != ConnectionStatus::Active || dead {
            return Err(TokenError::ReauthRequired);
        }
        if let Some(access) = self.usable_stored_access(connection) {
            return cached(
                &access.token,
                access.expires_at,
                connection.version,
                TokenSource::Store,
            )
            .map(Verdict::Use);
        }
        if connection.refresh_token.expose_secret().is_empty() {
            // A grant that came without a refresh token ends with its access token.
            return Err(TokenError::ReauthRequired);
        }
        if let Some(until) = self.backoff_until.get(key).filter(|until| *until > now) {
            return Err(TokenError::Unavailable {
                retry_after_secs: (until - now) as u64,
            });
        }
        Ok(Verdict::Refresh)
    }

    async fn load_or_refresh(&self, key: &ConnectionKey) -> Result<CachedToken, TokenError> {
        let _held = self.locks.lock(key).await;
        self.commit_uncommitted(key).await?;
        // A plain read first: a fresh access token in the store (stored by another replica, or
        // before a restart) needs no lock.
        let connection = self
            .store
            .load(key)
            .await
            .map_err(|e| store_failure(key, "load", e))?
            .ok_or(TokenError::NotFound)?;
        match self.judge(&connection, self.clock.now())? {
            Verdict::Use(token) => return Ok(token),
            Verdict::Expired => {
                return match self.store.delete(key).await {
                    Ok(_) => Err(TokenError::NotFound),
                    Err(e) => Err(store_failure(key, "delete expired one-time connection", e)),
                }
            }
            Verdict::Refresh => {}
        }

        // Serialise with every other refresher of this connection (other replicas included) and
        // judge the row again as it is under the lock: another replica may have refreshed it
        // while this one waited.
        let lease = self
            .store
            .lock_for_refresh(key)
            .await
            .map_err(|e| store_failure(key, "lock for refresh", e))?;
        let Some(connection) = lease.current().cloned() else {
            return Err(TokenError::NotFound);
        };
        let now = self.clock.now();
        match self.judge(&connection, now)? {
            Verdict::Use(token) => return Ok(token),
            Verdict::Expired => {
                return match lease.delete().await {
                    Ok(_) => Err(TokenError::NotFound),
                    Err(e) => Err(store_failure(key, "delete expired one-time connection", e)),
                }
            }
            Verdict::Refresh => {}
        }

        let grant = match self.client.refresh(&connection.refresh_token, now).await {
            Ok(grant) => grant,
            Err(failure) => {
                return Err(self.refresh_failed(lease, &connection, failure, now).await)
            }
        };
        self.backoff_until.invalidate(key);
        // Persist before use, still under the lock. If the lease's own transaction cannot
        // commit (its database session ended), the same compare-and-swap is retried on a new one.
        let committed = match lease.commit_refresh(&grant, now).await {
            Ok(committed) => Ok(committed),
            Err(StoreError::Unavailable(reason)) => {
                tracing::warn!(connection = %key, %reason, "refresh lease could not commit; retrying the commit");
                self.commit(key, connection.version, &grant, now).await
            }
            Err(other) => Err(other),
        };
        let committed = match committed {
            Ok(committed) => committed,
            Err(StoreError::Conflict(_)) => {
                // The row moved (a new consent, or another process): this grant is not its own.
                tracing::error!(connection = %key, "connection changed during a refresh; the refreshed grant is dropped");
                return Err(TokenError::Store);
            }
            Err(error) => {
                tracing::error!(connection = %key, %error, "rotated refresh token not stored yet; kept in memory, finX is not asked again until it is");
                self.lock_uncommitted().insert(
                    key.clone(),
                    Uncommitted {
                        expected_version: connection.version,
                        grant,
                        refreshed_at: now,
                    },
                );
                return Err(TokenError::Store);
            }
        };
        tracing::info!(connection = %key, version = committed.version, "refreshed finX access token");
        self.fresh_grant(&grant, committed.version)
    }

    /// Commits a grant whose earlier commit failed. `Err` while it still cannot be stored.
    async fn commit_uncommitted(&self, key: &ConnectionKey) -> Result<(), TokenError> {
        let Some(pending) = self.lock_uncommitted().remove(key) else {
            return Ok(());
        };
        match self
            .commit(
                key,
                pending.expected_version,
                &pending.grant,
                pending.refreshed_at,
            )
            .await
        {
            Ok(committed) => {
                tracing::info!(connection = %key, version = committed.version, "stored a rotated refresh token after an earlier failure");
                Ok(())
            }
            Err(StoreError::Conflict(_)) => {
                tracing::error!(connection = %key, "connection changed before a pending refresh could be stored; it is dropped");
                Ok(())
            }
            Err(error) => {
                tracing::error!(connection = %key, %error, "rotated refresh token still not stored");
                self.lock_uncommitted().insert(key.clone(), pending);
                Err(TokenError::Store)
            }
        }
    }

    /// The credential of a just-committed grant, if it can be used now. finX answers that are
    /// missing an access token or expire within the refresh window are stored (their refresh
    /// token matters) but not used: the request gets 503 instead of a token about to expire.
    fn fresh_grant(&self, grant: &TokenGrant, version: i64) -> Result<CachedToken, TokenError> {
        let access = &grant.access;
        if access.token.expose_secret().is_empty() || !self.is_fresh(access.expires_at) {
            tracing::warn!(
                version,
                "finX issued an access token that is missing or shorter than refresh_skew"
            );
            return Err(TokenError::Unavailable {
                retry_after_secs: 1,
            });
        }
        cached(
            &access.token,
            access.expires_at,
            version,
            TokenSource::Refresh,
        )
    }

    /// Persist before use: the rotated refresh token must be durable before the new access token
    /// is handed out. A transiently unavailable store gets a few quick retries.
    async fn commit(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let mut pause = Duration::from_millis(50);
        for attempt in 1.. {
            match self
                .store
                .commit_refresh(key, expected_version, grant, now)
                .await
            {
                Err(StoreError::Unavailable(reason)) if attempt < 4 => {
                    tracing::warn!(connection = %key, attempt, %reason, "retrying commit of rotated refresh token");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                outcome => return outcome,
            }
        }
        unreachable!("the loop returns")
    }

    async fn refresh_failed(
        &self,
        lease: Box<dyn RefreshLease>,
        connection: &Connection,
        failure: TokenFailure,
        now: UnixSeconds,
    ) -> TokenError {
        let key = &connection.key;
        tracing::warn!(connection = %key, %failure, "finX token refresh failed");
        let back_off = |retry_after_secs: u64| {
            let secs = retry_after_secs.clamp(1, MAX_BACKOFF_SECS);
            self.backoff_until.insert(key.clone(), now + secs as i64);
            secs
        };
        match failure {
            TokenFailure::InvalidGrant => {
                // Remembered first: even if the store cannot record it, finX is not asked again
                // for this grant (a newer row, e.g. a new consent, is not affected).
                self.dead.insert(key.clone(), connection.version);
                match lease
                    .set_status(ConnectionStatus::ReauthRequired, now)
                    .await
                {
                    Ok(()) => TokenError::ReauthRequired,
                    Err(e) => store_failure(key, "mark reauth_required", e),
                }
            }
            TokenFailure::Rejected(_) => TokenError::InvalidClient,
            TokenFailure::Unavailable {
                retry_after_secs, ..
            } => TokenError::Unavailable {
                retry_after_secs: back_off(retry_after_secs),
            },
            TokenFailure::Timeout => {
                back_off(1);
                TokenError::Timeout
            }
        }
    }
}

fn store_failure(key: &ConnectionKey, operation: &'static str, error: StoreError) -> TokenError {
    tracing::error!(connection = %key, operation, %error, "token store failure");
    match error {
        // Retrying cannot help an unreadable row: it is a fault to investigate, not an outage.
        StoreError::Corrupt(_) => TokenError::Internal,
        _ => TokenError::Store,
    }
}

fn cached(
    token: &SecretString,
    expires_at: UnixSeconds,
    version: i64,
    source: TokenSource,
) -> Result<CachedToken, TokenError> {
    Ok(CachedToken {
        header: bearer_header(token).ok_or(TokenError::Internal)?,
        expires_at,
        version,
        source,
    })
}

/// `Bearer <token>` as a sensitive header value; `None` when finX sent bytes no header can carry.
pub fn bearer_header(token: &SecretString) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret())).ok()?;
    value.set_sensitive(true);
    Some(value)
}
