//! Root tests of `kvstrap apply` on loop devices the tests create: layouts, idempotency,
//! foreign disks left byte for byte, quotas, interrupted runs, concurrent appliers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, Node};
use common::{require_root, LoopDisk};
use kvstrap::model::FsType;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

/// Why this kernel cannot enforce project quotas on `fs`, if it cannot.
fn quota_unsupported(fs: FsType) -> Option<String> {
    match kvstrap::host::quota::kernel_support(fs) {
        kvstrap::host::quota::QuotaSupport::Unsupported(why) => Some(why),
        _ => None,
    }
}

fn blkid(dev: &Path, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn mount_source(mountpoint: &Path) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (Path::new(pre.split_whitespace().nth(4)?) == mountpoint)
                .then(|| post.split_whitespace().nth(1).map(String::from))?
        })
}

fn steps(plan: &Value) -> usize {
    plan["steps"].as_array().map(Vec::len).unwrap_or(usize::MAX)
}

#[test]
fn shared_separate_and_block_layouts_match_the_plan() {
    if !require_root("shared_separate_and_block_layouts_match_the_plan") {
        return;
    }
    let shared = LoopDisk::new(1024 * MIB);
    let separate = LoopDisk::new(1024 * MIB);
    let block = LoopDisk::new(256 * MIB);
    let node = Node::new(&format!(
        "{}{}{}{}{}{}",
        class("fast", "xfs", "Filesystem"),
        class("ext", "ext4", "Filesystem"),
        class("raw", "xfs", "Block"),
        group("shared", "fast", "shared", &[&shared], "volume_count = 4"),
        group("sep", "ext", "separate", &[&separate], "volume_count = 3"),
        group("raw", "raw", "separate", &[&block], "volume_count = 2"),
    ));
    let report = node.apply_ok();
    assert_eq!(report["failed"], 0, "{report:#}");
    let vols = node.volumes();
    assert_eq!(vols.len(), 9, "{vols:#?}");
    for v in &vols {
        assert_eq!(v["state"], "ready", "{v}");
        let path = PathBuf::from(v["path"].as_str().unwrap());
        match v["volume_mode"].as_str().unwrap() {
            "Filesystem" => {
                let meta = std::fs::metadata(&path).unwrap();
                assert!(meta.is_dir());
                assert_eq!(
                    (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
                    (107, 107, 0o750),
                    "{}",
                    path.display()
                );
                // What is published must be storable.
                let stat = nix::sys::statvfs::statvfs(&path).unwrap();
                let free = stat.blocks_available() * stat.fragment_size();
                assert!(
                    v["capacity_bytes"].as_u64().unwrap() <= free,
                    "{v}: only {free} free"
                );
            }
            _ => {
                let target = std::fs::read_link(&path).unwrap();
                assert!(
                    target
                        .to_string_lossy()
                        .starts_with(&block.path.display().to_string()),
                    "{}",
                    target.display()
                );
                assert!(std::fs::metadata(&path)
                    .unwrap()
                    .file_type()
                    .is_block_device_like());
            }
        }
    }
    // Shared: one xfs mounted by UUID with prjquota; separate: ext4 per volume.
    assert_eq!(blkid(&shared.partition(1), "TYPE"), "xfs");
    assert_eq!(blkid(&separate.partition(3), "TYPE"), "ext4");
    assert_eq!(
        blkid(&block.partition(1), "TYPE"),
        "",
        "block volumes stay raw"
    );
    let sep_mounts = vols.iter().filter(|v| v["storage_class"] == "ext").count();
    assert_eq!(sep_mounts, 3);
    for v in vols.iter().filter(|v| v["storage_class"] == "ext") {
        let path = PathBuf::from(v["path"].as_str().unwrap());
        assert!(
            mount_source(&path)
                .is_some_and(|s| s.starts_with(&separate.path.display().to_string())),
            "{}",
            path.display()
        );
    }
}

trait BlockLike {
    fn is_block_device_like(&self) -> bool;
}
impl BlockLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_block_device(self)
    }
}

