//! The cluster layer of the policy, without a cluster: fragments merge between the vendor
//! drop-ins and the node's own files, errors name `configmap/NS/NAME:line:col`, nothing
//! destructive is taken from the cluster, and the loader reads the cache.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::policy::cluster::{cache_path, ClusterCache, Fragment};
use kvstrap::policy::{
    evaluate_cluster, evaluate_cluster_at, load_with_cluster, Policy, PolicyError,
};
use std::collections::BTreeMap;
use std::path::Path;

const BASE: &str = r#"
[node]
name = "w1"
[kubernetes]
cluster_policy = true
[[storage_class]]
name = "local"
[[disk_group]]
name = "g"
storage_class = "local"
devices = ["/dev/nvme0n1"]
"#;

fn fragment(name: &str, text: &str) -> Fragment {
    Fragment {
        namespace: "kvstrap".into(),
        name: name.into(),
        selector: None,
        text: Some(text.into()),
        resource_version: None,
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn eval(root: &Path, fragments: &[Fragment]) -> Result<Policy, PolicyError> {
    evaluate_cluster_at(None, root, fragments, &|| Some("w1".into()))
}

fn errors(r: Result<Policy, PolicyError>) -> String {
    match r {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.report(),
    }
}

#[test]
fn cluster_fragments_go_between_vendor_and_etc_and_etc_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(
        root,
        "usr/lib/kvstrap/policy.d/10-vendor.toml",
        "[[disk_group]]\nname = \"g\"\nvolume_count = 2\nreserve = \"5%\"\n",
    );
    write(root, "etc/kvstrap/policy.toml", BASE);
    write(
        root,
        "etc/kvstrap/policy.d/50-node.toml",
        "[[disk_group]]\nname = \"g\"\nreserve = \"20%\"\n",
    );
    let from_cluster = fragment(
        "fleet",
        "[[disk_group]]\nname = \"g\"\nvolume_count = 4\nreserve = \"10%\"\n",
    );
    let p = eval(root, &[from_cluster]).expect("valid");
    let g = &p.disk_groups[0];
    // The cluster overrides the vendor; the node's own drop-in overrides the cluster.
    assert_eq!(format!("{:?}", g.sizing), "Count(4)");
    assert_eq!(g.reserve_percent, 20);
    let sources: Vec<String> = p.sources.iter().map(|s| s.display().to_string()).collect();
    assert!(
        sources[0].ends_with("usr/lib/kvstrap/policy.d/10-vendor.toml"),
        "{sources:?}"
    );
    assert_eq!(sources[1], "configmap/kvstrap/fleet");
    assert!(
        sources[2].ends_with("etc/kvstrap/policy.toml"),
        "{sources:?}"
    );
    assert!(
        sources[3].ends_with("etc/kvstrap/policy.d/50-node.toml"),
        "{sources:?}"
    );
}

#[test]
fn without_cluster_policy_fragments_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "etc/kvstrap/policy.toml",
        &BASE.replace("cluster_policy = true", "publish = false"),
    );
    let p = eval(dir.path(), &[fragment("fleet", "this is not toml")]).expect("valid");
    assert!(!p.kubernetes.cluster_policy);
    assert_eq!(p.sources.len(), 1);
}

#[test]
fn a_broken_fragment_is_named_with_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/kvstrap/policy.toml", BASE);
    let broken = fragment(
        "gpu-nodes",
        "[[disk_group]]\nname = \"g\"\nreserve = \"95%\"\n",
    );
    let report = errors(eval(dir.path(), &[broken]));
    assert!(
        report
            .starts_with("configmap/kvstrap/gpu-nodes:3:11: error: reserve: 95% is more than 90%"),
        "{report}"
    );
    let syntax = fragment("gpu-nodes", "[[disk_group]\n");
    let report = errors(eval(dir.path(), &[syntax]));
    assert!(
        report.starts_with("configmap/kvstrap/gpu-nodes:1:"),
        "{report}"
    );
    assert!(report.contains("TOML syntax error"), "{report}");
}

