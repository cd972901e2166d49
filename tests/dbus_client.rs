//! The client side `kvstrap status`/`disks`/`volumes` use: it finds the daemon on the bus
//! named by DBUS_SYSTEM_BUS_ADDRESS, and says "not running" (None) when it is absent.
//! One test function: it changes the process environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemon_support;

use daemon_support::*;
use kvstrap::dbus::client::{self, Client, ClientError};
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
    assert_eq!(client::client_status(), None);
    let no_bus = zbus::block_on(Client::connect(None));
    assert!(
        matches!(no_bus, Err(ClientError::NoBus(_))),
        "{:?}",
        no_bus.err()
    );

    // A bus without the daemon: "not running", not an error of the bus.
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    assert_eq!(client::client_volumes(), None);
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
