//! Hard project quotas for volume directories: the project id (FS_IOC_FSSETXATTR with
//! PROJINHERIT) and the block hard limit (quotactl Q_XSETQLIM on PRJQUOTA). The same calls
//! work on xfs and on ext4 with the `project` feature, both mounted with `prjquota`.

use crate::host::mount::{self, MountError};
use crate::host::Outcome;
// Callers ask the quota module; the answer lives below mount and quota alike.
pub use crate::host::kernel_quota::{kernel_support, QuotaSupport};
use std::ffi::{c_int, CString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `struct fsxattr` from linux/fs.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `struct fs_disk_quota` from linux/dqblk_xfs.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsDiskQuota {
    version: i8,
    flags: i8,
    fieldmask: u16,
    id: u32,
    blk_hardlimit: u64,
    blk_softlimit: u64,
    ino_hardlimit: u64,
    ino_softlimit: u64,
    bcount: u64,
    icount: u64,
    itimer: i32,
    btimer: i32,
    iwarns: u16,
    bwarns: u16,
    itimer_hi: i8,
    btimer_hi: i8,
    rtbtimer_hi: i8,
    padding2: i8,
    rtb_hardlimit: u64,
    rtb_softlimit: u64,
    rtbcount: u64,
    rtbtimer: i32,
    rtbwarns: u16,
    padding3: i16,
    padding4: [u8; 8],
}

nix::ioctl_read!(fs_ioc_fsgetxattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_ioc_fssetxattr, b'X', 32, FsXattr);

const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
const PRJQUOTA: c_int = 2;
const FS_DQUOT_VERSION: i8 = 1;
const FS_PROJ_QUOTA: i8 = 2;
// <linux/dqblk_xfs.h>: ISOFT 1<<0, IHARD 1<<1, BSOFT 1<<2, BHARD 1<<3.
const FS_DQ_BHARD: u16 = 1 << 3;
/// XFS quota units are 512-byte "basic blocks", on ext4 too through this interface.
const BASIC_BLOCK: u64 = 512;

const fn xqm_cmd(n: c_int) -> c_int {
    (('X' as c_int) << 8) + n
}
const Q_XGETQUOTA: c_int = xqm_cmd(3);
const Q_XSETQLIM: c_int = xqm_cmd(4);
const fn qcmd(cmd: c_int, kind: c_int) -> c_int {
    (cmd << 8) | (kind & 0xff)
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what} of {}: {source}{hint}", path.display())]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
        hint: &'static str,
    },
    #[error(
        "the filesystem of {} kept a project limit of {} bytes when asked for {wanted}: \
         the limit would not hold the volume's capacity; check `xfs_quota -x -c 'report -p'` \
         (or `repquota -P`) on its mount point",
        path.display(), kept.map_or_else(|| "no".to_string(), |k| k.to_string())
    )]
    NotKept {
        path: PathBuf,
        wanted: u64,
        kept: Option<u64>,
    },
    #[error("project id 0 is the default project and cannot carry a volume's limit ({})", path.display())]
    ProjectZero { path: PathBuf },
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// A directory's project and that project's limit and usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaInfo {
    pub project_id: u32,
    pub inherit: bool,
    /// Hard block limit in bytes; None when no limit is set.
    pub hard_limit_bytes: Option<u64>,
    pub used_bytes: u64,
}

