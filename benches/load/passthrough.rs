//! The baseline: a plain pingora proxy from the same pingora version, with the gateway's
//! `ServerConf` (threads, work stealing, upstream keep-alive pool) and the same kind of
//! pre-built `HttpPeer`, that only sets `Host`. No caller auth, no routing, no tokens.

use std::net::SocketAddr;

use async_trait::async_trait;
use finx_gateway::config::Config;
use finx_gateway::ServerThread;
use http::header::HOST;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy_service_with_name, ProxyHttp, Session};
use pingora::Result;

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

/// A running passthrough proxy; dropping it stops the server and joins its thread.
pub struct Passthrough {
    server: ServerThread,
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
        let server =
            finx_gateway::spawn_pingora(server, addr, "passthrough").map_err(|e| e.to_string())?;
        Ok(Self { server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}
