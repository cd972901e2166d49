//! The desired layout of one disk: partitions, filesystems, mount points and volumes.

use super::capacity::{
    self, fs_capacity, partition_for_capacity, reserve_of, round_down, ALIGN, MAX_PARTITIONS,
    MAX_VOLUMES_PER_DISK,
};
use super::identity;
use crate::model::{
    Disk, DiskLayout, FsSpec, Layout, LuksSpec, Owner, PartitionRole, PartitionSpec, PoolSpec,
    Unlock, VolumeMode, VolumeSpec, LUKS_HEADER_BYTES,
};
use crate::policy::{DiskGroup, Provisioning, QuotaMode, StorageClass, VolumeSizing};
use std::path::{Path, PathBuf};

/// Project ids of directory volumes start here, clear of ids admins use by hand.
pub const PROJECT_ID_BASE: u32 = 1000;

/// A disk's layout with the volumes it yields.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    pub layout: DiskLayout,
    pub volumes: Vec<VolumeSpec>,
    pub reserve_bytes: u64,
    /// A dynamic group's pool (its volumes come from claims).
    pub pool: Option<PoolSpec>,
}

pub struct LayoutInput<'a> {
    pub group: &'a DiskGroup,
    pub class: &'a StorageClass,
    pub disk: &'a Disk,
    pub storage_root: &'a Path,
    pub state_dir: &'a Path,
    /// Why this kernel cannot enforce project quotas on the class's filesystem, if so.
    pub quota_unsupported: Option<&'a str>,
}

/// Lay out a disk for its group; the error says why it does not fit.
pub fn lay_out(input: &LayoutInput) -> Result<DiskPlan, String> {
    let disk = input.disk;
    let (start, usable) = capacity::usable_region(disk.size_bytes)
        .ok_or_else(|| format!("disk too small ({})", capacity::human(disk.size_bytes)))?;
    let reserve = reserve_of(usable, input.group.reserve_percent);
    let identity = identity::disk_identity(disk);
    let ctx = Ctx {
        input,
        identity: &identity,
        short: identity::short_id(&identity),
    };
    let (partitions, volumes) = match (input.group.layout, input.class.volume_mode) {
        (Layout::Shared, _) => ctx.shared(start, usable, reserve)?,
        (Layout::Separate, mode) => ctx.separate(start, usable, reserve, mode)?,
    };
    let pool = (input.group.provisioning == Provisioning::Dynamic)
        .then(|| ctx.pool(&partitions, usable, reserve))
        .flatten();
    Ok(DiskPlan {
        pool,
        layout: DiskLayout {
            disk: disk.path.clone(),
            identity: identity.clone(),
            group: input.group.name.clone(),
            disk_guid: identity::disk_guid(&identity, &input.group.name),
            size_bytes: disk.size_bytes,
            logical_sector_size: disk.logical_sector_size,
            partitions,
        },
        volumes,
        reserve_bytes: reserve,
    })
}

struct Ctx<'a> {
    input: &'a LayoutInput<'a>,
    identity: &'a str,
    short: String,
}

