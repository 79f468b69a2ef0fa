//! What happens to a volume after its claim is gone: Delete removes (or archives) the directory and then
//! the PV; Retain keeps both until someone asks `hostvol purge`. Driven by this node's PV watch.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::controller::context::{Context, Error, Result};
use crate::controller::{ownership, pv, reuse};
use crate::domain::reuse::ANN_REUSE_FOR;
use crate::node::quota::{Limit, Removed};
use crate::node::removal;

/// On PVs of Delete classes: `kubectl delete pv` then waits for the directory to be cleaned up.
pub const FINALIZER: &str = "hostvol.io/cleanup";
/// Set by `hostvol purge` on a released Retain volume: remove its directory, then the PV.
pub const ANN_PURGE: &str = "hostvol.io/purge";
/// What Delete does with the directory, recorded on the PV when it is made: `delete` or `archive`.
pub const ANN_ON_DELETE: &str = "hostvol.io/on-delete";

/// What to do with a volume of this node, decided from the PV alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    Keep,
    Delete {
        archive: bool,
    },
    Purge,
    /// Marked by `hostvol reuse`: its data goes to a new claim (see `controller::reuse`).
    Reuse,
    /// Finished cleaning; only our finalizer holds the PV.
    ReleaseFinalizer,
}

pub fn disposal(pv: &PersistentVolume) -> Disposal {
    let spec = pv.spec.clone().unwrap_or_default();
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("");
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let unbound = matches!(phase, "Released" | "Failed") || (deleting && phase != "Bound");
    let policy = spec
        .persistent_volume_reclaim_policy
        .as_deref()
        .unwrap_or("Delete");
    let archive = pv
        .annotations()
        .get(ANN_ON_DELETE)
        .is_some_and(|v| v == "archive");
    if !unbound {
        return Disposal::Keep;
    }
    if policy == "Delete" {
        return Disposal::Delete { archive };
    }
    if pv.annotations().contains_key(ANN_PURGE) {
        return Disposal::Purge;
    }
    if !deleting && pv.annotations().contains_key(ANN_REUSE_FOR) {
        return Disposal::Reuse;
    }
    if deleting && pv.finalizers().iter().any(|f| f == FINALIZER) {
        return Disposal::ReleaseFinalizer; // e.g. the class was Delete when made, then edited to Retain
    }
    Disposal::Keep
}

