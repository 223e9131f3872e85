//! CPU placement: the servers under test (simulator, proxies, nginx) on one core, the load
//! generator on another, so that the generator never steals the proxy's CPU time.
//!
//! Threads inherit the affinity of the thread that creates them, and child processes that of
//! the thread that forks them, so pinning the calling thread before starting a server places
//! every thread pingora, tokio or nginx creates for it.

use std::mem::{size_of, zeroed};

/// Which core the servers and the load generator run on (`None`: not pinned).
#[derive(Clone, Copy, Debug)]
pub struct CoreLayout {
    pub servers: Option<usize>,
    pub load: Option<usize>,
}

impl CoreLayout {
    /// Servers on the first allowed core and load on the second, when there are two.
    pub fn detect() -> Self {
        let cores = allowed_cores();
        match cores.as_slice() {
            [servers, load, ..] => Self {
                servers: Some(*servers),
                load: Some(*load),
            },
            _ => Self {
                servers: None,
                load: None,
            },
        }
    }

    pub fn describe(&self) -> String {
        match (self.servers, self.load) {
            (Some(servers), Some(load)) => format!(
                "simulator, proxies and nginx pinned to CPU {servers}; load generator pinned to CPU {load} (sched_setaffinity, inherited by threads and child processes)"
            ),
            _ => "fewer than two CPUs allowed: nothing pinned".into(),
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most size_of::<cpu_set_t>().
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins the calling thread to `core` (no-op for `None`).
pub fn pin_current_thread(core: Option<usize>) {
    let Some(core) = core else { return };
    // SAFETY: as above; pid 0 is the calling thread.
    let result = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        eprintln!(
            "warning: cannot pin to CPU {core}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `start` with the calling thread pinned to `core`, then pins it back to `afterwards`.
pub fn started_on<T>(
    core: Option<usize>,
    afterwards: Option<usize>,
    start: impl FnOnce() -> T,
) -> T {
    pin_current_thread(core);
    let started = start();
    pin_current_thread(afterwards);
    started
}

/// Raises the open-file limit to `wanted` (as far as allowed) and returns the soft limit now in
/// force: the refresh storm holds about four descriptors per in-flight request.
pub fn raise_open_file_limit(wanted: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur >= wanted {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return wanted;
        }
        let soft_to_hard = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft_to_hard) == 0 {
            limit.rlim_max
        } else {
            limit.rlim_cur
        }
    }
}

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`).
pub fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
