//! The node's storage pipeline (one converge pass, shared queries); disks only through `apply`.
//!
//! The node's storage pipeline, written once for the CLI and the daemon: explicit inputs,
//! one converge pass (lock → scan → plan → execute → scan again → render → publish →
//! record) and the read queries both answer. It may use policy, inventory, plan, apply,
//! kube and state; it knows no arguments, output formats or D-Bus types.

pub mod converge;
pub mod health;
pub mod io;
pub mod lock;
pub mod metrics;
pub mod publish;
pub mod queries;
pub mod report;
pub mod service;

pub use converge::{Event, Lock, Look, Progress, Report};
pub use publish::{Publications, PublishOnce};
pub use queries::VolumeRow;
pub use report::{ApplySummary, FailedDisk};

use crate::inventory::{self, ScanOptions};
use crate::model::{Inventory, Layout, Plan};
use crate::plan::PlanContext;
use crate::policy::{self, Policy, PolicyError};
use std::path::PathBuf;

/// Everything a pass depends on besides the machine itself, said explicitly.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// A policy file or drop-in directory; `None`: the system locations
    /// (`/usr/lib/kvstrap/policy.d`, `/etc/kvstrap/policy.toml`, `/etc/kvstrap/policy.d`).
    pub policy: Option<PathBuf>,
    /// State file, rendered manifests, block-volume links, publication ledger.
    pub state_dir: PathBuf,
    /// The applier lock the CLI and the daemon share.
    pub lock: PathBuf,
}

/// Why a pass or a query could not run at all (as opposed to steps that failed).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Lock(String),
    #[error("cannot read the disk inventory: {0}")]
    Observe(String),
    #[error("{0}")]
    Execute(String),
    // The cause is in the text, not a `source`: the daemon shows only the text, and the
    // CLI would print a source a second time as "caused by".
    #[error("cannot record the apply in the state directory: {0}")]
    Record(crate::state::StateError),
    #[error("cannot read the state directory: {0}")]
    State(crate::state::StateError),
}

/// The node as the pipeline sees it: its inputs, and the functions every caller shares.
#[derive(Debug, Clone)]
pub struct Node {
    pub inputs: Inputs,
}

impl Node {
    pub fn new(inputs: Inputs) -> Node {
        Node { inputs }
    }

    /// The policy from the configured sources and, when they say `cluster_policy = true`,
    /// the cluster layer cached in the state directory; every diagnostic on failure.
    pub fn load_policy(&self) -> Result<Policy, PolicyError> {
        policy::load_with_cluster(self.inputs.policy.as_deref(), &self.inputs.state_dir)
    }

    /// Observe the machine, including the paths kvstrap manages under this policy.
    pub fn scan(&self, policy: Option<&Policy>) -> Result<Inventory, NodeError> {
        let mut opts = ScanOptions::default();
        if let Some(p) = policy {
            opts.managed_roots = vec![p.node.storage_root.clone(), self.block_dir()];
            opts.quota_filesystems = p
                .disk_groups
                .iter()
                .filter(|group| group.layout == Layout::Shared)
                .filter_map(|group| p.storage_class(&group.storage_class).map(|c| c.fs_type))
                .collect();
            opts.quota_filesystems.sort();
            opts.quota_filesystems.dedup();
        }
        let mut inventory =
            inventory::scan(&opts).map_err(|e| NodeError::Observe(e.to_string()))?;
        io::attach(
            &mut inventory,
            &self.inputs.state_dir,
            &io_thresholds(policy),
        );
        Ok(inventory)
    }

    /// The pure planner on this node's context.
    pub fn plan(&self, policy: &Policy, inventory: &Inventory) -> Result<Plan, NodeError> {
        Ok(crate::plan::plan(policy, inventory, &self.plan_context()?))
    }

    /// Scan and plan in one go: what a run would do now.
    pub fn scan_and_plan(&self, policy: &Policy) -> Result<(Inventory, Plan), NodeError> {
        let inventory = self.scan(Some(policy))?;
        let plan = self.plan(policy, &inventory)?;
        Ok((inventory, plan))
    }

    /// The planner's context: the state directory and the operator's disk record.
    pub fn plan_context(&self) -> Result<PlanContext, NodeError> {
        Ok(PlanContext {
            state_dir: self.inputs.state_dir.clone(),
            service: self.disk_service()?,
        })
    }

    /// Disks the operator took out of service or put in another's place.
    pub fn disk_service(&self) -> Result<crate::model::DiskService, NodeError> {
        crate::state::load_disk_service(&self.inputs.state_dir).map_err(NodeError::State)
    }

    /// The state directory's block-link folder.
    pub fn block_dir(&self) -> PathBuf {
        self.inputs.state_dir.join("block")
    }
}

/// The policy's `[io_class]` thresholds, or the defaults without a policy.
pub fn io_thresholds(policy: Option<&Policy>) -> crate::policy::IoClassThresholds {
    policy.map(|p| p.io_class).unwrap_or_default()
}

/// Every diagnostic on its own line, `FILE:LINE:COL: error: ...`.
pub fn diagnostics(e: &PolicyError) -> String {
    e.diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
