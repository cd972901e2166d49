//! A real Kubernetes control plane for tests, the way controller-runtime's envtest does it:
//! kube-apiserver, kube-controller-manager and (on demand, `start_scheduler`)
//! kube-scheduler from an assets directory (`KVSTRAP_KUBE_ASSETS`, default
//! `../shared/kube-control-plane` beside the checkout, `.xz` files decompressed once into
//! `target/tmp/kube-assets/` and checked against `SHA256SUMS`; the kubelet of
//! `tests/support/kubelet.rs` comes from there too), etcd from Debian's `etcd-server`.
//! Each start gets free loopback ports, its own certificates (openssl CLI) and token; the
//! guard stops everything on drop, even when a test panics (SIGTERM, then wait: the
//! apiserver can take more than 10 s).

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ASSETS_ENV: &str = "KVSTRAP_KUBE_ASSETS";
const ETCD_ENV: &str = "KVSTRAP_ETCD";
pub const TOKEN: &str = "kvstrap-test-admin-token";
const STARTUP: Duration = Duration::from_secs(90);

/// Where the binaries come from.
#[derive(Debug, Clone)]
pub struct Assets {
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub etcd: PathBuf,
}

/// The binaries, or why they cannot be had (with what to do about it).
pub fn assets() -> Result<Assets, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os(ASSETS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/kube-control-plane"));
    if !dir.is_dir() {
        return Err(format!(
            "no Kubernetes control plane assets at {} (set {ASSETS_ENV} to a directory holding \
             kube-apiserver[.xz], kube-controller-manager[.xz], kube-scheduler[.xz], \
             kubelet[.xz] and SHA256SUMS)",
            dir.display()
        ));
    }
    let etcd = find_etcd().ok_or_else(|| {
        format!(
            "no etcd binary (apt-get install etcd-server, as scripts/install-deps.sh does, \
             or set {ETCD_ENV} to one)"
        )
    })?;
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kube-assets");
    Ok(Assets {
        apiserver: binary(&dir, &cache, "kube-apiserver")?,
        controller_manager: binary(&dir, &cache, "kube-controller-manager")?,
        scheduler: binary(&dir, &cache, "kube-scheduler")?,
        kubelet: binary(&dir, &cache, "kubelet")?,
        etcd,
    })
}

fn find_etcd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ETCD_ENV) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// `name` from `dir`: as is, or decompressed from `name.xz` into `cache` once; the
/// checksum in `dir/SHA256SUMS` is checked either way.
fn binary(dir: &Path, cache: &Path, name: &str) -> Result<PathBuf, String> {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))
        .map_err(|e| format!("cannot read {}/SHA256SUMS: {e}", dir.display()))?;
    let want = sums
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(_, n)| n.trim().trim_start_matches('*') == name)
        .map(|(sum, _)| sum.to_string())
        .ok_or_else(|| format!("{}/SHA256SUMS has no line for {name}", dir.display()))?;
    let plain = dir.join(name);
    if plain.is_file() {
        check_sum(&plain, &want)?;
        return Ok(plain);
    }
    let cached = cache.join(&want).join(name);
    if cached.is_file() {
        return Ok(cached);
    }
    let xz = dir.join(format!("{name}.xz"));
    if !xz.is_file() {
        return Err(format!(
            "neither {} nor {} exists",
            plain.display(),
            xz.display()
        ));
    }
    std::fs::create_dir_all(cached.parent().unwrap()).map_err(|e| e.to_string())?;
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    let out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .stdout(out)
        .status()
        .map_err(|e| {
            format!(
                "cannot run xz to decompress {} (apt-get install xz-utils): {e}",
                xz.display()
            )
        })?;
    if !status.success() {
        return Err(format!("xz -dc {} failed: {status}", xz.display()));
    }
    check_sum(&tmp, &want)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &cached).map_err(|e| e.to_string())?;
    Ok(cached)
}

fn check_sum(path: &Path, want: &str) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(format!(
            "{} has SHA-256 {got}, SHA256SUMS says {want}: replace the assets",
            path.display()
        ));
    }
    Ok(())
}

