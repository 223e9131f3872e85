//! A fault-injecting wrapper around any [`TokenStore`], for tests and benches (in the spirit of
//! Vault's physical error and latency injectors): every operation, lease operations included,
//! waits `latency` and then fails with probability `error_rate` as an unavailable database
//! would. A failing write fails either before it reaches the store or after it was applied (the
//! caller cannot tell which, as with a connection lost during a commit).
//!
//! Never used by `serve`; it lives in the library so black-box tests and benches can wrap the
//! store a gateway runs on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    Connection, ConnectionKey, ConnectionStatus, ConnectionSummary, CopyOutcome, KeyStatus,
    NewConnection, ReencryptBatch, RefreshIntent, RefreshLease, RotationCursor, StoreError,
    TokenGrant, TokenStore,
};
use crate::clock::UnixSeconds;

/// The knobs, shared by the store and its leases.
#[derive(Default)]
struct Knobs {
    /// `f64` bits of the error rate.
    error_rate: AtomicU64,
    latency_micros: AtomicU64,
    injected: AtomicU64,
    /// A seeded generator makes the sequence of faults reproducible for a sequential caller;
    /// without one, each draw comes from the thread's generator.
    seeded: Mutex<Option<StdRng>>,
}

/// When an injected write failure strikes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strike {
    None,
    Before,
    After,
}

impl Knobs {
    async fn delay(&self) {
        let micros = self.latency_micros.load(Ordering::Relaxed);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }

    /// A uniform draw in [0, 1).
    fn draw(&self) -> f64 {
        let mut seeded = self.seeded.lock().unwrap_or_else(PoisonError::into_inner);
        match seeded.as_mut() {
            Some(rng) => rng.random(),
            None => rand::rng().random(),
        }
    }

    fn fires(&self) -> bool {
        let rate = f64::from_bits(self.error_rate.load(Ordering::Relaxed));
        let fires = rate > 0.0 && self.draw() < rate;
        if fires {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fires
    }

    /// For a read: wait, then maybe fail.
    async fn read(&self, operation: &str) -> Result<(), StoreError> {
        self.delay().await;
        if self.fires() {
            return Err(injected(operation));
        }
        Ok(())
    }

    /// For a write: wait, then decide whether and when it fails.
    async fn write(&self) -> Strike {
        self.delay().await;
        if !self.fires() {
            Strike::None
        } else if self.draw() < 0.5 {
            Strike::Before
        } else {
            Strike::After
        }
    }
}

fn injected(operation: &str) -> StoreError {
    StoreError::Unavailable(format!("injected store fault ({operation})"))
}

/// Applies `strike` to a write performed by `write`.
async fn struck<T>(
    strike: Strike,
    operation: &str,
    write: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match strike {
        Strike::None => write.await,
        Strike::Before => Err(injected(operation)),
        Strike::After => {
            write.await?;
            Err(injected(operation))
        }
    }
}

/// See the module docs.
pub struct FaultyStore {
    inner: Arc<dyn TokenStore>,
    knobs: Arc<Knobs>,
}

impl FaultyStore {
    /// Wraps `inner`, injecting nothing until told to.
    pub fn new(inner: Arc<dyn TokenStore>) -> Self {
        Self {
            inner,
            knobs: Arc::default(),
        }
    }

