//! The bad days of issue 10, each on its own real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) with real `hostvol agent` processes and the played kubelet:
//! the API server killed mid-burst, etcd restarted on its data, the API server unreachable for 60 s,
//! a full disk, an agent killed while it deletes a large tree, and a node restart. Each prints the
//! figures it observed (`cargo test --test faults -- --nocapture` shows them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::faults::{APISERVER, ETCD, readiness_timeline};
use common::{
    Agent, Cluster, claim_yaml, class_yaml, connect, dirs_in, fmt_events, hostvol_pvs,
    metric_value, pv_claim, pv_dir_name,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(90);
const CLASS: &str = "faults";

/// A cluster with nodes and their agents and a Delete class; claims are made already placed on a node,
/// as the scheduler leaves them.
async fn cluster_with(nodes: &[&str]) -> (Cluster, Vec<Agent>) {
    let cluster = Cluster::start().await;
    let mut agents = Vec::new();
    for node in nodes {
        cluster.add_node(node).await;
        agents.push(cluster.start_agent(node, &[]).await);
    }
    cluster.kubectl_apply_yaml(&class_yaml(CLASS, "WaitForFirstConsumer", "Delete", &[]));
    (cluster, agents)
}

/// `n` claims of `size` in `ns` named `{prefix}{i}`, spread over `nodes` in turn, in one apply.
fn apply_claims(cluster: &Cluster, ns: &str, prefix: &str, n: usize, size: &str, nodes: &[&str]) {
    let manifests: Vec<String> = (0..n)
        .map(|i| {
            claim_yaml(
                ns,
                &format!("{prefix}{i}"),
                CLASS,
                size,
                Some(nodes[i % nodes.len()]),
            )
        })
        .collect();
    cluster.kubectl_apply_yaml(&manifests.join("---\n"));
}

async fn claims(cluster: &Cluster, ns: &str) -> Vec<PersistentVolumeClaim> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list claims")
        .items
}

