//! Which PersistentVolumes this agent may change. Its credential can patch and delete every PV of the
//! cluster (no RBAC rule narrows a cluster-scoped verb to one node's objects), and its PV watch is
//! selected by a label anyone who may edit PVs can set. So before any PV patch or delete the agent
//! checks the PV itself: made by this provisioner, for this node. Anything else is left alone.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use tracing::warn;

use crate::controller::context::Context;
use crate::controller::pv;
use crate::domain::affinity;

/// Why a PV is not this agent's to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// `pv.kubernetes.io/provisioned-by` is missing or names another provisioner.
    Provisioner(Option<String>),
    /// `hostvol.io/node` is missing or names another node.
    Node(Option<String>),
    /// The node affinity pins the volume to other hosts than this node's.
    Affinity(Vec<String>),
    /// The node affinity pins the volume by a label this node carries with another value, or not.
    Pin {
        key: String,
        values: Vec<String>,
        node_value: Option<String>,
    },
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Foreign::Provisioner(None) => {
                write!(f, "it has no {} annotation", pv::ANN_PROVISIONED_BY)
            }
            Foreign::Provisioner(Some(other)) => write!(f, "it was provisioned by {other:?}"),
            Foreign::Node(None) => write!(f, "it has no {} annotation", pv::ANN_NODE),
            Foreign::Node(Some(other)) => write!(f, "it belongs to node {other:?}"),
            Foreign::Affinity(hosts) => write!(f, "its node affinity pins it to {hosts:?}"),
            Foreign::Pin {
                key,
                values,
                node_value: Some(v),
            } => write!(
                f,
                "it is pinned to {key} in {values:?}, this node has {key}={v:?}"
            ),
            Foreign::Pin {
                key,
                values,
                node_value: None,
            } => write!(
                f,
                "it is pinned to {key} in {values:?}, this node has no {key} label"
            ),
        }
    }
}

/// Whether `pv` was made by `provisioner` (node-loss clean-up, which acts on other nodes' PVs, checks
/// this much; the node is the lost one it is cleaning up after).
pub fn provisioned_by(pv: &PersistentVolume, provisioner: &str) -> Result<(), Foreign> {
    match pv.annotations().get(pv::ANN_PROVISIONED_BY) {
        Some(p) if p == provisioner => Ok(()),
        other => Err(Foreign::Provisioner(other.cloned())),
    }
}

/// Whether this agent (`provisioner` on `node`, whose Node carries `labels`) may patch or delete
/// `pv`. A volume pinned by a label other than the hostname (`nodeAffinityKey`) is this node's when
/// the node carries one of its values, whichever node made it: the affinity is in the spec, which
/// the watch cache keeps for such volumes. Others are the node's by the `hostvol.io/node` annotation,
/// and the hostname affinity where the object still carries it (the cache drops it to save memory;
/// the annotation is what the agent wrote next to it).
pub fn ours_to_touch(
    pv: &PersistentVolume,
    provisioner: &str,
    node: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), Foreign> {
    provisioned_by(pv, provisioner)?;
    if let Some((key, values)) = pv::pin_of(pv) {
        let node_value = labels.get(&key);
        return if affinity::pinned_here(&values, node_value.map(String::as_str)) {
            Ok(())
        } else {
            Err(Foreign::Pin {
                key,
                values,
                node_value: node_value.cloned(),
            })
        };
    }
    let hostname = labels.get(pv::HOSTNAME_LABEL).map_or(node, String::as_str);
    match pv.annotations().get(pv::ANN_NODE) {
        Some(n) if n == node => {}
        other => return Err(Foreign::Node(other.cloned())),
    }
    let Some(affinity) = pv.spec.as_ref().and_then(|s| s.node_affinity.as_ref()) else {
        return Ok(());
    };
    let hosts: Vec<String> = affinity
        .required
        .iter()
        .flat_map(|r| &r.node_selector_terms)
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == pv::HOSTNAME_LABEL && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect();
    if hosts.iter().any(|h| h == hostname || h == node) {
        Ok(())
    } else {
        Err(Foreign::Affinity(hosts))
    }
}

