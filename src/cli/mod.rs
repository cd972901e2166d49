//! The command line (arguments, output, exit status); it calls `node` or the bus, never a disk.
//!
//! The command-line interface: arguments, human and JSON output, exit status.
//! Each command is a thin wrapper: load, observe, decide (pure), print.

pub mod apply;
pub mod args;
pub mod assets;
pub mod bus_client;
mod cluster;
mod demo;
mod disks_table;
mod probe;
mod service;

use crate::node::{self, Node};
use crate::policy::{Policy, PolicyError};
use anyhow::{Context, Result};
use args::{Cli, Command, GlobalArgs, OutputFormat};
use bus_client::ClientError;
use serde_json::json;
use std::time::Duration;

/// Exit status for errors the user must fix (bad policy, refused apply, failed step).
pub const EXIT_FAILURE: i32 = 1;

/// Parse the command line and start logging; `main` then dispatches (the daemon is not
/// the CLI's to start).
pub fn parse() -> Cli {
    let cli = <Cli as clap::Parser>::parse();
    crate::logging::init_logging();
    cli
}

/// The exit status of a command, its error printed one cause per line.
pub fn exit_status(outcome: Result<i32>) -> i32 {
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kvstrap: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            EXIT_FAILURE
        }
    }
}

/// What the node pipeline needs from the command line, and nothing else.
pub fn inputs(g: &GlobalArgs) -> node::Inputs {
    node::Inputs {
        policy: g.policy.clone(),
        state_dir: g.state_dir.clone(),
        lock: crate::state::lock_path(),
    }
}

/// The node as the global flags describe it.
pub fn node(g: &GlobalArgs) -> Node {
    Node::new(inputs(g))
}

/// Run one command (every one but `daemon`, which `main` starts).
pub fn run(g: &GlobalArgs, command: &Command) -> Result<i32> {
    match command {
        Command::Validate(v) if v.cluster => cluster::validate(g),
        Command::Validate(_) => validate(g),
        Command::Disks(a) if a.probe => probe::probe(g, a),
        Command::Disks(d) => disks(g, d.health),
        Command::Plan => show_plan(g),
        Command::Apply(a) => apply::apply(g, a),
        Command::Status => apply::status(g),
        Command::Volumes => apply::volumes(g),
        Command::Demo(d) => demo::run(g, d),
        Command::Drain(d) => service::drain(g, d),
        Command::Undrain { disk, lock_timeout } => service::undrain(g, disk, *lock_timeout),
        Command::Replace {
            old,
            new,
            lock_timeout,
        } => service::replace(g, old, new, *lock_timeout),
        Command::Forget { disk, erase } => service::forget(g, disk, *erase),
        Command::GenerateAssets { out_dir } => Ok(assets::run_generate_assets(out_dir)),
        Command::Cluster(args::ClusterCommand::Status { kubeconfig }) => {
            cluster::status(g, kubeconfig.as_deref())
        }
        Command::Daemon => anyhow::bail!("`kvstrap daemon` is started by main, not by the CLI"),
    }
}

/// Load the policy named by --policy (or the system locations), printing diagnostics.
pub fn load_policy(g: &GlobalArgs) -> Result<Policy> {
    node(g)
        .load_policy()
        .map_err(|e| anyhow::anyhow!(diagnostics_text(&e)))
}

fn diagnostics_text(e: &PolicyError) -> String {
    let lines: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
    format!(
        "invalid policy ({} problem(s)):\n{}",
        lines.len(),
        lines.join("\n")
    )
}

fn validate(g: &GlobalArgs) -> Result<i32> {
    report_validation(g, node(g).load_policy())
}

