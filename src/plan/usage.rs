//! Who uses kvstrap's volumes: the one answer eligibility, drain, reclaim and `volumes` read.
//!
//! A mount of a filesystem kvstrap made is one of three things. kvstrap's own mount: the
//! whole filesystem at its place below `storage_root`. A *use* of a volume: a mount that
//! shows the volume's directory or something below it (kubelet's bind mount into a pod, a
//! `subPath`), wherever it is and in whatever mount namespace. Or a *stray*: the
//! filesystem shown somewhere by hand, at no volume; reported, never obeyed. A Block
//! volume is used by a bind mount of its device node, a loop device over it (kubelet's
//! mapping), a holder, or a mount of what is on it. None of these disowns the disk.
//! Pure: it reads what the inventory observed.

use crate::model::{
    Disk, MountFact, Partition, UseKind, VolumeMode, VolumeSpec, VolumeUse, KVSTRAP_PART_TYPE,
};
use std::path::{Path, PathBuf};

/// Whether `m` is a mount kvstrap made itself: a whole filesystem below `storage_root`.
fn below_root(storage_root: &Path) -> impl Fn(&MountFact) -> bool + '_ {
    move |m| m.root == Path::new("/") && m.mountpoint.starts_with(storage_root)
}

/// Where kvstrap mounts the filesystem that holds `v`: its path less its directory in the
/// filesystem (`/s/g/disk-1/v2` less `/v2`); none for Block.
fn filesystem_mountpoint(v: &VolumeSpec) -> Option<&Path> {
    let dir = v.dir_in_fs.as_deref()?.strip_prefix("/").ok()?;
    v.path.ancestors().nth(dir.components().count())
}

/// Whether the partition is one kvstrap made (its GPT type).
pub fn is_kvstrap_partition(p: &Partition) -> bool {
    p.type_id
        .as_deref()
        .and_then(|t| uuid::Uuid::parse_str(t).ok())
        == Some(KVSTRAP_PART_TYPE)
}

/// One use of a partition, with the directory of its filesystem it shows (none for a use
/// of the whole device).
struct PartitionUse {
    dir: Option<PathBuf>,
    usage: VolumeUse,
}

