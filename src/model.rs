//! The shared vocabulary (disks, inventory, steps, plan); pure data that touches nothing.
//!
//! The shared vocabulary: what the inventory observed, and what the planner decided.
//! Pure data, no I/O. Everything here serializes to the JSON that `--output json` prints.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// kvstrap's own GPT partition type GUID. Every partition kvstrap creates carries it,
/// which is how a later run (or a reinstalled OS) recognises kvstrap's disks.
pub const KVSTRAP_PART_TYPE: uuid::Uuid = uuid::uuid!("6b767374-7261-7000-8000-6b7673747261");

/// Namespace for the v5 UUIDs that the planner derives from a disk's identity.
pub const KVSTRAP_UUID_NAMESPACE: uuid::Uuid = uuid::uuid!("1c0a9f5e-6d4b-5a8e-9b1f-6b7673747261");

/// Everything the inventory saw on the machine at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub disks: Vec<Disk>,
    /// Observed state of the paths kvstrap manages (mount points, volume directories,
    /// block symlinks), keyed by absolute path. Only paths below `storage_root` and the
    /// state directory are observed.
    #[serde(default)]
    pub paths: BTreeMap<PathBuf, PathFacts>,
    /// Filesystems (`xfs`, `ext4`) whose project quotas this kernel cannot enforce, with
    /// the reason; directory volumes need them to hold their capacity.
    #[serde(default)]
    pub quota_unsupported: BTreeMap<String, String>,
    /// A TPM 2.0 kvstrap can seal keys with (`/dev/tpmrm0`, `/sys/class/tpm/tpm0` of
    /// version 2).
    #[serde(default)]
    pub tpm2: bool,
}

/// One whole block device (not a partition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    /// `/dev/<name>`.
    pub path: PathBuf,
    /// Kernel name, e.g. `loop3`, `nvme0n1`.
    pub name: String,
    /// `major:minor`.
    pub devno: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// Lower-case bus name: nvme, sata, sas, scsi, virtio, usb, mmc, loop, zram, unknown.
    pub transport: String,
    /// `/dev/disk/by-id/...` names, computed from sysfs when udev made no links.
    pub by_id: Vec<String>,
    /// For loop devices: the backing file.
    pub backing_file: Option<PathBuf>,
    /// `gpt` or `dos` when a partition table was found.
    pub partition_table: Option<PartitionTable>,
    pub partitions: Vec<Partition>,
    /// Signatures on the whole-disk device itself (filesystem, swap, LVM, md, LUKS, ...),
    /// not counting the partition table, which is in `partition_table`.
    pub signatures: Vec<Signature>,
    /// Kernel holders (`/sys/block/X/holders`), e.g. `dm-0`, `md127`.
    pub holders: Vec<String>,
    pub mountpoints: Vec<PathBuf>,
    pub swap: bool,
    /// Facts that make this disk unusable, whatever the policy says.
    pub in_use: Vec<InUse>,
    /// Its measured reads, when kvstrap measured it while it was blank (cached by identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoFigures>,
    /// For a dm-multipath map (transport `mpath`): its WWID and its paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipath: Option<Multipath>,
}

/// What a short read-only measurement of a blank disk found (`host::ioprobe`), and the
/// class those figures put it in under the policy's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoFigures {
    /// Random 4 KiB reads per second at queue depth 16.
    pub random_read_iops: u64,
    /// Sequential 1 MiB reads, MiB per second.
    pub seq_read_mib_s: u64,
    /// When it was measured, seconds since the Unix epoch.
    pub measured_at: u64,
    pub class: IoClass,
}

/// A disk's IO class, from its measured random reads (`[io_class]` thresholds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoClass {
    Slow,
    Standard,
    Fast,
}

impl IoClass {
    pub const ALL: [IoClass; 3] = [IoClass::Fast, IoClass::Standard, IoClass::Slow];

    pub fn as_str(self) -> &'static str {
        match self {
            IoClass::Fast => "fast",
            IoClass::Standard => "standard",
            IoClass::Slow => "slow",
        }
    }
}

impl std::fmt::Display for IoClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What makes a dm-multipath map one disk: the LUN's WWID, and the paths that reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Multipath {
    /// The WWID multipathd names the LUN by (`dm/uuid` less `mpath-`), e.g.
    /// `36001405d27e5d898829468b90ce4ef8c`.
    pub wwid: String,
    /// Kernel name of the map (`dm-2`); `Disk::name` is the map's own name.
    pub kernel_name: String,
    /// The map's paths (`slaves/`), e.g. `sdb`, `sdc`.
    pub paths: Vec<MultipathPath>,
}

/// One path of a multipath map, as the kernel sees the SCSI device behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipathPath {
    pub name: String,
    /// The device's state (`device/state`): `running`, `offline`, `blocked`,
    /// `transport-offline`, ...; `unknown` when sysfs has none.
    pub state: String,
    /// Whether IO can go through it now.
    pub active: bool,
}

