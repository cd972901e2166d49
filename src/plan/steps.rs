//! Desired versus observed: the steps that bring one disk to its layout. A disk that
//! already matches yields no steps, which is what makes a second apply a no-op.

use super::layout::DiskPlan;
use crate::model::{
    CryptTarget, Disk, FsSpec, Inventory, LuksSpec, Partition, PartitionSpec, PathFacts, Signature,
    Step, VolumeMode, VolumeSpec, LUKS_ERASED_LABEL, LUKS_IN_PROGRESS_LABEL,
};

/// Steps for a blank disk: everything.
pub fn fresh_disk(plan: &DiskPlan, reason: &str, steps: &mut Vec<Step>) {
    steps.push(Step::WritePartitionTable {
        disk: plan.layout.disk.clone(),
        layout: plan.layout.clone(),
        reason: reason.to_string(),
    });
    let mut parts = Vec::new();
    for part in &plan.layout.partitions {
        if let Some(luks) = &part.encryption {
            parts.push(format_luks(
                plan,
                part,
                luks,
                "new partition of an encrypted group",
            ));
            parts.push(open_luks(plan, part, luks, "new LUKS2 volume"));
        }
        if let Some(fs) = &part.filesystem {
            let why = if part.encryption.is_some() {
                "new LUKS2 volume"
            } else {
                "new partition"
            };
            parts.push(mkfs(plan, part, fs, why));
            parts.push(mount(plan, part, fs, "new filesystem"));
        }
    }
    steps.extend(luks_first(parts));
    for volume in &plan.volumes {
        volume_steps(plan, volume, None, false, steps);
    }
}

/// A disk's partition steps with every LUKS2 format first, then every open, then the rest
/// (each kind in partition order): a volume that does not open stops its disk's steps
/// there, and by then every header of the disk is made (none is left to a later run that
/// the same failure would stop again).
fn luks_first(mut steps: Vec<Step>) -> Vec<Step> {
    steps.sort_by_key(|s| match s {
        Step::FormatLuks { .. } => 0,
        Step::OpenLuks { .. } => 1,
        _ => 2,
    });
    steps
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
    let mut parts = Vec::new();
    for part in &plan.layout.partitions {
        let observed = disk.partitions.iter().find(|p| p.number == part.number);
        let result = match &part.encryption {
            Some(luks) => luks_steps(plan, part, luks, observed),
            None => plain_steps(plan, part, observed),
        };
        match result {
            Ok(steps) => parts.extend(steps),
            Err(why) => out.refused.push((part.number, why)),
        }
    }
    out.steps.extend(luks_first(parts));
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
        // udev's stable name of what the link points at: the partition's by-partuuid name,
        // or the mapping's dm-uuid name when the volume is encrypted.
        let udev_named = number.is_some_and(|n| {
            disk.partitions.iter().any(|p| {
                p.number == n
                    && match &volume.mapping {
                        None => p.by_partuuid,
                        Some(_) => p.crypt.as_ref().is_some_and(|c| c.by_dm_uuid),
                    }
            })
        });
        volume_steps(plan, volume, observed, udev_named, &mut out.steps);
    }
    Ok(out)
}

/// The steps a plain partition still needs (its filesystem and mount), or why it is left
/// alone.
fn plain_steps(
    plan: &DiskPlan,
    part: &PartitionSpec,
    observed: Option<&Partition>,
) -> Result<Vec<Step>, String> {
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
        Some(_) if signatures.is_empty() && role.is_unrecorded() => Err(format!(
            "partition {} has no filesystem and no recorded role (an older kvstrap \
             made it): it may be a raw Block volume, so kvstrap does not format it; \
             if it holds nothing, wipe the disk to provision it again",
            part.device.display()
        )),
        Some(fs) => filesystem_steps(plan, part, fs, signatures, mountpoints)
            .ok_or_else(|| foreign_partition(part, signatures)),
        // A raw Block volume: what is on it is its tenant's (a guest's filesystem,
        // partition table, LVM). kvstrap never puts a signature there itself.
        None => Ok(Vec::new()),
    }
}

