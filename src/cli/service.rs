//! `kvstrap drain`, `undrain`, `replace` and `forget`: the disk record changed through
//! `node::service`, then converge passes that carry it out, and what still holds a disk.

use super::args::{DrainArgs, GlobalArgs, OutputFormat};
use super::{load_policy, node, print_json};
use crate::model::ServicePhase;
use crate::node::service::{DrainStatus, ServiceError};
use crate::node::{Lock, Node, PublishOnce, Report};
use crate::policy::Policy;
use anyhow::Result;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn refused(e: ServiceError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Converge passes that carry out a change of the record: a second pass when the first
/// published (its view lets a draining disk become drained, and releases it at once).
fn carry_out(node: &Node, policy: &Policy, lock_timeout: u64) -> Result<Vec<Report>> {
    let stop = AtomicBool::new(false);
    let publish = PublishOnce {
        state_dir: node.inputs.state_dir.clone(),
        pending: Default::default(),
        drains: Default::default(),
    };
    let mut reports = Vec::new();
    for _ in 0..2 {
        let report = node.converge(
            policy,
            Lock::Wait(Duration::from_secs(lock_timeout)),
            &stop,
            &|_| {},
            &publish,
        )?;
        super::apply::record_metrics(node, policy, &report, &publish);
        let draining = report
            .after
            .plan
            .out_of_service
            .iter()
            .any(|d| d.phase == ServicePhase::Draining);
        reports.push(report);
        if !draining || !policy.kubernetes.publish {
            break;
        }
    }
    Ok(reports)
}

/// Failed steps of the passes, printed; the exit status they give.
fn report_passes(reports: &[Report]) -> i32 {
    let mut failed = 0;
    for r in reports {
        for c in &r.service_changes {
            eprintln!("{c}");
        }
        for s in &r.steps.steps {
            if let crate::apply::StepResult::Failed { error } = &s.result {
                eprintln!("FAILED {}: {error}", s.description);
                failed += 1;
            }
        }
    }
    if failed > 0 {
        super::EXIT_FAILURE
    } else {
        0
    }
}

/// Who carries out a change of the disk record: the running daemon (the node's one
/// writer), or this process under the applier lock when no daemon runs.
enum Writer {
    Daemon,
    Here,
}

/// The daemon, when the node's own policy is in use and it answers on the bus.
fn writer(g: &GlobalArgs) -> Writer {
    if g.policy.is_some() {
        return Writer::Here;
    }
    match super::bus_client::Client::daemon_running() {
        true => Writer::Daemon,
        false => Writer::Here,
    }
}

/// The applier lock, held while the record changes: never beside a run's mkfs, and never
/// two writers of `disks.json` at once.
fn locked(g: &GlobalArgs, timeout: u64) -> Result<crate::state::ApplyLock> {
    let never = AtomicBool::new(false);
    crate::node::lock::take(&super::inputs(g).lock, Duration::from_secs(timeout), &never)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The daemon's answer to a D-Bus call, or why it gave none.
fn by_daemon(answer: Result<String, super::bus_client::ClientError>) -> Result<i32> {
    let said = answer.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{said}");
    Ok(0)
}

/// After the record changed under the lock with a daemon running: the daemon's run carries
/// it out (its publisher is the only one).
fn daemon_applies() -> Result<i32> {
    match super::bus_client::client_apply() {
        Ok(_) => Ok(0),
        Err(e) => {
            eprintln!("the record changed; the daemon's run did not finish: {e}");
            Ok(super::EXIT_FAILURE)
        }
    }
}

pub fn drain(g: &GlobalArgs, a: &DrainArgs) -> Result<i32> {
    if let (Some(disk), Writer::Daemon) = (&a.disk, writer(g)) {
        // The daemon drains and runs; `kvstrap drain --status` shows where it stands.
        return by_daemon(super::bus_client::client_drain(disk));
    }
    let policy = load_policy(g)?;
    let node = node(g);
    let mut code = 0;
    if let Some(disk) = &a.disk {
        let lock = locked(g, a.lock_timeout)?;
        let said = node
            .drain(&policy, disk, "kvstrap drain")
            .map_err(refused)?;
        drop(lock);
        eprintln!("{said}");
        code = report_passes(&carry_out(&node, &policy, a.lock_timeout)?);
    }
    print_status(g, &node.drain_status(&policy)?);
    Ok(code)
}

pub fn undrain(g: &GlobalArgs, disk: &str, lock_timeout: u64) -> Result<i32> {
    if matches!(writer(g), Writer::Daemon) {
        return by_daemon(super::bus_client::client_undrain(disk));
    }
    let policy = load_policy(g)?;
    let node = node(g);
    let lock = locked(g, lock_timeout)?;
    println!("{}", node.undrain(&policy, disk).map_err(refused)?);
    drop(lock);
    Ok(report_passes(&carry_out(&node, &policy, lock_timeout)?))
}

pub fn replace(g: &GlobalArgs, old: &str, new: &str, lock_timeout: u64) -> Result<i32> {
    let policy = load_policy(g)?;
    let node = node(g);
    let by = writer(g);
    let lock = locked(g, lock_timeout)?;
    println!("{}", node.replace(&policy, old, new).map_err(refused)?);
    drop(lock);
    match by {
        Writer::Daemon => daemon_applies(),
        Writer::Here => Ok(report_passes(&carry_out(&node, &policy, lock_timeout)?)),
    }
}

pub fn forget(g: &GlobalArgs, disk: &str, erase: bool) -> Result<i32> {
    let policy = load_policy(g)?;
    let lock = locked(g, 60)?;
    // The erase writes to the disk: under the applier lock, like any run's steps.
    let erased = match erase {
        true => Some(node(g).erase(&policy, disk).map_err(refused)?),
        false => None,
    };
    let forgotten = node(g)
        .forget_everywhere(&policy, disk, erase)
        .map_err(refused);
    drop(lock);
    if let Some(said) = &erased {
        eprintln!("{said}");
    }
    let (said, cluster) = forgotten?;
    match g.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "forgotten": said,
            "erased": erased,
            "cluster": cluster.as_ref().map(|c| match c {
                Ok(f) => serde_json::to_value(f).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e }),
            }),
        })),
        OutputFormat::Human => {
            println!("{said}");
            match &cluster {
                None => println!("publishing is off: no PersistentVolume was looked at"),
                Some(Err(e)) => println!("its PersistentVolumes were not cleaned up: {e}"),
                Some(Ok(f)) => {
                    for pv in &f.deleted {
                        println!("deleted PersistentVolume {pv}");
                    }
                    for h in &f.bound {
                        println!(
                            "kept PersistentVolume {} (Bound to {}): delete the claim first",
                            h.pv,
                            h.claim.as_deref().unwrap_or("?")
                        );
                    }
                    for e in &f.errors {
                        println!("FAILED {e}");
                    }
                }
            }
        }
    }
    Ok(match cluster {
        Some(Err(_)) => super::EXIT_FAILURE,
        Some(Ok(f)) if !f.errors.is_empty() => super::EXIT_FAILURE,
        _ => 0,
    })
}

