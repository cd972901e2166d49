//! The node's side of publication: which volumes exist after an apply, their manifests
//! (always), and a bounded publish attempt for the CLI. The daemon keeps a `Publisher`
//! running instead and only submits.

use super::{publish_once, Desired, DirectoryAndBlockScrubber};
use crate::model::{Plan, VolumeSpec};
use crate::policy::Policy;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long `kvstrap apply` tries to reach the API server before leaving it to the daemon.
pub const CLI_PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// Volumes that exist now: those of the plan with no step left for them.
pub fn provisioned(plan: &Plan) -> Vec<VolumeSpec> {
    crate::plan::ready::provisioned(plan)
}

/// Build the objects for what exists and write them to `<state-dir>/manifests/`.
pub fn render(policy: &Policy, plan: &Plan, state_dir: &Path) -> anyhow::Result<Desired> {
    let mut desired = Desired::build(
        &policy.node.name,
        &provisioned(plan),
        &policy.storage_classes,
    )?
    .with_dynamic_classes(&policy.dynamic_classes(), &policy.storage_classes);
    desired.draining = plan
        .out_of_service
        .iter()
        .filter(|d| d.phase == crate::model::ServicePhase::Draining)
        .map(|d| d.identity.clone())
        .collect();
    let report = super::write_manifests(state_dir, &desired)?;
    tracing::info!(
        manifests = %report.dir.display(),
        "manifests: {} written, {} unchanged, {} removed",
        report.written.len(),
        report.unchanged,
        report.removed.len()
    );
    Ok(desired)
}

/// What one publication attempt of the CLI did: the line to log, and how many objects
/// the API server has not accepted (for the metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliPublish {
    pub message: String,
    pub pending: u64,
    /// The pass's view of the draining disks, when it reached the API server.
    pub draining: Option<std::collections::BTreeMap<String, Vec<super::reconcile::DrainBlocker>>>,
}

/// One publish pass for `kvstrap apply`, bounded in time. Failure is reported, never fatal:
/// local provisioning is done, the manifests are on disk, and the daemon keeps retrying.
pub fn publish_now(policy: &Policy, desired: &Desired, state_dir: &Path) -> CliPublish {
    let objects = desired.volumes.len() + desired.storage_classes.len();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return CliPublish {
                message: format!("not published: cannot start the publisher: {e}"),
                pending: objects as u64,
                draining: None,
            }
        }
    };
    let source = super::ClientSource::from_policy(&policy.kubernetes);
    let scrubber = Arc::new(DirectoryAndBlockScrubber);
    let attempt = publish_once(&source, desired, state_dir, scrubber, 16);
    let message = match runtime.block_on(async { tokio::time::timeout(CLI_PUBLISH_TIMEOUT, attempt).await }) {
        Ok(Ok(report)) if report.errors.is_empty() => {
            return CliPublish {
                message: format!("published {objects} object(s) to the API server"),
                pending: 0,
                draining: Some(report.draining),
            }
        }
        Ok(Ok(report)) => {
            return CliPublish {
                message: format!(
                    "published to the API server, {} object(s) pending: {}",
                    report.pending,
                    report.errors.join("; ")
                ),
                pending: report.pending as u64,
                draining: Some(report.draining),
            }
        }
        Ok(Err(e)) => format!("{objects} object(s) pending: {e}; kvstrap.service keeps retrying"),
        Err(_) => format!(
            "{objects} object(s) pending: the API server did not answer within {}s; kvstrap.service keeps retrying",
            CLI_PUBLISH_TIMEOUT.as_secs()
        ),
    };
    CliPublish {
        message,
        pending: objects as u64,
        draining: None,
    }
}