#[test]
fn applying_twice_changes_nothing() {
    if !require_root("applying_twice_changes_nothing") {
        return;
    }
    let disk = LoopDisk::new(1024 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("fast", "xfs", "Filesystem"),
        group("g", "fast", "shared", &[&disk], "volume_count = 2")
    ));
    node.apply_ok();
    let ptuuid = blkid(&disk.path, "PTUUID");
    let fsuuid = blkid(&disk.partition(1), "UUID");
    let vol = PathBuf::from(node.volumes()[0]["path"].as_str().unwrap().to_string());
    std::fs::write(vol.join("vm-disk.img"), b"precious").unwrap();
    assert_eq!(
        steps(&node.plan()),
        0,
        "second plan must be empty: {:#}",
        node.plan()
    );
    let second = node.apply_ok();
    assert_eq!(
        second["steps"].as_array().map(Vec::len),
        Some(0),
        "{second:#}"
    );
    assert_eq!(blkid(&disk.path, "PTUUID"), ptuuid);
    assert_eq!(blkid(&disk.partition(1), "UUID"), fsuuid);
    assert_eq!(std::fs::read(vol.join("vm-disk.img")).unwrap(), b"precious");
}

#[test]
fn directory_volumes_cannot_grow_past_their_quota() {
    if !require_root("directory_volumes_cannot_grow_past_their_quota") {
        return;
    }
    for (fs, fs_type) in [("xfs", FsType::Xfs), ("ext4", FsType::Ext4)] {
        let disk = LoopDisk::new(512 * MIB);
        let body = format!(
            "{}{}",
            class("c", fs, "Filesystem"),
            group("g", "c", "shared", &[&disk], "volume_size = \"32Mi\"")
        )
        .replace("quota = \"if-supported\"", "quota = \"required\"");
        let node = Node::new(&body);
        if let Some(why) = quota_unsupported(fs_type) {
            // Without kernel quotas the default policy refuses rather than over-promise.
            let plan = node.plan();
            assert_eq!(steps(&plan), 0, "{fs}: {plan:#}");
            let reason = plan["refused"][0]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                reason.contains("cannot enforce project quotas"),
                "{fs}: {plan:#}"
            );
            eprintln!("skipping the {fs} quota write test: {why}");
            continue;
        }
        node.apply_ok();
        let vols = node.volumes();
        assert!(vols.len() >= 2, "{fs}: {vols:?}");
        let path = PathBuf::from(vols[0]["path"].as_str().unwrap());
        assert_eq!(vols[0]["capacity_bytes"], 32 * MIB);
        // qemu writes as uid 107; root could bypass ext4 quotas with CAP_SYS_RESOURCE.
        let out = Command::new("setpriv")
            .args([
                "--reuid=107",
                "--regid=107",
                "--clear-groups",
                "dd",
                "if=/dev/zero",
                "bs=1M",
                "count=64",
                "conv=fsync",
            ])
            .arg(format!("of={}", path.join("fill").display()))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{fs}: writing 64 MiB into a 32 MiB volume must fail"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("quota") || err.contains("No space"),
            "{fs}: {err}"
        );
        let written = std::fs::metadata(path.join("fill"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(written <= 32 * MIB, "{fs}: {written} bytes written");
    }
}

/// An md v1.2 superblock with a valid checksum: there is no md driver here to make one.
fn write_md_superblock(dev: &Path) {
    let mut sb = vec![0u8; 256 + 2 * 4];
    let put32 =
        |sb: &mut Vec<u8>, off: usize, v: u32| sb[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut sb, 0, 0xa92b_4efc); // magic
    put32(&mut sb, 4, 1); // major version
    sb[16..32].copy_from_slice(&[0x42; 16]); // set uuid
    sb[32..38].copy_from_slice(b"test:0");
    put32(&mut sb, 72, 1); // level raid1
    put32(&mut sb, 76, 0); // layout
    sb[80..88].copy_from_slice(&(100_000u64).to_le_bytes()); // size
    put32(&mut sb, 92, 2); // raid_disks
    sb[128..136].copy_from_slice(&(2048u64).to_le_bytes()); // data_offset
    sb[136..144].copy_from_slice(&(100_000u64).to_le_bytes()); // data_size
    sb[144..152].copy_from_slice(&(8u64).to_le_bytes()); // super_offset (sectors)
    put32(&mut sb, 220, 2); // max_dev
    let mut sum: u64 = 0;
    for chunk in sb.chunks(4) {
        sum += u64::from(u32::from_le_bytes(chunk.try_into().unwrap()));
    }
    let csum = u32::try_from((sum & 0xffff_ffff) + (sum >> 32)).unwrap_or(u32::MAX);
    put32(&mut sb, 216, csum);
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&sb).unwrap();
    f.sync_all().unwrap();
}

/// sha256sum is much faster than a debug build of the sha2 crate.
fn sha256_of(path: &Path) -> Vec<u8> {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    out.stdout.split(|b| *b == b' ').next().unwrap().to_vec()
}

