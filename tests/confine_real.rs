//! Each node's credential confined to its own objects by the API server
//! (`packaging/kubernetes/admission-policy.yaml` beside `rbac.yaml`), against a real
//! control plane (`tests/support/control_plane.rs`, one for the whole file) that
//! authenticates two node identities by token: `kvstrap:node:a` and `kvstrap:node:b`, both
//! in the group `kvstrap:nodes`, as per-node certificates would (and a third,
//! `kvstrap:node:n--1.example.com`, whose room gets a hashed name). Node A publishes, reports
//! and posts Events with kvstrap's own code and is refused, with the policy's message, on
//! everything of node B: its PVs (create, apply, relabel, delete), a PV labelled for A but
//! affined to B, its Node and `nodes/status`, Events about it. Dynamic volumes too: A
//! writes the CSIDriver, its own CSIStorageCapacity, a dynamic class, the pre-bound PV of
//! a claim that selected it, that claim's status and Events, and gives a claim back to the
//! scheduler; it is refused on B's room, another CSIDriver or spec, claims that selected
//! B, any other change of a claim, and a claimRef it did not make for that claim. The
//! policies' expressions type-check (kube-controller-manager's checker runs beside). No
//! disks, no root.
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
    Event, Namespace, Node, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Client;
use kvstrap::kube::builders::{self, EventText};
use kvstrap::kube::dynamic;
use kvstrap::kube::node_state::{self, NodeEvent, NodeReport, NodeState};
use kvstrap::kube::reconcile::Reconciler;
use kvstrap::kube::{ClientSource, Desired, DirectoryAndBlockScrubber};
use kvstrap::model::{PoolSpec, VolumeMode, VolumeSpec};
use kvstrap::policy::types::ReclaimPolicy;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE_A: &str = "a";
const NODE_B: &str = "b";
const DOTTED: &str = "n--1.example.com";
const DOTTED_USER: &str = "kvstrap:node:n--1.example.com";
const GROUP: &str = "kvstrap:nodes";
const CLASS: &str = "confine-local";
/// A dynamic class (provisioner local.kvstrap.io) and the namespaces of the node's room
/// (`[kubernetes] policy_namespace`, made by rbac.yaml) and of the tenants' claims.
const DYN_CLASS: &str = "confine-dynamic";
const POLICY_NS: &str = "kvstrap";
const TENANT: &str = "confine-tenant";
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

struct Ctx<'a> {
    cp: &'a ControlPlane,
    admin: Client,
    /// Node A's credential, and node B's.
    a: Client,
    b: Client,
    /// A node whose name is no DNS label (dots, a double dash): its object names are hashed.
    dotted: Client,
    dir: tempfile::TempDir,
    /// kube-controller-manager's type checker of admission policies (it writes each
    /// policy's `status.typeChecking`), beside the control plane's own.
    _checker: control_plane::Proc,
}

