//! Removing and archiving volume directories, for the Delete and Retain/archive reclaim policies.
//!
//! Like `volume_store`, everything goes through an open fd on the data root and one validated name.
//! The walk below it never follows a symlink (symlinks are unlinked, never opened), never enters
//! another filesystem or a bind mount, and holds a constant number of fds whatever the depth: it keeps
//! only the current directory open and climbs back through `..`, checking that `..` is the directory
//! it came from. Removal is idempotent: after a crash or an error part-way, calling it again finishes
//! the job (a missing directory is success).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, fchmod, fchmodat, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

use crate::domain::naming::{self, NameError};
use crate::node::walk::{Entries, START, id, open_beneath, reopen_parent};

/// Prefix of archived directories.
pub const ARCHIVE_PREFIX: &str = "archived-";

/// How many `archived-<name>-<n>` candidates to try before giving up.
const MAX_ARCHIVE_SUFFIX: u32 = 1000;

/// How often a directory is re-read when entries keep appearing in it while we empty it.
const MAX_SCANS: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    UnsafeName(#[from] NameError),
    #[error(
        "{name} in the data root is not a plain directory (a file or a symlink?); hostvol will neither follow nor remove it; move it away"
    )]
    NotADirectory { name: String },
    #[error(
        "{path} (under the data root) is a mount point; hostvol removes nothing on another filesystem; unmount it, then retry to finish the removal"
    )]
    MountPoint { path: PathBuf },
    #[error("{path} (under the data root) was moved or replaced while being removed; retry")]
    Changed { path: PathBuf },
    #[error(
        "{path} is not this volume's directory (it is marked for {}); hostvol leaves it alone",
        owner.as_deref().unwrap_or("no volume")
    )]
    NotOurs { path: String, owner: Option<String> },
    #[error("{name} is not in the data root (already archived or removed?)")]
    NotFound { name: String },
    #[error(
        "cannot archive {name}: {last} and every name before it are taken; clean up old archives"
    )]
    ArchiveNamesTaken { name: String, last: String },
    #[error("{op} {path} (under the data root): {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
}

impl Error {
    /// Short machine-readable kind, for Event reasons and metrics labels.
    pub fn category(&self) -> &'static str {
        match self {
            Error::UnsafeName(_) => "unsafe_name",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::MountPoint { .. } => "mount_point",
            Error::Changed { .. } => "concurrent_change",
            Error::NotFound { .. } => "not_found",
            Error::NotOurs { .. } => "not_ours",
            Error::ArchiveNamesTaken { .. } => "archive_name_taken",
            Error::Io { .. } => "io",
        }
    }
}

/// What a removal deleted. Counts are of this call only: a retry counts what was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemovalStats {
    /// Non-directories unlinked: files, symlinks, sockets, ...
    pub files: u64,
    /// Directories removed, the volume directory included.
    pub directories: u64,
    /// Space freed, as `du` counts it (st_blocks × 512); a hard-linked file counts when its last link goes.
    pub bytes: u64,
}

/// A directory on the walk's path from the volume directory to where it currently is.
struct Frame {
    /// Name in its parent.
    name: CString,
    /// (st_dev, st_ino), to recognise it again when climbing back through `..`.
    id: (u64, u64),
    blocks: u64,
    /// Where to go on reading it: right after the subdirectory the walk went down into. Entries before
    /// it are gone (unlinked as read), so this is all the walk keeps of a directory, whatever its size.
    resume: i64,
    /// Times it was read again because entries appeared while it was emptied.
    rescans: u8,
}

impl Frame {
    fn new(name: CString, st: &FileStat) -> Self {
        Frame {
            name,
            id: id(st),
            blocks: blocks(st),
            resume: START,
            rescans: 0,
        }
    }
}

