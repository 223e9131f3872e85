//! Per-service request rate limiting with governor's GCRA limiter.
//!
//! A direct (un-keyed) governor limiter keeps one atomic "theoretical arrival time" per service:
//! a request costs a clock read and a compare-and-swap, with no lock shared between proxy worker
//! threads and no allocation.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;

use super::{AuthError, Caller};

type DirectLimiter<C> =
    governor::RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// `per_second` requests sustained, up to `burst` at once after an idle spell.
///
/// Generic over the clock only so that tests can move time without sleeping; the gateway uses
/// `std`'s monotonic clock, named explicitly so a governor feature enabled elsewhere cannot swap
/// it.
pub(crate) struct RateLimiter<C: Clock = MonotonicClock> {
    limiter: DirectLimiter<C>,
    quota: Quota,
}

impl RateLimiter {
    /// `per_second` and `burst` are at least 1 (checked at config validation); a 0 counts as 1
    /// rather than panicking.
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let at_least_one = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        Self::with_clock(
            at_least_one(per_second),
            at_least_one(burst),
            MonotonicClock,
        )
    }
}

impl<C: Clock> RateLimiter<C> {
    fn with_clock(per_second: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        RateLimiter {
            limiter: governor::RateLimiter::direct_with_clock(quota, clock),
            quota,
        }
    }

    /// Admits one request now, or returns how long until one would be admitted.
    pub(crate) fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

impl<C: Clock> std::fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

/// `Retry-After` takes whole seconds: round up, and never say 0 to a refused caller.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl Caller {
    /// Counts one request against the service's rate limit, if it has one.
    pub fn check_rate(&self) -> Result<(), AuthError> {
        match &self.policy.rate_limiter {
            None => Ok(()),
            Some(limiter) => limiter.check().map_err(|wait| AuthError::RateLimited {
                retry_after_secs: retry_after_secs(wait),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn nonzero(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn admits_burst_then_refuses_until_refill() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(nonzero(10), nonzero(3), clock.clone());
        for _ in 0..3 {
            assert!(limiter.check().is_ok());
        }
        let wait = limiter.check().unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check().is_ok());
        assert!(limiter.check().is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }
}
