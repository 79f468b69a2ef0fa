//! The provisioning controller: turns claims selected onto this node into directories and hostPath
//! PVs. One pass reads as the story: admit the claim, reserve room on a data root, make the directory,
//! create the PV, tell the user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::controller::claim::{claim_key, claim_spec};
use crate::controller::clone_source::{self, Source};
use crate::controller::context::{self, Context, Error, Result};
use crate::controller::pv::VolumeDescription;
use crate::controller::store::store_ready;
use crate::controller::{expansion, placement, pv, reclaim, reuse};
use crate::domain::admission::{self, Interest, Refusal, VolumeRequest};
use crate::domain::naming;
use crate::domain::params::ClassParameters;
use crate::domain::pattern::ClaimFacts;
use crate::node::quota::Limit;
use crate::node::roots::Root;
use crate::node::volume_store;

/// Outcome of one pass over a claim that is not an API or disk error.
enum Step {
    Provisioned { pv_name: String },
    AlreadyDone,
    NotOurs,
    Refused(Refusal),
}

pub async fn reconcile(
    claim: Arc<PartialObjectMeta<PersistentVolumeClaim>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    // Claims may be listed before the classes and our Node at start-up: decide only once those are
    // known, or a claim would be refused for a class that merely was not listed yet.
    if !(store_ready(&ctx.classes).await && store_ready(&ctx.nodes).await) {
        return Ok(Action::await_change());
    }
    let settings = &ctx.settings;
    match admission::interest(claim.annotations(), &settings.provisioner, &settings.node) {
        Interest::Provision => {}
        Interest::ChooseNode => {
            let span = info_span!("place", node = %settings.node, pvc = %claim_key(&claim));
            return placement::choose_node(&claim, &ctx).instrument(span).await;
        }
        Interest::Bound => {
            let span = info_span!("resize", node = %settings.node, pvc = %claim_key(&claim));
            return expansion::reconcile(&claim, &ctx).instrument(span).await;
        }
        Interest::Ignore => return Ok(Action::await_change()),
    }
    let key = claim_key(&claim);
    let span =
        info_span!("provision", node = %settings.node, pvc = %key, pv = tracing::field::Empty);
    async {
        let started = Instant::now();
        match provision(&claim, &ctx).await {
            Ok(Step::Provisioned { pv_name }) => {
                let seconds = started.elapsed().as_secs_f64();
                ctx.metrics.provision_succeeded(seconds);
                ctx.reset_backoff(&key);
                info!(pv = %pv_name, millis = seconds * 1e3, "provisioned");
                Ok(Action::await_change())
            }
            Ok(Step::AlreadyDone | Step::NotOurs) => {
                ctx.reset_backoff(&key);
                Ok(Action::await_change())
            }
            Ok(Step::Refused(refusal)) => {
                ctx.metrics.provision_refused(refusal.reason());
                warn!(reason = refusal.reason(), message = %refusal.message(), "refused claim");
                // Claim specs are mostly immutable; classes and capacity change, so look again later.
                Ok(Action::requeue(Duration::from_secs(60)))
            }
            Err(error) => {
                ctx.metrics.provision_failed(error.category());
                warn!(%error, "provisioning failed; will retry");
                Err(error)
            }
        }
    }
    .instrument(span)
    .await
}

