//! Desired versus observed: the steps that bring one disk to its layout. A disk that
//! already matches yields no steps, which is what makes a second apply a no-op.

use super::layout::DiskPlan;
use crate::model::{
    Disk, FsSpec, Inventory, PartitionSpec, PathFacts, Step, VolumeMode, VolumeSpec,
};

/// Steps for a blank disk: everything.
pub fn fresh_disk(plan: &DiskPlan, reason: &str, steps: &mut Vec<Step>) {
    steps.push(Step::WritePartitionTable {
        disk: plan.layout.disk.clone(),
        layout: plan.layout.clone(),
        reason: reason.to_string(),
    });
    for part in &plan.layout.partitions {
        if let Some(fs) = &part.filesystem {
            steps.push(mkfs(plan, part, fs, "new partition"));
            steps.push(mount(plan, part, fs, "new filesystem"));
        }
    }
    for volume in &plan.volumes {
        volume_steps(plan, volume, None, false, steps);
    }
}

/// Problems that keep kvstrap from adopting a disk or a partition it laid out earlier.
#[derive(Debug, Default)]
pub struct Adoption {
    pub steps: Vec<Step>,
    /// Partitions (and so their volumes) left alone, with the reason.
    pub refused: Vec<(u32, String)>,
}

/// Steps for a disk kvstrap provisioned earlier: finish what is missing, never redo.
pub fn adopt_disk(plan: &DiskPlan, disk: &Disk, inventory: &Inventory) -> Result<Adoption, String> {
    check_same_layout(plan, disk)?;
    check_same_kind(plan, disk)?;
    let mut out = Adoption::default();
    // After a reboot the kernel may not know partitions kvstrap wrote (loop devices
    // attached without partition scanning, or a table written just before a crash).
    let missing: Vec<u32> = disk
        .partitions
        .iter()
        .filter(|p| !p.in_kernel)
        .map(|p| p.number)
        .collect();
    if !missing.is_empty() {
        out.steps.push(Step::AddPartitionNodes {
            disk: plan.layout.disk.clone(),
            layout: plan.layout.clone(),
            numbers: missing,
            reason: "the kernel does not know these partitions yet".into(),
        });
    }
    for part in &plan.layout.partitions {
        let observed = disk.partitions.iter().find(|p| p.number == part.number);
        let signatures = observed
            .map(|p| p.signatures.as_slice())
            .unwrap_or_default();
        let mountpoints = observed
            .map(|p| p.mountpoints.as_slice())
            .unwrap_or_default();
        let role = observed.map(|p| p.role).unwrap_or_default();
        match &part.filesystem {
            // An older kvstrap recorded no role: an empty partition may be a raw Block
            // volume whose tenant wrote no signature. Never format what may be data.
            Some(_) if signatures.is_empty() && role.is_unrecorded() => out.refused.push((
                part.number,
                format!(
                    "partition {} has no filesystem and no recorded role (an older kvstrap \
                     made it): it may be a raw Block volume, so kvstrap does not format it; \
                     if it holds nothing, wipe the disk to provision it again",
                    part.device.display()
                ),
            )),
            Some(fs) => match signatures {
                [] => {
                    out.steps
                        .push(mkfs(plan, part, fs, "partition has no filesystem yet"));
                    out.steps.push(mount(plan, part, fs, "new filesystem"));
                }
                [sig] if sig.unfinished && is_planned(fs, sig) => {
                    out.steps
                        .push(mkfs(plan, part, fs, "an earlier mkfs did not finish"));
                    out.steps.push(mount(plan, part, fs, "new filesystem"));
                }
                [sig] if fs_matches(fs, sig) => {
                    if !mountpoints.contains(&fs.mountpoint) {
                        out.steps
                            .push(mount(plan, part, fs, "filesystem is not mounted"));
                    }
                }
                sigs => out
                    .refused
                    .push((part.number, foreign_partition(part, sigs))),
            },
            // A raw Block volume: what is on it is its tenant's (a guest's filesystem,
            // partition table, LVM). kvstrap never puts a signature there itself.
            None => {}
        }
    }
    for volume in &plan.volumes {
        let number = plan
            .layout
            .partitions
            .iter()
            .find(|p| p.device == volume.device)
            .map(|p| p.number);
        if out.refused.iter().any(|(n, _)| Some(*n) == number) {
            continue;
        }
        let observed = inventory.paths.get(&volume.path);
        let udev_named = number.is_some_and(|n| {
            disk.partitions
                .iter()
                .any(|p| p.number == n && p.by_partuuid)
        });
        volume_steps(plan, volume, observed, udev_named, &mut out.steps);
    }
    Ok(out)
}