/// Removes the directory `name` directly under `root` and everything in it.
///
/// Stops with an error naming the path where it stopped (e.g. at a mount point inside the volume,
/// below which nothing is removed); what was removed until then stays removed, and a retry, once
/// the cause is gone, removes the rest. A `name` that does not exist is success with zero counts.
pub fn remove_volume_dir(root: BorrowedFd<'_>, name: &str) -> Result<RemovalStats, Error> {
    naming::validate_directory_name(name)?;
    let cname = CString::new(name)
        .map_err(|_| NameError(format!("{name:?} is not a safe directory name")))?;
    let dev = fstat(root)
        .map_err(|e| Error::Io {
            op: "stat",
            path: PathBuf::from("."),
            source: e,
        })?
        .st_dev;
    let Some((cur, st)) = open_volume_dir(root, &cname, name, dev)? else {
        return Ok(RemovalStats::default());
    };
    let mut walk = Walk {
        root,
        dev,
        cur,
        stack: vec![Frame::new(cname, &st)],
        stats: RemovalStats::default(),
    };
    walk.remove_all()?;
    // Make the removal durable, so a crash after the PV is gone does not bring the directory back.
    fsync(root).map_err(|source| Error::Io {
        op: "sync data root after removing",
        path: PathBuf::from(name),
        source,
    })?;
    Ok(walk.stats)
}

/// Opens the volume directory itself; `None` if it does not exist (already removed).
fn open_volume_dir(
    root: BorrowedFd<'_>,
    cname: &CStr,
    name: &str,
    dev: u64,
) -> Result<Option<(OwnedFd, FileStat)>, Error> {
    match open_dir(root, cname, dev) {
        Ok(opened) => Ok(Some(opened)),
        Err((_, Errno::ENOENT)) => Ok(None),
        Err((_, Errno::ELOOP | Errno::ENOTDIR)) => Err(Error::NotADirectory {
            name: name.to_string(),
        }),
        Err((_, Errno::EXDEV)) => Err(Error::MountPoint {
            path: PathBuf::from(name),
        }),
        Err((op, source)) => Err(Error::Io {
            op,
            path: PathBuf::from(name),
            source,
        }),
    }
}

/// The removal walk: depth first, with only the current directory open.
struct Walk<'r> {
    root: BorrowedFd<'r>,
    dev: u64,
    /// The directory at the top of `stack`: the only fd kept open from one step to the next.
    cur: OwnedFd,
    stack: Vec<Frame>,
    stats: RemovalStats,
}

impl Walk<'_> {
    /// Empties and removes the volume directory, going down into each subdirectory and back up.
    fn remove_all(&mut self) -> Result<(), Error> {
        while !self.stack.is_empty() {
            match empty_files(self.cur.as_fd(), self.dev, &mut self.stack, &mut self.stats)? {
                Some(child) => self.descend(child)?,
                // Everything below is gone.
                None => self.remove_current()?,
            }
        }
        Ok(())
    }

    /// Moves into the subdirectory `child` of the current directory.
    fn descend(&mut self, child: CString) -> Result<(), Error> {
        match open_dir(self.cur.as_fd(), &child, self.dev) {
            Ok((fd, st)) => {
                // Only this one fd stays open; the parent is found again through "..".
                self.cur = fd;
                self.stack.push(Frame::new(child, &st));
                Ok(())
            }
            Err((_, Errno::ENOENT)) => Ok(()), // removed by someone else meanwhile
            Err((_, Errno::ELOOP | Errno::ENOTDIR)) => Err(Error::Changed {
                path: path_of(&self.stack, Some(&child)),
            }),
            Err((_, Errno::EXDEV)) => Err(Error::MountPoint {
                path: path_of(&self.stack, Some(&child)),
            }),
            Err((op, source)) => Err(Error::Io {
                op,
                path: path_of(&self.stack, Some(&child)),
                source,
            }),
        }
    }

    /// Removes the (emptied) current directory from its parent and climbs back to the parent; or, if
    /// something was created in it meanwhile, marks it to be read again.
    fn remove_current(&mut self) -> Result<(), Error> {
        let parent = self.open_parent()?;
        let parent_fd = parent.as_ref().map_or(self.root, |p| p.as_fd());
        let frame = self.stack.last_mut().expect("stack is not empty");
        match unlinkat(parent_fd, frame.name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) => {
                self.stats.directories += 1;
                self.stats.bytes += frame.blocks;
            }
            Err(Errno::ENOENT) => {}
            Err(Errno::ENOTEMPTY | Errno::EEXIST) if frame.rescans < MAX_SCANS => {
                // Something was created meanwhile: read the directory again (cur is still on it).
                frame.resume = START;
                frame.rescans += 1;
                return Ok(());
            }
            Err(Errno::EBUSY) => {
                return Err(Error::MountPoint {
                    path: path_of(&self.stack, None),
                });
            }
            Err(source) => {
                return Err(Error::Io {
                    op: "remove",
                    path: path_of(&self.stack, None),
                    source,
                });
            }
        }
        self.stack.pop();
        if let Some(parent) = parent {
            self.cur = parent;
        }
        Ok(())
    }

    /// The current directory's parent, checked to be the directory we came from; `None` for the volume
    /// directory, whose parent is the data root.
    fn open_parent(&self) -> Result<Option<OwnedFd>, Error> {
        let n = self.stack.len();
        if n == 1 {
            return Ok(None);
        }
        reopen_parent(self.cur.as_fd(), self.stack[n - 2].id)
            .map(Some)
            .map_err(|e| match e {
                None => Error::Changed {
                    path: path_of(&self.stack, None),
                },
                Some(source) => Error::Io {
                    op: "open parent of",
                    path: path_of(&self.stack, None),
                    source,
                },
            })
    }
}

