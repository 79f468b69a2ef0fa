//! XFS and ext4 project quotas: one project id per volume directory, one block limit per project.
//!
//! # Model
//!
//! A volume is a directory under a data root. To enforce its size, the directory gets a *project
//! id* of its own ([`set_project`]) with the `PROJINHERIT` flag, so that every file and directory
//! created below it carries the same id; the filesystem then accounts all their blocks and inodes to
//! that project, and a *hard block limit* on the project ([`set_limit`]) caps the volume. Expansion is
//! the same call with a larger limit, effective at once; removal resets the limit to none and the
//! caller deletes the directory, after which the id counts nothing and is free again. [`usage`]
//! reads a project's current bytes, inodes and limit. A `statfs` inside the directory reports the
//! limit as the filesystem's size (`f_blocks * f_bsize == limit`), so `df` in a pod shows the
//! volume's size.
//!
//! Quota calls go through `quotactl_fd(2)` (Linux >= 5.14), which takes any file descriptor on the
//! filesystem (its mount point or a volume directory), so no block device node is needed. Project
//! ids are set with the `FS_IOC_FSGETXATTR`/`FS_IOC_FSSETXATTR` ioctls, which need a real open file
//! descriptor (not `O_PATH`). One code path serves both filesystems; limits are passed in the VFS's
//! 1 KiB units (`struct if_dqblk`), usage comes back in bytes.
//!
//! # Ids: unique per filesystem, without a side database
//!
//! [`assign_new_project`] picks an id that no other directory on the filesystem uses, even when
//! several processes (agents, restarts, threads) allocate at the same time, and keeps no state of
//! its own: the **filesystem's own accounting is the arbiter**. For a candidate id it
//!
//! 1. skips the id if the accounting shows it in use (any inode counted, or any limit set: a
//!    volume whose directory is gone but whose limit was not yet reset still owns its id);
//! 2. otherwise sets the id on the new, *empty* directory, then reads the accounting again: the
//!    project must count exactly that one inode. If it counts more, another allocator set the same
//!    id on its own directory between our check and our read: we put our directory back to project
//!    0 and try another candidate.
//!
//! Why this is race-free: setting a project id moves the inode's count to the new project
//! atomically, and the count stays while the directory keeps the id. Take two allocators A and B
//! that both end up keeping id `n`, with A's set before B's. B reads after its own set, when A's
//! directory (which A keeps) is still counted: B reads at least 2 and retreats, a contradiction. So
//! at most one allocator keeps an id; when both read 2, both retreat (no one wins, no one is
//! wrong), and they move to other candidates. Since retreating allocators jump to fresh
//! pseudo-random candidates, they do not collide again in lockstep.
//!
//! Candidates come from [`PROJECT_ID_MIN`]`..`[`PROJECT_ID_MAX`] (`[1_000_000, 2^31)`): above the
//! small ids an administrator hands out by hand (`/etc/projid`), below the ids that tools treating
//! them as signed 32-bit numbers would misread. Callers start at a pseudo-random point
//! ([`random_start`]) so that collisions are rare; from there candidates in use are skipped one by
//! one, and after a collision the search jumps to a new pseudo-random point. At most
//! [`MAX_ATTEMPTS`] candidates are tried before giving up with an error.
//!
//! The caller records the id (e.g. on the PersistentVolume); it can also be read back from the
//! directory itself with [`project_of`], so a restart never loses it.
//!
//! # Behaviour worth knowing (errno notes)
//!
//! - At the limit, **XFS fails writes with `ENOSPC`**, **ext4 with `EDQUOT`**.
//! - **ext4 lets a process with `CAP_SYS_RESOURCE` (e.g. root) write past a project limit**; XFS
//!   enforces it on root too. Pods normally lack that capability.
//! - Renaming or hard-linking a file into a directory of another project fails with `EXDEV`.
//! - When quotas are off, the quota calls fail with `ESRCH` (ext4, XFS with quotas partly on) or
//!   `ENOSYS` (XFS with no quota at all); see [`enforcement`], which says what the admin must do.
//! - XFS reports a project nobody uses (no inodes, no limits) as `ENOENT`: [`usage`] turns that
//!   into zeros.
//! - XFS keeps limits in filesystem blocks, rounding a limit up to a whole block.
//! - A removed directory's inodes stay counted while anything holds them open, and on XFS (since
//!   5.19, which frees unlinked inodes in the background) for some tens of milliseconds after the
//!   last close. Such an id merely looks in use a little longer: the allocator skips it.
//! - Setting limits needs `CAP_SYS_ADMIN`; changing a project id needs to run in the initial user
//!   namespace (and own the directory or have `CAP_FOWNER`).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::statfs::fstatfs;

