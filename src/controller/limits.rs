//! Keeps every volume's recorded size limit in force: at start-up (a crash may have lost a limit the
//! filesystem had not committed yet) and then periodically (a limit changed by hand is put back).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::context::Context;
use crate::controller::store::store_ready;
use crate::controller::{ownership, pv};

pub async fn keep(ctx: Arc<Context>, every: Duration, shutdown: CancellationToken) {
    if !store_ready(&ctx.volumes).await {
        return;
    }
    loop {
        let names: Vec<String> = ctx
            .volumes
            .state()
            .iter()
            .filter(|v| v.annotations().contains_key(pv::ANN_QUOTA))
            .filter(|v| ownership::may_touch(&ctx, v, "size limit"))
            .map(|v| v.name_any())
            .collect();
        let mut checked = 0usize;
        for name in names {
            if shutdown.is_cancelled() {
                return;
            }
            if put_back(&ctx, &name).await {
                checked += 1;
            }
        }
        debug!(volumes = checked, "size limits in force");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Puts one volume's limit back, under that volume's lock only: an expansion raising this limit
/// finishes first (never put back a size it is replacing), and no other volume waits.
async fn put_back(ctx: &Context, name: &str) -> bool {
    let _volume = ctx.volume_locks.lock(name).await;
    // Read again under the lock: the size an expansion just recorded is the one to keep.
    let Some(volume) = ctx.volumes.get(&ObjectRef::new(name)) else {
        return false;
    };
    // The directory from the PV's immutable hostPath: an edited annotation redirects nothing.
    let Some((root, directory)) = ctx.volume_directory(&volume) else {
        return false;
    };
    let bytes = ctx.volume_bytes(&volume);
    let pv_name = name.to_string();
    let reapplied = tokio::task::spawn_blocking(move || {
        let handle = root.store.root_handle();
        root.quotas
            .reapply_volume(handle.as_fd(), &directory, &pv_name, bytes)
            .map_err(|error| (root.name.clone(), directory, error))
    })
    .await;
    match reapplied {
        Ok(Ok(_)) => true,
        Ok(Err((root, directory, error))) => {
            warn!(pv = %name, %root, %directory, %error, "cannot put the volume's size limit back");
            false
        }
        Err(error) => {
            warn!(pv = %name, %error, "size limit task failed");
            false
        }
    }
}
