//! Planner tests on constructed inventories: no root, no devices.

use super::*;
use crate::model::{
    FsType, Layout, Owner, Partition, PartitionTable, PathFacts, Signature, Step, VolumeMode,
    KVSTRAP_PART_TYPE,
};
use crate::policy::{
    AccessMode, DiskMatch, KubernetesSettings, NodeSettings, ReclaimPolicy, StorageClass,
    VolumeSizing,
};

const GIB: u64 = 1 << 30;

pub fn disk(name: &str, size: u64) -> Disk {
    Disk {
        path: format!("/dev/{name}").into(),
        name: name.into(),
        size_bytes: size,
        logical_sector_size: 512,
        physical_sector_size: 4096,
        transport: "sata".into(),
        serial: Some(format!("SER-{name}")),
        ..Disk::default()
    }
}

pub fn group(name: &str) -> DiskGroup {
    DiskGroup {
        name: name.into(),
        storage_class: "fast".into(),
        layout: Layout::Shared,
        devices: Vec::new(),
        matcher: DiskMatch::default(),
        max_disks: None,
        sizing: VolumeSizing::OnePerDisk,
        reserve_percent: 0,
        owner: Owner {
            uid: 107,
            gid: 107,
            mode: 0o750,
        },
        on_failure: Default::default(),
        wipe: Wipe::Never,
        allow_loop: false,
        allow_removable: false,
        quota: crate::policy::QuotaMode::Required,
        provisioning: Default::default(),
        overcommit_permille: 1000,
        encryption: None,
    }
}

fn class(name: &str, mode: VolumeMode, fs: FsType) -> StorageClass {
    StorageClass {
        name: name.into(),
        volume_mode: mode,
        fs_type: fs,
        reclaim_policy: ReclaimPolicy::Delete,
        access_modes: vec![AccessMode::ReadWriteOnce],
        mount_options: vec!["noatime".into()],
        binding_mode: "WaitForFirstConsumer".into(),
    }
}

pub(crate) fn policy(groups: Vec<DiskGroup>) -> Policy {
    Policy {
        node: NodeSettings {
            name: "worker-07".into(),
            storage_root: "/var/lib/kvstrap/storage".into(),
        },
        kubernetes: KubernetesSettings::local_only(),
        health: Default::default(),
        metrics: Default::default(),
        io_class: Default::default(),
        storage_classes: vec![
            class("fast", VolumeMode::Filesystem, FsType::Xfs),
            class("ext", VolumeMode::Filesystem, FsType::Ext4),
            class("raw", VolumeMode::Block, FsType::Xfs),
        ],
        disk_groups: groups,
        sources: Vec::new(),
        cluster_layer_dropped: None,
    }
}

fn ctx() -> PlanContext {
    PlanContext {
        state_dir: "/var/lib/kvstrap".into(),
        ..PlanContext::default()
    }
}

pub(crate) fn inventory(disks: Vec<Disk>) -> Inventory {
    Inventory {
        disks,
        ..Inventory::default()
    }
}

fn count(plan: &Plan, action: &str) -> usize {
    plan.steps.iter().filter(|s| s.action() == action).count()
}

#[test]
fn shared_layout_with_volume_size_and_reserve() {
    let mut g = group("nvme");
    g.sizing = VolumeSizing::Size(100 * GIB);
    g.reserve_percent = 10;
    let p = plan(
        &policy(vec![g]),
        &inventory(vec![disk("sdb", 1000 * GIB)]),
        &ctx(),
    );
    let gp = &p.groups[0];
    assert_eq!(gp.disks.len(), 1);
    assert_eq!(gp.disks[0].partitions.len(), 1);
    // 1000 GiB - 10% reserve - xfs overhead leaves room for 8 volumes of 100 GiB.
    assert_eq!(gp.volumes.len(), 8);
    assert!(gp
        .volumes
        .iter()
        .all(|v| v.capacity_bytes == 100 * GIB && v.project_id.is_some()));
    let part = &gp.disks[0].partitions[0];
    assert_eq!(part.start_bytes, 1 << 20);
    assert_eq!(part.start_bytes % (1 << 20), 0);
    assert!(part.filesystem.as_ref().is_some_and(|f| f.project_quota));
    assert_eq!(count(&p, "write_partition_table"), 1);
    assert_eq!(count(&p, "make_filesystem"), 1);
    assert_eq!(count(&p, "mount"), 1);
    assert_eq!(count(&p, "create_directory"), 8);
    assert_eq!(count(&p, "set_quota"), 8);
    assert!(p.totals.reserve_bytes >= 99 * GIB);
    assert!(p.totals.headroom_ratio >= 1.25);
    let first = &gp.volumes[0];
    assert_eq!(
        first.path,
        part.filesystem
            .as_ref()
            .map(|f| f.mountpoint.join(&first.name))
            .unwrap_or_default()
    );
}

#[test]
fn shared_layout_volume_count_divides_what_is_left() {
    let mut g = group("nvme");
    g.sizing = VolumeSizing::Count(4);
    let p = plan(
        &policy(vec![g]),
        &inventory(vec![disk("sdb", 100 * GIB)]),
        &ctx(),
    );
    let vols = &p.groups[0].volumes;
    assert_eq!(vols.len(), 4);
    let total: u64 = vols.iter().map(|v| v.capacity_bytes).sum();
    assert!(total < 100 * GIB - capacity::fs_overhead(FsType::Xfs, 100 * GIB) + 4 * (1 << 20));
    assert!(vols
        .windows(2)
        .all(|w| w[0].capacity_bytes == w[1].capacity_bytes));
}

#[test]
fn separate_filesystem_volumes_get_partitions_of_their_own() {
    let mut g = group("sep");
    g.layout = Layout::Separate;
    g.storage_class = "ext".into();
    g.sizing = VolumeSizing::Size(10 * GIB);
    let p = plan(
        &policy(vec![g]),
        &inventory(vec![disk("sdc", 50 * GIB)]),
        &ctx(),
    );
    let gp = &p.groups[0];
    let parts = &gp.disks[0].partitions;
    assert_eq!(parts.len(), gp.volumes.len());
    assert!(parts.len() >= 4);
    for pair in parts.windows(2) {
        assert_eq!(
            pair[0].start_bytes + pair[0].size_bytes,
            pair[1].start_bytes,
            "contiguous, aligned"
        );
    }
    assert!(parts
        .iter()
        .all(|p| p.start_bytes % (1 << 20) == 0 && p.size_bytes % (1 << 20) == 0));
    let last = parts
        .last()
        .map(|p| p.start_bytes + p.size_bytes)
        .unwrap_or_default();
    assert!(last <= 50 * GIB - (1 << 20));
    for (v, part) in gp.volumes.iter().zip(parts) {
        assert_eq!(v.capacity_bytes, 10 * GIB);
        let fs = part
            .filesystem
            .as_ref()
            .map(|f| (f.fs_type, f.mountpoint.clone()));
        assert_eq!(fs, Some((FsType::Ext4, v.path.clone())));
        assert!(capacity::fs_capacity(FsType::Ext4, part.size_bytes) >= v.capacity_bytes);
    }
    assert_eq!(count(&p, "make_filesystem"), parts.len());
    assert_eq!(
        count(&p, "set_quota"),
        0,
        "a filesystem of its own bounds the volume"
    );
}

#[test]
fn separate_block_volumes_are_raw_partitions_with_links() {
    let mut g = group("raw");
    g.layout = Layout::Separate;
    g.storage_class = "raw".into();
    g.sizing = VolumeSizing::Count(3);
    let p = plan(
        &policy(vec![g]),
        &inventory(vec![disk("nvme0n1", 30 * GIB)]),
        &ctx(),
    );
    let gp = &p.groups[0];
    assert_eq!(gp.volumes.len(), 3);
    assert!(gp.disks[0]
        .partitions
        .iter()
        .all(|p| p.filesystem.is_none()));
    assert_eq!(count(&p, "make_filesystem"), 0);
    assert_eq!(count(&p, "link_block_device"), 3);
    let v = &gp.volumes[0];
    assert_eq!(v.device, PathBuf::from("/dev/nvme0n1p1"));
    assert!(v.path.starts_with("/var/lib/kvstrap/block"));
    assert_eq!(v.capacity_bytes, gp.disks[0].partitions[0].size_bytes);
    assert!(v.owner.is_none());
}

#[test]
fn max_disks_takes_disks_in_stable_order() {
    let mut g = group("g");
    g.max_disks = Some(2);
    let disks = vec![
        disk("sdd", 10 * GIB),
        disk("sdb", 10 * GIB),
        disk("sdc", 10 * GIB),
    ];
    let p = plan(&policy(vec![g.clone()]), &inventory(disks.clone()), &ctx());
    let chosen: Vec<_> = p.groups[0].disks.iter().map(|d| d.disk.clone()).collect();
    assert_eq!(
        chosen,
        vec![PathBuf::from("/dev/sdb"), PathBuf::from("/dev/sdc")]
    );
    assert_eq!(p.refused.len(), 1);
    assert!(p.refused[0].reason.contains("max_disks"));
    // Enumeration order does not matter.
    let mut reversed = disks;
    reversed.reverse();
    assert_eq!(plan(&policy(vec![g]), &inventory(reversed), &ctx()), p);
}

