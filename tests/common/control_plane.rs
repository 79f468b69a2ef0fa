//! The control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler started as
//! processes on free loopback ports in a temp dir, the admin and agent kubeconfigs, the `Cluster`
//! handle, its diagnostics for panic messages, and its `Drop` (stops everything; keeps the dir when
//! asked to or when the test panics).
//!
//! Other `impl Cluster` blocks live next to their role: `kubectl.rs`, `fixtures.rs`, `nodes.rs`,
//! `wait.rs`, `inspect.rs`, `agent.rs`.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use std::collections::HashSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::binaries::require_binaries;
use super::http;
use super::kubelet::{self, FakeKubelet};
use super::process::{self, Registry};

pub const AGENT_NAMESPACE: &str = "hostvol-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "hostvol";
/// The shipped manifests applied at cluster start (relative to the crate root), in order.
pub const DEPLOY_RBAC_MANIFESTS: &[&str] = &[
    "deploy/namespace.yaml",
    "deploy/serviceaccount.yaml",
    "deploy/rbac.yaml",
];

/// The RBAC of the optional kustomize component that node-loss clean-up needs (`--node-loss-cleanup`),
/// applied on top of the shipped RBAC by the tests that run it (`Cluster::apply_repo_manifest`).
pub const NODE_LOSS_COMPONENT_RBAC: &str = "deploy/components/node-loss-cleanup/rbac.yaml";

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

/// A control-plane process, with what it takes to start it again the same way (`faults.rs`).
pub(super) struct Component {
    pub(super) name: &'static str,
    pub(super) child: Child,
    pub(super) log: PathBuf,
    pub(super) program: std::ffi::OsString,
    pub(super) args: Vec<std::ffi::OsString>,
}

/// Program and arguments of `cmd`, kept in its `Component`.
fn launch_spec(cmd: &Command) -> (std::ffi::OsString, Vec<std::ffi::OsString>) {
    (
        cmd.get_program().to_owned(),
        cmd.get_args().map(|a| a.to_owned()).collect(),
    )
}

/// A running control plane (see the module doc). Fields used by the `impl Cluster` blocks in the other
/// files of `common/` are `pub(super)`.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    pub(super) path: PathBuf,
    etcd_dir: Option<tempfile::TempDir>,
    pub(super) registry: Arc<Registry>,
    pub(super) components: Mutex<Vec<Component>>,
    opts: ClusterOptions,
    pub(super) server: String,
    admin_token: String,
    pub(super) admin_kubeconfig: PathBuf,
    pub(super) agent_kubeconfig: PathBuf,
    pub(super) client: kube::Client,
    pub(super) kubelet_shared: kubelet::KubeletShared,
    pub(super) kubelet: Mutex<Option<FakeKubelet>>,
    pub(super) agent_logs: Arc<Mutex<Vec<PathBuf>>>,
    /// tmpfs "disks" mounted under `path` by `give_disk`; unmounted when the cluster goes.
    pub(super) disks: Mutex<Vec<PathBuf>>,
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
            let (program, args) = launch_spec(&cmd);
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn etcd");
            registry.register("etcd", child.id());
            let mut comp = Component {
                name: "etcd",
                child,
                log,
                program,
                args,
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
            let (program, args) = launch_spec(&cmd);
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn kube-apiserver");
            registry.register("kube-apiserver", child.id());
            let mut comp = Component {
                name: "kube-apiserver",
                child,
                log,
                program,
                args,
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
            let (program, args) = launch_spec(&cmd);
            let child =
                process::spawn_logged(cmd, &path, &log).expect("spawn kube-controller-manager");
            registry.register("kube-controller-manager", child.id());
            components.push(Component {
                name: "kube-controller-manager",
                child,
                log,
                program,
                args,
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
            let (program, args) = launch_spec(&cmd);
            let child = process::spawn_logged(cmd, &path, &log).expect("spawn kube-scheduler");
            registry.register("kube-scheduler", child.id());
            components.push(Component {
                name: "kube-scheduler",
                child,
                log,
                program,
                args,
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
            disks: Mutex::new(Vec::new()),
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

    /// A kubeconfig for a person: ServiceAccount `default/<name>` (created here) with no roles
    /// until the test binds some.
    pub async fn person_kubeconfig(&self, name: &str) -> PathBuf {
        self.kubectl_ok(&["create", "serviceaccount", "-n", "default", name]);
        let token = self.service_account_token("default", name, 3600).await;
        let path = self.path.join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, &self.server, name, &token);
        path
    }

    // --- service account token (the agents' kubeconfig) ---------------------------------------

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

/// Waits until `ready()` or the process exits / the timeout passes. Err describes why.
pub(super) async fn wait_process_ready<F, Fut>(
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
        for disk in self
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(&disk)
                .status();
        }
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
