//! The simulator's shared state: configuration, clock, flows, grants, counters and faults.

use axum::http::{header, HeaderMap};
use base64::Engine;

use super::faults::FaultState;
use super::flows::Flows;
use super::grants::{GrantPolicy, Grants};
use super::stats::{Counters, SeenHeaders};
use super::SimConfig;
use crate::clock::{Clock, ManualClock, UnixSeconds};

/// Everything request handlers share (behind one `Arc`).
#[derive(Debug)]
pub(crate) struct SimState {
    pub config: SimConfig,
    /// Where the widget pages are served, e.g. `http://127.0.0.1:9100`.
    pub base_url: String,
    /// Wall clock plus the offset `POST /_sim/clock/advance` adds.
    pub clock: ManualClock,
    pub counters: Counters,
    pub faults: FaultState,
    pub seen: SeenHeaders,
    pub flows: Flows,
    pub grants: Grants,
}

impl SimState {
    pub(crate) fn new(config: SimConfig, base_url: String) -> Self {
        let grants = Grants::new(GrantPolicy {
            access_ttl: config.access_ttl,
            code_ttl: config.code_ttl,
            refresh_ttl: config.refresh_ttl,
            inactivity_limit: config.inactivity_limit,
            grace_window: config.grace_window,
            omit_refresh_token: config.omit_refresh_token,
        });
        let seen_capacity = if config.control {
            config.seen_headers_capacity
        } else {
            0
        };
        Self {
            base_url,
            clock: ManualClock::default(),
            counters: Counters::default(),
            faults: FaultState::default(),
            seen: SeenHeaders::new(seen_capacity),
            flows: Flows::default(),
            grants,
            config,
        }
    }

    /// The simulator's current time.
    pub(crate) fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    /// Whether `headers` carry HTTP Basic credentials of the configured client.
    pub(crate) fn client_authenticated(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        decoded.split_once(':').is_some_and(|(id, secret)| {
            id == self.config.client_id && secret == self.config.client_secret
        })
    }
}
