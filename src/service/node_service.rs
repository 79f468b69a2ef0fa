//! The gRPC node service (`hostvol.v1.Node`), with the standard health service and reflection,
//! served on TCP and on a Unix socket.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::controller::adoption::{self, Failure};
use crate::controller::capacity::{self, NodeFigures, RootFigures};
use crate::controller::context::{Context, holding_root};
use crate::controller::{orphan_report, pv, reuse};
use crate::domain::quantity;
use crate::node::orphans;
use crate::node::roots::RootSet;
use crate::node::usage::UsageCache;
use crate::service::grpc::v1::node_server::{Node, NodeServer};
use crate::service::grpc::v1::{
    CapacityReport, GetCapacityRequest, GetVolumeRequest, ListOrphansRequest, ListOrphansResponse,
    ListVolumesRequest, ListVolumesResponse, LostVolume, Orphan, ReuseVolumeRequest,
    ReuseVolumeResponse, RootCapacity, Volume, WatchCapacityRequest,
};

const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(10);

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn root_capacity(r: &RootFigures) -> RootCapacity {
    RootCapacity {
        name: r.name.clone(),
        data_root: r.data_root.clone(),
        filesystem_type: r.filesystem_type.clone(),
        total_bytes: r.total_bytes,
        available_bytes: r.available_bytes,
        used_bytes: r.used_bytes,
        total_inodes: r.total_inodes,
        free_inodes: r.free_inodes,
        allocated_bytes: r.allocated_bytes,
        reserved_bytes: r.reserved_bytes,
        cap_bytes: r.cap_bytes,
        allocatable_bytes: r.allocatable_bytes,
        volume_count: r.volume_count,
        problem: r.problem.clone(),
        quota: r.quota.clone(),
        quota_mode: r.quota_mode.clone(),
        quota_detail: r.quota_detail.clone(),
    }
}

/// The node's report: its primary root's figures at the top, and every root in `roots`.
fn capacity_report(figures: &NodeFigures) -> CapacityReport {
    let primary = &figures.primary;
    CapacityReport {
        node: figures.node.clone(),
        data_root: primary.data_root.clone(),
        filesystem_type: primary.filesystem_type.clone(),
        total_bytes: primary.total_bytes,
        available_bytes: primary.available_bytes,
        used_bytes: primary.used_bytes,
        total_inodes: primary.total_inodes,
        free_inodes: primary.free_inodes,
        used_inodes: primary.total_inodes.saturating_sub(primary.free_inodes),
        allocated_bytes: primary.allocated_bytes,
        reserved_bytes: primary.reserved_bytes,
        cap_bytes: primary.cap_bytes,
        allocatable_bytes: primary.allocatable_bytes,
        volume_count: primary.volume_count,
        observed_at: figures.observed_at.map(timestamp),
        roots: figures.roots.iter().map(root_capacity).collect(),
        quota: primary.quota.clone(),
        quota_mode: primary.quota_mode.clone(),
    }
}

/// The report from live figures.
fn current_report(ctx: &Context) -> CapacityReport {
    capacity_report(&capacity::node_figures(ctx))
}

fn describe_volume(pv: &PersistentVolume, usage: &UsageCache, roots: &RootSet) -> Volume {
    let spec = pv.spec.clone().unwrap_or_default();
    let claim = spec.claim_ref.unwrap_or_default();
    let measured = holding_root(roots, pv).and_then(|(r, d)| usage.get(&r.name, &d));
    Volume {
        pv_name: pv.name_any(),
        claim_namespace: claim.namespace.unwrap_or_default(),
        claim_name: claim.name.unwrap_or_default(),
        directory: pv::source_path(pv).unwrap_or_default().to_string(),
        capacity_bytes: spec
            .capacity
            .and_then(|c| {
                c.get("storage")
                    .and_then(|q| quantity::parse_bytes(&q.0).ok())
            })
            .unwrap_or(0),
        used_bytes: measured.map(|u| u.bytes),
        used_inodes: measured.and_then(|u| u.inodes),
        phase: pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        reclaim_policy: spec.persistent_volume_reclaim_policy.unwrap_or_default(),
        created_at: pv
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| prost_types::Timestamp {
                seconds: t.0.as_second(),
                nanos: t.0.subsec_nanosecond(),
            }),
        usage_measured_at: measured.map(|u| timestamp(u.measured_at)),
        storage_class: spec.storage_class_name.unwrap_or_default(),
    }
}

/// Checks the `pv_name` of a GetVolume request: a PersistentVolume name (lowercase letters, digits,
/// '-' and '.', at most 253), or `InvalidArgument` saying so.
pub fn requested_pv_name(name: &str) -> Result<(), Status> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{name:?} is not a PersistentVolume name"
        )))
    }
}

