//! Logging: `tracing` with pretty or JSON output; pingora's `log` records are bridged in.
//!
//! Whatever level an operator configures, no dependency record may carry raw request bytes:
//! TRACE records of other crates are dropped (pingora prints whole request headers, the
//! caller's credentials among them, at TRACE), and so are pingora's DEBUG records (a request it
//! cannot parse is logged at DEBUG with up to 2 KiB of its raw header bytes: a caller JWT, a
//! callback's `code`). pingora is the one dependency that reads caller bytes; its INFO and
//! above describe the server, not requests. No filter setting may turn any of it on.

mod json;
mod writer;

use std::sync::OnceLock;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};
pub use writer::LogGuard;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    /// A `tracing` env-filter directive, e.g. `info` or `finx_gateway=debug,info`.
    pub level: String,
}

/// Installs the global subscriber writing to stderr from a background thread, so no request
/// waits on log I/O. Keep the returned guard alive: dropping it flushes and stops the writer.
/// Safe to call more than once (later calls are ignored).
#[must_use = "dropping the guard stops the log writer"]
pub fn init(config: &TelemetrySettings) -> LogGuard {
    init_to(config, std::io::stderr(), colours_on_stderr())
}

/// As [`init`], writing to `output` instead of stderr (the load bench sends the gateway's
/// access log to a file it reads back). The writer thread is `finx-log-writer`; lines are
/// written in batches, at most [`writer::BATCH_INTERVAL`] after they were logged, and never
/// dropped (under overload requests wait for the writer rather than lose audit lines).
#[must_use = "dropping the guard stops the log writer"]
pub fn init_to(
    config: &TelemetrySettings,
    output: impl std::io::Write + Send + 'static,
    colours: bool,
) -> LogGuard {
    match writer::spawn(output) {
        Ok((writer, guard)) => {
            install(config.format, &config.level, writer, colours);
            guard
        }
        // Without a thread of its own, logging still works: written on the logging thread.
        Err(_) => {
            install(config.format, &config.level, std::io::stderr, colours);
            LogGuard::direct()
        }
    }
}

/// Colours only for a person: stderr is a terminal and `NO_COLOR` is unset (or empty).
fn colours_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// The handle that changes the level filter of the installed subscriber (a reload).
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Changes the log level filter of the running process (`telemetry.level` on a reload).
/// `RUST_LOG`, when set, still wins: the operator's environment outranks the file.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set; it decides the level".into());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let log_level = log_max_level(&filter);
    LEVEL
        .get()
        .ok_or_else(|| "logging is not initialised".to_owned())?
        .reload(filter)
        .map_err(|e| e.to_string())?;
    log::set_max_level(log_level);
    Ok(())
}

/// The most verbose `log` record worth building under `filter`: what the filter may let
/// through, but never TRACE, which [`may_carry_no_secret`] drops for every dependency. The
/// `log` macros check this level before they format anything, so pingora's per-request
/// debug and trace records cost nothing below the configured level; without it the bridge
/// would accept (format, then filter out) every record.
fn log_max_level(filter: &EnvFilter) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match filter
        .max_level_hint()
        .unwrap_or(LevelFilter::TRACE)
        .min(LevelFilter::DEBUG)
    {
        LevelFilter::OFF => log::LevelFilter::Off,
        LevelFilter::ERROR => log::LevelFilter::Error,
        LevelFilter::WARN => log::LevelFilter::Warn,
        LevelFilter::INFO => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    }
}

/// Whether a record may be written at all: ours at any level, pingora's from INFO up, other
/// crates' up to DEBUG.
fn may_carry_no_secret(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    if target.starts_with("finx_gateway") {
        return true;
    }
    if target.starts_with("pingora") {
        return *metadata.level() <= Level::INFO;
    }
    *metadata.level() < Level::TRACE
}

/// Installs the global subscriber with a writer of the caller's choice (tests capture logs),
/// without colours.
pub fn init_with_writer<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    install(format, level, writer, false);
}

fn install<W>(format: LogFormat, level: &str, writer: W, colours: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let env_filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let log_level = log_max_level(&env_filter);
    let (env_filter, handle) = reload::Layer::new(env_filter);
    let filter = env_filter.and(filter_fn(may_carry_no_secret));
    let layer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(colours)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(json::JsonLines)
            .with_ansi(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    // `try_init` also installs the `log` → `tracing` bridge for pingora's records, at the
    // subscriber's level hint, which the secret filter (no hint) widens to TRACE: narrowed
    // again right after.
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        log::set_max_level(log_level);
        let _ = LEVEL.set(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_below_the_configured_level_are_never_built() {
        let level = |directive: &str| log_max_level(&EnvFilter::new(directive));
        assert_eq!(level("info"), log::LevelFilter::Info);
        assert_eq!(level("warn"), log::LevelFilter::Warn);
        assert_eq!(level("off"), log::LevelFilter::Off);
        assert_eq!(level("pingora_core=info,error"), log::LevelFilter::Info);
        // TRACE records of dependencies are dropped whatever the filter says.
        assert_eq!(level("trace"), log::LevelFilter::Debug);
        assert_eq!(level("finx_gateway=trace,info"), log::LevelFilter::Debug);
    }

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
        assert!(!may_carry_no_secret(&meta("pingora_proxy", Level::DEBUG)));
        assert!(!may_carry_no_secret(&meta(
            "pingora_core::protocols::http::v1::server",
            Level::DEBUG
        )));
        assert!(may_carry_no_secret(&meta("pingora_proxy", Level::INFO)));
        assert!(may_carry_no_secret(&meta("pingora_proxy", Level::ERROR)));
        assert!(!may_carry_no_secret(&meta(
            "reqwest::connect",
            Level::TRACE
        )));
        assert!(may_carry_no_secret(&meta("reqwest::connect", Level::DEBUG)));
        assert!(may_carry_no_secret(&meta(
            "finx_gateway::tokens",
            Level::TRACE
        )));
    }
}
