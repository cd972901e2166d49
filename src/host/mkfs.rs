//! Making filesystems with mkfs.xfs / mkfs.ext4, with the UUID and label the plan chose,
//! only on a device that a fresh probe shows to be blank.

use crate::host::cmd::{CmdError, Program, Programs};
use crate::host::probe::{self, FsIdentity, ProbeError};
use crate::host::xfs_label::{self, XfsLabelError};
use crate::host::Outcome;
use crate::model::{FsSpec, FsType, MKFS_IN_PROGRESS_LABEL};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Longest label each filesystem stores.
pub fn max_label_len(fs: FsType) -> usize {
    match fs {
        FsType::Xfs => 12,
        FsType::Ext4 => 16,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error("label {label:?} is longer than {max} bytes, the most {fs} can store")]
    LabelTooLong {
        label: String,
        fs: &'static str,
        max: usize,
    },
    #[error("refusing to format {}: it carries {found}; kvstrap formats only blank devices", device.display())]
    NotBlank { device: PathBuf, found: String },
    #[error("{} was formatted but reads back as {found:?}, not the {fs_type} with UUID {uuid} and label {label:?} the plan asked for", device.display())]
    Verify {
        device: PathBuf,
        fs_type: &'static str,
        uuid: uuid::Uuid,
        label: String,
        found: Box<Option<FsIdentity>>,
    },
    #[error("not formatting {} as ext4 with project quota: {reason}; the filesystem could not be mounted. Use a kernel with quota support or a layout without shared directories", device.display())]
    QuotaUnsupported { device: PathBuf, reason: String },
    #[error("cannot write the label of the xfs on {}: {source}", device.display())]
    Label {
        device: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

/// True when `found` is exactly the filesystem `fs` asks for (Ignition's reuse rule).
pub fn matches_spec(found: &FsIdentity, fs: &FsSpec) -> bool {
    !found.unfinished
        && found.fs_type == fs.fs_type.as_str()
        && found.uuid.as_deref().map(str::to_ascii_lowercase) == Some(fs.uuid.to_string())
        && found.label.as_deref() == Some(fs.label.as_str())
}

/// Create the filesystem `fs` on `device`. Unchanged when it is already there; refused when
/// the device carries any other signature, or when something holds the device.
pub fn make_filesystem(
    programs: &Programs,
    device: &Path,
    fs: &FsSpec,
) -> Result<Outcome, MkfsError> {
    check_label(fs)?;
    let program = match fs.fs_type {
        FsType::Xfs => Program::MkfsXfs,
        FsType::Ext4 => Program::MkfsExt4,
    };
    programs.require(program)?;
    let found = probe::signatures(device)?;
    let mut redo = false;
    if let Some(existing) = probe::filesystem_of(&found) {
        // Reused only when it is the one signature there: a filesystem plus, say, an md
        // superblock is not kvstrap's alone.
        if matches_spec(&existing, fs) && found.len() == 1 {
            return Ok(Outcome::Unchanged);
        }
        // Our own mkfs, interrupted: it never held data (it was never mounted).
        redo = found.len() == 1 && is_our_unfinished(&existing, fs);
    }
    if !found.is_empty() && !redo {
        let list: Vec<String> = found.iter().map(describe_signature).collect();
        return Err(MkfsError::NotBlank {
            device: device.to_path_buf(),
            found: list.join(", "),
        });
    }
    check_quota_support(device, fs)?;
    // Prove nothing holds the device, then let go: mkfs opens it O_EXCL itself.
    probe::prove_unheld(device)?;
    // Made under the in-progress label; the planned label, written only once mkfs has
    // succeeded, is the mark that the filesystem is complete.
    let unfinished = FsSpec {
        label: MKFS_IN_PROGRESS_LABEL.to_string(),
        ..fs.clone()
    };
    programs.run(program, &mkfs_args(device, &unfinished))?;
    crate::host::failpoint("mkfs_unfinished");
    set_label(programs, device, fs)?;
    verify(device, fs)?;
    crate::host::failpoint("make_filesystem");
    Ok(Outcome::Changed(format!(
        "{}: {} {} uuid={} label={}",
        device.display(),
        if redo {
            "made again (an earlier mkfs did not finish)"
        } else {
            "made"
        },
        fs.fs_type.as_str(),
        fs.uuid,
        fs.label
    )))
}

/// The filesystem kvstrap planned, left by a mkfs that did not finish.
fn is_our_unfinished(found: &FsIdentity, fs: &FsSpec) -> bool {
    found.unfinished
        && found.fs_type == fs.fs_type.as_str()
        && found.uuid.as_deref().map(str::to_ascii_lowercase) == Some(fs.uuid.to_string())
}

/// Write the planned label on a filesystem mkfs just made (unmounted). xfs: in-process
/// ([`xfs_label`]); xfs_db only for a superblock that module does not know.
fn set_label(programs: &Programs, device: &Path, fs: &FsSpec) -> Result<(), MkfsError> {
    if fs.fs_type == FsType::Xfs {
        // Opened, written and closed where no program started meanwhile inherits the
        // descriptor: the mount that follows needs the device unclaimed.
        let written = crate::host::cmd::without_spawns(|| {
            probe::exclusive_open_write(device).map(|file| xfs_label::write_label(&file, &fs.label))
        })?;
        match written {
            Ok(()) => return Ok(()),
            Err(XfsLabelError::Io(source)) => {
                return Err(MkfsError::Label {
                    device: device.to_path_buf(),
                    source,
                })
            }
            Err(e @ XfsLabelError::Unexpected(_)) => {
                tracing::debug!(device = %device.display(), "labelling with xfs_db: {e}");
            }
        }
    }
    let (program, args): (Program, Vec<OsString>) = match fs.fs_type {
        // `xfs_admin -L` is a shell script that runs exactly this.
        FsType::Xfs => (
            Program::XfsDb,
            vec![
                "-x".into(),
                "-p".into(),
                "xfs_admin".into(),
                "-c".into(),
                format!("label {}", fs.label).into(),
                device.as_os_str().to_owned(),
            ],
        ),
        FsType::Ext4 => (
            Program::E2label,
            vec![device.as_os_str().to_owned(), fs.label.clone().into()],
        ),
    };
    programs.run(program, &args)?;
    Ok(())
}

fn check_label(fs: &FsSpec) -> Result<(), MkfsError> {
    let max = max_label_len(fs.fs_type);
    if fs.label.len() > max {
        return Err(MkfsError::LabelTooLong {
            label: fs.label.clone(),
            fs: fs.fs_type.as_str(),
            max,
        });
    }
    Ok(())
}

/// An ext4 made with the quota feature on a kernel without quota support cannot be
/// mounted at all: refuse before writing anything. (xfs mounts fine; its mount with
/// prjquota fails later with a clear error.)
fn check_quota_support(device: &Path, fs: &FsSpec) -> Result<(), MkfsError> {
    if fs.fs_type != FsType::Ext4 || !fs.project_quota {
        return Ok(());
    }
    match crate::host::quota::kernel_support(FsType::Ext4) {
        crate::host::quota::QuotaSupport::Unsupported(reason) => Err(MkfsError::QuotaUnsupported {
            device: device.to_path_buf(),
            reason,
        }),
        _ => Ok(()),
    }
}

/// The mkfs arguments. Force flags (-f/-F) are passed only because the probe just showed
/// the device blank; they stop mkfs from asking or refusing over stale probe results.
/// Discard is skipped: a fresh partition of a new disk has nothing to discard and TRIM
/// of a whole disk can take minutes.
pub fn mkfs_args(device: &Path, fs: &FsSpec) -> Vec<OsString> {
    let mut args: Vec<OsString> = match fs.fs_type {
        FsType::Xfs => vec![
            "-q".into(),
            "-f".into(),
            "-K".into(),
            "-m".into(),
            format!("uuid={}", fs.uuid).into(),
        ],
        FsType::Ext4 => {
            // No blocks reserved for root: volumes belong to VMs (qemu runs as 107), and
            // root's 5% would make published capacity unusable.
            let mut a: Vec<OsString> = vec![
                "-q".into(),
                "-F".into(),
                "-m".into(),
                "0".into(),
                "-U".into(),
                fs.uuid.to_string().into(),
            ];
            if fs.project_quota {
                a.extend(["-O".into(), "quota,project".into()]);
                a.extend([
                    "-E".into(),
                    "quotatype=prjquota,lazy_itable_init=1,nodiscard".into(),
                ]);
            } else {
                a.extend(["-E".into(), "lazy_itable_init=1,nodiscard".into()]);
            }
            a
        }
    };
    args.extend([
        "-L".into(),
        fs.label.clone().into(),
        device.as_os_str().to_owned(),
    ]);
    args
}

fn verify(device: &Path, fs: &FsSpec) -> Result<(), MkfsError> {
    // The probe before mkfs found the device blank: only the planned type is looked for
    // now. When it is not there as planned, everything is, to say what is.
    let found = probe::filesystem_of_type(device, fs.fs_type.as_str())?;
    if found.as_ref().is_some_and(|f| matches_spec(f, fs)) {
        return Ok(());
    }
    let found = probe::filesystem(device)?;
    Err(MkfsError::Verify {
        device: device.to_path_buf(),
        fs_type: fs.fs_type.as_str(),
        uuid: fs.uuid,
        label: fs.label.clone(),
        found: Box::new(found),
    })
}

fn describe_signature(s: &crate::model::Signature) -> String {
    match (&s.label, &s.uuid) {
        (Some(l), _) => format!("{} (label {l})", s.kind),
        (None, Some(u)) => format!("{} (uuid {u})", s.kind),
        (None, None) => s.kind.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn spec(fs_type: FsType, project_quota: bool) -> FsSpec {
        FsSpec {
            fs_type,
            uuid: uuid::Uuid::from_u128(0xabcd_0000_0000_0000_0000_0000_0000_0001),
            label: "kvs-0123abcd".into(),
            project_quota,
            mountpoint: PathBuf::from("/mnt/x"),
            mount_options: vec![],
        }
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn xfs_args_set_uuid_label_and_skip_discard() {
        let a = strs(mkfs_args(
            Path::new("/dev/loop0p1"),
            &spec(FsType::Xfs, true),
        ));
        assert_eq!(
            a,
            [
                "-q",
                "-f",
                "-K",
                "-m",
                "uuid=abcd0000-0000-0000-0000-000000000001",
                "-L",
                "kvs-0123abcd",
                "/dev/loop0p1"
            ]
        );
    }

    #[test]
    fn ext4_args_enable_project_quota_only_when_asked() {
        let a = strs(mkfs_args(Path::new("/dev/sdb1"), &spec(FsType::Ext4, true)));
        assert!(a.windows(2).any(|w| w == ["-O", "quota,project"]), "{a:?}");
        assert!(a.iter().any(|s| s.contains("quotatype=prjquota")), "{a:?}");
        let a = strs(mkfs_args(
            Path::new("/dev/sdb1"),
            &spec(FsType::Ext4, false),
        ));
        assert!(!a.iter().any(|s| s.contains("quota")), "{a:?}");
        assert!(a
            .windows(2)
            .any(|w| w == ["-U", "abcd0000-0000-0000-0000-000000000001"]));
    }

    #[test]
    fn labels_longer_than_the_filesystem_allows_are_refused() {
        let mut fs = spec(FsType::Xfs, false);
        fs.label = "kvs-0123abcde".into();
        assert!(matches!(
            check_label(&fs),
            Err(MkfsError::LabelTooLong { max: 12, .. })
        ));
        fs.fs_type = FsType::Ext4;
        assert!(check_label(&fs).is_ok());
    }

    #[test]
    fn reuse_needs_type_uuid_and_label() {
        let fs = spec(FsType::Xfs, false);
        let good = FsIdentity {
            fs_type: "xfs".into(),
            uuid: Some("ABCD0000-0000-0000-0000-000000000001".into()),
            label: Some("kvs-0123abcd".into()),
            unfinished: false,
        };
        assert!(matches_spec(&good, &fs));
        // The same identity from a mkfs that did not finish is never reused.
        let cut_short = FsIdentity {
            unfinished: true,
            ..good.clone()
        };
        assert!(!matches_spec(&cut_short, &fs));
        assert!(is_our_unfinished(&cut_short, &fs));
        assert!(!is_our_unfinished(&good, &fs));
        assert!(!matches_spec(
            &FsIdentity {
                fs_type: "ext4".into(),
                ..good.clone()
            },
            &fs
        ));
        assert!(!matches_spec(
            &FsIdentity {
                label: Some("other".into()),
                ..good.clone()
            },
            &fs
        ));
        assert!(!matches_spec(&FsIdentity { uuid: None, ..good }, &fs));
    }
}
