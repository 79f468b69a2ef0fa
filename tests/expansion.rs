//! Online expansion on a real control plane: a bound claim of a class with `allowVolumeExpansion`
//! grows when its request grows (PV capacity, then the claim's status, with the Events CSI resizers
//! publish), within the room the node has left; a growth that does not fit is refused with a Warning
//! that says how much room there is; for both volume types (`hostPath`, `local`). (The limit raise on a quota filesystem is covered by
//! `tests/quotas.rs`.)

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};

const T: Duration = Duration::from_secs(60);

fn request_patch(size: &str) -> serde_json::Value {
    serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}})
}

async fn pv_capacity(cluster: &Cluster, pv: &str) -> String {
    let pv = Api::<PersistentVolume>::all(cluster.client())
        .get(pv)
        .await
        .unwrap();
    pv.spec.unwrap().capacity.unwrap()["storage"].0.clone()
}

async fn claim_status_capacity(claims: &Api<PersistentVolumeClaim>, name: &str) -> Option<String> {
    let pvc = claims.get(name).await.unwrap();
    Some(pvc.status?.capacity?.get("storage")?.0.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_claims_grow_within_the_room_left() {
    let cluster = Cluster::start().await;
    cluster.add_node("n1").await;
    let agent = cluster
        .start_agent(
            "n1",
            &["--capacity-cap", "100Mi", "--pod-name", "hostvol-n1"],
        )
        .await;
    cluster.create_namespace("grow").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "grow");
    // Expansion reads the volume's directory from the PV's source: once per volume type.
    let mut pvs = Vec::new();
    for volume_type in VOLUME_TYPES {
        let class = format!("growable-{}", volume_type.to_lowercase());
        let claim = format!("data-{}", volume_type.to_lowercase());
        cluster.kubectl_apply_yaml(&format!(
            "{}allowVolumeExpansion: true\n---\n{}",
            typed_class_yaml(&class, "WaitForFirstConsumer", "Delete", volume_type, &[]),
            claim_yaml("grow", &claim, &class, "10Mi", Some("n1"))
        ));
        let volume = cluster.hostvol_pv_of_claim("grow", &claim, T).await;
        assert_eq!(pv_volume_type(&volume), volume_type);
        let pv = volume.metadata.name.unwrap();

        // Grow to 30Mi: the PV, then the claim's status; the Events users know from CSI resizers.
        claims
            .patch(
                &claim,
                &PatchParams::default(),
                &Patch::Merge(&request_patch("30Mi")),
            )
            .await
            .unwrap();
        cluster.wait_event("grow", &claim, "Resizing", T).await;
        let (kind, _, message) = cluster
            .wait_event("grow", &claim, "VolumeResizeSuccessful", T)
            .await;
        assert_eq!(kind, "Normal", "{volume_type}: {message}");
        assert_eq!(pv_capacity(&cluster, &pv).await, "30Mi", "{volume_type}");
        cluster
            .wait_for(
                || async {
                    claim_status_capacity(&claims, &claim).await.as_deref() == Some("30Mi")
                },
                T,
                &format!("{claim}: status.capacity 30Mi"),
            )
            .await;
        let conditions = claims.get(&claim).await.unwrap().status.unwrap().conditions;
        assert!(
            conditions.unwrap_or_default().is_empty(),
            "the Resizing condition is cleared once done"
        );
        pvs.push(pv);
    }
    // The grown sizes count at once: 100Mi cap - 2 x 30Mi.
    cluster
        .wait_for(
            || async {
                metric_value(&agent.metrics().await, "hostvol_allocatable_bytes", &[])
                    == Some((40u64 << 20) as f64)
            },
            T,
            "allocatable 40Mi after growing two volumes to 30Mi",
        )
        .await;
    let (claim, pv) = ("data-hostpath", &pvs[0]);

    // 200Mi does not fit in the 40Mi left: refused with the figures, nothing changes.
    claims
        .patch(
            claim,
            &PatchParams::default(),
            &Patch::Merge(&request_patch("200Mi")),
        )
        .await
        .unwrap();
    let (kind, _, message) = cluster
        .wait_event("grow", claim, "VolumeResizeFailed", T)
        .await;
    assert_eq!(kind, "Warning", "{message}");
    assert!(
        message.contains("n1") && message.contains("40"),
        "the Warning says how much room node n1 has: {message}"
    );
    assert_eq!(
        pv_capacity(&cluster, pv).await,
        "30Mi",
        "a refused growth changes nothing"
    );
    assert_eq!(
        claim_status_capacity(&claims, claim).await.as_deref(),
        Some("30Mi")
    );
    let refused = metric_value(
        &agent.metrics().await,
        "hostvol_expansions_total",
        &[("outcome", "refused")],
    );
    assert!(
        refused.unwrap_or(0.0) >= 1.0,
        "refusals are counted: {refused:?}"
    );
}