/// What a filesystem of kvstrap's needs, given the signatures on the device it belongs on
/// (the partition, or its LUKS2 mapping): mkfs (nothing there, or an unfinished mkfs of
/// the planned one), a mount, nothing. None: something else is there.
fn filesystem_steps(
    plan: &DiskPlan,
    part: &PartitionSpec,
    fs: &FsSpec,
    signatures: &[Signature],
    mountpoints: &[std::path::PathBuf],
) -> Option<Vec<Step>> {
    Some(match signatures {
        [] => vec![
            mkfs(plan, part, fs, "partition has no filesystem yet"),
            mount(plan, part, fs, "new filesystem"),
        ],
        [sig] if sig.unfinished && is_planned(fs, sig) => vec![
            mkfs(plan, part, fs, "an earlier mkfs did not finish"),
            mount(plan, part, fs, "new filesystem"),
        ],
        [sig] if fs_matches(fs, sig) => {
            if mountpoints.contains(&fs.mountpoint) {
                Vec::new()
            } else {
                vec![mount(plan, part, fs, "filesystem is not mounted")]
            }
        }
        _ => return None,
    })
}

/// The steps a partition of an encrypted group still needs: its LUKS2 header (made again
/// only while it never held data: kvstrap's in-progress label), the mapping, then what
/// the mapping needs. A header of kvstrap's that does not open is never formatted: the
/// open step fails, and the volume is reported locked.
fn luks_steps(
    plan: &DiskPlan,
    part: &PartitionSpec,
    luks: &LuksSpec,
    observed: Option<&Partition>,
) -> Result<Vec<Step>, String> {
    let signatures = observed
        .map(|p| p.signatures.as_slice())
        .unwrap_or_default();
    let fresh = |why: &str| {
        let mut steps = vec![
            format_luks(plan, part, luks, why),
            open_luks(plan, part, luks, "new LUKS2 volume"),
        ];
        if let Some(fs) = &part.filesystem {
            steps.push(mkfs(plan, part, fs, "new LUKS2 volume"));
            steps.push(mount(plan, part, fs, "new filesystem"));
        }
        steps
    };
    let header = match signatures {
        [] => return Ok(fresh("partition has no LUKS2 header yet")),
        [sig] if is_our_header(luks, sig) => sig,
        sigs => return Err(foreign_partition(part, sigs)),
    };
    match header.label.as_deref() {
        Some(LUKS_IN_PROGRESS_LABEL) => return Ok(fresh("an earlier LUKS2 format did not finish")),
        Some(LUKS_ERASED_LABEL) => {
            return Err(format!(
                "partition {} was crypto-erased (`kvstrap forget --erase` destroyed its key \
                 slots): its data is gone for good; to provision the disk again, wipe it \
                 explicitly (wipe = \"force\" with the disk named by serial or WWN)",
                part.device.display()
            ))
        }
        Some(label) if label == luks.label => {}
        other => {
            return Err(format!(
                "partition {} carries a LUKS2 header with kvstrap's UUID {} but the label {:?}, \
                 not {:?}: it is left alone",
                part.device.display(),
                luks.uuid,
                other.unwrap_or(""),
                luks.label
            ))
        }
    }
    let Some(mapping) = observed.and_then(|p| p.crypt.as_ref()) else {
        // Closed (a reboot, a drain): open it; whatever is inside is judged afresh by the
        // steps after it (mkfs only on a blank mapping, never over a filesystem).
        let mut steps = vec![open_luks(plan, part, luks, "the LUKS2 volume is not open")];
        if let Some(fs) = &part.filesystem {
            steps.push(mkfs(
                plan,
                part,
                fs,
                "checked once the LUKS2 volume is open: made only if the volume holds nothing",
            ));
            steps.push(mount(plan, part, fs, "the LUKS2 volume is not open"));
        }
        return Ok(steps);
    };
    if !mapping.is_of(luks) {
        return Err(format!(
            "partition {} is open as /dev/mapper/{} ({}), not as {}: close it \
             (`cryptsetup close {}`) so kvstrap opens it under its own name",
            part.device.display(),
            mapping.name,
            mapping.dm_uuid,
            luks.mapping_path().display(),
            mapping.name
        ));
    }
    match &part.filesystem {
        Some(fs) => {
            // A header of ours with nothing inside (killed between the format and mkfs) is
            // finished here, never made twice.
            filesystem_steps(plan, part, fs, &mapping.signatures, &mapping.mountpoints)
                .ok_or_else(|| foreign_mapping(part, luks, &mapping.signatures))
        }
        None => Ok(Vec::new()),
    }
}

