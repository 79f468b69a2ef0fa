//! Clusters whose nodes are real: kubelet + containerd per node, started by `scripts/real-cluster.sh`
//! in a network namespace of their own, with hostvol installed as users install it (`kubectl apply -k`
//! of `deploy/` with only the image overridden, the image built by `scripts/build-image.sh`).
//!
//! The test thread joins the cluster's network namespace (`setns`), so everything it does or starts
//! afterwards (the kube client, `kubectl`, plain HTTP to pod IPs) reaches the cluster's addresses, which
//! exist nowhere else. Run the test's async code with `RealCluster::block_on` (a runtime built on this
//! thread, after the switch); threads and processes started from it are in the namespace too, so keep
//! the played-kubelet `Cluster` (whose spawner thread lives as long as the process) off such a thread.
//! `Drop` switches back and tears the cluster down (`real-cluster.sh down`);
//! the directory with the logs is kept when the test panics or `HOSTVOL_E2E_KEEP=1`. The cluster's
//! processes are the script's, not the test's children: a test process killed before its `Drop` leaves
//! them running until the next `RealCluster::start` takes down clusters whose test process is gone.
//!
//! With `HOSTVOL_E2E_KUBECONFIG=<kubeconfig>` the scenarios run against that cluster instead (e.g. kind
//! with hostvol installed from `deploy/`, the image loaded with `kind load image-archive`): nothing is
//! started or torn down, and checks that need the node's disk read it through a pod.
//!
//! Parts: `scripts/setup-real-nodes.sh` and `scripts/build-image.sh`; a missing one fails the test with
//! the command that makes it.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{AGENT_NAMESPACE, client_from_kubeconfig, process};

