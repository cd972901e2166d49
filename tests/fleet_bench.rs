//! Benchmark: a fleet of simulated nodes against one real kube-apiserver
//! (`tests/support/control_plane.rs`). Each node is the fleet watcher and the Node state
//! publisher in-process, with its own Node object, policy file and state directory.
//! Prints the time for a changed fragment to be cached (and a reload asked for) on every
//! node, and the API requests per node when nothing changes, from the apiserver's
//! `apiserver_request_total`. Ignored in normal runs; `bench/fleet.sh` runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cases.rs"]
mod cases;
#[path = "support/control_plane.rs"]
mod control_plane;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use kvstrap::kube::fleet::{Fleet, FleetConfig};
use kvstrap::kube::node_state::{NodeReport, NodeStatePublisher};
use kvstrap::kube::ClientSource;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const NS: &str = "kvstrap-bench";

fn nodes() -> usize {
    std::env::var("KVSTRAP_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn idle() -> Duration {
    let secs = std::env::var("KVSTRAP_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

#[test]
#[ignore = "benchmark: bench/fleet.sh"]
fn fleet_of_nodes_real() {
    let Some((cp, rt, client)) = cases::start("fleet_of_nodes_real") else {
        return;
    };
    rt.block_on(run(&cp, client));
}

async fn run(cp: &control_plane::ControlPlane, client: Client) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    fragment(&client, "fleet-storage").await;
    let dir = tempfile::tempdir().unwrap();
    let n = nodes();
    let mut fleet = Vec::new();
    for i in 0..n {
        fleet.push(start_node(&client, cp, dir.path(), i).await);
    }
    let started = Instant::now();
    for (f, _) in &fleet {
        assert!(
            f.wait_for(Duration::from_secs(120), |s| s.updates == 1)
                .await
        );
    }
    println!(
        "BENCH fleet: {n} nodes watching, first fragment cached on all in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // A changed fragment: the time until every node has cached it and asked to reload.
    let changed = Instant::now();
    fragment(&client, "fleet-storage-2").await;
    let mut last = Duration::ZERO;
    for (f, _) in &fleet {
        assert!(
            f.wait_for(Duration::from_secs(120), |s| s.updates == 2)
                .await
        );
        last = changed.elapsed();
    }
    println!(
        "BENCH fleet: changed fragment reached all {n} nodes in {:.2} s (debounce 300 ms)",
        last.as_secs_f64()
    );

    // Nothing changes: requests per node, from the apiserver's counters.
    let before = counts(cp);
    let window = idle();
    tokio::time::sleep(window).await;
    let after = counts(cp);
    let per_hour = |a: u64, b: u64| (b - a) as f64 / n as f64 * 3600.0 / window.as_secs_f64();
    println!(
        "BENCH fleet idle {:.0} s: per node per hour {:.1} requests ({:.1} WATCH, {:.1} LIST, {:.1} writes)",
        window.as_secs_f64(),
        per_hour(before.0, after.0),
        per_hour(before.1, after.1),
        per_hour(before.2, after.2),
        per_hour(before.3, after.3),
    );
    for (f, p) in fleet {
        f.shutdown().await;
        drop(p);
    }
}

/// (all, WATCH, LIST, writes) so far on what the nodes touch (ConfigMaps, Nodes, Events):
/// the apiserver's own lease renewals and the controller manager are not the fleet's.
fn counts(cp: &control_plane::ControlPlane) -> (u64, u64, u64, u64) {
    let sum = |verbs: &[&str]| -> u64 {
        ["configmaps", "nodes", "events"]
            .iter()
            .flat_map(|r| verbs.iter().map(move |v| (*r, *v)))
            .map(|(r, v)| cp.request_total(&[("resource", r), ("verb", v)]))
            .sum()
    };
    let writes = sum(&["POST", "PUT", "PATCH", "APPLY", "DELETE"]);
    let (watch, list) = (sum(&["WATCH"]), sum(&["LIST"]));
    (
        sum(&[
            "GET", "WATCH", "LIST", "POST", "PUT", "PATCH", "APPLY", "DELETE",
        ]),
        watch,
        list,
        writes,
    )
}

async fn fragment(client: &Client, class: &str) {
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("10-fleet".into()),
            namespace: Some(NS.into()),
            labels: Some(BTreeMap::from([(
                "kvstrap.io/policy".into(),
                String::new(),
            )])),
            annotations: Some(BTreeMap::from([(
                "kvstrap.io/node-selector".into(),
                "kvstrap.io/bench=true".into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "policy.toml".into(),
            format!("[[storage_class]]\nname = \"{class}\"\n"),
        )])),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), NS)
        .patch(
            "10-fleet",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&map),
        )
        .await
        .unwrap();
}

async fn start_node(
    client: &Client,
    cp: &control_plane::ControlPlane,
    dir: &std::path::Path,
    i: usize,
) -> (Fleet, NodeStatePublisher) {
    let name = format!("bench-{i:03}");
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([("kvstrap.io/bench".into(), "true".into())])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let site = dir.join(&name);
    std::fs::create_dir_all(site.join("state")).unwrap();
    let policy = site.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[node]\nname = \"{name}\"\n[kubernetes]\ncluster_policy = true\npolicy_namespace = \"{NS}\"\n\
             [[storage_class]]\nname = \"local\"\n[[disk_group]]\nname = \"local\"\nstorage_class = \"local\"\ndevices = [\"/dev/nvme0n1\"]\n"
        ),
    )
    .unwrap();
    let source = ClientSource::Kubeconfig(cp.kubeconfig.clone());
    let config = FleetConfig {
        node: name.clone(),
        namespace: NS.into(),
        policy_source: Some(policy),
        state_dir: site.join("state"),
        debounce: Duration::from_millis(300),
        retry: Duration::from_millis(500),
    };
    let fleet = Fleet::start(source.clone(), config, Box::new(|| {})).unwrap();
    let publisher = NodeStatePublisher::start(source, &name).unwrap();
    publisher.submit(NodeReport {
        disks_ready: 1,
        volumes_ready: 4,
        ready_disks: vec!["/dev/nvme0n1".into()],
        ..NodeReport::default()
    });
    (fleet, publisher)
}
