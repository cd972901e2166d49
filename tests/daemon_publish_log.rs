//! `kvstrap daemon` on the real engine (a policy that selects no disk, so nothing is
//! touched) publishing to an API server that refuses connections, with the daemon's
//! default log filter: each failed attempt is one line of ours that names the server and
//! the next retry, the client library's bare error lines stay out, and SIGHUPs do not
//! make it try more often than its backoff allows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
mod daemon_support;

use daemon_support::*;
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn policy(dir: &Path, kubeconfig: &Path) -> String {
    format!(
        r#"[node]
name = "daemon-test"
storage_root = "{root}"

[kubernetes]
publish = true
kubeconfig = "{kubeconfig}"

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
devices = ["/dev/kvstrap-test-selects-nothing-*"]
"#,
        root = dir.join("storage").display(),
        kubeconfig = kubeconfig.display()
    )
}

/// The daemon with its default log filter (no KVSTRAP_LOG), publishing to `port`.
fn daemon(bus: &TestBus, notify: &NotifySocket, port: u16) -> DaemonProcess {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = apiserver::kubeconfig(dir.path(), port);
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy(dir.path(), &kubeconfig)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
    cmd.arg("--policy").arg(&policy_path).arg("daemon");
    DaemonProcess::spawn_full(
        cmd,
        dir,
        policy_path,
        bus,
        notify,
        &[("KVSTRAP_UEVENTS", "0")],
        &["KVSTRAP_LOG"],
    )
}

fn attempts(log: &str) -> usize {
    log.lines().filter(|l| l.contains("cannot publish")).count()
}

#[test]
fn failed_publication_is_one_line_with_server_and_retry_and_sighup_keeps_the_backoff() {
    let test = "failed_publication_is_one_line_with_server_and_retry_and_sighup_keeps_the_backoff";
    if !can_run(test) {
        return;
    }
    let (_refusing, port) = refused_port();
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let mut daemon = daemon(&bus, &notify, port);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{:?}\n{}",
        notify.seen,
        daemon.stderr()
    );
    // Four seconds of SIGHUP, five a second: each one reloads and runs.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        daemon.signal(Signal::SIGHUP);
        // Read what the daemon tells "systemd" meanwhile, as systemd would: a full
        // notify socket would block it.
        notify.wait_for("(nothing)", Duration::from_millis(200));
    }
    daemon.signal(Signal::SIGTERM);
    let exited = daemon.wait_exit(Duration::from_secs(10));
    let log = daemon.stderr();
    assert!(exited.is_some(), "no exit after SIGTERM:\n{log}");
    let server = format!("http://127.0.0.1:{port}/");
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot publish"))
        .collect();
    assert!(!ours.is_empty(), "no publication failure reported:\n{log}");
    for line in &ours {
        assert!(line.contains(&server), "names the server: {line}");
        assert!(
            line.contains("next attempt within"),
            "names the retry: {line}"
        );
        assert!(line.contains(" UTC)"), "and when: {line}");
    }
    // 0.5 s doubling (jittered down to half): at most 5 attempts in about 4.5 s.
    assert!(
        attempts(&log) <= 6,
        "{} attempts in 4 s: SIGHUP runs bypassed the backoff\n{log}",
        attempts(&log)
    );
    let runs = log.lines().filter(|l| l.contains("apply finished")).count();
    assert!(runs >= 10, "SIGHUP runs provisioned locally: {runs}\n{log}");
}

#[test]
fn the_client_librarys_bare_error_lines_are_filtered_out() {
    let test = "the_client_librarys_bare_error_lines_are_filtered_out";
    if !can_run(test) {
        return;
    }
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let (_refusing, port) = refused_port();
    let mut daemon = daemon(&bus, &notify, port);
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20)),
        "{}",
        daemon.stderr()
    );
    let log_path = daemon.stderr_path.clone();
    let failed_twice = eventually(Duration::from_secs(10), || {
        attempts(&std::fs::read_to_string(&log_path).unwrap_or_default()) >= 2
    });
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(10)).expect("exits");
    let log = daemon.stderr();
    assert!(failed_twice, "{log}");
    // kube_client's tower trace layer logs `ERROR failed with error client error (Connect)`
    // for every failed request, with no context: the default filter keeps it out.
    assert!(
        !log.contains("failed with error"),
        "the client library's own line is in the log:\n{log}"
    );
}
