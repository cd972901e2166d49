//! The daemon's side of publication: manifests after every run, the background publisher
//! when the policy says `publish = true`, and what it reports back — `VolumePublished` and
//! `VolumeRemoved` signals (and their journal entries), the pending count, and one line
//! with the server's address and the next retry time for each failed attempt.

use super::Handle;
use crate::kube::node_state::{NodeReport, NodeStatePublisher};
use crate::kube::scrub::Ledger;
use crate::kube::{ClientSource, Desired, PublishStatus, Publisher};
use crate::model::Plan;
use crate::node::{Inputs, Publications};
use crate::policy::{self, Policy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The daemon's publisher: manifests after every run, and server-side apply in the
/// background when the policy says `publish = true`. Never blocks a run or READY.
pub struct KubePublications {
    state_dir: PathBuf,
    publisher: Option<Arc<Publisher>>,
    /// The Node's condition, label and Events after each run.
    node_state: Option<NodeStatePublisher>,
    /// Serves claims of dynamic classes; started with the first plan that has pools.
    dynamic: std::sync::Mutex<Option<crate::dynamic::server::Server>>,
    /// Where the dynamic server runs, and with what.
    dynamic_config: Option<(tokio::runtime::Handle, crate::dynamic::server::Config)>,
    /// Whether a node without pools has swept the room an earlier run published.
    room_swept: std::sync::atomic::AtomicBool,
    // Owns the publisher's tasks; dropped last.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl KubePublications {
    pub fn start(global: &Inputs, handle: Option<Handle>) -> KubePublications {
        let mut me = KubePublications {
            state_dir: global.state_dir.clone(),
            publisher: None,
            node_state: None,
            dynamic: Default::default(),
            dynamic_config: None,
            room_swept: Default::default(),
            _runtime: None,
        };
        let Ok(policy) = policy::load_with_cluster(global.policy.as_deref(), &global.state_dir)
        else {
            return me;
        };
        if !policy.kubernetes.publish {
            tracing::info!("kubernetes.publish = false: rendering manifests only");
            return me;
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cannot start the publisher, rendering manifests only: {e}");
                return me;
            }
        };
        let source = ClientSource::from_policy(&policy.kubernetes);
        let started = {
            let _guard = runtime.enter();
            Publisher::start(
                source.clone(),
                &policy.node.name,
                &global.state_dir,
                Arc::new(crate::kube::DirectoryAndBlockScrubber),
                crate::kube::PublishOptions::default(),
            )
        };
        match started {
            Ok(p) => {
                me = {
                    let _guard = runtime.enter();
                    let node_state = NodeStatePublisher::start(source.clone(), &policy.node.name);
                    let mut me = KubePublications::with_publisher(
                        &global.state_dir,
                        p,
                        source.clone(),
                        handle,
                    );
                    me.node_state = node_state.ok();
                    me.dynamic_config = Some((
                        runtime.handle().clone(),
                        crate::dynamic::server::Config::new(
                            &policy.node.name,
                            &policy.kubernetes.policy_namespace,
                            source,
                        ),
                    ));
                    me
                };
                me._runtime = Some(runtime);
            }
            Err(e) => tracing::error!("cannot start the publisher, rendering manifests only: {e}"),
        }
        me
    }

    /// Wrap a running publisher and report what it does through `handle`. Call it inside
    /// the tokio runtime the publisher runs on (the daemon's own, or a test's).
    pub fn with_publisher(
        state_dir: &Path,
        publisher: Publisher,
        source: ClientSource,
        handle: Option<Handle>,
    ) -> KubePublications {
        let publisher = Arc::new(publisher);
        if let Some(h) = &handle {
            h.publications_changed();
        }
        let announced = recorded_in_cluster(state_dir);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(report(Arc::clone(&publisher), source, handle, announced));
            }
            Err(_) => {
                tracing::warn!("no runtime to watch the publisher on: no VolumePublished signals")
            }
        }
        KubePublications {
            state_dir: state_dir.to_path_buf(),
            publisher: Some(publisher),
            node_state: None,
            dynamic: Default::default(),
            dynamic_config: None,
            room_swept: Default::default(),
            _runtime: None,
        }
    }

    /// Queue objects built elsewhere (tests; `submit` renders them from a plan).
    pub fn submit_desired(&self, desired: Desired) {
        if let Some(p) = &self.publisher {
            p.submit(desired);
        }
    }

    /// The fleet watcher's error (None: it reads again), for the Node's condition.
    pub fn policy_error(&self, error: Option<String>) {
        if let Some(n) = &self.node_state {
            n.policy_error(error);
        }
    }

    /// The publisher's status, when one runs.
    pub fn status(&self) -> Option<PublishStatus> {
        self.publisher.as_ref().map(|p| p.status())
    }

    /// The pools of the plan to the dynamic server; it starts with the first plan that
    /// has any (nodes without dynamic groups never watch claims).
    fn serve_pools(&self, policy: &Policy, plan: &Plan) {
        let pools = crate::dynamic::server::Pools {
            pools: plan.pools().cloned().collect(),
            classes: policy.storage_classes.clone(),
        };
        let Ok(mut slot) = self.dynamic.lock() else {
            return;
        };
        match (&*slot, &self.dynamic_config) {
            (Some(server), _) => server.set_pools(pools),
            (None, Some((rt, config))) if !pools.pools.is_empty() => {
                let _guard = rt.enter();
                match crate::dynamic::server::Server::start(config.clone(), pools) {
                    Ok(server) => {
                        tracing::info!("serving claims of dynamic classes from this node's pools");
                        *slot = Some(server);
                    }
                    Err(e) => tracing::error!("cannot serve dynamic claims: {e}"),
                }
            }
            // No pool (any more): room this node published before its dynamic groups
            // went away would keep drawing claims. One look per daemon start.
            (None, Some((rt, config)))
                if !self
                    .room_swept
                    .swap(true, std::sync::atomic::Ordering::SeqCst) =>
            {
                let config = config.clone();
                rt.spawn(async move {
                    let client = match config.source.client().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!("no sweep of stale room: {e}");
                            return;
                        }
                    };
                    let none = Default::default();
                    match crate::dynamic::server::sweep_room(
                        &client,
                        &config.namespace,
                        &config.node,
                        &none,
                    )
                    .await
                    {
                        Ok(deleted) if !deleted.is_empty() => tracing::info!(
                            "deleted this node's room for classes no pool serves now: {}",
                            deleted.join(", ")
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("{e}"),
                    }
                });
            }
            _ => {}
        }
    }

    /// The dynamic server's status, when one runs.
    pub fn dynamic_status(&self) -> Option<crate::dynamic::server::Status> {
        self.dynamic
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.status()))
    }
}

