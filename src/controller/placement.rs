//! Placing claims that no scheduler places: Immediate classes (every agent computes the same choice
//! from the published capacities; only the chosen node's agent acts), pods that name their node in
//! `spec.nodeName`, and clones (on their source's node).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::controller::claim::{claim_spec, data_source, select_node};
use crate::controller::clone_source::{self, Source};
use crate::controller::context::{Context, Result};
use crate::domain::admission::{self, Refusal, VolumeRequest};
use crate::domain::params::ClassParameters;
use crate::domain::placement::{self, Candidate, Requirement, Term};
use crate::domain::quantity;

/// Immediate classes: every agent computes the same choice; only the chosen node's agent places the
/// claim on itself, guarded by the claim's resourceVersion so concurrent writers cannot both succeed.
pub(super) async fn choose_node(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Action> {
    let namespace = claim.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(pvc) = claims.get_opt(&claim.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if let Some(action) = place_clone(&pvc, ctx).await? {
        return Ok(action);
    }
    match choose_for(&pvc, ctx) {
        Ok((request, chosen)) => place_here(&claims, &pvc, &request, &chosen, ctx).await,
        Err(action) => Ok(action),
    }
}

/// A clone can only be made where its source's data is: the source's agent places it there at once,
/// whatever the binding mode (its pods then follow the volume's node affinity). `None` when the claim
/// is not a clone, or its source is unusable on an Immediate class (placed as usual, then refused
/// with the reason by the agent it lands on).
async fn place_clone(pvc: &PersistentVolumeClaim, ctx: &Context) -> Result<Option<Action>> {
    let Some(source) = data_source(pvc).filter(|s| s.is_claim()) else {
        return Ok(None);
    };
    if pvc.annotations().contains_key(admission::ANN_SELECTED_NODE)
        || pvc.metadata.deletion_timestamp.is_some()
    {
        return Ok(Some(Action::await_change()));
    }
    let class_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let waits_for_consumer = ctx
        .classes
        .get(&ObjectRef::new(&class_name))
        .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let namespace = pvc.namespace().unwrap_or_default();
    match clone_source::resolve(ctx, &namespace, &source.name, &class_name).await? {
        Source::Here { .. } => {
            clone_source::place_on(ctx, pvc, &ctx.settings.node, &source.name).await?;
            Ok(Some(Action::await_change()))
        }
        // Its source's agent places it; look again later in case that agent is gone.
        Source::OnNode(_) => Ok(Some(Action::requeue(Duration::from_secs(30)))),
        // e.g. the source is not bound yet: nothing changes on this claim when it is, so look again.
        Source::Unusable(_) if waits_for_consumer => {
            Ok(Some(Action::requeue(Duration::from_secs(30))))
        }
        Source::Unusable(_) => Ok(None),
    }
}

/// For a clone whose source's data is on another node than the one its pod is pinned to: why the
/// clone cannot be placed there (it could only be made where its source is).
async fn clone_pinned_elsewhere(
    ctx: &Context,
    pod: &Pod,
    pvc: &PersistentVolumeClaim,
    class: &str,
) -> Result<Option<String>> {
    let Some(source) = data_source(pvc).filter(|s| s.is_claim()) else {
        return Ok(None);
    };
    let namespace = pvc.namespace().unwrap_or_default();
    let Source::OnNode(node) = clone_source::resolve(ctx, &namespace, &source.name, class).await?
    else {
        return Ok(None);
    };
    Ok(Some(format!(
        "pod {} is pinned to node {} by spec.nodeName, but claim {} clones {} whose data is on node \
         {node}, the only place the clone can be made; pin the pod to {node} or remove spec.nodeName",
        pod.name_any(),
        ctx.settings.node,
        pvc.name_any(),
        source.name
    )))
}

/// A class's `allowedTopologies` as plain terms (none: every node).
pub(crate) fn class_terms(class: &StorageClass) -> Vec<Term> {
    class
        .allowed_topologies
        .iter()
        .flatten()
        .map(|term| {
            term.match_label_expressions
                .iter()
                .flatten()
                .map(|r| Requirement {
                    key: r.key.clone(),
                    values: r.values.clone(),
                })
                .collect()
        })
        .collect()
}

/// Whether `terms` allow this node, by its labels from the watch of our Node (its hostname label
/// alone while that watch has not seen it).
pub(crate) fn own_node_allowed(ctx: &Context, terms: &[Term]) -> bool {
    if terms.is_empty() {
        return true;
    }
    let labels = ctx
        .nodes
        .get(&ObjectRef::new(&ctx.settings.node))
        .map(|n| n.labels().clone())
        .unwrap_or_else(|| {
            [(
                crate::controller::pv::HOSTNAME_LABEL.to_string(),
                ctx.node_hostname(),
            )]
            .into()
        });
    placement::allowed(terms, &labels)
}

/// A claim this young may have been made together with its class.
const NEW_CLAIM_AGE: Duration = Duration::from_secs(10);
const NEW_CLAIM_RETRY: Duration = Duration::from_millis(200);

fn is_new(pvc: &PersistentVolumeClaim) -> bool {
    pvc.metadata.creation_timestamp.as_ref().is_some_and(|t| {
        k8s_openapi::jiff::Timestamp::now()
            .duration_since(t.0)
            .as_secs_f64()
            < NEW_CLAIM_AGE.as_secs_f64()
    })
}

/// A step's outcome: go on with `T`, or stop and return the `Action`.
type Step<T> = std::result::Result<T, Action>;

/// What the claim needs and the node chosen for it, when that node is this one.
fn choose_for(pvc: &PersistentVolumeClaim, ctx: &Context) -> Step<(VolumeRequest, Candidate)> {
    let (class_name, class) = immediate_class(pvc, ctx)?;
    let candidates = ctx.candidates(&class_name, &pvc.uid().unwrap_or_default());
    let voice = Voice {
        ctx,
        claim_ref: pvc.object_ref(&()),
        speaks: placement::spokesperson(&candidates).is_some_and(|c| c.node == ctx.settings.node),
    };
    let request = admit_claim(pvc, &class_name, &class, &voice)?;
    if candidates.is_empty() && is_new(pvc) {
        // A claim made with its class: the class's capacities are being published this very moment
        // (the publisher reacts to the class event); look again shortly instead of giving up.
        debug!(class = %class_name, "no published capacities for the new class yet");
        return Err(Action::requeue(NEW_CLAIM_RETRY));
    }
    let terms = class_terms(&class);
    let chosen = choose_among(&request, &candidates, &class_name, &terms, &voice)?.clone();
    if chosen.node != ctx.settings.node {
        // Another agent will place it; look again later in case that agent is gone.
        return Err(Action::requeue(Duration::from_secs(15)));
    }
    if !own_node_allowed(ctx, &terms) {
        // Our labels changed since we published: the publisher is about to say so; choose again then.
        debug!(class = %class_name, "chosen, but the class's allowedTopologies no longer allow this node");
        return Err(Action::requeue(Duration::from_secs(2)));
    }
    Ok((request, chosen))
}

/// The claim's class name and class, if the claim still waits for a node and its class is one of our
/// Immediate classes.
fn immediate_class(
    pvc: &PersistentVolumeClaim,
    ctx: &Context,
) -> Step<(String, Arc<StorageClass>)> {
    let spec = pvc.spec.clone().unwrap_or_default();
    if pvc.metadata.deletion_timestamp.is_some()
        || spec.volume_name.as_ref().is_some_and(|v| !v.is_empty())
    {
        return Err(Action::await_change());
    }
    if pvc.annotations().contains_key(admission::ANN_SELECTED_NODE) {
        return Err(Action::await_change()); // placed since our watch saw it
    }
    let class_name = spec.storage_class_name.clone().unwrap_or_default();
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        // The class watch may deliver a new class just after the claim made with it.
        let later = if is_new(pvc) {
            NEW_CLAIM_RETRY
        } else {
            Duration::from_secs(30)
        };
        return Err(Action::requeue(later));
    };
    if class.provisioner != ctx.settings.provisioner
        || class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")
    {
        // WaitForFirstConsumer claims are placed by the scheduler (or by a pod's spec.nodeName).
        return Err(Action::await_change());
    }
    Ok((class_name, class))
}

/// Warnings about a claim, which every agent sees alike: only the spokesperson publishes them, so
/// the claim gets one Event, not one per node.
struct Voice<'a> {
    ctx: &'a Context,
    claim_ref: ObjectReference,
    speaks: bool,
}

