//! The PersistentVolume object hostvol publishes for a provisioned claim.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::ObjectMeta;

use crate::domain::params::VolumeType;
use crate::domain::pattern::VolumePath;
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
    /// The volume source the PV carries (the class's `volumeType`).
    pub volume_type: VolumeType,
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
            host_path: (volume.volume_type == VolumeType::HostPath).then(|| HostPathVolumeSource {
                path: volume.host_path.clone(),
                type_: Some("Directory".into()),
            }),
            // A local volume has no type: the kubelet always refuses a path that does not exist.
            local: (volume.volume_type == VolumeType::Local).then(|| LocalVolumeSource {
                path: volume.host_path.clone(),
                fs_type: None,
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

/// The volume path `path` gives inside the root `host_root` (`<host_root>/<path>`, a [`VolumePath`]:
/// relative, no `..`, no empty or hidden segment), or None for anything else, so nothing outside the
/// root is ever named. Symlinks are never followed below the root: the node opens each segment
/// relative to the previous one's handle with `O_NOFOLLOW`.
pub fn root_holds<'a>(host_root: &str, path: &'a str) -> Option<&'a str> {
    let relative = path
        .strip_prefix(host_root.trim_end_matches('/'))?
        .strip_prefix('/')?;
    VolumePath::parse(relative).ok()?;
    Some(relative)
}

/// The directory name of one of our flat PVs, from its source path (the API server refuses
/// any change to a PV's source, unlike the `hostvol.io/directory` annotation anyone allowed to patch
/// PVs can edit), and only if it is this PV's own (`<pv name>_...`, made from the claim's uid), so
/// no PV can point the agent at another volume's data. Patterned volumes (`directoryPattern`) are
/// found with [`volume_directory`] and proven on disk by their mark.
pub fn directory_of(pv: &PersistentVolume) -> Option<String> {
    let path = source_path(pv)?;
    let (_, name) = path.rsplit_once('/')?;
    let name = VolumePath::parse(name).ok()?;
    name.is_named_for(pv.metadata.name.as_deref()?)
        .then(|| name.as_str().to_string())
}

/// The volume path inside the data root the kubelet sees as `host_root`, from the PV's immutable
/// `spec.hostPath.path`. A path not named for the PV (`directoryPattern`) is only a candidate: the
/// node acts on it only after checking the directory's ownership mark (`node::parents::ownership`).
pub fn volume_directory(pv: &PersistentVolume, host_root: &str) -> Option<String> {
    root_holds(host_root, source_path(pv)?).map(str::to_string)
}

/// The field `source_path` reads, for messages: `spec.local.path` or `spec.hostPath.path`.
pub fn source_field(pv: &PersistentVolume) -> &'static str {
    match pv.spec.as_ref().map(|spec| (&spec.host_path, &spec.local)) {
        Some((None, Some(_))) => "spec.local.path",
        _ => "spec.hostPath.path",
    }
}

