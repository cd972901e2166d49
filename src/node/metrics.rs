//! After a pass: count it and write the metrics the CLI and the daemon both produce.

use super::{Node, Publications, Report};
use crate::health::HealthMap;
use crate::metrics::{self, sample::PublicationCounts, serve::Published, RunOutcome};
use crate::policy::Policy;

impl Node {
    /// Count the pass in the state directory's counters and write the metrics text to
    /// `[metrics] textfile` (and `server`, when the daemon serves it). Never fails the
    /// pass: a metrics file that cannot be written is a warning.
    pub fn record_metrics(
        &self,
        policy: &Policy,
        report: &Report,
        health: &HealthMap,
        publications: &dyn Publications,
        server: Option<&Published>,
    ) {
        metrics::after_run(
            &RunOutcome {
                policy,
                state_dir: &self.inputs.state_dir,
                inventory: &report.after.inventory,
                plan: &report.after.plan,
                report: Some(&report.steps),
                health,
                publications: PublicationCounts {
                    pending: u64::from(publications.pending()),
                    errors: publications.errors(),
                },
            },
            server,
        );
    }
}
