//! A cheap look for ZFS vdev labels, so that libblkid's own ZFS prober runs only where it
//! could find something.
//!
//! libblkid's `zfs_member` prober reads the four 256 KiB vdev labels of every device it
//! probes (1 MiB per device, into freshly allocated buffers): on a 60-disk node it was
//! about a third of a no-op `kvstrap apply`. Every version of it needs one of two marks
//! in those labels before it reports ZFS:
//! - util-linux up to 2.39: at least 4 uberblocks, found by their magic `0x00bab10c` (in
//!   either byte order) at the start of the 1 KiB slots of each label's uberblock ring
//!   (label + 128 KiB, 128 slots);
//! - util-linux 2.40 and later: an XDR-encoded nvlist (first byte 1) at label + 16 KiB.
//!
//! [`may_hold_zfs_label`] reads only those bytes, at the offsets libblkid computes, and
//! says "maybe" when it finds either mark or cannot read. Callers leave libblkid's ZFS
//! prober out only on a "no", so what libblkid reports is the same as with every prober,
//! on any version.

use std::fs::File;
use std::os::unix::fs::FileExt;

const LABEL_BYTES: u64 = 256 * 1024;
const NVLIST_AT: u64 = 16 * 1024;
const RING_AT: u64 = 128 * 1024;
const RING_BYTES: usize = 128 * 1024;
const SLOT_BYTES: usize = 1024;
const UBERBLOCK_MAGIC: u64 = 0x00ba_b10c;
/// The ring is read in pieces this size: one buffer, small enough to be reused by the
/// allocator instead of mapped and faulted in anew for every device.
const CHUNK_BYTES: usize = 32 * 1024;

/// The libblkid name of the prober this module stands in front of.
pub const ZFS_PROBER: &str = "zfs_member";

/// False only when none of the four ZFS labels of the region `offset..offset+size` of
/// `file` (size 0: to the end) carries either mark libblkid looks for.
pub fn may_hold_zfs_label(file: &File, offset: u64, size: u64) -> bool {
    let size = if size == 0 {
        match super::blockdev::byte_length(file) {
            Ok(end) => end.saturating_sub(offset),
            Err(_) => return true,
        }
    } else {
        size
    };
    let Some(labels) = label_offsets(size) else {
        // Too small for four labels: let libblkid decide, as it always did.
        return true;
    };
    let mut chunk = vec![0u8; CHUNK_BYTES];
    labels
        .iter()
        .any(|label| label_marked(file, offset + label, &mut chunk))
}

/// Where libblkid looks for the four labels of a region of `size` bytes: two at the
/// start, two at the end aligned down to a label's size.
fn label_offsets(size: u64) -> Option<[u64; 4]> {
    if size < 4 * LABEL_BYTES {
        return None;
    }
    let end = size - size % LABEL_BYTES;
    Some([0, LABEL_BYTES, end - 2 * LABEL_BYTES, end - LABEL_BYTES])
}

/// Either mark in the label at `at`, or a read that failed (then: maybe).
fn label_marked(file: &File, at: u64, chunk: &mut [u8]) -> bool {
    let mut encoding = [0u8; 1];
    if file.read_exact_at(&mut encoding, at + NVLIST_AT).is_err() || encoding[0] == 1 {
        return true;
    }
    for piece in 0..RING_BYTES / CHUNK_BYTES {
        let from = at + RING_AT + (piece * CHUNK_BYTES) as u64;
        if file.read_exact_at(chunk, from).is_err() {
            return true;
        }
        let uberblock = chunk.chunks_exact(SLOT_BYTES).any(|slot| {
            let mut magic = [0u8; 8];
            magic.copy_from_slice(&slot[..8]);
            let magic = u64::from_le_bytes(magic);
            magic == UBERBLOCK_MAGIC || magic == UBERBLOCK_MAGIC.swap_bytes()
        });
        if uberblock {
            return true;
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        (dir, file)
    }

    #[test]
    fn the_labels_sit_where_libblkid_reads_them() {
        // 4 GiB: the end labels at size - 512 KiB and size - 256 KiB.
        let size = 4u64 << 30;
        assert_eq!(
            label_offsets(size).unwrap(),
            [0, 262144, size - 524288, size - 262144]
        );
        // Not a multiple of 256 KiB: the end is aligned down first (the strace of
        // libblkid on a partition of 4292870144 bytes read 4292345856 and 4292608000).
        let size = 4_292_870_144 + 3 * 4096;
        assert_eq!(
            label_offsets(size).unwrap()[2..],
            [4_292_345_856, 4_292_608_000]
        );
        assert_eq!(label_offsets(1 << 20).unwrap(), [0, 262144, 524288, 786432]);
        assert_eq!(label_offsets((1 << 20) - 1), None);
    }

    #[test]
    fn a_blank_region_has_no_label() {
        let (_d, f) = image(64 << 20);
        assert!(!may_hold_zfs_label(&f, 0, 0));
        assert!(!may_hold_zfs_label(&f, 1 << 20, 32 << 20));
    }

    #[test]
    fn an_uberblock_in_any_slot_of_any_label_is_a_maybe() {
        let size = 64u64 << 20;
        for (label, slot, big_endian) in
            [(0, 0, false), (1, 127, true), (2, 5, false), (3, 64, true)]
        {
            let (_d, f) = image(size);
            let at = label_offsets(size).unwrap()[label] + RING_AT + (slot * SLOT_BYTES) as u64;
            let magic = if big_endian {
                UBERBLOCK_MAGIC.to_be_bytes()
            } else {
                UBERBLOCK_MAGIC.to_le_bytes()
            };
            f.write_all_at(&magic, at).unwrap();
            assert!(may_hold_zfs_label(&f, 0, 0), "label {label} slot {slot}");
        }
    }

    #[test]
    fn an_nvlist_header_is_a_maybe() {
        let size = 64u64 << 20;
        let (_d, f) = image(size);
        f.write_all_at(&[1, 1, 0, 0], label_offsets(size).unwrap()[3] + NVLIST_AT)
            .unwrap();
        assert!(may_hold_zfs_label(&f, 0, 0));
    }

    #[test]
    fn a_region_is_looked_at_from_its_own_offset() {
        // A label of a partition at 1 MiB is not one of the whole disk, and the reverse.
        let (_d, f) = image(64 << 20);
        f.write_all_at(&UBERBLOCK_MAGIC.to_le_bytes(), (1 << 20) + RING_AT)
            .unwrap();
        assert!(may_hold_zfs_label(&f, 1 << 20, 0));
        assert!(!may_hold_zfs_label(&f, 0, 0));
    }

    #[test]
    fn an_unreadable_or_tiny_region_is_a_maybe() {
        let (_d, f) = image(512 * 1024);
        assert!(may_hold_zfs_label(&f, 0, 0));
        // A region said to reach past the end of the file: the reads fail.
        assert!(may_hold_zfs_label(&f, 0, 64 << 20));
    }
}
