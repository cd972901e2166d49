//! kvstrap's publication against a real control plane: etcd + kube-apiserver +
//! kube-controller-manager (its PV controllers), started once by
//! `tests/support/control_plane.rs` for all the cases below, which run one after the other
//! (each on its own node name, state directory and storage classes) and are reported
//! together. Volumes are plain directories in a tempdir: no disk, no root needed.
//!
//! Without the binaries the test is skipped with a message; with `CI` set it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/fault_proxy.rs"]
mod fault_proxy;
#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/http_faults.rs"]
mod http_faults;
#[path = "support/pods.rs"]
mod pods;

use control_plane::ControlPlane;
use fault_proxy::{Fault, FaultProxy};
use fixtures::{class, dir_volumes};
use futures::FutureExt;
use http_faults::{HttpFaults, Stage};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use kvstrap::kube::reconcile::Reconciler;
use kvstrap::kube::{
    Desired, DirectoryAndBlockScrubber, PassReport, PublishOptions, Publisher, ScrubError, Scrubber,
};
use kvstrap::model::{VolumeMode, VolumeSpec};
use kvstrap::policy::types::ReclaimPolicy;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reclaim end to end must finish within this (the controller manager syncs every 2 s).
const RECLAIM_BOUND: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(60);

struct Ctx<'a> {
    cp: &'a ControlPlane,
    client: Client,
}

