//! Embedded SQLite token store, the default [`TokenStore`].
//!
//! One database file in WAL mode with `synchronous=FULL`: a write returns only after its
//! transaction is committed and fsynced, which is what invariant 3 ("persist before use") needs.
//! Tokens are sealed with the primary key of the store's [`KeyRing`] (see [`super::crypto`]) and bound to
//! their row and column; everything else (status, version, timestamps, scope) is plaintext so
//! operators can inspect it.
//!
//! The store refuses to open unless its key ring holds the store's key: a `meta` row holds a
//! known constant sealed under that key plus its key id (the key the store was created with, or
//! the primary key of the last completed rotation; see [`super::rotation`]). A row that fails to decrypt
//! (tampered, copied from another row) fails only its own connection with
//! [`StoreError::Corrupt`]; reads never modify or delete anything.
//!
//! Versions: every write moves a connection's `version` on, and a connection created after a
//! delete continues above the deleted one's version (`meta.version_floor`), so a refresh that
//! started before a delete and re-consent can never compare-and-swap onto the new connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{
    params, Connection as DbConnection, OpenFlags, OptionalExtension, TransactionBehavior,
};
use secrecy::SecretString;

use super::crypto::{KeyCheck, KeyRing, TokenColumn};
use super::rotation::{self, DueRow, KeyStatus, ReencryptBatch, Resealed, RotationCursor};
use super::{lease_version, open_stored_token, seal_tokens};
use super::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, ConnectionSummary, CopyOutcome,
    NewConnection, RefreshIntent, RefreshLease, StoreError, TokenGrant, TokenStore,
};
use crate::clock::{Clock, SystemClock, UnixSeconds};

/// The schema this build writes; `PRAGMA user_version` holds the file's.
const SCHEMA_VERSION: i64 = 3;

/// How long a write waits for another process (e.g. an operator's CLI) holding the lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    key_id        TEXT    NOT NULL,
    key_check     BLOB    NOT NULL,
    -- The highest version any deleted connection reached; new connections start above it.
    version_floor INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE connections (
    key               TEXT    PRIMARY KEY NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('active', 'reauth_required', 'revoked')),
    refresh_token     BLOB    NOT NULL,
    access_token      BLOB,
    access_expires_at INTEGER,
    scope             TEXT,
    version           INTEGER NOT NULL CHECK (version >= 1),
    created_at        INTEGER NOT NULL,
    refreshed_at      INTEGER,
    -- Last successful manual synchronisation (`/ongoing/sync`) through the gateway.
    synced_at         INTEGER,
    updated_at        INTEGER NOT NULL,
    key_id            TEXT    NOT NULL,
    CHECK ((access_token IS NULL) = (access_expires_at IS NULL))
) STRICT;
";

/// Version 2: started connect flows live in the store (they survive a restart).
const SCHEMA_V2: &str = "
CREATE TABLE flow_states (
    state_id   TEXT    PRIMARY KEY NOT NULL,
    flow_id    TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX flow_states_expiry ON flow_states (expires_at);
";

/// Version 3: the last data call (for the keeper) and unfinished refreshes (crash recovery).
const SCHEMA_V3: &str = "
ALTER TABLE connections ADD COLUMN last_used_at INTEGER;
CREATE TABLE refresh_intents (
    key        TEXT    PRIMARY KEY NOT NULL,
    version    INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    owner      TEXT    NOT NULL
) STRICT;
";

const SELECT_ROW: &str = "SELECT status, refresh_token, access_token, access_expires_at, scope, \
                          version, created_at, refreshed_at, synced_at, updated_at, \
                          last_used_at FROM connections WHERE key = ?1";

/// Why [`SqliteStore::open`] failed. No message ever contains key or token material.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file cannot be created, opened, configured or migrated.
    #[error("cannot open the token store {}: {reason}", path.display())]
    Unavailable { path: PathBuf, reason: String },
    /// The store was created with another encryption key.
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
    /// The file was written by a newer finx-gateway.
    #[error(
        "the token store {} has schema version {found} but this build supports at most \
         {supported}; upgrade finx-gateway",
        path.display()
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The file is not a finx-gateway store, or its metadata was damaged.
    #[error("the token store {} is damaged or not a finx-gateway token store: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
}

