//! Benchmark of issue #2's performance targets on a real Kubernetes 1.20 control plane with real
//! `hostvol agent` processes (the e2e harness of tests/common). It prints figures; it asserts nothing.
//!
//! Run: `cargo bench --bench provisioning` (needs `scripts/setup-control-plane.sh` first). `cargo bench`
//! builds the agent with the bench profile (release); the path of the binary run is printed.
//!
//! 1. Agent step, claim selected onto a node -> PV exists: N claims (default 200) created one at a
//!    time on one agent's node, each already carrying `volume.kubernetes.io/selected-node`. Figures:
//!    (a) the agent's own view: its `hostvol_provision_duration_seconds` histogram and the `millis=`
//!    of its "provisioned" log lines; (b) the outside view: from the claim watch event in which the
//!    PV controller's `volume.beta.kubernetes.io/storage-provisioner` annotation first appears to the
//!    PV watch event in which the PV first appears (both watches in this process, stamped on arrival).
//! 2. N claims at once (default 200): time until all Bound, hostvol (2 agents) vs a baseline of the
//!    same control plane binding N pre-bound hostPath PVs created directly (8 parallel requests).
//! 3. Agent resident memory: idle, and with 1,000 claims of another class in the cluster (fresh cluster).
//!
//! Environment: `HOSTVOL_BENCH_SEQ` (200), `HOSTVOL_BENCH_BURST` (200), `HOSTVOL_BENCH_FOREIGN` (1000),
//! plus the harness's variables (`HOSTVOL_E2E_KEEP=1` keeps the cluster dirs and logs).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Agent, Cluster};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::{
    AGENT_BIN, Summary, agent_exe, build_kind, claim, cores, env_usize, loadavg, logged_millis,
    logged_split, ms, requested, rss_mib, runtime, spawn_watch, summarize_ms,
};
use tokio::sync::Notify;

const ANN_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
const ANN_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const PARALLEL: usize = 8;
/// Claim size: small, so hundreds of volumes fit the agent's capacity (it is the filesystem's size).
const SIZE: &str = "1Mi";

// ---------------------------------------------------------------------------------------------
// Watch-arrival stamps
// ---------------------------------------------------------------------------------------------

type Key = (String, String);

#[derive(Default)]
struct Stamps {
    /// First arrival of a claim event carrying the storage-provisioner annotation.
    annotated: HashMap<Key, Instant>,
    /// First arrival of a claim event with phase Bound.
    bound: HashMap<Key, Instant>,
    /// First arrival of a PV event whose claimRef names the claim.
    pv: HashMap<Key, Instant>,
}

#[derive(Default)]
struct Recorder {
    stamps: Mutex<Stamps>,
    changed: Notify,
}

impl Recorder {
    fn claim(&self, pvc: &PersistentVolumeClaim, now: Instant) {
        let key = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        let mut s = self.stamps.lock().unwrap();
        let ann = pvc.annotations();
        if ann.contains_key(ANN_PROVISIONER_BETA) || ann.contains_key(ANN_PROVISIONER) {
            s.annotated.entry(key.clone()).or_insert(now);
        }
        if pvc.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Bound") {
            s.bound.entry(key).or_insert(now);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    fn volume(&self, pv: &PersistentVolume, now: Instant) {
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
    async fn wait(&self, timeout: Duration, done: impl Fn(&Stamps) -> bool) -> bool {
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

    fn count(&self, ns: &str, f: impl Fn(&Stamps) -> &HashMap<Key, Instant>) -> usize {
        f(&self.stamps.lock().unwrap())
            .keys()
            .filter(|(n, _)| n == ns)
            .count()
    }
}

/// Starts a claim watch and a PV watch (all namespaces) stamping arrivals; returns after both listed,
/// with the tasks to abort when the cluster goes.
async fn start_watches(client: Client, rec: Arc<Recorder>) -> Vec<tokio::task::JoinHandle<()>> {
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

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// A hostPath PV pre-bound to ns/claim (claimRef without uid), pinned to `node`, as an admin writes it.
fn prebound_pv(name: &str, ns: &str, claim: &str, node: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": SIZE},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": format!("/var/lib/hostvol-bench/{name}"), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": ns, "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
            ]}]}}
        }
    }))
    .unwrap()
}

#[allow(clippy::large_enum_variant)] // a bench's list of objects to create
enum Obj {
    Claim(PersistentVolumeClaim),
    Volume(PersistentVolume),
}

