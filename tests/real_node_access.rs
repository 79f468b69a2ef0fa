//! Who may do what, on real nodes (issue 8): the node service is private to the agent's pod and
//! reached only through the API server; people on a laptop that reaches nothing but the API server use
//! `kubectl hostvol`; non-root pods write where the class's uid/gid/mode let them.
//!
//! Each test starts its own cluster of real kubelets with hostvol installed from `deploy/`
//! (`common::RealCluster`), or uses the cluster of `HOSTVOL_E2E_KUBECONFIG`.
//! Needs root, `scripts/setup-real-nodes.sh` and `scripts/build-image.sh` (scripts/test.sh runs both).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    AGENT_NAMESPACE, RealCluster, hostvol_as_person, metric_value, run_as_person, typed_class_yaml,
};

const T: &str = "--timeout=120s";

/// The IP of the agent pod on `node`.
fn agent_pod_ip(rc: &RealCluster, node: &str) -> String {
    rc.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        AGENT_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=hostvol",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])
}

/// Starts `script` with `sh -c` in a busybox pod on `node` (optionally mounting claim `claim` at
/// /data, with `security` as the pod's securityContext).
fn apply_pod(
    rc: &RealCluster,
    name: &str,
    node: &str,
    claim: Option<&str>,
    security: serde_json::Value,
    script: &str,
) {
    let mut spec = serde_json::json!({
        "nodeSelector": {"kubernetes.io/hostname": node}, "restartPolicy": "Never", "securityContext": security,
        "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sh", "-c", script]}],
    });
    if let Some(claim) = claim {
        spec["containers"][0]["volumeMounts"] =
            serde_json::json!([{"name": "v", "mountPath": "/data"}]);
        spec["volumes"] =
            serde_json::json!([{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]);
    }
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec});
    let file = rc.dir().join(format!("{name}.json"));
    std::fs::write(&file, pod.to_string()).unwrap();
    rc.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
}

/// `apply_pod`, then waits until the pod ends; returns (succeeded, logs).
fn run_pod(
    rc: &RealCluster,
    name: &str,
    node: &str,
    claim: Option<&str>,
    security: serde_json::Value,
    script: &str,
) -> (bool, String) {
    apply_pod(rc, name, node, claim, security, script);
    let deadline = Instant::now() + Duration::from_secs(120);
    let phase = loop {
        let phase = rc.kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.status.phase}"]);
        if phase == "Succeeded" || phase == "Failed" {
            break phase;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} still {phase:?} after 120 s\n{}\n{}",
            rc.kubectl_ok(&["describe", "pod", name]),
            rc.diag()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let logs = rc.kubectl_ok(&["logs", name]);
    (phase == "Succeeded", logs)
}

/// A claim of `class` (1Gi) in namespace default.
fn claim(rc: &RealCluster, name: &str, class: &str) {
    let file = rc.dir().join(format!("claim-{name}.json"));
    std::fs::write(
        &file,
        serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        .to_string(),
    )
    .unwrap();
    rc.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
}

/// The node service answers only inside the agent's pod: another pod gets "connection refused"
/// on the agent pod's gRPC port while the same pod reaches its HTTP port (so the network path is
/// there and only the node service is closed); people reach it through the API server.
#[test]
fn the_node_service_is_private_to_the_agent_pod() {
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    let ip = agent_pod_ip(&rc, &node);
    let (ok, logs) = run_pod(
        &rc,
        "snoop",
        &node,
        None,
        serde_json::json!({}),
        &format!(
            "timeout 5 wget -q -O- http://{ip}:9808/readyz && echo HTTP-OK; \
             timeout 5 wget -q -O- http://{ip}:9809/ 2>&1; echo GRPC-EXIT=$?"
        ),
    );
    assert!(ok, "{logs}");
    assert!(
        logs.contains("HTTP-OK"),
        "/readyz reachable from a pod: {logs}"
    );
    assert!(
        logs.contains("refused") && !logs.contains("GRPC-EXIT=0"),
        "the node service must refuse other pods: {logs}"
    );
    println!("[real] another pod: {ip}:9808/readyz answers, {ip}:9809 refused");

    // `kubectl logs` is not a terminal: no colour codes in the agent's log.
    let logs = rc.agent_logs();
    assert!(
        logs.contains("watches synced") && !logs.contains('\x1b'),
        "plain agent logs: {logs}"
    );

    // Through the API server (port-forward), as the admin.
    let t = Instant::now();
    let ran = hostvol_as_person(&["capacity"], rc.kubeconfig());
    let stdout = &ran.stdout;
    assert!(ran.ok(), "{}", ran.output());
    for n in rc.nodes() {
        assert!(stdout.contains(&n.name), "{} in {stdout}", n.name);
    }
    println!(
        "[real] `hostvol capacity` through port-forwards: {:.2} s for {} agents",
        t.elapsed().as_secs_f64(),
        rc.nodes().len()
    );
}

