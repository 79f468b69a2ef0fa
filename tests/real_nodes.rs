//! Scenarios on real nodes (issue 8): real kubelets and containerd, hostvol installed from `deploy/` with
//! the image of `scripts/build-image.sh`, as a user runs it. Each test starts its own cluster
//! (`common::RealCluster`; two side by side fit these 2-core machines) or uses the cluster of
//! `HOSTVOL_E2E_KUBECONFIG`, and prints the figures it observed.
//!
//! Needs root, `scripts/setup-real-nodes.sh` and `scripts/build-image.sh` (scripts/test.sh runs both).

mod common;

use common::{AGENT_NAMESPACE, RealCluster, http, pv_volume_type, wait_for};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const WALKTHROUGH: &str = "deploy/examples/walkthrough";

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn is_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.conditions
                .as_ref()
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Scenario 1, Install: the DaemonSet Ready on every node, each agent publishing its node's capacity,
/// /readyz and /metrics answering on each agent pod's own address.
#[test]
fn install() {
    let t_test = Instant::now();
    let rc = RealCluster::start(2);
    rc.block_on(async {
        let ds_ready = rc.install_hostvol();
        let client = rc.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
        let agents = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=hostvol"))
            .await
            .unwrap()
            .items;
        let mut on: Vec<String> = agents.iter().filter(|p| is_ready(p)).map(node_of).collect();
        on.sort();
        let mut want: Vec<String> = rc.nodes().iter().map(|n| n.name.clone()).collect();
        want.sort();
        assert_eq!(on, want, "one Ready agent pod per node\n{}", rc.diag());

        // CSIStorageCapacity (storage.k8s.io/v1alpha1 on 1.20): one per node for class hostvol.
        let t = Instant::now();
        let caps: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            AGENT_NAMESPACE,
            &kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
                "storage.k8s.io",
                "v1alpha1",
                "CSIStorageCapacity",
            )),
        );
        let published = |items: &[DynamicObject], node: &str| {
            items.iter().any(|c| {
                c.data["storageClassName"] == "hostvol"
                    && c.data["nodeTopology"]["matchLabels"]["kubernetes.io/hostname"] == node
                    && c.data["capacity"].is_string()
            })
        };
        wait_for(
            || async {
                let items = caps
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default();
                rc.nodes().iter().all(|n| published(&items, &n.name))
            },
            Duration::from_secs(60),
            "a CSIStorageCapacity of class hostvol for every node",
        )
        .await;
        let t_caps = t.elapsed();
        for c in caps.list(&ListParams::default()).await.unwrap().items {
            eprintln!(
                "[real] CSIStorageCapacity {}: node {} capacity {}",
                c.name_any(),
                c.data["nodeTopology"]["matchLabels"]["kubernetes.io/hostname"],
                c.data["capacity"]
            );
        }

        // The kubelet's probes and Prometheus reach the agent on its pod IP, port 9808; people reach
        // it through the API server's pod proxy. (An external cluster's pod IPs are not routed here.)
        for p in &agents {
            let (node, name) = (node_of(p), p.name_any());
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
            let addr: SocketAddr = format!("{ip}:9808").parse().unwrap();
            let mut answers = vec![("proxy", proxy_get(&rc, &name, "/readyz"), proxy_get(&rc, &name, "/metrics"))];
            if !rc.is_external() {
                let get = |path| async move {
                    http::get(addr, path)
                        .await
                        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
                };
                answers.push(("pod IP", get("/readyz").await, get("/metrics").await));
            }
            for (how, (code, body), (mcode, metrics)) in answers {
                assert_eq!(code, 200, "GET /readyz by {how} of {name} on {node} ({addr}): {body}");
                assert_eq!(mcode, 200, "GET /metrics by {how} of {name} on {node} ({addr})");
                assert!(
                    metrics.lines().any(|l| l.starts_with("hostvol_")),
                    "no hostvol_ metrics by {how} from {name} on {node}:\n{metrics}"
                );
                eprintln!(
                    "[real] agent {name} on {node} ({addr}) by {how}: /readyz {code} {:?}, /metrics {} samples",
                    body.trim(),
                    metrics.lines().filter(|l| !l.starts_with('#')).count(),
                );
            }
        }
        // Least privilege: the shipped base cannot delete claims (only the node-loss component can).
        let sa = format!("--as=system:serviceaccount:{AGENT_NAMESPACE}:hostvol");
        let can = rc.kubectl(&["auth", "can-i", &sa, "delete", "persistentvolumeclaims", "--all-namespaces"]);
        assert!(
            !can.status.success(),
            "the base RBAC lets the agents delete claims: {}",
            String::from_utf8_lossy(&can.stdout)
        );
        eprintln!(
            "[real] figures: cluster up {}, DaemonSet Ready {} after apply, capacity published {} after that",
            secs(rc.up_time),
            secs(ds_ready),
            secs(t_caps)
        );
    });
    drop(rc);
    eprintln!("[real] install: {} in all", secs(t_test.elapsed()));
}

