//! Telling the kernel about partitions with BLKPG ioctls (what `partx` does), and waiting
//! for their device nodes. BLKRRPART is not used: on loop devices it creates no nodes.

use crate::host::Outcome;
use crate::model::PartitionSpec;
use std::ffi::c_int;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLKPG_ADD_PARTITION: c_int = 1;
const BLKPG_DEL_PARTITION: c_int = 2;
const BLKPG_RESIZE_PARTITION: c_int = 3;

/// `struct blkpg_partition` from linux/blkpg.h.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg` from linux/blkpg.h.
#[repr(C)]
struct BlkpgIoctlArg {
    op: c_int,
    flags: c_int,
    datalen: c_int,
    data: *mut BlkpgPartition,
}

nix::ioctl_write_ptr_bad!(
    blkpg_ioctl,
    nix::request_code_none!(0x12, 105),
    BlkpgIoctlArg
);

/// How long to wait for a partition node to appear before falling back to mknod.
const NODE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BlkpgError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BLKPG {op} of partition {number} on {}: {source}{hint}", disk.display())]
    Ioctl {
        op: &'static str,
        disk: PathBuf,
        number: u32,
        source: nix::Error,
        hint: &'static str,
    },
    #[error("cannot read the kernel's partitions of {} from {}: {source}", disk.display(), sysfs.display())]
    Sysfs {
        disk: PathBuf,
        sysfs: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the kernel already has partition {number} of {} at {}, where kvstrap wants start {} \
         length {}: another program changed the partitions; check `lsblk {}` and run plan again",
        disk.display(), describe_found(*found), wanted.0, wanted.1, disk.display()
    )]
    Conflict {
        disk: PathBuf,
        number: u32,
        wanted: (u64, u64),
        found: Option<(u64, u64)>,
    },
    #[error("{} is not a device name kvstrap understands", path.display())]
    BadName { path: PathBuf },
    #[error("partition node {} did not appear and could not be created: {detail}", node.display())]
    NodeMissing { node: PathBuf, detail: String },
}

fn describe_found(found: Option<(u64, u64)>) -> String {
    match found {
        Some((start, len)) => format!("start {start} length {len}"),
        None => "a place it no longer reports (it was busy, then went away)".into(),
    }
}

/// A partition as the kernel currently sees it (`/sys/class/block/<disk>/<part>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPartition {
    pub number: u32,
    /// Kernel name, e.g. `loop3p1`.
    pub name: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
}

/// What `sync_partitions` has to do, decided purely from the two lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionDelta {
    pub delete: Vec<u32>,
    pub resize: Vec<(u32, u64, u64)>,
    pub add: Vec<(u32, u64, u64)>,
}

impl PartitionDelta {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.resize.is_empty() && self.add.is_empty()
    }
}

/// Compare the kernel's view with the desired layout. A partition with the same number
/// and start but another length is resized; a different start means delete and add.
pub fn partition_delta(kernel: &[KernelPartition], wanted: &[PartitionSpec]) -> PartitionDelta {
    let mut delta = PartitionDelta::default();
    for k in kernel {
        match wanted.iter().find(|w| w.number == k.number) {
            Some(w) if w.start_bytes == k.start_bytes && w.size_bytes == k.size_bytes => {}
            Some(w) if w.start_bytes == k.start_bytes => {
                delta.resize.push((w.number, w.start_bytes, w.size_bytes))
            }
            _ => delta.delete.push(k.number),
        }
    }
    for w in wanted {
        let kept = kernel
            .iter()
            .any(|k| k.number == w.number && k.start_bytes == w.start_bytes);
        if !kept {
            delta.add.push((w.number, w.start_bytes, w.size_bytes));
        }
    }
    delta
}

/// Make the kernel's partitions of `disk` exactly `wanted`, then wait for the nodes.
pub fn sync_partitions(disk: &Path, wanted: &[PartitionSpec]) -> Result<Outcome, BlkpgError> {
    let kernel = kernel_partitions(disk)?;
    let delta = partition_delta(&kernel, wanted);
    if !delta.is_empty() {
        apply_delta(disk, &delta)?;
    }
    let created = wanted
        .iter()
        .map(|w| wait_for_node(&w.device))
        .collect::<Result<Vec<_>, _>>()?;
    let mknods: Vec<String> = created.into_iter().flatten().collect();
    if delta.is_empty() && mknods.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    crate::host::failpoint("sync_partitions");
    Ok(Outcome::Changed(describe(disk, &delta, &mknods)))
}

