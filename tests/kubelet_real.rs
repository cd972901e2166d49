//! The real-kubelet harness itself (`tests/support/kubelet.rs`): a control plane with its
//! scheduler, containerd and a kubelet on this machine, a hand-made WaitForFirstConsumer
//! class and local PVs; a pod writes to a Filesystem volume (a directory) and another to a
//! Block volume (a loop device), and the kubelet's bind mounts (and, for Block, the loop
//! device it attaches) appear and go with the pods. What it observed is printed for the
//! tests of kvstrap that rely on it.
//!
//! Needs root, the control plane assets (with kubelet and kube-scheduler), containerd,
//! runc, gcc with libc6-dev and busybox-static: skipped without them, with a message
//! (with `CI` set a missing one fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
mod common;
#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/pods.rs"]
mod pods;

use common::{require_root, LoopDisk};
use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::Client;
use kubelet::Kubelet;
use pods::{Attach, VolumeMode};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

const NODE: &str = "kubelet-smoke";
const CLASS: &str = "local-smoke";
const WAIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

#[test]
fn a_real_kubelet_mounts_and_maps_local_pvs_root() {
    const TEST: &str = "a_real_kubelet_mounts_and_maps_local_pvs_root";
    if !require_root(TEST) {
        return;
    }
    let began = Instant::now();
    let Some((cp, rt, client)) = cases::start(TEST) else {
        return;
    };
    cp.start_scheduler();
    eprintln!(
        "control plane and scheduler up in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let Some(kubelet) = kubelet::start_or_skip(&cp, NODE, TEST) else {
        return;
    };
    let root = kubelet.root_dir().to_path_buf();
    let base = root.parent().unwrap().to_path_buf();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(scenario(&client, &kubelet));
    }));
    rt.shutdown_timeout(Duration::from_secs(5));
    if result.is_err() {
        eprintln!("kubelet logs:\n{}", kubelet.logs());
        eprintln!("control plane logs:\n{}", cp.logs());
    }
    drop(kubelet);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    // The harness leaves nothing behind.
    assert!(
        kubelet::mountinfo_below(&base).is_empty(),
        "mounts left below {}: {:#?}",
        base.display(),
        kubelet::mountinfo_below(&base)
    );
    assert!(!base.exists(), "{} left", base.display());
    let left = processes_mentioning(&base);
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// `pid: cmdline` of the processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

async fn scenario(client: &Client, k: &Kubelet) {
    let class = StorageClass {
        metadata: ObjectMeta {
            name: Some(CLASS.into()),
            ..ObjectMeta::default()
        },
        provisioner: "kubernetes.io/no-provisioner".into(),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        reclaim_policy: Some("Retain".into()),
        ..StorageClass::default()
    };
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    filesystem(client, k).await;
    block(client, k).await;
}