fn print_status(g: &GlobalArgs, status: &DrainStatus) {
    if let OutputFormat::Json = g.output {
        print_json(&serde_json::to_value(status).unwrap_or_default());
        return;
    }
    if status.disks.is_empty() {
        println!("No disk is out of service.");
        return;
    }
    for d in &status.disks {
        println!(
            "{} ({}) {}{}, group {}: {}",
            d.path.display(),
            d.identity,
            d.phase.as_str(),
            if d.present { "" } else { " (not attached)" },
            d.group.as_deref().unwrap_or("none"),
            d.why
        );
        for u in &d.local_users {
            println!("  in use here: {u}");
        }
        match &status.cluster {
            None => {}
            Some(Err(e)) => println!("  PersistentVolumes: unknown ({e})"),
            Some(Ok(map)) => {
                for h in map.get(&d.identity).into_iter().flatten() {
                    let pods = if h.pods.is_empty() {
                        String::new()
                    } else {
                        format!(", used by {}", h.pods.join(", "))
                    };
                    println!(
                        "  PersistentVolume {} {}{}{}",
                        h.pv,
                        h.phase.as_deref().unwrap_or("?"),
                        h.claim
                            .as_deref()
                            .map(|c| format!(", claim {c}"))
                            .unwrap_or_default(),
                        pods
                    );
                }
            }
        }
        if d.phase == ServicePhase::Draining && d.local_users.is_empty() {
            let waiting = match &status.cluster {
                Some(Ok(map)) if map.get(&d.identity).is_some_and(|v| !v.is_empty()) => {
                    "  drained once these PersistentVolumes are released"
                }
                _ => "  drained at the next apply",
            };
            println!("{waiting}");
        }
    }
}
