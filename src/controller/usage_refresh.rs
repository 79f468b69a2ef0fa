//! Keeps the usage cache of this node's volumes current: every volume every `every`, new volumes as
//! soon as they appear, all off the request path.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::controller::context::Context;
use crate::controller::pv;
use crate::node::usage::{self, UsageCache};

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
        let keep: HashSet<String> = volumes
            .iter()
            .filter_map(|pv| pv::directory_name(pv))
            .collect();
        let full = tokio::time::Instant::now() >= next_full;
        if full {
            next_full = tokio::time::Instant::now() + every;
        }
        for root in ctx.roots().all() {
            let todo: Vec<String> = volumes
                .iter()
                .filter(|pv| pv::data_root(pv) == root.name)
                .filter_map(|pv| pv::directory_name(pv))
                .filter(|d| full || cache.get(d).is_none())
                .collect();
            if !todo.is_empty() {
                let (measured, took) =
                    usage::refresh(root.store.root_handle(), todo, &cache, concurrency).await;
                debug!(root = %root.name, measured, full, millis = took.as_millis() as u64, "usage refreshed");
            }
        }
        cache.retain(&keep);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_full) => {}
            _ = ctx.volumes_changed.notified() => {}
        }
    }
}
