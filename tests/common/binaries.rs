//! Where the harness finds the programs it runs: the Kubernetes control-plane binaries built by
//! `scripts/setup-control-plane.sh`, etcd, and the `hostvol` binary the agents run.

use std::path::PathBuf;

pub const K8S_VERSION: &str = "1.20.2";
pub const SETUP_COMMAND: &str = "scripts/setup-control-plane.sh";

/// Directory with kube-apiserver, kube-controller-manager, kube-scheduler (same rule as the setup script).
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOSTVOL_K8S_BIN_DIR") {
        return PathBuf::from(d);
    }
    let cache = match std::env::var_os("HOSTVOL_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("hostvol"),
            _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/hostvol"),
        },
    };
    cache.join(format!("kubernetes-{K8S_VERSION}/bin"))
}

pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTVOL_ETCD") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("/usr/bin/etcd")
}

/// The `hostvol` binary the agents run: `HOSTVOL_BIN` if set; else Cargo's `CARGO_BIN_EXE_hostvol`
/// (set when building integration tests); else `hostvol` in the target dir of the running executable
/// (cargo examples, e.g. `target/debug/examples/demo` -> `target/debug/hostvol`; Cargo does not build
/// it for examples: `cargo build --bin hostvol` first).
pub fn hostvol_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTVOL_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_hostvol") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("hostvol"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "hostvol binary not found next to {} (run `cargo build --bin hostvol`, or set HOSTVOL_BIN)",
                exe.display()
            )
        })
}

pub(super) fn require_binaries() -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = k8s_bin_dir();
    let etcd = etcd_bin();
    let bins = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .map(|b| dir.join(b));
    let mut missing: Vec<String> = bins
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !etcd.is_file() {
        missing.push(etcd.display().to_string());
    }
    if !missing.is_empty() {
        panic!(
            "e2e control-plane binaries missing: {}.\nRun `{SETUP_COMMAND}` (builds Kubernetes {K8S_VERSION} \
             from Debian's source package into {}, installs etcd; ~5 min the first time).",
            missing.join(", "),
            dir.display()
        );
    }
    let [a, c, s] = bins;
    (etcd, a, c, s)
}