use crate::node::abi::{ior, iow};

/// Lowest project id [`assign_new_project`] hands out.
pub const PROJECT_ID_MIN: u32 = 1_000_000;
/// One past the highest project id [`assign_new_project`] hands out (2^31).
pub const PROJECT_ID_MAX: u32 = 1 << 31;
/// How many candidate ids [`assign_new_project`] tries before it fails.
pub const MAX_ATTEMPTS: u32 = 4096;

const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
/// Also ext2's and ext3's magic: all are served by the ext4 driver.
const EXT4_SUPER_MAGIC: i64 = 0xEF53;

/// A filesystem with project quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filesystem {
    Xfs,
    Ext4,
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Filesystem::Xfs => "xfs",
            Filesystem::Ext4 => "ext4",
        })
    }
}

/// Whether project quotas work on a filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectQuotaState {
    /// Project usage is not even accounted: ids cannot be allocated, limits cannot be set.
    /// `hint` tells the administrator how to turn project quotas on.
    Off { hint: String },
    /// Usage is accounted but limits are not enforced. `hint` says how to enforce them.
    AccountingOnly { hint: String },
    /// Usage is accounted and limits are enforced.
    Enforced,
}

impl ProjectQuotaState {
    pub fn is_enforced(&self) -> bool {
        matches!(self, ProjectQuotaState::Enforced)
    }

    /// What the administrator should do, unless quotas are enforced.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ProjectQuotaState::Off { hint } | ProjectQuotaState::AccountingOnly { hint } => {
                Some(hint)
            }
            ProjectQuotaState::Enforced => None,
        }
    }
}

impl fmt::Display for ProjectQuotaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectQuotaState::Off { hint } => write!(f, "project quotas off: {hint}"),
            ProjectQuotaState::AccountingOnly { hint } => {
                write!(f, "project quotas accounted, not enforced: {hint}")
            }
            ProjectQuotaState::Enforced => f.write_str("project quotas enforced"),
        }
    }
}

/// A project's accounting, as the filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProjectUsage {
    /// Bytes charged to the project (including delayed-allocation reservations).
    pub used_bytes: u64,
    /// Files, directories and other inodes in the project.
    pub inodes: u64,
    /// The hard block limit, if any.
    pub limit_bytes: Option<u64>,
}

/// Counters of [`assign_new_project`] since the process started, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocationStats {
    /// Ids handed out.
    pub assigned: u64,
    /// Candidates skipped because the accounting showed them in use.
    pub skipped_in_use: u64,
    /// Candidates given up because another allocator took the same id at the same time.
    pub collisions: u64,
}

static ASSIGNED: AtomicU64 = AtomicU64::new(0);
static SKIPPED_IN_USE: AtomicU64 = AtomicU64::new(0);
static COLLISIONS: AtomicU64 = AtomicU64::new(0);

/// This process's [`assign_new_project`] counters.
pub fn allocation_stats() -> AllocationStats {
    AllocationStats {
        assigned: ASSIGNED.load(Ordering::Relaxed),
        skipped_in_use: SKIPPED_IN_USE.load(Ordering::Relaxed),
        collisions: COLLISIONS.load(Ordering::Relaxed),
    }
}

// ---- kernel ABI (the generic one; the targets it is checked for are in `node::abi`) ---------------

/// `struct fsxattr` (`<linux/fs.h>`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsXattr {
    fsx_xflags: u32,
    fsx_extsize: u32,
    fsx_nextents: u32,
    fsx_projid: u32,
    fsx_cowextsize: u32,
    fsx_pad: [u8; 8],
}
const _: () = assert!(size_of::<FsXattr>() == 28);

/// `struct if_dqblk` (`<linux/quota.h>`): limits in 1 KiB blocks, usage in bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IfDqblk {
    dqb_bhardlimit: u64,
    dqb_bsoftlimit: u64,
    dqb_curspace: u64,
    dqb_ihardlimit: u64,
    dqb_isoftlimit: u64,
    dqb_curinodes: u64,
    dqb_btime: u64,
    dqb_itime: u64,
    dqb_valid: u32,
}
const _: () = assert!(size_of::<IfDqblk>() == 72);

