//! Dynamic volumes against the real stack: kube-apiserver, kube-controller-manager and
//! kube-scheduler (`tests/support/control_plane.rs`), three Node objects, each served by
//! its own `kvstrap daemon` on a loop disk this test makes (a dynamic group: the disk is a
//! pool). Claims of mixed sizes, each with a pod; the scheduler places the pods where the
//! published CSIStorageCapacity says there is room, kvstrap makes each volume and its PV.
//!
//! Checked: every claim Bound and every pod on the node of its volume; the accounting
//! exact (quotas per pool at most the pool, the published capacity equal to what is
//! free); no claim served twice across a daemon killed and restarted half way; a claim
//! larger than any node stays Pending with the scheduler's reason; expansion 1Gi -> 3Gi
//! reaches the volume's record, the PV and the claim's status; a delete frees the space
//! and the CSIStorageCapacity shows it.
//!
//! Needs root (loop devices, mkfs, mount) and the control plane assets; skipped without
//! them, with a message (with `CI` set a missing one fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
mod daemon_support;
#[path = "support/dynamic_policy.rs"]
mod dynamic_policy;

use common::{require_root, LoopDisk};
use daemon_support::{DaemonProcess, NotifySocket, TestBus};
use dynamic_policy::dynamic_node_policy;
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ServiceAccount, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CLASS: &str = "kv-dynamic";
const NAMESPACE: &str = "kvstrap";
const WAIT: Duration = Duration::from_secs(180);

/// One node: its Node object, its loop disk (the pool) and its daemon.
struct Served {
    name: String,
    kubeconfig: String,
    dir: tempfile::TempDir,
    daemon: Option<DaemonProcess>,
    notify: NotifySocket,
    disk: LoopDisk,
}