#[test]
fn foreign_disks_survive_byte_for_byte() {
    if !require_root("foreign_disks_survive_byte_for_byte") {
        return;
    }
    let run = |prog: &str, args: &[&str], dev: &Path| common::run_on(prog, args, dev);
    let ext4 = LoopDisk::new(64 * MIB);
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("vm-image.qcow2"), vec![7u8; 1 << 20]).unwrap();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-d", data.path().to_str().unwrap()],
        &ext4.path,
    );
    let xfs = LoopDisk::new(320 * MIB);
    run("mkfs.xfs", &["-q", "-f"], &xfs.path);
    let swap = LoopDisk::new(64 * MIB);
    run("mkswap", &[], &swap.path);
    let mbr = LoopDisk::new(64 * MIB);
    let sfdisk = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo 'label: dos\n,32M,83' | sfdisk -q {}",
            mbr.path.display()
        ))
        .status()
        .unwrap();
    assert!(sfdisk.success());
    let gpt = LoopDisk::new(64 * MIB);
    run("sgdisk", &["-n", "1:0:+16M", "-n", "2:0:+16M"], &gpt.path);
    let lvm = LoopDisk::new(64 * MIB);
    run("pvcreate", &["-q", "-y", "-f"], &lvm.path);
    let md = LoopDisk::new(64 * MIB);
    write_md_superblock(&md.path);
    let luks = LoopDisk::new(64 * MIB);
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), b"not-a-secret").unwrap();
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key.path().to_str().unwrap(),
        ],
        &luks.path,
    );
    let all = [&ext4, &xfs, &swap, &mbr, &gpt, &lvm, &md, &luks];
    let expected = [
        "ext4",
        "xfs",
        "swap",
        "dos",
        "gpt",
        "LVM2_member",
        "linux_raid_member",
        "crypto_LUKS",
    ];
    // The test is only worth something if every disk really carries its signature.
    for (disk, sig) in all.iter().zip(expected) {
        let found = format!(
            "{} {}",
            blkid(&disk.path, "TYPE"),
            blkid(&disk.path, "PTTYPE")
        );
        assert!(
            found.contains(sig),
            "setup: {} should carry {sig}, blkid says {found:?}",
            disk.path.display()
        );
    }
    let before: Vec<Vec<u8>> = all.iter().map(|d| sha256_of(&d.backing)).collect();
    let node = Node::new(&format!(
        "{}{}",
        class("c", "ext4", "Filesystem"),
        group("g", "c", "shared", &all, "")
    ));
    let report = node.apply_ok();
    assert_eq!(report["changed"], 0, "{report:#}");
    let refused = report["refused"].as_array().unwrap();
    for (disk, sig) in all.iter().zip(expected) {
        let r = refused
            .iter()
            .find(|r| r["disk"] == disk.path.display().to_string());
        assert!(
            r.is_some_and(|r| r["reason"].as_str().unwrap_or("").contains(sig)),
            "{sig}: {refused:#?}"
        );
    }
    // Drop kernel caches of the loop devices so the hash reads what is really there.
    let after: Vec<Vec<u8>> = all.iter().map(|d| sha256_of(&d.backing)).collect();
    assert_eq!(before, after, "every foreign disk must be untouched");
}