/// The path of the PV's source: `spec.hostPath.path` or `spec.local.path`, whichever it has (both
/// immutable). Every reader of a PV's directory goes through here.
pub fn source_path(pv: &PersistentVolume) -> Option<&str> {
    let spec = pv.spec.as_ref()?;
    let path = match (&spec.host_path, &spec.local) {
        (Some(host_path), _) => &host_path.path,
        (None, Some(local)) => &local.path,
        (None, None) => return None,
    };
    Some(path.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn description(volume_type: VolumeType) -> VolumeDescription {
        VolumeDescription {
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
            volume_type,
        }
    }

    #[test]
    fn a_volume_pinned_by_a_label_names_it_in_affinity_and_label() {
        for volume_type in [VolumeType::HostPath, VolumeType::Local] {
            let v = description(volume_type);
            assert_eq!(pin_of(&build(&v)), None, "pinned by hostname");
            // Pinned by a label: the affinity names it, the label selects it for nodes carrying it.
            let pinned = build(&VolumeDescription {
                pin: Some(("example.com/disk".into(), "disk-1".into())),
                ..v
            });
            let json = serde_json::to_value(&pinned).unwrap();
            assert_eq!(
                json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"]
                    [0],
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
    }

    #[test]
    fn pv_is_pinned_prebound_and_never_creates_directories() {
        // (volume type, source field it fills, the source, the field it leaves empty)
        let cases = [
            (
                VolumeType::HostPath,
                "hostPath",
                serde_json::json!({"path": "/mnt/data/pvc-u1_ns_c", "type": "Directory"}),
                "local",
            ),
            (
                VolumeType::Local,
                "local",
                serde_json::json!({"path": "/mnt/data/pvc-u1_ns_c"}),
                "hostPath",
            ),
        ];
        for (volume_type, field, source, absent) in cases {
            let pv = build(&description(volume_type));
            let json = serde_json::to_value(&pv).unwrap();
            assert_eq!(json["spec"][field], source, "{volume_type:?}");
            assert!(json["spec"].get(absent).is_none(), "{volume_type:?}");
            // Everything else is the same for both types.
            assert_eq!(
                json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"]
                    [0]["values"][0],
                "host-a"
            );
            assert_eq!(json["spec"]["claimRef"]["uid"], "u1");
            assert_eq!(json["spec"]["persistentVolumeReclaimPolicy"], "Retain");
            assert_eq!(json["spec"]["capacity"]["storage"], "1Gi");
            assert_eq!(json["spec"]["volumeMode"], "Filesystem");
            assert_eq!(
                json["metadata"]["annotations"][ANN_PROVISIONED_BY],
                "hostpath.hostvol.io"
            );
            assert_eq!(
                json["metadata"]["annotations"][ANN_DIRECTORY],
                "/mnt/data/pvc-u1_ns_c"
            );
            assert_eq!(json["metadata"]["labels"][LABEL_NODE], "node-a");
            assert_eq!(source_path(&pv), Some("/mnt/data/pvc-u1_ns_c"));
            assert_eq!(source_field(&pv), format!("spec.{field}.path"));
            assert_eq!(
                volume_directory(&pv, "/mnt/data").as_deref(),
                Some("pvc-u1_ns_c")
            );
        }
    }

    fn volume(
        volume_type: VolumeType,
        name: &str,
        path: &str,
        annotation: &str,
    ) -> PersistentVolume {
        let mut pv = PersistentVolume::default();
        pv.metadata.name = Some(name.into());
        pv.metadata.annotations =
            Some([(ANN_DIRECTORY.to_string(), annotation.to_string())].into());
        let path = path.to_string();
        pv.spec = Some(PersistentVolumeSpec {
            host_path: (volume_type == VolumeType::HostPath).then(|| HostPathVolumeSource {
                path: path.clone(),
                type_: None,
            }),
            local: (volume_type == VolumeType::Local).then(|| LocalVolumeSource {
                path: path.clone(),
                fs_type: None,
            }),
            ..Default::default()
        });
        pv
    }

    #[test]
    fn the_directory_comes_from_the_source_path_inside_the_root() {
        let own = "/mnt/data/pvc-1_ns_c";
        // (pv name, hostPath, root, expected directory)
        let cases = [
            ("pvc-1", own, "/mnt/data", Some("pvc-1_ns_c")),
            ("pvc-1", own, "/mnt/data/", Some("pvc-1_ns_c")),
            ("pvc-1", "/pvc-1_ns_c", "/", Some("pvc-1_ns_c")),
            ("pvc-1", own, "/mnt/other", None),
            ("pvc-1", own, "/mnt/dat", None),
            // Below parents (directoryPattern): a candidate, proven by its mark on disk.
            (
                "pvc-1",
                "/mnt/data/sub/pvc-1_ns_c",
                "/mnt/data",
                Some("sub/pvc-1_ns_c"),
            ),
            ("pvc-1", "/mnt/data/ns/c", "/mnt/data", Some("ns/c")),
            ("pvc-1", "/mnt/data/ns//c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/ns/../c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/ns/.c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/../etc/pvc-1_ns_c", "/mnt/data", None),
            ("pvc-1", "/mnt/data/..", "/mnt/data", None),
            (
                "pvc-1",
                "/mnt/data/pvc-2_ns_c",
                "/mnt/data",
                Some("pvc-2_ns_c"),
            ),
            ("pvc-1", "/mnt/data/", "/mnt/data", None),
        ];
        for volume_type in [VolumeType::HostPath, VolumeType::Local] {
            for (name, path, root, expected) in cases {
                // The annotation says something else: it decides nothing.
                let pv = volume(volume_type, name, path, "/mnt/data/pvc-2_ns_c");
                assert_eq!(
                    volume_directory(&pv, root).as_deref(),
                    expected,
                    "{volume_type:?} {name} {path} in {root}"
                );
            }
        }
        // Only names made for the PV prove ownership without a look at the disk.
        for (path, owned) in [
            (own, true),
            ("/mnt/data/pvc-2_ns_c", false),
            ("/mnt/data/pvc-10_ns_c", false),
            ("/mnt/data/pvc-1", false),
        ] {
            let pv = volume(VolumeType::HostPath, "pvc-1", path, own);
            assert_eq!(directory_of(&pv).is_some(), owned, "{path}");
        }
        let mut no_path = volume(VolumeType::Local, "pvc-1", own, own);
        no_path.spec.as_mut().unwrap().local = None;
        assert_eq!(source_path(&no_path), None);
        assert_eq!(volume_directory(&no_path, "/mnt/data"), None);
        no_path.spec = None;
        assert_eq!(volume_directory(&no_path, "/mnt/data"), None);
        assert_eq!(directory_of(&no_path), None);
    }
}
