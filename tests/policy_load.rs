//! Loading: the shipped policies validate, drop-ins merge with systemd's rules, errors
//! name the file the offending value came from, and defaults are what the docs say.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::model::{FsType, Layout, Owner, VolumeMode};
use kvstrap::policy::{
    load, load_from_root, load_many, load_many_with_hostname, load_str, AccessMode, DiskGroup,
    DiskMatch, Policy, QuotaMode, ReclaimPolicy, VolumeSizing, Wipe, DEMO_POLICY, EXAMPLE_POLICY,
};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policy")
        .join(rel)
}

#[track_caller]
fn valid(file: &str, text: &str) -> Policy {
    match load_str(Path::new(file), text) {
        Ok(p) => p,
        Err(e) => panic!("{file} does not validate:\n{}", e.report()),
    }
}

#[test]
fn example_policy_validates_and_uses_every_key() {
    let p = valid("config/example.toml", EXAMPLE_POLICY);
    assert_eq!(p.node.name, "worker-07");
    assert!(p.kubernetes.publish);
    assert_eq!(p.storage_classes.len(), 2);
    assert_eq!(p.disk_groups.len(), 2);
    // Every key the validator knows appears in the example (commented-out counts).
    for key in [
        "name",
        "storage_root",
        "publish",
        "kubeconfig",
        "cluster_policy",
        "policy_namespace",
        "cluster_may_wipe",
        "volume_mode",
        "fs_type",
        "reclaim_policy",
        "access_modes",
        "mount_options",
        "binding_mode",
        "storage_class",
        "layout",
        "devices",
        "match",
        "transport",
        "rotational",
        "min_size",
        "max_size",
        "model",
        "vendor",
        "serial",
        "wwn",
        "max_disks",
        "volume_size",
        "volume_count",
        "reserve",
        "owner",
        "uid",
        "gid",
        "mode",
        "wipe",
        "allow_loop",
        "allow_removable",
        "quota",
        "interval",
        "textfile",
        "listen",
    ] {
        assert!(
            EXAMPLE_POLICY.contains(key),
            "example.toml does not document {key}"
        );
    }
}

#[test]
fn demo_policy_is_exactly_the_demo() {
    let p = valid("config/demo.toml", DEMO_POLICY);
    assert_eq!(p.node.name, "kvstrap-demo");
    assert_eq!(
        p.node.storage_root,
        PathBuf::from("/var/lib/kvstrap/storage")
    );
    assert!(!p.kubernetes.publish);
    let classes: Vec<(&str, VolumeMode, FsType)> = p
        .storage_classes
        .iter()
        .map(|c| (c.name.as_str(), c.volume_mode, c.fs_type))
        .collect();
    assert_eq!(
        classes,
        [
            ("kvstrap-demo-shared", VolumeMode::Filesystem, FsType::Xfs),
            (
                "kvstrap-demo-separate",
                VolumeMode::Filesystem,
                FsType::Ext4
            ),
            ("kvstrap-demo-block", VolumeMode::Block, FsType::Xfs),
        ]
    );
    let owner = Owner {
        uid: 107,
        gid: 107,
        mode: 0o750,
    };
    let group = |name: &str, class: &str, layout, devices: &[&str], sizing, reserve| DiskGroup {
        name: name.into(),
        storage_class: class.into(),
        layout,
        devices: devices.iter().map(|d| d.to_string()).collect(),
        matcher: DiskMatch::default(),
        max_disks: None,
        sizing,
        reserve_percent: reserve,
        owner: owner.clone(),
        on_failure: Default::default(),
        wipe: Wipe::Never,
        allow_loop: true,
        allow_removable: false,
        // The shared demo group provisions even where the kernel has no project quotas.
        quota: if layout == Layout::Shared {
            QuotaMode::IfSupported
        } else {
            QuotaMode::Required
        },
        provisioning: Default::default(),
        overcommit_permille: 1000,
        encryption: None,
    };
    assert_eq!(
        p.disk_groups,
        [
            group(
                "demo-shared",
                "kvstrap-demo-shared",
                Layout::Shared,
                &["/dev/loop0", "/dev/loop1"],
                VolumeSizing::Size(1_000_000_000),
                10
            ),
            group(
                "demo-separate",
                "kvstrap-demo-separate",
                Layout::Separate,
                &["/dev/loop2"],
                VolumeSizing::Count(4),
                0
            ),
            group(
                "demo-block",
                "kvstrap-demo-block",
                Layout::Separate,
                &["/dev/loop3"],
                VolumeSizing::Count(2),
                0
            ),
        ]
    );
}

