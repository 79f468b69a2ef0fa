//! End-to-end scenarios of issue #2 on a real control plane with real `hostvol agent` processes.
//! Run `scripts/setup-control-plane.sh` first (the README's test command does).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{
    Agent, Cluster, claim_yaml, claim_yaml_with, class_yaml, dirs_in, fmt_events, hostvol_pvs,
    metric_value, pv_claim, pv_dir_name,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

const T: Duration = Duration::from_secs(90);

/// The shipped StorageClass, optionally made the cluster default.
fn apply_shipped_class(cluster: &Cluster, default: bool) {
    cluster.apply_repo_manifest("deploy/storageclass.yaml");
    if default {
        cluster.kubectl_ok(&[
            "annotate",
            "--overwrite",
            "storageclass",
            "hostvol",
            "storageclass.kubernetes.io/is-default-class=true",
        ]);
    }
}

fn pv_node(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required
        .as_ref()
        .unwrap()
        .node_selector_terms[0]
        .match_expressions
        .as_ref()
        .unwrap()[0]
        .values
        .as_ref()
        .unwrap()[0]
        .clone()
}

async fn two_node_cluster() -> (Cluster, Agent, Agent) {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    cluster.add_node("node-b").await;
    let a = cluster.start_agent("node-a", &[]).await;
    let b = cluster.start_agent("node-b", &[]).await;
    (cluster, a, b)
}

