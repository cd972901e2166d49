//! The converge pass, the one run both `kvstrap apply` and the daemon make: lock, scan,
//! plan, execute, record, scan again, render and publish, and one [`Report`] of it all.
//! Signals, retries and READY stay with the callers; what a pass does is decided here.

use super::report::busy_disks;
use super::{lock, FailedDisk, Node, NodeError, Publications};
use crate::apply::{self, host_effects::HostEffects, ApplyReport, StepReport, StepResult};
use crate::model::{Inventory, Plan};
use crate::policy::Policy;
use crate::state::{self, ApplyLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// How the pass gets the applier lock.
pub enum Lock<'a> {
    /// Take it, waiting this long for another applier (`kvstrap apply --lock-timeout`).
    Wait(Duration),
    /// The caller holds it already (the daemon: its reads share the lock with the run).
    Held(&'a ApplyLock),
}

/// Something moved forward: the daemon feeds the systemd watchdog on these, so a pass
/// that stops moving (a hung probe or step) lets the watchdog fire.
#[derive(Debug)]
pub enum Event<'a> {
    /// The applier lock is held.
    Locked,
    /// The node was read: every disk probed.
    Scanned { disks: usize },
    /// The plan is made.
    Planned { steps: usize },
    /// Step `n` of `total` finished (in any order across disks).
    Step {
        n: usize,
        total: usize,
        report: &'a StepReport,
    },
    /// The manifests are rendered and handed to the publisher.
    Published,
}

/// The callback a pass reports its [`Event`]s to; called from the executor's threads.
pub type Progress<'a> = &'a (dyn Fn(Event<'_>) + Sync);

/// One look at the node and the plan made from it.
#[derive(Debug, Clone)]
pub struct Look {
    pub time: SystemTime,
    pub inventory: Inventory,
    pub plan: Plan,
}

/// What a pass did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan the pass executed.
    pub plan: Plan,
    /// The executor's outcome of every step.
    pub steps: ApplyReport,
    /// The node after the pass: what was rendered and published.
    pub after: Look,
    /// Selected disks left alone only because something held them open at that moment.
    pub busy: Vec<FailedDisk>,
    /// A stop request cut the pass short after the step in flight.
    pub interrupted: bool,
    /// The manifests could not be rendered (local provisioning is done regardless).
    pub render_error: Option<String>,
    /// Disks that entered or left service in this pass (drained, replaced), in words.
    pub service_changes: Vec<String>,
}

impl Node {
    /// One converge pass under `policy`. Steps that fail are in the report; an error means
    /// the pass could not run (lock, inventory) or could not be recorded.
    pub fn converge(
        &self,
        policy: &Policy,
        lock: Lock<'_>,
        stop: &AtomicBool,
        progress: Progress<'_>,
        publications: &dyn Publications,
    ) -> Result<Report, NodeError> {
        let state_dir = &self.inputs.state_dir;
        let effects = HostEffects::new(state_dir)
            .map_err(|e| NodeError::Execute(format!("cannot start the executor: {e}")))?;
        let _taken = match lock {
            Lock::Wait(timeout) => {
                Some(lock::take(&self.inputs.lock, timeout, stop).map_err(NodeError::Lock)?)
            }
            Lock::Held(_) => None,
        };
        progress(Event::Locked);
        let (inventory, plan) = self.look_measuring(policy, progress)?;
        // Draining disks nothing holds any more become drained before the plan runs, so
        // this very pass releases them.
        let mut service_changes = self.settle_drains(
            policy,
            &inventory,
            &plan,
            publications.drain_check().as_ref(),
        )?;
        let plan = if service_changes.is_empty() {
            plan
        } else {
            self.plan(policy, &inventory)?
        };
        for r in &plan.refused {
            tracing::warn!(disk = %r.disk.display(), "left alone: {}", r.reason);
        }
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let busy = busy_disks(&inventory, &plan);
        let mut steps = if plan.steps.is_empty() {
            ApplyReport::default()
        } else {
            apply::execute(&plan, &effects, stop, &|n, total, report| {
                progress(Event::Step { n, total, report })
            })
        };
        let interrupted = stop.load(Ordering::SeqCst)
            && steps.steps.iter().any(|s| s.result == StepResult::Skipped);
        let result =
            super::ApplySummary::result_text(super::report::count(steps.failed()), interrupted);
        // Recorded before the second look, so a run that changed disks is on record even
        // if that look fails; a failure to record is reported once publishing is done. A
        // pass with nothing to do that ends as the last one did writes nothing.
        let mut recorded = state::record_run(state_dir, &apply::run_record(&plan, &steps, &result));
        // Publish what exists now, no more and no less: look again after any change.
        let mut after = if steps.steps.is_empty() {
            Look {
                time: SystemTime::now(),
                inventory,
                plan: plan.clone(),
            }
        } else {
            let (inventory, plan) = self.look(policy, progress)?;
            Look {
                time: SystemTime::now(),
                inventory,
                plan,
            }
        };
        let mut render_error = publications.submit(policy, &after.plan).err();
        // That publication may have deleted the last PV holding a draining disk (the
        // CLI's publisher answers within the pass): drain it now, in this pass, rather
        // than leave it to a next run that may never come.
        let late = if interrupted {
            Vec::new()
        } else {
            self.settle_drains(
                policy,
                &after.inventory,
                &after.plan,
                publications.drain_check().as_ref(),
            )?
        };
        if !late.is_empty() {
            let release = self.plan(policy, &after.inventory)?;
            let more = apply::execute(&release, &effects, stop, &|n, total, report| {
                progress(Event::Step { n, total, report })
            });
            steps.steps.extend(more.steps);
            let result =
                super::ApplySummary::result_text(super::report::count(steps.failed()), interrupted);
            recorded = state::save(state_dir, &apply::run_record(&plan, &steps, &result));
            let (inventory, plan) = self.look(policy, progress)?;
            after = Look {
                time: SystemTime::now(),
                inventory,
                plan,
            };
            render_error = publications.submit(policy, &after.plan).err();
            service_changes.extend(late);
        }
        if let Some(e) = &render_error {
            tracing::error!("{e}");
        }
        progress(Event::Published);
        recorded.map_err(NodeError::Record)?;
        let report = Report {
            plan,
            steps,
            after,
            busy,
            interrupted,
            render_error,
            service_changes,
        };
        publications.run_finished(report.node_report(policy));
        Ok(report)
    }

    /// The first look of a pass: blank disks never measured are measured (at most
    /// `io::BUDGET`, all at once) before the plan, so measured-IO selectors can take them.
    /// A node whose disks are all kvstrap's or measured goes straight on.
    fn look_measuring(
        &self,
        policy: &Policy,
        progress: Progress<'_>,
    ) -> Result<(Inventory, Plan), NodeError> {
        let mut inventory = self.scan(Some(policy))?;
        super::io::measure_new(
            &mut inventory,
            &self.inputs.state_dir,
            &super::io_thresholds(Some(policy)),
        );
        progress(Event::Scanned {
            disks: inventory.disks.len(),
        });
        let plan = self.plan(policy, &inventory)?;
        progress(Event::Planned {
            steps: plan.steps.len(),
        });
        Ok((inventory, plan))
    }

    fn look(
        &self,
        policy: &Policy,
        progress: Progress<'_>,
    ) -> Result<(Inventory, Plan), NodeError> {
        let inventory = self.scan(Some(policy))?;
        progress(Event::Scanned {
            disks: inventory.disks.len(),
        });
        let plan = self.plan(policy, &inventory)?;
        progress(Event::Planned {
            steps: plan.steps.len(),
        });
        Ok((inventory, plan))
    }
}
