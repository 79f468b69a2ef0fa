//! Fake nodes and their pods: Ready `Node` objects without a kubelet, the switches of the played
//! kubelet (`kubelet.rs`), and force-deleting pods as `kubectl delete --grace-period=0` would.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Cluster, FakeKubelet, K8S_VERSION, to_yaml_ish};

impl Cluster {
    /// Creates a Ready fake node (no kubelet) the scheduler will place pods on.
    pub async fn add_node(&self, name: &str) {
        self.add_node_with_labels(name, &[]).await
    }

    pub async fn add_node_with_labels(&self, name: &str, extra_labels: &[(&str, &str)]) {
        self.kubelet_shared
            .nodes
            .lock()
            .unwrap()
            .insert(name.to_string());
        let nodes: Api<Node> = Api::all(self.client());
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
        labels.insert("kubernetes.io/os".to_string(), "linux".to_string());
        labels.insert("kubernetes.io/arch".to_string(), "amd64".to_string());
        for (k, v) in extra_labels {
            labels.insert(k.to_string(), v.to_string());
        }
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create node {name}: {e}\n{}", self.diag()),
        }
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .unwrap();
        let cond = |t: &str, s: &str, reason: &str| json!({"type": t, "status": s, "reason": reason, "message": "fake kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now});
        let resources =
            json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        let status = json!({"status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                cond("Ready", "True", "KubeletReady"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": name, "kernelVersion": "fake",
                "osImage": "fake", "containerRuntimeVersion": "fake://1", "kubeletVersion": format!("v{K8S_VERSION}"),
                "kubeProxyVersion": format!("v{K8S_VERSION}"), "operatingSystem": "linux", "architecture": "amd64"
            }
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("patch node {name} status: {e}\n{}", self.diag()));
        let not_ready = |n: &Node| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == "node.kubernetes.io/not-ready"))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = nodes
                .get(name)
                .await
                .unwrap_or_else(|e| panic!("get node {name}: {e}"));
            if !not_ready(&n) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {name} keeps taint node.kubernetes.io/not-ready:\n{}\n{}",
                    to_yaml_ish(&n),
                    self.diag()
                );
            }
            let taints: Vec<_> = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != "node.kubernetes.io/not-ready")
                .collect();
            let patch = json!({"metadata": {"resourceVersion": n.metadata.resource_version}, "spec": {"taints": taints}});
            match nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("remove not-ready taint from {name}: {e}\n{}", self.diag()),
            }
        }
    }

    /// Starts the fake kubelet (done automatically by `start`; idempotent).
    pub fn start_fake_kubelet(&self) {
        let mut k = self.kubelet.lock().unwrap();
        if k.is_none() {
            *k = Some(FakeKubelet::start(
                self.admin_kubeconfig.clone(),
                self.kubelet_shared.clone(),
            ));
        }
    }

    /// Whether the fake kubelet deletes (grace 0) terminating pods on fake nodes, as a kubelet does
    /// once containers stopped. Default true; with false such pods stay Terminating.
    pub fn set_fake_kubelet_finalizes_deletions(&self, on: bool) {
        self.kubelet_shared
            .finalize_deletions
            .store(on, Ordering::SeqCst);
    }

    /// Deletes a pod with grace period 0 and waits until it is gone (404 is fine).
    pub async fn force_delete_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let uid = match api.get_opt(name).await {
            Ok(Some(p)) => p.metadata.uid.unwrap_or_default(),
            Ok(None) => return,
            Err(e) => panic!("get pod {ns}/{name}: {e}\n{}", self.diag()),
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            // Gone already, or replaced by a new pod of the same name (e.g. StatefulSet).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
            Err(e) => panic!("force delete pod {ns}/{name}: {e}\n{}", self.diag()),
        }
        // Controllers (StatefulSet) may recreate a pod with the same name at once: wait for the
        // old uid to be gone.
        self.wait_for(
            || async {
                match api.get_opt(name).await {
                    Ok(None) => true,
                    Ok(Some(p)) => p.metadata.uid.as_deref() != Some(uid.as_str()),
                    Err(_) => false,
                }
            },
            Duration::from_secs(30),
            &format!("pod {ns}/{name} (uid {uid}) to disappear after force delete"),
        )
        .await;
    }
}
