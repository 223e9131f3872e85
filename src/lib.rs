//! finx-gateway: a pingora sidecar that authenticates internal callers, picks the end user's finX
//! connection, injects a fresh credential and forwards to finX.
//!
//! `main.rs` is a thin CLI; everything tests, benches and the demo need is reachable from here:
//! [`open_store`] and [`build_server`] build the pieces, [`RunningGateway`] runs them on a
//! thread of its own and stops them again.

/// A named fail point: with the `failpoints` feature, logs that it was reached and then acts as
/// the `FAILPOINTS` environment variable says (the `fail` crate: `sleep(60000)`, `panic`, …),
/// so process-level fault tests can kill the gateway at an exact moment. Nothing otherwise.
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            // Straight to stderr, not through the log writer: the crash tests watch for it.
            eprintln!("fail point reached: {}", $name);
            fail::fail_point!($name);
        }
    };
}

pub mod admin;
pub mod allocator;
pub mod callers;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connect;
#[cfg(feature = "sim")]
pub mod demo;
pub mod error;
pub mod events;
pub mod gateway;
pub mod html;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod server_thread;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tokens;

pub use gateway::{
    build_server, build_token_manager, lock_store_after_upgrade, lock_store_for_serving,
    open_store, pingora_server, shutdown_deadline, spawn_pingora, token_settings, upstream_host,
    upstream_peer, BuiltGateway, GatewaySignals, RunningGateway, ServingLock, StartError,
};
pub use server_thread::{reserve_port, wait_until_accepting, ServerThread};
pub use store::postgres::OpenWait;
