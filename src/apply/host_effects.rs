//! The real effects: each step re-checks the machine right before it acts (same disk
//! identity, still blank, nothing holding it) and then calls `crate::host`.

use super::effects::{DiskGuard, Effects};
use super::ApplyError;
use crate::host::cmd::{Program, Programs};
use crate::host::{self, Outcome};
use crate::model::{CryptTarget, Disk, DiskLayout, FsSpec, FsType, LuksSpec, Owner, Plan, Step};
use std::path::{Path, PathBuf};

pub struct HostEffects {
    programs: Programs,
}

impl HostEffects {
    /// Finds mkfs.xfs/mkfs.ext4 once, so a missing tool is reported before any disk is touched.
    pub fn new(_state_dir: &Path) -> Result<HostEffects, ApplyError> {
        Ok(HostEffects {
            programs: Programs::discover(),
        })
    }

    /// Fail early when a needed program is missing: before a GPT is written, not after.
    pub fn check_programs(&self, fs_types: &[FsType]) -> Result<(), ApplyError> {
        let needed: Vec<Program> = fs_types
            .iter()
            .flat_map(|f| match f {
                FsType::Xfs => [Program::MkfsXfs, Program::XfsDb],
                FsType::Ext4 => [Program::MkfsExt4, Program::E2label],
            })
            .collect();
        self.programs.check(&needed).map_err(ApplyError::from)
    }

    /// The programs a plan's LUKS2 steps need: cryptsetup, and systemd-cryptenroll to seal
    /// a new volume's key to the TPM2.
    fn luks_programs(plan: &Plan) -> Vec<Program> {
        let mut needed = Vec::new();
        for step in &plan.steps {
            match step {
                Step::FormatLuks { luks, .. } => {
                    needed.push(Program::Cryptsetup);
                    if luks.unlock.tpm2_pcrs.is_some() {
                        needed.push(Program::SystemdCryptenroll);
                    }
                }
                Step::OpenLuks { .. } | Step::CloseLuks { .. } | Step::EraseLuks { .. } => {
                    needed.push(Program::Cryptsetup)
                }
                _ => {}
            }
        }
        needed.sort();
        needed.dedup();
        needed
    }
}

fn refused(step: &str, disk: &Path, why: impl Into<String>) -> ApplyError {
    ApplyError::Refused {
        step: format!("{step} on {}", disk.display()),
        why: why.into(),
    }
}

/// The identity (WWN, serial, loop file) of the disk at `disk` right now, from sysfs.
fn identity_now(disk: &Path) -> String {
    if host::kpartx::is_map(disk) {
        return map_identity_now(disk);
    }
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = crate::inventory::sysfs::read_disk(Path::new("/sys"), &name);
    let d = Disk {
        path: disk.to_path_buf(),
        serial: sys.serial,
        wwn: sys.wwn,
        backing_file: sys.backing_file,
        ..Disk::default()
    };
    crate::plan::identity::disk_identity(&d)
}

/// A multipath map's identity now: `/dev/mapper/<name>` is a link to the map's `dm-N`,
/// whose `dm/uuid` carries the WWID of the LUN it reaches.
fn map_identity_now(disk: &Path) -> String {
    let kernel_name = std::fs::canonicalize(disk)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let map = crate::inventory::multipath::map_at(Path::new("/sys"), &kernel_name);
    let d = Disk {
        path: disk.to_path_buf(),
        wwn: map.as_ref().and_then(|(_, wwn, _)| wwn.clone()),
        multipath: map.map(|(_, _, wwid)| crate::model::Multipath {
            wwid,
            kernel_name,
            paths: Vec::new(),
        }),
        ..Disk::default()
    };
    crate::plan::identity::disk_identity(&d)
}

/// The kernel's partitions of `layout`'s disk made as the planned ones: partition
/// mappings (kpartx) on a multipath map, BLKPG on any other disk.
fn sync_kernel_partitions(
    programs: &Programs,
    layout: &DiskLayout,
) -> Result<Outcome, host::Error> {
    if host::kpartx::is_map(&layout.disk) {
        return Ok(host::kpartx::sync_partitions(
            programs,
            &layout.disk,
            &layout.partitions,
        )?);
    }
    Ok(host::blkpg::sync_partitions(
        &layout.disk,
        &layout.partitions,
    )?)
}

fn check_identity(step: &str, disk: &Path, planned: &str) -> Result<(), ApplyError> {
    let now = identity_now(disk);
    if now != planned {
        return Err(refused(
            step,
            disk,
            format!("the disk is now {now}, not the {planned} that was planned; run plan again"),
        ));
    }
    Ok(())
}

