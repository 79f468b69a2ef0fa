//! When a Node object is deleted its volumes can never be reached again. For classes that opt in
//! (`nodeLossCleanup: "true"`), after a grace period in case the node comes back, hostvol deletes the
//! claims (so StatefulSets re-create them, and the scheduler places them elsewhere) and the PVs of that
//! node. One agent does this at a time, chosen with a Lease.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::controller::context::Context;
use crate::controller::{ownership, pv};
use crate::domain::params::ClassParameters;
use crate::domain::{affinity, naming};

pub const LEASE_NAME: &str = "hostvol-node-loss";
/// The kustomize component that grants what only this feature needs (the base RBAC does not).
pub const COMPONENT: &str = "deploy/components/node-loss-cleanup";
const LEASE_SECONDS: i32 = 30;
const TICK: Duration = Duration::from_secs(5);
/// Objects per list request when looking through every hostvol PV.
const PAGE: u32 = 500;

/// One of our PVs whose node no longer exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranded {
    pub pv: String,
    /// The node that made it (`hostvol.io/node`), or for a volume pinned by a label, that label.
    pub node: String,
    pub class: String,
}

/// What decides whether one PV is stranded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub pv: String,
    /// The node that made it (its `hostvol.io/node` annotation).
    pub node: String,
    pub class: String,
    /// The label key and values its node affinity pins it by, when not the hostname.
    pub pin: Option<(String, Vec<String>)>,
}

/// PVs whose nodes are gone: a volume pinned by hostname when the node that made it is not among
/// `nodes`; one pinned by a label (`nodeAffinityKey`) only when no live node carries one of its
/// values (`live_labels`: the (key, value) pairs live nodes carry), whoever made it.
pub fn stranded(
    volumes: &[Facts],
    nodes: &HashSet<String>,
    live_labels: &HashSet<(String, String)>,
) -> Vec<Stranded> {
    volumes
        .iter()
        .filter_map(|v| {
            let node = match &v.pin {
                Some((key, values)) => {
                    let live: Vec<String> = live_labels
                        .iter()
                        .filter(|(k, _)| k == key)
                        .map(|(_, value)| value.clone())
                        .collect();
                    if !affinity::pin_is_lost(values, &live) {
                        return None;
                    }
                    format!("{key}={}", values.join(","))
                }
                None if !v.node.is_empty() && !nodes.contains(&v.node) => v.node.clone(),
                None => return None,
            };
            Some(Stranded {
                pv: v.pv.clone(),
                node,
                class: v.class.clone(),
            })
        })
        .collect()
}

/// Whether the grace period of a class has passed since the node was first seen missing.
pub fn due(missing_for: Duration, policy: Option<(bool, Duration)>) -> bool {
    matches!(policy, Some((true, grace)) if missing_for >= grace)
}

/// When an agent that does not hold the Lease looks again: when the holder's lease would run out (it
/// renews every `TICK`), not before `TICK`. Every agent polling every `TICK` made the Lease read grow
/// with the fleet (10 GETs a second at 50 nodes in `benches/scale.rs`); this makes it 6 times fewer
/// and takes over as soon as before (a lease can only be taken once it has run out).
pub fn next_look(renewed_ago: Duration, lease: Duration) -> Duration {
    lease.saturating_sub(renewed_ago).max(TICK) + Duration::from_millis(500)
}

