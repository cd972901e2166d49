//! Where a pass hands what exists: the daemon's background publisher, or one bounded
//! attempt for `kvstrap apply`. Both render the manifests first; neither blocks local work.

use crate::kube::node_state::NodeReport;
use crate::kube::reconcile::DrainBlocker;
use crate::model::Plan;
use crate::policy::Policy;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The publisher as a pass sees it: it is handed each pass's plan and returns at once
/// (or within a bound), and counts what the API server has not accepted yet.
pub trait Publications: Send + Sync {
    /// Render and publish (or queue) the volumes that exist after a pass, and the
    /// policy's classes. `Err` only when the manifests could not be rendered.
    fn submit(&self, policy: &Policy, plan: &Plan) -> Result<(), String>;
    /// PersistentVolumes rendered but not yet accepted by the API server.
    fn pending(&self) -> u32 {
        0
    }
    /// After each pass: the node's storage state for its Node object (condition, label,
    /// Events). Nothing by default.
    fn run_finished(&self, _report: NodeReport) {}
    /// The newest health reading of the selected disks, for the Node's
    /// `KvstrapDisksHealthy` condition and Events: after each run and whenever a reading
    /// changes, without a run. Nothing by default.
    fn health(&self, _health: &crate::health::HealthMap) {}
    /// Failed publication passes since the publisher started (a metrics counter).
    fn errors(&self) -> u64 {
        0
    }
    /// The last publish pass's view of the draining disks: per disk, the PVs still
    /// holding it. None when no pass reached the API server yet.
    fn drain_check(&self) -> Option<BTreeMap<String, Vec<DrainBlocker>>> {
        None
    }
}

/// `kvstrap apply`'s publisher: the manifests, then one publish attempt bounded in time
/// when the policy says `publish = true`; a failure is logged, the daemon keeps retrying.
pub struct PublishOnce {
    pub state_dir: PathBuf,
    /// What the last attempt left pending, for the metrics.
    pub pending: std::sync::atomic::AtomicU32,
    /// The last attempt's view of the draining disks.
    pub drains: std::sync::Mutex<Option<BTreeMap<String, Vec<DrainBlocker>>>>,
}

impl Publications for PublishOnce {
    fn submit(&self, policy: &Policy, plan: &Plan) -> Result<(), String> {
        let desired = crate::kube::node::render(policy, plan, &self.state_dir)
            .map_err(|e| format!("cannot render the manifests: {e:#}"))?;
        if policy.kubernetes.publish {
            let outcome = crate::kube::node::publish_now(policy, &desired, &self.state_dir);
            if outcome.pending == 0 {
                tracing::info!("{}", outcome.message);
            } else {
                tracing::warn!("{}", outcome.message);
            }
            let pending = u32::try_from(outcome.pending).unwrap_or(u32::MAX);
            self.pending
                .store(pending, std::sync::atomic::Ordering::Relaxed);
            if let (Some(view), Ok(mut drains)) = (outcome.draining, self.drains.lock()) {
                *drains = Some(view);
            }
        }
        Ok(())
    }

    fn drain_check(&self) -> Option<BTreeMap<String, Vec<DrainBlocker>>> {
        self.drains.lock().ok().and_then(|d| d.clone())
    }

    fn pending(&self) -> u32 {
        self.pending.load(std::sync::atomic::Ordering::Relaxed)
    }
}
