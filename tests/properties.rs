//! Properties of every parser and validator that takes input from outside the agent: quantities (claims,
//! PVs, flags, the ConfigMap, other agents' CSIStorageCapacity objects), StorageClass parameters, the
//! `hostvol-config` ConfigMap, claim and namespace names turned into directory names, other agents'
//! CSIStorageCapacity figures, and the node service's request fields.
//!
//! For any input: no panic, and every rejection is a message that says what was wrong. For generated
//! valid input: the value is accepted and means what it says. `fuzz/` runs the same functions under
//! cargo-fuzz (`scripts/fuzz.sh`); a finding of either gets a case in `regressions` below.
//!
//! One file for all of them rather than a `#[cfg(test)]` module per parser: they go through the public
//! API only (the same surface the fuzz targets use), and they sit in one place a reader looking for
//! "what do we promise about hostile input?" finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::time::Duration;

use hostvol::controller::context::published_candidate;
use hostvol::controller::pv::{self, ANN_DIRECTORY, ANN_NODE};
use hostvol::controller::reclaim::{ANN_ON_DELETE, ANN_PURGE, Disposal, FINALIZER, disposal};
use hostvol::domain::admission::{
    self, ANN_BIND_COMPLETED, ANN_SELECTED_NODE, ANN_STORAGE_PROVISIONER,
    ANN_STORAGE_PROVISIONER_BETA, ClaimSpec, DataSource, Interest,
};
use hostvol::domain::naming::{
    MAX_DIRECTORY_NAME, directory_name, node_label_value, pv_name, validate_directory_name,
};
use hostvol::domain::params::{ClassParameters, VALID_PARAMETERS, VolumeType, parse_duration};
use hostvol::domain::pattern::{ClaimFacts, DirectoryPattern, MAX_PATH, VolumePath};
use hostvol::domain::quantity::{format_bytes, parse_bytes, to_quantity};
use hostvol::node::quota::Limit;
use hostvol::node::roots::parse_config;
use hostvol::service::grpc::v1::{GetVolumeRequest, WatchCapacityRequest};
use hostvol::service::node_service::{requested_pv_name, watch_interval};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::DynamicObject;
use proptest::prelude::*;
use prost::Message;

/// A Kubernetes name as the API server accepts for namespaces and claims (DNS label).
const DNS_LABEL: &str = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
/// A Kubernetes name as the API server accepts for most objects, claims too (DNS subdomain; at most
/// 253 characters, which the test checks).
const DNS_SUBDOMAIN: &str =
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?){0,4}";
/// A Kubernetes uid (what the API server generates).
const UID: &str = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";

const SUFFIXES: &[(&str, u128)] = &[
    ("", 1),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// Strings that look like quantities often enough to reach the deep branches.
fn quantity_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ +-]?[0-9]{0,25}(\\.[0-9]{0,40})?([KMGTPE]i?|[kmeE][+-]?[0-9]{0,3}|[a-zA-Z]{0,3})? ?",
    ]
}

const PROVISIONER: &str = "hostpath.hostvol.io";

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        quantity_like().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_map() -> impl Strategy<Value = BTreeMap<String, serde_json::Value>> {
    prop::collection::btree_map(
        prop_oneof![
            Just("capacity".to_string()),
            Just("storageClassName".to_string()),
            Just("nodeTopology".to_string()),
            Just("maximumVolumeSize".to_string()),
            "[a-zA-Z]{1,12}",
        ],
        json_value(),
        0..5,
    )
}

/// Claim specs as the API server would hand them over, valid or not.
fn claim_spec() -> impl Strategy<Value = ClaimSpec> {
    let mode = prop_oneof![
        Just("ReadWriteOnce".to_string()),
        Just("ReadWriteOncePod".to_string()),
        Just("ReadOnlyMany".to_string()),
        Just("ReadWriteMany".to_string()),
        "[A-Za-z]{0,12}",
    ];
    let source = (
        prop::option::of(prop_oneof![Just(String::new()), "[a-z.]{1,20}"]),
        prop_oneof![
            Just("PersistentVolumeClaim".to_string()),
            Just("VolumeSnapshot".to_string()),
            "[A-Za-z]{0,12}",
        ],
        DNS_LABEL,
        // dataSourceRef.namespace (1.26+): another namespace than the claim's.
        prop::option::of(DNS_LABEL),
    )
        .prop_map(|(api_group, kind, name, namespace)| DataSource {
            api_group,
            kind,
            name,
            namespace,
        });
    (
        prop::option::of(prop_oneof![
            Just("Filesystem".to_string()),
            Just("Block".to_string()),
            any::<String>(),
        ]),
        prop::collection::vec(mode, 0..3),
        prop::option::of(source),
        any::<bool>(),
        prop::option::of(quantity_like()),
    )
        .prop_map(
            |(volume_mode, access_modes, data_source, has_selector, storage_request)| {
                // The API server refuses claims with a dataSource that is not a claim only later; what
                // reaches admit() can be anything, but a non-claim source has no clone_of.
                ClaimSpec {
                    volume_mode,
                    access_modes,
                    data_source,
                    has_selector,
                    storage_request,
                }
            },
        )
}

