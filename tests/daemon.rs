//! `kvstrap daemon` end to end on the simulated engine: a private system bus loading the
//! project's bus policy, a test NOTIFY_SOCKET, signals, and clients as root and as nobody.
//! Needs root (clients run as uid 65534) and dbus-daemon; skipped otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod daemon_support;

use daemon_support::*;
use kvstrap::cli::bus_client::{Client, ClientError};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::{Duration, Instant};

const SIM: &str =
    "disks = 4\nvolumes = 40\nsteps = 5\nstep_millis = 100\npending_publications = 3\n";

fn status(bus: &TestBus) -> Value {
    let json = zbus::block_on(async {
        let client = Client::connect(Some(&bus.address)).await.unwrap();
        client.proxy().await.unwrap().status().await.unwrap()
    });
    serde_json::from_str(&json).unwrap()
}

fn started(test: &str, sim: &str) -> Option<(TestBus, NotifySocket, DaemonProcess)> {
    started_with(test, sim, false)
}

fn started_with(
    test: &str,
    sim: &str,
    uevents: bool,
) -> Option<(TestBus, NotifySocket, DaemonProcess)> {
    if !can_run(test) {
        return None;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let mut daemon = DaemonProcess::start_with(&bus, &notify, sim, uevents);
    let ready = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(
        ready,
        "no READY=1; saw {:?}; daemon stderr:\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(daemon.is_running());
    Some((bus, notify, daemon))
}

#[test]
fn ready_comes_after_the_first_apply_without_an_api_server() {
    if !can_run("ready_comes_after_the_first_apply_without_an_api_server") {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let started = Instant::now();
    let daemon = DaemonProcess::start(&bus, &notify, SIM);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "saw {:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    // Five simulated steps of 100 ms ran before READY; 3 publications are still pending
    // (nothing accepts them), and READY did not wait for them.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "READY before the apply finished"
    );
    let applying = notify
        .seen
        .iter()
        .position(|l| l == "STATUS=applying the policy")
        .expect("applying status");
    let ready = notify.seen.iter().position(|l| l == "READY=1").unwrap();
    assert!(applying < ready, "{:?}", notify.seen);
    assert!(
        notify
            .seen
            .iter()
            .any(|l| l == "STATUS=ready: 4 disk(s), 40 volume(s); 3 publication(s) pending"),
        "{:?}",
        notify.seen
    );
    let s = status(&bus);
    assert_eq!(s["runs"], 1);
    assert_eq!(s["last_apply_result"], "success");
    assert_eq!(s["last_apply"]["changed"], 5);
    assert_eq!(s["pending_publications"], 3);
}

#[test]
fn a_settling_disk_is_retried_before_ready() {
    if !can_run("a_settling_disk_is_retried_before_ready") {
        return;
    }
    // The first two runs fail on /dev/sim0 with EBUSY (udev re-reading its partition
    // table); the third finds it settled. READY comes after that one, not before.
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let started = Instant::now();
    let daemon = DaemonProcess::start(&bus, &notify, "steps = 3\ntransient_failures = 2\n");
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "saw {:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "waited 0.5 s then 1 s before the retries"
    );
    let ready = notify.seen.iter().position(|l| l == "READY=1").unwrap();
    let before = &notify.seen[..ready];
    let failed = before
        .iter()
        .filter(|l| {
            l.starts_with(
                "STATUS=ready: 3 disk(s), 30 volume(s); failed: 1 disk(s) (/dev/sim0: BLKPG add",
            )
        })
        .count();
    assert!(failed >= 2, "{:?}", notify.seen);
    let retried = before
        .iter()
        .filter(|l| l.starts_with("STATUS=") && l.contains("; retrying in "))
        .count();
    assert_eq!(retried, 2, "{:?}", notify.seen);
    // Each retry asks systemd for the wait plus room for one more run (90 s).
    let extended_for_retry = before
        .iter()
        .filter_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .filter(|usec| usec.parse::<u64>().is_ok_and(|u| u > 90_000_000))
        .count();
    assert_eq!(extended_for_retry, 2, "{:?}", notify.seen);
    assert_eq!(
        before.last().map(String::as_str),
        Some("STATUS=ready: 4 disk(s), 40 volume(s)"),
        "{:?}",
        notify.seen
    );
    let s = status(&bus);
    assert_eq!(s["runs"], 3);
    assert_eq!(s["last_apply_result"], "success");
}

#[test]
fn a_lasting_failure_is_not_retried_and_status_names_the_disk() {
    if !can_run("a_lasting_failure_is_not_retried_and_status_names_the_disk") {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon = DaemonProcess::start(&bus, &notify, "steps = 3\nfail = true\n");
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "saw {:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(
        notify.seen.iter().any(|l| l
            == "STATUS=ready: 3 disk(s), 30 volume(s); failed: 1 disk(s) (/dev/sim0: simulated failure)"),
        "{:?}",
        notify.seen
    );
    assert!(
        !notify.seen.iter().any(|l| l.contains("; retrying in ")),
        "{:?}",
        notify.seen
    );
    // The run made progress before READY, and each progress extends the start timeout
    // by 90 s (rate-limited), so a long first apply is never killed for being long.
    assert!(
        notify
            .seen
            .iter()
            .any(|l| l == "EXTEND_TIMEOUT_USEC=90000000"),
        "{:?}",
        notify.seen
    );
    assert_eq!(status(&bus)["runs"], 1);
}

#[test]
fn nobody_reads_but_cannot_apply_and_root_can() {
    let Some((bus, _notify, _daemon)) = started("nobody_reads_but_cannot_apply_and_root_can", SIM)
    else {
        return;
    };
    for prop in [
        "State",
        "Version",
        "LastApplyTime",
        "LastApplyResult",
        "PendingPublications",
    ] {
        let out = bus.property_as(NOBODY, prop);
        assert!(
            out.status.success(),
            "nobody reading {prop}: {}",
            text(&out)
        );
    }
    let out = bus.property_as(NOBODY, "LastApplyResult");
    assert!(
        text(&out).contains("variant       string \"success\""),
        "{}",
        text(&out)
    );
    let all = bus.send_as(
        NOBODY,
        &[
            "org.freedesktop.DBus.Properties.GetAll",
            "string:org.kvstrap.Bootstrap1",
        ],
    );
    assert!(all.status.success(), "{}", text(&all));
    let intro = bus.send_as(NOBODY, &["org.freedesktop.DBus.Introspectable.Introspect"]);
    assert!(
        text(&intro).contains("<method name=\"Apply\">"),
        "{}",
        text(&intro)
    );
    for method in ["Status", "Disks", "Volumes", "Plan"] {
        let out = bus.send_as(NOBODY, &[&format!("org.kvstrap.Bootstrap1.{method}")]);
        assert!(
            out.status.success(),
            "nobody calling {method}: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("string \"{"),
            "{method} returns JSON: {}",
            text(&out)
        );
    }
    let disks = bus.send_as(NOBODY, &["org.kvstrap.Bootstrap1.Disks"]);
    assert_eq!(text(&disks).matches("\"path\"").count(), 4);

    for method in ["Apply", "Reload", "Drain", "Undrain"] {
        let refused = bus.send_as(NOBODY, &[&format!("org.kvstrap.Bootstrap1.{method}")]);
        assert!(!refused.status.success());
        assert!(
            text(&refused).contains("org.freedesktop.DBus.Error.AccessDenied"),
            "{method}: {}",
            text(&refused)
        );
    }
    assert_eq!(status(&bus)["runs"], 1, "a refused Apply must not run");

    // Root's Apply runs and emits ApplyFinished.
    let address = bus.address.clone();
    let (signal, reply) = zbus::block_on(async move {
        let client = Client::connect(Some(&address)).await.unwrap();
        let proxy = client.proxy().await.unwrap();
        let mut finished = proxy.receive_apply_finished().await.unwrap();
        let reply = proxy.apply().await.unwrap();
        let signal = futures_util::StreamExt::next(&mut finished).await.unwrap();
        let args = signal.args().unwrap();
        (
            (args.result().to_string(), *args.changed(), *args.failed()),
            reply,
        )
    });
    assert_eq!(
        signal,
        ("success".to_string(), 0, 0),
        "the node had converged"
    );
    let summary: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(summary["disks"], 4);
    assert_eq!(status(&bus)["runs"], 2);
}

