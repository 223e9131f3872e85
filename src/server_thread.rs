//! A server running on a thread of its own, stopped when its handle is dropped: the gateway's
//! pingora server (pingora builds its own runtimes), the simulator and the demo page (each on a
//! small tokio runtime). Tests, benches and the demo hold these handles.
//!
//! A leaf module: it depends on nothing else in the crate.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A server on its own thread. Dropping the handle sends the stop signal and joins the thread.
pub struct ServerThread {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve` on a thread named `name`. `serve` must listen on `addr` and return soon after
    /// its stop receiver fires (or its sender is dropped). Returns once `addr` accepts
    /// connections.
    pub fn spawn(
        name: &str,
        addr: SocketAddr,
        serve: impl FnOnce(oneshot::Receiver<()>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(stopped))?;
        let running = Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        };
        wait_until_accepting(addr, Duration::from_secs(10))?;
        Ok(running)
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Finds a free port by binding port 0 and releasing it: pingora's listener cannot report the
/// port it got.
pub fn reserve_port(ip: std::net::IpAddr) -> std::io::Result<SocketAddr> {
    TcpListener::bind((ip, 0)).and_then(|listener| listener.local_addr())
}

/// Polls `addr` until it accepts a TCP connection or `deadline` passes.
pub fn wait_until_accepting(addr: SocketAddr, deadline: Duration) -> std::io::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing accepted connections on {addr} within {deadline:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
