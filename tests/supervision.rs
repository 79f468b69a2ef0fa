//! A dead task is a dead agent, and a panic is one object's error (issue 15): panics and early ends
//! injected with failpoints (`FAILPOINTS`, the agent's default `failpoints` feature) into the agent's
//! background tasks and into one claim's reconcile, on a real control plane. The agent restarts the
//! task (counted in `hostvol_task_restarts_total{task}`), `/healthz` fails naming a vital task while it
//! is down and only then (README, "Staying up"), and every other claim is served meanwhile.

mod common;

use std::time::Duration;

use common::{Agent, Cluster, claim_yaml, class_yaml, metric_value};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;

const T: Duration = Duration::from_secs(90);
const CLASS: &str = "supervised";

async fn cluster_with_failpoints(failpoints: &str) -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    cluster.add_node("node-a").await;
    // Node-loss clean-up is opt-in: on, with its component's RBAC, so its task is supervised too.
    cluster.grant_node_loss_cleanup().await;
    let kubeconfig = cluster.agent_kubeconfig().to_path_buf();
    let agent = cluster
        .start_agent_with_env(
            "node-a",
            &["--node-loss-cleanup"],
            &kubeconfig,
            &[("FAILPOINTS", failpoints)],
        )
        .await;
    cluster.kubectl_apply_yaml(&class_yaml(CLASS, "WaitForFirstConsumer", "Delete", &[]));
    (cluster, agent)
}

async fn restarts(agent: &Agent, task: &str) -> f64 {
    metric_value(
        &agent.metrics().await,
        "hostvol_task_restarts_total",
        &[("task", task)],
    )
    .unwrap_or(0.0)
}

/// Waits until `n` claims named `{prefix}{i}` in `ns` are Bound.
async fn wait_bound(cluster: &Cluster, ns: &str, prefix: &str, n: usize) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), ns);
    cluster
        .wait_for(
            || async {
                let Ok(list) = api.list(&Default::default()).await else {
                    return false;
                };
                list.items
                    .iter()
                    .filter(|c| c.metadata.name.as_deref().unwrap_or("").starts_with(prefix))
                    .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                    .count()
                    == n
            },
            T,
            &format!("{n} claims {prefix}* Bound"),
        )
        .await;
}

fn apply_claims(cluster: &Cluster, ns: &str, prefix: &str, n: usize) {
    let yaml: Vec<String> = (0..n)
        .map(|i| claim_yaml(ns, &format!("{prefix}{i}"), CLASS, "10Mi", Some("node-a")))
        .collect();
    cluster.kubectl_apply_yaml(&yaml.join("---\n"));
}

/// The tasks that restart without touching `/healthz` (README, "Staying up").
const RESTARTED: [&str; 7] = [
    "usage-refresh",
    "orphan-report",
    "limits",
    "config-map",
    "node-loss",
    "pod-placement",
    "forget-gone",
];

/// Each restart-only task panics once (and `readiness` ends early once): each is restarted and
/// counted, `/healthz` stays ok, the agent keeps its pid and provisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_is_restarted_and_counted() {
    let mut failpoints: Vec<String> = RESTARTED
        .iter()
        .map(|t| format!("{t}=1*panic(injected in {t})"))
        .collect();
    failpoints.push("readiness=1*return".into());
    let (cluster, mut agent) = cluster_with_failpoints(&failpoints.join(";")).await;
    let pid = agent.pid();
    for task in RESTARTED.iter().chain(&["readiness"]) {
        cluster
            .wait_for(
                || async { restarts(&agent, task).await >= 1.0 },
                T,
                &format!("task {task} restarted"),
            )
            .await;
    }
    let log = agent.log();
    for task in RESTARTED {
        assert!(
            log.lines()
                .any(|l| l.contains("task panicked") && l.contains(task)),
            "the panic of {task} is logged with its name"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("task ended while the agent runs") && l.contains("readiness")),
        "an early end is logged with the task's name"
    );
    assert_eq!(
        agent.http_get("/healthz").await.unwrap(),
        (200, "ok".to_string()),
        "restart-only tasks do not fail /healthz"
    );
    cluster.create_namespace("restarted").await;
    apply_claims(&cluster, "restarted", "c", 3);
    wait_bound(&cluster, "restarted", "c", 3).await;
    assert!(agent.is_running() && agent.pid() == pid, "no agent restart");
    let counted: Vec<(String, f64)> = {
        let mut v = Vec::new();
        for t in RESTARTED {
            v.push((t.to_string(), restarts(&agent, t).await));
        }
        v
    };
    eprintln!("[figures] restarts per task after one injected panic each: {counted:?}");
}

