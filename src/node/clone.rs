//! Cloning a volume: a new claim whose `dataSource` is an existing claim gets a copy of its data.
//!
//! Two ways, both working on open fds on the directories holding the volumes (the data root, or a
//! volume's parent below it with `directoryPattern`) and validated leaf names:
//! - [`snapshot`] (btrfs, volumes that are subvolumes): the new volume is a writable snapshot of the
//!   source, made instantly and sharing its extents. Nested subvolumes are not part of a snapshot
//!   (they show up as empty directories in it).
//! - [`copy_into`] (every filesystem): fills a new, empty volume the caller made (with its own mode,
//!   owner and size limit) with a copy of the source's tree.
//!
//! # What the copy keeps
//!
//! - Directories: mode, owner, access and modification times.
//! - Regular files: contents, mode (setuid and setgid included: set after the owner, which clears
//!   them), owner, times. Contents are reflinked (`FICLONE`: shared extents, instant) where the
//!   filesystem can (btrfs, XFS with reflink), else copied in the kernel (`copy_file_range`), else
//!   read and written; holes stay holes where the filesystem reports them (`SEEK_DATA`).
//! - Symbolic links: recreated with the same target text, owner and times; never followed.
//! - FIFOs: recreated.
//! - Hard links: each name becomes a file of its own (the copy takes their space once per name).
//! - Device nodes and sockets: skipped and counted ([`CloneStats::skipped`]): a volume has no use for
//!   device nodes, and a socket means nothing without the process that listened on it.
//! - Mount points and nested btrfs subvolumes (another `st_dev`, or any mount where the kernel has
//!   `openat2`): not entered, not recreated, counted ([`CloneStats::mount_points`]).
//! - Not kept: extended attributes (so neither POSIX ACLs, file capabilities nor security labels),
//!   inode flags (`chattr`), change times.
//!
//! # Safety
//!
//! As in `removal`: the walk never follows a symlink (symlinks are read with `readlink`, every open
//! has `O_NOFOLLOW` and, where the kernel has it, `openat2` with `RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV`), never leaves the source volume's filesystem, and holds a constant number of fds
//! whatever the depth: only the current source and target directories stay open, and it climbs back
//! through `..`, checking that `..` is the directory it came from. Everything it creates in the target
//! is created exclusively (`O_EXCL`, `mkdir`, `symlink`, `mkfifo` all fail on an existing name).
//!
//! The source should not change during a copy: files are copied one after the other, so the copy of a
//! volume in use is no point-in-time image (a snapshot is). An interrupted copy leaves a partial target,
//! which a retry refuses (not empty): remove the target and make it again. Reflinks into a btrfs
//! subvolume are not checked against its limit (see `quota::btrfs`). All calls block: run them off the
//! async executor.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{
    FileStat, Mode, SFlag, UtimensatFlags, fchmod, fstat, fstatat, futimens, mkdirat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{
    Gid, Uid, Whence, fchown, fchownat, fsync, ftruncate, lseek, mkfifoat, symlinkat, syncfs,
};

use crate::domain::naming::{self, NameError};
use crate::node::abi::iow;
use crate::node::quota::btrfs;
use crate::node::walk::{Entries, START, id, open_beneath, reopen_parent};

/// `FICLONE` (`_IOW(0x94, 9, int)`): makes the destination share all the source's extents. Built
/// from the generic encoding (`node::abi`) with the argument's size on this target.
const FICLONE: u32 = iow(0x94, 9, size_of::<libc::c_int>());
/// Most bytes asked of one `copy_file_range` call.
const COPY_CHUNK: u64 = 1 << 30;
/// Buffer of the read/write fallback.
const BUFFER_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    UnsafeName(#[from] NameError),
    #[error("cannot clone {name} into itself")]
    SameVolume { name: String },
    #[error("{name} is not in the data root")]
    NotFound { name: String },
    #[error(
        "{name} in the data root is not a plain directory (a file or a symlink?); hostvol will neither follow nor use it"
    )]
    NotADirectory { name: String },
    #[error("{name} already exists in the data root")]
    AlreadyExists { name: String },
    #[error(
        "the clone target {name} is not empty (left from an interrupted clone?); remove it and create it again"
    )]
    TargetNotEmpty { name: String },
    #[error("{name} is not a btrfs subvolume, so it cannot be snapshotted; copy it instead")]
    NotASubvolume { name: String },
    #[error(
        "{path} (under the data root) is a mount point; hostvol clones nothing on another filesystem"
    )]
    MountPoint { path: PathBuf },
    #[error("{path} (under the data root) was moved or replaced while being cloned; retry")]
    Changed { path: PathBuf },
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
            Error::SameVolume { .. } => "same_volume",
            Error::NotFound { .. } => "not_found",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::AlreadyExists { .. } => "already_exists",
            Error::TargetNotEmpty { .. } => "target_not_empty",
            Error::NotASubvolume { .. } => "not_a_subvolume",
            Error::MountPoint { .. } => "mount_point",
            Error::Changed { .. } => "concurrent_change",
            Error::Io { .. } => "io",
        }
    }
}

/// How a clone's data was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A btrfs snapshot of the whole volume.
    Snapshot,
    /// A copy whose every non-empty regular file was reflinked (shares its extents with the source).
    Reflink,
    /// A copy with at least one file's bytes copied, or with no non-empty file at all.
    Copy,
}

impl Method {
    /// For Event messages and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Snapshot => "snapshot",
            Method::Reflink => "reflink",
            Method::Copy => "copy",
        }
    }
}

/// What a clone made. A snapshot counts nothing: all counts are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneStats {
    pub method: Method,
    /// Non-directories recreated: regular files, symlinks, FIFOs.
    pub files: u64,
    /// Directories created below the target volume (not counting the volume itself).
    pub directories: u64,
    /// Sizes of the regular files copied (holes included).
    pub bytes: u64,
    /// Device nodes and sockets left out.
    pub skipped: u64,
    /// Mount points and nested btrfs subvolumes left out.
    pub mount_points: u64,
}

impl CloneStats {
    fn new(method: Method) -> Self {
        CloneStats {
            method,
            files: 0,
            directories: 0,
            bytes: 0,
            skipped: 0,
            mount_points: 0,
        }
    }
}

