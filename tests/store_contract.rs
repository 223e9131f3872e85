//! The `TokenStore` contract: one suite, run against every implementation (embedded SQLite and
//! shared PostgreSQL, the latter on a database of its own per test). What only one kind can show
//! (SQLite's files on disk, PostgreSQL's row locks across handles) is tested beside it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use finx_gateway::store::crypto::{EncryptionKey, KeyRing};
use finx_gateway::store::faulty::FaultyStore;
use finx_gateway::store::postgres::{OpenWait, PgSettings, PgTls, PostgresStore};
use finx_gateway::store::rotation::{self, RotationError, RotationOptions};
use finx_gateway::store::sqlite::SqliteStore;
use finx_gateway::store::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, CopyOutcome, NewConnection,
    StoreError, TokenGrant, TokenStore,
};
use secrecy::{ExposeSecret, SecretString};
use support::fixtures::{grant, new_connection, same_key, secret, user, NOW};
use support::pg::TestDatabase;

/// The PostgreSQL schema migrations this build carries.
const MIGRATIONS: &str = "2";

/// Where a fixture's data lives.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

/// One store under test, reopenable as a restarted (or another) gateway would open it.
struct Fixture {
    place: Place,
    key: EncryptionKey,
    store: Arc<dyn TokenStore>,
}

fn pg_settings(url: &str, lock_timeout: Duration) -> PgSettings {
    PgSettings {
        url: SecretString::from(url.to_owned()),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        lock_timeout,
        lock_hold_limit: Duration::from_secs(30),
        tls: PgTls::Disable,
        ca_file: None,
    }
}

impl Fixture {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let mut fx = Self {
            place: Place::Sqlite(dir),
            key,
            store: Arc::new(NoStore),
        };
        fx.store = fx.open_with(same_key(&fx.key)).unwrap();
        fx
    }

    fn postgres() -> Self {
        let key = EncryptionKey::generate();
        let mut fx = Self {
            place: Place::Postgres(TestDatabase::create()),
            key,
            store: Arc::new(NoStore),
        };
        fx.store = fx.open_with(same_key(&fx.key)).unwrap();
        fx
    }

    /// Another handle on the same data with `key` (a key, or a key ring).
    fn open_with(&self, key: impl Into<KeyRing>) -> Result<Arc<dyn TokenStore>, String> {
        match &self.place {
            Place::Sqlite(dir) => SqliteStore::open(&dir.path().join("tokens.db"), key)
                .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
                .map_err(|e| e.to_string()),
            Place::Postgres(db) => PostgresStore::open(
                &pg_settings(&db.url, Duration::from_secs(10)),
                key,
                OpenWait::Once,
            )
            .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
            .map_err(|e| e.to_string()),
        }
    }

    /// Closes the store and opens it again, as a restarted gateway would.
    fn reopen(&mut self) {
        self.store = Arc::new(NoStore);
        self.store = self.open_with(same_key(&self.key)).unwrap();
    }

    async fn put(
        &self,
        key: &ConnectionKey,
        refresh: &str,
        access: Option<(&str, i64)>,
    ) -> Connection {
        self.store
            .put_connection(key, &new_connection(refresh, access), NOW)
            .await
            .unwrap()
    }

    async fn load(&self, key: &ConnectionKey) -> Connection {
        self.store.load(key).await.unwrap().unwrap()
    }
}

/// Stands in while a fixture's store is being (re)opened; never called.
struct NoStore;

#[async_trait::async_trait]
impl TokenStore for NoStore {
    async fn load(&self, _: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        unreachable!()
    }
    async fn put_connection(
        &self,
        _: &ConnectionKey,
        _: &NewConnection,
        _: i64,
    ) -> Result<Connection, StoreError> {
        unreachable!()
    }
    async fn commit_refresh(
        &self,
        _: &ConnectionKey,
        _: i64,
        _: &TokenGrant,
        _: i64,
    ) -> Result<Connection, StoreError> {
        unreachable!()
    }
    async fn set_status(
        &self,
        _: &ConnectionKey,
        _: ConnectionStatus,
        _: i64,
    ) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn record_sync(&self, _: &ConnectionKey, _: i64) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn delete(&self, _: &ConnectionKey) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn list(&self) -> Result<Vec<finx_gateway::store::ConnectionSummary>, StoreError> {
        unreachable!()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn key_status(&self) -> Result<finx_gateway::store::KeyStatus, StoreError> {
        unreachable!()
    }
    async fn reencrypt_batch(
        &self,
        _: Option<&finx_gateway::store::RotationCursor>,
        _: u32,
    ) -> Result<finx_gateway::store::ReencryptBatch, StoreError> {
        unreachable!()
    }
    async fn complete_rotation(&self) -> Result<finx_gateway::store::KeyStatus, StoreError> {
        unreachable!()
    }
    async fn lock_for_refresh(
        &self,
        _: &ConnectionKey,
    ) -> Result<Box<dyn finx_gateway::store::RefreshLease>, StoreError> {
        unreachable!()
    }
    async fn put_flow_state(&self, _: &str, _: &str, _: i64, _: i64) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn take_flow_state(&self, _: &str, _: i64) -> Result<Option<String>, StoreError> {
        unreachable!()
    }
    async fn copy_in(&self, _: &Connection) -> Result<CopyOutcome, StoreError> {
        unreachable!()
    }
    async fn touch(&self, _: &ConnectionKey, _: i64) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn register_owner(&self, _: &str) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn owner_alive(&self, _: &str) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn pending_intents(
        &self,
    ) -> Result<Vec<(ConnectionKey, finx_gateway::store::RefreshIntent)>, StoreError> {
        unreachable!()
    }
    async fn due_for_keeping(
        &self,
        _: i64,
        _: i64,
        _: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError> {
        unreachable!()
    }
}

/// Generates `sqlite::<case>` and `postgres::<case>` for every contract case.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Fixture::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Fixture::postgres()).await
                }
            )*
        }
    };
}

