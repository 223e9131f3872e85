//! PostgreSQL token store: the shared store for any number of gateway replicas.
//!
//! The database is the only coordinator between replicas. Tokens are sealed exactly as in the
//! embedded store (same AEAD, same associated data, same key-check record), so rows can be copied
//! between the two kinds (`finx-gateway store copy`).
//!
//! # Why no interleaving spends a refresh token twice
//!
//! A refresh happens inside one transaction ([`PostgresStore::lock_for_refresh`]):
//!
//! 1. `SELECT … FOR UPDATE` takes the connection's row lock, waiting at most `lock_timeout`
//!    (else [`StoreError::Busy`]: the request answers 503 and nothing is spent).
//! 2. The row is read under the lock. If another replica committed a fresh access token while
//!    this one waited, that token is used and the transaction ends without a write.
//! 3. Otherwise the refresh token read in step 2 is sent to finX, still under the lock.
//! 4. The rotated refresh token and the new access token are written with
//!    `WHERE version = <version read in step 2>` and the transaction commits.
//!
//! A refresh token is only ever sent by the holder of its row's lock, and only the version it read
//! under that lock. The lock is released only by the holder's commit (which moves the version on,
//! so every later reader sees the rotated token) or by the end of the holder's session (a
//! rollback: nothing was written). There is no lease with a timer another replica could outwait,
//! and no lock another replica can free: a replica that is merely slow keeps its lock, a crashed
//! one loses it with its TCP connection.
//!
//! One case remains where the lock alone is not enough: PostgreSQL ends a holder's session while
//! its finX call is still in flight (an operator's `pg_terminate_backend`, a failover). Before
//! its call, the holder durably records a *refresh intent* (version, time, owner) on a pool of
//! its own; the commit deletes it. A replica that takes the lock and finds another owner's intent
//! for the version it read asks whether that owner is alive: every process holds a session-level
//! advisory lock named after itself on a connection of its own, which vanishes with the process.
//! A live owner means its call may still be answered and committed (by compare-and-swap on a new
//! connection), so the replica answers 503 instead of spending the token; a dead one means a
//! crash, and the replica finishes the refresh (asking finX once; `invalid_grant` then means the
//! rotation was lost, and is reported). The gateway also sets
//! `idle_in_transaction_session_timeout` above the token call's own timeout, so PostgreSQL never
//! ends a healthy holder's session itself.
//!
//! # Runtime
//!
//! The pool and every query run on a small runtime of the store's own: callers on any runtime
//! (pingora's, a test's, the CLI's) only await a spawned task. An operation whose caller stops
//! waiting still runs to completion, so a commit is never half done, and no database socket is
//! tied to a runtime that may stop before the store does.
//!
//! This module may depend on `store::crypto`, `clock` and leaf crates only.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{Connection as _, PgConnection, Postgres, Row, Transaction};

use super::crypto::{KeyCheck, KeyRing, TokenColumn};
use super::rotation::{self, DueRow, KeyStatus, ReencryptBatch, RotationCursor};
use super::{lease_version, open_stored_token, seal_tokens};
use super::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, ConnectionSummary, CopyOutcome,
    NewConnection, RefreshIntent, RefreshLease, StoreError, TokenGrant, TokenStore,
};
use crate::clock::{Clock, SystemClock, UnixSeconds};

/// The schema migrations, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/postgres");

/// Connections of the intent pool (see [`Shared::intents`]); an intent write is one short
/// statement.
pub const INTENT_POOL_SIZE: u32 = 2;

/// How the connection to PostgreSQL is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTls {
    /// Plaintext.
    Disable,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS with the certificate checked against the CA.
    VerifyCa,
    /// TLS with the certificate and host name checked.
    VerifyFull,
}

impl PgTls {
    /// Parses the config spelling (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    fn ssl_mode(self) -> PgSslMode {
        match self {
            Self::Disable => PgSslMode::Disable,
            Self::Prefer => PgSslMode::Prefer,
            Self::Require => PgSslMode::Require,
            Self::VerifyCa => PgSslMode::VerifyCa,
            Self::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

/// Everything needed to reach the database.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://…`; a secret (it may carry a password), never logged.
    pub url: SecretString,
    /// Database connections this process opens at most.
    pub pool_size: u32,
    /// Time allowed to open a connection or get one from the pool.
    pub connect_timeout: Duration,
    /// Longest a single statement may run.
    pub statement_timeout: Duration,
    /// Longest a refresh waits for another replica's refresh of the same connection.
    pub lock_timeout: Duration,
    /// Longest a refresh may hold its lock while finX answers; PostgreSQL ends sessions idle
    /// in a transaction for longer (a hung replica cannot block a connection for ever).
    pub lock_hold_limit: Duration,
    pub tls: PgTls,
    /// CA certificate (PEM) for `verify-ca` / `verify-full`.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &"<secret>")
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("lock_hold_limit", &self.lock_hold_limit)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PgSettings {
    fn connect_options(&self) -> Result<PgConnectOptions, PgOpenError> {
        // sqlx's parse error may quote the URL, password included: never pass it on.
        let mut options = PgConnectOptions::from_str(self.url.expose_secret())
            .map_err(|_| PgOpenError::BadUrl)?
            .application_name("finx-gateway")
            .ssl_mode(self.tls.ssl_mode())
            .options([
                ("lock_timeout", millis(self.lock_timeout)),
                ("statement_timeout", millis(self.statement_timeout)),
                (
                    "idle_in_transaction_session_timeout",
                    millis(self.lock_hold_limit),
                ),
            ]);
        if let Some(ca) = &self.ca_file {
            options = options.ssl_root_cert(ca);
        }
        Ok(options)
    }
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// Whether opening waits for an unreachable database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenWait {
    /// Retry with backoff until the database answers, logging each attempt (a serving replica).
    UntilReachable,
    /// Try once (operator commands fail fast).
    Once,
}

/// Why [`PostgresStore::open`] failed. No message contains the URL, a key or a token.
#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    #[error("store.url is not a valid PostgreSQL URL")]
    BadUrl,
    #[error("cannot reach PostgreSQL: {0}")]
    Unreachable(String),
    #[error("cannot migrate the PostgreSQL schema: {0}")]
    Migrate(String),
    #[error(
        "the encryption key given (key id {given_key_id}) does not match the key this token \
         store was created with or last rotated to (key id {expected_key_id}); start the \
         gateway with that key file or environment variable (as encryption_key, or in \
         previous_keys during a rotation)"
    )]
    WrongKey {
        expected_key_id: String,
        given_key_id: String,
    },
    #[error("the token store's key check record does not decrypt although its key id matches the key given: it was altered")]
    Damaged,
    #[error("cannot start the store's runtime: {0}")]
    Runtime(String),
}