impl Voice<'_> {
    fn warn(&self, message: String) {
        if self.speaks {
            self.ctx.publish(
                &self.claim_ref,
                EventType::Warning,
                "ProvisioningFailed",
                "Provision",
                message,
            );
        }
    }
}

/// What the claim asks for, if its class's parameters are valid and the claim is one we can serve.
fn admit_claim(
    pvc: &PersistentVolumeClaim,
    class_name: &str,
    class: &StorageClass,
    voice: &Voice<'_>,
) -> Step<VolumeRequest> {
    if let Err(why) = ClassParameters::parse(&class.parameters.clone().unwrap_or_default()) {
        voice.warn(
            Refusal::InvalidParameters(format!("StorageClass {class_name}: {why}")).message(),
        );
        return Err(Action::requeue(Duration::from_secs(60)));
    }
    admission::admit(&claim_spec(pvc)).map_err(|refusal| {
        voice.warn(refusal.message());
        Action::requeue(Duration::from_secs(60))
    })
}

/// The allowed node with the most room for the request, from the published capacities.
fn choose_among<'c>(
    request: &VolumeRequest,
    candidates: &'c [Candidate],
    class: &str,
    terms: &[Term],
    voice: &Voice<'_>,
) -> Step<&'c Candidate> {
    if candidates.is_empty() {
        warn!("no published node capacities (CSIStorageCapacity); cannot place Immediate claims");
        return Err(Action::requeue(Duration::from_secs(30)));
    }
    placement::choose(request.capacity_bytes, candidates).ok_or_else(|| {
        if voice.speaks && !terms.is_empty() {
            let best = placement::best_allowed(candidates)
                .map(|c| (c.node.as_str(), quantity::format_bytes(c.room())));
            voice.warn(placement::topology_refusal(
                class,
                terms,
                &request.capacity,
                best.as_ref().map(|(node, room)| (*node, room.as_str())),
            ));
        } else if voice.speaks {
            let best = placement::spokesperson(candidates).expect("spokesperson exists");
            voice.warn(format!(
                "no node can hold {}: the most room is {} on node {}; free space, raise a node's cap, or request less \
                 (retried when capacity changes)",
                request.capacity, quantity::format_bytes(best.room()), best.node));
        }
        Action::requeue(Duration::from_secs(10))
    })
}