#[test]
fn refusals_of_every_kind_are_reported_with_reasons() {
    let mut ext4 = disk("sdb", 10 * GIB);
    ext4.signatures = vec![Signature {
        kind: "ext4".into(),
        ..Default::default()
    }];
    let mut mounted = disk("sdc", 10 * GIB);
    mounted.in_use = vec![InUse::Mounted {
        mountpoint: "/srv".into(),
    }];
    let mut system = disk("vda", 10 * GIB);
    system.in_use = vec![InUse::SystemDisk {
        detail: "holds /".into(),
    }];
    let mut lvm = disk("sdd", 10 * GIB);
    lvm.signatures = vec![Signature {
        kind: "LVM2_member".into(),
        ..Default::default()
    }];
    let mut lp = disk("loop0", 10 * GIB);
    lp.transport = "loop".into();
    let mut holder = disk("sde", 10 * GIB);
    holder.in_use = vec![InUse::Holder {
        holder: "dm-0".into(),
    }];
    let mut tiny = disk("sdf", 100 << 20);
    tiny.serial = Some("tiny".into());
    let p = plan(
        &policy(vec![group("g")]),
        &inventory(vec![ext4, mounted, system, lvm, lp, holder, tiny]),
        &ctx(),
    );
    assert!(p.steps.is_empty());
    let reasons: Vec<String> = p
        .refused
        .iter()
        .map(|r| format!("{} {}", r.disk.display(), r.reason))
        .collect();
    let expect = [
        ("/dev/sdb", "not empty: ext4"),
        ("/dev/sdc", "mounted at /srv"),
        ("/dev/vda", "system disk"),
        ("/dev/sdd", "LVM2_member"),
        ("/dev/loop0", "allow_loop"),
        ("/dev/sde", "held by dm-0"),
        ("/dev/sdf", "too small"),
    ];
    for (dev, why) in expect {
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with(dev) && r.contains(why)),
            "{dev}: {why} not in {reasons:?}"
        );
    }
}

#[test]
fn a_disk_two_groups_select_goes_to_neither() {
    let p = plan(
        &policy(vec![group("a"), group("b")]),
        &inventory(vec![disk("sdb", 10 * GIB)]),
        &ctx(),
    );
    assert!(p.steps.is_empty());
    assert!(p.refused[0].reason.contains("several groups (a, b)"));
}

/// What the inventory would see after the plan was applied.
fn converged(p: &Plan, mut disks: Vec<Disk>) -> Inventory {
    let mut paths = std::collections::BTreeMap::new();
    for gp in &p.groups {
        for layout in &gp.disks {
            let Some(d) = disks.iter_mut().find(|d| d.path == layout.disk) else {
                continue;
            };
            d.partition_table = Some(PartitionTable {
                kind: "gpt".into(),
                uuid: Some(layout.disk_guid.to_string()),
            });
            d.partitions = layout
                .partitions
                .iter()
                .map(|part| {
                    let fs_sigs: Vec<Signature> = part
                        .filesystem
                        .iter()
                        .map(|f| Signature {
                            kind: f.fs_type.as_str().into(),
                            usage: Some("filesystem".into()),
                            label: Some(f.label.clone()),
                            uuid: Some(f.uuid.to_string()),
                            unfinished: false,
                        })
                        .collect();
                    let mounted: Vec<PathBuf> = part
                        .filesystem
                        .iter()
                        .map(|f| f.mountpoint.clone())
                        .collect();
                    let mut p = Partition {
                        path: part.device.clone(),
                        number: part.number,
                        start_bytes: part.start_bytes,
                        size_bytes: part.size_bytes,
                        type_id: Some(KVSTRAP_PART_TYPE.to_string()),
                        part_uuid: Some(part.part_uuid.to_string()),
                        name: Some(part.name.clone()),
                        signatures: fs_sigs.clone(),
                        mountpoints: mounted.clone(),
                        in_kernel: true,
                        role: part.role,
                        ..Default::default()
                    };
                    if let Some(luks) = &part.encryption {
                        p.signatures = vec![luks_header(luks, &luks.label)];
                        p.mountpoints = Vec::new();
                        p.encrypted = true;
                        let dm = format!("dm-{}", part.number);
                        p.holders = vec![dm.clone()];
                        p.crypt = Some(crate::model::CryptMapping {
                            name: luks.label.clone(),
                            kernel_name: dm,
                            devno: format!("253:{}", part.number),
                            dm_uuid: crate::model::dm_crypt_uuid(&luks.uuid, &luks.label),
                            signatures: fs_sigs,
                            mountpoints: mounted,
                            by_dm_uuid: true,
                            ..Default::default()
                        });
                    }
                    p
                })
                .collect();
            d.in_use = d
                .partitions
                .iter()
                .flat_map(|p| {
                    p.mountpoints
                        .iter()
                        .chain(p.crypt.iter().flat_map(|c| &c.mountpoints))
                })
                .map(|m| InUse::Mounted {
                    mountpoint: m.clone(),
                })
                .chain(d.partitions.iter().flat_map(|p| {
                    p.holders
                        .iter()
                        .map(|h| InUse::Holder { holder: h.clone() })
                }))
                .collect();
            d.in_use.push(InUse::Busy {
                detail: "exclusive open failed".into(),
            });
        }
        for v in &gp.volumes {
            let facts = match (&v.owner, v.volume_mode) {
                (Some(o), VolumeMode::Filesystem) => PathFacts::Directory {
                    uid: o.uid,
                    gid: o.gid,
                    mode: o.mode,
                    project_id: v.project_id,
                    quota_bytes: v.project_id.map(|_| v.capacity_bytes),
                    devno: "8:17".into(),
                },
                _ => PathFacts::Symlink {
                    target: match &v.mapping {
                        None => v.device.clone(),
                        Some(_) => luks_of(layout_of(p, v), v).by_dm_uuid_path(),
                    },
                },
            };
            paths.insert(v.path.clone(), facts);
        }
    }
    Inventory {
        disks,
        paths,
        ..Inventory::default()
    }
}

/// kvstrap's LUKS2 header of `luks`, labelled `label`, as libblkid reports it.
fn luks_header(luks: &crate::model::LuksSpec, label: &str) -> Signature {
    Signature {
        kind: "crypto_LUKS".into(),
        usage: Some("crypto".into()),
        label: Some(label.into()),
        uuid: Some(luks.uuid.to_string()),
        unfinished: false,
    }
}

fn layout_of<'p>(p: &'p Plan, v: &crate::model::VolumeSpec) -> &'p crate::model::DiskLayout {
    p.groups
        .iter()
        .flat_map(|g| &g.disks)
        .find(|d| d.disk == v.disk)
        .expect("the volume's disk")
}

fn luks_of<'l>(
    layout: &'l crate::model::DiskLayout,
    v: &crate::model::VolumeSpec,
) -> &'l crate::model::LuksSpec {
    layout
        .partitions
        .iter()
        .find(|p| p.device == v.device)
        .and_then(|p| p.encryption.as_ref())
        .expect("an encrypted partition")
}

fn mixed_policy() -> (Policy, Vec<Disk>) {
    let mut shared = group("shared");
    shared.devices = vec!["/dev/sdb".into()];
    shared.sizing = VolumeSizing::Size(GIB);
    let mut sep = group("sep");
    sep.devices = vec!["/dev/sdc".into()];
    sep.layout = Layout::Separate;
    sep.storage_class = "ext".into();
    sep.sizing = VolumeSizing::Count(3);
    let mut raw = group("raw");
    raw.devices = vec!["/dev/sdd".into()];
    raw.layout = Layout::Separate;
    raw.storage_class = "raw".into();
    raw.sizing = VolumeSizing::Count(2);
    let disks = vec![
        disk("sdb", 20 * GIB),
        disk("sdc", 20 * GIB),
        disk("sdd", 20 * GIB),
    ];
    (policy(vec![shared, sep, raw]), disks)
}

#[test]
fn converged_node_gives_an_empty_plan() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    assert!(!first.steps.is_empty());
    let again = plan(&pol, &converged(&first, disks), &ctx());
    assert_eq!(again.steps, vec![], "refused: {:?}", again.refused);
    assert!(again.refused.is_empty());
    assert_eq!(
        again.groups, first.groups,
        "adopted disks publish the same volumes"
    );
}