/// A laptop: a network namespace whose only route is to the API server, deleted when dropped.
struct Laptop {
    netns: String,
}

impl Laptop {
    /// Joins a new namespace to the cluster's (the calling thread is in it) with a veth pair, and
    /// routes only the API server's address through it.
    fn attach(rc: &RealCluster) -> Laptop {
        // `real-cluster.sh up` writes API_SERVER=https://IP:PORT into the cluster's env file.
        let env = std::fs::read_to_string(rc.dir().join("env")).expect("cluster env file");
        let api_ip = env
            .lines()
            .find_map(|l| l.strip_prefix("API_SERVER=https://"))
            .and_then(|hp| hp.split(':').next())
            .expect("API_SERVER in the cluster's env file")
            .to_string();
        let id = std::process::id() % 100_000;
        let laptop = Laptop {
            netns: format!("hostvol-laptop-{id}"),
        };
        let (outer, inner) = (format!("hvl{id}a"), format!("hvl{id}b"));
        let sh = |args: &str| {
            let st = Command::new("sh").args(["-c", args]).status().unwrap();
            assert!(st.success(), "{args}");
        };
        sh(&format!("ip netns add {}", laptop.netns));
        // Created in the cluster's namespace (this thread's), one end moved to the laptop's.
        sh(&format!("ip link add {outer} type veth peer name {inner}"));
        sh(&format!("ip link set {inner} netns {}", laptop.netns));
        sh(&format!(
            "ip addr add 192.168.77.1/30 dev {outer} && ip link set {outer} up"
        ));
        let n = &laptop.netns;
        sh(&format!(
            "ip -n {n} link set lo up && ip -n {n} addr add 192.168.77.2/30 dev {inner} && \
             ip -n {n} link set {inner} up && ip -n {n} route add {api_ip}/32 via 192.168.77.1"
        ));
        laptop
    }

    fn run(&self, program: &str, args: &[&str], kubeconfig: &std::path::Path) -> (bool, String) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program])
            .args(args)
            .env_remove("HOSTVOL_VIA");
        let ran = run_as_person(cmd, kubeconfig);
        (ran.ok(), ran.output())
    }
}

impl Drop for Laptop {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

fn run_here(program: &str, args: &[&str], kubeconfig: &std::path::Path) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).env_remove("HOSTVOL_VIA");
    let ran = run_as_person(cmd, kubeconfig);
    (ran.ok(), ran.output())
}