/// Creates the objects in order with `PARALLEL` requests in flight; panics on any error.
async fn create_all(client: &Client, objs: Vec<Obj>) {
    let pp = PostParams::default();
    futures::stream::iter(objs)
        .map(|o| {
            let client = client.clone();
            let pp = pp.clone();
            async move {
                match o {
                    Obj::Claim(c) => {
                        let ns = c.namespace().unwrap();
                        Api::<PersistentVolumeClaim>::namespaced(client, &ns)
                            .create(&pp, &c)
                            .await
                            .map(|_| ())
                    }
                    Obj::Volume(v) => Api::<PersistentVolume>::all(client)
                        .create(&pp, &v)
                        .await
                        .map(|_| ()),
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
}

/// A namespace without waiting for its ServiceAccount (no pods are made in it).
async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

/// Signed milliseconds from `a` to `b`.
fn ms_between(a: Instant, b: Instant) -> f64 {
    if b >= a { ms(b - a) } else { -ms(a - b) }
}

/// Cumulative histogram buckets `(le, count)` of `name` in Prometheus text.
fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit_once(' ')?.1.trim().parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// histogram_quantile-style estimate (linear within the bucket), in the histogram's unit.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return lo;
            }
            return lo
                + (le - lo)
                    * if cum > below {
                        (rank - below) / (cum - below)
                    } else {
                        1.0
                    };
        }
        (lo, below) = (le, cum);
    }
    lo
}

/// Upper bound of the bucket holding quantile q (the figure a coarse histogram can vouch for).
fn bucket_bound(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|b| b.1 >= q * total)
        .map(|b| b.0)
        .unwrap_or(f64::NAN)
}

