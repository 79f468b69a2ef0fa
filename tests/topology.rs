//! Immediate classes with `allowedTopologies` (issue #15, "Immediate placement honours the class"):
//! the agents place claims only on nodes whose labels match one of the class's terms, as the
//! scheduler does for WaitForFirstConsumer classes, and say so when no allowed node can take one.

mod common;

use std::time::Duration;

use common::{
    Agent, Cluster, claim_yaml, class_yaml, dirs_in, fmt_events, hostvol_pvs, pod_yaml, pv_node,
};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use kube::api::{DynamicObject, ListParams};

const T: Duration = Duration::from_secs(120);
const HOST: &str = "kubernetes.io/hostname";
const ZONE: &str = "topology.kubernetes.io/zone";

/// An Immediate hostvol class allowing the nodes of one term: (label key, values) pairs, all of
/// which must match.
fn restricted_class(name: &str, term: &[(&str, &[&str])]) -> String {
    let requirements: String = term
        .iter()
        .map(|(key, values)| format!("  - key: {key}\n    values: [{}]\n", values.join(", ")))
        .collect();
    format!(
        "{}allowedTopologies:\n- matchLabelExpressions:\n{requirements}",
        class_yaml(name, "Immediate", "Delete", &[])
    )
}

/// A node: its name, extra labels and capacity cap.
type NodeSpec<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

/// Nodes with their extra labels and capacity caps (on tmpfs disks, so figures do not depend on
/// this machine's disk), each with its agent.
async fn cluster_with(nodes: &[NodeSpec<'_>]) -> (Cluster, Vec<Agent>) {
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    let mut agents = Vec::new();
    for (node, labels, cap) in nodes {
        cluster.add_node_with_labels(node, labels).await;
        cluster.give_disk(node, "64g");
        agents.push(cluster.start_agent(node, &["--capacity-cap", cap]).await);
    }
    (cluster, agents)
}

/// The capacity each node published for `class`: (node, capacity, excluded by topology).
async fn published(cluster: &Cluster, class: &str) -> Vec<(String, String, bool)> {
    let api = cluster.csi_storage_capacities().await;
    let mut rows: Vec<(String, String, bool)> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|o: &&DynamicObject| o.data["storageClassName"] == class)
        .map(|o| {
            let a = o.annotations();
            (
                a.get("hostvol.io/node").cloned().unwrap_or_default(),
                o.data["capacity"].as_str().unwrap_or_default().to_string(),
                a.get("hostvol.io/excluded-by-topology").map(String::as_str) == Some("true"),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// Makes `n` claims of `class` in `ns` and waits until each is Bound; returns their PVs.
async fn bound_claims(cluster: &Cluster, ns: &str, class: &str, n: usize) -> Vec<PersistentVolume> {
    cluster.create_namespace(ns).await;
    let manifests: Vec<String> = (0..n)
        .map(|i| claim_yaml(ns, &format!("c{i}"), class, "100Mi", None))
        .collect();
    cluster.kubectl_apply_yaml(&manifests.join("---\n"));
    for i in 0..n {
        cluster.wait_pvc_bound(ns, &format!("c{i}"), T).await;
    }
    hostvol_pvs(cluster).await
}

/// The hostnames a PV's node affinity requires.
fn affinity_hosts(pv: &PersistentVolume) -> Vec<String> {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| {
            r.node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .filter(|e| e.key == HOST)
                .flat_map(|e| e.values.iter().flatten().cloned())
                .collect()
        })
        .unwrap_or_default()
}

/// A class allowing node-b only: all 10 claims land on node-b, although node-a has four times the
/// room; node-a publishes zero for the class, marked as excluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_claims_land_only_on_allowed_nodes() {
    let (cluster, agents) = cluster_with(&[("node-a", &[], "20Gi"), ("node-b", &[], "5Gi")]).await;
    cluster.kubectl_apply_yaml(&restricted_class("only-b", &[(HOST, &["node-b"])]));
    cluster.wait_class_capacities("only-b", 2, T).await;
    let figures = published(&cluster, "only-b").await;
    eprintln!("[e2e] published for only-b: {figures:?}");
    let pvs = bound_claims(&cluster, "topo", "only-b", 10).await;
    let nodes: Vec<String> = pvs.iter().map(pv_node).collect();
    eprintln!("[e2e] where the 10 claims of only-b landed: {nodes:?}");
    assert_eq!(
        figures[0],
        ("node-a".into(), "0".into(), true),
        "{figures:?}"
    );
    assert!(!figures[1].2 && figures[1].1 != "0", "{figures:?}");
    assert_eq!(pvs.len(), 10);
    assert!(nodes.iter().all(|n| n == "node-b"), "{nodes:?}");
    for pv in &pvs {
        assert_eq!(affinity_hosts(pv), ["node-b"], "{}", pv.name_any());
    }
    assert!(
        dirs_in(&agents[0].root).is_empty(),
        "nothing made on node-a"
    );
    assert_eq!(dirs_in(&agents[1].root).len(), 10);
}

/// A class whose terms match no node with an agent: the claim gets a Warning naming the terms, and
/// nothing is made anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_allowing_no_agent_node_is_refused_with_its_terms() {
    let (cluster, agents) = cluster_with(&[("node-a", &[], "20Gi"), ("node-b", &[], "5Gi")]).await;
    cluster.kubectl_apply_yaml(&restricted_class("nowhere", &[(HOST, &["node-z"])]));
    cluster.wait_class_capacities("nowhere", 2, T).await;
    cluster.create_namespace("topo").await;
    cluster.kubectl_apply_yaml(&claim_yaml("topo", "c0", "nowhere", "100Mi", None));
    let (kind, _, message) = cluster
        .wait_event("topo", "c0", "ProvisioningFailed", T)
        .await;
    eprintln!("[e2e] refusal: {message}");
    assert_eq!(kind, "Warning");
    assert!(
        message.contains("allowedTopologies")
            && message.contains("StorageClass nowhere")
            && message.contains("kubernetes.io/hostname in (node-z)"),
        "{message}"
    );
    let events = cluster.pvc_events("topo", "c0").await;
    assert!(
        !events.iter().any(|(_, reason, _)| reason == "NodeSelected"),
        "{}",
        fmt_events(&events)
    );
    assert!(hostvol_pvs(&cluster).await.is_empty());
    assert!(agents.iter().all(|a| dirs_in(&a.root).is_empty()));
}

/// A term with two keys (hostname and zone) must match on both: node-a has the hostname but not the
/// zone, node-c the zone but not the hostname; only node-b, the smallest, has both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_with_two_keys_is_matched_on_both() {
    let (cluster, _agents) = cluster_with(&[
        ("node-a", &[(ZONE, "z1")], "20Gi"),
        ("node-b", &[(ZONE, "z2")], "5Gi"),
        ("node-c", &[(ZONE, "z2")], "20Gi"),
    ])
    .await;
    cluster.kubectl_apply_yaml(&restricted_class(
        "b-in-z2",
        &[(HOST, &["node-a", "node-b"]), (ZONE, &["z2"])],
    ));
    cluster.wait_class_capacities("b-in-z2", 3, T).await;
    let figures = published(&cluster, "b-in-z2").await;
    eprintln!("[e2e] published for b-in-z2: {figures:?}");
    let excluded: Vec<&str> = figures
        .iter()
        .filter(|f| f.2)
        .map(|f| f.0.as_str())
        .collect();
    assert_eq!(excluded, ["node-a", "node-c"], "{figures:?}");
    let pvs = bound_claims(&cluster, "topo", "b-in-z2", 4).await;
    let nodes: Vec<String> = pvs.iter().map(pv_node).collect();
    eprintln!("[e2e] where the claims of b-in-z2 landed: {nodes:?}");
    assert!(
        nodes.len() == 4 && nodes.iter().all(|n| n == "node-b"),
        "{nodes:?}"
    );
    // Relabelled into z2, node-a is allowed: its agent sees its Node change and publishes its room.
    cluster.kubectl_ok(&[
        "label",
        "node",
        "node-a",
        &format!("{ZONE}=z2"),
        "--overwrite",
    ]);
    cluster
        .wait_csi_storage_capacities(T, "node-a's room for b-in-z2 once it is in z2", |items| {
            items.iter().any(|o| {
                o.data["storageClassName"] == "b-in-z2"
                    && o.annotations().get("hostvol.io/node").map(String::as_str) == Some("node-a")
                    && !o
                        .annotations()
                        .contains_key("hostvol.io/excluded-by-topology")
                    && o.data["capacity"] != "0"
            })
        })
        .await;
}

