//! The `finx-gateway` binary: a thin wrapper around [`finx_gateway::cli`].

fn main() -> std::process::ExitCode {
    finx_gateway::cli::run()
}