/// The volume's directory name, only if it is the one this PV's name says it must be (an edited
/// annotation can never point the agent at another volume's data).
pub fn own_directory(pv: &PersistentVolume) -> Option<String> {
    pv::directory_of(pv) // from the immutable source path, never the editable annotation
}

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action> {
    let what = disposal(&pv);
    if what == Disposal::Keep {
        return Ok(Action::await_change());
    }
    // The watch's label can be set by anyone who may edit PVs: never act on another's volume.
    if !ownership::may_touch(&ctx, &pv, "reclaim") {
        return Ok(Action::await_change());
    }
    let span = info_span!("reclaim", node = %ctx.settings.node, pv = %pv.name_any(), ?what);
    if what == Disposal::Reuse {
        return reuse::reconcile(&pv, &ctx).instrument(span).await;
    }
    async move {
        // Once our finalizer is gone the directory was dealt with: only the PV's deletion is left.
        let released = !pv.finalizers().iter().any(|f| f == FINALIZER)
            && pv.metadata.deletion_timestamp.is_some();
        if matches!(what, Disposal::Delete { .. } | Disposal::Purge) && !released {
            let archive = matches!(what, Disposal::Delete { archive: true });
            if let Some(later) = dispose_of_directory(&pv, archive, &ctx).await? {
                return Ok(later);
            }
        }
        release_pv(&pv, &ctx).await?;
        ctx.volumes_changed.notify_waiters();
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

/// Removes (or archives) the volume's directory and its limit. `Some(action)` when the PV must stay
/// for now (a problem the user must fix, or a qgroup still busy).
async fn dispose_of_directory(
    pv: &PersistentVolume,
    archive: bool,
    ctx: &Context,
) -> Result<Option<Action>> {
    let reference = pv.object_ref(&());
    let root_name = pv::data_root(pv).to_string();
    // The root holding the PV's immutable hostPath: an edited data-root annotation must not make a
    // removal in another root find nothing and release the PV with its data left behind.
    let holder = ctx
        .roots()
        .all()
        .filter(|root| pv::volume_directory(pv, &root.host_path).is_some())
        .max_by_key(|root| root.host_path.len()) // the innermost, should one root hold another
        .cloned();
    let Some(data_root) = holder else {
        if pv::root_holds("/", pv::source_path(pv).unwrap_or_default()).is_none() {
            ctx.publish(
                &reference,
                EventType::Warning,
                "VolumeFailedDelete",
                "Delete",
                format!(
                    "{} {:?} is not a safe path in a data root; hostvol will not remove anything",
                    pv::source_field(pv),
                    pv::source_path(pv).unwrap_or_default()
                ),
            );
            return Ok(Some(Action::requeue(Duration::from_secs(300))));
        }
        ctx.publish(&reference, EventType::Warning, "VolumeFailedDelete", "Delete", format!(
            "node {} no longer has data root {root_name:?} (hostvol-config); the directory is kept; \
             restore the root in the configuration to let hostvol remove it", ctx.settings.node));
        return Ok(Some(Action::requeue(Duration::from_secs(300))));
    };
    let recorded = pv
        .annotations()
        .get(pv::ANN_QUOTA)
        .and_then(|r| Limit::parse(r));
    let directory = pv::volume_directory(pv, &data_root.host_path).unwrap_or_default();
    let (dir, pv_name) = (directory.clone(), pv.name_any());
    let outcome = tokio::task::spawn_blocking(move || {
        let root = data_root.store.root_handle();
        // Checks the directory is this PV's (by name, or by its mark) before touching anything.
        data_root
            .quotas
            .dispose_volume(root.as_fd(), &dir, &pv_name, archive, recorded)
    })
    .await;
    // A panic in the removal is an error for this PV (retried), not the end of the agent.
    let outcome = crate::controller::context::joined(outcome)?;
    match outcome {
        Ok(Removed::QgroupBusy(id)) => {
            // The PV (and its record of the qgroup) stays until the qgroup is gone too.
            debug!(%directory, qgroup = id, "volume removed; its qgroup is still busy");
            Ok(Some(Action::requeue(Duration::from_secs(3))))
        }
        Ok(Removed::Done(done)) => {
            info!(%directory, %done, "volume directory cleaned up");
            // Once per volume: a retry after a failed PV update finds the directory gone again.
            ctx.publish_fact(
                &reference,
                EventType::Normal,
                "VolumeDeleted",
                "Delete",
                format!("{directory} on node {}: {done}", ctx.settings.node),
            );
            Ok(None)
        }
        Err(error @ removal::Error::NotOurs { .. }) => {
            ctx.publish(
                &reference,
                EventType::Warning,
                "VolumeFailedDelete",
                "Delete",
                format!(
                    "node {}: {error}; the PV is kept and nothing is removed",
                    ctx.settings.node
                ),
            );
            Ok(Some(Action::requeue(Duration::from_secs(300))))
        }
        Err(error) => {
            ctx.publish(&reference, EventType::Warning, "VolumeFailedDelete", "Delete", format!(
                "node {}: cannot remove {directory}: {error}; the PV is kept and removal is retried", ctx.settings.node));
            Err(Error::Removal(error))
        }
    }
}

/// Drops our finalizer and deletes the PV (both already done is fine).
async fn release_pv(pv: &PersistentVolume, ctx: &Context) -> Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if pv.finalizers().iter().any(|f| f == FINALIZER) {
        let remaining: Vec<&String> = pv.finalizers().iter().filter(|f| *f != FINALIZER).collect();
        let patch = serde_json::json!({"metadata": {"resourceVersion": pv.resource_version(), "finalizers": remaining}});
        match volumes
            .patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    if pv.metadata.deletion_timestamp.is_none() {
        match volumes
            .delete(&pv.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

pub fn error_policy(pv: Arc<PersistentVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(pv = %pv.name_any(), %error, "reclaim failed; will retry");
    ctx.metrics.reclaim_failed(error.category());
    Action::requeue(ctx.backoff(&format!("pv/{}", pv.name_any())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::HostPathVolumeSource;
    use kube::api::ObjectMeta;

    fn pv(
        policy: &str,
        phase: &str,
        annotations: &[(&str, &str)],
        deleting: bool,
        finalizers: &[&str],
    ) -> PersistentVolume {
        let mut pv = PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                finalizers: Some(finalizers.iter().map(|f| f.to_string()).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        pv.spec = Some(k8s_openapi::api::core::v1::PersistentVolumeSpec {
            persistent_volume_reclaim_policy: Some(policy.into()),
            ..Default::default()
        });
        pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        if deleting {
            pv.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        pv
    }

    #[test]
    fn bound_volumes_are_never_touched() {
        for policy in ["Delete", "Retain"] {
            assert_eq!(
                disposal(&pv(
                    policy,
                    "Bound",
                    &[(ANN_PURGE, "requested")],
                    true,
                    &[FINALIZER]
                )),
                Disposal::Keep
            );
        }
    }

    #[test]
    fn delete_and_archive_follow_the_policy() {
        assert_eq!(
            disposal(&pv("Delete", "Released", &[], false, &[FINALIZER])),
            Disposal::Delete { archive: false }
        );
        assert_eq!(
            disposal(&pv(
                "Delete",
                "Released",
                &[(ANN_ON_DELETE, "archive")],
                false,
                &[]
            )),
            Disposal::Delete { archive: true }
        );
        assert_eq!(
            disposal(&pv("Delete", "Available", &[], true, &[FINALIZER])),
            Disposal::Delete { archive: false }
        );
    }

    #[test]
    fn retain_keeps_until_purged() {
        assert_eq!(
            disposal(&pv("Retain", "Released", &[], false, &[])),
            Disposal::Keep
        );
        assert_eq!(
            disposal(&pv("Retain", "Released", &[], true, &[])),
            Disposal::Keep
        );
        assert_eq!(
            disposal(&pv(
                "Retain",
                "Released",
                &[(ANN_PURGE, "requested")],
                false,
                &[]
            )),
            Disposal::Purge
        );
        assert_eq!(
            disposal(&pv(
                "Retain",
                "Released",
                &[(ANN_REUSE_FOR, "ns/c/u2")],
                false,
                &[]
            )),
            Disposal::Reuse
        );
        assert_eq!(
            disposal(&pv(
                "Retain",
                "Bound",
                &[(ANN_REUSE_FOR, "ns/c/u2")],
                false,
                &[]
            )),
            Disposal::Keep
        );
    }

    #[test]
    fn directory_must_belong_to_the_volume() {
        let with_path = |path: &str| {
            // The annotation names another volume: it decides nothing.
            let mut v = pv(
                "Delete",
                "Released",
                &[(pv::ANN_DIRECTORY, "/mnt/data/pvc-2_ns_c")],
                false,
                &[],
            );
            v.spec.as_mut().unwrap().host_path = Some(HostPathVolumeSource {
                path: path.into(),
                type_: None,
            });
            v
        };
        assert_eq!(
            own_directory(&with_path("/mnt/data/pvc-1_ns_c")).as_deref(),
            Some("pvc-1_ns_c")
        );
        assert_eq!(own_directory(&with_path("/mnt/data/pvc-2_ns_c")), None);
        assert_eq!(own_directory(&with_path("/mnt/data/..")), None);
    }
}