impl Publications for KubePublications {
    fn submit(&self, policy: &Policy, plan: &Plan) -> Result<(), String> {
        // Only volumes with no step left are rendered (kube::node::provisioned).
        let desired = crate::kube::node::render(policy, plan, &self.state_dir)
            .map_err(|e| format!("cannot render the manifests: {e:#}"))?;
        self.submit_desired(desired);
        self.serve_pools(policy, plan);
        Ok(())
    }

    fn run_finished(&self, report: NodeReport) {
        if let Some(n) = &self.node_state {
            n.submit(report);
        }
    }

    fn health(&self, health: &crate::health::HealthMap) {
        if let Some(n) = &self.node_state {
            n.health(crate::node::report::node_health(health));
        }
    }

    fn pending(&self) -> u32 {
        self.status()
            .map(|s| u32::try_from(s.pending).unwrap_or(u32::MAX))
            .unwrap_or(0)
    }

    fn errors(&self) -> u64 {
        self.status().map_or(0, |s| s.failed_passes)
    }

    fn drain_check(&self) -> Option<BTreeMap<String, Vec<crate::kube::reconcile::DrainBlocker>>> {
        self.status().and_then(|s| s.last_pass).map(|p| p.draining)
    }
}

/// PVs (and their volumes) the last pass before this start found in the cluster: not
/// announced again. Read-only: the publisher owns the ledger and moves a broken one aside.
fn recorded_in_cluster(state_dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(Ledger::path(state_dir))
        .ok()
        .and_then(|text| serde_json::from_slice::<Ledger>(&text).ok())
        .map(|l| {
            l.volumes
                .into_iter()
                .filter(|(_, e)| e.in_cluster)
                .map(|(pv, e)| (pv, e.volume))
                .collect()
        })
        .unwrap_or_default()
}

/// How long one wait for a status change lasts before it is simply started again.
const WATCH_SLICE: Duration = Duration::from_secs(600);

/// Follow the publisher's status for the daemon's lifetime.
async fn report(
    publisher: Arc<Publisher>,
    source: ClientSource,
    handle: Option<Handle>,
    mut announced: BTreeMap<String, String>,
) {
    let server = server_address(&source).await;
    let mut last = publisher.status();
    loop {
        let (passes, pending) = (last.passes, last.pending);
        let asked = Instant::now();
        let changed = publisher
            .wait_for(WATCH_SLICE, move |s| {
                s.passes != passes || s.pending != pending
            })
            .await;
        if !changed {
            if asked.elapsed() < WATCH_SLICE {
                return; // the publisher stopped
            }
            continue;
        }
        let now = publisher.status();
        let changed = changes(&now, &mut announced);
        if let Some(h) = &handle {
            for (volume, pv) in &changed.published {
                h.volume_published(volume, pv);
            }
            for (volume, pv) in &changed.removed {
                h.volume_removed(volume, pv);
            }
        }
        if now.pending != last.pending {
            if let Some(h) = &handle {
                h.publications_changed();
            }
        }
        if now.passes != last.passes {
            log_pass(&server, &last, &now);
        }
        last = now;
    }
}

