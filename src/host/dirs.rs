//! Volume directories (owner, group, mode, SELinux label) and the stable symlinks to the
//! partitions of Block volumes. Never follows a symlink it did not create.

use crate::host::Outcome;
use crate::model::Owner;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{Gid, Uid};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The SELinux context KubeVirt's virt-launcher needs on disk images.
pub const SELINUX_CONTEXT: &str = "system_u:object_r:container_file_t:s0";
const SELINUX_XATTR: &str = "security.selinux";
const SELINUX_ENFORCE: &str = "/sys/fs/selinux/enforce";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{} must be an absolute path with a parent and a plain final name", path.display())]
    BadPath { path: PathBuf },
    #[error("{} is a symlink or not a directory: kvstrap does not follow or replace it", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} exists and is not a symlink: kvstrap does not replace it", path.display())]
    NotASymlink { path: PathBuf },
    #[error("cannot {what} {}: {source}", path.display())]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Write a `trusted.` extended attribute on a directory (only root can set or change
/// one, so a tenant cannot alter what kvstrap recorded about its volume).
pub fn set_record(path: &Path, name: &str, value: &str) -> Result<Outcome, DirError> {
    if get_record(path, name).as_deref() == Some(value) {
        return Ok(Outcome::Unchanged);
    }
    let fd = open_record_dir(path).map_err(|source| DirError::Io {
        what: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let attr =
        std::ffi::CString::new(format!("trusted.{name}")).map_err(|_| DirError::BadPath {
            path: path.to_path_buf(),
        })?;
    // SAFETY: a valid fd, a NUL-terminated name and a buffer of the given length.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(DirError::Sys {
            what: "record on",
            path: path.to_path_buf(),
            source: nix::Error::last(),
        });
    }
    Ok(Outcome::Changed(format!(
        "recorded {name}={value} on {}",
        path.display()
    )))
}

/// A `trusted.` attribute kvstrap recorded on a directory, if any.
pub fn get_record(path: &Path, name: &str) -> Option<String> {
    let fd = open_record_dir(path).ok()?;
    let attr = std::ffi::CString::new(format!("trusted.{name}")).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: a valid fd, a NUL-terminated name and a buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            attr.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    String::from_utf8(buf.get(..n)?.to_vec()).ok()
}

