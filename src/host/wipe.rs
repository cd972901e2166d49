//! Destroying every signature on a disk the policy names with `wipe = "force"`: the
//! signatures inside its partitions, then the disk's own (both GPT headers and the
//! protective MBR), then the kernel's partitions. Every erased signature is logged.

use crate::host::blkpg::{self, BlkpgError};
use crate::host::probe::{self, Found, ProbeError};
use crate::host::Outcome;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("cannot wipe {}: {source}", device.display())]
    Probe { device: PathBuf, source: ProbeError },
    #[error(transparent)]
    Blkpg(#[from] BlkpgError),
}

/// Erase all signatures of `disk` and of its partitions, and drop the partitions from the
/// kernel. Fails if anything holds the disk or a partition (mounted, LVM, md, ...).
pub fn wipe_disk(disk: &Path) -> Result<Outcome, WipeError> {
    let partitions = blkpg::kernel_partitions(disk)?;
    let mut erased: Vec<(PathBuf, Found)> = Vec::new();
    // Partition contents first: a filesystem left inside an old partition would come back
    // as a foreign signature when a new table puts a partition at the same offset.
    for p in &partitions {
        let node = disk.with_file_name(&p.name);
        erased.extend(wipe_one(&node)?.into_iter().map(|f| (node.clone(), f)));
    }
    erased.extend(wipe_one(disk)?.into_iter().map(|f| (disk.to_path_buf(), f)));
    let dropped = blkpg::sync_partitions(disk, &[])?;
    if erased.is_empty() && !dropped.is_changed() {
        return Ok(Outcome::Unchanged);
    }
    for (device, f) in &erased {
        tracing::warn!(
            disk = %disk.display(),
            device = %device.display(),
            signature = %f.signature.kind,
            uuid = f.signature.uuid.as_deref().unwrap_or(""),
            label = f.signature.label.as_deref().unwrap_or(""),
            "wiped signature"
        );
    }
    crate::host::failpoint("wipe_disk");
    Ok(Outcome::Changed(format!(
        "{}: erased {}",
        disk.display(),
        summary(&erased)
    )))
}

fn wipe_one(device: &Path) -> Result<Vec<Found>, WipeError> {
    probe::wipe_signatures(device).map_err(|source| WipeError::Probe {
        device: device.to_path_buf(),
        source,
    })
}

fn summary(erased: &[(PathBuf, Found)]) -> String {
    if erased.is_empty() {
        return "no signatures (dropped kernel partitions)".into();
    }
    erased
        .iter()
        .map(|(d, f)| format!("{} on {}", f.signature.kind, d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}
