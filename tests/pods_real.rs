//! kvstrap's volumes used by real pods: the real control plane with its scheduler, Debian's
//! containerd and a real kubelet (`tests/support/kubelet.rs`) on this machine, kvstrap's
//! real binary on loop disks this test makes. Pods claim kvstrap's classes with
//! WaitForFirstConsumer claims, the scheduler binds them, the kubelet bind-mounts the
//! volumes (or maps the Block ones) and the pods write. Then:
//!
//! - `running_pods_keep_their_volumes_through_every_trigger_root`: with pods on a shared,
//!   a subPath, a separate and a Block volume (and two pods on one shared disk), the
//!   daemon's reload, a hot-plugged disk and its periodic resync, and `kvstrap apply` with
//!   10 pods running change nothing: empty plan, every PV kept as it was, the data intact,
//!   each use named with its pod in `kvstrap volumes` and D-Bus `Volumes`;
//! - `drain_and_reclaim_wait_for_the_kubelet_root`: a volume whose claim is forced away
//!   while its pod runs is not scrubbed (`VolumeInUse`) until the kubelet unmounted it, the
//!   next tenant never sees the previous one's data (directory and Block), and a drain
//!   waits for the pod and finishes once it is deleted;
//! - `dynamic_volumes_are_used_by_real_pods_root`: claims of a dynamic class are placed by
//!   the scheduler on the room the daemon published, served with a directory and a
//!   pre-bound PV, mounted by the kubelet and written by the pods; a deleted claim's
//!   directory and PV go once its pod has gone, and the room comes back.
//!
//! Needs root, the control plane assets (with kubelet and kube-scheduler), containerd,
//! runc, gcc with libc6-dev and busybox-static; skipped without them, with a message
//! (with `CI` set a missing one fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
mod daemon_support;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/pods.rs"]
mod pods;

use common::node::{class, group, group_of, ok, Node};
use common::{require_root, LoopDisk, NamedLoop};
use daemon_support::{eventually, DaemonProcess, NotifySocket, TestBus};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use pods::{Attach, VolumeMode, SLEEP_FOREVER};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// `[node] name` of `common::node::Node`: the kubelet registers under the same name, so
/// kvstrap's PVs (affined to it) are this kubelet's.
const NODE: &str = "test-node";
const WAIT: Duration = Duration::from_secs(90);

/// Everything a case needs: the control plane with its scheduler, the kubelet, a runtime
/// and an admin client. Logs are printed when the case fails.
struct Cluster {
    cp: control_plane::ControlPlane,
    kubelet: kubelet::Kubelet,
    rt: tokio::runtime::Runtime,
    client: Client,
}

fn cluster(test: &str) -> Option<Cluster> {
    if !require_root(test) {
        return None;
    }
    let (cp, rt, client) = cases::start(test)?;
    cp.start_scheduler();
    let kubelet = kubelet::start_or_skip(&cp, NODE, test)?;
    Some(Cluster {
        cp,
        kubelet,
        rt,
        client,
    })
}

