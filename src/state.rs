//! Durable state: the applier lock, the state file and the operator's disk record.
//!
//! Durable state: the applier lock, and the state file written atomically
//! (temp file, fsync, rename, directory fsync). Discovery, not this file, decides safety:
//! the state file only records what happened, for `status` and the daemon. The one
//! exception is `disks.json`, what the operator said (drain, replace): discovery cannot
//! know it, so it is read on every plan and a damaged file stops the run.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DEFAULT_LOCK: &str = "/run/kvstrap/lock";
pub const STATE_FILE: &str = "state.json";
/// Disks taken out of service and replacements (`kvstrap drain`, `replace`).
pub const DISK_SERVICE_FILE: &str = "disks.json";
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
        create_private_dir(dir, 0o755).map_err(|source| StateError::LockOpen {
            path: path.into(),
            source,
        })?;
    }
    // Only root takes the lock: 0600, and never through a symlink planted at its name.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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
    create_private_dir(dir, 0o755).map_err(err)?;
    write_atomic_unsynced(path, contents)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// [`write_atomic`] without the directory fsync, for a caller that writes many files
/// into one directory and fsyncs it once afterwards (until then a crash may leave the
/// old file or the new one, never a torn one). The directory must exist.
pub fn write_atomic_unsynced(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let (tmp, mut file) = create_temp(dir, path, 0o644).map_err(err)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Create `dir` (and its parents) with `mode`, whatever the umask.
pub fn create_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    // DirBuilder's mode passes through the umask; set it exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// A new temp file beside `path`, with a name nobody can have prepared: created with
/// O_EXCL|O_NOFOLLOW, so a symlink or file planted there is never written through.
fn create_temp(dir: &Path, path: &Path, mode: u32) -> std::io::Result<(PathBuf, File)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{file_name}.{}.{n}.{nanos:x}.tmp",
            std::process::id()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => {
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                return Ok((tmp, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
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
    /// LUKS2 volumes of kvstrap's that nothing opened (names, never keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locked: Vec<crate::model::LockedVolume>,
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

impl State {
    /// Whether `self`, a run that ran no step, only repeats what `recorded` says: the same
    /// result and the same disks, volumes and refusals. Such a run is not written down.
    pub fn repeats(&self, recorded: &State) -> bool {
        self.steps_run == 0
            && self.last_result == recorded.last_result
            && (self.disks, self.volumes, self.refused)
                == (recorded.disks, recorded.volumes, recorded.refused)
    }
}

/// Record a finished run, unless it ran no step and ended as the one on record (a
/// converged node's pass, which writes nothing at all): the record then keeps the last
/// run that changed something or ended otherwise.
pub fn record_run(state_dir: &Path, state: &State) -> Result<(), StateError> {
    if let Ok(Some(recorded)) = load(state_dir) {
        if state.repeats(&recorded) {
            return Ok(());
        }
    }
    save(state_dir, state)
}

pub fn disk_service_file(state_dir: &Path) -> PathBuf {
    state_dir.join(DISK_SERVICE_FILE)
}

/// The operator's disk record; empty when there is none yet. A file that cannot be read
/// is an error, never "no disk is drained": a drained disk must stay out of service.
pub fn load_disk_service(state_dir: &Path) -> Result<crate::model::DiskService, StateError> {
    let path = disk_service_file(state_dir);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

pub fn save_disk_service(
    state_dir: &Path,
    record: &crate::model::DiskService,
) -> Result<(), StateError> {
    let mut record = record.clone();
    record.version = 1;
    let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    write_atomic(&disk_service_file(state_dir), &json)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn disk_record_round_trips_and_a_damaged_one_is_an_error() {
        use crate::model::{ServicePhase, ServiceRecord};
        let dir = tempfile::tempdir().unwrap();
        assert!(load_disk_service(dir.path())
            .unwrap()
            .out_of_service
            .is_empty());
        let mut record = crate::model::DiskService::default();
        record.out_of_service.insert(
            "serial:A".into(),
            ServiceRecord {
                phase: ServicePhase::Drained,
                path: "/dev/sdb".into(),
                group: Some("g".into()),
                since_unix: 1,
                why: "kvstrap drain".into(),
            },
        );
        save_disk_service(dir.path(), &record).unwrap();
        let back = load_disk_service(dir.path()).unwrap();
        assert_eq!(back.out_of_service, record.out_of_service);
        fs::write(disk_service_file(dir.path()), b"{").unwrap();
        let err = load_disk_service(dir.path()).unwrap_err().to_string();
        assert!(err.contains("disks.json"), "{err}");
    }

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
    fn a_run_that_only_repeats_the_record_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let changed = State {
            last_apply_unix: Some(100),
            last_result: Some("success".into()),
            steps_run: 28,
            steps_changed: 28,
            disks: 4,
            volumes: 12,
            ..State::default()
        };
        record_run(dir.path(), &changed).unwrap();
        let modified = || {
            fs::metadata(state_file(dir.path()))
                .unwrap()
                .modified()
                .unwrap()
        };
        let first = modified();
        let noop = State {
            last_apply_unix: Some(200),
            steps_run: 0,
            steps_changed: 0,
            ..changed.clone()
        };
        std::thread::sleep(Duration::from_millis(20));
        record_run(dir.path(), &noop).unwrap();
        assert_eq!(modified(), first, "a no-op run writes nothing");
        assert_eq!(
            load(dir.path()).unwrap().unwrap().last_apply_unix,
            Some(100)
        );
        // A run with nothing to do that ends otherwise (a disk refused now) is recorded.
        let refused = State {
            refused: 1,
            ..noop.clone()
        };
        record_run(dir.path(), &refused).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().unwrap(),
            State {
                version: STATE_VERSION,
                ..refused
            }
        );
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

    #[test]
    fn state_files_and_dirs_have_their_modes_whatever_the_umask_and_follow_no_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // umask is per process (nextest runs each test in its own); restored below.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        save(&state, &State::default()).unwrap();
        let held = lock(&dir.path().join("run/lock"), Duration::ZERO).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&state), 0o755);
        assert_eq!(mode(&state_file(&state)), 0o644);
        assert_eq!(mode(&dir.path().join("run")), 0o755);
        assert_eq!(mode(&dir.path().join("run/lock")), 0o600);
        drop(held);
        // A symlink planted at the lock's name is not followed.
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join("evil")).unwrap();
        assert!(lock(&dir.path().join("evil"), Duration::ZERO).is_err());
        assert!(!target.exists());
    }
}
