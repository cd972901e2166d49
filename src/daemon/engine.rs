//! The seam between the daemon's wiring and the work: an `Engine` applies the policy and
//! answers read queries. The daemon only decides *when*; the engine decides *what*.

pub use crate::node::{ApplySummary, FailedDisk};
use crate::state::ApplyLock;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

/// What the daemon hands each run.
pub struct Run<'a> {
    /// Set by SIGTERM/SIGINT: finish the step in flight and return.
    pub stop: &'a AtomicBool,
    /// The applier lock, held by the daemon for the run and the reads made after it.
    pub lock: &'a ApplyLock,
    /// Proof of life: the systemd watchdog is fed only when this was called recently, so a
    /// run stuck in one step (a hung probe, a wedged device) lets the watchdog fire.
    pub progress: &'a (dyn Fn() + Sync),
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
    /// Observe, plan and execute. When `run.stop` turns true, finish the step in flight,
    /// start nothing new, and return with `interrupted` set. Call `run.progress` whenever
    /// the run moves forward (a step finished, the node read): it feeds the watchdog.
    fn apply(&self, run: &Run<'_>) -> Result<ApplySummary, EngineError>;
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
    /// The disks document of the last look with the newest health reading, when the
    /// engine reads health (no scan: the health thread asks for it after a reading).
    fn disks_with_health(&self) -> Option<Result<String, EngineError>> {
        None
    }
    /// A health reading changed: hand it to the Node state publisher (its condition and
    /// Events are sent without a run).
    fn publish_health(&self) {}
    /// A health reading asks for a run: a disk failed in a group with
    /// `on_failure = "drain"` and is not out of service yet.
    fn health_wants_run(&self) -> bool {
        false
    }
    /// Drain (`drain = true`) or undrain a disk named by path, by-id, WWN or serial: the
    /// record only, the next run carries it out. The text says what happened.
    fn change_service(&self, _disk: &str, _drain: bool, _why: &str) -> Result<String, String> {
        Err("this engine does not take disks out of service".into())
    }
}
