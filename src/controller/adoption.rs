//! Reuse of an orphaned directory (`hostvol reuse --directory D --for NS/CLAIM`, through the node's
//! Unix socket): a directory no PV names, as `doctor` lists it, becomes a new claim's volume. No PV
//! kept its size, so the claim's request becomes the volume's size and limit; the claim must hold
//! what the directory holds.
//!
//! In an order a crash at any point cannot spoil:
//! 1. a record on the node's disk (`node::adoption`) says which claim takes which directory;
//! 2. the directory is moved to the path the claim's volume has (named for its PV, or below parents
//!    with the ownership mark), its limit set;
//! 3. the claim's PV `pvc-<claim uid>` is created, pre-bound, exactly as provisioning makes it;
//! 4. the record goes.
//!
//! While a record exists, provisioning leaves the claim alone (`reuse::targeted`); at start-up and
//! with every orphan scan, records left by a crash are finished.

use crate::controller::claim::class_name;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use nix::errno::Errno;
use tracing::{info, warn};

use crate::controller::context::{self, Context, holding_root};
use crate::controller::provision::{self, Admitted};
use crate::controller::{orphan_report, pv, reuse};
use crate::domain::naming;
use crate::domain::pattern::VolumePath;
use crate::domain::reuse::directory_refusal;
use crate::node::adoption::{self, Placed, Record};
use crate::node::roots::Root;
use crate::node::usage;

/// Why an adoption did not happen, by whose fault (the node service maps each to a gRPC code).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl From<context::Error> for Failure {
    fn from(error: context::Error) -> Self {
        Failure::Failed(error.to_string())
    }
}

/// The claim's new volume.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub pv_name: String,
    pub host_path: String,
}

