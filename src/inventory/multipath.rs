//! dm-multipath maps as sysfs shows them: a map is one disk (its WWID, its paths and their
//! state); its paths and its partition mappings are never disks of their own.
//!
//! Read from sysfs alone, so `kvstrap disks` needs no multipath-tools: a map is
//! `/sys/block/dm-N` whose `dm/uuid` is `mpath-<wwid>`, its paths are `slaves/`, a path's
//! state is its SCSI device's `device/state`, and a partition mapping (what kpartx and
//! multipathd's udev rules make) is a holder of the map whose `dm/uuid` is
//! `part<N>-mpath-<wwid>`.

use super::sysfs::{self, SysDisk, SysPartition};
use crate::model::{InUse, Multipath, MultipathPath};
use std::path::Path;

/// What a whole block device is to dm-multipath.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Role {
    #[default]
    None,
    /// A map: `name` is its own (stable) name, `mpatha` or the WWID.
    Map { name: String, multipath: Multipath },
    /// A path of the map named `map`.
    Path { map: String },
}

pub use crate::model::{map_partition_path as partition_path, MAPPER_DIR};

/// The name of a map's partition mapping: `mpatha-part1` (see [`partition_path`]).
pub fn partition_map_name(map: &str, number: u32) -> String {
    format!("{map}-part{number}")
}

/// The WWID of a map from its `dm/uuid` (`mpath-<wwid>`).
pub fn map_wwid(dm_uuid: &str) -> Option<&str> {
    dm_uuid.strip_prefix("mpath-").filter(|w| !w.is_empty())
}

/// (partition number, WWID of its map) from a partition mapping's `dm/uuid`
/// (`part<N>-mpath-<wwid>`).
pub fn partition_of(dm_uuid: &str) -> Option<(u32, &str)> {
    let rest = dm_uuid.strip_prefix("part")?;
    let (number, map_uuid) = rest.split_once('-')?;
    Some((number.parse().ok()?, map_wwid(map_uuid)?))
}

/// The WWN (`0x…`) of a WWID whose first digit says it is an NAA name (`3…`), as the
/// paths' `wwid` (`naa.…`) gives it: the map and its paths then share one identity.
pub fn wwn_of(wwid: &str) -> Option<String> {
    super::byid::wwn_from_wwid(&format!("naa.{}", wwid.strip_prefix('3')?))
}

/// The by-id names udev gives a map: `dm-name-<name>`, `dm-uuid-mpath-<wwid>` (its
/// device-mapper rules) and, for an NAA WWID, the LUN's own `scsi-<wwid>` and
/// `wwn-0x<wwn>`, which multipath-tools' rules move from the paths to the map (so a
/// policy written with them names the map, with udev or without).
pub fn by_id_names(name: &str, wwid: &str) -> Vec<String> {
    let mut names = vec![format!("dm-name-{name}"), format!("dm-uuid-mpath-{wwid}")];
    if let Some(wwn) = wwn_of(wwid) {
        names.push(format!("scsi-{wwid}"));
        names.push(format!("wwn-{wwn}"));
    }
    names
}

/// The by-id names of a map's partition mapping: `dm-name-<name>-part<N>`,
/// `dm-uuid-part<N>-mpath-<wwid>`.
pub fn partition_by_id_names(name: &str, wwid: &str, number: u32) -> Vec<String> {
    vec![
        format!("dm-name-{}", partition_map_name(name, number)),
        format!("dm-uuid-part{number}-mpath-{wwid}"),
    ]
}

