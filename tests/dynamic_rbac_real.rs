//! Dynamic volumes under exactly the shipped RBAC and admission policies
//! (`packaging/kubernetes/rbac.yaml`, `packaging/kubernetes/admission-policy.yaml`), against
//! the real stack: kube-apiserver, kube-controller-manager and kube-scheduler
//! (`tests/support/control_plane.rs`), one Node object (Ready, untainted: the scheduler
//! places pods on it; no kubelet runs them), and `kvstrap daemon` on a loop disk (a dynamic
//! group: the disk is a pool) with the node's own credential, the user
//! `kvstrap:node:dyn-rbac` of the group `kvstrap:nodes`, authenticated by token.
//!
//! Checked, with nothing but that credential on the daemon's side: the CSIDriver, the
//! node's CSIStorageCapacity and the dynamic class are published; a WaitForFirstConsumer
//! claim with a pod gets its PV and is Bound, the pod placed on the node; the claim grows
//! (PV capacity, the claim's status); a claim selecting the node that no pool has room for
//! goes back to the scheduler (selected-node removed) with a NoRoomOnNode Event in its
//! namespace; a Block claim gets a ProvisioningFailed Event; a deleted claim's PV is
//! reclaimed (finalizer removed, PV deleted) and the room published again; and the daemon
//! never met a 403.
//!
//! Needs root (loop devices, mkfs, mount) and the control plane assets; skipped without
//! them, with a message (with `CI` set a missing asset fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
mod daemon_support;
#[path = "support/dynamic_policy.rs"]
mod dynamic_policy;

