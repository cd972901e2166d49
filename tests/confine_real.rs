//! Each node's credential confined to its own objects by the API server
//! (`packaging/kubernetes/admission-policy.yaml` beside `rbac.yaml`), against a real
//! control plane (`tests/support/control_plane.rs`, one for the whole file) that
//! authenticates two node identities by token: `kvstrap:node:a` and `kvstrap:node:b`, both
//! in the group `kvstrap:nodes`, as per-node certificates would. Node A publishes, reports
//! and posts Events with kvstrap's own code and is refused, with the policy's message, on
//! everything of node B: its PVs (create, apply, relabel, delete), a PV labelled for A but
//! affined to B, its Node and `nodes/status`, Events about it. No disks, no root.
//!
//! Without the binaries the test is skipped with a message; with `CI` set it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/fixtures.rs"]
mod fixtures;

use control_plane::ControlPlane;
use futures::FutureExt;
use k8s_openapi::api::core::v1::{
    Event, Node, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolume,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Client;
use kvstrap::kube::builders::{self, EventText};
use kvstrap::kube::node_state::{self, NodeEvent, NodeReport, NodeState};
use kvstrap::kube::reconcile::Reconciler;
use kvstrap::kube::{ClientSource, Desired, DirectoryAndBlockScrubber};
use kvstrap::model::{VolumeMode, VolumeSpec};
use kvstrap::policy::types::ReclaimPolicy;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE_A: &str = "a";
const NODE_B: &str = "b";
const GROUP: &str = "kvstrap:nodes";
const CLASS: &str = "confine-local";
const WAIT: Duration = Duration::from_secs(30);

struct Ctx<'a> {
    cp: &'a ControlPlane,
    admin: Client,
    /// Node A's credential, and node B's.
    a: Client,
    b: Client,
    dir: tempfile::TempDir,
}

#[test]
fn confine_real_control_plane() {
    let users = [("kvstrap:node:a", GROUP), ("kvstrap:node:b", GROUP)];
    let Some(cp) = control_plane::start_or_skip_with_users("confine_real_control_plane", &users)
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ctx = rt.block_on(setup(&cp));
    let cases: &[(&str, cases::Case<Ctx<'_>>)] = &[
        ("a_node_writes_its_own_objects", |c| own_objects(c).boxed()),
        ("node_a_is_refused_on_node_bs_persistentvolumes", |c| {
            others_pvs(c).boxed()
        }),
        ("node_a_is_refused_on_node_b_and_its_status", |c| {
            other_node(c).boxed()
        }),
        ("node_a_changes_only_kvstraps_keys_on_its_own_node", |c| {
            own_node_keys(c).boxed()
        }),
        ("node_a_posts_events_only_about_its_own_node_and_pvs", |c| {
            events(c).boxed()
        }),
        ("node_a_writes_only_kvstraps_storage_classes", |c| {
            storage_classes(c).boxed()
        }),
        ("a_group_member_without_a_node_name_is_refused", |c| {
            nameless(c).boxed()
        }),
    ];
    let failures = cases::run_all(&rt, &ctx, cases);
    drop(ctx);
    rt.shutdown_timeout(Duration::from_secs(5));
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\n\ncontrol plane logs:\n{}",
        failures.len(),
        failures.join("\n"),
        cp.logs()
    );
}

// ---- setup and helpers ------------------------------------------------------------------

/// The shipped RBAC and admission policy applied, Nodes a and b created (as kubelets
/// would register them), and the policy in force (it is loaded asynchronously).
async fn setup(cp: &ControlPlane) -> Ctx<'_> {
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes");
    for file in ["rbac.yaml", "admission-policy.yaml"] {
        kubectl(
            cp,
            &["apply", "-f", &packaging.join(file).display().to_string()],
        );
    }
    let admin = cp.client().await;
    for node in [NODE_A, NODE_B] {
        let n = Node {
            metadata: ObjectMeta {
                name: Some(node.into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/hostname".into(),
                    node.into(),
                )])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        Api::<Node>::all(admin.clone())
            .create(&PostParams::default(), &n)
            .await
            .unwrap();
    }
    let source = |user: &str| ClientSource::Kubeconfig(cp.kubeconfig_as(user));
    let ctx = Ctx {
        cp,
        a: source("kvstrap:node:a").client().await.unwrap(),
        b: source("kvstrap:node:b").client().await.unwrap(),
        admin,
        dir: tempfile::tempdir().unwrap(),
    };
    let started = Instant::now();
    wait_in_force(&ctx).await;
    eprintln!(
        "admission policy in force {:.2} s after it was applied",
        started.elapsed().as_secs_f64()
    );
    ctx
}