impl Effects for HostEffects {
    fn preflight(&self, plan: &Plan) -> Result<(), ApplyError> {
        let fs_types: Vec<FsType> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::MakeFilesystem { fs_type, .. } => Some(*fs_type),
                _ => None,
            })
            .collect();
        self.check_programs(&fs_types)?;
        self.programs
            .check(&Self::luks_programs(plan))
            .map_err(ApplyError::from)
    }

    fn lock_disk(&self, disk: &Path) -> Result<DiskGuard, ApplyError> {
        let lock = host::disklock::lock_whole_disk(disk).map_err(host::Error::from)?;
        Ok(Box::new(lock))
    }

    fn wipe_disk(&self, disk: &Path, identity: &str) -> Result<Outcome, ApplyError> {
        check_identity("wipe", disk, identity)?;
        Ok(host::wipe::wipe_disk(disk).map_err(host::Error::from)?)
    }

    fn write_partition_table(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError> {
        let disk = &layout.disk;
        check_identity("write partition table", disk, &layout.identity)?;
        // Still blank, or already carrying exactly this table (a run that died after the
        // write): anything else appeared since the plan was made and is not ours.
        let sigs = host::probe::signatures(disk).map_err(host::Error::from)?;
        let foreign: Vec<&str> = sigs
            .iter()
            .map(|s| s.kind.as_str())
            .filter(|k| *k != "gpt" && *k != "PMBR")
            .collect();
        if !foreign.is_empty() {
            return Err(refused(
                "write partition table",
                disk,
                format!("it now carries {}", foreign.join(", ")),
            ));
        }
        if sigs.iter().any(|s| s.kind == "gpt") && table_on_disk(layout)? == OnDisk::Other {
            return Err(refused(
                "write partition table",
                disk,
                "a partition table appeared since the plan was made",
            ));
        }
        host::probe::prove_unheld(disk).map_err(host::Error::from)?;
        let written = host::gpt::write_partition_table(layout).map_err(host::Error::from)?;
        let synced = sync_kernel_partitions(&self.programs, layout)?;
        Ok(written.and(synced))
    }

    fn sync_partitions(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError> {
        check_identity("add partition nodes", &layout.disk, &layout.identity)?;
        let repaired = match table_on_disk(layout)? {
            OnDisk::Planned => Outcome::Unchanged,
            // Our own write of this table, cut short between its headers: finish it.
            OnDisk::Torn => host::gpt::write_partition_table(layout).map_err(host::Error::from)?,
            OnDisk::Other => {
                return Err(refused(
                    "add partition nodes",
                    &layout.disk,
                    "the GPT on disk is not the one planned",
                ))
            }
        };
        let synced = sync_kernel_partitions(&self.programs, layout)?;
        Ok(repaired.and(synced))
    }

    fn format_luks(&self, device: &Path, luks: &LuksSpec) -> Result<Outcome, ApplyError> {
        host::blkpg::wait_for_node(device).map_err(host::Error::from)?;
        Ok(host::luks::format(&self.programs, device, luks).map_err(host::Error::from)?)
    }

    fn open_luks(&self, device: &Path, luks: &LuksSpec) -> Result<Outcome, ApplyError> {
        host::blkpg::wait_for_node(device).map_err(host::Error::from)?;
        Ok(host::luks::open(&self.programs, device, luks).map_err(host::Error::from)?)
    }

    fn close_luks(&self, device: &Path, mapping: &str) -> Result<Outcome, ApplyError> {
        Ok(host::luks::close(&self.programs, device, mapping).map_err(host::Error::from)?)
    }

    fn erase_luks(&self, device: &Path, luks_uuid: &uuid::Uuid) -> Result<Outcome, ApplyError> {
        Ok(host::luks::erase(&self.programs, device, luks_uuid).map_err(host::Error::from)?)
    }

    fn make_filesystem(
        &self,
        device: &Path,
        fs_type: FsType,
        uuid: &uuid::Uuid,
        label: &str,
        project_quota: bool,
    ) -> Result<Outcome, ApplyError> {
        let spec = fs_spec(
            fs_type,
            uuid,
            label,
            project_quota,
            PathBuf::new(),
            Vec::new(),
        );
        // The partition's node may still be on its way (devtmpfs, udev): wait, bounded. A
        // mapping (a map's partition, or a LUKS2 volume opened by its own step) is a
        // /dev/mapper node.
        if device.starts_with(crate::model::MAPPER_DIR) {
            host::kpartx::wait_for_mapping(device).map_err(host::Error::from)?;
        } else {
            host::blkpg::wait_for_node(device).map_err(host::Error::from)?;
        }
        Ok(
            host::mkfs::make_filesystem(&self.programs, device, &spec)
                .map_err(host::Error::from)?,
        )
    }

    fn mount(
        &self,
        device: &Path,
        fs_uuid: &uuid::Uuid,
        fs_type: FsType,
        mountpoint: &Path,
        options: &[String],
    ) -> Result<Outcome, ApplyError> {
        let project_quota = options.iter().any(|o| o == "prjquota");
        let options: Vec<String> = options
            .iter()
            .filter(|o| *o != "prjquota")
            .cloned()
            .collect();
        let label = crate::plan::identity::filesystem_label(fs_uuid);
        let spec = fs_spec(
            fs_type,
            fs_uuid,
            &label,
            project_quota,
            mountpoint.to_path_buf(),
            options,
        );
        Ok(host::mount::mount_filesystem(device, &spec).map_err(host::Error::from)?)
    }

    fn directory(&self, path: &Path, owner: &Owner) -> Result<Outcome, ApplyError> {
        let made = host::dirs::create_directory(path, owner).map_err(host::Error::from)?;
        let owned = host::dirs::set_ownership(path, owner).map_err(host::Error::from)?;
        Ok(made.and(owned))
    }

    fn quota(
        &self,
        path: &Path,
        _mountpoint: &Path,
        project_id: u32,
        bytes: u64,
    ) -> Result<Outcome, ApplyError> {
        Ok(host::quota::set_quota(path, project_id, bytes).map_err(host::Error::from)?)
    }

    fn link_block_device(
        &self,
        disk: &Path,
        link: &Path,
        target: &Path,
        part_uuid: &uuid::Uuid,
        crypt: Option<&CryptTarget>,
    ) -> Result<Outcome, ApplyError> {
        is_partition(disk, target, part_uuid)?;
        let to = match crypt {
            None => host::dirs::block_link_target(target, part_uuid),
            Some(c) => {
                // The mapping must be that very volume's, over that very partition.
                let open =
                    host::luks::mapping_of(target, &c.uuid, &c.name).map_err(host::Error::from)?;
                if open.is_none() {
                    return Err(refused(
                        "link block volume",
                        disk,
                        format!(
                            "its LUKS2 volume on {} is not open as {}",
                            target.display(),
                            c.name
                        ),
                    ));
                }
                host::dirs::crypt_link_target(&c.name, &c.uuid)
            }
        };
        Ok(host::dirs::link_block_device(link, &to).map_err(host::Error::from)?)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<Outcome, ApplyError> {
        Ok(host::mount::unmount(mountpoint).map_err(host::Error::from)?)
    }

    fn remove_block_link(&self, link: &Path) -> Result<Outcome, ApplyError> {
        Ok(host::dirs::remove_block_link(link).map_err(host::Error::from)?)
    }
}

/// The GPT on a disk, compared with the planned one.
#[derive(Debug, PartialEq, Eq)]
enum OnDisk {
    /// Exactly the planned table, both headers valid.
    Planned,
    /// The planned entries behind one valid header: a write of this very table was cut
    /// short between the backup and the primary header (libblkid still reports a GPT).
    Torn,
    /// Anything else: not ours to overwrite.
    Other,
}

fn table_on_disk(layout: &DiskLayout) -> Result<OnDisk, ApplyError> {
    let planned = Some(host::gpt::GptTable::from_layout(layout));
    let disk = &layout.disk;
    if host::gpt::read_partition_table(disk).map_err(host::Error::from)? == planned {
        return Ok(OnDisk::Planned);
    }
    if host::gpt::read_partition_table_any_header(disk).map_err(host::Error::from)? == planned {
        return Ok(OnDisk::Torn);
    }
    Ok(OnDisk::Other)
}

/// A Block volume's link must never point at another disk's partition (kernel names move
/// between boots): `target` must be the kernel partition that the GPT on `disk` lists
/// with `part_uuid`, at the same start and length.
fn is_partition(disk: &Path, target: &Path, part_uuid: &uuid::Uuid) -> Result<(), ApplyError> {
    let step = "link block volume";
    let table = host::gpt::read_partition_table(disk).map_err(host::Error::from)?;
    let entry = table
        .as_ref()
        .and_then(|t| t.entries.iter().find(|e| e.part_uuid == *part_uuid))
        .ok_or_else(|| refused(step, disk, format!("its GPT has no partition {part_uuid}")))?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
    let kernel = host::blkpg::kernel_partitions(disk).map_err(host::Error::from)?;
    let same = kernel.iter().any(|k| {
        Some(&k.name) == name.as_ref()
            && k.number == entry.number
            && k.start_bytes == entry.start_bytes
            && k.size_bytes == entry.size_bytes
    });
    if !same {
        return Err(refused(
            step,
            disk,
            format!(
                "{} is not its partition {} ({part_uuid}); run plan again",
                target.display(),
                entry.number
            ),
        ));
    }
    Ok(())
}

fn fs_spec(
    fs_type: FsType,
    uuid: &uuid::Uuid,
    label: &str,
    project_quota: bool,
    mountpoint: PathBuf,
    mount_options: Vec<String>,
) -> FsSpec {
    FsSpec {
        fs_type,
        uuid: *uuid,
        label: label.to_string(),
        project_quota,
        mountpoint,
        mount_options,
    }
}
