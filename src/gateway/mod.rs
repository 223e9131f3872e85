//! Assembling and running the gateway: opening the store, building the token manager, the
//! proxy and the pingora server from a validated [`Config`], and running them on a thread
//! ([`RunningGateway`]) or as the process (`serve`).
//!
//! The top of the module graph below the command line: it may use every domain module; no
//! domain module uses it.

mod reload;
mod serving_lock;
mod signals;

pub use reload::{ReloadReport, Reloader};
pub use serving_lock::{lock_store_after_upgrade, lock_store_for_serving, ServingLock};
pub use signals::GatewaySignals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine;
use http::HeaderValue;
use pingora::prelude::HttpPeer;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service as ListeningService;
use secrecy::ExposeSecret;
use tokio::sync::oneshot;

use crate::admin::{AdminApp, Draining};
use crate::callers::CallerAuth;
use crate::clock::Clock;
use crate::config::{Config, ConfigErrors, StoreBackend};
use crate::connect::ConnectService;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::proxy::{FinxProxy, ProxyParts};
use crate::server_thread::{reserve_port, wait_until_accepting, ServerThread};
use crate::store::crypto::{EncryptionKey, KeyError, KeyRing};
use crate::store::metered::MeteredStore;
use crate::store::postgres::{OpenWait, PgOpenError, PostgresStore};
use crate::store::sqlite::OpenError;
use crate::store::sqlite::SqliteStore;
use crate::store::TokenStore;
use crate::tokens::journal::Journal;
use crate::tokens::keeper::Keeper;
use crate::tokens::{ManagerError, TokenClient, TokenEndpoint, TokenManager, TokenSettings};

/// Why the gateway could not start. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("encryption key: {0}")]
    Key(#[from] KeyError),
    #[error("token store: {0}")]
    Sqlite(#[from] OpenError),
    #[error("token store: {0}")]
    Postgres(#[from] PgOpenError),
    #[error("cannot open the serving lock {}: {source}", path.display())]
    ServingLockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another finx-gateway process is serving {store} (lock {}); an embedded store, and a \
         replica's journal, serve one gateway process",
        lock.display()
    )]
    AlreadyServed { store: String, lock: PathBuf },
    #[error("token manager: {0}")]
    Tokens(#[from] ManagerError),
    #[error("HTTP client for finX: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("{0} cannot be sent in an HTTP header")]
    NotAHeader(&'static str),
    #[error("signal handling: {0}")]
    Signals(&'static str),
    #[error("cannot start a thread or reach the listener: {0}")]
    Thread(#[source] std::io::Error),
}

/// Opens the configured token store; a key that does not match the store refuses to open. A
/// shared store is migrated first; `wait` says whether an unreachable database is waited for
/// (a serving replica) or reported at once (operator commands).
pub fn open_store(config: &Config, wait: OpenWait) -> Result<Arc<dyn TokenStore>, StartError> {
    let key = store_key_ring(config)?;
    Ok(match &config.store.backend {
        StoreBackend::Sqlite { path } => Arc::new(SqliteStore::open(path, key)?),
        StoreBackend::Postgres(settings) => Arc::new(PostgresStore::open(settings, key, wait)?),
    })
}

/// The store's keys: `encryption_key`, which seals every write, and `previous_keys`, which
/// still decrypt (during a key rotation).
pub fn store_key_ring(config: &Config) -> Result<KeyRing, KeyError> {
    let primary = EncryptionKey::load(&config.store.encryption_key)?;
    let previous = config
        .store
        .previous_keys
        .iter()
        .map(EncryptionKey::load)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeyRing::new(primary, previous))
}

fn token_client(config: &Config) -> Result<TokenClient, StartError> {
    TokenClient::new(
        &config.upstream.base_url,
        &config.client.id,
        config.client.secret.clone(),
        config.upstream.connect_timeout,
        config.upstream.token_timeout,
    )
    .map_err(StartError::from)
}

/// How the token manager refreshes, from `[tokens]`, `[upstream]` and `[store]`, and where it
/// records connection events (`[events]`; stamped by the system clock until the manager is
/// built with the gateway's own clock).
pub fn token_settings(config: &Config) -> TokenSettings {
    let metrics = Arc::new(Metrics::new());
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
        events: Events::new(
            config.events.clone(),
            metrics.clone(),
            Arc::new(crate::clock::SystemClock),
        ),
        metrics,
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
    mut settings: TokenSettings,
) -> Result<TokenManager, StartError> {
    // Events are stamped by the gateway's clock (a test's manual clock too).
    settings.events = Events::new(
        config.events.clone(),
        settings.metrics.clone(),
        clock.clone(),
    );
    let journal = Journal::new(config.store.journal.clone(), store_key_ring(config)?);
    let endpoint: Arc<dyn TokenEndpoint> = Arc::new(token_client(config)?);
    TokenManager::new(
        store,
        endpoint,
        clock,
        settings,
        Some(journal),
        refresh_gate,
    )
    .map_err(StartError::from)
}

/// A gateway built and ready to run: the pingora server (proxy and admin listener), its token
/// manager, the keeper and the flag `/readyz` reads.
pub struct BuiltGateway {
    pub server: Server,
    pub tokens: TokenManager,
    pub keeper: Option<Arc<Keeper>>,
    /// Set when the gateway starts stopping: `/readyz` then answers 503.
    pub draining: Draining,
    /// Applies a changed config file in place (SIGHUP).
    pub reloader: Arc<Reloader>,
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
    let store: Arc<dyn TokenStore> = Arc::new(MeteredStore::new(store, settings.metrics.clone()));
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
            store.clone(),
            tokens.clone(),
            clock.clone(),
        ))
    });
    let callers = Arc::new(ArcSwap::new(config.callers.clone()));
    let reloader = Arc::new(Reloader::new(
        config.clone(),
        callers.clone(),
        connect.clone(),
        tokens.events().clone(),
    ));
    let mut server = build_proxy_server(config, tokens.clone(), callers, connect)?;
    let draining = Draining::default();
    if config.admin.credential.is_none() {
        tracing::warn!("no [admin] credential is configured: the admin API refuses every request");
    }
    let mut admin = ListeningService::new(
        "finx-gateway admin".to_owned(),
        AdminApp::new(
            config.admin.clone(),
            tokens.metrics().clone(),
            tokens.clone(),
            store,
            clock,
            draining.clone(),
        ),
    );
    admin.add_tcp(&config.admin.address.to_string());
    server.add_service(admin);
    Ok(BuiltGateway {
        server,
        tokens,
        keeper,
        draining,
        reloader,
    })
}

