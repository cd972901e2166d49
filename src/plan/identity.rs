//! Stable identities: a disk is known by its WWN or serial (never by /dev/sdX), and every
//! UUID kvstrap writes is derived from that identity, the group and an index, so a re-run
//! and an OS reinstall (new machine-id) both recognise what kvstrap laid out.

use crate::model::{Disk, KVSTRAP_UUID_NAMESPACE};
use sha2::{Digest, Sha256};

/// `wwn:...`, `serial:...`, `loop:<backing file>` or `path:/dev/...`, in that preference.
pub fn disk_identity(disk: &Disk) -> String {
    if let Some(wwn) = non_empty(&disk.wwn) {
        return format!("wwn:{wwn}");
    }
    // A multipath map whose WWID is no NAA name (EUI-64, T10, vendor-specific) still
    // names its LUN uniquely.
    if let Some(m) = disk.multipath.as_ref().filter(|m| !m.wwid.is_empty()) {
        return format!("wwid:{}", m.wwid);
    }
    if let Some(serial) = non_empty(&disk.serial) {
        return format!("serial:{serial}");
    }
    // A loop device's number changes from one attach to the next; its file does not.
    if let Some(file) = &disk.backing_file {
        return format!("loop:{}", file.display());
    }
    format!("path:{}", disk.path.display())
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Eight hex digits that name a disk in paths and volume names.
pub fn short_id(identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// A UUID derived from the disk identity, group and what it is for.
pub fn derived_uuid(identity: &str, group: &str, what: &str) -> uuid::Uuid {
    let name = format!("{identity}\n{group}\n{what}");
    uuid::Uuid::new_v5(&KVSTRAP_UUID_NAMESPACE, name.as_bytes())
}

pub fn disk_guid(identity: &str, group: &str) -> uuid::Uuid {
    derived_uuid(identity, group, "disk")
}

pub fn partition_uuid(identity: &str, group: &str, number: u32) -> uuid::Uuid {
    derived_uuid(identity, group, &format!("partition-{number}"))
}

pub fn filesystem_uuid(identity: &str, group: &str, number: u32) -> uuid::Uuid {
    derived_uuid(identity, group, &format!("filesystem-{number}"))
}

/// The UUID of the LUKS2 header on a partition of an encrypted group.
pub fn luks_uuid(identity: &str, group: &str, number: u32) -> uuid::Uuid {
    derived_uuid(identity, group, &format!("luks-{number}"))
}

/// The LUKS2 label, and the name of the mapping: `kvs-` and 8 hex digits of the header's
/// UUID, like a filesystem label (a dm name may hold 127 characters; this one is short
/// enough to read in `lsblk`).
pub fn luks_label(luks_uuid: &uuid::Uuid) -> String {
    filesystem_label(luks_uuid)
}

/// Filesystem label: `kvs-` and 8 hex digits of the filesystem UUID, short enough for
/// XFS (12 characters) and ext4 (16).
pub fn filesystem_label(fs_uuid: &uuid::Uuid) -> String {
    let hex = fs_uuid.simple().to_string();
    format!("kvs-{}", &hex[..8])
}

/// Whether a filesystem label is one kvstrap gives (or the one it gives while mkfs runs).
pub fn is_filesystem_label(label: &str) -> bool {
    label.len() == 12 && label.starts_with("kvs-")
}

/// `/dev/nvme0n1` + 2 -> `/dev/nvme0n1p2`; `/dev/sda` + 2 -> `/dev/sda2`; a multipath
/// map's partition mapping, `/dev/mapper/mpatha` + 2 -> `/dev/mapper/mpatha-part2`.
pub fn partition_device(disk: &std::path::Path, number: u32) -> std::path::PathBuf {
    if let (Some(dir), Some(map)) = (disk.parent(), disk.file_name()) {
        if dir == std::path::Path::new(crate::model::MAPPER_DIR) {
            return crate::model::map_partition_path(&map.to_string_lossy(), number);
        }
    }
    let base = disk.to_string_lossy();
    let needs_p = base.chars().last().is_some_and(|c| c.is_ascii_digit());
    let sep = if needs_p { "p" } else { "" };
    std::path::PathBuf::from(format!("{base}{sep}{number}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(wwn: Option<&str>, serial: Option<&str>) -> Disk {
        Disk {
            path: "/dev/sdb".into(),
            wwn: wwn.map(String::from),
            serial: serial.map(String::from),
            ..Disk::default()
        }
    }

    #[test]
    fn identity_prefers_wwn_then_serial_then_path() {
        assert_eq!(
            disk_identity(&disk(Some("0x5000c500a1b2c3d4"), Some("S1"))),
            "wwn:0x5000c500a1b2c3d4"
        );
        assert_eq!(disk_identity(&disk(None, Some("S1"))), "serial:S1");
        assert_eq!(disk_identity(&disk(Some("  "), None)), "path:/dev/sdb");
    }

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = partition_uuid("serial:S1", "nvme", 1);
        assert_eq!(a, partition_uuid("serial:S1", "nvme", 1));
        assert_ne!(a, partition_uuid("serial:S1", "nvme", 2));
        assert_ne!(a, partition_uuid("serial:S2", "nvme", 1));
        assert_ne!(a, filesystem_uuid("serial:S1", "nvme", 1));
        assert_ne!(a, luks_uuid("serial:S1", "nvme", 1));
        assert_ne!(
            luks_uuid("serial:S1", "nvme", 1),
            filesystem_uuid("serial:S1", "nvme", 1)
        );
        assert_eq!(a.get_version_num(), 5);
    }

    #[test]
    fn labels_fit_xfs() {
        let label = filesystem_label(&filesystem_uuid("serial:S1", "g", 1));
        assert_eq!(label.len(), 12);
        assert!(label.starts_with("kvs-"));
    }

    #[test]
    fn partition_device_names() {
        assert_eq!(
            partition_device("/dev/nvme0n1".as_ref(), 2),
            std::path::PathBuf::from("/dev/nvme0n1p2")
        );
        assert_eq!(
            partition_device("/dev/loop7".as_ref(), 1),
            std::path::PathBuf::from("/dev/loop7p1")
        );
        assert_eq!(
            partition_device("/dev/sda".as_ref(), 3),
            std::path::PathBuf::from("/dev/sda3")
        );
        assert_eq!(
            partition_device("/dev/mapper/mpatha".as_ref(), 2),
            std::path::PathBuf::from("/dev/mapper/mpatha-part2")
        );
    }
}
