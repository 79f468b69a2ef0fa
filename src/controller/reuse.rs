//! `hostvol reuse PV --for NS/CLAIM`: a Released volume's data goes to a new claim. The person marks
//! the old PV (`hostvol.io/reuse-for`, a PV patch: RBAC decides who may); the agent of the volume's
//! node does the rest, in an order a crash at any point cannot spoil:
//!
//! 1. create the new claim's ordinary PV `pvc-<claim uid>`, pre-bound to it, pointing at the
//!    directory name that PV owns (`pvc-<claim uid>_<ns>_<claim>`), same size, limit, node and root;
//! 2. rename the old directory to that name (one rename in the data root: the inode, so the btrfs
//!    qgroup or the XFS/ext4 project id and its limit, stay); a patterned directory
//!    (`directoryPattern`) stays where it is and its ownership mark names the new PV instead;
//! 3. delete the old PV.
//!
//! The old PV and its mark stay until the last step, so a restart redoes whatever is left: the new
//! PV is found (and checked to be this reuse's), the rename is found done. A PV still only ever
//! names a directory that starts with its own name (`pv::directory_of`).

use crate::controller::claim::class_name;
use std::os::fd::AsFd;

use nix::errno::Errno;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::controller::adoption::Failure;
use crate::controller::claim::claim_spec;
use crate::controller::context::{self, Context, Error, Result};
use crate::controller::{pv, reclaim};
use crate::domain::admission::{self, ANN_SELECTED_NODE};
use crate::domain::naming;
use crate::domain::params::ClassParameters;
use crate::domain::pattern::VolumePath;
use crate::domain::reuse::{self, ANN_REUSE_FOR, ANN_REUSED_FROM, Target};
use crate::node::parents;
use crate::node::removal::{self, Moved};

