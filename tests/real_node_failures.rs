//! When things go wrong on real nodes (issue 8): the kubelet refuses a volume whose directory is gone
//! and hostvol reports it; an agent pod deleted mid-burst is replaced and every claim ends Bound once;
//! a node going down hard (kubelet, containerd and every container) comes back with its pods' data.
//!
//! Each test starts its own cluster of real kubelets with hostvol installed from `deploy/`
//! (`common::RealCluster`). Needs root, `scripts/setup-real-nodes.sh` and `scripts/build-image.sh`
//! (scripts/test.sh runs both).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{AGENT_NAMESPACE, RealCluster, hostvol_as_person};

const T: &str = "--timeout=180s";

fn apply_json(rc: &RealCluster, name: &str, value: serde_json::Value) {
    let file = rc.dir().join(format!("{name}.json"));
    std::fs::write(&file, value.to_string()).unwrap();
    rc.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
}

fn claim_json(name: &str, class: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                 "resources": {"requests": {"storage": "64Mi"}}}})
}

/// A pod on `node` that keeps running with claim `claim` at /data.
fn sleeper_json(name: &str, node: &str, claim: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sleep", "100000"],
                                 "volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
                 "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}})
}

fn wait_until(
    what: &str,
    seconds: u64,
    rc: &RealCluster,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(seconds),
            "{what}: not after {seconds} s\n{}",
            rc.diag()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    t0.elapsed()
}

fn hostvol_cli(rc: &RealCluster, args: &[&str]) -> (bool, String) {
    let ran = hostvol_as_person(args, rc.kubeconfig());
    (ran.ok(), ran.output())
}

