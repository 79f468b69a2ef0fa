//! `directoryPattern`: directory names people can read (`{namespace}/{claim}`), expanded into a
//! [`VolumePath`] that can neither leave the data root nor be shared by two claims.
//!
//! Why two claims never share a path: every value a placeholder can take (Kubernetes names, and the
//! label/annotation values this module accepts) is free of `/` and `_`, so those two characters in an
//! expansion all come from the pattern's own text, in the same order. Splitting an expansion at them
//! gives the pattern's tokens one for one; a pattern must hold `{pv}`, or `{namespace}` and `{claim}`,
//! each as a whole token (delimited by `/`, `_` or the pattern's ends), so the claim can be read back
//! from its path: distinct claims, distinct paths. Collisions with directories that already exist
//! (retained data, another class's pattern) are caught when the directory is made.
//!
//! Nothing here is re-read later: the agent works from each PV's own (immutable) path, so editing a
//! claim's labels or a class's pattern never moves or re-targets an existing volume.

use std::collections::BTreeMap;

use crate::domain::naming::{self, MAX_DIRECTORY_NAME, NameError};

/// Most directory levels a volume path may have (parents included).
pub const MAX_SEGMENTS: usize = 8;
/// Longest volume path, in bytes, relative to the data root (well under PATH_MAX with any root).
pub const MAX_PATH: usize = 1024;
/// Longest pattern accepted.
pub const MAX_PATTERN: usize = 512;
/// Today's layout, `<pv>_<namespace>_<claim>`: the default, and unchanged for existing classes.
pub const DEFAULT_PATTERN: &str = "{pv}_{namespace}_{claim}";

/// The placeholders a pattern may use, listed in refusals.
pub const PLACEHOLDERS: &str = "{namespace}, {claim}, {pv}, {label:KEY}, {annotation:KEY} (KEY a claim label or annotation key)";

/// A volume's directory relative to its data root: 1..=[`MAX_SEGMENTS`] segments joined by `/`, each
/// a safe name (`naming::validate_directory_name`: `[a-z0-9._-]`, no leading dot, at most 255 bytes),
/// at most [`MAX_PATH`] bytes. Never absolute, never `..`, never an empty segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumePath(String);

impl VolumePath {
    pub fn parse(path: &str) -> Result<Self, NameError> {
        let segments = path.split('/').count();
        if path.len() > MAX_PATH || segments > MAX_SEGMENTS {
            return Err(NameError(format!(
                "{path:?} is longer than {MAX_PATH} bytes or {MAX_SEGMENTS} directory levels"
            )));
        }
        for segment in path.split('/') {
            naming::validate_directory_name(segment)
                .map_err(|_| NameError(format!("{path:?} is not a safe directory path")))?;
        }
        Ok(VolumePath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory itself, the last segment.
    pub fn leaf(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent directories between the root and the leaf, outermost first.
    pub fn parents(&self) -> Vec<&str> {
        let mut segments: Vec<&str> = self.0.split('/').collect();
        segments.pop();
        segments
    }

    /// The paths of the parents, outermost first: `a/b/c` gives `a`, `a/b`.
    pub fn parent_paths(&self) -> Vec<&str> {
        self.0
            .match_indices('/')
            .map(|(at, _)| &self.0[..at])
            .collect()
    }

    /// Whether this is the layout every PV had before patterns (`<pv>_...` directly in the root),
    /// which proves by its name alone that it belongs to PV `pv`.
    pub fn is_named_for(&self, pv: &str) -> bool {
        !self.0.contains('/')
            && self
                .0
                .strip_prefix(pv)
                .is_some_and(|rest| rest.starts_with('_'))
    }
}

impl std::fmt::Display for VolumePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Namespace,
    Claim,
    Pv,
    Label(String),
    Annotation(String),
}

/// A parsed `directoryPattern`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryPattern {
    source: String,
    parts: Vec<Part>,
}

impl Default for DirectoryPattern {
    fn default() -> Self {
        DirectoryPattern::parse(DEFAULT_PATTERN).expect("the default pattern parses")
    }
}

/// What a pattern may use from a claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimFacts<'a> {
    pub pv: &'a str,
    pub namespace: &'a str,
    pub claim: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
}

