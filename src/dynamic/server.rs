//! The daemon's dynamic provisioner: watches claims and its PVs, acts on the pools, publishes room.
//!
//! One loop: two mirrors (every claim of the cluster; this node's dynamic PVs) wake it,
//! each pass observes the pools, decides ([`super::decide`]) and carries the actions out
//! concurrently, then publishes the node's room per class as CSIStorageCapacity when it
//! changed. The CSIDriver that makes kube-scheduler read them is applied once.

use super::accounting::{self, Served};
use super::decide::{self, Action, Claim, Volume};
use super::volumes;
use crate::kube::builders::{event, short_hash, EventText, MANAGER};
use crate::kube::client::{describe, ClientSource};
use crate::kube::dynamic as objects;
use crate::kube::mirror::{self, Filter, Shared};
use crate::model::PoolSpec;
use crate::policy::types::StorageClass;
use ::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use ::kube::Client;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// What the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    /// Where the CSIStorageCapacity objects go (`[kubernetes] policy_namespace`).
    pub namespace: String,
    pub source: ClientSource,
    /// Quiet time after a change before a pass: a burst of claims makes one pass.
    pub debounce: Duration,
    /// A pass even when nothing was heard (orphans, a missed event).
    pub resync: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Config {
    pub fn new(node: &str, namespace: &str, source: ClientSource) -> Config {
        Config {
            node: node.to_string(),
            namespace: namespace.to_string(),
            source,
            debounce: Duration::from_millis(20),
            resync: Duration::from_secs(60),
            concurrency: 16,
        }
    }
}

/// The pools to serve from and the policy's classes (for the PVs), as the last run saw them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pools {
    pub pools: Vec<PoolSpec>,
    pub classes: Vec<StorageClass>,
}

/// What the server did, for status, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub passes: u64,
    pub provisioned: u64,
    pub reclaimed: u64,
    pub rescheduled: u64,
    pub expanded: u64,
    /// Seconds from a claim's selected-node (when first seen) to its PV: the last 1000.
    pub latencies_ms: Vec<u64>,
    /// Free bytes per pool mount point after the last pass.
    pub free: BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