#[test]
fn real_control_plane() {
    let Some((cp, rt, client)) = cases::start("real_control_plane") else {
        return;
    };
    let ctx = Ctx { cp: &cp, client };
    let cases: &[(&str, cases::Case<Ctx<'_>>)] = &[
        ("manifests_accepted_by_dry_run_and_applied_with_ssa", |c| {
            manifests_accepted(c).boxed()
        }),
        ("no_op_pass_makes_no_writes", |c| no_op_pass(c).boxed()),
        ("reclaim_delete_end_to_end", |c| reclaim_delete(c).boxed()),
        ("failed_pv_of_an_earlier_version_is_recovered", |c| {
            failed_recovered(c).boxed()
        }),
        ("retain_keeps_data_until_the_pv_is_deleted", |c| {
            retain_keeps_data(c).boxed()
        }),
        ("bound_pv_never_deleted", |c| bound_never_deleted(c).boxed()),
        ("node_deleted_and_recreated", |c| node_recreated(c).boxed()),
        ("drain_keeps_the_bound_pv_and_deletes_the_rest", |c| {
            drain_keeps_bound(c).boxed()
        }),
        (
            "forget_deletes_unbound_pvs_of_a_gone_disk_never_a_bound_one",
            |c| forget_gone_disk(c).boxed(),
        ),
        ("bound_pv_never_deleted_under_network_faults", |c| {
            network_faults(c).boxed()
        }),
        ("bound_pv_never_deleted_under_http_errors", |c| {
            http_errors(c).boxed()
        }),
        // Last: it restarts the apiserver (and resets its counters).
        ("apiserver_stopped_and_started_under_a_publisher", |c| {
            apiserver_restart(c).boxed()
        }),
    ];
    let failures = cases::run_all(&rt, &ctx, cases);
    drop(ctx);
    rt.shutdown_timeout(Duration::from_secs(5));
    if !failures.is_empty() {
        panic!(
            "{} case(s) failed:\n{}\n\ncontrol plane logs:\n{}",
            failures.len(),
            failures.join("\n"),
            cp.logs()
        );
    }
}

// ---- helpers ----------------------------------------------------------------------------

/// One node's worth of test inputs: a state directory and volume directories below it.
struct Site {
    name: String,
    dir: tempfile::TempDir,
    class: kvstrap::policy::types::StorageClass,
}

impl Site {
    fn new(name: &str, class_name: &str, reclaim: ReclaimPolicy) -> Site {
        Site {
            name: name.to_string(),
            dir: tempfile::tempdir().unwrap(),
            class: class(class_name, VolumeMode::Filesystem, reclaim),
        }
    }

    fn volumes(&self, n: usize) -> Vec<VolumeSpec> {
        let root = self.dir.path().join("storage");
        let v = dir_volumes(&root, n, &self.class.name);
        for v in &v {
            std::fs::create_dir_all(&v.path).unwrap();
        }
        v
    }

    fn desired(&self, volumes: &[VolumeSpec]) -> Desired {
        Desired::build(&self.name, volumes, std::slice::from_ref(&self.class)).unwrap()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn reconciler(&self, scrubber: Arc<dyn Scrubber>) -> Reconciler {
        Reconciler::new(&self.name, self.state(), scrubber, 16)
    }

    fn publisher(&self, ctx: &Ctx<'_>, scrubber: Arc<dyn Scrubber>) -> Publisher {
        self.publisher_via(&ctx.cp.kubeconfig, scrubber)
    }

    /// A publisher that reaches the server through `kubeconfig` (a fault proxy's).
    fn publisher_via(&self, kubeconfig: &Path, scrubber: Arc<dyn Scrubber>) -> Publisher {
        let source = kvstrap::kube::ClientSource::Kubeconfig(kubeconfig.to_path_buf());
        let options = PublishOptions {
            concurrency: 16,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            resync: Duration::from_secs(3),
            debounce: Duration::from_millis(50),
        };
        Publisher::start(source, &self.name, &self.state(), scrubber, options).unwrap()
    }
}

/// The real scrubber, counting what it scrubs.
#[derive(Default)]
struct Counting(Mutex<Vec<String>>);

impl Scrubber for Counting {
    fn scrub(&self, v: &VolumeSpec) -> Result<(), ScrubError> {
        self.0.lock().unwrap().push(v.name.clone());
        DirectoryAndBlockScrubber.scrub(v)
    }
}

impl Counting {
    fn count(&self, volume: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == volume)
            .count()
    }
}

async fn pass(r: &mut Reconciler, ctx: &Ctx<'_>, d: &Desired) -> PassReport {
    let report = r.pass(&ctx.client, d).await.unwrap();
    assert!(report.errors.is_empty(), "pass errors: {:?}", report.errors);
    report
}

async fn get_pv(ctx: &Ctx<'_>, name: &str) -> Option<PersistentVolume> {
    Api::<PersistentVolume>::all(ctx.client.clone())
        .get_opt(name)
        .await
        .unwrap()
}

fn phase(pv: &PersistentVolume) -> Option<String> {
    pv.status.as_ref().and_then(|s| s.phase.clone())
}

async fn wait_phase(ctx: &Ctx<'_>, name: &str, want: &str) -> PersistentVolume {
    let start = Instant::now();
    loop {
        if let Some(pv) = get_pv(ctx, name).await {
            if phase(&pv).as_deref() == Some(want) {
                return pv;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "PV {name} not {want} after {WAIT:?}: {:?}",
            get_pv(ctx, name).await.map(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A claim pre-bound to `pv` (static binding: `volumeName` and the class), in `default`.
async fn claim(ctx: &Ctx<'_>, pv: &str, class: &str) -> String {
    let name = format!("claim-{pv}");
    let pvc = pods::bound_claim(&name, pv, class, "1Gi");
    Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), "default")
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    wait_phase(ctx, pv, "Bound").await;
    name
}

async fn delete_claim(ctx: &Ctx<'_>, name: &str) {
    Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), "default")
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
}

/// Submits `desired` to `p`, waits until it is published, and binds a claim to the first
/// volume's PV; returns the PV's and the claim's names.
async fn publish_and_claim(
    ctx: &Ctx<'_>,
    n: &Site,
    p: &Publisher,
    desired: &Desired,
) -> (String, String) {
    p.submit(desired.clone());
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "{:?}",
        p.status()
    );
    let pv = desired.volumes[0].pv_name().to_string();
    wait_phase(ctx, &pv, "Available").await;
    let claim_name = claim(ctx, &pv, &n.class.name).await;
    (pv, claim_name)
}

/// Events in `default` about PV `pv` with `reason`.
async fn events(ctx: &Ctx<'_>, pv: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(ctx.client.clone(), "default")
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

/// kvstrap's writes since the server started: server-side applies and deletes of PVs and
/// StorageClasses, Event posts. (The controller manager writes with PUT: not counted.)
fn kvstrap_writes(cp: &ControlPlane) -> u64 {
    let of =
        |resource: &str, verb: &str| cp.request_total(&[("resource", resource), ("verb", verb)]);
    of("persistentvolumes", "APPLY")
        + of("persistentvolumes", "DELETE")
        + of("storageclasses", "APPLY")
        + of("storageclasses", "DELETE")
        + of("events", "POST")
}

// ---- cases ------------------------------------------------------------------------------

/// Every manifest kvstrap renders passes a server-side dry run; then a pass applies them
/// with SSA (field manager kvstrap) and a second pass changes no resourceVersion.
async fn manifests_accepted(ctx: &Ctx<'_>) {
    let fs = Site::new("real-manifests", "kvstrap-real-fs", ReclaimPolicy::Delete);
    let block_class = class(
        "kvstrap-real-block",
        VolumeMode::Block,
        ReclaimPolicy::Retain,
    );
    let mut volumes = fs.volumes(2);
    volumes.push(fixtures::block_volume(fs.dir.path(), 1, &block_class.name));
    let desired = Desired::build(&fs.name, &volumes, &[fs.class.clone(), block_class]).unwrap();
    kvstrap::kube::write_manifests(&fs.state(), &desired).unwrap();

    let dry = PatchParams::apply("kvstrap").force().dry_run();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fs.state().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 5, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("storageclass-") {
            let sc: StorageClass = serde_saphyr::from_str(&text).unwrap();
            let n = sc.metadata.name.clone().unwrap();
            Api::<StorageClass>::all(ctx.client.clone())
                .patch(&n, &dry, &Patch::Apply(&sc))
                .await
                .unwrap_or_else(|e| panic!("{name} refused by the dry run: {e}"));
        } else {
            let pv: PersistentVolume = serde_saphyr::from_str(&text).unwrap();
            let n = pv.metadata.name.clone().unwrap();
            Api::<PersistentVolume>::all(ctx.client.clone())
                .patch(&n, &dry, &Patch::Apply(&pv))
                .await
                .unwrap_or_else(|e| panic!("{name} refused by the dry run: {e}"));
        }
    }
    assert!(
        get_pv(ctx, desired.volumes[0].pv_name()).await.is_none(),
        "dry run only"
    );

    let mut r = fs.reconciler(Arc::new(Counting::default()));
    let first = pass(&mut r, ctx, &desired).await;
    assert_eq!(first.applied, 5);
    // The server answers the apply of a new PV with phase Pending; the controller manager
    // then makes it Available and adds the pv-protection finalizer, in writes of its own.
    // The API double does the same (tests/support/apiserver.rs): this pins it.
    let phases: Vec<Option<&str>> = first.volumes.values().map(|v| v.phase.as_deref()).collect();
    assert_eq!(
        phases,
        vec![Some("Pending"); 3],
        "phases in the apply answers"
    );
    let mut versions = BTreeMap::new();
    for v in &desired.volumes {
        let pv = wait_phase(ctx, v.pv_name(), "Available").await;
        let finalizers = pv.metadata.finalizers.clone().unwrap_or_default();
        assert_eq!(finalizers, vec!["kubernetes.io/pv-protection".to_string()]);
        let managers: Vec<(String, String)> = pv
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.manager.clone().unwrap_or_default(),
                    m.operation.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert!(
            managers.contains(&("kvstrap".into(), "Apply".into())),
            "{managers:?}"
        );
        versions.insert(v.pv_name().to_string(), pv.metadata.resource_version);
    }
    let second = pass(&mut r, ctx, &desired).await;
    assert_eq!(second.applied, 0);
    for v in &desired.volumes {
        let pv = get_pv(ctx, v.pv_name()).await.unwrap();
        assert_eq!(versions[v.pv_name()], pv.metadata.resource_version);
    }
}

/// Nothing changed: neither a new process's first pass (CLI `apply`, daemon restart) nor
/// the daemon's own passes send a write.
async fn no_op_pass(ctx: &Ctx<'_>) {
    let n = Site::new("real-noop", "kvstrap-real-noop", ReclaimPolicy::Delete);
    let desired = n.desired(&n.volumes(50));
    let mut r = n.reconciler(Arc::new(Counting::default()));
    pass(&mut r, ctx, &desired).await;
    for v in &desired.volumes {
        wait_phase(ctx, v.pv_name(), "Available").await;
    }
    let before = kvstrap_writes(ctx.cp);
    let mut fresh = n.reconciler(Arc::new(Counting::default()));
    let report = pass(&mut fresh, ctx, &desired).await;
    assert_eq!(
        report.applied, 0,
        "a fresh process re-applied unchanged objects"
    );
    let p = n.publisher(ctx, Arc::new(Counting::default()));
    p.submit(desired.clone());
    assert!(p.wait_for(WAIT, |s| s.converged() && s.passes >= 2).await);
    p.shutdown().await;
    assert_eq!(
        kvstrap_writes(ctx.cp) - before,
        0,
        "a pass with nothing to change wrote to the API server"
    );
}

/// PVC bound, data written, PVC deleted: the controller manager leaves the Released PV to
/// kvstrap (never Failed), which scrubs the volume once and publishes it Available again.
async fn reclaim_delete(ctx: &Ctx<'_>) {
    let n = Site::new("real-reclaim", "kvstrap-real-delete", ReclaimPolicy::Delete);
    let volumes = n.volumes(2);
    let desired = n.desired(&volumes);
    let scrubber = Arc::new(Counting::default());
    let p = n.publisher(ctx, scrubber.clone());
    let (pv, claim_name) = publish_and_claim(ctx, &n, &p, &desired).await;
    let data = volumes[0].path.join("vm-disk.img");
    std::fs::write(&data, b"tenant data").unwrap();
    let old_uid = get_pv(ctx, &pv).await.unwrap().metadata.uid;

    let start = Instant::now();
    delete_claim(ctx, &claim_name).await;
    let mut phases = vec![];
    let mut failures = 0;
    loop {
        let now = get_pv(ctx, &pv).await;
        let ph = now.as_ref().and_then(phase);
        if phases.last() != Some(&ph) {
            phases.push(ph.clone());
        }
        failures = failures.max(p.status().consecutive_failures);
        let back = now.as_ref().is_some_and(|pv| {
            pv.metadata.uid != old_uid
                && ph.as_deref() == Some("Available")
                && pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_none())
        });
        if back && !data.exists() {
            break;
        }
        assert!(
            start.elapsed() < RECLAIM_BOUND,
            "not reclaimed within {RECLAIM_BOUND:?}: phases {phases:?}, data exists: {}, status {:?}",
            data.exists(),
            p.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "reclaim took {:.1} s, phases {phases:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(
        !phases.iter().any(|p| p.as_deref() == Some("Failed")),
        "kube-controller-manager marked the PV Failed: {phases:?}"
    );
    assert!(
        volumes[0].path.is_dir(),
        "the volume directory itself stays"
    );
    assert!(p.wait_for(WAIT, |s| s.converged()).await);
    assert_eq!(scrubber.count(&volumes[0].name), 1, "scrubbed exactly once");
    // The operator sees it on the Node (kubectl describe node), once.
    let scrubbed = events(ctx, &n.name, "VolumeScrubbed").await;
    assert_eq!(scrubbed.len(), 1, "one VolumeScrubbed Event: {scrubbed:?}");
    let note = scrubbed[0].message.as_deref().unwrap_or_default();
    assert!(
        note.contains(&volumes[0].name) && note.contains(&pv),
        "{note}"
    );
    assert_eq!(
        scrubbed[0].involved_object.kind.as_deref(),
        Some("Node"),
        "{scrubbed:?}"
    );
    assert_eq!(
        failures,
        0,
        "the pv-protection delay is no failure: {:?}",
        p.status()
    );
    p.shutdown().await;
}

/// A PV published without the provisioned-by annotation (an earlier kvstrap) is marked
/// Failed by the controller manager when its claim goes; kvstrap now takes it back.
async fn failed_recovered(ctx: &Ctx<'_>) {
    let n = Site::new("real-failed", "kvstrap-real-failed", ReclaimPolicy::Delete);
    let volumes = n.volumes(1);
    let desired = n.desired(&volumes);
    let pv = desired.volumes[0].pv_name().to_string();
    // What an earlier version applied: the same PV without the annotation.
    let mut old = desired.volumes[0].pv.clone();
    old.metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove("pv.kubernetes.io/provisioned-by");
    let sc = &desired.storage_classes[0];
    let pp = PatchParams::apply("kvstrap").force();
    Api::<StorageClass>::all(ctx.client.clone())
        .patch(&n.class.name, &pp, &Patch::Apply(sc))
        .await
        .unwrap();
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(&pv, &pp, &Patch::Apply(&old))
        .await
        .unwrap();
    wait_phase(ctx, &pv, "Available").await;
    let claim_name = claim(ctx, &pv, &n.class.name).await;
    std::fs::write(volumes[0].path.join("data"), b"old tenant").unwrap();
    delete_claim(ctx, &claim_name).await;
    let failed = wait_phase(ctx, &pv, "Failed").await;
    eprintln!(
        "controller manager says: {:?}",
        failed.status.and_then(|s| s.message)
    );

    let scrubber = Arc::new(Counting::default());
    let mut r = n.reconciler(scrubber.clone());
    let report = pass(&mut r, ctx, &desired).await;
    assert_eq!(report.scrubbed, vec![volumes[0].name.clone()]);
    let now = get_pv(ctx, &pv).await.unwrap();
    assert!(now.spec.as_ref().unwrap().claim_ref.is_none());
    wait_phase(ctx, &pv, "Available").await;
    assert!(!volumes[0].path.join("data").exists(), "old data scrubbed");
    assert_eq!(
        now.metadata.annotations.unwrap()["pv.kubernetes.io/provisioned-by"],
        kvstrap::kube::builders::PROVISIONER
    );
}

/// Retain: Released PV and its data stay; one Warning Event, accepted by the server and
/// not posted again; deleting the PV by hand has the volume scrubbed and re-published.
async fn retain_keeps_data(ctx: &Ctx<'_>) {
    let n = Site::new("real-retain", "kvstrap-real-retain", ReclaimPolicy::Retain);
    let volumes = n.volumes(1);
    let desired = n.desired(&volumes);
    let pv = desired.volumes[0].pv_name().to_string();
    let scrubber = Arc::new(Counting::default());
    let mut r = n.reconciler(scrubber.clone());
    pass(&mut r, ctx, &desired).await;
    wait_phase(ctx, &pv, "Available").await;
    let claim_name = claim(ctx, &pv, &n.class.name).await;
    let data = volumes[0].path.join("keep-me");
    std::fs::write(&data, b"retained").unwrap();
    delete_claim(ctx, &claim_name).await;
    wait_phase(ctx, &pv, "Released").await;

    let report = pass(&mut r, ctx, &desired).await;
    assert_eq!(report.retained, vec![pv.clone()]);
    let posted = events(ctx, &pv, "ReleasedRetained").await;
    assert_eq!(posted.len(), 1, "the Event is in the events list");
    let ev = &posted[0];
    assert_eq!(ev.reporting_component.as_deref(), Some("kvstrap"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    // Neither the next pass nor a restarted kvstrap posts it again.
    let before = ctx
        .cp
        .request_total(&[("resource", "events"), ("verb", "POST"), ("code", "201")]);
    pass(&mut r, ctx, &desired).await;
    pass(&mut n.reconciler(scrubber.clone()), ctx, &desired).await;
    let after = ctx
        .cp
        .request_total(&[("resource", "events"), ("verb", "POST"), ("code", "201")]);
    assert_eq!(after - before, 0, "Event posted again");
    assert_eq!(events(ctx, &pv, "ReleasedRetained").await.len(), 1);
    assert_eq!(
        phase(&get_pv(ctx, &pv).await.unwrap()).as_deref(),
        Some("Released")
    );
    assert!(data.exists(), "Retain keeps the data");
    assert_eq!(scrubber.count(&volumes[0].name), 0);

    // The admin deletes the PV: then the volume is scrubbed and published again.
    Api::<PersistentVolume>::all(ctx.client.clone())
        .delete(&pv, &DeleteParams::default())
        .await
        .unwrap();
    let start = Instant::now();
    while get_pv(ctx, &pv).await.is_some() {
        assert!(start.elapsed() < WAIT, "PV deletion held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = pass(&mut r, ctx, &desired).await;
    assert_eq!(report.scrubbed, vec![volumes[0].name.clone()]);
    assert!(!data.exists());
    wait_phase(ctx, &pv, "Available").await;
}

/// A Bound PV survives its volume vanishing, the policy dropping its group, and a node
/// rename; the server accepts the VolumeMissing Event.
async fn bound_never_deleted(ctx: &Ctx<'_>) {
    let n = Site::new("real-bound", "kvstrap-real-bound", ReclaimPolicy::Delete);
    let volumes = n.volumes(3);
    let desired = n.desired(&volumes);
    let mut r = n.reconciler(Arc::new(Counting::default()));
    pass(&mut r, ctx, &desired).await;
    let bound = desired.volumes[0].pv_name().to_string();
    let free = desired.volumes[1].pv_name().to_string();
    wait_phase(ctx, &bound, "Available").await;
    claim(ctx, &bound, &n.class.name).await;
    let uid = get_pv(ctx, &bound).await.unwrap().metadata.uid;

    // The disk vanished: only volume 3 remains.
    let report = pass(&mut r, ctx, &n.desired(&volumes[2..])).await;
    assert_eq!(report.kept, vec![bound.clone()]);
    assert!(report.deleted.contains(&free), "{report:?}");
    assert_eq!(
        events(ctx, &bound, "VolumeMissing").await.len(),
        1,
        "Event accepted"
    );
    assert!(get_pv(ctx, &free).await.is_none());
    // `kvstrap volumes` can list the kept PV from the ledger.
    let kept = kvstrap::kube::publisher::kept_publications(&n.state());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].pv_name, bound);
    assert_eq!(kept[0].phase.as_deref(), Some("Bound"));

    // The policy drops the group altogether.
    let empty = Desired::build(&n.name, &[], &[]).unwrap();
    let report = pass(&mut r, ctx, &empty).await;
    assert_eq!(report.kept, vec![bound.clone()]);
    // The node is renamed: the old name's PVs are not this node's business any more.
    let renamed = Site {
        name: "real-bound-renamed".into(),
        dir: tempfile::tempdir().unwrap(),
        class: n.class.clone(),
    };
    let mut r2 = renamed.reconciler(Arc::new(Counting::default()));
    pass(&mut r2, ctx, &renamed.desired(&volumes)).await;
    let pv = get_pv(ctx, &bound).await.expect("Bound PV still there");
    assert_eq!(pv.metadata.uid, uid);
    assert_eq!(phase(&pv).as_deref(), Some("Bound"));
    assert_eq!(
        events(ctx, &bound, "VolumeMissing").await.len(),
        1,
        "posted once"
    );
}

/// Volumes 1 and 2 on one disk, 3 on another; the first disk is drained while a claim is
/// bound to volume 1's PV. Volume 2's PV goes at once; the Bound one stays (same uid) and
/// is what holds the disk, with its claim and the pod using it; released, it goes too, and
/// the pass says nothing holds the disk any more. The other disk's PV is never touched.
async fn drain_keeps_bound(ctx: &Ctx<'_>) {
    let n = Site::new("real-drain", "kvstrap-real-drain", ReclaimPolicy::Delete);
    let mut volumes = n.volumes(3);
    for v in &mut volumes[..2] {
        v.disk_identity = "serial:DRAINME".into();
    }
    volumes[2].disk_identity = "serial:STAYS".into();
    let desired = n.desired(&volumes);
    let mut r = n.reconciler(Arc::new(Counting::default()));
    pass(&mut r, ctx, &desired).await;
    let (bound, free, other) = (
        desired.volumes[0].pv_name().to_string(),
        desired.volumes[1].pv_name().to_string(),
        desired.volumes[2].pv_name().to_string(),
    );
    wait_phase(ctx, &bound, "Available").await;
    let claim_name = claim(ctx, &bound, &n.class.name).await;
    let uid = get_pv(ctx, &bound).await.unwrap().metadata.uid;
    let other_rv = get_pv(ctx, &other).await.unwrap().metadata.resource_version;
    let pod = pods::pod_using(&ctx.client, &claim_name).await;

    let mut draining = n.desired(&volumes[2..]);
    draining.draining.insert("serial:DRAINME".into());
    let report = pass(&mut r, ctx, &draining).await;
    assert_eq!(report.deleted, vec![free.clone()], "{report:?}");
    assert_eq!(report.kept, vec![bound.clone()]);
    let holding = &report.draining["serial:DRAINME"];
    assert_eq!(holding.len(), 1, "{holding:?}");
    assert_eq!(holding[0].pv, bound);
    assert_eq!(holding[0].phase.as_deref(), Some("Bound"));
    assert_eq!(
        holding[0].claim.as_deref(),
        Some(format!("default/{claim_name}").as_str())
    );
    assert_eq!(events(ctx, &bound, "VolumeDraining").await.len(), 1);
    assert_eq!(events(ctx, &bound, "VolumeMissing").await.len(), 0);
    // What `kvstrap drain --status` shows: the claim and the pod using it.
    let ids = std::collections::BTreeSet::from(["serial:DRAINME".to_string()]);
    let holders = kvstrap::kube::claims::holders(&ctx.client, &n.name, &ids)
        .await
        .unwrap();
    let h = &holders["serial:DRAINME"];
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].pods, vec![format!("default/{pod}")], "{h:?}");
    // Passes while it stays bound change nothing.
    for _ in 0..2 {
        let report = pass(&mut r, ctx, &draining).await;
        assert!(report.deleted.is_empty(), "{report:?}");
        let pv = get_pv(ctx, &bound).await.expect("the Bound PV was deleted");
        assert_eq!(pv.metadata.uid, uid);
        assert_eq!(phase(&pv).as_deref(), Some("Bound"));
        assert!(pv.metadata.deletion_timestamp.is_none());
    }

    // Released (reclaim Delete): a draining disk's volume is not recycled; the PV goes.
    Api::<Pod>::namespaced(ctx.client.clone(), "default")
        .delete(&pod, &DeleteParams::default())
        .await
        .unwrap();
    delete_claim(ctx, &claim_name).await;
    wait_phase(ctx, &bound, "Released").await;
    let report = pass(&mut r, ctx, &draining).await;
    assert_eq!(report.deleted, vec![bound.clone()], "{report:?}");
    assert!(report.scrubbed.is_empty(), "a draining disk is left intact");
    assert_eq!(report.draining["serial:DRAINME"], vec![]);
    let start = Instant::now();
    while get_pv(ctx, &bound).await.is_some() {
        assert!(start.elapsed() < WAIT, "PV deletion held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get_pv(ctx, &other).await.unwrap().metadata.resource_version,
        other_rv,
        "the other disk's PV was written"
    );
}

/// `kvstrap forget` of a disk that died without a drain: its Available and Released
/// (Retain) PVs are deleted, its Bound PV is kept (same uid) and listed.
async fn forget_gone_disk(ctx: &Ctx<'_>) {
    let n = Site::new("real-forget", "kvstrap-real-forget", ReclaimPolicy::Retain);
    let mut volumes = n.volumes(3);
    for v in &mut volumes {
        v.disk_identity = "serial:DEAD".into();
    }
    let desired = n.desired(&volumes);
    let mut r = n.reconciler(Arc::new(Counting::default()));
    pass(&mut r, ctx, &desired).await;
    let names: Vec<String> = desired
        .volumes
        .iter()
        .map(|v| v.pv_name().to_string())
        .collect();
    wait_phase(ctx, &names[0], "Available").await;
    wait_phase(ctx, &names[1], "Available").await;
    claim(ctx, &names[0], &n.class.name).await;
    let released = claim(ctx, &names[1], &n.class.name).await;
    delete_claim(ctx, &released).await;
    wait_phase(ctx, &names[1], "Released").await;
    let uid = get_pv(ctx, &names[0]).await.unwrap().metadata.uid;

    // The disk died: its volumes are gone. The pass keeps Bound and Released (Retain).
    let report = pass(&mut r, ctx, &n.desired(&[])).await;
    assert_eq!(report.deleted, vec![names[2].clone()], "{report:?}");
    let forgotten = kvstrap::kube::claims::forget_disk(&ctx.client, &n.name, "serial:DEAD")
        .await
        .unwrap();
    assert_eq!(forgotten.deleted, vec![names[1].clone()], "{forgotten:?}");
    assert_eq!(forgotten.bound.len(), 1, "{forgotten:?}");
    assert_eq!(forgotten.bound[0].pv, names[0]);
    assert!(forgotten.errors.is_empty(), "{forgotten:?}");
    let pv = get_pv(ctx, &names[0])
        .await
        .expect("the Bound PV was deleted");
    assert_eq!(pv.metadata.uid, uid);
    assert_eq!(phase(&pv).as_deref(), Some("Bound"));
}

/// The Node object is deleted and re-created under the same name (a reinstall): PVs of
/// volumes still there stay as they are (no write); a Bound one stays Bound; PVs of
/// volumes that did not come back go if Available.
async fn node_recreated(ctx: &Ctx<'_>) {
    let n = Site::new("real-zombie", "kvstrap-real-zombie", ReclaimPolicy::Delete);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_object = Node {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".into(),
                n.name.clone(),
            )])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    nodes
        .create(&PostParams::default(), &node_object)
        .await
        .unwrap();
    let volumes = n.volumes(3);
    let desired = n.desired(&volumes);
    let mut r = n.reconciler(Arc::new(Counting::default()));
    pass(&mut r, ctx, &desired).await;
    let bound = desired.volumes[0].pv_name().to_string();
    wait_phase(ctx, &bound, "Available").await;
    claim(ctx, &bound, &n.class.name).await;
    let uids: BTreeMap<String, Option<String>> =
        futures::future::join_all(desired.volumes.iter().map(|v| get_pv(ctx, v.pv_name())))
            .await
            .into_iter()
            .map(|pv| {
                let pv = pv.unwrap();
                (pv.metadata.name.unwrap(), pv.metadata.uid)
            })
            .collect();

    nodes
        .delete(&n.name, &DeleteParams::default())
        .await
        .unwrap();
    nodes
        .create(&PostParams::default(), &node_object)
        .await
        .unwrap();
    // kvstrap on the re-created node (a fresh process, same state directory).
    let before = kvstrap_writes(ctx.cp);
    let mut again = n.reconciler(Arc::new(Counting::default()));
    pass(&mut again, ctx, &desired).await;
    assert_eq!(kvstrap_writes(ctx.cp) - before, 0, "nothing to change");
    for (name, uid) in &uids {
        assert_eq!(
            &get_pv(ctx, name).await.unwrap().metadata.uid,
            uid,
            "{name} replaced"
        );
    }
    assert_eq!(
        phase(&get_pv(ctx, &bound).await.unwrap()).as_deref(),
        Some("Bound")
    );

    // Reinstalled with its disks wiped: no volume came back. Available PVs go, the Bound
    // one stays (its claim still points at it) and is reported.
    let mut wiped = Site::new(&n.name, &n.class.name, ReclaimPolicy::Delete)
        .reconciler(Arc::new(Counting::default()));
    let report = pass(&mut wiped, ctx, &n.desired(&[])).await;
    assert_eq!(report.kept, vec![bound.clone()]);
    assert_eq!(report.deleted.len(), 2, "{report:?}");
    assert_eq!(
        phase(&get_pv(ctx, &bound).await.unwrap()).as_deref(),
        Some("Bound")
    );
}