#[test]
fn interrupted_runs_converge_without_formatting_twice() {
    if !require_root("interrupted_runs_converge_without_formatting_twice") {
        return;
    }
    for failpoint in [
        "write_partition_table",
        "make_filesystem",
        "mount",
        "create_directory",
        "set_quota",
        "link_block_device",
    ] {
        let fs_disk = LoopDisk::new(640 * MIB);
        let raw_disk = LoopDisk::new(64 * MIB);
        let node = Node::new(&format!(
            "{}{}{}{}",
            class("c", "xfs", "Filesystem"),
            class("raw", "xfs", "Block"),
            group("g", "c", "shared", &[&fs_disk], "volume_count = 2"),
            group("r", "raw", "separate", &[&raw_disk], "volume_count = 2"),
        ));
        let planned = node.plan();
        let reached = planned["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["action"] == failpoint);
        if !reached {
            // Only the quota step can be missing, and only on a kernel without project
            // quotas (this CI machine's). Its kill points run in tests/vm/quota-in-vm.sh,
            // which scripts/test.sh runs: killed at quota_project_set (project id set, no
            // limit yet), then an apply whose limits must hold and an empty plan.
            assert_eq!(failpoint, "set_quota", "{planned:#}");
            assert!(quota_unsupported(FsType::Xfs).is_some(), "{planned:#}");
            eprintln!(
                "set_quota: no quota step on this kernel; the kill inside the quota step is \
                 tests/vm/quota-in-vm.sh's"
            );
            continue;
        }
        let crashed = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", failpoint)]);
        assert_eq!(
            crashed.status.code(),
            Some(137),
            "{failpoint}: {}",
            String::from_utf8_lossy(&crashed.stderr)
        );
        // Disks run in parallel: a crash on the raw disk may land while mkfs runs on the
        // other one. Only a filesystem whose mkfs finished (planned label written) must
        // never be made again; one left under the in-progress label must be.
        let part = fs_disk.partition(1);
        let finished_before =
            !blkid(&part, "UUID").is_empty() && blkid(&part, "LABEL") != "kvs-mkfs";
        let report = node.apply_ok();
        let mkfs_again: Vec<&Value> = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["action"] == "make_filesystem")
            .collect();
        assert!(
            mkfs_again.is_empty() || !finished_before,
            "{failpoint}: a finished filesystem was formatted twice: {report:#}"
        );
        assert_ne!(
            blkid(&part, "LABEL"),
            "kvs-mkfs",
            "{failpoint}: the in-progress label survived a full run: {report:#}"
        );
        assert_eq!(report["failed"], 0, "{failpoint}: {report:#}");
        assert_eq!(
            steps(&node.plan()),
            0,
            "{failpoint}: not converged: {:#}",
            node.plan()
        );
        assert!(node.volumes().iter().all(|v| v["state"] == "ready"));
    }
}

#[test]
fn two_appliers_at_once_do_not_collide() {
    if !require_root("two_appliers_at_once_do_not_collide") {
        return;
    }
    let a = LoopDisk::new(512 * MIB);
    let b = LoopDisk::new(512 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("c", "xfs", "Filesystem"),
        group("g", "c", "shared", &[&a, &b], "volume_count = 2")
    ));
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("--policy")
            .arg(node.dir.path().join("policy.toml"))
            .arg("--state-dir")
            .arg(node.state());
        cmd.args(["apply", "-o", "json"])
            .env("KVSTRAP_LOCK", node.dir.path().join("lock"));
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let changed = |o: &Output| {
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["changed"]
            .as_u64()
            .unwrap()
    };
    assert!(
        changed(&first) == 0 || changed(&second) == 0,
        "the second applier found the work done"
    );
    assert_eq!(steps(&node.plan()), 0);
}

/// The make_filesystem steps of a plan, with their reasons.
fn mkfs_steps(plan: &Value) -> Vec<Value> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "make_filesystem")
        .cloned()
        .collect()
}

#[test]
fn a_filesystem_whose_mkfs_did_not_finish_is_made_again_never_adopted() {
    if !require_root("a_filesystem_whose_mkfs_did_not_finish_is_made_again_never_adopted") {
        return;
    }
    for fs in ["xfs", "ext4"] {
        let disk = LoopDisk::new(640 * MIB);
        let node = Node::new(&format!(
            "{}{}",
            class("c", fs, "Filesystem"),
            group("g", "c", "separate", &[&disk], "volume_count = 1"),
        ));
        // Killed after mkfs wrote the filesystem, before the planned label marked it complete.
        let crashed = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", "mkfs_unfinished")]);
        assert_eq!(crashed.status.code(), Some(137), "{fs}");
        assert_eq!(blkid(&disk.partition(1), "LABEL"), "kvs-mkfs", "{fs}");
        let plan = node.plan();
        let mkfs = mkfs_steps(&plan);
        assert_eq!(mkfs.len(), 1, "{fs}: {plan:#}");
        assert_eq!(mkfs[0]["reason"], "an earlier mkfs did not finish", "{fs}");
        let report = node.apply_ok();
        assert_eq!(report["failed"], 0, "{fs}: {report:#}");
        assert_eq!(blkid(&disk.partition(1), "LABEL"), mkfs[0]["label"], "{fs}");
        assert_eq!(steps(&node.plan()), 0, "{fs}");
        assert!(node.volumes().iter().all(|v| v["state"] == "ready"));
    }
}

