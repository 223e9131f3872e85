//! Configuration: the operator's TOML file ([`file`]) is parsed, then validated into the
//! internal [`Config`] the gateway runs on. Validation reports every problem at once and
//! resolves secret references, so `check-config` finds a missing key file before start-up does.

pub mod file;
pub mod secret;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use secrecy::SecretString;
use url::Url;

use crate::callers::CallerAuth;
use crate::store::crypto::KeySource;
use crate::store::postgres::{PgSettings, PgTls};

pub use file::ConfigFile;
pub use secret::SecretRef;

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
    pub telemetry: TelemetryConfig,
    pub server: ServerConfig,
    /// Caller authentication and policy, validated and with its keys loaded.
    pub callers: Arc<CallerAuth>,
    /// Connect flows; `None` keeps `/onetime/**` and `/ongoing/**` closed.
    pub connect: Option<ConnectConfig>,
}

/// Connect flows through the gateway.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    pub callback_url: Url,
    /// The path of `callback_url`, answered by the gateway.
    pub callback_path: String,
    pub allowed_redirects: Vec<RedirectRule>,
    pub state_key: SecretString,
    pub state_ttl: Duration,
    pub demo_page: bool,
}

/// One allowed return address: scheme, host and port must be equal, the path must start with
/// `path_prefix` at a segment boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectRule {
    scheme: String,
    host: String,
    port: Option<u16>,
    path_prefix: String,
}

impl RedirectRule {
    /// Parses an allow-list entry such as `https://app.example.com/finx/`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{text:?}: only http and https redirects are allowed"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(format!(
                "{text:?}: no query, fragment or user info in an allowed redirect"
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        Ok(Self {
            scheme: url.scheme().to_owned(),
            host: host.to_owned(),
            port: url.port_or_known_default(),
            path_prefix: url.path().to_owned(),
        })
    }

    /// Whether `candidate` is a return address this rule allows.
    pub fn allows(&self, candidate: &Url) -> bool {
        let path = candidate.path();
        let prefix = self.path_prefix.trim_end_matches('/');
        candidate.scheme() == self.scheme
            && candidate.host_str() == Some(self.host.as_str())
            && candidate.port_or_known_default() == self.port
            && candidate.username().is_empty()
            && candidate.password().is_none()
            && (path == prefix
                || path.starts_with(&format!("{prefix}/"))
                || path == self.path_prefix)
    }
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
    pub encryption_key: KeySource,
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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub format: LogFormat,
    /// A `tracing` env-filter directive, e.g. `info` or `finx_gateway=debug,info`.
    pub level: String,
}

/// pingora runtime settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub threads: usize,
    pub grace_period: Duration,
    /// Where listening sockets are handed over in a graceful upgrade.
    pub upgrade_sock: PathBuf,
    /// Take the listening sockets of a running gateway (`serve --upgrade`); not from the file.
    pub upgrade: bool,
}

