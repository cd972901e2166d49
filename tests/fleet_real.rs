//! A fleet of nodes against a real control plane (`tests/support/control_plane.rs`, one for
//! the whole file): policy fragments from ConfigMaps selected by the Node's labels, a
//! label change re-selecting, broken and destructive fragments refused with
//! `configmap/NS/NAME:line:col` while the last good policy stays cached, and the cache
//! used when the API server cannot be reached at boot. Each case has its own namespace,
//! Node name and state directory. No disks, no root.
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
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, PersistentVolume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use kvstrap::health::Assessment;
use kvstrap::kube::fleet::{Fleet, FleetConfig, FleetStatus};
use kvstrap::kube::node_state::{DiskHealth, NodeReport, NodeStatePublisher};
use kvstrap::kube::ClientSource;
use kvstrap::policy::{self, Policy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

struct Ctx<'a> {
    cp: &'a ControlPlane,
    client: Client,
}

#[test]
fn fleet_real_control_plane() {
    let Some((cp, rt, client)) = cases::start("fleet_real_control_plane") else {
        return;
    };
    let ctx = Ctx { cp: &cp, client };
    let cases: &[(&str, cases::Case<Ctx<'_>>)] = &[
        (
            "fragments_selected_by_labels_and_reselected_on_label_change",
            |c| selected_by_labels(c).boxed(),
        ),
        ("broken_fragment_refused_last_good_stays", |c| {
            broken_refused(c).boxed()
        }),
        ("wipe_from_the_cluster_refused", |c| wipe_refused(c).boxed()),
        ("node_only_keys_from_the_cluster_refused", |c| {
            node_only_refused(c).boxed()
        }),
        ("cache_used_when_the_api_is_down_at_boot", |c| {
            cache_at_boot(c).boxed()
        }),
        (
            "validate_cluster_checks_fragments_before_any_node_acts",
            |c| validate_cluster(c).boxed(),
        ),
        ("condition_label_and_events_visible_with_kubectl", |c| {
            node_state_visible(c).boxed()
        }),
        ("disk_health_condition_and_events_follow_each_change", |c| {
            disk_health(c).boxed()
        }),
        // Last: it changes the cluster's RBAC rules.
        (
            "works_with_exactly_the_shipped_rbac_and_names_a_missing_rule",
            |c| rbac(c).boxed(),
        ),
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

// ---- helpers ----------------------------------------------------------------------------

/// One simulated node: its Node object, namespace of fragments, own policy and state.
struct Site {
    node: String,
    namespace: String,
    dir: tempfile::TempDir,
    changes: Arc<AtomicU64>,
}

impl Site {
    async fn new(ctx: &Ctx<'_>, name: &str, labels: &[(&str, &str)]) -> Site {
        let site = Site {
            node: format!("fleet-{name}"),
            namespace: format!("fleet-{name}"),
            dir: tempfile::tempdir().unwrap(),
            changes: Arc::default(),
        };
        let ns = Namespace {
            metadata: meta(&site.namespace, &[]),
            ..Namespace::default()
        };
        Api::<Namespace>::all(ctx.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let node = Node {
            metadata: meta(&site.node, labels),
            ..Node::default()
        };
        Api::<Node>::all(ctx.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        std::fs::create_dir_all(site.state()).unwrap();
        std::fs::write(site.policy(), site.own_policy("")).unwrap();
        site
    }

    /// The node's own file: cluster policy on, one class and group of its own.
    fn own_policy(&self, extra: &str) -> String {
        format!(
            r#"[node]
name = "{node}"
[kubernetes]
cluster_policy = true
policy_namespace = "{ns}"
{extra}
[[storage_class]]
name = "local"
[[disk_group]]
name = "local"
storage_class = "local"
devices = ["/dev/nvme0n1"]
"#,
            node = self.node,
            ns = self.namespace
        )
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self, kubeconfig: &Path) -> Fleet {
        let config = FleetConfig {
            node: self.node.clone(),
            namespace: self.namespace.clone(),
            policy_source: Some(self.policy()),
            state_dir: self.state(),
            debounce: Duration::from_millis(300),
            retry: Duration::from_millis(200),
        };
        let changes = self.changes.clone();
        let on_change = Box::new(move || {
            changes.fetch_add(1, Ordering::SeqCst);
        });
        Fleet::start(
            ClientSource::Kubeconfig(kubeconfig.to_path_buf()),
            config,
            on_change,
        )
        .unwrap()
    }

    /// The policy the node's loader sees now (its files and the cache).
    fn loaded(&self) -> Policy {
        policy::load_with_cluster(Some(&self.policy()), &self.state())
            .unwrap_or_else(|e| panic!("the node's policy does not load:\n{}", e.report()))
    }

    async fn fragment(&self, ctx: &Ctx<'_>, name: &str, selector: Option<&str>, toml: &str) {
        let mut metadata = meta(name, &[("kvstrap.io/policy", "")]);
        metadata.namespace = Some(self.namespace.clone());
        metadata.annotations = selector
            .map(|s| BTreeMap::from([("kvstrap.io/node-selector".to_string(), s.to_string())]));
        let map = ConfigMap {
            metadata,
            data: Some(BTreeMap::from([(
                "policy.toml".to_string(),
                toml.to_string(),
            )])),
            ..ConfigMap::default()
        };
        Api::<ConfigMap>::namespaced(ctx.client.clone(), &self.namespace)
            .patch(
                name,
                &PatchParams::apply("fleet-test").force(),
                &Patch::Apply(&map),
            )
            .await
            .unwrap();
    }

    async fn label(&self, ctx: &Ctx<'_>, key: &str, value: &str) {
        let patch = serde_json::json!({ "metadata": { "labels": { key: value } } });
        Api::<Node>::all(ctx.client.clone())
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

fn class_named(name: &str) -> String {
    format!("[[storage_class]]\nname = \"{name}\"\n")
}

fn classes(p: &Policy) -> Vec<String> {
    p.storage_classes.iter().map(|c| c.name.clone()).collect()
}

async fn wait(fleet: &Fleet, what: &str, pred: impl Fn(&FleetStatus) -> bool) {
    assert!(
        fleet.wait_for(WAIT, pred).await,
        "{what}: not within {WAIT:?}; status: {:?}",
        fleet.status()
    );
}

fn sources_are(s: &FleetStatus, ns: &str, names: &[&str]) -> bool {
    let want: Vec<String> = names
        .iter()
        .map(|n| format!("configmap/{ns}/{n}"))
        .collect();
    s.sources == want
}

// ---- cases ------------------------------------------------------------------------------

async fn selected_by_labels(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "select", &[("hw", "gpu")]).await;
    site.fragment(ctx, "10-all", None, &class_named("all-nodes"))
        .await;
    site.fragment(ctx, "20-gpu", Some("hw=gpu"), &class_named("gpu"))
        .await;
    site.fragment(
        ctx,
        "30-nvme",
        Some("hw in (nvme,ssd),!maintenance"),
        &class_named("nvme"),
    )
    .await;
    let fleet = site.start(&ctx.cp.kubeconfig);
    let ns = site.namespace.clone();
    wait(&fleet, "gpu fragments", |s| {
        sources_are(s, &ns, &["10-all", "20-gpu"])
    })
    .await;
    assert_eq!(classes(&site.loaded()), ["all-nodes", "gpu", "local"]);
    let sources: Vec<String> = site
        .loaded()
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        sources[..2],
        [
            format!("configmap/{ns}/10-all"),
            format!("configmap/{ns}/20-gpu")
        ]
    );
    assert_eq!(site.changes.load(Ordering::SeqCst), 1);
    // `kvstrap plan` names the same sources, in both formats.
    let (ok, stdout, stderr) = kvstrap(&site, &["plan"]);
    assert!(ok, "{stderr}");
    let read_from = stdout
        .lines()
        .find(|l| l.starts_with("policy read from: "))
        .unwrap_or_else(|| panic!("no sources in the plan: {stdout}"));
    assert!(
        read_from.contains(&format!("configmap/{ns}/10-all, configmap/{ns}/20-gpu, ")),
        "{read_from}"
    );
    let (ok, stdout, stderr) = kvstrap(&site, &["plan", "--output", "json"]);
    assert!(ok, "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["sources"], serde_json::json!(sources), "{stdout}");

    // A label change re-selects.
    let started = Instant::now();
    site.label(ctx, "hw", "nvme").await;
    wait(&fleet, "nvme fragments", |s| {
        sources_are(s, &ns, &["10-all", "30-nvme"])
    })
    .await;
    eprintln!(
        "label change to new cache: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(classes(&site.loaded()), ["all-nodes", "nvme", "local"]);
    assert_eq!(site.changes.load(Ordering::SeqCst), 2);

    // A changed fragment is picked up; an unrelated label changes nothing.
    site.fragment(ctx, "10-all", None, &class_named("everyone"))
        .await;
    wait(&fleet, "changed fragment", |s| s.updates == 3).await;
    assert_eq!(classes(&site.loaded()), ["everyone", "nvme", "local"]);
    site.label(ctx, "rack", "r7").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        site.changes.load(Ordering::SeqCst),
        3,
        "{:?}",
        fleet.status()
    );
    fleet.shutdown().await;
}

async fn broken_refused(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "broken", &[("hw", "gpu")]).await;
    site.fragment(ctx, "gpu-nodes", Some("hw=gpu"), &class_named("gpu"))
        .await;
    let fleet = site.start(&ctx.cp.kubeconfig);
    let ns = site.namespace.clone();
    wait(&fleet, "good fragment", |s| {
        sources_are(s, &ns, &["gpu-nodes"])
    })
    .await;
    let good = site.loaded();

    let broken = "[[storage_class]]\nname = \"gpu\"\n\n[[disk_group]]\nname = \"local\"\nreserve = \"95%\"\n";
    site.fragment(ctx, "gpu-nodes", Some("hw=gpu"), broken)
        .await;
    wait(&fleet, "refusal", |s| !s.refused.is_empty()).await;
    let refused: Vec<String> = fleet
        .status()
        .refused
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        refused[0].starts_with(&format!(
            "configmap/{ns}/gpu-nodes:6:11: error: reserve: 95% is more than 90%"
        )),
        "{refused:?}"
    );
    // The last good policy stays in force, and nothing asked for a reload.
    assert_eq!(site.loaded(), good);
    assert_eq!(site.changes.load(Ordering::SeqCst), 1);

    // A selector that does not parse refuses the fragment, named.
    site.fragment(ctx, "gpu-nodes", Some("hw in gpu"), &class_named("gpu"))
        .await;
    wait(&fleet, "selector refusal", |s| s.refusals == 2).await;
    let refused = fleet.status().refused[0].to_string();
    assert!(
        refused.starts_with(&format!(
            "configmap/{ns}/gpu-nodes: error: annotation kvstrap.io/node-selector"
        )),
        "{refused}"
    );
    assert_eq!(site.loaded(), good);
    // Each refusal is an Event on the Node.
    let events = poll(|| {
        let out = kubectl(
            ctx.cp,
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!(
                    "involvedObject.name={},reason=PolicyFragmentRefused",
                    site.node
                ),
                "-o",
                "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
            ],
        );
        (out.lines().count() == 2).then_some(out)
    })
    .await;
    assert!(
        events.contains(&format!(
            "configmap/{ns}/gpu-nodes:6:11: error: reserve: 95% is more than 90%"
        )),
        "{events}"
    );

    // Fixed: taken.
    site.fragment(ctx, "gpu-nodes", Some("hw=gpu"), &class_named("gpu-2"))
        .await;
    wait(&fleet, "fixed", |s| s.refused.is_empty() && s.updates == 2).await;
    assert_eq!(classes(&site.loaded()), ["gpu-2", "local"]);
    fleet.shutdown().await;
}

async fn wipe_refused(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "wipe", &[]).await;
    let wipe = "[[disk_group]]\nname = \"local\"\nwipe = \"force\"\n";
    site.fragment(ctx, "wipe-everything", None, wipe).await;
    let fleet = site.start(&ctx.cp.kubeconfig);
    wait(&fleet, "refusal", |s| !s.refused.is_empty()).await;
    let refused = fleet.status().refused[0].to_string();
    assert!(
        refused.starts_with(&format!(
            "configmap/{}/wipe-everything:3:8: error: disk group \"local\": a policy fragment from the cluster may not set wipe = \"force\"",
            site.namespace
        )),
        "{refused}"
    );
    assert!(fleet.status().sources.is_empty());
    assert!(
        !policy::cluster::cache_path(&site.state()).exists(),
        "nothing cached"
    );
    assert_eq!(site.loaded().sources.len(), 1, "the node's own file only");
    fleet.shutdown().await;
}

/// The allow-list against the real API server: a fragment that reaches for the node's own
/// keys (the metrics file path, the node's name) is refused whole, the key named in the
/// watcher's status and in the `PolicyFragmentRefused` Event; its storage class, fine on
/// its own, is not taken either.
async fn node_only_refused(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "nodeonly", &[]).await;
    let text = format!(
        "[metrics]\ntextfile = \"/etc/shadow\"\n[node]\nname = \"other-node\"\n{}",
        class_named("sneaky")
    );
    site.fragment(ctx, "takeover", None, &text).await;
    let fleet = site.start(&ctx.cp.kubeconfig);
    wait(&fleet, "refusal", |s| !s.refused.is_empty()).await;
    let refused: Vec<String> = fleet
        .status()
        .refused
        .iter()
        .map(ToString::to_string)
        .collect();
    let ns = site.namespace.clone();
    for (at, key) in [("2:1", "[metrics] textfile"), ("4:1", "[node] name")] {
        let want = format!("configmap/{ns}/takeover:{at}: error: a policy fragment from the cluster may not set {key}");
        assert!(
            refused.iter().any(|r| r.starts_with(&want)),
            "{want}\n{refused:#?}"
        );
    }
    assert_eq!(site.loaded().sources.len(), 1, "the node's own file only");
    assert_eq!(classes(&site.loaded()), ["local"]);
    assert!(
        !policy::cluster::cache_path(&site.state()).exists(),
        "nothing cached"
    );
    let events = poll(|| {
        let out = kubectl(
            ctx.cp,
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!(
                    "involvedObject.name={},reason=PolicyFragmentRefused",
                    site.node
                ),
                "-o",
                "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
            ],
        );
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(
        events.contains("may not set [metrics] textfile"),
        "{events}"
    );
    fleet.shutdown().await;
}

async fn cache_at_boot(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "boot", &[("hw", "gpu")]).await;
    site.fragment(ctx, "gpu", Some("hw=gpu"), &class_named("gpu"))
        .await;
    let fleet = site.start(&ctx.cp.kubeconfig);
    let ns = site.namespace.clone();
    wait(&fleet, "cached", |s| sources_are(s, &ns, &["gpu"])).await;
    fleet.shutdown().await;
    let before = site.loaded();

    // "Reboot" with no API server to reach: a kubeconfig naming a port nobody listens on.
    let unreachable = site.dir.path().join("unreachable.kubeconfig");
    let text = std::fs::read_to_string(&ctx.cp.kubeconfig)
        .unwrap()
        .replace(
            &format!(":{}", ctx.cp.secure_port),
            &format!(":{}", control_plane::free_port()),
        );
    std::fs::write(&unreachable, text).unwrap();
    let fleet = site.start(&unreachable);
    wait(&fleet, "error reported", |s| s.error.is_some()).await;
    assert_eq!(site.loaded(), before, "the cached cluster layer applies");
    assert_eq!(classes(&before), ["gpu", "local"]);
    assert_eq!(fleet.status().sources, [format!("configmap/{ns}/gpu")]);
    fleet.shutdown().await;
}

async fn node_state_visible(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "state", &[]).await;
    let source = ClientSource::Kubeconfig(ctx.cp.kubeconfig.clone());
    let publisher = NodeStatePublisher::start(source, &site.node).unwrap();
    publisher.submit(NodeReport {
        disks_ready: 1,
        volumes_ready: 3,
        ready_disks: vec!["/dev/nvme0n1".into()],
        refused: vec![("/dev/sdb".into(), "not empty: ext4".into())],
        sources: vec![
            "/etc/kvstrap/policy.toml".into(),
            "configmap/kvstrap/gpu".into(),
        ],
        io_class: Some(kvstrap::model::IoClass::Fast),
        ..NodeReport::default()
    });
    let jsonpath = "jsonpath={.status.conditions[?(@.type==\"KvstrapStorageReady\")].status} {.status.conditions[?(@.type==\"KvstrapStorageReady\")].reason} {.metadata.labels.kvstrap\\.io/storage-ready} {.metadata.labels.kvstrap\\.io/io-class}";
    let node = format!("node/{}", site.node);
    let seen = poll(|| {
        let out = kubectl(ctx.cp, &["get", &node, "-o", jsonpath]);
        (out == "True DisksRefused true fast").then_some(out)
    })
    .await;
    assert_eq!(seen, "True DisksRefused true fast");
    let message = kubectl(
        ctx.cp,
        &[
            "get",
            &node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"KvstrapStorageReady\")].message}",
        ],
    );
    assert_eq!(
        message,
        "1 disk(s) ready, 3 volume(s) ready; refused: /dev/sdb (not empty: ext4)"
    );
    let reasons = |ctx: &Ctx<'_>| {
        kubectl(
            ctx.cp,
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("involvedObject.name={}", site.node),
                "-o",
                "jsonpath={range .items[*]}{.reason}{\" \"}{end}",
            ],
        )
    };
    poll(|| {
        let r = reasons(ctx);
        (r.contains("DiskProvisioned") && r.contains("DiskRefused")).then_some(r)
    })
    .await;
    // `kvstrap cluster status` shows the node's line.
    let kubeconfig = ctx.cp.kubeconfig.display().to_string();
    let (ok, stdout, stderr) = kvstrap(&site, &["cluster", "status", "--kubeconfig", &kubeconfig]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&site.node))
        .unwrap_or_default();
    for part in [
        "True",
        "DisksRefused",
        "/dev/sdb (not empty: ext4)",
        "configmap/kvstrap/gpu",
    ] {
        assert!(line.contains(part), "{part} not in {line:?}:\n{stdout}");
    }
    let (ok, stdout, _) = kvstrap(
        &site,
        &[
            "--output",
            "json",
            "cluster",
            "status",
            "--kubeconfig",
            &kubeconfig,
        ],
    );
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == site.node.as_str())
        .cloned()
        .unwrap();
    assert_eq!(row["disks_ready"], 1);
    assert_eq!(row["ready"], "True");

    // A failed step: False, the label follows, one StepFailed Event.
    publisher.submit(NodeReport {
        failed: vec![(
            "/dev/nvme0n1".into(),
            "mkfs.xfs exited with status 1".into(),
        )],
        ..NodeReport::default()
    });
    poll(|| {
        let out = kubectl(ctx.cp, &["get", &node, "-o", jsonpath]);
        (out == "False StepFailed false").then_some(out)
    })
    .await;
    poll(|| reasons(ctx).contains("StepFailed").then_some(())).await;
    // The same report again sends nothing new (no second Event of the same name).
    let writes = ctx.cp.writes("nodes");
    publisher.submit(NodeReport {
        failed: vec![(
            "/dev/nvme0n1".into(),
            "mkfs.xfs exited with status 1".into(),
        )],
        ..NodeReport::default()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ctx.cp.writes("nodes"),
        writes,
        "an unchanged report patches nothing"
    );
}

