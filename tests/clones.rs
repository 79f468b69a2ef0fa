//! Clones on a real control plane: a claim whose `dataSource` names a bound hostvol claim gets a copy
//! of that claim's data, made on the source's node (the only place it can be made), whatever node the
//! claim was first placed on; a clone smaller than its source and other data sources are refused
//! with a Warning that says why. (btrfs snapshots: `tests/quotas.rs`.)

mod common;

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::PersistentVolume;

const T: Duration = Duration::from_secs(60);

fn clone_yaml(
    ns: &str,
    name: &str,
    size: &str,
    source: &str,
    selected_node: Option<&str>,
) -> String {
    claim_yaml_with(
        ns,
        name,
        "cloneable",
        size,
        selected_node,
        &format!("  dataSource:\n    kind: PersistentVolumeClaim\n    name: {source}\n"),
    )
}

async fn volume_dir(
    cluster: &Cluster,
    agent: &Agent,
    ns: &str,
    claim: &str,
) -> (PersistentVolume, PathBuf) {
    let pv = cluster.hostvol_pv_of_claim(ns, claim, T).await;
    let dir = agent.root.join(pv_dir_name(&pv));
    (pv, dir)
}

fn pv_node(pv: &PersistentVolume) -> String {
    pv.metadata.annotations.as_ref().unwrap()["hostvol.io/node"].clone()
}

