//! End-to-end scenarios of issue #4: binding modes, reclaim policies, several disks, lost nodes, orphans.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{Agent, Cluster, fmt_events, metric_value};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

const T: Duration = Duration::from_secs(120);
const PROVISIONER: &str = "hostpath.hostvol.io";

fn class_yaml(name: &str, binding: &str, reclaim: &str, parameters: &[(&str, &str)]) -> String {
    let params: String = parameters.iter().map(|(k, v)| format!("\n  {k}: \"{v}\"")).collect();
    let params = if params.is_empty() { String::new() } else { format!("parameters:{params}\n") };
    format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {name}\nprovisioner: {PROVISIONER}\n\
         volumeBindingMode: {binding}\nreclaimPolicy: {reclaim}\n{params}"
    )
}

fn claim_yaml(ns: &str, name: &str, class: &str, size: &str, selected_node: Option<&str>) -> String {
    let annotations = selected_node.map_or(String::new(), |n| format!("  annotations:\n    volume.kubernetes.io/selected-node: {n}\n"));
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\n  namespace: {ns}\n{annotations}spec:\n  \
         storageClassName: {class}\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: {size}\n"
    )
}

fn pod_yaml(ns: &str, name: &str, claim: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{extra_spec}  containers:\n  - name: app\n    \
         image: busybox\n    volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    \
         persistentVolumeClaim:\n      claimName: {claim}\n"
    )
}

fn dirs_in(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

async fn hostvol_pvs(cluster: &Cluster) -> Vec<PersistentVolume> {
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    pvs.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|pv| pv.annotations().get("pv.kubernetes.io/provisioned-by").is_some_and(|p| p == PROVISIONER))
        .collect()
}

fn pv_node(pv: &PersistentVolume) -> String {
    pv.annotations().get("hostvol.io/node").cloned().unwrap_or_default()
}

fn pv_claim(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().claim_ref.as_ref().unwrap().name.clone().unwrap()
}

async fn cluster_with_agents(nodes: &[(&str, &[&str])]) -> (Cluster, Vec<Agent>) {
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    let mut agents = Vec::new();
    for (node, args) in nodes {
        cluster.add_node(node).await;
        agents.push(cluster.start_agent(node, args).await);
    }
    (cluster, agents)
}

/// Scenario 1: 30 Immediate claims at once against three agents: each is Bound once, spread by capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_claims_are_placed_once_and_spread_by_capacity() {
    let (cluster, agents) = cluster_with_agents(&[
        ("node-a", &["--capacity-cap", "10Gi"]),
        ("node-b", &["--capacity-cap", "20Gi"]),
        ("node-c", &["--capacity-cap", "30Gi"]),
    ])
    .await;
    cluster.kubectl_apply_yaml(&class_yaml("hostvol-now", "Immediate", "Retain", &[]));
    cluster.create_namespace("now").await;
    // Every node's capacity for the class must be published first.
    cluster.wait_for(|| async { capacity_objects(&cluster, "hostvol-now").await >= 3 }, T, "published capacities of all three nodes").await;
    let n = 30;
    let manifests: Vec<String> = (0..n).map(|i| claim_yaml("now", &format!("c{i}"), "hostvol-now", "1Gi", None)).collect();
    cluster.kubectl_apply_yaml(&manifests.join("---\n"));
    for i in 0..n {
        cluster.wait_pvc_bound("now", &format!("c{i}"), T).await;
    }
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(pvs.len(), n, "one PV per claim");
    let claims: BTreeSet<String> = pvs.iter().map(pv_claim).collect();
    assert_eq!(claims.len(), n, "no claim provisioned twice");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pv in &pvs {
        *per_node.entry(pv_node(pv)).or_default() += 1;
    }
    let dirs: usize = agents.iter().map(|a| dirs_in(&a.root).len()).sum();
    assert_eq!(dirs, n, "one directory per claim across all nodes");
    let count = |node: &str| per_node.get(node).copied().unwrap_or(0);
    eprintln!("[e2e] Immediate placement: {per_node:?}");
    assert!(count("node-c") >= count("node-b") && count("node-b") >= count("node-a"), "spread by capacity: {per_node:?}");
    assert!(count("node-c") < n, "not all on one node: {per_node:?}");
    let mut conflicts = 0.0;
    for agent in &agents {
        conflicts += metric_value(&agent.metrics().await, "hostvol_placement_conflicts_total", &[]).unwrap_or(0.0);
    }
    eprintln!("[e2e] placement conflicts: {conflicts}");
}

/// CSIStorageCapacity objects published for `class` (what the agents read to place Immediate claims).
async fn capacity_objects(cluster: &Cluster, class: &str) -> usize {
    let version = cluster.csi_storage_capacity_api_version().await.expect("CSIStorageCapacity served");
    let (group, ver) = version.split_once('/').unwrap();
    let resource = kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(group, ver, "CSIStorageCapacity"));
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(cluster.client(), "hostvol-system", &resource);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items.iter().filter(|o| o.data.get("storageClassName").and_then(|c| c.as_str()) == Some(class)).count())
        .unwrap_or(0)
}

/// Scenario 2: a pod that sets spec.nodeName gets its WaitForFirstConsumer volume on that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_with_node_name_get_their_volume_on_that_node() {
    let (cluster, agents) = cluster_with_agents(&[("node-a", &[]), ("node-b", &[])]).await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("pinned").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("pinned", "data", "hostvol", "1Gi", None),
        pod_yaml("pinned", "pinned", "data", "  nodeName: node-b\n")
    ));
    let pvc = cluster.wait_pvc_bound("pinned", "data", T).await;
    let pv_name = pvc.spec.unwrap().volume_name.unwrap();
    let pv = hostvol_pvs(&cluster).await.into_iter().find(|pv| pv.name_any() == pv_name).unwrap();
    assert_eq!(pv_node(&pv), "node-b");
    assert_eq!(dirs_in(&agents[1].root).len(), 1);
    assert!(dirs_in(&agents[0].root).is_empty());
    let events = cluster.pvc_events("pinned", "data").await;
    assert!(events.iter().any(|(_, r, m)| r == "NodeSelected" && m.contains("spec.nodeName")), "{}", fmt_events(&events));
}

/// Scenario 3: a node capped below the claim's size hands the claim back; it is provisioned on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_serve_hands_the_claim_back() {
    let (cluster, agents) = cluster_with_agents(&[("small", &["--capacity-cap", "3Gi"]), ("large", &["--capacity-cap", "20Gi"])]).await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("resched").await;
    // As a scheduler working from stale figures would: the claim is placed on the small node.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("resched", "big", "hostvol", "5Gi", Some("small")),
        pod_yaml("resched", "app", "big", "")
    ));
    let pvc = cluster.wait_pvc_bound("resched", "big", T).await;
    let pv_name = pvc.spec.unwrap().volume_name.unwrap();
    let pv = hostvol_pvs(&cluster).await.into_iter().find(|pv| pv.name_any() == pv_name).unwrap();
    assert_eq!(pv_node(&pv), "large");
    let events = cluster.pvc_events("resched", "big").await;
    assert!(events.iter().any(|(t, r, m)| t == "Warning" && r == "ProvisioningFailed" && m.contains("small cannot hold 5Gi")), "{}", fmt_events(&events));
    assert!(events.iter().any(|(_, r, _)| r == "ProvisioningReschedule"), "{}", fmt_events(&events));
    assert!(dirs_in(&agents[0].root).is_empty(), "nothing made on the small node");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "resched");
    assert_eq!(claims.get("big").await.unwrap().annotations().get("volume.kubernetes.io/selected-node").map(String::as_str), Some("large"));
}
