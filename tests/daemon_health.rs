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