/// The retained volume as the reuse decision sees it.
pub fn volume_facts(pv: &PersistentVolume, provisioner: &str) -> reuse::Volume {
    let spec = pv.spec.clone().unwrap_or_default();
    let claim = spec
        .claim_ref
        .map(|c| {
            format!(
                "{}/{}",
                c.namespace.unwrap_or_default(),
                c.name.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let annotations = pv.annotations();
    reuse::Volume {
        name: pv.name_any(),
        ours: annotations.get(pv::ANN_PROVISIONED_BY).map(String::as_str) == Some(provisioner),
        phase: pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into()),
        claim,
        capacity_bytes: pv::capacity_bytes(pv),
        // A label-pinned volume may be served by a rebuilt node of another name: its agent decides.
        node: if pv::pin_of(pv).is_some() {
            String::new()
        } else {
            annotations.get(pv::ANN_NODE).cloned().unwrap_or_default()
        },
        purge_requested: annotations.contains_key(reclaim::ANN_PURGE),
        reuse_for: annotations
            .get(ANN_REUSE_FOR)
            .and_then(|r| Target::parse(r)),
    }
}

/// The claim that is to get the data, as the reuse decision sees it.
pub fn claim_facts(
    pvc: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
    provisioner: &str,
) -> reuse::Claim {
    let spec = pvc.spec.clone().unwrap_or_default();
    let admitted = admission::admit(&claim_spec(pvc));
    reuse::Claim {
        namespace: pvc.namespace().unwrap_or_default(),
        name: pvc.name_any(),
        uid: pvc.uid().unwrap_or_default(),
        deleting: pvc.metadata.deletion_timestamp.is_some(),
        volume_name: spec.volume_name.filter(|v| !v.is_empty()),
        unservable: admitted.as_ref().err().map(|r| r.message()),
        has_data_source: admitted.as_ref().is_ok_and(|r| r.clone_of.is_some()),
        requested_bytes: admitted.as_ref().map_or(0, |r| r.capacity_bytes),
        class: spec.storage_class_name.unwrap_or_default(),
        class_ours: class.is_some_and(|c| c.provisioner == provisioner),
        selected_node: pvc.annotations().get(ANN_SELECTED_NODE).cloned(),
    }
}

/// Whether a reuse on this node is taking `claim_uid`'s claim (a marked Released PV, or an orphaned
/// directory being adopted): provisioning leaves such a claim alone.
pub fn targeted(ctx: &Context, claim_uid: &str) -> bool {
    crate::controller::adoption::targeted(ctx, claim_uid)
        || ctx.volumes.state().iter().any(|v| {
            v.annotations()
                .get(ANN_REUSE_FOR)
                .and_then(|r| Target::parse(r))
                .is_some_and(|t| t.uid == claim_uid)
        })
}

/// Moves the data of `old` (a Released PV of this node marked for reuse) to its target claim.
pub async fn reconcile(old: &PersistentVolume, ctx: &Context) -> Result<Action> {
    let old_ref = old.object_ref(&());
    let Some(target) = old
        .annotations()
        .get(ANN_REUSE_FOR)
        .and_then(|r| Target::parse(r))
    else {
        ctx.publish_fact(&old_ref, EventType::Warning, "ReuseFailed", "Reuse", format!(
            "annotation {ANN_REUSE_FOR} must be <namespace>/<claim>/<claim uid> (set by `kubectl hostvol reuse`); nothing done"));
        return Ok(Action::await_change());
    };
    let Some((root, old_dir)) = ctx.volume_directory(old) else {
        ctx.publish(
            &old_ref,
            EventType::Warning,
            "ReuseFailed",
            "Reuse",
            format!(
                "{} {:?} is not this volume's directory in a data root of node {}; nothing done",
                pv::source_field(old),
                pv::source_path(old).unwrap_or_default(),
                ctx.settings.node
            ),
        );
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    let new_name = naming::pv_name(&target.uid)?;
    // A directory named for its PV is renamed for the new one; a patterned one (`directoryPattern`)
    // stays where people know it and its ownership mark is handed over instead.
    let named_for_old = pv::directory_of(old).is_some();
    let new_dir = if named_for_old {
        naming::directory_name(&new_name, &target.namespace, &target.name)?
    } else {
        old_dir.clone()
    };
    let _volume = ctx.volume_locks.lock(&old.name_any()).await;
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    // The cache drops node affinity; the new PV copies it, so read the PV whole.
    let Some(old) = volumes.get_opt(&old.name_any()).await? else {
        return Ok(Action::await_change());
    };
    match volumes.get_opt(&new_name).await? {
        Some(existing) if is_reuse_of(&existing, &old, &target) => {} // made before a restart
        Some(_) => {
            ctx.publish(&old_ref, EventType::Warning, "ReuseFailed", "Reuse", format!(
                "PV {new_name} exists and is not this volume's reuse; claim {} has a volume already; nothing done",
                target.key()));
            return Ok(Action::await_change());
        }
        None => {
            let Some(claim_ref) = check(ctx, &old, &target).await? else {
                return Ok(Action::requeue(Duration::from_secs(60)));
            };
            let path = pv::host_path(&root.host_path, &new_dir);
            let new = new_volume(ctx, &old, &new_name, &path, &target).await?;
            match volumes.create(&PostParams::default(), &new).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {} // a concurrent pass: checked next time
                Err(e) => return Err(e.into()),
            }
            info!(pv = %old.name_any(), new = %new_name, claim = %target.key(), "reuse: new PV created");
            ctx.publish(
                &claim_ref,
                EventType::Normal,
                "Reusing",
                "Reuse",
                format!(
                    "volume {new_name} takes over the retained data of {} on node {}",
                    old.name_any(),
                    ctx.settings.node
                ),
            );
        }
    }
    fail::fail_point!("reuse_after_new_pv");
    let (from, to, bytes) = (old_dir.clone(), new_dir.clone(), pv::capacity_bytes(&old));
    let (old_pv, new_pv) = (old.name_any(), new_name.clone());
    let moved = tokio::task::spawn_blocking(move || {
        let handle = root.store.root_handle();
        if !named_for_old {
            let path = VolumePath::parse(&from)?;
            let moved = parents::hand_over(handle.as_fd(), &path, &old_pv, &new_pv).map_err(
                |e| match e {
                    Errno::EPERM => removal::Error::NotOurs {
                        path: from.clone(),
                        owner: None,
                    },
                    Errno::ENOENT => removal::Error::NotFound { name: from.clone() },
                    source => removal::Error::Io {
                        op: "hand over the ownership mark of",
                        path: from.clone().into(),
                        source,
                    },
                },
            )?;
            if let Err(error) = root
                .quotas
                .reapply_volume(handle.as_fd(), &to, &new_pv, bytes)
            {
                warn!(directory = %to, %error, "reuse: cannot set the limit again");
            }
            return Ok(if moved { Moved::Now } else { Moved::Before });
        }
        let moved = removal::rename_volume_dir(handle.as_fd(), &from, &to)?;
        // The limit moved with the inode; set it again in case a crash lost it (idempotent).
        if let Err(error) = root.quotas.reapply(handle.as_fd(), &to, bytes) {
            warn!(directory = %to, %error, "reuse: cannot set the limit again");
        }
        Ok::<_, removal::Error>(moved)
    })
    .await;
    match context::joined(moved)? {
        Ok(moved) => {
            info!(from = %old_dir, to = %new_dir, fresh = (moved == Moved::Now), "reuse: directory renamed")
        }
        Err(error) => {
            ctx.publish(
                &old_ref,
                EventType::Warning,
                "ReuseFailed",
                "Reuse",
                format!(
                    "node {}: cannot rename {old_dir} to {new_dir}: {error}; retrying",
                    ctx.settings.node
                ),
            );
            return Err(Error::Removal(error));
        }
    }
    fail::fail_point!("reuse_after_rename");
    match volumes.delete(&old.name_any(), &Default::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.publish_fact(&old_ref, EventType::Normal, "VolumeReused", "Reuse", format!(
        "data of {} ({old_dir}) now belongs to claim {} as volume {new_name} ({new_dir}) on node {}",
        old.name_any(), target.key(), ctx.settings.node));
    ctx.volumes_changed.notify_waiters();
    Ok(Action::await_change())
}

/// Whether `existing` is the PV this reuse made (its mark names the old PV, it is bound to the target).
fn is_reuse_of(existing: &PersistentVolume, old: &PersistentVolume, target: &Target) -> bool {
    let from = existing.annotations().get(ANN_REUSED_FROM);
    let uid = existing
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.as_deref());
    from == Some(&old.name_any()) && uid == Some(target.uid.as_str())
}

/// The target claim, if the reuse may go ahead now; otherwise a Warning saying why (on the PV and the
/// claim) and `None`.
async fn check(
    ctx: &Context,
    old: &PersistentVolume,
    target: &Target,
) -> Result<Option<ObjectReference>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &target.namespace);
    let old_ref = old.object_ref(&());
    let claim = claims
        .get_opt(&target.name)
        .await?
        .filter(|c| c.uid().as_deref() == Some(target.uid.as_str()));
    let Some(claim) = claim else {
        ctx.publish_fact(&old_ref, EventType::Warning, "ReuseFailed", "Reuse", format!(
            "claim {} (uid {}) no longer exists; remove annotation {ANN_REUSE_FOR} or run `kubectl hostvol reuse` again",
            target.key(), target.uid));
        return Ok(None);
    };
    let class_name = class_name(&claim);
    let class = ctx.classes.get(&ObjectRef::new(&class_name));
    // This agent serves the volume (ownership decided that), so the claim must be placed here.
    let volume = reuse::Volume {
        node: ctx.settings.node.clone(),
        ..volume_facts(old, &ctx.settings.provisioner)
    };
    let facts = claim_facts(&claim, class.as_deref(), &ctx.settings.provisioner);
    if let Some(why) = reuse::refusal(&volume, &facts) {
        warn!(pv = %old.name_any(), claim = %target.key(), %why, "reuse refused");
        for regarding in [&old_ref, &claim.object_ref(&())] {
            ctx.publish(
                regarding,
                EventType::Warning,
                "ReuseFailed",
                "Reuse",
                format!("cannot reuse {}: {why}", old.name_any()),
            );
        }
        return Ok(None);
    }
    Ok(Some(claim.object_ref(&())))
}

