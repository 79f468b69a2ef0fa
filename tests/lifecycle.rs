//! End-to-end scenarios of issue #4: binding modes, reclaim policies, several disks, lost nodes, orphans.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::grpc::GetCapacityRequest;
use common::{
    Agent, Cluster, VOLUME_TYPES, capacity_report, claim_yaml, class_yaml, connect, dirs_in,
    fmt_events, hostvol_pvs, metric_value, pod_yaml, pv_claim, pv_dir_name, pv_host_path, pv_node,
    pv_volume_type, typed_class_yaml,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::Api;

const T: Duration = Duration::from_secs(120);

async fn cluster_with_agents(nodes: &[(&str, &[&str])]) -> (Cluster, Vec<Agent>) {
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    // A capped node's figures must not depend on how full this machine's disk is.
    for (node, args) in nodes {
        if args.contains(&"--capacity-cap") {
            cluster.give_disk(node, "64g");
        }
    }
    let agents = cluster.add_nodes_with_agents(nodes).await;
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
    cluster.wait_class_capacities("hostvol-now", 3, T).await;
    let n = 30;
    let manifests: Vec<String> = (0..n)
        .map(|i| claim_yaml("now", &format!("c{i}"), "hostvol-now", "1Gi", None))
        .collect();
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
    assert!(
        count("node-c") >= count("node-b") && count("node-b") >= count("node-a"),
        "spread by capacity: {per_node:?}"
    );
    assert!(count("node-c") < n, "not all on one node: {per_node:?}");
    let mut conflicts = 0.0;
    for agent in &agents {
        conflicts += metric_value(
            &agent.metrics().await,
            "hostvol_placement_conflicts_total",
            &[],
        )
        .unwrap_or(0.0);
    }
    eprintln!("[e2e] placement conflicts: {conflicts}");
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
    let pv = cluster.hostvol_pv_of_claim("pinned", "data", T).await;
    assert_eq!(pv_node(&pv), "node-b");
    assert_eq!(dirs_in(&agents[1].root).len(), 1);
    assert!(dirs_in(&agents[0].root).is_empty());
    let events = cluster.pvc_events("pinned", "data").await;
    assert!(
        events
            .iter()
            .any(|(_, r, m)| r == "NodeSelected" && m.contains("spec.nodeName")),
        "{}",
        fmt_events(&events)
    );
}

/// Scenario 3: a node capped below the claim's size hands the claim back; it is provisioned on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_serve_hands_the_claim_back() {
    let (cluster, agents) = cluster_with_agents(&[
        ("small", &["--capacity-cap", "3Gi"]),
        ("large", &["--capacity-cap", "20Gi"]),
        // A data root that is a plain directory where a disk should be mounted.
        ("unmounted", &["--require-mount-point"]),
    ])
    .await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("resched").await;
    // As a scheduler working from stale figures would: the claim is placed on the small node.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("resched", "big", "hostvol", "5Gi", Some("small")),
        pod_yaml("resched", "app", "big", "")
    ));
    let pv = cluster.hostvol_pv_of_claim("resched", "big", T).await;
    assert_eq!(pv_node(&pv), "large");
    let events = cluster.pvc_events("resched", "big").await;
    assert!(
        events.iter().any(|(t, r, m)| t == "Warning"
            && r == "ProvisioningFailed"
            && m.contains("small cannot hold 5Gi")),
        "{}",
        fmt_events(&events)
    );
    assert!(
        events.iter().any(|(_, r, _)| r == "ProvisioningReschedule"),
        "{}",
        fmt_events(&events)
    );
    assert!(
        dirs_in(&agents[0].root).is_empty(),
        "nothing made on the small node"
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "resched");
    assert_eq!(
        claims
            .get("big")
            .await
            .unwrap()
            .annotations()
            .get("volume.kubernetes.io/selected-node")
            .map(String::as_str),
        Some("large")
    );

    // A node whose data root is not mounted refuses, says why, and hands the claim back too.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("resched", "elsewhere", "hostvol", "1Gi", Some("unmounted")),
        pod_yaml("resched", "app2", "elsewhere", "")
    ));
    let pv = cluster.hostvol_pv_of_claim("resched", "elsewhere", T).await;
    assert_ne!(pv_node(&pv), "unmounted");
    let events = cluster.pvc_events("resched", "elsewhere").await;
    assert!(
        events
            .iter()
            .any(|(t, _, m)| t == "Warning" && m.contains("not a mount point")),
        "{}",
        fmt_events(&events)
    );
    assert!(
        dirs_in(&agents[2].root).is_empty(),
        "nothing written to an unmounted root"
    );
}

