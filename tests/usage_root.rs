//! Volumes in use by pods keep their disk: kubelet's mounts made by hand, exactly as a real
//! kubelet lays them out (`tests/kubelet_real.rs` runs the real one): a bind mount of a
//! shared volume's directory, a subPath bind mount, a bind mount of a separate volume's
//! filesystem, and for a Block volume a bind mount of the partition's node with a loop
//! device over it. Then `apply` changes nothing, `plan` is empty, every PV stays
//! published, `volumes` names each use with its pod, and the filesystem root mounted by
//! hand elsewhere is reported, never obeyed.
//!
//! Needs root (loop devices, mkfs, mount); skipped with a message otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, ok, Node};
use common::{require_root, LoopDisk};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const POD: &str = "5d0c4f2a-9b1e-4c7d-8a6f-3e2b1c0d9f8e";

/// What the fake kubelet made; undone on drop (loop devices first, then the mounts).
#[derive(Default)]
struct KubeletMounts {
    mounts: Vec<PathBuf>,
    loops: Vec<PathBuf>,
}

impl KubeletMounts {
    fn bind(&mut self, source: &Path, target: &Path) {
        if source.is_dir() {
            std::fs::create_dir_all(target).unwrap();
        } else {
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, b"").unwrap();
        }
        let out = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount --bind {} {}: {}",
            source.display(),
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(target.to_path_buf());
    }

    fn attach_loop(&mut self, file: &Path) -> PathBuf {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        self.loops.push(dev.clone());
        dev
    }
}

impl Drop for KubeletMounts {
    fn drop(&mut self) {
        for l in self.loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn volume<'a>(volumes: &'a [Value], disk: &LoopDisk, index: usize) -> &'a Value {
    volumes
        .iter()
        .filter(|v| v["disk"] == disk.path.display().to_string())
        .nth(index)
        .unwrap_or_else(|| panic!("no volume {index} on {}: {volumes:#?}", disk.path.display()))
}

fn path_of(v: &Value, key: &str) -> PathBuf {
    PathBuf::from(v[key].as_str().unwrap())
}