#[test]
fn confine_real_control_plane() {
    let users = [
        ("kvstrap:node:a", GROUP),
        ("kvstrap:node:b", GROUP),
        (DOTTED_USER, GROUP),
    ];
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
        ("a_node_writes_its_own_dynamic_volumes_objects", |c| {
            dynamic_own(c).boxed()
        }),
        ("node_a_publishes_only_its_own_room", |c| {
            capacities(c).boxed()
        }),
        ("node_a_writes_only_kvstraps_csidriver", |c| {
            csi_drivers(c).boxed()
        }),
        ("node_a_changes_only_the_claims_it_serves", |c| {
            claims(c).boxed()
        }),
        (
            "node_a_sets_a_claim_ref_only_on_the_pv_it_makes_for_that_claim",
            |c| claim_refs(c).boxed(),
        ),
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
    let tenant = Namespace {
        metadata: ObjectMeta {
            name: Some(TENANT.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), TENANT)
        .create(
            &PostParams::default(),
            &claim_object("confine-probe", Some(NODE_B), None),
        )
        .await
        .unwrap();
    let source = |user: &str| ClientSource::Kubeconfig(cp.kubeconfig_as(user));
    let dir = tempfile::tempdir().unwrap();
    let checker = control_plane::Proc::spawn(
        "policy-type-checker",
        dir.path(),
        std::process::Command::new(&cp.assets().controller_manager)
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .args([
                "--controllers=validatingadmissionpolicy-status-controller",
                "--leader-elect=false",
                "--secure-port=0",
            ]),
    );
    let ctx = Ctx {
        cp,
        a: source("kvstrap:node:a").client().await.unwrap(),
        b: source("kvstrap:node:b").client().await.unwrap(),
        dotted: source(DOTTED_USER).client().await.unwrap(),
        admin,
        dir,
        _checker: checker,
    };
    let started = Instant::now();
    wait_in_force(&ctx).await;
    type_checked(&ctx).await;
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
        let capacity = Api::<CSIStorageCapacity>::namespaced(ctx.a.clone(), POLICY_NS)
            .create(&post, &capacity_of(NODE_B, DYN_CLASS))
            .await;
        let mut other = dynamic::csi_driver();
        other.metadata.name = Some("confine-probe.example.com".into());
        let driver = Api::<CSIDriver>::all(ctx.a.clone())
            .create(&post, &other)
            .await;
        let claim = Api::<PersistentVolumeClaim>::namespaced(ctx.a.clone(), TENANT)
            .patch("confine-probe", &dry, &Patch::Merge(unselect(None)))
            .await;
        let by_policy = |r: Result<(), kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.message.contains("ValidatingAdmissionPolicy"));
        if by_policy(pv.map(drop))
            && by_policy(node.map(drop))
            && by_policy(event.map(drop))
            && by_policy(sc.map(drop))
            && by_policy(capacity.map(drop))
            && by_policy(driver.map(drop))
            && by_policy(claim.map(drop))
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

/// Fields of type ResourceList, which kube-controller-manager's type checker does not know.
const QUANTITY_MAPS: [&str; 3] = ["capacity", "allocatable", "allocatedResources"];

/// Every expression of every policy type-checks against the API server's schemas (a
/// field misspelt, or a CEL function this version lacks, shows here as a warning).
async fn type_checked(ctx: &Ctx<'_>) {
    let start = Instant::now();
    loop {
        let out = kubectl(
            ctx.cp,
            &["get", "validatingadmissionpolicies", "-o", "json"],
        );
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let items = list["items"].as_array().unwrap();
        let checked = items.iter().all(|p| {
            p["status"]["observedGeneration"] == p["metadata"]["generation"]
                && !p["status"]["typeChecking"].is_null()
        });
        if checked && items.len() == 7 {
            let mut unexpected = Vec::new();
            for p in items {
                let warnings = p["status"]["typeChecking"]["expressionWarnings"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for w in warnings {
                    let text = w["warning"].as_str().unwrap_or_default();
                    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR:")).collect();
                    // Resource lists (maps of quantities) have no CEL type in the schema
                    // the checker reads; at run time they compare as values (the cases
                    // below show each such rule refusing and allowing).
                    let quantities = errors.iter().all(|e| {
                        QUANTITY_MAPS
                            .iter()
                            .any(|f| e.ends_with(&format!("undefined field '{f}'")))
                    });
                    if errors.is_empty() || !quantities {
                        unexpected.push(format!(
                            "{}: {} {text}",
                            p["metadata"]["name"], w["fieldRef"]
                        ));
                    }
                }
            }
            assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the policies are not type-checked after {WAIT:?}: {}",
            ctx._checker.tail()
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

/// An Event as kvstrap on `reporter` builds it, with kvstrap's `reason`, posted in
/// `namespace` (src/dynamic/server.rs posts those about a claim in the claim's namespace).
fn event_with(reporter: &str, involved: ObjectReference, reason: &str, namespace: &str) -> Event {
    let mut e = event_about(reporter, involved);
    e.reason = Some(reason.into());
    e.action = Some(reason.into());
    e.metadata.namespace = Some(namespace.into());
    e
}

fn claim_ref_of(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: claim.metadata.namespace.clone(),
        name: claim.metadata.name.clone(),
        uid: claim.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

fn dyn_class() -> kvstrap::policy::types::StorageClass {
    fixtures::class(DYN_CLASS, VolumeMode::Filesystem, ReclaimPolicy::Delete)
}

/// The node's room for `class`, as the dynamic provisioner publishes it.
fn capacity_of(node: &str, class: &str) -> CSIStorageCapacity {
    dynamic::storage_capacity(node, POLICY_NS, class, 10 << 30, 4 << 30)
}

/// A claim of the dynamic class in the tenants' namespace, selecting `selected` (as
/// kube-scheduler annotates it), optionally bound by name to `volume`.
fn claim_object(name: &str, selected: Option<&str>, volume: Option<&str>) -> PersistentVolumeClaim {
    let mut annotations = serde_json::Map::new();
    if let Some(n) = selected {
        annotations.insert(dynamic::SELECTED_NODE.into(), n.into());
    }
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": TENANT, "annotations": annotations,
                      "labels": { "app": "vm" } },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": DYN_CLASS,
            "volumeMode": "Filesystem",
            "volumeName": volume,
            "resources": { "requests": { "storage": "64Mi" } },
        },
    }))
    .unwrap()
}

/// Creates [`claim_object`] as the admin; the claim as stored (with its uid).
async fn claim_selecting(
    ctx: &Ctx<'_>,
    name: &str,
    selected: Option<&str>,
    volume: Option<&str>,
) -> PersistentVolumeClaim {
    Api::<PersistentVolumeClaim>::namespaced(ctx.admin.clone(), TENANT)
        .create(
            &PostParams::default(),
            &claim_object(name, selected, volume),
        )
        .await
        .unwrap()
}

/// The merge patch with which kvstrap gives a claim back to the scheduler.
fn unselect(uid: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "metadata": { "uid": uid, "annotations": { dynamic::SELECTED_NODE: null } } })
}

