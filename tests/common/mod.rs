//! End-to-end test harness for hostvol: a real Kubernetes 1.20.2 control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) on free loopback ports in a temp dir, fake nodes, a fake
//! kubelet (pod status only), and hostvol agents started as real processes.
//!
//! Recipe and flags: /work/shared/notes/control-plane.md. Binaries: `scripts/setup-control-plane.sh`.
//!
//! Environment:
//! * `HOSTVOL_E2E_KEEP=1` keeps the cluster dir (logs, etcd data) after the test; it is also kept when
//!   the test panics. The path is printed either way.
//! * `HOSTVOL_CACHE_DIR` / `XDG_CACHE_HOME` locate the control-plane binaries like the setup script;
//!   `HOSTVOL_K8S_BIN_DIR` overrides the directory directly, `HOSTVOL_ETCD` the etcd binary.
#![allow(dead_code, unused_imports)]

pub mod http;
pub mod kubelet;
pub mod process;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use kubelet::FakeKubelet;
use process::Registry;

pub const K8S_VERSION: &str = "1.20.2";
pub const SETUP_COMMAND: &str = "scripts/setup-control-plane.sh";
pub const AGENT_NAMESPACE: &str = "hostvol-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "hostvol";
/// The shipped manifests applied at cluster start (relative to the crate root), in order.
pub const DEPLOY_RBAC_MANIFESTS: &[&str] = &[
    "deploy/namespace.yaml",
    "deploy/serviceaccount.yaml",
    "deploy/rbac.yaml",
];

const POLL: Duration = Duration::from_millis(150);

// ---------------------------------------------------------------------------------------------
// Options, binaries
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Enable CSIStorageCapacity (feature gate on apiserver + scheduler, storage.k8s.io/v1alpha1).
    pub csi_storage_capacity: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            csi_storage_capacity: true,
        }
    }
}

/// Directory with kube-apiserver, kube-controller-manager, kube-scheduler (same rule as the setup script).
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOSTVOL_K8S_BIN_DIR") {
        return PathBuf::from(d);
    }
    let cache = match std::env::var_os("HOSTVOL_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("hostvol"),
            _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/hostvol"),
        },
    };
    cache.join(format!("kubernetes-{K8S_VERSION}/bin"))
}

pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTVOL_ETCD") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("/usr/bin/etcd")
}

/// The `hostvol` binary the agents run: `HOSTVOL_BIN` if set; else Cargo's `CARGO_BIN_EXE_hostvol`
/// (set when building integration tests); else `hostvol` in the target dir of the running executable
/// (cargo examples, e.g. `target/debug/examples/demo` -> `target/debug/hostvol`; Cargo does not build
/// it for examples: `cargo build --bin hostvol` first).
pub fn hostvol_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTVOL_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_hostvol") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("hostvol"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "hostvol binary not found next to {} (run `cargo build --bin hostvol`, or set HOSTVOL_BIN)",
                exe.display()
            )
        })
}

fn require_binaries() -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = k8s_bin_dir();
    let etcd = etcd_bin();
    let bins = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .map(|b| dir.join(b));
    let mut missing: Vec<String> = bins
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !etcd.is_file() {
        missing.push(etcd.display().to_string());
    }
    if !missing.is_empty() {
        panic!(
            "e2e control-plane binaries missing: {}.\nRun `{SETUP_COMMAND}` (builds Kubernetes {K8S_VERSION} \
             from Debian's source package into {}, installs etcd; ~5 min the first time).",
            missing.join(", "),
            dir.display()
        );
    }
    let [a, c, s] = bins;
    (etcd, a, c, s)
}

/// A free loopback port (bound and released; the caller starts its server right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

fn keep_requested() -> bool {
    matches!(std::env::var("HOSTVOL_E2E_KEEP").as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut s = String::new();
    for i in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        );
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s
}

/// A kube client from a kubeconfig file (honours insecure-skip-tls-verify).
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::read_from(path)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

fn write_kubeconfig(path: &Path, server: &str, user: &str, token: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\n\
         users:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: {user}\n\
         current-context: e2e\n"
    );
    std::fs::write(path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Wait helpers
// ---------------------------------------------------------------------------------------------

/// Polls `f` (every ~150 ms) until it returns true; panics after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(f: F, timeout: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(elapsed) = poll_until(f, timeout).await {
        panic!("timed out after {elapsed:?} waiting for {what}");
    }
}

