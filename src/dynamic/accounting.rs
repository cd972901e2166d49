//! How much of each pool the served claims take, which pool a new claim goes to, and the room a node announces.

use crate::model::PoolSpec;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Quotas are kept in filesystem blocks: a request is rounded up to this.
pub const BLOCK: u64 = 4096;

/// Project ids of dynamic volumes, clear of the static volumes' (from 1000) and of ids
/// admins use by hand.
const PROJECT_BASE: u32 = 0x1000_0000;
const PROJECT_SPAN: u32 = 0x6000_0000;

/// A dynamic volume that exists on a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub claim_uid: String,
    /// `<pool mountpoint>/pvc-<uid>`.
    pub path: PathBuf,
    /// The pool's mount point.
    pub pool: PathBuf,
    /// What it was given (its quota), as recorded on the directory; None while its making
    /// did not finish (no record yet).
    pub bytes: Option<u64>,
    pub project_id: Option<u32>,
}

/// One pool and what its volumes take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool<'a> {
    pub spec: &'a PoolSpec,
    pub used: u64,
}

impl Pool<'_> {
    pub fn free(&self) -> u64 {
        self.spec.capacity_bytes.saturating_sub(self.used)
    }
}

/// The request rounded up to whole filesystem blocks (the quota that holds it).
pub fn round_up(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// Each pool with what its served volumes take; a volume whose making did not finish
/// counts with `pending` (the size it is being made with), so room is never given twice.
pub fn pools<'a>(
    specs: &'a [PoolSpec],
    served: &[Served],
    pending: &dyn Fn(&Served) -> u64,
) -> Vec<Pool<'a>> {
    specs
        .iter()
        .map(|spec| Pool {
            spec,
            used: served
                .iter()
                .filter(|s| s.pool == spec.mountpoint)
                .map(|s| s.bytes.unwrap_or_else(|| pending(s)))
                .fold(0u64, u64::saturating_add),
        })
        .collect()
}

/// The pool of `class` with the most room that still fits `bytes` (index into `pools`).
pub fn choose(pools: &[Pool<'_>], class: &str, bytes: u64) -> Option<usize> {
    pools
        .iter()
        .enumerate()
        .filter(|(_, p)| p.spec.storage_class == class && p.free() >= bytes)
        .max_by_key(|(i, p)| (p.free(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// What a node announces for `class`: all its free room, and the largest claim one pool
/// can still take (a claim never spans pools).
pub fn room(pools: &[Pool<'_>], class: &str) -> (u64, u64) {
    let free = pools
        .iter()
        .filter(|p| p.spec.storage_class == class)
        .map(Pool::free);
    free.fold((0, 0), |(sum, max), f| (sum.saturating_add(f), max.max(f)))
}

/// A project id for claim `uid` derived from it, never one of `taken` (ids of the pool's
/// other directories).
pub fn project_id(uid: &str, taken: &BTreeSet<u32>) -> u32 {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(uid.as_bytes());
    let seed = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % PROJECT_SPAN;
    (0..PROJECT_SPAN)
        .map(|i| PROJECT_BASE + (seed + i) % PROJECT_SPAN)
        .find(|id| !taken.contains(id))
        .unwrap_or(PROJECT_BASE)
}

/// The directory of claim `uid` on `pool`.
pub fn directory(pool: &Path, uid: &str) -> PathBuf {
    pool.join(format!("{}{uid}", super::DIR_PREFIX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{FsType, Owner};

    pub fn spec(class: &str, mountpoint: &str, capacity: u64) -> PoolSpec {
        PoolSpec {
            group: "pool".into(),
            storage_class: class.into(),
            disk: "/dev/sdb".into(),
            disk_identity: format!("serial:{mountpoint}"),
            device: "/dev/sdb1".into(),
            mountpoint: mountpoint.into(),
            fs_type: FsType::Xfs,
            capacity_bytes: capacity,
            project_quota: true,
            owner: Owner {
                uid: 107,
                gid: 107,
                mode: 0o750,
            },
            transport: "sata".into(),
            rotational: false,
            io_class: None,
            mapping: None,
        }
    }

    pub fn served(pool: &str, uid: &str, bytes: Option<u64>) -> Served {
        Served {
            claim_uid: uid.into(),
            path: directory(Path::new(pool), uid),
            pool: pool.into(),
            bytes,
            project_id: None,
        }
    }

    #[test]
    fn the_pool_with_most_room_that_fits_wins_and_room_is_per_class() {
        let specs = [
            spec("dyn", "/p/a", 10 << 30),
            spec("dyn", "/p/b", 10 << 30),
            spec("other", "/p/c", 100 << 30),
        ];
        let taken = [
            served("/p/a", "u1", Some(6 << 30)),
            served("/p/b", "u2", Some(2 << 30)),
        ];
        let p = pools(&specs, &taken, &|_| 0);
        assert_eq!((p[0].free(), p[1].free()), (4 << 30, 8 << 30));
        assert_eq!(choose(&p, "dyn", 3 << 30), Some(1));
        assert_eq!(
            choose(&p, "dyn", 9 << 30),
            None,
            "a claim never spans pools"
        );
        assert_eq!(room(&p, "dyn"), (12 << 30, 8 << 30));
        assert_eq!(room(&p, "none"), (0, 0));
        // An unfinished volume counts with the size it is being made with.
        let unfinished = [served("/p/b", "u3", None)];
        let p = pools(&specs, &unfinished, &|_| 5 << 30);
        assert_eq!(p[1].free(), 5 << 30);
    }

    #[test]
    fn requests_round_up_to_blocks_and_project_ids_never_collide() {
        assert_eq!(round_up(1), 4096);
        assert_eq!(round_up(4096), 4096);
        assert_eq!(round_up(1_000_000_001), 1_000_001_536);
        let a = project_id("uid-a", &BTreeSet::new());
        assert!(a >= PROJECT_BASE);
        assert_eq!(
            project_id("uid-a", &BTreeSet::new()),
            a,
            "derived from the uid"
        );
        let next = project_id("uid-a", &BTreeSet::from([a]));
        assert_ne!(next, a);
    }
}
