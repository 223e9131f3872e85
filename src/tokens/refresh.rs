//! The refresh procedure, run under the connection's in-process lock by every path that may
//! need finX: a request's load, a refresh ahead of expiry, the keeper, start-up recovery.
//!
//! 1. A grant an earlier attempt could not store is committed first (the token it replaced is
//!    spent).
//! 2. The row is read without a lock; a usable stored access token ends the procedure.
//! 3. The store's refresh lease is taken (across replicas, a row lock) and the row judged again.
//! 4. A refresh intent is recorded durably: a crash from here on leaves a trace. An intent left
//!    by another process for the same version is either in flight on another replica (recent:
//!    the request gets 503 rather than spending the token again) or a crash (finish it: ask finX
//!    once; `invalid_grant` then means the rotated token was lost, and is reported).
//! 5. finX is asked; answers that prove finX did not act (429, 5xx, no connection) are retried
//!    with backoff within `RETRY_BUDGET`.
//! 6. The grant is committed under the lease (persist before use) and only then handed out. A
//!    grant the store refuses is kept in memory and in the journal, and committed before finX is
//!    ever asked again for the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

use super::memory::Uncommitted;
use super::{CachedToken, Inner, TokenError, TokenFailure, TokenSource};
use crate::clock::UnixSeconds;
use crate::events::EventKind;
use crate::metrics::RefreshOutcome;
use crate::store::{
    Connection, ConnectionKey, ConnectionStatus, RefreshLease, StoreError, TokenGrant,
};

/// Longest backoff after a retryable failure, whatever finX's `Retry-After` says.
const MAX_BACKOFF_SECS: u64 = 300;

/// How long one refresh keeps retrying finX answers that prove finX did not act.
const RETRY_BUDGET: Duration = Duration::from_secs(3);

/// An access token expiring sooner than this is never served, even while finX is down.
const MIN_REMAINING_SECS: i64 = 2;

/// Why the procedure runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A request needs a credential now.
    Request,
    /// A cached token entered its early-refresh window: refresh unless another replica did.
    Ahead,
    /// Start-up recovery of an interrupted refresh, inside finX's grace window: refresh now
    /// even if the stored access token is still valid.
    Recover,
    /// The keeper: refresh if the connection is still due.
    Keep {
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
    },
}

/// What the procedure produced.
pub(super) enum Outcome {
    Token(CachedToken),
    /// (Keeper) somebody refreshed the connection since it was found due.
    NotDue,
}

/// What [`Inner::judge`] decided about a stored connection.
enum Verdict {
    Use(CachedToken),
    Refresh,
    Expired,
    NotDue,
}

impl Inner {
    /// The procedure for a request (`Mode::Request`) or a refresh ahead (`Mode::Ahead`), under
    /// the connection's in-process lock.
    pub(super) async fn locked_token(
        self: &Arc<Self>,
        key: &ConnectionKey,
        mode: Mode,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let _held = self.locks.lock(key).await;
        self.token(key, self.run(key, mode).await?)
    }

    /// The keeper's refresh of one connection; `Ok(false)` when it was no longer due.
    pub(super) async fn keep(
        self: &Arc<Self>,
        key: &ConnectionKey,
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
    ) -> Result<bool, TokenError> {
        let _held = self.locks.lock(key).await;
        let mode = Mode::Keep {
            refreshed_before,
            active_before,
        };
        match self.run(key, mode).await? {
            Outcome::Token(token) => {
                self.cache.insert(key.clone(), entry(key, token)).await;
                Ok(true)
            }
            Outcome::NotDue => Ok(false),
        }
    }

    /// A refresh ahead of expiry; its token is cached before the connection's lock is
    /// released, so an operator's revoke or purge (which take the lock) cannot be overtaken by
    /// it.
    pub(super) async fn refresh_ahead(
        self: &Arc<Self>,
        key: &ConnectionKey,
    ) -> Result<(), TokenError> {
        let _held = self.locks.lock(key).await;
        let token = self.token(key, self.run(key, Mode::Ahead).await?)?;
        self.cache.insert(key.clone(), token).await;
        Ok(())
    }

