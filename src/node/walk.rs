//! What every walk over a volume's tree shares (removal, usage, copies): reading a directory in
//! bounded batches, opening a child without crossing a mount or following a symlink, and climbing back
//! to a parent that is still the one we came from.
//!
//! Memory is independent of what a tenant wrote: a directory is read one `getdents64` buffer at a time
//! (`Entries`), the caller acts on each entry as it comes, and a walk that goes down into a
//! subdirectory keeps only the position to resume its parent at (the entry's `d_off`), not its names.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, fstat};
use nix::unistd::{Whence, lseek};

/// Bytes read per `getdents64` call: a batch of about a thousand typical names (some 2,000 short ones),
/// the most a walk holds of any one directory.
pub const BATCH_BYTES: usize = 32 * 1024;

/// A directory's entries, read in batches of at most `BATCH_BYTES` through a stream fd of its own
/// (`.` reopened), `.` and `..` left out. Entries unlinked while reading simply leave the listing.
pub struct Entries {
    fd: OwnedFd,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    done: bool,
}

/// One directory entry; `next` is where a new `Entries` resumes right after it.
pub struct Entry<'a> {
    pub name: &'a CStr,
    pub next: i64,
}

/// Where a fresh read of a directory starts.
pub const START: i64 = 0;

impl Entries {
    /// Reads the open directory `dir` from `from` (`START`, or the `next` of an entry read before).
    pub fn open(dir: BorrowedFd<'_>, from: i64) -> Result<Self, Errno> {
        let fd = openat(
            dir,
            c".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        if from != START {
            lseek(&fd, from, Whence::SeekSet)?;
        }
        Ok(Entries {
            fd,
            buf: vec![0u8; BATCH_BYTES].into_boxed_slice(),
            pos: 0,
            len: 0,
            done: false,
        })
    }

    /// The next entry, reading the next batch when this one is used up; `None` at the end.
    #[allow(clippy::should_implement_trait)] // lends from its buffer: not an Iterator
    pub fn next(&mut self) -> Option<Result<Entry<'_>, Errno>> {
        loop {
            if self.pos >= self.len {
                if self.done {
                    return None;
                }
                // SAFETY: the buffer is valid for writes of its length; the kernel writes at most that.
                let n = unsafe {
                    libc::syscall(
                        libc::SYS_getdents64,
                        self.fd.as_raw_fd(),
                        self.buf.as_mut_ptr(),
                        self.buf.len(),
                    )
                };
                if n < 0 {
                    self.done = true;
                    return Some(Err(Errno::last()));
                }
                if n == 0 {
                    self.done = true;
                    return None;
                }
                self.pos = 0;
                self.len = n as usize;
            }
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let at = self.pos;
            let rec = &self.buf[at..self.len];
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            if reclen < 20 || reclen > rec.len() {
                self.done = true;
                self.len = 0;
                return Some(Err(Errno::EIO));
            }
            self.pos += reclen;
            let next = i64::from_ne_bytes(rec[8..16].try_into().expect("8 bytes"));
            let Ok(name) = CStr::from_bytes_until_nul(&rec[19..reclen]) else {
                continue;
            };
            if name == c"." || name == c".." {
                continue;
            }
            // Re-borrow through self.buf so the entry lends from the buffer only.
            let name =
                CStr::from_bytes_until_nul(&self.buf[at + 19..at + reclen]).expect("checked");
            return Some(Ok(Entry { name, next }));
        }
    }
}

static OPENAT2_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// `openat` that also refuses to cross any mount, bind mounts of the same filesystem included (which
/// st_dev cannot tell apart), and any symlink, where the kernel has openat2 (5.6+); elsewhere the
/// callers' st_dev checks and O_NOFOLLOW remain.
pub fn open_beneath(parent: BorrowedFd<'_>, name: &CStr, flags: OFlag) -> Result<OwnedFd, Errno> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    if !OPENAT2_UNAVAILABLE.load(Ordering::Relaxed) {
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_NO_XDEV | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(parent, name, how) {
            // Old kernels say ENOSYS; some seccomp profiles say EPERM, which a plain open never does here.
            Err(Errno::ENOSYS | Errno::EPERM) => OPENAT2_UNAVAILABLE.store(true, Ordering::Relaxed),
            result => return result,
        }
    }
    openat(parent, name, flags, Mode::empty())
}