/// Renames `name` to `archived-<name>` (or `archived-<name>-<n>` if taken) under `root`, returns the new
/// name; never overwrites. The archived name is shortened to fit NAME_MAX if needed. A missing `name`
/// is `Error::NotFound` (it may have been archived before a crash).
pub fn archive_volume_dir(root: BorrowedFd<'_>, name: &str) -> Result<String, Error> {
    naming::validate_directory_name(name)?;
    let io = |op, source| Error::Io {
        op,
        path: PathBuf::from(name),
        source,
    };
    match fstatat(root, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_dir(&st) => {}
        Ok(_) => {
            return Err(Error::NotADirectory {
                name: name.to_string(),
            });
        }
        Err(Errno::ENOENT) => {
            return Err(Error::NotFound {
                name: name.to_string(),
            });
        }
        Err(source) => return Err(io("stat", source)),
    }
    let mut last = String::new();
    for n in 0..=MAX_ARCHIVE_SUFFIX {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        // Names are ASCII (validated), so cutting bytes stays on a char boundary.
        let keep = name
            .len()
            .min(naming::MAX_DIRECTORY_NAME - ARCHIVE_PREFIX.len() - suffix.len());
        let candidate = format!("{ARCHIVE_PREFIX}{}{suffix}", &name[..keep]);
        naming::validate_directory_name(&candidate)?;
        match rename_noreplace(root, name, &candidate) {
            Ok(()) => {
                fsync(root).map_err(|source| io("sync data root after archiving", source))?;
                return Ok(candidate);
            }
            Err(Errno::EEXIST) => last = candidate,
            Err(Errno::ENOENT) => {
                return Err(Error::NotFound {
                    name: name.to_string(),
                });
            }
            Err(source) => return Err(io("archive (rename)", source)),
        }
    }
    Err(Error::ArchiveNamesTaken {
        name: name.to_string(),
        last,
    })
}

/// Reads the open directory `dir` (the top of `stack`) from where it was left, unlinking each
/// non-directory as it comes, up to its next subdirectory, which it returns (the frame resumes after
/// it); `None` once the directory holds nothing more. A mount point stops the walk there: what was
/// unlinked before it stays unlinked, and a retry once it is unmounted finishes.
fn empty_files(
    dir: BorrowedFd<'_>,
    dev: u64,
    stack: &mut [Frame],
    stats: &mut RemovalStats,
) -> Result<Option<CString>, Error> {
    let io = |stack: &[Frame], op, child: Option<&CStr>, source| Error::Io {
        op,
        path: path_of(stack, child),
        source,
    };
    let from = stack.last().expect("stack is not empty").resume;
    let mut entries = Entries::open(dir, from).map_err(|e| io(stack, "read", None, e))?;
    while let Some(entry) = entries.next() {
        let entry = entry.map_err(|e| io(stack, "read", None, e))?;
        let name = entry.name;
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(io(stack, "stat", Some(name), e)),
        };
        if st.st_dev != dev {
            return Err(Error::MountPoint {
                path: path_of(stack, Some(name)),
            });
        }
        let subdir = if is_dir(&st) {
            true
        } else {
            // The file's own permissions and owner do not matter for unlink; the parent is writable (open_dir).
            match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    stats.files += 1;
                    if st.st_nlink <= 1 {
                        stats.bytes += blocks(&st);
                    }
                    false
                }
                Err(Errno::ENOENT) => false,
                Err(Errno::EBUSY) => {
                    return Err(Error::MountPoint {
                        path: path_of(stack, Some(name)),
                    });
                }
                Err(Errno::EISDIR) => true, // replaced by a directory meanwhile
                Err(e) => return Err(io(stack, "remove", Some(name), e)),
            }
        };
        if subdir {
            stack.last_mut().expect("stack is not empty").resume = entry.next;
            return Ok(Some(name.to_owned()));
        }
    }
    Ok(None)
}

