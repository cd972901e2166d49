//! `kvstrap apply`, `status` and `volumes`: lock, observe, plan, execute, record.

use super::{execute, ApplyReport, StepResult};
use crate::cli::args::{ApplyArgs, GlobalArgs, OutputFormat};
use crate::cli::{load_policy, plan_context, print_json, scan};
use crate::model::{Plan, VolumeMode};
use crate::plan::capacity::human;
use crate::state;
use anyhow::{Context, Result};
use serde_json::json;
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub fn apply(g: &GlobalArgs, a: &ApplyArgs) -> Result<i32> {
    let policy = load_policy(g)?;
    let effects =
        super::host_effects::HostEffects::new(&g.state_dir).context("cannot start the executor")?;
    let _lock = state::lock(&state::lock_path(), Duration::from_secs(a.lock_timeout))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The step in flight always finishes: a GPT write or mkfs is never abandoned.
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    let inventory = scan(g, Some(&policy))?;
    let plan = crate::plan::plan(&policy, &inventory, &plan_context(g));
    for r in &plan.refused {
        tracing::warn!(disk = %r.disk.display(), "left alone: {}", r.reason);
    }
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let report = if plan.steps.is_empty() {
        ApplyReport::default()
    } else {
        let tty = std::io::stderr().is_terminal();
        execute(&plan, &effects, &stop, &|n, total, step| {
            if tty {
                eprint!("\r\x1b[2K[{n}/{total}] {}", step.description);
                if n == total {
                    eprintln!();
                }
            }
        })
    };
    let result = if report.failed() > 0 {
        format!("failed: {} step(s)", report.failed())
    } else {
        "success".into()
    };
    state::save(&g.state_dir, &super::run_record(&plan, &report, &result))
        .context("cannot record the apply in the state directory")?;
    // Publish what exists now, no more and no less: look again after any change.
    let after = if report.steps.is_empty() {
        plan.clone()
    } else {
        crate::plan::plan(&policy, &scan(g, Some(&policy))?, &plan_context(g))
    };
    let desired = crate::kube::node::render(&policy, &after, &g.state_dir)
        .context("cannot render the manifests")?;
    if policy.kubernetes.publish {
        let outcome = crate::kube::node::publish_now(&policy, &desired, &g.state_dir);
        tracing::info!("{outcome}");
    }
    print_report(g, &plan, &report);
    Ok(if report.failed() > 0 {
        crate::cli::EXIT_FAILURE
    } else {
        0
    })
}

fn print_report(g: &GlobalArgs, plan: &Plan, report: &ApplyReport) {
    match g.output {
        OutputFormat::Json => print_json(&json!({
            "steps": report.steps,
            "changed": report.changed(),
            "failed": report.failed(),
            "refused": plan.refused,
        })),
        OutputFormat::Human => {
            if report.steps.is_empty() {
                println!("{}", crate::plan::render::nothing_to_do(plan));
            }
            for s in &report.steps {
                if let StepResult::Failed { error } = &s.result {
                    println!("FAILED {}: {error}", s.description);
                }
            }
            println!(
                "{} step(s): {} changed, {} failed; {} disk(s), {} volume(s) ({}); {} disk(s) left alone",
                report.steps.len(),
                report.changed(),
                report.failed(),
                plan.groups.iter().map(|g| g.disks.len()).sum::<usize>(),
                plan.volumes().count(),
                human(plan.totals.published_bytes),
                plan.refused.len()
            );
        }
    }
}

pub fn status(g: &GlobalArgs) -> Result<i32> {
    if let Some(text) = crate::cli::from_daemon(g, crate::dbus::client::client_status) {
        let doc: serde_json::Value =
            serde_json::from_str(&text).context("the daemon sent a status kvstrap cannot read")?;
        let kept = crate::kube::publisher::kept_publications(&g.state_dir);
        match g.output {
            OutputFormat::Json => print_json(&json!({ "daemon": doc, "kept_pvs": kept })),
            OutputFormat::Human => {
                println!("kvstrap.service is running:");
                for (key, value) in doc.as_object().into_iter().flatten() {
                    println!("  {key}: {value}");
                }
                print_kept(&kept);
            }
        }
        return Ok(0);
    }
    let st = state::load(&g.state_dir)?;
    let kept = crate::kube::publisher::kept_publications(&g.state_dir);
    match g.output {
        OutputFormat::Json => print_json(&json!({ "state": st, "kept_pvs": kept })),
        OutputFormat::Human => match st {
            None => {
                println!("kvstrap has not applied a policy on this node yet ({} has no state).", g.state_dir.display())
            }
            Some(s) => println!(
                "last apply: {} ({}), {} disk(s), {} volume(s), {} step(s) changed, {} disk(s) left alone",
                s.last_result.as_deref().unwrap_or("unknown"),
                s.last_apply_unix.map(utc_timestamp).unwrap_or_default(),
                s.disks,
                s.volumes,
                s.steps_changed,
                s.refused
            ),
        },
    }
    if g.output == OutputFormat::Human {
        print_kept(&kept);
    }
    Ok(0)
}

