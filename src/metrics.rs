//! The gateway's Prometheus metrics: one [`Metrics`] per gateway (its own registry, so tests can
//! run many gateways in one process), handed to the proxy, the token manager and the store
//! wrapper, and rendered in Prometheus's text format by the admin listener.
//!
//! Labels are bounded: route class, method, status code, outcome, operation, connection status.
//! No label ever carries a user id, a connection key or a token.
//!
//! Counters and histograms are atomics: recording one costs no lock and no allocation, except a
//! labelled counter's first use of a label combination (and a read-lock lookup for
//! `requests_total`, done in the logging phase, after the answer went out).
//!
//! A leaf module: it depends on nothing else in the crate.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram as HistogramProto, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// finX refresh tokens lapse 90 days after they were issued.
pub const REFRESH_TOKEN_LIFETIME_SECS: i64 = 90 * 24 * 3600;
/// A connection this close to lapsing is reported as near lapse.
pub const NEAR_LAPSE_SECS: i64 = 7 * 24 * 3600;

/// How a refresh at finX ended, as counted in `finx_gateway_refreshes_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Ok,
    InvalidGrant,
    InvalidClient,
    Transient,
    Timeout,
}

impl RefreshOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidClient => "invalid_client",
            Self::Transient => "transient",
            Self::Timeout => "timeout",
        }
    }
}

/// The `kind` label values of `finx_gateway_events_total` (connection events).
pub const EVENT_KINDS: [&str; 4] = ["reauth_required", "revoked", "recovered", "near_lapse"];

/// How one webhook delivery attempt ended, as counted in
/// `finx_gateway_webhook_deliveries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// The attempt failed and another one follows.
    Retried,
    /// Given up (every attempt failed), or never sent (the delivery queue was full).
    Failed,
}

impl DeliveryOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::Failed => "failed",
        }
    }
}

/// What the caller check decided, as counted in `finx_gateway_caller_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerDecision {
    Allowed,
    Unauthenticated,
    Forbidden,
    RateLimited,
}

impl CallerDecision {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// One connection as the connection metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSample {
    /// `active`, `reauth_required` or `revoked`.
    pub status: &'static str,
    /// Seconds since its refresh token was issued (consent or last refresh).
    pub refresh_token_age_secs: i64,
}