/// Takes or renews the Lease: Ok(None) while this agent holds it, Ok(Some(wait)) when another agent
/// does and it is worth looking again only after `wait`.
async fn hold_lease(api: &Api<Lease>, me: &str) -> Result<Option<Duration>, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let Some(lease) = api.get_opt(LEASE_NAME).await? else {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": LEASE_NAME},
            "spec": {"holderIdentity": me, "leaseDurationSeconds": LEASE_SECONDS, "acquireTime": now, "renewTime": now},
        }))
        .expect("valid Lease");
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some(TICK)),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS) as i64;
    let age = spec.renew_time.as_ref().map(|t| {
        k8s_openapi::jiff::Timestamp::now()
            .duration_since(t.0)
            .as_secs()
    });
    let expired = age.is_none_or(|age| age > duration);
    if holder != me && !expired {
        let ago = Duration::from_secs(age.unwrap_or(0).max(0) as u64);
        return Ok(Some(next_look(
            ago,
            Duration::from_secs(duration.max(0) as u64),
        )));
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": lease.resource_version()},
        "spec": {"holderIdentity": me, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
    });
    match api
        .patch(LEASE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some(TICK)),
        Err(e) => Err(e),
    }
}

/// What node-loss clean-up needs beyond the base RBAC: (verb, API group, resource, namespace; "" is
/// every namespace). Claims are deleted in any namespace; the Lease lives in the agents' namespace.
pub fn needed_access(namespace: &str) -> Vec<(&'static str, &'static str, &'static str, String)> {
    let mut needed = vec![("delete", "", "persistentvolumeclaims", String::new())];
    for verb in ["get", "create", "patch"] {
        needed.push((verb, "coordination.k8s.io", "leases", namespace.to_string()));
    }
    needed
}

/// Asks the API server (SelfSubjectAccessReviews, which every authenticated user may create) which
/// of [`needed_access`] this agent lacks, as `verb resource` strings.
pub async fn missing_access(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<String>, kube::Error> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (verb, group, resource, ns) in needed_access(namespace) {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    namespace: (!ns.is_empty()).then(|| ns.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            let place = if ns.is_empty() {
                "all namespaces".to_string()
            } else {
                ns
            };
            missing.push(format!("{verb} {resource} ({place})"));
        }
    }
    Ok(missing)
}

/// Watches the cluster's Node names and acts only when one is missing: a Node deleted, or, once per
/// listing, volumes naming a node that is not there. Idle, it sends nothing but its watch; while
/// volumes are stranded, every agent tries the Lease each `TICK` and the holder sweeps.
pub async fn run(ctx: Arc<Context>, namespace: String, shutdown: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    let me = ctx.settings.node.clone();
    let (nodes, writer) = reflector::store();
    let events = crate::controller::watch_backoff::probed(
        watcher(
            Api::<PartialObjectMeta<Node>>::all(ctx.client.clone()),
            watcher::Config::default(),
        ),
        ctx.api.clone(),
    )
    .modify({
        let ctx = ctx.clone();
        move |n| {
            // Only the name is needed, and the labels classes pin volumes by: a Node's other labels
            // and annotations are most of its metadata.
            let keys = pin_keys(&ctx);
            let name = n.metadata.name.take();
            let labels = n.metadata.labels.take().map(|mut labels| {
                labels.retain(|k, _| keys.contains(k));
                labels
            });
            n.metadata = Default::default();
            n.metadata.name = name;
            n.metadata.labels = labels.filter(|l| !l.is_empty());
        }
    })
    .reflect(writer);
    let mut events = std::pin::pin!(events);
    // Owners (the `hostvol.io/node` label value of their PVs: a node, or a pinned label value) that
    // may have stranded volumes, and since when they are missing.
    let mut suspects: HashSet<String> = HashSet::new();
    let mut missing_since: HashMap<String, Instant> = HashMap::new();
    let mut leading = false;
    // How long until the Lease is worth another look (the holder's renewals, or our own).
    let mut wait = TICK;
    loop {
        let tick = async {
            if suspects.is_empty() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(wait).await
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Delete(node))) => {
                    suspects.insert(naming::node_label_value(&node.name_any()));
                    // The label values it carried may have been the last ones.
                    suspects.extend(
                        node.labels()
                            .iter()
                            .map(|(key, value)| affinity::pin_label_value(key, value)),
                    );
                }
                Some(Ok(watcher::Event::InitDone)) => match missing_nodes(&ctx, &nodes).await {
                    Ok(missing) => suspects.extend(missing),
                    Err(error) => warn!(%error, "cannot list volumes to find those of missing nodes"),
                },
                Some(Ok(_)) => continue,
                Some(Err(error)) => {
                    warn!(watch = "nodes", %error, "watch failed; retrying with backoff");
                    continue;
                }
            },
            _ = tick => {}
        }
        if suspects.is_empty() {
            continue;
        }
        match hold_lease(&leases, &me).await {
            Ok(look_again) => {
                let now_leading = look_again.is_none();
                wait = look_again.unwrap_or(TICK);
                if now_leading != leading {
                    info!(
                        leading = now_leading,
                        "node-loss cleanup leadership changed"
                    );
                }
                leading = now_leading;
            }
            Err(error) => {
                debug!(%error, "cannot take the node-loss lease");
                leading = false;
                wait = TICK;
            }
        }
        if !leading {
            continue;
        }
        match sweep(&ctx, &nodes, &mut suspects, &mut missing_since).await {
            Ok(()) if suspects.is_empty() => {
                // Nothing stranded is left: let the others find that out with one look each.
                if let Err(error) = release_lease(&leases).await {
                    debug!(%error, "cannot release the node-loss lease");
                }
                leading = false;
            }
            Ok(()) => {}
            Err(error) => warn!(%error, "node-loss sweep failed; retrying"),
        }
    }
}

