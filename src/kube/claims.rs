//! Who holds a disk's PersistentVolumes: claims and the pods (or VMs) using them; and the
//! clean-up of a forgotten disk's unbound PVs. Never deletes a Bound PV.

use super::builders::node_selector;
use super::client::describe;
use super::reconcile::{claim_of, disk_identity};
use ::kube::api::{Api, DeleteParams, ListParams, Preconditions};
use ::kube::Client;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use std::collections::{BTreeMap, BTreeSet};

/// A PV of a disk out of service, with who uses it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub pv: String,
    pub phase: Option<String>,
    /// `namespace/name` of its claim.
    pub claim: Option<String>,
    /// `namespace/pod`, with ` (VirtualMachineInstance name)` when KubeVirt owns the pod.
    pub pods: Vec<String>,
}

/// The PVs kvstrap published for `node`.
async fn node_pvs(
    api: &Api<PersistentVolume>,
    node: &str,
) -> Result<::kube::api::ObjectList<PersistentVolume>, String> {
    api.list(&ListParams::default().labels(&node_selector(node)))
        .await
        .map_err(|e| {
            format!(
                "cannot list the PersistentVolumes of node {node}: {}",
                describe(&e)
            )
        })
}

/// Per disk identity in `disks`: its PVs in the cluster and who uses them.
pub async fn holders(
    client: &Client,
    node: &str,
    disks: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<Holder>>, String> {
    let list = node_pvs(&Api::all(client.clone()), node).await?;
    let mut out: BTreeMap<String, Vec<Holder>> =
        disks.iter().map(|d| (d.clone(), Vec::new())).collect();
    for pv in &list.items {
        let Some(id) = disk_identity(pv).filter(|id| disks.contains(*id)) else {
            continue;
        };
        let claim = claim_of(pv);
        let pods = match &claim {
            Some(c) => pods_using(client, c).await,
            None => Vec::new(),
        };
        out.entry(id.to_string()).or_default().push(Holder {
            pv: pv.metadata.name.clone().unwrap_or_default(),
            phase: pv.status.as_ref().and_then(|s| s.phase.clone()),
            claim,
            pods,
        });
    }
    Ok(out)
}

/// Pods that mount the claim `namespace/name`; a failure to list says so in the list.
async fn pods_using(client: &Client, claim: &str) -> Vec<String> {
    let Some((ns, name)) = claim.split_once('/') else {
        return Vec::new();
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = match pods.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(e) => return vec![format!("(cannot list pods in {ns}: {})", describe(&e))],
    };
    list.items
        .iter()
        .filter(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == name)
                })
            })
        })
        .map(|p| {
            let pod = format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or_default());
            let vmi = p
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "VirtualMachineInstance");
            match vmi {
                Some(o) => format!("{pod} (VirtualMachineInstance {})", o.name),
                None => pod,
            }
        })
        .collect()
}

/// What forgetting a disk did in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Forgotten {
    /// PVs deleted: not bound (Available, Released, Failed, whatever the reclaim policy).
    pub deleted: Vec<String>,
    /// Bound PVs: kept, with their claims. The claim's owner decides.
    pub bound: Vec<Holder>,
    pub errors: Vec<String>,
}

/// Delete every unbound PV of a disk that is gone for good; keep and list the Bound ones.
/// Each delete carries the uid and resourceVersion seen, so a bind in between wins.
pub async fn forget_disk(client: &Client, node: &str, identity: &str) -> Result<Forgotten, String> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let list = node_pvs(&api, node).await?;
    let mut out = Forgotten::default();
    for pv in list
        .items
        .iter()
        .filter(|pv| disk_identity(pv) == Some(identity))
    {
        let name = pv.metadata.name.clone().unwrap_or_default();
        let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Bound") || (phase.is_none() && claim_of(pv).is_some()) {
            out.bound.push(Holder {
                pv: name,
                phase,
                claim: claim_of(pv),
                pods: Vec::new(),
            });
            continue;
        }
        if pv.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pv.metadata.uid.clone(),
                resource_version: pv.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => out.deleted.push(name),
            Err(::kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => out
                .errors
                .push(format!("delete PersistentVolume {name}: {}", describe(&e))),
        }
    }
    Ok(out)
}
