//! Health and metrics of a loop-device apply (root): a fake `smartctl` on PATH reports
//! one disk healthy and one failing; `kvstrap disks --health` reads them and keeps the
//! reading, `kvstrap apply` writes the metrics file with it (never running smartctl),
//! which must pass promtool and say exactly what `kvstrap volumes` and `kvstrap disks`
//! say. The real smartctl finds no SMART on a loop device: `unknown`, never `failed`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, Node};
use common::promtool::{promtool, value};
use common::{require_root, LoopDisk};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smartctl")
        .join(name)
}

/// A directory with a `smartctl` that prints the healthy fixture for `healthy` (its last
/// argument) and the failing one (exit status 8, like the real one) for any other disk;
/// PATH with it first.
fn fake_smartctl(dir: &Path, healthy: &Path) -> String {
    let script = format!(
        "#!/bin/sh\nfor disk; do :; done\nif [ \"$disk\" = {:?} ]; then cat {:?}; else cat {:?}; exit 8; fi\n",
        healthy.display().to_string(),
        fixture("sata-healthy.json").display().to_string(),
        fixture("sata-failing.json").display().to_string(),
    );
    let path = dir.join("smartctl");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn run_ok(node: &Node, args: &[&str], path_env: &str) -> String {
    let out = node.kvstrap(args, &[("PATH", path_env)]);
    assert!(
        out.status.success(),
        "kvstrap {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `health` of `disk` in the output of `kvstrap disks -o json`.
fn health_in(disks_json: &str, disk: &LoopDisk) -> Value {
    let doc: Value = serde_json::from_str(disks_json).unwrap();
    doc["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == disk.path.display().to_string())
        .map(|d| d["health"].clone())
        .unwrap()
}

#[test]
fn apply_writes_metrics_that_match_disks_volumes_and_health() {
    let test = "apply_writes_metrics_that_match_disks_volumes_and_health";
    if !require_root(test) {
        return;
    }
    let (a, b) = (LoopDisk::new(512 * MIB), LoopDisk::new(512 * MIB));
    let bin = tempfile::tempdir().unwrap();
    let path_env = fake_smartctl(bin.path(), &a.path);
    let node = Node::new(&format!(
        "{}{}{}{}",
        class("x", "xfs", "Filesystem"),
        class("e", "ext4", "Filesystem"),
        group("shared", "x", "shared", &[&a], "volume_count = 2"),
        group("sep", "e", "separate", &[&b], "volume_count = 2"),
    ));
    let prom = node.dir.path().join("textfile/kvstrap.prom");
    let policy = node.dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        format!(
            "{text}\n[metrics]\ntextfile = {:?}\n",
            prom.display().to_string()
        ),
    )
    .unwrap();

    // The reading the apply puts in the metrics: `disks --health` reads now and keeps it
    // (the daemon's monitor would, on a node).
    run_ok(&node, &["disks", "--health"], &path_env);
    run_ok(&node, &["apply"], &path_env);
    let metrics = std::fs::read_to_string(&prom).unwrap();
    if promtool(test, &["check", "metrics"], node.dir.path(), Some(&metrics)).is_none() {
        return;
    }
    let v = |text: &str, series: &str| {
        value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(v(&metrics, "kvstrap_disks{state=\"ours\"}"), 2.0);
    assert_eq!(v(&metrics, "kvstrap_disks_health{health=\"passed\"}"), 1.0);
    assert_eq!(v(&metrics, "kvstrap_disks_health{health=\"failed\"}"), 1.0);
    let failing = format!("disk=\"{}\"", b.path.display());
    assert_eq!(
        v(
            &metrics,
            &format!("kvstrap_disk_health{{{failing},group=\"sep\",health=\"failed\"}}")
        ),
        1.0
    );
    assert_eq!(
        v(
            &metrics,
            &format!("kvstrap_disk_pending_sectors{{{failing}}}")
        ),
        1184.0
    );
    assert_eq!(v(&metrics, "kvstrap_apply_runs_total"), 1.0);
    assert_eq!(v(&metrics, "kvstrap_apply_failures_total"), 0.0);
    assert!(v(&metrics, "kvstrap_last_successful_apply_timestamp_seconds") > 1.7e9);
    // One xfs for the shared disk, one ext4 per separate volume.
    assert_eq!(
        v(
            &metrics,
            "kvstrap_step_duration_seconds_count{action=\"make_filesystem\"}"
        ),
        3.0
    );

    // Every volume `kvstrap volumes` lists, with its capacity; the separate volumes are
    // their own mounted filesystems, so their used bytes are known.
    let volumes: Value =
        serde_json::from_str(&run_ok(&node, &["volumes", "-o", "json"], &path_env)).unwrap();
    let volumes = volumes["volumes"].as_array().unwrap().clone();
    assert_eq!(volumes.len(), 4);
    let series = |metric: &str, vol: &Value| {
        format!(
            "{metric}{{volume={},storage_class={},group={},disk={}}}",
            vol["name"], vol["storage_class"], vol["group"], vol["disk"]
        )
    };
    for vol in &volumes {
        assert_eq!(
            v(&metrics, &series("kvstrap_volume_capacity_bytes", vol)),
            vol["capacity_bytes"].as_f64().unwrap()
        );
    }
    for class in ["x", "e"] {
        assert_eq!(
            v(
                &metrics,
                &format!("kvstrap_volumes{{storage_class=\"{class}\",state=\"ready\"}}")
            ),
            2.0
        );
    }
    let sep = volumes.iter().find(|v| v["group"] == "sep").unwrap();
    let used_before = v(&metrics, &series("kvstrap_volume_used_bytes", sep));
    assert!(used_before > 0.0);

    // A run with nothing to do writes nothing, not even the metrics.
    let data = PathBuf::from(sep["path"].as_str().unwrap()).join("data");
    std::fs::write(&data, vec![7u8; 8 << 20]).unwrap();
    nix::unistd::sync();
    run_ok(&node, &["apply"], &path_env);
    assert_eq!(std::fs::read_to_string(&prom).unwrap(), metrics);
    // A run that changes something (a volume unmounted behind kvstrap's back is mounted
    // again) counts, and sees the 8 MiB written into a volume.
    let shared = volumes.iter().find(|v| v["group"] == "shared").unwrap();
    let shared_mount = Path::new(shared["path"].as_str().unwrap())
        .parent()
        .unwrap();
    assert!(std::process::Command::new("umount")
        .arg(shared_mount)
        .status()
        .unwrap()
        .success());
    run_ok(&node, &["apply"], &path_env);
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert_eq!(v(&metrics, "kvstrap_apply_runs_total"), 2.0);
    let used_after = v(&metrics, &series("kvstrap_volume_used_bytes", sep));
    assert!(
        used_after - used_before >= (8 * MIB) as f64,
        "{used_before} -> {used_after}"
    );

    // `kvstrap disks`: health in the JSON and in a column, only for the selected disks.
    let disks = run_ok(&node, &["disks", "-o", "json"], &path_env);
    let health_of = |disk: &LoopDisk| health_in(&disks, disk);
    assert_eq!(health_of(&a)["assessment"], "passed");
    assert_eq!(health_of(&b)["assessment"], "failed");
    assert_eq!(health_of(&b)["reallocated_sectors"], 61432);
    let table = run_ok(&node, &["disks"], &path_env);
    assert!(table.lines().next().unwrap().contains("HEALTH"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&b.path.display().to_string()))
        .unwrap();
    assert!(row.contains(" failed "), "{row}");
}

/// The real smartctl on a loop device: no SMART there, so `unknown`, never `failed`.
#[test]
fn a_loop_device_has_unknown_health_with_the_real_smartctl() {
    let test = "a_loop_device_has_unknown_health_with_the_real_smartctl";
    if !require_root(test) {
        return;
    }
    if !common::require_tool(test, "smartctl", "smartmontools") {
        return;
    }
    let a = LoopDisk::new(512 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("x", "xfs", "Filesystem"),
        group("g", "x", "shared", &[&a], "volume_count = 1")
    ));
    let path_env = std::env::var("PATH").unwrap_or_default();
    let health = health_in(
        &run_ok(&node, &["disks", "--health", "-o", "json"], &path_env),
        &a,
    );
    assert_eq!(health["assessment"], "unknown", "{health}");
    assert!(
        health["detail"]
            .as_str()
            .unwrap()
            .contains("Unable to detect device type"),
        "{health}"
    );
}