/// The PostgreSQL [`TokenStore`]. Cheap to clone; clones share one pool.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    /// For connections outside the pools (the owner's liveness lock).
    options: PgConnectOptions,
    connect_timeout: Duration,
    /// Whether this process's liveness lock is held (see `register_owner`).
    liveness: Arc<tokio::sync::OnceCell<tokio::sync::watch::Receiver<bool>>>,
    /// Times the liveness lock was (re)taken.
    liveness_epoch: Arc<std::sync::atomic::AtomicU64>,
}

struct Shared {
    pool: PgPool,
    /// A pool of its own for refresh intents: they are written while the refresh's own
    /// transaction holds a connection of `pool`, so sharing it could leave every refresh waiting
    /// for a connection another refresh holds.
    intents: PgPool,
    key: KeyRing,
    /// The primary key's id.
    key_id: String,
}

/// The store's own runtime (see the module docs).
struct Worker {
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Worker {
    fn start() -> Result<Self, PgOpenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("finx-store")
            .enable_all()
            .build()
            .map_err(|e| PgOpenError::Runtime(e.to_string()))?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `work` on the store's runtime; it completes even if the caller stops waiting.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.handle
            .spawn(work)
            .await
            .map_err(|_| StoreError::Unavailable("token store task failed".to_owned()))?
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // May run inside another runtime (the last handle dropped by a request task), where a
        // blocking shutdown is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("key_id", &self.shared.key_id)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, applies pending migrations (under sqlx's advisory lock, so replicas starting
    /// together migrate once), checks the encryption key (an
    /// [`EncryptionKey`](super::crypto::EncryptionKey), or a [`KeyRing`] during a rotation: any
    /// of its keys) against the store's key-check record (creating it in a new store) and builds
    /// the pool.
    ///
    /// Blocking, callable from any thread or runtime: the work runs on the store's own runtime.
    pub fn open(
        settings: &PgSettings,
        key: impl Into<KeyRing>,
        wait: OpenWait,
    ) -> Result<Self, PgOpenError> {
        let key = key.into();
        let options = settings.connect_options()?;
        let own_options = options.clone();
        let worker = Worker::start()?;
        let pool_size = settings.pool_size;
        let connect_timeout = settings.connect_timeout;
        let key_id = key.primary_key_id();
        let handle = worker.handle.clone();
        let open = move || async move {
            let mut key = key;
            prepare(&options, &mut key, wait, connect_timeout).await?;
            // Lazy: connections are opened on the store's runtime when first needed.
            let pool_of = |size: u32| {
                PgPoolOptions::new()
                    .max_connections(size)
                    .min_connections(0)
                    .acquire_timeout(connect_timeout)
                    // Connections are replaced now and then, so a failover's new primary is
                    // picked up even by connections that never failed.
                    .max_lifetime(Duration::from_secs(30 * 60))
                    .connect_lazy_with(options.clone())
            };
            Ok::<_, PgOpenError>(Shared {
                pool: pool_of(pool_size),
                intents: pool_of(INTENT_POOL_SIZE),
                key,
                key_id,
            })
        };
        // A thread of its own: `block_on` is not allowed on a thread that runs a runtime.
        let shared = std::thread::scope(|scope| {
            scope
                .spawn(move || handle.block_on(open()))
                .join()
                .map_err(|_| PgOpenError::Runtime("the opening thread panicked".to_owned()))
        })??;
        Ok(Self {
            shared: Arc::new(shared),
            worker: Arc::new(worker),
            options: own_options,
            connect_timeout,
            liveness: Arc::default(),
            liveness_epoch: Arc::default(),
        })
    }

    /// Applies pending migrations and reports how many there were (`store migrate`).
    pub async fn migrate_only(settings: &PgSettings) -> Result<usize, PgOpenError> {
        let options = settings.connect_options()?;
        let mut conn = connect_once(&options, settings.connect_timeout).await?;
        let applied = applied_migrations(&mut conn).await;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| PgOpenError::Migrate(e.to_string()))?;
        let now = applied_migrations(&mut conn).await;
        let _ = conn.close().await;
        Ok(now.saturating_sub(applied))
    }

    /// The id of the key this store encrypts with (safe to log).
    pub fn key_id(&self) -> &str {
        &self.shared.key_id
    }