    /// The cache entry of `outcome`, to be cached under `key` (see [`entry`]).
    fn token(&self, key: &ConnectionKey, outcome: Outcome) -> Result<Arc<CachedToken>, TokenError> {
        match outcome {
            Outcome::Token(token) => Ok(entry(key, token)),
            Outcome::NotDue => Err(TokenError::Internal),
        }
    }

    /// Commits journaled grants, then finishes refreshes a crash interrupted. After a graceful
    /// upgrade, first waits for the old process to be gone, then reads the journal.
    pub(super) async fn recover(self: &Arc<Self>) {
        if self.settings.shared_store && self.register_owner().await.is_ok() {
            // From now on this process can tell a crashed replica from a failover.
            self.liveness_steady_since();
        }
        if self.refresh_gate.get().is_some() {
            tokio::select! {
                opened = self.wait_for_gate_open() => if !opened { return },
                _ = self.worker.tracker_closed() => return,
            }
        }
        for (key, _) in self.memory.uncommitted() {
            let _held = self.locks.lock(&key).await;
            if let Err(error) = self.commit_uncommitted(&key).await {
                tracing::error!(connection = %key, %error, "a journaled grant could not be committed yet");
            }
        }
        let intents = match self.store.pending_intents().await {
            Ok(intents) => intents,
            Err(error) => {
                tracing::error!(%error, "interrupted refreshes could not be read");
                return;
            }
        };
        let grace = self.settings.rotation_grace.as_secs() as i64;
        for (key, intent) in intents {
            if intent.owner == self.owner {
                continue;
            }
            let now = self.clock.now();
            // Inside finX's grace window the old token still works once: use it now, before the
            // window closes. Otherwise the next use of the connection finishes it.
            if grace == 0 || now - intent.started_at >= grace {
                tracing::warn!(connection = %key, "a refresh was interrupted (crash); it is finished on the connection's next use");
                continue;
            }
            self.finish_unfinished(key).await;
        }
    }

    /// Refreshes `key` once more to finish a refresh left unfinished (by a crash, or a call
    /// whose outcome is unknown); the token goes to the cache.
    async fn finish_unfinished(self: &Arc<Self>, key: ConnectionKey) {
        let _held = self.locks.lock(&key).await;
        match self.run(&key, Mode::Recover).await {
            Ok(Outcome::Token(token)) => self.cache.insert(key.clone(), entry(&key, token)).await,
            Ok(Outcome::NotDue) => {}
            Err(error) => {
                tracing::warn!(connection = %key, %error, "an unfinished refresh could not be finished yet")
            }
        }
    }

    /// Finishes what this process left unfinished: grants the store refused are committed, and
    /// its own refresh intents older than a refresh can take (a timeout whose outcome is
    /// unknown) are resolved by refreshing once more. Other replicas wait for exactly this
    /// (see `run`), so it runs every few seconds, not only when a request comes.
    pub(super) async fn resolve_pending(self: &Arc<Self>) {
        for (key, _) in self.memory.uncommitted() {
            let _held = self.locks.lock(&key).await;
            if let Err(error) = self.commit_uncommitted(&key).await {
                tracing::debug!(connection = %key, %error, "a pending grant is still not stored");
            }
        }
        if !self.settings.shared_store {
            return;
        }
        let Ok(intents) = self.store.pending_intents().await else {
            return;
        };
        let hold = self.settings.refresh_hold_limit.as_secs() as i64;
        for (key, intent) in intents {
            if intent.owner != self.owner || self.clock.now() - intent.started_at < hold {
                continue;
            }
            self.finish_unfinished(key).await;
        }
    }

