//! Reloading the config file while serving (SIGHUP): a new file is validated completely (both
//! steps) before anything changes; an invalid one is refused with every problem logged and the
//! running config keeps serving. What can change in place does, without dropping a connection:
//! caller keys and policies, the allowed return addresses of connect flows, the log level, the
//! event webhooks. Everything else is listed as needing a restart and left as it runs.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::callers::CallerAuth;
use crate::config::{Config, ConfigErrors};
use crate::connect::ConnectService;
use crate::events::{EventSettings, Events, Webhook};

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What was applied in place.
    pub applied: Vec<&'static str>,
    /// What changed in the file but only takes effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The parts of a serving gateway a reload may replace, and the config they came from.
pub struct Reloader {
    current: Mutex<Config>,
    callers: Arc<ArcSwap<CallerAuth>>,
    connect: Option<Arc<ConnectService>>,
    events: Events,
}

impl Reloader {
    /// A reloader for a gateway built from `config`.
    pub fn new(
        config: Config,
        callers: Arc<ArcSwap<CallerAuth>>,
        connect: Option<Arc<ConnectService>>,
        events: Events,
    ) -> Self {
        Self {
            current: Mutex::new(config),
            callers,
            connect,
            events,
        }
    }

    /// Re-reads the config file at `path` and logs the outcome (SIGHUP).
    pub fn reload_and_log(&self, path: &Path) {
        match self.reload_from(path) {
            Ok(report) => tracing::info!(
                config = %path.display(),
                applied = ?report.applied,
                needs_restart = ?report.needs_restart,
                "configuration reloaded"
            ),
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(config = %path.display(), %error, "reload refused");
                }
                tracing::error!(
                    config = %path.display(),
                    errors = errors.0.len(),
                    "the new configuration is invalid; the running one keeps serving"
                );
            }
        }
    }

    /// Validates the file at `path` and applies what can change in place.
    pub fn reload_from(&self, path: &Path) -> Result<ReloadReport, ConfigErrors> {
        let mut new = Config::load(path)?;
        let mut current = self
            .current
            .lock()
            .map_err(|_| ConfigErrors(vec!["an earlier reload failed midway".into()]))?;
        // Not from the file: kept as the process runs.
        new.server.upgrade = current.server.upgrade;
        let mut report = ReloadReport::default();

        // Trusted-local mode accepts requests without a credential; whether that is safe
        // depends on the listener actually bound, which a reload does not change. So switching
        // modes takes a restart (where the listener rule is checked against the new listener).
        if new.callers.is_trusted_local() == current.callers.is_trusted_local() {
            self.callers.store(new.callers.clone());
            current.callers = new.callers.clone();
            report.applied.push("callers");
        } else {
            report.needs_restart.push("callers.mode");
        }
        match (&self.connect, &new.connect, &mut current.connect) {
            (Some(service), Some(settings), Some(running)) => {
                service.replace_allowed_redirects(settings.allowed_redirects.clone());
                running.allowed_redirects = settings.allowed_redirects.clone();
                report.applied.push("connect.allowed_redirects");
            }
            (None, None, _) => {}
            _ => report.needs_restart.push("connect"),
        }
        if webhooks_digest(&new.events.webhooks) != webhooks_digest(&current.events.webhooks) {
            self.events.replace_webhooks(new.events.webhooks.clone());
            current.events.webhooks = new.events.webhooks.clone();
            report.applied.push("events.webhooks");
        }
        if new.telemetry.level != current.telemetry.level {
            match crate::telemetry::set_level(&new.telemetry.level) {
                Ok(()) => {
                    current.telemetry.level = new.telemetry.level.clone();
                    report.applied.push("telemetry.level");
                }
                Err(_) => report.needs_restart.push("telemetry.level"),
            }
        }

        // Compared with what runs (not with the previous file), so a change that waits for a
        // restart is named on every reload until then. Secrets are compared by digest: their
        // `Debug` hides them, and a rotated secret behind the same reference is a change.
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let restart_only: [(&'static str, bool); 12] = [
            ("listener.address", new.listen != current.listen),
            ("admin.address", new.admin.address != current.admin.address),
            (
                "admin.credential",
                digest(new.admin.credential.as_ref()) != digest(current.admin.credential.as_ref()),
            ),
            ("upstream", differs(&new.upstream, &current.upstream)),
            (
                "client",
                new.client.id != current.client.id
                    || digest(Some(&new.client.secret)) != digest(Some(&current.client.secret)),
            ),
            (
                "store",
                differs(&new.store, &current.store) || store_url(&new) != store_url(&current),
            ),
            ("tokens", differs(&new.tokens, &current.tokens)),
            ("keeper", differs(&new.keeper, &current.keeper)),
            ("routing", differs(&new.routing, &current.routing)),
            (
                "telemetry.format",
                new.telemetry.format != current.telemetry.format,
            ),
            ("server", differs(&new.server, &current.server)),
            (
                "events (near_lapse_days, delivery)",
                events_fixed(&new.events) != events_fixed(&current.events),
            ),
        ];
        report.needs_restart.extend(
            restart_only
                .iter()
                .filter(|(_, changed)| *changed)
                .map(|(name, _)| *name),
        );
        if connect_fixed(&new) != connect_fixed(&current) {
            report
                .needs_restart
                .push("connect (callback, state key, ttl)");
        }
        Ok(report)
    }
}

/// The webhooks as compared by a reload: each URL whole (`Debug` shows only its host) and its
/// secret's digest.
fn webhooks_digest(webhooks: &[Webhook]) -> Vec<(String, Option<String>)> {
    webhooks
        .iter()
        .map(|webhook| (webhook.url.to_string(), digest(Some(&webhook.secret))))
        .collect()
}

/// The `[events]` settings a reload does not change.
fn events_fixed(events: &EventSettings) -> String {
    format!("{:?} {:?}", events.near_lapse, events.delivery)
}

/// A digest of a secret, to tell whether it changed without keeping or printing it.
fn digest(secret: Option<&secrecy::SecretString>) -> Option<String> {
    use secrecy::ExposeSecret;
    use sha2::Digest;
    secret.map(|secret| {
        format!(
            "{:x}",
            sha2::Sha256::digest(secret.expose_secret().as_bytes())
        )
    })
}

/// The shared store's URL digest (it may carry a password; `Debug` hides it).
fn store_url(config: &Config) -> Option<String> {
    match &config.store.backend {
        crate::config::StoreBackend::Postgres(settings) => digest(Some(&settings.url)),
        crate::config::StoreBackend::Sqlite { .. } => None,
    }
}

/// The connect settings only a restart changes (secrets compared by whether they are equal,
/// never printed).
fn connect_fixed(config: &Config) -> Option<(String, String, std::time::Duration)> {
    use secrecy::ExposeSecret;
    use sha2::Digest;
    config.connect.as_ref().map(|connect| {
        let key_digest = sha2::Sha256::digest(connect.state_key.expose_secret().as_bytes());
        (
            connect.callback_url.to_string(),
            format!("{key_digest:x}"),
            connect.state_ttl,
        )
    })
}
