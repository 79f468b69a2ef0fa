//! `hostvol reuse PV --for NS/CLAIM` (issue #16 part 4) on the played-kubelet cluster: the real agent
//! and CLI against the real control plane. Retained data goes to a re-created claim; every refusal is
//! one line and a non-zero exit; an agent killed between the steps finishes after a restart.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Agent, Cluster, Ran, claim_yaml, hostvol_as_person, pv_dir_name};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::Api;

const T: Duration = Duration::from_secs(120);
const NS: &str = "web";

/// One node's agent (with `failpoints`, if any), the shipped class (WaitForFirstConsumer, Retain)
/// and user roles, and namespace `web`.
async fn cluster(failpoints: &str) -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let kubeconfig = cluster.agent_kubeconfig().to_path_buf();
    let env: &[(&str, &str)] = if failpoints.is_empty() {
        &[]
    } else {
        &[("FAILPOINTS", failpoints)]
    };
    let agent = cluster
        .start_agent_with_env("node-a", &[], &kubeconfig, env)
        .await;
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    cluster.apply_repo_manifest("deploy/user-roles.yaml");
    cluster.create_namespace(NS).await;
    (cluster, agent)
}

/// Claim `web/<name>` provisioned on node-a with `index.html` written in it, then deleted: its PV
/// (returned) is Released and the data stays.
async fn retained_volume(cluster: &Cluster, agent: &Agent, name: &str) -> PersistentVolume {
    cluster.kubectl_apply_yaml(&claim_yaml(NS, name, "hostvol", "1Gi", Some("node-a")));
    let pv = cluster.hostvol_pv_of_claim(NS, name, T).await;
    std::fs::write(agent.root.join(pv_dir_name(&pv)).join("index.html"), name).unwrap();
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        NS,
        "pvc",
        name,
        "--wait=true",
        "--timeout=60s",
    ]);
    cluster.wait_pv_phase(&pv.name_any(), "Released", T).await;
    pv
}

/// The same claim again, as a person re-creates it: Pending (no pod, so no node chosen yet).
async fn recreate_claim(cluster: &Cluster, name: &str, size: &str) -> PersistentVolumeClaim {
    cluster.kubectl_apply_yaml(&claim_yaml(NS, name, "hostvol", size, None));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), NS);
    claims.get(name).await.unwrap()
}

fn reuse(kubeconfig: &std::path::Path, pv: &str, claim: &str, timeout: &str) -> Ran {
    hostvol_as_person(
        &[
            "reuse",
            pv,
            "--for",
            &format!("{NS}/{claim}"),
            "--timeout",
            timeout,
        ],
        kubeconfig,
    )
}

/// A refusal: non-zero exit, one line on stderr (kube's TLS notice about the test kubeconfig aside)
/// containing `expected`.
fn assert_refused(ran: &Ran, expected: &str) {
    let lines: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| !l.contains("Server cert bypassed"))
        .collect();
    assert!(
        !ran.ok() && lines.len() == 1 && lines[0].contains(expected),
        "expected one refusal line with {expected:?}, got exit {}: {}",
        ran.code,
        ran.output()
    );
}

fn new_dir(agent: &Agent, claim: &PersistentVolumeClaim) -> PathBuf {
    let uid = claim.uid().unwrap();
    agent
        .root
        .join(format!("pvc-{uid}_{NS}_{}", claim.name_any()))
}

async fn pv_exists(cluster: &Cluster, name: &str) -> bool {
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    pvs.get_opt(name).await.unwrap().is_some()
}

