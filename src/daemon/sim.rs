//! A simulated engine (like `stratisd --sim`): the whole daemon runs on it without touching
//! a disk. Selected with `KVSTRAP_SIM=FILE`, where FILE is a small TOML description of the
//! node; used by the daemon's tests and benchmarks.

use super::engine::{ApplySummary, Engine, EngineError, FailedDisk, Run};
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

/// Environment variable naming the simulation file.
pub const SIM_ENV: &str = "KVSTRAP_SIM";

/// The simulated node, read from the file named by `KVSTRAP_SIM`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default = "default_disks")]
    pub disks: u32,
    #[serde(default = "default_volumes")]
    pub volumes: u32,
    /// Steps the first apply runs; later applies find the node converged.
    #[serde(default = "default_steps")]
    pub steps: u32,
    /// How long each simulated step takes.
    #[serde(default)]
    pub step_millis: u64,
    /// Publications the (absent) API server has not accepted.
    #[serde(default)]
    pub pending_publications: u32,
    /// Make every step fail, to exercise the failure paths.
    #[serde(default)]
    pub fail: bool,
    /// The first N applies fail on `/dev/sim0` with an error that passes on a retry
    /// (EBUSY while udev re-reads the partition table), like a disk that is settling.
    #[serde(default)]
    pub transient_failures: u32,
}

fn default_disks() -> u32 {
    4
}
fn default_volumes() -> u32 {
    40
}
fn default_steps() -> u32 {
    8
}

/// Parse a simulation file; errors carry `file:line:col` like policy diagnostics.
pub fn load_config(path: &Path) -> Result<SimConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: error: cannot read: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
        format!("{}:{line}:{col}: error: {}", path.display(), e.message())
    })
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

pub struct SimEngine {
    path: PathBuf,
    config: Mutex<SimConfig>,
    /// Steps still to run before the simulated node has converged.
    remaining: Mutex<u32>,
    /// Applies so far, for `transient_failures`.
    applies: Mutex<u32>,
}

impl SimEngine {
    pub fn load(path: &Path) -> Result<SimEngine, String> {
        let config = load_config(path)?;
        let remaining = Mutex::new(config.steps);
        Ok(SimEngine {
            path: path.to_path_buf(),
            config: Mutex::new(config),
            remaining,
            applies: Mutex::new(0),
        })
    }

