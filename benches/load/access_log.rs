//! The gateway's own time per request, read from its access lines: the bench installs the
//! product's logging (JSON at `info`, through the background writer) with a file as output,
//! exactly as `serve` logs to stderr, so the gateway measured also pays for its access log.
//!
//! Each access line carries `total_ms` (request header read → logging) and `upstream_ms`
//! (upstream peer chosen → logging); their difference is the time the gateway spent before
//! handing the request to finX: caller check, routing, connection key and credential.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use finx_gateway::telemetry::{LogFormat, LogGuard, TelemetrySettings};
use serde::Serialize;

use crate::generator::{percentile, KeptConnection};

/// The access log file and how far it has been read.
pub struct AccessLog {
    path: PathBuf,
    read_to: u64,
    markers: u64,
    _writer: LogGuard,
}

/// The gateway's time outside upstream I/O over one run's user-data requests.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Overhead {
    pub lines: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl AccessLog {
    /// Installs the product's JSON logging at `info`, writing to `path`.
    pub fn install(path: PathBuf) -> Result<Self, String> {
        let file = std::fs::File::create(&path).map_err(|e| format!("access log: {e}"))?;
        let settings = TelemetrySettings {
            format: LogFormat::Json,
            level: "info".into(),
        };
        let writer = finx_gateway::telemetry::init_to(&settings, file, false);
        Ok(Self {
            path,
            read_to: 0,
            markers: 0,
            _writer: writer,
        })
    }

    /// Skips everything logged so far: the next [`Self::overhead`] covers only what follows.
    /// Waits for a marker request's line, so that nothing earlier is still on its way.
    pub fn skip(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        gateway: SocketAddr,
    ) -> Result<(), String> {
        self.read_until_marker(runtime, gateway).map(|_| ())
    }

    /// The overhead of the user-data requests logged since the last call: sends a marker
    /// request (`/healthz` with its own request id) and reads up to its line.
    pub fn overhead(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        gateway: SocketAddr,
    ) -> Result<Overhead, String> {
        let mut micros: Vec<u32> = self
            .read_until_marker(runtime, gateway)?
            .iter()
            .filter_map(|line| overhead_us(line))
            .collect();
        micros.sort_unstable();
        Ok(Overhead {
            lines: micros.len(),
            p50_us: percentile(&micros, 50.0),
            p99_us: percentile(&micros, 99.0),
        })
    }

    fn read_until_marker(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        gateway: SocketAddr,
    ) -> Result<Vec<String>, String> {
        self.markers += 1;
        let marker = format!("bench-marker-{}", self.markers);
        runtime.block_on(async {
            let mut connection = KeptConnection::open(gateway).await?;
            let request = http::Request::get("/healthz")
                .header(http::header::HOST, "127.0.0.1")
                .header("x-request-id", marker.as_str())
                .body(http_body_util::Empty::new())
                .map_err(|e| e.to_string())?;
            connection.send(request).await.map(|_| ())
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        let mut file = std::fs::File::open(&self.path).map_err(|e| e.to_string())?;
        loop {
            file.seek(SeekFrom::Start(self.read_to))
                .map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(&mut file);
            let mut line = String::new();
            // Only whole lines are consumed; a partly written last line is read again later.
            while reader.read_line(&mut line).map_err(|e| e.to_string())? > 0
                && line.ends_with('\n')
            {
                self.read_to += line.len() as u64;
                if line.contains(&marker) {
                    return Ok(lines);
                }
                lines.push(std::mem::take(&mut line));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the access line of {marker} did not appear within 30 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `total_ms − upstream_ms` of a user-data access line, in µs.
fn overhead_us(line: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("target")?.as_str()? != "finx_gateway::access" {
        return None;
    }
    let fields = value.get("fields")?;
    if fields.get("route")?.as_str()? != "user_data" {
        return None;
    }
    let total = fields.get("total_ms")?.as_f64()?;
    let upstream = fields.get("upstream_ms")?.as_f64()?;
    Some(((total - upstream).max(0.0) * 1e3) as u32)
}
