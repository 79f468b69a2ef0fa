//! Pure decisions and values: what a claim asks for and whether it can be served, names and paths,
//! class parameters, capacity arithmetic, placement, quantities. No I/O and no Kubernetes client here,
//! only plain data in and out, so every rule has table tests.

pub mod admission;
pub mod affinity;
pub mod capacity;
pub mod expansion;
pub mod naming;
pub mod params;
pub mod pattern;
pub mod placement;
pub mod quantity;
pub mod quota;
pub mod reuse;
