//! Validation of a parsed config file, section by section, in two steps.
//!
//! 1. **Check** (pure): every section validates its own keys, types, ranges and combinations
//!    into one error list. No file, environment variable, name server or key is touched, so
//!    `check-config --offline` runs anywhere.
//! 2. **Resolve**: only once the check passed, the same pass runs again with a [`Resolver`] that
//!    reads the secrets, loads the store key, resolves finX's host name and loads the caller
//!    keys and JWKS file, collecting its own error list.
//!
//! The section functions take the resolver and ask it for what needs the outside world; an
//! offline resolver answers `None` without an error, so the check step cannot build a
//! [`Config`] and stops after collecting errors.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::file::{self, ConfigFile};
use super::{
    ClientConfig, Config, KeeperConfig, RoutingConfig, ServerConfig, StoreBackend, StoreConfig,
    TokensConfig, UpstreamConfig, DEFAULT_LISTEN,
};
use crate::admin::{AdminSettings, DEFAULT_ADMIN_ADDRESS};
use crate::callers::{CallerAuth, CallerSettings, CallersFile};
use crate::connect::{ConnectSettings, RedirectRule};
use crate::events::{DeliverySettings, EventSettings, Webhook, DEFAULT_NEAR_LAPSE_DAYS};
use crate::secret::SecretRef;
use crate::store::crypto::EncryptionKey;
use crate::store::postgres::{PgSettings, PgTls};
use crate::telemetry::{LogFormat, TelemetrySettings};

/// The finX token call's default time limit.
const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the validation may ask of the world outside the file. Offline (step 1) it answers
/// nothing; online (step 2) it reads, resolves and loads, and records what failed.
pub(super) struct Resolver {
    online: bool,
    pub(super) errors: Vec<String>,
}

impl Resolver {
    pub(super) fn offline() -> Self {
        Self {
            online: false,
            errors: Vec::new(),
        }
    }

    pub(super) fn online() -> Self {
        Self {
            online: true,
            errors: Vec::new(),
        }
    }

    /// Reads the secret `reference` names (already anchored to the config's directory).
    fn secret(&mut self, key: &str, reference: &SecretRef) -> Option<SecretString> {
        if !self.online {
            return None;
        }
        reference
            .resolve()
            .map_err(|e| self.errors.push(format!("{key}: {e}")))
            .ok()
    }

    /// Loads the store's encryption key once, so a bad key is reported with the rest.
    fn encryption_key(&mut self, source: &SecretRef) -> Option<()> {
        self.store_key("store.encryption_key", source)
    }

    /// Loads a store key (`key` names it in errors), reporting a bad one with the rest.
    fn store_key(&mut self, key: &str, source: &SecretRef) -> Option<()> {
        if !self.online {
            return None;
        }
        EncryptionKey::load(source)
            .map(drop)
            .map_err(|e| self.errors.push(format!("{key}: {e}")))
            .ok()
    }

    /// Resolves finX's host name once, at start-up: the request path never does DNS.
    fn address(&mut self, host: &str, port: u16) -> Option<SocketAddr> {
        if !self.online {
            return None;
        }
        match (host.trim_matches(|c| c == '[' || c == ']'), port)
            .to_socket_addrs()
            .map(|mut addrs| addrs.next())
        {
            Ok(Some(address)) => Some(address),
            Ok(None) | Err(_) => {
                self.errors
                    .push(format!("upstream.base_url: cannot resolve host {host:?}"));
                None
            }
        }
    }

    /// Whether a file the config names exists.
    fn file_exists(&mut self, key: &str, path: &Path) -> Option<()> {
        if !self.online {
            return None;
        }
        if path.is_file() {
            Some(())
        } else {
            self.errors
                .push(format!("{key}: {} is not a file", path.display()));
            None
        }
    }

