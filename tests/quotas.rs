//! End-to-end scenarios of issue #9, enforced sizes: a real `hostvol agent` whose data root is a
//! real btrfs (a sparse file on a loop device, made and mounted by each test) against the e2e control
//! plane.
//!
//! 1. With quotas on, each volume is a subvolume whose qgroup limit is the claim's request: a
//!    non-root writer is stopped with "Disk quota exceeded" near the claim's size.
//! 2. Reclaim Delete destroys the subvolume, and its qgroup goes away too.
//! 3. A provisioning pass interrupted between "subvolume made" and "limit set" is finished by the next
//!    one: the same subvolume is reused and gets its limit.
//! 4. Quota mode `required` on roots that cannot enforce (btrfs without `btrfs quota enable`; a plain
//!    directory on the host's filesystem, from the ConfigMap): zero published capacity, and a claim
//!    placed there gets a Warning saying what to enable and is handed back; nothing is made.
//!
//! Needs root (loop devices, mount) and btrfs-progs (`mkfs.btrfs`, `btrfs`), which
//! `scripts/test.sh` installs; the tests fail, never skip, without them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::loop_btrfs::*;
use common::{
    Agent, Cluster, claim_yaml, claim_yaml_with, class_yaml, dirs_in, fmt_events, hostvol_pvs,
    pv_host_path, pv_volume_type, typed_class_yaml,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

/// Upper bound for each wait; every scenario finishes well within a minute.
const T: Duration = Duration::from_secs(45);
const ANN_QUOTA: &str = "hostvol.io/quota";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NOBODY: u32 = 65534;
/// The claims' request, and so the limit their volumes must get.
const CLAIM_SIZE: &str = "10Mi";
const CLAIM_BYTES: u64 = 10 * MIB;

// ================================================================================================
// Scenarios
// ================================================================================================

/// Scenario 1: quotas on (mode auto): the volume is a subvolume with a qgroup limit of the claim's
/// request, recorded on the PV, and a non-root writer cannot go past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_limits_are_enforced() {
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, IMAGE_BYTES).await;
    let agent = start_agent_on(&cluster, "node-a", &fs, &["--quota-mode", "auto"]).await;
    check_enforcement_logged(&agent, "btrfs-qgroup");
    // A `local` class: the limit does not depend on the type (the other btrfs scenarios use
    // hostPath); what the kubelet would report for a local PV here is checked below.
    cluster.kubectl_apply_yaml(&typed_class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        "local",
        &[],
    ));
    cluster.create_namespace("quota").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "quota",
        "data",
        "hostvol-quota",
        CLAIM_SIZE,
        Some("node-a"),
    ));

    let pv = cluster.hostvol_pv_of_claim("quota", "data", T).await;
    assert_eq!(pv_volume_type(&pv), "local");
    let id = qgroup_annotation(&pv);
    let dir = volume_dir(&fs, &pv);
    let meta = std::fs::metadata(&dir).unwrap_or_else(|e| {
        panic!(
            "volume directory {} of PV {}: {e}",
            dir.display(),
            pv.name_any()
        )
    });
    assert_eq!(
        meta.ino(),
        256,
        "volume {} is not a btrfs subvolume (a subvolume's root directory is inode 256)",
        dir.display()
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o777,
        "volume {} has the class's default mode 0777",
        dir.display()
    );
    assert_eq!(
        fs.subvolume_id(&dir),
        id,
        "the PV's {ANN_QUOTA} annotation names the volume's own subvolume"
    );
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(CLAIM_BYTES),
        "qgroup 0/{id} is limited to the claim's {CLAIM_SIZE}\n{}",
        fs.qgroup_table()
    );

    // The kubelet's figures for a local PV come from statfs, which on btrfs describes the whole
    // filesystem, not the subvolume's qgroup: capacity_bytes is the filesystem's size.
    let (in_volume, filesystem) = (
        nix::sys::statfs::statfs(&dir).unwrap(),
        nix::sys::statfs::statfs(fs.mnt()).unwrap(),
    );
    let figures = |st: &nix::sys::statfs::Statfs| {
        let bsize = st.block_size() as u64;
        (
            st.blocks() * bsize,
            (st.blocks() - st.blocks_free()) * bsize,
        )
    };
    let ((capacity, used), (fs_size, fs_used)) = (figures(&in_volume), figures(&filesystem));
    eprintln!(
        "[quotas] statfs in a {CLAIM_SIZE} btrfs volume: capacity {capacity} bytes, used {used} bytes; \
         the filesystem: {fs_size} bytes, {fs_used} used"
    );
    assert_eq!(
        capacity, fs_size,
        "statfs in a subvolume reports the filesystem's size"
    );
    assert!(
        capacity > CLAIM_BYTES,
        "not the qgroup limit {CLAIM_BYTES}: {capacity}"
    );

    // A non-root writer (as a pod's user would be) is stopped at the limit.
    let (ok, stderr) = write_as_nobody(&dir, "f", 20);
    let written = std::fs::metadata(dir.join("f"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "[quotas] 20 MiB into a {CLAIM_SIZE} volume: wrote {written} bytes; dd: {}",
        stderr.trim()
    );
    assert!(
        !ok,
        "writing 20 MiB into a {CLAIM_SIZE} volume succeeded ({written} bytes written): the limit is not enforced"
    );
    assert!(
        stderr.contains("Disk quota exceeded"),
        "the writer must fail with EDQUOT (Disk quota exceeded); dd said: {stderr}"
    );
    assert!(
        (5 * MIB..=11 * MIB).contains(&written),
        "the writer got {:.2} MiB into a {CLAIM_SIZE} volume (expected between 5 and 11 MiB)",
        written as f64 / MIB as f64
    );
    eprintln!(
        "[quotas] btrfs_limits_are_enforced took {:.1?}",
        started.elapsed()
    );
}

