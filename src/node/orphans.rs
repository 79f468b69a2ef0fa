//! Directories with no PV (orphans) and PVs whose directory is gone (lost): found here, reported by the
//! controller's orphan report, never deleted.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use crate::node::removal::ARCHIVE_PREFIX;
use crate::node::roots::Root;
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

/// `expected` maps each of this node's PV names to its directory name.
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
    let wanted: HashSet<&str> = expected.values().map(String::as_str).collect();
    let mut orphans: Vec<Entry> = entries
        .iter()
        .filter(|e| {
            e.is_dir && !e.name.starts_with('.') && !SYSTEM_ENTRIES.contains(&e.name.as_str())
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
    name.starts_with(ARCHIVE_PREFIX)
}

/// Lists a data root (one level, no symlinks followed).
pub fn read_root(root: &Root) -> std::io::Result<Vec<Entry>> {
    let root = root.store.root_handle();
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
            Some(Entry {
                name: name.to_string_lossy().into_owned(),
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
    }
}