/// Makes `target` under `root` a writable btrfs snapshot of the subvolume `source` (instant). Fails
/// with [`Error::NotASubvolume`] if `source` is a plain directory or the root is not btrfs, and with
/// [`Error::AlreadyExists`] if `target` exists. The snapshot keeps the source's qgroup limit (full
/// qgroups) or has none (simple quotas): set the clone's limit right after.
pub fn snapshot(root: BorrowedFd<'_>, source: &str, target: &str) -> Result<CloneStats, Error> {
    check_names(source, target)?;
    let src = btrfs::open_subvolume(root, source).map_err(|e| match errno_of(&e) {
        Errno::ENOENT => Error::NotFound {
            name: source.to_string(),
        },
        Errno::ENOTDIR | Errno::ELOOP => Error::NotADirectory {
            name: source.to_string(),
        },
        _ if e.kind() == io::ErrorKind::InvalidInput => Error::NotASubvolume {
            name: source.to_string(),
        },
        _ => Error::Io {
            op: "open",
            path: PathBuf::from(source),
            source: errno_of(&e),
        },
    })?;
    snapshot_of(src.as_fd(), source, root, target)
}

/// [`snapshot`] of the opened subvolume `src` (`source` names it in messages) as `target` in the
/// directory `parent`, which may be a volume's parent below the root (`directoryPattern`).
pub fn snapshot_of(
    src: BorrowedFd<'_>,
    source: &str,
    parent: BorrowedFd<'_>,
    target: &str,
) -> Result<CloneStats, Error> {
    naming::validate_directory_name(target)?;
    btrfs::snapshot(src, parent, target).map_err(|e| match errno_of(&e) {
        Errno::EEXIST => Error::AlreadyExists {
            name: target.to_string(),
        },
        // Something else mounted over the source's name.
        Errno::EXDEV => Error::MountPoint {
            path: PathBuf::from(source),
        },
        _ if e.kind() == io::ErrorKind::InvalidInput => Error::NotASubvolume {
            name: source.to_string(),
        },
        _ => Error::Io {
            op: "snapshot",
            path: PathBuf::from(source),
            source: errno_of(&e),
        },
    })?;
    fsync(parent).map_err(|source| Error::Io {
        op: "sync the parent after creating",
        path: PathBuf::from(target),
        source,
    })?;
    Ok(CloneStats::new(Method::Snapshot))
}

/// Fills the existing, empty volume `target` (made by the caller with its own mode, owner and size
/// limit, which are left as they are) with a copy of the contents of the volume `source`, both
/// directly under `root`. See the module documentation for what is kept and what is left out. The
/// copy is synced to disk before this returns.
pub fn copy_into(root: BorrowedFd<'_>, source: &str, target: &str) -> Result<CloneStats, Error> {
    check_names(source, target)?;
    let (src, src_st) = open_source(root, source)?;
    copy_from(src, src_st, source, root, target)
}

/// Opens the volume `name` in the directory `parent` (the root, or a volume's parent below it) to
/// clone it, refusing symlinks, non-directories and mount points. The caller checks whose it is on
/// the returned handle before reading anything.
pub fn open_source(parent: BorrowedFd<'_>, name: &str) -> Result<(OwnedFd, FileStat), Error> {
    naming::validate_directory_name(name)?;
    open_volume(parent, name, device_of(parent)?)
}

/// [`copy_into`] from the opened source volume `src` (`source` names it in messages, `src_st` is
/// its stat from [`open_source`]) into the existing, empty volume `target` in the directory `parent`.
pub fn copy_from(
    src: OwnedFd,
    src_st: FileStat,
    source: &str,
    parent: BorrowedFd<'_>,
    target: &str,
) -> Result<CloneStats, Error> {
    naming::validate_directory_name(target)?;
    let (dst, dst_st) = open_volume(parent, target, device_of(parent)?)?;
    if id(&src_st) == id(&dst_st) {
        return Err(Error::SameVolume {
            name: source.to_string(),
        });
    }
    // One entry is enough to know: the target is never listed whole.
    let empty = Entries::open(dst.as_fd(), START)
        .and_then(|mut entries| entries.next().transpose().map(|first| first.is_none()))
        .map_err(|source| Error::Io {
            op: "read",
            path: PathBuf::from(target),
            source,
        })?;
    if !empty {
        return Err(Error::TargetNotEmpty {
            name: target.to_string(),
        });
    }
    let mut walk = Walk {
        source,
        target,
        src_dev: src_st.st_dev,
        dst_dev: dst_st.st_dev,
        dst_top: id(&dst_st),
        src,
        dst,
        stack: vec![Frame::new(to_cstring(source)?, src_st, id(&dst_st))],
        stats: CloneStats::new(Method::Copy),
        reflinked: 0,
        copied: 0,
        try_copy_file_range: true,
        buffer: Vec::new(),
    };
    walk.copy_all()?;
    // One flush for all the files, so a PV never points at a copy a crash could lose.
    syncfs(walk.dst.as_fd()).map_err(|source| Error::Io {
        op: "sync",
        path: PathBuf::from(target),
        source,
    })?;
    let mut stats = walk.stats;
    if walk.copied == 0 && walk.reflinked > 0 {
        stats.method = Method::Reflink;
    }
    Ok(stats)
}

fn check_names(source: &str, target: &str) -> Result<(), Error> {
    naming::validate_directory_name(source)?;
    naming::validate_directory_name(target)?;
    if source == target {
        return Err(Error::SameVolume {
            name: source.to_string(),
        });
    }
    Ok(())
}

fn device_of(dir: BorrowedFd<'_>) -> Result<u64, Error> {
    fstat(dir).map(|st| st.st_dev).map_err(|source| Error::Io {
        op: "stat",
        path: PathBuf::from("."),
        source,
    })
}

fn to_cstring(name: &str) -> Result<CString, Error> {
    CString::new(name)
        .map_err(|_| NameError(format!("{name:?} is not a safe directory name")).into())
}