/// Prints a validated policy (its sources) or every diagnostic; the exit status.
fn report_validation(g: &GlobalArgs, loaded: Result<Policy, PolicyError>) -> Result<i32> {
    match loaded {
        Ok(p) => {
            match g.output {
                OutputFormat::Json => print_json(&json!({
                    "valid": true,
                    "sources": p.sources,
                    "storage_classes": p.storage_classes.len(),
                    "disk_groups": p.disk_groups.len(),
                })),
                OutputFormat::Human => {
                    let files: Vec<String> =
                        p.sources.iter().map(|s| s.display().to_string()).collect();
                    println!(
                        "policy is valid: {} storage class(es), {} disk group(s), node {:?}",
                        p.storage_classes.len(),
                        p.disk_groups.len(),
                        p.node.name
                    );
                    if !files.is_empty() {
                        println!("read from: {}", files.join(", "));
                    }
                }
            }
            Ok(0)
        }
        Err(e) => {
            match g.output {
                OutputFormat::Json => {
                    let errors: Vec<_> = e
                        .diagnostics
                        .iter()
                        .map(|d| json!({"file": d.file, "line": d.line, "column": d.column, "message": d.message, "hint": d.hint}))
                        .collect();
                    print_json(&json!({"valid": false, "errors": errors}));
                }
                OutputFormat::Human => {
                    for d in &e.diagnostics {
                        eprintln!("{d}");
                    }
                    eprintln!("{} problem(s) found", e.diagnostics.len());
                }
            }
            Ok(EXIT_FAILURE)
        }
    }
}

/// A disk as the JSON document carries it, for rendering the daemon's answer.
#[derive(serde::Deserialize)]
struct DiskRow {
    #[serde(flatten)]
    disk: crate::model::Disk,
    group: Option<String>,
    verdict: crate::model::Verdict,
    #[serde(default)]
    health: Option<crate::health::Health>,
}

/// The reads the daemon answers; there is no way to ask for an apply through here: a
/// failed apply call is never replaced by something done locally.
#[derive(Debug, Clone, Copy)]
pub enum Read {
    Status,
    Disks,
    Volumes,
}

impl Read {
    fn ask(self) -> Result<String, ClientError> {
        match self {
            Read::Status => bus_client::client_status(),
            Read::Disks => bus_client::client_disks(),
            Read::Volumes => bus_client::client_volumes(),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Read::Status => "its status",
            Read::Disks => "the disks",
            Read::Volumes => "the volumes",
        }
    }
}

/// Where a read's answer comes from.
pub enum Source {
    /// The running daemon answered.
    Daemon(String),
    /// Read the node here: no daemon runs, or `--policy` asks for a local evaluation.
    Local,
    /// The daemon is there but failed the call: read the node here, but only with the
    /// applier lock held, so the scan never overlaps one of its runs (probing a disk while
    /// it is being formatted makes mkfs fail with EBUSY).
    LocalLocked,
}

/// Ask the running daemon, unless an explicit policy asks for a local evaluation; say on
/// stderr when the answer will come from this process instead, and why.
pub fn from_daemon(g: &GlobalArgs, read: Read) -> Source {
    if g.policy.is_some() {
        return Source::Local;
    }
    match read.ask() {
        Ok(text) => Source::Daemon(text),
        Err(e) if e.daemon_absent() => {
            tracing::debug!("cannot ask the daemon for {}: {e}", read.what());
            eprintln!("{}", bus_client::FALLBACK_NOTICE);
            Source::Local
        }
        Err(e) => {
            eprintln!(
                "kvstrap: the daemon is running but could not answer for {}: {e}; reading the node directly (read-only)",
                read.what()
            );
            Source::LocalLocked
        }
    }
}

/// How long a read that falls back waits for the daemon's run to finish.
const FALLBACK_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Hold the applier lock for a local read when the daemon is there (see [`Source`]).
pub fn read_lock(g: &GlobalArgs, source: &Source) -> Result<Option<crate::state::ApplyLock>> {
    if !matches!(source, Source::LocalLocked) {
        return Ok(None);
    }
    let never = std::sync::atomic::AtomicBool::new(false);
    node::lock::take(&inputs(g).lock, FALLBACK_LOCK_WAIT, &never)
        .map(Some)
        .map_err(|e| {
            anyhow::anyhow!("not reading the disks while the daemon may be writing them: {e}")
        })
}

