//! `hostvol agent`: wires the provisioning controller, the HTTP endpoints and the gRPC node service
//! to one shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::args::AgentArgs;
use crate::controller::capacity::NodeFigures;
use crate::controller::context::{Context, Settings};
use crate::controller::events::{EventRecorder, Reporter};
use crate::controller::metrics::Metrics;
use crate::controller::supervisor::{Rule, Supervisor};
use crate::controller::watch_backoff::ApiProbe;
use crate::controller::{
    api_health, capacity, config_map, limits, node_loss, orphan_report, storage_capacity,
    usage_refresh, watches,
};
use crate::domain::params::DEFAULT_ROOT;
use crate::node::roots::{Root, RootSet, RootSpec};
use crate::node::usage::UsageCache;
use crate::node::volume_store::{self, VolumeStore};
use crate::service::{http, node_service};
use crate::shutdown;

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
    #[error(
        "--node-loss-cleanup needs RBAC the base deploy/ does not grant (missing: {missing}); apply the kustomize component {component} with it, or drop the flag"
    )]
    NodeLossRbac {
        missing: String,
        component: &'static str,
    },
    #[error("{0}")]
    Stopped(&'static str),
}

/// Runs the agent until SIGTERM/SIGINT: the controllers first, then every task on one shutdown signal.
pub async fn run(args: AgentArgs) -> Result<(), StartupError> {
    if args.node_name.trim().is_empty() {
        return Err(StartupError::Invalid(
            "--node-name (NODE_NAME) is empty; set it from spec.nodeName".into(),
        ));
    }
    // Failpoints from FAILPOINTS (tests only; compiled out of the image).
    let _failpoints = fail::FailScenario::setup();
    // The flags' root must be there even when a ConfigMap configures others: a clear start-up error.
    VolumeStore::open(&args.data_root)?;
    let client = Client::try_default().await?;
    if args.node_loss_cleanup {
        let missing = node_loss::missing_access(&client, &args.pod_namespace).await?;
        if !missing.is_empty() {
            return Err(StartupError::NodeLossRbac {
                missing: missing.join(", "),
                component: node_loss::COMPONENT,
            });
        }
    }
    let source = config_source(&args);
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
    let (http_listener, grpc_listeners) = bind(&args).await?;

    let settings = Settings {
        node: args.node_name.clone(),
        provisioner: args.provisioner.clone(),
        pod: args
            .pod_name
            .clone()
            .map(|name| (args.pod_namespace.clone(), name)),
    };
    info!(
        node = %settings.node,
        provisioner = %settings.provisioner,
        data_root = %args.data_root.display(),
        roots = ?roots.names(),
        "starting agent"
    );
    for root in roots.all() {
        info!(
            root = %root.name,
            path = %root.host_path,
            quota_mode = %root.quotas.mode,
            quota = root.quotas.enforcement.label(),
            "{}",
            root.quotas.enforcement.describe()
        );
    }
    let capacity_api = storage_capacity::discover(&client)
        .await
        .map(|r| (r, args.pod_namespace.clone()));
    let metrics = Arc::new(Metrics::default());
    let events = Arc::new(EventRecorder::new(reporter(&args)));
    let capacity_resource = capacity_api.as_ref().map(|(r, _)| r.clone());
    let supervisor = Supervisor::new(metrics.clone(), shutdown.clone());
    let api = ApiProbe::new(client.clone());
    supervisor.spawn("api-probe", Rule::Vital, {
        let (api, shutdown) = (api.clone(), shutdown.clone());
        move || api.clone().run(shutdown.clone())
    });
    let (watches, ctx, controllers) = watches::start(
        client.clone(),
        settings,
        capacity_api,
        roots,
        watches::Wiring {
            events,
            metrics: metrics.clone(),
            api,
            supervisor: supervisor.clone(),
        },
        shutdown.clone(),
    );

    let ready = Arc::new(AtomicBool::new(false));
    let http_task = tokio::spawn(http::serve(
        http_listener,
        ready.clone(),
        supervisor.health(),
        metrics,
        shutdown.clone(),
    ));
    let (usage, figures) = spawn_background_tasks(
        &supervisor,
        &args,
        &ctx,
        client.clone(),
        source,
        capacity_resource,
        &shutdown,
    );
    let grpc_task = tokio::spawn(node_service::serve(
        grpc_listeners,
        ctx.clone(),
        usage,
        figures,
        shutdown.clone(),
    ));
    let watches = Arc::new(watches);
    supervisor.spawn("readiness", Rule::Restart, {
        let (node, shutdown) = (args.node_name.clone(), shutdown.clone());
        let ctx = ctx.clone();
        move || {
            let (watches, ready, node, shutdown) = (
                watches.clone(),
                ready.clone(),
                node.clone(),
                shutdown.clone(),
            );
            let ctx = ctx.clone();
            async move {
                if watches.wait_until_ready().await {
                    if !ready.swap(true, Ordering::AcqRel) {
                        info!("watches synced; ready");
                    }
                    // From now on ready only while the API server answers.
                    api_health::track(ctx.client.clone(), ctx.api.clone(), node, ready, shutdown)
                        .await;
                } else {
                    warn!("a watch ended before syncing");
                }
            }
        }
    });

    // The servers own their listeners, bound once: one that stops early ends the agent on purpose
    // (the kubelet restarts it) instead of leaving it up without its node service or probes.
    let (mut grpc_task, mut http_task) = (Some(grpc_task), Some(http_task));
    let mut controllers = std::pin::pin!(controllers);
    let mut controllers_done = false;
    // A server ending after the shutdown signal is the normal end, not a death.
    let died = tokio::select! {
        _ = &mut controllers => {
            controllers_done = true;
            None
        }
        joined = grpc_task.as_mut().expect("not taken yet") => {
            grpc_task = None;
            report_end("gRPC", joined);
            (!shutdown.is_cancelled()).then_some("the gRPC node service stopped")
        }
        joined = http_task.as_mut().expect("not taken yet") => {
            http_task = None;
            report_end("HTTP", joined);
            (!shutdown.is_cancelled())
                .then_some("the HTTP server (/healthz, /readyz, /metrics) stopped")
        }
    };
    if let Some(what) = died {
        error!("{what} while the agent runs; stopping the agent so that it is restarted");
    }
    shutdown.cancel();
    if !controllers_done {
        controllers.await;
    }
    info!("controller stopped; in-flight provisioning finished");
    supervisor.join().await;
    if let Some(task) = grpc_task {
        report_end("gRPC", task.await);
    }
    if let Some(task) = http_task {
        report_end("HTTP", task.await);
    }
    match died {
        Some(what) => Err(StartupError::Stopped(what)),
        None => Ok(()),
    }
}