    async fn run<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.worker.run(work(self.shared.clone())).await
    }

    fn seal(
        &self,
        key: &ConnectionKey,
        column: TokenColumn,
        token: &SecretString,
    ) -> Result<Vec<u8>, StoreError> {
        self.shared
            .key
            .seal_token(key, column, token)
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

async fn connect_once(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection, PgOpenError> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(PgOpenError::Unreachable(e.to_string())),
        Err(_) => Err(PgOpenError::Unreachable(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

async fn applied_migrations(conn: &mut PgConnection) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(conn)
        .await
        .map_or(0, |n| n as usize)
}

/// Connection, migrations and key check, retried while the database is unreachable.
async fn prepare(
    options: &PgConnectOptions,
    key: &mut KeyRing,
    wait: OpenWait,
    connect_timeout: Duration,
) -> Result<(), PgOpenError> {
    let mut pause = Duration::from_millis(500);
    loop {
        let attempt = async {
            let mut conn = connect_once(options, connect_timeout).await?;
            MIGRATOR
                .run(&mut conn)
                .await
                .map_err(|e| PgOpenError::Migrate(e.to_string()))?;
            let outcome = check_key(&mut conn, &mut *key).await;
            let _ = conn.close().await;
            outcome
        };
        match attempt.await {
            // Another replica may hold the migration lock for longer than `lock_timeout`; any
            // other migration error (a changed or missing migration, privileges) is final.
            Err(PgOpenError::Unreachable(reason)) if wait == OpenWait::UntilReachable => {
                tracing::warn!(%reason, retry_in = ?pause, "token store: PostgreSQL is not reachable yet; waiting for it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            Err(PgOpenError::Migrate(reason))
                if wait == OpenWait::UntilReachable && reason.contains("lock") =>
            {
                tracing::warn!(%reason, retry_in = ?pause, "token store: another replica is migrating the schema; waiting for it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            outcome => return outcome,
        }
    }
}

async fn check_key(conn: &mut PgConnection, key: &mut KeyRing) -> Result<(), PgOpenError> {
    let unreachable = |e: sqlx::Error| PgOpenError::Unreachable(e.to_string());
    let check = key.seal_key_check().map_err(|_| PgOpenError::Damaged)?;
    // The first replica to start writes the record; everyone else reads the one that won.
    sqlx::query(
        "INSERT INTO store_meta (id, key_id, key_check, created_at) VALUES (1, $1, $2, $3) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(key.primary_key_id())
    .bind(check)
    .bind(SystemClock.now())
    .execute(&mut *conn)
    .await
    .map_err(unreachable)?;
    let row = sqlx::query("SELECT key_id, key_check FROM store_meta WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(unreachable)?;
    let stored_key_id: String = row.try_get(0).map_err(unreachable)?;
    let sealed: Vec<u8> = row.try_get(1).map_err(unreachable)?;
    match key.accept_key_check(&stored_key_id, &sealed) {
        KeyCheck::Matches => Ok(()),
        KeyCheck::Damaged => Err(PgOpenError::Damaged),
        KeyCheck::WrongKey { expected_key_id } => Err(PgOpenError::WrongKey {
            expected_key_id,
            given_key_id: key.describe(),
        }),
    }
}

/// Maps a database error; a lock wait that ran out is [`StoreError::Busy`]. sqlx errors never
/// carry bound parameter values, and no SQL here is built from data.
fn db_error(key: Option<&ConnectionKey>, error: sqlx::Error) -> StoreError {
    let lock_not_available = error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03");
    match key {
        Some(key) if lock_not_available => StoreError::Busy(key.clone()),
        _ => StoreError::Unavailable(format!("postgres: {error}")),
    }
}

const SELECT_ROW: &str = "SELECT status, refresh_token, access_token, access_expires_at, scope, \
                          version, created_at, refreshed_at, synced_at, updated_at, \
                          last_used_at FROM connections WHERE key = $1";

fn decrypt_row(enc: &KeyRing, key: &ConnectionKey, row: &PgRow) -> Result<Connection, StoreError> {
    let get_error = |e: sqlx::Error| db_error(Some(key), e);
    let corrupt = || StoreError::Corrupt(key.clone());
    let open = |column: TokenColumn, sealed: &[u8]| open_stored_token(enc, key, column, sealed);
    let status: String = row.try_get("status").map_err(get_error)?;
    let status = ConnectionStatus::parse(&status).ok_or_else(corrupt)?;
    let sealed_refresh: Vec<u8> = row.try_get("refresh_token").map_err(get_error)?;
    let sealed_access: Option<Vec<u8>> = row.try_get("access_token").map_err(get_error)?;
    let access_expires_at: Option<i64> = row.try_get("access_expires_at").map_err(get_error)?;
    let access = match (sealed_access, access_expires_at) {
        (Some(sealed), Some(expires_at)) => Some(AccessToken {
            token: open(TokenColumn::AccessToken, &sealed)?,
            expires_at,
        }),
        (None, None) => None,
        _ => return Err(corrupt()),
    };
    Ok(Connection {
        key: key.clone(),
        status,
        refresh_token: open(TokenColumn::RefreshToken, &sealed_refresh)?,
        access,
        scope: row.try_get("scope").map_err(get_error)?,
        version: row.try_get("version").map_err(get_error)?,
        created_at: row.try_get("created_at").map_err(get_error)?,
        refreshed_at: row.try_get("refreshed_at").map_err(get_error)?,
        synced_at: row.try_get("synced_at").map_err(get_error)?,
        updated_at: row.try_get("updated_at").map_err(get_error)?,
        last_used_at: row.try_get("last_used_at").map_err(get_error)?,
    })
}

/// The commit of a refresh, shared by the lease (inside its transaction) and
/// [`TokenStore::commit_refresh`] (a transaction of its own).
async fn commit_in(
    tx: &mut Transaction<'static, Postgres>,
    shared: &Shared,
    key: &ConnectionKey,
    expected_version: i64,
    sealed: SealedGrant,
    now: UnixSeconds,
) -> Result<Connection, StoreError> {
    let row = sqlx::query(
        "UPDATE connections SET access_token = $1, access_expires_at = $2, \
         refresh_token = COALESCE($3, refresh_token), scope = COALESCE($4, scope), \
         version = nextval('connection_versions'), refreshed_at = $5, updated_at = $5, \
         key_id = $6 WHERE key = $7 AND version = $8 RETURNING key",
    )
    .bind(sealed.access)
    .bind(sealed.expires_at)
    .bind(sealed.refresh)
    .bind(sealed.scope)
    .bind(now)
    .bind(&shared.key_id)
    .bind(key.as_str())
    .bind(expected_version)
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| db_error(Some(key), e))?;
    if row.is_some() {
        clear_intent(tx, key).await?;
        crate::fail_point!("refresh-during-commit");
    } else {
        let exists = sqlx::query("SELECT 1 FROM connections WHERE key = $1")
            .bind(key.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| db_error(Some(key), e))?;
        return Err(match exists {
            Some(_) => StoreError::Conflict(key.clone()),
            None => StoreError::NotFound(key.clone()),
        });
    }
    let row = sqlx::query(SELECT_ROW)
        .bind(key.as_str())
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| db_error(Some(key), e))?;
    decrypt_row(&shared.key, key, &row)
}

/// A grant's tokens, sealed for one connection.
struct SealedGrant {
    access: Vec<u8>,
    expires_at: UnixSeconds,
    refresh: Option<Vec<u8>>,
    scope: Option<String>,
}

impl PostgresStore {
    fn seal_grant(
        &self,
        key: &ConnectionKey,
        grant: &TokenGrant,
    ) -> Result<SealedGrant, StoreError> {
        Ok(SealedGrant {
            access: self.seal(key, TokenColumn::AccessToken, &grant.access.token)?,
            expires_at: grant.access.expires_at,
            refresh: grant
                .refresh_token
                .as_ref()
                .map(|token| self.seal(key, TokenColumn::RefreshToken, token))
                .transpose()?,
            scope: grant.scope.clone(),
        })
    }
}

/// Forgets an unfinished refresh of `key`; its outcome is written in the same transaction.
async fn clear_intent(executor: &mut PgConnection, key: &ConnectionKey) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM refresh_intents WHERE key = $1")
        .bind(key.as_str())
        .execute(executor)
        .await
        .map_err(|e| db_error(Some(key), e))
        .map(drop)
}

async fn set_status_in(
    executor: &mut PgConnection,
    key: &ConnectionKey,
    status: ConnectionStatus,
    now: UnixSeconds,
) -> Result<(), StoreError> {
    let changed = sqlx::query(
        "UPDATE connections SET status = $1, version = nextval('connection_versions'), \
         updated_at = $2 WHERE key = $3",
    )
    .bind(status.as_str())
    .bind(now)
    .bind(key.as_str())
    .execute(&mut *executor)
    .await
    .map_err(|e| db_error(Some(key), e))?
    .rows_affected();
    if changed == 0 {
        return Err(StoreError::NotFound(key.clone()));
    }
    clear_intent(executor, key).await
}

async fn delete_in(executor: &mut PgConnection, key: &ConnectionKey) -> Result<bool, StoreError> {
    let deleted = sqlx::query("DELETE FROM connections WHERE key = $1")
        .bind(key.as_str())
        .execute(&mut *executor)
        .await
        .map_err(|e| db_error(Some(key), e))?
        .rows_affected();
    clear_intent(executor, key).await?;
    Ok(deleted > 0)
}

/// Each token's label for [`KeyStatus::tally`]: its key id, `'1'` for format 1, `''` for none.
/// (`substring`, unlike `get_byte`, cannot fail on a short value.)
const KEY_LABELS: &str = "SELECT \
    CASE WHEN octet_length(refresh_token) >= 9 \
              AND substring(refresh_token from 1 for 1) = '\\x02'::bytea \
         THEN encode(substring(refresh_token from 2 for 8), 'hex') ELSE '1' END, \
    CASE WHEN access_token IS NULL THEN '' \
         WHEN octet_length(access_token) >= 9 \
              AND substring(access_token from 1 for 1) = '\\x02'::bytea \
         THEN encode(substring(access_token from 2 for 8), 'hex') ELSE '1' END, \
    count(*) FROM connections GROUP BY 1, 2";

/// The connections due for re-sealing (a token not starting with `$2`, the primary key's
/// prefix) after `$1`, in key order, at most `$3`, locked; rows a refresh holds are skipped.
const SELECT_DUE: &str = "SELECT key, version, refresh_token, access_token FROM connections \
    WHERE key > $1 AND (substring(refresh_token from 1 for 9) <> $2 \
    OR (access_token IS NOT NULL AND substring(access_token from 1 for 9) <> $2)) \
    ORDER BY key LIMIT $3 FOR UPDATE SKIP LOCKED";

/// Counts the connections by key id.
async fn key_status_in(conn: &mut PgConnection, ring: &KeyRing) -> Result<KeyStatus, StoreError> {
    let check_key_id: String = sqlx::query_scalar("SELECT key_id FROM store_meta WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error(None, e))?;
    let groups: Vec<(String, String, i64)> = sqlx::query_as(KEY_LABELS)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error(None, e))?;
    Ok(KeyStatus::tally(
        ring.primary_key_id(),
        check_key_id,
        groups,
    ))
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        let key = key.clone();
        self.run(|shared| async move {
            let row = sqlx::query(SELECT_ROW)
                .bind(key.as_str())
                .fetch_optional(&shared.pool)
                .await
                .map_err(|e| db_error(Some(&key), e))?;
            row.map(|row| decrypt_row(&shared.key, &key, &row))
                .transpose()
        })
        .await
    }

    /// Creates or replaces the connection; on replace, `created_at` restarts at `now` and
    /// `refreshed_at`/`synced_at` are cleared, as in the embedded store.
    async fn put_connection(
        &self,
        key: &ConnectionKey,
        new: &NewConnection,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let sealed = seal_tokens(
            &self.shared.key,
            key,
            &new.refresh_token,
            new.access.as_ref(),
        )?;
        let (sealed_refresh, sealed_access) = (sealed.refresh, sealed.access);
        let expires_at = new.access.as_ref().map(|access| access.expires_at);
        let scope = new.scope.clone();
        let stored_key = key.clone();
        let version = self
            .run(|shared| async move {
                let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
                let version = sqlx::query_scalar::<_, i64>(
                    "INSERT INTO connections (key, status, refresh_token, access_token, \
                     access_expires_at, scope, version, created_at, refreshed_at, synced_at, \
                     updated_at, key_id) VALUES ($1, 'active', $2, $3, $4, $5, \
                     nextval('connection_versions'), $6, NULL, NULL, $6, $7) \
                     ON CONFLICT (key) DO UPDATE SET status = excluded.status, \
                     refresh_token = excluded.refresh_token, \
                     access_token = excluded.access_token, \
                     access_expires_at = excluded.access_expires_at, scope = excluded.scope, \
                     version = excluded.version, created_at = excluded.created_at, \
                     refreshed_at = NULL, synced_at = NULL, updated_at = excluded.updated_at, \
                     key_id = excluded.key_id RETURNING version",
                )
                .bind(stored_key.as_str())
                .bind(sealed_refresh)
                .bind(sealed_access)
                .bind(expires_at)
                .bind(scope)
                .bind(now)
                .bind(&shared.key_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error(Some(&stored_key), e))?;
                clear_intent(&mut tx, &stored_key).await?;
                tx.commit().await.map_err(|e| db_error(None, e))?;
                Ok(version)
            })
            .await?;
        Ok(Connection::consented(key, new, version, now))
    }

    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let sealed = self.seal_grant(key, grant)?;
        let key = key.clone();
        self.run(|shared| async move {
            let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
            let committed =
                commit_in(&mut tx, &shared, &key, expected_version, sealed, now).await?;
            tx.commit().await.map_err(|e| db_error(None, e))?;
            Ok(committed)
        })
        .await
    }

    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(|shared| async move {
            let mut conn = shared.pool.acquire().await.map_err(|e| db_error(None, e))?;
            set_status_in(&mut conn, &key, status, now).await
        })
        .await
    }

    async fn record_sync(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(|shared| async move {
            let changed = sqlx::query(
                "UPDATE connections SET synced_at = $1, updated_at = $1 WHERE key = $2",
            )
            .bind(now)
            .bind(key.as_str())
            .execute(&shared.pool)
            .await
            .map_err(|e| db_error(Some(&key), e))?
            .rows_affected();
            if changed == 0 {
                return Err(StoreError::NotFound(key));
            }
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.run(|shared| async move {
            let mut conn = shared.pool.acquire().await.map_err(|e| db_error(None, e))?;
            delete_in(&mut conn, &key).await
        })
        .await
    }

    /// Rows whose key or status is unreadable are left out (and logged), as in the embedded
    /// store.
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|shared| async move {
            sqlx::query("SELECT 1")
                .execute(&shared.pool)
                .await
                .map(drop)
                .map_err(|e| db_error(None, e))
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        self.run(|shared| async move {
            let rows = sqlx::query(
                "SELECT key, status, version, created_at, refreshed_at, synced_at, updated_at, \
                 last_used_at, scope FROM connections ORDER BY key",
            )
            .fetch_all(&shared.pool)
            .await
            .map_err(|e| db_error(None, e))?;
            let mut summaries = Vec::with_capacity(rows.len());
            for row in rows {
                let summary = (|| {
                    let stored: String = row.try_get("key").ok()?;
                    let key = ConnectionKey::from_stored(&stored).ok()?;
                    let status: String = row.try_get("status").ok()?;
                    Some(ConnectionSummary {
                        status: ConnectionStatus::parse(&status)?,
                        version: row.try_get("version").ok()?,
                        created_at: row.try_get("created_at").ok()?,
                        refreshed_at: row.try_get("refreshed_at").ok()?,
                        synced_at: row.try_get("synced_at").ok()?,
                        updated_at: row.try_get("updated_at").ok()?,
                        last_used_at: row.try_get("last_used_at").ok()?,
                        scope: row.try_get("scope").ok()?,
                        key,
                    })
                })();
                match summary {
                    Some(summary) => summaries.push(summary),
                    None => tracing::warn!("token store holds an unreadable connection row"),
                }
            }
            Ok(summaries)
        })
        .await
    }

    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError> {
        let task_key = key.clone();
        let (tx, current, intent) = self
            .run(|shared| async move {
                let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
                let row = sqlx::query(
                    "SELECT status, refresh_token, access_token, access_expires_at, scope, \
                     version, created_at, refreshed_at, synced_at, updated_at, last_used_at \
                     FROM connections WHERE key = $1 FOR UPDATE",
                )
                .bind(task_key.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(Some(&task_key), e))?;
                let current = row
                    .map(|row| decrypt_row(&shared.key, &task_key, &row))
                    .transpose()?;
                let intent = sqlx::query(
                    "SELECT version, started_at, owner FROM refresh_intents WHERE key = $1",
                )
                .bind(task_key.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(Some(&task_key), e))?
                .map(|row| intent_of(&row))
                .transpose()?;
                Ok((tx, current, intent))
            })
            .await?;
        Ok(Box::new(PgLease {
            store: self.clone(),
            key: key.clone(),
            tx: Some(tx),
            current,
            intent,
        }))
    }

    async fn put_flow_state(
        &self,
        state_id: &str,
        flow_id: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let (state_id, flow_id) = (state_id.to_owned(), flow_id.to_owned());
        self.run(|shared| async move {
            let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
            // Flows whose users never came back are forgotten once their state has expired.
            sqlx::query("DELETE FROM flow_states WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(None, e))?;
            sqlx::query(
                "INSERT INTO flow_states (state_id, flow_id, expires_at) VALUES ($1, $2, $3)",
            )
            .bind(state_id)
            .bind(flow_id)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(None, e))?;
            tx.commit().await.map_err(|e| db_error(None, e))
        })
        .await
    }

    async fn take_flow_state(
        &self,
        state_id: &str,
        now: UnixSeconds,
    ) -> Result<Option<String>, StoreError> {
        let state_id = state_id.to_owned();
        self.run(|shared| async move {
            let taken = sqlx::query(
                "DELETE FROM flow_states WHERE state_id = $1 RETURNING flow_id, expires_at",
            )
            .bind(state_id)
            .fetch_optional(&shared.pool)
            .await
            .map_err(|e| db_error(None, e))?;
            let Some(row) = taken else {
                return Ok(None);
            };
            let flow_id: String = row.try_get(0).map_err(|e| db_error(None, e))?;
            let expires_at: i64 = row.try_get(1).map_err(|e| db_error(None, e))?;
            Ok((expires_at > now).then_some(flow_id))
        })
        .await
    }

    /// Holds `pg_advisory_lock(<owner>)` on a connection of its own for as long as the store's
    /// runtime runs, taking it again after the connection is lost; a crashed process's lock
    /// vanishes with its session. The holder starts once per store; every call waits (at most
    /// the connect timeout) until the lock is held.
    async fn register_owner(&self, owner: &str) -> Result<(), StoreError> {
        let mut held = self
            .liveness
            .get_or_init(|| async {
                let (announce, held) = tokio::sync::watch::channel(false);
                let (owner, options) = (owner.to_owned(), self.options.clone());
                let connect_timeout = self.connect_timeout;
                let epoch = self.liveness_epoch.clone();
                self.worker.handle.spawn(async move {
                    loop {
                        let locked = async {
                            let mut conn = tokio::time::timeout(
                                connect_timeout,
                                PgConnection::connect_with(&options),
                            )
                            .await
                            .map_err(|_| sqlx::Error::PoolTimedOut)??;
                            sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                                .bind(owner_lock_name(&owner))
                                .execute(&mut conn)
                                .await?;
                            Ok::<_, sqlx::Error>(conn)
                        }
                        .await;
                        if let Ok(mut conn) = locked {
                            epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let _ = announce.send(true);
                            // Keep the session (and its lock); notice when it is gone.
                            while conn.ping().await.is_ok() {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            let _ = announce.send(false);
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
                held
            })
            .await
            .clone();
        let announced = tokio::time::timeout(self.connect_timeout, async {
            held.wait_for(|held| *held).await.is_ok()
        })
        .await;
        if announced == Ok(true) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "cannot announce this process to PostgreSQL (liveness lock)".to_owned(),
            ))
        }
    }

    fn liveness_epoch(&self) -> Option<u64> {
        Some(
            self.liveness_epoch
                .load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError> {
        let name = owner_lock_name(owner);
        self.run(|shared| async move {
            let mut conn = shared.pool.acquire().await.map_err(|e| db_error(None, e))?;
            let free: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(&name)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| db_error(None, e))?;
            if free {
                // Taken only to look: released before the connection goes back to the pool.
                sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_error(None, e))?;
            }
            Ok(!free)
        })
        .await
    }

    /// Skips a row whose refresh lock is held: the refresh in progress is activity itself, and
    /// a background touch must never wait behind it.
    async fn touch(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(|shared| async move {
            sqlx::query(
                "UPDATE connections SET last_used_at = GREATEST(coalesce(last_used_at, 0), $1) \
                 WHERE key IN (SELECT key FROM connections WHERE key = $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(now)
            .bind(key.as_str())
            .execute(&shared.pool)
            .await
            .map_err(|e| db_error(Some(&key), e))
            .map(drop)
        })
        .await
    }

    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError> {
        self.run(|shared| async move {
            let rows = sqlx::query(
                "SELECT version, started_at, owner, key FROM refresh_intents ORDER BY key",
            )
            .fetch_all(&shared.pool)
            .await
            .map_err(|e| db_error(None, e))?;
            let mut intents = Vec::with_capacity(rows.len());
            for row in rows {
                let stored: String = row.try_get(3).map_err(|e| db_error(None, e))?;
                if let Ok(key) = ConnectionKey::from_stored(&stored) {
                    intents.push((key, intent_of(&row)?));
                }
            }
            Ok(intents)
        })
        .await
    }

    async fn due_for_keeping(
        &self,
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
        limit: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError> {
        self.run(move |shared| async move {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT key FROM connections WHERE status = 'active' AND \
                 octet_length(refresh_token) > 0 AND \
                 (coalesce(refreshed_at, created_at) < $1 OR \
                  GREATEST(last_used_at, refreshed_at, created_at) < $2) \
                 ORDER BY coalesce(refreshed_at, created_at) LIMIT $3",
            )
            .bind(refreshed_before)
            .bind(active_before)
            .bind(i64::from(limit))
            .fetch_all(&shared.pool)
            .await
            .map_err(|e| db_error(None, e))?;
            Ok(rows
                .iter()
                .filter_map(|stored| ConnectionKey::from_stored(stored).ok())
                .collect())
        })
        .await
    }

    async fn copy_in(&self, connection: &Connection) -> Result<CopyOutcome, StoreError> {
        let key = connection.key.clone();
        let sealed = seal_tokens(
            &self.shared.key,
            &key,
            &connection.refresh_token,
            connection.access.as_ref(),
        )?;
        let (sealed_refresh, sealed_access) = (sealed.refresh, sealed.access);
        let c = connection.clone();
        self.run(|shared| async move {
            let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
            let existing = sqlx::query("SELECT updated_at FROM connections WHERE key = $1 FOR UPDATE")
                .bind(key.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(Some(&key), e))?;
            if let Some(row) = existing {
                let updated_at: i64 = row.try_get(0).map_err(|e| db_error(None, e))?;
                if updated_at > c.updated_at {
                    return Ok(CopyOutcome::TargetNewer);
                }
            }
            // Above every version this store has handed out, and never below the source's.
            sqlx::query(
                "INSERT INTO connections (key, status, refresh_token, access_token, \
                 access_expires_at, scope, version, created_at, refreshed_at, synced_at, \
                 updated_at, key_id, last_used_at) VALUES ($1, $2, $3, $4, $5, $6, \
                 GREATEST($7, nextval('connection_versions')), $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (key) DO UPDATE SET status = excluded.status, \
                 refresh_token = excluded.refresh_token, access_token = excluded.access_token, \
                 access_expires_at = excluded.access_expires_at, scope = excluded.scope, \
                 version = excluded.version, created_at = excluded.created_at, \
                 refreshed_at = excluded.refreshed_at, synced_at = excluded.synced_at, \
                 updated_at = excluded.updated_at, key_id = excluded.key_id, \
                 last_used_at = excluded.last_used_at",
            )
            .bind(key.as_str())
            .bind(c.status.as_str())
            .bind(sealed_refresh)
            .bind(sealed_access)
            .bind(c.access.as_ref().map(|a| a.expires_at))
            .bind(c.scope)
            .bind(c.version)
            .bind(c.created_at)
            .bind(c.refreshed_at)
            .bind(c.synced_at)
            .bind(c.updated_at)
            .bind(&shared.key_id)
            .bind(c.last_used_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(Some(&key), e))?;
            clear_intent(&mut tx, &key).await?;
            // A copied version above the sequence would be handed out again later.
            sqlx::query(
                "SELECT setval('connection_versions', GREATEST($1, (SELECT last_value FROM connection_versions)))",
            )
            .bind(c.version)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(None, e))?;
            tx.commit().await.map_err(|e| db_error(None, e))?;
            Ok(CopyOutcome::Written)
        })
        .await
    }

    async fn key_status(&self) -> Result<KeyStatus, StoreError> {
        self.run(|shared| async move {
            let mut conn = shared.pool.acquire().await.map_err(|e| db_error(None, e))?;
            key_status_in(&mut conn, &shared.key).await
        })
        .await
    }

    /// One transaction: the due rows are read under their row locks (rows a refresh holds are
    /// skipped, for the next pass), re-sealed, and written back by compare-and-swap on their
    /// version and ciphertexts (which the locks already guarantee).
    async fn reencrypt_batch(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError> {
        let after = after.map_or_else(String::new, |cursor| cursor.0.clone());
        self.run(move |shared| async move {
            let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
            let prefix = shared.key.current_prefix();
            let rows = sqlx::query(SELECT_DUE)
                .bind(after)
                .bind(&prefix[..])
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| db_error(None, e))?;
            let get = |e: sqlx::Error| db_error(None, e);
            let mut due = Vec::with_capacity(rows.len());
            for row in rows {
                due.push(DueRow {
                    stored_key: row.try_get(0).map_err(get)?,
                    version: row.try_get(1).map_err(get)?,
                    refresh: row.try_get(2).map_err(get)?,
                    access: row.try_get(3).map_err(get)?,
                });
            }
            let mut batch = ReencryptBatch::default();
            for row in rotation::reseal_rows(&shared.key, due, limit, &mut batch)? {
                let changed = sqlx::query(
                    "UPDATE connections SET refresh_token = $1, access_token = $2, key_id = $3 \
                     WHERE key = $4 AND version = $5 AND refresh_token = $6 \
                     AND access_token IS NOT DISTINCT FROM $7",
                )
                .bind(row.refresh)
                .bind(row.access)
                .bind(&shared.key_id)
                .bind(row.key.as_str())
                .bind(row.version)
                .bind(row.old_refresh)
                .bind(row.old_access)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(Some(&row.key), e))?
                .rows_affected();
                if changed == 1 {
                    batch.resealed += 1;
                } else {
                    batch.raced += 1;
                }
            }
            tx.commit().await.map_err(|e| db_error(None, e))?;
            Ok(batch)
        })
        .await
    }

    /// The key-check record is locked while the connections are counted, so two completions
    /// never interleave. A replica still sealing under an older primary key is not stopped by
    /// it: every replica must have the new primary key before a rotation (see the README).
    async fn complete_rotation(&self) -> Result<KeyStatus, StoreError> {
        self.run(|shared| async move {
            let mut tx = shared.pool.begin().await.map_err(|e| db_error(None, e))?;
            sqlx::query("SELECT 1 FROM store_meta WHERE id = 1 FOR UPDATE")
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(None, e))?;
            let mut status = key_status_in(&mut tx, &shared.key).await?;
            if status.pending == 0 && status.check_key_id != status.primary_key_id {
                let check = shared
                    .key
                    .seal_key_check()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                sqlx::query("UPDATE store_meta SET key_id = $1, key_check = $2 WHERE id = 1")
                    .bind(&shared.key_id)
                    .bind(check)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(None, e))?;
                tx.commit().await.map_err(|e| db_error(None, e))?;
                tracing::info!(
                    key_id = %shared.key_id,
                    previous_key_id = %status.check_key_id,
                    "key rotation complete: the store's key check is now sealed under the primary key"
                );
                status.check_key_id = shared.key_id.clone();
            }
            Ok(status)
        })
        .await
    }
}

/// The advisory lock name that says a gateway process is alive.
fn owner_lock_name(owner: &str) -> String {
    format!("finx-gateway owner {owner}")
}

/// A refresh under the row lock of an open transaction (see the module docs).
struct PgLease {
    store: PostgresStore,
    key: ConnectionKey,
    tx: Option<Transaction<'static, Postgres>>,
    current: Option<Connection>,
    intent: Option<RefreshIntent>,
}

fn intent_of(row: &PgRow) -> Result<RefreshIntent, StoreError> {
    let get = |e: sqlx::Error| db_error(None, e);
    Ok(RefreshIntent {
        version: row.try_get(0).map_err(get)?,
        started_at: row.try_get(1).map_err(get)?,
        owner: row.try_get(2).map_err(get)?,
    })
}

impl PgLease {
    /// Runs `work` with the transaction on the store's runtime, then commits it.
    async fn finish<T, F, Fut>(mut self: Box<Self>, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>, Transaction<'static, Postgres>) -> Fut,
        Fut: Future<Output = Result<(T, Transaction<'static, Postgres>), StoreError>>
            + Send
            + 'static,
    {
        let tx = self
            .tx
            .take()
            .ok_or_else(|| StoreError::Unavailable("refresh lease already used".to_owned()))?;
        let work = work(self.store.shared.clone(), tx);
        self.store
            .worker
            .run(async move {
                let (value, tx) = work.await?;
                tx.commit().await.map_err(|e| db_error(None, e))?;
                Ok(value)
            })
            .await
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        // Unfinished: roll back on the store's runtime (sqlx returns a connection to its pool
        // with a spawned task, which needs a runtime; the caller may have none).
        if let Some(tx) = self.tx.take() {
            self.store.worker.handle.spawn(async move {
                let _ = tx.rollback().await;
            });
        }
    }
}

#[async_trait]
impl RefreshLease for PgLease {
    fn current(&self) -> Option<&Connection> {
        self.current.as_ref()
    }

    fn intent(&self) -> Option<&RefreshIntent> {
        self.intent.as_ref()
    }

    /// Written on the intent pool and committed at once, outside the lease's transaction (which
    /// holds the row lock until the refresh commits or rolls back).
    async fn record_intent(
        &mut self,
        owner: &str,
        takeover: Option<&str>,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let version = lease_version(self.current.as_ref(), &self.key)?;
        let (key, owner_id) = (self.key.clone(), owner.to_owned());
        let takeover = takeover.map(str::to_owned);
        let written = self
            .store
            .run(|shared| async move {
                sqlx::query(
                    "INSERT INTO refresh_intents (key, version, started_at, owner) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET \
                     version = excluded.version, started_at = excluded.started_at, \
                     owner = excluded.owner WHERE refresh_intents.owner = excluded.owner \
                     OR refresh_intents.version < excluded.version \
                     OR refresh_intents.owner = $5",
                )
                .bind(key.as_str())
                .bind(version)
                .bind(now)
                .bind(owner_id)
                .bind(takeover)
                .execute(&shared.intents)
                .await
                .map_err(|e| db_error(Some(&key), e))
                .map(|done| done.rows_affected())
            })
            .await?;
        if written == 0 {
            // Another process is about to send this very token (its lock went with its
            // session after this lease read the row): never both.
            return Err(StoreError::Busy(self.key.clone()));
        }
        self.intent = Some(RefreshIntent {
            version,
            started_at: now,
            owner: owner.to_owned(),
        });
        Ok(())
    }

    /// The intent is deleted on the intent pool; dropping the lease then rolls back its
    /// transaction, which releases the row lock.
    async fn abandon(mut self: Box<Self>) -> Result<(), StoreError> {
        let Some(intent) = self.intent.take() else {
            return Ok(());
        };
        let key = self.key.clone();
        self.store
            .run(|shared| async move {
                sqlx::query(
                    "DELETE FROM refresh_intents WHERE key = $1 AND version = $2 AND owner = $3",
                )
                .bind(key.as_str())
                .bind(intent.version)
                .bind(intent.owner)
                .execute(&shared.intents)
                .await
                .map_err(|e| db_error(Some(&key), e))
                .map(drop)
            })
            .await
    }

    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let key = self.key.clone();
        let version = lease_version(self.current.as_ref(), &key)?;
        let sealed = self.store.seal_grant(&key, grant)?;
        self.finish(|shared, mut tx| async move {
            let committed = commit_in(&mut tx, &shared, &key, version, sealed, now).await?;
            Ok((committed, tx))
        })
        .await
    }

    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let key = self.key.clone();
        self.finish(|_, mut tx| async move {
            set_status_in(&mut tx, &key, status, now).await?;
            Ok(((), tx))
        })
        .await
    }

    async fn delete(self: Box<Self>) -> Result<bool, StoreError> {
        let key = self.key.clone();
        self.finish(|_, mut tx| async move {
            let deleted = delete_in(&mut tx, &key).await?;
            Ok((deleted, tx))
        })
        .await
    }
}
