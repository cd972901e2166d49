//! `kvstrap daemon` on the real engine, on loop devices this test creates and names
//! explicitly in the policy. Needs root (CI runs as root, so there they run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::NamedLoop;
#[path = "support/control_plane.rs"]
mod control_plane;
mod daemon_support;

use daemon_support::*;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn enabled(test: &str) -> bool {
    common::require_root(test) && can_run(test)
}

/// A policy that selects exactly `devices`, with its storage under `root`.
fn policy(root: &Path, devices: &[PathBuf]) -> String {
    let list: Vec<String> = devices
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    format!(
        r#"[node]
name = "daemon-test"
storage_root = "{root}"

[kubernetes]
publish = false

[[storage_class]]
name = "daemon-test"
volume_mode = "Filesystem"
fs_type = "xfs"
reclaim_policy = "Delete"
access_modes = ["ReadWriteOnce"]

[[disk_group]]
name = "lab"
storage_class = "daemon-test"
layout = "shared"
devices = [{list}]
allow_loop = true
volume_count = 4
# This CI machine's kernel has no XFS quotas; provision without them there.
quota = "if-supported"
"#,
        root = root.display(),
        list = list.join(", ")
    )
}

fn real_daemon(bus: &TestBus, notify: &NotifySocket, policy_text: &str) -> DaemonProcess {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy_text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
    cmd.arg("--policy").arg(&policy_path).arg("daemon");
    DaemonProcess::spawn(cmd, dir, policy_path, bus, notify)
}