/// A pool of a dynamic group, as the provisioner sees it (from JSON: fields added to
/// PoolSpec later take their defaults).
fn pool() -> PoolSpec {
    serde_json::from_value(serde_json::json!({
        "group": "pool",
        "storage_class": DYN_CLASS,
        "disk": "/dev/nvme0n1",
        "disk_identity": "wwn:eui.0025388b91e3f2a9",
        "device": "/dev/nvme0n1p1",
        "mountpoint": "/var/lib/kvstrap/storage/pool/nvme-3f2a9c1b",
        "fs_type": "xfs",
        "capacity_bytes": 10u64 << 30,
        "project_quota": true,
        "owner": { "uid": 107, "gid": 107, "mode": 0o750 },
        "transport": "nvme",
        "rotational": false,
    }))
    .unwrap()
}

/// The PV the dynamic provisioner of `node` creates for `claim` (pre-bound to it).
fn claim_pv_of(node: &str, claim: &PersistentVolumeClaim) -> PersistentVolume {
    let spec = claim.spec.as_ref().unwrap();
    let uid = claim.metadata.uid.clone().unwrap();
    let claim_ref = dynamic::ClaimRef {
        uid: uid.clone(),
        namespace: claim.metadata.namespace.clone().unwrap(),
        name: claim.metadata.name.clone().unwrap(),
        access_modes: spec.access_modes.clone().unwrap_or_default(),
    };
    let path = Path::new(&pool().mountpoint).join(dynamic::pv_name(&uid));
    dynamic::claim_pv(node, &claim_ref, &pool(), &path, 64 * MIB, &dyn_class())
}

