//! The command-line interface: arguments, human and JSON output, exit status.
//! Each command is a thin wrapper: load, observe, decide (pure), print.

pub mod args;
pub mod assets;
mod demo;
mod disks_table;

use crate::inventory::{self, ScanOptions};
use crate::model::Inventory;
use crate::plan::{self, PlanContext};
use crate::policy::{self, Policy, PolicyError};
use anyhow::{Context, Result};
use args::{Cli, Command, GlobalArgs, OutputFormat};
use serde_json::json;
use std::path::PathBuf;

/// Exit status for errors the user must fix (bad policy, refused apply, failed step).
pub const EXIT_FAILURE: i32 = 1;

pub fn main() -> i32 {
    let cli = <Cli as clap::Parser>::parse();
    init_logging();
    match run(&cli) {
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

fn init_logging() {
    crate::logging::init_logging();
}

fn run(cli: &Cli) -> Result<i32> {
    let g = &cli.global;
    match &cli.command {
        Command::Validate => validate(g),
        Command::Disks => disks(g),
        Command::Plan => show_plan(g),
        Command::Apply(a) => crate::apply::cli::apply(g, a),
        Command::Status => crate::apply::cli::status(g),
        Command::Volumes => crate::apply::cli::volumes(g),
        Command::Daemon => crate::daemon::main(g),
        Command::Demo(d) => demo::run(g, d),
        Command::GenerateAssets { out_dir } => Ok(assets::run_generate_assets(out_dir)),
    }
}

/// Load the policy named by --policy (or the system locations), printing diagnostics.
pub fn load_policy(g: &GlobalArgs) -> Result<Policy> {
    policy::load(g.policy.as_deref()).map_err(|e| anyhow::anyhow!(diagnostics_text(&e)))
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
    match policy::load(g.policy.as_deref()) {
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

/// Observe the machine, including the paths kvstrap manages under this policy.
pub fn scan(g: &GlobalArgs, policy: Option<&Policy>) -> Result<Inventory> {
    let mut opts = ScanOptions::default();
    if let Some(p) = policy {
        opts.managed_roots = vec![p.node.storage_root.clone(), g.state_dir.join("block")];
        opts.quota_filesystems = p
            .disk_groups
            .iter()
            .filter(|group| group.layout == crate::model::Layout::Shared)
            .filter_map(|group| p.storage_class(&group.storage_class).map(|c| c.fs_type))
            .collect();
        opts.quota_filesystems.sort();
        opts.quota_filesystems.dedup();
    }
    inventory::scan(&opts).context("cannot read the disk inventory")
}

pub fn plan_context(g: &GlobalArgs) -> PlanContext {
    PlanContext {
        state_dir: g.state_dir.clone(),
    }
}

/// `{"disks": [...]}`: every disk with its verdict, as `disks -o json` and D-Bus print it.
pub fn disks_document(policy: Option<&Policy>, inventory: &Inventory) -> serde_json::Value {
    let disks: Vec<_> = plan::verdicts(policy, inventory)
        .iter()
        .map(|(disk, group, verdict)| {
            let mut v = serde_json::to_value(disk).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("group".into(), json!(group));
                obj.insert("eligible".into(), json!(verdict.is_writable()));
                obj.insert(
                    "verdict".into(),
                    serde_json::to_value(verdict).unwrap_or_default(),
                );
                obj.insert("reason".into(), json!(verdict.reason()));
            }
            v
        })
        .collect();
    json!({ "disks": disks })
}

/// A disk as the JSON document carries it, for rendering the daemon's answer.
#[derive(serde::Deserialize)]
struct DiskRow {
    #[serde(flatten)]
    disk: crate::model::Disk,
    group: Option<String>,
    verdict: crate::model::Verdict,
}

/// The running daemon's answer, when no explicit policy asks for a local evaluation.
pub fn from_daemon(g: &GlobalArgs, ask: fn() -> Option<String>) -> Option<String> {
    if g.policy.is_some() {
        return None;
    }
    let answer = ask();
    if answer.is_none() {
        eprintln!("{}", crate::dbus::client::FALLBACK_NOTICE);
    }
    answer
}

fn disks(g: &GlobalArgs) -> Result<i32> {
    let document = match from_daemon(g, crate::dbus::client::client_disks) {
        Some(text) => {
            serde_json::from_str(&text).context("the daemon sent disks kvstrap cannot read")?
        }
        None => {
            // A broken policy given explicitly is an error; no policy at all still lists disks.
            let policy = match (&g.policy, policy::load(g.policy.as_deref())) {
                (_, Ok(p)) => Some(p),
                (Some(_), Err(e)) => anyhow::bail!(diagnostics_text(&e)),
                (None, Err(_)) => None,
            };
            let inv = scan(g, policy.as_ref())?;
            disks_document(policy.as_ref(), &inv)
        }
    };
    match g.output {
        OutputFormat::Json => print_json(&document),
        OutputFormat::Human => {
            let rows: Vec<DiskRow> = serde_json::from_value(document["disks"].clone())
                .context("cannot read the disk list")?;
            let table: Vec<_> = rows
                .iter()
                .map(|r| (&r.disk, r.group.clone(), r.verdict.clone()))
                .collect();
            print!("{}", disks_table::render(&table));
        }
    }
    Ok(0)
}

fn show_plan(g: &GlobalArgs) -> Result<i32> {
    let policy = load_policy(g)?;
    let inv = scan(g, Some(&policy))?;
    let plan = plan::plan(&policy, &inv, &plan_context(g));
    match g.output {
        OutputFormat::Json => print_json(&plan),
        OutputFormat::Human => print!("{}", plan::render::plan_text(&plan)),
    }
    Ok(0)
}

pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("kvstrap: cannot encode JSON: {e}"),
    }
}

/// The state directory's block-link folder.
pub fn block_dir(g: &GlobalArgs) -> PathBuf {
    g.state_dir.join("block")
}