impl DirectoryPattern {
    /// Parses and checks a pattern; errors say what is wrong and list what is allowed.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let refuse = |why: String| {
            Err(format!(
                "StorageClass parameter directoryPattern={pattern:?} {why}"
            ))
        };
        if pattern.is_empty() || pattern.len() > MAX_PATTERN {
            return refuse(format!("must have 1 to {MAX_PATTERN} characters"));
        }
        let mut parts = Vec::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            if let Some(inner) = rest.strip_prefix('{') {
                let Some(end) = inner.find('}') else {
                    return refuse("has a '{' without its '}'".into());
                };
                let name = &inner[..end];
                let part = match name.split_once(':') {
                    None if name == "namespace" => Part::Namespace,
                    None if name == "claim" => Part::Claim,
                    None if name == "pv" => Part::Pv,
                    Some(("label", key)) if valid_key(key) => Part::Label(key.into()),
                    Some(("annotation", key)) if valid_key(key) => Part::Annotation(key.into()),
                    _ => {
                        return refuse(format!(
                            "uses unknown placeholder {{{name}}}; valid placeholders are {PLACEHOLDERS}"
                        ));
                    }
                };
                parts.push(part);
                rest = &inner[end + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let text = &rest[..end];
                if let Some(bad) = text.chars().find(|c| {
                    !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(*c))
                }) {
                    return refuse(format!(
                        "has {bad:?}; outside placeholders only a-z, 0-9, '.', '_', '-' and '/' are allowed"
                    ));
                }
                parts.push(Part::Text(text.into()));
                rest = &rest[end..];
            }
        }
        let parsed = DirectoryPattern {
            source: pattern.to_string(),
            parts,
        };
        if let Err(why) = parsed.check_shape() {
            return refuse(why);
        }
        Ok(parsed)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_default(&self) -> bool {
        self.source == DEFAULT_PATTERN
    }

    /// Path shape (relative, no empty or dot segments, bounded depth) and claim identity.
    fn check_shape(&self) -> Result<(), String> {
        let text: String = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                _ => "x", // any placeholder value is a non-empty safe name fragment
            })
            .collect();
        if text.starts_with('/') {
            return Err("must be relative to the data root: remove the leading '/'".into());
        }
        if text.split('/').count() > MAX_SEGMENTS {
            return Err(format!("has more than {MAX_SEGMENTS} directory levels"));
        }
        for segment in text.split('/') {
            if segment.is_empty() {
                return Err("has an empty directory level ('//' or a '/' at the end)".into());
            }
            if segment.starts_with('.') {
                return Err(
                    "has a directory level that is '.', '..' or starts with '.' (hidden)".into(),
                );
            }
        }
        let delimited = |wanted: &Part| {
            self.parts.iter().enumerate().any(|(i, part)| {
                part == wanted
                    && (i == 0 || self.text_at(i - 1).is_some_and(|t| t.ends_with(['/', '_'])))
                    && (i + 1 == self.parts.len()
                        || self
                            .text_at(i + 1)
                            .is_some_and(|t| t.starts_with(['/', '_'])))
            })
        };
        if delimited(&Part::Pv) || (delimited(&Part::Namespace) && delimited(&Part::Claim)) {
            return Ok(());
        }
        Err("cannot tell every two claims apart: it must contain {pv}, or both {namespace} and {claim}, \
             each between '/' or '_' (characters names never contain) or at an end, e.g. \"{namespace}/{claim}\""
            .into())
    }

    fn text_at(&self, i: usize) -> Option<&str> {
        match &self.parts[i] {
            Part::Text(t) => Some(t),
            _ => None,
        }
    }

    /// The directory for one claim. A value that cannot be part of a safe name is refused, never
    /// rewritten (a rewrite could turn one claim's path into another's).
    pub fn expand(&self, facts: &ClaimFacts<'_>) -> Result<VolumePath, String> {
        if self.is_default() {
            // Exactly as before patterns (including the shortening of very long claim names).
            let name = naming::directory_name(facts.pv, facts.namespace, facts.claim)
                .map_err(|e| e.to_string())?;
            return VolumePath::parse(&name).map_err(|e| e.to_string());
        }
        let mut path = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => path.push_str(t),
                Part::Namespace => path.push_str(name_value("namespace", facts.namespace)?),
                Part::Claim => path.push_str(name_value("claim name", facts.claim)?),
                Part::Pv => path.push_str(name_value("PV name", facts.pv)?),
                Part::Label(key) => path.push_str(free_value("label", key, facts.labels)?),
                Part::Annotation(key) => {
                    path.push_str(free_value("annotation", key, facts.annotations)?)
                }
            }
        }
        for segment in path.split('/') {
            if segment.len() > MAX_DIRECTORY_NAME {
                return Err(format!(
                    "directoryPattern {:?} gives a directory name of {} bytes (at most {MAX_DIRECTORY_NAME}); use shorter names or a pattern with '/' between the parts",
                    self.source,
                    segment.len()
                ));
            }
        }
        VolumePath::parse(&path).map_err(|e| {
            format!(
                "directoryPattern {:?} gives {e}; change the claim's names or the class's pattern",
                self.source
            )
        })
    }
}

/// A label or annotation key as Kubernetes spells them (`[prefix/]name`).
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// A Kubernetes name: lowercase letters, digits, '-', '.'; never '/' or '_'.
fn name_value<'a>(what: &str, value: &'a str) -> Result<&'a str, String> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "{what} {value:?} cannot be part of a directory name"
        ))
    }
}

