//! Test harness: the simulator and the gateway in-process on ephemeral loopback ports, a
//! throwaway store, a manual clock, captured logs and a raw-socket HTTP client for path
//! spellings a normal client would "fix".

#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod fixtures;
pub mod pg;
pub mod process;
pub mod webhook;

pub use process::ADMIN_TOKEN;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use finx_gateway::clock::{Clock, ManualClock};
use finx_gateway::config::{Config, ConfigFile, LogFormat, SecretRef};
use finx_gateway::sim::{SimConfig, SimControl, SimHandle};
use finx_gateway::store::crypto::EncryptionKey;
use finx_gateway::store::faulty::FaultyStore;
use finx_gateway::store::{
    AccessToken, Connection, ConnectionKey, ConnectionStatus, ConnectionSummary, CopyOutcome,
    NewConnection, RefreshIntent, RefreshLease, StoreError, TokenGrant, TokenStore,
};
use finx_gateway::RunningGateway;
use secrecy::{ExposeSecret, SecretString};
use std::sync::atomic::{AtomicUsize, Ordering};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The app's return address every test flow uses (allowed by the harness's gateway).
pub const APP_RETURN: &str = "https://app.example/finx/return";

/// Generates `sqlite::<case>` and `postgres::<case>` tests, each calling `<case>(StoreKind)`:
/// the fault and lifecycle tests run on both stores.
#[macro_export]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::support::StoreKind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::support::StoreKind::Postgres).await
                }
            )*
        }
    };
}

/// Which token store a harness's gateways use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// Everything a gateway test needs. Dropping it stops gateway and simulator.
pub struct Harness {
    /// The test's own PostgreSQL database, for `StoreKind::Postgres`.
    pub database: Option<pg::TestDatabase>,
    pub sim: SimHandle,
    sim_config: SimConfig,
    pub control: SimControl,
    pub clock: ManualClock,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    gateway: Option<RunningGateway>,
    store: Option<Arc<dyn TokenStore>>,
    /// Fault injection into the running gateway's store (nothing injected until told).
    store_faults: Option<Arc<FaultyStore>>,
    tweak: Arc<dyn Fn(&mut ConfigFile) + Send + Sync>,
    /// The gateway's address, fixed across restarts because the callback URL names it.
    listen: SocketAddr,
    /// How many of the next `commit_refresh` calls the gateway's store fails.
    pub failing_commits: Arc<AtomicUsize>,
    /// A caller JWT of the demo service (any user, the data routes).
    pub caller_token: String,
}

impl Harness {
    /// Simulator with its control plane and default rules, gateway started.
    pub fn start() -> Self {
        Self::with(SimConfig::default().with_control(), |_| {})
    }

    /// A simulator with `sim` settings and a gateway whose config file `tweak` may change.
    pub fn with(sim: SimConfig, tweak: fn(&mut ConfigFile)) -> Self {
        Self::with_store(StoreKind::Sqlite, sim, tweak)
    }

    /// As [`Harness::with`], on the given kind of store.
    pub fn with_store(kind: StoreKind, sim: SimConfig, tweak: fn(&mut ConfigFile)) -> Self {
        Self::with_config(kind, sim, tweak)
    }

