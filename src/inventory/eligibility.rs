//! Machine facts that rule a disk out whatever the policy says (`Disk::in_use`).
//! Pure: everything it needs was observed before.

use crate::model::{Disk, InUse};
use std::path::{Path, PathBuf};

/// Mount points that make a disk the system disk.
const SYSTEM_MOUNTS: [&str; 5] = ["/", "/boot", "/boot/efi", "/efi", "/usr"];

/// What was observed about a disk beyond the `Disk` record itself.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Mount points of devices stacked on the disk (dm, md on top of it or a partition).
    pub stacked_mounts: Vec<(String, PathBuf)>,
    /// Swap areas on stacked devices.
    pub stacked_swaps: Vec<PathBuf>,
    /// SCSI peripheral type: 5 is an optical drive.
    pub scsi_type: Option<u32>,
    /// Set when the kernel command line's `root=` names this disk or one of its parts.
    pub boot_device: Option<String>,
    /// Why the exclusive open failed.
    pub busy: Option<String>,
    /// Why the disk could not be opened or probed.
    pub unreadable: Option<String>,
}

/// Every reason that rules `disk` out, in a fixed order. Mounts below a managed root
/// are kvstrap's own and do not count.
pub fn in_use(disk: &Disk, seen: &Observed, managed_roots: &[PathBuf]) -> Vec<InUse> {
    let mut reasons = Vec::new();
    let mounts = all_mounts(disk, seen);
    reasons.extend(system_disk(&mounts, seen));
    // A multipath map is a device-mapper device, but it is the SAN LUN's one disk.
    if disk.multipath.is_none() {
        reasons.extend(
            virtual_kind(&disk.name, seen.scsi_type).map(|detail| InUse::Virtual { detail }),
        );
    }
    if disk.name.starts_with("zram") {
        reasons.push(InUse::Zram);
    }
    if disk.read_only {
        reasons.push(InUse::ReadOnly);
    }
    if disk.removable {
        reasons.push(InUse::Removable);
    }
    for (_, mountpoint) in &mounts {
        if !managed_roots
            .iter()
            .any(|root| mountpoint.starts_with(root))
        {
            reasons.push(InUse::Mounted {
                mountpoint: mountpoint.clone(),
            });
        }
    }
    reasons.extend(
        swaps(disk, seen)
            .into_iter()
            .map(|device| InUse::Swap { device }),
    );
    reasons.extend(
        holders(disk)
            .into_iter()
            .map(|holder| InUse::Holder { holder }),
    );
    // EBUSY is only news when no mount, swap or holder explains it already.
    if mounts.is_empty()
        && !reasons
            .iter()
            .any(|r| matches!(r, InUse::Swap { .. } | InUse::Holder { .. }))
    {
        reasons.extend(seen.busy.clone().map(|detail| InUse::Busy { detail }));
    }
    reasons.extend(
        seen.unreadable
            .clone()
            .map(|detail| InUse::Unreadable { detail }),
    );
    dedup(reasons)
}

/// (device, mount point) of the disk, its partitions and what is stacked on them.
fn all_mounts(disk: &Disk, seen: &Observed) -> Vec<(String, PathBuf)> {
    let own = disk
        .mountpoints
        .iter()
        .map(|m| (disk.path.display().to_string(), m.clone()));
    let parts = disk.partitions.iter().flat_map(|p| {
        p.mountpoints
            .iter()
            .map(|m| (p.path.display().to_string(), m.clone()))
    });
    let stacked = seen
        .stacked_mounts
        .iter()
        .map(|(d, m)| (format!("/dev/{d}"), m.clone()));
    own.chain(parts).chain(stacked).collect()
}

fn system_disk(mounts: &[(String, PathBuf)], seen: &Observed) -> Vec<InUse> {
    let mut found: Vec<InUse> = mounts
        .iter()
        .filter(|(_, m)| SYSTEM_MOUNTS.iter().any(|s| Path::new(s) == m))
        .map(|(device, m)| InUse::SystemDisk {
            detail: format!("{} is mounted from {device}", m.display()),
        })
        .collect();
    if let Some(spec) = &seen.boot_device {
        found.push(InUse::SystemDisk {
            detail: format!("the kernel command line boots from root={spec}"),
        });
    }
    found
}

