//! Mounting kvstrap's filesystems: by filesystem UUID, with the class's mount options.
//! A correct mount is left alone; anything else mounted on the mount point is an error.

use crate::host::probe::{self, ProbeError};
use crate::host::Outcome;
use crate::model::FsSpec;
use nix::mount::{MntFlags, MsFlags};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{} does not carry the filesystem {uuid} the plan expects (found {found}): not mounting it", device.display())]
    WrongFilesystem {
        device: PathBuf,
        uuid: uuid::Uuid,
        found: String,
    },
    #[error("{} already has {source_dev} ({fstype}) mounted on it, not {}: unmount it or fix the policy; kvstrap does not replace mounts", mountpoint.display(), device.display())]
    Occupied {
        mountpoint: PathBuf,
        device: PathBuf,
        source_dev: String,
        fstype: String,
    },
    #[error("{} is mounted without {option}, which quotas need: remount it with {option}", mountpoint.display())]
    MissingOption {
        mountpoint: PathBuf,
        option: &'static str,
    },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount {} on {} ({fstype}, {data}): {source}{hint}", device.display(), mountpoint.display())]
    Mount {
        device: PathBuf,
        mountpoint: PathBuf,
        fstype: &'static str,
        data: String,
        source: nix::Error,
        hint: String,
    },
    #[error("unmount {}: {source}", mountpoint.display())]
    Unmount {
        mountpoint: PathBuf,
        source: nix::Error,
    },
    #[error("no mounted filesystem holds {}", path.display())]
    NotMounted { path: PathBuf },
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub devno: u64,
    /// The directory of the mounted filesystem that this mount shows: `/` for the whole
    /// filesystem, `/vol-03` for a bind mount of one directory of it.
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options then superblock options, comma-joined.
    pub options: Vec<String>,
}

impl MountEntry {
    pub fn has_option(&self, opt: &str) -> bool {
        self.options.iter().any(|o| o == opt)
    }
}

/// Parse the text of /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    let mut post = post.split(' ');
    let (maj, min) = pre.get(2)?.split_once(':')?;
    let fstype = post.next()?.to_string();
    let source = unescape(post.next()?);
    let mut options: Vec<String> = pre.get(5)?.split(',').map(String::from).collect();
    options.extend(
        post.next()
            .unwrap_or("")
            .split(',')
            .filter(|o| !o.is_empty())
            .map(String::from),
    );
    Some(MountEntry {
        devno: nix::sys::stat::makedev(maj.parse().ok()?, min.parse().ok()?),
        root: PathBuf::from(unescape(pre.get(3)?)),
        mountpoint: PathBuf::from(unescape(pre.get(4)?)),
        fstype,
        source,
        options,
    })
}

/// mountinfo (and /proc/swaps) escape space, tab, newline and backslash as `\ooo` octal;
/// a `\ooo` above `\377` is no escape and is kept as written.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo() -> Result<Vec<MountEntry>, MountError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| MountError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// What is mounted exactly on `mountpoint` (the top-most mount), if anything.
pub fn current_mount(mountpoint: &Path) -> Result<Option<MountEntry>, MountError> {
    Ok(mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint))
}