/// What a real kubelet leaves on a node whose pods use every volume: a bind mount of each
/// directory volume (the separate ones show their whole filesystem), a subPath mount, a
/// bind mount of each Block volume's node and a loop device over it.
fn with_pods_on_every_volume(p: &Plan, inv: &mut Inventory) {
    let pod = "2c1d6a36-31a3-4c4e-a0c1-5e0a9e6b7f10";
    for (i, v) in p.volumes().enumerate() {
        let part = inv
            .disks
            .iter_mut()
            .flat_map(|d| d.partitions.iter_mut())
            .find(|part| part.path == v.device)
            .expect("the volume's partition");
        let kubelet = PathBuf::from(format!(
            "/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~local-volume/pv-{i}"
        ));
        match (v.volume_mode, &v.dir_in_fs) {
            (VolumeMode::Filesystem, Some(dir)) => {
                let sub = PathBuf::from(format!(
                    "/var/lib/kubelet/pods/{pod}/volume-subpaths/d{i}/c/0"
                ));
                for (mountpoint, root) in [(kubelet, dir.clone()), (sub, dir.join("data"))] {
                    part.mountpoints.push(mountpoint.clone());
                    part.mounts.push(crate::model::MountFact {
                        mountpoint,
                        root,
                        pid: None,
                    });
                }
            }
            _ => {
                let mapped = format!(
                    "/var/lib/kubelet/plugins/kubernetes.io~local-volume/volumeDevices/pv-{i}/{pod}"
                );
                part.node_binds.push(crate::model::MountFact {
                    mountpoint: mapped.clone().into(),
                    root: PathBuf::from("/").join(part.path.file_name().expect("a name")),
                    pid: None,
                });
                part.loop_devices.push(crate::model::LoopOver {
                    device: format!("/dev/loop{}", 40 + i).into(),
                    backing_file: mapped.into(),
                });
            }
        }
    }
    // What the inventory makes of those mounts: facts that would refuse a foreign disk.
    for d in &mut inv.disks {
        let mounted: Vec<PathBuf> = d
            .partitions
            .iter()
            .flat_map(|p| p.mountpoints.clone())
            .collect();
        d.in_use = mounted
            .into_iter()
            .map(|mountpoint| InUse::Mounted { mountpoint })
            .chain([InUse::Busy {
                detail: "exclusive open failed".into(),
            }])
            .collect();
    }
}

#[test]
fn pods_using_every_volume_never_make_kvstrap_disown_a_disk() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    with_pods_on_every_volume(&first, &mut inv);
    let again = plan(&pol, &inv, &ctx());
    assert_eq!(again.steps, vec![], "refused: {:?}", again.refused);
    assert!(again.refused.is_empty(), "{:?}", again.refused);
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    assert_eq!(again.groups, first.groups, "every volume stays published");
    for v in again.volumes() {
        let disk = inv.disks.iter().find(|d| d.path == v.disk).expect("disk");
        let uses = usage::volume_uses(disk, v);
        assert!(!uses.is_empty(), "{} has no use", v.name);
        assert!(
            uses.iter()
                .all(|u| u.pod_uid.as_deref() == Some("2c1d6a36-31a3-4c4e-a0c1-5e0a9e6b7f10")),
            "{uses:?}"
        );
    }
    // The shared filesystem's root mounted elsewhere by hand: reported, not obeyed.
    let shared = inv.disks.iter_mut().find(|d| d.name == "sdb").expect("sdb");
    shared.partitions[0].mountpoints.push("/mnt/look".into());
    shared.partitions[0].mounts.push(crate::model::MountFact {
        mountpoint: "/mnt/look".into(),
        root: "/".into(),
        pid: None,
    });
    shared.in_use.push(InUse::Mounted {
        mountpoint: "/mnt/look".into(),
    });
    let stray = plan(&pol, &inv, &ctx());
    assert_eq!(stray.steps, vec![]);
    assert!(stray.refused.is_empty(), "{:?}", stray.refused);
    assert_eq!(stray.warnings.len(), 1, "{:?}", stray.warnings);
    assert!(
        stray.warnings[0].contains("/mnt/look"),
        "{:?}",
        stray.warnings
    );
}

#[test]
fn a_foreign_disk_mounted_outside_the_storage_root_is_still_in_use() {
    let (pol, mut disks) = mixed_policy();
    disks[0].partition_table = Some(PartitionTable {
        kind: "gpt".into(),
        uuid: None,
    });
    disks[0].partitions = vec![Partition {
        path: "/dev/sdb1".into(),
        number: 1,
        type_id: Some("0fc63daf-8483-4772-8e79-3d69d8477de4".into()),
        mountpoints: vec!["/var/lib/kubelet/pods/x/volumes/y".into()],
        ..Default::default()
    }];
    disks[0].in_use = vec![InUse::Mounted {
        mountpoint: "/var/lib/kubelet/pods/x/volumes/y".into(),
    }];
    let p = plan(&pol, &inventory(disks), &ctx());
    assert!(
        p.refused
            .iter()
            .any(|r| r.disk == std::path::Path::new("/dev/sdb") && r.reason.contains("mounted at")),
        "{:?}",
        p.refused
    );
}

/// The mixed policy provisioned, then `change` applied to the policy: the plan for it.
fn changed_after_provisioning(
    change: impl FnOnce(&mut Policy),
    tweak: impl FnOnce(&mut Inventory),
) -> (Plan, Plan) {
    let (mut pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    tweak(&mut inv);
    change(&mut pol);
    (first, plan(&pol, &inv, &ctx()))
}

fn refusal_of<'p>(p: &'p Plan, disk: &str) -> Vec<&'p str> {
    p.refused
        .iter()
        .filter(|r| r.disk == std::path::Path::new(disk))
        .map(|r| r.reason.as_str())
        .collect()
}

#[test]
fn a_block_volume_never_becomes_a_filesystem_by_policy() {
    // Same partition sizes either way (volume_count = 2), so only the recorded role can
    // tell that these raw partitions, perhaps full of a guest's data, are not blank.
    let (first, again) =
        changed_after_provisioning(|p| p.disk_groups[2].storage_class = "ext".into(), |_| {});
    assert_eq!(count(&again, "make_filesystem"), 0, "{:#?}", again.steps);
    let why = refusal_of(&again, "/dev/sdd");
    assert_eq!(why.len(), 1, "{:?}", again.refused);
    assert!(
        why[0].contains("was provisioned as a raw Block volume"),
        "{why:?}"
    );
    assert!(why[0].contains("never changes the kind"), "{why:?}");
    assert!(why[0].contains("kvstrap drain"), "{why:?}");
    // Other disks go on; the refused disk's volumes are not published.
    assert!(again
        .volumes()
        .all(|v| v.disk != std::path::Path::new("/dev/sdd")));
    assert_eq!(
        again.volumes().count(),
        first.volumes().count() - 2,
        "the other groups keep their volumes"
    );
}

#[test]
fn a_filesystem_volume_never_becomes_block_or_another_filesystem() {
    let (_, to_block) =
        changed_after_provisioning(|p| p.disk_groups[1].storage_class = "raw".into(), |_| {});
    let why = refusal_of(&to_block, "/dev/sdc");
    assert!(
        why.iter()
            .any(|w| w.contains("was provisioned as a filesystem volume")),
        "{why:?}"
    );
    let (_, to_xfs) =
        changed_after_provisioning(|p| p.disk_groups[1].storage_class = "fast".into(), |_| {});
    assert_eq!(count(&to_xfs, "make_filesystem"), 0);
    let why = refusal_of(&to_xfs, "/dev/sdc");
    assert!(
        why.iter()
            .any(|w| w.contains("was provisioned as an ext4 filesystem")),
        "{why:?}"
    );
    // Without a recorded role (an older kvstrap), the filesystem kvstrap made tells.
    let (_, legacy) = changed_after_provisioning(
        |p| p.disk_groups[1].storage_class = "raw".into(),
        |inv| {
            for p in &mut inv.disks[1].partitions {
                p.role = crate::model::PartitionRole::Unrecorded;
            }
        },
    );
    let why = refusal_of(&legacy, "/dev/sdc");
    assert!(
        why.iter()
            .any(|w| w.contains("was provisioned as a filesystem volume (ext4)")),
        "{why:?}"
    );
}

#[test]
fn a_partition_without_role_or_filesystem_is_never_formatted_nor_published() {
    let (first, again) = changed_after_provisioning(
        |_| {},
        |inv| {
            let sdc = &mut inv.disks[1];
            for p in &mut sdc.partitions {
                p.role = crate::model::PartitionRole::Unrecorded;
            }
            sdc.partitions[1].signatures.clear();
            sdc.partitions[1].mountpoints.clear();
        },
    );
    assert_eq!(count(&again, "make_filesystem"), 0, "{:#?}", again.steps);
    let why = refusal_of(&again, "/dev/sdc");
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].contains("no recorded role"), "{why:?}");
    let device = &first.groups[1].disks[0].partitions[1].device;
    assert!(
        again.volumes().all(|v| &v.device != device),
        "the volume of a partition left alone is not published"
    );
    assert_eq!(again.volumes().count(), first.volumes().count() - 1);
}

