//! The node side of dynamic volumes: their directories, project quotas and size records on the pools.

use super::accounting::{directory, Served};
use crate::host::dirs::{self, DirError};
use crate::host::quota::{self, QuotaError};
use crate::model::{PoolSpec, VolumeMode, VolumeSpec};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What kvstrap recorded on the directory (`trusted.` attributes: only root writes them).
const RECORD_BYTES: &str = "kvstrap.bytes";
const RECORD_CLAIM: &str = "kvstrap.claim";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("pool {0} is not mounted from its partition: nothing is made or removed on it")]
    NotMounted(PathBuf),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Scrub(#[from] crate::kube::ScrubError),
}

/// Whether the pool's filesystem is mounted at its place (its partition's).
pub fn is_mounted(pool: &PoolSpec) -> bool {
    match (
        std::fs::metadata(&pool.mountpoint),
        std::fs::metadata(pool.data_device()),
    ) {
        (Ok(m), Ok(d)) => m.dev() == d.rdev(),
        _ => false,
    }
}

/// Every dynamic volume on the pools that are mounted.
pub fn observe(pools: &[PoolSpec]) -> Vec<Served> {
    let mut out = Vec::new();
    for pool in pools.iter().filter(|p| is_mounted(p)) {
        let Ok(entries) = std::fs::read_dir(&pool.mountpoint) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(uid) = name.strip_prefix(super::DIR_PREFIX) else {
                continue;
            };
            // A real directory, never a symlink planted there.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            out.push(Served {
                claim_uid: uid.to_string(),
                bytes: dirs::get_record(&path, RECORD_BYTES).and_then(|b| b.parse().ok()),
                project_id: quota::project_id(&path).filter(|id| *id != 0),
                path,
                pool: pool.mountpoint.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.claim_uid.cmp(&b.claim_uid));
    out
}

/// Makes (or finishes) the volume of claim `uid` on `pool`: the directory with the group's
/// owner and mode, the project quota of `bytes`, and the records. The size is recorded
/// last, so a volume without it is one whose making did not finish.
pub fn make(
    pool: &PoolSpec,
    uid: &str,
    claim: &str,
    bytes: u64,
    project_id: u32,
) -> Result<Served, VolumeError> {
    if !is_mounted(pool) {
        return Err(VolumeError::NotMounted(pool.mountpoint.clone()));
    }
    let path = directory(&pool.mountpoint, uid);
    dirs::create_directory(&path, &pool.owner)?;
    if pool.project_quota {
        quota::set_quota(&path, project_id, bytes)?;
    }
    dirs::set_record(&path, RECORD_CLAIM, claim)?;
    dirs::set_record(&path, RECORD_BYTES, &bytes.to_string())?;
    Ok(Served {
        claim_uid: uid.to_string(),
        path,
        pool: pool.mountpoint.clone(),
        bytes: Some(bytes),
        project_id: pool.project_quota.then_some(project_id),
    })
}

/// Raises (online) the quota and the record of a volume to `bytes`.
pub fn grow(
    pool: &PoolSpec,
    served: &Served,
    bytes: u64,
    project_id: u32,
) -> Result<(), VolumeError> {
    if pool.project_quota {
        quota::set_quota(&served.path, served.project_id.unwrap_or(project_id), bytes)?;
    }
    dirs::set_record(&served.path, RECORD_BYTES, &bytes.to_string())?;
    Ok(())
}

/// Removes a released volume: never while anything uses it (a pod's mount, in any mount
/// namespace), its contents under the scrub rules (no symlink followed, no other mount
/// crossed), then the directory.
pub fn remove(pool: &PoolSpec, served: &Served) -> Result<(), VolumeError> {
    if !is_mounted(pool) {
        return Err(VolumeError::NotMounted(pool.mountpoint.clone()));
    }
    let spec = volume_spec(pool, served);
    crate::kube::scrub::refuse_in_use(&spec)?;
    crate::kube::scrub::scrub_directory(&served.path)?;
    dirs::remove_empty_directory(&served.path)?;
    Ok(())
}

/// The volume as the rest of kvstrap names volumes (for "in use", `kvstrap volumes`).
pub fn volume_spec(pool: &PoolSpec, served: &Served) -> VolumeSpec {
    let name = format!("{}{}", super::DIR_PREFIX, served.claim_uid);
    VolumeSpec {
        dir_in_fs: Some(Path::new("/").join(&name)),
        name,
        group: pool.group.clone(),
        storage_class: pool.storage_class.clone(),
        volume_mode: VolumeMode::Filesystem,
        path: served.path.clone(),
        capacity_bytes: served.bytes.unwrap_or_default(),
        disk: pool.disk.clone(),
        disk_identity: pool.disk_identity.clone(),
        device: pool.device.clone(),
        transport: pool.transport.clone(),
        rotational: pool.rotational,
        io_class: pool.io_class,
        project_id: served.project_id,
        owner: Some(pool.owner.clone()),
        fs_type: Some(pool.fs_type),
        mapping: pool.mapping.clone(),
    }
}