/// Scenario 2: reclaim Delete destroys the subvolume, and its qgroup disappears shortly after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_delete_removes_subvolume_and_qgroup() {
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, IMAGE_BYTES).await;
    let _agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-scratch",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("scratch").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "scratch",
        "tmp",
        "hostvol-scratch",
        CLAIM_SIZE,
        Some("node-a"),
    ));

    let pv = cluster.hostvol_pv_of_claim("scratch", "tmp", T).await;
    let id = qgroup_annotation(&pv);
    let dir = volume_dir(&fs, &pv);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        fs.qgroup(id).is_some(),
        "qgroup 0/{id} exists while the volume does\n{}",
        fs.qgroup_table()
    );
    // Some data, so there is something for the cleaner to drop.
    std::fs::write(dir.join("data"), vec![7u8; 2 * MIB as usize]).unwrap();
    assert!(
        fs.subvolumes().contains(&name),
        "{name} listed as a subvolume"
    );

    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "scratch",
        "pvc",
        "tmp",
        "--wait=true",
        "--timeout=40s",
    ]);
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    cluster
        .wait_for(
            || async { pvs.get_opt(&pv.name_any()).await.unwrap().is_none() },
            T,
            &format!(
                "PV {} removed after its claim was deleted (reclaim Delete)",
                pv.name_any()
            ),
        )
        .await;
    let deleted = Instant::now();
    assert!(
        !dir.exists(),
        "the volume directory {} is gone once its PV is",
        dir.display()
    );
    assert!(
        !fs.subvolumes().contains(&name),
        "subvolume {name} still listed by `btrfs subvolume list`"
    );
    let gone = common::poll_until(
        || async { fs.qgroup(id).is_none() },
        Duration::from_secs(10),
    )
    .await;
    assert!(
        gone.is_ok(),
        "qgroup 0/{id} still listed 10 s after its volume was deleted:\n{}",
        fs.qgroup_table()
    );
    eprintln!(
        "[quotas] qgroup 0/{id} gone {:.1?} after the PV; test took {:.1?}",
        deleted.elapsed(),
        started.elapsed()
    );
}

/// Scenario 3: a crash between "subvolume made" and "limit set" (the subvolume exists, without a
/// limit, before the agent starts): the agent reuses that subvolume and sets its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_provisioning_gets_its_limit() {
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, IMAGE_BYTES).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.create_namespace("crash").await;
    // The claim first, with no agent running, to learn its uid (and so the volume's name).
    cluster.kubectl_apply_yaml(&claim_yaml(
        "crash",
        "half",
        "hostvol-quota",
        CLAIM_SIZE,
        Some("node-a"),
    ));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "crash");
    let uid = claims.get("half").await.unwrap().uid().expect("claim uid");
    let name = format!("pvc-{uid}_crash_half");

    // What the interrupted pass left behind: the subvolume, without a limit (and a file in it).
    let half = fs.mnt().join(&name);
    run(Command::new(tool("btrfs"))
        .args(["subvolume", "create"])
        .arg(&half));
    std::fs::write(half.join("marker"), "from before the crash").unwrap();
    let id = fs.subvolume_id(&half);
    assert_eq!(
        fs.qgroup(id).map(|q| q.max_referenced),
        Some(None),
        "precondition: qgroup 0/{id} exists without a limit\n{}",
        fs.qgroup_table()
    );

    let _agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    let pv = cluster.hostvol_pv_of_claim("crash", "half", T).await;
    let dir = volume_dir(&fs, &pv);
    assert_eq!(
        dir, half,
        "the PV points at the subvolume the interrupted pass made"
    );
    assert_eq!(
        dirs_in(fs.mnt()).into_iter().collect::<Vec<_>>(),
        vec![name.clone()],
        "no second volume made"
    );
    assert_eq!(
        std::fs::read_to_string(half.join("marker")).ok().as_deref(),
        Some("from before the crash"),
        "the subvolume was reused, not replaced"
    );
    let meta = std::fs::metadata(&half).unwrap();
    assert_eq!(meta.ino(), 256, "{} is still a subvolume", half.display());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o777,
        "the reused subvolume got the class's mode (it was made 0755)"
    );
    assert_eq!(
        qgroup_annotation(&pv),
        id,
        "the PV's {ANN_QUOTA} annotation names the reused subvolume"
    );
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(CLAIM_BYTES),
        "the reused subvolume's qgroup 0/{id} got the claim's {CLAIM_SIZE} limit\n{}",
        fs.qgroup_table()
    );
    eprintln!(
        "[quotas] interrupted_provisioning_gets_its_limit took {:.1?}",
        started.elapsed()
    );
}

/// Scenario 4: quota mode `required` on roots that cannot enforce sizes: a btrfs without quotas (mode
/// from the flag) and a plain directory on the host's filesystem (mode from the ConfigMap). Both
/// publish zero capacity; a claim placed on either gets a Warning saying why and what to enable, is
/// handed back, and nothing is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mode_without_quotas_refuses() {
    let started = Instant::now();
    preflight();
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-quota",
        "WaitForFirstConsumer",
        "Retain",
        &[],
    ));
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    let fs = LoopBtrfs::create(&agent_root(&cluster, "node-a"), Quotas::Off);
    let plain = cluster.dir().join("node-b-plain");
    std::fs::create_dir_all(&plain).unwrap();
    cluster.kubectl_apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hostvol-config\n  namespace: hostvol-system\ndata:\n  \
         config.yaml: |\n    nodes:\n      node-b:\n        roots:\n          default: {{path: {}, quota: required}}\n",
        plain.display()
    ));
    let agent_a = start_agent_on(&cluster, "node-a", &fs, &["--quota-mode", "required"]).await;
    let _agent_b = cluster.start_agent("node-b", &[]).await;

    // Neither node offers room for the class.
    for node in ["node-a", "node-b"] {
        let capacity = published_capacity(&cluster, node, "hostvol-quota").await;
        assert_eq!(
            capacity.parse::<u64>().ok(),
            Some(0),
            "node {node} has quota mode required without quotas: it must publish capacity 0, not {capacity:?}"
        );
    }

    cluster.create_namespace("strict").await;
    cluster.kubectl_apply_yaml(&format!(
        "{}---\n{}",
        claim_yaml(
            "strict",
            "on-btrfs",
            "hostvol-quota",
            CLAIM_SIZE,
            Some("node-a")
        ),
        claim_yaml(
            "strict",
            "on-plain",
            "hostvol-quota",
            CLAIM_SIZE,
            Some("node-b")
        )
    ));
    for (claim, node, hint) in [
        ("on-btrfs", "node-a", "btrfs quota enable"),
        ("on-plain", "node-b", "prjquota"),
    ] {
        let (kind, _, message) = cluster
            .wait_event("strict", claim, "ProvisioningFailed", T)
            .await;
        eprintln!("[quotas] {claim} on {node}: {kind} ProvisioningFailed: {message}");
        assert_eq!(
            kind, "Warning",
            "ProvisioningFailed is a Warning: {message}"
        );
        assert!(
            message.contains(node) && message.contains("quota mode required"),
            "the Warning names the node and the quota mode: {message}"
        );
        assert!(
            message.contains(hint),
            "the Warning tells the administrator what to enable ({hint:?}): {message}"
        );
        cluster
            .wait_event("strict", claim, "ProvisioningReschedule", T)
            .await;
    }

    // Handed back: no node chosen any more, no PV, nothing on disk.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "strict");
    for claim in ["on-btrfs", "on-plain"] {
        let pvc = claims.get(claim).await.unwrap();
        assert!(
            !pvc.annotations()
                .contains_key("volume.kubernetes.io/selected-node"),
            "{claim} was handed back to the scheduler (selected-node removed): {:?}\n{}",
            pvc.annotations(),
            fmt_events(&cluster.pvc_events("strict", claim).await)
        );
        assert!(
            pvc.spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .is_none(),
            "{claim} must stay unbound"
        );
    }
    let pvs = hostvol_pvs(&cluster).await;
    assert!(
        pvs.is_empty(),
        "no PV may be made on roots that refuse: {:?}",
        pvs.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    assert!(
        dirs_in(fs.mnt()).is_empty(),
        "nothing made on node-a's btrfs: {:?}",
        dirs_in(fs.mnt())
    );
    assert!(
        dirs_in(&plain).is_empty(),
        "nothing made in node-b's plain directory: {:?}",
        dirs_in(&plain)
    );
    assert!(
        dirs_in(&agent_a.root).is_empty(),
        "nothing made in node-a's root"
    );
    eprintln!(
        "[quotas] required_mode_without_quotas_refuses took {:.1?}",
        started.elapsed()
    );
}

