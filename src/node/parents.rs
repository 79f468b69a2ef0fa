//! Volumes below parent directories (`directoryPattern` such as `{namespace}/{claim}`): finding a
//! volume's parent, making the parents, removing the ones left empty, and the ownership mark.
//!
//! Every parent is opened from the previous one, one name at a time, with `O_NOFOLLOW|O_DIRECTORY`
//! (and `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS` where the kernel has `openat2`): a symlink or a file
//! put where a parent should be stops the operation, never leads outside the root. Functions below
//! then work on (parent handle, leaf name) exactly as on (root handle, name) for flat volumes.
//!
//! Ownership: a flat `<pv>_...` directory proves by its name whose it is. A patterned one carries the
//! extended attribute `trusted.hostvol.pv=<pv name>`, set before the directory gets its final name
//! (so no patterned volume ever exists unmarked) and read from the opened directory before any
//! removal, archive or size change. `trusted.*` attributes need CAP_SYS_ADMIN in the filesystem's
//! user namespace: pods using the volume cannot forge or remove it, and people who may create PVs
//! cannot reach the disk; ext4, XFS, btrfs, tmpfs and overlayfs keep them.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

use crate::domain::pattern::VolumePath;
use crate::node::walk::open_beneath;

/// The ownership mark of patterned volumes.
pub const OWNER_XATTR: &std::ffi::CStr = c"trusted.hostvol.pv";

/// A volume's parent, opened, and its leaf name.
#[derive(Debug)]
pub struct Located {
    /// `None` for a flat volume, whose parent is the root itself.
    parent: Option<OwnedFd>,
    pub leaf: String,
}

impl Located {
    /// The handle to use as the volume's "root" in the flat-volume functions.
    pub fn parent<'a>(&'a self, root: BorrowedFd<'a>) -> BorrowedFd<'a> {
        self.parent.as_ref().map_or(root, |p| p.as_fd())
    }
}

/// Opens the parents of `path` (which must exist); ENOENT if one is missing, ELOOP/ENOTDIR if one is
/// a symlink or not a directory.
pub fn locate(root: BorrowedFd<'_>, path: &VolumePath) -> Result<Located, Errno> {
    walk_parents(root, path, false)
}

/// Like [`locate`], making missing parents (mode 0755: people browse them; a volume's own mode is
/// set on the leaf). A parent that exists is fine when it is a real directory, never a symlink.
pub fn make_parents(root: BorrowedFd<'_>, path: &VolumePath) -> Result<Located, Errno> {
    walk_parents(root, path, true)
}

