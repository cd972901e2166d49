//! `kvstrap apply`, `status` and `volumes`: the node pipeline's pass and queries, printed
//! for people (with progress on a terminal) or as JSON.

use super::args::{ApplyArgs, GlobalArgs, OutputFormat};
use super::{from_daemon, load_policy, node, print_json, read_lock, Read, Source};
use crate::apply::{ApplyReport, StepResult};
use crate::model::Plan;
use crate::node::{Event, Lock, PublishOnce, VolumeRow};
use crate::plan::capacity::human;
use anyhow::{Context, Result};
use serde_json::json;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// One writer per node: with the node's own policy (no `--policy`) and its daemon
/// running, the daemon applies (its run, its publisher) and this prints the outcome; the
/// CLI applies itself only when no daemon runs.
pub fn apply(g: &GlobalArgs, a: &ApplyArgs) -> Result<i32> {
    if g.policy.is_none() {
        match super::bus_client::client_apply() {
            Ok(summary) => return print_daemon_apply(g, &summary, false),
            Err(super::bus_client::ClientError::Call(crate::dbus::BusError::ApplyFailed(
                summary,
            ))) => return print_daemon_apply(g, &summary, true),
            Err(e) if e.daemon_absent() => {
                tracing::debug!("applying here: {e}");
            }
            Err(e) => anyhow::bail!(
                "the kvstrap daemon is running but did not apply: {e}; it is the node's one \
                 writer, so kvstrap apply does not write beside it (see `systemctl status kvstrap`)"
            ),
        }
    }
    apply_here(g, a)
}

/// What the daemon's run did, as it answered D-Bus `Apply`.
fn print_daemon_apply(g: &GlobalArgs, summary: &str, failed: bool) -> Result<i32> {
    match g.output {
        OutputFormat::Json => println!("{summary}"),
        OutputFormat::Human => {
            let doc: serde_json::Value = serde_json::from_str(summary).unwrap_or_default();
            println!(
                "applied by kvstrap.service: {}",
                doc.get("result")
                    .and_then(|r| r.as_str())
                    .unwrap_or(summary)
            );
            if let Some(obj) = doc.as_object() {
                for (key, value) in obj.iter().filter(|(k, _)| k.as_str() != "result") {
                    println!("  {key}: {value}");
                }
            }
        }
    }
    Ok(if failed { super::EXIT_FAILURE } else { 0 })
}

fn apply_here(g: &GlobalArgs, a: &ApplyArgs) -> Result<i32> {
    let policy = load_policy(g)?;
    let node = node(g);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The step in flight always finishes: a GPT write or mkfs is never abandoned.
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    let tty = std::io::stderr().is_terminal();
    let progress = |event: Event<'_>| {
        if let (Event::Step { n, total, report }, true) = (event, tty) {
            eprint!("\r\x1b[2K[{n}/{total}] {}", report.description);
            if n == total {
                eprintln!();
            }
        }
    };
    let publish = PublishOnce {
        state_dir: g.state_dir.clone(),
        pending: Default::default(),
        drains: Default::default(),
    };
    let report = node.converge(
        &policy,
        Lock::Wait(Duration::from_secs(a.lock_timeout)),
        &stop,
        &progress,
        &publish,
    )?;
    record_metrics(&node, &policy, &report, &publish);
    if let Some(e) = &report.render_error {
        anyhow::bail!("{e}");
    }
    print_report(g, &report.plan, &report.steps);
    Ok(if report.steps.failed() > 0 {
        super::EXIT_FAILURE
    } else {
        0
    })
}

/// The metrics after a pass of the CLI. A pass with nothing to do leaves everything as it
/// was, the metrics too (the daemon's passes keep them current). Health comes from the
/// last reading kept: a pass never runs smartctl, so it never wakes a sleeping disk.
pub(super) fn record_metrics(
    node: &crate::node::Node,
    policy: &crate::policy::Policy,
    report: &crate::node::Report,
    publish: &PublishOnce,
) {
    // A pass that changed nothing writes nothing, unless the metrics file it would
    // write is missing (the first run, or one deleted): node_exporter then has it at once.
    let textfile_missing = policy.metrics.textfile.as_ref().is_some_and(|f| {
        !f.exists() && (f.parent().is_some_and(Path::is_dir) || !policy.metrics.textfile_is_default)
    });
    if !report.did_nothing() || textfile_missing {
        let health = node.kept_health(policy, &report.after.inventory);
        node.record_metrics(policy, report, &health, publish, None);
    }
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
    // The local answer reads only the state directory: safe whether a daemon runs or not.
    if let Source::Daemon(text) = from_daemon(g, Read::Status) {
        let doc: serde_json::Value =
            serde_json::from_str(&text).context("the daemon sent a status kvstrap cannot read")?;
        let kept = node(g).kept();
        let service = node(g).disk_service()?;
        match g.output {
            OutputFormat::Json => print_json(
                &json!({ "daemon": doc, "kept_pvs": kept, "out_of_service": service.out_of_service }),
            ),
            OutputFormat::Human => {
                println!("kvstrap.service is running:");
                for (key, value) in doc.as_object().into_iter().flatten() {
                    println!("  {key}: {value}");
                }
                let locked: Vec<crate::model::LockedVolume> =
                    serde_json::from_value(doc["last_apply"]["locked"].clone())
                        .or_else(|_| serde_json::from_value(doc["locked"].clone()))
                        .unwrap_or_default();
                print_locked(&locked);
                print_kept(&kept);
                print_out_of_service(&service);
            }
        }
        return Ok(0);
    }
    let crate::node::queries::Recorded { state: st, kept } = node(g).recorded()?;
    let service = node(g).disk_service()?;
    match g.output {
        OutputFormat::Json => print_json(
            &json!({ "state": st, "kept_pvs": kept, "out_of_service": service.out_of_service }),
        ),
        OutputFormat::Human => match st {
            None => {
                println!(
                    "kvstrap has not applied a policy on this node yet ({} has no state).",
                    g.state_dir.display()
                )
            }
            Some(s) => {
                println!(
                    "last apply: {} ({}), {} disk(s), {} volume(s), {} step(s) changed, {} disk(s) left alone",
                    s.last_result.as_deref().unwrap_or("unknown"),
                    s.last_apply_unix.map(utc_timestamp).unwrap_or_default(),
                    s.disks,
                    s.volumes,
                    s.steps_changed,
                    s.refused
                );
                print_locked(&s.locked);
            }
        },
    }
    if g.output == OutputFormat::Human {
        print_kept(&kept);
        print_out_of_service(&service);
    }
    Ok(0)
}

