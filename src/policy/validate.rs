//! From the merged tree to the validated [`Policy`]: every section is checked, every
//! problem reported, and the policy is built only when there is none.

use super::class;
use super::diag::{Diags, Loc};
use super::fields::{Located, Section};
use super::group;
use super::monitoring;
use super::names;
use super::overlap;
use super::raw::{Entry, Table, Value};
use super::size;
use super::types::{
    DiskGroup, DiskMatch, KubernetesSettings, NodeSettings, Policy, Provisioning, StorageClass,
    VolumeSizing, Wipe, DEFAULT_POLICY_NAMESPACE,
};
use crate::model::{FsType, Layout, VolumeMode};
use std::path::{Component, Path, PathBuf};

pub const TOP_KEYS: &[&str] = &[
    "node",
    "kubernetes",
    "health",
    "metrics",
    "io_class",
    "storage_class",
    "disk_group",
];
pub const NODE_KEYS: &[&str] = &["name", "storage_root"];
pub const KUBERNETES_KEYS: &[&str] = &[
    "publish",
    "kubeconfig",
    "cluster_policy",
    "policy_namespace",
    "cluster_may_wipe",
];

pub const DEFAULT_STORAGE_ROOT: &str = "/var/lib/kvstrap/storage";

/// Every key the parser knows, by its path: `node.name`, `disk_group.match.transport`.
/// A table's own name (`disk_group`, `disk_group.match`) is a key too.
pub fn known_keys() -> Vec<String> {
    let tables: [(&str, &[&str]); 11] = [
        ("", TOP_KEYS),
        ("node", NODE_KEYS),
        ("kubernetes", KUBERNETES_KEYS),
        ("health", super::monitoring::HEALTH_KEYS),
        ("metrics", super::monitoring::METRICS_KEYS),
        ("io_class", super::io::KEYS),
        ("storage_class", super::class::KEYS),
        ("disk_group", super::group::KEYS),
        ("disk_group.match", super::group::MATCH_KEYS),
        ("disk_group.owner", super::group::OWNER_KEYS),
        ("disk_group.encryption", super::group::ENCRYPTION_KEYS),
    ];
    tables
        .iter()
        .flat_map(|(table, keys)| {
            keys.iter().map(move |k| match *table {
                "" => (*k).to_string(),
                t => format!("{t}.{k}"),
            })
        })
        .collect()
}

/// mkfs.xfs refuses filesystems smaller than this.
const XFS_MIN_BYTES: u64 = 300 << 20;
/// A GPT has room for 128 partition entries.
const GPT_MAX_PARTITIONS: u32 = 128;

/// Validate the merged policy. `hostname` supplies the default node name.
pub fn validate(
    tree: &Table,
    diags: &mut Diags,
    hostname: &dyn Fn() -> Option<String>,
) -> Option<Policy> {
    let root = Section::new(tree, Loc { file: 0, offset: 0 }, "the policy");
    root.check_keys(TOP_KEYS, diags);
    let node = node(&root, diags, hostname);
    let kubernetes = kubernetes(&root, diags);
    let health = section(&root, "health", diags).and_then(|s| monitoring::health(&s, diags));
    let metrics = section(&root, "metrics", diags).and_then(|s| monitoring::metrics(&s, diags));
    let io_class = section(&root, "io_class", diags).and_then(|s| super::io::thresholds(&s, diags));
    let (classes, classes_ok) = list(&root, "storage_class", diags, class::parse);
    let (drafts, drafts_ok) = list(&root, "disk_group", diags, group::parse);
    check_class_references(tree, diags);
    let groups = check_groups(&classes, &drafts, diags);
    let policy = Policy {
        cluster_layer_dropped: None,
        node: node?,
        kubernetes: kubernetes?,
        health: health?,
        metrics: metrics?,
        io_class: io_class?,
        storage_classes: classes_ok.then_some(classes)?,
        disk_groups: (drafts_ok && groups.len() == drafts.len()).then_some(groups)?,
        sources: diags.sources.paths(),
    };
    diags.is_empty().then_some(policy)
}

/// A sub-table that may be absent (then it is empty).
fn section<'t>(root: &Section<'t>, key: &str, diags: &mut Diags) -> Option<Section<'t>> {
    static EMPTY: Table = Table {
        entries: Vec::new(),
    };
    match root.entry(key) {
        None => Some(Section::new(&EMPTY, root.at, format!("[{key}]"))),
        Some(Entry { node, key_at, .. }) => match &node.value {
            Value::Table(t) => Some(Section::new(t, *key_at, format!("[{key}]"))),
            other => {
                diags.error(
                    *key_at,
                    format!("\"{key}\" must be a table, found {}", other.kind()),
                    format!("write a [{key}] section"),
                );
                None
            }
        },
    }
}

