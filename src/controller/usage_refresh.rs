//! Keeps the usage cache of this node's volumes current: every volume every `every`, new volumes as
//! soon as they appear, all off the request path, and the per-volume gauges that come from it.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::context::{Context, holding_root};
use crate::controller::metrics::{QuotaLabels, VolumeFigures, VolumeLabels};
use crate::controller::pv;
use crate::node::quota::btrfs;
use crate::node::roots::Root;
use crate::node::usage::{self, Usage, UsageCache};

/// Measures every volume's usage every `every`, and new volumes as soon as they appear, off the
/// request path.
pub async fn run(
    ctx: Arc<Context>,
    cache: UsageCache,
    every: Duration,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let mut next_full = tokio::time::Instant::now();
    loop {
        let volumes = ctx.volumes.state();
        for pv in &volumes {
            ctx.check_directory_annotation(pv); // one Warning per edit, as soon as it is seen
        }
        let roots = ctx.roots();
        let keep: HashSet<(String, String)> = volumes
            .iter()
            .filter_map(|pv| holding_root(&roots, pv).map(|(root, dir)| (root.name.clone(), dir)))
            .collect();
        let full = tokio::time::Instant::now() >= next_full;
        if full {
            next_full = tokio::time::Instant::now() + every;
        }
        for root in ctx.roots().all() {
            // Each volume's directory from its immutable hostPath, inside this root, never from
            // the editable annotation.
            let todo: Vec<String> = volumes
                .iter()
                .filter_map(|pv| pv::volume_directory(pv, &root.host_path))
                .filter(|d| full || cache.get(&root.name, d).is_none())
                .collect();
            if todo.is_empty() {
                continue;
            }
            if root.quotas.mechanism().is_some() {
                // The quota accounting knows every volume's bytes: constant time, no walks.
                let (measured, took) = from_quotas(root, todo, &cache, full).await;
                debug!(root = %root.name, measured, millis = took.as_millis() as u64, "usage read from quotas");
            } else {
                let (measured, took) = usage::refresh(
                    &root.name,
                    root.store.root_handle(),
                    todo,
                    &cache,
                    concurrency,
                )
                .await;
                debug!(root = %root.name, measured, full, millis = took.as_millis() as u64, "usage refreshed");
            }
        }
        cache.retain(&keep);
        publish_metrics(&ctx, &volumes, &cache);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_full) => {}
            _ = ctx.volumes_changed.notified() => {}
        }
    }
}

/// Reads the volumes' usage from the root's quota accounting, on the blocking pool.
async fn from_quotas(
    root: &Arc<Root>,
    names: Vec<String>,
    cache: &UsageCache,
    full: bool,
) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let handle = root.store.root_handle();
    let quotas = root.quotas.clone();
    let read = tokio::task::spawn_blocking(move || {
        if full && quotas.uses_subvolumes() {
            // btrfs updates its figures at transaction commit; commit first so they are current.
            // Only on the periodic pass: a volume just made holds nothing yet, and a commit per new
            // volume would cost every provisioning burst a sync.
            let _ = btrfs::sync(handle.as_fd());
        }
        quotas.usage(handle.as_fd(), &names)
    })
    .await;
    let measured_at = SystemTime::now();
    let mut measured = 0;
    match read {
        Ok(Ok(Some(figures))) => {
            for (name, figure) in figures {
                cache.insert(
                    &root.name,
                    &name,
                    Usage {
                        bytes: figure.used_bytes,
                        inodes: figure.inodes,
                        measured_at,
                    },
                );
                measured += 1;
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(error)) => warn!(root = %root.name, %error, "cannot read usage from the quotas"),
        Err(error) => warn!(root = %root.name, %error, "usage task failed"),
    }
    (measured, started.elapsed())
}

/// The per-volume and per-root gauges, from the PVs and the usage cache.
fn publish_metrics(ctx: &Context, volumes: &[Arc<PersistentVolume>], cache: &UsageCache) {
    let figures: Vec<VolumeFigures> = volumes
        .iter()
        .map(|volume| {
            let claim = volume
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.clone())
                .unwrap_or_default();
            let usage =
                holding_root(&ctx.roots(), volume).and_then(|(r, d)| cache.get(&r.name, &d));
            VolumeFigures {
                labels: VolumeLabels {
                    namespace: claim.namespace.unwrap_or_default(),
                    persistentvolumeclaim: claim.name.unwrap_or_default(),
                    persistentvolume: volume.name_any(),
                },
                capacity_bytes: pv::capacity_bytes(volume),
                used_bytes: usage.map(|u| u.bytes),
                used_inodes: usage.and_then(|u| u.inodes),
            }
        })
        .collect();
    ctx.metrics.set_volumes(&figures);
    let roots: Vec<(QuotaLabels, bool)> = ctx
        .roots()
        .all()
        .map(|root| {
            let labels = QuotaLabels {
                root: root.name.clone(),
                mechanism: root.quotas.enforcement.label().to_string(),
                mode: root.quotas.mode.to_string(),
            };
            (labels, root.quotas.mechanism().is_some())
        })
        .collect();
    ctx.metrics.set_quotas(&roots);
}