#[test]
fn an_xfs_superblock_left_in_progress_is_made_again() {
    if !require_root("an_xfs_superblock_left_in_progress_is_made_again") {
        return;
    }
    let disk = LoopDisk::new(640 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("c", "xfs", "Filesystem"),
        group("g", "c", "separate", &[&disk], "volume_count = 1"),
    ));
    let planned = mkfs_steps(&node.plan()).remove(0);
    // The GPT is there, then a mkfs.xfs with the planned UUID and label (what a version
    // that labelled at mkfs time made) killed before it cleared sb_inprogress.
    let crashed = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", "sync_partitions")]);
    assert_eq!(crashed.status.code(), Some(137));
    let part = disk.partition(1);
    let uuid = format!("uuid={}", planned["uuid"].as_str().unwrap());
    let label = planned["label"].as_str().unwrap();
    common::run_on("mkfs.xfs", &["-q", "-f", "-m", &uuid, "-L", label], &part);
    common::run_on(
        "xfs_db",
        &["-x", "-c", "sb 0", "-c", "write -d inprogress 1"],
        &part,
    );
    // libblkid still reports the planned TYPE, UUID and LABEL; kvstrap must not adopt it.
    assert_eq!(blkid(&part, "LABEL"), label);
    let plan = node.plan();
    let mkfs = mkfs_steps(&plan);
    assert_eq!(mkfs.len(), 1, "{plan:#}");
    assert_eq!(mkfs[0]["reason"], "an earlier mkfs did not finish");
    let report = node.apply_ok();
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(steps(&node.plan()), 0);
    assert!(node.volumes().iter().all(|v| v["state"] == "ready"));
}

#[test]
fn a_block_link_is_never_pointed_at_another_disks_partition() {
    if !require_root("a_block_link_is_never_pointed_at_another_disks_partition") {
        return;
    }
    use kvstrap::apply::effects::Effects;
    let a = LoopDisk::new(64 * MIB);
    let b = LoopDisk::new(64 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("raw", "xfs", "Block"),
        group("r", "raw", "separate", &[&a, &b], "volume_count = 1"),
    ));
    let plan = node.plan();
    let link_of_a = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "link_block_device" && s["disk"] == a.path.display().to_string())
        .cloned()
        .unwrap();
    node.apply_ok();
    let part_uuid: uuid::Uuid = link_of_a["part_uuid"].as_str().unwrap().parse().unwrap();
    let fx = kvstrap::apply::host_effects::HostEffects::new(&node.state()).unwrap();
    let link = node.dir.path().join("a-link");
    // After a reboot that swapped kernel names, "a's partition" could be b's node.
    let err = fx
        .link_block_device(&a.path, &link, &b.partition(1), &part_uuid, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not its partition 1"), "{err}");
    assert!(std::fs::symlink_metadata(&link).is_err(), "no link made");
    // Its own partition is accepted.
    fx.link_block_device(&a.path, &link, &a.partition(1), &part_uuid, None)
        .unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), a.partition(1));
}

