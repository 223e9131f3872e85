//! Run-time fault injection: added latency, 5xx answers, 429 with `Retry-After`, and lost
//! responses on the token endpoint.
//!
//! Faults are set with `POST /_sim/faults` and cleared with `POST /_sim/reset`. Rates are
//! probabilities in `0.0..=1.0`; tests use `1.0` (always) together with `budget` (fire at most N
//! times) so that "the next request fails, the one after succeeds" is deterministic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::FinxError;

/// The faults the simulator injects; every field defaults to "off".
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Milliseconds added before `/auth/token` answers.
    pub token_latency_ms: u64,
    /// Milliseconds added before data endpoints (`/rest/*` and the Basic data calls) answer.
    pub data_latency_ms: u64,
    /// Share of `/auth/token` requests answered with `error_status` instead of being processed.
    pub token_error_rate: f64,
    /// Share of data requests answered with `error_status`.
    pub data_error_rate: f64,
    /// The 5xx status used by the two error rates; 0 (unset) means 500.
    pub error_status: u16,
    /// Share of `/auth/token` requests answered 429 with `Retry-After` instead of being processed.
    pub token_rate_limit_rate: f64,
    /// Share of data requests answered 429 with `Retry-After`.
    pub data_rate_limit_rate: f64,
    /// The `Retry-After` value in seconds on injected 429 answers; 0 (unset) means 1.
    pub retry_after_secs: u64,
    /// Share of successful `/auth/token` grants whose answer is lost: the grant takes effect
    /// (new tokens become current, a refresh token is rotated), then the connection is closed
    /// without any response.
    pub lost_response_rate: f64,
    /// Milliseconds between a successful `/auth/token` grant taking effect (a refresh token is
    /// rotated at once) and its answer being sent, as a slow network would deliver it: a client
    /// that goes away meanwhile never learns the new tokens.
    pub token_answer_delay_ms: u64,
    /// When set, at most this many faults (errors, 429s, lost responses; not latency) fire in
    /// total; after that the simulator behaves normally until faults are set again.
    pub budget: Option<u64>,
}

/// Which class of endpoint a request belongs to, for fault selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultTarget {
    /// `POST /auth/token`.
    Token,
    /// `/rest/*`, `/category-tree`, `/rpc/categorize`, `/payment-receipts/*`.
    Data,
}

/// The live fault settings, shared by all request handlers.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    /// Lets the hot path skip the lock entirely while no fault is configured.
    active: AtomicBool,
    settings: RwLock<Faults>,
    /// Remaining budget; only consulted when `settings.budget` is set.
    remaining: AtomicU64,
    injected: AtomicU64,
}

impl FaultState {
    /// Replaces the fault settings.
    pub(crate) fn set(&self, faults: Faults) {
        let active = faults != Faults::default();
        self.remaining
            .store(faults.budget.unwrap_or(0), Ordering::Relaxed);
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = faults;
        self.active.store(active, Ordering::Release);
    }

    /// The current fault settings.
    pub(crate) fn get(&self) -> Faults {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many faults (not counting latency) have fired since start-up.
    pub(crate) fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Applies latency, then maybe answers with 429 or 5xx instead of letting the request through.
    pub(crate) async fn before(&self, target: FaultTarget) -> Result<(), FinxError> {
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let faults = self.get();
        let (latency_ms, rate_limit_rate, error_rate) = match target {
            FaultTarget::Token => (
                faults.token_latency_ms,
                faults.token_rate_limit_rate,
                faults.token_error_rate,
            ),
            FaultTarget::Data => (
                faults.data_latency_ms,
                faults.data_rate_limit_rate,
                faults.data_error_rate,
            ),
        };
        if latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
        }
        if self.fires(&faults, rate_limit_rate) {
            let retry_after = if faults.retry_after_secs == 0 {
                1
            } else {
                faults.retry_after_secs
            };
            return Err(FinxError::too_many_requests(retry_after));
        }
        if self.fires(&faults, error_rate) {
            let status = if faults.error_status == 0 {
                500
            } else {
                faults.error_status
            };
            return Err(FinxError::server_error(status));
        }
        Ok(())
    }

    /// How long the answer to a successful grant is held back.
    pub(crate) fn answer_delay(&self) -> Duration {
        if !self.active.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        Duration::from_millis(self.get().token_answer_delay_ms)
    }

    /// Whether the answer to a successful grant is to be lost.
    pub(crate) fn lose_response(&self) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let faults = self.get();
        self.fires(&faults, faults.lost_response_rate)
    }

    /// Draws against `rate` and, when it hits, spends one unit of the budget.
    fn fires(&self, faults: &Faults, rate: f64) -> bool {
        if rate <= 0.0 || !(rate >= 1.0 || rand::rng().random::<f64>() < rate) {
            return false;
        }
        if faults.budget.is_some()
            && self
                .remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    left.checked_sub(1)
                })
                .is_err()
        {
            return false;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        true
    }
}
