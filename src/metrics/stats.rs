//! The counters behind `_total` metrics and the step-duration histogram, kept in the
//! state directory so they survive daemon restarts and count `kvstrap apply` runs too
//! (both take the applier lock, so only one writer at a time).

use crate::apply::{ApplyReport, StepResult};
use crate::state::{self, StateError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Upper bounds of the step-duration buckets: a directory takes milliseconds, an mkfs of
/// a large disk minutes.
pub const STEP_BUCKETS_SECONDS: [f64; 10] =
    [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// Bumped when the bucket bounds change: counts of other bounds are not added up.
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    #[serde(default)]
    pub version: u32,
    pub runs: u64,
    pub failures: u64,
    pub last_success_unix: Option<u64>,
    /// By step action (`make_filesystem`, ...).
    pub steps: BTreeMap<String, Histogram>,
}

/// Counts per bucket (not cumulative), their sum and count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        self.buckets.resize(STEP_BUCKETS_SECONDS.len(), 0);
        if let Some(i) = STEP_BUCKETS_SECONDS.iter().position(|&le| seconds <= le) {
            self.buckets[i] += 1;
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

impl RunStats {
    /// Count one finished run. Skipped steps (a stop request) were not run and do not count.
    pub fn record(&mut self, report: &ApplyReport, now_unix: u64) {
        self.runs += 1;
        if report.failed() > 0 {
            self.failures += 1;
        } else {
            self.last_success_unix = Some(now_unix);
        }
        for s in report
            .steps
            .iter()
            .filter(|s| s.result != StepResult::Skipped)
        {
            self.steps
                .entry(s.action.to_string())
                .or_default()
                .observe(s.millis as f64 / 1000.0);
        }
    }

    /// Count a run that could not even start (lock, unreadable inventory).
    pub fn record_error(&mut self) {
        self.runs += 1;
        self.failures += 1;
    }
}

pub fn stats_file(state_dir: &Path) -> PathBuf {
    state_dir.join("metrics-counters.json")
}

/// The counters so far; none yet, or a file of another version, start from zero (a
/// counter reset, which Prometheus' `rate()` understands).
pub fn load(state_dir: &Path) -> RunStats {
    std::fs::read(stats_file(state_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<RunStats>(&bytes).ok())
        .filter(|s| s.version == VERSION)
        .unwrap_or(RunStats {
            version: VERSION,
            ..RunStats::default()
        })
}

pub fn save(state_dir: &Path, stats: &RunStats) -> Result<(), StateError> {
    let bytes = serde_json::to_vec(stats).map_err(|e| StateError::Write {
        path: stats_file(state_dir),
        source: std::io::Error::other(e),
    })?;
    state::write_atomic(&stats_file(state_dir), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::StepReport;

    fn step(action: &'static str, millis: u64, result: StepResult) -> StepReport {
        StepReport {
            action,
            disk: "/dev/loop0".into(),
            description: String::new(),
            result,
            transient: false,
            millis,
        }
    }

    #[test]
    fn runs_failures_and_durations_are_counted() {
        let mut st = RunStats::default();
        let ok = ApplyReport {
            steps: vec![
                step(
                    "mount",
                    3,
                    StepResult::Changed {
                        what: String::new(),
                    },
                ),
                step(
                    "make_filesystem",
                    2500,
                    StepResult::Changed {
                        what: String::new(),
                    },
                ),
                step("mount", 0, StepResult::Skipped),
            ],
        };
        st.record(&ok, 100);
        let bad = ApplyReport {
            steps: vec![step("mount", 70, StepResult::Failed { error: "x".into() })],
        };
        st.record(&bad, 200);
        st.record_error();
        assert_eq!(
            (st.runs, st.failures, st.last_success_unix),
            (3, 2, Some(100))
        );
        let mount = &st.steps["mount"];
        assert_eq!(mount.count, 2, "the skipped step was not run");
        assert_eq!(mount.buckets, [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert!((mount.sum_seconds - 0.073).abs() < 1e-9);
        assert_eq!(st.steps["make_filesystem"].buckets[6], 1);
    }

    #[test]
    fn counters_survive_in_the_state_directory() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()).runs, 0);
        let mut st = load(dir.path());
        st.record(&ApplyReport::default(), 5);
        save(dir.path(), &st).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()), st);
        std::fs::write(stats_file(dir.path()), b"{\"version\": 0, \"runs\": 9, \"failures\": 0, \"last_success_unix\": null, \"steps\": {}}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()).runs, 0, "another version starts again");
    }
}