impl Multipath {
    pub fn active_paths(&self) -> usize {
        self.paths.iter().filter(|p| p.active).count()
    }

    /// Why the map is degraded (served, but with less redundancy than a SAN LUN should
    /// have): a failed path, or a single path left. None when at least two paths work
    /// and none failed, or when none works (that map is lost, not degraded).
    pub fn degraded(&self) -> Option<String> {
        let failed: Vec<String> = self
            .paths
            .iter()
            .filter(|p| !p.active)
            .map(|p| format!("{} {}", p.name, p.state))
            .collect();
        let active = self.active_paths();
        if active == 0 {
            return None;
        }
        if !failed.is_empty() {
            return Some(format!(
                "{active} of {} paths active (failed: {})",
                self.paths.len(),
                failed.join(", ")
            ));
        }
        (active == 1).then(|| "1 path left: no redundancy".to_string())
    }

    /// `healthy`, `degraded` (see [`Multipath::degraded`]) or `lost` (no working path).
    pub fn state(&self) -> &'static str {
        if self.active_paths() == 0 {
            "lost"
        } else if self.degraded().is_some() {
            "degraded"
        } else {
            "healthy"
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionTable {
    /// `gpt` or `dos`.
    pub kind: String,
    /// Disk GUID for GPT, disk identifier for dos.
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    pub path: PathBuf,
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// GPT partition type GUID (lower case) or dos type (`0x83`).
    pub type_id: Option<String>,
    /// GPT partition UUID (lower case).
    pub part_uuid: Option<String>,
    /// GPT partition name.
    pub name: Option<String>,
    pub signatures: Vec<Signature>,
    pub holders: Vec<String>,
    pub mountpoints: Vec<PathBuf>,
    pub swap: bool,
    /// `/dev/disk/by-id/...-partN` names.
    #[serde(default)]
    pub by_id: Vec<String>,
    /// The kernel knows this partition (it has a device node); false for an entry that
    /// is in the on-disk table but was never added (BLKPG) or was removed.
    #[serde(default)]
    pub in_kernel: bool,
    /// udev's `/dev/disk/by-partuuid/<part_uuid>` exists and resolves to this very
    /// partition's node; false without udev, or before udev got to the partition (it waits
    /// while kvstrap holds the disk). A Block volume's link then points there.
    #[serde(default)]
    pub by_partuuid: bool,
    /// What kvstrap made it for, as its GPT entry records (kvstrap's partitions only).
    #[serde(default, skip_serializing_if = "PartitionRole::is_unrecorded")]
    pub role: PartitionRole,
    /// Every mount of the partition's filesystem, in every mount namespace: kvstrap's own,
    /// kubelet's bind mounts of a volume into a pod, anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountFact>,
    /// Bind mounts of the partition's device node (kubelet maps a Block volume so).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_binds: Vec<MountFact>,
    /// Loop devices over the partition (kubelet attaches one to a mapped Block volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loop_devices: Vec<LoopOver>,
    /// Its GPT entry says kvstrap made it a LUKS2 volume (attribute bit 51).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The dm-crypt mapping open over the partition (a holder whose dm UUID starts with
    /// `CRYPT-`), with what is on it and what uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypt: Option<CryptMapping>,
}

/// A dm-crypt mapping open over a partition, as sysfs and libblkid see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CryptMapping {
    /// The device-mapper name: `kvs-1a2b3c4d` (`/dev/mapper/<name>`).
    pub name: String,
    /// The kernel name: `dm-3`.
    pub kernel_name: String,
    /// `major:minor`.
    pub devno: String,
    /// The dm UUID: `CRYPT-LUKS2-<LUKS UUID without dashes>-<name>`.
    pub dm_uuid: String,
    /// Signatures on the mapping (the filesystem kvstrap made, a guest's data).
    pub signatures: Vec<Signature>,
    pub holders: Vec<String>,
    pub mountpoints: Vec<PathBuf>,
    /// Every mount of the mapping's filesystem, in every mount namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountFact>,
    /// Bind mounts of the mapping's device node (kubelet maps a Block volume so).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_binds: Vec<MountFact>,
    /// Loop devices over the mapping.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loop_devices: Vec<LoopOver>,
    /// udev's `/dev/disk/by-id/dm-uuid-<dm_uuid>` exists and resolves to this mapping.
    #[serde(default)]
    pub by_dm_uuid: bool,
}

impl CryptMapping {
    /// `/dev/mapper/<name>`.
    pub fn path(&self) -> PathBuf {
        mapper_path(&self.name)
    }

