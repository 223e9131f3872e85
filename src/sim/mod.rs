//! finX simulator: a strict, scriptable stand-in for the finX API (see README "Simulator").
//!
//! Strict where finX must be strict (Basic client auth, single-use codes bound to client and
//! redirect_uri, refresh-token rotation with family revocation, expiring Bearer tokens); as
//! lenient as finX's own guides and examples where they are (value spellings, optional fields),
//! and shaped like them where clients depend on the shape (the redirect's parameter order, the
//! answers). The README's fidelity notes list the choices made where finX says nothing.
//! A `/_sim/*` control plane (when enabled) serves tests and benchmarks: counters, seen
//! headers, direct grants, a movable clock and fault injection.
//!
//! Start it with [`spawn`] (own thread and runtime, for tests and benches), [`serve`] (on a
//! listener you bound) or [`run`] (the `finx-gateway sim` command).

mod control;
mod data;
mod error;
mod faults;
mod flows;
mod grants;
mod lenient;
mod reports;
mod routes;
mod server;
mod state;
mod stats;
mod widget;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::server_thread::ServerThread;

pub use control::{GrantTokens, SimControl};
pub use faults::Faults;
pub use stats::{SeenRequest, SimStats, UserStats};

/// The client id of the documented demo client.
pub const DEMO_CLIENT_ID: &str = "demo-client";
/// The client secret of the documented demo client.
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Simulator settings.
#[derive(Clone)]
pub struct SimConfig {
    /// The one client id the simulator accepts (HTTP Basic user).
    pub client_id: String,
    /// That client's secret (HTTP Basic password).
    pub client_secret: String,
    /// Mount the `/_sim/*` control plane (otherwise those paths are 404).
    pub control: bool,
    /// Lifetime of authorization codes (finX: 5 minutes in the ongoing guide).
    pub code_ttl: Duration,
    /// How long a just-rotated refresh token may be reused once (0: never).
    pub grace_window: Duration,
    /// Answer refreshes without `refresh_token` (the old one then stays valid).
    pub omit_refresh_token: bool,
    /// Lifetime of each refresh token from its issue.
    pub refresh_ttl: Duration,
    /// A grant lapses when neither a refresh nor a data call used it for this long.
    pub inactivity_limit: Duration,
    /// Request bodies above this many bytes are answered 413.
    pub max_body_bytes: usize,
    /// Access-token lifetime, reported as `expires_in`.
    pub access_ttl: Duration,
    /// One-time flows, their data and their tokens vanish this long after the flow started.
    pub onetime_data_ttl: Duration,
    /// Base URL for widget links; default: `http://` + the bound address.
    pub public_url: Option<String>,
    /// How many requests `GET /_sim/seen-headers` remembers (only with the control plane on).
    pub seen_headers_capacity: usize,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("control", &self.control)
            .field("code_ttl", &self.code_ttl)
            .field("grace_window", &self.grace_window)
            .field("omit_refresh_token", &self.omit_refresh_token)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("inactivity_limit", &self.inactivity_limit)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("access_ttl", &self.access_ttl)
            .field("onetime_data_ttl", &self.onetime_data_ttl)
            .field("public_url", &self.public_url)
            .field("seen_headers_capacity", &self.seen_headers_capacity)
            .finish()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            client_id: DEMO_CLIENT_ID.to_owned(),
            client_secret: DEMO_CLIENT_SECRET.to_owned(),
            control: false,
            code_ttl: Duration::from_secs(300),
            grace_window: Duration::ZERO,
            omit_refresh_token: false,
            refresh_ttl: 90 * DAY,
            inactivity_limit: 90 * DAY,
            max_body_bytes: 64 * 1024,
            access_ttl: Duration::from_secs(3600),
            onetime_data_ttl: Duration::from_secs(3600),
            public_url: None,
            seen_headers_capacity: 100,
        }
    }
}

impl SimConfig {
    /// The same config with the `/_sim/*` control plane enabled.
    pub fn with_control(mut self) -> Self {
        self.control = true;
        self
    }
}

/// A simulator running on its own thread; dropping the handle stops it.
pub struct SimHandle {
    server: ServerThread,
}