fn walk_parents(root: BorrowedFd<'_>, path: &VolumePath, create: bool) -> Result<Located, Errno> {
    let mut parent: Option<OwnedFd> = None;
    for segment in path.parents() {
        let at = parent.as_ref().map_or(root, |p| p.as_fd());
        let name = CString::new(segment).map_err(|_| Errno::EINVAL)?;
        if create {
            match mkdirat(at, name.as_c_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) => fsync(at)?, // the new entry is durable before anything is made in it
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        parent = Some(open_beneath(at, &name, flags)?);
    }
    Ok(Located {
        parent,
        leaf: path.leaf().to_string(),
    })
}

/// After the leaf is gone: removes the parents it leaves empty, innermost first, stopping at the
/// first one that still holds something (a sibling volume, anything): siblings are never touched.
/// Returns how many were removed. A parent another volume is being made in meanwhile is either
/// still there or recreated by that volume's next pass (creation retries a vanished parent).
pub fn remove_empty_parents(root: BorrowedFd<'_>, path: &VolumePath) -> Result<usize, Errno> {
    let parents = path.parent_paths();
    let mut removed = 0;
    for inner in parents.iter().rev() {
        let parent_path = VolumePath::parse(inner).map_err(|_| Errno::EINVAL)?;
        let at = match locate(root, &parent_path) {
            Ok(at) => at,
            Err(Errno::ENOENT) => continue, // its own parent went already: go on upwards
            Err(e) => return Err(e),
        };
        let dir = at.parent(root);
        match unlinkat(dir, at.leaf.as_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) => {
                fsync(dir)?;
                removed += 1;
            }
            Err(Errno::ENOENT) => {}
            Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::EBUSY) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Marks the open directory `dir` as the volume of PV `pv`.
pub fn set_owner(dir: BorrowedFd<'_>, pv: &str) -> Result<(), Errno> {
    // SAFETY: a valid fd, a NUL-terminated name, and a buffer of the given length.
    let rc = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            OWNER_XATTR.as_ptr(),
            pv.as_ptr().cast(),
            pv.len(),
            0,
        )
    };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Removes the ownership mark of the open directory `dir`, if it has one (a snapshot of a marked
/// volume that becomes a volume named for its PV).
pub fn clear_owner(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: a valid fd and a NUL-terminated name.
    let rc = unsafe { libc::fremovexattr(dir.as_raw_fd(), OWNER_XATTR.as_ptr()) };
    match rc {
        0 => Ok(()),
        _ => match Errno::last() {
            Errno::ENODATA | Errno::EOPNOTSUPP => Ok(()),
            e => Err(e),
        },
    }
}

/// The PV the open directory `dir` is marked for, if any.
pub fn owner_of(dir: BorrowedFd<'_>) -> Result<Option<String>, Errno> {
    // PV names are at most 253 bytes: a longer value is not ours.
    let mut buffer = [0u8; 256];
    // SAFETY: a valid fd, a NUL-terminated name, and a buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            OWNER_XATTR.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    if n < 0 {
        return match Errno::last() {
            Errno::ENODATA | Errno::ERANGE => Ok(None),
            e => Err(e),
        };
    }
    Ok(Some(
        String::from_utf8_lossy(&buffer[..n as usize]).into_owned(),
    ))
}

/// Hands the patterned volume at `path` from PV `from` to PV `to` by rewriting its mark (reuse of
/// retained data: the directory stays where people know it). True if this call moved the mark, false
/// if an earlier pass did (a retry after a crash); ENOENT if the directory is gone, EPERM if it is
/// marked for neither PV, so nothing else's volume is ever handed over.
pub fn hand_over(
    root: BorrowedFd<'_>,
    path: &VolumePath,
    from: &str,
    to: &str,
) -> Result<bool, Errno> {
    let at = locate(root, path)?;
    let name = CString::new(at.leaf.as_str()).map_err(|_| Errno::EINVAL)?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = open_beneath(at.parent(root), &name, flags)?;
    match owner_of(dir.as_fd())? {
        Some(owner) if owner == to => Ok(false),
        Some(owner) if owner == from => {
            set_owner(dir.as_fd(), to)?;
            fsync(dir.as_fd())?;
            Ok(true)
        }
        _ => Err(Errno::EPERM),
    }
}

/// Whose a volume directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// PV `pv`'s: named for it (flat) or marked for it.
    Owned,
    /// Nothing there (already removed): nothing to protect.
    Gone,
    /// Someone else's, or unmarked: hostvol leaves it alone. Holds the mark, if any.
    Foreign(Option<String>),
}