/// The longest gap between two reports of a WatchCapacity stream: `max_interval_seconds` clamped to
/// 1 s..1 h, 10 s when unset (0).
pub fn watch_interval(max_interval_seconds: u32) -> Duration {
    if max_interval_seconds == 0 {
        DEFAULT_WATCH_INTERVAL
    } else {
        Duration::from_secs(max_interval_seconds.clamp(1, 3600) as u64)
    }
}

pub struct NodeService {
    ctx: Arc<Context>,
    usage: UsageCache,
    reports: watch::Receiver<NodeFigures>,
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<CapacityReport, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn get_capacity(
        &self,
        _: Request<GetCapacityRequest>,
    ) -> Result<Response<CapacityReport>, Status> {
        Ok(Response::new(current_report(&self.ctx)))
    }

    async fn list_volumes(
        &self,
        _: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let mut volumes: Vec<Volume> = self
            .ctx
            .volumes
            .state()
            .iter()
            .map(|pv| describe_volume(pv, &self.usage, &self.ctx.roots()))
            .collect();
        volumes.sort_by(|a, b| a.pv_name.cmp(&b.pv_name));
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn get_volume(
        &self,
        request: Request<GetVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let name = request.into_inner().pv_name;
        requested_pv_name(&name)?;
        self.ctx
            .volumes
            .get(&kube::runtime::reflector::ObjectRef::new(&name))
            .map(|pv| Response::new(describe_volume(&pv, &self.usage, &self.ctx.roots())))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "node {} has no hostvol volume {name}",
                    self.ctx.settings.node
                ))
            })
    }

    async fn list_orphans(
        &self,
        _: Request<ListOrphansRequest>,
    ) -> Result<Response<ListOrphansResponse>, Status> {
        let mut orphans = Vec::new();
        let mut lost = Vec::new();
        for (root, findings) in orphan_report::scan(&self.ctx)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read a data root: {e}")))?
        {
            orphans.extend(findings.orphans.iter().map(|e| Orphan {
                name: e.name.clone(),
                path: pv::host_path(&root.host_path, &e.name),
                archived: orphans::is_archived(&e.name),
                modified_at: Some(timestamp(e.modified)),
                root: root.name.clone(),
            }));
            lost.extend(
                findings
                    .lost
                    .iter()
                    .filter_map(|name| {
                        self.ctx
                            .volumes
                            .get(&kube::runtime::reflector::ObjectRef::new(name))
                    })
                    .map(|pv| {
                        let v = describe_volume(&pv, &self.usage, &self.ctx.roots());
                        LostVolume {
                            pv_name: v.pv_name,
                            claim_namespace: v.claim_namespace,
                            claim_name: v.claim_name,
                            directory: v.directory,
                            phase: v.phase,
                        }
                    }),
            );
        }
        Ok(Response::new(ListOrphansResponse {
            orphans,
            lost,
            scanned_at: Some(timestamp(SystemTime::now())),
        }))
    }

    async fn reuse_volume(
        &self,
        request: Request<ReuseVolumeRequest>,
    ) -> Result<Response<ReuseVolumeResponse>, Status> {
        node_root_only(&request)?;
        let request = request.into_inner();
        let (namespace, claim) = (
            request.claim_namespace.as_str(),
            request.claim_name.as_str(),
        );
        if namespace.is_empty() || claim.is_empty() {
            return Err(Status::invalid_argument(
                "claim_namespace and claim_name are required",
            ));
        }
        let timeout = Duration::from_secs(match request.timeout_seconds {
            0 => 60,
            s => u64::from(s.min(3600)),
        });
        let ctx = &self.ctx;
        let adopted = match (request.pv_name.is_empty(), request.directory.is_empty()) {
            (false, true) => {
                requested_pv_name(&request.pv_name)?;
                let new = reuse::request(ctx, &request.pv_name, namespace, claim)
                    .await
                    .map_err(status)?;
                adoption::Adopted {
                    pv_name: new,
                    host_path: String::new(),
                }
            }
            (true, false) => {
                adoption::adopt(ctx, &request.root, &request.directory, namespace, claim)
                    .await
                    .map_err(status)?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give exactly one of pv_name (a Released PV) and directory (an orphan)",
                ));
            }
        };
        if !adoption::wait_bound(ctx, namespace, claim, &adopted.pv_name, timeout).await {
            return Err(Status::deadline_exceeded(format!(
                "volume {} is on its way to claim {namespace}/{claim} but not bound after {}s; \
                 see `kubectl describe pvc -n {namespace} {claim}`",
                adopted.pv_name,
                timeout.as_secs()
            )));
        }
        let directory = match adopted.host_path.is_empty() {
            false => adopted.host_path,
            true => ctx
                .volumes
                .get(&kube::runtime::reflector::ObjectRef::new(&adopted.pv_name))
                .and_then(|pv| pv::source_path(&pv).map(str::to_string))
                .unwrap_or_default(),
        };
        info!(pv = %adopted.pv_name, claim = %format!("{namespace}/{claim}"), %directory, "reuse through the node service done");
        Ok(Response::new(ReuseVolumeResponse {
            pv_name: adopted.pv_name,
            directory,
        }))
    }

    type WatchCapacityStream = ReportStream;

    async fn watch_capacity(
        &self,
        request: Request<WatchCapacityRequest>,
    ) -> Result<Response<ReportStream>, Status> {
        let interval = watch_interval(request.into_inner().max_interval_seconds);
        let mut reports = self.reports.clone();
        let ctx = self.ctx.clone();
        let stream = async_stream(move |tx| async move {
            reports.borrow_and_update();
            let first = current_report(&ctx);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut heartbeat =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                let next = tokio::select! {
                    changed = reports.changed() => match changed {
                        Ok(()) => capacity_report(&reports.borrow_and_update()),
                        Err(_) => return, // agent shutting down
                    },
                    _ = heartbeat.tick() => current_report(&ctx),
                };
                heartbeat.reset();
                if tx.send(Ok(next)).await.is_err() {
                    return; // subscriber went away
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Handing data to a claim is for whoever owns the node's disk: root on the node, through the Unix
/// socket (its peer credentials are the kernel's). Who may port-forward to the agent (the viewer
/// role) may only look.
fn node_root_only<T>(request: &Request<T>) -> Result<(), Status> {
    let peer = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    match peer {
        Some(cred) if cred.uid() == 0 => Ok(()),
        Some(cred) => Err(Status::permission_denied(format!(
            "reuse through the node service is for root on the node (uid {} asked)",
            cred.uid()
        ))),
        None => Err(Status::permission_denied(
            "reuse is served only on the node's Unix socket (/run/hostvol/hostvol.sock, as root on the node); \
             from elsewhere use `kubectl hostvol reuse PV --for NS/CLAIM` with the hostvol-purger role",
        )),
    }
}

fn status(failure: Failure) -> Status {
    match failure {
        Failure::Invalid(why) => Status::invalid_argument(why),
        Failure::NotFound(why) => Status::not_found(why),
        Failure::Refused(why) => Status::failed_precondition(why),
        Failure::Failed(why) => Status::unavailable(why),
    }
}

/// A stream fed by a task through a small channel; the task stops when the receiver is dropped.
fn async_stream<F, Fut>(producer: F) -> ReportStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<CapacityReport, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub struct Listeners {
    pub tcp: tokio::net::TcpListener,
    pub unix: Option<tokio::net::UnixListener>,
}

/// Binds the TCP port and, if possible, the Unix socket (a stale socket file from a previous run is
/// replaced; anything else at that path is left alone).
pub async fn bind(tcp: std::net::SocketAddr, socket: &Path) -> std::io::Result<Listeners> {
    let tcp = tokio::net::TcpListener::bind(tcp).await?;
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(socket)
        && meta.file_type().is_socket()
    {
        let _ = std::fs::remove_file(socket);
    }
    let unix = match tokio::net::UnixListener::bind(socket) {
        Ok(listener) => Some(listener),
        Err(error) => {
            warn!(socket = %socket.display(), %error, "node service not available on the Unix socket");
            None
        }
    };
    Ok(Listeners { tcp, unix })
}

/// Accepted TCP connections with TCP_NODELAY: tonic ignores its own nodelay setting for a custom
/// incoming stream, and without it small replies wait ~40 ms for the peer's delayed ACK.
fn tcp_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
}

/// Serves the node service, health and reflection until `shutdown`.
pub async fn serve(
    listeners: Listeners,
    ctx: Arc<Context>,
    usage: UsageCache,
    reports: watch::Receiver<NodeFigures>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServer<NodeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::service::grpc::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptors are valid");
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::service::grpc::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptors are valid");
    let node = NodeServer::new(NodeService {
        ctx,
        usage,
        reports,
    });
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(node);
    info!(addr = ?listeners.tcp.local_addr().ok(), unix = listeners.unix.is_some(), "node service listening");
    match listeners.unix {
        Some(unix) => {
            let tcp = router.clone().serve_with_incoming_shutdown(
                tcp_incoming(listeners.tcp),
                shutdown.clone().cancelled_owned(),
            );
            let unix = router.serve_with_incoming_shutdown(
                UnixListenerStream::new(unix),
                shutdown.cancelled_owned(),
            );
            let (a, b) = tokio::join!(tcp, unix);
            a.and(b)
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    tcp_incoming(listeners.tcp),
                    shutdown.cancelled_owned(),
                )
                .await
        }
    }
}
