//! dm-multipath in the inventory and the planner, from a fake sysfs tree
//! (tests/fixtures/sysfs-mpath, made by make-sysfs-mpath.py): a map is one disk, its paths
//! are never candidates, a map's state follows its paths, and two disks with one WWN and
//! no map are refused by name. No root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::inventory::{scan, ScanOptions};
use kvstrap::model::{Disk, InUse, Inventory};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs-mpath")
}

fn inventory() -> Inventory {
    let root = fixture();
    scan(&ScanOptions {
        sys_root: root.join("sys"),
        dev_root: root.join("dev"),
        proc_root: root.join("proc"),
        managed_roots: vec!["/var/lib/kvstrap/storage".into()],
        quota_filesystems: Vec::new(),
    })
    .expect("scan of the fixture")
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

fn paths(d: &Disk) -> Vec<(String, String, bool)> {
    let m = d.multipath.as_ref().expect("a multipath map");
    m.paths
        .iter()
        .map(|p| (p.name.clone(), p.state.clone(), p.active))
        .collect()
}

#[test]
fn a_map_is_one_disk_and_partition_mappings_are_its_partitions() {
    let inv = inventory();
    let names: Vec<&str> = inv.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "mpatha", "mpathb", "mpathc", "mpathd", "sdb", "sdc", "sdd", "sde", "sdf", "sdg",
            "sdh", "sdi", "vda"
        ],
        "maps by their own names; partition mappings (dm-1, dm-2) are no disks"
    );
    let a = disk(&inv, "mpatha");
    assert_eq!(a.path, PathBuf::from("/dev/mapper/mpatha"));
    assert_eq!(a.transport, "mpath");
    assert_eq!(a.wwn.as_deref(), Some("0x5000c500a1b2c3d4"));
    assert_eq!(a.serial.as_deref(), Some("LUNA0001"));
    assert_eq!(a.model.as_deref(), Some("san-lun"));
    assert_eq!(a.vendor.as_deref(), Some("LIO-ORG"));
    assert_eq!(a.size_bytes, 4 << 30);
    assert_eq!(
        a.by_id,
        [
            "/dev/disk/by-id/dm-name-mpatha",
            "/dev/disk/by-id/dm-uuid-mpath-35000c500a1b2c3d4",
            "/dev/disk/by-id/scsi-35000c500a1b2c3d4",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"
        ]
    );
    let mp = a.multipath.as_ref().unwrap();
    assert_eq!(
        (mp.wwid.as_str(), mp.kernel_name.as_str()),
        ("35000c500a1b2c3d4", "dm-0")
    );
    assert_eq!(
        paths(a),
        [
            ("sdb".into(), "running".into(), true),
            ("sdc".into(), "running".into(), true)
        ]
    );
    assert_eq!(mp.degraded(), None);
    assert!(
        a.holders.is_empty(),
        "its partition mappings hold it, nothing else"
    );
    assert_eq!(reasons(a), [], "a healthy map is a candidate");
    let parts: Vec<(u32, &Path, bool)> = a
        .partitions
        .iter()
        .map(|p| (p.number, p.path.as_path(), p.in_kernel))
        .collect();
    assert_eq!(
        parts,
        [
            (1, Path::new("/dev/mapper/mpatha-part1"), true),
            (2, Path::new("/dev/mapper/mpatha-part2"), true)
        ]
    );
    let p1 = &a.partitions[0];
    assert_eq!(
        p1.by_id,
        [
            "/dev/disk/by-id/dm-name-mpatha-part1",
            "/dev/disk/by-id/dm-uuid-part1-mpath-35000c500a1b2c3d4"
        ]
    );
    assert_eq!(
        p1.mountpoints,
        [PathBuf::from("/var/lib/kvstrap/storage/san/san-1")]
    );
    assert_eq!(a.partitions[1].size_bytes, (2 << 30) - 2 * 1024 * 1024);
}

#[test]
fn paths_are_never_candidates_and_name_their_map() {
    let inv = inventory();
    for (path, map) in [
        ("sdb", "mpatha"),
        ("sdc", "mpatha"),
        ("sdd", "mpathb"),
        ("sde", "mpathb"),
    ] {
        let d = disk(&inv, path);
        assert_eq!(
            d.in_use,
            [InUse::MultipathPath { map: map.into() }],
            "{path}: named as its map's path, not \"held by dm-N\", and never opened"
        );
        assert_eq!(
            d.in_use[0].to_string(),
            format!(
                "path of the multipath map {map}: kvstrap uses the map, never one of its paths"
            )
        );
    }
}

#[test]
fn a_failed_path_degrades_the_map_and_no_working_path_loses_it() {
    let inv = inventory();
    let b = disk(&inv, "mpathb");
    assert_eq!(
        paths(b),
        [
            ("sdd".into(), "running".into(), true),
            ("sde".into(), "offline".into(), false)
        ]
    );
    assert_eq!(
        b.multipath.as_ref().unwrap().degraded().as_deref(),
        Some("1 of 2 paths active (failed: sde offline)")
    );
    assert_eq!(reasons(b), [], "a degraded map is still served");
    assert_eq!(
        disk(&inv, "mpathc").in_use,
        [InUse::NoPath {
            detail: "every path failed (sdf transport-offline, sdg transport-offline)".into()
        }],
        "not opened either: with queue_if_no_path a read would wait forever"
    );
    assert_eq!(
        disk(&inv, "mpathd").in_use,
        [InUse::NoPath {
            detail: "no path left".into()
        }]
    );
}

