//! Volumes holding millions of files, on a real control plane, with the agent under its DaemonSet's
//! memory limit (160 MiB, a cgroup v1 memory cgroup): a usage refresh, a copy clone and the Delete of
//! a volume with 2,000,000 empty files in one directory, and the Delete of one with 2,000,000 files
//! spread over a deep tree, all finish with the agent never killed or restarted. Each phase prints the
//! time it took and the agent's peak RSS (`VmHWM`), the figure for the issue. Runs as root (mounts a
//! tmpfs data root, makes a memory cgroup).
//!
//! The fixtures are made in this process (one `mknodat` per file, on two threads), not by the agent,
//! so the kernel memory of their inodes is not charged to the agent's cgroup. The copy clone makes
//! 2,000,000 inodes itself: during it the cgroup's limit is raised to hold them and the agent's own
//! memory is held to 160 MiB through its peak RSS instead.
//! `HOSTVOL_E2E_AGENT_MEMORY_LIMIT_MIB` overrides the limit, to measure an agent that needs more.

mod common;

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::memory_cgroup::{MemoryCgroup, peak_rss, reset_peak_rss, rss};
use common::*;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, SFlag, mkdirat, mknodat};

const FILES: u64 = 2_000_000;
const MIB: u64 = 1 << 20;
/// The DaemonSet's memory limit (deploy/daemonset.yaml).
const AGENT_LIMIT: u64 = 160 * MIB;
/// A copy clone of the whole volume must finish within this on a loaded CI machine.
const LONG: Duration = Duration::from_secs(600);
const T: Duration = Duration::from_secs(60);

fn limit() -> u64 {
    std::env::var("HOSTVOL_E2E_AGENT_MEMORY_LIMIT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(AGENT_LIMIT, |m| m * MIB)
}

fn open_dir(dir: &Path) -> OwnedFd {
    open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

/// Makes `count` empty files `f<i>` in the open directory `dir`, `from` on, on two threads.
fn make_files(dir: &OwnedFd, from: u64, count: u64) {
    let threads = 2;
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let mut i = from + t;
                while i < from + count {
                    let name = CString::new(format!("f{i}")).unwrap();
                    mknodat(
                        dir.as_fd(),
                        name.as_c_str(),
                        SFlag::S_IFREG,
                        Mode::from_bits_truncate(0o644),
                        0,
                    )
                    .unwrap_or_else(|e| panic!("mknod f{i}: {e}"));
                    i += threads;
                }
            });
        }
    });
}

/// `FILES` files over a chain of `levels` nested directories (deeper than any path can name), the
/// same number of files in each.
fn make_deep_tree(top: &Path, levels: u64) {
    let mut dir = open_dir(top);
    let per_level = FILES / levels;
    for level in 0..levels {
        make_files(&dir, level * per_level, per_level);
        let name = CString::new(format!("d{level}")).unwrap();
        mkdirat(
            dir.as_fd(),
            name.as_c_str(),
            Mode::from_bits_truncate(0o755),
        )
        .unwrap();
        dir = openat(
            dir.as_fd(),
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
    }
}

/// What one phase cost the agent; fails the test if the kernel killed it or it is gone.
fn report(phase: &str, started: Instant, agent: &mut Agent, cgroup: &MemoryCgroup) {
    let pid = agent.pid();
    assert!(
        agent.is_running(),
        "the agent died during {phase} (OOM kills in its cgroup: {})\n--- log ---\n{}",
        cgroup.oom_kills(),
        process::tail(agent.log_path(), 40)
    );
    eprintln!(
        "[large_volumes] {phase}: {:.1} s, agent peak RSS {:.1} MiB (now {:.1} MiB), cgroup peak {:.1} MiB, \
         limit hits {}, OOM kills {}",
        started.elapsed().as_secs_f64(),
        peak_rss(pid) as f64 / MIB as f64,
        rss(pid) as f64 / MIB as f64,
        cgroup.max_usage() as f64 / MIB as f64,
        cgroup.failcnt(),
        cgroup.oom_kills(),
    );
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "{phase}: the agent's cgroup ran out of memory"
    );
    assert!(
        peak_rss(pid) < limit(),
        "{phase}: the agent's peak RSS {} B is over its limit of {} B",
        peak_rss(pid),
        limit()
    );
}

