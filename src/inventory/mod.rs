//! Read-only observation of the machine: sysfs, libblkid, mountinfo, /proc/swaps.

use crate::model::Inventory;
use std::path::PathBuf;

/// Where to look; tests point these at fixture trees.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub sys_root: PathBuf,
    pub dev_root: PathBuf,
    pub proc_root: PathBuf,
    /// Directories whose contents (mount points, volume dirs, symlinks) are observed
    /// into `Inventory::paths`: storage_root and the state directory's block links.
    pub managed_roots: Vec<PathBuf>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            sys_root: "/sys".into(),
            dev_root: "/dev".into(),
            proc_root: "/proc".into(),
            managed_roots: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

pub fn scan(_opts: &ScanOptions) -> Result<Inventory, InventoryError> {
    todo!("inventory::scan")
}