fn is_bound(pvc: &PersistentVolumeClaim) -> bool {
    pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

/// Waits until every claim in `ns` is Bound; returns how long that took.
async fn wait_all_bound(cluster: &Cluster, ns: &str, n: usize, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let list = claims(cluster, ns).await;
        let bound = list.iter().filter(|c| is_bound(c)).count();
        if bound == n {
            return t0.elapsed();
        }
        if t0.elapsed() > timeout {
            let pending: Vec<String> = list
                .iter()
                .filter(|c| !is_bound(c))
                .map(|c| c.name_any())
                .collect();
            let first = pending.first().cloned().unwrap_or_default();
            panic!(
                "{bound}/{n} claims Bound after {timeout:?}; pending {pending:?}\n--- events of {first} ---\n{}\n{}",
                fmt_events(&cluster.pvc_events(ns, &first).await),
                cluster.diag()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every claim in `ns` has exactly one PV bound to it and one directory on its node, and no agent root
/// holds anything else.
async fn assert_one_of_each(cluster: &Cluster, ns: &str, n: usize, agents: &[Agent]) {
    let every_pv = hostvol_pvs(cluster).await;
    let pvs: Vec<PersistentVolume> = every_pv
        .iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.namespace.as_deref())
                == Some(ns)
        })
        .cloned()
        .collect();
    let mut per_claim: BTreeMap<String, usize> = BTreeMap::new();
    for pv in &pvs {
        *per_claim.entry(pv_claim(pv)).or_default() += 1;
    }
    assert_eq!(pvs.len(), n, "one PV per claim: {per_claim:?}");
    assert_eq!(per_claim.len(), n, "every claim has a PV: {per_claim:?}");
    // Every hostvol PV's directory (other namespaces' too, of earlier rounds), and nothing else.
    let pv_dirs: BTreeSet<String> = every_pv.iter().map(pv_dir_name).collect();
    let mut all_dirs = BTreeSet::new();
    for agent in agents {
        all_dirs.extend(dirs_in(&agent.root));
    }
    assert_eq!(
        all_dirs, pv_dirs,
        "exactly the PVs' directories in the data roots (no orphan, none missing)"
    );
    for claim in claims(cluster, ns).await {
        let volume = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        assert!(
            volume.is_some_and(|v| pvs.iter().any(|pv| pv.name_any() == v)),
            "claim {} is bound to its hostvol PV",
            claim.name_any()
        );
    }
}

/// Each agent's readiness changes: (time since the start, ready).
type Timeline = tokio::task::JoinHandle<Vec<(Duration, bool)>>;

/// Follows each agent's `/readyz` until the token is cancelled.
fn watch_readiness(agents: &[Agent]) -> (CancellationToken, Vec<Timeline>) {
    let stop = CancellationToken::new();
    let tasks = agents
        .iter()
        .map(|a| tokio::spawn(readiness_timeline(a.http_addr, stop.clone())))
        .collect();
    (stop, tasks)
}

/// Stops following readiness; asserts each agent went not-ready and is ready again, and returns the
/// longest not-ready stretch of each.
async fn readiness_dipped_and_came_back(
    stop: CancellationToken,
    tasks: Vec<Timeline>,
    agents: &[Agent],
) -> Vec<Duration> {
    stop.cancel();
    let mut stretches = Vec::new();
    for (task, agent) in tasks.into_iter().zip(agents) {
        let timeline = task.await.unwrap();
        assert_eq!(
            timeline.first().map(|t| t.1),
            Some(true),
            "agent {} ready at first: {timeline:?}",
            agent.node
        );
        assert!(
            timeline.iter().any(|t| !t.1),
            "agent {} never went not-ready while the API could not be read: {timeline:?}",
            agent.node
        );
        assert_eq!(
            timeline.last().map(|t| t.1),
            Some(true),
            "agent {} ready again: {timeline:?}",
            agent.node
        );
        let longest = timeline
            .windows(2)
            .filter(|w| !w[0].1)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        stretches.push(longest);
    }
    stretches
}

fn assert_no_agent_restart(agents: &mut [Agent], pids: &[u32]) {
    for (agent, pid) in agents.iter_mut().zip(pids) {
        let same = agent.is_running() && agent.pid() == *pid;
        let status = agent.exit_status();
        assert!(
            same,
            "agent {} restarted or exited ({status:?})\n{}",
            agent.node,
            common::process::tail(agent.log_path(), 30)
        );
    }
}

/// Log lines of an agent that say a request to the API server failed (watch errors, retried
/// reconciles), for the figures.
fn api_error_lines(agent: &Agent) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !l.contains("cert bypassed"))
        .count()
}

async fn reconcile_errors(agent: &Agent) -> f64 {
    metric_value(
        &agent.metrics().await,
        "hostvol_reconcile_errors_total",
        &[],
    )
    .unwrap_or(0.0)
}

/// Scenarios 1 and 2: 50 claims; while they are provisioned, `component` is SIGKILLed, stays down
/// `down` and is started again on the same ports and data.
async fn restart_mid_burst(component: &str, ns: &str) {
    let nodes = ["node-a", "node-b"];
    let (cluster, mut agents) = cluster_with(&nodes).await;
    let pids: Vec<u32> = agents.iter().map(|a| a.pid()).collect();
    cluster.create_namespace(ns).await;
    let (stop, timelines) = watch_readiness(&agents);
    let n = 50;
    let t0 = Instant::now();
    apply_claims(&cluster, ns, "c", n, "10Mi", &nodes);
    cluster
        .wait_for(
            || async { !hostvol_pvs(&cluster).await.is_empty() },
            T,
            "the first PV",
        )
        .await;
    let pvs_at_kill = hostvol_pvs(&cluster).await.len();
    let bound_at_kill = claims(&cluster, ns)
        .await
        .iter()
        .filter(|c| is_bound(c))
        .count();
    cluster.kill_component(component);
    let killed = Instant::now();
    // Longer than the agents' readiness check interval (10 s), so they notice.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let restart_took = cluster.start_component_again(component).await;
    let back = Instant::now();
    let bound_after = wait_all_bound(&cluster, ns, n, T).await;
    // Ready again within a check interval or two of the API answering.
    wait_agents_ready_again(&cluster, &agents).await;
    let not_ready = readiness_dipped_and_came_back(stop, timelines, &agents).await;
    assert_one_of_each(&cluster, ns, n, &agents).await;
    assert_no_agent_restart(&mut agents, &pids);
    let mut errors = Vec::new();
    for a in &agents {
        errors.push((reconcile_errors(a).await, api_error_lines(a)));
    }
    eprintln!(
        "[figures] {component} SIGKILL mid-burst of {n} claims: killed {:.1?} after the burst with {pvs_at_kill} PVs / \
         {bound_at_kill} Bound; down {:.1?}, serving again {restart_took:.1?} after restart; all {n} Bound \
         {bound_after:.1?} after it was back ({:.1?} in all); longest not-ready per agent {not_ready:.1?}; \
         reconcile errors / warning log lines per agent {errors:?}; agent restarts 0; 50 PVs, 50 dirs, no orphan",
        killed - t0,
        back - killed,
        t0.elapsed(),
    );
}