/// A vital task (the node's capacity figures) that keeps panicking fails `/healthz` with its name
/// while it is down; once it runs again `/healthz` is ok and the node serves claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vital_task_down_fails_healthz_naming_it() {
    let (cluster, mut agent) =
        cluster_with_failpoints("capacity=5*panic(injected);storageclasses=1*panic(injected)")
            .await;
    let pid = agent.pid();
    // Down for about 1+2+4+8+16 s between its restarts.
    cluster
        .wait_for(
            || async {
                matches!(agent.http_get("/healthz").await,
                    Ok((503, body)) if body.contains("capacity"))
            },
            T,
            "/healthz 503 naming the capacity task",
        )
        .await;
    cluster
        .wait_for(
            || async { matches!(agent.http_get("/healthz").await, Ok((200, _))) },
            T,
            "/healthz ok once the task runs again",
        )
        .await;
    assert_eq!(restarts(&agent, "capacity").await, 5.0);
    assert!(restarts(&agent, "storageclasses").await >= 1.0);
    cluster.create_namespace("vital").await;
    apply_claims(&cluster, "vital", "v", 2);
    wait_bound(&cluster, "vital", "v", 2).await;
    assert!(agent.is_running() && agent.pid() == pid, "no agent restart");
}

/// A panic while provisioning one claim is that claim's error: a Warning Event on it and retries with
/// backoff, while the agent (same process) provisions the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_reconcile_is_that_claims_error() {
    let (cluster, mut agent) = cluster_with_failpoints("provision_panic_for=return(bad)").await;
    let pid = agent.pid();
    let ns = "panics";
    cluster.create_namespace(ns).await;
    cluster.kubectl_apply_yaml(&claim_yaml(ns, "bad", CLASS, "10Mi", Some("node-a")));
    apply_claims(&cluster, ns, "good", 5);
    wait_bound(&cluster, ns, "good", 5).await;
    cluster
        .wait_for(
            || async {
                cluster
                    .pvc_events(ns, "bad")
                    .await
                    .iter()
                    .any(|e| e.0 == "Warning" && e.1 == "InternalError")
            },
            T,
            "a Warning InternalError Event on the claim whose reconcile panicked",
        )
        .await;
    // Retried with backoff: the panic happens again.
    cluster
        .wait_for(
            || async {
                metric_value(
                    &agent.metrics().await,
                    "hostvol_reconcile_panics_total",
                    &[],
                )
                .unwrap_or(0.0)
                    >= 2.0
            },
            T,
            "the panicking claim retried",
        )
        .await;
    let events = cluster.pvc_events(ns, "bad").await;
    let warning = events.iter().find(|e| e.1 == "InternalError").unwrap();
    assert!(
        warning.2.contains("failpoint provision_panic_for: bad"),
        "the Event says what happened: {warning:?}"
    );
    assert!(agent.is_running() && agent.pid() == pid, "no agent restart");
    assert_eq!(agent.http_get("/healthz").await.unwrap().0, 200);
}

/// A panic in the shared API probe (vital) is restarted too; the agent stays up and provisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_watch_is_restarted_and_its_store_kept() {
    let (cluster, mut agent) = cluster_with_failpoints(
        "node=1*panic(injected);csistoragecapacities=1*panic(injected);api-probe=1*panic(injected)",
    )
    .await;
    let pid = agent.pid();
    for task in ["node", "csistoragecapacities", "api-probe"] {
        cluster
            .wait_for(
                || async { restarts(&agent, task).await >= 1.0 },
                T,
                &format!("task {task} restarted"),
            )
            .await;
    }
    cluster
        .wait_for(
            || async { matches!(agent.http_get("/healthz").await, Ok((200, _))) },
            T,
            "/healthz ok",
        )
        .await;
    cluster.create_namespace("watches").await;
    apply_claims(&cluster, "watches", "w", 3);
    wait_bound(&cluster, "watches", "w", 3).await;
    assert!(agent.is_running() && agent.pid() == pid, "no agent restart");
}