contract!(
    put_then_load_round_trips,
    put_connection_replaces_and_moves_the_version_on,
    commit_refresh_rotates_and_persists,
    commit_refresh_without_a_refresh_token_keeps_the_old_one,
    commit_refresh_with_a_stale_version_conflicts_and_writes_nothing,
    set_status_persists_and_invalidates_refreshes_in_flight,
    delete_removes_and_a_recreated_connection_never_reuses_a_version,
    large_tokens_round_trip,
    concurrent_commits_with_the_same_version_let_exactly_one_win,
    a_refresh_lease_reads_under_the_lock_and_commits_once,
    a_dropped_lease_changes_nothing,
    flow_states_are_single_use_and_expire,
    copy_in_writes_and_refuses_to_overwrite_a_newer_row,
    the_wrong_key_refuses_to_open,
    record_sync_touches_no_token,
    rotation_re_encrypts_every_row_and_then_only_the_new_key_opens_the_store,
    a_refresh_in_flight_commits_over_a_rotation,
    commits_racing_a_rotation_are_never_lost,
    rotation_stops_at_tokens_no_configured_key_opens,
    rotation_through_injected_store_faults_loses_nothing,
);

async fn put_then_load_round_trips(fx: Fixture) {
    let alice = user("alice");
    let put = fx
        .put(&alice, "r-alice", Some(("a-alice", NOW + 600)))
        .await;
    assert_eq!(put.status, ConnectionStatus::Active);

    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.key, alice);
    assert_eq!(loaded.status, ConnectionStatus::Active);
    assert_eq!(loaded.refresh_token.expose_secret(), "r-alice");
    let access = loaded.access.unwrap();
    assert_eq!(access.token.expose_secret(), "a-alice");
    assert_eq!(access.expires_at, NOW + 600);
    assert_eq!(loaded.scope.as_deref(), Some("accounts transactions"));
    assert_eq!(loaded.version, put.version);
    assert_eq!(loaded.created_at, NOW);
    assert_eq!(loaded.updated_at, NOW);
    assert_eq!(loaded.refreshed_at, None);

    let flow = ConnectionKey::flow("svc", "f-1").unwrap();
    fx.put(&flow, "r-flow", None).await;
    assert!(fx.load(&flow).await.access.is_none());
    assert!(fx.store.load(&user("nobody")).await.unwrap().is_none());

    let listed = fx.store.list().await.unwrap();
    let keys: Vec<_> = listed.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys, vec![alice, flow]);
}

async fn put_connection_replaces_and_moves_the_version_on(fx: Fixture) {
    let alice = user("alice");
    let first = fx.put(&alice, "r-1", None).await;
    fx.store
        .set_status(&alice, ConnectionStatus::ReauthRequired, NOW + 1)
        .await
        .unwrap();
    let replaced = fx
        .store
        .put_connection(&alice, &new_connection("r-2", None), NOW + 2)
        .await
        .unwrap();
    assert!(replaced.version > first.version + 1);
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.status, ConnectionStatus::Active);
    assert_eq!(loaded.refresh_token.expose_secret(), "r-2");
    assert_eq!(loaded.version, replaced.version);
    // created_at is the time of the current consent.
    assert_eq!(loaded.created_at, NOW + 2);
}

async fn commit_refresh_rotates_and_persists(mut fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-old", Some(("a-old", NOW))).await;
    let committed = fx
        .store
        .commit_refresh(
            &alice,
            put.version,
            &grant("a-new", NOW + 900, Some("r-new")),
            NOW + 10,
        )
        .await
        .unwrap();
    assert!(committed.version > put.version);
    assert_eq!(committed.refresh_token.expose_secret(), "r-new");
    assert_eq!(committed.refreshed_at, Some(NOW + 10));

    fx.reopen();
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-new");
    let access = loaded.access.unwrap();
    assert_eq!(access.token.expose_secret(), "a-new");
    assert_eq!(access.expires_at, NOW + 900);
    assert_eq!(loaded.version, committed.version);
    assert_eq!(loaded.created_at, NOW);
    assert_eq!(loaded.refreshed_at, Some(NOW + 10));
    assert_eq!(loaded.updated_at, NOW + 10);
    // A grant without scope keeps the stored one.
    assert_eq!(loaded.scope.as_deref(), Some("accounts transactions"));
}

