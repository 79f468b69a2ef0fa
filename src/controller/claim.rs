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
/// The claim's `storageClassName`, empty when it names none.
pub fn class_name(pvc: &PersistentVolumeClaim) -> String {
    pvc.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default()
}

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

/// `dataSourceRef` (1.24+ mirrors `dataSource` into it, and a claim may set only it), else
/// `dataSource`. A `dataSourceRef.namespace` naming the claim's own namespace is the same as none.
pub fn data_source(pvc: &PersistentVolumeClaim) -> Option<DataSource> {
    let spec = pvc.spec.as_ref()?;
    if let Some(r) = &spec.data_source_ref {
        let own = pvc.metadata.namespace.as_deref().unwrap_or_default();
        return Some(DataSource {
            api_group: r.api_group.clone(),
            kind: r.kind.clone(),
            name: r.name.clone(),
            namespace: r.namespace.clone().filter(|ns| !ns.is_empty() && ns != own),
        });
    }
    spec.data_source.as_ref().map(|r| DataSource {
        api_group: r.api_group.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        namespace: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::admission::admit;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, TypedLocalObjectReference, TypedObjectReference,
        VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn local(group: Option<&str>, kind: &str, name: &str) -> TypedLocalObjectReference {
        TypedLocalObjectReference {
            api_group: group.map(Into::into),
            kind: kind.into(),
            name: name.into(),
        }
    }

    fn typed(
        group: Option<&str>,
        kind: &str,
        name: &str,
        ns: Option<&str>,
    ) -> TypedObjectReference {
        TypedObjectReference {
            api_group: group.map(Into::into),
            kind: kind.into(),
            name: name.into(),
            namespace: ns.map(Into::into),
        }
    }

    /// A claim in namespace "team" as each server version stores it.
    fn claim(
        source: Option<TypedLocalObjectReference>,
        source_ref: Option<TypedObjectReference>,
    ) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: kube::api::ObjectMeta {
                name: Some("copy".into()),
                namespace: Some("team".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                data_source: source,
                data_source_ref: source_ref,
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_string(), Quantity("1Gi".into()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn clones_honour_data_source_ref_as_each_version_stores_it() {
        let pvc = |name: &str| local(None, "PersistentVolumeClaim", name);
        let pvc_ref = |name: &str, ns: Option<&str>| typed(None, "PersistentVolumeClaim", name, ns);
        let cases = [
            // 1.20: dataSource only.
            (
                "dataSource only",
                claim(Some(pvc("a")), None),
                Ok(Some("a")),
            ),
            // 1.24+: the server mirrors dataSource into dataSourceRef.
            (
                "both, mirrored",
                claim(Some(pvc("a")), Some(pvc_ref("a", None))),
                Ok(Some("a")),
            ),
            // A claim may set only dataSourceRef (the server leaves dataSource empty for it).
            (
                "dataSourceRef only",
                claim(None, Some(pvc_ref("b", None))),
                Ok(Some("b")),
            ),
            (
                "dataSourceRef, own namespace",
                claim(None, Some(pvc_ref("b", Some("team")))),
                Ok(Some("b")),
            ),
            // 1.26+ cross-namespace sources: not a clone hostvol can make.
            (
                "dataSourceRef, other namespace",
                claim(None, Some(pvc_ref("b", Some("prod")))),
                Err("\"prod\""),
            ),
            (
                "dataSourceRef to a snapshot",
                claim(
                    None,
                    Some(typed(
                        Some("snapshot.storage.k8s.io"),
                        "VolumeSnapshot",
                        "s",
                        None,
                    )),
                ),
                Err("VolumeSnapshot"),
            ),
            (
                "dataSourceRef to a populator",
                claim(
                    None,
                    Some(typed(Some("hello.example.com"), "Hello", "h", None)),
                ),
                Err("hello.example.com/Hello"),
            ),
            ("no source", claim(None, None), Ok(None)),
        ];
        for (case, pvc, want) in cases {
            let got = admit(&claim_spec(&pvc));
            match want {
                Ok(clone_of) => {
                    assert_eq!(got.expect(case).clone_of.as_deref(), clone_of, "{case}")
                }
                Err(names) => {
                    let refusal = got.expect_err(case);
                    // The same Warning (reason and wording) as for a dataSource of another kind.
                    assert_eq!(refusal.reason(), "data_source", "{case}");
                    assert!(
                        refusal.message().contains(names),
                        "{case}: {}",
                        refusal.message()
                    );
                    assert!(
                        refusal.message().starts_with("dataSource/dataSourceRef"),
                        "{case}"
                    );
                }
            }
        }
    }

    #[test]
    fn placement_follows_the_same_source() {
        let only_ref = claim(None, Some(typed(None, "PersistentVolumeClaim", "b", None)));
        assert!(data_source(&only_ref).is_some_and(|s| s.is_claim() && s.name == "b"));
        let elsewhere = claim(
            None,
            Some(typed(None, "PersistentVolumeClaim", "b", Some("prod"))),
        );
        assert!(data_source(&elsewhere).is_some_and(|s| !s.is_claim()));
    }
}