/// The SQLite [`TokenStore`]. Cheap to clone; clones share one connection.
///
/// All database work runs on tokio's blocking pool under a `std::sync::Mutex` that is never
/// held across an await. An operation whose caller stops waiting still runs to completion, so a
/// commit is never half done.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    conn: Mutex<DbConnection>,
    key: KeyRing,
    /// The primary key's id.
    key_id: String,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("key_id", &self.shared.key_id)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the store at `path`, creating it (file mode 0600 on Unix) when missing and
    /// migrating its schema; fails with [`OpenError::WrongKey`] when no key of `key` (an
    /// [`EncryptionKey`](super::crypto::EncryptionKey), or a [`KeyRing`] during a rotation) is
    /// the store's key.
    ///
    /// Blocking: call it at start-up or from `spawn_blocking`.
    pub fn open(path: &Path, key: impl Into<KeyRing>) -> Result<Self, OpenError> {
        let mut key = key.into();
        let unavailable = |reason: String| OpenError::Unavailable {
            path: path.to_path_buf(),
            reason,
        };
        create_private(path).map_err(|e| unavailable(e.to_string()))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = DbConnection::open_with_flags(path, flags)
            .map_err(|e| unavailable(format!("sqlite: {e}")))?;
        configure(&conn).map_err(unavailable)?;
        migrate(&mut conn, path, &key)?;
        check_key(&conn, path, &mut key)?;
        let key_id = key.primary_key_id();
        Ok(Self {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                key,
                key_id,
                path: path.to_path_buf(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The id of the key this store encrypts with (safe to log).
    pub fn key_id(&self) -> &str {
        &self.shared.key_id
    }

    /// Runs `op` on the blocking pool with the connection locked.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection, &Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            // A panic while locked cannot leave a half-applied write: an open transaction rolls
            // back when its guard drops during unwinding. So a poisoned lock is still usable.
            let mut conn = shared.conn.lock().unwrap_or_else(PoisonError::into_inner);
            op(&mut conn, &shared)
        })
        .await
        .map_err(|_| StoreError::Unavailable("token store task failed".to_owned()))?
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

/// Creates the file with owner-only permissions so the database (and the WAL and shm files,
/// which SQLite creates with the database's permissions) is not world-readable.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn configure(conn: &DbConnection) -> Result<(), String> {
    let sqlite = |e: rusqlite::Error| format!("sqlite: {e}");
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, WAL is required"));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    // Verified because durability rests on it and a misspelt pragma is silently ignored.
    let synchronous: i64 = conn
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .map_err(sqlite)?;
    if synchronous != 2 {
        return Err(format!(
            "synchronous is {synchronous}, FULL (2) is required"
        ));
    }
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(sqlite)?;
    conn.pragma_update(None, "trusted_schema", false)
        .map_err(sqlite)?;
    // Freed pages (old ciphertexts of spent tokens) are overwritten instead of lingering.
    conn.pragma_update(None, "secure_delete", true)
        .map_err(sqlite)?;
    Ok(())
}

/// Creates or upgrades the schema, one transaction per run. Future versions add arms that
/// step `user_version` forward one migration at a time.
fn migrate(conn: &mut DbConnection, path: &Path, key: &KeyRing) -> Result<(), OpenError> {
    let unavailable = |e: rusqlite::Error| OpenError::Unavailable {
        path: path.to_path_buf(),
        reason: format!("sqlite: {e}"),
    };
    let damaged = |reason: String| OpenError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    // IMMEDIATE: two processes opening a new file at once must not both create the schema.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(unavailable)?;
    match found {
        0 => {
            let objects: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
                .map_err(unavailable)?;
            if objects != 0 {
                return Err(damaged(
                    "it has tables but no finx-gateway schema version".to_owned(),
                ));
            }
            tx.execute_batch(SCHEMA_V1).map_err(unavailable)?;
            tx.execute_batch(SCHEMA_V2).map_err(unavailable)?;
            tx.execute_batch(SCHEMA_V3).map_err(unavailable)?;
            let check = key.seal_key_check().map_err(|e| damaged(e.to_string()))?;
            tx.execute(
                "INSERT INTO meta (id, key_id, key_check, version_floor, created_at) \
                 VALUES (1, ?1, ?2, 0, ?3)",
                params![key.primary_key_id(), check, SystemClock.now()],
            )
            .map_err(unavailable)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(unavailable)?;
        }
        1 | 2 => {
            if found == 1 {
                tx.execute_batch(SCHEMA_V2).map_err(unavailable)?;
            }
            tx.execute_batch(SCHEMA_V3).map_err(unavailable)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(unavailable)?;
        }
        SCHEMA_VERSION => {}
        found if found > SCHEMA_VERSION => {
            return Err(OpenError::UnsupportedSchema {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            })
        }
        found => return Err(damaged(format!("invalid schema version {found}"))),
    }
    tx.commit().map_err(unavailable)
}

fn check_key(conn: &DbConnection, path: &Path, key: &mut KeyRing) -> Result<(), OpenError> {
    let damaged = |reason: String| OpenError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let (expected_key_id, check): (String, Vec<u8>) = conn
        .query_row(
            "SELECT key_id, key_check FROM meta WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(|e| damaged(format!("sqlite: {e}")))?
        .ok_or_else(|| damaged("the key check record is missing".to_owned()))?;
    match key.accept_key_check(&expected_key_id, &check) {
        KeyCheck::Matches => Ok(()),
        KeyCheck::Damaged => Err(damaged(
            "the key check record does not decrypt although its key id matches the key given"
                .to_owned(),
        )),
        KeyCheck::WrongKey { expected_key_id } => Err(OpenError::WrongKey {
            expected_key_id,
            given_key_id: key.describe(),
        }),
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    // rusqlite errors never carry bound parameter values, and no SQL here is built from data.
    StoreError::Unavailable(format!("sqlite: {e}"))
}

/// A connection row as stored, tokens still sealed.
struct StoredRow {
    status: String,
    refresh_token: Vec<u8>,
    access_token: Option<Vec<u8>>,
    access_expires_at: Option<UnixSeconds>,
    scope: Option<String>,
    version: i64,
    created_at: UnixSeconds,
    refreshed_at: Option<UnixSeconds>,
    synced_at: Option<UnixSeconds>,
    updated_at: UnixSeconds,
    last_used_at: Option<UnixSeconds>,
}

fn read_row(conn: &DbConnection, key: &ConnectionKey) -> Result<Option<StoredRow>, StoreError> {
    conn.query_row(SELECT_ROW, params![key.as_str()], |row| {
        Ok(StoredRow {
            status: row.get(0)?,
            refresh_token: row.get(1)?,
            access_token: row.get(2)?,
            access_expires_at: row.get(3)?,
            scope: row.get(4)?,
            version: row.get(5)?,
            created_at: row.get(6)?,
            refreshed_at: row.get(7)?,
            synced_at: row.get(8)?,
            updated_at: row.get(9)?,
            last_used_at: row.get(10)?,
        })
    })
    .optional()
    .map_err(unavailable)
}

fn parse_status(key: &ConnectionKey, status: &str) -> Result<ConnectionStatus, StoreError> {
    ConnectionStatus::parse(status).ok_or_else(|| {
        tracing::warn!(connection = %key, "stored connection has an unknown status");
        StoreError::Corrupt(key.clone())
    })
}

fn decrypt_row(
    enc: &KeyRing,
    key: &ConnectionKey,
    row: StoredRow,
) -> Result<Connection, StoreError> {
    let status = parse_status(key, &row.status)?;
    let refresh_token = open_stored_token(enc, key, TokenColumn::RefreshToken, &row.refresh_token)?;
    let access = match (row.access_token, row.access_expires_at) {
        (Some(sealed), Some(expires_at)) => Some(AccessToken {
            token: open_stored_token(enc, key, TokenColumn::AccessToken, &sealed)?,
            expires_at,
        }),
        (None, None) => None,
        // The schema's CHECK forbids this; only a rebuilt table could hold it.
        _ => return Err(StoreError::Corrupt(key.clone())),
    };
    Ok(Connection {
        key: key.clone(),
        status,
        refresh_token,
        access,
        scope: row.scope,
        version: row.version,
        created_at: row.created_at,
        refreshed_at: row.refreshed_at,
        synced_at: row.synced_at,
        updated_at: row.updated_at,
        last_used_at: row.last_used_at,
    })
}

/// Forgets an unfinished refresh of `key`: its outcome (a commit, a status, a delete, a new
/// consent) is in the same transaction.
fn clear_intent(tx: &DbConnection, key: &ConnectionKey) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM refresh_intents WHERE key = ?1",
        params![key.as_str()],
    )
    .map_err(unavailable)
    .map(drop)
}

fn immediate(conn: &mut DbConnection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    // IMMEDIATE takes the write lock up front: a read-then-write transaction that had to
    // upgrade could fail with SQLITE_BUSY regardless of busy_timeout.
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)
}

