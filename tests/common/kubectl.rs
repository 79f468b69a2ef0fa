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

    /// Applies the RBAC of the node-loss clean-up component (what users get with the kustomize
    /// component) and waits until the API server grants it to the agents' ServiceAccount, so an agent
    /// started with `--node-loss-cleanup` next passes its start-up check.
    pub async fn grant_node_loss_cleanup(&self) {
        self.apply_repo_manifest(super::NODE_LOSS_COMPONENT_RBAC);
        let agent = format!(
            "--as=system:serviceaccount:{}:{}",
            super::AGENT_NAMESPACE,
            super::AGENT_SERVICE_ACCOUNT
        );
        let ns = format!("--namespace={}", super::AGENT_NAMESPACE);
        self.wait_for(
            || async {
                let claims = [
                    "auth",
                    "can-i",
                    &agent,
                    "delete",
                    "persistentvolumeclaims",
                    "--all-namespaces",
                ];
                let lease = [
                    "auth",
                    "can-i",
                    &agent,
                    &ns,
                    "patch",
                    "leases.coordination.k8s.io",
                ];
                self.kubectl(&claims).status.success() && self.kubectl(&lease).status.success()
            },
            std::time::Duration::from_secs(30),
            "the node-loss component's RBAC granted to the agents",
        )
        .await;
    }
}