/// kvstrap never repartitions a disk it laid out: that could destroy volumes in use.
fn check_same_layout(plan: &DiskPlan, disk: &Disk) -> Result<(), String> {
    let want: Vec<(u32, u64, u64, String)> = plan
        .layout
        .partitions
        .iter()
        .map(|p| {
            (
                p.number,
                p.start_bytes,
                p.size_bytes,
                p.part_uuid.to_string(),
            )
        })
        .collect();
    let have: Vec<(u32, u64, u64, String)> = disk
        .partitions
        .iter()
        .map(|p| {
            let uuid = p.part_uuid.clone().unwrap_or_default().to_ascii_lowercase();
            (p.number, p.start_bytes, p.size_bytes, uuid)
        })
        .collect();
    if want == have {
        return Ok(());
    }
    Err(format!(
        "provisioned by kvstrap with a different layout ({} partitions on disk, {} wanted by group {:?}); \
         kvstrap never repartitions a disk that may hold volumes: to re-provision it, name it by serial or WWN with wipe = \"force\"",
        have.len(),
        want.len(),
        plan.layout.group
    ))
}

/// A provisioned volume never changes kind by policy: each partition's recorded role, and
/// the filesystem kvstrap made on it, must be what the plan wants. Otherwise the whole disk
/// is left as it is (its volumes may be in use), with the way to repurpose it.
fn check_same_kind(plan: &DiskPlan, disk: &Disk) -> Result<(), String> {
    for part in &plan.layout.partitions {
        let Some(observed) = disk.partitions.iter().find(|p| p.number == part.number) else {
            continue;
        };
        let was = match observed.role {
            r if !r.is_unrecorded() && r != part.role => Some(r.describe().to_string()),
            // No role recorded (an older kvstrap): what kvstrap put on it tells.
            _ => made_filesystem(observed, part),
        };
        if let Some(was) = was {
            return Err(format!(
                "partition {} was provisioned as {was}; the policy of group {:?} now wants {}: \
                 kvstrap never changes the kind of a provisioned volume (its data may be in \
                 use). To repurpose the disk: `kvstrap drain` it, `kvstrap forget` it, then \
                 wipe it explicitly (wipe = \"force\" with the disk named by serial or WWN)",
                part.device.display(),
                plan.layout.group,
                describe_wanted(part)
            ));
        }
    }
    Ok(())
}

/// The filesystem kvstrap made on `observed`, when it is not the one `part` wants: another
/// type under the same UUID, or any of kvstrap's filesystems where a raw volume is wanted.
fn made_filesystem(observed: &crate::model::Partition, part: &PartitionSpec) -> Option<String> {
    match &part.filesystem {
        None => observed
            .signatures
            .iter()
            .find(|s| {
                s.label
                    .as_deref()
                    .is_some_and(super::identity::is_filesystem_label)
            })
            .map(|s| format!("a filesystem volume ({})", s.kind)),
        Some(fs) => observed
            .signatures
            .iter()
            .find(|s| {
                s.uuid.as_deref().map(str::to_ascii_lowercase) == Some(fs.uuid.to_string())
                    && s.kind != fs.fs_type.as_str()
            })
            .map(|s| format!("an {} filesystem", s.kind)),
    }
}

fn describe_wanted(part: &PartitionSpec) -> String {
    match &part.filesystem {
        Some(fs) => format!("{} ({})", part.role.describe(), fs.fs_type.as_str()),
        None => part.role.describe().to_string(),
    }
}

/// The complete filesystem the plan asks for (Ignition's reuse rule: type, UUID, label).
fn fs_matches(fs: &FsSpec, sig: &crate::model::Signature) -> bool {
    !sig.unfinished && is_planned(fs, sig) && sig.label.as_deref() == Some(fs.label.as_str())
}

/// Type and UUID of the planned filesystem (kvstrap's UUIDs are derived from the disk).
fn is_planned(fs: &FsSpec, sig: &crate::model::Signature) -> bool {
    sig.kind == fs.fs_type.as_str()
        && sig.uuid.as_deref().map(str::to_ascii_lowercase) == Some(fs.uuid.to_string())
}

fn foreign_partition(part: &PartitionSpec, sigs: &[crate::model::Signature]) -> String {
    let found: Vec<String> = sigs
        .iter()
        .map(|s| format!("{} (UUID {})", s.kind, s.uuid.as_deref().unwrap_or("none")))
        .collect();
    let wanted = part
        .filesystem
        .as_ref()
        .map(|f| format!("{} with UUID {}", f.fs_type.as_str(), f.uuid))
        .unwrap_or_else(|| "no signature (raw block volume)".into());
    format!(
        "partition {} holds {}, not {wanted}; it is left alone because it may hold data",
        part.device.display(),
        found.join(", ")
    )
}