pub const REAL_NODES_SETUP: &str = "scripts/setup-real-nodes.sh";
pub const IMAGE_BUILD: &str = "scripts/build-image.sh";
pub const EXTERNAL_KUBECONFIG_ENV: &str = "HOSTVOL_E2E_KUBECONFIG";
const CLUSTER_SCRIPT: &str = "scripts/real-cluster.sh";
const DIR_PREFIX: &str = "hostvol-real-";
/// The image `deploy/` names; the tests override only its tag.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/hostvol/hostvol";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn keep_requested() -> bool {
    matches!(std::env::var("HOSTVOL_E2E_KEEP").as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

/// The archive `scripts/build-image.sh` writes for this crate's version.
pub fn image_archive() -> PathBuf {
    repo().join(format!(
        "target/image/hostvol-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

pub fn image_tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A node of the cluster; `data_dir` is its `/mnt/data` as this host sees it (None on an external
/// cluster, whose nodes' disks are elsewhere).
#[derive(Clone, Debug)]
pub struct RealNode {
    pub name: String,
    pub ip: String,
    pub data_dir: Option<PathBuf>,
}

pub struct RealCluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// Taken from HOSTVOL_E2E_KUBECONFIG: not ours to tear down.
    external: bool,
    netns: Option<String>,
    host_netns: Option<File>,
    kubeconfig: PathBuf,
    nodes: Vec<RealNode>,
    /// From `real-cluster.sh up` starting to every node Ready (zero for an external cluster).
    pub up_time: Duration,
}

impl RealCluster {
    /// Starts a cluster of `nodes` real nodes (or takes the external one, see the module doc) and moves
    /// the calling thread into its network namespace.
    pub fn start(nodes: usize) -> RealCluster {
        Self::start_with(nodes, &[])
    }

    /// [`RealCluster::start`] whose nodes each have a tmpfs of `size` (e.g. `4G`) as `/mnt/data`: a
    /// filesystem no other writer on the machine moves.
    pub fn start_with_data_tmpfs(nodes: usize, size: &str) -> RealCluster {
        Self::start_with(nodes, &[("DATA_TMPFS_SIZE", size)])
    }

    /// [`RealCluster::start`] with settings of `scripts/real-cluster.sh` (see its header), e.g.
    /// `KUBELET_API_QPS`.
    pub fn start_with(nodes: usize, env: &[(&str, &str)]) -> RealCluster {
        if let Some(kc) = std::env::var_os(EXTERNAL_KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
            return Self::from_kubeconfig(PathBuf::from(kc));
        }
        reap_stale();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("create real cluster dir");
        let path = dir.path().to_path_buf();
        fs::write(
            path.join(process::OWNER_FILE),
            std::process::id().to_string(),
        )
        .unwrap();
        eprintln!(
            "[real] cluster dir {} (logs/*.log; HOSTVOL_E2E_KEEP=1 keeps it)",
            path.display()
        );
        let t0 = Instant::now();
        let out = script_with(
            &["up", path.to_str().unwrap(), &nodes.to_string()],
            &path,
            "up",
            env,
        );
        let up_time = t0.elapsed();
        // From here on Drop tears down whatever `up` started, also when it failed half-way.
        let mut rc = RealCluster {
            dir: Some(dir),
            path: path.clone(),
            external: false,
            netns: None,
            host_netns: None,
            kubeconfig: path.join("admin.kubeconfig"),
            nodes: Vec::new(),
            up_time,
        };
        if !out.status.success() {
            panic!(
                "real cluster did not come up ({}):\n{}\nParts missing? Run `{REAL_NODES_SETUP}` (root, Debian \
                 bookworm; ~2 min after scripts/setup-control-plane.sh).",
                out.status,
                process::tail(&path.join("up.log"), 30)
            );
        }
        let env = parse_env(&fs::read_to_string(path.join("env")).expect("cluster env file"));
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} missing from {}/env", path.display()))
        };
        let netns = get("NETNS");
        rc.kubeconfig = PathBuf::from(get("KUBECONFIG"));
        rc.nodes = (1..=nodes)
            .map(|i| {
                let v = get(&format!("NODE_{i}"));
                let f: Vec<&str> = v.split_whitespace().collect();
                RealNode {
                    name: f[0].into(),
                    ip: f[1].into(),
                    data_dir: Some(PathBuf::from(f[2])),
                }
            })
            .collect();
        rc.host_netns =
            Some(File::open("/proc/thread-self/ns/net").expect("open this thread's netns"));
        let ns = File::open(format!("/run/netns/{netns}"))
            .unwrap_or_else(|e| panic!("open /run/netns/{netns}: {e}"));
        enter_netns(&ns);
        rc.netns = Some(netns);
        eprintln!(
            "[real] {nodes} nodes Ready {:.1} s after `real-cluster.sh up` started",
            up_time.as_secs_f64()
        );
        rc
    }

    fn from_kubeconfig(kubeconfig: PathBuf) -> RealCluster {
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("create scratch dir");
        let mut rc = RealCluster {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            external: true,
            netns: None,
            host_netns: None,
            kubeconfig,
            nodes: Vec::new(),
            up_time: Duration::ZERO,
        };
        let out = rc.kubectl_ok(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
        ]);
        rc.nodes = out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(RealNode {
                    name: f.next()?.into(),
                    ip: f.next().unwrap_or_default().into(),
                    data_dir: None,
                })
            })
            .collect();
        eprintln!(
            "[real] using the cluster of {EXTERNAL_KUBECONFIG_ENV}={} (nodes: {})",
            rc.kubeconfig.display(),
            rc.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        rc
    }

    pub fn is_external(&self) -> bool {
        self.external
    }
    pub fn nodes(&self) -> &[RealNode] {
        &self.nodes
    }
    pub fn node(&self, name: &str) -> &RealNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
    pub fn dir(&self) -> &Path {
        &self.path
    }
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs `fut` to completion on a runtime built on this thread (inside the cluster's namespace).
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(fut)
    }

    pub async fn client(&self) -> kube::Client {
        client_from_kubeconfig(&self.kubeconfig)
            .await
            .expect("admin client")
    }

    // --- kubectl --------------------------------------------------------------------------------

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.path.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// `kubectl ARGS` as the admin (blocking).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("run kubectl")
    }

    /// `kubectl ARGS`; panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        if !out.status.success() {
            panic!(
                "kubectl {} failed ({}):\n{}{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.diag()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl port-forward TARGET :PORT` until the returned handle is dropped.
    pub fn port_forward(&self, target: &str, port: u16) -> PortForward {
        let mut child = self
            .kubectl_cmd(&["port-forward", target, &format!(":{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl port-forward");
        // "Forwarding from 127.0.0.1:41234 -> 80"
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let local = loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                let err = child
                    .wait_with_output()
                    .map(|o| o.stderr)
                    .unwrap_or_default();
                panic!(
                    "kubectl port-forward {target} :{port} failed: {}",
                    String::from_utf8_lossy(&err)
                );
            }
            if let Some(addr) = line
                .strip_prefix("Forwarding from ")
                .and_then(|r| r.split(" -> ").next())
                .filter(|a| a.starts_with("127.0.0.1:"))
            {
                break addr.parse().expect("forwarded address");
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        PortForward { child, local }
    }

    // --- hostvol --------------------------------------------------------------------------------

    /// Installs hostvol as a user does: `kubectl apply -k` of an overlay of `deploy/` that sets only
    /// the image tag, to the image `scripts/build-image.sh` built, imported into every node first. Waits
    /// until the DaemonSet is Ready on every node; returns the time from apply to Ready. On an external
    /// cluster where hostvol is installed already, only waits.
    pub fn install_hostvol(&self) -> Duration {
        self.install_hostvol_with_components(&[])
    }

    /// `install_hostvol` with kustomize components of `deploy/` (e.g. "components/node-loss-cleanup")
    /// in the overlay, as users enable optional features.
    pub fn install_hostvol_with_components(&self, components: &[&str]) -> Duration {
        let installed = self
            .kubectl(&["-n", AGENT_NAMESPACE, "get", "daemonset", "hostvol"])
            .status
            .success();
        let t0 = Instant::now();
        if !(self.is_external() && installed) {
            if !self.is_external() {
                let archive = image_archive();
                if !archive.is_file() {
                    panic!(
                        "{} missing: run `{IMAGE_BUILD}` (builds the hostvol image, no Docker needed)",
                        archive.display()
                    );
                }
                // The archive is what runs: say how old it is (scripts/build-image.sh remakes it).
                let age = fs::metadata(&archive)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .unwrap_or_default();
                eprintln!(
                    "[real] hostvol image {} (built {} min ago by {IMAGE_BUILD})",
                    archive.display(),
                    age.as_secs() / 60
                );
                let t = Instant::now();
                let out = script(
                    &[
                        "import",
                        self.path.to_str().unwrap(),
                        archive.to_str().unwrap(),
                    ],
                    &self.path,
                    "import",
                );
                assert!(
                    out.status.success(),
                    "import {} into the nodes failed:\n{}",
                    archive.display(),
                    process::tail(&self.path.join("import.log"), 20)
                );
                eprintln!(
                    "[real] imported into {} nodes in {:.1} s",
                    self.nodes.len(),
                    t.elapsed().as_secs_f64()
                );
            }
            let overlay = self.path.join("hostvol-deploy");
            fs::create_dir_all(&overlay).unwrap();
            let components: String = components
                .iter()
                .map(|c| {
                    let dir = relative_to(&overlay, &repo().join("deploy").join(c));
                    format!("  - {}\n", dir.display())
                })
                .collect();
            let components = if components.is_empty() {
                components
            } else {
                format!("components:\n{components}")
            };
            fs::write(
                overlay.join("kustomization.yaml"),
                format!(
                    "# deploy/ as shipped; only the image tag is the one scripts/build-image.sh built\n\
                     apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                     resources:\n  - {}\n{components}images:\n  - name: {IMAGE_REPOSITORY}\n    newTag: \"{}\"\n",
                    relative_to(&overlay, &repo().join("deploy")).display(),
                    image_tag()
                ),
            )
            .unwrap();
            self.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
        }
        self.wait_hostvol_rolled_out();
        t0.elapsed()
    }

    /// Every agent pod's log, whole (`kubectl logs -l`).
    pub fn agent_logs(&self) -> String {
        self.kubectl_ok(&[
            "logs",
            "-n",
            AGENT_NAMESPACE,
            "-l",
            "app.kubernetes.io/name=hostvol",
            "--tail=-1",
        ])
    }

    /// Waits until the hostvol DaemonSet has an up-to-date, Ready pod on every node (3 minutes).
    pub fn wait_hostvol_rolled_out(&self) {
        self.kubectl_ok(&[
            "-n",
            AGENT_NAMESPACE,
            "rollout",
            "status",
            "daemonset/hostvol",
            "--timeout=180s",
        ]);
    }

    /// Makes `class` the only default StorageClass.
    pub fn make_default_class(&self, class: &str) {
        let names = self.kubectl_ok(&["get", "storageclass", "-o", "name"]);
        for sc in names.lines() {
            let v = if sc == format!("storageclass.storage.k8s.io/{class}") {
                "true"
            } else {
                "false"
            };
            self.kubectl_ok(&[
                "annotate",
                sc,
                &format!("storageclass.kubernetes.io/is-default-class={v}"),
                "--overwrite",
            ]);
        }
    }

    /// Names of the entries of `dir` (relative to the node's `/mnt/data`) on `node`, sorted: read on
    /// this host for the harness's nodes, through a pod on the node for an external cluster.
    pub fn node_data_ls(&self, node: &str, dir: &str) -> Vec<String> {
        let rel = dir.trim_start_matches('/');
        if let Some(root) = &self.node(node).data_dir {
            let mut v: Vec<String> = fs::read_dir(root.join(rel))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            return v;
        }
        let out = self.on_node(node, &format!("ls -1 /mnt/data/{rel} 2>/dev/null || true"));
        let mut v: Vec<String> = out.lines().map(String::from).collect();
        v.sort();
        v
    }

    /// Contents of file `path` (relative to the node's `/mnt/data`) on `node`, if it is there.
    pub fn node_data_read(&self, node: &str, path: &str) -> Option<String> {
        let rel = path.trim_start_matches('/');
        if let Some(root) = &self.node(node).data_dir {
            return fs::read_to_string(root.join(rel)).ok();
        }
        let out = self.on_node(
            node,
            &format!("cat /mnt/data/{rel} 2>/dev/null || echo __missing__"),
        );
        (out.trim() != "__missing__").then_some(out)
    }

    /// Removes `path` (relative to the node's `/mnt/data`) on `node`, as a person on the node would:
    /// on this host for the harness's nodes, through a pod for an external cluster.
    pub fn node_data_remove(&self, node: &str, path: &str) {
        let rel = path.trim_start_matches('/');
        assert!(
            !rel.is_empty() && !rel.contains(".."),
            "a path inside /mnt/data"
        );
        match &self.node(node).data_dir {
            Some(root) => fs::remove_dir_all(root.join(rel)).expect("remove on the node"),
            None => {
                self.on_node_with(node, &format!("rm -rf /mnt/data/{rel}"), false);
            }
        }
    }

    /// Runs `sh -c SCRIPT` in a busybox pod pinned to `node` with the node's /mnt/data mounted; returns
    /// its output (external clusters only: the harness's nodes are read on this host).
    fn on_node(&self, node: &str, script: &str) -> String {
        self.on_node_with(node, script, true)
    }

    fn on_node_with(&self, node: &str, script: &str, read_only: bool) -> String {
        let pod = format!("hostvol-e2e-look-{node}");
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "default"},
            "spec": {
                "nodeName": node, "restartPolicy": "Never",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "look", "image": "busybox:1.35", "command": ["sh", "-c", script],
                                "volumeMounts": [{"name": "data", "mountPath": "/mnt/data", "readOnly": read_only}]}],
                "volumes": [{"name": "data", "hostPath": {"path": "/mnt/data", "type": "Directory"}}]
            }
        });
        let file = self.path.join(format!("{pod}.json"));
        fs::write(&file, manifest.to_string()).unwrap();
        self.kubectl(&["delete", "pod", &pod, "--ignore-not-found", "--wait"]);
        self.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
        self.kubectl_ok(&[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            &format!("pod/{pod}"),
            "--timeout=120s",
        ]);
        let out = self.kubectl_ok(&["logs", &pod]);
        self.kubectl(&["delete", "pod", &pod, "--wait=false"]);
        out
    }

    /// For panic messages: where the logs are.
    pub fn diag(&self) -> String {
        match &self.netns {
            Some(ns) => format!(
                "[real] cluster dir {} (logs/*.log; kept on panic), network namespace {ns}",
                self.path.display()
            ),
            None => format!(
                "[real] external cluster ({EXTERNAL_KUBECONFIG_ENV}={})",
                self.kubeconfig.display()
            ),
        }
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || keep_requested();
        if let Some(host) = self.host_netns.take() {
            enter_netns(&host);
        }
        // Also after an `up` that failed half-way: `down` takes down whatever is there.
        if !self.external {
            let t = Instant::now();
            let out = script(&["down", self.path.to_str().unwrap()], &self.path, "down");
            eprintln!(
                "[real] torn down in {:.1} s{}",
                t.elapsed().as_secs_f64(),
                if out.status.success() {
                    String::new()
                } else {
                    format!(
                        " (with errors:\n{})",
                        process::tail(&self.path.join("down.log"), 20)
                    )
                }
            );
        }
        if keep && let Some(dir) = self.dir.take() {
            let dir = dir.keep();
            process::touch(&dir.join(process::KEPT_FILE));
            eprintln!("[real] kept {}", dir.display());
        }
    }
}

