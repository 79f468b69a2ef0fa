//! Keeps every volume's recorded size limit in force: at start-up (a crash may have lost a limit the
//! filesystem had not committed yet) and then periodically (a limit changed by hand is put back).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
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
        // Expansion raises limits under this lock: never put back a size it is replacing.
        let admission = ctx.admission_lock.lock().await;
        let todo: Vec<(String, String, u64)> = ctx
            .volumes
            .state()
            .iter()
            .filter(|v| v.annotations().contains_key(pv::ANN_QUOTA))
            .filter(|v| ownership::may_touch(&ctx, v, "size limit"))
            .filter_map(|v| {
                let directory = pv::directory_name(v)?;
                Some((pv::data_root(v).to_string(), directory, ctx.volume_bytes(v)))
            })
            .collect();
        let roots = ctx.roots();
        let checked = tokio::task::spawn_blocking(move || {
            let mut checked = 0usize;
            for (root_name, directory, bytes) in todo {
                let Some(root) = roots.get(&root_name) else {
                    continue;
                };
                let handle = root.store.root_handle();
                match root.quotas.reapply(handle.as_fd(), &directory, bytes) {
                    Ok(_) => checked += 1,
                    Err(error) => {
                        warn!(root = %root_name, %directory, %error, "cannot put the volume's size limit back")
                    }
                }
            }
            checked
        })
        .await
        .unwrap_or(0);
        drop(admission);
        debug!(volumes = checked, "size limits in force");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
