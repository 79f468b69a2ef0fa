//! The state every reconcile and task of the agent shares: the client, the settings, the watch caches,
//! the data roots in force, and the bookkeeping that keeps concurrent claims from overcommitting.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::DynamicObject;
use kube::core::PartialObjectMeta;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use crate::controller::events::EventRecorder;
use crate::controller::metrics::Metrics;
use crate::controller::pv;
use crate::controller::store::Changes;
use crate::controller::volume_locks::VolumeLocks;
use crate::controller::watch_backoff::ApiProbe;
use crate::domain::admission;
use crate::domain::naming::NameError;
use crate::domain::placement::Candidate;
use crate::domain::quantity;
use crate::node::roots::{Root, RootSet};
use crate::node::{removal, volume_store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Disk(#[from] volume_store::Error),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Removal(#[from] removal::Error),
    /// A panic while handling this one object: an error for it (Warning Event, retry with backoff).
    #[error("internal error (a bug in hostvol; please report it): {0}")]
    Panicked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api",
            Error::Disk(e) => e.category(),
            Error::Name(_) => "unsafe_name",
            Error::Removal(e) => e.category(),
            Error::Panicked(_) => "panic",
        }
    }
}

/// Static settings of one agent.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub provisioner: String,
    /// The agent's own pod (namespace, name), owner of its CSIStorageCapacity objects, if known.
    pub pod: Option<(String, String)>,
}