/// Scenario 1: the StatefulSet walkthrough, with hostvol as the default class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_walkthrough() {
    let (cluster, a, b) = two_node_cluster().await;
    apply_shipped_class(&cluster, true);
    cluster.create_namespace("web").await;
    // The example names class hostvol explicitly; drop that line so the default class is what picks hostvol.
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/statefulset.yaml"),
    )
    .unwrap();
    let example: String = example
        .lines()
        .filter(|l| !l.contains("storageClassName"))
        .collect::<Vec<_>>()
        .join("\n");
    cluster.kubectl_ok(&[
        "apply",
        "-n",
        "web",
        "-f",
        &write_temp(&cluster, "sts.yaml", &example),
    ]);

    let claims: Vec<String> = (0..3)
        .map(|i| format!("nginx-storage-nginx-statefulset-{i}"))
        .collect();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "web");
    let mut placement = BTreeMap::new();
    for (i, claim) in claims.iter().enumerate() {
        let pvc = cluster.wait_pvc_bound("web", claim, T).await;
        assert_eq!(
            pvc.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some("hostvol")
        );
        let pod = cluster
            .wait_pod_running("web", &format!("nginx-statefulset-{i}"), T)
            .await;
        placement.insert(claim.clone(), pod.spec.unwrap().node_name.unwrap());
    }
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(pvs.len(), 3, "one PV per claim");
    for pv in &pvs {
        let claim = pv_claim(pv);
        let node = &placement[&claim];
        assert_eq!(
            &pv_node(pv),
            node,
            "PV {} pinned to the pod's node",
            pv.name_any()
        );
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(
            spec.host_path.as_ref().unwrap().type_.as_deref(),
            Some("Directory")
        );
        let dir = pv_dir_name(pv);
        let (here, there) = if node == "node-a" { (&a, &b) } else { (&b, &a) };
        assert!(here.root.join(&dir).is_dir(), "{dir} on {node}");
        assert!(
            !there.root.join(&dir).exists(),
            "{dir} must exist only on {node}"
        );
        let events = cluster.pvc_events("web", &claim).await;
        assert!(
            events.iter().any(|(_, r, _)| r == "ProvisioningSucceeded"),
            "{}",
            fmt_events(&events)
        );
    }

    // Pod 0 writes a file, dies, and comes back to the same node, claim, volume and data.
    let claim0 = &claims[0];
    let pv0 = pvs.iter().find(|pv| pv_claim(pv) == *claim0).unwrap();
    let node0 = placement[claim0].clone();
    let root0 = if node0 == "node-a" { &a.root } else { &b.root };
    let file = root0.join(pv_dir_name(pv0)).join("index.html");
    std::fs::write(&file, "Hello from nginx-statefulset-0\n").unwrap();
    let old_uid = pods.get("nginx-statefulset-0").await.unwrap().uid();
    cluster.force_delete_pod("web", "nginx-statefulset-0").await;
    cluster
        .wait_for(
            || async {
                pods.get_opt("nginx-statefulset-0")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.uid() != old_uid)
            },
            T,
            "pod 0 re-created",
        )
        .await;
    let pod0 = cluster
        .wait_pod_running("web", "nginx-statefulset-0", T)
        .await;
    assert_eq!(
        pod0.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node0.as_str()),
        "same node"
    );
    let volume = pod0
        .spec
        .unwrap()
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "nginx-storage")
        .unwrap();
    assert_eq!(
        volume.persistent_volume_claim.unwrap().claim_name,
        *claim0,
        "same claim"
    );
    let pvc0 = cluster.wait_pvc_bound("web", claim0, T).await;
    assert_eq!(
        pvc0.spec.unwrap().volume_name.as_deref(),
        Some(pv0.name_any().as_str()),
        "same volume"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "Hello from nginx-statefulset-0\n"
    );
    assert_eq!(hostvol_pvs(&cluster).await.len(), 3, "no new volume");

    // Clean up as a user would: StatefulSet, claims, then volumes. Retain keeps every byte on disk.
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "web",
        "statefulset",
        "nginx-statefulset",
        "--wait=false",
    ]);
    for i in 0..3 {
        cluster
            .force_delete_pod("web", &format!("nginx-statefulset-{i}"))
            .await;
    }
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        "web",
        "pvc",
        "--all",
        "--wait=true",
        "--timeout=60s",
    ]);
    let pv_api: Api<PersistentVolume> = Api::all(cluster.client());
    for pv in &pvs {
        cluster.wait_pv_phase(&pv.name_any(), "Released", T).await;
        pv_api
            .delete(&pv.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    cluster
        .wait_for(
            || async { hostvol_pvs(&cluster).await.is_empty() },
            T,
            "PVs deleted",
        )
        .await;
    for pv in &pvs {
        let dir = pv_dir_name(pv);
        assert!(
            a.root.join(&dir).is_dir() || b.root.join(&dir).is_dir(),
            "{dir} kept after Retain"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "Hello from nginx-statefulset-0\n"
    );
}

fn write_temp(cluster: &Cluster, name: &str, text: &str) -> String {
    let path = cluster.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Scenario 2: a hand-made hostPath PV and a class-less claim bind; the agents create and say nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_volumes_are_left_alone() {
    let (cluster, a, b) = two_node_cluster().await;
    apply_shipped_class(&cluster, false);
    cluster.create_namespace("static").await;
    cluster.kubectl_apply_yaml(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: static-pv\nspec:\n  capacity:\n    storage: 1Gi\n  \
         accessModes: [ReadWriteOnce]\n  storageClassName: \"\"\n  hostPath:\n    path: /srv/static\n",
    );
    cluster.kubectl_apply_yaml(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: static-claim\n  namespace: static\nspec:\n  \
         storageClassName: \"\"\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n",
    );
    let pvc = cluster.wait_pvc_bound("static", "static-claim", T).await;
    assert_eq!(pvc.spec.unwrap().volume_name.as_deref(), Some("static-pv"));
    // A barrier instead of a sleep: a hostvol claim made after the static one is provisioned, so the
    // agents' watches have delivered the static claim by then.
    cluster.kubectl_apply_yaml(&claim_yaml(
        "static",
        "barrier",
        "hostvol",
        "1Gi",
        Some("node-a"),
    ));
    let barrier = cluster.wait_pvc_bound("static", "barrier", T).await;
    let barrier_pv = barrier.spec.unwrap().volume_name.unwrap();
    assert!(
        dirs_in(&b.root).is_empty(),
        "agents created nothing for the static claim"
    );
    assert_eq!(
        dirs_in(&a.root).into_iter().collect::<Vec<_>>(),
        vec![format!("{barrier_pv}_static_barrier")],
        "agents created nothing for the static claim"
    );
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(
        pvs.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        vec![barrier_pv],
        "the only hostvol PV is the barrier's"
    );
    let events = cluster.pvc_events("static", "static-claim").await;
    assert!(
        !events.iter().any(|(_, r, _)| r.starts_with("Provisioning")),
        "{}",
        fmt_events(&events)
    );
    // node-a provisioned the barrier and nothing else; node-b nothing.
    for (agent, provisioned) in [(&a, 1.0), (&b, 0.0)] {
        let m = agent.metrics().await;
        assert_eq!(
            metric_value(&m, "hostvol_provisions_total", &[]).unwrap_or(0.0),
            provisioned,
            "{m}"
        );
    }
}

/// Scenario 3: pods spread by the scheduler; each agent provisions exactly the claims of its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_serves_only_its_own_claims() {
    let (cluster, a, b) = two_node_cluster().await;
    apply_shipped_class(&cluster, false);
    cluster.create_namespace("spread").await;
    let n = 8;
    for i in 0..n {
        cluster.kubectl_apply_yaml(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data-{i}\n  namespace: spread\nspec:\n  \
             storageClassName: hostvol\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 100Mi\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: app-{i}\n  namespace: spread\n  labels:\n    app: spread\nspec:\n  \
             topologySpreadConstraints:\n  - maxSkew: 1\n    topologyKey: kubernetes.io/hostname\n    whenUnsatisfiable: ScheduleAnyway\n    \
             labelSelector:\n      matchLabels:\n        app: spread\n  containers:\n  - name: app\n    image: busybox\n    \
             volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: data-{i}\n"
        ));
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        cluster
            .wait_pvc_bound("spread", &format!("data-{i}"), T)
            .await;
        let pod = cluster
            .wait_pod_running("spread", &format!("app-{i}"), T)
            .await;
        *per_node
            .entry(pod.spec.unwrap().node_name.unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        2,
        "the scheduler used both nodes: {per_node:?}"
    );
    for pv in hostvol_pvs(&cluster).await {
        let node = pv_node(&pv);
        let (here, there) = if node == "node-a" { (&a, &b) } else { (&b, &a) };
        assert!(here.root.join(pv_dir_name(&pv)).is_dir());
        assert!(!there.root.join(pv_dir_name(&pv)).exists());
    }
    for agent in [&a, &b] {
        let want = per_node[&agent.node];
        assert_eq!(
            dirs_in(&agent.root).len(),
            want,
            "directories on {}",
            agent.node
        );
        let m = agent.metrics().await;
        let got = metric_value(&m, "hostvol_provisions_total", &[("outcome", "succeeded")])
            .unwrap_or(0.0);
        assert_eq!(
            got as usize, want,
            "agent {} provisioned only its node's claims:\n{m}",
            agent.node
        );
    }
}

/// Scenario 4: every refusal the API lets through gets its Warning Event, and nothing is created,
/// while a valid claim made at the same moment is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_explained() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let agent = cluster.start_agent("node-a", &[]).await;
    apply_shipped_class(&cluster, false);
    for (class, parameter) in [
        ("hostvol-typo", ("nodePath", "/x")),
        ("hostvol-badmode", ("mode", "rwx")),
        ("hostvol-baduid", ("uid", "root")),
        ("hostvol-badtype", ("volumeType", "Local")),
    ] {
        cluster.kubectl_apply_yaml(&class_yaml(
            class,
            "WaitForFirstConsumer",
            "Retain",
            &[parameter],
        ));
    }
    cluster.create_namespace("bad").await;
    // A claim in namespace bad, placed on node-a.
    let claim = |name: &str, class: &str, size: &str, extra_spec: &str| {
        claim_yaml_with("bad", name, class, size, Some("node-a"), extra_spec)
    };
    // (claim, manifest, words the Warning must contain)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "block",
            claim("block", "hostvol", "1Gi", "  volumeMode: Block\n"),
            "volumeMode Block",
        ),
        (
            "rwx",
            claim("rwx", "hostvol", "1Gi", "").replace("[ReadWriteOnce]", "[ReadWriteMany]"),
            "ReadWriteMany",
        ),
        (
            "clone",
            claim(
                "clone",
                "hostvol",
                "1Gi",
                // A source that never exists: naming `valid` (applied in the same batch) raced its
                // creation and binding ("not bound yet" instead of "fix dataSource").
                "  dataSource:\n    kind: PersistentVolumeClaim\n    name: absent\n",
            ),
            "dataSource",
        ),
        (
            "selector",
            claim(
                "selector",
                "hostvol",
                "1Gi",
                "  selector:\n    matchLabels:\n      a: b\n",
            ),
            "selector",
        ),
        ("huge", claim("huge", "hostvol", "1Ei", ""), "cannot hold"),
        (
            "typo",
            claim("typo", "hostvol-typo", "1Gi", ""),
            "valid parameters are mode, uid, gid",
        ),
        (
            "badmode",
            claim("badmode", "hostvol-badmode", "1Gi", ""),
            "mode=\"rwx\"",
        ),
        (
            "baduid",
            claim("baduid", "hostvol-baduid", "1Gi", ""),
            "uid=\"root\"",
        ),
        (
            "badtype",
            claim("badtype", "hostvol-badtype", "1Gi", ""),
            "volumeType=\"Local\" must be \"hostPath\" or \"local\"",
        ),
    ];
    let mut all = cases.iter().map(|(_, y, _)| y.clone()).collect::<Vec<_>>();
    all.push(claim("valid", "hostvol", "1Gi", ""));
    cluster.kubectl_apply_yaml(&all.join("---\n"));

    let valid = cluster.wait_pvc_bound("bad", "valid", T).await;
    for (name, _, words) in &cases {
        let (kind, reason, message) = cluster
            .wait_event("bad", name, "ProvisioningFailed", T)
            .await;
        assert_eq!(kind, "Warning");
        assert_eq!(reason, "ProvisioningFailed");
        assert!(
            message.contains(words),
            "claim {name}: {message:?} should contain {words:?}"
        );
    }
    // The oversized claim is also handed back to the scheduler.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "bad");
    cluster
        .wait_for(
            || async {
                !claims
                    .get("huge")
                    .await
                    .unwrap()
                    .annotations()
                    .contains_key("volume.kubernetes.io/selected-node")
            },
            T,
            "selected-node removed from the oversized claim",
        )
        .await;
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(pvs.len(), 1, "only the valid claim got a PV");
    assert_eq!(Some(pvs[0].name_any()), valid.spec.unwrap().volume_name);
    assert_eq!(
        dirs_in(&agent.root).len(),
        1,
        "only the valid claim got a directory: {:?}",
        dirs_in(&agent.root)
    );
    for (name, _, _) in &cases {
        assert!(
            claims
                .get(name)
                .await
                .unwrap()
                .spec
                .unwrap()
                .volume_name
                .is_none(),
            "{name} stays unbound"
        );
    }
    let m = agent.metrics().await;
    assert!(
        metric_value(
            &m,
            "hostvol_provisions_total",
            &[("outcome", "refused"), ("reason", "block_volume_mode")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );

    // The longest name a claim may have: its Events (named after it) must still be accepted.
    let longest = format!("long-{}", "n".repeat(248));
    assert_eq!(longest.len(), 253);
    cluster.kubectl_apply_yaml(&claim_yaml(
        "bad",
        &longest,
        "hostvol",
        "1Gi",
        Some("node-a"),
    ));
    cluster.wait_pvc_bound("bad", &longest, T).await;
    let (kind, _, note) = cluster
        .wait_event("bad", &longest, "ProvisioningSucceeded", T)
        .await;
    assert_eq!(kind, "Normal", "{note}");
    assert!(
        !agent.log().contains("could not publish Event"),
        "an Event was refused:\n{}",
        agent.log()
    );
}

/// Scenario 5: SIGKILL mid-way; after a restart every claim has exactly one PV and one directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_leaves_exactly_one_of_each() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    let mut agent = cluster.start_agent("node-a", &[]).await;
    apply_shipped_class(&cluster, false);
    cluster.create_namespace("crash").await;
    let n = 40;
    let manifests: Vec<String> = (0..n)
        .map(|i| claim_yaml("crash", &format!("c{i}"), "hostvol", "10Mi", Some("node-a")))
        .collect();
    cluster.kubectl_apply_yaml(&manifests.join("---\n"));
    // Kill as soon as the agent is part-way through.
    cluster
        .wait_for(
            || async { !hostvol_pvs(&cluster).await.is_empty() },
            T,
            "first PV",
        )
        .await;
    agent.kill();
    let before = hostvol_pvs(&cluster).await.len();
    eprintln!(
        "[e2e] killed the agent with {before}/{n} PVs and {} directories",
        dirs_in(&agent.root).len()
    );
    agent.restart().await;
    for i in 0..n {
        cluster.wait_pvc_bound("crash", &format!("c{i}"), T).await;
    }
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(pvs.len(), n, "exactly one PV per claim");
    let claims: BTreeSet<String> = pvs.iter().map(pv_claim).collect();
    assert_eq!(claims.len(), n);
    let dirs = dirs_in(&agent.root);
    assert_eq!(dirs.len(), n, "exactly one directory per claim: {dirs:?}");
    for pv in &pvs {
        assert!(dirs.contains(&pv_dir_name(pv)));
    }
}

/// Scenario 6: the shipped manifests pass the API server's own validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_manifests_are_valid() {
    let cluster = Cluster::start().await;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let out = cluster.kubectl_ok(&["apply", "--dry-run=server", "-k", deploy.to_str().unwrap()]);
    for kind in [
        "namespace/hostvol-system",
        "serviceaccount/hostvol",
        "clusterrole",
        "daemonset.apps/hostvol",
        "storageclass.storage.k8s.io/hostvol",
        "csidriver.storage.k8s.io/hostpath.hostvol.io",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/statefulset.yaml");
    cluster.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-n",
        "default",
        "-f",
        example.to_str().unwrap(),
    ]);
}