/// A label or annotation value: refused unless made of `[a-z0-9.-]` (no uppercase: mapping it would
/// let `A` and `a` share a directory; no `_`: it separates the parts), 1 to 63 bytes.
fn free_value<'a>(
    what: &str,
    key: &str,
    values: &'a BTreeMap<String, String>,
) -> Result<&'a str, String> {
    let Some(value) = values.get(key) else {
        return Err(format!(
            "the claim has no {what} {key:?}, which the class's directoryPattern uses; add it to the claim"
        ));
    };
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "{what} {key}={value:?} cannot be part of a directory name: use 1 to 63 of a-z, 0-9, '-', '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        labels: &'a BTreeMap<String, String>,
        annotations: &'a BTreeMap<String, String>,
    ) -> ClaimFacts<'a> {
        ClaimFacts {
            pv: "pvc-1234",
            namespace: "team-a",
            claim: "data-web-0",
            labels,
            annotations,
        }
    }

    #[test]
    fn patterns_expand_to_safe_relative_paths() {
        let labels = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("Upper".to_string(), "Web".to_string()),
            ("under".to_string(), "a_b".to_string()),
            ("dots".to_string(), "..".to_string()),
        ]);
        let annotations = BTreeMap::from([("example.com/owner".to_string(), "ops".to_string())]);
        let f = facts(&labels, &annotations);
        // (pattern, expected path or the words the error must hold)
        let cases: &[(&str, Result<&str, &str>)] = &[
            (DEFAULT_PATTERN, Ok("pvc-1234_team-a_data-web-0")),
            ("{namespace}/{claim}", Ok("team-a/data-web-0")),
            ("{namespace}_{claim}", Ok("team-a_data-web-0")),
            ("{pv}", Ok("pvc-1234")),
            (
                "k8s/{namespace}/{label:app}/{claim}",
                Ok("k8s/team-a/web/data-web-0"),
            ),
            ("{annotation:example.com/owner}/{pv}", Ok("ops/pvc-1234")),
            ("{label:Upper}/{pv}", Err("a-z")),
            ("{label:under}/{pv}", Err("a-z")),
            ("{label:dots}/{pv}", Err("safe directory path")),
            ("{label:missing}/{pv}", Err("has no label \"missing\"")),
        ];
        for (pattern, want) in cases {
            let got = DirectoryPattern::parse(pattern)
                .unwrap()
                .expand(&f)
                .map(|p| p.as_str().to_string());
            match (want, &got) {
                (Ok(path), Ok(got)) => assert_eq!(got, path, "{pattern}"),
                (Err(words), Err(e)) => assert!(e.contains(words), "{pattern}: {e}"),
                _ => panic!("{pattern}: {got:?}, wanted {want:?}"),
            }
        }
        let long = "x".repeat(250);
        let long_claim = ClaimFacts { claim: &long, ..f };
        let e = DirectoryPattern::parse("{namespace}_{claim}")
            .unwrap()
            .expand(&long_claim)
            .unwrap_err();
        assert!(e.contains("at most 255"), "{e}");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        let cases = [
            ("", "1 to 512"),
            ("{ns}/{claim}", "valid placeholders are {namespace}"),
            ("{namespace}/{claim", "without its '}'"),
            ("/{namespace}/{claim}", "leading '/'"),
            ("{namespace}//{claim}", "empty directory level"),
            ("{namespace}/{claim}/", "empty directory level"),
            ("../{pv}", "starts with '.'"),
            ("./{pv}", "starts with '.'"),
            (".hidden/{pv}", "starts with '.'"),
            ("{namespace}", "cannot tell every two claims apart"),
            ("{claim}", "cannot tell every two claims apart"),
            ("{namespace}-{claim}", "cannot tell every two claims apart"),
            ("{label:app}/{claim}", "cannot tell every two claims apart"),
            ("x{pv}", "cannot tell every two claims apart"),
            ("Data/{pv}", "'D'"),
            ("a b/{pv}", "' '"),
            ("a/b/c/d/e/f/g/h/{pv}", "more than 8"),
            ("{label:}/{pv}", "unknown placeholder"),
        ];
        for (pattern, words) in cases {
            let e = DirectoryPattern::parse(pattern).unwrap_err();
            assert!(
                e.contains(words) && e.contains("directoryPattern"),
                "{pattern}: {e}"
            );
        }
        assert!(DirectoryPattern::default().is_default());
        assert!(!DirectoryPattern::parse("{pv}").unwrap().is_default());
    }

    #[test]
    fn volume_paths() {
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "..",
            "a/../b",
            "./a",
            "a/.b",
            "A/b",
            "a\0b",
            "1/2/3/4/5/6/7/8/9",
        ] {
            assert!(VolumePath::parse(bad).is_err(), "{bad:?}");
        }
        let p = VolumePath::parse("a/b/pvc-1_ns_c").unwrap();
        assert_eq!(p.leaf(), "pvc-1_ns_c");
        assert_eq!(p.parents(), vec!["a", "b"]);
        assert_eq!(p.parent_paths(), vec!["a", "a/b"]);
        assert!(!p.is_named_for("pvc-1"));
        let flat = VolumePath::parse("pvc-1_ns_c").unwrap();
        assert!(flat.is_named_for("pvc-1") && !flat.is_named_for("pvc-10"));
        assert!(!flat.is_named_for("pvc-2") && flat.parents().is_empty());
    }
}
