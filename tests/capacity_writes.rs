//! What the CSIStorageCapacity publisher writes (issue #15, "Publish capacity on material changes
//! only", and invalid classes): nothing when nothing changes; about one write per
//! `--capacity-change-threshold` of free space moved while something fills the data root (the echo
//! of its own write does not make it write again); no capacity, and one Warning, for a class with
//! invalid parameters. Figures go to `benches/capacity_writes.rs`; this asserts behaviour, with a
//! generous bound on the count.

mod common;

use std::time::Duration;

use common::faults::requests_between;
use common::{Agent, Cluster, class_yaml, disk_fill, fmt_events};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// One node on a 2 GiB tmpfs with its agent (default threshold, 64Mi), and a class published for.
async fn one_node(class: &str) -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.add_node("node-a").await;
    cluster.give_disk("node-a", "2g");
    let agent = cluster.start_agent("node-a", &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(class, "WaitForFirstConsumer", "Delete", &[]));
    cluster.wait_class_capacities(class, 1, T).await;
    (cluster, agent)
}

/// The capacity published for `class` (bytes), if any.
async fn published(cluster: &Cluster, class: &str) -> Option<u64> {
    let api = cluster.csi_storage_capacities().await;
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .find(|o| o.data["storageClassName"] == class)
        .and_then(|o| o.data["capacity"].as_str().map(str::to_string))
        .map(|c| {
            hostvol::domain::quantity::parse_bytes(&c)
                .unwrap_or_else(|e| panic!("published capacity {c}: {e}"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_written_on_material_changes_only() {
    let (cluster, agent) = one_node("busy").await;
    let first = published(&cluster, "busy").await.unwrap();

    // Idle: nothing moves, nothing is written (a window to watch, not a wait).
    let before = cluster.capacity_requests().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (idle, idle_writes) = requests_between(&before, &cluster.capacity_requests().await);
    eprintln!("[e2e] idle 10 s: {idle:?}");
    assert_eq!(idle_writes, 0, "no write when nothing changes: {idle:?}");

    // Something else writes 320 MiB, almost continuously: five moves of the threshold.
    let fill_mib = 320u64;
    let before = cluster.capacity_requests().await;
    let root = agent.root.clone();
    tokio::task::spawn_blocking(move || disk_fill::fill(&root, "filler", fill_mib as usize, 16))
        .await
        .expect("the filler");
    // The last move is published (the figure now within one threshold of the disk's).
    cluster
        .wait_csi_storage_capacities(T, "the fill published", |items| {
            items.iter().any(|o| {
                o.data["capacity"]
                    .as_str()
                    .and_then(|c| hostvol::domain::quantity::parse_bytes(c).ok())
                    .is_some_and(|c| c + (fill_mib - 64) * MIB <= first)
            })
        })
        .await;
    let (busy, writes) = requests_between(&before, &cluster.capacity_requests().await);
    eprintln!(
        "[e2e] {fill_mib} MiB written at 16 MiB/s: {busy:?}; published {} -> {:?}",
        first,
        published(&cluster, "busy").await
    );
    let most = fill_mib / 64 + 2;
    assert!(
        (1..=most).contains(&writes),
        "about one write per 64 MiB moved ({fill_mib} MiB: at most {most}), not one per echo of \
         its own write: {writes} ({busy:?})\n{}",
        agent
            .log()
            .lines()
            .filter(|l| l.contains("CSIStorageCapacity updated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_class_gets_no_capacity_and_one_warning() {
    let (cluster, agent) = one_node("good").await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "bad",
        "WaitForFirstConsumer",
        "Delete",
        &[("noSuchParameter", "1")],
    ));
    let warnings = || async {
        cluster
            .object_events("", "StorageClass", "bad")
            .await
            .into_iter()
            .filter(|(kind, reason, _)| kind == "Warning" && reason == "InvalidParameters")
            .collect::<Vec<_>>()
    };
    cluster
        .wait_for(
            || async { !warnings().await.is_empty() },
            T,
            "a Warning on StorageClass bad",
        )
        .await;
    // More passes of the publisher: another class, and free space moving past the threshold.
    cluster.kubectl_apply_yaml(&class_yaml("good2", "WaitForFirstConsumer", "Delete", &[]));
    cluster.wait_class_capacities("good2", 1, T).await;
    let first = published(&cluster, "good").await.unwrap();
    let root = agent.root.clone();
    tokio::task::spawn_blocking(move || disk_fill::fill(&root, "filler", 200, 50))
        .await
        .expect("the filler");
    cluster
        .wait_csi_storage_capacities(T, "the fill published", |items| {
            items.iter().any(|o| {
                o.data["storageClassName"] == "good"
                    && o.data["capacity"]
                        .as_str()
                        .and_then(|c| hostvol::domain::quantity::parse_bytes(c).ok())
                        .is_some_and(|c| c + 128 * MIB <= first)
            })
        })
        .await;
    assert_eq!(
        published(&cluster, "bad").await,
        None,
        "no capacity for an invalid class"
    );
    let events = warnings().await;
    eprintln!(
        "[e2e] warnings on StorageClass bad: {}",
        fmt_events(&events)
    );
    assert_eq!(
        events.len(),
        1,
        "one Warning per class change: {}",
        fmt_events(&events)
    );
    assert!(
        events[0].2.contains("noSuchParameter") && events[0].2.contains("no capacity"),
        "{}",
        events[0].2
    );
}
