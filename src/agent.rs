//! `hostvol agent`: wires the provisioning controller, the HTTP endpoints and the gRPC node service
//! to one shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::AgentArgs;
use crate::config_map;
use crate::metrics::Metrics;
use crate::node_service;
use crate::provisioner::{self, Settings};
use crate::roots::{self, Root, RootSet};
use crate::storage_capacity;
use crate::usage::UsageCache;
use crate::volume_store::{self, VolumeStore};
use crate::{http, shutdown};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    DataRoot(#[from] volume_store::Error),
    #[error("cannot reach the Kubernetes API (set KUBECONFIG or run in a pod): {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub async fn run(args: AgentArgs) -> Result<(), StartupError> {
    if args.node_name.trim().is_empty() {
        return Err(StartupError::Invalid(
            "--node-name (NODE_NAME) is empty; set it from spec.nodeName".into(),
        ));
    }
    // The flags' root must be there even when a ConfigMap configures others: a clear start-up error.
    VolumeStore::open(&args.data_root)?;
    let client = Client::try_default().await?;
    let fallback_args = args.clone();
    let source = config_map::Source {
        namespace: args.pod_namespace.clone(),
        name: args.config_map.clone(),
        path_prefix: args.host_path_prefix.clone().unwrap_or_default(),
        fallback: Arc::new(move || {
            let a = &fallback_args;
            let store = VolumeStore::open(&a.data_root).map_err(|e| e.to_string())?;
            Ok(RootSet::single(Root {
                name: roots::DEFAULT_ROOT.to_string(),
                store,
                host_path: a.host_data_root(),
                reserved: a.reserved,
                cap: a.capacity_cap,
                require_mount_point: a.require_mount_point,
            }))
        }),
    };
    let roots = match config_map::initial(&client, &args.node_name, &source).await {
        Ok(roots) => roots,
        Err(why) => {
            error!(
                "ignoring the hostvol configuration at start-up, using the flags' data root: {why}"
            );
            (source.fallback)().map_err(StartupError::Invalid)?
        }
    };
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let http_listener =
        http::bind(args.http_addr)
            .await
            .map_err(|source| StartupError::Listen {
                what: "HTTP",
                addr: args.http_addr.to_string(),
                source,
            })?;

    let grpc_listeners = node_service::bind(args.grpc_addr, &args.grpc_socket)
        .await
        .map_err(|source| StartupError::Listen {
            what: "gRPC",
            addr: args.grpc_addr.to_string(),
            source,
        })?;

    let reporter = Reporter {
        controller: args.provisioner.clone(),
        instance: Some(
            args.pod_name
                .clone()
                .unwrap_or_else(|| format!("hostvol-{}", args.node_name)),
        ),
    };
    let settings = Settings {
        node: args.node_name.clone(),
        provisioner: args.provisioner.clone(),
    };
    info!(
        node = %settings.node,
        provisioner = %settings.provisioner,
        data_root = %args.data_root.display(),
        roots = ?roots.names(),
        "starting agent"
    );
    let capacity_api = storage_capacity::discover(&client)
        .await
        .map(|r| (r, args.pod_namespace.clone()));
    let client_for_config = client.clone();
    let (watches, ctx, controller) = provisioner::start(
        client.clone(),
        settings,
        capacity_api,
        roots,
        Recorder::new(client, reporter),
        metrics.clone(),
        shutdown.clone(),
    );

    let http_task = tokio::spawn(http::serve(
        http_listener,
        ready.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let usage = UsageCache::default();
    let (reports_tx, reports) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(node_service::publish_capacity(
        ctx.clone(),
        reports_tx,
        args.capacity_change_threshold,
        shutdown.clone(),
    ));
    tokio::spawn(node_service::refresh_usage(
        ctx.clone(),
        usage.clone(),
        std::time::Duration::from_secs(args.usage_refresh_seconds.max(1)),
        args.usage_concurrency,
        shutdown.clone(),
    ));
    tokio::spawn(config_map::watch(
        ctx.clone(),
        client_for_config,
        source,
        shutdown.clone(),
    ));
    tokio::spawn(crate::node_loss::run(
        ctx.clone(),
        args.pod_namespace.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::orphans::run(
        ctx.clone(),
        std::time::Duration::from_secs(args.orphan_scan_seconds.max(1)),
        shutdown.clone(),
    ));
    tokio::spawn(storage_capacity::run(
        ctx.clone(),
        reports.clone(),
        args.pod_namespace.clone(),
        args.pod_name.clone(),
        shutdown.clone(),
    ));
    let grpc_task = tokio::spawn(node_service::serve(
        grpc_listeners,
        ctx.clone(),
        usage,
        reports,
        shutdown.clone(),
    ));
    let readiness = {
        let ready = ready.clone();
        tokio::spawn(async move {
            if watches.wait_until_ready().await {
                ready.store(true, Ordering::Release);
                info!("watches synced; ready");
            } else {
                warn!("a watch ended before syncing");
            }
        })
    };

    controller.await;
    info!("controller stopped; in-flight provisioning finished");
    shutdown.cancel();
    readiness.abort();
    match grpc_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "gRPC server failed"),
        Err(e) => error!(error = %e, "gRPC task panicked"),
    }
    match http_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "HTTP server failed"),
        Err(e) => error!(error = %e, "HTTP task panicked"),
    }
    Ok(())
}
