//! StorageClass parameters of hostvol classes.

use std::collections::BTreeMap;

use crate::domain::affinity;
use crate::domain::pattern::DirectoryPattern;

/// Every parameter a hostvol StorageClass may set; anything else is refused so typos do not pass silently.
pub const VALID_PARAMETERS: &[&str] = &[
    "mode",
    "uid",
    "gid",
    "onDelete",
    "nodeLossCleanup",
    "nodeLossGracePeriod",
    "dataRoot",
    "volumeType",
    "directoryPattern",
    "nodeAffinityKey",
];

/// How long a deleted node may stay gone before its volumes are cleaned up (classes that opt in).
pub const DEFAULT_NODE_LOSS_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// Default permissions of a new volume directory. hostPath volumes get no fsGroup handling from the
/// kubelet, so without 0777 a pod running as non-root could not write to its own volume. Classes that
/// know their pods' uid should set `uid`/`gid` and a tighter `mode` such as `0770`.
pub const DEFAULT_MODE: u32 = 0o777;
/// The data root a class uses when it names none (and of PVs made before named roots).
pub const DEFAULT_ROOT: &str = "default";

/// Which volume source the class's PVs carry. Both name the same directory; what differs is what
/// the kubelet does with it: a `local` volume gets `kubelet_volume_stats_*` (statfs) and ownership by
/// the pod's `fsGroup` (a recursive chown on every mount), a `hostPath` volume neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VolumeType {
    #[default]
    HostPath,
    Local,
}

impl VolumeType {
    /// The value of the `volumeType` parameter, as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostPath => "hostPath",
            Self::Local => "local",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "hostPath" => Ok(Self::HostPath),
            "local" => Ok(Self::Local),
            other => Err(format!(
                "StorageClass parameter volumeType={other:?} must be \"hostPath\" or \"local\""
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassParameters {
    /// Permission bits of the volume directory (no file type bits, setuid/setgid/sticky allowed).
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// With reclaimPolicy Delete: rename the directory to `archived-<name>` instead of removing it.
    pub archive_on_delete: bool,
    /// Delete the claims and PVs of a deleted node, after `node_loss_grace`.
    pub node_loss_cleanup: bool,
    pub node_loss_grace: std::time::Duration,
    /// Which of a node's data roots holds the volumes (see the `hostvol-config` ConfigMap).
    pub data_root: String,
    /// The source of the PVs: `hostPath` (default) or `local`.
    pub volume_type: VolumeType,
    /// How new volumes' directories are named (see [`crate::domain::pattern`]); existing volumes
    /// keep the path their PV records.
    pub directory_pattern: DirectoryPattern,
    /// The Node label its volumes are pinned by (`kubernetes.io/hostname` unless set): a node rebuilt
    /// under another name serves them when it carries the same value.
    pub node_affinity_key: String,
}

impl Default for ClassParameters {
    fn default() -> Self {
        Self {
            mode: DEFAULT_MODE,
            uid: None,
            gid: None,
            archive_on_delete: false,
            node_loss_cleanup: false,
            node_loss_grace: DEFAULT_NODE_LOSS_GRACE,
            data_root: DEFAULT_ROOT.to_string(),
            volume_type: VolumeType::default(),
            directory_pattern: DirectoryPattern::default(),
            node_affinity_key: affinity::HOSTNAME_KEY.to_string(),
        }
    }
}

impl ClassParameters {
    /// Parses a StorageClass's `parameters`, explaining any problem in words a user can act on.
    pub fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, String> {
        let unknown: Vec<&str> = parameters
            .keys()
            .map(String::as_str)
            .filter(|k| !VALID_PARAMETERS.contains(k))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown StorageClass parameter(s) {}; valid parameters are {}",
                unknown.join(", "),
                VALID_PARAMETERS.join(", ")
            ));
        }
        let mut parsed = Self::default();
        if let Some(mode) = parameters.get("mode") {
            parsed.mode = parse_mode(mode)?;
        }
        if let Some(uid) = parameters.get("uid") {
            parsed.uid = Some(parse_id("uid", uid)?);
        }
        if let Some(gid) = parameters.get("gid") {
            parsed.gid = Some(parse_id("gid", gid)?);
        }
        if let Some(on_delete) = parameters.get("onDelete") {
            parsed.archive_on_delete = match on_delete.trim() {
                "delete" => false,
                "archive" => true,
                other => {
                    return Err(format!(
                        "StorageClass parameter onDelete={other:?} must be \"delete\" or \"archive\""
                    ));
                }
            };
        }
        if let Some(on) = parameters.get("nodeLossCleanup") {
            parsed.node_loss_cleanup = match on.trim() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(format!(
                        "StorageClass parameter nodeLossCleanup={other:?} must be \"true\" or \"false\""
                    ));
                }
            };
        }
        if let Some(root) = parameters.get("dataRoot") {
            let ok = !root.is_empty()
                && root.len() <= 63
                && root
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(format!(
                    "StorageClass parameter dataRoot={root:?} is not a root name such as \"fast\" (lowercase letters, digits, '-')"
                ));
            }
            parsed.data_root = root.clone();
        }
        if let Some(volume_type) = parameters.get("volumeType") {
            parsed.volume_type = VolumeType::parse(volume_type)?;
        }
        if let Some(pattern) = parameters.get("directoryPattern") {
            parsed.directory_pattern = DirectoryPattern::parse(pattern)?;
        }
        if let Some(key) = parameters.get("nodeAffinityKey") {
            affinity::validate_label_key(key).map_err(|why| {
                format!("StorageClass parameter nodeAffinityKey={key:?} is not a label key such as \"example.com/disk\": {why}")
            })?;
            parsed.node_affinity_key = key.clone();
        }
        if let Some(grace) = parameters.get("nodeLossGracePeriod") {
            parsed.node_loss_grace = parse_duration(grace).ok_or_else(|| {
                format!("StorageClass parameter nodeLossGracePeriod={grace:?} is not a duration such as \"30s\", \"10m\" or \"1h\"")
            })?;
        }
        Ok(parsed)
    }
}