/// Waits until the PV controller has bound `claim` to `pv`.
async fn wait_bound(ctx: &Ctx<'_>, claim: &str, pv: &str) {
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.admin.clone(), TENANT);
    let start = Instant::now();
    loop {
        let c = api.get(claim).await.unwrap();
        let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if bound && c.spec.as_ref().unwrap().volume_name.as_deref() == Some(pv) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "claim {claim} not bound to {pv} after {WAIT:?}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts that `result` is the API server's own refusal (422 Invalid) saying `why`.
#[track_caller]
fn invalid<T: std::fmt::Debug>(result: Result<T, kube::Error>, why: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains(why), "{why:?} not in {}", s.message);
        }
        other => panic!("expected 422 ({why}), got {other:?}"),
    }
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
    // Read once the controller manager has set its phase (Available): after that nothing
    // but a write by node A could change its resourceVersion, which is checked at the end.
    let started = Instant::now();
    let before = loop {
        let pv = admin.get(&theirs).await.unwrap();
        let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Available") {
            break pv;
        }
        assert!(
            started.elapsed() < WAIT,
            "{theirs} still {phase:?} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

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
    // The UID alone: the controller manager updates the PV's status meanwhile, and a stale
    // resourceVersion would make the server answer 409 before the policy is asked.
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: before.metadata.uid.clone(),
            resource_version: None,
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
    let about = "may post Events only about its own Node or its own PersistentVolumes (named kvstrap-a-..., or pvc-<uid> with the reason VolumeInUse) in the namespace default, or about a PersistentVolumeClaim in its namespace with the reason ProvisioningFailed, NoRoomOnNode, ExpansionFailed";
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

    // Dynamic volumes. An Event carries neither the claim's selected node nor a PV's
    // labels: what is checked is the kind, the name's form, the namespace and the reason.
    let claim = Api::<PersistentVolumeClaim>::namespaced(ctx.admin.clone(), TENANT)
        .get("confine-probe")
        .await
        .unwrap();
    let tenant = Api::<Event>::namespaced(ctx.a.clone(), TENANT);
    // About a claim, with a reason kvstrap does not post.
    refused(
        tenant
            .create(
                &pp,
                &event_with(NODE_A, claim_ref_of(&claim), "ConfineTest", TENANT),
            )
            .await,
        "events",
        about,
    );
    // About a dynamic PV: another reason, or a pvc- name that is not pvc-<uid>.
    let dynamic_pv = pv_ref(&dynamic::pv_name(claim.metadata.uid.as_deref().unwrap()));
    refused(
        api.create(
            &pp,
            &event_with(NODE_A, dynamic_pv.clone(), "ConfineTest", "default"),
        )
        .await,
        "events",
        about,
    );
    refused(
        api.create(
            &pp,
            &event_with(NODE_A, pv_ref("pvc-anything"), "VolumeInUse", "default"),
        )
        .await,
        "events",
        about,
    );
    // The API server keeps an Event about a cluster-scoped object in default or
    // kube-system: the policy, in default only.
    let system = Api::<Event>::namespaced(ctx.a.clone(), "kube-system");
    refused(
        system
            .create(
                &pp,
                &event_with(NODE_A, node_ref(NODE_A), "ConfineTest", "kube-system"),
            )
            .await,
        "events",
        about,
    );
    refused(
        system
            .create(
                &pp,
                &event_with(NODE_A, dynamic_pv.clone(), "VolumeInUse", "kube-system"),
            )
            .await,
        "events",
        about,
    );
    // An Event about a claim goes in the claim's namespace (the API server does not
    // check it when eventTime is set: the policy does).
    refused(
        api.create(
            &pp,
            &event_with(NODE_A, claim_ref_of(&claim), "NoRoomOnNode", "default"),
        )
        .await,
        "events",
        about,
    );
    // An Event about a cluster-scoped object outside default and kube-system: 422 before
    // any policy.
    invalid(
        tenant
            .create(&pp, &event_with(NODE_A, dynamic_pv, "VolumeInUse", TENANT))
            .await,
        "does not match event.namespace",
    );
    // About a claim, with kvstrap's reason, reported as node b.
    refused(
        tenant
            .create(
                &pp,
                &event_with(NODE_B, claim_ref_of(&claim), "NoRoomOnNode", TENANT),
            )
            .await,
        "events",
        "may post Events only as reportingComponent kvstrap, reportingInstance a",
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

    // A dynamic class: kvstrap's provisioner, expansion allowed.
    let dynamic_class = builders::dynamic_storage_class(&dyn_class());
    let applied = api
        .patch(DYN_CLASS, &apply(), &Patch::Apply(&dynamic_class))
        .await
        .unwrap();
    assert_eq!(applied.provisioner, dynamic::PROVISIONER);
    assert_eq!(applied.allow_volume_expansion, Some(true));
    // Labelled as kvstrap's, but of another provisioner.
    let mut ceph = builders::storage_class(&class());
    ceph.metadata.name = Some("confine-ceph".into());
    ceph.provisioner = "rbd.csi.ceph.com".into();
    refused(
        api.create(&PostParams::default(), &ceph).await,
        "storageclasses",
        only,
    );
    // Expansion of a static class (its volumes are partitions and fixed directories).
    let mut growing = builders::storage_class(&class());
    growing.metadata.name = Some("confine-growing".into());
    growing.allow_volume_expansion = Some(true);
    refused(
        api.create(&PostParams::default(), &growing).await,
        "storageclasses",
        "may allow volume expansion only on a class of the provisioner local.kvstrap.io",
    );
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

/// What the dynamic provisioner does with a node's credential passes the policies: the
/// dynamic class, the CSIDriver, the node's CSIStorageCapacity (created, updated, listed),
/// the pre-bound PV of a claim that selected the node (bound by the PV controller), its
/// expansion (PV capacity, the claim's status), Events about the claim and the PV, a claim
/// given back to the scheduler, and a reclaimed PV (finalizer removed, deleted with a uid
/// precondition).
async fn dynamic_own(ctx: &Ctx<'_>) {
    Api::<StorageClass>::all(ctx.a.clone())
        .patch(
            DYN_CLASS,
            &apply(),
            &Patch::Apply(&builders::dynamic_storage_class(&dyn_class())),
        )
        .await
        .unwrap();
    let drivers = Api::<CSIDriver>::all(ctx.a.clone());
    drivers
        .patch(
            dynamic::PROVISIONER,
            &apply(),
            &Patch::Apply(&dynamic::csi_driver()),
        )
        .await
        .unwrap();
    // Again (an update): every node applies the same object.
    Api::<CSIDriver>::all(ctx.b.clone())
        .patch(
            dynamic::PROVISIONER,
            &apply(),
            &Patch::Apply(&dynamic::csi_driver()),
        )
        .await
        .unwrap();
    let driver = drivers.get(dynamic::PROVISIONER).await.unwrap();
    assert_eq!(driver.spec.storage_capacity, Some(true));

    let capacities = Api::<CSIStorageCapacity>::namespaced(ctx.a.clone(), POLICY_NS);
    let room = capacity_of(NODE_A, DYN_CLASS);
    let name = dynamic::capacity_name(NODE_A, DYN_CLASS);
    assert_eq!(name, "kvstrap-a-capacity-confine-dynamic");
    capacities
        .patch(&name, &apply(), &Patch::Apply(&room))
        .await
        .unwrap();
    let less = dynamic::storage_capacity(NODE_A, POLICY_NS, DYN_CLASS, 6 << 30, 2 << 30);
    capacities
        .patch(&name, &apply(), &Patch::Apply(&less))
        .await
        .unwrap();
    // A class whose name makes the readable name too long: the hashed name passes too.
    let long_class = format!("confine-{}", "x".repeat(60));
    let long = capacity_of(NODE_A, &long_class);
    let long_name = long.metadata.name.clone().unwrap();
    let readable = format!("kvstrap-a-capacity-{long_class}");
    assert!(
        readable.len() > 63 && long_name.len() <= 63 && long_name.starts_with("kvstrap-a-"),
        "{long_name}"
    );
    capacities
        .patch(&long_name, &apply(), &Patch::Apply(&long))
        .await
        .unwrap();
    capacities
        .delete(&long_name, &DeleteParams::default())
        .await
        .unwrap();
    // A node whose name makes the readable name no DNS label: hashed too.
    let dotted = capacity_of(DOTTED, DYN_CLASS);
    let dotted_name = dotted.metadata.name.clone().unwrap();
    assert!(
        dotted_name.starts_with("kvstrap-n-1-example-com-capacity-confine-dynamic-"),
        "{dotted_name}"
    );
    Api::<CSIStorageCapacity>::namespaced(ctx.dotted.clone(), POLICY_NS)
        .patch(&dotted_name, &apply(), &Patch::Apply(&dotted))
        .await
        .unwrap();
    let listed = capacities.list(&Default::default()).await.unwrap();
    assert!(listed
        .items
        .iter()
        .any(|c| c.metadata.name.as_deref() == Some(name.as_str())));

    // A claim that selected A: its pre-bound PV, bound by the PV controller.
    let claim = claim_selecting(ctx, "dyn-own", Some(NODE_A), None).await;
    let pv = claim_pv_of(NODE_A, &claim);
    let pv_name = pv.metadata.name.clone().unwrap();
    let pvs = Api::<PersistentVolume>::all(ctx.a.clone());
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    wait_bound(ctx, "dyn-own", &pv_name).await;

    // Expansion: the PV's capacity, then the claim's status.
    let grown = serde_json::json!({ "spec": { "capacity": { "storage": "128Mi" } } });
    pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&grown))
        .await
        .unwrap();
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.a.clone(), TENANT);
    let status = serde_json::json!({ "status": { "capacity": { "storage": "128Mi" } } });
    let after = claims
        .patch_status("dyn-own", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(
        after.status.unwrap().capacity.unwrap()["storage"].0,
        "128Mi"
    );

    // Events about the claim, in its namespace, and about its PV, in default.
    let events = Api::<Event>::namespaced(ctx.a.clone(), TENANT);
    for reason in ["ProvisioningFailed", "NoRoomOnNode", "ExpansionFailed"] {
        events
            .create(
                &PostParams::default(),
                &event_with(NODE_A, claim_ref_of(&claim), reason, TENANT),
            )
            .await
            .unwrap();
    }
    Api::<Event>::namespaced(ctx.a.clone(), "default")
        .create(
            &PostParams::default(),
            &event_with(NODE_A, pv_ref(&pv_name), "VolumeInUse", "default"),
        )
        .await
        .unwrap();

    // The reschedule protocol: a claim that selected A given back to the scheduler.
    let back = claim_selecting(ctx, "dyn-back", Some(NODE_A), None).await;
    let unselected = claims
        .patch(
            "dyn-back",
            &PatchParams::default(),
            &Patch::Merge(unselect(back.metadata.uid.as_deref())),
        )
        .await
        .unwrap();
    let annotations = unselected.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key(dynamic::SELECTED_NODE),
        "{annotations:?}"
    );

    // Reclaim: the claim deleted, the PV released; its finalizer removed (with the
    // resourceVersion seen), then deleted with a uid precondition.
    Api::<PersistentVolumeClaim>::namespaced(ctx.admin.clone(), TENANT)
        .delete("dyn-own", &DeleteParams::default())
        .await
        .unwrap();
    // (The PV controller releases the PV meanwhile: a conflict is read again, as the
    // provisioner's next pass does.)
    let current = loop {
        let current = pvs.get(&pv_name).await.unwrap();
        let rest: Vec<String> = current
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != dynamic::FINALIZER)
            .collect();
        let release = serde_json::json!({ "metadata": {
            "finalizers": rest, "resourceVersion": current.metadata.resource_version } });
        match pvs
            .patch(&pv_name, &PatchParams::default(), &Patch::Merge(&release))
            .await
        {
            Ok(_) => break current,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("releasing {pv_name}: {e:?}"),
        }
    };
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: current.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    pvs.delete(&pv_name, &dp).await.unwrap();
    let admin = Api::<PersistentVolume>::all(ctx.admin.clone());
    let start = Instant::now();
    while admin.get_opt(&pv_name).await.unwrap().is_some() {
        assert!(start.elapsed() < WAIT, "{pv_name} is still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// CSIStorageCapacity: node A writes only its own room. Refused: B's (as B publishes it),
/// one named for A but with B's topology or a second topology term, labelled for B, named
/// for another class, and B's existing one applied over or deleted. B's is untouched.
async fn capacities(ctx: &Ctx<'_>) {
    let theirs_name = dynamic::capacity_name(NODE_B, DYN_CLASS);
    Api::<CSIStorageCapacity>::namespaced(ctx.b.clone(), POLICY_NS)
        .patch(
            &theirs_name,
            &apply(),
            &Patch::Apply(&capacity_of(NODE_B, DYN_CLASS)),
        )
        .await
        .unwrap();
    let admin = Api::<CSIStorageCapacity>::namespaced(ctx.admin.clone(), POLICY_NS);
    let before = admin.get(&theirs_name).await.unwrap();

    let api = Api::<CSIStorageCapacity>::namespaced(ctx.a.clone(), POLICY_NS);
    let pp = PostParams::default();
    let topology =
        "may write only CSIStorageCapacity whose nodeTopology is exactly matchLabels {kubernetes.io/hostname: a}";
    refused(
        api.create(&pp, &capacity_of(NODE_B, "confine-other")).await,
        "csistoragecapacities",
        topology,
    );
    let mut on_b = capacity_of(NODE_A, "confine-other");
    on_b.node_topology.as_mut().unwrap().match_labels = Some(BTreeMap::from([(
        "kubernetes.io/hostname".into(),
        NODE_B.into(),
    )]));
    refused(
        api.create(&pp, &on_b).await,
        "csistoragecapacities",
        topology,
    );
    let mut wider = capacity_of(NODE_A, "confine-other");
    wider.node_topology.as_mut().unwrap().match_expressions =
        Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/hostname".into(),
            operator: "In".into(),
            values: Some(vec![NODE_A.into(), NODE_B.into()]),
        }]);
    refused(
        api.create(&pp, &wider).await,
        "csistoragecapacities",
        topology,
    );
    let mut labelled_b = capacity_of(NODE_A, "confine-other");
    labelled_b
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(builders::LABEL_NODE.into(), NODE_B.into());
    refused(
        api.create(&pp, &labelled_b).await,
        "csistoragecapacities",
        "may write only CSIStorageCapacity labelled kvstrap.io/node=a and app.kubernetes.io/managed-by=kvstrap",
    );
    let mut misnamed = capacity_of(NODE_A, "confine-other");
    misnamed.storage_class_name = "confine-third".into();
    refused(
        api.create(&pp, &misnamed).await,
        "csistoragecapacities",
        "a's CSIStorageCapacity for class confine-third is named kvstrap-a-capacity-confine-third, not kvstrap-a-capacity-confine-other",
    );
    // A name of the hashed form that is not the one kvstrap computes.
    let long_class = format!("confine-{}", "x".repeat(60));
    let mut forged = capacity_of(NODE_A, &long_class);
    forged.metadata.name = Some("kvstrap-a-capacity-other-0123abcd".into());
    refused(
        api.create(&pp, &forged).await,
        "csistoragecapacities",
        "with a hash, not kvstrap-a-capacity-other-0123abcd",
    );
    // B's own object (its name and topology are immutable): its room zeroed, relabelled
    // as A's, deleted.
    let zero = serde_json::json!({ "capacity": "0", "maximumVolumeSize": "0" });
    refused(
        api.patch(&theirs_name, &PatchParams::default(), &Patch::Merge(zero))
            .await,
        "csistoragecapacities",
        topology,
    );
    let relabel = label_patch(builders::LABEL_NODE, NODE_A);
    refused(
        api.patch(
            &theirs_name,
            &PatchParams::default(),
            &Patch::Merge(relabel),
        )
        .await,
        "csistoragecapacities",
        topology,
    );
    refused(
        api.delete(&theirs_name, &DeleteParams::default()).await,
        "csistoragecapacities",
        &format!("CSIStorageCapacity {theirs_name} is not node a's"),
    );
    let after = admin.get(&theirs_name).await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    for name in [
        dynamic::capacity_name(NODE_B, "confine-other"),
        dynamic::capacity_name(NODE_A, "confine-other"),
        "kvstrap-a-capacity-other-0123abcd".into(),
    ] {
        assert!(
            admin.get_opt(&name).await.unwrap().is_none(),
            "{name} exists"
        );
    }
}