/// Finds the maps among `disks` and rewrites the list: a map gets transport `mpath`, the
/// identity of its LUN and its partition mappings as partitions; each path is marked with
/// its map; partition mappings leave the list (they are the map's partitions).
pub fn fold(sys_root: &Path, disks: Vec<SysDisk>) -> Vec<SysDisk> {
    let dm_uuid = |name: &str| sysfs::attr(&sys_root.join("block").join(name).join("dm"), "uuid");
    let mut maps: Vec<(String, String)> = Vec::new(); // (kernel name, wwid)
    let mut part_maps: Vec<(String, u32, String)> = Vec::new(); // (kernel name, number, wwid)
    for d in &disks {
        let Some(uuid) = dm_uuid(&d.name) else {
            continue;
        };
        if let Some(wwid) = map_wwid(&uuid) {
            maps.push((d.name.clone(), wwid.to_string()));
        } else if let Some((number, wwid)) = partition_of(&uuid) {
            part_maps.push((d.name.clone(), number, wwid.to_string()));
        }
    }
    let parts_of = |wwid: &str| -> Vec<&(String, u32, String)> {
        part_maps.iter().filter(|(_, _, w)| w == wwid).collect()
    };
    let mut out: Vec<SysDisk> = Vec::with_capacity(disks.len());
    let lookup = disks.clone();
    for mut d in disks {
        if part_maps.iter().any(|(k, _, _)| *k == d.name) {
            continue;
        }
        if let Some((_, wwid)) = maps.iter().find(|(k, _)| *k == d.name) {
            let parts = parts_of(wwid);
            make_map(sys_root, &mut d, wwid, &parts, &lookup);
        } else if let Some(map) = d.holders.iter().find_map(|h| {
            maps.iter()
                .find(|(k, _)| k == h)
                .map(|(k, _)| map_name(sys_root, k))
        }) {
            d.multipath = Role::Path { map };
        }
        out.push(d);
    }
    out
}

/// The map's own name (`dm/name`), which multipathd keeps stable (bindings file or alias).
fn map_name(sys_root: &Path, kernel_name: &str) -> String {
    sysfs::attr(&sys_root.join("block").join(kernel_name).join("dm"), "name")
        .unwrap_or_else(|| kernel_name.to_string())
}

fn make_map(
    sys_root: &Path,
    d: &mut SysDisk,
    wwid: &str,
    parts: &[&(String, u32, String)],
    all: &[SysDisk],
) {
    let name = map_name(sys_root, &d.name);
    let dir = sys_root.join("block").join(&d.name);
    let paths: Vec<MultipathPath> = sysfs::list_names(&dir.join("slaves"))
        .into_iter()
        .map(|p| path_state(sys_root, &p))
        .collect();
    // What the LUN says about itself comes through any path; they all show the same LUN.
    if let Some(path) = paths
        .iter()
        .find_map(|p| all.iter().find(|s| s.name == p.name))
    {
        d.model = path.model.clone();
        d.vendor = path.vendor.clone();
        d.serial = path.serial.clone();
    }
    d.wwn = wwn_of(wwid);
    d.transport = "mpath".into();
    d.ids = Default::default();
    d.holders.retain(|h| !parts.iter().any(|(k, _, _)| k == h));
    d.partitions = parts
        .iter()
        .map(|(k, number, _)| partition_mapping(sys_root, k, *number))
        .collect();
    d.partitions.sort_by_key(|p| p.number);
    d.multipath = Role::Map {
        name,
        multipath: Multipath {
            wwid: wwid.to_string(),
            kernel_name: d.name.clone(),
            paths,
        },
    };
}

/// A partition mapping as a partition of its map. Its offset is in the mapping's table,
/// which sysfs does not show; the map's partition table gives it.
fn partition_mapping(sys_root: &Path, kernel_name: &str, number: u32) -> SysPartition {
    let dir = sys_root.join("block").join(kernel_name);
    SysPartition {
        name: kernel_name.to_string(),
        number,
        devno: sysfs::attr(&dir, "dev").unwrap_or_default(),
        start_bytes: 0,
        size_bytes: sysfs::attr(&dir, "size")
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(0, |s| s.saturating_mul(512)),
        holders: sysfs::list_names(&dir.join("holders")),
    }
}

/// A path's state from its SCSI device (`running`) or NVMe controller (`live`). A path
/// whose device is gone from sysfs (hot-unplugged, not yet dropped from the map) failed.
pub fn path_state(sys_root: &Path, name: &str) -> MultipathPath {
    let dir = sys_root.join("block").join(name);
    let state = if dir.exists() {
        sysfs::attr(&dir.join("device"), "state").unwrap_or_else(|| "unknown".into())
    } else {
        "gone".into()
    };
    // Without a state attribute nothing says the path failed: the map's IO decides.
    let active = matches!(state.as_str(), "running" | "live" | "unknown");
    MultipathPath {
        name: name.to_string(),
        state,
        active,
    }
}

/// Whether the scan may open the device: never a path (the map is the disk), never a map
/// without a working path (with `queue_if_no_path` a read would wait for a path forever).
pub fn may_probe(role: &Role) -> bool {
    match role {
        Role::None => true,
        Role::Path { .. } => false,
        Role::Map { multipath, .. } => multipath.active_paths() > 0,
    }
}

