//! `hostvol purge PV`: the explicit end of a Retain volume. The CLI only marks the PV (so Kubernetes RBAC
//! decides who may purge); the agent of the volume's node removes the directory, then the PV.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::cli::args::PurgeArgs;
use crate::controller::reclaim::ANN_PURGE;

/// Why a PV may not be purged, or None if it may.
pub fn refusal(pv: &PersistentVolume, provisioner: &str) -> Option<String> {
    let name = pv.name_any();
    if pv
        .annotations()
        .get(crate::controller::pv::ANN_PROVISIONED_BY)
        .map(String::as_str)
        != Some(provisioner)
    {
        return Some(format!(
            "{name} was not provisioned by hostvol; nothing done"
        ));
    }
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown");
    if phase == "Bound" {
        return Some(format!(
            "{name} is Bound to a claim; delete the claim first (its data is kept while the PV is Released)"
        ));
    }
    if phase == "Pending" {
        return Some(format!("{name} is Pending; wait until it is Released"));
    }
    None
}

fn describe(pv: &PersistentVolume) -> String {
    let spec = pv.spec.clone().unwrap_or_default();
    let claim = spec
        .claim_ref
        .map(|c| {
            format!(
                "{}/{}",
                c.namespace.unwrap_or_default(),
                c.name.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let size = spec
        .capacity
        .and_then(|c| c.get("storage").map(|q| q.0.clone()))
        .unwrap_or_default();
    let node = pv
        .annotations()
        .get(crate::controller::pv::ANN_NODE)
        .cloned()
        .unwrap_or_default();
    let dir = pv
        .annotations()
        .get(crate::controller::pv::ANN_DIRECTORY)
        .cloned()
        .unwrap_or_default();
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    format!(
        "{} ({phase}, {size}, was claim {claim}): directory {dir} on node {node}",
        pv.name_any()
    )
}

pub async fn run(args: &PurgeArgs) -> Result<bool, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster (check KUBECONFIG): {e}"))?;
    let volumes: Api<PersistentVolume> = Api::all(client);
    let pv = volumes
        .get_opt(&args.pv)
        .await
        .map_err(|e| format!("cannot read PV {}: {e}", args.pv))?
        .ok_or_else(|| format!("PV {} not found", args.pv))?;
    if let Some(why) = refusal(&pv, crate::DEFAULT_PROVISIONER) {
        return Err(why);
    }
    let summary = describe(&pv);
    if !args.yes {
        eprint!("Purge {summary}?\nThis deletes the data for good. Type 'yes' to continue: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if answer.trim() != "yes" {
            eprintln!("not purged");
            return Ok(false);
        }
    }
    let patch = serde_json::json!({"metadata": {"annotations": {ANN_PURGE: "requested"}}});
    volumes
        .patch(&args.pv, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("cannot mark {} for purging: {e}", args.pv))?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds.max(1));
    loop {
        match volumes.get_opt(&args.pv).await {
            Ok(None) => {
                println!("purged {summary}");
                return Ok(true);
            }
            Ok(Some(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            _ => {
                return Err(format!(
                    "{} is marked for purging but its node's agent has not finished after {}s; is the agent running? \
                     (see `kubectl describe pv {}`)",
                    args.pv, args.timeout_seconds, args.pv
                ));
            }
        }
    }
}
