//! The node's storage state in the cluster, the way node-problem-detector reports node
//! health: the Node conditions `KvstrapStorageReady` and `KvstrapDisksHealthy`, the Node
//! label `kvstrap.io/storage-ready=true|false`, and Events on the Node for what an
//! operator must see. Pure builders, and a [`NodeState`] that sends only what changed, so
//! an idle node makes no requests.

use super::client::describe;
pub use super::events::{node_event, post_event, shorten, NodeEvent, MESSAGE_MAX};
use crate::health::Assessment;
use ::kube::api::{Api, Patch, PatchParams};
use ::kube::Client;
use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, BTreeSet};

pub const CONDITION: &str = "KvstrapStorageReady";
/// The condition on the SMART health of the selected disks.
pub const HEALTH_CONDITION: &str = "KvstrapDisksHealthy";
pub const READY_LABEL: &str = "kvstrap.io/storage-ready";

/// What one run left on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub disks_ready: u32,
    pub volumes_ready: u32,
    /// Disks the run made ready (each gets one `DiskProvisioned` Event).
    pub ready_disks: Vec<String>,
    /// (disk, reason) of every disk the policy selects but kvstrap left alone.
    pub refused: Vec<(String, String)>,
    /// (disk, error) of every failed step (but the opens of locked volumes).
    pub failed: Vec<(String, String)>,
    /// (volume, why) of every LUKS2 volume of kvstrap's that nothing opened.
    pub locked: Vec<(String, String)>,
    /// Why the run could not happen at all.
    pub error: Option<String>,
    /// The files and ConfigMaps the policy was merged from.
    pub sources: Vec<String>,
    /// Why the fleet watcher cannot read the policy fragments or the Node (a 403 names
    /// the missing permission); the cached cluster policy stays in force meanwhile.
    pub policy_error: Option<String>,
    /// The last health reading of each disk a group selects (the daemon's health reader;
    /// empty before the first reading, and for `kvstrap apply`).
    pub health: Vec<DiskHealth>,
    /// The fastest measured class among the disks this node serves volumes from
    /// (`kvstrap.io/io-class` on the Node); none when no such disk was measured.
    pub io_class: Option<crate::model::IoClass>,
}

/// One disk's health as the Node shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHealth {
    pub disk: String,
    pub assessment: Assessment,
    /// Why it is `failed` or `unknown` (empty when passed).
    pub detail: String,
}

/// The annotation holding [`StorageSummary`] as JSON, for `kvstrap cluster status`.
pub const STATE_ANNOTATION: &str = "kvstrap.io/storage-state";

/// What `kvstrap cluster status` shows of a node, kept on its Node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageSummary {
    pub disks_ready: u32,
    pub volumes_ready: u32,
    /// `DISK (why)`.
    pub refused: Vec<String>,
    pub sources: Vec<String>,
}

impl StorageSummary {
    pub fn of(r: &NodeReport) -> StorageSummary {
        StorageSummary {
            disks_ready: r.disks_ready,
            volumes_ready: r.volumes_ready,
            refused: r
                .refused
                .iter()
                .map(|(d, why)| format!("{d} ({why})"))
                .collect(),
            sources: r.sources.clone(),
        }
    }
}

/// The condition's status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

