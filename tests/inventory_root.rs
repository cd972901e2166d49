//! Root tests of the inventory on loop devices the tests create: sizes, signatures,
//! partitions, mounts, swap, and the machine's own system disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::LoopDisk;
use kvstrap::inventory::{scan, ScanOptions};
use kvstrap::model::{Disk, InUse, Inventory};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1024 * 1024;

fn scan_machine() -> Inventory {
    scan(&ScanOptions::default()).expect("scan")
}

fn find<'a>(inv: &'a Inventory, disk: &LoopDisk) -> &'a Disk {
    inv.disks
        .iter()
        .find(|d| d.path == disk.path)
        .unwrap_or_else(|| panic!("{} not listed", disk.path.display()))
}

fn kinds(disk: &Disk) -> Vec<String> {
    disk.signatures.iter().map(|s| s.kind.clone()).collect()
}

#[test]
fn blank_loop_disk_has_size_backing_file_and_nothing_in_use() {
    if !common::require_root("blank_loop_disk") {
        return;
    }
    let loop_disk = LoopDisk::new(64 * MIB);
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert_eq!(d.size_bytes, 64 * MIB);
    assert_eq!(d.transport, "loop");
    assert_eq!(d.logical_sector_size, 512);
    assert_eq!(d.backing_file.as_deref(), Some(loop_disk.backing.as_path()));
    assert!(d.signatures.is_empty(), "{:?}", d.signatures);
    assert!(d.partition_table.is_none());
    assert!(d.partitions.is_empty());
    assert_eq!(d.in_use, vec![], "a blank loop disk is free");
    assert!(d.by_id.is_empty(), "udev names no loop device by id");
}

#[test]
fn ext4_signature_with_label_and_uuid() {
    if !common::require_root("ext4_signature") {
        return;
    }
    let loop_disk = LoopDisk::new(64 * MIB);
    loop_disk.run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "kvtest",
            "-U",
            "0b4f1c52-7d4e-4d8a-9a51-000000000001",
        ],
    );
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert_eq!(kinds(d), vec!["ext4"]);
    let sig = &d.signatures[0];
    assert_eq!(sig.usage.as_deref(), Some("filesystem"));
    assert_eq!(sig.label.as_deref(), Some("kvtest"));
    assert_eq!(
        sig.uuid.as_deref(),
        Some("0b4f1c52-7d4e-4d8a-9a51-000000000001")
    );
}

#[test]
fn xfs_and_swap_signatures() {
    if !common::require_root("xfs_and_swap_signatures") {
        return;
    }
    let xfs = LoopDisk::new(320 * MIB);
    xfs.run("mkfs.xfs", &["-q", "-f", "-L", "kvxfs"]);
    let swap = LoopDisk::new(32 * MIB);
    swap.run("mkswap", &["-L", "kvswap"]);
    let inv = scan_machine();
    assert_eq!(find(&inv, &xfs).size_bytes, 320 * MIB);
    assert_eq!(kinds(find(&inv, &xfs)), vec!["xfs"]);
    assert_eq!(
        find(&inv, &xfs).signatures[0].label.as_deref(),
        Some("kvxfs")
    );
    assert_eq!(kinds(find(&inv, &swap)), vec!["swap"]);
    assert_eq!(
        find(&inv, &swap).in_use,
        vec![],
        "a swap signature alone is not swap in use"
    );
}

