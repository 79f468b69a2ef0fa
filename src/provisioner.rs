//! The provisioning controller: turns claims selected onto this node into directories and hostPath PVs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{self, ClaimSpec, Interest, Refusal, VolumeRequest};
use crate::metrics::Metrics;
use crate::naming::{self, NameError};
use crate::params::ClassParameters;
use crate::placement::{self, Candidate};
use crate::pv::{self, VolumeDescription};
use crate::quantity;
use crate::roots::RootSet;
use crate::volume_store;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Disk(#[from] volume_store::Error),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Removal(#[from] crate::removal::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api",
            Error::Disk(e) => e.category(),
            Error::Name(_) => "unsafe_name",
            Error::Removal(e) => e.category(),
        }
    }
}

/// Static settings of one agent.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub provisioner: String,
}

/// Shared state of the controller's reconciles.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// The data roots in force; replaced as a whole when the configuration changes.
    roots: std::sync::RwLock<Arc<RootSet>>,
    pub classes: Store<StorageClass>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// This node's hostvol PVs (label-selected watch).
    pub volumes: Store<PersistentVolume>,
    /// Claim metadata, all namespaces.
    pub claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    /// Every agent's published CSIStorageCapacity objects, when the server serves them.
    pub capacities: Option<Store<DynamicObject>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Woken whenever this node's set of volumes may have changed.
    pub volumes_changed: Arc<tokio::sync::Notify>,
    /// Serialises "check capacity, make directory, create PV" so concurrent claims cannot overcommit.
    admission_lock: tokio::sync::Mutex<()>,
    /// PVs created by us that the watch may not have delivered yet: name -> (root, bytes).
    recent_volumes: Mutex<HashMap<String, (String, u64)>>,
    /// Consecutive failures per claim, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn roots(&self) -> Arc<RootSet> {
        self.roots.read().expect("lock poisoned").clone()
    }

    pub fn replace_roots(&self, roots: RootSet) {
        *self.roots.write().expect("lock poisoned") = Arc::new(roots);
        self.volumes_changed.notify_waiters();
    }

    /// Bytes promised to the volumes in data root `root`: every hostvol PV of this node there,
    /// Released ones included, because their directories still hold data.
    pub fn allocated_bytes(&self, root: &str) -> u64 {
        let mut recent = self.recent_volumes.lock().expect("lock poisoned");
        let mut total = 0u64;
        for pv in self.volumes.state() {
            recent.remove(&pv.name_any());
            if pv_root(&pv) == root {
                total = total.saturating_add(pv_capacity_bytes(&pv));
            }
        }
        total.saturating_add(
            recent
                .values()
                .filter(|(r, _)| r == root)
                .map(|(_, b)| *b)
                .sum::<u64>(),
        )
    }

    /// What a new claim may still take in data root `root` on this node (see `capacity::allocatable`);
    /// nothing if the node has no such root or it cannot serve, so the scheduler and other agents look
    /// elsewhere.
    pub fn allocatable_bytes(&self, root: &str) -> u64 {
        match self.roots().get(root) {
            Some(r) => r.allocatable(&self.settings.node, self.allocated_bytes(root)),
            None => 0,
        }
    }

    pub fn volumes_in(&self, root: &str) -> usize {
        self.volumes
            .state()
            .iter()
            .filter(|pv| pv_root(pv) == root)
            .count()
    }

    /// Every node's room for `class`, from the published capacities (our own from live figures), minus
    /// the bytes of claims already placed on each node and not yet provisioned.
    pub fn candidates(&self, class: &str, except_claim_uid: &str) -> Vec<Candidate> {
        let Some(capacities) = &self.capacities else {
            return Vec::new();
        };
        let mut candidates: Vec<Candidate> = capacities
            .state()
            .iter()
            .filter(|o| o.data.get("storageClassName").and_then(|v| v.as_str()) == Some(class))
            .filter_map(|o| {
                let node = o.annotations().get(pv::ANN_NODE)?.clone();
                // Published figures for every node, ours included: all agents must decide from the same
                // view, or each may think another node wins and nobody acts. Provisioning re-checks the
                // live figure and hands the claim back if it no longer fits.
                let allocatable = quantity::parse_bytes(o.data.get("capacity")?.as_str()?).ok()?;
                Some(Candidate {
                    node,
                    allocatable,
                    pending: 0,
                })
            })
            .collect();
        for claim in self.claims.state() {
            let a = claim.annotations();
            if a.contains_key(admission::ANN_BIND_COMPLETED)
                || claim.uid().as_deref() == Some(except_claim_uid)
            {
                continue;
            }
            let (Some(node), Some(bytes)) = (
                a.get(admission::ANN_SELECTED_NODE),
                a.get(admission::ANN_REQUESTED_BYTES),
            ) else {
                continue;
            };
            if let (Some(c), Ok(bytes)) = (
                candidates.iter_mut().find(|c| &c.node == node),
                bytes.parse::<u64>(),
            ) {
                c.pending = c.pending.saturating_add(bytes);
            }
        }
        candidates
    }

    pub fn node_hostname(&self) -> String {
        self.nodes
            .get(&ObjectRef::new(&self.settings.node))
            .and_then(|n| n.labels().get(pv::HOSTNAME_LABEL).cloned())
            .unwrap_or_else(|| self.settings.node.clone())
    }

    /// Events are published off the critical path; a lost Event is logged, never fatal.
    pub fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let regarding = regarding.clone();
        if regarding.namespace.as_deref().unwrap_or("").is_empty() {
            // Cluster-scoped objects (PVs): some servers (1.20) reject events.k8s.io Events for them, so
            // use a core/v1 Event in "default", as Kubernetes' own PV controller does.
            let client = self.client.clone();
            let (node, provisioner) = (
                self.settings.node.clone(),
                self.settings.provisioner.clone(),
            );
            let reason = reason.to_string();
            tokio::spawn(async move {
                let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                let event = k8s_openapi::api::core::v1::Event {
                    metadata: kube::api::ObjectMeta {
                        generate_name: Some(format!(
                            "{}.",
                            regarding.name.clone().unwrap_or_default()
                        )),
                        namespace: Some("default".into()),
                        ..Default::default()
                    },
                    involved_object: regarding,
                    reason: Some(reason.clone()),
                    message: Some(note),
                    type_: Some(
                        if type_ == EventType::Warning {
                            "Warning"
                        } else {
                            "Normal"
                        }
                        .into(),
                    ),
                    source: Some(k8s_openapi::api::core::v1::EventSource {
                        component: Some(provisioner.clone()),
                        host: Some(node.clone()),
                    }),
                    first_timestamp: Some(now.clone()),
                    last_timestamp: Some(now),
                    count: Some(1),
                    reporting_component: Some(provisioner),
                    reporting_instance: Some(node),
                    ..Default::default()
                };
                let events: Api<k8s_openapi::api::core::v1::Event> =
                    Api::namespaced(client, "default");
                if let Err(error) = events.create(&PostParams::default(), &event).await {
                    warn!(%error, %reason, "could not publish Event");
                }
            });
            return;
        }
        let recorder = self.recorder.clone();
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                warn!(%error, reason = %event.reason, "could not publish Event");
            }
        });
    }

    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("lock poisoned");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        // 250 ms, 500 ms, ... capped at 30 s: a stuck claim is retried often, never left for 15 minutes.
        Duration::from_millis(250u64.saturating_mul(1 << (*n - 1).min(7)))
            .min(Duration::from_secs(30))
    }

    fn reset_backoff(&self, key: &str) {
        self.failures.lock().expect("lock poisoned").remove(key);
    }
}

