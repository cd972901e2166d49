//! One reconcile pass: make this node's kvstrap PVs in the cluster equal what is provisioned.
//! Vanished volumes: PV deleted if Available, or Released with reclaim Delete (its volume
//! cannot be scrubbed; if the disk comes back, the volume is scrubbed before it is
//! published again); kept and reported if Bound, or Released with Retain.
//! Volumes of a draining disk (`kvstrap drain`): the same, and each pass says which PVs
//! still hold the disk (`PassReport::draining`).
//! Released + Delete: scrub, then delete and re-create Available. Retain: left, reported.
//! Failed + Delete (left so by kube-controller-manager before PVs carried kvstrap's
//! provisioned-by annotation): taken back like Released.
//! Nothing is written when the cluster already holds what is wanted: the listed objects
//! are compared with the wanted ones field by field (server defaults ignored).
//! A PV that disappeared while its volume exists is re-created only after a scrub.
//! A Bound PV is never deleted: every delete carries the uid and resourceVersion of a PV
//! seen unbound, so a bind in between makes the API server refuse the delete.

use super::builders::{node_selector, LABEL_MANAGED_BY, MANAGER};
use super::client::{describe, EVENT_NAMESPACE};
use super::compare::covers;
use super::scrub::{Ledger, LedgerEntry, LedgerError, Scrubber};
use super::{Desired, DesiredVolume};
use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use ::kube::Client;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Event, ObjectReference, PersistentVolume};
use k8s_openapi::api::storage::v1::StorageClass as K8sStorageClass;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a recycled PV may stay terminating (the pv-protection finalizer is removed
/// within a second or two by kube-controller-manager) before the pass reports it.
const DELETE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot list the PersistentVolumes of node {node}: {source}")]
    List { node: String, source: ::kube::Error },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Publication of one volume, for `kvstrap volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VolumePublication {
    pub pv_name: String,
    /// The PV is in the cluster.
    pub published: bool,
    /// Its phase there: Available, Bound, Released, Failed.
    pub phase: Option<String>,
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
    /// Per draining disk (identity): the PVs of it still in the cluster after this pass.
    /// A disk is in the map only when the pass knew it was draining.
    pub draining: BTreeMap<String, Vec<DrainBlocker>>,
}

/// A PersistentVolume that keeps a draining disk from being drained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainBlocker {
    pub pv: String,
    /// Bound, Released, Available, ... as the API server said.
    pub phase: Option<String>,
    /// `namespace/name` of its claim.
    pub claim: Option<String>,
}

/// What to do about one desired volume.
enum Action {
    /// Nothing: present and already applied with this content.
    Keep,
    Apply,
    /// The PV vanished after it was published: scrub, then apply.
    ScrubThenApply,
    /// Released (or Failed) with reclaim Delete: scrub, delete (claimRef cannot be
    /// cleared by apply), wait until it is gone, then apply.
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
        let ledger_before = self.ledger.clone();
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let lp = ListParams::default().labels(&node_selector(&self.node));
        // The classes and the PV list in parallel: a pass with nothing to do is two lists.
        let (observed, ()) = tokio::join!(
            pvs.list(&lp),
            self.apply_classes(client, desired, &mut report)
        );
        let observed = observed.map_err(|source| ReconcileError::List {
            node: self.node.clone(),
            source,
        })?;
        let observed: BTreeMap<String, PersistentVolume> = observed
            .items
            .into_iter()
            .map(|pv| (pv.metadata.name.clone().unwrap_or_default(), pv))
            .collect();
        let wanted: HashSet<&str> = desired.volumes.iter().map(DesiredVolume::pv_name).collect();
        self.handle_vanished(client, &observed, &wanted, desired, &mut report)
            .await;

        let actions: Vec<(&DesiredVolume, Action)> = desired
            .volumes
            .iter()
            .map(|v| (v, self.decide(v, observed.get(v.pv_name()))))
            .collect();
        self.record_intent(&actions)?;
        // Owned jobs: the stream's futures must not borrow from this stack frame.
        let jobs: Vec<(DesiredVolume, Action)> = actions
            .into_iter()
            .map(|(v, a)| (honour_admin_reclaim(v, observed.get(v.pv_name())), a))
            .collect();
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
            if e.kept && !observed.contains_key(pv) {
                // A kept PV deleted by hand: nothing of it is left in the cluster.
                e.kept = false;
                e.in_cluster = false;
                e.phase = None;
            }
            e.published || wanted.contains(pv.as_str()) || observed.contains_key(pv)
        };
        self.ledger.volumes.retain(keep);
        // A pass that changed nothing costs no fsync either.
        if self.ledger != ledger_before || !super::scrub::Ledger::path(&self.state_dir).exists() {
            self.ledger.save(&self.state_dir)?;
        }
        Ok(report)
    }

    async fn apply_classes(&self, client: &Client, desired: &Desired, report: &mut PassReport) {
        let api: Api<K8sStorageClass> = Api::all(client.clone());
        let pp = PatchParams::apply(MANAGER).force();
        // One list, so a class deleted or edited by hand is noticed and put back, and an
        // unchanged class costs no write. A failed list only means applying them all.
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
        let present: HashMap<String, K8sStorageClass> = match api.list(&lp).await {
            Ok(list) => list
                .items
                .into_iter()
                .map(|o| (o.metadata.name.clone().unwrap_or_default(), o))
                .collect(),
            Err(_) => HashMap::new(),
        };
        for sc in &desired.storage_classes {
            let name = sc.metadata.name.clone().unwrap_or_default();
            if present.get(&name).is_some_and(|have| covers(have, sc)) {
                continue;
            }
            match api.patch(&name, &pp, &Patch::Apply(sc)).await {
                Ok(_) => {
                    report.applied += 1;
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
        desired: &Desired,
        report: &mut PassReport,
    ) {
        let api: Api<PersistentVolume> = Api::all(client.clone());
        for identity in &desired.draining {
            report.draining.insert(identity.clone(), Vec::new());
        }
        for (name, pv) in observed
            .iter()
            .filter(|(n, _)| !wanted.contains(n.as_str()))
        {
            let draining = disk_identity(pv).filter(|id| desired.draining.contains(*id));
            // A dynamic volume's PV is the dynamic server's to keep and reclaim; it still
            // holds a draining disk.
            if super::dynamic::is_dynamic(pv) {
                if let Some(id) = draining {
                    report
                        .draining
                        .entry(id.to_string())
                        .or_default()
                        .push(DrainBlocker {
                            pv: name.clone(),
                            phase: phase(pv),
                            claim: claim_of(pv),
                        });
                }
                continue;
            }
            // Still in the cluster after this pass: for a draining disk, it holds the disk.
            let still_there = self
                .vanished_one(client, &api, name, pv, draining.is_some(), report)
                .await;
            if let (Some(id), true) = (draining, still_there) {
                report
                    .draining
                    .entry(id.to_string())
                    .or_default()
                    .push(DrainBlocker {
                        pv: name.clone(),
                        phase: phase(pv),
                        claim: claim_of(pv),
                    });
            }
        }
    }

    /// One PV whose volume is gone (or whose disk is draining): kept, or deleted when no
    /// claim holds it. True when it is still in the cluster after this.
    async fn vanished_one(
        &mut self,
        client: &Client,
        api: &Api<PersistentVolume>,
        name: &String,
        pv: &PersistentVolume,
        draining: bool,
        report: &mut PassReport,
    ) -> bool {
        // Terminating PVs are on their way out already.
        if pv.metadata.deletion_timestamp.is_some() {
            return true;
        }
        let phase = phase(pv);
        let claimed = pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_some());
        let reclaim = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
        let released = matches!(phase.as_deref(), Some("Released" | "Failed"));
        // Bound (or about to be), or released and kept for the admin: never deleted.
        let keep = if released {
            reclaim != Some("Delete")
        } else {
            claimed || phase.as_deref() == Some("Bound")
        };
        if keep {
            report.kept.push(name.clone());
            self.record_kept(name, pv);
            let state = phase.as_deref().unwrap_or("claimed");
            let (reason, msg) = if draining {
                (
                    "VolumeDraining",
                    format!(
                        "the disk of PersistentVolume {name} on node {} is draining, and the PV \
                         is {state}: kvstrap keeps it, and the disk in service, until it is released",
                        self.node
                    ),
                )
            } else {
                (
                    "VolumeMissing",
                    format!(
                        "the volume of PersistentVolume {name} no longer exists on node {}, but the PV \
                         is {state}: kvstrap keeps it; delete the claim and the PV when the data is not needed",
                        self.node
                    ),
                )
            };
            self.report_once(client, pv, reason, "KeepVolume", &msg)
                .await;
            return true;
        }
        match delete_unbound(api, pv).await {
            Ok(()) => {
                let why = if draining {
                    "its disk is draining"
                } else {
                    "its volume no longer exists"
                };
                tracing::info!(pv = %name, phase = phase.as_deref().unwrap_or("none"),
                    "deleted PersistentVolume: {why}");
                report.deleted.push(name.clone());
                false
            }
            Err(e) => {
                report
                    .errors
                    .push(format!("delete PersistentVolume {name}: {e}"));
                true
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
        let phase = phase(pv);
        let claimed = pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_some());
        // Failed comes only from a reclaim that failed: the claim is gone as for Released.
        if phase.as_deref() == Some("Released") || (phase.as_deref() == Some("Failed") && claimed) {
            let reclaim = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
            if reclaim == Some("Delete") && phase.as_deref() == Some("Failed") {
                let why = pv.status.as_ref().and_then(|s| s.message.as_deref());
                tracing::info!(pv = %name, reason = why.unwrap_or("none given"),
                    "taking back a PersistentVolume that kube-controller-manager marked Failed");
            }
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
        if covers(pv, &honour_admin_reclaim(v, Some(pv)).pv) {
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
            // A terminating PV is not applied now: its entry stays as it is (false after
            // kvstrap scrubbed it for a recycle), so the volume is not scrubbed twice.
            if !entry.published && !matches!(action, Action::Terminating) {
                entry.published = true;
                changed = true;
            }
            if entry.kept {
                entry.kept = false;
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
                // Scrubbed and not yet re-published: no claim can reach it meanwhile (the
                // old PV is Released or being deleted), so the next pass publishes it
                // without a second scrub.
                if outcome.applied.is_none() {
                    e.published = false;
                }
            }
        }
        if outcome.scrubbed && outcome.applied.is_some() {
            self.post_scrubbed(client, v).await;
        }
        if let Some(e) = &outcome.error {
            report.pending += 1;
            report.errors.push(format!("PersistentVolume {name}: {e}"));
        }
        if let Some(what) = &outcome.in_use {
            report.pending += 1;
            report
                .errors
                .push(format!("PersistentVolume {name}: {what}"));
            if let Some(pv) = observed {
                let msg = format!("PersistentVolume {name}: {what}");
                self.report_once(client, pv, "VolumeInUse", "KeepVolume", &msg)
                    .await;
            }
        }
        let phase = match (&outcome.applied, observed) {
            (Some(applied_phase), _) => {
                report.applied += 1;
                applied_phase.clone()
            }
            (None, Some(pv)) => {
                if outcome.retained {
                    report.retained.push(name.clone());
                    let msg = format!(
                        "PersistentVolume {name} is Released with reclaim policy Retain: kvstrap leaves \
                         it and its data; delete the PV to have the volume scrubbed and published again"
                    );
                    self.report_once(client, pv, "ReleasedRetained", "RetainVolume", &msg)
                        .await;
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
    /// The Event's name is derived from the PV, its claim and the reason, so a restarted
    /// kvstrap (or another `kvstrap apply`) finds it there (409) and posts no second one.
    async fn report_once(
        &mut self,
        client: &Client,
        pv: &PersistentVolume,
        reason: &'static str,
        action: &str,
        msg: &str,
    ) {
        let name = pv.metadata.name.clone().unwrap_or_default();
        if !self.reported.insert((name.clone(), reason)) {
            return;
        }
        let api: Api<Event> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
        let ev = event(&self.node, pv, reason, action, msg);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => tracing::warn!(pv = %name, reason, "{msg}"),
            Err(::kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(pv = %name, reason, "Event already posted")
            }
            Err(e) => {
                tracing::warn!(pv = %name, reason, "{msg}");
                tracing::warn!(pv = %name, error = %describe(&e),
                    "cannot post the Event about it to namespace {EVENT_NAMESPACE}; retrying on the next pass");
                self.reported.remove(&(name, reason));
            }
        }
    }

    /// A `VolumeScrubbed` Event on the Node once a scrubbed volume is published again: the
    /// operator sees on the Node that a tenant's data was destroyed and the volume reused.
    /// The key holds the scrub's time, so a volume scrubbed again later gets its own Event
    /// (the same name would be refused with 409 while the first one lives). A failed post
    /// is logged and not retried: the scrub is done and in the journal either way.
    async fn post_scrubbed(&self, client: &Client, v: &DesiredVolume) {
        let pv = v.pv_name();
        let at = self
            .ledger
            .volumes
            .get(pv)
            .and_then(|e| e.last_scrub)
            .unwrap_or_else(unix_now);
        let e = super::events::NodeEvent {
            reason: "VolumeScrubbed",
            warning: false,
            message: format!(
                "volume {} scrubbed (its data is gone) and published again as PersistentVolume {pv}",
                v.spec.name
            ),
            key: format!("{pv}\0{at}"),
        };
        if let Err(err) = super::events::post_event(client, &self.node, &e).await {
            tracing::warn!(pv = %pv, "{err}");
        }
    }

    /// The ledger remembers a PV kept for a vanished volume, for `kvstrap volumes`.
    fn record_kept(&mut self, name: &str, pv: &PersistentVolume) {
        let volume = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::builders::ANNOTATION_VOLUME).cloned())
            .unwrap_or_default();
        let entry = self
            .ledger
            .volumes
            .entry(name.to_string())
            .or_insert_with(|| LedgerEntry {
                volume,
                published: true,
                ..LedgerEntry::default()
            });
        entry.kept = true;
        entry.in_cluster = true;
        entry.phase = phase(pv);
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
    /// Why the volume is still pending after a partial success (scrubbed, not applied).
    error: Option<String>,
    /// Not scrubbed because something on the node uses the volume: what, in words.
    in_use: Option<String>,
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
                None => match scrub(scrubber, v).await {
                    Ok(done) => out.scrubbed = done,
                    Err(ScrubFailure::InUse(what)) => {
                        out.in_use = Some(what);
                        return Ok(out);
                    }
                    Err(ScrubFailure::Other(e)) => return Err(e),
                },
                Some(_) => {
                    tracing::warn!(pv = %v.pv_name(), "PV lost kvstrap's labels; restoring them, no scrub")
                }
            }
        }
        Action::Recycle { uid, rv } => {
            // The decision was made on the pass's list: the scrub goes ahead only if the
            // very PV seen released (same uid and resourceVersion) is still so now.
            if !still_released(&api, v.pv_name(), uid.as_deref(), rv.as_deref()).await? {
                out.error = Some(
                    "changed since it was seen released (bound again, edited or deleted): \
                     looked at again on the next pass"
                        .into(),
                );
                return Ok(out);
            }
            match scrub(scrubber, v).await {
                Ok(done) => out.scrubbed = done,
                Err(ScrubFailure::InUse(what)) => {
                    out.in_use = Some(what);
                    return Ok(out);
                }
                Err(ScrubFailure::Other(e)) => return Err(e),
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: rv,
                }),
                ..DeleteParams::default()
            };
            let old_uid = dp.preconditions.as_ref().and_then(|p| p.uid.clone());
            if let Err(e) = delete(&api, v.pv_name(), &dp).await {
                out.error = Some(e);
                return Ok(out);
            }
            out.deleted = true;
            // The pv-protection finalizer holds the old PV a moment: applying now would
            // only find it terminating.
            if let Err(e) = wait_gone(&api, v.pv_name(), old_uid.as_deref()).await {
                out.error = Some(e);
                return Ok(out);
            }
            tracing::info!(pv = %v.pv_name(), "released volume scrubbed; re-publishing it as Available");
        }
    }
    let pp = PatchParams::apply(MANAGER).force();
    let applied = match api.patch(v.pv_name(), &pp, &Patch::Apply(&v.pv)).await {
        Ok(pv) => pv,
        Err(e) if out.scrubbed => {
            out.error = Some(describe(&e));
            return Ok(out);
        }
        Err(e) => return Err(describe(&e)),
    };
    if applied.metadata.deletion_timestamp.is_some() {
        // Deleted by someone else meanwhile: the next pass re-creates it.
        out.error = Some(format!(
            "PersistentVolume {} is being deleted; re-published once gone",
            v.pv_name()
        ));
        return Ok(out);
    }
    out.applied = Some(phase(&applied));
    Ok(out)
}

/// Waits until the PV `name` with `uid` no longer exists (a new PV of that name counts).
async fn wait_gone(
    api: &Api<PersistentVolume>,
    name: &str,
    uid: Option<&str>,
) -> Result<(), String> {
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(pv)) if uid.is_some() && pv.metadata.uid.as_deref() != uid => return Ok(()),
            Ok(Some(pv)) if start.elapsed() >= DELETE_WAIT => {
                let finalizers = pv.metadata.finalizers.unwrap_or_default().join(", ");
                return Err(format!(
                    "deleted PersistentVolume {name} still exists after {}s (finalizers: {finalizers}); \
                     is kube-controller-manager running? Re-published once it is gone",
                    DELETE_WAIT.as_secs()
                ));
            }
            Ok(Some(_)) => {}
            Err(e) => return Err(describe(&e)),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// `v`, with the reclaim policy the PV has in the cluster when someone other than kvstrap
/// set it there (`kubectl patch pv ... Retain`): an admin's choice is kept.
fn honour_admin_reclaim(v: &DesiredVolume, observed: Option<&PersistentVolume>) -> DesiredVolume {
    let mut v = v.clone();
    let Some(pv) = observed else { return v };
    let theirs = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.clone());
    let owned_by_other = pv.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() != Some(MANAGER)
            && m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:persistentVolumeReclaimPolicy"))
                    .is_some()
            })
    });
    if owned_by_other && theirs.is_some() {
        if let Some(spec) = v.pv.spec.as_mut() {
            spec.persistent_volume_reclaim_policy = theirs;
        }
    }
    v
}

/// Whether the PV `name` is still the one seen released: same uid and resourceVersion.
async fn still_released(
    api: &Api<PersistentVolume>,
    name: &str,
    uid: Option<&str>,
    rv: Option<&str>,
) -> Result<bool, String> {
    let now = api.get_opt(name).await.map_err(|e| describe(&e))?;
    Ok(now.is_some_and(|pv| {
        pv.metadata.uid.as_deref() == uid && pv.metadata.resource_version.as_deref() == rv
    }))
}

/// Why a volume was not scrubbed.
enum ScrubFailure {
    /// Something on the node uses it (a pod's mount, a Block mapping): it waits, untouched.
    InUse(String),
    Other(String),
}

async fn scrub(scrubber: Arc<dyn Scrubber>, v: &DesiredVolume) -> Result<bool, ScrubFailure> {
    let spec = v.spec.clone();
    let name = spec.name.clone();
    match crate::host::threads::on_thread("scrub", move || scrubber.scrub(&spec)).await {
        Ok(Ok(())) => {
            tracing::info!(
                message_id = crate::logging::message_id::VOLUME_SCRUBBED,
                volume = %name,
                pv = %v.pv_name(),
                "volume {name} scrubbed"
            );
            Ok(true)
        }
        Ok(Err(e @ super::scrub::ScrubError::InUse { .. })) => {
            Err(ScrubFailure::InUse(e.to_string()))
        }
        Ok(Err(e)) => Err(ScrubFailure::Other(format!(
            "scrub of volume {name} failed, not publishing it: {e}"
        ))),
        Err(e) => Err(ScrubFailure::Other(format!(
            "scrub of volume {name} did not finish: {e}"
        ))),
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

/// The disk a PV's volume is on, as kvstrap annotated it.
pub fn disk_identity(pv: &PersistentVolume) -> Option<&str> {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::builders::ANNOTATION_DISK_IDENTITY))
        .map(String::as_str)
}

/// `namespace/name` of the claim a PV is bound (or was bound) to.
pub fn claim_of(pv: &PersistentVolume) -> Option<String> {
    let claim = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(format!(
        "{}/{}",
        claim.namespace.as_deref().unwrap_or_default(),
        claim.name.as_deref().unwrap_or_default()
    ))
}

/// A core/v1 Event about `pv`. With `eventTime` set the API server also demands `action`,
/// `reportingComponent` and `reportingInstance` (422 otherwise).
fn event(node: &str, pv: &PersistentVolume, reason: &str, action: &str, message: &str) -> Event {
    let name = pv.metadata.name.clone().unwrap_or_default();
    let claim = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.clone())
        .unwrap_or_default();
    let uid = pv.metadata.uid.clone().unwrap_or_default();
    let id = super::builders::short_hash(&format!("{uid}\0{claim}\0{reason}"));
    let involved = ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("PersistentVolume".to_string()),
        name: Some(name.clone()),
        uid: pv.metadata.uid.clone(),
        resource_version: pv.metadata.resource_version.clone(),
        ..ObjectReference::default()
    };
    let text = super::builders::EventText {
        involved,
        reason,
        action,
        warning: true,
        message,
    };
    let name = format!("{name}.{}.{id}", reason.to_ascii_lowercase());
    super::builders::event(name, node, text)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