/// Opens `..` of `dir` and checks it is the directory we descended from; `Err(None)` if it is not
/// (the subtree was moved meanwhile, and climbing on could take us outside the volume).
pub fn reopen_parent(dir: BorrowedFd<'_>, expected: (u64, u64)) -> Result<OwnedFd, Option<Errno>> {
    let parent = openat(
        dir,
        c"..",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(Some)?;
    let st = fstat(&parent).map_err(Some)?;
    if id(&st) != expected {
        return Err(None);
    }
    Ok(parent)
}

/// A file's identity: (st_dev, st_ino).
pub fn id(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Mounts for a test and always unmounts, so a failing assertion does not leave mounts behind.
    pub(crate) struct Mounted(PathBuf);

    impl Mounted {
        /// Mounts or fails the test saying why: a test that needs a mount never passes without one.
        pub(crate) fn new(args: &[&str], at: &Path) -> Self {
            let out = Command::new("mount").args(args).arg(at).output();
            match out {
                Ok(o) if o.status.success() => Mounted(at.to_path_buf()),
                other => panic!(
                    "mount {args:?} {} failed ({other:?}): this test needs root with CAP_SYS_ADMIN; \
                     run it as root, as scripts/test.sh does in CI",
                    at.display()
                ),
            }
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    use super::{Entries, START};
    use std::collections::HashSet;
    use std::os::fd::{AsFd, OwnedFd};

    fn open_dir(dir: &Path) -> OwnedFd {
        nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    }

    /// 10,000 names fill many batches.
    fn many_files(dir: &Path) {
        for i in 0..10_000 {
            std::fs::write(dir.join(format!("a-file-with-a-longer-name-{i}")), b"").unwrap();
        }
    }

    #[test]
    fn entries_are_read_in_batches_and_resume_after_any_entry() {
        let dir = tempfile::tempdir().unwrap();
        many_files(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let fd = open_dir(dir.path());
        let mut seen = HashSet::new();
        let mut half = None;
        let mut entries = Entries::open(fd.as_fd(), START).unwrap();
        while let Some(entry) = entries.next() {
            let entry = entry.unwrap();
            assert!(seen.insert(entry.name.to_owned()), "{:?} twice", entry.name);
            if seen.len() == 5_000 {
                half = Some(entry.next);
            }
        }
        assert_eq!(seen.len(), 10_001, "every name once, `.` and `..` left out");
        let mut rest = 0;
        let mut entries = Entries::open(fd.as_fd(), half.unwrap()).unwrap();
        while let Some(entry) = entries.next() {
            entry.unwrap();
            rest += 1;
        }
        assert_eq!(rest, 5_001, "a new reader resumes right after the entry");
    }

    #[test]
    fn entries_unlinked_while_reading_leave_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        many_files(dir.path());
        let fd = open_dir(dir.path());
        let mut removed = 0;
        let mut entries = Entries::open(fd.as_fd(), START).unwrap();
        while let Some(entry) = entries.next() {
            let entry = entry.unwrap();
            nix::unistd::unlinkat(
                fd.as_fd(),
                entry.name,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .unwrap();
            removed += 1;
        }
        assert_eq!(removed, 10_000);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    const CHILD: &str = "HOSTVOL_FEW_FDS_CHILD";

    /// For tests that prove a walk needs a bounded number of fds: in the test process, runs the test
    /// `path` (its `module_path!()::name`) alone in a child limited to 64 fds, asserts it passed, and
    /// returns `false`; in that child, returns `true`: go on with the test.
    pub(crate) fn in_child_with_few_fds(path: &str) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let out = Command::new("sh")
            .args(["-c", r#"ulimit -n 64 && exec "$0" "$@""#])
            .arg(std::env::current_exe().unwrap())
            // The test's own path, so moving its module cannot make the child run nothing.
            .args([
                "--exact",
                path.trim_start_matches("hostvol::"),
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
        false
    }
}