/// Like `wait_for` but returns Err(elapsed) instead of panicking.
pub async fn poll_until<F, Fut>(mut f: F, timeout: Duration) -> Result<(), Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(remaining.max(Duration::from_millis(1)), f()).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(start.elapsed());
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Pretty JSON of an object for panic messages, without managedFields and last-applied noise.
pub fn to_yaml_ish<T: serde::Serialize>(v: &T) -> String {
    let mut v = match serde_json::to_value(v) {
        Ok(v) => v,
        Err(e) => return format!("<unserializable: {e}>"),
    };
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        if let Some(ann) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            ann.remove("kubectl.kubernetes.io/last-applied-configuration");
            if ann.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    etcd_dir: Option<tempfile::TempDir>,
    registry: Arc<Registry>,
    components: Mutex<Vec<Component>>,
    opts: ClusterOptions,
    server: String,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    agent_kubeconfig: PathBuf,
    client: kube::Client,
    kubelet_shared: kubelet::KubeletShared,
    kubelet: Mutex<Option<FakeKubelet>>,
    agent_logs: Arc<Mutex<Vec<PathBuf>>>,
    started: Instant,
}

impl Cluster {
    /// Starts a control plane with default options and the shipped RBAC (`deploy/*.yaml`).
    pub async fn start() -> Cluster {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(opts: ClusterOptions) -> Cluster {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifests: Vec<PathBuf> = DEPLOY_RBAC_MANIFESTS.iter().map(|m| root.join(m)).collect();
        let missing: Vec<String> = manifests
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            panic!(
                "shipped manifests missing (needed to run agents with the shipped RBAC): {}",
                missing.join(", ")
            );
        }
        Self::start_with_manifests(opts, &manifests).await
    }

    /// Like `start_with`, applying the given manifests (in one `kubectl apply`) instead of the shipped
    /// RBAC. They must create ServiceAccount `hostvol-system/hostvol`.
    pub async fn start_with_manifests(opts: ClusterOptions, manifests: &[PathBuf]) -> Cluster {
        let t0 = Instant::now();
        let (etcd_bin, apiserver_bin, cm_bin, sched_bin) = require_binaries();
        let shm = PathBuf::from("/dev/shm");
        let tmp = std::env::temp_dir();
        process::reap_stale(&[tmp.clone(), shm.clone()]);

        let dir = tempfile::Builder::new()
            .prefix(process::DIR_PREFIX)
            .tempdir()
            .expect("create cluster temp dir");
        let path = dir.path().to_path_buf();
        // etcd fsyncs a lot; tmpfs keeps several parallel clusters fast on 2 cores.
        let etcd_dir = tempfile::Builder::new()
            .prefix(&format!("{}etcd-", process::DIR_PREFIX))
            .tempdir_in(if shm.is_dir() { &shm } else { &tmp })
            .expect("create etcd temp dir");
        let _ = std::fs::write(
            etcd_dir.path().join(process::OWNER_FILE),
            std::process::id().to_string(),
        );
        let registry = Arc::new(Registry::new(path.clone()));
        eprintln!(
            "[e2e] cluster dir {} (logs: *.log; HOSTVOL_E2E_KEEP=1 keeps it)",
            path.display()
        );

        let mut components: Vec<Component> = Vec::new();
        // Until the Cluster exists: if start panics, kill what was started and keep the logs.
        struct StartGuard {
            registry: Arc<Registry>,
            dir: Option<tempfile::TempDir>,
            etcd_dir: Option<tempfile::TempDir>,
        }
        impl Drop for StartGuard {
            fn drop(&mut self) {
                if let Some(dir) = self.dir.take() {
                    self.registry.kill_all();
                    let dir = dir.keep();
                    process::touch(&dir.join(process::KEPT_FILE));
                    eprintln!("[e2e] cluster start failed; logs kept in {}", dir.display());
                }
            }
        }
        let mut guard = StartGuard {
            registry: registry.clone(),
            dir: Some(dir),
            etcd_dir: Some(etcd_dir),
        };
        let etcd_path = guard.etcd_dir.as_ref().unwrap().path().to_path_buf();

        // Service-account signing key (run while etcd starts).
        let key = path.join("sa.key");
        let pubkey = path.join("sa.pub");
        let openssl = std::thread::spawn({
            let (key, pubkey) = (key.clone(), pubkey.clone());
            move || {
                let run = |args: &[&str]| {
                    let out = Command::new("openssl")
                        .args(args)
                        .output()
                        .expect("run openssl");
                    assert!(
                        out.status.success(),
                        "openssl {args:?} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                run(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
                run(&[
                    "rsa",
                    "-in",
                    key.to_str().unwrap(),
                    "-pubout",
                    "-out",
                    pubkey.to_str().unwrap(),
                ]);
            }
        });

        // etcd
        let mut etcd_url = String::new();
        for attempt in 0..2 {
            let (cport, pport) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{cport}");
            let peer_url = format!("http://127.0.0.1:{pport}");
            let data = etcd_path.join(format!("data{attempt}"));
            let mut cmd = Command::new(&etcd_bin);
            cmd.args(["--name", "default", "--data-dir"])
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &client_url,
                    "--advertise-client-urls",
                    &client_url,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args(["--initial-cluster", &format!("default={peer_url}")]);
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k); // etcd reads ETCD_* variables as flags
                }
            }
            let log = path.join("etcd.log");
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn etcd");
            registry.register("etcd", child.id());
            let mut comp = Component {
                name: "etcd",
                child,
                log,
            };
            let addr: SocketAddr = format!("127.0.0.1:{cport}").parse().unwrap();
            let ok = wait_process_ready(&mut comp, Duration::from_secs(20), || async move {
                matches!(http::get(addr, "/health").await, Ok((200, _)))
            })
            .await;
            match ok {
                Ok(()) => {
                    components.push(comp);
                    etcd_url = client_url;
                    break;
                }
                Err(why) if attempt == 0 => {
                    eprintln!("[e2e] etcd did not start ({why}); retrying on other ports");
                    let _ = comp.child.kill();
                    let _ = comp.child.wait();
                }
                Err(why) => panic!(
                    "etcd did not start: {why}\n--- {} ---\n{}",
                    comp.log.display(),
                    process::tail(&comp.log, 40)
                ),
            }
        }
        openssl.join().expect("openssl key generation failed");

