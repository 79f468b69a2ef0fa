//! Names of volumes and their directories, and the checks that keep every path inside the data root.

/// Longest file name Linux accepts (NAME_MAX).
pub const MAX_DIRECTORY_NAME: usize = 255;

/// The PV name for a claim: `pvc-<claim uid>`, as Kubernetes' own provisioners do, so a claim maps to
/// exactly one volume and "a PV with this name exists" means the work is done.
pub fn pv_name(claim_uid: &str) -> Result<String, NameError> {
    if !is_uid(claim_uid) {
        return Err(NameError(format!(
            "claim uid {claim_uid:?} is not a Kubernetes uid"
        )));
    }
    Ok(format!("pvc-{claim_uid}"))
}

/// The directory of a volume: `<pv-name>_<namespace>_<claim-name>`, readable by people browsing the disk.
/// The claim name is shortened when the whole would pass NAME_MAX; the uid in the PV name keeps it unique.
pub fn directory_name(
    pv_name: &str,
    namespace: &str,
    claim_name: &str,
) -> Result<String, NameError> {
    validate_dns_name("PV name", pv_name)?;
    validate_dns_name("namespace", namespace)?;
    validate_dns_name("claim name", claim_name)?;
    let mut name = format!("{pv_name}_{namespace}_{claim_name}");
    name.truncate(MAX_DIRECTORY_NAME); // ASCII only, so byte truncation is a char boundary
    validate_directory_name(&name)?;
    Ok(name)
}

/// Where a clone is copied before it is renamed to `target`: a visible name (an interrupted copy of
/// a claim that was then deleted shows up as an orphan, never silently kept).
pub fn clone_staging_name(target: &str) -> String {
    let mut name = format!("cloning-{target}");
    name.truncate(MAX_DIRECTORY_NAME); // ASCII only; the claim uid near the start keeps it unique
    name
}

/// Where a patterned volume of PV `pv` is made and marked before it is renamed to its final name:
/// visible, like a clone's staging directory, so one left by a crash is seen, never silently kept.
pub fn creation_staging_name(pv: &str) -> String {
    let mut name = format!("creating-{pv}");
    name.truncate(MAX_DIRECTORY_NAME); // ASCII only
    name
}

/// Longest object name the API server accepts (a DNS subdomain).
pub const MAX_OBJECT_NAME: usize = 253;

/// The name of a new Event about `object`: `<object>.<nanos in hex>`, as Kubernetes' recorders name
/// them, with the object's part shortened so the whole stays a valid name of at most 253 characters
/// (a claim may itself have a 253-character name). The timestamp keeps names distinct.
pub fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", nanos.max(0));
    let mut base: String = object
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        .take(MAX_OBJECT_NAME - suffix.len())
        .collect();
    // A DNS label ends with a letter or digit: "claim-.1a2b" or "claim..1a2b" would be refused.
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    if base.is_empty() {
        base.push_str("hostvol");
    }
    base + &suffix
}

/// Accepts only a single, plain path component made of the characters our names use.
/// This is the last gate before any filesystem call: no `/`, no `.` or `..`, no NUL, no hidden files.
pub fn validate_directory_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_DIRECTORY_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(NameError(format!("{name:?} is not a safe directory name")))
    }
}

fn validate_dns_name(what: &str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(NameError(format!(
            "{what} {name:?} is not a valid Kubernetes name"
        )))
    }
}

fn is_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// A label value for a node name (labels allow 63 characters, node names 253): the name itself when it
/// fits, otherwise a stable shortened form.
pub fn node_label_value(node: &str) -> String {
    let valid = node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && node
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && node
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric());
    if valid {
        return node.to_string();
    }
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let prefix: String = node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    // A label value starts and ends with an alphanumeric: the hash alone when nothing of the name fits.
    match prefix.trim_matches('-') {
        "" => format!("{hash:016x}"),
        prefix => format!("{prefix}-{hash:016x}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(pub String);

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

#[cfg(test)]
mod tests {
    #[test]
    fn event_names_are_valid_object_names_whatever_the_object() {
        let long = "a".repeat(253);
        let dashed = format!("{}-b", "a".repeat(240));
        let cases: &[(&str, i128, &str)] = &[
            ("data", 0x1a2b, "data.1a2b"),
            ("web-0", 1, "web-0.1"),
            ("", 5, "hostvol.5"),
            ("---", 5, "hostvol.5"),
        ];
        for (object, nanos, want) in cases {
            assert_eq!(event_name(object, *nanos), *want, "{object:?}");
        }
        for object in [long.as_str(), dashed.as_str(), "x.y.z"] {
            let name = event_name(object, 0x187f_3a2b_4c5d_6e7f);
            assert!(
                name.len() <= MAX_OBJECT_NAME,
                "{} > 253: {name}",
                name.len()
            );
            assert!(validate_dns_name("event", &name).is_ok(), "{name}");
            let base = name.rsplit_once('.').unwrap().0;
            assert!(!base.ends_with(['-', '.']), "{name}");
        }
    }

    use super::*;

    const UID: &str = "0b6a4a8e-3f8e-4a43-9a4b-6f0a2b1c9d7e";

    #[test]
    fn volume_and_directory_names() {
        let pv = pv_name(UID).unwrap();
        assert_eq!(pv, format!("pvc-{UID}"));
        assert_eq!(
            directory_name(&pv, "default", "www-web-0").unwrap(),
            format!("pvc-{UID}_default_www-web-0")
        );
    }

    #[test]
    fn long_names_are_shortened_to_name_max_and_stay_unique() {
        let pv = pv_name(UID).unwrap();
        let long_claim = "a".repeat(253);
        let name = directory_name(&pv, &"n".repeat(63), &long_claim).unwrap();
        assert_eq!(name.len(), MAX_DIRECTORY_NAME);
        assert!(name.starts_with(&pv));
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "..", ".", "", "a/b", "../etc", ".hidden", "A", "a\0b", "x y",
        ] {
            assert!(validate_directory_name(bad).is_err(), "{bad:?}");
        }
        assert!(pv_name("../../etc").is_err());
        assert!(pv_name("").is_err());
        let pv = pv_name(UID).unwrap();
        for (ns, claim) in [
            ("..", "c"),
            ("ns", "a/b"),
            ("ns", ".."),
            ("ns", "-x"),
            ("NS", "c"),
            ("ns", "a..b"),
        ] {
            assert!(directory_name(&pv, ns, claim).is_err(), "{ns} {claim}");
        }
    }

    #[test]
    fn node_label_values_fit_labels() {
        assert_eq!(node_label_value("worker-1"), "worker-1");
        let long = format!("{}.example.com", "n".repeat(70));
        let v = node_label_value(&long);
        assert!(v.len() <= 63, "{v}");
        assert_eq!(v, node_label_value(&long));
        assert_ne!(v, node_label_value(&format!("{long}x")));
    }
}