/// One pass over a claim placed on this node. Each step either moves on or ends the pass with its
/// reason; a crash between any two steps is finished by the next pass (the PV name is the key).
async fn provision(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Step> {
    let Some(pvc) = unbound_claim(claim, ctx).await? else {
        return Ok(Step::AlreadyDone);
    };
    let pv_name = naming::pv_name(&pvc.uid().unwrap_or_default())?;
    tracing::Span::current().record("pv", pv_name.as_str());
    if volume_exists(ctx, &pv_name).await? {
        return Ok(Step::AlreadyDone);
    }
    // Retained data is on its way to this claim (`hostvol reuse`): an empty volume must not win.
    if reuse::targeted(ctx, &pvc.uid().unwrap_or_default()) {
        debug!("claim is the target of a reuse; not provisioning");
        return Ok(Step::AlreadyDone);
    }
    let order = match admit(&pvc, pv_name, ctx)? {
        Admitted::Order(order) => order,
        Admitted::NotOurs => return Ok(Step::NotOurs),
        Admitted::Refused(refusal) => return Ok(refuse(ctx, &pvc, refusal)),
    };
    let order = match with_clone_source(ctx, &pvc, order).await? {
        Ok(order) => order,
        Err(step) => return Ok(step),
    };
    ctx.publish(
        &order.claim_ref,
        EventType::Normal,
        "Provisioning",
        "Provision",
        format!(
            "hostvol agent on node {} is provisioning volume {} for claim {}/{}",
            ctx.settings.node, order.pv_name, order.namespace, order.claim_name
        ),
    );

    // The volume's own lock for the slow part (a copy clone takes minutes); the node's lock only to
    // check the room and reserve the bytes, so concurrent claims cannot both take the last bytes
    // and none waits for another's copy.
    let _volume = ctx.volume_locks.lock(&order.pv_name).await;
    if ctx.recently_created(&order.pv_name) {
        return Ok(Step::AlreadyDone); // another pass of the same claim finished while we waited
    }
    let admitted = {
        let _admission = ctx.admission_lock.lock().await;
        reserve(ctx, &order).map(|(root, pin)| {
            let reservation = ctx.reserve(&order.pv_name, &root.name, order.request.capacity_bytes);
            (root, pin, reservation)
        })
    };
    let (root, pin, reservation) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return hand_back(ctx, &pvc, refusal).await,
    };
    let limit = match make_volume(ctx, &order, &root).await {
        Ok(limit) => limit,
        Err(Error::Disk(volume_store::Error::Taken { path, owner, .. })) => {
            let refusal = Refusal::DirectoryTaken(taken_message(ctx, &root, &path, owner));
            return Ok(refuse(ctx, &pvc, refusal));
        }
        Err(error) => return Err(error),
    };
    if !create_pv(ctx, &order, &root, pin, limit).await? {
        return Ok(Step::AlreadyDone);
    }
    // Counted as created before the reservation goes, so the bytes never drop out in between.
    ctx.remember_created(&order.pv_name, &root.name, order.request.capacity_bytes);
    drop(reservation);
    ctx.publish_fact(
        &order.claim_ref,
        EventType::Normal,
        "ProvisioningSucceeded",
        "Provision",
        format!(
            "Successfully provisioned volume {} ({}) at {} on node {}{}",
            order.pv_name,
            order.request.capacity,
            pv::host_path(&root.host_path, &order.directory),
            ctx.settings.node,
            limit.map_or(String::new(), |l| format!(
                "; size enforced by {} ({})",
                root.quotas.enforcement.label(),
                l.record()
            )),
        ),
    );
    Ok(Step::Provisioned {
        pv_name: order.pv_name,
    })
}

/// The claim as it is now, unless it is gone, being deleted, or already bound.
async fn unbound_claim(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Option<PersistentVolumeClaim>> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let Some(pvc) = claims.get_opt(&claim.name_any()).await? else {
        return Ok(None);
    };
    let bound = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_ref())
        .is_some_and(|v| !v.is_empty());
    Ok((pvc.metadata.deletion_timestamp.is_none() && !bound).then_some(pvc))
}

/// Whether the claim's PV exists: in our cache, or on the server (the cache may lag our own create).
pub(crate) async fn volume_exists(ctx: &Context, pv_name: &str) -> Result<bool> {
    if ctx.volumes.get(&ObjectRef::new(pv_name)).is_some() {
        return Ok(true);
    }
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    Ok(volumes.get_opt(pv_name).await?.is_some())
}

/// What an admitted claim asks this agent to make.
pub(crate) struct Order {
    pub(crate) claim_ref: ObjectReference,
    pub(crate) namespace: String,
    pub(crate) claim_name: String,
    pub(crate) claim_uid: String,
    pub(crate) pv_name: String,
    pub(crate) class_name: String,
    pub(crate) params: ClassParameters,
    pub(crate) request: VolumeRequest,
    pub(crate) reclaim_policy: String,
    pub(crate) directory: String,
    /// For a clone: the source volume's directory, in the same data root, and its PV (whose name or
    /// mark the directory must carry).
    pub(crate) clone_from: Option<(String, String)>,
}