    /// Loads the caller keys and the JWKS file.
    fn callers(&mut self, settings: CallerSettings) -> Option<CallerAuth> {
        if !self.online {
            return None;
        }
        CallerAuth::resolve(settings)
            .map_err(|errors| self.errors.extend(errors))
            .ok()
    }
}

/// Validates every section of `file` into `errors`, asking `resolver` for what needs the
/// outside world. Returns the config when nothing failed and the resolver is online.
pub(super) fn validate(
    file: &ConfigFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<Config> {
    let (listen_text, listen) = listener(&file.listener, errors);
    let upstream = upstream(&file.upstream, errors, resolver);
    let client = client(&file.client, base_dir, errors, resolver);
    let token_timeout = file.upstream.token_timeout.unwrap_or(DEFAULT_TOKEN_TIMEOUT);
    let store = store(&file.store, base_dir, token_timeout, errors, resolver);
    let tokens = tokens(&file.tokens, errors);
    let keeper = keeper(&file.keeper, errors);
    let routing = routing(&file.routing, errors);
    let telemetry = telemetry(&file.telemetry, errors);
    let server = server(&file.server, base_dir, errors);
    let admin = admin(&file.admin, base_dir, errors, resolver);
    let connect = file
        .connect
        .as_ref()
        .map(|connect_file| connect(connect_file, base_dir, errors, resolver));
    let events = events(&file.events, base_dir, errors, resolver);
    let callers = callers(&file.callers, base_dir, listen_text, errors)
        .and_then(|settings| resolver.callers(settings))
        .map(Arc::new);

    let config = (|| {
        Some(Config {
            listen: listen?,
            upstream: upstream?,
            client: client?,
            store: store?,
            tokens: tokens?,
            keeper: keeper?,
            routing: routing?,
            telemetry: telemetry?,
            server: server?,
            admin: admin?,
            callers: callers?,
            connect: match connect {
                Some(settings) => Some(settings?),
                None => None,
            },
            events: events?,
        })
    })();
    config.filter(|_| errors.is_empty() && resolver.errors.is_empty())
}

fn callers(
    file: &CallersFile,
    base_dir: &Path,
    listen_text: &str,
    errors: &mut Vec<String>,
) -> Option<CallerSettings> {
    let settings = CallerSettings::check(file, base_dir)
        .map_err(|caller_errors| errors.extend(caller_errors))
        .ok()?;
    if let Err(e) = settings.check_listener(listen_text) {
        errors.push(format!("callers.mode: {e}"));
    }
    Some(settings)
}

fn listener<'f>(
    file: &'f file::ListenerFile,
    errors: &mut Vec<String>,
) -> (&'f str, Option<SocketAddr>) {
    let text = file.address.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = text
        .parse::<SocketAddr>()
        .map_err(|_| {
            errors.push(format!(
                "listener.address: {text:?} is not an IP:port socket address"
            ))
        })
        .ok();
    (text, listen)
}

/// A secret reference the file must give, anchored to the config's directory.
fn required_reference(
    key: &str,
    reference: Option<&SecretRef>,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<SecretRef> {
    match reference {
        Some(reference) => Some(reference.in_dir(base_dir)),
        None => {
            errors.push(format!(
                "{key}: required, as {{ env = \"VAR\" }} or {{ file = \"path\" }}"
            ));
            None
        }
    }
}

fn client(
    file: &file::ClientFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<ClientConfig> {
    let id = match file.id.as_deref() {
        Some(id) if !id.trim().is_empty() => Some(id.to_owned()),
        _ => {
            errors.push("client.id: required".to_owned());
            None
        }
    };
    let reference = required_reference("client.secret", file.secret.as_ref(), base_dir, errors);
    let secret = reference.and_then(|reference| resolver.secret("client.secret", &reference));
    Some(ClientConfig {
        id: id?,
        secret: secret?,
    })
}

fn upstream(
    file: &file::UpstreamFile,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
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
    let address = resolver.address(&host, port)?;
    let host_header = match base_url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    };
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
        pool_size: file.pool_size.unwrap_or(128),
    })
}

