//! Publishes this node's allocatable bytes as one `CSIStorageCapacity` per hostvol StorageClass, so the
//! scheduler never places a pod on a node whose disk cannot hold its claim.
//!
//! The scheduler finds our `CSIDriver` (named after the provisioner, `storageCapacity: true`) and then
//! compares each claim's request with these objects' `capacity`/`maximumVolumeSize` for the node.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::controller::capacity::NodeFigures;
use crate::controller::context::Context;
use crate::controller::placement;
use crate::controller::pv;
use crate::controller::store::Changes;
use crate::domain::capacity::{PublishReason, Published, publish_reason};
use crate::domain::naming;
use crate::domain::params::ClassParameters;
use crate::domain::placement::ANN_EXCLUDED;

pub const LABEL_STORAGE_CLASS: &str = "hostvol.io/storage-class";
const FIELD_MANAGER: &str = "hostvol-agent";
/// Newest first: the API moved from v1alpha1 (1.19-1.20) to v1beta1 (1.21-1.23) to v1 (1.24+).
const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha1"];

/// Finds which version of CSIStorageCapacity the server serves, if any: asks for each version's
/// resource list (a version the server does not serve answers 404) and lets [`pick_version`] choose.
pub async fn discover(client: &Client) -> Option<ApiResource> {
    let mut served = Vec::new();
    for version in VERSIONS {
        match client
            .list_api_group_resources(&format!("{GROUP}/{version}"))
            .await
        {
            Ok(list) => served.push(list),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => warn!(%error, version, "cannot discover {GROUP}"),
        }
    }
    pick_version(&served)
}

const GROUP: &str = "storage.k8s.io";