#[test]
fn demo_devices_are_replaced_by_a_drop_in() {
    let dropin =
        "[[disk_group]]\nname = \"demo-shared\"\ndevices = [\"/dev/loop7\", \"/dev/loop8\"]\n\
                  [[disk_group]]\nname = \"demo-separate\"\ndevices = [\"/dev/loop9\"]\n\
                  [[disk_group]]\nname = \"demo-block\"\ndevices = [\"/dev/loop10\"]\n";
    let files = [
        (PathBuf::from("demo.toml"), DEMO_POLICY.to_string()),
        (PathBuf::from("90-demo-devices.toml"), dropin.to_string()),
    ];
    let p = load_many(&files).unwrap_or_else(|e| panic!("{}", e.report()));
    let devices: Vec<Vec<String>> = p.disk_groups.iter().map(|g| g.devices.clone()).collect();
    assert_eq!(
        devices,
        [
            vec!["/dev/loop7", "/dev/loop8"],
            vec!["/dev/loop9"],
            vec!["/dev/loop10"]
        ]
    );
    // Everything else of the groups is kept.
    assert_eq!(p.disk_groups[0].sizing, VolumeSizing::Size(1_000_000_000));
    assert_eq!(p.disk_groups[1].sizing, VolumeSizing::Count(4));
    assert!(p.disk_groups.iter().all(|g| g.allow_loop));
}

#[test]
fn devices_dropin_overrides_the_demo_devices() {
    let dropin = kvstrap::policy::devices_dropin(&[
        (
            "demo-shared",
            vec!["/dev/loop20".into(), "/dev/loop21".into()],
        ),
        ("demo-block", vec!["/dev/loop\"23".into()]),
    ]);
    let files = [
        (PathBuf::from("demo.toml"), DEMO_POLICY.to_string()),
        (PathBuf::from("devices.toml"), dropin),
    ];
    let e = load_many(&files).expect_err("a quote in a device path is not a device path");
    assert_eq!(e.diagnostics.len(), 1, "{}", e.report());
    assert!(e.diagnostics[0].message.contains("/dev/loop\"23"));
    let dropin = kvstrap::policy::devices_dropin(&[("demo-block", vec!["/dev/loop23".into()])]);
    let files = [
        (PathBuf::from("demo.toml"), DEMO_POLICY.to_string()),
        (PathBuf::from("devices.toml"), dropin),
    ];
    let p = load_many(&files).unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(p.disk_groups[2].devices, ["/dev/loop23"]);
    assert_eq!(p.disk_groups[0].devices, ["/dev/loop0", "/dev/loop1"]);
}

#[test]
fn design_example_validates() {
    let text = std::fs::read_to_string(fixture("design-example.toml")).expect("fixture");
    let p = valid("design-example.toml", &text);
    let nvme = &p.disk_groups[0];
    assert_eq!(nvme.matcher.transport.as_deref(), Some("nvme"));
    assert_eq!(nvme.matcher.rotational, Some(false));
    assert_eq!(nvme.matcher.min_size, Some(500_000_000_000));
    assert_eq!(nvme.max_disks, Some(4));
    assert_eq!(nvme.sizing, VolumeSizing::Size(100_000_000_000));
    assert_eq!(nvme.reserve_percent, 10);
    assert_eq!(
        p.kubernetes.kubeconfig,
        Some(PathBuf::from("/etc/kubernetes/kubelet.conf"))
    );
    assert_eq!(p.storage_classes[0].mount_options, ["noatime"]);
    assert_eq!(p.disk_groups[1].devices, ["/dev/loop*"]);
}

