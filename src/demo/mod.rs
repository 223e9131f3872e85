//! `finx-gateway demo`: the simulator, the gateway and the demo page on loopback, a throwaway
//! store with a generated key, one seeded user, and curl commands to try. Runs until Ctrl-C.
//!
//! Built only with the `sim` feature. It uses the gateway from the outside, as a deployment
//! does: nothing in the proxy knows the demo exists.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::callers::CallerAuth;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigFile, SecretRef};
use crate::server_thread::ServerThread;
use crate::sim::{SimConfig, SimHandle};
use crate::store::crypto::EncryptionKey;
use crate::store::{AccessToken, ConnectionKey, NewConnection};
use crate::RunningGateway;

pub mod page;

/// The demo configuration, built into the binary so the demo runs from any directory.
pub const DEMO_TOML: &str = include_str!("../../config/demo.toml");

/// The user the demo seeds.
pub const DEMO_USER: &str = "demo-user";

/// `demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where the gateway listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the demo page (an app using the gateway) listens.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub page_listen: SocketAddr,
    /// Where the gateway's admin listener (probes, metrics, admin API) listens.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,
}

/// A running demo: simulator, gateway, demo page and the temporary directory holding store and
/// key.
pub struct Demo {
    pub sim: SimHandle,
    pub gateway: RunningGateway,
    /// The demo page, an app of its own that calls the gateway over HTTP.
    pub page: ServerThread,
    /// A caller JWT of the demo service, valid for a day.
    pub caller_token: String,
    /// The admin API's credential (generated for this demo).
    pub admin_credential: String,
    _log_writer: crate::telemetry::LogGuard,
    _dir: tempfile::TempDir,
}

/// Starts the demo pieces and seeds [`DEMO_USER`]. `page_listen` and `admin_listen` may have
/// port 0.
pub fn start(
    listen: SocketAddr,
    page_listen: SocketAddr,
    admin_listen: SocketAddr,
) -> Result<Demo, String> {
    let page_listener = std::net::TcpListener::bind(page_listen)
        .map_err(|e| format!("cannot listen on {page_listen} for the demo page: {e}"))?;
    let page_addr = page_listener
        .local_addr()
        .map_err(|e| format!("demo page listener: {e}"))?;
    let sim = crate::sim::spawn(SimConfig::default().with_control())
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let key_path = dir.path().join("store.key");
    let secret_path = dir.path().join("client-secret");
    let caller_key_path = dir.path().join("caller.key");
    let state_key_path = dir.path().join("state.key");
    let admin_path = dir.path().join("admin-credential");
    let admin_credential = EncryptionKey::generate().to_base64();
    let write_key = |path: &std::path::Path| {
        std::fs::write(path, EncryptionKey::generate().to_base64().expose_secret())
    };
    write_key(&key_path)
        .and_then(|()| write_key(&caller_key_path))
        .and_then(|()| write_key(&state_key_path))
        .and_then(|()| std::fs::write(&admin_path, admin_credential.expose_secret()))
        .and_then(|()| std::fs::write(&secret_path, SimConfig::default().client_secret))
        .map_err(|e| format!("cannot write demo secrets: {e}"))?;

    let mut file: ConfigFile = toml::from_str(DEMO_TOML).map_err(|e| e.to_string())?;
    file.listener.address = Some(listen.to_string());
    file.admin.address = Some(admin_listen.to_string());
    file.admin.credential = Some(SecretRef::File(admin_path));
    file.upstream.base_url = Some(sim.base_url());
    file.store.path = Some(dir.path().join("tokens.db"));
    file.store.encryption_key = Some(SecretRef::File(key_path));
    file.client.secret = Some(SecretRef::File(secret_path));
    for key in &mut file.callers.keys {
        key.secret = Some(SecretRef::File(caller_key_path.clone()));
    }
    if let Some(connect) = &mut file.connect {
        connect.callback_url = Some(format!("http://{listen}/callback"));
        connect.allowed_redirects = vec![format!("http://{page_addr}/demo/")];
        connect.state_key = Some(SecretRef::File(state_key_path));
    }
    let config = Config::from_file(&file, Path::new(".")).map_err(|e| e.to_string())?;
    let log_writer = crate::telemetry::init(&config.telemetry);

    let store = crate::open_store(&config, crate::OpenWait::Once).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let grant = sim
            .control()
            .create_grant(DEMO_USER)
            .await
            .map_err(|e| format!("cannot seed the demo user: {e}"))?;
        let now = SystemClock.now();
        let connection = NewConnection {
            refresh_token: SecretString::from(grant.refresh_token),
            access: Some(AccessToken {
                token: SecretString::from(grant.access_token),
                expires_at: now + grant.expires_in as i64,
            }),
            scope: None,
        };
        let key = ConnectionKey::user(DEMO_USER).map_err(|e| e.to_string())?;
        store
            .put_connection(&key, &connection, now)
            .await
            .map_err(|e| e.to_string())
    })?;

    let caller_token = mint_demo_token(&config.callers, Duration::from_secs(24 * 3600))?;
    let gateway =
        RunningGateway::start(config, store, Arc::new(SystemClock)).map_err(|e| e.to_string())?;
    let page = page::spawn(page_listener, gateway.base_url(), caller_token.clone())
        .map_err(|e| format!("cannot start the demo page: {e}"))?;
    Ok(Demo {
        sim,
        gateway,
        page,
        admin_credential: admin_credential.expose_secret().to_owned(),
        caller_token,
        _log_writer: log_writer,
        _dir: dir,
    })
}