#[test]
fn what_a_guest_wrote_on_a_block_volume_is_its_data_not_a_foreign_disk() {
    let (first, again) = changed_after_provisioning(
        |_| {},
        |inv| {
            let sdd = &mut inv.disks[2];
            sdd.partitions[0].signatures.push(Signature {
                kind: "ext4".into(),
                usage: Some("filesystem".into()),
                label: Some("guest-root".into()),
                uuid: Some("0e3c0d2a-1b7c-4f00-9d55-4c1f0e8d2a11".into()),
                unfinished: false,
            });
            sdd.partitions[1].signatures.push(Signature {
                kind: "LVM2_member".into(),
                ..Signature::default()
            });
            // The host's LVM activated the guest's volume group on it.
            sdd.partitions[1].holders.push("dm-7".into());
            sdd.in_use.push(InUse::Holder {
                holder: "dm-7".into(),
            });
        },
    );
    assert_eq!(again.steps, vec![], "{:#?}", again.refused);
    assert!(again.refused.is_empty(), "{:?}", again.refused);
    assert_eq!(again.groups, first.groups);
}

#[test]
fn adoption_finishes_an_interrupted_run_without_formatting_twice() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    // The run died after the GPT of sdc was written, before its second and third mkfs.
    let sdc = inv.disks.iter_mut().find(|d| d.name == "sdc").expect("sdc");
    for p in sdc.partitions.iter_mut().skip(1) {
        p.signatures.clear();
        p.mountpoints.clear();
    }
    inv.paths
        .retain(|path, _| !path.to_string_lossy().contains("/sep/"));
    let again = plan(&pol, &inv, &ctx());
    let actions: Vec<(&str, String)> = again
        .steps
        .iter()
        .map(|s| (s.action(), s.disk().display().to_string()))
        .collect();
    assert_eq!(count(&again, "write_partition_table"), 0);
    assert_eq!(count(&again, "make_filesystem"), 2, "{actions:?}");
    assert!(
        again
            .steps
            .iter()
            .all(|s| s.disk() == &PathBuf::from("/dev/sdc")),
        "{actions:?}"
    );
}

#[test]
fn a_foreign_filesystem_on_our_partition_is_never_formatted() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    let sdc = inv.disks.iter_mut().find(|d| d.name == "sdc").expect("sdc");
    sdc.partitions[1].signatures[0].uuid = Some("11111111-2222-3333-4444-555555555555".into());
    sdc.partitions[1].mountpoints.clear();
    let again = plan(&pol, &inv, &ctx());
    assert_eq!(count(&again, "make_filesystem"), 0);
    assert!(again
        .refused
        .iter()
        .any(|r| r.reason.contains("left alone because it may hold data")));
}

#[test]
fn a_kvstrap_disk_with_another_layout_is_refused_not_repartitioned() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    let sdc = inv.disks.iter_mut().find(|d| d.name == "sdc").expect("sdc");
    sdc.partitions.pop();
    let again = plan(&pol, &inv, &ctx());
    assert_eq!(count(&again, "write_partition_table"), 0);
    assert!(again
        .refused
        .iter()
        .any(|r| r.disk.as_path() == std::path::Path::new("/dev/sdc")
            && r.reason.contains("different layout")));
}

#[test]
fn ownership_drift_and_missing_quota_are_repaired() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    let v = first.groups[0].volumes[0].path.clone();
    inv.paths.insert(
        v.clone(),
        PathFacts::Directory {
            uid: 0,
            gid: 0,
            mode: 0o755,
            project_id: None,
            quota_bytes: None,
            devno: "8:17".into(),
        },
    );
    let again = plan(&pol, &inv, &ctx());
    let actions: Vec<&str> = again.steps.iter().map(Step::action).collect();
    assert_eq!(actions, vec!["set_ownership", "set_quota"]);
}

#[test]
fn wipe_force_wipes_a_foreign_disk_first() {
    let mut g = group("g");
    g.wipe = Wipe::Force;
    g.matcher.serial = Some("SER-sdb".into());
    let mut d = disk("sdb", 10 * GIB);
    d.signatures = vec![Signature {
        kind: "xfs".into(),
        ..Default::default()
    }];
    let p = plan(&policy(vec![g]), &inventory(vec![d]), &ctx());
    let actions: Vec<&str> = p.steps.iter().map(Step::action).take(2).collect();
    assert_eq!(actions, vec!["wipe_disk", "write_partition_table"]);
    assert!(
        matches!(&p.steps[0], Step::WipeDisk { signatures, .. } if signatures == &vec!["xfs".to_string()])
    );
}

#[test]
fn wipe_force_never_touches_a_disk_in_use() {
    let mut g = group("g");
    g.wipe = Wipe::Force;
    let mut d = disk("sdb", 10 * GIB);
    d.signatures = vec![Signature {
        kind: "xfs".into(),
        ..Default::default()
    }];
    d.in_use = vec![InUse::Mounted {
        mountpoint: "/data".into(),
    }];
    let p = plan(&policy(vec![g]), &inventory(vec![d]), &ctx());
    assert!(p.steps.is_empty());
}

#[test]
fn plans_are_deterministic_and_uuids_come_from_identity() {
    let (pol, disks) = mixed_policy();
    let a = serde_json::to_string(&plan(&pol, &inventory(disks.clone()), &ctx())).expect("json");
    let b = serde_json::to_string(&plan(&pol, &inventory(disks.clone()), &ctx())).expect("json");
    assert_eq!(a, b);
    // Same disk (same serial) under another kernel name: same UUIDs.
    let mut renamed = disks.clone();
    renamed[0].path = "/dev/sdz".into();
    let mut pol2 = pol.clone();
    pol2.disk_groups[0].devices = vec!["/dev/sdz".into()];
    let p1 = plan(&pol, &inventory(disks), &ctx());
    let p2 = plan(&pol2, &inventory(renamed), &ctx());
    assert_eq!(
        p1.groups[0].disks[0].disk_guid,
        p2.groups[0].disks[0].disk_guid
    );
    assert_eq!(
        p1.groups[0].disks[0].partitions[0].part_uuid,
        p2.groups[0].disks[0].partitions[0].part_uuid
    );
}

#[test]
fn plan_json_has_a_steps_list() {
    let (pol, disks) = mixed_policy();
    let p = plan(&pol, &inventory(disks), &ctx());
    let json = serde_json::to_value(&p).expect("json");
    assert!(json["steps"].as_array().is_some_and(|s| !s.is_empty()));
    assert!(json["steps"][0]["action"].is_string());
    assert!(render::plan_text(&p).contains("Totals: raw"));
}

#[test]
fn shared_layout_needs_kernel_quotas_unless_the_group_accepts_less() {
    let mut inv = inventory(vec![disk("sdb", 20 * GIB)]);
    inv.quota_unsupported
        .insert("xfs".into(), "CONFIG_XFS_QUOTA is not set".into());
    let mut g = group("g");
    g.sizing = VolumeSizing::Count(2);
    let p = plan(&policy(vec![g.clone()]), &inv, &ctx());
    assert!(p.steps.is_empty());
    assert!(
        p.refused[0]
            .reason
            .contains("cannot enforce project quotas on xfs (CONFIG_XFS_QUOTA is not set)"),
        "{:?}",
        p.refused
    );
    g.quota = crate::policy::QuotaMode::IfSupported;
    let p = plan(&policy(vec![g]), &inv, &ctx());
    assert_eq!(count(&p, "set_quota"), 0);
    assert_eq!(count(&p, "create_directory"), 2);
    assert!(p.groups[0].volumes.iter().all(|v| v.project_id.is_none()));
    assert!(p.groups[0].disks[0].partitions[0]
        .filesystem
        .as_ref()
        .is_some_and(|f| !f.project_quota));
    assert!(p.warnings[0].contains("can outgrow"), "{:?}", p.warnings);
    // Separate filesystems bound their volumes without quotas.
    let mut sep = group("s");
    sep.layout = Layout::Separate;
    sep.sizing = VolumeSizing::Count(2);
    assert!(plan(&policy(vec![sep]), &inv, &ctx()).refused.is_empty());
}

/// What xfs keeps for a wanted limit: whole filesystem blocks (4 KiB here), rounded up.
fn xfs_stored(bytes: u64) -> u64 {
    bytes.div_ceil(4096) * 4096
}

#[test]
fn quota_limits_rounded_by_the_filesystem_converge_for_every_size_spelling() {
    // "1G", "1Gi", "100G", "300Mi" and a size that is no multiple of 4 KiB.
    for size in [
        1_000_000_000,
        GIB,
        100_000_000_000,
        300 << 20,
        (300 << 20) + 123,
    ] {
        let mut shared = group("shared");
        shared.devices = vec!["/dev/sdb".into()];
        shared.sizing = VolumeSizing::Size(size);
        let disks = vec![disk("sdb", 400 * GIB)];
        let pol = policy(vec![shared]);
        let first = plan(&pol, &inventory(disks.clone()), &ctx());
        let mut inv = converged(&first, disks);
        for facts in inv.paths.values_mut() {
            if let PathFacts::Directory { quota_bytes, .. } = facts {
                *quota_bytes = quota_bytes.map(xfs_stored);
            }
        }
        let again = plan(&pol, &inv, &ctx());
        assert_eq!(again.steps, vec![], "volume_size {size}");
        // The published capacity never exceeds the limit that holds.
        for v in again.volumes() {
            assert!(v.capacity_bytes <= xfs_stored(v.capacity_bytes));
        }
    }
}

