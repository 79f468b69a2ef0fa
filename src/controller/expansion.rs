//! Online expansion of bound volumes, as an external resizer: when a claim's request grows past its
//! PV's size, check the extra bytes fit (same arithmetic as admission), raise the limit where the root
//! enforces sizes, then the PV's capacity, then the claim's `status.capacity`. A directory needs no
//! node-side resize. Each step is idempotent: a pass interrupted anywhere is finished by the next.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::controller::context::{Context, Error, Result};
use crate::controller::store::store_ready;
use crate::controller::{ownership, pv};
use crate::domain::expansion::{self, ClaimStatus, Expansion};
use crate::domain::{naming, quantity};

/// Our PV for a bound claim, if this agent owns it.
pub fn own_volume(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Option<Arc<PersistentVolume>> {
    let name = naming::pv_name(&claim.uid()?).ok()?;
    ctx.volumes.get(&ObjectRef::new(&name))
}

pub async fn reconcile(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Context,
) -> Result<Action> {
    // At start-up the claims may be listed before our volumes: wait for those before deciding.
    if !store_ready(&ctx.volumes).await {
        return Ok(Action::await_change());
    }
    let Some(volume) = own_volume(claim, ctx) else {
        return Ok(Action::await_change());
    };
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let Some(pvc) = claims.get_opt(&claim.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let Some((request, requested)) = storage_request(&pvc) else {
        return Ok(Action::await_change());
    };
    let current = pv::capacity_bytes(&volume);
    if requested > current {
        if !ownership::may_touch(ctx, &volume, "resize") {
            return Ok(Action::await_change());
        }
        let grown = grow(ctx, &pvc, &volume, &request, requested, current).await?;
        if !grown {
            // No room now; capacity may change (volumes deleted, cap raised): look again later.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    }
    if expansion::status_behind(requested, &claim_status(&pvc)) {
        finish(ctx, &pvc, &volume, &request).await?;
    }
    Ok(Action::await_change())
}

/// The claim's storage request, as written and in bytes.
fn storage_request(pvc: &PersistentVolumeClaim) -> Option<(String, u64)> {
    let request = pvc
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?
        .0
        .clone();
    let bytes = quantity::parse_bytes(&request).ok()?;
    Some((request, bytes))
}

/// The claim's status as far as resizing goes; the fields newer servers add are `None` on older ones.
fn claim_status(pvc: &PersistentVolumeClaim) -> ClaimStatus {
    let Some(status) = pvc.status.as_ref() else {
        return ClaimStatus {
            binding: true,
            ..ClaimStatus::default()
        };
    };
    let storage = |map: &Option<std::collections::BTreeMap<String, Quantity>>| {
        map.as_ref()
            .and_then(|m| m.get("storage"))
            .and_then(|q| quantity::parse_bytes(&q.0).ok())
    };
    ClaimStatus {
        capacity: storage(&status.capacity).unwrap_or(0),
        allocated: storage(&status.allocated_resources),
        resize_status: status
            .allocated_resource_statuses
            .as_ref()
            .and_then(|m| m.get("storage").cloned()),
        binding: status.phase.as_deref() != Some("Bound"),
    }
}

/// Checks the room, raises the limit and the PV's capacity. `false` when the node has no room.
/// Holds the volume's own lock throughout (the limits pass must not put back the old size meanwhile)
/// and the node's lock only to check and reserve the extra bytes.
async fn grow(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    volume: &PersistentVolume,
    request: &str,
    requested: u64,
    current: u64,
) -> Result<bool> {
    let claim_ref = pvc.object_ref(&());
    let node = &ctx.settings.node;
    let pv_name = volume.name_any();
    let _volume = ctx.volume_locks.lock(&pv_name).await;
    // The directory from the PV's immutable hostPath, never from its editable annotation.
    let Some((root, directory)) = ctx.volume_directory(volume) else {
        fail(
            ctx,
            pvc,
            format!(
                "node {node}: the directory of volume {pv_name} ({}) is not in any of this node's data \
                 roots ({}); restore its data root in hostvol-config to grow the volume",
                pv::source_path(volume).unwrap_or("no path"),
                ctx.roots().names().join(", ")
            ),
        );
        return Ok(false);
    };
    let (to, reservation) = {
        let _admission = ctx.admission_lock.lock().await;
        let allocatable = ctx.allocatable_bytes(&root.name);
        match expansion::decide(current, requested, allocatable, node) {
            Expansion::NotNeeded => return Ok(true),
            Expansion::NoRoom(why) => {
                fail(ctx, pvc, why);
                // Says so on the claim too (1.32+ keeps it), so the user knows to lower the request.
                patch_status(
                    ctx,
                    pvc,
                    serde_json::json!({
                        "allocatedResourceStatuses": {"storage": expansion::RESIZE_INFEASIBLE},
                    }),
                )
                .await?;
                ctx.metrics.expansion("refused");
                return Ok(false);
            }
            Expansion::Grow { to, .. } => {
                let key = format!("grow/{pv_name}");
                (
                    to,
                    ctx.reserve(&key, &root.name, to.saturating_sub(current)),
                )
            }
        }
    };
    ctx.publish(
        &claim_ref,
        EventType::Normal,
        "Resizing",
        "Resize",
        format!("hostvol agent on node {node} is resizing volume {pv_name} to {request}"),
    );
    mark_resizing(ctx, pvc, request).await?;
    // quotactl and the qgroup ioctls block: on the blocking pool, never on an async worker.
    let limit = {
        let (root, directory, pv_name) = (root.clone(), directory.clone(), pv_name.clone());
        tokio::task::spawn_blocking(move || {
            let handle = root.store.root_handle();
            root.quotas
                .limit_volume(handle.as_fd(), &directory, &pv_name, to)
        })
        .await
        .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked.to_string())))
    };
    if let Err(error) = limit {
        fail(
            ctx,
            pvc,
            format!("node {node}: cannot raise the size limit of {directory}: {error}"),
        );
        ctx.metrics.expansion("failed");
        return Err(Error::Disk(crate::node::volume_store::Error::Quota {
            root: root.store.root_path().to_path_buf(),
            name: directory,
            source: error,
        }));
    }
    let patch = serde_json::json!({"spec": {"capacity": {"storage": request}}});
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    volumes
        .patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    // Counted as grown before the reservation goes, so the bytes never drop out in between.
    ctx.remember_growth(&pv_name, &root.name, to);
    drop(reservation);
    Ok(true)
}

/// The claim shows the size being grown to, as resizers mark it (1.32+ reads `allocatedResources`
/// and `allocatedResourceStatuses`; older servers drop both), with a Resizing condition.
async fn mark_resizing(ctx: &Context, pvc: &PersistentVolumeClaim, request: &str) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    patch_status(
        ctx,
        pvc,
        serde_json::json!({
            "allocatedResources": {"storage": request},
            "allocatedResourceStatuses": {"storage": expansion::RESIZE_IN_PROGRESS},
            "conditions": [{"type": "Resizing", "status": "True", "lastTransitionTime": now}],
        }),
    )
    .await
}

