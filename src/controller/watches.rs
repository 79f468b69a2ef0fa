//! The watches an agent keeps, each as narrow as its use allows, and the controllers driven by them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::context::{self, Context, Settings};
use crate::controller::events::EventRecorder;
use crate::controller::metrics::Metrics;
use crate::controller::storage_capacity;
use crate::controller::store::Changes;
use crate::controller::store::store_ready;
use crate::controller::supervisor::{Rule, Supervisor, panic_message};
use crate::controller::watch_backoff::{ApiProbe, probed};
use crate::controller::{placement, provision, pv, reclaim};
use crate::domain::admission::{self, Interest};
use crate::domain::params::ClassParameters;
use crate::domain::{affinity, naming};
use crate::node::roots::RootSet;

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

/// What the watches are started with besides the client and settings.
pub struct Wiring {
    pub events: Arc<EventRecorder>,
    pub metrics: Arc<Metrics>,
    pub api: Arc<ApiProbe>,
    pub supervisor: Arc<Supervisor>,
}

/// Starts the supporting watches (supervised) and returns the controllers' future, which ends on
/// `shutdown`.
pub fn start(
    client: Client,
    settings: Settings,
    capacity_api: Option<(ApiResource, String)>,
    roots: RootSet,
    wiring: Wiring,
    shutdown: CancellationToken,
) -> (Watches, Arc<Context>, impl std::future::Future<Output = ()>) {
    let Wiring {
        events,
        metrics,
        api,
        supervisor,
    } = wiring;
    let sup = &supervisor;
    let classes_changed = Arc::new(tokio::sync::Notify::new());
    // Classes' keys and the node's labels decide which pinned volumes the PV watch selects.
    let pins_changed = Arc::new(tokio::sync::Notify::new());
    let classes = watch_classes(
        sup,
        &client,
        &api,
        [classes_changed.clone(), pins_changed.clone()],
    );
    let nodes = watch_own_node(
        sup,
        &client,
        &api,
        &settings.node,
        [classes_changed.clone(), pins_changed.clone()],
    );
    let (selector, selected) = tokio::sync::watch::channel(None);
    let volumes_changed = Arc::new(tokio::sync::Notify::new());
    // Woken when claims or PVs go (or a watch relisted): per-object state is dropped then.
    let gone = Arc::new(tokio::sync::Notify::new());
    let (volumes, volume_events) = watch_own_volumes(
        &client,
        &api,
        selected,
        volumes_changed.clone(),
        gone.clone(),
    );
    let (claims, claim_events) =
        watch_claims(&client, &api, &settings, volumes.clone(), gone.clone());
    let capacity_changes = Arc::new(Changes::default());
    let capacities = capacity_api.map(|(resource, namespace)| {
        watch_published_capacities(
            sup,
            &client,
            &api,
            resource,
            &namespace,
            &settings.node,
            capacity_changes.clone(),
        )
    });
    let ctx = Arc::new(Context {
        client,
        settings,
        roots: parking_lot::RwLock::new(Arc::new(roots)),
        classes: classes.clone(),
        nodes: nodes.clone(),
        volumes: volumes.clone(),
        claims: claims.clone(),
        capacities,
        events,
        metrics,
        api,
        volumes_changed,
        classes_changed,
        capacity_changes,
        own_pod: tokio::sync::watch::Sender::new(None),
        admission_lock: tokio::sync::Mutex::new(()),
        reserved: Mutex::new(HashMap::new()),
        volume_locks: Default::default(),
        directory_edits: Mutex::new(HashMap::new()),
        recent_volumes: Mutex::new(HashMap::new()),
        recent_growth: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    supervisor.spawn("pod-placement", Rule::Restart, {
        let ctx = ctx.clone();
        move || place_claims_of_pods(ctx.clone())
    });
    supervisor.spawn("volume-selector", Rule::Restart, {
        let (ctx, selector) = (ctx.clone(), Arc::new(selector));
        move || follow_pins(ctx.clone(), selector.clone(), pins_changed.clone())
    });
    supervisor.spawn("forget-gone", Rule::Restart, {
        let ctx = ctx.clone();
        move || forget_gone(ctx.clone(), gone.clone())
    });

    // Reclaim: this node's PVs once their claims are gone.
    let reclaimer = Controller::for_stream(volume_events, volumes.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |pv, ctx| guarded("reclaim", pv, ctx, reclaim::reconcile),
            reclaim::error_policy,
            ctx.clone(),
        )
        .for_each(|result| {
            if let Err(kube::runtime::controller::Error::QueueError(error)) = result {
                warn!(watch = "persistentvolumes", %error, "watch failed; retrying with backoff");
            }
            futures::future::ready(())
        });
    let provisioner = Controller::for_stream(claim_events, claims.clone())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(
            |claim, ctx| guarded("provision", claim, ctx, provision::reconcile),
            provision::error_policy,
            ctx.clone(),
        )
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
    let controllers = async move {
        futures::join!(provisioner, reclaimer);
    };
    let watches = Watches {
        classes,
        nodes,
        volumes,
        claims,
    };
    (watches, ctx, controllers)
}

/// Runs one reconcile as an error for its own object if it panics: a Warning Event on the object,
/// then the controller's retry with backoff; the agent serves the others meanwhile. Waits first while
/// the API server is unreachable (a retry then would only knock on a closed door).
async fn guarded<K, F, Fut>(
    what: &'static str,
    object: Arc<K>,
    ctx: Arc<Context>,
    reconcile: F,
) -> context::Result<Action>
where
    K: kube::Resource<DynamicType = ()> + Send + Sync + 'static,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = context::Result<Action>>,
{
    use futures::FutureExt;
    ctx.api.until_api_answers().await;
    let reference = object.object_ref(&());
    let outcome = std::panic::AssertUnwindSafe(async {
        fail_for_object(what, &*object);
        reconcile(object.clone(), ctx.clone()).await
    })
    .catch_unwind()
    .await;
    let result = match outcome {
        Ok(result) => result,
        Err(panic) => {
            let why = panic_message(&*panic);
            tracing::error!(
                reconcile = what,
                object = %reference.name.as_deref().unwrap_or_default(),
                panic = %why,
                "reconcile panicked; an error for this object only, retried with backoff"
            );
            ctx.metrics.reconcile_panicked();
            ctx.publish(
                &reference,
                kube::runtime::events::EventType::Warning,
                "InternalError",
                "Reconcile",
                format!(
                    "hostvol hit an internal error handling this object and will retry with backoff: {why}; \
                     this is a bug, please report it with the agent's log"
                ),
            );
            Err(context::Error::Panicked(why))
        }
    };
    if let Err(context::Error::Kube(kube::Error::HyperError(_) | kube::Error::Service(_))) = &result
    {
        // Could not reach the API server: the next retry waits for the probe.
        ctx.api.failed();
    }
    result
}

/// Failpoint `<what>_panic_for=return(NAME)`: the reconcile of the object named NAME panics (tests).
fn fail_for_object<K: kube::Resource>(what: &'static str, object: &K) {
    let name = object.meta().name.as_deref().unwrap_or_default();
    let target: Option<String> = match what {
        "provision" => (|| {
            fail::fail_point!("provision_panic_for", |arg| arg);
            None
        })(),
        _ => (|| {
            fail::fail_point!("reclaim_panic_for", |arg| arg);
            None
        })(),
    };
    if target.is_some_and(|t| t == name) {
        panic!("failpoint {what}_panic_for: {name}");
    }
}

/// Applies a watch's events to a store it does not own, so that a restarted watch (a new stream)
/// keeps feeding the same store.
type SharedWriter<K> = Arc<Mutex<reflector::store::Writer<K>>>;

fn reflect_shared<K, S>(
    stream: S,
    writer: SharedWriter<K>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K, S>
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    stream.inspect(move |event| {
        if let Ok(event) = event {
            writer.lock().apply_watcher_event(event);
        }
    })
}

/// Drives a watch that only feeds a store, logging its errors, as supervised task `what`: `make`
/// builds the stream again for each (re)start.
fn drive<T, S, F>(supervisor: &Supervisor, what: &'static str, mut make: F)
where
    F: FnMut() -> S + Send + 'static,
    S: futures::Stream<Item = Result<T, watcher::Error>> + Send + 'static,
{
    supervisor.spawn(what, Rule::Vital, move || {
        make().for_each(move |item| {
            if let Err(error) = item {
                warn!(watch = what, %error, "watch failed; retrying when the API server answers");
            }
            futures::future::ready(())
        })
    });
}

/// StorageClasses: few and small; kept whole. Each of `changed` gets a permit on every event.
fn watch_classes(
    supervisor: &Supervisor,
    client: &Client,
    api: &Arc<ApiProbe>,
    changed: [Arc<tokio::sync::Notify>; 2],
) -> Store<StorageClass> {
    let (classes, writer) = reflector::store();
    let writer = Arc::new(Mutex::new(writer));
    let (client, api) = (client.clone(), api.clone());
    drive(supervisor, "storageclasses", move || {
        let changed = changed.clone();
        reflect_shared(
            probed(
                watcher(
                    Api::<StorageClass>::all(client.clone()),
                    watcher::Config::default(),
                ),
                api.clone(),
            ),
            writer.clone(),
        )
        .inspect(move |_| changed.iter().for_each(|c| c.notify_one()))
    });
    classes
}

/// Our own Node, metadata only (a Node's status with its image list is large). Its labels decide which
/// classes' `allowedTopologies` allow the node, so a change wakes the capacity publisher (`changed`).
fn watch_own_node(
    supervisor: &Supervisor,
    client: &Client,
    api: &Arc<ApiProbe>,
    node: &str,
    changed: [Arc<tokio::sync::Notify>; 2],
) -> Store<PartialObjectMeta<Node>> {
    let (nodes, writer) = reflector::store();
    let writer = Arc::new(Mutex::new(writer));
    let (client, api, fields) = (client.clone(), api.clone(), format!("metadata.name={node}"));
    drive(supervisor, "node", move || {
        reflect_shared(
            probed(
                watcher(
                    Api::<PartialObjectMeta<Node>>::all(client.clone()),
                    watcher::Config::default().fields(&fields),
                ),
                api.clone(),
            )
            .modify(|n| n.managed_fields_mut().clear()),
            writer.clone(),
        )
        // After the store took the event, so the woken publisher reads the new labels.
        .inspect({
            let changed = changed.clone();
            move |_| changed.iter().for_each(|c| c.notify_one())
        })
    });
    nodes
}

/// hostvol PVs this node serves only (label-selected by `selector`, see [`follow_pins`]; the watch
/// starts once there is one and starts again, relisting into the same store, when it changes);
/// `changed` is woken on every event.
fn watch_own_volumes(
    client: &Client,
    api: &Arc<ApiProbe>,
    selector: tokio::sync::watch::Receiver<Option<String>>,
    changed: Arc<tokio::sync::Notify>,
    gone: Arc<tokio::sync::Notify>,
) -> (
    Store<PersistentVolume>,
    impl futures::Stream<Item = Result<PersistentVolume, watcher::Error>> + Send + use<>,
) {
    let (volumes, writer) = reflector::store();
    let (client, api) = (client.clone(), api.clone());
    let events = switching(selector, move |label| {
        probed(
            watcher(
                Api::<PersistentVolume>::all(client.clone()),
                watcher::Config::default().labels(label),
            ),
            api.clone(),
        )
    })
    .modify(slim_volume)
    .reflect(writer)
    .inspect(move |event| {
        changed.notify_waiters();
        if matches!(
            event,
            Ok(watcher::Event::Delete(_) | watcher::Event::InitDone)
        ) {
            gone.notify_one();
        }
        // A burst of new volumes leaves freed parse and request buffers behind as well.
        crate::node::memory::release_soon();
    })
    .applied_objects();
    (volumes, events)
}

/// The items of `make(selector)` for the latest selector: none until there is one, and on a change
/// the stream of the old one is dropped and one for the new one starts (a watcher starts with a
/// full listing, which a reflector applies as a whole, so the store follows the new selector).
fn switching<T, S, F>(
    selector: tokio::sync::watch::Receiver<Option<String>>,
    make: F,
) -> impl futures::Stream<Item = T> + Send + use<T, S, F>
where
    T: Send + 'static,
    S: futures::Stream<Item = T> + Send + 'static,
    F: Fn(&str) -> S + Send + Sync + 'static,
{
    let make = Arc::new(make);
    futures::stream::unfold(
        (selector, None::<futures::stream::BoxStream<'static, T>>),
        move |(mut selector, mut current)| {
            let make = make.clone();
            async move {
                loop {
                    let Some(stream) = current.as_mut() else {
                        let latest = selector.borrow_and_update().clone();
                        match latest {
                            Some(label) => {
                                debug!(watch = "persistentvolumes", selector = %label, "watching");
                                current = Some(make(&label).boxed());
                            }
                            None if selector.changed().await.is_err() => return None,
                            None => {}
                        }
                        continue;
                    };
                    tokio::select! {
                        changed = selector.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            current = None;
                        }
                        item = stream.next() => return item.map(|item| (item, (selector, current))),
                    }
                }
            }
        },
    )
}

/// The selector of this node's PV watch, kept current: its own volumes (`hostvol.io/node=<node>`)
/// and those pinned to the values its Node carries of the keys hostvol classes pin by. Recomputed
/// from the caches (no request) whenever a class or the Node changes; sent only when different.
async fn follow_pins(
    ctx: Arc<Context>,
    selector: Arc<tokio::sync::watch::Sender<Option<String>>>,
    changed: Arc<tokio::sync::Notify>,
) {
    // Both caches listed first, so the first selection already holds every pinned volume.
    store_ready(&ctx.classes).await;
    store_ready(&ctx.nodes).await;
    loop {
        let labels = ctx.node_labels();
        let pins: Vec<String> = ctx
            .classes
            .state()
            .iter()
            .filter(|c| c.provisioner == ctx.settings.provisioner)
            .filter_map(|c| ClassParameters::parse(&c.parameters.clone().unwrap_or_default()).ok())
            .filter(|p| p.node_affinity_key != affinity::HOSTNAME_KEY)
            .filter_map(|p| {
                let value = labels.get(&p.node_affinity_key)?;
                Some(affinity::pin_label_value(&p.node_affinity_key, value))
            })
            .collect();
        let wanted = affinity::volume_selector(
            pv::LABEL_NODE,
            &naming::node_label_value(&ctx.settings.node),
            &pins,
        );
        selector.send_if_modified(|current| {
            if current.as_deref() == Some(wanted.as_str()) {
                return false;
            }
            tracing::info!(node = %ctx.settings.node, selector = %wanted, "PV watch selects");
            *current = Some(wanted.clone());
            true
        });
        changed.notified().await;
    }
}

/// Claims: no server-side filter can select by annotation, so watch metadata only and pass on the
/// claims this agent may have to act on (to provision, to place, or bound to its volumes, to grow).
fn watch_claims(
    client: &Client,
    api: &Arc<ApiProbe>,
    settings: &Settings,
    own_volumes: Store<PersistentVolume>,
    gone: Arc<tokio::sync::Notify>,
) -> (
    Store<PartialObjectMeta<PersistentVolumeClaim>>,
    impl futures::Stream<Item = Result<PartialObjectMeta<PersistentVolumeClaim>, watcher::Error>>
    + Send
    + use<>,
) {
    let (claims, writer) = reflector::store();
    let (provisioner, node) = (settings.provisioner.clone(), settings.node.clone());
    let volumes_listed = Arc::new(AtomicBool::new(false));
    {
        let (listed, volumes) = (volumes_listed.clone(), own_volumes.clone());
        tokio::spawn(async move {
            if store_ready(&volumes).await {
                listed.store(true, Ordering::Release);
            }
        });
    }
    // Claims of other drivers, or bound to other nodes' volumes, never reach the cache: a claim
    // turning foreign leaves it as if deleted, one listed foreign is skipped. Every change of a claim
    // comes whole, so one that becomes ours later is cached then.
    let ours = {
        let (provisioner, listed, volumes) = (
            provisioner.clone(),
            volumes_listed.clone(),
            own_volumes.clone(),
        );
        move |c: &PartialObjectMeta<PersistentVolumeClaim>| {
            let bound_to_ours = || {
                // Until our volumes are listed, any bound claim may be ours.
                !listed.load(Ordering::Acquire)
                    || c.uid()
                        .and_then(|uid| naming::pv_name(&uid).ok())
                        .is_some_and(|pv| volumes.get(&ObjectRef::new(&pv)).is_some())
            };
            admission::concerns(c.annotations(), &provisioner, bound_to_ours)
        }
    };
    let events = probed(
        watcher(
            Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client.clone()),
            watcher::Config::default(),
        ),
        api.clone(),
    )
    .modify(slim_claim)
    .try_filter_map(move |event| {
        let event = match event {
            watcher::Event::Apply(c) if !ours(&c) => Some(watcher::Event::Delete(c)),
            watcher::Event::InitApply(c) if !ours(&c) => None,
            event => {
                if matches!(event, watcher::Event::Delete(_) | watcher::Event::InitDone) {
                    gone.notify_one();
                }
                Some(event)
            }
        };
        futures::future::ready(Ok(event))
    })
    .reflect(writer)
    .applied_objects()
    .try_filter(move |c| {
        let act = match admission::interest(c.annotations(), &provisioner, &node) {
            Interest::Provision | Interest::ChooseNode => true,
            // Bound to one of our volumes: it may ask to grow. Until our volumes are listed, any
            // bound claim may be ours (a growth asked for while the agent was down).
            Interest::Bound => {
                !volumes_listed.load(Ordering::Acquire)
                    || c.uid()
                        .and_then(|uid| naming::pv_name(&uid).ok())
                        .is_some_and(|pv| own_volumes.get(&ObjectRef::new(&pv)).is_some())
            }
            Interest::Ignore => false,
        };
        futures::future::ready(act)
    });
    (claims, events)
}

/// The capacities every agent publishes, for placing Immediate claims.
fn watch_published_capacities(
    supervisor: &Supervisor,
    client: &Client,
    api: &Arc<ApiProbe>,
    resource: ApiResource,
    namespace: &str,
    node: &str,
    changes: Arc<Changes>,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let writer = Arc::new(Mutex::new(writer));
    let (client, api, namespace, node) = (
        client.clone(),
        api.clone(),
        namespace.to_string(),
        node.to_string(),
    );
    drive(supervisor, "csistoragecapacities", move || {
        let (changes, node) = (changes.clone(), node.clone());
        reflect_shared(
            probed(
                watcher(
                    Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource),
                    watcher::Config::default().labels("app.kubernetes.io/managed-by=hostvol"),
                ),
                api.clone(),
            )
            .modify(|o| {
                o.managed_fields_mut().clear();
                o.labels_mut().clear();
            }),
            writer.clone(),
        )
        .inspect(move |event| match event {
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) if storage_capacity::is_of_node(o, &node) => changes.touched(o.name_any()),
            Ok(watcher::Event::InitDone) => changes.relisted(),
            _ => {}
        })
    });
    reader
}

