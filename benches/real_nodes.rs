//! On real kubelets: how much later a pod with a new hostvol claim reaches Running than the same pod
//! with a pre-made, pre-bound PV (same run, alternating, median of N each; target ≤ 1.1×), and the
//! agent pod's memory as the kubelet's cgroup sees it (working set; target ≤ 32 MiB idle).
//! Prints figures; asserts nothing about time.
//! Run: `cargo bench --bench real_nodes` (after `scripts/setup-real-nodes.sh` and
//! `scripts/build-image.sh`). `HOSTVOL_BENCH_PODS` sets N (default 20).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{AGENT_NAMESPACE, RealCluster};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use support::{env_usize, requested, summarize_ms};

const NS: &str = "default";

fn main() {
    if !requested("real_nodes") {
        return;
    }
    let n = env_usize("HOSTVOL_BENCH_PODS", 20);
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    rc.block_on(async {
        let client = rc.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        let pvs: Api<PersistentVolume> = Api::all(client.clone());

        let (idle, idle_rss) = agent_memory_mib(&rc, &node);
        let idle_cgroup = agent_cgroup_memory_mib(&rc, &node);

        // One warm-up of each kind, so image pulls and first-pod costs are not in the figures.
        let mut prebound = Vec::new();
        let mut hostvol = Vec::new();
        for i in 0..=n {
            let name = format!("pre-{i}");
            make_prebound(&pvs, &claims, &name, &node).await;
            let t = run_pod(&pods, &name, &node, &name).await;
            let name = format!("new-{i}");
            claims
                .create(&PostParams::default(), &claim(&name, "hostvol"))
                .await
                .unwrap();
            let u = run_pod(&pods, &name, &node, &name).await;
            if i > 0 {
                prebound.push(t);
                hostvol.push(u);
            }
        }
        let (busy, busy_rss) = agent_memory_mib(&rc, &node);
        let busy_cgroup = agent_cgroup_memory_mib(&rc, &node);
        let (pre, new) = (summarize_ms(prebound), summarize_ms(hostvol));
        println!("real_nodes benchmark: 2 real nodes (kubelet 1.20.2 + containerd), pods on {node}");
        println!("  pod create → Running, pre-made pre-bound PV: {pre}");
        println!("  pod create → Running, new hostvol claim:     {new}");
        println!(
            "  ratio of medians: {:.2}× (target ≤ 1.1×)",
            new.median / pre.median
        );
        println!(
            "  hostvol's own part, claim seen → PV created (agent log): {}",
            summarize_ms(provisioning_millis(&rc))
        );
        println!(
            "  agent container (kubelet /stats/summary): idle working set {idle:.1} MiB (RSS \
             {idle_rss:.1} MiB), with {} volumes {busy:.1} MiB (RSS {busy_rss:.1} MiB); target ≤ 32 MiB idle",
            n + 1
        );
        let show = |c: Option<(f64, f64, f64)>| match c {
            Some((ws, usage, rss)) => format!("working set {ws:.1} MiB (usage {usage:.1}, RSS {rss:.1})"),
            None => "not found".into(),
        };
        println!(
            "  agent container's memory cgroup on the host: idle {}, with {} volumes {}",
            show(idle_cgroup),
            n + 1,
            show(busy_cgroup)
        );
    });
}

/// A hostPath PV made by hand and a claim bound to it before any pod uses it.
async fn make_prebound(
    pvs: &Api<PersistentVolume>,
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
    node: &str,
) {
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("bench-{name}")},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                 "hostPath": {"path": format!("/tmp/bench-{name}"), "type": "DirectoryOrCreate"},
                 "claimRef": {"namespace": NS, "name": name},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}
    }))
    .unwrap();
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let mut c = claim(name, "");
    c.spec.as_mut().unwrap().volume_name = Some(format!("bench-{name}"));
    claims.create(&PostParams::default(), &c).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(claims.clone(), name, |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Bound")
        }),
    )
    .await
    .expect("pre-bound claim Bound")
    .unwrap();
}

fn claim(name: &str, class: &str) -> PersistentVolumeClaim {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                 "resources": {"requests": {"storage": "64Mi"}}}
    }))
    .unwrap()
}

/// Creates a busybox pod on `node` with claim `claim`, returns create → Running in ms, deletes it.
async fn run_pod(pods: &Api<Pod>, name: &str, node: &str, claim: &str) -> f64 {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sleep", "3600"],
                                 "volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
                 "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}
    }))
    .unwrap();
    let t = Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(pods.clone(), name, conditions::is_pod_running()),
    )
    .await
    .unwrap_or_else(|_| panic!("pod {name} not Running after 120 s"))
    .unwrap();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    ms
}

/// `millis=` of every "provisioned" line in the agents' logs.
fn provisioning_millis(rc: &RealCluster) -> Vec<f64> {
    rc.agent_logs()
        .lines()
        .filter(|l| l.contains("provisioned"))
        .filter_map(|l| l.split("millis=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The agent's memory cgroup as the host sees it (cgroup v1): working set (usage minus inactive
/// file pages, as the kubelet computes it), usage and the process's RSS, in MiB. The agent process
/// is the `hostvol agent` under `node`'s cgroup root.
fn agent_cgroup_memory_mib(rc: &RealCluster, node: &str) -> Option<(f64, f64, f64)> {
    // Node cgroup roots are named <netns>-<node> (scripts/real-cluster.sh).
    let env = std::fs::read_to_string(rc.dir().join("env")).ok()?;
    let netns = env.lines().find_map(|l| l.strip_prefix("NETNS="))?;
    let root = format!("/{netns}-{node}/");
    let mib = |b: f64| b / (1024.0 * 1024.0);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let proc_dir = entry.path();
        let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        if !cmdline.starts_with(b"/usr/local/bin/hostvol\0agent") {
            continue;
        }
        let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap_or_default();
        let Some(memory) = cgroups
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .filter(|p| p.starts_with(&root))
        else {
            continue;
        };
        let dir =
            std::path::Path::new("/sys/fs/cgroup/memory").join(memory.trim_start_matches('/'));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let usage: f64 = read("memory.usage_in_bytes").trim().parse().ok()?;
        let inactive_file: f64 = read("memory.stat")
            .lines()
            .find_map(|l| l.strip_prefix("total_inactive_file "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        let rss_kib: f64 = std::fs::read_to_string(proc_dir.join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        return Some((mib(usage - inactive_file), mib(usage), rss_kib / 1024.0));
    }
    None
}

/// The agent container's working set and RSS on `node` in MiB, from the kubelet's summary API (what
/// `kubectl top` and eviction use); waits for the kubelet's first figures (cAdvisor's housekeeping).
fn agent_memory_mib(rc: &RealCluster, node: &str) -> (f64, f64) {
    let path = format!("/api/v1/nodes/{node}/proxy/stats/summary");
    for _ in 0..120 {
        let summary: serde_json::Value =
            serde_json::from_str(&rc.kubectl_ok(&["get", "--raw", &path])).unwrap();
        let memory = summary["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["podRef"]["namespace"] == AGENT_NAMESPACE)
            .flat_map(|p| p["containers"].as_array().cloned().unwrap_or_default())
            .find(|c| c["name"] == "hostvol")
            .map(|c| c["memory"].clone());
        let mib = |m: &serde_json::Value, k: &str| m[k].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
        if let Some(m) = memory.filter(|m| m["workingSetBytes"].as_f64().unwrap_or(0.0) > 0.0) {
            return (mib(&m, "workingSetBytes"), mib(&m, "rssBytes"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no memory figures for the agent on {node} from {path}");
}
