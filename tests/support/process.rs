//! Gateways as real processes (`finx-gateway serve`), for crashes (SIGKILL), stops (SIGTERM,
//! SIGINT) and upgrades (SIGQUIT): config files in a directory of their own, the process's
//! stderr captured to a file, signals sent with `kill(2)`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::{ConnectionKey, NewConnection, TokenStore};
use secrecy::{ExposeSecret, SecretString};

/// Keys, the client secret and config files for gateway processes, in a directory of their own.
/// The admin credential of every config the setup writes.
pub const ADMIN_TOKEN: &str = "test-admin-credential-0123456789";

pub struct ProcessSetup {
    pub dir: tempfile::TempDir,
    sim_url: String,
}

impl ProcessSetup {
    pub fn new(sim_url: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["store.key", "caller.key"] {
            std::fs::write(
                dir.path().join(name),
                EncryptionKey::generate().to_base64().expose_secret(),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("client-secret"), "demo-secret\n").unwrap();
        std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
        Self { dir, sim_url }
    }

    /// A config named `name` listening on `listen`; `store` is the body of `[store]` (the
    /// setup's encryption key unless it names one), `extra` more TOML (sections of its own).
    pub fn config(&self, name: &str, listen: SocketAddr, store: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let key = if store.contains("encryption_key") {
            ""
        } else {
            "encryption_key = { file = \"store.key\" }"
        };
        let admin = if extra.contains("[admin]") {
            String::new()
        } else {
            format!(
                "[admin]\naddress = \"{}\"\ncredential = {{ file = \"admin-token\" }}",
                free_port()
            )
        };
        std::fs::write(
            &path,
            format!(
                r#"
[listener]
address = "{listen}"
{admin}
[upstream]
base_url = "{sim}"
allow_insecure_http = true
token_timeout = "5s"
[client]
id = "demo-client"
secret = {{ file = "client-secret" }}
[store]
{key}
{store}
[telemetry]
level = "info"
format = "json"
[callers]
issuer = ["demo"]
[[callers.keys]]
kid = "k1"
algorithms = ["HS256"]
secret = {{ file = "caller.key" }}
[[callers.services]]
name = "svc"
issuer = "demo"
subject = "svc"
connections = ["any"]
routes = ["GET /rest/**"]
{extra}
"#,
                sim = self.sim_url
            ),
        )
        .unwrap();
        path
    }

    /// The embedded store of this setup, as a `[store]` body.
    pub fn sqlite_store() -> &'static str {
        r#"path = "tokens.db""#
    }

    /// A caller JWT for the config's service.
    pub fn caller_token(&self, config: &Path) -> String {
        finx_gateway::config::Config::load(config)
            .unwrap()
            .callers
            .mint(
                "k1",
                "demo",
                "svc",
                None,
                Duration::from_secs(3600),
                Default::default(),
            )
            .unwrap()
    }

    /// The config's store, opened by the test as an operator command would.
    pub fn store(&self, config: &Path) -> Arc<dyn TokenStore> {
        let config = finx_gateway::config::Config::load(config).unwrap();
        finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).unwrap()
    }
}

/// Consents each of `users` at the simulator and stores only the refresh token in the store of
/// `config` (as an operator's import would): each user's first request refreshes.
pub async fn import_users(
    setup: &ProcessSetup,
    config: &Path,
    control: &finx_gateway::sim::SimControl,
    users: &[String],
) {
    let store = setup.store(config);
    for user in users {
        let grant = control.create_grant(user).await.unwrap();
        import(&store, user, grant.refresh_token).await;
    }
}

/// Stores `refresh_token` for `user` without an access token: the first request refreshes.
pub async fn import(store: &Arc<dyn TokenStore>, user: &str, refresh_token: String) {
    store
        .put_connection(
            &ConnectionKey::user(user).unwrap(),
            &NewConnection {
                refresh_token: SecretString::from(refresh_token),
                access: None,
                scope: None,
            },
            0,
        )
        .await
        .unwrap();
}

/// A gateway process; killed (SIGKILL) when dropped if still running.
pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    stderr: PathBuf,
}

impl GatewayProcess {
    /// `finx-gateway serve --config CONFIG [args…]` with `env` added.
    pub fn spawn(
        config: &Path,
        addr: SocketAddr,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let stderr = config.with_file_name(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
            .args(["serve", "--config"])
            .arg(config)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("FAILPOINTS")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("gateway process starts");
        Self {
            child,
            addr,
            stderr,
        }
    }

    pub fn wait_until_serving(&self) {
        finx_gateway::wait_until_accepting(self.addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        let sent = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(sent, 0, "kill({signal}) failed");
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL: a crash, nothing runs after it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on.
pub fn free_port() -> SocketAddr {
    finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).unwrap()
}

/// `GET /rest/accounts` for `user` through `base`.
pub async fn get(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    user: &str,
) -> reqwest::Result<reqwest::Response> {
    http.get(format!("{base}/rest/accounts"))
        .bearer_auth(token)
        .header("x-finx-user", user)
        .send()
        .await
}

/// The store gateway processes share in a test: a SQLite file in the setup's directory, or a
/// PostgreSQL database of the test's own.
pub struct ProcessStore {
    pub database: Option<super::pg::TestDatabase>,
}

impl ProcessStore {
    pub fn new(kind: super::StoreKind) -> Self {
        Self {
            database: (kind == super::StoreKind::Postgres).then(super::pg::TestDatabase::create),
        }
    }

    /// The `[store]` body for the process named `name` (each replica has a journal of its own;
    /// processes that follow each other under one name share it, as a restarted one would).
    pub fn fragment(&self, setup: &ProcessSetup, name: &str) -> String {
        match &self.database {
            None => ProcessSetup::sqlite_store().to_owned(),
            Some(database) => {
                std::fs::write(setup.dir.path().join("database.url"), &database.url).unwrap();
                format!(
                    "kind = \"postgres\"\nurl = {{ file = \"database.url\" }}\n\
                     journal = \"{name}.journal\"\npool_size = 10\ntls = \"disable\""
                )
            }
        }
    }
}

/// What every process test starts with: a simulator (in this process), keys and configs, the
/// store the processes share, and the port they listen on (one after the other).
pub struct Rig {
    pub sim: finx_gateway::sim::SimHandle,
    pub control: finx_gateway::sim::SimControl,
    pub setup: ProcessSetup,
    pub store: ProcessStore,
    pub addr: SocketAddr,
}

impl Rig {
    pub fn new(kind: super::StoreKind, sim: finx_gateway::sim::SimConfig) -> Self {
        let sim = finx_gateway::sim::spawn(sim).unwrap();
        let control = sim.control();
        let setup = ProcessSetup::new(sim.base_url());
        Self {
            sim,
            control,
            setup,
            store: ProcessStore::new(kind),
            addr: free_port(),
        }
    }
}
