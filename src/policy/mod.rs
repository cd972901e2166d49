//! The TOML policy (load, merge, validate); it reads policy files and the cluster layer's cache, and touches nothing else.
//!
//! The TOML policy: raw fragments, drop-in merge, validation with file:line:col.
//! `types` is the validated result the planner consumes.
//!
//! Pipeline: [`sources`] finds the files (systemd drop-in rules) -> [`raw`] parses each
//! into a tree that remembers where every key and value was written -> [`merge`]
//! combines them in order -> [`validate`] checks everything and builds [`Policy`].

mod class;
pub mod cluster;
pub mod diag;
mod fields;
mod group;
mod io;
mod layers;
mod merge;
mod monitoring;
pub mod names;
mod overlap;
pub mod raw;
mod remote;
pub mod selector;
pub mod size;
pub mod sources;
pub mod types;
mod validate;

pub use group::{MAX_VOLUME_COUNT, MAX_VOLUME_SIZE, MIN_VOLUME_SIZE};
pub use remote::{origin, Origin, ORIGINS};
pub use types::*;
pub use validate::{known_keys, DEFAULT_STORAGE_ROOT};

use diag::Diags;
use std::path::{Path, PathBuf};

/// The loop-device demo policy that `kvstrap demo` applies (its devices are replaced
/// by a drop-in naming the loop devices the demo created).
pub const DEMO_POLICY: &str = include_str!("../../config/demo.toml");

/// The fully commented example policy that documents every key.
pub const EXAMPLE_POLICY: &str = include_str!("../../config/example.toml");

/// Every problem found in a policy, each with its location. Displayed one per line as
/// `FILE:LINE:COL: error: what\n  hint: what to write instead`.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy")]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// All diagnostics, one per line (with their hint lines), as `kvstrap validate` prints them.
    pub fn report(&self) -> String {
        let lines: Vec<String> = self.diagnostics.iter().map(ToString::to_string).collect();
        lines.join("\n")
    }
}

/// One problem. `line` and `column` are 1-based; `line == 0` means the problem
/// concerns the whole file (missing, unreadable), and Display then prints no position.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: std::path::PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// Load the policy from a file or a drop-in directory, or (None) from the system
/// locations merged with systemd's rules.
pub fn load(source: Option<&Path>) -> Result<Policy, PolicyError> {
    match source {
        Some(path) => load_path(path),
        None => load_from_root(Path::new("/")),
    }
}

/// Load `path`: a file, or every `*.toml` of a directory in lexical order.
pub fn load_path(path: &Path) -> Result<Policy, PolicyError> {
    let mut diags = Diags::default();
    let files = sources::explicit(path, &mut diags);
    finish(files, diags)
}

/// Load from the default locations below `root` (`/` on a real system):
/// `etc/kvstrap/policy.toml`, then the drop-ins of `usr/lib/kvstrap/policy.d` and
/// `etc/kvstrap/policy.d` (same name in etc replaces usr/lib; empty or /dev/null masks).
pub fn load_from_root(root: &Path) -> Result<Policy, PolicyError> {
    let mut diags = Diags::default();
    let files = sources::system(root, &mut diags);
    finish(files, diags)
}

/// Load the policy with its cluster layer when the node's own files say
/// `[kubernetes] cluster_policy = true`: the last good fragments cached in `state_dir`
/// are merged after the vendor drop-ins and before the node's own files.
pub fn load_with_cluster(source: Option<&Path>, state_dir: &Path) -> Result<Policy, PolicyError> {
    let (files, diags, vendor) = local_sources(source, Path::new("/"));
    layers::build(
        files,
        diags,
        vendor.as_deref(),
        layers::Cluster::Cached(state_dir),
        &system_hostname,
    )
}

/// The policy the node would have with these fragments from the cluster (selected and
/// in merge order): the check before a fragment set is cached.
pub fn evaluate_cluster(
    source: Option<&Path>,
    fragments: &[cluster::Fragment],
) -> Result<Policy, PolicyError> {
    evaluate_cluster_at(source, Path::new("/"), fragments, &system_hostname)
}

/// [`evaluate_cluster`] with the system locations below `root` and the hostname given.
pub fn evaluate_cluster_at(
    source: Option<&Path>,
    root: &Path,
    fragments: &[cluster::Fragment],
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Policy, PolicyError> {
    let (files, diags, vendor) = local_sources(source, root);
    layers::build(
        files,
        diags,
        vendor.as_deref(),
        layers::Cluster::Given(fragments),
        hostname,
    )
}

/// The node's own files in their merge order, and which of them are vendor files (the
/// cluster layer goes after those and before the rest).
fn local_sources(
    source: Option<&Path>,
    root: &Path,
) -> (Vec<sources::Source>, Diags, Option<PathBuf>) {
    let mut diags = Diags::default();
    match source {
        Some(path) => {
            let files = sources::explicit(path, &mut diags);
            (files, diags, None)
        }
        None => {
            let files = sources::system(root, &mut diags);
            (files, diags, Some(root.join(sources::VENDOR_DROPINS)))
        }
    }
}

/// Parse and validate one policy text; `file` is used in diagnostics.
pub fn load_str(file: &Path, text: &str) -> Result<Policy, PolicyError> {
    load_many(&[(file.to_path_buf(), text.to_string())])
}

/// Parse, merge in the given order, and validate several policy texts.
pub fn load_many(files: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
    finish(files.to_vec(), Diags::default())
}

/// Like [`load_many`], with the hostname (default node name) given instead of read.
pub fn load_many_with_hostname(
    files: &[(PathBuf, String)],
    hostname: Option<&str>,
) -> Result<Policy, PolicyError> {
    let hostname = hostname.map(str::to_string);
    build(files.to_vec(), Diags::default(), &move || hostname.clone())
}

/// A drop-in that replaces the `devices` of the named disk groups, e.g. with the loop
/// devices `kvstrap demo` created. Merged after the policy, it overrides by group name.
pub fn devices_dropin(groups: &[(&str, Vec<String>)]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::from("# Written by kvstrap: the devices of each disk group.\n");
    for (name, devices) in groups {
        let list: Vec<String> = devices.iter().map(|d| quote(d)).collect();
        out.push_str(&format!(
            "\n[[disk_group]]\nname = {}\ndevices = [{}]\n",
            quote(name),
            list.join(", ")
        ));
    }
    out
}

fn finish(files: Vec<(PathBuf, String)>, diags: Diags) -> Result<Policy, PolicyError> {
    build(files, diags, &system_hostname)
}

fn build(
    files: Vec<(PathBuf, String)>,
    mut diags: Diags,
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Policy, PolicyError> {
    let mut fragments = Vec::new();
    for (path, text) in &files {
        let file = diags.sources.add(path, text);
        fragments.extend(raw::parse(file, text, &mut diags));
    }
    merge_and_validate(fragments, diags, hostname)
}

/// Merges the parsed fragments in order and validates the result; every problem so far
/// and found now is in the error.
fn merge_and_validate(
    fragments: Vec<raw::Table>,
    mut diags: Diags,
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Policy, PolicyError> {
    // Syntax errors leave holes; checking the rest would report phantom problems.
    let policy = if diags.is_empty() {
        let merged = merge::merge_all(fragments, &mut diags);
        validate::validate(&merged, &mut diags, hostname)
    } else {
        None
    };
    match policy {
        Some(policy) if diags.is_empty() => Ok(policy),
        _ => Err(PolicyError {
            diagnostics: diags.into_diagnostics(),
        }),
    }
}

/// The hostname as kubelet sees it (uname's nodename; before lower-casing).
fn system_hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}
