//! Disks in and out of service: drain, undrain, replace, forget, and a pass's settling of drains.
//!
//! What the operator says about a disk is kept in `<state>/disks.json` (see
//! [`crate::model::DiskService`]), keyed by the disk's stable identity. These functions
//! change only that record; the next converge pass does the rest (deleting unbound PVs,
//! unmounting a drained disk, provisioning a replacement). Nothing here writes to a disk.

use super::{Node, NodeError};
use crate::kube::reconcile::DrainBlocker;
use crate::model::{
    Disk, DiskService, Inventory, Plan, Replacement, ServicePhase, ServiceRecord, Step, Verdict,
};
use crate::plan::identity::disk_identity;
use crate::policy::Policy;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Journal id of a disk entering or leaving service (drained, undrained, replaced, forgotten).
pub const DISK_SERVICE_CHANGED: &str = crate::logging::message_id::DISK_SERVICE_CHANGED;

/// Why an operation on the record cannot be done; the text says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// What the operator named: a path (kernel name or a /dev/disk/by-* link), a by-id name,
/// a WWN, a serial, or an identity as kvstrap prints it (`serial:...`).
pub fn matches_disk(disk: &Disk, name: &str) -> bool {
    let name = name.trim();
    if name.is_empty() {
        return false;
    }
    let path = Path::new(name);
    let canonical = std::fs::canonicalize(path).ok();
    let lower = name.to_ascii_lowercase();
    let wwn = disk.wwn.as_deref().map(str::to_ascii_lowercase);
    disk.path == path
        || canonical.as_deref() == Some(disk.path.as_path())
        || disk.by_id.iter().any(|id| id == name)
        || disk_identity(disk) == name
        || disk.serial.as_deref().map(str::trim) == Some(name)
        || wwn.as_deref().is_some_and(|w| {
            w == lower || w.trim_start_matches("0x") == lower.trim_start_matches("0x")
        })
}