use common::{require_root, LoopDisk};
use control_plane::ControlPlane;
use daemon_support::{DaemonProcess, NotifySocket, TestBus};
use dynamic_policy::dynamic_node_policy;
use k8s_openapi::api::core::v1::{
    Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use kvstrap::kube::dynamic;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NODE: &str = "dyn-rbac";
const USER: &str = "kvstrap:node:dyn-rbac";
const GROUP: &str = "kvstrap:nodes";
const CLASS: &str = "kv-dynamic-rbac";
/// `[kubernetes] policy_namespace` (the default), made by rbac.yaml.
const POLICY_NS: &str = "kvstrap";
/// The tenants' namespace: claims, pods, and the Events about the claims.
const TENANT: &str = "vms";
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn dynamic_volumes_work_under_exactly_the_shipped_rbac_root() {
    const TEST: &str = "dynamic_volumes_work_under_exactly_the_shipped_rbac_root";
    if !require_root(TEST) || !daemon_support::can_run(TEST) {
        return;
    }
    let Some(cp) = control_plane::start_or_skip_with_users(TEST, &[(USER, GROUP)]) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin = rt.block_on(cp.client());
    cp.start_scheduler();
    let disk = LoopDisk::new(2 * GIB);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        dynamic_node_policy(
            NODE,
            CLASS,
            &dir.path().join("storage"),
            &disk.path,
            &cp.kubeconfig_as(USER),
        ),
    )
    .unwrap();
    let bus = TestBus::start();
    let mut daemon: Option<DaemonProcess> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(&rt, &cp, &admin, &bus, dir.path(), &policy, &mut daemon)
    }));
    let stderr = daemon
        .as_ref()
        .map(DaemonProcess::stderr)
        .unwrap_or_default();
    if result.is_err() {
        eprintln!("--- daemon {NODE}:\n{stderr}");
        eprintln!("control plane logs:\n{}", cp.logs());
    }
    // The daemon first, then the mounts of the pool, then the disk.
    drop(daemon);
    common::unmount_all_from(&disk.path);
    drop(disk);
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn scenario(
    rt: &tokio::runtime::Runtime,
    cp: &ControlPlane,
    admin: &Client,
    bus: &TestBus,
    dir: &Path,
    policy: &Path,
    daemon: &mut Option<DaemonProcess>,
) {
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes");
    for file in ["rbac.yaml", "admission-policy.yaml"] {
        kubectl(
            cp,
            &["apply", "-f", &packaging.join(file).display().to_string()],
        );
    }
    let node_client = rt.block_on(async {
        make_namespace(admin, TENANT).await;
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        Api::<ServiceAccount>::namespaced(admin.clone(), TENANT)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
        make_node(admin, NODE).await;
        let node_client = kvstrap::kube::ClientSource::Kubeconfig(cp.kubeconfig_as(USER))
            .client()
            .await
            .unwrap();
        policies_in_force(admin, &node_client).await;
        node_client
    });

    // The daemon, with the node's credential only (its policy names that kubeconfig).
    let mut notify = NotifySocket::new();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
    cmd.arg("--policy").arg(policy).arg("daemon");
    let lock = dir.join("lock").display().to_string();
    let state = dir.join("state").display().to_string();
    *daemon = Some(DaemonProcess::spawn_full(
        cmd,
        tempfile::tempdir().unwrap(),
        PathBuf::from(policy),
        bus,
        &notify,
        &[
            ("KVSTRAP_LOCK", lock.as_str()),
            ("KVSTRAP_STATE_DIR", state.as_str()),
            ("KVSTRAP_LOG", "info"),
            ("KVSTRAP_UEVENTS", "0"),
            ("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/kvstrap"),
        ],
        &[],
    ));
    let stderr = || daemon_stderr(daemon);
    assert!(
        notify.wait_for("READY=1", WAIT),
        "not ready: {}",
        daemon_stderr(daemon)
    );

    rt.block_on(async {
        // What the node publishes: the class, the CSIDriver, its room.
        let start = Instant::now();
        let full = loop {
            let class = Api::<StorageClass>::all(admin.clone())
                .get_opt(CLASS)
                .await
                .unwrap();
            let driver = Api::<CSIDriver>::all(admin.clone())
                .get_opt(dynamic::PROVISIONER)
                .await
                .unwrap();
            match (class, driver, room(admin).await) {
                (Some(c), Some(_), Some((free, _))) if free > 0 => {
                    assert_eq!(c.provisioner, dynamic::PROVISIONER);
                    assert_eq!(c.allow_volume_expansion, Some(true));
                    break free;
                }
                _ => assert!(
                    start.elapsed() < WAIT,
                    "class, CSIDriver or CSIStorageCapacity missing: {}",
                    stderr()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        // A WaitForFirstConsumer claim and its pod: placed by the scheduler where the room
        // is, the volume made and the claim Bound.
        create(admin, &claim("vm-disk", 64 * MIB, "Filesystem")).await;
        let pod = pod("vm", "vm-disk");
        Api::<Pod>::namespaced(admin.clone(), TENANT)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        let bound = wait_claim(admin, "vm-disk", &stderr, |c| {
            let volume = c.spec.as_ref()?.volume_name.clone();
            volume.filter(|_| phase(c) == "Bound")
        })
        .await;
        let uid = get_claim(admin, "vm-disk").await.metadata.uid.unwrap();
        assert_eq!(bound, dynamic::pv_name(&uid));
        let pv = Api::<PersistentVolume>::all(admin.clone())
            .get(&bound)
            .await
            .unwrap();
        let labels = pv.metadata.labels.clone().unwrap();
        assert_eq!(labels["kvstrap.io/node"], NODE);
        assert_eq!(labels["kvstrap.io/provisioning"], "dynamic");
        // The scheduler binds the pod once its claim is Bound.
        let start = Instant::now();
        let placed = loop {
            let pod = Api::<Pod>::namespaced(admin.clone(), TENANT)
                .get("vm")
                .await
                .unwrap();
            if let Some(node) = pod.spec.unwrap().node_name {
                break node;
            }
            assert!(start.elapsed() < WAIT, "pod vm not placed: {}", stderr());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(placed, NODE);

        // Expansion: the PV's capacity and the claim's status, written by the node.
        let grow = json!({"spec": {"resources": {"requests": {"storage": "128Mi"}}}});
        Api::<PersistentVolumeClaim>::namespaced(admin.clone(), TENANT)
            .patch("vm-disk", &PatchParams::default(), &Patch::Merge(&grow))
            .await
            .unwrap();
        wait_claim(admin, "vm-disk", &stderr, |c| {
            let cap = c.status.as_ref()?.capacity.as_ref()?.get("storage")?;
            (bytes(cap) == 128 * MIB).then_some(())
        })
        .await;
        let pv = Api::<PersistentVolume>::all(admin.clone())
            .get(&bound)
            .await
            .unwrap();
        assert_eq!(
            bytes(&pv.spec.unwrap().capacity.unwrap()["storage"]),
            128 * MIB
        );

        // A claim no pool has room for, selecting the node (as a scheduler with an old
        // view of the room would): given back, with the reason in its namespace.
        create(admin, &selected(claim("too-big", 8 * GIB, "Filesystem"))).await;
        wait_claim(admin, "too-big", &stderr, |c| {
            let annotations = c.metadata.annotations.clone().unwrap_or_default();
            (!annotations.contains_key(dynamic::SELECTED_NODE)).then_some(())
        })
        .await;
        let said = wait_event(admin, "too-big", "NoRoomOnNode", &stderr).await;
        assert_eq!(said.reporting_instance.as_deref(), Some(NODE));

        // A Block claim: refused, with an Event.
        create(admin, &selected(claim("raw", 64 * MIB, "Block"))).await;
        wait_event(admin, "raw", "ProvisioningFailed", &stderr).await;

        // The claim deleted: its volume reclaimed (finalizer removed, PV deleted) and the
        // room published again.
        Api::<Pod>::namespaced(admin.clone(), TENANT)
            .delete("vm", &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        Api::<PersistentVolumeClaim>::namespaced(admin.clone(), TENANT)
            .delete("vm-disk", &DeleteParams::default())
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let gone = Api::<PersistentVolume>::all(admin.clone())
                .get_opt(&bound)
                .await
                .unwrap()
                .is_none();
            let now = room(admin).await.map_or(0, |r| r.0);
            if gone && now == full {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "PV gone {gone}, room {now} (full {full}): {}",
                stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The node's credential can still do nothing it should not: another node's room.
        let other = dynamic::storage_capacity("elsewhere", POLICY_NS, CLASS, GIB, GIB);
        let refused = Api::<CSIStorageCapacity>::namespaced(node_client.clone(), POLICY_NS)
            .create(&PostParams::default(), &other)
            .await;
        assert!(
            matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
            "{refused:?}"
        );
    });

    // Every request of the daemon passed RBAC and the policies.
    let log = daemon_stderr(daemon);
    assert!(
        !log.contains("answered 403") && !log.contains("Forbidden"),
        "the daemon was refused something:\n{log}"
    );
}

fn daemon_stderr(daemon: &Option<DaemonProcess>) -> String {
    daemon
        .as_ref()
        .map(DaemonProcess::stderr)
        .unwrap_or_default()
}

/// `kubectl` as admin against the test control plane; stdout, trimmed.
fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn make_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
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
        "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
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

/// Waits until the API server enforces the policies the daemon's writes go through (it
/// loads them asynchronously): dry-run writes of another node's PV and room, another
/// CSIDriver, and a claim the node does not serve, are refused by them.
async fn policies_in_force(admin: &Client, node: &Client) {
    create(admin, &claim("probe", 64 * MIB, "Filesystem")).await;
    let post = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let mut pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "kvstrap-elsewhere-probe",
                     "labels": {"kvstrap.io/node": "elsewhere", "app.kubernetes.io/managed-by": "kvstrap"}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "local": {"path": "/probe"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": ["elsewhere"]}]}]}}},
    }))
    .unwrap();
    pv.status = None;
    let mut driver = dynamic::csi_driver();
    driver.metadata.name = Some("probe.example.com".into());
    let unselect = json!({"metadata": {"annotations": {dynamic::SELECTED_NODE: null}}});
    let start = Instant::now();
    loop {
        let by_policy = |r: Result<(), kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.message.contains("ValidatingAdmissionPolicy"));
        let pv = Api::<PersistentVolume>::all(node.clone())
            .create(&post, &pv)
            .await
            .map(drop);
        let room = Api::<CSIStorageCapacity>::namespaced(node.clone(), POLICY_NS)
            .create(
                &post,
                &dynamic::storage_capacity("elsewhere", POLICY_NS, CLASS, GIB, GIB),
            )
            .await
            .map(drop);
        let driver = Api::<CSIDriver>::all(node.clone())
            .create(&post, &driver)
            .await
            .map(drop);
        let claim = Api::<PersistentVolumeClaim>::namespaced(node.clone(), TENANT)
            .patch("probe", &dry, &Patch::Merge(&unselect))
            .await
            .map(drop);
        if by_policy(pv) && by_policy(room) && by_policy(driver) && by_policy(claim) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the admission policies are not in force after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn claim(name: &str, size: u64, mode: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": CLASS,
            "volumeMode": mode,
            "resources": {"requests": {"storage": format!("{}Mi", size / MIB)}},
        },
    }))
    .unwrap()
}

/// `claim` with the node in `volume.kubernetes.io/selected-node`, as kube-scheduler sets it.
fn selected(mut claim: PersistentVolumeClaim) -> PersistentVolumeClaim {
    claim.metadata.annotations = Some(BTreeMap::from([(
        dynamic::SELECTED_NODE.to_string(),
        NODE.to_string(),
    )]));
    claim
}

async fn create(admin: &Client, claim: &PersistentVolumeClaim) {
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), TENANT)
        .create(&PostParams::default(), claim)
        .await
        .unwrap();
}

