//! The planner: every decision, as a pure function; it touches nothing (no I/O, no clock).
//!
//! The planner: a pure, deterministic function of (policy, inventory, context) that
//! decides everything — which disks each group gets, their layout, and the ordered steps
//! with reasons. No I/O, no clock: the same input always gives the same plan.

pub mod capacity;
pub mod identity;
pub mod layout;
pub mod ownership;
pub mod ready;
pub mod render;
pub mod select;
pub mod service;
pub mod steps;
pub mod usage;

use crate::model::{
    Disk, DiskService, GroupPlan, InUse, Inventory, OutOfServiceDisk, Plan, Refusal, ServicePhase,
    Totals, Verdict,
};
use crate::policy::{DiskGroup, Policy, Wipe};
use layout::{DiskPlan, LayoutInput};
use std::path::{Path, PathBuf};

/// What the planner needs besides policy and inventory.
#[derive(Debug, Clone, Default)]
pub struct PlanContext {
    /// Block-volume links live in `<state_dir>/block/`.
    pub state_dir: PathBuf,
    /// What the operator said: disks out of service, replacements (`disks.json`).
    pub service: DiskService,
}

/// Decide what to do. Pure: reads only its arguments.
pub fn plan(policy: &Policy, inventory: &Inventory, ctx: &PlanContext) -> Plan {
    let mut planner = Planner {
        policy,
        inventory,
        ctx,
        refused: Vec::new(),
        warnings: Vec::new(),
        steps: Vec::new(),
        totals: Totals::default(),
        out_of_service: Vec::new(),
    };
    let assignment = planner.assign();
    let groups = policy
        .disk_groups
        .iter()
        .map(|group| {
            planner.plan_group(
                group,
                assignment
                    .get(&group.name)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            )
        })
        .collect();
    planner.totals.headroom_ratio = if planner.totals.published_bytes == 0 {
        0.0
    } else {
        // Two decimals keep the JSON stable and readable.
        (planner.totals.raw_bytes as f64 / planner.totals.published_bytes as f64 * 100.0).round()
            / 100.0
    };
    Plan {
        node: policy.node.name.clone(),
        storage_root: policy.node.storage_root.clone(),
        groups,
        refused: planner.refused,
        warnings: planner.warnings,
        steps: planner.steps,
        totals: planner.totals,
        out_of_service: planner.out_of_service,
    }
}

