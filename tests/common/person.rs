//! Commands as people run them: `hostvol` or `kubectl hostvol` with their own kubeconfig, the plugin on
//! PATH, and none of the tests' overrides.

use std::path::Path;
use std::process::Command;

use super::hostvol_bin;

/// What a command printed and how it ended.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout then stderr, for assertions and messages.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` with `kubeconfig`, `kubectl-hostvol` on PATH and no `HOSTVOL_VIA` or `RUST_LOG` from
/// the test's environment (a test that wants them sets them on `cmd` after this clears them).
pub fn run_as_person(mut cmd: Command, kubeconfig: &Path) -> Ran {
    let out = cmd
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", path_with_plugin())
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `hostvol ARGS` as a person with `kubeconfig`.
pub fn hostvol_as_person(args: &[&str], kubeconfig: &Path) -> Ran {
    let mut cmd = Command::new(hostvol_bin());
    cmd.args(args).env_remove("HOSTVOL_VIA");
    run_as_person(cmd, kubeconfig)
}

/// PATH with the directory of `kubectl-hostvol` (built next to `hostvol`) first.
fn path_with_plugin() -> String {
    format!(
        "{}:{}",
        hostvol_bin()
            .parent()
            .expect("hostvol's directory")
            .display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
