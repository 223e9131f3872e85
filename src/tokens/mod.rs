//! The token manager: hands out a valid finX bearer credential for a connection, and keeps every
//! consent alive.
//!
//! - **Cache hit**: one moka lookup and a clock read. A token in its early-refresh window (the
//!   last `refresh_ahead` share of its life, at least twice `refresh_skew`) is served as is while
//!   one background refresh runs; only a token inside `refresh_skew` (or none) makes a request
//!   wait.
//! - **Miss**: concurrent misses for one connection coalesce (moka `try_get_with`) into one load
//!   whose result every waiter shares. The load runs as a task of its own on the manager's own
//!   runtime, under a per-connection lock, so neither a caller that goes away nor a racing
//!   invalidation can make the gateway spend a refresh token twice, and a shutdown can wait for
//!   it to finish.
//! - **Refresh** ([`refresh`]): under the store's refresh lease (across replicas: a row lock),
//!   the row is read again, a refresh intent is recorded durably, finX is asked, and the rotated
//!   refresh token is committed before the new access token is handed to anyone.
//! - **Memory** ([`memory`]): dead grants, rejected access tokens, backoffs, forced refreshes and
//!   uncommitted grants, one entry per connection keyed to the row version it concerns. A grant
//!   the store refused is also written to the local [`journal`].
//! - **Keeper** ([`keeper`]): refreshes idle connections before finX lets them lapse.
//! - **Events**: a connection that becomes `reauth_required`, recovers with a new consent or
//!   nears its lapse is announced through the [`Events`] handle of [`TokenSettings`].
//!
//! This module may depend on `events`, `store` and `clock`; `proxy` and `connect` build on it.

pub mod client;
pub mod journal;
pub mod keeper;
mod locks;
mod memory;
mod refresh;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use moka::future::Cache;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, UnixSeconds};
use crate::events::{EventKind, Events};
use crate::metrics::Metrics;
use crate::store::{
    Connection, ConnectionKey, ConnectionStatus, NewConnection, StoreError, TokenStore,
};
pub use client::{TokenClient, TokenEndpoint, TokenFailure};
use journal::Journal;
use locks::KeyedLocks;
use memory::{Memory, Uncommitted};

/// Why no credential could be produced. Each maps to one answer in the error mapping (`src/error.rs`).
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
    Timeout { retry_after_secs: u64 },
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
    /// The store's still-fresh access token (after a restart, an eviction, or another replica's
    /// refresh).
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

impl std::fmt::Debug for Credential {
    /// Never the token: only which version it is and where it came from.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("version", &self.version)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// How the manager refreshes; from `[tokens]`, `[upstream]` and `[store]`.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// A request waits for a refresh when less than this remains of its token.
    pub refresh_skew: Duration,
    /// The share of a token's life, at its end, in which it is refreshed in the background.
    pub refresh_ahead: f64,
    /// At most one refresh forced by a finX 401 per connection per this interval.
    pub forced_refresh_interval: Duration,
    pub one_time_retention: Duration,
    pub cache_capacity: u64,
    /// Several replicas share the store (a recent refresh intent of another process may still
    /// be in flight).
    pub shared_store: bool,
    /// Longest a refresh can be in flight (the token call's own timeout, plus a margin).
    pub refresh_hold_limit: Duration,
    /// How long finX lets a just-rotated refresh token be used again (0: strict rotation).
    pub rotation_grace: Duration,
    /// How long a data call is remembered before it is recorded again (`last_used_at`).
    pub touch_interval: Duration,
    /// Processes known to have stopped (earlier holders of this process's serving lock): their
    /// refresh intents are finished at once.
    pub predecessors: Vec<String>,
    /// Where the cache, refreshes and waits are counted.
    pub metrics: Arc<Metrics>,
    /// Where connection events are recorded (and from where they are delivered, on the
    /// manager's runtime).
    pub events: Events,
}

