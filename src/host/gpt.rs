//! Writing and reading GPT partition tables (gpt crate): protective MBR, primary and
//! backup headers, kvstrap's partition type, the UUIDs and names the planner chose.

use crate::host::{blockdev, Outcome};
use crate::model::{DiskLayout, KVSTRAP_PART_TYPE};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Partitions are placed on 1 MiB boundaries (what every partitioning tool does).
pub const ALIGNMENT_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("cannot open {}: {source}", disk.display())]
    Open {
        disk: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid layout for {}: {detail}", disk.display())]
    Layout { disk: PathBuf, detail: String },
    #[error("{} is {actual} bytes but the plan was made for {planned} bytes: re-run `kvstrap plan`", disk.display())]
    SizeChanged {
        disk: PathBuf,
        planned: u64,
        actual: u64,
    },
    #[error("writing the partition table of {}: {detail}", disk.display())]
    Write { disk: PathBuf, detail: String },
    #[error("reading the partition table of {}: {detail}", disk.display())]
    Read { disk: PathBuf, detail: String },
    #[error(transparent)]
    Device(#[from] blockdev::QueryError),
}

/// One entry of a GPT as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptEntry {
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub type_guid: uuid::Uuid,
    pub part_uuid: uuid::Uuid,
    pub name: String,
}

/// A GPT as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptTable {
    pub disk_guid: uuid::Uuid,
    pub entries: Vec<GptEntry>,
}

impl GptTable {
    /// The table `layout` describes, as it would read back from disk.
    pub fn from_layout(layout: &DiskLayout) -> GptTable {
        let entries = layout
            .partitions
            .iter()
            .map(|p| GptEntry {
                number: p.number,
                start_bytes: p.start_bytes,
                size_bytes: p.size_bytes,
                type_guid: KVSTRAP_PART_TYPE,
                part_uuid: p.part_uuid,
                name: p.name.clone(),
            })
            .collect();
        GptTable {
            disk_guid: layout.disk_guid,
            entries,
        }
    }
}

/// Write the GPT of `layout` to `layout.disk` unless the disk already carries exactly that
/// table. The caller has decided the disk is ours or empty; the kernel is not told here
/// (see `blkpg::sync_partitions`).
pub fn write_partition_table(layout: &DiskLayout) -> Result<Outcome, GptError> {
    let lb = validate_layout(layout)?;
    let disk = &layout.disk;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|source| GptError::Open {
            disk: disk.clone(),
            source,
        })?;
    let actual = blockdev::device_size(&file, disk).or_else(|_| file_len(&file, disk))?;
    if actual != layout.size_bytes {
        return Err(GptError::SizeChanged {
            disk: disk.clone(),
            planned: layout.size_bytes,
            actual,
        });
    }
    if read_table(&mut file, disk, lb, Headers::Both)?.as_ref()
        == Some(&GptTable::from_layout(layout))
    {
        return Ok(Outcome::Unchanged);
    }
    write_table(&mut file, layout, lb)?;
    crate::host::failpoint("write_partition_table");
    Ok(Outcome::Changed(format!(
        "{}: wrote GPT {} with {} partition(s)",
        disk.display(),
        layout.disk_guid,
        layout.partitions.len()
    )))
}

fn write_table(file: &mut File, layout: &DiskLayout, lb: LogicalBlockSize) -> Result<(), GptError> {
    let disk = &layout.disk;
    let werr = |detail: String| GptError::Write {
        disk: disk.clone(),
        detail,
    };
    let sectors = layout.size_bytes / lb.as_u64();
    // The protective MBR covers the whole disk, capped at what 32 bits can say.
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(file)
        .map_err(|e| werr(format!("protective MBR: {e}")))?;
    let device = HeaderWatch {
        file: &mut *file,
        backup_header_at: sectors.saturating_sub(1).saturating_mul(lb.as_u64()),
    };
    let mut gdisk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(device, Some(layout.disk_guid))
        .map_err(|e| werr(e.to_string()))?;
    gdisk
        .update_partitions(entries(layout, lb))
        .map_err(|e| werr(e.to_string()))?;
    gdisk.write_inplace().map_err(|e| werr(e.to_string()))?;
    drop(gdisk);
    file.sync_all().map_err(|e| werr(format!("fsync: {e}")))
}

/// The disk as the gpt crate sees it, with one test hook: the crate writes the partition
/// arrays, then the backup header (last sector), then the primary header. Right after the
/// backup header the failpoint `gpt_backup_written` can end the process, leaving the torn
/// table a power cut between the two header writes would leave.
#[derive(Debug)]
struct HeaderWatch<'a> {
    file: &'a mut File,
    backup_header_at: u64,
}

