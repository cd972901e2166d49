//! Claims and pods for the real-API tests.
//!
//! - `bound_claim` and `pod_using`: a claim pre-bound to a PV, and a pod that mounts a
//!   claim as a VM's virt-launcher pod would (never scheduled when the control plane runs
//!   no scheduler), for tests that ask who uses a PersistentVolume.
//! - `wffc_claim`, `real_pod` (`pod_with_claim`, `pod_with_two_claims`), `run_pod`,
//!   `wait_running`, `delete_pod_and_wait`: pods that really run, placed by kube-scheduler
//!   (`ControlPlane::start_scheduler`) on the node of a real kubelet
//!   (`tests/support/kubelet.rs`), with the workload image that harness imports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{
    Container, Event, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ServiceAccount, Toleration, Volume,
    VolumeDevice, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use std::time::{Duration, Instant};

/// The workload image `tests/support/kubelet.rs` builds and imports: Debian's static
/// busybox at `/bin/busybox`, every applet linked in `/bin` (`sh`, `sleep`, `cat`, `dd`,
/// `sync`, `mountpoint`, ...). Pods use it with `imagePullPolicy: Never`.
pub const WORKLOAD_IMAGE: &str = "kvstrap.test/busybox:1";

/// The end of a pod command that keeps the container running until the pod is deleted,
/// and exits at once on SIGTERM (a shell that is PID 1 has no default signal handlers).
pub const SLEEP_FOREVER: &str = "trap 'exit 0' TERM; sleep 3600 & wait";

const NAMESPACE: &str = "default";

/// Creates `default/default` if missing: the service account admission wants it, and this
/// control plane runs no controller that makes it.
pub async fn ensure_default_service_account(client: &Client) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create the default service account: {e}"),
    }
}

/// A pod in `default` mounting `claim` (never scheduled: there is no scheduler, no kubelet).
pub async fn pod_using(client: &Client, claim: &str) -> String {
    ensure_default_service_account(client).await;
    let name = format!("vm-{claim}");
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "c".into(),
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
    };
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    name
}

