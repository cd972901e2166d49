//! The inventory on a fake /sys, /proc and /dev (tests/fixtures/sysfs-node, made by
//! make-sysfs-node.py): identities, transports, by-id names and eligibility, no root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::inventory::{scan, ScanOptions};
use kvstrap::model::{Disk, InUse, Inventory};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs-node")
}

fn options(dev_root: PathBuf) -> ScanOptions {
    let root = fixture();
    ScanOptions {
        sys_root: root.join("sys"),
        dev_root,
        proc_root: root.join("proc"),
        managed_roots: vec!["/var/lib/kvstrap/storage".into()],
        quota_filesystems: Vec::new(),
    }
}

fn inventory() -> Inventory {
    scan(&options(fixture().join("dev"))).expect("scan of the fixture")
}

fn disk<'a>(inv: &'a Inventory, name: &str) -> &'a Disk {
    inv.disks
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("{name} not listed"))
}

/// Reasons other than `Unreadable`: the fixture has no device nodes to open.
fn reasons(d: &Disk) -> Vec<InUse> {
    d.in_use
        .iter()
        .filter(|r| !matches!(r, InUse::Unreadable { .. }))
        .cloned()
        .collect()
}

#[test]
fn lists_disks_in_natural_order_without_unattached_loops() {
    let names: Vec<String> = inventory().disks.iter().map(|d| d.name.clone()).collect();
    assert_eq!(
        names,
        vec!["dm-0", "loop2", "loop10", "loop11", "nvme0n1", "sda", "vda"]
    );
}

#[test]
fn nvme_identity_and_by_id_names() {
    let inv = inventory();
    let d = disk(&inv, "nvme0n1");
    assert_eq!(d.path, PathBuf::from("/dev/nvme0n1"));
    assert_eq!(d.devno, "259:0");
    assert_eq!(d.transport, "nvme");
    assert_eq!(d.size_bytes, 1_000_204_886_016);
    assert_eq!(d.model.as_deref(), Some("Samsung SSD 970 EVO Plus 1TB"));
    assert_eq!(d.serial.as_deref(), Some("S4EWNX0R123456"));
    assert_eq!(d.wwn.as_deref(), Some("eui.0025385b71b1b2c3"));
    assert!(!d.rotational);
    assert_eq!(
        d.by_id,
        vec![
            "/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_Plus_1TB_S4EWNX0R123456",
            "/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_Plus_1TB_S4EWNX0R123456_1",
            "/dev/disk/by-id/nvme-eui.0025385b71b1b2c3",
        ]
    );
    let p1 = &d.partitions[0];
    assert_eq!(p1.path, PathBuf::from("/dev/nvme0n1p1"));
    assert_eq!(
        (p1.number, p1.start_bytes, p1.size_bytes),
        (1, 2048 * 512, 1_887_436_800 * 512)
    );
    assert!(p1.in_kernel);
    assert_eq!(
        p1.by_id[0],
        "/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_Plus_1TB_S4EWNX0R123456-part1"
    );
    assert_eq!(
        p1.mountpoints,
        vec![
            PathBuf::from("/var/lib/kvstrap/storage/nvme-3f2a9c1b"),
            PathBuf::from(format!(
                "{KUBELET_PODS}/volumes/kubernetes.io~local-volume/pv-a"
            ))
        ]
    );
    assert!(d.partitions[1].swap);
}

const POD: &str = "6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";
const KUBELET_PODS: &str = "/var/lib/kubelet/pods/6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

#[test]
fn nvme_mount_below_storage_root_is_ours_but_swap_is_not() {
    // The inventory reports the pod's bind mount as it reports any mount; only the
    // planner, which knows the partition is kvstrap's, counts it as a volume's use.
    let inv = inventory();
    assert_eq!(
        reasons(disk(&inv, "nvme0n1")),
        vec![
            InUse::Mounted {
                mountpoint: format!("{KUBELET_PODS}/volumes/kubernetes.io~local-volume/pv-a")
                    .into()
            },
            InUse::Swap {
                device: "/dev/nvme0n1p2".into()
            }
        ]
    );
}

#[test]
fn every_mount_of_a_partition_is_seen_with_its_root_in_every_namespace() {
    let inv = inventory();
    let p1 = &disk(&inv, "nvme0n1").partitions[0];
    let seen: Vec<(String, String, Option<u32>)> = p1
        .mounts
        .iter()
        .map(|m| {
            (
                m.mountpoint.display().to_string(),
                m.root.display().to_string(),
                m.pid,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "/var/lib/kvstrap/storage/nvme-3f2a9c1b".into(),
                "/".into(),
                None
            ),
            (
                format!("{KUBELET_PODS}/volumes/kubernetes.io~local-volume/pv-a"),
                "/nvme-3f2a9c1b-01".into(),
                None
            ),
            // A container's namespace; init's is kvstrap's own and is not read twice.
            ("/data".into(), "/nvme-3f2a9c1b-01".into(), Some(4242)),
        ]
    );
}