/// Waits until `dir` is gone, failing at once if the agent dies meanwhile.
async fn wait_removed(dir: &Path, agent: &mut Agent, what: &str) {
    let deadline = Instant::now() + LONG;
    while dir.exists() {
        assert!(
            agent.is_running(),
            "the agent died while removing {what}\n--- log ---\n{}",
            process::tail(agent.log_path(), 40)
        );
        assert!(
            Instant::now() < deadline,
            "{what} ({}) still there after {LONG:?}\n--- log ---\n{}",
            dir.display(),
            process::tail(agent.log_path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millions_of_files_under_the_daemonset_memory_limit() {
    let cgroup = MemoryCgroup::new("large-volumes", limit());
    // The cgroup charges only what the agent allocates after joining it: what it holds then is
    // taken off the limit, so the agent's whole memory stays within `limit()`.
    let cluster = Cluster::start().await;
    cluster.add_node("n1").await;
    // tmpfs: making millions of inodes is quick, and the figures do not depend on this machine's disk.
    cluster.give_disk("n1", "64g");
    // tmpfs allows half of RAM's pages as inodes (3M here): the source and its copy need 4M.
    let root = cluster.dir().join("n1-root");
    let remount = std::process::Command::new("mount")
        .args(["-o", "remount,nr_inodes=8m"])
        .arg(&root)
        .status()
        .expect("run mount");
    assert!(
        remount.success(),
        "remount {} with room for 8M inodes",
        root.display()
    );
    let mut agent = cluster
        .start_agent("n1", &["--usage-refresh-seconds", "5"])
        .await;
    cgroup.add(agent.pid());
    let held = rss(agent.pid());
    let budget = limit().saturating_sub(held);
    cgroup.set_limit(budget);
    cluster.create_namespace("big").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}---\n{}",
        class_yaml("big", "WaitForFirstConsumer", "Delete", &[]),
        claim_yaml("big", "flat", "big", "10Gi", Some("n1")),
        claim_yaml("big", "deep", "big", "10Gi", Some("n1")),
    ));
    let flat_pv = cluster.hostvol_pv_of_claim("big", "flat", T).await;
    let flat = agent.root.join(pv_dir_name(&flat_pv));
    let deep_pv = cluster.hostvol_pv_of_claim("big", "deep", T).await;
    let deep = agent.root.join(pv_dir_name(&deep_pv));
    eprintln!(
        "[large_volumes] agent at start: RSS {:.1} MiB",
        rss(agent.pid()) as f64 / MIB as f64
    );

    let started = Instant::now();
    make_files(&open_dir(&flat), 0, FILES);
    eprintln!(
        "[large_volumes] fixture: {FILES} empty files in one directory in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Usage refresh: the walk counts every file (2,000,000 files and the volume directory).
    reset_peak_rss(agent.pid());
    cgroup.reset_max_usage();
    let started = Instant::now();
    let mut client = connect(&agent.grpc_tcp(), Duration::from_secs(5))
        .await
        .unwrap();
    let flat_name = flat_pv.metadata.name.clone().unwrap();
    loop {
        let volumes = client
            .list_volumes(grpc::ListVolumesRequest {})
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let v = volumes.iter().find(|v| v.pv_name == flat_name).unwrap();
        if v.used_inodes == Some(FILES + 1) {
            break;
        }
        assert!(
            agent.is_running() && started.elapsed() < LONG,
            "the usage refresh never counted {FILES} files: {v:?}\n--- log ---\n{}",
            process::tail(agent.log_path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report(
        "usage refresh of 2,000,000 files",
        started,
        &mut agent,
        &cgroup,
    );

    // Copy clone: the agent creates 2,000,000 inodes, whose kernel memory the cgroup charges to it;
    // room for those, while its own memory is held to the limit by the peak RSS check.
    cgroup.set_limit(budget + 4096 * MIB);
    reset_peak_rss(agent.pid());
    cgroup.reset_max_usage();
    let started = Instant::now();
    cluster.kubectl_apply_yaml(&claim_yaml_with(
        "big",
        "copy",
        "big",
        "10Gi",
        Some("n1"),
        "  dataSource:\n    kind: PersistentVolumeClaim\n    name: flat\n",
    ));
    let copy_pv = cluster.hostvol_pv_of_claim("big", "copy", LONG).await;
    let copy = agent.root.join(pv_dir_name(&copy_pv));
    report(
        "copy clone of 2,000,000 files",
        started,
        &mut agent,
        &cgroup,
    );
    let copied = std::fs::read_dir(&copy).unwrap().count() as u64;
    assert_eq!(copied, FILES, "the clone holds every file");

    // Delete: the claims go, so do their directories, under the DaemonSet's limit again.
    cluster.kubectl(&["delete", "pvc", "-n", "big", "copy", "--wait=false"]);
    wait_removed(&copy, &mut agent, "the clone").await;
    cgroup.set_limit(budget);
    reset_peak_rss(agent.pid());
    cgroup.reset_max_usage();
    let started = Instant::now();
    cluster.kubectl(&["delete", "pvc", "-n", "big", "flat", "--wait=false"]);
    wait_removed(
        &flat,
        &mut agent,
        "the volume of 2,000,000 files in one directory",
    )
    .await;
    report(
        "Delete of 2,000,000 files in one directory",
        started,
        &mut agent,
        &cgroup,
    );

    let started = Instant::now();
    make_deep_tree(&deep, 1000);
    eprintln!(
        "[large_volumes] fixture: {FILES} empty files over 1000 nested directories in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    reset_peak_rss(agent.pid());
    cgroup.reset_max_usage();
    let started = Instant::now();
    cluster.kubectl(&["delete", "pvc", "-n", "big", "deep", "--wait=false"]);
    wait_removed(
        &deep,
        &mut agent,
        "the volume of 2,000,000 files in a deep tree",
    )
    .await;
    report(
        "Delete of 2,000,000 files over 1000 nested directories",
        started,
        &mut agent,
        &cgroup,
    );
}
