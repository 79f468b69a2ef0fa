//! Memory limits for agents: a cgroup v1 memory cgroup (`/sys/fs/cgroup/memory`, what this machine
//! and the CI run) that an agent's pid is moved into, with its limit, limit hits and OOM kills; and a
//! process's own peak RSS (`VmHWM`), the figure tests print. The cgroup also charges kernel objects
//! the agent allocates (e.g. the inodes of files it creates on tmpfs), which is why the figure is RSS.

use std::path::PathBuf;

const MEMORY_CGROUPS: &str = "/sys/fs/cgroup/memory";

/// A memory cgroup of this test run, removed on drop (once its processes have exited: declare it
/// before the agents it holds, so they are dropped first).
pub struct MemoryCgroup {
    path: PathBuf,
}

impl MemoryCgroup {
    /// Creates `hostvol-e2e-<name>-<pid>` limited to `limit` bytes; fails the test saying what is
    /// needed (root and the cgroup v1 memory controller) when it cannot.
    pub fn new(name: &str, limit: u64) -> Self {
        let path = PathBuf::from(MEMORY_CGROUPS)
            .join(format!("hostvol-e2e-{name}-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&path) {
            panic!(
                "cannot create memory cgroup {} ({e}): this test needs root and the cgroup v1 memory \
                 controller mounted at {MEMORY_CGROUPS}; run it as root, as scripts/test.sh does in CI",
                path.display()
            );
        }
        let cgroup = MemoryCgroup { path };
        cgroup.set_limit(limit);
        cgroup
    }

    pub fn set_limit(&self, bytes: u64) {
        self.write("memory.limit_in_bytes", &bytes.to_string());
    }

    /// Moves process `pid` (all its threads) into this cgroup. Only what it allocates from now on is
    /// charged here (this kernel cannot move charges): limit it to its budget minus its RSS now.
    pub fn add(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    /// How often usage hit the limit (and the kernel had to reclaim).
    pub fn failcnt(&self) -> u64 {
        self.read("memory.failcnt").trim().parse().unwrap_or(0)
    }

    /// Processes the kernel killed for running out of this cgroup's memory.
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Peak charge (process and kernel memory) since creation or the last `reset_max_usage`.
    pub fn max_usage(&self) -> u64 {
        self.read("memory.max_usage_in_bytes")
            .trim()
            .parse()
            .unwrap_or(0)
    }

    pub fn reset_max_usage(&self) {
        self.write("memory.max_usage_in_bytes", "0");
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.path.join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
    }

    fn read(&self, file: &str) -> String {
        let path = self.path.join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Peak resident set size of process `pid` in bytes (`VmHWM`), since it started or the last
/// `reset_peak_rss`.
pub fn peak_rss(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// Current resident set size of process `pid` in bytes (`VmRSS`).
pub fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// Starts measuring `peak_rss` of `pid` afresh, from its current RSS.
pub fn reset_peak_rss(pid: u32) {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").unwrap_or_else(|e| panic!("write 5 to {path}: {e}"));
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
}