pub fn verdict(r: &NodeReport) -> Verdict {
    let mut parts = vec![format!(
        "{} disk(s) ready, {} volume(s) ready",
        r.disks_ready, r.volumes_ready
    )];
    let list = |items: &[(String, String)]| {
        items
            .iter()
            .map(|(d, why)| format!("{d} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !r.refused.is_empty() {
        parts.push(format!("refused: {}", list(&r.refused)));
    }
    if !r.locked.is_empty() {
        parts.push(format!(
            "locked (left as they are, never formatted): {}",
            list(&r.locked)
        ));
    }
    if !r.failed.is_empty() {
        parts.push(format!("failed: {}", list(&r.failed)));
    }
    if let Some(e) = &r.error {
        parts.push(format!("last error: {e}"));
    }
    // Not a verdict on the disks (they follow the cached policy), but an operator must see
    // on the Node that changes to the fragments do not reach it.
    if let Some(e) = &r.policy_error {
        parts.push(format!("policy from the cluster not read: {e}"));
    }
    let (ready, reason) = match (&r.error, r.failed.is_empty(), r.refused.is_empty()) {
        (Some(_), _, _) => (false, "RunFailed"),
        (None, _, _) if !r.locked.is_empty() => (false, "VolumesLocked"),
        (None, false, _) => (false, "StepFailed"),
        (None, true, false) => (true, "DisksRefused"),
        (None, true, true) => (true, "StorageReady"),
    };
    Verdict {
        ready,
        reason,
        message: shorten(parts.join("; ")),
    }
}

/// The `KvstrapDisksHealthy` condition's status (`True`, `False`, `Unknown`), reason and
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthVerdict {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// True when every disk whose health can be read passed, False when one failed, Unknown
/// when none can be read (loop and virtio disks, smartctl missing, not read yet, asleep).
/// A disk that cannot be read never makes the others' verdict worse: it is named in the
/// message.
pub fn health_verdict(r: &NodeReport) -> HealthVerdict {
    let of = |a: Assessment| r.health.iter().filter(move |h| h.assessment == a);
    let list = |a: Assessment| {
        of(a)
            .map(|h| match h.detail.as_str() {
                "" => h.disk.clone(),
                why => format!("{} ({why})", h.disk),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (failed, passed) = (
        of(Assessment::Failed).count(),
        of(Assessment::Passed).count(),
    );
    let mut parts = Vec::new();
    if failed > 0 {
        parts.push(format!("failed: {}", list(Assessment::Failed)));
    }
    if passed > 0 {
        parts.push(format!("{passed} disk(s) healthy"));
    }
    if of(Assessment::Unknown).count() > 0 {
        parts.push(format!("health unknown: {}", list(Assessment::Unknown)));
    }
    if of(Assessment::Sleeping).count() > 0 {
        let asleep: Vec<&str> = of(Assessment::Sleeping).map(|h| h.disk.as_str()).collect();
        parts.push(format!("asleep, not read: {}", asleep.join(", ")));
    }
    if r.health.is_empty() {
        parts.push("no disk health read yet".into());
    }
    let (status, reason) = match (failed, passed) {
        (0, 0) => ("Unknown", "HealthUnknown"),
        (0, _) => ("True", "DisksHealthy"),
        _ => ("False", "DiskFailed"),
    };
    HealthVerdict {
        status,
        reason,
        message: shorten(parts.join("; ")),
    }
}

/// Strategic merge patch of `status.conditions` (merged by `type`: kubelet's conditions
/// stay as they are).
pub fn condition_patch(v: &Verdict, transition: &str, now: &str) -> serde_json::Value {
    let status = if v.ready { "True" } else { "False" };
    let text = (CONDITION, status, v.reason, v.message.as_str());
    any_condition_patch(text, transition, now)
}

/// The same for `KvstrapDisksHealthy`.
pub fn health_condition_patch(v: &HealthVerdict, transition: &str, now: &str) -> serde_json::Value {
    let text = (HEALTH_CONDITION, v.status, v.reason, v.message.as_str());
    any_condition_patch(text, transition, now)
}

/// (type, status, reason, message) of one condition.
fn any_condition_patch(
    (kind, status, reason, message): (&str, &str, &str, &str),
    transition: &str,
    now: &str,
) -> serde_json::Value {
    serde_json::json!({ "status": { "conditions": [{
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "lastHeartbeatTime": now,
    }]}})
}

/// The label and the summary annotation, in one merge patch.
pub fn label_patch(
    ready: bool,
    summary: &StorageSummary,
    io_class: Option<crate::model::IoClass>,
) -> serde_json::Value {
    let summary = serde_json::to_string(summary).unwrap_or_default();
    // A merge patch removes a label set to null: a node that no longer serves volumes
    // from a measured disk loses the label.
    let io_class = io_class.map(|c| c.as_str());
    serde_json::json!({ "metadata": {
        "labels": {
            READY_LABEL: ready.to_string(),
            super::builders::LABEL_IO_CLASS: io_class,
        },
        "annotations": { STATE_ANNOTATION: summary },
    } })
}

/// What is new in `now`: disks provisioned, disks refused, steps failed.
pub fn events(now: &NodeReport) -> Vec<NodeEvent> {
    let mut out = Vec::new();
    for d in &now.ready_disks {
        out.push(NodeEvent {
            reason: "DiskProvisioned",
            warning: false,
            message: format!("disk {d} is provisioned and its volumes are ready"),
            key: d.clone(),
        });
    }
    for (d, why) in &now.refused {
        out.push(NodeEvent {
            reason: "DiskRefused",
            warning: true,
            message: format!("disk {d} left alone: {why}"),
            key: format!("{d}\0{why}"),
        });
    }
    for (v, why) in &now.locked {
        out.push(NodeEvent {
            reason: "VolumeLocked",
            warning: true,
            message: format!(
                "LUKS2 volume {v} did not open ({why}); it is left as it is, never formatted"
            ),
            key: format!("{v}\0{why}"),
        });
    }
    for (d, e) in &now.failed {
        out.push(NodeEvent {
            reason: "StepFailed",
            warning: true,
            message: format!("a step on disk {d} failed: {e}"),
            key: format!("{d}\0{e}"),
        });
    }
    out
}

/// One disk's assessment that differs from the one last seen, and its Event, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub disk: String,
    pub to: Assessment,
    /// How many changes of this disk this process has seen before (0: first sight).
    pub n: u32,
    pub event: Option<NodeEvent>,
}

/// What changed between the assessments last seen (`seen`: by disk, with the count of
/// changes) and `now`: `DiskFailed` (Warning) when a disk turns failed, `DiskHealthy` when
/// a failed disk passes again; a disk that passes at first sight is no news. A reading
/// that cannot be made (`unknown`, or `sleeping`: the disk was spun down) says nothing
/// about the disk and changes nothing. The
/// count makes each change's Event its own (failing, recovering and failing again is two
/// `DiskFailed`), and a disk failed since the daemon started keeps its Event's name across
/// restarts (the server answers 409: not posted twice while the Event lasts). Only a disk
/// that turned failed while the daemon ran gets a second `DiskFailed` after a restart: the
/// name cannot know what the process before saw.
pub fn health_changes(
    seen: &BTreeMap<String, (Assessment, u32)>,
    now: &NodeReport,
) -> Vec<HealthChange> {
    let mut out = Vec::new();
    for h in &now.health {
        let before = seen.get(&h.disk);
        if !h.assessment.is_verdict() || before.map(|b| b.0) == Some(h.assessment) {
            continue;
        }
        let n = before.map_or(0, |b| b.1 + 1);
        let key = format!("{}\0{}\0{n}", h.disk, h.assessment.as_str());
        let event = match (h.assessment, before) {
            (Assessment::Failed, _) => Some(NodeEvent {
                reason: "DiskFailed",
                warning: true,
                message: match h.detail.as_str() {
                    "" => format!("disk {} is failing", h.disk),
                    why => format!("disk {} is failing: {why}", h.disk),
                },
                key,
            }),
            (_, Some(_)) => Some(NodeEvent {
                reason: "DiskHealthy",
                warning: false,
                message: format!("disk {} passes its health check again", h.disk),
                key,
            }),
            (_, None) => None,
        };
        out.push(HealthChange {
            disk: h.disk.clone(),
            to: h.assessment,
            n,
            event,
        });
    }
    out
}

/// The last state sent for one Node; sends only differences.
#[derive(Debug, Default)]
pub struct NodeState {
    sent: Option<Verdict>,
    transition: Option<String>,
    label: Option<(bool, StorageSummary, Option<crate::model::IoClass>)>,
    posted: BTreeSet<(String, String)>,
    health_sent: Option<HealthVerdict>,
    health_transition: Option<String>,
    /// Each disk's assessment its Events were posted for, and how many changes it had.
    health_seen: BTreeMap<String, (Assessment, u32)>,
}

impl NodeState {
    /// Conditions, label and new Events for `report`. The first failure ends the attempt
    /// (a 403 names the missing rule); what was not sent is sent by the next call.
    pub async fn publish(
        &mut self,
        client: &Client,
        node: &str,
        report: &NodeReport,
    ) -> Result<(), String> {
        let v = verdict(report);
        let nodes: Api<Node> = Api::all(client.clone());
        if self.sent.as_ref() != Some(&v) {
            let flipped = self.sent.as_ref().is_none_or(|s| s.ready != v.ready);
            let (transition, now) = times(&self.transition, flipped);
            patch_condition(
                &nodes,
                node,
                CONDITION,
                condition_patch(&v, &transition, &now),
            )
            .await?;
            self.transition = Some(transition);
            self.sent = Some(v.clone());
        }
        let labelled = (v.ready, StorageSummary::of(report), report.io_class);
        if self.label.as_ref() != Some(&labelled) {
            nodes
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(label_patch(labelled.0, &labelled.1, labelled.2)),
                )
                .await
                .map_err(|e| {
                    format!(
                        "cannot set label {READY_LABEL} on Node {node}: {}",
                        describe(&e)
                    )
                })?;
            self.label = Some(labelled);
        }
        for e in events(report) {
            let id = (e.reason.to_string(), e.key.clone());
            if self.posted.contains(&id) {
                continue;
            }
            post_event(client, node, &e).await?;
            self.posted.insert(id);
        }
        self.publish_health(client, &nodes, node, report).await
    }

    /// The `KvstrapDisksHealthy` condition and the Events of changed assessments.
    async fn publish_health(
        &mut self,
        client: &Client,
        nodes: &Api<Node>,
        node: &str,
        report: &NodeReport,
    ) -> Result<(), String> {
        let v = health_verdict(report);
        if self.health_sent.as_ref() != Some(&v) {
            let flipped = self
                .health_sent
                .as_ref()
                .is_none_or(|s| s.status != v.status);
            let (transition, now) = times(&self.health_transition, flipped);
            let patch = health_condition_patch(&v, &transition, &now);
            patch_condition(nodes, node, HEALTH_CONDITION, patch).await?;
            self.health_transition = Some(transition);
            self.health_sent = Some(v);
        }
        for c in health_changes(&self.health_seen, report) {
            if let Some(e) = &c.event {
                post_event(client, node, e).await?;
            }
            self.health_seen.insert(c.disk, (c.to, c.n));
        }
        Ok(())
    }
}

/// The condition's lastTransitionTime (kept unless its status `flipped`) and now.
fn times(transition: &Option<String>, flipped: bool) -> (String, String) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    match transition {
        Some(t) if !flipped => (t.clone(), now),
        _ => (now.clone(), now),
    }
}

async fn patch_condition(
    nodes: &Api<Node>,
    node: &str,
    kind: &str,
    patch: serde_json::Value,
) -> Result<(), String> {
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "cannot patch the {kind} condition of Node {node}: {}",
                describe(&e)
            )
        })
}