#[test]
fn a_quota_limit_below_the_capacity_or_far_above_it_is_set_again() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    for wrong in [GIB - 4096, GIB + (1 << 20)] {
        let mut inv = converged(&first, disks.clone());
        let v = first.groups[0].volumes[0].clone();
        if let Some(PathFacts::Directory { quota_bytes, .. }) = inv.paths.get_mut(&v.path) {
            *quota_bytes = Some(wrong);
        }
        let again = plan(&pol, &inv, &ctx());
        let actions: Vec<&str> = again.steps.iter().map(Step::action).collect();
        assert_eq!(actions, vec!["set_quota"], "stored limit {wrong}");
    }
}

#[test]
fn an_empty_plan_with_refused_disks_does_not_claim_the_node_matches() {
    let p = plan(
        &policy(vec![group("a"), group("b")]),
        &inventory(vec![disk("sdb", 10 * GIB)]),
        &ctx(),
    );
    assert!(p.steps.is_empty());
    let text = crate::plan::render::nothing_to_do(&p);
    assert!(!text.contains("matches the policy"), "{text}");
    assert!(
        text.contains("/dev/sdb (") && text.contains("1 selected disk(s) refused"),
        "{text}"
    );
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let again = plan(&pol, &converged(&first, disks), &ctx());
    assert_eq!(
        crate::plan::render::nothing_to_do(&again),
        "Nothing to do: the node matches the policy."
    );
}

#[test]
fn sizes_the_validator_would_refuse_are_refusals_here_too_never_a_panic_or_a_spin() {
    // The planner is a library too: whatever sizes reach it, it answers quickly.
    let cases = [
        (
            "fast",
            Layout::Shared,
            VolumeSizing::Size(1),
            "volumes, more than the 4096",
        ),
        (
            "fast",
            Layout::Shared,
            VolumeSizing::Count(100_000),
            "more than the 4096",
        ),
        (
            "raw",
            Layout::Separate,
            VolumeSizing::Size(u64::MAX),
            "does not fit",
        ),
        (
            "ext",
            Layout::Separate,
            VolumeSizing::Size(18_400_000_000_000_000_000),
            "does not fit",
        ),
        (
            "fast",
            Layout::Separate,
            VolumeSizing::Size(u64::MAX - 1),
            "does not fit",
        ),
    ];
    for (class, layout, sizing, why) in cases {
        let mut g = group("g");
        g.devices = vec!["/dev/sdb".into()];
        g.storage_class = class.into();
        g.layout = layout;
        g.sizing = sizing;
        let started = std::time::Instant::now();
        let p = plan(
            &policy(vec![g]),
            &inventory(vec![disk("sdb", 8 * GIB)]),
            &ctx(),
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{sizing:?}"
        );
        assert!(p.steps.is_empty(), "{sizing:?}");
        assert!(
            p.refused.iter().any(|r| r.reason.contains(why)),
            "{sizing:?}: {:?}",
            p.refused
        );
    }
}

#[test]
fn a_block_link_to_udevs_by_partuuid_name_of_its_partition_is_converged() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    let raw = first.groups.iter().find(|g| g.name == "raw").unwrap();
    let layout = &raw.disks[0];
    let (v0, v1) = (&raw.volumes[0], &raw.volumes[1]);
    let uuid_of = |v: &crate::model::VolumeSpec| {
        layout
            .partitions
            .iter()
            .find(|p| p.device == v.device)
            .unwrap()
            .part_uuid
    };
    // v0's link names its own partition by UUID: nothing to do.
    let own = crate::model::by_partuuid_path(&v0.device, &uuid_of(v0));
    assert_eq!(
        own,
        PathBuf::from(format!("/dev/disk/by-partuuid/{}", uuid_of(v0)))
    );
    inv.paths
        .insert(v0.path.clone(), PathFacts::Symlink { target: own });
    // v1's link names another partition's UUID: re-pointed.
    let other = crate::model::by_partuuid_path(&v1.device, &uuid_of(v0));
    inv.paths
        .insert(v1.path.clone(), PathFacts::Symlink { target: other });
    let again = plan(&pol, &inv, &ctx());
    let links: Vec<&Step> = again
        .steps
        .iter()
        .filter(|s| matches!(s, Step::LinkBlockDevice { .. }))
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(matches!(links[0], Step::LinkBlockDevice { link, .. } if *link == v1.path));
}

fn out_of_service(disk: &Disk, phase: crate::model::ServicePhase) -> PlanContext {
    let mut c = ctx();
    c.service.out_of_service.insert(
        crate::plan::identity::disk_identity(disk),
        crate::model::ServiceRecord {
            phase,
            path: disk.path.clone(),
            group: Some("shared".into()),
            since_unix: 1,
            why: "kvstrap drain".into(),
        },
    );
    c
}

#[test]
fn a_draining_disk_keeps_its_volumes_but_publishes_none() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let node = converged(&first, disks.clone());
    let draining = &node.disks[0];
    let c = out_of_service(draining, crate::model::ServicePhase::Draining);
    let p = plan(&pol, &node, &c);
    assert_eq!(
        p.steps,
        vec![],
        "nothing is released while claims may hold it"
    );
    assert!(p.volumes().all(|v| v.disk != draining.path), "{p:#?}");
    assert_eq!(p.out_of_service.len(), 1);
    let kept = &p.out_of_service[0];
    assert_eq!(kept.phase, crate::model::ServicePhase::Draining);
    let before = first.volumes().filter(|v| v.disk == draining.path).count();
    assert!(before > 0);
    assert_eq!(
        kept.volumes.len(),
        before,
        "its volumes are listed, not lost"
    );
    // A draining disk that lost a mount gets it back: bound claims still use it.
    let mut unmounted = node.clone();
    for part in &mut unmounted.disks[0].partitions {
        part.mountpoints.clear();
    }
    let p = plan(&pol, &unmounted, &c);
    assert!(count(&p, "mount") > 0, "{:#?}", p.steps);
}

#[test]
fn a_drained_disk_is_released_and_never_provisioned_again() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let node = converged(&first, disks.clone());
    let drained = &node.disks[0];
    let c = out_of_service(drained, crate::model::ServicePhase::Drained);
    let p = plan(&pol, &node, &c);
    assert!(p.volumes().all(|v| v.disk != drained.path));
    assert!(p
        .steps
        .iter()
        .all(|s| matches!(s, Step::Unmount { .. } | Step::RemoveBlockLink { .. })));
    assert!(count(&p, "unmount") > 0, "{:#?}", p.steps);
    assert!(p
        .refused
        .iter()
        .any(|r| r.disk == drained.path && r.reason.contains("out of service: drained")));
    // Blank, it still gets nothing.
    let blank = inventory(disks.clone());
    let c = out_of_service(&blank.disks[0], crate::model::ServicePhase::Drained);
    let p = plan(&pol, &blank, &c);
    assert!(p.steps.iter().all(|s| s.disk() != &blank.disks[0].path));
}

#[test]
fn a_replacement_joins_the_old_disks_group_whatever_the_selectors_say() {
    let mut g = group("g");
    g.devices = vec!["/dev/sdb".into()];
    let pol = policy(vec![g]);
    let disks = vec![disk("sdb", 10 * GIB), disk("sdc", 10 * GIB)];
    let p = plan(&pol, &inventory(disks.clone()), &ctx());
    assert!(p.groups[0]
        .disks
        .iter()
        .all(|d| d.disk != Path::new("/dev/sdc")));
    let mut c = out_of_service(&disks[0], crate::model::ServicePhase::Drained);
    c.service.replacements.insert(
        crate::plan::identity::disk_identity(&disks[1]),
        crate::model::Replacement {
            group: "g".into(),
            replaces: crate::plan::identity::disk_identity(&disks[0]),
            path: "/dev/sdc".into(),
            since_unix: 1,
        },
    );
    let p = plan(&pol, &inventory(disks), &c);
    let chosen: Vec<_> = p.groups[0].disks.iter().map(|d| d.disk.clone()).collect();
    assert_eq!(chosen, vec![PathBuf::from("/dev/sdc")]);
    assert_eq!(count(&p, "write_partition_table"), 1);
}

/// The context of a replacement of sdb by `new` in group `g`.
pub(crate) fn replaced_by(old: &Disk, new: &Disk) -> PlanContext {
    let mut c = out_of_service(old, crate::model::ServicePhase::Drained);
    c.service.replacements.insert(
        crate::plan::identity::disk_identity(new),
        crate::model::Replacement {
            group: "g".into(),
            replaces: crate::plan::identity::disk_identity(old),
            path: new.path.clone(),
            since_unix: 1,
        },
    );
    c
}

