//! The policy with its cluster layer: vendor drop-ins (`/usr/lib`), then the fragments
//! from the cluster in name order, then the node's own files (`/etc`), which always win.
//!
//! The node's own files are validated alone first: they decide whether there is a
//! cluster layer at all (`cluster_policy`) and what it may do (`cluster_may_wipe`),
//! and a mistake in them is reported as it always was.

use super::cluster::{self, Fragment};
use super::diag::Diags;
use super::raw::{self, Table};
use super::sources::Source;
use super::{merge, remote, Policy, PolicyError};
use std::path::Path;

/// Where the fragments come from.
pub enum Cluster<'a> {
    /// The last good set, cached below this state directory.
    Cached(&'a Path),
    /// A candidate set, being checked before it is cached.
    Given(&'a [Fragment]),
}

/// `files` are the node's own files in merge order; those below `vendor` are vendor files.
pub fn build(
    files: Vec<Source>,
    diags: Diags,
    vendor: Option<&Path>,
    cluster: Cluster,
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Policy, PolicyError> {
    let local = super::build(files.clone(), diags, hostname)?;
    if !local.kubernetes.cluster_policy {
        return Ok(local);
    }
    let fragments = match cluster {
        Cluster::Cached(state_dir) => cluster::read_cache(state_dir)
            .map_err(|d| PolicyError {
                diagnostics: vec![d],
            })?
            .map(|c| c.fragments)
            .unwrap_or_default(),
        Cluster::Given(f) => f.to_vec(),
    };
    if fragments.is_empty() {
        return Ok(local);
    }
    let (vendor_files, own_files): (Vec<Source>, Vec<Source>) = files
        .into_iter()
        .partition(|(p, _)| vendor.is_some_and(|v| p.starts_with(v)));
    let merged = layered(
        &vendor_files,
        &fragments,
        &own_files,
        local.kubernetes.cluster_may_wipe,
        hostname,
    );
    match (merged, cluster) {
        // The last good set no longer fits the node's own files (they changed, or kvstrap
        // did): the node runs on its own files, so it still starts and its fleet watcher
        // can fetch a set that fits. A candidate set being checked is refused as it is.
        (Err(e), Cluster::Cached(_)) => {
            let why = e.report();
            tracing::error!(
                message_id = crate::logging::message_id::POLICY_REJECTED,
                "the cached policy from the cluster no longer validates with this node's own files; \
                 running on the node's own files alone until a good set is fetched:\n{why}"
            );
            Ok(Policy {
                cluster_layer_dropped: Some(
                    why.lines()
                        .filter(|l| !l.starts_with("  hint"))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                ..local
            })
        }
        (merged, _) => merged,
    }
}

fn layered(
    vendor: &[Source],
    fragments: &[Fragment],
    own: &[Source],
    may_wipe: bool,
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Policy, PolicyError> {
    let mut diags = Diags::default();
    let vendor = parse_all(vendor, &mut diags);
    let from_cluster: Vec<Source> = fragments
        .iter()
        .map(|f| (f.source(), f.text.clone().unwrap_or_default()))
        .collect();
    let from_cluster = parse_all(&from_cluster, &mut diags);
    let own = parse_all(own, &mut diags);
    if diags.is_empty() {
        // The node's own files alone (already valid), to know what the cluster may change.
        let local: Vec<Table> = vendor.iter().chain(&own).cloned().collect();
        let local = merge::merge_all(local, &mut Diags::default());
        for fragment in &from_cluster {
            remote::check(&local, fragment, may_wipe, &mut diags);
        }
    }
    let all: Vec<Table> = vendor.into_iter().chain(from_cluster).chain(own).collect();
    super::merge_and_validate(all, diags, hostname)
}

/// Parses each text into the source map (so every diagnostic names its source); a
/// text that does not parse leaves a diagnostic and no table.
fn parse_all(sources: &[Source], diags: &mut Diags) -> Vec<Table> {
    let mut out = Vec::new();
    for (path, text) in sources {
        let file = diags.sources.add(path, text);
        out.extend(raw::parse(file, text, diags));
    }
    out
}
