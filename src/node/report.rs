//! The one report of a converge pass, as every caller counts it: the summary the daemon
//! sends (STATUS=, D-Bus, journal) and the per-disk failures, made from the plan, the
//! executor's report and the look after the run. Pure.

use super::converge::Report;
use crate::apply::{ApplyReport, StepResult};
use crate::kube::node_state::{DiskHealth, NodeReport};
use crate::model::{InUse, Inventory, Plan};
use crate::policy::Policy;
use serde::Serialize;

/// `/dev/vdb1 (kvs-0123abcd; volumes a, b)`: a locked volume as messages name it.
pub fn describe_locked(l: &crate::model::LockedVolume) -> String {
    let volumes = if l.volumes.is_empty() {
        String::new()
    } else {
        format!("; volume(s) {}", l.volumes.join(", "))
    };
    format!("{} ({}{volumes})", l.device.display(), l.mapping)
}

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
    /// LUKS2 volumes of kvstrap's that nothing opened: left as they are, their volumes
    /// unpublished (their disks are among `failed_disks` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locked: Vec<crate::model::LockedVolume>,
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

impl Report {
    /// The pass found nothing to do and did nothing: no step ran, no disk entered or left
    /// service. (Such a pass writes nothing to the state directory either.)
    pub fn did_nothing(&self) -> bool {
        self.steps.steps.is_empty() && self.service_changes.is_empty()
    }

    /// What the pass left, for the Node's condition, label and Events.
    pub fn node_report(&self, policy: &Policy) -> NodeReport {
        let summary = self.summary();
        NodeReport {
            disks_ready: summary.disks_ready,
            volumes_ready: summary.volumes_ready,
            ready_disks: ready_disk_list(&self.after.plan),
            // Disks no group selects (the system disk, ...) are no news.
            refused: self
                .after
                .plan
                .refused
                .iter()
                .filter(|r| r.group.is_some())
                .map(|r| (r.disk.display().to_string(), r.reason.clone()))
                .collect(),
            // A locked volume is named as such, not once more as a failed step.
            failed: summary
                .failed_disks
                .iter()
                .filter(|f| !crate::apply::is_locked_error(&f.error))
                .map(|f| (f.disk.clone(), f.error.clone()))
                .collect(),
            locked: summary
                .locked
                .iter()
                .map(|l| (describe_locked(l), locked_why(l)))
                .collect(),
            error: None,
            // Set by the Node state publisher from the fleet watcher; a cached layer that
            // was left out says so here until then.
            policy_error: policy.cluster_layer_dropped.as_ref().map(|why| {
                format!("the cached fragments no longer validate and were left out ({why})")
            }),
            // Set by the Node state publisher from the daemon's health reader.
            health: Vec::new(),
            io_class: served_io_class(&self.after.plan),
            sources: policy
                .sources
                .iter()
                .map(|s| s.display().to_string())
                .collect(),
        }
    }

    /// The counters of this pass.
    pub fn summary(&self) -> ApplySummary {
        let failed = count(self.steps.failed());
        let interrupted = self.interrupted;
        ApplySummary {
            disks: count(self.plan.groups.iter().map(|g| g.disks.len()).sum()),
            volumes: count(self.plan.volumes().count()),
            steps_run: count(
                self.steps
                    .steps
                    .iter()
                    .filter(|s| s.result != StepResult::Skipped)
                    .count(),
            ),
            changed: count(self.steps.changed()),
            failed,
            refused: count(self.plan.refused.len()),
            interrupted,
            result: ApplySummary::result_text(failed, interrupted),
            transient: count(
                self.steps.steps.iter().filter(|s| s.transient).count() + self.busy.len(),
            ),
            disks_ready: count(ready_disks(&self.after.plan)),
            volumes_ready: count(crate::plan::ready::provisioned(&self.after.plan).len()),
            failed_disks: failed_disks(&self.steps)
                .into_iter()
                .chain(self.busy.iter().cloned())
                .collect(),
            locked: crate::apply::locked_volumes(&self.plan, &self.steps),
        }
    }
}

/// Why a volume is locked, short: what each unlock said, without the advice.
fn locked_why(l: &crate::model::LockedVolume) -> String {
    match l.error.split_once("opens it (") {
        Some((_, rest)) => rest
            .split_once("); it is left")
            .map_or(rest, |(t, _)| t)
            .to_string(),
        None => l.error.clone(),
    }
}

pub(super) fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Each disk's health as the Node shows it.
pub fn node_health(health: &crate::health::HealthMap) -> Vec<DiskHealth> {
    health
        .iter()
        .map(|(disk, h)| DiskHealth {
            disk: disk.display().to_string(),
            assessment: h.assessment,
            detail: h.detail.clone().unwrap_or_default(),
        })
        .collect()
}