/// Scenario 5: online expansion on a quota root: growing a bound claim raises its volume's qgroup
/// limit along with the PV's capacity and the claim's status, and the writer gets the extra room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_expansion_raises_the_limit() {
    expansion_scenario(Crash::No).await;
}

/// Scenario 5, with the agent killed (SIGKILL) right after the claim grew, before or while it
/// resizes: restarted, it finishes the resize and ends consistent (PV, limit, claim status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_expansion_survives_an_agent_crash() {
    expansion_scenario(Crash::RightAfterTheClaimGrows).await;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    No,
    RightAfterTheClaimGrows,
}

async fn expansion_scenario(crash: Crash) {
    const GROWN: &str = "30Mi";
    const GROWN_BYTES: u64 = 30 * MIB;
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, IMAGE_BYTES).await;
    let mut agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    cluster.kubectl_apply_yaml(&format!(
        "{}allowVolumeExpansion: true\n",
        class_yaml("hostvol-grow", "WaitForFirstConsumer", "Delete", &[])
    ));
    cluster.create_namespace("grow").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "grow",
        "data",
        "hostvol-grow",
        CLAIM_SIZE,
        Some("node-a"),
    ));
    let pv = cluster.hostvol_pv_of_claim("grow", "data", T).await;
    let pv_name = pv.name_any();
    let id = qgroup_annotation(&pv);
    let dir = volume_dir(&fs, &pv);
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(CLAIM_BYTES),
        "qgroup 0/{id} starts with the claim's {CLAIM_SIZE}\n{}",
        fs.qgroup_table()
    );

    // Full at the original size.
    let first = write_until_full(&dir, "first", 20);
    assert!(
        (5 * MIB..=11 * MIB).contains(&first),
        "the writer got {} into a {CLAIM_SIZE} volume (expected between 5 and 11 MiB)",
        mib(first)
    );

    // Grow the claim; in the crash variant the agent dies at once, mid-way or before it looked.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "grow");
    claims
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"spec": {"resources": {"requests": {"storage": GROWN}}}}),
            ),
        )
        .await
        .unwrap();
    if crash == Crash::RightAfterTheClaimGrows {
        agent.kill();
        eprintln!(
            "[quotas] agent killed right after the claim grew; state then: PV {:?}, limit {:?}, \
             status {:?}, events {:?}",
            pv_capacity(&cluster, &pv_name).await,
            fs.qgroup(id).and_then(|q| q.max_referenced),
            claim_status_capacity(&claims, "data").await,
            cluster
                .pvc_events("grow", "data")
                .await
                .into_iter()
                .map(|e| e.1)
                .collect::<Vec<_>>()
        );
        agent.restart().await;
    }
    let (kind, _, message) = cluster
        .wait_event("grow", "data", "VolumeResizeSuccessful", T)
        .await;
    assert_eq!(kind, "Normal", "VolumeResizeSuccessful: {message}");
    let events = cluster.pvc_events("grow", "data").await;
    assert!(
        events.iter().any(|e| e.1 == "Resizing"),
        "a Resizing Event precedes the success\n{}",
        fmt_events(&events)
    );
    assert!(
        !events.iter().any(|e| e.1 == "VolumeResizeFailed"),
        "no VolumeResizeFailed on the way ({crash:?})\n{}",
        fmt_events(&events)
    );
    assert_grown_consistently(&cluster, &fs, &claims, &pv_name, id, GROWN, GROWN_BYTES).await;
    if crash == Crash::RightAfterTheClaimGrows {
        // The restarted agent's periodic limit pass and any late retry must not undo it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_grown_consistently(&cluster, &fs, &claims, &pv_name, id, GROWN, GROWN_BYTES).await;
        assert!(agent.is_running(), "the restarted agent is still running");
    }

    // The writer gets the extra room, and is stopped again at the new size.
    let second = write_until_full(&dir, "second", 40);
    let total = first + second;
    eprintln!(
        "[quotas] after growing to {GROWN}: {} more ({} in all); qgroup: {:?}",
        mib(second),
        mib(total),
        fs.qgroup(id)
    );
    assert!(
        (15 * MIB..=21 * MIB).contains(&second),
        "after growing {CLAIM_SIZE} -> {GROWN} the writer got {} more (expected about 20 MiB)",
        mib(second)
    );
    assert!(
        (25 * MIB..=31 * MIB).contains(&total),
        "the writer holds {} in a {GROWN} volume (expected between 25 and 31 MiB)",
        mib(total)
    );
    eprintln!(
        "[quotas] btrfs expansion ({crash:?}) took {:.1?}",
        started.elapsed()
    );
}