impl Ctx<'_> {
    fn group(&self) -> &DiskGroup {
        self.input.group
    }

    /// What an encrypted group's partitions lose to their LUKS2 header; 0 when plain.
    fn header(&self) -> u64 {
        if self.group().encryption.is_some() {
            LUKS_HEADER_BYTES
        } else {
            0
        }
    }

    /// One filesystem over the whole disk; each volume a directory with a hard quota.
    fn shared(
        &self,
        start: u64,
        usable: u64,
        reserve: u64,
    ) -> Result<(Vec<PartitionSpec>, Vec<VolumeSpec>), String> {
        let fs_type = self.input.class.fs_type;
        if usable < capacity::min_fs_bytes(fs_type) + self.header() {
            return Err(format!("disk too small for {}", fs_type.as_str()));
        }
        let quota = match (self.input.quota_unsupported, self.group().quota) {
            (None, _) => true,
            (Some(_), QuotaMode::IfSupported) => false,
            (Some(why), QuotaMode::Required) => {
                return Err(format!(
                    "this kernel cannot enforce project quotas on {} ({why}), so directory volumes would not \
                     hold their capacity; use layout = \"separate\", a kernel with quota support, or \
                     quota = \"if-supported\" in the group to accept unenforced capacity",
                    fs_type.as_str()
                ))
            }
        };
        let mountpoint = self
            .input
            .storage_root
            .join(&self.group().name)
            .join(format!("disk-{}", self.short));
        let available = fs_capacity(fs_type, usable - self.header()).saturating_sub(reserve);
        // A pool is carved by claims, not in advance.
        let sizes = match self.group().provisioning {
            Provisioning::Dynamic => Vec::new(),
            Provisioning::Static => self.volume_sizes(available)?,
        };
        let partition = self.partition(1, start, usable, Some(mountpoint.clone()), quota);
        let volumes = sizes
            .iter()
            .enumerate()
            .map(|(i, &cap)| {
                let name = self.volume_name(i);
                let mut v = self.volume(&partition, name.clone(), mountpoint.join(&name), cap);
                let index = u32::try_from(i).unwrap_or(u32::MAX - PROJECT_ID_BASE - 1);
                v.project_id = quota.then_some(PROJECT_ID_BASE + index + 1);
                v
            })
            .collect();
        Ok((vec![partition], volumes))
    }

    /// A partition per volume: a filesystem of its own, or raw for Block.
    fn separate(
        &self,
        start: u64,
        usable: u64,
        reserve: u64,
        mode: VolumeMode,
    ) -> Result<(Vec<PartitionSpec>, Vec<VolumeSpec>), String> {
        let fs_type = self.input.class.fs_type;
        let area = round_down(usable.saturating_sub(reserve));
        let header = self.header();
        // Partition size needed for a volume of the given capacity (and its LUKS2 header).
        let part_for = |cap: u64| {
            match mode {
                VolumeMode::Block => capacity::round_up(cap),
                VolumeMode::Filesystem => partition_for_capacity(fs_type, cap),
            }
            .and_then(|part| part.checked_add(header))
            .filter(|&part| part > 0 && part <= area)
            .ok_or_else(|| {
                format!(
                    "a volume of {} does not fit in the {} left after reserve",
                    capacity::human(cap),
                    capacity::human(area)
                )
            })
        };
        let cap_of = |part: u64| match mode {
            VolumeMode::Block => part.saturating_sub(header),
            VolumeMode::Filesystem => fs_capacity(fs_type, part.saturating_sub(header)),
        };
        let sizes: Vec<(u64, u64)> = match self.group().sizing {
            VolumeSizing::Size(cap) => {
                let part = part_for(cap)?;
                let count = (area / part).min(u64::from(MAX_PARTITIONS));
                (0..count).map(|_| (part, cap)).collect()
            }
            VolumeSizing::Count(n) => {
                if n > MAX_PARTITIONS {
                    return Err(format!(
                        "volume_count = {n} needs more than {MAX_PARTITIONS} GPT partitions"
                    ));
                }
                let part = round_down(area / u64::from(n.max(1)));
                (0..n).map(|_| (part, cap_of(part))).collect()
            }
            VolumeSizing::OnePerDisk => vec![(area, cap_of(area))],
        };
        self.check_fits(&sizes, mode, area)?;
        let mut offset = start;
        let mut partitions = Vec::new();
        let mut volumes = Vec::new();
        for (i, (part_size, cap)) in sizes.into_iter().enumerate() {
            let number = u32::try_from(i + 1).map_err(|_| "too many partitions".to_string())?;
            let name = self.volume_name(i);
            let mountpoint = match mode {
                VolumeMode::Filesystem => {
                    Some(self.input.storage_root.join(&self.group().name).join(&name))
                }
                VolumeMode::Block => None,
            };
            let partition = self.partition(number, offset, part_size, mountpoint.clone(), false);
            let path = mountpoint.unwrap_or_else(|| self.input.state_dir.join("block").join(&name));
            volumes.push(self.volume(&partition, name, path, cap));
            partitions.push(partition);
            offset += part_size;
        }
        Ok((partitions, volumes))
    }

    fn check_fits(&self, sizes: &[(u64, u64)], mode: VolumeMode, area: u64) -> Result<(), String> {
        let Some(&(part, cap)) = sizes.first() else {
            return Err(format!(
                "no volume fits in the {} left after reserve",
                capacity::human(area)
            ));
        };
        let min = self.header()
            + match mode {
                VolumeMode::Block => ALIGN,
                VolumeMode::Filesystem => capacity::min_fs_bytes(self.input.class.fs_type),
            };
        if part < min || cap == 0 {
            return Err(format!(
                "partitions of {} are too small for {} (at least {} needed); use fewer or larger volumes",
                capacity::human(part),
                match mode {
                    VolumeMode::Block => "a block volume",
                    VolumeMode::Filesystem => self.input.class.fs_type.as_str(),
                },
                capacity::human(min)
            ));
        }
        Ok(())
    }

    /// Capacities of the directory volumes that fit in `available` bytes.
    fn volume_sizes(&self, available: u64) -> Result<Vec<u64>, String> {
        let sizes: Vec<u64> = match self.group().sizing {
            VolumeSizing::Size(cap) => {
                let count = available / cap.max(1);
                too_many(count)?;
                (0..count).map(|_| cap).collect()
            }
            VolumeSizing::Count(n) => {
                too_many(u64::from(n))?;
                let cap = round_down(available / u64::from(n.max(1)));
                (0..n).map(|_| cap).collect()
            }
            VolumeSizing::OnePerDisk => vec![round_down(available)],
        };
        match sizes.first() {
            Some(&cap) if cap > 0 => Ok(sizes),
            _ => Err(format!(
                "no volume fits in the {} left after reserve and filesystem overhead",
                capacity::human(available)
            )),
        }
    }

    fn partition(
        &self,
        number: u32,
        start: u64,
        size: u64,
        mountpoint: Option<PathBuf>,
        shared: bool,
    ) -> PartitionSpec {
        let group = &self.group().name;
        let filesystem = mountpoint.map(|mountpoint| {
            let uuid = identity::filesystem_uuid(self.identity, group, number);
            FsSpec {
                fs_type: self.input.class.fs_type,
                uuid,
                label: identity::filesystem_label(&uuid),
                project_quota: shared,
                mountpoint,
                mount_options: self.input.class.mount_options.clone(),
            }
        });
        let encryption = self.group().encryption.as_ref().map(|e| {
            let uuid = identity::luks_uuid(self.identity, group, number);
            LuksSpec {
                uuid,
                label: identity::luks_label(&uuid),
                unlock: Unlock {
                    tpm2_pcrs: e.method.uses_tpm2().then(|| e.tpm2_pcrs.clone()),
                    key_file: e.key_file.clone().filter(|_| e.method.uses_key_file()),
                },
            }
        });
        PartitionSpec {
            number,
            start_bytes: start,
            size_bytes: size,
            part_uuid: identity::partition_uuid(self.identity, group, number),
            name: partition_name(group, number),
            device: identity::partition_device(&self.input.disk.path, number),
            role: match (&filesystem, shared) {
                (None, _) => PartitionRole::Block,
                (Some(_), true) => PartitionRole::SharedFilesystem,
                (Some(_), false) => PartitionRole::Filesystem,
            },
            filesystem,
            encryption,
        }
    }

    /// The pool of a dynamic group's disk: its one filesystem, less the reserve, times the
    /// group's overcommit.
    fn pool(&self, partitions: &[PartitionSpec], usable: u64, reserve: u64) -> Option<PoolSpec> {
        let part = partitions.first()?;
        let fs = part.filesystem.as_ref()?;
        let available =
            fs_capacity(fs.fs_type, usable.saturating_sub(self.header())).saturating_sub(reserve);
        let scaled = u128::from(available) * u128::from(self.group().overcommit_permille) / 1000;
        Some(PoolSpec {
            group: self.group().name.clone(),
            storage_class: self.input.class.name.clone(),
            disk: self.input.disk.path.clone(),
            disk_identity: self.identity.to_string(),
            device: part.device.clone(),
            mountpoint: fs.mountpoint.clone(),
            fs_type: fs.fs_type,
            capacity_bytes: u64::try_from(scaled).unwrap_or(u64::MAX),
            project_quota: fs.project_quota,
            owner: self.group().owner.clone(),
            transport: self.input.disk.transport.clone(),
            rotational: self.input.disk.rotational,
            io_class: self.input.disk.io.map(|io| io.class),
            mapping: part.encryption.as_ref().map(LuksSpec::mapping_path),
        })
    }

    fn volume_name(&self, index: usize) -> String {
        format!("{}-{}-{:02}", self.group().name, self.short, index + 1)
    }

    fn volume(
        &self,
        partition: &PartitionSpec,
        name: String,
        path: PathBuf,
        capacity: u64,
    ) -> VolumeSpec {
        let mode = self.input.class.volume_mode;
        let dir_in_fs = partition
            .filesystem
            .as_ref()
            .and_then(|fs| path.strip_prefix(&fs.mountpoint).ok())
            .map(|rel| Path::new("/").join(rel));
        VolumeSpec {
            dir_in_fs,
            name,
            group: self.group().name.clone(),
            storage_class: self.input.class.name.clone(),
            volume_mode: mode,
            path,
            capacity_bytes: capacity,
            disk: self.input.disk.path.clone(),
            disk_identity: self.identity.to_string(),
            device: partition.device.clone(),
            transport: self.input.disk.transport.clone(),
            rotational: self.input.disk.rotational,
            io_class: self.input.disk.io.map(|io| io.class),
            project_id: None,
            owner: (mode == VolumeMode::Filesystem).then(|| self.group().owner.clone()),
            fs_type: partition.filesystem.as_ref().map(|f| f.fs_type),
            mapping: partition.encryption.as_ref().map(LuksSpec::mapping_path),
        }
    }
}

