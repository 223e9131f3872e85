//! finx-gateway: a pingora sidecar that authenticates internal callers, picks the end user's finX
//! connection, injects a fresh credential and forwards to finX.
//!
//! `main.rs` is a thin CLI; everything tests, benches and the demo need is reachable from here:
//! [`open_store`] and [`build_server`] build the pieces, [`RunningGateway`] runs them on a
//! thread of its own and stops them again.

/// A named fail point: with the `failpoints` feature, logs that it was reached and then acts as
/// the `FAILPOINTS` environment variable says (the `fail` crate: `sleep(60000)`, `panic`, …),
/// so process-level fault tests can kill the gateway at an exact moment. Nothing otherwise.
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            // Straight to stderr, not through the log writer: the crash tests watch for it.
            eprintln!("fail point reached: {}", $name);
            fail::fail_point!($name);
        }
    };
}

pub mod callers;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connect;
pub mod demo;
pub mod error;
pub mod proxy;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tokens;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use http::HeaderValue;
use pingora::prelude::HttpPeer;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use secrecy::ExposeSecret;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::{Config, StoreBackend};
use crate::connect::ConnectService;
use crate::proxy::{FinxProxy, ProxyParts};
pub use crate::store::postgres::OpenWait;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::TokenStore;
use crate::tokens::journal::Journal;
use crate::tokens::keeper::Keeper;
use crate::tokens::{TokenClient, TokenEndpoint, TokenManager, TokenSettings};

/// Why the gateway could not start. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("encryption key: {0}")]
    Key(String),
    #[error("token store: {0}")]
    Store(String),
    #[error("{0}")]
    Setup(String),
}

/// Proof that this process is the one serving an embedded store (SQLite is for one gateway
/// process, because two would refresh the same connections without knowing of each other) or,
/// on the shared store, the one using its journal. Operator commands (`connections import`,
/// `list`) open the store without it.
pub struct ServingLock {
    file: std::fs::File,
    /// The processes that held this lock before (their ids as written by
    /// [`ServingLock::record_owner`]): every one of them has stopped, so a refresh intent they
    /// left is a crash, never a refresh still in flight.
    pub predecessors: Vec<String>,
}

/// How many earlier owners the lock file remembers.
const REMEMBERED_OWNERS: usize = 64;

impl ServingLock {
    fn taken(mut file: std::fs::File) -> Self {
        use std::io::Read;
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let mut predecessors: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && line.len() <= 64)
            .map(str::to_owned)
            .collect();
        let keep_from = predecessors.len().saturating_sub(REMEMBERED_OWNERS - 1);
        predecessors.drain(..keep_from);
        Self { file, predecessors }
    }

    /// Adds this process (`owner`) to the lock file's list, for whoever takes the lock next.
    pub fn record_owner(&mut self, owner: &str) {
        use std::io::{Seek, Write};
        let mut text = self.predecessors.join("\n");
        text.push('\n');
        text.push_str(owner);
        text.push('\n');
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(text.as_bytes()))
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            tracing::warn!(%error, "could not record this process in the serving lock file");
        }
    }
}

/// The serving lock's file: `<store>.lock` for the embedded store, `<journal>.lock` for the
/// shared one (each replica needs a journal of its own).
fn serving_lock_file(config: &Config) -> Result<(std::fs::File, std::path::PathBuf), StartError> {
    let locked = match &config.store.backend {
        StoreBackend::Sqlite { path } => path,
        StoreBackend::Postgres(_) => &config.store.journal,
    };
    let mut path = locked.clone().into_os_string();
    path.push(".lock");
    let path = std::path::PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::Store(format!("cannot open {}: {e}", path.display())))?;
    Ok((file, path))
}

