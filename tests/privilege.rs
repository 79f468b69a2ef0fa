//! Least privilege per node (issue 15): an agent changes only hostvol's own PVs of its own node, and
//! node-loss clean-up, the one feature that deletes claims, runs only with its component's RBAC.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, Cluster, NODE_LOSS_COMPONENT_RBAC, PROVISIONER};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

const T: Duration = Duration::from_secs(120);

/// A hostPath PV in `agent`'s data root (directory `<name>_priv_<claim>`, made with one file in it),
/// labelled for `agent`'s node as hostvol labels its own, but with the given provisioner and node.
#[allow(clippy::too_many_arguments)]
fn planted_pv(
    agent: &Agent,
    name: &str,
    provisioner: &str,
    node: &str,
    policy: &str,
    class: &str,
    claim: &str,
    claim_uid: &str,
) -> String {
    let dir = format!("{name}_priv_{claim}");
    let path = agent.root.join(&dir);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("data"), "someone else's data").unwrap();
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\n  labels:\n    hostvol.io/node: {label}\n  \
         annotations:\n    pv.kubernetes.io/provisioned-by: {provisioner}\n    hostvol.io/node: {node}\n    \
         hostvol.io/directory: {path}\nspec:\n  capacity:\n    storage: 1Gi\n  accessModes: [ReadWriteOnce]\n  \
         persistentVolumeReclaimPolicy: {policy}\n  storageClassName: {class}\n  hostPath:\n    path: {path}\n    \
         type: Directory\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions:\n        \
         - key: kubernetes.io/hostname\n          operator: In\n          values: [{node}]\n  claimRef:\n    \
         namespace: priv\n    name: {claim}\n    uid: {claim_uid}\n",
        label = agent.node,
        path = path.display(),
    )
}

/// The lines of the agent's log where it left `pv` alone while doing `action`.
fn left_alone(agent: &Agent, pv: &str, action: &str) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("leaving PV alone") && l.contains(&format!("pv={pv} ")))
        .filter(|l| l.contains(action))
        .map(str::to_string)
        .collect()
}

fn intact(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("data")).is_ok_and(|d| d == "someone else's data")
}

fn capacity(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"]
        .0
        .clone()
}

/// The PV watch of node-a's agent is selected by a label anyone allowed to edit PVs can set. Three PVs
/// carry it: a Released Delete PV of another provisioner, a Released Delete hostvol PV of node-b,
/// and a bound PV of another provisioner whose claim grows. The agent's reclaim and resize paths meet
/// all three and change none: no PV patched or deleted, no directory touched, a log line saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_other_nodes_volumes_are_left_alone() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    let agent = cluster.start_agent("node-a", &[]).await;
    cluster.create_namespace("priv").await;
    // Resizes reach the agent for claims of a class that allows them.
    cluster.kubectl_apply_yaml(&format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: grow\nprovisioner: {PROVISIONER}\n\
         volumeBindingMode: WaitForFirstConsumer\nreclaimPolicy: Retain\nallowVolumeExpansion: true\n"
    ));
    let gone_uid = "00000000-0000-0000-0000-000000000001";
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        planted_pv(
            &agent,
            "pvc-foreign",
            "example.com/cloud",
            "node-a",
            "Delete",
            "other",
            "gone",
            gone_uid
        ),
        planted_pv(
            &agent,
            "pvc-elsewhere",
            PROVISIONER,
            "node-b",
            "Delete",
            "other",
            "gone",
            gone_uid
        ),
    ));

    // A claim of the growable class, bound to a PV another provisioner made under hostvol's name
    // for it (pvc-<claim uid>) and labelled for node-a.
    cluster.kubectl_apply_yaml(&common::claim_yaml("priv", "grows", "grow", "1Gi", None));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "priv");
    let uid = claims.get("grows").await.unwrap().uid().unwrap();
    let grown = format!("pvc-{uid}");
    cluster.kubectl_apply_yaml(&planted_pv(
        &agent,
        &grown,
        "example.com/cloud",
        "node-a",
        "Retain",
        "grow",
        "grows",
        &uid,
    ));
    cluster.wait_pvc_bound("priv", "grows", T).await;
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    claims
        .patch(
            "grows",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}}),
            ),
        )
        .await
        .unwrap();

    // Each path says it left its PV alone (or, were it not guarded, changes it: fail at once).
    let cases = [
        ("pvc-foreign", "reclaim"),
        ("pvc-elsewhere", "reclaim"),
        (grown.as_str(), "resize"),
    ];
    for (pv, action) in cases {
        let dir = agent.root.join(format!(
            "{pv}_priv_{}",
            if action == "resize" { "grows" } else { "gone" }
        ));
        cluster
            .wait_for(
                || async {
                    !left_alone(&agent, pv, action).is_empty()
                        || !intact(&dir)
                        || pvs
                            .get_opt(pv)
                            .await
                            .unwrap()
                            .is_none_or(|v| capacity(&v) != "1Gi")
                },
                T,
                &format!("node-a's agent to meet {pv} on its {action} path"),
            )
            .await;
        let now = pvs.get_opt(pv).await.unwrap();
        let now = now.unwrap_or_else(|| panic!("{pv} was deleted by node-a's agent"));
        assert!(intact(&dir), "{} was changed", dir.display());
        assert_eq!(capacity(&now), "1Gi", "{pv} was resized");
        assert!(
            !now.finalizers()
                .iter()
                .any(|f| f.starts_with("hostvol.io/")),
            "{pv} got a hostvol finalizer"
        );
        let lines = left_alone(&agent, pv, action);
        eprintln!(
            "[privilege] {pv} ({action}), {} line(s): {}",
            lines.len(),
            lines[0]
        );
    }
    assert!(
        lines_about_node_b(&agent),
        "the reason names the other node"
    );
    let status = claims.get("grows").await.unwrap().status.unwrap();
    assert_eq!(
        status.capacity.unwrap()["storage"].0,
        "1Gi",
        "the foreign claim's status was not marked resized"
    );
}

fn lines_about_node_b(agent: &Agent) -> bool {
    left_alone(agent, "pvc-elsewhere", "reclaim")
        .iter()
        .any(|l| l.contains("node \"node-b\""))
}

/// The base RBAC of deploy/ cannot delete claims: an agent asked for node-loss clean-up without the
/// component's RBAC refuses to start (status 1, one line naming the component); with it, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_cleanup_needs_its_component() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;

    let (status, output) = cluster
        .run_agent_expecting_exit("node-a", &["--node-loss-cleanup"])
        .await;
    eprintln!("[privilege] without the component: {status}\n{output}");
    assert_eq!(status.code(), Some(1), "exit status: {output}");
    let refusal: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("hostvol: "))
        .collect();
    assert_eq!(refusal.len(), 1, "one line saying why: {output}");
    let component = Path::new(NODE_LOSS_COMPONENT_RBAC).parent().unwrap();
    assert!(
        refusal[0].contains(&component.display().to_string())
            && refusal[0].contains("delete persistentvolumeclaims"),
        "the line names what is missing and the component to apply: {}",
        refusal[0]
    );
    assert!(
        !output.contains("starting agent"),
        "refused before starting anything: {output}"
    );

    cluster.grant_node_loss_cleanup().await;
    let agent = cluster
        .start_agent("node-a", &["--node-loss-cleanup"])
        .await;
    assert!(
        !agent.log().contains("node-loss clean-up is off"),
        "the feature runs: {}",
        agent.log()
    );
}
