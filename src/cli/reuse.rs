//! `hostvol reuse PV --for NAMESPACE/CLAIM`: the data of a Released volume goes to a new claim. Like
//! `purge`, the CLI only checks and marks the PV (a PV patch: RBAC's `hostvol-purger` decides who
//! may); the agent of the volume's node creates the claim's PV, renames the directory and removes the
//! old PV (see `controller::reuse`).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::cli::args::ReuseArgs;
use crate::controller::reuse::{claim_facts, volume_facts};
use crate::domain::naming;
use crate::domain::reuse::{self, ANN_REUSE_FOR, Target};

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

pub async fn run(args: &ReuseArgs) -> Result<bool, String> {
    let Some((namespace, name)) = args
        .claim
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Err(format!("--for {:?}: expected NAMESPACE/CLAIM", args.claim));
    };
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster (check KUBECONFIG): {e}"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pv = volumes
        .get_opt(&args.pv)
        .await
        .map_err(|e| api_error(e, "read PersistentVolumes"))?
        .ok_or_else(|| format!("PV {} not found", args.pv))?;
    let claim = claims
        .get_opt(name)
        .await
        .map_err(|e| api_error(e, &format!("read claims in {namespace}")))?
        .ok_or_else(|| {
            format!(
                "claim {namespace}/{name} not found; create it first (no pod yet, the data's size)"
            )
        })?;
    let class_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
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
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": pv.resource_version(),
        "annotations": {ANN_REUSE_FOR: target.record()}}});
    volumes
        .patch(&args.pv, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => {
                format!(
                    "{} changed while being checked; run the command again",
                    args.pv
                )
            }
            e => api_error(e, "patch PersistentVolumes"),
        })?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds.max(1));
    let mut old_gone = false;
    while Instant::now() < deadline {
        if !old_gone {
            old_gone = matches!(volumes.get_opt(&args.pv).await, Ok(None));
        }
        if old_gone {
            let bound = claims.get_opt(name).await.ok().flatten().is_some_and(|c| {
                c.spec.and_then(|s| s.volume_name).as_deref() == Some(new_pv.as_str())
            });
            if bound {
                println!(
                    "reused the data of {} for claim {}: now volume {new_pv}",
                    args.pv,
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
        args.pv,
        target.key(),
        args.timeout_seconds,
        args.pv
    ))
}