/// Takes the serving lock, or says which store (or journal) is already served.
pub fn lock_store_for_serving(config: &Config) -> Result<ServingLock, StartError> {
    let (file, path) = serving_lock_file(config)?;
    match file.try_lock() {
        Ok(()) => Ok(ServingLock::taken(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::Store(format!(
            "another finx-gateway process is serving {} (lock {}); an embedded store, and a \
             replica's journal, serve one gateway process",
            config.store.describe(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StartError::Store(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// For a graceful upgrade (`serve --upgrade`): the old process still holds the serving lock
/// while it drains, so the new one serves stored tokens at once and refreshes only once the
/// lock is its own. The receiver turns `true` then; the lock is held until the process exits.
pub fn lock_store_after_upgrade(
    config: &Config,
) -> Result<tokio::sync::watch::Receiver<bool>, StartError> {
    let (file, path) = serving_lock_file(config)?;
    let (acquired, receiver) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("finx-serving-lock".into())
        .spawn(move || match file.lock() {
            Ok(()) => {
                tracing::info!(lock = %path.display(), "serving lock taken over; refreshing resumes");
                let _ = acquired.send(true);
                // Held for the rest of the process's life.
                std::mem::forget(file);
            }
            Err(e) => tracing::error!(lock = %path.display(), error = %e, "cannot take the serving lock; this process will not refresh"),
        })
        .map_err(|e| StartError::Setup(format!("cannot start the lock thread: {e}")))?;
    Ok(receiver)
}

/// Opens the configured token store; a key that does not match the store refuses to open. A
/// shared store is migrated first; `wait` says whether an unreachable database is waited for
/// (a serving replica) or reported at once (operator commands).
pub fn open_store(config: &Config, wait: OpenWait) -> Result<Arc<dyn TokenStore>, StartError> {
    let key = config
        .store
        .encryption_key
        .load()
        .map_err(|e| StartError::Key(e.to_string()))?;
    Ok(match &config.store.backend {
        StoreBackend::Sqlite { path } => {
            Arc::new(SqliteStore::open(path, key).map_err(|e| StartError::Store(e.to_string()))?)
        }
        StoreBackend::Postgres(settings) => Arc::new(
            PostgresStore::open(settings, key, wait)
                .map_err(|e| StartError::Store(e.to_string()))?,
        ),
    })
}

fn token_client(config: &Config) -> Result<TokenClient, StartError> {
    TokenClient::new(
        &config.upstream.base_url,
        &config.client.id,
        config.client.secret.clone(),
        config.upstream.connect_timeout,
        config.upstream.token_timeout,
    )
    .map_err(|e| StartError::Setup(format!("HTTP client for finX: {e}")))
}

/// How the token manager refreshes, from `[tokens]`, `[upstream]` and `[store]`.
pub fn token_settings(config: &Config) -> TokenSettings {
    TokenSettings {
        refresh_skew: config.tokens.refresh_skew,
        refresh_ahead: config.tokens.refresh_ahead,
        forced_refresh_interval: config.tokens.forced_refresh_interval,
        one_time_retention: config.tokens.one_time_retention,
        cache_capacity: config.tokens.cache_capacity,
        shared_store: matches!(config.store.backend, StoreBackend::Postgres(_)),
        // The token call's own limit, plus its retries, the commit and a margin.
        refresh_hold_limit: config.upstream.token_timeout + Duration::from_secs(10),
        rotation_grace: config.upstream.rotation_grace,
        touch_interval: Duration::from_secs(24 * 3600),
        predecessors: Vec::new(),
    }
}

/// The token manager for `config`, over `store`, with a finX client of its own (its connections
/// live on the manager's runtime) and the local journal of uncommitted grants.
pub fn build_token_manager(
    config: &Config,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
) -> Result<TokenManager, StartError> {
    token_manager_with_gate(config, store, clock, None, token_settings(config))
}

/// The longest a stop waits for refreshes in flight: one refresh's worst case (a wait for
/// another replica's lock, the retries, the token call, the commit) with a margin.
pub fn shutdown_deadline(config: &Config) -> Duration {
    let lock_wait = match &config.store.backend {
        StoreBackend::Postgres(settings) => settings.lock_timeout,
        StoreBackend::Sqlite { .. } => Duration::ZERO,
    };
    lock_wait + config.upstream.token_timeout + Duration::from_secs(15)
}

fn token_manager_with_gate(
    config: &Config,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    refresh_gate: Option<tokio::sync::watch::Receiver<bool>>,
    settings: TokenSettings,
) -> Result<TokenManager, StartError> {
    let key = config
        .store
        .encryption_key
        .load()
        .map_err(|e| StartError::Key(e.to_string()))?;
    let journal = Journal::new(config.store.journal.clone(), key);
    let endpoint: Arc<dyn TokenEndpoint> = Arc::new(token_client(config)?);
    TokenManager::new(
        store,
        endpoint,
        clock,
        settings,
        Some(journal),
        refresh_gate,
    )
    .map_err(|e| StartError::Setup(e.to_string()))
}

/// A gateway built and ready to run: the pingora server, its token manager and the keeper.
pub struct BuiltGateway {
    pub server: Server,
    pub tokens: TokenManager,
    pub keeper: Option<Arc<Keeper>>,
}

/// Builds the pingora server with the proxy service listening on `config.listen`, its token
/// manager (which starts finishing what an earlier run left behind) and the keeper (started).
///
/// With `refresh_gate`, nothing is refreshed until it turns `true` (see
/// [`lock_store_after_upgrade`]).
///
/// `predecessors` are the earlier owners of this process's serving lock (see [`ServingLock`]).
pub fn build_server(
    config: &Config,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    refresh_gate: Option<tokio::sync::watch::Receiver<bool>>,
    predecessors: &[String],
) -> Result<BuiltGateway, StartError> {
    let mut settings = token_settings(config);
    settings.predecessors = predecessors.to_vec();
    let tokens =
        token_manager_with_gate(config, store.clone(), clock.clone(), refresh_gate, settings)?;
    tokens.recover();
    tokens.start_resolver();
    let keeper = config.keeper.clone().map(|settings| {
        let keeper = Arc::new(tokens.keeper(settings));
        keeper.start();
        keeper
    });
    // Code exchanges and flow starts run on pingora's runtime, with a client of their own.
    let client = token_client(config)?;
    let connect = config.connect.as_ref().map(|settings| {
        Arc::new(ConnectService::new(
            settings.clone(),
            client,
            store,
            tokens.clone(),
            clock,
        ))
    });
    let server = build_proxy_server(config, tokens.clone(), connect)?;
    Ok(BuiltGateway {
        server,
        tokens,
        keeper,
    })
}

/// The pingora server (runtime, threads, upstream pool) for `config`, bootstrapped, without
/// services. Shared with the load bench's plain passthrough so both run the same pingora.
pub fn pingora_server(config: &Config) -> Server {
    let server_conf = ServerConf {
        threads: config.server.threads,
        work_stealing: true,
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: config.upstream.pool_size,
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let options = pingora::server::configuration::Opt {
        upgrade: config.server.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(options, server_conf);
    server.bootstrap();
    server
}

/// The pre-built finX peer: resolved address (no DNS per request), TLS with certificate and
/// host name verification, timeouts.
pub fn upstream_peer(config: &Config) -> HttpPeer {
    let upstream = &config.upstream;
    let mut peer = HttpPeer::new(upstream.address, upstream.tls, upstream.sni.clone());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.read_timeout);
    peer.options.write_timeout = Some(upstream.read_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer
}

/// finX's `Host` header value.
pub fn upstream_host(config: &Config) -> Result<HeaderValue, StartError> {
    HeaderValue::try_from(config.upstream.host_header.as_str())
        .map_err(|_| StartError::Setup("upstream host is not a valid Host header".into()))
}

fn build_proxy_server(
    config: &Config,
    tokens: TokenManager,
    connect: Option<Arc<ConnectService>>,
) -> Result<Server, StartError> {
    let mut server = pingora_server(config);
    let upstream = &config.upstream;
    let peer = upstream_peer(config);
    let host = upstream_host(config)?;
    let credentials = format!(
        "{}:{}",
        config.client.id,
        config.client.secret.expose_secret()
    );
    let mut client_basic = HeaderValue::try_from(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    ))
    .map_err(|_| StartError::Setup("client id cannot be sent in a header".into()))?;
    client_basic.set_sensitive(true);

    let proxy = FinxProxy::new(ProxyParts {
        tokens,
        callers: config.callers.clone(),
        peer,
        host,
        path_prefix: upstream.path_prefix.clone(),
        client_basic,
        user_header: config.routing.user_header.clone(),
        flow_header: config.routing.flow_header.clone(),
        connect,
        replay_body_limit: config.tokens.replay_body_limit,
    });
    let mut service = http_proxy_service_with_name(&server.configuration, proxy, "finx-gateway");
    service.add_tcp(&config.listen.to_string());
    server.add_service(service);
    Ok(server)
}

/// The gateway's signals: SIGTERM **and SIGINT** stop gracefully (stop accepting, drain within
/// `server.grace_period`; the caller then waits for refreshes in flight), SIGQUIT hands the
/// listening sockets to a process started with `serve --upgrade`, then stops gracefully.
/// (pingora's own watcher makes SIGINT a fast shutdown.)
///
/// The handlers are installed by [`GatewaySignals::install`], before the listeners open: a
/// signal that arrives while the server is still starting is kept, not lost, and never kills
/// the process with the default disposition.
pub struct GatewaySignals {
    first: Mutex<Option<oneshot::Receiver<ShutdownSignal>>>,
}

impl GatewaySignals {
    /// Installs the handlers on a thread of their own and returns once they are in place.
    pub fn install() -> Result<Self, StartError> {
        let (installed, ready) = std::sync::mpsc::channel();
        let (deliver, first) = oneshot::channel();
        std::thread::Builder::new()
            .name("finx-signals".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = installed.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let streams = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::quit()),
                    );
                    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut quit)) = streams else {
                        let _ = installed.send(Err("cannot listen for signals".to_owned()));
                        return;
                    };
                    let _ = installed.send(Ok(()));
                    let received = tokio::select! {
                        _ = terminate.recv() => {
                            tracing::info!("SIGTERM: stopping gracefully");
                            ShutdownSignal::GracefulTerminate
                        }
                        _ = interrupt.recv() => {
                            tracing::info!("SIGINT: stopping gracefully");
                            ShutdownSignal::GracefulTerminate
                        }
                        _ = quit.recv() => {
                            tracing::info!("SIGQUIT: handing the listeners to the new process, then stopping");
                            ShutdownSignal::GracefulUpgrade
                        }
                    };
                    let _ = deliver.send(received);
                    // Later signals are caught (and ignored) until the process exits.
                    loop {
                        tokio::select! {
                            _ = terminate.recv() => {}
                            _ = interrupt.recv() => {}
                            _ = quit.recv() => {}
                        }
                    }
                });
            })
            .map_err(|e| StartError::Setup(format!("cannot start the signal thread: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Self {
                first: Mutex::new(Some(first)),
            }),
            Ok(Err(reason)) => Err(StartError::Setup(reason)),
            Err(_) => Err(StartError::Setup("the signal thread stopped".into())),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for GatewaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let first = self.first.lock().ok().and_then(|mut r| r.take());
        match first {
            Some(first) => first.await.unwrap_or(ShutdownSignal::GracefulTerminate),
            None => std::future::pending().await,
        }
    }
}

/// Stops a server run by [`ServerThread`] when its sender fires or is dropped.
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

/// A pingora server running on a thread of its own (pingora builds its own runtimes), stopped
/// with a fast shutdown when this is dropped. Used by [`RunningGateway`] and the load bench's
/// passthrough.
pub struct ServerThread {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `server`, whose listener is `addr`, on a thread named `name`; returns once the
    /// listener accepts connections.
    pub fn spawn(server: Server, addr: SocketAddr, name: &str) -> Result<Self, StartError> {
        let (shutdown, receiver) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelShutdown(Mutex::new(Some(receiver)))),
                })
            })
            .map_err(|e| StartError::Setup(format!("cannot start server thread: {e}")))?;
        let running = Self {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        wait_until_accepting(addr, Duration::from_secs(10))?;
        Ok(running)
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The gateway on a thread of its own, as tests, the demo and the benches run it. Dropping it
/// stops the server, then releases the store's serving lock.
pub struct RunningGateway {
    server: Option<ServerThread>,
    tokens: TokenManager,
    keeper: Option<Arc<Keeper>>,
    shutdown_deadline: Duration,
    _serving: ServingLock,
}

impl RunningGateway {
    /// Starts the gateway for `config` over `store`. A listener port of 0 is replaced by a free
    /// port; returns once the listener accepts connections.
    pub fn start(
        mut config: Config,
        store: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let mut serving = lock_store_for_serving(&config)?;
        if config.listen.port() == 0 {
            config.listen = reserve_port(config.listen.ip())?;
        }
        let built = build_server(&config, store, clock, None, &serving.predecessors)?;
        serving.record_owner(built.tokens.owner());
        Ok(Self {
            shutdown_deadline: shutdown_deadline(&config),
            server: Some(ServerThread::spawn(
                built.server,
                config.listen,
                "finx-gateway",
            )?),
            tokens: built.tokens,
            keeper: built.keeper,
            _serving: serving,
        })
    }

    /// Where the gateway listens.
    pub fn addr(&self) -> SocketAddr {
        self.server
            .as_ref()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), ServerThread::addr)
    }

    /// The keeper, when `[keeper]` is enabled.
    pub fn keeper(&self) -> Option<&Arc<Keeper>> {
        self.keeper.as_ref()
    }

    /// `http://ip:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The gateway's token manager (for benches and metrics).
    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    /// Stops the server and waits for its thread.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for RunningGateway {
    /// The server stops first (no new requests), then refreshes in flight finish.
    fn drop(&mut self) {
        drop(self.server.take());
        self.tokens.shutdown(self.shutdown_deadline);
    }
}

/// Finds a free port by binding port 0 and releasing it: pingora's listener cannot report the
/// port it got.
pub fn reserve_port(ip: std::net::IpAddr) -> Result<SocketAddr, StartError> {
    TcpListener::bind((ip, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|e| StartError::Setup(format!("cannot reserve a port on {ip}: {e}")))
}

/// Polls `addr` until it accepts a TCP connection or `deadline` passes.
pub fn wait_until_accepting(addr: SocketAddr, deadline: Duration) -> Result<(), StartError> {
    let until = Instant::now() + deadline;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(StartError::Setup(format!(
                "gateway did not accept connections on {addr} within {deadline:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