        // kube-apiserver
        let admin_token = random_token();
        std::fs::write(
            path.join("tokens.csv"),
            format!("{admin_token},admin,admin,system:masters\n"),
        )
        .unwrap();
        let admin_kubeconfig = path.join("admin.kubeconfig");
        let mut client = None;
        let mut server = String::new();
        for attempt in 0..2 {
            let port = free_port();
            server = format!("https://127.0.0.1:{port}");
            write_kubeconfig(&admin_kubeconfig, &server, "admin", &admin_token);
            let mut cmd = Command::new(&apiserver_bin);
            cmd.args(["--etcd-servers", &etcd_url])
                .args([
                    "--bind-address",
                    "127.0.0.1",
                    "--secure-port",
                    &port.to_string(),
                ])
                .arg("--cert-dir")
                .arg(path.join(format!("apiserver-certs{attempt}")))
                .args(["--service-account-issuer", "https://kubernetes.default.svc"])
                .arg("--service-account-key-file")
                .arg(&pubkey)
                .arg("--service-account-signing-key-file")
                .arg(&key)
                .args([
                    "--service-cluster-ip-range",
                    "10.0.0.0/24",
                    "--advertise-address",
                    "127.0.0.1",
                ])
                .args(["--authorization-mode", "RBAC"])
                .arg("--token-auth-file")
                .arg(path.join("tokens.csv"));
            if opts.csi_storage_capacity {
                cmd.args([
                    "--feature-gates=CSIStorageCapacity=true",
                    "--runtime-config=storage.k8s.io/v1alpha1=true",
                ]);
            }
            let log = path.join("kube-apiserver.log");
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn kube-apiserver");
            registry.register("kube-apiserver", child.id());
            let mut comp = Component {
                name: "kube-apiserver",
                child,
                log,
            };
            let c = client_from_kubeconfig(&admin_kubeconfig)
                .await
                .expect("admin client");
            let probe = c.clone();
            let ok = wait_process_ready(&mut comp, Duration::from_secs(90), move || {
                let probe = probe.clone();
                async move {
                    let req = ::http::Request::get("/readyz").body(Vec::new()).unwrap();
                    matches!(probe.request_text(req).await, Ok(body) if body.trim() == "ok")
                }
            })
            .await;
            match ok {
                Ok(()) => {
                    components.push(comp);
                    client = Some(c);
                    break;
                }
                Err(why) if attempt == 0 && !why.contains("timed out") => {
                    eprintln!(
                        "[e2e] kube-apiserver did not start ({why}); retrying on another port"
                    );
                    let _ = comp.child.kill();
                    let _ = comp.child.wait();
                }
                Err(why) => panic!(
                    "kube-apiserver not ready: {why}\n--- {} ---\n{}",
                    comp.log.display(),
                    process::tail(&comp.log, 60)
                ),
            }
        }
        let client = client.unwrap();
        let t_apiserver = t0.elapsed();

