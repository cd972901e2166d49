//! Writing the label of an xfs that mkfs.xfs has just made, what `xfs_admin -L` (xfs_db's
//! `label` command) does, without starting xfs_db: on a 60-disk cold apply those 60
//! programs cost about two thirds of the CPU time of the 60 mkfs runs.
//!
//! Like xfs_db, it sets `sb_fname` in the superblock of every allocation group and
//! recomputes each superblock's CRC (v5 filesystems, the only kind kvstrap makes). The
//! primary superblock is written last: the planned label on it is kvstrap's mark that
//! the filesystem is complete ([`crate::model::MKFS_IN_PROGRESS_LABEL`]), so a run cut
//! short before that leaves the in-progress label, and the next run makes the filesystem
//! again. Anything unexpected (another kind of superblock, geometry that does not fit
//! the device) is an error and nothing is written.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Offsets in `struct xfs_dsb` (big-endian fields).
const MAGIC: &[u8; 4] = b"XFSB";
const BLOCKSIZE_AT: usize = 4;
const AGBLOCKS_AT: usize = 84;
const AGCOUNT_AT: usize = 88;
const VERSIONNUM_AT: usize = 100;
const SECTSIZE_AT: usize = 102;
const FNAME_AT: usize = 108;
pub const FNAME_LEN: usize = 12;
const INPROGRESS_AT: usize = 126;
/// `sb_crc`, little-endian, covered by the checksum as zeros.
const CRC_AT: usize = 224;
const VERSION_MASK: u16 = 0x000f;
const VERSION_5: u16 = 5;

#[derive(Debug, thiserror::Error)]
pub enum XfsLabelError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an xfs made by mkfs.xfs as kvstrap runs it: {0}")]
    Unexpected(String),
}

/// The geometry read from the primary superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    block_bytes: u64,
    ag_blocks: u64,
    ag_count: u64,
    sector_bytes: usize,
}

/// Set the label of the unmounted xfs on `device` (opened read-write by the caller, held
/// exclusively) in every superblock, then fsync.
pub fn write_label(device: &File, label: &str) -> Result<(), XfsLabelError> {
    if label.len() > FNAME_LEN || label.as_bytes().contains(&0) {
        return Err(XfsLabelError::Unexpected(format!(
            "label {label:?} does not fit the 12 bytes xfs stores"
        )));
    }
    let mut head = [0u8; 512];
    device.read_exact_at(&mut head, 0)?;
    let geometry = geometry(&head)?;
    // The last group may be shorter than the others, but it starts on the device.
    let device_bytes = super::blockdev::byte_length(device)?;
    let last_start = (geometry.ag_count - 1)
        .checked_mul(geometry.ag_blocks)
        .and_then(|b| b.checked_mul(geometry.block_bytes))
        .and_then(|b| b.checked_add(geometry.sector_bytes as u64));
    if last_start.is_none_or(|end| end > device_bytes) {
        return Err(XfsLabelError::Unexpected(format!(
            "{} allocation groups of {} blocks do not fit a device of {device_bytes} bytes",
            geometry.ag_count, geometry.ag_blocks
        )));
    }
    let mut sector = vec![0u8; geometry.sector_bytes];
    // Secondary superblocks first, the primary (the completion mark) last.
    for ag in (1..geometry.ag_count).chain([0]) {
        let at = ag * geometry.ag_blocks * geometry.block_bytes;
        device.read_exact_at(&mut sector, at)?;
        if &sector[..4] != MAGIC {
            return Err(XfsLabelError::Unexpected(format!(
                "no superblock where allocation group {ag} starts"
            )));
        }
        relabel(&mut sector, label);
        device.write_all_at(&sector, at)?;
    }
    device.sync_all()?;
    Ok(())
}

fn geometry(head: &[u8; 512]) -> Result<Geometry, XfsLabelError> {
    let be32 = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let be16 = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    let unexpected = |what: String| Err(XfsLabelError::Unexpected(what));
    if &head[..4] != MAGIC {
        return unexpected("no xfs superblock".into());
    }
    if be16(VERSIONNUM_AT) & VERSION_MASK != VERSION_5 {
        return unexpected("not a version 5 (CRC) superblock".into());
    }
    if head[INPROGRESS_AT] != 0 {
        return unexpected("mkfs.xfs did not finish (sb_inprogress is set)".into());
    }
    let block_bytes = u64::from(be32(BLOCKSIZE_AT));
    let sector_bytes = usize::from(be16(SECTSIZE_AT));
    let ag_blocks = u64::from(be32(AGBLOCKS_AT));
    let ag_count = u64::from(be32(AGCOUNT_AT));
    let power_of_two = |n: u64, lo: u64, hi: u64| n.is_power_of_two() && (lo..=hi).contains(&n);
    if !power_of_two(block_bytes, 512, 65536)
        || !power_of_two(sector_bytes as u64, 512, 32768)
        || ag_blocks == 0
        || ag_count == 0
        || ag_count > 1 << 20
        || sector_bytes < CRC_AT + 4
    {
        return unexpected(format!(
            "superblock geometry out of range (block {block_bytes}, sector {sector_bytes}, \
             {ag_count} groups of {ag_blocks} blocks)"
        ));
    }
    Ok(Geometry {
        block_bytes,
        ag_blocks,
        ag_count,
        sector_bytes,
    })
}

