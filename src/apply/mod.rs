//! The executor: runs a plan's steps, re-checked; it changes the machine only through `host`.
//!
//! The executor: runs a plan step by step, disks in parallel, each step re-checked against
//! the machine right before it acts, and reports what every step changed. It never
//! chooses what to do: that was the planner's job.

pub mod effects;
pub mod host_effects;

use crate::host::Outcome;
use crate::logging::message_id;
use crate::model::{Plan, Step};
use crate::plan::render::describe;
use effects::Effects;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many disks are worked on at once: enough to keep every disk busy on a
/// 60-disk node without starving the machine of memory and file descriptors.
pub const MAX_PARALLEL_DISKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    // Boxed: host errors carry paths and stderr, and every step returns this type.
    #[error(transparent)]
    Host(Box<crate::host::Error>),
    #[error("refusing {step}: {why}")]
    Refused { step: String, why: String },
}

impl<E: Into<crate::host::Error>> From<E> for ApplyError {
    fn from(e: E) -> Self {
        ApplyError::Host(Box::new(e.into()))
    }
}

/// What happened to one step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StepResult {
    Unchanged,
    Changed {
        what: String,
    },
    Failed {
        error: String,
    },
    /// Not run because an earlier step of the same disk failed or a stop was requested.
    Skipped,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub action: &'static str,
    pub disk: PathBuf,
    pub description: String,
    #[serde(flatten)]
    pub result: StepResult,
    /// The step failed with an error that may pass on a retry (EBUSY, EAGAIN, a partition
    /// node not there yet): the daemon retries its first run on these before READY.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
    pub millis: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyReport {
    pub steps: Vec<StepReport>,
}

impl ApplyReport {
    pub fn failed(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.result, StepResult::Failed { .. }))
            .count()
    }
    pub fn changed(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.result, StepResult::Changed { .. }))
            .count()
    }
}

/// The state record of a finished run, written by `kvstrap apply` and the daemon alike so
/// `kvstrap status` tells the same story whoever applied.
pub fn run_record(plan: &Plan, report: &ApplyReport, result: &str) -> crate::state::State {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    crate::state::State {
        version: crate::state::STATE_VERSION,
        last_apply_unix: Some(now),
        last_result: Some(result.to_string()),
        steps_run: report
            .steps
            .iter()
            .filter(|s| s.result != StepResult::Skipped)
            .count(),
        steps_changed: report.changed(),
        disks: plan.groups.iter().map(|g| g.disks.len()).sum(),
        volumes: plan.volumes().count(),
        refused: plan.refused.len(),
        locked: locked_volumes(plan, report),
    }
}

/// The LUKS2 volumes nothing opened in this run: the failed open steps that say so, with
/// the volumes on each. `report` has one entry per step of `plan`, in plan order.
pub fn locked_volumes(plan: &Plan, report: &ApplyReport) -> Vec<crate::model::LockedVolume> {
    plan.steps
        .iter()
        .zip(&report.steps)
        .filter_map(|(step, r)| {
            let (
                Step::OpenLuks {
                    disk, device, luks, ..
                },
                StepResult::Failed { error },
            ) = (step, &r.result)
            else {
                return None;
            };
            is_locked_error(error).then(|| crate::model::LockedVolume {
                disk: disk.clone(),
                device: device.clone(),
                mapping: luks.label.clone(),
                volumes: plan
                    .volumes()
                    .filter(|v| v.device == *device)
                    .map(|v| v.name.clone())
                    .collect(),
                error: error.clone(),
            })
        })
        .collect()
}

/// Called after every step, for progress displays.
pub type Progress<'a> = &'a (dyn Fn(usize, usize, &StepReport) + Sync);