#[test]
fn a_replacement_record_never_wipes_nor_brings_a_disk_the_group_rejects() {
    let mut g = group("g");
    g.matcher.serial = Some("SER-sdb".into());
    g.matcher.transport = Some("sata".into());
    g.wipe = Wipe::Force;
    let pol = policy(vec![g]);
    let old = disk("sdb", 10 * GIB);
    // A disk with something on it, recorded as sdb's replacement: a wipe = "force" group
    // wipes only what its own selectors name, never what a record brings.
    let mut foreign = disk("sdc", 10 * GIB);
    foreign.signatures.push(Signature {
        kind: "ext4".into(),
        ..Signature::default()
    });
    let p = plan(
        &pol,
        &inventory(vec![old.clone(), foreign.clone()]),
        &replaced_by(&old, &foreign),
    );
    assert_eq!(count(&p, "wipe_disk"), 0, "{:#?}", p.steps);
    assert!(p
        .refused
        .iter()
        .any(|r| r.disk == foreign.path && r.reason.contains("not empty")));
    // Of another kind than the group wants: refused, with the way out.
    let mut nvme = disk("nvme0n1", 10 * GIB);
    nvme.transport = "nvme".into();
    let p = plan(
        &pol,
        &inventory(vec![old.clone(), nvme.clone()]),
        &replaced_by(&old, &nvme),
    );
    let why: Vec<&str> = p
        .refused
        .iter()
        .filter(|r| r.disk == nvme.path)
        .map(|r| r.reason.as_str())
        .collect();
    assert!(
        why.iter()
            .any(|w| w.contains("no longer fits group") && w.contains("kvstrap forget")),
        "{why:?}"
    );
    assert_eq!(count(&p, "write_partition_table"), 0);
    // Known only by its kernel name: a record cannot vouch for it.
    let mut anonymous = disk("sdd", 10 * GIB);
    anonymous.serial = None;
    let p = plan(
        &pol,
        &inventory(vec![old.clone(), anonymous.clone()]),
        &replaced_by(&old, &anonymous),
    );
    assert!(
        p.refused
            .iter()
            .any(|r| r.disk == anonymous.path && r.reason.contains("no serial or WWN")),
        "{:?}",
        p.refused
    );
    assert_eq!(count(&p, "write_partition_table"), 0);
}

#[test]
fn two_devices_with_one_identity_are_both_refused() {
    let pol = policy(vec![group("g")]);
    let mut a = disk("sdb", 10 * GIB);
    let mut b = disk("sdc", 10 * GIB);
    a.wwn = Some("naa.5000c500a1b2c3d4".into());
    b.wwn = a.wwn.clone();
    let p = plan(
        &pol,
        &inventory(vec![a.clone(), b.clone(), disk("sdd", 10 * GIB)]),
        &ctx(),
    );
    for (d, other) in [(&a, &b), (&b, &a)] {
        let want = format!(
            "same WWN (naa.5000c500a1b2c3d4) as {}: if these are paths of one LUN, run multipathd",
            other.path.display()
        );
        assert!(
            p.refused
                .iter()
                .any(|r| r.disk == d.path && r.reason.starts_with(&want)),
            "{:?}",
            p.refused
        );
        assert!(p.steps.iter().all(|s| s.disk() != &d.path));
    }
    assert_eq!(p.groups[0].disks.len(), 1, "the third disk is provisioned");
}

#[test]
fn a_kernel_name_block_link_is_re_pointed_once_udev_names_its_partition() {
    let (pol, disks) = mixed_policy();
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let mut inv = converged(&first, disks);
    let raw = first.groups.iter().find(|g| g.name == "raw").unwrap();
    let layout = &raw.disks[0];
    let (v0, v1) = (&raw.volumes[0], &raw.volumes[1]);
    let part_of = |v: &crate::model::VolumeSpec| {
        layout
            .partitions
            .iter()
            .find(|p| p.device == v.device)
            .unwrap()
            .clone()
    };
    // No udev: both links at the kernel name are converged.
    assert!(matches!(
        inv.paths.get(&v0.path),
        Some(PathFacts::Symlink { target }) if *target == v0.device
    ));
    assert!(
        plan(&pol, &inv, &ctx()).steps.is_empty(),
        "a kernel-name link without udev's name is fine"
    );
    // udev named both partitions; v1's link already points at the name, v0's does not.
    let by_uuid_v1 = crate::model::by_partuuid_path(&v1.device, &part_of(v1).part_uuid);
    inv.paths.insert(
        v1.path.clone(),
        PathFacts::Symlink {
            target: by_uuid_v1.clone(),
        },
    );
    let sdd = inv
        .disks
        .iter_mut()
        .find(|d| d.path == layout.disk)
        .unwrap();
    for p in &mut sdd.partitions {
        p.by_partuuid = true;
    }
    let again = plan(&pol, &inv, &ctx());
    assert_eq!(again.steps.len(), 1, "{:?}", again.steps);
    let Step::LinkBlockDevice {
        link,
        target,
        part_uuid,
        reason,
        ..
    } = &again.steps[0]
    else {
        panic!("not a link step: {:?}", again.steps[0]);
    };
    assert_eq!(*link, v0.path);
    // The executor gets the verified kernel name and links udev's name of it.
    assert_eq!(*target, v0.device);
    assert_eq!(*part_uuid, part_of(v0).part_uuid);
    let by_uuid_v0 = crate::model::by_partuuid_path(&v0.device, part_uuid);
    assert_eq!(
        *reason,
        format!(
            "udev names the partition now: point the link at {}",
            by_uuid_v0.display()
        )
    );
    // Once it points there, nothing is left to do.
    inv.paths
        .insert(v0.path.clone(), PathFacts::Symlink { target: by_uuid_v0 });
    assert!(plan(&pol, &inv, &ctx()).steps.is_empty());
}

// ---------------------------------------------------------------------------------------
// Encryption: LUKS2 between partition and filesystem or Block link.

fn encrypted(mut g: DiskGroup, method: crate::policy::EncryptionMethod) -> DiskGroup {
    g.encryption = Some(crate::policy::Encryption {
        method,
        key_file: method
            .uses_key_file()
            .then(|| PathBuf::from("/etc/kvstrap/keys/k")),
        tpm2_pcrs: if method.uses_tpm2() { vec![7] } else { vec![] },
    });
    g
}

fn encrypted_mixed_policy() -> (Policy, Vec<Disk>) {
    use crate::policy::EncryptionMethod::*;
    let (mut pol, disks) = mixed_policy();
    for (g, m) in pol
        .disk_groups
        .iter_mut()
        .zip([KeyFile, Tpm2, Tpm2AndKeyFile])
    {
        *g = encrypted(g.clone(), m);
    }
    (pol, disks)
}

fn with_tpm2(mut inv: Inventory) -> Inventory {
    inv.tpm2 = true;
    inv
}

fn actions(p: &Plan, disk: &str) -> Vec<&'static str> {
    p.steps
        .iter()
        .filter(|s| s.disk() == Path::new(disk))
        .map(Step::action)
        .collect()
}

#[test]
fn an_encrypted_group_puts_luks2_under_every_partition_and_its_volumes_on_the_mapping() {
    let (pol, disks) = encrypted_mixed_policy();
    let (plain_pol, _) = mixed_policy();
    let p = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(
        actions(&p, "/dev/sdb")[..5],
        [
            "write_partition_table",
            "format_luks",
            "open_luks",
            "make_filesystem",
            "mount"
        ]
    );
    assert_eq!(
        actions(&p, "/dev/sdd"),
        [
            "write_partition_table",
            "format_luks",
            "format_luks",
            "open_luks",
            "open_luks",
            "link_block_device",
            "link_block_device"
        ]
    );
    let shared = &p.groups[0].disks[0].partitions[0];
    let luks = shared.encryption.as_ref().expect("encrypted");
    let identity = identity::disk_identity(&disks[0]);
    assert_eq!(luks.uuid, identity::luks_uuid(&identity, "shared", 1));
    assert_eq!(
        luks.label,
        format!("kvs-{}", &luks.uuid.simple().to_string()[..8])
    );
    assert_ne!(luks.uuid, shared.filesystem.as_ref().expect("fs").uuid);
    assert_eq!(
        luks.unlock.key_file.as_deref(),
        Some(Path::new("/etc/kvstrap/keys/k"))
    );
    assert_eq!(
        shared.attribute_bits() & crate::model::ENCRYPTED_ATTRIBUTE,
        1 << 51
    );
    // mkfs and mount act on the mapping, never on the partition under the header.
    let mapping = PathBuf::from(format!("/dev/mapper/{}", luks.label));
    for s in &p.steps {
        if let Step::MakeFilesystem { device, disk, .. } | Step::Mount { device, disk, .. } = s {
            assert!(
                device.to_string_lossy().starts_with("/dev/mapper/kvs-"),
                "{disk:?}: {device:?}"
            );
        }
    }
    assert!(p.groups[0]
        .volumes
        .iter()
        .all(|v| v.mapping.as_ref() == Some(&mapping)));
    assert!(p.volumes().all(|v| v.encrypted()));
    // Block links name the mapping; the volume's device stays the partition.
    let raw = &p.groups[2];
    let link = p
        .steps
        .iter()
        .find_map(|s| match s {
            Step::LinkBlockDevice { crypt, target, .. } => Some((crypt.clone(), target.clone())),
            _ => None,
        })
        .expect("a link");
    assert_eq!(link.1, PathBuf::from("/dev/sdd1"));
    assert_eq!(
        link.0.map(|c| c.name),
        raw.disks[0].partitions[0]
            .encryption
            .as_ref()
            .map(|l| l.label.clone())
    );
    assert_eq!(
        raw.disks[0].partitions[1]
            .encryption
            .as_ref()
            .map(|l| l.unlock.describe()),
        Some("tpm2 (PCRs 7) or key file /etc/kvstrap/keys/k".into())
    );
    // The 16 MiB header is never published: every volume is smaller than its plain twin,
    // and each still fits its partition less the header.
    let plain = plan(&plain_pol, &inventory(disks), &ctx());
    for (e, q) in p.volumes().zip(plain.volumes()) {
        assert!(
            e.capacity_bytes <= q.capacity_bytes,
            "{} vs {}",
            e.name,
            q.name
        );
    }
    for g in &p.groups {
        for part in g.disks.iter().flat_map(|d| &d.partitions) {
            let room = part.size_bytes - crate::model::LUKS_HEADER_BYTES;
            let on_it: u64 = g
                .volumes
                .iter()
                .filter(|v| v.device == part.device)
                .map(|v| v.capacity_bytes)
                .sum();
            assert!(on_it <= room, "{}: {on_it} > {room}", part.device.display());
        }
    }
}

