//! The fake kubelet: plays the status part of a kubelet for pods bound to the harness's fake nodes.
//!
//! Runs on its own thread with its own tokio runtime (and its own kube client), so it keeps working
//! while a test blocks its runtime (e.g. in `kubectl`) and whatever runtime flavour the test uses.
//!
//! * A pod bound to a fake node gets `phase: Running`, conditions Initialized/Ready/ContainersReady/
//!   PodScheduled True, a podIP and running+ready container statuses (init containers: terminated 0).
//! * A pod with a deletionTimestamp on a fake node is deleted with grace period 0, like a kubelet does
//!   after stopping its containers (switch off with `Cluster::set_fake_kubelet_finalizes_deletions`).

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct FakeKubelet {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
pub struct KubeletShared {
    pub nodes: Arc<Mutex<HashSet<String>>>,
    pub finalize_deletions: Arc<AtomicBool>,
    pub log: Arc<Mutex<std::fs::File>>,
}

impl KubeletShared {
    fn is_fake_node(&self, node: &str) -> bool {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }
    fn log(&self, msg: &str) {
        use std::io::Write;
        let now = k8s_openapi::jiff::Timestamp::now();
        let _ = writeln!(
            self.log.lock().unwrap_or_else(|e| e.into_inner()),
            "{now} {msg}"
        );
    }
}

impl FakeKubelet {
    pub fn start(kubeconfig: PathBuf, shared: KubeletShared) -> FakeKubelet {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fake-kubelet".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake kubelet runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = run(kubeconfig, shared) => {}
                    }
                });
                drop(rt);
                let _ = done_tx.send(());
            })
            .expect("spawn fake kubelet thread");
        FakeKubelet {
            stop: Some(stop_tx),
            done: done_rx,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            if self.done.recv_timeout(Duration::from_secs(3)).is_ok()
                && let Some(t) = self.thread.take()
            {
                let _ = t.join();
            }
        }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run(kubeconfig: PathBuf, shared: KubeletShared) {
    let client = loop {
        match super::client_from_kubeconfig(&kubeconfig).await {
            Ok(c) => break c,
            Err(e) => {
                shared.log(&format!("cannot build client: {e:#}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let ip_counter = AtomicU32::new(0);
    let mut ips: HashMap<String, String> = HashMap::new(); // pod uid -> ip
    let mut retry: HashMap<(String, String), ()> = HashMap::new();
    let stream = watcher(
        pods.clone(),
        watcher::Config::default().fields("spec.nodeName!="),
    )
    .default_backoff()
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = stream.next() => {
                match ev {
                    Some(Ok(pod)) => {
                        if let Err(key) = handle(&client, &shared, &pod, &ip_counter, &mut ips).await {
                            retry.insert(key, ());
                        }
                    }
                    Some(Err(e)) => shared.log(&format!("watch error: {e}")),
                    None => {
                        shared.log("watch stream ended");
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                if retry.is_empty() { continue; }
                let keys: Vec<_> = retry.drain().map(|(k, _)| k).collect();
                for (ns, name) in keys {
                    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                    match api.get_opt(&name).await {
                        Ok(Some(pod)) => {
                            if let Err(key) = handle(&client, &shared, &pod, &ip_counter, &mut ips).await {
                                retry.insert(key, ());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            shared.log(&format!("get {ns}/{name}: {e}"));
                            retry.insert((ns, name), ());
                        }
                    }
                }
            }
        }
    }
}

fn needs_running_status(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
        return false;
    }
    if status.phase.as_deref() != Some("Running") {
        return true;
    }
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let n_containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let n_statuses = status.container_statuses.as_ref().map_or(0, |s| s.len());
    !ready || n_statuses != n_containers || status.pod_ip.is_none()
}

async fn handle(
    client: &kube::Client,
    shared: &KubeletShared,
    pod: &Pod,
    ip_counter: &AtomicU32,
    ips: &mut HashMap<String, String>,
) -> Result<(), (String, String)> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
        return Ok(());
    };
    if !shared.is_fake_node(node) {
        return Ok(());
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let key = (ns.clone(), name.clone());

    if pod.metadata.deletion_timestamp.is_some() {
        if !shared.finalize_deletions.load(Ordering::SeqCst) {
            return Ok(());
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        return match api.delete(&name, &dp).await {
            Ok(_) => {
                shared.log(&format!("deleted terminating pod {ns}/{name} on {node}"));
                ips.remove(&uid);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => {
                shared.log(&format!("delete {ns}/{name}: {e}"));
                Err(key)
            }
        };
    }
    if !needs_running_status(pod) {
        return Ok(());
    }
    // Like a real kubelet, a hostNetwork pod gets the node's address (all fake nodes are 127.0.0.1).
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let ip = if host_network {
        "127.0.0.1".to_string()
    } else {
        ips.entry(uid.clone())
            .or_insert_with(|| {
                let n = ip_counter.fetch_add(1, Ordering::SeqCst);
                format!("10.244.{}.{}", (n / 250) % 256, n % 250 + 2)
            })
            .clone()
    };
    let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap();
    let spec = pod.spec.clone().unwrap_or_default();
    // A ready container status in `state`.
    let container_status = |c: &Container, state: serde_json::Value| {
        json!({
            "name": c.name,
            "image": c.image.clone().unwrap_or_default(),
            "imageID": format!("fake://{}", c.image.clone().unwrap_or_default()),
            "containerID": format!("fake://{uid}/{}", c.name),
            "ready": true,
            "restartCount": 0,
            "state": state,
        })
    };
    let containers: Vec<_> = spec
        .containers
        .iter()
        .map(|c| {
            let mut status = container_status(c, json!({"running": {"startedAt": now}}));
            status["started"] = json!(true);
            status
        })
        .collect();
    let init_containers: Vec<_> = spec
        .init_containers
        .unwrap_or_default()
        .iter()
        .map(|c| {
            container_status(
                c,
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}),
            )
        })
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    let status = json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now,
            "qosClass": pod.status.as_ref().and_then(|s| s.qos_class.clone()).unwrap_or_else(|| "BestEffort".into()),
            "conditions": [cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
            "containerStatuses": containers,
            "initContainerStatuses": init_containers,
        }
    });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        Ok(_) => {
            shared.log(&format!("pod {ns}/{name} on {node}: Running, ip {ip}"));
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => {
            shared.log(&format!("patch status {ns}/{name}: {e}"));
            Err(key)
        }
    }
}