/// Scenario 2, the seed walkthrough verbatim: its three manifests applied unchanged with hostvol as the
/// default class; a file written with `kubectl exec`, served over HTTP through `kubectl port-forward`,
/// still served after the pod is deleted and comes back; the clean-up commands; with Retain every
/// directory and file stays on the node.
#[test]
fn walkthrough() {
    walkthrough_with("hostPath");
}

/// The walkthrough with a default class of `volumeType: local` (the shipped class, renamed, with
/// that one parameter added): the same steps, on `local` PVs.
#[test]
fn walkthrough_local() {
    walkthrough_with("local");
}

/// The walkthrough, its default class making PVs of `volume_type`.
fn walkthrough_with(volume_type: &str) {
    let t_test = Instant::now();
    let rc = RealCluster::start(2);
    rc.block_on(async {
        let ds_ready = rc.install_hostvol();
        let default_class = match volume_type {
            "hostPath" => "hostvol".to_string(),
            other => apply_shipped_class_of_type(&rc, other),
        };
        let client = rc.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(WALKTHROUGH);
        let manifest = |f: &str| dir.join(f).to_str().unwrap().to_string();

        rc.make_default_class(&default_class);
        let t0 = Instant::now();
        for f in ["nginx-pv.yaml", "nginx-pvc.yaml", "nginx-statefulset.yaml"] {
            rc.kubectl_ok(&["apply", "-f", &manifest(f)]);
        }
        let replicas = ["nginx-statefulset-0", "nginx-statefulset-1", "nginx-statefulset-2"];
        wait_for(
            || async {
                let mut ready = 0;
                for r in replicas {
                    if pods.get_opt(r).await.ok().flatten().is_some_and(|p| is_ready(&p)) {
                        ready += 1;
                    }
                }
                ready == replicas.len()
            },
            Duration::from_secs(180),
            "3 nginx-statefulset pods Running and Ready",
        )
        .await;
        let t_sts = t0.elapsed();
        let mut placed = Vec::new();
        for r in replicas {
            let p = pods.get(r).await.unwrap();
            let claim = claims.get(&format!("nginx-storage-{r}")).await.unwrap();
            let spec = claim.spec.unwrap();
            assert_eq!(spec.storage_class_name.as_deref(), Some(default_class.as_str()), "{r}'s claim");
            let pv = spec.volume_name.unwrap();
            assert_eq!(pv_volume_type(&pvs.get(&pv).await.unwrap()), volume_type, "{pv}");
            placed.push((r, node_of(&p), pv));
        }
        for (r, node, pv) in &placed {
            eprintln!("[real] {r} on {node}, volume {pv}");
        }

        // The claim with no class took the default class: hostvol holds it for its first consumer
        // (there is none), and the static volume stays Available for a claim that asks for it.
        let nginx_pvc = claims.get("nginx-pvc").await.unwrap();
        let class = nginx_pvc.spec.as_ref().unwrap().storage_class_name.clone();
        let phase = nginx_pvc.status.as_ref().and_then(|s| s.phase.clone());
        let static_phase = pvs
            .get("nginx-pv")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase);
        eprintln!(
            "[real] nginx-pvc: class {class:?}, {phase:?} (waits for a first pod); nginx-pv: {static_phase:?}"
        );
        assert_eq!(class.as_deref(), Some(default_class.as_str()));
        assert_eq!(phase.as_deref(), Some("Pending"));
        assert_eq!(static_phase.as_deref(), Some("Available"));

        // Verbatim from the walkthrough.
        let page = "Hello from nginx-statefulset-0";
        let t = Instant::now();
        rc.kubectl_ok(&[
            "exec",
            "nginx-statefulset-0",
            "--",
            "/bin/bash",
            "-c",
            "echo \"Hello from nginx-statefulset-0\" > /usr/share/nginx/html/index.html",
        ]);
        let t_exec = t.elapsed();
        let t = Instant::now();
        let served = get_page(&rc, "pod/nginx-statefulset-0").await;
        let t_http = t.elapsed();
        assert_eq!(served.trim(), page, "page served through port-forward");
        let (_, node0, pv0) = placed[0].clone();
        let dir0 = rc
            .node_data_ls(&node0, "")
            .into_iter()
            .find(|d| d.starts_with(&pv0))
            .unwrap_or_else(|| panic!("no directory of {pv0} in {node0}'s /mnt/data"));
        assert_eq!(
            rc.node_data_read(&node0, &format!("{dir0}/index.html"))
                .as_deref()
                .map(str::trim),
            Some(page),
            "the page in {node0}'s /mnt/data/{dir0}"
        );

        let old_uid = pods.get("nginx-statefulset-0").await.unwrap().uid();
        let t = Instant::now();
        rc.kubectl_ok(&["delete", "pod", "nginx-statefulset-0"]);
        let t_delete = t.elapsed();
        wait_for(
            || async {
                pods.get_opt("nginx-statefulset-0")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.uid() != old_uid && is_ready(&p))
            },
            Duration::from_secs(120),
            "nginx-statefulset-0 back, Running and Ready",
        )
        .await;
        let t_back = t.elapsed();
        let again = pods.get("nginx-statefulset-0").await.unwrap();
        assert_eq!(node_of(&again), node0, "nginx-statefulset-0 back on its node");
        let claim0 = claims.get("nginx-storage-nginx-statefulset-0").await.unwrap();
        assert_eq!(claim0.spec.unwrap().volume_name.as_deref(), Some(pv0.as_str()));
        let served = get_page(&rc, "pod/nginx-statefulset-0").await;
        assert_eq!(served.trim(), page, "page served by the new pod");

        // The shipped class grows volumes: replica 0's claim from 1Gi to 2Gi, online, the pod
        // untouched and its page still there.
        let allows = rc.kubectl_ok(&[
            "get",
            "storageclass",
            &default_class,
            "-o",
            "jsonpath={.allowVolumeExpansion}",
        ]);
        assert_eq!(allows.trim(), "true", "kubectl get storageclass {default_class}: allowVolumeExpansion");
        let t = Instant::now();
        rc.kubectl_ok(&[
            "patch",
            "pvc",
            "nginx-storage-nginx-statefulset-0",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
        ]);
        let capacity_of = |c: PersistentVolumeClaim| {
            c.status
                .and_then(|s| s.capacity)
                .and_then(|c| c.get("storage").map(|q| q.0.clone()))
        };
        wait_for(
            || async {
                claims
                    .get("nginx-storage-nginx-statefulset-0")
                    .await
                    .ok()
                    .and_then(capacity_of)
                    .as_deref()
                    == Some("2Gi")
            },
            Duration::from_secs(60),
            "nginx-storage-nginx-statefulset-0 grown to 2Gi",
        )
        .await;
        let t_grow = t.elapsed();
        let pv_capacity = pvs
            .get(&pv0)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").map(|q| q.0.clone()));
        assert_eq!(pv_capacity.as_deref(), Some("2Gi"), "{pv0}'s capacity");
        let grown = pods.get("nginx-statefulset-0").await.unwrap();
        assert_eq!(grown.uid(), again.uid(), "the pod kept running while its volume grew");
        let served = get_page(&rc, "pod/nginx-statefulset-0").await;
        assert_eq!(served.trim(), page, "page served after the volume grew");
        eprintln!("[real] replica 0's volume grown 1Gi -> 2Gi online in {}", secs(t_grow));

        // The walkthrough's clean-up.
        let t = Instant::now();
        rc.kubectl_ok(&["delete", "-f", &manifest("nginx-statefulset.yaml")]);
        // the StatefulSet's claims carry its selector's labels
        rc.kubectl_ok(&["delete", "pvc", "-l", "app=nginx"]);
        rc.kubectl_ok(&["delete", "-f", &manifest("nginx-pvc.yaml")]);
        rc.kubectl_ok(&["delete", "-f", &manifest("nginx-pv.yaml")]);
        // Retain: the provisioned volumes are Released, and deleting them is the user's call
        let mut args = vec!["delete", "pv"];
        args.extend(placed.iter().map(|(_, _, pv)| pv.as_str()));
        rc.kubectl_ok(&args);
        let t_cleanup = t.elapsed();
        wait_for(
            || async {
                pvs.list(&ListParams::default())
                    .await
                    .is_ok_and(|l| l.items.is_empty())
            },
            Duration::from_secs(60),
            "every PV gone",
        )
        .await;

        // Retain: every directory, and the page, still on its node.
        for (r, node, pv) in &placed {
            let ls = rc.node_data_ls(node, "");
            assert!(
                ls.iter().any(|d| d.starts_with(pv.as_str())),
                "{r}'s directory {pv}_* gone from {node}'s /mnt/data: {ls:?}"
            );
        }
        assert_eq!(
            rc.node_data_read(&node0, &format!("{dir0}/index.html"))
                .as_deref()
                .map(str::trim),
            Some(page),
            "the page after clean-up"
        );
        eprintln!(
            "[real] figures: cluster up {}, DaemonSet Ready {}, StatefulSet 3/3 Ready {} after apply, \
             exec {}, first page over port-forward {}, pod delete {} + back Ready {}, clean-up {}",
            secs(rc.up_time),
            secs(ds_ready),
            secs(t_sts),
            secs(t_exec),
            secs(t_http),
            secs(t_delete),
            secs(t_back),
            secs(t_cleanup)
        );
    });
    drop(rc);
    eprintln!(
        "[real] walkthrough ({volume_type}): {} in all",
        secs(t_test.elapsed())
    );
}

