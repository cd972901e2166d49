//! Benchmarks: publish 1000 PVs to the API-server double, and to a real kube-apiserver
//! (`--real`). Ignored in normal runs; `bench/publish.sh` runs them in release mode and
//! prints the figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/fixtures.rs"]
mod fixtures;

use fixtures::*;
use kvstrap::kube::{ClientSource, Desired, DirectoryAndBlockScrubber, PublishOptions, Publisher};
use kvstrap::model::VolumeMode;
use kvstrap::policy::types::ReclaimPolicy;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The double runs in a child process (this test binary again), so the RSS measured
/// here is the publisher's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started by publish_1000_pvs"]
async fn serve_double() {
    let Some(port_file) = std::env::var_os("KVSTRAP_DOUBLE_PORT_FILE") else {
        return;
    };
    let double = apiserver::Double::new();
    let port = double.serve(0).await;
    std::fs::write(&port_file, format!("{port}")).unwrap();
    // Bounded: the benchmark kills it long before.
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if std::fs::read_to_string(&port_file).map_or(true, |s| s == "done") {
            break;
        }
    }
    println!("double served {} PVs", double.pvs().len());
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_double(state: &std::path::Path) -> (Child, u16) {
    let port_file = state.join("port");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "serve_double", "--nocapture"])
        .env("KVSTRAP_DOUBLE_PORT_FILE", &port_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    for _ in 0..500 {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return (child, port);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the API-server double did not start");
}

async fn count_pvs(dir: &std::path::Path, port: u16) -> usize {
    let kc = kube::config::Kubeconfig::read_from(apiserver::kubeconfig(dir, port)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let api: kube::Api<k8s_openapi::api::core::v1::PersistentVolume> =
        kube::Api::all(kube::Client::try_from(config).unwrap());
    api.list(&Default::default()).await.unwrap().items.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/publish.sh"]
async fn publish_1000_pvs() {
    let state = tempfile::tempdir().unwrap();
    let (_child, port) = start_double(state.path()).await;
    let c = class(
        "kubevirt-local-nvme",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    let volumes = dir_volumes(state.path(), 1000, &c.name);
    let desired = Desired::build(NODE, &volumes, &[c]).unwrap();
    let source = ClientSource::Kubeconfig(apiserver::kubeconfig(state.path(), port));
    let options = PublishOptions {
        resync: Duration::from_secs(3600),
        ..PublishOptions::default()
    };

    let rss_before = rss_kib();
    let start = Instant::now();
    let p = Publisher::start(
        source,
        NODE,
        state.path(),
        Arc::new(DirectoryAndBlockScrubber),
        options,
    )
    .unwrap();
    p.submit(desired.clone());
    assert!(
        p.wait_for(Duration::from_secs(60), |s| s.converged()).await,
        "{:?}",
        p.status().last_error
    );
    let elapsed = start.elapsed();
    let rss_after = rss_kib();
    assert_eq!(count_pvs(state.path(), port).await, 1000);
    let growth_mib = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "BENCH publish_1000_pvs: {:.3} s, RSS {} KiB -> {} KiB (growth {:.1} MiB)",
        elapsed.as_secs_f64(),
        rss_before,
        rss_after,
        growth_mib
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "goal: under 3 s, took {elapsed:?}"
    );
    assert!(
        growth_mib < 20.0,
        "goal: under 20 MiB growth, was {growth_mib:.1} MiB"
    );
    p.shutdown().await;
}

/// The API server for the real-server benchmark: `KVSTRAP_BENCH_KUBECONFIG`, or a control
/// plane started from the test assets (tests/support/control_plane.rs).
fn real_server() -> Option<(Option<control_plane::ControlPlane>, std::path::PathBuf)> {
    if let Some(kc) = std::env::var_os("KVSTRAP_BENCH_KUBECONFIG") {
        return Some((None, kc.into()));
    }
    let cp = control_plane::start_or_skip("publish_1000_pvs_real")?;
    let kc = cp.kubeconfig.clone();
    Some((Some(cp), kc))
}

/// `apiserver_request_total` for `resource` and `verb`, read through the client.
async fn requests(client: &kube::Client, resource: &str, verb: &str) -> u64 {
    let req = http::Request::get("/metrics").body(vec![]).unwrap();
    let text = client.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            l.contains(&format!("resource=\"{resource}\""))
                && l.contains(&format!("verb=\"{verb}\""))
        })
        .filter_map(|l| {
            let v = l.rsplit(' ').next()?;
            // Integers, or floats like `1e+06` past a million.
            v.parse::<u64>()
                .ok()
                .or_else(|| format!("{:.0}", v.parse::<f64>().ok()?).parse().ok())
        })
        .sum()
}

/// 1000 PVs against a real kube-apiserver: kvstrap's first publication, the baseline of
/// `kubectl create -f` of the same List (here: one create per object, sequential, through
/// the same client: what kubectl does, minus its start-up), and a no-op pass by a fresh
/// process (goal: 0 writes, under 0.3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/publish.sh --real"]
async fn publish_1000_pvs_real() {
    let Some((_cp, kubeconfig)) = real_server() else {
        return;
    };
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let state = tempfile::tempdir().unwrap();
    let c = class(
        "kvstrap-bench",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    let volumes = dir_volumes(state.path(), 1000, &c.name);
    let pvs: kube::Api<k8s_openapi::api::core::v1::PersistentVolume> =
        kube::Api::all(client.clone());
    let cleanup = |node: &str| {
        let pvs = pvs.clone();
        let selector = kvstrap::kube::builders::node_selector(node);
        async move {
            let lp = kube::api::ListParams::default().labels(&selector);
            let _ = pvs.delete_collection(&Default::default(), &lp).await;
        }
    };
    cleanup("bench-create").await;
    cleanup("bench-kvstrap").await;

    // Baseline: the same List, created one object after the other.
    let baseline = Desired::build("bench-create", &volumes, std::slice::from_ref(&c)).unwrap();
    let start = Instant::now();
    for v in &baseline.volumes {
        pvs.create(&kube::api::PostParams::default(), &v.pv)
            .await
            .unwrap();
    }
    let create = start.elapsed();

    let desired = Desired::build("bench-kvstrap", &volumes, &[c]).unwrap();
    let applies0 = requests(&client, "persistentvolumes", "APPLY").await;
    let mut first = kvstrap::kube::reconcile::Reconciler::new(
        "bench-kvstrap",
        state.path().join("state"),
        Arc::new(DirectoryAndBlockScrubber),
        16,
    );
    let start = Instant::now();
    let report = first.pass(&client, &desired).await.unwrap();
    let publish = start.elapsed();
    assert!(report.errors.is_empty(), "{:?}", report.errors.first());
    let applies1 = requests(&client, "persistentvolumes", "APPLY").await;

    // A new process with nothing to change (`kvstrap apply` again, daemon restart).
    let mut again = kvstrap::kube::reconcile::Reconciler::new(
        "bench-kvstrap",
        state.path().join("state"),
        Arc::new(DirectoryAndBlockScrubber),
        16,
    );
    let start = Instant::now();
    let noop = again.pass(&client, &desired).await.unwrap();
    let noop_time = start.elapsed();
    let applies2 = requests(&client, "persistentvolumes", "APPLY").await;
    println!(
        "BENCH real: kubectl-create-equivalent (1000 sequential POSTs) {:.3} s; \
         kvstrap first publication {:.3} s ({} applies, {:.2}x the create baseline); \
         no-op pass {:.3} s, {} writes ({} applied)",
        create.as_secs_f64(),
        publish.as_secs_f64(),
        applies1 - applies0,
        publish.as_secs_f64() / create.as_secs_f64(),
        noop_time.as_secs_f64(),
        applies2 - applies1,
        noop.applied
    );
    cleanup("bench-create").await;
    cleanup("bench-kvstrap").await;
    assert_eq!(applies2 - applies1, 0, "goal: a no-op pass writes nothing");
    assert!(
        noop_time < Duration::from_millis(300),
        "goal: no-op pass under 0.3 s, took {noop_time:?}"
    );
}
