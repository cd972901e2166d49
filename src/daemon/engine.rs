//! The seam between the daemon's wiring and the work: an `Engine` applies the policy and
//! answers read queries. The daemon only decides *when*; the engine decides *what*.

use serde::Serialize;
use std::sync::atomic::AtomicBool;

/// What one apply run did, as the daemon reports it (STATUS=, D-Bus, journal).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplySummary {
    /// Disks kvstrap manages under the policy.
    pub disks: u32,
    /// Volumes provided under the policy.
    pub volumes: u32,
    pub steps_run: u32,
    pub changed: u32,
    pub failed: u32,
    /// Disks the planner left alone (foreign signatures, in use, excluded).
    pub refused: u32,
    /// True when a stop request cut the run short after the step in flight.
    pub interrupted: bool,
    /// `success`, `failed: N step(s)` or `interrupted`.
    pub result: String,
    /// Failed steps whose error may pass on a retry (EBUSY, a partition node not there
    /// yet): the first run after start is retried on these before READY.
    pub transient: u32,
    /// Disks with nothing left to do after the run.
    pub disks_ready: u32,
    /// Volumes that exist after the run: the only ones rendered and published.
    pub volumes_ready: u32,
    /// Each disk with a failed step, and that step's error.
    pub failed_disks: Vec<FailedDisk>,
}

/// A disk whose run stopped at a failed step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FailedDisk {
    pub disk: String,
    pub error: String,
}

impl ApplySummary {
    pub fn succeeded(&self) -> bool {
        self.failed == 0 && !self.interrupted
    }

    /// Worth running again at once: some step failed only because a device was settling.
    pub fn transient_failure(&self) -> bool {
        self.transient > 0 && !self.interrupted
    }

    /// The result word for a run with these counters.
    pub fn result_text(failed: u32, interrupted: bool) -> String {
        match (failed, interrupted) {
            (0, false) => "success".into(),
            (0, true) => "interrupted".into(),
            (n, _) => format!("failed: {n} step(s)"),
        }
    }
}

/// Why an engine operation could not run at all (as opposed to steps that failed).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the policy is not usable: {0}")]
    Policy(String),
    #[error("cannot read the node: {0}")]
    Observe(String),
    #[error("cannot run the plan: {0}")]
    Execute(String),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Everything the daemon needs from the storage side. Implementations must be cheap to
/// call concurrently for the read methods; `apply` and `reload_policy` are only ever
/// called from the daemon's reconcile loop, one at a time, with the applier lock held.
pub trait Engine: Send + Sync {
    /// Observe, plan and execute. When `stop` turns true, finish the step in flight,
    /// start nothing new, and return with `interrupted` set.
    fn apply(&self, stop: &AtomicBool) -> Result<ApplySummary, EngineError>;
    /// `{"disks":[...]}` as `kvstrap disks --output json` prints it.
    fn disks_json(&self) -> Result<String, EngineError>;
    /// `{"volumes":[...]}` as `kvstrap volumes --output json` prints it.
    fn volumes_json(&self) -> Result<String, EngineError>;
    /// The plan a run would execute now, as `kvstrap plan --output json` prints it.
    fn plan_json(&self) -> Result<String, EngineError>;
    /// Re-read the policy. On error the old policy stays in force and the text lists
    /// every problem as `FILE:LINE:COL: error: ...`, one per line.
    fn reload_policy(&self) -> Result<(), String>;
    /// PersistentVolumes rendered but not yet accepted by the API server.
    fn pending_publications(&self) -> u32 {
        0
    }
}
