//! The real engine: policy from disk, inventory from the machine, the pure planner, and
//! the executor with host effects — the same functions `kvstrap apply` uses.

use super::engine::{ApplySummary, Engine, EngineError, FailedDisk, Observation};
use crate::apply::{self, host_effects::HostEffects, StepResult};
use crate::cli::args::GlobalArgs;
use crate::cli::{plan_context, scan};
use crate::model::{InUse, Inventory, Plan};
use crate::policy::{self, Policy, PolicyError};
use crate::state;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The publisher as the engine sees it: it is handed each run's plan and must return at
/// once (publishing runs in the background and never holds up local work), and it counts
/// what the API server has not accepted yet. It reports back through `daemon::Handle`
/// (`volume_published`, `volume_removed`, `publications_changed`): see
/// [`super::publications`].
pub trait Publications: Send + Sync {
    /// Render and queue the volumes that exist after a run (and the policy's classes).
    fn submit(&self, policy: &Policy, plan: &Plan);
    /// PersistentVolumes rendered but not yet accepted by the API server.
    fn pending(&self) -> u32;
}

pub struct HostEngine {
    global: GlobalArgs,
    /// The policy in force; a failed reload leaves it as it is.
    policy: Mutex<Arc<Policy>>,
    publications: Option<Arc<dyn Publications>>,
    /// What the last run saw at its end, kept for [`Engine::observe`] so the read
    /// documents cost no second scan.
    last_look: Mutex<Option<Look>>,
}

/// One scan of the node and the plan made from it.
struct Look {
    time: SystemTime,
    policy: Arc<Policy>,
    inventory: Inventory,
    plan: Plan,
}

impl HostEngine {
    /// Load the policy once; the daemon refuses to start on a broken one.
    pub fn new(
        global: &GlobalArgs,
        publications: Option<Arc<dyn Publications>>,
    ) -> Result<HostEngine, EngineError> {
        let policy = policy::load(global.policy.as_deref())
            .map_err(|e| EngineError::Policy(diagnostics(&e)))?;
        Ok(HostEngine {
            global: global.clone(),
            policy: Mutex::new(Arc::new(policy)),
            publications,
            last_look: Mutex::new(None),
        })
    }

