//! Unit tests of the token manager: a real (temporary) SQLite store and a scripted finX token
//! endpoint that records every call. The black-box tests in `tests/` drive the same logic
//! through the proxy and the simulator.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::clock::ManualClock;
use crate::store::crypto::EncryptionKey;
use crate::store::sqlite::SqliteStore;
use crate::store::{AccessToken, ConnectionStatus, TokenGrant};

/// A scripted finX token endpoint: answers from its script (then successes), records calls.
#[derive(Default)]
struct Script {
    outcomes: Mutex<VecDeque<Result<(), TokenFailure>>>,
    calls: AtomicUsize,
    /// The refresh tokens presented, in order.
    presented: Mutex<Vec<String>>,
    lifetime_secs: i64,
    /// How long each call takes.
    delay: Duration,
}

impl Script {
    fn with(outcomes: impl IntoIterator<Item = Result<(), TokenFailure>>) -> Arc<Self> {
        Arc::new(Self {
            outcomes: Mutex::new(outcomes.into_iter().collect()),
            lifetime_secs: 3600,
            ..Self::default()
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl TokenEndpoint for Script {
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        now: UnixSeconds,
    ) -> Result<TokenGrant, TokenFailure> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.presented
            .lock()
            .unwrap()
            .push(refresh_token.expose_secret().to_owned());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(Err(failure)) = self.outcomes.lock().unwrap().pop_front() {
            return Err(failure);
        }
        Ok(TokenGrant {
            access: AccessToken {
                token: SecretString::from(format!("access-{n}")),
                expires_at: now + self.lifetime_secs,
            },
            refresh_token: Some(SecretString::from(format!("refresh-{n}"))),
            scope: None,
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn TokenStore>,
    clock: ManualClock,
    script: Arc<Script>,
    manager: TokenManager,
    journal_path: std::path::PathBuf,
    key_b64: SecretString,
}

fn settings() -> TokenSettings {
    TokenSettings::with_defaults(Duration::from_secs(60))
}

impl Fixture {
    fn new(script: Arc<Script>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let key_b64 = key.to_base64();
        let store: Arc<dyn TokenStore> =
            Arc::new(SqliteStore::open(&dir.path().join("t.db"), key).unwrap());
        let journal_path = dir.path().join("journal");
        let clock = ManualClock::default();
        let manager = Self::manager(&store, &clock, &script, &journal_path, &key_b64);
        Self {
            _dir: dir,
            store,
            clock,
            script,
            manager,
            journal_path,
            key_b64,
        }
    }

    fn manager(
        store: &Arc<dyn TokenStore>,
        clock: &ManualClock,
        script: &Arc<Script>,
        journal_path: &std::path::Path,
        key_b64: &SecretString,
    ) -> TokenManager {
        let key = EncryptionKey::from_base64(
            key_b64.expose_secret(),
            crate::secret::SecretRef::Env("TEST".into()),
        )
        .unwrap();
        TokenManager::new(
            store.clone(),
            script.clone(),
            Arc::new(clock.clone()),
            settings(),
            Some(Journal::new(journal_path.to_path_buf(), key)),
            None,
        )
        .unwrap()
    }

    /// A new manager on the same store and journal, as a restarted process would have.
    fn restart(&mut self) {
        self.manager.shutdown(Duration::from_secs(5));
        self.manager = Self::manager(
            &self.store,
            &self.clock,
            &self.script,
            &self.journal_path,
            &self.key_b64,
        );
    }

    async fn import(&self, user: &str, access_expires_at: Option<i64>) -> ConnectionKey {
        let key = ConnectionKey::user(user).unwrap();
        let new = NewConnection {
            refresh_token: SecretString::from(format!("{user}-refresh-0")),
            access: access_expires_at.map(|expires_at| AccessToken {
                token: SecretString::from(format!("{user}-access-0")),
                expires_at,
            }),
            scope: None,
        };
        self.store
            .put_connection(&key, &new, self.clock.now())
            .await
            .unwrap();
        key
    }

    async fn stored(&self, key: &ConnectionKey) -> Connection {
        self.store.load(key).await.unwrap().unwrap()
    }
}

/// Polls `check` with a deadline (background work finishes on its own runtime).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_refresh_which_is_stored_before_use() {
    let fx = Fixture::new(Script::with([]));
    let key = fx.import("ann", None).await;
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let (manager, key) = (fx.manager.clone(), key.clone());
            tokio::spawn(async move { manager.bearer(&key).await })
        })
        .collect();
    for request in requests {
        let credential = request.await.unwrap().unwrap();
        assert_eq!(credential.source, TokenSource::Refresh);
    }
    assert_eq!(fx.script.calls(), 1);
    let stored = fx.stored(&key).await;
    assert_eq!(stored.refresh_token.expose_secret(), "refresh-1");
    assert_eq!(fx.manager.stats().requests_waited, 16);
    // The next request is a cache hit.
    let hit = fx.manager.bearer(&key).await.unwrap();
    assert_eq!(hit.source, TokenSource::Cache);
    assert!(fx.manager.stats().commit_window_max_us > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_its_early_window_is_served_while_one_background_refresh_runs() {
    let fx = Fixture::new(Script::with([]));
    let key = fx.import("ben", None).await;
    fx.manager.bearer(&key).await.unwrap();
    // 3600 s tokens: the early window is the last 360 s (10 %, more than 2 × 60 s).
    fx.clock.advance(3600 - 300);
    for _ in 0..10 {
        let served = fx.manager.bearer(&key).await.unwrap();
        assert_eq!(served.source, TokenSource::Cache, "nobody waits");
    }
    eventually("the background refresh", || fx.script.calls() == 2).await;
    eventually("the new token in the cache", || {
        fx.manager.stats().refreshes_ahead == 1
    })
    .await;
    assert_eq!(
        fx.manager.stats().requests_waited,
        1,
        "only the first miss waited"
    );
    // Inside refresh_skew of the *old* token the new one is served, no refresh.
    fx.clock.advance(260);
    let served = fx.manager.bearer(&key).await.unwrap();
    assert!(matches!(
        served.source,
        TokenSource::Cache | TokenSource::Store
    ));
    assert_eq!(fx.script.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_prove_finx_did_not_act_are_retried_within_the_request() {
    let busy = TokenFailure::Unavailable {
        reason: "finX answered 429 or 503",
        retry_after_secs: 0,
        not_processed: true,
    };
    let fx = Fixture::new(Script::with([Err(busy.clone()), Err(busy)]));
    let key = fx.import("cid", None).await;
    let credential = fx.manager.bearer(&key).await.unwrap();
    assert_eq!(credential.source, TokenSource::Refresh);
    assert_eq!(fx.script.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_not_retried_at_once_and_a_valid_token_keeps_serving() {
    let fx = Fixture::new(Script::with([
        Err(TokenFailure::Timeout),
        Err(TokenFailure::Timeout),
    ]));
    // The stored access token is inside refresh_skew but not expired.
    let key = fx.import("dora", Some(fx.clock.now() + 30)).await;
    let served = fx.manager.bearer(&key).await.unwrap();
    assert_eq!(served.source, TokenSource::Store, "still valid: served");
    assert_eq!(fx.script.calls(), 1, "a timeout may have rotated: no retry");
    // During the cool-down finX is not asked again.
    fx.manager.bearer(&key).await.unwrap();
    assert_eq!(fx.script.calls(), 1);
    // Once expired, the token is never served: the caller gets the failure.
    fx.clock.advance(30);
    assert_eq!(fx.script.calls(), 1);
    let error = fx.manager.bearer(&key).await.unwrap_err();
    assert!(
        matches!(
            error,
            TokenError::Timeout { .. } | TokenError::Unavailable { .. }
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_is_not_asked_again_but_a_newer_row_is_honoured_at_once() {
    let fx = Fixture::new(Script::with([Err(TokenFailure::InvalidGrant)]));
    let key = fx.import("eve", None).await;
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    assert_eq!(fx.script.calls(), 1);
    assert_eq!(
        fx.stored(&key).await.status,
        ConnectionStatus::ReauthRequired
    );
    // An operator imports a new consent straight into the store (another process).
    fx.import("eve", None).await;
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap().source,
        TokenSource::Refresh
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_after_a_401_are_limited_per_interval() {
    let fx = Fixture::new(Script::with([]));
    let key = fx.import("fay", None).await;
    let first = fx.manager.bearer(&key).await.unwrap();
    // Several requests met the same 401: they share one refresh.
    let a = fx.manager.replacement(&key, first.version).await.unwrap();
    let b = fx.manager.replacement(&key, first.version).await.unwrap();
    assert_eq!(a.version, b.version);
    assert_eq!(fx.script.calls(), 2);
    // The new token is rejected too, at once: the loop guard holds the next forced refresh.
    assert!(fx.manager.replacement(&key, a.version).await.is_none());
    assert_eq!(fx.script.calls(), 2);
    fx.clock.advance(61);
    assert!(fx.manager.replacement(&key, a.version).await.is_some());
    assert_eq!(fx.script.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_refresh_is_finished_once_and_a_lost_rotation_reported() {
    let fx = Fixture::new(Script::with([Err(TokenFailure::InvalidGrant)]));
    let lost = fx.import("gus", None).await;
    let recovered = fx.import("hal", None).await;
    // Another process recorded intents and died before finishing them.
    for key in [&lost, &recovered] {
        let mut lease = fx.store.lock_for_refresh(key).await.unwrap();
        lease
            .record_intent("crashed-process", None, fx.clock.now())
            .await
            .unwrap();
    }
    assert_eq!(fx.store.pending_intents().await.unwrap().len(), 2);
    // The first asks finX once: invalid_grant, the rotated token was lost.
    assert_eq!(
        fx.manager.bearer(&lost).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    // The second was interrupted before finX acted: finished.
    assert_eq!(
        fx.manager.bearer(&recovered).await.unwrap().source,
        TokenSource::Refresh
    );
    let stats = fx.manager.stats();
    assert_eq!((stats.rotations_lost, stats.rotations_recovered), (1, 1));
    assert!(fx.store.pending_intents().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_left_in_the_journal_is_committed_after_a_restart() {
    let mut fx = Fixture::new(Script::with([]));
    let key = fx.import("ida", None).await;
    let journal = || {
        Journal::new(
            fx.journal_path.clone(),
            EncryptionKey::from_base64(
                fx.key_b64.expose_secret(),
                crate::secret::SecretRef::Env("TEST".into()),
            )
            .unwrap(),
        )
    };
    // What a process that stopped after journaling finX's answer, before its commit, leaves.
    fx.manager.shutdown(Duration::from_secs(5));
    let left = journal();
    left.recover().unwrap();
    left.record(
        &key,
        &memory::Uncommitted {
            expected_version: fx.stored(&key).await.version,
            grant: TokenGrant {
                access: AccessToken {
                    token: SecretString::from("access-journaled"),
                    expires_at: fx.clock.now() + 3600,
                },
                refresh_token: Some(SecretString::from("refresh-journaled")),
                scope: None,
            },
            refreshed_at: fx.clock.now(),
            journal_seq: None,
        },
    )
    .unwrap();
    drop(left);

    // A restart commits it before asking finX anything.
    fx.restart();
    fx.manager.recover();
    let store = fx.store.clone();
    let key_again = key.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = store.load(&key_again).await.unwrap().unwrap();
        if stored.refresh_token.expose_secret() == "refresh-journaled" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let served = fx.manager.bearer(&key).await.unwrap();
    assert_eq!(served.source, TokenSource::Store);
    assert_eq!(fx.script.calls(), 0);
    eventually("the journal entry marked done", || {
        fx.manager
            .inner
            .journal
            .as_ref()
            .is_some_and(|j| j.pending() == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refresh_is_journaled_before_it_is_committed() {
    let fx = Fixture::new(Script::with([]));
    let key = fx.import("jay", None).await;
    fx.manager.bearer(&key).await.unwrap();
    let written = std::fs::read_to_string(&fx.journal_path).unwrap();
    assert!(written.contains("\"op\":\"grant\""), "{written}");
    assert!(written.contains("\"op\":\"done\""), "{written}");
    assert!(!written.contains("refresh-1"), "tokens are sealed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_refreshes_due_connections_and_skips_dead_ones() {
    let fx = Fixture::new(Script::with([Err(TokenFailure::InvalidGrant)]));
    let dead = fx.import("jo", None).await;
    let idle = fx.import("kim", None).await;
    let keeper = fx.manager.keeper(keeper::KeeperSettings {
        interval: Duration::from_secs(3600),
        max_refresh_age: Duration::from_secs(30 * 86_400),
        max_idle: Duration::from_secs(30 * 86_400),
        concurrency: 2,
        rate_per_sec: 100,
        batch: 100,
    });
    assert_eq!(keeper.run_once().await.due, 0, "fresh consents are not due");
    fx.clock.advance(31 * 86_400);
    let report = keeper.run_once().await;
    assert_eq!(report.due, 2);
    assert_eq!(report.refreshed + report.failed, 2);
    assert_eq!(
        fx.stored(&dead).await.status,
        ConnectionStatus::ReauthRequired
    );
    assert_eq!(fx.stored(&idle).await.status, ConnectionStatus::Active);
    // The dead one is never asked for again; the refreshed one is not due any more.
    let calls = fx.script.calls();
    let report = keeper.run_once().await;
    assert_eq!(report.due, 0);
    assert_eq!(fx.script.calls(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_or_purged_connection_is_refused_at_once_despite_a_cached_token() {
    let fx = Fixture::new(Script::with([]));
    let key = fx.import("rex", Some(fx.clock.now() + 3600)).await;
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap().source,
        TokenSource::Store
    );
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap().source,
        TokenSource::Cache
    );

    fx.manager.revoke(&key).await.unwrap();
    assert_eq!(fx.stored(&key).await.status, ConnectionStatus::Revoked);
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    assert_eq!(
        fx.script.calls(),
        0,
        "finX is not asked for a revoked connection"
    );

    // A new consent makes it usable again; a purge removes it.
    let consent = NewConnection {
        refresh_token: SecretString::from("rex-refresh-new".to_owned()),
        access: None,
        scope: None,
    };
    fx.manager.store_consent(&key, &consent).await.unwrap();
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap().source,
        TokenSource::Refresh
    );
    assert!(fx.manager.purge(&key).await.unwrap());
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap_err(),
        TokenError::NotFound
    );
    assert!(!fx.manager.purge(&key).await.unwrap());
    assert!(matches!(
        fx.manager.revoke(&key).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_during_a_refresh_waits_for_it_and_leaves_no_token_cached() {
    let script = Arc::new(Script {
        lifetime_secs: 3600,
        delay: Duration::from_millis(300),
        ..Script::default()
    });
    let fx = Fixture::new(script);
    let key = fx.import("ray", None).await;
    let request = {
        let (manager, key) = (fx.manager.clone(), key.clone());
        tokio::spawn(async move { manager.bearer(&key).await })
    };
    eventually("the refresh reached finX", || fx.script.calls() == 1).await;
    fx.manager.revoke(&key).await.unwrap();
    // The request that was waiting gets the token refreshed before the revoke …
    assert_eq!(request.await.unwrap().unwrap().source, TokenSource::Refresh);
    // … whose rotation was committed, and nobody gets it afterwards.
    let stored = fx.stored(&key).await;
    assert_eq!(stored.refresh_token.expose_secret(), "refresh-1");
    assert_eq!(stored.status, ConnectionStatus::Revoked);
    assert_eq!(
        fx.manager.bearer(&key).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    assert_eq!(fx.script.calls(), 1);
}