#[test]
fn logs_off_a_terminal_carry_no_colour_codes_and_a_refused_disk_is_named() {
    if !require_root("logs_off_a_terminal_carry_no_colour_codes_and_a_refused_disk_is_named") {
        return;
    }
    let foreign = LoopDisk::new(64 * MIB);
    common::run_on("mkfs.ext4", &["-q", "-F"], &foreign.path);
    let node = Node::new(&format!(
        "{}{}",
        class("c", "ext4", "Filesystem"),
        group("g", "c", "separate", &[&foreign], "volume_count = 1"),
    ));
    // stderr is a pipe here, as it is for a file or the journal's stream.
    let out = node.kvstrap(&["apply"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("left alone"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI codes in a log: {stderr:?}"
    );
    // Nothing to do, but the node does not match: the sentence says so.
    assert!(!stdout.contains("matches the policy"), "{stdout}");
    assert!(
        stdout.contains("1 selected disk(s) refused") && stdout.contains("not empty: ext4"),
        "{stdout}"
    );
}

/// Type, UUID and label of a device as libblkid sees it now.
fn fs_of(dev: &Path) -> (String, String, String) {
    (blkid(dev, "TYPE"), blkid(dev, "UUID"), blkid(dev, "LABEL"))
}

/// A filesystem whose mkfs finished: kvstrap wrote its planned label over `kvs-mkfs`.
fn is_complete(dev: &Path) -> bool {
    let (_, uuid, label) = fs_of(dev);
    !uuid.is_empty() && !label.is_empty() && label != "kvs-mkfs"
}

/// Kills inside a step, where the step had done part of its writes: between the backup and
/// the primary GPT header (a torn table: `gpt_backup_written`), and between the BLKPG adds
/// of a disk's partitions (`partition_added`). The next run finishes the step.
#[test]
fn a_kill_inside_the_gpt_write_or_between_partition_adds_converges() {
    if !require_root("a_kill_inside_the_gpt_write_or_between_partition_adds_converges") {
        return;
    }
    for failpoint in ["gpt_backup_written", "partition_added"] {
        let disk = LoopDisk::new(256 * MIB);
        let node = Node::new(&format!(
            "{}{}",
            class("c", "ext4", "Filesystem"),
            group("g", "c", "separate", &[&disk], "volume_count = 2"),
        ));
        let crashed = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", failpoint)]);
        assert_eq!(
            crashed.status.code(),
            Some(137),
            "{failpoint}: {}",
            String::from_utf8_lossy(&crashed.stderr)
        );
        let kernel = kvstrap::host::blkpg::kernel_partitions(&disk.path).unwrap();
        match failpoint {
            // One valid header only: the table does not read back as complete.
            "gpt_backup_written" => {
                assert_eq!(
                    kvstrap::host::gpt::read_partition_table(&disk.path).unwrap(),
                    None
                );
                assert!(kernel.is_empty(), "{kernel:?}");
            }
            // The first partition is in the kernel, the second is not.
            _ => assert_eq!(kernel.len(), 1, "{kernel:?}"),
        }
        let report = node.apply_ok();
        assert_eq!(report["failed"], 0, "{failpoint}: {report:#}");
        assert_eq!(steps(&node.plan()), 0, "{failpoint}: {:#}", node.plan());
        let volumes = node.volumes();
        assert_eq!(volumes.len(), 2, "{failpoint}");
        assert!(volumes.iter().all(|v| v["state"] == "ready"), "{failpoint}");
    }
}

/// Crash, crash again at a later point, and so on, then converge: a filesystem whose mkfs
/// finished keeps its UUID through every later crash and is never made again, and data
/// written into a volume between two crashes is still there at the end.
#[test]
fn repeated_crashes_at_different_points_then_converge() {
    if !require_root("repeated_crashes_at_different_points_then_converge") {
        return;
    }
    let xfs_disk = LoopDisk::new(640 * MIB);
    let ext_disk = LoopDisk::new(256 * MIB);
    let raw_disk = LoopDisk::new(64 * MIB);
    let node = Node::new(&format!(
        "{}{}{}{}{}{}",
        class("x", "xfs", "Filesystem"),
        class("e", "ext4", "Filesystem"),
        class("raw", "xfs", "Block"),
        group("gx", "x", "shared", &[&xfs_disk], "volume_count = 2"),
        group("ge", "e", "separate", &[&ext_disk], "volume_count = 2"),
        group("gr", "raw", "separate", &[&raw_disk], "volume_count = 2"),
    ));
    let filesystems = [
        xfs_disk.partition(1),
        ext_disk.partition(1),
        ext_disk.partition(2),
    ];
    let mut complete: std::collections::BTreeMap<PathBuf, (String, String, String)> =
        Default::default();
    let mut marker: Option<PathBuf> = None;
    let mut crashes = 0;
    for failpoint in [
        "gpt_backup_written",
        "partition_added",
        "mkfs_unfinished",
        "make_filesystem",
        "mount",
        "create_directory",
        "link_block_device",
    ] {
        let run = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", failpoint)]);
        let code = run.status.code();
        // A failpoint that no step reached any more lets the run finish.
        assert!(
            code == Some(137) || code == Some(0),
            "{failpoint}: {code:?} {}",
            String::from_utf8_lossy(&run.stderr)
        );
        crashes += usize::from(code == Some(137));
        for dev in &filesystems {
            if let Some(before) = complete.get(dev) {
                assert_eq!(
                    &fs_of(dev),
                    before,
                    "{failpoint}: a finished filesystem changed"
                );
            } else if is_complete(dev) {
                complete.insert(dev.clone(), fs_of(dev));
            }
        }
        // Once a volume directory exists on a mounted filesystem, write data into it:
        // every later crash and the final run must leave it as it is.
        if marker.is_none() {
            // On a kvstrap filesystem, not on the directory below the storage root.
            let root_dev = std::fs::metadata(node.root()).map(|m| m.dev()).ok();
            let mounted = node
                .volumes()
                .into_iter()
                .filter(|v| v["volume_mode"] == "Filesystem")
                .filter_map(|v| v["path"].as_str().map(PathBuf::from))
                .find(|p| {
                    let dev = std::fs::metadata(p).map(|m| m.dev()).ok();
                    dev.is_some() && root_dev.is_some() && dev != root_dev
                });
            if let Some(dir) = mounted {
                let file = dir.join("vm-disk.img");
                std::fs::write(&file, format!("written after {failpoint}")).unwrap();
                nix::unistd::sync();
                marker = Some(file);
            }
        }
    }
    assert!(crashes >= 5, "only {crashes} of the runs crashed");
    let report = node.apply_ok();
    assert_eq!(report["failed"], 0, "{report:#}");
    for s in report["steps"].as_array().unwrap() {
        if s["action"] == "make_filesystem" {
            let dev = PathBuf::from(s["device"].as_str().unwrap());
            assert!(
                !complete.contains_key(&dev),
                "a finished filesystem was made again: {s:#}"
            );
        }
    }
    for (dev, before) in &complete {
        assert_eq!(&fs_of(dev), before, "{}", dev.display());
    }
    let marker = marker.expect("a volume was mounted before the last crash");
    assert!(
        std::fs::read_to_string(&marker)
            .unwrap()
            .starts_with("written after "),
        "data written between two crashes is intact"
    );
    assert_eq!(steps(&node.plan()), 0, "{:#}", node.plan());
    let volumes = node.volumes();
    assert_eq!(volumes.len(), 6);
    assert!(
        volumes.iter().all(|v| v["state"] == "ready"),
        "{volumes:#?}"
    );
}

/// A real SIGKILL from outside, of kvstrap and of the mkfs it is waiting for (what a power
/// cut does), while mkfs.xfs or mkfs.ext4 runs; twice, then converge. Whatever mkfs left
/// (nothing, an xfs still `inprogress`, a filesystem under the `kvs-mkfs` label) is made
/// again; nothing is adopted half made.
#[test]
fn sigkill_during_mkfs_repeatedly_then_converge() {
    if !require_root("sigkill_during_mkfs_repeatedly_then_converge") {
        return;
    }
    let xfs_disk = LoopDisk::new(2048 * MIB);
    let ext_disk = LoopDisk::new(2048 * MIB);
    let node = Node::new(&format!(
        "{}{}{}{}",
        class("x", "xfs", "Filesystem"),
        class("e", "ext4", "Filesystem"),
        group("gx", "x", "separate", &[&xfs_disk], "volume_count = 1"),
        group("ge", "e", "separate", &[&ext_disk], "volume_count = 1"),
    ));
    let mut killed_in_mkfs = Vec::new();
    for _ in 0..3 {
        let mut child = node
            .command(&["apply"], &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let mut seen = None;
        while seen.is_none() && started.elapsed() < std::time::Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            seen = common::descendants(child.id())
                .into_iter()
                .filter_map(common::comm)
                .find(|c| c.starts_with("mkfs."));
        }
        let Some(program) = seen else {
            child.wait().unwrap();
            break;
        };
        common::kill_tree(child.id());
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed while {program} ran");
        killed_in_mkfs.push(program);
    }
    assert!(!killed_in_mkfs.is_empty(), "no kill landed while mkfs ran");
    eprintln!("killed during: {killed_in_mkfs:?}");
    let report = node.apply_ok();
    assert_eq!(report["failed"], 0, "{report:#}");
    for dev in [xfs_disk.partition(1), ext_disk.partition(1)] {
        assert!(is_complete(&dev), "{}: {:?}", dev.display(), fs_of(&dev));
    }
    assert_eq!(steps(&node.plan()), 0, "{:#}", node.plan());
    assert!(node.volumes().iter().all(|v| v["state"] == "ready"));
}

/// The layout the plan's `write_partition_table` step writes.
fn planned_layout(plan: &Value) -> kvstrap::model::DiskLayout {
    let step = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "write_partition_table")
        .unwrap_or_else(|| panic!("no partition table step: {plan:#}"));
    serde_json::from_value(step["layout"].clone()).unwrap()
}

fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, kvstrap::apply::ApplyError>,
    why: &str,
) -> String {
    let err = result.expect_err("the step must refuse").to_string();
    assert!(err.contains(why), "{err}");
    err
}

