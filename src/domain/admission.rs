//! Which claims this agent acts on, and whether a claim can be provisioned as asked.
//! Plain functions over plain facts: no Kubernetes client, no disk.

use std::collections::BTreeMap;

use crate::domain::quantity;

pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Set with the selected node when an agent places a claim itself, so every agent can count bytes
/// placed on a node before its PV exists.
pub const ANN_REQUESTED_BYTES: &str = "hostvol.io/requested-bytes";

/// The claim annotations the agent reads; the claim cache keeps only these.
pub const KEPT_ANNOTATIONS: [&str; 5] = [
    ANN_SELECTED_NODE,
    ANN_STORAGE_PROVISIONER,
    ANN_STORAGE_PROVISIONER_BETA,
    ANN_BIND_COMPLETED,
    ANN_REQUESTED_BYTES,
];

/// Whether an agent must keep a claim in its cache: a claim of its provisioner not bound yet (any
/// node: placing counts the bytes pending on every node), one not yet given a provisioner (it may be
/// ours, waiting for its pod), or one bound to its own volumes (`bound_to_ours`). Claims of other
/// drivers and claims bound to other nodes' volumes are not its business.
pub fn concerns(
    annotations: &BTreeMap<String, String>,
    provisioner: &str,
    bound_to_ours: impl FnOnce() -> bool,
) -> bool {
    let named: Vec<&String> = [ANN_STORAGE_PROVISIONER, ANN_STORAGE_PROVISIONER_BETA]
        .iter()
        .filter_map(|key| annotations.get(*key))
        .collect();
    let ours = named.iter().any(|p| *p == provisioner);
    if annotations.contains_key(ANN_BIND_COMPLETED) {
        return (ours || named.is_empty()) && bound_to_ours();
    }
    ours || named.is_empty()
}

/// What an agent should do with a claim, judged from its metadata alone (what the narrow watch keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Not ours: another node, another provisioner, or not yet scheduled.
    Ignore,
    /// Already bound to a volume; nothing left to do.
    Bound,
    /// Ours to provision on this node.
    Provision,
    /// Ours, but no node chosen yet: an Immediate class (or a claim handed back for rescheduling).
    ChooseNode,
}

pub fn interest(annotations: &BTreeMap<String, String>, provisioner: &str, node: &str) -> Interest {
    if annotations.contains_key(ANN_BIND_COMPLETED) {
        return Interest::Bound;
    }
    let ours = [ANN_STORAGE_PROVISIONER, ANN_STORAGE_PROVISIONER_BETA]
        .iter()
        .any(|key| annotations.get(*key).is_some_and(|p| p == provisioner));
    match annotations.get(ANN_SELECTED_NODE) {
        Some(selected) if ours && selected == node => Interest::Provision,
        None if ours => Interest::ChooseNode,
        _ => Interest::Ignore,
    }
}

/// The parts of a claim's spec that decide whether we can serve it.
#[derive(Debug, Clone, Default)]
pub struct ClaimSpec {
    pub volume_mode: Option<String>,
    pub access_modes: Vec<String>,
    /// `dataSourceRef` or `dataSource`, if set.
    pub data_source: Option<DataSource>,
    pub has_selector: bool,
    pub storage_request: Option<String>,
}

/// What a claim asks its volume to be filled from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataSource {
    pub api_group: Option<String>,
    pub kind: String,
    pub name: String,
    /// Another namespace than the claim's, which only `dataSourceRef` can name (1.26+, behind the
    /// `CrossNamespaceVolumeDataSource` gate); `None` for the claim's own namespace.
    pub namespace: Option<String>,
}

impl DataSource {
    /// A claim of the same namespace (the only source hostvol serves: a clone).
    pub fn is_claim(&self) -> bool {
        self.kind == "PersistentVolumeClaim"
            && self.api_group.as_deref().unwrap_or("").is_empty()
            && self.namespace.is_none()
    }
}

/// A claim we can serve, reduced to what the volume needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub capacity_bytes: u64,
    /// The request as the user wrote it, used verbatim as the PV capacity so the binder's comparison is exact.
    pub capacity: String,
    pub access_modes: Vec<String>,
    /// The claim (same namespace) whose data the new volume starts with, for a clone.
    pub clone_of: Option<String>,
}