/// `kvstrap disks`: the daemon's document (or one made here), with the last health reading
/// of each selected disk and its age; `read_now` reads health now instead.
fn disks(g: &GlobalArgs, read_now: bool) -> Result<i32> {
    let source = from_daemon(g, Read::Disks);
    let mut document = match &source {
        Source::Daemon(text) => {
            let mut doc: serde_json::Value =
                serde_json::from_str(text).context("the daemon sent disks kvstrap cannot read")?;
            if read_now {
                // smartctl opens disks read-only and shared: no need to hold the daemon's
                // runs off, nor to scan again.
                let health = node(g).read_health_now(&selected_in(&doc)?);
                crate::health::annotate(&mut doc, &health);
            }
            doc
        }
        Source::Local | Source::LocalLocked => local_disks(g, &source, read_now)?,
    };
    let now = crate::health::now_unix();
    with_health_age(&mut document, now);
    match g.output {
        OutputFormat::Json => print_json(&document),
        OutputFormat::Human => {
            let rows: Vec<DiskRow> = serde_json::from_value(document["disks"].clone())
                .context("cannot read the disk list")?;
            let table: Vec<_> = rows
                .iter()
                .map(|r| disks_table::Row {
                    disk: &r.disk,
                    group: r.group.clone(),
                    verdict: r.verdict.clone(),
                    health: r.health.as_ref(),
                })
                .collect();
            print!("{}", disks_table::render(&table, now));
        }
    }
    Ok(0)
}

/// The disks document made here, from a scan: with the health kept in the state
/// directory, or read now.
fn local_disks(g: &GlobalArgs, source: &Source, read_now: bool) -> Result<serde_json::Value> {
    let _lock = read_lock(g, source)?;
    let node = node(g);
    // A broken policy given explicitly is an error; no policy at all still lists disks.
    let policy = match (&g.policy, node.load_policy()) {
        (_, Ok(p)) => Some(p),
        (Some(_), Err(e)) => anyhow::bail!(diagnostics_text(&e)),
        (None, Err(_)) => None,
    };
    let inventory = node.scan(policy.as_ref())?;
    let mut doc =
        crate::node::queries::disks_document(policy.as_ref(), &inventory, &node.disk_service()?);
    if let Some(p) = &policy {
        let health = if read_now {
            node.read_health_now(&crate::health::selected_disks(
                p,
                &inventory,
                &node.disk_service().unwrap_or_default(),
            ))
        } else {
            node.kept_health(p, &inventory)
        };
        crate::health::annotate(&mut doc, &health);
    }
    Ok(doc)
}

/// The disks a group selects, from a disks document.
fn selected_in(document: &serde_json::Value) -> Result<Vec<crate::health::Selected>> {
    let rows: Vec<DiskRow> =
        serde_json::from_value(document["disks"].clone()).context("cannot read the disk list")?;
    Ok(rows
        .iter()
        .filter(|r| r.group.is_some())
        .map(|r| crate::health::Selected {
            path: r.disk.path.clone(),
            identity: crate::plan::identity::disk_identity(&r.disk),
        })
        .collect())
}

/// Add `age_seconds` beside each reading's `read_unix`: how old the reading shown is.
fn with_health_age(document: &mut serde_json::Value, now_unix: u64) {
    let disks = document.get_mut("disks").and_then(|d| d.as_array_mut());
    for health in disks
        .into_iter()
        .flatten()
        .filter_map(|d| d.get_mut("health"))
    {
        let age = health["read_unix"]
            .as_u64()
            .map(|t| now_unix.saturating_sub(t));
        if let (Some(age), Some(obj)) = (age, health.as_object_mut()) {
            obj.insert("age_seconds".into(), json!(age));
        }
    }
}

fn show_plan(g: &GlobalArgs) -> Result<i32> {
    let policy = load_policy(g)?;
    let (_, plan) = node(g).scan_and_plan(&policy)?;
    // The merged policy's sources, as `validate` shows them: with fragments from the
    // cluster, the operator sees which ones this plan follows.
    let sources: Vec<String> = policy
        .sources
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    match g.output {
        OutputFormat::Json => {
            let mut document = serde_json::to_value(&plan).context("cannot encode the plan")?;
            if let Some(fields) = document.as_object_mut() {
                fields.insert("sources".into(), json!(sources));
            }
            print_json(&document)
        }
        OutputFormat::Human => {
            print!("{}", crate::plan::render::plan_text(&plan));
            if !sources.is_empty() {
                println!("policy read from: {}", sources.join(", "));
            }
        }
    }
    Ok(0)
}

pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("kvstrap: cannot encode JSON: {e}"),
    }
}