/// Opens the directory `name` in `parent` without following a symlink or crossing a mount, and makes
/// it u+rwx so its entries can be removed (a pod may have left it 0500 or 0000). Another filesystem or
/// a bind mount is reported as EXDEV. Errors carry what was being done.
fn open_dir(
    parent: BorrowedFd<'_>,
    name: &CStr,
    dev: u64,
) -> Result<(OwnedFd, FileStat), (&'static str, Errno)> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match open_beneath(parent, name, flags | OFlag::O_RDONLY) {
        Err(Errno::EACCES) => {
            // Not root and the directory is not readable: get a handle that needs no permission, give
            // ourselves u+rwx through its /proc link (fchmod refuses O_PATH fds; the link names this
            // very inode, so nothing can be swapped in between), then open it for reading.
            let handle =
                open_beneath(parent, name, flags | OFlag::O_PATH).map_err(|e| ("open", e))?;
            let st = fstat(&handle).map_err(|e| ("stat", e))?;
            if st.st_dev != dev {
                return Err(("open", Errno::EXDEV));
            }
            let link = format!("/proc/self/fd/{}", handle.as_raw_fd());
            fchmodat(
                nix::fcntl::AT_FDCWD,
                link.as_str(),
                user_rwx(&st),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|_| ("open", Errno::EACCES))?;
            openat(
                &handle,
                c".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| ("open", e))?
        }
        other => other.map_err(|e| ("open", e))?,
    };
    let st = fstat(&fd).map_err(|e| ("stat", e))?;
    if st.st_dev != dev {
        return Err(("open", Errno::EXDEV));
    }
    if st.st_mode & 0o700 != 0o700 {
        fchmod(&fd, user_rwx(&st)).map_err(|e| ("make writable", e))?;
    }
    Ok((fd, st))
}

/// Where a renamed volume directory is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    Now,
    /// `from` is gone and `to` is there: an earlier pass renamed it (before a crash).
    Before,
}

/// Renames the volume directory `from` to `to` in the same data root (reuse of retained data). A
/// rename in one directory keeps the inode, so the btrfs subvolume (and its qgroup) or the XFS/ext4
/// project id (and its limit) stay the volume's. Never replaces anything; idempotent for a retry.
pub fn rename_volume_dir(root: BorrowedFd<'_>, from: &str, to: &str) -> Result<Moved, Error> {
    naming::validate_directory_name(from)?;
    naming::validate_directory_name(to)?;
    let io = |op, source| Error::Io {
        op,
        path: PathBuf::from(from),
        source,
    };
    let plain_dir = |name: &str| match fstatat(root, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_dir(&st) => Ok(true),
        Ok(_) => Err(Error::NotADirectory {
            name: name.to_string(),
        }),
        Err(Errno::ENOENT) => Ok(false),
        Err(source) => Err(io("stat", source)),
    };
    match (plain_dir(from)?, plain_dir(to)?) {
        (true, false) => {}
        (false, true) => return Ok(Moved::Before),
        (false, false) => {
            return Err(Error::NotFound {
                name: from.to_string(),
            });
        }
        (true, true) => return Err(io("rename (the new name exists too)", Errno::EEXIST)),
    }
    rename_noreplace(root, from, to).map_err(|source| io("rename", source))?;
    fsync(root).map_err(|source| io("sync data root after renaming", source))?;
    Ok(Moved::Now)
}

