//! Connection events: a connection became `reauth_required`, was revoked, recovered (a new
//! consent after either), or is within `[events] near_lapse_days` of finX lapsing its refresh
//! token. Each event is kept in memory (the last [`HISTORY`], listed by `GET /admin/events`),
//! counted (`finx_gateway_events_total{kind}`) and POSTed, signed, to every configured webhook
//! ([`delivery`]). The format and the signature are documented in `docs/events.md`.
//!
//! - **Off the request path**: recording is a short lock, a JSON encoding and a `try_send` into
//!   a bounded queue; deliveries (with their retries) run on the token manager's runtime. A full
//!   queue drops the event for the webhooks (counted as failed deliveries and in
//!   [`Events::dropped`]); it stays in the listing.
//! - **Once per condition**: the same (connection, kind) is not announced again while the
//!   condition lasts: `reauth_required` and `revoked` until the connection recovers,
//!   `near_lapse` once per refresh-token issue. A `recovered` event ends every condition of
//!   its connection.
//! - **Stable ids**: an event about a known occurrence (the row version that died, the issue
//!   time of a refresh token) has an id derived from it, so retries, and other replicas
//!   announcing the same occurrence, carry the same `id`.
//! - **No secrets**: an event names the connection key, its status and a short reason; never a
//!   token, and webhook secrets never leave the signature.
//!
//! Below `tokens` (which records events where connections change state) and above `store`
//! (keys and statuses), `metrics` and `clock`.

mod delivery;

pub use delivery::{signature, EVENT_ID_HEADER, SIGNATURE_HEADER};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::clock::{Clock, SystemClock, UnixSeconds};
use crate::metrics::{Metrics, REFRESH_TOKEN_LIFETIME_SECS};
use crate::store::{ConnectionKey, ConnectionStatus, ConnectionSummary};

/// Events kept in memory for `GET /admin/events`.
pub const HISTORY: usize = 1000;
/// Events `GET /admin/events` lists without a `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Events waiting for delivery at most; beyond, new events are dropped for the webhooks.
const QUEUE: usize = 4096;
/// The longest `reason` kept (it is a short code, never free text from outside).
const MAX_REASON_LEN: usize = 64;
/// `[events] near_lapse_days` by default.
pub const DEFAULT_NEAR_LAPSE_DAYS: u64 = 7;

const DAY_SECS: u64 = 24 * 3600;

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// finX answered `invalid_grant`: the user must consent again.
    ReauthRequired,
    /// Removed on purpose (by an operator or the user).
    Revoked,
    /// A new consent for a connection that was `reauth_required` or revoked.
    Recovered,
    /// The refresh token lapses within `near_lapse_days` (finX: 90 days after it was issued).
    NearLapse,
}

impl EventKind {
    /// Every kind, in the order of the metric's labels.
    pub const ALL: [Self; 4] = [
        Self::ReauthRequired,
        Self::Revoked,
        Self::Recovered,
        Self::NearLapse,
    ];

    /// The spelling in events, the listing and the metric's `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthRequired => "reauth_required",
            Self::Revoked => "revoked",
            Self::Recovered => "recovered",
            Self::NearLapse => "near_lapse",
        }
    }

    /// The connection's status an event of this kind reports.
    pub fn status(self) -> ConnectionStatus {
        match self {
            Self::ReauthRequired => ConnectionStatus::ReauthRequired,
            Self::Revoked => ConnectionStatus::Revoked,
            Self::Recovered | Self::NearLapse => ConnectionStatus::Active,
        }
    }
}

/// One event, exactly as POSTed to the webhooks (see `docs/events.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unique per occurrence; the same on every retry (and on every replica announcing the same
    /// occurrence).
    pub id: String,
    pub kind: EventKind,
    /// The connection key (`user_id` or `flow:<service>/<flow_id>`).
    pub connection: String,
    /// The connection's status as of the event.
    pub status: &'static str,
    /// A short code: `invalid_grant`, `consent_after_reauth_required`, `refresh_token_age`, …
    pub reason: String,
    /// When the gateway recorded it (unix seconds).
    pub time: UnixSeconds,
    /// `near_lapse` only: when finX lapses the refresh token (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lapses_at: Option<UnixSeconds>,
}

