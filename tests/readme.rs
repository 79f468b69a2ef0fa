//! The README's "Agent flags" table against what `hostvol agent --help` says: every flag listed, with
//! its environment variable and default, so the table people read cannot drift from the binary.

use std::collections::BTreeMap;
use std::process::Command;

/// (env, default) per long flag, as the README's table gives them.
fn readme_flags() -> BTreeMap<String, (String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("## Agent flags")
        .nth(1)
        .expect("README has an '## Agent flags' section");
    let mut flags = BTreeMap::new();
    for row in table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
    {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert!(
            cells.len() >= 4,
            "a row with flag, env, default, meaning: {row}"
        );
        // One row may list several flags: "`--a`, `--b` | `A`, `B` | -, `x`".
        let names = list(cells[0]);
        let envs = list(cells[1]);
        let defaults = list(cells[2]);
        assert_eq!(names.len(), envs.len(), "{row}");
        assert_eq!(names.len(), defaults.len(), "{row}");
        for ((name, env), default) in names.into_iter().zip(envs).zip(defaults) {
            let name = name
                .strip_prefix("--")
                .expect("flags start with --")
                .to_string();
            flags.insert(name, (env, default));
        }
    }
    assert!(!flags.is_empty(), "no rows found in the Agent flags table");
    flags
}

fn list(cell: &str) -> Vec<String> {
    cell.split(", ")
        .map(|s| s.trim().trim_matches('`').to_string())
        .collect()
}

/// (env, default) per long flag, from `hostvol agent --help` (clap's `[env: X=]` and `[default: Y]`).
fn help_flags() -> BTreeMap<String, (Option<String>, Option<String>, bool)> {
    let out = Command::new(env!("CARGO_BIN_EXE_hostvol"))
        .args(["agent", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let required = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default()
        .to_string();
    let mut flags = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut finish = |flag: Option<(String, String)>| {
        if let Some((name, text)) = flag {
            let between = |open: &str| {
                text.split_once(open)
                    .and_then(|(_, rest)| rest.split_once(']'))
                    .map(|(v, _)| v.to_string())
            };
            let env = between("[env: ").map(|e| e.trim_end_matches('=').to_string());
            let default = between("[default: ");
            let is_required = required.contains(&format!("--{name} "));
            flags.insert(name, (env, default, is_required));
        }
    };
    for line in help.lines() {
        let trimmed = line.trim_start();
        let flag_line = trimmed.strip_prefix("--").or_else(|| {
            trimmed
                .get(4..)
                .and_then(|r| r.strip_prefix("--"))
                .filter(|_| trimmed.starts_with('-'))
        });
        if let Some(rest) = flag_line.filter(|_| line.starts_with("  ")) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            finish(current.take());
            current = Some((name, line.to_string()));
        } else if let Some((_, text)) = current.as_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    finish(current.take());
    flags.retain(|name, _| name != "help" && name != "version");
    flags
}

#[test]
fn readme_flag_table_matches_agent_help() {
    let readme = readme_flags();
    let help = help_flags();
    let listed: Vec<&String> = readme.keys().collect();
    let actual: Vec<&String> = help.keys().collect();
    assert_eq!(
        listed, actual,
        "flags in the README table vs `hostvol agent --help`"
    );
    for (name, (env, default, required)) in &help {
        let (readme_env, readme_default) = &readme[name];
        assert_eq!(
            Some(readme_env),
            env.as_ref(),
            "--{name}: env in the README vs --help"
        );
        match default {
            Some(value) => assert_eq!(
                readme_default, value,
                "--{name}: default in the README vs --help"
            ),
            None if *required => assert_eq!(readme_default, "required", "--{name} is required"),
            // No default in the binary: the README explains what happens instead ("none", "off",
            // another flag's value), never a value that looks like a default.
            None => assert!(
                !readme_default
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit() || c == '/'),
                "--{name}: the README gives default {readme_default:?}, the binary has none"
            ),
        }
    }
}
