//! The metrics text passes `promtool check metrics`; the alert rules in
//! packaging/monitoring pass `promtool check rules` and their unit tests; the dashboard
//! and the rules ask only for metrics kvstrap writes. No root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::promtool::{promtool, value};
use kvstrap::health::smartctl;
use kvstrap::metrics::stats::RunStats;
use kvstrap::metrics::{render, DiskSample, Snapshot, VolumeSample};
use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A node with one disk of each recorded health, one unselected disk, two volumes and a
/// history of runs.
fn snapshot() -> Snapshot {
    let health = |f: &str| {
        let text = std::fs::read_to_string(repo(&format!("tests/fixtures/smartctl/{f}"))).unwrap();
        Some(smartctl::parse(&text))
    };
    let disk = |path: &str, state, f: Option<&str>| DiskSample {
        path: path.into(),
        state,
        group: f.map(|_| "hdd".to_string()),
        health: f.and_then(health),
        io: None,
        multipath: None,
    };
    // A SAN LUN's map with one of its two paths offline.
    let map = DiskSample {
        path: "/dev/mapper/mpatha".into(),
        state: "free",
        group: Some("san".into()),
        health: None,
        io: None,
        multipath: Some(kvstrap::model::Multipath {
            wwid: "35000c500a1b2c3d4".into(),
            kernel_name: "dm-0".into(),
            paths: ["sdc", "sdd"]
                .iter()
                .map(|p| kvstrap::model::MultipathPath {
                    name: (*p).into(),
                    state: if *p == "sdc" { "running" } else { "offline" }.into(),
                    active: *p == "sdc",
                })
                .collect(),
        }),
    };
    let mut stats = RunStats::default();
    let report: kvstrap::apply::ApplyReport = Default::default();
    stats.record(&report, 1_795_845_600);
    stats.record_error();
    let volume = |name: &str, state: &str, used| VolumeSample {
        name: name.into(),
        storage_class: "kubevirt-local".into(),
        group: "hdd".into(),
        disk: "/dev/sda".into(),
        state: state.into(),
        capacity_bytes: 100 << 30,
        used_bytes: used,
        encrypted: name.ends_with("-01"),
    };
    let measured = DiskSample {
        io: Some(kvstrap::model::IoFigures {
            random_read_iops: 412_000,
            seq_read_mib_s: 3100,
            measured_at: 1_795_845_000,
            class: kvstrap::model::IoClass::Fast,
        }),
        ..disk("/dev/nvme0n1", "free", Some("nvme-worn.json"))
    };
    Snapshot {
        disks: vec![
            disk("/dev/sda", "ours", Some("sata-healthy.json")),
            disk("/dev/sdb", "ours", Some("sata-failing.json")),
            measured,
            disk("/dev/loop3", "ours", Some("unsupported.json")),
            disk("/dev/vda", "in_use", None),
            map,
        ],
        volumes: vec![
            volume("hdd-1a2b3c4d-01", "ready", Some(7 << 30)),
            volume("hdd-1a2b3c4d-02", "pending", None),
        ],
        stats,
        publications_pending: 3,
        publication_errors: 2,
        pools: vec![kvstrap::metrics::PoolSample {
            group: "pool".into(),
            storage_class: "kubevirt-dynamic".into(),
            disk: "/dev/nvme1n1".into(),
            capacity_bytes: 800 << 30,
            used_bytes: 300 << 30,
            volumes: 12,
        }],
        luks_locked: 1,
    }
}