/// The CSIDriver: only local.kvstrap.io, only with kvstrap's spec and label, never deleted.
async fn csi_drivers(ctx: &Ctx<'_>) {
    let api = Api::<CSIDriver>::all(ctx.a.clone());
    let pp = PostParams::default();
    let mut other = dynamic::csi_driver();
    other.metadata.name = Some("confine.example.com".into());
    refused(
        api.create(&pp, &other).await,
        "csidrivers",
        "may write only the CSIDriver local.kvstrap.io, not confine.example.com",
    );
    let spec = "may write the CSIDriver local.kvstrap.io only as kvstrap's";
    type Change = fn(&mut CSIDriver);
    let changes: [(&str, Change); 7] = [
        ("podInfoOnMount", |d| d.spec.pod_info_on_mount = Some(true)),
        ("attachRequired", |d| d.spec.attach_required = Some(true)),
        ("storageCapacity", |d| d.spec.storage_capacity = Some(false)),
        ("requiresRepublish", |d| {
            d.spec.requires_republish = Some(true)
        }),
        ("fsGroupPolicy", |d| {
            d.spec.fs_group_policy = Some("File".into())
        }),
        ("volumeLifecycleModes", |d| {
            d.spec.volume_lifecycle_modes = Some(vec!["Persistent".into(), "Ephemeral".into()])
        }),
        ("no managed-by label", |d| d.metadata.labels = None),
    ];
    for (what, change) in changes {
        let mut driver = dynamic::csi_driver();
        change(&mut driver);
        let result = api.create(&pp, &driver).await;
        assert!(
            matches!(&result, Err(kube::Error::Api(s)) if s.code == 403),
            "{what}: {result:?}"
        );
        refused(result, "csidrivers", spec);
    }
    let mut tokens = dynamic::csi_driver();
    tokens.spec.token_requests = Some(vec![k8s_openapi::api::storage::v1::TokenRequest {
        audience: "confine".into(),
        expiration_seconds: None,
    }]);
    refused(api.create(&pp, &tokens).await, "csidrivers", spec);
    // Deletion is not in the RBAC rules.
    match api
        .delete(dynamic::PROVISIONER, &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a node deleted the CSIDriver: {other:?}"),
    }
}

