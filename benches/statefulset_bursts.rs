//! On real kubelets (issue 18): StatefulSets with `podManagementPolicy: Parallel` and N replicas,
//! created in one request and timed to every pod Ready, with a hostvol claim per replica
//! (`volumeClaimTemplates`, class `hostvol`) next to the same StatefulSet with an emptyDir (the floor).
//! Runs alternate emptyDir and hostvol for each size; a warm-up of each kind goes first.
//!
//! Prints, per size: apply → all Ready for each run, the medians, the difference (targets: 20
//! replicas ≤ floor + 3 s, 50 replicas ≤ floor + 5 s), the median of each step gap over every replica
//! of every run, the slowest replicas' timelines, where the time went (the largest gaps), and the
//! components' evidence: Events (summed by source and reason), the kubelets' client-side throttling and
//! mount failures, and the scheduler's and kube-controller-manager's log lines about the run.
//!
//! A replica's timeline, in seconds after the StatefulSet was created: claim created → the scheduler's
//! `volume.kubernetes.io/selected-node` → hostvol started (the agent's "provisioned" line minus its
//! `millis=`) → PV created → claim Bound (PV controller) → pod scheduled (`spec.nodeName`) → kubelet
//! saw the pod ("SyncLoop (ADD") → volume mounted ("MountVolume.SetUp succeeded") → container started
//! (last PLEG ContainerStarted) → Ready. Claim, PV and pod steps are when this process's watches saw
//! them (ms resolution); agent and kubelet steps come from their log lines' timestamps (same host clock,
//! µs). Object timestamps (1-s resolution) are not used.
//!
//! Run: `cargo bench --bench statefulset_bursts` (as root, after `scripts/setup-real-nodes.sh` and
//! `scripts/build-image.sh`). `HOSTVOL_BENCH_BURST_SIZES` (default `10,20`), `HOSTVOL_BENCH_BURST_RUNS`
//! (default 2), `HOSTVOL_BENCH_BURST_SLOWEST` (timelines printed per size, default 3),
//! `HOSTVOL_BENCH_BURST_TIMEOUT` (seconds to all Ready, default 300), `HOSTVOL_BENCH_KUBELET_QPS`
//! (the kubelets' `kubeAPIQPS`, burst twice that; default 1.20's 5 / 10).
//! Prints figures; asserts nothing about time.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use common::RealCluster;
use support::{ANN_SELECTED_NODE, ms_between, pct, requested, spawn_watch, strip_ansi};

const NS: &str = "bursts";
/// Every object of the bench carries it; the value names the run.
const RUN_LABEL: &str = "hostvol-bench-run";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    EmptyDir,
    Hostvol,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::EmptyDir => "emptyDir",
            Kind::Hostvol => "hostvol",
        }
    }
    fn tag(self) -> char {
        match self {
            Kind::EmptyDir => 'e',
            Kind::Hostvol => 'h',
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the watches saw
// ---------------------------------------------------------------------------------------------

#[derive(Default, Clone, Debug)]
struct ClaimSeen {
    created: Option<Instant>,
    selected: Option<Instant>,
    bound: Option<Instant>,
}

#[derive(Default, Clone, Debug)]
struct PodSeen {
    uid: String,
    created: Option<Instant>,
    scheduled: Option<Instant>,
    node: Option<String>,
    ready: Option<Instant>,
}

#[derive(Default)]
struct Seen {
    claims: HashMap<String, ClaimSeen>,
    pods: HashMap<String, PodSeen>,
    /// claim name (namespace NS) → (PV name, first seen)
    pvs: HashMap<String, (String, Instant)>,
}

type Shared = Arc<Mutex<Seen>>;

fn saw_claim(seen: &Shared, c: &PersistentVolumeClaim, now: Instant) {
    let mut s = seen.lock().unwrap();
    let e = s.claims.entry(c.name_any()).or_default();
    e.created.get_or_insert(now);
    if c.annotations().contains_key(ANN_SELECTED_NODE) {
        e.selected.get_or_insert(now);
    }
    if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
        e.bound.get_or_insert(now);
    }
}

fn saw_pod(seen: &Shared, p: &Pod, now: Instant) {
    let mut s = seen.lock().unwrap();
    let e = s.pods.entry(p.name_any()).or_default();
    e.created.get_or_insert(now);
    e.uid = p.uid().unwrap_or_default();
    if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
        e.scheduled.get_or_insert(now);
        e.node.get_or_insert(node);
    }
    let ready = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready {
        e.ready.get_or_insert(now);
    }
}

