//! The publisher against the in-process API-server double: offline start, 500s and 409s,
//! watch restarts, reclaim (Delete and Retain), vanished volumes, PVs deleted by hand.
//! Invariants checked throughout: published set == provisioned set, no Bound PV deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/fixtures.rs"]
mod fixtures;

use apiserver::{kubeconfig, Double, Shared};
use fixtures::*;
use kvstrap::kube::publisher::recorded_publication;
use kvstrap::kube::{ClientSource, Desired, PublishOptions, Publisher, ScrubError, Scrubber};
use kvstrap::model::{VolumeMode, VolumeSpec};
use kvstrap::policy::types::ReclaimPolicy;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Records scrubs and what the cluster looked like at that moment; can be made to fail.
struct Recording {
    double: Mutex<Option<Shared>>,
    calls: Mutex<Vec<(String, bool)>>,
    fail: AtomicBool,
}

impl Recording {
    fn new() -> Arc<Recording> {
        Arc::new(Recording {
            double: Mutex::new(None),
            calls: Mutex::new(vec![]),
            fail: AtomicBool::new(false),
        })
    }
    fn scrubbed(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl Scrubber for Recording {
    fn scrub(&self, v: &VolumeSpec) -> Result<(), ScrubError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(ScrubError::TooDeep {
                path: v.path.clone(),
            });
        }
        let pv = kvstrap::kube::builders::pv_name(NODE, &v.name);
        let present = self
            .double
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|d| d.pvs().contains_key(&pv));
        self.calls.lock().unwrap().push((v.name.clone(), present));
        Ok(())
    }
}

fn fast(resync: Duration) -> PublishOptions {
    PublishOptions {
        concurrency: 8,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        resync,
        debounce: Duration::from_millis(10),
    }
}

struct Env {
    state: tempfile::TempDir,
    double: Shared,
    port: u16,
    scrubber: Arc<Recording>,
}

impl Env {
    async fn up() -> Env {
        let double = Double::new();
        let port = double.serve(0).await;
        Env::with(double, port)
    }

    fn with(double: Shared, port: u16) -> Env {
        let scrubber = Recording::new();
        *scrubber.double.lock().unwrap() = Some(double.clone());
        Env {
            state: tempfile::tempdir().unwrap(),
            double,
            port,
            scrubber,
        }
    }

    fn publisher(&self, resync: Duration) -> Publisher {
        let source = ClientSource::Kubeconfig(kubeconfig(self.state.path(), self.port));
        Publisher::start(
            source,
            NODE,
            self.state.path(),
            self.scrubber.clone(),
            fast(resync),
        )
        .unwrap()
    }

    fn desired(&self, volumes: &[VolumeSpec], reclaim: ReclaimPolicy) -> Desired {
        let c = class("kubevirt-local-nvme", VolumeMode::Filesystem, reclaim);
        Desired::build(NODE, volumes, &[c]).unwrap()
    }

    fn volumes(&self, n: usize) -> Vec<VolumeSpec> {
        dir_volumes(self.state.path(), n, "kubevirt-local-nvme")
    }

    /// No PV was ever deleted while Bound.
    fn assert_no_bound_deleted(&self) {
        for (name, phase, by) in self
            .double
            .deletions()
            .into_iter()
            .filter(|d| d.2 == "kvstrap")
        {
            assert_ne!(
                phase.as_deref(),
                Some("Bound"),
                "{by} deleted Bound PV {name}"
            );
        }
    }

