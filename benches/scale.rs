//! Many agents against one control plane: `HOSTVOL_BENCH_NODES` fake nodes (default 50), each with its
//! own `hostvol agent` process reaching the API server through a byte-counting proxy; then
//! `HOSTVOL_BENCH_FOREIGN` claims of another provisioner's class (default 2,000), then
//! `HOSTVOL_BENCH_OWN` claims of hostvol's (default 500, spread over the nodes, placed as the scheduler
//! would), then as many pre-bound PV/claim pairs (no class) made by the bench itself: the binding
//! floor of this control plane in the same run. Prints time to Bound for both, each agent's RSS and CPU, the bytes
//! each agent received from the API server per foreign claim change, and the API server's request
//! counts by verb and resource. Prints figures; asserts nothing about time.
//!
//! Run: `cargo bench --bench scale` (after `scripts/setup-control-plane.sh`; as root).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, ApiProxy, Cluster, class_yaml};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::{claim, env_usize, loadavg, pct, requested, rss_mib, runtime};

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "min {:.1}, median {:.1}, p90 {:.1}, max {:.1}, sum {:.1}",
        v.first().copied().unwrap_or(f64::NAN),
        pct(&v, 0.5),
        pct(&v, 0.9),
        v.last().copied().unwrap_or(f64::NAN),
        v.iter().sum::<f64>()
    )
}

struct Node {
    agent: Agent,
    proxy: ApiProxy,
}

impl Node {
    fn received(&self) -> u64 {
        self.proxy.received_bytes()
    }
}

