//! Pure builders: one PersistentVolume per provisioned volume, one StorageClass per class.
//! No I/O: the same inputs always give the same objects, byte for byte.

use crate::model::{VolumeMode, VolumeSpec};
use crate::policy::types::{ReclaimPolicy, StorageClass};
use k8s_openapi::api::core::v1::{
    Event, EventSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass as K8sStorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Field manager of every server-side apply, and value of the managed-by label.
pub const MANAGER: &str = "kvstrap";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NODE: &str = "kvstrap.io/node";
pub const LABEL_GROUP: &str = "kvstrap.io/group";
/// Bus of the disk (nvme, sata, sas, virtio, ...): `kvstrap.io/transport=nvme`.
pub const LABEL_TRANSPORT: &str = "kvstrap.io/transport";
/// `ssd` or `hdd`, from the disk's rotational flag.
pub const LABEL_MEDIA: &str = "kvstrap.io/media";
/// `"true"` on the PV of a volume on a LUKS2 volume (an encrypted group); absent otherwise.
pub const LABEL_ENCRYPTED: &str = "kvstrap.io/encrypted";
/// The measured IO class of the disk (fast, standard, slow); absent on a disk never
/// measured. On the Node: the fastest class it serves volumes from.
pub const LABEL_IO_CLASS: &str = "kvstrap.io/io-class";
/// The volume's name on the node (exact value in the annotation of the same name).
pub const ANNOTATION_VOLUME: &str = "kvstrap.io/volume";
/// Stable identity of the disk holding the volume (`wwn:...`, `serial:...`).
pub const ANNOTATION_DISK_IDENTITY: &str = "kvstrap.io/disk-identity";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";
/// The annotation the PV controller reads to find who deletes a Released volume.
pub const ANNOTATION_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// kvstrap's provisioner name in that annotation. Not under `kubernetes.io/`: for such a
/// name kube-controller-manager looks for an in-tree plugin, finds none and marks the PV
/// `Failed`; any other name is an external provisioner, and the Released PV is left to it.
pub const PROVISIONER: &str = "kvstrap.io/local-volume";
/// The provisioner of dynamic classes (and the CSIDriver object's name, so a DNS
/// subdomain: with a `/` the API server refuses the object and the scheduler never reads
/// a node's room).
pub const DYNAMIC_PROVISIONER: &str = "local.kvstrap.io";

/// Longest PV name we generate: fits a label value too, and stays readable in `kubectl get pv`.
const MAX_NAME: usize = 63;
/// Kubernetes label values: at most 63 characters.
const MAX_LABEL_VALUE: usize = 63;

/// Deterministic, DNS-1123 safe PersistentVolume name for `volume` on `node`.
/// Readable (`kvstrap-<node>-<volume>`) when the inputs already are; otherwise (upper case,
/// odd characters, too long) shortened and suffixed with a hash of the exact inputs,
/// so two different volumes never share a name.
pub fn pv_name(node: &str, volume: &str) -> String {
    let raw = format!("kvstrap-{node}-{volume}");
    let clean = dns1123_label(&raw);
    if clean == raw && clean.len() <= MAX_NAME {
        return clean;
    }
    let hash = short_hash(&format!("{node}\0{volume}"));
    let keep = MAX_NAME - hash.len() - 1;
    let stem = clean[..clean.len().min(keep)].trim_end_matches('-');
    format!("{stem}-{hash}")
}

/// A label value Kubernetes accepts, derived from `value` (hash-suffixed when changed).
pub fn label_value(value: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let valid = value.len() <= MAX_LABEL_VALUE
        && value.chars().all(ok)
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric());
    if valid {
        return value.to_string();
    }
    let hash = short_hash(value);
    let cleaned: String = value.chars().map(|c| if ok(c) { c } else { '-' }).collect();
    let keep = MAX_LABEL_VALUE - hash.len() - 1;
    let stem: String = cleaned.chars().take(keep).collect();
    let stem = stem.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if stem.is_empty() {
        hash
    } else {
        format!("{stem}-{hash}")
    }
}

