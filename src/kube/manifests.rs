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
    // Hundreds of PVs on a large node, and a pass that changes nothing still renders
    // them all to compare with the files: on every CPU.
    let volumes = on_every_cpu(&desired.volumes, |v| {
        let name = v.pv_name();
        Ok((format!("pv-{name}.yaml"), to_yaml(name, &v.pv)?))
    })?;
    files.extend(volumes);
    Ok(files)
}

/// `f` of every item, in order, the items shared out in a chunk per CPU.
fn on_every_cpu<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, ManifestError> + Sync,
) -> Result<Vec<R>, ManifestError> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let chunk = items.len().div_ceil(cores).max(64);
    let failed = || ManifestError::Io {
        path: PathBuf::from("manifests"),
        source: std::io::Error::other("rendering the manifests failed unexpectedly"),
    };
    let run = |part: &[T]| part.iter().map(&f).collect::<Result<Vec<R>, _>>();
    std::thread::scope(|scope| {
        // A chunk whose thread cannot be started (the process is out of threads) is done
        // here, in order: never a panic. Ok: running on a thread; Err: done here.
        let parts: Vec<Result<_, Result<Vec<R>, ManifestError>>> = items
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .name("manifests".into())
                    .spawn_scoped(scope, move || run(part))
                    .map_err(|_| run(part))
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for part in parts {
            let done = match part {
                Ok(thread) => thread.join().map_err(|_| failed())?,
                Err(done) => done,
            };
            out.extend(done?);
        }
        Ok(out)
    })
}

/// One object as YAML.
pub fn to_yaml<T: Serialize>(name: &str, object: &T) -> Result<String, ManifestError> {
    serde_saphyr::to_string(object).map_err(|source| ManifestError::Render {
        name: name.to_string(),
        source,
    })
}

/// The record of what the manifest directory was last written from, in the state
/// directory beside it: the manifest directory holds the manifests and nothing else.
pub const DIGEST_FILE: &str = "manifests.sha256";

/// A fingerprint of the objects of `desired` (their JSON), cheap next to rendering and
/// comparing every YAML file: equal fingerprints, equal manifests.
fn digest(desired: &Desired) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(concat!(
        "kvstrap manifests ",
        env!("CARGO_PKG_VERSION"),
        "\n"
    ));
    let mut object = |name: &str, json: serde_json::Result<Vec<u8>>| {
        hash.update(name.as_bytes());
        hash.update(b"\n");
        hash.update(json.unwrap_or_default());
        hash.update(b"\n");
    };
    for sc in &desired.storage_classes {
        object(
            sc.metadata.name.as_deref().unwrap_or_default(),
            serde_json::to_vec(sc),
        );
    }
    for v in &desired.volumes {
        object(v.pv_name(), serde_json::to_vec(&v.pv));
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The file names the manifests of `desired` have.
fn file_names(desired: &Desired) -> std::collections::BTreeSet<String> {
    let classes = desired.storage_classes.iter().map(|sc| {
        let name = sc.metadata.name.as_deref().unwrap_or_default();
        format!("storageclass-{name}.yaml")
    });
    let volumes = desired
        .volumes
        .iter()
        .map(|v| format!("pv-{}.yaml", v.pv_name()));
    classes.chain(volumes).collect()
}

/// Whether `dir` holds exactly the manifests of `desired` as kvstrap last wrote them:
/// the fingerprint on record and the same files, none missing, none left over.
fn up_to_date(state_dir: &Path, dir: &Path, desired: &Desired, digest: &str) -> bool {
    let recorded = fs::read_to_string(state_dir.join(DIGEST_FILE)).unwrap_or_default();
    if recorded.trim() != digest {
        return false;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let present: std::collections::BTreeSet<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_ours(name))
        .collect();
    present == file_names(desired)
}

/// Writes the manifests of `desired` below `state_dir`, so the directory holds exactly them.
/// When they are what was last written (same fingerprint, same files), nothing is read
/// or rendered: a pass with nothing to do costs a listing of the directory.
pub fn write_manifests(
    state_dir: &Path,
    desired: &Desired,
) -> Result<ManifestReport, ManifestError> {
    let dir = manifest_dir(state_dir);
    // Looked at first, and made private whatever a umask or an earlier version left:
    // only root writes what an admin applies with kubectl.
    private_dir(state_dir, 0o022)?;
    private_dir(&dir, 0o7777 & !DIR_MODE)?;
    let digest = digest(desired);
    if up_to_date(state_dir, &dir, desired, &digest) {
        return Ok(ManifestReport {
            dir,
            unchanged: desired.storage_classes.len() + desired.volumes.len(),
            ..ManifestReport::default()
        });
    }
    let files = render(desired)?;
    let mut report = ManifestReport {
        dir: dir.clone(),
        ..ManifestReport::default()
    };
    let files_in_order: Vec<(&String, &String)> = files.iter().collect();
    let same = on_every_cpu(&files_in_order, |(name, text)| {
        Ok(unchanged(&dir.join(name), text.as_bytes()))
    })?;
    let mut changed = Vec::new();
    for ((name, text), same) in files_in_order.into_iter().zip(same) {
        if same {
            report.unchanged += 1;
        } else {
            changed.push((dir.join(name), text.as_bytes()));
        }
    }
    write_all(&changed)?;
    report.written = changed.into_iter().map(|(path, _)| path).collect();
    report.removed = remove_stale(&dir, &files)?;
    // One directory fsync makes every rename and removal durable.
    if !report.written.is_empty() || !report.removed.is_empty() {
        sync_dir(&dir)?;
    }
    // Recorded last, once the manifests are durable: a run cut short before this renders
    // and compares again.
    let digest_path = state_dir.join(DIGEST_FILE);
    if fs::read_to_string(&digest_path).unwrap_or_default().trim() != digest {
        crate::state::write_atomic(&digest_path, format!("{digest}\n").as_bytes()).map_err(
            |e| ManifestError::Io {
                path: digest_path.clone(),
                source: std::io::Error::other(e.to_string()),
            },
        )?;
    }
    Ok(report)
}

/// Mode of the manifest directory (and of the state directory it is in).
pub const DIR_MODE: u32 = 0o755;
/// Mode of every manifest.
pub const FILE_MODE: u32 = 0o644;

/// At most this many files are written at once: each write waits mostly for its fsync,
/// and a filesystem commits concurrent fsyncs together.
const WRITERS: usize = 8;

/// Write every file atomically (a fresh temp file, never one planted there; mode 0644),
/// several at once: a cold apply of a 60-disk node renders hundreds of PVs, and one fsync
/// after another made that the longest serial stretch of the run. The caller fsyncs the
/// directory once afterwards.
fn write_all(files: &[(PathBuf, &[u8])]) -> Result<(), ManifestError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None);
    crate::host::threads::run_workers(WRITERS.min(files.len()), "manifests", || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some((path, bytes)) = files.get(i) else {
            break;
        };
        if let Err(e) = crate::state::write_atomic_unsynced(path, bytes) {
            let e = match e {
                crate::state::StateError::Write { path, source } => {
                    ManifestError::Io { path, source }
                }
                other => ManifestError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(other.to_string()),
                },
            };
            if let Ok(mut slot) = first_error.lock() {
                slot.get_or_insert(e);
            }
            break;
        }
    });
    match first_error.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

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
