//! A local copy of a set of API objects, kept by watching: one LIST, then WATCH from the
//! last resourceVersion seen (bookmarks keep it fresh). When a watch ends (the server
//! closes it after its timeout) the next one starts where it stopped, so an idle node
//! sends one watch request per stream and timeout and never lists again; only a version
//! the server no longer has (410 Gone) makes it list anew.

use super::client::describe;
use ::kube::api::{Api, ListParams, WatchEvent, WatchParams};
use ::kube::Resource;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long the server keeps one watch open (kube-client refuses 295 s or more).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// What a mirror knows, shared with its reader.
#[derive(Debug)]
pub struct Mirrored<K> {
    /// By name (`namespace/name` for namespaced objects); complete once `synced`.
    pub objects: BTreeMap<String, K>,
    /// The first LIST has been read.
    pub synced: bool,
    /// The last failure (LIST or WATCH), cleared by the next success.
    pub error: Option<String>,
}

impl<K> Default for Mirrored<K> {
    fn default() -> Self {
        Mirrored {
            objects: BTreeMap::new(),
            synced: false,
            error: None,
        }
    }
}

pub type Shared<K> = Arc<Mutex<Mirrored<K>>>;

/// Which objects to mirror.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub labels: Option<String>,
    pub fields: Option<String>,
}

/// Mirrors the objects of `api` matching `filter` into `shared` for as long as the task
/// lives, and notifies `changed` after every change (and after every failure, so the
/// reader can report it). Failures back off from `retry` to one minute.
pub async fn run<K>(
    api: Api<K>,
    filter: Filter,
    shared: Shared<K>,
    changed: Arc<Notify>,
    retry: Duration,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut version: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let outcome = match &version {
            None => list(&api, &filter, &shared).await.map(Some),
            Some(v) => watch(&api, &filter, v, &shared, &changed).await,
        };
        match outcome {
            Ok(next) => {
                failures = 0;
                version = next;
                set_error(&shared, None);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                set_error(&shared, Some(e));
                changed.notify_one();
                let exp = failures.saturating_sub(1).min(7);
                let wait = retry.saturating_mul(1 << exp).min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
            }
        }
        if version.is_none() {
            continue;
        }
        changed.notify_one();
    }
}

/// An object's key: its name, with its namespace first when it has one.
fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

fn set_error<K>(shared: &Shared<K>, error: Option<String>) {
    if let Ok(mut m) = shared.lock() {
        m.error = error;
    }
}

/// The whole set and the version to watch from.
async fn list<K>(api: &Api<K>, filter: &Filter, shared: &Shared<K>) -> Result<String, String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut lp = ListParams::default();
    if let Some(l) = &filter.labels {
        lp = lp.labels(l);
    }
    if let Some(f) = &filter.fields {
        lp = lp.fields(f);
    }
    let list = api.list(&lp).await.map_err(|e| describe(&e))?;
    let objects = list.items.into_iter().map(|o| (key(o.meta()), o)).collect();
    if let Ok(mut m) = shared.lock() {
        m.objects = objects;
        m.synced = true;
    }
    Ok(list.metadata.resource_version.unwrap_or_default())
}

/// One watch from `version`: `Ok(Some(v))` to go on from `v`, `Ok(None)` when the
/// server no longer has the version (list again).
async fn watch<K>(
    api: &Api<K>,
    filter: &Filter,
    version: &str,
    shared: &Shared<K>,
    changed: &Notify,
) -> Result<Option<String>, String>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
    if let Some(l) = &filter.labels {
        wp = wp.labels(l);
    }
    if let Some(f) = &filter.fields {
        wp = wp.fields(f);
    }
    let mut version = version.to_string();
    let mut stream = api
        .watch(&wp, &version)
        .await
        .map_err(|e| describe(&e))?
        .boxed();
    while let Some(event) = stream.try_next().await.map_err(|e| describe(&e))? {
        let (object, deleted) = match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
            WatchEvent::Deleted(o) => (o, true),
            WatchEvent::Bookmark(b) => {
                version = b.metadata.resource_version;
                continue;
            }
            WatchEvent::Error(e) if e.code == 410 => return Ok(None),
            WatchEvent::Error(e) => {
                return Err(format!(
                    "watch error {} {}: {}",
                    e.code, e.reason, e.message
                ))
            }
        };
        if let Some(v) = &object.meta().resource_version {
            version.clone_from(v);
        }
        let name = key(object.meta());
        if let Ok(mut m) = shared.lock() {
            if deleted {
                m.objects.remove(&name);
            } else {
                m.objects.insert(name, object);
            }
        }
        changed.notify_one();
    }
    Ok(Some(version))
}