fn node(
    root: &Section,
    diags: &mut Diags,
    hostname: &dyn Fn() -> Option<String>,
) -> Option<NodeSettings> {
    let s = section(root, "node", diags)?;
    s.check_keys(NODE_KEYS, diags);
    let name = node_name(&s, diags, hostname);
    let storage_root = match s.string("storage_root", "\"/var/lib/kvstrap/storage\"", diags) {
        Some(v) => storage_root(v, diags),
        None => s
            .entry("storage_root")
            .is_none()
            .then(|| PathBuf::from(DEFAULT_STORAGE_ROOT)),
    };
    Some(NodeSettings {
        name: name?,
        storage_root: storage_root?,
    })
}

fn node_name(
    s: &Section,
    diags: &mut Diags,
    hostname: &dyn Fn() -> Option<String>,
) -> Option<String> {
    let (name, at, from_host) = match s.string("name", "\"worker-07\"", diags) {
        Some((name, at)) => (name.to_string(), at, false),
        None if s.entry("name").is_some() => return None,
        // kubelet registers the node under the lower-cased hostname.
        None => (
            hostname().unwrap_or_default().trim().to_ascii_lowercase(),
            s.at,
            true,
        ),
    };
    let Some(problem) = names::subdomain_problem(&name) else {
        return Some(name);
    };
    let origin = if from_host {
        "the hostname (the default node name)"
    } else {
        "node name"
    };
    diags.error(
        at,
        format!("{origin} \"{name}\" {problem}; Kubernetes node names are DNS-1123 subdomains"),
        "write the name kubelet registers the node under, like [node] name = \"worker-07\"",
    );
    None
}

fn storage_root((text, at): Located<&str>, diags: &mut Diags) -> Option<PathBuf> {
    let path = absolute_path("storage_root", text, at, diags)?;
    if path == Path::new("/") {
        diags.error(
            at,
            "storage_root is the root directory",
            format!("write a directory of its own, like storage_root = \"{DEFAULT_STORAGE_ROOT}\""),
        );
        return None;
    }
    for system in [
        "/dev", "/proc", "/sys", "/run", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib",
    ] {
        if path.starts_with(system) {
            diags.error(
                at,
                format!("storage_root \"{text}\" is inside {system}, which belongs to the operating system"),
                format!("write a directory of its own, like storage_root = \"{DEFAULT_STORAGE_ROOT}\""),
            );
            return None;
        }
    }
    // kubelet's pod mounts of kvstrap's volumes live there: below it they would look
    // like kvstrap's own mounts.
    if path.starts_with(KUBELET_ROOT) || Path::new(KUBELET_ROOT).starts_with(&path) {
        diags.error(
            at,
            format!("storage_root \"{text}\" overlaps kubelet's directory {KUBELET_ROOT}, where pods' mounts of the volumes are"),
            format!("write a directory of its own, like storage_root = \"{DEFAULT_STORAGE_ROOT}\""),
        );
        return None;
    }
    Some(path)
}

/// kubelet's root directory (its default `--root-dir`).
const KUBELET_ROOT: &str = "/var/lib/kubelet";

/// An absolute path without `..`, as mount points and kubeconfig locations must be.
fn absolute_path(key: &str, text: &str, at: Loc, diags: &mut Diags) -> Option<PathBuf> {
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        diags.error(
            at,
            format!("{key} \"{text}\" is not an absolute path"),
            format!(
                "write a path that starts with /, like {key} = \"/{}\"",
                text.trim_start_matches("./")
            ),
        );
        return None;
    }
    if path.components().any(|c| c == Component::ParentDir) {
        diags.error(
            at,
            format!("{key} \"{text}\" contains \"..\""),
            format!("write the path without \"..\", like {key} = \"{DEFAULT_STORAGE_ROOT}\""),
        );
        return None;
    }
    Some(path.components().collect())
}

