//! What the benches share on top of the e2e harness (`tests/common`): whether to run at all, the
//! runtime, knobs from the environment, figures about the machine (load, cores, RSS, the agent
//! binary), latency summaries, and claim objects. Each bench includes it next to the harness:
//!
//! ```ignore
//! #[path = "../tests/common/mod.rs"]
//! mod common;
//! mod support;
//! ```
//!
//! (A directory, not `benches/support.rs`: Cargo would take that file for a bench of its own.)
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::json;

use crate::common::Agent;

/// The annotation with which the scheduler places a claim of a WaitForFirstConsumer class.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The `hostvol` binary Cargo built for the benches (the agents run it unless `HOSTVOL_BIN` is set).
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_hostvol");

/// Whether `cargo bench` asked for the run: `cargo test --benches` and `--all-targets` run bench
/// binaries without `--bench`; then this prints that bench `name` is skipped and returns false.
pub fn requested(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        println!("{name} benchmark: run with `cargo bench --bench {name}`; skipped");
    }
    yes
}

/// The benches' tokio runtime: two workers, as many as the machine's cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A count from the environment variable `name`, `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------------

/// "release" or "debug": the profile `AGENT_BIN` was built with.
pub fn build_kind() -> &'static str {
    let debug = Path::new(AGENT_BIN)
        .components()
        .any(|c| c.as_os_str() == "debug");
    if debug { "debug" } else { "release" }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPUs this process may use (0 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// (VmRSS, VmHWM) in MiB of process `pid` (`"self"` for this one).
pub fn rss_mib(pid: impl std::fmt::Display) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The path of the binary the agent process runs (from /proc).
pub fn agent_exe(agent: &Agent) -> String {
    std::fs::read_link(format!("/proc/{}/exe", agent.pid()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What a `Summary` counts and in which unit, for printing.
#[derive(Clone, Copy)]
pub enum Unit {
    /// "median 1.2 ms, ... over N claims"
    MsPerClaim,
    /// "median 123 us, ... (N calls)"
    UsPerCall,
}

/// Median, p90, p99 and maximum of a set of latencies.
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub unit: Unit,
}

/// Summary of latencies in milliseconds, one per claim.
pub fn summarize_ms(v: Vec<f64>) -> Summary {
    summarize(v, Unit::MsPerClaim)
}

/// Summary of latencies in microseconds, one per call.
pub fn summarize_us(v: Vec<f64>) -> Summary {
    summarize(v, Unit::UsPerCall)
}

fn summarize(mut v: Vec<f64>, unit: Unit) -> Summary {
    v.sort_by(|a, b| a.total_cmp(b));
    Summary {
        n: v.len(),
        median: pct(&v, 0.5),
        p90: pct(&v, 0.9),
        p99: pct(&v, 0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
        unit,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.unit {
            Unit::MsPerClaim => write!(
                f,
                "median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} claims",
                self.median, self.p90, self.p99, self.max, self.n
            ),
            Unit::UsPerCall => write!(
                f,
                "median {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us ({} calls)",
                self.median, self.p90, self.p99, self.max, self.n
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// A ReadWriteOnce claim of `class` for the API, placed on `node` (as the scheduler would) if given.
pub fn claim(
    ns: &str,
    name: &str,
    class: &str,
    size: &str,
    node: Option<&str>,
) -> PersistentVolumeClaim {
    let mut meta = json!({"name": name, "namespace": ns});
    if let Some(node) = node {
        meta["annotations"] = json!({ ANN_SELECTED_NODE: node });
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}}
        }
    }))
    .unwrap()
}