    /// Whether this is the mapping kvstrap opens for the LUKS2 header `luks`.
    pub fn is_of(&self, luks: &LuksSpec) -> bool {
        self.name == luks.label && self.dm_uuid == dm_crypt_uuid(&luks.uuid, &luks.label)
    }
}

/// A loop device whose backing file is a block device node (or a bind mount of one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopOver {
    pub device: PathBuf,
    pub backing_file: PathBuf,
}

/// One mount as mountinfo shows it, in kvstrap's mount namespace or another one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountFact {
    pub mountpoint: PathBuf,
    /// The directory of the mounted filesystem the mount shows: `/` for the whole
    /// filesystem, `/vol-03` for a bind mount of that directory (for a device node's bind
    /// mount, the node's path in /dev).
    pub root: PathBuf,
    /// A process of the mount namespace the mount is in, when that is not kvstrap's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// One signature libblkid recognised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// libblkid's TYPE: ext4, xfs, swap, LVM2_member, linux_raid_member, crypto_LUKS, ...
    pub kind: String,
    /// libblkid's USAGE: filesystem, raid, crypto, other.
    pub usage: Option<String>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// A filesystem whose mkfs did not finish (see [`MKFS_IN_PROGRESS_LABEL`]): it holds
    /// no data and is made again when it carries the planned UUID.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfinished: bool,
}

/// The label kvstrap gives a filesystem while mkfs runs; the planned label replaces it only
/// after mkfs succeeded. A filesystem still labelled so (or an xfs superblock still marked
/// `sb_inprogress`) was interrupted: it is made again, never adopted or mounted.
pub const MKFS_IN_PROGRESS_LABEL: &str = "kvs-mkfs";

/// The label a LUKS2 header of kvstrap's carries until its key slots are enrolled; the
/// planned label replaces it last. A header still labelled so never held data (nothing
/// could open it): it is formatted again.
pub const LUKS_IN_PROGRESS_LABEL: &str = "kvs-luks-init";
/// The label `kvstrap forget --erase` leaves on a header whose key slots it destroyed:
/// such a partition is never opened or formatted again without an explicit wipe.
pub const LUKS_ERASED_LABEL: &str = "kvs-luks-erased";
/// The LUKS2 subsystem kvstrap writes beside its label.
pub const LUKS_SUBSYSTEM: &str = "kvstrap";
/// Where the data of a LUKS2 volume of kvstrap's starts: its header (two copies of the
/// metadata and the key slot area) takes the first 16 MiB, as cryptsetup lays it out.
pub const LUKS_HEADER_BYTES: u64 = 16 << 20;

/// A machine fact that rules a disk out regardless of policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InUse {
    /// Holds the root filesystem or the boot device.
    SystemDisk {
        detail: String,
    },
    /// The disk or one of its partitions is mounted (and not by kvstrap below storage_root).
    Mounted {
        mountpoint: PathBuf,
    },
    /// A device-mapper, md or other holder sits on top of the disk or a partition.
    Holder {
        holder: String,
    },
    Swap {
        device: PathBuf,
    },
    Zram,
    ReadOnly,
    Removable,
    /// An exclusive open (`O_EXCL`) failed: something else holds the device.
    Busy {
        detail: String,
    },
    /// The device could not be opened or probed at all.
    Unreadable {
        detail: String,
    },
    /// Not a disk kvstrap may use: device-mapper, md, ram, optical, ...
    Virtual {
        detail: String,
    },
    /// One path of a dm-multipath map: the map is the disk, never its paths.
    MultipathPath {
        map: String,
    },
    /// A multipath map none of whose paths works: no IO reaches the LUN.
    NoPath {
        detail: String,
    },
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InUse::SystemDisk { detail } => write!(f, "system disk ({detail})"),
            InUse::Mounted { mountpoint } => write!(f, "mounted at {}", mountpoint.display()),
            InUse::Holder { holder } => write!(f, "held by {holder}"),
            InUse::Swap { device } => write!(f, "swap on {}", device.display()),
            InUse::Zram => write!(f, "zram device"),
            InUse::ReadOnly => write!(f, "read-only"),
            InUse::Removable => write!(f, "removable media"),
            InUse::Busy { detail } => write!(f, "busy: {detail}"),
            InUse::Unreadable { detail } => write!(f, "cannot be opened: {detail}"),
            InUse::Virtual { detail } => write!(f, "not a physical disk: {detail}"),
            InUse::MultipathPath { map } => write!(
                f,
                "path of the multipath map {map}: kvstrap uses the map, never one of its paths"
            ),
            InUse::NoPath { detail } => write!(f, "multipath map without a working path: {detail}"),
        }
    }
}