fn store(
    file: &file::StoreFile,
    base_dir: &Path,
    token_timeout: Duration,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<StoreConfig> {
    let backend = store_backend(file, base_dir, token_timeout, errors, resolver);
    let encryption_key = required_reference(
        "store.encryption_key",
        file.encryption_key.as_ref(),
        base_dir,
        errors,
    );
    let key_loaded = encryption_key
        .as_ref()
        .and_then(|source| resolver.encryption_key(source));
    // Keys that still decrypt (a key rotation in progress); every write seals under
    // `encryption_key`.
    let previous_keys: Vec<SecretRef> = file
        .previous_keys
        .iter()
        .flatten()
        .map(|reference| reference.in_dir(base_dir))
        .collect();
    let previous_loaded = previous_keys
        .iter()
        .enumerate()
        .map(|(index, source)| resolver.store_key(&format!("store.previous_keys[{index}]"), source))
        .collect::<Vec<_>>();
    let journal = match (&file.journal, &backend) {
        (Some(path), _) => base_dir.join(path),
        (None, Some(StoreBackend::Sqlite { path })) => {
            let mut journal = path.clone().into_os_string();
            journal.push(".journal");
            PathBuf::from(journal)
        }
        (None, _) => base_dir.join("finx-gateway.journal"),
    };
    key_loaded?;
    previous_loaded.into_iter().collect::<Option<Vec<()>>>()?;
    Some(StoreConfig {
        backend: backend?,
        journal,
        encryption_key: encryption_key?,
        previous_keys,
    })
}

fn store_backend(
    file: &file::StoreFile,
    base_dir: &Path,
    token_timeout: Duration,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
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
            let url = required_reference("store.url", file.url.as_ref(), base_dir, errors);
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
            if errors.len() > before {
                return None;
            }
            let url = url.and_then(|url| resolver.secret("store.url", &url));
            if let Some(ca) = &ca_file {
                resolver.file_exists("store.ca_file", ca)?;
            }
            Some(StoreBackend::Postgres(PgSettings {
                url: url?,
                pool_size,
                connect_timeout,
                statement_timeout,
                lock_timeout,
                // Above the finX call a refresh makes while holding its lock, so PostgreSQL
                // never ends a healthy holder's session.
                lock_hold_limit: token_timeout + Duration::from_secs(5),
                tls: tls?,
                ca_file,
            }))
        }
        other => {
            errors.push(format!(
                "store.kind: {other:?} is neither \"sqlite\" nor \"postgres\""
            ));
            None
        }
    }
}

fn tokens(file: &file::TokensFile, errors: &mut Vec<String>) -> Option<TokensConfig> {
    let before = errors.len();
    let refresh_skew = file.refresh_skew.unwrap_or(Duration::from_secs(60));
    if refresh_skew >= Duration::from_secs(3600) {
        errors.push("tokens.refresh_skew: must be shorter than an access token's life (1h)".into());
    }
    let cache_capacity = file.cache_capacity.unwrap_or(1_000_000);
    if cache_capacity == 0 {
        errors.push("tokens.cache_capacity: must be at least 1".into());
    }
    let refresh_ahead = file.refresh_ahead.unwrap_or(0.1);
    if !(0.0..=0.9).contains(&refresh_ahead) {
        errors.push("tokens.refresh_ahead: must be between 0.0 and 0.9".into());
    }
    let replay_body_limit = file.replay_body_limit.unwrap_or(64 * 1024);
    if replay_body_limit > 64 * 1024 {
        // pingora keeps at most 64 KiB of a request body for a retry.
        errors.push("tokens.replay_body_limit: at most 65536 bytes".into());
    }
    (errors.len() == before).then(|| TokensConfig {
        refresh_skew,
        cache_capacity,
        one_time_retention: file.one_time_retention.unwrap_or(Duration::from_secs(3600)),
        refresh_ahead,
        forced_refresh_interval: file
            .forced_refresh_interval
            .unwrap_or(Duration::from_secs(60)),
        replay_body_limit,
    })
}