async fn commit_refresh_without_a_refresh_token_keeps_the_old_one(mut fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-keep", None).await;
    let committed = fx
        .store
        .commit_refresh(
            &alice,
            put.version,
            &grant("a-new", NOW + 900, None),
            NOW + 10,
        )
        .await
        .unwrap();
    assert_eq!(committed.refresh_token.expose_secret(), "r-keep");
    assert_eq!(committed.access.unwrap().token.expose_secret(), "a-new");

    fx.reopen();
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-keep");
    assert_eq!(loaded.access.unwrap().token.expose_secret(), "a-new");
    assert_eq!(loaded.version, committed.version);
}

async fn commit_refresh_with_a_stale_version_conflicts_and_writes_nothing(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-1", None).await;
    let first = fx
        .store
        .commit_refresh(
            &alice,
            put.version,
            &grant("a-2", NOW + 900, Some("r-2")),
            NOW,
        )
        .await
        .unwrap();
    let err = fx
        .store
        .commit_refresh(
            &alice,
            put.version,
            &grant("a-x", NOW + 900, Some("r-x")),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(k) if *k == alice),
        "{err}"
    );
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-2");
    assert_eq!(loaded.version, first.version);

    let bob = user("bob");
    let err = fx
        .store
        .commit_refresh(&bob, 1, &grant("a", NOW, Some("r")), NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(k) if *k == bob),
        "{err}"
    );
}

async fn set_status_persists_and_invalidates_refreshes_in_flight(mut fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-1", None).await;
    fx.store
        .set_status(&alice, ConnectionStatus::ReauthRequired, NOW + 5)
        .await
        .unwrap();
    let err = fx
        .store
        .commit_refresh(&alice, put.version, &grant("a", NOW, Some("r-2")), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");

    fx.reopen();
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.status, ConnectionStatus::ReauthRequired);
    assert_eq!(loaded.refresh_token.expose_secret(), "r-1");
    assert!(loaded.version > put.version);
    let listed = fx.store.list().await.unwrap();
    assert_eq!(listed[0].status, ConnectionStatus::ReauthRequired);

    let err = fx
        .store
        .set_status(&user("bob"), ConnectionStatus::Revoked, NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

async fn delete_removes_and_a_recreated_connection_never_reuses_a_version(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-1", None).await;
    let refreshed = fx
        .store
        .commit_refresh(&alice, put.version, &grant("a", NOW, Some("r-2")), NOW)
        .await
        .unwrap();
    assert!(fx.store.delete(&alice).await.unwrap());
    assert!(!fx.store.delete(&alice).await.unwrap());
    assert!(fx.store.load(&alice).await.unwrap().is_none());

    let recreated = fx.put(&alice, "r-new-consent", None).await;
    assert!(recreated.version > refreshed.version);
    // A refresh that loaded a version before the delete must not land on the new consent.
    for stale in [put.version, refreshed.version] {
        let err = fx
            .store
            .commit_refresh(&alice, stale, &grant("a", NOW, Some("r-stale")), NOW)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    }
}

async fn large_tokens_round_trip(mut fx: Fixture) {
    let alice = user("alice");
    let refresh = "R".repeat(2048);
    let access = "A".repeat(64 * 1024);
    let put = fx.put(&alice, &refresh, Some((&access, NOW))).await;
    let rotated = "N".repeat(8192);
    fx.store
        .commit_refresh(
            &alice,
            put.version,
            &grant(&access, NOW, Some(&rotated)),
            NOW,
        )
        .await
        .unwrap();
    fx.reopen();
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), rotated);
    assert_eq!(loaded.access.unwrap().token.expose_secret(), access);
}