/// `struct if_dqinfo` (`<linux/quota.h>`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IfDqinfo {
    dqi_bgrace: u64,
    dqi_igrace: u64,
    dqi_flags: u32,
    dqi_valid: u32,
}
const _: () = assert!(size_of::<IfDqinfo>() == 24);

/// `struct fs_qfilestatv` (`<linux/dqblk_xfs.h>`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsQfilestatv {
    qfs_ino: u64,
    qfs_nblks: u64,
    qfs_nextents: u32,
    qfs_pad: u32,
}
const _: () = assert!(size_of::<FsQfilestatv>() == 24);

/// `struct fs_quota_statv` (`<linux/dqblk_xfs.h>`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsQuotaStatv {
    qs_version: i8,
    qs_pad1: u8,
    qs_flags: u16,
    qs_incoredqs: u32,
    qs_uquota: FsQfilestatv,
    qs_gquota: FsQfilestatv,
    qs_pquota: FsQfilestatv,
    qs_btimelimit: i32,
    qs_itimelimit: i32,
    qs_rtbtimelimit: i32,
    qs_bwarnlimit: u16,
    qs_iwarnlimit: u16,
    qs_rtbwarnlimit: u16,
    qs_pad3: u16,
    qs_pad4: u32,
    qs_pad2: [u64; 7],
}
const _: () = assert!(size_of::<FsQuotaStatv>() == 160);
const _: () = assert!(std::mem::offset_of!(FsQuotaStatv, qs_pquota) == 56);

/// `_IOR('X', 31, struct fsxattr)`.
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
/// `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
const _: () = assert!(FS_IOC_FSGETXATTR == ior(b'X', 31, size_of::<FsXattr>()));
const _: () = assert!(FS_IOC_FSSETXATTR == iow(b'X', 32, size_of::<FsXattr>()));

/// `quotactl_fd(2)`: 443 on every architecture.
const SYS_QUOTACTL_FD: libc::c_long = libc::SYS_quotactl_fd;
const _: () = assert!(SYS_QUOTACTL_FD == 443);

const PRJQUOTA: u32 = 2;
const fn qcmd(cmd: u32, qtype: u32) -> u32 {
    (cmd << 8) | (qtype & 0xff)
}
const Q_GETINFO: u32 = qcmd(0x80_0005, PRJQUOTA);
const Q_GETQUOTA: u32 = qcmd(0x80_0007, PRJQUOTA);
const Q_SETQUOTA: u32 = qcmd(0x80_0008, PRJQUOTA);
/// `XQM_CMD(8)`: the XFS-style quota state, served for ext4 too.
const Q_XGETQSTATV: u32 = qcmd((b'X' as u32) << 8 | 8, PRJQUOTA);
const _: () = assert!(Q_GETQUOTA == 0x8000_0702);
const _: () = assert!(Q_SETQUOTA == 0x8000_0802);
const _: () = assert!(Q_GETINFO == 0x8000_0502);
const _: () = assert!(Q_XGETQSTATV == 0x0058_0802);

const QIF_BLIMITS: u32 = 1;
const FS_QSTATV_VERSION1: i8 = 1;
const FS_QUOTA_PDQ_ACCT: u16 = 0x0010;
const FS_QUOTA_PDQ_ENFD: u16 = 0x0020;