/// Selects this node on the claim, unless another writer changed the claim first.
async fn place_here(
    _claims: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
    request: &VolumeRequest,
    chosen: &Candidate,
    ctx: &Context,
) -> Result<Action> {
    let node = &ctx.settings.node;
    let why = format!(
        "hostvol placed the claim on node {node} (most room: {})",
        quantity::format_bytes(chosen.room())
    );
    let requested = [(
        admission::ANN_REQUESTED_BYTES,
        request.capacity_bytes.to_string(),
    )];
    if select_node(ctx, pvc, node, &requested, why).await? {
        info!(room = chosen.room(), "placed Immediate claim on this node");
    } else {
        debug!("another writer changed the claim first");
    }
    Ok(Action::await_change())
}

/// A pod that names its node in `spec.nodeName` bypasses the scheduler, so its WaitForFirstConsumer
/// claims would never get a selected node. Place them on that node, as the scheduler would have.
pub(super) async fn place_claims_of_pod(pod: &Pod, ctx: &Context) -> Result<()> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let namespace = pod.namespace().unwrap_or_default();
    let claim_names = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.clone())
        });
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    for name in claim_names {
        let Some(meta) = ctx.claims.get(&ObjectRef::new(&name).within(&namespace)) else {
            continue;
        };
        let annotations = meta.annotations();
        if annotations.contains_key(admission::ANN_SELECTED_NODE)
            || annotations.contains_key(admission::ANN_BIND_COMPLETED)
        {
            continue;
        }
        let Some(pvc) = claims.get_opt(&name).await? else {
            continue;
        };
        let spec = pvc.spec.clone().unwrap_or_default();
        if spec.volume_name.as_ref().is_some_and(|v| !v.is_empty()) {
            continue;
        }
        let Some(class) = spec
            .storage_class_name
            .as_ref()
            .and_then(|c| ctx.classes.get(&ObjectRef::new(c)))
        else {
            continue;
        };
        if class.provisioner != ctx.settings.provisioner
            || class.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer")
        {
            continue;
        }
        if let Some(elsewhere) = clone_pinned_elsewhere(ctx, pod, &pvc, &class.name_any()).await? {
            for regarding in [pvc.object_ref(&()), pod.object_ref(&())] {
                ctx.publish(
                    &regarding,
                    EventType::Warning,
                    "ProvisioningFailed",
                    "Provision",
                    elsewhere.clone(),
                );
            }
            continue;
        }
        let terms = class_terms(&class);
        if !own_node_allowed(ctx, &terms) {
            // The scheduler would never have chosen this node for the class; neither do we.
            let refusal = format!(
                "pod {} is pinned to node {} by spec.nodeName, but the allowedTopologies of \
                 StorageClass {} ({}) exclude that node; pin the pod to an allowed node, or use \
                 another class",
                pod.name_any(),
                ctx.settings.node,
                class.name_any(),
                placement::describe(&terms)
            );
            for regarding in [pvc.object_ref(&()), pod.object_ref(&())] {
                ctx.publish(
                    &regarding,
                    EventType::Warning,
                    "ProvisioningFailed",
                    "Provision",
                    refusal.clone(),
                );
            }
            continue;
        }
        let why = format!(
            "pod {} sets spec.nodeName={} (bypassing the scheduler); hostvol places the claim on that node",
            pod.name_any(),
            ctx.settings.node
        );
        if select_node(ctx, &pvc, &ctx.settings.node, &[], why).await? {
            info!(pvc = %format!("{namespace}/{name}"), pod = %pod.name_any(), "pod names this node; placed its claim here");
        }
    }
    Ok(())
}