/// PV capacity, claim status.capacity and qgroup limit all say `size`.
async fn assert_grown_consistently(
    cluster: &Cluster,
    fs: &LoopBtrfs,
    claims: &Api<PersistentVolumeClaim>,
    pv_name: &str,
    id: u64,
    size: &str,
    bytes: u64,
) {
    assert_eq!(
        pv_capacity(cluster, pv_name).await,
        size,
        "PV {pv_name}'s capacity after growing"
    );
    assert_eq!(
        claim_status_capacity(claims, "data").await.as_deref(),
        Some(size),
        "the claim's status.capacity after growing"
    );
    assert_eq!(
        fs.qgroup(id).and_then(|q| q.max_referenced),
        Some(bytes),
        "qgroup 0/{id} raised to {size}\n{}",
        fs.qgroup_table()
    );
    assert_eq!(
        sysfs_max_referenced(fs, id),
        Some(bytes),
        "the kernel's own figure (sysfs) for qgroup 0/{id}"
    );
}

/// Scenario 6: a clone on a quota root is a btrfs snapshot of its source, a subvolume of its own
/// with its own qgroup and the clone's limit; the source is untouched. A clone smaller than its
/// source is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_clone_is_a_snapshot_with_its_own_limit() {
    const CLONE_SIZE: &str = "20Mi";
    const CLONE_BYTES: u64 = 20 * MIB;
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, IMAGE_BYTES).await;
    let _agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-clone",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("cl").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "cl",
        "source",
        "hostvol-clone",
        CLAIM_SIZE,
        Some("node-a"),
    ));
    let source_pv = cluster.hostvol_pv_of_claim("cl", "source", T).await;
    let source_id = qgroup_annotation(&source_pv);
    let source_dir = volume_dir(&fs, &source_pv);
    // The source's data, written by root from the host.
    let big: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("index.html", b"hello from the source\n".to_vec()),
        ("sub/big.bin", big),
        ("sub/deeper/note.txt", b"nested\n".to_vec()),
    ];
    for (name, contents) in &files {
        let path = source_dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
    }
    let source_before = fs.qgroup(source_id).expect("the source's qgroup");
    let source_names_before = dirs_in(&source_dir);

    let clone_yaml = |name: &str, size: &str| {
        claim_yaml_with(
            "cl",
            name,
            "hostvol-clone",
            size,
            Some("node-a"),
            "  dataSource:\n    kind: PersistentVolumeClaim\n    name: source\n",
        )
    };
    cluster.kubectl_apply_yaml(&clone_yaml("copy", CLONE_SIZE));
    let pv = cluster.hostvol_pv_of_claim("cl", "copy", T).await;
    let dir = volume_dir(&fs, &pv);
    assert_ne!(dir, source_dir, "the clone has a directory of its own");
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        meta.ino(),
        256,
        "clone {} is a btrfs subvolume (root inode 256)",
        dir.display()
    );
    let id = fs.subvolume_id(&dir);
    assert_ne!(
        id, source_id,
        "the clone is a subvolume of its own, not its source's"
    );
    let (source_uuid, _) = fs.subvolume_uuids(&source_dir);
    let (_, parent_uuid) = fs.subvolume_uuids(&dir);
    assert_eq!(
        parent_uuid.as_deref(),
        Some(source_uuid.as_str()),
        "the clone is a snapshot of its source (its Parent UUID is the source's UUID)"
    );
    assert_eq!(
        qgroup_annotation(&pv),
        id,
        "the clone's PV records its own qgroup in {ANN_QUOTA}"
    );
    let qgroup = fs.qgroup(id);
    assert_eq!(
        qgroup.and_then(|q| q.max_referenced),
        Some(CLONE_BYTES),
        "the clone's qgroup 0/{id} is limited to the clone's {CLONE_SIZE}, not the source's {CLAIM_SIZE}\n{}",
        fs.qgroup_table()
    );
    assert_eq!(
        sysfs_max_referenced(&fs, id),
        Some(CLONE_BYTES),
        "the kernel's own figure (sysfs) for qgroup 0/{id}"
    );
    for (name, contents) in &files {
        assert!(
            std::fs::read(dir.join(name)).ok().as_ref() == Some(contents),
            "{name} in the clone is byte-identical to the source's"
        );
    }
    assert_eq!(
        dirs_in(&dir),
        source_names_before,
        "the clone holds the source's names"
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o777,
        "the clone has the class's mode"
    );

    // A non-root writer in the clone is stopped near the clone's size, counting what it inherited.
    let written = write_until_full(&dir, "fill", 40);
    let after = fs.qgroup(id).unwrap();
    eprintln!(
        "[quotas] wrote {} into the {CLONE_SIZE} clone; its qgroup: {after:?}; source before: {source_before:?}",
        mib(written)
    );
    assert!(
        (15 * MIB..=CLONE_BYTES + MIB).contains(&after.referenced),
        "the clone's qgroup references {} once full (expected near its {CLONE_SIZE})",
        mib(after.referenced)
    );
    assert!(
        (12 * MIB..=17 * MIB + MIB / 2).contains(&written),
        "the writer got {} into a {CLONE_SIZE} clone already holding ~3 MiB (expected about 16 MiB)",
        mib(written)
    );

    // The source is unchanged: data, names, limit, referenced bytes.
    for (name, contents) in &files {
        assert!(
            std::fs::read(source_dir.join(name)).ok().as_ref() == Some(contents),
            "{name} in the source is unchanged"
        );
    }
    assert_eq!(
        dirs_in(&source_dir),
        source_names_before,
        "nothing new in the source"
    );
    let source_after = fs.qgroup(source_id).unwrap();
    assert_eq!(
        source_after.max_referenced,
        Some(CLAIM_BYTES),
        "the source keeps its {CLAIM_SIZE} limit"
    );
    assert!(
        source_after.referenced.abs_diff(source_before.referenced) <= MIB / 4,
        "the source's referenced bytes did not move with the clone's writes: {source_before:?} -> {source_after:?}"
    );

    // Smaller than the source: refused, nothing made.
    cluster.kubectl_apply_yaml(&clone_yaml("small", "5Mi"));
    let (kind, _, message) = cluster
        .wait_event("cl", "small", "ProvisioningFailed", T)
        .await;
    eprintln!("[quotas] 5Mi clone of a {CLAIM_SIZE} source: {kind}: {message}");
    assert_eq!(
        kind, "Warning",
        "ProvisioningFailed is a Warning: {message}"
    );
    assert!(
        message.contains("at least"),
        "the Warning says the clone must be at least the source's size: {message}"
    );
    assert_eq!(
        hostvol_pvs(&cluster).await.len(),
        2,
        "no PV for the refused clone"
    );
    assert_eq!(
        dirs_in(fs.mnt()).len(),
        2,
        "nothing made on disk for the refused clone: {:?}",
        dirs_in(fs.mnt())
    );
    eprintln!(
        "[quotas] btrfs_clone_is_a_snapshot_with_its_own_limit took {:.1?}",
        started.elapsed()
    );
}

