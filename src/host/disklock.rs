//! Block-device locking as systemd documents it ("Locking Block Device Access"): while
//! kvstrap writes a disk it holds `flock(LOCK_EX)` on the whole-disk node. udev takes a
//! shared lock before it probes a disk or re-reads its partition table after a write; with
//! ours held it leaves the disk alone, so it cannot re-read the table under us (which made
//! BLKPG fail with EBUSY, or made partition nodes vanish before mkfs, on first boot).

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for another holder (udev probing the disk for a few milliseconds,
/// another partitioning tool) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {} to lock it: {source}", disk.display())]
    Open {
        disk: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} stayed locked by another program for {}s (udev, or a partitioning tool): \
         kvstrap does not write a disk someone else holds; find the holder with \
         `fuser -v {}` and run apply again",
        disk.display(), LOCK_WAIT.as_secs(), disk.display()
    )]
    Held { disk: PathBuf },
    #[error("cannot lock {}: {source}", disk.display())]
    Flock { disk: PathBuf, source: nix::Error },
}

/// An exclusive BSD lock on a whole-disk node; released when dropped.
#[derive(Debug)]
pub struct DiskLock {
    _lock: Flock<File>,
}

/// Take `flock(LOCK_EX)` on `disk`, waiting (bounded) while someone else holds it.
pub fn lock_whole_disk(disk: &Path) -> Result<DiskLock, LockError> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        // Read-only: closing it must not look like a write to udev's inotify watch.
        let file = File::open(disk).map_err(|source| LockError::Open {
            disk: disk.to_path_buf(),
            source,
        })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(DiskLock { _lock: lock }),
            Err((_, nix::Error::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err((_, nix::Error::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    disk: disk.to_path_buf(),
                })
            }
            Err((_, source)) => {
                return Err(LockError::Flock {
                    disk: disk.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_locker_waits_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"x").unwrap();
        let first = lock_whole_disk(&path).unwrap();
        // Somebody else (udev) asking for a shared lock is refused while we hold it.
        let other = File::open(&path).unwrap();
        assert!(Flock::lock(other, FlockArg::LockSharedNonblock).is_err());
        let started = Instant::now();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let second = lock_whole_disk(&path).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        releaser.join().unwrap();
        drop(second);
        let other = File::open(&path).unwrap();
        assert!(Flock::lock(other, FlockArg::LockSharedNonblock).is_ok());
    }
}