/// Every use of a partition besides kvstrap's own mounts, the node's own mount namespace
/// first; a mount seen in several namespaces (propagated copies) counts once.
fn partition_uses(p: &Partition, own: impl Fn(&MountFact) -> bool) -> Vec<PartitionUse> {
    let mut uses: Vec<PartitionUse> = Vec::new();
    let crypt = p.crypt.as_ref();
    // A LUKS2 mapping over the partition is how the volume is reached, not a use of it:
    // what uses the mapping (its filesystem's mounts, a bind of its node, a loop device
    // or a holder over it) uses the volume.
    let mounts = p
        .mounts
        .iter()
        .chain(crypt.into_iter().flat_map(|c| &c.mounts))
        .filter(|m| !own(m));
    for m in mounts {
        uses.push(PartitionUse {
            dir: Some(m.root.clone()),
            usage: mount_use(UseKind::Mount, m),
        });
    }
    for m in p
        .node_binds
        .iter()
        .chain(crypt.into_iter().flat_map(|c| &c.node_binds))
    {
        uses.push(PartitionUse {
            dir: None,
            usage: mount_use(UseKind::DeviceMapping, m),
        });
    }
    let holders = p
        .holders
        .iter()
        .filter(|h| crypt.is_none_or(|c| c.kernel_name != **h))
        .chain(crypt.into_iter().flat_map(|c| &c.holders));
    let devices = p
        .loop_devices
        .iter()
        .chain(crypt.into_iter().flat_map(|c| &c.loop_devices))
        .map(|l| {
            (
                UseKind::LoopDevice,
                l.device.clone(),
                pod_uid(&l.backing_file),
            )
        })
        .chain(holders.map(|h| (UseKind::Holder, Path::new("/dev").join(h), None)));
    for (kind, path, pod_uid) in devices {
        uses.push(PartitionUse {
            dir: None,
            usage: VolumeUse {
                kind,
                path,
                pod_uid,
                pid: None,
            },
        });
    }
    uses.sort_by(|a, b| (a.usage.pid.is_some(), &a.usage).cmp(&(b.usage.pid.is_some(), &b.usage)));
    let mut seen: Vec<(UseKind, PathBuf, Option<PathBuf>)> = Vec::new();
    uses.retain(|u| {
        let key = (u.usage.kind, u.usage.path.clone(), u.dir.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    uses
}

fn mount_use(kind: UseKind, m: &MountFact) -> VolumeUse {
    VolumeUse {
        kind,
        path: m.mountpoint.clone(),
        pod_uid: pod_uid(&m.mountpoint),
        pid: m.pid,
    }
}

/// The pod a kubelet path belongs to: `.../pods/<uid>/volumes/...`,
/// `.../pods/<uid>/volume-subpaths/...`, `.../volumeDevices/<pv>/<uid>`.
pub fn pod_uid(path: &Path) -> Option<String> {
    let parts: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    let is_uid = |s: &str| uuid::Uuid::parse_str(s).is_ok();
    let under_pods = parts
        .windows(2)
        .find(|w| w[0] == "pods" && is_uid(w[1]))
        .map(|w| w[1]);
    let mapped = parts
        .iter()
        .position(|c| *c == "volumeDevices")
        .and_then(|i| parts.get(i + 2))
        .copied()
        .filter(|s| is_uid(s));
    under_pods.or(mapped).map(str::to_string)
}

/// Whether a use that shows `dir` of the filesystem (or the whole device) reaches `v`.
fn reaches(dir: Option<&Path>, v: &VolumeSpec) -> bool {
    match (dir, v.volume_mode, &v.dir_in_fs) {
        (Some(dir), VolumeMode::Filesystem, Some(vdir)) => dir.starts_with(vdir),
        // A device-level use holds every volume of the partition; a mount of what is on a
        // Block volume (its guest's filesystem) uses it.
        _ => true,
    }
}

/// Everything on the node that uses volume `v` of `disk` now. Empty: nothing does.
/// kvstrap's own mount of the volume's filesystem (in any namespace it propagated to) is
/// no use.
pub fn volume_uses(disk: &Disk, v: &VolumeSpec) -> Vec<VolumeUse> {
    let fs_mountpoint = filesystem_mountpoint(v);
    let own =
        |m: &MountFact| m.root == Path::new("/") && Some(m.mountpoint.as_path()) == fs_mountpoint;
    disk.partitions
        .iter()
        .filter(|p| p.path == v.device)
        .flat_map(|p| partition_uses(p, own))
        .filter(|u| reaches(u.dir.as_deref(), v))
        .map(|u| u.usage)
        .collect()
}

/// Mounts of kvstrap's filesystems on `disk` that show no volume of `volumes` (a
/// filesystem root mounted elsewhere by hand), as warnings: kvstrap neither obeys them
/// nor counts them as a volume's use.
pub fn stray_mounts(disk: &Disk, volumes: &[VolumeSpec], storage_root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in disk.partitions.iter().filter(|p| is_kvstrap_partition(p)) {
        let on_partition: Vec<&VolumeSpec> =
            volumes.iter().filter(|v| v.device == p.path).collect();
        for u in partition_uses(p, below_root(storage_root)) {
            let Some(dir) = u.dir.as_deref() else {
                continue;
            };
            if on_partition.iter().any(|v| reaches(Some(dir), v)) {
                continue;
            }
            out.push(format!(
                "{} is mounted at {} showing {}, which is no volume of kvstrap's: it is \
                 ignored (not a reason to leave the disk, not a volume's use); unmount it",
                p.path.display(),
                u.usage.path.display(),
                dir.display()
            ));
        }
    }
    out
}

/// What on this machine uses a disk besides kvstrap's own mounts, in words: every use of
/// its partitions (pods' mounts, Block mappings, holders), mounts of the whole disk outside
/// `storage_root`, swap.
/// A draining disk becomes drained only when this is empty.
pub fn local_users(disk: &Disk, storage_root: &Path) -> Vec<String> {
    let mut users: Vec<String> = disk
        .mountpoints
        .iter()
        .filter(|m| !m.starts_with(storage_root))
        .map(|m| format!("{} is mounted at {}", disk.path.display(), m.display()))
        .chain(
            disk.holders
                .iter()
                .map(|h| format!("{} is held by {h}", disk.path.display())),
        )
        .collect();
    for p in &disk.partitions {
        users.extend(
            partition_uses(p, below_root(storage_root))
                .into_iter()
                .map(|u| format!("{} is {}", p.path.display(), u.usage)),
        );
    }
    if disk.swap || disk.partitions.iter().any(|p| p.swap) {
        users.push(format!("{} is used as swap", disk.path.display()));
    }
    users
}

/// Mount points of `disk` that are kvstrap's: its filesystems, wherever they are mounted
/// (anything below `storage_root` the caller counts as well). None of them makes the disk
/// "in use".
pub fn ours_mounted(disk: &Disk) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = disk
        .partitions
        .iter()
        .filter(|p| is_kvstrap_partition(p))
        .flat_map(|p| {
            p.mountpoints
                .iter()
                .chain(p.crypt.iter().flat_map(|c| &c.mountpoints))
        })
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{FsType, Partition};

    const ROOT: &str = "/var/lib/kvstrap/storage";
    const POD: &str = "0b6b4c1e-8f0a-4c3e-9d55-3c1f0e8d2a11";

    fn fact(mountpoint: &str, root: &str, pid: Option<u32>) -> MountFact {
        MountFact {
            mountpoint: mountpoint.into(),
            root: root.into(),
            pid,
        }
    }

    fn ours(path: &str, number: u32) -> Partition {
        Partition {
            path: path.into(),
            number,
            type_id: Some(KVSTRAP_PART_TYPE.to_string()),
            ..Partition::default()
        }
    }

    fn volume(name: &str, device: &str, mode: VolumeMode, dir: Option<&str>) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            group: "g".into(),
            storage_class: "c".into(),
            volume_mode: mode,
            path: format!("{ROOT}/g/{name}").into(),
            capacity_bytes: 1 << 30,
            disk: "/dev/sdb".into(),
            disk_identity: "serial:S".into(),
            device: device.into(),
            transport: "sata".into(),
            rotational: false,
            io_class: None,
            project_id: None,
            owner: None,
            fs_type: (mode == VolumeMode::Filesystem).then_some(FsType::Xfs),
            dir_in_fs: dir.map(PathBuf::from),
            mapping: None,
        }
    }

    fn kubelet(pv: &str) -> String {
        format!("/var/lib/kubelet/pods/{POD}/volumes/kubernetes.io~local-volume/{pv}")
    }

    /// A shared filesystem with three volumes; a pod uses the second, by its own mount and
    /// through a subPath, and the same bind mount shows again in a container's namespace.
    fn shared_disk() -> (Disk, Vec<VolumeSpec>) {
        let mut p = ours("/dev/sdb1", 1);
        p.mounts = vec![
            fact(&format!("{ROOT}/g/disk-1"), "/", None),
            fact(&kubelet("pv-2"), "/v2", None),
            fact(
                &format!("/var/lib/kubelet/pods/{POD}/volume-subpaths/disk/c/0"),
                "/v2/sub",
                None,
            ),
            fact("/data", "/v2", Some(4242)),
            fact(&kubelet("pv-2"), "/v2", Some(77)),
        ];
        p.mountpoints = p
            .mounts
            .iter()
            .filter(|m| m.pid.is_none())
            .map(|m| m.mountpoint.clone())
            .collect();
        let disk = Disk {
            path: "/dev/sdb".into(),
            name: "sdb".into(),
            partitions: vec![p],
            ..Disk::default()
        };
        let volumes = (1..=3)
            .map(|i| {
                let mut v = volume(
                    &format!("v{i}"),
                    "/dev/sdb1",
                    VolumeMode::Filesystem,
                    Some(&format!("/v{i}")),
                );
                v.path = format!("{ROOT}/g/disk-1/v{i}").into();
                v
            })
            .collect();
        (disk, volumes)
    }

    #[test]
    fn a_pods_bind_mounts_are_uses_of_its_volume_only() {
        let (disk, volumes) = shared_disk();
        let root = Path::new(ROOT);
        assert!(volume_uses(&disk, &volumes[0]).is_empty());
        assert!(volume_uses(&disk, &volumes[2]).is_empty());
        let uses = volume_uses(&disk, &volumes[1]);
        let shown: Vec<String> = uses.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                format!(
                    "mounted at /var/lib/kubelet/pods/{POD}/volume-subpaths/disk/c/0 (pod {POD})"
                ),
                format!("mounted at {} (pod {POD})", kubelet("pv-2")),
                "mounted at /data (mount namespace of pid 4242)".to_string(),
            ],
            "the copy propagated into another namespace counts once"
        );
        assert!(stray_mounts(&disk, &volumes, root).is_empty());
        assert_eq!(local_users(&disk, root).len(), 3);
    }

    #[test]
    fn our_filesystem_mounted_at_no_volume_is_a_stray_not_a_use() {
        let (mut disk, volumes) = shared_disk();
        let root = Path::new(ROOT);
        disk.partitions[0].mounts = vec![
            fact(&format!("{ROOT}/g/disk-1"), "/", None),
            fact("/mnt/look", "/", None),
            fact("/mnt/lost", "/lost+found", None),
        ];
        assert!(volumes.iter().all(|v| volume_uses(&disk, v).is_empty()));
        let strays = stray_mounts(&disk, &volumes, root);
        assert_eq!(strays.len(), 2, "{strays:?}");
        assert!(strays[0].contains("/mnt/look showing /,"), "{strays:?}");
        // Drain still waits for it: the disk is not unmounted under someone's feet.
        assert_eq!(local_users(&disk, root).len(), 2);
    }

    #[test]
    fn a_separate_volume_is_used_by_any_mount_of_its_filesystem_but_ours() {
        let mut p = ours("/dev/sdb2", 2);
        let v = volume("v2", "/dev/sdb2", VolumeMode::Filesystem, Some("/"));
        p.mounts = vec![fact(&format!("{ROOT}/g/v2"), "/", None)];
        let mut disk = Disk {
            partitions: vec![p],
            ..Disk::default()
        };
        let root = Path::new(ROOT);
        assert!(volume_uses(&disk, &v).is_empty());
        disk.partitions[0]
            .mounts
            .push(fact(&kubelet("pv-v2"), "/", None));
        let uses = volume_uses(&disk, &v);
        assert_eq!(uses.len(), 1);
        assert_eq!(uses[0].pod_uid.as_deref(), Some(POD));
        assert!(stray_mounts(&disk, std::slice::from_ref(&v), root).is_empty());
    }

    #[test]
    fn a_block_volume_is_used_by_its_mapping_its_loop_device_and_holders() {
        let mut p = ours("/dev/sdb3", 3);
        let v = volume("v3", "/dev/sdb3", VolumeMode::Block, None);
        let mut disk = Disk {
            partitions: vec![p.clone()],
            ..Disk::default()
        };
        assert!(volume_uses(&disk, &v).is_empty());
        let mapped = format!(
            "/var/lib/kubelet/plugins/kubernetes.io~local-volume/volumeDevices/pv-v3/{POD}"
        );
        p.node_binds = vec![fact(&mapped, "/sdb3", None)];
        p.loop_devices = vec![crate::model::LoopOver {
            device: "/dev/loop9".into(),
            backing_file: mapped.clone().into(),
        }];
        p.holders = vec!["dm-4".into()];
        disk.partitions = vec![p];
        let uses = volume_uses(&disk, &v);
        let kinds: Vec<UseKind> = uses.iter().map(|u| u.kind).collect();
        assert_eq!(
            kinds,
            [UseKind::DeviceMapping, UseKind::LoopDevice, UseKind::Holder]
        );
        assert!(
            uses[..2].iter().all(|u| u.pod_uid.as_deref() == Some(POD)),
            "{uses:?}"
        );
    }

    #[test]
    fn kubelet_paths_name_their_pod() {
        assert_eq!(pod_uid(Path::new(&kubelet("x"))).as_deref(), Some(POD));
        assert_eq!(pod_uid(Path::new("/mnt/pods/not-a-uid/volumes")), None);
        assert_eq!(pod_uid(Path::new("/srv/data")), None);
    }

    #[test]
    fn mounts_of_our_partitions_are_ours_wherever_they_are() {
        let (mut disk, _) = shared_disk();
        let mut foreign = Partition {
            path: "/dev/sdb9".into(),
            number: 9,
            mountpoints: vec!["/srv".into()],
            ..Partition::default()
        };
        foreign.type_id = Some("0fc63daf-8483-4772-8e79-3d69d8477de4".into());
        disk.partitions.push(foreign);
        let ours = ours_mounted(&disk);
        assert!(ours.contains(&PathBuf::from(kubelet("pv-2"))), "{ours:?}");
        assert!(!ours.contains(&PathBuf::from("/srv")), "{ours:?}");
    }
}