#[test]
fn defaults() {
    let text =
        "[[storage_class]]\nname = \"c\"\n[[disk_group]]\nname = \"g\"\nstorage_class = \"c\"\n";
    let files = [(PathBuf::from("p.toml"), text.to_string())];
    let p = load_many_with_hostname(&files, Some("Worker-07\n"))
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(p.node.name, "worker-07", "kubelet lower-cases the hostname");
    assert_eq!(
        p.node.storage_root,
        PathBuf::from("/var/lib/kvstrap/storage")
    );
    assert!(!p.kubernetes.publish);
    assert_eq!(p.kubernetes.kubeconfig, None);
    let c = &p.storage_classes[0];
    assert_eq!(
        (c.volume_mode, c.fs_type, c.reclaim_policy),
        (VolumeMode::Filesystem, FsType::Xfs, ReclaimPolicy::Delete)
    );
    assert_eq!(c.access_modes, [AccessMode::ReadWriteOnce]);
    assert!(c.mount_options.is_empty());
    assert_eq!(c.binding_mode, "WaitForFirstConsumer");
    let g = &p.disk_groups[0];
    assert_eq!(g.layout, Layout::Shared);
    assert!(g.devices.is_empty());
    assert_eq!(g.matcher, DiskMatch::default());
    assert_eq!(
        (g.max_disks, g.sizing, g.reserve_percent),
        (None, VolumeSizing::OnePerDisk, 0)
    );
    assert_eq!(
        g.owner,
        Owner {
            uid: 107,
            gid: 107,
            mode: 0o750
        }
    );
    assert_eq!(
        (g.wipe, g.allow_loop, g.allow_removable),
        (Wipe::Never, false, false)
    );
    assert_eq!(p.sources, [PathBuf::from("p.toml")]);
    assert_eq!(p.health.interval, std::time::Duration::from_secs(3600));
    assert_eq!(
        p.metrics.textfile.as_deref(),
        Some(std::path::Path::new(
            "/var/lib/prometheus/node-exporter/kvstrap.prom"
        ))
    );
    assert_eq!(p.metrics.listen, None);
    assert!(p.metrics.textfile_is_default);
}

#[test]
fn bad_hostname_as_default_node_name_is_reported() {
    let files = [(
        PathBuf::from("p.toml"),
        "[node]\nstorage_root = \"/srv\"\n".to_string(),
    )];
    let e = load_many_with_hostname(&files, Some("my_host")).expect_err("invalid");
    assert_eq!(e.diagnostics.len(), 1);
    assert!(e.diagnostics[0]
        .message
        .contains("the hostname (the default node name) \"my_host\""));
    assert_eq!(e.diagnostics[0].line, 1);
}