#[test]
fn two_disks_with_one_wwn_and_no_map_are_both_plain_disks() {
    let inv = inventory();
    for name in ["sdh", "sdi"] {
        let d = disk(&inv, name);
        assert_eq!(d.wwn.as_deref(), Some("0x5000c500deadbeef"));
        assert_eq!(d.multipath, None);
        assert_eq!(reasons(d), []);
    }
}

/// The planner on the fixture, with the fixture's missing device nodes forgiven.
fn plan(policy: &str) -> kvstrap::model::Plan {
    let mut inv = inventory();
    for d in &mut inv.disks {
        d.in_use.retain(|r| !matches!(r, InUse::Unreadable { .. }));
    }
    let policy = kvstrap::policy::load_str(Path::new("san.toml"), policy).expect("policy");
    kvstrap::plan::plan(&policy, &inv, &kvstrap::plan::PlanContext::default())
}

const SAN_POLICY: &str = r#"
[node]
name = "node-1"
[[storage_class]]
name = "san"
volume_mode = "Block"
[[disk_group]]
name = "san"
storage_class = "san"
layout = "separate"
volume_count = 2
match = { transport = "mpath" }
[[disk_group]]
name = "pair"
storage_class = "san"
layout = "separate"
match = { transport = "scsi", wwn = "0x5000c500deadbeef" }
"#;

#[test]
fn the_planner_uses_maps_warns_of_degraded_ones_and_refuses_lost_maps_and_pairs() {
    let plan = plan(SAN_POLICY);
    let refused: Vec<(String, String)> = plan
        .refused
        .iter()
        .map(|r| (r.disk.display().to_string(), r.reason.clone()))
        .collect();
    // mpatha carries partitions no table explains (no probe in the fixture): not empty.
    let reason = |disk: &str| -> &str {
        &refused
            .iter()
            .find(|(d, _)| d == disk)
            .unwrap_or_else(|| panic!("{disk} not refused: {refused:#?}"))
            .1
    };
    assert!(reason("/dev/mapper/mpathc")
        .starts_with("multipath map without a working path: every path failed"));
    assert_eq!(
        reason("/dev/mapper/mpathd"),
        "multipath map without a working path: no path left"
    );
    assert!(
        reason("/dev/sdh").starts_with("same WWN (0x5000c500deadbeef) as /dev/sdi: if these are paths of one LUN, run multipathd"),
        "{}", reason("/dev/sdh")
    );
    assert!(reason("/dev/sdi").contains("as /dev/sdh"));
    assert!(
        !refused
            .iter()
            .any(|(d, _)| d.starts_with("/dev/sd") && d != "/dev/sdh" && d != "/dev/sdi"),
        "paths of maps are neither taken nor refused: {refused:#?}"
    );
    // mpathb is blank and degraded: provisioned through its map, with a warning.
    let san = plan.groups.iter().find(|g| g.name == "san").unwrap();
    let b = san
        .disks
        .iter()
        .find(|d| d.disk == Path::new("/dev/mapper/mpathb"))
        .expect("mpathb provisioned");
    assert_eq!(b.identity, "wwn:0x6001405b0b0b0b0b0b0b0b0b0b0b0b0b");
    let devices: Vec<&Path> = b.partitions.iter().map(|p| p.device.as_path()).collect();
    assert_eq!(
        devices,
        [
            Path::new("/dev/mapper/mpathb-part1"),
            Path::new("/dev/mapper/mpathb-part2")
        ]
    );
    assert!(
        plan.warnings.iter().any(|w| w
            == "multipath map /dev/mapper/mpathb is degraded: 1 of 2 paths active (failed: sde offline); its volumes are still served"),
        "{:#?}",
        plan.warnings
    );
    // Every step names the map or its partition mappings, never a path.
    let json = serde_json::to_string(&plan.steps).unwrap();
    for path in ["sdb", "sdc", "sdd", "sde", "sdf", "sdg"] {
        assert!(
            !json.contains(&format!("/dev/{path}")),
            "{path} in the steps: {json}"
        );
    }
    assert!(json.contains("/dev/mapper/mpathb"));
}

#[test]
fn wipe_force_may_name_a_map_by_its_wwid_never_by_its_name() {
    let policy = |device: &str| {
        format!(
            "[node]\nname = \"n\"\n[[storage_class]]\nname = \"c\"\n[[disk_group]]\nname = \"g\"\n\
             storage_class = \"c\"\nwipe = \"force\"\ndevices = [\"{device}\"]\n"
        )
    };
    let load = |text: String| kvstrap::policy::load_str(Path::new("p.toml"), &text);
    assert!(load(policy("/dev/disk/by-id/dm-uuid-mpath-35000c500a1b2c3d4")).is_ok());
    let err = load(policy("/dev/disk/by-id/dm-name-mpatha")).expect_err("a map's name");
    assert!(
        err.diagnostics[0]
            .message
            .contains("does not name its disks by serial or WWN"),
        "{err:?}"
    );
}
