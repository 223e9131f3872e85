//! Durable storage of finX connections: the refresh token, the latest access token and the
//! connection's status, every token AEAD-encrypted at rest.
//!
//! One [`TokenStore`] trait, two implementations: embedded SQLite ([`sqlite`], the default, one
//! gateway process per file) and PostgreSQL ([`postgres`], shared by any number of replicas).
//! Writes that matter for "persist before use" return only after the data is durable.
//!
//! This module may depend on `clock` and on leaf crates only; the token manager and the connect
//! flows build on it, never the reverse.

pub mod crypto;
pub mod faulty;
pub mod metered;
pub mod postgres;
pub mod rotation;
pub mod sqlite;

pub use rotation::{KeyStatus, ReencryptBatch, RotationCursor};

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::clock::UnixSeconds;

/// Identifies one finX connection: an ongoing user (`user_id`) or a one-time flow
/// (`flow:<owner>/<flow_id>`).
///
/// Ids are validated so they can never contain `:` or `/`, which keeps the namespaces apart.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey(Arc<str>);

/// Why a user or flow id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ids are 1 to 128 characters of A-Z a-z 0-9 . _ @ -")]
pub struct InvalidId;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

impl ConnectionKey {
    /// The connection of an ongoing user.
    pub fn user(user_id: &str) -> Result<Self, InvalidId> {
        Self::user_name(user_id).map(|name| Self(Arc::from(name)))
    }

    /// The stored form of user `user_id`'s key, checked but not built: a cache lookup by it
    /// (keys borrow as `str`) allocates nothing.
    pub fn user_name(user_id: &str) -> Result<&str, InvalidId> {
        if valid_id(user_id) {
            Ok(user_id)
        } else {
            Err(InvalidId)
        }
    }

    /// The connection of a one-time flow, owned by the service (policy name) that started it:
    /// other services name a different key, so they cannot reach it.
    pub fn flow(owner: &str, flow_id: &str) -> Result<Self, InvalidId> {
        if valid_id(owner) && valid_id(flow_id) {
            Ok(Self(Arc::from(format!("flow:{owner}/{flow_id}"))))
        } else {
            Err(InvalidId)
        }
    }

    /// Rebuilds a key from its stored form (`user_id` or `flow:<owner>/<flow_id>`).
    pub fn from_stored(stored: &str) -> Result<Self, InvalidId> {
        match stored.strip_prefix("flow:") {
            Some(flow) => {
                let (owner, flow_id) = flow.split_once('/').ok_or(InvalidId)?;
                Self::flow(owner, flow_id)
            }
            None => Self::user(stored),
        }
    }

    /// Whether this is a one-time flow's connection.
    pub fn is_flow(&self) -> bool {
        self.0.starts_with("flow:")
    }

    /// The stored form, also used in logs (a key is not a secret).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keys hash and compare as their stored form, so maps keyed by them are searched by `&str`.
impl std::borrow::Borrow<str> for ConnectionKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lifecycle state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// Usable: its refresh token is believed valid.
    Active,
    /// finX answered `invalid_grant`: the user must consent again. finX is not asked again.
    ReauthRequired,
    /// Removed on purpose (revoked by an operator or the user).
    Revoked,
}

impl ConnectionStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::ReauthRequired => "reauth_required",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "reauth_required" => Some(Self::ReauthRequired),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// An access token with its absolute expiry.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: SecretString,
    pub expires_at: UnixSeconds,
}

/// What a successful `/auth/token` answer gives us.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access: AccessToken,
    /// The rotated refresh token; `None` when finX omitted it (the old one stays valid).
    pub refresh_token: Option<SecretString>,
    pub scope: Option<String>,
}

/// A connection to create or replace from a new consent (or an operator's import).
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub refresh_token: SecretString,
    pub access: Option<AccessToken>,
    pub scope: Option<String>,
}

/// A connection's metadata, never its tokens.
#[derive(Debug, Clone)]
pub struct ConnectionSummary {
    pub key: ConnectionKey,
    pub status: ConnectionStatus,
    pub version: i64,
    pub created_at: UnixSeconds,
    pub refreshed_at: Option<UnixSeconds>,
    /// Last successful manual synchronisation through the gateway.
    pub synced_at: Option<UnixSeconds>,
    /// Last write of any kind; `store copy` refuses to overwrite a row newer than its source.
    pub updated_at: UnixSeconds,
    /// Last data call through any gateway (recorded at most about once an hour per replica).
    pub last_used_at: Option<UnixSeconds>,
    /// The scope finX granted, as its token answer named it (stored in plaintext: not a
    /// secret).
    pub scope: Option<String>,
}

/// A stored connection, decrypted.
#[derive(Debug, Clone)]
pub struct Connection {
    pub key: ConnectionKey,
    pub status: ConnectionStatus,
    pub refresh_token: SecretString,
    pub access: Option<AccessToken>,
    pub scope: Option<String>,
    /// Incremented by every write; the compare-and-swap token for [`TokenStore::commit_refresh`].
    pub version: i64,
    pub created_at: UnixSeconds,
    pub refreshed_at: Option<UnixSeconds>,
    /// Last successful manual synchronisation through the gateway.
    pub synced_at: Option<UnixSeconds>,
    /// Last write of any kind.
    pub updated_at: UnixSeconds,
    /// Last data call through any gateway (recorded at most about once an hour per replica).
    pub last_used_at: Option<UnixSeconds>,
}

