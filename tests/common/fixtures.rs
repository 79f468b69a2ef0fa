//! What tests create: namespaces, and the YAML of StorageClasses, claims and pods for
//! `Cluster::kubectl_apply_yaml` (shipped manifests from deploy/ go through
//! `Cluster::apply_repo_manifest`).

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::time::Duration;

use super::Cluster;

/// hostvol's provisioner name (`provisioner:` of its StorageClasses).
pub const PROVISIONER: &str = "hostpath.hostvol.io";

impl Cluster {
    /// Creates namespace `name` and waits until its `default` ServiceAccount and that account's token
    /// secret exist (1.20's ServiceAccount admission rejects pods before the token secret exists).
    pub async fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create namespace {name}: {e}\n{}", self.diag()),
        }
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), name);
        self.wait_for(
            || async {
                matches!(sas.get_opt("default").await, Ok(Some(sa)) if sa.secrets.as_ref().is_some_and(|s| !s.is_empty()))
            },
            Duration::from_secs(60),
            &format!("ServiceAccount {name}/default with a token secret (controller manager)"),
        )
        .await;
    }
}

/// A StorageClass of hostvol; `parameters` as (key, value) pairs, none if empty.
pub fn class_yaml(name: &str, binding: &str, reclaim: &str, parameters: &[(&str, &str)]) -> String {
    let params: String = parameters
        .iter()
        .map(|(k, v)| format!("\n  {k}: \"{v}\""))
        .collect();
    let params = if params.is_empty() {
        String::new()
    } else {
        format!("parameters:{params}\n")
    };
    format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {name}\nprovisioner: {PROVISIONER}\n\
         volumeBindingMode: {binding}\nreclaimPolicy: {reclaim}\n{params}"
    )
}

/// The values of the class parameter `volumeType`: the suites run the scenarios where the type
/// matters (the PV's source, and every reader of its directory) once for each.
pub const VOLUME_TYPES: [&str; 2] = ["hostPath", "local"];

/// `class_yaml` of a class whose PVs carry `volume_type` (`hostPath` or `local`) as their source.
pub fn typed_class_yaml(
    name: &str,
    binding: &str,
    reclaim: &str,
    volume_type: &str,
    parameters: &[(&str, &str)],
) -> String {
    let mut parameters = parameters.to_vec();
    parameters.push(("volumeType", volume_type));
    class_yaml(name, binding, reclaim, &parameters)
}

/// A ReadWriteOnce claim; with `selected_node` it is already placed there, as the scheduler leaves a
/// claim of a WaitForFirstConsumer class.
pub fn claim_yaml(
    ns: &str,
    name: &str,
    class: &str,
    size: &str,
    selected_node: Option<&str>,
) -> String {
    claim_yaml_with(ns, name, class, size, selected_node, "")
}

/// `claim_yaml` with `extra_spec` (lines indented by two spaces, each ending in `\n`) appended to
/// its spec.
pub fn claim_yaml_with(
    ns: &str,
    name: &str,
    class: &str,
    size: &str,
    selected_node: Option<&str>,
    extra_spec: &str,
) -> String {
    let annotations = selected_node.map_or(String::new(), |n| {
        format!("  annotations:\n    volume.kubernetes.io/selected-node: {n}\n")
    });
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\n  namespace: {ns}\n{annotations}spec:\n  \
         storageClassName: {class}\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: {size}\n{extra_spec}"
    )
}

/// A one-container pod mounting claim `claim` at /data; `extra_spec` (lines indented by two spaces)
/// goes first in its spec, e.g. `"  nodeName: node-b\n"`.
pub fn pod_yaml(ns: &str, name: &str, claim: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{extra_spec}  containers:\n  - name: app\n    \
         image: busybox\n    volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    \
         persistentVolumeClaim:\n      claimName: {claim}\n"
    )
}
