//! `/dev/disk/by-id` names: read from udev's links when they exist, otherwise computed
//! from sysfs facts the way systemd-udevd's 60-persistent-storage rules name them.

use std::collections::BTreeMap;
use std::path::Path;

/// The sysfs facts udev's rules use to name a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdFacts {
    /// Lower-case transport as in `Disk::transport`.
    pub transport: String,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Raw `wwid` attribute: `eui.…`, `naa.…`, `t10.…`, `nvme.…`.
    pub wwid: Option<String>,
    /// NVMe namespace id.
    pub nsid: Option<String>,
    /// SCSI `host:channel:target:lun` of the disk, for USB instance names.
    pub scsi_address: Option<String>,
}

/// The by-id names (without the `/dev/disk/by-id/` prefix) udev would give the disk.
pub fn compute(facts: &IdFacts) -> Vec<String> {
    let mut names = match facts.transport.as_str() {
        "nvme" => nvme_names(facts),
        "sata" => ata_names(facts),
        "scsi" | "sas" => scsi_names(facts),
        "usb" => usb_names(facts),
        "virtio" => facts
            .serial
            .iter()
            .map(|s| format!("virtio-{}", escape(&truncate(s, 20))))
            .collect(),
        "mmc" => mmc_names(facts),
        _ => Vec::new(),
    };
    names.sort();
    names.dedup();
    names
}

/// The by-id names of partition `number` of a disk with `disk_names`.
pub fn partition_names(disk_names: &[String], number: u32) -> Vec<String> {
    disk_names
        .iter()
        .map(|n| format!("{n}-part{number}"))
        .collect()
}

fn nvme_names(f: &IdFacts) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(wwid) = &f.wwid {
        names.push(format!("nvme-{}", escape(wwid)));
    }
    if let (Some(model), Some(serial)) = (&f.model, &f.serial) {
        let id = format!("{}_{}", escape(model), escape(serial));
        // systemd >= 254 adds a namespace-qualified name next to the classic one.
        if let Some(nsid) = &f.nsid {
            names.push(format!("nvme-{id}_{nsid}"));
        }
        names.push(format!("nvme-{id}"));
    }
    names
}

fn ata_names(f: &IdFacts) -> Vec<String> {
    let mut names = Vec::new();
    if let (Some(model), Some(serial)) = (&f.model, &f.serial) {
        names.push(format!("ata-{}_{}", collapse(model), collapse(serial)));
    }
    names.extend(wwn_name(f));
    names
}

fn scsi_names(f: &IdFacts) -> Vec<String> {
    let mut names: Vec<String> = scsi_id_serial(f)
        .into_iter()
        .map(|s| format!("scsi-{s}"))
        .collect();
    names.extend(wwn_name(f));
    names
}

/// scsi_id's ID_SERIAL: the VPD page 0x83 designator type as a digit, then its value.
fn scsi_id_serial(f: &IdFacts) -> Option<String> {
    let wwid = f.wwid.as_deref()?;
    let (kind, value) = wwid.split_once('.')?;
    let prefix = match kind {
        "naa" => "3",
        "eui" => "2",
        "t10" => "1",
        _ => return None,
    };
    Some(format!("{prefix}{}", collapse(value)))
}

fn wwn_name(f: &IdFacts) -> Option<String> {
    wwn_from_wwid(f.wwid.as_deref()?).map(|w| format!("wwn-{w}"))
}

/// The `0x…` WWN udev and lsblk show, from a `naa.…` wwid.
pub fn wwn_from_wwid(wwid: &str) -> Option<String> {
    let hex = wwid.strip_prefix("naa.")?;
    hex.chars()
        .all(|c| c.is_ascii_hexdigit())
        .then(|| format!("0x{}", hex.to_ascii_lowercase()))
}

fn usb_names(f: &IdFacts) -> Vec<String> {
    let vendor = f.vendor.as_deref().map(collapse).unwrap_or_default();
    let model = f.model.as_deref().map(collapse).unwrap_or_default();
    let mut id = format!("{vendor}_{model}");
    if let Some(serial) = f.serial.as_deref().filter(|s| !s.is_empty()) {
        id = format!("{id}_{}", collapse(serial));
    }
    // usb_id's ID_INSTANCE is "target:lun" of the SCSI address.
    let instance = f
        .scsi_address
        .as_deref()
        .and_then(|a| {
            let parts: Vec<&str> = a.split(':').collect();
            (parts.len() == 4).then(|| format!("{}:{}", parts[2], parts[3]))
        })
        .unwrap_or_else(|| "0:0".to_string());
    vec![format!("usb-{id}-{instance}")]
}

