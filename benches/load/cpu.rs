//! CPU time per target: the nanoseconds the kernel says a target's threads ran on a CPU
//! (`/proc/<pid>/task/<tid>/schedstat`, first field), read before and after a run.
//!
//! In-process targets are told apart by thread name (pingora names its runtime threads after
//! the service, the simulator names its thread `finx-sim-<port>`); nginx is its master process
//! and every worker it forked. Time spent by the load generator, or by another target sharing
//! the core, is never counted, so CPU per request compares targets fairly even though the
//! simulator runs on the same core as the proxies.

use std::path::Path;

/// Whose CPU time is counted.
#[derive(Clone, Debug)]
pub enum Account {
    /// Threads of this process whose name starts with one of these prefixes (names are cut
    /// to 15 bytes by the kernel).
    Threads(&'static [&'static str]),
    /// A process and its child processes (nginx's master and workers).
    ProcessTree(u32),
}

/// The gateway: its pingora service threads (proxy and admin), the token manager's refresh
/// runtime and its background log writer (only the gateway writes a line per request).
pub const GATEWAY: Account = Account::Threads(&["finx-gateway", "finx-refresh", "finx-log-writer"]);
/// The passthrough: pingora threads of the service named `passthrough`.
pub const PASSTHROUGH: Account = Account::Threads(&["passthrough"]);
/// The simulator (the "direct" target): its single-threaded runtime.
pub const SIMULATOR: Account = Account::Threads(&["finx-sim"]);

impl Account {
    /// CPU nanoseconds used so far by the threads this account covers.
    pub fn cpu_ns(&self) -> u64 {
        match self {
            Self::Threads(prefixes) => tasks_cpu_ns(Path::new("/proc/self"), |comm| {
                prefixes.iter().any(|prefix| comm.starts_with(prefix))
            }),
            Self::ProcessTree(root) => {
                let mut pids = vec![*root];
                pids.extend(children_of(*root));
                pids.iter()
                    .map(|pid| tasks_cpu_ns(&Path::new("/proc").join(pid.to_string()), |_| true))
                    .sum()
            }
        }
    }
}

/// Sum of the run time of the tasks (threads) of the process at `proc_dir` whose name passes.
fn tasks_cpu_ns(proc_dir: &Path, counted: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| counted(comm.trim_end()))
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The processes whose parent is `parent` (field 4 of `/proc/<pid>/stat`).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The command name, in parentheses, may contain spaces: fields start after it.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Whether this kernel reports per-task run time (`CONFIG_SCHED_INFO`).
pub fn available() -> bool {
    std::fs::read_to_string("/proc/self/schedstat").is_ok()
}
