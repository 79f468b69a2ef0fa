//! Publishes this node's allocatable bytes as one `CSIStorageCapacity` per hostvol StorageClass, so the
//! scheduler never places a pod on a node whose disk cannot hold its claim.
//!
//! The scheduler finds our `CSIDriver` (named after the provisioner, `storageCapacity: true`) and then
//! compares each claim's request with these objects' `capacity`/`maximumVolumeSize` for the node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::controller::capacity::NodeFigures;
use crate::controller::context::Context;
use crate::controller::pv;
use crate::domain::naming;

pub const LABEL_STORAGE_CLASS: &str = "hostvol.io/storage-class";
const FIELD_MANAGER: &str = "hostvol-agent";
/// Newest first: the API moved from v1alpha1 (1.19-1.20) to v1beta1 (1.21-1.23) to v1 (1.24+).
const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha1"];

/// Finds which version of CSIStorageCapacity the server serves, if any.
pub async fn discover(client: &Client) -> Option<ApiResource> {
    let group = match kube::discovery::group(client, "storage.k8s.io").await {
        Ok(group) => group,
        Err(error) => {
            warn!(%error, "cannot discover storage.k8s.io");
            return None;
        }
    };
    VERSIONS.iter().find_map(|version| {
        group
            .versioned_resources(version)
            .into_iter()
            .find(|(resource, _)| resource.kind == "CSIStorageCapacity")
            .map(|(resource, _)| resource)
    })
}

/// Deterministic object name for (node, class): found again after a restart, never duplicated.
pub fn object_name(node: &str, class: &str) -> String {
    let hash = format!("{node}/{class}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    format!("hostvol-{hash:016x}")
}

fn desired(
    resource: &ApiResource,
    name: &str,
    node: &str,
    hostname: &str,
    class: &str,
    allocatable: u64,
    owner: Option<&OwnerReference>,
) -> DynamicObject {
    let mut object = DynamicObject::new(name, resource);
    object.metadata.labels = Some(BTreeMap::from([
        (pv::LABEL_NODE.to_string(), naming::node_label_value(node)),
        (
            LABEL_STORAGE_CLASS.to_string(),
            naming::node_label_value(class),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "hostvol".to_string(),
        ),
    ]));
    object.metadata.owner_references = owner.map(|o| vec![o.clone()]);
    // The exact node name (labels may shorten it), read by other agents to place Immediate claims.
    object.metadata.annotations = Some(BTreeMap::from([(
        pv::ANN_NODE.to_string(),
        node.to_string(),
    )]));
    object.data = serde_json::json!({
        "storageClassName": class,
        "nodeTopology": {"matchLabels": {pv::HOSTNAME_LABEL: hostname}},
        "capacity": allocatable.to_string(),
    });
    // maximumVolumeSize arrived in v1beta1 (1.21); v1alpha1 servers reject the unknown field.
    if resource.version != "v1alpha1" {
        object.data["maximumVolumeSize"] = serde_json::json!(allocatable.to_string());
    }
    object
}

/// The agent's own pod, as owner of its objects, so they go when the agent is removed.
async fn owner(client: &Client, namespace: &str, pod_name: Option<&str>) -> Option<OwnerReference> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod_name?)
        .await
        .ok()?;
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.name_any(),
        uid: pod.uid()?,
        ..Default::default()
    })
}

