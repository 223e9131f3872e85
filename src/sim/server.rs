//! The HTTP/1.1 server loop: accepts connections, records request headers for the control
//! plane, runs the router, and closes the connection without an answer when the lost-response
//! fault asks for it (which axum alone cannot do).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::Service;

use super::state::SimState;

/// Response extension set by a handler whose answer must be lost: the server then drops the
/// connection instead of writing the response.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropConnection;

/// The error the service returns to make hyper close the connection unanswered.
#[derive(Debug)]
struct LostResponse;

impl std::fmt::Display for LostResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response dropped by the lost-response fault")
    }
}

impl std::error::Error for LostResponse {}

/// Accepts and serves connections until `shutdown` resolves.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    state: Arc<SimState>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Small request/response pairs: Nagle would only add latency.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(stream, state.clone(), router.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, "sim: accept failed");
                    // Typically EMFILE; back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<SimState>, router: Router) {
    let service = service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        let mut router = router.clone();
        async move {
            if !request.uri().path().starts_with("/_sim/") {
                state.seen.record(
                    request.method().as_str(),
                    request.uri().path_and_query().map_or("/", |pq| pq.as_str()),
                    request.headers(),
                );
            }
            let response = match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.extensions().get::<DropConnection>().is_some() {
                return Err(LostResponse);
            }
            Ok::<_, LostResponse>(response)
        }
    });
    if let Err(error) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "sim: connection ended with an error");
    }
}
