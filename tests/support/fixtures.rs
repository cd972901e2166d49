//! Volumes and storage classes shared by the kube tests and the publish benchmark.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use kvstrap::model::{FsType, VolumeMode, VolumeSpec};
use kvstrap::policy::types::{AccessMode, ReclaimPolicy, StorageClass};
use std::path::Path;

pub const NODE: &str = "worker-07";

pub fn class(name: &str, mode: VolumeMode, reclaim: ReclaimPolicy) -> StorageClass {
    StorageClass {
        name: name.to_string(),
        volume_mode: mode,
        fs_type: FsType::Xfs,
        reclaim_policy: reclaim,
        access_modes: vec![AccessMode::ReadWriteOnce],
        mount_options: if mode == VolumeMode::Filesystem {
            vec!["noatime".into()]
        } else {
            vec![]
        },
        binding_mode: "WaitForFirstConsumer".into(),
    }
}

/// A directory volume on a shared filesystem.
pub fn dir_volume(root: &Path, i: usize, class: &str) -> VolumeSpec {
    VolumeSpec {
        name: format!("nvme-3f2a9c1b-v{i:02}"),
        group: "nvme".into(),
        storage_class: class.into(),
        volume_mode: VolumeMode::Filesystem,
        path: root.join(format!("nvme-3f2a9c1b/v{i:02}")),
        capacity_bytes: 100 << 30,
        disk: "/dev/nvme0n1".into(),
        disk_identity: "wwn:eui.0025388b91e3f2a9".into(),
        device: "/dev/nvme0n1p1".into(),
        transport: "nvme".into(),
        rotational: false,
        io_class: None,
        project_id: Some(u32::try_from(1000 + i).unwrap()),
        owner: None,
        fs_type: Some(FsType::Xfs),
        dir_in_fs: Some(format!("/v{i:02}").into()),
        mapping: None,
    }
}

/// A raw partition of a separate-layout disk.
pub fn block_volume(root: &Path, i: usize, class: &str) -> VolumeSpec {
    VolumeSpec {
        name: format!("hdd-7c01d2e4-p{i}"),
        group: "hdd".into(),
        storage_class: class.into(),
        volume_mode: VolumeMode::Block,
        path: root.join(format!("block/hdd-7c01d2e4-p{i}")),
        capacity_bytes: 500_107_862_016,
        disk: "/dev/sdb".into(),
        disk_identity: "serial:ZA1B2C3D".into(),
        device: format!("/dev/sdb{i}").into(),
        transport: "sata".into(),
        rotational: true,
        io_class: None,
        project_id: None,
        owner: None,
        fs_type: None,
        dir_in_fs: None,
        mapping: None,
    }
}

pub fn dir_volumes(root: &Path, n: usize, class: &str) -> Vec<VolumeSpec> {
    (1..=n).map(|i| dir_volume(root, i, class)).collect()
}