    fn config(&self) -> SimConfig {
        match self.config.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Engine for SimEngine {
    fn apply(&self, run_ctl: &Run<'_>) -> Result<ApplySummary, EngineError> {
        let stop = run_ctl.stop;
        let config = self.config();
        let mut remaining = self
            .remaining
            .lock()
            .map_err(|_| EngineError::Execute("simulator state poisoned".into()))?;
        let attempt = {
            let mut applies = self
                .applies
                .lock()
                .map_err(|_| EngineError::Execute("simulator state poisoned".into()))?;
            *applies += 1;
            *applies
        };
        let transient = attempt <= config.transient_failures;
        let (mut run, mut changed, mut failed, mut interrupted) = (0, 0, 0, false);
        while *remaining > 0 {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            tracing::info!(step = run, "simulated step");
            std::thread::sleep(Duration::from_millis(config.step_millis));
            run += 1;
            (run_ctl.progress)();
            if config.fail || transient {
                failed += 1;
                break;
            }
            changed += 1;
            *remaining -= 1;
        }
        if transient && failed == 0 && !interrupted {
            // Converged already: the settling disk still fails its check.
            run += 1;
            failed = 1;
        }
        let failed_disks: Vec<FailedDisk> = (failed > 0)
            .then(|| FailedDisk {
                disk: "/dev/sim0".into(),
                error: if transient {
                    "BLKPG add of partition 1 on /dev/sim0: EBUSY: Device or resource busy".into()
                } else {
                    "simulated failure".into()
                },
            })
            .into_iter()
            .collect();
        let broken = count(failed_disks.len());
        let per_disk = config.volumes / config.disks.max(1);
        Ok(ApplySummary {
            disks: config.disks,
            volumes: config.volumes,
            steps_run: run,
            changed,
            failed,
            refused: 0,
            interrupted,
            result: ApplySummary::result_text(failed, interrupted),
            transient: if transient { failed } else { 0 },
            disks_ready: config.disks.saturating_sub(broken),
            volumes_ready: config.volumes.saturating_sub(broken * per_disk),
            failed_disks,
            locked: Vec::new(),
        })
    }

    fn disks_json(&self) -> Result<String, EngineError> {
        let c = self.config();
        let disks: Vec<_> = (0..c.disks)
            .map(|i| json!({"path": format!("/dev/sim{i}"), "wwn": format!("naa.5000c500{i:08x}"), "group": "sim", "eligible": true}))
            .collect();
        Ok(serde_json::to_string(&json!({ "disks": disks }))?)
    }

    fn volumes_json(&self) -> Result<String, EngineError> {
        let c = self.config();
        let per_disk = (c.volumes / c.disks.max(1)).max(1);
        let volumes: Vec<_> = (0..c.volumes)
            .map(|i| {
                json!({"name": format!("sim-{:02}-{:03}", i / per_disk, i % per_disk),
                       "path": format!("/var/lib/kvstrap/sim/{i}"), "capacity_bytes": 10u64 << 30,
                       "storage_class": "sim", "state": "ready"})
            })
            .collect();
        Ok(serde_json::to_string(&json!({ "volumes": volumes }))?)
    }

    fn plan_json(&self) -> Result<String, EngineError> {
        let remaining = self.remaining.lock().map(|r| *r).unwrap_or_default();
        let steps: Vec<_> = (0..remaining)
            .map(|i| json!({"action": "simulated", "index": i}))
            .collect();
        Ok(serde_json::to_string(
            &json!({ "steps": steps, "refused": [] }),
        )?)
    }

    fn reload_policy(&self) -> Result<(), String> {
        let fresh = load_config(&self.path)?;
        if let Ok(mut c) = self.config.lock() {
            *c = fresh;
        }
        Ok(())
    }

    fn pending_publications(&self) -> u32 {
        self.config().pending_publications
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// One run of `engine` with a lock of its own (the daemon holds the real one).
    fn apply(engine: &SimEngine, stop: &AtomicBool) -> ApplySummary {
        let dir = tempfile::tempdir().unwrap();
        let lock = crate::state::lock(&dir.path().join("lock"), Duration::ZERO).unwrap();
        let run = Run {
            stop,
            lock: &lock,
            progress: &|| {},
        };
        engine.apply(&run).unwrap()
    }

    #[test]
    fn broken_file_names_line_and_column() {
        let (_d, path) = write("disks = 4\nvolumes = \"many\"\n");
        let err = load_config(&path).unwrap_err();
        assert!(err.contains("sim.toml:2:11: error:"), "{err}");
    }

    #[test]
    fn first_apply_runs_steps_then_converges() {
        let (_d, path) = write("steps = 3\n");
        let engine = SimEngine::load(&path).unwrap();
        let stop = AtomicBool::new(false);
        let first = apply(&engine, &stop);
        assert_eq!((first.changed, first.result.as_str()), (3, "success"));
        let second = apply(&engine, &stop);
        assert_eq!((second.steps_run, second.changed), (0, 0));
    }

    #[test]
    fn transient_failures_pass_after_n_applies() {
        let (_d, path) = write("steps = 2\ntransient_failures = 2\ndisks = 2\nvolumes = 4\n");
        let engine = SimEngine::load(&path).unwrap();
        let stop = AtomicBool::new(false);
        for _ in 0..2 {
            let s = apply(&engine, &stop);
            assert!(s.transient_failure(), "{s:?}");
            assert_eq!((s.disks_ready, s.volumes_ready), (1, 2));
            assert_eq!(s.failed_disks[0].disk, "/dev/sim0");
        }
        let third = apply(&engine, &stop);
        assert!(third.succeeded() && !third.transient_failure(), "{third:?}");
        assert_eq!((third.disks_ready, third.volumes_ready), (2, 4));
    }

    #[test]
    fn stop_interrupts_between_steps() {
        let (_d, path) = write("steps = 3\n");
        let engine = SimEngine::load(&path).unwrap();
        let summary = apply(&engine, &AtomicBool::new(true));
        assert!(summary.interrupted);
        assert_eq!(summary.result, "interrupted");
    }

    #[test]
    fn broken_reload_keeps_old_config() {
        let (_d, path) = write("disks = 7\n");
        let engine = SimEngine::load(&path).unwrap();
        std::fs::write(&path, "disks = [\n").unwrap();
        assert!(engine.reload_policy().is_err());
        assert_eq!(engine.config().disks, 7);
    }
}
