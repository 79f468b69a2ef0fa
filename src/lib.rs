//! hostvol: node-local hostPath volumes for Kubernetes, provisioned by a per-node agent.
//!
//! The source tree is the architecture; each layer may use only the layers listed before it:
//!
//! 1. [`domain`]: pure decisions and values (admission, naming, class parameters, capacity
//!    arithmetic, placement, quantities). No I/O, no Kubernetes client.
//! 2. [`node`]: everything that touches the node's filesystems (data roots, volume directories,
//!    removal and archiving, usage walks, orphan scans).
//! 3. [`controller`]: the agent's Kubernetes side (shared context, watches, provisioning, reclaim,
//!    CSIStorageCapacity, node-loss cleanup, the ConfigMap, PV objects, metrics).
//! 4. [`service`] and [`cli`]: what the agent serves (gRPC node service, HTTP probes and metrics)
//!    and the commands for people.
//! 5. The wiring at the top: [`app`] dispatches commands, [`agent`] starts the agent's tasks,
//!    [`telemetry`] and [`shutdown`] are process concerns.

pub mod cli;
pub mod controller;
pub mod domain;
pub mod node;
pub mod service;

pub mod agent;
pub mod app;
pub mod shutdown;
pub mod telemetry;

/// The provisioner name: a valid CSIDriver name too (no `/`), which capacity-aware scheduling needs.
pub const DEFAULT_PROVISIONER: &str = "hostpath.hostvol.io";