/// Why a claim is refused. Each variant's `reason()` is the metrics label; `message()` goes into the
/// Warning Event and says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BlockVolumeMode,
    UnsupportedAccessModes(Vec<String>),
    DataSource(String),
    /// A clone whose source cannot be used (missing, unbound, other class, larger than the clone).
    CloneSource(String),
    Selector,
    MissingRequest,
    ZeroRequest,
    MalformedRequest(String),
    StorageClassMissing(String),
    InvalidParameters(String),
    InsufficientCapacity {
        requested: u64,
        allocatable: u64,
        node: String,
    },
    /// The node's data root cannot take volumes now (missing, read-only, not mounted).
    NodeCannotServe(String),
    /// The class's `directoryPattern` gives no usable directory for this claim.
    DirectoryName(String),
    /// The claim's directory exists already (another claim's volume, or data kept from one).
    DirectoryTaken(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BlockVolumeMode => "block_volume_mode",
            Refusal::UnsupportedAccessModes(_) => "unsupported_access_mode",
            Refusal::DataSource(_) => "data_source",
            Refusal::CloneSource(_) => "clone_source",
            Refusal::Selector => "selector",
            Refusal::MissingRequest => "missing_request",
            Refusal::ZeroRequest => "zero_request",
            Refusal::MalformedRequest(_) => "malformed_request",
            Refusal::StorageClassMissing(_) => "storage_class_missing",
            Refusal::InvalidParameters(_) => "invalid_parameters",
            Refusal::InsufficientCapacity { .. } => "insufficient_capacity",
            Refusal::NodeCannotServe(_) => "node_cannot_serve",
            Refusal::DirectoryName(_) => "directory_name",
            Refusal::DirectoryTaken(_) => "directory_taken",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::BlockVolumeMode => {
                "volumeMode Block is not supported: hostvol volumes are directories; \
                remove volumeMode or set it to Filesystem"
                    .into()
            }
            Refusal::UnsupportedAccessModes(modes) => format!(
                "access mode(s) {} not supported: a hostvol volume lives on one node's disk, so only \
                 ReadWriteOnce and ReadWriteOncePod can be honoured; use one of those",
                modes.join(", ")
            ),
            Refusal::DataSource(what) => format!(
                "dataSource/dataSourceRef {what} is not supported: hostvol clones claims (a \
                 PersistentVolumeClaim of the same namespace and class), but has no snapshots or \
                 populators; name a claim, or remove it and copy data in from a pod"
            ),
            Refusal::CloneSource(why) => format!("cannot clone: {why}"),
            Refusal::Selector => {
                "spec.selector is not supported for dynamic provisioning; remove the selector, \
                or create a PersistentVolume by hand and leave storageClassName empty"
                    .into()
            }
            Refusal::MissingRequest => {
                "spec.resources.requests.storage is missing; set it, e.g. 1Gi".into()
            }
            Refusal::ZeroRequest => {
                "spec.resources.requests.storage is zero; request at least 1 byte, e.g. 1Gi".into()
            }
            Refusal::MalformedRequest(why) => format!("spec.resources.requests.storage: {why}"),
            Refusal::StorageClassMissing(name) => format!(
                "StorageClass {name:?} does not exist; create it (see deploy/storageclass.yaml) or fix storageClassName"
            ),
            Refusal::InvalidParameters(why) => {
                format!("{why}; fix the StorageClass and re-create the claim")
            }
            Refusal::NodeCannotServe(why) | Refusal::DirectoryName(why) => why.clone(),
            Refusal::DirectoryTaken(why) => why.clone(),
            Refusal::InsufficientCapacity {
                requested,
                allocatable,
                node,
            } => format!(
                "node {node} cannot hold {}: only {} is allocatable in its data root; free space on the node, \
                 raise its cap, or request less",
                quantity::format_bytes(*requested),
                quantity::format_bytes(*allocatable)
            ),
        }
    }
}

const SUPPORTED_ACCESS_MODES: &[&str] = &["ReadWriteOnce", "ReadWriteOncePod"];