/// Scenario 6, from a laptop: capacity, volumes, doctor and purge work from a namespace that reaches
/// only the API server (no route to pod IPs).
#[test]
fn kubectl_hostvol_from_a_laptop() {
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    claim(&rc, "notes", "hostvol");
    let (ok, logs) = run_pod(
        &rc,
        "writer",
        &node,
        Some("notes"),
        serde_json::json!({}),
        "echo kept > /data/note",
    );
    assert!(ok, "{logs}");
    let pv = rc.kubectl_ok(&["get", "pvc", "notes", "-o", "jsonpath={.spec.volumeName}"]);
    // On an external cluster this machine is the laptop; ours gets a namespace of its own.
    let laptop = (!rc.is_external()).then(|| Laptop::attach(&rc));
    let kubeconfig = rc.kubeconfig();
    let run = |program: &str, args: &[&str]| match &laptop {
        Some(laptop) => laptop.run(program, args, kubeconfig),
        None => run_here(program, args, kubeconfig),
    };

    if let Some(laptop) = &laptop {
        // The laptop cannot reach pods, only the API server.
        let ip = agent_pod_ip(&rc, &node);
        let (reached, why) = laptop.run(
            "timeout",
            &["3", "bash", "-c", &format!("</dev/tcp/{ip}/9808")],
            kubeconfig,
        );
        assert!(!reached, "the laptop must not reach pod {ip}: {why}");
    }

    let t = Instant::now();
    let (ok, out) = run("kubectl", &["hostvol", "capacity"]);
    assert!(ok, "{out}");
    for n in rc.nodes() {
        assert!(out.contains(&n.name), "{out}");
    }
    println!(
        "[real] laptop: kubectl hostvol capacity in {:.2} s\n{out}",
        t.elapsed().as_secs_f64()
    );
    let (ok, out) = run("kubectl", &["hostvol", "volumes"]);
    assert!(ok && out.contains("default/notes"), "{out}");
    let (ok, out) = run("kubectl", &["hostvol", "doctor"]);
    assert!(ok, "{out}");

    // Retain keeps the volume after its claim; purge removes it for good, from the laptop.
    rc.kubectl_ok(&["delete", "pod", "writer", "--wait"]);
    rc.kubectl_ok(&["delete", "pvc", "notes", "--wait"]);
    rc.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Released",
        &format!("pv/{pv}"),
        T,
    ]);
    let (ok, out) = run("kubectl", &["hostvol", "volumes", "--released"]);
    assert!(ok && out.contains(&pv), "{out}");
    let (ok, out) = run("kubectl", &["hostvol", "purge", &pv, "--yes"]);
    assert!(ok && out.contains("purged"), "{out}");
    let left = rc.node_data_ls(&node, "");
    assert!(
        !left.iter().any(|d| d.starts_with(&pv)),
        "purged directory gone from {node}: {left:?}"
    );
}

/// Scenario 4, permissions for non-root pods. A class with uid/gid/mode gives its directories to
/// that owner: a pod running as that uid writes; a pod of another uid cannot; a pod of another uid
/// whose fsGroup is the class's gid writes through the group bits, because for hostPath volumes the
/// kubelet only adds fsGroup to the container's groups and never chowns or chmods the directory. The
/// default class (mode 0777) lets any uid write.
#[test]
fn non_root_pods_write_where_the_class_lets_them() {
    let rc = RealCluster::start(2);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    let class = rc.dir().join("team-class.yaml");
    std::fs::write(
        &class,
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: hostvol-team\n\
         provisioner: hostpath.hostvol.io\nvolumeBindingMode: WaitForFirstConsumer\n\
         reclaimPolicy: Delete\nparameters:\n  uid: \"1000\"\n  gid: \"1000\"\n  mode: \"0770\"\n",
    )
    .unwrap();
    rc.kubectl_ok(&["apply", "-f", class.to_str().unwrap()]);
    claim(&rc, "team", "hostvol-team");
    claim(&rc, "anyone", "hostvol");
    let write = "id; echo hi > /data/$(id -u) && echo WROTE; ls -ln /data";
    let cases = [
        (
            "owner",
            "team",
            serde_json::json!({"runAsUser": 1000, "runAsGroup": 1000}),
            true,
        ),
        (
            "stranger",
            "team",
            serde_json::json!({"runAsUser": 2000, "runAsGroup": 2000}),
            false,
        ),
        (
            "fsgroup",
            "team",
            serde_json::json!({"runAsUser": 3000, "runAsGroup": 3000, "fsGroup": 1000}),
            true,
        ),
        (
            "any-uid",
            "anyone",
            serde_json::json!({"runAsUser": 4000, "runAsGroup": 4000}),
            true,
        ),
    ];
    for (pod, claim, security, may_write) in cases {
        let (_, logs) = run_pod(&rc, pod, &node, Some(claim), security, write);
        println!("[real] {pod} on claim {claim}:\n{logs}");
        assert_eq!(
            logs.contains("WROTE"),
            may_write,
            "{pod} {} write to {claim}: {logs}",
            if may_write { "must" } else { "must not" }
        );
        if !may_write {
            assert!(logs.contains("Permission denied"), "{logs}");
        }
        rc.kubectl_ok(&["delete", "pod", pod, "--wait"]);
    }
    // fsGroup did not change the directory: still 1000:1000, mode 0770.
    let pv = rc.kubectl_ok(&["get", "pvc", "team", "-o", "jsonpath={.spec.volumeName}"]);
    if let Some(root) = rc.node(&node).data_dir.clone() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&pv))
            .expect("team volume directory")
            .path();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1000, 1000, 0o770),
            "{}",
            dir.display()
        );
    }
}

