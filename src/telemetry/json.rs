//! The JSON log line: `{"timestamp":…,"level":…,"fields":{…},"target":…}`, the layout of
//! `tracing-subscriber`'s JSON format, serialised in one pass into a reused buffer and handed
//! to the output in one write.
//!
//! Why not `tracing-subscriber`'s own JSON format: it drives `serde_json` through an
//! `io::Write` adaptor over a `fmt::Write` string, so every key, quote and comma is a separate
//! write that is checked as UTF-8 again; on the gateway's access line that was most of the
//! cost of logging. Records bridged from `log` (pingora's) are shown under their own target
//! and level, with the bridge's `log.*` fields, as there. One difference: the `span` and
//! `spans` keys are not written (the gateway opens no spans; a dependency's DEBUG line inside
//! one of its own spans loses that context).
//!
//! A leaf of `telemetry`: it depends on nothing else in the crate.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as one JSON line.
pub struct JsonLines;

/// A line longer than this does not keep its buffer for the next one.
const KEPT_BUFFER_BYTES: usize = 16 * 1024;

thread_local! {
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|line| {
            // A line logged while formatting this one (never expected) gets a buffer of its own.
            let mut fresh = Vec::new();
            let mut borrowed = line.try_borrow_mut();
            let buffer = match borrowed.as_deref_mut() {
                Ok(buffer) => buffer,
                Err(_) => &mut fresh,
            };
            buffer.clear();
            serialize(event, &mut *buffer).map_err(|_| fmt::Error)?;
            buffer.push(b'\n');
            let written = writer.write_str(std::str::from_utf8(buffer).map_err(|_| fmt::Error)?);
            if buffer.capacity() > KEPT_BUFFER_BYTES {
                *buffer = Vec::new();
            }
            written
        })
    }
}

/// The whole line, without its newline.
fn serialize(event: &Event<'_>, output: &mut Vec<u8>) -> serde_json::Result<()> {
    let normalized = event.normalized_metadata();
    let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
    let mut serializer = serde_json::Serializer::new(output);
    let mut line = serializer.serialize_map(Some(4))?;
    line.serialize_entry("timestamp", &Timestamp)?;
    line.serialize_entry("level", metadata.level().as_str())?;
    line.serialize_entry("fields", &Fields(event))?;
    line.serialize_entry("target", metadata.target())?;
    line.end()
}

/// Now, as RFC 3339 in UTC with microseconds (as `tracing-subscriber` prints it).
struct Timestamp;

/// The last second RFC 3339 can show (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A clock set outside what RFC 3339 can show is clamped, never a panic or a lost line.
        let now = SystemTime::now().clamp(
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_secs(LAST_RFC3339_SECOND),
        );
        serializer.collect_str(&humantime::format_rfc3339_micros(now))
    }
}

/// The event's fields as a JSON object.
struct Fields<'a>(&'a Event<'a>);

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut visitor = FieldVisitor {
            map: serializer.serialize_map(None)?,
            error: None,
        };
        self.0.record(&mut visitor);
        match visitor.error {
            Some(error) => Err(error),
            None => visitor.map.end(),
        }
    }
}

/// Writes each field into the map; keeps the first error.
struct FieldVisitor<M: SerializeMap> {
    map: M,
    error: Option<M::Error>,
}

impl<M: SerializeMap> FieldVisitor<M> {
    fn entry<V: Serialize + ?Sized>(&mut self, field: &Field, value: &V) {
        if self.error.is_some() {
            return;
        }
        if let Err(error) = self.map.serialize_entry(field.name(), value) {
            self.error = Some(error);
        }
    }
}

impl<M: SerializeMap> Visit for FieldVisitor<M> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &Debugged(value));
    }
}

/// A `Debug` value (and a `%` one), printed as a string, as `tracing-subscriber` does.
struct Debugged<'a>(&'a dyn fmt::Debug);

impl Serialize for Debugged<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:?}", self.0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Formats the events `emit` logs, one parsed line each.
    fn lines(emit: impl FnOnce()) -> Vec<Value> {
        let output = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = output.clone();
        let layer = tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(move || Sink(sink.clone()));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(output.lock().expect("not poisoned").clone()).expect("UTF-8");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_is_one_line_with_the_layout_of_tracing_subscribers_json() {
        let lines = lines(|| {
            tracing::info!(
                target: "finx_gateway::access",
                route = "user_data",
                status = 200u16,
                total_ms = 0.25,
                offset = -3i64,
                replayed = false,
                method = %http::Method::GET,
                "done"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "finx_gateway::access");
        assert_eq!(
            line["fields"],
            json!({"message": "done", "route": "user_data", "status": 200, "total_ms": 0.25,
                   "offset": -3, "replayed": false, "method": "GET"})
        );
        let timestamp = line["timestamp"].as_str().expect("a string");
        humantime::parse_rfc3339(timestamp).expect("RFC 3339");
        assert!(timestamp.ends_with('Z') && timestamp.len() == "2026-12-07T23:48:53.123456Z".len());
    }

    #[test]
    fn strings_are_escaped() {
        let nasty = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é ✓";
        let lines = lines(|| tracing::warn!(value = nasty, debugged = ?nasty));
        assert_eq!(lines[0]["fields"]["value"], nasty);
        assert_eq!(lines[0]["fields"]["debugged"], format!("{nasty:?}"));
    }

    #[test]
    fn records_from_the_log_crate_keep_their_target_level_and_source() {
        let lines = lines(|| {
            let record = log::Record::builder()
                .target("pingora_core::server")
                .level(log::Level::Warn)
                .file(Some("src/server/mod.rs"))
                .line(Some(42))
                .args(format_args!("listener closed"))
                .build();
            tracing_log::format_trace(&record).expect("bridged");
        });
        assert_eq!(lines[0]["target"], "pingora_core::server");
        assert_eq!(lines[0]["level"], "WARN");
        let fields = &lines[0]["fields"];
        assert_eq!(fields["message"], "listener closed");
        assert_eq!(fields["log.target"], "pingora_core::server");
        assert_eq!(fields["log.file"], "src/server/mod.rs");
        assert_eq!(fields["log.line"], 42);
    }
}
