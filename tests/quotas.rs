//! End-to-end scenarios of issue #9, enforced sizes: a real `hostvol agent` whose data root is a
//! real btrfs (a sparse file on a loop device, made and mounted by each test) against the e2e control
//! plane.
//!
//! 1. With quotas on, each volume is a subvolume whose qgroup limit is the claim's request: a
//!    non-root writer is stopped with "Disk quota exceeded" near the claim's size.
//! 2. Reclaim Delete destroys the subvolume, and its qgroup goes away too.
//! 3. A provisioning pass interrupted between "subvolume made" and "limit set" is finished by the next
//!    one: the same subvolume is reused and gets its limit.
//! 4. Quota mode `required` on roots that cannot enforce (btrfs without `btrfs quota enable`; a plain
//!    directory on the host's filesystem, from the ConfigMap): zero published capacity, and a claim
//!    placed there gets a Warning saying what to enable and is handed back; nothing is made.
//!
//! Needs root (loop devices, mount) and btrfs-progs (`mkfs.btrfs`, `btrfs`), which
//! `scripts/test.sh` installs; the tests fail, never skip, without them.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Agent, Cluster, claim_yaml, class_yaml, dirs_in, fmt_events, hostvol_pvs, pv_host_path,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

/// Upper bound for each wait; every scenario finishes well within a minute.
const T: Duration = Duration::from_secs(45);
const ANN_QUOTA: &str = "hostvol.io/quota";
const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;
/// The claims' request, and so the limit their volumes must get.
const CLAIM_SIZE: &str = "10Mi";
const CLAIM_BYTES: u64 = 10 * MIB;
/// Size of each test's btrfs image (sparse: only what btrfs writes takes space).
const IMAGE_BYTES: u64 = 256 * MIB;
/// Prefix of each filesystem's temporary directory (image, owner pid); stale ones are reaped.
const FS_DIR_PREFIX: &str = "hostvol-quotas-e2e-";
const SETUP_HINT: &str = "run `scripts/test.sh`, which installs btrfs-progs (through \
     `scripts/setup-quotas.sh`), or `apt-get install -y btrfs-progs`";

// ================================================================================================
// Scenarios
// ================================================================================================

/// Scenario 1: quotas on (mode auto): the volume is a subvolume with a qgroup limit of the claim's
/// request, recorded on the PV, and a non-root writer cannot go past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_limits_are_enforced() {
    let started = Instant::now();
    preflight();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let fs = LoopBtrfs::create(&agent_root(&cluster, "node-a"), Quotas::On);
    let agent = start_agent_on(&cluster, "node-a", &fs, &["--quota-mode", "auto"]).await;
    check_enforcement_logged(&agent, "btrfs-qgroup");
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.create_namespace("quota").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "quota",
        "data",
        "hostvol-quota",
        CLAIM_SIZE,
        Some("node-a"),
    ));

    let pv = cluster.hostvol_pv_of_claim("quota", "data", T).await;
    let id = qgroup_annotation(&pv);
    let dir = volume_dir(&fs, &pv);
    let meta = std::fs::metadata(&dir).unwrap_or_else(|e| {
        panic!(
            "volume directory {} of PV {}: {e}",
            dir.display(),
            pv.name_any()
        )
    });
    assert_eq!(
        meta.ino(),
        256,
        "volume {} is not a btrfs subvolume (a subvolume's root directory is inode 256)",
        dir.display()
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o777,
        "volume {} has the class's default mode 0777",
        dir.display()
    );
    assert_eq!(
        fs.subvolume_id(&dir),
        id,
        "the PV's {ANN_QUOTA} annotation names the volume's own subvolume"
    );
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(CLAIM_BYTES),
        "qgroup 0/{id} is limited to the claim's {CLAIM_SIZE}\n{}",
        fs.qgroup_table()
    );

    // A non-root writer (as a pod's user would be) is stopped at the limit.
    let (ok, stderr) = write_as_nobody(&dir, "f", 20);
    let written = std::fs::metadata(dir.join("f"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "[quotas] 20 MiB into a {CLAIM_SIZE} volume: wrote {written} bytes; dd: {}",
        stderr.trim()
    );
    assert!(
        !ok,
        "writing 20 MiB into a {CLAIM_SIZE} volume succeeded ({written} bytes written): the limit is not enforced"
    );
    assert!(
        stderr.contains("Disk quota exceeded"),
        "the writer must fail with EDQUOT (Disk quota exceeded); dd said: {stderr}"
    );
    assert!(
        (5 * MIB..=11 * MIB).contains(&written),
        "the writer got {:.2} MiB into a {CLAIM_SIZE} volume (expected between 5 and 11 MiB)",
        written as f64 / MIB as f64
    );
    eprintln!(
        "[quotas] btrfs_limits_are_enforced took {:.1?}",
        started.elapsed()
    );
}