/// Where `btrfs_delete_survives_an_agent_crash` kills the agent, counted from the claim's deletion.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// This long after the API server accepted the claim's deletion.
    After(Duration),
    /// As soon as the claim is gone from the API (its PV about to be released).
    ClaimGone,
    /// As soon as the volume's directory is gone: the subvolume is destroyed, but its qgroup and the
    /// PV are not released yet.
    DirectoryGone,
}

/// Scenario 2 with the agent killed (SIGKILL) at several points of a Delete, one volume each: right
/// after the claim's deletion (0, 50 and 200 ms), once the claim is gone, and once the subvolume is
/// destroyed. Restarted each time, the agent finishes the job: the PV, the subvolume and its qgroup
/// are gone, and nothing else is touched (the other volumes, a plain directory in the root, and a
/// directory outside the root that each volume holds a symlink to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_delete_survives_an_agent_crash() {
    const SIZE: &str = "32Mi";
    const FILES: usize = 10_000;
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::On, GIB).await;
    let mut agent = start_agent_on(&cluster, "node-a", &fs, &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-scratch",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("crash").await;
    let kill_points = [
        ("at-0ms", KillAt::After(Duration::ZERO)),
        ("at-50ms", KillAt::After(Duration::from_millis(50))),
        ("at-200ms", KillAt::After(Duration::from_millis(200))),
        ("claim-gone", KillAt::ClaimGone),
        ("dir-gone", KillAt::DirectoryGone),
    ];
    cluster.kubectl_apply_yaml(
        &kill_points
            .iter()
            .map(|(claim, _)| claim_yaml("crash", claim, "hostvol-scratch", SIZE, Some("node-a")))
            .collect::<Vec<_>>()
            .join("---\n"),
    );

    // Bystanders: a directory outside the root (every volume links to it), a plain directory in
    // the root that is no volume.
    let outside = cluster.dir().join("outside-the-root");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), "outside the data root\n").unwrap();
    let sibling = fs.mnt().join("not-a-volume");
    std::fs::create_dir_all(sibling.join("sub")).unwrap();
    std::fs::write(sibling.join("sub/keep.txt"), "a sibling in the root\n").unwrap();
    let outside_before = tree_digest(&outside);
    let sibling_before = tree_digest(&sibling);

    // Each volume: FILES small files, 3 MiB in one file, and symlinks out of the root.
    struct Volume {
        claim: &'static str,
        pv: String,
        id: u64,
        dir: PathBuf,
        digest: BTreeMap<PathBuf, String>,
    }
    let mut volumes = Vec::new();
    let fill_started = Instant::now();
    for (claim, _) in &kill_points {
        let pv = cluster.hostvol_pv_of_claim("crash", claim, T).await;
        let id = qgroup_annotation(&pv);
        let dir = volume_dir(&fs, &pv);
        fill_volume(&dir, FILES, 3 * MIB as usize);
        std::os::unix::fs::symlink(&outside, dir.join("outside-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep.txt"), dir.join("outside-file")).unwrap();
        volumes.push(Volume {
            claim,
            pv: pv.name_any(),
            id,
            dir: dir.clone(),
            digest: tree_digest(&dir),
        });
        assert!(
            fs.qgroup(id).is_some(),
            "qgroup 0/{id} of {claim} exists while its volume does\n{}",
            fs.qgroup_table()
        );
    }
    eprintln!(
        "[quotas] {} volumes of {FILES} files + 3 MiB written in {:.1?}; qgroups: {:?}",
        volumes.len(),
        fill_started.elapsed(),
        volumes.iter().map(|v| fs.qgroup(v.id)).collect::<Vec<_>>()
    );

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "crash");
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let mut remaining: BTreeSet<String> = dirs_in(fs.mnt());
    let mut window_hit = Vec::new();
    for (i, (claim, kill_at)) in kill_points.iter().enumerate() {
        let volume = &volumes[i];
        let name = volume
            .dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            agent.is_running(),
            "the agent runs before {claim} is deleted"
        );
        let deleted = Instant::now();
        claims
            .delete(claim, &DeleteParams::default())
            .await
            .unwrap();
        match kill_at {
            KillAt::After(delay) => tokio::time::sleep(*delay).await,
            KillAt::ClaimGone => {
                spin_until(
                    || async { claims.get_opt(claim).await.unwrap().is_none() },
                    &format!("claim {claim} gone after its deletion"),
                )
                .await
            }
            KillAt::DirectoryGone => {
                spin_until(
                    || async { !volume.dir.exists() },
                    &format!(
                        "{} removed after its claim's deletion",
                        volume.dir.display()
                    ),
                )
                .await
            }
        }
        agent.kill();
        let killed_at = deleted.elapsed();
        let pv_then = pvs.get_opt(&volume.pv).await.unwrap();
        let state = format!(
            "claim {}, PV {}, directory {}, qgroup {}",
            if claims.get_opt(claim).await.unwrap().is_some() {
                "present"
            } else {
                "gone"
            },
            pv_then
                .as_ref()
                .map(|pv| pv
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default())
                .unwrap_or_else(|| "gone".into()),
            if volume.dir.exists() {
                "present"
            } else {
                "gone"
            },
            if fs.qgroup(volume.id).is_some() {
                "present"
            } else {
                "gone"
            },
        );
        eprintln!(
            "[quotas] {claim}: agent killed {killed_at:.1?} after the deletion; then: {state}"
        );
        if pv_then.is_some() && !volume.dir.exists() {
            window_hit.push(*claim);
        }
        agent.restart().await;

        cluster
            .wait_for(
                || async { pvs.get_opt(&volume.pv).await.unwrap().is_none() },
                T,
                &format!(
                    "PV {} of {claim} removed after the agent's restart (killed with: {state})",
                    volume.pv
                ),
            )
            .await;
        let pv_gone = Instant::now();
        assert!(
            !volume.dir.exists(),
            "{claim}: the volume directory {} is gone once its PV is",
            volume.dir.display()
        );
        assert!(
            !fs.subvolumes().contains(&name),
            "{claim}: subvolume {name} still listed by `btrfs subvolume list`"
        );
        let gone = common::poll_until(
            || async { fs.qgroup(volume.id).is_none() },
            Duration::from_secs(10),
        )
        .await;
        assert!(
            gone.is_ok(),
            "{claim}: qgroup 0/{} still listed 10 s after its PV was removed:\n{}",
            volume.id,
            fs.qgroup_table()
        );
        eprintln!(
            "[quotas] {claim}: PV gone {:.1?} after the deletion, qgroup 0/{} {:.1?} after that",
            pv_gone - deleted,
            volume.id,
            pv_gone.elapsed()
        );

        let events = pv_events(&cluster, &volume.pv).await;
        assert!(
            !events.iter().any(|e| e.1 == "VolumeFailedDelete"),
            "{claim}: no failed removal on the way\n{}",
            fmt_events(&events)
        );
        eprintln!(
            "[quotas] {claim}: events of PV {}:\n{}",
            volume.pv,
            fmt_events(&events)
        );

        // Nothing else touched.
        remaining.remove(&name);
        assert_eq!(
            dirs_in(fs.mnt()),
            remaining,
            "{claim}: only its own volume left the root"
        );
        for other in &volumes[i + 1..] {
            let now = tree_digest(&other.dir);
            assert!(
                now == other.digest,
                "{claim}'s deletion changed {}'s volume {}: {}",
                other.claim,
                other.dir.display(),
                digest_diff(&other.digest, &now)
            );
            assert_eq!(
                fs.qgroup(other.id).and_then(|q| q.max_referenced),
                Some(32 * MIB),
                "{claim}'s deletion left {}'s qgroup 0/{} and its limit alone",
                other.claim,
                other.id
            );
        }
        assert_tree_unchanged(
            &sibling,
            &sibling_before,
            &format!(
                "{claim}'s deletion changed the plain directory {path} in the root",
                path = sibling.display()
            ),
        );
        assert_tree_unchanged(
            &outside,
            &outside_before,
            &format!(
                "{claim}'s deletion changed {path} outside the root (the volume linked to it)",
                path = outside.display()
            ),
        );
    }
    assert!(agent.is_running(), "the agent is still running");
    eprintln!(
        "[quotas] killed between \"subvolume destroyed\" and \"PV released\" for {window_hit:?}; \
         btrfs_delete_survives_an_agent_crash took {:.1?}",
        started.elapsed()
    );
}

