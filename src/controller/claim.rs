//! Reading a claim: its key for logs and backoff, and the parts of its spec admission decides on.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;

use crate::domain::admission::ClaimSpec;

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
        has_data_source: spec.data_source.is_some() || spec.data_source_ref.is_some(),
        has_selector: spec.selector.is_some(),
        storage_request: spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone())),
    }
}