#[test]
fn kubelets_block_mapping_and_its_loop_device_are_seen_on_the_partition() {
    let inv = inventory();
    let mapped =
        format!("/var/lib/kubelet/plugins/kubernetes.io~local-volume/volumeDevices/pv-b/{POD}");
    let p2 = &disk(&inv, "nvme0n1").partitions[1];
    assert_eq!(p2.node_binds.len(), 1, "{p2:#?}");
    assert_eq!(p2.node_binds[0].mountpoint, PathBuf::from(&mapped));
    assert_eq!(p2.node_binds[0].root, PathBuf::from("/nvme0n1p2"));
    assert_eq!(
        p2.loop_devices,
        vec![kvstrap::model::LoopOver {
            device: "/dev/loop11".into(),
            backing_file: mapped.into()
        }]
    );
    // The loop device shows the partition's data: never a disk to provision.
    assert!(
        reasons(disk(&inv, "loop11")).contains(&InUse::Virtual {
            detail: "a loop device over the block device /dev/nvme0n1p2".into()
        }),
        "{:?}",
        disk(&inv, "loop11").in_use
    );
    assert!(
        reasons(disk(&inv, "loop2")).is_empty(),
        "a loop over an image file is a disk"
    );
}

#[test]
fn sata_identity_comes_from_ata_identify_data() {
    let inv = inventory();
    let d = disk(&inv, "sda");
    assert_eq!(d.transport, "sata");
    assert_eq!(
        d.model.as_deref(),
        Some("WDC WD40EFRX-68N32N0"),
        "untruncated, from VPD page 0x89"
    );
    assert_eq!(d.serial.as_deref(), Some("WD-WCC7K1234567"));
    assert_eq!(
        d.vendor, None,
        "libata's INQUIRY vendor \"ATA\" is not the maker"
    );
    assert_eq!(d.wwn.as_deref(), Some("0x50014ee2b1234567"));
    assert!(d.rotational);
    assert_eq!((d.logical_sector_size, d.physical_sector_size), (512, 4096));
    assert_eq!(
        d.by_id,
        vec![
            "/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567",
            "/dev/disk/by-id/wwn-0x50014ee2b1234567"
        ]
    );
    assert_eq!(d.partitions[0].holders, vec!["dm-0"]);
}

#[test]
fn sata_disk_under_mounted_lvm_is_mounted_and_held() {
    let inv = inventory();
    assert_eq!(
        reasons(disk(&inv, "sda")),
        vec![
            InUse::Mounted {
                mountpoint: "/srv/data set".into()
            },
            InUse::Holder {
                holder: "dm-0".into()
            }
        ]
    );
    assert_eq!(
        reasons(disk(&inv, "dm-0")),
        vec![
            InUse::Virtual {
                detail: "device-mapper device".into()
            },
            InUse::Mounted {
                mountpoint: "/srv/data set".into()
            }
        ]
    );
}

#[test]
fn virtio_root_disk_is_the_system_disk() {
    let inv = inventory();
    let d = disk(&inv, "vda");
    assert_eq!(d.transport, "virtio");
    assert_eq!(d.serial.as_deref(), Some("rootdisk-0001"));
    assert_eq!(d.by_id, vec!["/dev/disk/by-id/virtio-rootdisk-0001"]);
    assert_eq!(
        reasons(d),
        vec![
            InUse::SystemDisk {
                detail: "/ is mounted from /dev/vda".into()
            },
            InUse::SystemDisk {
                detail: "the kernel command line boots from root=/dev/vda".into()
            },
            InUse::Mounted {
                mountpoint: "/".into()
            },
        ]
    );
}

#[test]
fn loop_devices_carry_their_backing_file() {
    let inv = inventory();
    let d = disk(&inv, "loop10");
    assert_eq!(d.transport, "loop");
    assert_eq!(d.size_bytes, 2 * 1024 * 1024 * 1024);
    assert_eq!(
        d.backing_file.as_deref(),
        Some(Path::new("/var/lib/images/disk10.img"))
    );
    assert!(d.by_id.is_empty());
    assert_eq!(reasons(d), vec![]);
}

#[test]
fn devices_that_cannot_be_opened_are_unreadable_not_fatal() {
    let inv = inventory();
    for d in &inv.disks {
        assert!(
            d.in_use.iter().any(
                |r| matches!(r, InUse::Unreadable { detail } if detail.contains("No such file"))
            ),
            "{}: {:?}",
            d.name,
            d.in_use
        );
    }
}

#[test]
fn udev_links_are_used_when_present() {
    let dev = tempfile::tempdir().unwrap();
    let by_id = dev.path().join("disk/by-id");
    std::fs::create_dir_all(&by_id).unwrap();
    std::os::unix::fs::symlink("../../sda", by_id.join("ata-REAL_NAME")).unwrap();
    std::os::unix::fs::symlink("../../sda1", by_id.join("ata-REAL_NAME-part1")).unwrap();
    let inv = scan(&options(dev.path().to_path_buf())).unwrap();
    let d = disk(&inv, "sda");
    assert_eq!(d.by_id, vec!["/dev/disk/by-id/ata-REAL_NAME"]);
    assert_eq!(
        d.partitions[0].by_id,
        vec!["/dev/disk/by-id/ata-REAL_NAME-part1"]
    );
    // udev has not made vda's links yet (a disk hot-plugged a moment ago): its names are
    // computed, so a policy that selects it by by-id name matches it on this very run.
    assert_eq!(
        disk(&inv, "vda").by_id,
        vec!["/dev/disk/by-id/virtio-rootdisk-0001"]
    );
}

#[test]
fn missing_sysfs_is_an_error_that_names_the_path() {
    let mut opts = options(fixture().join("dev"));
    opts.sys_root = fixture().join("no-such-sys");
    let err = scan(&opts).unwrap_err().to_string();
    assert!(err.contains("no-such-sys/block"), "{err}");
}

#[test]
fn json_names_each_disk_by_path() {
    let json = serde_json::to_value(inventory()).unwrap();
    assert_eq!(json["disks"][4]["path"], "/dev/nvme0n1");
    assert_eq!(json["disks"][6]["in_use"][0]["kind"], "system_disk");
}
