//! A gateway [`Config`] for a simulator, built the way `tests/support` builds it: the demo
//! callers with an HMAC key file, a fresh store key, the simulator's client credentials in a
//! file, and a throwaway store. Shared by the micro benches and the load harness.

use std::path::{Path, PathBuf};

use finx_gateway::config::{Config, ConfigFile, SecretRef};
use finx_gateway::sim::SimConfig;
use finx_gateway::store::crypto::EncryptionKey;
use secrecy::ExposeSecret;

/// The `[server]` settings a run overrides (`--threads`, `--work-stealing`); `None` keeps the
/// gateway's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTuning {
    pub threads: Option<usize>,
    pub work_stealing: Option<bool>,
}

/// Key files, client secret and store of one bench gateway; removed on drop.
pub struct GatewayFiles {
    dir: tempfile::TempDir,
}

impl GatewayFiles {
    /// A new directory on tmpfs (`/dev/shm`) when there is one, so that seeding 100,000
    /// connections does not wait on 100,000 disk fsyncs (`synchronous=FULL`); cache hits never
    /// touch the store, so the request path measures the same either way.
    pub fn new() -> std::io::Result<Self> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("finx-bench-")
                .tempdir_in(shm)?
        } else {
            tempfile::Builder::new().prefix("finx-bench-").tempdir()?
        };
        for name in ["store.key", "caller.key"] {
            std::fs::write(
                dir.path().join(name),
                EncryptionKey::generate().to_base64().expose_secret(),
            )?;
        }
        Ok(Self { dir })
    }

    /// A file in this directory (it need not exist yet).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The gateway config for the simulator at `sim_base_url`, listening on an ephemeral
    /// loopback port, with the `[server]` settings of `tuning`.
    pub fn config(
        &self,
        sim_base_url: &str,
        sim: &SimConfig,
        tuning: ServerTuning,
    ) -> Result<Config, String> {
        let file = self.config_file(sim_base_url, sim, tuning)?;
        Config::from_file(&file, Path::new(".")).map_err(|e| e.to_string())
    }

    /// [`Self::config`] before validation, for callers that change it first (the replicas of
    /// scenario e swap the SQLite store for PostgreSQL).
    pub fn config_file(
        &self,
        sim_base_url: &str,
        sim: &SimConfig,
        tuning: ServerTuning,
    ) -> Result<ConfigFile, String> {
        let secret_path = self.file("client-secret");
        std::fs::write(&secret_path, &sim.client_secret).map_err(|e| e.to_string())?;
        let mut file = ConfigFile::default();
        file.listener.address = Some("127.0.0.1:0".into());
        file.admin.address = Some("127.0.0.1:0".into());
        file.upstream.base_url = Some(sim_base_url.to_owned());
        file.upstream.allow_insecure_http = Some(true);
        file.client.id = Some(sim.client_id.clone());
        file.client.secret = Some(SecretRef::File(secret_path));
        file.store.path = Some(self.file("tokens.db"));
        file.store.encryption_key = Some(SecretRef::File(self.file("store.key")));
        file.server.threads = tuning.threads;
        file.server.work_stealing = tuning.work_stealing;
        let demo: ConfigFile = toml::from_str(finx_gateway::demo::DEMO_TOML)
            .map_err(|e| format!("demo config: {e}"))?;
        file.callers = demo.callers;
        for key in &mut file.callers.keys {
            key.secret = Some(SecretRef::File(self.file("caller.key")));
        }
        Ok(file)
    }
}
