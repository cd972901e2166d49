//! The background publisher: takes the desired objects, keeps applying them to the API
//! server with server-side apply, and retries with capped, jittered exponential backoff.
//! `submit` never waits for the network, so local provisioning and READY never do.

use super::builders::node_selector;
use super::client::{describe, ClientSource, PublishError};
use super::reconcile::{PassReport, Reconciler, VolumePublication};
use super::scrub::{Ledger, Scrubber};
use super::Desired;
use crate::model::VolumeSpec;
use ::kube::api::{Api, ListParams, WatchEvent, WatchParams};
use ::kube::Client;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolume;
use serde::Serialize;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Tuning; the defaults suit production, tests shorten the times.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Full pass even without any change seen.
    pub resync: Duration,
    /// Quiet time after a watch event before a pass, so a burst makes one pass.
    pub debounce: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            concurrency: 16,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            debounce: Duration::from_millis(250),
        }
    }
}

/// What the publisher reports in `kvstrap status` and over D-Bus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublishStatus {
    /// Objects not yet confirmed in the cluster ("N pending").
    pub pending: usize,
    /// The last pass reached the API server.
    pub connected: bool,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Passes that did not publish everything, since the publisher started.
    pub failed_passes: u64,
    /// When the next attempt is due after a failure.
    pub retry_in: Option<Duration>,
    /// Passes completed, successful or not.
    pub passes: u64,
    /// The `submit` generation the last clean pass published (0: none yet).
    pub published_generation: u64,
    /// Generation of the latest `submit`.
    pub submitted_generation: u64,
    /// Per volume name.
    pub volumes: BTreeMap<String, VolumePublication>,
    /// Summary of the last pass.
    pub last_pass: Option<PassSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PassSummary {
    pub applied: usize,
    pub deleted: Vec<String>,
    pub scrubbed: Vec<String>,
    pub kept: Vec<String>,
    pub retained: Vec<String>,
    /// Per draining disk: the PVs still holding it.
    pub draining: BTreeMap<String, Vec<super::reconcile::DrainBlocker>>,
}

impl PublishStatus {
    /// True when everything submitted last is in the cluster.
    pub fn converged(&self) -> bool {
        self.submitted_generation > 0
            && self.published_generation == self.submitted_generation
            && self.pending == 0
    }
}

/// Handle of the background publisher task.
pub struct Publisher {
    desired: watch::Sender<(u64, Option<Arc<Desired>>)>,
    status: watch::Receiver<PublishStatus>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts the background task (needs a tokio runtime). Nothing is published before
    /// the first `submit`.
    pub fn start(
        source: ClientSource,
        node: &str,
        state_dir: &Path,
        scrubber: Arc<dyn Scrubber>,
        options: PublishOptions,
    ) -> Result<Publisher, PublishError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| PublishError::NoRuntime)?;
        let (desired_tx, desired_rx) = watch::channel((0, None));
        let (status_tx, status_rx) = watch::channel(PublishStatus::default());
        let stop = Arc::new(Notify::new());
        let reconciler =
            Reconciler::new(node, state_dir.to_path_buf(), scrubber, options.concurrency);
        let worker = Worker {
            source,
            options,
            reconciler,
            desired: desired_rx,
            status: status_tx,
            stop: stop.clone(),
        };
        let task = handle.spawn(worker.run());
        Ok(Publisher {
            desired: desired_tx,
            status: status_rx,
            stop,
            task,
        })
    }

    /// Hands over what should be published now; returns at once.
    pub fn submit(&self, desired: Desired) {
        let objects = desired.volumes.len() + desired.storage_classes.len();
        self.desired.send_modify(|(generation, d)| {
            *generation += 1;
            *d = Some(Arc::new(desired));
        });
        let generation = self.desired.borrow().0;
        tracing::debug!(
            generation,
            objects,
            "desired objects submitted for publication"
        );
    }

    pub fn status(&self) -> PublishStatus {
        self.with_generation(&self.status.borrow())
    }

    /// The worker may not have seen the latest submit yet: the generation comes from here.
    fn with_generation(&self, s: &PublishStatus) -> PublishStatus {
        let mut s = s.clone();
        s.submitted_generation = self.desired.borrow().0;
        s
    }

    /// Waits until `pred` holds for the status, or `timeout` passes; returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&PublishStatus) -> bool) -> bool {
        let mut rx = self.status.clone();
        let check = |s: &PublishStatus| pred(&self.with_generation(s));
        tokio::time::timeout(timeout, async move { rx.wait_for(check).await.is_ok() })
            .await
            .unwrap_or(false)
    }

    /// Stops the task after the request in flight.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