/// This machine's floor for the agent's disk step: `n` times mkdir + fsync(parent) under `root`
/// (the agent's filesystem), in ms.
fn mkdir_fsync_floor(root: &Path, n: usize) -> Vec<f64> {
    let dir = root.join("bench-fsync-probe");
    let _ = std::fs::create_dir_all(&dir);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let made = std::fs::create_dir(dir.join(i.to_string()))
            .and_then(|_| std::fs::File::open(&dir)?.sync_all());
        if made.is_ok() {
            out.push(ms(t.elapsed()));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn storage_classes(cluster: &Cluster) {
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.kubectl_apply_yaml(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: other\nprovisioner: example.com/other\n\
         volumeBindingMode: WaitForFirstConsumer\n",
    );
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

struct Report {
    seq: Option<Summary>,
    seq_log: Option<Summary>,
    seq_hist: Option<String>,
    seq_split: Option<String>,
    burst: Option<(f64, f64)>,
    rss_idle: Option<f64>,
    rss_foreign: Option<f64>,
    foreign: usize,
}

/// Phase 1: claims one at a time on node-a's agent.
async fn sequential(
    cluster: &Cluster,
    rec: &Recorder,
    agent: &Agent,
    n: usize,
    report: &mut Report,
) {
    let ns = "seq";
    namespace(&cluster.client(), ns).await;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    eprintln!(
        "[bench] phase 1: {n} claims one at a time on node-a (load {})",
        loadavg()
    );
    let t0 = Instant::now();
    let mut timeouts = 0;
    let mut created_at: HashMap<Key, Instant> = HashMap::new();
    let (mut post_rtt, mut get_rtt) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("seq-{i}");
        let t = Instant::now();
        api.create(
            &PostParams::default(),
            &claim(ns, &name, "hostvol", SIZE, Some("node-a")),
        )
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
        post_rtt.push(ms(t.elapsed()));
        let key = (ns.to_string(), name.clone());
        created_at.insert(key.clone(), Instant::now());
        if !rec
            .wait(Duration::from_secs(30), |s| s.pv.contains_key(&key))
            .await
        {
            timeouts += 1;
            eprintln!("[bench] no PV for {ns}/{name} within 30 s");
            if timeouts >= 3 {
                eprintln!(
                    "[bench] giving up phase 1 after 3 timeouts\n{}",
                    cluster.diag()
                );
                break;
            }
        }
        // This client's own round trip for the agent's first call (GET the claim), for comparison.
        let t = Instant::now();
        if api.get(&name).await.is_ok() {
            get_rtt.push(ms(t.elapsed()));
        }
    }
    let elapsed = t0.elapsed();
    let (deltas, controller): (Vec<f64>, Vec<f64>) = {
        let s = rec.stamps.lock().unwrap();
        let d =
            s.pv.iter()
                .filter(|(k, _)| k.0 == ns)
                .filter_map(|(k, pv)| Some(ms_between(*s.annotated.get(k)?, *pv)))
                .collect();
        let c = created_at
            .iter()
            .filter_map(|(k, t)| Some(ms_between(*t, *s.annotated.get(k)?)))
            .collect();
        (d, c)
    };
    let outside = summarize_ms(deltas);
    let log = summarize_ms(logged_millis(agent, ns));
    let metrics = agent.metrics().await;
    let buckets = histogram(&metrics, "hostvol_provision_duration_seconds");
    let count = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let hist = format!(
        "median <= {:.0} ms (interpolated {:.1} ms), p99 <= {:.0} ms (interpolated {:.1} ms), {} observations",
        bucket_bound(&buckets, 0.5) * 1e3,
        bucket_quantile(&buckets, 0.5) * 1e3,
        bucket_bound(&buckets, 0.99) * 1e3,
        bucket_quantile(&buckets, 0.99) * 1e3,
        count
    );
    eprintln!(
        "[bench] phase 1 done in {:.1} s ({:.0} ms per claim round trip), load {}",
        elapsed.as_secs_f64(),
        ms(elapsed) / n as f64,
        loadavg()
    );
    eprintln!(
        "[bench]   create acknowledged -> annotation (PV controller): {}",
        summarize_ms(controller)
    );
    eprintln!("[bench]   outside view (annotation -> PV):  {outside}");
    eprintln!("[bench]   agent log millis=:                {log}");
    eprintln!("[bench]   agent histogram:                  {hist}");
    let nonzero: Vec<String> = {
        let mut prev = 0.0;
        buckets
            .iter()
            .filter_map(|&(le, c)| {
                let here = c - prev;
                prev = c;
                (here > 0.0).then(|| {
                    format!(
                        "le {}ms: {here}",
                        if le.is_infinite() {
                            "+Inf".into()
                        } else {
                            format!("{}", le * 1e3)
                        }
                    )
                })
            })
            .collect()
    };
    eprintln!(
        "[bench]   histogram buckets (non-cumulative): {}",
        nonzero.join(", ")
    );
    let (before, post) = logged_split(agent, ns);
    let (before, post, post_rtt, get_rtt) = (
        summarize_ms(before),
        summarize_ms(post),
        summarize_ms(post_rtt),
        summarize_ms(get_rtt),
    );
    eprintln!(
        "[bench]   agent log split: start -> directory ready (GET claim, GET PV, lock, statvfs, mkdir+fsync): {before}"
    );
    eprintln!(
        "[bench]   agent log split: directory ready -> provisioned (POST PV):                               {post}"
    );
    eprintln!("[bench]   this client's API round trips for comparison: POST claim {post_rtt}");
    eprintln!("[bench]                                                  GET claim  {get_rtt}");
    let fsync = summarize_ms(mkdir_fsync_floor(
        agent.root.parent().unwrap_or(&agent.root),
        n,
    ));
    eprintln!("[bench]   this machine's mkdir + fsync(parent) next to the agent's root:  {fsync}");
    report.seq_split = Some(format!(
        "start -> directory ready median {:.1} ms / p99 {:.1} ms; POST PV median {:.1} ms / p99 {:.1} ms \
         (this client: GET {:.1} / {:.1} ms, POST {:.1} / {:.1} ms; mkdir+fsync {:.1} / {:.1} ms)",
        before.median,
        before.p99,
        post.median,
        post.p99,
        get_rtt.median,
        get_rtt.p99,
        post_rtt.median,
        post_rtt.p99,
        fsync.median,
        fsync.p99,
    ));
    report.seq = Some(outside);
    report.seq_log = Some(log);
    report.seq_hist = Some(hist);

    // Let the PV controller finish binding before the throughput phase.
    let bound = rec
        .wait(Duration::from_secs(120), |s| {
            s.bound.keys().filter(|k| k.0 == ns).count() >= n
        })
        .await;
    eprintln!(
        "[bench] phase 1 claims all Bound: {bound} ({:.1} s after the first claim)",
        t0.elapsed().as_secs_f64()
    );
}

/// Per-claim stage figures for a burst in namespace `ns` started at `t0`.
fn burst_stages(rec: &Recorder, ns: &str, t0: Instant) {
    let s = rec.stamps.lock().unwrap();
    let mut annot = Vec::new();
    let mut agent = Vec::new();
    let mut bind = Vec::new();
    for (k, pv) in s.pv.iter().filter(|(k, _)| k.0 == ns) {
        if let Some(a) = s.annotated.get(k) {
            annot.push(ms_between(t0, *a));
            agent.push(ms_between(*a, *pv));
        }
        if let Some(b) = s.bound.get(k) {
            bind.push(ms_between(*pv, *b));
        }
    }
    if !annot.is_empty() {
        eprintln!(
            "[bench]   start -> provisioner annotation (PV controller): {}",
            summarize_ms(annot)
        );
        eprintln!(
            "[bench]   annotation -> PV (agent):                      {}",
            summarize_ms(agent)
        );
    }
    eprintln!(
        "[bench]   PV -> claim Bound (PV controller):             {}",
        summarize_ms(bind)
    );
    let bound: Vec<f64> = s
        .bound
        .iter()
        .filter(|(k, _)| k.0 == ns)
        .map(|(_, b)| ms_between(t0, *b))
        .collect();
    eprintln!(
        "[bench]   start -> claim Bound:                          {}",
        summarize_ms(bound)
    );
}

/// Phase 2: n claims at once, pre-bound baseline then hostvol.
async fn burst(
    cluster: &Cluster,
    rec: &Recorder,
    agents: &[&Agent],
    n: usize,
    report: &mut Report,
) {
    let client = cluster.client();

    // (i) baseline: claims without class + pre-bound PVs, interleaved, 8 requests in flight.
    let ns = "baseline";
    namespace(&client, ns).await;
    let mut objs = Vec::new();
    for i in 0..n {
        let name = format!("base-{i}");
        objs.push(Obj::Claim(claim(ns, &name, "", SIZE, None)));
        objs.push(Obj::Volume(prebound_pv(
            &format!("bench-base-{i}"),
            ns,
            &name,
            if i % 2 == 0 { "node-a" } else { "node-b" },
        )));
    }
    eprintln!(
        "[bench] phase 2 (i): baseline, {n} claims + {n} pre-bound PVs with {PARALLEL} requests in flight (load {})",
        loadavg()
    );
    let (base, _) = create_and_bind(&client, rec, ns, objs, n).await;

    // (ii) hostvol: claims with selected-node spread over the agents' nodes.
    let ns = "burst";
    namespace(&client, ns).await;
    let objs = (0..n)
        .map(|i| {
            Obj::Claim(claim(
                ns,
                &format!("burst-{i}"),
                "hostvol",
                SIZE,
                Some(&agents[i % agents.len()].node),
            ))
        })
        .collect();
    eprintln!(
        "[bench] phase 2 (ii): hostvol, {n} claims over {} agents with {PARALLEL} requests in flight (load {})",
        agents.len(),
        loadavg()
    );
    let (hv, ok) = create_and_bind(&client, rec, ns, objs, n).await;
    for a in agents {
        let m = a.metrics().await;
        let done =
            common::metric_value(&m, "hostvol_provisions_total", &[("outcome", "succeeded")])
                .unwrap_or(0.0);
        let failed: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.starts_with("hostvol_provisions_total{") && !l.contains("outcome=\"succeeded\"")
            })
            .collect();
        eprintln!(
            "[bench]   agent {}: {done} provisions succeeded in total, refused/failed: [{}]; burst log millis=: {}; RSS {:.1} MiB",
            a.node,
            failed.join("; "),
            summarize_ms(logged_millis(a, ns)),
            rss_mib(a.pid()).0
        );
    }
    if ok {
        report.burst = Some((hv, base));
    }
}