/// `Some(None)` when the keeper is disabled.
fn keeper(file: &file::KeeperFile, errors: &mut Vec<String>) -> Option<Option<KeeperConfig>> {
    const DAY: u64 = 24 * 3600;
    let before = errors.len();
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
    (errors.len() == before).then(|| file.enabled.unwrap_or(true).then_some(settings))
}

fn header_name(key: &str, value: &str, errors: &mut Vec<String>) -> Option<HeaderName> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| errors.push(format!("{key}: {value:?} is not a valid header name")))
        .ok()
}

fn routing(file: &file::RoutingFile, errors: &mut Vec<String>) -> Option<RoutingConfig> {
    let user_header = header_name(
        "routing.user_header",
        file.user_header.as_deref().unwrap_or("x-finx-user"),
        errors,
    );
    let flow_header = header_name(
        "routing.flow_header",
        file.flow_header.as_deref().unwrap_or("x-finx-flow"),
        errors,
    );
    Some(RoutingConfig {
        user_header: user_header?,
        flow_header: flow_header?,
    })
}

fn telemetry(file: &file::TelemetryFile, errors: &mut Vec<String>) -> Option<TelemetrySettings> {
    let format = match file.format.as_deref().unwrap_or("pretty") {
        "pretty" => Some(LogFormat::Pretty),
        "json" => Some(LogFormat::Json),
        other => {
            errors.push(format!(
                "telemetry.format: {other:?} is neither \"pretty\" nor \"json\""
            ));
            None
        }
    };
    let level = file.level.clone().unwrap_or_else(|| "info".to_owned());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        errors.push(format!("telemetry.level: {level:?} is not a valid filter"));
        return None;
    }
    Some(TelemetrySettings {
        format: format?,
        level,
    })
}