/// The verdict `kvstrap disks` shows for each disk under a policy.
pub fn verdicts<'a>(
    policy: Option<&Policy>,
    inventory: &'a Inventory,
    service: &DiskService,
) -> Vec<(&'a Disk, Option<String>, Verdict)> {
    inventory
        .disks
        .iter()
        .map(|disk| {
            let replaced_into = service
                .replacements
                .get(&identity::disk_identity(disk))
                .map(|r| r.group.as_str());
            let groups: Vec<&DiskGroup> = policy
                .map(|p| {
                    p.disk_groups
                        .iter()
                        .filter(|g| match replaced_into {
                            Some(name) => g.name == name,
                            None => select::selects(g, disk),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let root = policy.map(|p| p.node.storage_root.as_path());
            let group = groups.first().copied();
            let verdict = judge_with_root(disk, group, root);
            let io_misfit = || {
                policy.and_then(|p| {
                    p.disk_groups
                        .iter()
                        .find_map(|g| select::io_misfit(g, disk))
                })
            };
            let verdict = match (group, &verdict) {
                (None, Verdict::Free | Verdict::Ours) if policy.is_some() => Verdict::Excluded {
                    reason: match io_misfit() {
                        Some(why) => format!("{}; {why}", verdict.reason()),
                        None => format!("{}; selected by no disk group", verdict.reason()),
                    },
                },
                _ => verdict,
            };
            let record = service
                .out_of_service
                .get(&identity::disk_identity(disk))
                .filter(|r| r.phase == ServicePhase::Drained);
            let verdict = match record {
                Some(r) => Verdict::Excluded {
                    reason: format!("out of service: drained ({})", r.why),
                },
                None => verdict,
            };
            (disk, group.map(|g| g.name.clone()), verdict)
        })
        .collect()
}

/// Ownership verdict, not counting mounts of kvstrap's own filesystems as "in use": its
/// mounts below `storage_root`, and every mount of a partition it made wherever that is
/// (kubelet's bind mounts of a volume into a pod are uses of the volume, never a reason to
/// leave the disk; see [`usage`]).
pub fn judge_with_root(
    disk: &Disk,
    group: Option<&DiskGroup>,
    storage_root: Option<&Path>,
) -> Verdict {
    let contents = ownership::contents_verdict(disk);
    if contents != Verdict::Ours {
        return ownership::judge(disk, group);
    }
    let of_ours = usage::ours_mounted(disk);
    let ours =
        |m: &PathBuf| of_ours.contains(m) || storage_root.is_some_and(|root| m.starts_with(root));
    let all_mounts_ours = disk
        .mountpoints
        .iter()
        .chain(disk.partitions.iter().flat_map(|p| &p.mountpoints))
        .all(ours);
    // A device stacked on one of kvstrap's partitions (a guest's LVM activated on a Block
    // volume) uses that volume: it holds the volume, not the disk.
    let volume_holders: Vec<&String> = disk
        .partitions
        .iter()
        .filter(|p| usage::is_kvstrap_partition(p))
        .flat_map(|p| &p.holders)
        .collect();
    let mut disk = disk.clone();
    // Our own mounts explain both "mounted" and a failing exclusive open.
    disk.in_use.retain(|fact| match fact {
        InUse::Holder { holder } => !volume_holders.contains(&holder),
        InUse::Mounted { mountpoint } => !ours(mountpoint),
        InUse::Busy { .. } => !all_mounts_ours,
        _ => true,
    });
    ownership::judge(&disk, group)
}

struct Planner<'a> {
    policy: &'a Policy,
    inventory: &'a Inventory,
    ctx: &'a PlanContext,
    refused: Vec<Refusal>,
    warnings: Vec<String>,
    steps: Vec<crate::model::Step>,
    totals: Totals,
    out_of_service: Vec<OutOfServiceDisk>,
}

impl<'a> Planner<'a> {
    /// Disks per group in stable order; a disk two groups select goes to neither. A
    /// drained disk goes to none (its mounts and links are released); a replacement goes
    /// to the group of the disk it replaces, whatever the selectors say.
    fn assign(&mut self) -> std::collections::BTreeMap<String, Vec<&'a Disk>> {
        let mut disks: Vec<&Disk> = self.inventory.disks.iter().collect();
        disks.sort_by_key(|d| select::stable_key(d));
        let mut out: std::collections::BTreeMap<String, Vec<&Disk>> = Default::default();
        let twins = same_identity(&disks);
        for disk in disks {
            // A path of a multipath map matches what its map matches (one WWN, one
            // serial): the map stands for it, so it is neither assigned nor refused.
            if is_multipath_path(disk) {
                continue;
            }
            let identity = identity::disk_identity(disk);
            // Two devices with one identity (paths of one LUN without multipath, a cloned
            // serial): everything kvstrap derives from it would collide. Neither is used.
            if let Some(others) = twins.get(&identity) {
                let selected_by = self
                    .policy
                    .disk_groups
                    .iter()
                    .find(|g| select::selects(g, disk))
                    .map(|g| g.name.clone());
                if selected_by.is_some() || self.ctx.service.replacements.contains_key(&identity) {
                    let others: Vec<&PathBuf> =
                        others.iter().filter(|p| **p != disk.path).collect();
                    self.refuse(
                        disk,
                        selected_by.as_deref(),
                        twin_reason(&identity, &others),
                    );
                }
                continue;
            }
            // Degraded is not failed: the map is served, and the operator told why.
            let selected = self
                .policy
                .disk_groups
                .iter()
                .any(|g| select::selects(g, disk));
            if let (Some(why), true) = (
                disk.multipath
                    .as_ref()
                    .and_then(crate::model::Multipath::degraded),
                selected,
            ) {
                self.warn(format!(
                    "multipath map {} is degraded: {why}; its volumes are still served",
                    disk.path.display()
                ));
            }
            if let Some(record) = self.ctx.service.out_of_service.get(&identity) {
                if record.phase == ServicePhase::Drained {
                    self.release_drained(disk, &identity, record);
                    continue;
                }
            }
            let replacement = self.ctx.service.replacements.get(&identity);
            let groups: Vec<&DiskGroup> = self
                .policy
                .disk_groups
                .iter()
                .filter(|g| match replacement {
                    Some(r) => g.name == r.group,
                    None => select::selects(g, disk),
                })
                .collect();
            // A replacement record names the disk by identity: it never brings a disk the
            // group's kind selectors reject, and never one known only by its kernel name.
            if let (Some(r), [group]) = (replacement, groups.as_slice()) {
                let misfit = match select::fits_kind(group, disk) {
                    Err(why) => Some(format!("no longer fits group {:?}: {why}", r.group)),
                    Ok(()) if identity.starts_with("path:") => Some(
                        "has no serial or WWN, so a record cannot tell it from another disk at that path"
                            .to_string(),
                    ),
                    Ok(()) => None,
                };
                if let Some(why) = misfit {
                    self.refuse(
                        disk,
                        Some(&r.group),
                        format!(
                            "put in place of {} by `kvstrap replace`, but it {why}; `kvstrap forget {}` drops the replacement",
                            r.replaces,
                            disk.path.display()
                        ),
                    );
                    continue;
                }
            }
            if let (Some(r), []) = (replacement, groups.as_slice()) {
                self.refuse(
                    disk,
                    Some(&r.group),
                    format!(
                        "put in place of {} in group {:?}, which the policy no longer has; \
                         `kvstrap forget {}` drops the replacement",
                        r.replaces,
                        r.group,
                        disk.path.display()
                    ),
                );
                continue;
            }
            match groups.as_slice() {
                [] => {}
                [group] => out.entry(group.name.clone()).or_default().push(disk),
                many => {
                    let names: Vec<&str> = many.iter().map(|g| g.name.as_str()).collect();
                    let hint =
                        if disk.io.is_none() && many.iter().any(|g| select::wants_io(&g.matcher)) {
                            "; it holds kvstrap's volumes but was never measured (it cannot be \
                         now), so measured-IO selectors cannot tell: name it in one group's \
                         devices"
                        } else {
                            "; make their selectors disjoint"
                        };
                    self.refuse(
                        disk,
                        None,
                        format!("selected by several groups ({}){hint}", names.join(", ")),
                    );
                }
            }
        }
        out
    }

    fn is_draining(&self, disk: &Disk) -> bool {
        self.ctx
            .service
            .out_of_service
            .get(&identity::disk_identity(disk))
            .is_some_and(|r| r.phase == ServicePhase::Draining)
    }

    /// A drained disk: refused with the reason, and its mounts and links released.
    fn release_drained(
        &mut self,
        disk: &Disk,
        identity: &str,
        record: &crate::model::ServiceRecord,
    ) {
        self.refuse(
            disk,
            record.group.as_deref(),
            format!(
                "out of service: drained ({}); `kvstrap undrain {}` puts it back",
                record.why,
                disk.path.display()
            ),
        );
        self.steps.extend(service::release_steps(
            disk,
            self.inventory,
            &self.policy.node.storage_root,
            &self.ctx.state_dir.join("block"),
        ));
        self.out_of_service.push(OutOfServiceDisk {
            disk: disk.path.clone(),
            identity: identity.to_string(),
            group: record.group.clone(),
            phase: ServicePhase::Drained,
            volumes: Vec::new(),
        });
    }

    /// A new LUKS2 header sealed to the TPM2 needs one: without it, a blank disk of a
    /// TPM2 group is left alone (a disk kvstrap provisioned already is opened as usual).
    fn cannot_seal(&self, group: &DiskGroup, verdict: &Verdict, wipe: bool) -> Option<String> {
        let method = group.encryption.as_ref()?.method;
        let new = wipe || *verdict == Verdict::Free;
        (new && method.uses_tpm2() && !self.inventory.tpm2).then(|| {
            format!(
                "group {:?} seals its keys to a TPM2 (method = \"{}\"), and this node has \
                 none (no /dev/tpmrm0): the disk is left blank",
                group.name,
                method.as_str()
            )
        })
    }

    fn warn(&mut self, text: String) {
        if !self.warnings.contains(&text) {
            self.warnings.push(text);
        }
    }

    fn refuse(&mut self, disk: &Disk, group: Option<&str>, reason: String) {
        self.refused.push(Refusal {
            disk: disk.path.clone(),
            group: group.map(String::from),
            reason,
        });
    }

    fn plan_group(&mut self, group: &DiskGroup, candidates: &[&Disk]) -> GroupPlan {
        let mut result = GroupPlan {
            name: group.name.clone(),
            storage_class: group.storage_class.clone(),
            layout: group.layout,
            disks: Vec::new(),
            volumes: Vec::new(),
            pools: Vec::new(),
        };
        let Some(class) = self.policy.storage_class(&group.storage_class) else {
            for disk in candidates {
                self.refuse(
                    disk,
                    Some(&group.name),
                    format!("storage class {:?} is not defined", group.storage_class),
                );
            }
            return result;
        };
        // Disks kvstrap already provisioned come first, so a new blank disk never
        // displaces one that holds volumes when max_disks is reached.
        let mut judged: Vec<(&Disk, Verdict)> = candidates
            .iter()
            .map(|d| {
                (
                    *d,
                    judge_with_root(d, Some(group), Some(&self.policy.node.storage_root)),
                )
            })
            .collect();
        judged.sort_by_key(|(_, v)| *v != Verdict::Ours);
        let mut taken = 0u32;
        for (disk, verdict) in judged {
            // Only the group's own selectors may lead to a wipe, never a replacement record.
            let wipe = group.wipe == Wipe::Force
                && matches!(verdict, Verdict::Foreign { .. })
                && select::selects(group, disk);
            if !verdict.is_writable() && !wipe {
                self.refuse(disk, Some(&group.name), verdict.reason());
                continue;
            }
            if group.max_disks.is_some_and(|max| taken >= max) {
                self.refuse(
                    disk,
                    Some(&group.name),
                    format!("max_disks = {} already reached", taken),
                );
                continue;
            }
            let input = LayoutInput {
                group,
                class,
                disk,
                storage_root: &self.policy.node.storage_root,
                state_dir: &self.ctx.state_dir,
                quota_unsupported: self
                    .inventory
                    .quota_unsupported
                    .get(class.fs_type.as_str())
                    .map(String::as_str),
            };
            let disk_plan = match layout::lay_out(&input) {
                Ok(p) => {
                    if group.layout == crate::model::Layout::Shared
                        && input.quota_unsupported.is_some()
                    {
                        self.warn(format!(
                            "group {}: this kernel cannot enforce project quotas on {} ({}); quota = \"if-supported\" \
                             provisions anyway, so directory volumes can outgrow their published capacity",
                            group.name,
                            class.fs_type.as_str(),
                            input.quota_unsupported.unwrap_or_default()
                        ));
                    }
                    p
                }
                Err(why) => {
                    self.refuse(disk, Some(&group.name), why);
                    continue;
                }
            };
            if let Some(why) = self.cannot_seal(group, &verdict, wipe) {
                self.refuse(disk, Some(&group.name), why);
                continue;
            }
            let draining = self.is_draining(disk);
            if draining && verdict == Verdict::Free {
                // Nothing was ever provisioned on it: nothing to keep, nothing to drain.
                self.out_of_service.push(OutOfServiceDisk {
                    disk: disk.path.clone(),
                    identity: identity::disk_identity(disk),
                    group: Some(group.name.clone()),
                    phase: ServicePhase::Draining,
                    volumes: Vec::new(),
                });
                continue;
            }
            if draining {
                // Kept as it is (mounted, repaired) for the claims still bound to it; its
                // volumes leave the published set, so their unbound PVs are deleted.
                if let Some(refused) = self.disk_steps(disk, &verdict, false, &disk_plan, group) {
                    taken += 1;
                    self.out_of_service.push(OutOfServiceDisk {
                        disk: disk.path.clone(),
                        identity: identity::disk_identity(disk),
                        group: Some(group.name.clone()),
                        phase: ServicePhase::Draining,
                        volumes: without_refused(&disk_plan, &refused),
                    });
                }
                continue;
            }
            if let Some(refused) = self.disk_steps(disk, &verdict, wipe, &disk_plan, group) {
                let mut disk_plan = disk_plan;
                disk_plan.volumes = without_refused(&disk_plan, &refused);
                taken += 1;
                self.totals.raw_bytes += disk.size_bytes;
                self.totals.reserve_bytes += disk_plan.reserve_bytes;
                self.totals.published_bytes += disk_plan
                    .volumes
                    .iter()
                    .map(|v| v.capacity_bytes)
                    .chain(disk_plan.pool.iter().map(|p| p.capacity_bytes))
                    .sum::<u64>();
                result.volumes.extend(disk_plan.volumes);
                result.pools.extend(disk_plan.pool);
                result.disks.push(disk_plan.layout);
            }
        }
        result
    }

    /// Append the steps for one disk. `None` when the disk is refused after all, else the
    /// numbers of its partitions that are left alone (their volumes are not provided).
    fn disk_steps(
        &mut self,
        disk: &Disk,
        verdict: &Verdict,
        wipe: bool,
        plan: &DiskPlan,
        group: &DiskGroup,
    ) -> Option<Vec<u32>> {
        if wipe {
            self.steps.push(crate::model::Step::WipeDisk {
                disk: disk.path.clone(),
                identity: plan.layout.identity.clone(),
                signatures: signature_names(disk),
                reason: format!(
                    "wipe = \"force\" in group {:?} and the disk is named by serial or WWN",
                    group.name
                ),
            });
            steps::fresh_disk(plan, "disk was wiped", &mut self.steps);
            return Some(Vec::new());
        }
        if *verdict == Verdict::Free {
            steps::fresh_disk(plan, "disk is empty", &mut self.steps);
            return Some(Vec::new());
        }
        match steps::adopt_disk(plan, disk, self.inventory) {
            Ok(adoption) => {
                let root = &self.policy.node.storage_root;
                for stray in usage::stray_mounts(disk, &plan.volumes, root) {
                    self.warn(stray);
                }
                let mut refused = Vec::new();
                for (number, why) in adoption.refused {
                    self.refuse(
                        disk,
                        Some(&group.name),
                        format!("partition {number}: {why}"),
                    );
                    refused.push(number);
                }
                self.steps.extend(adoption.steps);
                Some(refused)
            }
            Err(why) => {
                self.refuse(disk, Some(&group.name), why);
                None
            }
        }
    }
}

fn is_multipath_path(disk: &Disk) -> bool {
    disk.in_use
        .iter()
        .any(|r| matches!(r, InUse::MultipathPath { .. }))
}

/// Why a device that shares its identity with `others` is refused, in the words of the
/// likeliest cause: two paths of one SAN LUN that dm-multipath does not hold together.
fn twin_reason(identity: &str, others: &[&PathBuf]) -> String {
    let names: Vec<String> = others.iter().map(|p| p.display().to_string()).collect();
    let names = names.join(", ");
    let (kind, value) = identity.split_once(':').unwrap_or(("identity", identity));
    match kind {
        "wwn" => format!(
            "same WWN ({value}) as {names}: if these are paths of one LUN, run multipathd \
             (multipath-tools) so that the LUN is one multipath map, which kvstrap uses; \
             otherwise two disks report one WWN. Neither is used"
        ),
        "serial" => format!(
            "same serial ({value}) as {names}: the same disk seen twice (several paths to one \
             LUN: run multipathd and use its map) or a cloned serial; neither is used"
        ),
        _ => format!(
            "{identity} is also the identity of {names}: the same disk seen twice; neither is used"
        ),
    }
}

/// Identities (`wwn:`, `serial:`, `loop:`) that more than one device has, with them. The
/// paths of a multipath map share its identity by nature: they are never candidates.
fn same_identity(disks: &[&Disk]) -> std::collections::BTreeMap<String, Vec<PathBuf>> {
    let mut seen: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for d in disks.iter().filter(|d| !is_multipath_path(d)) {
        seen.entry(identity::disk_identity(d))
            .or_default()
            .push(d.path.clone());
    }
    seen.retain(|id, paths| paths.len() > 1 && !id.starts_with("path:"));
    seen
}

/// The volumes of `plan` except those on a partition left alone: what kvstrap cannot
/// vouch for is never published (it would point a claim at an empty directory).
fn without_refused(plan: &DiskPlan, refused: &[u32]) -> Vec<crate::model::VolumeSpec> {
    let devices: Vec<&PathBuf> = plan
        .layout
        .partitions
        .iter()
        .filter(|p| refused.contains(&p.number))
        .map(|p| &p.device)
        .collect();
    plan.volumes
        .iter()
        .filter(|v| !devices.contains(&&v.device))
        .cloned()
        .collect()
}

fn signature_names(disk: &Disk) -> Vec<String> {
    let mut names: Vec<String> = disk
        .partition_table
        .iter()
        .map(|t| format!("{} partition table", t.kind))
        .collect();
    names.extend(disk.signatures.iter().map(|s| s.kind.clone()));
    for p in &disk.partitions {
        names.extend(
            p.signatures
                .iter()
                .map(|s| format!("{} on partition {}", s.kind, p.number)),
        );
    }
    names
}

#[cfg(test)]
pub(crate) mod tests;