/// Calls `quotactl_fd(fd, cmd, id, arg)`.
///
/// # Safety
/// `arg` must point to a live, writable `repr(C)` structure of the type `cmd` reads or writes
/// (`if_dqblk` for Q_GETQUOTA/Q_SETQUOTA, `if_dqinfo` for Q_GETINFO, `fs_quota_statv` for
/// Q_XGETQSTATV), valid for the whole call.
unsafe fn quotactl_fd<T>(fd: BorrowedFd<'_>, cmd: u32, id: u32, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller vouches for `arg` (see above); the fd is borrowed, so open.
    let r = unsafe {
        libc::syscall(
            SYS_QUOTACTL_FD,
            fd.as_raw_fd() as libc::c_uint,
            cmd as libc::c_uint,
            id as libc::c_uint,
            arg,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn get_fsxattr(fd: BorrowedFd<'_>) -> io::Result<FsXattr> {
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one `struct fsxattr`.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSGETXATTR as _,
            &mut x as *mut FsXattr,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(x)
}

fn set_fsxattr(fd: BorrowedFd<'_>, x: &FsXattr) -> io::Result<()> {
    // SAFETY: FS_IOC_FSSETXATTR reads one `struct fsxattr`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSSETXATTR as _, x as *const FsXattr) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- public API -------------------------------------------------------------------------------

/// Which project-quota filesystem `fd` is on (`fstatfs` magic), `None` for any other.
pub fn detect(fd: BorrowedFd<'_>) -> io::Result<Option<Filesystem>> {
    let st = fstatfs(fd)?;
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not everywhere
    let magic = st.filesystem_type().0 as i64;
    Ok(match magic {
        XFS_SUPER_MAGIC => Some(Filesystem::Xfs),
        EXT4_SUPER_MAGIC => Some(Filesystem::Ext4),
        _ => None,
    })
}

fn off_hint(fs: Option<Filesystem>) -> String {
    match fs {
        Some(Filesystem::Xfs) => "project quotas are off on this XFS filesystem: mount it with \
             `-o prjquota` (XFS turns quotas on only at mount time, not on remount: add prjquota to \
             its fstab entry and mount it again; for the root filesystem boot with \
             rootflags=prjquota)"
            .into(),
        Some(Filesystem::Ext4) => "project quotas are off on this ext4 filesystem: it needs the \
             quota and project features (`mkfs.ext4 -O quota,project` when creating it, or \
             `tune2fs -O project,quota` on the unmounted filesystem, which needs 256-byte inodes) \
             and `mount -o prjquota`"
            .into(),
        None => "project quotas need an XFS filesystem mounted with `-o prjquota`, or an ext4 \
             one made with `mkfs.ext4 -O quota,project` (or `tune2fs -O project,quota`) and \
             mounted with `-o prjquota`; this filesystem is neither"
            .into(),
    }
}

fn accounting_hint(fs: Option<Filesystem>) -> String {
    match fs {
        Some(Filesystem::Xfs) => "project usage is accounted but limits are not enforced on \
             this XFS filesystem (mounted with pqnoenforce?): mount it with `-o prjquota`"
            .into(),
        _ => "project usage is accounted but limits are not enforced on this filesystem: mount \
             it with `-o prjquota`"
            .into(),
    }
}

/// Whether project quotas are off, only accounted, or enforced on the filesystem of `fd`.
///
/// Asks `Q_XGETQSTATV` (served by XFS and by the generic quota code ext4 uses); where the kernel
/// does not know it, falls back to `Q_GETINFO`, which fails with `ESRCH` when quotas are off (and,
/// when it succeeds, proves accounting only). An unsupported filesystem is reported as off.
pub fn enforcement(fd: BorrowedFd<'_>) -> io::Result<ProjectQuotaState> {
    let fs = detect(fd)?;
    let mut statv = FsQuotaStatv {
        qs_version: FS_QSTATV_VERSION1,
        ..Default::default()
    };
    // SAFETY: the command takes a `fs_quota_statv`, which this is.
    match unsafe { quotactl_fd(fd, Q_XGETQSTATV, 0, &mut statv) } {
        Ok(()) => {
            let flags = statv.qs_flags;
            return Ok(if flags & FS_QUOTA_PDQ_ACCT == 0 {
                ProjectQuotaState::Off { hint: off_hint(fs) }
            } else if flags & FS_QUOTA_PDQ_ENFD == 0 {
                ProjectQuotaState::AccountingOnly {
                    hint: accounting_hint(fs),
                }
            } else {
                ProjectQuotaState::Enforced
            });
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESRCH)
            ) => {}
        Err(e) => return Err(e),
    }
    let mut info = IfDqinfo::default();
    // SAFETY: the command takes an `if_dqinfo`, which this is.
    match unsafe { quotactl_fd(fd, Q_GETINFO, 0, &mut info) } {
        Ok(()) => Ok(ProjectQuotaState::AccountingOnly {
            hint: accounting_hint(fs),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) || fs.is_none() => {
            Ok(ProjectQuotaState::Off { hint: off_hint(fs) })
        }
        Err(e) => Err(e),
    }
}

/// The project id of a file or directory, and whether it has the inherit flag (new entries
/// below it get its id).
pub fn project_of(dir: BorrowedFd<'_>) -> io::Result<(u32, bool)> {
    let x = get_fsxattr(dir)?;
    Ok((x.fsx_projid, x.fsx_xflags & FS_XFLAG_PROJINHERIT != 0))
}

fn set_project_flags(dir: BorrowedFd<'_>, id: u32, inherit: bool) -> io::Result<()> {
    let mut x = get_fsxattr(dir)?;
    x.fsx_projid = id;
    if inherit {
        x.fsx_xflags |= FS_XFLAG_PROJINHERIT;
    } else {
        x.fsx_xflags &= !FS_XFLAG_PROJINHERIT;
    }
    set_fsxattr(dir, &x)
}

/// Sets project `id` on directory `dir`, with the inherit flag, so that everything created below
/// it from now on belongs to the project. Existing entries below it keep their id: use it on new,
/// empty directories. Prefer [`assign_new_project`], which picks a free id.
pub fn set_project(dir: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    set_project_flags(dir, id, true)
}

/// Sets project `id`'s hard block limit on the filesystem of `fd` (`Q_SETQUOTA`), rounded up to a
/// whole KiB; `None` removes the limit. Serves provisioning, expansion (a larger limit applies at
/// once) and removal (reset to `None`, so the id is free once its directory is gone).
/// `Some(0)` is refused with `EINVAL` (the kernel would read it as "no limit").
pub fn set_limit(fd: BorrowedFd<'_>, id: u32, bytes: Option<u64>) -> io::Result<()> {
    let kib = match bytes {
        None => 0,
        Some(0) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a project limit of 0 bytes would mean no limit",
            ));
        }
        Some(b) => b.div_ceil(1024),
    };
    let mut q = IfDqblk {
        dqb_bhardlimit: kib,
        dqb_bsoftlimit: 0,
        dqb_valid: QIF_BLIMITS,
        ..Default::default()
    };
    // SAFETY: the command takes an `if_dqblk`, which this is.
    unsafe { quotactl_fd(fd, Q_SETQUOTA, id, &mut q) }
}

/// Project `id`'s usage and limit on the filesystem of `fd` (`Q_GETQUOTA`). A project nobody uses
/// reads as zeros.
pub fn usage(fd: BorrowedFd<'_>, id: u32) -> io::Result<ProjectUsage> {
    Ok(
        dqblk(fd, id)?.map_or_else(ProjectUsage::default, |q| ProjectUsage {
            used_bytes: q.dqb_curspace,
            inodes: q.dqb_curinodes,
            limit_bytes: (q.dqb_bhardlimit != 0).then(|| q.dqb_bhardlimit.saturating_mul(1024)),
        }),
    )
}

/// The raw quota record; `None` where XFS says it does not exist (`ENOENT`: nothing counted and
/// no limits).
fn dqblk(fd: BorrowedFd<'_>, id: u32) -> io::Result<Option<IfDqblk>> {
    let mut q = IfDqblk::default();
    // SAFETY: the command takes an `if_dqblk`, which this is.
    match unsafe { quotactl_fd(fd, Q_GETQUOTA, id, &mut q) } {
        Ok(()) => Ok(Some(q)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn in_use(q: &IfDqblk) -> bool {
    q.dqb_curinodes > 0
        || q.dqb_bhardlimit != 0
        || q.dqb_bsoftlimit != 0
        || q.dqb_ihardlimit != 0
        || q.dqb_isoftlimit != 0
}

/// The arbitration counts the directory's inodes: it must hold nothing but itself.
fn ensure_empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                "a new project id goes on a new, empty directory",
            ));
        }
    }
    Ok(())
}