#[test]
fn nothing_destructive_from_a_distance() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/kvstrap/policy.toml", BASE);
    let wipe = fragment(
        "wipe-all",
        "[[disk_group]]\nname = \"g\"\nwipe = \"force\"\nallow_loop = true\nallow_removable = true\n",
    );
    let report = errors(eval(dir.path(), std::slice::from_ref(&wipe)));
    let lines: Vec<&str> = report
        .lines()
        .filter(|l| !l.starts_with("  hint"))
        .collect();
    assert_eq!(
        lines,
        [
            "configmap/kvstrap/wipe-all:3:8: error: disk group \"g\": a policy fragment from the cluster may not set wipe = \"force\"",
            "configmap/kvstrap/wipe-all:4:14: error: disk group \"g\": a policy fragment from the cluster may not set allow_loop = true",
            "configmap/kvstrap/wipe-all:5:19: error: disk group \"g\": a policy fragment from the cluster may not set allow_removable = true",
        ]
    );
    assert!(report.contains("cluster_may_wipe = true"), "{report}");
    // The node's own files may open it ("force" still needs disks named by serial or WWN).
    let open = BASE
        .replace(
            "cluster_policy = true",
            "cluster_policy = true\ncluster_may_wipe = true",
        )
        .replace(
            "devices = [\"/dev/nvme0n1\"]",
            "match = { serial = \"S1\" }",
        );
    write(dir.path(), "etc/kvstrap/policy.toml", &open);
    let p = eval(dir.path(), &[wipe]).expect("allowed by the node");
    assert!(p.disk_groups[0].allow_loop);
}

#[test]
fn the_cluster_cannot_redirect_a_group_the_node_lets_wipe_nor_open_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wipes = BASE.replace(
        "devices = [\"/dev/nvme0n1\"]",
        "match = { serial = \"S1\" }\nwipe = \"force\"",
    );
    write(dir.path(), "etc/kvstrap/policy.toml", &wipes);
    let redirect = fragment(
        "redirect",
        "[kubernetes]\ncluster_may_wipe = true\n[[disk_group]]\nname = \"g\"\nmatch = { serial = \"S2\" }\nvolume_count = 2\n",
    );
    let report = errors(eval(dir.path(), &[redirect]));
    assert!(report.contains("configmap/kvstrap/redirect:2:1: error: a policy fragment from the cluster may not set [kubernetes] cluster_may_wipe"), "{report}");
    assert!(
        report.contains("configmap/kvstrap/redirect:5:1: error: disk group \"g\" may wipe disks"),
        "{report}"
    );
    // Sizing of that group is not about which disks: allowed.
    let sizing = fragment("sizing", "[[disk_group]]\nname = \"g\"\nvolume_count = 2\n");
    eval(dir.path(), &[sizing]).expect("sizing may change");
}

#[test]
fn the_loader_reads_the_cached_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, BASE).expect("write");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let p = load_with_cluster(Some(&policy), &state).expect("no cache: local only");
    assert_eq!(p.sources.len(), 1);
    let cache = ClusterCache::new(
        "w1",
        BTreeMap::new(),
        vec![fragment(
            "fleet",
            "[[storage_class]]\nname = \"from-cluster\"\n",
        )],
    );
    std::fs::write(cache_path(&state), cache.to_json()).expect("write");
    let p = load_with_cluster(Some(&policy), &state).expect("with cache");
    let names: Vec<&str> = p.storage_classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["from-cluster", "local"]);
    // The same check the fetcher runs before it caches.
    let again = evaluate_cluster(Some(&policy), &cache.fragments).expect("valid");
    assert_eq!(again, p);
}

#[test]
fn every_key_the_parser_knows_is_on_the_allow_list_and_in_the_docs() {
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fleet.md"))
        .expect("docs/fleet.md");
    let known = kvstrap::policy::known_keys();
    assert!(known.len() > 40, "{known:?}");
    for key in &known {
        let origin = kvstrap::policy::origin(key).unwrap_or_else(|| {
            panic!("{key} is not in policy::remote::ORIGINS: say whether the cluster may set it")
        });
        let yes_no = match origin {
            kvstrap::policy::Origin::Cluster => "yes",
            kvstrap::policy::Origin::NodeOnly => "no",
        };
        assert!(
            docs.contains(&format!("| `{key}` | {yes_no} |")),
            "docs/fleet.md has no row \"| `{key}` | {yes_no} |\""
        );
    }
    for (key, _) in kvstrap::policy::ORIGINS {
        assert!(
            known.contains(&key.to_string()),
            "{key} is on the allow-list but the parser does not know it"
        );
    }
}

/// A fragment that sets `path` (a table, or a key of one) to a string.
fn setting(path: &str) -> String {
    match path.split_once('.') {
        None => format!("[{path}]\n"),
        Some((table, key)) => format!("[{table}]\n{key} = \"x\"\n"),
    }
}