/// The running provisioner; stopped on drop.
pub struct Server {
    pools: watch::Sender<Pools>,
    status: watch::Receiver<Status>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts the loop on the current tokio runtime.
    pub fn start(config: Config, pools: Pools) -> Result<Server, String> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| "the dynamic provisioner needs a tokio runtime".to_string())?;
        let (pools_tx, pools_rx) = watch::channel(pools);
        let (status_tx, status_rx) = watch::channel(Status::default());
        let stop = Arc::new(Notify::new());
        let task = rt.spawn(run(config, pools_rx, status_tx, Arc::clone(&stop)));
        Ok(Server {
            pools: pools_tx,
            status: status_rx,
            stop,
            task,
        })
    }

    /// The pools and classes after a run (disks come and go, a reload changes classes).
    pub fn set_pools(&self, pools: Pools) {
        self.pools.send_if_modified(|p| {
            let changed = *p != pools;
            *p = pools;
            changed
        });
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status (tests, benchmarks).
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> bool {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| pred(s)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops the loop after the pass in flight.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let status = self.status.clone();
        let mut rx = status;
        // The task ends at its next select; the abort on drop covers a stuck pass.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// State kept between passes.
#[derive(Default)]
struct Memory {
    /// Room last published per class.
    room: BTreeMap<String, (u64, u64)>,
    /// The classes whose room was last swept to: room of any other class is deleted
    /// when the set changes (a class or its last pool left the policy).
    swept: Option<BTreeSet<String>>,
    driver_applied: bool,
    /// Events already posted (by name), so a pass does not post them again.
    posted: BTreeSet<String>,
    /// When each pending claim was first seen selecting this node.
    first_seen: BTreeMap<String, Instant>,
    /// What the last pass saw of the claims and PVs that concern this node, and of the
    /// pools: a change elsewhere in the cluster (another node's claim) costs no pass.
    seen: u64,
    /// A full pass is due (resync, or the last pass acted or failed).
    due: bool,
}

async fn run(
    config: Config,
    mut pools: watch::Receiver<Pools>,
    status: watch::Sender<Status>,
    stop: Arc<Notify>,
) {
    let client = loop {
        match config.source.client().await {
            Ok(c) => break c,
            Err(e) => {
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                tokio::select! {
                    () = stop.notified() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let changed = Arc::new(Notify::new());
    let claims: Shared<PersistentVolumeClaim> = Arc::default();
    let volumes: Shared<PersistentVolume> = Arc::default();
    let selector = format!(
        "{},{}={}",
        crate::kube::builders::node_selector(&config.node),
        objects::LABEL_PROVISIONING,
        objects::DYNAMIC
    );
    let retry = Duration::from_millis(500);
    let tasks = [
        tokio::spawn(mirror::run(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            Filter::default(),
            Arc::clone(&claims),
            Arc::clone(&changed),
            retry,
        )),
        tokio::spawn(mirror::run(
            Api::<PersistentVolume>::all(client.clone()),
            Filter {
                labels: Some(selector),
                fields: None,
            },
            Arc::clone(&volumes),
            Arc::clone(&changed),
            retry,
        )),
    ];
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            () = stop.notified() => break,
            () = changed.notified() => {}
            r = pools.changed() => if r.is_err() { break },
            () = tokio::time::sleep(config.resync) => memory.due = true,
        }
        tokio::time::sleep(config.debounce).await;
        let now = pools.borrow_and_update().clone();
        let seen = fingerprint(&config.node, &now, &claims, &volumes);
        if seen == memory.seen && !memory.due {
            continue;
        }
        memory.seen = seen;
        let outcome = pass(&client, &config, &now, &claims, &volumes, &mut memory).await;
        memory.due =
            outcome.provisioned + outcome.reclaimed + outcome.rescheduled + outcome.expanded > 0
                || !outcome.errors.is_empty();
        status.send_modify(|s| {
            s.passes += 1;
            s.provisioned += outcome.provisioned;
            s.reclaimed += outcome.reclaimed;
            s.rescheduled += outcome.rescheduled;
            s.expanded += outcome.expanded;
            s.latencies_ms.extend(&outcome.latencies_ms);
            let excess = s.latencies_ms.len().saturating_sub(1000);
            s.latencies_ms.drain(..excess);
            s.free = outcome.free;
            s.last_error = outcome.errors.last().cloned();
        });
    }
    for t in tasks {
        t.abort();
    }
}

/// What one pass did.
#[derive(Default)]
struct Outcome {
    provisioned: u64,
    reclaimed: u64,
    rescheduled: u64,
    expanded: u64,
    latencies_ms: Vec<u64>,
    free: BTreeMap<String, u64>,
    errors: Vec<String>,
}

/// A hash of what concerns this node: the claims of its pools' classes that select it
/// or are bound to its PVs, its dynamic PVs, the pools, and whether the mirrors listed.
fn fingerprint(
    node: &str,
    now: &Pools,
    claims: &Shared<PersistentVolumeClaim>,
    volumes: &Shared<PersistentVolume>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let classes: BTreeSet<&str> = now.pools.iter().map(|p| p.storage_class.as_str()).collect();
    for p in &now.pools {
        p.mountpoint.hash(&mut h);
        p.capacity_bytes.hash(&mut h);
    }
    let mut ours: BTreeSet<String> = BTreeSet::new();
    if let Ok(m) = volumes.lock() {
        (m.synced, m.error.is_some()).hash(&mut h);
        for pv in m.objects.values() {
            (&pv.metadata.name, &pv.metadata.resource_version).hash(&mut h);
            ours.extend(pv.metadata.name.clone());
        }
    }
    if let Ok(m) = claims.lock() {
        (m.synced, m.error.is_some()).hash(&mut h);
        for c in m.objects.values() {
            let class = c
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref());
            if !class.is_some_and(|c| classes.contains(c)) {
                continue;
            }
            let selected = c
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(objects::SELECTED_NODE))
                .is_some_and(|n| n == node);
            let bound_here = c
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .is_some_and(|v| ours.contains(v));
            if selected || bound_here {
                (&c.metadata.uid, &c.metadata.resource_version).hash(&mut h);
            }
        }
    }
    h.finish()
}

/// The mirrored objects, or None until the mirror has listed.
fn snapshot<K: Clone>(shared: &Shared<K>) -> (Vec<K>, bool) {
    match shared.lock() {
        Ok(m) => (
            m.objects.values().cloned().collect(),
            m.synced && m.error.is_none(),
        ),
        Err(_) => (Vec::new(), false),
    }
}

async fn pass(
    client: &Client,
    config: &Config,
    now: &Pools,
    claims: &Shared<PersistentVolumeClaim>,
    volumes: &Shared<PersistentVolume>,
    memory: &mut Memory,
) -> Outcome {
    let mut out = Outcome::default();
    if !memory.driver_applied && !now.pools.is_empty() {
        match apply_driver(client).await {
            Ok(()) => memory.driver_applied = true,
            Err(e) => {
                tracing::warn!("{e}; kube-scheduler cannot see this node's room until it is there");
                out.errors.push(e);
            }
        }
    }
    let specs = now.pools.clone();
    let (served, mounted) = crate::host::threads::on_thread("dynamic-volumes", move || {
        let mounted: BTreeSet<std::path::PathBuf> = specs
            .iter()
            .filter(|p| volumes::is_mounted(p))
            .map(|p| p.mountpoint.clone())
            .collect();
        (volumes::observe(&specs), mounted)
    })
    .await
    .unwrap_or_default();
    let (claim_objects, claims_ok) = snapshot(claims);
    let (pv_objects, pvs_ok) = snapshot(volumes);
    let claims: Vec<Claim> = claim_objects.iter().filter_map(claim_of).collect();
    let volumes: Vec<Volume> = pv_objects.iter().filter_map(volume_of).collect();
    note_first_seen(memory, &config.node, &claims);
    let actions = if claims_ok && pvs_ok {
        decide::decide(&decide::Inputs {
            node: &config.node,
            pools: &now.pools,
            mounted: &mounted,
            served: &served,
            claims: &claims,
            volumes: &volumes,
            complete: true,
        })
    } else {
        Vec::new()
    };
    let ctx = Ctx {
        client,
        config,
        now,
        posted: Arc::new(Mutex::new(std::mem::take(&mut memory.posted))),
    };
    let results: Vec<Done> = futures::stream::iter(actions)
        .map(|a| ctx.execute(a))
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    memory.posted = ctx.posted.lock().map(|p| p.clone()).unwrap_or_default();
    for d in results {
        match d {
            Done::Provisioned { claim_uid } => {
                out.provisioned += 1;
                if let Some(t) = memory.first_seen.remove(&claim_uid) {
                    out.latencies_ms
                        .push(u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
            }
            Done::Reclaimed => out.reclaimed += 1,
            Done::Rescheduled => out.rescheduled += 1,
            Done::Expanded => out.expanded += 1,
            Done::Nothing => {}
            Done::Failed(e) => {
                tracing::warn!("dynamic volumes: {e}");
                out.errors.push(e);
            }
        }
    }
    publish_room(client, config, now, memory, &mut out).await;
    out
}

/// Remember when a claim first asked this node, for the latency figure.
fn note_first_seen(memory: &mut Memory, node: &str, claims: &[Claim]) {
    let waiting: BTreeSet<&str> = claims
        .iter()
        .filter(|c| c.selected_node.as_deref() == Some(node) && c.volume_name.is_none())
        .map(|c| c.uid.as_str())
        .collect();
    memory
        .first_seen
        .retain(|uid, _| waiting.contains(uid.as_str()));
    for uid in waiting {
        memory
            .first_seen
            .entry(uid.to_string())
            .or_insert_with(Instant::now);
    }
}

/// The room of each class after the pass, published where it changed.
async fn publish_room(
    client: &Client,
    config: &Config,
    now: &Pools,
    memory: &mut Memory,
    out: &mut Outcome,
) {
    let specs = now.pools.clone();
    let served = crate::host::threads::on_thread("dynamic-volumes", move || {
        let mounted: Vec<PoolSpec> = specs
            .iter()
            .filter(|p| volumes::is_mounted(p))
            .cloned()
            .collect();
        let served = volumes::observe(&mounted);
        (mounted, served)
    })
    .await
    .unwrap_or_default();
    let (mounted, served) = served;
    let pools = accounting::pools(&mounted, &served, &|_| 0);
    out.free = pools
        .iter()
        .map(|p| (p.spec.mountpoint.display().to_string(), p.free()))
        .collect();
    let classes: BTreeSet<&str> = now.pools.iter().map(|p| p.storage_class.as_str()).collect();
    let keep = classes.iter().map(|c| c.to_string()).collect();
    sweep_stale_room(client, config, keep, memory, out).await;
    let api: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), &config.namespace);
    for class in classes {
        let room = accounting::room(&pools, class);
        if memory.room.get(class) == Some(&room) {
            continue;
        }
        let object =
            objects::storage_capacity(&config.node, &config.namespace, class, room.0, room.1);
        let name = object.metadata.name.clone().unwrap_or_default();
        let pp = PatchParams::apply(MANAGER).force();
        match api.patch(&name, &pp, &Patch::Apply(&object)).await {
            Ok(_) => {
                memory.room.insert(class.to_string(), room);
            }
            Err(e) => {
                let e = format!(
                    "cannot publish CSIStorageCapacity {}/{name}: {}",
                    config.namespace,
                    describe(&e)
                );
                tracing::warn!("{e}");
                out.errors.push(e);
            }
        }
    }
}

/// Deletes the room (CSIStorageCapacity) this node published for classes not in `keep`:
/// left there, kube-scheduler would keep sending their claims here. Runs when the set of
/// classes changes, so an idle node makes no request.
async fn sweep_stale_room(
    client: &Client,
    config: &Config,
    keep: BTreeSet<String>,
    memory: &mut Memory,
    out: &mut Outcome,
) {
    if memory.swept.as_ref() == Some(&keep) {
        return;
    }
    match sweep_room(client, &config.namespace, &config.node, &keep).await {
        Ok(deleted) => {
            for class in &deleted {
                tracing::info!("deleted this node's room for class {class}: no pool serves it now");
            }
            memory.room.retain(|class, _| keep.contains(class));
            memory.swept = Some(keep);
        }
        Err(e) => {
            tracing::warn!("{e}");
            out.errors.push(e);
        }
    }
}

/// Deletes this node's CSIStorageCapacity objects in `namespace` whose class is not in
/// `keep`; the classes deleted. The daemon calls it once at start when the node has no
/// pool at all (so no server runs to do it).
pub async fn sweep_room(
    client: &Client,
    namespace: &str,
    node: &str,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, String> {
    let api: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), namespace);
    let lp = ::kube::api::ListParams::default().labels(&crate::kube::builders::node_selector(node));
    let list = api.list(&lp).await.map_err(|e| {
        format!(
            "cannot list this node's CSIStorageCapacity objects in {namespace}: {}",
            describe(&e)
        )
    })?;
    let mut deleted = Vec::new();
    for room in list.items {
        let class = room.storage_class_name.clone();
        // Only what this node wrote: its own name for that class.
        let name = room.metadata.name.clone().unwrap_or_default();
        if keep.contains(&class) || name != objects::capacity_name(node, &class) {
            continue;
        }
        let dp = ::kube::api::DeleteParams {
            preconditions: room
                .metadata
                .uid
                .clone()
                .map(|uid| ::kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => deleted.push(class),
            Err(::kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "cannot delete CSIStorageCapacity {namespace}/{name}: {}",
                    describe(&e)
                ))
            }
        }
    }
    Ok(deleted)
}

