//! The daemon in-process with the real publisher against the in-process API-server double:
//! every PV the publisher puts in the cluster is announced with the `VolumePublished`
//! signal on the bus. One test function: it sets DBUS_SYSTEM_BUS_ADDRESS for the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
mod daemon_support;
#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/publishing_engine.rs"]
mod publishing_engine;

use daemon_support::*;
use futures_util::StreamExt;
use kvstrap::cli::bus_client::Client;
use kvstrap::daemon::publications::KubePublications;
use kvstrap::daemon::{self, Engine, Options, Trigger};
use kvstrap::kube::{ClientSource, Desired, PublishOptions, Publisher};
use kvstrap::model::VolumeMode;
use kvstrap::policy::types::ReclaimPolicy;
use publishing_engine::PublishingEngine;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_published_volume_is_announced_on_the_bus() {
    if !can_run("a_published_volume_is_announced_on_the_bus") {
        return;
    }
    let bus = TestBus::start();
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    std::env::set_var("KVSTRAP_LOCK", bus.dir.path().join("lock"));
    std::env::remove_var("NOTIFY_SOCKET");
    let state = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let double = apiserver::Double::new();
    let port = runtime.block_on(double.serve(0));
    let source = ClientSource::Kubeconfig(apiserver::kubeconfig(state.path(), port));
    let (handle, inbox) = daemon::channel();
    let publications = {
        let _guard = runtime.enter();
        let publisher = Publisher::start(
            source.clone(),
            fixtures::NODE,
            state.path(),
            Arc::new(kvstrap::kube::DirectoryAndBlockScrubber),
            PublishOptions::default(),
        )
        .unwrap();
        KubePublications::with_publisher(state.path(), publisher, source, Some(handle.clone()))
    };
    let class = fixtures::class("local", VolumeMode::Filesystem, ReclaimPolicy::Delete);
    let volumes = fixtures::dir_volumes(state.path(), 2, "local");
    let desired = Desired::build(fixtures::NODE, &volumes, &[class]).unwrap();
    let wanted: BTreeSet<(&str, String, String)> = desired
        .volumes
        .iter()
        .map(|v| ("published", v.spec.name.clone(), v.pv_name().to_string()))
        .collect();
    let second = desired.volumes[1].clone();
    let class_only = Desired {
        volumes: vec![desired.volumes[0].clone()],
        ..desired.clone()
    };
    let engine = Arc::new(PublishingEngine::new(publications, desired));
    engine.go.store(false, Ordering::SeqCst);
    let options = Options {
        uevents: false,
        ..Options::default()
    };
    let daemon_thread = {
        let engine: Arc<dyn Engine> = engine.clone();
        let handle = handle.clone();
        std::thread::spawn(move || daemon::run(engine, &options, handle, inbox).unwrap())
    };
    assert!(eventually(Duration::from_secs(10), || {
        bus.property("State") == "string \"idle\""
    }));

    let (tx, rx) = std::sync::mpsc::channel();
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    let address = bus.address.clone();
    std::thread::spawn(move || {
        zbus::block_on(async {
            let client = Client::connect(Some(&address)).await.unwrap();
            let proxy = client.proxy().await.unwrap();
            let published = proxy.receive_volume_published().await.unwrap();
            let removed = proxy.receive_volume_removed().await.unwrap();
            subscribed_tx.send(()).unwrap();
            let published = published.map(|s| {
                let a = s.args().unwrap();
                ("published", a.volume().to_string(), a.pv().to_string())
            });
            let removed = removed.map(|s| {
                let a = s.args().unwrap();
                ("removed", a.volume().to_string(), a.pv().to_string())
            });
            let mut both = futures_util::stream::select(published, removed);
            while let Some(signal) = both.next().await {
                tx.send(signal).unwrap();
            }
        })
    });
    subscribed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // A run hands the volumes to the publisher, which applies them to the API server.
    engine.go.store(true, Ordering::SeqCst);
    handle.trigger(Trigger::Apply(None));
    let mut seen = BTreeSet::new();
    while seen.len() < wanted.len() {
        let Ok(signal) = rx.recv_timeout(Duration::from_secs(15)) else {
            break;
        };
        seen.insert(signal);
    }
    assert_eq!(seen, wanted, "VolumePublished for every PV in the cluster");
    assert_eq!(double.pvs().len(), 2);

    // Another run with nothing new announces nothing again.
    handle.trigger(Trigger::Apply(None));
    std::thread::sleep(Duration::from_secs(1));
    assert!(rx.try_recv().is_err(), "a PV is announced once");

    // The second volume goes away: its Available PV is deleted, and that is announced.
    *engine.desired.lock().unwrap() = class_only;
    handle.trigger(Trigger::Apply(None));
    let removed = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("VolumeRemoved");
    assert_eq!(
        removed,
        (
            "removed",
            second.spec.name.clone(),
            second.pv_name().to_string()
        )
    );
    assert_eq!(double.pvs().len(), 1);

    handle.trigger(Trigger::Stop);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(daemon_thread.join().unwrap()).unwrap());
    assert_eq!(
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("daemon stops"),
        0
    );
}
