//! Reports orphaned directories and lost volumes of this node: metrics, and a Warning on each lost PV.
//! Never deletes anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::context::{self, Context};
use crate::controller::reclaim::Disposal;
use crate::controller::store::store_ready;
use crate::controller::{pv, reclaim};
use crate::node::orphans::{Findings, classify, read_root};
use crate::node::roots::{Root, RootSet};

/// Each PV's directory relative to the root the kubelet sees as `host_root` (below parents too,
/// for `directoryPattern` volumes).
pub fn expected_directories(
    volumes: &[Arc<PersistentVolume>],
    host_root: &str,
) -> HashMap<String, String> {
    volumes
        .iter()
        .filter_map(|pv| Some((pv.name_any(), pv::volume_directory(pv, host_root)?)))
        .collect()
}

/// Findings per data root. Volumes of roots this node no longer has are left out: they cannot be
/// checked, and dropping a root from the configuration must not make its volumes look lost.
pub async fn scan(ctx: &Context) -> std::io::Result<Vec<(Arc<Root>, Findings)>> {
    let volumes = ctx.volumes.state();
    let roots = ctx.roots();
    // Reading a data root is blocking I/O (a root of many directories takes a while): never on the
    // async workers that serve everything else.
    tokio::task::spawn_blocking(move || scan_roots(&roots, &volumes))
        .await
        .map_err(|e| std::io::Error::other(format!("the orphan scan stopped: {e}")))?
}

fn scan_roots(
    roots: &RootSet,
    volumes: &[Arc<PersistentVolume>],
) -> std::io::Result<Vec<(Arc<Root>, Findings)>> {
    let mut out = Vec::new();
    for root in roots.all() {
        let here: Vec<Arc<PersistentVolume>> = volumes
            .iter()
            .filter(|pv| context::volume_root(roots, pv) == root.name)
            .cloned()
            .collect();
        let expected = expected_directories(&here, &root.host_path);
        let entries = read_root(root, &expected)?;
        let mut findings = classify(&entries, &expected, SystemTime::now());
        // A volume being removed has no directory on purpose: it is not lost.
        findings.lost.retain(|name| {
            here.iter()
                .find(|pv| pv.name_any() == *name)
                .is_none_or(|pv| {
                    reclaim::disposal(pv) == Disposal::Keep && !reuse_pending(pv, &here)
                })
        });
        out.push((root.clone(), findings));
    }
    Ok(out)
}

/// A PV made by `hostvol reuse` whose directory is still under its source PV's name (the source
/// PV goes last): not lost, the reuse finishes it.
fn reuse_pending(pv: &PersistentVolume, here: &[Arc<PersistentVolume>]) -> bool {
    pv.annotations()
        .get(crate::domain::reuse::ANN_REUSED_FROM)
        .is_some_and(|source| here.iter().any(|other| other.name_any() == *source))
}

/// At start-up and every `every`: update the metrics and warn once on each lost PV.
pub async fn run(ctx: Arc<Context>, every: Duration, shutdown: CancellationToken) {
    let mut warned: HashSet<String> = HashSet::new();
    if !store_ready(&ctx.volumes).await {
        return;
    }
    loop {
        // Adoptions a crash interrupted (`hostvol reuse --directory`) are finished before the scan, so
        // their directories are not reported as orphans again.
        crate::controller::adoption::finish_interrupted(&ctx).await;
        match scan(&ctx).await {
            Ok(per_root) => {
                let findings = Findings {
                    orphans: per_root
                        .iter()
                        .flat_map(|(_, f)| f.orphans.clone())
                        .collect(),
                    lost: per_root.iter().flat_map(|(_, f)| f.lost.clone()).collect(),
                };
                ctx.metrics
                    .orphan_directories
                    .set(findings.orphans.len() as i64);
                ctx.metrics.lost_volumes.set(findings.lost.len() as i64);
                debug!(
                    orphans = findings.orphans.len(),
                    lost = findings.lost.len(),
                    "orphan scan"
                );
                for name in &findings.lost {
                    if !warned.insert(name.clone()) {
                        continue;
                    }
                    let Some(pv) = ctx.volumes.get(&ObjectRef::new(name)) else {
                        continue;
                    };
                    let path = pv::source_path(&pv).unwrap_or_default().to_string();
                    warn!(pv = %name, %path, "volume directory is missing");
                    ctx.publish(&pv.object_ref(&()), EventType::Warning, "VolumeDirectoryMissing", "Check", format!(
                        "directory {path} of this volume is missing on node {}; pods using it will fail to start \
                         (the kubelet refuses a missing directory); restore it from a backup or delete the claim and the PV",
                        ctx.settings.node));
                }
                warned.retain(|n| findings.lost.contains(n));
            }
            Err(error) => warn!(%error, "cannot scan the data root for orphans"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