/// Delete every partition the kernel has for `disk` (what `partx -d` does) and return their
/// numbers. A loop device keeps partitions added with BLKPG after `losetup -d`.
pub fn delete_partitions(disk: &Path) -> Result<Vec<u32>, BlkpgError> {
    let numbers: Vec<u32> = kernel_partitions(disk)?.iter().map(|p| p.number).collect();
    if !numbers.is_empty() {
        let delta = PartitionDelta {
            delete: numbers.clone(),
            ..PartitionDelta::default()
        };
        apply_delta(disk, &delta)?;
    }
    Ok(numbers)
}

/// Step::AddPartitionNodes: tell the kernel about partitions `numbers` of the GPT that is
/// on `disk` (e.g. after a crash between the GPT write and BLKPG), leaving the others.
pub fn add_partition_nodes(disk: &Path, numbers: &[u32]) -> Result<Outcome, BlkpgError> {
    let unreadable = |detail: String| BlkpgError::NodeMissing {
        node: disk.to_path_buf(),
        detail,
    };
    let table = crate::host::gpt::read_partition_table(disk)
        .map_err(|e| unreadable(e.to_string()))?
        .ok_or_else(|| unreadable("the disk has no valid GPT".into()))?;
    let kernel = kernel_partitions(disk)?;
    let mut wanted: Vec<PartitionSpec> = Vec::new();
    for &n in numbers {
        let entry = table.entries.iter().find(|e| e.number == n);
        let entry = entry.ok_or_else(|| unreadable(format!("the GPT has no partition {n}")))?;
        wanted.push(PartitionSpec {
            number: n,
            start_bytes: entry.start_bytes,
            size_bytes: entry.size_bytes,
            part_uuid: entry.part_uuid,
            name: entry.name.clone(),
            device: partition_node(disk, n)?,
            filesystem: None,
            role: Default::default(),
            encryption: None,
        });
    }
    // Keep every kernel partition that is not being added.
    let mut delta = partition_delta(&kernel, &wanted);
    delta.delete.clear();
    if !delta.is_empty() {
        apply_delta(disk, &delta)?;
    }
    let created = wanted
        .iter()
        .map(|w| wait_for_node(&w.device))
        .collect::<Result<Vec<_>, _>>()?;
    let mknods: Vec<String> = created.into_iter().flatten().collect();
    if delta.is_empty() && mknods.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    crate::host::failpoint("sync_partitions");
    Ok(Outcome::Changed(describe(disk, &delta, &mknods)))
}

/// The node of partition `n`: `/dev/sda1`, but `/dev/loop3p1` and `/dev/nvme0n1p1` when
/// the disk name ends in a digit (the kernel's rule).
pub fn partition_node(disk: &Path, n: u32) -> Result<PathBuf, BlkpgError> {
    let name = kernel_name(disk)?;
    let sep = if name.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    Ok(disk.with_file_name(format!("{name}{sep}{n}")))
}

/// Make the kernel apply `delta` to `disk` with BLKPG ioctls (no node waiting).
pub fn apply_delta(disk: &Path, delta: &PartitionDelta) -> Result<(), BlkpgError> {
    let file = open_disk(disk)?;
    for &n in &delta.delete {
        blkpg(&file, disk, BLKPG_DEL_PARTITION, n, 0, 0)?;
    }
    for &(n, start, len) in &delta.resize {
        blkpg(&file, disk, BLKPG_RESIZE_PARTITION, n, start, len)?;
    }
    for &(n, start, len) in &delta.add {
        match blkpg(&file, disk, BLKPG_ADD_PARTITION, n, start, len) {
            // Someone (udev re-reading the table) added it first: fine if it is the one
            // we want, a clear error if it is not.
            Err(BlkpgError::Ioctl {
                source: nix::Error::EBUSY,
                ..
            }) => already_there(disk, n, start, len)?,
            other => other?,
        }
        crate::host::failpoint("partition_added");
    }
    Ok(())
}

/// After an EBUSY from BLKPG add: the kernel already has partition `number`. Success when
/// it has the wanted start and length, otherwise an error that says what differs.
fn already_there(disk: &Path, number: u32, start: u64, len: u64) -> Result<(), BlkpgError> {
    let kernel = kernel_partitions(disk)?;
    let found = kernel.iter().find(|k| k.number == number);
    match found {
        Some(k) if k.start_bytes == start && k.size_bytes == len => Ok(()),
        found => Err(BlkpgError::Conflict {
            disk: disk.to_path_buf(),
            number,
            wanted: (start, len),
            found: found.map(|k| (k.start_bytes, k.size_bytes)),
        }),
    }
}