/// Shared state of the controller's reconciles.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// The data roots in force; replaced as a whole when the configuration changes.
    pub(super) roots: parking_lot::RwLock<Arc<RootSet>>,
    pub classes: Store<StorageClass>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// This node's hostvol PVs (label-selected watch).
    pub volumes: Store<PersistentVolume>,
    /// Claim metadata, all namespaces.
    pub claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    /// Every agent's published CSIStorageCapacity objects, when the server serves them.
    pub capacities: Option<Store<DynamicObject>>,
    pub events: Arc<EventRecorder>,
    pub metrics: Arc<Metrics>,
    /// Whether the API server answers; every retry loop waits on it (see `watch_backoff`).
    pub api: Arc<ApiProbe>,
    /// Woken whenever this node's set of volumes may have changed.
    pub volumes_changed: Arc<tokio::sync::Notify>,
    /// A permit on every StorageClass event (and change of our Node, whose labels the classes'
    /// `allowedTopologies` select on), for the one task that publishes per-class figures.
    pub classes_changed: Arc<tokio::sync::Notify>,
    /// Changes to this node's own CSIStorageCapacity objects seen by the watch, for the publisher.
    pub capacity_changes: Arc<Changes>,
    /// The agent's own Pod as an owner reference, once the pod watch has seen it.
    pub own_pod: tokio::sync::watch::Sender<
        Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    >,
    /// Serialises "check the room, reserve the bytes" so concurrent claims and expansions cannot
    /// overcommit. Held for the arithmetic only: the slow work runs under the volume's own lock.
    pub(super) admission_lock: tokio::sync::Mutex<()>,
    /// Bytes reserved by admissions and expansions still at work: key -> (root, bytes).
    pub(super) reserved: Mutex<HashMap<String, (String, u64)>>,
    /// One lock per volume, for the slow work on it.
    pub volume_locks: VolumeLocks,
    /// The edited directory annotation each PV was last warned about: one Warning per edit.
    pub(super) directory_edits: Mutex<HashMap<String, String>>,
    /// PVs created by us that the watch may not have delivered yet: name -> (root, bytes, when).
    pub(super) recent_volumes: Mutex<HashMap<String, (String, u64, Instant)>>,
    /// PVs this agent just grew whose new size the watch may not have delivered: name -> (root, bytes).
    pub(super) recent_growth: Mutex<HashMap<String, (String, u64)>>,
    /// Consecutive failures per claim, for exponential backoff.
    pub(super) failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// An Event where users look (`kubectl describe`); published off the critical path, never fatal.
    pub fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.events
            .publish(&self.client, regarding, type_, reason, action, note);
    }

    /// An Event stating a fact about an object, published once per (object, reason) however often
    /// a reconcile reaches it (see `EventRecorder::publish_fact`).
    pub fn publish_fact(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.events
            .publish_fact(&self.client, regarding, type_, reason, action, note);
    }

    pub fn roots(&self) -> Arc<RootSet> {
        self.roots.read().clone()
    }

    pub fn replace_roots(&self, roots: RootSet) {
        *self.roots.write() = Arc::new(roots);
        self.volumes_changed.notify_waiters();
    }

    /// Bytes promised to the volumes in data root `root`: every hostvol PV of this node there,
    /// Released ones included, because their directories still hold data.
    pub fn allocated_bytes(&self, root: &str) -> u64 {
        let roots = self.roots();
        let mut recent = self.recent_volumes.lock();
        let mut growth = self.recent_growth.lock();
        let mut total = 0u64;
        for pv in self.volumes.state() {
            let name = pv.name_any();
            recent.remove(&name);
            let mut bytes = pv::capacity_bytes(&pv);
            if let Some((_, grown)) = growth.get(&name) {
                if *grown <= bytes {
                    growth.remove(&name); // the watch caught up
                } else {
                    bytes = *grown;
                }
            }
            if volume_root(&roots, &pv) == root {
                total = total.saturating_add(bytes);
            }
        }
        let known: std::collections::HashSet<String> = self
            .volumes
            .state()
            .iter()
            .map(|pv| pv.name_any())
            .collect();
        growth.retain(|name, _| known.contains(name));
        // A reservation whose PV is already counted (created, the guard not yet dropped) counts once.
        let reserved: u64 = self
            .reserved
            .lock()
            .iter()
            .filter(|(key, (r, _))| {
                r == root && !known.contains(*key) && !recent.contains_key(*key)
            })
            .map(|(_, (_, b))| *b)
            .sum();
        total
            .saturating_add(
                recent
                    .values()
                    .filter(|(r, _, _)| r == root)
                    .map(|(_, b, _)| *b)
                    .sum::<u64>(),
            )
            .saturating_add(reserved)
    }

    /// Counts `bytes` in data root `root` as taken until the guard is dropped (the work that needed
    /// them is done or failed). Call under the admission lock, right after checking they fit.
    pub fn reserve(&self, key: &str, root: &str, bytes: u64) -> Reservation<'_> {
        self.reserved
            .lock()
            .insert(key.to_string(), (root.to_string(), bytes));
        Reservation {
            ctx: self,
            key: key.to_string(),
        }
    }

    /// The data root and directory of one of our PVs: from its immutable source path (`spec.hostPath.path` or `spec.local.path`),
    /// inside one of this node's data roots (`pv::volume_directory`); None otherwise. A directory not
    /// named for the PV (`directoryPattern`) is acted on only after the node checks its mark. Warns
    /// once per edit when the directory annotation says something else.
    pub fn volume_directory(&self, pv: &PersistentVolume) -> Option<(Arc<Root>, String)> {
        self.check_directory_annotation(pv);
        holding_root(&self.roots(), pv)
    }

    /// A Warning Event on the PV, once per edited value, when its `hostvol.io/directory` annotation no
    /// longer says where its directory is: the agent goes on using the real one, people should know.
    pub fn check_directory_annotation(&self, pv: &PersistentVolume) {
        let Some(real) = pv::source_path(pv) else {
            return;
        };
        let name = pv.name_any();
        let annotated = pv.annotations().get(pv::ANN_DIRECTORY);
        {
            let mut edits = self.directory_edits.lock();
            match annotated {
                Some(annotated) if annotated != real => {
                    if edits.get(&name) == Some(annotated) {
                        return; // already said
                    }
                    edits.insert(name.clone(), annotated.clone());
                }
                _ => {
                    edits.remove(&name);
                    return;
                }
            }
        }
        let annotated = annotated.map(String::as_str).unwrap_or_default();
        tracing::warn!(pv = %name, annotation = %annotated, directory = %real,
            "directory annotation edited; the agent acts on the PV's own directory");
        self.publish(
            &kube::Resource::object_ref(pv, &()),
            EventType::Warning,
            "DirectoryAnnotationEdited",
            "Verify",
            format!(
                "annotation {} says {annotated:?}, but this volume's directory is {real} \
                 ({}, which cannot change); hostvol reads and limits {real} only \
                 and ignores the annotation: set it back to {real}",
                pv::ANN_DIRECTORY,
                pv::source_field(pv)
            ),
        );
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
        let roots = self.roots();
        self.volumes
            .state()
            .iter()
            .filter(|pv| volume_root(&roots, pv) == root)
            .count()
    }

    /// Every node's room for `class`, from the published capacities (our own from live figures), minus
    /// the bytes of claims already placed on each node and not yet provisioned.
    pub fn candidates(&self, class: &str, except_claim_uid: &str) -> Vec<Candidate> {
        let Some(capacities) = &self.capacities else {
            return Vec::new();
        };
        // Published figures for every node, ours included: all agents must decide from the same
        // view, or each may think another node wins and nobody acts. Provisioning re-checks the
        // live figure and hands the claim back if it no longer fits.
        let mut candidates: Vec<Candidate> = capacities
            .state()
            .iter()
            .filter_map(|o| published_candidate(o, class))
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

    /// This node's labels (those of its Node object, as the node watch last saw them).
    pub fn node_labels(&self) -> std::collections::BTreeMap<String, String> {
        self.nodes
            .get(&ObjectRef::new(&self.settings.node))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// What a volume of a class pinned by `key` is pinned to on this node: `Ok(None)` for the
    /// hostname (the usual node affinity), `Ok(Some((key, value)))` for another label this node
    /// carries, `Err` naming the label when the node lacks it.
    pub fn pin_for(&self, key: &str) -> std::result::Result<Option<(String, String)>, String> {
        if key == crate::domain::affinity::HOSTNAME_KEY {
            return Ok(None);
        }
        match self.node_labels().remove(key) {
            Some(value) => Ok(Some((key.to_string(), value))),
            None => Err(key.to_string()),
        }
    }

    pub fn node_hostname(&self) -> String {
        self.nodes
            .get(&ObjectRef::new(&self.settings.node))
            .and_then(|n| n.labels().get(pv::HOSTNAME_LABEL).cloned())
            .unwrap_or_else(|| self.settings.node.clone())
    }

    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock();
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        // 250 ms, 500 ms, ... capped at 30 s: a stuck claim is retried often, never left for 15 minutes.
        Duration::from_millis(250u64.saturating_mul(1 << (*n - 1).min(7)))
            .min(Duration::from_secs(30))
    }

    /// Whether this agent created the PV moments ago (its watch may not have delivered it yet).
    pub fn recently_created(&self, pv_name: &str) -> bool {
        self.recent_volumes.lock().contains_key(pv_name)
    }

    /// Counts a PV just created until the watch delivers it, so the next admission sees its bytes.
    pub fn remember_created(&self, pv_name: &str, root: &str, bytes: u64) {
        self.recent_volumes.lock().insert(
            pv_name.to_string(),
            (root.to_string(), bytes, Instant::now()),
        );
        self.volumes_changed.notify_waiters();
    }

    /// A PV's size, including a growth the watch has not delivered yet.
    pub fn volume_bytes(&self, pv: &PersistentVolume) -> u64 {
        let recorded = pv::capacity_bytes(pv);
        self.recent_growth
            .lock()
            .get(&pv.name_any())
            .map_or(recorded, |(_, grown)| recorded.max(*grown))
    }

    /// Counts a PV's new size until the watch delivers it, so admission sees the bytes at once.
    pub fn remember_growth(&self, pv_name: &str, root: &str, bytes: u64) {
        self.recent_growth
            .lock()
            .insert(pv_name.to_string(), (root.to_string(), bytes));
        self.volumes_changed.notify_waiters();
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures.lock().remove(key);
    }

    /// Drops every per-claim and per-PV entry whose object is gone from the watch caches, so nothing
    /// is left behind when claims and PVs go (called on their watches' deletions and relists).
    pub fn forget_gone(&self) {
        let claim_gone = |key: &str| match key.split_once('/') {
            Some((ns, name)) => self.claims.get(&ObjectRef::new(name).within(ns)).is_none(),
            None => true,
        };
        let volume_gone = |name: &str| self.volumes.get(&ObjectRef::new(name)).is_none();
        {
            let mut failures = self.failures.lock();
            failures.retain(|key, _| match key.strip_prefix("pv/") {
                Some(pv) => !volume_gone(pv),
                None => !claim_gone(key),
            });
            shrink(&mut failures);
        }
        {
            let mut growth = self.recent_growth.lock();
            growth.retain(|pv, _| !volume_gone(pv));
            shrink(&mut growth);
        }
        {
            let mut edits = self.directory_edits.lock();
            edits.retain(|pv, _| !volume_gone(pv));
            shrink(&mut edits);
        }
        {
            // Created but never delivered (deleted at once, or a watch gap): not for ever.
            let mut recent = self.recent_volumes.lock();
            recent.retain(|_, (_, _, at)| at.elapsed() < RECENT_FOR);
            shrink(&mut recent);
        }
        // Events about PVs are core/v1 Events, never remembered; those about claims are.
        self.events.forget(claim_gone);
        self.metrics.set_state_entries(&self.state_entries());
    }

    /// Per-object entries held now, by map: what `forget_gone` must bring to zero once every claim
    /// and PV is gone (the usage cache and the volume gauges follow the PV cache on their own).
    pub fn state_entries(&self) -> [(&'static str, usize); 5] {
        [
            ("failures", self.failures.lock().len()),
            ("recent_volumes", self.recent_volumes.lock().len()),
            ("recent_growth", self.recent_growth.lock().len()),
            ("directory_edits", self.directory_edits.lock().len()),
            ("events", self.events.remembered()),
        ]
    }
}

/// The data root a PV's directory is in: the configured root holding its immutable hostPath; the one
/// its editable annotation names only when none does (a root whose host path was reconfigured), so an
/// edit cannot move a volume's bytes out of the root that really holds them.
pub fn volume_root(roots: &RootSet, pv: &PersistentVolume) -> String {
    holding_root(roots, pv).map_or_else(
        || pv::data_root(pv).to_string(),
        |(root, _)| root.name.clone(),
    )
}

/// The root holding a PV's immutable hostPath and the directory relative to it; the innermost one
/// should a root's host path lie inside another's (a path below parents fits both).
pub fn holding_root(roots: &RootSet, pv: &PersistentVolume) -> Option<(Arc<Root>, String)> {
    roots
        .all()
        .filter_map(|root| Some((root.clone(), pv::volume_directory(pv, &root.host_path)?)))
        .max_by_key(|(root, _)| root.host_path.len())
}

/// Bytes counted as taken while the work that needs them runs; given back when dropped.
pub struct Reservation<'a> {
    ctx: &'a Context,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.ctx.reserved.lock().remove(&self.key);
    }
}