/// The new claim's PV: the old one's size, limit, node affinity, data root and hostvol annotations,
/// with the claim's access modes and its class's name and reclaim policy.
async fn new_volume(
    ctx: &Context,
    old: &PersistentVolume,
    name: &str,
    path: &str,
    target: &Target,
) -> Result<PersistentVolume> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &target.namespace);
    let claim = claims.get(&target.name).await?;
    let class_name = class_name(&claim);
    let class = ctx.classes.get(&ObjectRef::new(&class_name));
    let policy = class
        .as_ref()
        .and_then(|c| c.reclaim_policy.clone())
        .unwrap_or_else(|| "Delete".into());
    let archive = class
        .as_ref()
        .and_then(|c| ClassParameters::parse(&c.parameters.clone().unwrap_or_default()).ok())
        .is_some_and(|p| p.archive_on_delete);
    let access_modes = admission::admit(&claim_spec(&claim))
        .map(|r| r.access_modes)
        .unwrap_or_default();
    let mut spec = old.spec.clone().unwrap_or_default();
    spec.access_modes = Some(access_modes);
    spec.storage_class_name = Some(class_name);
    spec.persistent_volume_reclaim_policy = Some(policy.clone());
    if let Some(host_path) = spec.host_path.as_mut() {
        host_path.path = path.to_string();
    }
    if let Some(local) = spec.local.as_mut() {
        local.path = path.to_string();
    }
    spec.claim_ref = Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(target.namespace.clone()),
        name: Some(target.name.clone()),
        uid: Some(target.uid.clone()),
        ..Default::default()
    });
    // hostvol's own annotations (node, data root, quota record, ...), none of the marks.
    let mut annotations: std::collections::BTreeMap<String, String> = old
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with("hostvol.io/") || k.as_str() == pv::ANN_PROVISIONED_BY)
        .filter(|(k, _)| {
            ![
                ANN_REUSE_FOR,
                ANN_REUSED_FROM,
                reclaim::ANN_PURGE,
                reclaim::ANN_ON_DELETE,
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(pv::ANN_DIRECTORY.into(), path.to_string());
    annotations.insert(ANN_REUSED_FROM.into(), old.name_any());
    let mut finalizers = None;
    if policy == "Delete" {
        annotations.insert(
            reclaim::ANN_ON_DELETE.into(),
            if archive { "archive" } else { "delete" }.into(),
        );
        finalizers = Some(vec![reclaim::FINALIZER.to_string()]);
    }
    Ok(PersistentVolume {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(old.labels().clone()),
            annotations: Some(annotations),
            finalizers,
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// `hostvol reuse PV` through the node service (root on the node): the same checks as the CLI, then
/// the same mark, written with the agent's credential; the controller above does the rest. Returns
/// the claim's new PV name.
pub async fn request(
    ctx: &Context,
    pv_name: &str,
    namespace: &str,
    claim_name: &str,
) -> std::result::Result<String, Failure> {
    let node = &ctx.settings.node;
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let old = volumes
        .get_opt(pv_name)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Failure::NotFound(format!("PV {pv_name} not found")))?;
    // Only a volume this agent serves (its watch, its node, its data root) is handed over from here.
    let served =
        ctx.volumes.get(&ObjectRef::new(pv_name)).is_some() && ctx.volume_directory(&old).is_some();
    if !served {
        return Err(Failure::Refused(format!(
            "{pv_name} is not a volume of node {node}; ask its own node's agent"
        )));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let claim = claims
        .get_opt(claim_name)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| {
            Failure::NotFound(format!(
                "claim {namespace}/{claim_name} not found; create it first (no pod yet, the data's size)"
            ))
        })?;
    let class_name = class_name(&claim);
    let class = ctx.classes.get(&ObjectRef::new(&class_name));
    let facts = claim_facts(&claim, class.as_deref(), &ctx.settings.provisioner);
    let volume = reuse::Volume {
        node: node.clone(),
        ..volume_facts(&old, &ctx.settings.provisioner)
    };
    if let Some(why) = reuse::refusal(&volume, &facts) {
        return Err(Failure::Refused(why.to_string()));
    }
    let target = Target {
        namespace: namespace.to_string(),
        name: claim_name.to_string(),
        uid: facts.uid.clone(),
    };
    mark(&volumes, &old, &target).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 409 => {
            Failure::Refused(format!("{pv_name} changed while being checked; ask again"))
        }
        e => Failure::Failed(format!("cannot mark {pv_name}: {e}")),
    })?;
    naming::pv_name(&target.uid).map_err(|e| Failure::Invalid(e.to_string()))
}

/// Marks `old` for reuse by `target`, only if it is still the object that was checked.
pub async fn mark(
    volumes: &Api<PersistentVolume>,
    old: &PersistentVolume,
    target: &Target,
) -> kube::Result<()> {
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": old.resource_version(),
        "annotations": {ANN_REUSE_FOR: target.record()}}});
    volumes
        .patch(
            &old.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
}
