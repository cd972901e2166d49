//! The fleet from an admin's side. `kvstrap validate --cluster`: this node's policy
//! fragments fetched from the cluster now, selected by its Node's labels and checked with
//! its own files exactly as the daemon would before caching them (nothing is cached or
//! applied). `kvstrap cluster status`: one line per node, from what the nodes publish.

use super::args::{GlobalArgs, OutputFormat};
use crate::kube::ClientSource;
use crate::kube::{fleet, fleet_status};
use crate::policy::{self, cluster};
use anyhow::{Context, Result};
use std::time::Duration;

/// How long the API server may take to answer.
const TIMEOUT: Duration = Duration::from_secs(15);

pub fn validate(g: &GlobalArgs) -> Result<i32> {
    let own = policy::load(g.policy.as_deref())
        .map_err(|e| anyhow::anyhow!(super::diagnostics_text(&e)))?;
    let k = &own.kubernetes;
    if !k.cluster_policy {
        eprintln!(
            "note: [kubernetes] cluster_policy is not true in the node's own files: the daemon would not merge these fragments"
        );
    }
    let source = ClientSource::from_policy(k);
    let (labels, all) = ask(async {
        let client = source.client().await.map_err(|e| e.to_string())?;
        fleet::fetch(&client, &own.node.name, &k.policy_namespace).await
    })?;
    let (selected, refused) = cluster::select(&all, &labels);
    let names: Vec<String> = selected
        .iter()
        .map(|f| f.source().display().to_string())
        .collect();
    eprintln!(
        "node {}: {} fragment(s) in namespace {}, selected: {}",
        own.node.name,
        all.len(),
        k.policy_namespace,
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    );
    let loaded = if refused.is_empty() {
        policy::evaluate_cluster(g.policy.as_deref(), &selected)
    } else {
        Err(policy::PolicyError {
            diagnostics: refused,
        })
    };
    super::report_validation(g, loaded)
}

/// `kvstrap cluster status`: one line per node, or `{"nodes": [...]}`.
pub fn status(g: &GlobalArgs, kubeconfig: Option<&std::path::Path>) -> Result<i32> {
    let rows = ask(async {
        let client = match kubeconfig {
            Some(path) => ClientSource::Kubeconfig(path.to_path_buf())
                .client()
                .await
                .map_err(|e| e.to_string())?,
            None => ::kube::Client::try_default()
                .await
                .map_err(|e| format!("cannot find a kubeconfig (give --kubeconfig): {e}"))?,
        };
        fleet_status::fetch(&client).await
    })?;
    match g.output {
        OutputFormat::Json => super::print_json(&serde_json::json!({ "nodes": rows })),
        OutputFormat::Human => print!("{}", table(&rows)),
    }
    Ok(0)
}

fn table(rows: &[fleet_status::NodeRow]) -> String {
    let mut out = format!(
        "{:<24} {:<7} {:<14} {:>5}  {:<40} {:<30} {:<30} SOURCES\n",
        "NODE", "READY", "REASON", "DISKS", "VOLUMES", "ROOM", "REFUSED"
    );
    for r in rows {
        let or_dash = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        out.push_str(&format!(
            "{:<24} {:<7} {:<14} {:>5}  {:<40} {:<30} {:<30} {}\n",
            r.node,
            r.ready,
            if r.reason.is_empty() { "-" } else { &r.reason },
            r.disks_ready,
            fleet_status::volumes_text(&r.volumes),
            fleet_status::room_text(&r.room),
            or_dash(&r.refused),
            or_dash(&r.sources),
        ));
    }
    out.push_str(&format!("{} node(s)\n", rows.len()));
    out
}

/// Runs `request` (client set-up and the requests) on a small runtime, within [`TIMEOUT`].
fn ask<T>(request: impl std::future::Future<Output = Result<T, String>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime
        .block_on(async { tokio::time::timeout(TIMEOUT, request).await })
        .map_err(|_| {
            anyhow::anyhow!(
                "the API server did not answer within {}s",
                TIMEOUT.as_secs()
            )
        })?
        .map_err(anyhow::Error::msg)
}