pub(crate) enum Admitted {
    Order(Box<Order>),
    NotOurs,
    Refused(Refusal),
}

/// Admission from the claim and its class alone (no disk, no capacity yet).
pub(crate) fn admit(
    pvc: &PersistentVolumeClaim,
    pv_name: String,
    ctx: &Context,
) -> Result<Admitted> {
    let class_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        return Ok(Admitted::Refused(Refusal::StorageClassMissing(class_name)));
    };
    if class.provisioner != ctx.settings.provisioner {
        debug!(class = %class_name, provisioner = %class.provisioner, "class belongs to another provisioner");
        return Ok(Admitted::NotOurs);
    }
    let params = match ClassParameters::parse(&class.parameters.clone().unwrap_or_default()) {
        Ok(params) => params,
        Err(why) => {
            return Ok(Admitted::Refused(Refusal::InvalidParameters(format!(
                "StorageClass {class_name}: {why}"
            ))));
        }
    };
    let request = match admission::admit(&claim_spec(pvc)) {
        Ok(request) => request,
        Err(refusal) => return Ok(Admitted::Refused(refusal)),
    };
    let namespace = pvc.namespace().unwrap_or_default();
    let facts = ClaimFacts {
        pv: &pv_name,
        namespace: &namespace,
        claim: &pvc.name_any(),
        labels: pvc.labels(),
        annotations: pvc.annotations(),
    };
    let directory = match params.directory_pattern.expand(&facts) {
        Ok(path) => path.as_str().to_string(),
        Err(why) => {
            return Ok(Admitted::Refused(Refusal::DirectoryName(format!(
                "StorageClass {class_name}: {why}"
            ))));
        }
    };
    Ok(Admitted::Order(Box::new(Order {
        claim_ref: pvc.object_ref(&()),
        namespace,
        claim_name: pvc.name_any(),
        claim_uid: pvc.uid().unwrap_or_default(),
        pv_name,
        class_name,
        params,
        request,
        reclaim_policy: class
            .reclaim_policy
            .clone()
            .unwrap_or_else(|| "Delete".into()),
        directory,
        clone_from: None,
    })))
}

/// For a clone, finds its source: here, it records the source's directory; on another node, it moves
/// the claim there; unusable, it refuses. `Err(step)` ends the pass.
async fn with_clone_source(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    mut order: Box<Order>,
) -> Result<std::result::Result<Box<Order>, Step>> {
    let Some(source) = order.request.clone_of.clone() else {
        return Ok(Ok(order));
    };
    match clone_source::resolve(ctx, &order.namespace, &source, &order.class_name).await? {
        Source::Unusable(refusal) => Ok(Err(refuse(ctx, pvc, refusal))),
        Source::OnNode(node) => {
            clone_source::place_on(ctx, pvc, &node, &source).await?;
            Ok(Err(Step::AlreadyDone))
        }
        Source::Here {
            directory,
            bytes,
            root,
            pv_name,
        } => {
            if root != order.params.data_root {
                let refusal = Refusal::CloneSource(format!(
                    "source claim {source} is in data root {root:?}, the class now names {:?}",
                    order.params.data_root
                ));
                return Ok(Err(refuse(ctx, pvc, refusal)));
            }
            if let Err(refusal) = admission::clone_fits(&order.request, bytes, &source) {
                return Ok(Err(refuse(ctx, pvc, refusal)));
            }
            order.clone_from = Some((directory, pv_name));
            Ok(Ok(order))
        }
    }
}

fn refuse(ctx: &Context, pvc: &PersistentVolumeClaim, refusal: Refusal) -> Step {
    ctx.publish(
        &pvc.object_ref(&()),
        EventType::Warning,
        "ProvisioningFailed",
        "Provision",
        refusal.message(),
    );
    Step::Refused(refusal)
}