/// LUKS2 volumes that did not open, by name: they are left as they are and not published.
fn print_locked(locked: &[crate::model::LockedVolume]) {
    for l in locked {
        println!(
            "locked: {}: {}",
            crate::node::report::describe_locked(l),
            l.error
        );
    }
}

/// Disks out of service, from the state directory's record (no scan).
fn print_out_of_service(service: &crate::model::DiskService) {
    for (identity, r) in &service.out_of_service {
        println!(
            "out of service: {} ({identity}) {} since {} ({}); `kvstrap drain --status` shows what holds it",
            r.path.display(),
            r.phase.as_str(),
            utc_timestamp(r.since_unix),
            r.why
        );
    }
}

/// PVs kept in the cluster for volumes gone from this node (from the publisher's ledger).
fn print_kept(kept: &[crate::node::queries::KeptPublication]) {
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

pub fn volumes(g: &GlobalArgs) -> Result<i32> {
    let source = from_daemon(g, Read::Volumes);
    let rows = match &source {
        Source::Daemon(text) => {
            let doc: serde_json::Value = serde_json::from_str(text)
                .context("the daemon sent volumes kvstrap cannot read")?;
            serde_json::from_value(doc["volumes"].clone()).context("cannot read the volume list")?
        }
        Source::Local | Source::LocalLocked => {
            let _lock = read_lock(g, &source)?;
            node(g).volume_rows(&load_policy(g)?)?
        }
    };
    let kept = node(g).kept();
    let pools = match &source {
        Source::Daemon(text) => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|d| serde_json::from_value(d["pools"].clone()).ok())
            .unwrap_or_default(),
        Source::Local | Source::LocalLocked => node(g).pool_rows(&load_policy(g)?)?,
    };
    print_volumes(g, &rows, &kept, &pools);
    Ok(0)
}

fn print_volumes(
    g: &GlobalArgs,
    rows: &[VolumeRow],
    kept: &[crate::node::queries::KeptPublication],
    pools: &[crate::node::queries::PoolRow],
) {
    match g.output {
        OutputFormat::Json => {
            print_json(&json!({ "volumes": rows, "kept_pvs": kept, "pools": pools }))
        }
        OutputFormat::Human => {
            println!(
                "{:<28} {:>10} {:<10} {:<24} {:<8} {:<10} {:<9} PATH",
                "NAME", "CAPACITY", "MODE", "STORAGECLASS", "STATE", "PV", "ENCRYPTED"
            );
            for r in rows {
                let pv = match (&r.phase, r.published) {
                    (Some(phase), _) => phase.clone(),
                    (None, true) => "published".into(),
                    (None, false) => "-".into(),
                };
                println!(
                    "{:<28} {:>10} {:<10} {:<24} {:<8} {:<10} {:<9} {}",
                    r.name,
                    human(r.capacity_bytes),
                    format!("{:?}", r.volume_mode),
                    r.storage_class,
                    r.state,
                    pv,
                    if r.encrypted { "luks2" } else { "-" },
                    r.path.display()
                );
                for u in &r.uses {
                    println!("  used: {u}");
                }
            }
            println!(
                "{} volume(s), {}",
                rows.len(),
                human(rows.iter().map(|r| r.capacity_bytes).sum())
            );
            for p in pools {
                println!(
                    "pool {} (group {}, class {}): {} dynamic volume(s), {} of {} free",
                    p.mountpoint.display(),
                    p.group,
                    p.storage_class,
                    p.volumes,
                    human(p.free_bytes),
                    human(p.capacity_bytes)
                );
            }
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