/// Scenario 2: reclaim Delete destroys the subvolume, and its qgroup disappears shortly after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_delete_removes_subvolume_and_qgroup() {
    let started = Instant::now();
    preflight();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let fs = LoopBtrfs::create(&agent_root(&cluster, "node-a"), Quotas::On);
    let _agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-scratch",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("scratch").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "scratch",
        "tmp",
        "hostvol-scratch",
        CLAIM_SIZE,
        Some("node-a"),
    ));

    let pv = cluster.hostvol_pv_of_claim("scratch", "tmp", T).await;
    let id = qgroup_annotation(&pv);
    let dir = volume_dir(&fs, &pv);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        fs.qgroup(id).is_some(),
        "qgroup 0/{id} exists while the volume does\n{}",
        fs.qgroup_table()
    );
    // Some data, so there is something for the cleaner to drop.
    std::fs::write(dir.join("data"), vec![7u8; 2 * MIB as usize]).unwrap();
    assert!(
        fs.subvolumes().contains(&name),
        "{name} listed as a subvolume"
    );

    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "scratch",
        "pvc",
        "tmp",
        "--wait=true",
        "--timeout=40s",
    ]);
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    cluster
        .wait_for(
            || async { pvs.get_opt(&pv.name_any()).await.unwrap().is_none() },
            T,
            &format!(
                "PV {} removed after its claim was deleted (reclaim Delete)",
                pv.name_any()
            ),
        )
        .await;
    let deleted = Instant::now();
    assert!(
        !dir.exists(),
        "the volume directory {} is gone once its PV is",
        dir.display()
    );
    assert!(
        !fs.subvolumes().contains(&name),
        "subvolume {name} still listed by `btrfs subvolume list`"
    );
    let gone = common::poll_until(
        || async { fs.qgroup(id).is_none() },
        Duration::from_secs(10),
    )
    .await;
    assert!(
        gone.is_ok(),
        "qgroup 0/{id} still listed 10 s after its volume was deleted:\n{}",
        fs.qgroup_table()
    );
    eprintln!(
        "[quotas] qgroup 0/{id} gone {:.1?} after the PV; test took {:.1?}",
        deleted.elapsed(),
        started.elapsed()
    );
}