/// The data root a PV's directory is in (PVs from before named roots are in `default`).
pub fn pv_root(pv: &PersistentVolume) -> &str {
    pv.annotations()
        .get(pv::ANN_DATA_ROOT)
        .map_or(crate::roots::DEFAULT_ROOT, String::as_str)
}

fn pv_capacity_bytes(pv: &PersistentVolume) -> u64 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::parse_bytes(&q.0).ok())
        .unwrap_or(0)
}

fn claim_key(claim: &PartialObjectMeta<PersistentVolumeClaim>) -> String {
    format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    )
}

fn claim_spec(pvc: &PersistentVolumeClaim) -> ClaimSpec {
    let spec = pvc.spec.clone().unwrap_or_default();
    ClaimSpec {
        volume_mode: spec.volume_mode,
        access_modes: spec.access_modes.unwrap_or_default(),
        has_data_source: spec.data_source.is_some() || spec.data_source_ref.is_some(),
        has_selector: spec.selector.is_some(),
        storage_request: spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone())),
    }
}

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
    let settings = &ctx.settings;
    match admission::interest(claim.annotations(), &settings.provisioner, &settings.node) {
        Interest::Provision => {}
        Interest::ChooseNode => {
            let span = info_span!("place", node = %settings.node, pvc = %claim_key(&claim));
            return choose_node(&claim, &ctx).instrument(span).await;
        }
        Interest::Ignore | Interest::Bound => return Ok(Action::await_change()),
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

async fn provision(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Step> {
    let settings = &ctx.settings;
    let namespace = claim.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(pvc) = claims.get_opt(&claim.name_any()).await? else {
        return Ok(Step::AlreadyDone);
    };
    if pvc.metadata.deletion_timestamp.is_some()
        || pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_some_and(|v| !v.is_empty())
    {
        return Ok(Step::AlreadyDone);
    }
    let claim_ref = pvc.object_ref(&());
    let claim_uid = pvc.uid().unwrap_or_default();
    let pv_name = naming::pv_name(&claim_uid)?;
    tracing::Span::current().record("pv", pv_name.as_str());

    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if ctx.volumes.get(&ObjectRef::new(&pv_name)).is_some()
        || volumes.get_opt(&pv_name).await?.is_some()
    {
        return Ok(Step::AlreadyDone);
    }

    let class_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let refuse = |refusal: Refusal| {
        ctx.publish(
            &claim_ref,
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            refusal.message(),
        );
        Ok(Step::Refused(refusal))
    };
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        return refuse(Refusal::StorageClassMissing(class_name));
    };
    if class.provisioner != settings.provisioner {
        debug!(class = %class_name, provisioner = %class.provisioner, "class belongs to another provisioner");
        return Ok(Step::NotOurs);
    }
    let params = match ClassParameters::parse(&class.parameters.clone().unwrap_or_default()) {
        Ok(params) => params,
        Err(why) => {
            return refuse(Refusal::InvalidParameters(format!(
                "StorageClass {class_name}: {why}"
            )));
        }
    };
    let request: VolumeRequest = match admission::admit(&claim_spec(&pvc)) {
        Ok(request) => request,
        Err(refusal) => return refuse(refusal),
    };
    let directory = naming::directory_name(&pv_name, &namespace, &pvc.name_any())?;

    ctx.publish(
        &claim_ref,
        EventType::Normal,
        "Provisioning",
        "Provision",
        format!(
            "hostvol agent on node {} is provisioning volume {pv_name} for claim {namespace}/{}",
            settings.node,
            pvc.name_any()
        ),
    );

    let _admission = ctx.admission_lock.lock().await;
    // Another reconcile of the same claim may have finished while we waited for the lock.
    if ctx
        .recent_volumes
        .lock()
        .expect("lock poisoned")
        .contains_key(&pv_name)
    {
        return Ok(Step::AlreadyDone);
    }
    let roots = ctx.roots();
    let problem = match roots.get(&params.data_root) {
        None => Some(format!(
            "node {} has no data root {:?} (StorageClass {class_name} parameter dataRoot; this node has {})",
            settings.node,
            params.data_root,
            roots.names().join(", ")
        )),
        Some(root) => root.problem(&settings.node),
    };
    if let Some(why) = problem {
        let refusal =
            Refusal::NodeCannotServe(format!("{why}; handing the claim back to the scheduler"));
        ctx.publish(
            &claim_ref,
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            refusal.message(),
        );
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
        return Ok(Step::Refused(refusal));
    }
    let root = roots.get(&params.data_root).expect("checked above");
    let allocatable = ctx.allocatable_bytes(&root.name);
    if let Err(refusal) = admission::fits(&request, allocatable, &settings.node) {
        ctx.publish(
            &claim_ref,
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            refusal.message(),
        );
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
        return Ok(Step::Refused(refusal));
    }

    let outcome = root
        .store
        .ensure_volume_dir(&directory, &params)
        .inspect_err(|error| {
            ctx.publish(
                &claim_ref,
                EventType::Warning,
                "ProvisioningFailed",
                "Provision",
                format!(
                    "node {}: cannot prepare the volume directory: {error}",
                    settings.node
                ),
            );
        })?;
    debug!(%directory, ?outcome, "volume directory ready");

    let host_path = pv::host_path(&root.host_path, &directory);
    let volume = pv::build(&VolumeDescription {
        pv_name: pv_name.clone(),
        provisioner: settings.provisioner.clone(),
        node: settings.node.clone(),
        node_hostname: ctx.node_hostname(),
        host_path: host_path.clone(),
        claim_namespace: namespace.clone(),
        claim_name: pvc.name_any(),
        claim_uid,
        storage_class: class_name,
        capacity: request.capacity.clone(),
        access_modes: request.access_modes.clone(),
        reclaim_policy: class
            .reclaim_policy
            .clone()
            .unwrap_or_else(|| "Delete".into()),
    });
    let mut volume = volume;
    volume
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(pv::ANN_DATA_ROOT.to_string(), root.name.clone());
    if volume
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete")
    {
        volume.metadata.finalizers = Some(vec![crate::reclaim::FINALIZER.to_string()]);
        volume.metadata.annotations.get_or_insert_default().insert(
            crate::reclaim::ANN_ON_DELETE.to_string(),
            if params.archive_on_delete {
                "archive"
            } else {
                "delete"
            }
            .to_string(),
        );
    }
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => return Ok(Step::AlreadyDone),
        Err(error) => {
            ctx.publish(&claim_ref, EventType::Warning, "ProvisioningFailed", "Provision", format!(
                "node {}: directory {host_path} is ready but creating PV {pv_name} failed: {error}; retrying", settings.node));
            return Err(error.into());
        }
    }
    ctx.recent_volumes
        .lock()
        .expect("lock poisoned")
        .insert(pv_name.clone(), (root.name.clone(), request.capacity_bytes));
    ctx.volumes_changed.notify_waiters();
    ctx.publish(
        &claim_ref,
        EventType::Normal,
        "ProvisioningSucceeded",
        "Provision",
        format!(
            "Successfully provisioned volume {pv_name} ({}) at {host_path} on node {}",
            request.capacity, settings.node
        ),
    );
    Ok(Step::Provisioned { pv_name })
}

