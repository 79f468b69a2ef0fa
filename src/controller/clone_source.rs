//! Finding a clone's source: the bound hostvol claim its `dataSource` names, and the node its data
//! lives on (a clone can only be made there).

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use tracing::info;

use crate::controller::context::{Context, Result};
use crate::controller::{claim, context, pv, reclaim};
use crate::domain::admission::Refusal;
use crate::domain::affinity;

/// Where a clone's source is.
pub enum Source {
    /// On this node: the source volume's directory, size and data root.
    Here {
        directory: String,
        bytes: u64,
        root: String,
        pv_name: String,
    },
    /// On another node: the clone must go there.
    OnNode(String),
    Unusable(Refusal),
}

fn unusable(why: String) -> Result<Source> {
    Ok(Source::Unusable(Refusal::CloneSource(why)))
}

/// Resolves the source claim `name` of a clone in `namespace` of class `class`.
pub async fn resolve(ctx: &Context, namespace: &str, name: &str, class: &str) -> Result<Source> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(source) = claims.get_opt(name).await? else {
        return unusable(format!(
            "source claim {namespace}/{name} does not exist; create it first or fix dataSource"
        ));
    };
    let spec = source.spec.clone().unwrap_or_default();
    let source_class = spec.storage_class_name.unwrap_or_default();
    if source_class != class {
        return unusable(format!(
            "source claim {name} is of class {source_class:?}, the clone of {class:?}; \
             a clone stays in its source's class"
        ));
    }
    let Some(volume_name) = spec.volume_name.filter(|v| !v.is_empty()) else {
        return unusable(format!(
            "source claim {name} is not bound yet; the clone is made once it is (retried)"
        ));
    };
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(volume) = volumes.get_opt(&volume_name).await? else {
        return unusable(format!(
            "the volume {volume_name} of source claim {name} is gone"
        ));
    };
    let ours = volume.annotations().get(pv::ANN_PROVISIONED_BY) == Some(&ctx.settings.provisioner);
    // Flat volumes prove their directory by its name; a patterned one (`directoryPattern`) is
    // only a candidate path here, proven by its mark on disk before the copy reads it.
    let (Some(node), true) = (volume.annotations().get(pv::ANN_NODE).cloned(), ours) else {
        return unusable(format!(
            "the volume {volume_name} of source claim {name} was not made by hostvol"
        ));
    };
    // A volume pinned by a label (nodeAffinityKey) is on whichever node carries its value now.
    let node = match pv::pin_of(&volume) {
        None => node,
        Some((key, values)) => {
            let labels = ctx.node_labels();
            if affinity::pinned_here(&values, labels.get(&key).map(String::as_str)) {
                ctx.settings.node.clone()
            } else {
                let selector = format!("{key} in ({})", values.join(","));
                let nodes = Api::<PartialObjectMeta<Node>>::all(ctx.client.clone())
                    .list_metadata(&ListParams::default().labels(&selector).limit(1))
                    .await?;
                match nodes.items.first() {
                    Some(n) => n.name_any(),
                    None => {
                        return unusable(format!(
                            "no node carries {key}={}, where the volume {volume_name} of source \
                             claim {name} is; the clone is made once one does (retried)",
                            values.join(",")
                        ));
                    }
                }
            }
        }
    };
    if node != ctx.settings.node {
        return Ok(Source::OnNode(node));
    }
    let Some(directory) = reclaim::own_directory(&volume)
        .or_else(|| context::holding_root(&ctx.roots(), &volume).map(|(_, path)| path))
    else {
        return unusable(format!(
            "the volume {volume_name} of source claim {name} is in no data root of node {node} \
             ({} {:?})",
            pv::source_field(&volume),
            pv::source_path(&volume).unwrap_or_default()
        ));
    };
    Ok(Source::Here {
        directory,
        bytes: pv::capacity_bytes(&volume),
        root: context::volume_root(&ctx.roots(), &volume),
        pv_name: volume_name,
    })
}

/// Places the clone `pvc` on `node`, where its source's data is, and says so.
pub async fn place_on(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    node: &str,
    source: &str,
) -> Result<()> {
    let why = format!(
        "clone of {source}: placed on node {node}, where {source}'s data is (a clone can only be \
         made there; its pods will run there)"
    );
    if claim::select_node(ctx, pvc, node, &[], why).await? {
        info!(pvc = %pvc.name_any(), %node, %source, "clone placed on its source's node");
    }
    Ok(())
}
