//! A guided tour of hostvol on a throwaway cluster of real nodes, in a few minutes.
//!
//! Starts a Kubernetes 1.20.2 cluster whose two nodes are real (kubelet + containerd each, in a
//! network namespace of their own: `scripts/real-cluster.sh`), installs hostvol as a user does
//! (`kubectl apply -k deploy/`, the image of `scripts/build-image.sh`), deploys the example
//! StatefulSet, writes a page into replica 0's volume with `kubectl exec`, reads it over HTTP, deletes
//! the pod and reads the same page from its successor. Everything is torn down at the end.
//!
//! Run it with `scripts/demo.sh` (installs and builds what it needs). `HOSTVOL_E2E_KEEP=1` keeps the
//! cluster directory (logs, the nodes' disks) afterwards.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AGENT_NAMESPACE, RealCluster, http};

const REPLICAS: usize = 3;
const STEPS: usize = 7;
const GREETING: &str = "Hello from nginx-statefulset-0";

fn main() {
    let t0 = Instant::now();
    println!("hostvol demo: node-local hostPath volumes, provisioned by an agent on each node");

    heading(1, "Start a Kubernetes 1.20.2 cluster with two real nodes");
    let rc = RealCluster::start(2);
    say(&format!(
        "etcd, the control plane, and per node a containerd and a kubelet, all in their own network \
         namespace; up in {:.0?} (cluster dir {}).",
        round_secs(rc.up_time),
        rc.dir().display()
    ));
    kubectl(&rc, &["get", "nodes", "-o", "wide"]);

    heading(2, "Install hostvol as users do: kubectl apply -k deploy/");
    say("(with the image tag of the archive scripts/build-image.sh made, imported into each node)");
    let ready = rc.install_hostvol();
    say(&format!(
        "The DaemonSet is Ready on every node after {:.0?}.",
        round_secs(ready)
    ));
    kubectl(
        &rc,
        &["-n", AGENT_NAMESPACE, "get", "daemonset,pods", "-o", "wide"],
    );
    kubectl(
        &rc,
        &[
            "annotate",
            "--overwrite",
            "storageclass",
            "hostvol",
            "storageclass.kubernetes.io/is-default-class=true",
        ],
    );
    kubectl(&rc, &["get", "storageclass"]);

    heading(
        3,
        "Deploy the example StatefulSet: 3 nginx replicas, one 1Gi claim each",
    );
    kubectl(&rc, &["apply", "-f", "deploy/examples/statefulset.yaml"]);
    let t_wait = Instant::now();
    rc.kubectl_ok(&[
        "rollout",
        "status",
        "statefulset/nginx-statefulset",
        "--timeout=300s",
    ]);
    say(&format!(
        "All {REPLICAS} pods Ready, each with its own volume, after {:.1?}.",
        t_wait.elapsed()
    ));
    kubectl(&rc, &["get", "pods", "-o", "wide"]);
    kubectl(&rc, &["get", "pvc,pv", "-o", "wide"]);
    say("Each volume is a hostPath directory, pinned to its node by node affinity:");
    kubectl(
        &rc,
        &[
            "get",
            "pv",
            "-o",
            "custom-columns=VOLUME:.metadata.name,CLAIM:.spec.claimRef.name,\
             NODE:.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0],\
             PATH:.spec.hostPath.path",
        ],
    );
    kubectl(&rc, &["describe", "pvc", &claim_name(0)]);

    heading(
        4,
        "The volumes on disk: one directory per claim, on its node only",
    );
    for node in rc.nodes() {
        if let Some(root) = &node.data_dir {
            println!(
                "  {} (its /mnt/data is {} on this machine):",
                node.name,
                root.display()
            );
            for line in tree(root) {
                println!("    {line}");
            }
        }
    }

    heading(
        5,
        "Write a page into replica 0's volume from inside the pod, and serve it",
    );
    let node0 = rc.kubectl_ok(&[
        "get",
        "pod",
        &pod_name(0),
        "-o",
        "jsonpath={.spec.nodeName}",
    ]);
    let pv0 = rc.kubectl_ok(&[
        "get",
        "pvc",
        &claim_name(0),
        "-o",
        "jsonpath={.spec.volumeName}",
    ]);
    kubectl(
        &rc,
        &[
            "exec",
            &pod_name(0),
            "--",
            "/bin/bash",
            "-c",
            &format!("echo \"{GREETING}\" > /usr/share/nginx/html/index.html"),
        ],
    );
    let page = fetch_page(&rc);
    print!("{}", indent(&page));

    heading(
        6,
        "Delete the pod: its successor comes back to the same node, volume and page",
    );
    let old_uid = rc.kubectl_ok(&["get", "pod", &pod_name(0), "-o", "jsonpath={.metadata.uid}"]);
    kubectl(&rc, &["delete", "pod", &pod_name(0)]);
    let t_back = Instant::now();
    let new_uid = loop {
        let uid = rc
            .kubectl(&["get", "pod", &pod_name(0), "-o", "jsonpath={.metadata.uid}"])
            .stdout;
        let uid = String::from_utf8_lossy(&uid).into_owned();
        if !uid.is_empty() && uid != old_uid {
            break uid;
        }
        assert!(
            t_back.elapsed() < Duration::from_secs(120),
            "pod 0 not re-created"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    rc.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("pod/{}", pod_name(0)),
        "--timeout=180s",
    ]);
    say(&format!(
        "The new pod is Ready after {:.1?}.",
        t_back.elapsed()
    ));
    kubectl(&rc, &["get", "pod", &pod_name(0), "-o", "wide"]);
    let new_node = rc.kubectl_ok(&[
        "get",
        "pod",
        &pod_name(0),
        "-o",
        "jsonpath={.spec.nodeName}",
    ]);
    let new_pv = rc.kubectl_ok(&[
        "get",
        "pvc",
        &claim_name(0),
        "-o",
        "jsonpath={.spec.volumeName}",
    ]);
    let again = fetch_page(&rc);
    print!("{}", indent(&again));
    check(new_uid != old_uid, "a new pod (new uid)");
    check(new_node == node0, &format!("on the same node ({node0})"));
    check(new_pv == pv0, &format!("with the same volume ({pv0})"));
    check(again.trim() == GREETING, "serving the same page");

    heading(
        7,
        "Ask the agents: kubectl hostvol (through the API server), then tear down",
    );
    hostvol(&rc, &["capacity"]);
    hostvol(&rc, &["volumes"]);
    say("Stopping the nodes and the control plane, removing the cluster...");
    drop(rc);
    say(&format!(
        "Done. The demo took {:.0?}.",
        round_secs(t0.elapsed())
    ));
}

/// `kubectl port-forward pod/nginx-statefulset-0 :80` and a GET of `/`, shown as the user's curl.
fn fetch_page(rc: &RealCluster) -> String {
    let forward = rc.port_forward(&format!("pod/{}", pod_name(0)), 80);
    shell(&format!(
        "kubectl port-forward pod/{} {}:80 &  curl http://{}/",
        pod_name(0),
        forward.local.port(),
        forward.local
    ));
    let (code, body) = rc
        .block_on(http::get(forward.local, "/"))
        .expect("GET / through the port-forward");
    check(code == 200, "HTTP 200 through the port-forward");
    body
}

/// Shows and runs `kubectl hostvol ARGS` (the same binary, as a kubectl plugin).
fn hostvol(rc: &RealCluster, args: &[&str]) {
    println!("\n  $ kubectl hostvol {}", args.join(" "));
    let ran = common::hostvol_as_person(args, rc.kubeconfig());
    print!("{}", indent(&ran.stdout));
    check(ran.ok(), "every agent answered");
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
fn kubectl(rc: &RealCluster, args: &[&str]) {
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
    print!("{}", indent(&rc.kubectl_ok(&abs)));
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