/// Each token's label for [`KeyStatus::tally`]: its key id, `'1'` for format 1, `''` for none.
const KEY_LABELS: &str = "SELECT \
    CASE WHEN length(refresh_token) >= 9 AND substr(refresh_token, 1, 1) = x'02' \
         THEN lower(hex(substr(refresh_token, 2, 8))) ELSE '1' END, \
    CASE WHEN access_token IS NULL THEN '' \
         WHEN length(access_token) >= 9 AND substr(access_token, 1, 1) = x'02' \
         THEN lower(hex(substr(access_token, 2, 8))) ELSE '1' END, \
    count(*) FROM connections GROUP BY 1, 2";

/// The connections due for re-sealing (a token not starting with `?2`, the primary key's
/// prefix) after `?1`, in key order, at most `?3`.
const SELECT_DUE: &str = "SELECT key, version, refresh_token, access_token FROM connections \
    WHERE key > ?1 AND (substr(refresh_token, 1, 9) IS NOT ?2 \
    OR (access_token IS NOT NULL AND substr(access_token, 1, 9) IS NOT ?2)) \
    ORDER BY key LIMIT ?3";

/// Counts the connections by key id, in `conn`'s transaction.
fn key_status_in(conn: &DbConnection, ring: &KeyRing) -> Result<KeyStatus, StoreError> {
    let check_key_id: String = conn
        .query_row("SELECT key_id FROM meta WHERE id = 1", [], |row| row.get(0))
        .map_err(unavailable)?;
    let mut statement = conn.prepare(KEY_LABELS).map_err(unavailable)?;
    let groups = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    Ok(KeyStatus::tally(
        ring.primary_key_id(),
        check_key_id,
        groups,
    ))
}

impl SqliteStore {
    /// A rotation batch's read: the due rows after `after`, without the write lock.
    async fn read_due(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<Vec<DueRow>, StoreError> {
        let after = after.map_or_else(String::new, |cursor| cursor.0.clone());
        self.run(move |conn, shared| {
            let prefix = shared.key.current_prefix();
            let mut statement = conn.prepare(SELECT_DUE).map_err(unavailable)?;
            let rows = statement
                .query_map(params![after, &prefix[..], limit], |row| {
                    Ok(DueRow {
                        stored_key: row.get(0)?,
                        version: row.get(1)?,
                        refresh: row.get(2)?,
                        access: row.get(3)?,
                    })
                })
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable);
            rows
        })
        .await
    }

