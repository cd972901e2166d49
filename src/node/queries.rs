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
    /// On a LUKS2 volume (an encrypted group): its PV says `kvstrap.io/encrypted: "true"`.
    #[serde(default)]
    pub encrypted: bool,
    /// The LUKS2 mapping it sits on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<PathBuf>,
}

/// One pool of a dynamic group: what its claims take and what is left.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PoolRow {
    pub group: String,
    pub storage_class: String,
    pub disk: PathBuf,
    pub mountpoint: PathBuf,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub volumes: usize,
}

/// The pools of the plan's dynamic groups, as they are on the node now.
pub fn pool_rows(plan: &Plan) -> Vec<PoolRow> {
    let specs: Vec<crate::model::PoolSpec> = plan.pools().cloned().collect();
    let served = crate::dynamic::volumes::observe(&specs);
    crate::dynamic::accounting::pools(&specs, &served, &|_| 0)
        .iter()
        .map(|p| PoolRow {
            group: p.spec.group.clone(),
            storage_class: p.spec.storage_class.clone(),
            disk: p.spec.disk.clone(),
            mountpoint: p.spec.mountpoint.clone(),
            capacity_bytes: p.spec.capacity_bytes,
            used_bytes: p.used,
            free_bytes: p.free(),
            volumes: served
                .iter()
                .filter(|s| s.pool == p.spec.mountpoint)
                .count(),
        })
        .collect()
}

/// The dynamic volumes on the plan's pools: a directory per claim served.
fn dynamic_rows(plan: &Plan, inventory: &Inventory) -> Vec<VolumeRow> {
    let specs: Vec<crate::model::PoolSpec> = plan.pools().cloned().collect();
    crate::dynamic::volumes::observe(&specs)
        .iter()
        .filter_map(|s| {
            let pool = specs.iter().find(|p| p.mountpoint == s.pool)?;
            let v = crate::dynamic::volumes::volume_spec(pool, s);
            let uses = inventory
                .disks
                .iter()
                .find(|d| d.path == pool.disk)
                .map(|d| crate::plan::usage::volume_uses(d, &v))
                .unwrap_or_default();
            Some(VolumeRow {
                pv_name: Some(crate::kube::dynamic::pv_name(&s.claim_uid)),
                state: if s.bytes.is_some() {
                    "ready"
                } else {
                    "pending"
                }
                .into(),
                name: v.name,
                path: v.path,
                capacity_bytes: v.capacity_bytes,
                volume_mode: v.volume_mode,
                storage_class: v.storage_class,
                group: v.group,
                disk: v.disk,
                device: v.device,
                published: false,
                phase: None,
                uses,
                encrypted: v.mapping.is_some(),
                mapping: v.mapping,
            })
        })
        .collect()
}

/// Volumes of the plan with their state (a volume is ready when no step touches it) and
/// who uses each, as the inventory saw it; then the dynamic volumes on its pools.
pub fn volume_rows(plan: &Plan, inventory: &Inventory) -> Vec<VolumeRow> {
    let mut rows = static_rows(plan, inventory);
    rows.extend(dynamic_rows(plan, inventory));
    rows
}

fn static_rows(plan: &Plan, inventory: &Inventory) -> Vec<VolumeRow> {
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
            encrypted: v.encrypted(),
            mapping: v.mapping.clone(),
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

    /// The pools of the policy's dynamic groups, as they are now.
    pub fn pool_rows(&self, policy: &Policy) -> Result<Vec<PoolRow>, NodeError> {
        let (_, plan) = self.scan_and_plan(policy)?;
        Ok(pool_rows(&plan))
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