async fn patch_status(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    status: serde_json::Value,
) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": status });
    claims
        .patch_status(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Called once the PV is at least the requested size: also after a recovery, when the user lowered
/// a failed request. The Resizing condition and the resize status go.
async fn finish(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    volume: &PersistentVolume,
    request: &str,
) -> Result<()> {
    patch_status(
        ctx,
        pvc,
        serde_json::json!({
            "capacity": {"storage": request},
            "allocatedResources": {"storage": request},
            "allocatedResourceStatuses": {"storage": null},
            "conditions": null,
        }),
    )
    .await?;
    ctx.metrics.expansion("succeeded");
    info!(pv = %volume.name_any(), size = %request, "volume resized");
    ctx.publish(
        &pvc.object_ref(&()),
        EventType::Normal,
        "VolumeResizeSuccessful",
        "Resize",
        format!("resize volume {} to {request} succeeded", volume.name_any()),
    );
    Ok(())
}

fn fail(ctx: &Context, pvc: &PersistentVolumeClaim, why: String) {
    warn!(pvc = %pvc.name_any(), %why, "cannot resize");
    ctx.publish(
        &pvc.object_ref(&()),
        EventType::Warning,
        "VolumeResizeFailed",
        "Resize",
        why,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim as the API server returns it: `status` from a 1.20 server, or from a 1.32+ one after a
    /// failed expansion to 100Gi that the user then lowered to 15Gi.
    fn claim(request: &str, status: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "team", "uid": "u"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": request}},
                     "storageClassName": "hostvol", "volumeName": "pvc-u"},
            "status": status,
        }))
        .expect("a PersistentVolumeClaim")
    }

    #[test]
    fn reads_the_resize_fields_of_each_version() {
        let gi = 1u64 << 30;
        let old = claim(
            "20Gi",
            serde_json::json!({"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "10Gi"}}),
        );
        assert_eq!(
            claim_status(&old),
            ClaimStatus {
                capacity: 10 * gi,
                allocated: None,
                resize_status: None,
                binding: false,
            }
        );
        let just_provisioned = claim("10Gi", serde_json::json!({"phase": "Pending"}));
        assert!(
            claim_status(&just_provisioned).binding,
            "the PV controller's to write"
        );
        let recovering = claim(
            "15Gi",
            serde_json::json!({
                "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "10Gi"},
                "allocatedResources": {"storage": "100Gi"},
                "allocatedResourceStatuses": {"storage": "ControllerResizeInfeasible"},
            }),
        );
        let status = claim_status(&recovering);
        assert_eq!(
            status,
            ClaimStatus {
                capacity: 10 * gi,
                allocated: Some(100 * gi),
                resize_status: Some(expansion::RESIZE_INFEASIBLE.into()),
                binding: false,
            }
        );
        assert_eq!(storage_request(&recovering), Some(("15Gi".into(), 15 * gi)));
        // 15Gi fits where 100Gi did not: grow by 5Gi, then level the status.
        assert_eq!(
            expansion::decide(10 * gi, 15 * gi, 6 * gi, "n"),
            Expansion::Grow {
                to: 15 * gi,
                extra: 5 * gi
            }
        );
        assert!(expansion::status_behind(15 * gi, &status));
    }
}
