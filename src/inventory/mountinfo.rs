//! Mounts from /proc/self/mountinfo and from every other mount namespace, looked up by device number.

use super::InventoryError;
use std::path::{Path, PathBuf};

/// One line of mountinfo, reduced to what the inventory needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device (for btrfs a virtual one: see `source`).
    pub devno: String,
    /// The directory of the filesystem the mount shows (`/`, or a bind mount's directory).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    pub fstype: String,
    /// Mount source, e.g. `/dev/vda` or `tmpfs`.
    pub source: String,
    /// A process of the mount namespace, when it is not kvstrap's own.
    pub pid: Option<u32>,
}

impl Mount {
    pub fn fact(&self) -> crate::model::MountFact {
        crate::model::MountFact {
            mountpoint: self.mountpoint.clone(),
            root: self.root.clone(),
            pid: self.pid,
        }
    }
}

pub fn read(proc_root: &Path) -> Result<Vec<Mount>, InventoryError> {
    let path = proc_root.join("self/mountinfo");
    let text =
        std::fs::read_to_string(&path).map_err(|source| InventoryError::Read { path, source })?;
    Ok(parse(&text))
}

/// Parses mountinfo text; malformed lines are skipped. The one parser is
/// `host::mount::parse_mountinfo`; the inventory keeps the device number as `major:minor`.
pub fn parse(text: &str) -> Vec<Mount> {
    crate::host::mount::parse_mountinfo(text)
        .into_iter()
        .map(|m| Mount {
            devno: super::devno_string(m.devno),
            root: m.root,
            mountpoint: m.mountpoint,
            fstype: m.fstype,
            source: m.source,
            pid: None,
        })
        .collect()
}

/// Mounts of block devices and of /dev in every mount namespace but kvstrap's own, read
/// through one process of each (a pod's containers, a service with a private /tmp). A
/// volume bind-mounted only there is still in use. Processes that vanish or cannot be
/// read while the scan runs are skipped: their namespace goes with them.
pub fn read_other_namespaces(proc_root: &Path) -> Vec<Mount> {
    let own = std::fs::read_link(proc_root.join("self/ns/mnt")).ok();
    let mut seen: std::collections::BTreeSet<PathBuf> = own.into_iter().collect();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut mounts = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(entry.path().join("ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        mounts.extend(
            parse(&text)
                .into_iter()
                .filter(|m| !m.devno.starts_with("0:") || m.fstype == "devtmpfs")
                .map(|m| Mount {
                    pid: Some(pid),
                    ..m
                }),
        );
    }
    mounts
}

/// Mount points of a device, matched by devno or, for filesystems that report a
/// virtual devno (btrfs), by the `/dev/<name>` source.
pub fn mountpoints_of<'a>(mounts: &'a [Mount], devno: &str, name: &str) -> Vec<&'a Mount> {
    let dev_path = format!("/dev/{name}");
    mounts
        .iter()
        .filter(|m| m.devno == devno || m.source == dev_path)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
22 27 0:21 / /proc rw,relatime - proc proc rw
90 27 7:3 / /mnt/with\\040space rw,relatime shared:5 master:1 - xfs /dev/loop3 rw,attr2
91 27 0:45 /@home /home rw - btrfs /dev/sdb2 rw
garbage line
";

    #[test]
    fn parses_fields_and_optional_tags() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[0],
            Mount {
                devno: "254:0".into(),
                root: "/".into(),
                mountpoint: "/".into(),
                fstype: "ext4".into(),
                source: "/dev/vda".into(),
                pid: None,
            }
        );
        assert_eq!(mounts[2].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[2].fstype, "xfs");
    }

    #[test]
    fn matches_by_devno_or_source() {
        let mounts = parse(SAMPLE);
        let found: Vec<_> = mountpoints_of(&mounts, "7:3", "loop3")
            .iter()
            .map(|m| m.mountpoint.clone())
            .collect();
        assert_eq!(found, vec![PathBuf::from("/mnt/with space")]);
        assert_eq!(
            mountpoints_of(&mounts, "8:18", "sdb2")[0].mountpoint,
            PathBuf::from("/home")
        );
        assert!(mountpoints_of(&mounts, "8:0", "sda").is_empty());
    }
}