/// `[events]`, validated: what is announced and where to.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// A connection whose refresh token lapses within this is announced as `near_lapse`.
    pub near_lapse: Duration,
    pub webhooks: Vec<Webhook>,
    pub delivery: DeliverySettings,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            near_lapse: Duration::from_secs(DEFAULT_NEAR_LAPSE_DAYS * DAY_SECS),
            webhooks: Vec::new(),
            delivery: DeliverySettings::default(),
        }
    }
}

/// One receiver of events: `[[events.webhooks]]`.
#[derive(Clone)]
pub struct Webhook {
    /// Where events are POSTed (http or https).
    pub url: url::Url,
    /// The HMAC-SHA256 key of `X-Finx-Signature`.
    pub secret: SecretString,
}

impl Webhook {
    /// How logs name this webhook: scheme, host and port only (a path or query may carry a
    /// receiver's own secret).
    pub fn describe(&self) -> String {
        let host = self.url.host_str().unwrap_or("?");
        match self.url.port() {
            Some(port) => format!("{}://{host}:{port}", self.url.scheme()),
            None => format!("{}://{host}", self.url.scheme()),
        }
    }
}

impl std::fmt::Debug for Webhook {
    /// Never the secret, nor the URL's path or query.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.describe())
            .finish_non_exhaustive()
    }
}

/// How webhook deliveries are retried: `[events]` `timeout`, `max_attempts`, `retry_initial`,
/// `retry_max`.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// One attempt's time limit (connect, send, answer).
    pub timeout: Duration,
    /// Attempts per event and webhook, the first included.
    pub max_attempts: u32,
    /// The pause after the first failed attempt; it doubles after each further one …
    pub retry_initial: Duration,
    /// … up to this (each pause jittered by ±20 %, never above this).
    pub retry_max: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_attempts: 8,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// `GET /admin/events` was given a `limit` that is not a number from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit must be a number from 1")]
pub struct InvalidLimit;

/// The gateway's event handle: records, de-duplicates, lists and hands events to delivery.
/// Cheap to clone; every clone is the same recorder.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EventSettings,
    /// The webhooks events go to now: `settings.webhooks` at first, replaced by a reload
    /// ([`Events::replace_webhooks`]). Each event is delivered to the list it was recorded
    /// under.
    webhooks: ArcSwap<Vec<Webhook>>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    queue: mpsc::Sender<Arc<Recorded>>,
    /// Taken by [`Events::start_delivery`].
    receiver: Mutex<Option<mpsc::Receiver<Arc<Recorded>>>>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Oldest first, at most [`HISTORY`].
    history: VecDeque<Arc<Recorded>>,
    /// Conditions announced and not over yet, per connection: the kind and the occurrence
    /// announced (`None`: any occurrence).
    announced: HashMap<ConnectionKey, Vec<(EventKind, Option<i64>)>>,
}

/// An event with its encoded body and how its deliveries went.
struct Recorded {
    event: Event,
    /// The JSON body, encoded once: every attempt signs and sends the same bytes.
    body: bytes::Bytes,
    /// The webhooks it goes to: those configured when it was recorded.
    webhooks: Arc<Vec<Webhook>>,
    /// Webhooks that accepted it.
    delivered: AtomicU32,
    /// Webhooks that gave up on it (or never got it: the queue was full).
    failed: AtomicU32,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("near_lapse", &self.inner.settings.near_lapse)
            .field("webhooks", &self.inner.webhooks.load())
            .finish_non_exhaustive()
    }
}

impl Default for Events {
    /// No webhooks, the default near-lapse window, metrics of its own, the system clock.
    fn default() -> Self {
        Self::new(
            EventSettings::default(),
            Arc::new(Metrics::new()),
            Arc::new(SystemClock),
        )
    }
}

