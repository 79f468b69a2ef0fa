//! Bytes and inodes used by each volume directory, measured off the request path and cached.
//!
//! A walk never follows symlinks (everything is opened relative to its parent with O_NOFOLLOW),
//! never crosses into another filesystem (entries on another device are neither counted nor entered),
//! and counts hard-linked files once.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};

use crate::domain::pattern::VolumePath;
use crate::node::parents;
use crate::node::walk::{Entries, START, id, open_beneath, reopen_parent};

/// Deepest directory nesting we walk into; deeper trees are counted up to here.
const MAX_DEPTH: usize = 512;

/// Hard-linked inodes remembered per walk (about 2 MiB), so a tenant's millions of links cannot grow it.
const MAX_SEEN_LINKS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Allocated bytes (st_blocks * 512), as `du` reports.
    pub bytes: u64,
    /// Files and directories, where known (walks and project quotas count them; btrfs qgroups do not).
    pub inodes: Option<u64>,
    pub measured_at: SystemTime,
}

/// Measures the directory `name` under the open root `root`.
///
/// Depth first with one directory open at a time: each level keeps only its identity and where to
/// resume reading it, so memory depends on neither the number of entries nor the depth's fds.
pub fn measure(root: BorrowedFd<'_>, name: &str) -> Result<Usage, Errno> {
    // A volume below parents (directoryPattern): each parent opened without following symlinks.
    let path = VolumePath::parse(name).map_err(|_| Errno::EINVAL)?;
    let at = parents::locate(root, &path)?;
    let top = nix::fcntl::openat(
        at.parent(root),
        at.leaf.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(top.as_fd())?;
    let device = st.st_dev;
    let mut totals = (st.st_blocks as u64 * 512, 1u64);
    let mut seen_links = HashSet::new();
    walk(top, id(&st), device, &mut totals, &mut seen_links)?;
    Ok(Usage {
        bytes: totals.0,
        inodes: Some(totals.1),
        measured_at: SystemTime::now(),
    })
}

/// A directory on the path from the volume to the current one: its identity, to check `..` against
/// when climbing back, and where to go on reading it.
struct Level {
    id: (u64, u64),
    resume: i64,
}

fn walk(
    top: OwnedFd,
    top_id: (u64, u64),
    device: u64,
    totals: &mut (u64, u64),
    seen_links: &mut HashSet<u64>,
) -> Result<(), Errno> {
    let mut cur = top;
    let mut stack = vec![Level {
        id: top_id,
        resume: START,
    }];
    'levels: while let Some(level) = stack.last() {
        let depth = stack.len();
        let mut entries = Entries::open(cur.as_fd(), level.resume)?;
        while let Some(entry) = entries.next() {
            let entry = entry?;
            let Ok(st) = fstatat(cur.as_fd(), entry.name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue; // removed meanwhile
            };
            if st.st_dev != device {
                continue; // a mount inside the volume: not ours to count or enter
            }
            let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
            if !is_dir && st.st_nlink > 1 {
                if seen_links.contains(&st.st_ino) {
                    continue;
                }
                // Bounded too: past this many, further hard-linked files are counted once per link.
                if seen_links.len() < MAX_SEEN_LINKS {
                    seen_links.insert(st.st_ino);
                }
            }
            totals.0 += st.st_blocks as u64 * 512;
            totals.1 += 1;
            if is_dir && depth <= MAX_DEPTH {
                let flags =
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let Ok(child) = open_beneath(cur.as_fd(), entry.name, flags) else {
                    continue; // gone, replaced, or a bind mount: not ours to enter
                };
                let child_st = fstat(child.as_fd())?;
                if child_st.st_dev != device {
                    continue;
                }
                stack[depth - 1].resume = entry.next;
                stack.push(Level {
                    id: id(&child_st),
                    resume: START,
                });
                cur = child;
                continue 'levels;
            }
        }
        stack.pop();
        if let Some(parent) = stack.last() {
            // A parent moved meanwhile could lead us outside the volume: stop, the next refresh retries.
            cur = reopen_parent(cur.as_fd(), parent.id).map_err(|e| e.unwrap_or(Errno::ESTALE))?;
        }
    }
    Ok(())
}

/// Latest measurement per volume: keyed by data root and directory, since two roots may hold the
/// same relative path (a `directoryPattern` such as `{claim}`).
#[derive(Debug, Default, Clone)]
pub struct UsageCache {
    inner: Arc<RwLock<HashMap<(String, String), Usage>>>,
}