#[test]
fn system_locations_merge_with_systemd_rules() {
    let p = load_from_root(&fixture("dropins")).unwrap_or_else(|e| panic!("{}", e.report()));
    let root = fixture("dropins");
    let rel: Vec<String> = p
        .sources
        .iter()
        .map(|s| {
            s.strip_prefix(&root)
                .expect("below root")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        rel,
        [
            "etc/kvstrap/policy.toml",
            "usr/lib/kvstrap/policy.d/10-vendor.toml",
            "etc/kvstrap/policy.d/30-replaced.toml",
            "etc/kvstrap/policy.d/40-site.toml",
        ]
    );
    assert_eq!(p.node.name, "worker-07");
    assert_eq!(p.node.storage_root, PathBuf::from("/srv/kvstrap"));
    // 30-replaced.toml of /usr/lib (publish = true) was replaced by the /etc one.
    assert!(!p.kubernetes.publish);
    assert_eq!(
        p.kubernetes.kubeconfig,
        Some(PathBuf::from("/etc/kubernetes/admin.conf"))
    );
    let nvme = &p.disk_groups[0];
    assert_eq!(
        (nvme.name.as_str(), nvme.sizing, nvme.reserve_percent),
        ("nvme", VolumeSizing::Count(8), 5)
    );
    assert_eq!(nvme.matcher.transport.as_deref(), Some("nvme"));
    assert_eq!(p.disk_groups[1].name, "sata");
    assert_eq!(p.storage_classes[0].fs_type, FsType::Ext4);
}

#[test]
fn errors_point_at_the_file_the_value_came_from() {
    let files = [
        (
            PathBuf::from("/usr/lib/kvstrap/policy.d/10-vendor.toml"),
            "[[storage_class]]\nname = \"c\"\n[[disk_group]]\nname = \"g\"\nstorage_class = \"c\"\n".to_string(),
        ),
        (
            PathBuf::from("/etc/kvstrap/policy.d/50-site.toml"),
            "[[disk_group]]\nname = \"g\"\n\nreserve = \"200%\"\n".to_string(),
        ),
    ];
    let e = load_many(&files).expect_err("invalid");
    let shown: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(
        shown[0].starts_with(
            "/etc/kvstrap/policy.d/50-site.toml:4:11: error: reserve: 200% is more than 90%"
        ),
        "{}",
        shown[0]
    );
}

#[test]
fn a_later_file_may_override_a_name_that_the_same_file_may_not_repeat() {
    let group = "[[disk_group]]\nname = \"g\"\nstorage_class = \"c\"\n";
    let files = [
        (
            PathBuf::from("a.toml"),
            format!("[[storage_class]]\nname = \"c\"\n{group}"),
        ),
        (PathBuf::from("b.toml"), format!("{group}{group}")),
    ];
    let e = load_many(&files).expect_err("duplicate");
    assert_eq!(e.diagnostics.len(), 1);
    assert_eq!(
        (e.diagnostics[0].file.as_path(), e.diagnostics[0].line),
        (Path::new("b.toml"), 5)
    );
}

#[test]
fn syntax_errors_in_several_files_are_all_reported() {
    let files = [
        (PathBuf::from("a.toml"), "[node\n".to_string()),
        (PathBuf::from("b.toml"), "x = = 1\n".to_string()),
    ];
    let e = load_many(&files).expect_err("invalid");
    let at: Vec<(String, usize)> = e
        .diagnostics
        .iter()
        .map(|d| (d.file.display().to_string(), d.line))
        .collect();
    assert_eq!(at, [("a.toml".to_string(), 1), ("b.toml".to_string(), 1)]);
}

#[test]
fn explicit_file_and_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("10-main.toml"), DEMO_POLICY).expect("write");
    std::fs::write(
        dir.path().join("20-name.toml"),
        "[node]\nname = \"other\"\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("README"), "not a policy").expect("write");
    let p = load(Some(dir.path())).unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(p.node.name, "other");
    assert_eq!(p.sources.len(), 2);
    let p =
        load(Some(&dir.path().join("10-main.toml"))).unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(p.node.name, "kvstrap-demo");
}

#[test]
fn missing_policy_file_is_an_error_without_position() {
    let e = load(Some(Path::new("/nonexistent/policy.toml"))).expect_err("missing");
    assert_eq!(e.diagnostics.len(), 1);
    let shown = e.diagnostics[0].to_string();
    assert!(
        shown.starts_with("/nonexistent/policy.toml: error: cannot read the policy file"),
        "{shown}"
    );
}

#[test]
fn empty_directory_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load(Some(dir.path())).expect_err("empty");
    assert!(e.diagnostics[0].message.contains("holds no *.toml file"));
}