/// The pingora server (runtime, threads, upstream pool) for `config`, bootstrapped, without
/// services. Shared with the load bench's plain passthrough so both run the same pingora.
pub fn pingora_server(config: &Config) -> Server {
    let server_conf = ServerConf {
        threads: config.server.threads,
        work_stealing: config.server.work_stealing,
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
        .map_err(|_| StartError::NotAHeader("the upstream host"))
}

fn build_proxy_server(
    config: &Config,
    tokens: TokenManager,
    callers: Arc<ArcSwap<CallerAuth>>,
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
    .map_err(|_| StartError::NotAHeader("the client id"))?;
    client_basic.set_sensitive(true);

    let proxy = FinxProxy::new(ProxyParts {
        metrics: tokens.metrics().clone(),
        tokens,
        callers,
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

/// Runs a pingora `server`, whose listener is `addr`, on a thread named `name`, stopped with a
/// fast shutdown when the handle is dropped. Returns once the listener accepts connections.
/// Used by [`RunningGateway`] and the load bench's passthrough.
pub fn spawn_pingora(
    server: Server,
    addr: SocketAddr,
    name: &str,
) -> Result<ServerThread, StartError> {
    ServerThread::spawn(name, addr, move |stop| {
        server.run(RunArgs {
            shutdown_signal: Box::new(ChannelShutdown(Mutex::new(Some(stop)))),
        })
    })
    .map_err(StartError::Thread)
}

/// Stops a pingora server when its [`ServerThread`] handle's stop signal fires or is dropped.
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

/// The gateway on a thread of its own, as tests, the demo and the benches run it. Dropping it
/// stops the server, then releases the store's serving lock.
pub struct RunningGateway {
    server: Option<ServerThread>,
    tokens: TokenManager,
    keeper: Option<Arc<Keeper>>,
    admin: SocketAddr,
    draining: Draining,
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
            config.listen = reserve_port(config.listen.ip()).map_err(StartError::Thread)?;
        }
        if config.admin.address.port() == 0 {
            config.admin.address =
                reserve_port(config.admin.address.ip()).map_err(StartError::Thread)?;
        }
        let built = build_server(&config, store, clock, None, &serving.predecessors)?;
        serving.record_owner(built.tokens.owner());
        let server = spawn_pingora(built.server, config.listen, "finx-gateway")?;
        wait_until_accepting(config.admin.address, Duration::from_secs(10))
            .map_err(StartError::Thread)?;
        Ok(Self {
            shutdown_deadline: shutdown_deadline(&config),
            server: Some(server),
            tokens: built.tokens,
            keeper: built.keeper,
            admin: config.admin.address,
            draining: built.draining,
            _serving: serving,
        })
    }

    /// Where the gateway listens.
    pub fn addr(&self) -> SocketAddr {
        self.server
            .as_ref()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), ServerThread::addr)
    }

    /// `http://ip:port` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Marks the gateway as stopping, as a stop signal does (`/readyz` answers 503).
    pub fn start_draining(&self) {
        self.draining.start();
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
