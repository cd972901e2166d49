//! The node's policy from the cluster: watches the policy ConfigMaps and this node's Node
//! object (its labels choose the fragments), checks the fragments it selects exactly as
//! the loader will, caches the set under the state directory when it is good, and then
//! asks for a reload. A broken set is refused as a whole: the cache keeps the last good
//! one, and the refusal is reported in [`FleetStatus`] and the journal.
//!
//! The loader never talks to the API server: it reads the cache, so a node that boots
//! without the API server applies the last good policy.

use super::client::{describe, ClientSource, PublishError};
use super::mirror::{self, Filter, Shared};
use super::node_state::{self, NodeEvent};
use crate::policy::cluster::{self, ClusterCache, Fragment, POLICY_KEY, POLICY_LABEL};
use crate::policy::{self, Diagnostic};
use ::kube::api::Api;
use ::kube::Client;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// What the fleet watcher needs to know.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// This node's name (the Node object whose labels select fragments).
    pub node: String,
    pub namespace: String,
    /// The node's own policy (`--policy`; None: the system locations).
    pub policy_source: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Quiet time after a change before the fragments are judged (the daemon's uevent
    /// settle time), so a burst of edits makes one reload.
    pub debounce: Duration,
    /// First retry after a failed LIST/WATCH (doubles up to a minute).
    pub retry: Duration,
}

/// What the watcher last saw and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetStatus {
    /// The sources of the cluster layer in force (`configmap/NS/NAME`), in merge order.
    pub sources: Vec<String>,
    /// The diagnostics of the last refused fragment set (empty when the last was good).
    pub refused: Vec<Diagnostic>,
    /// Refusals so far; each new one is reported once.
    pub refusals: u64,
    /// Times the cache was replaced (and a reload asked for).
    pub updates: u64,
    /// The API server's answer when watching fails (a 403 names the missing rule).
    pub error: Option<String>,
}

/// Handle of the running watcher.
pub struct Fleet {
    status: watch::Receiver<FleetStatus>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Called after the cache changed: the daemon reloads its policy.
pub type OnChange = Box<dyn Fn() + Send + Sync>;

impl Fleet {
    /// Starts watching (needs a tokio runtime). `on_change` runs after each new cache.
    pub fn start(
        source: ClientSource,
        config: FleetConfig,
        on_change: OnChange,
    ) -> Result<Fleet, PublishError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| PublishError::NoRuntime)?;
        let (status_tx, status_rx) = watch::channel(initial_status(&config));
        let stop = Arc::new(Notify::new());
        let worker = Worker {
            config,
            status: status_tx,
            on_change,
        };
        let task = handle.spawn(worker.run(source, stop.clone()));
        Ok(Fleet {
            status: status_rx,
            stop,
            task,
        })
    }

    pub fn status(&self) -> FleetStatus {
        self.status.borrow().clone()
    }

    /// Calls `sink` with the watcher's error each time it changes (None: reading again),
    /// so the Node's condition can name a missing permission. Needs a tokio runtime.
    pub fn forward_errors(&self, sink: Box<dyn Fn(Option<String>) + Send + Sync>) {
        let mut rx = self.status.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = rx.borrow_and_update().error.clone();
                if now != last {
                    sink(now.clone());
                    last = now;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Waits until `pred` holds, or `timeout` passes; returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&FleetStatus) -> bool) -> bool {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, async move { rx.wait_for(pred).await.is_ok() })
            .await
            .unwrap_or(false)
    }

    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

fn initial_status(config: &FleetConfig) -> FleetStatus {
    let cached = cluster::read_cache(&config.state_dir).ok().flatten();
    FleetStatus {
        sources: cached.map(|c| sources(&c.fragments)).unwrap_or_default(),
        ..FleetStatus::default()
    }
}

fn sources(fragments: &[Fragment]) -> Vec<String> {
    fragments
        .iter()
        .map(|f| f.source().display().to_string())
        .collect()
}

struct Worker {
    config: FleetConfig,
    status: watch::Sender<FleetStatus>,
    on_change: OnChange,
}

impl Worker {
    async fn run(self, source: ClientSource, stop: Arc<Notify>) {
        let client = tokio::select! {
            () = stop.notified() => return,
            c = self.client(&source) => c,
        };
        let changed = Arc::new(Notify::new());
        let maps: Shared<ConfigMap> = Arc::default();
        let nodes: Shared<Node> = Arc::default();
        let tasks = [
            tokio::spawn(mirror::run(
                Api::<ConfigMap>::namespaced(client.clone(), &self.config.namespace),
                Filter {
                    labels: Some(POLICY_LABEL.to_string()),
                    fields: None,
                },
                maps.clone(),
                changed.clone(),
                self.config.retry,
            )),
            tokio::spawn(mirror::run(
                Api::<Node>::all(client.clone()),
                Filter {
                    labels: None,
                    fields: Some(format!("metadata.name={}", self.config.node)),
                },
                nodes.clone(),
                changed.clone(),
                self.config.retry,
            )),
        ];
        loop {
            tokio::select! {
                () = stop.notified() => break,
                () = changed.notified() => {}
            }
            tokio::time::sleep(self.config.debounce).await;
            self.judge(&client, &maps, &nodes);
        }
        for t in tasks {
            t.abort();
        }
    }

