//! Webhook delivery: every event is POSTed to every webhook, signed, and retried with
//! exponential backoff and jitter on network errors and non-2xx answers, up to
//! `max_attempts`. Deliveries run concurrently (at most [`IN_FLIGHT`] at once) on the runtime
//! that started them, never on a request's path.
//!
//! The signature (`docs/events.md`): `X-Finx-Signature: t=<unix seconds>,v1=<hex
//! HMAC-SHA256(secret, "<t>.<body>")>`, with a fresh `t` on every attempt and the same body.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use secrecy::ExposeSecret;
use sha2::Sha256;
use tokio::sync::{mpsc, Semaphore};

use super::{DeliverySettings, EventSettings, Recorded, Webhook};
use crate::clock::{Clock, SystemClock};
use crate::metrics::{DeliveryOutcome, Metrics};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-finx-signature";
/// The event id header (the body's `id`).
pub const EVENT_ID_HEADER: &str = "x-finx-event-id";

/// Deliveries (attempts and the pauses between them) in flight at once; further events wait
/// in the queue.
const IN_FLIGHT: usize = 32;

/// Hex HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`: the `v1` of `X-Finx-Signature`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Lower-case hex.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The pause after failed attempt number `attempt` (1-based): `retry_initial` doubled per
/// earlier failure, at most `retry_max`, jittered by ±20 % (and still at most `retry_max`).
pub(super) fn backoff(settings: &DeliverySettings, attempt: u32) -> Duration {
    let doubling = 1u32 << attempt.saturating_sub(1).min(20);
    let pause = settings
        .retry_initial
        .saturating_mul(doubling)
        .min(settings.retry_max);
    pause
        .mul_f64(rand::rng().random_range(0.8..1.2))
        .min(settings.retry_max)
}

/// Takes events off the queue and delivers each to every webhook it was recorded for.
pub(super) struct Dispatcher {
    settings: DeliverySettings,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
}

impl Dispatcher {
    pub(super) fn new(
        settings: &EventSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let delivery = settings.delivery.clone();
        let client = reqwest::Client::builder()
            .timeout(delivery.timeout)
            .connect_timeout(delivery.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("finx-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            settings: delivery,
            metrics,
            client,
        })
    }

    /// Runs until the queue's sender is gone (or the runtime stops).
    pub(super) async fn run(self, mut queue: mpsc::Receiver<Arc<Recorded>>) {
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        let this = Arc::new(self);
        while let Some(recorded) = queue.recv().await {
            for index in 0..recorded.webhooks.len() {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (this, recorded) = (this.clone(), recorded.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    this.deliver(index, &recorded).await;
                });
            }
        }
    }

    /// Delivers `recorded` to webhook `index`, retrying until it is accepted or
    /// `max_attempts` attempts failed.
    async fn deliver(&self, index: usize, recorded: &Recorded) {
        let Some(webhook) = recorded.webhooks.get(index) else {
            return;
        };
        let id = &recorded.event.id;
        let mut attempt = 1;
        loop {
            match self.attempt(webhook, recorded).await {
                Ok(()) => {
                    self.metrics.record_delivery(DeliveryOutcome::Delivered);
                    recorded.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(webhook = %webhook.describe(), %id, attempt, "event delivered");
                    return;
                }
                Err(why) if attempt >= self.settings.max_attempts => {
                    self.metrics.record_delivery(DeliveryOutcome::Failed);
                    recorded.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(webhook = %webhook.describe(), %id, attempts = attempt, %why, "event delivery given up");
                    return;
                }
                Err(why) => {
                    self.metrics.record_delivery(DeliveryOutcome::Retried);
                    let pause = backoff(&self.settings, attempt);
                    tracing::debug!(webhook = %webhook.describe(), %id, attempt, %why, retry_in_ms = pause.as_millis() as u64, "event delivery failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One signed POST; `Err` with a short reason (never the URL) unless answered 2xx.
    async fn attempt(&self, webhook: &Webhook, recorded: &Recorded) -> Result<(), String> {
        // Wall time, as the receiver's clock sees it (tests move the gateway's clock).
        let timestamp = SystemClock.now();
        let signed = signature(
            webhook.secret.expose_secret().as_bytes(),
            timestamp,
            &recorded.body,
        );
        let answer = self
            .client
            .post(webhook.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, format!("t={timestamp},v1={signed}"))
            .header(EVENT_ID_HEADER, recorded.event.id.as_str())
            .body(recorded.body.clone())
            .send()
            .await
            .map_err(|error| {
                let why = if error.is_timeout() {
                    "timeout"
                } else if error.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                why.to_owned()
            })?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", status.as_u16()))
        }
    }
}
