//! Durable state: the applier lock, and the state file written atomically
//! (temp file, fsync, rename, directory fsync). Discovery, not this file, decides safety:
//! the state file only records what happened, for `status` and the daemon.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DEFAULT_LOCK: &str = "/run/kvstrap/lock";
pub const STATE_FILE: &str = "state.json";
/// Schema version of the state file; bumped on incompatible changes.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open lock file {path}: {source}")]
    LockOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another kvstrap applier holds {path}; waited {waited:?}. Try again when it has finished"
    )]
    LockBusy { path: PathBuf, waited: Duration },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kvstrap state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Held while applying; released on drop (the kernel drops flocks when the fd closes,
/// so a crashed applier never leaves a stale lock).
#[derive(Debug)]
pub struct ApplyLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

/// Where the lock lives: /run/kvstrap/lock, or `$KVSTRAP_LOCK` (tests, demos).
pub fn lock_path() -> PathBuf {
    std::env::var_os("KVSTRAP_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK))
}

/// Take the applier lock, waiting up to `timeout` for another applier to finish.
pub fn lock(path: &Path, timeout: Duration) -> Result<ApplyLock, StateError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| StateError::LockOpen {
            path: path.into(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| StateError::LockOpen {
            path: path.into(),
            source,
        })?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                return Ok(ApplyLock {
                    _lock: held,
                    path: path.into(),
                })
            }
            Err((back, Errno::EWOULDBLOCK)) if start.elapsed() < timeout => {
                file = back;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(StateError::LockBusy {
                    path: path.into(),
                    waited: start.elapsed(),
                })
            }
            Err((_, e)) => {
                return Err(StateError::LockOpen {
                    path: path.into(),
                    source: e.into(),
                })
            }
        }
    }
}

/// Replace `path` with `contents` so that a crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut file = File::create(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// What the last apply did, for `status` and D-Bus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub last_apply_unix: Option<u64>,
    /// `success`, `failed: ...`, `refused: ...`.
    pub last_result: Option<String>,
    pub steps_run: usize,
    pub steps_changed: usize,
    pub disks: usize,
    pub volumes: usize,
    pub refused: usize,
    /// Step being executed when the applier stopped, if it did not finish (intent record).
    pub in_flight: Option<String>,
}

pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

pub fn load(state_dir: &Path) -> Result<Option<State>, StateError> {
    let path = state_file(state_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

pub fn save(state_dir: &Path, state: &State) -> Result<(), StateError> {
    let mut state = state.clone();
    state.version = STATE_VERSION;
    let json = serde_json::to_vec_pretty(&state).unwrap_or_default();
    write_atomic(&state_file(state_dir), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_locker_waits_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = lock(&path, Duration::ZERO).unwrap();
        let err = lock(&path, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("another kvstrap applier"), "{err}");
        drop(held);
        assert!(lock(&path, Duration::ZERO).is_ok());
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let s = State {
            last_result: Some("success".into()),
            volumes: 3,
            ..State::default()
        };
        save(dir.path(), &s).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(back.volumes, 3);
        assert_eq!(back.version, STATE_VERSION);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }
}