/// A local PV `name` at `path` on the kubelet's node, reclaim Retain.
fn local_pv(name: &str, path: &Path, mode: VolumeMode, capacity: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_string(), Quantity(capacity.into()))].into()),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(CLASS.into()),
            volume_mode: Some(mode.as_str().into()),
            local: Some(LocalVolumeSource {
                path: path.display().to_string(),
                fs_type: None,
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![NODE.into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

/// Creates the PV and a WaitForFirstConsumer claim `<pv>-claim` of the same mode and size.
async fn pv_and_claim(
    client: &Client,
    pv: PersistentVolume,
    mode: VolumeMode,
    size: &str,
) -> String {
    let name = pv.metadata.name.clone().unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let claim = format!("{name}-claim");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &pods::wffc_claim(&claim, CLASS, mode, size),
        )
        .await
        .unwrap();
    claim
}

/// The claim is Bound to `pv` (by the scheduler's volume binder and the PV controller).
async fn assert_bound(client: &Client, claim: &str, pv: &str) {
    let start = Instant::now();
    loop {
        let c = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .get(claim)
            .await
            .unwrap();
        let phase = c.status.as_ref().and_then(|s| s.phase.clone());
        let volume = c.spec.as_ref().and_then(|s| s.volume_name.clone());
        if phase.as_deref() == Some("Bound") && volume.as_deref() == Some(pv) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "claim {claim}: {phase:?}, volume {volume:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every 100 ms until it holds; panics with `what` after `WAIT`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "{what}: not after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

fn mount_at(k: &Kubelet, target: &Path) -> Option<kubelet::MountLine> {
    kubelet::mountinfo_below(k.root_dir())
        .into_iter()
        .find(|m| m.mount_point == target)
}

async fn filesystem(client: &Client, k: &Kubelet) {
    const PV: &str = "smoke-fs";
    let volume = tempfile::Builder::new()
        .prefix("kvstrap-local-pv-")
        .tempdir()
        .unwrap();
    let claim = pv_and_claim(
        client,
        local_pv(PV, volume.path(), VolumeMode::Filesystem, "1Gi"),
        VolumeMode::Filesystem,
        "1Gi",
    )
    .await;
    let pod = pods::pod_with_claim(
        "smoke-fs",
        &claim,
        Attach::Mount {
            path: "/data",
            sub_path: None,
        },
        &format!(
            "echo hello > /data/hello && sync && {}",
            pods::SLEEP_FOREVER
        ),
    );
    let (took, uid) = pods::run_pod(client, &pod, WAIT).await;
    eprintln!(
        "Filesystem pod: created -> Running in {:.1} s (uid {uid})",
        took.as_secs_f64()
    );
    assert_bound(client, &claim, PV).await;
    let file = volume.path().join("hello");
    eventually("the pod's file on the host", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t == "hello\n")
    })
    .await;

    let target = k.root_dir().join(format!(
        "pods/{uid}/volumes/kubernetes.io~local-volume/{PV}"
    ));
    let m = mount_at(k, &target).unwrap_or_else(|| {
        panic!(
            "no mount at {}: {:#?}\n{}",
            target.display(),
            k.mounts(),
            k.pod_log("smoke-fs")
        )
    });
    eprintln!(
        "Filesystem: kubelet's mounts below its root dir while the pod runs:\n  {}",
        k.mounts().join("\n  ")
    );
    assert!(
        Path::new(&m.root).ends_with(volume.path().file_name().unwrap()),
        "the bind mount shows the volume directory: {m:?}"
    );

    let gone = pods::delete_pod_and_wait(client, "smoke-fs", 1, WAIT).await;
    let unmounted = eventually("the kubelet unmounts the volume", || {
        mount_at(k, &target).is_none()
    })
    .await;
    eprintln!(
        "Filesystem pod: gone from the API {:.1} s after its deletion, its mount {:.1} s later",
        gone.as_secs_f64(),
        unmounted.as_secs_f64()
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "hello\n",
        "the data stays on the volume"
    );
}

fn read_start(dev: &Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut f = std::fs::File::open(dev).unwrap();
    f.read_exact(&mut buf).unwrap();
    buf
}

async fn block(client: &Client, k: &Kubelet) {
    const PV: &str = "smoke-block";
    const DATA: &[u8] = b"kvstrap-block\n";
    let disk = LoopDisk::new(64 * MIB);
    let claim = pv_and_claim(
        client,
        local_pv(PV, &disk.path, VolumeMode::Block, "64Mi"),
        VolumeMode::Block,
        "64Mi",
    )
    .await;
    let pod = pods::pod_with_claim(
        "smoke-block",
        &claim,
        Attach::Device { path: "/dev/xvda" },
        &format!(
            "printf 'kvstrap-block\\n' | dd of=/dev/xvda conv=fsync && {}",
            pods::SLEEP_FOREVER
        ),
    );
    let (took, uid) = pods::run_pod(client, &pod, WAIT).await;
    eprintln!(
        "Block pod: created -> Running in {:.1} s (uid {uid})",
        took.as_secs_f64()
    );
    assert_bound(client, &claim, PV).await;
    eventually("the pod's bytes on the loop device", || {
        read_start(&disk.path, DATA.len()) == DATA
    })
    .await;

    let plugin_dir = k.root_dir().join(format!(
        "plugins/kubernetes.io~local-volume/volumeDevices/{PV}"
    ));
    let mapping = plugin_dir.join(&uid);
    let m = mount_at(k, &mapping).unwrap_or_else(|| {
        panic!(
            "no mount at {}: {:#?}\n{}",
            mapping.display(),
            k.mounts(),
            k.pod_log("smoke-block")
        )
    });
    eprintln!(
        "Block: kubelet's mounts below its root dir while the pod runs:\n  {}",
        k.mounts().join("\n  ")
    );
    assert_eq!(
        m.root,
        format!("/{}", disk.name()),
        "the device node of {} bound from devtmpfs: {m:?}",
        disk.path.display()
    );
    let loops = k.loop_devices();
    eprintln!(
        "Block: loop devices the kubelet attached (backing_file in sysfs):\n  {}",
        loops
            .iter()
            .map(|(d, b)| format!("{}: {b}", d.display()))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    let mapping_text = mapping.display().to_string();
    assert!(
        loops.iter().any(|(_, b)| *b == mapping_text),
        "a loop device on {mapping_text}: {loops:?}"
    );
    let pod_side = k.root_dir().join(format!(
        "pods/{uid}/volumeDevices/kubernetes.io~local-volume/{PV}"
    ));
    eprintln!(
        "Block: {} -> {:?}",
        pod_side.display(),
        std::fs::read_link(&pod_side)
    );

    let gone = pods::delete_pod_and_wait(client, "smoke-block", 1, WAIT).await;
    let unmapped = eventually("the kubelet unmaps the volume", || {
        mount_at(k, &mapping).is_none() && k.loop_devices().is_empty()
    })
    .await;
    eprintln!(
        "Block pod: gone from the API {:.1} s after its deletion, unmapped {:.1} s later",
        gone.as_secs_f64(),
        unmapped.as_secs_f64()
    );
    assert_eq!(read_start(&disk.path, DATA.len()), DATA);
}
