//! Smoke test of the e2e harness itself: control plane, fake nodes, fake kubelet, events helpers.
//! Needs the binaries from `scripts/setup-control-plane.sh`.

mod common;

use common::{Cluster, ClusterOptions};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Stand-in RBAC used only while the shipped `deploy/*.yaml` do not exist yet (written to a temp
/// dir, never to deploy/).
const FALLBACK_RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: hostvol-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: hostvol, namespace: hostvol-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: hostvol-smoke}
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: hostvol-smoke}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: hostvol-smoke}
subjects:
- {kind: ServiceAccount, name: hostvol, namespace: hostvol-system}
"#;

async fn start(opts: ClusterOptions) -> (Cluster, Option<tempfile::TempDir>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if common::DEPLOY_RBAC_MANIFESTS
        .iter()
        .all(|m| root.join(m).is_file())
    {
        return (Cluster::start_with(opts).await, None);
    }
    eprintln!("[smoke] deploy/ RBAC manifests not there yet; using a stand-in RBAC");
    let tmp = tempfile::tempdir().unwrap();
    let p: PathBuf = tmp.path().join("rbac.yaml");
    std::fs::write(&p, FALLBACK_RBAC).unwrap();
    (Cluster::start_with_manifests(opts, &[p]).await, Some(tmp))
}

fn pod_node(p: &Pod) -> Option<String> {
    p.spec.as_ref()?.node_name.clone()
}

fn is_running_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.pod_ip.is_some()
            && s.conditions
                .as_ref()
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_schedules_pods() {
    let t = Instant::now();
    let (cluster, _rbac) = start(ClusterOptions::default()).await;
    let start_time = t.elapsed();
    eprintln!("[smoke] Cluster::start() took {start_time:.2?}");

    // The agent's kubeconfig authenticates as the ServiceAccount (TokenRequest token).
    let agent = cluster.agent_client().await;
    agent
        .apiserver_version()
        .await
        .expect("agent token accepted");
    let out = cluster.kubectl(&[
        "auth",
        "can-i",
        "list",
        "nodes",
        "--as",
        "system:serviceaccount:hostvol-system:hostvol",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "yes",
        "{out:?}"
    );

    let t = Instant::now();
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    eprintln!("[smoke] two nodes in {:.2?}", t.elapsed());
    let t = Instant::now();
    cluster.create_namespace("smoke").await;
    eprintln!(
        "[smoke] namespace with default SA token in {:.2?}",
        t.elapsed()
    );

    // A Deployment: scheduled onto the fake nodes and marked Running/Ready by the fake kubelet.
    let t = Instant::now();
    let deploys: Api<Deployment> = Api::namespaced(cluster.client(), "smoke");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "smoke");
    let lp = ListParams::default().labels("app=web");
    cluster
        .wait_for(
            || async {
                let Ok(list) = pods.list(&lp).await else {
                    return false;
                };
                list.items.len() == 2
                    && list.items.iter().all(|p| {
                        matches!(pod_node(p).as_deref(), Some("node-a" | "node-b"))
                            && is_running_ready(p)
                    })
            },
            Duration::from_secs(60),
            "2 web pods scheduled on fake nodes and Running",
        )
        .await;
    cluster
        .wait_for(
            || async {
                deploys
                    .get("web")
                    .await
                    .ok()
                    .and_then(|d| d.status?.ready_replicas)
                    == Some(2)
            },
            Duration::from_secs(30),
            "deployment web readyReplicas=2",
        )
        .await;
    eprintln!("[smoke] deployment ready in {:.2?}", t.elapsed());

    // A StatefulSet (OrderedReady) only progresses past pod-0 if pod-0 becomes Running and Ready.
    let t = Instant::now();
    cluster.kubectl_apply_yaml(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: smoke}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      initContainers: [{name: init, image: example.invalid/init:1}]
      containers: [{name: db, image: example.invalid/db:1}, {name: sidecar, image: example.invalid/sc:1}]
"#,
    );
    let pod = cluster
        .wait_pod_running("smoke", "db-2", Duration::from_secs(60))
        .await;
    assert!(matches!(
        pod_node(&pod).as_deref(),
        Some("node-a" | "node-b")
    ));
    let sts: Api<StatefulSet> = Api::namespaced(cluster.client(), "smoke");
    cluster
        .wait_for(
            || async {
                sts.get("db")
                    .await
                    .ok()
                    .and_then(|s| s.status?.ready_replicas)
                    == Some(3)
            },
            Duration::from_secs(30),
            "statefulset db readyReplicas=3",
        )
        .await;
    eprintln!("[smoke] 3-replica statefulset ready in {:.2?}", t.elapsed());

    // Normal delete completes (the fake kubelet finalizes it), force delete too.
    pods.delete("db-2", &DeleteParams::default()).await.unwrap();
    cluster
        .wait_for(
            || async {
                pods.get_opt("db-2")
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_none())
            },
            Duration::from_secs(30),
            "db-2 deleted (or recreated) after a graceful delete",
        )
        .await;
    cluster.force_delete_pod("smoke", "db-1").await;
    // The statefulset controller recreates it and it becomes Ready again.
    cluster
        .wait_pod_running("smoke", "db-1", Duration::from_secs(60))
        .await;

    assert_eq!(
        cluster.csi_storage_capacity_api_version().await.as_deref(),
        Some("storage.k8s.io/v1alpha1")
    );

    // Event helpers: core/v1 Events about the pod exist (the scheduler emits "Scheduled").
    let evs = cluster.object_events("smoke", "Pod", "db-0").await;
    assert!(evs.iter().any(|e| e.1 == "Scheduled"), "events: {evs:?}");

    assert!(cluster.dead_components().is_empty(), "{}", cluster.diag());
    eprintln!("[smoke] Cluster::start() took {start_time:.2?}");
}

/// Runs in parallel with the test above (same process, other thread: two clusters at once):
/// the CSIStorageCapacity switch and the Agent process handle (start, metrics, SIGTERM, restart, SIGKILL).
#[tokio::test]
async fn agent_lifecycle_without_storage_capacity() {
    let (cluster, _rbac) = start(ClusterOptions {
        csi_storage_capacity: false,
    })
    .await;
    assert_eq!(cluster.csi_storage_capacity_api_version().await, None);
    cluster.add_node("node-a").await;

    let mut agent = cluster.start_agent("node-a", &[]).await;
    assert!(agent.root.is_dir());
    assert!(
        agent.metrics().await.contains("# TYPE"),
        "metrics: {}",
        agent.metrics().await
    );
    let first_pid = agent.pid();

    agent.terminate();
    assert!(
        agent.exit_status().is_some(),
        "agent still running after terminate"
    );
    assert!(
        agent.http_get("/healthz").await.is_err(),
        "HTTP still served after SIGTERM"
    );

    agent.restart().await;
    assert_ne!(agent.pid(), first_pid);
    assert_eq!(agent.http_get("/healthz").await.unwrap().0, 200);

    agent.kill();
    assert!(agent.exit_status().is_some());
    agent.restart().await; // same ports, same root, same socket path after SIGKILL
    assert_eq!(agent.http_get("/readyz").await.unwrap().0, 200);
    assert!(agent.log().contains("node-a"), "log: {}", agent.log());
}