fn hostvol_cli(cluster: &Cluster, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hostvol"))
        .args(args)
        .env("KUBECONFIG", cluster.admin_kubeconfig())
        // Played-kubelet agents are host processes: no kubelet to port-forward through.
        .env("HOSTVOL_VIA", "pod-ip")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn volume_dir(agent: &Agent, pv: &PersistentVolume) -> std::path::PathBuf {
    agent.root.join(pv_dir_name(pv))
}

/// Scenario 4: Delete removes the directory (read-only files, nested directories, a symlink out of the
/// root whose target survives), then the PV, for both volume types; `kubectl delete pv` on a bound
/// volume ends the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_cleans_up_without_following_symlinks() {
    use std::os::unix::fs::PermissionsExt;
    let (cluster, agents) = cluster_with_agents(&[("node-a", &[])]).await;
    let agent = &agents[0];
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-delete",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("del").await;
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    // Reclaim reads the directory from the PV's source: once per volume type.
    for volume_type in VOLUME_TYPES {
        let class = format!("hostvol-delete-{}", volume_type.to_lowercase());
        let claim = format!("scratch-{}", volume_type.to_lowercase());
        cluster.kubectl_apply_yaml(&format!(
            "{}---\n{}",
            typed_class_yaml(&class, "WaitForFirstConsumer", "Delete", volume_type, &[]),
            claim_yaml("del", &claim, &class, "1Gi", Some("node-a"))
        ));
        let pv = cluster.hostvol_pv_of_claim("del", &claim, T).await;
        assert_eq!(pv_volume_type(&pv), volume_type);
        assert!(
            pv.finalizers().iter().any(|f| f == "hostvol.io/cleanup"),
            "Delete volumes carry the cleanup finalizer"
        );
        let dir = volume_dir(agent, &pv);
        let outside = cluster.dir().join("precious.txt");
        std::fs::write(&outside, "do not touch").unwrap();
        std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
        std::fs::write(dir.join("a/b/c/deep.txt"), "x").unwrap();
        std::fs::write(dir.join("readonly.txt"), "x").unwrap();
        std::fs::set_permissions(
            dir.join("readonly.txt"),
            std::fs::Permissions::from_mode(0o444),
        )
        .unwrap();
        std::fs::create_dir(dir.join("locked")).unwrap();
        std::fs::write(dir.join("locked/inside.txt"), "x").unwrap();
        std::fs::set_permissions(dir.join("locked"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();

        cluster.kubectl_ok(&[
            "delete",
            "-n",
            "del",
            "pvc",
            &claim,
            "--wait=true",
            "--timeout=60s",
        ]);
        cluster
            .wait_for(
                || async { pvs.get_opt(&pv.name_any()).await.unwrap().is_none() },
                T,
                &format!("Delete PV removed ({volume_type})"),
            )
            .await;
        assert!(!dir.exists(), "directory removed ({volume_type})");
        assert_eq!(
            std::fs::read_to_string(&outside).unwrap(),
            "do not touch",
            "symlink target untouched"
        );
    }

    // kubectl delete pv on a bound Delete volume: held until the claim goes, then cleaned the same way.
    cluster.kubectl_apply_yaml(&claim_yaml(
        "del",
        "second",
        "hostvol-delete",
        "1Gi",
        Some("node-a"),
    ));
    let pv2 = cluster.hostvol_pv_of_claim("del", "second", T).await;
    let dir2 = volume_dir(agent, &pv2);
    std::fs::write(dir2.join("data"), "x").unwrap();
    cluster.kubectl_ok(&["delete", "pv", &pv2.name_any(), "--wait=false"]);
    cluster
        .wait_for(
            || async {
                pvs.get_opt(&pv2.name_any())
                    .await
                    .unwrap()
                    .is_some_and(|pv| pv.metadata.deletion_timestamp.is_some())
            },
            T,
            "the PV marked for deletion",
        )
        .await;
    // A barrier instead of a sleep: a Delete volume made and released after that is removed, so
    // the agent has seen the deletion of the bound one by then (and must have kept it).
    cluster.kubectl_apply_yaml(&claim_yaml(
        "del",
        "barrier",
        "hostvol-delete",
        "1Gi",
        Some("node-a"),
    ));
    let barrier = cluster.hostvol_pv_of_claim("del", "barrier", T).await;
    let barrier_dir = volume_dir(agent, &barrier);
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "del",
        "pvc",
        "barrier",
        "--wait=true",
        "--timeout=60s",
    ]);
    cluster
        .wait_for(
            || async { !barrier_dir.exists() },
            T,
            "the barrier volume removed",
        )
        .await;
    assert!(
        dir2.join("data").exists(),
        "a bound volume keeps its data while its claim exists"
    );
    assert!(pvs.get_opt(&pv2.name_any()).await.unwrap().is_some());
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "del",
        "pvc",
        "second",
        "--wait=true",
        "--timeout=60s",
    ]);
    cluster
        .wait_for(
            || async { pvs.get_opt(&pv2.name_any()).await.unwrap().is_none() },
            T,
            "deleted PV gone after cleanup",
        )
        .await;
    assert!(
        !dir2.exists(),
        "kubectl delete pv did not leak the directory"
    );
}

