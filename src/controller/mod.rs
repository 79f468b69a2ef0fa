//! The agent's Kubernetes side: the shared [`context`], the [`watches`], and the controllers and tasks
//! they drive (provisioning, placement, reclaim, CSIStorageCapacity publishing, node-loss cleanup, the
//! ConfigMap, usage and orphan reports), plus the PV objects and metrics they share. Uses
//! [`crate::node`] and [`crate::domain`], never the services above it.

pub mod adoption;
pub mod api_health;
pub mod capacity;
pub mod claim;
pub mod clone_source;
pub mod config_map;
pub mod context;
pub mod events;
pub mod expansion;
pub mod limits;
pub mod metrics;
pub mod node_loss;
pub mod orphan_report;
pub mod ownership;
pub mod placement;
pub mod provision;
pub mod pv;
pub mod reclaim;
pub mod reuse;
pub mod storage_capacity;
pub mod store;
pub mod supervisor;
pub mod usage_refresh;
pub mod volume_locks;
pub mod watch_backoff;
pub mod watches;
