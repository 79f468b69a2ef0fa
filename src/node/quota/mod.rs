//! Enforced sizes: each data root's quota backend, chosen from its quota mode and what its filesystem
//! offers (see [`crate::domain::quota`]). btrfs: a subvolume per volume with a qgroup limit
//! ([`btrfs`]); XFS and ext4: a project id per volume directory with a block hard limit
//! ([`project`]). All through syscalls on open handles, never through the filesystems' tools.

pub mod btrfs;
pub mod project;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use crate::domain::naming;
use crate::domain::pattern::VolumePath;
use crate::domain::quota::{Enforcement, Mechanism, Offer, QuotaMode, decide};
use crate::node::parents::{self, Ownership};
use crate::node::removal;

/// What one data root does about sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    pub mode: QuotaMode,
    pub enforcement: Enforcement,
}

/// The limit set on one volume: where a restart (and the PV) finds it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// btrfs subvolume id; its qgroup is `0/<id>`.
    Qgroup(u64),
    /// XFS/ext4 project id.
    Project(u32),
}

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    Done(String),
    /// The volume is gone but its qgroup `0/<id>` is still busy: call again later.
    QgroupBusy(u64),
}

impl Limit {
    /// Reads a record written by [`Limit::record`].
    pub fn parse(record: &str) -> Option<Limit> {
        if let Some(id) = record.strip_prefix("qgroup 0/") {
            return id.parse().ok().map(Limit::Qgroup);
        }
        record
            .strip_prefix("project ")?
            .parse()
            .ok()
            .map(Limit::Project)
    }

    /// The value recorded on the PV (`hostvol.io/quota`).
    pub fn record(&self) -> String {
        match self {
            Limit::Qgroup(id) => format!("qgroup 0/{id}"),
            Limit::Project(id) => format!("project {id}"),
        }
    }
}

impl Quotas {
    /// No enforcement: plain directories, no limits.
    pub fn none() -> Self {
        Quotas {
            mode: QuotaMode::Off,
            enforcement: Enforcement::Unlimited {
                reason: "quota mode off".into(),
            },
        }
    }

    /// Detects what the root's filesystem offers and decides with `mode`.
    pub fn detect(root: BorrowedFd<'_>, mode: QuotaMode) -> Self {
        let offer = if mode == QuotaMode::Off {
            Offer::Unavailable("quota mode off".into())
        } else {
            offer(root)
        };
        Quotas {
            mode,
            enforcement: decide(mode, &offer),
        }
    }

    pub fn mechanism(&self) -> Option<Mechanism> {
        self.enforcement.mechanism()
    }

    /// Volumes are btrfs subvolumes (not plain directories) on this root.
    pub fn uses_subvolumes(&self) -> bool {
        self.mechanism() == Some(Mechanism::BtrfsQgroup)
    }