/// Claim annotations: the ones the agent reads, with our provisioner, another, or junk.
fn claim_annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = prop_oneof![
        Just(PROVISIONER.to_string()),
        Just("rancher.io/local-path".to_string()),
        Just("node-a".to_string()),
        Just("node-b".to_string()),
        Just("yes".to_string()),
        any::<String>(),
    ];
    prop::collection::btree_map(
        prop_oneof![
            Just(ANN_SELECTED_NODE.to_string()),
            Just(ANN_STORAGE_PROVISIONER.to_string()),
            Just(ANN_STORAGE_PROVISIONER_BETA.to_string()),
            Just(ANN_BIND_COMPLETED.to_string()),
            "[a-z./-]{1,30}",
        ],
        value,
        0..5,
    )
}

/// hostvol PVs in any phase, policy, deletion state, with any of the annotations and finalizers
/// reclaim reads.
fn persistent_volume() -> impl Strategy<Value = PersistentVolume> {
    (
        prop::option::of(prop_oneof![
            Just("Pending".to_string()),
            Just("Available".to_string()),
            Just("Bound".to_string()),
            Just("Released".to_string()),
            Just("Failed".to_string()),
            "[A-Za-z]{0,8}",
        ]),
        prop::option::of(prop_oneof![
            Just("Delete".to_string()),
            Just("Retain".to_string()),
            Just("Recycle".to_string()),
        ]),
        any::<bool>(),
        prop::option::of(prop_oneof![
            Just("archive".to_string()),
            Just("delete".to_string()),
            any::<String>()
        ]),
        prop::option::of(any::<String>()),
        any::<bool>(),
    )
        .prop_map(|(phase, policy, deleting, on_delete, purge, finalizer)| {
            let mut annotations = BTreeMap::new();
            if let Some(v) = on_delete {
                annotations.insert(ANN_ON_DELETE.to_string(), v);
            }
            if let Some(v) = purge {
                annotations.insert(ANN_PURGE.to_string(), v);
            }
            PersistentVolume {
                metadata: kube::api::ObjectMeta {
                    name: Some("pvc-1".into()),
                    annotations: Some(annotations),
                    finalizers: finalizer.then(|| vec![FINALIZER.to_string()]),
                    deletion_timestamp: deleting.then_some(
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                        ),
                    ),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::core::v1::PersistentVolumeSpec {
                    persistent_volume_reclaim_policy: policy,
                    ..Default::default()
                }),
                status: Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
                    phase,
                    ..Default::default()
                }),
            }
        })
}

fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

