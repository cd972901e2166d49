//! Prometheus metrics of the node's disks, volumes and runs; reads, never changes a disk.
//!
//! The text exposition format, written atomically after each run for node_exporter's
//! textfile collector and optionally served over HTTP. [`render`] is pure (a [`Snapshot`]
//! in, text out); [`sample`] gathers a snapshot from a run's results; [`stats`] keeps the
//! counters across runs and restarts in the state directory; [`textfile`] and [`serve`]
//! deliver the text.

pub mod render;
pub mod sample;
pub mod serve;
pub mod stats;
pub mod textfile;

pub use render::render;

use crate::health::Health;
use std::path::PathBuf;

/// Everything one metrics text says, gathered after a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub disks: Vec<DiskSample>,
    pub volumes: Vec<VolumeSample>,
    pub stats: stats::RunStats,
    /// PersistentVolumes rendered but not yet accepted by the API server.
    pub publications_pending: u64,
    /// Failed publication attempts since the daemon started.
    pub publication_errors: u64,
    /// The pools of dynamic groups.
    pub pools: Vec<PoolSample>,
    /// LUKS2 volumes of kvstrap's that nothing opened in the last run.
    pub luks_locked: u64,
}

/// One pool of a dynamic group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSample {
    pub group: String,
    pub storage_class: String,
    pub disk: PathBuf,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub volumes: u64,
}

/// One disk of the inventory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskSample {
    pub path: PathBuf,
    /// The verdict's name: `ours`, `free`, `foreign`, `in_use`, `excluded`.
    pub state: &'static str,
    /// The group that selects it.
    pub group: Option<String>,
    /// Read for the disks a group selects; `None` for the others.
    pub health: Option<Health>,
    /// Its measured reads; `None` when never measured.
    pub io: Option<crate::model::IoFigures>,
    /// A selected dm-multipath map's paths and their state.
    pub multipath: Option<crate::model::Multipath>,
}

/// One volume of the plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeSample {
    pub name: String,
    pub storage_class: String,
    pub group: String,
    pub disk: PathBuf,
    /// `ready` or `pending`.
    pub state: String,
    pub capacity_bytes: u64,
    /// From the volume's project quota, or its own filesystem; `None` where neither tells
    /// (block volumes, directory volumes without quotas, volumes not there yet).
    pub used_bytes: Option<u64>,
    /// On a LUKS2 volume (an encrypted group).
    pub encrypted: bool,
}

/// The verdict names, in the order the metrics list them (all of them, zeros included,
/// so an alert on one never sees it vanish).
pub const DISK_STATES: [&str; 7] = [
    "ours", "free", "foreign", "in_use", "excluded", "draining", "drained",
];

/// After each run: count it in the state directory's counters and return them. A counter
/// file that cannot be written is logged, never fatal: metrics must not fail a run.
pub fn count_run(
    state_dir: &std::path::Path,
    report: Option<&crate::apply::ApplyReport>,
) -> stats::RunStats {
    let mut st = stats::load(state_dir);
    match report {
        Some(r) => st.record(r, now_unix()),
        None => st.record_error(),
    }
    if let Err(e) = stats::save(state_dir, &st) {
        tracing::warn!("cannot keep the metrics counters: {e}");
    }
    st
}

/// Write the text to `[metrics] textfile` (if set) and hand it to the HTTP server (if
/// any). Failures are logged: a missing node_exporter directory must not fail a run.
pub fn publish(
    settings: &crate::policy::MetricsSettings,
    text: &str,
    server: Option<&serve::Published>,
) {
    let dir_missing = |p: &std::path::Path| p.parent().is_some_and(|d| !d.is_dir());
    if let Some(path) = &settings.textfile {
        if settings.textfile_is_default && dir_missing(path) {
            tracing::debug!(
                "no node_exporter textfile directory; not writing {}",
                path.display()
            );
        } else if let Err(e) = textfile::write(path, text) {
            tracing::warn!("cannot write the metrics file: {e}");
        }
    }
    if let Some(s) = server {
        s.set(text.to_string());
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Everything a finished run hands to the metrics.
pub struct RunOutcome<'a> {
    pub policy: &'a crate::policy::Policy,
    pub state_dir: &'a std::path::Path,
    /// The inventory and plan after the run (what exists now).
    pub inventory: &'a crate::model::Inventory,
    pub plan: &'a crate::model::Plan,
    /// None: the run could not start.
    pub report: Option<&'a crate::apply::ApplyReport>,
    pub health: &'a crate::health::HealthMap,
    pub publications: sample::PublicationCounts,
}

/// Count the run, gather the snapshot, write and serve the text; returns the text.
pub fn after_run(run: &RunOutcome, server: Option<&serve::Published>) -> String {
    let stats = count_run(run.state_dir, run.report);
    let snap = sample::snapshot(
        run.policy,
        run.inventory,
        run.plan,
        run.health,
        stats,
        run.publications,
    );
    let mut snap = snap;
    snap.luks_locked = run.report.map_or(0, |r| {
        r.steps
            .iter()
            .filter(|s| {
                s.action == "open_luks"
                    && matches!(&s.result, crate::apply::StepResult::Failed { error }
                        if crate::apply::is_locked_error(error))
            })
            .count() as u64
    });
    let text = render(&snap);
    publish(&run.policy.metrics, &text, server);
    text
}

#[cfg(test)]
mod tests {
    use crate::policy::MetricsSettings;

    #[test]
    fn the_default_file_needs_node_exporters_directory_an_explicit_one_does_not() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("node-exporter/kvstrap.prom");
        let default = MetricsSettings {
            textfile: Some(path.clone()),
            listen: None,
            textfile_is_default: true,
        };
        super::publish(&default, "a 1\n", None);
        assert!(
            !path.parent().is_some_and(|d| d.exists()),
            "no stray directory"
        );
        let explicit = MetricsSettings {
            textfile_is_default: false,
            ..default
        };
        super::publish(&explicit, "a 1\n", None);
        assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), "a 1\n");
    }
}
