//! A daemon engine for publication tests: every run (once `go` is set) hands `desired` to
//! the publisher, like the host engine after an apply, and counts itself.
#![allow(dead_code, clippy::unwrap_used)]

use kvstrap::daemon::publications::KubePublications;
use kvstrap::daemon::{ApplySummary, Engine, EngineError};
use kvstrap::kube::Desired;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

pub struct PublishingEngine {
    pub publications: KubePublications,
    pub desired: Mutex<Desired>,
    pub go: AtomicBool,
    pub applies: AtomicU32,
}

impl PublishingEngine {
    /// An engine that submits `desired` from its first run on (`go` already set).
    pub fn new(publications: KubePublications, desired: Desired) -> PublishingEngine {
        PublishingEngine {
            publications,
            desired: Mutex::new(desired),
            go: AtomicBool::new(true),
            applies: AtomicU32::new(0),
        }
    }
}

impl Engine for PublishingEngine {
    fn apply(&self, _run: &kvstrap::daemon::Run<'_>) -> Result<ApplySummary, EngineError> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        if self.go.load(Ordering::SeqCst) {
            let desired = self.desired.lock().unwrap().clone();
            self.publications.submit_desired(desired);
        }
        Ok(ApplySummary {
            result: "success".into(),
            ..Default::default()
        })
    }
    fn disks_json(&self) -> Result<String, EngineError> {
        Ok("{\"disks\":[]}".into())
    }
    fn volumes_json(&self) -> Result<String, EngineError> {
        Ok("{\"volumes\":[]}".into())
    }
    fn plan_json(&self) -> Result<String, EngineError> {
        Ok("{\"steps\":[]}".into())
    }
    fn reload_policy(&self) -> Result<(), String> {
        Ok(())
    }
}