pub(crate) fn rename_noreplace(root: BorrowedFd<'_>, from: &str, to: &str) -> Result<(), Errno> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    match nix::fcntl::renameat2(
        root,
        from,
        root,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        // EINVAL: this filesystem does not support the flag; ENOSYS: nor does the kernel.
        Err(Errno::EINVAL | Errno::ENOSYS) => {}
        result => return result,
    }
    // Fallback: check, then rename. Something created between the two would be replaced; only the
    // agent creates names under the root and it archives one volume at a time, so we accept that.
    match fstatat(root, to, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EEXIST),
        Err(Errno::ENOENT) => nix::fcntl::renameat(root, from, root, to),
        Err(e) => Err(e),
    }
}

/// The path of the current directory (plus `child`) relative to the data root, for messages.
fn path_of(stack: &[Frame], child: Option<&CStr>) -> PathBuf {
    stack
        .iter()
        .map(|f| f.name.as_c_str())
        .chain(child)
        .map(|name| OsStr::from_bytes(name.to_bytes()))
        .collect()
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn blocks(st: &FileStat) -> u64 {
    st.st_blocks as u64 * 512
}

fn user_rwx(st: &FileStat) -> Mode {
    Mode::from_bits_truncate((st.st_mode & 0o7777) | 0o700)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;

    fn open(dir: &Path) -> OwnedFd {
        nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    use crate::node::walk::tests::Mounted;

    #[test]
    fn removes_a_tree_counts_it_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-1_ns_c");
        std::fs::create_dir_all(vol.join("a/b/c")).unwrap();
        std::fs::write(vol.join("a/b/c/data"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(vol.join("a/b/c/data"), vol.join("a/link")).unwrap();
        std::fs::write(vol.join("top"), b"x").unwrap();
        std::fs::write(root.path().join("neighbour"), b"keep").unwrap();
        let fd = open(root.path());

        let stats = remove_volume_dir(fd.as_fd(), "pvc-1_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (3, 4), "{stats:?}");
        // The 64 KiB file is counted once, when its last link goes.
        assert!(
            stats.bytes >= 64 * 1024 && stats.bytes < 128 * 1024,
            "{stats:?}"
        );
        assert!(!vol.exists());
        assert_eq!(
            std::fs::read(root.path().join("neighbour")).unwrap(),
            b"keep"
        );

        assert_eq!(
            remove_volume_dir(fd.as_fd(), "pvc-1_ns_c").unwrap(),
            RemovalStats::default()
        );
        assert_eq!(
            remove_volume_dir(fd.as_fd(), "never-existed").unwrap(),
            RemovalStats::default()
        );
    }

    #[test]
    fn symlink_targets_outside_the_root_are_untouched() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target_file = outside.path().join("secret");
        let target_dir = outside.path().join("dir");
        std::fs::write(&target_file, b"precious").unwrap();
        chmod(&target_file, 0o604);
        std::fs::create_dir(&target_dir).unwrap();
        std::fs::write(target_dir.join("inner"), b"also precious").unwrap();
        // Read-only: were it followed, the walk would chmod it and empty it.
        chmod(&target_dir, 0o500);

        let vol = root.path().join("pvc-2_ns_c");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        symlink(&target_file, vol.join("to-file")).unwrap();
        symlink(&target_dir, vol.join("sub/to-dir")).unwrap();
        symlink("../../..", vol.join("sub/up")).unwrap();
        symlink("/", vol.join("to-slash")).unwrap();

        let stats = remove_volume_dir(open(root.path()).as_fd(), "pvc-2_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (4, 2), "{stats:?}");
        assert!(!vol.exists());
        assert_eq!(std::fs::read(&target_file).unwrap(), b"precious");
        assert_eq!(mode(&target_file), 0o604);
        assert_eq!(
            std::fs::read(target_dir.join("inner")).unwrap(),
            b"also precious"
        );
        assert_eq!(mode(&target_dir), 0o500);
        chmod(&target_dir, 0o700);
    }

    #[test]
    fn a_volume_name_that_is_a_symlink_or_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("data"), b"precious").unwrap();
        symlink(outside.path(), root.path().join("pvc-3_ns_c")).unwrap();
        std::fs::write(root.path().join("pvc-4_ns_c"), b"a file").unwrap();
        let fd = open(root.path());

        for name in ["pvc-3_ns_c", "pvc-4_ns_c"] {
            let err = remove_volume_dir(fd.as_fd(), name).unwrap_err();
            assert_eq!(err.category(), "not_a_directory", "{err}");
            assert!(err.to_string().contains(name), "{err}");
            assert_eq!(
                archive_volume_dir(fd.as_fd(), name).unwrap_err().category(),
                "not_a_directory"
            );
        }
        assert!(
            std::fs::symlink_metadata(root.path().join("pvc-3_ns_c"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read(outside.path().join("data")).unwrap(),
            b"precious"
        );
        assert_eq!(
            std::fs::read(root.path().join("pvc-4_ns_c")).unwrap(),
            b"a file"
        );
    }

    #[test]
    fn unsafe_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        for bad in ["..", ".", "/", "", "a/b", "../x", "/etc", ".hidden", "a\0b"] {
            assert_eq!(
                remove_volume_dir(fd.as_fd(), bad).unwrap_err().category(),
                "unsafe_name",
                "{bad:?}"
            );
            assert_eq!(
                archive_volume_dir(fd.as_fd(), bad).unwrap_err().category(),
                "unsafe_name",
                "{bad:?}"
            );
        }
        assert!(root.path().exists());
    }

    #[test]
    fn read_only_directories_and_files_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-5_ns_c");
        std::fs::create_dir_all(vol.join("locked/inner")).unwrap();
        std::fs::create_dir_all(vol.join("readonly")).unwrap();
        for (file, m) in [
            ("locked/f1", 0o000),
            ("locked/inner/f2", 0o000),
            ("readonly/f3", 0o400),
        ] {
            std::fs::write(vol.join(file), b"x").unwrap();
            chmod(&vol.join(file), m);
        }
        // Innermost first: a 0000 directory cannot be changed below any more.
        chmod(&vol.join("locked/inner"), 0o000);
        chmod(&vol.join("locked"), 0o000);
        chmod(&vol.join("readonly"), 0o500);
        chmod(&vol, 0o500);

        let stats = remove_volume_dir(open(root.path()).as_fd(), "pvc-5_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (3, 4), "{stats:?}");
        assert!(!vol.exists());
    }

    #[test]
    fn files_and_directories_of_other_owners_are_removed() {
        // chown to another uid needs root; CI runs as root, like the agent.
        assert!(
            is_root(),
            "this test needs root (chown, mount); run it as root, as scripts/test.sh does in CI"
        );
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-6_ns_c");
        std::fs::create_dir_all(vol.join("theirs/deeper")).unwrap();
        std::fs::create_dir_all(vol.join("sticky")).unwrap();
        for file in ["f", "theirs/f", "theirs/deeper/f", "sticky/f"] {
            std::fs::write(vol.join(file), b"x").unwrap();
            std::os::unix::fs::chown(vol.join(file), Some(12345), Some(12345)).unwrap();
            chmod(&vol.join(file), 0o000);
        }
        for dir in ["theirs/deeper", "theirs", "sticky", ""] {
            std::os::unix::fs::chown(vol.join(dir), Some(12346), Some(12346)).unwrap();
        }
        chmod(&vol.join("sticky"), 0o1777);
        chmod(&vol.join("theirs/deeper"), 0o000);
        chmod(&vol.join("theirs"), 0o000);
        chmod(&vol, 0o000);

        let stats = remove_volume_dir(open(root.path()).as_fd(), "pvc-6_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (4, 4), "{stats:?}");
        assert!(!vol.exists());
    }

    #[test]
    fn deep_trees_use_a_constant_number_of_fds() {
        const DEPTH: usize = 2000;
        // An fd per level would run out long before 2,000 levels.
        if !crate::node::walk::tests::in_child_with_few_fds(concat!(
            module_path!(),
            "::deep_trees_use_a_constant_number_of_fds"
        )) {
            return;
        }

        let root = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        // Built through fds, one level at a time: the path is too long for path-based calls.
        nix::sys::stat::mkdirat(fd.as_fd(), "pvc-7_ns_c", Mode::from_bits_truncate(0o700)).unwrap();
        let mut cur = openat(
            fd.as_fd(),
            "pvc-7_ns_c",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for level in 0..DEPTH {
            if level % 100 == 0 {
                let file = openat(
                    cur.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o400),
                )
                .unwrap();
                drop(file);
            }
            nix::sys::stat::mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o700)).unwrap();
            let child = openat(
                cur.as_fd(),
                "d",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
            if level % 7 == 0 {
                fchmod(cur.as_fd(), Mode::from_bits_truncate(0o500)).unwrap();
            }
            cur = child;
        }
        drop(cur);

        let stats = remove_volume_dir(fd.as_fd(), "pvc-7_ns_c").unwrap();
        assert_eq!(
            (stats.files, stats.directories),
            ((DEPTH / 100) as u64, DEPTH as u64 + 1),
            "{stats:?}"
        );
        assert!(!root.path().join("pvc-7_ns_c").exists());
    }

    #[test]
    fn wide_directories_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-8_ns_c");
        std::fs::create_dir_all(vol.join("wide")).unwrap();
        for i in 0..20_000 {
            std::fs::write(vol.join(format!("wide/file-{i}")), b"").unwrap();
        }
        for i in 0..20 {
            std::fs::create_dir(vol.join(format!("wide/dir-{i}"))).unwrap();
            std::fs::write(vol.join(format!("wide/dir-{i}/f")), b"x").unwrap();
        }
        let stats = remove_volume_dir(open(root.path()).as_fd(), "pvc-8_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (20_020, 22), "{stats:?}");
        assert!(!vol.exists());
    }

    #[test]
    fn stops_at_mount_points_and_a_retry_finishes() {
        let root = tempfile::tempdir().unwrap();
        let vol = root.path().join("pvc-9_ns_c");
        std::fs::create_dir_all(vol.join("a/mnt")).unwrap();
        std::fs::write(vol.join("a/mnt/below"), b"under the mount").unwrap();
        let mount = Mounted::new(&["-t", "tmpfs", "tmpfs"], &vol.join("a/mnt"));
        std::fs::write(vol.join("a/mnt/on-tmpfs"), b"other filesystem").unwrap();
        let fd = open(root.path());

        let err = remove_volume_dir(fd.as_fd(), "pvc-9_ns_c").unwrap_err();
        assert_eq!(err.category(), "mount_point", "{err}");
        assert!(err.to_string().contains("pvc-9_ns_c/a/mnt"), "{err}");
        assert_eq!(
            std::fs::read(vol.join("a/mnt/on-tmpfs")).unwrap(),
            b"other filesystem"
        );

        drop(mount);
        let stats = remove_volume_dir(fd.as_fd(), "pvc-9_ns_c").unwrap();
        assert_eq!((stats.files, stats.directories), (1, 3), "{stats:?}");
        assert!(!vol.exists());
    }

    #[test]
    fn stops_at_bind_mounts_of_the_same_filesystem() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("data"), b"precious").unwrap();
        let vol = root.path().join("pvc-10_ns_c");
        std::fs::create_dir_all(vol.join("bound")).unwrap();
        let _mount = Mounted::new(&["--bind", outside.to_str().unwrap()], &vol.join("bound"));
        let err = remove_volume_dir(open(root.path()).as_fd(), "pvc-10_ns_c").unwrap_err();
        assert_eq!(err.category(), "mount_point", "{err}");
        assert!(err.to_string().contains("pvc-10_ns_c/bound"), "{err}");
        assert_eq!(std::fs::read(outside.join("data")).unwrap(), b"precious");

        // A bind-mounted file: same device too; unlink refuses it with EBUSY.
        let vol = root.path().join("pvc-12_ns_c");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("bound-file"), b"").unwrap();
        let _file_mount = Mounted::new(
            &["--bind", outside.join("data").to_str().unwrap()],
            &vol.join("bound-file"),
        );
        let err = remove_volume_dir(open(root.path()).as_fd(), "pvc-12_ns_c").unwrap_err();
        assert_eq!(err.category(), "mount_point", "{err}");
        assert!(err.to_string().contains("pvc-12_ns_c/bound-file"), "{err}");
        assert_eq!(std::fs::read(outside.join("data")).unwrap(), b"precious");
    }

    #[test]
    fn renames_a_volume_once_keeping_its_inode_and_never_replacing() {
        let root = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        std::fs::create_dir(root.path().join("pvc-1_ns_a")).unwrap();
        std::fs::write(root.path().join("pvc-1_ns_a/index.html"), "kept").unwrap();
        let inode = std::fs::metadata(root.path().join("pvc-1_ns_a"))
            .unwrap()
            .ino();
        assert_eq!(
            rename_volume_dir(fd.as_fd(), "pvc-1_ns_a", "pvc-2_ns_a").unwrap(),
            Moved::Now
        );
        let moved = root.path().join("pvc-2_ns_a");
        assert_eq!(std::fs::metadata(&moved).unwrap().ino(), inode);
        assert_eq!(std::fs::read(moved.join("index.html")).unwrap(), b"kept");
        // A retry after a crash finds it done.
        assert_eq!(
            rename_volume_dir(fd.as_fd(), "pvc-1_ns_a", "pvc-2_ns_a").unwrap(),
            Moved::Before
        );
        // Both names there: nothing is replaced.
        std::fs::create_dir(root.path().join("pvc-1_ns_a")).unwrap();
        assert!(rename_volume_dir(fd.as_fd(), "pvc-1_ns_a", "pvc-2_ns_a").is_err());
        assert!(root.path().join("pvc-2_ns_a/index.html").exists());
        // Neither: an error, not a success.
        assert!(matches!(
            rename_volume_dir(fd.as_fd(), "pvc-3_ns_a", "pvc-4_ns_a"),
            Err(Error::NotFound { .. })
        ));
        // A symlink is neither followed nor moved; names leaving the root are refused.
        symlink(root.path(), root.path().join("pvc-5_ns_a")).unwrap();
        assert!(matches!(
            rename_volume_dir(fd.as_fd(), "pvc-5_ns_a", "pvc-6_ns_a"),
            Err(Error::NotADirectory { .. })
        ));
        assert!(rename_volume_dir(fd.as_fd(), "pvc-2_ns_a", "../x").is_err());
        assert!(rename_volume_dir(fd.as_fd(), "..", "pvc-7_ns_a").is_err());
    }

    #[test]
    fn archives_without_overwriting() {
        let root = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        let mut archived = Vec::new();
        for generation in 0..3u8 {
            std::fs::create_dir(root.path().join("pvc-11_ns_c")).unwrap();
            std::fs::write(root.path().join("pvc-11_ns_c/data"), [generation]).unwrap();
            archived.push(archive_volume_dir(fd.as_fd(), "pvc-11_ns_c").unwrap());
        }
        assert_eq!(
            archived,
            [
                "archived-pvc-11_ns_c",
                "archived-pvc-11_ns_c-1",
                "archived-pvc-11_ns_c-2"
            ]
        );
        for (generation, name) in archived.iter().enumerate() {
            assert_eq!(
                std::fs::read(root.path().join(name).join("data")).unwrap(),
                [generation as u8]
            );
        }
        assert!(!root.path().join("pvc-11_ns_c").exists());
        assert_eq!(
            archive_volume_dir(fd.as_fd(), "pvc-11_ns_c")
                .unwrap_err()
                .category(),
            "not_found"
        );

        // A name at NAME_MAX is shortened so the archived name still fits.
        let long = "a".repeat(naming::MAX_DIRECTORY_NAME);
        for suffix in ["", "-1"] {
            std::fs::create_dir(root.path().join(&long)).unwrap();
            let name = archive_volume_dir(fd.as_fd(), &long).unwrap();
            assert_eq!(name.len(), naming::MAX_DIRECTORY_NAME);
            assert!(
                name.starts_with(ARCHIVE_PREFIX) && name.ends_with(&format!("a{suffix}")),
                "{name}"
            );
        }
    }
}
