//! End-to-end test harness for hostvol: a real Kubernetes 1.20.2 control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) on free loopback ports in a temp dir, fake nodes, a fake
//! kubelet (pod status only), and hostvol agents started as real processes.
//!
//! Recipe and flags: /work/shared/notes/control-plane.md. Binaries: `scripts/setup-control-plane.sh`.
//! Included by the e2e tests (`mod common;`), the benches and the demo example (`#[path]`).
//!
//! Environment:
//! * `HOSTVOL_E2E_KEEP=1` keeps the cluster dir (logs, etcd data) after the test; it is also kept when
//!   the test panics. The path is printed either way.
//! * `HOSTVOL_CACHE_DIR` / `XDG_CACHE_HOME` locate the control-plane binaries like the setup script;
//!   `HOSTVOL_K8S_BIN_DIR` overrides the directory directly, `HOSTVOL_ETCD` the etcd binary.
//!
//! Files (everything public is re-exported here, so callers write `common::X`):
//! * `control_plane.rs`: `Cluster` and `ClusterOptions`: starting the control plane, kubeconfigs,
//!   diagnostics for panic messages, `Drop`.
//! * `binaries.rs`: where the control-plane binaries, etcd and `hostvol` are found.
//! * `agent.rs`: `Agent`, a real `hostvol agent` process per node; `Cluster::start_agent`.
//! * `nodes.rs`: fake nodes, the fake kubelet's switches, force-deleting pods.
//! * `kubectl.rs`: `kubectl` runs and `apply` (YAML text, manifests from deploy/).
//! * `fixtures.rs`: namespaces; YAML of StorageClasses, claims and pods.
//! * `wait.rs`: `wait_for`, `poll_until`, waiting for pods, claims and Events.
//! * `inspect.rs`: reading state for assertions: Events, hostvol's PVs, CSIStorageCapacity objects,
//!   metrics, directories in a data root.
//! * `memory_cgroup.rs`: `MemoryCgroup`, a cgroup v1 memory limit an agent is moved into, and a
//!   process's peak RSS (`VmHWM`).
//! * `kubelet.rs` (the played kubelet), `process.rs` (child processes), `http.rs` (plain GET),
//!   `person.rs` (commands as people run them).
//! * `disk_fill.rs`: filling a data root at a steady rate, as something other than hostvol would.
//! * `faults.rs`: control-plane faults (kill, pause, restart etcd and kube-apiserver with the same
//!   command and data) and the API server's request counts; `api_proxy.rs`: `ApiProxy`, a cuttable
//!   TCP proxy in front of the API server that counts connection attempts.
//! * `real_cluster.rs`: `RealCluster`, a cluster of real nodes (kubelet + containerd each) from
//!   `scripts/real-cluster.sh`, with hostvol installed from `deploy/` and the image of
//!   `scripts/build-image.sh`; or the cluster of `HOSTVOL_E2E_KUBECONFIG`.
//!
//! Benches add `benches/support/mod.rs` (figures and bench setup) on top of this.
#![allow(dead_code, unused_imports)]

mod agent;
mod api_proxy;
mod binaries;
mod control_plane;
pub mod disk_fill;
pub mod faults;
mod fixtures;
pub mod http;
mod inspect;
mod kubectl;
pub mod kubelet;
pub mod loop_btrfs;
pub mod memory_cgroup;
mod nodes;
mod person;
pub mod process;
mod real_cluster;
mod wait;

pub use agent::{AGENT_READY_TIMEOUT, Agent, capacity_report};
pub use api_proxy::ApiProxy;
pub use binaries::{K8S_VERSION, SETUP_COMMAND, etcd_bin, hostvol_bin, k8s_bin_dir};
pub use control_plane::{
    AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Cluster, ClusterOptions, DEPLOY_RBAC_MANIFESTS,
    NODE_LOSS_COMPONENT_RBAC, client_from_kubeconfig, free_port,
};
pub use fixtures::{
    PROVISIONER, VOLUME_TYPES, claim_yaml, claim_yaml_with, class_yaml, pod_yaml, typed_class_yaml,
};
pub use inspect::{
    cluster_scoped_events, dirs_in, fmt_events, hostvol_pvs, metric_value, pv_claim, pv_dir_name,
    pv_host_path, pv_node, pv_volume_type, to_yaml_ish,
};
pub use kubelet::FakeKubelet;
pub use person::{Ran, hostvol_as_person, run_as_person};
pub use real_cluster::{
    EXTERNAL_KUBECONFIG_ENV, IMAGE_BUILD, IMAGE_REPOSITORY, PortForward, REAL_NODES_SETUP,
    RealCluster, RealNode, image_archive, image_tag,
};
pub use wait::{poll_until, wait_for};

// The library items tests and benches use, named only here: when src/ moves a module, change these
// lines and nothing else.
pub use hostvol::cli::agents::{Address, connect};
pub use hostvol::controller::pv;
pub use hostvol::node::usage;
pub use hostvol::service::grpc::v1 as grpc;