/// The disk health of a report reaches the Node as the condition KvstrapDisksHealthy
/// and one Event per change, as the daemon hands its health readings to the publisher;
/// an unchanged reading sends nothing.
async fn disk_health(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "health", &[]).await;
    let source = ClientSource::Kubeconfig(ctx.cp.kubeconfig.clone());
    let publisher = NodeStatePublisher::start(source, &site.node).unwrap();
    let reading = |a: Assessment, detail: &str| {
        vec![
            DiskHealth {
                disk: "/dev/sda".into(),
                assessment: Assessment::Passed,
                detail: String::new(),
            },
            DiskHealth {
                disk: "/dev/sdb".into(),
                assessment: a,
                detail: detail.into(),
            },
        ]
    };
    let failing = "SMART overall-health self-assessment: FAILED";
    let report = NodeReport {
        disks_ready: 2,
        volumes_ready: 2,
        health: reading(Assessment::Failed, failing),
        ..NodeReport::default()
    };
    publisher.submit(report.clone());
    let node = format!("node/{}", site.node);
    let condition = |ctx: &Ctx<'_>| {
        let c = "{.status.conditions[?(@.type==\"KvstrapDisksHealthy\")]";
        let path = format!("jsonpath={c}.status}} {c}.reason}}|{c}.message}}");
        kubectl(ctx.cp, &["get", &node, "-o", &path])
    };
    let seen = poll(|| {
        let out = condition(ctx);
        out.starts_with("False DiskFailed").then_some(out)
    })
    .await;
    assert_eq!(
        seen,
        format!("False DiskFailed|failed: /dev/sdb ({failing}); 1 disk(s) healthy")
    );
    let storage = kubectl(
        ctx.cp,
        &[
            "get",
            &node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"KvstrapStorageReady\")].status}",
        ],
    );
    assert_eq!(storage, "True", "a failing disk may still be ready");
    let events = |ctx: &Ctx<'_>| {
        kubectl(
            ctx.cp,
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("involvedObject.name={}", site.node),
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason}: {.message}{\"\\n\"}{end}",
            ],
        )
    };
    let failed_event = format!("Warning DiskFailed: disk /dev/sdb is failing: {failing}");
    poll(|| events(ctx).contains(&failed_event).then_some(())).await;

    // The same reading again, as a new health reading and with the next run: nothing new.
    let (nodes, posted) = (ctx.cp.writes("nodes"), ctx.cp.writes("events"));
    assert!(posted > 0, "the counter sees the Events posted");
    publisher.health(reading(Assessment::Failed, failing));
    publisher.submit(report.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ctx.cp.writes("nodes"),
        nodes,
        "an unchanged reading patches nothing"
    );
    assert_eq!(
        ctx.cp.writes("events"),
        posted,
        "an unchanged reading posts nothing"
    );

    // Recovered, between runs: True and one DiskHealthy Event; the storage side untouched.
    publisher.health(reading(Assessment::Passed, ""));
    let seen = poll(|| {
        let out = condition(ctx);
        out.starts_with("True").then_some(out)
    })
    .await;
    assert_eq!(seen, "True DisksHealthy|2 disk(s) healthy");
    let healthy_event = "Normal DiskHealthy: disk /dev/sdb passes its health check again";
    poll(|| events(ctx).contains(healthy_event).then_some(())).await;
    let all = events(ctx);
    assert_eq!(all.matches("DiskFailed").count(), 1, "{all}");
    assert_eq!(all.matches("DiskHealthy").count(), 1, "{all}");
    assert_eq!(
        ctx.cp.writes("nodes"),
        nodes + 1,
        "only the health condition is patched"
    );

    // Health cannot be read at all (loop disks): Unknown.
    let unread = "smartctl cannot read the device: /dev/loop0: Unable to detect device type";
    publisher.health(vec![DiskHealth {
        disk: "/dev/loop0".into(),
        assessment: Assessment::Unknown,
        detail: unread.into(),
    }]);
    let seen = poll(|| {
        let out = condition(ctx);
        out.starts_with("Unknown").then_some(out)
    })
    .await;
    assert_eq!(
        seen,
        format!("Unknown HealthUnknown|health unknown: /dev/loop0 ({unread})")
    );
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