/// Opens a volume directly under the root, refusing symlinks, non-directories and mount points (a
/// btrfs subvolume has an `st_dev` of its own without being a mount).
fn open_volume(
    root: BorrowedFd<'_>,
    name: &str,
    root_dev: u64,
) -> Result<(OwnedFd, FileStat), Error> {
    let cname = to_cstring(name)?;
    let io = |op, source| Error::Io {
        op,
        path: PathBuf::from(name),
        source,
    };
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open_beneath(root, &cname, flags).map_err(|source| match source {
        Errno::ENOENT => Error::NotFound {
            name: name.to_string(),
        },
        Errno::ELOOP | Errno::ENOTDIR => Error::NotADirectory {
            name: name.to_string(),
        },
        Errno::EXDEV => Error::MountPoint {
            path: PathBuf::from(name),
        },
        source => io("open", source),
    })?;
    let st = fstat(&fd).map_err(|e| io("stat", e))?;
    if st.st_dev != root_dev && !btrfs::is_subvolume(fd.as_fd()).unwrap_or(false) {
        return Err(Error::MountPoint {
            path: PathBuf::from(name),
        });
    }
    Ok((fd, st))
}

/// A directory on the walk's path from the volume to where it currently is, in both trees.
struct Frame {
    /// Name in its parent (the same in both trees).
    name: CString,
    /// The source directory, as it was when entered: its (st_dev, st_ino) to recognise it when
    /// climbing back, and the mode, owner and times to give its copy.
    src: FileStat,
    /// (st_dev, st_ino) of the copy.
    dst_id: (u64, u64),
    /// Where to go on reading the source directory: right after the subdirectory the walk went down
    /// into; all the walk keeps of a directory, whatever its size.
    resume: i64,
}