fn saw_pv(seen: &Shared, pv: &PersistentVolume, now: Instant) {
    let Some(cr) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return;
    };
    if cr.namespace.as_deref() != Some(NS) {
        return;
    }
    let claim = cr.name.clone().unwrap_or_default();
    seen.lock()
        .unwrap()
        .pvs
        .entry(claim)
        .or_insert((pv.name_any(), now));
}

// ---------------------------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------------------------

/// A replica's steps, in ms after the StatefulSet was created (None: not seen).
#[derive(Default, Clone, Debug)]
struct Timeline {
    pod: String,
    node: String,
    claim_created: Option<f64>,
    selected: Option<f64>,
    agent_started: Option<f64>,
    pv_created: Option<f64>,
    bound: Option<f64>,
    pod_created: Option<f64>,
    scheduled: Option<f64>,
    kubelet_saw: Option<f64>,
    mounted: Option<f64>,
    started: Option<f64>,
    ready: Option<f64>,
}

/// The steps of a kind's chain, in order: (name, component that owns the gap ending here, getter).
type Getter = fn(&Timeline) -> Option<f64>;

fn chain(kind: Kind) -> Vec<(&'static str, &'static str, Getter)> {
    let mut v: Vec<(&'static str, &'static str, Getter)> = Vec::new();
    match kind {
        Kind::Hostvol => {
            v.push(("claim created", "StatefulSet controller", |t| {
                t.claim_created
            }));
            v.push((
                "selected-node",
                "scheduler (filter, assume, PreBind)",
                |t| t.selected,
            ));
            v.push(("hostvol started", "agent (watch, queue, lock)", |t| {
                t.agent_started
            }));
            v.push(("PV created", "agent (provisioning)", |t| t.pv_created));
            v.push(("claim Bound", "PV controller", |t| t.bound));
            v.push(("pod scheduled", "scheduler (1-s bind poll, bind)", |t| {
                t.scheduled
            }));
        }
        Kind::EmptyDir => {
            v.push(("pod created", "StatefulSet controller", |t| t.pod_created));
            v.push(("pod scheduled", "scheduler", |t| t.scheduled));
        }
    }
    v.push(("kubelet saw pod", "kubelet watch", |t| t.kubelet_saw));
    v.push(("volume mounted", "kubelet volume manager", |t| t.mounted));
    v.push(("container started", "kubelet + containerd", |t| t.started));
    v.push(("Ready", "kubelet status", |t| t.ready));
    v
}

