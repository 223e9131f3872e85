//! The baseline: a plain pingora proxy from the same pingora version, with the gateway's
//! `ServerConf` (threads, work stealing, upstream keep-alive pool) and the same kind of
//! pre-built `HttpPeer`, that only sets `Host`. No caller auth, no routing, no tokens.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use finx_gateway::config::Config;
use http::header::HOST;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy_service_with_name, ProxyHttp, Session};
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use pingora::Result;
use tokio::sync::oneshot;

struct HostOnlyProxy {
    peer: HttpPeer,
    host: HeaderValue,
}

#[async_trait]
impl ProxyHttp for HostOnlyProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header(HOST, self.host.clone())
    }
}

/// Stops the server when the sender fires or is dropped (as `RunningGateway` does).
struct ChannelShutdown(Mutex<Option<oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let receiver = self.0.lock().ok().and_then(|mut r| r.take());
        if let Some(receiver) = receiver {
            let _ = receiver.await;
        }
        ShutdownSignal::FastShutdown
    }
}

/// A running passthrough proxy; dropping it stops the server and joins its thread.
pub struct Passthrough {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Passthrough {
    /// Starts the passthrough for the upstream, server and pool settings of `config`.
    pub fn start(config: &Config) -> Result<Self, String> {
        let addr = finx_gateway::reserve_port(config.listen.ip()).map_err(|e| e.to_string())?;
        // The gateway's own server and peer set-up: only the proxy logic differs.
        let mut server = finx_gateway::pingora_server(config);
        let peer = finx_gateway::upstream_peer(config);
        let host = finx_gateway::upstream_host(config).map_err(|e| e.to_string())?;
        let mut service = http_proxy_service_with_name(
            &server.configuration,
            HostOnlyProxy { peer, host },
            "passthrough",
        );
        service.add_tcp(&addr.to_string());
        server.add_service(service);
        let (shutdown, receiver) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("passthrough".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelShutdown(Mutex::new(Some(receiver)))),
                })
            })
            .map_err(|e| format!("cannot start passthrough thread: {e}"))?;
        let running = Self {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        finx_gateway::wait_until_accepting(addr, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(running)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