struct Worker {
    source: ClientSource,
    options: PublishOptions,
    reconciler: Reconciler,
    desired: watch::Receiver<(u64, Option<Arc<Desired>>)>,
    status: watch::Sender<PublishStatus>,
    stop: Arc<Notify>,
}

/// Why the worker woke up.
enum Wake {
    Work,
    Stop,
}

impl Worker {
    async fn run(mut self) {
        let kick = Arc::new(Notify::new());
        let mut client: Option<Client> = None;
        let mut watcher: Option<JoinHandle<()>> = None;
        let mut failures: u32 = 0;
        // Nothing to do before the first submit.
        if let Wake::Stop = self.next_change().await {
            return;
        }
        loop {
            let (generation, desired) = self.desired.borrow_and_update().clone();
            let Some(desired) = desired else { continue };
            let result = match &client {
                Some(c) => self
                    .reconciler
                    .pass(c, &desired)
                    .await
                    .map_err(|e| e.to_string()),
                None => match self.source.client().await {
                    Ok(c) => {
                        watcher = Some(tokio::spawn(watch_pvs(
                            c.clone(),
                            desired.node.clone(),
                            kick.clone(),
                            self.options.clone(),
                        )));
                        client = Some(c);
                        continue;
                    }
                    Err(e) => Err(e.to_string()),
                },
            };
            let clean = self.record(generation, &desired, result, &mut failures);
            if !clean && failures >= 3 {
                // Rebuild the client: the kubeconfig or certificates may have changed.
                client = None;
                if let Some(w) = watcher.take() {
                    w.abort();
                }
            }
            let wait = if clean {
                None
            } else {
                Some(backoff(&self.options, failures))
            };
            let wake = self.next_change_or(wait, &kick).await;
            if let Wake::Stop = wake {
                break;
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
    }

    /// Publishes the result of a pass in the status; returns true when nothing failed.
    fn record(
        &mut self,
        generation: u64,
        desired: &Desired,
        result: Result<PassReport, String>,
        failures: &mut u32,
    ) -> bool {
        let total = desired.volumes.len() + desired.storage_classes.len();
        let (clean, error) = match &result {
            Ok(r) if r.errors.is_empty() => (true, None),
            Ok(r) => (
                false,
                Some(format!(
                    "{} error(s), first: {}",
                    r.errors.len(),
                    r.errors[0]
                )),
            ),
            Err(e) => (false, Some(e.clone())),
        };
        *failures = if clean { 0 } else { failures.saturating_add(1) };
        if let Some(e) = &error {
            // The daemon reports it with the server and the retry time (daemon::publications).
            tracing::debug!(error = %e, attempt = *failures, "publication incomplete, will retry");
        }
        let retry_in = (!clean).then(|| backoff_cap(&self.options, *failures));
        self.status.send_modify(|s| {
            s.passes += 1;
            s.connected = result.is_ok();
            s.consecutive_failures = *failures;
            s.failed_passes += u64::from(!clean);
            s.last_error = error;
            s.retry_in = retry_in;
            match result {
                Ok(r) => {
                    s.pending = r.pending;
                    s.volumes = r.volumes;
                    s.last_pass = Some(PassSummary {
                        applied: r.applied,
                        deleted: r.deleted,
                        scrubbed: r.scrubbed,
                        kept: r.kept,
                        retained: r.retained,
                        draining: r.draining,
                    });
                }
                Err(_) => s.pending = total,
            }
            if clean {
                s.published_generation = generation;
            }
        });
        clean
    }

    /// Waits for a new submit, a watch event, the resync timer, `retry` or stop.
    async fn next_change_or(&mut self, retry: Option<Duration>, kick: &Notify) -> Wake {
        let timer = retry.unwrap_or(self.options.resync);
        tokio::select! {
            () = self.stop.notified() => Wake::Stop,
            // During a backoff a new submit waits for the timer too (every daemon run
            // submits: uevents, D-Bus Apply, SIGHUP); the pass then takes the newest.
            r = self.desired.changed(), if retry.is_none() => {
                if r.is_ok() { Wake::Work } else { Wake::Stop }
            }
            () = tokio::time::sleep(timer) => Wake::Work,
            // After a failure only the backoff timer (or stop) wakes us.
            () = kick.notified(), if retry.is_none() => {
                tokio::time::sleep(self.options.debounce).await;
                Wake::Work
            }
        }
    }

    async fn next_change(&mut self) -> Wake {
        tokio::select! {
            () = self.stop.notified() => Wake::Stop,
            r = self.desired.changed() => if r.is_ok() { Wake::Work } else { Wake::Stop },
        }
    }
}

/// Watches this node's PVs and kicks a pass on every change (a claim released, a PV
/// deleted by hand). Restarts with backoff when the stream ends or fails.
async fn watch_pvs(client: Client, node: String, kick: Arc<Notify>, options: PublishOptions) {
    let api: Api<PersistentVolume> = Api::all(client);
    let selector = node_selector(&node);
    let mut failures = 0u32;
    loop {
        match watch_once(&api, &selector, &kick).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::debug!(error = %e, "PersistentVolume watch failed; restarting");
            }
        }
        // Events may have been missed while no watch was open.
        kick.notify_one();
        tokio::time::sleep(backoff(&options, failures.max(1))).await;
    }
}