/// Creates `objs` and waits (150 s at most) until the `n` claims of namespace `ns` are Bound; prints
/// the figures. Returns the seconds from the start to the last Bound and whether all were Bound.
async fn create_and_bind(
    client: &Client,
    rec: &Recorder,
    ns: &str,
    objs: Vec<Obj>,
    n: usize,
) -> (f64, bool) {
    let t0 = Instant::now();
    create_all(client, objs).await;
    let created = t0.elapsed();
    let ok = rec
        .wait(Duration::from_secs(150), |s| {
            s.bound.keys().filter(|k| k.0 == ns).count() >= n
        })
        .await;
    let last = last_bound(rec, ns, t0);
    eprintln!(
        "[bench]   created in {:.1} s; {} / {n} Bound, last after {:.1} s{} (load {})",
        created.as_secs_f64(),
        rec.count(ns, |s| &s.bound),
        last,
        if ok { "" } else { " (TIMED OUT)" },
        loadavg()
    );
    burst_stages(rec, ns, t0);
    (last, ok)
}

/// Seconds from t0 to the last Bound arrival in `ns`.
fn last_bound(rec: &Recorder, ns: &str, t0: Instant) -> f64 {
    let s = rec.stamps.lock().unwrap();
    s.bound
        .iter()
        .filter(|(k, _)| k.0 == ns)
        .map(|(_, t)| ms_between(t0, *t) / 1e3)
        .fold(0.0, f64::max)
}