/// Immediate classes: every agent computes the same choice; only the chosen node's agent places the
/// claim on itself, guarded by the claim's resourceVersion so concurrent writers cannot both succeed.
async fn choose_node(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Action> {
    let settings = &ctx.settings;
    let namespace = claim.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(pvc) = claims.get_opt(&claim.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let spec = pvc.spec.clone().unwrap_or_default();
    if pvc.metadata.deletion_timestamp.is_some()
        || spec.volume_name.as_ref().is_some_and(|v| !v.is_empty())
    {
        return Ok(Action::await_change());
    }
    if pvc.annotations().contains_key(admission::ANN_SELECTED_NODE) {
        return Ok(Action::await_change()); // placed since our watch saw it
    }
    let class_name = spec.storage_class_name.clone().unwrap_or_default();
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    if class.provisioner != settings.provisioner
        || class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")
    {
        // WaitForFirstConsumer claims are placed by the scheduler (or by a pod's spec.nodeName).
        return Ok(Action::await_change());
    }
    let parsed = ClassParameters::parse(&class.parameters.clone().unwrap_or_default());
    let candidates = ctx.candidates(&class_name, &pvc.uid().unwrap_or_default());
    let speaks = placement::spokesperson(&candidates).is_some_and(|c| c.node == settings.node);
    let claim_ref = pvc.object_ref(&());
    let warn = |refusal: &Refusal| {
        if speaks {
            ctx.publish(
                &claim_ref,
                EventType::Warning,
                "ProvisioningFailed",
                "Provision",
                refusal.message(),
            );
        }
    };
    if let Err(why) = parsed {
        warn(&Refusal::InvalidParameters(format!(
            "StorageClass {class_name}: {why}"
        )));
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let request = match admission::admit(&claim_spec(&pvc)) {
        Ok(request) => request,
        Err(refusal) => {
            warn(&refusal);
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };
    if candidates.is_empty() {
        warn!("no published node capacities (CSIStorageCapacity); cannot place Immediate claims");
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let Some(chosen) = placement::choose(request.capacity_bytes, &candidates) else {
        if speaks {
            let best = placement::spokesperson(&candidates).expect("spokesperson exists");
            ctx.publish(&claim_ref, EventType::Warning, "ProvisioningFailed", "Provision", format!(
                "no node can hold {}: the most room is {} on node {}; free space, raise a node's cap, or request less \
                 (retried when capacity changes)",
                request.capacity, quantity::format_bytes(best.room()), best.node));
        }
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    if chosen.node != settings.node {
        // Another agent will place it; look again later in case that agent is gone.
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": pvc.resource_version(),
        "annotations": {
            admission::ANN_SELECTED_NODE: settings.node,
            admission::ANN_REQUESTED_BYTES: request.capacity_bytes.to_string(),
        },
    }});
    match claims
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics.placements.inc();
            info!(room = chosen.room(), "placed Immediate claim on this node");
            ctx.publish(
                &claim_ref,
                EventType::Normal,
                "NodeSelected",
                "Provision",
                format!(
                    "hostvol placed the claim on node {} (most room: {})",
                    settings.node,
                    quantity::format_bytes(chosen.room())
                ),
            );
            Ok(Action::await_change())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            ctx.metrics.placement_conflicts.inc();
            debug!("another writer changed the claim first");
            Ok(Action::await_change())
        }
        Err(error) => Err(error.into()),
    }
}

/// A pod that names its node in `spec.nodeName` bypasses the scheduler, so its WaitForFirstConsumer
/// claims would never get a selected node. Place them on that node, as the scheduler would have.
async fn place_claims_of_pod(pod: &Pod, ctx: &Context) -> Result<()> {
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
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": pvc.resource_version(),
            "annotations": {admission::ANN_SELECTED_NODE: ctx.settings.node},
        }});
        match claims
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                ctx.metrics.placements.inc();
                info!(pvc = %format!("{namespace}/{name}"), pod = %pod.name_any(), "pod names this node; placed its claim here");
                ctx.publish(&pvc.object_ref(&()), EventType::Normal, "NodeSelected", "Provision", format!(
                    "pod {} sets spec.nodeName={} (bypassing the scheduler); hostvol places the claim on that node",
                    pod.name_any(), ctx.settings.node));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                ctx.metrics.placement_conflicts.inc();
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Drops the claim's selected node so the scheduler chooses again (as sig-storage's ProvisioningReschedule).
async fn reschedule(claims: &Api<PersistentVolumeClaim>, name: &str) -> Result<()> {
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

/// The watches an agent keeps, each as narrow as its use allows.
pub struct Watches {
    pub classes: Store<StorageClass>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub volumes: Store<PersistentVolume>,
    pub claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
}

impl Watches {
    pub async fn wait_until_ready(&self) -> bool {
        let synced = |what: &'static str, ok: bool| {
            debug!(watch = what, ok, "synced");
            ok
        };
        let (a, b, c, d) = tokio::join!(
            async { synced("storageclasses", store_ready(&self.classes).await) },
            async { synced("node", store_ready(&self.nodes).await) },
            async { synced("persistentvolumes", store_ready(&self.volumes).await) },
            async { synced("persistentvolumeclaims", store_ready(&self.claims).await) },
        );
        a && b && c && d
    }
}