async fn concurrent_commits_with_the_same_version_let_exactly_one_win(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-0", None).await;
    // Two handles, as two processes (or replicas) would have.
    let second = fx.open_with(same_key(&fx.key)).unwrap();
    let stores = [fx.store.clone(), second];
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            let alice = alice.clone();
            tokio::spawn(async move {
                let refresh = format!("r-{i}");
                store
                    .commit_refresh(&alice, put.version, &grant("a", NOW, Some(&refresh)), NOW)
                    .await
                    .map(|c| c.refresh_token.expose_secret().to_owned())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(refresh) => winners.push(refresh),
            Err(StoreError::Conflict(k)) => assert_eq!(k, alice),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one commit may win: {winners:?}");
    assert_eq!(
        fx.load(&alice).await.refresh_token.expose_secret(),
        winners[0]
    );
}

async fn a_refresh_lease_reads_under_the_lock_and_commits_once(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-0", None).await;
    let lease = fx.store.lock_for_refresh(&alice).await.unwrap();
    let current = lease.current().unwrap();
    assert_eq!(current.version, put.version);
    assert_eq!(current.refresh_token.expose_secret(), "r-0");
    let committed = lease
        .commit_refresh(&grant("a-1", NOW + 900, Some("r-1")), NOW + 1)
        .await
        .unwrap();
    assert!(committed.version > put.version);
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-1");
    assert_eq!(loaded.version, committed.version);

    // The next lease sees the committed row; its status change and delete go through it.
    let lease = fx.store.lock_for_refresh(&alice).await.unwrap();
    assert_eq!(lease.current().unwrap().version, committed.version);
    lease
        .set_status(ConnectionStatus::ReauthRequired, NOW + 2)
        .await
        .unwrap();
    assert_eq!(
        fx.load(&alice).await.status,
        ConnectionStatus::ReauthRequired
    );
    let lease = fx.store.lock_for_refresh(&alice).await.unwrap();
    assert!(lease.delete().await.unwrap());
    assert!(fx.store.load(&alice).await.unwrap().is_none());

    let none = fx.store.lock_for_refresh(&user("nobody")).await.unwrap();
    assert!(none.current().is_none());
}

async fn a_dropped_lease_changes_nothing(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-0", None).await;
    drop(fx.store.lock_for_refresh(&alice).await.unwrap());
    // The lock is free again at once and the row untouched.
    let lease = fx.store.lock_for_refresh(&alice).await.unwrap();
    assert_eq!(lease.current().unwrap().version, put.version);
    drop(lease);
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-0");
    assert_eq!(loaded.version, put.version);
}

async fn flow_states_are_single_use_and_expire(fx: Fixture) {
    fx.store
        .put_flow_state("jti-1", "flow-1", NOW + 600, NOW)
        .await
        .unwrap();
    fx.store
        .put_flow_state("jti-2", "flow-2", NOW + 10, NOW)
        .await
        .unwrap();
    // Another handle (another replica) takes it; nobody gets it twice.
    let other = fx.open_with(same_key(&fx.key)).unwrap();
    assert_eq!(
        other.take_flow_state("jti-1", NOW + 1).await.unwrap(),
        Some("flow-1".to_owned())
    );
    assert_eq!(
        fx.store.take_flow_state("jti-1", NOW + 1).await.unwrap(),
        None
    );
    assert_eq!(
        fx.store.take_flow_state("unknown", NOW).await.unwrap(),
        None
    );
    // Expired: not handed out.
    assert_eq!(
        fx.store.take_flow_state("jti-2", NOW + 10).await.unwrap(),
        None
    );
    // Expired entries are purged when new flows start; live ones stay.
    fx.store
        .put_flow_state("jti-3", "flow-3", NOW + 600, NOW)
        .await
        .unwrap();
    fx.store
        .put_flow_state("jti-4", "flow-4", NOW + 900, NOW + 700)
        .await
        .unwrap();
    assert_eq!(fx.store.take_flow_state("jti-3", NOW).await.unwrap(), None);
    assert_eq!(
        fx.store.take_flow_state("jti-4", NOW + 701).await.unwrap(),
        Some("flow-4".to_owned())
    );
}

async fn copy_in_writes_and_refuses_to_overwrite_a_newer_row(fx: Fixture) {
    let alice = user("alice");
    let source = Connection {
        key: alice.clone(),
        status: ConnectionStatus::Active,
        refresh_token: secret("r-copied"),
        access: Some(AccessToken {
            token: secret("a-copied"),
            expires_at: NOW + 900,
        }),
        scope: Some("accounts".into()),
        version: 7,
        created_at: NOW - 100,
        refreshed_at: Some(NOW - 10),
        synced_at: None,
        updated_at: NOW - 10,
        last_used_at: Some(NOW - 20),
    };
    assert_eq!(
        fx.store.copy_in(&source).await.unwrap(),
        CopyOutcome::Written
    );
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "r-copied");
    assert_eq!(loaded.access.unwrap().token.expose_secret(), "a-copied");
    assert_eq!(
        (loaded.created_at, loaded.refreshed_at, loaded.updated_at),
        (NOW - 100, Some(NOW - 10), NOW - 10)
    );
    assert!(loaded.version >= 7);

    // The target moves on (a refresh here); an older copy must not undo it.
    let refreshed = fx
        .store
        .commit_refresh(
            &alice,
            loaded.version,
            &grant("a-new", NOW + 1800, Some("r-new")),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(
        fx.store.copy_in(&source).await.unwrap(),
        CopyOutcome::TargetNewer
    );
    let kept = fx.load(&alice).await;
    assert_eq!(kept.refresh_token.expose_secret(), "r-new");
    assert_eq!(kept.version, refreshed.version);

    // A copy never lands on a version a refresh in flight could compare-and-swap against.
    let newer = Connection {
        updated_at: NOW + 5,
        version: 1,
        ..source.clone()
    };
    assert_eq!(
        fx.store.copy_in(&newer).await.unwrap(),
        CopyOutcome::Written
    );
    let err = fx
        .store
        .commit_refresh(&alice, refreshed.version, &grant("a", NOW, Some("r")), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    // And the next write of that row moves above the copied version.
    let copied = fx.load(&alice).await;
    let replaced = fx.put(&alice, "r-consent", None).await;
    assert!(replaced.version > copied.version);
}

async fn the_wrong_key_refuses_to_open(fx: Fixture) {
    let other = EncryptionKey::generate();
    let message = match fx.open_with(same_key(&other)) {
        Ok(_) => panic!("a store opened with the wrong key"),
        Err(message) => message,
    };
    assert!(message.contains(&fx.key.key_id()), "{message}");
    assert!(message.contains(&other.key_id()), "{message}");
    assert!(!message.contains(other.to_base64().expose_secret()));
    // The right key still opens it.
    assert!(fx.open_with(same_key(&fx.key)).is_ok());
}

async fn record_sync_touches_no_token(fx: Fixture) {
    let alice = user("alice");
    let put = fx.put(&alice, "r-0", Some(("a-0", NOW + 900))).await;
    fx.store.record_sync(&alice, NOW + 3).await.unwrap();
    let loaded = fx.load(&alice).await;
    assert_eq!(loaded.synced_at, Some(NOW + 3));
    assert_eq!(loaded.version, put.version);
    assert_eq!(loaded.refresh_token.expose_secret(), "r-0");
    let err = fx.store.record_sync(&user("bob"), NOW).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

// --- Key rotation. ---

/// A ring with `primary` as its primary key and `previous` as a previous key.
fn ring(primary: &EncryptionKey, previous: &EncryptionKey) -> KeyRing {
    KeyRing::new(same_key(primary), [same_key(previous)])
}

/// Small batches, so every rotation test runs several of them.
fn small_batches() -> RotationOptions {
    RotationOptions {
        batch_size: 2,
        idle_pause: Duration::from_millis(50),
        ..RotationOptions::default()
    }
}

async fn rotation_re_encrypts_every_row_and_then_only_the_new_key_opens_the_store(fx: Fixture) {
    let (old, new) = (&fx.key, EncryptionKey::generate());
    let (alice, bob, flow) = (
        user("alice"),
        user("bob"),
        ConnectionKey::flow("svc", "f-1").unwrap(),
    );
    fx.put(&alice, "r-alice", Some(("a-alice", NOW + 600)))
        .await;
    fx.put(&bob, "r-bob", None).await;
    fx.put(&flow, "r-flow", Some(("a-flow", NOW + 60))).await;

    // The new key alone is not the store's key yet.
    let message = fx.open_with(same_key(&new)).err().expect("refused");
    assert!(message.contains("does not match"), "{message}");

    // A ring with the new key primary reads what the old key sealed, and seals under the new.
    let rotating = fx.open_with(ring(&new, old)).unwrap();
    let loaded = rotating.load(&alice).await.unwrap().unwrap();
    assert_eq!(loaded.refresh_token.expose_secret(), "r-alice");
    assert_eq!(loaded.access.unwrap().token.expose_secret(), "a-alice");
    let status = rotating.key_status().await.unwrap();
    assert_eq!((status.current, status.pending, status.format1), (0, 3, 0));
    assert_eq!(status.primary_key_id, new.key_id());
    assert_eq!(status.check_key_id, old.key_id());
    assert_eq!(status.by_key_id.get(&old.key_id()), Some(&3));
    let carol = user("carol");
    rotating
        .put_connection(&carol, &new_connection("r-carol", None), NOW)
        .await
        .unwrap();
    let status = rotating.key_status().await.unwrap();
    assert_eq!((status.current, status.pending), (1, 3));
    assert_eq!(status.by_key_id.get(&new.key_id()), Some(&1));
    // A refresh without a rotated refresh token leaves a row half old, half new.
    let bob_now = rotating.load(&bob).await.unwrap().unwrap();
    let bob_committed = rotating
        .commit_refresh(&bob, bob_now.version, &grant("a-bob", NOW + 900, None), NOW)
        .await
        .unwrap();
    let status = rotating.key_status().await.unwrap();
    assert_eq!((status.current, status.pending), (1, 3));
    assert_eq!(status.by_key_id.get(&new.key_id()), Some(&2));
    // Nothing moves the key check while rows are left.
    assert!(!rotating.complete_rotation().await.unwrap().is_complete());
    assert!(fx.open_with(same_key(old)).is_ok());

    let mut batches = 0;
    let done = rotation::rotate(rotating.as_ref(), &small_batches(), |_| batches += 1)
        .await
        .unwrap();
    assert!(batches >= 2, "{batches} batches");
    assert!(done.is_complete(), "{done:?}");
    assert_eq!((done.current, done.pending), (4, 0));
    assert_eq!(done.check_key_id, new.key_id());
    assert_eq!(
        done.by_key_id.keys().collect::<Vec<_>>(),
        vec![&new.key_id()]
    );
    // Versions did not move: a refresh that read a row before the rotation still commits.
    let bob_after = rotating.load(&bob).await.unwrap().unwrap();
    assert_eq!(bob_after.version, bob_committed.version);

    // Every row opens with the new key alone; the old key alone is refused, clearly.
    let new_only = fx.open_with(same_key(&new)).unwrap();
    for (key, refresh, access) in [
        (&alice, "r-alice", Some("a-alice")),
        (&bob, "r-bob", Some("a-bob")),
        (&flow, "r-flow", Some("a-flow")),
        (&carol, "r-carol", None),
    ] {
        let loaded = new_only.load(key).await.unwrap().unwrap();
        assert_eq!(loaded.refresh_token.expose_secret(), refresh, "{key}");
        assert_eq!(
            loaded.access.map(|a| a.token.expose_secret().to_owned()),
            access.map(str::to_owned),
            "{key}"
        );
    }
    assert!(new_only.key_status().await.unwrap().is_complete());
    drop(rotating);
    let message = fx.open_with(same_key(old)).err().expect("refused");
    assert!(message.contains("does not match"), "{message}");
    assert!(message.contains(&new.key_id()), "{message}");
    assert!(message.contains(&old.key_id()), "{message}");
    assert!(!message.contains(old.to_base64().expose_secret()));
    assert!(!message.contains(new.to_base64().expose_secret()));
    // A ring naming the old key as primary still opens (it holds the new key): it would seal
    // under the old key again, which key-status shows.
    let backwards = fx.open_with(ring(old, &new)).unwrap();
    backwards
        .put_connection(&carol, &new_connection("r-carol-2", None), NOW + 1)
        .await
        .unwrap();
    let status = new_only.key_status().await.unwrap();
    assert_eq!(status.by_key_id.get(&old.key_id()), Some(&1));
    assert!(!status.is_complete());
}

async fn a_refresh_in_flight_commits_over_a_rotation(fx: Fixture) {
    let new = EncryptionKey::generate();
    let alice = user("alice");
    fx.put(&alice, "r-0", Some(("a-0", NOW))).await;
    let rotating = fx.open_with(ring(&new, &fx.key)).unwrap();
    // A refresh has read the row (PostgreSQL: holds its lock) and is waiting for finX...
    let lease = rotating.lock_for_refresh(&alice).await.unwrap();
    // ...while a rotation runs over it (PostgreSQL skips the locked row, SQLite re-seals it).
    let batch = rotating.reencrypt_batch(None, 10).await.unwrap();
    assert_eq!(batch.raced, 0);
    assert!(batch.next.is_none());
    // The refresh still commits: the rotation moved no version.
    let committed = lease
        .commit_refresh(&grant("a-1", NOW + 900, Some("r-1")), NOW + 1)
        .await
        .unwrap();
    assert_eq!(committed.refresh_token.expose_secret(), "r-1");
    let done = rotation::rotate(rotating.as_ref(), &small_batches(), |_| {})
        .await
        .unwrap();
    assert!(done.is_complete());
    let loaded = fx
        .open_with(same_key(&new))
        .unwrap()
        .load(&alice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.refresh_token.expose_secret(), "r-1");
    assert_eq!(loaded.access.unwrap().token.expose_secret(), "a-1");
    assert_eq!(loaded.version, committed.version);
}

/// Refreshes commit on one handle while a rotation runs batches of one on another (as the
/// gateway and `store rotate-key` would): every compare-and-swap succeeds, every commit is what
/// is stored at the end, and the rotation completes.
async fn commits_racing_a_rotation_are_never_lost(fx: Fixture) {
    let new = EncryptionKey::generate();
    let users: Vec<ConnectionKey> = (0..12).map(|i| user(&format!("u{i}"))).collect();
    for u in &users {
        fx.put(u, "r-0", None).await;
    }
    let serving = fx.open_with(ring(&new, &fx.key)).unwrap();
    let rotating = fx.open_with(ring(&new, &fx.key)).unwrap();
    const COMMITS: usize = 15;
    let writers: Vec<_> = users
        .iter()
        .cloned()
        .map(|u| {
            let serving = serving.clone();
            tokio::spawn(async move {
                for i in 1..=COMMITS {
                    let current = serving.load(&u).await.unwrap().unwrap();
                    let refresh = format!("r-{i}");
                    let access = format!("a-{i}");
                    let grant = grant(&access, NOW + i as i64, Some(&refresh));
                    // The only writer of this row: a conflict could only come from the rotation.
                    serving
                        .commit_refresh(&u, current.version, &grant, NOW + i as i64)
                        .await
                        .unwrap_or_else(|e| panic!("{u}: commit {i}: {e}"));
                }
            })
        })
        .collect();
    let options = RotationOptions {
        batch_size: 1,
        ..small_batches()
    };
    let mut raced = 0;
    let done = rotation::rotate(rotating.as_ref(), &options, |p| raced = p.raced)
        .await
        .unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(done.is_complete(), "{done:?}");
    println!("rows raced during the rotation: {raced}");
    let new_only = fx.open_with(same_key(&new)).unwrap();
    for u in &users {
        let loaded = new_only.load(u).await.unwrap().unwrap();
        let last = format!("r-{COMMITS}");
        assert_eq!(loaded.refresh_token.expose_secret(), last, "{u}");
        assert_eq!(
            loaded.access.unwrap().token.expose_secret(),
            format!("a-{COMMITS}")
        );
    }
    assert!(new_only.key_status().await.unwrap().is_complete());
}

/// Flips the last byte (inside the tag) of `key`'s refresh token in the database.
fn tamper(fx: &Fixture, key: &ConnectionKey) {
    match &fx.place {
        Place::Sqlite(dir) => {
            let conn = rusqlite::Connection::open(dir.path().join("tokens.db")).unwrap();
            let mut blob: Vec<u8> = conn
                .query_row(
                    "SELECT refresh_token FROM connections WHERE key = ?1",
                    [key.as_str()],
                    |row| row.get(0),
                )
                .unwrap();
            *blob.last_mut().unwrap() ^= 1;
            conn.execute(
                "UPDATE connections SET refresh_token = ?1 WHERE key = ?2",
                rusqlite::params![blob, key.as_str()],
            )
            .unwrap();
        }
        Place::Postgres(db) => db.execute(&format!(
            "UPDATE connections SET refresh_token = set_byte(refresh_token, \
             octet_length(refresh_token) - 1, \
             get_byte(refresh_token, octet_length(refresh_token) - 1) # 1) \
             WHERE key = '{}'",
            key.as_str()
        )),
    }
}

async fn rotation_stops_at_tokens_no_configured_key_opens(fx: Fixture) {
    let new = EncryptionKey::generate();
    let (alice, bob) = (user("alice"), user("bob"));
    fx.put(&alice, "r-alice", None).await;
    fx.put(&bob, "r-bob", None).await;
    tamper(&fx, &bob);
    let rotating = fx.open_with(ring(&new, &fx.key)).unwrap();
    let err = rotation::rotate(rotating.as_ref(), &small_batches(), |_| {})
        .await
        .unwrap_err();
    let RotationError::Unreadable { keys, status } = &err else {
        panic!("{err}");
    };
    assert_eq!(keys, &vec![bob.clone()]);
    assert_eq!((status.current, status.pending), (1, 1));
    let message = err.to_string();
    assert!(
        message.contains("bob") && message.contains(&fx.key.key_id()),
        "{message}"
    );
    // The key check did not move: the old key still opens the store.
    assert_eq!(status.check_key_id, fx.key.key_id());
    assert!(fx.open_with(same_key(&fx.key)).is_ok());

    // Once the damaged connection is gone, the rotation completes.
    rotating.delete(&bob).await.unwrap();
    let done = rotation::rotate(rotating.as_ref(), &small_batches(), |_| {})
        .await
        .unwrap();
    assert!(done.is_complete());
    let loaded = fx
        .open_with(same_key(&new))
        .unwrap()
        .load(&alice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.refresh_token.expose_secret(), "r-alice");
}

/// Through the fault injector, a share of the rotation's reads and writes fail (a write before
/// or after it was applied): each failure stops the run, nothing is lost or damaged, and running
/// again finishes the job. The faults are seeded: the rotation is sequential, so every run
/// meets the same faults, and the test cannot pass by drawing none.
async fn rotation_through_injected_store_faults_loses_nothing(fx: Fixture) {
    let new = EncryptionKey::generate();
    let users: Vec<ConnectionKey> = (0..9).map(|i| user(&format!("u{i}"))).collect();
    for (i, u) in users.iter().enumerate() {
        fx.put(u, &format!("r-{i}"), Some((&format!("a-{i}"), NOW)))
            .await;
    }
    let faulty = FaultyStore::new(fx.open_with(ring(&new, &fx.key)).unwrap());
    faulty.set_error_rate(0.3);
    faulty.set_seed(5);
    let mut attempts = 0;
    let done = loop {
        attempts += 1;
        assert!(attempts < 200, "the rotation never got through");
        match rotation::rotate(&faulty, &small_batches(), |_| {}).await {
            Ok(done) => break done,
            Err(RotationError::Store(StoreError::Unavailable(message))) => {
                assert!(message.contains("injected"), "{message}");
            }
            Err(other) => panic!("{other}"),
        }
    };
    assert!(
        faulty.injected() >= 2 && attempts > 2,
        "the seeded faults struck {} times over {attempts} runs",
        faulty.injected()
    );
    assert!(done.is_complete());
    let new_only = fx.open_with(same_key(&new)).unwrap();
    for (i, u) in users.iter().enumerate() {
        let loaded = new_only.load(u).await.unwrap().unwrap();
        assert_eq!(loaded.refresh_token.expose_secret(), format!("r-{i}"));
        assert_eq!(
            loaded.access.unwrap().token.expose_secret(),
            format!("a-{i}")
        );
    }
}

// --- PostgreSQL only: what only a store shared by several processes can show. ---

/// A second replica waits for the first one's refresh lock, then reads the row the first one
/// committed; waiting is bounded by `lock_timeout` and ends in `Busy`, spending nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leases_serialise_replicas_and_waiting_is_bounded() {
    let fx = Fixture::postgres();
    let Place::Postgres(db) = &fx.place else {
        unreachable!()
    };
    let alice = user("alice");
    let put = fx.put(&alice, "r-0", None).await;
    let replica_b = PostgresStore::open(
        &pg_settings(&db.url, Duration::from_millis(300)),
        same_key(&fx.key),
        OpenWait::Once,
    )
    .unwrap();

    let held = fx.store.lock_for_refresh(&alice).await.unwrap();
    let started = Instant::now();
    let err = match replica_b.lock_for_refresh(&alice).await {
        Ok(_) => panic!("a second replica took a held refresh lock"),
        Err(err) => err,
    };
    assert!(matches!(&err, StoreError::Busy(k) if *k == alice), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A waiter with a longer timeout is let in by the holder's commit and reads its result.
    let replica_c = fx.open_with(same_key(&fx.key)).unwrap();
    let waiter = tokio::spawn({
        let alice = alice.clone();
        async move {
            let lease = replica_c.lock_for_refresh(&alice).await.unwrap();
            let seen = lease.current().unwrap().clone();
            (seen.version, seen.refresh_token.expose_secret().to_owned())
        }
    });
    // The waiter is queued behind the lock before the holder commits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.query_text(
        "SELECT count(*)::text FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'",
    ) != Some("1".into())
    {
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let committed = held
        .commit_refresh(&grant("a-1", NOW + 900, Some("r-1")), NOW)
        .await
        .unwrap();
    let (version, refresh) = waiter.await.unwrap();
    assert_eq!(version, committed.version);
    assert_eq!(refresh, "r-1");
    assert!(version > put.version);
    let lease = replica_b.lock_for_refresh(&alice).await.unwrap();
    assert_eq!(lease.current().unwrap().version, committed.version);
}

/// Migrations run once however many replicas start together, and again are a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_idempotent_and_safe_when_replicas_start_together() {
    let db = TestDatabase::create();
    let key = EncryptionKey::generate();
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let settings = pg_settings(&db.url, Duration::from_secs(10));
            let key = same_key(&key);
            std::thread::spawn(move || PostgresStore::open(&settings, key, OpenWait::Once))
        })
        .collect();
    for opener in openers {
        opener.join().unwrap().expect("every replica opens");
    }
    assert_eq!(
        db.query_text("SELECT count(*)::text FROM _sqlx_migrations"),
        Some(MIGRATIONS.into())
    );
    let applied = PostgresStore::migrate_only(&pg_settings(&db.url, Duration::from_secs(10))).await;
    assert_eq!(applied.unwrap(), 0);
    assert_eq!(
        db.query_text("SELECT count(*)::text FROM store_meta"),
        Some("1".into())
    );
}

/// Tokens are ciphertexts in the database: no token appears in any column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tokens_are_encrypted_at_rest() {
    let fx = Fixture::postgres();
    let Place::Postgres(db) = &fx.place else {
        unreachable!()
    };
    let alice = user("alice");
    fx.put(
        &alice,
        "refresh-CANARY-1234567890",
        Some(("access-CANARY-0987654321", NOW)),
    )
    .await;
    let dump = db
        .query_text(
            "SELECT string_agg(encode(refresh_token, 'escape') || encode(access_token, 'escape') \
             || encode(refresh_token, 'base64') || coalesce(scope, ''), '|') FROM connections",
        )
        .unwrap();
    assert!(!dump.contains("CANARY"), "{dump}");
}

/// A process's liveness lock: seen by other replicas while it runs, gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_owner_liveness_follows_the_process() {
    let fx = Fixture::postgres();
    let replica_a = fx.open_with(same_key(&fx.key)).unwrap();
    replica_a.register_owner("owner-a").await.unwrap();
    assert!(fx.store.owner_alive("owner-a").await.unwrap());
    assert!(!fx.store.owner_alive("owner-b").await.unwrap());
    // Asking does not take the lock away.
    assert!(fx.store.owner_alive("owner-a").await.unwrap());
    drop(replica_a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.store.owner_alive("owner-a").await.unwrap() {
        assert!(Instant::now() < deadline, "the lock outlived its process");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
