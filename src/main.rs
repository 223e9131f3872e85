//! The `finx-gateway` binary: a thin wrapper around [`finx_gateway::cli`].

/// mimalloc, unless a comparison build chose another (see `src/allocator.rs`).
#[global_allocator]
static ALLOCATOR: finx_gateway::allocator::Global = finx_gateway::allocator::GLOBAL;

fn main() -> std::process::ExitCode {
    // Fail points (the `failpoints` feature, for crash tests only) are set by the FAILPOINTS
    // environment variable, e.g. `FAILPOINTS=refresh-after-answer=sleep(60000)`.
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    finx_gateway::cli::run()
}
