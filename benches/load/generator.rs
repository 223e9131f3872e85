//! HTTP/1.1 keep-alive load: `wrk` with a generated Lua script when it is installed, otherwise
//! a built-in generator (hyper client, a fixed number of connections, closed loop). Both pick a
//! uniformly random user per request and send the same headers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpStream;

/// The data route every load request asks for.
pub const LOAD_PATH: &str = "/rest/accounts";

/// What a target must be sent: one user per request, with either the caller JWT (gateway,
/// nginx) or that user's finX access token (direct, passthrough).
pub struct Workload {
    pub users: Arc<Vec<String>>,
    /// One `Authorization` value for every user, or one per user.
    pub authorization: Authorization,
}

pub enum Authorization {
    Caller(String),
    PerUser(Arc<Vec<String>>),
}

impl Workload {
    fn authorization(&self, user: usize) -> &str {
        match &self.authorization {
            Authorization::Caller(bearer) => bearer,
            Authorization::PerUser(bearers) => &bearers[user],
        }
    }

    /// `GET /rest/accounts` for user number `user`.
    pub fn request(&self, user: usize) -> Request<Empty<Bytes>> {
        Request::get(LOAD_PATH)
            .header(http::header::HOST, "127.0.0.1")
            .header(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(self.authorization(user)).expect("header-safe token"),
            )
            .header("x-finx-user", self.users[user].as_str())
            .body(Empty::new())
            .expect("valid request")
    }

    /// A wrk script sending this workload and printing one `FINX_RESULT` line at the end.
    fn lua_script(&self) -> String {
        let mut lua = String::from("local users = {\n");
        for user in self.users.iter() {
            let _ = writeln!(lua, "  \"{user}\",");
        }
        lua.push_str("}\nlocal bearers = {\n");
        match &self.authorization {
            Authorization::Caller(bearer) => {
                let _ = writeln!(lua, "  \"{bearer}\",");
            }
            Authorization::PerUser(bearers) => {
                for bearer in bearers.iter() {
                    let _ = writeln!(lua, "  \"{bearer}\",");
                }
            }
        }
        let per_user = matches!(self.authorization, Authorization::PerUser(_));
        let _ = write!(
            lua,
            r#"}}
local n = #users
local per_user = {per_user}
function init(args)
  math.randomseed(os.time())
end
function request()
  local i = math.random(n)
  local bearer = per_user and bearers[i] or bearers[1]
  return wrk.format("GET", "{LOAD_PATH}", {{ ["Authorization"] = bearer, ["X-Finx-User"] = users[i] }})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FINX_RESULT %d %d %d %d %.0f %.0f %.0f\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#
        );
        lua
    }
}

/// One measured run against one target.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// wrk: responses with status ≥ 400; built-in: every status outside 2xx.
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// The target's own CPU time over the run ÷ the requests it answered, µs (see `cpu.rs`).
    pub cpu_us_per_request: Option<f64>,
    /// The gateway's time outside upstream I/O (see `access_log.rs`), p50 and p99, µs.
    pub overhead_p50_us: Option<f64>,
    pub overhead_p99_us: Option<f64>,
}

/// Which load generator runs.
pub enum Generator {
    Wrk(PathBuf),
    Builtin,
}

