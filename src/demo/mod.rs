//! `finx-gateway demo`: the simulator and the gateway on loopback, a throwaway store with a
//! generated key, one seeded user, and curl commands to try. Runs until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::callers::CallerAuth;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigFile, SecretRef};
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
}

/// A running demo: simulator, gateway and the temporary directory holding store and key.
pub struct Demo {
    pub sim: SimHandle,
    pub gateway: RunningGateway,
    /// A caller JWT of the demo service, valid for a day.
    pub caller_token: String,
    _log_writer: crate::telemetry::WorkerGuard,
    _dir: tempfile::TempDir,
}

/// Starts the demo pieces and seeds [`DEMO_USER`].
pub fn start(listen: SocketAddr) -> Result<Demo, String> {
    let sim = crate::sim::spawn(SimConfig::default().with_control())
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let key_path = dir.path().join("store.key");
    let secret_path = dir.path().join("client-secret");
    let caller_key_path = dir.path().join("caller.key");
    let state_key_path = dir.path().join("state.key");
    let write_key = |path: &std::path::Path| {
        std::fs::write(path, EncryptionKey::generate().to_base64().expose_secret())
    };
    write_key(&key_path)
        .and_then(|()| write_key(&caller_key_path))
        .and_then(|()| write_key(&state_key_path))
        .and_then(|()| std::fs::write(&secret_path, SimConfig::default().client_secret))
        .map_err(|e| format!("cannot write demo secrets: {e}"))?;

    let mut file: ConfigFile = toml::from_str(DEMO_TOML).map_err(|e| e.to_string())?;
    file.listener.address = Some(listen.to_string());
    file.upstream.base_url = Some(sim.base_url());
    file.store.path = Some(dir.path().join("tokens.db"));
    file.store.encryption_key = Some(SecretRef::File(key_path));
    file.client.secret = Some(SecretRef::File(secret_path));
    for key in &mut file.callers.keys {
        key.secret = Some(SecretRef::File(caller_key_path.clone()));
    }
    if let Some(connect) = &mut file.connect {
        connect.callback_url = Some(format!("http://{listen}/callback"));
        connect.allowed_redirects = vec![format!("http://{listen}/demo/")];
        connect.state_key = Some(SecretRef::File(state_key_path));
        connect.demo_page = Some(true);
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
    Ok(Demo {
        sim,
        gateway,
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
    let demo = start(args.listen)?;
    let gateway = demo.gateway.base_url();
    println!(
        "\nfinx-gateway demo is running.\n\
         \n  gateway:   {gateway}\n  simulator: {sim} (finX stand-in, control plane on)\n\
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
         \n\nOr open {gateway}/demo in a browser: connect a (simulated) bank and see its accounts.\
         \n\nPress Ctrl-C to stop.",
        sim = demo.sim.base_url(),
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
