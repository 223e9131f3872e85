//! The global allocator the `finx-gateway` binary and the load bench install, chosen at build
//! time: mimalloc, unless the feature `jemalloc` (which wins) or `system-allocator` replaces
//! it for a comparison. The library itself installs none,
//! so a test or bench may wrap it (the hot-path bench counts allocations through it).
//!
//! Why mimalloc: measured with the load bench on this project's sidecar workload (README
//! "Performance"), it gave the plain passthrough the lowest CPU per request relative to nginx
//! of the three (the differences are close to the run-to-run noise), and a little less memory
//! per cached connection than glibc in an earlier experiment.
//!
//! A leaf module: it depends on nothing else in the crate.

/// The allocator type of this build.
#[cfg(feature = "jemalloc")]
pub type Global = tikv_jemallocator::Jemalloc;
/// The allocator type of this build.
#[cfg(not(any(feature = "jemalloc", feature = "system-allocator")))]
pub type Global = mimalloc::MiMalloc;
/// The allocator type of this build.
#[cfg(all(feature = "system-allocator", not(feature = "jemalloc")))]
pub type Global = std::alloc::System;

/// The allocator of this build, for `#[global_allocator] static A: Global = GLOBAL;`.
#[cfg(feature = "jemalloc")]
pub const GLOBAL: Global = tikv_jemallocator::Jemalloc;
/// The allocator of this build, for `#[global_allocator] static A: Global = GLOBAL;`.
#[cfg(not(any(feature = "jemalloc", feature = "system-allocator")))]
pub const GLOBAL: Global = mimalloc::MiMalloc;
/// The allocator of this build, for `#[global_allocator] static A: Global = GLOBAL;`.
#[cfg(all(feature = "system-allocator", not(feature = "jemalloc")))]
pub const GLOBAL: Global = std::alloc::System;

/// Which allocator this build installs, for logs and bench reports.
pub const NAME: &str = if cfg!(feature = "jemalloc") {
    "jemalloc"
} else if cfg!(feature = "system-allocator") {
    "system (glibc malloc)"
} else {
    "mimalloc"
};