impl TokenSettings {
    /// Defaults for tests and benches: the documented defaults of `[tokens]`.
    pub fn with_defaults(refresh_skew: Duration) -> Self {
        let metrics = Arc::new(Metrics::new());
        Self {
            refresh_skew,
            refresh_ahead: 0.1,
            forced_refresh_interval: Duration::from_secs(60),
            one_time_retention: Duration::from_secs(3600),
            cache_capacity: 1_000_000,
            shared_store: false,
            refresh_hold_limit: Duration::from_secs(15),
            rotation_grace: Duration::ZERO,
            touch_interval: Duration::from_secs(24 * 3600),
            predecessors: Vec::new(),
            events: Events::new(
                Default::default(),
                metrics.clone(),
                Arc::new(crate::clock::SystemClock),
            ),
            metrics,
        }
    }
}

/// What the manager has done since it started (for tests, benches and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenStats {
    /// Refreshes committed (any cause).
    pub refreshes: u64,
    /// Of those, refreshes ahead of expiry (no request waited).
    pub refreshes_ahead: u64,
    /// Requests that waited for a refresh at finX.
    pub requests_waited: u64,
    /// Refreshes forced by a finX 401 on a data call.
    pub forced_refreshes: u64,
    /// Interrupted refreshes (found by their intent) that were completed after all.
    pub rotations_recovered: u64,
    /// Interrupted refreshes whose rotated token was lost: the connection needs re-consent.
    pub rotations_lost: u64,
    /// The longest time between finX's answer and the durable commit, in microseconds.
    pub commit_window_max_us: u64,
    /// The sum of those times, for an average.
    pub commit_window_total_us: u64,
    /// Grants the store refused, kept in memory and in the journal until committed.
    pub journaled: u64,
}

#[derive(Default)]
struct Counters {
    refreshes: AtomicU64,
    refreshes_ahead: AtomicU64,
    requests_waited: AtomicU64,
    forced_refreshes: AtomicU64,
    rotations_recovered: AtomicU64,
    rotations_lost: AtomicU64,
    commit_window_max_us: AtomicU64,
    commit_window_total_us: AtomicU64,
    journaled: AtomicU64,
}

/// A cached access token with what the request path needs to decide about it without a lock.
/// The cache holds it behind one `Arc`, its flags inline: a hit clones one pointer, and an
/// entry costs one allocation beside the token's own bytes.
struct CachedToken {
    /// The cache's own key (the same shared string), handed to the request on a hit.
    key: ConnectionKey,
    header: HeaderValue,
    expires_at: UnixSeconds,
    /// From here on the token is served while one background refresh runs.
    refresh_at: UnixSeconds,
    version: i64,
    source: TokenSource,
    /// A background refresh ahead of expiry was started for this token.
    ahead_started: AtomicBool,
    /// When the connection's last data call was last recorded in the store.
    touched_at: AtomicI64,
}

/// Hands out fresh bearer credentials; see the module docs.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache<ConnectionKey, Arc<CachedToken>, foldhash::quality::RandomState>,
    store: Arc<dyn TokenStore>,
    endpoint: Arc<dyn TokenEndpoint>,
    clock: Arc<dyn Clock>,
    settings: TokenSettings,
    skew_secs: i64,
    locks: KeyedLocks,
    memory: Memory,
    journal: Option<Journal>,
    /// Identifies this process in refresh intents.
    owner: String,
    counters: Counters,
    /// Runs refreshes and other background work, so a shutdown can wait for them.
    worker: Worker,
    /// While set and `false`, refreshes wait (a process taking over from another).
    refresh_gate: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// Set once the store knows this process is alive (see `TokenStore::register_owner`).
    owner_registered: tokio::sync::OnceCell<()>,
    /// Set once the previous process's journal was read (graceful upgrade).
    journal_adopted: tokio::sync::OnceCell<()>,
    /// The store's liveness epoch and when this process first saw it.
    liveness_seen: std::sync::Mutex<(u64, UnixSeconds)>,
}

