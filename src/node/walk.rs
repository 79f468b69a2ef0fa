//! What every walk over a volume's tree shares (removal, copies): opening a child without crossing a
//! mount or following a symlink, and climbing back to a parent that is still the one we came from.

use std::ffi::CStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, fstat};

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
