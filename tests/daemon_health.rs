//! The daemon reads disk health off the apply path and shows it: a fake `smartctl` on
//! PATH reports a loop disk healthy, then failing. D-Bus `Disks` carries the health as
//! soon as it is read, without a run; the log says when it changed; the metrics file and
//! the HTTP endpoint follow at the next run (root, a private bus, a loop device this test
//! creates). With the control plane's binaries (`tests/support/control_plane.rs`), the
//! Node's condition `KvstrapDisksHealthy` and its `DiskFailed` Event follow the reading
//! too, without a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
mod daemon_support;

use common::promtool::value;
use common::LoopDisk;
use daemon_support::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

fn create_node(cp: &control_plane::ControlPlane, name: &str) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["create", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let node =
        format!("{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"{name}\"}}}}");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(node.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// Waits (30 s at most) for the Node's `KvstrapDisksHealthy` to have `status` and
/// `reason`; panics with what it had.
fn node_health_becomes(cp: &control_plane::ControlPlane, status: &str, reason: &str) {
    let mut last = serde_json::Value::Null;
    let reached = eventually(Duration::from_secs(30), || {
        let node: serde_json::Value =
            serde_json::from_str(&cp.get("/api/v1/nodes/health-test").unwrap_or_default())
                .unwrap_or_default();
        let conditions = node["status"]["conditions"].as_array().cloned();
        last = conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c["type"] == "KvstrapDisksHealthy")
            .unwrap_or_default();
        last["status"] == status && last["reason"] == reason
    });
    assert!(
        reached,
        "KvstrapDisksHealthy never {status} {reason}: {last}"
    );
}

#[test]
fn the_daemon_reads_health_and_shows_its_changes() {
    let test = "the_daemon_reads_health_and_shows_its_changes";
    if !can_run(test) {
        return;
    }
    let disk = LoopDisk::new(512 << 20);
    let bin = tempfile::tempdir().unwrap();
    fake_smartctl(bin.path(), "sata-healthy.json");
    let work = tempfile::tempdir().unwrap();
    let prom = work.path().join("kvstrap.prom");
    let policy = work.path().join("policy.toml");
    // The Node part needs the control plane; without its binaries the rest still runs.
    let cp = control_plane::start_or_skip(test);
    let kubernetes = match &cp {
        Some(cp) => {
            create_node(cp, "health-test");
            format!(
                "[kubernetes]\npublish = true\nkubeconfig = {:?}\n\n",
                cp.kubeconfig.display().to_string()
            )
        }
        None => String::new(),
    };
    std::fs::write(
        &policy,
        kubernetes
            + &format!(
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
    if let Some(cp) = &cp {
        node_health_becomes(cp, "True", "DisksHealthy");
    }
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
    set_fixture(bin.path(), "sata-failing.json");
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
    // On the Node before any run: the condition and one Event.
    if let Some(cp) = &cp {
        node_health_becomes(cp, "False", "DiskFailed");
        let events = cp
            .get("/api/v1/namespaces/default/events?fieldSelector=reason%3DDiskFailed")
            .unwrap_or_default();
        let disk = disk.path.display().to_string();
        assert!(
            events.contains(&format!("disk {disk} is failing")),
            "{events}"
        );
    }
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

/// The reading D-Bus `Disks` shows for `disk`: its `read_unix`, when it has one.
fn read_time(bus: &TestBus, disk: &Path) -> Option<u64> {
    bus.read_json("Disks")["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["path"] == disk.display().to_string())
        .and_then(|d| d["health"]["read_unix"].as_u64())
}

/// Runs never read health (issue 23): with `[health] interval = "1h"`, smartctl runs once
/// for the disk when the daemon first finds it, and never for the runs after it (D-Bus
/// `Apply`). The reading is kept in the state directory with its time: a daemon started
/// again takes it up and runs smartctl not at all, and so does `kvstrap disks`; only
/// `kvstrap disks --health` reads now. Every run of smartctl asks it not to wake the disk.
#[test]
fn runs_use_the_kept_reading_and_never_run_smartctl() {
    let test = "runs_use_the_kept_reading_and_never_run_smartctl";
    if !can_run(test) {
        return;
    }
    let disk = LoopDisk::new(512 << 20);
    let bin = tempfile::tempdir().unwrap();
    fake_smartctl(bin.path(), "sata-healthy.json");
    // Count the runs (and keep their arguments) in front of the fixture-printing fake.
    let calls = bin.path().join("calls");
    std::fs::rename(
        bin.path().join("smartctl"),
        bin.path().join("smartctl-fixture"),
    )
    .unwrap();
    std::fs::write(
        bin.path().join("smartctl"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls:?}\nexec \"$(dirname \"$0\")/smartctl-fixture\" \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.path().join("smartctl"),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    let runs = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[node]\nname = \"kept-health\"\nstorage_root = {:?}\n\n[health]\ninterval = \"1h\"\n\n\
             [[storage_class]]\nname = \"c\"\nfs_type = \"ext4\"\n\n[[disk_group]]\nname = \"lab\"\n\
             storage_class = \"c\"\nlayout = \"separate\"\nvolume_count = 1\n\
             devices = [{:?}]\nallow_loop = true\n",
            work.path().join("storage").display().to_string(),
            disk.path.display().to_string(),
        ),
    )
    .unwrap();
    let path_env = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", path_env.as_str()),
        ("KVSTRAP_UEVENTS", "0"),
        ("KVSTRAP_STATE_DIR", state.to_str().unwrap()),
    ];
    let bus = TestBus::start();
    let start = |notify: &NotifySocket| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("--policy").arg(&policy).arg("daemon");
        DaemonProcess::spawn_full(
            cmd,
            tempfile::tempdir().unwrap(),
            policy.clone(),
            &bus,
            notify,
            &env,
            &[],
        )
    };
    let apply = || {
        let out = bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"]);
        assert!(text(&out).contains("success"), "{}", text(&out));
    };

    let mut notify = NotifySocket::new();
    let daemon = start(&notify);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(120)),
        "{}",
        daemon.stderr()
    );
    assert!(
        eventually(Duration::from_secs(30), || health_of(&bus, &disk.path)
            == "passed"),
        "the disk was never read:\n{}",
        daemon.stderr()
    );
    let first = read_time(&bus, &disk.path);
    assert!(first.is_some(), "a reading has its time");
    for _ in 0..3 {
        apply();
    }
    assert_eq!(
        runs(),
        [format!("--json -a -n standby,3 {}", disk.path.display())],
        "one reading, whatever the runs:\n{}",
        daemon.stderr()
    );
    let kept = std::fs::read_to_string(state.join("health.json")).unwrap_or_default();
    assert!(kept.contains("\"passed\""), "{kept}");
    drop(daemon);

    // Started again within the hour: the kept reading, no smartctl.
    let mut notify = NotifySocket::new();
    let daemon = start(&notify);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(120)),
        "{}",
        daemon.stderr()
    );
    apply();
    assert!(
        eventually(Duration::from_secs(10), || read_time(&bus, &disk.path)
            == first),
        "the kept reading was not taken up:\n{}",
        daemon.stderr()
    );
    assert_eq!(runs().len(), 1, "{:?}\n{}", runs(), daemon.stderr());

    // `kvstrap disks` shows the kept reading and its age; `--health` reads now.
    let disks = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kvstrap"))
            .args(["--output", "json", "disks"])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .env("PATH", &path_env)
            .env("KVSTRAP_STATE_DIR", &state)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["path"] == disk.path.display().to_string())
            .map(|d| d["health"].clone())
            .unwrap_or_default()
    };
    let shown = disks(&[]);
    assert_eq!(shown["read_unix"].as_u64(), first, "{shown}");
    assert!(shown["age_seconds"].as_u64().is_some(), "{shown}");
    assert_eq!(runs().len(), 1);
    let now = disks(&["--health"]);
    assert_eq!(now["assessment"], "passed", "{now}");
    assert_eq!(runs().len(), 2, "--health reads now");
}
