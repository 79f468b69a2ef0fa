//! A btrfs on a loop device, for the quota e2e tests (tests/quotas.rs) and the quota bench
//! (benches/quotas.rs): a sparse image in its own temporary directory, attached to a loop device,
//! formatted, mounted (`commit=1`) where the caller says (an agent's data root), quotas on or off.
//! Unmounted, detached and removed on drop; those left behind by a killed process are reaped by the
//! next [`preflight`] / [`missing_requirements`].
//!
//! Self-contained (std, libc, tempfile); `pub mod loop_btrfs` of the harness (`common::loop_btrfs`).
//! Besides what tests/quotas.rs had: [`LoopBtrfs::create_sized`], and [`missing_requirements`], a
//! check that does not panic (the benches print it and exit non-zero).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// Size of the image `LoopBtrfs::create` makes (sparse: only what btrfs writes takes space).
pub const IMAGE_BYTES: u64 = 256 * MIB;
/// Prefix of each filesystem's temporary directory (image, owner pid); stale ones are reaped.
pub const FS_DIR_PREFIX: &str = "hostvol-quotas-e2e-";
pub const SETUP_HINT: &str = "run `scripts/test.sh`, which installs btrfs-progs (through \
     `scripts/setup-quotas.sh`), or `apt-get install -y btrfs-progs`";
/// The tools the filesystems need.
pub const TOOLS: [&str; 5] = ["mkfs.btrfs", "btrfs", "losetup", "mount", "umount"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Quotas {
    On,
    Off,
}

/// One row of `btrfs qgroup show -re --raw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qgroup {
    pub referenced: u64,
    pub max_referenced: Option<u64>,
}

/// A btrfs on a sparse file in its own temporary directory, through a loop device, mounted with
/// `commit=1` (the cleaner then drops deleted subvolumes, and their qgroups, within about a second).
/// Unmounted (lazily if busy), detached and removed on drop, panics included. Those left behind by a
/// process that died without dropping them (SIGKILL) are reaped by the next `preflight`.
pub struct LoopBtrfs {
    dir: Option<tempfile::TempDir>,
    device: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopBtrfs {
    /// Makes the filesystem ([`IMAGE_BYTES`]) and mounts it on `mnt` (created if missing), with
    /// quotas on or off.
    pub fn create(mnt: &Path, quotas: Quotas) -> Self {
        Self::create_sized(mnt, quotas, IMAGE_BYTES)
    }

    /// As [`LoopBtrfs::create`], with an image of `bytes`.
    pub fn create_sized(mnt: &Path, quotas: Quotas, bytes: u64) -> Self {
        preflight();
        let dir = tempfile::Builder::new()
            .prefix(FS_DIR_PREFIX)
            .tempdir()
            .expect("temporary directory for the btrfs image");
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).unwrap();
        let image = dir.path().join("btrfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(bytes))
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

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap()
    }

    /// `btrfs qgroup show -re --raw --sync` as printed, for messages.
    pub fn qgroup_table(&self) -> String {
        run(Command::new(tool("btrfs"))
            .args(["qgroup", "show", "-re", "--raw", "--sync"])
            .arg(&self.mnt))
    }

    /// Level-0 qgroups by subvolume id.
    pub fn qgroups(&self) -> BTreeMap<u64, Qgroup> {
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

    pub fn qgroup(&self, id: u64) -> Option<Qgroup> {
        self.qgroups().get(&id).copied()
    }

    /// The id of the subvolume whose root is `path` (`btrfs inspect-internal rootid`).
    pub fn subvolume_id(&self, path: &Path) -> u64 {
        let out = run(Command::new(tool("btrfs"))
            .args(["inspect-internal", "rootid"])
            .arg(path));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("btrfs inspect-internal rootid {}: {out:?}", path.display()))
    }

    /// The filesystem's UUID (`btrfs filesystem show`), which names it under /sys/fs/btrfs.
    pub fn fsid(&self) -> String {
        // Label: none  uuid: 0a1b...
        let out = run(Command::new(tool("btrfs"))
            .args(["filesystem", "show"])
            .arg(&self.mnt));
        out.split_whitespace()
            .skip_while(|w| *w != "uuid:")
            .nth(1)
            .unwrap_or_else(|| panic!("no uuid in `btrfs filesystem show`: {out}"))
            .to_string()
    }

    /// The UUID and, for a snapshot, the Parent UUID of the subvolume whose root is `path`
    /// (`btrfs subvolume show`).
    pub fn subvolume_uuids(&self, path: &Path) -> (String, Option<String>) {
        let out = run(Command::new(tool("btrfs"))
            .args(["subvolume", "show"])
            .arg(path));
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let uuid = field("UUID:").unwrap_or_else(|| {
            panic!(
                "no UUID in `btrfs subvolume show {}`: {out}",
                path.display()
            )
        });
        let parent = field("Parent UUID:").filter(|p| p != "-");
        (uuid, parent)
    }

    /// Paths (relative to the mount) of the live subvolumes.
    pub fn subvolumes(&self) -> Vec<String> {
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

/// What stops making these filesystems here (not root, a tool missing), in words; `None` when
/// nothing does, after reaping filesystems left behind by killed processes. For callers that must
/// not panic (the benches print it and exit non-zero).
pub fn missing_requirements() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "loop-mounted btrfs filesystems need root (losetup, mount); run as root".to_string(),
        );
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| tool_path(t).is_none())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "{} not found (searched PATH and the sbin directories): btrfs-progs (mkfs.btrfs, btrfs) \
             and util-linux (losetup, mount) are needed; {SETUP_HINT}",
            missing.join(", ")
        ));
    }
    reap_stale_filesystems();
    None
}

/// Root, and the tools (btrfs-progs, util-linux), or a failure saying how to get them; then reaps
/// filesystems left behind by processes that were killed (before the harness reaps their cluster
/// directories, which hold the mount points). Called first in every test, so a missing tool fails
/// it before a control plane is started.
pub fn preflight() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/quotas.rs loop-mounts btrfs filesystems and needs root (CI runs the tests as root)"
    );
    for name in TOOLS {
        tool(name);
    }
    reap_stale_filesystems();
}

/// The tool's path (PATH, then the sbin directories a non-login root shell may lack).
pub fn tool_path(name: &str) -> Option<PathBuf> {
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
pub fn tool_or_name(name: &str) -> PathBuf {
    tool_path(name).unwrap_or_else(|| PathBuf::from(name))
}

pub fn tool(name: &str) -> PathBuf {
    tool_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` not found (searched PATH and the sbin directories): the quota e2e tests make \
             real btrfs filesystems and need btrfs-progs (mkfs.btrfs, btrfs) and util-linux (losetup, \
             mount); {SETUP_HINT}"
        )
    })
}

pub fn run(cmd: &mut Command) -> String {
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

/// Unmounts and detaches loop devices whose image lives in a [`FS_DIR_PREFIX`] directory of a
/// process that is gone (or whose image was deleted), and removes those directories.
pub fn reap_stale_filesystems() {
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
