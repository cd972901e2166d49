//! What to do about each claim and each dynamic PV: a pure function of what the API server and the pools say.

use super::accounting::{self, Served};
use crate::model::PoolSpec;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// A claim as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub class: String,
    /// `spec.resources.requests.storage`, in bytes.
    pub request: u64,
    /// `volume.kubernetes.io/selected-node`.
    pub selected_node: Option<String>,
    /// `spec.volumeName`: the PV it is bound (or being bound) to.
    pub volume_name: Option<String>,
    pub deleting: bool,
    pub block: bool,
    pub access_modes: Vec<String>,
    /// `status.capacity.storage`, in bytes.
    pub capacity: Option<u64>,
}

impl Claim {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A dynamic PV of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// The uid of the claim it was made for.
    pub claim_uid: Option<String>,
    pub phase: String,
    pub reclaim_delete: bool,
    pub deleting: bool,
    pub has_finalizer: bool,
    pub capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make (or finish making) the claim's directory on `pool`, then its PV.
    Provision {
        claim: Claim,
        pool: PathBuf,
        bytes: u64,
        project_id: u32,
    },
    /// The directory is there, its PV is not (a run that ended in between): create it.
    Publish { claim: Claim, served: Served },
    /// No pool of this node has room after all (claims raced for it): give the claim back
    /// to the scheduler.
    Reschedule { claim: Claim, why: String },
    /// A claim kvstrap cannot serve anywhere (a Block claim, ReadWriteMany): said once.
    Refuse { claim: Claim, why: String },
    /// A bound claim grew: raise the quota, then the PV and the claim's capacity.
    Expand {
        claim: Claim,
        served: Served,
        pv: String,
        bytes: u64,
        project_id: u32,
    },
    NoRoomToExpand {
        claim: Claim,
        pv: String,
        why: String,
    },
    /// Released with reclaim Delete (or deleted): the directory goes, then the PV.
    Reclaim {
        volume: Volume,
        served: Option<Served>,
    },
    /// A directory no PV and no claim stands for (a claim deleted while it was made).
    RemoveOrphan { served: Served },
}

/// Everything one decision reads.
pub struct Inputs<'a> {
    pub node: &'a str,
    /// Pools of the dynamic groups, mounted or not (those not mounted serve nothing).
    pub pools: &'a [PoolSpec],
    /// Pools whose filesystem is mounted now.
    pub mounted: &'a BTreeSet<PathBuf>,
    pub served: &'a [Served],
    /// Every claim of the cluster (any class): a directory is an orphan only when no
    /// claim has its uid.
    pub claims: &'a [Claim],
    /// The dynamic PVs of this node.
    pub volumes: &'a [Volume],
    /// Both lists are complete (listed and watched): orphans may be judged.
    pub complete: bool,
}

/// The actions that bring the pools and the cluster in line, in a stable order.
pub fn decide(i: &Inputs<'_>) -> Vec<Action> {
    let mut out = Vec::new();
    for v in i.volumes {
        if let Some(a) = reclaim(i, v) {
            out.push(a);
        }
    }
    let classes: BTreeSet<&str> = i.pools.iter().map(|p| p.storage_class.as_str()).collect();
    let request_of = |s: &Served| {
        i.claims
            .iter()
            .find(|c| c.uid == s.claim_uid)
            .map_or(0, |c| accounting::round_up(c.request))
    };
    let usable: Vec<PoolSpec> = i
        .pools
        .iter()
        .filter(|p| i.mounted.contains(&p.mountpoint))
        .cloned()
        .collect();
    let mut pools = accounting::pools(&usable, i.served, &request_of);
    let mut claims: Vec<&Claim> = i
        .claims
        .iter()
        .filter(|c| classes.contains(c.class.as_str()) && !c.deleting)
        .collect();
    claims.sort_by(|a, b| a.uid.cmp(&b.uid));
    for c in claims {
        if let Some(a) = for_claim(i, c, &mut pools) {
            out.push(a);
        }
    }
    if i.complete {
        out.extend(orphans(i));
    }
    out
}