/// Polls `f` every 200 ms until it gives a value, for at most [`WAIT`].
async fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn validate_cluster(ctx: &Ctx<'_>) {
    let site = Site::new(ctx, "validate", &[("hw", "gpu")]).await;
    let kubeconfig = format!("kubeconfig = \"{}\"", ctx.cp.kubeconfig.display());
    std::fs::write(site.policy(), site.own_policy(&kubeconfig)).unwrap();
    site.fragment(ctx, "gpu", Some("hw=gpu"), &class_named("gpu"))
        .await;
    site.fragment(ctx, "nvme", Some("hw=nvme"), &class_named("nvme"))
        .await;
    let ns = site.namespace.clone();
    let (ok, stdout, stderr) = kvstrap(&site, &["validate", "--cluster"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "2 fragment(s) in namespace {ns}, selected: configmap/{ns}/gpu"
        )),
        "{stderr}"
    );
    assert!(stdout.contains(&format!("configmap/{ns}/gpu")), "{stdout}");
    assert!(!stdout.contains("nvme"), "{stdout}");

    site.fragment(
        ctx,
        "gpu",
        Some("hw=gpu"),
        "[[disk_group]]\nname = \"local\"\nwipe = \"force\"\n",
    )
    .await;
    let (ok, _, stderr) = kvstrap(&site, &["validate", "--cluster"]);
    assert!(!ok);
    assert!(stderr.contains(&format!("configmap/{ns}/gpu:3:8: error: disk group \"local\": a policy fragment from the cluster may not set wipe = \"force\"")), "{stderr}");
    assert!(
        !policy::cluster::cache_path(&site.state()).exists(),
        "validate caches nothing"
    );
}

