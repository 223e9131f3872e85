//! The `TokenStore` contract: one suite, run against every implementation (embedded SQLite and
//! shared PostgreSQL, the latter on a database of its own per test). What only one kind can show
//! (SQLite's files on disk, PostgreSQL's row locks across handles) is tested beside it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::postgres::{OpenWait, PgSettings, PgTls, PostgresStore};
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

    /// Another handle on the same data with `key`.
    fn open_with(&self, key: EncryptionKey) -> Result<Arc<dyn TokenStore>, String> {
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
