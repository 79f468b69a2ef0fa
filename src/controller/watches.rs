//! The watches an agent keeps, each as narrow as its use allows, and the controllers driven by them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::discovery::ApiResource;
use kube::runtime::controller::Controller;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::context::{Context, Settings};
use crate::controller::metrics::Metrics;
use crate::controller::{placement, provision, pv, reclaim};
use crate::domain::admission::{self, Interest};
use crate::domain::naming;
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

/// Starts the supporting watches and returns the controllers' future, which ends on `shutdown`.
pub fn start(
    client: Client,
    settings: Settings,
    capacity_api: Option<(ApiResource, String)>,
    roots: RootSet,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Watches, Arc<Context>, impl std::future::Future<Output = ()>) {
    let classes_changed = Arc::new(tokio::sync::Notify::new());
    let classes = watch_classes(&client, classes_changed.clone());
    let nodes = watch_own_node(&client, &settings.node);
    let volumes_changed = Arc::new(tokio::sync::Notify::new());
    let (volumes, volume_events) =
        watch_own_volumes(&client, &settings.node, volumes_changed.clone());
    let (claims, claim_events) = watch_claims(&client, &settings, volumes.clone());
    let capacities = capacity_api
        .map(|(resource, namespace)| watch_published_capacities(&client, resource, &namespace));
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
        classes_changed,
        admission_lock: tokio::sync::Mutex::new(()),
        recent_volumes: Mutex::new(HashMap::new()),
        recent_growth: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    tokio::spawn(place_claims_of_pods(ctx.clone()));

    // Reclaim: this node's PVs once their claims are gone.
    let reclaimer = Controller::for_stream(volume_events, volumes.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reclaim::reconcile, reclaim::error_policy, ctx.clone())
        .for_each(|result| {
            if let Err(kube::runtime::controller::Error::QueueError(error)) = result {
                warn!(watch = "persistentvolumes", %error, "watch failed; retrying with backoff");
            }
            futures::future::ready(())
        });
    let provisioner = Controller::for_stream(claim_events, claims.clone())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(provision::reconcile, provision::error_policy, ctx.clone())
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

/// Drives a watch that only feeds a store, logging its errors (the watcher retries with backoff).
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

/// StorageClasses: few and small; kept whole. `changed` gets a permit on every event.
fn watch_classes(client: &Client, changed: Arc<tokio::sync::Notify>) -> Store<StorageClass> {
    let (classes, writer) = reflector::store();
    drive(
        "storageclasses",
        watcher(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer)
        .inspect(move |_| changed.notify_one()),
    );
    classes
}

/// Our own Node, metadata only (a Node's status with its image list is large).
fn watch_own_node(client: &Client, node: &str) -> Store<PartialObjectMeta<Node>> {
    let (nodes, writer) = reflector::store();
    drive(
        "node",
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        )
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .reflect(writer),
    );
    nodes
}

/// hostvol PVs of this node only (label-selected); `changed` is woken on every event.
fn watch_own_volumes(
    client: &Client,
    node: &str,
    changed: Arc<tokio::sync::Notify>,
) -> (
    Store<PersistentVolume>,
    impl futures::Stream<Item = Result<PersistentVolume, watcher::Error>> + Send + use<>,
) {
    let (volumes, writer) = reflector::store();
    let label = format!("{}={}", pv::LABEL_NODE, naming::node_label_value(node));
    let events = watcher(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default().labels(&label),
    )
    .default_backoff()
    .modify(|pv| pv.managed_fields_mut().clear())
    .reflect(writer)
    .inspect(move |_| changed.notify_waiters())
    .applied_objects();
    (volumes, events)
}

/// Claims: no server-side filter can select by annotation, so watch metadata only and pass on the
/// claims this agent may have to act on (to provision, to place, or bound to its volumes, to grow).
fn watch_claims(
    client: &Client,
    settings: &Settings,
    own_volumes: Store<PersistentVolume>,
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
    let events = watcher(
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
    client: &Client,
    resource: ApiResource,
    namespace: &str,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    drive(
        "csistoragecapacities",
        watcher(
            Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=hostvol"),
        )
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer),
    );
    reader
}

/// Pods bound to this node, streamed (not stored), for pods that set spec.nodeName themselves.
async fn place_claims_of_pods(ctx: Arc<Context>) {
    let pods = watcher(
        Api::<Pod>::all(ctx.client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.settings.node)),
    )
    .default_backoff()
    .applied_objects();
    let mut pods = std::pin::pin!(pods);
    while let Some(item) = pods.next().await {
        match item {
            Ok(pod) => {
                if let Err(error) = placement::place_claims_of_pod(&pod, &ctx).await {
                    warn!(%error, pod = %pod.name_any(), "cannot place the claims of a pod on this node");
                }
            }
            Err(error) => warn!(watch = "pods", %error, "watch failed; retrying with backoff"),
        }
    }
}
