//! The seam between the daemon's wiring and the work: an `Engine` applies the policy and
//! answers read queries. The daemon only decides *when*; the engine decides *what*.

use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

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

/// The read documents of one look at the node, as D-Bus reads answer with them until the
/// next look. Each may have failed on its own (sysfs unreadable, say).
#[derive(Debug)]
pub struct Observation {
    /// When the inventory behind the documents was read.
    pub time: SystemTime,
    pub disks: Result<String, EngineError>,
    pub volumes: Result<String, EngineError>,
    pub plan: Result<String, EngineError>,
}

/// Everything the daemon needs from the storage side. Every method is called only from
/// the daemon's reconcile loop, one at a time, with the applier lock held: reading the
/// node probes disks (an `O_EXCL` open), which must never overlap an apply, so D-Bus
/// reads are answered from the last [`Observation`], never by calling the engine.
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
    /// Look at the node once and render every read document; called right after each run.
    /// The default asks the three document methods; an engine that already looked at the
    /// node at the end of its run answers from that look.
    fn observe(&self) -> Observation {
        Observation {
            time: SystemTime::now(),
            disks: self.disks_json(),
            volumes: self.volumes_json(),
            plan: self.plan_json(),
        }
    }
    /// Re-read the policy. On error the old policy stays in force and the text lists
    /// every problem as `FILE:LINE:COL: error: ...`, one per line.
    fn reload_policy(&self) -> Result<(), String>;
    /// PersistentVolumes rendered but not yet accepted by the API server.
    fn pending_publications(&self) -> u32 {
        0
    }
}