/// The label keys hostvol classes pin volumes by, other than the hostname.
fn pin_keys(ctx: &Context) -> HashSet<String> {
    ctx.classes
        .state()
        .iter()
        .filter(|c| c.provisioner == ctx.settings.provisioner)
        .filter_map(|c| ClassParameters::parse(&c.parameters.clone().unwrap_or_default()).ok())
        .map(|p| p.node_affinity_key)
        .filter(|k| k != affinity::HOSTNAME_KEY)
        .collect()
}

/// Owners of hostvol PVs (any node's) that are not in the cluster: nodes named by PVs pinned by
/// hostname, and pinned label values no cached node carries (the sweep asks the API server before
/// acting). One metadata list per watch listing of the Nodes (start-up, or a relist after the watch
/// lost track).
async fn missing_nodes(
    ctx: &Context,
    nodes: &Store<PartialObjectMeta<Node>>,
) -> Result<HashSet<String>, kube::Error> {
    let api = Api::<PersistentVolume>::all(ctx.client.clone());
    let mut missing = HashSet::new();
    let mut live_pins = HashSet::new();
    for node in nodes.state() {
        for (key, value) in node.labels() {
            live_pins.insert(affinity::pin_label_value(key, value));
        }
    }
    let mut params = ListParams::default().labels(pv::LABEL_NODE).limit(PAGE);
    // In pages: every hostvol PV of the cluster at once would be the agent's largest allocation.
    loop {
        let page = api.list_metadata(&params).await?;
        for v in &page.items {
            let Some(owner) = v.labels().get(pv::LABEL_NODE) else {
                continue;
            };
            let missing_owner = if owner.contains('_') {
                !live_pins.contains(owner) // a pinned label value (node names hold no '_')
            } else {
                v.annotations().get(pv::ANN_NODE).is_some_and(|node| {
                    !node.is_empty() && nodes.get(&ObjectRef::new(node)).is_none()
                })
            };
            if missing_owner {
                missing.insert(owner.clone());
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(missing),
        }
    }
}

/// Takes the suspects' volumes (label-selected per node) and deletes those whose grace has passed;
/// a suspect with no volume left, or that came back, is dropped.
async fn sweep(
    ctx: &Context,
    nodes: &Store<PartialObjectMeta<Node>>,
    suspects: &mut HashSet<String>,
    missing_since: &mut HashMap<String, Instant>,
) -> Result<(), kube::Error> {
    let volumes_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let existing: HashSet<String> = nodes.state().iter().map(|n| n.name_any()).collect();
    suspects.retain(|owner| {
        !existing
            .iter()
            .any(|node| &naming::node_label_value(node) == owner)
    });
    let mut all = Vec::new();
    for owner in suspects.iter() {
        let selector = format!("{}={owner}", pv::LABEL_NODE);
        all.extend(
            volumes_api
                .list(&ListParams::default().labels(&selector))
                .await?
                .items,
        );
    }
    let by_name: BTreeMap<String, &PersistentVolume> =
        all.iter().map(|p| (p.name_any(), p)).collect();
    let facts = volume_facts(&all);
    let live_labels = live_pinned_labels(ctx, &facts).await?;
    let lost = stranded(&facts, &existing, &live_labels);
    track_missing_nodes(missing_since, &lost);
    let owner_of = |p: &PersistentVolume| p.labels().get(pv::LABEL_NODE).cloned();
    suspects.retain(|owner| {
        lost.iter()
            .any(|s| by_name.get(&s.pv).and_then(|p| owner_of(p)).as_ref() == Some(owner))
    });
    for s in lost {
        let policy = cleanup_policy(ctx, &s.class);
        if policy.is_none_or(|(cleanup, _)| !cleanup) {
            continue;
        }
        let missing_for = missing_since
            .get(&s.node)
            .map(Instant::elapsed)
            .unwrap_or_default();
        if !due(missing_for, policy) {
            continue;
        }
        let Some(pv) = by_name.get(&s.pv) else {
            continue;
        };
        // The node label selected it; anyone may set that label on any PV.
        if let Err(why) = ownership::provisioned_by(pv, &ctx.settings.provisioner) {
            warn!(pv = %s.pv, node = %s.node, action = "node-loss clean-up", "leaving PV alone: not a hostvol volume ({why})");
            continue;
        }
        let gone = if by_name.get(&s.pv).is_some_and(|p| pv::pin_of(p).is_some()) {
            format!(
                "no node carries {} since {}s ago",
                s.node,
                missing_for.as_secs()
            )
        } else {
            format!("node {} was deleted {}s ago", s.node, missing_for.as_secs())
        };
        let why = format!(
            "{gone} and StorageClass {} sets nodeLossCleanup; its data cannot be reached again",
            s.class
        );
        delete_claim_of(ctx, pv, &s, &why).await?;
        delete_pv(ctx, &volumes_api, pv, &s, &why).await?;
    }
    // Volumes of classes without the opt-in stay, and so would their node's suspicion: only nodes
    // with volumes to clean keep the agents ticking.
    suspects.retain(|owner| {
        all.iter().any(|p| {
            owner_of(p).as_ref() == Some(owner)
                && cleanup_policy(ctx, &class_of(p)).is_some_and(|(cleanup, _)| cleanup)
        })
    });
    Ok(())
}

/// The (key, value) labels live Nodes carry among those the pinned volumes in `facts` name, asked
/// of the API server (one small list per distinct pin, only while sweeping): a deleted Node's value
/// may live on in a rebuilt node, whose volumes must never be taken for lost.
async fn live_pinned_labels(
    ctx: &Context,
    facts: &[Facts],
) -> Result<HashSet<(String, String)>, kube::Error> {
    let api = Api::<PartialObjectMeta<Node>>::all(ctx.client.clone());
    let pins: HashSet<&(String, Vec<String>)> =
        facts.iter().filter_map(|f| f.pin.as_ref()).collect();
    let mut live = HashSet::new();
    for (key, values) in pins {
        if values.is_empty() {
            continue;
        }
        let selector = format!("{key} in ({})", values.join(","));
        let found = api
            .list_metadata(&ListParams::default().labels(&selector).limit(1))
            .await?;
        live.extend(found.items.iter().filter_map(|n| {
            n.labels()
                .get(key)
                .map(|value| (key.clone(), value.clone()))
        }));
    }
    Ok(live)
}

fn class_of(p: &PersistentVolume) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default()
}