/// A pod pinned by `spec.nodeName` to a node its WaitForFirstConsumer class excludes: its agent does
/// not place the claim there (the scheduler would not have), and says why on the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_pod_does_not_take_its_claim_to_an_excluded_node() {
    let (cluster, agents) = cluster_with(&[("node-a", &[], "20Gi"), ("node-b", &[], "5Gi")]).await;
    let class = restricted_class("wait-b", &[(HOST, &["node-b"])]).replace(
        "volumeBindingMode: Immediate",
        "volumeBindingMode: WaitForFirstConsumer",
    );
    cluster.kubectl_apply_yaml(&class);
    cluster.create_namespace("topo").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("topo", "data", "wait-b", "100Mi", None),
        pod_yaml("topo", "pinned", "data", "  nodeName: node-a\n")
    ));
    let (kind, _, message) = cluster
        .wait_event("topo", "data", "ProvisioningFailed", T)
        .await;
    eprintln!("[e2e] pinned to an excluded node: {message}");
    assert_eq!(kind, "Warning");
    assert!(
        message.contains("spec.nodeName") && message.contains("kubernetes.io/hostname in (node-b)"),
        "{message}"
    );
    let events = cluster.pvc_events("topo", "data").await;
    assert!(
        !events.iter().any(|(_, reason, _)| reason == "NodeSelected"),
        "{}",
        fmt_events(&events)
    );
    assert!(hostvol_pvs(&cluster).await.is_empty());
    assert!(agents.iter().all(|a| dirs_in(&a.root).is_empty()));
}
