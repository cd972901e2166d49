//! The daemon reads disk health off the apply path and shows it: a fake `smartctl` on
//! PATH reports a loop disk healthy, then failing. D-Bus `Disks` carries the health as
//! soon as it is read, without a run; the log says when it changed; the metrics file and
//! the HTTP endpoint follow at the next run (root, a private bus, a loop device this test
//! creates).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod daemon_support;

use common::promtool::value;
use common::LoopDisk;
use daemon_support::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn fixture(name: &str) -> String {
    manifest_path("tests/fixtures/smartctl")
        .join(name)
        .display()
        .to_string()
}

/// A `smartctl` that prints the fixture named in the file `current` beside it, with the
/// exit status the real one gives for it.
fn fake_smartctl(dir: &Path) -> PathBuf {
    let script = "#!/bin/sh\nf=$(cat \"$(dirname \"$0\")/current\")\ncat \"$f\"\ncase \"$f\" in *failing*) exit 8;; esac\n";
    let path = dir.join("smartctl");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("current"), fixture("sata-healthy.json")).unwrap();
    path
}

fn health_of(bus: &TestBus, disk: &Path) -> String {
    let doc = bus.read_json("Disks");
    doc["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["path"] == disk.display().to_string())
        .and_then(|d| d["health"]["assessment"].as_str().map(String::from))
        .unwrap_or_default()
}

fn http_get(addr: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_daemon_reads_health_and_shows_its_changes() {
    let test = "the_daemon_reads_health_and_shows_its_changes";
    if !can_run(test) {
        return;
    }
    let disk = LoopDisk::new(512 << 20);
    let bin = tempfile::tempdir().unwrap();
    fake_smartctl(bin.path());
    let work = tempfile::tempdir().unwrap();
    let prom = work.path().join("kvstrap.prom");
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[node]\nname = \"health-test\"\nstorage_root = {:?}\n\n[health]\ninterval = \"1s\"\n\n\
             [metrics]\ntextfile = {:?}\nlisten = \"127.0.0.1:0\"\n\n\
             [[storage_class]]\nname = \"c\"\n\n[[disk_group]]\nname = \"lab\"\nstorage_class = \"c\"\n\
             devices = [{:?}]\nallow_loop = true\nquota = \"if-supported\"\n",
            work.path().join("storage").display().to_string(),
            prom.display().to_string(),
            disk.path.display().to_string(),
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

    assert!(
        eventually(Duration::from_secs(30), || health_of(&bus, &disk.path)
            == "passed"),
        "D-Bus Disks never showed the disk passed:\n{}",
        daemon.stderr()
    );
    // The metrics follow at the next run.
    let apply =
        || assert!(text(&bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"])).contains("success"));
    apply();
    let passed = || {
        let metrics = std::fs::read_to_string(&prom).unwrap_or_default();
        value(&metrics, "kvstrap_disks_health{health=\"passed\"}") == Some(1.0)
    };
    assert!(
        eventually(Duration::from_secs(30), passed),
        "{}",
        std::fs::read_to_string(&prom).unwrap_or_default()
    );
    let addr = daemon
        .stderr()
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .map(String::from)
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", daemon.stderr()));
    assert!(http_get(&addr).contains("kvstrap_disks_health{health=\"passed\"} 1\n"));

    // The disk starts failing: the next reading (1 s) finds it.
    std::fs::write(bin.path().join("current"), fixture("sata-failing.json")).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || health_of(&bus, &disk.path)
            == "failed"),
        "D-Bus Disks never showed the disk failed:\n{}",
        daemon.stderr()
    );
    let said = format!(
        "health of {} changed from passed to failed",
        disk.path.display()
    );
    assert!(daemon.stderr().contains(&said), "{}", daemon.stderr());
    apply();
    let failed = format!(
        "kvstrap_disk_health{{disk=\"{}\",group=\"lab\",health=\"failed\"}} 1\n",
        disk.path.display()
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&prom)
                .unwrap_or_default()
                .contains(&failed)
        }),
        "{}",
        std::fs::read_to_string(&prom).unwrap_or_default()
    );
    assert!(http_get(&addr).contains(&failed));
}