/// The scenario on played nodes, with each refusal it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_data_goes_to_a_recreated_claim_and_refusals_are_one_line() {
    let (cluster, agent) = cluster("").await;
    let admin = cluster.admin_kubeconfig().to_path_buf();
    let old = retained_volume(&cluster, &agent, "data").await;
    let old_dir = agent.root.join(pv_dir_name(&old));
    cluster.kubectl_apply_yaml(&claim_yaml(NS, "busy", "hostvol", "1Gi", Some("node-a")));
    let busy = cluster.hostvol_pv_of_claim(NS, "busy", T).await;

    // Without the hostvol-purger role: forbidden, naming the role.
    let alice = cluster.person_kubeconfig("alice").await;
    let claim = recreate_claim(&cluster, "data", "1Gi").await;
    assert_refused(
        &reuse(&alice, &old.name_any(), "data", "5"),
        "forbidden: you may not read PersistentVolumes (bind the hostvol-purger ClusterRole",
    );
    // A PV in use, a claim already bound, a claim of another size, one scheduled elsewhere.
    assert_refused(
        &reuse(&admin, &busy.name_any(), "data", "5"),
        "is Bound to claim web/busy: its directory is in use",
    );
    assert_refused(
        &reuse(&admin, &old.name_any(), "busy", "5"),
        &format!("claim web/busy is bound to {} already", busy.name_any()),
    );
    recreate_claim(&cluster, "small", "512Mi").await;
    assert_refused(
        &reuse(&admin, &old.name_any(), "small", "5"),
        "asks for 512Mi, less than the data's limit 1Gi",
    );
    cluster.kubectl_apply_yaml(&claim_yaml(
        NS,
        "elsewhere",
        "hostvol",
        "1Gi",
        Some("node-b"),
    ));
    assert_refused(
        &reuse(&admin, &old.name_any(), "elsewhere", "5"),
        "scheduled to node node-b, the data is on node node-a",
    );
    // A PV hostvol did not make, then one that is not Released.
    cluster.kubectl_apply_yaml(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: static\nspec:\n  capacity:\n    storage: 1Gi\n  \
         accessModes: [ReadWriteOnce]\n  storageClassName: hostvol\n  hostPath:\n    path: /tmp/static\n",
    );
    assert_refused(
        &reuse(&admin, "static", "data", "5"),
        "static was not provisioned by hostvol",
    );
    cluster.kubectl_ok(&[
        "annotate",
        "pv",
        "static",
        "pv.kubernetes.io/provisioned-by=hostpath.hostvol.io",
    ]);
    cluster.wait_pv_phase("static", "Available", T).await;
    assert_refused(
        &reuse(&admin, "static", "data", "5"),
        "static is Available, not Released",
    );
    assert_refused(
        &reuse(&admin, "missing", "data", "5"),
        "PV missing not found",
    );
    assert!(
        old_dir.join("index.html").exists(),
        "refusals touch nothing"
    );
    assert!(pv_exists(&cluster, &old.name_any()).await);

    // With the shipped role, alice may: the claim gets its own PV over the same data.
    cluster.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "alice-purger",
        "--clusterrole",
        "hostvol-purger",
        "--serviceaccount",
        "default:alice",
    ]);
    let ran = reuse(&alice, &old.name_any(), "data", "60");
    let new_pv = format!("pvc-{}", claim.uid().unwrap());
    assert!(ran.ok() && ran.stdout.contains(&new_pv), "{}", ran.output());
    let bound = cluster.wait_pvc_bound(NS, "data", T).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(new_pv.as_str())
    );
    assert_eq!(
        std::fs::read_to_string(new_dir(&agent, &claim).join("index.html")).unwrap(),
        "data"
    );
    assert!(!old_dir.exists(), "renamed, not copied");
    assert!(
        !pv_exists(&cluster, &old.name_any()).await,
        "old PV removed"
    );
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let new = pvs.get(&new_pv).await.unwrap();
    let spec = new.spec.clone().unwrap();
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Retain")
    );
    assert_eq!(spec.capacity.unwrap()["storage"].0, "1Gi");
    assert!(spec.node_affinity.is_some(), "pinned to the node");
    assert_eq!(
        new.annotations().get("hostvol.io/node").map(String::as_str),
        Some("node-a")
    );
    assert_eq!(
        new.annotations().get("hostvol.io/reused-from"),
        Some(&old.name_any())
    );
    // Bound now: reusing it again is refused.
    assert_refused(
        &reuse(&admin, &new_pv, "small", "5"),
        "its directory is in use",
    );
    assert!(busy.name_any() != new_pv);
}