fn describe(disk: &Path, delta: &PartitionDelta, mknods: &[String]) -> String {
    let mut parts = Vec::new();
    if !delta.delete.is_empty() {
        parts.push(format!("deleted kernel partitions {:?}", delta.delete));
    }
    if !delta.resize.is_empty() {
        parts.push(format!(
            "resized {:?}",
            delta.resize.iter().map(|r| r.0).collect::<Vec<_>>()
        ));
    }
    if !delta.add.is_empty() {
        parts.push(format!(
            "added {:?}",
            delta.add.iter().map(|a| a.0).collect::<Vec<_>>()
        ));
    }
    if !mknods.is_empty() {
        parts.push(format!("created nodes {}", mknods.join(", ")));
    }
    format!("{}: {}", disk.display(), parts.join(", "))
}

fn open_disk(disk: &Path) -> Result<File, BlkpgError> {
    File::open(disk).map_err(|source| BlkpgError::Open {
        path: disk.to_path_buf(),
        source,
    })
}

fn blkpg(
    file: &File,
    disk: &Path,
    op: c_int,
    number: u32,
    start: u64,
    len: u64,
) -> Result<(), BlkpgError> {
    let op_name = match op {
        BLKPG_ADD_PARTITION => "add",
        BLKPG_DEL_PARTITION => "delete",
        _ => "resize",
    };
    let too_big = |_| BlkpgError::Ioctl {
        op: op_name,
        disk: disk.to_path_buf(),
        number,
        source: nix::Error::EOVERFLOW,
        hint: "",
    };
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(too_big)?,
        length: i64::try_from(len).map_err(too_big)?,
        pno: c_int::try_from(number).map_err(too_big)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: c_int::try_from(std::mem::size_of::<BlkpgPartition>()).unwrap_or(c_int::MAX),
        data: &mut part,
    };
    // SAFETY: `arg` points to a live, correctly laid out blkpg_partition for the call.
    unsafe { blkpg_ioctl(file.as_raw_fd(), &arg) }
        .map(drop)
        .map_err(|source| BlkpgError::Ioctl {
            op: op_name,
            disk: disk.to_path_buf(),
            number,
            source,
            hint: if source == nix::Error::EBUSY && op != BLKPG_ADD_PARTITION {
                " (the kernel holds the partition: it is mounted, or a device such as LVM or \
                 dm-crypt sits on it; see `lsblk` and /sys/class/block/*/holders)"
            } else {
                ""
            },
        })
}

/// The kernel's partitions of `disk`, read from sysfs, ordered by number.
pub fn kernel_partitions(disk: &Path) -> Result<Vec<KernelPartition>, BlkpgError> {
    let name = kernel_name(disk)?;
    let sysfs = Path::new("/sys/class/block").join(&name);
    let err = |source| BlkpgError::Sysfs {
        disk: disk.to_path_buf(),
        sysfs: sysfs.clone(),
        source,
    };
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(&sysfs).map_err(err)? {
        let entry = entry.map_err(err)?;
        let dir = entry.path();
        let Ok(number) = read_sysfs_u64(&dir.join("partition")) else {
            continue;
        };
        parts.push(KernelPartition {
            number: u32::try_from(number).unwrap_or(u32::MAX),
            name: entry.file_name().to_string_lossy().into_owned(),
            // sysfs counts in 512-byte sectors whatever the logical block size.
            start_bytes: sectors_to_bytes(read_sysfs_u64(&dir.join("start")).map_err(err)?)
                .map_err(err)?,
            size_bytes: sectors_to_bytes(read_sysfs_u64(&dir.join("size")).map_err(err)?)
                .map_err(err)?,
        });
    }
    parts.sort_by_key(|p| p.number);
    Ok(parts)
}

fn sectors_to_bytes(sectors: u64) -> std::io::Result<u64> {
    sectors.checked_mul(512).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{sectors} sectors is more bytes than a u64 holds"),
        )
    })
}

fn read_sysfs_u64(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn kernel_name(dev: &Path) -> Result<String, BlkpgError> {
    dev.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| BlkpgError::BadName {
            path: dev.to_path_buf(),
        })
}