/// What kvstrap found at a path it manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PathFacts {
    Directory {
        uid: u32,
        gid: u32,
        mode: u32,
        /// XFS/ext4 project id (FS_IOC_FSGETXATTR), when the filesystem supports it.
        project_id: Option<u32>,
        /// Hard block limit of that project, in bytes, when a quota is set.
        quota_bytes: Option<u64>,
        /// Device (major:minor) of the filesystem holding the directory.
        devno: String,
    },
    Symlink {
        target: PathBuf,
    },
    Other,
}

// ---------------------------------------------------------------------------------------
// What the planner decides.

/// Ownership verdict of one disk: only `Ours` and `Free` may receive writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Carries kvstrap's partitions: adopted.
    Ours,
    /// Blank and usable.
    Free,
    /// Has a signature kvstrap did not write.
    Foreign { signature: String },
    /// A machine fact rules it out.
    InUse { reason: String },
    /// Excluded by policy (loop devices without allow_loop, selected by no group, ...).
    Excluded { reason: String },
}

impl Verdict {
    pub fn is_writable(&self) -> bool {
        matches!(self, Verdict::Ours | Verdict::Free)
    }
    pub fn reason(&self) -> String {
        match self {
            Verdict::Ours => "provisioned by kvstrap".into(),
            Verdict::Free => "empty".into(),
            Verdict::Foreign { signature } => format!("not empty: {signature}"),
            Verdict::InUse { reason } | Verdict::Excluded { reason } => reason.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Xfs,
    Ext4,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Shared,
    Separate,
}

/// A filesystem the plan wants on a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSpec {
    pub fs_type: FsType,
    pub uuid: uuid::Uuid,
    pub label: String,
    /// Shared-layout filesystems need project quotas.
    pub project_quota: bool,
    pub mountpoint: PathBuf,
    pub mount_options: Vec<String>,
}

/// What kvstrap made a partition for. It is recorded in the partition's GPT entry, in
/// attribute bits 48-50 (the bits GPT leaves to each partition type to define; the type
/// is kvstrap's own), so a later run and a reinstalled OS read it from the disk itself: a
/// provisioned volume never changes kind by policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionRole {
    /// Written by a kvstrap that did not record roles (or not kvstrap's).
    #[default]
    Unrecorded,
    /// One filesystem holding many directory volumes (the shared layout).
    SharedFilesystem,
    /// A filesystem that is one volume (the separate layout).
    Filesystem,
    /// A raw partition that is one Block volume: whatever is on it is the tenant's.
    Block,
}

impl PartitionRole {
    const SHIFT: u32 = 48;
    const MASK: u64 = 0b111 << Self::SHIFT;

    /// The attribute bits of a GPT entry that record this role.
    pub fn attribute_bits(self) -> u64 {
        let code: u64 = match self {
            PartitionRole::Unrecorded => 0,
            PartitionRole::SharedFilesystem => 1,
            PartitionRole::Filesystem => 2,
            PartitionRole::Block => 3,
        };
        code << Self::SHIFT
    }

    /// The role recorded in a kvstrap partition's GPT attributes.
    pub fn from_attributes(attributes: u64) -> PartitionRole {
        match (attributes & Self::MASK) >> Self::SHIFT {
            1 => PartitionRole::SharedFilesystem,
            2 => PartitionRole::Filesystem,
            3 => PartitionRole::Block,
            _ => PartitionRole::Unrecorded,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PartitionRole::Unrecorded => "a partition without a recorded role",
            PartitionRole::SharedFilesystem => "a shared filesystem of directory volumes",
            PartitionRole::Filesystem => "a filesystem volume",
            PartitionRole::Block => "a raw Block volume",
        }
    }

    pub fn is_unrecorded(&self) -> bool {
        *self == PartitionRole::Unrecorded
    }
}

/// The LUKS2 volume kvstrap puts on a partition of an encrypted group: its filesystem or
/// Block link sits on the mapping `/dev/mapper/<label>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuksSpec {
    /// Derived from the disk identity like every other UUID kvstrap writes.
    pub uuid: uuid::Uuid,
    /// `kvs-` and 8 hex digits of the UUID: the header's label and the mapping's name.
    pub label: String,
    pub unlock: Unlock,
}

impl LuksSpec {
    /// `/dev/mapper/<label>`, where the volume is open.
    pub fn mapping_path(&self) -> PathBuf {
        mapper_path(&self.label)
    }

    /// udev's stable name of the open mapping.
    pub fn by_dm_uuid_path(&self) -> PathBuf {
        Path::new("/dev/disk/by-id").join(format!(
            "dm-uuid-{}",
            dm_crypt_uuid(&self.uuid, &self.label)
        ))
    }
}

