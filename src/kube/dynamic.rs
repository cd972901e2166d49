//! Pure builders of what dynamic volumes publish: a claim's PV, the CSIDriver, CSIStorageCapacity.
//!
//! A dynamic class names kvstrap's provisioner ([`PROVISIONER`]). kube-scheduler places a
//! WaitForFirstConsumer claim of it only on a node whose CSIStorageCapacity for the class
//! has room (it reads them because a CSIDriver of that name says `storageCapacity: true`;
//! no CSI socket is involved), and the node's daemon then makes the volume and its PV.

use super::builders::{
    label_value, quantity, reclaim, HOSTNAME_LABEL, LABEL_GROUP, LABEL_MANAGED_BY, LABEL_MEDIA,
    LABEL_NODE, LABEL_TRANSPORT, MANAGER,
};
use crate::model::PoolSpec;
use crate::policy::types::StorageClass;
use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIDriverSpec, CSIStorageCapacity};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use std::collections::BTreeMap;

/// The provisioner of dynamic classes, the name of the CSIDriver object (a DNS subdomain:
/// no `/`, or the API server refuses the object and the scheduler never reads the room),
/// and what kvstrap writes in `pv.kubernetes.io/provisioned-by` of dynamic PVs.
pub const PROVISIONER: &str = super::builders::DYNAMIC_PROVISIONER;
/// Dynamic PVs carry `kvstrap.io/provisioning=dynamic`; the static reconciler leaves them.
pub const LABEL_PROVISIONING: &str = "kvstrap.io/provisioning";
pub const DYNAMIC: &str = "dynamic";
/// Keeps a dynamic PV until its directory is gone (kvstrap removes it after the directory).
pub const FINALIZER: &str = "kvstrap.io/volume-directory";
/// The annotation kube-scheduler sets on a WaitForFirstConsumer claim: the node chosen.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The claim's uid in the dynamic PV's annotations, to find the claim a PV was made for.
pub const ANNOTATION_CLAIM_UID: &str = "kvstrap.io/claim-uid";

/// A claim kvstrap serves: what the PV needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub access_modes: Vec<String>,
}