/// The data root the class names, if it can serve and still has room for the claim on this node,
/// and what the volume is pinned to (`Context::pin_for`). Callers hold the admission lock and reserve
/// the bytes before releasing it.
fn reserve(ctx: &Context, order: &Order) -> std::result::Result<(Arc<Root>, Pin), Refusal> {
    let roots = ctx.roots();
    let node = &ctx.settings.node;
    let pin = ctx.pin_for(&order.params.node_affinity_key).map_err(|key| {
        Refusal::NodeCannotServe(format!(
            "node {node} has no label {key}, which StorageClass {} pins its volumes by (parameter \
             nodeAffinityKey); label the node (kubectl label node {node} {key}=<value>) or use a \
             class without it; handing the claim back to the scheduler",
            order.class_name
        ))
    })?;
    let Some(root) = roots.get(&order.params.data_root) else {
        return Err(Refusal::NodeCannotServe(format!(
            "node {node} has no data root {:?} (StorageClass {} parameter dataRoot; this node has {}); \
             handing the claim back to the scheduler",
            order.params.data_root,
            order.class_name,
            roots.names().join(", ")
        )));
    };
    if let Some(why) = root.problem(node) {
        return Err(Refusal::NodeCannotServe(format!(
            "{why}; handing the claim back to the scheduler"
        )));
    }
    admission::fits(&order.request, ctx.allocatable_bytes(&root.name), node)?;
    Ok((root, pin))
}

/// A `nodeAffinityKey` and this node's value of it (None: pinned by hostname).
pub(crate) type Pin = Option<(String, String)>;

/// Tells the user why this node cannot serve the claim and gives it back to the scheduler.
async fn hand_back(ctx: &Context, pvc: &PersistentVolumeClaim, refusal: Refusal) -> Result<Step> {
    let claim_ref = pvc.object_ref(&());
    let step = refuse(ctx, pvc, refusal);
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    reschedule(&claims, &pvc.name_any()).await?;
    ctx.publish(
        &claim_ref,
        EventType::Normal,
        "ProvisioningReschedule",
        "Provision",
        format!(
            "removed {} so the scheduler picks another node",
            admission::ANN_SELECTED_NODE
        ),
    );
    Ok(step)
}

/// Makes (or finds from an earlier pass) the volume, durably, with its size limit where the root
/// enforces sizes; a clone starts with a copy of its source (on the blocking pool: copies take time).
async fn make_volume(ctx: &Context, order: &Order, root: &Arc<Root>) -> Result<Option<Limit>> {
    // Blocking work (mkdir or copy, and the fsync that commits it) off the async workers.
    let (root, source) = (root.clone(), order.clone_from.clone());
    let (target, pv_name, params, bytes) = (
        order.directory.clone(),
        order.pv_name.clone(),
        order.params.clone(),
        order.request.capacity_bytes,
    );
    let made = tokio::task::spawn_blocking(move || match &source {
        None => root
            .store
            .ensure_owned_volume(&target, &pv_name, &params, &root.quotas, bytes),
        Some((source, source_pv)) => root.store.ensure_clone(
            source,
            source_pv,
            &target,
            &pv_name,
            &params,
            &root.quotas,
            bytes,
        ),
    })
    .await;
    // A panic in the blocking work is an error for this claim, not the end of the agent.
    let made = context::joined(made)
        .and_then(|made| made.map_err(Error::from))
        .map(|(outcome, limit)| {
        let clone_of = order.clone_from.as_ref().map_or("", |(source, _)| source.as_str());
        debug!(directory = %order.directory, ?outcome, ?limit, clone_of, "volume directory ready");
        limit
    });
    made.inspect_err(|error| {
        if matches!(error, Error::Disk(volume_store::Error::Taken { .. })) {
            return; // the caller names the other claim
        }
        ctx.publish(
            &order.claim_ref,
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            format!(
                "node {}: cannot prepare the volume directory: {error}",
                ctx.settings.node
            ),
        );
    })
}