/// Runs the kvstrap binary with the site's policy and state directory.
fn kvstrap(site: &Site, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvstrap"))
        .arg("--policy")
        .arg(site.policy())
        .arg("--state-dir")
        .arg(site.state())
        .args(args)
        .output()
        .expect("kvstrap runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn rbac(ctx: &Ctx<'_>) {
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes");
    let rules = packaging.join("rbac.yaml").display().to_string();
    kubectl(ctx.cp, &["apply", "-f", &rules]);
    // And the admission policy that confines each node to its own objects
    // (tests/confine_real.rs shows what it refuses): the daemon's work passes it.
    let confinement = packaging.join("admission-policy.yaml");
    kubectl(ctx.cp, &["apply", "-f", &confinement.display().to_string()]);
    let node = "fleet-rbac";
    Api::<Node>::all(ctx.client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: meta(node, &[("hw", "gpu")]),
                ..Node::default()
            },
        )
        .await
        .unwrap();
    let site = Site {
        node: node.into(),
        namespace: "kvstrap".into(),
        dir: tempfile::tempdir().unwrap(),
        changes: Arc::default(),
    };
    std::fs::create_dir_all(site.state()).unwrap();
    std::fs::write(site.policy(), site.own_policy("")).unwrap();
    // The node's identity: a user in the group the shipped rules bind (impersonated by
    // the test's admin credential, as a per-node certificate would authenticate it).
    let kubeconfig = site.dir.path().join("node.kubeconfig");
    let admin = std::fs::read_to_string(&ctx.cp.kubeconfig).unwrap();
    let as_node = admin.replace(
        "    token: ",
        &format!("    as: kvstrap:node:{node}\n    as-groups: [\"kvstrap:nodes\"]\n    token: "),
    );
    assert_ne!(admin, as_node, "the admin kubeconfig has a token line");
    std::fs::write(&kubeconfig, as_node).unwrap();
    let source = ClientSource::Kubeconfig(kubeconfig.clone());
    let node_client = source.client().await.unwrap();
    policy_in_force(&node_client).await;

    // Policy fragments: list and watch ConfigMaps of kvstrap, the Node's labels.
    site.fragment(ctx, "rbac-gpu", Some("hw=gpu"), &class_named("rbac-gpu"))
        .await;
    let fleet = site.start(&kubeconfig);
    wait(&fleet, "fragment", |s| {
        sources_are(s, "kvstrap", &["rbac-gpu"])
    })
    .await;
    assert_eq!(fleet.status().error, None);

    // Condition, label, Events.
    let report = NodeReport {
        disks_ready: 1,
        volumes_ready: 1,
        ready_disks: vec!["/dev/nvme0n1".into()],
        refused: vec![("/dev/sdb".into(), "not empty: xfs".into())],
        ..NodeReport::default()
    };
    kvstrap::kube::node_state::NodeState::default()
        .publish(&node_client, node, &report)
        .await
        .unwrap();

    // Publication: StorageClass and PV by server-side apply, the PV watch.
    let class = fixtures::class(
        "kvstrap-rbac",
        kvstrap::model::VolumeMode::Filesystem,
        kvstrap::policy::types::ReclaimPolicy::Delete,
    );
    let volumes = fixtures::dir_volumes(&site.dir.path().join("storage"), 1, &class.name);
    for v in &volumes {
        std::fs::create_dir_all(&v.path).unwrap();
    }
    let desired =
        kvstrap::kube::Desired::build(node, &volumes, std::slice::from_ref(&class)).unwrap();
    let mut reconciler = kvstrap::kube::reconcile::Reconciler::new(
        node,
        site.state(),
        Arc::new(kvstrap::kube::DirectoryAndBlockScrubber),
        4,
    );
    let pass = reconciler.pass(&node_client, &desired).await.unwrap();
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);

    // A rule missing: the answer names it.
    kubectl(
        ctx.cp,
        &[
            "patch",
            "clusterrole",
            "kvstrap-node",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/rules/3"}]"#,
        ],
    );
    let started = Instant::now();
    let refused = loop {
        let mut fresh = kvstrap::kube::node_state::NodeState::default();
        match fresh.publish(&node_client, node, &report).await {
            Err(e) => break e,
            Ok(()) => assert!(
                started.elapsed() < WAIT,
                "the rule removal never took effect"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.contains("403"), "{refused}");
    assert!(refused.contains("nodes/status"), "{refused}");
    assert!(
        refused.contains(&format!(
            "cannot patch the KvstrapStorageReady condition of Node {node}"
        )),
        "{refused}"
    );
    kubectl(
        ctx.cp,
        &["delete", "role", "-n", "kvstrap", "kvstrap-policy-reader"],
    );
    fleet.shutdown().await;
    let fleet = site.start(&kubeconfig);
    wait(&fleet, "403 on the ConfigMaps", |s| {
        s.error.as_deref().is_some_and(|e| e.contains("403"))
    })
    .await;
    let error = fleet.status().error.unwrap();
    assert!(error.contains("configmaps"), "{error}");
    // The condition names it too, as the daemon wires it (daemon::fleet): the watcher's
    // error forwarded to the Node state publisher (the admin's credential: nodes/status
    // is still missing from the node's rules here).
    let publisher =
        NodeStatePublisher::start(ClientSource::Kubeconfig(ctx.cp.kubeconfig.clone()), node)
            .unwrap();
    let forwarded = Arc::new(publisher);
    let sink = Arc::clone(&forwarded);
    fleet.forward_errors(Box::new(move |e| sink.policy_error(e)));
    forwarded.submit(report.clone());
    let message = poll(|| {
        let out = kubectl(
            ctx.cp,
            &[
                "get",
                "node",
                node,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"KvstrapStorageReady\")].message}",
            ],
        );
        out.contains("policy from the cluster not read")
            .then_some(out)
    })
    .await;
    assert!(message.contains("403"), "{message}");
    assert!(message.contains("configmaps"), "{message}");
    assert!(message.contains("1 disk(s) ready"), "{message}");
    fleet.shutdown().await;
    kubectl(ctx.cp, &["apply", "-f", &rules]);
}

/// Waits until the API server enforces the admission policy (it loads policies
/// asynchronously): a dry-run PV of another node, as `client`'s node, is refused by it.
async fn policy_in_force(client: &Client) {
    let class = fixtures::class(
        "kvstrap-rbac",
        kvstrap::model::VolumeMode::Filesystem,
        kvstrap::policy::types::ReclaimPolicy::Delete,
    );
    let volume = fixtures::dir_volume(Path::new("/probe"), 1, &class.name);
    let other = kvstrap::kube::builders::persistent_volume("fleet-other", &volume, &class);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let start = Instant::now();
    loop {
        match Api::<PersistentVolume>::all(client.clone())
            .create(&dry, &other)
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("ValidatingAdmissionPolicy") => return,
            _ => assert!(
                start.elapsed() < WAIT,
                "the admission policy is not in force after {WAIT:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