/// Hands the Lease back at once (an empty holder, expiring in a second), so the others' next look
/// finds nothing left rather than waiting for it to expire.
async fn release_lease(api: &Api<Lease>) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"spec": {"holderIdentity": "", "leaseDurationSeconds": 1}});
    api.patch(LEASE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// The input of [`stranded`] for each volume.
fn volume_facts(volumes: &[PersistentVolume]) -> Vec<Facts> {
    volumes
        .iter()
        .map(|p| {
            let node = p
                .annotations()
                .get(pv::ANN_NODE)
                .cloned()
                .unwrap_or_default();
            let class = p
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.clone())
                .unwrap_or_default();
            Facts {
                pv: p.name_any(),
                node,
                class,
                pin: pv::pin_of(p),
            }
        })
        .collect()
}

/// Remembers when each node with stranded volumes was first seen missing; forgets the others.
fn track_missing_nodes(missing_since: &mut HashMap<String, Instant>, lost: &[Stranded]) {
    let gone: HashSet<String> = lost.iter().map(|s| s.node.clone()).collect();
    missing_since.retain(|node, _| gone.contains(node));
    for node in &gone {
        missing_since.entry(node.clone()).or_insert_with(|| {
            info!(%node, "node is gone; its volumes are unreachable");
            Instant::now()
        });
    }
}