/// A cluster with nodes n1 and n2, their agents, and namespace `cl`.
async fn two_nodes() -> (Cluster, Agent, Agent) {
    let cluster = Cluster::start().await;
    cluster.add_node("n1").await;
    cluster.add_node("n2").await;
    let n1 = cluster
        .start_agent("n1", &["--pod-name", "hostvol-n1"])
        .await;
    let n2 = cluster
        .start_agent("n2", &["--pod-name", "hostvol-n2"])
        .await;
    cluster.create_namespace("cl").await;
    (cluster, n1, n2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_copies_made_on_the_source_node() {
    let (cluster, n1, _n2) = two_nodes().await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        class_yaml("cloneable", "WaitForFirstConsumer", "Delete", &[]),
        claim_yaml("cl", "source", "cloneable", "10Mi", Some("n1"))
    ));
    let (_, source_dir) = volume_dir(&cluster, &n1, "cl", "source").await;
    std::fs::write(source_dir.join("index.html"), "hello from the source\n").unwrap();
    std::fs::create_dir(source_dir.join("sub")).unwrap();
    std::fs::write(source_dir.join("sub/data.bin"), vec![7u8; 300_000]).unwrap();
    symlink("/etc/passwd", source_dir.join("outside")).unwrap();

    // A pod uses the clone: wherever the scheduler first puts it, the clone is made on n1, where its
    // source's data is, and the pod runs there.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        clone_yaml("cl", "copy", "10Mi", "source", None),
        pod_yaml("cl", "web", "copy", "")
    ));
    let (pv, copy_dir) = volume_dir(&cluster, &n1, "cl", "copy").await;
    assert_eq!(pv_node(&pv), "n1", "a clone lives on its source's node");
    let pod = cluster
        .wait_pod_running("cl", "web", Duration::from_secs(150))
        .await;
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some("n1"),
        "the pod follows its volume"
    );
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("index.html")).unwrap(),
        "hello from the source\n"
    );
    assert_eq!(
        std::fs::read(copy_dir.join("sub/data.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    let link = std::fs::symlink_metadata(copy_dir.join("outside")).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "symlinks are copied as symlinks, never followed"
    );
    assert_eq!(
        std::fs::read_link(copy_dir.join("outside")).unwrap(),
        PathBuf::from("/etc/passwd")
    );
    // Independent copies.
    std::fs::write(source_dir.join("index.html"), "changed\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("index.html")).unwrap(),
        "hello from the source\n"
    );
    assert!(
        !dirs_in(&n1.root).iter().any(|d| d.starts_with("cloning-")),
        "no staging copy is left behind: {:?}",
        dirs_in(&n1.root)
    );

    // Placed on the wrong node (as a scheduler might): n2's agent moves it to n1, and says so.
    cluster.kubectl_apply_yaml(&clone_yaml("cl", "moved", "20Mi", "source", Some("n2")));
    let (pv, moved_dir) = volume_dir(&cluster, &n1, "cl", "moved").await;
    assert_eq!(pv_node(&pv), "n1");
    let (_, _, placed) = cluster.wait_event("cl", "moved", "NodeSelected", T).await;
    assert!(
        placed.contains("clone of source") && placed.contains("n1"),
        "{placed}"
    );
    assert_eq!(
        std::fs::read_to_string(moved_dir.join("index.html")).unwrap(),
        "changed\n"
    );

    // Refusals, with the reason where the user looks.
    cluster.kubectl_apply_yaml(&clone_yaml("cl", "small", "5Mi", "source", Some("n1")));
    let (kind, _, message) = cluster
        .wait_event("cl", "small", "ProvisioningFailed", T)
        .await;
    assert_eq!(kind, "Warning");
    assert!(message.contains("at least the source's size"), "{message}");
    cluster.kubectl_apply_yaml(&claim_yaml_with(
        "cl",
        "from-snapshot",
        "cloneable",
        "10Mi",
        Some("n1"),
        "  dataSource:\n    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: snap\n",
    ));
    let (kind, _, message) = cluster
        .wait_event("cl", "from-snapshot", "ProvisioningFailed", T)
        .await;
    assert_eq!(kind, "Warning");
    assert!(
        message.contains("VolumeSnapshot") && message.contains("not supported"),
        "{message}"
    );
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(
        pvs.len(),
        3,
        "source, copy, moved: nothing for the refused claims"
    );

    // Cloning reads the source's directory from its PV's source: a `local` source clones the same
    // way, into a `local` PV.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        typed_class_yaml(
            "cloneable-local",
            "WaitForFirstConsumer",
            "Delete",
            "local",
            &[]
        ),
        claim_yaml("cl", "local-source", "cloneable-local", "10Mi", Some("n1"))
    ));
    let (_, local_source) = volume_dir(&cluster, &n1, "cl", "local-source").await;
    std::fs::write(
        local_source.join("index.html"),
        "hello from a local volume\n",
    )
    .unwrap();
    cluster.kubectl_apply_yaml(&claim_yaml_with(
        "cl",
        "local-copy",
        "cloneable-local",
        "10Mi",
        Some("n2"),
        "  dataSource:\n    kind: PersistentVolumeClaim\n    name: local-source\n",
    ));
    let (pv, local_copy) = volume_dir(&cluster, &n1, "cl", "local-copy").await;
    assert_eq!(
        (pv_node(&pv).as_str(), pv_volume_type(&pv)),
        ("n1", "local")
    );
    assert_eq!(
        std::fs::read_to_string(local_copy.join("index.html")).unwrap(),
        "hello from a local volume\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_clones_and_pinned_pods() {
    let (cluster, n1, _n2) = two_nodes().await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}---\n{}",
        class_yaml("cloneable", "WaitForFirstConsumer", "Delete", &[]),
        class_yaml("cloneable-now", "Immediate", "Delete", &[]),
        claim_yaml("cl", "source", "cloneable", "10Mi", Some("n1"))
    ));
    let (_, source_dir) = volume_dir(&cluster, &n1, "cl", "source").await;
    std::fs::write(source_dir.join("index.html"), "hello\n").unwrap();

    // A pod pinned to n2 by spec.nodeName cannot have a clone of n1's data: said on claim and pod,
    // nothing is made, the claim is not moved back and forth.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        clone_yaml("cl", "pinned", "10Mi", "source", None),
        pod_yaml("cl", "pinned-pod", "pinned", "  nodeName: n2\n")
    ));
    let (kind, _, message) = cluster
        .wait_event("cl", "pinned", "ProvisioningFailed", T)
        .await;
    assert_eq!(kind, "Warning");
    assert!(
        message.contains("pinned to node n2") && message.contains("on node n1"),
        "{message}"
    );
    assert!(
        cluster
            .object_events("cl", "Pod", "pinned-pod")
            .await
            .iter()
            .any(|(_, reason, m)| reason == "ProvisioningFailed" && m.contains("pinned")),
        "the pod's events say it too"
    );

    // Immediate: the clone of a claim is placed on the source's node at once, with no pod.
    let source_now = claim_yaml("cl", "source-now", "cloneable-now", "10Mi", Some("n1"));
    cluster.kubectl_apply_yaml(&source_now);
    let (_, dir) = volume_dir(&cluster, &n1, "cl", "source-now").await;
    std::fs::write(dir.join("data"), "now\n").unwrap();
    cluster.kubectl_apply_yaml(&claim_yaml_with(
        "cl",
        "copy-now",
        "cloneable-now",
        "10Mi",
        None,
        "  dataSource:\n    kind: PersistentVolumeClaim\n    name: source-now\n",
    ));
    let (pv, copy_dir) = volume_dir(&cluster, &n1, "cl", "copy-now").await;
    assert_eq!(pv_node(&pv), "n1");
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("data")).unwrap(),
        "now\n"
    );
    let hostvol_pv_names: Vec<String> = hostvol_pvs(&cluster).await.iter().map(pv_claim).collect();
    assert!(
        !hostvol_pv_names.iter().any(|c| c == "pinned"),
        "no volume for the pinned clone: {hostvol_pv_names:?}"
    );
}