        // kube-controller-manager and kube-scheduler (flags as in the notes).
        {
            let mut cmd = Command::new(&cm_bin);
            cmd.arg("--kubeconfig")
                .arg(&admin_kubeconfig)
                .arg("--service-account-private-key-file")
                .arg(&key)
                .args([
                    "--leader-elect=false",
                    "--controllers",
                    "*,-nodeipam,-nodelifecycle",
                    "--secure-port",
                    "0",
                    "--port",
                    "0",
                ]);
            let log = path.join("kube-controller-manager.log");
            let child =
                process::spawn_logged(cmd, &path, &log).expect("spawn kube-controller-manager");
            registry.register("kube-controller-manager", child.id());
            components.push(Component {
                name: "kube-controller-manager",
                child,
                log,
            });
        }
        {
            let mut cmd = Command::new(&sched_bin);
            cmd.arg("--kubeconfig").arg(&admin_kubeconfig).args([
                "--leader-elect=false",
                "--secure-port",
                "0",
                "--port",
                "0",
            ]);
            if opts.csi_storage_capacity {
                cmd.arg("--feature-gates=CSIStorageCapacity=true");
            }
            let log = path.join("kube-scheduler.log");
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn kube-scheduler");
            registry.register("kube-scheduler", child.id());
            components.push(Component {
                name: "kube-scheduler",
                child,
                log,
            });
        }

        let kubelet_log =
            std::fs::File::create(path.join("fake-kubelet.log")).expect("fake kubelet log");
        let kubelet_shared = kubelet::KubeletShared {
            nodes: Arc::new(Mutex::new(HashSet::new())),
            finalize_deletions: Arc::new(AtomicBool::new(true)),
            log: Arc::new(Mutex::new(kubelet_log)),
        };
        let cluster = Cluster {
            dir: guard.dir.take(),
            path: path.clone(),
            etcd_dir: guard.etcd_dir.take(),
            registry: registry.clone(),
            components: Mutex::new(components),
            opts,
            server,
            admin_token,
            admin_kubeconfig: admin_kubeconfig.clone(),
            agent_kubeconfig: path.join("agent.kubeconfig"),
            client,
            kubelet_shared,
            kubelet: Mutex::new(None),
            agent_logs: Arc::new(Mutex::new(Vec::new())),
            started: t0,
        };
        drop(guard); // disarmed (dirs taken): from here on Cluster::drop cleans up

        // Shipped RBAC, then a token for the agent's ServiceAccount.
        let mut args: Vec<String> = vec!["apply".into()];
        for m in manifests {
            args.push("-f".into());
            args.push(m.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.kubectl_ok(&args);
        let token = cluster
            .service_account_token(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, 24 * 3600)
            .await;
        write_kubeconfig(
            &cluster.agent_kubeconfig,
            &cluster.server,
            "hostvol",
            &token,
        );

        cluster.start_fake_kubelet();
        cluster.assert_components_alive("cluster start");
        eprintln!(
            "[e2e] control plane up in {:.1?} (apiserver ready after {:.1?}) at {}",
            t0.elapsed(),
            t_apiserver,
            cluster.server
        );
        cluster
    }

    // --- accessors -----------------------------------------------------------------------------

    /// Admin client (system:masters), bound to the calling test's tokio runtime.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }
    /// Kubeconfig with a TokenRequest token of ServiceAccount hostvol-system/hostvol (shipped RBAC).
    pub fn agent_kubeconfig(&self) -> &Path {
        &self.agent_kubeconfig
    }
    /// The cluster temp dir (logs, kubeconfigs, agent roots).
    pub fn dir(&self) -> &Path {
        &self.path
    }
    pub fn server_url(&self) -> &str {
        &self.server
    }
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }
    /// A client authenticating as the agent's ServiceAccount (to check RBAC from a test).
    pub async fn agent_client(&self) -> kube::Client {
        client_from_kubeconfig(&self.agent_kubeconfig)
            .await
            .expect("agent client")
    }

