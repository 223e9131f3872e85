//! Per-service request rate limiting (GCRA, lock-free).
//!
//! One atomic "theoretical arrival time" per service keeps the hot path to a compare-and-swap,
//! with no mutex shared between proxy worker threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A generic-cell-rate-algorithm limiter: `per_second` sustained, up to `burst` at once.
pub(crate) struct RateLimiter {
    origin: Instant,
    emission_interval_ns: u64,
    /// How far the theoretical arrival time may run ahead of now: `(burst - 1)` intervals.
    tolerance_ns: u64,
    theoretical_arrival_ns: AtomicU64,
}

impl RateLimiter {
    /// `per_second` and `burst` must be at least 1 (checked at config validation).
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let emission_interval_ns = 1_000_000_000 / u64::from(per_second.max(1));
        RateLimiter {
            origin: Instant::now(),
            emission_interval_ns,
            tolerance_ns: emission_interval_ns.saturating_mul(u64::from(burst.max(1)) - 1),
            theoretical_arrival_ns: AtomicU64::new(0),
        }
    }

    /// Admits one request at `now`, or returns how long until one would be admitted.
    pub(crate) fn check_at(&self, now: Instant) -> Result<(), Duration> {
        let now_ns = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let mut current = self.theoretical_arrival_ns.load(Ordering::Relaxed);
        loop {
            let start = current.max(now_ns);
            let allowed_at = start.saturating_sub(self.tolerance_ns);
            if allowed_at > now_ns {
                return Err(Duration::from_nanos(allowed_at - now_ns));
            }
            let next = start.saturating_add(self.emission_interval_ns);
            match self.theoretical_arrival_ns.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("emission_interval_ns", &self.emission_interval_ns)
            .field("tolerance_ns", &self.tolerance_ns)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_burst_then_refuses_until_refill() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(t0).is_ok());
        }
        let wait = limiter.check_at(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        assert!(limiter.check_at(t0 + Duration::from_millis(100)).is_ok());
        assert!(limiter.check_at(t0 + Duration::from_millis(100)).is_err());
    }
}