impl SimHandle {
    /// The bound address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// A typed client for the control plane (requires [`SimConfig::control`]).
    pub fn control(&self) -> SimControl {
        SimControl::new(&self.base_url())
    }
}

/// Binds `127.0.0.1:0` and serves on its own single-threaded tokio runtime in its own thread.
///
/// Callable from sync code, from inside another tokio runtime and from benches.
pub fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _context = runtime.enter();
        TcpListener::from_std(std_listener)?
    };
    // The accept loop returns as soon as the stop signal arrives and dropping the runtime
    // cancels in-flight connections (no blocking tasks exist), so stopping is quick.
    let server = ServerThread::spawn(&format!("finx-sim-{}", addr.port()), addr, move |stop| {
        let served = runtime.block_on(serve(listener, config, async {
            let _ = stop.await;
        }));
        if let Err(error) = served {
            tracing::error!(%error, "the simulator stopped");
        }
    })?;
    Ok(SimHandle { server })
}

/// Serves on an already bound listener until `shutdown` resolves (or the future is dropped).
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let base_url = config
        .public_url
        .as_deref()
        .map(|url| url.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = Arc::new(state::SimState::new(config, base_url));
    let router = routes::router(state.clone());
    tracing::debug!(%addr, control = state.config.control, "sim: listening");
    server::accept_loop(listener, state, router, shutdown).await
}

/// Command-line options of `finx-gateway sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub listen: SocketAddr,
    /// Enable the `/_sim/*` control plane.
    #[arg(long)]
    pub control: bool,
    /// Client id accepted with HTTP Basic.
    #[arg(long, default_value = DEMO_CLIENT_ID)]
    pub client_id: String,
    /// Client secret accepted with HTTP Basic.
    #[arg(long, env = "FINX_SIM_CLIENT_SECRET", default_value = DEMO_CLIENT_SECRET, hide_env_values = true)]
    pub client_secret: String,
    /// Authorization-code lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    pub code_ttl_secs: u64,
    /// Seconds a just-rotated refresh token may be reused once (0: strict).
    #[arg(long, default_value_t = 0)]
    pub grace_window_secs: u64,
    /// Answer refreshes without a new refresh token (the old one stays valid).
    #[arg(long)]
    pub omit_refresh_token: bool,
    /// Refresh-token lifetime in seconds (default 90 days).
    #[arg(long, default_value_t = 90 * 24 * 3600)]
    pub refresh_ttl_secs: u64,
    /// Seconds without any use after which a grant lapses (default 90 days).
    #[arg(long, default_value_t = 90 * 24 * 3600)]
    pub inactivity_limit_secs: u64,
    /// Access-token lifetime in seconds (`expires_in`).
    #[arg(long, default_value_t = 3600)]
    pub access_ttl_secs: u64,
    /// Largest accepted request body in bytes (413 above).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Base URL put into widget links (default: http:// plus the listen address).
    #[arg(long)]
    pub public_url: Option<String>,
}

impl From<&SimArgs> for SimConfig {
    fn from(args: &SimArgs) -> Self {
        SimConfig {
            client_id: args.client_id.clone(),
            client_secret: args.client_secret.clone(),
            control: args.control,
            code_ttl: Duration::from_secs(args.code_ttl_secs),
            grace_window: Duration::from_secs(args.grace_window_secs),
            omit_refresh_token: args.omit_refresh_token,
            refresh_ttl: Duration::from_secs(args.refresh_ttl_secs),
            inactivity_limit: Duration::from_secs(args.inactivity_limit_secs),
            max_body_bytes: args.max_body_bytes,
            access_ttl: Duration::from_secs(args.access_ttl_secs),
            public_url: args.public_url.clone(),
            ..SimConfig::default()
        }
    }
}

/// Runs `finx-gateway sim`: builds a runtime, serves on `--listen`, stops on Ctrl-C.
pub fn run(args: SimArgs) -> std::io::Result<()> {
    let config = SimConfig::from(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        eprintln!(
            "finX simulator listening on http://{} (control plane {})",
            listener.local_addr()?,
            if config.control { "on" } else { "off" }
        );
        serve(listener, config, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