/// The facts that rule a map or a path out. A path is named as its map's, not as "held by
/// dm-2"; a map whose paths all failed cannot be used (its volumes are handled as on a
/// disk that vanished).
pub fn judge(role: &Role, in_use: &mut Vec<InUse>) {
    match role {
        Role::None => {}
        Role::Path { map } => {
            in_use.retain(|r| !matches!(r, InUse::Holder { .. } | InUse::Busy { .. }));
            in_use.insert(0, InUse::MultipathPath { map: map.clone() });
        }
        Role::Map { multipath, .. } if multipath.active_paths() == 0 => {
            let detail = if multipath.paths.is_empty() {
                "no path left".to_string()
            } else {
                let states: Vec<String> = multipath
                    .paths
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.state))
                    .collect();
                format!("every path failed ({})", states.join(", "))
            };
            in_use.insert(0, InUse::NoPath { detail });
        }
        Role::Map { .. } => {}
    }
}

/// What sysfs says about the device at `kernel_name` if it is a multipath map: its name,
/// WWN and WWID. The executor's identity re-check asks this.
pub fn map_at(sys_root: &Path, kernel_name: &str) -> Option<(String, Option<String>, String)> {
    let dm = sys_root.join("block").join(kernel_name).join("dm");
    let uuid = sysfs::attr(&dm, "uuid")?;
    let wwid = map_wwid(&uuid)?.to_string();
    Some((map_name(sys_root, kernel_name), wwn_of(&wwid), wwid))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn uuids_of_maps_and_partition_mappings() {
        assert_eq!(
            map_wwid("mpath-35000c500a1b2c3d4"),
            Some("35000c500a1b2c3d4")
        );
        assert_eq!(map_wwid("LVM-abc"), None);
        assert_eq!(map_wwid("mpath-"), None);
        assert_eq!(
            partition_of("part2-mpath-35000c500a1b2c3d4"),
            Some((2, "35000c500a1b2c3d4"))
        );
        assert_eq!(partition_of("part-mpath-3500"), None);
        assert_eq!(partition_of("CRYPT-LUKS2-abc"), None);
    }

    #[test]
    fn naa_wwids_give_the_paths_wwn() {
        assert_eq!(
            wwn_of("35000c500a1b2c3d4").as_deref(),
            Some("0x5000c500a1b2c3d4")
        );
        // EUI-64 (2…) and vendor-specific WWIDs have no WWN.
        assert_eq!(wwn_of("2002538b471b1b2c3"), None);
        assert_eq!(wwn_of("SQEMU_QEMU_HARDDISK_x"), None);
    }

    #[test]
    fn names_as_debian_multipath_tools_makes_them() {
        assert_eq!(
            partition_path("mpatha", 2),
            PathBuf::from("/dev/mapper/mpatha-part2")
        );
        assert_eq!(
            by_id_names("mpatha", "35000c500a1b2c3d4"),
            vec![
                "dm-name-mpatha",
                "dm-uuid-mpath-35000c500a1b2c3d4",
                "scsi-35000c500a1b2c3d4",
                "wwn-0x5000c500a1b2c3d4"
            ]
        );
        assert_eq!(
            by_id_names("mpathe", "2002538b471b1b2c3"),
            vec!["dm-name-mpathe", "dm-uuid-mpath-2002538b471b1b2c3"]
        );
        assert_eq!(
            partition_by_id_names("mpatha", "3600", 1),
            vec!["dm-name-mpatha-part1", "dm-uuid-part1-mpath-3600"]
        );
    }

    #[test]
    fn degraded_and_lost_maps() {
        let path = |name: &str, state: &str, active| MultipathPath {
            name: name.into(),
            state: state.into(),
            active,
        };
        let mut m = Multipath {
            wwid: "3600".into(),
            kernel_name: "dm-0".into(),
            paths: vec![path("sdb", "running", true), path("sdc", "running", true)],
        };
        assert_eq!(m.degraded(), None);
        m.paths[1] = path("sdc", "offline", false);
        assert_eq!(
            m.degraded().as_deref(),
            Some("1 of 2 paths active (failed: sdc offline)")
        );
        m.paths.pop();
        assert_eq!(m.degraded().as_deref(), Some("1 path left: no redundancy"));
        m.paths[0].active = false;
        assert_eq!(m.degraded(), None, "a map without a working path is lost");
        assert_eq!(m.active_paths(), 0);
    }
}