/// PVs kept in the cluster for volumes gone from this node (from the publisher's ledger).
fn print_kept(kept: &[crate::kube::publisher::KeptPublication]) {
    for k in kept {
        println!(
            "kept PersistentVolume {} ({}): volume {} is gone from this node; delete the claim \
             and the PV when its data is not needed",
            k.pv_name,
            k.phase.as_deref().unwrap_or("phase unknown"),
            k.volume
        );
    }
}

/// One provided volume, as `kvstrap volumes` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumeRow {
    pub name: String,
    pub path: std::path::PathBuf,
    pub capacity_bytes: u64,
    pub volume_mode: VolumeMode,
    pub storage_class: String,
    pub group: String,
    pub disk: std::path::PathBuf,
    pub device: std::path::PathBuf,
    /// `ready` when provisioned, `pending` while apply still has steps for it.
    pub state: String,
    /// The PersistentVolume that publishes it, once one was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
    /// Whether the PV was in the cluster at the last publish pass.
    pub published: bool,
    /// Its phase there: Available, Bound, Released, Failed.
    pub phase: Option<String>,
}

/// Volumes of the plan with their state; a volume is ready when no step touches it.
pub fn volume_rows(plan: &Plan) -> Vec<VolumeRow> {
    plan.volumes()
        .map(|v| {
            let pending = plan.steps.iter().any(|s| match s {
                crate::model::Step::CreateDirectory { path, .. }
                | crate::model::Step::SetOwnership { path, .. }
                | crate::model::Step::SetQuota { path, .. } => *path == v.path,
                crate::model::Step::LinkBlockDevice { link, .. } => *link == v.path,
                crate::model::Step::MakeFilesystem { device, .. }
                | crate::model::Step::Mount { device, .. } => *device == v.device,
                crate::model::Step::WritePartitionTable { disk, .. }
                | crate::model::Step::WipeDisk { disk, .. } => *disk == v.disk,
                crate::model::Step::AddPartitionNodes { disk, .. } => *disk == v.disk,
            });
            VolumeRow {
                name: v.name.clone(),
                path: v.path.clone(),
                capacity_bytes: v.capacity_bytes,
                volume_mode: v.volume_mode,
                storage_class: v.storage_class.clone(),
                group: v.group.clone(),
                disk: v.disk.clone(),
                device: v.device.clone(),
                state: if pending { "pending" } else { "ready" }.into(),
                pv_name: None,
                published: false,
                phase: None,
            }
        })
        .collect()
}

pub fn volumes(g: &GlobalArgs) -> Result<i32> {
    let rows = match crate::cli::from_daemon(g, crate::dbus::client::client_volumes) {
        Some(text) => {
            let doc: serde_json::Value = serde_json::from_str(&text)
                .context("the daemon sent volumes kvstrap cannot read")?;
            serde_json::from_value(doc["volumes"].clone()).context("cannot read the volume list")?
        }
        None => local_volume_rows(g)?,
    };
    let kept = crate::kube::publisher::kept_publications(&g.state_dir);
    print_volumes(g, &rows, &kept);
    Ok(0)
}

/// Volumes of the node under the policy, with their last recorded publication.
fn local_volume_rows(g: &GlobalArgs) -> Result<Vec<VolumeRow>> {
    let policy = load_policy(g)?;
    let inventory = scan(g, Some(&policy))?;
    let plan = crate::plan::plan(&policy, &inventory, &plan_context(g));
    let mut rows = volume_rows(&plan);
    let volumes: Vec<_> = plan.volumes().cloned().collect();
    let recorded =
        crate::kube::publisher::recorded_publication(&g.state_dir, &policy.node.name, &volumes);
    for r in &mut rows {
        if let Some(p) = recorded.get(&r.name) {
            r.pv_name = Some(p.pv_name.clone());
            r.published = p.published;
            r.phase = p.phase.clone();
        }
    }
    Ok(rows)
}

fn print_volumes(
    g: &GlobalArgs,
    rows: &[VolumeRow],
    kept: &[crate::kube::publisher::KeptPublication],
) {
    match g.output {
        OutputFormat::Json => print_json(&json!({ "volumes": rows, "kept_pvs": kept })),
        OutputFormat::Human => {
            println!(
                "{:<28} {:>10} {:<10} {:<24} {:<8} {:<10} PATH",
                "NAME", "CAPACITY", "MODE", "STORAGECLASS", "STATE", "PV"
            );
            for r in rows {
                let pv = match (&r.phase, r.published) {
                    (Some(phase), _) => phase.clone(),
                    (None, true) => "published".into(),
                    (None, false) => "-".into(),
                };
                println!(
                    "{:<28} {:>10} {:<10} {:<24} {:<8} {:<10} {}",
                    r.name,
                    human(r.capacity_bytes),
                    format!("{:?}", r.volume_mode),
                    r.storage_class,
                    r.state,
                    pv,
                    r.path.display()
                );
            }
            println!(
                "{} volume(s), {}",
                rows.len(),
                human(rows.iter().map(|r| r.capacity_bytes).sum())
            );
            print_kept(kept);
        }
    }
}

/// `2026-11-26T10:58:03Z` from seconds since the epoch (civil-from-days, no time zone).
pub fn utc_timestamp(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(super::utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_timestamp(1_795_690_745), "2026-11-26T10:59:05Z");
        assert_eq!(super::utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }
}
