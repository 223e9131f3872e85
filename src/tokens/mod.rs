//! The token manager: hands out a valid finX bearer credential for a connection.
//!
//! Cache hits cost one moka lookup and a clock read. A miss (or an access token about to expire)
//! loads the connection from the store and, when its stored access token is not fresh either,
//! refreshes it at finX exactly once: concurrent misses for one connection are coalesced by
//! moka into one load whose result every waiter shares, and the load itself runs in its own
//! task under a per-connection lock, so neither a cancelled caller nor a racing invalidation can
//! make the gateway spend a refresh token twice. The rotated refresh token is committed to the
//! store before the new access token is returned to anyone.

pub mod client;
mod locks;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use moka::future::Cache;
use moka::Expiry;
use secrecy::{ExposeSecret, SecretString};

use crate::clock::{Clock, UnixSeconds};
use crate::store::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, StoreError, TokenStore,
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
}

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

    /// Drops any cached token of `key` (after an import or a new consent).
    pub async fn forget(&self, key: &ConnectionKey) {
        self.inner.cache.invalidate(key).await;
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

    async fn load_or_refresh(&self, key: &ConnectionKey) -> Result<CachedToken, TokenError> {
        let _held = self.locks.lock(key).await;
        let connection = self
            .store
            .load(key)
            .await
            .map_err(|e| store_failure(key, "load", e))?
            .ok_or(TokenError::NotFound)?;
        if key.is_flow() && connection.created_at + self.one_time_retention_secs <= self.clock.now()
        {
            // finX has deleted a one-time flow's data by now; so does the gateway.
            if let Err(e) = self.store.delete(key).await {
                return Err(store_failure(key, "delete expired one-time connection", e));
            }
            return Err(TokenError::NotFound);
        }
        if connection.status != ConnectionStatus::Active {
            return Err(TokenError::ReauthRequired);
        }
        if let Some(access) = self.usable_stored_access(&connection) {
            return cached(
                &access.token,
                access.expires_at,
                connection.version,
                TokenSource::Store,
            );
        }
        if connection.refresh_token.expose_secret().is_empty() {
            // A grant that came without a refresh token ends with its access token.
            return Err(TokenError::ReauthRequired);
        }

        let now = self.clock.now();
        let grant = match self.client.refresh(&connection.refresh_token, now).await {
            Ok(grant) => grant,
            Err(failure) => return Err(self.refresh_failed(key, failure).await),
        };
        let committed = self.commit(key, connection.version, &grant, now).await?;
        tracing::info!(connection = %key, version = committed.version, "refreshed finX access token");
        cached(
            &grant.access.token,
            grant.access.expires_at,
            committed.version,
            TokenSource::Refresh,
        )
    }

    /// Persist before use: the rotated refresh token must be durable before the new access token
    /// is handed out. A transiently unavailable store gets a few more tries, because the old
    /// refresh token is already spent at finX.
    async fn commit(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &crate::store::TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, TokenError> {
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=4 {
            match self
                .store
                .commit_refresh(key, expected_version, grant, now)
                .await
            {
                Ok(connection) => return Ok(connection),
                Err(StoreError::Unavailable(reason)) if attempt < 4 => {
                    tracing::warn!(connection = %key, attempt, %reason, "retrying commit of rotated refresh token");
                    tokio::time::sleep(backoff).await;
                    backoff *= 4;
                }
                Err(error) => {
                    tracing::error!(connection = %key, error = %error, "rotated refresh token could not be stored; the connection may need re-consent");
                    return Err(TokenError::Store);
                }
            }
        }
        Err(TokenError::Store)
    }

    async fn refresh_failed(&self, key: &ConnectionKey, failure: TokenFailure) -> TokenError {
        tracing::warn!(connection = %key, %failure, "finX token refresh failed");
        match failure {
            TokenFailure::InvalidGrant => {
                let now = self.clock.now();
                match self
                    .store
                    .set_status(key, ConnectionStatus::ReauthRequired, now)
                    .await
                {
                    Ok(()) => TokenError::ReauthRequired,
                    Err(e) => store_failure(key, "mark reauth_required", e),
                }
            }
            TokenFailure::Rejected(_) => TokenError::InvalidClient,
            TokenFailure::Unavailable {
                retry_after_secs, ..
            } => TokenError::Unavailable { retry_after_secs },
            TokenFailure::Timeout => TokenError::Timeout,
        }
    }
}

fn store_failure(key: &ConnectionKey, operation: &'static str, error: StoreError) -> TokenError {
    tracing::error!(connection = %key, operation, %error, "token store failure");
    TokenError::Store
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
