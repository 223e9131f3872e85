//! The keeper: refreshes connections before finX lets them lapse. finX revokes a grant whose
//! refresh token is not renewed within 90 days or that sees no activity for 90 days, so a
//! connection nobody calls would otherwise die silently.
//!
//! Each pass asks the store for active connections whose refresh token is older than
//! `max_refresh_age` or whose last activity (data call, refresh, consent) is older than
//! `max_idle`, and refreshes them through the manager's ordinary procedure: the same
//! per-connection lock and, on a shared store, the same row lock, so when several replicas keep
//! at once each connection is refreshed by one of them and found "no longer due" by the rest.
//! Passes are spread by jitter; refreshes run at most `concurrency` at a time and at most
//! `rate_per_sec` per second towards finX. `reauth_required` and revoked connections are never
//! touched. Failures are logged per connection and counted.
//!
//! After its refreshes, each pass lists the connections (metadata only) and announces those
//! still within `[events] near_lapse_days` of lapsing (a `near_lapse` event, once per
//! refresh-token issue): the ones the keeper could not refresh in time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{TokenError, TokenManager};

/// `[keeper]`.
#[derive(Debug, Clone)]
pub struct KeeperSettings {
    /// Time between passes (each jittered by up to ±10 %).
    pub interval: Duration,
    /// Refresh a connection whose refresh token is older than this.
    pub max_refresh_age: Duration,
    /// Refresh a connection with no activity for this long.
    pub max_idle: Duration,
    /// Refreshes in flight at once.
    pub concurrency: usize,
    /// Refreshes started per second at most.
    pub rate_per_sec: u32,
    /// Connections looked at per pass at most.
    pub batch: u32,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperReport {
    /// Connections the store reported due.
    pub due: usize,
    /// Of those, refreshed by this pass.
    pub refreshed: usize,
    /// Refreshed meanwhile by someone else (another replica, a request).
    pub not_due: usize,
    /// Could not be refreshed (logged one by one).
    pub failed: usize,
    /// Connections announced as near lapse by this pass (not those announced before).
    pub near_lapse: usize,
}

/// See the module docs.
pub struct Keeper {
    manager: TokenManager,
    settings: KeeperSettings,
    passes: AtomicU64,
    failures: AtomicU64,
}

impl Keeper {
    pub(super) fn new(manager: TokenManager, settings: KeeperSettings) -> Self {
        Self {
            manager,
            settings,
            passes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Runs passes every `interval` on the manager's runtime until it shuts down. The loop
    /// itself is not waited for at shutdown; each refresh it starts is.
    pub fn start(self: &Arc<Self>) {
        let keeper = self.clone();
        let inner = self.manager.inner.clone();
        inner.worker.handle.spawn(async move {
            loop {
                let jitter = rand::rng().random_range(0.9..1.1);
                let pause = keeper.settings.interval.mul_f64(jitter);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = keeper.manager.inner.worker.tracker_closed() => return,
                }
                keeper.run_once().await;
            }
        });
    }

    /// One pass over the connections due now.
    pub async fn run_once(&self) -> KeeperReport {
        let inner = &self.manager.inner;
        let now = inner.clock.now();
        let refreshed_before = now - self.settings.max_refresh_age.as_secs() as i64;
        let active_before = now - self.settings.max_idle.as_secs() as i64;
        let mut report = KeeperReport::default();
        let due = match inner
            .store
            .due_for_keeping(refreshed_before, active_before, self.settings.batch)
            .await
        {
            Ok(due) => due,
            Err(error) => {
                tracing::error!(%error, "keeper: the store could not list connections due");
                self.passes.fetch_add(1, Ordering::Relaxed);
                return report;
            }
        };
        report.due = due.len();
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut pacing = tokio::time::interval(Duration::from_secs_f64(
            1.0 / f64::from(self.settings.rate_per_sec.max(1)),
        ));
        pacing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running = JoinSet::new();
        for key in due {
            pacing.tick().await;
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            if inner.worker.closing.is_cancelled() {
                break;
            }
            let task_inner = inner.clone();
            running.spawn(inner.worker.tracker.track_future(async move {
                let _permit = permit;
                let outcome = task_inner.keep(&key, refreshed_before, active_before).await;
                (key, outcome)
            }));
        }
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok((_, Ok(true))) => report.refreshed += 1,
                Ok((_, Ok(false))) => report.not_due += 1,
                Ok((key, Err(error))) => {
                    report.failed += 1;
                    let level_error = !matches!(error, TokenError::ReauthRequired);
                    if level_error {
                        tracing::warn!(connection = %key, %error, "keeper: could not refresh a connection before it lapses");
                    } else {
                        tracing::warn!(connection = %key, "keeper: finX declared the grant dead; the user must consent again");
                    }
                }
                Err(_) => report.failed += 1,
            }
        }
        report.near_lapse = self.announce_near_lapse().await;
        self.failures
            .fetch_add(report.failed as u64, Ordering::Relaxed);
        self.passes.fetch_add(1, Ordering::Relaxed);
        inner
            .memory
            .prune(now, inner.settings.forced_refresh_interval.as_secs() as i64);
        if report.due > 0 || report.near_lapse > 0 {
            tracing::info!(
                due = report.due,
                refreshed = report.refreshed,
                not_due = report.not_due,
                failed = report.failed,
                near_lapse = report.near_lapse,
                "keeper pass"
            );
        }
        report
    }

    /// Announces the connections near lapse after this pass's refreshes; how many were new.
    async fn announce_near_lapse(&self) -> usize {
        let inner = &self.manager.inner;
        match inner.store.list().await {
            Ok(connections) => inner
                .settings
                .events
                .check_near_lapse(&connections, inner.clock.now()),
            Err(error) => {
                tracing::warn!(%error, "keeper: connections near lapse not checked: the store cannot be listed");
                0
            }
        }
    }

    /// Passes completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Connections the keeper failed to refresh, over all passes.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}