const ID_SPAN: u32 = PROJECT_ID_MAX - PROJECT_ID_MIN;

/// `start` itself when it is in `[PROJECT_ID_MIN, PROJECT_ID_MAX)`, else mapped into that range.
fn into_range(start: u32) -> u32 {
    if (PROJECT_ID_MIN..PROJECT_ID_MAX).contains(&start) {
        start
    } else {
        PROJECT_ID_MIN + start % ID_SPAN
    }
}

/// The candidate after `id`, wrapping around within the range.
fn next_candidate(id: u32) -> u32 {
    if id + 1 >= PROJECT_ID_MAX {
        PROJECT_ID_MIN
    } else {
        id + 1
    }
}

/// A pseudo-random id in `[PROJECT_ID_MIN, PROJECT_ID_MAX)`, different in every call and process
/// (std's randomly keyed SipHash over the time, the pid and a counter), to pass as `start` to
/// [`assign_new_project`].
pub fn random_start() -> u32 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    PROJECT_ID_MIN + (h.finish() % u64::from(ID_SPAN)) as u32
}

/// Picks a project id no other directory on the filesystem of `fs_fd` uses, sets it (with the
/// inherit flag) on `new_dir`, a new, **empty** directory on that filesystem (checked: else
/// `ErrorKind::DirectoryNotEmpty`; nothing may be created in it until this returns), and returns
/// it.
///
/// Candidates start at `start` (mapped into `[PROJECT_ID_MIN, PROJECT_ID_MAX)`; pass
/// [`random_start`]) and go up one by one past ids in use; after a collision with a concurrent
/// allocator the search jumps to a new pseudo-random point. See the module documentation for why
/// no two callers, in any processes, can end up with the same id. Needs project accounting on (at
/// least [`ProjectQuotaState::AccountingOnly`]); fails with `ErrorKind::Unsupported` when the
/// filesystem counts nothing. Fails after [`MAX_ATTEMPTS`] candidates. On an error after the id
/// was set, the directory is put back to project 0 where possible.
pub fn assign_new_project(
    fs_fd: BorrowedFd<'_>,
    new_dir: BorrowedFd<'_>,
    start: u32,
) -> io::Result<u32> {
    ensure_empty_dir(new_dir)?;
    let mut candidate = into_range(start);
    for _ in 0..MAX_ATTEMPTS {
        if dqblk(fs_fd, candidate)?.is_some_and(|q| in_use(&q)) {
            SKIPPED_IN_USE.fetch_add(1, Ordering::Relaxed);
            candidate = next_candidate(candidate);
            continue;
        }
        set_project(new_dir, candidate)?;
        let counted = match dqblk(fs_fd, candidate) {
            Ok(q) => q.map_or(0, |q| q.dqb_curinodes),
            Err(e) => {
                let _ = set_project_flags(new_dir, 0, false);
                return Err(e);
            }
        };
        if counted == 1 {
            ASSIGNED.fetch_add(1, Ordering::Relaxed);
            return Ok(candidate);
        }
        // Ours plus someone else's (or nothing at all): give the id up.
        set_project_flags(new_dir, 0, false)?;
        if counted == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "project quota accounting is off on this filesystem: the project id set on the \
                 directory is not counted (mount it with -o prjquota)",
            ));
        }
        COLLISIONS.fetch_add(1, Ordering::Relaxed);
        candidate = random_start();
    }
    Err(io::Error::other(format!(
        "no free project id found in {MAX_ATTEMPTS} candidates"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_in_range() {
        assert_eq!(into_range(PROJECT_ID_MIN), PROJECT_ID_MIN);
        assert_eq!(into_range(PROJECT_ID_MAX - 1), PROJECT_ID_MAX - 1);
        assert_eq!(into_range(0), PROJECT_ID_MIN);
        assert_eq!(into_range(5), PROJECT_ID_MIN + 5);
        assert!((PROJECT_ID_MIN..PROJECT_ID_MAX).contains(&into_range(u32::MAX)));
        assert_eq!(next_candidate(PROJECT_ID_MAX - 1), PROJECT_ID_MIN);
        assert_eq!(next_candidate(PROJECT_ID_MIN), PROJECT_ID_MIN + 1);
        for _ in 0..1000 {
            assert!((PROJECT_ID_MIN..PROJECT_ID_MAX).contains(&random_start()));
        }
        assert_ne!(random_start(), random_start());
    }

    #[test]
    fn detect_other_filesystems() {
        let f = std::fs::File::open("/proc").unwrap();
        use std::os::fd::AsFd;
        assert_eq!(detect(f.as_fd()).unwrap(), None);
        let state = enforcement(f.as_fd()).unwrap();
        assert!(matches!(state, ProjectQuotaState::Off { .. }), "{state:?}");
        assert!(state.hint().unwrap().contains("prjquota"));
    }

    #[test]
    fn non_empty_directory_is_refused() {
        use std::os::fd::AsFd;
        let dir = std::env::temp_dir().join(format!("project-quota-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let d = std::fs::File::open(&dir).unwrap();
        let e = assign_new_project(d.as_fd(), d.as_fd(), 0).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.kind(), io::ErrorKind::DirectoryNotEmpty, "{e}");
    }

    #[test]
    fn zero_limit_is_refused() {
        let f = std::fs::File::open("/proc").unwrap();
        use std::os::fd::AsFd;
        let e = set_limit(f.as_fd(), PROJECT_ID_MIN, Some(0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
