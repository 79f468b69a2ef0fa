//! Issue 16 part 2, directory names people can read (`directoryPattern`), on the real control plane
//! with the real agent (played-kubelet cluster: the scenarios are about directories and objects, not
//! about a container's mounts; the hostPath a pod gets is the PV's `spec.hostPath.path`, checked):
//!
//! 1. `{namespace}/{claim}` nests volumes under a directory per namespace, each marked for its PV;
//!    Delete of one of two siblings removes that one only, the other and the shared parent stay; the
//!    last one takes the emptied parent with it.
//! 2. Two classes whose patterns map two claims to one path: the second gets a Warning naming the
//!    first claim and no volume; the first volume is untouched. A claim re-created over a retained
//!    volume is refused the same way.
//! 3. A class's pattern changed: existing volumes stay where they are and are still deleted there;
//!    new claims use the new pattern.
//! 5. On btrfs with quotas: a patterned volume is a subvolume with its own qgroup limit, which an
//!    expansion raises (the size limit is set only after the mark says the directory is the PV's).
//!    Needs root and btrfs-progs (`scripts/setup-quotas.sh`): fails, never skips, without them.
//! 4. A hand-made PV (provisioned-by hostvol, this node, reclaim Delete) whose hostPath names another
//!    claim's patterned directory: released, it is left alone: the directory and its data stay.
//! 6. Clones into a patterned class: (a) from a flat volume (made before the class got its pattern),
//!    (b) from a patterned volume: each clone is at its pattern path, marked for its own PV, holds
//!    the source's data, no staging directory is left and no Warning is given; the sources are
//!    untouched. On btrfs (scenario 5's test) a clone into the patterned class is a snapshot with
//!    the clone's mark and limit.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Agent, Cluster, PROVISIONER, claim_yaml, claim_yaml_with, class_yaml, cluster_scoped_events,
    pv_host_path,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

/// Makes a directory look an hour old (orphans younger than the scan's grace are not reported).
fn age(dir: &Path) {
    let an_hour_ago = nix::sys::time::TimeSpec::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            - Duration::from_secs(3600),
    );
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dir,
        &an_hour_ago,
        &an_hour_ago,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

async fn node_a() -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    // Usage and orphan passes every second, so their figures come within the test's time.
    let agent = cluster
        .start_agent(
            "node-a",
            &["--orphan-scan-seconds", "1", "--usage-refresh-seconds", "1"],
        )
        .await;
    (cluster, agent)
}

fn patterned_class(name: &str, reclaim: &str, pattern: &str) -> String {
    class_yaml(
        name,
        "WaitForFirstConsumer",
        reclaim,
        &[("directoryPattern", pattern)],
    )
}

/// A claim of `class` in `ns` on node-a whose data source is the claim `source`.
fn clone_claim(ns: &str, name: &str, class: &str, size: &str, source: &str) -> String {
    claim_yaml_with(
        ns,
        name,
        class,
        size,
        Some("node-a"),
        &format!("  dataSource:\n    kind: PersistentVolumeClaim\n    name: {source}\n"),
    )
}

/// Claim YAML with labels (`claim_yaml` plus a labels block in its metadata).
fn labelled_claim(ns: &str, name: &str, class: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("\n    {k}: \"{v}\""))
        .collect();
    claim_yaml(ns, name, class, "1Gi", Some("node-a")).replacen(
        &format!("  namespace: {ns}\n"),
        &format!("  namespace: {ns}\n  labels:{labels}\n"),
        1,
    )
}

/// The PV's directory, relative to the agent's data root.
fn relative(agent: &Agent, pv: &PersistentVolume) -> String {
    Path::new(pv_host_path(pv))
        .strip_prefix(&agent.root)
        .unwrap_or_else(|_| panic!("{} is not in {}", pv_host_path(pv), agent.root.display()))
        .to_string_lossy()
        .into_owned()
}

fn mark_of(dir: &Path) -> Option<String> {
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    hostvol::node::parents::owner_of(std::os::fd::AsFd::as_fd(&fd)).unwrap()
}

async fn delete_claim(cluster: &Cluster, ns: &str, name: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    claims.delete(name, &DeleteParams::default()).await.unwrap();
}

