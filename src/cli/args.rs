//! Command-line flags, each with an environment fallback so the DaemonSet can set them from the pod spec.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::quantity;
use crate::domain::quota::QuotaMode;

#[derive(Debug, Parser)]
#[command(
    name = "hostvol",
    version,
    about = "Node-local hostPath volumes for Kubernetes, provisioned by a per-node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up: the size of the agent's flags does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the per-node agent (what the DaemonSet runs).
    Agent(AgentArgs),
    /// What every node can still hold: one row per node, with a total.
    Capacity(ReportArgs),
    /// Volumes with the space they use against their capacity.
    Volumes(VolumesArgs),
    /// Remove a released (Retain) volume for good: its directory on its node, then its PV.
    Purge(PurgeArgs),
    /// Give the data of a released (Retain) volume to a new claim: `reuse PV --for NAMESPACE/CLAIM`.
    Reuse(ReuseArgs),
    /// Orphaned directories and lost volumes on every node. Reports only; deletes nothing.
    Doctor(ReportArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// The PersistentVolume to purge.
    pub pv: String,

    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// Seconds to wait for the node's agent to finish.
    #[arg(long = "timeout", default_value_t = 60)]
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ReuseArgs {
    /// The Released PersistentVolume whose data to reuse.
    #[arg(required_unless_present = "directory", conflicts_with = "directory")]
    pub pv: Option<String>,

    /// An orphaned directory instead (as `hostvol doctor` lists it, relative to its data root), on
    /// the node whose agent `--endpoint` reaches: as root on that node, through its Unix socket.
    #[arg(long)]
    pub directory: Option<String>,

    /// The orphan's data root (`hostvol doctor` shows it).
    #[arg(long, default_value = "default", requires = "directory")]
    pub root: String,

    /// Ask one agent's node service instead of marking the PV through the API server:
    /// `unix:/run/hostvol/hostvol.sock` as root on the node (the only place it is served).
    /// Default with `--directory`: that socket.
    #[arg(long, env = "HOSTVOL_ENDPOINT")]
    pub endpoint: Option<String>,

    /// The claim (`NAMESPACE/NAME`, Pending, of a hostvol class, asking for the data's size) that gets it.
    #[arg(long = "for", value_name = "NAMESPACE/CLAIM")]
    pub claim: String,

    /// Seconds to wait for the node's agent to finish.
    #[arg(long = "timeout", default_value_t = 60)]
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Ask one agent directly instead of finding them in the cluster: host:port or unix:/path.
    #[arg(long, env = "HOSTVOL_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Namespace of the hostvol agents.
    #[arg(
        long,
        short = 'n',
        env = "HOSTVOL_NAMESPACE",
        default_value = "hostvol-system"
    )]
    pub namespace: String,

    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Seconds to wait for each agent.
    #[arg(long = "timeout", default_value_t = 5)]
    pub timeout_seconds: u64,

    /// How to reach the agents found in the cluster: through the API server (`port-forward`, needs
    /// `pods/portforward` in the agents' namespace), or straight to each pod's IP (`pod-ip`, only for
    /// agents started with a reachable `--grpc-addr`).
    #[arg(long, env = "HOSTVOL_VIA", value_enum, default_value_t = Via::PortForward)]
    pub via: Via,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    PortForward,
    PodIp,
}

#[derive(Debug, Clone, Args)]
pub struct VolumesArgs {
    #[command(flatten)]
    pub report: ReportArgs,

    /// Only this node's volumes.
    #[arg(long)]
    pub node: Option<String>,

