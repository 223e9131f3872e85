//! Logging: `tracing` with pretty or JSON output; pingora's `log` records are bridged in.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber writing to stderr. Safe to call more than once (later calls
/// are ignored).
pub fn init(config: &TelemetryConfig) {
    init_with_writer(config.format, &config.level, std::io::stderr);
}

/// Installs the global subscriber with a writer of the caller's choice (tests capture logs).
pub fn init_with_writer<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // `try_init` also installs the `log` → `tracing` bridge for pingora's records.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