/// Where the data roots come from: the hostvol ConfigMap, else the flags' single root.
fn config_source(args: &AgentArgs) -> config_map::Source {
    let fallback_args = args.clone();
    config_map::Source {
        namespace: args.pod_namespace.clone(),
        name: args.config_map.clone(),
        path_prefix: args.host_path_prefix.clone().unwrap_or_default(),
        fallback: Arc::new(move || {
            let a = &fallback_args;
            let spec = RootSpec {
                path: a.host_data_root(),
                reserved: a.reserved,
                cap: a.capacity_cap,
                require_mount_point: a.require_mount_point,
                quota: a.quota_mode,
            };
            let root = Root::open(DEFAULT_ROOT, &a.data_root, &spec).map_err(|e| e.to_string())?;
            Ok(RootSet::single(root))
        }),
    }
}

/// Binds the HTTP and gRPC listeners before anything starts, so a taken port is a start-up error.
async fn bind(
    args: &AgentArgs,
) -> Result<(tokio::net::TcpListener, node_service::Listeners), StartupError> {
    let http = http::bind(args.http_addr)
        .await
        .map_err(|source| StartupError::Listen {
            what: "HTTP",
            addr: args.http_addr.to_string(),
            source,
        })?;
    let grpc = node_service::bind(args.grpc_addr, &args.grpc_socket)
        .await
        .map_err(|source| StartupError::Listen {
            what: "gRPC",
            addr: args.grpc_addr.to_string(),
            source,
        })?;
    Ok((http, grpc))
}

