//! Publishes this node's allocatable bytes as one `CSIStorageCapacity` per hostvol StorageClass, so the
//! scheduler never places a pod on a node whose disk cannot hold its claim.
//!
//! The scheduler finds our `CSIDriver` (named after the provisioner, `storageCapacity: true`) and then
//! compares each claim's request with these objects' `capacity`/`maximumVolumeSize` for the node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::controller::capacity::NodeFigures;
use crate::controller::context::Context;
use crate::controller::pv;
use crate::controller::store::Changes;
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

/// Whether a published object is this node's (by the exact node name, labels may be shortened).
pub fn is_of_node(object: &DynamicObject, node: &str) -> bool {
    object.annotations().get(pv::ANN_NODE).map(String::as_str) == Some(node)
}

/// Keeps the objects in step with the capacity reports until `shutdown`. Woken only by what changes
/// them: a class event, a material capacity change, a change to one of our objects seen by the watch,
/// our pod appearing (the owner). It reads its objects from the watch cache and never lists.
pub async fn run(
    ctx: Arc<Context>,
    mut reports: watch::Receiver<NodeFigures>,
    resource: Option<ApiResource>,
    namespace: String,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    if !crate::controller::store::store_ready(&ctx.classes).await {
        return;
    }
    let (Some(published), Some(resource)) = (ctx.capacities.clone(), resource) else {
        warn!(
            "the API server serves no CSIStorageCapacity; capacity-aware scheduling is off (admission still refuses claims that do not fit)"
        );
        return;
    };
    if !crate::controller::store::store_ready(&published).await {
        return;
    }
    info!(api_version = %resource.api_version, "publishing CSIStorageCapacity");
    let mut owner = ctx.own_pod.subscribe();
    let mut publisher = Publisher {
        api: Api::namespaced_with(client.clone(), &namespace, &resource),
        resource,
        node: ctx.settings.node.clone(),
        written: HashMap::new(),
    };
    let mut retry = Duration::from_secs(1);
    loop {
        // While the API server is away, no write of our own: the shared probe says when it is back.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.api.until_api_answers() => {}
        }
        reports.borrow_and_update();
        let owner_ref = owner.borrow_and_update().clone();
        publisher.check(&published, &ctx.capacity_changes);
        let wanted = class_capacities(&ctx);
        let ok = publisher
            .write_changed(&ctx.node_hostname(), &wanted, owner_ref.as_ref())
            .await;
        publisher.prune(&published, &wanted).await;
        // Only a failed write waits on a timer (with backoff); otherwise nothing happens until an
        // event says the figures, the classes or our objects changed.
        let wait = retry;
        let api = ctx.api.clone();
        let backoff = async move {
            if ok {
                std::future::pending::<()>().await
            } else {
                // A failed write: tell the shared probe, then wait for it (never retry on our own
                // while the API server is away) and for the backoff.
                api.failed();
                tokio::join!(tokio::time::sleep(wait), api.until_api_answers());
            }
        };
        retry = if ok {
            Duration::from_secs(1)
        } else {
            (retry * 2).min(crate::controller::watch_backoff::MAX_BACKOFF)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
            _ = ctx.classes_changed.notified() => {}
            _ = ctx.capacity_changes.notified() => {}
            changed = owner.changed() => if changed.is_err() { return },
            _ = backoff => {}
        }
    }
}

/// Each hostvol class with its capacity on this node: that of the data root it names (zero if the
/// node has none).
fn class_capacities(ctx: &Context) -> HashMap<String, (String, u64)> {
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
            let class = c.name_any();
            (
                object_name(&ctx.settings.node, &class),
                (class, ctx.allocatable_bytes(&root)),
            )
        })
        .collect()
}

/// What an object was written with: (hostname, allocatable bytes, owner uid).
type Written = (String, u64, Option<String>);

/// The same figures read back from a published object.
fn observed(object: &DynamicObject) -> Written {
    let hostname = object.data["nodeTopology"]["matchLabels"][pv::HOSTNAME_LABEL]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The server may rewrite the quantity in canonical form ("75G"), so compare bytes.
    let capacity = object.data["capacity"]
        .as_str()
        .and_then(|c| crate::domain::quantity::parse_bytes(c).ok())
        .unwrap_or(u64::MAX);
    let owner = object.owner_references().first().map(|o| o.uid.clone());
    (hostname, capacity, owner)
}

/// This node's CSIStorageCapacity objects, and what we know we wrote to them.
struct Publisher {
    api: Api<DynamicObject>,
    resource: ApiResource,
    node: String,
    /// What we last wrote, per object name, to skip writes that change nothing.
    written: HashMap<String, Written>,
}

impl Publisher {
    /// Forgets what we wrote to objects the watch saw deleted or changed by someone else, so the
    /// next pass writes them again: the scheduler must never work from figures we did not publish.
    fn check(&mut self, published: &Store<DynamicObject>, changes: &Changes) {
        let (touched, relisted) = changes.take();
        let differs = |name: &String, written: &Written| {
            published
                .get(
                    &ObjectRef::new_with(name, self.resource.clone())
                        .within(self.api.namespace().unwrap_or_default()),
                )
                .is_none_or(|o| observed(&o) != *written)
        };
        if relisted {
            self.written.retain(|name, w| !differs(name, w));
        } else {
            for name in touched {
                if let Some(w) = self.written.get(&name)
                    && differs(&name, w)
                {
                    debug!(%name, "CSIStorageCapacity changed or deleted by someone else; writing it again");
                    self.written.remove(&name);
                }
            }
        }
    }

    /// Writes the object of each class whose figures changed since we last wrote it. False if a
    /// write failed (retried after a backoff).
    async fn write_changed(
        &mut self,
        hostname: &str,
        wanted: &HashMap<String, (String, u64)>,
        owner: Option<&OwnerReference>,
    ) -> bool {
        let owner_uid = owner.map(|o| o.uid.clone());
        let mut ok = true;
        for (name, (class, allocatable)) in wanted {
            let state = (hostname.to_string(), *allocatable, owner_uid.clone());
            if self.written.get(name) != Some(&state) {
                ok &= self.write(name.clone(), class, state, owner).await;
            }
        }
        ok
    }

    async fn write(
        &mut self,
        name: String,
        class: &str,
        state: Written,
        owner: Option<&OwnerReference>,
    ) -> bool {
        let (hostname, allocatable) = (&state.0, state.1);
        let object = desired(
            &self.resource,
            &name,
            &self.node,
            hostname,
            class,
            allocatable,
            owner,
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
                true
            }
            Err(error) => {
                warn!(%name, %error, "cannot update CSIStorageCapacity; retrying");
                false
            }
        }
    }

    /// Deletes this node's objects of classes that are gone or no longer ours (from the watch cache).
    async fn prune(
        &mut self,
        published: &Store<DynamicObject>,
        wanted: &HashMap<String, (String, u64)>,
    ) {
        let stale: Vec<String> = published
            .state()
            .iter()
            .filter(|o| is_of_node(o, &self.node) && o.metadata.deletion_timestamp.is_none())
            .map(|o| o.name_any())
            .filter(|n| !wanted.contains_key(n))
            .collect();
        for name in stale {
            self.written.remove(&name);
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => debug!(%name, "stale CSIStorageCapacity deleted"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(error) => debug!(%name, %error, "cannot delete stale CSIStorageCapacity"),
            }
        }
        self.written.retain(|name, _| wanted.contains_key(name));
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