/// Run the plan's steps. Steps of one disk run in order; disks run in parallel.
/// When `stop` becomes true, the step in flight finishes and nothing new starts.
pub fn execute(
    plan: &Plan,
    effects: &dyn Effects,
    stop: &AtomicBool,
    progress: Progress,
) -> ApplyReport {
    if let Err(e) = effects.preflight(plan) {
        return not_started(plan, &e);
    }
    let queues = per_disk(&plan.steps);
    let total = plan.steps.len();
    let done = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, StepReport)>> = Mutex::new(Vec::with_capacity(total));
    let workers = queues.len().clamp(1, MAX_PARALLEL_DISKS);
    crate::host::threads::run_workers(workers, "apply", || loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some(queue) = queues.get(i) else { break };
        run_queue(queue, effects, stop, &|index, report| {
            let n = done.fetch_add(1, Ordering::SeqCst) + 1;
            progress(n, total, &report);
            if let Ok(mut r) = results.lock() {
                r.push((index, report));
            }
        });
    });
    let mut steps = results.into_inner().unwrap_or_default();
    steps.sort_by_key(|(i, _)| *i);
    ApplyReport {
        steps: steps.into_iter().map(|(_, r)| r).collect(),
    }
}

/// The report of a run that could not start: every step failed with the reason.
fn not_started(plan: &Plan, e: &ApplyError) -> ApplyReport {
    let error = format!("not started: {}", error_chain(e));
    tracing::error!("nothing was changed: {error}");
    ApplyReport {
        steps: plan
            .steps
            .iter()
            .map(|step| StepReport {
                action: step.action(),
                disk: step.disk().clone(),
                description: describe(step),
                result: StepResult::Failed {
                    error: error.clone(),
                },
                // A missing program does not come by waiting.
                transient: false,
                millis: 0,
            })
            .collect(),
    }
}

/// Steps grouped by disk, keeping plan order, each with its index in the plan.
fn per_disk(steps: &[Step]) -> Vec<Vec<(usize, &Step)>> {
    let mut queues: Vec<Vec<(usize, &Step)>> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match queues
            .iter_mut()
            .find(|q| q.first().is_some_and(|(_, s)| s.disk() == step.disk()))
        {
            Some(q) => q.push((i, step)),
            None => queues.push(vec![(i, step)]),
        }
    }
    queues
}

fn run_queue(
    queue: &[(usize, &Step)],
    effects: &dyn Effects,
    stop: &AtomicBool,
    record: &dyn Fn(usize, StepReport),
) {
    let Some(&(_, first)) = queue.first() else {
        return;
    };
    let ids = JournalIds::of(first.disk());
    // The disk stays locked from its first write to its last (wipe, GPT, partitions,
    // mkfs), so udev cannot re-read the partition table in between.
    let last_write = queue.iter().rposition(|(_, s)| writes_disk(s));
    let mut guard = None;
    let mut blocked = false;
    for (position, &(index, step)) in queue.iter().enumerate() {
        let started = Instant::now();
        let mut transient = false;
        let result = if blocked || stop.load(Ordering::SeqCst) {
            StepResult::Skipped
        } else {
            let locked = match (&guard, last_write) {
                (None, Some(last)) if position <= last => {
                    effects.lock_disk(step.disk()).map(|g| guard = Some(g))
                }
                _ => Ok(()),
            };
            match locked.and_then(|()| run_step(step, effects)) {
                Ok(Outcome::Unchanged) => StepResult::Unchanged,
                Ok(Outcome::Changed(what)) => StepResult::Changed { what },
                Err(e) => {
                    blocked = true;
                    transient = is_transient(&e);
                    StepResult::Failed {
                        error: error_chain(&e),
                    }
                }
            }
        };
        if last_write == Some(position) {
            guard = None;
        }
        let report = StepReport {
            action: step.action(),
            disk: step.disk().clone(),
            description: describe(step),
            result,
            transient,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        log_step(&report, step, &ids, started.elapsed());
        record(index, report);
    }
    drop(guard);
}

/// Steps that write the disk's blocks (as opposed to mounting or working in a filesystem).
fn writes_disk(step: &Step) -> bool {
    matches!(
        step,
        Step::WipeDisk { .. }
            | Step::WritePartitionTable { .. }
            | Step::AddPartitionNodes { .. }
            | Step::FormatLuks { .. }
            | Step::EraseLuks { .. }
            | Step::MakeFilesystem { .. }
    )
}

/// The disk's identity as journal fields (`DISK_WWN`, `DISK_SERIAL`), read from sysfs once
/// per disk, so `journalctl DISK_SERIAL=...` finds a disk whatever its kernel name was.
struct JournalIds {
    wwn: Option<String>,
    serial: Option<String>,
}

impl JournalIds {
    fn of(disk: &std::path::Path) -> JournalIds {
        let name = disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sys = crate::inventory::sysfs::read_disk(std::path::Path::new("/sys"), &name);
        JournalIds {
            wwn: sys.wwn,
            serial: sys.serial,
        }
    }
}

/// The stable journal id of a step that changed something, where one is documented.
fn step_message_id(step: &Step) -> Option<&'static str> {
    match step {
        Step::WipeDisk { .. } => Some(message_id::DISK_WIPED),
        Step::WritePartitionTable { .. } => Some(message_id::PARTITION_TABLE_WRITTEN),
        Step::MakeFilesystem { .. } => Some(message_id::FILESYSTEM_CREATED),
        Step::FormatLuks { .. } => Some(message_id::LUKS_FORMATTED),
        Step::EraseLuks { .. } => Some(message_id::LUKS_ERASED),
        _ => None,
    }
}

