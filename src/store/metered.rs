//! A wrapper around any [`TokenStore`] that times every operation (refresh leases included)
//! into `finx_gateway_store_operation_duration_seconds{operation}` and counts failures into
//! `finx_gateway_store_errors_total{operation}`. The gateway runs its store inside one; the
//! operation names are fixed strings, never a key.
//!
//! A conflict (another writer was first) or a missing row is an answer, not a failure: only
//! errors that mean the store could not do its work are counted.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{
    Connection, ConnectionKey, ConnectionStatus, ConnectionSummary, CopyOutcome, KeyStatus,
    NewConnection, ReencryptBatch, RefreshIntent, RefreshLease, RotationCursor, StoreError,
    TokenGrant, TokenStore,
};
use crate::clock::UnixSeconds;
use crate::metrics::Metrics;

/// Times and counts the operations of the store inside.
pub struct MeteredStore {
    inner: Arc<dyn TokenStore>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: Arc<dyn TokenStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

/// Runs `operation`, recording its time and whether the store failed.
async fn timed<T>(
    metrics: &Metrics,
    name: &'static str,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = operation.await;
    let failed = matches!(
        result,
        Err(StoreError::Unavailable(_) | StoreError::Corrupt(_) | StoreError::Busy(_))
    );
    metrics.record_store(name, started.elapsed().as_secs_f64(), failed);
    result
}

#[async_trait]
impl TokenStore for MeteredStore {
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        timed(&self.metrics, "load", self.inner.load(key)).await
    }

    async fn put_connection(
        &self,
        key: &ConnectionKey,
        new: &NewConnection,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let put = self.inner.put_connection(key, new, now);
        timed(&self.metrics, "put_connection", put).await
    }

    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let commit = self.inner.commit_refresh(key, expected_version, grant, now);
        timed(&self.metrics, "commit_refresh", commit).await
    }

    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let set = self.inner.set_status(key, status, now);
        timed(&self.metrics, "set_status", set).await
    }

    async fn record_sync(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "record_sync",
            self.inner.record_sync(key, now),
        )
        .await
    }

    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        timed(&self.metrics, "delete", self.inner.delete(key)).await
    }

    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        timed(&self.metrics, "list", self.inner.list()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed(&self.metrics, "ping", self.inner.ping()).await
    }

    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError> {
        let inner = timed(
            &self.metrics,
            "lock_for_refresh",
            self.inner.lock_for_refresh(key),
        )
        .await?;
        Ok(Box::new(MeteredLease {
            inner,
            metrics: self.metrics.clone(),
        }))
    }

    async fn put_flow_state(
        &self,
        state_id: &str,
        flow_id: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let put = self
            .inner
            .put_flow_state(state_id, flow_id, expires_at, now);
        timed(&self.metrics, "put_flow_state", put).await
    }

    async fn take_flow_state(
        &self,
        state_id: &str,
        now: UnixSeconds,
    ) -> Result<Option<String>, StoreError> {
        let take = self.inner.take_flow_state(state_id, now);
        timed(&self.metrics, "take_flow_state", take).await
    }

    async fn register_owner(&self, owner: &str) -> Result<(), StoreError> {
        timed(
            &self.metrics,
            "register_owner",
            self.inner.register_owner(owner),
        )
        .await
    }

    async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError> {
        timed(&self.metrics, "owner_alive", self.inner.owner_alive(owner)).await
    }

    fn liveness_epoch(&self) -> Option<u64> {
        self.inner.liveness_epoch()
    }

    async fn touch(&self, key: &ConnectionKey, now: UnixSeconds) -> Result<(), StoreError> {
        timed(&self.metrics, "touch", self.inner.touch(key, now)).await
    }

    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError> {
        timed(
            &self.metrics,
            "pending_intents",
            self.inner.pending_intents(),
        )
        .await
    }

    async fn due_for_keeping(
        &self,
        refreshed_before: UnixSeconds,
        active_before: UnixSeconds,
        limit: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError> {
        let due = self
            .inner
            .due_for_keeping(refreshed_before, active_before, limit);
        timed(&self.metrics, "due_for_keeping", due).await
    }

    async fn copy_in(&self, connection: &Connection) -> Result<CopyOutcome, StoreError> {
        timed(&self.metrics, "copy_in", self.inner.copy_in(connection)).await
    }

    async fn key_status(&self) -> Result<KeyStatus, StoreError> {
        timed(&self.metrics, "key_status", self.inner.key_status()).await
    }

    async fn reencrypt_batch(
        &self,
        after: Option<&RotationCursor>,
        limit: u32,
    ) -> Result<ReencryptBatch, StoreError> {
        let batch = self.inner.reencrypt_batch(after, limit);
        timed(&self.metrics, "reencrypt_batch", batch).await
    }

    async fn complete_rotation(&self) -> Result<KeyStatus, StoreError> {
        timed(
            &self.metrics,
            "complete_rotation",
            self.inner.complete_rotation(),
        )
        .await
    }
}

/// A refresh lease whose store operations are timed like the store's.
struct MeteredLease {
    inner: Box<dyn RefreshLease>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl RefreshLease for MeteredLease {
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
        let record = self.inner.record_intent(owner, takeover, now);
        timed(&self.metrics, "record_intent", record).await
    }

    async fn abandon(self: Box<Self>) -> Result<(), StoreError> {
        let Self { inner, metrics } = *self;
        timed(&metrics, "abandon", inner.abandon()).await
    }

    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: UnixSeconds,
    ) -> Result<Connection, StoreError> {
        let Self { inner, metrics } = *self;
        timed(&metrics, "commit_refresh", inner.commit_refresh(grant, now)).await
    }

    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        let Self { inner, metrics } = *self;
        timed(&metrics, "set_status", inner.set_status(status, now)).await
    }

    async fn delete(self: Box<Self>) -> Result<bool, StoreError> {
        let Self { inner, metrics } = *self;
        timed(&metrics, "delete", inner.delete()).await
    }
}
