//! The node's disks: data roots, volume directories, safe removal and archiving, usage walks and
//! orphan scans, and the agent's own memory on the node ([`memory`]). Every operation goes through an open handle on a data root and one validated name,
//! never a joined path, and never follows a symlink. Uses only [`crate::domain`].

pub mod abi;
pub mod adoption;
pub mod clone;
pub mod memory;
pub mod orphans;
pub mod parents;
pub mod quota;
pub mod removal;
pub mod roots;
pub mod usage;
pub mod volume_store;
pub mod walk;
