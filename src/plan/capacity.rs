//! Capacity arithmetic: alignment, filesystem overhead, reserve, and how many volumes of
//! what size a disk yields. Published capacity must never exceed what a volume can store,
//! so every estimate here errs on the side of publishing less.

use crate::model::FsType;

pub const MIB: u64 = 1 << 20;
/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN: u64 = MIB;
/// GPT allows 128 entries in the standard table.
pub const MAX_PARTITIONS: u32 = 128;
/// Directory volumes on one shared filesystem: as many as the policy may ask for.
pub const MAX_VOLUMES_PER_DISK: u64 = crate::policy::MAX_VOLUME_COUNT as u64;
/// mkfs.xfs refuses smaller devices.
pub const XFS_MIN_BYTES: u64 = 300 * MIB;
/// Smallest ext4 filesystem worth making.
pub const EXT4_MIN_BYTES: u64 = 16 * MIB;

pub fn round_down(bytes: u64) -> u64 {
    bytes / ALIGN * ALIGN
}

/// Up to the next MiB; None past the largest aligned u64.
pub fn round_up(bytes: u64) -> Option<u64> {
    bytes.div_ceil(ALIGN).checked_mul(ALIGN)
}

/// The region partitions may use: from 1 MiB to the last whole MiB before the backup GPT.
pub fn usable_region(disk_size: u64) -> Option<(u64, u64)> {
    let start = ALIGN;
    let end = round_down(disk_size.saturating_sub(ALIGN));
    (end > start).then(|| (start, end - start))
}

/// Bytes a filesystem of this size keeps for itself (log/journal, inode tables, metadata).
/// Deliberately generous: it is cheaper to publish a little less than to over-promise.
pub fn fs_overhead(fs: FsType, size: u64) -> u64 {
    let metadata = size / 64;
    let slack = 16 * MIB;
    let log = match fs {
        // xfsprogs >= 5.15 makes logs of at least 64 MiB; large filesystems get ~1/2048.
        FsType::Xfs => (size / 2048).clamp(64 * MIB, 2048 * MIB),
        // e2fsprogs sizes the journal by filesystem size, capped at 1 GiB.
        FsType::Ext4 => (size / 64).clamp(16 * MIB, 1024 * MIB),
    };
    // Cannot overflow: each term is at most size/64 or 2 GiB.
    round_down(metadata + slack + log + (ALIGN - 1))
}

/// What a filesystem on a partition of this size can store.
pub fn fs_capacity(fs: FsType, partition: u64) -> u64 {
    round_down(partition.saturating_sub(fs_overhead(fs, partition)))
}

/// Smallest partition whose filesystem can store `capacity` bytes; None when no disk
/// could hold it.
pub fn partition_for_capacity(fs: FsType, capacity: u64) -> Option<u64> {
    let mut size = round_up(capacity.checked_add(fs_overhead(fs, capacity))?)?;
    // The overhead of the larger partition is at most a few MiB more: a handful of steps.
    for _ in 0..1024 {
        if fs_capacity(fs, size) >= capacity {
            return Some(size);
        }
        size = size.checked_add(ALIGN)?;
    }
    None
}

pub fn min_fs_bytes(fs: FsType) -> u64 {
    match fs {
        FsType::Xfs => XFS_MIN_BYTES,
        FsType::Ext4 => EXT4_MIN_BYTES,
    }
}

/// `reserve_percent` of `bytes`, rounded up to whole MiB.
pub fn reserve_of(bytes: u64, reserve_percent: u32) -> u64 {
    let exact = u128::from(bytes) * u128::from(reserve_percent.min(100)) / 100;
    // At most `bytes`, so the round-up only fails for disks within a MiB of 16 EiB.
    round_up(u64::try_from(exact).unwrap_or(u64::MAX)).unwrap_or(bytes)
}

/// Human-readable binary size (`3.6 TiB`, `512 MiB`): the one formatter, shared with policy
/// messages.
pub use crate::policy::size::human;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usable_region_leaves_room_for_both_gpt_headers() {
        assert_eq!(usable_region(4 << 30), Some((MIB, (4 << 30) - 2 * MIB)));
        assert_eq!(usable_region(MIB), None);
    }

    #[test]
    fn partition_for_capacity_round_trips() {
        for fs in [FsType::Xfs, FsType::Ext4] {
            for cap in [300 * MIB, 1 << 30, 100 << 30, 3 << 40] {
                let part = partition_for_capacity(fs, cap).unwrap();
                assert_eq!(part % ALIGN, 0);
                assert!(fs_capacity(fs, part) >= cap);
                assert!(part - cap < cap / 10 + 128 * MIB, "{fs:?} {cap}: {part}");
            }
        }
    }

    #[test]
    fn sizes_near_the_top_of_u64_give_none_not_a_wrap_or_a_spin() {
        assert_eq!(round_up(u64::MAX), None);
        assert_eq!(round_up(u64::MAX - ALIGN), Some(u64::MAX - ALIGN + 1));
        for fs in [FsType::Xfs, FsType::Ext4] {
            assert_eq!(partition_for_capacity(fs, u64::MAX), None);
            assert_eq!(partition_for_capacity(fs, 18_400_000_000_000_000_000), None);
        }
        assert_eq!(reserve_of(u64::MAX, 100), u64::MAX);
    }

    #[test]
    fn reserve_rounds_up() {
        assert_eq!(reserve_of(100 * MIB, 10), 10 * MIB);
        assert_eq!(reserve_of(101 * MIB, 10), 11 * MIB);
        assert_eq!(reserve_of(100 * MIB, 0), 0);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(4 << 30), "4 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
