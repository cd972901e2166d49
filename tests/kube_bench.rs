//! Benchmark: publish 1000 PVs to the API-server double. Ignored in normal runs;
//! `bench/publish.sh` runs it in release mode and prints the figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
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