    fn assert_published(&self, desired: &Desired, extra: &[&str]) {
        let want: BTreeSet<String> = desired
            .volumes
            .iter()
            .map(|v| v.pv_name().to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        let have: BTreeSet<String> = self.double.pvs().into_keys().collect();
        assert_eq!(have, want);
        self.assert_no_bound_deleted();
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn converge(p: &Publisher) {
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "not converged: {:?}",
        p.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_exactly_the_provisioned_volumes() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(5), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    env.assert_published(&desired, &[]);
    assert!(env
        .double
        .storage_classes()
        .contains_key("kubevirt-local-nvme"));
    let s = p.status();
    assert_eq!(s.pending, 0);
    assert_eq!(s.volumes.len(), 5);
    // Answered Pending, made Available by the PV controller just after: the watch has the
    // next pass see it.
    let available = |s: &kvstrap::kube::PublishStatus| {
        s.volumes
            .values()
            .all(|v| v.published && v.phase.as_deref() == Some("Available"))
    };
    assert!(p.wait_for(WAIT, available).await, "{:?}", p.status());
    // Applying again changes nothing on the server.
    let applies = env.double.applies();
    p.submit(desired.clone());
    converge(&p).await;
    assert_eq!(
        env.double.applies(),
        applies,
        "unchanged objects are not re-applied"
    );
    // What `kvstrap volumes` reads without the API server.
    let recorded = recorded_publication(env.state.path(), NODE, &env.volumes(5));
    assert!(
        recorded
            .values()
            .all(|v| v.published && v.phase.as_deref() == Some("Available")),
        "{recorded:?}"
    );
    assert!(
        env.scrubber.scrubbed().is_empty(),
        "fresh volumes need no scrub"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_at_start_then_up() {
    // Reserve a port, then leave it closed: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::with(Double::new(), port);
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(3), ReclaimPolicy::Delete);
    let started = std::time::Instant::now();
    p.submit(desired.clone());
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "submit must not wait for the network"
    );
    assert!(p.wait_for(WAIT, |s| s.consecutive_failures >= 2).await);
    let s = p.status();
    assert_eq!(s.pending, 4, "3 PVs + 1 StorageClass pending: {s:?}");
    assert!(!s.connected && s.last_error.is_some() && s.retry_in.is_some());
    env.double.serve(port).await;
    converge(&p).await;
    env.assert_published(&desired, &[]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kubeconfig_is_retried_until_it_appears() {
    let env = Env::up().await;
    let path = env.state.path().join("not-yet/kubelet.conf");
    let source = ClientSource::Kubeconfig(path.clone());
    let p = Publisher::start(
        source,
        NODE,
        env.state.path(),
        env.scrubber.clone(),
        fast(Duration::from_secs(60)),
    )
    .unwrap();
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    assert!(p.wait_for(WAIT, |s| s.consecutive_failures >= 2).await);
    assert!(
        p.status().last_error.unwrap().contains("kubeconfig"),
        "error names the kubeconfig"
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::rename(kubeconfig(env.state.path(), env.port), &path).unwrap();
    converge(&p).await;
    env.assert_published(&desired, &[]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_500_and_409_are_retried() {
    let env = Env::up().await;
    env.double.fail_next(&[500, 409, 500, 409, 500, 500, 409]);
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(4), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    env.assert_published(&desired, &[]);
    assert!(
        p.status().passes >= 2,
        "at least one failed pass before success"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_stay_pending_and_are_reported() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let mut volumes = env.volumes(2);
    volumes[1].path = "relative/path".into();
    let desired = env.desired(&volumes, ReclaimPolicy::Delete);
    p.submit(desired);
    assert!(
        p.wait_for(WAIT, |s| s.passes >= 1 && s.pending == 1).await,
        "{:?}",
        p.status()
    );
    let err = p.status().last_error.unwrap();
    assert!(err.contains("422") && err.contains("absolute"), "{err}");
    assert_eq!(env.double.pvs().len(), 1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_with_delete_is_scrubbed_and_republished() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.release(&pv);
    eventually("released PV re-published as Available", || {
        env.double.phase(&pv).as_deref() == Some("Available")
            && env.double.pvs()[&pv]["spec"]["claimRef"].is_null()
    })
    .await;
    let calls = env.scrubber.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![(desired.volumes[0].spec.name.clone(), true)],
        "scrubbed once, while the Released PV still existed"
    );
    assert_eq!(
        env.double.deletions(),
        vec![(pv.clone(), Some("Released".into()), "kvstrap")]
    );
    env.assert_published(&desired, &[]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_with_retain_is_left_and_reported() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Retain);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[1].pv_name().to_string();
    env.double.bind(&pv);
    env.double.release(&pv);
    eventually("Retain reported as an Event", || {
        env.double.events().iter().any(|e| {
            e["reason"] == "ReleasedRetained" && e["involvedObject"]["name"] == pv.as_str()
        })
    })
    .await;
    assert_eq!(env.double.phase(&pv).as_deref(), Some("Released"));
    assert!(
        env.scrubber.scrubbed().is_empty(),
        "retained data is not scrubbed"
    );
    assert!(env.double.deletions().is_empty());
    assert!(
        p.wait_for(WAIT, |s| s
            .volumes
            .values()
            .any(|v| v.phase.as_deref() == Some("Released")))
            .await
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_switch_to_retain_is_honoured() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(1), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.set_reclaim(&pv, "Retain");
    env.double.release(&pv);
    eventually("Retain reported", || {
        env.double
            .events()
            .iter()
            .any(|e| e["reason"] == "ReleasedRetained")
    })
    .await;
    assert_eq!(env.double.phase(&pv).as_deref(), Some("Released"));
    assert!(env.scrubber.scrubbed().is_empty());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_volumes_available_deleted_bound_kept() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let all = env.volumes(4);
    let desired = env.desired(&all, ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let bound = desired.volumes[2].pv_name().to_string();
    let released = desired.volumes[3].pv_name().to_string();
    env.double.bind(&bound);
    env.double.bind(&released);
    env.double.release(&released);
    // Volumes 2..4 vanish (disk pulled): only volume 1 remains. The Released one (reclaim
    // Delete) cannot be scrubbed and would stay Released forever: it goes too.
    let remaining = env.desired(&all[..1], ReclaimPolicy::Delete);
    p.submit(remaining.clone());
    converge(&p).await;
    env.assert_published(&remaining, &[&bound]);
    let mut deleted: Vec<String> = env
        .double
        .deletions()
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    deleted.sort();
    let mut want = vec![desired.volumes[1].pv_name().to_string(), released.clone()];
    want.sort();
    assert_eq!(deleted, want);
    eventually("the kept PV reported", || {
        env.double
            .events()
            .iter()
            .filter(|e| e["reason"] == "VolumeMissing")
            .count()
            == 1
    })
    .await;
    let kept = p.status().last_pass.unwrap().kept;
    assert_eq!(kept, vec![bound.clone()]);
    assert!(
        env.scrubber.scrubbed().is_empty(),
        "a vanished volume cannot be scrubbed: its data stays reported"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_racing_a_delete_is_refused_by_the_precondition() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let all = env.volumes(2);
    let desired = env.desired(&all, ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[1].pv_name().to_string();
    // A claim binds the PV after kvstrap listed it Available and before its delete
    // arrives: the uid + resourceVersion precondition makes the API server refuse it.
    env.double.race_bind_on_delete(&pv);
    p.submit(env.desired(&all[..1], ReclaimPolicy::Delete));
    eventually("the kept Bound PV is reported", || {
        env.double
            .events()
            .iter()
            .any(|e| e["reason"] == "VolumeMissing")
    })
    .await;
    assert_eq!(env.double.phase(&pv).as_deref(), Some("Bound"));
    assert!(env.double.deletions().is_empty());
    converge(&p).await;
    p.shutdown().await;
}

/// A draining disk under faults: a claim binds its Available PV between kvstrap's list and
/// its delete, and deletes answer 500 and 409 for a while. The bound PV is never deleted
/// and keeps holding the disk; the disk's other PV goes once the errors are spent; the
/// drain view never says "nothing left" while a PV of the disk is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_disk_under_faults_is_never_reported_released_early() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let mut all = env.volumes(3);
    for v in &mut all[..2] {
        v.disk_identity = "serial:DRAIN".into();
    }
    let desired = env.desired(&all, ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let (raced, other) = (
        desired.volumes[0].pv_name().to_string(),
        desired.volumes[1].pv_name().to_string(),
    );
    env.double.race_bind_on_delete(&raced);
    env.double.fail_next(&[500, 409, 500]);
    let mut draining = env.desired(&all[2..], ReclaimPolicy::Delete);
    draining.draining.insert("serial:DRAIN".into());
    p.submit(draining.clone());
    let start = std::time::Instant::now();
    loop {
        let status = p.status();
        let view = status
            .last_pass
            .as_ref()
            .and_then(|l| l.draining.get("serial:DRAIN").cloned());
        let pvs = env.double.pvs();
        if let Some(view) = &view {
            // Whatever the view says, it names every PV of the disk still in the cluster.
            for name in [&raced, &other] {
                if pvs.contains_key(name.as_str()) {
                    assert!(
                        view.iter().any(|b| &b.pv == name),
                        "{name} is in the cluster but not in the drain view {view:?}"
                    );
                }
            }
        }
        if !pvs.contains_key(other.as_str()) && view.is_some_and(|v| v.len() == 1) {
            break;
        }
        assert!(start.elapsed() < WAIT, "{:?}", p.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.double.phase(&raced).as_deref(), Some("Bound"));
    env.assert_no_bound_deleted();
    // The pass whose delete lost the race saw it Available; the next one sees the claim.
    p.submit(draining.clone());
    let bound_seen = p
        .wait_for(WAIT, |s| {
            s.last_pass.as_ref().is_some_and(|l| {
                l.draining.get("serial:DRAIN").is_some_and(|v| {
                    v.len() == 1 && v[0].pv == raced && v[0].phase.as_deref() == Some("Bound")
                })
            })
        })
        .await;
    assert!(bound_seen, "{:?}", p.status());
    assert_eq!(env.double.phase(&raced).as_deref(), Some("Bound"));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pv_deleted_by_hand_is_republished_only_after_a_scrub() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(3), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[1].pv_name().to_string();

    env.scrubber.fail.store(true, Ordering::SeqCst);
    env.double.bind(&pv);
    env.double.delete_by_hand(&pv);
    assert!(
        p.wait_for(WAIT, |s| s.pending == 1
            && s.last_error.as_deref().is_some_and(|e| e.contains("scrub")))
            .await
    );
    assert!(
        !env.double.pvs().contains_key(&pv),
        "not re-published while the scrub fails"
    );

    env.scrubber.fail.store(false, Ordering::SeqCst);
    converge(&p).await;
    env.assert_published(&desired, &[]);
    assert_eq!(
        *env.scrubber.calls.lock().unwrap(),
        vec![(desired.volumes[1].spec.name.clone(), false)],
        "scrubbed before the PV came back"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_by_hand_while_kvstrap_was_down_is_caught_from_the_ledger() {
    let env = Env::up().await;
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    let p = env.publisher(Duration::from_secs(60));
    p.submit(desired.clone());
    converge(&p).await;
    p.shutdown().await;

    let pv = desired.volumes[0].pv_name().to_string();
    env.double.delete_by_hand(&pv);
    let p = env.publisher(Duration::from_secs(60));
    p.submit(desired.clone());
    converge(&p).await;
    env.assert_published(&desired, &[]);
    assert_eq!(
        env.scrubber.scrubbed(),
        vec![desired.volumes[0].spec.name.clone()]
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_still_catch_releases() {
    let env = Env::up().await;
    // No resync in this test's time: only the watch can notice the release.
    let p = env.publisher(Duration::from_secs(3600));
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    for round in 0..3 {
        env.double.restart_watches();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pv = desired.volumes[round % 2].pv_name().to_string();
        env.double.bind(&pv);
        env.double.release(&pv);
        eventually("release noticed through the restarted watch", || {
            env.double.phase(&pv).as_deref() == Some("Available")
                && env.scrubber.scrubbed().len() == round + 1
        })
        .await;
    }
    env.assert_published(&desired, &[]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volumes_publish_with_their_class() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let c = class(
        "kubevirt-local-block",
        VolumeMode::Block,
        ReclaimPolicy::Delete,
    );
    let v = block_volume(env.state.path(), 1, &c.name);
    let desired = Desired::build(NODE, &[v], &[c]).unwrap();
    p.submit(desired.clone());
    converge(&p).await;
    let pv = &env.double.pvs()[desired.volumes[0].pv_name()];
    assert_eq!(pv["spec"]["volumeMode"], "Block");
    assert!(pv["spec"]["local"]["fsType"].is_null());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pv_is_waited_for_then_scrubbed_and_republished() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.mark_terminating(&pv);
    assert!(
        p.wait_for(WAIT, |s| s.pending == 1
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("being deleted")))
            .await
    );
    assert!(
        env.scrubber.scrubbed().is_empty(),
        "nothing scrubbed while a pod may still use it"
    );
    env.double.delete_by_hand(&pv);
    converge(&p).await;
    env.assert_published(&desired, &[]);
    assert_eq!(
        env.scrubber.scrubbed(),
        vec![desired.volumes[0].spec.name.clone()]
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_once_for_the_cli() {
    let env = Env::up().await;
    let desired = env.desired(&env.volumes(3), ReclaimPolicy::Delete);
    let source = ClientSource::Kubeconfig(kubeconfig(env.state.path(), env.port));
    let report = kvstrap::kube::publisher::publish_once(
        &source,
        &desired,
        env.state.path(),
        env.scrubber.clone(),
        4,
    )
    .await
    .unwrap();
    assert_eq!((report.applied, report.pending), (4, 0));
    assert!(report.errors.is_empty());
    env.assert_published(&desired, &[]);
    // Offline: the client cannot connect, the error says so and nothing is half-done.
    let offline = ClientSource::Kubeconfig(env.state.path().join("missing.conf"));
    let err = kvstrap::kube::publisher::publish_once(
        &offline,
        &desired,
        env.state.path(),
        env.scrubber.clone(),
        4,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing.conf"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_pv_that_lost_its_labels_is_not_scrubbed() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(2), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.remove_label(&pv, "kvstrap.io/node");
    eventually("labels restored", || {
        env.double.pvs()[&pv]["metadata"]["labels"]["kvstrap.io/node"] == NODE
    })
    .await;
    assert!(
        env.scrubber.scrubbed().is_empty(),
        "a Bound volume in use must never be scrubbed"
    );
    assert_eq!(env.double.phase(&pv).as_deref(), Some("Bound"));
    env.assert_published(&desired, &[]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_deleted_by_hand_comes_back() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_millis(200));
    let desired = env.desired(&env.volumes(1), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    env.double.delete_storage_class("kubevirt-local-nvme");
    eventually("StorageClass re-created", || {
        env.double
            .storage_classes()
            .contains_key("kubevirt-local-nvme")
    })
    .await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_publisher_sends_no_writes_when_nothing_changed() {
    let env = Env::up().await;
    let desired = env.desired(&env.volumes(5), ReclaimPolicy::Delete);
    let p = env.publisher(Duration::from_secs(60));
    p.submit(desired.clone());
    converge(&p).await;
    p.shutdown().await;
    let applies = env.double.applies();
    // A new process (daemon restart, `kvstrap apply`): compares with what it lists.
    let p = env.publisher(Duration::from_secs(60));
    p.submit(desired.clone());
    converge(&p).await;
    assert_eq!(
        env.double.applies(),
        applies,
        "no write for unchanged objects"
    );
    // A real change is still applied, and only that one object.
    let mut changed = env.volumes(5);
    changed[2].capacity_bytes = 50 << 30;
    p.submit(env.desired(&changed, ReclaimPolicy::Delete));
    converge(&p).await;
    assert_eq!(env.double.applies(), applies + 1);
    let pv = desired.volumes[2].pv_name();
    assert_eq!(env.double.pvs()[pv]["spec"]["capacity"]["storage"], "50Gi");
    p.shutdown().await;
}

/// The real server (tests/kube_real.rs) marks a Released PV with reclaim Delete `Failed`
/// when it lacks kvstrap's provisioned-by annotation: so does the double, and kvstrap
/// takes such a PV back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pv_without_the_annotation_is_taken_back() {
    let env = Env::up().await;
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(1), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.release_unannotated(&pv);
    eventually("Failed PV scrubbed and re-published", || {
        env.double.phase(&pv).as_deref() == Some("Available")
    })
    .await;
    assert_eq!(
        env.scrubber.scrubbed(),
        vec![desired.volumes[0].spec.name.clone()]
    );
    assert_eq!(
        env.double.deletions(),
        vec![(pv.clone(), Some("Failed".into()), "kvstrap")]
    );
    p.shutdown().await;
}

/// Events as the real server wants them (`action` and reporting fields with `eventTime`),
/// posted once, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_valid_and_posted_once() {
    let env = Env::up().await;
    let desired = env.desired(&env.volumes(1), ReclaimPolicy::Retain);
    let p = env.publisher(Duration::from_millis(100));
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    env.double.bind(&pv);
    env.double.release(&pv);
    eventually("Event posted", || env.double.event_posts() == 1).await;
    let ev = env.double.events()[0].clone();
    assert_eq!(ev["action"], "RetainVolume");
    assert_eq!(ev["reportingComponent"], "kvstrap");
    assert_eq!(ev["reportingInstance"], NODE);
    // Several resync passes, then a restart: no second Event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.shutdown().await;
    let p = env.publisher(Duration::from_millis(100));
    p.submit(desired.clone());
    converge(&p).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.double.event_posts(), 1);
    assert_eq!(env.double.events().len(), 1);
    p.shutdown().await;
}

/// On a real cluster the recycled PV lingers, terminating, until kube-controller-manager
/// removes its pv-protection finalizer: kvstrap waits for it, scrubs once, and no pass
/// fails (no WARN for the normal delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycle_waits_out_pv_protection_and_scrubs_once() {
    let env = Env::up().await;
    env.double.pv_protection(Duration::from_millis(300));
    let p = env.publisher(Duration::from_secs(60));
    let desired = env.desired(&env.volumes(1), ReclaimPolicy::Delete);
    p.submit(desired.clone());
    converge(&p).await;
    let pv = desired.volumes[0].pv_name().to_string();
    let uid = env.double.pvs()[&pv]["metadata"]["uid"].clone();
    env.double.bind(&pv);
    env.double.release(&pv);
    let failed_passes = std::sync::atomic::AtomicU32::new(0);
    eventually("re-published after the finalizer went", || {
        failed_passes.fetch_max(p.status().consecutive_failures, Ordering::SeqCst);
        env.double
            .pvs()
            .get(&pv)
            .is_some_and(|o| o["metadata"]["uid"] != uid && o["status"]["phase"] == "Available")
    })
    .await;
    converge(&p).await;
    assert_eq!(env.scrubber.scrubbed().len(), 1, "scrubbed once");
    assert_eq!(failed_passes.load(Ordering::SeqCst), 0, "a pass failed");
    p.shutdown().await;
}
