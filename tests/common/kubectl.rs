//! Running `kubectl` against a `Cluster` as the admin: plain runs, `apply` of YAML text and of
//! manifests from the repository (e.g. `deploy/storageclass.yaml`).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::Cluster;

impl Cluster {
    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .arg("--cache-dir")
            .arg(self.path.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS` (blocking) and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and panics (with stderr) unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        if !out.status.success() {
            panic!(
                "kubectl {} failed ({}):\n{}{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.diag()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml` on stdin; panics with stderr on failure.
    pub fn kubectl_apply_yaml(&self, yaml: &str) {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .expect("write kubectl stdin");
        let out = child.wait_with_output().expect("wait kubectl");
        if !out.status.success() {
            panic!(
                "kubectl apply -f - failed ({}):\n{}\n--- input ---\n{yaml}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.diag()
            );
        }
    }

    /// `kubectl apply -f <crate root>/<rel>` (e.g. "deploy/storageclass.yaml").
    pub fn apply_repo_manifest(&self, rel: &str) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        self.kubectl_ok(&["apply", "-f", p.to_str().unwrap()]);
    }
}