async fn wait_pv_gone(cluster: &Cluster, name: &str) {
    let volumes: Api<PersistentVolume> = Api::all(cluster.client());
    cluster
        .wait_for(
            || async { matches!(volumes.get_opt(name).await, Ok(None)) },
            T,
            &format!("PV {name} to be deleted"),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_pattern_provisions_and_delete_of_one_sibling_leaves_the_other() {
    let (cluster, agent) = node_a().await;
    cluster.kubectl_apply_yaml(&patterned_class("nested", "Delete", "{namespace}/{claim}"));
    cluster.create_namespace("team-a").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml("team-a", "web", "nested", "1Gi", Some("node-a")),
        claim_yaml("team-a", "db", "nested", "1Gi", Some("node-a"))
    ));
    let web = cluster.hostvol_pv_of_claim("team-a", "web", T).await;
    let db = cluster.hostvol_pv_of_claim("team-a", "db", T).await;
    // The path a pod mounts is the PV's hostPath: the readable one, inside the root.
    assert_eq!(relative(&agent, &web), "team-a/web");
    assert_eq!(relative(&agent, &db), "team-a/db");
    let (web_dir, db_dir) = (
        PathBuf::from(pv_host_path(&web)),
        PathBuf::from(pv_host_path(&db)),
    );
    assert!(web_dir.is_dir() && db_dir.is_dir());
    assert_eq!(mark_of(&web_dir), Some(web.name_any()));
    assert_eq!(mark_of(&db_dir), Some(db.name_any()));
    std::fs::write(web_dir.join("data"), "web").unwrap();
    std::fs::write(db_dir.join("data"), "db").unwrap();
    let succeeded = cluster
        .wait_event("team-a", "web", "ProvisioningSucceeded", T)
        .await;
    assert!(
        succeeded.2.contains(&web_dir.display().to_string()),
        "{succeeded:?}"
    );

    // Usage is measured in the nested directory; the orphan scan looks into the shared parent:
    // the parent is not an orphan, a directory with no PV next to the volumes is.
    std::fs::write(web_dir.join("big"), vec![7u8; MIB]).unwrap();
    let kept = agent.root.join("team-a/kept");
    std::fs::create_dir(&kept).unwrap();
    for old in [&kept, &agent.root.join("team-a")] {
        age(old);
    }
    let figure = |metrics: &str, name: &str, labels: &[(&str, &str)]| {
        common::metric_value(metrics, name, labels).unwrap_or(-1.0)
    };
    let web_name = web.name_any();
    cluster
        .wait_for(
            || async {
                let m = agent.metrics().await;
                figure(
                    &m,
                    "hostvol_volume_used_bytes",
                    &[("persistentvolume", &web_name)],
                ) >= MIB as f64
                    && figure(&m, "hostvol_orphan_directories", &[]) == 1.0
                    && figure(&m, "hostvol_lost_volumes", &[]) == 0.0
            },
            T,
            "usage of team-a/web >= 1 MiB, one orphan (team-a/kept), no lost volume",
        )
        .await;
    std::fs::remove_dir(&kept).unwrap();

    delete_claim(&cluster, "team-a", "web").await;
    wait_pv_gone(&cluster, &web.name_any()).await;
    assert!(!web_dir.exists(), "the deleted sibling's directory is gone");
    assert_eq!(
        std::fs::read_to_string(db_dir.join("data")).unwrap(),
        "db",
        "the other sibling is untouched"
    );
    assert!(
        agent.root.join("team-a").is_dir(),
        "the shared parent stays"
    );

    delete_claim(&cluster, "team-a", "db").await;
    wait_pv_gone(&cluster, &db.name_any()).await;
    assert!(
        !agent.root.join("team-a").exists(),
        "the parent the last volume left empty is removed; the root holds {:?}",
        common::dirs_in(&agent.root)
    );
    assert!(agent.root.is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colliding_pattern_gets_a_warning_naming_the_other_claim() {
    let (cluster, agent) = node_a().await;
    // "k8s/team/web" both ways: claim web of namespace team in the first class, claim web of
    // namespace k8s labelled tier=team in the second.
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        patterned_class("first", "Retain", "k8s/{namespace}/{claim}"),
        patterned_class("second", "Retain", "{namespace}/{label:tier}/{claim}")
    ));
    cluster.create_namespace("team").await;
    cluster.create_namespace("k8s").await;
    cluster.kubectl_apply_yaml(&claim_yaml("team", "web", "first", "1Gi", Some("node-a")));
    let first = cluster.hostvol_pv_of_claim("team", "web", T).await;
    assert_eq!(relative(&agent, &first), "k8s/team/web");
    let dir = PathBuf::from(pv_host_path(&first));
    std::fs::write(dir.join("data"), "first").unwrap();

    cluster.kubectl_apply_yaml(&labelled_claim("k8s", "web", "second", &[("tier", "team")]));
    let warning = cluster
        .wait_event("k8s", "web", "ProvisioningFailed", T)
        .await;
    assert_eq!(warning.0, "Warning");
    assert!(
        warning.2.contains("team/web") && warning.2.contains(&first.name_any()),
        "the Warning names the other claim and its PV: {warning:?}"
    );
    assert!(
        warning.2.contains("directoryPattern"),
        "and says what to change: {warning:?}"
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "k8s");
    let second = claims.get("web").await.unwrap();
    assert!(
        second.spec.unwrap().volume_name.is_none(),
        "no volume for the colliding claim"
    );
    assert_eq!(std::fs::read_to_string(dir.join("data")).unwrap(), "first");
    assert_eq!(mark_of(&dir), Some(first.name_any()));

    // Retained data: the claim deleted (Retain keeps its volume) and made again maps to the same
    // path, which still holds the old volume: refused, naming the PV that holds it.
    delete_claim(&cluster, "team", "web").await;
    cluster
        .wait_pv_phase(&first.name_any(), "Released", T)
        .await;
    cluster.kubectl_apply_yaml(&claim_yaml("team", "web", "first", "1Gi", Some("node-a")));
    let warning = warning_mentioning(&cluster, "team", "web", &first.name_any()).await;
    assert!(warning.contains("exists already"), "{warning}");
    assert_eq!(std::fs::read_to_string(dir.join("data")).unwrap(), "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pattern_leaves_existing_volumes_where_they_are() {
    let (cluster, agent) = node_a().await;
    cluster.kubectl_apply_yaml(&patterned_class("moving", "Delete", "{namespace}/{claim}"));
    cluster.create_namespace("apps").await;
    cluster.kubectl_apply_yaml(&claim_yaml("apps", "old", "moving", "1Gi", Some("node-a")));
    let old = cluster.hostvol_pv_of_claim("apps", "old", T).await;
    assert_eq!(relative(&agent, &old), "apps/old");
    let old_dir = PathBuf::from(pv_host_path(&old));
    std::fs::write(old_dir.join("data"), "old").unwrap();

    // Class parameters are immutable: a new pattern means the class made again under its name.
    cluster.kubectl_ok(&["delete", "storageclass", "moving"]);
    cluster.kubectl_apply_yaml(&patterned_class(
        "moving",
        "Delete",
        "volumes/{namespace}_{claim}",
    ));
    cluster.kubectl_apply_yaml(&claim_yaml("apps", "new", "moving", "1Gi", Some("node-a")));
    let new = cluster.hostvol_pv_of_claim("apps", "new", T).await;
    assert_eq!(relative(&agent, &new), "volumes/apps_new");
    assert_eq!(
        std::fs::read_to_string(old_dir.join("data")).unwrap(),
        "old",
        "the existing volume did not move"
    );
    assert!(!agent.root.join("volumes/apps_old").exists());

    // It is still deleted where it is.
    delete_claim(&cluster, "apps", "old").await;
    wait_pv_gone(&cluster, &old.name_any()).await;
    assert!(!old_dir.exists() && !agent.root.join("apps").exists());
    assert!(PathBuf::from(pv_host_path(&new)).is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_made_pv_pointing_at_a_patterned_directory_is_left_alone() {
    let (cluster, _agent) = node_a().await;
    cluster.kubectl_apply_yaml(&patterned_class("nested", "Delete", "{namespace}/{claim}"));
    cluster.create_namespace("iso").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "iso",
        "victim",
        "nested",
        "1Gi",
        Some("node-a"),
    ));
    let victim = cluster.hostvol_pv_of_claim("iso", "victim", T).await;
    let dir = PathBuf::from(pv_host_path(&victim));
    std::fs::write(dir.join("data"), "victim's").unwrap();

    // Someone with PV-create rights makes a PV as hostvol would, for this node, reclaim Delete,
    // bound to a claim that does not exist (so it is Released at once), at the victim's directory.
    let forged = "pvc-00000000-0000-4000-8000-000000000001";
    cluster.kubectl_apply_yaml(&format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {forged}\n  labels:\n    hostvol.io/node: node-a\n  \
         annotations:\n    pv.kubernetes.io/provisioned-by: {PROVISIONER}\n    hostvol.io/node: node-a\nspec:\n  \
         capacity:\n    storage: 1Gi\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Delete\n  \
         storageClassName: nested\n  hostPath:\n    path: {path}\n    type: Directory\n  nodeAffinity:\n    required:\n      \
         nodeSelectorTerms:\n      - matchExpressions:\n        - key: kubernetes.io/hostname\n          operator: In\n          \
         values: [node-a]\n  claimRef:\n    namespace: iso\n    name: ghost\n    uid: 00000000-0000-4000-8000-000000000002\n",
        path = dir.display()
    ));
    cluster.wait_pv_phase(forged, "Released", T).await;
    cluster
        .wait_for(
            || async {
                cluster_scoped_events(&cluster, forged)
                    .await
                    .iter()
                    .any(|e| {
                        e.1 == "VolumeFailedDelete" && e.2.contains("not this volume's directory")
                    })
            },
            T,
            &format!("a VolumeFailedDelete Warning on PV {forged}"),
        )
        .await;
    assert_eq!(
        std::fs::read_to_string(dir.join("data")).unwrap(),
        "victim's",
        "the victim's data is intact"
    );
    assert_eq!(mark_of(&dir), Some(victim.name_any()));
    let volumes: Api<PersistentVolume> = Api::all(cluster.client());
    assert!(
        volumes.get_opt(forged).await.unwrap().is_some(),
        "the forged PV is kept (with the Warning), not released as if its directory were removed"
    );
}