/// A PV as the agent keeps it: what reclaim, capacity, usage and expansion read; not who wrote
/// which field, nor the hostname node affinity (the label selects our PVs), which are most of its
/// bytes. The affinity of a volume pinned by another label stays: it alone says (immutably) that
/// this node serves it (`ownership`).
fn slim_volume(pv: &mut PersistentVolume) {
    pv.managed_fields_mut().clear();
    pv.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
    let pinned = pv::pin_of(pv).is_some();
    if let Some(spec) = pv.spec.as_mut() {
        if !pinned {
            spec.node_affinity = None;
        }
        spec.mount_options = None;
        if let Some(claim) = spec.claim_ref.as_mut() {
            claim.field_path = None;
            claim.resource_version = None;
        }
    }
    if let Some(status) = pv.status.as_mut() {
        status.message = None;
        status.reason = None;
    }
}

/// A claim as the agent keeps it: its identity and the annotations that say what to do with it.
fn slim_claim(c: &mut PartialObjectMeta<PersistentVolumeClaim>) {
    let meta = &mut c.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.finalizers = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| admission::KEPT_ANNOTATIONS.contains(&key.as_str()));
    }
}

/// Drops per-claim and per-PV state when the watches say objects went, then gives the memory back.
async fn forget_gone(ctx: Arc<Context>, gone: Arc<tokio::sync::Notify>) {
    loop {
        gone.notified().await;
        ctx.forget_gone();
        crate::node::memory::release_soon();
    }
}

