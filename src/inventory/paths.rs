//! Observed state of the paths kvstrap manages: directories (owner, mode, project id,
//! project quota), symlinks and anything else, a few levels below each managed root.

use super::mountinfo::Mount;
use crate::model::PathFacts;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// storage_root / mount point / volume directory / anything inside it.
const MAX_DEPTH: usize = 3;

/// Walks each root (depth 3, symlinks never followed) and records what is there.
/// Roots that do not exist yet simply contribute nothing.
pub fn observe(roots: &[PathBuf], mounts: &[Mount]) -> BTreeMap<PathBuf, PathFacts> {
    let mut facts = BTreeMap::new();
    for root in roots {
        walk(root, 0, mounts, &mut facts);
    }
    facts
}

fn walk(path: &Path, depth: usize, mounts: &[Mount], out: &mut BTreeMap<PathBuf, PathFacts>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let ft = meta.file_type();
    let facts = if ft.is_symlink() {
        match std::fs::read_link(path) {
            Ok(target) => PathFacts::Symlink { target },
            Err(_) => PathFacts::Other,
        }
    } else if ft.is_dir() {
        directory(path, &meta, mounts)
    } else {
        PathFacts::Other
    };
    out.insert(path.to_path_buf(), facts);
    if !ft.is_dir() || depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        walk(&entry.path(), depth + 1, mounts, out);
    }
}

fn directory(path: &Path, meta: &std::fs::Metadata, mounts: &[Mount]) -> PathFacts {
    let devno = super::devno_string(meta.dev());
    let project_id = project_id(path);
    let quota_bytes = project_id.filter(|id| *id != 0).and_then(|id| {
        let source = mounts
            .iter()
            .rev()
            .find(|m| m.devno == devno && m.source.starts_with('/'))?;
        project_quota(Path::new(&source.source), id)
    });
    PathFacts::Directory {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        project_id,
        quota_bytes,
        devno,
    }
}

/// `struct fsxattr` of linux/fs.h.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

nix::ioctl_read!(fs_ioc_fsgetxattr, b'X', 31, FsXattr);

/// The directory's project id; `None` where the filesystem has no project ids.
pub fn project_id(dir: &Path) -> Option<u32> {
    let file = std::fs::File::open(dir).ok()?;
    let mut attr = FsXattr::default();
    // SAFETY: the fd is open for the whole call and `attr` is a valid fsxattr buffer.
    unsafe { fs_ioc_fsgetxattr(std::os::unix::io::AsRawFd::as_raw_fd(&file), &mut attr) }.ok()?;
    Some(attr.projid)
}

/// `struct if_dqblk` of linux/quota.h.
#[repr(C)]
#[derive(Default)]
struct IfDqblk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

const Q_GETQUOTA: i32 = 0x80_0007;
const PRJQUOTA: i32 = 2;
/// Generic quota limits count blocks of 1 KiB (QIF_DQBLKSIZE).
const QUOTA_BLOCK: u64 = 1024;

/// Hard block limit of project `id` on the filesystem of `device`, in bytes; `None`
/// when quotas are off or no limit is set. Works for XFS and ext4 alike.
pub fn project_quota(device: &Path, id: u32) -> Option<u64> {
    let special = CString::new(device.as_os_str().as_bytes()).ok()?;
    let mut dq = IfDqblk::default();
    let cmd = (Q_GETQUOTA << 8) | PRJQUOTA;
    let id = i32::try_from(id).ok()?;
    // SAFETY: `special` is NUL-terminated and `dq` is a valid if_dqblk for Q_GETQUOTA.
    let rc =
        unsafe { libc::quotactl(cmd, special.as_ptr(), id, std::ptr::addr_of_mut!(dq).cast()) };
    (rc == 0 && dq.bhardlimit > 0).then(|| dq.bhardlimit.saturating_mul(QUOTA_BLOCK))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn observes_dirs_symlinks_and_files_to_depth_three() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        std::fs::create_dir_all(root.join("a/b/c/d")).unwrap();
        std::fs::write(root.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/dev/loop9p1", root.join("a/link")).unwrap();
        let facts = observe(&[root.clone(), dir.path().join("missing")], &[]);
        assert!(matches!(
            facts[&root.join("a/b/c")],
            PathFacts::Directory { .. }
        ));
        assert!(
            !facts.contains_key(&root.join("a/b/c/d")),
            "depth is limited to 3"
        );
        assert_eq!(facts[&root.join("a/file")], PathFacts::Other);
        assert_eq!(
            facts[&root.join("a/link")],
            PathFacts::Symlink {
                target: "/dev/loop9p1".into()
            }
        );
        assert_eq!(facts.len(), 6);
    }

    #[test]
    fn directory_facts_carry_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("vol");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
        let facts = observe(std::slice::from_ref(&d), &[]);
        let PathFacts::Directory {
            uid,
            mode,
            devno,
            quota_bytes,
            ..
        } = &facts[&d]
        else {
            panic!("not a dir")
        };
        assert_eq!(*uid, nix::unistd::geteuid().as_raw());
        assert_eq!(*mode, 0o750);
        assert!(devno.contains(':'));
        assert_eq!(*quota_bytes, None);
    }
}