/// What unlocks a LUKS2 volume: the TPM2 seal, the key file, or either. Names only: a key
/// never appears in a plan, a log or a state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unlock {
    /// The PCRs of the TPM2 seal; None: no TPM2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm2_pcrs: Option<Vec<u8>>,
    /// The key file (its path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Unlock {
    /// `tpm2 (PCRs 7)`, `key file /etc/k`, `tpm2 (PCRs 7) or key file /etc/k`.
    pub fn describe(&self) -> String {
        let tpm = self.tpm2_pcrs.as_ref().map(|p| {
            let list: Vec<String> = p.iter().map(u8::to_string).collect();
            match list.as_slice() {
                [] => "tpm2 (no PCRs)".to_string(),
                _ => format!("tpm2 (PCRs {})", list.join("+")),
            }
        });
        let key = self
            .key_file
            .as_ref()
            .map(|k| format!("key file {}", k.display()));
        match (tpm, key) {
            (Some(t), Some(k)) => format!("{t} or {k}"),
            (Some(t), None) => t,
            (None, Some(k)) => k,
            (None, None) => "nothing".into(),
        }
    }
}

/// `/dev/mapper/<name>`.
pub fn mapper_path(name: &str) -> PathBuf {
    Path::new("/dev/mapper").join(name)
}

/// The dm UUID cryptsetup gives the mapping of a LUKS2 volume: `CRYPT-LUKS2-<UUID without
/// dashes>-<name>`.
pub fn dm_crypt_uuid(luks_uuid: &uuid::Uuid, name: &str) -> String {
    format!("CRYPT-LUKS2-{}-{name}", luks_uuid.simple())
}

/// GPT attribute bit 51 (beside the role's bits 48-50): the partition is a LUKS2 volume
/// of kvstrap's, so an encrypted volume is never taken for a plain one or the reverse.
pub const ENCRYPTED_ATTRIBUTE: u64 = 1 << 51;

/// One partition of the desired layout of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    /// 1-based GPT entry number.
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub part_uuid: uuid::Uuid,
    /// GPT partition name (36 UTF-16 units at most).
    pub name: String,
    /// `/dev/loop3p1`, `/dev/nvme0n1p1`, `/dev/sda1`.
    pub device: PathBuf,
    /// None for a raw Block volume.
    pub filesystem: Option<FsSpec>,
    /// What the partition is for, written into its GPT entry.
    #[serde(default)]
    pub role: PartitionRole,
    /// The LUKS2 volume between the partition and its filesystem or Block link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<LuksSpec>,
}

impl PartitionSpec {
    /// The GPT attribute bits of its entry: the role, and whether it is encrypted.
    pub fn attribute_bits(&self) -> u64 {
        let encrypted = if self.encryption.is_some() {
            ENCRYPTED_ATTRIBUTE
        } else {
            0
        };
        self.role.attribute_bits() | encrypted
    }

    /// Where its filesystem is made and its Block link points: the mapping when it is
    /// encrypted, else the partition itself.
    pub fn data_device(&self) -> PathBuf {
        match &self.encryption {
            Some(luks) => luks.mapping_path(),
            None => self.device.clone(),
        }
    }
}

/// The whole desired layout of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    pub disk: PathBuf,
    /// Stable identity: `wwn:...`, `serial:...` or `path:...`.
    pub identity: String,
    pub group: String,
    pub disk_guid: uuid::Uuid,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub partitions: Vec<PartitionSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// udev's name for a partition by its GPT UUID, beside the kernel node `device`
/// (`/dev/vdb1` -> `/dev/disk/by-partuuid/<uuid>`). It follows the partition when kernel
/// names move between boots, so a Block volume's link may point there.
pub fn by_partuuid_path(device: &std::path::Path, part_uuid: &uuid::Uuid) -> PathBuf {
    device
        .parent()
        .unwrap_or_else(|| std::path::Path::new("/dev"))
        .join("disk/by-partuuid")
        .join(part_uuid.to_string())
}

/// Where multipath-tools puts its maps and their partition mappings.
pub const MAPPER_DIR: &str = "/dev/mapper";

/// The partition mapping of partition `number` of the multipath map `map`, named as
/// Debian's multipath-tools names it (kpartx `-p -part`, its udev rule):
/// `/dev/mapper/mpatha-part1`.
pub fn map_partition_path(map: &str, number: u32) -> PathBuf {
    std::path::Path::new(MAPPER_DIR).join(format!("{map}-part{number}"))
}

/// The largest unit a filesystem rounds a quota limit up to: xfs keeps limits in whole
/// filesystem blocks (up to 64 KiB), ext4's quota file in 1 KiB units.
pub const QUOTA_LIMIT_GRANULE: u64 = 64 * 1024;

/// Whether a hard limit the filesystem reports (`stored`) is what it keeps when asked for
/// `wanted`: never below it (the published capacity must hold), above it only by the
/// filesystem's rounding. A 1 GB limit on xfs with 4 KiB blocks reads back as
/// 1,000,001,536 bytes; comparing for equality would re-set it on every run.
pub fn quota_limit_holds(wanted: u64, stored: Option<u64>) -> bool {
    stored.is_some_and(|s| s >= wanted && s - wanted < QUOTA_LIMIT_GRANULE)
}