impl UsageCache {
    pub fn get(&self, root: &str, directory: &str) -> Option<Usage> {
        self.inner
            .read()
            .get(&(root.to_string(), directory.to_string()))
            .copied()
    }

    pub fn insert(&self, root: &str, directory: &str, usage: Usage) {
        self.inner
            .write()
            .insert((root.to_string(), directory.to_string()), usage);
    }

    /// Drops entries for directories that are no longer volumes.
    pub fn retain(&self, keep: &HashSet<(String, String)>) {
        self.inner.write().retain(|k, _| keep.contains(k));
    }

    pub fn total_bytes(&self) -> u64 {
        self.inner.read().values().map(|u| u.bytes).sum()
    }
}

/// Refreshes `directories` with at most `concurrency` walks at once, each on the blocking pool.
/// Returns how many were measured and how long it took.
pub async fn refresh(
    root_name: &str,
    root: Arc<OwnedFd>,
    directories: Vec<String>,
    cache: &UsageCache,
    concurrency: usize,
) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for directory in directories {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let root = root.clone();
        tasks.spawn_blocking(move || {
            let _permit = permit;
            let result = measure(root.as_fd(), &directory);
            (directory, result)
        });
    }
    let mut measured = 0;
    while let Some(done) = tasks.join_next().await {
        if let Ok((directory, Ok(usage))) = done {
            cache.insert(root_name, &directory, usage);
            measured += 1;
        }
    }
    (measured, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn counts_files_without_following_symlinks_or_double_counting_links() {
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-1_ns_c");
        std::fs::create_dir_all(vol.join("a/b")).unwrap();
        std::fs::write(vol.join("a/b/data"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(vol.join("a/b/data"), vol.join("a/link")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![1u8; 1024 * 1024]).unwrap();
        std::os::unix::fs::symlink(outside.path(), vol.join("escape")).unwrap();

        let usage = measure(open(root.path()).as_fd(), "pvc-1_ns_c").unwrap();
        // 64 KiB of data plus directory blocks; the 1 MiB behind the symlink is not counted.
        assert!(
            usage.bytes >= 64 * 1024 && usage.bytes < 1024 * 1024,
            "{usage:?}"
        );
        // top, a, b, data (once despite the hard link), escape
        assert_eq!(usage.inodes, Some(5), "{usage:?}");
    }

    #[test]
    fn deep_trees_use_a_constant_number_of_fds() {
        // An fd per level would run out at about 60 of the 300 levels.
        if !crate::node::walk::tests::in_child_with_few_fds(concat!(
            module_path!(),
            "::deep_trees_use_a_constant_number_of_fds"
        )) {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        nix::sys::stat::mkdirat(fd.as_fd(), "pvc-3_ns_c", Mode::from_bits_truncate(0o700)).unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let mut cur = nix::fcntl::openat(fd.as_fd(), "pvc-3_ns_c", flags, Mode::empty()).unwrap();
        for _ in 0..300 {
            nix::sys::stat::mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o700)).unwrap();
            drop(
                nix::fcntl::openat(
                    cur.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o600),
                )
                .unwrap(),
            );
            cur = nix::fcntl::openat(cur.as_fd(), "d", flags, Mode::empty()).unwrap();
        }
        drop(cur);
        let usage = measure(fd.as_fd(), "pvc-3_ns_c").unwrap();
        // The volume, and a directory and a file per level.
        assert_eq!(usage.inodes, Some(1 + 2 * 300), "{usage:?}");
    }

    #[test]
    fn refuses_a_symlinked_volume() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", root.path().join("pvc-2_ns_c")).unwrap();
        assert!(measure(open(root.path()).as_fd(), "pvc-2_ns_c").is_err());
    }

    #[tokio::test]
    async fn refresh_fills_the_cache() {
        let root = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::create_dir(root.path().join(format!("v{i}"))).unwrap();
            std::fs::write(root.path().join(format!("v{i}/f")), b"x").unwrap();
        }
        let cache = UsageCache::default();
        let dirs: Vec<String> = (0..5).map(|i| format!("v{i}")).collect();
        let (n, _) = refresh("default", Arc::new(open(root.path())), dirs, &cache, 2).await;
        assert_eq!(n, 5);
        assert_eq!(cache.get("default", "v3").unwrap().inodes, Some(2));
        assert!(
            cache.get("other", "v3").is_none(),
            "another root's v3 is another volume"
        );
    }
}
