//! Human-readable plan: grouped by disk group, refusals, steps, and totals with headroom.

use super::capacity::human;
use crate::model::{Plan, Step};
use std::fmt::Write;

pub fn plan_text(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Node {}  (storage root {})",
        plan.node,
        plan.storage_root.display()
    );
    for group in &plan.groups {
        let _ = writeln!(
            out,
            "\nGroup {} -> storage class {} ({:?} layout): {} disk(s), {} volume(s)",
            group.name,
            group.storage_class,
            group.layout,
            group.disks.len(),
            group.volumes.len()
        );
        for pool in &group.pools {
            let _ = writeln!(
                out,
                "  {:<14} pool {} for claims (dynamic): up to {}  [{}]",
                pool.disk.display(),
                pool.mountpoint.display(),
                human(pool.capacity_bytes),
                pool.disk_identity
            );
        }
        for disk in group.disks.iter().filter(|_| group.pools.is_empty()) {
            let vols: Vec<_> = group
                .volumes
                .iter()
                .filter(|v| v.disk == disk.disk)
                .collect();
            let total: u64 = vols.iter().map(|v| v.capacity_bytes).sum();
            let _ = writeln!(
                out,
                "  {:<14} {:>10}  {} partition(s), {} volume(s) of {} = {}  [{}]",
                disk.disk.display(),
                human(disk.size_bytes),
                disk.partitions.len(),
                vols.len(),
                vols.first()
                    .map(|v| human(v.capacity_bytes))
                    .unwrap_or_else(|| "-".into()),
                human(total),
                disk.identity
            );
        }
    }
    if !plan.refused.is_empty() {
        let _ = writeln!(out, "\nRefused:");
        for r in &plan.refused {
            let group = r
                .group
                .as_deref()
                .map(|g| format!(" (group {g})"))
                .unwrap_or_default();
            let _ = writeln!(out, "  {}{group}: {}", r.disk.display(), r.reason);
        }
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "\nWarning: {w}");
    }
    if plan.steps.is_empty() {
        let _ = writeln!(out, "\n{}", nothing_to_do(plan));
    } else {
        let _ = writeln!(out, "\nSteps ({}):", plan.steps.len());
        for (i, step) in plan.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:>3}. {}  ({})",
                i + 1,
                describe(step),
                step.reason()
            );
        }
    }
    let t = &plan.totals;
    let _ = writeln!(
        out,
        "\nTotals: raw {}, published {}, reserve {}, headroom {:.2}x{}",
        human(t.raw_bytes),
        human(t.published_bytes),
        human(t.reserve_bytes),
        t.headroom_ratio,
        if t.published_bytes > 0 && t.headroom_ratio < 1.5 {
            "  (below the 1.5x production sizing)"
        } else {
            ""
        }
    );
    out
}

/// One line saying what a step does.
pub fn describe(step: &Step) -> String {
    match step {
        Step::WipeDisk {
            disk, signatures, ..
        } => {
            format!(
                "wipe {} (destroys: {})",
                disk.display(),
                signatures.join(", ")
            )
        }
        Step::WritePartitionTable { disk, layout, .. } => {
            format!(
                "write GPT on {} with {} partition(s)",
                disk.display(),
                layout.partitions.len()
            )
        }
        Step::AddPartitionNodes { disk, numbers, .. } => {
            format!("add partition nodes {numbers:?} of {}", disk.display())
        }
        Step::FormatLuks { device, luks, .. } => format!(
            "luksFormat {} (LUKS2) label {} uuid {}, unlocked by {}",
            device.display(),
            luks.label,
            luks.uuid,
            luks.unlock.describe()
        ),
        Step::OpenLuks { device, luks, .. } => format!(
            "open LUKS2 {} as {} with {}",
            device.display(),
            luks.mapping_path().display(),
            luks.unlock.describe()
        ),
        Step::CloseLuks {
            device, mapping, ..
        } => format!("close LUKS2 mapping {mapping} of {}", device.display()),
        Step::EraseLuks {
            device, luks_uuid, ..
        } => format!(
            "crypto-erase {} (destroy every key slot of LUKS2 {luks_uuid})",
            device.display()
        ),
        Step::MakeFilesystem {
            device,
            fs_type,
            label,
            uuid,
            ..
        } => {
            format!(
                "mkfs.{} {} label {label} uuid {uuid}",
                fs_type.as_str(),
                device.display()
            )
        }
        Step::Mount {
            device,
            mountpoint,
            options,
            ..
        } => {
            format!(
                "mount {} on {} ({})",
                device.display(),
                mountpoint.display(),
                options.join(",")
            )
        }
        Step::CreateDirectory { path, owner, .. } => {
            format!(
                "mkdir {} owner {}:{} mode {:04o}",
                path.display(),
                owner.uid,
                owner.gid,
                owner.mode
            )
        }
        Step::SetOwnership { path, owner, .. } => {
            format!(
                "chown {}:{} chmod {:04o} {}",
                owner.uid,
                owner.gid,
                owner.mode,
                path.display()
            )
        }
        Step::SetQuota {
            path,
            project_id,
            bytes,
            ..
        } => {
            format!(
                "quota {} project {project_id} hard limit {}",
                path.display(),
                human(*bytes)
            )
        }
        Step::LinkBlockDevice {
            link,
            target,
            crypt,
            ..
        } => match crypt {
            Some(c) => format!(
                "link {} -> {} (LUKS2 on {})",
                link.display(),
                crate::model::mapper_path(&c.name).display(),
                target.display()
            ),
            None => format!("link {} -> {}", link.display(), target.display()),
        },
        Step::Unmount { mountpoint, .. } => format!("unmount {}", mountpoint.display()),
        Step::RemoveBlockLink { link, .. } => format!("remove link {}", link.display()),
    }
}

/// The sentence for a plan without steps. It only claims the node matches the policy when
/// no disk the policy selects was refused; otherwise it names them.
pub fn nothing_to_do(plan: &Plan) -> String {
    if plan.refused.is_empty() {
        return "Nothing to do: the node matches the policy.".into();
    }
    let disks: Vec<String> = plan
        .refused
        .iter()
        .map(|r| format!("{} ({})", r.disk.display(), r.reason))
        .collect();
    format!(
        "Nothing more to do, but the node does not match the policy: {} selected disk(s) refused: {}",
        disks.len(),
        disks.join("; ")
    )
}