fn mmc_names(f: &IdFacts) -> Vec<String> {
    match (&f.model, &f.serial) {
        (Some(name), Some(serial)) => vec![format!("mmc-{}_{}", escape(name), escape(serial))],
        _ => Vec::new(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// udev's `udev_replace_whitespace` then `udev_replace_chars`: trim, collapse runs of
/// white space into one `_`, replace characters unsafe in a file name with `_`.
pub fn collapse(s: &str) -> String {
    escape(&s.split_whitespace().collect::<Vec<_>>().join("_"))
}

/// udev's `udev_replace_chars`: keep alphanumerics, `#+-.:=@_` and non-ASCII text,
/// replace anything else (white space included) with `_`.
pub fn escape(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) || !c.is_ascii() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads udev's links: kernel device name -> by-id names. `None` when the directory does
/// not exist (no udev), so that the names are computed instead.
pub fn read_links(dir: &Path) -> Option<BTreeMap<String, Vec<String>>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(device) = target.file_name() else {
            continue;
        };
        map.entry(device.to_string_lossy().into_owned())
            .or_default()
            .push(entry.file_name().to_string_lossy().into_owned());
    }
    for names in map.values_mut() {
        names.sort();
    }
    Some(map)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn facts(transport: &str) -> IdFacts {
        IdFacts {
            transport: transport.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nvme_names_use_model_serial_and_wwid() {
        let f = IdFacts {
            model: Some("Samsung SSD 970 EVO Plus 1TB".into()),
            serial: Some("S4EWNX0R123456".into()),
            wwid: Some("eui.0025385b71b1b2c3".into()),
            nsid: Some("1".into()),
            ..facts("nvme")
        };
        assert_eq!(
            compute(&f),
            vec![
                "nvme-Samsung_SSD_970_EVO_Plus_1TB_S4EWNX0R123456",
                "nvme-Samsung_SSD_970_EVO_Plus_1TB_S4EWNX0R123456_1",
                "nvme-eui.0025385b71b1b2c3",
            ]
        );
    }

    #[test]
    fn ata_names_collapse_white_space_and_add_wwn() {
        let f = IdFacts {
            model: Some("  WDC  WD40EFRX-68N32N0 ".into()),
            serial: Some("WD-WCC7K1234567".into()),
            wwid: Some("naa.50014EE2B1234567".into()),
            ..facts("sata")
        };
        assert_eq!(
            compute(&f),
            vec![
                "ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567",
                "wwn-0x50014ee2b1234567"
            ]
        );
    }

    #[test]
    fn scsi_names_follow_scsi_id() {
        let f = IdFacts {
            wwid: Some("naa.5000c500a1b2c3d4".into()),
            ..facts("sas")
        };
        assert_eq!(
            compute(&f),
            vec!["scsi-35000c500a1b2c3d4", "wwn-0x5000c500a1b2c3d4"]
        );
        let t10 = IdFacts {
            wwid: Some("t10.ATA     QEMU HARDDISK   QM00001".into()),
            ..facts("scsi")
        };
        assert_eq!(compute(&t10), vec!["scsi-1ATA_QEMU_HARDDISK_QM00001"]);
    }

    #[test]
    fn virtio_name_is_serial_truncated_to_20() {
        let f = IdFacts {
            serial: Some("abcdefghijklmnopqrstuvwxyz".into()),
            ..facts("virtio")
        };
        assert_eq!(compute(&f), vec!["virtio-abcdefghijklmnopqrst"]);
        assert!(compute(&facts("virtio")).is_empty(), "no serial, no name");
    }

    #[test]
    fn usb_name_has_instance() {
        let f = IdFacts {
            vendor: Some("SanDisk ".into()),
            model: Some("Cruzer Blade    ".into()),
            serial: Some("4C530001231126115213".into()),
            scsi_address: Some("6:0:0:0".into()),
            ..facts("usb")
        };
        assert_eq!(
            compute(&f),
            vec!["usb-SanDisk_Cruzer_Blade_4C530001231126115213-0:0"]
        );
    }

    #[test]
    fn loop_has_no_names_and_partitions_get_suffix() {
        assert!(compute(&facts("loop")).is_empty());
        let names = vec!["virtio-abc".to_string()];
        assert_eq!(partition_names(&names, 2), vec!["virtio-abc-part2"]);
    }

    #[test]
    fn escape_replaces_unsafe_characters() {
        assert_eq!(escape("a/b c\\d"), "a_b_c_d");
        assert_eq!(collapse(" a \t b "), "a_b");
    }

    #[test]
    fn read_links_maps_targets_to_devices() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../sda", dir.path().join("wwn-0x1")).unwrap();
        std::os::unix::fs::symlink("../../sda1", dir.path().join("wwn-0x1-part1")).unwrap();
        let map = read_links(dir.path()).unwrap();
        assert_eq!(map["sda"], vec!["wwn-0x1"]);
        assert_eq!(map["sda1"], vec!["wwn-0x1-part1"]);
        assert!(read_links(&dir.path().join("missing")).is_none());
    }
}
