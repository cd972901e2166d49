//! Scrubbing a volume before it is handed to a new claim, and the ledger (`<state>/scrub.json`)
//! that remembers which volumes were published since their last scrub.
//! Directory: remove the contents without following symlinks or leaving the filesystem.
//! Block: zero the first and last MiB (where signatures live), then discard the rest.

use crate::model::{VolumeMode, VolumeSpec};
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Deeper trees than this are refused (each level holds a file descriptor open).
const MAX_DEPTH: usize = 256;
/// Bytes zeroed at each end of a Block volume: GPT, md, LVM and filesystem signatures.
const WIPE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("cannot scrub {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot scrub {path}: {source}")]
    Sys { path: PathBuf, source: nix::Error },
    #[error(
        "{path} is another mount (a filesystem or a bind mount inside the volume): unmount \
         it; kvstrap never leaves the volume's own mount"
    )]
    OtherFilesystem { path: PathBuf },
    #[error("{path} is nested deeper than {MAX_DEPTH} levels: remove it by hand")]
    TooDeep { path: PathBuf },
    #[error(
        "volume {volume} is in use ({}): it stays as it is, unscrubbed and unpublished, until \
         nothing uses it",
        uses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    InUse {
        volume: String,
        uses: Vec<crate::model::VolumeUse>,
    },
    #[error("cannot tell whether volume {volume} is in use: {detail}")]
    Unobservable { volume: String, detail: String },
    #[error("{path} is not a block device: refusing to wipe it")]
    NotBlockDevice { path: PathBuf },
    #[error("block link {link} points to {target}, not to the volume's partition {device}")]
    LinkMismatch {
        link: PathBuf,
        target: PathBuf,
        device: PathBuf,
    },
}

/// Makes a volume safe to hand to a new claim.
pub trait Scrubber: Send + Sync {
    fn scrub(&self, v: &VolumeSpec) -> Result<(), ScrubError>;
}

/// The real scrubber: directories and block devices.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectoryAndBlockScrubber;

impl Scrubber for DirectoryAndBlockScrubber {
    fn scrub(&self, v: &VolumeSpec) -> Result<(), ScrubError> {
        refuse_in_use(v)?;
        match v.volume_mode {
            VolumeMode::Filesystem => {
                scrub_directory(&v.path)?;
                reset_root(&v.path, v.owner.as_ref())
            }
            // An encrypted Block volume is scrubbed through its mapping: the LUKS2 header
            // at the start of the partition is what keeps the data's key.
            VolumeMode::Block => scrub_block(&v.path, v.data_device()),
        }
    }
}

/// Nothing in use is scrubbed: a pod's bind mount of the volume (in any mount namespace),
/// a Block mapping, a loop device or holder over its partition. Asked afresh right before
/// the scrub, of the same function every other "in use" question asks.
pub fn refuse_in_use(v: &VolumeSpec) -> Result<(), ScrubError> {
    let partition =
        crate::inventory::partition_users_now(&v.device).map_err(|e| ScrubError::Unobservable {
            volume: v.name.clone(),
            detail: e.to_string(),
        })?;
    let disk = crate::model::Disk {
        partitions: vec![partition],
        ..crate::model::Disk::default()
    };
    let uses = crate::plan::usage::volume_uses(&disk, v);
    if uses.is_empty() {
        Ok(())
    } else {
        Err(ScrubError::InUse {
            volume: v.name.clone(),
            uses,
        })
    }
}

/// Removes everything inside `root` (keeping `root` itself, its owner, mode and quota).
/// Symlinks are removed, never followed; other filesystems mounted inside are refused.
pub fn scrub_directory(root: &Path) -> Result<(), ScrubError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let dir = Dir::open(root, flags, Mode::empty()).map_err(sys(root))?;
    let mount = MountOf::of(dir.as_raw_fd(), root)?;
    empty_dir(dir, root, mount, 0)
}

/// Where a directory lives: its filesystem (st_dev) and its mount (statx's mount id).
/// A bind mount of another directory of the same filesystem has the same st_dev: only the
/// mount id tells it apart, and scrub must never cross into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MountOf {
    dev: u64,
    /// None where the kernel cannot tell (before Linux 5.8): st_dev alone then.
    mnt_id: Option<u64>,
}

impl MountOf {
    fn of(fd: i32, path: &Path) -> Result<MountOf, ScrubError> {
        let dev = fstat(fd).map_err(sys(path))?.st_dev;
        // SAFETY: statx with AT_EMPTY_PATH on a valid fd fills `buf`; zeroed is a valid statx.
        let mut buf: libc::statx = unsafe { std::mem::zeroed() };
        let empty = c"";
        // SAFETY: `empty` is NUL-terminated and `buf` is a live statx for the call.
        let rc = unsafe {
            libc::statx(
                fd,
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_MNT_ID,
                &mut buf,
            )
        };
        let mnt_id = (rc == 0 && buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id);
        Ok(MountOf { dev, mnt_id })
    }
}