/// Scenario 5: `hostvol purge` removes exactly one released Retain volume; without --yes it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_exactly_one_released_volume() {
    let (cluster, agents) = cluster_with_agents(&[("node-a", &[])]).await;
    let agent = &agents[0];
    cluster.register_agent_pod(agent).await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("keep").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("keep", "old", "hostvol", "1Gi", Some("node-a")),
        claim_yaml("keep", "other", "hostvol", "1Gi", Some("node-a"))
    ));
    let old = cluster.hostvol_pv_of_claim("keep", "old", T).await;
    let other = cluster.hostvol_pv_of_claim("keep", "other", T).await;
    std::fs::write(volume_dir(agent, &old).join("data"), "x").unwrap();
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "keep",
        "pvc",
        "--all",
        "--wait=true",
        "--timeout=60s",
    ]);
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    for pv in [&old, &other] {
        cluster.wait_pv_phase(&pv.name_any(), "Released", T).await;
    }
    let (code, out, err) = hostvol_cli(&cluster, &["volumes", "--released"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&old.name_any()) && out.contains(&other.name_any()),
        "{out}"
    );

    let (code, _, err) = hostvol_cli(&cluster, &["purge", &old.name_any()], "no\n");
    assert_ne!(code, 0, "declined purge must not succeed");
    assert!(
        err.contains("Purge") && err.contains("Type 'yes'"),
        "it asks first: {err}"
    );
    assert!(volume_dir(agent, &old).join("data").exists());

    let (code, out, err) = hostvol_cli(&cluster, &["purge", &old.name_any()], "yes\n");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("purged"), "{out}");
    assert!(
        !volume_dir(agent, &old).exists(),
        "purged directory removed"
    );
    assert!(
        pvs.get_opt(&old.name_any()).await.unwrap().is_none(),
        "purged PV removed"
    );
    assert!(
        volume_dir(agent, &other).exists(),
        "the other released volume is untouched"
    );
    assert!(pvs.get_opt(&other.name_any()).await.unwrap().is_some());

    let (code, _, err) = hostvol_cli(&cluster, &["purge", "--yes", "does-not-exist"], "");
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