/// Every metric of one gateway.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    upstream_seconds: HistogramVec,
    overhead_seconds: HistogramVec,
    /// Access tokens served from memory.
    pub cache_hits: IntCounter,
    /// Access tokens not in memory (read from the store or refreshed).
    pub cache_misses: IntCounter,
    /// Access tokens held in memory (set when scraped).
    pub cache_entries: IntGauge,
    /// 1 when `/readyz` would answer 200 (set on every probe and scrape).
    pub ready: IntGauge,
    refreshes: IntCounterVec,
    refresh_seconds: Histogram,
    /// Requests that waited for a refresh at finX.
    pub requests_waited: IntCounter,
    store_seconds: HistogramVec,
    store_errors: IntCounterVec,
    caller_decisions: IntCounterVec,
    events: IntCounterVec,
    webhook_deliveries: IntCounterVec,
    connections: ConnectionMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets for the gateway's own work and for finX: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    /// A fresh set of metrics in a registry of its own, with `build_info` set.
    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
        };
        let built = (|| -> prometheus::Result<Self> {
            let build_info = IntGaugeVec::new(
                Opts::new("finx_gateway_build_info", "The running build (always 1)."),
                &["version"],
            )?;
            build_info
                .with_label_values(&[env!("CARGO_PKG_VERSION")])
                .set(1);
            registry.register(Box::new(build_info))?;
            let metrics = Self {
                requests: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_requests_total",
                        "Requests answered, by route class, method and status.",
                    ),
                    &["route", "method", "status"],
                )?,
                upstream_seconds: histogram(
                    "finx_gateway_upstream_duration_seconds",
                    "Time from sending a request to finX until its answer ended.",
                    &["route"],
                )?,
                overhead_seconds: histogram(
                    "finx_gateway_overhead_duration_seconds",
                    "Time a request spent in the gateway outside finX's I/O.",
                    &["route"],
                )?,
                cache_hits: IntCounter::new(
                    "finx_gateway_token_cache_hits_total",
                    "Access tokens served from memory.",
                )?,
                cache_misses: IntCounter::new(
                    "finx_gateway_token_cache_misses_total",
                    "Access tokens not in memory (read from the store or refreshed).",
                )?,
                cache_entries: IntGauge::new(
                    "finx_gateway_token_cache_entries",
                    "Access tokens held in memory.",
                )?,
                ready: IntGauge::new(
                    "finx_gateway_ready",
                    "1 when the gateway is ready (store reachable, not draining), else 0.",
                )?,
                refreshes: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_refreshes_total",
                        "Refresh-token grants asked of finX, by outcome.",
                    ),
                    &["outcome"],
                )?,
                refresh_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "finx_gateway_refresh_duration_seconds",
                        "Time finX took to answer a refresh-token grant.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
                requests_waited: IntCounter::new(
                    "finx_gateway_requests_waited_on_refresh_total",
                    "Requests that waited for a refresh at finX.",
                )?,
                store_seconds: histogram(
                    "finx_gateway_store_operation_duration_seconds",
                    "Token store operations, by operation.",
                    &["operation"],
                )?,
                store_errors: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_store_errors_total",
                        "Token store operations that failed, by operation.",
                    ),
                    &["operation"],
                )?,
                caller_decisions: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_caller_decisions_total",
                        "Caller checks, by decision.",
                    ),
                    &["decision"],
                )?,
                events: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_events_total",
                        "Connection events recorded, by kind.",
                    ),
                    &["kind"],
                )?,
                webhook_deliveries: IntCounterVec::new(
                    Opts::new(
                        "finx_gateway_webhook_deliveries_total",
                        "Event webhook delivery attempts, by outcome (failed: given up).",
                    ),
                    &["outcome"],
                )?,
                connections: ConnectionMetrics::new()?,
                registry: registry.clone(),
            };
            // Every outcome and decision is exported from the start, at 0, so an alert on
            // `increase()` sees the first one.
            for outcome in [
                RefreshOutcome::Ok,
                RefreshOutcome::InvalidGrant,
                RefreshOutcome::InvalidClient,
                RefreshOutcome::Transient,
                RefreshOutcome::Timeout,
            ] {
                metrics.refreshes.with_label_values(&[outcome.label()]);
            }
            for decision in [
                CallerDecision::Allowed,
                CallerDecision::Unauthenticated,
                CallerDecision::Forbidden,
                CallerDecision::RateLimited,
            ] {
                metrics
                    .caller_decisions
                    .with_label_values(&[decision.label()]);
            }
            for kind in EVENT_KINDS {
                metrics.events.with_label_values(&[kind]);
            }
            for outcome in [
                DeliveryOutcome::Delivered,
                DeliveryOutcome::Retried,
                DeliveryOutcome::Failed,
            ] {
                metrics
                    .webhook_deliveries
                    .with_label_values(&[outcome.label()]);
            }
            registry.register(Box::new(metrics.requests.clone()))?;
            registry.register(Box::new(metrics.upstream_seconds.clone()))?;
            registry.register(Box::new(metrics.overhead_seconds.clone()))?;
            registry.register(Box::new(metrics.cache_hits.clone()))?;
            registry.register(Box::new(metrics.cache_misses.clone()))?;
            registry.register(Box::new(metrics.cache_entries.clone()))?;
            registry.register(Box::new(metrics.ready.clone()))?;
            registry.register(Box::new(metrics.refreshes.clone()))?;
            registry.register(Box::new(metrics.refresh_seconds.clone()))?;
            registry.register(Box::new(metrics.requests_waited.clone()))?;
            registry.register(Box::new(metrics.store_seconds.clone()))?;
            registry.register(Box::new(metrics.store_errors.clone()))?;
            registry.register(Box::new(metrics.caller_decisions.clone()))?;
            registry.register(Box::new(metrics.events.clone()))?;
            registry.register(Box::new(metrics.webhook_deliveries.clone()))?;
            registry.register(Box::new(metrics.connections.clone()))?;
            Ok(metrics)
        })();
        // Every name above is a valid, unique metric name: registration cannot fail.
        built.unwrap_or_else(|error| unreachable!("metric registration failed: {error}"))
    }

    /// The method as a label: the standard ones by name, anything else as `other`, so a client
    /// inventing methods cannot add series.
    pub fn method_label(method: &http::Method) -> &'static str {
        match *method {
            http::Method::GET => "GET",
            http::Method::HEAD => "HEAD",
            http::Method::POST => "POST",
            http::Method::PUT => "PUT",
            http::Method::PATCH => "PATCH",
            http::Method::DELETE => "DELETE",
            http::Method::OPTIONS => "OPTIONS",
            _ => "other",
        }
    }

    /// Records one answered request (`method` from [`Metrics::method_label`]).
    pub fn record_request(
        &self,
        route: &str,
        method: &str,
        status: u16,
        upstream_secs: Option<f64>,
        total_secs: f64,
    ) {
        let mut code = itoa::Buffer::new();
        self.requests
            .with_label_values(&[route, method, code.format(status)])
            .inc();
        let upstream = upstream_secs.unwrap_or(0.0);
        if let Some(upstream) = upstream_secs {
            self.upstream_seconds
                .with_label_values(&[route])
                .observe(upstream);
        }
        self.overhead_seconds
            .with_label_values(&[route])
            .observe((total_secs - upstream).max(0.0));
    }

    /// Records one refresh-token grant asked of finX.
    pub fn record_refresh(&self, outcome: RefreshOutcome, seconds: f64) {
        self.refreshes.with_label_values(&[outcome.label()]).inc();
        self.refresh_seconds.observe(seconds);
    }

    /// Records one store operation.
    pub fn record_store(&self, operation: &'static str, seconds: f64, failed: bool) {
        self.store_seconds
            .with_label_values(&[operation])
            .observe(seconds);
        if failed {
            self.store_errors.with_label_values(&[operation]).inc();
        }
    }

    /// Records what the caller check decided.
    pub fn record_caller(&self, decision: CallerDecision) {
        self.caller_decisions
            .with_label_values(&[decision.label()])
            .inc();
    }

    /// Refresh-token grants asked of finX so far, by outcome (for the status page).
    pub fn refresh_counts(&self) -> Vec<(&'static str, u64)> {
        [
            RefreshOutcome::Ok,
            RefreshOutcome::InvalidGrant,
            RefreshOutcome::InvalidClient,
            RefreshOutcome::Transient,
            RefreshOutcome::Timeout,
        ]
        .into_iter()
        .map(|outcome| {
            let count = self.refreshes.with_label_values(&[outcome.label()]).get();
            (outcome.label(), count)
        })
        .collect()
    }

    /// Records one connection event; `kind` is one of [`EVENT_KINDS`].
    pub fn record_event(&self, kind: &'static str) {
        self.events.with_label_values(&[kind]).inc();
    }

    /// Records how one webhook delivery attempt ended.
    pub fn record_delivery(&self, outcome: DeliveryOutcome) {
        self.webhook_deliveries
            .with_label_values(&[outcome.label()])
            .inc();
    }

    /// Replaces the connection snapshot the connection metrics report.
    pub fn set_connections(&self, samples: &[ConnectionSample]) {
        self.connections.set(samples);
    }

    /// Every metric in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut text = Vec::new();
        // Writing to a Vec cannot fail; a family that cannot be encoded is left out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Buckets of the refresh-token age distribution: 1, 7, 14, 30, 60, 75, 83, 90 days.