    /// A rotation batch's write, one short IMMEDIATE transaction: each row only if it still
    /// holds the version and ciphertexts it was read with. Returns (written, raced).
    async fn write_resealed(&self, rows: Vec<Resealed>) -> Result<(u64, u64), StoreError> {
        if rows.is_empty() {
            return Ok((0, 0));
        }
        self.run(move |conn, shared| {
            let tx = immediate(conn)?;
            let (mut written, mut raced) = (0, 0);
            for row in rows {
                let changed = tx
                    .execute(
                        "UPDATE connections SET refresh_token = ?1, access_token = ?2, \
                         key_id = ?3 WHERE key = ?4 AND version = ?5 AND refresh_token = ?6 \
                         AND access_token IS ?7",
                        params![
                            row.refresh,
                            row.access,
                            shared.key_id,
                            row.key.as_str(),
                            row.version,
                            row.old_refresh,
                            row.old_access,
                        ],
                    )
                    .map_err(unavailable)?;
                if changed == 1 {
                    written += 1;
                } else {
                    raced += 1;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok((written, raced))
        })
        .await
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        let key = key.clone();
        self.run(move |conn, shared| {
            read_row(conn, &key)?
                .map(|row| decrypt_row(&shared.key, &key, row))
                .transpose()
        })
        .await
    }

    /// Creates or replaces the connection. On replace, `created_at` restarts at `now`: it is
    /// the time of the current consent (banks expire consents relative to it), and
    /// `refreshed_at` is cleared because no refresh of this consent has happened yet.
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
        let (sealed_refresh, access_token) = (sealed.refresh, sealed.access);
        let access_expires_at = new.access.as_ref().map(|access| access.expires_at);
        let scope = new.scope.clone();
        let stored_key = key.clone();
        let version = self
            .run(move |conn, shared| {
                let tx = immediate(conn)?;
                let previous: Option<i64> = tx
                    .query_row(
                        "SELECT version FROM connections WHERE key = ?1",
                        params![stored_key.as_str()],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(unavailable)?;
                let base = match previous {
                    Some(version) => version,
                    None => tx
                        .query_row("SELECT version_floor FROM meta WHERE id = 1", [], |row| {
                            row.get(0)
                        })
                        .map_err(unavailable)?,
                };
                let version = base + 1;
                tx.execute(
                    "INSERT INTO connections (key, status, refresh_token, access_token, \
                     access_expires_at, scope, version, created_at, refreshed_at, updated_at, \
                     key_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?8, ?9) \
                     ON CONFLICT (key) DO UPDATE SET status = excluded.status, \
                     refresh_token = excluded.refresh_token, \
                     access_token = excluded.access_token, \
                     access_expires_at = excluded.access_expires_at, scope = excluded.scope, \
                     version = excluded.version, created_at = excluded.created_at, \
                     refreshed_at = NULL, synced_at = NULL, updated_at = excluded.updated_at, \
                     key_id = excluded.key_id",
                    params![
                        stored_key.as_str(),
                        ConnectionStatus::Active.as_str(),
                        sealed_refresh,
                        access_token,
                        access_expires_at,
                        scope,
                        version,
                        now,
                        shared.key_id,
                    ],
                )
                .map_err(unavailable)?;
                clear_intent(&tx, &stored_key)?;
                tx.commit().map_err(unavailable)?;
                Ok(version)
            })
            .await?;
        Ok(Connection::consented(key, new, version, now))
    }

    /// A grant without `scope` keeps the stored scope (OAuth: omitted means unchanged). The
    /// status is left as it is: a refresh never revives a connection.
    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let sealed_access = self.seal(key, TokenColumn::AccessToken, &grant.access.token)?;
        let sealed_refresh = grant
            .refresh_token
            .as_ref()
            .map(|token| self.seal(key, TokenColumn::RefreshToken, token))
            .transpose()?;
        let expires_at = grant.access.expires_at;
        let new_refresh = grant.refresh_token.clone();
        let new_scope = grant.scope.clone();
        let access = grant.access.clone();
        let key = key.clone();
        self.run(move |conn, shared| {
            let tx = immediate(conn)?;
            let row = read_row(&tx, &key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            if row.version != expected_version {
                return Err(StoreError::Conflict(key.clone()));
            }
            let status = parse_status(&key, &row.status)?;
            // Without a rotated token the old one stays in force; it is only decrypted to be
            // returned, and a row whose old token is unreadable is refused before any write.
            let refresh_token = match new_refresh {
                Some(token) => token,
                None => open_stored_token(
                    &shared.key,
                    &key,
                    TokenColumn::RefreshToken,
                    &row.refresh_token,
                )?,
            };
            let scope = new_scope.or(row.scope);
            let changed = tx
                .execute(
                    "UPDATE connections SET access_token = ?1, access_expires_at = ?2, \
                     refresh_token = COALESCE(?3, refresh_token), scope = ?4, \
                     version = version + 1, refreshed_at = ?5, updated_at = ?5, key_id = ?6 \
                     WHERE key = ?7 AND version = ?8",
                    params![
                        sealed_access,
                        expires_at,
                        sealed_refresh,
                        scope,
                        now,
                        shared.key_id,
                        key.as_str(),
                        expected_version,
                    ],
                )
                .map_err(unavailable)?;
            // Cannot happen inside this IMMEDIATE transaction; kept as the CAS of record.
            if changed != 1 {
                return Err(StoreError::Conflict(key.clone()));
            }
            clear_intent(&tx, &key)?;
            crate::fail_point!("refresh-during-commit");
            tx.commit().map_err(unavailable)?;
            Ok(Connection {
                key,
                status,
                refresh_token,
                access: Some(access),
                scope,
                version: expected_version + 1,
                created_at: row.created_at,
                refreshed_at: Some(now),
                synced_at: row.synced_at,
                updated_at: now,
                last_used_at: row.last_used_at,
            })
        })
        .await
    }

    /// Leaves the version alone: a sync changes no token, so an in-flight refresh stays valid.
    async fn record_sync(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(move |conn, _| {
            let changed = conn
                .execute(
                    "UPDATE connections SET synced_at = ?1, updated_at = ?1 WHERE key = ?2",
                    params![now, key.as_str()],
                )
                .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound(key));
            }
            Ok(())
        })
        .await
    }