/// The directory itself, never a symlink in its place; closed when dropped.
fn open_record_dir(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Remove the empty directory `path` (a dynamic volume whose contents were scrubbed).
pub fn remove_empty_directory(path: &Path) -> Result<Outcome, DirError> {
    let (parent, name) = split(path)?;
    let parent_fd = open_dir(None, parent, path)?;
    match nix::unistd::unlinkat(
        Some(parent_fd.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::RemoveDir,
    ) {
        Ok(()) => Ok(Outcome::Changed(format!("removed {}", path.display()))),
        Err(nix::Error::ENOENT) => Ok(Outcome::Unchanged),
        Err(source) => Err(DirError::Sys {
            what: "remove directory",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// True when SELinux is enabled on this machine.
pub fn selinux_enabled() -> bool {
    Path::new(SELINUX_ENFORCE).exists()
}

/// Create the directory `path` (its parent must exist) with `owner`, or correct the owner,
/// mode and SELinux label of an existing one.
pub fn create_directory(path: &Path, owner: &Owner) -> Result<Outcome, DirError> {
    let (parent, name) = split(path)?;
    let parent_fd = open_dir(None, parent, path)?;
    let mode = Mode::from_bits_truncate(owner.mode & 0o7777);
    let created = match nix::sys::stat::mkdirat(Some(parent_fd.as_raw_fd()), name, mode) {
        Ok(()) => true,
        Err(nix::Error::EEXIST) => false,
        Err(source) => {
            return Err(DirError::Sys {
                what: "create directory",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let fd = open_dir(Some(&parent_fd), Path::new(name), path)?;
    let fixed = ensure_owner(&fd, path, owner)?;
    let labelled = ensure_selinux_label(&fd, path)?;
    let outcome = match (created, fixed || labelled) {
        (true, _) => Outcome::Changed(format!("created {} {}", path.display(), describe(owner))),
        (false, true) => Outcome::Changed(format!("set {} on {}", describe(owner), path.display())),
        (false, false) => return Ok(Outcome::Unchanged),
    };
    crate::host::failpoint("create_directory");
    Ok(outcome)
}

/// Correct owner and mode of an existing directory (Step::SetOwnership).
pub fn set_ownership(path: &Path, owner: &Owner) -> Result<Outcome, DirError> {
    let (parent, name) = split(path)?;
    let parent_fd = open_dir(None, parent, path)?;
    let fd = open_dir(Some(&parent_fd), Path::new(name), path)?;
    if ensure_owner(&fd, path, owner)? {
        return Ok(Outcome::Changed(format!(
            "set {} on {}",
            describe(owner),
            path.display()
        )));
    }
    Ok(Outcome::Unchanged)
}

fn describe(owner: &Owner) -> String {
    format!("{}:{} mode {:04o}", owner.uid, owner.gid, owner.mode)
}

fn split(path: &Path) -> Result<(&Path, &str), DirError> {
    let bad = || DirError::BadPath {
        path: path.to_path_buf(),
    };
    let parent = path
        .parent()
        .filter(|p| path.is_absolute() && !p.as_os_str().is_empty())
        .ok_or_else(bad)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "..")
        .ok_or_else(bad)?;
    Ok((parent, name))
}

/// Open a directory without following a symlink at its last component.
fn open_dir(at: Option<&OwnedFd>, rel: &Path, full: &Path) -> Result<OwnedFd, DirError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let dirfd = at.map(|fd| fd.as_raw_fd());
    let raw =
        nix::fcntl::openat(dirfd, rel, flags, Mode::empty()).map_err(|source| match source {
            nix::Error::ELOOP | nix::Error::ENOTDIR => DirError::NotADirectory {
                path: full.to_path_buf(),
            },
            _ => DirError::Sys {
                what: "open",
                path: full.to_path_buf(),
                source,
            },
        })?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Set uid, gid and mode through the open descriptor; true when something changed.
fn ensure_owner(fd: &OwnedFd, path: &Path, owner: &Owner) -> Result<bool, DirError> {
    let sys = |what| {
        move |source| DirError::Sys {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let st = fstat(fd.as_raw_fd()).map_err(sys("stat"))?;
    let mut changed = false;
    if st.st_uid != owner.uid || st.st_gid != owner.gid {
        let (uid, gid) = (
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        );
        nix::unistd::fchownat(Some(fd.as_raw_fd()), "", uid, gid, AtFlags::AT_EMPTY_PATH)
            .map_err(sys("chown"))?;
        changed = true;
    }
    // chown clears setuid/setgid bits, so the mode is set after it.
    if st.st_mode & 0o7777 != owner.mode & 0o7777 || changed {
        let mode = Mode::from_bits_truncate(owner.mode & 0o7777);
        nix::sys::stat::fchmod(fd.as_raw_fd(), mode).map_err(sys("chmod"))?;
        changed |= st.st_mode & 0o7777 != owner.mode & 0o7777;
    }
    Ok(changed)
}

/// Label the directory `container_file_t` when SELinux is enabled; true when changed.
fn ensure_selinux_label(fd: &OwnedFd, path: &Path) -> Result<bool, DirError> {
    if !selinux_enabled() {
        log_selinux_skipped();
        return Ok(false);
    }
    let current = get_xattr(fd, SELINUX_XATTR);
    if current.as_deref().map(|c| c.trim_end_matches('\0')) == Some(SELINUX_CONTEXT) {
        return Ok(false);
    }
    set_xattr(fd, SELINUX_XATTR, SELINUX_CONTEXT.as_bytes()).map_err(|source| DirError::Io {
        what: "set the SELinux label of",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(true)
}

fn log_selinux_skipped() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::info!(
            "SELinux is not enabled (no {SELINUX_ENFORCE}): volume directories get no label"
        )
    });
}

fn get_xattr(fd: &impl AsFd, name: &str) -> Option<String> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; the fd is open.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_fd().as_raw_fd(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn set_xattr(fd: &impl AsFd, name: &str, value: &[u8]) -> std::io::Result<()> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: value is valid for its length; the fd is open.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_fd().as_raw_fd(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DirError + 'a {
    move |source| DirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where a Block volume's link should point: udev's `/dev/disk/by-partuuid/<uuid>` when it
/// exists and names the same node as the kernel name `device` (which the caller proved to
/// be the partition `part_uuid`), so the link follows the partition when kernel names
/// move; otherwise (no udev) the kernel name itself.
pub fn block_link_target(device: &Path, part_uuid: &uuid::Uuid) -> PathBuf {
    let stable = crate::model::by_partuuid_path(device, part_uuid);
    match (
        std::fs::canonicalize(&stable),
        std::fs::canonicalize(device),
    ) {
        (Ok(a), Ok(b)) if a == b => stable,
        _ => device.to_path_buf(),
    }
}

/// Where a Block volume's link to the LUKS2 mapping `name` (volume `luks_uuid`) points:
/// udev's `/dev/disk/by-id/dm-uuid-CRYPT-LUKS2-...` when it exists and is that mapping (it
/// names the header's UUID, so it can never be another volume), else `/dev/mapper/<name>`.
pub fn crypt_link_target(name: &str, luks_uuid: &uuid::Uuid) -> PathBuf {
    let mapper = crate::model::mapper_path(name);
    let stable = Path::new("/dev/disk/by-id").join(format!(
        "dm-uuid-{}",
        crate::model::dm_crypt_uuid(luks_uuid, name)
    ));
    match (
        std::fs::canonicalize(&stable),
        std::fs::canonicalize(&mapper),
    ) {
        (Ok(a), Ok(b)) if a == b => stable,
        _ => mapper,
    }
}

/// Point the symlink `link` at `target`, atomically (temporary link + rename). Creates
/// the link's parent directories. A non-symlink at `link` is an error.
pub fn link_block_device(link: &Path, target: &Path) -> Result<Outcome, DirError> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(link).map_err(io("read", link))? == target {
                return Ok(Outcome::Unchanged);
            }
        }
        Ok(_) => {
            return Err(DirError::NotASymlink {
                path: link.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", link)(e)),
    }
    let (parent, name) = split(link)?;
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let tmp = parent.join(format!(".{name}.kvstrap-tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io("create symlink", &tmp))?;
    std::fs::rename(&tmp, link).map_err(io("rename symlink into", link))?;
    crate::host::failpoint("link_block_device");
    Ok(Outcome::Changed(format!(
        "{} -> {}",
        link.display(),
        target.display()
    )))
}

/// Remove a Block volume's link; anything that is not a symlink is an error and stays.
pub fn remove_block_link(link: &Path) -> Result<Outcome, DirError> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => {
            return Err(DirError::NotASymlink {
                path: link.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Outcome::Unchanged),
        Err(e) => return Err(io("inspect", link)(e)),
    }
    std::fs::remove_file(link).map_err(io("remove", link))?;
    Ok(Outcome::Changed(format!("removed {}", link.display())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn removing_a_block_link_removes_only_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("vol");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        assert!(matches!(
            remove_block_link(&link).unwrap(),
            Outcome::Changed(_)
        ));
        assert!(matches!(
            remove_block_link(&link).unwrap(),
            Outcome::Unchanged
        ));
        std::fs::write(&link, b"data").unwrap();
        assert!(remove_block_link(&link).is_err());
        assert!(link.exists(), "a file that is not a link stays");
    }

    /// A fake /dev: `vdb1` and `vdc1` nodes (plain files), and udev's by-partuuid links
    /// as given.
    fn fake_dev(links: &[(&uuid::Uuid, &str)]) -> tempfile::TempDir {
        let dev = tempfile::tempdir().unwrap();
        std::fs::write(dev.path().join("vdb1"), b"").unwrap();
        std::fs::write(dev.path().join("vdc1"), b"").unwrap();
        let by_uuid = dev.path().join("disk/by-partuuid");
        std::fs::create_dir_all(&by_uuid).unwrap();
        for (uuid, node) in links {
            std::os::unix::fs::symlink(format!("../../{node}"), by_uuid.join(uuid.to_string()))
                .unwrap();
        }
        dev
    }

    #[test]
    fn block_links_point_at_by_partuuid_where_udev_made_it() {
        let part = uuid::Uuid::from_u128(0x6b76_7374_7261_7000_8000_0000_0000_0001);
        let dev = fake_dev(&[(&part, "vdb1")]);
        let vdb1 = dev.path().join("vdb1");
        assert_eq!(
            block_link_target(&vdb1, &part),
            dev.path().join(format!("disk/by-partuuid/{part}"))
        );
    }

    #[test]
    fn block_links_keep_the_kernel_name_without_udev_or_when_udev_disagrees() {
        let part = uuid::Uuid::from_u128(1);
        // No udev: no by-partuuid link at all.
        let dev = fake_dev(&[]);
        let vdb1 = dev.path().join("vdb1");
        assert_eq!(block_link_target(&vdb1, &part), vdb1);
        // A by-partuuid link naming another node (a stale or cloned partition UUID) is
        // not trusted over the partition the executor just verified.
        let dev = fake_dev(&[(&part, "vdc1")]);
        let vdb1 = dev.path().join("vdb1");
        assert_eq!(block_link_target(&vdb1, &part), vdb1);
    }

    fn me(mode: u32) -> Owner {
        Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mode,
        }
    }

    #[test]
    fn creates_then_leaves_alone_then_fixes_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vol-01");
        assert!(create_directory(&p, &me(0o750)).unwrap().is_changed());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(
            create_directory(&p, &me(0o750)).unwrap(),
            Outcome::Unchanged
        );
        assert!(create_directory(&p, &me(0o700)).unwrap().is_changed());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(set_ownership(&p, &me(0o700)).unwrap(), Outcome::Unchanged);
        assert!(set_ownership(&p, &me(0o755)).unwrap().is_changed());
    }

    #[test]
    fn refuses_to_follow_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let p = d.path().join("vol");
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        assert!(matches!(
            create_directory(&p, &me(0o700)),
            Err(DirError::NotADirectory { .. })
        ));
        assert_ne!(
            std::fs::metadata(&elsewhere).unwrap().mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(matches!(
            create_directory(Path::new("vol"), &me(0o700)),
            Err(DirError::BadPath { .. })
        ));
    }

    #[test]
    fn block_links_are_replaced_atomically_and_idempotently() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("block/vol-01");
        assert!(link_block_device(&link, Path::new("/dev/loop0p1"))
            .unwrap()
            .is_changed());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/dev/loop0p1")
        );
        assert_eq!(
            link_block_device(&link, Path::new("/dev/loop0p1")).unwrap(),
            Outcome::Unchanged
        );
        assert!(link_block_device(&link, Path::new("/dev/loop0p2"))
            .unwrap()
            .is_changed());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/dev/loop0p2")
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("block")).unwrap().count(),
            1,
            "no temp links left"
        );
        let file = d.path().join("block/file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            link_block_device(&file, Path::new("/dev/x")),
            Err(DirError::NotASymlink { .. })
        ));
    }

    #[test]
    fn records_are_read_and_written_without_leaking_a_descriptor() {
        // trusted.* attributes need root (CI runs as root); elsewhere there is nothing
        // to read back.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: trusted.* attributes need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("pvc-x");
        std::fs::create_dir(&vol).unwrap();
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        assert!(set_record(&vol, "kvstrap.bytes", "4096")
            .unwrap()
            .is_changed());
        assert_eq!(
            set_record(&vol, "kvstrap.bytes", "4096").unwrap(),
            Outcome::Unchanged
        );
        for _ in 0..2000 {
            assert_eq!(get_record(&vol, "kvstrap.bytes").as_deref(), Some("4096"));
        }
        assert_eq!(get_record(&vol, "kvstrap.none"), None);
        assert!(
            fds() <= before + 1,
            "descriptors leaked: {before} -> {}",
            fds()
        );
        // Never through a symlink planted in its place.
        let link = d.path().join("pvc-link");
        std::os::unix::fs::symlink(&vol, &link).unwrap();
        assert_eq!(get_record(&link, "kvstrap.bytes"), None);
        assert!(set_record(&link, "kvstrap.bytes", "1").is_err());
        assert!(remove_empty_directory(&vol).unwrap().is_changed());
        assert_eq!(remove_empty_directory(&vol).unwrap(), Outcome::Unchanged);
    }
}