fn server(
    file: &file::ServerFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<ServerConfig> {
    let threads = file.threads.unwrap_or(2);
    if threads == 0 {
        errors.push("server.threads: must be at least 1".into());
        return None;
    }
    Some(ServerConfig {
        threads,
        work_stealing: file.work_stealing.unwrap_or(true),
        grace_period: file.grace_period.unwrap_or(Duration::from_secs(5)),
        upgrade_sock: file.upgrade_sock.as_ref().map_or_else(
            || PathBuf::from("/tmp/finx-gateway-upgrade.sock"),
            |path| base_dir.join(path),
        ),
        upgrade: false,
    })
}

fn admin(
    file: &file::AdminFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<AdminSettings> {
    let text = file.address.as_deref().unwrap_or(DEFAULT_ADMIN_ADDRESS);
    let address = text
        .parse::<SocketAddr>()
        .map_err(|_| {
            errors.push(format!(
                "admin.address: {text:?} is not an IP:port socket address"
            ))
        })
        .ok();
    let credential = match &file.credential {
        Some(reference) => {
            let reference = reference.in_dir(base_dir);
            Some(resolver.secret("admin.credential", &reference)?)
        }
        None => None,
    };
    if let Some(credential) = &credential {
        if credential.expose_secret().len() < 16 {
            resolver
                .errors
                .push("admin.credential: must be at least 16 characters".into());
            return None;
        }
    }
    Some(AdminSettings {
        address: address?,
        credential,
    })
}

fn connect(
    file: &file::ConnectFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<ConnectSettings> {
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
    let state_key = required_reference(
        "connect.state_key",
        file.state_key.as_ref(),
        base_dir,
        errors,
    );
    let state_ttl = file.state_ttl.unwrap_or(Duration::from_secs(30 * 60));
    if state_ttl.is_zero() || state_ttl > Duration::from_secs(24 * 3600) {
        errors.push("connect.state_ttl: between 1 second and 24 hours".into());
    }
    if errors.len() > before {
        return None;
    }
    let state_key = resolver.secret("connect.state_key", &state_key?)?;
    if state_key.expose_secret().len() < 32 {
        resolver
            .errors
            .push("connect.state_key: must be at least 32 bytes".into());
        return None;
    }
    let callback_url = callback_url?;
    Some(ConnectSettings {
        callback_path: callback_url.path().to_owned(),
        callback_url,
        allowed_redirects,
        state_key,
        state_ttl,
    })
}

/// `[events]`: ranges, and every webhook's URL and secret reference, checked purely; the
/// secrets are read by the resolver.
fn events(
    file: &file::EventsFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
    resolver: &mut Resolver,
) -> Option<EventSettings> {
    const DAY: u64 = 24 * 3600;
    let before = errors.len();
    let near_lapse_days = file.near_lapse_days.unwrap_or(DEFAULT_NEAR_LAPSE_DAYS);
    if !(1..=89).contains(&near_lapse_days) {
        errors.push("events.near_lapse_days: between 1 and 89 (finX lapses at 90 days)".into());
    }
    let defaults = DeliverySettings::default();
    let delivery = DeliverySettings {
        timeout: file.timeout.unwrap_or(defaults.timeout),
        max_attempts: file.max_attempts.unwrap_or(defaults.max_attempts),
        retry_initial: file.retry_initial.unwrap_or(defaults.retry_initial),
        retry_max: file.retry_max.unwrap_or(defaults.retry_max),
    };
    if delivery.timeout < Duration::from_millis(1) || delivery.timeout > Duration::from_secs(300) {
        errors.push("events.timeout: between 1ms and 5m".into());
    }
    if !(1..=100).contains(&delivery.max_attempts) {
        errors.push("events.max_attempts: between 1 and 100".into());
    }
    if delivery.retry_initial < Duration::from_millis(1) {
        errors.push("events.retry_initial: must be at least 1ms".into());
    }
    if delivery.retry_max < delivery.retry_initial || delivery.retry_max > Duration::from_secs(DAY)
    {
        errors.push("events.retry_max: at least events.retry_initial, at most 24h".into());
    }
    let mut checked = Vec::new();
    for (index, webhook) in file.webhooks.iter().enumerate() {
        let at = format!("events.webhooks[{index}]");
        let url = match webhook.url.as_deref().map(Url::parse) {
            Some(Ok(url))
                if matches!(url.scheme(), "http" | "https")
                    && url.host_str().is_some_and(|host| !host.is_empty())
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.fragment().is_none() =>
            {
                Some(url)
            }
            Some(_) => {
                errors.push(format!(
                    "{at}.url: must be an http(s) URL with a host, without user info or fragment"
                ));
                None
            }
            None => {
                errors.push(format!("{at}.url: required"));
                None
            }
        };
        if let Some(url) = &url {
            if checked.iter().any(|(seen, _): &(Url, _)| seen == url) {
                errors.push(format!("{at}.url: listed twice"));
            }
        }
        let secret = required_reference(
            &format!("{at}.secret"),
            webhook.secret.as_ref(),
            base_dir,
            errors,
        );
        if let (Some(url), Some(secret)) = (url, secret) {
            checked.push((url, secret));
        }
    }
    if errors.len() > before {
        return None;
    }
    let mut webhooks = Vec::new();
    for (index, (url, reference)) in checked.into_iter().enumerate() {
        let key = format!("events.webhooks[{index}].secret");
        let Some(secret) = resolver.secret(&key, &reference) else {
            continue;
        };
        if secret.expose_secret().len() < 16 {
            resolver
                .errors
                .push(format!("{key}: must be at least 16 bytes"));
            continue;
        }
        webhooks.push(Webhook { url, secret });
    }
    if webhooks.len() < file.webhooks.len() {
        return None;
    }
    Some(EventSettings {
        near_lapse: Duration::from_secs(near_lapse_days * DAY),
        webhooks,
        delivery,
    })
}
