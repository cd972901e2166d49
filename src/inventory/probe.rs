//! On-disk contents through libblkid: every signature (as `wipefs` lists them), the
//! partition table and its entries. Opens each device once, read-only.

use crate::host::zfs_hint;
use crate::model::{PartitionTable, Signature};
use libblkid_rs::{BlkidFltr, BlkidProbe, BlkidProbeRet, BlkidSublks, BlkidSublksFlags};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("libblkid could not probe {what}: {source}")]
    Blkid {
        what: String,
        source: libblkid_rs::BlkidErr,
    },
}

/// The result of opening a device for probing.
#[derive(Debug)]
pub struct Opened {
    pub file: Option<File>,
    /// Why the exclusive open failed, when something else holds the device.
    pub busy: Option<String>,
    /// Why the device could not be opened at all.
    pub error: Option<String>,
}

/// Probes through a shared read-only open, and tests the device with an `O_EXCL` open,
/// which fails with EBUSY while anything (a mount, a holder, swap, another exclusive
/// opener) claims it. The exclusive claim is dropped at once: held during probing it
/// would make a concurrent `mkfs` or `mount` of the device fail.
pub fn open(path: &Path) -> Opened {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => {
            return Opened {
                file: None,
                busy: None,
                error: Some(format!("open {}: {e}", path.display())),
            }
        }
    };
    // Opened and closed where no program starting meanwhile (the daemon's health reads)
    // inherits the claim and holds it on past the close, into a step's mount.
    let exclusive = crate::host::cmd::without_spawns(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(path)
            .map(drop)
    });
    let busy = match exclusive {
        Ok(()) => None,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Some(format!("exclusive open of {} failed: {e}", path.display()))
        }
        // Anything else (a race with removal, say) is no claim by someone else.
        Err(_) => None,
    };
    Opened {
        file: Some(file),
        busy,
        error: None,
    }
}

/// A partition table entry as written on the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableEntry {
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub type_id: Option<String>,
    pub part_uuid: Option<String>,
    pub name: Option<String>,
    /// GPT attribute bits (0 for dos).
    pub attributes: u64,
}

/// What libblkid found on a whole disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskContents {
    pub signatures: Vec<Signature>,
    pub table: Option<PartitionTable>,
    pub entries: Vec<TableEntry>,
}

pub fn probe_disk(file: &File, what: &str) -> Result<DiskContents, ProbeError> {
    let err = |source| ProbeError::Blkid {
        what: what.to_string(),
        source,
    };
    // One probe for both passes: libblkid keeps the blocks it read in its buffers.
    let mut probe = new_probe(file, 0, 0).map_err(err)?;
    let mut signatures = list_signatures(&mut probe, file, 0, 0).map_err(err)?;
    crate::host::probe::mark_unfinished(&mut signatures, file, 0);
    let (table, entries) = read_table(&mut probe).map_err(err)?;
    Ok(DiskContents {
        signatures,
        table,
        entries,
    })
}

/// Signatures in the byte range `offset..offset+size` of `file` (size 0: to the end).
pub fn signatures_at(
    file: &File,
    offset: u64,
    size: u64,
    what: &str,
) -> Result<Vec<Signature>, ProbeError> {
    let err = |source| ProbeError::Blkid {
        what: what.to_string(),
        source,
    };
    let mut probe = new_probe(file, offset, size).map_err(err)?;
    let mut signatures = list_signatures(&mut probe, file, offset, size).map_err(err)?;
    crate::host::probe::mark_unfinished(&mut signatures, file, offset);
    Ok(signatures)
}

fn new_probe(file: &File, offset: u64, size: u64) -> libblkid_rs::Result<BlkidProbe> {
    let mut probe = BlkidProbe::new()?;
    probe.set_device(file.as_raw_fd(), to_loff(offset), to_loff(size))?;
    Ok(probe)
}