/// The label selector that finds this node's kvstrap PVs.
pub fn node_selector(node: &str) -> String {
    format!(
        "{LABEL_MANAGED_BY}={MANAGER},{LABEL_NODE}={}",
        label_value(node)
    )
}

/// The PersistentVolume that publishes `v`, provisioned on `node` for `class`.
pub fn persistent_volume(node: &str, v: &VolumeSpec, class: &StorageClass) -> PersistentVolume {
    let filesystem = v.volume_mode == VolumeMode::Filesystem;
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name(node, &v.name)),
            labels: Some(pv_labels(node, v)),
            annotations: Some(BTreeMap::from([
                (
                    ANNOTATION_DISK_IDENTITY.to_string(),
                    v.disk_identity.clone(),
                ),
                (ANNOTATION_VOLUME.to_string(), v.name.clone()),
                (
                    ANNOTATION_PROVISIONED_BY.to_string(),
                    PROVISIONER.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(quantity(v.capacity_bytes)),
            )])),
            access_modes: Some(
                class
                    .access_modes
                    .iter()
                    .map(|m| m.as_str().to_string())
                    .collect(),
            ),
            volume_mode: Some(volume_mode(v.volume_mode).to_string()),
            persistent_volume_reclaim_policy: Some(reclaim(class.reclaim_policy).to_string()),
            storage_class_name: Some(class.name.clone()),
            // Mount options apply to the bind mount kubelet makes; a Block volume has none.
            mount_options: (filesystem && !class.mount_options.is_empty())
                .then(|| class.mount_options.clone()),
            local: Some(LocalVolumeSource {
                path: v.path.display().to_string(),
                fs_type: if filesystem {
                    Some(v.fs_type.unwrap_or(class.fs_type).as_str().to_string())
                } else {
                    None
                },
            }),
            node_affinity: Some(node_affinity(node)),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

/// The cluster-wide StorageClass object of a policy storage class (static volumes: no
/// provisioner).
pub fn storage_class(c: &StorageClass) -> K8sStorageClass {
    class_object(c, false)
}

/// The StorageClass of a dynamic group's class: kvstrap's provisioner, expansion allowed.
pub fn dynamic_storage_class(c: &StorageClass) -> K8sStorageClass {
    class_object(c, true)
}

fn class_object(c: &StorageClass, dynamic: bool) -> K8sStorageClass {
    K8sStorageClass {
        metadata: ObjectMeta {
            name: Some(c.name.clone()),
            labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_string(),
                MANAGER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        provisioner: if dynamic {
            DYNAMIC_PROVISIONER
        } else {
            NO_PROVISIONER
        }
        .to_string(),
        reclaim_policy: Some(reclaim(c.reclaim_policy).to_string()),
        volume_binding_mode: Some(binding_mode(c).to_string()),
        mount_options: (!c.mount_options.is_empty()).then(|| c.mount_options.clone()),
        allow_volume_expansion: dynamic.then_some(true),
        ..K8sStorageClass::default()
    }
}

/// Kubernetes quantity for a byte count: exact binary suffix when one fits, else bytes.
pub fn quantity(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (suffix, unit) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

pub fn reclaim(p: ReclaimPolicy) -> &'static str {
    match p {
        ReclaimPolicy::Delete => "Delete",
        ReclaimPolicy::Retain => "Retain",
    }
}

fn volume_mode(m: VolumeMode) -> &'static str {
    match m {
        VolumeMode::Filesystem => "Filesystem",
        VolumeMode::Block => "Block",
    }
}

/// Local volumes must wait for the consumer: binding before scheduling pins pods to nodes.
fn binding_mode(c: &StorageClass) -> &str {
    if c.binding_mode.is_empty() {
        "WaitForFirstConsumer"
    } else {
        &c.binding_mode
    }
}

