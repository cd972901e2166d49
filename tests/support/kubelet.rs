//! A real kubelet on this machine, beside the real control plane of `control_plane.rs`
//! (see `../shared/kube-control-plane/README.md`, "A real kubelet on this machine"), so
//! pods really mount (and map) the local volumes a test publishes.
//!
//! `Kubelet::start(&cp, node)`:
//! - builds two images once (cached in `target/tmp/kubelet-images/`): a sandbox image
//!   tagged `registry.k8s.io/pause:3.10` holding a static `pause` compiled with
//!   `gcc -static`, and `pods::WORKLOAD_IMAGE` holding Debian's static busybox with every
//!   applet linked in `/bin` (docker-archive tars written with `tar`: no registry, no
//!   docker);
//! - starts its own containerd (Debian's 1.6; own root, state, socket and runc root in a
//!   temp dir) and imports both images;
//! - starts the kubelet of the assets directory with a fresh root dir (never
//!   `/var/lib/kubelet`), its own cert dir, pod logs dir, volume plugin dir and a free port
//!   on 127.0.0.1, and waits until it registered its Node (which stays NotReady: no CNI).
//!
//! Drop (also when the test panicked) stops the kubelet, kills what the containers run,
//! lets containerd delete the tasks, stops containerd and its shims, lazily unmounts
//! everything below the temp dir (deepest first), detaches the loop devices the kubelet
//! attached for Block volumes (backing file below the temp dir), and removes the temp dir.
//!
//! What the kubelet and containerd touch outside their directories, and how it is undone
//! when the last harness kubelet on the machine stops (a lease file with a lock in
//! `target/tmp/`, shared by concurrent test processes):
//! - the kubelet sets six sysctls at start-up (`vm.overcommit_memory=1`,
//!   `kernel.panic=10`, `kernel.panic_on_oops=1`, ...): they are put back;
//! - `/var/lib/kubelet/device-plugins/kubelet.sock` (a path the kubelet hardcodes whatever
//!   `--root-dir` says), `/var/log/containers` (symlinks to the pod logs), `/run/containerd/s`
//!   (containerd 1.6's shim sockets) and the `k8s.io` cgroups: removed when they were not
//!   there before.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use super::control_plane::{ControlPlane, Proc};
use super::pods::WORKLOAD_IMAGE;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The sandbox image containerd is configured with.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The containerd namespace of the CRI plugin.
const K8S_NS: &str = "k8s.io";

/// The static pause of the sandbox image: sleeps until SIGTERM or SIGINT, then exits 0;
/// reaps children (it is PID 1 of the pod when processes share its namespace).
const PAUSE_C: &str = r#"#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;

/// `mountpoint [-q] DIR` for the workload image when busybox lacks the applet.
const MOUNTPOINT_SH: &str = r#"#!/bin/sh
# mountpoint [-q] DIR: whether DIR is a mount point (from /proc/self/mountinfo).
quiet=
[ "$1" = -q ] && { quiet=1; shift; }
say() { [ -n "$quiet" ] || echo "$@"; }
dir=$(cd "$1" 2>/dev/null && pwd -P) || { say "mountpoint: $1: No such file or directory" >&2; exit 1; }
if awk -v d="$dir" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    say "$1 is a mountpoint"
    exit 0
fi
say "$1 is not a mountpoint"
exit 1
"#;

/// The programs the harness needs besides the kubelet (from the assets directory).
#[derive(Debug, Clone)]
pub struct Tools {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub shim: PathBuf,
    pub runc: PathBuf,
    pub gcc: PathBuf,
    pub busybox: PathBuf,
    pub tar: PathBuf,
    pub losetup: PathBuf,
}

/// The tools, or why the harness cannot run here (with what to install).
pub fn requirements() -> Result<Tools, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "a real kubelet needs root (it mounts volumes, containerd runs containers)".into(),
        );
    }
    let need = |name: &str, package: &str| {
        find_program(name).ok_or_else(|| {
            format!(
                "no {name} program (apt-get install {package}, as scripts/install-deps.sh does)"
            )
        })
    };
    let tools = Tools {
        containerd: need("containerd", "containerd")?,
        ctr: need("ctr", "containerd")?,
        shim: need("containerd-shim-runc-v2", "containerd")?,
        runc: need("runc", "runc")?,
        gcc: need("gcc", "gcc libc6-dev")?,
        busybox: need("busybox", "busybox-static")?,
        tar: need("tar", "tar")?,
        losetup: need("losetup", "mount")?,
    };
    if !is_static_elf(&tools.busybox) {
        return Err(format!(
            "{} is not statically linked (apt-get install busybox-static)",
            tools.busybox.display()
        ));
    }
    let libc = Command::new(&tools.gcc)
        .arg("-print-file-name=libc.a")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tools.gcc.display()))?;
    if !Path::new(String::from_utf8_lossy(&libc.stdout).trim()).is_absolute() {
        return Err(
            "gcc finds no static libc to link the pause binary (apt-get install libc6-dev)".into(),
        );
    }
    Ok(tools)
}