/// Put `label` (zero-padded) in the superblock sector and recompute its CRC32C.
fn relabel(sector: &mut [u8], label: &str) {
    let fname = &mut sector[FNAME_AT..FNAME_AT + FNAME_LEN];
    fname.fill(0);
    fname[..label.len()].copy_from_slice(label.as_bytes());
    sector[CRC_AT..CRC_AT + 4].fill(0);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(sector);
    sector[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn have(program: &str) -> bool {
        Command::new("sh")
            .args([
                "-c",
                &format!("command -v {program} || test -x /usr/sbin/{program}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Run `cmd`; it must succeed (its output is the failure message).
    fn succeeds(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn mkfs(path: &std::path::Path, sector: &str) {
        succeeds(
            Command::new("mkfs.xfs")
                .args([
                    "-q",
                    "-f",
                    "-K",
                    "-m",
                    "uuid=0b6ea51c-6c41-4d0f-9a34-3a1b6b1e2f00",
                ])
                .args(["-s", sector, "-L", "kvs-init"])
                .arg(path),
        );
    }

    fn superblocks(path: &std::path::Path) -> Vec<Vec<u8>> {
        let f = File::open(path).unwrap();
        let mut head = [0u8; 512];
        f.read_exact_at(&mut head, 0).unwrap();
        let g = geometry(&head).unwrap();
        (0..g.ag_count)
            .map(|ag| {
                let mut s = vec![0u8; g.sector_bytes];
                f.read_exact_at(&mut s, ag * g.ag_blocks * g.block_bytes)
                    .unwrap();
                s
            })
            .collect()
    }

    /// Every superblock ends as xfs_db's `label` leaves it, for 512- and 4096-byte sectors
    /// (a LUKS2 mapping has 4096), with a CRC xfs_db calls correct, and xfs_repair finds
    /// nothing wrong. (xfs_db also rewrites the quota inode fields mkfs left 0 as
    /// NULLFSINO, which xfs reads as the same "none"; and so its CRC differs.)
    #[test]
    fn labels_every_superblock_as_xfs_db_does() {
        if !have("mkfs.xfs") || !have("xfs_db") {
            // CI installs xfsprogs (scripts/install-deps.sh): there its absence fails.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must not skip: mkfs.xfs / xfs_db missing (package xfsprogs)"
            );
            eprintln!("skipping: mkfs.xfs / xfs_db not installed (apt-get install xfsprogs)");
            return;
        }
        const QUOTA_INODES: [std::ops::Range<usize>; 2] = [160..176, 232..240];
        for sector in ["size=512", "size=4096"] {
            let dir = tempfile::tempdir().unwrap();
            let ours = dir.path().join("ours.img");
            let theirs = dir.path().join("theirs.img");
            for p in [&ours, &theirs] {
                File::create(p).unwrap().set_len(1 << 30).unwrap();
                mkfs(p, sector);
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&ours)
                .unwrap();
            write_label(&f, "kvs-1234abcd").unwrap();
            succeeds(
                Command::new("xfs_db")
                    .args(["-x", "-p", "xfs_admin", "-c", "label kvs-1234abcd"])
                    .arg(&theirs),
            );
            let (a, b) = (superblocks(&ours), superblocks(&theirs));
            assert_eq!(a.len(), 4);
            for (ag, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(&x[FNAME_AT..FNAME_AT + FNAME_LEN], b"kvs-1234abcd");
                for at in 0..x.len() {
                    let skipped = QUOTA_INODES.iter().any(|r| r.contains(&at))
                        || (CRC_AT..CRC_AT + 4).contains(&at);
                    assert!(skipped || x[at] == y[at], "{sector}: group {ag} byte {at}");
                }
                let crc = Command::new("xfs_db")
                    .args(["-r", "-c", &format!("sb {ag}"), "-c", "print crc"])
                    .arg(&ours)
                    .output()
                    .unwrap();
                let crc = String::from_utf8_lossy(&crc.stdout);
                assert!(crc.contains("(correct)"), "{sector}: group {ag}: {crc}");
            }
            succeeds(Command::new("xfs_repair").arg("-n").arg(&ours));
        }
    }

    #[test]
    fn refuses_what_is_not_a_finished_v5_xfs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blank.img");
        File::create(&p).unwrap().set_len(64 << 20).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        assert!(matches!(
            write_label(&f, "x"),
            Err(XfsLabelError::Unexpected(_))
        ));
        assert!(matches!(
            write_label(&f, "thirteen-byte"),
            Err(XfsLabelError::Unexpected(_))
        ));
        let mut head = [0u8; 512];
        head[..4].copy_from_slice(MAGIC);
        head[VERSIONNUM_AT..VERSIONNUM_AT + 2].copy_from_slice(&0xb4a5u16.to_be_bytes());
        head[BLOCKSIZE_AT..BLOCKSIZE_AT + 4].copy_from_slice(&4096u32.to_be_bytes());
        head[SECTSIZE_AT..SECTSIZE_AT + 2].copy_from_slice(&512u16.to_be_bytes());
        head[AGBLOCKS_AT..AGBLOCKS_AT + 4].copy_from_slice(&4096u32.to_be_bytes());
        head[AGCOUNT_AT..AGCOUNT_AT + 4].copy_from_slice(&4u32.to_be_bytes());
        assert!(geometry(&head).is_ok());
        let mut unfinished = head;
        unfinished[INPROGRESS_AT] = 1;
        assert!(geometry(&unfinished).is_err());
        let mut v4 = head;
        v4[VERSIONNUM_AT + 1] = 0xa4;
        assert!(geometry(&v4).is_err());
        // Four groups of 16 MiB claimed on a 64 MiB file fit; 400 do not.
        f.write_all_at(&head, 0).unwrap();
        let mut big = head;
        big[AGCOUNT_AT..AGCOUNT_AT + 4].copy_from_slice(&400u32.to_be_bytes());
        f.write_all_at(&big, 0).unwrap();
        assert!(
            matches!(write_label(&f, "x"), Err(XfsLabelError::Unexpected(m)) if m.contains("do not fit"))
        );
    }
}