/// Give the emptied volume root back the owner and mode the policy asks for, and drop the
/// ACLs a tenant may have set on it: the next claim gets a volume like a new one.
fn reset_root(root: &Path, owner: Option<&crate::model::Owner>) -> Result<(), ScrubError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let dir = Dir::open(root, flags, Mode::empty()).map_err(sys(root))?;
    let fd = dir.as_raw_fd();
    for acl in [c"system.posix_acl_access", c"system.posix_acl_default"] {
        // SAFETY: a valid fd and a NUL-terminated attribute name.
        if unsafe { libc::fremovexattr(fd, acl.as_ptr()) } != 0 {
            let e = nix::Error::last();
            // No ACL there, or a filesystem without ACLs: nothing to drop.
            if e != nix::Error::ENODATA && e != nix::Error::EOPNOTSUPP {
                return Err(ScrubError::Sys {
                    path: root.to_path_buf(),
                    source: e,
                });
            }
        }
    }
    if let Some(o) = owner {
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(o.uid),
            nix::unistd::Gid::from_raw(o.gid),
        );
        nix::unistd::fchown(fd, Some(uid), Some(gid)).map_err(sys(root))?;
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(o.mode)).map_err(sys(root))?;
    }
    Ok(())
}

fn empty_dir(mut dir: Dir, path: &Path, mount: MountOf, depth: usize) -> Result<(), ScrubError> {
    if depth > MAX_DEPTH {
        return Err(ScrubError::TooDeep {
            path: path.to_path_buf(),
        });
    }
    // Names first: unlinking while readdir walks the same directory may skip entries. An
    // entry readdir could not read is an error: scrub must not report success over it.
    let mut names: Vec<CString> = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(sys(path))?;
        let name = entry.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    let fd = dir.as_raw_fd();
    for name in names {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        let st = match fstatat(Some(fd), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => continue,
            Err(e) => {
                return Err(ScrubError::Sys {
                    path: child,
                    source: e,
                })
            }
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            remove_subdir(fd, &name, &child, mount, depth)?;
        } else {
            unlink(fd, &name, &child, UnlinkatFlags::NoRemoveDir)?;
        }
        crate::host::failpoint("scrub_entry_removed");
    }
    Ok(())
}

fn remove_subdir(
    parent: i32,
    name: &CString,
    path: &Path,
    mount: MountOf,
    depth: usize,
) -> Result<(), ScrubError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    // O_NOFOLLOW: if the entry was swapped for a symlink since fstatat, this fails.
    let sub =
        Dir::openat(Some(parent), name.as_c_str(), flags, Mode::empty()).map_err(sys(path))?;
    // Checked on the opened directory itself, so a racing rename cannot fool it.
    if MountOf::of(sub.as_raw_fd(), path)? != mount {
        return Err(ScrubError::OtherFilesystem {
            path: path.to_path_buf(),
        });
    }
    empty_dir(sub, path, mount, depth + 1)?;
    unlink(parent, name, path, UnlinkatFlags::RemoveDir)
}

fn unlink(dirfd: i32, name: &CString, path: &Path, flag: UnlinkatFlags) -> Result<(), ScrubError> {
    match unlinkat(Some(dirfd), name.as_c_str(), flag) {
        Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(ScrubError::Sys {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ScrubError + '_ {
    move |source| ScrubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sys(path: &Path) -> impl Fn(nix::Error) -> ScrubError + '_ {
    move |source| ScrubError::Sys {
        path: path.to_path_buf(),
        source,
    }
}

/// Wipes a Block volume: `link` must resolve to `device`, which must be a block device
/// nobody holds (opened O_EXCL, so a mounted or held partition is refused).
pub fn scrub_block(link: &Path, device: &Path) -> Result<(), ScrubError> {
    let target = std::fs::canonicalize(link).map_err(io(link))?;
    let real = std::fs::canonicalize(device).map_err(io(device))?;
    if target != real {
        let (link, device) = (link.to_path_buf(), device.to_path_buf());
        return Err(ScrubError::LinkMismatch {
            link,
            target,
            device,
        });
    }
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(&real)
        .map_err(io(&real))?;
    if !f
        .metadata()
        .map_err(io(&real))?
        .file_type()
        .is_block_device()
    {
        return Err(ScrubError::NotBlockDevice { path: real });
    }
    let size = f.seek(SeekFrom::End(0)).map_err(io(&real))?;
    zero_ends(&mut f, size).map_err(io(&real))?;
    discard_between(&f, WIPE_BYTES, size.saturating_sub(WIPE_BYTES));
    f.sync_all().map_err(io(&real))
}

/// Zeroes the first and the last `WIPE_BYTES` of a file or device of `size` bytes.
pub fn zero_ends(f: &mut File, size: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; usize::try_from(WIPE_BYTES.min(size)).unwrap_or(0)];
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&zeros)?;
    let tail = size.saturating_sub(WIPE_BYTES);
    f.seek(SeekFrom::Start(tail))?;
    f.write_all(&zeros[..usize::try_from(size - tail).unwrap_or(0)])?;
    f.flush()
}

nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);

