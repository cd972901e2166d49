//! Disks out of service: what a drained disk gives back (mounts, links).
//!
//! A drained disk is left intact: its partitions and filesystems stay, only kvstrap's own
//! mounts below `storage_root` and its Block links go, so nothing reaches it by accident
//! and a later `kvstrap undrain` adopts it as it was.

use crate::model::{by_partuuid_path, Disk, Inventory, PathFacts, Step};
use std::path::{Path, PathBuf};

/// Steps that release a drained disk: unmount kvstrap's filesystems on it (deepest
/// first, so a separate volume goes before the filesystem it sits on) and remove the
/// Block links that point at its partitions. Empty once released.
pub fn release_steps(
    disk: &Disk,
    inventory: &Inventory,
    storage_root: &Path,
    block_dir: &Path,
) -> Vec<Step> {
    let mut mounts: Vec<&PathBuf> = disk
        .mountpoints
        .iter()
        .chain(disk.partitions.iter().flat_map(|p| &p.mountpoints))
        .chain(
            disk.partitions
                .iter()
                .flat_map(|p| p.crypt.iter().flat_map(|c| &c.mountpoints)),
        )
        .filter(|m| m.starts_with(storage_root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    let mut steps: Vec<Step> = mounts
        .into_iter()
        .map(|mountpoint| Step::Unmount {
            disk: disk.path.clone(),
            mountpoint: mountpoint.clone(),
            reason: "the disk is drained: nothing may reach it until `kvstrap undrain`".into(),
        })
        .collect();
    let targets = partition_names(disk);
    for (path, facts) in inventory.paths.range(block_dir.to_path_buf()..) {
        if !path.starts_with(block_dir) {
            break;
        }
        if let PathFacts::Symlink { target, .. } = facts {
            if targets.contains(target) {
                steps.push(Step::RemoveBlockLink {
                    disk: disk.path.clone(),
                    link: path.clone(),
                    reason: "the disk is drained: its Block volume is no longer published".into(),
                });
            }
        }
    }
    // Last, once nothing of kvstrap's is on them: close the LUKS2 mappings kvstrap opened
    // (named kvs-...), so the volume keys leave the kernel while the disk is out of service.
    for p in &disk.partitions {
        if let Some(c) = p.crypt.as_ref().filter(|c| c.name.starts_with("kvs-")) {
            steps.push(Step::CloseLuks {
                disk: disk.path.clone(),
                device: p.path.clone(),
                mapping: c.name.clone(),
                reason:
                    "the disk is drained: its volume key leaves the kernel until `kvstrap undrain`"
                        .into(),
            });
        }
    }
    steps
}

/// The step `kvstrap forget --erase` runs on a drained disk: every LUKS2 header of
/// kvstrap's on it loses its key slots (crypto-erase). Never part of a plan: only the
/// operator's explicit command asks for it.
pub fn erase_steps(disk: &Disk) -> Vec<Step> {
    disk.partitions
        .iter()
        .filter(|p| super::usage::is_kvstrap_partition(p) && p.encrypted)
        .filter_map(|p| {
            let sig = p.signatures.iter().find(|s| s.kind == "crypto_LUKS")?;
            let uuid = uuid::Uuid::parse_str(sig.uuid.as_deref()?).ok()?;
            Some(Step::EraseLuks {
                disk: disk.path.clone(),
                device: p.path.clone(),
                luks_uuid: uuid,
                reason: "`kvstrap forget --erase`: the operator asked for a crypto-erase".into(),
            })
        })
        .collect()
}

/// Every name a link may use for one of the disk's partitions: the kernel name and
/// udev's by-partuuid name.
fn partition_names(disk: &Disk) -> Vec<PathBuf> {
    let mut names = Vec::new();
    for p in &disk.partitions {
        names.push(p.path.clone());
        if let Some(c) = &p.crypt {
            names.push(c.path());
            names.push(Path::new("/dev/disk/by-id").join(format!("dm-uuid-{}", c.dm_uuid)));
        }
        if let Some(uuid) = p
            .part_uuid
            .as_deref()
            .and_then(|u| uuid::Uuid::parse_str(u).ok())
        {
            names.push(by_partuuid_path(&p.path, &uuid));
        }
    }
    names
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Partition;

    fn drained_disk() -> Disk {
        let mut d = crate::plan::tests::disk("sdb", 100 << 30);
        d.partitions = vec![
            Partition {
                path: "/dev/sdb1".into(),
                number: 1,
                part_uuid: Some("8a1e2b7c-0000-4000-8000-000000000001".into()),
                mountpoints: vec!["/var/lib/kvstrap/storage/g-1".into()],
                ..Partition::default()
            },
            Partition {
                path: "/dev/sdb2".into(),
                number: 2,
                mountpoints: vec!["/var/lib/kvstrap/storage/g-1/vol-2".into()],
                ..Partition::default()
            },
            Partition {
                path: "/dev/sdb3".into(),
                number: 3,
                part_uuid: Some("8a1e2b7c-0000-4000-8000-000000000003".into()),
                ..Partition::default()
            },
        ];
        d
    }

    #[test]
    fn a_drained_disk_gives_back_its_mounts_deepest_first_and_its_links() {
        let disk = drained_disk();
        let mut inventory = Inventory::default();
        let block = Path::new("/var/lib/kvstrap/block");
        inventory.paths.insert(
            block.join("vol-3"),
            PathFacts::Symlink {
                target: "/dev/disk/by-partuuid/8a1e2b7c-0000-4000-8000-000000000003".into(),
            },
        );
        inventory.paths.insert(
            block.join("other"),
            PathFacts::Symlink {
                target: "/dev/sdc1".into(),
            },
        );
        let steps = release_steps(
            &disk,
            &inventory,
            Path::new("/var/lib/kvstrap/storage"),
            block,
        );
        let what: Vec<String> = steps
            .iter()
            .map(|s| match s {
                Step::Unmount { mountpoint, .. } => format!("umount {}", mountpoint.display()),
                Step::RemoveBlockLink { link, .. } => format!("rm {}", link.display()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            what,
            [
                "umount /var/lib/kvstrap/storage/g-1/vol-2",
                "umount /var/lib/kvstrap/storage/g-1",
                "rm /var/lib/kvstrap/block/vol-3",
            ]
        );
    }
}
