//! Throughput of the simulator's hot path, `GET /rest/accounts` with a valid Bearer token.
//!
//! The simulator runs as in tests ([`finx_gateway::sim::spawn`]: one thread, a single-threaded
//! tokio runtime, so one core). A load generator on another thread keeps `CONNECTIONS` keep-alive
//! HTTP/1.1 connections busy (one request in flight each, no pipelining) with a minimal raw-socket
//! client, so the client costs as little CPU as possible on this 2-core machine.
//!
//! Run: `cargo bench --bench sim_throughput` (about 10 s). Prints requests/s.

use std::time::{Duration, Instant};

use finx_gateway::sim::{self, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 64;
const USERS: usize = 64;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(8);

fn main() {
    let handle = sim::spawn(SimConfig::default().with_control()).expect("simulator starts");
    let addr = handle.addr();
    let control = handle.control();

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let tokens: Vec<String> = client.block_on(async {
        let mut tokens = Vec::with_capacity(USERS);
        for user in 0..USERS {
            let grant = control
                .create_grant(&format!("bench-user-{user}"))
                .await
                .expect("seed grant");
            tokens.push(grant.access_token);
        }
        tokens
    });

    let (completed, elapsed) = client.block_on(async move {
        let start = Instant::now();
        let measure_from = start + WARM_UP;
        let stop_at = measure_from + MEASURE;
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|n| {
                let request = format!(
                    "GET /rest/accounts HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                    tokens[n % tokens.len()]
                );
                tokio::spawn(drive(addr, request.into_bytes(), measure_from, stop_at))
            })
            .collect();
        let mut completed = 0u64;
        for worker in workers {
            completed += worker.await.expect("worker");
        }
        (completed, stop_at.saturating_duration_since(measure_from))
    });

    let stats = client.block_on(control.stats()).expect("stats");
    assert_eq!(
        stats.rest_unauthorized, 0,
        "every request must be authorized"
    );
    let rate = completed as f64 / elapsed.as_secs_f64();
    println!(
        "sim_throughput: GET /rest/accounts, {CONNECTIONS} keep-alive connections, simulator on 1 core: \
         {completed} responses in {:.1} s = {rate:.0} requests/s",
        elapsed.as_secs_f64()
    );
    drop(handle);
}

/// Sends `request` over one keep-alive connection until `stop_at`; returns the number of 200
/// answers received after `measure_from`.
async fn drive(
    addr: std::net::SocketAddr,
    request: Vec<u8>,
    measure_from: Instant,
    stop_at: Instant,
) -> u64 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut buffer = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut counted = 0u64;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            return counted;
        }
        stream.write_all(&request).await.expect("write");
        let status = read_response(&mut stream, &mut buffer, &mut chunk).await;
        assert_eq!(status, 200, "unexpected status");
        if Instant::now() >= measure_from {
            counted += 1;
        }
    }
}

/// Reads one complete response (Content-Length framed) and returns its status code.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>, chunk: &mut [u8]) -> u16 {
    loop {
        if let Some(header_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..header_end]).expect("ascii head");
            let status: u16 = head[9..12].parse().expect("status");
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("content-length");
            let total = header_end + 4 + length;
            if buffer.len() >= total {
                buffer.drain(..total);
                return status;
            }
        }
        let read = stream.read(chunk).await.expect("read");
        assert!(read > 0, "connection closed");
        buffer.extend_from_slice(&chunk[..read]);
    }
}