/// The manager's own runtime and the tracker of what runs on it.
struct Worker {
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
    tracker: TaskTracker,
    /// Cancelled once shutdown starts: no new background work, loops end.
    closing: CancellationToken,
}

impl Worker {
    /// Resolves once shutdown has started.
    async fn tracker_closed(&self) {
        self.closing.cancelled().await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How often the resolver runs.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// Why [`TokenManager::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot start the token manager's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Journal(#[from] journal::JournalError),
}

impl TokenManager {
    /// Builds a manager over `store`, refreshing through `endpoint`. Grants a previous run left
    /// in `journal` are taken over (and committed on first use or by [`TokenManager::recover`]).
    ///
    /// With `refresh_gate` (a graceful upgrade: the old process still runs), nothing is
    /// refreshed until it turns `true`, and the journal, which the old process may still be
    /// writing, is only read then, by [`TokenManager::recover`].
    pub fn new(
        store: Arc<dyn TokenStore>,
        endpoint: Arc<dyn TokenEndpoint>,
        clock: Arc<dyn Clock>,
        settings: TokenSettings,
        journal: Option<Journal>,
        refresh_gate: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Self, ManagerError> {
        let skew_secs = settings.refresh_skew.as_secs() as i64;
        // No moka expiry: the hit path compares the token's own expiry with the gateway's
        // clock and replaces a token inside `refresh_skew`. A per-entry expiry would cost a
        // timer-wheel node per cached connection and bookkeeping on every read, to free
        // tokens that `max_capacity` bounds anyway.
        let cache = Cache::builder()
            .max_capacity(settings.cache_capacity)
            // LRU, not TinyLFU: the cache is sized to hold every active connection, so eviction
            // is rare, and then recency is what matters (a token just refreshed is the one about
            // to be used; a wrong eviction costs a store read, never a finX call). TinyLFU's
            // frequency bookkeeping on every hit cost about 5 % of the gateway's CPU per request
            // with 10,000 users in the load bench.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            // foldhash, not SipHash: only connections an authenticated service named and the
            // store holds are ever inserted, so nobody outside can grow a collision chain.
            .build_with_hasher(foldhash::quality::RandomState::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("finx-refresh")
            .enable_all()
            .build()
            .map_err(ManagerError::Runtime)?;
        let memory = Memory::default();
        if let (Some(journal), None) = (&journal, &refresh_gate) {
            adopt_journal(journal, &memory)?;
        }
        settings.events.start_delivery(runtime.handle());
        let gate = std::sync::OnceLock::new();
        if let Some(refresh_gate) = refresh_gate {
            let _ = gate.set(refresh_gate);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cache,
                store,
                endpoint,
                clock,
                settings,
                skew_secs,
                locks: KeyedLocks::default(),
                memory,
                journal,
                owner: format!("{:016x}", rand::random::<u64>()),
                counters: Counters::default(),
                worker: Worker {
                    handle: runtime.handle().clone(),
                    runtime: Some(runtime),
                    tracker: TaskTracker::new(),
                    closing: CancellationToken::new(),
                },
                refresh_gate: gate,
                owner_registered: tokio::sync::OnceCell::new(),
                journal_adopted: tokio::sync::OnceCell::new(),
                liveness_seen: std::sync::Mutex::new((0, 0)),
            }),
        })
    }

    /// A fresh credential for `key`: from the cache, else the store, else one shared refresh.
    pub async fn bearer(&self, key: &ConnectionKey) -> Result<Credential, TokenError> {
        if let Some((_, credential)) = self.cached_bearer(key.as_str()).await {
            return Ok(credential);
        }
        let inner = &self.inner;
        let now = inner.clock.now();
        inner.settings.metrics.cache_misses.inc();
        let loaded = self.load_shared(key).await?;
        if loaded.source == TokenSource::Refresh {
            inner
                .counters
                .requests_waited
                .fetch_add(1, Ordering::Relaxed);
            inner.settings.metrics.requests_waited.inc();
        }
        inner.touch_if_due(key, &loaded, now);
        Ok(Credential {
            header: loaded.header.clone(),
            version: loaded.version,
            source: loaded.source,
        })
    }