/// Sends each submitted report in the background (the daemon's runs never wait for the
/// API server), retrying with backoff; only the newest report matters.
pub struct NodeStatePublisher {
    reports: tokio::sync::watch::Sender<Option<NodeReport>>,
    /// The fleet watcher's error, merged into the newest report.
    policy_error: tokio::sync::watch::Sender<Option<String>>,
    /// The newest health reading, once there is one: it replaces the report's own.
    health: tokio::sync::watch::Sender<Option<Vec<DiskHealth>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeStatePublisher {
    /// Starts the task on the current tokio runtime.
    pub fn start(
        source: super::ClientSource,
        node: &str,
    ) -> Result<NodeStatePublisher, super::client::PublishError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| super::client::PublishError::NoRuntime)?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        let (error_tx, error_rx) = tokio::sync::watch::channel(None);
        let (health_tx, health_rx) = tokio::sync::watch::channel(None);
        let merged = Merged {
            policy_error: error_rx,
            health: health_rx,
        };
        let task = handle.spawn(send_reports(source, node.to_string(), rx, merged));
        Ok(NodeStatePublisher {
            reports: tx,
            policy_error: error_tx,
            health: health_tx,
            task,
        })
    }

    pub fn submit(&self, report: NodeReport) {
        self.reports.send_replace(Some(report));
    }

    /// The fleet watcher's error (None: it reads again). The condition says so without
    /// waiting for the next run, once a run has reported.
    pub fn policy_error(&self, error: Option<String>) {
        self.policy_error.send_if_modified(|e| {
            let changed = *e != error;
            *e = error;
            changed
        });
    }

    /// The newest health reading of the selected disks. A change is sent without waiting
    /// for the next run (its condition and Events only), once a run has reported.
    pub fn health(&self, health: Vec<DiskHealth>) {
        self.health.send_if_modified(|h| {
            let changed = h.as_ref() != Some(&health);
            *h = Some(health);
            changed
        });
    }
}