#[test]
fn a_fragment_setting_any_node_only_key_is_refused_whole_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/kvstrap/policy.toml", BASE);
    // Node-only keys of the node's own tables; the one inside groups (the key file) has a
    // test of its own below.
    let node_only: Vec<&str> = kvstrap::policy::ORIGINS
        .iter()
        .filter(|(_, o)| *o == kvstrap::policy::Origin::NodeOnly)
        .map(|(k, _)| *k)
        .filter(|k| !k.starts_with("disk_group."))
        .collect();
    assert!(node_only.contains(&"metrics.textfile") && node_only.contains(&"node.storage_root"));
    for key in node_only {
        // Beside a class that alone would be fine: the fragment goes as a whole.
        let text = format!("{}[[storage_class]]\nname = \"ok\"\n", setting(key));
        let report = errors(eval(dir.path(), &[fragment("x", &text)]));
        let shown = match key.split_once('.') {
            Some((t, k)) => format!("[{t}] {k}"),
            None => format!("[{key}]"),
        };
        let line = if key.contains('.') { "2:1" } else { "1:2" };
        assert!(
            report.contains(&format!(
                "configmap/kvstrap/x:{line}: error: a policy fragment from the cluster may not set {shown}"
            )),
            "{key}: {report}"
        );
    }
    // The attacks of the review, one by one.
    for (text, what) in [
        (
            "[metrics]\ntextfile = \"/etc/shadow\"\n",
            "[metrics] textfile",
        ),
        ("[node]\nname = \"other-node\"\n", "[node] name"),
        (
            "[node]\nstorage_root = \"/var/lib/kubelet/x\"\n",
            "[node] storage_root",
        ),
        ("[health]\ninterval = 1\n", "[health] interval"),
        ("[metrics]\nlisten = \"0.0.0.0:9100\"\n", "[metrics] listen"),
    ] {
        let report = errors(eval(dir.path(), &[fragment("attack", text)]));
        assert!(report.contains(&format!("may not set {what}")), "{report}");
    }
    // What fragments are for still works.
    let fine = fragment(
        "fine",
        "[[storage_class]]\nname = \"fast\"\nfs_type = \"ext4\"\nmount_options = [\"noatime\"]\n[[disk_group]]\nname = \"g\"\nvolume_count = 3\nreserve = \"10%\"\nowner = { uid = 107, gid = 107, mode = \"0750\" }\nmatch = { transport = \"nvme\" }\n",
    );
    eval(dir.path(), &[fine]).expect("classes and groups are the cluster's to describe");
}

#[test]
fn a_cached_layer_that_no_longer_validates_is_left_out_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, BASE).expect("write");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    // Cached when it was fine; since then this kvstrap refuses [metrics] from the cluster
    // (or the node's own files changed under it).
    let cache = ClusterCache::new(
        "w1",
        BTreeMap::new(),
        vec![fragment(
            "old",
            "[metrics]\ntextfile = \"/etc/shadow\"\n[[storage_class]]\nname = \"from-cluster\"\n",
        )],
    );
    std::fs::write(cache_path(&state), cache.to_json()).expect("write");
    let p = load_with_cluster(Some(&policy), &state).expect("the node's own files still load");
    let names: Vec<&str> = p.storage_classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["local"], "the cluster layer is left out");
    assert_eq!(p.metrics, Default::default(), "nothing of it is taken");
    let why = p.cluster_layer_dropped.expect("it says why");
    assert!(
        why.contains("configmap/kvstrap/old:2:1") && why.contains("[metrics] textfile"),
        "{why}"
    );
    // A candidate set is still refused as a whole (the watcher never caches it).
    assert!(evaluate_cluster(Some(&policy), &cache.fragments).is_err());
}

#[test]
fn a_fragment_may_ask_for_tpm2_encryption_but_never_name_a_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/kvstrap/policy.toml", BASE);
    let tpm2 = fragment(
        "encrypt",
        "[[disk_group]]\nname = \"g\"\nencryption = { method = \"tpm2\", tpm2_pcrs = [7, 14] }\n",
    );
    let p = eval(dir.path(), &[tpm2]).expect("asking for TPM2 encryption is the cluster's to say");
    let e = p.disk_groups[0].encryption.as_ref().expect("encrypted");
    assert_eq!(
        (
            e.method.as_str(),
            e.tpm2_pcrs.as_slice(),
            e.key_file.as_ref()
        ),
        ("tpm2", &[7u8, 14][..], None)
    );
    // A key file named from a distance: refused whole, at the key, whatever the file is.
    let key = fragment(
        "key",
        "[[disk_group]]\nname = \"g\"\nencryption = { method = \"key-file\", key_file = \"/etc/shadow\" }\n",
    );
    let report = errors(eval(dir.path(), &[key]));
    assert!(
        report.contains(
            "configmap/kvstrap/key:3:37: error: a policy fragment from the cluster may not set disk_group.encryption.key_file"
        ),
        "{report}"
    );
    // A key-file method without the node's own key file is incomplete, not a hole.
    let method_only = fragment(
        "method",
        "[[disk_group]]\nname = \"g\"\nencryption = { method = \"key-file\" }\n",
    );
    let report = errors(eval(dir.path(), &[method_only]));
    assert!(
        report.contains("has method = \"key-file\" but no \"key_file\""),
        "{report}"
    );
}
