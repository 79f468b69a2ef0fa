//! Adopting an orphaned directory (one no PV names, as `doctor` lists them) as a new claim's volume:
//! the on-disk half. A record written first in the data root says which claim takes which
//! directory; the directory is then moved (or marked) to the path the claim's volume has, and the
//! record goes once the PV exists. A crash at any point leaves the record, and the next pass
//! finishes from it.
//!
//! The records live on the node's disk, in a hidden directory of the data root, written only by the
//! agent (root): no API object anyone may edit ever decides which directory is adopted.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

use crate::domain::pattern::VolumePath;
use crate::node::parents;
use crate::node::walk::open_beneath;

/// The hidden directory of a data root holding adoption records (the orphan scan skips dot names).
pub const RECORDS: &str = ".hostvol-adoptions";

/// Records are a few hundred bytes; anything longer is not one of ours.
const MAX_RECORD: u64 = 4096;

/// Which claim takes which directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub namespace: String,
    pub claim: String,
    pub claim_uid: String,
    /// The orphan, relative to the data root.
    pub directory: String,
}

impl Record {
    fn encode(&self) -> String {
        format!(
            "{}/{}/{}\n{}\n",
            self.namespace, self.claim, self.claim_uid, self.directory
        )
    }

    fn decode(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        let mut claim = lines.next()?.splitn(3, '/');
        let (namespace, name, uid) = (claim.next()?, claim.next()?, claim.next()?);
        let directory = VolumePath::parse(lines.next()?).ok()?;
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        (valid(namespace) && valid(name) && valid(uid) && lines.next().is_none()).then(|| Record {
            namespace: namespace.into(),
            claim: name.into(),
            claim_uid: uid.into(),
            directory: directory.as_str().into(),
        })
    }
}

/// A claim uid as a file name: what the API server gives (hex and dashes), nothing else.
fn record_name(claim_uid: &str) -> Result<CString, Errno> {
    let valid = !claim_uid.is_empty()
        && claim_uid.len() <= 64
        && claim_uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid {
        return Err(Errno::EINVAL);
    }
    CString::new(claim_uid).map_err(|_| Errno::EINVAL)
}

fn records_dir(root: BorrowedFd<'_>, create: bool) -> Result<OwnedFd, Errno> {
    if create {
        match mkdirat(root, RECORDS, Mode::from_bits_truncate(0o700)) {
            Ok(()) => fsync(root)?,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    open_beneath(
        root,
        &CString::new(RECORDS).map_err(|_| Errno::EINVAL)?,
        flags,
    )
}

/// Writes the record durably (a temporary file renamed over, then both synced).
pub fn write(root: BorrowedFd<'_>, record: &Record) -> Result<(), Errno> {
    let name = record_name(&record.claim_uid)?;
    let dir = records_dir(root, true)?;
    let temporary = format!("tmp-{}", record.claim_uid);
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        dir.as_fd(),
        temporary.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(record.encode().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    renameat(
        dir.as_fd(),
        temporary.as_str(),
        dir.as_fd(),
        name.as_c_str(),
    )?;
    fsync(dir.as_fd())
}

/// The record of claim `claim_uid`, if there is one.
pub fn read(root: BorrowedFd<'_>, claim_uid: &str) -> Result<Option<Record>, Errno> {
    let name = record_name(claim_uid)?;
    let dir = match records_dir(root, false) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match openat(dir.as_fd(), name.as_c_str(), flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_RECORD)
        .read_to_string(&mut text)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let record = Record::decode(&text).filter(|r| r.claim_uid == claim_uid);
    Ok(Some(record.ok_or(Errno::EBADMSG)?))
}

/// Every record in the root (interrupted adoptions to finish); unreadable ones are skipped.
pub fn list(root: BorrowedFd<'_>) -> Result<Vec<Record>, Errno> {
    let dir = match records_dir(root, false) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut listing = nix::dir::Dir::openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let uids: Vec<String> = listing
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.starts_with("tmp-"))
        .collect();
    Ok(uids
        .iter()
        .filter_map(|uid| read(root, uid).ok().flatten())
        .collect())
}

/// Removes the record of claim `claim_uid` (the adoption is done, or cannot be done).
pub fn forget(root: BorrowedFd<'_>, claim_uid: &str) -> Result<(), Errno> {
    let name = record_name(claim_uid)?;
    let dir = match records_dir(root, false) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    match unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => fsync(dir.as_fd()),
        Err(e) => Err(e),
    }
}

/// Where the adopted directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Moved (or marked) by this call.
    Now,
    /// Already at `to`: an earlier pass moved it.
    Before,
}

