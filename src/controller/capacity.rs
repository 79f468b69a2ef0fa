//! This node's capacity figures, per data root, from the watch caches and one statvfs call per root
//! (cheap, no disk walk), kept current in a watch channel for the node service and the
//! CSIStorageCapacity publisher.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::controller::context::Context;
use crate::domain::capacity::{self, Snapshot};
use crate::node::roots::Root;

/// Figures of one data root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFigures {
    pub name: String,
    /// The root's path as the kubelet sees it on the node.
    pub data_root: String,
    pub filesystem_type: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub cap_bytes: Option<u64>,
    pub allocatable_bytes: u64,
    pub volume_count: u32,
    /// Why the root cannot serve claims, if it cannot (empty otherwise).
    pub problem: String,
    /// The quota mechanism enforcing sizes, `none` or `unavailable` (see `Enforcement::label`).
    pub quota: String,
    pub quota_mode: String,
    pub quota_detail: String,
}

/// The node's figures: every root, the primary one first-class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFigures {
    pub node: String,
    pub primary: RootFigures,
    pub roots: Vec<RootFigures>,
    pub observed_at: Option<SystemTime>,
    /// The `--capacity-change-threshold` these figures were sent under: the CSIStorageCapacity
    /// publisher holds its writes to the same rule.
    pub change_threshold: u64,
}

impl NodeFigures {
    fn snapshots(&self) -> Vec<Snapshot> {
        self.roots
            .iter()
            .map(|r| Snapshot {
                volume_count: r.volume_count,
                allocated: r.allocated_bytes,
                allocatable: r.allocatable_bytes,
                available: r.available_bytes,
            })
            .collect()
    }
}

fn root_figures(ctx: &Context, root: &Root) -> RootFigures {
    let fs = root.store.filesystem_stats().unwrap_or_default();
    let allocated = ctx.allocated_bytes(&root.name);
    RootFigures {
        name: root.name.clone(),
        data_root: root.host_path.clone(),
        filesystem_type: root.store.filesystem_type(),
        total_bytes: fs.total_bytes,
        available_bytes: fs.available_bytes,
        used_bytes: fs.used_bytes,
        total_inodes: fs.total_inodes,
        free_inodes: fs.free_inodes,
        allocated_bytes: allocated,
        reserved_bytes: root.reserved,
        cap_bytes: root.cap,
        allocatable_bytes: root.allocatable(&ctx.settings.node, allocated),
        volume_count: ctx.volumes_in(&root.name) as u32,
        problem: root.problem(&ctx.settings.node).unwrap_or_default(),
        quota: root.quotas.enforcement.label().to_string(),
        quota_mode: root.quotas.mode.to_string(),
        quota_detail: root.quotas.enforcement.describe(),
    }
}

/// The node's figures now.
pub fn node_figures(ctx: &Context) -> NodeFigures {
    let roots = ctx.roots();
    let all: Vec<RootFigures> = roots.all().map(|r| root_figures(ctx, r)).collect();
    let primary_name = roots.primary().map(|r| r.name.clone()).unwrap_or_default();
    let primary = all
        .iter()
        .find(|r| r.name == primary_name)
        .cloned()
        .unwrap_or_default();
    NodeFigures {
        node: ctx.settings.node.clone(),
        primary,
        roots: all,
        observed_at: Some(SystemTime::now()),
        change_threshold: 0,
    }
}

/// Keeps the latest material figures in `tx`, recomputing on volume changes and every second.
pub async fn track(
    ctx: Arc<Context>,
    tx: watch::Sender<NodeFigures>,
    threshold: u64,
    shutdown: CancellationToken,
) {
    let mut last: Option<Vec<Snapshot>> = None;
    loop {
        let figures = NodeFigures {
            change_threshold: threshold,
            ..node_figures(&ctx)
        };
        let now = figures.snapshots();
        ctx.metrics
            .allocatable_bytes
            .set(figures.primary.allocatable_bytes as i64);
        let changed = last.as_ref().is_none_or(|prev| {
            prev.len() != now.len()
                || prev
                    .iter()
                    .zip(&now)
                    .any(|(a, b)| capacity::materially_changed(a, b, threshold))
        });
        if changed {
            debug!(
                allocatable = figures.primary.allocatable_bytes,
                volumes = figures.primary.volume_count,
                "capacity changed"
            );
            last = Some(now);
            tx.send_replace(figures);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.volumes_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