impl Served {
    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn kvstrap(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_kvstrap"))
            .arg("--policy")
            .arg(self.policy())
            .arg("--state-dir")
            .arg(self.state())
            .args(args)
            .env("KVSTRAP_LOCK", self.dir.path().join("lock"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/kvstrap")
            .output()
            .unwrap()
    }

    /// `kvstrap volumes -o json` of this node.
    fn volumes(&self) -> Value {
        let out = self.kvstrap(&["volumes", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn start(&mut self, bus: &TestBus) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("--policy").arg(self.policy()).arg("daemon");
        let lock = self.dir.path().join("lock").display().to_string();
        let state = self.state().display().to_string();
        let daemon = DaemonProcess::spawn_full(
            cmd,
            tempfile::tempdir().unwrap(),
            self.policy(),
            bus,
            &self.notify,
            &[
                ("KVSTRAP_LOCK", lock.as_str()),
                ("KVSTRAP_STATE_DIR", state.as_str()),
                ("KVSTRAP_LOG", "info"),
                ("KVSTRAP_UEVENTS", "0"),
                // One bus name per machine: these daemons serve none (they do not need it).
                ("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/kvstrap"),
            ],
            &[],
        );
        self.daemon = Some(daemon);
        assert!(
            self.notify.wait_for("READY=1", WAIT),
            "{} not ready: {}",
            self.name,
            self.daemon.as_ref().unwrap().stderr()
        );
    }

    fn stderr(&self) -> String {
        self.daemon.as_ref().map(|d| d.stderr()).unwrap_or_default()
    }
}

/// A Node object the scheduler can place pods on (no kubelet: Ready by hand, no taint).
async fn make_node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500"},
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500"},
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let untaint = json!({"spec": {"taints": null}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&untaint))
        .await
        .unwrap();
}

fn claim(name: &str, bytes: u64) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(CLASS.into()),
            volume_mode: Some("Filesystem".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(format!("{}Mi", bytes / MIB)),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// A pod using `claim`, optionally pinned to a node (no kubelet runs it: the scheduler's
/// placement is the point).
fn pod(name: &str, claim: &str, on: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            node_selector: on
                .map(|n| BTreeMap::from([("kubernetes.io/hostname".into(), n.into())])),
            containers: vec![Container {
                name: "vm".into(),
                image: Some("registry.invalid/none".into()),
                ..Container::default()
            }],
            volumes: Some(vec![Volume {
                name: "disk".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.into(),
                    read_only: None,
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

async fn create_claim_and_pod(client: &Client, name: &str, bytes: u64, on: Option<&str>) {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &claim(name, bytes))
        .await
        .unwrap();
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod(name, name, on))
        .await
        .unwrap();
}

async fn claims(client: &Client) -> BTreeMap<String, PersistentVolumeClaim> {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c))
        .collect()
}

async fn pvs(client: &Client) -> BTreeMap<String, PersistentVolume> {
    Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.metadata.name.clone().unwrap(), p))
        .collect()
}

fn bound(c: &PersistentVolumeClaim) -> bool {
    c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

fn node_of(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required
        .as_ref()
        .unwrap()
        .node_selector_terms[0]
        .match_expressions
        .as_ref()
        .unwrap()[0]
        .values
        .as_ref()
        .unwrap()[0]
        .clone()
}

fn bytes_of(q: &Quantity) -> u64 {
    kvstrap::kube::compare::quantity_bytes(&q.0).unwrap()
}

/// Waits until every claim named is Bound and its pod placed; returns how long.
async fn wait_bound(client: &Client, names: &[String]) -> Duration {
    let start = Instant::now();
    loop {
        let cs = claims(client).await;
        let pods: BTreeMap<String, Pod> = Api::<Pod>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap(), p))
            .collect();
        let waiting: Vec<&String> = names
            .iter()
            .filter(|n| {
                !cs.get(*n).is_some_and(bound)
                    || pods
                        .get(*n)
                        .and_then(|p| p.spec.as_ref()?.node_name.clone())
                        .is_none()
            })
            .collect();
        if waiting.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < WAIT,
            "not bound and placed after {WAIT:?}: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CSIStorageCapacity of `node` for the class: (capacity, maximumVolumeSize).
async fn room(client: &Client, node: &str) -> Option<(u64, u64)> {
    let list = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .ok()?;
    list.items
        .iter()
        .find(|c| {
            c.storage_class_name == CLASS
                && c.node_topology
                    .as_ref()
                    .and_then(|t| t.match_labels.as_ref())
                    .and_then(|l| l.get("kubernetes.io/hostname"))
                    .map(String::as_str)
                    == Some(node)
        })
        .map(|c| {
            (
                c.capacity.as_ref().map_or(0, bytes_of),
                c.maximum_volume_size.as_ref().map_or(0, bytes_of),
            )
        })
}

#[test]
fn claims_of_any_size_land_where_the_room_is_root() {
    const TEST: &str = "claims_of_any_size_land_where_the_room_is_root";
    if !require_root(TEST) || !daemon_support::can_run(TEST) {
        return;
    }
    let Some((cp, rt, client)) = cases::start(TEST) else {
        return;
    };
    cp.start_scheduler();
    let bus = TestBus::start();
    // n1 is big enough to grow a volume to 3 GiB; n2 and n3 are small.
    let mut nodes: Vec<Served> = [("n1", 6 * GIB), ("n2", 2 * GIB), ("n3", 2 * GIB)]
        .into_iter()
        .map(|(name, size)| {
            let disk = LoopDisk::new(size);
            let dir = tempfile::tempdir().unwrap();
            let text = dynamic_node_policy(
                name,
                CLASS,
                &dir.path().join("storage"),
                &disk.path,
                &cp.kubeconfig,
            );
            std::fs::write(dir.path().join("policy.toml"), text).unwrap();
            Served {
                name: name.into(),
                kubeconfig: cp.kubeconfig.display().to_string(),
                dir,
                daemon: None,
                notify: NotifySocket::new(),
                disk,
            }
        })
        .collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(&rt, &client, &bus, &mut nodes)
    }));
    if result.is_err() {
        for n in &nodes {
            eprintln!("--- daemon {}:\n{}", n.name, n.stderr());
        }
        eprintln!("control plane logs:\n{}", cp.logs());
    }
    // Daemons first, then the mounts of each node's storage, then the disks.
    for n in &mut nodes {
        n.daemon = None;
        common::unmount_all_from(&n.disk.path);
    }
    drop(nodes);
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn scenario(rt: &tokio::runtime::Runtime, client: &Client, bus: &TestBus, nodes: &mut [Served]) {
    rt.block_on(async {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        let _ = Api::<ServiceAccount>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &sa)
            .await;
        for n in nodes.iter() {
            make_node(client, &n.name).await;
        }
    });
    for n in nodes.iter_mut() {
        n.start(bus);
    }
    // Each node announces its room.
    rt.block_on(async {
        let start = Instant::now();
        for n in nodes.iter() {
            while room(client, &n.name).await.is_none_or(|(c, _)| c == 0) {
                assert!(
                    start.elapsed() < WAIT,
                    "no CSIStorageCapacity of {}: {}",
                    n.name,
                    n.stderr()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    // A volume to grow later, on the big node.
    rt.block_on(create_claim_and_pod(client, "grow", GIB, Some("n1")));
    rt.block_on(wait_bound(client, &["grow".to_string()]));

    // 50 claims of mixed sizes; n1's daemon is killed and restarted half way.
    let sizes = [16, 24, 40, 64, 96, 128];
    let names: Vec<String> = (0..50).map(|i| format!("vm-{i:02}")).collect();
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        rt.block_on(create_claim_and_pod(
            client,
            name,
            sizes[i % sizes.len()] * MIB,
            None,
        ));
        if i == 25 {
            // Room an earlier run published for a class no pool serves any more: the
            // restarted daemon deletes it, or the scheduler would keep sending claims.
            rt.block_on(async {
                let stale =
                    kvstrap::kube::dynamic::storage_capacity("n1", NAMESPACE, "kv-gone", GIB, GIB);
                Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
                    .create(&PostParams::default(), &stale)
                    .await
                    .unwrap();
            });
            nodes[0]
                .daemon
                .as_mut()
                .unwrap()
                .signal(nix::sys::signal::Signal::SIGKILL);
            nodes[0].daemon = None;
            nodes[0].notify = NotifySocket::new();
            nodes[0].start(bus);
        }
    }
    let took = rt.block_on(wait_bound(client, &names));
    rt.block_on(async {
        let start = Instant::now();
        let stale = kvstrap::kube::dynamic::capacity_name("n1", "kv-gone");
        let api = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE);
        while api.get_opt(&stale).await.unwrap().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "stale room {stale} still there: {}",
                nodes[0].stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    eprintln!(
        "FIGURE 50 claims of mixed sizes bound and placed on 3 nodes in {:.1} s (from the first create, daemon restarted half way)",
        (started.elapsed().max(took)).as_secs_f64()
    );

    // Every claim served once, on the node its pod was placed on.
    let (cs, all_pvs) = rt.block_on(async { (claims(client).await, pvs(client).await) });
    let pods: BTreeMap<String, Pod> = rt.block_on(async {
        Api::<Pod>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap(), p))
            .collect()
    });
    let mut per_node: BTreeMap<String, u64> = BTreeMap::new();
    let mut pv_names = BTreeSet::new();
    for name in names.iter().chain(std::iter::once(&"grow".to_string())) {
        let c = &cs[name];
        let pv_name = c.spec.as_ref().unwrap().volume_name.clone().unwrap();
        assert_eq!(pv_name, format!("pvc-{}", c.metadata.uid.clone().unwrap()));
        assert!(pv_names.insert(pv_name.clone()), "{pv_name} twice");
        let pv = &all_pvs[&pv_name];
        let on = node_of(pv);
        let placed = pods[name].spec.as_ref().unwrap().node_name.clone().unwrap();
        assert_eq!(on, placed, "claim {name}: volume on {on}, pod on {placed}");
        *per_node.entry(on).or_default() +=
            bytes_of(&pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"]);
    }
    let dynamic_pvs = all_pvs
        .values()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kvstrap.io/provisioning"))
                .is_some()
        })
        .count();
    assert_eq!(dynamic_pvs, 51, "one PV per claim, none twice");
    eprintln!("claims per node (bytes): {per_node:?}");

    // The accounting is exact: per pool, quotas at most the pool, the published room what
    // is free, and one directory per PV.
    for n in nodes.iter() {
        let v = n.volumes();
        let pool = &v["pools"][0];
        let (capacity, used, free) = (
            pool["capacity_bytes"].as_u64().unwrap(),
            pool["used_bytes"].as_u64().unwrap(),
            pool["free_bytes"].as_u64().unwrap(),
        );
        assert!(used <= capacity, "{}: {pool:#}", n.name);
        assert_eq!(
            used,
            per_node.get(&n.name).copied().unwrap_or(0),
            "{}: {pool:#}",
            n.name
        );
        let dirs = v["volumes"].as_array().unwrap().len();
        let on_node = all_pvs.values().filter(|p| node_of(p) == n.name).count();
        assert_eq!(dirs, on_node, "{}: one directory per PV", n.name);
        let published = rt.block_on(room(client, &n.name)).unwrap();
        assert_eq!(published.0, free, "{}: CSIStorageCapacity = free", n.name);
    }

    // A claim larger than any node waits with the scheduler's reason.
    rt.block_on(create_claim_and_pod(client, "too-big", 20 * GIB, None));
    rt.block_on(async {
        let start = Instant::now();
        loop {
            let events =
                Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), "default")
                    .list(&ListParams::default().fields("involvedObject.name=too-big"))
                    .await
                    .unwrap();
            let said: Vec<String> = events
                .items
                .iter()
                .filter_map(|e| e.message.clone())
                .collect();
            if said
                .iter()
                .any(|m| m.contains("did not have enough free storage"))
            {
                eprintln!("too-big: {}", said.join(" | "));
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no scheduler reason: {said:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            !bound(&claims(client).await["too-big"]),
            "a claim too big was bound"
        );
    });

    // Expansion 1Gi -> 3Gi: the volume's record, the PV, the claim's status.
    let grow_pv = format!(
        "pvc-{}",
        rt.block_on(claims(client))["grow"]
            .metadata
            .uid
            .clone()
            .unwrap()
    );
    rt.block_on(async {
        let patch = json!({"spec": {"resources": {"requests": {"storage": "3Gi"}}}});
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .patch("grow", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let c = &claims(client).await["grow"];
            let cap = c
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .map(|c| bytes_of(&c["storage"]));
            let pv = &pvs(client).await[&grow_pv];
            let pv_cap = bytes_of(&pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"]);
            if cap == Some(3 * GIB) && pv_cap == 3 * GIB {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "claim {cap:?}, PV {pv_cap}: {}",
                nodes[0].stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let grown = nodes[0].volumes();
    let row = grown["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pv_name"] == grow_pv.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["capacity_bytes"].as_u64(), Some(3 * GIB), "{row:#}");

    // A delete frees the space, and the CSIStorageCapacity shows it.
    let victim = "vm-05";
    let (victim_pv, on) = {
        let c = &cs[victim];
        let pv = c.spec.as_ref().unwrap().volume_name.clone().unwrap();
        let on = node_of(&all_pvs[&pv]);
        (pv, on)
    };
    let before = rt.block_on(room(client, &on)).unwrap().0;
    let freed = bytes_of(
        &all_pvs[&victim_pv]
            .spec
            .as_ref()
            .unwrap()
            .capacity
            .as_ref()
            .unwrap()["storage"],
    );
    rt.block_on(async {
        Api::<Pod>::namespaced(client.clone(), "default")
            .delete(victim, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .delete(victim, &DeleteParams::default())
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let gone = !pvs(client).await.contains_key(&victim_pv);
            let now = room(client, &on).await.unwrap().0;
            if gone && now == before + freed {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "PV gone {gone}, room {now} (was {before}, +{freed})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // `kvstrap cluster status` shows each node's room.
    let status = nodes[0].kvstrap(&["cluster", "status", "--kubeconfig", &nodes[0].kubeconfig]);
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    for n in nodes.iter() {
        let line = text
            .lines()
            .find(|l| l.starts_with(&n.name))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("{CLASS}: ")) && line.contains("free (largest claim"),
            "{}: {text}",
            n.name
        );
    }
    let node = nodes.iter().find(|n| n.name == on).unwrap();
    let left = node.volumes();
    assert!(
        left["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["pv_name"] != victim_pv.as_str()),
        "the directory is gone"
    );
}
