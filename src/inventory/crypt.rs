//! dm-crypt mappings over partitions: which holder is one, what is on it and what uses it.
//!
//! A LUKS2 volume kvstrap opened is a holder of its partition (`dm-3`). It is recorded on
//! the partition as a [`CryptMapping`] (read from `/sys/block/dm-N/dm/{name,uuid}`), with
//! the signatures on the mapping and its mounts, binds, holders: the planner counts them
//! as the partition's own (`plan::usage`), never as a foreign holder.

use super::{sysfs, Machine};
use crate::model::CryptMapping;
use std::fs::File;
use std::path::Path;

/// The prefix cryptsetup gives the dm UUID of every mapping it opens.
pub const CRYPT_UUID_PREFIX: &str = "CRYPT-";

/// The dm-crypt mapping among a partition's `holders`, if one is.
pub(super) fn mapping(machine: &Machine, holders: &[String]) -> Option<CryptMapping> {
    holders
        .iter()
        .find_map(|h| read_mapping(machine, h, &machine.sys_root))
}

fn read_mapping(machine: &Machine, kernel_name: &str, sys_root: &Path) -> Option<CryptMapping> {
    let dir = sys_root.join("block").join(kernel_name);
    let dm_uuid = sysfs::attr(&dir.join("dm"), "uuid")?;
    if !dm_uuid.starts_with(CRYPT_UUID_PREFIX) {
        return None;
    }
    let name = sysfs::attr(&dir.join("dm"), "name").unwrap_or_default();
    let devno = sysfs::attr(&dir, "dev").unwrap_or_default();
    let node = machine.dev_root.join(kernel_name);
    // What the mapping shows; an unreadable mapping shows nothing (the planner then leaves
    // its filesystem to the executor's fresh probe, which refuses anything unexpected).
    let signatures = File::open(&node)
        .ok()
        .and_then(|f| super::probe::signatures_at(&f, 0, 0, &node.display().to_string()).ok())
        .unwrap_or_default();
    let mapped = Path::new("/mapper").join(&name);
    let node_binds = machine
        .node_binds(kernel_name)
        .into_iter()
        .chain(machine.node_binds_at(&mapped))
        .collect();
    let by_dm_uuid = udev_names_mapping(&machine.dev_root, &dm_uuid, kernel_name);
    Some(CryptMapping {
        kernel_name: kernel_name.to_string(),
        mountpoints: machine.mountpoints(&devno, kernel_name),
        mounts: machine.mount_facts(&devno, kernel_name),
        holders: sysfs::list_names(&dir.join("holders")),
        node_binds,
        loop_devices: Vec::new(),
        signatures,
        by_dm_uuid,
        devno,
        dm_uuid,
        name,
    })
}

/// Whether udev's `disk/by-id/dm-uuid-<dm_uuid>` below `dev_root` resolves to the node
/// `kernel_name` (the test `host::dirs::block_link_target` makes before linking there).
pub fn udev_names_mapping(dev_root: &Path, dm_uuid: &str, kernel_name: &str) -> bool {
    let link = dev_root
        .join("disk/by-id")
        .join(format!("dm-uuid-{dm_uuid}"));
    match (
        std::fs::canonicalize(link),
        std::fs::canonicalize(dev_root.join(kernel_name)),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_dm_uuid_link_counts_only_when_it_names_that_mapping() {
        let dev = tempfile::tempdir().unwrap();
        let by_id = dev.path().join("disk/by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        for node in ["dm-0", "dm-1"] {
            std::fs::write(dev.path().join(node), b"").unwrap();
        }
        let ours = "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-kvs-01234567";
        std::os::unix::fs::symlink("../../dm-0", by_id.join(format!("dm-uuid-{ours}"))).unwrap();
        assert!(udev_names_mapping(dev.path(), ours, "dm-0"));
        assert!(!udev_names_mapping(dev.path(), ours, "dm-1"));
        assert!(!udev_names_mapping(
            dev.path(),
            "CRYPT-LUKS2-other-x",
            "dm-0"
        ));
    }
}
