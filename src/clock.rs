//! Wall-clock abstraction, so tests can move token expiry forward without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as the gateway sees them.
pub type UnixSeconds = i64;

/// The gateway's notion of "now". Production uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// Current time in whole seconds since the Unix epoch.
    fn now(&self) -> UnixSeconds;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixSeconds {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// Wall clock plus an offset that tests advance.
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    offset: Arc<AtomicI64>,
}

impl ManualClock {
    /// Moves this clock (and every clone of it) forward by `seconds`.
    pub fn advance(&self, seconds: i64) {
        self.offset.fetch_add(seconds, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixSeconds {
        SystemClock.now() + self.offset.load(Ordering::Relaxed)
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) for a unix time, for people (the status page, the CLI's tables).
pub fn format_utc(at: UnixSeconds) -> String {
    const DAY_SECS: i64 = 24 * 3600;
    let days = at.div_euclid(DAY_SECS);
    let secs = at.rem_euclid(DAY_SECS);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn format_utc_renders_known_times() {
        assert_eq!(format_utc(0), "1970-01-01 00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(format_utc(-86_400), "1969-12-31 00:00");
    }
}