impl Events {
    /// A recorder for `settings`, counting into `metrics`, stamping events with `clock`.
    /// Nothing is delivered until [`Events::start_delivery`].
    pub fn new(settings: EventSettings, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Self {
            inner: Arc::new(Inner {
                webhooks: ArcSwap::from_pointee(settings.webhooks.clone()),
                settings,
                metrics,
                clock,
                state: Mutex::new(State::default()),
                queue,
                receiver: Mutex::new(Some(receiver)),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Starts delivering to the webhooks on `runtime` (once; later calls do nothing), even
    /// with none configured yet: a reload may add some. The deliveries end with the runtime.
    pub fn start_delivery(&self, runtime: &tokio::runtime::Handle) {
        let Some(receiver) = self.lock_receiver().take() else {
            return;
        };
        match delivery::Dispatcher::new(&self.inner.settings, self.inner.metrics.clone()) {
            Ok(dispatcher) => {
                runtime.spawn(dispatcher.run(receiver));
            }
            Err(error) => {
                tracing::error!(%error, "webhook client could not be built; events are not delivered");
            }
        }
    }

    /// Sends the events recorded from now on to `webhooks` (a reload); events recorded before
    /// still go to the webhooks they were recorded under.
    pub fn replace_webhooks(&self, webhooks: Vec<Webhook>) {
        self.inner.webhooks.store(Arc::new(webhooks));
    }

    /// Records that `key` had `kind` happen for `reason` (a short code such as `operator`),
    /// unless the same condition is already announced. The event gets a unique random id.
    /// Returns the event's id, `None` when it was a repeat.
    pub fn record(&self, kind: EventKind, key: &ConnectionKey, reason: &str) -> Option<String> {
        self.announce(kind, key, reason, None, None)
    }

    /// As [`Events::record`], for a known `occurrence` (the row version that died or was
    /// consented, the issue time of a refresh token): the id is derived from it, and the same
    /// occurrence is announced once.
    pub fn record_occurrence(
        &self,
        kind: EventKind,
        key: &ConnectionKey,
        reason: &str,
        occurrence: i64,
    ) -> Option<String> {
        self.announce(kind, key, reason, Some(occurrence), None)
    }

    /// Announces every active connection of `connections` whose refresh token lapses within
    /// the near-lapse window at `now` (once per refresh-token issue), and forgets what was
    /// announced about connections that are gone or no longer near lapse. Returns how many
    /// were announced now.
    pub fn check_near_lapse(&self, connections: &[ConnectionSummary], now: UnixSeconds) -> usize {
        let window = i64::try_from(self.inner.settings.near_lapse.as_secs()).unwrap_or(i64::MAX);
        let mut near = HashSet::new();
        let mut announced = 0;
        for connection in connections {
            if connection.status != ConnectionStatus::Active || connection.key.is_flow() {
                continue;
            }
            let issued = connection.refreshed_at.unwrap_or(connection.created_at);
            let lapses_at = issued.saturating_add(REFRESH_TOKEN_LIFETIME_SECS);
            if lapses_at.saturating_sub(now) > window {
                continue;
            }
            near.insert(connection.key.clone());
            let recorded = self.announce(
                EventKind::NearLapse,
                &connection.key,
                "refresh_token_age",
                Some(issued),
                Some(lapses_at),
            );
            if recorded.is_some() {
                announced += 1;
            }
        }
        let listed: HashSet<&ConnectionKey> = connections.iter().map(|c| &c.key).collect();
        let mut state = self.lock_state();
        state.announced.retain(|key, conditions| {
            if !listed.contains(key) {
                return false;
            }
            if !near.contains(key) {
                conditions.retain(|(kind, _)| *kind != EventKind::NearLapse);
            }
            !conditions.is_empty()
        });
        announced
    }

    /// The most recent events, newest first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        self.lock_state()
            .history
            .iter()
            .rev()
            .take(limit)
            .map(|recorded| recorded.event.clone())
            .collect()
    }

    /// Events dropped for the webhooks because the delivery queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// `GET /admin/events?limit=N`: the last `N` events (default [`DEFAULT_LIST_LIMIT`], at
    /// most [`HISTORY`]), newest first, each with how its deliveries went: the JSON body of the
    /// answer, or [`InvalidLimit`] for a `limit` that is not a number from 1.
    pub fn admin_listing(&self, query: Option<&str>) -> Result<Value, InvalidLimit> {
        let mut limit = DEFAULT_LIST_LIMIT;
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if name != "limit" {
                continue;
            }
            match value.parse::<usize>() {
                Ok(n) if n >= 1 => limit = n.min(HISTORY),
                _ => return Err(InvalidLimit),
            }
        }
        let webhooks = self.inner.webhooks.load().len() as u32;
        let listed: Vec<Value> = {
            let state = self.lock_state();
            state
                .history
                .iter()
                .rev()
                .take(limit)
                .map(|recorded| {
                    let targets = recorded.webhooks.len() as u32;
                    let delivered = recorded.delivered.load(Ordering::Relaxed);
                    let failed = recorded.failed.load(Ordering::Relaxed);
                    let mut entry = serde_json::to_value(&recorded.event).unwrap_or(Value::Null);
                    entry["deliveries"] = json!({
                        "delivered": delivered,
                        "failed": failed,
                        "pending": targets.saturating_sub(delivered + failed),
                    });
                    entry
                })
                .collect()
        };
        Ok(json!({
            "events": listed,
            "webhooks": webhooks,
            "dropped": self.dropped(),
        }))
    }

    fn announce(
        &self,
        kind: EventKind,
        key: &ConnectionKey,
        reason: &str,
        occurrence: Option<i64>,
        lapses_at: Option<UnixSeconds>,
    ) -> Option<String> {
        let id = match occurrence {
            Some(occurrence) => stable_id(kind, key, occurrence),
            None => format!("{:032x}", rand::random::<u128>()),
        };
        let event = Event {
            id,
            kind,
            connection: key.as_str().to_owned(),
            status: kind.status().as_str(),
            reason: reason.chars().take(MAX_REASON_LEN).collect(),
            time: self.inner.clock.now(),
            lapses_at,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(body) => bytes::Bytes::from(body),
            Err(error) => {
                tracing::error!(%error, "an event could not be encoded");
                return None;
            }
        };
        let recorded = Arc::new(Recorded {
            event,
            body,
            webhooks: self.inner.webhooks.load_full(),
            delivered: AtomicU32::new(0),
            failed: AtomicU32::new(0),
        });
        {
            let mut state = self.lock_state();
            if kind == EventKind::Recovered {
                state.announced.remove(key);
            } else {
                let conditions = state.announced.entry(key.clone()).or_default();
                match conditions
                    .iter_mut()
                    .find(|(announced, _)| *announced == kind)
                {
                    Some((_, announced)) => {
                        let repeat = match (*announced, occurrence) {
                            (Some(before), Some(now)) => before == now,
                            _ => true,
                        };
                        if repeat {
                            return None;
                        }
                        *announced = occurrence;
                    }
                    None => conditions.push((kind, occurrence)),
                }
            }
            state.history.push_back(recorded.clone());
            while state.history.len() > HISTORY {
                state.history.pop_front();
            }
        }
        self.inner.metrics.record_event(kind.as_str());
        let event = &recorded.event;
        tracing::info!(
            connection = %key,
            kind = kind.as_str(),
            id = %event.id,
            reason = %event.reason,
            "connection event"
        );
        let id = event.id.clone();
        self.enqueue(recorded);
        Some(id)
    }

    /// Hands `recorded` to delivery; a full (or stopped) queue drops it for the webhooks.
    fn enqueue(&self, recorded: Arc<Recorded>) {
        let webhooks = recorded.webhooks.len();
        if webhooks == 0 {
            return;
        }
        if let Err(refused) = self.inner.queue.try_send(recorded) {
            let recorded = match refused {
                mpsc::error::TrySendError::Full(recorded)
                | mpsc::error::TrySendError::Closed(recorded) => recorded,
            };
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            recorded
                .failed
                .fetch_add(webhooks as u32, Ordering::Relaxed);
            for _ in 0..webhooks {
                self.inner
                    .metrics
                    .record_delivery(crate::metrics::DeliveryOutcome::Failed);
            }
            tracing::warn!(
                id = %recorded.event.id,
                kind = recorded.event.kind.as_str(),
                "event delivery queue full: the event is not sent to the webhooks"
            );
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // Every update is complete before it is visible (a push, a removal): a poisoned lock is
        // still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_receiver(&self) -> MutexGuard<'_, Option<mpsc::Receiver<Arc<Recorded>>>> {
        self.inner
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The id of `kind` for `key`'s `occurrence`: 32 hex digits of a SHA-256 over them.
fn stable_id(kind: EventKind, key: &ConnectionKey, occurrence: i64) -> String {
    let digest = Sha256::new()
        .chain_update(b"finx-gateway event\0")
        .chain_update(kind.as_str().as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_str().as_bytes())
        .chain_update(b"\0")
        .chain_update(occurrence.to_be_bytes())
        .finalize();
    delivery::hex(&digest[..16])
}

#[cfg(test)]
mod tests;