/// A refresh that was started (finX may have been asked) and has not finished: recorded durably
/// before the token call, cleared by the commit. One found later means the refresher stopped in
/// between (a crash) or is still at it (another replica, if it is recent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshIntent {
    /// The row version whose refresh token was about to be sent.
    pub version: i64,
    pub started_at: UnixSeconds,
    /// The gateway process that started it (a random id per process start).
    pub owner: String,
}

impl Connection {
    /// The row a new consent (or an import) creates or replaces: active, never refreshed yet.
    pub(crate) fn consented(
        key: &ConnectionKey,
        new: &NewConnection,
        version: i64,
        now: UnixSeconds,
    ) -> Self {
        Self {
            key: key.clone(),
            status: ConnectionStatus::Active,
            refresh_token: new.refresh_token.clone(),
            access: new.access.clone(),
            scope: new.scope.clone(),
            version,
            created_at: now,
            refreshed_at: None,
            synced_at: None,
            updated_at: now,
            last_used_at: None,
        }
    }
}

/// The version of the row a refresh lease read, which its writes compare-and-swap against.
pub(crate) fn lease_version(
    current: Option<&Connection>,
    key: &ConnectionKey,
) -> Result<i64, StoreError> {
    current
        .map(|connection| connection.version)
        .ok_or_else(|| StoreError::NotFound(key.clone()))
}

/// A connection's tokens sealed for its row (a consent, an import, a copy).
pub(crate) struct SealedTokens {
    pub refresh: Vec<u8>,
    pub access: Option<Vec<u8>>,
}

/// Seals a refresh token and an optional access token for `key`'s row.
pub(crate) fn seal_tokens(
    enc: &crypto::KeyRing,
    key: &ConnectionKey,
    refresh: &SecretString,
    access: Option<&AccessToken>,
) -> Result<SealedTokens, StoreError> {
    let seal = |column, token| {
        enc.seal_token(key, column, token)
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    };
    Ok(SealedTokens {
        refresh: seal(crypto::TokenColumn::RefreshToken, refresh)?,
        access: access
            .map(|access| seal(crypto::TokenColumn::AccessToken, &access.token))
            .transpose()?,
    })
}

/// Opens a stored token; one that does not decrypt fails only its own connection.
pub(crate) fn open_stored_token(
    enc: &crypto::KeyRing,
    key: &ConnectionKey,
    column: crypto::TokenColumn,
    sealed: &[u8],
) -> Result<SecretString, StoreError> {
    enc.open_token(key, column, sealed).map_err(|_| {
        tracing::warn!(
            connection = %key,
            column = column.as_str(),
            "stored token failed to decrypt (tampered, copied from another row, or another key)"
        );
        StoreError::Corrupt(key.clone())
    })
}

/// What [`TokenStore::copy_in`] did with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Written (created, or replaced a row that was not newer).
    Written,
    /// Left alone: the target's row was written after the source's.
    TargetNewer,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be read or written (I/O, locked, gone).
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    /// A row failed to decrypt or parse (tampered, or written with another key). Only this
    /// connection is affected.
    #[error("stored connection {0} is unreadable (tampered or encrypted with another key)")]
    Corrupt(ConnectionKey),
    /// `expected_version` no longer matches: someone else wrote the row first.
    #[error("stored connection {0} changed concurrently")]
    Conflict(ConnectionKey),
    /// No such connection.
    #[error("no stored connection {0}")]
    NotFound(ConnectionKey),
    /// Another replica held the connection's refresh lock for longer than the lock timeout.
    #[error("stored connection {0} is locked by another refresh")]
    Busy(ConnectionKey),
}

/// A refresh of one connection, serialised with every other refresh of it: inside the process by
/// the token manager's per-connection lock, across replicas by the store itself (PostgreSQL:
/// a row lock held by this object's open transaction).
///
/// [`RefreshLease::current`] is the row as read *under* the lock, so a token another replica
/// committed a moment ago is seen. Dropping the lease without finishing it releases the lock and
/// changes nothing; a crashed process releases it with its database session.
#[async_trait]
pub trait RefreshLease: Send {
    /// The connection as it is now; `None` when it does not exist.
    fn current(&self) -> Option<&Connection>;

    /// An unfinished refresh of this connection, as recorded when the lock was taken.
    fn intent(&self) -> Option<&RefreshIntent>;