#[test]
fn metrics_text_passes_promtool_and_says_what_the_node_is() {
    let text = render(&snapshot());
    let dir = tempfile::tempdir().unwrap();
    let Some(said) = promtool(
        "metrics_text_passes_promtool",
        &["check", "metrics"],
        dir.path(),
        Some(&text),
    ) else {
        return;
    };
    assert!(said.trim().is_empty(), "promtool lint findings:\n{said}");
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(v("kvstrap_disks{state=\"ours\"}"), 3.0);
    assert_eq!(
        v("kvstrap_pool_used_bytes{group=\"pool\",storage_class=\"kubevirt-dynamic\",disk=\"/dev/nvme1n1\"}"),
        (300u64 << 30) as f64
    );
    assert_eq!(
        v("kvstrap_pool_volumes{group=\"pool\",storage_class=\"kubevirt-dynamic\",disk=\"/dev/nvme1n1\"}"),
        12.0
    );
    assert_eq!(v("kvstrap_disks{state=\"foreign\"}"), 0.0);
    assert_eq!(v("kvstrap_disks_health{health=\"failed\"}"), 2.0);
    assert_eq!(v("kvstrap_disks_health{health=\"unknown\"}"), 1.0);
    assert_eq!(
        v("kvstrap_disk_health{disk=\"/dev/sdb\",group=\"hdd\",health=\"failed\"}"),
        1.0
    );
    assert_eq!(
        v("kvstrap_disk_reallocated_sectors{disk=\"/dev/sdb\"}"),
        61432.0
    );
    assert_eq!(
        v("kvstrap_disk_endurance_used_ratio{disk=\"/dev/nvme0n1\"}"),
        1.07
    );
    assert_eq!(
        v("kvstrap_volumes{storage_class=\"kubevirt-local\",state=\"pending\"}"),
        1.0
    );
    assert_eq!(
        v("kvstrap_volume_used_bytes{volume=\"hdd-1a2b3c4d-01\",storage_class=\"kubevirt-local\",group=\"hdd\",disk=\"/dev/sda\"}"),
        (7u64 << 30) as f64
    );
    assert_eq!(
        v("kvstrap_volume_encrypted{volume=\"hdd-1a2b3c4d-01\",storage_class=\"kubevirt-local\",group=\"hdd\",disk=\"/dev/sda\"}"),
        1.0
    );
    assert_eq!(
        v("kvstrap_volume_encrypted{volume=\"hdd-1a2b3c4d-02\",storage_class=\"kubevirt-local\",group=\"hdd\",disk=\"/dev/sda\"}"),
        0.0
    );
    assert_eq!(v("kvstrap_luks_volumes_locked"), 1.0);
    assert_eq!(
        v("kvstrap_disk_random_read_iops{disk=\"/dev/nvme0n1\"}"),
        412_000.0
    );
    assert_eq!(
        v("kvstrap_disk_sequential_read_bytes_per_second{disk=\"/dev/nvme0n1\"}"),
        3100.0 * 1_048_576.0
    );
    assert_eq!(
        v("kvstrap_disk_io_class{disk=\"/dev/nvme0n1\",class=\"fast\"}"),
        1.0
    );
    assert_eq!(
        v("kvstrap_disk_io_class{disk=\"/dev/nvme0n1\",class=\"slow\"}"),
        0.0
    );
    assert!(
        !text.contains("kvstrap_disk_random_read_iops{disk=\"/dev/sda\""),
        "a disk never measured has no figure"
    );
    assert_eq!(
        v("kvstrap_multipath_state{disk=\"/dev/mapper/mpatha\",group=\"san\",state=\"degraded\"}"),
        1.0
    );
    assert_eq!(
        v("kvstrap_multipath_state{disk=\"/dev/mapper/mpatha\",group=\"san\",state=\"lost\"}"),
        0.0
    );
    assert_eq!(
        v("kvstrap_multipath_paths{disk=\"/dev/mapper/mpatha\",group=\"san\",state=\"failed\"}"),
        1.0
    );
    assert_eq!(v("kvstrap_apply_runs_total"), 2.0);
    assert_eq!(v("kvstrap_apply_failures_total"), 1.0);
    assert_eq!(v("kvstrap_publications_pending"), 3.0);
    assert!(
        !text.contains("disk=\"/dev/vda\""),
        "an unselected disk has no health"
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo("packaging/monitoring");
    let test = "alert_rules_pass_promtool";
    if promtool(test, &["check", "rules", "kvstrap-alerts.yml"], &dir, None).is_none() {
        return;
    }
    promtool(
        test,
        &["test", "rules", "kvstrap-alerts.test.yml"],
        &dir,
        None,
    );
}

/// Every `kvstrap_...` name the dashboard and the rules use is a family kvstrap writes
/// (or a histogram's `_bucket`).
#[test]
fn dashboard_and_rules_ask_only_for_metrics_kvstrap_writes() {
    let text = render(&snapshot());
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard =
        std::fs::read_to_string(repo("packaging/monitoring/kvstrap-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let rules = std::fs::read_to_string(repo("packaging/monitoring/kvstrap-alerts.yml")).unwrap();
    for source in [&dashboard, &rules] {
        let mut rest = source.as_str();
        while let Some(at) = rest.find("kvstrap_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let family = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                families.contains(&family),
                "{name} is not a metric kvstrap writes"
            );
        }
    }
}
