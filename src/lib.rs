//! finx-gateway: a pingora sidecar that authenticates internal callers, picks the end user's finX
//! connection, injects a fresh credential and forwards to finX.
//!
//! `main.rs` is a thin CLI; everything tests and benches need is reachable from here.

pub mod callers;
pub mod clock;
pub mod sim;
pub mod store;