/// Phase 3: RSS of a fresh agent, idle and with `n` claims of another class.
async fn memory(n: usize, report: &mut Report) {
    eprintln!(
        "[bench] phase 3: agent RSS on a fresh cluster (load {})",
        loadavg()
    );
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    storage_classes(&cluster);
    let agent = cluster.start_agent("node-a", &[]).await;
    eprintln!(
        "[bench]   agent binary: {} (pid {})",
        agent_exe(&agent),
        agent.pid()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle, _) = rss_mib(agent.pid());
    eprintln!("[bench]   idle: VmRSS {idle:.1} MiB");
    let client = cluster.client();
    namespace(&client, "foreign").await;
    let objs = (0..n)
        .map(|i| Obj::Claim(claim("foreign", &format!("other-{i}"), "other", SIZE, None)))
        .collect();
    let t0 = Instant::now();
    create_all(&client, objs).await;
    eprintln!(
        "[bench]   created {n} claims of class `other` in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let listed = Api::<PersistentVolumeClaim>::all(client)
        .list_metadata(&ListParams::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (with, hwm) = rss_mib(agent.pid());
    eprintln!(
        "[bench]   with {listed} claims in the cluster (5 s after creating them): VmRSS {with:.1} MiB, VmHWM {hwm:.1} MiB"
    );
    report.rss_idle = Some(idle);
    report.rss_foreign = Some(with);
    report.foreign = n;
}

fn main() {
    // Without `--bench` (`cargo test --benches`), skip the minutes-long run.
    if !requested("provisioning") {
        return;
    }
    let seq_n = env_usize("HOSTVOL_BENCH_SEQ", 200);
    let burst_n = env_usize("HOSTVOL_BENCH_BURST", 200);
    let foreign_n = env_usize("HOSTVOL_BENCH_FOREIGN", 1000);
    eprintln!("[bench] agent binary {AGENT_BIN} ({} build)", build_kind());
    let load_start = loadavg();
    let started = Instant::now();

    let rt = runtime();
    let mut report = Report {
        seq: None,
        seq_log: None,
        seq_hist: None,
        seq_split: None,
        burst: None,
        rss_idle: None,
        rss_foreign: None,
        foreign: foreign_n,
    };
    rt.block_on(async {
        {
            let cluster = Cluster::start().await;
            cluster.add_node("node-a").await;
            cluster.add_node("node-b").await;
            storage_classes(&cluster);
            let rec = Arc::new(Recorder::default());
            let watches = start_watches(cluster.client(), rec.clone()).await;
            let a = cluster.start_agent("node-a", &[]).await;
            eprintln!(
                "[bench] agent node-a runs {} (pid {})",
                agent_exe(&a),
                a.pid()
            );
            if seq_n > 0 {
                sequential(&cluster, &rec, &a, seq_n, &mut report).await;
            }
            if burst_n > 0 {
                let b = cluster.start_agent("node-b", &[]).await;
                burst(&cluster, &rec, &[&a, &b], burst_n, &mut report).await;
            }
            eprintln!("[bench] agent logs: {}", a.log_path().display());
            watches.iter().for_each(|w| w.abort());
        }
        if foreign_n > 0 {
            memory(foreign_n, &mut report).await;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));

    let na = || "n/a".to_string();
    println!();
    println!(
        "hostvol benchmark ({} cores, Kubernetes {}, {} build; load avg {load_start} at start, {} at end; {:.0} s)",
        cores(),
        common::K8S_VERSION,
        build_kind(),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!("agent binary: {AGENT_BIN}");
    println!(
        "agent step (outside view, annotation -> PV watch event): {}   [target: median <= 20 ms, p99 <= 100 ms]",
        report
            .seq
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(na)
    );
    println!(
        "agent step (agent histogram): {}",
        report.seq_hist.clone().unwrap_or_else(na)
    );
    println!(
        "agent step (agent log millis=): {}",
        report
            .seq_log
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(na)
    );
    println!(
        "agent step split (agent log timestamps): {}",
        report.seq_split.clone().unwrap_or_else(na)
    );
    println!(
        "{burst_n} claims: {}",
        report
            .burst
            .map(|(hv, base)| format!(
                "hostvol {hv:.1} s vs pre-bound baseline {base:.1} s: ratio {:.2} (target <= 1.1)",
                hv / base
            ))
            .unwrap_or_else(na)
    );
    println!(
        "agent RSS: idle {}, with {} foreign claims {}",
        report
            .rss_idle
            .map(|m| format!("{m:.1} MiB"))
            .unwrap_or_else(na),
        report.foreign,
        report
            .rss_foreign
            .map(|m| format!("{m:.1} MiB"))
            .unwrap_or_else(na)
    );
}