const AGE_BUCKET_DAYS: &[i64] = &[1, 7, 14, 30, 60, 75, 83, 90];

/// Connections by status, the refresh-token age distribution and the connections near lapse,
/// from the latest snapshot of the store. A collector of its own because each scrape reports
/// the current connections, not everything ever observed.
#[derive(Clone)]
struct ConnectionMetrics {
    by_status: IntGaugeVec,
    near_lapse: IntGauge,
    ages: std::sync::Arc<Mutex<AgeSnapshot>>,
    age_desc: Desc,
}

#[derive(Default, Clone)]
struct AgeSnapshot {
    /// Cumulative counts per bucket of [`AGE_BUCKET_DAYS`].
    cumulative: Vec<u64>,
    count: u64,
    sum_secs: f64,
}

impl ConnectionMetrics {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            by_status: IntGaugeVec::new(
                Opts::new("finx_gateway_connections", "Stored connections, by status."),
                &["status"],
            )?,
            near_lapse: IntGauge::new(
                "finx_gateway_connections_near_lapse",
                "Active connections whose refresh token lapses within 7 days.",
            )?,
            ages: std::sync::Arc::new(Mutex::new(AgeSnapshot::default())),
            age_desc: Desc::new(
                "finx_gateway_refresh_token_age_seconds".into(),
                "Age of each active connection's refresh token (finX lapses it at 90 days).".into(),
                Vec::new(),
                Default::default(),
            )?,
        })
    }

    fn set(&self, samples: &[ConnectionSample]) {
        self.by_status.reset();
        for status in ["active", "reauth_required", "revoked"] {
            self.by_status.with_label_values(&[status]).set(0);
        }
        let mut snapshot = AgeSnapshot {
            cumulative: vec![0; AGE_BUCKET_DAYS.len()],
            ..AgeSnapshot::default()
        };
        let mut near_lapse = 0;
        for sample in samples {
            self.by_status.with_label_values(&[sample.status]).inc();
            if sample.status != "active" {
                continue;
            }
            let age = sample.refresh_token_age_secs.max(0);
            snapshot.count += 1;
            snapshot.sum_secs += age as f64;
            for (bucket, days) in snapshot.cumulative.iter_mut().zip(AGE_BUCKET_DAYS) {
                if age <= days * 24 * 3600 {
                    *bucket += 1;
                }
            }
            if age >= REFRESH_TOKEN_LIFETIME_SECS - NEAR_LAPSE_SECS {
                near_lapse += 1;
            }
        }
        self.near_lapse.set(near_lapse);
        if let Ok(mut ages) = self.ages.lock() {
            *ages = snapshot;
        }
    }
}

