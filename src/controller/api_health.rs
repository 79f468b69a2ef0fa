//! Whether the agent can still read from the API server after its watches first synced, for `/readyz`.
//!
//! The watches retry on their own with backoff; while they cannot list, the agent works from stale
//! caches and provisions nothing new, and `/readyz` says so. One small read every
//! [`CHECK_INTERVAL`]: this node's Node object, metadata only, the object the agent watches anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::watch_backoff::ApiProbe;

/// How often readiness is re-checked: a kubelet's default readiness period. One GET per agent per
/// interval (500/s at 5,000 nodes; see docs/scale.md).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// A read slower than this counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps `ready` equal to "the last read of this node's Node object succeeded", until `shutdown`.
/// Logs each change once.
pub async fn track(
    client: Client,
    api: Arc<ApiProbe>,
    node: String,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client);
    let mut interval = tokio::time::interval(CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        // While the shared probe knows the API server is away, no request of our own (one attempt
        // per probe interval per agent in all).
        let outcome = if !api.is_up() {
            Err("the API server does not answer".to_string())
        } else {
            match tokio::time::timeout(CHECK_TIMEOUT, nodes.get_metadata_opt(&node)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => {
                    api.failed();
                    Err(error.to_string())
                }
                Err(_) => {
                    api.failed();
                    Err(format!("no answer within {CHECK_TIMEOUT:?}"))
                }
            }
        };
        let was = ready.swap(outcome.is_ok(), Ordering::AcqRel);
        match outcome {
            Ok(()) if !was => info!("the API server answers again; ready"),
            Err(error) if was => {
                warn!(%error, "cannot read from the API server; not ready until it answers")
            }
            _ => {}
        }
    }
}