/// Scenario 1: the API server SIGKILLed and restarted in the middle of a burst of 50 claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_killed_mid_burst() {
    restart_mid_burst(APISERVER, "apiserver-kill").await;
}

/// Scenario 2: etcd SIGKILLed and restarted on the same data directory mid-burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_mid_burst() {
    restart_mid_burst(ETCD, "etcd-restart").await;
}

/// Scenario 3: the API server unreachable for 60 s (every connection refused with a reset, through a
/// proxy the agents must use) while claims wait, three times. The agents wait on one shared probe
/// instead of each watch retrying on its own (at most one connection attempt per second per agent),
/// go not-ready, and provision within seconds once it answers again (issue 15: first PV <= 5 s and
/// all Bound <= 10 s after it answers, medians of the three outages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_unreachable_for_a_minute() {
    let cluster = Cluster::start().await;
    let proxy = cluster.api_proxy().await;
    let nodes = ["node-a", "node-b"];
    let mut agents = Vec::new();
    for node in nodes {
        cluster.add_node(node).await;
        let kubeconfig = cluster.kubeconfig_via(&proxy, &format!("{node}-via-proxy"));
        agents.push(
            cluster
                .start_agent_with_kubeconfig(node, &[], &kubeconfig)
                .await,
        );
    }
    let pids: Vec<u32> = agents.iter().map(|a| a.pid()).collect();
    cluster.kubectl_apply_yaml(&class_yaml(CLASS, "WaitForFirstConsumer", "Delete", &[]));
    // The agents' steady rate, for comparison.
    let quiet0 = proxy.connections();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let quiet = proxy.connections() - quiet0;

    let outage = Duration::from_secs(60);
    let n = 20;
    let (mut first_pvs, mut all_bounds, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let ns = format!("outage-{round}");
        cluster.create_namespace(&ns).await;
        let pvs_before = hostvol_pvs(&cluster).await.len();
        let (stop, timelines) = watch_readiness(&agents);
        let refused0 = proxy.refused();
        proxy.cut();
        let cut = Instant::now();
        apply_claims(&cluster, &ns, "w", n, "10Mi", &nodes);
        let mut per_10s = Vec::new();
        let mut last = proxy.refused();
        while cut.elapsed() < outage {
            tokio::time::sleep(Duration::from_secs(10).min(outage.saturating_sub(cut.elapsed())))
                .await;
            let now = proxy.refused();
            per_10s.push(now - last);
            last = now;
        }
        let refused = proxy.refused() - refused0;
        let down = cut.elapsed();
        assert_eq!(
            hostvol_pvs(&cluster).await.len(),
            pvs_before,
            "nothing provisioned without the API server"
        );
        proxy.restore();
        let restored = Instant::now();
        cluster
            .wait_for(
                || async { hostvol_pvs(&cluster).await.len() > pvs_before },
                T,
                "the first PV after the outage",
            )
            .await;
        let first_pv = restored.elapsed();
        wait_all_bound(&cluster, &ns, n, T).await;
        let all_bound = restored.elapsed();
        wait_agents_ready_again(&cluster, &agents).await;
        let not_ready = readiness_dipped_and_came_back(stop, timelines, &agents).await;
        assert_one_of_each(&cluster, &ns, n, &agents).await;
        let per_second = refused as f64 / down.as_secs_f64() / agents.len() as f64;
        eprintln!(
            "[figures] outage {}: API server unreachable {down:.1?}, {n} claims waiting, 2 agents: {refused} \
             connection attempts refused ({per_second:.2}/s per agent; per 10 s: {per_10s:?}); first PV \
             {first_pv:.2?} and all {n} Bound {all_bound:.2?} after it answered again; longest not-ready per \
             agent {not_ready:.1?}",
            round + 1
        );
        first_pvs.push(first_pv);
        all_bounds.push(all_bound);
        rates.push(per_second);
    }
    assert_no_agent_restart(&mut agents, &pids);
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let (first_pv, all_bound) = (median(&first_pvs), median(&all_bounds));
    let worst_rate = rates.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "[figures] 3 outages of {outage:?}: first PV after the API answered {first_pvs:.2?} (median \
         {first_pv:.2?}), all {n} Bound {all_bounds:.2?} (median {all_bound:.2?}); connection attempts per \
         agent per second {rates:.2?}; steady state before: {quiet} connections in 10 s; agent restarts 0"
    );
    // The issue's targets, asserted as such (they are bounds the issue asks for, with the probe's
    // interval well inside them).
    assert!(
        worst_rate <= 1.0,
        "at most one connection attempt per second per agent during an outage: {rates:.2?}"
    );
    assert!(
        first_pv <= Duration::from_secs(5),
        "first PV within 5 s of the API server answering (median): {first_pvs:?}"
    );
    assert!(
        all_bound <= Duration::from_secs(10),
        "all claims Bound within 10 s of the API server answering (median): {all_bounds:?}"
    );
}

