//! The signals a serving gateway obeys.

use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::oneshot;

use super::StartError;
use crate::admin::Draining;

/// What SIGHUP runs once the gateway serves (re-reading the config file).
pub type HangupAction = Box<dyn Fn() + Send + Sync>;

/// The gateway's signals: SIGTERM **and SIGINT** stop gracefully (stop accepting, drain within
/// `server.grace_period`; the caller then waits for refreshes in flight), SIGQUIT hands the
/// listening sockets to a process started with `serve --upgrade`, then stops gracefully, and
/// SIGHUP reloads the config file (see [`GatewaySignals::on_hangup`]). (pingora's own watcher
/// makes SIGINT a fast shutdown.)
///
/// The handlers are installed by [`GatewaySignals::install`], before the listeners open: a
/// signal that arrives while the server is still starting is kept, not lost, and never kills
/// the process with the default disposition.
pub struct GatewaySignals {
    first: Mutex<Option<oneshot::Receiver<ShutdownSignal>>>,
    /// Set as soon as the first signal arrives, before pingora starts its grace period, so
    /// `/readyz` turns 503 while the listeners still serve.
    draining: Draining,
    /// What SIGHUP does; empty until the gateway is built (a SIGHUP before is logged, ignored).
    hangup: Arc<OnceLock<HangupAction>>,
}

impl GatewaySignals {
    /// The flag the first signal sets (the one `/readyz` of the built gateway reads).
    pub fn reporting_to(mut self, draining: Draining) -> Self {
        self.draining = draining;
        self
    }

    /// Runs `action` on every SIGHUP from now on (on the signal thread, one at a time).
    pub fn on_hangup(&self, action: HangupAction) {
        if self.hangup.set(action).is_err() {
            tracing::warn!("a SIGHUP action was already installed; the new one is ignored");
        }
    }

    /// Installs the handlers on a thread of their own and returns once they are in place.
    pub fn install() -> Result<Self, StartError> {
        let (installed, ready) = std::sync::mpsc::channel();
        let (deliver, first) = oneshot::channel();
        let hangup: Arc<OnceLock<HangupAction>> = Arc::default();
        let on_hangup = hangup.clone();
        std::thread::Builder::new()
            .name("finx-signals".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(_) => {
                        let _ = installed.send(Err("cannot build the signal thread's runtime"));
                        return;
                    }
                };
                runtime.block_on(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let streams = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::quit()),
                        signal(SignalKind::hangup()),
                    );
                    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut quit), Ok(mut hup)) =
                        streams
                    else {
                        let _ = installed.send(Err("cannot listen for signals"));
                        return;
                    };
                    let _ = installed.send(Ok(()));
                    let reload = || match on_hangup.get() {
                        Some(action) => action(),
                        None => tracing::warn!("SIGHUP before the gateway serves: ignored"),
                    };
                    let received = loop {
                        tokio::select! {
                            _ = terminate.recv() => {
                                tracing::info!("SIGTERM: stopping gracefully");
                                break ShutdownSignal::GracefulTerminate;
                            }
                            _ = interrupt.recv() => {
                                tracing::info!("SIGINT: stopping gracefully");
                                break ShutdownSignal::GracefulTerminate;
                            }
                            _ = quit.recv() => {
                                tracing::info!("SIGQUIT: handing the listeners to the new process, then stopping");
                                break ShutdownSignal::GracefulUpgrade;
                            }
                            _ = hup.recv() => reload(),
                        }
                    };
                    let _ = deliver.send(received);
                    // Later stop signals are caught (and ignored) until the process exits; a
                    // reload while draining still applies.
                    loop {
                        tokio::select! {
                            _ = terminate.recv() => {}
                            _ = interrupt.recv() => {}
                            _ = quit.recv() => {}
                            _ = hup.recv() => reload(),
                        }
                    }
                });
            })
            .map_err(StartError::Thread)?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Self {
                first: Mutex::new(Some(first)),
                draining: Draining::default(),
                hangup,
            }),
            Ok(Err(reason)) => Err(StartError::Signals(reason)),
            Err(_) => Err(StartError::Signals("the signal thread stopped")),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for GatewaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let first = self.first.lock().ok().and_then(|mut r| r.take());
        let signal = match first {
            Some(first) => first.await.unwrap_or(ShutdownSignal::GracefulTerminate),
            None => std::future::pending().await,
        };
        self.draining.start();
        signal
    }
}
