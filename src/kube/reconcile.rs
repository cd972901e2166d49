//! One reconcile pass: make this node's kvstrap PVs in the cluster equal what is provisioned.
//! Vanished volumes: PV deleted if Available, kept and reported if Bound or Released.
//! Released + Delete: scrub, then delete and re-create Available. Retain: left, reported.
//! A PV that disappeared while its volume exists is re-created only after a scrub.
//! A Bound PV is never deleted: every delete carries the uid and resourceVersion of a PV
//! seen unbound, so a bind in between makes the API server refuse the delete.

use super::builders::{node_selector, LABEL_MANAGED_BY, MANAGER};
use super::publisher::VolumePublication;
use super::scrub::{Ledger, LedgerEntry, LedgerError, Scrubber};
use super::{Desired, DesiredVolume};
use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use ::kube::Client;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, PersistentVolume};
use k8s_openapi::api::storage::v1::StorageClass as K8sStorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Namespace of the Events kvstrap reports about (cluster-scoped) PVs, as kubelet does.
pub const EVENT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot list the PersistentVolumes of node {node}: {source}")]
    List { node: String, source: ::kube::Error },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What one pass did and what is still outstanding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Objects (StorageClasses and PVs) applied in this pass.
    pub applied: usize,
    /// PVs deleted because their volume is gone (they were Available).
    pub deleted: Vec<String>,
    /// Volumes scrubbed in this pass.
    pub scrubbed: Vec<String>,
    /// PVs whose volume is gone but which are Bound or Released: kept, reported.
    pub kept: Vec<String>,
    /// Released PVs with reclaim policy Retain, left for the admin.
    pub retained: Vec<String>,
    /// Desired objects not yet confirmed in the cluster.
    pub pending: usize,
    pub errors: Vec<String>,
    /// Per volume name.
    pub volumes: BTreeMap<String, VolumePublication>,
}

/// What to do about one desired volume.
enum Action {
    /// Nothing: present and already applied with this content.
    Keep,
    Apply,
    /// The PV vanished after it was published: scrub, then apply.
    ScrubThenApply,
    /// Released with reclaim Delete: scrub, delete (claimRef cannot be cleared by apply),
    /// then apply.
    Recycle {
        uid: Option<String>,
        rv: Option<String>,
    },
    /// Released with reclaim Retain: left alone.
    Retain,
    /// Being deleted (by an admin): re-created, after a scrub, once it is gone.
    Terminating,
}

