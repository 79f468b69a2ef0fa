//! Node identity by label (`nodeAffinityKey`): a volume is pinned to the nodes carrying one label value
//! rather than to one hostname, so a node rebuilt under another name with the same disk and label
//! serves it again. Which PVs an agent watches, and which it may touch, follow from that value.

/// The key classes pin by when they name none (the node's own hostname, as every hostPath PV).
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

/// Checks a label key as the API server does (a qualified name: an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let mut problems = Vec::new();
    if let Some(prefix) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            problems.push(format!(
                "prefix {prefix:?} is not a DNS subdomain (lowercase letters, digits, '-', '.')"
            ));
        }
    }
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !name_ok {
        problems.push(format!(
            "name {name:?} must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The `hostvol.io/node` label value of a PV pinned by `key=value` (a key other than the hostname).
/// Node names never hold `_`, so these values never equal a node's (`naming::node_label_value`):
/// a node's volumes and a label value's volumes are told apart by the label alone. Readable start,
/// a hash of the whole pair so two keys with one value stay apart; always a valid label value.
pub fn pin_label_value(key: &str, value: &str) -> String {
    // FNV-1a: stable across releases and platforms.
    let hash = key
        .bytes()
        .chain(std::iter::once(b'='))
        .chain(value.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let readable: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(40)
        .collect();
    let readable = readable.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let readable = if readable.is_empty() { "pin" } else { readable };
    format!("{readable}_{hash:016x}")
}

/// The label selector of an agent's PV watch: its own node's volumes and those pinned to the label
/// values it carries (one set-based selector on one label: one watch, as narrow as before).
pub fn volume_selector(label: &str, node_value: &str, pins: &[String]) -> String {
    let mut values: Vec<&str> = std::iter::once(node_value)
        .chain(pins.iter().map(String::as_str))
        .collect();
    values.sort_unstable();
    values.dedup();
    format!("{label} in ({})", values.join(","))
}

/// Whether a volume pinned by `key` to `values` is this node's, given the node's value of `key`.
pub fn pinned_here(values: &[String], node_value: Option<&str>) -> bool {
    node_value.is_some_and(|v| values.iter().any(|w| w == v))
}

/// Whether the volume pinned by `key In values` has lost every node that could serve it: no live
/// node carries one of the values. Node-loss clean-up deletes nothing pinned to a value that lives.
pub fn pin_is_lost(values: &[String], live_values: &[String]) -> bool {
    !values.iter().any(|v| live_values.contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_are_checked_as_the_api_server_does() {
        for good in [
            "kubernetes.io/hostname",
            "example.com/disk",
            "disk",
            "a.b-c.d/x_y.z-1",
            "topology.kubernetes.io/zone",
        ] {
            assert_eq!(validate_label_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/disk",
            "example.com/",
            "Example.com/disk",
            "example.com/-disk",
            "example.com/disk-",
            "example.com/a/b",
            "ex ample.com/disk",
            "disk!",
            &"d".repeat(64),
            &format!("{}/disk", "a".repeat(254)),
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pin_values_are_valid_labels_apart_from_node_names() {
        let cases = [
            ("example.com/disk", "disk-1"),
            ("example.com/disk", "-"),
            ("example.com/disk", ""),
            ("example.com/disk", &"v".repeat(63)),
            ("other.io/disk", "disk-1"),
        ];
        let values: Vec<String> = cases.iter().map(|(k, v)| pin_label_value(k, v)).collect();
        for (v, (key, value)) in values.iter().zip(cases) {
            assert!(v.len() <= 63, "{v}");
            assert!(v.contains('_'), "{v}: must never equal a node name");
            assert!(
                v.bytes().next().unwrap().is_ascii_alphanumeric()
                    && v.bytes().last().unwrap().is_ascii_alphanumeric(),
                "{v}"
            );
            assert_eq!(*v, pin_label_value(key, value), "stable");
        }
        assert!(values[0].starts_with("disk-1_"), "{}", values[0]);
        assert_ne!(values[0], values[4], "the key is part of the value");
    }

    #[test]
    fn one_selector_for_the_node_and_its_pins() {
        assert_eq!(
            volume_selector("hostvol.io/node", "node-b", &[]),
            "hostvol.io/node in (node-b)"
        );
        let pins = vec!["disk-1_00ff".to_string(), "disk-1_00ff".to_string()];
        assert_eq!(
            volume_selector("hostvol.io/node", "node-b", &pins),
            "hostvol.io/node in (disk-1_00ff,node-b)"
        );
    }

    #[test]
    fn a_pin_lives_while_any_node_carries_its_value() {
        let values = vec!["d1".to_string()];
        // (what, node's value, live nodes' values, pinned here, lost)
        type Case<'a> = (&'a str, Option<&'a str>, &'a [&'a str], bool, bool);
        let cases: &[Case] = &[
            ("same value", Some("d1"), &["d1"], true, false),
            ("other value", Some("d2"), &["d2"], false, true),
            ("node lacks the label", None, &[], false, true),
            (
                "another live node carries it",
                None,
                &["d2", "d1"],
                false,
                false,
            ),
        ];
        for (what, node_value, live, here, lost) in cases {
            let live: Vec<String> = live.iter().map(|s| s.to_string()).collect();
            assert_eq!(pinned_here(&values, *node_value), *here, "{what}");
            assert_eq!(pin_is_lost(&values, &live), *lost, "{what}");
        }
    }
}