/// Disks of the plan with no step left for them.
fn ready_disks(plan: &Plan) -> usize {
    ready_disk_list(plan).len()
}

/// The fastest measured class among the disks the plan serves volumes or pools from.
fn served_io_class(plan: &Plan) -> Option<crate::model::IoClass> {
    plan.groups
        .iter()
        .flat_map(|g| {
            let volumes = g.volumes.iter().map(|v| v.io_class);
            volumes.chain(g.pools.iter().map(|p| p.io_class))
        })
        .flatten()
        .max()
}

fn ready_disk_list(plan: &Plan) -> Vec<String> {
    plan.groups
        .iter()
        .flat_map(|g| g.disks.iter())
        .filter(|d| !plan.steps.iter().any(|s| *s.disk() == d.disk))
        .map(|d| d.disk.display().to_string())
        .collect()
}

/// Disks a group selects that were left alone only because something held them open
/// exclusively at that moment (a prober, a settling device): worth another look.
pub fn busy_disks(inventory: &Inventory, plan: &Plan) -> Vec<FailedDisk> {
    plan.refused
        .iter()
        .filter(|r| r.group.is_some())
        .filter(|r| {
            inventory.disks.iter().any(|d| {
                d.path == r.disk
                    && !d.in_use.is_empty()
                    && d.in_use.iter().all(|u| matches!(u, InUse::Busy { .. }))
            })
        })
        .map(|r| FailedDisk {
            disk: r.disk.display().to_string(),
            error: format!("left alone: {}", r.reason),
        })
        .collect()
}

/// Each disk with a failed step, with the first error it met.
fn failed_disks(report: &ApplyReport) -> Vec<FailedDisk> {
    let mut out: Vec<FailedDisk> = Vec::new();
    for s in &report.steps {
        if let StepResult::Failed { error } = &s.result {
            let disk = s.disk.display().to_string();
            if !out.iter().any(|f| f.disk == disk) {
                out.push(FailedDisk {
                    disk,
                    error: error.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::StepReport;
    use crate::node::Look;
    use std::time::SystemTime;

    fn step(disk: &str, result: StepResult, transient: bool) -> StepReport {
        StepReport {
            action: "write_partition_table",
            disk: disk.into(),
            description: format!("write GPT on {disk}"),
            result,
            transient,
            millis: 1,
        }
    }

    fn failed(error: &str) -> StepResult {
        StepResult::Failed {
            error: error.into(),
        }
    }

    fn report(steps: Vec<StepReport>, busy: Vec<FailedDisk>, interrupted: bool) -> Report {
        let plan = Plan {
            node: "n".into(),
            storage_root: "/s".into(),
            groups: Vec::new(),
            refused: Vec::new(),
            warnings: Vec::new(),
            steps: Vec::new(),
            totals: Default::default(),
            out_of_service: Vec::new(),
        };
        Report {
            plan: plan.clone(),
            steps: ApplyReport { steps },
            after: Look {
                time: SystemTime::now(),
                inventory: Inventory::default(),
                plan,
            },
            busy,
            interrupted,
            render_error: None,
            service_changes: Vec::new(),
        }
    }

    #[test]
    fn the_summary_names_each_failed_disk_once_and_counts_busy_disks_as_transient() {
        let busy = FailedDisk {
            disk: "/dev/c".into(),
            error: "left alone: held open".into(),
        };
        let s = report(
            vec![
                step("/dev/a", failed("EBUSY"), true),
                step("/dev/a", StepResult::Skipped, false),
                step("/dev/b", StepResult::Changed { what: "x".into() }, false),
                step("/dev/b", failed("mkfs failed"), false),
            ],
            vec![busy.clone()],
            false,
        )
        .summary();
        assert_eq!((s.steps_run, s.changed, s.failed), (3, 1, 2));
        assert_eq!(s.result, "failed: 2 step(s)");
        assert_eq!(s.transient, 2, "one transient step and one busy disk");
        let disks: Vec<&str> = s.failed_disks.iter().map(|f| f.disk.as_str()).collect();
        assert_eq!(disks, ["/dev/a", "/dev/b", "/dev/c"]);
        assert_eq!(s.failed_disks[0].error, "EBUSY");
        assert_eq!(s.failed_disks[2], busy);
    }

    #[test]
    fn an_interrupted_pass_says_so_and_is_not_worth_an_immediate_retry() {
        let s = report(
            vec![step("/dev/a", StepResult::Skipped, false)],
            Vec::new(),
            true,
        )
        .summary();
        assert_eq!(s.result, "interrupted");
        assert!(!s.succeeded() && !s.transient_failure());
    }
}