/// The agent killed after creating the new PV, then after the rename: each restart finishes the reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reuse_interrupted_between_steps_is_finished_by_a_restart() {
    let (cluster, mut agent) = cluster("reuse_after_new_pv=sleep(600000)").await;
    let admin = cluster.admin_kubeconfig().to_path_buf();
    let old = retained_volume(&cluster, &agent, "data").await;
    let old_dir = agent.root.join(pv_dir_name(&old));
    let claim = recreate_claim(&cluster, "data", "1Gi").await;
    let new_pv = format!("pvc-{}", claim.uid().unwrap());

    let ran = reuse(&admin, &old.name_any(), "data", "3");
    assert!(
        !ran.ok() && ran.stderr.contains("is marked for reuse"),
        "{}",
        ran.output()
    );
    cluster
        .wait_for(|| pv_exists(&cluster, &new_pv), T, "the new PV")
        .await;
    agent.kill(); // between the new PV and the rename
    assert!(old_dir.join("index.html").exists() && !new_dir(&agent, &claim).exists());
    assert!(
        pv_exists(&cluster, &old.name_any()).await,
        "the old PV goes last"
    );

    agent.env = vec![(
        "FAILPOINTS".into(),
        "reuse_after_rename=sleep(600000)".into(),
    )];
    agent.restart().await;
    let moved = new_dir(&agent, &claim).join("index.html");
    cluster
        .wait_for(|| async { moved.exists() }, T, "the rename")
        .await;
    agent.kill(); // between the rename and the old PV's deletion
    assert!(!old_dir.exists() && pv_exists(&cluster, &old.name_any()).await);

    agent.env.clear();
    agent.restart().await;
    let gone = || async { !pv_exists(&cluster, &old.name_any()).await };
    cluster.wait_for(gone, T, "the old PV deleted").await;
    let bound = cluster.wait_pvc_bound(NS, "data", T).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(new_pv.as_str())
    );
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), "data");
    let dirs = common::dirs_in(&agent.root);
    assert_eq!(dirs.len(), 1, "one directory, the data's: {dirs:?}");
}

/// `hostvol reuse` through the node service, as root on the node: one agent's Unix socket.
fn reuse_on_node(agent: &Agent, kubeconfig: &std::path::Path, what: &[&str], claim: &str) -> Ran {
    let endpoint = format!("unix:{}", agent.grpc_socket.display());
    let mut args = vec!["reuse"];
    args.extend_from_slice(what);
    let target = format!("{NS}/{claim}");
    args.extend_from_slice(&["--for", &target, "--endpoint", &endpoint, "--timeout", "30"]);
    hostvol_as_person(&args, kubeconfig)
}

/// Claim `web/<name>` made, written, then its claim and PV deleted as people do (Retain keeps the
/// directory): an orphan, aged past the scan's grace period as one `doctor` lists. Returns its name.
async fn orphaned_directory(cluster: &Cluster, agent: &Agent, name: &str) -> String {
    let pv = retained_volume(cluster, agent, name).await;
    cluster.kubectl_ok(&[
        "delete",
        "pv",
        &pv.name_any(),
        "--wait=true",
        "--timeout=60s",
    ]);
    let directory = pv_dir_name(&pv);
    let aged = std::process::Command::new("touch")
        .args(["-m", "-d", "10 minutes ago"])
        .arg(agent.root.join(&directory))
        .status()
        .unwrap();
    assert!(aged.success());
    directory
}