/// One sample of the kubelet's `/metrics` on `node`, read through the API server's node proxy as
/// the test's admin (the agent's RBAC is not involved): `kubelet_volume_stats_<stat>` of claim
/// default/`claim`, if the kubelet reports it.
fn kubelet_volume_stat(rc: &RealCluster, node: &str, stat: &str, claim: &str) -> Option<f64> {
    let metrics = rc.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{node}/proxy/metrics"),
    ]);
    metric_value(
        &metrics,
        &format!("kubelet_volume_stats_{stat}"),
        &[("namespace", "default"), ("persistentvolumeclaim", claim)],
    )
}

/// Issue 16, volumeType local: the same pod (uid 3000, fsGroup 1000) on a fresh `local` volume and
/// on a `hostPath` volume of the default class. On `local` the kubelet gives the volume to group
/// 1000 (setgid directory), so the pod's files carry group 1000, and it reports
/// `kubelet_volume_stats_*` for the claim, whose used bytes grow after the pod writes 20 MiB. On
/// `hostPath` the files carry the pod's own group 3000 and the kubelet reports no figures at all.
#[test]
fn local_volumes_get_fs_group_ownership_and_kubelet_volume_stats() {
    const MIB: f64 = 1024.0 * 1024.0;
    // Without quotas the kubelet's figures are the filesystem's (statfs): on the machine's shared disk,
    // whatever else runs (the rest of the suite) moves them by more than 20 MiB either way. The node's
    // data root is a tmpfs of its own, so they move with what the pod writes.
    let rc = RealCluster::start_with_data_tmpfs(1, "4G");
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    let class = rc.dir().join("local-class.yaml");
    std::fs::write(
        &class,
        typed_class_yaml(
            "hostvol-local",
            "WaitForFirstConsumer",
            "Delete",
            "local",
            &[],
        ),
    )
    .unwrap();
    rc.kubectl_ok(&["apply", "-f", class.to_str().unwrap()]);
    let security = serde_json::json!({"runAsUser": 3000, "runAsGroup": 3000, "fsGroup": 1000});
    // (claim, class, group of the pod's files)
    let cases = [
        ("local", "hostvol-local", "1000"),
        ("plain", "hostvol", "3000"),
    ];
    for (claim_name, class, _) in cases {
        claim(&rc, claim_name, class);
        apply_pod(
            &rc,
            claim_name,
            &node,
            Some(claim_name),
            security.clone(),
            "sleep 3600",
        );
    }
    for (claim_name, _, group) in cases {
        rc.kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{claim_name}"),
            T,
        ]);
        let pv = rc.kubectl_ok(&[
            "get",
            "pvc",
            claim_name,
            "-o",
            "jsonpath={.spec.volumeName}",
        ]);
        let source = rc.kubectl_ok(&["get", "pv", &pv, "-o", "jsonpath={.spec}"]);
        let out = rc.kubectl_ok(&[
            "exec", claim_name, "--", "sh", "-c",
            "id; echo hi > /data/file; stat -c 'file %u:%g' /data/file; stat -c 'dir %u:%g %a' /data",
        ]);
        println!("[real] pod uid 3000 fsGroup 1000 on claim {claim_name} ({source}):\n{out}");
        assert!(
            out.contains(&format!("file 3000:{group}")),
            "{claim_name}: {out}"
        );
    }
    // The kubelet computes volume figures every minute (volumeStatsAggPeriod), per pod.
    let wait_stat = |what: &str, ok: &dyn Fn(f64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Some(value) =
                kubelet_volume_stat(&rc, &node, "used_bytes", "local").filter(|v| ok(*v))
            {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "kubelet_volume_stats_used_bytes of claim local: {what} after 240 s"
            );
            std::thread::sleep(Duration::from_secs(5));
        }
    };
    let t = Instant::now();
    let before = wait_stat("never reported", &|_| true);
    let capacity = kubelet_volume_stat(&rc, &node, "capacity_bytes", "local")
        .expect("kubelet_volume_stats_capacity_bytes of claim local");
    println!(
        "[real] claim local: used {before} bytes, capacity {capacity} bytes, first reported {:.0} s after the pod was Ready",
        t.elapsed().as_secs_f64()
    );
    assert!(
        capacity >= before && capacity > 0.0,
        "capacity {capacity}, used {before}"
    );
    assert_eq!(
        kubelet_volume_stat(&rc, &node, "used_bytes", "plain"),
        None,
        "the kubelet reports no figures for hostPath volumes"
    );
    rc.kubectl_ok(&[
        "exec",
        "local",
        "--",
        "sh",
        "-c",
        "dd if=/dev/urandom of=/data/blob bs=1048576 count=20 && sync",
    ]);
    let t = Instant::now();
    let after = wait_stat("not 20 MiB more", &|v| v - before >= 20.0 * MIB);
    println!(
        "[real] claim local after writing 20 MiB: used {after} bytes (+{:.1} MiB), seen {:.0} s after the write",
        (after - before) / MIB,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(kubelet_volume_stat(&rc, &node, "used_bytes", "plain"), None);
}

