//! Gathering a [`Snapshot`] after a run: verdicts and health of the disks, the volumes of
//! the plan with their state, and how full each volume is. Read-only: the used bytes come
//! from the project quota of a directory volume (one ioctl) or `statvfs` of a volume
//! that is its own mounted filesystem.

use super::{stats::RunStats, DiskSample, PoolSample, Snapshot, VolumeSample};
use crate::health::HealthMap;
use crate::model::{Inventory, PathFacts, Plan, VolumeMode, VolumeSpec};
use crate::policy::Policy;
use std::path::Path;

/// What the publisher reports, for the publication metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublicationCounts {
    pub pending: u64,
    pub errors: u64,
}

pub fn snapshot(
    policy: &Policy,
    inventory: &Inventory,
    plan: &Plan,
    health: &HealthMap,
    stats: RunStats,
    publications: PublicationCounts,
) -> Snapshot {
    let disks = crate::plan::verdicts(Some(policy), inventory, &Default::default())
        .into_iter()
        .map(|(disk, group, verdict)| DiskSample {
            path: disk.path.clone(),
            // Out of service is what an operator watches for; the verdict behind it less.
            state: plan
                .out_of_service
                .iter()
                .find(|o| o.disk == disk.path)
                .map_or_else(|| verdict_name(&verdict), |o| o.phase.as_str()),
            health: group.as_ref().and_then(|_| health.get(&disk.path).cloned()),
            io: disk.io,
            multipath: group.as_ref().and(disk.multipath.clone()),
            group,
        })
        .collect();
    let volumes = plan
        .volumes()
        .map(|v| {
            let state = if crate::plan::ready::pending(plan, v) {
                "pending"
            } else {
                "ready"
            }
            .to_string();
            VolumeSample {
                used_bytes: (state == "ready")
                    .then(|| used_bytes(v, inventory))
                    .flatten(),
                name: v.name.clone(),
                storage_class: v.storage_class.clone(),
                group: v.group.clone(),
                disk: v.disk.clone(),
                state,
                capacity_bytes: v.capacity_bytes,
                encrypted: v.encrypted(),
            }
        })
        .collect();
    let (volumes, pools) = with_dynamic(plan, volumes);
    Snapshot {
        disks,
        volumes,
        stats,
        publications_pending: publications.pending,
        publication_errors: publications.errors,
        pools,
        luks_locked: 0,
    }
}

/// The dynamic volumes on the plan's pools (as ready volumes, their size what their quota
/// holds), and each pool's figures.
fn with_dynamic(
    plan: &Plan,
    mut volumes: Vec<VolumeSample>,
) -> (Vec<VolumeSample>, Vec<PoolSample>) {
    let specs: Vec<crate::model::PoolSpec> = plan.pools().cloned().collect();
    if specs.is_empty() {
        return (volumes, Vec::new());
    }
    let served = crate::dynamic::volumes::observe(&specs);
    for s in &served {
        let Some(pool) = specs.iter().find(|p| p.mountpoint == s.pool) else {
            continue;
        };
        // What the directory's project holds, where a quota is set on it.
        let used = crate::host::quota::get_quota(&s.path)
            .ok()
            .filter(|q| q.hard_limit_bytes.is_some())
            .map(|q| q.used_bytes);
        volumes.push(VolumeSample {
            name: format!("{}{}", crate::dynamic::DIR_PREFIX, s.claim_uid),
            storage_class: pool.storage_class.clone(),
            group: pool.group.clone(),
            disk: pool.disk.clone(),
            state: if s.bytes.is_some() {
                "ready"
            } else {
                "pending"
            }
            .into(),
            capacity_bytes: s.bytes.unwrap_or_default(),
            used_bytes: used,
            encrypted: pool.mapping.is_some(),
        });
    }
    let pools = crate::dynamic::accounting::pools(&specs, &served, &|_| 0)
        .iter()
        .map(|p| PoolSample {
            group: p.spec.group.clone(),
            storage_class: p.spec.storage_class.clone(),
            disk: p.spec.disk.clone(),
            capacity_bytes: p.spec.capacity_bytes,
            used_bytes: p.used,
            volumes: served
                .iter()
                .filter(|s| s.pool == p.spec.mountpoint)
                .count() as u64,
        })
        .collect();
    (volumes, pools)
}

fn verdict_name(v: &crate::model::Verdict) -> &'static str {
    use crate::model::Verdict;
    match v {
        Verdict::Ours => "ours",
        Verdict::Free => "free",
        Verdict::Foreign { .. } => "foreign",
        Verdict::InUse { .. } => "in_use",
        Verdict::Excluded { .. } => "excluded",
    }
}

/// How full the volume is, where the machine can tell without walking its files.
fn used_bytes(v: &VolumeSpec, inventory: &Inventory) -> Option<u64> {
    if v.volume_mode == VolumeMode::Block {
        return None;
    }
    if v.project_id.is_some() {
        // A directory on a shared filesystem: only its project quota counts its blocks.
        return match inventory.paths.get(&v.path) {
            Some(PathFacts::Directory {
                quota_bytes: Some(_),
                ..
            }) => crate::host::quota::get_quota(&v.path)
                .ok()
                .map(|q| q.used_bytes),
            _ => None,
        };
    }
    // A volume with its own filesystem, if that filesystem is mounted on it now.
    let mounted = inventory
        .disks
        .iter()
        .flat_map(|d| &d.partitions)
        .any(|p| p.path == v.device && p.mountpoints.contains(&v.path));
    mounted.then(|| filesystem_used(&v.path)).flatten()
}

fn filesystem_used(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let used_blocks = st.blocks().saturating_sub(st.blocks_free());
    Some(used_blocks.saturating_mul(st.fragment_size()))
}