fn kubernetes(root: &Section, diags: &mut Diags) -> Option<KubernetesSettings> {
    let s = section(root, "kubernetes", diags)?;
    s.check_keys(KUBERNETES_KEYS, diags);
    let publish = match s.boolean("publish", diags) {
        Some((b, _)) => Some(b),
        None => s.entry("publish").is_none().then_some(false),
    };
    let kubeconfig = match s.string("kubeconfig", "\"/etc/kubernetes/kubelet.conf\"", diags) {
        Some((text, at)) => absolute_path("kubeconfig", text, at, diags).map(Some),
        None => s.entry("kubeconfig").is_none().then_some(None),
    };
    let flag = |key: &str, diags: &mut Diags| match s.boolean(key, diags) {
        Some((b, _)) => Some(b),
        None => s.entry(key).is_none().then_some(false),
    };
    let cluster_policy = flag("cluster_policy", diags);
    let cluster_may_wipe = flag("cluster_may_wipe", diags);
    let namespace = match s.string("policy_namespace", "\"kvstrap\"", diags) {
        Some((text, at)) => namespace_name(text, at, diags),
        None => s
            .entry("policy_namespace")
            .is_none()
            .then(|| DEFAULT_POLICY_NAMESPACE.to_string()),
    };
    Some(KubernetesSettings {
        publish: publish?,
        kubeconfig: kubeconfig?,
        cluster_policy: cluster_policy?,
        policy_namespace: namespace?,
        cluster_may_wipe: cluster_may_wipe?,
    })
}

/// A namespace name is a DNS-1123 label.
fn namespace_name(text: &str, at: Loc, diags: &mut Diags) -> Option<String> {
    match names::label_problem(text) {
        None => Some(text.to_string()),
        Some(problem) => {
            diags.error(
                at,
                format!("policy_namespace \"{text}\" is not a namespace name: it {problem}"),
                format!(
                    "write a DNS-1123 label, like policy_namespace = \"{}\"",
                    names::dns_suggestion(text)
                ),
            );
            None
        }
    }
}

/// `[[key]]` entries, each parsed by `parse`, and whether all of them were valid.
fn list<T>(
    root: &Section,
    key: &str,
    diags: &mut Diags,
    parse: fn(&Section, &mut Diags) -> Option<T>,
) -> (Vec<T>, bool) {
    let Some(entry) = root.entry(key) else {
        return (Vec::new(), true);
    };
    let Value::Array(items) = &entry.node.value else {
        diags.error(
            entry.key_at,
            format!(
                "\"{key}\" must be an array of tables, found {}",
                entry.node.value.kind()
            ),
            format!("write [[{key}]] (two brackets) before each entry"),
        );
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    let mut ok = true;
    for item in items {
        let Value::Table(t) = &item.value else {
            diags.error(
                item.at,
                format!(
                    "each {key} entry must be a table, found {}",
                    item.value.kind()
                ),
                format!("write [[{key}]] followed by its keys"),
            );
            ok = false;
            continue;
        };
        let label = match t.str("name") {
            Some(name) => format!("{key} \"{name}\""),
            None => format!("[[{key}]]"),
        };
        match parse(&Section::new(t, item.at, label), diags) {
            Some(parsed) => out.push(parsed),
            None => ok = false,
        }
    }
    (out, ok)
}

/// Checks that need several values: layouts, sizes, wipe, overlaps. Each runs on the
/// values that are valid; returns the groups that are valid as a whole.
fn check_groups(
    classes: &[StorageClass],
    drafts: &[group::Draft],
    diags: &mut Diags,
) -> Vec<DiskGroup> {
    for g in drafts {
        if let Some(class) = classes
            .iter()
            .find(|c| Some(&c.name) == g.storage_class.as_ref())
        {
            check_group_class(g, class, diags);
        }
        check_wipe(g, diags);
        check_fit(g, diags);
        check_loops(g, diags);
        check_dynamic(g, diags);
    }
    check_class_provisioning(drafts, diags);
    let groups: Vec<(DiskGroup, Loc)> = drafts
        .iter()
        .filter_map(|d| Some((d.build()?, d.at.name)))
        .collect();
    check_overlaps(&groups, diags);
    groups.into_iter().map(|(g, _)| g).collect()
}

/// The string `name`s of the entries of `[[key]]`, valid or not.
fn raw_names<'t>(tree: &'t Table, key: &str) -> Vec<(&'t Table, &'t str)> {
    let Some(Entry {
        node: super::raw::Node {
            value: Value::Array(items),
            ..
        },
        ..
    }) = tree.get(key)
    else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match &item.value {
            Value::Table(t) => t.str("name").map(|name| (t, name)),
            _ => None,
        })
        .collect()
}

