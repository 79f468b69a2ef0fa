//! Volume directories on disk. Every operation goes through an open handle on the data root and a
//! single validated name, never a joined path, and never follows a symlink.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat};
use nix::unistd::{Gid, Uid, fchown, fsync};

use crate::domain::naming::{self, NameError};
use crate::domain::params::ClassParameters;
use crate::domain::pattern::VolumePath;
use crate::node::quota::{self, Limit, Quotas};
use crate::node::{clone, parents, removal};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data root {path}: {source}; create it (e.g. `mkdir -p {path}`) or pass --data-root")]
    RootUnavailable { path: PathBuf, source: Errno },
    #[error("data root {path} is not a directory; pass --data-root with a directory")]
    RootNotDirectory { path: PathBuf },
    #[error(transparent)]
    UnsafeName(#[from] NameError),
    #[error(
        "{name} in {root} exists but is not a plain directory (a file or a symlink?); hostvol will not use or follow it; move it away"
    )]
    NotADirectory { root: PathBuf, name: String },
    #[error(
        "{path} in {root} exists already{}; hostvol leaves it as it is and will not share it",
        owner.as_ref().map_or(String::new(), |o| format!(" and belongs to volume {o}"))
    )]
    Taken {
        root: PathBuf,
        path: String,
        owner: Option<String>,
    },
    #[error(
        "cannot mark a volume in {root} as hostvol's ({source}): directoryPattern needs the agent to set trusted.* extended attributes (CAP_SYS_ADMIN, as deploy/daemonset.yaml grants) on a filesystem that keeps them"
    )]
    Unmarkable { root: PathBuf, source: Errno },
    #[error(
        "{path} in {root} is not the volume of {pv}{}; hostvol clones only a source it can prove is the claim's",
        owner.as_ref().map_or(" (it has no hostvol mark)".to_string(), |o| format!(" (it is marked for {o})"))
    )]
    NotTheSource {
        root: PathBuf,
        path: String,
        pv: String,
        owner: Option<String>,
    },
    #[error("cannot set the size limit of {name} in {root}: {source}")]
    Quota {
        root: PathBuf,
        name: String,
        source: std::io::Error,
    },
    #[error("cannot copy {source_name} into {name} in {root}: {error}")]
    Clone {
        root: PathBuf,
        source_name: String,
        name: String,
        error: clone::Error,
    },
    #[error("{op} {name} in {root}: {source}")]
    Io {
        op: &'static str,
        root: PathBuf,
        name: String,
        source: Errno,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short machine-readable kind, for Event reasons and metrics labels.
    pub fn category(&self) -> &'static str {
        match self {
            Error::RootUnavailable { .. } | Error::RootNotDirectory { .. } => {
                "data_root_unavailable"
            }
            Error::UnsafeName(_) => "unsafe_name",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::Taken { .. } => "directory_taken",
            Error::NotTheSource { .. } => "not_the_source",
            Error::Unmarkable { .. } => "unmarkable",
            Error::Quota { .. } => "quota",
            Error::Clone { error, .. } => error.category(),
            Error::Io { .. } => "io",
        }
    }
}

/// Whether a volume directory was made now or found from an earlier attempt (crash, retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Reused,
}

/// Sizes of the filesystem holding the data root, in bytes and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FilesystemStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

#[derive(Debug)]
pub struct VolumeStore {
    root_path: PathBuf,
    root: Arc<OwnedFd>,
}