/// Scenario 8: orphans and lost volumes made by hand are reported (metrics, Event, doctor); nothing deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_orphans_and_lost_volumes() {
    let (cluster, agents) = cluster_with_agents(&[
        ("node-a", &["--orphan-scan-seconds", "1"]),
        ("node-b", &["--orphan-scan-seconds", "1"]),
    ])
    .await;
    for agent in &agents {
        cluster.register_agent_pod(agent).await;
    }
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("doc").await;
    cluster.kubectl_apply_yaml(&claim_yaml("doc", "gone", "hostvol", "1Gi", Some("node-b")));
    // The directory check reads the PV's source: a lost `local` volume is found the same way.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        typed_class_yaml(
            "hostvol-local",
            "WaitForFirstConsumer",
            "Retain",
            "local",
            &[]
        ),
        claim_yaml("doc", "gone-local", "hostvol-local", "1Gi", Some("node-b"))
    ));
    let lost_pv = cluster.hostvol_pv_of_claim("doc", "gone", T).await;
    let lost_local = cluster.hostvol_pv_of_claim("doc", "gone-local", T).await;
    for pv in [&lost_pv, &lost_local] {
        std::fs::remove_dir(volume_dir(&agents[1], pv)).unwrap();
    }
    let orphan = agents[0]
        .root
        .join("pvc-00000000-0000-0000-0000-000000000000_old_data");
    std::fs::create_dir(&orphan).unwrap();
    std::fs::write(orphan.join("file"), "keep me").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(&orphan)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();

    cluster
        .wait_for(
            || async {
                metric_value(
                    &agents[0].metrics().await,
                    "hostvol_orphan_directories",
                    &[],
                ) == Some(1.0)
            },
            T,
            "orphan metric on node-a",
        )
        .await;
    cluster
        .wait_for(
            || async {
                metric_value(&agents[1].metrics().await, "hostvol_lost_volumes", &[]) == Some(2.0)
            },
            T,
            "lost metric on node-b (hostPath and local)",
        )
        .await;
    for pv in [&lost_pv, &lost_local] {
        cluster
            .wait_for(
                || async {
                    cluster
                        .object_events("", "PersistentVolume", &pv.name_any())
                        .await
                        .iter()
                        .any(|(t, r, _)| t == "Warning" && r == "VolumeDirectoryMissing")
                },
                T,
                &format!(
                    "Warning VolumeDirectoryMissing on lost PV {}",
                    pv.name_any()
                ),
            )
            .await;
    }
    let (code, out, err) = hostvol_cli(&cluster, &["doctor"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("node-a") && l.contains("orphan") && l.contains("_old_data")),
        "{out}"
    );
    for (pv, claim) in [(&lost_pv, "doc/gone"), (&lost_local, "doc/gone-local")] {
        assert!(
            out.lines().any(|l| l.starts_with("node-b")
                && l.contains("lost")
                && l.contains(&pv.name_any())
                && l.contains(claim)),
            "{out}"
        );
    }
    assert!(out.contains("nothing was deleted"), "{out}");
    assert_eq!(
        std::fs::read_to_string(orphan.join("file")).unwrap(),
        "keep me",
        "orphans are never deleted"
    );
    assert!(
        Api::<PersistentVolume>::all(cluster.client())
            .get_opt(&lost_pv.name_any())
            .await
            .unwrap()
            .is_some(),
        "lost PVs are never deleted"
    );
}

fn statefulset_yaml(ns: &str, name: &str, class: &str, preferred_node: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  serviceName: {name}\n  replicas: 1\n  \
         selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      \
         affinity:\n        nodeAffinity:\n          preferredDuringSchedulingIgnoredDuringExecution:\n          - weight: 100\n            \
         preference:\n              matchExpressions:\n              - key: kubernetes.io/hostname\n                operator: In\n                \
         values: [{preferred_node}]\n      containers:\n      - name: app\n        image: busybox\n        volumeMounts:\n        - name: data\n          \
         mountPath: /data\n  volumeClaimTemplates:\n  - metadata:\n      name: data\n    spec:\n      storageClassName: {class}\n      \
         accessModes: [ReadWriteOnce]\n      resources:\n        requests:\n          storage: 1Gi\n"
    )
}

