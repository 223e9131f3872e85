//! Logging: `tracing` with pretty or JSON output; pingora's `log` records are bridged in.
//!
//! Whatever level an operator configures, TRACE records of other crates are dropped: pingora
//! prints whole request headers (the caller's credentials among them) at TRACE, and no filter
//! setting may turn that on by accident.

use tracing::{Level, Metadata};
pub use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber writing to stderr from a background thread, so no request
/// waits on log I/O. Keep the returned guard alive: dropping it flushes and stops the writer.
/// Safe to call more than once (later calls are ignored).
#[must_use = "dropping the guard stops the log writer"]
pub fn init(config: &TelemetryConfig) -> WorkerGuard {
    // Lossless: under overload requests wait for the writer rather than drop audit lines.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    init_with_writer(config.format, &config.level, writer);
    guard
}

/// Whether a record may be written at all: ours at any level, other crates' up to DEBUG.
fn may_carry_no_secret(metadata: &Metadata<'_>) -> bool {
    *metadata.level() < Level::TRACE || metadata.target().starts_with("finx_gateway")
}

/// Installs the global subscriber with a writer of the caller's choice (tests capture logs).
pub fn init_with_writer<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let env_filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = env_filter.and(filter_fn(may_carry_no_secret));
    let layer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    // `try_init` also installs the `log` → `tracing` bridge for pingora's records.
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_trace_records_are_dropped() {
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        struct Callsite;
        impl tracing::callsite::Callsite for Callsite {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        static CALLSITE: Callsite = Callsite;
        let meta = |target: &'static str, level: Level| {
            Metadata::new(
                "event",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CALLSITE)),
                Kind::EVENT,
            )
        };
        assert!(!may_carry_no_secret(&meta("pingora_proxy", Level::TRACE)));
        assert!(may_carry_no_secret(&meta("pingora_proxy", Level::DEBUG)));
        assert!(may_carry_no_secret(&meta(
            "finx_gateway::tokens",
            Level::TRACE
        )));
    }
}