/// A clone on a root that copies (btrfs without quotas, mode auto: no enforcement, so volumes are
/// plain directories and a clone is a copy made in a `cloning-<name>` staging directory, then
/// renamed): the agent is killed (SIGKILL) part-way through the copy. Restarted, it drops the
/// partial copy and copies again: the clone holds exactly its source's data, no staging directory
/// is left, and the source is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_copy_survives_an_agent_crash() {
    const SIZE: &str = "64Mi";
    const FILES: usize = 20_000;
    let started = Instant::now();
    let (cluster, fs) = node_a_on_btrfs(Quotas::Off, GIB).await;
    let mut agent = start_agent_on(&cluster, "node-a", &fs, &["--quota-mode", "auto"]).await;
    cluster.kubectl_apply_yaml(&class_yaml(
        "hostvol-copy",
        "WaitForFirstConsumer",
        "Delete",
        &[],
    ));
    cluster.create_namespace("cp").await;
    cluster.kubectl_apply_yaml(&claim_yaml(
        "cp",
        "source",
        "hostvol-copy",
        SIZE,
        Some("node-a"),
    ));
    let source_pv = cluster.hostvol_pv_of_claim("cp", "source", T).await;
    let source_dir = volume_dir(&fs, &source_pv);
    assert_ne!(
        std::fs::metadata(&source_dir).unwrap().ino(),
        256,
        "without quotas a volume is a plain directory, not a subvolume (so its clones are copies)"
    );
    assert!(
        !source_pv.annotations().contains_key(ANN_QUOTA),
        "no limit recorded on a root without enforcement: {:?}",
        source_pv.annotations()
    );
    let outside = cluster.dir().join("outside-the-root");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), "outside the data root\n").unwrap();
    let outside_before = tree_digest(&outside);
    let fill_started = Instant::now();
    fill_volume(&source_dir, FILES, 8 * MIB as usize);
    for i in 0..2 {
        let big: Vec<u8> = (0..8 * MIB as usize)
            .map(|b| ((b * 7 + i * 13) % 253) as u8)
            .collect();
        std::fs::write(source_dir.join(format!("more-{i}.bin")), big).unwrap();
    }
    std::os::unix::fs::symlink(&outside, source_dir.join("outside-dir")).unwrap();
    std::fs::create_dir(source_dir.join("empty")).unwrap();
    let source_before = tree_digest(&source_dir);
    let top_level = dirs_in(&source_dir).len();
    eprintln!(
        "[quotas] source: {} entries (24 MiB in 3 files) written in {:.1?}",
        source_before.len(),
        fill_started.elapsed()
    );

    // The clone, placed on node-a; the agent dies while it copies into the staging directory.
    cluster.kubectl_apply_yaml(&claim_yaml_with(
        "cp",
        "copy",
        "hostvol-copy",
        SIZE,
        Some("node-a"),
        "  dataSource:\n    kind: PersistentVolumeClaim\n    name: source\n",
    ));
    let requested = Instant::now();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "cp");
    let uid = claims.get("copy").await.unwrap().uid().expect("claim uid");
    let target = fs.mnt().join(format!("pvc-{uid}_cp_copy"));
    let staging = fs.mnt().join(format!("cloning-pvc-{uid}_cp_copy"));
    spin_until(
        || async {
            assert!(
                !target.exists(),
                "the copy finished ({} appeared) before it could be interrupted; give the source \
                 more files",
                target.display()
            );
            // Half-way: the walk has reached half of the source's top-level directories.
            dirs_in(&staging).len() >= top_level / 2
        },
        &format!("the copy under way in {}", staging.display()),
    )
    .await;
    agent.kill();
    let killed_at = requested.elapsed();
    assert!(
        staging.is_dir() && !target.exists(),
        "killed before the rename: {:?}",
        dirs_in(fs.mnt())
    );
    let partial = tree_digest(&staging).len();
    eprintln!(
        "[quotas] agent killed {killed_at:.1?} after the clone was requested, with {partial} of {} \
         entries copied",
        source_before.len()
    );
    assert!(
        partial < source_before.len(),
        "the copy was interrupted part-way ({partial} of {} entries)",
        source_before.len()
    );

    let restarted = Instant::now();
    agent.restart().await;
    let pv = cluster.hostvol_pv_of_claim("cp", "copy", T).await;
    eprintln!(
        "[quotas] clone bound {:.1?} after the restart",
        restarted.elapsed()
    );
    let dir = volume_dir(&fs, &pv);
    assert_eq!(dir, target, "the clone's PV points at its own directory");
    let copied = tree_digest(&dir);
    assert!(
        copied == source_before,
        "the clone {} holds exactly its source's data: {}",
        dir.display(),
        digest_diff(&source_before, &copied)
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().mode() & 0o7777,
        0o777,
        "the clone has the class's mode"
    );
    let source_name = source_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let target_name = target.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        dirs_in(fs.mnt()),
        BTreeSet::from([source_name, target_name]),
        "the root holds the source and the clone only: no staging copy (cloning-*) left"
    );
    assert_tree_unchanged(
        &source_dir,
        &source_before,
        &format!(
            "the source {path} is untouched",
            path = source_dir.display()
        ),
    );
    assert_tree_unchanged(
        &outside,
        &outside_before,
        &format!(
            "{path} outside the root (the source links to it) is untouched",
            path = outside.display()
        ),
    );
    let events = cluster.pvc_events("cp", "copy").await;
    assert!(
        !events.iter().any(|e| e.0 == "Warning"),
        "no Warning on the way\n{}",
        fmt_events(&events)
    );
    assert!(agent.is_running(), "the restarted agent is still running");
    eprintln!(
        "[quotas] clone_copy_survives_an_agent_crash took {:.1?}",
        started.elapsed()
    );
}