#[test]
fn every_signature_is_listed_like_wipefs() {
    if !common::require_root("every_signature_is_listed") {
        return;
    }
    // An xfs disk with an ext4 superblock copied over its AGI sector: two signatures
    // at once, as a half-wiped or re-formatted disk can have.
    let loop_disk = LoopDisk::new(320 * MIB);
    loop_disk.run("mkfs.xfs", &["-q", "-f"]);
    let ext4_image = tempfile::NamedTempFile::new().unwrap();
    ext4_image.as_file().set_len(16 * MIB).unwrap();
    common::run_on("mkfs.ext4", &["-q", "-F"], ext4_image.path());
    let status = Command::new("dd")
        .arg(format!("if={}", ext4_image.path().display()))
        .arg(format!("of={}", loop_disk.path.display()))
        .args([
            "bs=1024",
            "skip=1",
            "seek=1",
            "count=1",
            "conv=notrunc,fsync",
            "status=none",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let inv = scan_machine();
    let mut found = kinds(find(&inv, &loop_disk));
    found.sort();
    let wipefs = Command::new("wipefs")
        .args(["--noheadings", "-O", "TYPE"])
        .arg(&loop_disk.path)
        .output()
        .unwrap();
    let mut expected: Vec<String> = String::from_utf8_lossy(&wipefs.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!(found, vec!["ext4", "xfs"]);
}

#[test]
fn gpt_partitions_with_types_names_and_signatures() {
    if !common::require_root("gpt_partitions") {
        return;
    }
    let loop_disk = LoopDisk::new(128 * MIB);
    let kv_type = kvstrap::model::KVSTRAP_PART_TYPE.to_string();
    loop_disk.run(
        "sgdisk",
        &[
            "--disk-guid=8a3c8a0e-1b57-4f0a-9d5e-0000000000aa",
            "-n1:1MiB:+32MiB",
            &format!("-t1:{kv_type}"),
            "-c1:kvstrap-a",
            "-u1:5a0c7d2e-3b8f-4b61-8f0d-000000000001",
            "-n2:0:+16MiB",
            "-t2:8300",
        ],
    );
    // Tell the kernel about the partitions (BLKPG): loop devices get no udev events here.
    loop_disk.run("partx", &["-a"]);
    common::run_on(
        "mkfs.ext4",
        &["-q", "-F", "-L", "part1"],
        &loop_disk.partition(1),
    );
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    let table = d.partition_table.as_ref().expect("partition table");
    assert_eq!(table.kind, "gpt");
    assert_eq!(
        table.uuid.as_deref(),
        Some("8a3c8a0e-1b57-4f0a-9d5e-0000000000aa")
    );
    assert!(
        d.signatures.is_empty(),
        "the table is not a whole-disk signature: {:?}",
        d.signatures
    );
    assert_eq!(d.partitions.len(), 2);
    let p1 = &d.partitions[0];
    assert_eq!(p1.number, 1);
    assert_eq!(p1.path, loop_disk.partition(1));
    assert_eq!((p1.start_bytes, p1.size_bytes), (MIB, 32 * MIB));
    assert_eq!(p1.type_id.as_deref(), Some(kv_type.as_str()));
    assert_eq!(p1.name.as_deref(), Some("kvstrap-a"));
    assert_eq!(
        p1.part_uuid.as_deref(),
        Some("5a0c7d2e-3b8f-4b61-8f0d-000000000001")
    );
    assert!(p1.in_kernel);
    // udev's name for the partition, where udev named it (loop partitions get no udev
    // events on most test machines, and then it is false).
    assert_eq!(
        p1.by_partuuid,
        std::fs::canonicalize("/dev/disk/by-partuuid/5a0c7d2e-3b8f-4b61-8f0d-000000000001")
            .ok()
            .as_ref()
            == Some(&p1.path)
    );
    assert_eq!(p1.signatures.len(), 1);
    assert_eq!(p1.signatures[0].kind, "ext4");
    assert_eq!(p1.signatures[0].label.as_deref(), Some("part1"));
    let p2 = &d.partitions[1];
    assert_eq!(
        p2.type_id.as_deref(),
        Some("0fc63daf-8483-4772-8e79-3d69d8477de4")
    );
    assert_eq!((p2.start_bytes, p2.size_bytes), (33 * MIB, 16 * MIB));
    assert!(p2.signatures.is_empty());
    assert_eq!(d.in_use, vec![]);
}

#[test]
fn partitions_without_device_nodes_are_still_probed() {
    if !common::require_root("partitions_without_nodes") {
        return;
    }
    let loop_disk = LoopDisk::new(64 * MIB);
    // The kernel read no table at attach time, and nobody tells it about this one.
    loop_disk.run("sgdisk", &["-n1:1MiB:+40MiB", "-t1:8300"]);
    // An ext4 filesystem written into the partition's range through the whole disk.
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(40 * MIB).unwrap();
    common::run_on("mkfs.ext4", &["-q", "-F", "-L", "nonode"], image.path());
    let dd = Command::new("dd")
        .arg(format!("if={}", image.path().display()))
        .arg(format!("of={}", loop_disk.path.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,fsync", "status=none"])
        .status()
        .unwrap();
    assert!(dd.success());
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert_eq!(d.partitions.len(), 1);
    let p = &d.partitions[0];
    assert!(!p.in_kernel);
    assert_eq!(p.path, loop_disk.partition(1));
    assert_eq!((p.start_bytes, p.size_bytes), (MIB, 40 * MIB));
    assert_eq!(p.signatures.len(), 1, "{:?}", p.signatures);
    assert_eq!(p.signatures[0].label.as_deref(), Some("nonode"));
}

#[test]
fn dos_partition_table() {
    if !common::require_root("dos_partition_table") {
        return;
    }
    let loop_disk = LoopDisk::new(32 * MIB);
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--label", "dos"])
        .arg(&loop_disk.path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label-id: 0x1234abcd\nstart=2048, size=20480, type=83\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    let table = d.partition_table.as_ref().expect("table");
    assert_eq!(
        (table.kind.as_str(), table.uuid.as_deref()),
        ("dos", Some("1234abcd"))
    );
    assert_eq!(d.partitions[0].type_id.as_deref(), Some("0x83"));
    assert_eq!(
        (d.partitions[0].start_bytes, d.partitions[0].size_bytes),
        (MIB, 10 * MIB)
    );
    assert_eq!(
        d.partitions[0].part_uuid, None,
        "dos has no partition GUIDs"
    );
}

#[test]
fn lvm_and_luks_signatures() {
    if !common::require_root("lvm_and_luks_signatures") {
        return;
    }
    let pv = LoopDisk::new(32 * MIB);
    // No udev here: tell LVM not to wait for it.
    pv.run(
        "pvcreate",
        &[
            "-q",
            "--config",
            "devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 }",
        ],
    );
    let luks = LoopDisk::new(32 * MIB);
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), b"kvstrap test key, never used for data").unwrap();
    let key_file = key.path().display().to_string();
    luks.run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            &key_file,
        ],
    );
    let inv = scan_machine();
    let pv_disk = find(&inv, &pv);
    assert_eq!(kinds(pv_disk), vec!["LVM2_member"]);
    assert_eq!(pv_disk.signatures[0].usage.as_deref(), Some("raid"));
    let luks_disk = find(&inv, &luks);
    assert!(!luks_disk.signatures.is_empty());
    assert!(luks_disk
        .signatures
        .iter()
        .all(|s| s.kind == "crypto_LUKS" && s.usage.as_deref() == Some("crypto")));
    assert_eq!(
        pv_disk.in_use,
        vec![],
        "an inactive PV is not empty, but not in use either"
    );
}

#[test]
fn mounted_partition_is_mounted_and_not_busy() {
    if !common::require_root("mounted_partition") {
        return;
    }
    let loop_disk = LoopDisk::new(64 * MIB);
    loop_disk.run("sgdisk", &["-n1:1MiB:0"]);
    loop_disk.run("partx", &["-a"]);
    let part = loop_disk.partition(1);
    common::run_on("mkfs.ext4", &["-q", "-F"], &part);
    let mnt = tempfile::tempdir().unwrap();
    let target = mnt.path().join("with space");
    std::fs::create_dir(&target).unwrap();
    let status = Command::new("mount")
        .arg(&part)
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert_eq!(d.partitions[0].mountpoints, vec![target.clone()]);
    assert_eq!(
        d.in_use,
        vec![InUse::Mounted {
            mountpoint: target.clone()
        }]
    );

    // Below a managed root the mount is kvstrap's own: not a reason to refuse.
    let managed = scan(&ScanOptions {
        managed_roots: vec![mnt.path().to_path_buf()],
        ..Default::default()
    })
    .unwrap();
    let d = managed
        .disks
        .iter()
        .find(|d| d.path == loop_disk.path)
        .unwrap();
    assert_eq!(d.in_use, vec![]);
    assert!(matches!(
        managed.paths.get(&target),
        Some(kvstrap::model::PathFacts::Directory { .. })
    ));
    common::unmount_all_from(&loop_disk.path);
}

#[test]
fn active_swap_is_swap() {
    if !common::require_root("active_swap") {
        return;
    }
    let loop_disk = LoopDisk::new(32 * MIB);
    loop_disk.run("mkswap", &[]);
    if !Command::new("swapon")
        .arg(&loop_disk.path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!("skipping active_swap: swapon is not permitted here");
        return;
    }
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert!(d.swap);
    assert_eq!(
        d.in_use,
        vec![InUse::Swap {
            device: loop_disk.path.clone()
        }]
    );
}

#[test]
fn exclusive_holder_makes_disk_busy() {
    if !common::require_root("exclusive_holder") {
        return;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let loop_disk = LoopDisk::new(16 * MIB);
    let _held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&loop_disk.path)
        .unwrap();
    let inv = scan_machine();
    let d = find(&inv, &loop_disk);
    assert!(
        matches!(d.in_use.as_slice(), [InUse::Busy { .. }]),
        "{:?}",
        d.in_use
    );
}

#[test]
fn system_disk_is_listed_and_scan_does_not_fail() {
    if !common::require_root("system_disk") {
        return;
    }
    let inv = scan_machine();
    // Whatever disk holds `/` directly must be reported as the system disk.
    let root: &Path = Path::new("/");
    for d in &inv.disks {
        let holds_root = d
            .mountpoints
            .iter()
            .chain(d.partitions.iter().flat_map(|p| &p.mountpoints))
            .any(|m| m == root);
        if holds_root {
            assert!(
                d.in_use
                    .iter()
                    .any(|r| matches!(r, InUse::SystemDisk { .. })),
                "{}: {:?}",
                d.name,
                d.in_use
            );
        }
    }
    if Path::new("/sys/block/vda").exists() {
        let vda = inv
            .disks
            .iter()
            .find(|d| d.name == "vda")
            .expect("vda listed");
        assert!(vda.size_bytes > 0);
        assert_eq!(vda.transport, "virtio");
        assert!(
            matches!(vda.in_use.first(), Some(InUse::SystemDisk { .. })),
            "{:?}",
            vda.in_use
        );
    }
}

#[test]
fn disks_are_in_natural_order() {
    if !common::require_root("natural_order") {
        return;
    }
    let _a = LoopDisk::new(MIB);
    let inv = scan_machine();
    let names: Vec<&str> = inv.disks.iter().map(|d| d.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| kvstrap::inventory::natural_cmp(a, b));
    assert_eq!(names, sorted);
}

#[test]
fn managed_directories_report_project_id_and_quota() {
    if !common::require_root("project_quota") {
        return;
    }
    let loop_disk = LoopDisk::new(320 * MIB);
    loop_disk.run("mkfs.xfs", &["-q", "-f"]);
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("xfs");
    std::fs::create_dir(&mnt).unwrap();
    // Kernels without quota support refuse prjquota: the project id is still there.
    let with_quota = Command::new("mount")
        .args(["-o", "prjquota"])
        .arg(&loop_disk.path)
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !with_quota {
        eprintln!("project_quota: no quota support in this kernel; checking project ids only");
        assert!(Command::new("mount")
            .arg(&loop_disk.path)
            .arg(&mnt)
            .status()
            .unwrap()
            .success());
    }
    let vol = mnt.join("vol-01");
    std::fs::create_dir(&vol).unwrap();
    std::os::unix::fs::symlink("/dev/null", mnt.join("link")).unwrap();
    let xfs_io = Command::new("xfs_io")
        .args(["-c", "chproj 42"])
        .arg(&vol)
        .output()
        .unwrap();
    assert!(
        xfs_io.status.success(),
        "xfs_io chproj: {}",
        String::from_utf8_lossy(&xfs_io.stderr)
    );
    if with_quota {
        let out = Command::new("xfs_quota")
            .args(["-x", "-c", "limit -p bhard=10m 42"])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "xfs_quota: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let inv = scan(&ScanOptions {
        managed_roots: vec![root.path().to_path_buf()],
        ..Default::default()
    })
    .unwrap();
    let devno = find(&inv, &loop_disk).devno.clone();
    use kvstrap::model::PathFacts;
    match &inv.paths[&vol] {
        PathFacts::Directory {
            project_id,
            quota_bytes,
            devno: d,
            mode,
            ..
        } => {
            assert_eq!(*project_id, Some(42));
            assert_eq!(*quota_bytes, with_quota.then_some(10 * MIB));
            assert_eq!(*d, devno);
            assert_eq!(*mode, 0o755);
        }
        other => panic!("{other:?}"),
    }
    match &inv.paths[&mnt] {
        PathFacts::Directory {
            project_id,
            quota_bytes,
            ..
        } => assert_eq!((*project_id, *quota_bytes), (Some(0), None)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        inv.paths[&mnt.join("link")],
        PathFacts::Symlink {
            target: "/dev/null".into()
        }
    );
    common::unmount_all_from(&loop_disk.path);
}