    /// Fails this share (0.0–1.0) of operations from now on.
    pub fn set_error_rate(&self, rate: f64) {
        self.knobs
            .error_rate
            .store(rate.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Draws faults from a generator seeded with `seed` from now on, so that a caller making the
    /// same operations in the same order meets the same faults on every run.
    pub fn set_seed(&self, seed: u64) {
        let mut seeded = self
            .knobs
            .seeded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *seeded = Some(StdRng::seed_from_u64(seed));
    }

    /// Delays every operation by this much from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.knobs
            .latency_micros
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.knobs.injected.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl TokenStore for FaultyStore {
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        self.knobs.read("load").await?;
        self.inner.load(key).await
    }

    async fn put_connection(
        &self,
        key: &ConnectionKey,
        new: &NewConnection,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "put", self.inner.put_connection(key, new, now)).await
    }

    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let strike = self.knobs.write().await;
        let commit = self.inner.commit_refresh(key, expected_version, grant, now);
        struck(strike, "commit", commit).await
    }

    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "status", self.inner.set_status(key, status, now)).await
    }

    async fn record_sync(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "sync", self.inner.record_sync(key, now)).await
    }

    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "delete", self.inner.delete(key)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.knobs.read("ping").await?;
        self.inner.ping().await
    }

    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        self.knobs.read("list").await?;
        self.inner.list().await
    }

    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError> {
        self.knobs.read("lock").await?;
        Ok(Box::new(FaultyLease {
            inner: self.inner.lock_for_refresh(key).await?,
            knobs: self.knobs.clone(),
        }))
    }

    async fn put_flow_state(
        &self,
        state_id: &str,
        flow_id: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        let put = self
            .inner
            .put_flow_state(state_id, flow_id, expires_at, now);
        struck(strike, "flow state", put).await
    }

    async fn take_flow_state(
        &self,
        state_id: &str,
        now: UnixSeconds,
    ) -> Result<Option<String>, StoreError> {
        let strike = self.knobs.write().await;
        struck(
            strike,
            "flow state",
            self.inner.take_flow_state(state_id, now),
        )
        .await
    }

    async fn copy_in(&self, connection: &Connection) -> Result<CopyOutcome, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "copy", self.inner.copy_in(connection)).await
    }

    async fn register_owner(&self, owner: &str) -> Result<(), StoreError> {
        self.inner.register_owner(owner).await
    }

    fn liveness_epoch(&self) -> Option<u64> {
        self.inner.liveness_epoch()
    }

    async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError> {
        self.knobs.read("owner").await?;
        self.inner.owner_alive(owner).await
    }

    async fn touch(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "touch", self.inner.touch(key, now)).await
    }

    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError> {
        self.knobs.read("intents").await?;
        self.inner.pending_intents().await
    }

    async fn due_for_keeping(
        &self,
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
        limit: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError> {
        self.knobs.read("due").await?;
        self.inner
            .due_for_keeping(refreshed_before, active_before, limit)
            .await
    }

    async fn key_status(&self) -> Result<KeyStatus, StoreError> {
        self.knobs.read("key status").await?;
        self.inner.key_status().await
    }

    async fn reencrypt_batch(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError> {
        let strike = self.knobs.write().await;
        let batch = self.inner.reencrypt_batch(after, limit);
        struck(strike, "re-encrypt", batch).await
    }

    async fn complete_rotation(&self) -> Result<KeyStatus, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "complete rotation", self.inner.complete_rotation()).await
    }
}

/// A lease whose operations fail like the store's.
struct FaultyLease {
    inner: Box<dyn RefreshLease>,
    knobs: Arc<Knobs>,
}

#[async_trait]
impl RefreshLease for FaultyLease {
    fn current(&self) -> Option<&Connection> {
        self.inner.current()
    }

    fn intent(&self) -> Option<&RefreshIntent> {
        self.inner.intent()
    }

    async fn record_intent(
        &mut self,
        owner: &str,
        takeover: Option<&str>,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        let record = self.inner.record_intent(owner, takeover, now);
        struck(strike, "intent", record).await
    }

    async fn abandon(self: Box<Self>) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "abandon", self.inner.abandon()).await
    }

    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "commit", self.inner.commit_refresh(grant, now)).await
    }

    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "status", self.inner.set_status(status, now)).await
    }

    async fn delete(self: Box<Self>) -> Result<bool, StoreError> {
        let strike = self.knobs.write().await;
        struck(strike, "delete", self.inner.delete()).await
    }
}