    /// Moves the version on too, so a refresh in flight cannot overwrite the new status.
    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(move |conn, _| {
            let tx = immediate(conn)?;
            let changed = tx
                .execute(
                    "UPDATE connections SET status = ?1, version = version + 1, updated_at = ?2 \
                     WHERE key = ?3",
                    params![status.as_str(), now, key.as_str()],
                )
                .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound(key));
            }
            clear_intent(&tx, &key)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.run(move |conn, _| {
            let tx = immediate(conn)?;
            let version: Option<i64> = tx
                .query_row(
                    "DELETE FROM connections WHERE key = ?1 RETURNING version",
                    params![key.as_str()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            let Some(version) = version else {
                return Ok(false);
            };
            tx.execute(
                "UPDATE meta SET version_floor = max(version_floor, ?1) WHERE id = 1",
                params![version],
            )
            .map_err(unavailable)?;
            clear_intent(&tx, &key)?;
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    /// Rows whose key or status is unreadable are left out (and logged), so one damaged row
    /// cannot hide every other connection from operators.
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|conn, _| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        self.run(|conn, _| {
            let mut statement = conn
                .prepare(
                    "SELECT key, status, version, created_at, refreshed_at, synced_at, \
                     updated_at, last_used_at, scope FROM connections ORDER BY key",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, UnixSeconds>(3)?,
                        row.get::<_, Option<UnixSeconds>>(4)?,
                        row.get::<_, Option<UnixSeconds>>(5)?,
                        row.get::<_, UnixSeconds>(6)?,
                        row.get::<_, Option<UnixSeconds>>(7)?,
                        row.get::<_, Option<String>>(8)?,
                    ))
                })
                .map_err(unavailable)?;
            let mut summaries = Vec::new();
            for row in rows {
                let (
                    stored,
                    status,
                    version,
                    created_at,
                    refreshed_at,
                    synced_at,
                    updated_at,
                    last_used_at,
                    scope,
                ) = row.map_err(unavailable)?;
                let Ok(key) = ConnectionKey::from_stored(&stored) else {
                    tracing::warn!("token store holds a row with an invalid connection key");
                    continue;
                };
                let Ok(status) = parse_status(&key, &status) else {
                    continue;
                };
                summaries.push(ConnectionSummary {
                    key,
                    status,
                    version,
                    created_at,
                    refreshed_at,
                    synced_at,
                    updated_at,
                    last_used_at,
                    scope,
                });
            }
            Ok(summaries)
        })
        .await
    }

