//! `GET /admin/keys` and `POST /admin/keys/rotate`: how the store's tokens are sealed, by key id,
//! and a rotation that re-seals every connection under the primary key in the background while
//! the gateway serves (the same procedure as `finx-gateway store rotate-key`). Answers carry key
//! ids and counts, never key material.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::{error_answer, json_answer, AdminApp};
use crate::error::AdminError;
use crate::store::rotation::{rotate, RotationError, RotationOptions};
use crate::store::KeyStatus;

/// The rotation this process runs, if any, and how the last one ended.
#[derive(Default)]
pub struct Rotation {
    running: AtomicBool,
    /// Progress of the running rotation, or the outcome of the last one.
    report: Mutex<Value>,
}

/// Clears the running flag when the rotation task ends, however it ends.
struct RunningGuard(Arc<Rotation>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

fn describe(status: &KeyStatus) -> Value {
    json!({
        "primary_key_id": status.primary_key_id,
        "check_key_id": status.check_key_id,
        "current": status.current,
        "pending": status.pending,
        "by_key_id": status.by_key_id,
        "format1": status.format1,
        "complete": status.is_complete(),
    })
}

/// `GET /admin/keys`: connections by key id, and the rotation's progress or last outcome.
pub async fn status(app: &AdminApp) -> Response<Vec<u8>> {
    match app.store.key_status().await {
        Ok(status) => {
            let rotation = app
                .rotation
                .report
                .lock()
                .map(|r| r.clone())
                .unwrap_or(Value::Null);
            json_answer(
                StatusCode::OK,
                &json!({
                    "keys": describe(&status),
                    "rotation": {
                        "running": app.rotation.running.load(Ordering::Relaxed),
                        "report": rotation,
                    },
                }),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "admin API: key status unavailable");
            error_answer(&AdminError::StoreUnavailable)
        }
    }
}

/// `POST /admin/keys/rotate`: starts the rotation in the background (202), or 409 while one
/// runs. `GET /admin/keys` follows it.
pub fn start(app: &AdminApp) -> Response<Vec<u8>> {
    if app.rotation.running.swap(true, Ordering::AcqRel) {
        return error_answer(&AdminError::RotationRunning);
    }
    let store = app.store.clone();
    let rotation: Arc<Rotation> = app.rotation.clone();
    tokio::spawn(async move {
        // However the task ends (a panic included), the next rotation may start.
        let _running = RunningGuard(rotation.clone());
        let record = |value: Value| {
            if let Ok(mut report) = rotation.report.lock() {
                *report = value;
            }
        };
        record(json!({ "state": "running" }));
        let outcome = rotate(store.as_ref(), &RotationOptions::default(), |progress| {
            record(json!({
                "state": "running",
                "pass": progress.pass,
                "resealed": progress.resealed,
                "raced": progress.raced,
            }));
        })
        .await;
        match outcome {
            Ok(status) => {
                tracing::info!(primary_key_id = %status.primary_key_id, "key rotation complete");
                record(json!({ "state": "complete", "keys": describe(&status) }));
            }
            Err(error) => {
                tracing::error!(%error, "key rotation stopped");
                // The store's own words may name database internals: they go to the log only.
                let why = match &error {
                    RotationError::Store(_) => {
                        "the token store failed; the gateway's log says why".to_owned()
                    }
                    composed => composed.to_string(),
                };
                record(json!({ "state": "failed", "error": why }));
            }
        }
    });
    json_answer(StatusCode::ACCEPTED, &json!({ "started": true }))
}