/// The apiserver goes away under a running publisher and comes back: what was submitted
/// meanwhile is published, nothing already there is re-created or re-applied, and while
/// the server was down the publisher backed off.
async fn apiserver_restart(ctx: &Ctx<'_>) {
    let n = Site::new(
        "real-restart",
        "kvstrap-real-restart",
        ReclaimPolicy::Delete,
    );
    let volumes = n.volumes(4);
    let scrubber = Arc::new(Counting::default());
    let p = n.publisher(ctx, scrubber.clone());
    p.submit(n.desired(&volumes[..3]));
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "{:?}",
        p.status()
    );
    let mut uids = BTreeMap::new();
    for v in &n.desired(&volumes[..3]).volumes {
        let pv = wait_phase(ctx, v.pv_name(), "Available").await;
        uids.insert(v.pv_name().to_string(), pv.metadata.uid);
    }

    tokio::task::block_in_place(|| ctx.cp.stop_apiserver());
    let all = n.desired(&volumes);
    p.submit(all.clone());
    let down = Duration::from_secs(4);
    tokio::time::sleep(down).await;
    let status = p.status();
    assert!(status.consecutive_failures >= 2, "{status:?}");
    assert_eq!(status.pending, 5, "4 PVs and the class pending: {status:?}");
    // 100 ms doubling to a 2 s cap (with jitter): about 5 attempts in 4 s.
    assert!(
        status.consecutive_failures <= 8,
        "backoff not held: {} attempts in {down:?}",
        status.consecutive_failures
    );

    tokio::task::block_in_place(|| ctx.cp.start_apiserver_again());
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "{:?}",
        p.status()
    );
    for (name, uid) in &uids {
        let pv = get_pv(ctx, name).await.expect("PV still there");
        assert_eq!(&pv.metadata.uid, uid, "{name} was re-created");
    }
    wait_phase(ctx, all.volumes[3].pv_name(), "Available").await;
    let applies = ctx
        .cp
        .request_total(&[("resource", "persistentvolumes"), ("verb", "APPLY")]);
    assert_eq!(applies, 1, "only the new PV is applied after the restart");
    assert!(scrubber.0.lock().unwrap().is_empty(), "nothing scrubbed");
    p.shutdown().await;
}

