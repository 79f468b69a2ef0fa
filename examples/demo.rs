//! A guided tour of hostvol on a throwaway local cluster, in about a minute.
//!
//! Starts a real Kubernetes 1.20.2 control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) with two nodes, `node-a` and `node-b`, each served by a real `hostvol agent`
//! process, deploys the example StatefulSet and shows what hostvol did: the claims, the volumes,
//! their Events, the directories on each node, and a pod coming back to its data after a restart.
//! Everything is torn down at the end.
//!
//! Run it with `scripts/demo.sh` (installs the control-plane binaries, builds the agent), or, once
//! those are in place: `cargo build --bin hostvol && cargo run --example demo`.
//! `HOSTVOL_E2E_KEEP=1` keeps the cluster directory (logs, data roots) afterwards.
//!
//! The nodes have no kubelet and no container runtime: the test harness's fake kubelet marks pods
//! that the scheduler bound to them as Running. The volumes themselves are real directories.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Agent, Cluster};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::Api;

const NS: &str = "default";
const NODES: [&str; 2] = ["node-a", "node-b"];
const REPLICAS: usize = 3;
const STEPS: usize = 6;
const T: Duration = Duration::from_secs(90);
const GREETING: &str = "Hello from nginx-statefulset-0\n";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let t0 = Instant::now();
    println!("hostvol demo: node-local hostPath volumes, provisioned by an agent on each node");

    // 1. Control plane, nodes, agents.
    heading(
        1,
        "Start a local Kubernetes 1.20.2 control plane with two nodes",
    );
    let cluster = Cluster::start().await;
    for node in NODES {
        cluster.add_node(node).await;
    }
    let mut agents: Vec<Agent> = Vec::new();
    for node in NODES {
        agents.push(cluster.start_agent(node, &[]).await);
    }
    say(&format!(
        "etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as local processes \
         (cluster dir {}).",
        cluster.dir().display()
    ));
    say("The nodes have no kubelet: a stand-in marks pods scheduled to them as Running.");
    for a in &agents {
        say(&format!(
            "`hostvol agent --node-name {}` serves {}, data root {}",
            a.node,
            a.node,
            a.root.display()
        ));
    }
    say("kubectl below talks to this cluster (admin kubeconfig in the cluster dir).");
    kubectl(&cluster, &["get", "nodes"]);

    // 2. StorageClass.
    heading(2, "Install the StorageClass and make it the default");
    kubectl(&cluster, &["apply", "-f", "deploy/storageclass.yaml"]);
    kubectl(
        &cluster,
        &[
            "annotate",
            "--overwrite",
            "storageclass",
            "hostvol",
            "storageclass.kubernetes.io/is-default-class=true",
        ],
    );
    kubectl(&cluster, &["get", "storageclass"]);

    // 3. The example StatefulSet.
    heading(
        3,
        "Deploy the example StatefulSet: 3 nginx replicas, one 1Gi claim each",
    );
    // 1.20 admits pods only once the namespace's default ServiceAccount has its token secret.
    cluster.create_namespace(NS).await;
    kubectl(
        &cluster,
        &["apply", "-f", "deploy/examples/statefulset.yaml"],
    );
    let t_wait = Instant::now();
    say(
        "Waiting for the claims to be Bound and the pods Running (the StatefulSet starts them one by one)...",
    );
    for i in 0..REPLICAS {
        cluster.wait_pvc_bound(NS, &claim_name(i), T).await;
        cluster.wait_pod_running(NS, &pod_name(i), T).await;
    }
    say(&format!(
        "All {REPLICAS} claims Bound and pods Running after {:.1?}.",
        t_wait.elapsed()
    ));
    kubectl(&cluster, &["get", "pods", "-o", "wide"]);
    say(
        "Each claim got its own PersistentVolume, made by the agent of the node its pod was scheduled to:",
    );
    kubectl(&cluster, &["get", "pvc,pv", "-o", "wide"]);
    say("Each volume is a hostPath directory, pinned to its node by node affinity:");
    kubectl(
        &cluster,
        &[
            "get",
            "pv",
            "-o",
            "custom-columns=VOLUME:.metadata.name,CLAIM:.spec.claimRef.name,\
             NODE:.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0],\
             PATH:.spec.hostPath.path",
        ],
    );
    say(
        "The claim's Events tell the story: the scheduler picked a node, that node's agent provisioned it.",
    );
    kubectl(&cluster, &["describe", "pvc", &claim_name(0)]);

    // 4. Directories on disk.
    heading(
        4,
        "The volumes on disk: one directory per claim, on its node only",
    );
    for a in &agents {
        println!("  {} (data root {}):", a.node, a.root.display());
        for line in tree(&a.root) {
            println!("    {line}");
        }
    }

    // 5. Pod 0 restarts and finds its data.
    heading(
        5,
        "Pod 0 writes a file, is deleted, and comes back to the same volume",
    );
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), NS);
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let pod0 = pods.get(&pod_name(0)).await.expect("get pod 0");
    let node0 = pod0
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("pod 0 is scheduled");
    let pv0 = claims
        .get(&claim_name(0))
        .await
        .expect("get claim 0")
        .spec
        .and_then(|s| s.volume_name)
        .expect("claim 0 is bound");
    let dir0 = PathBuf::from(
        pvs.get(&pv0)
            .await
            .expect("get volume 0")
            .spec
            .and_then(|s| s.host_path)
            .expect("a hostPath volume")
            .path,
    );
    let pv_count = pvs
        .list(&Default::default())
        .await
        .expect("list volumes")
        .items
        .len();
    say(&format!(
        "{} runs on {node0}; its volume {pv0} is the directory {}.",
        pod_name(0),
        dir0.display()
    ));
    say(
        "With no container runtime here, write the file straight into that directory, as nginx would",
    );
    say("into /usr/share/nginx/html inside the pod:");
    let file = dir0.join("index.html");
    std::fs::write(&file, GREETING).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    shell(&format!(
        "echo '{}' > {}",
        GREETING.trim_end(),
        file.display()
    ));

    let old_uid = pod0.uid().unwrap_or_default();
    kubectl(&cluster, &["delete", "pod", &pod_name(0)]);
    say(
        "The StatefulSet controller re-creates it; the scheduler must put it where its volume lives...",
    );
    cluster
        .wait_for(
            || async {
                matches!(pods.get_opt(&pod_name(0)).await, Ok(Some(p)) if p.uid().unwrap_or_default() != old_uid)
            },
            T,
            "pod 0 to be re-created",
        )
        .await;
    let new_pod = cluster.wait_pod_running(NS, &pod_name(0), T).await;
    kubectl(&cluster, &["get", "pod", &pod_name(0), "-o", "wide"]);
    kubectl(&cluster, &["get", "pvc", &claim_name(0)]);
    shell(&format!("cat {}", file.display()));
    let content =
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    print!("{}", indent(&content));

    let new_node = new_pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let new_claim = new_pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == "nginx-storage"))
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .unwrap_or_default();
    let new_pv = claims
        .get(&claim_name(0))
        .await
        .ok()
        .and_then(|c| c.spec)
        .and_then(|s| s.volume_name);
    let new_pv_count = pvs
        .list(&Default::default())
        .await
        .expect("list volumes")
        .items
        .len();
    check(
        new_pod.uid().unwrap_or_default() != old_uid,
        "a new pod (new uid)",
    );
    check(new_node == node0, &format!("on the same node ({node0})"));
    check(
        new_claim == claim_name(0),
        &format!("with the same claim ({})", claim_name(0)),
    );
    check(
        new_pv.as_deref() == Some(pv0.as_str()) && new_pv_count == pv_count,
        &format!("and the same volume ({pv0}), no new one"),
    );
    check(content == GREETING, "and the file intact");

    // 6. Teardown.
    heading(6, "Tear down");
    say("Stopping the agents and the control plane, removing the cluster dir...");
    drop(agents);
    drop(cluster);
    say(&format!(
        "Done. The demo took {:.0?}.",
        round_secs(t0.elapsed())
    ));
}