fn volumes_on(bus: &TestBus, disk: &Path) -> Vec<serde_json::Value> {
    let out = bus.send_as(0, &["org.kvstrap.Bootstrap1.Volumes"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(json) = text
        .split_once('"')
        .and_then(|(_, rest)| rest.rsplit_once('"'))
        .map(|(j, _)| j.to_string())
    else {
        return Vec::new();
    };
    let value: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    value["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v["disk"] == disk.display().to_string())
        .collect()
}

#[test]
fn hot_plugged_disk_is_provisioned_within_two_seconds() {
    if !enabled("hot_plugged_disk_is_provisioned_within_two_seconds") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut disk = NamedLoop::reserve(work.path(), 1 << 30);
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = real_daemon(
        &bus,
        &notify,
        &policy(&work.path().join("storage"), &[disk.path.clone()]),
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(30)),
        "{}",
        daemon.stderr()
    );

    let plugged = Instant::now();
    disk.attach();
    let ready = eventually(Duration::from_secs(2), || {
        let v = volumes_on(&bus, &disk.path);
        !v.is_empty() && v.iter().all(|v| v["state"] == "ready")
    });
    assert!(
        ready,
        "{} not provisioned {:?} after it appeared\n{}",
        disk.path.display(),
        plugged.elapsed(),
        daemon.stderr()
    );
    // The rendered manifests live in the state directory (publish = false renders only).
    let state = daemon.dir.path().join("state");
    let rendered = walk(&state).into_iter().any(|p| {
        p.extension().is_some_and(|e| e == "yaml" || e == "json")
            && p.starts_with(state.join("manifests"))
    });
    assert!(rendered, "no manifest rendered under {}", state.display());
}

#[test]
fn sigterm_during_apply_leaves_disks_the_next_run_adopts() {
    if !enabled("sigterm_during_apply_leaves_disks_the_next_run_adopts") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disks = [
        common::LoopDisk::new(1 << 30),
        common::LoopDisk::new(1 << 30),
    ];
    let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
    let policy_text = policy(&work.path().join("storage"), &paths);
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let mut daemon = real_daemon(&bus, &notify, &policy_text);
    assert!(
        notify.wait_for("STATUS=applying the policy", Duration::from_secs(30)),
        "{}",
        daemon.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(60))
        .expect("daemon did not stop");
    assert!(status.success(), "{status:?}\n{}", daemon.stderr());

    // The next run (the CLI, same lock and state) adopts what the interrupted one left.
    let kvstrap = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvstrap"))
            .arg("--policy")
            .arg(&daemon.sim)
            .args(args)
            .env("KVSTRAP_LOCK", daemon.dir.path().join("lock"))
            .env("KVSTRAP_STATE_DIR", daemon.dir.path().join("state"))
            .output()
            .unwrap()
    };
    let apply = kvstrap(&["apply"]);
    assert!(apply.status.success(), "{}", text(&apply));
    let plan = kvstrap(&["plan", "--output", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(
        plan["steps"].as_array().map(Vec::len),
        Some(0),
        "converged: {plan}"
    );
    assert_eq!(
        plan["refused"].as_array().map(Vec::len),
        Some(0),
        "nothing left alone: {plan}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_failed_disk_is_named_in_status_and_its_volumes_are_never_rendered() {
    if !enabled("a_failed_disk_is_named_in_status_and_its_volumes_are_never_rendered") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disks = [
        common::LoopDisk::new(1 << 30),
        common::LoopDisk::new(1 << 30),
    ];
    let (good, bad) = (&disks[0].path, &disks[1].path);
    let policy_path = work.path().join("policy.toml");
    std::fs::write(
        &policy_path,
        policy(&work.path().join("storage"), &[good.clone(), bad.clone()]),
    )
    .unwrap();
    // Where the planner will mount the second disk, a file: its mount step fails (EEXIST,
    // not a device settling, so no retry) and its volumes are never ready.
    let plan = Command::new(env!("CARGO_BIN_EXE_kvstrap"))
        .arg("--policy")
        .arg(&policy_path)
        .args(["plan", "--output", "json"])
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let mountpoint = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "mount" && s["disk"] == bad.display().to_string())
        .and_then(|s| s["mountpoint"].as_str())
        .map(PathBuf::from)
        .expect("a mount step for the second disk");
    std::fs::create_dir_all(mountpoint.parent().unwrap()).unwrap();
    std::fs::write(&mountpoint, "in the way\n").unwrap();
    let volumes_of = |disk: &Path| -> Vec<String> {
        plan["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["volumes"].as_array().cloned().unwrap_or_default())
            .filter(|v| v["disk"] == disk.display().to_string())
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (good_volumes, bad_volumes) = (volumes_of(good), volumes_of(bad));
    assert_eq!((good_volumes.len(), bad_volumes.len()), (4, 4), "{plan}");

    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = real_daemon(
        &bus,
        &notify,
        &std::fs::read_to_string(&policy_path).unwrap(),
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(60)),
        "{:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    let ready = notify.seen.iter().position(|l| l == "READY=1").unwrap();
    let status = notify.seen[..ready]
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS=ready:"))
        .cloned()
        .unwrap_or_default();
    let expected = format!(
        "STATUS=ready: 1 disk(s), 4 volume(s); failed: 1 disk(s) ({}: ",
        bad.display()
    );
    assert!(status.starts_with(&expected), "{status}\n{:?}", notify.seen);
    assert!(
        !notify.seen.iter().any(|l| l.contains("; retrying in ")),
        "a lasting failure is not retried: {:?}",
        notify.seen
    );

    let manifests = daemon.dir.path().join("state/manifests");
    let rendered: Vec<String> = std::fs::read_dir(&manifests)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for v in &good_volumes {
        let pv = format!(
            "pv-{}.yaml",
            kvstrap::kube::builders::pv_name("daemon-test", v)
        );
        assert!(rendered.contains(&pv), "{pv} not in {rendered:?}");
    }
    for v in &bad_volumes {
        let pv = format!(
            "pv-{}.yaml",
            kvstrap::kube::builders::pv_name("daemon-test", v)
        );
        assert!(
            !rendered.contains(&pv),
            "{pv} rendered for a volume that is not ready"
        );
    }
}

#[test]
fn a_disk_held_busy_at_start_is_retried_before_ready() {
    if !enabled("a_disk_held_busy_at_start_is_retried_before_ready") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disk = common::LoopDisk::new(1 << 30);
    // Something (udev's blkid, say) holds the whole disk exclusively while the daemon
    // starts: its partition cannot be opened O_EXCL for mkfs (EBUSY) until it lets go.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&disk.path)
        .unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    });
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = real_daemon(
        &bus,
        &notify,
        &policy(
            &work.path().join("storage"),
            std::slice::from_ref(&disk.path),
        ),
    );
    let got_ready = notify.wait_for("READY=1", Duration::from_secs(60));
    release.join().unwrap();
    assert!(got_ready, "{:?}\n{}", notify.seen, daemon.stderr());
    let ready = notify.seen.iter().position(|l| l == "READY=1").unwrap();
    let before = &notify.seen[..ready];
    assert!(
        before.iter().any(|l| l.contains("; retrying in ")),
        "the busy disk was retried: {before:?}\n{}",
        daemon.stderr()
    );
    assert_eq!(
        before
            .iter()
            .rev()
            .find(|l| l.starts_with("STATUS=ready:"))
            .map(String::as_str),
        Some("STATUS=ready: 1 disk(s), 4 volume(s)"),
        "READY only once the storage is there: {before:?}\n{}",
        daemon.stderr()
    );
    let v = volumes_on(&bus, &disk.path);
    assert_eq!(v.len(), 4);
    assert!(v.iter().all(|v| v["state"] == "ready"), "{v:?}");
}

/// The real daemon without kernel uevents (loop devices other tests attach must not cause
/// runs here), its lock and state in `dir`.
fn quiet_daemon(
    bus: &TestBus,
    notify: &NotifySocket,
    dir: tempfile::TempDir,
    policy_text: &str,
) -> DaemonProcess {
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy_text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
    cmd.arg("--policy").arg(&policy_path).arg("daemon");
    DaemonProcess::spawn_full(
        cmd,
        dir,
        policy_path,
        bus,
        notify,
        &[("KVSTRAP_UEVENTS", "0")],
        &[],
    )
}

/// One read over the bus as a client library would make it: the JSON, or the error text.
async fn read(
    proxy: &kvstrap::cli::bus_client::BootstrapProxy<'_>,
    method: &str,
) -> Result<String, String> {
    let answer = if method == "Disks" {
        proxy.disks().await
    } else {
        proxy.volumes().await
    };
    answer.map_err(|e| e.to_string())
}

/// What the hammering clients saw.
#[derive(Default)]
struct Hammered {
    calls: u64,
    /// Answers that carried data (JSON with the time of the inventory).
    answers: u64,
    errors: Vec<String>,
    slowest: Duration,
}

/// `threads` clients calling `Disks` and `Volumes` back to back until `stop` is set.
fn hammer(
    address: &str,
    threads: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Hammered>> {
    (0..threads)
        .map(|i| {
            let (address, stop) = (address.to_string(), std::sync::Arc::clone(stop));
            std::thread::spawn(move || {
                zbus::block_on(async move {
                    let client = kvstrap::cli::bus_client::Client::connect(Some(&address))
                        .await
                        .unwrap();
                    let proxy = client.proxy().await.unwrap();
                    let mut seen = Hammered::default();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let method = if (seen.calls + i as u64) % 2 == 0 {
                            "Disks"
                        } else {
                            "Volumes"
                        };
                        let started = Instant::now();
                        let answer = read(&proxy, method).await;
                        seen.slowest = seen.slowest.max(started.elapsed());
                        seen.calls += 1;
                        match answer {
                            Ok(json) if json.contains("\"inventory_time\"") => seen.answers += 1,
                            Ok(_) => seen
                                .errors
                                .push(format!("{method}: an answer without inventory_time")),
                            // Before the first run has read the node: an answer, not data.
                            Err(e) if e.contains("has not read the node yet") => {}
                            Err(e) => seen.errors.push(format!("{method}: {e}")),
                        }
                    }
                    seen
                })
            })
        })
        .collect()
}

#[test]
fn clients_hammering_reads_never_fail_or_delay_an_apply() {
    if !enabled("clients_hammering_reads_never_fail_or_delay_an_apply") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disks = [
        common::LoopDisk::new(4 << 30),
        common::LoopDisk::new(4 << 30),
        common::LoopDisk::new(4 << 30),
    ];
    let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    // Hold the applier lock (as `kvstrap apply` by hand would), so the daemon's first run
    // waits until the clients are hammering.
    let dir = tempfile::tempdir().unwrap();
    let lock = kvstrap::state::lock(&dir.path().join("lock"), Duration::from_secs(5)).unwrap();
    let daemon = quiet_daemon(
        &bus,
        &notify,
        dir,
        &policy(&work.path().join("storage"), &paths)
            .replace("layout = \"shared\"", "layout = \"separate\"")
            .replace("volume_count = 4", "volume_count = 8"),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    assert!(
        eventually(Duration::from_secs(10), || bus
            .property("State")
            .contains("applying")),
        "{}",
        daemon.stderr()
    );
    let clients = hammer(&bus.address, 8, &stop);
    std::thread::sleep(Duration::from_millis(500));
    drop(lock);
    let got_ready = notify.wait_for("READY=1", Duration::from_secs(120));
    // Keep reading a little after the run, when there is data to answer with.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen: Vec<Hammered> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(got_ready, "{:?}\n{}", notify.seen, daemon.stderr());

    let ready = notify.seen.iter().position(|l| l == "READY=1").unwrap();
    let before = &notify.seen[..ready];
    assert!(
        !before.iter().any(|l| l.contains("; retrying in ")),
        "the first run had to be retried: {before:?}\n{}",
        daemon.stderr()
    );
    assert_eq!(
        before
            .iter()
            .rev()
            .find(|l| l.starts_with("STATUS=ready:"))
            .map(String::as_str),
        Some("STATUS=ready: 3 disk(s), 24 volume(s)"),
        "{before:?}\n{}",
        daemon.stderr()
    );
    let status = bus.send_as(0, &["org.kvstrap.Bootstrap1.Status"]);
    let status = text(&status);
    assert!(status.contains("\"failed\":0"), "{status}");
    assert!(status.contains("\"failed_disks\":[]"), "{status}");
    assert!(status.contains("\"runs\":1"), "{status}");

    let calls: u64 = seen.iter().map(|s| s.calls).sum();
    let answers: u64 = seen.iter().map(|s| s.answers).sum();
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.errors).collect();
    let slowest = seen.iter().map(|s| s.slowest).max().unwrap_or_default();
    eprintln!("{calls} reads during and after the apply, {answers} with data, slowest {slowest:?}");
    assert!(errors.is_empty(), "reads failed: {errors:?}");
    assert!(answers > 0, "no read answered with data after the run");
    assert!(
        slowest < Duration::from_secs(1),
        "a read took {slowest:?} during the apply"
    );
    for d in &paths {
        let v = volumes_on(&bus, d);
        assert_eq!(v.len(), 8, "{}: {v:?}", d.display());
        assert!(v.iter().all(|v| v["state"] == "ready"), "{v:?}");
    }
}

#[test]
fn a_read_opens_no_disk_and_answers_with_the_last_inventory() {
    if !enabled("a_read_opens_no_disk_and_answers_with_the_last_inventory") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let managed = common::LoopDisk::new(1 << 30);
    // A disk the policy does not select: the inventory still lists it.
    let other = common::LoopDisk::new(256 << 20);
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = quiet_daemon(
        &bus,
        &notify,
        tempfile::tempdir().unwrap(),
        &policy(
            &work.path().join("storage"),
            std::slice::from_ref(&managed.path),
        ),
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(60)),
        "{:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    // Without `health`: the health thread may add its first reading between the two reads,
    // which is not a new look at the node.
    let disks_of = |answer: &str| -> serde_json::Value {
        let mut doc: serde_json::Value =
            serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        for disk in doc["disks"].as_array_mut().into_iter().flatten() {
            disk.as_object_mut().map(|d| d.remove("health"));
        }
        doc
    };
    let ask = || {
        zbus::block_on(async {
            let client = kvstrap::cli::bus_client::Client::connect(Some(&bus.address))
                .await
                .unwrap();
            let proxy = client.proxy().await.unwrap();
            let started = Instant::now();
            let answer = read(&proxy, "Disks").await.unwrap();
            (answer, started.elapsed())
        })
    };
    let (first, _) = ask();
    let first = disks_of(&first);

    // Held exclusively from here on: a read that opened it would see it busy (EBUSY).
    // Another prober on this machine may hold it for a moment: try for a while.
    let mut held = None;
    assert!(eventually(Duration::from_secs(5), || {
        held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&other.path)
            .ok();
        held.is_some()
    }));
    let (answer, took) = ask();
    drop(held);
    let answer = disks_of(&answer);
    let row = answer["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == other.path.display().to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{} not listed: {answer}", other.path.display()));
    assert!(
        !row.to_string().contains("\"busy\""),
        "the read opened the disk: {row}"
    );
    assert!(took < Duration::from_millis(500), "Disks took {took:?}");
    assert_eq!(answer, first, "the same look at the node, not a new one");
    let time = answer["inventory_time"].as_u64().expect("inventory_time");
    assert!(time > 0, "{answer}");
    let status = text(&bus.send_as(0, &["org.kvstrap.Bootstrap1.Status"]));
    assert!(
        status.contains(&format!("\"inventory_time\":{time}")),
        "{status}"
    );
}

/// A control plane for `test`, when it can run here (root, the daemon's plumbing, the
/// binaries; in CI a missing one fails instead).
fn real_control_plane(test: &str) -> Option<control_plane::ControlPlane> {
    if !enabled(test) {
        return None;
    }
    control_plane::start_or_skip(test)
}

/// This node's PVs in the cluster: name -> (uid, resourceVersion, phase, finalizers).
fn cluster_pvs(cp: &control_plane::ControlPlane, node: &str) -> BTreeMap<String, [String; 4]> {
    let Some(text) = cp.get(&format!(
        "/api/v1/persistentvolumes?labelSelector=kvstrap.io%2Fnode%3D{node}"
    )) else {
        return BTreeMap::new();
    };
    let list: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pv| {
            let m = &pv["metadata"];
            let finalizers = m["finalizers"].as_array().into_iter().flatten().map(field);
            let facts = [
                field(&m["uid"]),
                field(&m["resourceVersion"]),
                field(&pv["status"]["phase"]),
                finalizers.collect::<Vec<_>>().join(","),
            ];
            (field(&m["name"]), facts)
        })
        .collect()
}

