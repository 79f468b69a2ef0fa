//! Reading a claim: its key for logs and backoff, and the parts of its spec admission decides on.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;

use crate::domain::admission::{ClaimSpec, DataSource};

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
