//! The data roots of a node: one from the flags (`default`), or several named ones from the
//! `hostvol-config` ConfigMap, re-read when it changes. A StorageClass picks one with `dataRoot`.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::domain::capacity::{self, CapacityInputs};
use crate::domain::quantity;
use crate::domain::quota::{Enforcement, QuotaMode};
use crate::node::quota::Quotas;
use crate::node::volume_store::VolumeStore;

use crate::domain::params::DEFAULT_ROOT;
/// Key of the ConfigMap holding the configuration.
pub const CONFIG_KEY: &str = "config.yaml";
/// Entry of `nodes:` that applies to every node without its own entry.
pub const ANY_NODE: &str = "*";

/// One data root as configured (paths as the node sees them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub path: String,
    pub reserved: u64,
    pub cap: Option<u64>,
    pub require_mount_point: bool,
    pub quota: QuotaMode,
}

#[derive(Debug)]
pub struct Root {
    pub name: String,
    pub store: VolumeStore,
    /// The root as the kubelet sees it, written into PVs.
    pub host_path: String,
    pub reserved: u64,
    pub cap: Option<u64>,
    pub require_mount_point: bool,
    /// How volume sizes are enforced here, detected when the root is opened.
    pub quotas: Quotas,
}

impl Root {
    /// Opens a root and detects its quota backend.
    pub fn open(
        name: &str,
        local_path: &Path,
        spec: &RootSpec,
    ) -> Result<Self, crate::node::volume_store::Error> {
        let store = VolumeStore::open(local_path)?;
        let quotas = Quotas::detect(store.root_handle().as_fd(), spec.quota);
        Ok(Root {
            name: name.to_string(),
            store,
            host_path: spec.path.clone(),
            reserved: spec.reserved,
            cap: spec.cap,
            require_mount_point: spec.require_mount_point,
            quotas,
        })
    }

    /// Why this root cannot take a volume now, if it cannot.
    pub fn problem(&self, node: &str) -> Option<String> {
        let path = &self.host_path;
        if let Err(error) = self.store.check_root() {
            return Some(format!("node {node}: data root {:?}: {error}", self.name));
        }
        if self.store.is_read_only() {
            return Some(format!(
                "node {node}: data root {:?} ({path}) is on a read-only filesystem",
                self.name
            ));
        }
        if let Enforcement::Refusing { reason } = &self.quotas.enforcement {
            return Some(format!(
                "node {node}: data root {:?} ({path}) has quota mode required but cannot enforce sizes: {reason}",
                self.name
            ));
        }
        if self.require_mount_point && !self.store.is_mount_point().unwrap_or(false) {
            return Some(format!(
                "node {node}: data root {:?} ({path}) is not a mount point (did its disk fail to mount?); \
                 hostvol will not fill the node's root filesystem",
                self.name
            ));
        }
        None
    }

    /// See `capacity::allocatable`; nothing while the root has a problem.
    pub fn allocatable(&self, node: &str, allocated: u64) -> u64 {
        if self.problem(node).is_some() {
            return 0;
        }
        match self.store.filesystem_stats() {
            Ok(fs) => capacity::allocatable(&CapacityInputs {
                filesystem_total: fs.total_bytes,
                filesystem_available: fs.available_bytes,
                reserved: self.reserved,
                cap: self.cap,
                allocated,
            }),
            Err(_) => 0,
        }
    }
}

/// The roots in force on this node.
#[derive(Debug, Default)]
pub struct RootSet {
    roots: BTreeMap<String, Arc<Root>>,
}