fn pv_labels(node: &str, v: &VolumeSpec) -> BTreeMap<String, String> {
    let media = if v.rotational { "hdd" } else { "ssd" };
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_NODE.to_string(), label_value(node)),
        (LABEL_GROUP.to_string(), label_value(&v.group)),
        (LABEL_TRANSPORT.to_string(), label_value(&v.transport)),
        (LABEL_MEDIA.to_string(), media.to_string()),
    ]);
    if let Some(class) = v.io_class {
        labels.insert(LABEL_IO_CLASS.to_string(), class.to_string());
    }
    if v.encrypted() {
        labels.insert(LABEL_ENCRYPTED.to_string(), "true".to_string());
    }
    labels
}

fn node_affinity(node: &str) -> VolumeNodeAffinity {
    VolumeNodeAffinity {
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
    }
}

/// Lower-case, `[a-z0-9-]` only, no leading/trailing/double dashes.
fn dns1123_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    out.trim_end_matches('-').to_string()
}

/// First 8 hex digits of the SHA-256 of `s`.
pub fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// True when `name` is a valid DNS-1123 subdomain (what the API server demands of PV names).
pub fn is_dns1123_subdomain(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// What an Event kvstrap reports says, and about which object.
pub struct EventText<'a> {
    pub involved: ObjectReference,
    pub reason: &'a str,
    pub action: &'a str,
    pub warning: bool,
    pub message: &'a str,
}

/// A core/v1 Event named `name`, reported by kvstrap on `node`. With `eventTime` set the
/// API server also demands `action`, `reportingComponent` and `reportingInstance` (422
/// otherwise).
pub fn event(name: String, node: &str, text: EventText<'_>) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(super::client::EVENT_NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: text.involved,
        reason: Some(text.reason.to_string()),
        message: Some(text.message.to_string()),
        type_: Some(if text.warning { "Warning" } else { "Normal" }.to_string()),
        source: Some(EventSource {
            component: Some(MANAGER.to_string()),
            host: Some(node.to_string()),
        }),
        action: Some(text.action.to_string()),
        reporting_component: Some(MANAGER.to_string()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        ..Event::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn readable_names_stay_readable() {
        assert_eq!(
            pv_name("worker-07", "nvme-3f2a9c1b-v03"),
            "kvstrap-worker-07-nvme-3f2a9c1b-v03"
        );
    }

    #[test]
    fn odd_names_are_cleaned_and_hashed() {
        let a = pv_name("Worker_07.example.com", "v1");
        let b = pv_name("worker-07-example-com", "v1");
        assert_ne!(
            a, b,
            "case/character folding must not make two volumes collide"
        );
        assert!(a.starts_with("kvstrap-worker-07-example-com-v1-"), "{a}");
        assert!(is_dns1123_subdomain(&a));
    }

    #[test]
    fn long_names_are_truncated_with_a_hash() {
        let node = "n".repeat(80);
        let a = pv_name(&node, "vol-a");
        let b = pv_name(&node, "vol-b");
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    #[test]
    fn quantities_are_exact() {
        assert_eq!(quantity(100 << 30), "100Gi");
        assert_eq!(quantity(1536 << 20), "1536Mi");
        assert_eq!(quantity(4096), "4Ki");
        assert_eq!(quantity(1000), "1000");
        assert_eq!(quantity(0), "0");
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("worker-07"), "worker-07");
        let long = label_value(&format!("{}.example.com", "a".repeat(70)));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(label_value("-x-"), label_value("x"));
    }

    proptest! {
        #[test]
        fn any_pv_name_is_valid_and_deterministic(node in ".{0,120}", vol in ".{0,80}") {
            let n = pv_name(&node, &vol);
            prop_assert!(is_dns1123_subdomain(&n), "{}", n);
            prop_assert!(n.len() <= 63);
            prop_assert_eq!(n, pv_name(&node, &vol));
        }

        #[test]
        fn any_label_value_is_valid(v in ".{0,120}") {
            let l = label_value(&v);
            prop_assert!(l.len() <= 63);
            prop_assert!(l.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
            prop_assert!(l.chars().next().is_none_or(|c| c.is_ascii_alphanumeric()));
        }
    }
}