/// Pods bound to this node, streamed (not stored), for pods that set spec.nodeName themselves.
async fn place_claims_of_pods(ctx: Arc<Context>) {
    let pods = probed(
        watcher(
            Api::<Pod>::all(ctx.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.settings.node)),
        ),
        ctx.api.clone(),
    )
    .applied_objects();
    let mut pods = std::pin::pin!(pods);
    while let Some(item) = pods.next().await {
        match item {
            Ok(pod) => {
                note_own_pod(&ctx, &pod);
                if let Err(error) = placement::place_claims_of_pod(&pod, &ctx).await {
                    warn!(%error, pod = %pod.name_any(), "cannot place the claims of a pod on this node");
                }
            }
            Err(error) => warn!(watch = "pods", %error, "watch failed; retrying with backoff"),
        }
    }
}

/// The agent's own Pod (a DaemonSet pod is on this node, so the pod watch sees it) becomes the owner
/// of its CSIStorageCapacity objects: no request of its own.
fn note_own_pod(ctx: &Context, pod: &Pod) {
    let Some((namespace, name)) = &ctx.settings.pod else {
        return;
    };
    if pod.metadata.name.as_ref() != Some(name)
        || pod.metadata.namespace.as_ref() != Some(namespace)
    {
        return;
    }
    let owner =
        pod.uid().map(
            |uid| k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: name.clone(),
                uid,
                ..Default::default()
            },
        );
    ctx.own_pod.send_if_modified(|current| {
        let changed = *current != owner;
        *current = owner.clone();
        changed
    });
}