/// The PV of a claim's directory volume: `pvc-<claim uid>`, pre-bound to the claim (uid
/// included, so only that very claim can bind it).
pub fn claim_pv(
    node: &str,
    claim: &ClaimRef,
    pool: &PoolSpec,
    path: &std::path::Path,
    bytes: u64,
    class: &StorageClass,
) -> PersistentVolume {
    let media = if pool.rotational { "hdd" } else { "ssd" };
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_NODE.to_string(), label_value(node)),
        (LABEL_GROUP.to_string(), label_value(&pool.group)),
        (LABEL_TRANSPORT.to_string(), label_value(&pool.transport)),
        (LABEL_MEDIA.to_string(), media.to_string()),
        (LABEL_PROVISIONING.to_string(), DYNAMIC.to_string()),
    ]);
    if let Some(class) = pool.io_class {
        labels.insert(
            super::builders::LABEL_IO_CLASS.to_string(),
            class.to_string(),
        );
    }
    if pool.mapping.is_some() {
        labels.insert(
            super::builders::LABEL_ENCRYPTED.to_string(),
            "true".to_string(),
        );
    }
    let annotations = BTreeMap::from([
        (
            super::builders::ANNOTATION_PROVISIONED_BY.to_string(),
            PROVISIONER.to_string(),
        ),
        (
            super::builders::ANNOTATION_DISK_IDENTITY.to_string(),
            pool.disk_identity.clone(),
        ),
        (ANNOTATION_CLAIM_UID.to_string(), claim.uid.clone()),
    ]);
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name(&claim.uid)),
            labels: Some(labels),
            annotations: Some(annotations),
            finalizers: Some(vec![FINALIZER.to_string()]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(quantity(bytes)),
            )])),
            access_modes: Some(claim.access_modes.clone()),
            volume_mode: Some("Filesystem".to_string()),
            persistent_volume_reclaim_policy: Some(reclaim(class.reclaim_policy).to_string()),
            storage_class_name: Some(class.name.clone()),
            mount_options: (!class.mount_options.is_empty()).then(|| class.mount_options.clone()),
            local: Some(LocalVolumeSource {
                path: path.display().to_string(),
                fs_type: Some(pool.fs_type.as_str().to_string()),
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: HOSTNAME_LABEL.to_string(),
                            operator: "In".to_string(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_string()),
                kind: Some("PersistentVolumeClaim".to_string()),
                namespace: Some(claim.namespace.clone()),
                name: Some(claim.name.clone()),
                uid: Some(claim.uid.clone()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

/// Whether `pv` is a dynamic volume's PV (its label says so).
pub fn is_dynamic(pv: &PersistentVolume) -> bool {
    pv.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_PROVISIONING))
        .is_some_and(|v| v == DYNAMIC)
}

/// `pvc-<claim uid>`, as external provisioners name the PVs they make.
pub fn pv_name(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// The CSIDriver object that makes kube-scheduler read kvstrap's CSIStorageCapacity.
pub fn csi_driver() -> CSIDriver {
    CSIDriver {
        metadata: ObjectMeta {
            name: Some(PROVISIONER.to_string()),
            labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_string(),
                MANAGER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: CSIDriverSpec {
            attach_required: Some(false),
            storage_capacity: Some(true),
            pod_info_on_mount: Some(false),
            volume_lifecycle_modes: Some(vec!["Persistent".to_string()]),
            ..CSIDriverSpec::default()
        },
    }
}

/// The name of the node's CSIStorageCapacity for `class`: readable when it can be,
/// hashed when node and class would make it too long or invalid.
pub fn capacity_name(node: &str, class: &str) -> String {
    super::builders::pv_name(node, &format!("capacity-{class}"))
}

/// One node's room for one dynamic class: `capacity` is the free space of all its pools
/// of the class, `maximumVolumeSize` the largest claim one pool can still take.
pub fn storage_capacity(
    node: &str,
    namespace: &str,
    class: &str,
    capacity: u64,
    maximum_volume: u64,
) -> CSIStorageCapacity {
    CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(capacity_name(node, class)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
                (LABEL_NODE.to_string(), label_value(node)),
            ])),
            ..ObjectMeta::default()
        },
        storage_class_name: class.to_string(),
        node_topology: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                HOSTNAME_LABEL.to_string(),
                node.to_string(),
            )])),
            match_expressions: None,
        }),
        capacity: Some(Quantity(quantity(capacity))),
        maximum_volume_size: Some(Quantity(quantity(maximum_volume))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{FsType, Owner};
    use crate::policy::types::{AccessMode, ReclaimPolicy};

    fn pool() -> PoolSpec {
        PoolSpec {
            group: "pool".into(),
            storage_class: "dyn".into(),
            disk: "/dev/nvme0n1".into(),
            disk_identity: "wwn:eui.1".into(),
            device: "/dev/nvme0n1p1".into(),
            mountpoint: "/var/lib/kvstrap/storage/pool/disk-1".into(),
            fs_type: FsType::Xfs,
            capacity_bytes: 100 << 30,
            project_quota: true,
            owner: Owner {
                uid: 107,
                gid: 107,
                mode: 0o750,
            },
            transport: "nvme".into(),
            rotational: false,
            io_class: None,
            mapping: None,
        }
    }

    #[test]
    fn a_claims_pv_is_pre_bound_affined_labelled_and_held_by_a_finalizer() {
        let class = StorageClass {
            name: "dyn".into(),
            volume_mode: crate::model::VolumeMode::Filesystem,
            fs_type: FsType::Xfs,
            reclaim_policy: ReclaimPolicy::Delete,
            access_modes: vec![AccessMode::ReadWriteOnce],
            mount_options: vec!["noatime".into()],
            binding_mode: "WaitForFirstConsumer".into(),
        };
        let claim = ClaimRef {
            uid: "6b0e7d1c-1111-4222-8333-944455556666".into(),
            namespace: "vms".into(),
            name: "disk-a".into(),
            access_modes: vec!["ReadWriteOnce".into()],
        };
        let pv = claim_pv(
            "w1",
            &claim,
            &pool(),
            std::path::Path::new("/var/lib/kvstrap/storage/pool/disk-1/pvc-6b0e"),
            30 << 30,
            &class,
        );
        let json = serde_json::to_value(&pv).unwrap();
        assert_eq!(
            json["metadata"]["name"],
            "pvc-6b0e7d1c-1111-4222-8333-944455556666"
        );
        assert_eq!(
            json["metadata"]["labels"]["kvstrap.io/provisioning"],
            "dynamic"
        );
        assert_eq!(json["metadata"]["finalizers"][0], FINALIZER);
        assert!(json["metadata"]["labels"]["kvstrap.io/encrypted"].is_null());
        let mut encrypted = pool();
        encrypted.mapping = Some("/dev/mapper/kvs-0a1b2c3d".into());
        let on_luks = claim_pv(
            "w1",
            &claim,
            &encrypted,
            std::path::Path::new("/var/lib/kvstrap/storage/pool/disk-1/pvc-6b0e"),
            30 << 30,
            &class,
        );
        let on_luks = serde_json::to_value(&on_luks).unwrap();
        assert_eq!(
            on_luks["metadata"]["labels"]["kvstrap.io/encrypted"],
            "true"
        );
        assert_eq!(
            json["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"],
            PROVISIONER
        );
        assert_eq!(json["spec"]["claimRef"]["uid"], claim.uid.as_str());
        assert_eq!(json["spec"]["claimRef"]["namespace"], "vms");
        assert_eq!(json["spec"]["capacity"]["storage"], "30Gi");
        assert_eq!(json["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(
            json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"][0],
            "w1"
        );
    }

    #[test]
    fn capacity_names_the_node_and_class() {
        let c = storage_capacity("w1", "kvstrap", "dyn", 70 << 30, 40 << 30);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["metadata"]["name"], "kvstrap-w1-capacity-dyn");
        assert_eq!(
            json["nodeTopology"]["matchLabels"]["kubernetes.io/hostname"],
            "w1"
        );
        assert_eq!(json["capacity"], "70Gi");
        assert_eq!(json["maximumVolumeSize"], "40Gi");
        let d = serde_json::to_value(csi_driver()).unwrap();
        assert_eq!(d["spec"]["storageCapacity"], true);
        assert_eq!(d["spec"]["attachRequired"], false);
    }
}