/// Events about the (cluster-scoped) PV `name`, as (type, reason, message), oldest first.
async fn pv_events(cluster: &Cluster, name: &str) -> Vec<(String, String, String)> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(cluster.client());
    let mut list: Vec<_> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            let time = e.event_time.as_ref().map(|t| t.0.to_string()).or_else(|| {
                e.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
            });
            (
                time.unwrap_or_default(),
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                ),
            )
        })
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list.into_iter().map(|(_, e)| e).collect()
}

/// Polls `f` every 2 ms (to catch short windows) until it returns true; panics after [`T`].
async fn spin_until<F, Fut>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {T:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Writes `files` small files (a line each, naming the file) in directories of 100, and `big_bytes`
/// of a pattern in `big.bin`, into `dir`, as root from the host.
fn fill_volume(dir: &Path, files: usize, big_bytes: usize) {
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&sub).unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
        }
        let path = sub.join(format!("f{i:05}"));
        std::fs::write(&path, format!("file {i} of {}\n", dir.display()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let big: Vec<u8> = (0..big_bytes).map(|b| (b % 251) as u8).collect();
    std::fs::write(dir.join("big.bin"), big).unwrap();
}

/// Everything under `dir` (not `dir` itself), by relative path: kind, mode, owner, and a file's size
/// and content hash or a symlink's target. Symlinks are never followed.
/// Asserts the tree at `path` has the digest `before` still; `what` says what it is and why it matters.
fn assert_tree_unchanged(path: &Path, before: &BTreeMap<PathBuf, String>, what: &str) {
    let now = tree_digest(path);
    assert!(now == *before, "{what}: {}", digest_diff(before, &now));
}

fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, String> {
    use std::hash::Hasher;
    let mut out = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).unwrap_or_else(|e| panic!("{}: {e}", here.display()))
        {
            let rel = rel.join(entry.unwrap().file_name());
            let path = dir.join(&rel);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            let owner = format!("{:o} {}:{}", meta.mode() & 0o7777, meta.uid(), meta.gid());
            let what = if kind.is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&path).unwrap().display()
                )
            } else if kind.is_dir() {
                pending.push(rel.clone());
                format!("dir {owner}")
            } else if kind.is_file() {
                let mut hash = std::hash::DefaultHasher::new();
                hash.write(&std::fs::read(&path).unwrap());
                format!("file {owner} {} bytes {:016x}", meta.len(), hash.finish())
            } else {
                format!("other {:o}", meta.mode())
            };
            out.insert(rel, what);
        }
    }
    out
}

/// The first differences between two [`tree_digest`]s, for messages.
fn digest_diff(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>) -> String {
    let mut diffs: Vec<String> = before
        .iter()
        .filter(|(path, what)| after.get(*path) != Some(what))
        .map(|(path, what)| {
            format!(
                "{}: {what} -> {}",
                path.display(),
                after.get(path).map_or("missing", String::as_str)
            )
        })
        .chain(
            after
                .iter()
                .filter(|(path, _)| !before.contains_key(*path))
                .map(|(path, what)| format!("{}: new {what}", path.display())),
        )
        .collect();
    let total = diffs.len();
    diffs.truncate(10);
    format!(
        "{total} differences ({} entries before, {} after), first: {diffs:#?}",
        before.len(),
        after.len()
    )
}

// ================================================================================================
// Kubernetes objects and helpers
// ================================================================================================