/// Scenario 4: the data root fills up mid-burst. Claims that no longer fit get a Warning that says so
/// and go back to the scheduler (their selected node is dropped); no directory or PV is left for them.
/// Once space is freed they are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_mid_burst() {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    cluster.give_disk("node-a", "64m");
    let agent = cluster.start_agent("node-a", &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(CLASS, "WaitForFirstConsumer", "Delete", &[]));
    let ns = "full";
    cluster.create_namespace(ns).await;
    let first = 5;
    apply_claims(&cluster, ns, "a", first, "4Mi", &["node-a"]);
    wait_all_bound(&cluster, ns, first, T).await;

    // Something else on the node fills the disk (a log gone wild) to within 2 MiB of full.
    let filler = agent.root.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        f.sync_all().ok();
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(std::fs::metadata(&filler).unwrap().len() - (2 << 20))
        .unwrap();
    let full_at = Instant::now();
    let late = 5;
    let manifests: Vec<String> = (0..late)
        .map(|i| claim_yaml(ns, &format!("b{i}"), CLASS, "4Mi", Some("node-a")))
        .collect();
    cluster.kubectl_apply_yaml(&manifests.join("---\n"));
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    let mut warnings = Vec::new();
    for i in 0..late {
        let name = format!("b{i}");
        cluster
            .wait_event(ns, &name, "ProvisioningReschedule", T)
            .await;
        let events = cluster.pvc_events(ns, &name).await;
        let (_, _, message) = events
            .iter()
            .find(|e| e.0 == "Warning" && e.1 == "ProvisioningFailed")
            .cloned()
            .unwrap_or_else(|| panic!("a Warning for {name}:\n{}", fmt_events(&events)));
        assert!(
            message.contains("node node-a cannot hold 4Mi") && message.contains("free space"),
            "the Warning says the claim does not fit on node-a and what to do: {message}"
        );
        cluster
            .wait_for(
                || async {
                    api.get(&name).await.is_ok_and(|c| {
                        !c.annotations()
                            .contains_key("volume.kubernetes.io/selected-node")
                    })
                },
                T,
                &format!("claim {name} handed back to the scheduler"),
            )
            .await;
        warnings.push(message);
    }
    let refused_in = full_at.elapsed();
    let pvs = hostvol_pvs(&cluster).await;
    assert_eq!(pvs.len(), first, "no PV for a claim that did not fit");
    let mut expected: BTreeSet<String> = pvs.iter().map(pv_dir_name).collect();
    expected.insert("filler".into());
    assert_eq!(dirs_in(&agent.root), expected, "no half-made directory");

    // Space freed: the late claims are placed again (as the scheduler would) and served.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    for i in 0..late {
        cluster.kubectl_ok(&[
            "annotate",
            "-n",
            ns,
            "pvc",
            &format!("b{i}"),
            "volume.kubernetes.io/selected-node=node-a",
        ]);
    }
    let served_again = wait_all_bound(&cluster, ns, first + late, T).await;
    assert_one_of_each(&cluster, ns, first + late, std::slice::from_ref(&agent)).await;
    eprintln!(
        "[figures] disk full (64 MiB tmpfs filled to 2 MiB free): {late} claims of 4Mi refused and handed back \
         to the scheduler within {refused_in:.1?}; Warning: {:?}; after freeing the space all {} Bound \
         {:.1?} later ({served_again:.1?} after the claims were placed again); no stray directory or PV",
        warnings[0],
        first + late,
        freed.elapsed(),
    );
}