    /// The cache hit of [`Self::bearer`], looked up by the key's stored form (a user id, or
    /// `flow:<owner>/<flow_id>`) and returned with the cache's own key: nothing is allocated,
    /// and the header value is shared, not copied. `None` when the connection is not cached
    /// or its token is too close to expiry (then [`Self::bearer`] loads or refreshes it).
    pub async fn cached_bearer(&self, key: &str) -> Option<(ConnectionKey, Credential)> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let hit = inner.cache.get(key).await?;
        if hit.expires_at - inner.skew_secs <= now {
            inner.cache.invalidate(key).await;
            return None;
        }
        inner.settings.metrics.cache_hits.inc();
        if now >= hit.refresh_at && !hit.ahead_started.swap(true, Ordering::Relaxed) {
            inner.spawn_refresh_ahead(hit.key.clone());
        }
        inner.touch_if_due(&hit.key, &hit, now);
        Some((
            hit.key.clone(),
            Credential {
                header: hit.header.clone(),
                version: hit.version,
                source: TokenSource::Cache,
            },
        ))
    }

    /// The coalesced load: every concurrent caller shares one run of the refresh procedure.
    async fn load_shared(&self, key: &ConnectionKey) -> Result<Arc<CachedToken>, TokenError> {
        let inner = self.inner.clone();
        let task_key = key.clone();
        self.inner
            .cache
            .try_get_with(key.clone(), async move {
                // A task of its own: if every waiting request goes away mid-refresh, the refresh
                // still completes and commits the rotated token.
                let worker = inner.worker.handle.clone();
                let tracked = inner.worker.tracker.track_future({
                    let inner = inner.clone();
                    async move { inner.locked_token(&task_key, refresh::Mode::Request).await }
                });
                worker
                    .spawn(tracked)
                    .await
                    .unwrap_or(Err(TokenError::Internal))
            })
            .await
            .map_err(|shared: Arc<TokenError>| (*shared).clone())
    }

    /// finX answered 401 to the access token of `version`: forget it so the next request
    /// refreshes instead of reusing it. At most one such forced refresh per connection per
    /// `forced_refresh_interval` (a loop guard); `false` when the guard held it back.
    pub async fn reject(&self, key: &ConnectionKey, version: i64) -> bool {
        let inner = &self.inner;
        let now = inner.clock.now();
        if !inner.claim_forced_refresh(key, version, now) {
            return false;
        }
        if let Some(cached) = inner.cache.get(key).await {
            if cached.version <= version {
                inner.cache.invalidate(key).await;
            }
        }
        true
    }

    /// finX answered 401 to the access token of `version` on a request that can be replayed:
    /// a credential newer than that one, refreshing once (shared by every request that met the
    /// same 401). `None` when there is none to offer: the loop guard held the refresh back, or
    /// it failed; the 401 then goes to the caller as it came.
    pub async fn replacement(&self, key: &ConnectionKey, version: i64) -> Option<Credential> {
        self.reject(key, version).await;
        match self.bearer(key).await {
            Ok(credential) if credential.version > version => Some(credential),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(connection = %key, %error, "no new credential after finX rejected one");
                None
            }
        }
    }

    /// Stores a new consent for `key` (a completed connect flow) under the connection's lock,
    /// so it cannot interleave with a refresh of the grant it replaces, and forgets everything
    /// known about that older grant. A consent for a connection that was `reauth_required` or
    /// revoked is announced as `recovered`.
    pub async fn store_consent(
        &self,
        key: &ConnectionKey,
        consent: &NewConnection,
    ) -> Result<Connection, StoreError> {
        let inner = &self.inner;
        let _held = inner.locks.lock(key).await;
        let ended = inner.ended_status(key).await;
        let stored = inner
            .store
            .put_connection(key, consent, inner.clock.now())
            .await?;
        if let Some(ended) = ended {
            let reason = match ended {
                ConnectionStatus::Revoked => "consent_after_revoked",
                _ => "consent_after_reauth_required",
            };
            inner.settings.events.record_occurrence(
                EventKind::Recovered,
                key,
                reason,
                stored.version,
            );
        }
        // The consent replaces any grant that was waiting to be stored.
        let replaced = inner.memory.update(key, |entry| entry.uncommitted.take());
        inner.memory.forget(key);
        if let Some(seq) = replaced.and_then(|pending| pending.journal_seq) {
            inner.journal_done(seq).await;
        }
        inner.cache.invalidate(key).await;
        Ok(stored)
    }

    /// An operator revoked `key`: marks it `revoked` under the connection's lock and forgets
    /// its cached access token and everything remembered about its grant, so every later
    /// request for it is refused. [`StoreError::NotFound`] when there is no such connection.
    pub async fn revoke(&self, key: &ConnectionKey) -> Result<(), StoreError> {
        let inner = &self.inner;
        {
            let _held = inner.locks.lock(key).await;
            inner
                .store
                .set_status(key, ConnectionStatus::Revoked, inner.clock.now())
                .await?;
            inner.forget_grant(key).await;
        }
        inner.settle_cache(key).await;
        inner
            .settings
            .events
            .record(EventKind::Revoked, key, "operator");
        Ok(())
    }

    /// An operator purged `key`: deletes the stored grant under the connection's lock and
    /// forgets its cached access token; `false` when there was none.
    pub async fn purge(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let deleted = {
            let _held = inner.locks.lock(key).await;
            let deleted = inner.store.delete(key).await?;
            inner.forget_grant(key).await;
            deleted
        };
        inner.settle_cache(key).await;
        Ok(deleted)
    }

    /// Background tasks in flight (refreshes, refreshes ahead, touches, keeper passes).
    pub fn background_in_flight(&self) -> usize {
        self.inner.worker.tracker.len()
    }

    /// Finishes what earlier runs left behind: commits journaled grants and completes refreshes
    /// whose intent a crash left in the store (see [`refresh`]). Runs in the background.
    pub fn recover(&self) {
        let inner = self.inner.clone();
        self.inner
            .spawn_tracked(async move { inner.recover().await });
    }

    /// Starts the resolver: every few seconds, grants the store refused are committed and this
    /// process's unfinished refreshes resolved (see `refresh`), until shutdown.
    pub fn start_resolver(&self) {
        let inner = self.inner.clone();
        self.inner.worker.handle.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RESOLVE_EVERY) => {}
                    _ = inner.worker.tracker_closed() => return,
                }
                let pass = inner.clone();
                let _ = inner
                    .worker
                    .handle
                    .spawn(
                        inner
                            .worker
                            .tracker
                            .track_future(async move { pass.resolve_pending().await }),
                    )
                    .await;
            }
        });
    }

    /// Stops background work and waits (at most `deadline`) for refreshes in flight to commit;
    /// a grant that cannot be committed stays in the journal for the next start. Blocking: call
    /// it from a thread that runs no runtime (after the server has stopped).
    pub fn shutdown(&self, deadline: Duration) -> bool {
        let inner = &self.inner;
        inner.worker.closing.cancel();
        inner.worker.tracker.close();
        let tracker = inner.worker.tracker.clone();
        let handle = inner.worker.handle.clone();
        let finished = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    handle.block_on(async {
                        tokio::time::timeout(deadline, tracker.wait()).await.is_ok()
                    })
                })
                .join()
                .unwrap_or(false)
        });
        let pending = inner.memory.uncommitted().len();
        if finished {
            tracing::info!(
                uncommitted = pending,
                "token manager stopped; every refresh in flight finished"
            );
        } else {
            tracing::error!(
                uncommitted = pending,
                "token manager stopped with refreshes still in flight"
            );
        }
        finished
    }

    /// Number of cached access tokens (approximate; for metrics and benches).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.entry_count()
    }

    /// What the manager has done so far.
    pub fn stats(&self) -> TokenStats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TokenStats {
            refreshes: get(&c.refreshes),
            refreshes_ahead: get(&c.refreshes_ahead),
            requests_waited: get(&c.requests_waited),
            forced_refreshes: get(&c.forced_refreshes),
            rotations_recovered: get(&c.rotations_recovered),
            rotations_lost: get(&c.rotations_lost),
            commit_window_max_us: get(&c.commit_window_max_us),
            commit_window_total_us: get(&c.commit_window_total_us),
            journaled: get(&c.journaled),
        }
    }

    /// Where connection events are recorded: the admin listing reads it, and whoever changes a
    /// connection's state outside the manager (an operator's revoke) records into it.
    pub fn events(&self) -> &Events {
        &self.inner.settings.events
    }

    /// The metrics this manager counts into (shared with the proxy and the admin listener).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.settings.metrics
    }

    /// This process's id in refresh intents.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The keeper over this manager (see [`keeper`]).
    pub fn keeper(&self, settings: keeper::KeeperSettings) -> keeper::Keeper {
        keeper::Keeper::new(self.clone(), settings)
    }
}