/// Where the harness puts `node`'s data root (`Cluster::start_agent`); the tests mount their btrfs
/// there before starting the agent. `start_agent_on` checks the harness still agrees.
/// After `preflight`, a control plane with node-a whose data root is a fresh loop btrfs of `bytes`
/// (declared after the cluster, the filesystem is unmounted before the cluster's directory goes).
async fn node_a_on_btrfs(quotas: Quotas, bytes: u64) -> (Cluster, LoopBtrfs) {
    preflight();
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let fs = LoopBtrfs::create_sized(&agent_root(&cluster, "node-a"), quotas, bytes);
    (cluster, fs)
}

fn agent_root(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.dir().join(format!("{node}-root"))
}

async fn start_agent_on(cluster: &Cluster, node: &str, fs: &LoopBtrfs, args: &[&str]) -> Agent {
    let agent = cluster.start_agent(node, args).await;
    assert_eq!(
        agent.root,
        fs.mnt(),
        "the harness gave agent {node} a data root other than the btrfs mounted for it \
         (tests/quotas.rs assumes `<cluster dir>/<node>-root`)"
    );
    agent
}

/// The agent logs, at start, how each data root enforces sizes ("sizes enforced with <mechanism>",
/// "sizes not enforced: <why>", ...); that line must name `mechanism`.
fn check_enforcement_logged(agent: &Agent, mechanism: &str) {
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("enforce"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sizes enforced") && l.contains(mechanism)),
        "agent {} must log at start that its data root's sizes are enforced with {mechanism}; \
         its log lines about enforcement:\n{}",
        agent.node,
        if lines.is_empty() {
            "<none>".to_string()
        } else {
            lines.join("\n")
        }
    );
}

/// The volume's directory, from the PV's hostPath, in the test's mount.
fn volume_dir(fs: &LoopBtrfs, pv: &PersistentVolume) -> PathBuf {
    let dir = Path::new(pv_host_path(pv));
    assert_eq!(
        dir.parent(),
        Some(fs.mnt()),
        "PV {} points into the btrfs data root",
        pv.name_any()
    );
    dir.to_path_buf()
}

/// The subvolume id in the PV's `hostvol.io/quota: "qgroup 0/<id>"` annotation.
fn qgroup_annotation(pv: &PersistentVolume) -> u64 {
    let value = pv.annotations().get(ANN_QUOTA).unwrap_or_else(|| {
        panic!(
            "PV {} has no {ANN_QUOTA} annotation; annotations: {:?}",
            pv.name_any(),
            pv.annotations()
        )
    });
    value
        .strip_prefix("qgroup 0/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "PV {}: {ANN_QUOTA} is {value:?}, expected \"qgroup 0/<subvolume id>\"",
                pv.name_any()
            )
        })
}

/// The `capacity` of the CSIStorageCapacity that `node`'s agent publishes for `class`, once it exists.
async fn published_capacity(cluster: &Cluster, node: &str, class: &str) -> String {
    let api = cluster.csi_storage_capacities().await;
    let find = || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|o| {
                o.data.get("storageClassName").and_then(|c| c.as_str()) == Some(class)
                    && o.data
                        .pointer("/nodeTopology/matchLabels/kubernetes.io~1hostname")
                        .and_then(|n| n.as_str())
                        == Some(node)
            })
            .map(|o| match o.data.get("capacity") {
                Some(serde_json::Value::String(s)) => s.clone(),
                other => format!("{other:?}"),
            })
    };
    cluster
        .wait_for(
            || async { find().await.is_some() },
            T,
            &format!("node {node}'s CSIStorageCapacity for class {class}"),
        )
        .await;
    find().await.unwrap()
}

/// Runs `dd` as uid/gid 65534 with no supplementary groups, writing `mib` MiB of zeros to `file` in
/// `dir` (fsync'd); returns whether it succeeded and its stderr. The child enters `dir` while still
/// root, so the cluster's 0700 temp directories above it do not matter; only the volume's own mode does.
fn write_as_nobody(dir: &Path, file: &str, mib: u64) -> (bool, String) {
    let cdir = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={file}"))
        .arg("bs=1M")
        .arg(format!("count={mib}"))
        .arg("conv=fsync");
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |ret: libc::c_int| {
                if ret == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::chdir(cdir.as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
            Ok(())
        });
    }
    let out = cmd.output().expect("run dd as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The PV's `spec.capacity.storage`, as written.
async fn pv_capacity(cluster: &Cluster, name: &str) -> String {
    let pv = Api::<PersistentVolume>::all(cluster.client())
        .get(name)
        .await
        .unwrap();
    pv.spec
        .and_then(|s| s.capacity)
        .and_then(|c| c.get("storage").map(|q| q.0.clone()))
        .unwrap_or_default()
}

/// The claim's `status.capacity.storage`, as written.
async fn claim_status_capacity(claims: &Api<PersistentVolumeClaim>, name: &str) -> Option<String> {
    let pvc = claims.get(name).await.unwrap();
    Some(pvc.status?.capacity?.get("storage")?.0.clone())
}

/// Writes up to `mib` MiB as nobody into `file` in `dir`, which must fill up first: the writer must
/// be stopped with EDQUOT. Returns how many bytes it got in.
fn write_until_full(dir: &Path, file: &str, mib_count: u64) -> u64 {
    let (ok, stderr) = write_as_nobody(dir, file, mib_count);
    let written = std::fs::metadata(dir.join(file))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "[quotas] {mib_count} MiB into {}: wrote {}; dd: {}",
        dir.join(file).display(),
        mib(written),
        stderr.trim()
    );
    assert!(
        !ok,
        "writing {mib_count} MiB into {} succeeded ({written} bytes): the limit is not enforced",
        dir.display()
    );
    assert!(
        stderr.contains("Disk quota exceeded"),
        "the writer must fail with EDQUOT (Disk quota exceeded); dd said: {stderr}"
    );
    written
}

/// Bytes as MiB with two decimals, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

/// The limit of qgroup 0/`id` as the kernel shows it in sysfs
/// (`/sys/fs/btrfs/<fsid>/qgroups/0_<id>/max_referenced`); `None` if unlimited or not shown.
fn sysfs_max_referenced(fs: &LoopBtrfs, id: u64) -> Option<u64> {
    let path = Path::new("/sys/fs/btrfs")
        .join(fs.fsid())
        .join(format!("qgroups/0_{id}/max_referenced"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match text.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(_) => panic!("{}: {text:?}", path.display()),
    }
}