/// Scenario 3, what the kubelet checks: hostvol's PVs say `type: Directory`, so a pod whose volume
/// directory was removed on the node fails to start with the kubelet's own event instead of getting
/// an empty directory made in its place; `hostvol doctor` reports the volume as lost.
#[test]
fn a_removed_directory_is_refused_by_the_kubelet_and_reported_lost() {
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    apply_json(&rc, "claim", claim_json("doomed", "hostvol"));
    apply_json(&rc, "first", sleeper_json("first", &node, "doomed"));
    rc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/first", T]);
    let pv = rc.kubectl_ok(&["get", "pvc", "doomed", "-o", "jsonpath={.spec.volumeName}"]);
    rc.kubectl_ok(&[
        "delete",
        "pod",
        "first",
        "--grace-period=0",
        "--force",
        "--wait",
    ]);

    let dir = rc
        .node_data_ls(&node, "")
        .into_iter()
        .find(|d| d.starts_with(&pv))
        .expect("the volume's directory on the node");
    rc.node_data_remove(&node, &dir);
    apply_json(&rc, "second", sleeper_json("second", &node, "doomed"));
    let mut message = String::new();
    let took = wait_until("the kubelet's FailedMount event", 120, &rc, || {
        message = rc.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=second,reason=FailedMount",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        message.contains("hostPath type check failed")
    });
    println!(
        "[real] kubelet event after {:.1} s: {message}",
        took.as_secs_f64()
    );
    assert!(
        !rc.node_data_ls(&node, "").contains(&dir),
        "nothing may re-create {dir} in the volume's place"
    );
    let phase = rc.kubectl_ok(&["get", "pod", "second", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Pending", "the pod must not start without its data");

    let mut report = String::new();
    wait_until("hostvol doctor reports the lost volume", 60, &rc, || {
        report = hostvol_cli(&rc, &["doctor"]).1;
        report.contains(&pv)
    });
    println!("[real] hostvol doctor:\n{report}");
    assert!(report.to_lowercase().contains("lost"), "{report}");
}

/// Scenario 5, agent restarts: 30 claims of an Immediate class at once while every agent pod is
/// deleted; the DaemonSet brings new ones and each claim ends Bound exactly once (30 PVs, 30
/// directories). Then node 1 goes down hard and comes back: its pod runs again with its data.
#[test]
fn agents_and_nodes_come_back_and_nothing_is_made_twice() {
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    apply_json(
        &rc,
        "class",
        serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "hostvol-now"}, "provisioner": "hostpath.hostvol.io",
            "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"}),
    );
    let n = 30;
    let claims = serde_json::json!({"apiVersion": "v1", "kind": "List",
        "items": (0..n).map(|i| claim_json(&format!("burst-{i}"), "hostvol-now")).collect::<Vec<_>>()});
    let t0 = Instant::now();
    apply_json(&rc, "burst", claims);
    rc.kubectl_ok(&[
        "delete",
        "pods",
        "-n",
        AGENT_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=hostvol",
        "--wait=false",
    ]);
    let bound = || {
        rc.kubectl_ok(&[
            "get",
            "pvc",
            "-o",
            "jsonpath={range .items[?(@.status.phase==\"Bound\")]}{.spec.volumeName}{\"\\n\"}{end}",
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let took = wait_until("every claim Bound", 180, &rc, || bound().len() == n);
    rc.wait_hostvol_rolled_out();
    println!(
        "[real] {n} claims Bound {:.1} s after the burst, with every agent pod deleted at its start \
         (burst applied in {:.1} s)",
        took.as_secs_f64(),
        (t0.elapsed() - took).as_secs_f64()
    );
    let volumes: BTreeSet<String> = bound().into_iter().collect();
    assert_eq!(volumes.len(), n, "one volume per claim");
    let pvs = rc.kubectl_ok(&[
        "get",
        "pv",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    ]);
    assert_eq!(pvs.lines().filter(|l| !l.is_empty()).count(), n, "{pvs}");
    let dirs: Vec<String> = rc
        .nodes()
        .iter()
        .flat_map(|node| rc.node_data_ls(&node.name, ""))
        .filter(|d| d.starts_with("pvc-"))
        .collect();
    assert_eq!(dirs.len(), n, "one directory per claim: {dirs:?}");
    for pv in &volumes {
        assert_eq!(
            dirs.iter().filter(|d| d.starts_with(pv.as_str())).count(),
            1,
            "{pv} in {dirs:?}"
        );
    }

    // A pod with data on node 1; the node goes down hard and comes back.
    let node = rc.nodes()[0].name.clone();
    apply_json(&rc, "keeper-claim", claim_json("kept", "hostvol"));
    apply_json(&rc, "keeper", sleeper_json("keeper", &node, "kept"));
    rc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/keeper", T]);
    rc.kubectl_ok(&[
        "exec",
        "keeper",
        "--",
        "sh",
        "-c",
        "echo survived > /data/note",
    ]);
    let container = || {
        rc.kubectl_ok(&[
            "get",
            "pod",
            "keeper",
            "-o",
            "jsonpath={.status.containerStatuses[0].containerID}",
        ])
    };
    let before = container();
    let t = Instant::now();
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/real-cluster.sh"
    ))
    .args(["restart-node", rc.dir().to_str().unwrap(), "1"])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "restart-node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Until the new kubelet reports, the API still shows the old container: wait for a new one.
    wait_until("keeper running again in a new container", 180, &rc, || {
        let now = container();
        !now.is_empty() && now != before
    });
    rc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/keeper", T]);
    let back = t.elapsed();
    let note = rc.kubectl_ok(&["exec", "keeper", "--", "cat", "/data/note"]);
    assert_eq!(note.trim(), "survived");
    rc.wait_hostvol_rolled_out();
    let (ok, capacity) = hostvol_cli(&rc, &["capacity"]);
    assert!(ok && capacity.contains(&node), "{capacity}");
    println!(
        "[real] {node} down hard and back: pod running with its data after {:.1} s",
        back.as_secs_f64()
    );
}