/// Scenario 3: a crash between "subvolume made" and "limit set" (the subvolume exists, without a
/// limit, before the agent starts): the agent reuses that subvolume and sets its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_provisioning_gets_its_limit() {
    let started = Instant::now();
    preflight();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let fs = LoopBtrfs::create(&agent_root(&cluster, "node-a"), Quotas::On);
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.create_namespace("crash").await;
    // The claim first, with no agent running, to learn its uid (and so the volume's name).
    cluster.kubectl_apply_yaml(&claim_yaml(
        "crash",
        "half",
        "hostvol-quota",
        CLAIM_SIZE,
        Some("node-a"),
    ));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "crash");
    let uid = claims.get("half").await.unwrap().uid().expect("claim uid");
    let name = format!("pvc-{uid}_crash_half");

    // What the interrupted pass left behind: the subvolume, without a limit (and a file in it).
    let half = fs.mnt().join(&name);
    run(Command::new(tool("btrfs"))
        .args(["subvolume", "create"])
        .arg(&half));
    std::fs::write(half.join("marker"), "from before the crash").unwrap();
    let id = fs.subvolume_id(&half);
    assert_eq!(
        fs.qgroup(id).map(|q| q.max_referenced),
        Some(None),
        "precondition: qgroup 0/{id} exists without a limit\n{}",
        fs.qgroup_table()
    );

    let _agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    let pv = cluster.hostvol_pv_of_claim("crash", "half", T).await;
    let dir = volume_dir(&fs, &pv);
    assert_eq!(
        dir, half,
        "the PV points at the subvolume the interrupted pass made"
    );
    assert_eq!(
        dirs_in(fs.mnt()).into_iter().collect::<Vec<_>>(),
        vec![name.clone()],
        "no second volume made"
    );
    assert_eq!(
        std::fs::read_to_string(half.join("marker")).ok().as_deref(),
        Some("from before the crash"),
        "the subvolume was reused, not replaced"
    );
    let meta = std::fs::metadata(&half).unwrap();
    assert_eq!(meta.ino(), 256, "{} is still a subvolume", half.display());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o777,
        "the reused subvolume got the class's mode (it was made 0755)"
    );
    assert_eq!(
        qgroup_annotation(&pv),
        id,
        "the PV's {ANN_QUOTA} annotation names the reused subvolume"
    );
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(CLAIM_BYTES),
        "the reused subvolume's qgroup 0/{id} got the claim's {CLAIM_SIZE} limit\n{}",
        fs.qgroup_table()
    );
    eprintln!(
        "[quotas] interrupted_provisioning_gets_its_limit took {:.1?}",
        started.elapsed()
    );
}

/// Scenario 4: quota mode `required` on roots that cannot enforce sizes: a btrfs without quotas (mode
/// from the flag) and a plain directory on the host's filesystem (mode from the ConfigMap). Both
/// publish zero capacity; a claim placed on either gets a Warning saying why and what to enable, is
/// handed back, and nothing is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mode_without_quotas_refuses() {
    let started = Instant::now();
    preflight();
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    let fs = LoopBtrfs::create(&agent_root(&cluster, "node-a"), Quotas::Off);
    let plain = cluster.dir().join("node-b-plain");
    std::fs::create_dir_all(&plain).unwrap();
    cluster.kubectl_apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hostvol-config\n  namespace: hostvol-system\ndata:\n  \
         config.yaml: |\n    nodes:\n      node-b:\n        roots:\n          default: {{path: {}, quota: required}}\n",
        plain.display()
    ));
    let agent_a = start_agent_on(&cluster, "node-a", &fs, &["--quota-mode", "required"]).await;
    let _agent_b = cluster.start_agent("node-b", &[]).await;

    // Neither node offers room for the class.
    for node in ["node-a", "node-b"] {
        let capacity = published_capacity(&cluster, node, "hostvol-quota").await;
        assert_eq!(
            capacity.parse::<u64>().ok(),
            Some(0),
            "node {node} has quota mode required without quotas: it must publish capacity 0, not {capacity:?}"
        );
    }

    cluster.create_namespace("strict").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml(
            "strict",
            "on-btrfs",
            "hostvol-quota",
            CLAIM_SIZE,
            Some("node-a")
        ),
        claim_yaml(
            "strict",
            "on-plain",
            "hostvol-quota",
            CLAIM_SIZE,
            Some("node-b")
        )
    ));
    for (claim, node, hint) in [
        ("on-btrfs", "node-a", "btrfs quota enable"),
        ("on-plain", "node-b", "prjquota"),
    ] {
        let (kind, _, message) = cluster
            .wait_event("strict", claim, "ProvisioningFailed", T)
            .await;
        eprintln!("[quotas] {claim} on {node}: {kind} ProvisioningFailed: {message}");
        assert_eq!(
            kind, "Warning",
            "ProvisioningFailed is a Warning: {message}"
        );
        assert!(
            message.contains(node) && message.contains("quota mode required"),
            "the Warning names the node and the quota mode: {message}"
        );
        assert!(
            message.contains(hint),
            "the Warning tells the administrator what to enable ({hint:?}): {message}"
        );
        cluster
            .wait_event("strict", claim, "ProvisioningReschedule", T)
            .await;
    }

    // Handed back: no node chosen any more, no PV, nothing on disk.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "strict");
    for claim in ["on-btrfs", "on-plain"] {
        let pvc = claims.get(claim).await.unwrap();
        assert!(
            !pvc.annotations()
                .contains_key("volume.kubernetes.io/selected-node"),
            "{claim} was handed back to the scheduler (selected-node removed): {:?}\n{}",
            pvc.annotations(),
            fmt_events(&cluster.pvc_events("strict", claim).await)
        );
        assert!(
            pvc.spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .is_none(),
            "{claim} must stay unbound"
        );
    }
    let pvs = hostvol_pvs(&cluster).await;
    assert!(
        pvs.is_empty(),
        "no PV may be made on roots that refuse: {:?}",
        pvs.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    assert!(
        dirs_in(fs.mnt()).is_empty(),
        "nothing made on node-a's btrfs: {:?}",
        dirs_in(fs.mnt())
    );
    assert!(
        dirs_in(&plain).is_empty(),
        "nothing made in node-b's plain directory: {:?}",
        dirs_in(&plain)
    );
    assert!(
        dirs_in(&agent_a.root).is_empty(),
        "nothing made in node-a's root"
    );
    eprintln!(
        "[quotas] required_mode_without_quotas_refuses took {:.1?}",
        started.elapsed()
    );
}