/// `name` in `PATH` or the usual system directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// An ELF executable that needs no program interpreter (no `PT_INTERP` header).
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    // 64-bit little-endian ELF only (what Debian amd64/arm64 ship).
    if b.get(0..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| u32_at(phoff + i * usize::from(phentsize)) != Some(3))
}

/// The kubelet (and containerd) of the test; everything stops and goes on drop.
pub struct Kubelet {
    node: String,
    dir: Option<tempfile::TempDir>,
    base: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    pod_logs: PathBuf,
    port: u16,
    ctr: PathBuf,
    losetup: PathBuf,
    startup: Startup,
    // Stopped in this order on drop: kubelet, the containers, containerd.
    kubelet: Option<Proc>,
    containerd: Option<Proc>,
    lease: Option<HostLease>,
}

/// How long the start took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    /// Images built (or found in the cache) and containerd up with them imported.
    pub containerd: Duration,
    /// From starting the kubelet until its Node object exists.
    pub node_registered: Duration,
}

/// A kubelet for `test` on node `node`, or `None` (skipped, with a message) when a program
/// it needs is missing or the test does not run as root. With `CI` set a missing program
/// fails the test instead (scripts/install-deps.sh installs them all).
pub fn start_or_skip(cp: &ControlPlane, node: &str, test: &str) -> Option<Kubelet> {
    match requirements() {
        Ok(tools) => Some(Kubelet::start_with(cp, node, &tools)),
        Err(why) if std::env::var_os("CI").is_some() && nix::unistd::geteuid().is_root() => {
            panic!("{test}: CI must not skip the real kubelet tests: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

impl Kubelet {
    /// Starts containerd and the kubelet for node `node` (a DNS label) against `cp`;
    /// returns once the Node is registered. Panics (after cleaning up) when it cannot.
    pub fn start(cp: &ControlPlane, node: &str) -> Kubelet {
        let tools = requirements().unwrap_or_else(|why| panic!("no real kubelet: {why}"));
        Kubelet::start_with(cp, node, &tools)
    }

    fn start_with(cp: &ControlPlane, node: &str, tools: &Tools) -> Kubelet {
        let began = Instant::now();
        let images = images(tools);
        let dir = tempfile::Builder::new()
            .prefix("kvstrap-kubelet-")
            .tempdir()
            .unwrap();
        let base = dir.path().to_path_buf();
        // Dropped (and so cleaned up) if anything below panics.
        let mut k = Kubelet {
            node: node.to_string(),
            root: base.join("root"),
            socket: base.join("containerd.sock"),
            pod_logs: base.join("pod-logs"),
            port: super::control_plane::free_port(),
            ctr: tools.ctr.clone(),
            losetup: tools.losetup.clone(),
            startup: Startup::default(),
            kubelet: None,
            containerd: None,
            lease: None,
            dir: Some(dir),
            base,
        };
        k.lease = Some(HostLease::acquire());
        k.start_containerd(tools, &images);
        k.startup.containerd = began.elapsed();
        let registering = Instant::now();
        k.start_kubelet(cp);
        k.startup.node_registered = registering.elapsed();
        eprintln!(
            "kubelet {node}: containerd up with the images in {:.1} s, node registered {:.1} s \
             after the kubelet started; root dir {}",
            k.startup.containerd.as_secs_f64(),
            k.startup.node_registered.as_secs_f64(),
            k.root.display()
        );
        k
    }

    fn start_containerd(&mut self, tools: &Tools, images: &Images) {
        let b = &self.base;
        for d in [
            "containerd/root",
            "containerd/state",
            "containerd/tmp",
            "cni/bin",
            "cni/net.d",
        ] {
            std::fs::create_dir_all(b.join(d)).unwrap();
        }
        let config = b.join("containerd.toml");
        std::fs::write(&config, containerd_config(b, &self.socket, &tools.runc)).unwrap();
        let mut cmd = Command::new(&tools.containerd);
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", search_path(tools));
        let mut p = Proc::spawn("containerd", b, &mut cmd);
        let (ctr, socket) = (self.ctr.clone(), self.socket.clone());
        super::control_plane::wait_until("containerd", &mut p, || {
            socket.exists()
                && run_for(
                    Command::new(&ctr)
                        .arg("--address")
                        .arg(&socket)
                        .arg("version"),
                    Duration::from_secs(5),
                )
                .is_some_and(|o| o.status.success())
        });
        self.containerd = Some(p);
        let plugins = self.ctr_ok(&["plugins", "ls"]);
        let cri_ok = plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.grpc.v1")
                && f.get(1) == Some(&"cri")
                && f.last() == Some(&"ok")
        });
        assert!(
            cri_ok,
            "containerd's CRI plugin did not load:\n{plugins}\n{}",
            self.logs()
        );
        for tar in [&images.pause, &images.workload] {
            self.ctr_ok(&["-n", K8S_NS, "images", "import", &tar.display().to_string()]);
        }
    }

    fn start_kubelet(&mut self, cp: &ControlPlane) {
        let b = &self.base;
        for d in [&self.root, &self.pod_logs, &b.join("volume-plugins")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let config = b.join("kubelet.yaml");
        std::fs::write(
            &config,
            kubelet_config(
                &self.socket,
                self.port,
                &self.pod_logs,
                &b.join("volume-plugins"),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&cp.assets().kubelet);
        cmd.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg(format!("--config={}", config.display()))
            .arg(format!("--hostname-override={}", self.node))
            .arg(format!("--root-dir={}", self.root.display()))
            // Its serving certificate; the default is /var/lib/kubelet/pki whatever
            // --root-dir says.
            .arg(format!("--cert-dir={}", b.join("pki").display()))
            // losetup, mount, umount for the volume plugins.
            .env("PATH", search_path_env());
        let mut p = Proc::spawn("kubelet", b, &mut cmd);
        let path = format!("/api/v1/nodes/{}", self.node);
        super::control_plane::wait_until("kubelet registers its Node", &mut p, || {
            cp.get(&path)
                .and_then(|body| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|v| v["kind"] == "Node")
        });
        self.kubelet = Some(p);
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The kubelet's `--root-dir` (a fresh temp dir): pods' volumes are mounted at
    /// `<root>/pods/<uid>/volumes/kubernetes.io~local-volume/<pv>`, Block volumes mapped
    /// under `<root>/plugins/kubernetes.io~local-volume/volumeDevices/<pv>/<uid>`.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// containerd's socket (`ctr --address <it> -n k8s.io ...`).
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// The kubelet's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long the start took.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// The `/proc/self/mountinfo` lines of the mounts below the kubelet's root dir (its own
    /// bind mount of the root dir, the volumes it mounted, the device nodes it bound).
    pub fn mounts(&self) -> Vec<String> {
        mountinfo_below(&self.root)
            .into_iter()
            .map(|m| m.line)
            .collect()
    }

    /// The loop devices the kubelet attached (for Block volumes) as `(/dev/loopN,
    /// backing_file)`, from `/sys/block/loop*/loop/backing_file`.
    pub fn loop_devices(&self) -> Vec<(PathBuf, String)> {
        loops_below(&self.base)
    }

    /// What the containers of pod `default/<pod>` printed (the kubelet's pod logs).
    pub fn pod_log(&self, pod: &str) -> String {
        let mut out = String::new();
        for d in read_dir_sorted(&self.pod_logs) {
            let name = d
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with(&format!("default_{pod}_")) {
                for c in read_dir_sorted(&d) {
                    for f in read_dir_sorted(&c) {
                        out += &std::fs::read_to_string(&f).unwrap_or_default();
                    }
                }
            }
        }
        out
    }

    /// The tail of the kubelet's and containerd's logs and of every container's log, for
    /// failure messages.
    pub fn logs(&self) -> String {
        let mut out = Vec::new();
        for (p, n) in [(&self.kubelet, 40), (&self.containerd, 15)] {
            if let Some(p) = p {
                out.push(format!(
                    "--- {} ({})\n{}",
                    p.name(),
                    p.log.display(),
                    p.tail_lines(n)
                ));
            }
        }
        for pod in read_dir_sorted(&self.pod_logs) {
            for c in read_dir_sorted(&pod) {
                for f in read_dir_sorted(&c) {
                    let text = std::fs::read_to_string(&f).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    out.push(format!(
                        "--- {}\n{}",
                        f.display(),
                        lines[lines.len().saturating_sub(10)..].join("\n")
                    ));
                }
            }
        }
        out.join("\n")
    }

    /// `ctr --address <socket> args...`: its stdout; panics with its stderr on failure.
    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = run_for(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("ctr {args:?} did not finish in 60 s"));
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr ... args` for the teardown: stdout, or nothing when it fails or hangs.
    fn ctr_quiet(&self, args: &[&str]) -> String {
        run_for(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(10),
        )
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    }

    /// The containerd-shim processes of this containerd.
    fn shims(&self) -> Vec<u32> {
        let socket = self.socket.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first().is_some_and(|a| {
                    a.rsplit('/')
                        .next()
                        .unwrap_or("")
                        .starts_with("containerd-shim")
                }) && args
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == socket)
            })
            .collect()
    }

    fn teardown(&mut self) {
        // 1. The kubelet first: it would restart what we stop.
        if let Some(mut k) = self.kubelet.take() {
            k.stop();
        }
        // 2. What the containers run: SIGKILL to every process below a shim (each
        //    container's init, which takes its PID namespace with it). containerd sees
        //    them exit and deletes their tasks; a shim exits when its last task is gone.
        if self.containerd.as_mut().is_some_and(Proc::alive) {
            let shims = self.shims();
            for pid in shims.iter().flat_map(|s| descendants(*s)) {
                kill(pid);
            }
            let start = Instant::now();
            loop {
                let tasks = self.ctr_quiet(&["-n", K8S_NS, "tasks", "ls", "-q"]);
                let ids: Vec<&str> = tasks.split_whitespace().collect();
                if ids.is_empty() || start.elapsed() > Duration::from_secs(10) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(2) {
                    for id in ids {
                        self.ctr_quiet(&["-n", K8S_NS, "tasks", "delete", "--force", id]);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // 3. containerd, then any shim it left (and whatever still runs below one).
        if let Some(mut c) = self.containerd.take() {
            c.stop();
        }
        for shim in self.shims() {
            for pid in descendants(shim) {
                kill(pid);
            }
            kill(shim);
        }
        // 4. Loop devices the kubelet attached for Block volumes and did not detach: their
        //    backing file is the device node it bound below its root dir. Before the
        //    unmount: once that bind mount is detached, sysfs shows the backing file as `/`.
        for (dev, backing) in loops_below(&self.base) {
            eprintln!("detaching {} (backing file {backing})", dev.display());
            let _ = Command::new(&self.losetup).arg("-d").arg(&dev).status();
        }
        // 5. Mounts below the temp dir (the kubelet's root dir and what it mounted there,
        //    sandboxes' shm, container rootfs), deepest first, lazily.
        unmount_below(&self.base);
        // 6. The kubelet's symlinks to this pod logs dir in /var/log/containers.
        for link in read_dir_sorted(Path::new("/var/log/containers")) {
            if std::fs::read_link(&link).is_ok_and(|t| t.starts_with(&self.pod_logs)) {
                let _ = std::fs::remove_file(&link);
            }
        }
        // 7. What the kubelet and containerd changed outside (last one out puts it back).
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let began = Instant::now();
        self.teardown();
        eprintln!(
            "kubelet {}: stopped and cleaned up in {:.1} s",
            self.node,
            began.elapsed().as_secs_f64()
        );
    }
}

fn containerd_config(base: &Path, socket: &Path, runc: &Path) -> String {
    let p = |rel: &str| format!("{:?}", base.join(rel).display().to_string());
    format!(
        r#"version = 2
root = {root}
state = {state}
temp = {temp}
# Snapshotters and tracing this harness does not use: fewer plugins, faster start.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket:?}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  # Without it every sandbox fails: "can't get final child's PID from pipe".
  disable_hugetlb_controller = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = {runc:?}
      Root = {runc_root}
"#,
        root = p("containerd/root"),
        state = p("containerd/state"),
        temp = p("containerd/tmp"),
        socket = socket.display().to_string(),
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/net.d"),
        runc = runc.display().to_string(),
        runc_root = p("containerd/runc"),
    )
}

fn kubelet_config(socket: &Path, port: u16, pod_logs: &Path, plugins: &Path) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://{socket}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzPort: 0
evictionHard: {{}}
# Never delete the imported images (they cannot be pulled again).
imageGCHighThresholdPercent: 100
# No KUBE-* chains in the host's iptables.
makeIPTablesUtilChains: false
podLogsDir: {pod_logs}
# Flexvolume drivers; the default is /usr/libexec/kubernetes/..., created if missing.
volumePluginDir: {plugins}
",
        socket = socket.display(),
        pod_logs = pod_logs.display(),
        plugins = plugins.display(),
    )
}

/// `PATH` for containerd: where runc and the shim are, then the usual directories.
fn search_path(tools: &Tools) -> String {
    let dirs: Vec<String> = [&tools.runc, &tools.shim]
        .iter()
        .filter_map(|p| p.parent().map(|d| d.display().to_string()))
        .collect();
    format!("{}:{}", dirs.join(":"), search_path_env())
}

/// The test's `PATH` and the system directories (losetup, mount live in /usr/sbin).
fn search_path_env() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

/// Runs `cmd` with its output captured; `None` when it cannot start or outlives `limit`
/// (then it is killed).
fn run_for(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Every process below `pid`, from `/proc/PID/task/TID/children`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for task in read_dir_sorted(Path::new(&format!("/proc/{p}/task"))) {
            let children = std::fs::read_to_string(task.join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(c);
                todo.push(c);
            }
        }
    }
    found
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountLine {
    /// The whole line.
    pub line: String,
    /// Field 4: the path inside the source filesystem the mount shows.
    pub root: String,
    /// Field 5, unescaped.
    pub mount_point: PathBuf,
    /// The source after ` - fstype `.
    pub source: String,
}

/// `\040` and the like of mountinfo, decoded.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts at or below `dir`, from `/proc/self/mountinfo`, in its order.
pub fn mountinfo_below(dir: &Path) -> Vec<MountLine> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let f: Vec<&str> = pre.split_whitespace().collect();
            Some(MountLine {
                line: line.to_string(),
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                source: unescape(post.split_whitespace().nth(1)?),
            })
        })
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// Lazily unmounts everything at or below `dir`, deepest first, until nothing is left.
fn unmount_below(dir: &Path) {
    for _ in 0..5 {
        let mut points: Vec<PathBuf> = mountinfo_below(dir)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points.dedup();
        for p in points {
            if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("umount -l {}: {e}", p.display());
            }
        }
    }
    let left = mountinfo_below(dir);
    if !left.is_empty() {
        eprintln!("mounts left below {}: {left:#?}", dir.display());
    }
}

/// `(/dev/loopN, backing file)` of the loop devices whose backing file is below `dir`.
fn loops_below(dir: &Path) -> Vec<(PathBuf, String)> {
    read_dir_sorted(Path::new("/sys/block"))
        .into_iter()
        .filter_map(|d| {
            let name = d.file_name()?.to_str()?.to_string();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(d.join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n').to_string();
            Path::new(backing.trim_end_matches(" (deleted)"))
                .starts_with(dir)
                .then(|| (PathBuf::from(format!("/dev/{name}")), backing))
        })
        .collect()
}

// ---- images ----------------------------------------------------------------------------

struct Images {
    pause: PathBuf,
    workload: PathBuf,
}

/// The two docker-archive tars, built once per content (pause source, busybox binary) into
/// `target/tmp/kubelet-images/<hash>/`.
fn images(tools: &Tools) -> Images {
    let busybox = std::fs::read(&tools.busybox).unwrap();
    let mut h = Sha256::new();
    for part in [
        b"kvstrap-images-v1".as_slice(),
        PAUSE_C.as_bytes(),
        MOUNTPOINT_SH.as_bytes(),
        &busybox,
    ] {
        h.update(part);
        h.update([0]);
    }
    h.update(PAUSE_IMAGE.as_bytes());
    h.update(WORKLOAD_IMAGE.as_bytes());
    let key: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let top = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubelet-images");
    let dir = top.join(key);
    let images = Images {
        pause: dir.join("pause.tar"),
        workload: dir.join("workload.tar"),
    };
    if images.pause.is_file() && images.workload.is_file() {
        return images;
    }
    let began = Instant::now();
    std::fs::create_dir_all(&dir).unwrap();
    // Built beside the cache and renamed into it: concurrent builders each rename a
    // complete file.
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&top)
        .unwrap();
    let w = work.path();

    let pause_root = w.join("pause-root");
    std::fs::create_dir_all(&pause_root).unwrap();
    std::fs::write(w.join("pause.c"), PAUSE_C).unwrap();
    run_ok(
        Command::new(&tools.gcc)
            .args(["-static", "-Os", "-s", "-o"])
            .arg(pause_root.join("pause"))
            .arg(w.join("pause.c")),
        "gcc -static pause.c (needs libc6-dev)",
    );
    docker_archive(
        tools,
        &w.join("pause-image"),
        &pause_root,
        PAUSE_IMAGE,
        json!({"Entrypoint": ["/pause"]}),
        &w.join("pause.tar"),
    );

    let bb_root = w.join("busybox-root");
    let bin = bb_root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["tmp", "etc", "dev", "proc", "sys"] {
        std::fs::create_dir_all(bb_root.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bb_root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy(&tools.busybox, bin.join("busybox")).unwrap();
    let list = run_ok(Command::new(&tools.busybox).arg("--list"), "busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    assert!(bin.join("sh").exists(), "busybox --list has no sh");
    if !bin.join("mountpoint").exists() {
        // Debian 12's busybox-static has no mountpoint applet.
        std::fs::write(bin.join("mountpoint"), MOUNTPOINT_SH).unwrap();
        std::fs::set_permissions(
            bin.join("mountpoint"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    docker_archive(
        tools,
        &w.join("busybox-image"),
        &bb_root,
        WORKLOAD_IMAGE,
        json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
        &w.join("workload.tar"),
    );
    std::fs::rename(w.join("pause.tar"), &images.pause).unwrap();
    std::fs::rename(w.join("workload.tar"), &images.workload).unwrap();
    eprintln!(
        "kubelet images built in {:.1} s: {}",
        began.elapsed().as_secs_f64(),
        dir.display()
    );
    images
}

/// A docker-archive tar (`manifest.json`, a config JSON, one `layer.tar` of `rootfs`)
/// tagged `tag`, as `ctr images import` reads it.
fn docker_archive(tools: &Tools, work: &Path, rootfs: &Path, tag: &str, config: Value, out: &Path) {
    std::fs::create_dir_all(work).unwrap();
    let layer = work.join("layer.tar");
    run_ok(
        Command::new(&tools.tar)
            .args([
                "--create",
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--file",
            ])
            .arg(&layer)
            .arg("-C")
            .arg(rootfs)
            .arg("."),
        "tar (image layer)",
    );
    let digest: String = Sha256::digest(std::fs::read(&layer).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let image_config = json!({
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    std::fs::write(work.join("config.json"), image_config.to_string()).unwrap();
    let manifest = json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]);
    std::fs::write(work.join("manifest.json"), manifest.to_string()).unwrap();
    run_ok(
        Command::new(&tools.tar)
            .args([
                "--create",
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--file",
            ])
            .arg(out)
            .arg("-C")
            .arg(work)
            .args(["manifest.json", "config.json", "layer.tar"]),
        "tar (docker archive)",
    );
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---- what the kubelet changes outside its directories -----------------------------------

/// Sysctls the kubelet's container manager sets at start-up (`setupKernelTunables`).
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Host directories the kubelet or containerd create whatever their configuration says.
const HOST_DIRS: &[&str] = &["/var/lib/kubelet", "/var/log/containers", "/run/containerd"];

static LEASES: AtomicU64 = AtomicU64::new(0);

/// One running harness kubelet, registered in a machine-wide list (a JSON file under a
/// lock in `target/tmp/`). The first one in records the sysctls and which host
/// directories exist; the last one out puts the sysctls back and removes those
/// directories if they were not there (a lease whose process died does not count).
struct HostLease {
    id: String,
}

fn lease_files() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    (dir.join("kubelet-host.lock"), dir.join("kubelet-host.json"))
}

/// `f` on the lease state (`null` when there is none), under the lock; the state is
/// written back (removed when `f` leaves `null`).
fn with_lease_state<T>(f: impl FnOnce(&mut Value) -> T) -> T {
    let (lock, state_file) = lease_files();
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    let _guard = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let mut state: Value = std::fs::read_to_string(&state_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let out = f(&mut state);
    if state.is_null() {
        let _ = std::fs::remove_file(&state_file);
    } else {
        std::fs::write(&state_file, state.to_string()).unwrap();
    }
    out
}

fn live_holders(state: &Value, except: &str) -> Vec<Value> {
    state["holders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| {
            h.as_str().is_some_and(|h| {
                h != except
                    && h.split(':')
                        .next()
                        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            })
        })
        .cloned()
        .collect()
}

/// The `k8s.io` cgroup of every cgroup v1 hierarchy (and of cgroup v2).
fn cgroup_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = read_dir_sorted(Path::new("/sys/fs/cgroup"))
        .into_iter()
        .filter(|d| d.is_dir())
        .map(|d| d.join("k8s.io"))
        .collect();
    dirs.push(PathBuf::from("/sys/fs/cgroup/k8s.io"));
    dirs
}

impl HostLease {
    fn acquire() -> HostLease {
        let id = format!(
            "{}:{}",
            std::process::id(),
            LEASES.fetch_add(1, Ordering::SeqCst)
        );
        with_lease_state(|state| {
            let mut holders = live_holders(state, &id);
            if state.is_null() {
                let sysctls: serde_json::Map<String, Value> = SYSCTLS
                    .iter()
                    .filter_map(|s| {
                        let v = std::fs::read_to_string(format!("/proc/sys/{s}")).ok()?;
                        Some((s.to_string(), Value::String(v.trim().to_string())))
                    })
                    .collect();
                let absent: Vec<String> = HOST_DIRS
                    .iter()
                    .map(PathBuf::from)
                    .chain(cgroup_dirs())
                    .filter(|p| !p.exists())
                    .map(|p| p.display().to_string())
                    .collect();
                *state = json!({"sysctls": sysctls, "absent": absent});
            } else if holders.is_empty() {
                eprintln!(
                    "a harness kubelet died without putting the host back: its record is kept"
                );
            }
            holders.push(Value::String(id.clone()));
            state["holders"] = Value::Array(holders);
        });
        HostLease { id }
    }

    fn release(self) {
        with_lease_state(|state| {
            let holders = live_holders(state, &self.id);
            if !holders.is_empty() {
                state["holders"] = Value::Array(holders);
                return;
            }
            restore_host(state);
            *state = Value::Null;
        });
    }
}

fn restore_host(state: &Value) {
    for (s, want) in state["sysctls"].as_object().into_iter().flatten() {
        let path = format!("/proc/sys/{s}");
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        let want = want.as_str().unwrap_or_default();
        if now.trim() != want {
            match std::fs::write(&path, want) {
                Ok(()) => eprintln!("sysctl {s}: {} put back to {want}", now.trim()),
                Err(e) => eprintln!("cannot put sysctl {s} back to {want}: {e}"),
            }
        }
    }
    let absent: Vec<&str> = state["absent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let was_absent = |p: &str| absent.contains(&p);
    if was_absent("/var/lib/kubelet") {
        let plugins = Path::new("/var/lib/kubelet/device-plugins");
        for f in ["kubelet.sock", "kubelet_internal_checkpoint"] {
            let _ = std::fs::remove_file(plugins.join(f));
        }
        remove_empty_dirs(&[plugins, Path::new("/var/lib/kubelet")]);
    }
    if was_absent("/var/log/containers") {
        remove_empty_dirs(&[Path::new("/var/log/containers")]);
    }
    if was_absent("/run/containerd") {
        remove_empty_dirs(&[
            Path::new("/run/containerd/s"),
            Path::new("/run/containerd/runc/k8s.io"),
            Path::new("/run/containerd/runc"),
            Path::new("/run/containerd"),
        ]);
    }
    for cg in cgroup_dirs() {
        // rmdir of a cgroup fails while it has children or processes.
        if was_absent(&cg.display().to_string()) && cg.exists() {
            if let Err(e) = std::fs::remove_dir(&cg) {
                eprintln!("cannot remove cgroup {}: {e}", cg.display());
            }
        }
    }
}

/// Removes each of `dirs` (in order) if it is empty; says what is left otherwise.
fn remove_empty_dirs(dirs: &[&Path]) {
    for d in dirs {
        if d.exists() {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("left {} ({e}): {:?}", d.display(), read_dir_sorted(d));
            }
        }
    }
}