/// The newest CSIStorageCapacity version among the server's `storage.k8s.io` resource lists: `v1`
/// wherever it is served (1.24+, the only one from 1.27), else `v1beta1` (1.21-1.23), else `v1alpha1`
/// (1.19-1.20, behind a feature gate). `None` when no list has it.
pub fn pick_version(
    served: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList],
) -> Option<ApiResource> {
    VERSIONS.iter().find_map(|version| {
        let group_version = format!("{GROUP}/{version}");
        served
            .iter()
            .filter(|list| list.group_version == group_version)
            .flat_map(|list| &list.resources)
            .find(|r| r.kind == "CSIStorageCapacity" && r.name == "csistoragecapacities")
            .map(|r| {
                let gvk = kube::api::GroupVersionKind::gvk(GROUP, version, &r.kind);
                ApiResource::from_gvk_with_plural(&gvk, &r.name)
            })
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
    figures: &Published,
    class: &str,
    owner: Option<&OwnerReference>,
) -> DynamicObject {
    let (hostname, allocatable) = (&figures.hostname, figures.capacity);
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
    let mut annotations = BTreeMap::from([(pv::ANN_NODE.to_string(), node.to_string())]);
    // Other agents place Immediate claims only on nodes whose agent says the class allows them.
    if figures.excluded {
        annotations.insert(ANN_EXCLUDED.to_string(), "true".to_string());
    }
    object.metadata.annotations = Some(annotations);
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
/// our pod appearing (the owner), our node's labels. It reads its objects from the watch cache and
/// never lists. What it writes is the report it was woken with (already thresholded by the tracker),
/// and only when `publish_reason` says it is news: the echo of its own write wakes it, but finds
/// nothing to do.
pub async fn run(
    ctx: Arc<Context>,
    mut reports: watch::Receiver<NodeFigures>,
    resource: Option<ApiResource>,
    namespace: String,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    if !crate::controller::store::store_ready(&ctx.classes).await
        || !crate::controller::store::store_ready(&ctx.nodes).await
    {
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
    // The channel starts with empty figures: publishing them would tell the scheduler the node is full.
    while reports.borrow_and_update().observed_at.is_none() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
        }
    }
    info!(api_version = %resource.api_version, "publishing CSIStorageCapacity");
    let mut owner = ctx.own_pod.subscribe();
    let mut publisher = Publisher {
        api: Api::namespaced_with(client.clone(), &namespace, &resource),
        resource,
        node: ctx.settings.node.clone(),
        written: HashMap::new(),
        warned: HashMap::new(),
    };
    let mut retry = Duration::from_secs(1);
    loop {
        // While the API server is away, no write of our own: the shared probe says when it is back.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.api.until_api_answers() => {}
        }
        let figures = reports.borrow_and_update().clone();
        let owner_ref = owner.borrow_and_update().clone();
        publisher.check(&published, &ctx.capacity_changes);
        let (wanted, invalid) =
            class_capacities(&ctx, &figures, owner_ref.as_ref().map(|o| o.uid.clone()));
        publisher.warn_invalid(&ctx, &invalid);
        let ok = publisher
            .write_changed(&wanted, figures.change_threshold, owner_ref.as_ref())
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

/// What one object should say: its class and figures.
struct Wanted {
    class: String,
    figures: Published,
}

/// A hostvol class whose parameters do not parse, and why: it gets no capacity anywhere.
struct Invalid {
    class: Arc<StorageClass>,
    why: String,
}

/// Each valid hostvol class with its capacity on this node, from `figures`: that of the data root
/// it names (zero if the node has none, or if the class's `allowedTopologies` exclude the node).
/// Classes with invalid parameters get none (no claim of them can be provisioned anywhere).
fn class_capacities(
    ctx: &Context,
    figures: &NodeFigures,
    owner: Option<String>,
) -> (HashMap<String, Wanted>, Vec<Invalid>) {
    let hostname = ctx.node_hostname();
    let mut wanted = HashMap::new();
    let mut invalid = Vec::new();
    for c in ctx
        .classes
        .state()
        .into_iter()
        .filter(|c| c.provisioner == ctx.settings.provisioner)
    {
        let (root, key) = match ClassParameters::parse(&c.parameters.clone().unwrap_or_default()) {
            Ok(p) => (p.data_root, p.node_affinity_key),
            Err(why) => {
                invalid.push(Invalid { class: c, why });
                continue;
            }
        };
        // A node without the class's nodeAffinityKey label cannot serve it: the scheduler is told
        // as for a node the class's topology excludes.
        let excluded = !placement::own_node_allowed(ctx, &placement::class_terms(&c))
            || ctx.pin_for(&key).is_err();
        let of_root = figures.roots.iter().find(|r| r.name == root);
        let class = c.name_any();
        let figures = Published {
            hostname: hostname.clone(),
            owner: owner.clone(),
            excluded,
            allocated: of_root.map_or(0, |r| r.allocated_bytes),
            capacity: match of_root {
                Some(r) if !excluded => r.allocatable_bytes,
                _ => 0,
            },
            root,
        };
        wanted.insert(
            object_name(&ctx.settings.node, &class),
            Wanted { class, figures },
        );
    }
    (wanted, invalid)
}

/// What an object says that the scheduler and other agents read: (hostname, capacity, owner uid,
/// excluded by topology).
type OnObject = (String, u64, Option<String>, bool);

fn on_object(figures: &Published) -> OnObject {
    (
        figures.hostname.clone(),
        figures.capacity,
        figures.owner.clone(),
        figures.excluded,
    )
}

/// The same read back from a published object.
fn observed(object: &DynamicObject) -> OnObject {
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
    let excluded = object
        .annotations()
        .get(ANN_EXCLUDED)
        .is_some_and(|v| v == "true");
    (hostname, capacity, owner, excluded)
}

/// Our own writes the watch may still deliver, per object: enough for a burst of writes whose
/// echoes arrive late, each recognised by its resourceVersion.
const OWN_VERSIONS: usize = 4;

/// What we last wrote to an object, and the resourceVersions our recent writes produced.
struct Written {
    figures: Published,
    versions: VecDeque<String>,
}

/// This node's CSIStorageCapacity objects, and what we know we wrote to them.
struct Publisher {
    api: Api<DynamicObject>,
    resource: ApiResource,
    node: String,
    /// What we last wrote, per object name, to skip writes that change nothing material.
    written: HashMap<String, Written>,
    /// Invalid classes warned about, by name: the uid and resourceVersion warned for, so a class
    /// gets one Warning per change (per agent), not one per pass.
    warned: HashMap<String, String>,
}

impl Publisher {
    /// Forgets what we wrote to objects the watch saw deleted or changed by someone else, so the
    /// next pass writes them again: the scheduler must never work from figures we did not publish.
    /// The echo of our own write (its resourceVersion is one we got back) is not such a change.
    fn check(&mut self, published: &Store<DynamicObject>, changes: &Changes) {
        let (touched, relisted) = changes.take();
        let namespace = self.api.namespace().unwrap_or_default().to_string();
        let differs = |name: &String, written: &Written| {
            published
                .get(&ObjectRef::new_with(name, self.resource.clone()).within(&namespace))
                .is_none_or(|o| {
                    let ours = o
                        .resource_version()
                        .is_some_and(|v| written.versions.contains(&v));
                    !ours && observed(&o) != on_object(&written.figures)
                })
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

    /// One Warning per invalid class (and change of it), on the class: it gets no capacity until it
    /// is re-created with valid parameters.
    fn warn_invalid(&mut self, ctx: &Context, invalid: &[Invalid]) {
        self.warned
            .retain(|name, _| invalid.iter().any(|i| i.class.name_any() == *name));
        for Invalid { class, why } in invalid {
            let version = format!(
                "{}/{}",
                class.uid().unwrap_or_default(),
                class.resource_version().unwrap_or_default()
            );
            let name = class.name_any();
            if self.warned.get(&name) == Some(&version) {
                continue;
            }
            warn!(class = %name, %why, "StorageClass has invalid parameters; publishing no capacity for it");
            ctx.publish(
                &class.object_ref(&()),
                EventType::Warning,
                "InvalidParameters",
                "PublishCapacity",
                format!(
                    "StorageClass {name}: {why}; hostvol publishes no capacity for it on node {}, so \
                     no claim of it is placed there; re-create the class with valid parameters",
                    self.node
                ),
            );
            self.warned.insert(name, version);
        }
    }

    /// Writes the object of each class whose figures changed materially since we last wrote it.
    /// False if a write failed (retried after a backoff).
    async fn write_changed(
        &mut self,
        wanted: &HashMap<String, Wanted>,
        threshold: u64,
        owner: Option<&OwnerReference>,
    ) -> bool {
        let mut ok = true;
        for (name, want) in wanted {
            let previous = self.written.get(name).map(|w| &w.figures);
            if let Some(reason) = publish_reason(previous, &want.figures, threshold) {
                ok &= self.write(name, want, reason, owner).await;
            }
        }
        ok
    }

    async fn write(
        &mut self,
        name: &str,
        want: &Wanted,
        reason: PublishReason,
        owner: Option<&OwnerReference>,
    ) -> bool {
        let object = desired(
            &self.resource,
            name,
            &self.node,
            &want.figures,
            &want.class,
            owner,
        );
        match self
            .api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
        {
            Ok(written) => {
                debug!(%name, class = %want.class, allocatable = want.figures.capacity, reason = reason.as_str(), "CSIStorageCapacity updated");
                let entry = self
                    .written
                    .entry(name.to_string())
                    .or_insert_with(|| Written {
                        figures: want.figures.clone(),
                        versions: VecDeque::new(),
                    });
                entry.figures = want.figures.clone();
                if let Some(version) = written.resource_version() {
                    if entry.versions.len() == OWN_VERSIONS {
                        entry.versions.pop_front();
                    }
                    entry.versions.push_back(version);
                }
                true
            }
            Err(error) => {
                warn!(%name, %error, "cannot update CSIStorageCapacity; retrying");
                false
            }
        }
    }

    /// Deletes this node's objects of classes that are gone, no longer ours or invalid (from the
    /// watch cache).
    async fn prune(&mut self, published: &Store<DynamicObject>, wanted: &HashMap<String, Wanted>) {
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

    /// `storage.k8s.io/<version>` resource lists as the API servers of each release answer
    /// `GET /apis/storage.k8s.io/<version>` (trimmed to a few resources; verbs as served).
    fn recorded(
        version: &str,
        resources: &[(&str, &str)],
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList {
        let resources: Vec<serde_json::Value> = resources
            .iter()
            .map(|(name, kind)| {
                serde_json::json!({
                    "name": name, "singularName": "", "namespaced": *kind == "CSIStorageCapacity",
                    "kind": kind,
                    "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                    "storageVersionHash": "x"
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("storage.k8s.io/{version}"),
            "resources": resources,
        }))
        .expect("an APIResourceList")
    }

    const V1_BASE: &[(&str, &str)] = &[
        ("csidrivers", "CSIDriver"),
        ("csinodes", "CSINode"),
        ("storageclasses", "StorageClass"),
        ("volumeattachments", "VolumeAttachment"),
        ("volumeattachments/status", "VolumeAttachment"),
    ];

    fn with_capacity(base: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut all = base.to_vec();
        all.push(("csistoragecapacities", "CSIStorageCapacity"));
        all
    }

    #[test]
    fn discovery_picks_the_newest_served_csistoragecapacity() {
        let v1_with = with_capacity(V1_BASE);
        let alpha_beta = with_capacity(&[("volumeattachments", "VolumeAttachment")]);
        let cases: [(&str, Vec<_>, Option<&str>); 5] = [
            // 1.20 without the alpha API enabled: no capacity objects at all.
            (
                "1.20",
                vec![recorded("v1", V1_BASE), recorded("v1beta1", V1_BASE)],
                None,
            ),
            // 1.20 with --runtime-config=storage.k8s.io/v1alpha1=true (as CI runs it).
            (
                "1.20+alpha",
                vec![
                    recorded("v1", V1_BASE),
                    recorded("v1beta1", V1_BASE),
                    recorded("v1alpha1", &alpha_beta),
                ],
                Some("storage.k8s.io/v1alpha1"),
            ),
            // 1.21-1.23: beta only.
            (
                "1.23",
                vec![recorded("v1", V1_BASE), recorded("v1beta1", &alpha_beta)],
                Some("storage.k8s.io/v1beta1"),
            ),
            // 1.24-1.26: v1 and the deprecated v1beta1 side by side; v1 wins.
            (
                "1.26",
                vec![recorded("v1beta1", &alpha_beta), recorded("v1", &v1_with)],
                Some("storage.k8s.io/v1"),
            ),
            // 1.27+: v1beta1 removed (its list 404s, so it is absent); v1 only.
            (
                "1.27",
                vec![recorded("v1", &v1_with)],
                Some("storage.k8s.io/v1"),
            ),
        ];
        for (release, served, want) in cases {
            let got = pick_version(&served);
            assert_eq!(
                got.as_ref().map(|r| r.api_version.as_str()),
                want,
                "{release}"
            );
            if let Some(r) = got {
                assert_eq!(
                    (r.group.as_str(), r.kind.as_str(), r.plural.as_str()),
                    (
                        "storage.k8s.io",
                        "CSIStorageCapacity",
                        "csistoragecapacities"
                    ),
                    "{release}"
                );
            }
        }
    }

    #[test]
    fn discovery_ignores_a_subresource_or_another_group_of_the_same_kind() {
        let mut other = recorded("v1", &[("csistoragecapacities", "CSIStorageCapacity")]);
        other.group_version = "example.com/v1".into();
        let sub = recorded(
            "v1",
            &[("csistoragecapacities/status", "CSIStorageCapacity")],
        );
        assert!(pick_version(&[other, sub]).is_none());
    }
}