/// One volume kvstrap provides, and publishes as a PersistentVolume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Stable name, e.g. `nvme-3f2a9c1b-v03`; unique on the node.
    pub name: String,
    pub group: String,
    pub storage_class: String,
    pub volume_mode: VolumeMode,
    /// Directory (Filesystem) or stable block symlink (Block).
    pub path: PathBuf,
    /// What the volume can really store: quota for directories, partition size for Block.
    pub capacity_bytes: u64,
    pub disk: PathBuf,
    pub disk_identity: String,
    /// The partition device that holds the volume.
    pub device: PathBuf,
    pub transport: String,
    pub rotational: bool,
    /// The measured class of its disk (`kvstrap.io/io-class` on the PV), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_class: Option<IoClass>,
    /// Project id of a directory volume on a shared filesystem.
    pub project_id: Option<u32>,
    pub owner: Option<Owner>,
    pub fs_type: Option<FsType>,
    /// The volume's directory inside its filesystem: `/vol-03` on a shared filesystem, `/`
    /// for a filesystem of its own, none for Block. A mount that shows this directory (or
    /// one below it: a `subPath`) is a use of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_in_fs: Option<PathBuf>,
    /// The LUKS2 mapping the volume sits on (`/dev/mapper/kvs-...`), when its group is
    /// encrypted: a Block volume's link points there, and its scrub writes there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<PathBuf>,
}

impl VolumeSpec {
    /// Whether the volume is on a LUKS2 volume (PVs carry `kvstrap.io/encrypted: "true"`).
    pub fn encrypted(&self) -> bool {
        self.mapping.is_some()
    }

    /// The block device that holds the volume's data: the mapping, else the partition.
    pub fn data_device(&self) -> &Path {
        self.mapping.as_deref().unwrap_or(&self.device)
    }
}

/// Something on the node that uses a volume: kvstrap never scrubs, unmounts or hands out
/// a volume while it has one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeUse {
    pub kind: UseKind,
    /// The mount point, the device node's bind mount, or the device that holds it.
    pub path: PathBuf,
    /// The pod, when the path is kubelet's (`.../pods/<uid>/volumes/...`,
    /// `.../volumeDevices/<pv>/<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// A process of the mount namespace the use is in, when not kvstrap's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UseKind {
    /// A mount or bind mount of the volume's directory or filesystem.
    Mount,
    /// A bind mount of a Block volume's device node.
    DeviceMapping,
    /// A loop device over a Block volume's partition.
    LoopDevice,
    /// A device-mapper or md device stacked on the partition.
    Holder,
}

impl std::fmt::Display for VolumeUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            UseKind::Mount => "mounted at",
            UseKind::DeviceMapping => "device mapped at",
            UseKind::LoopDevice => "held by loop device",
            UseKind::Holder => "held by",
        };
        write!(f, "{what} {}", self.path.display())?;
        if let Some(uid) = &self.pod_uid {
            write!(f, " (pod {uid})")?;
        }
        if let Some(pid) = self.pid {
            write!(f, " (mount namespace of pid {pid})")?;
        }
        Ok(())
    }
}