/// The executor re-checks each step against the machine right before it writes: a disk
/// that is not the one planned (identity changed) and a disk that got a signature after
/// the plan are refused, and not one byte of either disk changes.
#[test]
fn steps_refuse_a_disk_that_changed_since_the_plan_and_write_nothing() {
    if !require_root("steps_refuse_a_disk_that_changed_since_the_plan_and_write_nothing") {
        return;
    }
    use kvstrap::apply::effects::Effects;
    let disk = LoopDisk::new(64 * MIB);
    let other = LoopDisk::new(64 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("c", "ext4", "Filesystem"),
        group("g", "c", "separate", &[&disk], "volume_count = 1"),
    ));
    let layout = planned_layout(&node.plan());
    let fx = kvstrap::apply::host_effects::HostEffects::new(&node.state()).unwrap();

    // Identity: after the plan, the kernel name now belongs to another disk.
    let mut moved = layout.clone();
    moved.disk = other.path.clone();
    let before = sha256_of(&other.backing);
    assert_refused(fx.write_partition_table(&moved), "not the");
    assert_refused(fx.sync_partitions(&moved), "not the");
    assert_refused(fx.wipe_disk(&other.path, &layout.identity), "not the");
    assert_eq!(
        sha256_of(&other.backing),
        before,
        "the other disk is untouched"
    );
    assert!(kvstrap::host::blkpg::kernel_partitions(&other.path)
        .unwrap()
        .is_empty());

    // A signature appeared after the plan: a filesystem on the whole disk.
    common::run_on("mkfs.ext4", &["-q", "-F"], &disk.path);
    let before = sha256_of(&disk.backing);
    assert_refused(fx.write_partition_table(&layout), "it now carries ext4");
    assert_refused(fx.sync_partitions(&layout), "not the one planned");
    assert_eq!(
        sha256_of(&disk.backing),
        before,
        "the new filesystem is untouched"
    );

    // Another partition table appeared after the plan.
    common::run_on("wipefs", &["-a", "-q"], &disk.path);
    common::run_on("sgdisk", &["-o", "-n", "1:1M:+8M"], &disk.path);
    let before = sha256_of(&disk.backing);
    assert_refused(
        fx.write_partition_table(&layout),
        "a partition table appeared",
    );
    assert_refused(fx.sync_partitions(&layout), "not the one planned");
    assert_eq!(
        sha256_of(&disk.backing),
        before,
        "the new table is untouched"
    );

    // A signature appeared on a planned partition before its mkfs.
    common::run_on("wipefs", &["-a", "-q"], &disk.path);
    fx.write_partition_table(&layout).unwrap();
    let part = &layout.partitions[0].device;
    common::run_on("mkswap", &[], part);
    let before = sha256_of(&disk.backing);
    let uuid = uuid::Uuid::new_v4();
    let mkfs = fx.make_filesystem(part, FsType::Ext4, &uuid, "kvs-00000000", false);
    assert_refused(mkfs, "carries swap");
    assert_eq!(
        sha256_of(&disk.backing),
        before,
        "the swap area is untouched"
    );
}

