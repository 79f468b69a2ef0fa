//! The PersistentVolume object hostvol publishes for a provisioned claim.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::ObjectMeta;

use crate::domain::{affinity, naming, params, quantity};

pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_NODE: &str = "hostvol.io/node";
pub const ANN_DIRECTORY: &str = "hostvol.io/directory";
/// Name of the node's data root holding the directory (`default` when absent).
pub const ANN_DATA_ROOT: &str = "hostvol.io/data-root";
/// The size limit set on the volume's directory (`qgroup 0/<id>` or `project <id>`), where the root
/// enforces sizes: a restart and people find it here.
pub const ANN_QUOTA: &str = "hostvol.io/quota";
/// Label on every PV we make, so each agent can watch only its own node's volumes.
pub const LABEL_NODE: &str = "hostvol.io/node";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Everything needed to describe one provisioned volume.
#[derive(Debug, Clone)]
pub struct VolumeDescription {
    pub pv_name: String,
    pub provisioner: String,
    pub node: String,
    /// Value of the node's `kubernetes.io/hostname` label (can differ from the node name).
    pub node_hostname: String,
    /// The class's `nodeAffinityKey` and this node's value of it, when it is not the hostname: the
    /// volume is then pinned to every node carrying that value (see `domain::affinity`).
    pub pin: Option<(String, String)>,
    /// The directory as the kubelet sees it on the node.
    pub host_path: String,
    pub claim_namespace: String,
    pub claim_name: String,
    pub claim_uid: String,
    pub storage_class: String,
    pub capacity: String,
    pub access_modes: Vec<String>,
    pub reclaim_policy: String,
}

pub fn build(volume: &VolumeDescription) -> PersistentVolume {
    let annotations = BTreeMap::from([
        (ANN_PROVISIONED_BY.to_string(), volume.provisioner.clone()),
        (ANN_NODE.to_string(), volume.node.clone()),
        (ANN_DIRECTORY.to_string(), volume.host_path.clone()),
    ]);
    // The label selects the PV into the watch of every agent that serves it: the node's own, or
    // that of whichever node carries the pinned value.
    let (key, value, label) = match &volume.pin {
        Some((key, value)) => (
            key.clone(),
            value.clone(),
            affinity::pin_label_value(key, value),
        ),
        None => (
            HOSTNAME_LABEL.to_string(),
            volume.node_hostname.clone(),
            naming::node_label_value(&volume.node),
        ),
    };
    let labels = BTreeMap::from([(LABEL_NODE.to_string(), label)]);
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(volume.pv_name.clone()),
            annotations: Some(annotations),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(volume.capacity.clone()),
            )])),
            access_modes: Some(volume.access_modes.clone()),
            volume_mode: Some("Filesystem".into()),
            storage_class_name: Some(volume.storage_class.clone()),
            persistent_volume_reclaim_policy: Some(volume.reclaim_policy.clone()),
            // Directory, never DirectoryOrCreate: a missing directory (say, a disk that did not mount)
            // must fail the pod instead of silently writing to the node's root filesystem.
            host_path: Some(HostPathVolumeSource {
                path: volume.host_path.clone(),
                type_: Some("Directory".into()),
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key,
                            operator: "In".into(),
                            values: Some(vec![value]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            // Pre-bound: the PV controller binds exactly this claim and no other.
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(volume.claim_namespace.clone()),
                name: Some(volume.claim_name.clone()),
                uid: Some(volume.claim_uid.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The node directory path for a volume: `<host root>/<directory name>`.
pub fn host_path(host_root: &str, directory: &str) -> String {
    format!("{}/{}", host_root.trim_end_matches('/'), directory)
}

/// The data root a PV's directory is in (PVs from before named roots are in `default`).
pub fn data_root(pv: &PersistentVolume) -> &str {
    pv.annotations()
        .get(ANN_DATA_ROOT)
        .map_or(params::DEFAULT_ROOT, String::as_str)
}

/// The PV's size in bytes (0 when missing or unreadable).
pub fn capacity_bytes(pv: &PersistentVolume) -> u64 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::parse_bytes(&q.0).ok())
        .unwrap_or(0)
}

/// The name `path` gives directly inside the root `host_root` (`<host_root>/<name>`, a safe directory
/// name: no `/`, no `..`, no leading dot), or None for anything else, so nothing outside the root or
/// deeper in it is ever named. Symlinks are never followed below the root: the node opens names
/// relative to the root's handle with `O_NOFOLLOW`.
pub fn root_holds<'a>(host_root: &str, path: &'a str) -> Option<&'a str> {
    let name = path
        .strip_prefix(host_root.trim_end_matches('/'))?
        .strip_prefix('/')?;
    naming::validate_directory_name(name).ok()?;
    Some(name)
}

/// The directory one of our PVs was made for, from its `spec.hostPath.path` (the API server refuses
/// any change to a PV's source, unlike the `hostvol.io/directory` annotation anyone allowed to patch
/// PVs can edit), and only if it is this PV's own (`<pv name>_...`, made from the claim's uid), so
/// no PV can point the agent at another volume's data.
pub fn directory_of(pv: &PersistentVolume) -> Option<String> {
    let path = &pv.spec.as_ref()?.host_path.as_ref()?.path;
    let (_, name) = path.rsplit_once('/')?;
    naming::validate_directory_name(name).ok()?;
    let rest = name.strip_prefix(pv.metadata.name.as_deref()?)?;
    rest.starts_with('_').then(|| name.to_string())
}