/// Gaps between consecutive steps of the chain that both exist (the first from the apply).
fn gaps(kind: Kind, t: &Timeline) -> Vec<Option<f64>> {
    let mut prev = Some(0.0);
    chain(kind)
        .iter()
        .map(|(_, _, get)| {
            let cur = get(t);
            let g = match (prev, cur) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            if cur.is_some() {
                prev = cur;
            }
            g
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Log lines (same host clock: wall time → ms after the apply)
// ---------------------------------------------------------------------------------------------

fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// RFC 3339 (the agent's tracing timestamps).
fn rfc3339_micros(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_microsecond())
}

/// A klog header `I1203 18:05:01.123456 ...` (no year; the host's clock is UTC), in µs since the epoch.
fn klog_micros(line: &str, year: i16) -> Option<i64> {
    let b = line.as_bytes();
    if b.len() < 21 || !matches!(b[0], b'I' | b'W' | b'E' | b'F') || b[5] != b' ' {
        return None;
    }
    let (mm, dd, hms) = (&line[1..3], &line[3..5], &line[6..21]);
    rfc3339_micros(&format!("{year}-{mm}-{dd}T{hms}Z"))
}

fn year_of(t: SystemTime) -> i16 {
    k8s_openapi::jiff::Timestamp::from_microsecond(unix_micros(t))
        .map(|t| t.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).year())
        .unwrap_or(2026)
}

/// What one run's log lines say, in ms after the apply.
#[derive(Default)]
struct Logs {
    /// claim name → (agent started, agent done)
    agent: HashMap<String, (f64, f64)>,
    agent_warnings: Vec<String>,
    /// pod UID → first "SyncLoop (ADD"
    kubelet_saw: HashMap<String, f64>,
    /// pod UID → "MountVolume.SetUp succeeded" of the data volume
    mounted: HashMap<String, f64>,
    /// pod UID → last PLEG ContainerStarted
    started: HashMap<String, f64>,
    /// node → (count, longest ms, example) of "Throttling request took" (logged at most once a second)
    throttled: BTreeMap<String, (usize, f64, String)>,
    kubelet_mount_failures: Vec<String>,
    /// cause → count of the kubelets' failed reads of a claim ("error processing PVC ...: CAUSE")
    claim_read_failures: BTreeMap<String, usize>,
    /// pods whose sync failed on their volumes (then wait out the pod worker's 10-15 s backoff)
    pods_backed_off: usize,
    scheduler: Vec<String>,
    controller_manager: Vec<String>,
}

fn read_logs(rc: &RealCluster, kind: Kind, sts: &str, t0: SystemTime, t_end: SystemTime) -> Logs {
    let mut logs = Logs::default();
    let base = unix_micros(t0);
    let (lo, hi) = (base - 500_000, unix_micros(t_end) + 2_000_000);
    let rel = |us: i64| (us - base) as f64 / 1e3;
    let in_window = |us: i64| us >= lo && us <= hi;
    let year = year_of(t0);

    if kind == Kind::Hostvol {
        let needle = format!("pvc={NS}/");
        for l in rc.agent_logs().lines().map(strip_ansi) {
            let Some(ts) = l.split_whitespace().next().and_then(rfc3339_micros) else {
                continue;
            };
            if !in_window(ts) || !l.contains(&needle) {
                continue;
            }
            let claim = l
                .split(&needle)
                .nth(1)
                .and_then(|r| r.split(|c: char| c.is_whitespace() || c == '}').next())
                .unwrap_or_default()
                .to_string();
            if !claim.contains(sts) {
                continue;
            }
            if l.contains(" provisioned")
                && let Some(millis) = l
                    .split("millis=")
                    .nth(1)
                    .and_then(|m| m.split_whitespace().next()?.parse::<f64>().ok())
            {
                logs.agent.insert(claim, (rel(ts) - millis, rel(ts)));
            } else if l.contains(" WARN ") || l.contains(" ERROR ") {
                logs.agent_warnings.push(l.clone());
            }
        }
    }

    let dir = rc.dir().join("logs");
    for node in rc.nodes() {
        let text =
            std::fs::read_to_string(dir.join(format!("{}.log", node.name))).unwrap_or_default();
        for l in text.lines() {
            let Some(ts) = klog_micros(l, year) else {
                continue;
            };
            if !in_window(ts) {
                continue;
            }
            if l.contains("Throttling request took") {
                let took = l
                    .split("Throttling request took ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .and_then(go_duration_ms)
                    .unwrap_or(0.0);
                let e = logs
                    .throttled
                    .entry(node.name.clone())
                    .or_insert((0, 0.0, String::new()));
                e.0 += 1;
                if took > e.1 {
                    e.1 = took;
                    e.2 = l.split("] ").nth(1).unwrap_or(l).to_string();
                }
                continue;
            }
            if !l.contains(sts) {
                continue;
            }
            if l.contains("SyncLoop (ADD, \"api\")") {
                // "SyncLoop (ADD, \"api\"): \"a_ns(uid), b_ns(uid)\""
                for uid in uids_in(l) {
                    logs.kubelet_saw.entry(uid).or_insert(rel(ts));
                }
            } else if l.contains("MountVolume.SetUp succeeded for volume")
                && !l.contains("-token-")
                && let Some(uid) = l.split("(UID: \"").nth(1).and_then(|r| r.split('"').next())
            {
                logs.mounted.entry(uid.to_string()).or_insert(rel(ts));
            } else if l.contains("SyncLoop (PLEG)") && l.contains("ContainerStarted") {
                for uid in uids_in(l) {
                    logs.started.insert(uid, rel(ts));
                }
            } else if let Some(cause) = l
                .contains("Error processing volume")
                .then(|| l.split("error processing PVC ").nth(1))
                .flatten()
                .and_then(|r| r.split_once(": ").map(|(_, c)| c))
            {
                let cause = if cause.contains("no relationship found between node") {
                    "forbidden: Node authorizer has no pod→claim edge yet"
                } else if cause.starts_with("PVC is not bound") {
                    "PVC is not bound (phase not yet Bound)"
                } else {
                    cause
                };
                *logs.claim_read_failures.entry(cut(cause, 100)).or_default() += 1;
            } else if l.contains("MountVolume.SetUp failed")
                || l.contains("Unable to attach or mount")
                || l.contains("Error preparing data for projected volume")
            {
                if l.contains("Unable to attach or mount volumes for pod") {
                    logs.pods_backed_off += 1;
                }
                logs.kubelet_mount_failures.push(l.to_string());
            }
        }
    }

    let component = |file: &str, out: &mut Vec<String>| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        for l in text.lines() {
            let Some(ts) = klog_micros(l, year) else {
                continue;
            };
            // Lines about the run's objects, and errors and warnings of the window (most are).
            if in_window(ts)
                && !l.contains("Successfully bound pod to node")
                && (l.contains(sts) || !l.starts_with('I'))
            {
                out.push(format!("{:+.2} s {}", rel(ts) / 1e3, l));
            }
        }
    };
    component("kube-scheduler.log", &mut logs.scheduler);
    component("kube-controller-manager.log", &mut logs.controller_manager);
    logs
}

/// The UIDs of `name_ns(uid)` items in a kubelet line.
fn uids_in(line: &str) -> Vec<String> {
    line.split(&format!("_{NS}("))
        .skip(1)
        .filter_map(|r| r.split(')').next())
        .map(str::to_string)
        .collect()
}

/// A Go duration ("1.234567s", "950ms") in ms.
fn go_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse().ok();
    }
    if let Some(v) = s.strip_suffix("µs") {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    if let Some(v) = s.strip_suffix('s') {
        if let Some((m, sec)) = v.split_once('m') {
            return Some(m.parse::<f64>().ok()? * 60e3 + sec.parse::<f64>().ok()? * 1e3);
        }
        return v.parse::<f64>().ok().map(|v| v * 1e3);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// A run
// ---------------------------------------------------------------------------------------------

struct Run {
    kind: Kind,
    size: usize,
    /// apply → every pod Ready (ms); None when it timed out
    total: Option<f64>,
    timelines: Vec<Timeline>,
    events: Vec<(String, String, i32, String)>,
    logs: Logs,
    nodes: BTreeMap<String, usize>,
}

fn statefulset(name: &str, kind: Kind, size: usize) -> StatefulSet {
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sleep", "3600"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
    });
    let mut spec = json!({
        "replicas": size,
        "podManagementPolicy": "Parallel",
        "serviceName": name,
        "selector": {"matchLabels": {RUN_LABEL: name}},
        "template": {"metadata": {"labels": {RUN_LABEL: name}}},
    });
    match kind {
        Kind::EmptyDir => pod_spec["volumes"] = json!([{"name": "data", "emptyDir": {}}]),
        Kind::Hostvol => {
            spec["volumeClaimTemplates"] = json!([{
                "metadata": {"name": "data", "labels": {RUN_LABEL: name}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hostvol",
                         "resources": {"requests": {"storage": "16Mi"}}}
            }])
        }
    }
    spec["template"]["spec"] = pod_spec;
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {RUN_LABEL: name}}, "spec": spec}),
    )
    .unwrap()
}

