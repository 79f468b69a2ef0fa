//! Reading state for assertions and panic messages: Events, hostvol's PVs, CSIStorageCapacity
//! objects, Prometheus samples, directories in a data root, objects printed without noise.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use super::{AGENT_NAMESPACE, Cluster, PROVISIONER};

/// Pretty JSON of an object for panic messages, without managedFields and last-applied noise.
pub fn to_yaml_ish<T: serde::Serialize>(v: &T) -> String {
    let mut v = match serde_json::to_value(v) {
        Ok(v) => v,
        Err(e) => return format!("<unserializable: {e}>"),
    };
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        if let Some(ann) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            ann.remove("kubectl.kubernetes.io/last-applied-configuration");
            if ann.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Events as (type, reason, message), one a line, for assertion messages.
pub fn fmt_events(evs: &[(String, String, String)]) -> String {
    if evs.is_empty() {
        return "<none>".into();
    }
    evs.iter()
        .map(|(t, r, m)| format!("{t:8} {r}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Cluster {
    /// Events about PVC ns/name as (type, reason, message), oldest first: core/v1 Events (field
    /// selector involvedObject.name/namespace) merged with events.k8s.io/v1 Events (regarding.*; note
    /// as message), de-duplicated by uid.
    pub async fn pvc_events(&self, ns: &str, name: &str) -> Vec<(String, String, String)> {
        self.object_events(ns, "", name).await
    }

    /// Events about object ns/name (kind filter applied only if `kind` is non-empty).
    pub async fn object_events(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
    ) -> Vec<(String, String, String)> {
        use k8s_openapi::api::core::v1::Event as CoreEvent;
        use k8s_openapi::api::events::v1::Event as NewEvent;
        let mut all: BTreeMap<String, (String, String, String, String)> = BTreeMap::new(); // uid -> (time, type, reason, msg)
        // A timestamp as the API writes it (RFC 3339), so that they sort as text.
        fn ts<T: serde::Serialize>(t: &T) -> String {
            let v = serde_json::to_value(t).unwrap();
            v.as_str().unwrap_or_default().to_string()
        }
        let core: Api<CoreEvent> = Api::namespaced(self.client(), ns);
        let mut sel = format!("involvedObject.name={name},involvedObject.namespace={ns}");
        if !kind.is_empty() {
            sel.push_str(&format!(",involvedObject.kind={kind}"));
        }
        if let Ok(list) = core.list(&ListParams::default().fields(&sel)).await {
            for e in list.items {
                let time = e
                    .event_time
                    .as_ref()
                    .map(ts)
                    .or_else(|| e.last_timestamp.as_ref().map(ts))
                    .or_else(|| e.first_timestamp.as_ref().map(ts))
                    .or_else(|| e.metadata.creation_timestamp.as_ref().map(ts))
                    .unwrap_or_default();
                all.insert(
                    e.metadata.uid.clone().unwrap_or_default(),
                    (
                        time,
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                    ),
                );
            }
        }
        let newer: Api<NewEvent> = Api::namespaced(self.client(), ns);
        let mut sel = format!("regarding.name={name},regarding.namespace={ns}");
        if !kind.is_empty() {
            sel.push_str(&format!(",regarding.kind={kind}"));
        }
        if let Ok(list) = newer.list(&ListParams::default().fields(&sel)).await {
            for e in list.items {
                let uid = e.metadata.uid.clone().unwrap_or_default();
                if all.contains_key(&uid) {
                    continue;
                }
                let time = e
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(ts)
                    .unwrap_or_default();
                all.insert(
                    uid,
                    (
                        time,
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default(),
                    ),
                );
            }
        }
        let mut v: Vec<_> = all.into_values().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t, r, m)| (t, r, m)).collect()
    }

    /// The storage.k8s.io version serving `csistoragecapacities` (e.g. "storage.k8s.io/v1alpha1"), if any.
    pub async fn csi_storage_capacity_api_version(&self) -> Option<String> {
        for v in ["v1", "v1beta1", "v1alpha1"] {
            let gv = format!("storage.k8s.io/{v}");
            if let Ok(res) = self.client.list_api_group_resources(&gv).await
                && res
                    .resources
                    .iter()
                    .any(|r| r.name == "csistoragecapacities")
            {
                return Some(gv);
            }
        }
        None
    }

    /// The CSIStorageCapacity objects in the agents' namespace, in the served API version (panics if
    /// none is served).
    pub async fn csi_storage_capacities(&self) -> Api<DynamicObject> {
        let version = self
            .csi_storage_capacity_api_version()
            .await
            .expect("CSIStorageCapacity served");
        let (group, ver) = version.split_once('/').unwrap();
        let resource = kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            group,
            ver,
            "CSIStorageCapacity",
        ));
        Api::namespaced_with(self.client(), AGENT_NAMESPACE, &resource)
    }

    /// Waits until the CSIStorageCapacity objects in the agents' namespace satisfy `done`.
    pub async fn wait_csi_storage_capacities(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[DynamicObject]) -> bool,
    ) {
        let api = self.csi_storage_capacities().await;
        self.wait_for(
            || async {
                api.list(&ListParams::default())
                    .await
                    .map(|l| done(&l.items))
                    .unwrap_or(false)
            },
            timeout,
            what,
        )
        .await;
    }

    /// Waits until `nodes` agents have published their capacity for `class`.
    pub async fn wait_class_capacities(&self, class: &str, nodes: usize, timeout: Duration) {
        self.wait_csi_storage_capacities(
            timeout,
            &format!("capacities of {nodes} nodes for {class}"),
            |items| {
                items
                    .iter()
                    .filter(|o| {
                        o.data.get("storageClassName").and_then(|c| c.as_str()) == Some(class)
                    })
                    .count()
                    >= nodes
            },
        )
        .await;
    }

    /// Waits until claim ns/claim is Bound and returns its PV, which must be one hostvol provisioned.
    pub async fn hostvol_pv_of_claim(
        &self,
        ns: &str,
        claim: &str,
        timeout: Duration,
    ) -> PersistentVolume {
        let pvc = self.wait_pvc_bound(ns, claim, timeout).await;
        let name = pvc.spec.unwrap().volume_name.unwrap();
        hostvol_pvs(self)
            .await
            .into_iter()
            .find(|pv| pv.name_any() == name)
            .unwrap_or_else(|| {
                panic!("PV {name} of claim {ns}/{claim} is not one hostvol provisioned")
            })
    }
}