/// The highest `attempt N` of the daemon's "cannot publish" lines in `log`.
fn publication_attempts(log: &str) -> u32 {
    log.lines()
        .filter(|l| l.contains("cannot publish"))
        .filter_map(|l| {
            l.split("; attempt ")
                .nth(1)?
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// The retry time the daemon's last "cannot publish" line in `log` announced.
fn last_retry(log: &str) -> Option<Duration> {
    let line = log.lines().rev().find(|l| l.contains("cannot publish"))?;
    let text = line
        .split("next attempt within ")
        .nth(1)?
        .split(' ')
        .next()?;
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (text.strip_suffix('s')?, 1.0),
    };
    Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
}

/// `kvstrap daemon` (the real binary, `publish = true`) publishes a loop disk's volumes to
/// a real API server; the server is stopped; a second disk appears and is provisioned
/// while runs keep being asked for; the server comes back. Local work never waited, the
/// publisher kept to its backoff while the server was down, the new PVs arrive within the
/// backoff in force after the server is back, and nothing was lost, duplicated or
/// rewritten: the PVs that were there keep their uid and resourceVersion.
#[test]
fn apiserver_stopped_and_started_under_a_running_daemon() {
    let Some(cp) = real_control_plane("apiserver_stopped_and_started_under_a_running_daemon")
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let first = common::LoopDisk::new(1 << 30);
    let mut second = NamedLoop::reserve(work.path(), 1 << 30);
    let node = "daemon-test";
    let policy_text = policy(
        &work.path().join("storage"),
        &[first.path.clone(), second.path.clone()],
    )
    .replace(
        "publish = false",
        &format!(
            "publish = true\nkubeconfig = {:?}",
            cp.kubeconfig.display().to_string()
        ),
    );
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = quiet_daemon(&bus, &notify, tempfile::tempdir().unwrap(), &policy_text);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(60)),
        "{}",
        daemon.stderr()
    );
    // Published, and settled: the controller manager has set the phase and added the
    // pv-protection finalizer (its writes, not kvstrap's).
    let settled = |pvs: &BTreeMap<String, [String; 4]>, n: usize| {
        pvs.len() == n
            && pvs
                .values()
                .all(|f| f[2] == "Available" && f[3].contains("kubernetes.io/pv-protection"))
    };
    assert!(
        notify.eventually(Duration::from_secs(30), || settled(
            &cluster_pvs(&cp, node),
            4
        )),
        "first disk's PVs not published: {:?}\n{}",
        cluster_pvs(&cp, node),
        daemon.stderr()
    );
    let before = cluster_pvs(&cp, node);
    let class_rv = |cp: &control_plane::ControlPlane| {
        let text = cp
            .get("/apis/storage.k8s.io/v1/storageclasses/daemon-test")
            .unwrap_or_default();
        let sc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        sc["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let class_before = class_rv(&cp);
    assert!(!class_before.is_empty());

    // The server goes away; a disk appears and runs keep being asked for.
    let log_before = daemon.stderr().len();
    let down = Instant::now();
    cp.stop_apiserver();
    second.attach();
    let mut runs = 0;
    while down.elapsed() < Duration::from_secs(6) {
        notify.drain();
        let asked = Instant::now();
        let out = bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"]);
        assert!(
            out.status.success(),
            "Apply after {:?}: {}\n{}",
            asked.elapsed(),
            text(&out),
            daemon.stderr()
        );
        runs += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let v = volumes_on(&bus, &second.path);
    assert!(
        v.len() == 4 && v.iter().all(|v| v["state"] == "ready"),
        "provisioned while the server is down: {v:?}"
    );
    let attempts_down = publication_attempts(&daemon.stderr()[log_before..]);
    let window = down.elapsed();

    cp.start_apiserver_again();
    let up = Instant::now();
    let published = notify.eventually(Duration::from_secs(60), || {
        cluster_pvs(&cp, node).len() == 8
    });
    let publish_after = up.elapsed();
    let log = daemon.stderr()[log_before..].to_string();
    assert!(published, "not published after the server came back\n{log}");
    let attempts = publication_attempts(&log);
    // The wait the last failed attempt announced: the backoff in force when it came back.
    let retry = last_retry(&log).unwrap_or_default();
    eprintln!(
        "server down {:.1} s: {attempts_down} attempts in the first {window:.1?} ({runs} runs), {attempts} failed attempts in all; \
         published {:.1} s after the server was ready (next attempt was due within {retry:.1?})",
        up.duration_since(down).as_secs_f64(),
        publish_after.as_secs_f64()
    );
    // 0.5 s doubling, with jitter (at least half of each step): after the first attempt,
    // waits of at least 0.25, 0.5, 1, 2, 4 ... s, whatever the runs asked for (a dozen).
    let (mut allowed, mut step, mut elapsed) = (1, 0.25, 0.25);
    while elapsed <= window.as_secs_f64() {
        allowed += 1;
        step *= 2.0;
        elapsed += step;
    }
    assert!(
        (2..=allowed).contains(&attempts_down),
        "{attempts_down} publication attempts in {window:?} (at most {allowed}): backoff not held\n{log}"
    );
    // Within the backoff in force when the server came back (the retry time the last
    // failed attempt announced), plus a pass.
    assert!(
        publish_after <= retry + Duration::from_secs(5),
        "published {publish_after:?} after the server was back, the backoff said {retry:?}\n{log}"
    );

    let after = cluster_pvs(&cp, node);
    for (name, facts) in &before {
        assert_eq!(
            after.get(name).map(|f| &f[..2]),
            Some(&facts[..2]),
            "{name} rewritten or re-created"
        );
    }
    assert!(notify.eventually(Duration::from_secs(10), || settled(
        &cluster_pvs(&cp, node),
        8
    )));
    assert_eq!(
        class_rv(&cp),
        class_before,
        "the StorageClass was rewritten"
    );
    // The restarted server counts from zero: kvstrap applied the 4 new PVs, each once.
    let applies = cp.request_total(&[("resource", "persistentvolumes"), ("verb", "APPLY")]);
    assert_eq!(applies, 4, "applies after the restart\n{log}");
    assert_eq!(
        cp.request_total(&[("resource", "storageclasses"), ("verb", "APPLY")]),
        0
    );
}

/// `kubectl --kubeconfig` of `cp` with `stdin`; panics with kubectl's error.
fn kubectl_apply(cp: &control_plane::ControlPlane, manifest: &str) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl apply: {}", text(&out));
}

/// The policy fragment `fleet` of namespace kvstrap, for every node.
fn fragment(toml: &str) -> String {
    let body: String = toml.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fleet\n  namespace: kvstrap\n  labels: {{ kvstrap.io/policy: \"\" }}\ndata:\n  policy.toml: |\n{body}"
    )
}

/// `kvstrap daemon` (the real binary, `cluster_policy = true`) takes a changed fragment
/// through its reload: a fragment whose `match` keeps the node's second loop disk out,
/// then one that lets it in (the daemon reloads and provisions it within a bound), then a
/// broken one (refused with its source, the last good policy kept, an Event on the Node).
#[test]
fn a_changed_fragment_reaches_a_running_daemon_and_a_broken_one_is_refused() {
    let Some(cp) = real_control_plane(
        "a_changed_fragment_reaches_a_running_daemon_and_a_broken_one_is_refused",
    ) else {
        return;
    };
    let node = "daemon-fleet";
    kubectl_apply(
        &cp,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: kvstrap }}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{ name: {node} }}\n"
        ),
    );
    // Too big for a 1 GiB disk: the group selects nothing yet.
    kubectl_apply(
        &cp,
        &fragment("[[disk_group]]\nname = \"fleet\"\nmatch = { min_size = \"100T\" }"),
    );
    let work = tempfile::tempdir().unwrap();
    let first = common::LoopDisk::new(1 << 30);
    let mut second = NamedLoop::reserve(work.path(), 1 << 30);
    // The node's own files name the disk and allow the loop device (a fragment may not);
    // the fragment only narrows which of the named disks the group takes.
    let policy_text = policy(&work.path().join("storage"), std::slice::from_ref(&first.path))
        .replace("name = \"daemon-test\"\nstorage_root", &format!("name = \"{node}\"\nstorage_root"))
        .replace(
            "publish = false",
            &format!(
                "publish = false\ncluster_policy = true\nkubeconfig = {:?}",
                cp.kubeconfig.display().to_string()
            ),
        )
        + &format!(
            "\n[[disk_group]]\nname = \"fleet\"\nstorage_class = \"daemon-test\"\nlayout = \"shared\"\n\
             devices = [{:?}]\nallow_loop = true\nquota = \"if-supported\"\n",
            second.path.display().to_string()
        );
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("state").join("cluster-policy.json");
    let daemon = quiet_daemon(&bus, &notify, dir, &policy_text);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(60)),
        "{}",
        daemon.stderr()
    );
    assert!(
        notify.eventually(Duration::from_secs(30), || cache.exists()
            && daemon.stderr().contains("policy reloaded")),
        "the first fragment never reached the daemon\n{}",
        daemon.stderr()
    );
    second.attach();
    notify.drain();
    let out = bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"]);
    assert!(out.status.success(), "{}\n{}", text(&out), daemon.stderr());
    assert!(
        volumes_on(&bus, &second.path).is_empty(),
        "the fragment keeps the second disk out"
    );

    // The fragment changes: the daemon reloads and provisions the disk, unasked.
    let changed = Instant::now();
    kubectl_apply(
        &cp,
        &fragment("[[disk_group]]\nname = \"fleet\"\nmatch = { min_size = \"100M\" }"),
    );
    let ready = notify.eventually(Duration::from_secs(30), || {
        let v = volumes_on(&bus, &second.path);
        v.len() == 1 && v[0]["state"] == "ready"
    });
    assert!(
        ready,
        "not provisioned after the fragment changed: {:?}\n{}",
        volumes_on(&bus, &second.path),
        daemon.stderr()
    );
    eprintln!(
        "fragment changed to volume ready: {:.1} s",
        changed.elapsed().as_secs_f64()
    );
    let good = std::fs::read(&cache).unwrap();

    // A broken fragment: refused with its source, the cache and the volumes stay.
    let log_before = daemon.stderr().len();
    kubectl_apply(
        &cp,
        &fragment("[[disk_group]]\nname = \"fleet\"\nvolume_count = \"many\""),
    );
    let refused_event = || {
        cp.get("/api/v1/namespaces/default/events")
            .is_some_and(|t| t.contains("PolicyFragmentRefused") && t.contains(node))
    };
    assert!(
        notify.eventually(Duration::from_secs(30), refused_event),
        "no PolicyFragmentRefused Event\n{}",
        daemon.stderr()
    );
    let log = daemon.stderr()[log_before..].to_string();
    assert!(log.contains("configmap/kvstrap/fleet:"), "{log}");
    assert_eq!(std::fs::read(&cache).unwrap(), good, "the cache changed");
    notify.drain();
    let out = bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"]);
    assert!(out.status.success(), "{}\n{}", text(&out), daemon.stderr());
    let v = volumes_on(&bus, &second.path);
    assert!(
        v.len() == 1 && v[0]["state"] == "ready",
        "the last good policy stays in force: {v:?}"
    );
}