impl Collector for ConnectionMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.by_status.desc();
        descs.extend(self.near_lapse.desc());
        descs.push(&self.age_desc);
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.by_status.collect();
        families.extend(self.near_lapse.collect());
        let snapshot = self
            .ages
            .lock()
            .map(|ages| ages.clone())
            .unwrap_or_default();
        let mut histogram = HistogramProto::default();
        histogram.set_sample_count(snapshot.count);
        histogram.set_sample_sum(snapshot.sum_secs);
        histogram.set_bucket(
            AGE_BUCKET_DAYS
                .iter()
                .zip(snapshot.cumulative.iter().chain(std::iter::repeat(&0)))
                .map(|(days, count)| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound((days * 24 * 3600) as f64);
                    bucket.set_cumulative_count(*count);
                    bucket
                })
                .collect(),
        );
        let mut metric = Metric::default();
        metric.set_histogram(histogram);
        let mut family = MetricFamily::default();
        family.set_name(self.age_desc.fq_name.clone());
        family.set_help(self.age_desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        families.push(family);
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_bounded_labels() {
        let metrics = Metrics::new();
        metrics.record_request("user_data", "GET", 200, Some(0.01), 0.0105);
        metrics.record_refresh(RefreshOutcome::InvalidGrant, 0.2);
        metrics.record_caller(CallerDecision::Forbidden);
        metrics.record_event("near_lapse");
        metrics.record_delivery(DeliveryOutcome::Retried);
        metrics.set_connections(&[
            ConnectionSample {
                status: "active",
                refresh_token_age_secs: 85 * 24 * 3600,
            },
            ConnectionSample {
                status: "active",
                refresh_token_age_secs: 3600,
            },
            ConnectionSample {
                status: "reauth_required",
                refresh_token_age_secs: 0,
            },
        ]);
        assert!(metrics.refresh_counts().contains(&("invalid_grant", 1)));
        assert!(metrics.refresh_counts().contains(&("ok", 0)));
        let text = metrics.render();
        for line in [
            "finx_gateway_build_info{version=",
            "finx_gateway_requests_total{method=\"GET\",route=\"user_data\",status=\"200\"} 1",
            "finx_gateway_refreshes_total{outcome=\"invalid_grant\"} 1",
            "finx_gateway_caller_decisions_total{decision=\"forbidden\"} 1",
            "finx_gateway_events_total{kind=\"near_lapse\"} 1",
            "finx_gateway_events_total{kind=\"revoked\"} 0",
            "finx_gateway_webhook_deliveries_total{outcome=\"retried\"} 1",
            "finx_gateway_webhook_deliveries_total{outcome=\"failed\"} 0",
            "finx_gateway_connections{status=\"active\"} 2",
            "finx_gateway_connections{status=\"revoked\"} 0",
            "finx_gateway_connections_near_lapse 1",
            "finx_gateway_refresh_token_age_seconds_bucket{le=\"86400\"} 1",
            "finx_gateway_refresh_token_age_seconds_count 2",
            "# TYPE finx_gateway_refresh_token_age_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