    fn policy(&self) -> Arc<Policy> {
        match self.policy.lock() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn current_plan(&self, policy: &Policy) -> Result<Plan, EngineError> {
        Ok(self.scan_and_plan(policy)?.1)
    }

    fn scan_and_plan(&self, policy: &Policy) -> Result<(Inventory, Plan), EngineError> {
        let inventory =
            scan(&self.global, Some(policy)).map_err(|e| EngineError::Observe(format!("{e:#}")))?;
        let plan = crate::plan::plan(policy, &inventory, &plan_context(&self.global));
        Ok((inventory, plan))
    }
}

/// Every diagnostic on its own line, `FILE:LINE:COL: error: ...`.
pub fn diagnostics(e: &PolicyError) -> String {
    e.diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Disks of the plan with no step left for them.
fn ready_disks(plan: &Plan) -> usize {
    plan.groups
        .iter()
        .flat_map(|g| g.disks.iter())
        .filter(|d| !plan.steps.iter().any(|s| *s.disk() == d.disk))
        .count()
}

/// Disks a group selects that were left alone only because something held them open
/// exclusively at that moment (a prober, a settling device): worth another look.
fn busy_disks(inventory: &Inventory, plan: &Plan) -> Vec<FailedDisk> {
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
fn failed_disks(report: &apply::ApplyReport) -> Vec<FailedDisk> {
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

fn disks_document(policy: &Policy, inventory: &Inventory) -> Result<String, EngineError> {
    Ok(serde_json::to_string(&crate::cli::disks_document(
        Some(policy),
        inventory,
    ))?)
}

fn volumes_document(plan: &Plan) -> Result<String, EngineError> {
    Ok(serde_json::to_string(
        &json!({ "volumes": apply::cli::volume_rows(plan) }),
    )?)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Engine for HostEngine {
    fn apply(&self, stop: &AtomicBool) -> Result<ApplySummary, EngineError> {
        let policy = self.policy();
        let effects = HostEffects::new(&self.global.state_dir)
            .map_err(|e| EngineError::Execute(e.to_string()))?;
        let (inventory, plan) = self.scan_and_plan(&policy)?;
        let busy = busy_disks(&inventory, &plan);
        for r in &plan.refused {
            tracing::warn!(disk = %r.disk.display(), "left alone: {}", r.reason);
        }
        let report = apply::execute(&plan, &effects, stop, &|_, _, _| {});
        // Publish what exists now: look again after any change.
        let (after_inventory, after) = if report.steps.is_empty() {
            (inventory, plan.clone())
        } else {
            self.scan_and_plan(&policy)?
        };
        let scanned = SystemTime::now();
        if let Some(p) = &self.publications {
            p.submit(&policy, &after);
        }
        let failed = count(report.failed());
        let interrupted = stop.load(Ordering::SeqCst)
            && report.steps.iter().any(|s| s.result == StepResult::Skipped);
        let summary = ApplySummary {
            disks: count(plan.groups.iter().map(|g| g.disks.len()).sum()),
            volumes: count(plan.volumes().count()),
            steps_run: count(
                report
                    .steps
                    .iter()
                    .filter(|s| s.result != StepResult::Skipped)
                    .count(),
            ),
            changed: count(report.changed()),
            failed,
            refused: count(plan.refused.len()),
            interrupted,
            result: ApplySummary::result_text(failed, interrupted),
            transient: count(report.steps.iter().filter(|s| s.transient).count() + busy.len()),
            disks_ready: count(ready_disks(&after)),
            volumes_ready: count(crate::kube::node::provisioned(&after).len()),
            failed_disks: failed_disks(&report).into_iter().chain(busy).collect(),
        };
        self.keep_look(Look {
            time: scanned,
            policy: Arc::clone(&policy),
            inventory: after_inventory,
            plan: after,
        });
        state::save(
            &self.global.state_dir,
            &apply::run_record(&plan, &report, &summary.result),
        )
        .map_err(|e| EngineError::Execute(format!("cannot record the apply: {e}")))?;
        Ok(summary)
    }

    fn observe(&self) -> Observation {
        let look = match self.take_look() {
            Some(look) => Ok(look),
            None => {
                let policy = self.policy();
                let time = SystemTime::now();
                self.scan_and_plan(&policy).map(|(inventory, plan)| Look {
                    time,
                    policy,
                    inventory,
                    plan,
                })
            }
        };
        match look {
            Ok(look) => Observation {
                time: look.time,
                disks: disks_document(&look.policy, &look.inventory),
                volumes: volumes_document(&look.plan),
                plan: serde_json::to_string(&look.plan).map_err(EngineError::from),
            },
            Err(e) => {
                // One failure, said the same way by every document.
                let text = match e {
                    EngineError::Observe(text) => text,
                    other => other.to_string(),
                };
                Observation {
                    time: SystemTime::now(),
                    disks: Err(EngineError::Observe(text.clone())),
                    volumes: Err(EngineError::Observe(text.clone())),
                    plan: Err(EngineError::Observe(text)),
                }
            }
        }
    }

    fn disks_json(&self) -> Result<String, EngineError> {
        let policy = self.policy();
        let inventory = scan(&self.global, Some(&policy))
            .map_err(|e| EngineError::Observe(format!("{e:#}")))?;
        disks_document(&policy, &inventory)
    }

    fn volumes_json(&self) -> Result<String, EngineError> {
        volumes_document(&self.current_plan(&self.policy())?)
    }

    fn plan_json(&self) -> Result<String, EngineError> {
        Ok(serde_json::to_string(&self.current_plan(&self.policy())?)?)
    }

    fn reload_policy(&self) -> Result<(), String> {
        let fresh = policy::load(self.global.policy.as_deref()).map_err(|e| diagnostics(&e))?;
        if let Ok(mut p) = self.policy.lock() {
            *p = Arc::new(fresh);
        }
        Ok(())
    }

    fn pending_publications(&self) -> u32 {
        self.publications.as_ref().map_or(0, |p| p.pending())
    }
}

impl HostEngine {
    fn keep_look(&self, look: Look) {
        match self.last_look.lock() {
            Ok(mut l) => *l = Some(look),
            Err(poisoned) => *poisoned.into_inner() = Some(look),
        }
    }

    fn take_look(&self) -> Option<Look> {
        match self.last_look.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}
