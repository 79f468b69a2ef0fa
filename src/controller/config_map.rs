//! Per-node data roots from the `hostvol-config` ConfigMap, re-read when it changes without a restart.
//! An invalid change is rejected with one clear log line and the last good configuration stays.

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::controller::context::Context;
use crate::node::roots::{self, RootSet};

/// Where the configuration lives and how to build the roots when it says nothing for this node.
#[derive(Clone)]
pub struct Source {
    pub namespace: String,
    pub name: String,
    /// Where node paths appear inside the agent's container.
    pub path_prefix: PathBuf,
    /// The roots from the flags, used without a ConfigMap (or without an entry for this node).
    pub fallback: Arc<dyn Fn() -> Result<RootSet, String> + Send + Sync>,
}

/// The roots for `node` from the ConfigMap's text (None: the ConfigMap gives this node none).
pub fn roots_from(
    config_map: Option<&ConfigMap>,
    node: &str,
    source: &Source,
) -> Result<RootSet, String> {
    let text = config_map
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get(roots::CONFIG_KEY));
    match text
        .map(|t| roots::parse_config(t, node))
        .transpose()?
        .flatten()
    {
        Some(specs) => RootSet::open(&specs, &source.path_prefix),
        None => (source.fallback)(),
    }
}

/// Reads the ConfigMap once, for start-up. A missing ConfigMap means the flags' root.
pub async fn initial(client: &Client, node: &str, source: &Source) -> Result<RootSet, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &source.namespace);
    let cm = api.get_opt(&source.name).await.map_err(|e| {
        format!(
            "cannot read ConfigMap {}/{}: {e}",
            source.namespace, source.name
        )
    })?;
    roots_from(cm.as_ref(), node, source)
}

/// Applies every later change of the ConfigMap (narrow watch: that one object).
pub async fn watch(ctx: Arc<Context>, client: Client, source: Source, shutdown: CancellationToken) {
    let api: Api<ConfigMap> = Api::namespaced(client, &source.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", source.name));
    let mut events = std::pin::pin!(crate::controller::watch_backoff::probed(
        watcher(api, config),
        ctx.api.clone()
    ));
    let mut current: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event { Some(e) => e, None => return },
        };
        let cm = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => Some(cm),
            Ok(watcher::Event::Delete(_)) => None,
            Ok(_) => continue,
            Err(error) => {
                error!(%error, "watch of the hostvol configuration failed; retrying");
                continue;
            }
        };
        let text = cm
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(roots::CONFIG_KEY).cloned());
        if text == current && cm.is_some() {
            continue;
        }
        match roots_from(cm.as_ref(), &ctx.settings.node, &source) {
            Ok(set) => {
                info!(roots = ?set.names(), configmap = %cm.as_ref().map(|c| c.name_any()).unwrap_or_default(), "data roots configured");
                for root in set.all() {
                    info!(root = %root.name, quota_mode = %root.quotas.mode, quota = root.quotas.enforcement.label(), "{}", root.quotas.enforcement.describe());
                }
                ctx.replace_roots(set);
                current = text;
            }
            Err(why) => error!(
                configmap = %format!("{}/{}", source.namespace, source.name),
                "rejected the new hostvol configuration, keeping the last good one: {why}"
            ),
        }
    }
}