/// Wait until `node` is a block device with the number sysfs gives it. devtmpfs makes
/// the node asynchronously; poll with a growing backoff, then fall back to mknod.
/// Returns the node name when it had to be created here.
pub fn wait_for_node(node: &Path) -> Result<Option<String>, BlkpgError> {
    let name = kernel_name(node)?;
    let dev_file = Path::new("/sys/class/block").join(&name).join("dev");
    let deadline = Instant::now() + NODE_WAIT;
    let mut pause = Duration::from_micros(200);
    loop {
        let want = std::fs::read_to_string(&dev_file)
            .ok()
            .and_then(|s| parse_devno(&s));
        if let Some(want) = want {
            if node_has_devno(node, want) {
                return Ok(None);
            }
        }
        if Instant::now() >= deadline {
            return mknod_fallback(node, want).map(|()| Some(name));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn node_has_devno(node: &Path, devno: u64) -> bool {
    std::fs::metadata(node).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == devno)
}

fn mknod_fallback(node: &Path, want: Option<u64>) -> Result<(), BlkpgError> {
    let missing = |detail: String| BlkpgError::NodeMissing {
        node: node.to_path_buf(),
        detail,
    };
    let devno = want.ok_or_else(|| missing("the kernel does not know the partition".into()))?;
    tracing::info!(node = %node.display(), "partition node did not appear: creating it with mknod");
    // A stale node (wrong number) from an earlier layout is replaced.
    if std::fs::symlink_metadata(node).is_ok() {
        std::fs::remove_file(node).map_err(|e| missing(format!("removing stale node: {e}")))?;
    }
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o660);
    nix::sys::stat::mknod(node, nix::sys::stat::SFlag::S_IFBLK, mode, devno)
        .map_err(|e| missing(format!("mknod: {e}")))
}

/// Parse sysfs `MAJ:MIN` into a dev_t.
pub fn parse_devno(text: &str) -> Option<u64> {
    let (maj, min) = text.trim().split_once(':')?;
    Some(nix::sys::stat::makedev(
        maj.parse().ok()?,
        min.parse().ok()?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(number: u32, start: u64, size: u64) -> PartitionSpec {
        PartitionSpec {
            number,
            start_bytes: start,
            size_bytes: size,
            part_uuid: uuid::Uuid::nil(),
            name: format!("p{number}"),
            device: PathBuf::from(format!("/dev/loop9p{number}")),
            filesystem: None,
            role: Default::default(),
            encryption: None,
        }
    }

    fn kp(number: u32, start: u64, size: u64) -> KernelPartition {
        KernelPartition {
            number,
            name: format!("loop9p{number}"),
            start_bytes: start,
            size_bytes: size,
        }
    }

    #[test]
    fn matching_partitions_need_nothing() {
        let d = partition_delta(&[kp(1, 1 << 20, 4 << 20)], &[spec(1, 1 << 20, 4 << 20)]);
        assert!(d.is_empty());
    }

    #[test]
    fn delta_deletes_resizes_and_adds() {
        let kernel = [
            kp(1, 1 << 20, 4 << 20),
            kp(2, 5 << 20, 4 << 20),
            kp(5, 9 << 20, 1 << 20),
        ];
        let wanted = [
            spec(1, 1 << 20, 8 << 20),
            spec(2, 9 << 20, 4 << 20),
            spec(3, 13 << 20, 1 << 20),
        ];
        let d = partition_delta(&kernel, &wanted);
        assert_eq!(d.delete, vec![2, 5]);
        assert_eq!(d.resize, vec![(1, 1 << 20, 8 << 20)]);
        assert_eq!(d.add, vec![(2, 9 << 20, 4 << 20), (3, 13 << 20, 1 << 20)]);
    }

    #[test]
    fn empty_layout_deletes_everything() {
        let d = partition_delta(&[kp(1, 1 << 20, 1 << 20), kp(2, 2 << 20, 1 << 20)], &[]);
        assert_eq!(d.delete, vec![1, 2]);
        assert!(d.add.is_empty() && d.resize.is_empty());
    }

    #[test]
    fn partition_nodes_follow_the_kernel_naming_rule() {
        let node = |d: &str, n| partition_node(Path::new(d), n).unwrap();
        assert_eq!(node("/dev/sda", 1), Path::new("/dev/sda1"));
        assert_eq!(node("/dev/loop3", 2), Path::new("/dev/loop3p2"));
        assert_eq!(node("/dev/nvme0n1", 10), Path::new("/dev/nvme0n1p10"));
    }

    #[test]
    fn parses_sysfs_devno() {
        assert_eq!(
            parse_devno("259:3\n"),
            Some(nix::sys::stat::makedev(259, 3))
        );
        assert_eq!(parse_devno("garbage"), None);
    }

    #[test]
    fn ioctl_struct_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
    }
}