impl RootSet {
    pub fn single(root: Root) -> Self {
        Self {
            roots: BTreeMap::from([(root.name.clone(), Arc::new(root))]),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Root>> {
        self.roots.get(name).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Root>> {
        self.roots.values()
    }

    pub fn names(&self) -> Vec<String> {
        self.roots.keys().cloned().collect()
    }

    /// The root reported first: `default` if there is one.
    pub fn primary(&self) -> Option<Arc<Root>> {
        self.get(DEFAULT_ROOT)
            .or_else(|| self.roots.values().next().cloned())
    }

    /// Opens every root of `specs`; any root that cannot be opened rejects the whole set.
    pub fn open(specs: &BTreeMap<String, RootSpec>, path_prefix: &Path) -> Result<Self, String> {
        let mut roots = BTreeMap::new();
        for (name, spec) in specs {
            let local = if path_prefix.as_os_str().is_empty() {
                PathBuf::from(&spec.path)
            } else {
                path_prefix.join(spec.path.trim_start_matches('/'))
            };
            let root =
                Root::open(name, &local, spec).map_err(|e| format!("data root {name:?}: {e}"))?;
            roots.insert(name.clone(), Arc::new(root));
        }
        Ok(Self { roots })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    nodes: BTreeMap<String, NodeConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeConfig {
    roots: BTreeMap<String, RootConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RootConfig {
    path: String,
    #[serde(default)]
    reserved: Option<String>,
    #[serde(default)]
    capacity_cap: Option<String>,
    #[serde(default)]
    require_mount_point: bool,
    /// `auto` (default), `required` or `off`.
    #[serde(default)]
    quota: Option<String>,
}

/// The roots the configuration gives `node` (its own entry, else `"*"`), or None if it gives none.
pub fn parse_config(text: &str, node: &str) -> Result<Option<BTreeMap<String, RootSpec>>, String> {
    let file: ConfigFile =
        serde_yaml::from_str(text).map_err(|e| format!("{CONFIG_KEY} is not valid: {e}"))?;
    // Validate every node's entry, not just ours, so a typo for another node is caught here too.
    let mut mine = None;
    for (entry, config) in &file.nodes {
        let mut specs = BTreeMap::new();
        if config.roots.is_empty() {
            return Err(format!(
                "nodes.{entry}.roots is empty; list at least one root"
            ));
        }
        for (name, root) in &config.roots {
            let at = format!("nodes.{entry}.roots.{name}");
            let name_ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err(format!(
                    "{at}: root names are lowercase letters, digits and '-'"
                ));
            }
            // One spelling per directory: `/mnt//data/./x/` is `/mnt/data/x`. `//` and `/.` are `/`.
            let mut components = Path::new(&root.path).components();
            let below_root: Vec<Component> = match components.next() {
                Some(Component::RootDir) => {
                    components.filter(|c| *c != Component::CurDir).collect()
                }
                _ => Vec::new(),
            };
            if below_root.is_empty()
                || below_root
                    .iter()
                    .any(|c| !matches!(c, Component::Normal(_)))
                || root.path.contains('\0')
            {
                return Err(format!(
                    "{at}.path {:?} must be an absolute path below / without '..'",
                    root.path
                ));
            }
            let path: PathBuf = std::iter::once(Component::RootDir)
                .chain(below_root)
                .collect();
            let bytes = |field: &str, v: &Option<String>| -> Result<Option<u64>, String> {
                v.as_deref()
                    .map(|s| quantity::parse_bytes(s).map_err(|e| format!("{at}.{field}: {e}")))
                    .transpose()
            };
            specs.insert(
                name.clone(),
                RootSpec {
                    path: path.to_string_lossy().into_owned(),
                    reserved: bytes("reserved", &root.reserved)?.unwrap_or(0),
                    cap: bytes("capacityCap", &root.capacity_cap)?,
                    require_mount_point: root.require_mount_point,
                    quota: root
                        .quota
                        .as_deref()
                        .map(str::parse)
                        .transpose()
                        .map_err(|e| format!("{at}.quota: {e}"))?
                        .unwrap_or_default(),
                },
            );
        }
        if entry == node {
            mine = Some(specs);
        } else if entry == ANY_NODE && !file.nodes.contains_key(node) {
            mine = Some(specs); // the wildcard, only for nodes without their own entry
        }
    }
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
nodes:
  "*":
    roots:
      default: {path: /mnt/data}
  node-a:
    roots:
      fast: {path: /mnt/nvme/, capacityCap: 100Gi, reserved: 1Gi, requireMountPoint: true, quota: required}
      default: {path: /mnt/data}
"#;

    #[test]
    fn a_node_gets_its_own_entry_or_the_wildcard() {
        let a = parse_config(CONFIG, "node-a").unwrap().unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), vec!["default", "fast"]);
        assert_eq!(
            a["fast"],
            RootSpec {
                path: "/mnt/nvme".into(),
                reserved: 1 << 30,
                cap: Some(100 << 30),
                require_mount_point: true,
                quota: QuotaMode::Required,
            }
        );
        let b = parse_config(CONFIG, "node-b").unwrap().unwrap();
        assert_eq!(b.keys().collect::<Vec<_>>(), vec!["default"]);
        assert_eq!(
            parse_config(
                "nodes:\n  node-a:\n    roots:\n      default: {path: /x}\n",
                "node-b"
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn invalid_configuration_is_explained() {
        for (bad, words) in [
            ("nodes: [", "not valid"),
            (
                "nodes:\n  n:\n    roots:\n      Fast: {path: /x}\n",
                "root names",
            ),
            (
                "nodes:\n  n:\n    roots:\n      fast: {path: relative}\n",
                "absolute",
            ),
            (
                "nodes:\n  n:\n    roots:\n      fast: {path: /a/../etc}\n",
                "'..'",
            ),
            (
                "nodes:\n  n:\n    roots:\n      fast: {path: /x, capacityCap: lots}\n",
                "capacityCap",
            ),
            (
                "nodes:\n  n:\n    roots:\n      fast: {path: /x, size: 1Gi}\n",
                "unknown field",
            ),
            ("nodes:\n  n:\n    roots: {}\n", "empty"),
            (
                "nodes:\n  n:\n    roots:\n      fast: {path: /x, quota: strict}\n",
                "quota",
            ),
        ] {
            let e = parse_config(bad, "n").unwrap_err();
            assert!(e.contains(words), "{bad:?}: {e}");
        }
    }

    #[test]
    fn roots_open_and_report() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("fast")).unwrap();
        let specs = BTreeMap::from([(
            "fast".to_string(),
            RootSpec {
                path: "/fast".into(),
                reserved: 0,
                cap: Some(10 << 30),
                require_mount_point: false,
                quota: QuotaMode::Auto,
            },
        )]);
        let set = RootSet::open(&specs, dir.path()).unwrap();
        let fast = set.get("fast").unwrap();
        assert_eq!(fast.host_path, "/fast");
        assert!(fast.allocatable("n", 4 << 30) <= 6 << 30);
        assert_eq!(set.primary().unwrap().name, "fast");
        let missing = BTreeMap::from([(
            "x".to_string(),
            RootSpec {
                path: "/nope".into(),
                reserved: 0,
                cap: None,
                require_mount_point: false,
                quota: QuotaMode::Auto,
            },
        )]);
        assert!(
            RootSet::open(&missing, dir.path())
                .unwrap_err()
                .contains("\"x\"")
        );
    }
}