impl Frame {
    fn new(name: CString, src: FileStat, dst_id: (u64, u64)) -> Self {
        Frame {
            name,
            src,
            dst_id,
            resume: START,
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

/// The copy walk: depth first, with only the current source and target directories open.
struct Walk<'n> {
    source: &'n str,
    target: &'n str,
    src_dev: u64,
    dst_dev: u64,
    /// (st_dev, st_ino) of the target volume: never copied into itself, were it mounted in the source.
    dst_top: (u64, u64),
    /// The source directory at the top of `stack`.
    src: OwnedFd,
    /// Its copy.
    dst: OwnedFd,
    stack: Vec<Frame>,
    stats: CloneStats,
    /// Non-empty regular files reflinked, and copied.
    reflinked: u64,
    copied: u64,
    /// Cleared once `copy_file_range` said it cannot copy between these files.
    try_copy_file_range: bool,
    /// For the read/write fallback; allocated on first use.
    buffer: Vec<u8>,
}

impl Walk<'_> {
    fn copy_all(&mut self) -> Result<(), Error> {
        while !self.stack.is_empty() {
            match self.read_current()? {
                Some(child) => self.descend(child)?,
                // Everything below is copied.
                None => self.finish_current()?,
            }
        }
        Ok(())
    }

    /// Reads the current source directory from where it was left, copying each non-directory as it
    /// comes, up to its next subdirectory, which it returns (the frame resumes after it); `None` at
    /// the end of the directory.
    fn read_current(&mut self) -> Result<Option<CString>, Error> {
        let from = self.stack.last().expect("stack is not empty").resume;
        let mut entries = Entries::open(self.src.as_fd(), from)
            .map_err(|e| self.io(Side::Source, "read", None, e))?;
        while let Some(entry) = entries.next() {
            let entry = entry.map_err(|e| self.io(Side::Source, "read", None, e))?;
            let name = entry.name;
            let st = match fstatat(self.src.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue, // removed meanwhile
                Err(e) => return Err(self.io(Side::Source, "stat", Some(name), e)),
            };
            if st.st_dev != self.src_dev {
                self.stats.mount_points += 1;
                continue;
            }
            match kind(&st) {
                SFlag::S_IFDIR => {
                    self.stack.last_mut().expect("stack is not empty").resume = entry.next;
                    return Ok(Some(name.to_owned()));
                }
                SFlag::S_IFREG => self.copy_file(name)?,
                SFlag::S_IFLNK => self.copy_symlink(name, &st)?,
                SFlag::S_IFIFO => self.copy_fifo(name, &st)?,
                // Device nodes and sockets.
                _ => self.stats.skipped += 1,
            }
        }
        Ok(None)
    }

    /// Creates the copy of the subdirectory `child` and moves into both.
    fn descend(&mut self, child: CString) -> Result<(), Error> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let src = match open_beneath(self.src.as_fd(), &child, flags) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()), // removed meanwhile
            Err(Errno::EXDEV) => {
                self.stats.mount_points += 1;
                return Ok(());
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(self.changed(Side::Source, Some(&child)));
            }
            Err(e) => return Err(self.io(Side::Source, "open", Some(&child), e)),
        };
        let st = fstat(&src).map_err(|e| self.io(Side::Source, "stat", Some(&child), e))?;
        if st.st_dev != self.src_dev || id(&st) == self.dst_top {
            self.stats.mount_points += 1;
            return Ok(());
        }
        // u+rwx while it is filled; its own mode once everything below is copied.
        match mkdirat(self.dst.as_fd(), child.as_c_str(), Mode::S_IRWXU) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(self.changed(Side::Target, Some(&child))),
            Err(e) => return Err(self.io(Side::Target, "create", Some(&child), e)),
        }
        let dst = openat(self.dst.as_fd(), child.as_c_str(), flags, Mode::empty())
            .map_err(|e| self.io(Side::Target, "open", Some(&child), e))?;
        let dst_st = fstat(&dst).map_err(|e| self.io(Side::Target, "stat", Some(&child), e))?;
        if dst_st.st_dev != self.dst_dev || kind(&dst_st) != SFlag::S_IFDIR {
            return Err(self.changed(Side::Target, Some(&child)));
        }
        self.stats.directories += 1;
        // Only these two fds stay open; the parents are found again through "..".
        self.src = src;
        self.dst = dst;
        self.stack.push(Frame::new(child, st, id(&dst_st)));
        Ok(())
    }

    /// Gives the current copy its source's owner, mode and times, and climbs back to both parents.
    fn finish_current(&mut self) -> Result<(), Error> {
        let n = self.stack.len();
        if n == 1 {
            // The target volume keeps the mode, owner and times its creator gave it.
            self.stack.pop();
            return Ok(());
        }
        // Parents first: a copy made 0000 could not be climbed out of by a non-root user.
        let src_parent = self.open_parent(Side::Source, id(&self.stack[n - 2].src))?;
        let dst_parent = self.open_parent(Side::Target, self.stack[n - 2].dst_id)?;
        let st = self.stack[n - 1].src;
        set_metadata(self.dst.as_fd(), &st)
            .map_err(|(op, e)| self.io(Side::Target, op, None, e))?;
        self.stack.pop();
        self.src = src_parent;
        self.dst = dst_parent;
        Ok(())
    }

    fn open_parent(&self, side: Side, expected: (u64, u64)) -> Result<OwnedFd, Error> {
        let dir = match side {
            Side::Source => self.src.as_fd(),
            Side::Target => self.dst.as_fd(),
        };
        reopen_parent(dir, expected).map_err(|e| match e {
            None => self.changed(side, None),
            Some(source) => self.io(side, "open parent of", None, source),
        })
    }

    fn copy_file(&mut self, name: &CStr) -> Result<(), Error> {
        // O_NONBLOCK: were it swapped for a FIFO meanwhile, the open must not hang (it is refused below).
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        let src = match open_beneath(self.src.as_fd(), name, flags) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return Ok(()),
            // A file bind-mounted here.
            Err(Errno::EXDEV) => {
                self.stats.mount_points += 1;
                return Ok(());
            }
            Err(Errno::ELOOP) => return Err(self.changed(Side::Source, Some(name))),
            Err(e) => return Err(self.io(Side::Source, "open", Some(name), e)),
        };
        let st = fstat(&src).map_err(|e| self.io(Side::Source, "stat", Some(name), e))?;
        if kind(&st) != SFlag::S_IFREG || st.st_dev != self.src_dev {
            return Err(self.changed(Side::Source, Some(name)));
        }
        let dst = match openat(
            self.dst.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        ) {
            Ok(fd) => File::from(fd),
            Err(Errno::EEXIST) => return Err(self.changed(Side::Target, Some(name))),
            Err(e) => return Err(self.io(Side::Target, "create", Some(name), e)),
        };
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let content = copy_content(
            &src,
            &dst,
            size,
            &mut self.try_copy_file_range,
            &mut self.buffer,
        )
        .map_err(|(op, e)| self.io(Side::Target, op, Some(name), e))?;
        match content {
            Content::Empty => {}
            Content::Reflinked => self.reflinked += 1,
            Content::Copied => self.copied += 1,
        }
        set_metadata(dst.as_fd(), &st)
            .map_err(|(op, e)| self.io(Side::Target, op, Some(name), e))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    fn copy_symlink(&mut self, name: &CStr, st: &FileStat) -> Result<(), Error> {
        let text = match readlinkat(self.src.as_fd(), name) {
            Ok(text) => text,
            Err(Errno::ENOENT) => return Ok(()),
            // No longer a symlink.
            Err(Errno::EINVAL) => return Err(self.changed(Side::Source, Some(name))),
            Err(e) => return Err(self.io(Side::Source, "read link", Some(name), e)),
        };
        match symlinkat(text.as_os_str(), self.dst.as_fd(), name) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(self.changed(Side::Target, Some(name))),
            Err(e) => return Err(self.io(Side::Target, "create", Some(name), e)),
        }
        let dst = self.dst.as_fd();
        fchownat(
            dst,
            name,
            Some(Uid::from_raw(st.st_uid)),
            Some(Gid::from_raw(st.st_gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(Side::Target, "chown", Some(name), e))?;
        let (atime, mtime) = times(st);
        utimensat(dst, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| self.io(Side::Target, "set times of", Some(name), e))?;
        self.stats.files += 1;
        Ok(())
    }

    fn copy_fifo(&mut self, name: &CStr, st: &FileStat) -> Result<(), Error> {
        match mkfifoat(self.dst.as_fd(), name, Mode::S_IRUSR | Mode::S_IWUSR) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(self.changed(Side::Target, Some(name))),
            Err(e) => return Err(self.io(Side::Target, "create", Some(name), e)),
        }
        // Opening a FIFO to read with O_NONBLOCK does not wait for a writer.
        let fifo = openat(
            self.dst.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(Side::Target, "open", Some(name), e))?;
        set_metadata(fifo.as_fd(), st)
            .map_err(|(op, e)| self.io(Side::Target, op, Some(name), e))?;
        self.stats.files += 1;
        Ok(())
    }

    /// The path of the current directory (plus `child`) in the source or the target, relative to the
    /// data root, for messages.
    fn path(&self, side: Side, child: Option<&CStr>) -> PathBuf {
        let top = match side {
            Side::Source => self.source,
            Side::Target => self.target,
        };
        std::iter::once(OsStr::new(top))
            .chain(
                self.stack
                    .iter()
                    .skip(1)
                    .map(|f| f.name.as_c_str())
                    .chain(child)
                    .map(|name| OsStr::from_bytes(name.to_bytes())),
            )
            .collect()
    }

    fn io(&self, side: Side, op: &'static str, child: Option<&CStr>, source: Errno) -> Error {
        Error::Io {
            op,
            path: self.path(side, child),
            source,
        }
    }

    fn changed(&self, side: Side, child: Option<&CStr>) -> Error {
        Error::Changed {
            path: self.path(side, child),
        }
    }
}

enum Content {
    Empty,
    Reflinked,
    Copied,
}