#[test]
fn a_converged_encrypted_node_gives_an_empty_plan_and_the_same_volumes() {
    let (pol, disks) = encrypted_mixed_policy();
    let first = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    let inv = with_tpm2(converged(&first, disks));
    let again = plan(&pol, &inv, &ctx());
    assert_eq!(again.steps, vec![], "refused: {:?}", again.refused);
    assert!(again.refused.is_empty());
    assert_eq!(again.groups, first.groups);
    // The mapping is kvstrap's way to the volume, not a holder that disowns the disk.
    for d in &inv.disks {
        assert_eq!(
            judge_with_root(d, None, Some(Path::new("/var/lib/kvstrap/storage"))),
            Verdict::Ours
        );
    }
    assert!(again.volumes().all(|v| !ready::pending(&again, v)));
}

#[test]
fn after_a_reboot_the_volumes_are_opened_then_checked_never_formatted_again() {
    let (pol, disks) = encrypted_mixed_policy();
    let first = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    let mut inv = with_tpm2(converged(&first, disks));
    for d in &mut inv.disks {
        d.in_use.clear();
        for p in &mut d.partitions {
            p.crypt = None;
            p.holders.clear();
        }
    }
    let p = plan(&pol, &inv, &ctx());
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(
        actions(&p, "/dev/sdb")[..3],
        ["open_luks", "make_filesystem", "mount"]
    );
    assert_eq!(actions(&p, "/dev/sdd"), ["open_luks", "open_luks"]);
    assert_eq!(count(&p, "format_luks"), 0);
    let mkfs = p
        .steps
        .iter()
        .find(|s| s.action() == "make_filesystem")
        .expect("a check of the filesystem");
    assert!(
        mkfs.reason()
            .contains("made only if the volume holds nothing"),
        "{}",
        mkfs.reason()
    );
    // Until they are open, their volumes are not published.
    assert!(p.volumes().all(|v| ready::pending(&p, v)));
}

#[test]
fn a_header_of_ours_with_nothing_inside_is_finished_and_an_unfinished_one_made_again() {
    let mut g = encrypted(group("g"), crate::policy::EncryptionMethod::KeyFile);
    g.devices = vec!["/dev/sdb".into()];
    let pol = policy(vec![g]);
    let disks = vec![disk("sdb", 20 * GIB)];
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    // Killed between the LUKS2 format (complete, open) and mkfs.
    let mut inv = converged(&first, disks.clone());
    let crypt = inv.disks[0].partitions[0].crypt.as_mut().expect("open");
    crypt.signatures.clear();
    crypt.mountpoints.clear();
    inv.disks[0]
        .in_use
        .retain(|u| !matches!(u, InUse::Mounted { .. }));
    let p = plan(&pol, &inv, &ctx());
    assert_eq!(actions(&p, "/dev/sdb")[..2], ["make_filesystem", "mount"]);
    assert_eq!(
        count(&p, "format_luks"),
        0,
        "a complete header is never made twice"
    );
    // Killed inside the format: the header still has the in-progress label.
    let mut inv = converged(&first, disks);
    let part = &mut inv.disks[0].partitions[0];
    let luks = first.groups[0].disks[0].partitions[0]
        .encryption
        .clone()
        .expect("luks");
    part.signatures = vec![luks_header(&luks, crate::model::LUKS_IN_PROGRESS_LABEL)];
    part.crypt = None;
    part.holders.clear();
    inv.disks[0].in_use.clear();
    let p = plan(&pol, &inv, &ctx());
    assert_eq!(
        actions(&p, "/dev/sdb")[..4],
        ["format_luks", "open_luks", "make_filesystem", "mount"]
    );
    assert!(p.steps[0]
        .reason()
        .contains("an earlier LUKS2 format did not finish"));
}

#[test]
fn luks_headers_kvstrap_did_not_finish_for_this_partition_are_never_touched() {
    let mut g = encrypted(group("g"), crate::policy::EncryptionMethod::KeyFile);
    g.devices = vec!["/dev/sdb".into(), "/dev/sdc".into()];
    let pol = policy(vec![g]);
    let disks = vec![disk("sdb", 20 * GIB), disk("sdc", 20 * GIB)];
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    let luks = first.groups[0].disks[0].partitions[0]
        .encryption
        .clone()
        .expect("luks");
    let reset = |inv: &mut Inventory| {
        let part = &mut inv.disks[0].partitions[0];
        part.crypt = None;
        part.holders.clear();
        inv.disks[0].in_use.clear();
    };
    // Another LUKS2 header (another UUID) on our partition, crypto-erased, relabelled.
    let mut other = luks.clone();
    other.uuid = uuid::Uuid::from_u128(42);
    for (sig, why) in [
        (luks_header(&other, &luks.label), "holds crypto_LUKS"),
        (
            luks_header(&luks, crate::model::LUKS_ERASED_LABEL),
            "was crypto-erased",
        ),
        (luks_header(&luks, "mine"), "but the label \"mine\""),
    ] {
        let mut inv = converged(&first, disks.clone());
        reset(&mut inv);
        inv.disks[0].partitions[0].signatures = vec![sig];
        let p = plan(&pol, &inv, &ctx());
        assert!(actions(&p, "/dev/sdb").is_empty(), "{why}: {:?}", p.steps);
        let reasons = refusal_of(&p, "/dev/sdb");
        assert!(reasons.iter().any(|r| r.contains(why)), "{reasons:?}");
        assert!(p.groups[0]
            .volumes
            .iter()
            .all(|v| v.disk != Path::new("/dev/sdb")));
    }
    // Open under a name that is not kvstrap's (an admin's rescue mapping).
    let mut inv = converged(&first, disks.clone());
    inv.disks[0].partitions[0]
        .crypt
        .as_mut()
        .expect("open")
        .name = "rescue".into();
    let p = plan(&pol, &inv, &ctx());
    assert!(refusal_of(&p, "/dev/sdb")
        .iter()
        .any(|r| r.contains("close it")));
    // A whole disk that is someone else's LUKS volume is foreign.
    let mut inv = inventory(disks);
    inv.disks[1].signatures = vec![luks_header(&other, "theirs")];
    let p = plan(&pol, &inv, &ctx());
    assert_eq!(
        refusal_of(&p, "/dev/sdc"),
        ["not empty: crypto_LUKS (label \"theirs\")"]
    );
}

#[test]
fn encrypted_or_plain_is_part_of_a_volumes_kind() {
    let (plain, disks) = mixed_policy();
    let (secret, _) = encrypted_mixed_policy();
    let was_plain = converged(
        &plan(&plain, &inventory(disks.clone()), &ctx()),
        disks.clone(),
    );
    let p = plan(&secret, &with_tpm2(was_plain), &ctx());
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    for d in ["/dev/sdb", "/dev/sdc", "/dev/sdd"] {
        let r = refusal_of(&p, d);
        assert!(
            r.iter()
                .any(|r| r.contains("was provisioned as a plain (unencrypted)")
                    && r.contains("encrypted: kvstrap never changes the kind")),
            "{d}: {r:?}"
        );
    }
    let first = plan(&secret, &with_tpm2(inventory(disks.clone())), &ctx());
    let was_encrypted = converged(&first, disks);
    let p = plan(&plain, &was_encrypted, &ctx());
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    assert!(refusal_of(&p, "/dev/sdd")
        .iter()
        .any(|r| r.contains("was provisioned as an encrypted (LUKS2) raw Block volume")));
}