/// What changed in the cluster since the last look, per volume: `(volume, pv)` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub published: Vec<(String, String)>,
    pub removed: Vec<(String, String)>,
}

/// Volumes whose PV is in the cluster and was not announced yet, and announced ones whose
/// PV left it (so a volume taken back and published again is announced again). Only a
/// pass that reached the API server says anything.
pub fn changes(status: &PublishStatus, announced: &mut BTreeMap<String, String>) -> Changes {
    let mut out = Changes::default();
    if !status.connected {
        return out;
    }
    let published: BTreeMap<&str, &str> = status
        .volumes
        .iter()
        .filter(|(_, p)| p.published)
        .map(|(v, p)| (p.pv_name.as_str(), v.as_str()))
        .collect();
    announced.retain(|pv, volume| {
        let kept = published.contains_key(pv.as_str());
        if !kept {
            out.removed.push((volume.clone(), pv.clone()));
        }
        kept
    });
    for (pv, volume) in published {
        if !announced.contains_key(pv) {
            announced.insert(pv.to_string(), volume.to_string());
            out.published.push((volume.to_string(), pv.to_string()));
        }
    }
    out
}

/// One line per failed attempt, ours: what failed, where, and when the next try is;
/// and one when publication works again.
fn log_pass(server: &str, last: &PublishStatus, now: &PublishStatus) {
    match &now.last_error {
        Some(error) => {
            let retry = now.retry_in.unwrap_or_default();
            tracing::warn!(
                server,
                attempt = now.consecutive_failures,
                pending = now.pending,
                "cannot publish {} object(s) to the API server at {server}: {error}; attempt {}, next attempt within {:.1?} (by {})",
                now.pending,
                now.consecutive_failures,
                retry,
                clock_in(retry)
            );
        }
        None if last.consecutive_failures > 0 || last.passes == 0 => tracing::info!(
            server,
            "publishing to the API server at {server}: every object is in the cluster"
        ),
        None => {}
    }
}

/// `HH:MM:SS` UTC of now + `d`, as the journal shows times.
fn clock_in(d: Duration) -> String {
    let at = SystemTime::now() + d;
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.as_secs())
        .unwrap_or_default();
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// The API server's URL from the same kubeconfig the publisher reads.
async fn server_address(source: &ClientSource) -> String {
    let config = match source {
        ClientSource::Kubeconfig(path) => match ::kube::config::Kubeconfig::read_from(path) {
            Ok(kc) => ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        ClientSource::InCluster => ::kube::Config::incluster().map_err(|e| e.to_string()),
    };
    match (config, source) {
        (Ok(c), _) => c.cluster_url.to_string(),
        (Err(_), ClientSource::Kubeconfig(path)) => format!("(named in {})", path.display()),
        (Err(_), ClientSource::InCluster) => "(in-cluster)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::VolumePublication;

    fn status(connected: bool, published: &[(&str, bool)]) -> PublishStatus {
        PublishStatus {
            connected,
            volumes: published
                .iter()
                .map(|(v, p)| {
                    (
                        v.to_string(),
                        VolumePublication {
                            pv_name: format!("pv-{v}"),
                            published: *p,
                            phase: None,
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn pair(v: &str) -> (String, String) {
        (v.to_string(), format!("pv-{v}"))
    }

    #[test]
    fn each_publication_is_announced_once_and_removals_too() {
        let mut announced = BTreeMap::from([("pv-old".to_string(), "old".to_string())]);
        let first = changes(
            &status(true, &[("old", true), ("a", true), ("b", false)]),
            &mut announced,
        );
        assert_eq!(first.published, vec![pair("a")]);
        assert!(first.removed.is_empty());
        let again = changes(
            &status(true, &[("old", true), ("a", true), ("b", true)]),
            &mut announced,
        );
        assert_eq!(again.published, vec![pair("b")]);
        // A pass that did not reach the server says nothing.
        assert_eq!(
            changes(&status(false, &[]), &mut announced),
            Changes::default()
        );
        // Taken back (deleted), then published again: both are announced.
        let gone = changes(
            &status(true, &[("old", true), ("a", false), ("b", true)]),
            &mut announced,
        );
        assert_eq!((gone.published, gone.removed), (vec![], vec![pair("a")]));
        let back = changes(
            &status(true, &[("old", true), ("a", true), ("b", true)]),
            &mut announced,
        );
        assert_eq!(back.published, vec![pair("a")]);
    }

    #[test]
    fn clock_is_hh_mm_ss() {
        let c = clock_in(Duration::from_secs(1));
        assert_eq!(c.len(), "00:00:00 UTC".len(), "{c}");
    }
}