/// Creates `items` with `parallel` requests in flight.
async fn create_all<K>(api: &Api<K>, items: Vec<K>, parallel: usize)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    futures::stream::iter(items)
        .for_each_concurrent(parallel, |item| async move {
            for attempt in 0..5 {
                match api.create(&PostParams::default(), &item).await {
                    Ok(_) => return,
                    Err(kube::Error::Api(s)) if s.code == 409 => return,
                    Err(e) if attempt == 4 => panic!("create: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        })
        .await;
}

/// Waits until `n` claims of `ns` are Bound; returns when each became Bound (seconds after `t0`,
/// sorted) and the time the last did.
async fn time_to_bound(cluster: &Cluster, ns: &str, n: usize, t0: Instant) -> Vec<f64> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(1200);
    while seen.len() < n {
        for c in api.list(&ListParams::default()).await.unwrap().items {
            if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                let name = c.metadata.name.clone().unwrap();
                seen.entry(name)
                    .or_insert_with(|| t0.elapsed().as_secs_f64());
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {}/{n} claims of {ns} Bound after 20 minutes",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut v: Vec<f64> = seen.into_values().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn describe_bound(v: &[f64]) -> String {
    format!(
        "first {:.1} s, median {:.1} s, p90 {:.1} s, last {:.1} s ({:.1} claims/s)",
        v.first().copied().unwrap_or(f64::NAN),
        pct(v, 0.5),
        pct(v, 0.9),
        v.last().copied().unwrap_or(f64::NAN),
        v.len() as f64 / v.last().copied().unwrap_or(f64::NAN)
    )
}

fn request_delta(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v >= 1.0)
        .collect()
}

fn print_requests(title: &str, counts: &BTreeMap<(String, String), f64>) {
    let total: f64 = counts.values().sum();
    println!("  {title}: {total:.0} requests");
    let mut rows: Vec<(&(String, String), &f64)> = counts.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    for ((verb, resource), n) in rows.into_iter().take(18) {
        println!("    {verb:>8} {resource:<28} {n:>8.0}");
    }
}

fn main() {
    if !requested("scale") {
        return;
    }
    let nodes = env_usize("HOSTVOL_BENCH_NODES", 50);
    let foreign = env_usize("HOSTVOL_BENCH_FOREIGN", 2000);
    let own = env_usize("HOSTVOL_BENCH_OWN", 500);
    runtime().block_on(async move {
        println!(
            "scale benchmark: {nodes} agents, {foreign} foreign claims, {own} hostvol claims; {} build, {} cores, load {}",
            support::build_kind(),
            support::cores(),
            loadavg()
        );
        let cluster = Cluster::start().await;
        cluster.apply_repo_manifest("deploy/csidriver.yaml");
        cluster.kubectl_apply_yaml(&class_yaml("hostvol", "WaitForFirstConsumer", "Delete", &[]));
        cluster.kubectl_apply_yaml(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: other\nprovisioner: example.com/other\nvolumeBindingMode: Immediate\n",
        );
        let t_start = Instant::now();
        let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:03}")).collect();
        let mut fleet: Vec<Node> = Vec::new();
        for name in &names {
            cluster.add_node(name).await;
        }
        // Start agents a few at a time: 50 first lists at once would measure the start-up storm only.
        for chunk in names.chunks(5) {
            let started = futures::future::join_all(chunk.iter().map(|name| {
                let cluster = &cluster;
                async move {
                    let proxy = cluster.api_proxy().await;
                    let kubeconfig = cluster.kubeconfig_via(&proxy, &format!("{name}-proxy"));
                    let agent = cluster
                        .start_agent_with_kubeconfig(name, &["--capacity-cap", "100Gi"], &kubeconfig)
                        .await;
                    Node { agent, proxy }
                }
            }))
            .await;
            fleet.extend(started);
        }
        let started_in = t_start.elapsed();
        let rss_idle: Vec<f64> = fleet.iter().map(|n| rss_mib(n.agent.pid()).0).collect();
        println!("  {nodes} agents ready in {started_in:.1?}; RSS idle (MiB): {}", spread(rss_idle));
        // Let start-up settle (capacity publishing, first usage walks).
        tokio::time::sleep(Duration::from_secs(15)).await;

        // --- foreign claims -----------------------------------------------------------------------
        cluster.create_namespace("foreign").await;
        let changes = Arc::new(AtomicU64::new(0));
        let watch = {
            let changes = changes.clone();
            let (task, listed) = support::spawn_watch(
                Api::<PersistentVolumeClaim>::namespaced(cluster.client(), "foreign"),
                "foreign claims",
                move |_, _| {
                    changes.fetch_add(1, Ordering::Relaxed);
                },
            );
            let _ = listed.await;
            task
        };
        let cpu0: Vec<f64> = fleet.iter().map(|n| cpu_seconds(n.agent.pid())).collect();
        let bytes0: Vec<u64> = fleet.iter().map(Node::received).collect();
        let req0 = cluster.apiserver_requests().await;
        let t0 = Instant::now();
        let items: Vec<PersistentVolumeClaim> = (0..foreign)
            .map(|i| claim("foreign", &format!("f{i}"), "other", "1Gi", None))
            .collect();
        create_all(&Api::namespaced(cluster.client(), "foreign"), items, 8).await;
        let created_in = t0.elapsed();
        // The PV controller annotates each (another change); wait until the changes stop.
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = changes.load(Ordering::Relaxed);
            if now == last && now >= foreign as u64 {
                break;
            }
            last = now;
        }
        watch.abort();
        let foreign_changes = changes.load(Ordering::Relaxed);
        let req1 = cluster.apiserver_requests().await;
        let bytes_per_change: Vec<f64> = fleet
            .iter()
            .zip(&bytes0)
            .map(|(n, b0)| (n.received() - b0) as f64 / foreign_changes as f64)
            .collect();
        let cpu_foreign: Vec<f64> = fleet
            .iter()
            .zip(&cpu0)
            .map(|(n, c0)| (cpu_seconds(n.agent.pid()) - c0) * 1e3)
            .collect();
        let events = cluster.kubectl_ok(&["get", "--raw", "/metrics"]);
        let pvc_watch_events: f64 = events
            .lines()
            .filter(|l| {
                l.starts_with("apiserver_watch_events_total{")
                    && l.contains("kind=\"PersistentVolumeClaim\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        println!(
            "  {foreign} foreign claims created in {created_in:.1?}; {foreign_changes} changes of them seen by a watch"
        );
        println!(
            "  bytes each agent received from the API server per foreign claim change: {}",
            spread(bytes_per_change)
        );
        println!(
            "  agent CPU during the foreign phase (ms per agent): {}",
            spread(cpu_foreign)
        );
        println!(
            "  API server: {pvc_watch_events:.0} PersistentVolumeClaim watch events sent in all so far ({:.1} per change; {nodes} agents + controller-manager + scheduler + this bench watch claims)",
            pvc_watch_events / foreign_changes as f64
        );
        print_requests("API requests during the foreign phase", &request_delta(&req0, &req1));

        // --- hostvol's claims ---------------------------------------------------------------------
        cluster.create_namespace("own").await;
        let cpu1: Vec<f64> = fleet.iter().map(|n| cpu_seconds(n.agent.pid())).collect();
        let t1 = Instant::now();
        let items: Vec<PersistentVolumeClaim> = (0..own)
            .map(|i| claim("own", &format!("c{i}"), "hostvol", "1Gi", Some(&names[i % nodes])))
            .collect();
        create_all(&Api::namespaced(cluster.client(), "own"), items, 8).await;
        let own_bound = time_to_bound(&cluster, "own", own, t1).await;
        let req2 = cluster.apiserver_requests().await;
        let cpu_own: Vec<f64> = fleet
            .iter()
            .zip(&cpu1)
            .map(|(n, c0)| (cpu_seconds(n.agent.pid()) - c0) * 1e3)
            .collect();
        println!("  {own} hostvol claims to Bound: {}", describe_bound(&own_bound));
        println!(
            "  agent CPU while provisioning (ms per agent, {} claims each): {}",
            own / nodes,
            spread(cpu_own)
        );
        print_requests("API requests while provisioning", &request_delta(&req1, &req2));

        // --- the floor: pre-bound PVs made by the bench, bound by the same PV controller ---------
        cluster.create_namespace("floor").await;
        let t2 = Instant::now();
        let pvs: Vec<PersistentVolume> = (0..own)
            .map(|i| {
                serde_json::from_value(json!({
                    "metadata": {"name": format!("floor-{i}")},
                    "spec": {
                        "capacity": {"storage": "1Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Delete",
                        "storageClassName": "",
                        "hostPath": {"path": format!("/tmp/floor-{i}"), "type": "DirectoryOrCreate"},
                        "claimRef": {"namespace": "floor", "name": format!("p{i}")},
                        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [names[i % nodes].clone()]}
                        ]}]}}
                    }
                }))
                .unwrap()
            })
            .collect();
        let claims: Vec<PersistentVolumeClaim> = (0..own)
            .map(|i| claim("floor", &format!("p{i}"), "", "1Gi", None))
            .collect();
        create_all(&Api::all(cluster.client()), pvs, 8).await;
        create_all(&Api::namespaced(cluster.client(), "floor"), claims, 8).await;
        let floor_bound = time_to_bound(&cluster, "floor", own, t2).await;
        println!(
            "  {own} pre-bound pairs made by the bench to Bound (the floor): {}",
            describe_bound(&floor_bound)
        );

        // --- the fleet at the end -----------------------------------------------------------------
        let rss: Vec<(f64, f64)> = fleet.iter().map(|n| rss_mib(n.agent.pid())).collect();
        let cpu_total: Vec<f64> = fleet.iter().map(|n| cpu_seconds(n.agent.pid())).collect();
        let bytes_total: Vec<f64> = fleet.iter().map(|n| n.received() as f64 / 1e6).collect();
        println!(
            "  agent RSS at the end (MiB): {}",
            spread(rss.iter().map(|r| r.0).collect())
        );
        println!(
            "  agent peak RSS (MiB): {}",
            spread(rss.iter().map(|r| r.1).collect())
        );
        println!(
            "  agent CPU over the whole run (s): {} over {:.0} s",
            spread(cpu_total),
            t_start.elapsed().as_secs_f64()
        );
        println!(
            "  MB each agent received from the API server over the whole run: {}",
            spread(bytes_total)
        );
        let all = cluster.apiserver_requests().await;
        print_requests("API requests over the whole run (all clients)", &all);
        let _ = req2;
        println!("  load at the end: {}", loadavg());
        drop(fleet);
    });
}