/// Done on the raw tree, so a reference is checked even when its group or the class
/// has other problems.
fn check_class_references(tree: &Table, diags: &mut Diags) {
    let defined: Vec<&str> = raw_names(tree, "storage_class")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    for (group, name) in raw_names(tree, "disk_group") {
        let Some(entry) = group.get("storage_class") else {
            continue;
        };
        let Value::Str(class) = &entry.node.value else {
            continue;
        };
        if defined.contains(&class.as_str()) {
            continue;
        }
        let hint = match names::closest(class, &defined) {
            Some(n) => format!("did you mean storage_class = \"{n}\"?"),
            None if defined.is_empty() => "define it in a [[storage_class]] section".to_string(),
            None => format!(
                "define it in a [[storage_class]] section, or use one of: {}",
                defined.join(", ")
            ),
        };
        diags.error(
            entry.node.at,
            format!("disk group \"{name}\" uses storage class \"{class}\", which is not defined"),
            hint,
        );
    }
}

/// A dynamic group's filesystems are pools: shared, and sized by claims, not in advance.
fn check_dynamic(g: &group::Draft, diags: &mut Diags) {
    if g.provisioning != Some(Provisioning::Dynamic) {
        return;
    }
    let at = g.at.provisioning.unwrap_or(g.at.name);
    if g.layout == Some(Layout::Separate) {
        diags.error(
            g.at.layout.unwrap_or(at),
            format!("{} has provisioning = \"dynamic\" with layout = \"separate\": a claim gets a directory on a pool filesystem", g.label()),
            "write layout = \"shared\" (or remove it), or provisioning = \"static\"",
        );
    }
    for (key, loc) in [
        ("volume_size", g.at.volume_size),
        ("volume_count", g.at.volume_count),
    ] {
        if let Some(loc) = loc {
            diags.error(
                loc,
                format!("{} has provisioning = \"dynamic\": its volumes are sized by the claims, not by {key}", g.label()),
                format!("remove {key}, or write provisioning = \"static\""),
            );
        }
    }
}

/// A storage class is published either with kvstrap's provisioner (dynamic) or without
/// one (static, `kubernetes.io/no-provisioner`): never both.
fn check_class_provisioning(drafts: &[group::Draft], diags: &mut Diags) {
    for (i, g) in drafts.iter().enumerate() {
        let Some(class) = &g.storage_class else {
            continue;
        };
        let Some(first) = drafts[..i].iter().find(|o| {
            o.storage_class.as_ref() == Some(class)
                && o.provisioning.is_some()
                && o.provisioning != g.provisioning
        }) else {
            continue;
        };
        if g.provisioning.is_none() {
            continue;
        }
        diags.error(
            g.at.storage_class.unwrap_or(g.at.name),
            format!(
                "{} and {} share storage class \"{class}\", but one is provisioned dynamically and the other statically",
                first.label(),
                g.label()
            ),
            "give the dynamic group a storage class of its own: its class names kvstrap's provisioner (kvstrap.io/local)",
        );
    }
}

fn check_group_class(g: &group::Draft, class: &StorageClass, diags: &mut Diags) {
    let Some(class_at) = g.at.storage_class else {
        return;
    };
    if class.volume_mode == VolumeMode::Block && g.layout == Some(Layout::Shared) {
        diags.error(
            g.at.layout.unwrap_or(class_at),
            format!("{} has layout \"shared\" (the default) but storage class \"{}\" is Block: raw block volumes cannot live on a shared filesystem", g.label(), class.name),
            "write layout = \"separate\" (one raw partition per volume)",
        );
    }
    if g.layout == Some(Layout::Separate) {
        check_partition_limits(g, class, diags);
    }
}

fn check_partition_limits(g: &group::Draft, class: &StorageClass, diags: &mut Diags) {
    if let (Some(VolumeSizing::Count(n)), Some(at)) = (g.sizing, g.at.volume_count) {
        if n > GPT_MAX_PARTITIONS {
            diags.error(
                at,
                format!("volume_count = {n} needs {n} partitions; a GPT holds at most {GPT_MAX_PARTITIONS}"),
                format!("write volume_count = {GPT_MAX_PARTITIONS} or less, or use layout = \"shared\""),
            );
        }
    }
    let xfs = class.volume_mode == VolumeMode::Filesystem && class.fs_type == FsType::Xfs;
    if let (Some(VolumeSizing::Size(bytes)), Some(at), true) = (g.sizing, g.at.volume_size, xfs) {
        if bytes < XFS_MIN_BYTES {
            diags.error(
                at,
                format!(
                    "volume_size {} is too small for an xfs filesystem of its own (at least 300 MiB)",
                    size::human(bytes)
                ),
                "write volume_size = \"300Mi\" or more, use fs_type = \"ext4\", or layout = \"shared\"",
            );
        }
    }
}

