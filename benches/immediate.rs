//! Immediate binding with three agents: how long until N claims are Bound, and how many API conflicts
//! the agents' optimistic placement caused. Prints figures; asserts nothing about time.
//! Run: `cargo bench --bench immediate` (after `scripts/setup-control-plane.sh`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Cluster, claim_yaml, class_yaml, metric_value};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use support::{env_usize, requested, runtime};

fn main() {
    if !requested("immediate") {
        return;
    }
    let n = env_usize("HOSTVOL_BENCH_IMMEDIATE", 100);
    runtime().block_on(async move {
        let cluster = Cluster::start().await;
        cluster.apply_repo_manifest("deploy/csidriver.yaml");
        let agents = cluster
            .add_nodes_with_agents(&[
                ("node-a", &["--capacity-cap", "100Gi"]),
                ("node-b", &["--capacity-cap", "200Gi"]),
                ("node-c", &["--capacity-cap", "300Gi"]),
            ])
            .await;
        cluster.kubectl_apply_yaml(&class_yaml("now", "Immediate", "Retain", &[]));
        cluster.create_namespace("bench").await;
        // All three nodes' capacities must be published before the claims arrive.
        cluster
            .wait_class_capacities("now", 3, Duration::from_secs(90))
            .await;
        let manifests: Vec<String> = (0..n)
            .map(|i| claim_yaml("bench", &format!("c{i}"), "now", "1Gi", None))
            .collect();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "bench");
        let started = Instant::now();
        cluster.kubectl_apply_yaml(&manifests.join("---\n"));
        loop {
            let bound = claims.list(&ListParams::default()).await.unwrap().items.iter().filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")).count();
            if bound == n {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(600), "only {bound}/{n} Bound after 10 minutes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let took = started.elapsed();
        let pvs: Vec<PersistentVolume> = Api::<PersistentVolume>::all(cluster.client()).list(&ListParams::default()).await.unwrap().items;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for pv in &pvs {
            *per_node.entry(pv.annotations().get("hostvol.io/node").cloned().unwrap_or_default()).or_default() += 1;
        }
        let (mut conflicts, mut placements) = (0.0, 0.0);
        for agent in &agents {
            let m = agent.metrics().await;
            conflicts += metric_value(&m, "hostvol_placement_conflicts_total", &[]).unwrap_or(0.0);
            placements += metric_value(&m, "hostvol_placements_total", &[]).unwrap_or(0.0);
        }
        println!("hostvol Immediate benchmark (2 cores, Kubernetes 1.20.2, three agents capped 100/200/300Gi)");
        println!("{n} Immediate claims: all Bound in {:.1} s; {} PVs; placements {placements}; API conflicts {conflicts}", took.as_secs_f64(), pvs.len());
        println!("per node: {per_node:?}");
    });
}