impl Inner {
    /// Runs `work` on the manager's runtime, tracked for shutdown; nothing new once closing.
    fn spawn_tracked(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.worker.closing.is_cancelled() {
            return;
        }
        self.worker
            .handle
            .spawn(self.worker.tracker.track_future(work));
    }

    /// The status of `key`'s connection if it has ended (`reauth_required`, also when only this
    /// process knows finX declared it dead, or revoked); `None` when it is active, absent or
    /// unreadable.
    async fn ended_status(&self, key: &ConnectionKey) -> Option<ConnectionStatus> {
        let connection = match self.store.load(key).await {
            Ok(connection) => connection?,
            Err(error) => {
                tracing::debug!(connection = %key, %error, "the connection a consent replaces could not be read");
                return None;
            }
        };
        let entry = self.memory.get(key);
        match connection.status {
            ConnectionStatus::Active if entry.concerns(connection.version) && entry.dead => {
                Some(ConnectionStatus::ReauthRequired)
            }
            ConnectionStatus::Active => None,
            ended => Some(ended),
        }
    }

    /// One background refresh ahead of expiry; the still-valid token keeps being served.
    fn spawn_refresh_ahead(self: &Arc<Self>, key: ConnectionKey) {
        let inner = self.clone();
        self.spawn_tracked(async move {
            if let Err(error) = inner.refresh_ahead(&key).await {
                tracing::warn!(connection = %key, %error, "refresh ahead of expiry failed; the current token is served until it must be refreshed")
            }
        });
    }