#[test]
fn a_tpm2_group_leaves_blank_disks_alone_on_a_node_without_a_tpm2() {
    let mut g = encrypted(group("g"), crate::policy::EncryptionMethod::Tpm2);
    g.devices = vec!["/dev/sdb".into()];
    let pol = policy(vec![g]);
    let disks = vec![disk("sdb", 20 * GIB)];
    let p = plan(&pol, &inventory(disks.clone()), &ctx());
    assert!(p.steps.is_empty());
    assert!(refusal_of(&p, "/dev/sdb")[0].contains("this node has none (no /dev/tpmrm0)"));
    let p = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    assert_eq!(count(&p, "format_luks"), 1);
    // A disk sealed earlier is opened (and reported locked if the TPM2 is gone), never
    // refused for it: nothing new is sealed.
    let inv = converged(&p, disks);
    let again = plan(&pol, &inv, &ctx());
    assert!(again.refused.is_empty(), "{:?}", again.refused);
}

#[test]
fn pods_on_encrypted_volumes_are_uses_of_the_volumes_not_of_a_foreign_holder() {
    let (pol, disks) = encrypted_mixed_policy();
    let first = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    let mut inv = with_tpm2(converged(&first, disks));
    let pod = "0b6b4c1e-8f0a-4c3e-9d55-3c1f0e8d2a11";
    let v = first.groups[0].volumes[0].clone();
    let kubelet = PathBuf::from(format!(
        "/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~local-volume/pv-x"
    ));
    let d = inv
        .disks
        .iter_mut()
        .find(|d| d.path == v.disk)
        .expect("disk");
    let crypt = d.partitions[0].crypt.as_mut().expect("open");
    crypt.mounts = vec![
        crate::model::MountFact {
            mountpoint: crypt.mountpoints[0].clone(),
            root: "/".into(),
            pid: None,
        },
        crate::model::MountFact {
            mountpoint: kubelet.clone(),
            root: v.dir_in_fs.clone().expect("a directory"),
            pid: None,
        },
    ];
    crypt.mountpoints.push(kubelet.clone());
    d.in_use.push(InUse::Mounted {
        mountpoint: kubelet.clone(),
    });
    let p = plan(&pol, &inv, &ctx());
    assert!(
        p.refused.is_empty() && p.steps.is_empty(),
        "{:?} {:?}",
        p.refused,
        p.steps
    );
    let d = inv.disks.iter().find(|d| d.path == v.disk).expect("disk");
    let uses = usage::volume_uses(d, &v);
    assert_eq!(uses.len(), 1, "{uses:?}");
    assert_eq!(uses[0].pod_uid.as_deref(), Some(pod));
    assert!(usage::local_users(d, Path::new("/var/lib/kvstrap/storage"))
        .iter()
        .all(|u| !u.contains("held by /dev/dm-")));
}

#[test]
fn a_drained_encrypted_disk_is_unmounted_unlinked_then_closed() {
    let (pol, disks) = encrypted_mixed_policy();
    let first = plan(&pol, &with_tpm2(inventory(disks.clone())), &ctx());
    let inv = with_tpm2(converged(&first, disks.clone()));
    for d in ["/dev/sdb", "/dev/sdd"] {
        let disk = inv
            .disks
            .iter()
            .find(|x| x.path == Path::new(d))
            .expect("disk");
        let ctx = out_of_service(disk, crate::model::ServicePhase::Drained);
        let p = plan(&pol, &inv, &ctx);
        let acts = actions(&p, d);
        let closes = acts.iter().filter(|a| **a == "close_luks").count();
        assert_eq!(closes, disk.partitions.len(), "{d}: {acts:?}");
        let first_close = acts
            .iter()
            .position(|a| *a == "close_luks")
            .expect("a close");
        assert!(
            acts[first_close..].iter().all(|a| *a == "close_luks"),
            "{acts:?}"
        );
        assert!(acts[..first_close]
            .iter()
            .all(|a| *a == "unmount" || *a == "remove_block_link"));
    }
    let sdd = inv
        .disks
        .iter()
        .find(|x| x.path == Path::new("/dev/sdd"))
        .expect("sdd");
    let erase = service::erase_steps(sdd);
    assert_eq!(erase.len(), 2);
    assert!(erase.iter().all(|s| s.action() == "erase_luks"));
    assert!(service::erase_steps(&disk("sdx", GIB)).is_empty());
}

/// A multipath map of a SAN LUN (WWN 0x5000c500a1b2c3d4) with `paths` (name, active).
fn map(name: &str, paths: &[(&str, bool)]) -> Vec<Disk> {
    let mut m = disk(name, 20 * GIB);
    m.path = format!("/dev/mapper/{name}").into();
    m.transport = "mpath".into();
    m.wwn = Some("0x5000c500a1b2c3d4".into());
    m.multipath = Some(crate::model::Multipath {
        wwid: "35000c500a1b2c3d4".into(),
        kernel_name: "dm-0".into(),
        paths: paths
            .iter()
            .map(|(p, active)| crate::model::MultipathPath {
                name: (*p).into(),
                state: if *active { "running" } else { "offline" }.into(),
                active: *active,
            })
            .collect(),
    });
    if paths.iter().all(|(_, active)| !active) {
        m.in_use = vec![InUse::NoPath {
            detail: "no path left".into(),
        }];
    }
    let mut disks = vec![m];
    for (p, _) in paths {
        let mut d = disk(p, 20 * GIB);
        d.transport = "scsi".into();
        d.wwn = Some("0x5000c500a1b2c3d4".into());
        d.in_use = vec![InUse::MultipathPath { map: name.into() }];
        disks.push(d);
    }
    disks
}

#[test]
fn a_multipath_map_is_provisioned_once_through_its_partition_mappings() {
    let mut g = group("san");
    g.matcher.wwn = Some("0x5000c500a1b2c3d4".into());
    g.layout = Layout::Separate;
    g.storage_class = "ext".into();
    g.sizing = VolumeSizing::Count(2);
    let pol = policy(vec![g]);
    let disks = map("mpatha", &[("sdb", true), ("sdc", true)]);
    let first = plan(&pol, &inventory(disks.clone()), &ctx());
    assert!(first.refused.is_empty(), "{:?}", first.refused);
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let layout = &first.groups[0].disks[0];
    assert_eq!(layout.disk, PathBuf::from("/dev/mapper/mpatha"));
    assert_eq!(layout.identity, "wwn:0x5000c500a1b2c3d4");
    for (i, part) in layout.partitions.iter().enumerate() {
        assert_eq!(
            part.device,
            PathBuf::from(format!("/dev/mapper/mpatha-part{}", i + 1))
        );
    }
    assert!(first
        .steps
        .iter()
        .all(|s| s.disk() == &PathBuf::from("/dev/mapper/mpatha")));
    // Adopted after a reboot: nothing to do, the paths still neither taken nor refused.
    let again = plan(&pol, &converged(&first, disks), &ctx());
    assert_eq!(again.steps, vec![]);
    assert!(again.refused.is_empty(), "{:?}", again.refused);
    assert_eq!(again.groups, first.groups);
}

#[test]
fn a_degraded_map_is_served_with_a_warning_and_a_lost_one_like_a_vanished_disk() {
    let mut g = group("san");
    g.matcher.transport = Some("mpath".into());
    let pol = policy(vec![g]);
    let healthy = map("mpatha", &[("sdb", true), ("sdc", true)]);
    let first = plan(&pol, &inventory(healthy.clone()), &ctx());
    let volumes = first.groups[0].volumes.clone();
    assert_eq!(volumes.len(), 1);

    let mut degraded = converged(&first, healthy.clone());
    let mp = degraded.disks[0].multipath.as_mut().unwrap();
    mp.paths[1].active = false;
    mp.paths[1].state = "offline".into();
    let p = plan(&pol, &degraded, &ctx());
    assert_eq!(p.steps, vec![]);
    assert_eq!(p.groups[0].volumes, volumes, "still served");
    assert_eq!(
        p.warnings,
        vec![
            "multipath map /dev/mapper/mpatha is degraded: 1 of 2 paths active (failed: sdc offline); \
             its volumes are still served"
                .to_string()
        ]
    );

    // Every path gone: the map is refused, its volumes leave the plan as a vanished
    // disk's do (the publisher keeps Bound PVs), and nothing is written to it.
    let mut lost = converged(&first, map("mpatha", &[]));
    lost.disks[0].in_use.insert(
        0,
        InUse::NoPath {
            detail: "no path left".into(),
        },
    );
    let p = plan(&pol, &lost, &ctx());
    assert_eq!(p.steps, vec![]);
    assert!(p.groups[0].volumes.is_empty());
    assert_eq!(
        refusal_of(&p, "/dev/mapper/mpatha"),
        vec!["multipath map without a working path: no path left"]
    );
}
