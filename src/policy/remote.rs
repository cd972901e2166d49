//! Nothing destructive from a distance: what a fragment from the cluster may say.
//!
//! Someone who can write ConfigMaps in the policy namespace describes storage classes and
//! disk groups, and nothing else: [`ORIGINS`] is an allow-list of every key the parser
//! knows. `[node]`, `[kubernetes]`, `[health]`, `[metrics]` (node identity, paths,
//! addresses, intervals) are the node's own files' alone; a fragment that sets one of them
//! is refused whole. Within the groups, unless the node's own files say
//! `[kubernetes] cluster_may_wipe = true`, a fragment may not ask for `wipe = "force"`,
//! may not turn on `allow_loop` or `allow_removable`, and may not change which disks a
//! group that the node's own files allow to wipe selects.

use super::diag::Diags;
use super::raw::{Entry, Table, Value};

/// Who may set a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A fragment from the cluster, as well as the node's own files.
    Cluster,
    /// Only the node's own files (`/usr/lib/kvstrap`, `/etc/kvstrap`).
    NodeOnly,
}

/// Every key of the policy, by its path, and who may set it. A key the parser knows must
/// be here (`tests/policy_cluster.rs` walks them all, and docs/fleet.md has this table);
/// whatever is not `Cluster` is refused from the cluster.
pub const ORIGINS: &[(&str, Origin)] = &[
    ("node", Origin::NodeOnly),
    ("node.name", Origin::NodeOnly),
    ("node.storage_root", Origin::NodeOnly),
    ("kubernetes", Origin::NodeOnly),
    ("kubernetes.publish", Origin::NodeOnly),
    ("kubernetes.kubeconfig", Origin::NodeOnly),
    ("kubernetes.cluster_policy", Origin::NodeOnly),
    ("kubernetes.policy_namespace", Origin::NodeOnly),
    ("kubernetes.cluster_may_wipe", Origin::NodeOnly),
    ("health", Origin::NodeOnly),
    ("health.interval", Origin::NodeOnly),
    ("metrics", Origin::NodeOnly),
    ("metrics.textfile", Origin::NodeOnly),
    ("metrics.listen", Origin::NodeOnly),
    // Thresholds only sort measured blank disks; they never bring a disk with data.
    ("io_class", Origin::Cluster),
    ("io_class.fast_min_random_read_iops", Origin::Cluster),
    ("io_class.standard_min_random_read_iops", Origin::Cluster),
    ("storage_class", Origin::Cluster),
    ("storage_class.name", Origin::Cluster),
    ("storage_class.volume_mode", Origin::Cluster),
    ("storage_class.fs_type", Origin::Cluster),
    ("storage_class.reclaim_policy", Origin::Cluster),
    ("storage_class.access_modes", Origin::Cluster),
    ("storage_class.mount_options", Origin::Cluster),
    ("storage_class.binding_mode", Origin::Cluster),
    ("disk_group", Origin::Cluster),
    ("disk_group.name", Origin::Cluster),
    ("disk_group.storage_class", Origin::Cluster),
    ("disk_group.layout", Origin::Cluster),
    ("disk_group.devices", Origin::Cluster),
    ("disk_group.match", Origin::Cluster),
    ("disk_group.match.transport", Origin::Cluster),
    ("disk_group.match.rotational", Origin::Cluster),
    ("disk_group.match.min_size", Origin::Cluster),
    ("disk_group.match.max_size", Origin::Cluster),
    ("disk_group.match.model", Origin::Cluster),
    ("disk_group.match.vendor", Origin::Cluster),
    ("disk_group.match.serial", Origin::Cluster),
    ("disk_group.match.wwn", Origin::Cluster),
    ("disk_group.match.min_random_read_iops", Origin::Cluster),
    ("disk_group.match.min_seq_read_mib_s", Origin::Cluster),
    ("disk_group.match.io_class", Origin::Cluster),
    ("disk_group.max_disks", Origin::Cluster),
    ("disk_group.volume_size", Origin::Cluster),
    ("disk_group.volume_count", Origin::Cluster),
    ("disk_group.reserve", Origin::Cluster),
    ("disk_group.owner", Origin::Cluster),
    ("disk_group.owner.uid", Origin::Cluster),
    ("disk_group.owner.gid", Origin::Cluster),
    ("disk_group.owner.mode", Origin::Cluster),
    // Allowed only where the node's own files allow it: see `check_group`.
    ("disk_group.wipe", Origin::Cluster),
    ("disk_group.allow_loop", Origin::Cluster),
    ("disk_group.allow_removable", Origin::Cluster),
    ("disk_group.quota", Origin::Cluster),
    ("disk_group.on_failure", Origin::Cluster),
    ("disk_group.provisioning", Origin::Cluster),
    ("disk_group.overcommit", Origin::Cluster),
    // The cluster may ask for encryption (and seal to the node's TPM2), never name a
    // key file: paths are the node's own files', and a key file is a secret only the
    // node's administrator places (docs/encryption.md).
    ("disk_group.encryption", Origin::Cluster),
    ("disk_group.encryption.method", Origin::Cluster),
    ("disk_group.encryption.tpm2_pcrs", Origin::Cluster),
    ("disk_group.encryption.key_file", Origin::NodeOnly),
];

