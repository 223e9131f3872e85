//! Configuration: the operator's TOML file ([`file`]) is parsed, then validated into the
//! internal [`Config`] the gateway runs on, in two steps ([`validate`]): a pure check of every
//! section (`check-config --offline`), then the resolution of what lies outside the file
//! (secrets, the store key, finX's address, caller keys). Each step reports every problem it
//! finds at once.
//!
//! Above the domain modules: it builds their settings types (`ConnectSettings`,
//! `KeeperSettings`, `PgSettings`, `TelemetrySettings`, the caller authentication); none of them
//! imports it.

pub mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use secrecy::SecretString;
use url::Url;

use crate::admin::AdminSettings;
use crate::callers::CallerAuth;
use crate::connect::ConnectSettings;
use crate::events::EventSettings;
use crate::store::postgres::PgSettings;
pub use crate::telemetry::{LogFormat, TelemetrySettings};

pub use crate::secret::SecretRef;
pub use file::ConfigFile;

/// Every problem found in a config file, in the order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub client: ClientConfig,
    pub store: StoreConfig,
    pub tokens: TokensConfig,
    /// Refreshing idle connections; `None` when `[keeper] enabled = false`.
    pub keeper: Option<KeeperConfig>,
    pub routing: RoutingConfig,
    pub telemetry: TelemetrySettings,
    pub server: ServerConfig,
    /// The admin listener.
    pub admin: AdminSettings,
    /// Caller authentication and policy, validated and with its keys loaded.
    pub callers: Arc<CallerAuth>,
    /// Connect flows; `None` keeps `/onetime/**` and `/ongoing/**` closed.
    pub connect: Option<ConnectSettings>,
    /// Connection events: the near-lapse window, the webhooks (secrets read) and their retries.
    pub events: EventSettings,
}

/// finX, resolved once at start-up so the request path never does DNS.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: Url,
    /// The resolved socket address of the base URL's host.
    pub address: SocketAddr,
    pub tls: bool,
    /// TLS server name (the host name).
    pub sni: String,
    /// `Host` header value (host, plus port when not the scheme's default).
    pub host_header: String,
    /// Path of the base URL without its trailing slash ("" for none); prefixed to every path.
    pub path_prefix: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Total time allowed for one `/auth/token` call.
    pub token_timeout: Duration,
    /// How long finX accepts a just-rotated refresh token once more (0: strict rotation).
    pub rotation_grace: Duration,
    /// Idle upstream connections kept per thread.
    pub pool_size: usize,
}

/// The finX client credentials.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub id: String,
    pub secret: SecretString,
}

/// The token store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// The local journal of grants the store refused.
    pub journal: PathBuf,
    /// Where the encryption key is read from (checked during validation).
    pub encryption_key: SecretRef,
    /// Keys that still decrypt what they sealed until a key rotation has re-sealed it under
    /// `encryption_key` (checked during validation).
    pub previous_keys: Vec<SecretRef>,
}

/// Which store, and how to reach it.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// Embedded SQLite: one gateway process per file.
    Sqlite { path: PathBuf },
    /// Shared PostgreSQL: any number of replicas.
    Postgres(PgSettings),
}

impl StoreConfig {
    /// A description for logs and `check-config` (never the database URL).
    pub fn describe(&self) -> String {
        match &self.backend {
            StoreBackend::Sqlite { path } => format!("sqlite {}", path.display()),
            StoreBackend::Postgres(settings) => {
                format!("postgres (pool {})", settings.pool_size)
            }
        }
    }
}

/// Token caching and refresh.
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// Refresh when less than this remains of an access token's life.
    pub refresh_skew: Duration,
    /// Maximum number of cached access tokens.
    pub cache_capacity: u64,
    /// How long one-time flow connections are kept.
    pub one_time_retention: Duration,
    /// The share of a token's life, at its end, in which it is refreshed in the background.
    pub refresh_ahead: f64,
    /// At most one refresh forced by a finX 401 per connection per this interval.
    pub forced_refresh_interval: Duration,
    /// Request bodies up to this size are kept for a replay after a finX 401.
    pub replay_body_limit: usize,
}

/// The keeper of idle connections; `None` in [`Config::keeper`] when disabled.
pub type KeeperConfig = crate::tokens::keeper::KeeperSettings;

/// How callers name the connection a request is for.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub user_header: HeaderName,
    pub flow_header: HeaderName,
}

/// pingora runtime settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub threads: usize,
    /// One work-stealing runtime for all threads (`true`, the default) or a runtime per thread
    /// (`false`). Measured within noise of each other for one or two threads (README
    /// "Performance"); with pingora 0.9 a per-thread server stopped inside a running process
    /// (tests, the demo) keeps failing to accept and logging so, hence the default.
    pub work_stealing: bool,
    pub grace_period: Duration,
    /// Where listening sockets are handed over in a graceful upgrade.
    pub upgrade_sock: PathBuf,
    /// Take the listening sockets of a running gateway (`serve --upgrade`); not from the file.
    pub upgrade: bool,
}

/// Default listener: loopback, as a sidecar.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Config {
    /// Reads, parses and validates a config file (both steps). Relative paths in it are
    /// relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = Self::read_file(path)?;
        Self::from_file(&file, base_dir_of(path))
    }

    /// Reads, parses and checks a config file without leaving the process: no secret is read,
    /// no host name resolved, no key loaded (`check-config --offline`).
    pub fn check_path(path: &Path) -> Result<(), ConfigErrors> {
        let file = Self::read_file(path)?;
        Self::check(&file, base_dir_of(path))
    }

    /// Reads and parses a config file without validating it.
    pub fn read_file(path: &Path) -> Result<ConfigFile, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        toml::from_str(&text)
            .map_err(|e| ConfigErrors(vec![format!("{}: {}", path.display(), e.message())]))
    }

    /// Step 1: checks every section of a parsed file, purely, collecting every problem.
    pub fn check(file: &ConfigFile, base_dir: &Path) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        validate::validate(
            file,
            base_dir,
            &mut errors,
            &mut validate::Resolver::offline(),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Both steps: the check, then, if it passed, the resolution of secrets, keys and
    /// addresses, with its own list of problems.
    pub fn from_file(file: &ConfigFile, base_dir: &Path) -> Result<Config, ConfigErrors> {
        Self::check(file, base_dir)?;
        let mut errors = Vec::new();
        let mut resolver = validate::Resolver::online();
        match validate::validate(file, base_dir, &mut errors, &mut resolver) {
            Some(config) => Ok(config),
            None => {
                errors.extend(resolver.errors);
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// The directory relative paths in the config file at `path` are relative to.
fn base_dir_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Config::from_file(&file, Path::new("."))
    }

    #[test]
    fn reports_every_error_at_once() {
        let errors = parse(
            r#"
            [listener]
            address = "nope"
            [upstream]
            base_url = "http://127.0.0.1:9"
            [tokens]
            cache_capacity = 0
            [telemetry]
            format = "xml"
            "#,
        )
        .unwrap_err();
        let all = errors.to_string();
        for needle in [
            "listener.address",
            "allow_insecure_http",
            "client.id",
            "client.secret",
            "store.path",
            "store.encryption_key",
            "cache_capacity",
            "telemetry.format",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }

    #[test]
    fn unknown_keys_and_inline_secrets_are_refused() {
        assert!(parse("[upstream]\nbase_urll = \"https://x\"").is_err());
        assert!(parse("[client]\nsecret = \"inline\"").is_err());
    }
}