fn reporter(args: &AgentArgs) -> Reporter {
    Reporter {
        controller: args.provisioner.clone(),
        instance: args
            .pod_name
            .clone()
            .unwrap_or_else(|| format!("hostvol-{}", args.node_name)),
        node: args.node_name.clone(),
    }
}

/// The agent's tasks beside the controllers, supervised; each ends on `shutdown`. Which are vital
/// (`/healthz` fails while they are down) is in the README ("Staying up"). Returns what the node
/// service reads: the usage cache and the node's capacity figures.
fn spawn_background_tasks(
    supervisor: &Supervisor,
    args: &AgentArgs,
    ctx: &Arc<Context>,
    client: Client,
    source: config_map::Source,
    capacity_resource: Option<kube::discovery::ApiResource>,
    shutdown: &CancellationToken,
) -> (UsageCache, tokio::sync::watch::Receiver<NodeFigures>) {
    let usage = UsageCache::default();
    let (figures_tx, figures) = tokio::sync::watch::channel(NodeFigures::default());
    let every_scan = Duration::from_secs(args.orphan_scan_seconds.max(1));
    supervisor.spawn("capacity", Rule::Vital, {
        let (ctx, threshold, shutdown) = (
            ctx.clone(),
            args.capacity_change_threshold,
            shutdown.clone(),
        );
        move || capacity::track(ctx.clone(), figures_tx.clone(), threshold, shutdown.clone())
    });
    supervisor.spawn("usage-refresh", Rule::Restart, {
        let (ctx, usage, shutdown) = (ctx.clone(), usage.clone(), shutdown.clone());
        let (every, concurrency) = (
            Duration::from_secs(args.usage_refresh_seconds.max(1)),
            args.usage_concurrency,
        );
        move || {
            usage_refresh::run(
                ctx.clone(),
                usage.clone(),
                every,
                concurrency,
                shutdown.clone(),
            )
        }
    });
    supervisor.spawn("config-map", Rule::Restart, {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        move || {
            config_map::watch(
                ctx.clone(),
                client.clone(),
                source.clone(),
                shutdown.clone(),
            )
        }
    });
    if args.node_loss_cleanup {
        supervisor.spawn("node-loss", Rule::Restart, {
            let (ctx, namespace, shutdown) =
                (ctx.clone(), args.pod_namespace.clone(), shutdown.clone());
            move || node_loss::run(ctx.clone(), namespace.clone(), shutdown.clone())
        });
    } else {
        info!(
            "node-loss clean-up is off (--node-loss-cleanup); classes' nodeLossCleanup is not acted on by this agent"
        );
    }
    supervisor.spawn("limits", Rule::Restart, {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        move || limits::keep(ctx.clone(), every_scan, shutdown.clone())
    });
    supervisor.spawn("orphan-report", Rule::Restart, {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        move || orphan_report::run(ctx.clone(), every_scan, shutdown.clone())
    });
    if capacity_resource.is_some() {
        supervisor.spawn("capacity-publisher", Rule::Vital, {
            let (ctx, figures, namespace, shutdown) = (
                ctx.clone(),
                figures.clone(),
                args.pod_namespace.clone(),
                shutdown.clone(),
            );
            move || {
                storage_capacity::run(
                    ctx.clone(),
                    figures.clone(),
                    capacity_resource.clone(),
                    namespace.clone(),
                    shutdown.clone(),
                )
            }
        });
    } else {
        warn!(
            "the API server serves no CSIStorageCapacity; capacity-aware scheduling is off (admission still refuses claims that do not fit)"
        );
    }
    (usage, figures)
}

fn report_end<E: std::fmt::Display>(
    what: &str,
    joined: Result<Result<(), E>, tokio::task::JoinError>,
) {
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "{what} server failed"),
        Err(e) => error!(error = %e, "{what} task panicked"),
    }
}
