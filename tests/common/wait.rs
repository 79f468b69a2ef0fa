//! Waiting: polling until a condition holds, with panic messages that say what was awaited and show
//! the object, its Events and the cluster's diagnostics (dir, logs, dead components).

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::Api;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Cluster, fmt_events, to_yaml_ish};

const POLL: Duration = Duration::from_millis(150);

/// Polls `f` (every ~150 ms) until it returns true; panics after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(f: F, timeout: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(elapsed) = poll_until(f, timeout).await {
        panic!("timed out after {elapsed:?} waiting for {what}");
    }
}

/// Like `wait_for` but returns Err(elapsed) instead of panicking.
pub async fn poll_until<F, Fut>(mut f: F, timeout: Duration) -> Result<(), Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(remaining.max(Duration::from_millis(1)), f()).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(start.elapsed());
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Object `name` of `api` as the panic messages show it: without noise, or why it could not be read.
async fn describe<K>(api: &Api<K>, name: &str) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(o)) => to_yaml_ish(&o),
        other => format!("{other:?}"),
    }
}

impl Cluster {
    /// Polls `f` until true; on timeout panics with `what`, the cluster dir, logs and dead components.
    pub async fn wait_for<F, Fut>(&self, f: F, timeout: Duration, what: &str)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        if let Err(elapsed) = poll_until(f, timeout).await {
            panic!(
                "timed out after {elapsed:?} waiting for {what}\n{}",
                self.diag()
            );
        }
    }

    /// Waits until the pod is bound to a node and Running+Ready (via the fake kubelet).
    pub async fn wait_pod_running(&self, ns: &str, name: &str, timeout: Duration) -> Pod {
        let ready = |p: &Pod| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions.as_ref().is_some_and(|cs| {
                        cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    })
            })
        };
        let what = format!("pod {ns}/{name} Running and Ready");
        self.wait_object(ns, name, timeout, ready, &what, "pod", "Pod")
            .await
    }

    /// Waits until PV `name` is in `phase` (e.g. "Released").
    pub async fn wait_pv_phase(&self, name: &str, phase: &str, timeout: Duration) {
        let api: Api<PersistentVolume> = Api::all(self.client());
        self.wait_for(
            || async {
                api.get(name)
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .and_then(|s| s.phase)
                    .as_deref()
                    == Some(phase)
            },
            timeout,
            &format!("PV {name} {phase}"),
        )
        .await;
    }

    /// Waits until PVC ns/name is Bound.
    pub async fn wait_pvc_bound(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> PersistentVolumeClaim {
        let bound = |p: &PersistentVolumeClaim| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        };
        let what = format!("PVC {ns}/{name} to be Bound");
        self.wait_object(ns, name, timeout, bound, &what, "pvc", "")
            .await
    }

    /// Polls object ns/name until `done` holds, then returns it (read again). On timeout panics with
    /// `what`, the object (under `--- {section} ---`), its Events (`events_kind` as in `object_events`)
    /// and the cluster's diagnostics.
    #[allow(clippy::too_many_arguments)]
    async fn wait_object<K>(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        done: impl Fn(&K) -> bool,
        what: &str,
        section: &str,
        events_kind: &str,
    ) -> K
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client(), ns);
        if poll_until(
            || async { matches!(api.get_opt(name).await, Ok(Some(o)) if done(&o)) },
            timeout,
        )
        .await
        .is_err()
        {
            let state = describe(&api, name).await;
            let events = self.object_events(ns, events_kind, name).await;
            panic!(
                "timed out after {timeout:?} waiting for {what}\n--- {section} ---\n{state}\n--- events ---\n{}\n{}",
                fmt_events(&events),
                self.diag()
            );
        }
        api.get(name).await.unwrap()
    }

    /// Waits for an event with `reason` about PVC ns/pvc; returns (type, reason, message).
    pub async fn wait_event(
        &self,
        ns: &str,
        pvc: &str,
        reason: &str,
        timeout: Duration,
    ) -> (String, String, String) {
        let found: Mutex<Option<(String, String, String)>> = Mutex::new(None);
        let res = poll_until(
            || async {
                let evs = self.pvc_events(ns, pvc).await;
                if let Some(e) = evs.into_iter().find(|e| e.1 == reason) {
                    *found.lock().unwrap() = Some(e);
                    true
                } else {
                    false
                }
            },
            timeout,
        )
        .await;
        if res.is_err() {
            let evs = self.pvc_events(ns, pvc).await;
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client(), ns);
            let state = describe(&api, pvc).await;
            panic!(
                "timed out after {timeout:?} waiting for event {reason:?} on PVC {ns}/{pvc}\n--- events so far ---\n{}\n--- pvc ---\n{state}\n{}",
                fmt_events(&evs),
                self.diag()
            );
        }
        found.into_inner().unwrap().unwrap()
    }
}