    /// Durably records that `owner` is about to send the current refresh token to finX. Called
    /// before the token call; the commit (or a status change, or a delete) clears it. A
    /// compare-and-swap: it fails with [`StoreError::Busy`] when another process's intent for
    /// this version is there (unless it is `takeover`'s, a crashed owner being taken over), so
    /// two processes can never both be about to send the same token.
    async fn record_intent(
        &mut self,
        owner: &str,
        takeover: Option<&str>,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;

    /// The refresh did not reach finX, or finX certainly did not act on it: clears the intent
    /// this lease recorded (if any) and releases the lock.
    async fn abandon(self: Box<Self>) -> Result<(), StoreError>;

    /// Commits a refresh's result over the version read under the lock (see
    /// [`TokenStore::commit_refresh`]) and releases the lock.
    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError>;

    /// Sets the status (e.g. `reauth_required` after `invalid_grant`) and releases the lock.
    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;

    /// Deletes the connection (an expired one-time connection) and releases the lock.
    async fn delete(self: Box<Self>) -> Result<bool, StoreError>;
}

/// Durable, encrypted storage of connections.
///
/// Every method that writes returns only after the write is durable (fsync / commit).
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Reads and decrypts one connection.
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError>;

    /// Stores a freshly consented grant (import, code exchange), creating the connection or
    /// replacing whatever it held; the status becomes `active` and the version moves on.
    async fn put_connection(
        &self,
        key: &ConnectionKey,
        new: &NewConnection,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError>;

    /// Commits the result of a refresh if the row still has `expected_version`: the new access
    /// token always, the rotated refresh token when present (else the old one is kept).
    /// Fails with [`StoreError::Conflict`] when the version moved.
    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError>;

    /// Sets the status (`reauth_required` after `invalid_grant`, `revoked` by an operator).
    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;

    /// Records a successful manual synchronisation (`/ongoing/sync`); tokens are untouched.
    async fn record_sync(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError>;

    /// Deletes a connection; `false` when there was none.
    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError>;

    /// Every connection's metadata, without tokens (for operators).
    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError>;

    /// A round trip to the store (the readiness probe): `Ok` when it can be read now.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Takes `key`'s refresh lock (waiting at most the store's lock timeout, else
    /// [`StoreError::Busy`]) and reads the row under it.
    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError>;

    /// Remembers a started connect flow: the flow id finX issued for the gateway's state
    /// `state_id`, until `expires_at`. Any replica can then complete it. Entries expired at
    /// `now` may be purged on the way.
    async fn put_flow_state(
        &self,
        state_id: &str,
        flow_id: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<(), StoreError>;

    /// Takes (reads and deletes, atomically) a started flow's id: the first caller gets it,
    /// every later one `None`, which makes a state single use across replicas. Expired entries
    /// are `None` too.
    async fn take_flow_state(
        &self,
        state_id: &str,
        now: UnixSeconds,
    ) -> Result<Option<String>, StoreError>;

    /// Announces that the gateway process `owner` is alive, for as long as this store handle
    /// lives (PostgreSQL: a session-level advisory lock on a connection of its own). Other
    /// replicas ask [`TokenStore::owner_alive`] about the owner of a refresh intent they find.
    async fn register_owner(&self, owner: &str) -> Result<(), StoreError>;

    /// Whether the process `owner` is alive. On the embedded store another owner is always an
    /// earlier process (one process serves a file), so never alive.
    async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError>;

    /// How many times this process has (re)taken its liveness lock; a new value means its
    /// database session was lost and replaced (a failover, a restart of the database) since.
    /// `None` on the embedded store.
    fn liveness_epoch(&self) -> Option<u64> {
        None
    }

    /// Records a data call for `key` at `now` (for the keeper's idleness rule); tokens and
    /// version are untouched. A missing connection is not an error.
    async fn touch(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError>;

    /// Every unfinished refresh (see [`RefreshIntent`]), for recovery at start-up.
    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError>;

    /// Active connections to refresh before they lapse: whose refresh token was issued before
    /// `refreshed_before`, or whose last activity (data call, refresh or consent) was before
    /// `active_before`; the stalest first, at most `limit`.
    async fn due_for_keeping(
        &self,
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
        limit: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError>;

    /// Writes a connection read from another store (`store copy`), unless this store's row
    /// for it was written later (`updated_at`). The copy's version moves above any version this
    /// store has used for the key, so no refresh in flight here can compare-and-swap onto it.
    async fn copy_in(&self, connection: &Connection) -> Result<CopyOutcome, StoreError>;

    /// Counts connections by the key ids their tokens are sealed under (key rotation; see
    /// [`rotation`]). Reads only the first bytes of each token, decrypts nothing.
    async fn key_status(&self) -> Result<KeyStatus, StoreError>;

    /// Re-seals under the primary key up to `limit` connections that hold a token under another
    /// key (or in format 1), in key order after `after` (`None`: from the start). Versions are
    /// left alone, so refreshes in flight still commit; a row written by anyone between this
    /// batch's read and its write is left as it is (see [`ReencryptBatch::raced`]). Call again
    /// with [`ReencryptBatch::next`] until it is `None`: that is one pass.
    async fn reencrypt_batch(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError>;

    /// Completes a rotation if nothing is left to re-seal: the key-check record is rewritten
    /// under the primary key (atomically with the count), so the store then opens with the
    /// primary key alone. Returns the counts it decided on; [`KeyStatus::is_complete`] says
    /// whether it completed.
    async fn complete_rotation(&self) -> Result<KeyStatus, StoreError>;
}
