//! Partition mappings of dm-multipath maps, made the way multipath-tools makes them:
//! `kpartx -a -s -p -part` on the map (as Debian's kpartx udev rule and multipathd do),
//! never BLKPG on the map or on its paths, which the kernel would not carry to the map.

use crate::host::cmd::{CmdError, Program, Programs};
use crate::host::Outcome;
use crate::model::PartitionSpec;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The delimiter between a map's name and the partition number, as Debian's
/// multipath-tools uses it (`mpatha-part1`): kpartx and multipathd's udev rule must
/// agree, or each would make its own mapping of the same partition.
pub const DELIMITER: &str = "-part";

/// How long a mapping's node may take to appear after kpartx returned (udev makes
/// /dev/mapper links; kpartx `-s` already waited for udev to finish with it).
const NODE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KpartxError {
    #[error("making the partition mappings of {}: {source}", map.display())]
    Run { map: PathBuf, source: CmdError },
    #[error(
        "{} did not appear within {}s after kpartx: check `dmsetup ls` and `multipath -ll`",
        node.display(), NODE_WAIT.as_secs()
    )]
    NodeMissing { node: PathBuf },
}

/// Whether `disk` is a multipath map kvstrap addresses by its stable name.
pub fn is_map(disk: &Path) -> bool {
    disk.parent() == Some(Path::new(crate::model::MAPPER_DIR))
}

/// Make the mappings of the planned partitions of the map `disk`, then wait for their
/// nodes. Unchanged when every one is there already (multipathd's udev rule made them).
pub fn sync_partitions(
    programs: &Programs,
    disk: &Path,
    wanted: &[PartitionSpec],
) -> Result<Outcome, KpartxError> {
    if wanted.iter().all(|p| is_block_device(&p.device)) {
        return Ok(Outcome::Unchanged);
    }
    let args = ["-a", "-s", "-p", DELIMITER]
        .iter()
        .map(Into::into)
        .chain(std::iter::once(disk.as_os_str().to_owned()))
        .collect::<Vec<std::ffi::OsString>>();
    programs
        .run(Program::Kpartx, &args)
        .map_err(|source| KpartxError::Run {
            map: disk.to_path_buf(),
            source,
        })?;
    for p in wanted {
        wait_for_mapping(&p.device)?;
    }
    crate::host::failpoint("sync_partitions");
    let names: Vec<String> = wanted
        .iter()
        .map(|p| p.device.display().to_string())
        .collect();
    Ok(Outcome::Changed(format!(
        "kpartx mapped {}",
        names.join(", ")
    )))
}

/// Wait (bounded) until a partition mapping's `/dev/mapper` node is a block device.
pub fn wait_for_mapping(node: &Path) -> Result<(), KpartxError> {
    let deadline = Instant::now() + NODE_WAIT;
    let mut pause = Duration::from_millis(1);
    while !is_block_device(node) {
        if Instant::now() >= deadline {
            return Err(KpartxError::NodeMissing {
                node: node.to_path_buf(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

fn is_block_device(node: &Path) -> bool {
    std::fs::metadata(node).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_told_by_their_directory() {
        assert!(is_map(Path::new("/dev/mapper/mpatha")));
        assert!(!is_map(Path::new("/dev/sdb")));
        assert!(!is_map(Path::new("/dev/mapper")));
    }

    #[test]
    fn the_delimiter_names_mappings_as_the_planner_does() {
        let named = crate::model::map_partition_path("m", 3);
        assert_eq!(named, PathBuf::from(format!("/dev/mapper/m{DELIMITER}3")));
    }
}