    /// As [`Harness::with_store`], with a `tweak` that may capture what it needs (a test
    /// server's address, a secret file).
    pub fn with_config(
        kind: StoreKind,
        sim: SimConfig,
        tweak: impl Fn(&mut ConfigFile) + Send + Sync + 'static,
    ) -> Self {
        capture_logs();
        let sim_config = sim.clone();
        let sim = finx_gateway::sim::spawn(sim).expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["store.key", "caller.key", "state.key"] {
            std::fs::write(
                dir.path().join(name),
                EncryptionKey::generate().to_base64().expose_secret(),
            )
            .expect("key file");
        }
        let control = sim.control();
        let database = (kind == StoreKind::Postgres).then(pg::TestDatabase::create);
        let mut harness = Self {
            database,
            sim,
            sim_config,
            control,
            clock: ManualClock::default(),
            dir,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            gateway: None,
            store: None,
            store_faults: None,
            tweak: Arc::new(tweak),
            caller_token: String::new(),
            listen: finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).expect("free port"),
            failing_commits: Arc::default(),
        };
        harness.caller_token = finx_gateway::demo::mint_demo_token(&harness.config().callers, DAY)
            .expect("caller token");
        harness.start_gateway();
        harness
    }

    /// The gateway config this harness runs.
    pub fn config_file(&self) -> ConfigFile {
        let secret_path = self.dir.path().join("client-secret");
        std::fs::write(&secret_path, self.sim_config().client_secret).expect("secret file");
        let mut file = ConfigFile::default();
        file.listener.address = Some(self.listen.to_string());
        let admin_path = self.dir.path().join("admin-token");
        std::fs::write(&admin_path, ADMIN_TOKEN).expect("admin token file");
        file.admin.address = Some("127.0.0.1:0".into());
        file.admin.credential = Some(SecretRef::File(admin_path));
        file.upstream.base_url = Some(self.sim.base_url());
        file.upstream.allow_insecure_http = Some(true);
        file.upstream.token_timeout = Some(Duration::from_secs(5));
        file.client.id = Some(self.sim_config().client_id);
        file.client.secret = Some(SecretRef::File(secret_path));
        match &self.database {
            None => file.store.path = Some(self.store_path()),
            Some(database) => {
                let url_path = self.dir.path().join("database-url");
                std::fs::write(&url_path, &database.url).expect("url file");
                file.store.kind = Some("postgres".into());
                file.store.url = Some(SecretRef::File(url_path));
                file.store.pool_size = Some(4);
                file.store.tls = Some("disable".into());
                file.store.journal = Some(self.dir.path().join("journal"));
            }
        }
        file.store.encryption_key = Some(SecretRef::File(self.dir.path().join("store.key")));
        file.telemetry.level = Some("trace".into());
        let demo: ConfigFile = toml::from_str(finx_gateway::demo::DEMO_TOML).expect("demo config");
        file.callers = demo.callers;
        for key in &mut file.callers.keys {
            key.secret = Some(SecretRef::File(self.dir.path().join("caller.key")));
        }
        file.connect = demo.connect.map(|mut connect| {
            connect.callback_url = Some(format!("http://{}/callback", self.listen));
            connect.allowed_redirects = vec![APP_RETURN.to_owned()];
            connect.state_key = Some(SecretRef::File(self.dir.path().join("state.key")));
            connect
        });
        (self.tweak)(&mut file);
        file
    }

    pub fn sim_config(&self) -> SimConfig {
        self.sim_config.clone()
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("tokens.db")
    }

    pub fn config(&self) -> Config {
        Config::from_file(&self.config_file(), Path::new(".")).expect("valid test config")
    }

    /// (Re)starts the gateway, opening the store from disk as a new process would.
    pub fn start_gateway(&mut self) {
        self.stop_gateway();
        let config = self.config();
        let faults = Arc::new(FaultyStore::new(
            finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).expect("store opens"),
        ));
        let store: Arc<dyn TokenStore> = Arc::new(FlakyStore {
            inner: faults.clone(),
            failing_commits: self.failing_commits.clone(),
        });
        self.store_faults = Some(faults);
        let clock: Arc<dyn Clock> = Arc::new(self.clock.clone());
        self.gateway =
            Some(RunningGateway::start(config, store.clone(), clock).expect("gateway starts"));
        self.store = Some(store);
    }

    /// Restarts the gateway with its database URL routed through `route` (e.g. an
    /// [`pg::OutageProxy`]); later replicas and store handles use it too.
    pub fn restart_via(&mut self, route: impl Fn(&str) -> String) {
        let database = self.database.as_mut().expect("a PostgreSQL harness");
        database.url = route(&database.url);
        self.start_gateway();
    }

    /// Another gateway on the same store, simulator and clock, as a second sidecar would be: its
    /// own listener and its own store handle (for PostgreSQL, its own pool).
    pub fn start_replica(&self) -> RunningGateway {
        let mut config = self.config();
        config.listen = finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).expect("port");
        config.store.journal = self
            .dir
            .path()
            .join(format!("journal-{}", config.listen.port()));
        let store =
            finx_gateway::open_store(&config, finx_gateway::OpenWait::Once).expect("store opens");
        RunningGateway::start(config, store, Arc::new(self.clock.clone())).expect("replica starts")
    }

    /// A store handle of the test's own (not the gateway's), on the same data.
    pub fn open_store(&self) -> Arc<dyn TokenStore> {
        finx_gateway::open_store(&self.config(), finx_gateway::OpenWait::Once).expect("store opens")
    }

    /// Stops the gateway (and closes its store).
    pub fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop();
        }
        self.store = None;
    }

    /// Fault injection into the running gateway's store.
    pub fn store_faults(&self) -> &FaultyStore {
        self.store_faults.as_deref().expect("gateway running")
    }

    pub fn gateway(&self) -> &RunningGateway {
        self.gateway.as_ref().expect("gateway running")
    }

    pub fn store(&self) -> Arc<dyn TokenStore> {
        self.store.clone().expect("gateway running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway().base_url())
    }

    /// Advances the simulator's and the gateway's clocks together.
    pub async fn advance(&self, seconds: i64) {
        self.control
            .advance_clock(seconds)
            .await
            .expect("sim clock");
        self.clock.advance(seconds);
    }

    /// Consents `user` at the simulator and stores only its refresh token, as an import does:
    /// the first request must refresh. Returns the refresh token.
    pub async fn import_user(&self, user: &str) -> String {
        self.consent(user, false).await.refresh_token
    }

    /// Consents `user` and stores both tokens: the first request needs no refresh. Returns
    /// (access token, refresh token).
    pub async fn seed_user(&self, user: &str) -> (String, String) {
        let grant = self.consent(user, true).await;
        (grant.access_token, grant.refresh_token)
    }

    async fn consent(&self, user: &str, keep_access: bool) -> finx_gateway::sim::GrantTokens {
        let grant = self.control.create_grant(user).await.expect("sim grant");
        let access = keep_access.then(|| AccessToken {
            token: SecretString::from(grant.access_token.clone()),
            expires_at: self.clock.now() + grant.expires_in as i64,
        });
        let connection = NewConnection {
            refresh_token: SecretString::from(grant.refresh_token.clone()),
            access,
            scope: Some(grant.scope.clone()),
        };
        let key = ConnectionKey::user(user).expect("valid user id");
        self.store()
            .put_connection(&key, &connection, self.clock.now())
            .await
            .expect("store put");
        grant
    }

    /// A caller JWT for another service (`sub` = `subject`) signed with the demo key.
    pub fn token_for(&self, subject: &str) -> String {
        self.config()
            .callers
            .mint(
                "demo-hmac",
                "demo",
                subject,
                None,
                Duration::from_secs(300),
                Default::default(),
            )
            .expect("caller token")
    }

    /// A request through the gateway carrying the caller token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.caller_token)
    }

    /// `GET path` through the gateway for `user`, as the demo service.
    pub async fn get_as(&self, user: &str, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path)
            .header("x-finx-user", user)
            .send()
            .await
            .expect("gateway answers")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_gateway();
    }
}