impl Read for HeaderWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for HeaderWatch<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl Write for HeaderWatch<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let at = self.file.stream_position()?;
        let n = self.file.write(buf)?;
        if at == self.backup_header_at {
            crate::host::failpoint("gpt_backup_written");
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn entries(layout: &DiskLayout, lb: LogicalBlockSize) -> BTreeMap<u32, Partition> {
    let kind = Type {
        guid: KVSTRAP_PART_TYPE,
        os: OperatingSystem::Custom("kvstrap".into()),
    };
    layout
        .partitions
        .iter()
        .map(|p| {
            let first = p.start_bytes / lb.as_u64();
            let part = Partition {
                part_type_guid: kind.clone(),
                part_guid: p.part_uuid,
                first_lba: first,
                last_lba: first + p.size_bytes / lb.as_u64() - 1,
                flags: p.attribute_bits(),
                name: p.name.clone(),
            };
            (p.number, part)
        })
        .collect()
}

/// Check what the gpt crate would silently get wrong: it packs entries in number order,
/// so numbers must be 1..=n; it truncates names; it does not check overlaps.
pub fn validate_layout(layout: &DiskLayout) -> Result<LogicalBlockSize, GptError> {
    let bad = |detail: String| GptError::Layout {
        disk: layout.disk.clone(),
        detail,
    };
    let lb = match layout.logical_sector_size {
        512 => LogicalBlockSize::Lb512,
        4096 => LogicalBlockSize::Lb4096,
        n => return Err(bad(format!("logical sector size {n} is not 512 or 4096"))),
    };
    // Room at the end for the backup partition array (128 entries of 128 bytes) and header.
    let backup_bytes = 128 * 128 + lb.as_u64();
    let last_usable_end = layout.size_bytes.saturating_sub(backup_bytes);
    let mut previous_end = ALIGNMENT_BYTES;
    for (i, p) in layout.partitions.iter().enumerate() {
        if usize::try_from(p.number).ok() != Some(i + 1) {
            return Err(bad(format!(
                "partition numbers must be 1..={}, found {} at position {}",
                layout.partitions.len(),
                p.number,
                i + 1
            )));
        }
        if p.start_bytes % ALIGNMENT_BYTES != 0
            || p.size_bytes % lb.as_u64() != 0
            || p.size_bytes == 0
        {
            return Err(bad(format!(
                "partition {} ({}+{}) is not 1 MiB aligned or is empty",
                p.number, p.start_bytes, p.size_bytes
            )));
        }
        if p.start_bytes < previous_end {
            return Err(bad(format!(
                "partition {} overlaps the one before or the GPT",
                p.number
            )));
        }
        previous_end = p.start_bytes + p.size_bytes;
        if previous_end > last_usable_end {
            return Err(bad(format!(
                "partition {} ends past the last usable sector",
                p.number
            )));
        }
        if p.name.encode_utf16().count() > 36 {
            return Err(bad(format!(
                "partition name {:?} is longer than 36 UTF-16 units",
                p.name
            )));
        }
    }
    Ok(lb)
}

/// Read the GPT of `disk`; None unless both its headers are valid.
pub fn read_partition_table(disk: &Path) -> Result<Option<GptTable>, GptError> {
    read_partition_table_with(disk, Headers::Both)
}

/// Like [`read_partition_table`], but one valid header is enough: what a write cut short
/// between the backup and the primary header leaves (the gpt crate writes the backup
/// first). The executor uses it only to recognise its own interrupted write of the very
/// table it is about to write again.
pub fn read_partition_table_any_header(disk: &Path) -> Result<Option<GptTable>, GptError> {
    read_partition_table_with(disk, Headers::Either)
}

/// Which GPT headers must be valid for a table to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Headers {
    Both,
    Either,
}

fn read_partition_table_with(disk: &Path, headers: Headers) -> Result<Option<GptTable>, GptError> {
    let mut file = File::open(disk).map_err(|source| GptError::Open {
        disk: disk.to_path_buf(),
        source,
    })?;
    let lb = match blockdev::logical_sector_size(&file, disk) {
        Ok(4096) => LogicalBlockSize::Lb4096,
        _ => LogicalBlockSize::Lb512,
    };
    read_table(&mut file, disk, lb, headers)
}

fn read_table(
    file: &mut File,
    disk: &Path,
    lb: LogicalBlockSize,
    headers: Headers,
) -> Result<Option<GptTable>, GptError> {
    // Normally both headers must be valid: a disk with one damaged header does not "match".
    let opened = gpt::GptConfig::new()
        .logical_block_size(lb)
        .only_valid_headers(headers == Headers::Both)
        .open_from_device(&mut *file);
    let gdisk = match opened {
        Ok(d) => d,
        Err(gpt::GptError::Io(e)) => {
            return Err(GptError::Read {
                disk: disk.to_path_buf(),
                detail: e.to_string(),
            })
        }
        Err(_) => return Ok(None),
    };
    let mut entries = Vec::new();
    for (&number, p) in gdisk.partitions().iter().filter(|(_, p)| p.is_used()) {
        let rerr = |e: std::io::Error| GptError::Read {
            disk: disk.to_path_buf(),
            detail: e.to_string(),
        };
        entries.push(GptEntry {
            number,
            start_bytes: p.bytes_start(lb).map_err(rerr)?,
            size_bytes: p.bytes_len(lb).map_err(rerr)?,
            type_guid: p.part_type_guid.guid,
            part_uuid: p.part_guid,
            name: p.name.clone(),
        });
    }
    Ok(Some(GptTable {
        disk_guid: *gdisk.guid(),
        entries,
    }))
}