/// Parses one sample from Prometheus text (`name{labels} value`); `labels` must all be present
/// (e.g. `&[("node", "n1")]`). Returns the first match.
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.trim().parse().ok()
        })
}

/// Entry names directly in `root` (an agent's data root), empty if it cannot be read.
pub fn dirs_in(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// core/v1 Events about the cluster-scoped object `name` (a PV): (type, reason, message).
pub async fn cluster_scoped_events(cluster: &Cluster, name: &str) -> Vec<(String, String, String)> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(cluster.client());
    events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .map(|list| {
            list.items
                .into_iter()
                .map(|e| {
                    (
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every PV hostvol provisioned in the cluster.
pub async fn hostvol_pvs(cluster: &Cluster) -> Vec<PersistentVolume> {
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    pvs.list(&ListParams::default())
        .await
        .expect("list PVs")
        .items
        .into_iter()
        .filter(|pv| {
            pv.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("pv.kubernetes.io/provisioned-by"))
                .is_some_and(|p| p == PROVISIONER)
        })
        .collect()
}

/// The name of the claim a PV is bound to (its claimRef).
pub fn pv_claim(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .unwrap()
        .claim_ref
        .as_ref()
        .unwrap()
        .name
        .clone()
        .unwrap()
}

/// The node a hostvol PV was made on (its `hostvol.io/node` annotation).
pub fn pv_node(pv: &PersistentVolume) -> String {
    pv.annotations()
        .get("hostvol.io/node")
        .cloned()
        .unwrap_or_default()
}

/// The directory of a hostvol PV on the node: its `hostPath` or `local` path, whichever it has.
pub fn pv_host_path(pv: &PersistentVolume) -> &str {
    super::pv::source_path(pv)
        .unwrap_or_else(|| panic!("PV {} has no hostPath or local path", pv.name_any()))
}

/// The volume source a hostvol PV carries: `hostPath` or `local` (the class's `volumeType`).
pub fn pv_volume_type(pv: &PersistentVolume) -> &'static str {
    let spec = pv.spec.as_ref().unwrap();
    match (&spec.host_path, &spec.local) {
        (Some(_), None) => "hostPath",
        (None, Some(_)) => "local",
        other => panic!("PV {} has sources {other:?}", pv.name_any()),
    }
}

/// The name of a hostvol PV's directory in its data root (last component of its hostPath).
pub fn pv_dir_name(pv: &PersistentVolume) -> String {
    pv_host_path(pv).rsplit('/').next().unwrap().to_string()
}