impl Generator {
    /// `wrk` when found on `PATH`, else the built-in generator.
    pub fn detect() -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("wrk"))
            .find(|candidate| candidate.is_file())
            .map_or(Self::Builtin, Self::Wrk)
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Wrk(path) => format!(
                "wrk ({}), 1 thread, Lua request() per request (random user, caller JWT or finX token + X-Finx-User); non-2xx = wrk's status errors (≥ 400)",
                path.display()
            ),
            Self::Builtin => "built-in generator (wrk not installed): hyper HTTP/1.1 client, fixed keep-alive connections, closed loop; non-2xx = any status outside 2xx".into(),
        }
    }

    /// Writes the wrk script for `workload` into `dir` (nothing for the built-in generator).
    pub fn prepare(&self, workload: &Workload, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        let script = dir.join(format!("{name}.lua"));
        if matches!(self, Self::Wrk(_)) {
            std::fs::write(&script, workload.lua_script())?;
        }
        Ok(script)
    }

    /// Drives `target` with `connections` keep-alive connections for `seconds`.
    pub fn run(
        &self,
        runtime: &tokio::runtime::Runtime,
        target: SocketAddr,
        workload: &Arc<Workload>,
        script: &Path,
        connections: usize,
        seconds: u64,
    ) -> Result<RunResult, String> {
        match self {
            Self::Wrk(wrk) => run_wrk(wrk, target, script, connections, seconds),
            Self::Builtin => {
                let samples = runtime.block_on(closed_loop(
                    target,
                    workload.clone(),
                    connections,
                    Duration::from_secs(seconds),
                ));
                Ok(samples.summary())
            }
        }
    }

    /// Drives several targets at the same time for `seconds`: one wrk process per run (each on
    /// a thread of its own, all started together), or one built-in closed loop per run on
    /// `runtime`. Results are in the order of `runs`.
    pub fn run_many(
        &self,
        runtime: &tokio::runtime::Runtime,
        runs: &[ConcurrentRun<'_>],
        seconds: u64,
    ) -> Result<Vec<RunResult>, String> {
        match self {
            Self::Wrk(wrk) => std::thread::scope(|scope| {
                let handles: Vec<_> = runs
                    .iter()
                    .map(|run| {
                        scope.spawn(move || {
                            run_wrk(wrk, run.target, run.script, run.connections, seconds)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|handle| {
                        handle
                            .join()
                            .map_err(|_| "wrk thread panicked".to_owned())?
                    })
                    .collect()
            }),
            Self::Builtin => {
                let all = runtime.block_on(futures::future::join_all(runs.iter().map(|run| {
                    closed_loop(
                        run.target,
                        run.workload.clone(),
                        run.connections,
                        Duration::from_secs(seconds),
                    )
                })));
                Ok(all.into_iter().map(Samples::summary).collect())
            }
        }
    }
}

/// One of the runs [`Generator::run_many`] drives at the same time.
pub struct ConcurrentRun<'a> {
    pub target: SocketAddr,
    pub workload: &'a Arc<Workload>,
    pub script: &'a Path,
    pub connections: usize,
}

fn run_wrk(
    wrk: &Path,
    target: SocketAddr,
    script: &Path,
    connections: usize,
    seconds: u64,
) -> Result<RunResult, String> {
    let output = Command::new(wrk)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--timeout", "10s", "-s"])
        .arg(script)
        .arg(format!("http://{target}{LOAD_PATH}"))
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("FINX_RESULT "))
        .ok_or_else(|| {
            format!(
                "wrk printed no result ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(f64::NAN))
        .collect();
    let [requests, duration_us, status_errors, socket_errors, p50, p99, p999] = fields[..] else {
        return Err(format!("unexpected wrk result line: {line}"));
    };
    Ok(RunResult {
        requests: requests as u64,
        requests_per_sec: requests / (duration_us / 1e6),
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        non_2xx: status_errors as u64,
        socket_errors: socket_errors as u64,
        cpu_us_per_request: None,
        overhead_p50_us: None,
        overhead_p99_us: None,
    })
}

/// Latencies and failures collected by the built-in generator.
#[derive(Default)]
pub struct Samples {
    /// Microseconds per completed request.
    pub latencies_us: Vec<u32>,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub elapsed: Duration,
}

impl Samples {
    pub fn merge(&mut self, other: Samples) {
        self.latencies_us.extend(other.latencies_us);
        self.non_2xx += other.non_2xx;
        self.socket_errors += other.socket_errors;
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    pub fn summary(mut self) -> RunResult {
        self.latencies_us.sort_unstable();
        let requests = self.latencies_us.len() as u64;
        RunResult {
            requests,
            requests_per_sec: requests as f64 / self.elapsed.as_secs_f64().max(1e-9),
            p50_us: percentile(&self.latencies_us, 50.0),
            p99_us: percentile(&self.latencies_us, 99.0),
            p999_us: percentile(&self.latencies_us, 99.9),
            non_2xx: self.non_2xx,
            socket_errors: self.socket_errors,
            cpu_us_per_request: None,
            overhead_p50_us: None,
            overhead_p99_us: None,
        }
    }
}

/// The `p`-th percentile of sorted microsecond samples (nearest rank).
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A keep-alive HTTP/1.1 connection of the built-in generator.
pub struct KeptConnection {
    sender: SendRequest<Empty<Bytes>>,
}

impl KeptConnection {
    pub async fn open(target: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// Sends `request`, reads the whole response and returns its status and latency.
    pub async fn send(
        &mut self,
        request: Request<Empty<Bytes>>,
    ) -> Result<(u16, Duration), String> {
        let started = Instant::now();
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, started.elapsed()))
    }
}

fn record(samples: &mut Samples, outcome: Result<(u16, Duration), String>) -> bool {
    match outcome {
        Ok((status, latency)) => {
            if !(200..300).contains(&status) {
                samples.non_2xx += 1;
            }
            samples
                .latencies_us
                .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
            true
        }
        Err(_) => {
            samples.socket_errors += 1;
            false
        }
    }
}

/// `connections` connections each sending random-user requests back to back for `duration`.
pub async fn closed_loop(
    target: SocketAddr,
    workload: Arc<Workload>,
    connections: usize,
    duration: Duration,
) -> Samples {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let workload = workload.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut connection = None;
                while Instant::now() < deadline {
                    let kept = match connection.as_mut() {
                        Some(kept) => kept,
                        None => match KeptConnection::open(target).await {
                            Ok(kept) => connection.insert(kept),
                            Err(_) => {
                                samples.socket_errors += 1;
                                continue;
                            }
                        },
                    };
                    let user = rand::rng().random_range(0..workload.users.len());
                    if !record(&mut samples, kept.send(workload.request(user)).await) {
                        connection = None;
                    }
                }
                samples
            })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        all.merge(task.await.unwrap_or_default());
    }
    all.elapsed = started.elapsed();
    all
}

/// Sends one request for every user (in order, over `connections` connections): warms a cache.
pub async fn each_user_once(
    target: SocketAddr,
    workload: Arc<Workload>,
    connections: usize,
) -> Samples {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (workload, next) = (workload.clone(), next.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let Ok(mut connection) = KeptConnection::open(target).await else {
                    samples.socket_errors += 1;
                    return samples;
                };
                loop {
                    let user = next.fetch_add(1, Ordering::Relaxed);
                    if user >= workload.users.len() {
                        return samples;
                    }
                    if !record(&mut samples, connection.send(workload.request(user)).await) {
                        match KeptConnection::open(target).await {
                            Ok(fresh) => connection = fresh,
                            Err(_) => return samples,
                        }
                    }
                }
            })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        all.merge(task.await.unwrap_or_default());
    }
    all.elapsed = started.elapsed();
    all
}

/// One connection's share of a storm: once `go` turns `true`, sends requests `first`,
/// `first + stride`, … below `count` (request n is for user `n / per_user`), stopping at the
/// first failure; returns every outcome.
pub fn spawn_wave(
    mut connection: KeptConnection,
    first: usize,
    count: usize,
    stride: usize,
    per_user: usize,
    workload: Arc<Workload>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Result<(u16, Duration), String>>> {
    tokio::spawn(async move {
        let _ = go.wait_for(|go| *go).await;
        let mut outcomes = Vec::new();
        for request in (first..count).step_by(stride) {
            let sent = connection.send(workload.request(request / per_user)).await;
            let failed = sent.is_err();
            outcomes.push(sent);
            if failed {
                break;
            }
        }
        outcomes
    })
}