    /// Makes the volume `name` under `root` as this backend needs it: a subvolume on btrfs, a plain
    /// directory otherwise. `Ok(false)` if it already exists (an earlier, interrupted pass).
    pub fn create_volume(&self, root: BorrowedFd<'_>, name: &str) -> io::Result<bool> {
        naming::validate_directory_name(name).map_err(invalid)?;
        let made = if self.uses_subvolumes() {
            btrfs::create_subvolume(root, name)
        } else {
            nix::sys::stat::mkdirat(root, name, Mode::from_bits_truncate(0o700))
                .map_err(io::Error::from)
        };
        match made {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets (or raises) the volume's hard limit to `bytes`; idempotent, so an interrupted pass is
    /// finished by the next. `None` when this root does not enforce sizes.
    pub fn limit(&self, root: BorrowedFd<'_>, name: &str, bytes: u64) -> io::Result<Option<Limit>> {
        let Some(mechanism) = self.mechanism() else {
            return Ok(None);
        };
        naming::validate_directory_name(name).map_err(invalid)?;
        if mechanism == Mechanism::BtrfsQgroup {
            let volume = btrfs::open_subvolume(root, name)?;
            btrfs::set_limit(volume.as_fd(), Some(bytes))?;
            return Ok(Some(Limit::Qgroup(btrfs::subvolume_id(volume.as_fd())?)));
        }
        let volume = open_volume(root, name)?;
        let id = match project::project_of(volume.as_fd())? {
            // Set by an earlier pass (ids differ from the root's own, which new directories inherit).
            (id, true) if id != 0 && id != project::project_of(root)?.0 => id,
            _ => project::assign_new_project(root, volume.as_fd(), project::random_start())?,
        };
        project::set_limit(root, id, Some(bytes))?;
        Ok(Some(Limit::Project(id)))
    }

    /// Destroys the volume `name` if it is a btrfs subvolume, returning its id; `None` for a plain
    /// directory or nothing, which the caller removes with the safe walk. The destroy ioctl deletes
    /// only that subvolume's own tree: it never follows symlinks or leaves the volume.
    pub fn destroy_subvolume(&self, root: BorrowedFd<'_>, name: &str) -> io::Result<Option<u64>> {
        naming::validate_directory_name(name).map_err(invalid)?;
        if !btrfs::is_btrfs(root)? {
            return Ok(None);
        }
        let volume = match btrfs::open_subvolume(root, name) {
            Ok(volume) => volume,
            // A plain directory, or nothing: the safe walk handles both.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::NotFound
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let id = btrfs::subvolume_id(volume.as_fd())?;
        drop(volume);
        btrfs::destroy_subvolume(root, name)?;
        // Commit now, so a power loss cannot bring back a volume whose PV is about to go.
        btrfs::sync(root)?;
        Ok(Some(id))
    }

    /// Removes the volume `name` and then its limit, never following a symlink or leaving the root:
    /// a subvolume with the destroy ioctl, a directory with the safe walk; then its qgroup, or its
    /// project limit reset so the id is free again. `recorded` is the limit the PV records, so a pass
    /// after a crash (the volume already gone) still releases it.
    pub fn remove_volume(
        &self,
        root: BorrowedFd<'_>,
        name: &str,
        recorded: Option<Limit>,
    ) -> Result<Removed, removal::Error> {
        let failed = |op: &'static str| {
            let path = std::path::PathBuf::from(name);
            move |e: io::Error| removal::Error::Io {
                op,
                path,
                source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        let (what, limit) = match self
            .destroy_subvolume(root, name)
            .map_err(failed("destroy subvolume"))?
        {
            Some(id) => ("removed the subvolume".to_string(), Some(Limit::Qgroup(id))),
            None => {
                let project = self
                    .project_of(root, name)
                    .ok()
                    .flatten()
                    .map(Limit::Project);
                let stats = removal::remove_volume_dir(root, name)?;
                let what = if stats.directories == 0 {
                    "the directory was already gone".to_string()
                } else {
                    format!(
                        "removed {} files, {} directories",
                        stats.files, stats.directories
                    )
                };
                // Only the record is left (an earlier pass removed the directory): the id is ours
                // to reset only while nothing else is charged to it, since a freed id may have
                // gone to another volume meanwhile.
                let recorded = recorded.filter(|r| match r {
                    Limit::Project(id) => project::usage(root, *id).is_ok_and(|u| u.inodes == 0),
                    Limit::Qgroup(_) => true,
                });
                (what, project.or(recorded))
            }
        };
        match limit {
            None => Ok(Removed::Done(what)),
            Some(Limit::Project(id)) => {
                project::set_limit(root, id, None).map_err(failed("reset project limit"))?;
                Ok(Removed::Done(format!(
                    "{what} and reset the limit of project {id}"
                )))
            }
            Some(Limit::Qgroup(id)) => match btrfs::remove_qgroup(root, id) {
                Ok(()) => Ok(Removed::Done(format!("{what} and its qgroup 0/{id}"))),
                // The kernel keeps a destroyed subvolume's qgroup until its data is cleaned up
                // (and newer kernels then drop it themselves): try again shortly.
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy => Ok(Removed::QgroupBusy(id)),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(Removed::Done(what)),
                Err(e) => Err(failed("remove qgroup")(e)),
            },
        }
    }

    /// Removes (or, with `archive`, renames to `archived-<leaf>` next to it) the volume of PV `pv` at
    /// `path`, flat or below parents, only if it is that PV's ([`parents::ownership`]); then removes
    /// the parents that removal left empty, stopping at the first that holds anything (siblings stay).
    pub fn dispose_volume(
        &self,
        root: BorrowedFd<'_>,
        path: &str,
        pv: &str,
        archive: bool,
        recorded: Option<Limit>,
    ) -> Result<Removed, removal::Error> {
        let path = VolumePath::parse(path)?;
        let io = |op: &'static str| {
            let path = std::path::PathBuf::from(path.as_str());
            move |source| removal::Error::Io { op, path, source }
        };
        let owned = parents::ownership(root, &path, pv).map_err(io("check the owner of"))?;
        if let Ownership::Foreign(owner) = owned {
            return Err(removal::Error::NotOurs {
                path: path.to_string(),
                owner,
            });
        }
        let at = match parents::locate(root, &path) {
            Ok(at) => at,
            // Parents gone, so the volume is too (an earlier pass removed them).
            Err(nix::errno::Errno::ENOENT) => {
                return Ok(Removed::Done("directory already gone".to_string()));
            }
            Err(e) => return Err(io("open the parents of")(e)),
        };
        let parent = at.parent(root);
        let removed = if archive {
            match removal::archive_volume_dir(parent, &at.leaf) {
                Ok(new_name) => Removed::Done(format!("archived as {new_name}")),
                Err(removal::Error::NotFound { .. }) => {
                    Removed::Done("directory already gone".to_string())
                }
                Err(e) => return Err(e),
            }
        } else {
            self.remove_volume(parent, &at.leaf, recorded)?
        };
        if !archive && matches!(removed, Removed::Done(_)) {
            parents::remove_empty_parents(root, &path)
                .map_err(io("remove the empty parents of"))?;
        }
        Ok(removed)
    }

    /// [`Quotas::limit`] for the volume of PV `pv` at `path` (flat or below parents), only if it is
    /// that PV's ([`parents::ownership`]): a PV naming another volume's directory changes nothing.
    pub fn limit_volume(
        &self,
        root: BorrowedFd<'_>,
        path: &str,
        pv: &str,
        bytes: u64,
    ) -> io::Result<Option<Limit>> {
        let path = VolumePath::parse(path).map_err(invalid)?;
        match parents::ownership(root, &path, pv)? {
            Ownership::Owned => {}
            Ownership::Gone => return Err(io::ErrorKind::NotFound.into()),
            Ownership::Foreign(owner) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{path} is not the directory of volume {pv} (marked for {}); hostvol leaves it alone",
                        owner.as_deref().unwrap_or("no volume")
                    ),
                ));
            }
        }
        let at = parents::locate(root, &path)?;
        self.limit(at.parent(root), &at.leaf, bytes)
    }

    /// [`Quotas::reapply`] through [`Quotas::limit_volume`].
    pub fn reapply_volume(
        &self,
        root: BorrowedFd<'_>,
        path: &str,
        pv: &str,
        bytes: u64,
    ) -> io::Result<Option<Limit>> {
        if self.mechanism().is_none() {
            return Ok(None);
        }
        match self.limit_volume(root, path, pv, bytes) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            other => other,
        }
    }

    /// Sets the limit recorded for an existing volume again (after a crash the filesystem may not have
    /// committed it); nothing for roots without enforcement or volumes that are gone.
    pub fn reapply(
        &self,
        root: BorrowedFd<'_>,
        name: &str,
        bytes: u64,
    ) -> io::Result<Option<Limit>> {
        match self.limit(root, name, bytes) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            other => other,
        }
    }

    /// The project id of a volume directory about to be removed, so its limit can be reset after.
    pub fn project_of(&self, root: BorrowedFd<'_>, name: &str) -> io::Result<Option<u32>> {
        if !matches!(
            self.mechanism(),
            Some(Mechanism::XfsProject | Mechanism::Ext4Project)
        ) {
            return Ok(None);
        }
        let volume = open_volume(root, name)?;
        let (id, _) = project::project_of(volume.as_fd())?;
        Ok((id != 0 && id != project::project_of(root)?.0).then_some(id))
    }

    /// Bytes used per volume name, from the quota accounting (no walks); `None` when this root has
    /// no quota backend. Names whose figures cannot be read are left out.
    pub fn usage(
        &self,
        root: BorrowedFd<'_>,
        names: &[String],
    ) -> io::Result<Option<HashMap<String, QuotaUsage>>> {
        let Some(mechanism) = self.mechanism() else {
            return Ok(None);
        };
        let mut out = HashMap::with_capacity(names.len());
        if mechanism == Mechanism::BtrfsQgroup {
            let groups = btrfs::qgroups(root)?;
            for name in names {
                let Ok(at) = locate(root, name) else {
                    continue;
                };
                let Ok(volume) = btrfs::open_subvolume(at.parent(root), &at.leaf) else {
                    continue;
                };
                let Ok(id) = btrfs::subvolume_id(volume.as_fd()) else {
                    continue;
                };
                if let Some(group) = groups.get(&id) {
                    out.insert(
                        name.clone(),
                        QuotaUsage {
                            used_bytes: group.referenced,
                            inodes: None,
                            limit_bytes: group.max_referenced,
                        },
                    );
                }
            }
        } else {
            let root_project = project::project_of(root)?.0;
            for name in names {
                let Ok(at) = locate(root, name) else {
                    continue;
                };
                let Ok(volume) = open_volume(at.parent(root), &at.leaf) else {
                    continue;
                };
                let Ok((id, _)) = project::project_of(volume.as_fd()) else {
                    continue;
                };
                if id == 0 || id == root_project {
                    continue;
                }
                if let Ok(u) = project::usage(root, id) {
                    out.insert(
                        name.clone(),
                        QuotaUsage {
                            used_bytes: u.used_bytes,
                            inodes: Some(u.inodes),
                            limit_bytes: u.limit_bytes,
                        },
                    );
                }
            }
        }
        Ok(Some(out))
    }
}