/// The message of the first Warning on claim ns/claim that contains `words`.
async fn warning_mentioning(cluster: &Cluster, ns: &str, claim: &str, words: &str) -> String {
    let found = std::sync::Mutex::new(String::new());
    cluster
        .wait_for(
            || async {
                let events = cluster.pvc_events(ns, claim).await;
                match events
                    .iter()
                    .find(|e| e.0 == "Warning" && e.2.contains(words))
                {
                    Some(e) => {
                        *found.lock().unwrap() = e.2.clone();
                        true
                    }
                    None => false,
                }
            },
            T,
            &format!("a Warning on claim {ns}/{claim} mentioning {words}"),
        )
        .await;
    found.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patterned_volume_on_btrfs_gets_and_grows_its_own_limit() {
    use common::loop_btrfs::{IMAGE_BYTES, LoopBtrfs, Quotas, preflight};
    preflight();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let fs = LoopBtrfs::create_sized(&cluster.dir().join("node-a-root"), Quotas::On, IMAGE_BYTES);
    let agent = cluster.start_agent("node-a", &[]).await;
    assert_eq!(agent.root, fs.mnt(), "the agent's root is the btrfs");
    cluster.kubectl_apply_yaml(&format!(
        "{}allowVolumeExpansion: true\n",
        patterned_class("quota", "Delete", "{namespace}/{claim}")
    ));
    cluster.create_namespace("sized").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "sized",
        "data",
        "quota",
        "10Mi",
        Some("node-a"),
    ));
    let pv = cluster.hostvol_pv_of_claim("sized", "data", T).await;
    assert_eq!(relative(&agent, &pv), "sized/data");
    let dir = PathBuf::from(pv_host_path(&pv));
    let id = fs.subvolume_id(&dir);
    let limit = || fs.qgroup(id).and_then(|q| q.max_referenced);
    assert_eq!(limit(), Some(10 * MIB as u64), "{}", fs.qgroup_table());
    assert_eq!(mark_of(&dir), Some(pv.name_any()));

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "sized");
    let grow = serde_json::json!({"spec": {"resources": {"requests": {"storage": "30Mi"}}}});
    claims
        .patch(
            "data",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&grow),
        )
        .await
        .unwrap();
    cluster
        .wait_event("sized", "data", "VolumeResizeSuccessful", T)
        .await;
    assert_eq!(limit(), Some(30 * MIB as u64), "{}", fs.qgroup_table());

    // A clone into the patterned class is a snapshot of the source, with its own mark and limit.
    std::fs::write(dir.join("data"), "snapshotted").unwrap();
    cluster.kubectl_apply_yaml(&clone_claim("sized", "copy", "quota", "40Mi", "data"));
    let copy = cluster.hostvol_pv_of_claim("sized", "copy", T).await;
    assert_eq!(relative(&agent, &copy), "sized/copy");
    let copy_dir = PathBuf::from(pv_host_path(&copy));
    let copy_id = fs.subvolume_id(&copy_dir);
    assert_ne!(copy_id, id, "a subvolume of its own");
    let (source_uuid, _) = fs.subvolume_uuids(&dir);
    assert_eq!(
        fs.subvolume_uuids(&copy_dir).1.as_deref(),
        Some(source_uuid.as_str()),
        "the clone is a snapshot of its source"
    );
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("data")).unwrap(),
        "snapshotted"
    );
    assert_eq!(mark_of(&copy_dir), Some(copy.name_any()));
    assert_eq!(mark_of(&dir), Some(pv.name_any()));
    assert_eq!(
        fs.qgroup(copy_id).and_then(|q| q.max_referenced),
        Some(40 * MIB as u64),
        "{}",
        fs.qgroup_table()
    );
    assert_eq!(
        common::dirs_in(&agent.root.join("sized")),
        ["copy", "data"].map(String::from).into()
    );

    delete_claim(&cluster, "sized", "copy").await;
    wait_pv_gone(&cluster, &copy.name_any()).await;
    delete_claim(&cluster, "sized", "data").await;
    wait_pv_gone(&cluster, &pv.name_any()).await;
    assert!(!dir.exists() && !agent.root.join("sized").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_into_a_patterned_class_from_flat_and_patterned_volumes() {
    let (cluster, agent) = node_a().await;
    cluster.kubectl_apply_yaml(&class_yaml("copies", "WaitForFirstConsumer", "Delete", &[]));
    cluster.create_namespace("cl").await;
    cluster.kubectl_apply_yaml(&claim_yaml("cl", "flat", "copies", "10Mi", Some("node-a")));
    let flat = cluster.hostvol_pv_of_claim("cl", "flat", T).await;
    assert!(!relative(&agent, &flat).contains('/'), "a flat volume");
    let flat_dir = PathBuf::from(pv_host_path(&flat));
    std::fs::create_dir(flat_dir.join("sub")).unwrap();
    std::fs::write(flat_dir.join("sub/data"), "from the flat volume").unwrap();

    // A clone stays in its source's class: the class made again with a pattern (parameters are
    // immutable), its flat volume stays where it is.
    cluster.kubectl_ok(&["delete", "storageclass", "copies"]);
    cluster.kubectl_apply_yaml(&patterned_class("copies", "Delete", "{namespace}/{claim}"));
    // (a) From the flat volume.
    cluster.kubectl_apply_yaml(&clone_claim("cl", "from-flat", "copies", "10Mi", "flat"));
    let a = cluster.hostvol_pv_of_claim("cl", "from-flat", T).await;
    assert_eq!(relative(&agent, &a), "cl/from-flat");
    let a_dir = PathBuf::from(pv_host_path(&a));
    assert_eq!(
        std::fs::read_to_string(a_dir.join("sub/data")).unwrap(),
        "from the flat volume"
    );
    assert_eq!(mark_of(&a_dir), Some(a.name_any()));
    std::fs::write(a_dir.join("added"), "in the first clone").unwrap();

    // (b) From that patterned volume.
    cluster.kubectl_apply_yaml(&clone_claim(
        "cl",
        "from-patterned",
        "copies",
        "10Mi",
        "from-flat",
    ));
    let b = cluster.hostvol_pv_of_claim("cl", "from-patterned", T).await;
    assert_eq!(relative(&agent, &b), "cl/from-patterned");
    let b_dir = PathBuf::from(pv_host_path(&b));
    for (file, contents) in [
        ("sub/data", "from the flat volume"),
        ("added", "in the first clone"),
    ] {
        assert_eq!(std::fs::read_to_string(b_dir.join(file)).unwrap(), contents);
    }
    assert_eq!(mark_of(&b_dir), Some(b.name_any()));
    assert_eq!(
        mark_of(&a_dir),
        Some(a.name_any()),
        "the source keeps its mark"
    );
    assert_eq!(
        common::dirs_in(&agent.root.join("cl")),
        ["from-flat", "from-patterned"].map(String::from).into(),
        "no staging directory is left"
    );
    for claim in ["from-flat", "from-patterned"] {
        let warnings: Vec<_> = cluster
            .pvc_events("cl", claim)
            .await
            .into_iter()
            .filter(|e| e.0 == "Warning")
            .collect();
        assert!(warnings.is_empty(), "{claim}: {warnings:?}");
    }
}
