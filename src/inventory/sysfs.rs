//! What the kernel says about block devices: /sys/block and the /sys/devices path
//! behind each entry (identity, geometry, transport, partitions, holders).

use super::byid::{self, IdFacts};
use super::InventoryError;
use std::path::{Path, PathBuf};

/// One whole block device as sysfs describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SysDisk {
    pub name: String,
    pub devno: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub transport: String,
    /// SCSI peripheral type (`device/type`): 5 is a CD/DVD drive.
    pub scsi_type: Option<u32>,
    pub holders: Vec<String>,
    pub backing_file: Option<PathBuf>,
    pub partitions: Vec<SysPartition>,
    pub ids: IdFacts,
    /// A dm-multipath map or one of its paths (filled in by `multipath::fold`).
    pub multipath: super::multipath::Role,
}

/// A partition the kernel knows (it has a device node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysPartition {
    pub name: String,
    pub number: u32,
    pub devno: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub holders: Vec<String>,
}

/// Sysfs always counts `size` and `start` in 512-byte units, whatever the sector size.
const SYSFS_SECTOR: u64 = 512;

/// Every whole disk under `<sys_root>/block`, unattached loop devices left out.
pub fn list_disks(sys_root: &Path) -> Result<Vec<SysDisk>, InventoryError> {
    Ok(disk_names(sys_root)?
        .iter()
        .map(|name| read_disk(sys_root, name))
        .collect())
}

/// The kernel names of the disks [`list_disks`] reads (one directory listing; each
/// disk is then read with [`read_disk`], which the scan does in parallel).
pub fn disk_names(sys_root: &Path) -> Result<Vec<String>, InventoryError> {
    let block = sys_root.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| InventoryError::Read {
        path: block.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = block.join(&name);
        // Hidden disks (NVMe multipath paths) are reached through their visible head.
        if !is_unattached_loop(&dir, &name) && number(&dir, "hidden") != Some(1) {
            names.push(name);
        }
    }
    Ok(names)
}

/// The kernel keeps idle loop devices around; they are not disks.
fn is_unattached_loop(dir: &Path, name: &str) -> bool {
    name.starts_with("loop")
        && number(dir, "size") == Some(0)
        && attr(&dir.join("loop"), "backing_file").is_none()
}

/// Reads one `/sys/block/<name>` entry; missing attributes stay empty rather than fail,
/// since drivers expose different subsets.
pub fn read_disk(sys_root: &Path, name: &str) -> SysDisk {
    let dir = sys_root.join("block").join(name);
    let device_path = devices_path(sys_root, &dir);
    let transport = transport(name, &device_path);
    let scsi_type = attr(&dir.join("device"), "type").and_then(|t| t.parse().ok());
    let ids = id_facts(&dir, &transport);
    SysDisk {
        name: name.to_string(),
        devno: attr(&dir, "dev").unwrap_or_default(),
        size_bytes: number(&dir, "size").unwrap_or(0) * SYSFS_SECTOR,
        logical_sector_size: sector(&dir, "logical_block_size"),
        physical_sector_size: sector(&dir, "physical_block_size"),
        rotational: number(&dir.join("queue"), "rotational") == Some(1),
        removable: number(&dir, "removable") == Some(1),
        read_only: number(&dir, "ro") == Some(1),
        model: ids.model.clone(),
        vendor: ids.vendor.clone(),
        serial: ids.serial.clone(),
        wwn: wwn(&ids),
        scsi_type,
        holders: list_names(&dir.join("holders")),
        backing_file: attr(&dir.join("loop"), "backing_file").map(PathBuf::from),
        partitions: partitions(&dir, name),
        transport,
        ids,
        multipath: Default::default(),
    }
}