/// One volume's figures from the quota accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    pub used_bytes: u64,
    /// Inodes, where the backend counts them (project quotas).
    pub inodes: Option<u64>,
    pub limit_bytes: Option<u64>,
}

/// What the filesystem under `root` offers, with what to enable when it offers nothing.
fn offer(root: BorrowedFd<'_>) -> Offer {
    match btrfs::is_btrfs(root) {
        Ok(true) => {
            return match btrfs::quota_state(root) {
                Ok(state) if state.is_enabled() => Offer::Available(Mechanism::BtrfsQgroup),
                Ok(state) => Offer::Unavailable(
                    state
                        .advice()
                        .unwrap_or("btrfs quotas are off: run `btrfs quota enable <data root>`")
                        .to_string(),
                ),
                Err(e) => Offer::Unavailable(format!("cannot read the btrfs quota state: {e}")),
            };
        }
        Ok(false) => {}
        Err(e) => return Offer::Unavailable(format!("cannot tell the filesystem type: {e}")),
    }
    let filesystem = match project::detect(root) {
        Ok(Some(fs)) => fs,
        Ok(None) => {
            return Offer::Unavailable(
                "the filesystem has no quota support hostvol uses (btrfs, XFS or ext4)".into(),
            );
        }
        Err(e) => return Offer::Unavailable(format!("cannot tell the filesystem type: {e}")),
    };
    match project::enforcement(root) {
        Ok(state) if state.is_enforced() => Offer::Available(match filesystem {
            project::Filesystem::Xfs => Mechanism::XfsProject,
            project::Filesystem::Ext4 => Mechanism::Ext4Project,
        }),
        Ok(state) => Offer::Unavailable(state.to_string()),
        Err(e) => Offer::Unavailable(format!("cannot read the {filesystem} quota state: {e}")),
    }
}

/// The parent of the volume `path` (flat or below parents), opened without following symlinks.
fn locate(root: BorrowedFd<'_>, path: &str) -> io::Result<parents::Located> {
    let path = VolumePath::parse(path).map_err(invalid)?;
    Ok(parents::locate(root, &path)?)
}

fn open_volume(root: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    naming::validate_directory_name(name).map_err(invalid)?;
    Ok(openat(
        root,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

fn invalid(e: naming::NameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_records_read_back() {
        for limit in [Limit::Qgroup(257), Limit::Project(1_000_042)] {
            assert_eq!(Limit::parse(&limit.record()), Some(limit));
        }
        for bad in ["", "qgroup 1/257", "project", "project -1", "qgroup 0/x"] {
            assert_eq!(Limit::parse(bad), None, "{bad:?}");
        }
    }
}
