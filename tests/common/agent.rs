//! Agents: real `hostvol agent` processes, one per fake node, with their own data root, ports, socket
//! and log in the cluster dir; readiness (`/readyz`), restart, kill/terminate, metrics and logs, and
//! the Pod object the shipped DaemonSet would have made for them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::grpc::node_client::NodeClient;
use super::grpc::{CapacityReport, GetCapacityRequest};
use super::process::{self, Registry};
use super::{AGENT_NAMESPACE, Address, Cluster, free_port, hostvol_bin, http};

/// A `hostvol agent` process for one fake node, started by `Cluster::start_agent`; killed on drop.
pub struct Agent {
    pub node: String,
    pub root: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub grpc_socket: PathBuf,
    /// Full argument list (after the binary).
    pub args: Vec<String>,
    /// Extra environment (e.g. FAILPOINTS), kept across restarts.
    pub env: Vec<(String, String)>,
    kubeconfig: PathBuf,
    log_path: PathBuf,
    cluster_dir: PathBuf,
    registry: Arc<Registry>,
    child: Option<Child>,
}

pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Agent {
    async fn spawn_and_wait_ready(&mut self) {
        if let Err(msg) = self.try_spawn_and_wait_ready().await {
            panic!("{msg}");
        }
    }

    /// Spawns the agent (appending a marker line to its log) and waits for /readyz 200.
    /// Err(message with this run's log) if it exits first or is not ready within 30 s.
    async fn try_spawn_and_wait_ready(&mut self) -> Result<(), String> {
        use std::io::Write;
        let run_start = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(
                f,
                "===== e2e harness: starting hostvol {} =====",
                self.args.join(" ")
            );
        }
        let mut cmd = Command::new(hostvol_bin());
        // The agent reads unset flags from the environment (NODE_NAME, POD_NAME, HOSTVOL_*): do not
        // let the test runner's environment leak into it.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("HOSTVOL_")
                || k.starts_with("KUBERNETES_")
                || ["NODE_NAME", "POD_NAME", "POD_NAMESPACE"].contains(&&*k)
            {
                cmd.env_remove(&*k);
            }
        }
        cmd.args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "hostvol=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = process::spawn_logged(cmd, &self.cluster_dir, &self.log_path)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", hostvol_bin().display()));
        self.registry
            .register(&format!("agent-{}", self.node), child.id());
        self.child = Some(child);
        let this_run = |log: &Path| {
            let bytes = std::fs::read(log).unwrap_or_default();
            let text = String::from_utf8_lossy(bytes.get(run_start as usize..).unwrap_or(&[]))
                .into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(120)..].join("\n")
        };
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "agent for node {} exited before becoming ready ({st})\n--- {} (this run) ---\n{}",
                    self.node,
                    self.log_path.display(),
                    this_run(&self.log_path)
                ));
            }
            if matches!(http::get(self.http_addr, "/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let last = http::get(self.http_addr, "/readyz").await;
                return Err(format!(
                    "agent for node {} not ready after {AGENT_READY_TIMEOUT:?} (last GET /readyz: {last:?})\n--- {} (this run) ---\n{}",
                    self.node,
                    self.log_path.display(),
                    this_run(&self.log_path)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the agent process is currently running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                process::signal_group(c.id(), libc::SIGKILL);
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to 10 s (then SIGKILL; panics if it had to kill).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                process::signal(c.id(), libc::SIGTERM);
                if !process::wait_timeout(&mut c, Duration::from_secs(10)) {
                    process::signal_group(c.id(), libc::SIGKILL);
                    let _ = c.wait();
                    self.child = Some(c);
                    panic!(
                        "agent {} did not exit within 10 s of SIGTERM\n--- log ---\n{}",
                        self.node,
                        process::tail(&self.log_path, 40)
                    );
                }
            }
            let _ = c.wait();
            self.child = Some(c);
        }
    }

    /// Exit status of the last process, if it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Starts the same command again (same root, ports, socket) and waits for /readyz. If the old
    /// process still runs it is terminated first.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.terminate();
        }
        self.spawn_and_wait_ready().await;
    }

    /// GET /metrics body (panics on error or non-200).
    pub async fn metrics(&self) -> String {
        match http::get(self.http_addr, "/metrics").await {
            Ok((200, body)) => body,
            other => panic!(
                "GET http://{}/metrics for agent {}: {other:?}\n--- log ---\n{}",
                self.http_addr,
                self.node,
                process::tail(&self.log_path, 40)
            ),
        }
    }

    /// GET any path on the agent's HTTP address: (status, body).
    pub async fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http::get(self.http_addr, path).await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent not started").id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The agent's captured stdout+stderr so far (all runs, appended).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The agent's node service over loopback TCP, for `connect`.
    pub fn grpc_tcp(&self) -> Address {
        Address::Tcp(self.grpc_addr.to_string())
    }

    /// The agent's node service over its Unix socket, for `connect`.
    pub fn grpc_unix(&self) -> Address {
        Address::Unix(self.grpc_socket.clone())
    }
}