/// A shared filesystem carries at most MAX_VOLUMES_PER_DISK directory volumes: the policy
/// cannot ask for more, and a small volume_size on a big disk must not make millions.
fn too_many(count: u64) -> Result<(), String> {
    if count > MAX_VOLUMES_PER_DISK {
        return Err(format!(
            "this disk would yield {count} volumes, more than the {MAX_VOLUMES_PER_DISK} one disk may carry; \
             use a larger volume_size or volume_count = {MAX_VOLUMES_PER_DISK} or less"
        ));
    }
    Ok(())
}

/// GPT names hold 36 UTF-16 units: `kvstrap-<group>-<n>`, the group cut to fit.
fn partition_name(group: &str, number: u32) -> String {
    let suffix = format!("-{number}");
    let room = 36 - "kvstrap-".len() - suffix.len();
    let group: String = group.chars().take(room).collect();
    format!("kvstrap-{group}{suffix}")
}

/// The owner of a volume directory, defaulting to KubeVirt's qemu (107).
pub fn default_owner() -> Owner {
    Owner {
        uid: 107,
        gid: 107,
        mode: 0o750,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_fit_gpt() {
        assert_eq!(partition_name("nvme", 3), "kvstrap-nvme-3");
        let long = partition_name(&"x".repeat(60), 128);
        assert_eq!(long.chars().count(), 36);
    }
}