/// How long a PV we created counts without its watch event.
const RECENT_FOR: Duration = Duration::from_secs(120);

/// A map that held a burst keeps its buckets after `retain`: give them back once mostly empty.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// A node's room for `class` from a CSIStorageCapacity another agent (or this one) published: its
/// node annotation and `capacity`. None when the object is for another class or its figures are
/// missing or malformed (anyone with write access could publish one), so it is simply not a candidate.
pub fn published_candidate(object: &DynamicObject, class: &str) -> Option<Candidate> {
    if object.data.get("storageClassName").and_then(|v| v.as_str()) != Some(class) {
        return None;
    }
    let node = object.annotations().get(pv::ANN_NODE)?.clone();
    let allocatable = quantity::parse_bytes(object.data.get("capacity")?.as_str()?).ok()?;
    // Published by the node's agent, which alone knows its node's labels (see domain::placement).
    let allowed = object
        .annotations()
        .get(crate::domain::placement::ANN_EXCLUDED)
        .is_none_or(|v| v != "true");
    Some(Candidate {
        node,
        allocatable,
        pending: 0,
        allowed,
    })
}

/// A blocking task's outcome, its panic turned into an error for the one object it worked on.
pub fn joined<T>(result: std::result::Result<T, tokio::task::JoinError>) -> Result<T> {
    result.map_err(|e| match e.try_into_panic() {
        Ok(panic) => Error::Panicked(crate::controller::supervisor::panic_message(&*panic)),
        Err(e) => Error::Panicked(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::events::Reporter;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher::Event;

    /// A client that is never called: `forget_gone` works on the caches alone.
    fn offline_client() -> Client {
        let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, std::io::Error>(std::io::Error::other(
                "offline",
            ))
        });
        Client::new(service, "default")
    }

    fn claim(ns: &str, name: &str) -> PartialObjectMeta<PersistentVolumeClaim> {
        let mut c = PartialObjectMeta::<PersistentVolumeClaim>::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some(ns.into());
        c
    }

    fn volume(name: &str) -> PersistentVolume {
        let mut pv = PersistentVolume::default();
        pv.metadata.name = Some(name.into());
        pv
    }

    fn context() -> (
        Context,
        Writer<PartialObjectMeta<PersistentVolumeClaim>>,
        Writer<PersistentVolume>,
    ) {
        let (claims, claim_writer) = reflector::store();
        let (volumes, volume_writer) = reflector::store();
        let ctx = Context {
            client: offline_client(),
            settings: Settings {
                node: "n".into(),
                provisioner: "p".into(),
                pod: None,
            },
            roots: parking_lot::RwLock::new(Arc::new(RootSet::default())),
            classes: reflector::store().0,
            nodes: reflector::store().0,
            volumes,
            claims,
            capacities: None,
            events: Arc::new(EventRecorder::new(Reporter {
                controller: "p".into(),
                instance: "n".into(),
                node: "n".into(),
            })),
            metrics: Arc::new(Metrics::default()),
            api: ApiProbe::new(offline_client()),
            volumes_changed: Arc::default(),
            classes_changed: Arc::default(),
            capacity_changes: Arc::default(),
            own_pod: tokio::sync::watch::Sender::new(None),
            admission_lock: tokio::sync::Mutex::new(()),
            reserved: Mutex::default(),
            volume_locks: VolumeLocks::default(),
            directory_edits: Mutex::default(),
            recent_volumes: Mutex::default(),
            recent_growth: Mutex::default(),
            failures: Mutex::default(),
        };
        (ctx, claim_writer, volume_writer)
    }

    #[tokio::test]
    async fn reserved_bytes_count_until_the_volume_does() {
        let (ctx, _claims, mut volumes) = context();
        const MIB: u64 = 1 << 20;
        let reservation = ctx.reserve("pv-a", "default", 3 * MIB);
        let growth = ctx.reserve("grow/pv-b", "default", MIB);
        assert_eq!(ctx.allocated_bytes("default"), 4 * MIB);
        assert_eq!(ctx.allocated_bytes("other"), 0, "per root");
        // Created: counted once, as a recent volume, while the guard is still held.
        ctx.remember_created("pv-a", "default", 3 * MIB);
        assert_eq!(ctx.allocated_bytes("default"), 4 * MIB);
        drop(reservation);
        drop(growth);
        assert_eq!(ctx.allocated_bytes("default"), 3 * MIB);
        // A failed attempt gives its bytes back.
        drop(ctx.reserve("pv-c", "default", 5 * MIB));
        assert_eq!(ctx.allocated_bytes("default"), 3 * MIB);
        // A PV the watch delivered counts by itself, not again through a reservation.
        let _late = ctx.reserve("pv-d", "default", 7 * MIB);
        volumes.apply_watcher_event(&Event::Apply(volume("pv-d")));
        assert_eq!(
            ctx.allocated_bytes("default"),
            3 * MIB,
            "pv-d has no size in the test: its reservation must not count on top"
        );
    }

    #[tokio::test]
    async fn nothing_is_left_behind_once_claim_and_volume_are_gone() {
        let (ctx, mut claims, mut volumes) = context();
        claims.apply_watcher_event(&Event::Apply(claim("ns", "a")));
        volumes.apply_watcher_event(&Event::Apply(volume("pv-a")));
        ctx.backoff("ns/a");
        ctx.backoff("pv/pv-a");
        ctx.remember_created("pv-a", "default", 1 << 20);
        ctx.remember_growth("pv-a", "default", 2 << 20);
        ctx.events.remember_for_test(&ObjectReference {
            namespace: Some("ns".into()),
            name: Some("a".into()),
            ..Default::default()
        });
        ctx.allocated_bytes("default"); // the watch delivered pv-a: it no longer counts as recent
        ctx.forget_gone();
        let held: usize = ctx.state_entries().iter().map(|(_, n)| n).sum();
        assert_eq!(held, 4, "{:?}: all still there", ctx.state_entries());

        claims.apply_watcher_event(&Event::Delete(claim("ns", "a")));
        volumes.apply_watcher_event(&Event::Delete(volume("pv-a")));
        ctx.forget_gone();
        for (map, n) in ctx.state_entries() {
            assert_eq!(
                n, 0,
                "{map} keeps {n} entries of a claim and PV that are gone"
            );
        }
    }
}
