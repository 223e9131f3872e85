//! The config file as written by operators (TOML, snake_case keys). Everything optional here
//! gets its default in validation (`super::Config::from_file`); unknown keys are errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::SecretRef;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub listener: ListenerFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub tokens: TokensFile,
    #[serde(default)]
    pub keeper: KeeperFile,
    #[serde(default)]
    pub routing: RoutingFile,
    #[serde(default)]
    pub telemetry: TelemetryFile,
    #[serde(default)]
    pub server: ServerFile,
    /// `[admin]`: the admin listener (probes, metrics, admin API).
    #[serde(default)]
    pub admin: AdminFile,
    /// `[callers]`: caller authentication and per-service policy (see `crate::callers`).
    #[serde(default)]
    pub callers: crate::callers::CallersFile,
    /// `[connect]`: connect flows through the gateway; absent means flows are closed.
    pub connect: Option<ConnectFile>,
    /// `[events]`: connection events and the webhooks they are delivered to.
    #[serde(default)]
    pub events: EventsFile,
}

/// `[events]`: connection events (`reauth_required`, `revoked`, `recovered`, `near_lapse`) and
/// their delivery to `[[events.webhooks]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsFile {
    /// Announce a connection whose refresh token lapses within this many days (1–89).
    pub near_lapse_days: Option<u64>,
    /// One delivery attempt's time limit.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Attempts per event and webhook, the first included.
    pub max_attempts: Option<u32>,
    /// The pause after the first failed attempt (doubling after each further one) …
    #[serde(default, with = "humantime_serde")]
    pub retry_initial: Option<Duration>,
    /// … up to this.
    #[serde(default, with = "humantime_serde")]
    pub retry_max: Option<Duration>,
    #[serde(default)]
    pub webhooks: Vec<WebhookFile>,
}

/// `[[events.webhooks]]`: where events are POSTed, and the key they are signed with.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    /// An http(s) URL.
    pub url: Option<String>,
    /// The HMAC-SHA256 key of `X-Finx-Signature` (at least 16 bytes).
    pub secret: Option<SecretRef>,
}

/// `[connect]`: widget links, the callback and the code exchange.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectFile {
    /// The gateway's callback as finX redirects browsers to it; its path is the callback route.
    pub callback_url: Option<String>,
    /// Where callers may send their users back to: scheme, host and port exact, path prefix.
    #[serde(default)]
    pub allowed_redirects: Vec<String>,
    /// The HMAC key (at least 32 bytes) that signs the gateway's flow state.
    pub state_key: Option<SecretRef>,
    /// How long a started flow may take before its state expires.
    #[serde(default, with = "humantime_serde")]
    pub state_ttl: Option<Duration>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Where the admin listener listens (default `127.0.0.1:9901`).
    pub address: Option<String>,
    /// The bearer credential `/admin/` requires; without it `/admin/` refuses everyone.
    pub credential: Option<SecretRef>,
}

/// `[listener]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: Option<String>,
}

/// `[upstream]`: where finX is and how to talk to it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub base_url: Option<String>,
    pub allow_insecure_http: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub token_timeout: Option<Duration>,
    pub pool_size: Option<usize>,
    /// How long finX accepts a just-rotated refresh token once more (0: strict rotation).
    #[serde(default, with = "humantime_serde")]
    pub rotation_grace: Option<Duration>,
}

/// `[client]`: the finX client credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub id: Option<String>,
    pub secret: Option<SecretRef>,
}

/// `[store]`: `kind = "sqlite"` (default; `path`) or `kind = "postgres"` (`url` and the pool,
/// timeout and TLS settings).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub kind: Option<String>,
    /// The SQLite database file.
    pub path: Option<PathBuf>,
    pub encryption_key: Option<SecretRef>,
    /// Keys that still decrypt during a key rotation (`encryption_key` seals every write).
    pub previous_keys: Option<Vec<SecretRef>>,
    /// The PostgreSQL URL, `{ env = "VAR" }` or `{ file = "path" }` (it may hold a password).
    pub url: Option<SecretRef>,
    /// PostgreSQL connections this process opens at most.
    pub pool_size: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// How long a refresh waits for another replica's refresh of the same connection.
    #[serde(default, with = "humantime_serde")]
    pub lock_timeout: Option<Duration>,
    /// `disable`, `prefer` (default), `require`, `verify-ca` or `verify-full`.
    pub tls: Option<String>,
    /// CA certificate (PEM) for `verify-ca` / `verify-full`.
    pub ca_file: Option<PathBuf>,
    /// The local journal of grants the store refused (default: beside the SQLite file, or
    /// `finx-gateway.journal` beside the config file for PostgreSQL).
    pub journal: Option<PathBuf>,
}

/// `[tokens]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default, with = "humantime_serde")]
    pub refresh_skew: Option<Duration>,
    pub cache_capacity: Option<u64>,
    /// How long one-time flow connections are kept (finX deletes their data after an hour).
    #[serde(default, with = "humantime_serde")]
    pub one_time_retention: Option<Duration>,
    /// The share of an access token's life, at its end, in which it is refreshed in the
    /// background while still served (0.0–0.9; at least twice `refresh_skew` either way).
    pub refresh_ahead: Option<f64>,
    /// At most one refresh forced by a finX 401 per connection per this interval.
    #[serde(default, with = "humantime_serde")]
    pub forced_refresh_interval: Option<Duration>,
    /// Request bodies up to this size are kept so an idempotent request can be replayed after
    /// a finX 401; larger ones are never replayed.
    pub replay_body_limit: Option<usize>,
}

/// `[keeper]`: refreshing idle connections before finX lets them lapse.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeeperFile {
    pub enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_refresh_age: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_idle: Option<Duration>,
    pub concurrency: Option<usize>,
    pub rate_per_sec: Option<u32>,
    pub batch: Option<u32>,
}

/// `[routing]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    pub user_header: Option<String>,
    pub flow_header: Option<String>,
}

/// `[telemetry]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// `[server]`: pingora runtime settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub threads: Option<usize>,
    /// Whether pingora's worker threads steal each other's tasks (one shared tokio runtime) or
    /// each run their own connections (a runtime per thread).
    pub work_stealing: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    /// The Unix socket over which a process started with `serve --upgrade` takes the running
    /// one's listening sockets.
    pub upgrade_sock: Option<PathBuf>,
}