async fn apply_driver(client: &Client) -> Result<(), String> {
    let api: Api<CSIDriver> = Api::all(client.clone());
    let driver = objects::csi_driver();
    let pp = PatchParams::apply(MANAGER).force();
    api.patch(objects::PROVISIONER, &pp, &Patch::Apply(&driver))
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "cannot publish CSIDriver {}: {}",
                objects::PROVISIONER,
                describe(&e)
            )
        })
}

/// The claim as the decision needs it; None for one without a uid.
fn claim_of(c: &PersistentVolumeClaim) -> Option<Claim> {
    let meta = &c.metadata;
    let spec = c.spec.as_ref()?;
    let bytes = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        q.and_then(|q| crate::kube::compare::quantity_bytes(&q.0))
    };
    Some(Claim {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        class: spec.storage_class_name.clone().unwrap_or_default(),
        request: bytes(
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage")),
        )
        .unwrap_or(0),
        selected_node: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(objects::SELECTED_NODE).cloned()),
        volume_name: spec.volume_name.clone().filter(|v| !v.is_empty()),
        deleting: meta.deletion_timestamp.is_some(),
        block: spec.volume_mode.as_deref() == Some("Block"),
        access_modes: spec.access_modes.clone().unwrap_or_default(),
        capacity: bytes(
            c.status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage")),
        ),
    })
}