    // --- kubectl ------------------------------------------------------------------------------

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .arg("--cache-dir")
            .arg(self.path.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS` (blocking) and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and panics (with stderr) unless it succeeds; returns stdout.
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

    /// `kubectl apply -f -` with `yaml` on stdin; panics with stderr on failure.
    pub fn kubectl_apply_yaml(&self, yaml: &str) {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .expect("write kubectl stdin");
        let out = child.wait_with_output().expect("wait kubectl");
        if !out.status.success() {
            panic!(
                "kubectl apply -f - failed ({}):\n{}\n--- input ---\n{yaml}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.diag()
            );
        }
    }

    /// `kubectl apply -f <crate root>/<rel>` (e.g. "deploy/storageclass.yaml").
    pub fn apply_repo_manifest(&self, rel: &str) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        self.kubectl_ok(&["apply", "-f", p.to_str().unwrap()]);
    }

    // --- service accounts, namespaces ---------------------------------------------------------

    /// A bound ServiceAccount token via the TokenRequest API.
    pub async fn service_account_token(&self, ns: &str, sa: &str, seconds: i64) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), ns);
        let tr: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": seconds}
        }))
        .unwrap();
        let mut last_err = String::new();
        for _ in 0..50 {
            match api
                .create_token_request(sa, &PostParams::default(), &tr)
                .await
            {
                Ok(tr) => {
                    let v = serde_json::to_value(&tr).unwrap();
                    match v.pointer("/status/token").and_then(|t| t.as_str()) {
                        Some(t) if !t.is_empty() => return t.to_string(),
                        _ => last_err = format!("TokenRequest without status.token: {v}"),
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "TokenRequest for {ns}/{sa} failed: {last_err}\n{}",
            self.diag()
        );
    }

    /// Creates namespace `name` and waits until its `default` ServiceAccount and that account's token
    /// secret exist (1.20's ServiceAccount admission rejects pods before the token secret exists).
    pub async fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create namespace {name}: {e}\n{}", self.diag()),
        }
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), name);
        self.wait_for(
            || async {
                matches!(sas.get_opt("default").await, Ok(Some(sa)) if sa.secrets.as_ref().is_some_and(|s| !s.is_empty()))
            },
            Duration::from_secs(60),
            &format!("ServiceAccount {name}/default with a token secret (controller manager)"),
        )
        .await;
    }

    // --- nodes and the fake kubelet -----------------------------------------------------------

    /// Creates a Ready fake node (no kubelet) the scheduler will place pods on.
    pub async fn add_node(&self, name: &str) {
        self.add_node_with_labels(name, &[]).await
    }

    pub async fn add_node_with_labels(&self, name: &str, extra_labels: &[(&str, &str)]) {
        self.kubelet_shared
            .nodes
            .lock()
            .unwrap()
            .insert(name.to_string());
        let nodes: Api<Node> = Api::all(self.client());
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
        labels.insert("kubernetes.io/os".to_string(), "linux".to_string());
        labels.insert("kubernetes.io/arch".to_string(), "amd64".to_string());
        for (k, v) in extra_labels {
            labels.insert(k.to_string(), v.to_string());
        }
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create node {name}: {e}\n{}", self.diag()),
        }
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .unwrap();
        let cond = |t: &str, s: &str, reason: &str| json!({"type": t, "status": s, "reason": reason, "message": "fake kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now});
        let resources =
            json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        let status = json!({"status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                cond("Ready", "True", "KubeletReady"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": name, "kernelVersion": "fake",
                "osImage": "fake", "containerRuntimeVersion": "fake://1", "kubeletVersion": format!("v{K8S_VERSION}"),
                "kubeProxyVersion": format!("v{K8S_VERSION}"), "operatingSystem": "linux", "architecture": "amd64"
            }
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("patch node {name} status: {e}\n{}", self.diag()));
        let not_ready = |n: &Node| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == "node.kubernetes.io/not-ready"))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = nodes
                .get(name)
                .await
                .unwrap_or_else(|e| panic!("get node {name}: {e}"));
            if !not_ready(&n) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {name} keeps taint node.kubernetes.io/not-ready:\n{}\n{}",
                    to_yaml_ish(&n),
                    self.diag()
                );
            }
            let taints: Vec<_> = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != "node.kubernetes.io/not-ready")
                .collect();
            let patch = json!({"metadata": {"resourceVersion": n.metadata.resource_version}, "spec": {"taints": taints}});
            match nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("remove not-ready taint from {name}: {e}\n{}", self.diag()),
            }
        }
    }

    /// Starts the fake kubelet (done automatically by `start`; idempotent).
    pub fn start_fake_kubelet(&self) {
        let mut k = self.kubelet.lock().unwrap();
        if k.is_none() {
            *k = Some(FakeKubelet::start(
                self.admin_kubeconfig.clone(),
                self.kubelet_shared.clone(),
            ));
        }
    }

    /// Whether the fake kubelet deletes (grace 0) terminating pods on fake nodes, as a kubelet does
    /// once containers stopped. Default true; with false such pods stay Terminating.
    pub fn set_fake_kubelet_finalizes_deletions(&self, on: bool) {
        self.kubelet_shared
            .finalize_deletions
            .store(on, Ordering::SeqCst);
    }

    /// Deletes a pod with grace period 0 and waits until it is gone (404 is fine).
    pub async fn force_delete_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let uid = match api.get_opt(name).await {
            Ok(Some(p)) => p.metadata.uid.unwrap_or_default(),
            Ok(None) => return,
            Err(e) => panic!("get pod {ns}/{name}: {e}\n{}", self.diag()),
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            // Gone already, or replaced by a new pod of the same name (e.g. StatefulSet).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
            Err(e) => panic!("force delete pod {ns}/{name}: {e}\n{}", self.diag()),
        }
        // Controllers (StatefulSet) may recreate a pod with the same name at once: wait for the
        // old uid to be gone.
        self.wait_for(
            || async {
                match api.get_opt(name).await {
                    Ok(None) => true,
                    Ok(Some(p)) => p.metadata.uid.as_deref() != Some(uid.as_str()),
                    Err(_) => false,
                }
            },
            Duration::from_secs(30),
            &format!("pod {ns}/{name} (uid {uid}) to disappear after force delete"),
        )
        .await;
    }

    /// Waits until the pod is bound to a node and Running+Ready (via the fake kubelet).
    pub async fn wait_pod_running(&self, ns: &str, name: &str, timeout: Duration) -> Pod {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let ready = |p: &Pod| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions.as_ref().is_some_and(|cs| {
                        cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    })
            })
        };
        if poll_until(
            || async { matches!(api.get_opt(name).await, Ok(Some(p)) if ready(&p)) },
            timeout,
        )
        .await
        .is_err()
        {
            let state = match api.get_opt(name).await {
                Ok(Some(p)) => to_yaml_ish(&p),
                other => format!("{other:?}"),
            };
            let events = self.object_events(ns, "Pod", name).await;
            panic!(
                "timed out after {timeout:?} waiting for pod {ns}/{name} Running and Ready\n--- pod ---\n{state}\n--- events ---\n{}\n{}",
                fmt_events(&events),
                self.diag()
            );
        }
        api.get(name).await.unwrap()
    }

    // --- PVCs and events ----------------------------------------------------------------------

    /// Polls `f` until true; on timeout panics with `what`, the cluster dir, logs and dead components.
    pub async fn wait_for<F, Fut>(&self, f: F, timeout: Duration, what: &str)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        if let Err(elapsed) = poll_until(f, timeout).await {
            panic!(
                "timed out after {elapsed:?} waiting for {what}\n{}",
                self.diag()
            );
        }
    }

    pub async fn wait_pvc_bound(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> PersistentVolumeClaim {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client(), ns);
        let bound = |p: &PersistentVolumeClaim| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        };
        if poll_until(
            || async { matches!(api.get_opt(name).await, Ok(Some(p)) if bound(&p)) },
            timeout,
        )
        .await
        .is_err()
        {
            let state = match api.get_opt(name).await {
                Ok(Some(p)) => to_yaml_ish(&p),
                other => format!("{other:?}"),
            };
            let events = self.pvc_events(ns, name).await;
            panic!(
                "timed out after {timeout:?} waiting for PVC {ns}/{name} to be Bound\n--- pvc ---\n{state}\n--- events ---\n{}\n{}",
                fmt_events(&events),
                self.diag()
            );
        }
        api.get(name).await.unwrap()
    }

    /// Events about PVC ns/name as (type, reason, message), oldest first: core/v1 Events (field
    /// selector involvedObject.name/namespace) merged with events.k8s.io/v1 Events (regarding.*; note
    /// as message), de-duplicated by uid.
    pub async fn pvc_events(&self, ns: &str, name: &str) -> Vec<(String, String, String)> {
        self.object_events(ns, "", name).await
    }

    /// Events about object ns/name (kind filter applied only if `kind` is non-empty).
    pub async fn object_events(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
    ) -> Vec<(String, String, String)> {
        use k8s_openapi::api::core::v1::Event as CoreEvent;
        use k8s_openapi::api::events::v1::Event as NewEvent;
        let mut all: BTreeMap<String, (String, String, String, String)> = BTreeMap::new(); // uid -> (time, type, reason, msg)
        let ts = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let core: Api<CoreEvent> = Api::namespaced(self.client(), ns);
        let mut sel = format!("involvedObject.name={name},involvedObject.namespace={ns}");
        if !kind.is_empty() {
            sel.push_str(&format!(",involvedObject.kind={kind}"));
        }
        if let Ok(list) = core.list(&ListParams::default().fields(&sel)).await {
            for e in list.items {
                let time = e
                    .event_time
                    .as_ref()
                    .map(|t| ts(serde_json::to_value(t).unwrap()))
                    .or_else(|| {
                        e.last_timestamp
                            .as_ref()
                            .map(|t| ts(serde_json::to_value(t).unwrap()))
                    })
                    .or_else(|| {
                        e.first_timestamp
                            .as_ref()
                            .map(|t| ts(serde_json::to_value(t).unwrap()))
                    })
                    .or_else(|| {
                        e.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| ts(serde_json::to_value(t).unwrap()))
                    })
                    .unwrap_or_default();
                all.insert(
                    e.metadata.uid.clone().unwrap_or_default(),
                    (
                        time,
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                    ),
                );
            }
        }
        let newer: Api<NewEvent> = Api::namespaced(self.client(), ns);
        let mut sel = format!("regarding.name={name},regarding.namespace={ns}");
        if !kind.is_empty() {
            sel.push_str(&format!(",regarding.kind={kind}"));
        }
        if let Ok(list) = newer.list(&ListParams::default().fields(&sel)).await {
            for e in list.items {
                let uid = e.metadata.uid.clone().unwrap_or_default();
                if all.contains_key(&uid) {
                    continue;
                }
                let time = e
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| ts(serde_json::to_value(t).unwrap()))
                    .unwrap_or_default();
                all.insert(
                    uid,
                    (
                        time,
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default(),
                    ),
                );
            }
        }
        let mut v: Vec<_> = all.into_values().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t, r, m)| (t, r, m)).collect()
    }

    /// Waits for an event with `reason` about PVC ns/pvc; returns (type, reason, message).
    pub async fn wait_event(
        &self,
        ns: &str,
        pvc: &str,
        reason: &str,
        timeout: Duration,
    ) -> (String, String, String) {
        let found: Mutex<Option<(String, String, String)>> = Mutex::new(None);
        let res = poll_until(
            || async {
                let evs = self.pvc_events(ns, pvc).await;
                if let Some(e) = evs.into_iter().find(|e| e.1 == reason) {
                    *found.lock().unwrap() = Some(e);
                    true
                } else {
                    false
                }
            },
            timeout,
        )
        .await;
        if res.is_err() {
            let evs = self.pvc_events(ns, pvc).await;
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client(), ns);
            let state = match api.get_opt(pvc).await {
                Ok(Some(p)) => to_yaml_ish(&p),
                other => format!("{other:?}"),
            };
            panic!(
                "timed out after {timeout:?} waiting for event {reason:?} on PVC {ns}/{pvc}\n--- events so far ---\n{}\n--- pvc ---\n{state}\n{}",
                fmt_events(&evs),
                self.diag()
            );
        }
        found.into_inner().unwrap().unwrap()
    }

    /// The storage.k8s.io version serving `csistoragecapacities` (e.g. "storage.k8s.io/v1alpha1"), if any.
    pub async fn csi_storage_capacity_api_version(&self) -> Option<String> {
        for v in ["v1", "v1beta1", "v1alpha1"] {
            let gv = format!("storage.k8s.io/{v}");
            if let Ok(res) = self.client.list_api_group_resources(&gv).await
                && res
                    .resources
                    .iter()
                    .any(|r| r.name == "csistoragecapacities")
            {
                return Some(gv);
            }
        }
        None
    }

    // --- agents -------------------------------------------------------------------------------

    /// Starts `hostvol agent` for `node` (root `<dir>/<node>-root`, free http/grpc ports, socket
    /// `<dir>/<node>.sock`, KUBECONFIG = agent kubeconfig) and waits for /readyz 200 (30 s).
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

    pub async fn start_agent(&self, node: &str, extra_args: &[&str]) -> Agent {
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
        let mut agent = Agent {
            node: node.to_string(),
            root,
            http_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_socket,
            args: Vec::new(),
            kubeconfig: self.agent_kubeconfig.clone(),
            log_path: log,
            cluster_dir: self.path.clone(),
            registry: self.registry.clone(),
            child: None,
        };
        for attempt in 0..2 {
            agent.http_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            agent.grpc_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut args: Vec<String> = vec![
                "agent".into(),
                "--node-name".into(),
                node.into(),
                "--data-root".into(),
                agent.root.display().to_string(),
                "--http-addr".into(),
                agent.http_addr.to_string(),
                "--grpc-addr".into(),
                agent.grpc_addr.to_string(),
                "--grpc-socket".into(),
                agent.grpc_socket.display().to_string(),
            ];
            args.extend(extra_args.iter().map(|s| s.to_string()));
            agent.args = args;
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

    // --- diagnostics --------------------------------------------------------------------------

    /// Component names that have exited, with status.
    pub fn dead_components(&self) -> Vec<String> {
        let mut comps = self.components.lock().unwrap_or_else(|e| e.into_inner());
        comps
            .iter_mut()
            .filter_map(|c| match c.child.try_wait() {
                Ok(Some(st)) => Some(format!("{} exited ({st}), log {}", c.name, c.log.display())),
                _ => None,
            })
            .collect()
    }

    fn assert_components_alive(&self, when: &str) {
        let dead = self.dead_components();
        if !dead.is_empty() {
            let comps = self.components.lock().unwrap();
            let logs: Vec<String> = comps
                .iter()
                .filter(|c| dead.iter().any(|d| d.starts_with(c.name)))
                .map(|c| format!("--- {} ---\n{}", c.log.display(), process::tail(&c.log, 30)))
                .collect();
            panic!(
                "{when}: control-plane component(s) died: {}\n{}",
                dead.join("; "),
                logs.join("\n")
            );
        }
    }

    /// Multi-line description for panic messages: dir, log files, dead components.
    pub fn diag(&self) -> String {
        let mut s = format!(
            "[e2e] cluster dir (kept on panic): {}\n[e2e] logs:",
            self.path.display()
        );
        for c in self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s.push_str(&format!("\n  {}: {}", c.name, c.log.display()));
        }
        s.push_str(&format!(
            "\n  fake kubelet: {}",
            self.path.join("fake-kubelet.log").display()
        ));
        for l in self
            .agent_logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s.push_str(&format!("\n  agent: {}", l.display()));
        }
        let dead = self.dead_components();
        if !dead.is_empty() {
            s.push_str(&format!(
                "\n[e2e] DEAD control-plane components: {}",
                dead.join("; ")
            ));
        }
        s
    }
}

pub fn fmt_events(evs: &[(String, String, String)]) -> String {
    if evs.is_empty() {
        return "<none>".into();
    }
    evs.iter()
        .map(|(t, r, m)| format!("{t:8} {r}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `ready()` or the process exits / the timeout passes. Err describes why.
async fn wait_process_ready<F, Fut>(
    comp: &mut Component,
    timeout: Duration,
    mut ready: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = comp.child.try_wait() {
            return Err(format!("{} exited early ({st})", comp.name));
        }
        if let Ok(true) = tokio::time::timeout(Duration::from_secs(5), ready()).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} timed out after {timeout:?}", comp.name));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let keep = panicking || keep_requested();
        // Describe the state (which components died on their own) before killing everything.
        let diag = if panicking { Some(self.diag()) } else { None };
        if let Some(mut k) = self
            .kubelet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            k.stop();
        }
        // Agents first (their Child handles live in `Agent`s; those reap them), then the control plane.
        self.registry.kill_all();
        let mut comps = self.components.lock().unwrap_or_else(|e| e.into_inner());
        for c in comps.iter_mut().rev() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        drop(comps);
        if keep {
            let dir = self
                .dir
                .take()
                .map(|d| d.keep())
                .unwrap_or_else(|| self.path.clone());
            process::touch(&dir.join(process::KEPT_FILE));
            // etcd data lives in /dev/shm (RAM): keep it only when asked to.
            let etcd = if keep_requested() {
                self.etcd_dir.take().map(|d| d.keep())
            } else {
                None
            };
            if let Some(e) = &etcd {
                process::touch(&e.join(process::KEPT_FILE));
            }
            eprintln!(
                "[e2e] kept cluster dir {}{}",
                dir.display(),
                etcd.map(|e| format!(" (etcd data {})", e.display()))
                    .unwrap_or_default()
            );
            if let Some(diag) = diag {
                eprintln!("{diag}");
                for l in self
                    .agent_logs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                {
                    eprintln!(
                        "--- last lines of {} ---\n{}",
                        l.display(),
                        process::tail(l, 25)
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

pub struct Agent {
    pub node: String,
    pub root: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub grpc_socket: PathBuf,
    /// Full argument list (after the binary).
    pub args: Vec<String>,
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
            .env("RUST_LOG", "hostvol=debug,info");
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

/// Parses one sample from Prometheus text (`name{labels} value`); `labels` must all be present
/// (e.g. `&[("node", "n1")]`). Returns the first match.
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.trim().parse().ok()
        })
}

/// Entry names directly in `root` (an agent's data root), empty if it cannot be read.
pub fn dirs_in(root: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every PV hostvol provisioned in the cluster.
pub async fn hostvol_pvs(cluster: &Cluster) -> Vec<k8s_openapi::api::core::v1::PersistentVolume> {
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(cluster.client());
    pvs.list(&ListParams::default())
        .await
        .expect("list PVs")
        .items
        .into_iter()
        .filter(|pv| {
            pv.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("pv.kubernetes.io/provisioned-by"))
                .is_some_and(|p| p == "hostpath.hostvol.io")
        })
        .collect()
}