fn find<'a>(inventory: &'a Inventory, name: &str) -> Result<Option<&'a Disk>, ServiceError> {
    let found: Vec<&Disk> = inventory
        .disks
        .iter()
        .filter(|d| matches_disk(d, name))
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(ServiceError::Refused(format!(
            "{name:?} names {} disks ({}); name one by path or by-id",
            many.len(),
            many.iter()
                .map(|d| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The record entry a name refers to when the disk is not attached: by identity or by
/// the path it had when it was drained.
fn find_recorded(record: &DiskService, name: &str) -> Option<String> {
    record
        .out_of_service
        .iter()
        .find(|(id, r)| id.as_str() == name || r.path == Path::new(name))
        .map(|(id, _)| id.clone())
        .or_else(|| {
            record
                .replacements
                .iter()
                .find(|(id, r)| id.as_str() == name || r.path == Path::new(name))
                .map(|(id, _)| id.clone())
        })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A drain, as the record and the pass after it see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DrainEntry {
    pub identity: String,
    pub path: PathBuf,
    pub group: Option<String>,
    pub phase: ServicePhase,
    pub since_unix: u64,
    pub why: String,
    /// Attached now.
    pub present: bool,
    /// Users on this machine besides kvstrap (kubelet's mounts, holders).
    pub local_users: Vec<String>,
}

impl Node {
    fn save_service(&self, record: &DiskService) -> Result<(), NodeError> {
        crate::state::save_disk_service(&self.inputs.state_dir, record).map_err(NodeError::Record)
    }

    /// Mark a disk draining: nothing new binds to it from the next pass on. `why` says who
    /// asked (`kvstrap drain`, a D-Bus caller, `on_failure = "drain"`).
    pub fn drain(&self, policy: &Policy, name: &str, why: &str) -> Result<String, ServiceError> {
        let inventory = self.scan(Some(policy))?;
        let disk = find(&inventory, name)?.ok_or_else(|| {
            ServiceError::Refused(format!(
                "no disk {name:?} on this node (`kvstrap disks` lists them by path, by-id, WWN and serial)"
            ))
        })?;
        Ok(self.mark_draining(policy, &inventory, disk, why)?)
    }

    /// Record `disk` as draining (no scan: `inventory` is the look it was found in).
    fn mark_draining(
        &self,
        policy: &Policy,
        inventory: &Inventory,
        disk: &Disk,
        why: &str,
    ) -> Result<String, NodeError> {
        let identity = disk_identity(disk);
        let mut record = self.disk_service()?;
        if let Some(r) = record.out_of_service.get(&identity) {
            return Ok(format!(
                "{} ({identity}) is already {} since {} ({})",
                disk.path.display(),
                r.phase.as_str(),
                r.since_unix,
                r.why
            ));
        }
        let group = group_of(policy, inventory, &record, disk);
        record.out_of_service.insert(
            identity.clone(),
            ServiceRecord {
                phase: ServicePhase::Draining,
                path: disk.path.clone(),
                group,
                since_unix: now_unix(),
                why: why.to_string(),
            },
        );
        self.save_service(&record)?;
        tracing::warn!(disk = %disk.path.display(), identity = %identity, message_id = DISK_SERVICE_CHANGED,
            "disk is draining ({why}): its unbound PersistentVolumes go, bound ones stay until released");
        Ok(format!("{} ({identity}) is draining", disk.path.display()))
    }

    /// `on_failure = "drain"`: drain every disk whose health is `failed` in a group that
    /// says so, unless it is out of service already. Scans only when there is such a disk.
    pub fn drain_failed(
        &self,
        policy: &Policy,
        health: &crate::health::HealthMap,
    ) -> Result<Vec<String>, NodeError> {
        if failing_disks_to_drain(policy, health).next().is_none() {
            return Ok(Vec::new());
        }
        let record = self.disk_service()?;
        let recorded = |p: &PathBuf| record.out_of_service.values().any(|r| r.path == *p);
        if failing_disks_to_drain(policy, health).all(recorded) {
            return Ok(Vec::new());
        }
        let inventory = self.scan(Some(policy))?;
        let mut said = Vec::new();
        for path in failing_disks_to_drain(policy, health) {
            let Some(disk) = inventory.disks.iter().find(|d| d.path == *path) else {
                continue;
            };
            let group = group_of(policy, &inventory, &record, disk);
            let drains = group
                .and_then(|g| policy.disk_groups.iter().find(|x| x.name == g))
                .is_some_and(|g| g.on_failure == crate::policy::OnFailure::Drain);
            if drains && !record.out_of_service.contains_key(&disk_identity(disk)) {
                said.push(self.mark_draining(
                    policy,
                    &inventory,
                    disk,
                    "health failed (on_failure = \"drain\")",
                )?);
            }
        }
        Ok(said)
    }

    /// Put a drained or draining disk back in service; the next pass adopts it as it is.
    pub fn undrain(&self, policy: &Policy, name: &str) -> Result<String, ServiceError> {
        let inventory = self.scan(Some(policy))?;
        let mut record = self.disk_service()?;
        let identity = match find(&inventory, name)? {
            Some(disk) => disk_identity(disk),
            None => find_recorded(&record, name).ok_or_else(|| {
                ServiceError::Refused(format!("no disk {name:?} is attached or on record"))
            })?,
        };
        let Some(was) = record.out_of_service.remove(&identity) else {
            return Ok(format!("{name} ({identity}) is not out of service"));
        };
        self.save_service(&record)?;
        tracing::info!(disk = %was.path.display(), identity = %identity, message_id = DISK_SERVICE_CHANGED,
            "disk is back in service (it was {})", was.phase.as_str());
        Ok(format!(
            "{name} ({identity}) is back in service (it was {}); the next apply adopts and publishes it",
            was.phase.as_str()
        ))
    }

    /// Put `new` (blank) in the group of `old`, which must be drained or gone.
    pub fn replace(&self, policy: &Policy, old: &str, new: &str) -> Result<String, ServiceError> {
        let inventory = self.scan(Some(policy))?;
        let mut record = self.disk_service()?;
        let old_disk = find(&inventory, old)?;
        let old_id = match old_disk {
            Some(d) => disk_identity(d),
            None => find_recorded(&record, old).unwrap_or_else(|| old.to_string()),
        };
        let old_record = record.out_of_service.get(&old_id).cloned();
        if old_disk.is_some() && old_record.as_ref().map(|r| r.phase) != Some(ServicePhase::Drained)
        {
            return Err(ServiceError::Refused(format!(
                "{old} is still attached and not drained: `kvstrap drain {old}` first (its data is never touched while it serves)"
            )));
        }
        let Some(group) = old_record
            .as_ref()
            .and_then(|r| r.group.clone())
            .or_else(|| record.replacements.get(&old_id).map(|r| r.group.clone()))
        else {
            return Err(ServiceError::Refused(format!(
                "kvstrap has no record of {old}'s group: a disk that died without a drain is replaced \
                 when the policy's selectors pick the new disk; `kvstrap forget {old}` cleans up after it"
            )));
        };
        if policy.disk_groups.iter().all(|g| g.name != group) {
            return Err(ServiceError::Refused(format!(
                "{old} was in group {group:?}, which the policy no longer has"
            )));
        }
        let new_disk = find(&inventory, new)?
            .ok_or_else(|| ServiceError::Refused(format!("no disk {new:?} on this node")))?;
        let contents = crate::plan::ownership::contents_verdict(new_disk);
        if contents != Verdict::Free {
            return Err(ServiceError::Refused(format!(
                "{} is not blank ({}): a replacement must be an empty disk",
                new_disk.path.display(),
                contents.reason()
            )));
        }
        let new_id = disk_identity(new_disk);
        if new_id.starts_with("path:") {
            return Err(ServiceError::Refused(format!(
                "{} has no serial or WWN: a replacement is recorded by the disk's identity, and \
                 a kernel name can point at another disk after a reboot; list it in the group's \
                 devices instead",
                new_disk.path.display()
            )));
        }
        if let Some(g) = policy.disk_groups.iter().find(|g| g.name == group) {
            crate::plan::select::fits_kind(g, new_disk).map_err(|why| {
                ServiceError::Refused(format!(
                    "{} does not fit group {group:?}: {why}",
                    new_disk.path.display()
                ))
            })?;
        }
        if new_id == old_id {
            return Err(ServiceError::Refused(format!(
                "{old} and {new} are the same disk"
            )));
        }
        record.replacements.insert(
            new_id.clone(),
            Replacement {
                group: group.clone(),
                replaces: old_id.clone(),
                path: new_disk.path.clone(),
                since_unix: now_unix(),
            },
        );
        if old_disk.is_none() {
            // Gone and drained: nothing of it is left to keep out of service.
            record.out_of_service.remove(&old_id);
        }
        self.save_service(&record)?;
        tracing::warn!(disk = %new_disk.path.display(), identity = %new_id, replaces = %old_id,
            message_id = DISK_SERVICE_CHANGED, "disk put in place of {old_id} in group {group}");
        Ok(format!(
            "{} ({new_id}) takes the place of {old_id} in group {group:?}; the next apply provisions it",
            new_disk.path.display()
        ))
    }

    /// Crypto-erase a drained disk: every LUKS2 volume of kvstrap's on it loses its key
    /// slots (`kvstrap forget --erase`, under the applier lock). Only on the operator's
    /// explicit word, only once the disk is drained (nothing uses it, its mappings are
    /// closed); each erased header is logged with its own MESSAGE_ID and is never opened or
    /// formatted again. Returns what was erased, in words.
    pub fn erase(&self, policy: &Policy, name: &str) -> Result<String, ServiceError> {
        let inventory = self.scan(Some(policy))?;
        let disk = find(&inventory, name)?.ok_or_else(|| {
            ServiceError::Refused(format!(
                "no disk {name:?} is attached: a crypto-erase needs the disk (a disk that is gone \
                 keeps its data only as encrypted blocks nobody can open without its key)"
            ))
        })?;
        let record = self.disk_service()?;
        let phase = record
            .out_of_service
            .get(&disk_identity(disk))
            .map(|r| r.phase);
        if phase != Some(ServicePhase::Drained) {
            return Err(ServiceError::Refused(format!(
                "{} is {}: only a drained disk is crypto-erased (`kvstrap drain {name}`, then \
                 `kvstrap drain --status` until it is drained)",
                disk.path.display(),
                phase.map_or("in service", ServicePhase::as_str)
            )));
        }
        let steps = crate::plan::service::erase_steps(disk);
        if steps.is_empty() {
            return Err(ServiceError::Refused(format!(
                "{} carries no LUKS2 volume of kvstrap's: there is nothing to crypto-erase \
                 (to reuse a plain disk, wipe it explicitly)",
                disk.path.display()
            )));
        }
        let plan = Plan {
            node: policy.node.name.clone(),
            storage_root: policy.node.storage_root.clone(),
            groups: Vec::new(),
            refused: Vec::new(),
            warnings: Vec::new(),
            steps,
            totals: Default::default(),
            out_of_service: Vec::new(),
        };
        let effects = crate::apply::host_effects::HostEffects::new(&self.inputs.state_dir)
            .map_err(|e| ServiceError::Refused(e.to_string()))?;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let report = crate::apply::execute(&plan, &effects, &stop, &|_, _, _| {});
        let failed: Vec<String> = report
            .steps
            .iter()
            .filter_map(|s| match &s.result {
                crate::apply::StepResult::Failed { error } => {
                    Some(format!("{}: {error}", s.description))
                }
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            return Err(ServiceError::Refused(format!(
                "the crypto-erase of {} did not finish: {}",
                disk.path.display(),
                failed.join("; ")
            )));
        }
        Ok(format!(
            "crypto-erased {} LUKS2 volume(s) on {} ({}): their key slots are destroyed, their data cannot be read again",
            report.steps.len(),
            disk.path.display(),
            disk_identity(disk)
        ))
    }

    /// Drop what kvstrap keeps about a disk that is gone (its drain, its replacement), or
    /// about a drained disk whose volumes were just crypto-erased (`erased`).
    /// The cluster side (its unbound PVs) is the caller's, with a client.
    pub fn forget(
        &self,
        policy: &Policy,
        name: &str,
        erased: bool,
    ) -> Result<(String, String), ServiceError> {
        let inventory = self.scan(Some(policy))?;
        let mut record = self.disk_service()?;
        if let Some(disk) = find(&inventory, name)?.filter(|_| !erased) {
            // An attached disk's replacement record can go: the disk then belongs to
            // whichever group selects it, as any other. Out of service, it stays so.
            let identity = disk_identity(disk);
            if record.out_of_service.contains_key(&identity)
                || !record.replacements.contains_key(&identity)
            {
                return Err(ServiceError::Refused(format!(
                    "{} is attached: `kvstrap drain {name}` takes it out of service (`undrain` puts it back); forget is for a disk that is gone, or drops a replacement record",
                    disk.path.display()
                )));
            }
        }
        let attached = find(&inventory, name)?.map(disk_identity);
        let identity = attached
            .or_else(|| find_recorded(&record, name))
            .unwrap_or_else(|| name.to_string());
        let drained = record.out_of_service.remove(&identity).is_some();
        let replaced = record.replacements.remove(&identity).is_some();
        if drained || replaced {
            self.save_service(&record)?;
        }
        tracing::info!(identity = %identity, message_id = DISK_SERVICE_CHANGED, "disk forgotten");
        Ok((identity.clone(), format!("forgot {identity}")))
    }

    /// Every disk on record as out of service, with what still uses it on this machine
    /// and, when the policy publishes, its PVs in the cluster with their claims and pods.
    pub fn drain_status(&self, policy: &Policy) -> Result<DrainStatus, NodeError> {
        let record = self.disk_service()?;
        let inventory = self.scan(Some(policy))?;
        let disks = drain_entries(&record, &inventory, &policy.node.storage_root);
        let cluster = if policy.kubernetes.publish && !disks.is_empty() {
            let ids = disks.iter().map(|d| d.identity.clone()).collect();
            Some(with_client(policy, async |client| {
                crate::kube::claims::holders(&client, &policy.node.name, &ids).await
            }))
        } else {
            None
        };
        Ok(DrainStatus { disks, cluster })
    }

    /// Forget a disk that is gone, and (when the policy publishes) delete its unbound PVs;
    /// Bound ones are kept and listed.
    pub fn forget_everywhere(
        &self,
        policy: &Policy,
        name: &str,
        erased: bool,
    ) -> Result<
        (
            String,
            Option<Result<crate::kube::claims::Forgotten, String>>,
        ),
        ServiceError,
    > {
        let (identity, message) = self.forget(policy, name, erased)?;
        let cluster = policy.kubernetes.publish.then(|| {
            with_client(policy, async |client| {
                crate::kube::claims::forget_disk(&client, &policy.node.name, &identity).await
            })
        });
        Ok((message, cluster))
    }

    /// Move draining disks that nothing holds any more to drained; drop drained disks that
    /// are gone and whose group got a new disk in this pass. `cluster` is the last publish
    /// pass's view (None: none reached the API server yet); with publishing on, a disk is
    /// drained only once that view says none of its PVs is left.
    pub(super) fn settle_drains(
        &self,
        policy: &Policy,
        inventory: &Inventory,
        plan: &Plan,
        cluster: Option<&BTreeMap<String, Vec<DrainBlocker>>>,
    ) -> Result<Vec<String>, NodeError> {
        let mut record = self.disk_service()?;
        let changes = settle(
            &mut record,
            inventory,
            plan,
            &policy.node.storage_root,
            policy.kubernetes.publish,
            cluster,
        );
        if !changes.is_empty() {
            self.save_service(&record)?;
            for c in &changes {
                tracing::warn!(message_id = DISK_SERVICE_CHANGED, "{c}");
            }
        }
        Ok(changes)
    }
}

/// The group a disk is in: its replacement record, else the group whose selectors pick it.
fn group_of(
    policy: &Policy,
    inventory: &Inventory,
    record: &DiskService,
    disk: &Disk,
) -> Option<String> {
    if let Some(r) = record.replacements.get(&disk_identity(disk)) {
        return Some(r.group.clone());
    }
    crate::plan::verdicts(Some(policy), inventory, record)
        .into_iter()
        .find(|(d, _, _)| d.path == disk.path)
        .and_then(|(_, g, _)| g)
}

/// Disks reported `failed` while some group says `on_failure = "drain"`.
pub fn failing_disks_to_drain<'a>(
    policy: &'a Policy,
    health: &'a crate::health::HealthMap,
) -> impl Iterator<Item = &'a PathBuf> + 'a {
    let any_group = policy
        .disk_groups
        .iter()
        .any(|g| g.on_failure == crate::policy::OnFailure::Drain);
    health
        .iter()
        .filter(move |(_, h)| any_group && h.assessment == crate::health::Assessment::Failed)
        .map(|(p, _)| p)
}

/// `kvstrap drain --status`: the record, and the cluster's view of each disk's PVs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrainStatus {
    pub disks: Vec<DrainEntry>,
    /// None: publishing is off. Err: the API server could not be asked.
    #[serde(serialize_with = "cluster_view")]
    pub cluster: Option<Result<BTreeMap<String, Vec<crate::kube::claims::Holder>>, String>>,
}

fn cluster_view<S: serde::Serializer>(
    v: &Option<Result<BTreeMap<String, Vec<crate::kube::claims::Holder>>, String>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match v {
        None => s.serialize_none(),
        Some(Ok(map)) => map.serialize(s),
        Some(Err(e)) => serde_json::json!({ "error": e }).serialize(s),
    }
}

/// One bounded call to the API server with the policy's client.
fn with_client<T>(
    policy: &Policy,
    call: impl AsyncFnOnce(::kube::Client) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let source = crate::kube::ClientSource::from_policy(&policy.kubernetes);
    runtime.block_on(async {
        let limit = crate::kube::node::CLI_PUBLISH_TIMEOUT;
        let work = async {
            let client = source.client().await.map_err(|e| e.to_string())?;
            call(client).await
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| format!("the API server did not answer within {}s", limit.as_secs()))?
    })
}

/// The record's entries with what is attached and what still uses each disk.
pub fn drain_entries(record: &DiskService, inventory: &Inventory, root: &Path) -> Vec<DrainEntry> {
    record
        .out_of_service
        .iter()
        .map(|(identity, r)| {
            let disk = inventory
                .disks
                .iter()
                .find(|d| disk_identity(d) == *identity);
            DrainEntry {
                identity: identity.clone(),
                path: disk.map_or_else(|| r.path.clone(), |d| d.path.clone()),
                group: r.group.clone(),
                phase: r.phase,
                since_unix: r.since_unix,
                why: r.why.clone(),
                present: disk.is_some(),
                local_users: disk
                    .map(|d| crate::plan::usage::local_users(d, root))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The decision of [`Node::settle_drains`], pure: what changed, in words.
pub fn settle(
    record: &mut DiskService,
    inventory: &Inventory,
    plan: &Plan,
    root: &Path,
    publishing: bool,
    cluster: Option<&BTreeMap<String, Vec<DrainBlocker>>>,
) -> Vec<String> {
    let mut changes = Vec::new();
    // Groups that get a new disk in this pass (a partition table written).
    let fresh: Vec<(&str, &str)> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::WritePartitionTable { layout, .. } => {
                Some((layout.group.as_str(), layout.identity.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut forget = Vec::new();
    for (identity, r) in record.out_of_service.iter_mut() {
        let disk = inventory
            .disks
            .iter()
            .find(|d| disk_identity(d) == *identity);
        match r.phase {
            ServicePhase::Draining => {
                let released_in_cluster = !publishing
                    || cluster
                        .and_then(|c| c.get(identity))
                        .is_some_and(Vec::is_empty);
                let unused_here =
                    disk.is_none_or(|d| crate::plan::usage::local_users(d, root).is_empty());
                if released_in_cluster && unused_here {
                    r.phase = ServicePhase::Drained;
                    changes.push(format!(
                        "{} ({identity}) is drained: nothing uses it; it stays intact and out of service",
                        r.path.display()
                    ));
                }
            }
            ServicePhase::Drained if disk.is_none() => {
                let replaced_by = fresh
                    .iter()
                    .find(|(g, id)| r.group.as_deref() == Some(*g) && id != identity);
                if let Some((group, new)) = replaced_by {
                    forget.push(identity.clone());
                    changes.push(format!(
                        "{} ({identity}) is gone and drained; {new} takes its place in group {group}",
                        r.path.display()
                    ));
                }
            }
            ServicePhase::Drained => {}
        }
    }
    for identity in forget {
        record.out_of_service.remove(&identity);
    }
    changes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(phase: ServicePhase) -> DiskService {
        let mut r = DiskService::default();
        r.out_of_service.insert(
            "serial:OLD".into(),
            ServiceRecord {
                phase,
                path: "/dev/sdb".into(),
                group: Some("g".into()),
                since_unix: 1,
                why: "kvstrap drain".into(),
            },
        );
        r
    }

    fn attached() -> Inventory {
        let mut d = crate::plan::tests::disk("sdb", 100 << 30);
        d.serial = Some("OLD".into());
        Inventory {
            disks: vec![d],
            ..Inventory::default()
        }
    }

    fn empty_plan() -> Plan {
        Plan {
            node: "n".into(),
            storage_root: ROOT.into(),
            groups: vec![],
            refused: vec![],
            warnings: vec![],
            steps: vec![],
            totals: Default::default(),
            out_of_service: vec![],
        }
    }

    const ROOT: &str = "/var/lib/kvstrap/storage";

    #[test]
    fn a_draining_disk_waits_for_the_cluster_to_say_nothing_is_left() {
        let mut r = record(ServicePhase::Draining);
        let inv = attached();
        let plan = empty_plan();
        // Publishing, and no pass has looked yet: stays draining.
        assert!(settle(&mut r, &inv, &plan, Path::new(ROOT), true, None).is_empty());
        // A pass that did not know it was draining says nothing about it.
        let other = BTreeMap::from([("serial:X".to_string(), vec![])]);
        assert!(settle(&mut r, &inv, &plan, Path::new(ROOT), true, Some(&other)).is_empty());
        // A bound PV holds it.
        let bound = BTreeMap::from([(
            "serial:OLD".to_string(),
            vec![DrainBlocker {
                pv: "pv".into(),
                phase: Some("Bound".into()),
                claim: Some("ns/c".into()),
            }],
        )]);
        assert!(settle(&mut r, &inv, &plan, Path::new(ROOT), true, Some(&bound)).is_empty());
        assert_eq!(r.out_of_service["serial:OLD"].phase, ServicePhase::Draining);
        let clear = BTreeMap::from([("serial:OLD".to_string(), vec![])]);
        let changes = settle(&mut r, &inv, &plan, Path::new(ROOT), true, Some(&clear));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(r.out_of_service["serial:OLD"].phase, ServicePhase::Drained);
    }

    #[test]
    fn a_mount_outside_kvstraps_root_keeps_a_disk_draining() {
        let mut r = record(ServicePhase::Draining);
        let mut inv = attached();
        inv.disks[0].mountpoints = vec!["/var/lib/kubelet/pods/p/volumes/x".into()];
        assert!(settle(&mut r, &inv, &empty_plan(), Path::new(ROOT), false, None).is_empty());
        inv.disks[0].mountpoints = vec![format!("{ROOT}/g-1").into()];
        assert_eq!(
            settle(&mut r, &inv, &empty_plan(), Path::new(ROOT), false, None).len(),
            1
        );
    }

    #[test]
    fn a_drained_disk_that_is_gone_is_dropped_only_when_its_group_gets_a_new_disk() {
        let mut r = record(ServicePhase::Drained);
        let gone = Inventory::default();
        assert!(settle(&mut r, &gone, &empty_plan(), Path::new(ROOT), true, None).is_empty());
        let mut plan = empty_plan();
        plan.steps.push(Step::WritePartitionTable {
            disk: "/dev/sdc".into(),
            layout: crate::model::DiskLayout {
                disk: "/dev/sdc".into(),
                identity: "serial:NEW".into(),
                group: "g".into(),
                disk_guid: uuid::Uuid::nil(),
                size_bytes: 1 << 30,
                logical_sector_size: 512,
                partitions: vec![],
            },
            reason: "disk is empty".into(),
        });
        // Attached and drained: kept whatever happens in its group.
        let mut kept = record(ServicePhase::Drained);
        assert!(settle(&mut kept, &attached(), &plan, Path::new(ROOT), true, None).is_empty());
        let changes = settle(&mut r, &gone, &plan, Path::new(ROOT), true, None);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(r.out_of_service.is_empty());
    }

    #[test]
    fn disks_are_named_by_path_serial_wwn_or_identity() {
        let mut d = crate::plan::tests::disk("sdb", 100 << 30);
        d.serial = Some("S123".into());
        d.wwn = Some("0x5000c500a1b2c3d4".into());
        d.by_id = vec!["/dev/disk/by-id/wwn-0x5000c500a1b2c3d4".into()];
        for name in [
            "/dev/sdb",
            "S123",
            "0x5000c500a1b2c3d4",
            "5000c500a1b2c3d4",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
            "wwn:0x5000c500a1b2c3d4",
        ] {
            assert!(matches_disk(&d, name), "{name}");
        }
        for name in ["/dev/sdc", "S12", "", "sdb"] {
            assert!(!matches_disk(&d, name), "{name}");
        }
    }
}