/// [`ours_to_touch`] for this agent, logging the PV it leaves alone and why (`action` says what it
/// was about to do).
pub fn may_touch(ctx: &Context, pv: &PersistentVolume, action: &str) -> bool {
    let settings = &ctx.settings;
    match ours_to_touch(
        pv,
        &settings.provisioner,
        &settings.node,
        &ctx.node_labels(),
    ) {
        Ok(()) => true,
        Err(why) => {
            warn!(
                pv = %pv.name_any(),
                node = %settings.node,
                action,
                "leaving PV alone: not this agent's volume ({why})"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeSpec,
        VolumeNodeAffinity,
    };
    use kube::api::ObjectMeta;

    const ME: &str = "hostpath.hostvol.io";

    fn volume(annotations: &[(&str, &str)], hosts: Option<&[&str]>) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                node_affinity: hosts.map(|hosts| VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: pv::HOSTNAME_LABEL.into(),
                                operator: "In".into(),
                                values: Some(hosts.iter().map(|h| h.to_string()).collect()),
                            }]),
                            match_fields: None,
                        }],
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn only_our_provisioner_and_our_node() {
        let by = pv::ANN_PROVISIONED_BY;
        let node = pv::ANN_NODE;
        // (what, annotations, node affinity hosts, verdict)
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<&'a [&'a str]>,
            Result<(), Foreign>,
        );
        let cases: &[Case] = &[
            (
                "ours, as cached (no affinity)",
                &[(by, ME), (node, "a")],
                None,
                Ok(()),
            ),
            (
                "ours, affinity on the hostname",
                &[(by, ME), (node, "a")],
                Some(&["host-a"]),
                Ok(()),
            ),
            (
                "ours, hostname is the node name",
                &[(by, ME), (node, "a")],
                Some(&["a"]),
                Ok(()),
            ),
            (
                "another provisioner",
                &[(by, "example.com/cloud"), (node, "a")],
                None,
                Err(Foreign::Provisioner(Some("example.com/cloud".into()))),
            ),
            (
                "no provisioner",
                &[(node, "a")],
                None,
                Err(Foreign::Provisioner(None)),
            ),
            (
                "another node",
                &[(by, ME), (node, "b")],
                None,
                Err(Foreign::Node(Some("b".into()))),
            ),
            ("no node", &[(by, ME)], None, Err(Foreign::Node(None))),
            (
                "annotation says us, affinity another host",
                &[(by, ME), (node, "a")],
                Some(&["host-b"]),
                Err(Foreign::Affinity(vec!["host-b".into()])),
            ),
            (
                "affinity without a hostname",
                &[(by, ME), (node, "a")],
                Some(&[]),
                Err(Foreign::Affinity(vec![])),
            ),
        ];
        for (what, annotations, hosts, want) in cases {
            let got = ours_to_touch(&volume(annotations, *hosts), ME, "a", &labels_of_a());
            assert_eq!(&got, want, "{what}");
        }
    }

    /// Node `a`: hostname `host-a`, disk `d1`.
    fn labels_of_a() -> std::collections::BTreeMap<String, String> {
        [
            (pv::HOSTNAME_LABEL.to_string(), "host-a".to_string()),
            ("example.com/disk".to_string(), "d1".to_string()),
        ]
        .into()
    }

    #[test]
    fn a_volume_pinned_by_a_label_is_the_node_carrying_its_value() {
        let by = pv::ANN_PROVISIONED_BY;
        let node = pv::ANN_NODE;
        let pinned = |annotations: &[(&str, &str)], key: &str, values: &[&str]| {
            let mut v = volume(annotations, Some(values));
            let affinity = v.spec.as_mut().unwrap().node_affinity.as_mut().unwrap();
            affinity.required.as_mut().unwrap().node_selector_terms[0]
                .match_expressions
                .as_mut()
                .unwrap()[0]
                .key = key.into();
            v
        };
        let disk = "example.com/disk";
        // (what, PV, verdict for node a)
        let cases = [
            (
                "made by a gone node, same value: ours",
                pinned(&[(by, ME), (node, "old")], disk, &["d1"]),
                Ok(()),
            ),
            (
                "made here, same value",
                pinned(&[(by, ME), (node, "a")], disk, &["d1"]),
                Ok(()),
            ),
            (
                "made here, but the node's value changed: the annotation decides nothing",
                pinned(&[(by, ME), (node, "a")], disk, &["d2"]),
                Err(Foreign::Pin {
                    key: disk.into(),
                    values: vec!["d2".into()],
                    node_value: Some("d1".into()),
                }),
            ),
            (
                "a key this node lacks",
                pinned(&[(by, ME), (node, "a")], "example.com/rack", &["r1"]),
                Err(Foreign::Pin {
                    key: "example.com/rack".into(),
                    values: vec!["r1".into()],
                    node_value: None,
                }),
            ),
            (
                "another provisioner's, same value",
                pinned(&[(by, "example.com/cloud")], disk, &["d1"]),
                Err(Foreign::Provisioner(Some("example.com/cloud".into()))),
            ),
        ];
        for (what, pv, want) in cases {
            assert_eq!(ours_to_touch(&pv, ME, "a", &labels_of_a()), want, "{what}");
        }
        let why = Foreign::Pin {
            key: disk.into(),
            values: vec!["d2".into()],
            node_value: None,
        };
        assert!(
            why.to_string().contains("no example.com/disk label"),
            "{why}"
        );
    }

    #[test]
    fn node_loss_checks_the_provisioner() {
        let by = pv::ANN_PROVISIONED_BY;
        assert_eq!(provisioned_by(&volume(&[(by, ME)], None), ME), Ok(()));
        assert_eq!(
            provisioned_by(&volume(&[(by, "example.com/cloud")], None), ME),
            Err(Foreign::Provisioner(Some("example.com/cloud".into())))
        );
        assert_eq!(
            provisioned_by(&volume(&[], None), ME),
            Err(Foreign::Provisioner(None))
        );
    }

    #[test]
    fn reasons_name_what_is_wrong() {
        let foreign = Foreign::Provisioner(Some("example.com/cloud".into()));
        assert!(foreign.to_string().contains("example.com/cloud"));
        assert!(
            Foreign::Node(Some("b".into()))
                .to_string()
                .contains("\"b\"")
        );
    }
}
