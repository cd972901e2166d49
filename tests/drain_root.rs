//! Root tests of `kvstrap drain`, `undrain`, `replace` and `forget` on loop devices the
//! tests create (publishing off; the cluster side is in `drain_real.rs`): a drained disk is
//! unmounted and left intact, never provisioned again until undrained; a disk still in use
//! stays draining; a replacement is provisioned into the old disk's group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, mounted_under, ok, Node};
use common::{require_root, LoopDisk};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn fs_uuid(dev: &Path) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn volume_paths_of(node: &Node, disk: &LoopDisk) -> Vec<PathBuf> {
    node.volumes()
        .iter()
        .filter(|v| v["disk"] == disk.path.display().to_string())
        .map(|v| PathBuf::from(v["path"].as_str().unwrap()))
        .collect()
}

fn drain_status(node: &Node) -> Value {
    let out = node.kvstrap(&["drain", "--status", "-o", "json"], &[]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn drain_unmounts_and_keeps_the_data_undrain_brings_it_back_root() {
    if !require_root("drain_unmounts_and_keeps_the_data_undrain_brings_it_back_root") {
        return;
    }
    let a = LoopDisk::new(512 * MIB);
    let b = LoopDisk::new(512 * MIB);
    let raw = LoopDisk::new(64 * MIB);
    let metrics = tempfile::tempdir().unwrap();
    let prom = metrics.path().join("kvstrap.prom");
    let node = Node::new(&format!(
        "[metrics]\ntextfile = {:?}\n\n{}{}{}{}",
        prom.display().to_string(),
        class("ext", "ext4", "Filesystem"),
        class("raw", "ext4", "Block"),
        group("g", "ext", "separate", &[&a, &b], "volume_count = 2"),
        group("r", "raw", "separate", &[&raw], "volume_count = 1"),
    ));
    node.apply_ok();
    let a_volumes = volume_paths_of(&node, &a);
    assert_eq!(a_volumes.len(), 2);
    std::fs::write(a_volumes[0].join("tenant-data"), b"keep me").unwrap();
    let uuid_before = fs_uuid(&a.partition(1));
    let link = volume_paths_of(&node, &raw).remove(0);
    assert!(link.is_symlink());

    let unknown = node.kvstrap(&["drain", "/dev/nonesuch"], &[]);
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains("no disk \"/dev/nonesuch\" on this node"),
        "{said}"
    );
    assert!(
        said.contains("kvstrap disks"),
        "the message says where to look: {said}"
    );
    // Drain A (by its loop path) and the Block disk: nothing holds them, so both end drained.
    ok(
        node.kvstrap(&["drain", &a.path.display().to_string()], &[]),
        "drain a",
    );
    ok(
        node.kvstrap(&["drain", &raw.path.display().to_string()], &[]),
        "drain raw",
    );
    let status = drain_status(&node);
    let phases: Vec<&str> = status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["drained", "drained"], "{status:#}");
    let mounts = mounted_under(&node.root());
    assert!(
        mounts
            .iter()
            .all(|m| !a_volumes.iter().any(|v| m.starts_with(v))),
        "a drained disk's filesystems are unmounted: {mounts:?}"
    );
    assert!(
        !link.exists() && !link.is_symlink(),
        "the Block link is gone"
    );
    let vols = node.volumes();
    assert!(
        vols.iter()
            .all(|v| v["disk"] != a.path.display().to_string()),
        "a drained disk's volumes are not provided: {vols:#?}"
    );
    assert_eq!(vols.len(), 2, "B's volumes stay: {vols:#?}");
    // Out of service stays out of service: no step for it, the disks list says why.
    let plan = node.plan();
    assert_eq!(plan["steps"].as_array().unwrap().len(), 0, "{plan:#}");
    let disks: Value =
        serde_json::from_slice(&node.kvstrap(&["disks", "-o", "json"], &[]).stdout).unwrap();
    let row = disks["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == a.path.display().to_string())
        .unwrap()
        .clone();
    assert_eq!(row["service"], "drained", "{row:#}");
    let status = ok(node.kvstrap(&["status"], &[]), "status");
    assert!(
        status.contains(&format!("out of service: {} (", a.path.display()))
            && status.contains("drained since"),
        "{status}"
    );
    assert!(
        row["reason"].as_str().unwrap().contains("out of service"),
        "{row:#}"
    );
    node.apply_ok();
    assert!(mounted_under(&node.root())
        .iter()
        .all(|m| !a_volumes.iter().any(|v| m.starts_with(v))));
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(
        text.contains("kvstrap_disks{state=\"drained\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("kvstrap_disks{state=\"ours\"} 1\n"), "{text}");

    // Intact: the same filesystem, the data still there once it is back in service.
    assert_eq!(fs_uuid(&a.partition(1)), uuid_before);
    ok(
        node.kvstrap(&["undrain", &a.path.display().to_string()], &[]),
        "undrain",
    );
    ok(
        node.kvstrap(&["undrain", &raw.path.display().to_string()], &[]),
        "undrain raw",
    );
    assert_eq!(
        std::fs::read(a_volumes[0].join("tenant-data")).unwrap(),
        b"keep me"
    );
    assert_eq!(fs_uuid(&a.partition(1)), uuid_before);
    assert!(link.is_symlink(), "the Block link is back");
    assert_eq!(node.volumes().len(), 5);
    assert_eq!(node.plan()["steps"].as_array().unwrap().len(), 0);
    assert_eq!(drain_status(&node)["disks"].as_array().unwrap().len(), 0);
}

#[test]
fn a_disk_mounted_elsewhere_stays_draining_and_mounted_root() {
    if !require_root("a_disk_mounted_elsewhere_stays_draining_and_mounted_root") {
        return;
    }
    let a = LoopDisk::new(512 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("ext", "ext4", "Filesystem"),
        group("g", "ext", "separate", &[&a], "volume_count = 1"),
    ));
    node.apply_ok();
    let volume = volume_paths_of(&node, &a).remove(0);
    // What kubelet does for a pod using the volume: a bind mount outside kvstrap's root.
    let pod_dir = node.dir.path().join("kubelet-pod-volume");
    std::fs::create_dir_all(&pod_dir).unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&volume)
        .arg(&pod_dir)
        .status()
        .unwrap();
    assert!(bind.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let guard = Unmount(pod_dir.clone());

    let said = ok(
        node.kvstrap(&["drain", "-o", "json", &a.path.display().to_string()], &[]),
        "drain",
    );
    let status = drain_status(&node);
    let disk = &status["disks"][0];
    assert_eq!(disk["phase"], "draining", "{status:#}\n{said}");
    assert!(
        disk["local_users"][0]
            .as_str()
            .unwrap()
            .contains("kubelet-pod-volume"),
        "{status:#}"
    );
    assert!(
        mounted_under(&node.root())
            .iter()
            .any(|m| m.starts_with(&volume)),
        "still mounted for the pod"
    );
    assert!(node.volumes().is_empty(), "nothing new may bind to it");

    drop(guard);
    node.apply_ok();
    assert_eq!(drain_status(&node)["disks"][0]["phase"], "drained");
    assert!(mounted_under(&node.root()).is_empty());
}

#[test]
fn replace_provisions_a_new_disk_into_the_drained_ones_group_root() {
    if !require_root("replace_provisions_a_new_disk_into_the_drained_ones_group_root") {
        return;
    }
    let old = LoopDisk::new(512 * MIB);
    let new = LoopDisk::new(512 * MIB);
    let foreign = LoopDisk::new(512 * MIB);
    foreign.run("mkfs.ext4", &["-q"]);
    // The group names only the old disk: the replacement comes in by `replace`.
    let node = Node::new(&format!(
        "{}{}",
        class("ext", "ext4", "Filesystem"),
        group("g", "ext", "separate", &[&old], "volume_count = 2"),
    ));
    node.apply_ok();
    let (old_path, new_path) = (
        old.path.display().to_string(),
        new.path.display().to_string(),
    );

    let refused = node.kvstrap(&["replace", &old_path, &new_path], &[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("drain"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ok(node.kvstrap(&["drain", &old_path], &[]), "drain");
    let not_blank = node.kvstrap(
        &["replace", &old_path, &foreign.path.display().to_string()],
        &[],
    );
    assert!(
        !not_blank.status.success(),
        "a disk with a filesystem is never a replacement"
    );
    ok(
        node.kvstrap(&["replace", &old_path, &new_path], &[]),
        "replace",
    );
    let vols = node.volumes();
    assert_eq!(vols.len(), 2, "{vols:#?}");
    assert!(
        vols.iter()
            .all(|v| v["disk"] == new_path && v["group"] == "g"),
        "{vols:#?}"
    );
    assert_eq!(node.plan()["steps"].as_array().unwrap().len(), 0);
    // The old disk stays drained and intact; forget refuses while it is attached.
    assert_eq!(drain_status(&node)["disks"][0]["phase"], "drained");
    let forget = node.kvstrap(&["forget", &old_path], &[]);
    assert!(!forget.status.success());
}