    /// A client, retrying until the kubeconfig can be read.
    async fn client(&self, source: &ClientSource) -> Client {
        let mut wait = self.config.retry;
        loop {
            match source.client().await {
                Ok(c) => return c,
                Err(e) => {
                    self.set_error(Some(e.to_string()));
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    fn set_error(&self, error: Option<String>) {
        let changed = self.status.borrow().error != error;
        if !changed {
            return;
        }
        match &error {
            Some(e) => tracing::warn!(
                namespace = %self.config.namespace,
                "cannot watch the policy fragments in the cluster (the cached policy stays in force): {e}"
            ),
            None => {
                tracing::info!(namespace = %self.config.namespace, "watching the policy fragments in the cluster")
            }
        }
        self.status.send_modify(|s| s.error = error);
    }

    /// Selects, checks and caches the fragments, once both mirrors have listed.
    fn judge(&self, client: &Client, maps: &Shared<ConfigMap>, nodes: &Shared<Node>) {
        let (fragments, maps_ok, maps_error) =
            snapshot(maps, |m| fragment(&self.config.namespace, m));
        let (node, nodes_ok, nodes_error) = snapshot(nodes, |n: &Node| {
            n.metadata.labels.clone().unwrap_or_default()
        });
        self.set_error(maps_error.or(nodes_error));
        let Some(labels) = node.into_iter().next() else {
            if nodes_ok {
                tracing::debug!(node = %self.config.node, "no Node object yet: fragments not selected");
            }
            return;
        };
        if !maps_ok {
            return;
        }
        let (selected, mut refused) = cluster::select(&fragments, &labels);
        if refused.is_empty() {
            match policy::evaluate_cluster(self.config.policy_source.as_deref(), &selected) {
                Ok(_) => return self.accept(&labels, selected),
                Err(e) => refused = e.diagnostics,
            }
        }
        self.refuse(client, refused);
    }

    fn accept(&self, labels: &BTreeMap<String, String>, selected: Vec<Fragment>) {
        let old = cluster::read_cache(&self.config.state_dir).ok().flatten();
        let same_layer = old
            .as_ref()
            .is_some_and(|c| same_texts(&c.fragments, &selected));
        let same_labels = old.as_ref().is_some_and(|c| &c.node_labels == labels);
        let sources = sources(&selected);
        if !(same_layer && same_labels) {
            let cache = ClusterCache::new(&self.config.node, labels.clone(), selected);
            let path = cluster::cache_path(&self.config.state_dir);
            if let Err(e) = crate::state::write_atomic(&path, cache.to_json().as_bytes()) {
                tracing::error!("cannot cache the cluster policy: {e}");
                return;
            }
        }
        // The first judgement after start checks the cache against the cluster; only a
        // different layer needs a reload. It is asked for before the status shows the
        // new sources, so whoever sees them knows the reload is on its way.
        let reload = !(old.is_none() && sources.is_empty() || same_layer);
        if reload {
            tracing::info!(sources = %sources.join(", "), "policy fragments from the cluster changed; reloading");
            (self.on_change)();
        }
        self.status.send_modify(|s| {
            s.refused.clear();
            s.sources = sources;
            s.updates += u64::from(reload);
        });
    }

    fn refuse(&self, client: &Client, diagnostics: Vec<Diagnostic>) {
        if self.status.borrow().refused == diagnostics {
            return;
        }
        let report: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
        let event = NodeEvent {
            reason: "PolicyFragmentRefused",
            warning: true,
            // The diagnostics without their hints: one line each, joined.
            message: format!(
                "policy from the cluster refused, the last good one stays in force: {}",
                report
                    .iter()
                    .filter_map(|r| r.lines().next())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            key: report.join("\n"),
        };
        let (client, node) = (client.clone(), self.config.node.clone());
        tokio::spawn(async move {
            if let Err(e) = node_state::post_event(&client, &node, &event).await {
                tracing::warn!("{e}");
            }
        });
        tracing::error!(
            message_id = crate::logging::message_id::POLICY_REJECTED,
            "a policy fragment from the cluster is refused; the last good policy stays in force:\n{}",
            report.join("\n")
        );
        self.status.send_modify(|s| {
            s.refused = diagnostics;
            s.refusals += 1;
        });
    }
}

/// The mirrored objects mapped by `f`, whether the mirror has listed, and its error.
fn snapshot<K, T>(shared: &Shared<K>, f: impl Fn(&K) -> T) -> (Vec<T>, bool, Option<String>) {
    match shared.lock() {
        Ok(m) => (
            m.objects.values().map(f).collect(),
            m.synced,
            m.error.clone(),
        ),
        Err(_) => (Vec::new(), false, None),
    }
}

fn fragment(namespace: &str, map: &ConfigMap) -> Fragment {
    let annotation = map
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(cluster::SELECTOR_ANNOTATION).cloned());
    Fragment {
        namespace: namespace.to_string(),
        name: map.metadata.name.clone().unwrap_or_default(),
        selector: annotation,
        text: map.data.as_ref().and_then(|d| d.get(POLICY_KEY).cloned()),
        resource_version: map.metadata.resource_version.clone(),
    }
}

/// Same fragments with the same texts, whatever their resourceVersions.
fn same_texts(a: &[Fragment], b: &[Fragment]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.namespace == y.namespace && x.text == y.text)
}

/// The Node's labels and every policy fragment of `namespace`, read once (for
/// `kvstrap validate --cluster`: an operator checks fragments before any node acts).
pub async fn fetch(
    client: &Client,
    node: &str,
    namespace: &str,
) -> Result<(BTreeMap<String, String>, Vec<Fragment>), String> {
    let n = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(|e| format!("cannot read Node {node}: {}", describe(&e)))?;
    let lp = ::kube::api::ListParams::default().labels(POLICY_LABEL);
    let maps = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await
        .map_err(|e| {
            format!(
                "cannot list the policy ConfigMaps of namespace {namespace}: {}",
                describe(&e)
            )
        })?;
    let fragments = maps.items.iter().map(|m| fragment(namespace, m)).collect();
    Ok((n.metadata.labels.unwrap_or_default(), fragments))
}