/// The real store, with `commit_refresh` failing on demand as an unavailable database would.
struct FlakyStore {
    inner: Arc<dyn TokenStore>,
    failing_commits: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl TokenStore for FlakyStore {
    async fn load(&self, key: &ConnectionKey) -> Result<Option<Connection>, StoreError> {
        self.inner.load(key).await
    }
    async fn put_connection(
        &self,
        key: &ConnectionKey,
        new: &NewConnection,
        now: i64,
    ) -> Result<Connection, StoreError> {
        self.inner.put_connection(key, new, now).await
    }
    async fn commit_refresh(
        &self,
        key: &ConnectionKey,
        expected_version: i64,
        grant: &TokenGrant,
        now: i64,
    ) -> Result<Connection, StoreError> {
        if take_failure(&self.failing_commits) {
            return Err(StoreError::Unavailable("injected by the test".into()));
        }
        self.inner
            .commit_refresh(key, expected_version, grant, now)
            .await
    }
    async fn set_status(
        &self,
        key: &ConnectionKey,
        status: ConnectionStatus,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.set_status(key, status, now).await
    }
    async fn record_sync(&self, key: &ConnectionKey, now: i64) -> Result<(), StoreError> {
        self.inner.record_sync(key, now).await
    }
    async fn delete(&self, key: &ConnectionKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn list(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        self.inner.list().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn key_status(&self) -> Result<finx_gateway::store::KeyStatus, StoreError> {
        self.inner.key_status().await
    }
    async fn reencrypt_batch(
        &self,
        after: Option<&finx_gateway::store::RotationCursor>,
        limit: u32,
    ) -> Result<finx_gateway::store::ReencryptBatch, StoreError> {
        self.inner.reencrypt_batch(after, limit).await
    }
    async fn complete_rotation(&self) -> Result<finx_gateway::store::KeyStatus, StoreError> {
        self.inner.complete_rotation().await
    }
    async fn lock_for_refresh(
        &self,
        key: &ConnectionKey,
    ) -> Result<Box<dyn RefreshLease>, StoreError> {
        Ok(Box::new(FlakyLease {
            inner: self.inner.lock_for_refresh(key).await?,
            failing_commits: self.failing_commits.clone(),
        }))
    }
    async fn put_flow_state(
        &self,
        state_id: &str,
        flow_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner
            .put_flow_state(state_id, flow_id, expires_at, now)
            .await
    }
    async fn take_flow_state(
        &self,
        state_id: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        self.inner.take_flow_state(state_id, now).await
    }
    async fn copy_in(&self, connection: &Connection) -> Result<CopyOutcome, StoreError> {
        self.inner.copy_in(connection).await
    }
    async fn touch(&self, key: &ConnectionKey, now: i64) -> Result<(), StoreError> {
        self.inner.touch(key, now).await
    }
    async fn register_owner(&self, owner: &str) -> Result<(), StoreError> {
        self.inner.register_owner(owner).await
    }
    async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError> {
        self.inner.owner_alive(owner).await
    }
    fn liveness_epoch(&self) -> Option<u64> {
        self.inner.liveness_epoch()
    }
    async fn pending_intents(&self) -> Result<Vec<(ConnectionKey, RefreshIntent)>, StoreError> {
        self.inner.pending_intents().await
    }
    async fn due_for_keeping(
        &self,
        refreshed_before: i64,
        active_before: i64,
        limit: u32,
    ) -> Result<Vec<ConnectionKey>, StoreError> {
        self.inner
            .due_for_keeping(refreshed_before, active_before, limit)
            .await
    }
}

/// Takes one failure from the shared budget; `true` when this commit must fail.
fn take_failure(failing_commits: &AtomicUsize) -> bool {
    failing_commits
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A refresh lease whose commit fails on demand, like [`FlakyStore::commit_refresh`].
struct FlakyLease {
    inner: Box<dyn RefreshLease>,
    failing_commits: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RefreshLease for FlakyLease {
    fn current(&self) -> Option<&Connection> {
        self.inner.current()
    }
    fn intent(&self) -> Option<&RefreshIntent> {
        self.inner.intent()
    }
    async fn record_intent(
        &mut self,
        owner: &str,
        takeover: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.record_intent(owner, takeover, now).await
    }
    async fn abandon(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.abandon().await
    }
    async fn commit_refresh(
        self: Box<Self>,
        grant: &TokenGrant,
        now: i64,
    ) -> Result<Connection, StoreError> {
        if take_failure(&self.failing_commits) {
            return Err(StoreError::Unavailable("injected by the test".into()));
        }
        self.inner.commit_refresh(grant, now).await
    }
    async fn set_status(
        self: Box<Self>,
        status: ConnectionStatus,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.set_status(status, now).await
    }
    async fn delete(self: Box<Self>) -> Result<bool, StoreError> {
        self.inner.delete().await
    }
}

/// Adds to `file` a service named and identified `name`, with the demo service's rights.
pub fn add_service_like_demo<'f>(
    file: &'f mut ConfigFile,
    name: &str,
) -> &'f mut finx_gateway::callers::ServiceFile {
    let template = file.callers.services[0].clone();
    file.callers
        .services
        .push(finx_gateway::callers::ServiceFile {
            name: name.into(),
            subject: name.into(),
            ..template
        });
    file.callers.services.last_mut().expect("just pushed")
}

/// Polls `check` until it holds; fails the test when `within` passes first.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway error body's code.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Sends `request_line` + headers exactly as written and returns the status code.
pub fn raw_request(addr: SocketAddr, raw: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(raw.as_bytes()).expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the status line is complete; the gateway closes or keeps alive either way.
    while !response.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Every log line written in this test process so far.
pub fn captured_logs() -> String {
    let logs = LOGS.get_or_init(Default::default);
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs, once per test process, a subscriber that keeps every log line at trace level.
fn capture_logs() {
    let logs = LOGS.get_or_init(Default::default).clone();
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let writer = Capture(logs);
        finx_gateway::telemetry::init_with_writer(LogFormat::Json, "trace", move || writer.clone());
    });
}