/// Checks that `directory` of data root `root_name` is an orphan of this node and that claim
/// `namespace/claim_name` may have it, then makes it the claim's volume.
pub async fn adopt(
    ctx: &Context,
    root_name: &str,
    directory: &str,
    namespace: &str,
    claim_name: &str,
) -> Result<Adopted, Failure> {
    let node = &ctx.settings.node;
    let root_name = if root_name.is_empty() {
        "default"
    } else {
        root_name
    };
    let Some(root) = ctx.roots().get(root_name) else {
        return Err(Failure::NotFound(format!(
            "node {node} has no data root {root_name:?} (it has {})",
            ctx.roots().names().join(", ")
        )));
    };
    let from = VolumePath::parse(directory)
        .ok()
        .filter(|p| !p.as_str().split('/').any(|s| s.starts_with('.')))
        .ok_or_else(|| {
            Failure::Invalid(format!(
                "{directory:?} is not a directory name in a data root (as `hostvol doctor` lists them)"
            ))
        })?;
    if !is_orphan(ctx, &root, &from).await? {
        return Err(Failure::Refused(format!(
            "{} is not an orphaned directory of node {node} (`hostvol doctor` lists them; a directory a PV \
             names is reused with `hostvol reuse PV`, a new one counts after {} minutes)",
            pv::host_path(&root.host_path, from.as_str()),
            crate::node::orphans::GRACE.as_secs() / 60
        )));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let pvc = claims
        .get_opt(claim_name)
        .await
        .map_err(context::Error::from)?
        .ok_or_else(|| {
            Failure::NotFound(format!(
                "claim {namespace}/{claim_name} not found; create it first (no pod yet, at least the data's size)"
            ))
        })?;
    let class_name = class_name(&pvc);
    let class = ctx.classes.get(&ObjectRef::new(&class_name));
    let facts = reuse::claim_facts(&pvc, class.as_deref(), &ctx.settings.provisioner);
    let (used, limit) = used_bytes(&root, &from).await?;
    if let Some(why) = directory_refusal(&facts, used, limit, node) {
        return Err(Failure::Refused(why.to_string()));
    }
    let pv_name = naming::pv_name(&facts.uid).map_err(|e| Failure::Invalid(e.to_string()))?;
    let order = match provision::admit(&pvc, pv_name.clone(), ctx)? {
        Admitted::Order(order) => order,
        Admitted::Refused(refusal) => return Err(Failure::Refused(refusal.message())),
        Admitted::NotOurs => {
            return Err(Failure::Refused(format!(
                "claim {namespace}/{claim_name}: StorageClass {class_name:?} is not a hostvol class"
            )));
        }
    };
    if order.params.data_root != root.name {
        return Err(Failure::Refused(format!(
            "claim {namespace}/{claim_name}: StorageClass {class_name} keeps volumes in data root {:?}, \
             the directory is in {:?}; use a class of that root",
            order.params.data_root, root.name
        )));
    }
    if let Err(key) = ctx.pin_for(&order.params.node_affinity_key) {
        return Err(Failure::Refused(format!(
            "node {node} has no label {key}, which StorageClass {class_name} pins its volumes by"
        )));
    }
    let record = Record {
        namespace: namespace.to_string(),
        claim: claim_name.to_string(),
        claim_uid: facts.uid.clone(),
        directory: from.as_str().to_string(),
    };
    // One hold of the volume's lock from the check to the PV: a provisioning pass of the same claim
    // waiting for it finds the PV made (`recently_created`) instead of making an empty one.
    let _volume = ctx.volume_locks.lock(&pv_name).await;
    if provision::volume_exists(ctx, &pv_name).await? {
        return Err(Failure::Refused(format!(
            "claim {namespace}/{claim_name} has a volume already ({pv_name})"
        )));
    }
    let written = record.clone();
    on_disk(&root, move |handle| adoption::write(handle, &written))
        .await?
        .map_err(|e| Failure::Failed(format!("cannot record the adoption: {e}")))?;
    info!(directory = %from, claim = %format!("{namespace}/{claim_name}"), pv = %pv_name, used, ?limit, "adopting an orphaned directory");
    finish_locked(ctx, &root, &record).await
}

/// [`finish_locked`] under the volume's lock.
pub async fn finish(ctx: &Context, root: &Arc<Root>, record: &Record) -> Result<Adopted, Failure> {
    let pv_name =
        naming::pv_name(&record.claim_uid).map_err(|e| Failure::Invalid(e.to_string()))?;
    let _volume = ctx.volume_locks.lock(&pv_name).await;
    finish_locked(ctx, root, record).await
}

/// Steps 2-4 for `record` (also after a crash), the caller holding the volume's lock: the directory
/// placed, the PV created, the record dropped. A claim that is gone, re-created or bound elsewhere
/// ends the adoption where it stands: the record goes, the directory stays (an orphan again, for
/// `doctor`).
async fn finish_locked(
    ctx: &Context,
    root: &Arc<Root>,
    record: &Record,
) -> Result<Adopted, Failure> {
    let key = format!("{}/{}", record.namespace, record.claim);
    let pv_name =
        naming::pv_name(&record.claim_uid).map_err(|e| Failure::Invalid(e.to_string()))?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &record.namespace);
    let pvc = claims
        .get_opt(&record.claim)
        .await
        .map_err(context::Error::from)?
        .filter(|c| c.uid().as_deref() == Some(record.claim_uid.as_str()));
    let made = provision::volume_exists(ctx, &pv_name).await?;
    let bound_elsewhere = pvc
        .as_ref()
        .and_then(|c| c.spec.as_ref()?.volume_name.clone())
        .is_some_and(|v| !v.is_empty() && v != pv_name);
    let (Some(pvc), false, false) = (pvc, made, bound_elsewhere) else {
        forget(root, record).await;
        return if made {
            Ok(Adopted {
                host_path: String::new(),
                pv_name,
            })
        } else {
            Err(Failure::Refused(format!(
                "claim {key} is gone or bound to another volume; directory {} left as it is",
                record.directory
            )))
        };
    };
    let order = match provision::admit(&pvc, pv_name.clone(), ctx)? {
        Admitted::Order(order) => order,
        Admitted::Refused(refusal) => {
            forget(root, record).await;
            return Err(Failure::Refused(refusal.message()));
        }
        Admitted::NotOurs => {
            forget(root, record).await;
            return Err(Failure::Refused(format!(
                "claim {key} is not of a hostvol class"
            )));
        }
    };
    let from = VolumePath::parse(&record.directory).map_err(|e| Failure::Invalid(e.to_string()))?;
    let to = VolumePath::parse(&order.directory).map_err(|e| Failure::Invalid(e.to_string()))?;
    let host_path = pv::host_path(&root.host_path, to.as_str());
    let (placing, bytes) = (
        (from.clone(), to.clone(), pv_name.clone()),
        order.request.capacity_bytes,
    );
    let quotas = root.clone();
    let placed = on_disk(root, move |handle| {
        let (from, to, pv_name) = placing;
        let placed = adoption::place(handle, &from, &to, &pv_name)?;
        let limit = quotas
            .quotas
            .limit_volume(handle, to.as_str(), &pv_name, bytes)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Ok::<_, Errno>((placed, limit))
    })
    .await?;
    let (placed, limit) = match placed {
        Ok(done) => done,
        Err(error) => {
            let why = format!(
                "node {}: cannot move {} to {host_path} for claim {key}: {error}",
                ctx.settings.node,
                pv::host_path(&root.host_path, from.as_str()),
            );
            ctx.publish(
                &order.claim_ref,
                EventType::Warning,
                "ReuseFailed",
                "Reuse",
                why.clone(),
            );
            return Err(Failure::Failed(why));
        }
    };
    info!(from = %from, to = %to, fresh = (placed == Placed::Now), "adoption: directory placed");
    fail::fail_point!("adopt_after_place");
    let pin = ctx
        .pin_for(&order.params.node_affinity_key)
        .map_err(|label| {
            Failure::Refused(format!("node {} has no label {label}", ctx.settings.node))
        })?;
    provision::create_pv(ctx, &order, root, pin, limit).await?;
    ctx.remember_created(&pv_name, &root.name, bytes);
    forget(root, record).await;
    ctx.publish_fact(
        &order.claim_ref,
        EventType::Normal,
        "VolumeReused",
        "Reuse",
        format!(
            "volume {pv_name} ({}) takes over the orphaned directory {} on node {}",
            order.request.capacity,
            pv::host_path(&root.host_path, from.as_str()),
            ctx.settings.node
        ),
    );
    ctx.volumes_changed.notify_waiters();
    Ok(Adopted { pv_name, host_path })
}