/// Checks everything about a claim that does not depend on the node, in the order a user would fix it.
pub fn admit(spec: &ClaimSpec) -> Result<VolumeRequest, Refusal> {
    if spec.volume_mode.as_deref() == Some("Block") {
        return Err(Refusal::BlockVolumeMode);
    }
    let unsupported: Vec<String> = spec
        .access_modes
        .iter()
        .filter(|m| !SUPPORTED_ACCESS_MODES.contains(&m.as_str()))
        .cloned()
        .collect();
    if !unsupported.is_empty() {
        return Err(Refusal::UnsupportedAccessModes(unsupported));
    }
    let clone_of = match &spec.data_source {
        None => None,
        Some(source) if source.is_claim() => Some(source.name.clone()),
        Some(source) => {
            return Err(Refusal::DataSource(format!(
                "{}{} {:?}{}",
                source
                    .api_group
                    .as_deref()
                    .map_or(String::new(), |g| format!("{g}/")),
                source.kind,
                source.name,
                source
                    .namespace
                    .as_deref()
                    .map_or(String::new(), |ns| format!(" in namespace {ns:?}"))
            )));
        }
    };
    if spec.has_selector {
        return Err(Refusal::Selector);
    }
    let request = spec
        .storage_request
        .as_deref()
        .ok_or(Refusal::MissingRequest)?;
    let capacity_bytes =
        quantity::parse_bytes(request).map_err(|e| Refusal::MalformedRequest(e.to_string()))?;
    if capacity_bytes == 0 {
        return Err(Refusal::ZeroRequest);
    }
    let access_modes = if spec.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        spec.access_modes.clone()
    };
    Ok(VolumeRequest {
        capacity_bytes,
        capacity: request.trim().to_string(),
        access_modes,
        clone_of,
    })
}

/// A clone must be at least its source's size: its limit must hold the source's data.
pub fn clone_fits(request: &VolumeRequest, source_bytes: u64, source: &str) -> Result<(), Refusal> {
    if request.capacity_bytes < source_bytes {
        return Err(Refusal::CloneSource(format!(
            "the clone requests {} but its source {source} is {}; request at least the source's size",
            request.capacity,
            quantity::format_bytes(source_bytes)
        )));
    }
    Ok(())
}