/// Applies the shipped class `hostvol` as `hostvol-<type>` with `volumeType: <type>` added; its name.
fn apply_shipped_class_of_type(rc: &RealCluster, volume_type: &str) -> String {
    let name = format!("hostvol-{}", volume_type.to_lowercase());
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/storageclass.yaml"),
    )
    .unwrap();
    assert!(
        shipped.contains("\n  name: hostvol\n") && !shipped.contains("\nparameters:"),
        "{shipped}"
    );
    let class = shipped.replace("\n  name: hostvol\n", &format!("\n  name: {name}\n"))
        + &format!("parameters:\n  volumeType: {volume_type}\n");
    let file = rc.dir().join(format!("{name}.yaml"));
    std::fs::write(&file, class).unwrap();
    rc.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    name
}

/// GET `path` of agent pod `pod` on port 9808 through the API server's pod proxy: (200, body) or
/// (0, kubectl's error).
fn proxy_get(rc: &RealCluster, pod: &str, path: &str) -> (u16, String) {
    let out = rc.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{pod}:9808/proxy{path}"),
    ]);
    if out.status.success() {
        (200, String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        (0, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// GET / through `kubectl port-forward TARGET :80`.
async fn get_page(rc: &RealCluster, target: &str) -> String {
    let pf = rc.port_forward(target, 80);
    let (code, body) = http::get(pf.local, "/")
        .await
        .unwrap_or_else(|e| panic!("GET / through port-forward to {target}: {e}"));
    assert_eq!(code, 200, "GET / through port-forward to {target}: {body}");
    body
}

/// Node-loss clean-up enabled as the README says: the base plus the kustomize component
/// `deploy/components/node-loss-cleanup`. The agents start with the feature on (their start-up check of
/// the component's RBAC passes inside their pods) and the ServiceAccount may now delete claims. On an
/// external cluster (installed as its owner chose), the feature runs exactly when that RBAC is granted.
#[test]
fn node_loss_component() {
    let rc = RealCluster::start(1);
    let ds_ready = rc.install_hostvol_with_components(&["components/node-loss-cleanup"]);
    let sa = format!("--as=system:serviceaccount:{AGENT_NAMESPACE}:hostvol");
    let can = rc.kubectl(&[
        "auth",
        "can-i",
        &sa,
        "delete",
        "persistentvolumeclaims",
        "--all-namespaces",
    ]);
    let granted = can.status.success();
    let logs = rc.agent_logs();
    assert!(
        logs.contains("starting agent"),
        "agent logs from the start:\n{logs}"
    );
    let running = !logs.contains("node-loss clean-up is off");
    if rc.is_external() {
        assert_eq!(
            running, granted,
            "node-loss clean-up runs only with its RBAC:\n{logs}"
        );
    } else {
        assert!(granted, "the component grants claim delete\n{}", rc.diag());
        assert!(running, "the agents run node-loss clean-up:\n{logs}");
    }
    eprintln!(
        "[real] node-loss component: DaemonSet Ready {} after apply; claim delete granted: {granted}",
        secs(ds_ready)
    );
}

/// Kills the Prometheus server this test started (by its pid) when the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Monitoring as people run it (README "Monitoring"): Debian's Prometheus server, inside the cluster's
/// network namespace, scrapes the agents' pods as the PodMonitor of `deploy/monitoring` asks (pods
/// by the DaemonSet's labels, port `http`, `job="hostvol"`, `honor_labels`), loads
/// `deploy/monitoring/rules.yaml`, and serves the claim's `hostvol_volume_used_bytes` back from its
/// query API once the pod wrote a file: labelled with the claim's own namespace, not the agent's.
#[test]
fn prometheus_scrapes_the_agents() {
    let rc = RealCluster::start(1);
    if rc.is_external() {
        eprintln!(
            "[real] prometheus: skipped on an external cluster (run your own Prometheus there)"
        );
        return;
    }
    let ds_ready = rc.install_hostvol();
    rc.kubectl_ok(&["apply", "-f", "deploy/examples/statefulset.yaml"]);
    rc.kubectl_ok(&["scale", "statefulset", "nginx-statefulset", "--replicas=1"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = rc.dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    // A free port in the cluster's network namespace (this thread is in it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Debian builds Prometheus without Kubernetes service discovery (client-go is not packaged), so
    // the targets are what the Prometheus Operator's pod discovery makes of the PodMonitor: the pods
    // with the DaemonSet's labels, at their port named `http`, labelled with namespace, pod and node.
    let selector = "app.kubernetes.io/name=hostvol,app.kubernetes.io/component=agent";
    let listed = rc.kubectl_ok(&[
        "-n",
        AGENT_NAMESPACE,
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName} \
         {.spec.containers[0].ports[?(@.name==\"http\")].containerPort}{\"\\n\"}{end}",
    ]);
    let targets: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "pod, IP, node and port `http`: {l:?}");
            serde_json::json!({
                "targets": [format!("{}:{}", f[1], f[3])],
                "labels": {"namespace": AGENT_NAMESPACE, "pod": f[0], "node": f[2]},
            })
        })
        .collect();
    assert_eq!(targets.len(), 1, "one agent per node: {listed}");
    std::fs::write(
        dir.join("targets.json"),
        serde_json::to_string(&targets).unwrap(),
    )
    .unwrap();
    let config = format!(
        r#"global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - {rules}
scrape_configs:
  # The scrape deploy/monitoring/podmonitor.yaml asks for: job hostvol, /metrics, honor_labels.
  - job_name: hostvol
    honor_labels: true
    metrics_path: /metrics
    file_sd_configs:
      - files: [{targets}]
"#,
        rules = root.join("deploy/monitoring/rules.yaml").display(),
        targets = dir.join("targets.json").display(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let server = Server(
        std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus: {e} (Debian's `prometheus`: run scripts/setup-monitoring.sh)")
            }),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let query = |q: &'static str| async move {
        match http::get(addr, &format!("/api/v1/query?query={q}")).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok(),
            _ => None,
        }
    };
    rc.block_on(async {
        let client = rc.client().await;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        wait_for(
            || async {
                pods.get_opt("nginx-statefulset-0")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| is_ready(&p))
            },
            Duration::from_secs(180),
            "nginx-statefulset-0 Running and Ready",
        )
        .await;
        // 3 MiB written by the pod into its hostvol volume.
        let written = 3 * 1024 * 1024;
        rc.kubectl_ok(&[
            "exec",
            "nginx-statefulset-0",
            "--",
            "/bin/sh",
            "-c",
            "head -c 3145728 /dev/zero > /usr/share/nginx/html/blob && sync",
        ]);
        let t = Instant::now();
        // The agent measures usage every 60 s (--usage-refresh-seconds), Prometheus scrapes every 5 s.
        let used = "hostvol_volume_used_bytes%7Bpersistentvolumeclaim%3D%22nginx-storage-nginx-statefulset-0%22%7D";
        let series = loop {
            let got = query(used).await;
            let result = got.as_ref().and_then(|v| v["data"]["result"].as_array().cloned());
            if let Some(s) = result.as_ref().and_then(|r| r.first()) {
                let value: f64 = s["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0);
                if value >= written as f64 {
                    break s.clone();
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "Prometheus never served {written} bytes used for the claim; last answer {got:?}\n\
                 prometheus log:\n{}\nagent logs:\n{}",
                server_log(),
                rc.agent_logs()
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        let labels = &series["metric"];
        eprintln!(
            "[real] prometheus: {} bytes used by default/nginx-storage-nginx-statefulset-0 {} after the \
             write (DaemonSet Ready {} after apply); labels {labels}",
            series["value"][1],
            secs(t.elapsed()),
            secs(ds_ready)
        );
        assert_eq!(labels["job"], "hostvol", "{labels}");
        assert_eq!(labels["namespace"], "default", "the claim's namespace (honor_labels): {labels}");
        assert!(labels["persistentvolume"].as_str().is_some_and(|pv| !pv.is_empty()), "{labels}");
        assert_eq!(labels["node"], rc.nodes()[0].name.as_str(), "{labels}");
        // The agent's target is up, and every rule of rules.yaml is loaded and evaluates without error.
        let up = query("up%7Bjob%3D%22hostvol%22%7D").await.unwrap();
        assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
        let (code, body) = http::get(addr, "/api/v1/rules").await.unwrap();
        assert_eq!(code, 200, "{body}");
        let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
        let all: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        let shipped = std::fs::read_to_string(root.join("deploy/monitoring/rules.yaml"))
            .unwrap()
            .matches("- alert:")
            .count();
        assert_eq!(all.len(), shipped, "{body}");
        for rule in all {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    });
    drop(server);
}

/// Issue #16 part 4 on a real kubelet: deploy/examples/statefulset.yaml at one replica writes
/// index.html, is scaled to 0, its claim deleted (the shipped class is Retain) and re-created, and
/// `kubectl hostvol reuse` gives the retained data to the new claim: scaled back to 1, the pod serves
/// the same page from the renamed directory.
#[test]
fn retained_data_comes_back_with_reuse() {
    let rc = RealCluster::start(1);
    rc.install_hostvol();
    rc.kubectl_ok(&["apply", "-f", "deploy/examples/statefulset.yaml"]);
    rc.kubectl_ok(&["scale", "statefulset", "nginx-statefulset", "--replicas=1"]);
    let claim = "nginx-storage-nginx-statefulset-0";
    rc.block_on(async {
        let client = rc.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let replica_ready = || async {
            pods.get_opt("nginx-statefulset-0")
                .await
                .ok()
                .flatten()
                .is_some_and(|p| is_ready(&p))
        };
        wait_for(replica_ready, Duration::from_secs(180), "replica 0 Ready").await;
        let page = "Hello again from retained data";
        rc.kubectl_ok(&[
            "exec",
            "nginx-statefulset-0",
            "--",
            "/bin/sh",
            "-c",
            &format!("echo '{page}' > /usr/share/nginx/html/index.html"),
        ]);
        let node = node_of(&pods.get("nginx-statefulset-0").await.unwrap());
        let old_pv = claims
            .get(claim)
            .await
            .unwrap()
            .spec
            .unwrap()
            .volume_name
            .unwrap();

        rc.kubectl_ok(&["scale", "statefulset", "nginx-statefulset", "--replicas=0"]);
        let gone = || async {
            pods.get_opt("nginx-statefulset-0")
                .await
                .ok()
                .flatten()
                .is_none()
        };
        wait_for(gone, Duration::from_secs(120), "replica 0 gone").await;
        rc.kubectl_ok(&["delete", "pvc", claim, "--wait=true", "--timeout=60s"]);
        let released = || async {
            pvs.get_opt(&old_pv)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status)
                .and_then(|s| s.phase)
                == Some("Released".into())
        };
        wait_for(released, Duration::from_secs(60), "the old PV Released").await;
        let claim_yaml = common::claim_yaml("default", claim, "hostvol", "1Gi", None);
        let path = rc.dir().join("reused-claim.yaml");
        std::fs::write(&path, claim_yaml).unwrap();
        rc.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);

        let t = Instant::now();
        // The plugin as people run it (`kubectl hostvol reuse`), with the admin's kubeconfig.
        let plugin = common::hostvol_bin().with_file_name("kubectl-hostvol");
        let mut cmd = std::process::Command::new(plugin);
        cmd.args(["reuse", &old_pv, "--for", &format!("default/{claim}")]);
        let ran = common::run_as_person(cmd, rc.kubeconfig());
        assert!(ran.ok(), "reuse: {}", ran.output());
        let t_reuse = t.elapsed();
        let new_pv = claims
            .get(claim)
            .await
            .unwrap()
            .spec
            .unwrap()
            .volume_name
            .unwrap();
        assert_ne!(new_pv, old_pv);
        let dirs = rc.node_data_ls(&node, "");
        assert!(
            dirs.iter().any(|d| d.starts_with(&new_pv))
                && !dirs.iter().any(|d| d.starts_with(&old_pv)),
            "the directory renamed to {new_pv}_...: {dirs:?}"
        );

        rc.kubectl_ok(&["scale", "statefulset", "nginx-statefulset", "--replicas=1"]);
        wait_for(
            replica_ready,
            Duration::from_secs(180),
            "replica 0 Ready again",
        )
        .await;
        let served = get_page(&rc, "pod/nginx-statefulset-0").await;
        assert_eq!(
            served.trim(),
            page,
            "the retained page served by the new pod"
        );
        eprintln!(
            "[real] reuse: {old_pv} -> {new_pv} on {node} in {}; the page is served again",
            secs(t_reuse)
        );
    });
}