#[test]
fn volumes_in_use_by_pods_never_make_kvstrap_disown_their_disk_root() {
    if !require_root("volumes_in_use_by_pods_never_make_kvstrap_disown_their_disk_root") {
        return;
    }
    let (a, b, c) = (
        LoopDisk::new(512 * MIB),
        LoopDisk::new(512 * MIB),
        LoopDisk::new(256 * MIB),
    );
    let node = Node::new(&format!(
        "{}{}{}{}{}{}",
        class("shared", "ext4", "Filesystem"),
        class("sep", "ext4", "Filesystem"),
        class("raw", "ext4", "Block"),
        group("s", "shared", "shared", &[&a], "volume_count = 3"),
        group("p", "sep", "separate", &[&b], "volume_count = 2"),
        group("r", "raw", "separate", &[&c], "volume_count = 2"),
    ));
    node.apply_ok();
    let before = node.volumes();
    assert_eq!(before.len(), 7, "{before:#?}");
    assert!(before.iter().all(|v| v["uses"] == serde_json::json!([])));

    let kubelet = node.dir.path().join("kubelet");
    let pod_volume = |pv: &str| {
        kubelet.join(format!(
            "pods/{POD}/volumes/kubernetes.io~local-volume/{pv}"
        ))
    };
    let mut fake = KubeletMounts::default();
    // A pod's volume on the shared filesystem, and a subPath of it.
    let shared = path_of(volume(&before, &a, 1), "path");
    std::fs::create_dir_all(shared.join("sub")).unwrap();
    fake.bind(&shared, &pod_volume("pv-shared"));
    let subpath = kubelet.join(format!("pods/{POD}/volume-subpaths/disk/c/0"));
    fake.bind(&shared.join("sub"), &subpath);
    std::fs::write(pod_volume("pv-shared").join("vm.img"), b"guest data").unwrap();
    // A separate volume's filesystem.
    let separate = path_of(volume(&before, &b, 0), "path");
    fake.bind(&separate, &pod_volume("pv-sep"));
    // A Block volume: the partition's node bind-mounted, a loop device over that.
    let raw_device = path_of(volume(&before, &c, 0), "device");
    let mapped = kubelet.join(format!(
        "plugins/kubernetes.io~local-volume/volumeDevices/pv-raw/{POD}"
    ));
    fake.bind(&raw_device, &mapped);
    let held_by = fake.attach_loop(&mapped);
    // Our shared filesystem's root, mounted elsewhere by hand.
    let by_hand = node.dir.path().join("by-hand");
    fake.bind(shared.parent().unwrap(), &by_hand);

    let plan = node.plan();
    assert_eq!(plan["steps"], serde_json::json!([]), "{plan:#}");
    assert_eq!(plan["refused"], serde_json::json!([]), "{plan:#}");
    let warnings = plan["warnings"].to_string();
    assert!(
        warnings.contains("by-hand"),
        "the stray mount is reported: {warnings}"
    );
    let said = node.apply_ok();
    assert_eq!(said["steps"], serde_json::json!([]), "{said:#}");
    assert_eq!(said["refused"], serde_json::json!([]), "{said:#}");

    let after = node.volumes();
    assert_eq!(after.len(), 7, "no volume may disappear: {after:#?}");
    let uses = |v: &Value| -> Vec<(String, String)> {
        v["uses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["kind"].as_str().unwrap().to_string(),
                    u["path"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let shown = |p: &Path| p.display().to_string();
    assert_eq!(
        uses(volume(&after, &a, 1)),
        vec![
            ("mount".to_string(), shown(&subpath)),
            ("mount".to_string(), shown(&pod_volume("pv-shared"))),
        ]
    );
    assert!(volume(&after, &a, 1)["uses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|u| u["pod_uid"] == POD));
    assert_eq!(
        uses(volume(&after, &a, 0)),
        vec![],
        "another volume of the disk"
    );
    assert_eq!(
        uses(volume(&after, &b, 0)),
        vec![("mount".to_string(), shown(&pod_volume("pv-sep")))]
    );
    assert_eq!(
        uses(volume(&after, &c, 0)),
        vec![
            ("device_mapping".to_string(), shown(&mapped)),
            ("loop_device".to_string(), shown(&held_by)),
        ]
    );
    assert_eq!(uses(volume(&after, &c, 1)), vec![]);
    let human = ok(node.kvstrap(&["volumes"], &[]), "volumes");
    assert!(
        human.contains(&format!(
            "used: mounted at {} (pod {POD})",
            shown(&pod_volume("pv-shared"))
        )),
        "{human}"
    );
    // The loop device kubelet attached is never a disk to provision, whatever selects it.
    let disks = node.kvstrap(&["disks", "-o", "json"], &[]);
    let disks: Value = serde_json::from_slice(&disks.stdout).unwrap();
    let loop_disk = disks["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == shown(&held_by))
        .unwrap_or_else(|| panic!("{} not listed: {disks:#}", held_by.display()));
    assert_eq!(loop_disk["eligible"], false, "{loop_disk:#}");
    assert_eq!(
        std::fs::read(shared.join("vm.img")).unwrap(),
        b"guest data",
        "the pod's data is intact"
    );
}

/// The plan's volume specs, as the publisher hands them to the scrubber.
fn planned_volumes(node: &Node) -> Vec<kvstrap::model::VolumeSpec> {
    let plan = node.plan();
    plan["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["volumes"].as_array().unwrap().clone())
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

#[test]
fn a_volume_in_use_is_never_scrubbed_root() {
    use kvstrap::kube::scrub::{DirectoryAndBlockScrubber, ScrubError, Scrubber};
    if !require_root("a_volume_in_use_is_never_scrubbed_root") {
        return;
    }
    let (a, c) = (LoopDisk::new(512 * MIB), LoopDisk::new(256 * MIB));
    let node = Node::new(&format!(
        "{}{}{}{}",
        class("shared", "ext4", "Filesystem"),
        class("raw", "ext4", "Block"),
        group("s", "shared", "shared", &[&a], "volume_count = 2"),
        group("r", "raw", "separate", &[&c], "volume_count = 1"),
    ));
    node.apply_ok();
    let volumes = planned_volumes(&node);
    let dir = volumes.iter().find(|v| v.disk == a.path).unwrap();
    let block = volumes.iter().find(|v| v.disk == c.path).unwrap();
    std::fs::write(dir.path.join("tenant-a"), b"secret").unwrap();
    let scrubber = DirectoryAndBlockScrubber;
    // kvstrap's own mount of the filesystem is no use: an unused volume is scrubbed.
    scrubber.scrub(dir).unwrap();
    assert!(!dir.path.join("tenant-a").exists());

    std::fs::write(dir.path.join("tenant-b"), b"still running").unwrap();
    let mut fake = KubeletMounts::default();
    let pod = node.dir.path().join(format!(
        "kubelet/pods/{POD}/volumes/kubernetes.io~local-volume/pv"
    ));
    fake.bind(&dir.path, &pod);
    let mapped = node.dir.path().join(format!(
        "kubelet/plugins/kubernetes.io~local-volume/volumeDevices/pv-raw/{POD}"
    ));
    fake.bind(&block.device, &mapped);
    fake.attach_loop(&mapped);
    for v in [dir, block] {
        match scrubber.scrub(v) {
            Err(ScrubError::InUse { uses, .. }) => {
                assert!(
                    uses.iter().all(|u| u.pod_uid.as_deref() == Some(POD)),
                    "{uses:?}"
                )
            }
            other => panic!("{} was scrubbed while in use: {other:?}", v.name),
        }
    }
    assert_eq!(
        std::fs::read(pod.join("tenant-b")).unwrap(),
        b"still running"
    );
    drop(fake);
    scrubber.scrub(dir).unwrap();
    scrubber.scrub(block).unwrap();
    assert!(!dir.path.join("tenant-b").exists());
}
