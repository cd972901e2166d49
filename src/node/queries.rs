//! The read queries the CLI and the daemon's D-Bus reads both answer: the disks document,
//! the volume rows, the status on record. They observe and plan; they never change a disk.

use super::{Node, NodeError};
pub use crate::kube::publisher::KeptPublication;
use crate::kube::publisher::{kept_publications, recorded_publication};
use crate::model::{DiskService, Inventory, Plan, VolumeMode};
use crate::policy::Policy;
use crate::state::{self, State};
use serde_json::json;
use std::path::PathBuf;

/// `{"disks": [...]}`: every disk with its verdict, as `disks -o json` and D-Bus print it.
pub fn disks_document(
    policy: Option<&Policy>,
    inventory: &Inventory,
    service: &DiskService,
) -> serde_json::Value {
    let disks: Vec<_> = crate::plan::verdicts(policy, inventory, service)
        .iter()
        .map(|(disk, group, verdict)| {
            let mut v = serde_json::to_value(disk).unwrap_or_default();
            let record = service
                .out_of_service
                .get(&crate::plan::identity::disk_identity(disk));
            if let Some(obj) = v.as_object_mut() {
                obj.insert("group".into(), json!(group));
                obj.insert("service".into(), json!(record.map(|r| r.phase.as_str())));
                obj.insert("eligible".into(), json!(verdict.is_writable()));
                obj.insert(
                    "verdict".into(),
                    serde_json::to_value(verdict).unwrap_or_default(),
                );
                obj.insert("reason".into(), json!(verdict.reason()));
            }
            v
        })
        .collect();
    json!({ "disks": disks })
}

/// One provided volume, as `kvstrap volumes` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumeRow {
    pub name: String,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub volume_mode: VolumeMode,
    pub storage_class: String,
    pub group: String,
    pub disk: PathBuf,
    pub device: PathBuf,
    /// `ready` when provisioned, `pending` while apply still has steps for it.
    pub state: String,
    /// The PersistentVolume that publishes it, once one was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
    /// Whether the PV was in the cluster at the last publish pass.
    pub published: bool,
    /// Its phase there: Available, Bound, Released, Failed.
    pub phase: Option<String>,
    /// Who uses it on this node now: pods' mounts, Block mappings (`plan::usage`).
    #[serde(default)]
    pub uses: Vec<crate::model::VolumeUse>,
}

/// Volumes of the plan with their state (a volume is ready when no step touches it) and
/// who uses each, as the inventory saw it.
pub fn volume_rows(plan: &Plan, inventory: &Inventory) -> Vec<VolumeRow> {
    let uses = |v: &crate::model::VolumeSpec| {
        inventory
            .disks
            .iter()
            .find(|d| d.path == v.disk)
            .map(|d| crate::plan::usage::volume_uses(d, v))
            .unwrap_or_default()
    };
    plan.volumes()
        .map(|v| VolumeRow {
            uses: uses(v),
            name: v.name.clone(),
            path: v.path.clone(),
            capacity_bytes: v.capacity_bytes,
            volume_mode: v.volume_mode,
            storage_class: v.storage_class.clone(),
            group: v.group.clone(),
            disk: v.disk.clone(),
            device: v.device.clone(),
            state: if crate::plan::ready::pending(plan, v) {
                "pending"
            } else {
                "ready"
            }
            .into(),
            pv_name: None,
            published: false,
            phase: None,
        })
        .collect()
}

/// The status on record: the last run's state file (if any run was recorded) and the PVs
/// kept in the cluster for volumes gone from this node.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub state: Option<State>,
    pub kept: Vec<KeptPublication>,
}

impl Node {
    /// Volumes of the node under the policy, with their last recorded publication.
    pub fn volume_rows(&self, policy: &Policy) -> Result<Vec<VolumeRow>, NodeError> {
        let (inventory, plan) = self.scan_and_plan(policy)?;
        let mut rows = volume_rows(&plan, &inventory);
        let volumes: Vec<_> = plan.volumes().cloned().collect();
        let recorded = recorded_publication(&self.inputs.state_dir, &policy.node.name, &volumes);
        for r in &mut rows {
            if let Some(p) = recorded.get(&r.name) {
                r.pv_name = Some(p.pv_name.clone());
                r.published = p.published;
                r.phase = p.phase.clone();
            }
        }
        Ok(rows)
    }

    /// The disks document of one scan under the policy (or none: every disk, no group).
    pub fn disks_document(&self, policy: Option<&Policy>) -> Result<serde_json::Value, NodeError> {
        Ok(disks_document(
            policy,
            &self.scan(policy)?,
            &self.disk_service()?,
        ))
    }

    /// PersistentVolumes kept in the cluster for volumes gone from this node.
    pub fn kept(&self) -> Vec<KeptPublication> {
        kept_publications(&self.inputs.state_dir)
    }

    /// The last recorded run and the kept PVs, from the state directory alone.
    pub fn recorded(&self) -> Result<Recorded, NodeError> {
        Ok(Recorded {
            state: state::load(&self.inputs.state_dir).map_err(NodeError::State)?,
            kept: self.kept(),
        })
    }
}
