//! The validated policy: domain types the planner consumes. Built only by `validate`,
//! so every value here has already been checked.

use crate::model::{FsType, Layout, Owner, VolumeMode};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub node: NodeSettings,
    pub kubernetes: KubernetesSettings,
    pub health: HealthSettings,
    pub metrics: MetricsSettings,
    pub io_class: IoClassThresholds,
    pub storage_classes: Vec<StorageClass>,
    pub disk_groups: Vec<DiskGroup>,
    /// The files the policy was merged from, in merge order.
    pub sources: Vec<PathBuf>,
    /// Why the cached cluster layer was left out: it no longer validates with the node's
    /// own files (edited since, or a kvstrap upgrade). The node then runs on its own files
    /// alone until the fleet watcher caches a set that does.
    pub cluster_layer_dropped: Option<String>,
}

impl Policy {
    /// The settings the daemon acts on only when it starts (the publisher, the fleet
    /// watcher and the metrics listener are started with them) that differ in `newer`.
    /// A reload takes everything else; these need a restart, and the daemon says so.
    pub fn changed_settings_read_at_start(&self, newer: &Policy) -> Vec<&'static str> {
        let (a, b) = (&self.kubernetes, &newer.kubernetes);
        [
            (a.publish != b.publish, "kubernetes.publish"),
            (a.kubeconfig != b.kubeconfig, "kubernetes.kubeconfig"),
            (
                a.cluster_policy != b.cluster_policy,
                "kubernetes.cluster_policy",
            ),
            (
                a.policy_namespace != b.policy_namespace,
                "kubernetes.policy_namespace",
            ),
            (self.node.name != newer.node.name, "node.name"),
            (
                self.metrics.listen != newer.metrics.listen,
                "metrics.listen",
            ),
        ]
        .into_iter()
        .filter_map(|(changed, key)| changed.then_some(key))
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// Node name as kubelet registers it: policy `node.name`, else the hostname.
    pub name: String,
    pub storage_root: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesSettings {
    pub publish: bool,
    pub kubeconfig: Option<PathBuf>,
    /// Merge policy fragments from ConfigMaps of `policy_namespace` (the cluster layer).
    pub cluster_policy: bool,
    /// Namespace of the policy ConfigMaps (default `kvstrap`).
    pub policy_namespace: String,
    /// Let cluster fragments say `wipe = "force"` and widen `allow_loop`/`allow_removable`.
    pub cluster_may_wipe: bool,
}

impl KubernetesSettings {
    /// Publication off, no cluster layer: what a policy without `[kubernetes]` means.
    pub fn local_only() -> KubernetesSettings {
        KubernetesSettings {
            publish: false,
            kubeconfig: None,
            cluster_policy: false,
            policy_namespace: DEFAULT_POLICY_NAMESPACE.to_string(),
            cluster_may_wipe: false,
        }
    }
}

/// `[health]`: when disk health is read (at start, then every `interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: std::time::Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: std::time::Duration::from_secs(3600),
        }
    }
}

/// `[io_class]`: the random-read rates (4 KiB, queue depth 16, per second) a measured disk
/// needs to count as `fast` or `standard`; below both it is `slow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoClassThresholds {
    pub fast_min_random_read_iops: u64,
    pub standard_min_random_read_iops: u64,
}

impl IoClassThresholds {
    /// NVMe drives read 4 KiB at queue depth 16 well above 100 000 per second; SATA and
    /// SAS SSDs between 20 000 and 90 000 (SATA tops out near 100 000); a spinning disk a
    /// few hundred. `standard` starts at 5 000 so an SSD that has degraded to a tenth of
    /// its speed is still told from a hard disk, and an NVMe drive at a tenth is no
    /// longer `fast`.
    pub const DEFAULT: IoClassThresholds = IoClassThresholds {
        fast_min_random_read_iops: 100_000,
        standard_min_random_read_iops: 5_000,
    };

    pub fn classify(&self, random_read_iops: u64) -> crate::model::IoClass {
        use crate::model::IoClass;
        if random_read_iops >= self.fast_min_random_read_iops {
            IoClass::Fast
        } else if random_read_iops >= self.standard_min_random_read_iops {
            IoClass::Standard
        } else {
            IoClass::Slow
        }
    }
}

impl Default for IoClassThresholds {
    fn default() -> Self {
        IoClassThresholds::DEFAULT
    }
}

/// Where the policy ConfigMaps live unless `[kubernetes] policy_namespace` says otherwise.
pub const DEFAULT_POLICY_NAMESPACE: &str = "kvstrap";

/// Where node_exporter's textfile collector reads from on Debian and Fedora.
pub const DEFAULT_METRICS_TEXTFILE: &str = "/var/lib/prometheus/node-exporter/kvstrap.prom";

/// `[metrics]`: the Prometheus text file (None: none) and an optional HTTP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub textfile: Option<PathBuf>,
    pub listen: Option<std::net::SocketAddr>,
    /// `textfile` is the default, not written in the policy: it is written only where
    /// node_exporter made its directory (a node without it gets no stray directory).
    pub textfile_is_default: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            textfile: Some(PathBuf::from(DEFAULT_METRICS_TEXTFILE)),
            listen: None,
            textfile_is_default: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ReclaimPolicy {
    Delete,
    Retain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteOncePod,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadOnlyMany => "ReadOnlyMany",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageClass {
    pub name: String,
    pub volume_mode: VolumeMode,
    pub fs_type: FsType,
    pub reclaim_policy: ReclaimPolicy,
    pub access_modes: Vec<AccessMode>,
    pub mount_options: Vec<String>,
    /// Always WaitForFirstConsumer for local volumes; kept for the manifest.
    pub binding_mode: String,
}

/// How many volumes a disk yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeSizing {
    /// Volumes of this many bytes, as many as fit.
    Size(u64),
    /// This many volumes of equal size.
    Count(u32),
    /// One volume per disk.
    OnePerDisk,
}