#[test]
fn a_provisioned_volume_never_changes_kind_root() {
    if !require_root("a_provisioned_volume_never_changes_kind_root") {
        return;
    }
    let d = LoopDisk::new(256 * MIB);
    let classes = format!(
        "{}{}",
        class("raw", "ext4", "Block"),
        class("fs", "ext4", "Filesystem")
    );
    let node = Node::new(&format!(
        "{classes}{}",
        group("g", "raw", "separate", &[&d], "volume_count = 2")
    ));
    node.apply_ok();
    // The role is in the GPT itself: attribute bits 48-50 = 3 (raw Block volume), which
    // the inventory reads back and any GPT tool shows.
    let disks: Value =
        serde_json::from_slice(&node.kvstrap(&["disks", "-o", "json"], &[]).stdout).unwrap();
    let ours = disks["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["path"] == d.path.display().to_string())
        .unwrap();
    let roles: Vec<&str> = ours["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["role"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(roles, ["block", "block"], "{ours:#}");
    let sgdisk = Command::new("sgdisk")
        .arg("-i")
        .arg("1")
        .arg(&d.path)
        .output()
        .unwrap();
    let sgdisk = String::from_utf8_lossy(&sgdisk.stdout);
    assert!(
        sgdisk.contains("Attribute flags: 0003000000000000"),
        "{sgdisk}"
    );
    // A guest's data on the first volume.
    let first = d.partition(1);
    std::fs::write(&first, b"guest data, no signature").unwrap();

    // The class turns Filesystem: same partitions, and no mkfs on a raw volume ever.
    node.set_policy(&format!(
        "{classes}{}",
        group("g", "fs", "separate", &[&d], "volume_count = 2")
    ));
    let plan = node.plan();
    assert_eq!(steps(&plan), 0, "{plan:#}");
    let refused = plan["refused"].to_string();
    assert!(refused.contains("never changes the kind"), "{plan:#}");
    assert_eq!(
        plan["groups"][0]["volumes"],
        serde_json::json!([]),
        "{plan:#}"
    );
    let out = node.kvstrap(&["apply"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 disk(s) left alone"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(blkid(&first, "TYPE"), "", "formatted");
    let mut head = vec![0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open(&first).unwrap(), &mut head).unwrap();
    assert_eq!(&head, b"guest data, no signature");
}