/// A caller token for the demo service of `config/demo.toml`, valid for `ttl`.
pub fn mint_demo_token(callers: &CallerAuth, ttl: Duration) -> Result<String, String> {
    callers
        .mint(
            "demo-hmac",
            "demo",
            "demo-service",
            None,
            ttl,
            serde_json::Map::new(),
        )
        .map_err(|e| format!("cannot mint the demo caller token: {e}"))
}

/// Runs the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> Result<(), String> {
    let demo = start(args.listen, args.page_listen, args.admin_listen)?;
    let gateway = demo.gateway.base_url();
    println!(
        "\nfinx-gateway demo is running.\n\
         \n  gateway:   {gateway}\n  simulator: {sim} (finX stand-in, control plane on)\
         \n  admin:     {admin} (/healthz, /readyz, /metrics; /admin/ with the credential below)\n\
         \nA caller token for the demo service (a JWT, valid 24 h):\n\
         \n  export TOKEN={token}\n\
         \nTry it (the gateway adds the user's finX token; you never see it):\n\
         \n  curl -s {gateway}/rest/accounts -H \"Authorization: Bearer $TOKEN\" -H 'X-Finx-User: {user}'\
         \n  curl -s '{gateway}/rest/transactions?count=5' -H \"Authorization: Bearer $TOKEN\" -H 'X-Finx-User: {user}'\
         \n  curl -s {gateway}/category-tree -H \"Authorization: Bearer $TOKEN\"\
         \n  curl -s {gateway}/rest/accounts -H 'X-Finx-User: {user}'          # 401: no caller token\
         \n  curl -s {gateway}/auth/token -H \"Authorization: Bearer $TOKEN\"   # 403 route_forbidden\
         \n  curl -s {gateway}/rest/accounts -H \"Authorization: Bearer $TOKEN\" -H 'X-Finx-User: nobody'   # 404\
         \n  curl -s {sim}/_sim/stats                # what finX saw\
         \n  curl -s {admin}/metrics | grep finx_gateway_requests_total\
         \n  curl -s {admin}/admin/connections -H 'Authorization: Bearer {admin_credential}'\
         \n\nOr open {page}/demo in a browser: connect a (simulated) bank and see its accounts.\
         \n\nPress Ctrl-C to stop.",
        sim = demo.sim.base_url(),
        page = demo.page.base_url(),
        admin = demo.gateway.admin_url(),
        admin_credential = demo.admin_credential,
        user = DEMO_USER,
        token = demo.caller_token,
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(tokio::signal::ctrl_c())
        .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
    println!("stopping");
    Ok(())
}
