//! The daemon takes disks out of service: D-Bus `Drain` and `Undrain` (root only) on the
//! real engine, and `on_failure = "drain"` when a fake `smartctl` on PATH reports a disk
//! failed (root, a private bus, loop devices this test creates).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod daemon_support;

use common::LoopDisk;
use daemon_support::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The `service` field D-Bus `Disks` shows for a disk (`draining`, `drained`, or "").
fn service_of(bus: &TestBus, disk: &Path) -> String {
    bus.read_json("Disks")["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["path"] == disk.display().to_string())
        .and_then(|d| d["service"].as_str().map(String::from))
        .unwrap_or_default()
}

fn volumes_on(bus: &TestBus, disk: &Path) -> usize {
    bus.read_json("Volumes")["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["disk"] == disk.display().to_string())
        .count()
}

fn mounted_from(storage: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(storage))
        })
        .count()
}

#[test]
fn drain_over_dbus_and_on_failure_drain_root() {
    let test = "drain_over_dbus_and_on_failure_drain_root";
    if !can_run(test) {
        return;
    }
    let (a, b) = (LoopDisk::new(512 << 20), LoopDisk::new(512 << 20));
    let bin = tempfile::tempdir().unwrap();
    fake_smartctl(bin.path(), "sata-healthy.json");
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[node]\nname = \"drain-test\"\nstorage_root = {:?}\n\n[health]\ninterval = \"1s\"\n\n\
             [[storage_class]]\nname = \"c\"\nfs_type = \"ext4\"\n\n[[disk_group]]\nname = \"lab\"\n\
             storage_class = \"c\"\nlayout = \"separate\"\nvolume_count = 2\n\
             devices = [{:?}, {:?}]\nallow_loop = true\non_failure = \"drain\"\n",
            storage.display().to_string(),
            a.path.display().to_string(),
            b.path.display().to_string(),
        ),
    )
    .unwrap();
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
    cmd.arg("--policy").arg(&policy).arg("daemon");
    let path_env = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let daemon = DaemonProcess::spawn_full(
        cmd,
        tempfile::tempdir().unwrap(),
        policy.clone(),
        &bus,
        &notify,
        &[("PATH", &path_env), ("KVSTRAP_UEVENTS", "0")],
        &[],
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(120)),
        "{}",
        daemon.stderr()
    );
    assert_eq!(volumes_on(&bus, &a.path), 2, "{}", daemon.stderr());
    assert_eq!(mounted_from(&storage), 4);

    // Only root may drain: the bus policy refuses anyone else.
    let a_path = a.path.display().to_string();
    let refused = bus.send_as(
        NOBODY,
        &["org.kvstrap.Bootstrap1.Drain", &format!("string:{a_path}")],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("AccessDenied"),
        "{}",
        text(&refused)
    );
    let unknown = bus.send_as(0, &["org.kvstrap.Bootstrap1.Drain", "string:/dev/nonesuch"]);
    assert!(
        text(&unknown).contains("org.kvstrap.Bootstrap1.Error.DiskRefused"),
        "{}",
        text(&unknown)
    );
    assert_eq!(
        service_of(&bus, &a.path),
        "",
        "a refused drain changes nothing"
    );

    let drained = bus.send_as(
        0,
        &["org.kvstrap.Bootstrap1.Drain", &format!("string:{a_path}")],
    );
    assert!(drained.status.success(), "{}", text(&drained));
    assert!(text(&drained).contains("draining"), "{}", text(&drained));
    assert!(
        eventually(Duration::from_secs(30), || service_of(&bus, &a.path)
            == "drained"
            && volumes_on(&bus, &a.path) == 0
            && mounted_from(&storage) == 2),
        "A never drained:\n{}",
        daemon.stderr()
    );
    assert_eq!(volumes_on(&bus, &b.path), 2);

    let back = bus.send_as(
        0,
        &[
            "org.kvstrap.Bootstrap1.Undrain",
            &format!("string:{a_path}"),
        ],
    );
    assert!(back.status.success(), "{}", text(&back));
    assert!(
        eventually(Duration::from_secs(30), || service_of(&bus, &a.path)
            .is_empty()
            && volumes_on(&bus, &a.path) == 2
            && mounted_from(&storage) == 4),
        "A never came back:\n{}",
        daemon.stderr()
    );

    // Both disks report failed; the group says on_failure = "drain": both are drained
    // without anyone asking, and stay intact.
    set_fixture(bin.path(), "sata-failing.json");
    assert!(
        eventually(Duration::from_secs(60), || service_of(&bus, &a.path)
            == "drained"
            && service_of(&bus, &b.path) == "drained"
            && mounted_from(&storage) == 0),
        "failed disks were not drained:\n{}",
        daemon.stderr()
    );
    assert!(
        daemon
            .stderr()
            .contains("health failed (on_failure = \\\"drain\\\")")
            || daemon
                .stderr()
                .contains("health failed (on_failure = \"drain\")"),
        "{}",
        daemon.stderr()
    );
}
