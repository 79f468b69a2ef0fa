//! `hostvol reuse PV --for NAMESPACE/CLAIM`: the data of a Released volume goes to a new claim. Like
//! `purge`, the CLI only checks and marks the PV (a PV patch: RBAC's `hostvol-purger` decides who
//! may); the agent of the volume's node creates the claim's PV, renames the directory and removes the
//! old PV (see `controller::reuse`).

use crate::controller::claim::class_name;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::Api;

use crate::cli::agents::{self, Address};
use crate::cli::args::ReuseArgs;
use crate::controller::reuse::{self as reuse_controller, claim_facts, volume_facts};
use crate::domain::naming;
use crate::domain::reuse::{self, Target};
use crate::service::grpc::v1::ReuseVolumeRequest;

const PURGER_ROLE: &str = "hostvol-purger";

/// A refused API call in words that say what to do about it.
fn api_error(error: kube::Error, doing: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: you may not {doing} (bind the {PURGER_ROLE} ClusterRole, see deploy/user-roles.yaml)"
        ),
        other => format!("cannot {doing}: {other}"),
    }
}

/// The socket of the node service on a node (the DaemonSet's hostPath).
pub const NODE_SOCKET: &str = "unix:/run/hostvol/hostvol.sock";

pub async fn run(args: &ReuseArgs) -> Result<bool, String> {
    let Some((namespace, name)) = args
        .claim
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Err(format!("--for {:?}: expected NAMESPACE/CLAIM", args.claim));
    };
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| args.directory.is_some().then(|| NODE_SOCKET.to_string()));
    if let Some(endpoint) = endpoint {
        return through_node_service(args, &endpoint, namespace, name).await;
    }
    let pv_name = args.pv.clone().unwrap_or_default();
    let args_pv = pv_name.as_str();
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster (check KUBECONFIG): {e}"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pv = volumes
        .get_opt(args_pv)
        .await
        .map_err(|e| api_error(e, "read PersistentVolumes"))?
        .ok_or_else(|| format!("PV {} not found", args_pv))?;
    let claim = claims
        .get_opt(name)
        .await
        .map_err(|e| api_error(e, &format!("read claims in {namespace}")))?
        .ok_or_else(|| {
            format!(
                "claim {namespace}/{name} not found; create it first (no pod yet, the data's size)"
            )
        })?;
    let class_name = class_name(&claim);
    let class = if class_name.is_empty() {
        None
    } else {
        Api::<StorageClass>::all(client.clone())
            .get_opt(&class_name)
            .await
            .map_err(|e| api_error(e, "read StorageClasses"))?
    };
    let provisioner = crate::DEFAULT_PROVISIONER;
    let facts = claim_facts(&claim, class.as_ref(), provisioner);
    if let Some(why) = reuse::refusal(&volume_facts(&pv, provisioner), &facts) {
        return Err(why.to_string());
    }
    let target = Target {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: facts.uid.clone(),
    };
    let new_pv = naming::pv_name(&target.uid).map_err(|e| e.to_string())?;
    // resourceVersion: the PV checked above is the PV marked, or the patch fails.
    reuse_controller::mark(&volumes, &pv, &target)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => {
                format!(
                    "{} changed while being checked; run the command again",
                    args_pv
                )
            }
            e => api_error(e, "patch PersistentVolumes"),
        })?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds.max(1));
    let mut old_gone = false;
    while Instant::now() < deadline {
        if !old_gone {
            old_gone = matches!(volumes.get_opt(args_pv).await, Ok(None));
        }
        if old_gone {
            let bound = claims.get_opt(name).await.ok().flatten().is_some_and(|c| {
                c.spec.and_then(|s| s.volume_name).as_deref() == Some(new_pv.as_str())
            });
            if bound {
                println!(
                    "reused the data of {} for claim {}: now volume {new_pv}",
                    args_pv,
                    target.key()
                );
                return Ok(true);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "{} is marked for reuse by claim {} but it is not done after {}s; is its node's agent running? \
         (see `kubectl describe pv {}` and `kubectl describe pvc -n {namespace} {name}`)",
        args_pv,
        target.key(),
        args.timeout_seconds,
        args_pv
    ))
}

/// The reuse asked of one agent's node service (root on its node, through its Unix socket): a
/// Released PV of that node or an orphaned directory; the agent checks, acts and waits for the bind.
async fn through_node_service(
    args: &ReuseArgs,
    endpoint: &str,
    namespace: &str,
    name: &str,
) -> Result<bool, String> {
    let address = Address::parse(endpoint);
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let mut client = agents::connect(&address, Duration::from_secs(5)).await?;
    let request = ReuseVolumeRequest {
        pv_name: args.pv.clone().unwrap_or_default(),
        directory: args.directory.clone().unwrap_or_default(),
        root: args.root.clone(),
        claim_namespace: namespace.to_string(),
        claim_name: name.to_string(),
        timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
    };
    let mut call = tonic::Request::new(request);
    call.set_timeout(timeout + Duration::from_secs(10));
    let done = client
        .reuse_volume(call)
        .await
        .map_err(|status| format!("{address}: {}", status.message()))?
        .into_inner();
    let from = args
        .pv
        .clone()
        .or_else(|| args.directory.clone())
        .unwrap_or_default();
    println!(
        "reused the data of {from} for claim {namespace}/{name}: now volume {} ({})",
        done.pv_name, done.directory
    );
    Ok(true)
}