fn claim_spec(class: &str, mode: VolumeMode, size: &str) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        storage_class_name: Some(class.into()),
        volume_mode: Some(mode.as_str().into()),
        resources: Some(VolumeResourceRequirements {
            requests: Some(std::collections::BTreeMap::from([(
                "storage".into(),
                Quantity(size.into()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A claim `name` in `default` pre-bound to `pv` (static binding: `volumeName` and the
/// class), asking for `size` (no more than the PV holds).
pub fn bound_claim(name: &str, pv: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some(pv.into()),
            ..claim_spec(class, VolumeMode::Filesystem, size)
        }),
        status: None,
    }
}

/// A PersistentVolume's or claim's `volumeMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

impl VolumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// A claim `name` in `default` of `class` (a WaitForFirstConsumer class), not pre-bound:
/// the scheduler's volume binder picks the PV when a pod using it is placed.
pub fn wffc_claim(name: &str, class: &str, mode: VolumeMode, size: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(claim_spec(class, mode, size)),
        status: None,
    }
}

/// How a pod's container uses a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach<'a> {
    /// A Filesystem claim mounted at `path`, optionally only its `sub_path` directory.
    Mount {
        path: &'a str,
        sub_path: Option<&'a str>,
    },
    /// A Block claim as the device node `path` (`volumeDevices`).
    Device { path: &'a str },
}

/// A pod `name` in `default` that runs `command` (`/bin/sh -c`) in the workload image,
/// using each `(claim, how)` of `claims` — set up to run on a real kubelet without CNI:
/// host network, tolerating every taint (the node keeps `not-ready`), no service account
/// token (no root-CA publisher runs), `imagePullPolicy: Never`, `restartPolicy: Never`
/// (a command that fails makes the pod Failed, not a crash loop), 1 s grace period.
/// End `command` with `SLEEP_FOREVER` to keep it running.
pub fn real_pod(name: &str, claims: &[(&str, Attach<'_>)], command: &str) -> Pod {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut devices = Vec::new();
    for (i, (claim, how)) in claims.iter().enumerate() {
        let volume = format!("claim{i}");
        volumes.push(Volume {
            name: volume.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: (*claim).into(),
                read_only: None,
            }),
            ..Volume::default()
        });
        match how {
            Attach::Mount { path, sub_path } => mounts.push(VolumeMount {
                name: volume,
                mount_path: (*path).into(),
                sub_path: sub_path.map(Into::into),
                ..VolumeMount::default()
            }),
            Attach::Device { path } => devices.push(VolumeDevice {
                name: volume,
                device_path: (*path).into(),
            }),
        }
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            host_network: Some(true),
            automount_service_account_token: Some(false),
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(1),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Toleration::default()
            }]),
            containers: vec![Container {
                name: "c".into(),
                image: Some(WORKLOAD_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                command: Some(vec!["/bin/sh".into(), "-c".into(), command.into()]),
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// `real_pod` with one claim.
pub fn pod_with_claim(name: &str, claim: &str, how: Attach<'_>, command: &str) -> Pod {
    real_pod(name, &[(claim, how)], command)
}

/// `real_pod` with two claims.
pub fn pod_with_two_claims(
    name: &str,
    first: (&str, Attach<'_>),
    second: (&str, Attach<'_>),
    command: &str,
) -> Pod {
    real_pod(name, &[first, second], command)
}

/// Creates `pod` in `default` (and the default service account it needs), then waits up
/// to `timeout` until it is Running: returns the time from creation to Running and the
/// pod's uid.
pub async fn run_pod(client: &Client, pod: &Pod, timeout: Duration) -> (Duration, String) {
    ensure_default_service_account(client).await;
    let name = pod.metadata.name.clone().expect("a pod name");
    let start = Instant::now();
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), pod)
        .await
        .unwrap_or_else(|e| panic!("cannot create pod {name}: {e}"));
    let (_, uid) = wait_running(client, &name, timeout).await;
    (start.elapsed(), uid)
}

/// Waiting reasons after which a container does not start by itself.
const FATAL_WAITING: &[&str] = &[
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Waits up to `timeout` until pod `default/name` is Running: returns how long that took
/// and the pod's uid. Fails at once when the pod ended (Succeeded, Failed) or its
/// container cannot start; the failure message has the pod's status and Events.
pub async fn wait_running(client: &Client, name: &str, timeout: Duration) -> (Duration, String) {
    let api = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let start = Instant::now();
    loop {
        let pod = api.get_opt(name).await.unwrap();
        let status = pod.as_ref().and_then(|p| p.status.as_ref());
        let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
        if phase == "Running" {
            let uid = pod.and_then(|p| p.metadata.uid).expect("a pod uid");
            return (start.elapsed(), uid);
        }
        let fatal = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
            .find(|r| FATAL_WAITING.contains(&r.as_str()));
        let ended = phase == "Succeeded" || phase == "Failed";
        if ended || fatal.is_some() || start.elapsed() > timeout {
            panic!(
                "pod {name} not Running after {:.1} s (phase {phase:?}{}):\nstatus: {}\nevents:\n{}",
                start.elapsed().as_secs_f64(),
                fatal.map(|r| format!(", container waiting: {r}")).unwrap_or_default(),
                serde_json::to_string_pretty(&status).unwrap_or_default(),
                pod_events(client, name).await.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `reason: message` of the Events about pod `default/name`, oldest first.
pub async fn pod_events(client: &Client, name: &str) -> Vec<String> {
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Pod,involvedObject.name={name}"
    ));
    match Api::<Event>::namespaced(client.clone(), NAMESPACE)
        .list(&params)
        .await
    {
        Ok(list) => list
            .items
            .into_iter()
            .map(|e| {
                format!(
                    "  {} {}: {}",
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .collect(),
        Err(e) => vec![format!("  (cannot list events: {e})")],
    }
}

/// Deletes pod `default/name` with `grace_seconds` and waits up to `timeout` until it is
/// gone from the API: the kubelet removes it only after its containers stopped and its
/// volumes were unmounted (unmapped, for Block). Returns how long that took.
pub async fn delete_pod_and_wait(
    client: &Client,
    name: &str,
    grace_seconds: u32,
    timeout: Duration,
) -> Duration {
    let api = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let start = Instant::now();
    let params = DeleteParams {
        grace_period_seconds: Some(grace_seconds),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return start.elapsed(),
        Err(e) => panic!("cannot delete pod {name}: {e}"),
    }
    while let Some(pod) = api.get_opt(name).await.unwrap() {
        assert!(
            start.elapsed() < timeout,
            "pod {name} still in the API {timeout:?} after its deletion: {}\nevents:\n{}",
            serde_json::to_string_pretty(&pod.status).unwrap_or_default(),
            pod_events(client, name).await.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}