async fn watch_once(
    api: &Api<PersistentVolume>,
    selector: &str,
    kick: &Notify,
) -> Result<(), String> {
    let list = api
        .list(&ListParams::default().labels(selector).limit(1))
        .await
        .map_err(|e| describe(&e))?;
    let rv = list.metadata.resource_version.unwrap_or_default();
    let wp = WatchParams::default().labels(selector).timeout(290);
    let mut stream = api.watch(&wp, &rv).await.map_err(|e| describe(&e))?.boxed();
    while let Some(event) = stream.try_next().await.map_err(|e| describe(&e))? {
        match event {
            WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_) => {
                kick.notify_one()
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => {
                return Err(format!(
                    "watch error {} {}: {}",
                    e.code, e.reason, e.message
                ))
            }
        }
    }
    Ok(())
}

/// Exponential backoff from `backoff_base`, capped at `backoff_max`.
fn backoff_cap(o: &PublishOptions, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    o.backoff_base
        .saturating_mul(1u32 << exp)
        .min(o.backoff_max)
}

/// The capped backoff with jitter: a random time between half and all of it, so that
/// a thousand nodes that lost the API server together do not come back in step.
fn backoff(o: &PublishOptions, failures: u32) -> Duration {
    let cap = backoff_cap(o, failures);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
    cap.mul_f64(fraction)
}

/// One pass in the foreground, for a CLI `apply` without a daemon: builds a client,
/// publishes `desired` once and returns what happened. Give it a deadline with
/// `tokio::time::timeout`; whatever is left is published by the daemon later.
pub async fn publish_once(
    source: &ClientSource,
    desired: &Desired,
    state_dir: &Path,
    scrubber: Arc<dyn Scrubber>,
    concurrency: usize,
) -> Result<PassReport, PublishError> {
    let client = source.client().await?;
    let mut reconciler = Reconciler::new(
        &desired.node,
        state_dir.to_path_buf(),
        scrubber,
        concurrency,
    );
    reconciler
        .pass(&client, desired)
        .await
        .map_err(|e| PublishError::Pass(e.to_string()))
}

/// Last known publication of `volumes` from the ledger (works without the API server).
pub fn recorded_publication(
    state_dir: &Path,
    node: &str,
    volumes: &[VolumeSpec],
) -> BTreeMap<String, VolumePublication> {
    let (ledger, _) = Ledger::load(state_dir);
    volumes
        .iter()
        .map(|v| {
            let pv_name = super::builders::pv_name(node, &v.name);
            let entry = ledger.volumes.get(&pv_name);
            let published = entry.is_some_and(|e| e.in_cluster);
            let phase = entry.and_then(|e| e.phase.clone());
            (
                v.name.clone(),
                VolumePublication {
                    pv_name,
                    published,
                    phase,
                },
            )
        })
        .collect()
}

/// PVs kept in the cluster although their volume is gone from the node (Bound, Released
/// or Failed when it vanished), as the last pass recorded them: `kvstrap volumes` lists
/// them, since the plan no longer knows their volume.
pub fn kept_publications(state_dir: &Path) -> Vec<KeptPublication> {
    let (ledger, _) = Ledger::load(state_dir);
    ledger
        .volumes
        .into_iter()
        .filter(|(_, e)| e.kept && e.in_cluster)
        .map(|(pv_name, e)| KeptPublication {
            pv_name,
            volume: e.volume,
            phase: e.phase,
        })
        .collect()
}

/// A PV kept for a vanished volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeptPublication {
    pub pv_name: String,
    /// The volume's name on the node (from the PV's `kvstrap.io/volume` annotation).
    pub volume: String,
    pub phase: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let o = PublishOptions {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..Default::default()
        };
        assert_eq!(backoff_cap(&o, 1), Duration::from_millis(100));
        assert_eq!(backoff_cap(&o, 3), Duration::from_millis(400));
        assert_eq!(backoff_cap(&o, 50), Duration::from_secs(2));
        let samples: Vec<Duration> = (0..50).map(|_| backoff(&o, 4)).collect();
        assert!(samples
            .iter()
            .all(|d| *d >= Duration::from_millis(400) && *d <= Duration::from_millis(800)));
        assert!(samples.iter().any(|d| *d != samples[0]), "jitter must vary");
    }
}