// ================================================================================================
// Kubernetes objects and helpers
// ================================================================================================

/// Where the harness puts `node`'s data root (`Cluster::start_agent`); the tests mount their btrfs
/// there before starting the agent. `start_agent_on` checks the harness still agrees.
fn agent_root(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.dir().join(format!("{node}-root"))
}

async fn start_agent_on(cluster: &Cluster, node: &str, fs: &LoopBtrfs, args: &[&str]) -> Agent {
    let agent = cluster.start_agent(node, args).await;
    assert_eq!(
        agent.root,
        fs.mnt(),
        "the harness gave agent {node} a data root other than the btrfs mounted for it \
         (tests/quotas.rs assumes `<cluster dir>/<node>-root`)"
    );
    agent
}

/// The agent logs, at start, how each data root enforces sizes ("sizes enforced with <mechanism>",
/// "sizes not enforced: <why>", ...); that line must name `mechanism`.
fn check_enforcement_logged(agent: &Agent, mechanism: &str) {
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("enforce"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sizes enforced") && l.contains(mechanism)),
        "agent {} must log at start that its data root's sizes are enforced with {mechanism}; \
         its log lines about enforcement:\n{}",
        agent.node,
        if lines.is_empty() {
            "<none>".to_string()
        } else {
            lines.join("\n")
        }
    );
}

/// The volume's directory, from the PV's hostPath, in the test's mount.
fn volume_dir(fs: &LoopBtrfs, pv: &PersistentVolume) -> PathBuf {
    let dir = Path::new(pv_host_path(pv));
    assert_eq!(
        dir.parent(),
        Some(fs.mnt()),
        "PV {} points into the btrfs data root",
        pv.name_any()
    );
    dir.to_path_buf()
}

/// The subvolume id in the PV's `hostvol.io/quota: "qgroup 0/<id>"` annotation.
fn qgroup_annotation(pv: &PersistentVolume) -> u64 {
    let value = pv.annotations().get(ANN_QUOTA).unwrap_or_else(|| {
        panic!(
            "PV {} has no {ANN_QUOTA} annotation; annotations: {:?}",
            pv.name_any(),
            pv.annotations()
        )
    });
    value
        .strip_prefix("qgroup 0/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "PV {}: {ANN_QUOTA} is {value:?}, expected \"qgroup 0/<subvolume id>\"",
                pv.name_any()
            )
        })
}

/// The `capacity` of the CSIStorageCapacity that `node`'s agent publishes for `class`, once it exists.
async fn published_capacity(cluster: &Cluster, node: &str, class: &str) -> String {
    let api = cluster.csi_storage_capacities().await;
    let find = || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|o| {
                o.data.get("storageClassName").and_then(|c| c.as_str()) == Some(class)
                    && o.data
                        .pointer("/nodeTopology/matchLabels/kubernetes.io~1hostname")
                        .and_then(|n| n.as_str())
                        == Some(node)
            })
            .map(|o| match o.data.get("capacity") {
                Some(serde_json::Value::String(s)) => s.clone(),
                other => format!("{other:?}"),
            })
    };
    cluster
        .wait_for(
            || async { find().await.is_some() },
            T,
            &format!("node {node}'s CSIStorageCapacity for class {class}"),
        )
        .await;
    find().await.unwrap()
}