/// Whether a node with `allocatable` bytes left can take the request.
pub fn fits(request: &VolumeRequest, allocatable: u64, node: &str) -> Result<(), Refusal> {
    if request.capacity_bytes <= allocatable {
        Ok(())
    } else {
        Err(Refusal::InsufficientCapacity {
            requested: request.capacity_bytes,
            allocatable,
            node: node.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const P: &str = "hostpath.hostvol.io";

    #[test]
    fn the_cache_keeps_only_claims_that_may_be_ours() {
        let of = |pairs: &[(&str, &str)], bound_to_ours: bool| {
            concerns(&annotations(pairs), P, || bound_to_ours)
        };
        assert!(of(&[], false), "no provisioner yet: may be ours");
        assert!(of(&[(ANN_STORAGE_PROVISIONER, P)], false));
        assert!(
            of(
                &[
                    (ANN_STORAGE_PROVISIONER_BETA, P),
                    (ANN_SELECTED_NODE, "other")
                ],
                false
            ),
            "placed on another node: its bytes count there"
        );
        assert!(!of(&[(ANN_STORAGE_PROVISIONER, "example.com/other")], true));
        assert!(!of(
            &[(ANN_STORAGE_PROVISIONER, P), (ANN_BIND_COMPLETED, "yes")],
            false
        ));
        assert!(of(
            &[(ANN_STORAGE_PROVISIONER, P), (ANN_BIND_COMPLETED, "yes")],
            true
        ));
        assert!(!of(
            &[
                (ANN_STORAGE_PROVISIONER, "example.com/other"),
                (ANN_BIND_COMPLETED, "yes")
            ],
            true
        ));
    }

    #[test]
    fn acts_only_on_claims_for_this_node_and_provisioner() {
        let cases = [
            (
                vec![(ANN_SELECTED_NODE, "n1"), (ANN_STORAGE_PROVISIONER, P)],
                Interest::Provision,
            ),
            (
                vec![(ANN_SELECTED_NODE, "n1"), (ANN_STORAGE_PROVISIONER_BETA, P)],
                Interest::Provision,
            ),
            (
                vec![(ANN_SELECTED_NODE, "n2"), (ANN_STORAGE_PROVISIONER, P)],
                Interest::Ignore,
            ),
            (
                vec![
                    (ANN_SELECTED_NODE, "n1"),
                    (ANN_STORAGE_PROVISIONER, "rancher.io/local-path"),
                ],
                Interest::Ignore,
            ),
            (vec![(ANN_STORAGE_PROVISIONER, P)], Interest::ChooseNode),
            (vec![(ANN_SELECTED_NODE, "n1")], Interest::Ignore),
            (
                vec![
                    (ANN_SELECTED_NODE, "n1"),
                    (ANN_STORAGE_PROVISIONER, P),
                    (ANN_BIND_COMPLETED, "yes"),
                ],
                Interest::Bound,
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(interest(&annotations(&pairs), P, "n1"), want, "{pairs:?}");
        }
    }

    fn valid() -> ClaimSpec {
        ClaimSpec {
            volume_mode: Some("Filesystem".into()),
            access_modes: vec!["ReadWriteOnce".into()],
            storage_request: Some("1Gi".into()),
            ..Default::default()
        }
    }

    #[test]
    fn admits_a_plain_claim() {
        let r = admit(&valid()).unwrap();
        assert_eq!(
            r,
            VolumeRequest {
                capacity_bytes: 1 << 30,
                capacity: "1Gi".into(),
                access_modes: vec!["ReadWriteOnce".into()],
                clone_of: None,
            }
        );
        let pod_only = ClaimSpec {
            access_modes: vec!["ReadWriteOncePod".into()],
            volume_mode: None,
            ..valid()
        };
        assert!(admit(&pod_only).is_ok());
    }

    #[test]
    fn a_claim_as_data_source_is_a_clone_that_must_hold_its_source() {
        let clone = ClaimSpec {
            data_source: Some(DataSource {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name: "source".into(),
                namespace: None,
            }),
            ..valid()
        };
        let request = admit(&clone).unwrap();
        assert_eq!(request.clone_of.as_deref(), Some("source"));
        assert!(clone_fits(&request, 1 << 30, "source").is_ok());
        let small = clone_fits(&request, 2 << 30, "source").unwrap_err();
        assert_eq!(small.reason(), "clone_source");
        assert!(small.message().contains("at least"), "{}", small.message());
    }

    #[test]
    fn refuses_what_a_node_local_directory_cannot_be() {
        let cases: Vec<(ClaimSpec, &str)> = vec![
            (
                ClaimSpec {
                    volume_mode: Some("Block".into()),
                    ..valid()
                },
                "block_volume_mode",
            ),
            (
                ClaimSpec {
                    access_modes: vec!["ReadWriteMany".into()],
                    ..valid()
                },
                "unsupported_access_mode",
            ),
            (
                ClaimSpec {
                    access_modes: vec!["ReadWriteOnce".into(), "ReadOnlyMany".into()],
                    ..valid()
                },
                "unsupported_access_mode",
            ),
            (
                ClaimSpec {
                    data_source: Some(DataSource {
                        api_group: Some("snapshot.storage.k8s.io".into()),
                        kind: "VolumeSnapshot".into(),
                        name: "snap".into(),
                        namespace: None,
                    }),
                    ..valid()
                },
                "data_source",
            ),
            (
                ClaimSpec {
                    has_selector: true,
                    ..valid()
                },
                "selector",
            ),
            (
                ClaimSpec {
                    storage_request: None,
                    ..valid()
                },
                "missing_request",
            ),
            (
                ClaimSpec {
                    storage_request: Some("0".into()),
                    ..valid()
                },
                "zero_request",
            ),
            (
                ClaimSpec {
                    storage_request: Some("lots".into()),
                    ..valid()
                },
                "malformed_request",
            ),
        ];
        for (spec, reason) in cases {
            let refusal = admit(&spec).unwrap_err();
            assert_eq!(refusal.reason(), reason, "{spec:?}");
            assert!(refusal.message().len() > 20);
        }
        let msg = admit(&ClaimSpec {
            access_modes: vec!["ReadWriteMany".into()],
            ..valid()
        })
        .unwrap_err()
        .message();
        assert!(
            msg.contains("ReadWriteMany") && msg.contains("one node"),
            "{msg}"
        );
    }

    #[test]
    fn capacity_check_says_how_much_is_left() {
        let r = admit(&valid()).unwrap();
        assert!(fits(&r, 1 << 30, "n1").is_ok());
        let e = fits(&r, 512 << 20, "n1").unwrap_err();
        assert!(
            e.message().contains("512Mi") && e.message().contains("1Gi"),
            "{}",
            e.message()
        );
    }
}