/// Give `path` the project `project_id` (inherited by everything created below it) and
/// a hard block limit of `bytes` (rounded up to 512 bytes so capacity is never short).
pub fn set_quota(path: &Path, project_id: u32, bytes: u64) -> Result<Outcome, QuotaError> {
    if project_id == 0 {
        return Err(QuotaError::ProjectZero {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(|source| QuotaError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut changes = Vec::new();
    if set_project(&file, path, project_id)? {
        changes.push(format!("project {project_id}"));
        crate::host::failpoint("quota_project_set");
    }
    let device = mount::mount_of(path)?.source;
    let limit_bb = bytes.div_ceil(BASIC_BLOCK);
    let stored = |dq: Option<FsDiskQuota>| dq.map(|q| q.blk_hardlimit.saturating_mul(BASIC_BLOCK));
    let current = get_dquot(&device, path, project_id)?;
    if !crate::model::quota_limit_holds(bytes, stored(current)) {
        set_hard_limit(&device, path, project_id, limit_bb)?;
        // Read back what the filesystem kept (xfs rounds up to its block size): it must
        // hold the capacity, or the next run would try again forever.
        let kept = stored(get_dquot(&device, path, project_id)?);
        if !crate::model::quota_limit_holds(bytes, kept) {
            return Err(QuotaError::NotKept {
                path: path.to_path_buf(),
                wanted: bytes,
                kept,
            });
        }
        changes.push(format!(
            "hard limit {} bytes (stored as {})",
            bytes,
            kept.unwrap_or_default()
        ));
    }
    if changes.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    crate::host::failpoint("set_quota");
    Ok(Outcome::Changed(format!(
        "{}: {}",
        path.display(),
        changes.join(", ")
    )))
}

/// The project of `path` and its limit, for verification and inventory.
pub fn get_quota(path: &Path) -> Result<QuotaInfo, QuotaError> {
    let file = File::open(path).map_err(|source| QuotaError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let attr = get_xattr(&file, path)?;
    let device = mount::mount_of(path)?.source;
    let dq = get_dquot(&device, path, attr.projid)?;
    Ok(QuotaInfo {
        project_id: attr.projid,
        inherit: attr.xflags & FS_XFLAG_PROJINHERIT != 0,
        hard_limit_bytes: dq.map(|q| q.blk_hardlimit * BASIC_BLOCK).filter(|&b| b > 0),
        used_bytes: dq.map_or(0, |q| q.bcount * BASIC_BLOCK),
    })
}

/// The project id of `dir`; None where the filesystem has no project ids. (The inventory
/// reads it here too: one `fsxattr` declaration.)
pub fn project_id(dir: &Path) -> Option<u32> {
    let file = File::open(dir).ok()?;
    get_xattr(&file, dir).ok().map(|a| a.projid)
}

/// The hard block limit of project `id` on the filesystem of `device`, in bytes; None when
/// quotas are off, or no limit is set. Works for xfs and ext4 alike.
pub fn project_limit(device: &Path, id: u32) -> Option<u64> {
    let dq = get_dquot(device.to_str()?, device, id).ok()??;
    let bytes = dq.blk_hardlimit.saturating_mul(BASIC_BLOCK);
    (bytes > 0).then_some(bytes)
}

fn get_xattr(file: &File, path: &Path) -> Result<FsXattr, QuotaError> {
    let mut attr = FsXattr::default();
    // SAFETY: the ioctl fills one struct fsxattr.
    unsafe { fs_ioc_fsgetxattr(file.as_raw_fd(), &mut attr) }.map_err(|source| {
        QuotaError::Sys {
            what: "read the project id",
            path: path.to_path_buf(),
            source,
            hint: "",
        }
    })?;
    Ok(attr)
}

/// Set project id and PROJINHERIT; true when that changed anything.
fn set_project(file: &File, path: &Path, project_id: u32) -> Result<bool, QuotaError> {
    let mut attr = get_xattr(file, path)?;
    if attr.projid == project_id && attr.xflags & FS_XFLAG_PROJINHERIT != 0 {
        return Ok(false);
    }
    attr.projid = project_id;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: the ioctl reads one struct fsxattr.
    unsafe { fs_ioc_fssetxattr(file.as_raw_fd(), &attr) }.map_err(|source| QuotaError::Sys {
        what: "set the project id",
        path: path.to_path_buf(),
        source,
        hint: if source == nix::Error::ENOTTY || source == nix::Error::EOPNOTSUPP {
            " (the filesystem has no project quota support: ext4 needs the project feature)"
        } else {
            ""
        },
    })?;
    Ok(true)
}

fn quotactl(
    device: &str,
    path: &Path,
    cmd: c_int,
    id: u32,
    dq: &mut FsDiskQuota,
) -> Result<(), QuotaError> {
    let what = if cmd == Q_XSETQLIM {
        "set the project quota"
    } else {
        "read the project quota"
    };
    let special = CString::new(device).map_err(|_| QuotaError::Sys {
        what,
        path: path.to_path_buf(),
        source: nix::Error::EINVAL,
        hint: " (device name contains NUL)",
    })?;
    let id = c_int::try_from(id).map_err(|_| QuotaError::Sys {
        what,
        path: path.to_path_buf(),
        source: nix::Error::ERANGE,
        hint: " (project id too large)",
    })?;
    // SAFETY: special is NUL-terminated; dq is a valid fs_disk_quota for the call.
    let rc = unsafe {
        libc::quotactl(
            qcmd(cmd, PRJQUOTA),
            special.as_ptr(),
            id,
            (dq as *mut FsDiskQuota).cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let source = nix::Error::last();
    let hint = match source {
        nix::Error::ESRCH | nix::Error::ENOSYS | nix::Error::EINVAL => {
            " (project quota is not enabled: mount the filesystem with prjquota)"
        }
        _ => "",
    };
    Err(QuotaError::Sys {
        what,
        path: path.to_path_buf(),
        source,
        hint,
    })
}

/// The project's quota record; None when the filesystem has none for it yet.
fn get_dquot(device: &str, path: &Path, id: u32) -> Result<Option<FsDiskQuota>, QuotaError> {
    let mut dq = FsDiskQuota::default();
    match quotactl(device, path, Q_XGETQUOTA, id, &mut dq) {
        Ok(()) => Ok(Some(dq)),
        Err(QuotaError::Sys {
            source: nix::Error::ENOENT,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn set_hard_limit(device: &str, path: &Path, id: u32, limit_bb: u64) -> Result<(), QuotaError> {
    let mut dq = FsDiskQuota {
        version: FS_DQUOT_VERSION,
        flags: FS_PROJ_QUOTA,
        fieldmask: FS_DQ_BHARD,
        id,
        blk_hardlimit: limit_bb,
        ..FsDiskQuota::default()
    };
    quotactl(device, path, Q_XSETQLIM, id, &mut dq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<FsDiskQuota>(), 112);
    }

    #[test]
    fn quota_commands_match_the_headers() {
        // QCMD(Q_XSETQLIM, PRJQUOTA) as computed by <sys/quota.h>.
        assert_eq!(qcmd(Q_XSETQLIM, PRJQUOTA), 0x0058_0402);
        assert_eq!(qcmd(Q_XGETQUOTA, PRJQUOTA), 0x0058_0302);
    }

    #[test]
    fn project_zero_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            set_quota(d.path(), 0, 1 << 20),
            Err(QuotaError::ProjectZero { .. })
        ));
    }
}
