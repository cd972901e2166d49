//! A short read-only measurement of a blank disk's IO: random 4 KiB reads at a fixed queue depth, then sequential 1 MiB reads.
//!
//! The device is opened `O_RDONLY | O_DIRECT | O_EXCL`: nothing is ever written, the page
//! cache is bypassed, and a device something else holds (mounted, in use) is refused.
//! Random reads run on [`QUEUE_DEPTH`] threads for most of the time budget, sequential
//! reads for the rest.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Reads in flight during the random phase (one thread each).
pub const QUEUE_DEPTH: usize = 16;
const RANDOM_BLOCK: usize = 4096;
const SEQUENTIAL_BLOCK: usize = 1 << 20;

/// What one measurement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub random_read_iops: u64,
    pub seq_read_mib_s: u64,
    /// How long the measurement took.
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IoProbeError {
    #[error("cannot open {} for a read-only measurement (it must be unused): {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is too small to measure", path.display())]
    TooSmall { path: PathBuf },
    #[error("{} is being written (another program holds its lock): not measured", path.display())]
    Locked { path: PathBuf },
}

/// A buffer aligned for `O_DIRECT`.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Option<Aligned> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Aligned { ptr, layout })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points at layout.size() bytes this value owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Measures `device` within `budget` (random reads for three quarters of it).
pub fn measure(device: &Path, budget: Duration) -> Result<Measured, IoProbeError> {
    let started = Instant::now();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
        .map_err(|source| IoProbeError::Open {
            path: device.to_path_buf(),
            source,
        })?;
    // A shared lock, as udev takes to probe: kvstrap's own executor (and partitioning
    // tools that follow systemd's locking rules) hold it exclusively while they write.
    let file =
        Flock::lock(file, FlockArg::LockSharedNonblock).map_err(|_| IoProbeError::Locked {
            path: device.to_path_buf(),
        })?;
    let meta = file.metadata().map_err(|source| IoProbeError::Read {
        path: device.to_path_buf(),
        source,
    })?;
    let size = if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        crate::host::blockdev::device_size(&file, device).map_err(|e| IoProbeError::Read {
            path: device.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?
    } else {
        meta.len()
    };
    let blocks = size / RANDOM_BLOCK as u64;
    if blocks < 2 || size < SEQUENTIAL_BLOCK as u64 {
        return Err(IoProbeError::TooSmall {
            path: device.to_path_buf(),
        });
    }
    let random_for = budget / 4 * 3;
    let began = Instant::now();
    let reads = random_reads(&file, device, blocks, random_for)?;
    let random_took = began.elapsed();
    let sequential_for = budget.saturating_sub(started.elapsed());
    let (bytes, seq_took) = sequential_reads(&file, device, size, sequential_for)?;
    Ok(Measured {
        random_read_iops: per_second(reads, random_took),
        seq_read_mib_s: per_second(bytes >> 20, seq_took),
        took: started.elapsed(),
    })
}

/// `count` per second over `elapsed`, rounded down (integer arithmetic).
fn per_second(count: u64, elapsed: Duration) -> u64 {
    let micros = elapsed.as_micros().max(1);
    u64::try_from(u128::from(count) * 1_000_000 / micros).unwrap_or(u64::MAX)
}

/// Random 4 KiB reads on [`QUEUE_DEPTH`] threads until `for_` has passed; how many.
fn random_reads(
    file: &File,
    device: &Path,
    blocks: u64,
    for_: Duration,
) -> Result<u64, IoProbeError> {
    let done = AtomicU64::new(0);
    let failure: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);
    let seed = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let deadline = Instant::now() + for_;
    crate::host::threads::run_workers(QUEUE_DEPTH, "kvstrap-ioprobe", || {
        let Some(mut buf) = Aligned::new(RANDOM_BLOCK) else {
            return;
        };
        // xorshift: spread over the whole device, a different sequence per thread.
        let mut x = seed.fetch_add(0x2545_f491_4f6c_dd1d, Ordering::Relaxed) | 1;
        while Instant::now() < deadline {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % blocks) * RANDOM_BLOCK as u64;
            match file.read_at(buf.slice(), offset) {
                Ok(_) => {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
            }
        }
    });
    if let Some(source) = failure.into_inner().ok().flatten() {
        return Err(IoProbeError::Read {
            path: device.to_path_buf(),
            source,
        });
    }
    Ok(done.load(Ordering::Relaxed))
}

/// Sequential 1 MiB reads from the start for `for_` (wrapping at the end); (bytes, secs).
fn sequential_reads(
    file: &File,
    device: &Path,
    size: u64,
    for_: Duration,
) -> Result<(u64, Duration), IoProbeError> {
    let mut buf = Aligned::new(SEQUENTIAL_BLOCK).ok_or_else(|| IoProbeError::Read {
        path: device.to_path_buf(),
        source: std::io::Error::other("no memory for the read buffer"),
    })?;
    let last = size - SEQUENTIAL_BLOCK as u64;
    let start = Instant::now();
    let (mut offset, mut bytes) = (0u64, 0u64);
    // At least one read, so a tiny budget still gives a figure.
    loop {
        let n = file
            .read_at(buf.slice(), offset)
            .map_err(|source| IoProbeError::Read {
                path: device.to_path_buf(),
                source,
            })?;
        bytes += n as u64;
        offset = if offset >= last {
            0
        } else {
            offset + SEQUENTIAL_BLOCK as u64
        };
        if start.elapsed() >= for_ {
            break;
        }
    }
    Ok((bytes, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_round_down_and_never_overflow() {
        assert_eq!(per_second(1000, Duration::from_millis(500)), 2000);
        assert_eq!(per_second(7, Duration::from_secs(2)), 3);
        assert_eq!(per_second(0, Duration::from_secs(1)), 0);
        assert_eq!(per_second(u64::MAX, Duration::ZERO), u64::MAX);
    }

    #[test]
    fn a_file_is_measured_read_only() {
        // O_DIRECT needs a filesystem that supports it (tmpfs does not): try the temp dir,
        // and say why when it cannot.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
        let before = std::fs::read(&path).unwrap();
        match measure(&path, Duration::from_millis(300)) {
            Ok(m) => {
                assert!(m.random_read_iops > 0 && m.seq_read_mib_s > 0, "{m:?}");
                assert!(m.took < Duration::from_secs(2), "{m:?}");
            }
            Err(IoProbeError::Open { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                eprintln!(
                    "skipping the figures: no O_DIRECT on {}",
                    dir.path().display()
                );
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    }
}