impl Drop for NodeStatePublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the publisher merges into each report, each sent when it changes.
struct Merged {
    policy_error: tokio::sync::watch::Receiver<Option<String>>,
    health: tokio::sync::watch::Receiver<Option<Vec<DiskHealth>>>,
}

async fn send_reports(
    source: super::ClientSource,
    node: String,
    mut reports: tokio::sync::watch::Receiver<Option<NodeReport>>,
    mut merged: Merged,
) {
    let mut state = NodeState::default();
    let mut client: Option<Client> = None;
    let mut last_error: Option<String> = None;
    let mut wait = std::time::Duration::from_millis(500);
    let (mut watching_errors, mut watching_health) = (true, true);
    loop {
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            r = merged.policy_error.changed(), if watching_errors => watching_errors = r.is_ok(),
            r = merged.health.changed(), if watching_health => watching_health = r.is_ok(),
        }
        loop {
            // The guards must not live across an await.
            let newest = reports.borrow_and_update().clone();
            let Some(mut report) = newest else { break };
            // The watcher's error, or the report's own (a cached layer left out).
            if let Some(e) = merged.policy_error.borrow_and_update().clone() {
                report.policy_error = Some(e);
            }
            if let Some(health) = merged.health.borrow_and_update().clone() {
                report.health = health;
            }
            let result = match &client {
                Some(c) => state.publish(c, &node, &report).await,
                None => match source.client().await {
                    Ok(c) => {
                        client = Some(c);
                        continue;
                    }
                    Err(e) => Err(e.to_string()),
                },
            };
            let Err(e) = result else {
                if last_error.take().is_some() {
                    tracing::info!(node = %node, "storage state published on the Node again");
                }
                wait = std::time::Duration::from_millis(500);
                break;
            };
            if last_error.as_ref() != Some(&e) {
                tracing::warn!(node = %node, "{e}; retrying");
            }
            last_error = Some(e);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(60));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn report() -> NodeReport {
        NodeReport {
            disks_ready: 2,
            volumes_ready: 6,
            ready_disks: vec!["/dev/nvme0n1".into()],
            ..NodeReport::default()
        }
    }

    #[test]
    fn verdicts_in_order_of_gravity() {
        let mut r = report();
        assert_eq!(
            verdict(&r),
            Verdict {
                ready: true,
                reason: "StorageReady",
                message: "2 disk(s) ready, 6 volume(s) ready".into()
            }
        );
        r.refused
            .push(("/dev/sdb".into(), "not empty: ext4".into()));
        let v = verdict(&r);
        assert_eq!((v.ready, v.reason), (true, "DisksRefused"));
        assert_eq!(
            v.message,
            "2 disk(s) ready, 6 volume(s) ready; refused: /dev/sdb (not empty: ext4)"
        );
        r.failed
            .push(("/dev/sdc".into(), "mkfs.xfs exited with 1".into()));
        let v = verdict(&r);
        assert_eq!((v.ready, v.reason), (false, "StepFailed"));
        assert!(
            v.message
                .ends_with("; failed: /dev/sdc (mkfs.xfs exited with 1)"),
            "{}",
            v.message
        );
        r.locked.push((
            "/dev/sdd1 (kvs-0123abcd; volume(s) raw-1)".into(),
            "TPM2: No usable token is available.".into(),
        ));
        let v = verdict(&r);
        assert_eq!((v.ready, v.reason), (false, "VolumesLocked"));
        assert!(
            v.message.contains("; locked (left as they are, never formatted): /dev/sdd1 (kvs-0123abcd; volume(s) raw-1) (TPM2: No usable token is available.)"),
            "{}",
            v.message
        );
        let e = events(&r);
        assert!(e.iter().any(|e| e.reason == "VolumeLocked" && e.warning));
        r.error = Some("cannot read the node".into());
        let v = verdict(&r);
        assert_eq!((v.ready, v.reason), (false, "RunFailed"));
        assert!(v.message.ends_with("; last error: cannot read the node"));
        r.policy_error = Some("403 Forbidden: configmaps".into());
        let v = verdict(&r);
        assert_eq!((v.ready, v.reason), (false, "RunFailed"));
        assert!(v
            .message
            .ends_with("; policy from the cluster not read: 403 Forbidden: configmaps"));
        r.error = Some("x".repeat(5000));
        assert!(verdict(&r).message.len() <= MESSAGE_MAX);
    }

    #[test]
    fn events_have_stable_names_per_thing() {
        let mut r = report();
        r.refused
            .push(("/dev/sdb".into(), "not empty: ext4".into()));
        let e = events(&r);
        let reasons: Vec<&str> = e.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["DiskProvisioned", "DiskRefused"]);
        let a = node_event("w1", &e[1]);
        let b = node_event("w1", &events(&r)[1]);
        assert_eq!(a.metadata.name, b.metadata.name);
        assert!(a.metadata.name.unwrap().starts_with("w1.diskrefused."));
        assert_eq!(a.type_.as_deref(), Some("Warning"));
        assert_eq!(a.involved_object.kind.as_deref(), Some("Node"));
    }

    fn health(entries: &[(&str, Assessment, &str)]) -> NodeReport {
        NodeReport {
            health: entries
                .iter()
                .map(|(d, a, why)| DiskHealth {
                    disk: d.to_string(),
                    assessment: *a,
                    detail: why.to_string(),
                })
                .collect(),
            ..report()
        }
    }

    const FAILED: &str = "SMART overall-health self-assessment: FAILED";
    const LOOP: &str = "smartctl cannot read the device: /dev/loop0: Unable to detect device type";

    #[test]
    fn disks_healthy_is_unknown_until_a_disk_can_be_read_and_false_when_one_failed() {
        let v = health_verdict(&report());
        assert_eq!(
            (v.status, v.reason, v.message.as_str()),
            ("Unknown", "HealthUnknown", "no disk health read yet")
        );
        let v = health_verdict(&health(&[("/dev/loop0", Assessment::Unknown, LOOP)]));
        assert_eq!((v.status, v.reason), ("Unknown", "HealthUnknown"));
        assert_eq!(v.message, format!("health unknown: /dev/loop0 ({LOOP})"));
        let v = health_verdict(&health(&[
            ("/dev/sda", Assessment::Passed, ""),
            ("/dev/loop0", Assessment::Unknown, LOOP),
        ]));
        assert_eq!((v.status, v.reason), ("True", "DisksHealthy"));
        assert_eq!(
            v.message,
            format!("1 disk(s) healthy; health unknown: /dev/loop0 ({LOOP})")
        );
        let v = health_verdict(&health(&[
            ("/dev/sda", Assessment::Passed, ""),
            ("/dev/sdb", Assessment::Failed, FAILED),
        ]));
        assert_eq!((v.status, v.reason), ("False", "DiskFailed"));
        assert_eq!(
            v.message,
            format!("failed: /dev/sdb ({FAILED}); 1 disk(s) healthy")
        );
        let many: Vec<(String, Assessment, &str)> = (0..100)
            .map(|i| (format!("/dev/disk{i}"), Assessment::Failed, FAILED))
            .collect();
        let many: Vec<(&str, Assessment, &str)> =
            many.iter().map(|(d, a, w)| (d.as_str(), *a, *w)).collect();
        assert!(health_verdict(&health(&many)).message.len() <= MESSAGE_MAX);
        // The storage condition does not follow health: a failing disk may still be ready.
        let failing = health(&[("/dev/sdb", Assessment::Failed, FAILED)]);
        assert_eq!(verdict(&failing), verdict(&report()));
    }

    /// Changes of `now` since `seen`, remembered as [`NodeState`] does once posted.
    fn step(seen: &mut BTreeMap<String, (Assessment, u32)>, now: &NodeReport) -> Vec<NodeEvent> {
        let changes = health_changes(seen, now);
        for c in &changes {
            seen.insert(c.disk.clone(), (c.to, c.n));
        }
        changes.into_iter().filter_map(|c| c.event).collect()
    }

    #[test]
    fn health_events_once_per_change_of_assessment() {
        let mut seen = BTreeMap::new();
        let passed = ("/dev/sdb", Assessment::Passed, "");
        let failed = ("/dev/sdb", Assessment::Failed, FAILED);
        let unknown = ("/dev/sdb", Assessment::Unknown, "smartctl timed out");
        assert!(step(&mut seen, &health(&[passed])).is_empty(), "no news");
        assert!(step(&mut seen, &health(&[passed])).is_empty());
        let first = step(&mut seen, &health(&[failed]));
        let reasons: Vec<(&str, bool)> = first.iter().map(|e| (e.reason, e.warning)).collect();
        assert_eq!(reasons, [("DiskFailed", true)]);
        assert_eq!(
            first[0].message,
            format!("disk /dev/sdb is failing: {FAILED}")
        );
        assert!(
            step(&mut seen, &health(&[failed])).is_empty(),
            "not repeated"
        );
        assert!(
            step(&mut seen, &health(&[unknown])).is_empty(),
            "a reading that cannot be made changes nothing"
        );
        let healthy = step(&mut seen, &health(&[passed]));
        let reasons: Vec<(&str, bool)> = healthy.iter().map(|e| (e.reason, e.warning)).collect();
        assert_eq!(reasons, [("DiskHealthy", false)]);
        // Failing again is a new Event, with a name of its own.
        let again = step(&mut seen, &health(&[failed]));
        assert_eq!(again.len(), 1);
        assert_ne!(
            node_event("w1", &again[0]).metadata.name,
            node_event("w1", &first[0]).metadata.name
        );
        // A disk failed at first sight is news, under the same name after a restart.
        let at_start = step(&mut BTreeMap::new(), &health(&[failed]));
        let restarted = step(&mut BTreeMap::new(), &health(&[failed]));
        assert_eq!(at_start[0].reason, "DiskFailed");
        assert_eq!(
            node_event("w1", &restarted[0]).metadata.name,
            node_event("w1", &at_start[0]).metadata.name
        );
    }
}