    /// Forgets everything known about `key`'s grant: its cached access token, what memory
    /// holds about it, and a rotated grant still waiting to be stored (the connection it
    /// belonged to was revoked or deleted). Called under the connection's lock.
    async fn forget_grant(&self, key: &ConnectionKey) {
        let dropped = self.memory.update(key, |entry| entry.uncommitted.take());
        self.memory.forget(key);
        if let Some(seq) = dropped.and_then(|pending| pending.journal_seq) {
            self.journal_done(seq).await;
        }
        self.cache.invalidate(key).await;
    }

    /// Waits for a coalesced load of `key` still in flight (it may cache a token after an
    /// invalidation made under the lock), then drops whatever is cached. A load that starts
    /// later reads the store as it is now.
    async fn settle_cache(&self, key: &ConnectionKey) {
        // Joins the load in flight, if any; otherwise this init runs and caches nothing.
        let _ = self
            .cache
            .try_get_with(key.clone(), async {
                Err::<Arc<CachedToken>, TokenError>(TokenError::NotFound)
            })
            .await;
        self.cache.invalidate(key).await;
    }

    /// Records the connection's data call in the store when the last record is older than
    /// `touch_interval`; off the request path.
    fn touch_if_due(self: &Arc<Self>, key: &ConnectionKey, token: &CachedToken, now: UnixSeconds) {
        let interval = self.settings.touch_interval.as_secs() as i64;
        let last = token.touched_at.load(Ordering::Relaxed);
        if now - last < interval
            || token
                .touched_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (inner, key) = (self.clone(), key.clone());
        self.spawn_tracked(async move {
            if let Err(error) = inner.store.touch(&key, now).await {
                tracing::debug!(connection = %key, %error, "could not record a data call");
            }
        });
    }

