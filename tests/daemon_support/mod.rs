//! Helpers for the daemon's tests: a private system-like bus that loads the project's
//! bus policy, a NOTIFY_SOCKET to listen on, and `kvstrap daemon` as a child process.
//! Everything is killed and removed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The bus policy the tests load. At merge time this becomes the packaged file,
/// `packaging/dbus/org.kvstrap.Bootstrap1.conf`.
pub const BUS_POLICY: &str = "packaging/dbus/org.kvstrap.Bootstrap1.conf";
/// A policy that lets anyone call anything: only for showing the daemon's own uid check.
pub const PERMISSIVE_POLICY: &str = "tests/fixtures/dbus/permissive.conf";
const BUS_TEMPLATE: &str = "tests/fixtures/dbus/system-bus.conf.in";

pub const NOBODY: u32 = 65534;

pub fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// True when the tests can start a bus and run clients as another user.
pub fn can_run(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: needs root (a private system bus and clients as nobody)");
        return false;
    }
    if Command::new("dbus-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping {test}: dbus-daemon is not installed (apt-get install dbus)");
        return false;
    }
    true
}

/// A dbus-daemon with a system-bus-like configuration.
pub struct TestBus {
    child: Child,
    pub address: String,
    pub dir: tempfile::TempDir,
}

impl TestBus {
    pub fn start() -> TestBus {
        TestBus::with_policy(BUS_POLICY)
    }

    pub fn with_policy(policy: &str) -> TestBus {
        let dir = tempfile::tempdir().unwrap();
        // Unprivileged clients must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("system_bus_socket");
        let template = std::fs::read_to_string(manifest_path(BUS_TEMPLATE)).unwrap();
        let config = template
            .replace("@LISTEN@", &format!("unix:path={}", socket.display()))
            .replace("@POLICY@", &manifest_path(policy).display().to_string());
        let config_path = dir.path().join("bus.conf");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config_path.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            // Its complaints (e.g. it cannot raise the fd limit) are kept next to its config.
            .stderr(std::fs::File::create(dir.path().join("dbus-daemon.log")).unwrap())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon printed {line:?}");
        TestBus {
            child,
            address: line.trim().to_string(),
            dir,
        }
    }

    /// `dbus-send` as `uid` to the daemon's object; returns its output.
    pub fn send_as(&self, uid: u32, args: &[&str]) -> Output {
        let mut cmd = Command::new("dbus-send");
        cmd.arg(format!("--bus={}", self.address))
            .args([
                "--print-reply",
                "--reply-timeout=20000",
                "--dest=org.kvstrap.Bootstrap1",
                "/org/kvstrap/Bootstrap1",
            ])
            .args(args);
        if uid != 0 {
            cmd.uid(uid).gid(uid);
        }
        cmd.output().expect("run dbus-send")
    }

    /// A property read as `uid` with `dbus-send`; the output holds e.g. `string "idle"`.
    pub fn property_as(&self, uid: u32, name: &str) -> Output {
        self.send_as(
            uid,
            &[
                "org.freedesktop.DBus.Properties.Get",
                "string:org.kvstrap.Bootstrap1",
                &format!("string:{name}"),
            ],
        )
    }

    /// The JSON document a read method (`Disks`, `Volumes`, `Status`, ...) returns, as
    /// root; `Null` when the call failed.
    pub fn read_json(&self, method: &str) -> serde_json::Value {
        let out = self.send_as(0, &[&format!("org.kvstrap.Bootstrap1.{method}")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_once('"')
            .and_then(|(_, rest)| rest.rsplit_once('"'))
            .and_then(|(json, _)| serde_json::from_str(json).ok())
            .unwrap_or_default()
    }

    /// The property's value as dbus-send prints it after `variant`, e.g. `uint32 5`.
    pub fn property(&self, name: &str) -> String {
        let out = self.property_as(0, name);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_once("variant")
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or(text)
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NOTIFY_SOCKET: collects what the daemon tells "systemd".
pub struct NotifySocket {
    socket: UnixDatagram,
    pub path: PathBuf,
    pub seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            path,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Wait until a message containing `line` (e.g. `READY=1`) arrives; every message
    /// received so far is kept in `seen`, one entry per assignment.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.seen.iter().any(|l| l == line) {
            return true;
        }
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                // Timeouts and interruptions: look at the clock again.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("notify socket: {e}"),
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut found = false;
            for l in text.lines() {
                found |= l == line;
                self.seen.push(l.to_string());
            }
            if found {
                return true;
            }
        }
        false
    }
}

impl NotifySocket {
    /// Reads every queued notification into `seen` without waiting. A daemon whose
    /// notifications nobody reads blocks in sd_notify once the socket's queue is full
    /// (as it would under a systemd that stopped reading), so a long test keeps draining.
    pub fn drain(&mut self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.extend(text.lines().map(str::to_string));
        }
        self.socket.set_nonblocking(false).unwrap();
    }