fn reclaim(i: &Inputs<'_>, v: &Volume) -> Option<Action> {
    let released = matches!(v.phase.as_str(), "Released" | "Failed") && v.reclaim_delete;
    let deleted = v.deleting && v.has_finalizer && v.phase != "Bound";
    (released || deleted).then(|| Action::Reclaim {
        volume: v.clone(),
        served: v
            .claim_uid
            .as_ref()
            .and_then(|uid| i.served.iter().find(|s| &s.claim_uid == uid))
            .cloned(),
    })
}

fn for_claim(i: &Inputs<'_>, c: &Claim, pools: &mut [accounting::Pool<'_>]) -> Option<Action> {
    let pv_name = crate::kube::dynamic::pv_name(&c.uid);
    let served = i.served.iter().find(|s| s.claim_uid == c.uid);
    if let Some(pv) = i.volumes.iter().find(|v| v.name == pv_name) {
        let bound = c.volume_name.as_deref() == Some(pv_name.as_str());
        return bound.then(|| expand(c, pv, served?, pools)).flatten();
    }
    if c.selected_node.as_deref() != Some(i.node) || c.volume_name.is_some() {
        return None;
    }
    if c.request == 0 {
        return Some(Action::Refuse {
            claim: c.clone(),
            why: "the claim's resources.requests.storage is missing or not a size".into(),
        });
    }
    if c.block {
        return Some(Action::Refuse {
            claim: c.clone(),
            why: "a dynamic kvstrap volume is a directory: the claim asks for volumeMode Block; use a static Block class".into(),
        });
    }
    if let Some(m) = c
        .access_modes
        .iter()
        .find(|m| m.as_str() == "ReadWriteMany" || m.as_str() == "ReadOnlyMany")
    {
        return Some(Action::Refuse {
            claim: c.clone(),
            why: format!("a local volume is reachable from one node only: {m} cannot be served"),
        });
    }
    let bytes = accounting::round_up(c.request);
    match served {
        Some(s) if s.bytes.is_some() => Some(Action::Publish {
            claim: c.clone(),
            served: s.clone(),
        }),
        // Its making did not finish: finish it where it is (its room is counted).
        Some(s) => Some(Action::Provision {
            claim: c.clone(),
            pool: s.pool.clone(),
            bytes,
            project_id: s.project_id.unwrap_or_else(|| fresh_project(i, &c.uid)),
        }),
        None => match accounting::choose(pools, &c.class, bytes) {
            Some(at) => {
                pools[at].used = pools[at].used.saturating_add(bytes);
                Some(Action::Provision {
                    claim: c.clone(),
                    pool: pools[at].spec.mountpoint.clone(),
                    bytes,
                    project_id: fresh_project(i, &c.uid),
                })
            }
            None => {
                let (_, largest) = accounting::room(pools, &c.class);
                Some(Action::Reschedule {
                    claim: c.clone(),
                    why: format!(
                        "node {} has no pool of class {} with room for {} bytes (the largest has {} free)",
                        i.node, c.class, bytes, largest
                    ),
                })
            }
        },
    }
}

