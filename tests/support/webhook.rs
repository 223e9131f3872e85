//! A webhook receiver on a loopback port that records every delivery (and fails the first
//! ones on demand), and a signature check as a receiver would do it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use finx_gateway::clock::Clock;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Seen {
    pub signature: String,
    pub event_id: String,
    pub body: String,
    /// What the receiver answered.
    pub status: u16,
}

impl Seen {
    pub fn event(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON event")
    }
}

/// A webhook receiver on 127.0.0.1: records every request and answers 500 to the first
/// `fail_first` of them, 200 to the rest.
#[derive(Clone, Default)]
pub struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> (Self, String) {
        let receiver = Self::default();
        receiver.fail_first.store(fail_first, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/finx", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/hooks/finx", axum::routing::post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The deliveries answered 200 whose event is of `kind`.
    pub fn accepted(&self, kind: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|seen| seen.status == 200 && seen.event()["kind"] == kind)
            .collect()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let fail = receiver
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.seen.lock().unwrap().push(Seen {
        signature: header("x-finx-signature"),
        event_id: header("x-finx-event-id"),
        body: String::from_utf8(body.to_vec()).expect("a UTF-8 body"),
        status: status.as_u16(),
    });
    status
}

/// Verifies `X-Finx-Signature: t=<unix>,v1=<hex>` as a receiver would: HMAC-SHA256 over
/// `"<t>.<body>"` with the shared secret, and a timestamp close to now.
pub fn verify_signature(seen: &Seen, secret: &str) {
    let mut timestamp = None;
    let mut signature = None;
    for part in seen.signature.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = Some(value.to_owned()),
            Some(("v1", value)) => signature = Some(value.to_owned()),
            _ => {}
        }
    }
    let timestamp = timestamp.expect("t= in the signature header");
    let signature = signature.expect("v1= in the signature header");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{}", seen.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(signature, expected, "signature of {}", seen.body);
    let sent: i64 = timestamp.parse().unwrap();
    let now = finx_gateway::clock::SystemClock.now();
    assert!((now - sent).abs() < 300, "signed at {sent}, now {now}");
}