/// Kinds of block device that are never a physical disk kvstrap could use.
pub fn virtual_kind(name: &str, scsi_type: Option<u32>) -> Option<String> {
    let kind = if name.starts_with("dm-") {
        "device-mapper device"
    } else if name.starts_with("md") {
        "md RAID array"
    } else if name.starts_with("ram") {
        "RAM disk"
    } else if name.starts_with("nbd") {
        "network block device"
    } else if name.starts_with("zd") {
        "ZFS volume"
    } else if name.starts_with("sr") || scsi_type == Some(5) {
        "optical drive"
    } else {
        return None;
    };
    Some(kind.to_string())
}

fn swaps(disk: &Disk, seen: &Observed) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if disk.swap {
        found.push(disk.path.clone());
    }
    found.extend(
        disk.partitions
            .iter()
            .filter(|p| p.swap)
            .map(|p| p.path.clone()),
    );
    found.extend(seen.stacked_swaps.iter().cloned());
    found
}

fn holders(disk: &Disk) -> Vec<String> {
    disk.holders
        .iter()
        .chain(disk.partitions.iter().flat_map(|p| p.holders.iter()))
        .cloned()
        .collect()
}

fn dedup(reasons: Vec<InUse>) -> Vec<InUse> {
    let mut out: Vec<InUse> = Vec::with_capacity(reasons.len());
    for r in reasons {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// The `root=` device of the kernel command line, e.g. `UUID=…` or `/dev/sda2`.
pub fn root_spec(cmdline: &str) -> Option<String> {
    // Arguments after `--` belong to init, not to the kernel.
    let kernel_args = cmdline.split_whitespace().take_while(|arg| *arg != "--");
    kernel_args
        .filter_map(|arg| arg.strip_prefix("root="))
        .last()
        .map(str::to_string)
}

/// True when the `root=` spec names the disk, one of its partitions, or what is on them.
pub fn boots_from(disk: &Disk, spec: &str) -> bool {
    let (key, value) = spec.split_once('=').unwrap_or(("", spec));
    let value_lc = value.to_ascii_lowercase();
    let sigs = disk
        .signatures
        .iter()
        .chain(disk.partitions.iter().flat_map(|p| p.signatures.iter()));
    match key {
        "UUID" => sigs
            .clone()
            .any(|s| s.uuid.as_deref().map(str::to_ascii_lowercase) == Some(value_lc.clone())),
        "LABEL" => sigs.clone().any(|s| s.label.as_deref() == Some(value)),
        "PARTUUID" => disk
            .partitions
            .iter()
            .any(|p| p.part_uuid.as_deref() == Some(value_lc.as_str())),
        "PARTLABEL" => disk
            .partitions
            .iter()
            .any(|p| p.name.as_deref() == Some(value)),
        "" => {
            let path = Path::new(value);
            disk.path == path || disk.partitions.iter().any(|p| p.path == path)
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{Partition, Signature};

    fn disk(name: &str) -> Disk {
        Disk {
            name: name.into(),
            path: format!("/dev/{name}").into(),
            ..Default::default()
        }
    }

    #[test]
    fn root_mount_makes_system_disk() {
        let mut d = disk("vda");
        d.mountpoints = vec!["/".into()];
        let seen = Observed {
            unreadable: Some("open /dev/vda: EPERM".into()),
            ..Default::default()
        };
        assert_eq!(
            in_use(&d, &seen, &[]),
            vec![
                InUse::SystemDisk {
                    detail: "/ is mounted from /dev/vda".into()
                },
                InUse::Mounted {
                    mountpoint: "/".into()
                },
                InUse::Unreadable {
                    detail: "open /dev/vda: EPERM".into()
                },
            ]
        );
    }

    #[test]
    fn root_on_lvm_over_partition_is_system_disk_and_held() {
        let mut d = disk("sda");
        d.partitions = vec![Partition {
            path: "/dev/sda2".into(),
            number: 2,
            holders: vec!["dm-0".into()],
            ..Default::default()
        }];
        let seen = Observed {
            stacked_mounts: vec![("dm-0".into(), "/".into())],
            busy: Some("EBUSY".into()),
            ..Default::default()
        };
        let reasons = in_use(&d, &seen, &[]);
        assert_eq!(
            reasons[0],
            InUse::SystemDisk {
                detail: "/ is mounted from /dev/dm-0".into()
            }
        );
        assert!(reasons.contains(&InUse::Holder {
            holder: "dm-0".into()
        }));
        assert!(
            !reasons.iter().any(|r| matches!(r, InUse::Busy { .. })),
            "busy is explained by the holder"
        );
    }

    #[test]
    fn kvstrap_mounts_are_not_in_use_and_explain_busy() {
        let mut d = disk("loop3");
        d.partitions = vec![Partition {
            path: "/dev/loop3p1".into(),
            number: 1,
            mountpoints: vec!["/srv/kv/a".into()],
            ..Default::default()
        }];
        let seen = Observed {
            busy: Some("EBUSY".into()),
            ..Default::default()
        };
        assert_eq!(in_use(&d, &seen, &["/srv/kv".into()]), vec![]);
        assert_eq!(
            in_use(&d, &seen, &[]),
            vec![InUse::Mounted {
                mountpoint: "/srv/kv/a".into()
            }]
        );
    }

    #[test]
    fn unexplained_busy_is_reported() {
        let seen = Observed {
            busy: Some("exclusive open failed".into()),
            ..Default::default()
        };
        assert_eq!(
            in_use(&disk("sdb"), &seen, &[]),
            vec![InUse::Busy {
                detail: "exclusive open failed".into()
            }]
        );
    }

    #[test]
    fn device_kinds() {
        let mut z = disk("zram0");
        z.swap = true;
        assert_eq!(
            in_use(&z, &Observed::default(), &[]),
            vec![
                InUse::Zram,
                InUse::Swap {
                    device: "/dev/zram0".into()
                }
            ]
        );
        let mut ro = disk("sr0");
        ro.read_only = true;
        ro.removable = true;
        assert_eq!(
            in_use(&ro, &Observed::default(), &[]),
            vec![
                InUse::Virtual {
                    detail: "optical drive".into()
                },
                InUse::ReadOnly,
                InUse::Removable
            ]
        );
        assert_eq!(
            virtual_kind("dm-3", None).as_deref(),
            Some("device-mapper device")
        );
        assert_eq!(
            virtual_kind("md127", None).as_deref(),
            Some("md RAID array")
        );
        assert_eq!(
            virtual_kind("sdb", Some(5)).as_deref(),
            Some("optical drive")
        );
        assert_eq!(virtual_kind("nvme0n1", None), None);
        assert!(in_use(&disk("nvme0n1"), &Observed::default(), &[]).is_empty());
    }

    #[test]
    fn boot_device_from_cmdline() {
        let cmdline = "BOOT_IMAGE=/vmlinuz root=UUID=AbC-1 ro quiet";
        assert_eq!(root_spec(cmdline).as_deref(), Some("UUID=AbC-1"));
        assert_eq!(root_spec("quiet"), None);
        assert_eq!(root_spec("quiet -- root=/dev/init-arg"), None);
        let mut d = disk("sda");
        d.partitions = vec![Partition {
            path: "/dev/sda2".into(),
            part_uuid: Some("0f0e-aa".into()),
            signatures: vec![Signature {
                kind: "ext4".into(),
                uuid: Some("abc-1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }];
        assert!(boots_from(&d, "UUID=AbC-1"));
        assert!(boots_from(&d, "PARTUUID=0F0E-AA"));
        assert!(boots_from(&d, "/dev/sda2"));
        assert!(!boots_from(&d, "/dev/sdb2"));
        assert!(!boots_from(&d, "LABEL=root"));
    }
}