/// The mount that holds `path` (the entry whose device is the path's st_dev).
pub fn mount_of(path: &Path) -> Result<MountEntry, MountError> {
    let meta = std::fs::metadata(path).map_err(|source| MountError::Io {
        what: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    mountinfo()?
        .into_iter()
        .rev()
        .filter(|m| m.devno == meta.dev() && path.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
        .ok_or_else(|| MountError::NotMounted {
            path: path.to_path_buf(),
        })
}

/// The mount flags and data string for `options`, plus what quotas need.
pub fn mount_flags(options: &[String], project_quota: bool) -> (MsFlags, String) {
    // Tenants write to these filesystems: a device node or a setuid binary a VM's pod
    // leaves there must not work for anyone else on the node.
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let mut data: Vec<&str> = Vec::new();
    for opt in options {
        match flag_of(opt) {
            Some(f) => flags |= f,
            None if matches!(opt.as_str(), "defaults" | "rw" | "") => {}
            None if !data.contains(&opt.as_str()) => data.push(opt),
            None => {}
        }
    }
    // Both xfs and ext4 enforce project limits only when mounted with prjquota.
    if project_quota && !data.contains(&"prjquota") {
        data.push("prjquota");
    }
    (flags, data.join(","))
}

fn flag_of(opt: &str) -> Option<MsFlags> {
    Some(match opt {
        "ro" => MsFlags::MS_RDONLY,
        "noatime" => MsFlags::MS_NOATIME,
        "nodiratime" => MsFlags::MS_NODIRATIME,
        "relatime" => MsFlags::MS_RELATIME,
        "strictatime" => MsFlags::MS_STRICTATIME,
        "lazytime" => MsFlags::MS_LAZYTIME,
        "nodev" => MsFlags::MS_NODEV,
        "nosuid" => MsFlags::MS_NOSUID,
        "noexec" => MsFlags::MS_NOEXEC,
        "sync" => MsFlags::MS_SYNCHRONOUS,
        "dirsync" => MsFlags::MS_DIRSYNC,
        _ => return None,
    })
}

/// Mount `device` (which must carry `fs`) on `fs.mountpoint`.
pub fn mount_filesystem(device: &Path, fs: &FsSpec) -> Result<Outcome, MountError> {
    check_identity(device, fs)?;
    let devno = block_devno(device)?;
    if let Some(m) = current_mount(&fs.mountpoint)? {
        return already_mounted(&m, devno, device, fs);
    }
    std::fs::create_dir_all(&fs.mountpoint).map_err(|source| MountError::Io {
        what: "create mount point",
        path: fs.mountpoint.clone(),
        source,
    })?;
    let (flags, data) = mount_flags(&fs.mount_options, fs.project_quota);
    let fstype = fs.fs_type.as_str();
    let data_arg = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(device), &fs.mountpoint, Some(fstype), flags, data_arg).map_err(
        |source| {
            let hint = mount_hint(fs, source);
            MountError::Mount {
                device: device.to_path_buf(),
                mountpoint: fs.mountpoint.clone(),
                fstype,
                data: data.clone(),
                source,
                hint,
            }
        },
    )?;
    crate::host::failpoint("mount");
    Ok(Outcome::Changed(format!(
        "mounted {} on {}",
        device.display(),
        fs.mountpoint.display()
    )))
}

/// The usual reason a quota mount fails with EINVAL is a kernel without quota support.
fn mount_hint(fs: &FsSpec, err: nix::Error) -> String {
    if err != nix::Error::EINVAL || !fs.project_quota {
        return String::new();
    }
    match crate::host::kernel_quota::kernel_support(fs.fs_type) {
        crate::host::kernel_quota::QuotaSupport::Unsupported(reason) => format!(" ({reason})"),
        _ => " (check dmesg: the kernel may lack quota support)".into(),
    }
}

fn check_identity(device: &Path, fs: &FsSpec) -> Result<(), MountError> {
    let ok = |found: &Option<probe::FsIdentity>| {
        found.as_ref().is_some_and(|f| {
            f.fs_type == fs.fs_type.as_str()
                && f.uuid.as_deref().map(str::to_ascii_lowercase) == Some(fs.uuid.to_string())
        })
    };
    // The planned type alone is looked for; when it is not the planned filesystem,
    // every signature, to say what the device carries instead.
    if ok(&probe::filesystem_of_type(device, fs.fs_type.as_str())?) {
        return Ok(());
    }
    let found = probe::filesystem(device)?;
    if ok(&found) {
        return Ok(());
    }
    let found = found.map_or("no filesystem".into(), |f| {
        format!("{} {}", f.fs_type, f.uuid.unwrap_or_default())
    });
    Err(MountError::WrongFilesystem {
        device: device.to_path_buf(),
        uuid: fs.uuid,
        found,
    })
}

fn block_devno(device: &Path) -> Result<u64, MountError> {
    let meta = std::fs::metadata(device).map_err(|source| MountError::Io {
        what: "stat",
        path: device.to_path_buf(),
        source,
    })?;
    // A regular file (tests) has no rdev; its st_dev would never match a mount.
    Ok(if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        u64::MAX
    })
}

fn already_mounted(
    m: &MountEntry,
    devno: u64,
    device: &Path,
    fs: &FsSpec,
) -> Result<Outcome, MountError> {
    if m.devno != devno || m.fstype != fs.fs_type.as_str() {
        return Err(MountError::Occupied {
            mountpoint: fs.mountpoint.clone(),
            device: device.to_path_buf(),
            source_dev: m.source.clone(),
            fstype: m.fstype.clone(),
        });
    }
    if fs.project_quota && !m.has_option("prjquota") {
        return Err(MountError::MissingOption {
            mountpoint: fs.mountpoint.clone(),
            option: "prjquota",
        });
    }
    Ok(Outcome::Unchanged)
}

/// Unmount `mountpoint`; Unchanged when nothing is mounted there.
pub fn unmount(mountpoint: &Path) -> Result<Outcome, MountError> {
    if current_mount(mountpoint)?.is_none() {
        return Ok(Outcome::Unchanged);
    }
    nix::mount::umount2(mountpoint, MntFlags::empty()).map_err(|source| MountError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    Ok(Outcome::Changed(format!(
        "unmounted {}",
        mountpoint.display()
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::FsType;

    const MOUNTINFO: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
97 22 259:1 / /var/lib/kvstrap/storage/nvme-a rw,noatime shared:50 - xfs /dev/nvme0n1p1 rw,attr2,inode64,prjquota
98 22 7:17 / /mnt/with\\040space rw,relatime - ext4 /dev/loop1p1 rw
99 22 259:1 /vol-02 /var/lib/kubelet/pods/0f3c/volumes/kubernetes.io~local-volume/pv-x rw - xfs /dev/nvme0n1p1 rw
";

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        // More than a byte holds: not an escape, kept as written (and no overflow).
        assert_eq!(unescape("a\\477b"), "a\\477b");
    }

    #[test]
    fn parses_mountinfo_lines() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].root, Path::new("/"));
        assert_eq!(
            m[3].root,
            Path::new("/vol-02"),
            "a bind mount shows one directory"
        );
        assert_eq!(m[1].devno, nix::sys::stat::makedev(259, 1));
        assert_eq!(
            m[1].mountpoint,
            Path::new("/var/lib/kvstrap/storage/nvme-a")
        );
        assert_eq!(m[1].fstype, "xfs");
        assert_eq!(m[1].source, "/dev/nvme0n1p1");
        assert!(m[1].has_option("noatime") && m[1].has_option("prjquota"));
        assert_eq!(m[2].mountpoint, Path::new("/mnt/with space"));
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = [
            "noatime", "nodev", "defaults", "discard", "discard", "nosuid",
        ]
        .map(String::from)
        .into();
        let (flags, data) = mount_flags(&opts, true);
        assert_eq!(
            flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID
        );
        assert_eq!(data, "discard,prjquota");
        let (_, data) = mount_flags(&["prjquota".to_string()], true);
        assert_eq!(data, "prjquota");
        let (flags, data) = mount_flags(&[], false);
        assert_eq!(flags, MsFlags::MS_NODEV | MsFlags::MS_NOSUID, "always");
        assert!(data.is_empty());
    }

    #[test]
    fn wrong_mount_is_an_error_never_fixed() {
        let m = &parse_mountinfo(MOUNTINFO)[1];
        let fs = FsSpec {
            fs_type: FsType::Xfs,
            uuid: uuid::Uuid::nil(),
            label: "x".into(),
            project_quota: true,
            mountpoint: m.mountpoint.clone(),
            mount_options: vec![],
        };
        let dev = Path::new("/dev/x");
        assert_eq!(
            already_mounted(m, m.devno, dev, &fs).unwrap(),
            Outcome::Unchanged
        );
        assert!(matches!(
            already_mounted(m, m.devno + 1, dev, &fs),
            Err(MountError::Occupied { .. })
        ));
        let ext4 = FsSpec {
            fs_type: FsType::Ext4,
            ..fs.clone()
        };
        assert!(matches!(
            already_mounted(m, m.devno, dev, &ext4),
            Err(MountError::Occupied { .. })
        ));
        let no_quota = &parse_mountinfo(MOUNTINFO)[2];
        let fs2 = FsSpec {
            fs_type: FsType::Ext4,
            ..fs
        };
        assert!(matches!(
            already_mounted(no_quota, no_quota.devno, dev, &fs2),
            Err(MountError::MissingOption { .. })
        ));
    }
}