/// Scenario 7: a deleted node's claims and PVs are deleted after the grace period for the class that
/// opts in (agents with `--node-loss-cleanup` and the component's RBAC), so the StatefulSet's replica
/// gets a new claim on the surviving node; without the class's opt-in nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_cleanup_is_opt_in() {
    // The feature runs with the RBAC of its kustomize component, as users enable it.
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.grant_node_loss_cleanup().await;
    let on: &[&str] = &["--node-loss-cleanup"];
    let mut agents = cluster
        .add_nodes_with_agents(&[("doomed", on), ("survivor", on)])
        .await;
    // The opted-in class makes `local` PVs, the shipped one `hostPath`: node loss for both types.
    cluster.kubectl_apply_yaml(&typed_class_yaml(
        "hostvol-heal",
        "WaitForFirstConsumer",
        "Retain",
        "local",
        &[("nodeLossCleanup", "true"), ("nodeLossGracePeriod", "3s")],
    ));
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.create_namespace("loss").await;
    // The scheduler only places a pod where its class's capacity is published (CSIDriver
    // storageCapacity): wait for both classes on both nodes, or the pods could land on whichever node
    // published first rather than on the preferred one.
    cluster
        .wait_csi_storage_capacities(T, "2 classes x 2 nodes published", |items| items.len() >= 4)
        .await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        statefulset_yaml("loss", "healing", "hostvol-heal", "doomed"),
        statefulset_yaml("loss", "plain", "hostvol", "doomed")
    ));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "loss");
    let mut before = BTreeMap::new();
    for sts in ["healing", "plain"] {
        let pod = cluster
            .wait_pod_running("loss", &format!("{sts}-0"), T)
            .await;
        assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("doomed"));
        let claim = cluster
            .wait_pvc_bound("loss", &format!("data-{sts}-0"), T)
            .await;
        before.insert(
            sts,
            (
                claim.uid().unwrap(),
                claim.spec.unwrap().volume_name.unwrap(),
            ),
        );
    }
    // The node disappears for good: its agent dies with it.
    agents[0].kill();
    cluster.kubectl_ok(&["delete", "node", "doomed"]);

    // The opted-in replica comes back on the survivor with a new claim and volume.
    cluster
        .wait_for(
            || async {
                claims
                    .get_opt("data-healing-0")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|c| c.uid() != Some(before["healing"].0.clone()))
            },
            Duration::from_secs(180),
            "a new claim for healing-0",
        )
        .await;
    let claim = cluster.wait_pvc_bound("loss", "data-healing-0", T).await;
    let pv = Api::<PersistentVolume>::all(cluster.client())
        .get(claim.spec.as_ref().unwrap().volume_name.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (pv_node(&pv).as_str(), pv_volume_type(&pv)),
        ("survivor", "local")
    );
    let pod = cluster.wait_pod_running("loss", "healing-0", T).await;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("survivor"));
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    assert!(
        pvs.get_opt(&before["healing"].1).await.unwrap().is_none(),
        "the lost node's PV was deleted"
    );

    // Without the opt-in, nothing was deleted.
    let plain = claims.get("data-plain-0").await.unwrap();
    assert_eq!(plain.uid(), Some(before["plain"].0.clone()), "claim kept");
    assert!(plain.metadata.deletion_timestamp.is_none());
    assert!(
        pvs.get_opt(&before["plain"].1).await.unwrap().is_some(),
        "PV kept"
    );
    assert!(
        dirs_in(&agents[1].root).len() == 1,
        "only the healed replica's new volume on the survivor"
    );
}

fn roots_config(node: &str, roots: &[(&str, &Path)]) -> String {
    let lines: String = roots
        .iter()
        .map(|(name, path)| format!("          {name}: {{path: {}}}\n", path.display()))
        .collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hostvol-config\n  namespace: hostvol-system\ndata:\n  config.yaml: |\n    \
         nodes:\n      {node}:\n        roots:\n{lines}"
    )
}