fn sector(dir: &Path, name: &str) -> u32 {
    attr(&dir.join("queue"), name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// The device's path below `/sys/devices`, e.g. `pci0000:00/0000:00:02.0/virtio1/block/vda`.
fn devices_path(sys_root: &Path, dir: &Path) -> String {
    let (Ok(real), Ok(root)) = (dir.canonicalize(), sys_root.canonicalize()) else {
        return String::new();
    };
    real.strip_prefix(root.join("devices"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Transport from the kernel name and the bus path, as lsblk's TRAN column names it.
pub fn transport(name: &str, device_path: &str) -> String {
    let has = |part: &str| device_path.contains(part);
    let t = if name.starts_with("loop") {
        "loop"
    } else if name.starts_with("zram") {
        "zram"
    } else if name.starts_with("nvme") || has("/nvme/") {
        "nvme"
    } else if has("/usb") {
        "usb"
    } else if name.starts_with("mmcblk") || has("/mmc_host/") {
        "mmc"
    } else if has("/ata") {
        "sata"
    } else if has("/end_device-") || has("/sas_") || has("/expander-") {
        "sas"
    } else if name.starts_with("vd") && has("/virtio") {
        "virtio"
    } else if has("/host") && has("/target") {
        "scsi"
    } else {
        "unknown"
    };
    t.to_string()
}

fn id_facts(dir: &Path, transport: &str) -> IdFacts {
    let device = dir.join("device");
    let mut f = IdFacts {
        transport: transport.to_string(),
        ..Default::default()
    };
    match transport {
        "nvme" => {
            f.model = attr(&device, "model");
            f.serial = attr(&device, "serial");
            f.wwid = attr(dir, "wwid").or_else(|| attr(&device, "wwid"));
            f.nsid = attr(dir, "nsid");
        }
        "virtio" => {
            f.serial = attr(dir, "serial");
            f.vendor = attr(&device, "vendor");
        }
        "mmc" => {
            f.model = attr(&device, "name");
            f.serial = attr(&device, "serial");
            f.vendor = attr(&device, "manfid");
        }
        "sata" | "sas" | "scsi" | "usb" => scsi_facts(dir, &mut f),
        _ => {}
    }
    f
}

/// SCSI-attached disks: INQUIRY vendor/model, VPD 0x80 serial, wwid; ATA disks behind
/// libata also carry the full IDENTIFY data (VPD 0x89), which is where udev's
/// ata_id reads the untruncated model and serial.
fn scsi_facts(dir: &Path, f: &mut IdFacts) {
    let device = dir.join("device");
    f.vendor = attr(&device, "vendor");
    f.model = attr(&device, "model");
    f.serial = std::fs::read(device.join("vpd_pg80"))
        .ok()
        .and_then(|b| vpd_serial(&b));
    f.wwid = attr(&device, "wwid");
    f.scsi_address = device
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if f.transport == "sata" {
        if let Some((model, serial)) = std::fs::read(device.join("vpd_pg89"))
            .ok()
            .and_then(|b| ata_identity(&b))
        {
            f.model = Some(model);
            f.serial = Some(serial);
        }
        // libata's INQUIRY vendor is always "ATA": not the maker.
        if f.vendor.as_deref() == Some("ATA") {
            f.vendor = None;
        }
    }
    if f.transport == "usb" {
        if let Some(serial) = usb_serial(&device) {
            f.serial = Some(serial);
        }
    }
}

fn wwn(ids: &IdFacts) -> Option<String> {
    let wwid = ids.wwid.as_deref()?;
    match ids.transport.as_str() {
        "nvme" => Some(wwid.to_string()),
        _ => byid::wwn_from_wwid(wwid),
    }
}

/// Unit serial number VPD page: 4-byte header, then the ASCII serial.
pub fn vpd_serial(page: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(page.get(4..)?)
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string();
    (!text.is_empty()).then_some(text)
}

/// Model and serial from the ATA IDENTIFY data inside VPD page 0x89 (at offset 60):
/// words 10-19 (serial) and 27-46 (model), each word byte-swapped.
pub fn ata_identity(page: &[u8]) -> Option<(String, String)> {
    let identify = page.get(60..60 + 512)?;
    let text = |from: usize, to: usize| -> String {
        let swapped: Vec<u8> = identify[from..to]
            .chunks(2)
            .flat_map(|w| [w[1], w[0]])
            .collect();
        String::from_utf8_lossy(&swapped)
            .trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_string()
    };
    let (serial, model) = (text(20, 40), text(54, 94));
    (!serial.is_empty() && !model.is_empty()).then_some((model, serial))
}

/// The USB device's own serial: the first ancestor with `idVendor` has it.
fn usb_serial(scsi_device: &Path) -> Option<String> {
    let mut dir = scsi_device.canonicalize().ok()?;
    while dir.pop() {
        if dir.join("idVendor").exists() {
            return attr(&dir, "serial");
        }
    }
    None
}

/// Partitions are the subdirectories named after the disk (`sda1`, `nvme0n1p2`).
fn partitions(dir: &Path, disk: &str) -> Vec<SysPartition> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut parts: Vec<SysPartition> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(disk))
        .filter_map(|e| {
            let p = e.path();
            let number = number(&p, "partition")?;
            Some(SysPartition {
                name: e.file_name().to_string_lossy().into_owned(),
                number: u32::try_from(number).ok()?,
                devno: attr(&p, "dev").unwrap_or_default(),
                start_bytes: number_or_zero(&p, "start") * SYSFS_SECTOR,
                size_bytes: number_or_zero(&p, "size") * SYSFS_SECTOR,
                holders: list_names(&p.join("holders")),
            })
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    parts
}

/// Names of the entries of a directory (holders, slaves), sorted.
pub fn list_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A sysfs attribute, trimmed; `None` when missing, unreadable or empty.
pub fn attr(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!text.is_empty()).then(|| text.to_string())
}

fn number(dir: &Path, name: &str) -> Option<u64> {
    attr(dir, name)?.parse().ok()
}

fn number_or_zero(dir: &Path, name: &str) -> u64 {
    number(dir, name).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn transport_from_device_path() {
        let cases = [
            ("nvme0n1", "pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/nvme0n1", "nvme"),
            ("sda", "pci0000:00/0000:00:17.0/ata3/host2/target2:0:0/2:0:0:0/block/sda", "sata"),
            ("sdb", "pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb", "usb"),
            ("sdc", "pci0000:00/0000:17:00.0/host0/port-0:0/end_device-0:0/target0:0:0/0:0:0:0/block/sdc", "sas"),
            ("sdd", "pci0000:00/0000:00:03.0/virtio2/host0/target0:0:0/0:0:0:0/block/sdd", "scsi"),
            ("vda", "pci0000:00/0000:00:02.0/virtio1/block/vda", "virtio"),
            ("mmcblk0", "platform/fe320000.mmc/mmc_host/mmc1/mmc1:0001/block/mmcblk0", "mmc"),
            ("loop3", "virtual/block/loop3", "loop"),
            ("zram0", "virtual/block/zram0", "zram"),
            ("dm-0", "virtual/block/dm-0", "unknown"),
        ];
        for (name, path, want) in cases {
            assert_eq!(transport(name, path), want, "{name} at {path}");
        }
    }

    #[test]
    fn vpd_serial_skips_header() {
        assert_eq!(
            vpd_serial(b"\0\x80\0\x0c  ZA1B2C3D  "),
            Some("ZA1B2C3D".into())
        );
        assert_eq!(vpd_serial(b"\0\x80\0\0"), None);
    }

    #[test]
    fn ata_identity_swaps_bytes() {
        let mut page = vec![0u8; 60 + 512];
        let put = |page: &mut Vec<u8>, at: usize, len: usize, s: &str| {
            let mut padded = format!("{s:<len$}").into_bytes();
            for w in padded.chunks_mut(2) {
                w.swap(0, 1);
            }
            page[60 + at..60 + at + len].copy_from_slice(&padded);
        };
        put(&mut page, 20, 20, "WD-WCC7K1234567");
        put(&mut page, 54, 40, "WDC WD40EFRX-68N32N0");
        assert_eq!(
            ata_identity(&page),
            Some(("WDC WD40EFRX-68N32N0".into(), "WD-WCC7K1234567".into()))
        );
        assert_eq!(ata_identity(&page[..100]), None);
    }
}