    /// Whether a forced refresh of `version` may happen now (the loop guard), claiming it.
    fn claim_forced_refresh(&self, key: &ConnectionKey, version: i64, now: UnixSeconds) -> bool {
        let interval = self.settings.forced_refresh_interval.as_secs() as i64;
        let claimed = self.memory.update(key, |entry| {
            if version <= entry.forced_version {
                // Already forced away from this token (concurrent 401s share that refresh).
                return true;
            }
            if entry.forced_at.is_some_and(|at| now - at < interval) {
                return false;
            }
            entry.forced_at = Some(now);
            entry.forced_version = version;
            true
        });
        if claimed {
            self.memory
                .judge_version(key, version, |entry| entry.rejected = true);
        }
        claimed
    }

    /// Writes `pending` to the journal durably (off the runtime's threads); its sequence
    /// number, or `None` when there is no journal or it failed (logged).
    async fn journal_record(&self, key: &ConnectionKey, pending: &Uncommitted) -> Option<u64> {
        let journal = self.journal.clone()?;
        let (key, pending) = (key.clone(), pending.clone());
        match tokio::task::spawn_blocking(move || journal.record(&key, &pending)).await {
            Ok(Ok(seq)) => Some(seq),
            Ok(Err(error)) => {
                tracing::error!(%error, "a rotated grant could not be written to the journal; only the store will hold it");
                None
            }
            Err(_) => None,
        }
    }

    /// Marks a journaled grant committed (or dropped).
    async fn journal_done(&self, seq: u64) {
        let Some(journal) = self.journal.clone() else {
            return;
        };
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || journal.done(seq)).await {
            tracing::warn!(%error, "could not mark a journaled grant done");
        }
    }
}

/// Takes over the grants an earlier run left uncommitted in `journal`.
fn adopt_journal(journal: &Journal, memory: &Memory) -> Result<(), journal::JournalError> {
    for (key, pending) in journal.recover()? {
        tracing::warn!(connection = %key, "a rotated refresh token from an earlier run is still uncommitted; it is committed before finX is asked again");
        memory.update(&key, |entry| entry.uncommitted = Some(pending));
    }
    Ok(())
}

/// `Bearer <token>` as a sensitive header value; `None` when finX sent bytes no header can carry.
pub fn bearer_header(token: &SecretString) -> Option<HeaderValue> {
    // Exactly as long as the value: the cache keeps this buffer for the token's life, and a
    // grown `String` would keep its spare capacity too.
    let token = token.expose_secret().as_bytes();
    let mut bytes = Vec::with_capacity(BEARER_PREFIX.len() + token.len());
    bytes.extend_from_slice(BEARER_PREFIX);
    bytes.extend_from_slice(token);
    let mut value = HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).ok()?;
    value.set_sensitive(true);
    Some(value)
}

const BEARER_PREFIX: &[u8] = b"Bearer ";

#[cfg(test)]
mod tests;
