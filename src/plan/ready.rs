//! Which planned volumes exist already: a volume is ready when no step of the plan
//! touches it. Pure; shared by the volume list and the publisher, which publishes only
//! ready volumes.

use crate::model::{Plan, Step, VolumeSpec};

/// True while the plan still has a step for this volume (its disk, device or path).
pub fn pending(plan: &Plan, v: &VolumeSpec) -> bool {
    plan.steps.iter().any(|s| match s {
        Step::CreateDirectory { path, .. }
        | Step::SetOwnership { path, .. }
        | Step::SetQuota { path, .. } => *path == v.path,
        Step::LinkBlockDevice { link, .. } => *link == v.path,
        Step::MakeFilesystem { device, .. } | Step::Mount { device, .. } => {
            *device == v.device || Some(device) == v.mapping.as_ref()
        }
        Step::FormatLuks { device, .. } | Step::OpenLuks { device, .. } => *device == v.device,
        Step::WritePartitionTable { disk, .. } | Step::WipeDisk { disk, .. } => *disk == v.disk,
        Step::AddPartitionNodes { disk, .. } => *disk == v.disk,
        // Only drained disks get these, and their volumes are not in the plan's groups.
        Step::Unmount { .. }
        | Step::RemoveBlockLink { .. }
        | Step::CloseLuks { .. }
        | Step::EraseLuks { .. } => false,
    })
}

/// Volumes that exist now: those of the plan with no step left for them.
pub fn provisioned(plan: &Plan) -> Vec<VolumeSpec> {
    plan.volumes()
        .filter(|v| !pending(plan, v))
        .cloned()
        .collect()
}