/// Every signature in the region `offset..offset+size` of `file` that `probe` is set to.
fn list_signatures(
    probe: &mut BlkidProbe,
    file: &File,
    offset: u64,
    size: u64,
) -> libblkid_rs::Result<Vec<Signature>> {
    probe.enable_partitions(false)?;
    probe.enable_superblocks(true)?;
    probe.set_superblock_flags(BlkidSublksFlags::new(vec![
        BlkidSublks::Type,
        BlkidSublks::Usage,
        BlkidSublks::Label,
        BlkidSublks::Uuid,
        BlkidSublks::Magic,
        BlkidSublks::Badcsum,
    ]))?;
    // libblkid's ZFS prober reads 1 MiB per device; it runs where it could find a label.
    if !zfs_hint::may_hold_zfs_label(file, offset, size) {
        probe.filter_superblock_type(BlkidFltr::Notin, &[zfs_hint::ZFS_PROBER])?;
    }
    // Each do_probe continues after the last match, so the loop lists every signature
    // (a leftover swap header under a new ext4, say), like `wipefs` does.
    let mut found = Vec::new();
    while probe.do_probe()? == BlkidProbeRet::Success {
        let value = |key: &str| probe.lookup_value(key).ok().filter(|v| !v.is_empty());
        if let Some(kind) = value("TYPE") {
            found.push(Signature {
                kind,
                usage: value("USAGE"),
                label: value("LABEL"),
                uuid: value("UUID"),
                unfinished: false,
            });
        }
    }
    Ok(found)
}

fn read_table(
    probe: &mut BlkidProbe,
) -> libblkid_rs::Result<(Option<PartitionTable>, Vec<TableEntry>)> {
    probe.reset();
    probe.enable_superblocks(false)?;
    probe.enable_partitions(true)?;
    // No partition table is not an error: the list is simply absent.
    let Ok(mut list) = probe.get_partitions() else {
        return Ok((None, Vec::new()));
    };
    let Ok(table) = list.get_table() else {
        return Ok((None, Vec::new()));
    };
    let kind = table.get_type()?;
    let uuid = table
        .get_id()
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_ascii_lowercase());
    let count = list.number_of_partitions()?;
    let mut entries = Vec::new();
    for i in 0..count {
        let part = list.get_partition(i)?;
        entries.push(TableEntry {
            number: part.get_partno()?,
            start_bytes: sectors_to_bytes(*part.get_start().as_ref()),
            size_bytes: sectors_to_bytes(*part.get_size().as_ref()),
            type_id: part_type(&part, &kind),
            part_uuid: part
                .get_uuid()
                .ok()
                .flatten()
                .map(|u| u.hyphenated().to_string()),
            name: part.get_name().ok().flatten().filter(|n| !n.is_empty()),
            attributes: part.get_flags(),
        });
    }
    Ok((Some(PartitionTable { kind, uuid }), entries))
}

/// GPT: the type GUID in lower case; dos: the type byte as `0x83`.
fn part_type(part: &libblkid_rs::BlkidPartition<'_>, table_kind: &str) -> Option<String> {
    if table_kind == "gpt" {
        return part.get_type_string().ok().map(|s| s.to_ascii_lowercase());
    }
    let code = part.get_type();
    (code != 0).then(|| format!("0x{code:x}"))
}

/// libblkid counts partition offsets in 512-byte sectors whatever the device's sector size.
fn sectors_to_bytes(sectors: i64) -> u64 {
    u64::try_from(sectors).unwrap_or(0).saturating_mul(512)
}

fn to_loff(bytes: u64) -> libblkid_rs::blkid_loff_t {
    libblkid_rs::blkid_loff_t::try_from(bytes).unwrap_or(libblkid_rs::blkid_loff_t::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn zfs_is_found_where_it_is_and_only_there() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("zfs.img");
        crate::host::probe::tests::zfs_like_image(&img);
        let file = File::open(&img).unwrap();
        let kinds = |sigs: Vec<Signature>| sigs.into_iter().map(|s| s.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(probe_disk(&file, "zfs.img").unwrap().signatures),
            ["zfs_member"]
        );
        assert_eq!(
            kinds(signatures_at(&file, 0, 0, "zfs.img").unwrap()),
            ["zfs_member"]
        );
        // The same bytes seen from 64 MiB on hold no label.
        assert!(signatures_at(&file, 64 << 20, 0, "zfs.img")
            .unwrap()
            .is_empty());
    }
}