/// Claims: node A may only remove `volume.kubernetes.io/selected-node` from a claim that
/// selected it, and change only `status.capacity.storage` of a claim that selected it and
/// is bound to its `pvc-<uid>`. Refused: a claim that selected B (either way), a claim
/// that selected no node, labels, other annotations, the spec (a volumeName), removing
/// the annotation together with another change, another status field, the status of a
/// claim bound to another PV; creating and deleting claims (RBAC). B's claim is unchanged.
async fn claims(ctx: &Ctx<'_>) {
    let theirs = claim_selecting(ctx, "claim-b", Some(NODE_B), None).await;
    let mine = claim_selecting(ctx, "claim-a", Some(NODE_A), None).await;
    claim_selecting(ctx, "claim-none", None, None).await;
    claim_selecting(
        ctx,
        "claim-elsewhere",
        Some(NODE_A),
        Some("kvstrap-a-static"),
    )
    .await;
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.a.clone(), TENANT);
    let pp = PatchParams::default();
    let serves =
        "may change only the claims it serves (whose volume.kubernetes.io/selected-node is a)";
    refused(
        api.patch(
            "claim-b",
            &pp,
            &Patch::Merge(unselect(theirs.metadata.uid.as_deref())),
        )
        .await,
        "persistentvolumeclaims",
        &format!("{serves}; claim {TENANT}/claim-b selects 'b'"),
    );
    refused(
        api.patch(
            "claim-b",
            &pp,
            &Patch::Merge(label_patch("kvstrap.io/x", "1")),
        )
        .await,
        "persistentvolumeclaims",
        serves,
    );
    // Selecting itself: not the node's to say.
    let select =
        serde_json::json!({ "metadata": { "annotations": { dynamic::SELECTED_NODE: NODE_A } } });
    refused(
        api.patch("claim-none", &pp, &Patch::Merge(select)).await,
        "persistentvolumeclaims",
        &format!("{serves}; claim {TENANT}/claim-none selects ''"),
    );
    let only = "on a claim, node a may only remove volume.kubernetes.io/selected-node";
    let mut both = unselect(mine.metadata.uid.as_deref());
    both["metadata"]["labels"] = serde_json::json!({ "app": "other" });
    let changes = [
        label_patch("app", "other"),
        label_patch("kvstrap.io/x", "1"),
        serde_json::json!({ "metadata": { "annotations": { "example.com/x": "1" } } }),
        serde_json::json!({ "metadata": { "finalizers": null } }),
        serde_json::json!({ "spec": { "volumeName": "kvstrap-a-x" } }),
        both,
    ];
    for change in changes {
        refused(
            api.patch("claim-a", &pp, &Patch::Merge(&change)).await,
            "persistentvolumeclaims",
            only,
        );
    }

    // Status: B's claim, a claim bound elsewhere, and a field other than the capacity.
    let capacity = serde_json::json!({ "status": { "capacity": { "storage": "1Gi" } } });
    refused(
        api.patch_status("claim-b", &pp, &Patch::Merge(&capacity))
            .await,
        "persistentvolumeclaims",
        serves,
    );
    refused(
        api.patch_status("claim-elsewhere", &pp, &Patch::Merge(&capacity))
            .await,
        "persistentvolumeclaims",
        "may change the status only of a claim bound to its dynamic PersistentVolume pvc-<claim uid>; claim confine-tenant/claim-elsewhere is bound to 'kvstrap-a-static'",
    );
    refused(
        api.patch_status("claim-a", &pp, &Patch::Merge(&capacity))
            .await,
        "persistentvolumeclaims",
        "is bound to ''",
    );
    let bound = claim_selecting(ctx, "claim-bound", Some(NODE_A), None).await;
    let pv = claim_pv_of(NODE_A, &bound);
    let pv_name = pv.metadata.name.clone().unwrap();
    Api::<PersistentVolume>::all(ctx.a.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    wait_bound(ctx, "claim-bound", &pv_name).await;
    let status_only = "in the status of a claim, node a may change only status.capacity.storage";
    for change in [
        serde_json::json!({ "status": { "phase": "Lost" } }),
        serde_json::json!({ "status": { "capacity": { "example.com/x": "1" } } }),
        serde_json::json!({ "status": { "accessModes": ["ReadWriteMany"] } }),
        serde_json::json!({ "status": { "capacity": { "storage": "1Gi" } },
                            "metadata": { "labels": { "kvstrap.io/x": "1" } } }),
    ] {
        refused(
            api.patch_status("claim-bound", &pp, &Patch::Merge(&change))
                .await,
            "persistentvolumeclaims",
            status_only,
        );
    }
    api.patch_status("claim-bound", &pp, &Patch::Merge(&capacity))
        .await
        .unwrap();

    // Creating or deleting claims is not in the RBAC rules.
    let created = api
        .create(
            &PostParams::default(),
            &claim_object("claim-new", Some(NODE_A), None),
        )
        .await;
    assert!(
        matches!(&created, Err(kube::Error::Api(s)) if s.code == 403),
        "{created:?}"
    );
    let deleted = api.delete("claim-a", &DeleteParams::default()).await;
    assert!(
        matches!(&deleted, Err(kube::Error::Api(s)) if s.code == 403),
        "{deleted:?}"
    );

    // Nothing of it changed (the PV controller annotates claims too: compare what A tried).
    let admin = Api::<PersistentVolumeClaim>::namespaced(ctx.admin.clone(), TENANT);
    for (name, node) in [("claim-b", NODE_B), ("claim-a", NODE_A)] {
        let after = admin.get(name).await.unwrap();
        let annotations = after.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get(dynamic::SELECTED_NODE).map(String::as_str),
            Some(node)
        );
        assert!(
            !annotations.contains_key("example.com/x"),
            "{annotations:?}"
        );
        assert_eq!(
            after.metadata.labels,
            Some(BTreeMap::from([("app".into(), "vm".into())]))
        );
        assert_eq!(after.spec.as_ref().unwrap().volume_name, None);
        assert!(after.status.unwrap().capacity.is_none());
    }
    let none = admin.get("claim-none").await.unwrap();
    assert!(!none
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key(dynamic::SELECTED_NODE));
}