fn volume_of(pv: &PersistentVolume) -> Option<Volume> {
    let meta = &pv.metadata;
    let spec = pv.spec.as_ref()?;
    Some(Volume {
        name: meta.name.clone()?,
        uid: meta.uid.clone().unwrap_or_default(),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        claim_uid: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(objects::ANNOTATION_CLAIM_UID).cloned()),
        phase: pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        reclaim_delete: spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete"),
        deleting: meta.deletion_timestamp.is_some(),
        has_finalizer: meta
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == objects::FINALIZER)),
        capacity: spec
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .and_then(|q| crate::kube::compare::quantity_bytes(&q.0))
            .unwrap_or(0),
    })
}

/// What one action came to.
enum Done {
    Provisioned { claim_uid: String },
    Reclaimed,
    Rescheduled,
    Expanded,
    Nothing,
    Failed(String),
}

struct Ctx<'a> {
    client: &'a Client,
    config: &'a Config,
    now: &'a Pools,
    posted: Arc<Mutex<BTreeSet<String>>>,
}

impl Ctx<'_> {
    fn pool(&self, mountpoint: &std::path::Path) -> Option<PoolSpec> {
        self.now
            .pools
            .iter()
            .find(|p| p.mountpoint == mountpoint)
            .cloned()
    }

    async fn execute(&self, action: Action) -> Done {
        let result = match action {
            Action::Provision {
                claim,
                pool,
                bytes,
                project_id,
            } => self.provision(&claim, &pool, bytes, project_id).await,
            Action::Publish { claim, served } => {
                self.create_pv(&claim, &served)
                    .await
                    .map(|()| Done::Provisioned {
                        claim_uid: claim.uid.clone(),
                    })
            }
            Action::Reschedule { claim, why } => self.reschedule(&claim, &why).await,
            Action::Refuse { claim, why } => {
                self.claim_event(&claim, "ProvisioningFailed", true, &why)
                    .await;
                Ok(Done::Nothing)
            }
            Action::Expand {
                claim,
                served,
                pv,
                bytes,
                project_id,
            } => self.expand(&claim, &served, &pv, bytes, project_id).await,
            Action::NoRoomToExpand { claim, pv, why } => {
                let msg = format!(
                    "PersistentVolume {pv} cannot grow to {} bytes: {why}",
                    claim.request
                );
                self.claim_event(&claim, "ExpansionFailed", true, &msg)
                    .await;
                Ok(Done::Nothing)
            }
            Action::Reclaim { volume, served } => self.reclaim(&volume, served.as_ref()).await,
            Action::RemoveOrphan { served } => self.remove_orphan(&served).await,
        };
        result.unwrap_or_else(Done::Failed)
    }

    async fn provision(
        &self,
        claim: &Claim,
        pool: &std::path::Path,
        bytes: u64,
        project_id: u32,
    ) -> Result<Done, String> {
        let spec = self
            .pool(pool)
            .ok_or_else(|| format!("pool {} is gone", pool.display()))?;
        let (uid, who) = (claim.uid.clone(), claim.key());
        let served = crate::host::threads::on_thread("dynamic-volumes", move || {
            volumes::make(&spec, &uid, &who, bytes, project_id)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("claim {}: {e}", claim.key()))?;
        self.create_pv(claim, &served).await?;
        tracing::info!(
            message_id = crate::logging::message_id::VOLUME_PUBLISHED,
            claim = %claim.key(),
            pv = %objects::pv_name(&claim.uid),
            "dynamic volume {} of {bytes} bytes for claim {} on {}",
            served.path.display(),
            claim.key(),
            pool.display()
        );
        Ok(Done::Provisioned {
            claim_uid: claim.uid.clone(),
        })
    }

    async fn create_pv(&self, claim: &Claim, served: &Served) -> Result<(), String> {
        let pool = self
            .pool(&served.pool)
            .ok_or_else(|| format!("pool {} is gone", served.pool.display()))?;
        let class = self
            .now
            .classes
            .iter()
            .find(|c| c.name == pool.storage_class)
            .ok_or_else(|| {
                format!(
                    "storage class {} is gone from the policy",
                    pool.storage_class
                )
            })?;
        let claim_ref = objects::ClaimRef {
            uid: claim.uid.clone(),
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            access_modes: if claim.access_modes.is_empty() {
                vec!["ReadWriteOnce".to_string()]
            } else {
                claim.access_modes.clone()
            },
        };
        let bytes = served
            .bytes
            .unwrap_or_else(|| accounting::round_up(claim.request));
        let pv = objects::claim_pv(
            &self.config.node,
            &claim_ref,
            &pool,
            &served.path,
            bytes,
            class,
        );
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => Ok(()),
            // Made before (a pass that saw the directory but not yet the PV's event).
            Err(::kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(format!(
                "cannot create PersistentVolume {} for claim {}: {}",
                objects::pv_name(&claim.uid),
                claim.key(),
                describe(&e)
            )),
        }
    }

    /// The reschedule protocol: without `selected-node` the scheduler places the claim's
    /// pod again, with the room now published.
    async fn reschedule(&self, claim: &Claim, why: &str) -> Result<Done, String> {
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &claim.namespace);
        let patch = serde_json::json!({
            "metadata": {"uid": claim.uid, "annotations": {objects::SELECTED_NODE: null}}
        });
        api.patch(&claim.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                format!(
                    "cannot give claim {} back to the scheduler: {}",
                    claim.key(),
                    describe(&e)
                )
            })?;
        tracing::warn!(claim = %claim.key(), "{why}; the claim goes back to the scheduler");
        self.claim_event(claim, "NoRoomOnNode", true, &format!("{why}: rescheduled"))
            .await;
        Ok(Done::Rescheduled)
    }

    async fn expand(
        &self,
        claim: &Claim,
        served: &Served,
        pv: &str,
        bytes: u64,
        project_id: u32,
    ) -> Result<Done, String> {
        let spec = self
            .pool(&served.pool)
            .ok_or_else(|| format!("pool {} is gone", served.pool.display()))?;
        if served.bytes.unwrap_or_default() < bytes {
            let s = served.clone();
            crate::host::threads::on_thread("dynamic-volumes", move || {
                volumes::grow(&spec, &s, bytes, project_id)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("claim {}: {e}", claim.key()))?;
        }
        let q = crate::kube::builders::quantity(bytes);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let patch = serde_json::json!({"spec": {"capacity": {"storage": q}}});
        pvs.patch(pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                format!(
                    "cannot record the new size on PersistentVolume {pv}: {}",
                    describe(&e)
                )
            })?;
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &claim.namespace);
        let status = serde_json::json!({"status": {"capacity": {"storage": q}}});
        claims
            .patch_status(&claim.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| {
                format!(
                    "cannot record the new size on claim {}: {}",
                    claim.key(),
                    describe(&e)
                )
            })?;
        tracing::info!(claim = %claim.key(), pv = %pv, "dynamic volume grown online to {bytes} bytes");
        Ok(Done::Expanded)
    }

    async fn reclaim(&self, v: &Volume, served: Option<&Served>) -> Result<Done, String> {
        if let Some(s) = served {
            let spec = self.pool(&s.pool).ok_or_else(|| {
                format!("pool {} of {} is not served now", s.pool.display(), v.name)
            })?;
            let s2 = s.clone();
            let removed = crate::host::threads::on_thread("dynamic-volumes", move || {
                volumes::remove(&spec, &s2)
            })
            .await
            .map_err(|e| e.to_string())?;
            if let Err(e) = removed {
                if matches!(
                    e,
                    volumes::VolumeError::Scrub(crate::kube::ScrubError::InUse { .. })
                ) {
                    self.pv_event(v, "VolumeInUse", &e.to_string()).await;
                }
                return Err(format!("PersistentVolume {}: {e}", v.name));
            }
        }
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        if v.has_finalizer {
            let current = api.get_opt(&v.name).await.map_err(|e| describe(&e))?;
            if let Some(pv) = current {
                let rest: Vec<String> = pv
                    .metadata
                    .finalizers
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|f| f != objects::FINALIZER)
                    .collect();
                let patch = serde_json::json!({"metadata": {
                    "finalizers": rest,
                    "resourceVersion": pv.metadata.resource_version,
                }});
                api.patch(&v.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot release PersistentVolume {}: {}",
                            v.name,
                            describe(&e)
                        )
                    })?;
            }
        }
        if !v.deleting {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(v.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&v.name, &dp).await {
                Ok(_) => {}
                Err(::kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(format!(
                        "cannot delete PersistentVolume {}: {}",
                        v.name,
                        describe(&e)
                    ))
                }
            }
        }
        tracing::info!(
            message_id = crate::logging::message_id::VOLUME_REMOVED,
            pv = %v.name,
            "dynamic volume reclaimed: its directory is gone, then its PersistentVolume"
        );
        Ok(Done::Reclaimed)
    }

    async fn remove_orphan(&self, s: &Served) -> Result<Done, String> {
        let spec = self
            .pool(&s.pool)
            .ok_or_else(|| format!("pool {} is not served now", s.pool.display()))?;
        let s2 = s.clone();
        crate::host::threads::on_thread("dynamic-volumes", move || volumes::remove(&spec, &s2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", s.path.display()))?;
        tracing::warn!(path = %s.path.display(), "removed a dynamic volume directory no claim or PersistentVolume stands for");
        Ok(Done::Nothing)
    }

    /// An Event about a claim, in its namespace, posted once per claim, reason and text.
    async fn claim_event(&self, claim: &Claim, reason: &str, warning: bool, message: &str) {
        let involved = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(claim.namespace.clone()),
            name: Some(claim.name.clone()),
            uid: Some(claim.uid.clone()),
            ..ObjectReference::default()
        };
        let name = format!(
            "{}.{}.{}",
            claim.name,
            reason.to_ascii_lowercase(),
            short_hash(&format!("{}\0{reason}\0{message}", claim.uid))
        );
        self.post(&claim.namespace, name, involved, reason, warning, message)
            .await;
    }

    async fn pv_event(&self, v: &Volume, reason: &str, message: &str) {
        let involved = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolume".into()),
            name: Some(v.name.clone()),
            uid: Some(v.uid.clone()),
            ..ObjectReference::default()
        };
        let name = format!(
            "{}.{}.{}",
            v.name,
            reason.to_ascii_lowercase(),
            short_hash(&v.uid)
        );
        self.post(
            crate::kube::client::EVENT_NAMESPACE,
            name,
            involved,
            reason,
            true,
            message,
        )
        .await;
    }

    async fn post(
        &self,
        namespace: &str,
        name: String,
        involved: ObjectReference,
        reason: &str,
        warning: bool,
        message: &str,
    ) {
        if let Ok(mut posted) = self.posted.lock() {
            if !posted.insert(name.clone()) {
                return;
            }
        }
        let message = crate::kube::events::shorten(message.to_string());
        let mut ev: Event = event(
            name,
            &self.config.node,
            EventText {
                involved,
                reason,
                action: reason,
                warning,
                message: &message,
            },
        );
        ev.metadata.namespace = Some(namespace.to_string());
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {}
            Err(::kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => tracing::warn!(
                "cannot post Event {reason} in {namespace}: {}",
                describe(&e)
            ),
        }
    }
}