    /// `eventually`, draining the socket meanwhile.
    pub fn eventually(&mut self, timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
        eventually(timeout, || {
            self.drain();
            check()
        })
    }
}

/// `kvstrap daemon` on the simulated engine, with its own lock and state directory.
pub struct DaemonProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sim: PathBuf,
    pub stderr_path: PathBuf,
}

impl DaemonProcess {
    /// Without kernel uevents: loop devices other tests attach must not cause runs here.
    pub fn start(bus: &TestBus, notify: &NotifySocket, sim: &str) -> DaemonProcess {
        DaemonProcess::start_with(bus, notify, sim, false)
    }

    pub fn start_with(
        bus: &TestBus,
        notify: &NotifySocket,
        sim: &str,
        uevents: bool,
    ) -> DaemonProcess {
        DaemonProcess::start_env(bus, notify, sim, uevents, &[])
    }

    /// Like `start_with`, with extra environment (set after the defaults).
    pub fn start_env(
        bus: &TestBus,
        notify: &NotifySocket,
        sim: &str,
        uevents: bool,
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        let dir = tempfile::tempdir().unwrap();
        let sim_path = dir.path().join("sim.toml");
        std::fs::write(&sim_path, sim).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("daemon").env("KVSTRAP_SIM", &sim_path);
        if !uevents {
            cmd.env("KVSTRAP_UEVENTS", "0");
        }
        DaemonProcess::spawn_env(cmd, dir, sim_path, bus, notify, env)
    }

    /// Start any `kvstrap daemon` command line (the real engine's tests use this).
    pub fn spawn(
        cmd: Command,
        dir: tempfile::TempDir,
        sim: PathBuf,
        bus: &TestBus,
        notify: &NotifySocket,
    ) -> DaemonProcess {
        DaemonProcess::spawn_env(cmd, dir, sim, bus, notify, &[])
    }

    fn spawn_env(
        cmd: Command,
        dir: tempfile::TempDir,
        sim: PathBuf,
        bus: &TestBus,
        notify: &NotifySocket,
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        DaemonProcess::spawn_full(cmd, dir, sim, bus, notify, env, &[])
    }

    /// Like `spawn`, with extra environment, and without the variables in `unset` (e.g.
    /// `KVSTRAP_LOG`, to see the daemon's default log filter).
    pub fn spawn_full(
        mut cmd: Command,
        dir: tempfile::TempDir,
        sim: PathBuf,
        bus: &TestBus,
        notify: &NotifySocket,
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> DaemonProcess {
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("KVSTRAP_LOCK", dir.path().join("lock"))
            .env("KVSTRAP_STATE_DIR", dir.path().join("state"))
            .env("KVSTRAP_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied());
        for var in unset {
            cmd.env_remove(var);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start kvstrap daemon");
        DaemonProcess {
            child,
            dir,
            sim,
            stderr_path,
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `check` until it holds or the time is up.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A loopback port bound but not listening: connections are refused at once, and no
/// other test can take the port while the returned socket lives.
pub fn refused_port() -> (std::os::fd::OwnedFd, u16) {
    use nix::sys::socket::SockaddrIn;
    use nix::sys::socket::{bind, getsockname, socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )
    .unwrap();
    let addr: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap();
    (fd, addr.port())
}

/// `smartctl` printing the recorded output named in `current` beside it.
pub fn fake_smartctl(dir: &Path, fixture: &str) {
    let script = "#!/bin/sh\nf=$(cat \"$(dirname \"$0\")/current\")\ncat \"$f\"\ncase \"$f\" in *failing*) exit 8;; esac\n";
    let path = dir.join("smartctl");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    set_fixture(dir, fixture);
}

pub fn set_fixture(dir: &Path, name: &str) {
    let file = manifest_path("tests/fixtures/smartctl").join(name);
    std::fs::write(dir.join("current"), file.display().to_string()).unwrap();
}