impl Cluster {
    /// Makes the disks and the node with `setup`, runs `body` on them, then stops the
    /// kubelet (its pods unmount) before the disks and the node go, also when `body`
    /// failed; on failure prints the kubelet's and the control plane's logs.
    fn run<R>(self, setup: impl FnOnce(&Cluster) -> R, body: impl FnOnce(&Cluster, &mut R)) {
        let mut made = setup(&self);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&self, &mut made)));
        if result.is_err() {
            eprintln!("kubelet logs:\n{}", self.kubelet.logs());
            eprintln!("control plane logs:\n{}", self.cp.logs());
        }
        let Cluster {
            cp, kubelet, rt, ..
        } = self;
        rt.shutdown_timeout(Duration::from_secs(5));
        drop(kubelet);
        drop(made);
        drop(cp);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn kubeconfig_toml(&self) -> String {
        format!(
            "[kubernetes]\npublish = true\nkubeconfig = {:?}\n\n",
            self.cp.kubeconfig.display().to_string()
        )
    }

    /// Creates a WaitForFirstConsumer claim and a pod using it; waits until it runs.
    /// Returns the time from the pod's creation to Running and its uid.
    fn pod(
        &self,
        name: &str,
        claim: (&str, &str, VolumeMode),
        how: Attach<'_>,
        command: &str,
    ) -> (Duration, String) {
        let (claim, class, mode) = claim;
        self.block_on(async {
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), "default")
                .create(
                    &PostParams::default(),
                    &pods::wffc_claim(claim, class, mode, "16Mi"),
                )
                .await
                .unwrap();
            let pod = pods::pod_with_claim(name, claim, how, command);
            pods::run_pod(&self.client, &pod, WAIT).await
        })
    }

    fn delete_pod(&self, name: &str) {
        self.block_on(pods::delete_pod_and_wait(&self.client, name, 1, WAIT));
    }

    fn delete_claim(&self, name: &str) {
        self.block_on(async {
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), "default")
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        });
    }

    /// The node's PVs by name.
    fn pvs(&self) -> BTreeMap<String, PersistentVolume> {
        self.block_on(async {
            Api::<PersistentVolume>::all(self.client.clone())
                .list(&ListParams::default().labels(&format!("kvstrap.io/node={NODE}")))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|pv| (pv.metadata.name.clone().unwrap(), pv))
                .collect()
        })
    }

    /// Waits until `check` holds for the node's PVs.
    fn wait_pvs(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, PersistentVolume>) -> bool,
    ) -> BTreeMap<String, PersistentVolume> {
        let start = Instant::now();
        loop {
            let pvs = self.pvs();
            if check(&pvs) {
                return pvs;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: not after {WAIT:?}: {:#?}",
                summary(&pvs)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The PV bound to claim `default/claim`.
    fn pv_of(&self, claim: &str) -> String {
        self.block_on(async {
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), "default")
                .get(claim)
                .await
                .unwrap()
                .spec
                .and_then(|s| s.volume_name)
                .unwrap_or_else(|| panic!("claim {claim} is not bound"))
        })
    }

    fn events(&self, pv: &str, reason: &str) -> Vec<Event> {
        self.block_on(async {
            Api::<Event>::namespaced(self.client.clone(), "default")
                .list(&ListParams::default().fields(&format!("involvedObject.name={pv}")))
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .collect()
        })
    }
}

fn phase(pv: &PersistentVolume) -> String {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

fn local_path(pv: &PersistentVolume) -> PathBuf {
    PathBuf::from(&pv.spec.as_ref().unwrap().local.as_ref().unwrap().path)
}

/// `name: phase uid rv` of each PV, for comparisons and failure messages.
fn summary(pvs: &BTreeMap<String, PersistentVolume>) -> BTreeMap<String, String> {
    pvs.iter()
        .map(|(n, pv)| {
            let m = &pv.metadata;
            (
                n.clone(),
                format!(
                    "{} uid={} rv={}",
                    phase(pv),
                    m.uid.clone().unwrap_or_default(),
                    m.resource_version.clone().unwrap_or_default()
                ),
            )
        })
        .collect()
}

fn all_available(n: usize) -> impl Fn(&BTreeMap<String, PersistentVolume>) -> bool {
    move |pvs| pvs.len() == n && pvs.values().all(|pv| phase(pv) == "Available")
}

/// The first `len` bytes of a device.
fn head(device: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    std::fs::File::open(device)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

/// `kvstrap volumes -o json`, by PV name (volumes without a PV are left out).
fn volumes_by_pv(node: &Node) -> BTreeMap<String, Value> {
    node.volumes()
        .into_iter()
        .filter_map(|v| Some((v["pv_name"].as_str()?.to_string(), v)))
        .collect()
}

fn pod_uids_of(v: &Value) -> Vec<String> {
    let mut uids: Vec<String> = v["uses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["pod_uid"].as_str().map(str::to_string))
        .collect();
    uids.sort();
    uids.dedup();
    uids
}

/// A pod that writes `marker` to `file` once, then appends a line to `file.log` every
/// half second until it is stopped.
fn writer(file: &str, marker: &str) -> String {
    format!(
        "echo {marker} > {file} && trap 'exit 0' TERM; while true; do date >> {file}.log; sleep 0.5; done"
    )
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// "apply finished" lines the daemon logged so far: one per run.
fn runs(daemon: &DaemonProcess) -> usize {
    daemon.stderr().matches("apply finished:").count()
}

#[test]
fn running_pods_keep_their_volumes_through_every_trigger_root() {
    const TEST: &str = "running_pods_keep_their_volumes_through_every_trigger_root";
    if !daemon_support::can_run(TEST) {
        return;
    }
    let Some(c) = cluster(TEST) else { return };
    c.run(triggers_node, every_trigger);
}

/// Disks, a node whose policy names them, and a disk to hot-plug later.
struct TriggersNode {
    node: Node,
    hot: NamedLoop,
    _disks: [LoopDisk; 3],
    _work: tempfile::TempDir,
}

fn triggers_node(c: &Cluster) -> TriggersNode {
    let (a, b, d) = (
        LoopDisk::new(1024 * MIB),
        LoopDisk::new(512 * MIB),
        LoopDisk::new(256 * MIB),
    );
    let work = tempfile::tempdir().unwrap();
    let hot = NamedLoop::reserve(work.path(), 512 * MIB);
    let node = Node::new(&format!(
        "{}{}{}{}{}{}{}",
        c.kubeconfig_toml(),
        class("kv-shared", "xfs", "Filesystem"),
        class("kv-sep", "ext4", "Filesystem"),
        class("kv-raw", "ext4", "Block"),
        group("shared", "kv-shared", "shared", &[&a], "volume_count = 12"),
        group_of(
            "sep",
            "kv-sep",
            "separate",
            &[&b.path, &hot.path],
            "volume_count = 2"
        ),
        group("raw", "kv-raw", "separate", &[&d], "volume_count = 2"),
    ));
    TriggersNode {
        node,
        hot,
        _disks: [a, b, d],
        _work: work,
    }
}

fn every_trigger(c: &Cluster, made: &mut TriggersNode) {
    let TriggersNode { node, hot, .. } = made;
    let node = &*node;
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let cmd = node.command(&["daemon"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let policy = node.dir.path().join("policy.toml");
    let lock = node.dir.path().join("lock").display().to_string();
    let resync = "4".to_string();
    let daemon = DaemonProcess::spawn_full(
        cmd,
        dir,
        policy,
        &bus,
        &notify,
        &[
            ("KVSTRAP_LOCK", lock.as_str()),
            ("KVSTRAP_RESYNC_SECS", resync.as_str()),
            ("KVSTRAP_LOG", "info"),
        ],
        &[],
    );
    assert!(
        notify.wait_for("READY=1", WAIT),
        "daemon not ready: {}",
        daemon.stderr()
    );
    // 12 shared + 2 separate + 2 Block, Available.
    c.wait_pvs("16 PVs Available", all_available(16));

    // Pods: a shared volume, a subPath of another (two pods on one shared disk), a
    // separate volume and a Block volume. Each writes a marker and keeps writing.
    let mut running = Vec::new();
    running.push(c.pod(
        "shared",
        ("shared", "kv-shared", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &writer("/data/marker", "shared-data"),
    ));
    running.push(c.pod(
        "subpath",
        ("subpath", "kv-shared", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: Some("vm"),
        },
        &writer("/data/marker", "subpath-data"),
    ));
    running.push(c.pod(
        "sep",
        ("sep", "kv-sep", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &writer("/data/marker", "separate-data"),
    ));
    running.push(c.pod(
        "raw",
        ("raw", "kv-raw", VolumeMode::Block),
        Attach::Device { path: "/dev/xvda" },
        &format!("printf block-data | dd of=/dev/xvda conv=notrunc 2>/dev/null && sync && {SLEEP_FOREVER}"),
    ));
    let to_running: Vec<f64> = running.iter().map(|(d, _)| d.as_secs_f64()).collect();
    eprintln!("FIGURE pod creation to Running with a kvstrap volume: {to_running:.2?} s");
    let uid = |i: usize| running[i].1.clone();
    let pv = |claim: &str| c.pv_of(claim);
    let (pv_shared, pv_sub, pv_sep, pv_raw) = (pv("shared"), pv("subpath"), pv("sep"), pv("raw"));

    // What kvstrap says of them: each volume used by its pod, on the host and over D-Bus.
    let by_pv = volumes_by_pv(node);
    assert_eq!(
        pod_uids_of(&by_pv[&pv_shared]),
        vec![uid(0)],
        "{:#}",
        by_pv[&pv_shared]
    );
    assert_eq!(
        pod_uids_of(&by_pv[&pv_sub]),
        vec![uid(1)],
        "{:#}",
        by_pv[&pv_sub]
    );
    assert_eq!(
        pod_uids_of(&by_pv[&pv_sep]),
        vec![uid(2)],
        "{:#}",
        by_pv[&pv_sep]
    );
    assert_eq!(
        pod_uids_of(&by_pv[&pv_raw]),
        vec![uid(3)],
        "{:#}",
        by_pv[&pv_raw]
    );
    let kinds: Vec<&str> = by_pv[&pv_raw]["uses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["device_mapping", "loop_device"],
        "{:#}",
        by_pv[&pv_raw]
    );
    let unused = by_pv
        .values()
        .filter(|v| v["uses"] == serde_json::json!([]))
        .count();
    assert_eq!(unused, 12, "every other volume is unused");
    let over_bus = bus.read_json("Volumes");
    let bus_used: Vec<&Value> = over_bus["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("D-Bus Volumes: {over_bus:#}"))
        .iter()
        .filter(|v| v["uses"] != serde_json::json!([]))
        .collect();
    assert_eq!(bus_used.len(), 4, "{over_bus:#}");

    // Where the data is on the host.
    let pvs = c.pvs();
    let shared_dir = local_path(&pvs[&pv_shared]);
    let sub_dir = local_path(&pvs[&pv_sub]).join("vm");
    let sep_dir = local_path(&pvs[&pv_sep]);
    let raw_device = PathBuf::from(by_pv[&pv_raw]["device"].as_str().unwrap());
    let intact = || {
        assert_eq!(
            std::fs::read_to_string(shared_dir.join("marker"))
                .unwrap()
                .trim(),
            "shared-data"
        );
        assert_eq!(
            std::fs::read_to_string(sub_dir.join("marker"))
                .unwrap()
                .trim(),
            "subpath-data"
        );
        assert_eq!(
            std::fs::read_to_string(sep_dir.join("marker"))
                .unwrap()
                .trim(),
            "separate-data"
        );
        assert_eq!(head(&raw_device, 10), b"block-data");
    };
    intact();
    // The settled cluster: PVs bound, versions as they are now.
    let settle = |bound: usize| {
        summary(&c.wait_pvs(&format!("{bound} Bound"), |p| {
            p.values().filter(|pv| phase(pv) == "Bound").count() == bound
        }))
    };
    let settled = settle(4);
    let unchanged = |settled: &BTreeMap<String, String>, after: &str| {
        let now = summary(&c.pvs());
        let kept: BTreeMap<String, String> = now
            .iter()
            .filter(|(n, _)| settled.contains_key(*n))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        assert_eq!(&kept, settled, "PVs changed after {after}");
        let plan = node.plan();
        assert_eq!(
            plan["steps"],
            serde_json::json!([]),
            "plan after {after}: {plan:#}"
        );
        assert_eq!(
            plan["refused"],
            serde_json::json!([]),
            "plan after {after}: {plan:#}"
        );
        intact();
        for file in [&shared_dir, &sub_dir, &sep_dir] {
            let before = lines(&file.join("marker.log"));
            assert!(
                eventually(Duration::from_secs(10), || lines(&file.join("marker.log"))
                    > before),
                "the pod writing {} stopped after {after}",
                file.display()
            );
        }
    };

    // 1. kvstrap apply from the command line.
    ok(node.kvstrap(&["apply"], &[]), "apply");
    unchanged(&settled, "kvstrap apply");

    // 2. A reload of the daemon (SIGHUP).
    let before = runs(&daemon);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        notify.eventually(WAIT, || runs(&daemon) > before),
        "no run after the reload: {}",
        daemon.stderr()
    );
    unchanged(&settled, "a daemon reload");

    // 3. A hot-plugged disk: provisioned and published; nothing else changes.
    hot.attach();
    c.wait_pvs("the hot-plugged disk's 2 PVs", |p| p.len() == 18);
    unchanged(&settled, "a hot-plugged disk");

    // 4. The periodic resync (every 4 s here).
    let before = runs(&daemon);
    assert!(
        notify.eventually(WAIT, || runs(&daemon) >= before + 2),
        "no resync: {}",
        daemon.stderr()
    );
    unchanged(&settled, "two resyncs");

    // 5. Ten pods on the node: the no-op apply time with them.
    for i in 0..6 {
        running.push(c.pod(
            &format!("more-{i}"),
            (&format!("more-{i}"), "kv-shared", VolumeMode::Filesystem),
            Attach::Mount {
                path: "/data",
                sub_path: None,
            },
            &writer("/data/marker", "more"),
        ));
    }
    drop(daemon);
    let settled = settle(10);
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        ok(
            node.kvstrap(&["apply"], &[("KVSTRAP_LOG", "warn")]),
            "apply",
        );
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let by_pv = volumes_by_pv(node);
    let used = by_pv
        .values()
        .filter(|v| v["uses"] != serde_json::json!([]))
        .count();
    assert_eq!(used, 10, "ten volumes in use");
    eprintln!(
        "FIGURE no-op kvstrap apply (publish = true, debug build) with 10 pods holding volumes: {:.0?} ms, mean {:.0} ms",
        times,
        times.iter().sum::<f64>() / times.len() as f64
    );
    unchanged(&settled, "kvstrap apply with 10 pods");
}

#[test]
fn drain_and_reclaim_wait_for_the_kubelet_root() {
    const TEST: &str = "drain_and_reclaim_wait_for_the_kubelet_root";
    let Some(c) = cluster(TEST) else { return };
    c.run(drain_node, drain_and_reclaim);
}

/// A disk per case: one volume for a tenant and the next, a Block volume, a disk to drain.
struct DrainNode {
    node: Node,
    drained: PathBuf,
    _disks: [LoopDisk; 3],
}

fn drain_node(c: &Cluster) -> DrainNode {
    let (a, r, d) = (
        LoopDisk::new(512 * MIB),
        LoopDisk::new(256 * MIB),
        LoopDisk::new(512 * MIB),
    );
    // One volume in each of the first two classes, so the next claim gets the same one.
    let node = Node::new(&format!(
        "{}{}{}{}{}{}{}",
        c.kubeconfig_toml(),
        class("kv-one", "ext4", "Filesystem"),
        class("kv-raw", "ext4", "Block"),
        class("kv-drain", "ext4", "Filesystem"),
        group("one", "kv-one", "shared", &[&a], "volume_count = 1"),
        group("raw", "kv-raw", "separate", &[&r], "volume_count = 1"),
        group("drain", "kv-drain", "shared", &[&d], "volume_count = 2"),
    ));
    DrainNode {
        node,
        drained: d.path.clone(),
        _disks: [a, r, d],
    }
}

fn apply(node: &Node) -> String {
    let out = node.kvstrap(&["apply"], &[]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn drain_and_reclaim(c: &Cluster, made: &mut DrainNode) {
    let node = &made.node;
    ok(node.kvstrap(&["apply"], &[]), "apply");
    c.wait_pvs("4 PVs Available", all_available(4));

    // 1. A tenant forces its claim away while its pod runs: the PV is Released with the
    //    kubelet's bind mount still live. kvstrap must not scrub it.
    let (_, uid_tenant_a) = c.pod(
        "tenant-a",
        ("claim-a", "kv-one", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &writer("/data/secret", "tenant-a-secret"),
    );
    let pv_a = c.pv_of("claim-a");
    let uid_a = c.pvs()[&pv_a].metadata.uid.clone();
    let dir_a = local_path(&c.pvs()[&pv_a]);
    c.delete_claim("claim-a");
    c.block_on(async {
        Api::<PersistentVolumeClaim>::namespaced(c.client.clone(), "default")
            .patch(
                "claim-a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
    });
    c.wait_pvs("the forced claim's PV Released", |p| {
        phase(&p[&pv_a]) == "Released"
    });
    for _ in 0..2 {
        let said = apply(node);
        assert!(said.contains("in use"), "the scrub must be refused: {said}");
    }
    let pvs = c.pvs();
    assert_eq!(phase(&pvs[&pv_a]), "Released", "{:#?}", summary(&pvs));
    assert_eq!(pvs[&pv_a].metadata.uid, uid_a);
    assert_eq!(
        std::fs::read_to_string(dir_a.join("secret"))
            .unwrap()
            .trim(),
        "tenant-a-secret",
        "scrubbed under a running pod"
    );
    assert_eq!(
        c.events(&pv_a, "VolumeInUse").len(),
        1,
        "one VolumeInUse Event"
    );
    let volume_a = volumes_by_pv(node)
        .into_values()
        .find(|v| v["path"] == dir_a.display().to_string())
        .unwrap();
    // kubelet's bind mount, with its pod; the container's own view of it (its mount
    // namespace) is listed too, by a process of that namespace.
    assert_eq!(pod_uids_of(&volume_a), vec![uid_tenant_a], "{volume_a:#}");
    assert!(
        volume_a["uses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["path"] == "/data" && u["pid"].is_u64()),
        "{volume_a:#}"
    );

    // The pod goes; the kubelet unmounts; now the volume is scrubbed and published again.
    c.delete_pod("tenant-a");
    assert!(
        kubelet::mountinfo_below(c.kubelet.root_dir())
            .iter()
            .all(|m| !m.line.contains(&pv_a)),
        "the kubelet unmounted the volume before the pod left the API"
    );
    let said = apply(node);
    let pvs = c.wait_pvs("the scrubbed PV Available again", |p| {
        p.get(&pv_a)
            .is_some_and(|pv| phase(pv) == "Available" && pv.metadata.uid != uid_a)
    });
    assert!(!dir_a.join("secret").exists(), "{said}");
    let _ = pvs;
    // The next tenant sees an empty volume.
    let (_, uid_b) = c.pod(
        "tenant-b",
        ("claim-b", "kv-one", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &format!("ls -A /data; echo listed; {SLEEP_FOREVER}"),
    );
    assert_eq!(c.pv_of("claim-b"), pv_a);
    let log = eventually_log(c, "tenant-b", "listed");
    assert!(!log.contains("secret"), "the next tenant saw: {log}");
    let _ = uid_b;

    // 2. Block: the same with the regular order (pod, then claim).
    c.pod(
        "raw-a",
        ("raw-a", "kv-raw", VolumeMode::Block),
        Attach::Device { path: "/dev/xvda" },
        &format!("printf raw-tenant-secret | dd of=/dev/xvda conv=notrunc 2>/dev/null && sync && {SLEEP_FOREVER}"),
    );
    let pv_raw = c.pv_of("raw-a");
    let raw_device: PathBuf = volumes_by_pv(node)[&pv_raw]["device"]
        .as_str()
        .unwrap()
        .into();
    assert_eq!(head(&raw_device, 17), b"raw-tenant-secret");
    c.delete_pod("raw-a");
    c.delete_claim("raw-a");
    c.wait_pvs("the Block PV Released", |p| {
        phase(&p[&pv_raw]) == "Released"
    });
    apply(node);
    c.wait_pvs("the Block PV Available again", |p| {
        p.get(&pv_raw).is_some_and(|pv| phase(pv) == "Available")
    });
    assert_eq!(
        head(&raw_device, 17),
        vec![0u8; 17],
        "the Block volume was not scrubbed"
    );
    c.pod(
        "raw-b",
        ("raw-b", "kv-raw", VolumeMode::Block),
        Attach::Device { path: "/dev/xvda" },
        &format!("n=$(dd if=/dev/xvda bs=4096 count=1 2>/dev/null | grep -c raw-tenant-secret); echo \"seen $n\"; {SLEEP_FOREVER}"),
    );
    let log = eventually_log(c, "raw-b", "seen");
    assert!(
        log.contains("seen 0"),
        "the next Block tenant saw the previous one's data: {log}"
    );

    // 3. A drain waits for the pod on the disk and finishes once it is deleted.
    let (_, uid_d) = c.pod(
        "drained",
        ("claim-d", "kv-drain", VolumeMode::Filesystem),
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &writer("/data/keep", "keep-me"),
    );
    let pv_d = c.pv_of("claim-d");
    let dir_d = local_path(&c.pvs()[&pv_d]);
    let d_path = made.drained.display().to_string();
    ok(node.kvstrap(&["drain", &d_path], &[]), "drain");
    apply(node);
    let status: Value = serde_json::from_slice(
        &node
            .kvstrap(&["drain", "--status", "-o", "json"], &[])
            .stdout,
    )
    .unwrap();
    let disk = &status["disks"][0];
    assert_eq!(disk["phase"], "draining", "{status:#}");
    let users = disk["local_users"].to_string();
    assert!(
        users.contains(&uid_d),
        "drain --status names the pod: {status:#}"
    );
    assert_eq!(
        std::fs::read_to_string(dir_d.join("keep")).unwrap().trim(),
        "keep-me"
    );
    let pvs = c.pvs();
    assert_eq!(phase(&pvs[&pv_d]), "Bound", "{:#?}", summary(&pvs));
    c.delete_pod("drained");
    c.delete_claim("claim-d");
    c.wait_pvs("the drained disk's PV Released", |p| {
        p.get(&pv_d).is_none_or(|pv| phase(pv) == "Released")
    });
    let said = apply(node);
    let status: Value = serde_json::from_slice(
        &node
            .kvstrap(&["drain", "--status", "-o", "json"], &[])
            .stdout,
    )
    .unwrap();
    assert_eq!(status["disks"][0]["phase"], "drained", "{status:#}\n{said}");
    assert!(
        common::node::mounted_under(&node.root())
            .iter()
            .all(|m| !dir_d.starts_with(m)),
        "a drained disk is unmounted"
    );
}

#[test]
fn dynamic_volumes_are_used_by_real_pods_root() {
    const TEST: &str = "dynamic_volumes_are_used_by_real_pods_root";
    if !daemon_support::can_run(TEST) {
        return;
    }
    let Some(c) = cluster(TEST) else { return };
    c.run(dynamic_node, dynamic_pods);
}

struct DynamicNode {
    node: Node,
    _disk: LoopDisk,
}

fn dynamic_node(c: &Cluster) -> DynamicNode {
    let disk = LoopDisk::new(512 * MIB);
    let node = Node::new(&format!(
        "{}{}{}",
        c.kubeconfig_toml(),
        class("kv-dyn", "ext4", "Filesystem"),
        group(
            "dyn",
            "kv-dyn",
            "shared",
            &[&disk],
            "provisioning = \"dynamic\""
        ),
    ));
    DynamicNode { node, _disk: disk }
}

fn dynamic_pods(c: &Cluster, made: &mut DynamicNode) {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::storage::v1::CSIStorageCapacity;
    let node = &made.node;
    // The room is published in the policy namespace.
    c.block_on(async {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "kvstrap" }
        }))
        .unwrap();
        let _ = Api::<Namespace>::all(c.client.clone())
            .create(&PostParams::default(), &ns)
            .await;
    });
    let bus = TestBus::start();
    let mut notify = NotifySocket::new();
    let lock = node.dir.path().join("lock").display().to_string();
    let daemon = DaemonProcess::spawn_full(
        node.command(&["daemon"], &[]),
        tempfile::tempdir().unwrap(),
        node.dir.path().join("policy.toml"),
        &bus,
        &notify,
        &[("KVSTRAP_LOCK", lock.as_str()), ("KVSTRAP_LOG", "info")],
        &[],
    );
    assert!(
        notify.wait_for("READY=1", WAIT),
        "daemon not ready: {}",
        daemon.stderr()
    );
    let room = || {
        c.block_on(async {
            Api::<CSIStorageCapacity>::namespaced(c.client.clone(), "kvstrap")
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|r| r.storage_class_name == "kv-dyn")
                .and_then(|r| r.capacity)
                .map(|q| q.0)
        })
    };
    let start = Instant::now();
    let before = loop {
        if let Some(r) = room() {
            break r;
        }
        assert!(
            start.elapsed() < WAIT,
            "no room published: {}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // Two claims, each with a pod that writes into it; nothing was carved in advance.
    let mut took = Vec::new();
    let mut uids = Vec::new();
    for name in ["dyn-a", "dyn-b"] {
        let (t, uid) = c.pod(
            name,
            (name, "kv-dyn", VolumeMode::Filesystem),
            Attach::Mount {
                path: "/data",
                sub_path: None,
            },
            &writer("/data/marker", &format!("{name}-data")),
        );
        took.push(t.as_secs_f64());
        uids.push(uid);
    }
    eprintln!("FIGURE pod creation to Running with a dynamic kvstrap volume: {took:.2?} s");
    let by_pv = volumes_by_pv(node);
    for (i, name) in ["dyn-a", "dyn-b"].iter().enumerate() {
        let pv = c.pv_of(name);
        assert!(
            pv.starts_with("pvc-"),
            "{name} bound to {pv}, not a dynamic PV"
        );
        let dir = local_path(&c.pvs()[&pv]);
        let start = Instant::now();
        while std::fs::read_to_string(dir.join("marker"))
            .ok()
            .map(|t| t.trim().to_string())
            != Some(format!("{name}-data"))
        {
            assert!(
                start.elapsed() < WAIT,
                "the pod's write is not in {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            pod_uids_of(&by_pv[&pv]),
            vec![uids[i].clone()],
            "kvstrap volumes names the pod using it: {:#}",
            by_pv[&pv]
        );
    }

    // The first claim goes: once its pod has gone, its directory and PV go, and the room
    // comes back.
    let pv_a = c.pv_of("dyn-a");
    let dir_a = local_path(&c.pvs()[&pv_a]);
    c.delete_pod("dyn-a");
    c.delete_claim("dyn-a");
    c.wait_pvs("the deleted claim's PV gone", |p| !p.contains_key(&pv_a));
    assert!(!dir_a.exists(), "{} is still there", dir_a.display());
    // The other claim's quota (16 MiB) is all that is missing from the room now.
    let want = bytes(&before) - 16 * MIB;
    let start = Instant::now();
    while room().as_deref().map(bytes) != Some(want) {
        assert!(
            start.elapsed() < WAIT,
            "room {:?}, want {want} (was {before} with no claim)",
            room()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.pvs().contains_key(&c.pv_of("dyn-b")),
        "the other claim's volume stays"
    );
    drop(daemon);
}

/// Bytes of a quantity as kvstrap writes them (`512Mi`, `3Gi`, `1048576`).
fn bytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => panic!("unexpected unit {other} in {q}"),
    };
    n.parse::<u64>().unwrap() * scale
}

/// The pod's log once it contains `until`.
fn eventually_log(c: &Cluster, pod: &str, until: &str) -> String {
    let mut log = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            log = c.kubelet.pod_log(pod);
            log.contains(until)
        }),
        "pod {pod} did not print {until:?}: {log}"
    );
    log
}
