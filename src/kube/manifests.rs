//! Rendered manifests on disk: `<state-dir>/manifests/`, one object per YAML file,
//! atomically replaced, stale files removed, unchanged files left alone.
//! They exist even before the cluster does, for `kubectl apply -f`: an admin applies them
//! as cluster admin, so whatever the umask they are 0644 in a 0755 directory, and nothing
//! planted there (a symlink, a temp name) is ever written through.

use super::Desired;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot render {name} as YAML: {source}")]
    Render {
        name: String,
        source: serde_saphyr::SerializeError,
    },
    #[error("cannot write manifest {path}: {source} (check that the state directory is writable)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `write_manifests` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ManifestReport {
    pub dir: PathBuf,
    pub written: Vec<PathBuf>,
    pub unchanged: usize,
    pub removed: Vec<PathBuf>,
}

/// The manifest directory below a state directory.
pub fn manifest_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("manifests")
}

/// Renders every object of `desired` to YAML, keyed by file name.
pub fn render(desired: &Desired) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut files = BTreeMap::new();
    for sc in &desired.storage_classes {
        let name = sc.metadata.name.clone().unwrap_or_default();
        files.insert(format!("storageclass-{name}.yaml"), to_yaml(&name, sc)?);
    }
    for v in &desired.volumes {
        let name = v.pv_name().to_string();
        files.insert(format!("pv-{name}.yaml"), to_yaml(&name, &v.pv)?);
    }
    Ok(files)
}

/// One object as YAML.
pub fn to_yaml<T: Serialize>(name: &str, object: &T) -> Result<String, ManifestError> {
    serde_saphyr::to_string(object).map_err(|source| ManifestError::Render {
        name: name.to_string(),
        source,
    })
}

/// Writes the manifests of `desired` below `state_dir`, so the directory holds exactly them.
pub fn write_manifests(
    state_dir: &Path,
    desired: &Desired,
) -> Result<ManifestReport, ManifestError> {
    let files = render(desired)?;
    let dir = manifest_dir(state_dir);
    private_dir(state_dir, 0o022)?;
    private_dir(&dir, 0o7777 & !DIR_MODE)?;
    let mut report = ManifestReport {
        dir: dir.clone(),
        ..ManifestReport::default()
    };
    for (name, text) in &files {
        let path = dir.join(name);
        if unchanged(&path, text.as_bytes()) {
            report.unchanged += 1;
            continue;
        }
        crate::state::write_atomic(&path, text.as_bytes()).map_err(|e| match e {
            crate::state::StateError::Write { path, source } => ManifestError::Io { path, source },
            other => ManifestError::Io {
                path: path.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        report.written.push(path);
    }
    report.removed = remove_stale(&dir, &files)?;
    if !report.written.is_empty() || !report.removed.is_empty() {
        sync_dir(&dir)?;
    }
    Ok(report)
}

/// Mode of the manifest directory (and of the state directory it is in).
pub const DIR_MODE: u32 = 0o755;
/// Mode of every manifest.
pub const FILE_MODE: u32 = 0o644;

/// `dir` as a real directory: made with mode 0755, or, when it exists, without the mode
/// bits `unwanted` (an earlier version under a umask of 000 left it world-writable; the
/// manifest directory loses every bit but 0755, the state directory, whose mode is the
/// admin's, only group and world write). A symlink there is refused, never followed.
fn private_dir(dir: &Path, unwanted: u32) -> Result<(), ManifestError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ManifestError::Io {
        path: dir.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & unwanted != 0 {
                let fixed = fs::Permissions::from_mode(mode & !unwanted);
                fs::set_permissions(dir, fixed).map_err(io)?;
            }
            Ok(())
        }
        Ok(_) => Err(io(std::io::Error::other(
            "not a directory (a symlink or a file where kvstrap keeps its manifests)",
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::state::create_private_dir(dir, DIR_MODE).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// A regular file (not a symlink) with mode 0644 and exactly `text`: left alone.
/// Anything else at that name is replaced by a fresh file.
fn unchanged(path: &Path, text: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(path).is_ok_and(|m| {
        m.file_type().is_file()
            && m.permissions().mode() & 0o7777 == FILE_MODE
            && fs::read(path).is_ok_and(|old| old == text)
    })
}

fn sync_dir(dir: &Path) -> Result<(), ManifestError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ManifestError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes our files (and temp files of an interrupted write) that are not wanted any more;
/// files of other names are someone else's and stay.
fn remove_stale(
    dir: &Path,
    wanted: &BTreeMap<String, String>,
) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if is_ours(&name) && !wanted.contains_key(&name) {
            let path = dir.join(&name);
            fs::remove_file(&path).map_err(|source| ManifestError::Io {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

fn is_ours(name: &str) -> bool {
    let yaml = name.ends_with(".yaml");
    let kind = name.starts_with("pv-") || name.starts_with("storageclass-");
    // Temp files of an interrupted write: `.NAME.yaml.tmp` (earlier versions) or
    // `.NAME.yaml.PID.N.NANOS.tmp` (state::write_atomic).
    let tmp = name.starts_with(".pv-") || name.starts_with(".storageclass-");
    (yaml && kind) || (tmp && name.contains(".yaml.") && name.ends_with(".tmp"))
}
