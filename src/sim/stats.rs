//! What the simulator counts and records, so tests can assert on what the gateway did upstream.
//!
//! Counters are plain atomics (the data hot path bumps one per request); the record of seen
//! request headers is a small ring buffer kept only while the control plane is on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Snapshot of the simulator's counters, as answered by `GET /_sim/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// Every `POST /auth/token` call, whatever its outcome.
    pub token_requests: u64,
    /// Successful `authorization_code` exchanges.
    pub code_grants: u64,
    /// Successful `refresh_token` grants (grace-window reuses included).
    pub refresh_grants: u64,
    /// Rotated refresh tokens presented again outside the grace window.
    pub refresh_reuse_detected: u64,
    /// Grant families revoked (reuse detection, code reuse, `/_sim/revoke`).
    pub families_revoked: u64,
    /// `invalid_grant` answers from `/auth/token`.
    pub invalid_grant_responses: u64,
    /// `invalid_client` answers from `/auth/token`.
    pub invalid_client_responses: u64,
    /// Rotated refresh tokens accepted again inside the grace window.
    pub grace_reuses: u64,
    /// Every `/rest/*` request.
    pub rest_requests: u64,
    /// `/rest/*` requests answered 401.
    pub rest_unauthorized: u64,
    /// Requests to the Basic-authenticated data calls (`/category-tree`, `/rpc/categorize`,
    /// `/payment-receipts/*`).
    pub client_data_requests: u64,
    /// Flows initiated (each creates one widget link).
    pub widget_links_created: u64,
    /// Grants created directly through `POST /_sim/grants`.
    pub seeded_grants: u64,
    /// Faults injected (errors, 429s, lost responses; not latency).
    pub faults_injected: u64,
    /// Token answers dropped by the lost-response fault.
    pub lost_responses: u64,
}

/// Per-user counters, as answered by `GET /_sim/stats?user=ID`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserStats {
    /// The user these counters belong to.
    pub user_id: String,
    /// Successful refreshes of this user's grants.
    pub refresh_grants: u64,
    /// Reuses of this user's rotated refresh tokens.
    pub refresh_reuse_detected: u64,
}

/// One request as the simulator received it (`GET /_sim/seen-headers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names (lower case) and values, in arrival order; non-UTF-8 values lossily decoded.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub token_requests: AtomicU64,
    pub code_grants: AtomicU64,
    pub refresh_grants: AtomicU64,
    pub refresh_reuse_detected: AtomicU64,
    pub families_revoked: AtomicU64,
    pub invalid_grant_responses: AtomicU64,
    pub invalid_client_responses: AtomicU64,
    pub grace_reuses: AtomicU64,
    pub rest_requests: AtomicU64,
    pub rest_unauthorized: AtomicU64,
    pub client_data_requests: AtomicU64,
    pub widget_links_created: AtomicU64,
    pub seeded_grants: AtomicU64,
    pub lost_responses: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// A consistent-enough copy for the control plane (each counter is read once).
    pub(crate) fn snapshot(&self, faults_injected: u64) -> SimStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SimStats {
            token_requests: read(&self.token_requests),
            code_grants: read(&self.code_grants),
            refresh_grants: read(&self.refresh_grants),
            refresh_reuse_detected: read(&self.refresh_reuse_detected),
            families_revoked: read(&self.families_revoked),
            invalid_grant_responses: read(&self.invalid_grant_responses),
            invalid_client_responses: read(&self.invalid_client_responses),
            grace_reuses: read(&self.grace_reuses),
            rest_requests: read(&self.rest_requests),
            rest_unauthorized: read(&self.rest_unauthorized),
            client_data_requests: read(&self.client_data_requests),
            widget_links_created: read(&self.widget_links_created),
            seeded_grants: read(&self.seeded_grants),
            faults_injected,
            lost_responses: read(&self.lost_responses),
        }
    }

    /// Sets every counter back to zero.
    pub(crate) fn clear(&self) {
        for counter in [
            &self.token_requests,
            &self.code_grants,
            &self.refresh_grants,
            &self.refresh_reuse_detected,
            &self.families_revoked,
            &self.invalid_grant_responses,
            &self.invalid_client_responses,
            &self.grace_reuses,
            &self.rest_requests,
            &self.rest_unauthorized,
            &self.client_data_requests,
            &self.widget_links_created,
            &self.seeded_grants,
            &self.lost_responses,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// Ring buffer of the last requests' headers; stores the raw `HeaderMap` (cheap, reference
/// counted) and only renders strings when asked.
#[derive(Debug)]
pub(crate) struct SeenHeaders {
    capacity: usize,
    entries: Mutex<VecDeque<(String, String, HeaderMap)>>,
}

impl SeenHeaders {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    pub(crate) fn record(&self, method: &str, path: &str, headers: &HeaderMap) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((method.to_owned(), path.to_owned(), headers.clone()));
    }

    /// The last `limit` requests, oldest first.
    pub(crate) fn last(&self, limit: usize) -> Vec<SeenRequest> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let skip = entries.len().saturating_sub(limit);
        entries
            .iter()
            .skip(skip)
            .map(|(method, path, headers)| SeenRequest {
                method: method.clone(),
                path: path.clone(),
                headers: headers
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.as_str().to_owned(),
                            String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    pub(crate) fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