/// This node's PVs in the cluster (through the harness's own client, not the proxy).
async fn node_pvs(ctx: &Ctx<'_>, node: &str) -> BTreeMap<String, PersistentVolume> {
    let lp = ListParams::default().labels(&format!("kvstrap.io/node={node}"));
    Api::<PersistentVolume>::all(ctx.client.clone())
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|pv| (pv.metadata.name.clone().unwrap(), pv))
        .collect()
}

/// kvstrap reaches the real apiserver only through a proxy that cuts connections midway
/// (requests and answers), refuses connects, stalls, and resets the watch, while a disk
/// with a Bound PV vanishes and the policy changes. Meanwhile the Bound PV is never
/// deleted; once the faults stop the cluster holds exactly the wanted PVs (none lost, none
/// twice, unchanged ones untouched), the VolumeMissing Event exists once, and a clean
/// pass by a fresh process writes nothing.
async fn network_faults(ctx: &Ctx<'_>) {
    let n = Site::new("real-faults", "kvstrap-real-faults", ReclaimPolicy::Delete);
    let volumes = n.volumes(6);
    let proxy = FaultProxy::start(ctx.cp.secure_port).await;
    let kubeconfig = ctx.cp.kubeconfig_at(proxy.port);
    let scrubber = Arc::new(Counting::default());
    let p = n.publisher_via(&kubeconfig, scrubber.clone());
    let (bound, _) = publish_and_claim(ctx, &n, &p, &n.desired(&volumes[..4])).await;
    let seen = node_pvs(ctx, &n.name).await;
    let bound_uid = seen[&bound].metadata.uid.clone();

    // The disk of volumes 1 and 2 vanished, and the policy now wants volumes 5 and 6 too.
    let after = n.desired(&volumes[2..]);
    let faults = [
        Fault::Cut {
            min: 200,
            max: 3000,
        },
        Fault::Refuse,
        Fault::Stall,
        Fault::Cut { min: 50, max: 1500 },
        Fault::Refuse,
        Fault::Cut {
            min: 500,
            max: 6000,
        },
    ];
    let mut failing_passes = 0;
    let began = Instant::now();
    // The watch and the pooled connection die mid-stream, then the faults go on.
    proxy.reset_all();
    p.submit(after.clone());
    for fault in faults {
        proxy.set(fault);
        // 0.7 s, and longer (up to 2.5 s, past the 2 s backoff cap) until kvstrap opened
        // a connection under this fault.
        let (round, accepted) = (Instant::now(), proxy.counts().accepted);
        let met = |proxy: &FaultProxy| proxy.counts().accepted > accepted;
        while round.elapsed() < Duration::from_millis(700)
            || (!met(&proxy) && round.elapsed() < Duration::from_millis(2500))
        {
            failing_passes = failing_passes.max(p.status().consecutive_failures);
            let pv = get_pv(ctx, &bound).await.expect("the Bound PV was deleted");
            assert_eq!(pv.metadata.uid, bound_uid, "the Bound PV was replaced");
            assert!(
                pv.metadata.deletion_timestamp.is_none(),
                "the Bound PV is being deleted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Whatever is open (the watch, pooled connections) dies too.
        proxy.reset_all();
    }
    proxy.set(Fault::None);
    let counts = proxy.counts();
    let faulted = Instant::now();
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "no convergence after the faults stopped: {:?}",
        p.status()
    );
    eprintln!(
        "faults for {:.1} s: {counts:?}, up to {} failed passes in a row; converged {:.1} s after they stopped",
        faulted.duration_since(began).as_secs_f64(),
        failing_passes,
        faulted.elapsed().as_secs_f64()
    );
    assert!(
        counts.cut > 0 && counts.refused > 0 && counts.reset > 0,
        "faults did not hit: {counts:?}"
    );
    p.shutdown().await;

    settled_after_faults(ctx, &n, &after, &bound, &seen).await;
    for v in &volumes[2..4] {
        assert_eq!(scrubber.count(&v.name), 0, "{} scrubbed", v.name);
    }
}

/// After faults: the cluster holds exactly `after`'s PVs and the kept Bound one (same uid,
/// still Bound); the PVs `after` did not change kept the resourceVersion they had in
/// `seen`; one VolumeMissing Event; and a clean pass by a fresh process, straight to the
/// server, writes nothing.
async fn settled_after_faults(
    ctx: &Ctx<'_>,
    n: &Site,
    after: &Desired,
    bound: &str,
    seen: &BTreeMap<String, PersistentVolume>,
) {
    let now = node_pvs(ctx, &n.name).await;
    let mut expected: Vec<&str> = after.volumes.iter().map(|v| v.pv_name()).collect();
    expected.push(bound);
    expected.sort();
    assert_eq!(
        now.keys().map(String::as_str).collect::<Vec<_>>(),
        expected,
        "PVs lost or left over"
    );
    assert_eq!(
        now[bound].metadata.uid, seen[bound].metadata.uid,
        "the Bound PV was replaced"
    );
    assert_eq!(phase(&now[bound]).as_deref(), Some("Bound"));
    for (name, pv) in seen
        .iter()
        .filter(|(name, _)| *name != bound && now.contains_key(*name))
    {
        assert_eq!(
            now[name].metadata.resource_version, pv.metadata.resource_version,
            "{name} was written although nothing changed for it"
        );
    }
    assert_eq!(
        events(ctx, bound, "VolumeMissing").await.len(),
        1,
        "one Event"
    );
    // A fresh process learns that the Event exists from the 409 its one POST gets: that
    // refused POST is the only write it sends.
    let refused_events = || {
        ctx.cp
            .request_total(&[("resource", "events"), ("verb", "POST"), ("code", "409")])
    };
    let (before, refused_before) = (kvstrap_writes(ctx.cp), refused_events());
    let report = pass(&mut n.reconciler(Arc::new(Counting::default())), ctx, after).await;
    assert_eq!(report.applied, 0, "{report:?}");
    assert_eq!(report.kept, vec![bound.to_string()]);
    assert_eq!(
        refused_events() - refused_before,
        1,
        "the Event is not posted twice"
    );
    assert_eq!(
        kvstrap_writes(ctx.cp) - before,
        1,
        "a clean pass after the faults wrote"
    );
}

/// Waits until every error asked of `proxy` has been answered (the watch's are answered
/// on its own schedule, after the publisher may have converged).
async fn all_fired(proxy: &HttpFaults) {
    let start = Instant::now();
    while !proxy.unused().is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "errors never fired: {:?}",
            proxy.unused()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real apiserver behind a proxy that answers chosen requests with 500, 409 or 429,
/// before the server saw them or after it acted on them, during a first publication and
/// then while a disk with a Bound PV vanishes and the policy changes. Every error fires;
/// the Bound PV is never deleted; once the errors are spent the cluster settles as after
/// the network faults.
async fn http_errors(ctx: &Ctx<'_>) {
    let n = Site::new("real-http", "kvstrap-real-http", ReclaimPolicy::Delete);
    let volumes = n.volumes(5);
    let proxy = HttpFaults::start(ctx.cp.dir.path(), ctx.client.clone()).await;
    let kubeconfig = ctx.cp.kubeconfig_at(proxy.port);
    const PVS: &str = "/api/v1/persistentvolumes";
    // The first publication: the watch fails twice, a list is throttled, the class apply
    // conflicts, and two PV applies succeed on the server but answer 500.
    proxy.fail("GET", "watch=true", 500, Stage::Before, 2);
    proxy.fail("GET", &format!("{PVS}?"), 429, Stage::Before, 1);
    proxy.fail("PATCH", "/storageclasses/", 409, Stage::Before, 1);
    proxy.fail("PATCH", &format!("{PVS}/"), 500, Stage::After, 2);
    let scrubber = Arc::new(Counting::default());
    let p = n.publisher_via(&kubeconfig, scrubber.clone());
    let first = n.desired(&volumes[..3]);
    let (bound, _) = publish_and_claim(ctx, &n, &p, &first).await;
    all_fired(&proxy).await;
    let free = first.volumes[1].pv_name().to_string();
    let seen = node_pvs(ctx, &n.name).await;

    // The disk of volumes 1 and 2 vanished; the policy adds volumes 4 and 5. The delete
    // of the free PV conflicts, then is done but answers 500; the Event is stored but
    // answers 500; a new PV's apply answers 500 after it was stored.
    let free_path = format!("{PVS}/{free}");
    proxy.fail("DELETE", &free_path, 409, Stage::Before, 1);
    proxy.fail("DELETE", &free_path, 500, Stage::After, 1);
    proxy.fail("POST", "/events", 500, Stage::After, 1);
    proxy.fail("PATCH", &format!("{PVS}/"), 500, Stage::After, 1);
    let after = n.desired(&volumes[2..]);
    p.submit(after.clone());
    assert!(
        p.wait_for(WAIT, |s| s.converged()).await,
        "{:?}\n{:?}",
        p.status(),
        proxy.injected()
    );
    all_fired(&proxy).await;
    p.shutdown().await;
    eprintln!(
        "{} errors injected: {:?}",
        proxy.injected().len(),
        proxy.injected()
    );

    settled_after_faults(ctx, &n, &after, &bound, &seen).await;
    assert_eq!(scrubber.count(&volumes[2].name), 0);
}
