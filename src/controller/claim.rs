//! Reading a claim: its key for logs and backoff, and the parts of its spec admission decides on.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::controller::context::{Context, Result};
use crate::domain::admission::{self, ClaimSpec, DataSource};

/// `namespace/name`, for logs and per-claim backoff.
pub fn claim_key(claim: &PartialObjectMeta<PersistentVolumeClaim>) -> String {
    format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    )
}

/// What admission needs of a claim's spec.
pub fn claim_spec(pvc: &PersistentVolumeClaim) -> ClaimSpec {
    let spec = pvc.spec.clone().unwrap_or_default();
    ClaimSpec {
        volume_mode: spec.volume_mode,
        access_modes: spec.access_modes.unwrap_or_default(),
        data_source: data_source(pvc),
        has_selector: spec.selector.is_some(),
        storage_request: spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone())),
    }
}

/// `dataSourceRef` (newer clusters mirror `dataSource` into it), else `dataSource`.
pub fn data_source(pvc: &PersistentVolumeClaim) -> Option<DataSource> {
    let spec = pvc.spec.as_ref()?;
    if let Some(r) = &spec.data_source_ref {
        return Some(DataSource {
            api_group: r.api_group.clone(),
            kind: r.kind.clone(),
            name: r.name.clone(),
        });
    }
    spec.data_source.as_ref().map(|r| DataSource {
        api_group: r.api_group.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
    })
}

/// Sets the claim's selected node (with `extra` annotations), guarded by the claim's resourceVersion
/// so that of concurrent writers only one succeeds, and tells the user why with a `NodeSelected`
/// Event. `false` when another writer changed the claim first (its next event brings it back).
pub async fn select_node(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    node: &str,
    extra: &[(&str, String)],
    why: String,
) -> Result<bool> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    let mut annotations = serde_json::Map::new();
    annotations.insert(admission::ANN_SELECTED_NODE.into(), node.into());
    for (key, value) in extra {
        annotations.insert((*key).into(), value.clone().into());
    }
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": pvc.resource_version(),
        "annotations": annotations,
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
            ctx.publish(
                &pvc.object_ref(&()),
                EventType::Normal,
                "NodeSelected",
                "Provision",
                why,
            );
            Ok(true)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            ctx.metrics.placement_conflicts.inc();
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}