/// One action of the plan, with why it is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Wipe every signature on a disk the policy names by serial/WWN with `wipe = "force"`.
    WipeDisk {
        disk: PathBuf,
        identity: String,
        signatures: Vec<String>,
        reason: String,
    },
    /// Write a fresh GPT with the whole layout and tell the kernel (BLKPG).
    WritePartitionTable {
        disk: PathBuf,
        layout: DiskLayout,
        reason: String,
    },
    /// Tell the kernel about partitions that are on disk but have no device node.
    AddPartitionNodes {
        disk: PathBuf,
        layout: DiskLayout,
        numbers: Vec<u32>,
        reason: String,
    },
    /// Put a LUKS2 header on a partition of an encrypted group and enroll what unlocks it
    /// (key file, TPM2 seal); its planned label, written last, marks it complete.
    FormatLuks {
        disk: PathBuf,
        device: PathBuf,
        luks: LuksSpec,
        reason: String,
    },
    /// Open a LUKS2 volume of kvstrap's as `/dev/mapper/<label>`.
    OpenLuks {
        disk: PathBuf,
        device: PathBuf,
        luks: LuksSpec,
        reason: String,
    },
    /// Close the mapping of a drained disk's LUKS2 volume; header and data stay.
    CloseLuks {
        disk: PathBuf,
        device: PathBuf,
        mapping: String,
        reason: String,
    },
    /// Destroy every key slot of a LUKS2 volume (crypto-erase): `kvstrap forget --erase`
    /// only, never a plan's own decision.
    EraseLuks {
        disk: PathBuf,
        device: PathBuf,
        luks_uuid: uuid::Uuid,
        reason: String,
    },
    MakeFilesystem {
        disk: PathBuf,
        device: PathBuf,
        fs_type: FsType,
        uuid: uuid::Uuid,
        label: String,
        project_quota: bool,
        reason: String,
    },
    Mount {
        disk: PathBuf,
        device: PathBuf,
        fs_uuid: uuid::Uuid,
        fs_type: FsType,
        mountpoint: PathBuf,
        options: Vec<String>,
        reason: String,
    },
    /// A volume directory on a shared (or separate) filesystem.
    CreateDirectory {
        disk: PathBuf,
        path: PathBuf,
        owner: Owner,
        reason: String,
    },
    /// Set ownership/mode of an existing directory that drifted.
    SetOwnership {
        disk: PathBuf,
        path: PathBuf,
        owner: Owner,
        reason: String,
    },
    /// Hard project quota equal to the published capacity.
    SetQuota {
        disk: PathBuf,
        path: PathBuf,
        mountpoint: PathBuf,
        project_id: u32,
        bytes: u64,
        reason: String,
    },
    /// Stable symlink to the partition of a Block volume (to its LUKS2 mapping, when the
    /// group is encrypted).
    LinkBlockDevice {
        disk: PathBuf,
        link: PathBuf,
        /// The partition's kernel node.
        target: PathBuf,
        part_uuid: uuid::Uuid,
        /// The LUKS2 volume on the partition, whose mapping the link points at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        crypt: Option<CryptTarget>,
        reason: String,
    },
    /// Unmount one of kvstrap's filesystems of a drained disk; the data stays.
    Unmount {
        disk: PathBuf,
        mountpoint: PathBuf,
        reason: String,
    },
    /// Remove the link of a Block volume on a drained disk; the partition stays.
    RemoveBlockLink {
        disk: PathBuf,
        link: PathBuf,
        reason: String,
    },
}

impl Step {
    pub fn reason(&self) -> &str {
        match self {
            Step::WipeDisk { reason, .. }
            | Step::WritePartitionTable { reason, .. }
            | Step::AddPartitionNodes { reason, .. }
            | Step::FormatLuks { reason, .. }
            | Step::OpenLuks { reason, .. }
            | Step::CloseLuks { reason, .. }
            | Step::EraseLuks { reason, .. }
            | Step::MakeFilesystem { reason, .. }
            | Step::Mount { reason, .. }
            | Step::CreateDirectory { reason, .. }
            | Step::SetOwnership { reason, .. }
            | Step::SetQuota { reason, .. }
            | Step::LinkBlockDevice { reason, .. }
            | Step::Unmount { reason, .. }
            | Step::RemoveBlockLink { reason, .. } => reason,
        }
    }

    /// The disk a step belongs to, so that steps of different disks can run in parallel.
    pub fn disk(&self) -> &PathBuf {
        match self {
            Step::WipeDisk { disk, .. }
            | Step::WritePartitionTable { disk, .. }
            | Step::AddPartitionNodes { disk, .. }
            | Step::FormatLuks { disk, .. }
            | Step::OpenLuks { disk, .. }
            | Step::CloseLuks { disk, .. }
            | Step::EraseLuks { disk, .. }
            | Step::MakeFilesystem { disk, .. }
            | Step::Mount { disk, .. }
            | Step::CreateDirectory { disk, .. }
            | Step::SetOwnership { disk, .. }
            | Step::SetQuota { disk, .. }
            | Step::LinkBlockDevice { disk, .. }
            | Step::Unmount { disk, .. }
            | Step::RemoveBlockLink { disk, .. } => disk,
        }
    }

    /// Short name of the action, as in the JSON `action` field.
    pub fn action(&self) -> &'static str {
        match self {
            Step::WipeDisk { .. } => "wipe_disk",
            Step::WritePartitionTable { .. } => "write_partition_table",
            Step::AddPartitionNodes { .. } => "add_partition_nodes",
            Step::FormatLuks { .. } => "format_luks",
            Step::OpenLuks { .. } => "open_luks",
            Step::CloseLuks { .. } => "close_luks",
            Step::EraseLuks { .. } => "erase_luks",
            Step::MakeFilesystem { .. } => "make_filesystem",
            Step::Mount { .. } => "mount",
            Step::CreateDirectory { .. } => "create_directory",
            Step::SetOwnership { .. } => "set_ownership",
            Step::SetQuota { .. } => "set_quota",
            Step::LinkBlockDevice { .. } => "link_block_device",
            Step::Unmount { .. } => "unmount",
            Step::RemoveBlockLink { .. } => "remove_block_link",
        }
    }
}

/// The mapping a Block volume's link points at: the LUKS2 volume `uuid`, open as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CryptTarget {
    pub uuid: uuid::Uuid,
    pub name: String,
}