/// Moves the directory `from` to `to` in the same data root for PV `pv`: a flat `to` is named for
/// the PV; a `to` below parents (`directoryPattern`) gets its ownership mark before it takes its
/// final name, as every patterned volume. Parents are opened without following symlinks and made
/// where missing; the move never replaces anything (`RENAME_NOREPLACE`), so a directory already at
/// `to` that is not the adopted one is an error (EEXIST), never overwritten. One rename inside one
/// filesystem keeps the inode (and its btrfs subvolume or XFS/ext4 project id). The parents `from`
/// leaves empty are removed.
pub fn place(
    root: BorrowedFd<'_>,
    from: &VolumePath,
    to: &VolumePath,
    pv: &str,
) -> Result<Placed, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let open = |path: &VolumePath| -> Result<Option<OwnedFd>, Errno> {
        let at = match parents::locate(root, path) {
            Ok(at) => at,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let leaf = CString::new(at.leaf.as_str()).map_err(|_| Errno::EINVAL)?;
        match open_beneath(at.parent(root), &leaf, flags) {
            Ok(dir) => Ok(Some(dir)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let marked = !to.is_named_for(pv);
    if from == to {
        let dir = open(to)?.ok_or(Errno::ENOENT)?;
        if marked {
            parents::set_owner(dir.as_fd(), pv)?;
            fsync(dir.as_fd())?;
        }
        return Ok(Placed::Before);
    }
    let source = open(from)?;
    let target = open(to)?;
    let Some(source) = source else {
        return match target {
            Some(_) => Ok(Placed::Before),
            None => Err(Errno::ENOENT),
        };
    };
    if target.is_some() {
        return Err(Errno::EEXIST);
    }
    if marked {
        parents::set_owner(source.as_fd(), pv)?;
        fsync(source.as_fd())?;
    }
    let from_at = parents::locate(root, from)?;
    let to_at = parents::make_parents(root, to)?;
    rename_noreplace(
        from_at.parent(root),
        &from_at.leaf,
        to_at.parent(root),
        &to_at.leaf,
    )?;
    fsync(to_at.parent(root))?;
    fsync(from_at.parent(root))?;
    drop(from_at);
    parents::remove_empty_parents(root, from)?;
    Ok(Placed::Now)
}

fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &str,
    to_dir: BorrowedFd<'_>,
    to: &str,
) -> Result<(), Errno> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    match nix::fcntl::renameat2(
        from_dir,
        from,
        to_dir,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        // EINVAL: this filesystem does not support the flag; ENOSYS: nor does the kernel.
        Err(Errno::EINVAL | Errno::ENOSYS) => {}
        result => return result,
    }
    // Fallback: check, then rename (the agent is the only one making names under the root).
    match nix::sys::stat::fstatat(to_dir, to, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EEXIST),
        Err(Errno::ENOENT) => renameat(from_dir, from, to_dir, to),
        Err(e) => Err(e),
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

    fn record(uid: &str, directory: &str) -> Record {
        Record {
            namespace: "web".into(),
            claim: "data".into(),
            claim_uid: uid.into(),
            directory: directory.into(),
        }
    }

    #[test]
    fn records_are_written_read_listed_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        assert_eq!(read(root.as_fd(), "u1").unwrap(), None);
        assert_eq!(list(root.as_fd()).unwrap(), vec![]);
        write(root.as_fd(), &record("u1", "team/kept")).unwrap();
        write(root.as_fd(), &record("u2", "pvc-9_web_old")).unwrap();
        assert_eq!(
            read(root.as_fd(), "u1").unwrap(),
            Some(record("u1", "team/kept"))
        );
        let mut all = list(root.as_fd()).unwrap();
        all.sort_by(|a, b| a.claim_uid.cmp(&b.claim_uid));
        assert_eq!(all.len(), 2);
        forget(root.as_fd(), "u1").unwrap();
        forget(root.as_fd(), "u1").unwrap(); // idempotent
        assert_eq!(read(root.as_fd(), "u1").unwrap(), None);
        // No uid that could name another file.
        for bad in ["", "../x", "a/b", ".", "tmp/../../etc"] {
            assert_eq!(
                write(root.as_fd(), &record(bad, "x")),
                Err(Errno::EINVAL),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_record_naming_an_unsafe_directory_is_not_read_as_one() {
        for text in [
            "web/data/u1\n../etc\n",
            "web/data/u1\n/etc\n",
            "web/data\nx\n",
            "web/data/u1\nx\nextra\n",
        ] {
            assert_eq!(Record::decode(text), None, "{text:?}");
        }
        assert_eq!(
            Record::decode("web/data/u1\na/b\n"),
            Some(record("u1", "a/b"))
        );
    }

    #[test]
    fn an_orphan_is_placed_flat_or_below_parents_and_a_retry_finds_it_done() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        std::fs::create_dir_all(dir.path().join("team-a/kept")).unwrap();
        std::fs::write(dir.path().join("team-a/kept/index.html"), "hi").unwrap();
        std::fs::create_dir_all(dir.path().join("team-a/sibling")).unwrap();
        // Flat: named for the new PV; the parent stays (a sibling is in it).
        let flat = path("pvc-new_web_data");
        assert_eq!(
            place(root.as_fd(), &path("team-a/kept"), &flat, "pvc-new"),
            Ok(Placed::Now)
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pvc-new_web_data/index.html")).unwrap(),
            "hi"
        );
        assert!(dir.path().join("team-a/sibling").is_dir());
        assert_eq!(
            place(root.as_fd(), &path("team-a/kept"), &flat, "pvc-new"),
            Ok(Placed::Before)
        );
        // Below parents: marked for the PV, the emptied parent removed.
        std::fs::remove_dir(dir.path().join("team-a/sibling")).unwrap();
        std::fs::create_dir_all(dir.path().join("team-a/other")).unwrap();
        let nested = path("web/data");
        assert_eq!(
            place(root.as_fd(), &path("team-a/other"), &nested, "pvc-2"),
            Ok(Placed::Now)
        );
        assert!(!dir.path().join("team-a").exists());
        let moved = open(&dir.path().join("web/data"));
        assert_eq!(
            parents::owner_of(moved.as_fd()).unwrap().as_deref(),
            Some("pvc-2")
        );
        // Never over something that is there.
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        assert_eq!(
            place(root.as_fd(), &path("x"), &nested, "pvc-2"),
            Err(Errno::EEXIST)
        );
        assert!(dir.path().join("x").is_dir());
        // Nothing to move and nothing there.
        assert_eq!(
            place(root.as_fd(), &path("gone"), &path("pvc-3_a_b"), "pvc-3"),
            Err(Errno::ENOENT)
        );
    }

    #[test]
    fn a_symlink_is_never_followed_from_or_to() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = open(dir.path());
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::fs::create_dir_all(dir.path().join("real")).unwrap();
        assert!(place(root.as_fd(), &path("link"), &path("pvc-1_a_b"), "pvc-1").is_err());
        assert!(place(root.as_fd(), &path("real"), &path("link/x"), "pvc-1").is_err());
        assert!(dir.path().join("real").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