fn mkfs(plan: &DiskPlan, part: &PartitionSpec, fs: &FsSpec, reason: &str) -> Step {
    Step::MakeFilesystem {
        disk: plan.layout.disk.clone(),
        device: part.device.clone(),
        fs_type: fs.fs_type,
        uuid: fs.uuid,
        label: fs.label.clone(),
        project_quota: fs.project_quota,
        reason: reason.to_string(),
    }
}

fn mount(plan: &DiskPlan, part: &PartitionSpec, fs: &FsSpec, reason: &str) -> Step {
    let mut options = fs.mount_options.clone();
    if fs.project_quota && !options.iter().any(|o| o == "prjquota") {
        options.push("prjquota".into());
    }
    Step::Mount {
        disk: plan.layout.disk.clone(),
        device: part.device.clone(),
        fs_uuid: fs.uuid,
        fs_type: fs.fs_type,
        mountpoint: fs.mountpoint.clone(),
        options,
        reason: reason.to_string(),
    }
}

/// Directory, ownership, quota or block link of one volume, as far as they differ.
/// `udev_named`: udev's by-partuuid name of the volume's partition exists and resolves to
/// it (`Partition::by_partuuid`).
fn volume_steps(
    plan: &DiskPlan,
    v: &VolumeSpec,
    observed: Option<&PathFacts>,
    udev_named: bool,
    steps: &mut Vec<Step>,
) {
    let disk = plan.layout.disk.clone();
    match v.volume_mode {
        VolumeMode::Block => {
            let part_uuid = plan
                .layout
                .partitions
                .iter()
                .find(|p| p.device == v.device)
                .map(|p| p.part_uuid)
                .unwrap_or_default();
            // udev's by-partuuid name of this very partition, or the kernel name while
            // udev has not named it (no udev, or a first apply: udev waits for kvstrap's
            // lock on the disk). A kernel-name link is re-pointed once udev named the
            // partition: after a reboot that renames disks it would name another one.
            let by_uuid = crate::model::by_partuuid_path(&v.device, &part_uuid);
            let stable = udev_named && !part_uuid.is_nil();
            let reason = match observed {
                None => Some("block volume has no link yet".to_string()),
                Some(PathFacts::Symlink { target })
                    if !part_uuid.is_nil() && *target == by_uuid =>
                {
                    None
                }
                Some(PathFacts::Symlink { target }) if *target == v.device => stable.then(|| {
                    format!(
                        "udev names the partition now: point the link at {}",
                        by_uuid.display()
                    )
                }),
                Some(_) => Some("link points elsewhere".to_string()),
            };
            if let Some(reason) = reason {
                steps.push(Step::LinkBlockDevice {
                    disk,
                    link: v.path.clone(),
                    target: v.device.clone(),
                    part_uuid,
                    reason,
                });
            }
        }
        VolumeMode::Filesystem => directory_steps(disk, v, observed, steps),
    }
}

fn directory_steps(
    disk: std::path::PathBuf,
    v: &VolumeSpec,
    observed: Option<&PathFacts>,
    steps: &mut Vec<Step>,
) {
    let Some(owner) = v.owner.clone() else { return };
    let (project_ok, quota_ok) = match observed {
        Some(PathFacts::Directory {
            uid,
            gid,
            mode,
            project_id,
            quota_bytes,
            ..
        }) => {
            if (*uid, *gid, *mode & 0o7777) != (owner.uid, owner.gid, owner.mode) {
                steps.push(Step::SetOwnership {
                    disk: disk.clone(),
                    path: v.path.clone(),
                    owner,
                    reason: format!(
                        "owner {uid}:{gid} mode {:04o} differs from the policy",
                        mode & 0o7777
                    ),
                });
            }
            (
                *project_id == v.project_id,
                crate::model::quota_limit_holds(v.capacity_bytes, *quota_bytes),
            )
        }
        _ => {
            steps.push(Step::CreateDirectory {
                disk: disk.clone(),
                path: v.path.clone(),
                owner,
                reason: "volume directory does not exist yet".into(),
            });
            (false, false)
        }
    };
    if let Some(project_id) = v.project_id {
        if !(project_ok && quota_ok) {
            steps.push(Step::SetQuota {
                disk,
                path: v.path.clone(),
                mountpoint: v.path.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
                project_id,
                bytes: v.capacity_bytes,
                reason: "directory volume needs a hard quota equal to its capacity".into(),
            });
        }
    }
}