/// spec.claimRef: set only when the node creates the dynamic PV of that very claim
/// (`pvc-<claim uid>`, labelled dynamic, annotated with the uid), never changed after.
async fn claim_refs(ctx: &Ctx<'_>) {
    let claim = claim_selecting(ctx, "claim-ref", Some(NODE_A), None).await;
    let other = claim_selecting(ctx, "claim-ref-other", Some(NODE_A), None).await;
    let pvs = Api::<PersistentVolume>::all(ctx.a.clone());
    let pp = PostParams::default();
    let why =
        "may set spec.claimRef only when it creates the dynamic PersistentVolume of that claim";
    // A static PV of A pre-bound to the claim.
    let mut static_bound = pv_of(NODE_A, 20);
    static_bound.spec.as_mut().unwrap().claim_ref = Some(claim_ref_of(&claim));
    refused(
        pvs.create(&pp, &static_bound).await,
        "persistentvolumes",
        why,
    );
    // The dynamic PV of one claim, pre-bound to another.
    let mut crossed = claim_pv_of(NODE_A, &claim);
    crossed.spec.as_mut().unwrap().claim_ref = Some(claim_ref_of(&other));
    refused(pvs.create(&pp, &crossed).await, "persistentvolumes", why);
    // Without the dynamic label.
    let mut unlabelled = claim_pv_of(NODE_A, &claim);
    unlabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(dynamic::LABEL_PROVISIONING);
    refused(pvs.create(&pp, &unlabelled).await, "persistentvolumes", why);
    // Its own Available PV, bound afterwards by the node.
    let pass = publish(ctx, &ctx.a, NODE_A, &[volume(1), volume(21)]).await;
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    let own = builders::pv_name(NODE_A, &volume(21).name);
    let bind = serde_json::json!({ "spec": { "claimRef": {
        "kind": "PersistentVolumeClaim", "namespace": TENANT, "name": "claim-ref-other",
        "uid": other.metadata.uid } } });
    refused(
        pvs.patch(&own, &PatchParams::default(), &Patch::Merge(&bind))
            .await,
        "persistentvolumes",
        why,
    );
    // Its dynamic PV, re-bound to another claim.
    let pv = claim_pv_of(NODE_A, &claim);
    let name = pv.metadata.name.clone().unwrap();
    pvs.create(&pp, &pv).await.unwrap();
    refused(
        pvs.patch(&name, &PatchParams::default(), &Patch::Merge(&bind))
            .await,
        "persistentvolumes",
        why,
    );
    let admin = Api::<PersistentVolume>::all(ctx.admin.clone());
    assert!(admin
        .get_opt(&builders::pv_name(NODE_A, &volume(20).name))
        .await
        .unwrap()
        .is_none());
    let kept = admin.get(&own).await.unwrap();
    assert!(kept.spec.unwrap().claim_ref.is_none());
}