/// The control plane for `test`, or `None` (skipped, with a message) when the binaries are
/// missing. With `CI` set in the environment a missing binary fails the test instead.
pub fn start_or_skip(test: &str) -> Option<ControlPlane> {
    start_or_skip_with_users(test, &[])
}

/// The same, with more users the apiserver authenticates by token besides admin:
/// (user name, group), e.g. `("kvstrap:node:a", "kvstrap:nodes")`; their kubeconfigs come
/// from [`ControlPlane::kubeconfig_as`].
pub fn start_or_skip_with_users(test: &str, users: &[(&str, &str)]) -> Option<ControlPlane> {
    match assets() {
        Ok(a) => Some(ControlPlane::start_with_users(a, users)),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: CI must not skip the real control plane tests: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// A child process stopped on drop: SIGTERM, wait, SIGKILL only after a long grace time.
pub struct Proc {
    name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `dir/name.log`.
    pub fn spawn(name: &'static str, dir: &Path, cmd: &mut Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Last lines of the process's log, for failure messages.
    pub fn tail(&self) -> String {
        self.tail_lines(25)
    }

    /// The last `n` lines of the process's log.
    pub fn tail_lines(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let began = Instant::now();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if !self.alive() {
                eprintln!(
                    "{} stopped in {:.1} s",
                    self.name,
                    began.elapsed().as_secs_f64()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} ignored SIGTERM for 60 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// etcd + kube-apiserver + kube-controller-manager on loopback, and kube-scheduler once
/// `start_scheduler` is called.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub secure_port: u16,
    /// (user name, token) of every user besides admin.
    users: Vec<(String, String)>,
    assets: Assets,
    etcd_port: u16,
    // Dropped in this order: scheduler, controller manager, apiserver, etcd. Behind locks
    // so a test holding `&ControlPlane` can stop and start the apiserver.
    scheduler: Mutex<Option<Proc>>,
    /// `start_scheduler` was called: `start_apiserver_again` starts a fresh one too.
    scheduler_wanted: AtomicBool,
    controller_manager: Mutex<Option<Proc>>,
    apiserver: Mutex<Option<Proc>>,
    etcd: Option<Proc>,
}

impl ControlPlane {
    pub fn start(assets: Assets) -> ControlPlane {
        ControlPlane::start_with_users(assets, &[])
    }

    /// Starts it with token users besides admin: (user name, group).
    pub fn start_with_users(assets: Assets, users: &[(&str, &str)]) -> ControlPlane {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("kvstrap-kube-")
            .tempdir()
            .unwrap();
        certificates(dir.path());
        // token,user,uid,"groups": the apiserver's --token-auth-file.
        let mut tokens = format!("{TOKEN},admin,admin,\"system:masters\"\n");
        let mut named = Vec::new();
        for (i, (name, group)) in users.iter().enumerate() {
            let token = format!("kvstrap-test-user-{i}");
            tokens.push_str(&format!("{token},{name},{name},\"{group}\"\n"));
            named.push((name.to_string(), token));
        }
        std::fs::write(dir.path().join("tokens.csv"), tokens).unwrap();
        let secure_port = free_port();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(dir.path(), secure_port)).unwrap();
        let mut cp = ControlPlane {
            etcd_port: 0,
            dir,
            kubeconfig,
            secure_port,
            users: named,
            assets,
            scheduler: Mutex::new(None),
            scheduler_wanted: AtomicBool::new(false),
            controller_manager: Mutex::new(None),
            apiserver: Mutex::new(None),
            etcd: None,
        };
        cp.start_etcd();
        cp.start_apiserver();
        cp.start_controller_manager();
        eprintln!(
            "control plane up in {:.1} s: kubeconfig {}",
            started.elapsed().as_secs_f64(),
            cp.kubeconfig.display()
        );
        cp
    }

    fn start_etcd(&mut self) {
        let (client, peer) = (free_port(), free_port());
        let data = self.dir.path().join("etcd-data");
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(&self.assets.etcd);
        cmd.arg("--data-dir")
            .arg(&data)
            .args(["--name", "kvstrap-test"])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("kvstrap-test={peer_url}"))
            .args(["--listen-metrics-urls", ""]);
        let mut etcd = Proc::spawn("etcd", self.dir.path(), &mut cmd);
        self.etcd_port = client;
        wait_until("etcd /health", &mut etcd, || {
            http_get(client, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
        });
        self.etcd = Some(etcd);
    }

    fn start_apiserver(&self) {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.assets.apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
        .arg(format!("--secure-port={}", self.secure_port))
        .arg(format!(
            "--tls-cert-file={}",
            d.join("server.crt").display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            d.join("server.key").display()
        ))
        .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
        .arg(format!(
            "--token-auth-file={}",
            d.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            d.join("sa.pub").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            d.join("sa.key").display()
        ))
        .args([
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
        ])
        .arg(format!(
            "--cert-dir={}",
            d.join("apiserver-certs").display()
        ));
        let mut apiserver = Proc::spawn("kube-apiserver", d, &mut cmd);
        let ca = d.join("ca.crt");
        let port = self.secure_port;
        wait_until("kube-apiserver /readyz", &mut apiserver, || {
            curl(&ca, port, "/readyz").is_some_and(|b| b.trim() == "ok")
        });
        *self.apiserver.lock().unwrap() = Some(apiserver);
    }

    fn start_controller_manager(&self) {
        self.start_controller_manager_with(&[]);
    }

    /// Restarts kube-controller-manager with extra flags (e.g. `--kube-api-qps=100`: its
    /// own client throttles it to 20 requests/s by default).
    pub fn restart_controller_manager(&self, extra: &[&str]) {
        let old = self.controller_manager.lock().unwrap().take();
        drop(old);
        self.start_controller_manager_with(extra);
    }

    fn start_controller_manager_with(&self, extra: &[&str]) {
        let mut cmd = Command::new(&self.assets.controller_manager);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(
                "--controllers=persistentvolume-binder-controller,persistentvolume-expander-controller,\
                 persistentvolume-protection-controller,persistentvolumeclaim-protection-controller",
            )
            .args([
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--secure-port=0",
                // Faster periodic syncs than the 15 s default, so tests wait less.
                "--pvclaimbinder-sync-period=2s",
            ])
            .args(extra);
        *self.controller_manager.lock().unwrap() = Some(Proc::spawn(
            "kube-controller-manager",
            self.dir.path(),
            &mut cmd,
        ));
    }

    /// Starts kube-scheduler (no-op when it runs): it places pods, and its volume binder
    /// binds WaitForFirstConsumer claims. Stopped with the apiserver, restarted by
    /// `start_apiserver_again`. It serves nothing (`--secure-port 0`), so there is no
    /// readiness to wait for: a pod created before its informers synced waits in the
    /// scheduling queue.
    pub fn start_scheduler(&self) {
        self.scheduler_wanted.store(true, Ordering::SeqCst);
        let mut slot = self.scheduler.lock().unwrap();
        if slot.is_none() {
            *slot = Some(self.spawn_scheduler());
        }
    }

    fn spawn_scheduler(&self) -> Proc {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut cmd = Command::new(&self.assets.scheduler);
        cmd.arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            .args(["--leader-elect=false", "--secure-port=0"]);
        let mut p = Proc::spawn("kube-scheduler", self.dir.path(), &mut cmd);
        assert!(p.alive(), "kube-scheduler exited at once:\n{}", p.tail());
        p
    }

    /// Whether kube-scheduler runs (it was started and has not exited).
    pub fn scheduler_running(&self) -> bool {
        self.scheduler
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(Proc::alive)
    }

    /// Stops the apiserver (and the scheduler and controller manager, which must be
    /// restarted with it).
    pub fn stop_apiserver(&self) {
        let scheduler = self.scheduler.lock().unwrap().take();
        drop(scheduler);
        let cm = self.controller_manager.lock().unwrap().take();
        drop(cm);
        let api = self.apiserver.lock().unwrap().take();
        drop(api);
    }

    /// Starts the apiserver again on the same port, then a fresh controller manager, and
    /// a fresh scheduler if `start_scheduler` was called.
    pub fn start_apiserver_again(&self) {
        self.stop_apiserver();
        self.start_apiserver();
        self.start_controller_manager();
        if self.scheduler_wanted.load(Ordering::SeqCst) {
            *self.scheduler.lock().unwrap() = Some(self.spawn_scheduler());
        }
    }

    /// The binaries this control plane runs (and the kubelet beside them).
    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    /// The CA that signed the apiserver's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A client with the admin credential.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig with the token of `user` (one of those it was started with).
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let token = self
            .users
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, token)| token)
            .unwrap_or_else(|| panic!("the control plane was not started with user {user}"));
        let admin = kubeconfig_text(self.dir.path(), self.secure_port);
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", user.replace(':', "-")));
        std::fs::write(&path, admin.replace(TOKEN, token)).unwrap();
        path
    }

    /// A kubeconfig like `kubeconfig`, for a server at 127.0.0.1:`port` that presents this
    /// control plane's certificate (a proxy in front of the apiserver).
    pub fn kubeconfig_at(&self, port: u16) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{port}"));
        std::fs::write(&path, kubeconfig_text(self.dir.path(), port)).unwrap();
        path
    }

    /// The tail of every log, for a failure message.
    pub fn logs(&self) -> String {
        let tail = |p: &Proc| format!("--- {} ({})\n{}", p.name, p.log.display(), p.tail());
        let mut out: Vec<String> = self.etcd.iter().map(tail).collect();
        out.extend(self.apiserver.lock().unwrap().iter().map(tail));
        out.extend(self.controller_manager.lock().unwrap().iter().map(tail));
        out.extend(self.scheduler.lock().unwrap().iter().map(tail));
        out.join("\n")
    }

    /// `GET path` on the apiserver as admin (curl: no second TLS stack in the tests).
    pub fn get(&self, path: &str) -> Option<String> {
        curl(&self.dir.path().join("ca.crt"), self.secure_port, path)
    }

    /// `apiserver_request_total` summed over the series matching every `label="value"`.
    pub fn request_total(&self, filters: &[(&str, &str)]) -> u64 {
        let text = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| {
                filters
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            // Counters print as integers, or as floats like `1e+06` past a million.
            .filter_map(|l| {
                let v = l.rsplit(' ').next()?;
                v.parse::<u64>().ok().or_else(|| {
                    let f = v.parse::<f64>().ok()?;
                    format!("{f:.0}").parse().ok()
                })
            })
            .sum()
    }

    /// Writes (create, update, patch, apply, delete) to `resource` since the server started.
    pub fn writes(&self, resource: &str) -> u64 {
        [
            "POST",
            "PUT",
            "PATCH",
            "APPLY",
            "DELETE",
            "DELETECOLLECTION",
        ]
        .iter()
        .map(|verb| self.request_total(&[("resource", resource), ("verb", verb)]))
        .sum()
    }
}

impl Drop for ControlPlane {
    /// Scheduler, controller manager, apiserver, etcd, in that order; then the directory
    /// goes.
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.take() {
            etcd.stop();
        }
    }
}

/// Polls `ready` every 100 ms until it holds; panics with the log of `p` when `p` exits or
/// after 90 s.
pub fn wait_until(what: &str, p: &mut Proc, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if ready() {
            return;
        }
        assert!(p.alive(), "{what}: {} exited:\n{}", p.name, p.tail());
        assert!(
            start.elapsed() < STARTUP,
            "{what}: not ready after {STARTUP:?}:\n{}",
            p.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Plain-HTTP GET on loopback (etcd's health endpoint).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn curl(ca: &Path, port: u16, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and the service-account key pair.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=kvstrap-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=kube-apiserver"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sa.key",
        ],
    );
    openssl(dir, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

fn kubeconfig_text(dir: &Path, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n\
         \x20   certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
        ca = dir.join("ca.crt").display()
    )
}