fn file_len(file: &File, disk: &Path) -> Result<u64, GptError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| GptError::Open {
            disk: disk.to_path_buf(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::model::PartitionSpec;

    const MIB: u64 = 1 << 20;

    pub(crate) fn layout(path: &Path, size: u64, parts: &[(u64, u64)]) -> DiskLayout {
        DiskLayout {
            disk: path.to_path_buf(),
            identity: "path:test".into(),
            group: "g".into(),
            disk_guid: uuid::Uuid::from_u128(0x1111),
            size_bytes: size,
            logical_sector_size: 512,
            partitions: parts
                .iter()
                .enumerate()
                .map(|(i, &(start, len))| PartitionSpec {
                    number: u32::try_from(i + 1).unwrap(),
                    start_bytes: start,
                    size_bytes: len,
                    part_uuid: uuid::Uuid::from_u128(0x2000 + i as u128),
                    name: format!("kvstrap-v{i:02}"),
                    device: PathBuf::from(format!("/dev/null{i}")),
                    filesystem: None,
                    role: Default::default(),
                    encryption: None,
                })
                .collect(),
        }
    }

    #[test]
    fn writes_and_reads_back_a_table_on_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(64 * MIB).unwrap();
        let l = layout(&img, 64 * MIB, &[(MIB, 20 * MIB), (21 * MIB, 42 * MIB)]);
        assert!(write_partition_table(&l).unwrap().is_changed());
        let table = read_partition_table(&img).unwrap().unwrap();
        assert_eq!(table, GptTable::from_layout(&l));
        assert_eq!(write_partition_table(&l).unwrap(), Outcome::Unchanged);
        // Protective MBR: type 0xEE in the first partition record, boot signature.
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(bytes[446 + 4], 0xEE);
        assert_eq!(&bytes[510..512], &[0x55, 0xAA]);
        // Backup header in the last sector.
        assert_eq!(&bytes[bytes.len() - 512..bytes.len() - 504], b"EFI PART");
    }

    #[test]
    fn a_different_layout_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(64 * MIB).unwrap();
        write_partition_table(&layout(&img, 64 * MIB, &[(MIB, 20 * MIB)])).unwrap();
        let l2 = layout(&img, 64 * MIB, &[(MIB, 10 * MIB), (11 * MIB, 10 * MIB)]);
        assert!(write_partition_table(&l2).unwrap().is_changed());
        assert_eq!(
            read_partition_table(&img).unwrap().unwrap().entries.len(),
            2
        );
    }

    #[test]
    fn refuses_a_disk_whose_size_changed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(32 * MIB).unwrap();
        let err = write_partition_table(&layout(&img, 64 * MIB, &[(MIB, 20 * MIB)])).unwrap_err();
        assert!(matches!(err, GptError::SizeChanged { .. }), "{err}");
    }

    #[test]
    fn validation_rejects_what_the_gpt_crate_would_get_wrong() {
        let p = Path::new("/dev/x");
        assert!(validate_layout(&layout(p, 64 * MIB, &[(MIB, 10 * MIB)])).is_ok());
        assert!(validate_layout(&layout(p, 64 * MIB, &[(MIB + 512, 10 * MIB)])).is_err());
        assert!(validate_layout(&layout(p, 64 * MIB, &[(MIB, 10 * MIB), (5 * MIB, MIB)])).is_err());
        assert!(validate_layout(&layout(p, 64 * MIB, &[(MIB, 63 * MIB)])).is_err());
        assert!(validate_layout(&layout(p, 64 * MIB, &[(0, MIB)])).is_err());
        let mut l = layout(p, 64 * MIB, &[(MIB, MIB), (2 * MIB, MIB)]);
        l.partitions[1].number = 3;
        assert!(validate_layout(&l).is_err());
        let mut l = layout(p, 64 * MIB, &[(MIB, MIB)]);
        l.partitions[0].name = "x".repeat(37);
        assert!(validate_layout(&l).is_err());
        l.logical_sector_size = 1024;
        assert!(validate_layout(&l).is_err());
    }

    #[test]
    fn a_file_without_gpt_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(8 * MIB).unwrap();
        assert_eq!(read_partition_table(&img).unwrap(), None);
    }
}
