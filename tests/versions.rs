//! Version-dependent manifests, checked without a cluster: Pod Security Admission (1.23 beta, 1.25 GA)
//! enforces the namespace's `pod-security.kubernetes.io/*` labels, which 1.20 stores as plain labels.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Namespace;

fn manifest<T: serde::de::DeserializeOwned>(path: &str) -> T {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Capabilities the "baseline" Pod Security Standard lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// What in the DaemonSet's pod the "baseline" level refuses (so its namespace must be privileged).
fn beyond_baseline(daemonset: &DaemonSet) -> Vec<String> {
    let pod = daemonset
        .spec
        .template
        .spec
        .as_ref()
        .expect("a pod template");
    let mut found: Vec<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.host_path.is_some())
        .map(|v| format!("hostPath volume {}", v.name))
        .collect();
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let context = container.security_context.as_ref();
        if context.and_then(|c| c.privileged) == Some(true) {
            found.push(format!("privileged container {}", container.name));
        }
        for cap in context
            .and_then(|c| c.capabilities.as_ref())
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
        {
            if !BASELINE_CAPABILITIES.contains(&cap.as_str()) {
                found.push(format!("capability {cap} in {}", container.name));
            }
        }
        for mount in container.volume_mounts.iter().flatten() {
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                found.push(format!("Bidirectional mount {}", mount.name));
            }
        }
    }
    if pod.host_network == Some(true) || pod.host_pid == Some(true) {
        found.push("host namespaces".into());
    }
    found
}

#[test]
fn the_agents_namespace_opts_into_privileged_pod_security() {
    let namespace: Namespace = manifest("deploy/namespace.yaml");
    let daemonset: DaemonSet = manifest("deploy/daemonset.yaml");
    assert_eq!(
        daemonset.metadata.namespace, namespace.metadata.name,
        "the DaemonSet runs in the namespace that carries the labels"
    );
    let needs = beyond_baseline(&daemonset);
    assert!(
        !needs.is_empty(),
        "the agent needs more than baseline (hostPath at least); if not, lower the label"
    );
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged"),
        "1.25+ admission would refuse the agent's pods for: {needs:?}"
    );
    // audit and warn, where set, must not be stricter (every agent pod would be reported).
    for mode in ["audit", "warn"] {
        if let Some(level) = labels.get(&format!("pod-security.kubernetes.io/{mode}")) {
            assert_eq!(level, "privileged", "{mode}");
        }
    }
    // No version pin: "latest" follows the server, and 1.20 ignores the labels altogether.
    assert!(
        labels
            .keys()
            .filter(|k| k.starts_with("pod-security.kubernetes.io/"))
            .all(|k| matches!(
                k.as_str(),
                "pod-security.kubernetes.io/enforce"
                    | "pod-security.kubernetes.io/audit"
                    | "pod-security.kubernetes.io/warn"
            )),
        "{labels:?}"
    );
}