/// Fills the new, empty `dst` with the first `size` bytes of `src`: a reflink if the filesystem can,
/// else a copy of the data segments (holes stay holes). Errors carry what was being done.
fn copy_content(
    src: &File,
    dst: &File,
    size: u64,
    try_copy_file_range: &mut bool,
    buffer: &mut Vec<u8>,
) -> Result<Content, (&'static str, Errno)> {
    if size == 0 {
        return Ok(Content::Empty);
    }
    // SAFETY: FICLONE takes the source fd itself as its argument; both fds are open.
    let ret = unsafe {
        libc::ioctl(
            dst.as_raw_fd(),
            FICLONE as libc::Ioctl,
            src.as_raw_fd() as libc::c_long,
        )
    };
    if ret == 0 {
        return Ok(Content::Reflinked);
    }
    // The filesystem cannot share these extents (ext4, XFS without reflink, incompatible btrfs file
    // flags, ...), and FICLONE changes nothing when it fails: copy. A real problem (no space, an I/O
    // error) shows again below.
    let end = i64::try_from(size).map_err(|_| ("copy", Errno::EFBIG))?;
    let mut pos = 0;
    while pos < end {
        let start = match lseek(src, pos, Whence::SeekData) {
            Ok(start) => start,
            Err(Errno::ENXIO) => break, // only a hole from here on
            Err(Errno::EINVAL) => pos,  // no SEEK_DATA here: all data
            Err(e) => return Err(("find data in", e)),
        };
        if start >= end {
            break;
        }
        let stop = match lseek(src, start, Whence::SeekHole) {
            Ok(stop) => stop.min(end),
            Err(Errno::ENXIO) => break, // shrunk meanwhile
            Err(Errno::EINVAL) => end,
            Err(e) => return Err(("find holes in", e)),
        };
        if stop <= start {
            break;
        }
        copy_range(src, dst, start, stop, try_copy_file_range, buffer)?;
        pos = stop;
    }
    // The trailing hole, if any.
    ftruncate(dst, end).map_err(|e| ("resize", e))?;
    Ok(Content::Copied)
}

/// Copies the bytes `pos..end` of `src` to the same offsets of `dst`, in the kernel if it can.
fn copy_range(
    src: &File,
    dst: &File,
    mut pos: i64,
    end: i64,
    try_copy_file_range: &mut bool,
    buffer: &mut Vec<u8>,
) -> Result<(), (&'static str, Errno)> {
    while pos < end {
        let len = (end - pos).unsigned_abs().min(COPY_CHUNK) as usize;
        let copied = if *try_copy_file_range {
            let (mut off_in, mut off_out) = (pos, pos);
            // SAFETY: both offsets are valid, exclusive pointers for the call; the fds are open.
            let ret = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    len,
                    0,
                )
            };
            match Errno::result(ret) {
                Ok(n) => n as usize,
                Err(Errno::EINTR) => continue,
                // Not between these filesystems (or files): read and write from here on.
                Err(Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                    *try_copy_file_range = false;
                    continue;
                }
                Err(e) => return Err(("copy", e)),
            }
        } else {
            if buffer.is_empty() {
                buffer.resize(BUFFER_SIZE, 0);
            }
            let want = len.min(buffer.len());
            let offset = pos.unsigned_abs();
            let n = match src.read_at(&mut buffer[..want], offset) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(("read", errno_of(&e))),
            };
            dst.write_all_at(&buffer[..n], offset)
                .map_err(|e| ("write", errno_of(&e)))?;
            n
        };
        if copied == 0 {
            break; // the source is shorter than it was
        }
        pos += copied as i64;
    }
    Ok(())
}