/// Waits for a store's first sync. kube's readiness signal wakes only one waiter (a oneshot under the
/// hood) and the controller also waits on the claims store, so poll instead of relying on the wake-up.
pub async fn store_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(result) => return result.is_ok(),
            Err(_elapsed) => continue,
        }
    }
}

/// Starts the supporting watches and returns the controller's future, which ends on `shutdown`.
pub fn start(
    client: Client,
    settings: Settings,
    capacity_api: Option<(ApiResource, String)>,
    roots: RootSet,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Watches, Arc<Context>, impl std::future::Future<Output = ()>) {
    fn drive<T, S>(what: &'static str, stream: S)
    where
        S: futures::Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    {
        tokio::spawn(stream.for_each(move |item| {
            if let Err(error) = item {
                warn!(watch = what, %error, "watch failed; retrying with backoff");
            }
            futures::future::ready(())
        }));
    }
    // StorageClasses: few and small; kept whole.
    let (classes, writer) = reflector::store();
    drive(
        "storageclasses",
        watcher(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer),
    );
    // Our own Node, metadata only (a Node's status with its image list is large).
    let (nodes, writer) = reflector::store();
    drive(
        "node",
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", settings.node)),
        )
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .reflect(writer),
    );
    // hostvol PVs of this node only.
    let (volumes, writer) = reflector::store();
    let volumes_changed = Arc::new(tokio::sync::Notify::new());
    let notify = volumes_changed.clone();
    let label = format!(
        "{}={}",
        pv::LABEL_NODE,
        naming::node_label_value(&settings.node)
    );
    let volume_stream = watcher(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default().labels(&label),
    )
    .default_backoff()
    .modify(|pv| pv.managed_fields_mut().clear())
    .reflect(writer)
    .inspect(move |_| notify.notify_waiters())
    .applied_objects();
    // Claims: no server-side filter can select by annotation, so watch metadata only and filter here.
    let (claims, writer) = reflector::store();
    let (provisioner, node) = (settings.provisioner.clone(), settings.node.clone());
    let claim_stream = watcher(
        Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|c| {
        c.managed_fields_mut().clear();
        c.annotations_mut()
            .remove("kubectl.kubernetes.io/last-applied-configuration");
    })
    .reflect(writer)
    .applied_objects()
    .try_filter(move |c| {
        let interest = admission::interest(c.annotations(), &provisioner, &node);
        futures::future::ready(matches!(
            interest,
            Interest::Provision | Interest::ChooseNode
        ))
    });

    // The capacities every agent publishes, for placing Immediate claims.
    let capacities = capacity_api.map(|(resource, namespace)| {
        let writer = reflector::store::Writer::new(resource.clone());
        let reader = writer.as_reader();
        drive(
            "csistoragecapacities",
            watcher(
                Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource),
                watcher::Config::default().labels("app.kubernetes.io/managed-by=hostvol"),
            )
            .default_backoff()
            .modify(|o| o.managed_fields_mut().clear())
            .reflect(writer),
        );
        reader
    });

    let ctx = Arc::new(Context {
        client,
        settings,
        roots: std::sync::RwLock::new(Arc::new(roots)),
        classes: classes.clone(),
        nodes: nodes.clone(),
        volumes: volumes.clone(),
        claims: claims.clone(),
        capacities,
        recorder,
        metrics,
        volumes_changed,
        admission_lock: tokio::sync::Mutex::new(()),
        recent_volumes: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    // Pods bound to this node, streamed (not stored), for pods that set spec.nodeName themselves.
    let pod_ctx = ctx.clone();
    let pods = watcher(
        Api::<Pod>::all(pod_ctx.client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", pod_ctx.settings.node)),
    )
    .default_backoff()
    .applied_objects();
    tokio::spawn(async move {
        let mut pods = std::pin::pin!(pods);
        while let Some(item) = pods.next().await {
            match item {
                Ok(pod) => {
                    if let Err(error) = place_claims_of_pod(&pod, &pod_ctx).await {
                        warn!(%error, pod = %pod.name_any(), "cannot place the claims of a pod on this node");
                    }
                }
                Err(error) => warn!(watch = "pods", %error, "watch failed; retrying with backoff"),
            }
        }
    });

    // Reclaim: this node's PVs once their claims are gone.
    let reclaimer = Controller::for_stream(volume_stream, volumes.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            crate::reclaim::reconcile,
            crate::reclaim::error_policy,
            ctx.clone(),
        )
        .for_each(|result| {
            if let Err(kube::runtime::controller::Error::QueueError(error)) = result {
                warn!(watch = "persistentvolumes", %error, "watch failed; retrying with backoff");
            }
            futures::future::ready(())
        });

    let provisioner = Controller::for_stream(claim_stream, claims.clone())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                Err(kube::runtime::controller::Error::QueueError(error)) => {
                    warn!(watch = "persistentvolumeclaims", %error, "watch failed; retrying with backoff")
                }
                Err(error) => debug!(%error, "controller event"),
                Ok(_) => {}
            }
            futures::future::ready(())
        });
    let controller = async move {
        futures::join!(provisioner, reclaimer);
    };
    (
        Watches {
            classes,
            nodes,
            volumes,
            claims,
        },
        ctx,
        controller,
    )
}
