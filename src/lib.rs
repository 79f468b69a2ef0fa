//! hostvol: node-local hostPath volumes for Kubernetes, provisioned by a per-node agent.
//!
//! The domain (names, parameters, admission, capacity arithmetic) is plain functions; the Kubernetes
//! glue (`provisioner`) and the disk work (`volume_store`) sit around it.

pub mod admission;
pub mod agent;
pub mod app;
pub mod capacity;
pub mod cli;
pub mod config_map;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod naming;
pub mod node_loss;
pub mod node_service;
pub mod orphans;
pub mod params;
pub mod placement;
pub mod provisioner;
pub mod purge;
pub mod pv;
pub mod quantity;
pub mod reclaim;
pub mod removal;
pub mod report;
pub mod roots;
pub mod shutdown;
pub mod storage_capacity;
pub mod telemetry;
pub mod usage;
pub mod volume_store;

/// The provisioner name: a valid CSIDriver name too (no `/`), which capacity-aware scheduling needs.
pub const DEFAULT_PROVISIONER: &str = "hostpath.hostvol.io";
