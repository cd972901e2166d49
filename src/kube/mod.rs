//! Publication to Kubernetes (PVs, manifests, apply, reclaim); disks only to scrub a volume.
//!
//! Publication to Kubernetes: pure PV/StorageClass builders, manifests on disk, a background
//! publisher (server-side apply, retries) and the reconciler that keeps the cluster true.
//! Never touches disks except to scrub a released volume; never blocks local provisioning.

pub mod builders;
pub mod claims;
pub mod client;
pub mod compare;
pub mod dynamic;
pub mod events;
pub mod fleet;
pub mod fleet_status;
pub mod manifests;
pub mod mirror;
pub mod node;
pub mod node_state;
pub mod publisher;
pub mod reconcile;
pub mod scrub;

use crate::model::VolumeSpec;
use crate::policy::types::StorageClass;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::StorageClass as K8sStorageClass;

pub use client::{ClientSource, PublishError};
pub use manifests::{write_manifests, ManifestError, ManifestReport};
pub use publisher::{publish_once, PublishOptions, PublishStatus, Publisher};
pub use reconcile::{PassReport, VolumePublication};
pub use scrub::{DirectoryAndBlockScrubber, ScrubError, Scrubber};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "volume {volume} names storage class {class}, which the policy does not define \
         (add a [[storage_class]] named {class})"
    )]
    UnknownClass { volume: String, class: String },
    #[error("volumes {first} and {second} would both be published as PersistentVolume {pv}")]
    DuplicateName {
        first: String,
        second: String,
        pv: String,
    },
}

/// Everything this node should have in the cluster: the classes and one PV per volume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The node name kubelet registers (PV node affinity, `kvstrap.io/node`).
    pub node: String,
    pub storage_classes: Vec<K8sStorageClass>,
    pub volumes: Vec<DesiredVolume>,
    /// Identities of draining disks: their PVs are not wanted, and each pass reports
    /// which of them still hold the disk.
    pub draining: std::collections::BTreeSet<String>,
}

/// A provisioned volume and the PV that publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVolume {
    pub spec: VolumeSpec,
    pub pv: PersistentVolume,
}

impl DesiredVolume {
    pub fn pv_name(&self) -> &str {
        self.pv.metadata.name.as_deref().unwrap_or_default()
    }
}

impl Desired {
    /// Builds the objects for `volumes` (what exists on the node, no more, no less) and
    /// every storage class of the policy.
    pub fn build(
        node: &str,
        volumes: &[VolumeSpec],
        classes: &[StorageClass],
    ) -> Result<Desired, BuildError> {
        let mut out = Desired {
            node: node.to_string(),
            storage_classes: classes.iter().map(builders::storage_class).collect(),
            volumes: Vec::with_capacity(volumes.len()),
            draining: Default::default(),
        };
        let mut seen = std::collections::BTreeMap::new();
        for v in volumes {
            let class = classes
                .iter()
                .find(|c| c.name == v.storage_class)
                .ok_or_else(|| BuildError::UnknownClass {
                    volume: v.name.clone(),
                    class: v.storage_class.clone(),
                })?;
            let pv = builders::persistent_volume(node, v, class);
            let dv = DesiredVolume {
                spec: v.clone(),
                pv,
            };
            if let Some(first) = seen.insert(dv.pv_name().to_string(), v.name.clone()) {
                let pv = dv.pv_name().to_string();
                return Err(BuildError::DuplicateName {
                    first,
                    second: v.name.clone(),
                    pv,
                });
            }
            out.volumes.push(dv);
        }
        Ok(out)
    }

    /// Publishes the classes named in `dynamic` with kvstrap's provisioner (dynamic groups'
    /// classes), the others as they are.
    pub fn with_dynamic_classes(mut self, dynamic: &[&str], classes: &[StorageClass]) -> Desired {
        for sc in &mut self.storage_classes {
            let name = sc.metadata.name.clone().unwrap_or_default();
            if let Some(c) = classes
                .iter()
                .find(|c| c.name == name && dynamic.contains(&name.as_str()))
            {
                *sc = builders::dynamic_storage_class(c);
            }
        }
        self
    }

    pub fn volume_by_pv(&self, pv_name: &str) -> Option<&DesiredVolume> {
        self.volumes.iter().find(|v| v.pv_name() == pv_name)
    }
}