/// A running `kubectl port-forward`; stopped when dropped.
pub struct PortForward {
    child: Child,
    pub local: std::net::SocketAddr,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `real-cluster.sh ARGS`, output to `<dir>/<log>.log`.
fn script(args: &[&str], dir: &Path, log: &str) -> Output {
    script_with(args, dir, log, &[])
}

fn script_with(args: &[&str], dir: &Path, log: &str, env: &[(&str, &str)]) -> Output {
    let log = File::create(dir.join(format!("{log}.log"))).expect("script log");
    Command::new(repo().join(CLUSTER_SCRIPT))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .output()
        .unwrap_or_else(|e| panic!("run {CLUSTER_SCRIPT}: {e}"))
}

fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `to` as a path relative to directory `from` (both absolute): kustomize takes no absolute resources.
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let mut rel = PathBuf::new();
    for _ in from.components().skip(1) {
        rel.push("..");
    }
    rel.join(to.strip_prefix("/").unwrap())
}

/// Moves the calling thread (only it) into the network namespace `ns`.
fn enter_netns(ns: &File) {
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns: {}", std::io::Error::last_os_error());
    }
}

/// Takes down clusters left by test processes that died without their `Drop` (SIGKILL, timeout).
fn reap_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX)
            || dir.join(process::KEPT_FILE).exists()
        {
            continue;
        }
        let owner = fs::read_to_string(dir.join(process::OWNER_FILE)).unwrap_or_default();
        if owner.trim().is_empty() || Path::new(&format!("/proc/{}", owner.trim())).exists() {
            continue;
        }
        // One reaper per dir, also across test threads and processes.
        if fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join("reaping"))
            .is_err()
        {
            continue;
        }
        eprintln!(
            "[real] taking down {} (its test process is gone)",
            dir.display()
        );
        if dir.join("nodes-count").exists() {
            script(&["down", dir.to_str().unwrap()], &dir, "down");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