/// Writes `dirs` × `files` small files under `dir`; returns the count.
fn fill_tree(dir: &Path, dirs: usize, files: usize) -> usize {
    for d in 0..dirs {
        let sub = dir.join(format!("d{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..files {
            std::fs::write(sub.join(format!("f{f:04}")), b"x").unwrap();
        }
    }
    dirs * files
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Scenario 5: the agent is SIGKILLed while it removes a volume of 20,000 files (reclaimPolicy
/// Delete). After the restart the removal finishes; the PV goes only after its directory; nothing
/// outside the volume is touched, not even what a symlink inside it points at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_deleting_a_large_tree() {
    let (cluster, mut agents) = cluster_with(&["node-a"]).await;
    let agent = &mut agents[0];
    let ns = "bigdelete";
    cluster.create_namespace(ns).await;
    apply_claims(&cluster, ns, "big", 1, "1Gi", &["node-a"]);
    apply_claims(&cluster, ns, "neighbour", 1, "10Mi", &["node-a"]);
    wait_all_bound(&cluster, ns, 2, T).await;
    let pv = cluster.hostvol_pv_of_claim(ns, "big0", T).await;
    let neighbour = cluster.hostvol_pv_of_claim(ns, "neighbour0", T).await;
    let dir = agent.root.join(pv_dir_name(&pv));
    let neighbour_dir = agent.root.join(pv_dir_name(&neighbour));
    let files = fill_tree(&dir, 100, 200);
    // Outside the volume: the neighbour's data and a file a symlink inside the volume points at.
    std::fs::write(neighbour_dir.join("keep"), b"neighbour").unwrap();
    let outside = cluster.dir().join("outside-target");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"outside").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("link-out")).unwrap();
    std::os::unix::fs::symlink(&neighbour_dir, dir.join("d000").join("link-neighbour")).unwrap();

    // Watch the order: the PV must never be gone while the directory is still there.
    let pvs: Api<PersistentVolume> = Api::all(cluster.client());
    let order = tokio::spawn({
        let (pvs, name, dir) = (pvs.clone(), pv.name_any(), dir.clone());
        async move {
            loop {
                match pvs.get_opt(&name).await {
                    // Gone before this read returned: the directory must be gone already.
                    Ok(None) => return dir.exists(),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    });

    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    api.delete("big0", &DeleteParams::default()).await.unwrap();
    // Kill as soon as the removal has started: the first of its 100 subdirectories is gone.
    let t0 = Instant::now();
    let started = common::poll_until(
        || async { std::fs::read_dir(&dir).map_or(true, |rd| rd.count() < 101) },
        T,
    )
    .await;
    assert!(started.is_ok(), "removal never started\n{}", cluster.diag());
    agent.kill();
    let left = count_files(&dir);
    eprintln!(
        "[e2e] killed the agent {:.1?} after the claim was deleted, {left}/{files} files left",
        t0.elapsed()
    );
    assert!(
        dir.exists() && left > 0,
        "the kill came too late to interrupt the removal (all {files} files were gone already)"
    );
    assert!(
        pvs.get_opt(&pv.name_any()).await.unwrap().is_some(),
        "the PV is still there while its directory is"
    );
    let restarted = Instant::now();
    agent.restart().await;
    cluster
        .wait_for(
            || async { matches!(pvs.get_opt(&pv.name_any()).await, Ok(None)) },
            T,
            "the PV removed after the restart",
        )
        .await;
    let finished = restarted.elapsed();
    let pv_outlived_dir = order.await.unwrap();
    assert!(
        !pv_outlived_dir,
        "the PV disappeared while its directory was still there"
    );
    assert!(!dir.exists(), "the volume's directory is gone");
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"outside");
    assert_eq!(
        std::fs::read(neighbour_dir.join("keep")).unwrap(),
        b"neighbour"
    );
    assert_eq!(
        dirs_in(&agent.root),
        BTreeSet::from([pv_dir_name(&neighbour)]),
        "only the neighbour's directory is left in the root"
    );
    let events = cluster
        .object_events("", "PersistentVolume", &pv.name_any())
        .await;
    let deleted = events.iter().filter(|e| e.1 == "VolumeDeleted").count();
    eprintln!(
        "[figures] agent SIGKILL during Delete of {files} files: {left} files left at the kill; removal finished \
         and PV gone {finished:.1?} after the restart; VolumeDeleted events {deleted}; the directory went \
         before the PV; outside files and the neighbour volume untouched"
    );
    assert_eq!(
        deleted, 1,
        "one VolumeDeleted Event for the volume, however often its removal was retried: {events:?}"
    );
}

/// Scenario 6: a node restart. The agent dies with the node (SIGKILL mid-burst), `/run` comes back
/// empty (its node-service socket gone) and the data root intact. After the restart: no duplicate, no
/// lost volume, and the socket serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restart_with_run_emptied() {
    let (cluster, mut agents) = cluster_with(&["node-a"]).await;
    let agent = &mut agents[0];
    // The socket in a /run-like directory of its own.
    let run = cluster.dir().join("node-a-run");
    std::fs::create_dir_all(&run).unwrap();
    agent.kill();
    let socket = run.join("hostvol.sock");
    let at = agent
        .args
        .iter()
        .position(|a| a == "--grpc-socket")
        .unwrap();
    agent.args[at + 1] = socket.display().to_string();
    agent.grpc_socket = socket.clone();
    agent.restart().await;
    assert!(socket.exists(), "socket at {}", socket.display());

    let ns = "reboot";
    cluster.create_namespace(ns).await;
    let n = 30;
    apply_claims(&cluster, ns, "r", n, "10Mi", &["node-a"]);
    cluster
        .wait_for(
            || async { hostvol_pvs(&cluster).await.len() >= 3 },
            T,
            "a few PVs",
        )
        .await;
    agent.kill(); // the node loses power
    let pvs_at_crash = hostvol_pvs(&cluster).await.len();
    let dirs_at_crash = dirs_in(&agent.root).len();
    // The reboot: /run is a fresh tmpfs, the data disk is as it was.
    for entry in std::fs::read_dir(&run).unwrap() {
        let path = entry.unwrap().path();
        std::fs::remove_file(&path).unwrap();
    }
    assert!(!socket.exists());
    let boot = Instant::now();
    agent.restart().await;
    let ready_after = boot.elapsed();
    {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::symlink_metadata(&socket).expect("the socket is back");
        assert!(meta.file_type().is_socket());
    }
    let mut client = connect(&agent.grpc_unix(), Duration::from_secs(10))
        .await
        .expect("node service over the new socket");
    let report = common::capacity_report(&mut client).await;
    assert_eq!(report.node, "node-a");
    let bound_after = wait_all_bound(&cluster, ns, n, T).await;
    assert_one_of_each(&cluster, ns, n, std::slice::from_ref(agent)).await;
    let listed = client
        .list_volumes(common::grpc::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes
        .len();
    assert_eq!(listed, n, "the node service lists every volume");
    eprintln!(
        "[figures] node restart: crashed with {pvs_at_crash} PVs and {dirs_at_crash} directories of {n} claims; \
         agent ready {ready_after:.1?} after the reboot, socket back; all {n} Bound {bound_after:.1?} after \
         that; {n} PVs, {n} directories, ListVolumes {listed}; no duplicate, none lost"
    );
}

/// Waits (30 s) until every agent's `/readyz` answers 200 again.
async fn wait_agents_ready_again(cluster: &Cluster, agents: &[Agent]) {
    cluster
        .wait_for(
            || async {
                let mut ready = true;
                for a in agents {
                    ready &= matches!(a.http_get("/readyz").await, Ok((200, _)));
                }
                ready
            },
            Duration::from_secs(30),
            "agents ready again",
        )
        .await;
}
