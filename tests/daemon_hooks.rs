//! The daemon in-process on an engine defined here: the publisher's hooks (PV changes,
//! published/removed volumes, pending count) reach the reconcile loop and the bus.
//! One test function: it sets DBUS_SYSTEM_BUS_ADDRESS for the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemon_support;

use daemon_support::*;
use futures_util::StreamExt;
use kvstrap::cli::bus_client::Client;
use kvstrap::daemon::{self, ApplySummary, Engine, EngineError, Options, Trigger};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct CountingEngine {
    applies: AtomicU32,
    pending: AtomicU32,
    /// Calls that read the node (on the real engine: a scan that opens every disk).
    reads: AtomicU32,
}

impl Engine for CountingEngine {
    fn apply(&self, _run: &kvstrap::daemon::Run<'_>) -> Result<ApplySummary, EngineError> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        Ok(ApplySummary {
            disks: 1,
            volumes: 2,
            result: "success".into(),
            ..Default::default()
        })
    }
    fn disks_json(&self) -> Result<String, EngineError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Err(EngineError::Observe("sysfs is not mounted".into()))
    }
    fn volumes_json(&self) -> Result<String, EngineError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok("{\"volumes\":[]}".into())
    }
    fn plan_json(&self) -> Result<String, EngineError> {
        Ok("{\"steps\":[]}".into())
    }
    fn reload_policy(&self) -> Result<(), String> {
        Ok(())
    }
    fn pending_publications(&self) -> u32 {
        self.pending.load(Ordering::SeqCst)
    }
}

#[test]
fn publisher_hooks_reach_the_loop_and_the_bus() {
    if !can_run("publisher_hooks_reach_the_loop_and_the_bus") {
        return;
    }
    let bus = TestBus::start();
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    std::env::set_var("KVSTRAP_LOCK", bus.dir.path().join("lock"));
    std::env::remove_var("NOTIFY_SOCKET");
    let engine = Arc::new(CountingEngine::default());
    let (handle, inbox) = daemon::channel();
    let options = Options {
        uevents: false,
        ..Options::default()
    };
    let daemon_thread = {
        let engine: Arc<dyn Engine> = engine.clone();
        let handle = handle.clone();
        std::thread::spawn(move || daemon::run(engine, &options, handle, inbox).unwrap())
    };
    assert!(eventually(Duration::from_secs(10), || engine
        .applies
        .load(Ordering::SeqCst)
        == 1));

    // Signals from the publisher's hooks, seen by a client.
    let (tx, rx) = std::sync::mpsc::channel();
    let address = bus.address.clone();
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        zbus::block_on(async {
            let client = Client::connect(Some(&address)).await.unwrap();
            let proxy = client.proxy().await.unwrap();
            let mut published = proxy.receive_volume_published().await.unwrap();
            let mut removed = proxy.receive_volume_removed().await.unwrap();
            subscribed_tx.send(()).unwrap();
            let p = published.next().await.unwrap();
            let a = p.args().unwrap();
            tx.send(("published", a.volume().to_string(), a.pv().to_string()))
                .unwrap();
            let r = removed.next().await.unwrap();
            let a = r.args().unwrap();
            tx.send(("removed", a.volume().to_string(), a.pv().to_string()))
                .unwrap();
        })
    });
    subscribed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    handle.volume_published("lab-00-001", "kvstrap-worker-07-lab-00-001");
    handle.volume_removed("lab-00-001", "kvstrap-worker-07-lab-00-001");
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("VolumePublished");
    assert_eq!(
        first,
        (
            "published",
            "lab-00-001".to_string(),
            "kvstrap-worker-07-lab-00-001".to_string()
        )
    );
    let second = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("VolumeRemoved");
    assert_eq!(second.0, "removed");

    // A PV change from the API server asks for a run.
    handle.pv_changed();
    assert!(eventually(Duration::from_secs(5), || engine
        .applies
        .load(Ordering::SeqCst)
        == 2));

    // Reads answer from the look the loop took after the last run: no caller makes the
    // engine read the node, however often it asks.
    assert!(eventually(Duration::from_secs(5), || bus
        .property("State")
        .contains("idle")));
    let before = engine.reads.load(Ordering::SeqCst);
    for _ in 0..20 {
        let volumes = bus.send_as(NOBODY, &["org.kvstrap.Bootstrap1.Volumes"]);
        assert!(
            text(&volumes).contains("inventory_time"),
            "{}",
            text(&volumes)
        );
    }
    assert_eq!(engine.reads.load(Ordering::SeqCst), before);

    // The pending count is re-read when the publisher says it changed.
    engine.pending.store(5, Ordering::SeqCst);
    handle.publications_changed();
    assert!(eventually(Duration::from_secs(5), || {
        bus.property("PendingPublications") == "uint32 5"
    }));

    // Engine errors become typed D-Bus errors with the engine's words.
    let disks = bus.send_as(0, &["org.kvstrap.Bootstrap1.Disks"]);
    assert!(
        text(&disks).contains("org.kvstrap.Bootstrap1.Error.ReadFailed"),
        "{}",
        text(&disks)
    );
    assert!(
        text(&disks).contains("sysfs is not mounted"),
        "{}",
        text(&disks)
    );

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