/// A pod using `claim` (no kubelet runs it: the scheduler's placement is the point).
fn pod(name: &str, claim: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "vm", "image": "registry.invalid/none"}],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }))
    .unwrap()
}

async fn get_claim(admin: &Client, name: &str) -> PersistentVolumeClaim {
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), TENANT)
        .get(name)
        .await
        .unwrap()
}

fn phase(c: &PersistentVolumeClaim) -> &str {
    c.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

fn bytes(q: &Quantity) -> u64 {
    kvstrap::kube::compare::quantity_bytes(&q.0).unwrap()
}

/// Waits until `f` gives a value for the claim `name`.
async fn wait_claim<T>(
    admin: &Client,
    name: &str,
    stderr: &dyn Fn() -> String,
    f: impl Fn(&PersistentVolumeClaim) -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        let c = get_claim(admin, name).await;
        if let Some(v) = f(&c) {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "claim {name} after {WAIT:?}: {c:?}\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for kvstrap's Event `reason` about the claim `name`, in the claim's namespace.
async fn wait_event(
    admin: &Client,
    name: &str,
    reason: &str,
    stderr: &dyn Fn() -> String,
) -> Event {
    let start = Instant::now();
    loop {
        let events = Api::<Event>::namespaced(admin.clone(), TENANT)
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .unwrap();
        if let Some(e) = events.items.into_iter().find(|e| {
            e.reason.as_deref() == Some(reason)
                && e.reporting_component.as_deref() == Some("kvstrap")
        }) {
            return e;
        }
        assert!(
            start.elapsed() < WAIT,
            "no {reason} Event about {TENANT}/{name}: {}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node's CSIStorageCapacity for the class: (capacity, maximumVolumeSize).
async fn room(admin: &Client) -> Option<(u64, u64)> {
    let c = Api::<CSIStorageCapacity>::namespaced(admin.clone(), POLICY_NS)
        .get_opt(&dynamic::capacity_name(NODE, CLASS))
        .await
        .ok()??;
    Some((
        c.capacity.as_ref().map_or(0, bytes),
        c.maximum_volume_size.as_ref().map_or(0, bytes),
    ))
}