async fn run_once(
    rc: &RealCluster,
    client: &kube::Client,
    seen: &Shared,
    kind: Kind,
    size: usize,
    name: &str,
    timeout: Duration,
) -> Run {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let pod_name = |i: usize| format!("{name}-{i}");
    let claim_name = |i: usize| format!("data-{name}-{i}");

    let t0 = Instant::now();
    let t0_wall = SystemTime::now();
    sets.create(&PostParams::default(), &statefulset(name, kind, size))
        .await
        .unwrap();
    let deadline = t0 + timeout;
    let mut total = None;
    loop {
        let ready: Vec<Instant> = {
            let s = seen.lock().unwrap();
            (0..size)
                .filter_map(|i| s.pods.get(&pod_name(i)).and_then(|p| p.ready))
                .collect()
        };
        if ready.len() == size {
            total = ready.iter().max().map(|m| ms_between(t0, *m));
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "[bench] {name}: {} of {size} pods Ready after {} s; timed out",
                ready.len(),
                timeout.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_end_wall = SystemTime::now();
    // Let the kubelets write their last lines.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut evs: BTreeMap<(String, String), (i32, String)> = BTreeMap::new();
    for e in events.list(&ListParams::default()).await.unwrap() {
        if !e
            .involved_object
            .name
            .as_deref()
            .unwrap_or("")
            .contains(name)
        {
            continue;
        }
        let source = e
            .source
            .as_ref()
            .and_then(|s| s.component.clone())
            .or(e.reporting_component.clone())
            .unwrap_or_default();
        let reason = e.reason.clone().unwrap_or_default();
        let entry = evs.entry((source, reason)).or_insert((0, String::new()));
        entry.0 += e.count.unwrap_or(1);
        if entry.1.is_empty() {
            entry.1 = e.message.clone().unwrap_or_default();
        }
    }
    let logs = read_logs(rc, kind, name, t0_wall, t_end_wall);

    let s = seen.lock().unwrap();
    let rel = |i: Option<Instant>| i.map(|i| ms_between(t0, i));
    let mut nodes: BTreeMap<String, usize> = BTreeMap::new();
    let timelines = (0..size)
        .map(|i| {
            let p = s.pods.get(&pod_name(i)).cloned().unwrap_or_default();
            let c = s.claims.get(&claim_name(i)).cloned().unwrap_or_default();
            let node = p.node.clone().unwrap_or_else(|| "?".into());
            *nodes.entry(node.clone()).or_default() += 1;
            let agent = logs.agent.get(&claim_name(i));
            Timeline {
                pod: pod_name(i),
                node,
                claim_created: rel(c.created),
                selected: rel(c.selected),
                agent_started: agent.map(|a| a.0),
                pv_created: rel(s.pvs.get(&claim_name(i)).map(|p| p.1)),
                bound: rel(c.bound),
                pod_created: rel(p.created),
                scheduled: rel(p.scheduled),
                kubelet_saw: logs.kubelet_saw.get(&p.uid).copied(),
                mounted: logs.mounted.get(&p.uid).copied(),
                started: logs.started.get(&p.uid).copied(),
                ready: rel(p.ready),
            }
        })
        .collect();
    drop(s);
    Run {
        kind,
        size,
        total,
        timelines,
        events: evs
            .into_iter()
            .map(|((src, reason), (n, msg))| (src, reason, n, msg))
            .collect(),
        logs,
        nodes,
    }
}

/// Deletes the run's StatefulSet, pods, claims and (Released, Retain) PVs and waits until they are gone.
async fn clean_up(client: &kube::Client, seen: &Shared, name: &str) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let sel = ListParams::default().labels(&format!("{RUN_LABEL}={name}"));
    let _ = sets.delete(name, &DeleteParams::background()).await;
    let _ = pods
        .delete_collection(&DeleteParams::default().grace_period(0), &sel)
        .await;
    let _ = claims
        .delete_collection(&DeleteParams::default(), &sel)
        .await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(300) {
        let p = pods.list(&sel).await.map(|l| l.items.len()).unwrap_or(1);
        let c = claims.list(&sel).await.map(|l| l.items.len()).unwrap_or(1);
        if p == 0 && c == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ours: Vec<String> = seen
        .lock()
        .unwrap()
        .pvs
        .iter()
        .filter(|(claim, _)| claim.contains(name))
        .map(|(_, (pv, _))| pv.clone())
        .collect();
    for pv in ours {
        let _ = pvs.delete(&pv, &DeleteParams::default()).await;
    }
    // The kubelets tear down containers and mounts after the objects are gone: let them settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(&v, 0.5)
}

fn secs(v: Option<f64>) -> String {
    v.map(|v| format!("{:.2}", v / 1e3))
        .unwrap_or_else(|| "-".into())
}

fn print_timelines(kind: Kind, rows: &[&Timeline]) {
    let steps = chain(kind);
    let mut head = format!("      {:<14} {:<7}", "replica", "node");
    for (n, _, _) in &steps {
        head.push_str(&format!(" {:>9}", short(n)));
    }
    if kind == Kind::Hostvol {
        head.push_str(&format!(" {:>9}", "pod-made"));
    }
    println!("{head}");
    for t in rows {
        let mut line = format!("      {:<14} {:<7}", t.pod, t.node);
        for (_, _, get) in &steps {
            line.push_str(&format!(" {:>9}", secs(get(t))));
        }
        if kind == Kind::Hostvol {
            line.push_str(&format!(" {:>9}", secs(t.pod_created)));
        }
        let g = gaps(kind, t);
        if let Some((i, w)) = g
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.map(|g| (i, g)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
        {
            line.push_str(&format!(
                "   largest gap: → {} {:.2} s",
                steps[i].0,
                w / 1e3
            ));
        }
        println!("{line}");
    }
}

fn short(step: &str) -> &str {
    match step {
        "claim created" => "claim",
        "selected-node" => "sel-node",
        "hostvol started" => "agent",
        "PV created" => "PV",
        "claim Bound" => "Bound",
        "pod created" => "pod-made",
        "pod scheduled" => "sched",
        "kubelet saw pod" => "kubelet",
        "volume mounted" => "mounted",
        "container started" => "started",
        other => other,
    }
}

fn print_size(size: usize, runs: &[Run], slowest: usize) {
    println!();
    println!("== {size} replicas ==");
    let totals = |k: Kind| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.kind == k && r.size == size)
            .filter_map(|r| r.total)
            .collect()
    };
    for kind in [Kind::EmptyDir, Kind::Hostvol] {
        let all: Vec<String> = runs
            .iter()
            .filter(|r| r.kind == kind && r.size == size)
            .map(|r| {
                let t = r
                    .total
                    .map(|t| format!("{:.2}", t / 1e3))
                    .unwrap_or("timeout".into());
                let nodes: Vec<String> = r.nodes.iter().map(|(n, c)| format!("{n}:{c}")).collect();
                format!("{t} ({})", nodes.join(" "))
            })
            .collect();
        println!(
            "  apply → all Ready, {:<8}: median {:.2} s; runs: {}",
            kind.label(),
            median(totals(kind)) / 1e3,
            all.join(", ")
        );
    }
    let (floor, ours) = (
        median(totals(Kind::EmptyDir)),
        median(totals(Kind::Hostvol)),
    );
    let target = match size {
        20 => " (target ≤ +3 s)",
        50 => " (target ≤ +5 s)",
        _ => "",
    };
    println!(
        "  difference of medians: {:+.2} s{target}",
        (ours - floor) / 1e3
    );

    for kind in [Kind::EmptyDir, Kind::Hostvol] {
        let rs: Vec<&Run> = runs
            .iter()
            .filter(|r| r.kind == kind && r.size == size)
            .collect();
        let tls: Vec<&Timeline> = rs.iter().flat_map(|r| r.timelines.iter()).collect();
        let steps = chain(kind);
        println!(
            "  {} step gaps over {} replicas of {} runs (ms: median / p90 / max), step ← what sets the pace:",
            kind.label(),
            tls.len(),
            rs.len()
        );
        let mut medians = Vec::new();
        for (i, (name, who, _)) in steps.iter().enumerate() {
            let mut v: Vec<f64> = tls.iter().filter_map(|t| gaps(kind, t)[i]).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let prev = if i == 0 { "apply" } else { steps[i - 1].0 };
            println!(
                "    {:<40} {:>7.0} / {:>7.0} / {:>7.0}  (n={})  ← {who}",
                format!("{prev} → {name}"),
                pct(&v, 0.5),
                pct(&v, 0.9),
                v.last().copied().unwrap_or(f64::NAN),
                v.len()
            );
            medians.push((name, who, pct(&v, 0.5), v.iter().sum::<f64>()));
        }
        // Also absolute: when the last replica reached each step (median over runs).
        let mut last = Vec::new();
        for (name, _, get) in &steps {
            let v: Vec<f64> = rs
                .iter()
                .filter_map(|r| {
                    r.timelines
                        .iter()
                        .map(get)
                        .collect::<Option<Vec<f64>>>()
                        .map(|v| v.into_iter().fold(f64::MIN, f64::max))
                })
                .collect();
            last.push(format!("{} {:.2}", short(name), median(v) / 1e3));
        }
        println!(
            "    last replica at each step (s, median over runs): {}",
            last.join(", ")
        );
        let total: f64 = medians.iter().map(|m| m.3).sum();
        medians.sort_by(|a, b| b.3.total_cmp(&a.3));
        let top: Vec<String> = medians
            .iter()
            .take(3)
            .map(|(n, who, _, sum)| format!("→ {n} ({who}) {:.0}%", 100.0 * sum / total.max(1.0)))
            .collect();
        println!(
            "    where the time went (share of all replicas' summed gaps): {}",
            top.join("; ")
        );

        let mut slow: Vec<&Timeline> = tls.clone();
        slow.sort_by(|a, b| {
            b.ready
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.ready.unwrap_or(f64::INFINITY))
        });
        println!(
            "    slowest {} replicas (s after apply):",
            slowest.min(slow.len())
        );
        print_timelines(kind, &slow[..slowest.min(slow.len())]);
    }

    println!("  evidence, per run:");
    for r in runs.iter().filter(|r| r.size == size) {
        println!(
            "    {} run, apply → all Ready {}:",
            r.kind.label(),
            secs(r.total)
        );
        let evs: Vec<String> = r
            .events
            .iter()
            .map(|(src, reason, n, _)| format!("{src}/{reason} ×{n}"))
            .collect();
        println!("      Events: {}", evs.join(", "));
        for (src, reason, n, msg) in &r.events {
            if !matches!(
                reason.as_str(),
                "Scheduled" | "Pulled" | "Created" | "Started" | "SuccessfulCreate"
            ) {
                println!("        {src}/{reason} ×{n}: {}", cut(msg, 200));
            }
        }
        for (node, (n, longest, example)) in &r.logs.throttled {
            println!(
                "      kubelet {node}: {n} \"Throttling request took\" lines (>1 s waits; the kubelet logs at most one a second), longest {:.0} ms: {}",
                longest,
                cut(example, 160)
            );
        }
        if r.kind == Kind::Hostvol {
            let early = r
                .timelines
                .iter()
                .filter(|t| matches!((t.scheduled, t.bound), (Some(s), Some(b)) if s < b))
                .count();
            let fails: Vec<String> = r
                .logs
                .claim_read_failures
                .iter()
                .map(|(c, n)| format!("{c} ×{n}"))
                .collect();
            println!(
                "      pods scheduled before this process saw their claim Bound: {early} of {}; kubelets' failed claim reads (log lines): {}; pod syncs failed on volumes (10-15 s pod-worker backoff each): {}",
                r.timelines.len(),
                if fails.is_empty() {
                    "none".into()
                } else {
                    fails.join(", ")
                },
                r.logs.pods_backed_off
            );
        }
        if r.logs.throttled.is_empty() {
            println!("      kubelets: no client-side throttling over 1 s logged");
        }
        let rest = [
            ("kubelet mount failures", &r.logs.kubelet_mount_failures),
            ("agent warnings", &r.logs.agent_warnings),
            ("kube-scheduler", &r.logs.scheduler),
            ("kube-controller-manager", &r.logs.controller_manager),
        ];
        for (what, lines) in rest {
            if lines.is_empty() {
                continue;
            }
            println!("      {what}: {} lines, e.g.:", lines.len());
            for l in lines.iter().take(3) {
                println!("        {}", cut(l, 220));
            }
        }
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    if !requested("statefulset_bursts") {
        return;
    }
    let sizes = env_list("HOSTVOL_BENCH_BURST_SIZES", &[10, 20]);
    let runs = support::env_usize("HOSTVOL_BENCH_BURST_RUNS", 2);
    let slowest = support::env_usize("HOSTVOL_BENCH_BURST_SLOWEST", 3);
    let timeout =
        Duration::from_secs(support::env_usize("HOSTVOL_BENCH_BURST_TIMEOUT", 300) as u64);
    // The kubelets' API client limit, which volume pods spend on their claim and PV (1.27: 50 / 100).
    let qps = support::env_usize("HOSTVOL_BENCH_KUBELET_QPS", 5);
    let burst = (2 * qps).to_string();
    let qps = qps.to_string();
    let rc = RealCluster::start_with(
        2,
        &[("KUBELET_API_QPS", &qps), ("KUBELET_API_BURST", &burst)],
    );
    println!("statefulset_bursts: kubelets' kubeAPIQPS {qps}, kubeAPIBurst {burst}");
    rc.install_hostvol();
    let results = rc.block_on(async {
        let client = rc.client().await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let _ = namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
            )
            .await;
        // Pods need the namespace's ServiceAccount token (the controller-manager makes it).
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
        let t = Instant::now();
        while sas
            .get_opt("default")
            .await
            .ok()
            .flatten()
            .is_none_or(|sa| sa.secrets.unwrap_or_default().is_empty())
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no default ServiceAccount token in {NS}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let seen: Shared = Arc::default();
        let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
        let (w1, r1) = spawn_watch(
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS),
            "claim",
            move |c, now| saw_claim(&s1, c, now),
        );
        let (w2, r2) = spawn_watch(
            Api::<Pod>::namespaced(client.clone(), NS),
            "pod",
            move |p, now| saw_pod(&s2, p, now),
        );
        let (w3, r3) = spawn_watch(
            Api::<PersistentVolume>::all(client.clone()),
            "PV",
            move |p, now| saw_pv(&s3, p, now),
        );
        let _ = (r1.await, r2.await, r3.await);

        // Warm-up: first pods on each node, first claims of each agent.
        for kind in [Kind::EmptyDir, Kind::Hostvol] {
            let name = format!("warm-{}", kind.tag());
            let r = run_once(&rc, &client, &seen, kind, 4, &name, timeout).await;
            eprintln!("[bench] warm-up {}: {} s", kind.label(), secs(r.total));
            clean_up(&client, &seen, &name).await;
        }

        let mut results = Vec::new();
        for run in 1..=runs {
            for &size in &sizes {
                for kind in [Kind::EmptyDir, Kind::Hostvol] {
                    let name = format!("b{}{size}-{run}", kind.tag());
                    let r = run_once(&rc, &client, &seen, kind, size, &name, timeout).await;
                    eprintln!(
                        "[bench] {name}: {} replicas, {}: apply → all Ready {} s",
                        size,
                        kind.label(),
                        secs(r.total)
                    );
                    clean_up(&client, &seen, &name).await;
                    results.push(r);
                }
            }
        }
        for w in [w1, w2, w3] {
            w.abort();
        }
        results
    });

    println!(
        "statefulset_bursts benchmark: 2 real nodes (kubelet 1.20.2 + containerd), StatefulSets with \
         podManagementPolicy Parallel, busybox pods; {runs} runs per size and kind (emptyDir, then hostvol \
         claims of class hostvol, 16Mi), after a warm-up of 4 replicas each; load average now {}",
        support::loadavg()
    );
    println!(
        "  steps: claim/PV/pod watched from this process (ms); agent from its \"provisioned\" line \
         (timestamp − millis); kubelet saw/mounted/started from the kubelets' logs (--v 2)"
    );
    for &size in &sizes {
        print_size(size, &results, slowest);
    }
}
