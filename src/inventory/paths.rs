//! Observed state of the paths kvstrap manages: directories (owner, mode, project id,
//! project quota), symlinks and anything else, a few levels below each managed root.

use super::mountinfo::Mount;
use crate::model::PathFacts;
use std::collections::BTreeMap;
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
    let project_id = crate::host::quota::project_id(path);
    let quota_bytes = project_id.filter(|id| *id != 0).and_then(|id| {
        let source = mounts
            .iter()
            .rev()
            .find(|m| m.devno == devno && m.source.starts_with('/'))?;
        crate::host::quota::project_limit(Path::new(&source.source), id)
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
