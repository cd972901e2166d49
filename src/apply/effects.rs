//! The effects the executor needs, behind one small interface: the real implementation
//! calls `crate::host`; tests substitute a recorder.

use super::ApplyError;
use crate::host::Outcome;
use crate::model::{CryptTarget, DiskLayout, FsType, LuksSpec, Owner};
use std::path::Path;

/// Held while a disk is being written; what it holds is up to the implementation (the
/// real one: `flock(LOCK_EX)` on the whole-disk node). Released when dropped.
pub type DiskGuard = Box<dyn std::any::Any + Send>;

pub trait Effects: Sync {
    /// Before anything is written: is everything the plan's steps need there (programs)?
    fn preflight(&self, plan: &crate::model::Plan) -> Result<(), ApplyError>;
    /// Keep udev and other tools off `disk` while its partition table, partitions and
    /// filesystems are written.
    fn lock_disk(&self, disk: &Path) -> Result<DiskGuard, ApplyError>;
    /// Destroy every signature on a disk named by serial/WWN with wipe = "force".
    fn wipe_disk(&self, disk: &Path, identity: &str) -> Result<Outcome, ApplyError>;
    /// Re-check the disk is still blank, write the GPT, and create the partition nodes.
    fn write_partition_table(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError>;
    /// Tell the kernel about the layout's partitions (BLKPG) and wait for their nodes.
    fn sync_partitions(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError>;
    /// Put the LUKS2 header on a blank partition (or finish kvstrap's unfinished one) and
    /// enroll what unlocks it.
    fn format_luks(&self, device: &Path, luks: &LuksSpec) -> Result<Outcome, ApplyError>;
    /// Open kvstrap's LUKS2 volume as `/dev/mapper/<label>`.
    fn open_luks(&self, device: &Path, luks: &LuksSpec) -> Result<Outcome, ApplyError>;
    /// Close a LUKS2 mapping of a drained disk.
    fn close_luks(&self, device: &Path, mapping: &str) -> Result<Outcome, ApplyError>;
    /// Destroy every key slot of a LUKS2 volume (`kvstrap forget --erase`).
    fn erase_luks(&self, device: &Path, luks_uuid: &uuid::Uuid) -> Result<Outcome, ApplyError>;
    fn make_filesystem(
        &self,
        device: &Path,
        fs_type: FsType,
        uuid: &uuid::Uuid,
        label: &str,
        project_quota: bool,
    ) -> Result<Outcome, ApplyError>;
    fn mount(
        &self,
        device: &Path,
        fs_uuid: &uuid::Uuid,
        fs_type: FsType,
        mountpoint: &Path,
        options: &[String],
    ) -> Result<Outcome, ApplyError>;
    /// Create the directory if missing and make owner/mode match.
    fn directory(&self, path: &Path, owner: &Owner) -> Result<Outcome, ApplyError>;
    fn quota(
        &self,
        path: &Path,
        mountpoint: &Path,
        project_id: u32,
        bytes: u64,
    ) -> Result<Outcome, ApplyError>;
    /// Point `link` at `target` after proving `target` is the partition `part_uuid` of
    /// `disk` (and, with `crypt`, at its LUKS2 mapping after proving it is that volume's).
    fn link_block_device(
        &self,
        disk: &Path,
        link: &Path,
        target: &Path,
        part_uuid: &uuid::Uuid,
        crypt: Option<&CryptTarget>,
    ) -> Result<Outcome, ApplyError>;
    /// Unmount one of kvstrap's filesystems (a drained disk's); Unchanged when not mounted.
    fn unmount(&self, mountpoint: &Path) -> Result<Outcome, ApplyError>;
    /// Remove a Block volume's link (a drained disk's); Unchanged when it is gone.
    fn remove_block_link(&self, link: &Path) -> Result<Outcome, ApplyError>;
}