/// Finishes the adoptions a crash interrupted (records left in the data roots).
pub async fn finish_interrupted(ctx: &Context) {
    for root in ctx.roots().all() {
        let records = match on_disk(root, adoption::list).await {
            Ok(Ok(records)) => records,
            Ok(Err(error)) => {
                warn!(root = %root.name, %error, "cannot read the adoption records");
                continue;
            }
            Err(_) => continue,
        };
        for record in records {
            match finish(ctx, root, &record).await {
                Ok(adopted) => {
                    info!(pv = %adopted.pv_name, directory = %record.directory, "interrupted adoption finished")
                }
                Err(error) => {
                    warn!(directory = %record.directory, %error, "interrupted adoption not finished")
                }
            }
        }
    }
}

/// Whether a record on this node says claim `claim_uid` is taking an orphaned directory.
pub fn targeted(ctx: &Context, claim_uid: &str) -> bool {
    ctx.roots().all().any(|root| {
        matches!(
            adoption::read(root.store.root_handle().as_fd(), claim_uid),
            Ok(Some(_))
        )
    })
}

/// Whether the orphan scan lists `path` in `root` now (no PV names it, it holds no volume, and it is
/// old enough not to be a volume being made).
async fn is_orphan(ctx: &Context, root: &Root, path: &VolumePath) -> Result<bool, Failure> {
    let per_root = orphan_report::scan(ctx)
        .await
        .map_err(|e| Failure::Failed(format!("cannot read the data roots: {e}")))?;
    let listed = per_root.iter().any(|(r, findings)| {
        r.name == root.name && findings.orphans.iter().any(|e| e.name == path.as_str())
    });
    // The scan reads the PV cache; the volume a directory's name points at may be newer than that.
    let named = ctx.volumes.state().iter().any(|pv| {
        holding_root(&ctx.roots(), pv).is_some_and(|(r, dir)| {
            r.name == root.name
                && (dir == path.as_str() || dir.starts_with(&format!("{}/", path.as_str())))
        })
    });
    Ok(listed && !named)
}

/// What the directory holds and its quota limit, if it kept one: from the quota accounting where
/// the root keeps one, else measured by the bounded walk (memory independent of what is in it).
async fn used_bytes(root: &Arc<Root>, path: &VolumePath) -> Result<(u64, Option<u64>), Failure> {
    let (quotas, name) = (root.clone(), path.as_str().to_string());
    on_disk(root, move |handle| {
        if let Ok(Some(figures)) = quotas.quotas.usage(handle, std::slice::from_ref(&name))
            && let Some(usage) = figures.get(&name)
        {
            return Ok((usage.used_bytes, usage.limit_bytes));
        }
        usage::measure(handle, &name).map(|u| (u.bytes, None))
    })
    .await?
    .map_err(|e| Failure::Failed(format!("cannot measure {}: {e}", path.as_str())))
}

/// Runs blocking disk work on the root's handle off the async workers.
async fn on_disk<T: Send + 'static>(
    root: &Arc<Root>,
    work: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> T + Send + 'static,
) -> Result<T, Failure> {
    let handle = root.store.root_handle();
    let done = tokio::task::spawn_blocking(move || work(handle.as_fd())).await;
    context::joined(done).map_err(Failure::from)
}

async fn forget(root: &Arc<Root>, record: &Record) {
    let uid = record.claim_uid.clone();
    match on_disk(root, move |handle| adoption::forget(handle, &uid)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "cannot remove the adoption record"),
        Err(error) => warn!(%error, "cannot remove the adoption record"),
    }
}

/// Waits (up to `timeout`) for the claim to be bound to `pv_name` by the PV controller.
pub async fn wait_bound(
    ctx: &Context,
    namespace: &str,
    claim: &str,
    pv_name: &str,
    timeout: Duration,
) -> bool {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let bound = claims
            .get_opt(claim)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.spec.and_then(|s| s.volume_name).as_deref() == Some(pv_name));
        if bound {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}