/// What to do where the kernel cannot enforce project quotas (directory volumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Refuse the shared layout: a directory volume must hold its capacity.
    Required,
    /// Provision without quotas and say so: capacity is then not enforced.
    IfSupported,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wipe {
    Never,
    Force,
}

/// Selectors of `match = { ... }`; every given field must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskMatch {
    pub transport: Option<String>,
    pub rotational: Option<bool>,
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    /// Glob patterns (shell style), matched case-sensitively against sysfs values.
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// Measured figures (`kvstrap disks` shows them): only a disk kvstrap measured while
    /// it was blank can meet these, or one it already provisioned (see `plan::select`).
    pub min_random_read_iops: Option<u64>,
    pub min_seq_read_mib_s: Option<u64>,
    pub io_class: Option<crate::model::IoClass>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiskGroup {
    pub name: String,
    pub storage_class: String,
    pub layout: Layout,
    /// Paths or globs: `/dev/loop*`, `/dev/disk/by-id/nvme-...`. Empty: any disk.
    pub devices: Vec<String>,
    pub matcher: DiskMatch,
    pub max_disks: Option<u32>,
    pub sizing: VolumeSizing,
    /// Percent (0..=90) of each disk kept back from volumes.
    pub reserve_percent: u32,
    pub owner: Owner,
    pub wipe: Wipe,
    pub allow_loop: bool,
    pub allow_removable: bool,
    pub quota: QuotaMode,
    /// What to do when a disk of the group reports failed SMART health.
    pub on_failure: OnFailure,
    /// Static: volumes carved in advance. Dynamic: the filesystems are pools, and each
    /// claim gets a directory of its size (shared layout only).
    pub provisioning: Provisioning,
    /// Dynamic pools: how far the quotas may add up beyond the pool, in thousandths
    /// (1000: thick, never more than the pool minus the reserve).
    pub overcommit_permille: u32,
    /// LUKS2 under every partition of the group, and how it is unlocked; None: plain.
    pub encryption: Option<Encryption>,
}

/// `encryption = { method, key_file, tpm2_pcrs }` of a disk group: every partition kvstrap
/// makes for it gets a LUKS2 header, and its filesystem or Block link sits on the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    pub method: EncryptionMethod,
    /// A file of at least 32 random bytes, owned by root, readable by no one else (the
    /// key-file methods). Only its path is in the policy; kvstrap never reads it.
    pub key_file: Option<PathBuf>,
    /// PCRs the TPM2 seal is bound to (the TPM2 methods); empty: the TPM alone.
    pub tpm2_pcrs: Vec<u8>,
}

/// `encryption.method`: what unlocks the volumes at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionMethod {
    /// A key sealed by the node's TPM2 to `tpm2_pcrs`; no key on disk.
    Tpm2,
    /// The key file.
    KeyFile,
    /// Either: the TPM2 first, the key file when the TPM2 refuses (recovery).
    Tpm2AndKeyFile,
}

impl EncryptionMethod {
    pub fn uses_tpm2(self) -> bool {
        matches!(
            self,
            EncryptionMethod::Tpm2 | EncryptionMethod::Tpm2AndKeyFile
        )
    }

    pub fn uses_key_file(self) -> bool {
        matches!(
            self,
            EncryptionMethod::KeyFile | EncryptionMethod::Tpm2AndKeyFile
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionMethod::Tpm2 => "tpm2",
            EncryptionMethod::KeyFile => "key-file",
            EncryptionMethod::Tpm2AndKeyFile => "tpm2+key-file",
        }
    }
}

/// `provisioning`: volumes made in advance, or per claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provisioning {
    #[default]
    Static,
    Dynamic,
}

/// `on_failure`: what a disk whose health turns `failed` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Reported (disks, metrics, journal, Node condition), nothing more.
    #[default]
    Keep,
    /// Drained as `kvstrap drain` would: unbound PVs go, bound ones stay until released.
    Drain,
}

impl Policy {
    pub fn storage_class(&self, name: &str) -> Option<&StorageClass> {
        self.storage_classes.iter().find(|c| c.name == name)
    }

    /// The classes of dynamic groups: published with kvstrap's provisioner.
    pub fn dynamic_classes(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .disk_groups
            .iter()
            .filter(|g| g.provisioning == Provisioning::Dynamic)
            .map(|g| g.storage_class.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    fn policy(extra: &str) -> super::Policy {
        let text =
            format!("[node]\nname = \"n1\"\nstorage_root = \"/var/lib/kvstrap-test\"\n{extra}");
        crate::policy::load_str(Path::new("/etc/kvstrap/policy.toml"), &text).unwrap()
    }

    #[test]
    fn settings_read_at_start_are_named_when_a_reload_changes_them() {
        let before = policy("[kubernetes]\npublish = false\n");
        assert!(before.changed_settings_read_at_start(&before).is_empty());
        let after = policy(
            "[kubernetes]\npublish = true\npolicy_namespace = \"other\"\n\
             [metrics]\nlisten = \"127.0.0.1:9741\"\n",
        );
        assert_eq!(
            before.changed_settings_read_at_start(&after),
            [
                "kubernetes.publish",
                "kubernetes.policy_namespace",
                "metrics.listen"
            ]
        );
    }
}