/// A LUKS2 volume of kvstrap's that nothing opened in a run: left as it is (never
/// formatted), its volumes unpublished, and reported by name in `status`, the journal and
/// the Node's condition until it opens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockedVolume {
    pub disk: PathBuf,
    /// The partition that carries the header.
    pub device: PathBuf,
    /// The mapping it would be open as (`kvs-...`).
    pub mapping: String,
    /// The volumes on it.
    pub volumes: Vec<String>,
    /// What was tried, and what each said.
    pub error: String,
}

/// A disk the policy selected but the planner will not touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub disk: PathBuf,
    pub group: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Size of all disks assigned to groups.
    pub raw_bytes: u64,
    /// Sum of the capacity of every volume.
    pub published_bytes: u64,
    /// Capacity kept back by `reserve`.
    pub reserve_bytes: u64,
    /// raw / published: production nodes want at least 1.5.
    pub headroom_ratio: f64,
}

impl Eq for Totals {}

/// Everything the planner decided for one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlan {
    pub name: String,
    pub storage_class: String,
    pub layout: Layout,
    pub disks: Vec<DiskLayout>,
    pub volumes: Vec<VolumeSpec>,
    /// A dynamic group's filesystems, which claims get directories on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSpec>,
}

/// One filesystem of a dynamic group (`provisioning = "dynamic"`): each claim served on
/// this node gets a directory on it, `pvc-<claim uid>`, with a hard quota of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub group: String,
    pub storage_class: String,
    pub disk: PathBuf,
    pub disk_identity: String,
    /// The partition that holds the filesystem.
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub fs_type: FsType,
    /// What the quotas of its directories may add up to: the filesystem's capacity less
    /// the reserve, times `overcommit`.
    pub capacity_bytes: u64,
    /// Project quotas hold each directory to its size (false only where the kernel cannot
    /// and the group says `quota = "if-supported"`).
    pub project_quota: bool,
    pub owner: Owner,
    pub transport: String,
    pub rotational: bool,
    /// The measured class of its disk, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_class: Option<IoClass>,
    /// The LUKS2 mapping the filesystem sits on, when the group is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<PathBuf>,
}

impl PoolSpec {
    /// The block device the filesystem is on: the mapping, else the partition.
    pub fn data_device(&self) -> &Path {
        self.mapping.as_deref().unwrap_or(&self.device)
    }
}

/// The output of the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub node: String,
    pub storage_root: PathBuf,
    pub groups: Vec<GroupPlan>,
    pub refused: Vec<Refusal>,
    /// Things the operator should know that do not stop the plan.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Ordered steps; empty when the node already matches the policy.
    pub steps: Vec<Step>,
    pub totals: Totals,
    /// Disks taken out of service (`kvstrap drain`): their volumes are not published.
    #[serde(default)]
    pub out_of_service: Vec<OutOfServiceDisk>,
}

/// A disk the planner keeps out of service, as the plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfServiceDisk {
    pub disk: PathBuf,
    pub identity: String,
    pub group: Option<String>,
    pub phase: ServicePhase,
    /// The volumes on it, kept (and, while draining, mounted) but no longer published.
    pub volumes: Vec<VolumeSpec>,
}

/// Where a disk is on its way out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServicePhase {
    /// Nothing new binds to it; volumes still in use stay mounted until released.
    Draining,
    /// Nothing uses it: unmounted, left intact, never provisioned or published again.
    Drained,
}

impl ServicePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ServicePhase::Draining => "draining",
            ServicePhase::Drained => "drained",
        }
    }
}

/// What the operator said about disks, kept in the state directory (`disks.json`):
/// disks taken out of service and new disks put in the place of old ones. Keyed by the
/// stable disk identity (`wwn:...`, `serial:...`), never by kernel name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskService {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub out_of_service: BTreeMap<String, ServiceRecord>,
    #[serde(default)]
    pub replacements: BTreeMap<String, Replacement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub phase: ServicePhase,
    /// The kernel name when it was drained, for people.
    pub path: PathBuf,
    /// The group it belonged to, where a replacement goes.
    pub group: Option<String>,
    pub since_unix: u64,
    /// `kvstrap drain`, `D-Bus Drain by uid 0`, `health failed (on_failure = "drain")`.
    pub why: String,
}

/// A new disk provisioned into the group of a disk that left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub group: String,
    /// Identity of the disk it replaces.
    pub replaces: String,
    pub path: PathBuf,
    pub since_unix: u64,
}

impl Plan {
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeSpec> {
        self.groups.iter().flat_map(|g| g.volumes.iter())
    }

    pub fn pools(&self) -> impl Iterator<Item = &PoolSpec> {
        self.groups.iter().flat_map(|g| g.pools.iter())
    }
}
