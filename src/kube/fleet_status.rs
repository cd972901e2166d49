//! `kvstrap cluster status`: one row per node from what the nodes publish — the
//! `KvstrapStorageReady` condition, the `kvstrap.io/storage-state` summary and kvstrap's
//! PersistentVolumes (by class and phase). Rows are built by a pure function.

use super::builders::{LABEL_MANAGED_BY, LABEL_NODE, MANAGER};
use super::client::describe;
use super::node_state::{StorageSummary, CONDITION, STATE_ANNOTATION};
use ::kube::api::{Api, ListParams};
use ::kube::Client;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use serde::Serialize;
use std::collections::BTreeMap;

/// One node as `cluster status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub node: String,
    /// `True`, `False`, or `Unknown` when the node has not reported.
    pub ready: String,
    pub reason: String,
    pub message: String,
    pub disks_ready: u32,
    /// Class -> phase -> count of kvstrap's PVs of this node.
    pub volumes: BTreeMap<String, BTreeMap<String, u32>>,
    pub refused: Vec<String>,
    pub sources: Vec<String>,
    /// Dynamic classes: the node's published room (CSIStorageCapacity), class ->
    /// (capacity, maximumVolumeSize) in bytes.
    pub room: BTreeMap<String, (u64, u64)>,
}

/// Rows for every Node that reported or has kvstrap PVs, by name.
pub fn rows(nodes: &[Node], pvs: &[PersistentVolume]) -> Vec<NodeRow> {
    let mut out: BTreeMap<String, NodeRow> = BTreeMap::new();
    for n in nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        let condition = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == CONDITION));
        let summary: Option<StorageSummary> = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATE_ANNOTATION))
            .and_then(|s| serde_json::from_str(s).ok());
        if condition.is_none() && summary.is_none() {
            continue;
        }
        let summary = summary.unwrap_or_default();
        out.insert(
            name.clone(),
            NodeRow {
                node: name,
                ready: condition.map_or("Unknown".into(), |c| c.status.clone()),
                reason: condition.and_then(|c| c.reason.clone()).unwrap_or_default(),
                message: condition
                    .and_then(|c| c.message.clone())
                    .unwrap_or_default(),
                disks_ready: summary.disks_ready,
                refused: summary.refused,
                sources: summary.sources,
                ..NodeRow::default()
            },
        );
    }
    for pv in pvs {
        let labels = pv.metadata.labels.clone().unwrap_or_default();
        let Some(node) = labels.get(LABEL_NODE) else {
            continue;
        };
        let row = out.entry(node.clone()).or_insert_with(|| NodeRow {
            node: node.clone(),
            ready: "Unknown".into(),
            ..NodeRow::default()
        });
        let class = pv
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into());
        *row.volumes
            .entry(class)
            .or_default()
            .entry(phase)
            .or_default() += 1;
    }
    out.into_values().collect()
}

/// The room each node published for its dynamic classes, added to its row.
pub fn with_room(mut rows: Vec<NodeRow>, room: &[CSIStorageCapacity]) -> Vec<NodeRow> {
    let bytes = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        q.and_then(|q| super::compare::quantity_bytes(&q.0))
            .unwrap_or(0)
    };
    for c in room {
        let Some(node) = c.metadata.labels.as_ref().and_then(|l| l.get(LABEL_NODE)) else {
            continue;
        };
        if let Some(row) = rows.iter_mut().find(|r| &r.node == node) {
            row.room.insert(
                c.storage_class_name.clone(),
                (
                    bytes(c.capacity.as_ref()),
                    bytes(c.maximum_volume_size.as_ref()),
                ),
            );
        }
    }
    rows
}

/// `class: 310.2 GiB free (largest claim 200 GiB)`, or `-`.
pub fn room_text(room: &BTreeMap<String, (u64, u64)>) -> String {
    if room.is_empty() {
        return "-".into();
    }
    room.iter()
        .map(|(class, (free, max))| {
            format!(
                "{class}: {} free (largest claim {})",
                crate::plan::capacity::human(*free),
                crate::plan::capacity::human(*max)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads the Nodes, kvstrap's PVs and its CSIStorageCapacity objects once.
pub async fn fetch(client: &Client) -> Result<Vec<NodeRow>, String> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list Nodes: {}", describe(&e)))?;
    let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("cannot list PersistentVolumes: {}", describe(&e)))?;
    // Without dynamic groups (or the right to read them) there is simply no room to show.
    let room = Api::<CSIStorageCapacity>::all(client.clone())
        .list(&lp)
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    Ok(with_room(rows(&nodes.items, &pvs.items), &room))
}

/// `class: 3 Available, 1 Bound; other: ...`
pub fn volumes_text(v: &BTreeMap<String, BTreeMap<String, u32>>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(class, phases)| {
            let p: Vec<String> = phases.iter().map(|(ph, n)| format!("{n} {ph}")).collect();
            format!("{class}: {}", p.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        NodeCondition, NodeStatus, PersistentVolumeSpec, PersistentVolumeStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pv(node: &str, class: &str, phase: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([(LABEL_NODE.to_string(), node.to_string())])),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                storage_class_name: Some(class.into()),
                ..PersistentVolumeSpec::default()
            }),
            status: Some(PersistentVolumeStatus {
                phase: Some(phase.into()),
                ..PersistentVolumeStatus::default()
            }),
        }
    }

    #[test]
    fn one_row_per_reporting_node_with_volumes_by_class_and_phase() {
        let summary = StorageSummary {
            disks_ready: 2,
            volumes_ready: 3,
            refused: vec!["/dev/sdb (not empty: ext4)".into()],
            sources: vec!["/etc/kvstrap/policy.toml".into()],
        };
        let reporting = Node {
            metadata: ObjectMeta {
                name: Some("w1".into()),
                annotations: Some(BTreeMap::from([(
                    STATE_ANNOTATION.to_string(),
                    serde_json::to_string(&summary).unwrap(),
                )])),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: CONDITION.into(),
                    status: "True".into(),
                    reason: Some("DisksRefused".into()),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let silent = Node {
            metadata: ObjectMeta {
                name: Some("other".into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        let pvs = [
            pv("w1", "fast", "Available"),
            pv("w1", "fast", "Bound"),
            pv("w1", "fast", "Bound"),
            pv("w2", "slow", "Released"),
        ];
        let rows = rows(&[reporting, silent], &pvs);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].node.as_str(),
                rows[0].ready.as_str(),
                rows[0].reason.as_str()
            ),
            ("w1", "True", "DisksRefused")
        );
        assert_eq!(volumes_text(&rows[0].volumes), "fast: 1 Available, 2 Bound");
        assert_eq!(rows[0].refused, summary.refused);
        assert_eq!(
            (rows[1].node.as_str(), rows[1].ready.as_str()),
            ("w2", "Unknown")
        );
        assert_eq!(volumes_text(&rows[1].volumes), "slow: 1 Released");
        let room = [super::super::dynamic::storage_capacity(
            "w1",
            "kvstrap",
            "dyn",
            70 << 30,
            40 << 30,
        )];
        let rows = with_room(rows, &room);
        assert_eq!(
            room_text(&rows[0].room),
            "dyn: 70 GiB free (largest claim 40 GiB)"
        );
        assert_eq!(room_text(&rows[1].room), "-");
    }
}