/// GetCapacity on a client of an agent's node service (`connect(&agent.grpc_tcp(), ..)`); panics on
/// error.
pub async fn capacity_report(client: &mut NodeClient<Channel>) -> CapacityReport {
    client
        .get_capacity(GetCapacityRequest {})
        .await
        .expect("GetCapacity")
        .into_inner()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                process::signal_group(c.id(), libc::SIGKILL);
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// Publishes a Pod object for a running agent, as the shipped DaemonSet would have it
    /// (labels, `grpc` port, hostNetwork so its IP is the node's, 127.0.0.1 here), and waits until the
    /// fake kubelet reports it Running. `hostvol capacity` finds agents through these pods, and the
    /// agent (started with `--pod-name hostvol-<node>`) uses it as owner of its CSIStorageCapacity.
    pub async fn register_agent_pod(&self, agent: &Agent) -> String {
        let name = format!("hostvol-{}", agent.node);
        self.create_namespace(AGENT_NAMESPACE).await; // waits for the default ServiceAccount's token
        self.kubectl_apply_yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {AGENT_NAMESPACE}\n  labels:\n    \
             app.kubernetes.io/name: hostvol\n    app.kubernetes.io/component: agent\nspec:\n  nodeName: {node}\n  \
             hostNetwork: true\n  containers:\n  - name: agent\n    image: hostvol:e2e\n    ports:\n    - name: grpc\n      \
             containerPort: {port}\n",
            node = agent.node,
            port = agent.grpc_addr.port()
        ));
        self.wait_pod_running(AGENT_NAMESPACE, &name, Duration::from_secs(60))
            .await;
        name
    }

    /// Starts `hostvol agent` for `node` (root `<dir>/<node>-root`, free http/grpc ports, socket
    /// `<dir>/<node>.sock`, KUBECONFIG = agent kubeconfig) and waits for /readyz 200 (30 s).
    pub async fn start_agent(&self, node: &str, extra_args: &[&str]) -> Agent {
        self.start_agent_with_kubeconfig(node, extra_args, &self.agent_kubeconfig.clone())
            .await
    }

    /// `start_agent` with another kubeconfig, e.g. one through an `ApiProxy`.
    pub async fn start_agent_with_kubeconfig(
        &self,
        node: &str,
        extra_args: &[&str],
        kubeconfig: &Path,
    ) -> Agent {
        self.start_agent_with_env(node, extra_args, kubeconfig, &[])
            .await
    }

    /// `start_agent` on the data root `root` (another node's disk, e.g. a node rebuilt with it).
    pub async fn start_agent_on_root(&self, node: &str, root: &Path, extra_args: &[&str]) -> Agent {
        let mut agent = self.new_agent(node, &self.agent_kubeconfig.clone());
        agent.root = root.to_path_buf();
        agent.set_args(extra_args);
        if let Err(msg) = agent.try_spawn_and_wait_ready().await {
            panic!("{msg}\n{}", self.diag());
        }
        agent
    }

    /// `start_agent` with failpoints set (`FAILPOINTS`, the `fail` crate's syntax; the binary is built
    /// with the default `failpoints` feature).
    pub async fn start_agent_with_failpoints(&self, node: &str, failpoints: &str) -> Agent {
        let kubeconfig = self.agent_kubeconfig.clone();
        self.start_agent_with_env(node, &[], &kubeconfig, &[("FAILPOINTS", failpoints)])
            .await
    }

    /// `start_agent_with_kubeconfig` with extra environment, e.g. `FAILPOINTS` (tests/supervision.rs).
    pub async fn start_agent_with_env(
        &self,
        node: &str,
        extra_args: &[&str],
        kubeconfig: &Path,
        env: &[(&str, &str)],
    ) -> Agent {
        let mut agent = self.new_agent(node, kubeconfig);
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for attempt in 0..2 {
            agent.set_args(extra_args);
            match agent.try_spawn_and_wait_ready().await {
                Ok(()) => return agent,
                // A free port can be grabbed between probing and binding: retry once on other ports.
                Err(msg)
                    if attempt == 0
                        && msg.contains("exited before")
                        && msg.to_lowercase().contains("address already in use") =>
                {
                    eprintln!("[e2e] agent {node}: port taken, retrying on other ports");
                }
                Err(msg) => panic!("{msg}\n{}", self.diag()),
            }
        }
        unreachable!()
    }

    /// Runs `hostvol agent` for `node` as `start_agent` does, expecting it to refuse to start: its
    /// exit status and this run's output. Panics if it becomes ready instead (or is not done in 30 s).
    pub async fn run_agent_expecting_exit(
        &self,
        node: &str,
        extra_args: &[&str],
    ) -> (std::process::ExitStatus, String) {
        let mut agent = self.new_agent(node, &self.agent_kubeconfig.clone());
        agent.set_args(extra_args);
        match agent.try_spawn_and_wait_ready().await {
            Ok(()) => panic!(
                "agent for {node} started with {:?} although it should have refused\n--- log ---\n{}",
                agent.args,
                agent.log()
            ),
            Err(msg) if msg.contains("exited before") => {}
            Err(msg) => panic!("{msg}\n{}", self.diag()),
        }
        let status = agent.exit_status().expect("the agent exited");
        let log = agent.log();
        let this_run = log
            .rsplit_once("===== e2e harness: starting hostvol")
            .and_then(|(_, run)| run.split_once('\n'))
            .map_or(log.clone(), |(_, output)| output.to_string());
        (status, this_run)
    }

    /// An `Agent` for `node` (root `<dir>/<node>-root`, socket, log), not started.
    fn new_agent(&self, node: &str, kubeconfig: &Path) -> Agent {
        let root = self.path.join(format!("{node}-root"));
        std::fs::create_dir_all(&root).expect("create agent root");
        let grpc_socket = self.path.join(format!("{node}.sock"));
        let log = self.path.join(format!("agent-{node}.log"));
        {
            let mut logs = self.agent_logs.lock().unwrap();
            if !logs.contains(&log) {
                logs.push(log.clone());
            }
        }
        Agent {
            node: node.to_string(),
            root,
            http_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_socket,
            args: Vec::new(),
            env: Vec::new(),
            kubeconfig: kubeconfig.to_path_buf(),
            log_path: log,
            cluster_dir: self.path.clone(),
            registry: self.registry.clone(),
            child: None,
        }
    }
}