    /// One process serves an embedded store (the serving lock), and the token manager holds the
    /// connection's in-process lock around every refresh, so the lease only needs the row.
    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError> {
        let current = self.load(key).await?;
        let intent_key = key.clone();
        let intent = self
            .run(move |conn, _| {
                conn.query_row(
                    "SELECT version, started_at, owner FROM refresh_intents WHERE key = ?1",
                    params![intent_key.as_str()],
                    |row| {
                        Ok(RefreshIntent {
                            version: row.get(0)?,
                            started_at: row.get(1)?,
                            owner: row.get(2)?,
                        })
                    },
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        Ok(Box::new(SqliteLease {
            store: self.clone(),
            key: key.clone(),
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
        self.run(move |conn, _| {
            let tx = immediate(conn)?;
            // Flows whose users never came back are forgotten once their state has expired.
            tx.execute(
                "DELETE FROM flow_states WHERE expires_at <= ?1",
                params![now],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO flow_states (state_id, flow_id, expires_at) VALUES (?1, ?2, ?3)",
                params![state_id, flow_id, expires_at],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn take_flow_state(
        &self,
        state_id: &str,
        now: UnixSeconds,
    ) -> Result<Option<String>, StoreError> {
        let state_id = state_id.to_owned();
        self.run(move |conn, _| {
            let taken: Option<(String, UnixSeconds)> = conn
                .query_row(
                    "DELETE FROM flow_states WHERE state_id = ?1 RETURNING flow_id, expires_at",
                    params![state_id],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            Ok(taken.and_then(|(flow_id, expires_at)| (expires_at > now).then_some(flow_id)))
        })
        .await
    }

    async fn register_owner(&self, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn owner_alive(&self, _owner: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn touch(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(move |conn, _| {
            conn.execute(
                "UPDATE connections SET last_used_at = max(coalesce(last_used_at, 0), ?1) \
                 WHERE key = ?2",
                params![now, key.as_str()],
            )
            .map_err(unavailable)
            .map(drop)
        })
        .await
    }

    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError> {
        self.run(|conn, _| {
            let mut statement = conn
                .prepare("SELECT key, version, started_at, owner FROM refresh_intents ORDER BY key")
                .map_err(unavailable)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        RefreshIntent {
                            version: row.get(1)?,
                            started_at: row.get(2)?,
                            owner: row.get(3)?,
                        },
                    ))
                })
                .map_err(unavailable)?;
            let mut intents = Vec::new();
            for row in rows {
                let (stored, intent) = row.map_err(unavailable)?;
                if let Ok(key) = ConnectionKey::from_stored(&stored) {
                    intents.push((key, intent));
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
        self.run(move |conn, _| {
            let mut statement = conn
                .prepare(
                    "SELECT key FROM connections WHERE status = 'active' AND \
                     length(refresh_token) > 0 AND \
                     (coalesce(refreshed_at, created_at) < ?1 OR \
                      max(coalesce(last_used_at, 0), coalesce(refreshed_at, 0), created_at) < ?2) \
                     ORDER BY coalesce(refreshed_at, created_at) LIMIT ?3",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![refreshed_before, active_before, limit], |row| {
                    row.get::<_, String>(0)
                })
                .map_err(unavailable)?;
            let mut keys = Vec::new();
            for row in rows {
                if let Ok(key) = ConnectionKey::from_stored(&row.map_err(unavailable)?) {
                    keys.push(key);
                }
            }
            Ok(keys)
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
        self.run(move |conn, shared| {
            let tx = immediate(conn)?;
            let existing: Option<(i64, UnixSeconds)> = tx
                .query_row(
                    "SELECT version, updated_at FROM connections WHERE key = ?1",
                    params![key.as_str()],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            if existing.is_some_and(|(_, updated_at)| updated_at > c.updated_at) {
                return Ok(CopyOutcome::TargetNewer);
            }
            let floor: i64 = tx
                .query_row("SELECT version_floor FROM meta WHERE id = 1", [], |row| {
                    row.get(0)
                })
                .map_err(unavailable)?;
            let version = c
                .version
                .max(existing.map_or(floor, |(version, _)| version) + 1);
            tx.execute(
                "INSERT INTO connections (key, status, refresh_token, access_token, \
                 access_expires_at, scope, version, created_at, refreshed_at, synced_at, \
                 updated_at, key_id, last_used_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
                 ON CONFLICT (key) DO UPDATE SET status = excluded.status, \
                 refresh_token = excluded.refresh_token, access_token = excluded.access_token, \
                 access_expires_at = excluded.access_expires_at, scope = excluded.scope, \
                 version = excluded.version, created_at = excluded.created_at, \
                 refreshed_at = excluded.refreshed_at, synced_at = excluded.synced_at, \
                 updated_at = excluded.updated_at, key_id = excluded.key_id, \
                 last_used_at = excluded.last_used_at",
                params![
                    key.as_str(),
                    c.status.as_str(),
                    sealed_refresh,
                    sealed_access,
                    c.access.as_ref().map(|a| a.expires_at),
                    c.scope,
                    version,
                    c.created_at,
                    c.refreshed_at,
                    c.synced_at,
                    c.updated_at,
                    shared.key_id,
                    c.last_used_at,
                ],
            )
            .map_err(unavailable)?;
            clear_intent(&tx, &key)?;
            tx.commit().map_err(unavailable)?;
            Ok(CopyOutcome::Written)
        })
        .await
    }

    async fn key_status(&self) -> Result<KeyStatus, StoreError> {
        self.run(|conn, shared| {
            // One read transaction: the record and the counts from the same snapshot.
            let tx = conn.transaction().map_err(unavailable)?;
            key_status_in(&tx, &shared.key)
        })
        .await
    }

    /// Reads without the write lock, re-seals outside the database, then writes each row by
    /// compare-and-swap on its version and ciphertexts: the serving process's writes wait at
    /// most for the short write transaction (and the busy timeout covers a second process).
    async fn reencrypt_batch(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError> {
        let rows = self.read_due(after, limit).await?;
        let mut batch = ReencryptBatch::default();
        let resealed = rotation::reseal_rows(&self.shared.key, rows, limit, &mut batch)?;
        (batch.resealed, batch.raced) = self.write_resealed(resealed).await?;
        Ok(batch)
    }

    async fn complete_rotation(&self) -> Result<KeyStatus, StoreError> {
        self.run(|conn, shared| {
            let tx = immediate(conn)?;
            let mut status = key_status_in(&tx, &shared.key)?;
            if status.pending == 0 && status.check_key_id != status.primary_key_id {
                let check = shared
                    .key
                    .seal_key_check()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                tx.execute(
                    "UPDATE meta SET key_id = ?1, key_check = ?2 WHERE id = 1",
                    params![shared.key_id, check],
                )
                .map_err(unavailable)?;
                tx.commit().map_err(unavailable)?;
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

/// The embedded store's refresh lease: the row read under the manager's in-process lock; its
/// commit is the ordinary compare-and-swap.
struct SqliteLease {
    store: SqliteStore,
    key: ConnectionKey,
    current: Option<Connection>,
    intent: Option<RefreshIntent>,
}

#[async_trait]
impl RefreshLease for SqliteLease {
    fn current(&self) -> Option<&Connection> {
        self.current.as_ref()
    }

    fn intent(&self) -> Option<&RefreshIntent> {
        self.intent.as_ref()
    }

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
            .run(move |conn, _| {
                conn.execute(
                    "INSERT INTO refresh_intents (key, version, started_at, owner) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (key) DO UPDATE SET \
                     version = excluded.version, started_at = excluded.started_at, \
                     owner = excluded.owner WHERE refresh_intents.owner = excluded.owner \
                     OR refresh_intents.version < excluded.version \
                     OR refresh_intents.owner = ?5",
                    params![key.as_str(), version, now, owner_id, takeover],
                )
                .map_err(unavailable)
            })
            .await?;
        if written == 0 {
            return Err(StoreError::Busy(self.key.clone()));
        }
        self.intent = Some(RefreshIntent {
            version,
            started_at: now,
            owner: owner.to_owned(),
        });
        Ok(())
    }

    async fn abandon(self: Box<Self>) -> Result<(), StoreError> {
        let Some(intent) = self.intent else {
            return Ok(());
        };
        let key = self.key.clone();
        self.store
            .run(move |conn, _| {
                conn.execute(
                    "DELETE FROM refresh_intents WHERE key = ?1 AND version = ?2 AND owner = ?3",
                    params![key.as_str(), intent.version, intent.owner],
                )
                .map_err(unavailable)
                .map(drop)
            })
            .await
    }

    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let version = lease_version(self.current.as_ref(), &self.key)?;
        self.store
            .commit_refresh(&self.key, version, grant, now)
            .await
    }

    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        self.store.set_status(&self.key, status, now).await
    }

    async fn delete(self: Box<Self>) -> Result<bool, StoreError> {
        self.store.delete(&self.key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::crypto::EncryptionKey;

    #[test]
    fn open_configures_wal_full_sync_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), EncryptionKey::generate()).unwrap();
        let conn = store.shared.conn.lock().unwrap();
        let pragma = |name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |row| {
                row.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "2");
        assert_eq!(pragma("busy_timeout"), "5000");
        assert_eq!(pragma("user_version"), SCHEMA_VERSION.to_string());
        assert_eq!(pragma("secure_delete"), "1");
    }

    #[cfg(unix)]
    #[test]
    fn new_store_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let _store = SqliteStore::open(&path, EncryptionKey::generate()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_a_newer_schema_and_foreign_databases() {
        let dir = tempfile::tempdir().unwrap();
        let newer = dir.path().join("newer.db");
        drop(SqliteStore::open(&newer, EncryptionKey::generate()).unwrap());
        DbConnection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = SqliteStore::open(&newer, EncryptionKey::generate()).unwrap_err();
        assert!(
            matches!(err, OpenError::UnsupportedSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );

        let foreign = dir.path().join("foreign.db");
        DbConnection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = SqliteStore::open(&foreign, EncryptionKey::generate()).unwrap_err();
        assert!(matches!(err, OpenError::Damaged { .. }), "{err}");
    }

    #[test]
    fn tampered_key_check_with_matching_key_id_is_damage_not_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let key = EncryptionKey::generate();
        let again = EncryptionKey::from_base64(
            secrecy::ExposeSecret::expose_secret(&key.to_base64()),
            crate::secret::SecretRef::Env("TEST".into()),
        )
        .unwrap();
        drop(SqliteStore::open(&path, key).unwrap());
        DbConnection::open(&path)
            .unwrap()
            .execute("UPDATE meta SET key_check = x'00'", [])
            .unwrap();
        let err = SqliteStore::open(&path, again).unwrap_err();
        assert!(matches!(err, OpenError::Damaged { .. }), "{err}");
    }

    fn copy(key: &EncryptionKey) -> EncryptionKey {
        EncryptionKey::from_base64(
            secrecy::ExposeSecret::expose_secret(&key.to_base64()),
            crate::secret::SecretRef::Env("TEST".into()),
        )
        .unwrap()
    }

    fn ring(primary: &EncryptionKey, previous: &EncryptionKey) -> KeyRing {
        KeyRing::new(copy(primary), [copy(previous)])
    }

    fn consent(refresh: &str, access: Option<&str>) -> super::super::NewConnection {
        super::super::NewConnection {
            refresh_token: SecretString::from(refresh),
            access: access.map(|token| AccessToken {
                token: SecretString::from(token),
                expires_at: 99,
            }),
            scope: None,
        }
    }

    fn secret_of(token: &SecretString) -> &str {
        secrecy::ExposeSecret::expose_secret(token)
    }

    /// A store as a build before key rotation left it (every value and the key check in format
    /// 1) opens with a ring holding its key, and a rotation moves it to format 2.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_format_1_store_opens_with_a_ring_and_rotates_into_format_2() {
        use crate::store::crypto::token_associated_data;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let (alice, bob) = (
            ConnectionKey::user("alice").unwrap(),
            ConnectionKey::user("bob").unwrap(),
        );
        {
            let store = SqliteStore::open(&path, copy(&old)).unwrap();
            store
                .put_connection(&alice, &consent("r-a", Some("a-a")), 1)
                .await
                .unwrap();
            store
                .put_connection(&bob, &consent("r-b", None), 1)
                .await
                .unwrap();
        }
        let raw = DbConnection::open(&path).unwrap();
        let v1 = |key: &ConnectionKey, column: TokenColumn, token: &str| {
            old.encrypt_format1(token.as_bytes(), &token_associated_data(key, column))
        };
        raw.execute(
            "UPDATE connections SET refresh_token = ?1, access_token = ?2 WHERE key = 'alice'",
            params![
                v1(&alice, TokenColumn::RefreshToken, "r-a"),
                v1(&alice, TokenColumn::AccessToken, "a-a")
            ],
        )
        .unwrap();
        raw.execute(
            "UPDATE connections SET refresh_token = ?1 WHERE key = 'bob'",
            params![v1(&bob, TokenColumn::RefreshToken, "r-b")],
        )
        .unwrap();
        raw.execute(
            "UPDATE meta SET key_check = ?1 WHERE id = 1",
            params![old.seal_key_check_format1()],
        )
        .unwrap();
        drop(raw);

        let rotating = SqliteStore::open(&path, ring(&new, &old)).unwrap();
        let loaded = rotating.load(&alice).await.unwrap().unwrap();
        assert_eq!(secret_of(&loaded.refresh_token), "r-a");
        assert_eq!(secret_of(&loaded.access.unwrap().token), "a-a");
        let status = rotating.key_status().await.unwrap();
        assert_eq!((status.format1, status.pending, status.current), (2, 2, 0));
        assert_eq!(status.by_key_id.get(&old.key_id()), Some(&2));

        let done = rotation::rotate(&rotating, &rotation::RotationOptions::default(), |_| {})
            .await
            .unwrap();
        assert!(done.is_complete());
        assert_eq!(done.format1, 0);
        drop(rotating);
        let new_only = SqliteStore::open(&path, copy(&new)).unwrap();
        let loaded = new_only.load(&bob).await.unwrap().unwrap();
        assert_eq!(secret_of(&loaded.refresh_token), "r-b");
        assert!(matches!(
            SqliteStore::open(&path, copy(&old)),
            Err(OpenError::WrongKey { .. })
        ));
    }

    /// The compare-and-swap of a batch's write, made to lose on purpose: a refresh commits
    /// (from another process, still under the old key) between the batch's read and its write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_between_a_batchs_read_and_its_write_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let alice = ConnectionKey::user("alice").unwrap();
        let serving = SqliteStore::open(&path, copy(&old)).unwrap();
        let put = serving
            .put_connection(&alice, &consent("r-0", None), 1)
            .await
            .unwrap();
        let rotating = SqliteStore::open(&path, ring(&new, &old)).unwrap();

        let rows = rotating.read_due(None, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        let mut batch = ReencryptBatch::default();
        let resealed = rotation::reseal_rows(&rotating.shared.key, rows, 10, &mut batch).unwrap();
        let grant = TokenGrant {
            access: AccessToken {
                token: SecretString::from("a-1"),
                expires_at: 99,
            },
            refresh_token: Some(SecretString::from("r-1")),
            scope: None,
        };
        serving
            .commit_refresh(&alice, put.version, &grant, 2)
            .await
            .unwrap();
        assert_eq!(rotating.write_resealed(resealed).await.unwrap(), (0, 1));

        let loaded = rotating.load(&alice).await.unwrap().unwrap();
        assert_eq!(secret_of(&loaded.refresh_token), "r-1");
        assert_eq!(secret_of(&loaded.access.unwrap().token), "a-1");
        // The next pass picks the row up again.
        let again = rotating.reencrypt_batch(None, 10).await.unwrap();
        assert_eq!((again.examined, again.resealed, again.raced), (1, 1, 0));
        assert!(rotating.complete_rotation().await.unwrap().is_complete());
        drop((serving, rotating));
        let loaded = SqliteStore::open(&path, copy(&new))
            .unwrap()
            .load(&alice)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(secret_of(&loaded.refresh_token), "r-1");
    }
}