/// A LUKS2 header with the UUID kvstrap derives for this partition.
fn is_our_header(luks: &LuksSpec, sig: &Signature) -> bool {
    sig.kind == "crypto_LUKS"
        && sig.uuid.as_deref().map(str::to_ascii_lowercase) == Some(luks.uuid.to_string())
}

fn foreign_mapping(part: &PartitionSpec, luks: &LuksSpec, sigs: &[Signature]) -> String {
    let found: Vec<String> = sigs
        .iter()
        .map(|s| format!("{} (UUID {})", s.kind, s.uuid.as_deref().unwrap_or("none")))
        .collect();
    let wanted = part
        .filesystem
        .as_ref()
        .map(|f| format!("{} with UUID {}", f.fs_type.as_str(), f.uuid))
        .unwrap_or_default();
    format!(
        "the LUKS2 volume of partition {} ({}) holds {}, not {wanted}; it is left alone \
         because it may hold data",
        part.device.display(),
        luks.mapping_path().display(),
        found.join(", ")
    )
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
            // Encrypted or plain is part of the kind: a LUKS2 header is never added under
            // a provisioned filesystem, nor a plain filesystem made where one was.
            _ if observed.encrypted != part.encryption.is_some() => Some(format!(
                "{} {}",
                if observed.encrypted {
                    "an encrypted (LUKS2)"
                } else {
                    "a plain (unencrypted)"
                },
                observed.role.describe().trim_start_matches("a ")
            )),
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
                s.usage.as_deref() == Some("filesystem")
                    && s.label
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
    let kind = match &part.filesystem {
        Some(fs) => format!("{} ({})", part.role.describe(), fs.fs_type.as_str()),
        None => part.role.describe().to_string(),
    };
    if part.encryption.is_some() {
        format!("{kind}, encrypted")
    } else {
        kind
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

fn format_luks(plan: &DiskPlan, part: &PartitionSpec, luks: &LuksSpec, reason: &str) -> Step {
    Step::FormatLuks {
        disk: plan.layout.disk.clone(),
        device: part.device.clone(),
        luks: luks.clone(),
        reason: reason.to_string(),
    }
}

fn open_luks(plan: &DiskPlan, part: &PartitionSpec, luks: &LuksSpec, reason: &str) -> Step {
    Step::OpenLuks {
        disk: plan.layout.disk.clone(),
        device: part.device.clone(),
        luks: luks.clone(),
        reason: reason.to_string(),
    }
}

fn mkfs(plan: &DiskPlan, part: &PartitionSpec, fs: &FsSpec, reason: &str) -> Step {
    Step::MakeFilesystem {
        disk: plan.layout.disk.clone(),
        device: part.data_device(),
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
        device: part.data_device(),
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
            let part = plan.layout.partitions.iter().find(|p| p.device == v.device);
            let part_uuid = part.map(|p| p.part_uuid).unwrap_or_default();
            let luks = part.and_then(|p| p.encryption.as_ref());
            // udev's stable name of this very partition (by-partuuid) or of its LUKS2
            // mapping (dm-uuid), or the kernel name (the mapper name) while udev has not
            // named it (no udev, or a first apply: udev waits for kvstrap's lock on the
            // disk). A link by the unstable name is re-pointed once udev named it: after a
            // reboot that renames disks it would name another one.
            let (by_udev, unstable) = match luks {
                Some(l) => (l.by_dm_uuid_path(), l.mapping_path()),
                None => (
                    crate::model::by_partuuid_path(&v.device, &part_uuid),
                    v.device.clone(),
                ),
            };
            let stable = udev_named && !part_uuid.is_nil();
            let reason = match observed {
                None => Some("block volume has no link yet".to_string()),
                Some(PathFacts::Symlink { target })
                    if !part_uuid.is_nil() && *target == by_udev =>
                {
                    None
                }
                Some(PathFacts::Symlink { target }) if *target == unstable => stable.then(|| {
                    format!(
                        "udev names the {} now: point the link at {}",
                        if luks.is_some() {
                            "mapping"
                        } else {
                            "partition"
                        },
                        by_udev.display()
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
                    crypt: luks.map(|l| CryptTarget {
                        uuid: l.uuid,
                        name: l.label.clone(),
                    }),
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
