//! Nothing destructive from a distance: what a fragment from the cluster may not say.
//!
//! Someone who can write ConfigMaps in the policy namespace can at most provision blank
//! disks. Unless the node's own files say `[kubernetes] cluster_may_wipe = true`, a
//! fragment may not ask for `wipe = "force"`, may not turn on `allow_loop` or
//! `allow_removable`, and may not change which disks a group that the node's own files
//! allow to wipe selects. The `[kubernetes]` keys that decide the cluster layer itself
//! are never taken from the cluster.

use super::diag::Diags;
use super::raw::{Entry, Table, Value};

/// Keys only the node's own files decide.
const NODE_ONLY_KEYS: [&str; 4] = [
    "cluster_policy",
    "cluster_may_wipe",
    "policy_namespace",
    "kubeconfig",
];
/// Keys that choose a group's disks.
const SELECTOR_KEYS: [&str; 3] = ["devices", "match", "max_disks"];

/// Reports everything `fragment` may not do, given the merged tree of the node's own
/// files (`local`).
pub fn check(local: &Table, fragment: &Table, may_wipe: bool, diags: &mut Diags) {
    if let Some(Value::Table(k)) = fragment.get("kubernetes").map(|e| &e.node.value) {
        for entry in k
            .entries
            .iter()
            .filter(|e| NODE_ONLY_KEYS.contains(&e.key.as_str()))
        {
            diags.error(
                entry.key_at,
                format!(
                    "a policy fragment from the cluster may not set [kubernetes] {}",
                    entry.key
                ),
                "the node's own files (/etc/kvstrap) decide where its policy comes from; remove the key from the ConfigMap",
            );
        }
    }
    if may_wipe {
        return;
    }
    for group in tables(fragment, "disk_group") {
        let name = group.str("name").unwrap_or("");
        let own = tables(local, "disk_group").find(|g| g.str("name") == Some(name));
        check_group(name, group, own, diags);
    }
}

fn check_group(name: &str, group: &Table, own: Option<&Table>, diags: &mut Diags) {
    let hint = "a fragment from the cluster can only provision blank disks: write it in the node's own files (/etc/kvstrap/policy.d/), or allow it there with [kubernetes] cluster_may_wipe = true";
    if let Some(e) = group.get("wipe").filter(|e| is_str(e, "force")) {
        diags.error(
            e.node.at,
            format!("disk group \"{name}\": a policy fragment from the cluster may not set wipe = \"force\""),
            hint,
        );
    }
    for key in ["allow_loop", "allow_removable"] {
        let widens = group.get(key).filter(|e| e.node.value == Value::Bool(true));
        let own_allows = own
            .and_then(|g| g.get(key))
            .is_some_and(|e| e.node.value == Value::Bool(true));
        if let Some(e) = widens.filter(|_| !own_allows) {
            diags.error(
                e.node.at,
                format!("disk group \"{name}\": a policy fragment from the cluster may not set {key} = true"),
                hint,
            );
        }
    }
    let own_wipes = own
        .and_then(|g| g.get("wipe"))
        .is_some_and(|e| is_str(e, "force"));
    if !own_wipes {
        return;
    }
    for e in group
        .entries
        .iter()
        .filter(|e| SELECTOR_KEYS.contains(&e.key.as_str()))
    {
        diags.error(
            e.key_at,
            format!("disk group \"{name}\" may wipe disks (the node's own files say wipe = \"force\"): a policy fragment from the cluster may not change its {}", e.key),
            hint,
        );
    }
}

fn is_str(e: &Entry, s: &str) -> bool {
    matches!(&e.node.value, Value::Str(v) if v == s)
}

/// The tables of the array of tables `key` (`[[disk_group]]`).
fn tables<'t>(t: &'t Table, key: &str) -> impl Iterator<Item = &'t Table> {
    let items = match t.get(key).map(|e| &e.node.value) {
        Some(Value::Array(items)) => items.as_slice(),
        _ => &[],
    };
    items.iter().filter_map(|n| match &n.value {
        Value::Table(t) => Some(t),
        _ => None,
    })
}
