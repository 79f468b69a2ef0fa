//! Directories with no PV (orphans) and PVs whose directory is gone (lost): found here, reported by the
//! controller's orphan report, never deleted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, SystemTime};

use crate::domain::pattern::VolumePath;
use crate::node::parents;
use crate::node::removal::ARCHIVE_PREFIX;
use crate::node::roots::Root;
use crate::node::walk::open_beneath;
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fstatat};

/// A new directory has no PV for the few milliseconds before its PV is created; ignore young ones.
pub const GRACE: Duration = Duration::from_secs(120);

/// Entries of the root that are the filesystem's, not anybody's volume.
const SYSTEM_ENTRIES: &[&str] = &["lost+found"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub is_dir: bool,
    pub modified: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Findings {
    /// Directory names no PV points at, oldest first.
    pub orphans: Vec<Entry>,
    /// Names of PVs whose directory is missing.
    pub lost: Vec<String>,
}

/// `expected` maps each of this node's PV names to its directory (relative to the root, below
/// parents for `directoryPattern` volumes). A parent holding volumes is not an orphan; what else it
/// holds is judged like the root's own entries.
pub fn classify(
    entries: &[Entry],
    expected: &HashMap<String, String>,
    now: SystemTime,
) -> Findings {
    let present: HashSet<&str> = entries
        .iter()
        .filter(|e| e.is_dir)
        .map(|e| e.name.as_str())
        .collect();
    let mut wanted: HashSet<&str> = expected.values().map(String::as_str).collect();
    wanted.extend(expected.values().flat_map(|path| parent_paths(path)));
    let mut orphans: Vec<Entry> = entries
        .iter()
        .filter(|e| {
            let leaf = e.name.rsplit('/').next().unwrap_or_default();
            e.is_dir && !leaf.starts_with('.') && !SYSTEM_ENTRIES.contains(&e.name.as_str())
        })
        .filter(|e| !wanted.contains(e.name.as_str()))
        .filter(|e| now.duration_since(e.modified).unwrap_or_default() >= GRACE)
        .cloned()
        .collect();
    orphans.sort_by_key(|e| e.modified);
    let mut lost: Vec<String> = expected
        .iter()
        .filter(|(_, dir)| !present.contains(dir.as_str()))
        .map(|(pv, _)| pv.clone())
        .collect();
    lost.sort();
    Findings { orphans, lost }
}

pub fn is_archived(name: &str) -> bool {
    name.rsplit('/')
        .next()
        .is_some_and(|leaf| leaf.starts_with(ARCHIVE_PREFIX))
}

/// `a/b/c` gives `a`, `a/b`.
fn parent_paths(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(at, _)| &path[..at])
}

/// Lists a data root, and the parents of the `expected` volumes (`directoryPattern`), so a volume
/// with no PV next to other volumes is found too. Only directories PVs name are entered, at most
/// [`crate::domain::pattern::MAX_SEGMENTS`] deep: the scan reads no more than one level per parent, whatever the tenants
/// put in their volumes. No symlinks followed. Names below the root are `parent/child`.
pub fn read_root(root: &Root, expected: &HashMap<String, String>) -> std::io::Result<Vec<Entry>> {
    let handle = root.store.root_handle();
    let mut entries = read_dir(handle.as_fd(), "")?;
    let parents: BTreeSet<&str> = expected
        .values()
        .flat_map(|path| parent_paths(path))
        .collect();
    for parent in parents {
        let Ok(path) = VolumePath::parse(parent) else {
            continue;
        };
        let Ok(at) = parents::locate(handle.as_fd(), &path) else {
            continue; // gone, or not a plain directory: the root's listing shows what is there
        };
        let Ok(dir) = open_beneath(
            at.parent(handle.as_fd()),
            &std::ffi::CString::new(at.leaf.as_str()).unwrap_or_default(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        ) else {
            continue;
        };
        entries.extend(read_dir(dir.as_fd(), parent)?);
    }
    Ok(entries)
}

/// One level of the open directory `at`, names prefixed with `prefix/` (none for the root).
fn read_dir(at: BorrowedFd<'_>, prefix: &str) -> std::io::Result<Vec<Entry>> {
    let root = at;
    let mut dir = Dir::openat(
        root.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.to_bytes() != b"." && n.to_bytes() != b"..")
        .collect();
    Ok(names
        .into_iter()
        .filter_map(|name| {
            let st = fstatat(root.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
            let name = name.to_string_lossy();
            Some(Entry {
                name: if prefix.is_empty() {
                    name.into_owned()
                } else {
                    format!("{prefix}/{name}")
                },
                is_dir: SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
                modified: SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, is_dir: bool, age_secs: u64, now: SystemTime) -> Entry {
        Entry {
            name: name.into(),
            is_dir,
            modified: now - Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn finds_orphans_and_lost_volumes_but_spares_young_and_system_entries() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let entries = vec![
            entry("pvc-1_ns_a", true, 9999, now),         // has a PV
            entry("pvc-2_ns_b", true, 9999, now),         // orphan
            entry("archived-pvc-3_ns_c", true, 500, now), // orphan, archived
            entry("pvc-4_ns_d", true, 5, now),            // too young to judge
            entry("lost+found", true, 9999, now),
            entry(".hidden", true, 9999, now),
            entry("notes.txt", false, 9999, now),
        ];
        let expected = HashMap::from([
            ("pvc-1".to_string(), "pvc-1_ns_a".to_string()),
            ("pvc-9".to_string(), "pvc-9_ns_z".to_string()),
        ]);
        let f = classify(&entries, &expected, now);
        let names: Vec<&str> = f.orphans.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["pvc-2_ns_b", "archived-pvc-3_ns_c"]);
        assert_eq!(f.lost, vec!["pvc-9".to_string()]);
        assert!(is_archived("archived-pvc-3_ns_c") && !is_archived("pvc-2_ns_b"));
        assert!(is_archived("team/archived-web"));
    }

    #[test]
    fn parents_of_volumes_are_not_orphans_but_what_else_they_hold_is() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let entries = vec![
            entry("team-a", true, 9999, now),             // holds web
            entry("team-a/web", true, 9999, now),         // has a PV
            entry("team-a/kept", true, 9999, now),        // no PV: orphan
            entry("team-a/archived-db", true, 9999, now), // orphan, archived
            entry("team-b", true, 9999, now),             // no volume left in it: orphan
            entry("deep", true, 9999, now),
            entry("deep/er", true, 9999, now),
        ];
        let expected = HashMap::from([
            ("pvc-1".to_string(), "team-a/web".to_string()),
            ("pvc-2".to_string(), "deep/er/vol".to_string()),
        ]);
        let f = classify(&entries, &expected, now);
        let names: Vec<&str> = f.orphans.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["team-a/kept", "team-a/archived-db", "team-b"]);
        assert_eq!(f.lost, vec!["pvc-2".to_string()]);
    }
}