/// "90s", "10m", "1h" (one unit, whole numbers).
pub fn parse_duration(value: &str) -> Option<std::time::Duration> {
    let v = value.trim();
    let (number, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(seconds))
}

fn parse_mode(value: &str) -> Result<u32, String> {
    let digits = value.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    let valid = !digits.is_empty()
        && digits.len() <= 5
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if valid && mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "StorageClass parameter mode={value:?} is not an octal permission such as \"0770\" or \"0777\""
        )),
    }
}

fn parse_id(name: &str, value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => Err(format!(
            "StorageClass parameter {name}={value:?} is not a numeric id such as \"1000\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_to_world_writable_without_ownership_change() {
        assert_eq!(
            ClassParameters::parse(&params(&[])).unwrap(),
            ClassParameters::default()
        );
    }

    #[test]
    fn parses_mode_uid_gid() {
        let p = ClassParameters::parse(&params(&[
            ("mode", "0770"),
            ("uid", "1000"),
            ("gid", "2000"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            ClassParameters {
                mode: 0o770,
                uid: Some(1000),
                gid: Some(2000),
                ..Default::default()
            }
        );
        let p = ClassParameters::parse(&params(&[
            ("nodeLossCleanup", "true"),
            ("nodeLossGracePeriod", "10m"),
            ("onDelete", "archive"),
        ]))
        .unwrap();
        assert!(p.node_loss_cleanup && p.archive_on_delete && p.node_loss_grace.as_secs() == 600);
        assert_eq!(p.node_affinity_key, "kubernetes.io/hostname", "the default");
        let p =
            ClassParameters::parse(&params(&[("nodeAffinityKey", "example.com/disk")])).unwrap();
        assert_eq!(p.node_affinity_key, "example.com/disk");
        assert_eq!(
            ClassParameters::parse(&params(&[("mode", "755")]))
                .unwrap()
                .mode,
            0o755
        );
        assert_eq!(
            ClassParameters::parse(&params(&[("mode", "2775")]))
                .unwrap()
                .mode,
            0o2775
        );
    }

    #[test]
    fn volume_type_is_host_path_unless_the_class_says_local() {
        // (parameters, expected volume type)
        let cases: [(&[(&str, &str)], VolumeType); 4] = [
            (&[], VolumeType::HostPath),
            (&[("volumeType", "hostPath")], VolumeType::HostPath),
            (&[("volumeType", "local")], VolumeType::Local),
            (&[("volumeType", " local ")], VolumeType::Local),
        ];
        for (pairs, expected) in cases {
            let parsed = ClassParameters::parse(&params(pairs)).unwrap();
            assert_eq!(parsed.volume_type, expected, "{pairs:?}");
            assert_eq!(VolumeType::parse(expected.as_str()), Ok(expected));
        }
    }

    #[test]
    fn unknown_parameters_list_the_valid_ones() {
        let e =
            ClassParameters::parse(&params(&[("nodePath", "/x"), ("mode", "0777")])).unwrap_err();
        assert!(
            e.contains("nodePath")
                && e.contains(
                    "mode, uid, gid, onDelete, nodeLossCleanup, nodeLossGracePeriod, dataRoot, volumeType, directoryPattern, nodeAffinityKey"
                ),
            "{e}"
        );
    }

    #[test]
    fn malformed_values_are_explained() {
        for (k, v) in [
            ("dataRoot", "Fast/x"),
            ("volumeType", "Local"),
            ("volumeType", "hostpath"),
            ("volumeType", "csi"),
            ("volumeType", ""),
            ("nodeAffinityKey", "example.com/"),
            ("nodeAffinityKey", "Example.com/disk"),
            ("nodeAffinityKey", "disk=1"),
            ("nodeLossGracePeriod", "soon"),
            ("nodeLossCleanup", "yes"),
            ("onDelete", "shred"),
            ("mode", "rwx"),
            ("mode", "0999"),
            ("mode", "77777"),
            ("mode", ""),
            ("uid", "-1"),
            ("gid", "root"),
            ("uid", "4294967295"),
            ("directoryPattern", "{namespace}"),
            ("directoryPattern", "../{pv}"),
        ] {
            let e = ClassParameters::parse(&params(&[(k, v)])).unwrap_err();
            assert!(e.contains(k), "{k}={v}: {e}");
        }
    }
}