/// Polls dry-run requests of node A against node B's objects (through admission, stored
/// nowhere) until each of the four policies refuses.
async fn wait_in_force(ctx: &Ctx<'_>) {
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let post = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let start = Instant::now();
    loop {
        let pv = Api::<PersistentVolume>::all(ctx.a.clone())
            .create(&post, &pv_of(NODE_B, 99))
            .await;
        let node = Api::<Node>::all(ctx.a.clone())
            .patch(
                NODE_B,
                &dry,
                &Patch::Merge(label_patch("kvstrap.io/x", "1")),
            )
            .await;
        let event = Api::<Event>::namespaced(ctx.a.clone(), "default")
            .create(&post, &event_about(NODE_A, node_ref(NODE_B)))
            .await;
        let sc = Api::<StorageClass>::all(ctx.a.clone())
            .create(&post, &foreign_class("confine-probe"))
            .await;
        let by_policy = |r: Result<(), kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.message.contains("ValidatingAdmissionPolicy"));
        if by_policy(pv.map(drop))
            && by_policy(node.map(drop))
            && by_policy(event.map(drop))
            && by_policy(sc.map(drop))
        {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the admission policy is not in force after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubectl` as admin against the test control plane; stdout, trimmed.
fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
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

/// Asserts that `result` is the API server's 403 from the admission policy `policy`
/// (`kvstrap-node-<policy>`), with a message containing `why`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, policy: &str, why: &str) {
    let status = match result {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected a refusal by kvstrap-node-{policy} ({why}), got {other:?}"),
    };
    assert_eq!(status.code, 403, "{status:?}");
    let by = format!("ValidatingAdmissionPolicy 'kvstrap-node-{policy}'");
    assert!(status.message.contains(&by), "{}", status.message);
    assert!(
        status.message.contains(why),
        "{why:?} not in {}",
        status.message
    );
}

fn class() -> kvstrap::policy::types::StorageClass {
    fixtures::class(CLASS, VolumeMode::Filesystem, ReclaimPolicy::Delete)
}

fn volume(i: usize) -> VolumeSpec {
    fixtures::dir_volume(Path::new("/var/lib/kvstrap/storage"), i, CLASS)
}

/// The PV kvstrap publishes for volume `i` of `node`.
fn pv_of(node: &str, i: usize) -> PersistentVolume {
    builders::persistent_volume(node, &volume(i), &class())
}

/// `pv` with its required node affinity replaced by one term per entry of `terms`, each
/// `kubernetes.io/hostname In [hosts...]`.
fn affined(mut pv: PersistentVolume, terms: &[&[&str]]) -> PersistentVolume {
    let spec = pv.spec.as_mut().unwrap();
    let required = spec
        .node_affinity
        .as_mut()
        .unwrap()
        .required
        .as_mut()
        .unwrap();
    required.node_selector_terms = terms
        .iter()
        .map(|hosts| NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "kubernetes.io/hostname".into(),
                operator: "In".into(),
                values: Some(hosts.iter().map(|h| h.to_string()).collect()),
            }]),
            match_fields: None,
        })
        .collect();
    pv
}

fn named(mut pv: PersistentVolume, name: &str) -> PersistentVolume {
    pv.metadata.name = Some(name.into());
    pv
}

fn label_patch(key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { key: value } } })
}

fn node_ref(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        uid: Some(node.into()),
        ..ObjectReference::default()
    }
}

fn pv_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    }
}

/// An Event as kvstrap on `reporter` builds it (`builders::event`), about `involved`.
fn event_about(reporter: &str, involved: ObjectReference) -> Event {
    let name = format!(
        "confine.{}",
        builders::short_hash(&format!("{reporter}{involved:?}{:?}", Instant::now()))
    );
    let text = EventText {
        involved,
        reason: "ConfineTest",
        action: "ConfineTest",
        warning: false,
        message: "test",
    };
    builders::event(name, reporter, text)
}

/// A class of another provisioner, as an admin would make it.
fn foreign_class(name: &str) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        provisioner: "ebs.csi.aws.com".into(),
        ..StorageClass::default()
    }
}

fn apply() -> PatchParams {
    PatchParams::apply(builders::MANAGER).force()
}

/// A reconcile pass of `node` with its own credential, publishing `volumes`.
async fn publish(
    ctx: &Ctx<'_>,
    client: &Client,
    node: &str,
    volumes: &[VolumeSpec],
) -> kvstrap::kube::PassReport {
    let desired = Desired::build(node, volumes, &[class()]).unwrap();
    let state = ctx.dir.path().join(node);
    std::fs::create_dir_all(&state).unwrap();
    let mut reconciler = Reconciler::new(node, state, Arc::new(DirectoryAndBlockScrubber), 4);
    reconciler.pass(client, &desired).await.unwrap()
}

fn report() -> NodeReport {
    NodeReport {
        disks_ready: 1,
        volumes_ready: 2,
        ready_disks: vec!["/dev/nvme0n1".into()],
        refused: vec![("/dev/sdb".into(), "not empty: xfs".into())],
        ..NodeReport::default()
    }
}

async fn node(ctx: &Ctx<'_>, name: &str) -> Node {
    Api::<Node>::all(ctx.admin.clone()).get(name).await.unwrap()
}

// ---- cases ------------------------------------------------------------------------------

/// Everything kvstrap does with a node's credential still works under the policy: the
/// reconcile pass (class and PVs by server-side apply, a vanished volume's PV deleted),
/// the Node's condition, label, annotation and Events, an Event about its own PV, and the
/// labels of its own PV put back after an admin removed them.
async fn own_objects(ctx: &Ctx<'_>) {
    let pass = publish(ctx, &ctx.a, NODE_A, &[volume(1), volume(2)]).await;
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(pass.applied, 3, "the class and two PVs: {pass:?}");

    NodeState::default()
        .publish(&ctx.a, NODE_A, &report())
        .await
        .unwrap();
    let a = node(ctx, NODE_A).await;
    let labels = a.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("kvstrap.io/storage-ready").unwrap(), "true");
    let conditions = a.status.unwrap().conditions.unwrap_or_default();
    assert!(conditions.iter().any(|c| c.type_ == "KvstrapStorageReady"));
    assert!(conditions.iter().any(|c| c.type_ == "KvstrapDisksHealthy"));

    let pvs = Api::<PersistentVolume>::all(ctx.a.clone());
    let own = builders::pv_name(NODE_A, &volume(1).name);
    Api::<Event>::namespaced(ctx.a.clone(), "default")
        .create(&PostParams::default(), &event_about(NODE_A, pv_ref(&own)))
        .await
        .unwrap();

    // An admin removed the node label from A's PV: A may put it back (the PV is still
    // affined to A alone).
    let remove = serde_json::json!({ "metadata": { "labels": { "kvstrap.io/node": null } } });
    Api::<PersistentVolume>::all(ctx.admin.clone())
        .patch(&own, &PatchParams::default(), &Patch::Merge(remove))
        .await
        .unwrap();
    let back = pvs
        .patch(&own, &apply(), &Patch::Apply(&pv_of(NODE_A, 1)))
        .await
        .unwrap();
    assert_eq!(
        back.metadata
            .labels
            .unwrap()
            .get("kvstrap.io/node")
            .unwrap(),
        NODE_A
    );

    // Volume 2 is gone: its (unbound) PV is deleted by the pass.
    let pass = publish(ctx, &ctx.a, NODE_A, &[volume(1)]).await;
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(pass.deleted, [builders::pv_name(NODE_A, &volume(2).name)]);
}

/// Node A may not create, apply, relabel or delete node B's PVs, nor write a PV that is
/// labelled for A but affined to B (or to A and B), labelled for B but affined to A, or not
/// labelled as kvstrap's. B's PV is untouched at the end.
async fn others_pvs(ctx: &Ctx<'_>) {
    let pass = publish(ctx, &ctx.b, NODE_B, &[volume(1)]).await;
    assert!(
        pass.errors.is_empty(),
        "node B publishes its own: {:?}",
        pass.errors
    );
    let theirs = builders::pv_name(NODE_B, &volume(1).name);
    let admin = Api::<PersistentVolume>::all(ctx.admin.clone());
    let before = admin.get(&theirs).await.unwrap();

    let pvs = Api::<PersistentVolume>::all(ctx.a.clone());
    let pp = PostParams::default();
    let not_labelled = "may write only PersistentVolumes labelled kvstrap.io/node=a";
    let not_affined = "required node affinity is kubernetes.io/hostname In [a] in every term";
    // B's PV, created new or applied over the one B published.
    refused(
        pvs.create(&pp, &pv_of(NODE_B, 2)).await,
        "persistentvolumes",
        not_labelled,
    );
    refused(
        pvs.patch(&theirs, &apply(), &Patch::Apply(&pv_of(NODE_B, 1)))
            .await,
        "persistentvolumes",
        not_labelled,
    );
    // Relabelled as A's: its affinity still names B, and it was B's.
    refused(
        pvs.patch(
            &theirs,
            &PatchParams::default(),
            &Patch::Merge(label_patch("kvstrap.io/node", NODE_A)),
        )
        .await,
        "persistentvolumes",
        "",
    );
    // Any other change to it (its node affinity cannot change at all: the API server
    // keeps it immutable).
    let retain = serde_json::json!({ "spec": { "persistentVolumeReclaimPolicy": "Retain" } });
    refused(
        pvs.patch(&theirs, &PatchParams::default(), &Patch::Merge(retain))
            .await,
        "persistentvolumes",
        not_labelled,
    );
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: before.metadata.uid.clone(),
            resource_version: before.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    refused(
        pvs.delete(&theirs, &delete).await,
        "persistentvolumes",
        "is not node a's",
    );
    refused(
        pvs.delete(&theirs, &DeleteParams::default()).await,
        "persistentvolumes",
        "is not node a's",
    );
    // Labelled for A, affined to B; to A or B; labelled for B, affined to A.
    refused(
        pvs.create(&pp, &affined(pv_of(NODE_A, 3), &[&[NODE_B]]))
            .await,
        "persistentvolumes",
        not_affined,
    );
    refused(
        pvs.create(&pp, &affined(pv_of(NODE_A, 4), &[&[NODE_A], &[NODE_B]]))
            .await,
        "persistentvolumes",
        not_affined,
    );
    refused(
        pvs.create(&pp, &affined(pv_of(NODE_A, 5), &[&[NODE_A, NODE_B]]))
            .await,
        "persistentvolumes",
        not_affined,
    );
    refused(
        pvs.create(
            &pp,
            &named(affined(pv_of(NODE_B, 6), &[&[NODE_A]]), "kvstrap-a-x6"),
        )
        .await,
        "persistentvolumes",
        not_labelled,
    );
    // Not kvstrap's: no managed-by label.
    let mut unmanaged = pv_of(NODE_A, 7);
    unmanaged
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(builders::LABEL_MANAGED_BY);
    refused(
        pvs.create(&pp, &unmanaged).await,
        "persistentvolumes",
        "app.kubernetes.io/managed-by=kvstrap",
    );

    let after = admin.get(&theirs).await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(after.metadata.deletion_timestamp.is_none());
    for i in 2..=7 {
        for n in [NODE_A, NODE_B] {
            let name = builders::pv_name(n, &volume(i).name);
            assert!(
                admin.get_opt(&name).await.unwrap().is_none(),
                "{name} exists"
            );
        }
    }
    assert!(admin.get_opt("kvstrap-a-x6").await.unwrap().is_none());
}

/// Node A may not patch Node b nor its status: kvstrap's own Node state publisher, run
/// with A's credential for node b, is refused at the first patch, and Node b carries
/// nothing of it.
async fn other_node(ctx: &Ctx<'_>) {
    let err = NodeState::default()
        .publish(&ctx.a, NODE_B, &report())
        .await
        .unwrap_err();
    assert!(
        err.contains("cannot patch the KvstrapStorageReady condition of Node b"),
        "{err}"
    );
    assert!(err.contains("403"), "{err}");
    assert!(
        err.contains("kvstrap: node a may change only its own Node, not b"),
        "{err}"
    );

    let nodes = Api::<Node>::all(ctx.a.clone());
    let own = "may change only its own Node, not b";
    refused(
        nodes
            .patch(
                NODE_B,
                &PatchParams::default(),
                &Patch::Merge(label_patch("kvstrap.io/storage-ready", "true")),
            )
            .await,
        "nodes",
        own,
    );
    let condition = node_state::condition_patch(
        &node_state::verdict(&report()),
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z",
    );
    refused(
        nodes
            .patch_status(
                NODE_B,
                &PatchParams::default(),
                &Patch::Strategic(condition),
            )
            .await,
        "nodes",
        own,
    );
    let b = node(ctx, NODE_B).await;
    let labels = b.metadata.labels.unwrap_or_default();
    assert!(
        !labels.contains_key("kvstrap.io/storage-ready"),
        "{labels:?}"
    );
    let conditions = b.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        conditions.iter().all(|c| !c.type_.starts_with("Kvstrap")),
        "{conditions:?}"
    );
}

/// On its own Node, node A may change only labels and annotations under `kvstrap.io/`
/// and the conditions whose type starts with `Kvstrap`: not a role label, not the
/// hostname label its PVs are matched by, not the spec (taints, unschedulable), not
/// kubelet's conditions.
async fn own_node_keys(ctx: &Ctx<'_>) {
    let nodes = Api::<Node>::all(ctx.a.clone());
    let pp = PatchParams::default();
    let keys = "may change only labels and annotations under kvstrap.io/";
    for (key, value) in [
        ("node-role.kubernetes.io/control-plane", ""),
        ("kubernetes.io/hostname", NODE_B),
    ] {
        refused(
            nodes
                .patch(NODE_A, &pp, &Patch::Merge(label_patch(key, value)))
                .await,
            "nodes",
            keys,
        );
    }
    let annotation = serde_json::json!({ "metadata": { "annotations": { "example.com/x": "1" } } });
    refused(
        nodes.patch(NODE_A, &pp, &Patch::Merge(annotation)).await,
        "nodes",
        keys,
    );
    let spec = serde_json::json!({ "spec": { "unschedulable": true } });
    refused(
        nodes.patch(NODE_A, &pp, &Patch::Merge(spec)).await,
        "nodes",
        keys,
    );
    let taint =
        serde_json::json!({ "spec": { "taints": [{ "key": "x", "effect": "NoSchedule" }] } });
    refused(
        nodes.patch(NODE_A, &pp, &Patch::Merge(taint)).await,
        "nodes",
        keys,
    );
    let ready = serde_json::json!({ "status": { "conditions": [{
        "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "forged" }] } });
    refused(
        nodes
            .patch_status(NODE_A, &pp, &Patch::Strategic(ready))
            .await,
        "nodes",
        "may change only the conditions whose type starts with Kvstrap",
    );
    let capacity = serde_json::json!({ "status": { "capacity": { "cpu": "512" } } });
    refused(
        nodes
            .patch_status(NODE_A, &pp, &Patch::Merge(capacity))
            .await,
        "nodes",
        "may change only the conditions whose type starts with Kvstrap",
    );
    // Its own keys, yes.
    nodes
        .patch(
            NODE_A,
            &pp,
            &Patch::Merge(label_patch("kvstrap.io/storage-ready", "false")),
        )
        .await
        .unwrap();
    let a = node(ctx, NODE_A).await;
    let labels = a.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("kubernetes.io/hostname").unwrap(), NODE_A);
    assert!(!labels.contains_key("node-role.kubernetes.io/control-plane"));
    assert!(a
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .iter()
        .all(|t| t.key != "x"));
}

/// Events: about node A's own Node and PVs only, and only as kvstrap on node A.
async fn events(ctx: &Ctx<'_>) {
    let e = NodeEvent {
        reason: "DiskRefused",
        warning: true,
        message: "disk /dev/sdb left alone".into(),
        key: "confine".into(),
    };
    node_state::post_event(&ctx.a, NODE_A, &e).await.unwrap();
    let err = node_state::post_event(&ctx.a, NODE_B, &e)
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    assert!(
        err.contains("ValidatingAdmissionPolicy 'kvstrap-node-events'"),
        "{err}"
    );

    let api = Api::<Event>::namespaced(ctx.a.clone(), "default");
    let pp = PostParams::default();
    let about = "may post Events only about its own Node or its own PersistentVolumes (named kvstrap-a-...)";
    refused(
        api.create(&pp, &event_about(NODE_A, node_ref(NODE_B)))
            .await,
        "events",
        about,
    );
    let theirs = builders::pv_name(NODE_B, &volume(1).name);
    refused(
        api.create(&pp, &event_about(NODE_A, pv_ref(&theirs))).await,
        "events",
        about,
    );
    let mut pod = node_ref(NODE_A);
    pod.kind = Some("Pod".into());
    refused(
        api.create(&pp, &event_about(NODE_A, pod)).await,
        "events",
        about,
    );
    // About A's own Node, but reported as node b.
    refused(
        api.create(&pp, &event_about(NODE_B, node_ref(NODE_A)))
            .await,
        "events",
        "may post Events only as reportingComponent kvstrap, reportingInstance a",
    );
    // Node B's credential: the same rules the other way round.
    refused(
        Api::<Event>::namespaced(ctx.b.clone(), "default")
            .create(&pp, &event_about(NODE_B, node_ref(NODE_A)))
            .await,
        "events",
        "kvstrap-b-...",
    );
}

/// StorageClasses: kvstrap's own only (managed-by kvstrap, no-provisioner); never made the
/// default class, never another owner's class taken over, never deleted.
async fn storage_classes(ctx: &Ctx<'_>) {
    let api = Api::<StorageClass>::all(ctx.a.clone());
    let ours = builders::storage_class(&class());
    api.patch(CLASS, &apply(), &Patch::Apply(&ours))
        .await
        .unwrap();
    let only = "may write only kvstrap's StorageClasses";
    refused(
        api.create(&PostParams::default(), &foreign_class("confine-ebs"))
            .await,
        "storageclasses",
        only,
    );
    let mut default = ours.clone();
    default.metadata.annotations = Some(BTreeMap::from([(
        "storageclass.kubernetes.io/is-default-class".into(),
        "true".into(),
    )]));
    refused(
        api.patch(CLASS, &apply(), &Patch::Apply(&default)).await,
        "storageclasses",
        "may not make a StorageClass the default class",
    );
    // An admin's class of the same provisioner, not labelled as kvstrap's: not taken over.
    let mut admins = foreign_class("confine-admins");
    admins.provisioner = builders::NO_PROVISIONER.into();
    Api::<StorageClass>::all(ctx.admin.clone())
        .create(&PostParams::default(), &admins)
        .await
        .unwrap();
    let takeover = label_patch(builders::LABEL_MANAGED_BY, builders::MANAGER);
    refused(
        api.patch(
            "confine-admins",
            &PatchParams::default(),
            &Patch::Merge(takeover),
        )
        .await,
        "storageclasses",
        only,
    );
    // Deletion is not even in the RBAC rules.
    match api.delete(CLASS, &DeleteParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a node deleted a StorageClass: {other:?}"),
    }
}

/// A user in the group whose name is not `kvstrap:node:<node>` cannot say which node it
/// is: every write is refused (impersonated by the admin here).
async fn nameless(ctx: &Ctx<'_>) {
    let admin = std::fs::read_to_string(&ctx.cp.kubeconfig).unwrap();
    let as_user = admin.replace(
        "    token: ",
        &format!("    as: someone\n    as-groups: [\"{GROUP}\"]\n    token: "),
    );
    assert_ne!(admin, as_user, "the admin kubeconfig has a token line");
    let path = ctx.dir.path().join("nameless.kubeconfig");
    std::fs::write(&path, as_user).unwrap();
    let client = ClientSource::Kubeconfig(path).client().await.unwrap();
    let not_named = "is in the group kvstrap:nodes but is not named kvstrap:node:<node name>";
    refused(
        Api::<PersistentVolume>::all(client.clone())
            .create(&PostParams::default(), &pv_of("someone", 1))
            .await,
        "persistentvolumes",
        not_named,
    );
    refused(
        Api::<Node>::all(client.clone())
            .patch(
                NODE_A,
                &PatchParams::default(),
                &Patch::Merge(label_patch("kvstrap.io/storage-ready", "true")),
            )
            .await,
        "nodes",
        not_named,
    );
    refused(
        Api::<Event>::namespaced(client, "default")
            .create(
                &PostParams::default(),
                &event_about("someone", node_ref("someone")),
            )
            .await,
        "events",
        not_named,
    );
}