/// Issue 16 part 3, a node rebuilt with its disk: the example StatefulSet on a class with
/// `nodeAffinityKey: example.com/disk` runs on node 1 (the only node carrying the label, so the only
/// one the class's capacity is published for); its page is written; node 1 is lost (kubelet and
/// containers stopped, Node object deleted) and comes back as another node, `node-1-rebuilt`, with the
/// same disk and label value. The replica is scheduled there with the same claim and volume and serves
/// the page; the rebuilt node's agent lists the volume; nothing was deleted in between.
#[test]
fn a_node_rebuilt_under_another_name_serves_its_volumes() {
    let rc = RealCluster::start(2);
    assert!(
        !rc.is_external(),
        "this scenario rebuilds a node with scripts/real-cluster.sh replace-node: run it on the \
         harness's own nodes (unset HOSTVOL_E2E_KUBECONFIG)"
    );
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    rc.kubectl_ok(&["label", "node", &node, "example.com/disk=d1"]);
    apply_json(
        &rc,
        "class",
        serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "hostvol-disk"}, "provisioner": "hostpath.hostvol.io",
            "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Retain",
            "parameters": {"nodeAffinityKey": "example.com/disk"}}),
    );
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/statefulset.yaml"
    ))
    .unwrap()
    .replace("replicas: 3", "replicas: 1")
    .replace(
        "storageClassName: hostvol",
        "storageClassName: hostvol-disk",
    );
    let file = rc.dir().join("statefulset.yaml");
    std::fs::write(&file, example).unwrap();
    rc.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    let pod = "nginx-statefulset-0";
    let claim = "nginx-storage-nginx-statefulset-0";
    rc.kubectl_ok(&["wait", "--for=condition=Ready", &format!("pod/{pod}"), T]);
    let on = || rc.kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(on(), node);
    rc.kubectl_ok(&[
        "exec",
        pod,
        "--",
        "sh",
        "-c",
        "echo 'kept across the rebuild' > /usr/share/nginx/html/index.html",
    ]);
    let identity = |kind: &str, name: &str| {
        rc.kubectl_ok(&["get", kind, name, "-o", "jsonpath={.metadata.uid}"])
    };
    let pv = rc.kubectl_ok(&["get", "pvc", claim, "-o", "jsonpath={.spec.volumeName}"]);
    let affinity = rc.kubectl_ok(&[
        "get",
        "pv",
        &pv,
        "-o",
        "jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0]}",
    ]);
    assert!(
        affinity.contains("example.com/disk") && affinity.contains("d1"),
        "{affinity}"
    );
    let (claim_uid, pv_uid) = (identity("pvc", claim), identity("pv", &pv));

    let t = Instant::now();
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/real-cluster.sh"
    ))
    .args([
        "replace-node",
        rc.dir().to_str().unwrap(),
        "1",
        "node-1-rebuilt",
        "example.com/disk=d1",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "replace-node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = t.elapsed();
    let moved = wait_until("the replica on the rebuilt node", 300, &rc, || {
        on() == "node-1-rebuilt"
    });
    rc.kubectl_ok(&["wait", "--for=condition=Ready", &format!("pod/{pod}"), T]);
    let serving = t.elapsed();
    let page = rc.kubectl_ok(&["exec", pod, "--", "cat", "/usr/share/nginx/html/index.html"]);
    assert_eq!(page.trim(), "kept across the rebuild");
    let (ok, page) = hostvol_cli(&rc, &["volumes"]);
    assert!(ok, "{page}");
    assert!(
        page.lines()
            .any(|l| l.starts_with("node-1-rebuilt") && l.contains(&pv)),
        "the rebuilt node's agent lists {pv}:\n{page}"
    );
    assert_eq!(identity("pvc", claim), claim_uid, "the same claim");
    assert_eq!(identity("pv", &pv), pv_uid, "the same PV");
    assert!(
        rc.node_data_ls(&node, "")
            .iter()
            .any(|d| d.starts_with(&pv)),
        "the directory is still on the disk"
    );
    println!(
        "[real] node 1 rebuilt as node-1-rebuilt in {:.1} s; replica scheduled there {:.1} s later, \
         serving its page {:.1} s after the rebuild started",
        up.as_secs_f64(),
        moved.as_secs_f64(),
        serving.as_secs_f64()
    );
}
