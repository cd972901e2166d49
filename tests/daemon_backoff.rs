//! The daemon in-process with the real publisher and an API server that refuses
//! connections: runs triggered by uevents, D-Bus Apply, SIGHUP/Reload and the periodic
//! resync all provision locally, and publication keeps to its backoff whatever asked.
//! One test function: the daemon installs process-wide signal handlers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apiserver.rs"]
mod apiserver;
mod daemon_support;
#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/publishing_engine.rs"]
mod publishing_engine;

use daemon_support::refused_port;
use publishing_engine::PublishingEngine;

use kvstrap::daemon::publications::KubePublications;
use kvstrap::daemon::uevent::{Action, BlockEvent};
use kvstrap::daemon::{self, Engine, Options, Trigger};
use kvstrap::kube::{ClientSource, Desired, PublishOptions, Publisher};
use kvstrap::model::VolumeMode;
use kvstrap::policy::types::ReclaimPolicy;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn every_trigger_respects_the_publication_backoff() {
    let state = tempfile::tempdir().unwrap();
    std::env::set_var("KVSTRAP_LOCK", state.path().join("lock"));
    std::env::remove_var("NOTIFY_SOCKET");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_refusing, port) = refused_port();
    let source = ClientSource::Kubeconfig(apiserver::kubeconfig(state.path(), port));
    let options = PublishOptions {
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(800),
        ..PublishOptions::default()
    };
    let (handle, inbox) = daemon::channel();
    let publications = {
        let _guard = runtime.enter();
        let publisher = Publisher::start(
            source.clone(),
            fixtures::NODE,
            state.path(),
            Arc::new(kvstrap::kube::DirectoryAndBlockScrubber),
            options,
        )
        .unwrap();
        KubePublications::with_publisher(state.path(), publisher, source, Some(handle.clone()))
    };
    let class = fixtures::class("local", VolumeMode::Filesystem, ReclaimPolicy::Delete);
    let volumes = fixtures::dir_volumes(state.path(), 2, "local");
    let desired = Desired::build(fixtures::NODE, &volumes, &[class]).unwrap();
    let engine = Arc::new(PublishingEngine::new(publications, desired));
    let daemon_options = Options {
        uevents: false,
        dbus: false,
        // The periodic resync is a trigger too.
        resync: Duration::from_millis(300),
        settle_quiet: Duration::from_millis(10),
        settle_max: Duration::from_millis(50),
        ..Options::default()
    };
    let daemon_thread = {
        let engine: Arc<dyn Engine> = engine.clone();
        let handle = handle.clone();
        std::thread::spawn(move || daemon::run(engine, &daemon_options, handle, inbox).unwrap())
    };

    // Four seconds of device events, D-Bus Apply calls and reloads, ten a second.
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(4) {
        let t = match i % 3 {
            0 => Trigger::Uevent(BlockEvent {
                action: Action::Change,
                devname: "vdc".into(),
                devtype: "disk".into(),
            }),
            1 => Trigger::Apply(None),
            _ => Trigger::Reload(None),
        };
        handle.trigger(t);
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs = engine.applies.load(Ordering::SeqCst);
    let status = engine.publications.status().unwrap();
    handle.trigger(Trigger::Stop);
    daemon_thread.join().unwrap();

    // Local work ran on (nearly) every trigger...
    assert!(runs >= 25, "only {runs} runs");
    // ...but publication kept to its backoff: waits of at least 100, 200, 400, 400, ... ms
    // (half of 200 ms doubling to 800 ms, jittered) allow at most 11 attempts in 4 s.
    assert!(!status.connected);
    assert!(
        status.passes <= 12,
        "{} publication attempts in 4 s for {runs} runs: the backoff was bypassed",
        status.passes
    );
    assert!(status.passes >= 3, "{} attempts", status.passes);
}