/// Keeps the objects in step with the capacity reports until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    mut reports: watch::Receiver<NodeFigures>,
    namespace: String,
    pod_name: Option<String>,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    if !crate::controller::watches::store_ready(&ctx.classes).await {
        return;
    }
    let Some(resource) = discover(&client).await else {
        warn!(
            "the API server serves no CSIStorageCapacity; capacity-aware scheduling is off (admission still refuses claims that do not fit)"
        );
        return;
    };
    info!(api_version = %resource.api_version, "publishing CSIStorageCapacity");
    let node = ctx.settings.node.clone();
    let mut publisher = Publisher {
        api: Api::namespaced_with(client.clone(), &namespace, &resource),
        selector: format!("{}={}", pv::LABEL_NODE, naming::node_label_value(&node)),
        resource,
        node,
        owner: None,
        written: HashMap::new(),
    };
    loop {
        if publisher.owner.is_none() && pod_name.is_some() {
            publisher.owner = owner(&client, &namespace, pod_name.as_deref()).await;
        }
        reports.borrow_and_update();
        let hostname = ctx.node_hostname();
        let wanted = publisher
            .write_changed(&hostname, &class_capacities(&ctx))
            .await;
        publisher.prune(&wanted).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
            // A new class gets its objects at once, so the scheduler can place its pods.
            _ = ctx.classes_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Each hostvol class with its capacity on this node: that of the data root it names (zero if the
/// node has none).
fn class_capacities(ctx: &Context) -> Vec<(String, u64)> {
    ctx.classes
        .state()
        .iter()
        .filter(|c| c.provisioner == ctx.settings.provisioner)
        .map(|c| {
            let root = crate::domain::params::ClassParameters::parse(
                &c.parameters.clone().unwrap_or_default(),
            )
            .map(|p| p.data_root)
            .unwrap_or_else(|_| crate::domain::params::DEFAULT_ROOT.to_string());
            (c.name_any(), ctx.allocatable_bytes(&root))
        })
        .collect()
}

/// What an object was last written with: (hostname, allocatable bytes, owner uid).
type Written = (String, u64, Option<String>);

/// This node's CSIStorageCapacity objects, and what we know we wrote to them.
struct Publisher {
    api: Api<DynamicObject>,
    resource: ApiResource,
    node: String,
    /// Label selector of this node's objects.
    selector: String,
    /// Looked up until found: the agent may start before its pod object is visible.
    owner: Option<OwnerReference>,
    /// What we last wrote, per object name, to skip writes that change nothing.
    written: HashMap<String, Written>,
}

impl Publisher {
    /// Writes the object of each class whose figures changed since we last wrote it. Returns the
    /// objects this node should have, by name, with the capacity each should show.
    async fn write_changed(
        &mut self,
        hostname: &str,
        classes: &[(String, u64)],
    ) -> HashMap<String, u64> {
        let owner_uid = self.owner.as_ref().map(|o| o.uid.clone());
        let mut wanted = HashMap::new();
        for (class, allocatable) in classes {
            let name = object_name(&self.node, class);
            wanted.insert(name.clone(), *allocatable);
            let state = (hostname.to_string(), *allocatable, owner_uid.clone());
            if self.written.get(&name) != Some(&state) {
                self.write(name, class, state).await;
            }
        }
        wanted
    }

    async fn write(&mut self, name: String, class: &str, state: Written) {
        let (hostname, allocatable) = (&state.0, state.1);
        let object = desired(
            &self.resource,
            &name,
            &self.node,
            hostname,
            class,
            allocatable,
            self.owner.as_ref(),
        );
        match self
            .api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
        {
            Ok(_) => {
                debug!(%name, class = %class, allocatable, "CSIStorageCapacity updated");
                self.written.insert(name, state);
            }
            Err(error) => warn!(%name, %error, "cannot update CSIStorageCapacity; retrying"),
        }
    }

    /// Deletes the objects of classes that are gone or no longer ours, and forgets what we wrote to
    /// objects that something else deleted or changed.
    async fn prune(&mut self, wanted: &HashMap<String, u64>) {
        let Ok(list) = self
            .api
            .list(&ListParams::default().labels(&self.selector))
            .await
        else {
            return;
        };
        for stale in list
            .items
            .iter()
            .map(|o| o.name_any())
            .filter(|n| !wanted.contains_key(n))
        {
            self.written.remove(&stale);
            if let Err(error) = self.api.delete(&stale, &DeleteParams::default()).await {
                debug!(name = %stale, %error, "cannot delete stale CSIStorageCapacity");
            }
        }
        // Something else (the garbage collector, a user) deleted or changed one of ours: write it
        // again, so the scheduler never works from figures we did not publish.
        // The server may rewrite the quantity in canonical form ("75G"), so compare bytes.
        let intact: Vec<String> = list
            .items
            .iter()
            .filter(|o| {
                o.data
                    .get("capacity")
                    .and_then(|c| c.as_str())
                    .and_then(|c| crate::domain::quantity::parse_bytes(c).ok())
                    == wanted.get(&o.name_any()).copied()
            })
            .map(|o| o.name_any())
            .collect();
        self.written.retain(|name, _| intact.contains(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_valid_and_distinct() {
        let a = object_name("node-a", "hostvol");
        assert_eq!(a, object_name("node-a", "hostvol"));
        assert_ne!(a, object_name("node-b", "hostvol"));
        assert_ne!(a, object_name("node-a", "fast"));
        assert!(
            a.len() <= 63
                && a.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