/// `directoryPattern` (issue 16 part 2) on a real kubelet: a pod of a `{namespace}/{claim}` class
/// writes into its volume and the file is at `/mnt/data/<namespace>/<claim>/` on the node; Delete of
/// one of two sibling claims removes that directory only, the other and the shared parent stay.
#[test]
fn a_patterned_class_mounts_the_readable_directory() {
    let rc = RealCluster::start(1);
    rc.install_hostvol();
    let node = rc.nodes()[0].name.clone();
    let class = rc.dir().join("readable-class.yaml");
    std::fs::write(
        &class,
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: hostvol-readable\n\
         provisioner: hostpath.hostvol.io\nvolumeBindingMode: WaitForFirstConsumer\n\
         reclaimPolicy: Delete\nparameters:\n  directoryPattern: \"{namespace}/{claim}\"\n",
    )
    .unwrap();
    rc.kubectl_ok(&["apply", "-f", class.to_str().unwrap()]);
    for name in ["web", "db"] {
        claim(&rc, name, "hostvol-readable");
        let script = format!("echo {name}-data > /data/file && echo WROTE");
        let (ok, logs) = run_pod(
            &rc,
            &format!("writer-{name}"),
            &node,
            Some(name),
            serde_json::json!({}),
            &script,
        );
        assert!(ok && logs.contains("WROTE"), "{logs}");
        rc.kubectl_ok(&["delete", "pod", &format!("writer-{name}"), "--wait"]);
        assert_eq!(
            rc.node_data_read(&node, &format!("default/{name}/file"))
                .as_deref(),
            Some(format!("{name}-data\n").as_str()),
            "the pod's file is in /mnt/data/default/{name} on the node"
        );
    }
    println!(
        "[real] {{namespace}}/{{claim}}: pods wrote /mnt/data/default/web/file and /mnt/data/default/db/file"
    );
    rc.kubectl_ok(&["delete", "pvc", "web", "--wait", T]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while rc.node_data_ls(&node, "default") != ["db"] {
        assert!(
            Instant::now() < deadline,
            "after deleting claim web, /mnt/data/default holds {:?}, wanted [\"db\"]\n{}",
            rc.node_data_ls(&node, "default"),
            rc.diag()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        rc.node_data_read(&node, "default/db/file").as_deref(),
        Some("db-data\n"),
        "the sibling is untouched"
    );
}