impl Agent {
    /// Fresh free ports and the full argument list: the harness's flags, then `extra_args`.
    fn set_args(&mut self, extra_args: &[&str]) {
        self.http_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.grpc_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--node-name".into(),
            self.node.clone(),
            "--data-root".into(),
            self.root.display().to_string(),
            "--http-addr".into(),
            self.http_addr.to_string(),
            "--grpc-addr".into(),
            self.grpc_addr.to_string(),
            "--grpc-socket".into(),
            self.grpc_socket.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        self.args = args;
    }
}

impl Cluster {
    /// Adds each fake node and starts its agent (with the node's extra arguments), one after the other.
    /// Mounts a tmpfs of `size` (e.g. "64g") as `node`'s data root, so figures that depend on free
    /// space do not depend on how full this machine's disk is. Only what is written uses memory.
    pub fn give_disk(&self, node: &str, size: &str) {
        let root = self.path.join(format!("{node}-root"));
        std::fs::create_dir_all(&root).expect("create agent root");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&root)
            .status()
            .expect("run mount (needs root)");
        assert!(
            status.success(),
            "mount tmpfs on {} (needs root)",
            root.display()
        );
        self.disks.lock().unwrap().push(root);
    }

    pub async fn add_nodes_with_agents(&self, nodes: &[(&str, &[&str])]) -> Vec<Agent> {
        let mut agents = Vec::new();
        for (node, args) in nodes {
            self.add_node(node).await;
            agents.push(self.start_agent(node, args).await);
        }
        agents
    }
}
