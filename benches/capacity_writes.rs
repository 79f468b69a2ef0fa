//! How often an agent writes its CSIStorageCapacity objects: the API server's non-watch requests on
//! them (its own `apiserver_request_total`) while something else fills the node's data root at
//! 10 MiB/s for a minute, and over a minute when nothing changes. One agent, one class: every class
//! and every node multiplies the figure. Prints figures; asserts nothing about them.
//!
//! Run: `cargo bench --bench capacity_writes` (as root: the data root is a tmpfs). Knobs:
//! `HOSTVOL_BENCH_FILL_SECONDS` (60), `HOSTVOL_BENCH_FILL_MIB_PER_SECOND` (10),
//! `HOSTVOL_BENCH_IDLE_SECONDS` (60); `HOSTVOL_BIN` runs another agent binary (e.g. main's, for a
//! before/after).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::faults::requests_between;
use common::{Cluster, class_yaml, disk_fill};
use support::{agent_exe, build_kind, env_usize, loadavg, requested, runtime};

const CLASS: &str = "busy";

fn main() {
    if !requested("capacity_writes") {
        return;
    }
    runtime().block_on(run());
}

async fn run() {
    let fill_secs = env_usize("HOSTVOL_BENCH_FILL_SECONDS", 60);
    let rate = env_usize("HOSTVOL_BENCH_FILL_MIB_PER_SECOND", 10);
    let idle_secs = env_usize("HOSTVOL_BENCH_IDLE_SECONDS", 60);
    let cluster = Cluster::start().await;
    cluster.apply_repo_manifest("deploy/csidriver.yaml");
    cluster.add_node("node-a").await;
    // Room for the fill and more, so free space never runs out during the run.
    cluster.give_disk("node-a", &format!("{}m", rate * fill_secs + 1024));
    let agent = cluster.start_agent("node-a", &[]).await;
    cluster.kubectl_apply_yaml(&class_yaml(CLASS, "WaitForFirstConsumer", "Delete", &[]));
    cluster
        .wait_class_capacities(CLASS, 1, Duration::from_secs(60))
        .await;
    println!(
        "hostvol capacity-writes benchmark ({} agent {}, load {}): one agent, one class, default \
         --capacity-change-threshold",
        build_kind(),
        agent_exe(&agent),
        loadavg()
    );

    let before = cluster.capacity_requests().await;
    tokio::time::sleep(Duration::from_secs(idle_secs as u64)).await;
    let after = cluster.capacity_requests().await;
    let (idle, idle_writes) = requests_between(&before, &after);
    let idle_all: u64 = idle.values().sum();
    println!(
        "  idle: {:.1} non-watch CSIStorageCapacity requests per minute ({:.1} writes), {idle:?} in {idle_secs} s",
        idle_all as f64 * 60.0 / idle_secs as f64,
        idle_writes as f64 * 60.0 / idle_secs as f64,
    );

    let before = cluster.capacity_requests().await;
    let started = Instant::now();
    let root = agent.root.clone();
    let total_mib = rate * fill_secs;
    tokio::task::spawn_blocking(move || disk_fill::fill(&root, "filler", total_mib, rate))
        .await
        .expect("the filler");
    let took = started.elapsed().as_secs_f64();
    let after = cluster.capacity_requests().await;
    let (busy, busy_writes) = requests_between(&before, &after);
    let busy_all: u64 = busy.values().sum();
    println!(
        "  filling at {rate} MiB/s ({total_mib} MiB in {took:.1} s): {:.1} non-watch \
         CSIStorageCapacity requests per minute ({:.1} writes), {busy:?}; target <= 15 (about one per \
         64 MiB moved)",
        busy_all as f64 * 60.0 / took,
        busy_writes as f64 * 60.0 / took,
    );
    drop(agent);
}