proptest! {
    // No failure files: a finding becomes a plain case in `regressions`.
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    // --- quantities --------------------------------------------------------------------------------

    #[test]
    fn any_quantity_text_parses_or_says_why(input in quantity_like()) {
        match parse_bytes(&input) {
            Ok(bytes) => prop_assert_eq!(parse_bytes(&to_quantity(bytes)), Ok(bytes)),
            Err(e) => {
                prop_assert!(e.0.contains("not a valid quantity"), "{:?}: {}", input, e);
                prop_assert!(e.0.contains(&format!("{input:?}")), "{:?}: {}", input, e);
            }
        }
    }

    #[test]
    fn whole_numbers_with_any_suffix_mean_what_they_say(n in 0u64..1 << 20, s in 0..SUFFIXES.len()) {
        let (suffix, scale) = SUFFIXES[s];
        let want = n as u128 * scale;
        let got = parse_bytes(&format!("{n}{suffix}"));
        match u64::try_from(want) {
            Ok(want) => prop_assert_eq!(got, Ok(want)),
            Err(_) => prop_assert!(got.unwrap_err().0.contains("too large")),
        }
    }

    #[test]
    fn fractions_round_up_to_whole_bytes(n in 0u64..1 << 30, frac in 1u32..1000, s in 0..SUFFIXES.len()) {
        let (suffix, scale) = SUFFIXES[s];
        let text = format!("{n}.{frac:03}{suffix}");
        let exact = (n as u128 * 1000 + frac as u128) * scale;
        let want = exact.div_ceil(1000);
        match (u64::try_from(want), parse_bytes(&text)) {
            (Ok(want), got) => prop_assert_eq!(got, Ok(want), "{}", text),
            (Err(_), got) => prop_assert!(got.is_err(), "{}", text),
        }
    }

    #[test]
    fn every_byte_count_round_trips(bytes in any::<u64>()) {
        prop_assert_eq!(parse_bytes(&to_quantity(bytes)), Ok(bytes));
        prop_assert_eq!(parse_bytes(&bytes.to_string()), Ok(bytes));
        // What people read is never less than what there is.
        if bytes < 1 << 63 {
            prop_assert!(parse_bytes(&format_bytes(bytes)).unwrap() >= bytes);
        }
    }

    // --- StorageClass parameters -------------------------------------------------------------------

    #[test]
    fn any_class_parameters_parse_or_name_the_culprit(
        parameters in prop::collection::btree_map(
            prop_oneof![prop::sample::select(VALID_PARAMETERS).prop_map(str::to_string), any::<String>()],
            prop_oneof![any::<String>(), "[0-9]{0,6}[smh]?", "0?[0-7]{1,5}", "(delete|archive|true|false|[a-z-]{1,70})"],
            0..6,
        )
    ) {
        match ClassParameters::parse(&parameters) {
            Ok(p) => {
                prop_assert!(p.mode <= 0o7777);
                prop_assert!(p.uid != Some(u32::MAX) && p.gid != Some(u32::MAX));
                prop_assert!(!p.data_root.is_empty() && p.data_root.len() <= 63);
                prop_assert!(p.data_root.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
            Err(why) => prop_assert!(
                parameters.keys().any(|k| why.contains(k.as_str()) || why.contains(&format!("{k:?}"))),
                "{:?}: {}", parameters, why
            ),
        }
    }

    #[test]
    fn valid_class_parameters_are_taken_as_written(
        mode in 0u32..=0o7777,
        uid in 0u32..u32::MAX,
        gid in 0u32..u32::MAX,
        archive in any::<bool>(),
        cleanup in any::<bool>(),
        grace in 0u64..100_000,
        unit in prop::sample::select(&[("s", 1u64), ("m", 60), ("h", 3600)][..]),
        root in "[a-z0-9-]{1,63}",
        volume_type in prop::sample::select(&[VolumeType::HostPath, VolumeType::Local][..]),
        key in "([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\\.){0,2}[a-z]{1,8}/[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?",
    ) {
        let parameters: BTreeMap<String, String> = [
            ("mode", format!("{mode:04o}")),
            ("uid", uid.to_string()),
            ("gid", gid.to_string()),
            ("onDelete", if archive { "archive" } else { "delete" }.to_string()),
            ("nodeLossCleanup", cleanup.to_string()),
            ("nodeLossGracePeriod", format!("{grace}{}", unit.0)),
            ("dataRoot", root.clone()),
            ("volumeType", volume_type.as_str().to_string()),
            ("nodeAffinityKey", key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let p = ClassParameters::parse(&parameters).unwrap();
        prop_assert_eq!(p, ClassParameters {
            mode,
            uid: Some(uid),
            gid: Some(gid),
            archive_on_delete: archive,
            node_loss_cleanup: cleanup,
            node_loss_grace: Duration::from_secs(grace * unit.1),
            data_root: root,
            volume_type,
            directory_pattern: DirectoryPattern::default(),
            node_affinity_key: key,
        });
    }

    #[test]
    fn durations_never_panic(text in prop_oneof![any::<String>(), "[0-9]{0,25}[smhd]?"]) {
        if let Some(d) = parse_duration(&text) {
            let t = text.trim();
            prop_assert!(t.ends_with(['s', 'm', 'h']));
            prop_assert!(d.as_secs() >= t[..t.len() - 1].parse::<u64>().unwrap());
        }
    }

    // --- the hostvol-config ConfigMap --------------------------------------------------------------

    #[test]
    fn any_config_text_parses_or_says_why(text in any::<String>(), node in "[a-z*-]{0,8}") {
        if let Err(why) = parse_config(&text, &node) {
            prop_assert!(why.contains("config.yaml is not valid") || why.contains("nodes."), "{}", why);
        }
    }

    #[test]
    fn accepted_root_paths_are_directories_below_slash(
        entries in prop::collection::btree_map(
            "(\\*|node-[a-c])",
            prop::collection::btree_map(
                prop_oneof!["[a-z0-9-]{1,8}", any::<String>()],
                (
                    prop_oneof!["(/{1,2}[a-z.]{0,4}){0,4}/?", "[a-z./]{0,10}", any::<String>()],
                    prop::option::of(quantity_like()),
                    prop::option::of("(auto|required|off|on|[a-z]{0,5})"),
                ),
                0..3,
            ),
            0..3,
        ),
        node in "node-[a-d]",
    ) {
        // Built as JSON, which is YAML: every string arrives exactly as generated.
        let nodes: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(entry, roots)| {
                let roots: serde_json::Map<String, serde_json::Value> = roots
                    .iter()
                    .map(|(name, (path, cap, quota))| {
                        let mut root = serde_json::json!({"path": path});
                        if let Some(cap) = cap { root["capacityCap"] = cap.clone().into(); }
                        if let Some(quota) = quota { root["quota"] = quota.clone().into(); }
                        (name.clone(), root)
                    })
                    .collect();
                (entry.clone(), serde_json::json!({"roots": roots}))
            })
            .collect();
        let text = serde_json::json!({"nodes": nodes}).to_string();
        match parse_config(&text, &node) {
            Ok(Some(roots)) => {
                let from = entries.get(&node).or_else(|| entries.get("*")).unwrap();
                prop_assert_eq!(roots.keys().collect::<Vec<_>>(), from.keys().collect::<Vec<_>>());
                for (name, spec) in &roots {
                    prop_assert!(!name.is_empty() && name.len() <= 63);
                    let path = Path::new(&spec.path);
                    let mut components = path.components();
                    prop_assert_eq!(components.next(), Some(Component::RootDir), "{:?}", spec.path);
                    let rest: Vec<Component> = components.collect();
                    prop_assert!(!rest.is_empty(), "{:?} is the root filesystem itself", spec.path);
                    prop_assert!(rest.iter().all(|c| matches!(c, Component::Normal(_))), "{:?}", spec.path);
                    prop_assert!(!spec.path.ends_with('/') && !spec.path.contains("//"), "{:?}", spec.path);
                }
            }
            Ok(None) => prop_assert!(!entries.contains_key(&node) && !entries.contains_key("*")),
            Err(why) => prop_assert!(why.starts_with("nodes.") || why.contains("config.yaml"), "{}", why),
        }
    }

    // --- claim and namespace names to directories --------------------------------------------------

    #[test]
    fn any_names_give_a_safe_directory_or_an_error(uid in any::<String>(), ns in any::<String>(), claim in any::<String>()) {
        let Ok(pv) = pv_name(&uid) else { return Ok(()) };
        match directory_name(&pv, &ns, &claim) {
            Ok(dir) => {
                prop_assert!(validate_directory_name(&dir).is_ok());
                let joined = Path::new("/mnt/data").join(&dir);
                prop_assert_eq!(joined.parent(), Some(Path::new("/mnt/data")), "{:?}", dir);
                prop_assert!(matches!(Path::new(&dir).components().collect::<Vec<_>>()[..], [Component::Normal(_)]));
            }
            Err(e) => prop_assert!(e.0.contains("not a valid Kubernetes name") || e.0.contains("not a safe directory name"), "{}", e),
        }
    }

    #[test]
    fn kubernetes_names_always_give_a_directory(uid in UID, ns in DNS_LABEL, claim in DNS_SUBDOMAIN) {
        prop_assume!(claim.len() <= 253);
        let pv = pv_name(&uid).unwrap();
        let dir = directory_name(&pv, &ns, &claim).unwrap();
        prop_assert!(dir.len() <= MAX_DIRECTORY_NAME);
        let prefix = format!("pvc-{uid}_{ns}_");
        prop_assert!(dir.starts_with(&prefix), "{:?}", dir);
    }

    #[test]
    fn different_claims_never_share_a_directory(
        a in (UID, DNS_LABEL, DNS_LABEL),
        b in (UID, DNS_LABEL, DNS_LABEL),
        long_claim in "[a-z0-9]{200,253}",
    ) {
        let dir = |(uid, ns, claim): &(String, String, String)| directory_name(&pv_name(uid).unwrap(), ns, claim).unwrap();
        if a != b {
            prop_assert_ne!(dir(&a), dir(&b));
        }
        // Shortened names stay apart too: the uid comes first.
        let (a_long, b_long) = ((a.0.clone(), a.1.clone(), long_claim.clone()), (b.0.clone(), a.1.clone(), long_claim));
        if a_long.0 != b_long.0 {
            prop_assert_ne!(dir(&a_long), dir(&b_long));
        }
    }

    // --- directoryPattern ------------------------------------------------------------------------

    #[test]
    fn no_pattern_expansion_ever_escapes_the_root(
        pattern in prop_oneof![any::<String>(), pattern_strategy()],
        uid in prop_oneof![UID.boxed(), any::<String>().boxed()],
        ns in prop_oneof![DNS_LABEL.boxed(), any::<String>().boxed()],
        claim in prop_oneof![DNS_SUBDOMAIN.boxed(), any::<String>().boxed()],
        app in prop_oneof!["[a-z0-9.-]{1,12}".boxed(), any::<String>().boxed(), Just("..".to_string()).boxed()],
    ) {
        let Ok(pattern) = DirectoryPattern::parse(&pattern) else { return Ok(()) };
        let Ok(pv) = pv_name(&uid) else { return Ok(()) };
        let labels = BTreeMap::from([("app".to_string(), app.clone())]);
        let annotations = BTreeMap::from([("team".to_string(), app)]);
        let facts = ClaimFacts { pv: &pv, namespace: &ns, claim: &claim, labels: &labels, annotations: &annotations };
        if let Ok(path) = pattern.expand(&facts) {
            let path = path.as_str();
            prop_assert!(VolumePath::parse(path).is_ok(), "{:?}", path);
            prop_assert!(path.len() <= MAX_PATH && !path.starts_with('/') && !path.ends_with('/') && !path.contains("//"), "{:?}", path);
            prop_assert!(Path::new(path).components().all(|c| matches!(c, Component::Normal(_))), "{:?}", path);
            prop_assert!(path.split('/').all(|s| !s.is_empty() && !s.starts_with('.') && s.len() <= MAX_DIRECTORY_NAME), "{:?}", path);
            prop_assert!(Path::new("/mnt/data").join(path).starts_with("/mnt/data"));
        }
    }

    #[test]
    fn distinct_claims_never_share_a_patterned_directory(
        pattern in pattern_strategy(),
        a in (UID, DNS_LABEL, DNS_SUBDOMAIN, "[a-z0-9.-]{1,8}"),
        b in (UID, DNS_LABEL, DNS_SUBDOMAIN, "[a-z0-9.-]{1,8}"),
        same_namespace in any::<bool>(),
    ) {
        // Two claims that exist at once differ in uid and in namespace/name (the API server's rule).
        let mut b = b;
        if same_namespace {
            b.1 = a.1.clone();
        }
        prop_assume!(a.0 != b.0 && (a.1 != b.1 || a.2 != b.2));
        let Ok(pattern) = DirectoryPattern::parse(&pattern) else { return Ok(()) };
        let expand = |(uid, ns, claim, app): &(String, String, String, String)| {
            let pv = pv_name(uid).unwrap();
            let labels = BTreeMap::from([("app".to_string(), app.clone())]);
            let annotations = BTreeMap::from([("team".to_string(), app.clone())]);
            pattern.expand(&ClaimFacts { pv: &pv, namespace: ns, claim, labels: &labels, annotations: &annotations })
        };
        if let (Ok(pa), Ok(pb)) = (expand(&a), expand(&b)) {
            prop_assert_ne!(pa, pb, "pattern {:?}", pattern.as_str());
        }
    }

    #[test]
    fn patterns_that_cannot_tell_claims_apart_are_refused(pattern in pattern_strategy()) {
        let identifies = |p: &str| {
            let t = format!("/{p}/");
            ["{pv}"].iter().any(|x| ["/", "_"].iter().any(|l| ["/", "_"].iter().any(|r| t.contains(&format!("{l}{x}{r}")))))
                || ["{namespace}", "{claim}"].iter().all(|x| ["/", "_"].iter().any(|l| ["/", "_"].iter().any(|r| t.contains(&format!("{l}{x}{r}")))))
        };
        if DirectoryPattern::parse(&pattern).is_ok() {
            prop_assert!(identifies(&pattern), "{:?} accepted", pattern);
        }
    }

    #[test]
    fn node_label_values_are_always_valid_labels(node in prop_oneof![any::<String>(), "[a-z0-9._-]{0,300}"]) {
        let v = node_label_value(&node);
        prop_assert!(is_label_value(&v), "{:?} -> {:?}", node, v);
        prop_assert_eq!(&v, &node_label_value(&node));
    }

    // --- CSIStorageCapacity figures from other agents ----------------------------------------------

    #[test]
    fn published_capacities_count_only_when_well_formed(
        class in prop_oneof![Just("hostvol".to_string()), "[a-z]{0,8}"],
        node in prop::option::of("[a-z0-9.-]{0,20}"),
        capacity in prop::option::of(prop_oneof![
            quantity_like().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ]),
    ) {
        let mut object = serde_json::json!({
            "apiVersion": "storage.k8s.io/v1beta1",
            "kind": "CSIStorageCapacity",
            "metadata": {"name": "x", "namespace": "hostvol-system"},
            "storageClassName": class,
        });
        if let Some(node) = &node {
            object["metadata"]["annotations"] = serde_json::json!({ANN_NODE: node});
        }
        if let Some(capacity) = &capacity {
            object["capacity"] = capacity.clone();
        }
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let want = match (class == "hostvol", &node, capacity.as_ref().and_then(|c| c.as_str())) {
            (true, Some(node), Some(text)) => parse_bytes(text).ok().map(|b| (node.clone(), b)),
            _ => None,
        };
        let got = published_candidate(&object, "hostvol").map(|c| (c.node, c.allocatable));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn any_object_is_a_candidate_or_not_but_never_a_panic(
        metadata in json_map(),
        fields in json_map(),
        annotations in prop::collection::btree_map(
            prop_oneof![Just(ANN_NODE.to_string()), "[a-z./-]{1,20}"],
            any::<String>(),
            0..4,
        ),
    ) {
        // A well-formed object (so it reaches the code under test) with anything in its fields.
        let mut object = serde_json::json!({
            "apiVersion": "storage.k8s.io/v1beta1",
            "kind": "CSIStorageCapacity",
            "metadata": {"name": "x", "namespace": "hostvol-system", "annotations": annotations},
        });
        for (k, v) in metadata {
            if !matches!(k.as_str(), "name" | "namespace" | "annotations" | "labels" | "ownerReferences" | "managedFields" | "creationTimestamp" | "deletionTimestamp" | "finalizers" | "generation" | "deletionGracePeriodSeconds" | "uid" | "resourceVersion" | "generateName" | "selfLink") {
                object["metadata"][k] = v;
            }
        }
        for (k, v) in fields {
            if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                object[k] = v;
            }
        }
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let _ = published_candidate(&object, "hostvol");
    }

    // --- claims: which the agent acts on, and what it makes of their spec ----------------------------

    #[test]
    fn any_claim_spec_is_admitted_as_written_or_refused_with_a_reason(spec in claim_spec()) {
        match admission::admit(&spec) {
            Ok(request) => {
                prop_assert_ne!(spec.volume_mode.as_deref(), Some("Block"));
                prop_assert!(!spec.has_selector);
                prop_assert!(spec.access_modes.iter().all(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod"));
                prop_assert!(!request.access_modes.is_empty());
                let text = spec.storage_request.as_deref().unwrap();
                prop_assert_eq!(request.capacity.as_str(), text.trim());
                prop_assert_eq!(Ok(request.capacity_bytes), parse_bytes(text));
                prop_assert!(request.capacity_bytes > 0);
                prop_assert_eq!(request.clone_of.is_some(), spec.data_source.is_some());
                // Only a claim of the claim's own namespace is cloned.
                prop_assert!(spec.data_source.as_ref().is_none_or(|s| s.namespace.is_none()));
            }
            Err(refusal) => {
                prop_assert!(!refusal.reason().is_empty());
                prop_assert!(refusal.message().len() > 10, "{:?}", refusal);
                if spec.volume_mode.as_deref() == Some("Block") {
                    prop_assert_eq!(refusal, admission::Refusal::BlockVolumeMode);
                }
            }
        }
    }

    #[test]
    fn a_claim_is_provisioned_only_by_its_provisioner_on_its_selected_node(
        annotations in claim_annotations(),
        node in prop_oneof![Just("node-a".to_string()), Just("node-b".to_string())],
    ) {
        let ours = [ANN_STORAGE_PROVISIONER, ANN_STORAGE_PROVISIONER_BETA]
            .iter()
            .any(|k| annotations.get(*k).map(String::as_str) == Some(PROVISIONER));
        let want = if annotations.contains_key(ANN_BIND_COMPLETED) {
            Interest::Bound
        } else {
            match annotations.get(ANN_SELECTED_NODE) {
                Some(selected) if ours && *selected == node => Interest::Provision,
                None if ours => Interest::ChooseNode,
                _ => Interest::Ignore,
            }
        };
        prop_assert_eq!(admission::interest(&annotations, PROVISIONER, &node), want);
    }

    #[test]
    fn the_claim_cache_keeps_ours_and_the_undecided_only(
        annotations in claim_annotations(),
        bound_to_ours in any::<bool>(),
    ) {
        let named: Vec<&String> = [ANN_STORAGE_PROVISIONER, ANN_STORAGE_PROVISIONER_BETA]
            .iter()
            .filter_map(|k| annotations.get(*k))
            .collect();
        let ours_or_undecided = named.is_empty() || named.iter().any(|p| *p == PROVISIONER);
        let want = ours_or_undecided && (!annotations.contains_key(ANN_BIND_COMPLETED) || bound_to_ours);
        prop_assert_eq!(admission::concerns(&annotations, PROVISIONER, || bound_to_ours), want);
    }

    // --- PV annotations: what the agent reads back from its own volumes ------------------------------

    #[test]
    fn limit_records_round_trip_and_anything_else_is_none(
        id in any::<u64>(),
        project in any::<u32>(),
        text in prop_oneof![any::<String>(), "(qgroup 0/|project )[0-9a-z -]{0,25}"],
    ) {
        for limit in [Limit::Qgroup(id), Limit::Project(project)] {
            prop_assert_eq!(Limit::parse(&limit.record()), Some(limit));
        }
        if let Some(limit) = Limit::parse(&text) {
            prop_assert_eq!(limit.record(), text);
        }
    }

    #[test]
    fn disposal_never_touches_a_bound_volume_or_a_plain_retained_one(pv in persistent_volume()) {
        let phase = pv.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        let deleting = pv.metadata.deletion_timestamp.is_some();
        let policy = pv.spec.as_ref().unwrap().persistent_volume_reclaim_policy.clone().unwrap_or_else(|| "Delete".into());
        let what = disposal(&pv);
        if phase == "Bound" || (!deleting && !matches!(phase.as_str(), "Released" | "Failed")) {
            prop_assert_eq!(what, Disposal::Keep, "a volume in use is kept");
        }
        if policy != "Delete" && !pv.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANN_PURGE)) {
            prop_assert!(
                matches!(what, Disposal::Keep | Disposal::ReleaseFinalizer),
                "Retain without a purge request never removes data: {:?}", what
            );
        }
        if let Disposal::Delete { archive } = what {
            prop_assert_eq!(policy.as_str(), "Delete");
            let on_delete = pv.metadata.annotations.as_ref().and_then(|a| a.get(ANN_ON_DELETE)).cloned();
            prop_assert_eq!(archive, on_delete.as_deref() == Some("archive"));
        }
    }

    #[test]
    fn a_volume_directory_never_escapes_its_root(
        path in prop_oneof![
            any::<String>(),
            "(/[a-z0-9._-]{0,12}){0,4}/?(\\.\\.|\\.|pvc-1_[a-z0-9._-]{0,300}|[a-z0-9._-]{0,30})",
            "/mnt/data(/\\.\\.|/sub)?/pvc-1_[a-z0-9._/-]{0,40}",
        ],
        root in prop_oneof![Just("/mnt/data".to_string()), Just("/mnt/data/".to_string()), Just("/".to_string()), "(/[a-z0-9._-]{1,8}){0,3}"],
        annotation in any::<String>(),
    ) {
        let pv = PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some("pvc-1".into()),
                annotations: Some(BTreeMap::from([(ANN_DIRECTORY.to_string(), annotation)])),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PersistentVolumeSpec {
                host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                    path: path.clone(),
                    type_: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(name) = pv::volume_directory(&pv, &root) {
            // A safe relative path inside the root, whatever the annotation says: safe segments, no
            // `..`, nothing outside. Only a name made for this PV proves it is this volume's; any
            // other path (directoryPattern) is acted on only after the node reads its mark.
            prop_assert!(VolumePath::parse(&name).is_ok(), "{:?} -> {:?}", path, name);
            prop_assert!(name.split('/').all(|s| validate_directory_name(s).is_ok()), "{:?} -> {:?}", path, name);
            prop_assert!(Path::new(&name).components().all(|c| matches!(c, Component::Normal(_))));
            prop_assert_eq!(&path, &pv::host_path(&root, &name));
            if !name.contains('/') && name.starts_with("pvc-1_") {
                prop_assert!(VolumePath::parse(&name).unwrap().is_named_for("pvc-1"));
            }
        }
        if let Some(own) = pv::directory_of(&pv) {
            prop_assert!(own.starts_with("pvc-1_") && !own.contains('/'), "{:?} -> {:?}", path, own);
        }
    }

    // --- gRPC request fields -----------------------------------------------------------------------

    #[test]
    fn get_volume_names_are_pv_names_or_invalid_argument(name in prop_oneof![any::<String>(), "pvc-[a-z0-9.-]{0,260}"]) {
        let valid = !name.is_empty() && name.len() <= 253
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        match requested_pv_name(&name) {
            Ok(()) => prop_assert!(valid),
            Err(status) => {
                prop_assert!(!valid);
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(status.message().contains("is not a PersistentVolume name"));
            }
        }
    }

    #[test]
    fn watch_intervals_are_bounded(seconds in any::<u32>()) {
        let interval = watch_interval(seconds);
        prop_assert!((Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&interval));
        if (1..=3600).contains(&seconds) {
            prop_assert_eq!(interval, Duration::from_secs(seconds as u64));
        }
    }

    #[test]
    fn any_request_bytes_decode_or_fail_cleanly(data in any::<Vec<u8>>()) {
        if let Ok(request) = GetVolumeRequest::decode(&data[..]) {
            let _ = requested_pv_name(&request.pv_name);
        }
        if let Ok(request) = WatchCapacityRequest::decode(&data[..]) {
            let _ = watch_interval(request.max_interval_seconds);
        }
    }
}

/// Inputs proptest or cargo-fuzz found, kept as plain cases.
mod regressions {
    use super::*;

    /// `//`, `/.` and `/./` are absolute, are not "/" and have no '..', but they are the root
    /// filesystem itself: `//` even became an empty path. Found by
    /// `accepted_root_paths_are_directories_below_slash`.
    #[test]
    fn root_paths_that_are_slash_in_disguise_are_refused() {
        for path in ["//", "///", "/.", "/./", "/./.", "//./"] {
            let text =
                format!("nodes:\n  node-a:\n    roots:\n      default: {{path: {path:?}}}\n");
            let why = parse_config(&text, "node-a").unwrap_err();
            assert!(
                why.contains("nodes.node-a.roots.default.path"),
                "{path}: {why}"
            );
        }
    }

    /// Paths are kept in one spelling: `/mnt//data/./x/` is `/mnt/data/x`.
    #[test]
    fn root_paths_are_normalised() {
        let text = "nodes:\n  node-a:\n    roots:\n      default: {path: \"/mnt//data/./x/\"}\n";
        let roots = parse_config(text, "node-a").unwrap().unwrap();
        assert_eq!(roots["default"].path, "/mnt/data/x");
    }

    /// A node name with nothing usable at its start gave a label value starting with '-'
    /// (`-<hash>`), which the API server refuses. Found by `node_label_values_are_always_valid_labels`.
    #[test]
    fn node_names_without_a_usable_prefix_still_give_a_label() {
        for node in [".", "-", "_x", "-node", ".a.b", "--", "é"] {
            let v = node_label_value(node);
            assert!(is_label_value(&v), "{node:?} -> {v:?}");
        }
        let set: BTreeSet<String> = [".", "-", "_x"]
            .iter()
            .map(|n| node_label_value(n))
            .collect();
        assert_eq!(set.len(), 3);
    }
}

/// Patterns built from what patterns are made of: placeholders, separators and text.
fn pattern_strategy() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{namespace}"),
        Just("{claim}"),
        Just("{pv}"),
        Just("{label:app}"),
        Just("{annotation:team}"),
        Just("/"),
        Just("_"),
        Just("-"),
        Just("."),
        Just("k8s"),
    ];
    proptest::collection::vec(token, 1..9).prop_map(|tokens| tokens.concat())
}