    async fn run(self: &Arc<Self>, key: &ConnectionKey, mode: Mode) -> Result<Outcome, TokenError> {
        self.commit_uncommitted(key).await?;
        // A plain read first: a usable stored access token (another replica's refresh, or one
        // from before a restart) needs no lock.
        let connection = self
            .store
            .load(key)
            .await
            .map_err(|e| store_failure(key, "load", e))?
            .ok_or(TokenError::NotFound)?;
        let entry = self.memory.get(key);
        if entry.concerns(connection.version)
            && entry.dead
            && connection.status == ConnectionStatus::Active
        {
            // finX declared this grant dead but the store missed it: record it now (which also
            // clears the refresh intent other replicas would otherwise wait on).
            if let Err(error) = self
                .store
                .set_status(key, ConnectionStatus::ReauthRequired, self.clock.now())
                .await
            {
                tracing::warn!(connection = %key, %error, "reauth_required still not recorded");
            }
        }
        if let Some(done) = self.settle(&connection, mode, &mut None).await? {
            return Ok(done);
        }

        self.wait_for_gate().await?;
        self.register_owner().await?;
        self.liveness_steady_since();
        // Serialise with every other refresher of this connection (other replicas included)
        // and judge the row again as it is under the lock.
        let lease = match self.store.lock_for_refresh(key).await {
            Ok(lease) => lease,
            Err(e) => {
                let error = store_failure(key, "lock for refresh", e);
                return self.serve_despite(&connection, mode, error);
            }
        };
        let Some(connection) = lease.current().cloned() else {
            return Err(TokenError::NotFound);
        };
        let now = self.clock.now();
        let interrupted: Option<String> = match lease.intent() {
            Some(intent) if intent.version == connection.version && intent.owner != self.owner => {
                // The lock is ours, so the intent's owner lost its database session: a crash
                // (its liveness lock is gone too), or a session cut while its finX call may
                // still be in flight or its answer not yet committed. A live owner finishes its
                // own refresh (its resolver commits or retries it within seconds); spending the
                // token here would be reuse.
                // A dead-looking owner of a young intent may be alive after all: a failover ends
                // every session at once, its liveness lock too, while its call is in flight.
                // Unless this process's own liveness session has lasted since before the intent
                // (then no failover came in between, and the owner really died), wait for
                // longer than any call.
                let recent =
                    now - intent.started_at < self.settings.refresh_hold_limit.as_secs() as i64;
                let failover_possible = self.liveness_steady_since() > intent.started_at
                    && !self.settings.predecessors.contains(&intent.owner);
                if self.settings.shared_store
                    && (self.store.owner_alive(&intent.owner).await.unwrap_or(true)
                        || (recent && failover_possible))
                {
                    tracing::warn!(connection = %key, "another replica's refresh of this connection is unfinished; it finishes it");
                    return self.serve_despite(&connection, mode, TokenError::Store);
                }
                tracing::warn!(connection = %key, "finishing a refresh another process started and never finished (a crash); asking finX once");
                Some(intent.owner.clone())
            }
            _ => None,
        };
        // Recovery finishes an unfinished refresh only; if none is left, it is an ordinary load.
        let unfinished = lease
            .intent()
            .is_some_and(|intent| intent.version == connection.version);
        let mode = if mode == Mode::Recover && !unfinished {
            Mode::Request
        } else {
            mode
        };
        let mut lease = Some(lease);
        if interrupted.is_none() {
            if let Some(done) = self.settle(&connection, mode, &mut lease).await? {
                return Ok(done);
            }
        }
        let Some(mut lease) = lease else {
            return Err(TokenError::Internal);
        };

        if self.worker.closing.is_cancelled() {
            // Stopping: nothing new is spent (the lease is released, the row untouched).
            return Err(TokenError::Store);
        }
        lease
            .record_intent(&self.owner, interrupted.as_deref(), now)
            .await
            .map_err(|e| store_failure(key, "record refresh intent", e))?;
        crate::fail_point!("refresh-before-token-call");
        let grant = match self.ask_finx(&connection.refresh_token).await {
            Ok(grant) => grant,
            Err(failure) => {
                if interrupted.is_some() && failure == TokenFailure::InvalidGrant {
                    self.counters.rotations_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(connection = %key, "an interrupted refresh had already rotated the refresh token at finX and its answer was lost; the user must consent again");
                }
                let error = self.refresh_failed(lease, &connection, &failure, now).await;
                return self.serve_despite(&connection, mode, error);
            }
        };
        let answered = Instant::now();
        // Until the journal append below is durable, the rotated token exists only here: the
        // one window a crash can still cost a consent in.
        crate::fail_point!("refresh-after-answer");
        let mut pending = Uncommitted {
            expected_version: connection.version,
            grant,
            refreshed_at: now,
            journal_seq: None,
        };
        pending.journal_seq = self.journal_record(key, &pending).await;
        self.record_commit_window(answered.elapsed());
        self.clear_backoff(key, connection.version);

        // Persist before use, still under the lock. If the lease's own transaction cannot
        // commit (its database session ended), the same compare-and-swap is retried on a new
        // one.
        let grant = &pending.grant;
        let committed = match lease.commit_refresh(grant, now).await {
            Ok(committed) => Ok(committed),
            Err(StoreError::Unavailable(reason)) => {
                tracing::warn!(connection = %key, %reason, "refresh lease could not commit; retrying the commit");
                self.commit(key, connection.version, grant, now).await
            }
            Err(other) => Err(other),
        };
        let committed = match committed {
            Ok(committed) => committed,
            Err(StoreError::Conflict(_)) => {
                // The row moved (a new consent): this grant is not its own any more.
                tracing::error!(connection = %key, "connection changed during a refresh; the refreshed grant is dropped");
                if let Some(seq) = pending.journal_seq {
                    self.journal_done(seq).await;
                }
                return Err(TokenError::Store);
            }
            Err(error) => {
                tracing::error!(connection = %key, %error, "rotated refresh token not stored yet; kept in memory and in the journal, finX is not asked again until it is stored");
                self.memory
                    .update(key, |entry| entry.uncommitted = Some(pending));
                self.counters.journaled.fetch_add(1, Ordering::Relaxed);
                return Err(TokenError::Store);
            }
        };
        if let Some(seq) = pending.journal_seq {
            self.journal_done(seq).await;
        }
        crate::fail_point!("refresh-after-commit");
        if interrupted.is_some() {
            self.counters
                .rotations_recovered
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(connection = %key, "an interrupted refresh was finished");
        }
        self.counters.refreshes.fetch_add(1, Ordering::Relaxed);
        if mode == Mode::Ahead {
            self.counters
                .refreshes_ahead
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(connection = %key, version = committed.version, "refreshed finX access token");
        self.fresh_grant(&pending.grant, &committed)
            .map(Outcome::Token)
    }

    /// Since when (as far as this process can tell) its liveness session has lasted: the first
    /// time the store's current liveness epoch was seen. Later than the truth, never earlier.
    fn liveness_steady_since(&self) -> UnixSeconds {
        let Some(epoch) = self.store.liveness_epoch() else {
            return UnixSeconds::MIN;
        };
        let now = self.clock.now();
        let mut seen = self
            .liveness_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.0 != epoch {
            *seen = (epoch, now);
        }
        seen.1
    }

    /// Announces this process to the store once, before its first refresh intent.
    async fn register_owner(&self) -> Result<(), TokenError> {
        self.owner_registered
            .get_or_try_init(|| self.store.register_owner(&self.owner))
            .await
            .map(drop)
            .map_err(|error| {
                tracing::error!(%error, "token store failure: this process could not announce itself");
                TokenError::Store
            })
    }

    /// Waits for the refresh gate (a graceful upgrade), then reads the journal the previous
    /// process left, once: no refresh passes before its grants are known. `false` if the gate
    /// can never open.
    async fn wait_for_gate_open(&self) -> bool {
        let Some(gate) = self.refresh_gate.get() else {
            return true;
        };
        let mut gate = gate.clone();
        if gate.wait_for(|open| *open).await.is_err() {
            return false;
        }
        self.journal_adopted
            .get_or_init(|| async {
                if let Some(journal) = &self.journal {
                    if let Err(error) = super::adopt_journal(journal, &self.memory) {
                        tracing::error!(%error, "the journal of the previous process could not be read");
                    }
                }
            })
            .await;
        true
    }

    /// Waits until this process may refresh (see [`Self::wait_for_gate_open`]), at most the
    /// refresh hold limit.
    async fn wait_for_gate(&self) -> Result<(), TokenError> {
        if self.refresh_gate.get().is_none() {
            return Ok(());
        }
        let opened =
            tokio::time::timeout(self.settings.refresh_hold_limit, self.wait_for_gate_open()).await;
        match opened {
            Ok(true) => Ok(()),
            _ => {
                tracing::warn!(
                    "the previous process still holds the serving lock; not refreshing yet"
                );
                Err(TokenError::Store)
            }
        }
    }

    /// Ends the procedure when the row as read needs no refresh: `Some` with the outcome (the
    /// lease, if any, is released), `None` to go on refreshing.
    async fn settle(
        &self,
        connection: &Connection,
        mode: Mode,
        lease: &mut Option<Box<dyn RefreshLease>>,
    ) -> Result<Option<Outcome>, TokenError> {
        let key = &connection.key;
        match self.judge(connection, mode, self.clock.now())? {
            Verdict::Use(token) => Ok(Some(Outcome::Token(token))),
            Verdict::NotDue => Ok(Some(Outcome::NotDue)),
            Verdict::Expired => {
                let deleted = match lease.take() {
                    Some(lease) => lease.delete().await,
                    None => self.store.delete(key).await,
                };
                match deleted {
                    Ok(_) => Err(TokenError::NotFound),
                    Err(e) => Err(store_failure(key, "delete expired one-time connection", e)),
                }
            }
            Verdict::Refresh => Ok(None),
        }
    }

    /// What to do with a connection as stored.
    fn judge(
        &self,
        connection: &Connection,
        mode: Mode,
        now: UnixSeconds,
    ) -> Result<Verdict, TokenError> {
        let key = &connection.key;
        if key.is_flow()
            && connection.created_at + self.settings.one_time_retention.as_secs() as i64 <= now
        {
            // finX has deleted a one-time flow's data by now; so does the gateway.
            return Ok(Verdict::Expired);
        }
        let entry = self.memory.get(key);
        let concerns = entry.concerns(connection.version);
        if connection.status != ConnectionStatus::Active || (concerns && entry.dead) {
            return Err(TokenError::ReauthRequired);
        }
        if let Mode::Keep {
            refreshed_before,
            active_before,
        } = mode
        {
            let refreshed = connection.refreshed_at.unwrap_or(connection.created_at);
            let active = refreshed.max(connection.last_used_at.unwrap_or(0));
            if refreshed >= refreshed_before && active >= active_before {
                return Ok(Verdict::NotDue);
            }
        } else if let Some(token) = self.stored_token(connection, concerns && entry.rejected) {
            let usable = match mode {
                Mode::Request => token.expires_at - self.skew_secs > now,
                Mode::Ahead => now < token.refresh_at,
                Mode::Recover | Mode::Keep { .. } => false,
            };
            if usable {
                return Ok(Verdict::Use(token));
            }
        }
        if connection.refresh_token.expose_secret().is_empty() {
            // A grant that came without a refresh token ends with its access token.
            return Err(TokenError::ReauthRequired);
        }
        if concerns && entry.backoff_until > now {
            let error = TokenError::Unavailable {
                retry_after_secs: (entry.backoff_until - now) as u64,
            };
            return match self.serve_despite(connection, mode, error) {
                Ok(Outcome::Token(token)) => Ok(Verdict::Use(token)),
                Ok(Outcome::NotDue) => Ok(Verdict::NotDue),
                Err(error) => Err(error),
            };
        }
        Ok(Verdict::Refresh)
    }

    /// While finX (or the store, or another replica's unfinished refresh) keeps this one from
    /// refreshing, a request is still served with a stored access token that has not expired
    /// (never an expired one); everything else gets `error`.
    fn serve_despite(
        &self,
        connection: &Connection,
        mode: Mode,
        error: TokenError,
    ) -> Result<Outcome, TokenError> {
        let retryable = matches!(
            error,
            TokenError::Unavailable { .. } | TokenError::Timeout { .. } | TokenError::Store
        );
        if mode != Mode::Request || !retryable {
            return Err(error);
        }
        let entry = self.memory.get(&connection.key);
        if entry.concerns(connection.version) && entry.dead {
            return Err(TokenError::ReauthRequired);
        }
        let rejected = entry.concerns(connection.version) && entry.rejected;
        match self.stored_token(connection, rejected) {
            Some(token) if token.expires_at - self.clock.now() > MIN_REMAINING_SECS => {
                Ok(Outcome::Token(token))
            }
            _ => Err(error),
        }
    }

    /// The connection's stored access token as a cache entry, unless finX rejected it.
    fn stored_token(&self, connection: &Connection, rejected: bool) -> Option<CachedToken> {
        let access = connection.access.as_ref()?;
        if rejected || access.token.expose_secret().is_empty() {
            return None;
        }
        let issued = connection.refreshed_at.unwrap_or(connection.created_at);
        self.cached(
            &connection.key,
            &access.token,
            access.expires_at,
            access.expires_at - issued,
            connection.version,
            TokenSource::Store,
            connection.last_used_at,
        )
        .ok()
    }

    /// Asks finX, retrying at once (with backoff and jitter, within [`RETRY_BUDGET`]) only
    /// answers that prove finX did not act on the request.
    async fn ask_finx(&self, refresh_token: &SecretString) -> Result<TokenGrant, TokenFailure> {
        let deadline = Instant::now() + RETRY_BUDGET;
        let mut pause = Duration::from_millis(100);
        loop {
            let asked = Instant::now();
            let answer = self.endpoint.refresh(refresh_token, self.clock.now()).await;
            let outcome = match &answer {
                Ok(_) => RefreshOutcome::Ok,
                Err(TokenFailure::InvalidGrant) => RefreshOutcome::InvalidGrant,
                Err(TokenFailure::Rejected(_)) => RefreshOutcome::InvalidClient,
                Err(TokenFailure::Unavailable { .. }) => RefreshOutcome::Transient,
                Err(TokenFailure::Timeout) => RefreshOutcome::Timeout,
            };
            self.settings
                .metrics
                .record_refresh(outcome, asked.elapsed().as_secs_f64());
            match answer {
                Err(TokenFailure::Unavailable {
                    not_processed: true,
                    retry_after_secs,
                    reason,
                }) => {
                    let wait = pause
                        .max(Duration::from_secs(retry_after_secs))
                        .mul_f64(rand::rng().random_range(0.8..1.2));
                    if Instant::now() + wait >= deadline {
                        return Err(TokenFailure::Unavailable {
                            not_processed: true,
                            retry_after_secs,
                            reason,
                        });
                    }
                    tokio::time::sleep(wait).await;
                    pause *= 2;
                }
                other => return other,
            }
        }
    }

    /// Commits a grant whose earlier commit failed. `Err` while it still cannot be stored.
    async fn commit_uncommitted(&self, key: &ConnectionKey) -> Result<(), TokenError> {
        let Some(pending) = self.memory.get(key).uncommitted else {
            return Ok(());
        };
        let outcome = self
            .commit(
                key,
                pending.expected_version,
                &pending.grant,
                pending.refreshed_at,
            )
            .await;
        match outcome {
            Ok(committed) => {
                tracing::info!(connection = %key, version = committed.version, "stored a rotated refresh token after an earlier failure");
            }
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => {
                tracing::error!(connection = %key, "connection changed before a pending refresh could be stored; it is dropped");
            }
            Err(error) => {
                tracing::error!(connection = %key, %error, "rotated refresh token still not stored");
                return Err(TokenError::Store);
            }
        }
        self.memory.update(key, |entry| entry.uncommitted = None);
        if let Some(seq) = pending.journal_seq {
            self.journal_done(seq).await;
        }
        Ok(())
    }

    /// Persist before use: a transiently unavailable store gets a few quick retries.
    async fn commit(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let mut pause = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            match self
                .store
                .commit_refresh(key, expected_version, grant, now)
                .await
            {
                Err(StoreError::Unavailable(reason)) if attempt < 4 => {
                    tracing::warn!(connection = %key, attempt, %reason, "retrying commit of rotated refresh token");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// The time from finX's answer until the grant was durable (in the journal).
    fn record_commit_window(&self, window: Duration) {
        let micros = window.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counters
            .commit_window_max_us
            .fetch_max(micros, Ordering::Relaxed);
        self.counters
            .commit_window_total_us
            .fetch_add(micros, Ordering::Relaxed);
    }

    fn clear_backoff(&self, key: &ConnectionKey, version: i64) {
        self.memory.judge_version(key, version, |entry| {
            entry.backoff_until = 0;
            entry.failures = 0;
        });
    }

    async fn refresh_failed(
        &self,
        lease: Box<dyn RefreshLease>,
        connection: &Connection,
        failure: &TokenFailure,
        now: UnixSeconds,
    ) -> TokenError {
        let key = &connection.key;
        let version = connection.version;
        tracing::warn!(connection = %key, %failure, "finX token refresh failed");
        match failure {
            TokenFailure::InvalidGrant => {
                // Remembered first: even if the store cannot record it, finX is not asked again
                // for this grant (a newer row, e.g. a new consent, is not affected).
                self.memory
                    .judge_version(key, version, |entry| entry.dead = true);
                let marked = lease
                    .set_status(ConnectionStatus::ReauthRequired, now)
                    .await;
                // Announced even if the store missed it: this process treats it as dead, and
                // the next use of the connection records it.
                self.settings.events.record_occurrence(
                    EventKind::ReauthRequired,
                    key,
                    "invalid_grant",
                    version,
                );
                match marked {
                    Ok(()) => TokenError::ReauthRequired,
                    Err(e) => store_failure(key, "mark reauth_required", e),
                }
            }
            TokenFailure::Rejected(_) => {
                // finX refused the client, not the grant: the token was not spent.
                if let Err(e) = lease.abandon().await {
                    tracing::warn!(connection = %key, error = %e, "could not clear a refresh intent");
                }
                TokenError::InvalidClient
            }
            TokenFailure::Unavailable {
                retry_after_secs,
                not_processed,
                ..
            } => {
                if *not_processed {
                    if let Err(e) = lease.abandon().await {
                        tracing::warn!(connection = %key, error = %e, "could not clear a refresh intent");
                    }
                }
                TokenError::Unavailable {
                    retry_after_secs: self.back_off(key, version, *retry_after_secs),
                }
            }
            TokenFailure::Timeout => TokenError::Timeout {
                retry_after_secs: self.back_off(key, version, 1),
            },
        }
    }

    /// A cool-down that grows with consecutive failures (1, 2, 4 … s, at most 5 min, jittered)
    /// and is never shorter than finX's `Retry-After`; returns it in seconds.
    fn back_off(&self, key: &ConnectionKey, version: i64, retry_after_secs: u64) -> u64 {
        // From the end of this refresh's own retries, not its start.
        let now = self.clock.now();
        let mut chosen = 1;
        self.memory.judge_version(key, version, |entry| {
            entry.failures = entry.failures.saturating_add(1);
            let growing = 1u64 << (entry.failures - 1).min(9);
            let jittered = (growing as f64 * rand::rng().random_range(1.0..1.25)) as u64;
            chosen = jittered.max(retry_after_secs).clamp(1, MAX_BACKOFF_SECS);
            entry.backoff_until = now + chosen as i64;
        });
        chosen
    }

    /// The cool-down after a grant whose access token cannot be used: it grows with every such
    /// grant in a row (1, 2, 4 … s, like [`Self::back_off`]); returns it in seconds.
    fn back_off_unusable(&self, key: &ConnectionKey, version: i64) -> u64 {
        let streak = self.memory.get(key).unusable_grants.saturating_add(1);
        self.memory.judge_version(key, version, |entry| {
            entry.unusable_grants = streak;
            entry.failures = streak - 1;
        });
        self.back_off(key, version, 1)
    }

    /// The credential of a just-committed grant. finX answers that are missing an access token
    /// or expire within `refresh_skew` are stored (their refresh token matters) and start a
    /// cool-down, so the following requests do not refresh again at once: until it ends they
    /// are served that token while it has more than [`MIN_REMAINING_SECS`] left (as while finX
    /// is down), and get 503 with `Retry-After` otherwise.
    fn fresh_grant(
        &self,
        grant: &TokenGrant,
        committed: &Connection,
    ) -> Result<CachedToken, TokenError> {
        let access = &grant.access;
        let key = &committed.key;
        let now = self.clock.now();
        let missing = access.token.expose_secret().is_empty();
        if missing || access.expires_at - self.skew_secs <= now {
            let retry_after_secs = self.back_off_unusable(key, committed.version);
            tracing::warn!(
                connection = %key,
                version = committed.version,
                retry_after_secs,
                "finX issued an access token that is missing or shorter than refresh_skew; not refreshing again before the cool-down ends"
            );
            if missing || access.expires_at - now <= MIN_REMAINING_SECS {
                return Err(TokenError::Unavailable { retry_after_secs });
            }
        } else if self.memory.get(key).unusable_grants > 0 {
            self.memory.update(key, |entry| entry.unusable_grants = 0);
        }
        self.cached(
            key,
            &access.token,
            access.expires_at,
            access.expires_at - now,
            committed.version,
            TokenSource::Refresh,
            committed.last_used_at,
        )
    }

    /// A cache entry for `token`, with its early-refresh point: the last `refresh_ahead` share
    /// of its `lifetime_secs`, at least twice `refresh_skew`.
    #[allow(clippy::too_many_arguments)] // one entry's fields, each named at the call site
    fn cached(
        &self,
        key: &ConnectionKey,
        token: &SecretString,
        expires_at: UnixSeconds,
        lifetime_secs: i64,
        version: i64,
        source: TokenSource,
        touched_at: Option<UnixSeconds>,
    ) -> Result<CachedToken, TokenError> {
        let share = (lifetime_secs.max(0) as f64 * self.settings.refresh_ahead) as i64;
        let window = share.max(2 * self.skew_secs);
        Ok(CachedToken {
            key: key.clone(),
            header: super::bearer_header(token).ok_or(TokenError::Internal)?,
            expires_at,
            refresh_at: expires_at - window,
            version,
            source,
            ahead_started: Default::default(),
            touched_at: touched_at.unwrap_or(0).into(),
        })
    }
}

/// `token` as the cache entry for `key`: it holds the cache key's own shared string, not a
/// second copy of the id.
fn entry(key: &ConnectionKey, mut token: CachedToken) -> Arc<CachedToken> {
    token.key = key.clone();
    Arc::new(token)
}

fn store_failure(key: &ConnectionKey, operation: &'static str, error: StoreError) -> TokenError {
    tracing::error!(connection = %key, operation, %error, "token store failure");
    match error {
        // Retrying cannot help an unreadable row: it is a fault to investigate, not an outage.
        StoreError::Corrupt(_) => TokenError::Internal,
        _ => TokenError::Store,
    }
}