/// A failed open of a LUKS2 volume of kvstrap's that nothing opened is "volume locked":
/// `journalctl MESSAGE_ID=...` lists them, with the device in the message.
fn locked_message_id(step: &Step, error: &str) -> Option<&'static str> {
    (matches!(step, Step::OpenLuks { .. }) && is_locked_error(error))
        .then_some(message_id::VOLUME_LOCKED)
}

/// The words [`crate::host::luks::LuksError::Locked`] says, as the step report keeps them.
pub fn is_locked_error(error: &str) -> bool {
    error.contains(" is locked: nothing kvstrap may use opens it")
}

/// The volume a step works on, for the `VOLUME` journal field.
fn step_volume(step: &Step) -> Option<String> {
    let path = match step {
        Step::CreateDirectory { path, .. }
        | Step::SetOwnership { path, .. }
        | Step::SetQuota { path, .. } => path,
        Step::LinkBlockDevice { link, .. } | Step::RemoveBlockLink { link, .. } => link,
        _ => return None,
    };
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Errors that a device still settling produces (udev re-reading a partition table, a
/// partition node not created yet): EBUSY, EAGAIN, ENOENT on a /dev node, in the chain or
/// in the stderr of a program (run with LC_ALL=C), a device held open exclusively, or a
/// partition node that never appeared.
pub fn is_transient(e: &ApplyError) -> bool {
    use nix::errno::Errno;
    // ENOENT only counts for a device node: a missing directory does not come by waiting.
    let on_dev = || e.to_string().contains("/dev/");
    let settling = |errno: Errno| match errno {
        Errno::EBUSY | Errno::EAGAIN => true,
        Errno::ENOENT => on_dev(),
        _ => false,
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(errno) = err.downcast_ref::<Errno>() {
            return settling(*errno);
        }
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
        {
            return settling(Errno::from_raw(code));
        }
        cur = err.source();
    }
    let ApplyError::Host(host) = e else {
        return false;
    };
    use crate::host::probe::ProbeError;
    let stderr = match host.as_ref() {
        // A TPM2 whose driver is still coming up at boot: worth the first run's retries.
        crate::host::Error::Luks(crate::host::luks::LuksError::Locked { no_tpm, .. }) => {
            return *no_tpm
        }
        crate::host::Error::Blkpg(crate::host::blkpg::BlkpgError::NodeMissing { .. })
        | crate::host::Error::Kpartx(crate::host::kpartx::KpartxError::NodeMissing { .. })
        | crate::host::Error::Probe(ProbeError::Busy { .. })
        | crate::host::Error::Lock(crate::host::disklock::LockError::Held { .. })
        | crate::host::Error::Mkfs(crate::host::mkfs::MkfsError::Probe(ProbeError::Busy {
            ..
        })) => return true,
        crate::host::Error::Cmd(crate::host::cmd::CmdError::Failed { stderr, .. })
        | crate::host::Error::Mkfs(crate::host::mkfs::MkfsError::Cmd(
            crate::host::cmd::CmdError::Failed { stderr, .. },
        )) => stderr,
        _ => return false,
    };
    stderr.contains("Device or resource busy")
        || (stderr.contains("No such file or directory") && on_dev())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn log_step(r: &StepReport, step: &Step, ids: &JournalIds, took: Duration) {
    let disk = r.disk.display().to_string();
    let (wwn, serial) = (ids.wwn.as_deref(), ids.serial.as_deref());
    let volume = step_volume(step);
    let volume = volume.as_deref();
    match &r.result {
        StepResult::Failed { error } => tracing::error!(
            message_id = locked_message_id(step, error),
            step = r.action,
            disk,
            disk_wwn = wwn,
            disk_serial = serial,
            volume,
            took_ms = r.millis,
            "{} failed after {took:.2?}: {error}",
            r.description
        ),
        StepResult::Skipped => tracing::warn!(
            step = r.action,
            disk,
            disk_wwn = wwn,
            disk_serial = serial,
            volume,
            "{} skipped",
            r.description
        ),
        StepResult::Changed { .. } => tracing::info!(
            message_id = step_message_id(step),
            step = r.action,
            disk,
            disk_wwn = wwn,
            disk_serial = serial,
            volume,
            took_ms = r.millis,
            "{} done in {took:.2?}",
            r.description
        ),
        StepResult::Unchanged => tracing::info!(
            step = r.action,
            disk,
            disk_wwn = wwn,
            disk_serial = serial,
            volume,
            took_ms = r.millis,
            "{} already done ({took:.2?})",
            r.description
        ),
    }
}

fn run_step(step: &Step, fx: &dyn Effects) -> Result<Outcome, ApplyError> {
    match step {
        Step::WipeDisk { disk, identity, .. } => fx.wipe_disk(disk, identity),
        Step::WritePartitionTable { layout, .. } => fx.write_partition_table(layout),
        Step::AddPartitionNodes { layout, .. } => fx.sync_partitions(layout),
        Step::FormatLuks { device, luks, .. } => fx.format_luks(device, luks),
        Step::OpenLuks { device, luks, .. } => fx.open_luks(device, luks),
        Step::CloseLuks {
            device, mapping, ..
        } => fx.close_luks(device, mapping),
        Step::EraseLuks {
            device, luks_uuid, ..
        } => fx.erase_luks(device, luks_uuid),
        Step::MakeFilesystem {
            device,
            fs_type,
            uuid,
            label,
            project_quota,
            ..
        } => fx.make_filesystem(device, *fs_type, uuid, label, *project_quota),
        Step::Mount {
            device,
            fs_uuid,
            fs_type,
            mountpoint,
            options,
            ..
        } => fx.mount(device, fs_uuid, *fs_type, mountpoint, options),
        Step::CreateDirectory { path, owner, .. } | Step::SetOwnership { path, owner, .. } => {
            fx.directory(path, owner)
        }
        Step::SetQuota {
            path,
            mountpoint,
            project_id,
            bytes,
            ..
        } => fx.quota(path, mountpoint, *project_id, *bytes),
        Step::LinkBlockDevice {
            disk,
            link,
            target,
            part_uuid,
            crypt,
            ..
        } => fx.link_block_device(disk, link, target, part_uuid, crypt.as_ref()),
        Step::Unmount { mountpoint, .. } => fx.unmount(mountpoint),
        Step::RemoveBlockLink { link, .. } => fx.remove_block_link(link),
    }
}

#[cfg(test)]
mod tests;