/// The state a publisher keeps between passes.
pub struct Reconciler {
    pub node: String,
    pub state_dir: PathBuf,
    pub scrubber: Arc<dyn Scrubber>,
    pub concurrency: usize,
    ledger: Ledger,
    /// Ledger was lost: every missing PV is treated as published before.
    conservative: bool,
    /// PV name -> fingerprint of what was last applied successfully.
    applied: HashMap<String, u64>,
    /// (PV, reason) already reported as an Event.
    reported: HashSet<(String, &'static str)>,
}

impl Reconciler {
    pub fn new(
        node: &str,
        state_dir: PathBuf,
        scrubber: Arc<dyn Scrubber>,
        concurrency: usize,
    ) -> Self {
        let (ledger, conservative) = Ledger::load(&state_dir);
        Reconciler {
            node: node.to_string(),
            state_dir,
            scrubber,
            concurrency: concurrency.max(1),
            ledger,
            conservative,
            applied: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// One full pass. Fails as a whole only when the cluster cannot be listed or the
    /// ledger cannot be written; per-object failures are in `errors` and `pending`.
    pub async fn pass(
        &mut self,
        client: &Client,
        desired: &Desired,
    ) -> Result<PassReport, ReconcileError> {
        let mut report = PassReport::default();
        self.apply_classes(client, desired, &mut report).await;
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let lp = ListParams::default().labels(&node_selector(&self.node));
        let observed = pvs.list(&lp).await.map_err(|source| ReconcileError::List {
            node: self.node.clone(),
            source,
        })?;
        let observed: BTreeMap<String, PersistentVolume> = observed
            .items
            .into_iter()
            .map(|pv| (pv.metadata.name.clone().unwrap_or_default(), pv))
            .collect();
        let wanted: HashSet<&str> = desired.volumes.iter().map(DesiredVolume::pv_name).collect();
        self.handle_vanished(client, &observed, &wanted, &mut report)
            .await;

        let actions: Vec<(&DesiredVolume, Action)> = desired
            .volumes
            .iter()
            .map(|v| (v, self.decide(v, observed.get(v.pv_name()))))
            .collect();
        self.record_intent(&actions)?;
        // Owned jobs: the stream's futures must not borrow from this stack frame.
        let jobs: Vec<(DesiredVolume, Action)> =
            actions.into_iter().map(|(v, a)| (v.clone(), a)).collect();
        let results: Vec<(String, Result<Outcome, String>)> = stream::iter(jobs)
            .map(|(v, action)| {
                let client = client.clone();
                let scrubber = self.scrubber.clone();
                async move {
                    let name = v.pv_name().to_string();
                    (name, execute(&client, scrubber, &v, action).await)
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        self.record_outcomes(client, desired, &observed, results, &mut report)
            .await;
        // Entries of published volumes stay even when the volume vanished: if its disk
        // comes back, the volume is scrubbed before it is published again.
        let keep = |pv: &String, e: &mut LedgerEntry| {
            e.published || wanted.contains(pv.as_str()) || observed.contains_key(pv)
        };
        self.ledger.volumes.retain(keep);
        self.ledger.save(&self.state_dir)?;
        Ok(report)
    }

    async fn apply_classes(&mut self, client: &Client, desired: &Desired, report: &mut PassReport) {
        let api: Api<K8sStorageClass> = Api::all(client.clone());
        let pp = PatchParams::apply(MANAGER).force();
        // One cheap list, so a class deleted by hand is noticed and re-created.
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
        let present: HashSet<String> = match api.list_metadata(&lp).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
            Err(_) => HashSet::new(),
        };
        for sc in &desired.storage_classes {
            let name = sc.metadata.name.clone().unwrap_or_default();
            let key = format!("storageclass/{name}");
            let fp = fingerprint(sc);
            if present.contains(&name) && self.applied.get(&key) == Some(&fp) {
                continue;
            }
            match api.patch(&name, &pp, &Patch::Apply(sc)).await {
                Ok(_) => {
                    report.applied += 1;
                    self.applied.insert(key, fp);
                }
                Err(e) => {
                    report.pending += 1;
                    report
                        .errors
                        .push(format!("StorageClass {name}: {}", describe(&e)));
                }
            }
        }
    }

    /// PVs of this node whose volume is gone.
    async fn handle_vanished(
        &mut self,
        client: &Client,
        observed: &BTreeMap<String, PersistentVolume>,
        wanted: &HashSet<&str>,
        report: &mut PassReport,
    ) {
        let api: Api<PersistentVolume> = Api::all(client.clone());
        for (name, pv) in observed
            .iter()
            // Terminating PVs are on their way out already.
            .filter(|(n, pv)| {
                !wanted.contains(n.as_str()) && pv.metadata.deletion_timestamp.is_none()
            })
        {
            let phase = phase(pv);
            let claimed = pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_some());
            if claimed || matches!(phase.as_deref(), Some("Bound" | "Released")) {
                report.kept.push(name.clone());
                let msg = format!(
                    "the volume of PersistentVolume {name} no longer exists on node {}, but the PV \
                     is {}: kvstrap keeps it; delete the claim and the PV when the data is not needed",
                    self.node,
                    phase.as_deref().unwrap_or("claimed")
                );
                self.report_once(client, pv, "VolumeMissing", &msg).await;
                continue;
            }
            match delete_unbound(&api, pv).await {
                Ok(()) => {
                    tracing::info!(pv = %name, "deleted PersistentVolume whose volume no longer exists");
                    report.deleted.push(name.clone());
                    self.applied.remove(name);
                }
                Err(e) => report
                    .errors
                    .push(format!("delete PersistentVolume {name}: {e}")),
            }
        }
    }

    fn decide(&self, v: &DesiredVolume, observed: Option<&PersistentVolume>) -> Action {
        let name = v.pv_name();
        if observed.is_some_and(|pv| pv.metadata.deletion_timestamp.is_some()) {
            return Action::Terminating;
        }
        let Some(pv) = observed else {
            let entry = self.ledger.volumes.get(name);
            let exposed = entry.map_or(self.conservative, |e| e.published);
            return if exposed {
                Action::ScrubThenApply
            } else {
                Action::Apply
            };
        };
        if phase(pv).as_deref() == Some("Released") {
            let reclaim = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
            return if reclaim == Some("Delete") {
                let meta = &pv.metadata;
                Action::Recycle {
                    uid: meta.uid.clone(),
                    rv: meta.resource_version.clone(),
                }
            } else {
                Action::Retain
            };
        }
        if self.applied.get(name) == Some(&fingerprint(&v.pv)) {
            Action::Keep
        } else {
            Action::Apply
        }
    }

    /// Before anything is applied, the ledger says it may be in the cluster: a PV deleted
    /// by hand after a crash right after the apply is still scrubbed before re-publication.
    fn record_intent(&mut self, actions: &[(&DesiredVolume, Action)]) -> Result<(), LedgerError> {
        let mut changed = false;
        for (v, action) in actions {
            if matches!(action, Action::Retain) {
                continue;
            }
            let entry = self
                .ledger
                .volumes
                .entry(v.pv_name().to_string())
                .or_insert_with(|| {
                    changed = true;
                    LedgerEntry {
                        volume: v.spec.name.clone(),
                        ..LedgerEntry::default()
                    }
                });
            if !entry.published {
                entry.published = true;
                changed = true;
            }
        }
        if changed {
            self.ledger.save(&self.state_dir)?;
        }
        Ok(())
    }

    async fn record_outcomes(
        &mut self,
        client: &Client,
        desired: &Desired,
        observed: &BTreeMap<String, PersistentVolume>,
        results: Vec<(String, Result<Outcome, String>)>,
        report: &mut PassReport,
    ) {
        let by_name: HashMap<&str, &DesiredVolume> =
            desired.volumes.iter().map(|v| (v.pv_name(), v)).collect();
        let mut results: HashMap<String, Result<Outcome, String>> = results.into_iter().collect();
        for v in &desired.volumes {
            let name = v.pv_name();
            let result = results.remove(name).unwrap_or(Err("not attempted".into()));
            let old_phase = observed.get(name).and_then(phase);
            let view = match result {
                Ok(outcome) => {
                    self.apply_outcome(client, by_name[name], observed.get(name), outcome, report)
                        .await
                }
                Err(e) => {
                    report.pending += 1;
                    report.errors.push(format!("PersistentVolume {name}: {e}"));
                    VolumePublication {
                        pv_name: name.to_string(),
                        published: observed.contains_key(name),
                        phase: old_phase,
                    }
                }
            };
            if let Some(entry) = self.ledger.volumes.get_mut(name) {
                entry.phase = view.phase.clone();
                entry.in_cluster = view.published;
            }
            report.volumes.insert(v.spec.name.clone(), view);
        }
    }

    async fn apply_outcome(
        &mut self,
        client: &Client,
        v: &DesiredVolume,
        observed: Option<&PersistentVolume>,
        outcome: Outcome,
        report: &mut PassReport,
    ) -> VolumePublication {
        let name = v.pv_name().to_string();
        if outcome.scrubbed {
            report.scrubbed.push(v.spec.name.clone());
            if let Some(e) = self.ledger.volumes.get_mut(&name) {
                e.last_scrub = Some(unix_now());
            }
        }
        let phase = match (&outcome.applied, observed) {
            (Some(applied_phase), _) => {
                report.applied += 1;
                self.applied.insert(name.clone(), fingerprint(&v.pv));
                applied_phase.clone()
            }
            (None, Some(pv)) => {
                if outcome.retained {
                    report.retained.push(name.clone());
                    let msg = format!(
                        "PersistentVolume {name} is Released with reclaim policy Retain: kvstrap leaves \
                         it and its data; delete the PV to have the volume scrubbed and published again"
                    );
                    self.report_once(client, pv, "ReleasedRetained", &msg).await;
                }
                phase(pv)
            }
            (None, None) => None,
        };
        let published = outcome.applied.is_some() || (observed.is_some() && !outcome.deleted);
        VolumePublication {
            pv_name: name,
            published,
            phase,
        }
    }

    /// Logs and posts an Event about `pv`, once per PV and reason while the process lives.
    async fn report_once(
        &mut self,
        client: &Client,
        pv: &PersistentVolume,
        reason: &'static str,
        msg: &str,
    ) {
        let name = pv.metadata.name.clone().unwrap_or_default();
        if !self.reported.insert((name.clone(), reason)) {
            return;
        }
        tracing::warn!(pv = %name, reason, "{msg}");
        let api: Api<Event> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
        if let Err(e) = api
            .create(&PostParams::default(), &event(&self.node, pv, reason, msg))
            .await
        {
            tracing::warn!(pv = %name, error = %describe(&e), "cannot post Event");
            self.reported.remove(&(name, reason));
        }
    }

    /// Publication state of every volume as last recorded (for `kvstrap volumes`).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

/// What happened to one desired volume.
#[derive(Default)]
struct Outcome {
    scrubbed: bool,
    deleted: bool,
    retained: bool,
    /// Applied; with the phase the API server returned.
    applied: Option<Option<String>>,
}

async fn execute(
    client: &Client,
    scrubber: Arc<dyn Scrubber>,
    v: &DesiredVolume,
    action: Action,
) -> Result<Outcome, String> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let mut out = Outcome::default();
    match action {
        Action::Keep => return Ok(out),
        Action::Terminating => {
            let name = v.pv_name();
            return Err(format!(
                "PersistentVolume {name} is being deleted; re-published once gone"
            ));
        }
        Action::Retain => {
            out.retained = true;
            return Ok(out);
        }
        Action::Apply => {}
        Action::ScrubThenApply => {
            // Missing from the labelled list is not proof of absence: a PV whose labels were
            // edited away may still be Bound and in use. Scrub only what truly is gone.
            match api.get_opt(v.pv_name()).await.map_err(|e| describe(&e))? {
                None => out.scrubbed = scrub(scrubber, v).await?,
                Some(_) => {
                    tracing::warn!(pv = %v.pv_name(), "PV lost kvstrap's labels; restoring them, no scrub")
                }
            }
        }
        Action::Recycle { uid, rv } => {
            out.scrubbed = scrub(scrubber, v).await?;
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: rv,
                }),
                ..DeleteParams::default()
            };
            delete(&api, v.pv_name(), &dp).await?;
            out.deleted = true;
            tracing::info!(pv = %v.pv_name(), "released volume scrubbed; re-publishing it as Available");
        }
    }
    let pp = PatchParams::apply(MANAGER).force();
    let applied = api
        .patch(v.pv_name(), &pp, &Patch::Apply(&v.pv))
        .await
        .map_err(|e| describe(&e))?;
    if applied.metadata.deletion_timestamp.is_some() {
        // The delete of a recycled PV has not finished: the next pass re-creates it.
        return Err(format!(
            "PersistentVolume {} is still being deleted; retrying",
            v.pv_name()
        ));
    }
    out.applied = Some(phase(&applied));
    Ok(out)
}

async fn scrub(scrubber: Arc<dyn Scrubber>, v: &DesiredVolume) -> Result<bool, String> {
    let spec = v.spec.clone();
    let name = spec.name.clone();
    match tokio::task::spawn_blocking(move || scrubber.scrub(&spec)).await {
        Ok(Ok(())) => {
            tracing::info!(volume = %name, "volume scrubbed");
            Ok(true)
        }
        Ok(Err(e)) => Err(format!(
            "scrub of volume {name} failed, not publishing it: {e}"
        )),
        Err(e) => Err(format!("scrub of volume {name} did not finish: {e}")),
    }
}

/// Deletes a PV only in the exact version seen unbound (uid + resourceVersion preconditions).
async fn delete_unbound(api: &Api<PersistentVolume>, pv: &PersistentVolume) -> Result<(), String> {
    let meta = &pv.metadata;
    let pre = Preconditions {
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
    };
    let dp = DeleteParams {
        preconditions: Some(pre),
        ..DeleteParams::default()
    };
    delete(api, meta.name.as_deref().unwrap_or_default(), &dp).await
}

async fn delete(api: &Api<PersistentVolume>, name: &str, dp: &DeleteParams) -> Result<(), String> {
    match api.delete(name, dp).await {
        Ok(_) => Ok(()),
        Err(::kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(describe(&e)),
    }
}

fn phase(pv: &PersistentVolume) -> Option<String> {
    pv.status.as_ref().and_then(|s| s.phase.clone())
}

/// What a PV or class looked like when applied (a hash of its JSON; in memory only).
fn fingerprint<T: serde::Serialize>(object: &T) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_vec(object).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// One line: API errors with their code and message, others as they print.
pub fn describe(e: &::kube::Error) -> String {
    match e {
        ::kube::Error::Api(s) => {
            format!("API server answered {} {}: {}", s.code, s.reason, s.message)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

fn event(node: &str, pv: &PersistentVolume, reason: &str, message: &str) -> Event {
    let now = jiff_now();
    let name = pv.metadata.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", unix_nanos())),
            namespace: Some(EVENT_NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("PersistentVolume".to_string()),
            name: Some(name),
            uid: pv.metadata.uid.clone(),
            resource_version: pv.metadata.resource_version.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some("Warning".to_string()),
        source: Some(EventSource {
            component: Some(MANAGER.to_string()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some(MANAGER.to_string()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        ..Event::default()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