    /// Only Released volumes (kept by Retain after their claim was deleted): candidates for `purge`.
    #[arg(long)]
    pub released: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Name of the Node this agent serves (from the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory holding the volumes, as this process sees it. Must exist.
    #[arg(long, env = "HOSTVOL_DATA_ROOT", default_value = "/mnt/data")]
    pub data_root: PathBuf,

    /// The same directory as the node's kubelet sees it, written into PVs (default: --data-root).
    /// Set it when the agent runs in a container that mounts the node's directory elsewhere.
    #[arg(long, env = "HOSTVOL_HOST_DATA_ROOT")]
    pub host_data_root: Option<String>,

    /// Provisioner name; StorageClasses with this `provisioner` are served.
    #[arg(long, env = "HOSTVOL_PROVISIONER", default_value = crate::DEFAULT_PROVISIONER)]
    pub provisioner: String,

    /// Space on the data root's filesystem that hostvol never hands out (e.g. 10Gi).
    #[arg(long, env = "HOSTVOL_RESERVED", default_value = "0", value_parser = parse_bytes)]
    pub reserved: u64,

    /// Most that hostvol may allocate on this node, summed over its volumes (e.g. 200Gi). Default: no cap.
    #[arg(long, env = "HOSTVOL_CAPACITY_CAP", value_parser = parse_bytes)]
    pub capacity_cap: Option<u64>,

    /// ConfigMap (in --pod-namespace) with per-node data roots, key `config.yaml`; re-read on change.
    /// Without it, or without an entry for this node, the flags' data root is the only one (`default`).
    #[arg(long, env = "HOSTVOL_CONFIG_MAP", default_value = "hostvol-config")]
    pub config_map: String,

    /// Where the node's paths appear inside the agent's container, for roots from the ConfigMap
    /// (e.g. `/host` if the node's / is mounted there). Empty: the same paths.
    #[arg(long, env = "HOSTVOL_HOST_PATH_PREFIX")]
    pub host_path_prefix: Option<PathBuf>,

    /// Refuse to provision unless the data root is a mount point, so a disk that failed to mount does
    /// not fill the node's root filesystem (the node then reports no capacity and claims go elsewhere).
    #[arg(long, env = "HOSTVOL_REQUIRE_MOUNT_POINT")]
    pub require_mount_point: bool,

    /// Size enforcement on the flags' data root: `auto` uses the filesystem's quotas when they are on
    /// (btrfs quotas; XFS/ext4 project quotas), `required` serves no claims without them, `off` never
    /// sets limits. ConfigMap roots set `quota:` each.
    #[arg(long, env = "HOSTVOL_QUOTA_MODE", default_value = "auto")]
    pub quota_mode: QuotaMode,

    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "HOSTVOL_HTTP_ADDR", default_value = "0.0.0.0:9808")]
    pub http_addr: SocketAddr,

    /// TCP address of the gRPC node service. Loopback by default: inside the agent's pod only, so
    /// other pods cannot list volumes; people reach it through the API server (port-forward), where
    /// Kubernetes RBAC decides who may look.
    #[arg(long, env = "HOSTVOL_GRPC_ADDR", default_value = "127.0.0.1:9809")]
    pub grpc_addr: SocketAddr,

    /// Unix socket of the gRPC node service, for tools on the node.
    #[arg(
        long,
        env = "HOSTVOL_GRPC_SOCKET",
        default_value = "/run/hostvol/hostvol.sock"
    )]
    pub grpc_socket: PathBuf,

    /// How often the bytes used by each volume are measured (a directory walk, off the request path).
    #[arg(long, env = "HOSTVOL_USAGE_REFRESH_SECONDS", default_value_t = 60)]
    pub usage_refresh_seconds: u64,

    /// Most volume directories walked at once during a usage refresh.
    #[arg(long, env = "HOSTVOL_USAGE_CONCURRENCY", default_value_t = 2)]
    pub usage_concurrency: usize,

    /// Free-space movement that counts as a capacity change for watchers and the scheduler (e.g. 64Mi).
    #[arg(long, env = "HOSTVOL_CAPACITY_CHANGE_THRESHOLD", default_value = "64Mi", value_parser = parse_bytes)]
    pub capacity_change_threshold: u64,

    /// Run node-loss clean-up (classes with `nodeLossCleanup: "true"`): needs the RBAC of the kustomize
    /// component deploy/components/node-loss-cleanup, checked at start.
    #[arg(long, env = "HOSTVOL_NODE_LOSS_CLEANUP")]
    pub node_loss_cleanup: bool,

    /// How often the data root is compared with the PVs to report orphans and lost volumes.
    #[arg(long, env = "HOSTVOL_ORPHAN_SCAN_SECONDS", default_value_t = 300)]
    pub orphan_scan_seconds: u64,

    /// Log output format.
    #[arg(long, env = "HOSTVOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// This agent's pod (downward API); names the Event reporter instance.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Namespace of this agent's pod (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "hostvol-system")]
    pub pod_namespace: String,
}

impl AgentArgs {
    pub fn host_data_root(&self) -> String {
        self.host_data_root
            .clone()
            .unwrap_or_else(|| self.data_root.to_string_lossy().into_owned())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    quantity::parse_bytes(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_defaults() {
        let cli = Cli::try_parse_from([
            "hostvol",
            "agent",
            "--node-name",
            "n1",
            "--capacity-cap",
            "20Gi",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("expected agent")
        };
        assert_eq!(args.data_root, PathBuf::from("/mnt/data"));
        assert_eq!(args.host_data_root(), "/mnt/data");
        assert_eq!(args.provisioner, "hostpath.hostvol.io");
        assert_eq!(args.capacity_cap, Some(20 << 30));
        assert!(
            Cli::try_parse_from([
                "hostvol",
                "agent",
                "--node-name",
                "n1",
                "--reserved",
                "lots"
            ])
            .is_err()
        );
    }
}