/// Scenario 6: two data roots on one node from the ConfigMap and two classes; each claim lands in its
/// root; dropping a root from the ConfigMap stops new claims for it and leaves existing volumes alone;
/// an invalid change is rejected and the last good configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_roots_from_the_config_map() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let (fast, bulk) = (cluster.dir().join("nvme"), cluster.dir().join("bulk"));
    std::fs::create_dir_all(&fast).unwrap();
    std::fs::create_dir_all(&bulk).unwrap();
    cluster.kubectl_apply_yaml(&roots_config(
        "node-a",
        &[("fast", &fast), ("default", &bulk)],
    ));
    let agent = cluster.start_agent("node-a", &[]).await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-fast",
        "WaitForFirstConsumer",
        "Retain",
        &[("dataRoot", "fast")],
    ));
    cluster.create_namespace("roots").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("roots", "quick", "hostvol-fast", "1Gi", Some("node-a")),
        claim_yaml("roots", "big", "hostvol", "1Gi", Some("node-a"))
    ));
    let quick = cluster.hostvol_pv_of_claim("roots", "quick", T).await;
    let big = cluster.hostvol_pv_of_claim("roots", "big", T).await;
    assert!(pv_host_path(&quick).starts_with(&fast.display().to_string()));
    assert!(pv_host_path(&big).starts_with(&bulk.display().to_string()));
    assert_eq!(dirs_in(&fast).len(), 1);
    assert_eq!(dirs_in(&bulk).len(), 1);
    assert!(
        dirs_in(&agent.root).is_empty(),
        "the flags' root is not used when the ConfigMap configures the node"
    );

    // Capacity is reported per root.
    let mut client = connect(&agent.grpc_tcp(), Duration::from_secs(5))
        .await
        .unwrap();
    let report = capacity_report(&mut client).await;
    let names: Vec<&str> = report.roots.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["default", "fast"]);
    assert!(
        report
            .roots
            .iter()
            .all(|r| r.volume_count == 1 && r.allocated_bytes == 1 << 30),
        "{report:?}"
    );

    // An invalid change is rejected; the last good configuration stays.
    cluster.kubectl_apply_yaml(&roots_config("node-a", &[("Fast!", &fast)]));
    cluster
        .wait_for(
            || async {
                agent
                    .log()
                    .contains("rejected the new hostvol configuration")
            },
            T,
            "rejection logged",
        )
        .await;
    let report = capacity_report(&mut client).await;
    assert_eq!(report.roots.len(), 2);

    // Dropping the fast root: new claims for it are refused and handed back; the existing volume stays.
    cluster.kubectl_apply_yaml(&roots_config("node-a", &[("default", &bulk)]));
    cluster
        .wait_for(
            || async {
                client
                    .clone()
                    .get_capacity(GetCapacityRequest {})
                    .await
                    .map(|r| r.into_inner().roots.len() == 1)
                    .unwrap_or(false)
            },
            T,
            "fast root dropped",
        )
        .await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "roots",
        "late",
        "hostvol-fast",
        "1Gi",
        Some("node-a"),
    ));
    let (_, _, message) = cluster
        .wait_event("roots", "late", "ProvisioningFailed", T)
        .await;
    assert!(message.contains("no data root \"fast\""), "{message}");
    assert_eq!(dirs_in(&fast).len(), 1, "the existing volume is untouched");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "roots");
    assert!(
        claims
            .get("quick")
            .await
            .unwrap()
            .spec
            .unwrap()
            .volume_name
            .is_some(),
        "still bound"
    );
    assert!(
        claims
            .get("late")
            .await
            .unwrap()
            .spec
            .unwrap()
            .volume_name
            .is_none()
    );
}