#[test]
fn daemon_checks_the_callers_uid_itself() {
    if !can_run("daemon_checks_the_callers_uid_itself") {
        return;
    }
    // A bus policy that lets anyone call Apply: the daemon (running as root) must still
    // refuse nobody, judging the message's sender and not its own process.
    let bus = TestBus::with_policy(PERMISSIVE_POLICY);
    let mut notify = NotifySocket::new();
    let daemon = DaemonProcess::start(&bus, &notify, SIM);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    let refused = bus.send_as(NOBODY, &["org.kvstrap.Bootstrap1.Apply"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("org.kvstrap.Bootstrap1.Error.AccessDenied"),
        "{}",
        text(&refused)
    );
    assert!(text(&refused).contains("uid 65534"), "{}", text(&refused));
    let allowed = bus.send_as(0, &["org.kvstrap.Bootstrap1.Apply"]);
    assert!(allowed.status.success(), "{}", text(&allowed));
}

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one() {
    let Some((bus, mut notify, mut daemon)) =
        started("sighup_with_a_broken_policy_keeps_the_old_one", SIM)
    else {
        return;
    };
    std::fs::write(&daemon.sim, "disks = 4\nvolumes = \"many\"\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    let log = daemon.stderr_path.clone();
    let rejected = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("the old one stays in force")
    });
    assert!(rejected, "{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("sim.toml:2:11: error:"),
        "diagnostic names file:line:col:\n{}",
        daemon.stderr()
    );
    assert!(daemon.is_running());
    assert_eq!(status(&bus)["last_apply"]["disks"], 4);

    // Reload over D-Bus reports the same problem as a typed error.
    let reload = bus.send_as(0, &["org.kvstrap.Bootstrap1.Reload"]);
    assert!(
        text(&reload).contains("org.kvstrap.Bootstrap1.Error.InvalidPolicy"),
        "{}",
        text(&reload)
    );
    assert!(
        text(&reload).contains("sim.toml:2:11: error:"),
        "{}",
        text(&reload)
    );

    // A fixed policy is taken on the next SIGHUP, and a run follows.
    std::fs::write(&daemon.sim, "disks = 6\nvolumes = 60\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || status(&bus)
        ["last_apply"]["disks"]
        == 6));
    assert!(
        notify.wait_for(
            "STATUS=ready: 6 disk(s), 60 volume(s)",
            Duration::from_secs(5)
        ),
        "{:?}",
        notify.seen
    );
}