/// Why a claim's directory cannot be used: whose it is, from the PVs this agent knows (the mark on
/// the directory names a PV; a PV at that path names its claim), and what to do.
fn taken_message(ctx: &Context, root: &Root, path: &str, owner: Option<String>) -> String {
    let host_path = pv::host_path(&root.host_path, path);
    // The PV the mark names first: a PV anyone made by hand may point at the path too.
    let volumes = ctx.volumes.state();
    let holder = volumes
        .iter()
        .find(|v| owner.is_some() && owner.as_deref() == v.metadata.name.as_deref())
        .or_else(|| {
            volumes
                .iter()
                .find(|v| pv::source_path(v) == Some(host_path.as_str()))
        })
        .cloned();
    let whose = match holder
        .as_ref()
        .and_then(|v| v.spec.as_ref()?.claim_ref.clone())
    {
        Some(claim) => format!(
            "it is the volume of claim {}/{} (PV {})",
            claim.namespace.unwrap_or_default(),
            claim.name.unwrap_or_default(),
            holder.as_ref().map(|v| v.name_any()).unwrap_or_default()
        ),
        None => match owner {
            Some(pv) => format!(
                "it holds the data of volume {pv}, whose PV is gone (kept by reclaim policy Retain?)"
            ),
            None => "it is not a hostvol volume (made by hand, or kept from earlier)".to_string(),
        },
    };
    format!(
        "node {}: directory {host_path} exists already: {whose}; hostvol will not share or take it over. \
         Rename the claim, change the StorageClass's directoryPattern, or move that directory away",
        ctx.settings.node
    )
}

/// Creates the PV, pre-bound to the claim. `false` if it already exists (an earlier pass made it).
pub(crate) async fn create_pv(
    ctx: &Context,
    order: &Order,
    root: &Root,
    pin: Pin,
    limit: Option<Limit>,
) -> Result<bool> {
    let host_path = pv::host_path(&root.host_path, &order.directory);
    let volume = volume_object(ctx, order, root, &host_path, pin, limit);
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => {
            ctx.publish(&order.claim_ref, EventType::Warning, "ProvisioningFailed", "Provision", format!(
                "node {}: directory {host_path} is ready but creating PV {} failed: {error}; retrying",
                ctx.settings.node, order.pv_name));
            Err(error.into())
        }
    }
}

/// The PV for an order: the hostPath or local volume, plus what reclaim needs to find and dispose of it.
fn volume_object(
    ctx: &Context,
    order: &Order,
    root: &Root,
    host_path: &str,
    pin: Pin,
    limit: Option<Limit>,
) -> PersistentVolume {
    let mut volume = pv::build(&VolumeDescription {
        pv_name: order.pv_name.clone(),
        provisioner: ctx.settings.provisioner.clone(),
        node: ctx.settings.node.clone(),
        node_hostname: ctx.node_hostname(),
        pin,
        host_path: host_path.to_string(),
        claim_namespace: order.namespace.clone(),
        claim_name: order.claim_name.clone(),
        claim_uid: order.claim_uid.clone(),
        storage_class: order.class_name.clone(),
        capacity: order.request.capacity.clone(),
        access_modes: order.request.access_modes.clone(),
        reclaim_policy: order.reclaim_policy.clone(),
        volume_type: order.params.volume_type,
    });
    let annotations = volume.metadata.annotations.get_or_insert_default();
    annotations.insert(pv::ANN_DATA_ROOT.to_string(), root.name.clone());
    if let Some(limit) = limit {
        annotations.insert(pv::ANN_QUOTA.to_string(), limit.record());
    }
    if order.reclaim_policy == "Delete" {
        let on_delete = if order.params.archive_on_delete {
            "archive"
        } else {
            "delete"
        };
        annotations.insert(reclaim::ANN_ON_DELETE.to_string(), on_delete.to_string());
        volume.metadata.finalizers = Some(vec![reclaim::FINALIZER.to_string()]);
    }
    volume
}

/// Drops the claim's selected node so the scheduler chooses again (as sig-storage's ProvisioningReschedule).
pub(super) async fn reschedule(claims: &Api<PersistentVolumeClaim>, name: &str) -> Result<()> {
    let patch =
        serde_json::json!({"metadata": {"annotations": {admission::ANN_SELECTED_NODE: null}}});
    claims
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

pub fn error_policy(
    claim: Arc<PartialObjectMeta<PersistentVolumeClaim>>,
    _error: &Error,
    ctx: Arc<Context>,
) -> Action {
    Action::requeue(ctx.backoff(&claim_key(&claim)))
}