/// #16 part 4's "or an orphaned directory that doctor lists" and "the same through the node service":
/// root on the node hands an orphan (and a Released PV) to re-created claims through the agent's
/// socket; everyone else is refused in one line, and refusals touch nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_directories_and_released_volumes_are_reused_through_the_node_socket() {
    let (cluster, agent) = cluster("").await;
    let admin = cluster.admin_kubeconfig().to_path_buf();
    let orphan = orphaned_directory(&cluster, &agent, "data").await;
    let released = retained_volume(&cluster, &agent, "logs").await;
    cluster.kubectl_apply_yaml(&claim_yaml(NS, "busy", "hostvol", "1Gi", Some("node-a")));
    let busy = cluster.hostvol_pv_of_claim(NS, "busy", T).await;
    let doctor = hostvol_as_person(
        &[
            "doctor",
            "--endpoint",
            &format!("unix:{}", agent.grpc_socket.display()),
        ],
        &admin,
    );
    assert!(
        doctor.stdout.contains(&orphan),
        "doctor lists the orphan: {}",
        doctor.output()
    );
    let claim = recreate_claim(&cluster, "data", "2Gi").await;

    // Over TCP (what a port-forward reaches): refused, whoever asks.
    let tcp = hostvol_as_person(
        &[
            "reuse",
            "--directory",
            &orphan,
            "--for",
            &format!("{NS}/data"),
            "--endpoint",
            &agent.grpc_addr.to_string(),
        ],
        &admin,
    );
    assert_refused(&tcp, "reuse is served only on the node's Unix socket");
    // Not root on the node: the socket itself is root's.
    let nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::hostvol_bin())
        .args([
            "reuse",
            "--directory",
            &orphan,
            "--for",
            &format!("{NS}/data"),
        ])
        .args([
            "--endpoint",
            &format!("unix:{}", agent.grpc_socket.display()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        !nobody.status.success()
            && stderr.trim().lines().count() == 1
            && stderr.contains("Permission denied"),
        "uid 65534: {stderr}"
    );
    // A directory a bound PV names, a name outside the root, a claim that does not exist, a claim
    // asking for less than the PV's data, a claim bound already.
    assert_refused(
        &reuse_on_node(
            &agent,
            &admin,
            &["--directory", &pv_dir_name(&busy)],
            "data",
        ),
        "is not an orphaned directory of node node-a",
    );
    assert_refused(
        &reuse_on_node(&agent, &admin, &["--directory", "../etc"], "data"),
        "is not a directory name in a data root",
    );
    assert_refused(
        &reuse_on_node(&agent, &admin, &["--directory", &orphan], "nobody"),
        "claim web/nobody not found",
    );
    recreate_claim(&cluster, "small", "512Mi").await;
    assert_refused(
        &reuse_on_node(&agent, &admin, &[&released.name_any()], "small"),
        "asks for 512Mi, less than the data's limit 1Gi",
    );
    assert_refused(
        &reuse_on_node(&agent, &admin, &["--directory", &orphan], "busy"),
        &format!("claim web/busy is bound to {} already", busy.name_any()),
    );
    assert!(
        agent.root.join(&orphan).join("index.html").exists(),
        "refusals touch nothing"
    );

    // The orphan goes to the claim: its own PV, the claim's size, the directory renamed for it.
    let ran = reuse_on_node(&agent, &admin, &["--directory", &orphan], "data");
    let new_pv = format!("pvc-{}", claim.uid().unwrap());
    assert!(ran.ok() && ran.stdout.contains(&new_pv), "{}", ran.output());
    let bound = cluster.wait_pvc_bound(NS, "data", T).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(new_pv.as_str())
    );
    assert_eq!(
        std::fs::read_to_string(new_dir(&agent, &claim).join("index.html")).unwrap(),
        "data"
    );
    assert!(!agent.root.join(&orphan).exists(), "renamed, not copied");
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let spec = pvs.get(&new_pv).await.unwrap().spec.unwrap();
    assert_eq!(spec.capacity.unwrap()["storage"].0, "2Gi");
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Retain")
    );
    assert!(spec.node_affinity.is_some(), "pinned to the node");

    // A Released PV through the socket: the same as `kubectl hostvol reuse PV`.
    let logs = recreate_claim(&cluster, "logs", "1Gi").await;
    let ran = reuse_on_node(&agent, &admin, &[&released.name_any()], "logs");
    let logs_pv = format!("pvc-{}", logs.uid().unwrap());
    assert!(
        ran.ok() && ran.stdout.contains(&logs_pv),
        "{}",
        ran.output()
    );
    let gone = || async { !pv_exists(&cluster, &released.name_any()).await };
    cluster.wait_for(gone, T, "the old PV deleted").await;
    assert_eq!(
        std::fs::read_to_string(new_dir(&agent, &logs).join("index.html")).unwrap(),
        "logs"
    );
}

/// The agent killed after the orphan was moved for the claim and before its PV exists: the restart
/// finishes from the record on the node's disk, nothing duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_interrupted_before_its_pv_is_finished_by_a_restart() {
    let (cluster, mut agent) = cluster("adopt_after_place=sleep(600000)").await;
    let admin = cluster.admin_kubeconfig().to_path_buf();
    let orphan = orphaned_directory(&cluster, &agent, "data").await;
    let claim = recreate_claim(&cluster, "data", "1Gi").await;
    let new_pv = format!("pvc-{}", claim.uid().unwrap());
    let moved = new_dir(&agent, &claim).join("index.html");

    let endpoint = format!("unix:{}", agent.grpc_socket.display());
    let args = [
        "reuse",
        "--directory",
        &orphan,
        "--for",
        "web/data",
        "--endpoint",
        &endpoint,
        "--timeout",
        "2",
    ];
    let ran = hostvol_as_person(&args, &admin);
    assert!(
        !ran.ok(),
        "the agent sleeps at the fail point: {}",
        ran.output()
    );
    assert!(moved.exists(), "moved before the fail point");
    agent.kill();
    assert!(
        !pv_exists(&cluster, &new_pv).await,
        "no PV before the restart"
    );

    agent.env.clear();
    agent.restart().await;
    let bound = cluster.wait_pvc_bound(NS, "data", T).await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(new_pv.as_str())
    );
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), "data");
    let dirs: Vec<String> = common::dirs_in(&agent.root)
        .into_iter()
        .filter(|d| !d.starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1, "one directory, the data's: {dirs:?}");
    let records = agent.root.join(".hostvol-adoptions");
    let left = std::fs::read_dir(&records).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the record goes once the PV exists");
}