/// Best effort: devices without discard keep their middle (the signatures are gone already).
fn discard_between(f: &File, start: u64, end: u64) {
    if end <= start {
        return;
    }
    let range = [start, end - start];
    // SAFETY: BLKDISCARD reads two u64 (offset, length) from the pointer we pass.
    if let Err(e) = unsafe { blkdiscard(f.as_raw_fd(), &range) } {
        tracing::debug!(error = %e, "BLKDISCARD not done");
    }
}

// ---------------------------------------------------------------------------------------
// The ledger.

pub const LEDGER_FILE: &str = "scrub.json";
const LEDGER_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::state::StateError),
}

/// What kvstrap knows about each PV of this node, keyed by PV name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub version: u32,
    pub volumes: BTreeMap<String, LedgerEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub volume: String,
    /// The PV existed in the cluster since the volume was last scrubbed (or created):
    /// a claim may have written to it, so it must be scrubbed before it is published again.
    pub published: bool,
    /// The PV was in the cluster after the last pass.
    #[serde(default)]
    pub in_cluster: bool,
    /// Last phase seen in the cluster.
    pub phase: Option<String>,
    /// Unix seconds of the last scrub.
    pub last_scrub: Option<u64>,
    /// The volume is gone from the node but its PV (Bound, Released or Failed) is kept.
    #[serde(default)]
    pub kept: bool,
}

impl Ledger {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(LEDGER_FILE)
    }

    /// Loads the ledger. A missing file is an empty ledger; an unreadable one is moved
    /// aside and `conservative` is returned true: then every volume is treated as published,
    /// so none is re-published without a scrub.
    pub fn load(state_dir: &Path) -> (Ledger, bool) {
        let path = Self::path(state_dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Ledger::new(), false),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "scrub ledger unreadable");
                return (Ledger::new(), true);
            }
        };
        match serde_json::from_slice::<Ledger>(&text) {
            Ok(l) if l.version == LEDGER_VERSION => (l, false),
            _ => {
                let aside = path.with_extension("json.corrupt");
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(path = %path.display(), "scrub ledger corrupt: moved aside, scrubbing before any re-publication");
                (Ledger::new(), true)
            }
        }
    }

    pub fn new() -> Ledger {
        Ledger {
            version: LEDGER_VERSION,
            volumes: BTreeMap::new(),
        }
    }

    /// Like every state file: a temp file of its own (O_EXCL, so two writers never share
    /// one), fsync, rename, directory fsync.
    pub fn save(&self, state_dir: &Path) -> Result<(), LedgerError> {
        let path = Self::path(state_dir);
        let text = serde_json::to_vec_pretty(self).map_err(|source| LedgerError::Encode {
            path: path.clone(),
            source,
        })?;
        Ok(crate::state::write_atomic(&path, &text)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn zero_ends_clears_both_ends_only() {
        let mut f = tempfile::tempfile().unwrap();
        let size = 3 * WIPE_BYTES;
        f.write_all(&vec![0xAB; usize::try_from(size).unwrap()])
            .unwrap();
        zero_ends(&mut f, size).unwrap();
        let bytes = {
            use std::io::Read;
            let mut b = Vec::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut b).unwrap();
            b
        };
        let mib = usize::try_from(WIPE_BYTES).unwrap();
        assert!(bytes[..mib].iter().all(|&b| b == 0));
        assert!(bytes[2 * mib..].iter().all(|&b| b == 0));
        assert!(bytes[mib..2 * mib].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn zero_ends_handles_tiny_files() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 100]).unwrap();
        zero_ends(&mut f, 100).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 100);
    }

    #[test]
    fn block_scrub_refuses_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, [7u8; 4096]).unwrap();
        let err = scrub_block(&file, &file).unwrap_err();
        assert!(matches!(err, ScrubError::NotBlockDevice { .. }), "{err}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            vec![7u8; 4096],
            "nothing written"
        );
    }

    #[test]
    fn block_scrub_refuses_a_link_to_another_device() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let err = scrub_block(&link, &b).unwrap_err();
        assert!(matches!(err, ScrubError::LinkMismatch { .. }), "{err}");
    }

    #[test]
    fn ledger_round_trips_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Ledger::load(dir.path()), (Ledger::new(), false));
        let mut l = Ledger::new();
        l.volumes.insert(
            "pv-a".into(),
            LedgerEntry {
                volume: "a".into(),
                published: true,
                ..Default::default()
            },
        );
        l.save(dir.path()).unwrap();
        assert_eq!(Ledger::load(dir.path()), (l, false));
        std::fs::write(Ledger::path(dir.path()), b"{not json").unwrap();
        assert_eq!(Ledger::load(dir.path()), (Ledger::new(), true));
        assert!(dir.path().join("scrub.json.corrupt").exists());
    }
}