/// Who may set the key at `path`; `None` for a key the parser does not know (validation
/// reports it as unknown).
pub fn origin(path: &str) -> Option<Origin> {
    ORIGINS.iter().find(|(p, _)| *p == path).map(|(_, o)| *o)
}

/// Keys that choose a group's disks.
const SELECTOR_KEYS: [&str; 3] = ["devices", "match", "max_disks"];

/// Reports everything `fragment` may not do, given the merged tree of the node's own
/// files (`local`).
pub fn check(local: &Table, fragment: &Table, may_wipe: bool, diags: &mut Diags) {
    check_keys(fragment, "", diags);
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

/// Every key of `table` (at `prefix`) the allow-list does not give to the cluster, and
/// below the ones it does.
fn check_keys(table: &Table, prefix: &str, diags: &mut Diags) {
    for entry in &table.entries {
        let path = if prefix.is_empty() {
            entry.key.clone()
        } else {
            format!("{prefix}.{}", entry.key)
        };
        match origin(&path) {
            Some(Origin::Cluster) => match &entry.node.value {
                Value::Table(t) => check_keys(t, &path, diags),
                Value::Array(items) => {
                    for t in items.iter().filter_map(|n| match &n.value {
                        Value::Table(t) => Some(t),
                        _ => None,
                    }) {
                        check_keys(t, &path, diags);
                    }
                }
                _ => {}
            },
            Some(Origin::NodeOnly) => refuse_all(entry, &path, diags),
            // Unknown: validation names it, with the closest known key.
            None => {}
        }
    }
}

/// Refuses `entry` of the node's own files, naming each key it sets (or the table itself
/// when it is empty), so the operator sees exactly what to take out.
fn refuse_all(entry: &Entry, path: &str, diags: &mut Diags) {
    if let Value::Table(t) = &entry.node.value {
        if !t.entries.is_empty() {
            for inner in &t.entries {
                refuse_all(inner, &format!("{path}.{}", inner.key), diags);
            }
            return;
        }
    }
    diags.error(
        entry.key_at,
        format!(
            "a policy fragment from the cluster may not set {}",
            shown(path)
        ),
        "fragments describe storage classes and disk groups; node identity, paths, \
         addresses and intervals are the node's own files' (/etc/kvstrap): remove it \
         from the ConfigMap, the whole fragment is refused until then",
    );
}

/// `[node]`, `[kubernetes] kubeconfig`, `disk_group.owner.uid` as the operator writes it.
fn shown(path: &str) -> String {
    match path.split_once('.') {
        Some((table, key)) if !["storage_class", "disk_group"].contains(&table) => {
            format!("[{table}] {key}")
        }
        Some(_) => path.to_string(),
        None => format!("[{path}]"),
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