/// The class's (nodeLossCleanup, nodeLossGrace); `None` if the class is unknown.
fn cleanup_policy(ctx: &Context, class: &str) -> Option<(bool, Duration)> {
    ctx.classes.get(&ObjectRef::new(class)).map(|class| {
        let params = ClassParameters::parse(&class.parameters.clone().unwrap_or_default())
            .unwrap_or_default();
        (params.node_loss_cleanup, params.node_loss_grace)
    })
}

/// Deletes the claim bound to the lost PV, so its owner (e.g. a StatefulSet) re-creates it and the
/// scheduler places it on another node. Only that very claim (same uid), and not twice.
async fn delete_claim_of(
    ctx: &Context,
    pv: &PersistentVolume,
    s: &Stranded,
    why: &str,
) -> Result<(), kube::Error> {
    let Some(claim) = pv.spec.as_ref().and_then(|spec| spec.claim_ref.clone()) else {
        return Ok(());
    };
    let (Some(ns), Some(name)) = (claim.namespace.clone(), claim.name.clone()) else {
        return Ok(());
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pvc) = claims.get_opt(&name).await? else {
        return Ok(());
    };
    if pvc.uid() != claim.uid || pvc.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    ctx.publish(&pvc.object_ref(&()), EventType::Warning, "NodeLost", "Delete", format!(
        "{why}; deleting this claim so its owner (e.g. a StatefulSet) re-creates it on another node"));
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pvc.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match claims.delete(&name, &params).await {
        Ok(_) => {
            info!(pvc = %format!("{ns}/{name}"), node = %s.node, "deleted claim of a lost node")
        }
        Err(kube::Error::Api(st)) if st.code == 404 || st.code == 409 => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Deletes the lost PV, first dropping our reclaim finalizer: nobody is left to clean the directory
/// on a node that no longer exists.
async fn delete_pv(
    ctx: &Context,
    volumes_api: &Api<PersistentVolume>,
    pv: &PersistentVolume,
    s: &Stranded,
    why: &str,
) -> Result<(), kube::Error> {
    ctx.publish(
        &pv.object_ref(&()),
        EventType::Warning,
        "NodeLost",
        "Delete",
        format!("{why}; deleting this PV"),
    );
    if pv
        .finalizers()
        .iter()
        .any(|f| f == crate::controller::reclaim::FINALIZER)
    {
        let remaining: Vec<&String> = pv
            .finalizers()
            .iter()
            .filter(|f| *f != crate::controller::reclaim::FINALIZER)
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": remaining}});
        volumes_api
            .patch(&s.pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    match volumes_api.delete(&s.pv, &DeleteParams::default()).await {
        Ok(_) => info!(pv = %s.pv, node = %s.node, "deleted PV of a lost node"),
        Err(kube::Error::Api(st)) if st.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feature_needs_claim_delete_and_its_lease() {
        let needed = needed_access("hostvol-system");
        assert!(needed.contains(&("delete", "", "persistentvolumeclaims", String::new())));
        for verb in ["get", "create", "patch"] {
            assert!(needed.contains(&(
                verb,
                "coordination.k8s.io",
                "leases",
                "hostvol-system".into()
            )));
        }
        assert_eq!(needed.len(), 4);
    }

    fn facts(pv: &str, node: &str, pin: Option<(&str, &str)>) -> Facts {
        Facts {
            pv: pv.into(),
            node: node.into(),
            class: "c".into(),
            pin: pin.map(|(k, v)| (k.to_string(), vec![v.to_string()])),
        }
    }

    #[test]
    fn only_volumes_of_missing_nodes_are_stranded() {
        let nodes: HashSet<String> = ["a".to_string()].into();
        let volumes = vec![
            facts("pv1", "a", None),
            facts("pv2", "b", None),
            facts("pv3", "", None),
        ];
        assert_eq!(
            stranded(&volumes, &nodes, &HashSet::new()),
            vec![Stranded {
                pv: "pv2".into(),
                node: "b".into(),
                class: "c".into()
            }]
        );
    }

    #[test]
    fn a_pinned_value_another_live_node_carries_is_not_stranded() {
        let disk = "example.com/disk";
        // Node "old" made the volumes and was deleted; "new" is alive.
        let nodes: HashSet<String> = ["new".to_string()].into();
        let live: HashSet<(String, String)> = [(disk.to_string(), "d1".to_string())].into();
        // (what, volume, stranded as)
        let cases = [
            (
                "pinned to d1, which new carries",
                facts("pv1", "old", Some((disk, "d1"))),
                None,
            ),
            (
                "pinned to d2, which nobody carries",
                facts("pv2", "old", Some((disk, "d2"))),
                Some("example.com/disk=d2"),
            ),
            (
                "pinned to d1, made by a live node: the value decides",
                facts("pv3", "new", Some((disk, "d1"))),
                None,
            ),
            (
                "same value, another key nobody carries",
                facts("pv4", "new", Some(("example.com/rack", "d1"))),
                Some("example.com/rack=d1"),
            ),
            (
                "pinned by hostname to the deleted node",
                facts("pv5", "old", None),
                Some("old"),
            ),
        ];
        for (what, volume, want) in cases {
            let got = stranded(std::slice::from_ref(&volume), &nodes, &live);
            let got = got.first().map(|s| s.node.as_str());
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn agents_without_the_lease_look_again_when_it_can_run_out() {
        let lease = Duration::from_secs(30);
        let half = Duration::from_millis(500);
        assert_eq!(next_look(Duration::ZERO, lease), lease + half);
        assert_eq!(
            next_look(Duration::from_secs(10), lease),
            Duration::from_secs(20) + half
        );
        // Never sooner than the holder renews, never a busy loop near expiry.
        assert_eq!(next_look(Duration::from_secs(29), lease), TICK + half);
        assert_eq!(next_look(Duration::from_secs(300), lease), TICK + half);
    }

    #[test]
    fn cleanup_needs_the_opt_in_and_the_grace_period() {
        let grace = Duration::from_secs(300);
        assert!(
            !due(Duration::from_secs(3600), None),
            "unknown class: never"
        );
        assert!(
            !due(Duration::from_secs(3600), Some((false, grace))),
            "no opt-in: never"
        );
        assert!(!due(Duration::from_secs(299), Some((true, grace))));
        assert!(due(Duration::from_secs(300), Some((true, grace))));
    }
}