/// Gives `fd` the owner, mode and times of `st`. The mode comes after the owner, because chown
/// clears setuid and setgid.
fn set_metadata(fd: BorrowedFd<'_>, st: &FileStat) -> Result<(), (&'static str, Errno)> {
    fchown(
        fd,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )
    .map_err(|e| ("chown", e))?;
    fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777)).map_err(|e| ("chmod", e))?;
    let (atime, mtime) = times(st);
    futimens(fd, &atime, &mtime).map_err(|e| ("set times of", e))
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn errno_of(error: &io::Error) -> Errno {
    error.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::removal;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;

    const MIB: u64 = 1 << 20;

    fn open(dir: &Path) -> OwnedFd {
        nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Sets the access and modification times of `path` itself (a symlink is not followed).
    fn set_times(path: &Path, secs: i64, nanos: i64) {
        let t = TimeSpec::new(secs, nanos);
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    fn pattern(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    use crate::node::walk::tests::Mounted;

    #[test]
    fn copies_contents_modes_owners_and_times() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("pvc-1_ns_src");
        let dst = root.path().join("pvc-2_ns_dst");
        std::fs::create_dir_all(src.join("a/b/c")).unwrap();
        std::fs::create_dir(src.join("empty-dir")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        chmod(&dst, 0o711);
        std::fs::write(src.join("top"), b"top file").unwrap();
        std::fs::write(src.join("a/b/c/deep"), b"deep file").unwrap();
        std::fs::write(src.join("a/empty"), b"").unwrap();
        let big = pattern(5 * MIB);
        std::fs::write(src.join("a/b/big"), &big).unwrap();
        // 64 MiB with 4 KiB of data in the middle.
        let sparse = std::fs::File::create(src.join("sparse")).unwrap();
        sparse.set_len(64 * MIB).unwrap();
        sparse.write_all_at(&[9u8; 4096], 32 * MIB).unwrap();
        drop(sparse);
        std::fs::write(src.join("a/setuid"), b"#!/bin/sh\n").unwrap();
        std::fs::hard_link(src.join("top"), src.join("a/hardlink")).unwrap();
        symlink("b/c/deep", src.join("a/rel-link")).unwrap();

        let modes = [
            ("top", 0o640),
            ("a", 0o750),
            ("a/b", 0o2775),
            ("a/b/c", 0o500),
            ("a/setuid", 0o6755),
            ("a/empty", 0o400),
            ("empty-dir", 0o1777),
        ];
        let owned = ["top", "a", "a/b", "a/setuid", "a/rel-link"];
        if is_root() {
            for path in owned {
                std::os::unix::fs::lchown(src.join(path), Some(1234), Some(1234)).unwrap();
            }
        }
        // After chown, which clears setuid and setgid.
        for (path, mode) in modes {
            chmod(&src.join(path), mode);
        }
        // Innermost first: setting times on a child changes its parent's ctime, not its mtime.
        for (i, path) in [
            "a/b/c/deep",
            "a/b/c",
            "a/b/big",
            "a/b",
            "a/empty",
            "a/setuid",
            "a/rel-link",
            "a",
            "top",
            "sparse",
            "empty-dir",
        ]
        .iter()
        .enumerate()
        {
            set_times(&src.join(path), 1_000_000_000 + i as i64, 123_456_789);
        }
        let fd = open(root.path());

        let stats = copy_into(fd.as_fd(), "pvc-1_ns_src", "pvc-2_ns_dst").unwrap();
        // Files: top, deep, empty, big, sparse, setuid, hardlink, rel-link.
        assert_eq!((stats.files, stats.directories), (8, 4), "{stats:?}");
        assert_eq!((stats.skipped, stats.mount_points), (0, 0), "{stats:?}");
        assert_eq!(
            stats.bytes,
            8 + 9 + 5 * MIB + 64 * MIB + 10 + 8,
            "{stats:?}"
        );
        let fs_type = nix::sys::statfs::fstatfs(fd.as_fd())
            .unwrap()
            .filesystem_type();
        if fs_type == nix::sys::statfs::EXT4_SUPER_MAGIC || fs_type == nix::sys::statfs::TMPFS_MAGIC
        {
            assert_eq!(stats.method, Method::Copy);
        } else {
            assert_ne!(stats.method, Method::Snapshot);
        }

        assert_eq!(std::fs::read(dst.join("top")).unwrap(), b"top file");
        assert_eq!(std::fs::read(dst.join("a/b/c/deep")).unwrap(), b"deep file");
        assert_eq!(std::fs::read(dst.join("a/empty")).unwrap(), b"");
        assert!(std::fs::read(dst.join("a/b/big")).unwrap() == big);
        assert_eq!(std::fs::read(dst.join("a/hardlink")).unwrap(), b"top file");
        assert!(
            std::fs::read_dir(dst.join("empty-dir"))
                .unwrap()
                .next()
                .is_none()
        );
        // Hard links become separate files.
        assert_eq!(std::fs::metadata(dst.join("top")).unwrap().nlink(), 1);
        let copy = std::fs::read(dst.join("sparse")).unwrap();
        assert_eq!(copy.len() as u64, 64 * MIB);
        assert!(copy[32 * MIB as usize..][..4096].iter().all(|&b| b == 9));
        assert_eq!(copy.iter().filter(|&&b| b != 0).count(), 4096);
        let blocks = std::fs::metadata(dst.join("sparse")).unwrap().blocks() * 512;
        assert!(blocks < MIB, "the holes were filled: {blocks} bytes");
        assert_eq!(
            std::fs::read_link(dst.join("a/rel-link")).unwrap(),
            Path::new("b/c/deep")
        );

        for path in [
            "top",
            "a",
            "a/b",
            "a/b/c",
            "a/b/c/deep",
            "a/b/big",
            "a/setuid",
            "a/empty",
            "a/rel-link",
            "empty-dir",
            "sparse",
        ] {
            let (s, d) = (
                std::fs::symlink_metadata(src.join(path)).unwrap(),
                std::fs::symlink_metadata(dst.join(path)).unwrap(),
            );
            assert_eq!(s.mode(), d.mode(), "{path}: mode");
            assert_eq!((s.uid(), s.gid()), (d.uid(), d.gid()), "{path}: owner");
            assert_eq!(
                (s.mtime(), s.mtime_nsec()),
                (d.mtime(), d.mtime_nsec()),
                "{path}: mtime"
            );
        }
        if is_root() {
            let meta = std::fs::symlink_metadata(dst.join("a/setuid")).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (1234, 1234, 0o6755)
            );
            let meta = std::fs::symlink_metadata(dst.join("a/rel-link")).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1234, 1234));
        }
        // The target volume keeps its own mode.
        assert_eq!(std::fs::metadata(&dst).unwrap().mode() & 0o7777, 0o711);
        // The source is untouched.
        assert_eq!(std::fs::read(src.join("top")).unwrap(), b"top file");

        // The target is no longer empty: a second copy is refused.
        let err = copy_into(fd.as_fd(), "pvc-1_ns_src", "pvc-2_ns_dst").unwrap_err();
        assert_eq!(err.category(), "target_not_empty", "{err}");
        assert!(err.to_string().contains("pvc-2_ns_dst"), "{err}");
        chmod(&src.join("a/b/c"), 0o700);
        chmod(&dst.join("a/b/c"), 0o700);
    }

    #[test]
    fn the_read_write_fallback_copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data = pattern(3 * MIB + 17);
        let src = std::fs::File::create(&src_path).unwrap();
        src.write_all_at(&data, 8 * MIB).unwrap();
        src.set_len(16 * MIB).unwrap();
        drop(src);
        let src = std::fs::File::open(&src_path).unwrap();
        let dst = std::fs::File::create(dir.path().join("dst")).unwrap();
        let mut try_copy_file_range = false;
        let mut buffer = Vec::new();
        let content =
            copy_content(&src, &dst, 16 * MIB, &mut try_copy_file_range, &mut buffer).unwrap();
        assert!(matches!(content, Content::Copied | Content::Reflinked));
        assert_eq!(
            std::fs::read(dir.path().join("dst")).unwrap(),
            std::fs::read(&src_path).unwrap()
        );
        if matches!(content, Content::Copied) {
            assert_eq!(buffer.len(), BUFFER_SIZE, "the fallback was not used");
            let blocks = dst.metadata().unwrap().blocks() * 512;
            assert!(
                blocks < 4 * MIB + MIB,
                "the holes were filled: {blocks} bytes"
            );
        }
    }

    #[test]
    fn symlinks_are_copied_as_symlinks_and_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"precious").unwrap();
        let src = root.path().join("pvc-3_ns_src");
        let dst = root.path().join("pvc-4_ns_dst");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(root.path().join("neighbour"), b"next door").unwrap();
        let links: [(&str, &Path); 7] = [
            ("passwd", Path::new("/etc/passwd")),
            ("up", Path::new("..")),
            ("sub/up2", Path::new("../..")),
            ("neighbour", Path::new("../neighbour")),
            ("outside-dir", outside.path()),
            ("dangling", Path::new("/nonexistent/nowhere")),
            ("self", Path::new("self")),
        ];
        for (name, to) in links {
            symlink(to, src.join(name)).unwrap();
        }

        let stats = copy_into(open(root.path()).as_fd(), "pvc-3_ns_src", "pvc-4_ns_dst").unwrap();
        assert_eq!((stats.files, stats.directories), (7, 1), "{stats:?}");
        assert_eq!(stats.bytes, 0, "{stats:?}");
        for (name, to) in links {
            let meta = std::fs::symlink_metadata(dst.join(name)).unwrap();
            assert!(meta.file_type().is_symlink(), "{name} is no symlink");
            assert_eq!(std::fs::read_link(dst.join(name)).unwrap(), to, "{name}");
        }
        // Nothing but the symlinks: no file contents, no directory copied through a link.
        let mut names: Vec<_> = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "dangling",
                "neighbour",
                "outside-dir",
                "passwd",
                "self",
                "sub",
                "up"
            ]
        );
        assert_eq!(std::fs::read_dir(dst.join("sub")).unwrap().count(), 1);
        // Nothing outside the volumes changed.
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"precious"
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 3);
    }

    #[test]
    fn fifos_are_recreated_devices_and_sockets_skipped() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("pvc-5_ns_src");
        let dst = root.path().join("pvc-6_ns_dst");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        chmod(&src.join("fifo"), 0o620); // past the umask
        let _listener = std::os::unix::net::UnixListener::bind(src.join("socket")).unwrap();
        let mut skipped = 1;
        if is_root() {
            nix::sys::stat::mknod(
                &src.join("null"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .unwrap();
            skipped += 1;
        }

        let stats = copy_into(open(root.path()).as_fd(), "pvc-5_ns_src", "pvc-6_ns_dst").unwrap();
        assert_eq!((stats.files, stats.skipped), (1, skipped), "{stats:?}");
        let meta = std::fs::symlink_metadata(dst.join("fifo")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
        assert_eq!(meta.mode() & 0o7777, 0o620);
        assert!(!dst.join("socket").exists() && !dst.join("null").exists());
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
        let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        // Built through fds, one level at a time: the path is too long for path-based calls.
        mkdirat(fd.as_fd(), "pvc-7_ns_src", Mode::from_bits_truncate(0o700)).unwrap();
        mkdirat(fd.as_fd(), "pvc-8_ns_dst", Mode::from_bits_truncate(0o700)).unwrap();
        let mut cur = openat(fd.as_fd(), "pvc-7_ns_src", dir_flags, Mode::empty()).unwrap();
        for level in 0..DEPTH {
            if level % 100 == 0 {
                let file = openat(
                    cur.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o400),
                )
                .unwrap();
                File::from(file)
                    .write_all_at(&level.to_le_bytes(), 0)
                    .unwrap();
                symlinkat("../../..", cur.as_fd(), "up").unwrap();
            }
            mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o700)).unwrap();
            let child = openat(cur.as_fd(), "d", dir_flags, Mode::empty()).unwrap();
            if level % 7 == 0 && level > 0 {
                fchmod(cur.as_fd(), Mode::from_bits_truncate(0o500)).unwrap();
            }
            cur = child;
        }
        drop(cur);

        let stats = copy_into(fd.as_fd(), "pvc-7_ns_src", "pvc-8_ns_dst").unwrap();
        assert_eq!(
            (stats.files, stats.directories),
            (2 * (DEPTH / 100) as u64, DEPTH as u64),
            "{stats:?}"
        );

        // Walk the copy down, one fd at a time.
        let mut cur = openat(fd.as_fd(), "pvc-8_ns_dst", dir_flags, Mode::empty()).unwrap();
        for level in 0..=DEPTH {
            let file = fstatat(cur.as_fd(), "f", AtFlags::AT_SYMLINK_NOFOLLOW);
            if level % 100 == 0 && level < DEPTH {
                let file = File::from(
                    openat(
                        cur.as_fd(),
                        "f",
                        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .unwrap(),
                );
                let mut bytes = [0u8; size_of::<usize>()];
                file.read_exact_at(&mut bytes, 0).unwrap();
                assert_eq!(usize::from_le_bytes(bytes), level);
                let link = readlinkat(cur.as_fd(), "up").unwrap();
                assert_eq!(link, "../../..");
            } else {
                assert_eq!(file.unwrap_err(), Errno::ENOENT, "level {level}");
            }
            let st = fstat(&cur).unwrap();
            let expected = if level % 7 == 0 && level > 0 {
                0o500
            } else {
                0o700
            };
            if level > 0 && level < DEPTH {
                assert_eq!(st.st_mode & 0o7777, expected, "level {level}");
            }
            if level < DEPTH {
                cur = openat(cur.as_fd(), "d", dir_flags, Mode::empty()).unwrap();
            }
        }
        drop(cur);
        for name in ["pvc-7_ns_src", "pvc-8_ns_dst"] {
            removal::remove_volume_dir(fd.as_fd(), name).unwrap();
        }
    }

    #[test]
    fn names_are_validated() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("good")).unwrap();
        let fd = open(root.path());
        for bad in ["..", ".", "", "a/b", "../x", "/etc", ".hidden", "a\0b"] {
            for (source, target) in [(bad, "good"), ("good", bad)] {
                for err in [
                    copy_into(fd.as_fd(), source, target).unwrap_err(),
                    snapshot(fd.as_fd(), source, target).unwrap_err(),
                ] {
                    assert_eq!(
                        err.category(),
                        "unsafe_name",
                        "{source:?} {target:?}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_target_must_exist_be_empty_and_differ_from_the_source() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let p = root.path();
        std::fs::create_dir(p.join("src")).unwrap();
        std::fs::write(p.join("src/data"), b"data").unwrap();
        std::fs::create_dir(p.join("full")).unwrap();
        std::fs::write(p.join("full/keep"), b"keep").unwrap();
        std::fs::create_dir(p.join("empty")).unwrap();
        std::fs::write(p.join("file"), b"").unwrap();
        symlink(outside.path(), p.join("link")).unwrap();
        let fd = open(p);

        for (source, target, category) in [
            ("src", "src", "same_volume"),
            ("src", "missing", "not_found"),
            ("missing", "empty", "not_found"),
            ("src", "full", "target_not_empty"),
            ("src", "file", "not_a_directory"),
            ("src", "link", "not_a_directory"),
            ("link", "empty", "not_a_directory"),
            ("file", "empty", "not_a_directory"),
        ] {
            let err = copy_into(fd.as_fd(), source, target).unwrap_err();
            assert_eq!(err.category(), category, "{source} -> {target}: {err}");
        }
        // Nothing was written anywhere.
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(std::fs::read_dir(p.join("empty")).unwrap().next().is_none());
        assert_eq!(std::fs::read_dir(p.join("full")).unwrap().count(), 1);

        // Not btrfs: no snapshot.
        let err = snapshot(fd.as_fd(), "src", "snap").unwrap_err();
        assert_eq!(err.category(), "not_a_subvolume", "{err}");
        assert_eq!(
            snapshot(fd.as_fd(), "src", "src").unwrap_err().category(),
            "same_volume"
        );
        assert_eq!(
            snapshot(fd.as_fd(), "missing", "snap")
                .unwrap_err()
                .category(),
            "not_found"
        );
        assert_eq!(
            snapshot(fd.as_fd(), "link", "snap").unwrap_err().category(),
            "not_a_directory"
        );
        assert!(!p.join("snap").exists());
    }

    #[test]
    fn mount_points_are_not_entered() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("data"), b"precious").unwrap();
        let src = root.path().join("pvc-9_ns_src");
        let dst = root.path().join("pvc-10_ns_dst");
        for dir in ["tmpfs", "bound", "target", "sub"] {
            std::fs::create_dir_all(src.join(dir)).unwrap();
        }
        std::fs::write(src.join("bound-file"), b"").unwrap();
        std::fs::write(src.join("sub/kept"), b"kept").unwrap();
        std::fs::create_dir(&dst).unwrap();
        let _tmpfs = Mounted::new(&["-t", "tmpfs", "tmpfs"], &src.join("tmpfs"));
        std::fs::write(src.join("tmpfs/on-tmpfs"), b"other filesystem").unwrap();
        let mounts = [
            Mounted::new(&["--bind", outside.to_str().unwrap()], &src.join("bound")),
            // The target itself, inside the source: copying it would never end.
            Mounted::new(&["--bind", dst.to_str().unwrap()], &src.join("target")),
            Mounted::new(
                &["--bind", outside.join("data").to_str().unwrap()],
                &src.join("bound-file"),
            ),
        ];

        let stats = copy_into(open(root.path()).as_fd(), "pvc-9_ns_src", "pvc-10_ns_dst").unwrap();
        drop(mounts);
        assert_eq!(stats.mount_points, 4, "{stats:?}");
        assert_eq!((stats.files, stats.directories), (1, 1), "{stats:?}");
        let mut names: Vec<_> = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["sub"]);
        assert_eq!(std::fs::read(dst.join("sub/kept")).unwrap(), b"kept");
        assert_eq!(std::fs::read(outside.join("data")).unwrap(), b"precious");
    }

    use crate::node::quota::btrfs::tests::LoopBtrfs;

    #[test]
    fn snapshots_and_reflinks_on_btrfs() {
        // Loop-mounting a filesystem needs root; CI runs as root.
        assert!(
            is_root(),
            "this test loop-mounts btrfs, which needs root; run it as root after scripts/setup-quotas.sh, as scripts/test.sh does in CI"
        );
        let fs = LoopBtrfs::new(512 * MIB);
        let root = fs.root();
        let mnt = fs.mnt();
        btrfs::create_subvolume(root, "pvc-1_ns_src").unwrap();
        let src = mnt.join("pvc-1_ns_src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        let big = pattern(5 * MIB);
        std::fs::write(src.join("a/b/big"), &big).unwrap();
        std::fs::write(src.join("small"), b"small").unwrap();
        std::fs::write(src.join("empty"), b"").unwrap();
        symlink("/etc/passwd", src.join("passwd")).unwrap();
        std::os::unix::fs::lchown(src.join("small"), Some(1234), Some(1234)).unwrap();
        chmod(&src.join("small"), 0o4750);

        let check = |volume: &Path| {
            assert_eq!(std::fs::read(volume.join("a/b/big")).unwrap(), big);
            assert_eq!(std::fs::read(volume.join("small")).unwrap(), b"small");
            assert_eq!(std::fs::read(volume.join("empty")).unwrap(), b"");
            let meta = std::fs::symlink_metadata(volume.join("small")).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (1234, 1234, 0o4750)
            );
            assert_eq!(
                std::fs::read_link(volume.join("passwd")).unwrap(),
                Path::new("/etc/passwd")
            );
        };

        let stats = snapshot(root, "pvc-1_ns_src", "pvc-2_ns_snap").unwrap();
        assert_eq!(stats, CloneStats::new(Method::Snapshot));
        check(&mnt.join("pvc-2_ns_snap"));
        let snap = btrfs::open_subvolume(root, "pvc-2_ns_snap").unwrap();
        assert!(btrfs::is_subvolume(snap.as_fd()).unwrap());
        // Writable, and independent of the source.
        std::fs::write(mnt.join("pvc-2_ns_snap/small"), b"changed").unwrap();
        assert_eq!(std::fs::read(src.join("small")).unwrap(), b"small");

        assert_eq!(
            snapshot(root, "pvc-1_ns_src", "pvc-2_ns_snap")
                .unwrap_err()
                .category(),
            "already_exists"
        );
        std::fs::create_dir(mnt.join("plain")).unwrap();
        std::fs::write(mnt.join("plain/data"), b"data").unwrap();
        let err = snapshot(root, "plain", "pvc-3_ns_snap").unwrap_err();
        assert_eq!(err.category(), "not_a_subvolume", "{err}");
        assert_eq!(
            snapshot(root, "missing", "pvc-3_ns_snap")
                .unwrap_err()
                .category(),
            "not_found"
        );
        assert!(!mnt.join("pvc-3_ns_snap").exists());

        // A copy between subvolumes (each with an st_dev of its own) reflinks every file.
        btrfs::create_subvolume(root, "pvc-4_ns_copy").unwrap();
        let stats = copy_into(root, "pvc-1_ns_src", "pvc-4_ns_copy").unwrap();
        assert_eq!(stats.method, Method::Reflink, "{stats:?}");
        assert_eq!((stats.files, stats.directories), (4, 2), "{stats:?}");
        check(&mnt.join("pvc-4_ns_copy"));

        // A subvolume nested in the source is left out, like a mount point.
        btrfs::create_subvolume(open(&src.join("a")).as_fd(), "nested").unwrap();
        std::fs::create_dir(mnt.join("plain-copy")).unwrap();
        let stats = copy_into(root, "pvc-1_ns_src", "plain-copy").unwrap();
        assert_eq!(stats.method, Method::Reflink, "{stats:?}");
        assert_eq!(stats.mount_points, 1, "{stats:?}");
        assert!(!mnt.join("plain-copy/a/nested").exists());
        check(&mnt.join("plain-copy"));
    }
}