/// Runs `dd` as uid/gid 65534 with no supplementary groups, writing `mib` MiB of zeros to `file` in
/// `dir` (fsync'd); returns whether it succeeded and its stderr. The child enters `dir` while still
/// root, so the cluster's 0700 temp directories above it do not matter; only the volume's own mode does.
fn write_as_nobody(dir: &Path, file: &str, mib: u64) -> (bool, String) {
    let cdir = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={file}"))
        .arg("bs=1M")
        .arg(format!("count={mib}"))
        .arg("conv=fsync");
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |ret: libc::c_int| {
                if ret == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::chdir(cdir.as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
            Ok(())
        });
    }
    let out = cmd.output().expect("run dd as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ================================================================================================
// A btrfs on a loop device
// ================================================================================================

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quotas {
    On,
    Off,
}

/// One row of `btrfs qgroup show -re --raw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Qgroup {
    referenced: u64,
    max_referenced: Option<u64>,
}

/// A btrfs on a sparse file in its own temporary directory, through a loop device, mounted with
/// `commit=1` (the cleaner then drops deleted subvolumes, and their qgroups, within about a second).
/// Unmounted (lazily if busy), detached and removed on drop, panics included. Those left behind by a
/// test process that died without dropping them (SIGKILL) are reaped by the next test's `preflight`.
struct LoopBtrfs {
    dir: Option<tempfile::TempDir>,
    device: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopBtrfs {
    /// Makes the filesystem and mounts it on `mnt` (created if missing), with quotas on or off.
    fn create(mnt: &Path, quotas: Quotas) -> Self {
        preflight();
        let dir = tempfile::Builder::new()
            .prefix(FS_DIR_PREFIX)
            .tempdir()
            .expect("temporary directory for the btrfs image");
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).unwrap();
        let image = dir.path().join("btrfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .unwrap_or_else(|e| panic!("sparse image {}: {e}", image.display()));
        let mut fs = LoopBtrfs {
            dir: Some(dir),
            device: None,
            mnt: mnt.to_path_buf(),
            mounted: false,
        };
        let device = run(Command::new(tool("losetup"))
            .args(["--find", "--show"])
            .arg(&image));
        fs.device = Some(device.trim().to_string());
        run(Command::new(tool("mkfs.btrfs"))
            .args(["-f", "-q"])
            .arg(fs.device()));
        std::fs::create_dir_all(mnt)
            .unwrap_or_else(|e| panic!("mount point {}: {e}", mnt.display()));
        run(Command::new(tool("mount"))
            .args(["-t", "btrfs", "-o", "commit=1"])
            .arg(fs.device())
            .arg(mnt));
        fs.mounted = true;
        if quotas == Quotas::On {
            run(Command::new(tool("btrfs"))
                .args(["quota", "enable"])
                .arg(mnt));
            // Enabling starts a rescan; let it finish so the figures are final.
            run(Command::new(tool("btrfs"))
                .args(["quota", "rescan", "-w"])
                .arg(mnt));
        }
        fs
    }

    fn mnt(&self) -> &Path {
        &self.mnt
    }

    fn device(&self) -> &str {
        self.device.as_deref().unwrap()
    }

    /// `btrfs qgroup show -re --raw --sync` as printed, for messages.
    fn qgroup_table(&self) -> String {
        run(Command::new(tool("btrfs"))
            .args(["qgroup", "show", "-re", "--raw", "--sync"])
            .arg(&self.mnt))
    }

    /// Level-0 qgroups by subvolume id.
    fn qgroups(&self) -> BTreeMap<u64, Qgroup> {
        // Qgroupid  Referenced  Exclusive  Max referenced  Max exclusive  Path
        self.qgroup_table()
            .lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let id = cols.first()?.strip_prefix("0/")?.parse().ok()?;
                let referenced = cols.get(1)?.parse().ok()?;
                let max_referenced = match *cols.get(3)? {
                    "none" => None,
                    n => Some(n.parse().ok()?),
                };
                Some((
                    id,
                    Qgroup {
                        referenced,
                        max_referenced,
                    },
                ))
            })
            .collect()
    }

    fn qgroup(&self, id: u64) -> Option<Qgroup> {
        self.qgroups().get(&id).copied()
    }

    /// The id of the subvolume whose root is `path` (`btrfs inspect-internal rootid`).
    fn subvolume_id(&self, path: &Path) -> u64 {
        let out = run(Command::new(tool("btrfs"))
            .args(["inspect-internal", "rootid"])
            .arg(path));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("btrfs inspect-internal rootid {}: {out:?}", path.display()))
    }

    /// Paths (relative to the mount) of the live subvolumes.
    fn subvolumes(&self) -> Vec<String> {
        // ID 256 gen 9 top level 5 path <name>
        run(Command::new(tool("btrfs"))
            .args(["subvolume", "list"])
            .arg(&self.mnt))
        .lines()
        .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.trim().to_string()))
        .collect()
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new(tool_or_name("umount"))
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "[quotas] umount {} failed; detaching lazily",
                    self.mnt.display()
                );
                let _ = Command::new(tool_or_name("umount"))
                    .arg("-l")
                    .arg(&self.mnt)
                    .status();
            }
        }
        if let Some(device) = &self.device {
            let _ = Command::new(tool_or_name("losetup"))
                .arg("-d")
                .arg(device)
                .status();
        }
        drop(self.dir.take());
    }
}