/// Whether the volume at `path` is PV `pv`'s (see the module documentation).
pub fn ownership(root: BorrowedFd<'_>, path: &VolumePath, pv: &str) -> Result<Ownership, Errno> {
    if path.is_named_for(pv) {
        return Ok(Ownership::Owned);
    }
    let at = match locate(root, path) {
        Ok(at) => at,
        Err(Errno::ENOENT) => return Ok(Ownership::Gone),
        Err(e) => return Err(e),
    };
    let name = CString::new(at.leaf.as_str()).map_err(|_| Errno::EINVAL)?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = match open_beneath(at.parent(root), &name, flags) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(Ownership::Gone),
        Err(e) => return Err(e),
    };
    match owner_of(dir.as_fd())? {
        Some(owner) if owner == pv => Ok(Ownership::Owned),
        other => Ok(Ownership::Foreign(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    fn path(p: &str) -> VolumePath {
        VolumePath::parse(p).unwrap()
    }

    #[test]
    fn parents_are_made_found_and_pruned_without_touching_siblings() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        let at = make_parents(root.as_fd(), &path("ns/team/a")).unwrap();
        mkdirat(
            at.parent(root.as_fd()),
            "a",
            Mode::from_bits_truncate(0o700),
        )
        .unwrap();
        let at = make_parents(root.as_fd(), &path("ns/team/b")).unwrap();
        mkdirat(
            at.parent(root.as_fd()),
            "b",
            Mode::from_bits_truncate(0o700),
        )
        .unwrap();
        assert!(dir.path().join("ns/team/a").is_dir() && dir.path().join("ns/team/b").is_dir());
        assert_eq!(locate(root.as_fd(), &path("ns/team/a")).unwrap().leaf, "a");
        assert_eq!(
            locate(root.as_fd(), &path("other/x")).unwrap_err(),
            Errno::ENOENT
        );
        std::fs::remove_dir(dir.path().join("ns/team/a")).unwrap();
        // A sibling remains: nothing above it goes.
        assert_eq!(
            remove_empty_parents(root.as_fd(), &path("ns/team/a")).unwrap(),
            0
        );
        assert!(dir.path().join("ns/team/b").is_dir());
        std::fs::remove_dir(dir.path().join("ns/team/b")).unwrap();
        assert_eq!(
            remove_empty_parents(root.as_fd(), &path("ns/team/b")).unwrap(),
            2
        );
        assert!(!dir.path().join("ns").exists() && dir.path().exists());
        // A flat volume has no parents to prune.
        assert_eq!(
            remove_empty_parents(root.as_fd(), &path("flat")).unwrap(),
            0
        );
    }

    #[test]
    fn symlinked_parents_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("ns")).unwrap();
        let root = open(dir.path());
        for made in [
            make_parents(root.as_fd(), &path("ns/c")),
            locate(root.as_fd(), &path("ns/c")),
        ] {
            assert!(matches!(
                made.unwrap_err(),
                Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV
            ));
        }
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert_eq!(
            make_parents(root.as_fd(), &path("file/c")).unwrap_err(),
            Errno::ENOTDIR
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn ownership_by_name_or_mark() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        std::fs::create_dir_all(dir.path().join("ns/c")).unwrap();
        let p = path("ns/c");
        assert_eq!(
            ownership(root.as_fd(), &p, "pvc-1").unwrap(),
            Ownership::Foreign(None)
        );
        let leaf = open(&dir.path().join("ns/c"));
        set_owner(leaf.as_fd(), "pvc-1").unwrap();
        assert_eq!(
            ownership(root.as_fd(), &p, "pvc-1").unwrap(),
            Ownership::Owned
        );
        assert_eq!(
            ownership(root.as_fd(), &p, "pvc-2").unwrap(),
            Ownership::Foreign(Some("pvc-1".into()))
        );
        assert_eq!(
            ownership(root.as_fd(), &path("ns/gone"), "pvc-1").unwrap(),
            Ownership::Gone
        );
        assert_eq!(
            ownership(root.as_fd(), &path("pvc-1_ns_c"), "pvc-1").unwrap(),
            Ownership::Owned
        );
    }

    #[test]
    fn a_marked_volume_is_handed_over_once_and_only_from_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        std::fs::create_dir_all(dir.path().join("ns/c")).unwrap();
        let p = path("ns/c");
        // Unmarked: not ours to hand over.
        assert_eq!(
            hand_over(root.as_fd(), &p, "pvc-1", "pvc-2"),
            Err(Errno::EPERM)
        );
        set_owner(open(&dir.path().join("ns/c")).as_fd(), "pvc-1").unwrap();
        assert_eq!(
            hand_over(root.as_fd(), &p, "pvc-3", "pvc-2"),
            Err(Errno::EPERM)
        );
        assert_eq!(hand_over(root.as_fd(), &p, "pvc-1", "pvc-2"), Ok(true));
        // A retry after a crash finds it done.
        assert_eq!(hand_over(root.as_fd(), &p, "pvc-1", "pvc-2"), Ok(false));
        assert_eq!(
            ownership(root.as_fd(), &p, "pvc-2").unwrap(),
            Ownership::Owned
        );
        assert_eq!(
            hand_over(root.as_fd(), &path("ns/gone"), "pvc-1", "pvc-2"),
            Err(Errno::ENOENT)
        );
    }
}
