//! The agent's footprint and reactivity on one node: memory idle, with N own volumes, after deleting
//! them, with K foreign claims and PVs, the peak while every watch relists after an API server restart;
//! CPU time per provisioned volume; the time from a new StorageClass to its CSIStorageCapacity; and the
//! API requests an idle agent sends (other than watches). Prints figures; asserts nothing about them.
//!
//! Run: `cargo bench --bench memory` (as root: the node's data root is a tmpfs). Knobs:
//! `HOSTVOL_BENCH_OWN` (1000 volumes), `HOSTVOL_BENCH_FOREIGN` (10000 claims and as many PVs),
//! `HOSTVOL_BENCH_CLASSES` (20 new classes timed), `HOSTVOL_BENCH_IDLE_SECONDS` (60).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::faults::APISERVER;
use common::{Cluster, PROVISIONER, class_yaml};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::json;
use support::{
    agent_exe, build_kind, claim, env_usize, loadavg, ms, pct, requested, rss_mib, runtime,
};

/// Claims and PVs created or deleted at once.
const CONCURRENCY: usize = 32;

fn main() {
    if !requested("memory") {
        return;
    }
    runtime().block_on(run());
}

/// One row of the printed table.
struct Row {
    what: String,
    figure: String,
    target: &'static str,
}