/// Root, and the tools (btrfs-progs, util-linux), or a failure saying how to get them; then reaps
/// filesystems left behind by test processes that were killed (before the harness reaps their
/// cluster directories, which hold the mount points). Called first in every test, so a missing tool
/// fails it before a control plane is started.
fn preflight() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/quotas.rs loop-mounts btrfs filesystems and needs root (CI runs the tests as root)"
    );
    for name in ["mkfs.btrfs", "btrfs", "losetup", "mount", "umount"] {
        tool(name);
    }
    reap_stale_filesystems();
}

/// The tool's path (PATH, then the sbin directories a non-login root shell may lack).
fn tool_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// For clean-up, which must not panic: the tool's path, or its bare name.
fn tool_or_name(name: &str) -> PathBuf {
    tool_path(name).unwrap_or_else(|| PathBuf::from(name))
}

fn tool(name: &str) -> PathBuf {
    tool_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` not found (searched PATH and the sbin directories): the quota e2e tests make \
             real btrfs filesystems and need btrfs-progs (mkfs.btrfs, btrfs) and util-linux (losetup, \
             mount); {SETUP_HINT}"
        )
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; {SETUP_HINT}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unmounts and detaches loop devices whose image lives in a [`FS_DIR_PREFIX`] directory of a test
/// process that is gone (or whose image was deleted), and removes those directories.
fn reap_stale_filesystems() {
    let Ok(out) = Command::new(tool("losetup"))
        .args([
            "--list",
            "--noheadings",
            "--raw",
            "--output",
            "NAME,BACK-FILE",
        ])
        .output()
    else {
        return;
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((device, back)) = line.split_once(' ') else {
            continue;
        };
        let back = back.trim().trim_end_matches(" (deleted)");
        let Some(dir) = Path::new(back).parent() else {
            continue;
        };
        if !dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(FS_DIR_PREFIX))
        {
            continue;
        }
        let owner_alive = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if owner_alive {
            continue;
        }
        // mountinfo: id parent major:minor root mount-point options ... - fstype source options
        for m in mounts.lines() {
            let fields: Vec<&str> = m.split_whitespace().collect();
            let source = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|i| fields.get(i + 2));
            if source == Some(&device) {
                let _ = Command::new(tool("umount"))
                    .arg("-l")
                    .arg(fields[4])
                    .status();
            }
        }
        let _ = Command::new(tool("losetup")).arg("-d").arg(device).status();
        let _ = std::fs::remove_dir_all(dir);
        eprintln!("[quotas] reaped stale loop device {device} ({back})");
    }
}
