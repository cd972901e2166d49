//! The client side `kvstrap status`/`disks`/`volumes` use: it finds the daemon on the bus
//! named by DBUS_SYSTEM_BUS_ADDRESS, and says "not running" (None) when it is absent.
//! The first test changes the process environment; the others give it to the `kvstrap`
//! they start and leave the test's own environment alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemon_support;

use daemon_support::*;
use kvstrap::cli::bus_client::{self as client, Client, ClientError};
use std::time::Duration;

#[test]
fn client_asks_the_daemon_or_reports_it_absent() {
    if !can_run("client_asks_the_daemon_or_reports_it_absent") {
        return;
    }
    let bus = TestBus::start();

    // No bus at all: the CLI falls back.
    std::env::set_var(
        "DBUS_SYSTEM_BUS_ADDRESS",
        "unix:path=/nonexistent/kvstrap-test-bus",
    );
    assert!(matches!(
        client::client_status(),
        Err(ClientError::NoBus(_))
    ));
    let no_bus = zbus::block_on(Client::connect(None));
    assert!(
        matches!(no_bus, Err(ClientError::NoBus(_))),
        "{:?}",
        no_bus.err()
    );

    // A bus without the daemon: "not running", not an error of the bus.
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    assert!(matches!(
        client::client_volumes(),
        Err(ClientError::NotRunning)
    ));
    let absent = zbus::block_on(Client::connect(None));
    assert!(
        matches!(absent, Err(ClientError::NotRunning)),
        "{:?}",
        absent.err()
    );
    assert!(ClientError::NotRunning.to_string().contains("not running"));

    // With the daemon: answers come from it.
    let mut notify = NotifySocket::new();
    let daemon = DaemonProcess::start(&bus, &notify, "disks = 32\nvolumes = 320\nsteps = 1\n");
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    let status: serde_json::Value =
        serde_json::from_str(&client::client_status().expect("daemon answers")).unwrap();
    assert_eq!(status["last_apply"]["volumes"], 320);
    let volumes: serde_json::Value =
        serde_json::from_str(&client::client_volumes().unwrap()).unwrap();
    assert_eq!(volumes["volumes"].as_array().unwrap().len(), 320);
    let disks: serde_json::Value = serde_json::from_str(&client::client_disks().unwrap()).unwrap();
    assert_eq!(disks["disks"].as_array().unwrap().len(), 32);
    let plan: serde_json::Value = serde_json::from_str(&client::client_plan().unwrap()).unwrap();
    assert_eq!(
        plan["steps"].as_array().unwrap().len(),
        0,
        "converged after the first apply"
    );
    let applied: serde_json::Value =
        serde_json::from_str(&client::client_apply().unwrap()).unwrap();
    assert_eq!(applied["result"], "success");
    client::client_reload().unwrap();
}

/// A daemon that owns the name but fails every call (a broken or half-started daemon).
struct BrokenDaemon;

#[zbus::interface(name = "org.kvstrap.Bootstrap1")]
impl BrokenDaemon {
    fn status(&self) -> zbus::fdo::Result<String> {
        Err(zbus::fdo::Error::Failed("simulated status failure".into()))
    }
    fn disks(&self) -> zbus::fdo::Result<String> {
        Err(zbus::fdo::Error::Failed("simulated disks failure".into()))
    }
    fn volumes(&self) -> zbus::fdo::Result<String> {
        Err(zbus::fdo::Error::Failed("simulated volumes failure".into()))
    }
}

/// `kvstrap ARGS` against the test bus, with a state directory and lock of its own.
fn kvstrap(bus: &TestBus, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kvstrap"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("KVSTRAP_STATE_DIR", dir.join("state"))
        .env("KVSTRAP_LOCK", dir.join("lock"))
        .env_remove("KVSTRAP_POLICY")
        .output()
        .unwrap()
}

#[test]
fn a_failing_daemon_is_named_and_reads_fall_back_only_safely() {
    if !can_run("a_failing_daemon_is_named_and_reads_fall_back_only_safely") {
        return;
    }
    let bus = TestBus::start();
    let _daemon = zbus::block_on(
        zbus::connection::Builder::address(bus.address.as_str())
            .name("org.kvstrap.Bootstrap1")
            .serve_at("/org/kvstrap/Bootstrap1", BrokenDaemon)
            .build(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Status falls back to the state directory, which never opens a disk: it answers,
    // and says the daemon is there but failed, not that it is absent.
    let status = kvstrap(&bus, dir.path(), &["status"]);
    let (out, err) = (
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr),
    );
    assert!(status.status.success(), "{out}\n{err}");
    assert!(
        err.contains("the daemon is running but could not answer"),
        "{err}"
    );
    assert!(err.contains("simulated status failure"), "{err}");
    assert!(!err.contains("is not running"), "{err}");
    assert!(out.contains("has not applied a policy"), "{out}");

    // Disks and volumes would probe the disks: never while the daemon may be writing
    // them. With its applier lock held, they refuse instead of scanning.
    let lock = kvstrap::state::lock(&dir.path().join("lock"), Duration::ZERO).unwrap();
    for command in ["disks", "volumes"] {
        let read = kvstrap(&bus, dir.path(), &[command]);
        let err = String::from_utf8_lossy(&read.stderr);
        assert!(
            !read.status.success(),
            "{command} scanned under a held lock: {err}"
        );
        assert!(
            err.contains("the daemon is running but could not answer"),
            "{command}: {err}"
        );
        assert!(
            err.contains("not reading the disks while the daemon may be writing them"),
            "{command}: {err}"
        );
    }
    drop(lock);
}

#[test]
fn kvstrap_apply_goes_through_the_running_daemon_never_beside_it() {
    if !can_run("kvstrap_apply_goes_through_the_running_daemon_never_beside_it") {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = DaemonProcess::start(&bus, &notify, "disks = 2\nvolumes = 4\nsteps = 1\n");
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    let runs = || daemon.stderr().matches("apply finished").count();
    let before = runs();
    let dir = tempfile::tempdir().unwrap();
    let out = kvstrap(&bus, dir.path(), &["apply"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("applied by kvstrap.service: success"),
        "{text}"
    );
    assert!(
        eventually(Duration::from_secs(5), || runs() == before + 1),
        "the daemon ran it: {}",
        daemon.stderr()
    );
    assert!(
        !dir.path().join("state").exists(),
        "the CLI wrote nothing of its own"
    );
    let json = kvstrap(&bus, dir.path(), &["apply", "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["result"], "success", "{doc}");
    // drain and undrain too: the daemon answers (this simulated one takes no disk out of
    // service), the CLI never changes the record beside it.
    for command in ["drain", "undrain"] {
        let out = kvstrap(&bus, dir.path(), &[command, "/dev/sdz"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {err}");
        assert!(
            err.contains("does not take disks out of service"),
            "{command}: {err}"
        );
    }
    assert!(!dir.path().join("state").exists());
}

#[test]
fn kvstrap_apply_beside_a_daemon_that_fails_refuses_to_write() {
    if !can_run("kvstrap_apply_beside_a_daemon_that_fails_refuses_to_write") {
        return;
    }
    let bus = TestBus::start();
    let _daemon = zbus::block_on(
        zbus::connection::Builder::address(bus.address.as_str())
            .name("org.kvstrap.Bootstrap1")
            .serve_at("/org/kvstrap/Bootstrap1", BrokenDaemon)
            .build(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = kvstrap(&bus, dir.path(), &["apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the kvstrap daemon is running but did not apply"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "nothing applied beside it"
    );
}
