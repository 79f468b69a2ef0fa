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
    /// "median 1.2 ms, ... (N calls)"
    MsPerCall,
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

/// Summary of latencies in milliseconds, one per call.
pub fn summarize_ms_calls(v: Vec<f64>) -> Summary {
    summarize(v, Unit::MsPerCall)
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
            Unit::MsPerCall => write!(
                f,
                "median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} calls)",
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

// ---------------------------------------------------------------------------------------------
// The agent's log
// ---------------------------------------------------------------------------------------------

/// Signed milliseconds from `a` to `b`.
pub fn ms_between(a: std::time::Instant, b: std::time::Instant) -> f64 {
    if b >= a { ms(b - a) } else { -ms(a - b) }
}

/// `s` without ANSI escape sequences (the agent's log is coloured).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `millis=` of the agent's "provisioned" log lines for claims in namespace `ns`.
pub fn logged_millis(agent: &Agent, ns: &str) -> Vec<f64> {
    let needle = format!("pvc={ns}/");
    agent
        .log()
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(" provisioned") && l.contains(&needle))
        .filter_map(|l| {
            l.split("millis=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Splits the agent's logged step per claim of namespace `ns` with the timestamps of its debug line
/// "volume directory ready": (start -> directory ready [GET claim, GET PV, lock, statvfs, volume made
/// durably with its limit], directory ready -> "provisioned" [POST PV]) in ms.
pub fn logged_split(agent: &Agent, ns: &str) -> (Vec<f64>, Vec<f64>) {
    let needle = format!("pvc={ns}/");
    let ts = |l: &str| {
        l.split_whitespace()
            .next()?
            .parse::<k8s_openapi::jiff::Timestamp>()
            .ok()
            .map(|t| t.as_microsecond())
    };
    let pvc = |l: &str| {
        l.split(&needle)
            .nth(1)?
            .split(|c: char| c.is_whitespace() || c == '}')
            .next()
            .map(str::to_string)
    };
    let mut dir_ready: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let (mut before, mut post) = (Vec::new(), Vec::new());
    for l in agent
        .log()
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(&needle))
    {
        let (Some(t), Some(claim)) = (ts(&l), pvc(&l)) else {
            continue;
        };
        if l.contains(" volume directory ready") {
            dir_ready.insert(claim, t);
        } else if l.contains(" provisioned")
            && let Some(total) = l
                .split("millis=")
                .nth(1)
                .and_then(|m| m.split_whitespace().next()?.parse::<f64>().ok())
            && let Some(d) = dir_ready.get(&claim)
        {
            let p = (t - d) as f64 / 1e3;
            post.push(p);
            before.push(total - p);
        }
    }
    (before, post)
}

// ---------------------------------------------------------------------------------------------
// Watch-arrival stamps (the outside view of the agent step)
// ---------------------------------------------------------------------------------------------

/// A claim's (namespace, name).
pub type ClaimKey = (String, String);

const ANN_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
const ANN_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";

/// When this process's watches first saw each claim annotated for its provisioner (by the PV
/// controller) and the PV naming it; the agent step seen from outside is the time between.
#[derive(Default)]
pub struct Stamps {
    pub annotated: std::collections::HashMap<ClaimKey, std::time::Instant>,
    pub pv: std::collections::HashMap<ClaimKey, std::time::Instant>,
}

#[derive(Default)]
pub struct Recorder {
    pub stamps: std::sync::Mutex<Stamps>,
    changed: tokio::sync::Notify,
}

impl Recorder {
    fn claim(&self, pvc: &PersistentVolumeClaim, now: std::time::Instant) {
        use kube::ResourceExt;
        let ann = pvc.annotations();
        if ann.contains_key(ANN_PROVISIONER_BETA) || ann.contains_key(ANN_PROVISIONER) {
            let key = (pvc.namespace().unwrap_or_default(), pvc.name_any());
            self.stamps
                .lock()
                .unwrap()
                .annotated
                .entry(key)
                .or_insert(now);
            self.changed.notify_waiters();
        }
    }

    fn volume(&self, pv: &k8s_openapi::api::core::v1::PersistentVolume, now: std::time::Instant) {
        let Some(cr) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
            return;
        };
        let key = (
            cr.namespace.clone().unwrap_or_default(),
            cr.name.clone().unwrap_or_default(),
        );
        self.stamps.lock().unwrap().pv.entry(key).or_insert(now);
        self.changed.notify_waiters();
    }

    /// Waits (woken by watch events) until `done(stamps)` or the timeout; returns whether done.
    pub async fn wait(&self, timeout: Duration, done: impl Fn(&Stamps) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.stamps.lock().unwrap()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.stamps.lock().unwrap());
            }
        }
    }

    /// Annotation -> PV, in ms, per claim of namespace `ns` that has both.
    pub fn agent_steps(&self, ns: &str) -> Vec<f64> {
        let s = self.stamps.lock().unwrap();
        s.pv.iter()
            .filter(|(k, _)| k.0 == ns)
            .filter_map(|(k, pv)| Some(ms_between(*s.annotated.get(k)?, *pv)))
            .collect()
    }
}

/// Starts a claim watch and a PV watch (all namespaces) stamping arrivals into `rec`; returns once
/// both listed, with the tasks to abort when the cluster goes.
pub async fn start_watches(
    client: kube::Client,
    rec: std::sync::Arc<Recorder>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use k8s_openapi::api::core::v1::PersistentVolume;
    use kube::Api;
    let r = rec.clone();
    let (claims, claims_listed) = spawn_watch(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        "claim",
        move |p, now| r.claim(p, now),
    );
    let (volumes, volumes_listed) =
        spawn_watch(Api::<PersistentVolume>::all(client), "PV", move |p, now| {
            rec.volume(p, now)
        });
    let _ = claims_listed.await;
    let _ = volumes_listed.await;
    vec![claims, volumes]
}

/// Watches `api`, calling `seen(object, arrival)` for every object event; the receiver fires once
/// the initial list is done.
pub fn spawn_watch<K>(
    api: kube::Api<K>,
    what: &'static str,
    seen: impl Fn(&K, std::time::Instant) + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<()>,
)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(tx);
        let mut s = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = s.next().await {
            let now = std::time::Instant::now();
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => seen(&p, now),
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("[bench] {what} watch: {e}"),
            }
        }
    });
    (task, rx)
}
