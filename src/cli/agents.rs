//! Finding the agents and reaching their node service: through the API server (port-forward to the
//! agent pod's loopback, so Kubernetes RBAC decides who may look), straight to a pod IP, or one
//! address given by hand.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cli::args::{ReportArgs, Via};
use crate::service::grpc::v1::node_client::NodeClient;

/// Label selector of the agent pods shipped in deploy/daemonset.yaml.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=hostvol,app.kubernetes.io/component=agent";
const DEFAULT_GRPC_PORT: u16 = 9809;
/// The shipped ClusterRole that lets people look (see deploy/user-roles.yaml).
const VIEWER_ROLE: &str = "hostvol-viewer";

/// Where a node service listens, for a direct connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    /// `unix:/path`, `unix:///path`, a path starting with `/`, or `host:port`.
    pub fn parse(s: &str) -> Address {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            Address::Unix(PathBuf::from(path))
        } else if s.starts_with('/') {
            Address::Unix(PathBuf::from(s))
        } else {
            Address::Tcp(s.trim_start_matches("http://").to_string())
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => f.write_str(a),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How to reach one agent.
#[derive(Clone)]
pub enum Route {
    Direct(Address),
    /// A port of an agent pod, through the API server and the pod's kubelet.
    PortForward {
        // Boxed: a client is much larger than an address, and routes are kept per agent.
        pods: Box<Api<Pod>>,
        pod: String,
        port: u16,
    },
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Direct(address) => address.fmt(f),
            Route::PortForward { pod, port, .. } => write!(f, "pod/{pod}:{port}"),
        }
    }
}

/// One agent to ask: its node, and how to reach it (or why it cannot be asked).
#[derive(Clone)]
pub struct Target {
    pub node: String,
    pub route: Result<Route, String>,
}

impl Target {
    /// The route as the reports show it (empty when there is none).
    pub fn endpoint(&self) -> String {
        self.route
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    pub async fn connect(&self, timeout: Duration) -> Result<NodeClient<Channel>, String> {
        match self.route.as_ref().map_err(Clone::clone)? {
            Route::Direct(address) => connect(address, timeout).await,
            Route::PortForward { pods, pod, port } => {
                connect_forwarded((**pods).clone(), pod.clone(), *port, timeout).await
            }
        }
    }
}

/// Connects straight to `address`.
pub async fn connect(address: &Address, timeout: Duration) -> Result<NodeClient<Channel>, String> {
    let channel = match address {
        Address::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {}", root_cause(&e)))?,
        Address::Unix(path) => {
            let path = path.clone();
            // The URI is ignored: the connector always dials the socket.
            Endpoint::from_static("http://localhost")
                .timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| format!("cannot connect to {address}: {}", root_cause(&e)))?
        }
    };
    Ok(NodeClient::new(channel))
}

/// Connects to `port` on the loopback of agent pod `pod` through the API server: each connection
/// the channel makes is a new port-forward stream.
async fn connect_forwarded(
    pods: Api<Pod>,
    pod: String,
    port: u16,
    timeout: Duration,
) -> Result<NodeClient<Channel>, String> {
    let target = pod.clone();
    let channel = Endpoint::from_static("http://agent")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move {
                let mut forwarder = pods
                    .portforward(&pod, &[port])
                    .await
                    .map_err(|e| std::io::Error::other(forward_refusal(&e, &pod)))?;
                let stream = forwarder.take_stream(port).ok_or_else(|| {
                    std::io::Error::other(format!("no port-forward stream for port {port}"))
                })?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("cannot reach pod/{target}:{port}: {}", root_cause(&e)))?;
    Ok(NodeClient::new(channel))
}

/// Why a port-forward was refused, in words that say what to do about it.
fn forward_refusal(error: &kube::Error, pod: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: you may not port-forward to {pod} (needs `pods/portforward` in the agents' \
             namespace: bind the {VIEWER_ROLE} ClusterRole there, see deploy/user-roles.yaml)"
        ),
        other => other.to_string(),
    }
}

fn forbidden_to_list(error: &kube::Error, namespace: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: you may not list the agent pods in {namespace} (bind the {VIEWER_ROLE} \
             ClusterRole in {namespace}, see deploy/user-roles.yaml)"
        ),
        other => format!("cannot list agent pods in {namespace}: {other}"),
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Finds the agents: one per agent pod of the DaemonSet, reached as `via` says on its `grpc` port.
pub async fn discover(client: &Client, namespace: &str, via: Via) -> Result<Vec<Target>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(|e| forbidden_to_list(&e, namespace))?;
    let mut targets: Vec<Target> = list
        .items
        .iter()
        .map(|pod| Target {
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| format!("<unscheduled {}>", pod.name_any())),
            route: route_to(pod, &pods, via),
        })
        .collect();
    targets.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(targets)
}

fn route_to(pod: &Pod, pods: &Api<Pod>, via: Via) -> Result<Route, String> {
    let status = pod.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Running") {
        return Err(format!(
            "agent pod {} is {}",
            pod.name_any(),
            status.phase.as_deref().unwrap_or("Unknown")
        ));
    }
    let port = grpc_port(pod);
    match via {
        Via::PortForward => Ok(Route::PortForward {
            pods: Box::new(pods.clone()),
            pod: pod.name_any(),
            port,
        }),
        Via::PodIp => match status.pod_ip.filter(|ip| !ip.is_empty()) {
            Some(ip) if ip.contains(':') => {
                Ok(Route::Direct(Address::Tcp(format!("[{ip}]:{port}"))))
            }
            Some(ip) => Ok(Route::Direct(Address::Tcp(format!("{ip}:{port}")))),
            None => Err(format!("agent pod {} has no IP yet", pod.name_any())),
        },
    }
}

/// The container port named `grpc`, else the default.
fn grpc_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_GRPC_PORT)
}

/// The agents a report asks: the one `--endpoint`, else every agent pod in the cluster.
pub async fn targets(args: &ReportArgs) -> Result<Vec<Target>, String> {
    if let Some(endpoint) = &args.endpoint {
        return Ok(vec![Target {
            node: String::new(),
            route: Ok(Route::Direct(Address::parse(endpoint))),
        }]);
    }
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster (check KUBECONFIG): {e}"))?;
    let found = discover(&client, &args.namespace, args.via).await?;
    if found.is_empty() {
        return Err(format!(
            "no hostvol agents found in namespace {} (label {AGENT_SELECTOR}); is hostvol deployed?",
            args.namespace
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let cases = [
            ("127.0.0.1:9809", Address::Tcp("127.0.0.1:9809".into())),
            ("http://node:9809", Address::Tcp("node:9809".into())),
            (
                "unix:///run/hostvol/hostvol.sock",
                Address::Unix("/run/hostvol/hostvol.sock".into()),
            ),
            (
                "/run/hostvol/hostvol.sock",
                Address::Unix("/run/hostvol/hostvol.sock".into()),
            ),
        ];
        for (text, address) in cases {
            assert_eq!(Address::parse(text), address, "{text}");
        }
    }

    #[test]
    fn the_grpc_port_comes_from_the_named_container_port() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "hostvol", "ports": [
                {"name": "http", "containerPort": 9808},
                {"name": "grpc", "containerPort": 19809}]}]}
        }))
        .unwrap();
        assert_eq!(grpc_port(&pod), 19809);
        assert_eq!(grpc_port(&Pod::default()), DEFAULT_GRPC_PORT);
    }
}