#[test]
fn sigterm_during_an_apply_finishes_the_step_and_exits_zero() {
    if !can_run("sigterm_during_an_apply_finishes_the_step_and_exits_zero") {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let mut daemon = DaemonProcess::start(&bus, &notify, "steps = 100\nstep_millis = 200\n");
    assert!(
        notify.wait_for("STATUS=applying the policy", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("daemon did not exit");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.stderr()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    assert!(
        notify.wait_for("STOPPING=1", Duration::from_secs(1)),
        "{:?}",
        notify.seen
    );
    assert!(
        daemon.stderr().contains("apply finished: interrupted"),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn sigint_when_idle_exits_zero_and_releases_the_name() {
    let Some((bus, _notify, mut daemon)) =
        started("sigint_when_idle_exits_zero_and_releases_the_name", SIM)
    else {
        return;
    };
    daemon.signal(Signal::SIGINT);
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .expect("daemon did not exit");
    assert!(status.success(), "{status:?}");
    let gone = zbus::block_on(Client::connect(Some(&bus.address)));
    assert!(
        matches!(gone, Err(ClientError::NotRunning)),
        "{:?}",
        gone.err()
    );
}

#[test]
fn a_new_block_device_triggers_a_run() {
    if !common::require_root("a_new_block_device_triggers_a_run") {
        return;
    }
    let Some((bus, _notify, _daemon)) =
        started_with("a_new_block_device_triggers_a_run", SIM, true)
    else {
        return;
    };
    assert_eq!(status(&bus)["runs"], 1);
    // Attaching a loop device makes the kernel send a block uevent; after the quiet
    // period the daemon reconciles once for the whole burst.
    let disk = common::LoopDisk::new(64 << 20);
    let ran = eventually(Duration::from_secs(2), || {
        status(&bus)["runs"].as_u64() >= Some(2)
    });
    assert!(ran, "no run after {} appeared", disk.path.display());
}

#[test]
fn watchdog_is_fed_when_systemd_asks() {
    if !can_run("watchdog_is_fed_when_systemd_asks") {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let daemon =
        DaemonProcess::start_env(&bus, &notify, SIM, false, &[("WATCHDOG_USEC", "400000")]);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    notify.seen.clear();
    assert!(
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2)),
        "{:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    notify.seen.clear();
    assert!(
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2)),
        "fed again: {:?}",
        notify.seen
    );
}

/// Forget every notification sent so far, including those still queued on the socket.
fn drain(notify: &mut NotifySocket) {
    notify.wait_for("(drain)", Duration::from_millis(50));
    notify.seen.clear();
}

#[test]
fn watchdog_is_fed_while_a_run_makes_progress() {
    if !can_run("watchdog_is_fed_while_a_run_makes_progress") {
        return;
    }
    // 20 steps of 100 ms: a 2 s run, each step well within the 400 ms watchdog period.
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let sim = "steps = 20\nstep_millis = 100\n";
    let daemon =
        DaemonProcess::start_env(&bus, &notify, sim, false, &[("WATCHDOG_USEC", "400000")]);
    std::thread::sleep(Duration::from_millis(800));
    drain(&mut notify);
    assert!(
        notify.wait_for("WATCHDOG=1", Duration::from_millis(600)),
        "not fed in the middle of the run: {:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(
        !notify.seen.iter().any(|l| l.contains("READY=1")),
        "the run was over already: {:?}",
        notify.seen
    );
}

#[test]
fn a_hung_step_starves_the_watchdog() {
    if !can_run("a_hung_step_starves_the_watchdog") {
        return;
    }
    // One step that takes 3 s, far longer than the 400 ms period: being busy is no proof
    // of life, so the watchdog goes unfed until the step ends (systemd would restart the
    // daemon), and is fed again once the daemon moves on.
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let sim = "steps = 1\nstep_millis = 3000\n";
    let daemon =
        DaemonProcess::start_env(&bus, &notify, sim, false, &[("WATCHDOG_USEC", "400000")]);
    std::thread::sleep(Duration::from_millis(900));
    drain(&mut notify);
    assert!(
        !notify.wait_for("WATCHDOG=1", Duration::from_millis(1200)),
        "fed while the step hung: {:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    assert!(
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2)),
        "not fed after the run: {:?}",
        notify.seen
    );
}

#[test]
fn no_bus_does_not_hold_back_ready() {
    if !can_run("no_bus_does_not_hold_back_ready") {
        return;
    }
    // Disks come first: kubelet waits for READY, admin tools can wait for the bus.
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let env = [(
        "DBUS_SYSTEM_BUS_ADDRESS",
        "unix:path=/nonexistent/kvstrap-test-bus",
    )];
    let mut daemon = DaemonProcess::start_env(&bus, &notify, SIM, false, &env);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    assert!(
        daemon
            .stderr()
            .contains("cannot serve D-Bus, continuing without it"),
        "{}",
        daemon.stderr()
    );
    daemon.signal(Signal::SIGTERM);
    assert!(daemon
        .wait_exit(Duration::from_secs(5))
        .expect("exits")
        .success());
}

#[test]
fn a_run_waits_for_the_applier_lock_but_not_a_stop() {
    let Some((bus, _notify, mut daemon)) =
        started("a_run_waits_for_the_applier_lock_but_not_a_stop", SIM)
    else {
        return;
    };
    // Someone runs `kvstrap apply` by hand: the daemon's next run waits for the lock.
    let held = kvstrap::state::lock(&daemon.dir.path().join("lock"), Duration::ZERO).unwrap();
    let address = bus.address.clone();
    let apply = std::thread::spawn(move || {
        zbus::block_on(async {
            let client = Client::connect(Some(&address)).await.unwrap();
            client.proxy().await.unwrap().apply().await
        })
    });
    let waiting = eventually(Duration::from_secs(5), || {
        bus.property("State") == "string \"applying\""
    });
    assert!(waiting, "the Apply request started a run");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&bus)["runs"], 1, "no run while the lock is held");
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_exit(Duration::from_secs(5))
        .expect("a stop is not held up by the lock");
    assert!(exit.success(), "{exit:?}\n{}", daemon.stderr());
    let reply = apply.join().unwrap();
    assert!(
        reply.is_err(),
        "the waiting Apply is answered with an error, not left hanging"
    );
    drop(held);
}