fn claim_name(i: usize) -> String {
    format!("nginx-storage-nginx-statefulset-{i}")
}

fn pod_name(i: usize) -> String {
    format!("nginx-statefulset-{i}")
}

fn heading(n: usize, title: &str) {
    let line = format!("── {n}/{STEPS}  {title} ");
    let width = line.chars().count();
    println!("\n{line}{}", "─".repeat(100usize.saturating_sub(width)));
}

fn say(text: &str) {
    println!("  {text}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Shows the command (as a user would type it, without the kubeconfig), runs it, prints its output.
fn kubectl(cluster: &Cluster, args: &[&str]) {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            let plain = a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./,=:".contains(c));
            if plain {
                a.to_string()
            } else {
                format!("'{a}'")
            }
        })
        .collect();
    println!("\n  $ kubectl {}", shown.join(" "));
    // Manifest paths are relative to the repository root, like the commands shown.
    let abs: Vec<String> = args
        .iter()
        .map(|a| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(a);
            if a.starts_with("deploy/") && p.exists() {
                p.display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let abs: Vec<&str> = abs.iter().map(String::as_str).collect();
    print!("{}", indent(&cluster.kubectl_ok(&abs)));
}

/// Shows a shell command the demo performs itself.
fn shell(cmd: &str) {
    println!("\n  $ {cmd}");
}

fn check(ok: bool, what: &str) {
    if ok {
        println!("  ✔ {what}");
    } else {
        panic!("demo check failed: {what}");
    }
}

/// `tree`-style listing of `root` (directories end in `/`, files show their size).
fn tree(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| e.file_name());
        let n = entries.len();
        for (i, e) in entries.into_iter().enumerate() {
            let last = i + 1 == n;
            let name = e.file_name().to_string_lossy().into_owned();
            let branch = if last { "└── " } else { "├── " };
            let path = e.path();
            if path.is_dir() {
                out.push(format!("{prefix}{branch}{name}/"));
                walk(
                    &path,
                    &format!("{prefix}{}", if last { "    " } else { "│   " }),
                    out,
                );
            } else {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(format!("{prefix}{branch}{name} ({size} bytes)"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, "", &mut out);
    if out.is_empty() {
        out.push("(empty)".into());
    }
    out
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().round() as u64)
}