/// Wiping a disk that holds something needs that disk named by its identity: a glob or
/// a kernel name could point at another disk tomorrow.
fn check_wipe(g: &group::Draft, diags: &mut Diags) {
    let (Some(Wipe::Force), Some(devices), Some(matcher), Some(at)) =
        (g.wipe, &g.devices, &g.matcher, g.at.wipe)
    else {
        return;
    };
    if names_disks_by_identity(devices, matcher) {
        return;
    }
    diags.error(
        at,
        format!("{} has wipe = \"force\" but does not name its disks by serial or WWN", g.label()),
        "add match = { serial = \"...\" } or { wwn = \"...\" } (no globs), or list devices as /dev/disk/by-id/wwn-... or by-id names with the serial; otherwise write wipe = \"never\"",
    );
}

fn names_disks_by_identity(devices: &[String], matcher: &DiskMatch) -> bool {
    let literal = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.contains(['*', '?', '[']));
    if literal(&matcher.serial) || literal(&matcher.wwn) {
        return true;
    }
    !devices.is_empty() && devices.iter().all(|d| is_identity_path(d))
}

/// `/dev/disk/by-id/` names that carry a WWN or a serial number.
fn is_identity_path(path: &str) -> bool {
    const PREFIXES: [&str; 10] = [
        "wwn-",
        // A multipath map by its LUN's WWID (never `dm-name-`: a name is only a name).
        "dm-uuid-mpath-",
        "nvme-",
        "ata-",
        "scsi-",
        "virtio-",
        "usb-",
        "mmc-",
        "ieee1394-",
        "sas-",
    ];
    let Some(name) = path.strip_prefix("/dev/disk/by-id/") else {
        return false;
    };
    !name.contains(['*', '?', '[', '/'])
        && PREFIXES
            .iter()
            .any(|p| name.starts_with(p) && name.len() > p.len())
}

/// A volume_size larger than every disk the group can select fits nowhere.
fn check_fit(g: &group::Draft, diags: &mut Diags) {
    let (Some(VolumeSizing::Size(bytes)), Some(matcher), Some(reserve), Some(at)) =
        (g.sizing, &g.matcher, g.reserve_percent, g.at.volume_size)
    else {
        return;
    };
    let Some(max) = matcher.max_size else { return };
    let usable = u128::from(max) * u128::from(100 - reserve.min(100)) / 100;
    if u128::from(bytes) > usable {
        diags.error(
            at,
            format!("volume_size {} does not fit on the largest disk this group selects (max_size {} less reserve {reserve}%)", size::human(bytes), size::human(max)),
            "write a smaller volume_size, or raise match.max_size",
        );
    }
}

/// A group of loop devices without allow_loop selects nothing: surely a mistake.
fn check_loops(g: &group::Draft, diags: &mut Diags) {
    let (Some(devices), Some(matcher), Some(false)) = (&g.devices, &g.matcher, g.allow_loop) else {
        return;
    };
    let by_transport = matcher.transport.as_deref() == Some("loop");
    if !(overlap::only_loop_devices(devices) || by_transport) {
        return;
    }
    let at = if by_transport { None } else { g.at.devices };
    diags.error(
        at.unwrap_or(g.at.name),
        format!("{} selects only loop devices, but loop devices are eligible only with allow_loop = true", g.label()),
        "add allow_loop = true (for tests and demos), or select real disks",
    );
}

fn check_overlaps(groups: &[(DiskGroup, Loc)], diags: &mut Diags) {
    for (i, (later, later_at)) in groups.iter().enumerate() {
        for (earlier, earlier_at) in &groups[..i] {
            if overlap::may_overlap(earlier, later) {
                diags.error(
                    *later_at,
                    format!("disk groups \"{}\" and \"{}\" can select the same disk", earlier.name, later.name),
                    format!(
                        "\"{}\" is at {}; make them disjoint: different devices, or match on different transport, rotational, serial, wwn or non-overlapping min_size/max_size",
                        earlier.name,
                        diags.sources.describe(*earlier_at)
                    ),
                );
            }
        }
    }
}
