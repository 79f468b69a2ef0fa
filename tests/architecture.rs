//! The source tree is the architecture: these tests keep it that way. Every `crate::` path in `src/`
//! is an edge from the module that writes it to the module it names; layers may only use the layers
//! below them, and no two modules may use each other, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom up; a module may use its own layer and those before it.
const LAYERS: &[&[&str]] = &[
    &["domain"],
    &["node"],
    &["controller"],
    &["service", "cli"],
    &["agent", "app", "telemetry", "shutdown"],
];

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/controller/provision.rs` -> `controller::provision`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The module graph: module -> modules it names through `crate::` paths (test code excluded).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|f| !f.starts_with(src.join("bin"))) {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = without_test_modules(&text);
        let targets = edges.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let path: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            // The longest prefix that is a module: `crate::controller::pv::ANN` names `controller::pv`.
            let target = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(target) = target
                && target != from
                && !from.starts_with(&format!("{target}::"))
            {
                targets.insert(target);
            }
        }
    }
    edges
}

/// The file without its `#[cfg(test)] mod ... { ... }` blocks: everything else counts, test-only
/// imports included (an import is a dependency whoever uses it).
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = &rest[at + "#[cfg(test)]".len()..];
        let item = after.trim_start();
        let is_module = item.starts_with("mod ")
            || item.starts_with("pub mod ")
            || item.starts_with("pub(crate) mod ");
        let Some(open) = item.find('{').filter(|_| is_module) else {
            out.push_str(&rest[..at + "#[cfg(test)]".len()]);
            rest = after;
            continue;
        };
        out.push_str(&rest[..at]);
        let body = &item[open..];
        let mut depth = 0usize;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &body[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn test_modules_are_left_out_and_everything_else_read() {
    let text = "use crate::a;\n#[cfg(test)]\nuse crate::b;\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::c;\n    fn g() { if x { y } }\n}\nuse crate::d;\n";
    let code = without_test_modules(text);
    for kept in ["crate::a", "crate::b", "crate::d", "fn f"] {
        assert!(code.contains(kept), "{kept} kept: {code}");
    }
    assert!(!code.contains("crate::c"), "test module left out: {code}");
}

fn layer_of(module: &str) -> usize {
    let top = module.split("::").next().unwrap();
    LAYERS
        .iter()
        .position(|layer| layer.contains(&top))
        .unwrap_or_else(|| panic!("module {module} is in no layer; add its folder to LAYERS"))
}

#[test]
fn layers_depend_only_downwards() {
    let mut violations = Vec::new();
    for (from, targets) in graph() {
        if from.is_empty() {
            continue; // lib.rs declares every layer
        }
        for to in targets {
            if !to.is_empty() && layer_of(&to) > layer_of(&from) {
                violations.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "uses of a higher layer:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_module_cycles() {
    let graph = graph();
    // Depth-first search; a back edge to a module on the current path is a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|m| m == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            cycles.push(cycle.join(" -> "));
            return;
        }
        if !done.insert(node.to_string()) {
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for module in graph.keys().filter(|m| !m.is_empty()) {
        visit(module, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// Prints the edges per folder, for reviews (`cargo test --test architecture -- --nocapture`).
#[test]
fn print_edges_per_folder() {
    let mut per_folder: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in graph() {
        let folder = from.split("::").next().unwrap_or_default().to_string();
        for to in targets {
            let to_folder = to.split("::").next().unwrap_or_default().to_string();
            if !from.is_empty() && to_folder != folder {
                per_folder
                    .entry(folder.clone())
                    .or_default()
                    .insert(to_folder);
            }
        }
    }
    for (folder, uses) in per_folder {
        println!(
            "{folder} uses {}",
            uses.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
}