async fn run() {
    let own = env_usize("HOSTVOL_BENCH_OWN", 1000);
    let foreign = env_usize("HOSTVOL_BENCH_FOREIGN", 10_000);
    let classes = env_usize("HOSTVOL_BENCH_CLASSES", 20);
    let idle_secs = env_usize("HOSTVOL_BENCH_IDLE_SECONDS", 60) as u64;
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |what: String, figure: String, target: &'static str| {
        println!("  {what}: {figure}");
        rows.push(Row {
            what,
            figure,
            target,
        });
    };

    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.add_node("node-a").await;
    cluster.give_disk("node-a", "64g");
    let agent = cluster.start_agent("node-a", &[]).await;
    let pid = agent.pid();
    let client = cluster.client();
    let capacities = cluster.csi_storage_capacities().await;
    cluster.kubectl_apply_yaml(&class_yaml("own", "Immediate", "Delete", &[]));
    cluster
        .wait_csi_storage_capacities(Duration::from_secs(30), "capacity of class own", |o| {
            o.iter().any(|o| o.data["storageClassName"] == "own")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!(
        "hostvol memory benchmark ({} agent {}, {} cores, load {}, MALLOC_ARENA_MAX={})",
        build_kind(),
        agent_exe(&agent),
        support::cores(),
        loadavg(),
        std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "unset".into())
    );
    let idle = rss_mib(pid).0;
    row("idle RSS".into(), format!("{idle:.1} MiB"), "<= 20 MiB");

    // Own volumes: provision, then delete.
    cluster.create_namespace("own").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "own");
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    create_all(
        &claims,
        (0..own).map(|i| claim("own", &format!("c{i}"), "own", "1Mi", None)),
    )
    .await;
    wait_count(
        || bound_claims(&claims),
        own,
        Duration::from_secs(900),
        "own claims Bound",
    )
    .await;
    let took = started.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let with_own = rss_mib(pid).0;
    row(
        format!("RSS with {own} own volumes"),
        format!(
            "{with_own:.1} MiB ({:.1} KiB per volume above idle)",
            (with_own - idle) * 1024.0 / own.max(1) as f64
        ),
        "<= 25 MiB at 1,000; <= 5 KiB per volume",
    );
    row(
        "agent CPU per provisioned volume".into(),
        format!(
            "{:.2} ms ({cpu:.1} s for {own}, all Bound in {:.1} s)",
            cpu * 1e3 / own.max(1) as f64,
            took.as_secs_f64()
        ),
        "(printed beside)",
    );
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    claims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete own claims");
    wait_count(
        || own_volumes(&volumes),
        0,
        Duration::from_secs(900),
        "own PVs gone",
    )
    .await;
    let gone = Instant::now();
    let samples = sample_rss(pid, Duration::from_secs(20)).await;
    let after_20 = samples.last().copied().unwrap_or(f64::NAN);
    // The idle window doubles as the rest of the minute after deletion.
    let requests = idle_requests(&cluster, Duration::from_secs(idle_secs)).await;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(gone.elapsed())).await;
    let after_60 = rss_mib(pid).0;
    row(
        format!(
            "RSS after deleting them (20 s / {:.0} s)",
            gone.elapsed().as_secs_f64()
        ),
        format!(
            "{after_20:.1} / {after_60:.1} MiB ({:+.1} MiB vs idle)",
            after_60 - idle
        ),
        "within 2 MiB of idle within a minute",
    );
    let per_minute = requests.total as f64 * 60.0 / idle_secs as f64;
    row(
        format!("idle API requests other than watches ({idle_secs} s)"),
        format!("{per_minute:.1}/min {}", requests.breakdown),
        "<= 1/min",
    );

    // New classes: time to their CSIStorageCapacity; an Immediate claim of each, placed at once.
    cluster.create_namespace("fresh").await;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let (task, listed) = support::spawn_watch(
            capacities.clone(),
            "CSIStorageCapacity",
            move |o: &DynamicObject, now| {
                if let Some(class) = o.data["storageClassName"].as_str() {
                    seen.lock().unwrap().entry(class.to_string()).or_insert(now);
                }
            },
        );
        let _ = listed.await;
        task
    };
    let refusals_before = refusals(&agent);
    let class_api: Api<StorageClass> = Api::all(client.clone());
    let fresh: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "fresh");
    let mut latencies = Vec::new();
    for i in 0..classes {
        let name = format!("fresh-{i}");
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name}, "provisioner": PROVISIONER,
            "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete"
        }))
        .unwrap();
        let created = Instant::now();
        class_api
            .create(&PostParams::default(), &class)
            .await
            .expect("create class");
        fresh
            .create(
                &PostParams::default(),
                &claim("fresh", &name, &name, "1Mi", None),
            )
            .await
            .expect("create claim");
        let deadline = created + Duration::from_secs(15);
        while !seen.lock().unwrap().contains_key(&name) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at = seen.lock().unwrap().get(&name).copied();
        latencies.push(at.map_or(f64::INFINITY, |t| ms(t - created)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    watch.abort();
    wait_count(
        || bound_claims(&fresh),
        classes,
        Duration::from_secs(120),
        "claims of new classes Bound",
    )
    .await;
    let refused = refusals(&agent) - refusals_before;
    latencies.sort_by(|a, b| a.total_cmp(b));
    row(
        format!("new class -> its CSIStorageCapacity ({classes} classes)"),
        format!(
            "median {:.0} ms, p90 {:.0} ms, max {:.0} ms; Immediate claims of the new classes refused first: {refused}",
            pct(&latencies, 0.5),
            pct(&latencies, 0.9),
            latencies.last().copied().unwrap_or(f64::NAN)
        ),
        "median <= 500 ms; 0 refusals",
    );
    fresh
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete claims of new classes");
    wait_count(
        || own_volumes(&volumes),
        0,
        Duration::from_secs(120),
        "PVs of new classes gone",
    )
    .await;
    for i in 0..classes {
        let _ = class_api
            .delete(&format!("fresh-{i}"), &DeleteParams::default())
            .await;
    }

    // Foreign objects: claims of another provisioner, PVs of another node (hostvol's) and of other
    // classes. Half the claims bind to the other classes' PVs, as bound claims of other drivers do.
    cluster.add_node("node-b").await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "elsewhere",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.kubectl_apply_yaml(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: other\nprovisioner: example.com/other\n\
         volumeBindingMode: Immediate\nreclaimPolicy: Retain\n",
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before_foreign = rss_mib(pid).0;
    cluster.create_namespace("foreign").await;
    let foreign_claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "foreign");
    let started = Instant::now();
    create_all(&volumes, (0..foreign).map(foreign_pv)).await;
    create_all(
        &foreign_claims,
        (0..foreign).map(|i| claim("foreign", &format!("f{i}"), "other", "1Mi", None)),
    )
    .await;
    println!(
        "  ({} foreign objects created in {:.0} s)",
        2 * foreign,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let with_foreign = rss_mib(pid).0;
    row(
        format!("RSS with {foreign} foreign claims and {foreign} foreign PVs"),
        format!(
            "{with_foreign:.1} MiB ({:.0} bytes per foreign object)",
            (with_foreign - before_foreign) * 1024.0 * 1024.0 / (2 * foreign).max(1) as f64
        ),
        "<= 25 MiB",
    );

    // Relist: restart the API server; every watch breaks and relists.
    let steady = rss_mib(pid).0;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the agent's peak RSS");
    let cpu_before = cpu_seconds(pid);
    cluster.kill_component(APISERVER);
    cluster.start_component_again(APISERVER).await;
    let samples = sample_rss(pid, Duration::from_secs(30)).await;
    let peak = rss_mib(pid)
        .1
        .max(samples.iter().copied().fold(0.0, f64::max));
    row(
        "peak RSS while relisting after an API server restart".into(),
        format!(
            "{peak:.1} MiB ({:.2}x the steady {steady:.1} MiB; {:.2} s CPU)",
            peak / steady,
            cpu_seconds(pid) - cpu_before
        ),
        "<= 2x steady",
    );

    println!("\nhostvol memory benchmark: summary");
    println!("| figure | measured | target |\n|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} |", r.what, r.figure, r.target);
    }
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat(5); the split starts at field 3.
    (ticks(11) + ticks(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// RSS every 200 ms for `period`.
async fn sample_rss(pid: u32, period: Duration) -> Vec<f64> {
    let end = Instant::now() + period;
    let mut samples = Vec::new();
    while Instant::now() < end {
        samples.push(rss_mib(pid).0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples
}

/// Creates every object, `CONCURRENCY` at a time; one already there is fine.
async fn create_all<K>(api: &Api<K>, objects: impl Iterator<Item = K>)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|o| async move {
            match api.create(&PostParams::default(), &o).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .expect("create objects");
}

async fn wait_count<F, Fut>(count: F, want: usize, timeout: Duration, what: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let n = count().await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n}, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn bound_claims(api: &Api<PersistentVolumeClaim>) -> usize {
    api.list_metadata(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|c| {
                    c.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key("pv.kubernetes.io/bind-completed"))
                })
                .count()
        })
        .unwrap_or(usize::MAX)
}

/// hostvol PVs of node-a.
async fn own_volumes(api: &Api<PersistentVolume>) -> usize {
    api.list_metadata(&ListParams::default().labels("hostvol.io/node=node-a"))
        .await
        .map(|l| l.items.len())
        .unwrap_or(usize::MAX)
}

/// A PV the agent of node-a has no business with: hostvol's on node-b (even `i`), or another
/// driver's (odd `i`).
fn foreign_pv(i: usize) -> PersistentVolume {
    let mut pv = json!({
        "metadata": {"name": format!("foreign-{i}")},
        "spec": {
            "capacity": {"storage": "1Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": format!("/var/lib/foreign/{i}"), "type": "DirectoryOrCreate"},
        }
    });
    if i.is_multiple_of(2) {
        pv["metadata"]["labels"] = json!({"hostvol.io/node": "node-b"});
        pv["metadata"]["annotations"] =
            json!({"hostvol.io/node": "node-b", "pv.kubernetes.io/provisioned-by": PROVISIONER});
        pv["spec"]["storageClassName"] = json!("elsewhere");
    } else {
        pv["spec"]["storageClassName"] = json!("other");
    }
    serde_json::from_value(pv).unwrap()
}

/// How often the agent's log says it could not place an Immediate claim for want of capacities.
fn refusals(agent: &common::Agent) -> usize {
    agent.log().matches("no published node capacities").count()
}

/// Non-watch requests the API server served in a window, by verb and resource.
struct Requests {
    total: u64,
    breakdown: String,
}

/// Counts the API server's non-watch requests over `window` from `apiserver_request_total` (this
/// bench's reads of `/metrics` left out): the total of the resources the agent uses, and every
/// resource in the breakdown.
async fn idle_requests(cluster: &Cluster, window: Duration) -> Requests {
    let before = request_counts(cluster).await;
    tokio::time::sleep(window).await;
    let after = request_counts(cluster).await;
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for (key, n) in &after {
        let d = n.saturating_sub(before.get(key).copied().unwrap_or(0));
        if d > 0 {
            *by.entry(key.clone()).or_default() += d;
        }
    }
    // The resources the agent uses; the controller manager's own requests (endpoints, ...) are left
    // out of the total.
    const AGENT: [&str; 8] = [
        "csistoragecapacities",
        "leases",
        "persistentvolumes",
        "persistentvolumeclaims",
        "nodes",
        "pods",
        "storageclasses",
        "events",
    ];
    let agent: u64 = by
        .iter()
        .filter(|(k, _)| AGENT.iter().any(|r| k.ends_with(&format!(" {r}"))))
        .map(|(_, n)| n)
        .sum();
    let breakdown = by
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Requests {
        total: agent,
        breakdown: format!("(agent's resources; all non-watch requests: [{breakdown}])"),
    }
}

/// `apiserver_request_total` by "VERB resource", watches and reads of `/metrics` left out.
async fn request_counts(cluster: &Cluster) -> BTreeMap<String, u64> {
    cluster
        .apiserver_requests()
        .await
        .into_iter()
        .filter(|((verb, resource), _)| verb != "WATCH" && !resource.is_empty())
        .map(|((verb, resource), n)| (format!("{verb} {resource}"), n as u64))
        .collect()
}