fn expand(
    c: &Claim,
    pv: &Volume,
    served: &Served,
    pools: &mut [accounting::Pool<'_>],
) -> Option<Action> {
    let bytes = accounting::round_up(c.request);
    let has = served.bytes.unwrap_or_default();
    if bytes <= pv.capacity && c.capacity.is_some_and(|cap| cap >= c.request) {
        return None;
    }
    if bytes <= has.max(pv.capacity) {
        // The quota holds it already: only the PV or the claim's status is behind.
        return Some(Action::Expand {
            claim: c.clone(),
            served: served.clone(),
            pv: pv.name.clone(),
            bytes: has.max(pv.capacity).max(bytes),
            project_id: served.project_id.unwrap_or_default(),
        });
    }
    let more = bytes - has;
    let pool = pools
        .iter_mut()
        .find(|p| p.spec.mountpoint == served.pool)?;
    if pool.free() < more {
        return Some(Action::NoRoomToExpand {
            claim: c.clone(),
            pv: pv.name.clone(),
            why: format!(
                "its pool has {} bytes free, the claim needs {more} more: it keeps {has} bytes",
                pool.free()
            ),
        });
    }
    pool.used = pool.used.saturating_add(more);
    Some(Action::Expand {
        claim: c.clone(),
        served: served.clone(),
        pv: pv.name.clone(),
        bytes,
        project_id: served.project_id.unwrap_or_default(),
    })
}

/// A project id for a new directory, clear of every id on the node's pools.
fn fresh_project(i: &Inputs<'_>, uid: &str) -> u32 {
    let taken: BTreeSet<u32> = i.served.iter().filter_map(|s| s.project_id).collect();
    accounting::project_id(uid, &taken)
}

fn orphans(i: &Inputs<'_>) -> Vec<Action> {
    i.served
        .iter()
        .filter(|s| {
            let pv = crate::kube::dynamic::pv_name(&s.claim_uid);
            let has_pv = i.volumes.iter().any(|v| v.name == pv);
            let wanted = i.claims.iter().any(|c| {
                c.uid == s.claim_uid && !c.deleting && c.selected_node.as_deref() == Some(i.node)
            });
            !has_pv && !wanted
        })
        .map(|s| Action::RemoveOrphan { served: s.clone() })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::accounting::tests::{served as dir, spec};
    use super::*;

    const GIB: u64 = 1 << 30;

    fn claim(uid: &str, request: u64) -> Claim {
        Claim {
            uid: uid.into(),
            namespace: "vms".into(),
            name: format!("c-{uid}"),
            class: "dyn".into(),
            request,
            selected_node: Some("w1".into()),
            volume_name: None,
            deleting: false,
            block: false,
            access_modes: vec!["ReadWriteOnce".into()],
            capacity: None,
        }
    }

    fn pv(uid: &str, phase: &str, capacity: u64) -> Volume {
        Volume {
            name: format!("pvc-{uid}"),
            uid: format!("pv-{uid}"),
            resource_version: "7".into(),
            claim_uid: Some(uid.into()),
            phase: phase.into(),
            reclaim_delete: true,
            deleting: false,
            has_finalizer: true,
            capacity,
        }
    }

    fn run(
        pools: &[PoolSpec],
        served: &[Served],
        claims: &[Claim],
        volumes: &[Volume],
    ) -> Vec<Action> {
        let mounted = pools.iter().map(|p| p.mountpoint.clone()).collect();
        decide(&Inputs {
            node: "w1",
            pools,
            mounted: &mounted,
            served,
            claims,
            volumes,
            complete: true,
        })
    }

    fn kinds(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Provision { claim, pool, .. } => {
                    format!("provision {} on {}", claim.uid, pool.display())
                }
                Action::Publish { claim, .. } => format!("publish {}", claim.uid),
                Action::Reschedule { claim, .. } => format!("reschedule {}", claim.uid),
                Action::Refuse { claim, .. } => format!("refuse {}", claim.uid),
                Action::Expand { claim, bytes, .. } => format!("expand {} to {bytes}", claim.uid),
                Action::NoRoomToExpand { claim, .. } => format!("no room to expand {}", claim.uid),
                Action::Reclaim { volume, .. } => format!("reclaim {}", volume.name),
                Action::RemoveOrphan { served } => format!("orphan {}", served.claim_uid),
            })
            .collect()
    }

    #[test]
    fn claims_race_for_room_and_the_loser_is_rescheduled() {
        let pools = [spec("dyn", "/p/a", 10 * GIB), spec("dyn", "/p/b", 6 * GIB)];
        let claims = [
            claim("a", 7 * GIB),
            claim("b", 5 * GIB),
            claim("c", 5 * GIB),
        ];
        assert_eq!(
            kinds(&run(&pools, &[], &claims, &[])),
            ["provision a on /p/a", "provision b on /p/b", "reschedule c",]
        );
    }

    #[test]
    fn a_restart_finishes_what_it_started_and_never_serves_twice() {
        let pools = [spec("dyn", "/p/a", 10 * GIB)];
        let claims = [claim("a", GIB), claim("b", GIB), claim("c", GIB)];
        let served = [
            dir("/p/a", "a", Some(GIB)), // made, PV not created yet
            dir("/p/a", "b", None),      // making interrupted
        ];
        let volumes = [];
        let got = kinds(&run(&pools, &served, &claims, &volumes));
        assert_eq!(
            got,
            ["publish a", "provision b on /p/a", "provision c on /p/a"]
        );
        // Once bound, nothing is left to do.
        let mut bound = claims.clone();
        for c in &mut bound {
            c.volume_name = Some(format!("pvc-{}", c.uid));
            c.capacity = Some(GIB);
        }
        let all = [
            dir("/p/a", "a", Some(GIB)),
            dir("/p/a", "b", Some(GIB)),
            dir("/p/a", "c", Some(GIB)),
        ];
        let pvs: Vec<Volume> = ["a", "b", "c"]
            .iter()
            .map(|u| pv(u, "Bound", GIB))
            .collect();
        assert!(run(&pools, &all, &bound, &pvs).is_empty());
    }

    #[test]
    fn claims_of_other_nodes_classes_or_kinds_are_left_or_refused() {
        let pools = [spec("dyn", "/p/a", 10 * GIB)];
        let mut other_node = claim("a", GIB);
        other_node.selected_node = Some("w2".into());
        let mut other_class = claim("b", GIB);
        other_class.class = "static".into();
        let mut block = claim("c", GIB);
        block.block = true;
        let mut rwx = claim("d", GIB);
        rwx.access_modes = vec!["ReadWriteMany".into()];
        let got = kinds(&run(
            &pools,
            &[],
            &[other_node, other_class, block, rwx],
            &[],
        ));
        assert_eq!(got, ["refuse c", "refuse d"]);
    }

    #[test]
    fn expansion_raises_the_quota_when_the_pool_has_room() {
        let pools = [spec("dyn", "/p/a", 4 * GIB)];
        let mut c = claim("a", 3 * GIB);
        c.volume_name = Some("pvc-a".into());
        c.capacity = Some(GIB);
        let served = [dir("/p/a", "a", Some(GIB))];
        let got = kinds(&run(
            &pools,
            &served,
            std::slice::from_ref(&c),
            &[pv("a", "Bound", GIB)],
        ));
        assert_eq!(got, [format!("expand a to {}", 3 * GIB)]);
        c.request = 5 * GIB;
        let got = kinds(&run(
            &pools,
            &served,
            std::slice::from_ref(&c),
            &[pv("a", "Bound", GIB)],
        ));
        assert_eq!(got, ["no room to expand a"]);
        // Quota raised, PV and claim behind: only they are updated.
        c.request = 3 * GIB;
        let grown = [dir("/p/a", "a", Some(3 * GIB))];
        let got = kinds(&run(
            &pools,
            &grown,
            std::slice::from_ref(&c),
            &[pv("a", "Bound", GIB)],
        ));
        assert_eq!(got, [format!("expand a to {}", 3 * GIB)]);
    }

    #[test]
    fn released_volumes_are_reclaimed_and_orphans_removed() {
        let pools = [spec("dyn", "/p/a", 4 * GIB)];
        let served = [
            dir("/p/a", "gone", Some(GIB)),
            dir("/p/a", "orphan", Some(GIB)),
        ];
        let mut retained = pv("kept", "Released", GIB);
        retained.reclaim_delete = false;
        let got = kinds(&run(
            &pools,
            &served,
            &[],
            &[pv("gone", "Released", GIB), retained],
        ));
        assert_eq!(got, ["reclaim pvc-gone", "orphan orphan"]);
        // Without complete lists nothing is judged an orphan.
        let mounted = BTreeSet::from([PathBuf::from("/p/a")]);
        let partial = decide(&Inputs {
            node: "w1",
            pools: &pools,
            mounted: &mounted,
            served: &served,
            claims: &[],
            volumes: &[],
            complete: false,
        });
        assert!(partial.is_empty(), "{partial:?}");
    }

    #[test]
    fn an_unmounted_pool_serves_nothing() {
        let pools = [spec("dyn", "/p/a", 10 * GIB)];
        let none = BTreeSet::new();
        let got = decide(&Inputs {
            node: "w1",
            pools: &pools,
            mounted: &none,
            served: &[],
            claims: &[claim("a", GIB)],
            volumes: &[],
            complete: true,
        });
        assert_eq!(kinds(&got), ["reschedule a"]);
    }
}
