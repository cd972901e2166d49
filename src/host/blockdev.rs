//! Questions to a block device (size, logical sector size), asked with ioctls. Below both
//! `gpt` (which needs them to write a table) and `blkpg`, so neither imports the other.

use std::ffi::c_int;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), c_int);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

#[derive(Debug, thiserror::Error)]
#[error("{what} ioctl on {}: {source}", path.display())]
pub struct QueryError {
    what: &'static str,
    path: PathBuf,
    source: nix::Error,
}

/// Logical sector size of a block device (BLKSSZGET).
pub fn logical_sector_size(file: &File, path: &Path) -> Result<u32, QueryError> {
    let mut size: c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    unsafe { blksszget(file.as_raw_fd(), &mut size) }.map_err(|source| QueryError {
        what: "BLKSSZGET",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(u32::try_from(size).unwrap_or(512))
}

/// Size in bytes of a block device (BLKGETSIZE64).
pub fn device_size(file: &File, path: &Path) -> Result<u64, QueryError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(|source| QueryError {
        what: "BLKGETSIZE64",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(size)
}

/// Length in bytes of a block device or a regular file (tests probe image files), by
/// seeking to its end; whoever reads next positions the descriptor itself.
pub fn byte_length(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    (&*file).seek(SeekFrom::End(0))
}