/// Default listener: loopback, as a sidecar.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Config {
    /// Reads, parses and validates a config file. Relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = Self::read_file(path)?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Self::from_file(&file, base_dir)
    }

    /// Reads and parses a config file without validating it.
    pub fn read_file(path: &Path) -> Result<ConfigFile, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        toml::from_str(&text)
            .map_err(|e| ConfigErrors(vec![format!("{}: {}", path.display(), e.message())]))
    }

    /// Validates a parsed file, collecting every problem.
    pub fn from_file(file: &ConfigFile, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();

        let listen_text = file.listener.address.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text
            .parse::<SocketAddr>()
            .map_err(|_| {
                errors.push(format!(
                    "listener.address: {listen_text:?} is not an IP:port socket address"
                ))
            })
            .ok();

        let upstream = validate_upstream(&file.upstream, &mut errors);

        let client_id = match file.client.id.as_deref() {
            Some(id) if !id.trim().is_empty() => Some(id.to_owned()),
            _ => {
                errors.push("client.id: required".to_owned());
                None
            }
        };
        let client_secret = required_secret(
            "client.secret",
            file.client.secret.as_ref(),
            base_dir,
            &mut errors,
        );

        let upstream_token_timeout = file.upstream.token_timeout.unwrap_or(DEFAULT_TOKEN_TIMEOUT);
        let store_backend =
            validate_store(&file.store, base_dir, upstream_token_timeout, &mut errors);
        let encryption_key = key_source(file.store.encryption_key.as_ref(), base_dir, &mut errors);

        let refresh_skew = file.tokens.refresh_skew.unwrap_or(Duration::from_secs(60));
        if refresh_skew >= Duration::from_secs(3600) {
            errors.push(
                "tokens.refresh_skew: must be shorter than an access token's life (1h)".into(),
            );
        }
        let cache_capacity = file.tokens.cache_capacity.unwrap_or(1_000_000);
        if cache_capacity == 0 {
            errors.push("tokens.cache_capacity: must be at least 1".into());
        }

        let user_header = header_name(
            "routing.user_header",
            file.routing.user_header.as_deref().unwrap_or("x-finx-user"),
            &mut errors,
        );
        let flow_header = header_name(
            "routing.flow_header",
            file.routing.flow_header.as_deref().unwrap_or("x-finx-flow"),
            &mut errors,
        );

        let format = match file.telemetry.format.as_deref().unwrap_or("pretty") {
            "pretty" => Some(LogFormat::Pretty),
            "json" => Some(LogFormat::Json),
            other => {
                errors.push(format!(
                    "telemetry.format: {other:?} is neither \"pretty\" nor \"json\""
                ));
                None
            }
        };
        let level = file
            .telemetry
            .level
            .clone()
            .unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            errors.push(format!("telemetry.level: {level:?} is not a valid filter"));
        }

        let threads = file.server.threads.unwrap_or(2);
        if threads == 0 {
            errors.push("server.threads: must be at least 1".into());
        }
        let grace_period = file.server.grace_period.unwrap_or(Duration::from_secs(5));

        let connect = file
            .connect
            .as_ref()
            .and_then(|connect| validate_connect(connect, base_dir, &mut errors));
        let one_time_retention = file
            .tokens
            .one_time_retention
            .unwrap_or(Duration::from_secs(3600));
        let refresh_ahead = file.tokens.refresh_ahead.unwrap_or(0.1);
        if !(0.0..=0.9).contains(&refresh_ahead) {
            errors.push("tokens.refresh_ahead: must be between 0.0 and 0.9".into());
        }
        let forced_refresh_interval = file
            .tokens
            .forced_refresh_interval
            .unwrap_or(Duration::from_secs(60));
        let replay_body_limit = file.tokens.replay_body_limit.unwrap_or(64 * 1024);
        if replay_body_limit > 64 * 1024 {
            // pingora keeps at most 64 KiB of a request body for a retry.
            errors.push("tokens.replay_body_limit: at most 65536 bytes".into());
        }
        let keeper = validate_keeper(&file.keeper, &mut errors);
        let journal = match (&file.store.journal, &store_backend) {
            (Some(path), _) => base_dir.join(path),
            (None, Some(StoreBackend::Sqlite { path })) => {
                let mut journal = path.clone().into_os_string();
                journal.push(".journal");
                PathBuf::from(journal)
            }
            (None, _) => base_dir.join("finx-gateway.journal"),
        };

        let callers = match CallerAuth::from_file(&file.callers, base_dir) {
            Ok(callers) => {
                if let Err(e) = callers.check_listener(listen_text) {
                    errors.push(format!("callers.mode: {e}"));
                }
                Some(Arc::new(callers))
            }
            Err(caller_errors) => {
                errors.extend(caller_errors);
                None
            }
        };

        match (
            listen,
            upstream,
            client_id,
            client_secret,
            store_backend,
            encryption_key,
            user_header,
            flow_header,
            format,
            callers,
        ) {
            (
                Some(listen),
                Some(upstream),
                Some(id),
                Some(secret),
                Some(backend),
                Some(encryption_key),
                Some(user_header),
                Some(flow_header),
                Some(format),
                Some(callers),
            ) if errors.is_empty() => Ok(Config {
                listen,
                upstream,
                client: ClientConfig { id, secret },
                store: StoreConfig {
                    backend,
                    journal,
                    encryption_key,
                },
                tokens: TokensConfig {
                    refresh_skew,
                    cache_capacity,
                    one_time_retention,
                    refresh_ahead,
                    forced_refresh_interval,
                    replay_body_limit,
                },
                keeper,
                routing: RoutingConfig {
                    user_header,
                    flow_header,
                },
                telemetry: TelemetryConfig { format, level },
                server: ServerConfig {
                    threads,
                    grace_period,
                    upgrade_sock: file.server.upgrade_sock.as_ref().map_or_else(
                        || PathBuf::from("/tmp/finx-gateway-upgrade.sock"),
                        |path| base_dir.join(path),
                    ),
                    upgrade: false,
                },
                callers,
                connect,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

fn required_secret(
    key: &str,
    reference: Option<&SecretRef>,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<SecretString> {
    let Some(reference) = reference else {
        errors.push(format!(
            "{key}: required, as {{ env = \"VAR\" }} or {{ file = \"path\" }}"
        ));
        return None;
    };
    reference
        .resolve_in(base_dir)
        .map_err(|e| errors.push(format!("{key}: {e}")))
        .ok()
}

fn validate_connect(
    file: &file::ConnectFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<ConnectConfig> {
    let before = errors.len();
    let callback_url = match file.callback_url.as_deref().map(Url::parse) {
        Some(Ok(url)) if matches!(url.scheme(), "http" | "https") && url.query().is_none() => {
            Some(url)
        }
        Some(_) => {
            errors.push("connect.callback_url: must be an http(s) URL without a query".into());
            None
        }
        None => {
            errors.push("connect.callback_url: required when [connect] is present".into());
            None
        }
    };
    if file.allowed_redirects.is_empty() {
        errors.push("connect.allowed_redirects: name at least one return address".into());
    }
    let allowed_redirects: Vec<RedirectRule> = file
        .allowed_redirects
        .iter()
        .filter_map(|entry| {
            RedirectRule::parse(entry)
                .map_err(|e| errors.push(format!("connect.allowed_redirects: {e}")))
                .ok()
        })
        .collect();
    let state_key = required_secret(
        "connect.state_key",
        file.state_key.as_ref(),
        base_dir,
        errors,
    );
    if let Some(key) = &state_key {
        use secrecy::ExposeSecret;
        if key.expose_secret().len() < 32 {
            errors.push("connect.state_key: must be at least 32 bytes".into());
        }
    }
    let state_ttl = file.state_ttl.unwrap_or(Duration::from_secs(30 * 60));
    if state_ttl.is_zero() || state_ttl > Duration::from_secs(24 * 3600) {
        errors.push("connect.state_ttl: between 1 second and 24 hours".into());
    }
    if errors.len() > before {
        return None;
    }
    let callback_url = callback_url?;
    Some(ConnectConfig {
        callback_path: callback_url.path().to_owned(),
        callback_url,
        allowed_redirects,
        state_key: state_key?,
        state_ttl,
        demo_page: file.demo_page.unwrap_or(false),
    })
}

/// The finX token call's default time limit.
const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

fn validate_store(
    file: &file::StoreFile,
    base_dir: &Path,
    token_timeout: Duration,
    errors: &mut Vec<String>,
) -> Option<StoreBackend> {
    let before = errors.len();
    let kind = file.kind.as_deref().unwrap_or("sqlite");
    let postgres_only = [
        ("url", file.url.is_some()),
        ("pool_size", file.pool_size.is_some()),
        ("connect_timeout", file.connect_timeout.is_some()),
        ("statement_timeout", file.statement_timeout.is_some()),
        ("lock_timeout", file.lock_timeout.is_some()),
        ("tls", file.tls.is_some()),
        ("ca_file", file.ca_file.is_some()),
    ];
    match kind {
        "sqlite" => {
            for (name, _) in postgres_only.iter().filter(|(_, set)| *set) {
                errors.push(format!("store.{name}: only for kind = \"postgres\""));
            }
            match &file.path {
                Some(path) => (errors.len() == before).then(|| StoreBackend::Sqlite {
                    path: base_dir.join(path),
                }),
                None => {
                    errors.push("store.path: required for kind = \"sqlite\"".to_owned());
                    None
                }
            }
        }
        "postgres" => {
            if file.path.is_some() {
                errors.push("store.path: only for kind = \"sqlite\"".to_owned());
            }
            let url = required_secret("store.url", file.url.as_ref(), base_dir, errors);
            let pool_size = file.pool_size.unwrap_or(10);
            if pool_size == 0 {
                errors.push("store.pool_size: must be at least 1".into());
            }
            let connect_timeout = file.connect_timeout.unwrap_or(Duration::from_secs(5));
            let statement_timeout = file.statement_timeout.unwrap_or(Duration::from_secs(15));
            let lock_timeout = file.lock_timeout.unwrap_or(Duration::from_secs(10));
            for (name, value) in [
                ("connect_timeout", connect_timeout),
                ("statement_timeout", statement_timeout),
                ("lock_timeout", lock_timeout),
            ] {
                if value < Duration::from_millis(1) {
                    errors.push(format!("store.{name}: must be at least 1ms"));
                }
            }
            if lock_timeout >= statement_timeout {
                errors.push(
                    "store.lock_timeout: must be shorter than store.statement_timeout (a lock \
                     wait is one statement)"
                        .into(),
                );
            }
            let tls_text = file.tls.as_deref().unwrap_or("prefer");
            let tls = PgTls::parse(tls_text);
            if tls.is_none() {
                errors.push(format!(
                    "store.tls: {tls_text:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ));
            }
            let ca_file = file.ca_file.as_ref().map(|path| base_dir.join(path));
            if let Some(ca) = &ca_file {
                if !ca.is_file() {
                    errors.push(format!("store.ca_file: {} is not a file", ca.display()));
                }
            }
            match (url, tls) {
                (Some(url), Some(tls)) if errors.len() == before => {
                    Some(StoreBackend::Postgres(PgSettings {
                        url,
                        pool_size,
                        connect_timeout,
                        statement_timeout,
                        lock_timeout,
                        // Above the finX call a refresh makes while holding its lock, so
                        // PostgreSQL never ends a healthy holder's session.
                        lock_hold_limit: token_timeout + Duration::from_secs(5),
                        tls,
                        ca_file,
                    }))
                }
                _ => None,
            }
        }
        other => {
            errors.push(format!(
                "store.kind: {other:?} is neither \"sqlite\" nor \"postgres\""
            ));
            None
        }
    }
}

fn key_source(
    reference: Option<&SecretRef>,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<KeySource> {
    let source = match reference {
        Some(SecretRef::Env(var)) => KeySource::Env(var.clone()),
        Some(SecretRef::File(path)) => KeySource::File(base_dir.join(path)),
        None => {
            errors.push(
                "store.encryption_key: required, as { env = \"VAR\" } or { file = \"path\" }"
                    .to_owned(),
            );
            return None;
        }
    };
    // Load once now so a bad key is reported with the other problems, not at first use.
    match source.load() {
        Ok(_) => Some(source),
        Err(e) => {
            errors.push(format!("store.encryption_key: {e}"));
            None
        }
    }
}

fn header_name(key: &str, value: &str, errors: &mut Vec<String>) -> Option<HeaderName> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| errors.push(format!("{key}: {value:?} is not a valid header name")))
        .ok()
}

fn validate_upstream(
    file: &file::UpstreamFile,
    errors: &mut Vec<String>,
) -> Option<UpstreamConfig> {
    let Some(text) = file.base_url.as_deref() else {
        errors.push("upstream.base_url: required".to_owned());
        return None;
    };
    let base_url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            errors.push(format!("upstream.base_url: {text:?} is not a URL: {e}"));
            return None;
        }
    };
    let tls = match base_url.scheme() {
        "https" => true,
        "http" if file.allow_insecure_http == Some(true) => false,
        "http" => {
            errors.push(
                "upstream.base_url: http:// sends client credentials and tokens in clear text; \
                 use https:// or set upstream.allow_insecure_http = true (simulator only)"
                    .to_owned(),
            );
            return None;
        }
        other => {
            errors.push(format!("upstream.base_url: unsupported scheme {other:?}"));
            return None;
        }
    };
    if base_url.query().is_some()
        || base_url.fragment().is_some()
        || !base_url.username().is_empty()
    {
        errors.push("upstream.base_url: must not carry a query, fragment or user info".into());
        return None;
    }
    let Some(host) = base_url.host_str().map(str::to_owned) else {
        errors.push("upstream.base_url: has no host".into());
        return None;
    };
    let port = base_url.port_or_known_default().unwrap_or(443);
    let address = match (host.trim_matches(|c| c == '[' || c == ']'), port)
        .to_socket_addrs()
        .map(|mut addrs| addrs.next())
    {
        Ok(Some(address)) => address,
        Ok(None) | Err(_) => {
            errors.push(format!("upstream.base_url: cannot resolve host {host:?}"));
            return None;
        }
    };
    let host_header = match base_url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    };
    let pool_size = file.pool_size.unwrap_or(128);
    Some(UpstreamConfig {
        path_prefix: base_url.path().trim_end_matches('/').to_owned(),
        base_url,
        address,
        tls,
        sni: host,
        host_header,
        connect_timeout: file.connect_timeout.unwrap_or(Duration::from_secs(2)),
        read_timeout: file.read_timeout.unwrap_or(Duration::from_secs(30)),
        token_timeout: file.token_timeout.unwrap_or(DEFAULT_TOKEN_TIMEOUT),
        rotation_grace: file.rotation_grace.unwrap_or(Duration::ZERO),
        pool_size,
    })
}

fn validate_keeper(file: &file::KeeperFile, errors: &mut Vec<String>) -> Option<KeeperConfig> {
    const DAY: u64 = 24 * 3600;
    let settings = KeeperConfig {
        interval: file.interval.unwrap_or(Duration::from_secs(3600)),
        max_refresh_age: file
            .max_refresh_age
            .unwrap_or(Duration::from_secs(30 * DAY)),
        max_idle: file.max_idle.unwrap_or(Duration::from_secs(30 * DAY)),
        concurrency: file.concurrency.unwrap_or(4),
        rate_per_sec: file.rate_per_sec.unwrap_or(5),
        batch: file.batch.unwrap_or(10_000),
    };
    let lapse = Duration::from_secs(90 * DAY);
    if settings.max_refresh_age >= lapse || settings.max_idle >= lapse {
        errors.push(
            "keeper.max_refresh_age and keeper.max_idle: must be shorter than finX's 90 days"
                .into(),
        );
    }
    if settings.interval < Duration::from_millis(10) {
        errors.push("keeper.interval: must be at least 10ms".into());
    }
    if settings.concurrency == 0 || settings.rate_per_sec == 0 || settings.batch == 0 {
        errors.push(
            "keeper.concurrency, keeper.rate_per_sec, keeper.batch: must be at least 1".into(),
        );
    }
    file.enabled.unwrap_or(true).then_some(settings)
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