impl VolumeStore {
    /// Opens the data root; it must already exist and be a directory (we never create the root, so a
    /// disk that failed to mount is not silently replaced by a directory on the root filesystem).
    pub fn open(path: &Path) -> Result<Self> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| match source {
            Errno::ENOTDIR => Error::RootNotDirectory {
                path: path.to_path_buf(),
            },
            source => Error::RootUnavailable {
                path: path.to_path_buf(),
                source,
            },
        })?;
        Ok(Self {
            root_path: path.to_path_buf(),
            root: Arc::new(root),
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// Makes (or finds) the directory `name` directly under the root with the class's mode and owner.
    pub fn ensure_volume_dir(&self, name: &str, params: &ClassParameters) -> Result<Outcome> {
        self.make_volume(&VolumePath::parse(name)?, None, params, &Quotas::none(), 0)
            .map(|(outcome, _)| outcome)
    }

    /// Makes (or finds) the volume `name` directly under the root as the quota backend needs it, with
    /// the class's mode and owner and, where the root enforces sizes, a hard limit of `bytes`. Every
    /// step is idempotent, so a pass interrupted anywhere is finished by the next one. For names that
    /// prove their PV themselves (`<pv>_...`); provisioning goes through [`Self::ensure_owned_volume`].
    pub fn ensure_volume(
        &self,
        name: &str,
        params: &ClassParameters,
        quotas: &Quotas,
        bytes: u64,
    ) -> Result<(Outcome, Option<Limit>)> {
        naming::validate_directory_name(name)?;
        self.make_volume(&VolumePath::parse(name)?, None, params, quotas, bytes)
    }

    /// [`Self::ensure_volume`] for the volume of PV `pv` at `path`. A path not named for the PV
    /// (`directoryPattern`) gets its parents made and the ownership mark, and must not be another's:
    /// [`Error::Taken`] when it is.
    pub fn ensure_owned_volume(
        &self,
        path: &str,
        pv: &str,
        params: &ClassParameters,
        quotas: &Quotas,
        bytes: u64,
    ) -> Result<(Outcome, Option<Limit>)> {
        let path = VolumePath::parse(path)?;
        let marked = (!path.is_named_for(pv)).then_some(pv);
        self.make_volume(&path, marked, params, quotas, bytes)
    }

    /// `marked`: the PV whose mark the directory carries (patterned), or None (named for its PV, or a
    /// clone's staging directory).
    fn make_volume(
        &self,
        path: &VolumePath,
        marked: Option<&str>,
        params: &ClassParameters,
        quotas: &Quotas,
        bytes: u64,
    ) -> Result<(Outcome, Option<Limit>)> {
        let name = path.as_str();
        let io = |op: &'static str| {
            let root = self.root_path.clone();
            let name = name.to_string();
            move |source| Error::Io {
                op,
                root,
                name,
                source,
            }
        };
        let at = parents::make_parents(self.root.as_fd(), path).map_err(|source| match source {
            Errno::ENOTDIR | Errno::ELOOP => Error::NotADirectory {
                root: self.root_path.clone(),
                name: name.to_string(),
            },
            source => io("make the parents of")(source),
        })?;
        let parent = at.parent(self.root.as_fd());
        let leaf = at.leaf.as_str();
        let outcome = match marked {
            None => match quotas.create_volume(parent, leaf) {
                Ok(true) => Outcome::Created,
                Ok(false) => Outcome::Reused,
                Err(source) => return Err(io("create")(errno_of(&source))),
            },
            Some(pv) => self.make_marked(parent, leaf, path, pv, quotas)?,
        };
        // O_NOFOLLOW: if something swapped the name for a symlink, the open fails instead of leaving the root.
        let dir = openat(
            parent,
            leaf,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| match source {
            Errno::ENOTDIR | Errno::ELOOP => Error::NotADirectory {
                root: self.root_path.clone(),
                name: name.to_string(),
            },
            source => io("open")(source),
        })?;
        if params.uid.is_some() || params.gid.is_some() {
            fchown(
                dir.as_fd(),
                params.uid.map(Uid::from_raw),
                params.gid.map(Gid::from_raw),
            )
            .map_err(io("chown"))?;
        }
        // After chown (which clears setgid) and explicitly, because mkdir's mode is filtered by the umask.
        fchmod(dir.as_fd(), Mode::from_bits_truncate(params.mode)).map_err(io("chmod"))?;
        let limit = quotas
            .limit(parent, leaf, bytes)
            .map_err(|source| Error::Quota {
                root: self.root_path.clone(),
                name: name.to_string(),
                source,
            })?;
        if outcome == Outcome::Created {
            // Make the new entry durable before a PV points at it.
            fsync(parent).map_err(io("sync"))?;
        }
        Ok((outcome, limit))
    }

    /// Makes the patterned volume `leaf` in `parent` for PV `pv`: in a staging directory
    /// `creating-<pv>` that gets the mark first, then renamed into place without replacing anything,
    /// so the final name never exists unmarked and an existing directory is never taken over.
    fn make_marked(
        &self,
        parent: BorrowedFd<'_>,
        leaf: &str,
        path: &VolumePath,
        pv: &str,
        quotas: &Quotas,
    ) -> Result<Outcome> {
        let io = |op: &'static str| {
            let root = self.root_path.clone();
            let name = path.to_string();
            move |source| Error::Io {
                op,
                root,
                name,
                source,
            }
        };
        if let Some(outcome) = self.existing_marked(parent, leaf, path, pv)? {
            return Ok(outcome);
        }
        let staging = naming::creation_staging_name(pv);
        quotas
            .create_volume(parent, &staging)
            .map_err(|e| io("create")(errno_of(&e)))?;
        let made = openat(
            parent,
            staging.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("open"))?;
        parents::set_owner(made.as_fd(), pv).map_err(|source| match source {
            Errno::EPERM | Errno::EOPNOTSUPP => Error::Unmarkable {
                root: self.root_path.clone(),
                source,
            },
            source => io("mark")(source),
        })?;
        match removal::rename_noreplace(parent, &staging, leaf) {
            Ok(()) => Ok(Outcome::Created),
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => {
                // Made by someone else in between: give up ours (empty, just made), report theirs.
                let _ = quotas.remove_volume(parent, &staging, None);
                self.existing_marked(parent, leaf, path, pv)?
                    .ok_or_else(|| io("rename")(Errno::EEXIST))
            }
            Err(source) => Err(io("rename")(source)),
        }
    }

    /// `Some(Reused)` if the volume exists and is marked for `pv`; [`Error::Taken`] if it exists and
    /// is not; `None` if it does not exist.
    fn existing_marked(
        &self,
        parent: BorrowedFd<'_>,
        leaf: &str,
        path: &VolumePath,
        pv: &str,
    ) -> Result<Option<Outcome>> {
        let existing = openat(
            parent,
            leaf,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let taken = |owner| Error::Taken {
            root: self.root_path.clone(),
            path: path.to_string(),
            owner,
        };
        match existing {
            Ok(dir) => match parents::owner_of(dir.as_fd()) {
                Ok(Some(owner)) if owner == pv => Ok(Some(Outcome::Reused)),
                Ok(owner) => Err(taken(owner)),
                Err(source) => Err(Error::Io {
                    op: "read the mark of",
                    root: self.root_path.clone(),
                    name: path.to_string(),
                    source,
                }),
            },
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ENOTDIR | Errno::ELOOP) => Err(taken(None)),
            Err(source) => Err(Error::Io {
                op: "open",
                root: self.root_path.clone(),
                name: path.to_string(),
                source,
            }),
        }
    }

    /// Makes (or finishes from an earlier pass) the clone `target` of PV `pv` from the volume `source`
    /// of PV `source_pv`, then gives it the class's mode and owner and its own limit, as
    /// [`Self::ensure_owned_volume`]. Either path may be flat or below parents (`directoryPattern`).
    ///
    /// The source is opened without following anything and must prove it is `source_pv`'s (its name
    /// or its mark) before a byte is read. The clone is made in a staging directory in the target's
    /// parent (`cloning-<target>` when the target is named for its PV, else `creating-<pv>`, which
    /// gets the mark first): a btrfs snapshot where the source is a subvolume, else a copy into a
    /// volume that already has the clone's limit. It is renamed into place without replacing
    /// anything, so an interrupted clone is never mistaken for a finished one: the next pass removes
    /// the staging directory and starts again.
    #[allow(clippy::too_many_arguments)]
    pub fn ensure_clone(
        &self,
        source: &str,
        source_pv: &str,
        target: &str,
        pv: &str,
        params: &ClassParameters,
        quotas: &Quotas,
        bytes: u64,
    ) -> Result<(Outcome, Option<Limit>)> {
        let (source_path, target_path) = (VolumePath::parse(source)?, VolumePath::parse(target)?);
        let marked = !target_path.is_named_for(pv);
        let io = |op: &'static str, name: &str| {
            let (root, name) = (self.root_path.clone(), name.to_string());
            move |source| Error::Io {
                op,
                root,
                name,
                source,
            }
        };
        let failed = |name: &str| {
            let (root, source_name, name) =
                (self.root_path.clone(), source.to_string(), name.to_string());
            move |error| Error::Clone {
                root,
                source_name,
                name,
                error,
            }
        };
        let at = parents::make_parents(self.root.as_fd(), &target_path).map_err(|e| match e {
            Errno::ENOTDIR | Errno::ELOOP => Error::NotADirectory {
                root: self.root_path.clone(),
                name: target.to_string(),
            },
            e => io("make the parents of", target)(e),
        })?;
        let parent = at.parent(self.root.as_fd());
        let leaf = at.leaf.as_str();
        let exists = if marked {
            self.existing_marked(parent, leaf, &target_path, pv)?
                .is_some()
        } else {
            is_directory(parent, leaf).map_err(io("stat", target))?
        };
        if !exists {
            let (src, src_st) = self.open_source(&source_path, source_pv)?;
            let staging = if marked {
                naming::creation_staging_name(pv)
            } else {
                naming::clone_staging_name(leaf)
            };
            let staging_path = VolumePath::parse(&match target_path.parent_paths().last() {
                Some(up) => format!("{up}/{staging}"),
                None => staging.clone(),
            })?;
            if is_directory(parent, &staging).map_err(io("stat", staging_path.as_str()))? {
                quotas
                    .remove_volume(parent, &staging, None)
                    .map_err(|e| Error::Io {
                        op: "remove the interrupted clone",
                        root: self.root_path.clone(),
                        name: format!("{staging_path}: {e}"),
                        source: Errno::EIO,
                    })?;
            }
            let snapshot = quotas.uses_subvolumes()
                && quota::btrfs::is_subvolume(src.as_fd()).unwrap_or(false);
            if snapshot {
                clone::snapshot_of(src.as_fd(), source, parent, &staging)
                    .map_err(failed(staging_path.as_str()))?;
            } else {
                self.make_volume(&staging_path, None, params, quotas, bytes)?;
            }
            let made = openat(
                parent,
                staging.as_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io("open", staging_path.as_str()))?;
            // A snapshot carries the source's mark: the clone gets its own, or none when its name
            // proves whose it is.
            let marking = match (marked, snapshot) {
                (true, _) => parents::set_owner(made.as_fd(), pv),
                (false, true) => parents::clear_owner(made.as_fd()),
                (false, false) => Ok(()),
            };
            marking.map_err(|e| match e {
                Errno::EPERM | Errno::EOPNOTSUPP if marked => Error::Unmarkable {
                    root: self.root_path.clone(),
                    source: e,
                },
                e => io("mark", staging_path.as_str())(e),
            })?;
            if !snapshot {
                clone::copy_from(src, src_st, source, parent, &staging)
                    .map_err(failed(staging_path.as_str()))?;
            }
            match removal::rename_noreplace(parent, &staging, leaf) {
                Ok(()) => {}
                Err(Errno::EEXIST | Errno::ENOTEMPTY) if marked => {
                    // Made by someone else in between: report theirs, keep ours visible.
                    self.existing_marked(parent, leaf, &target_path, pv)?;
                }
                Err(e) => return Err(io("rename", staging_path.as_str())(e)),
            }
            fsync(parent).map_err(io("sync", target))?;
        }
        let (outcome, limit) = self.make_volume(&target_path, None, params, quotas, bytes)?;
        Ok((if exists { outcome } else { Outcome::Created }, limit))
    }

    /// Opens the volume `path` of PV `pv` to read it for a clone, and checks on the opened directory
    /// that it is that PV's (named for it, or marked for it): a PV pointing elsewhere never makes the
    /// agent copy another volume's data.
    fn open_source(
        &self,
        path: &VolumePath,
        pv: &str,
    ) -> Result<(OwnedFd, nix::sys::stat::FileStat)> {
        let failed = |error| Error::Clone {
            root: self.root_path.clone(),
            source_name: path.to_string(),
            name: path.to_string(),
            error,
        };
        let at = parents::locate(self.root.as_fd(), path).map_err(|e| match e {
            Errno::ENOENT => failed(clone::Error::NotFound {
                name: path.to_string(),
            }),
            Errno::ENOTDIR | Errno::ELOOP => Error::NotADirectory {
                root: self.root_path.clone(),
                name: path.to_string(),
            },
            e => Error::Io {
                op: "open the parents of",
                root: self.root_path.clone(),
                name: path.to_string(),
                source: e,
            },
        })?;
        let (dir, st) =
            clone::open_source(at.parent(self.root.as_fd()), &at.leaf).map_err(failed)?;
        if !path.is_named_for(pv) {
            let owner = parents::owner_of(dir.as_fd()).map_err(|source| Error::Io {
                op: "read the mark of",
                root: self.root_path.clone(),
                name: path.to_string(),
                source,
            })?;
            if owner.as_deref() != Some(pv) {
                return Err(Error::NotTheSource {
                    root: self.root_path.clone(),
                    path: path.to_string(),
                    pv: pv.to_string(),
                    owner,
                });
            }
        }
        Ok((dir, st))
    }

    /// Whether `name` exists under the root as a real directory (symlinks do not count).
    pub fn volume_dir_exists(&self, name: &str) -> Result<bool> {
        naming::validate_directory_name(name)?;
        match fstatat(
            self.root.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR),
            Err(Errno::ENOENT) => Ok(false),
            Err(source) => Err(Error::Io {
                op: "stat",
                root: self.root_path.clone(),
                name: name.to_string(),
                source,
            }),
        }
    }

    /// A shared handle on the root, for walks that run on other threads.
    pub fn root_handle(&self) -> Arc<OwnedFd> {
        self.root.clone()
    }

    /// Name of the filesystem type holding the root ("ext4", "xfs", ...).
    pub fn filesystem_type(&self) -> String {
        match nix::sys::statfs::fstatfs(self.root.as_fd()) {
            Ok(st) => filesystem_type_name(st.filesystem_type().0),
            Err(_) => "unknown".into(),
        }
    }

    /// Space of the filesystem the root lives on.
    pub fn filesystem_stats(&self) -> Result<FilesystemStats> {
        let st = nix::sys::statvfs::fstatvfs(self.root.as_fd()).map_err(|source| {
            Error::RootUnavailable {
                path: self.root_path.clone(),
                source,
            }
        })?;
        let block = st.fragment_size() as u64;
        Ok(FilesystemStats {
            total_bytes: st.blocks() as u64 * block,
            available_bytes: st.blocks_available() as u64 * block,
            used_bytes: (st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * block,
            total_inodes: st.files() as u64,
            free_inodes: st.files_free() as u64,
        })
    }

    /// Whether the root is the top of a filesystem (a mounted disk), not a plain directory on its parent's.
    pub fn is_mount_point(&self) -> Result<bool> {
        let unavailable = |source| Error::RootUnavailable {
            path: self.root_path.clone(),
            source,
        };
        let own = fstat(self.root.as_fd()).map_err(unavailable)?;
        let parent =
            fstatat(self.root.as_fd(), "..", nix::fcntl::AtFlags::empty()).map_err(unavailable)?;
        Ok(own.st_dev != parent.st_dev || own.st_ino == parent.st_ino)
    }

    /// Whether the root's filesystem is mounted read-only.
    pub fn is_read_only(&self) -> bool {
        nix::sys::statvfs::fstatvfs(self.root.as_fd())
            .map(|st| st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
            .unwrap_or(false)
    }

    /// The root still exists and is a directory (it may vanish if a disk is unmounted under us).
    pub fn check_root(&self) -> Result<()> {
        let st = fstat(self.root.as_fd()).map_err(|source| Error::RootUnavailable {
            path: self.root_path.clone(),
            source,
        })?;
        if st.st_nlink == 0 {
            return Err(Error::RootUnavailable {
                path: self.root_path.clone(),
                source: Errno::ENOENT,
            });
        }
        Ok(())
    }
}

/// Whether `name` in `parent` is a real directory (symlinks do not count).
fn is_directory(parent: BorrowedFd<'_>, name: &str) -> Result<bool, Errno> {
    match fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn errno_of(error: &std::io::Error) -> Errno {
    error.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

fn filesystem_type_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlay",
        0x6969 => "nfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0x6573_5546 => "fuse",
        _ => return format!("0x{magic:x}"),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn store() -> (tempfile::TempDir, VolumeStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn creates_with_requested_mode_despite_umask_and_reuses() {
        let (dir, store) = store();
        let params = ClassParameters::default();
        assert_eq!(
            store.ensure_volume_dir("pvc-1_ns_c", &params).unwrap(),
            Outcome::Created
        );
        let meta = std::fs::metadata(dir.path().join("pvc-1_ns_c")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o777);
        std::fs::write(dir.path().join("pvc-1_ns_c/data"), b"keep").unwrap();
        assert_eq!(
            store.ensure_volume_dir("pvc-1_ns_c", &params).unwrap(),
            Outcome::Reused
        );
        assert_eq!(
            std::fs::read(dir.path().join("pvc-1_ns_c/data")).unwrap(),
            b"keep"
        );
        assert!(store.volume_dir_exists("pvc-1_ns_c").unwrap());
        assert!(!store.volume_dir_exists("pvc-2_ns_c").unwrap());
    }

    #[test]
    fn applies_owner_when_asked() {
        // chown to another uid needs root; CI runs as root.
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (chown, mount); run it as root, as scripts/test.sh does in CI"
        );
        let (dir, store) = store();
        let params = ClassParameters {
            mode: 0o2770,
            uid: Some(1234),
            gid: Some(5678),
            ..Default::default()
        };
        store.ensure_volume_dir("pvc-2_ns_c", &params).unwrap();
        let meta = std::fs::metadata(dir.path().join("pvc-2_ns_c")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1234, 5678, 0o2770)
        );
    }

    #[test]
    fn patterned_volumes_are_nested_marked_never_shared_and_removed_alone() {
        use crate::node::parents::{self, Ownership};
        use crate::node::quota::Removed;
        let (dir, store) = store();
        let (params, quotas) = (ClassParameters::default(), Quotas::none());
        let make = |path: &str, pv: &str| store.ensure_owned_volume(path, pv, &params, &quotas, 0);
        assert_eq!(make("team-a/web", "pvc-1").unwrap().0, Outcome::Created);
        assert_eq!(make("team-a/db", "pvc-2").unwrap().0, Outcome::Created);
        // The same claim again (a retry): found, not made twice.
        assert_eq!(make("team-a/web", "pvc-1").unwrap().0, Outcome::Reused);
        let meta = std::fs::metadata(dir.path().join("team-a/web")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o777);
        // Another claim mapped to the same path: refused, naming the owner.
        match make("team-a/web", "pvc-3").unwrap_err() {
            Error::Taken { owner, path, .. } => {
                assert_eq!(
                    (owner.as_deref(), path.as_str()),
                    (Some("pvc-1"), "team-a/web")
                )
            }
            other => panic!("{other}"),
        }
        // A directory nobody made (or retained data without a mark) is not taken over either.
        std::fs::create_dir_all(dir.path().join("team-b/kept")).unwrap();
        std::fs::write(dir.path().join("team-b/kept/data"), b"old").unwrap();
        assert!(matches!(
            make("team-b/kept", "pvc-4").unwrap_err(),
            Error::Taken { owner: None, .. }
        ));
        assert_eq!(
            std::fs::read(dir.path().join("team-b/kept/data")).unwrap(),
            b"old"
        );
        // No staging directory is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("team-a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let root = store.root_handle();
        let web = VolumePath::parse("team-a/web").unwrap();
        assert_eq!(
            parents::ownership(root.as_fd(), &web, "pvc-1").unwrap(),
            Ownership::Owned
        );
        // A PV naming another volume's directory removes nothing.
        let err = quotas
            .dispose_volume(root.as_fd(), "team-a/web", "pvc-9", false, None)
            .unwrap_err();
        assert_eq!(err.category(), "not_ours", "{err}");
        assert!(dir.path().join("team-a/web").is_dir());
        // Delete of one of two siblings: the other and the shared parent stay.
        std::fs::write(dir.path().join("team-a/web/f"), b"x").unwrap();
        assert!(matches!(
            quotas
                .dispose_volume(root.as_fd(), "team-a/web", "pvc-1", false, None)
                .unwrap(),
            Removed::Done(_)
        ));
        assert!(!dir.path().join("team-a/web").exists());
        assert!(dir.path().join("team-a/db").is_dir());
        // The last one takes the parent it leaves empty with it; again is a no-op.
        for _ in 0..2 {
            quotas
                .dispose_volume(root.as_fd(), "team-a/db", "pvc-2", false, None)
                .unwrap();
        }
        assert!(!dir.path().join("team-a").exists());
        assert!(dir.path().join("team-b/kept").is_dir());
        // Archive keeps the data next to where it was.
        make("team-c/app", "pvc-5").unwrap();
        quotas
            .dispose_volume(root.as_fd(), "team-c/app", "pvc-5", true, None)
            .unwrap();
        assert!(dir.path().join("team-c/archived-app").is_dir());
    }

    #[test]
    fn clones_go_into_and_come_from_patterned_volumes_only_when_proven() {
        use crate::node::parents::{self, Ownership};
        let (dir, store) = store();
        let (params, quotas) = (ClassParameters::default(), Quotas::none());
        let clone = |source: &str, source_pv: &str, target: &str, pv: &str| {
            store.ensure_clone(source, source_pv, target, pv, &params, &quotas, 0)
        };
        let read = |path: &str| std::fs::read(dir.path().join(path)).unwrap();
        let entries = |path: &str| -> Vec<String> {
            let mut names: Vec<_> = std::fs::read_dir(dir.path().join(path))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let root = store.root_handle();
        let owned = |path: &str, pv: &str| {
            parents::ownership(root.as_fd(), &VolumePath::parse(path).unwrap(), pv).unwrap()
        };
        store
            .ensure_volume("pvc-1_ns_flat", &params, &quotas, 0)
            .unwrap();
        std::fs::create_dir(dir.path().join("pvc-1_ns_flat/sub")).unwrap();
        std::fs::write(dir.path().join("pvc-1_ns_flat/sub/data"), b"flat").unwrap();
        // (a) flat source into a patterned target: nested, marked for the clone, no staging left.
        let made = clone("pvc-1_ns_flat", "pvc-1", "ns/a/copy", "pvc-2").unwrap();
        assert_eq!(made.0, Outcome::Created);
        assert_eq!(read("ns/a/copy/sub/data"), b"flat");
        assert_eq!(owned("ns/a/copy", "pvc-2"), Ownership::Owned);
        assert_eq!(entries("ns/a"), ["copy"]);
        // A retry finds it done and copies nothing again.
        std::fs::write(dir.path().join("ns/a/copy/new"), b"mine").unwrap();
        let again = clone("pvc-1_ns_flat", "pvc-1", "ns/a/copy", "pvc-2").unwrap();
        assert_eq!(again.0, Outcome::Reused);
        assert_eq!(read("ns/a/copy/new"), b"mine");
        // (b) patterned source into a patterned target, and into a flat one.
        clone("ns/a/copy", "pvc-2", "ns/b/again", "pvc-3").unwrap();
        assert_eq!(read("ns/b/again/new"), b"mine");
        assert_eq!(owned("ns/b/again", "pvc-3"), Ownership::Owned);
        clone("ns/a/copy", "pvc-2", "pvc-4_ns_flat", "pvc-4").unwrap();
        assert_eq!(read("pvc-4_ns_flat/sub/data"), b"flat");
        assert_eq!(entries("").len(), 3, "{:?}", entries(""));
        // A source that does not prove it is the claimed PV's is never read.
        std::fs::create_dir_all(dir.path().join("ns/c/hand")).unwrap();
        std::fs::write(dir.path().join("ns/c/hand/secret"), b"x").unwrap();
        for (source, pv) in [("ns/c/hand", "pvc-5"), ("ns/a/copy", "pvc-9")] {
            match clone(source, pv, "ns/d/stolen", "pvc-6").unwrap_err() {
                Error::NotTheSource { path, .. } => assert_eq!(path, source),
                other => panic!("{other}"),
            }
        }
        assert!(!dir.path().join("ns/d/stolen").exists());
        // Nor a symlink to one, at the leaf or on the way.
        std::os::unix::fs::symlink(dir.path().join("ns/a"), dir.path().join("ns/link")).unwrap();
        assert!(clone("ns/link/copy", "pvc-2", "ns/e/x", "pvc-7").is_err());
        // A target taken by another volume is left as it is.
        match clone("pvc-1_ns_flat", "pvc-1", "ns/b/again", "pvc-8").unwrap_err() {
            Error::Taken { owner, .. } => assert_eq!(owner.as_deref(), Some("pvc-3")),
            other => panic!("{other}"),
        }
        // An interrupted copy (its staging directory in the target's parent) is started again.
        std::fs::create_dir_all(dir.path().join("ns/f/creating-pvc-10/partial")).unwrap();
        clone("pvc-1_ns_flat", "pvc-1", "ns/f/done", "pvc-10").unwrap();
        assert_eq!(entries("ns/f"), ["done"]);
        assert_eq!(entries("ns/f/done"), ["sub"]);
    }

    #[test]
    fn never_follows_or_escapes() {
        let (dir, store) = store();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("pvc-3_ns_c")).unwrap();
        let err = store
            .ensure_volume_dir("pvc-3_ns_c", &ClassParameters::default())
            .unwrap_err();
        assert_eq!(err.category(), "not_a_directory", "{err}");
        assert!(!store.volume_dir_exists("pvc-3_ns_c").unwrap());
        // The symlink target's permissions were not touched.
        let mode = std::fs::metadata(outside.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_ne!(mode, 0o777);
        for bad in ["..", "../x", "a/../b", "a//b", "/a", ".", ""] {
            assert_eq!(
                store
                    .ensure_volume_dir(bad, &ClassParameters::default())
                    .unwrap_err()
                    .category(),
                "unsafe_name"
            );
        }
        // Nor through a parent that is a symlink.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("ns")).unwrap();
        let err = store
            .ensure_owned_volume(
                "ns/c",
                "pvc-5",
                &ClassParameters::default(),
                &Quotas::none(),
                0,
            )
            .unwrap_err();
        assert_eq!(err.category(), "not_a_directory", "{err}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        std::fs::write(dir.path().join("pvc-4_ns_c"), b"").unwrap();
        assert_eq!(
            store
                .ensure_volume_dir("pvc-4_ns_c", &ClassParameters::default())
                .unwrap_err()
                .category(),
            "not_a_directory"
        );
    }

    #[test]
    fn root_must_exist_and_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = VolumeStore::open(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("mkdir -p"), "{missing}");
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(matches!(
            VolumeStore::open(&dir.path().join("file")).unwrap_err(),
            Error::RootNotDirectory { .. }
        ));
    }

    #[test]
    fn a_plain_directory_is_not_a_mount_point() {
        let (_dir, store) = store();
        assert!(!store.is_mount_point().unwrap());
        assert!(
            VolumeStore::open(Path::new("/"))
                .unwrap()
                .is_mount_point()
                .unwrap()
        );
        assert!(!store.is_read_only());
    }

    #[test]
    fn reports_filesystem_space() {
        let (_dir, store) = store();
        let fs = store.filesystem_stats().unwrap();
        assert!(fs.total_bytes > 0 && fs.available_bytes <= fs.total_bytes);
        assert!(!store.filesystem_type().is_empty());
    }
}