/// `directory_of`, checked to be directly inside the data root the kubelet sees as `host_root`.
pub fn volume_directory(pv: &PersistentVolume, host_root: &str) -> Option<String> {
    let path = &pv.spec.as_ref()?.host_path.as_ref()?.path;
    root_holds(host_root, path)?;
    directory_of(pv)
}

/// The label key and values a PV is pinned by when that key is not the hostname (a class with
/// `nodeAffinityKey`), from its node affinity: part of the spec the API server keeps as written.
pub fn pin_of(pv: &PersistentVolume) -> Option<(String, Vec<String>)> {
    pv.spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .iter()
        .flat_map(|r| &r.node_selector_terms)
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.key != HOSTNAME_LABEL && e.operator == "In")
        .map(|e| (e.key.clone(), e.values.clone().unwrap_or_default()))
}

/// The PV's `spec.hostPath.path`, if any.
pub fn host_path_of(pv: &PersistentVolume) -> Option<&str> {
    Some(pv.spec.as_ref()?.host_path.as_ref()?.path.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_is_pinned_prebound_and_never_creates_directories() {
        let v = VolumeDescription {
            pv_name: "pvc-u1".into(),
            provisioner: "hostpath.hostvol.io".into(),
            node: "node-a".into(),
            node_hostname: "host-a".into(),
            pin: None,
            host_path: host_path("/mnt/data/", "pvc-u1_ns_c"),
            claim_namespace: "ns".into(),
            claim_name: "c".into(),
            claim_uid: "u1".into(),
            storage_class: "hostvol".into(),
            capacity: "1Gi".into(),
            access_modes: vec!["ReadWriteOnce".into()],
            reclaim_policy: "Retain".into(),
        };
        let pv = build(&v);
        let json = serde_json::to_value(&pv).unwrap();
        assert_eq!(
            json["spec"]["hostPath"],
            serde_json::json!({"path": "/mnt/data/pvc-u1_ns_c", "type": "Directory"})
        );
        assert_eq!(
            json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"][0],
            "host-a"
        );
        assert_eq!(json["spec"]["claimRef"]["uid"], "u1");
        assert_eq!(json["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(json["spec"]["capacity"]["storage"], "1Gi");
        assert_eq!(
            json["metadata"]["annotations"][ANN_PROVISIONED_BY],
            "hostpath.hostvol.io"
        );
        assert_eq!(json["metadata"]["labels"][LABEL_NODE], "node-a");
        assert_eq!(pin_of(&pv), None, "pinned by hostname");

        // Pinned by a label: the affinity names it, the label selects it for nodes carrying it.
        let pinned = build(&VolumeDescription {
            pin: Some(("example.com/disk".into(), "disk-1".into())),
            ..v
        });
        let json = serde_json::to_value(&pinned).unwrap();
        assert_eq!(
            json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0],
            serde_json::json!({"key": "example.com/disk", "operator": "In", "values": ["disk-1"]})
        );
        assert_eq!(
            json["metadata"]["labels"][LABEL_NODE],
            affinity::pin_label_value("example.com/disk", "disk-1")
        );
        assert_eq!(
            json["metadata"]["annotations"][ANN_NODE], "node-a",
            "who made it"
        );
        assert_eq!(
            pin_of(&pinned),
            Some(("example.com/disk".into(), vec!["disk-1".into()]))
        );
    }

    fn volume(name: &str, host_path: &str, annotation: &str) -> PersistentVolume {
        let mut pv = PersistentVolume::default();
        pv.metadata.name = Some(name.into());
        pv.metadata.annotations =
            Some([(ANN_DIRECTORY.to_string(), annotation.to_string())].into());
        pv.spec = Some(PersistentVolumeSpec {
            host_path: Some(HostPathVolumeSource {
                path: host_path.into(),
                type_: None,
            }),
            ..Default::default()
        });
        pv
    }

    #[test]
    fn the_directory_comes_from_the_host_path_inside_the_root() {
        let own = "/mnt/data/pvc-1_ns_c";
        // (pv name, hostPath, root, expected directory)
        let cases = [
            ("pvc-1", own, "/mnt/data", Some("pvc-1_ns_c")),
            ("pvc-1", own, "/mnt/data/", Some("pvc-1_ns_c")),
            ("pvc-1", "/pvc-1_ns_c", "/", Some("pvc-1_ns_c")),
            ("pvc-1", own, "/mnt/other", None),
            ("pvc-1", own, "/mnt/dat", None),
            ("pvc-1", "/mnt/data/sub/pvc-1_ns_c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/../etc/pvc-1_ns_c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/..", "/mnt/data", None),
            ("pvc-1", "/mnt/data/pvc-2_ns_c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/pvc-10_ns_c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/pvc-1", "/mnt/data", None),
            ("pvc-1", "/mnt/data/", "/mnt/data", None),
        ];
        for (name, path, root, expected) in cases {
            // The annotation says something else: it decides nothing.
            let pv = volume(name, path, "/mnt/data/pvc-2_ns_c");
            assert_eq!(
                volume_directory(&pv, root).as_deref(),
                expected,
                "{name} {path} in {root}"
            );
        }
        let mut no_path = volume("pvc-1", own, own);
        no_path.spec = None;
        assert_eq!(volume_directory(&no_path, "/mnt/data"), None);
        assert_eq!(directory_of(&no_path), None);
    }
}