/// Issue 16 part 3: a class with `nodeAffinityKey` pins its volumes by a label, not by a hostname. A
/// node is lost (agent killed) and rebuilt under another name with the same label value and the
/// same disk, and the old Node is deleted: node-loss clean-up (on, for this class, with a 3 s grace) deletes nothing,
/// because a live node still carries the value; the rebuilt node's agent serves the volume, and the
/// replica is placed there again with the same claim. A node without the label gets a Warning
/// naming it when a claim of the class lands there anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_node_keeps_the_volumes_pinned_by_its_label() {
    const DISK: &str = "example.com/disk";
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.grant_node_loss_cleanup().await;
    let on: &[&str] = &["--node-loss-cleanup"];
    cluster.add_node_with_labels("old", &[(DISK, "d1")]).await;
    let mut old = cluster.start_agent("old", on).await;
    cluster.add_node("unlabelled").await;
    let unlabelled = cluster.start_agent("unlabelled", on).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-disk",
        "WaitForFirstConsumer",
        "Retain",
        &[
            ("nodeAffinityKey", DISK),
            ("nodeLossCleanup", "true"),
            ("nodeLossGracePeriod", "3s"),
        ],
    ));
    cluster.create_namespace("rebuild").await;
    cluster
        .wait_csi_storage_capacities(T, "the class on both nodes", |items| items.len() >= 2)
        .await;
    cluster.kubectl_apply_yaml(&statefulset_yaml("rebuild", "web", "hostvol-disk", "old"));
    let pod = cluster.wait_pod_running("rebuild", "web-0", T).await;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("old"));
    let claim = cluster.wait_pvc_bound("rebuild", "data-web-0", T).await;
    let pv_name = claim.spec.as_ref().unwrap().volume_name.clone().unwrap();
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let pv = pvs.get(&pv_name).await.unwrap();
    let pinned = serde_json::to_value(&pv.spec.as_ref().unwrap().node_affinity).unwrap();
    assert_eq!(
        pinned["required"]["nodeSelectorTerms"][0]["matchExpressions"][0],
        serde_json::json!({"key": DISK, "operator": "In", "values": ["d1"]}),
        "pinned by the label, not the hostname"
    );
    let dir = old.root.join(pv_dir_name(&pv));
    std::fs::write(dir.join("index.html"), "kept across the rebuild\n").unwrap();

    // The node is lost (its agent dies with it) and rebuilt under another name with the same disk
    // and label; then the old Node object goes, while the rebuilt one carries the value.
    old.kill();
    cluster
        .add_node_with_labels("rebuilt", &[(DISK, "d1")])
        .await;
    let rebuilt = cluster.start_agent_on_root("rebuilt", &old.root, on).await;
    cluster.kubectl_ok(&["delete", "node", "old"]);

    // The replica's pod is gone with its node (pod GC) and comes back on the rebuilt node, with the
    // same claim and volume.
    cluster
        .wait_for(
            || async {
                Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client(), "rebuild")
                    .get_opt("web-0")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.spec.and_then(|s| s.node_name))
                    .as_deref()
                    == Some("rebuilt")
            },
            Duration::from_secs(180),
            "web-0 scheduled on the rebuilt node",
        )
        .await;
    cluster.wait_pod_running("rebuild", "web-0", T).await;
    let client = connect(&rebuilt.grpc_tcp(), Duration::from_secs(5))
        .await
        .unwrap();
    cluster
        .wait_for(
            || async {
                client
                    .clone()
                    .list_volumes(common::grpc::ListVolumesRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().volumes.iter().any(|v| v.pv_name == pv_name))
            },
            T,
            "the rebuilt node's agent lists the volume",
        )
        .await;
    // Well past the grace period, with node-loss clean-up on: nothing was deleted.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "rebuild");
    let now = claims.get("data-web-0").await.unwrap();
    assert_eq!(now.uid(), claim.uid(), "the claim was kept");
    assert!(now.metadata.deletion_timestamp.is_none());
    assert!(
        pvs.get_opt(&pv_name).await.unwrap().is_some(),
        "the PV was kept"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("index.html")).unwrap(),
        "kept across the rebuild\n"
    );
    for agent in [&rebuilt, &unlabelled] {
        assert!(
            !agent.log().contains("deleted PV of a lost node"),
            "{}",
            agent.log()
        );
    }

    // A claim of the class on a node without the label: a Warning naming the label.
    cluster.kubectl_apply_yaml(&claim_yaml(
        "rebuild",
        "astray",
        "hostvol-disk",
        "1Mi",
        Some("unlabelled"),
    ));
    cluster
        .wait_for(
            || async {
                cluster
                    .pvc_events("rebuild", "astray")
                    .await
                    .iter()
                    .any(|(t, _, m)| t == "Warning" && m.contains("has no label example.com/disk"))
            },
            T,
            "a Warning naming the missing label",
        )
        .await;
}
