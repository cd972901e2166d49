//! `kvstrap drain` of a loop disk whose volume is bound to a claim used by a pod, against a
//! real control plane (etcd + kube-apiserver + kube-controller-manager, see
//! `tests/support/control_plane.rs`), with the real binary and `publish = true`: the
//! Bound PV survives every pass until its claim is deleted (same uid), the rest of the
//! disk's PVs go, the disk ends drained with its data intact, and `undrain` publishes its
//! volumes again. The same commands without publishing are in `drain_root.rs`.
//!
//! Needs root (loop devices, mkfs, mount) and the control plane binaries (skipped without
//! them, with a message; with `CI` set a missing control plane fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/pods.rs"]
mod pods;

use common::node::{class, group, mounted_under, ok, Node};
use common::{require_root, LoopDisk};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);
/// `[node] name` in the policies `common::node::Node` writes.
const NODE: &str = "test-node";
const CLASS: &str = "ext";
const ANNOTATION_DISK_IDENTITY: &str = "kvstrap.io/disk-identity";

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .any(|m| m == path)
}

fn drain_status(node: &Node) -> Value {
    let out = node.kvstrap(&["drain", "--status", "-o", "json"], &[]);
    let text = ok(out.clone(), "drain --status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `kvstrap apply`, as text for failure messages.
fn apply(node: &Node) -> String {
    ok(node.kvstrap(&["apply"], &[]), "apply")
}

/// A read-only mount of a partition in a directory of its own, unmounted on drop.
struct ReadOnlyMount {
    dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    fn new(device: &Path) -> ReadOnlyMount {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", "ro"])
            .arg(device)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o ro {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ReadOnlyMount { dir }
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

// ---- the cluster side -----------------------------------------------------------------

/// The node's PVs by name.
async fn node_pvs(client: &Client) -> BTreeMap<String, PersistentVolume> {
    Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default().labels(&format!("kvstrap.io/node={NODE}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|pv| (pv.metadata.name.clone().unwrap(), pv))
        .collect()
}

async fn get_pv(client: &Client, name: &str) -> Option<PersistentVolume> {
    Api::<PersistentVolume>::all(client.clone())
        .get_opt(name)
        .await
        .unwrap()
}

fn phase(pv: &PersistentVolume) -> Option<String> {
    pv.status.as_ref().and_then(|s| s.phase.clone())
}

fn identity(pv: &PersistentVolume) -> String {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_DISK_IDENTITY))
        .cloned()
        .unwrap_or_default()
}

fn local_path(pv: &PersistentVolume) -> PathBuf {
    PathBuf::from(
        &pv.spec
            .as_ref()
            .and_then(|s| s.local.as_ref())
            .expect("a local PV")
            .path,
    )
}

/// Waits until the node has `n` PVs, every one Available.
async fn wait_available(client: &Client, n: usize) -> BTreeMap<String, PersistentVolume> {
    let start = Instant::now();
    loop {
        let pvs = node_pvs(client).await;
        if pvs.len() == n
            && pvs
                .values()
                .all(|pv| phase(pv).as_deref() == Some("Available"))
        {
            return pvs;
        }
        assert!(
            start.elapsed() < WAIT,
            "not {n} Available PVs after {WAIT:?}: {:?}",
            pvs.iter().map(|(k, v)| (k, phase(v))).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_phase(client: &Client, name: &str, want: &str) -> PersistentVolume {
    let start = Instant::now();
    loop {
        if let Some(pv) = get_pv(client, name).await {
            if phase(&pv).as_deref() == Some(want) {
                return pv;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "PV {name} not {want} after {WAIT:?}: {:?}",
            get_pv(client, name).await.map(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A claim in `default` pre-bound to `pv` (static binding: `volumeName` and the class),
/// asking for no more than the PV holds; returns once the PV is Bound.
async fn claim(client: &Client, pv: &str) -> String {
    let name = format!("claim-{pv}");
    let pvc = pods::bound_claim(&name, pv, CLASS, "1Mi");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    wait_phase(client, pv, "Bound").await;
    name
}

/// Events about PV `pv` with `reason`, in any namespace.
async fn events(client: &Client, pv: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(pv) && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

async fn wait_gone(client: &Client, name: &str) {
    let start = Instant::now();
    while get_pv(client, name).await.is_some() {
        assert!(
            start.elapsed() < WAIT,
            "PV {name} still there after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Bound PV is there, the same object, Bound, not being deleted.
async fn assert_bound_kept(client: &Client, name: &str, uid: &Option<String>, step: &str) {
    let pv = get_pv(client, name)
        .await
        .unwrap_or_else(|| panic!("{step}: the Bound PV {name} was deleted"));
    assert_eq!(&pv.metadata.uid, uid, "{step}: the Bound PV was re-created");
    assert_eq!(
        phase(&pv).as_deref(),
        Some("Bound"),
        "{step}: {:?}",
        pv.status
    );
    assert!(
        pv.metadata.deletion_timestamp.is_none(),
        "{step}: the Bound PV is being deleted"
    );
}

/// Name → resourceVersion of the PVs whose local path is below one of `paths`.
async fn versions_of(client: &Client, paths: &[PathBuf]) -> BTreeMap<String, String> {
    node_pvs(client)
        .await
        .into_iter()
        .filter(|(_, pv)| paths.contains(&local_path(pv)))
        .map(|(n, pv)| (n, pv.metadata.resource_version.unwrap_or_default()))
        .collect()
}

#[test]
fn drain_with_a_bound_pv_against_the_real_api_server_root() {
    const TEST: &str = "drain_with_a_bound_pv_against_the_real_api_server_root";
    if !require_root(TEST) {
        return;
    }
    let Some((cp, rt, client)) = cases::start(TEST) else {
        return;
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(&rt, &client, &cp.kubeconfig)
    }));
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = result {
        eprintln!("control plane logs:\n{}", cp.logs());
        std::panic::resume_unwind(e);
    }
}

fn scenario(rt: &tokio::runtime::Runtime, client: &Client, kubeconfig: &Path) {
    let a = LoopDisk::new(512 * MIB);
    let b = LoopDisk::new(512 * MIB);
    let node = Node::new(&format!(
        "[kubernetes]\npublish = true\nkubeconfig = {:?}\n\n{}{}",
        kubeconfig.display().to_string(),
        class(CLASS, "ext4", "Filesystem"),
        group("g", CLASS, "separate", &[&a, &b], "volume_count = 2"),
    ));
    let a_path = a.path.display().to_string();

    // 1. Provisioned and published: 4 PVs, made Available by the controller manager.
    apply(&node);
    let pvs = rt.block_on(wait_available(client, 4));
    let volumes = node.volumes();
    assert_eq!(volumes.len(), 4, "{volumes:#?}");
    let on = |disk: &LoopDisk| -> Vec<Value> {
        volumes
            .iter()
            .filter(|v| v["disk"] == disk.path.display().to_string())
            .cloned()
            .collect()
    };
    let (a_volumes, b_volumes) = (on(&a), on(&b));
    assert_eq!((a_volumes.len(), b_volumes.len()), (2, 2), "{volumes:#?}");
    let path_of = |v: &Value| PathBuf::from(v["path"].as_str().unwrap());
    let a_paths: Vec<PathBuf> = a_volumes.iter().map(path_of).collect();
    let b_paths: Vec<PathBuf> = b_volumes.iter().map(path_of).collect();
    // Which PV is which: by its local path, cross-checked with `volumes`' pv_name.
    let pv_at = |path: &Path| -> String {
        let (name, _) = pvs
            .iter()
            .find(|(_, pv)| local_path(pv) == path)
            .unwrap_or_else(|| panic!("no PV at {}: {pvs:#?}", path.display()));
        name.clone()
    };
    let (bound, free) = (pv_at(&a_paths[0]), pv_at(&a_paths[1]));
    assert_eq!(a_volumes[0]["pv_name"], bound.as_str(), "{volumes:#?}");
    assert_eq!(a_volumes[1]["pv_name"], free.as_str(), "{volumes:#?}");
    let a_identity = identity(&pvs[&bound]);
    assert!(!a_identity.is_empty(), "{:#?}", pvs[&bound]);
    assert_eq!(identity(&pvs[&free]), a_identity);
    let b_rvs = rt.block_on(versions_of(client, &b_paths));
    assert_eq!(b_rvs.len(), 2, "{pvs:#?}");
    assert!(b_rvs.keys().all(|n| identity(&pvs[n]) != a_identity));
    let bound_device = PathBuf::from(a_volumes[0]["device"].as_str().unwrap());

    // 2. A tenant's data, a claim bound to the volume, a pod using the claim.
    std::fs::write(a_paths[0].join("tenant-data"), b"keep me").unwrap();
    let claim_name = rt.block_on(claim(client, &bound));
    let pod = rt.block_on(pods::pod_using(client, &claim_name));
    let uid = rt.block_on(get_pv(client, &bound)).unwrap().metadata.uid;
    assert!(uid.is_some());

    // 3. Drain A: its Available PV goes, the Bound one stays and holds the disk.
    let said = ok(node.kvstrap(&["drain", &a_path], &[]), "drain");
    rt.block_on(async {
        wait_gone(client, &free).await;
        assert_bound_kept(client, &bound, &uid, "drain").await;
        let draining = events(client, &bound, "VolumeDraining").await;
        assert!(
            !draining.is_empty(),
            "no VolumeDraining Event for the Bound PV"
        );
        eprintln!("VolumeDraining Events after drain: {}", draining.len());
        assert_eq!(
            versions_of(client, &b_paths).await,
            b_rvs,
            "B's PVs written"
        );
    });
    let status = drain_status(&node);
    let disks = status["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{status:#}\n{said}");
    assert_eq!(disks[0]["identity"], a_identity.as_str(), "{status:#}");
    assert_eq!(disks[0]["phase"], "draining", "{status:#}\n{said}");
    let holders = status["cluster"][&a_identity]
        .as_array()
        .unwrap_or_else(|| {
            panic!("no cluster view of {a_identity}: {status:#}");
        });
    assert_eq!(holders.len(), 1, "{status:#}");
    assert_eq!(holders[0]["pv"], bound.as_str(), "{status:#}");
    assert_eq!(holders[0]["phase"], "Bound", "{status:#}");
    assert_eq!(
        holders[0]["claim"],
        format!("default/{claim_name}").as_str(),
        "{status:#}"
    );
    assert_eq!(
        holders[0]["pods"],
        serde_json::json!([format!("default/{pod}")]),
        "{status:#}"
    );
    for p in &a_paths {
        assert!(
            is_mounted(p),
            "{} unmounted while its claim is bound: {:?}",
            p.display(),
            mounted_under(&node.root())
        );
    }
    assert!(
        node.volumes().iter().all(|v| v["disk"] != a_path.as_str()),
        "a draining disk's volumes are not offered"
    );

    // 4. Another apply: still draining, nothing changes for the claim.
    let applied = apply(&node);
    let status = drain_status(&node);
    assert_eq!(
        status["disks"][0]["phase"], "draining",
        "{status:#}\n{applied}"
    );
    rt.block_on(async {
        assert_bound_kept(client, &bound, &uid, "apply while draining").await;
        assert!(
            get_pv(client, &free).await.is_none(),
            "the free PV came back"
        );
        assert_eq!(
            versions_of(client, &b_paths).await,
            b_rvs,
            "B's PVs written"
        );
    });
    assert!(a_paths.iter().all(|p| is_mounted(p)));

    // 5. The tenant goes: pod and claim deleted, the PV Released (reclaim Delete).
    rt.block_on(async {
        Api::<Pod>::namespaced(client.clone(), "default")
            .delete(&pod, &DeleteParams::default())
            .await
            .unwrap();
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .delete(&claim_name, &DeleteParams::default())
            .await
            .unwrap();
        let released = wait_phase(client, &bound, "Released").await;
        assert_eq!(released.metadata.uid, uid);
    });
    // One apply: its publish pass deletes the Released PV, and the same pass then finds
    // nothing holding the disk, drains it and unmounts it (docs/lifecycle.md, "Drained").
    let said = apply(&node);
    let status = drain_status(&node);
    assert_eq!(
        status["disks"][0]["phase"], "drained",
        "one apply after the last claim went must finish the drain:\n{status:#}\n{said}"
    );
    let status = drain_status(&node);
    rt.block_on(async {
        wait_gone(client, &bound).await;
        assert_eq!(
            status["cluster"][&a_identity],
            serde_json::json!([]),
            "{status:#}"
        );
        let left: Vec<String> = node_pvs(client)
            .await
            .into_values()
            .filter(|pv| identity(pv) == a_identity)
            .map(|pv| pv.metadata.name.unwrap_or_default())
            .collect();
        assert!(left.is_empty(), "A's PVs left: {left:?}");
        assert_eq!(
            versions_of(client, &b_paths).await,
            b_rvs,
            "B's PVs written"
        );
    });
    let mounts = mounted_under(&node.root());
    assert!(
        a_paths
            .iter()
            .all(|p| !mounts.iter().any(|m| m.starts_with(p))),
        "a drained disk's filesystems are unmounted: {mounts:?}"
    );
    assert!(
        b_paths.iter().all(|p| is_mounted(p)),
        "B's volumes stay mounted: {mounts:?}"
    );
    // Left intact: the tenant's file is still on the partition.
    {
        let ro = ReadOnlyMount::new(&bound_device);
        assert_eq!(
            std::fs::read(ro.dir.path().join("tenant-data")).unwrap(),
            b"keep me",
            "the drained disk's data was touched"
        );
    }

    // 6. Back in service: mounted again, its volumes published again.
    let said = ok(node.kvstrap(&["undrain", &a_path], &[]), "undrain");
    for p in &a_paths {
        assert!(
            is_mounted(p),
            "{} not mounted after undrain: {said}\n{:?}",
            p.display(),
            mounted_under(&node.root())
        );
    }
    assert_eq!(drain_status(&node)["disks"], serde_json::json!([]));
    // Both of A's PVs were deleted during the drain: its volumes are scrubbed before they
    // are published again (the PVs may take an extra apply to come back).
    let mut extra_applies = 0;
    let pvs = rt.block_on(async {
        let start = Instant::now();
        while node_pvs(client).await.len() < 4 && start.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            apply(&node);
            extra_applies += 1;
        }
        wait_available(client, 4).await
    });
    eprintln!("A's PVs back after undrain and {extra_applies} more apply run(s)");
    let back: Vec<String> = pvs
        .iter()
        .filter(|(_, pv)| identity(pv) == a_identity)
        .map(|(n, _)| n.clone())
        .collect();
    let mut names = vec![bound.clone(), free.clone()];
    names.sort();
    assert_eq!(back, names, "A's PVs, under their names: {pvs:#?}");
    assert!(a_paths.iter().all(|p| is_mounted(p)));
    assert_eq!(node.volumes().len(), 4);
    assert_eq!(
        rt.block_on(versions_of(client, &b_paths)),
        b_rvs,
        "B's PVs written"
    );
    assert!(
        !a_paths[0].join("tenant-data").exists(),
        "the volume whose PV was deleted during the drain is published again unscrubbed"
    );
}
