//! Which files make up the policy, in merge order, with systemd's drop-in rules.
//!
//! Default locations (relative to a root, `/` on a real system):
//! 1. `/etc/kvstrap/policy.toml` (the admin's main file);
//! 2. every `*.toml` of `/usr/lib/kvstrap/policy.d/` and `/etc/kvstrap/policy.d/`,
//!    in lexical order of file name, where a file in /etc replaces the file of the same
//!    name in /usr/lib, and an empty one (or a symlink to /dev/null) masks it.

use super::diag::Diags;
use std::path::{Path, PathBuf};

pub const MAIN_FILE: &str = "etc/kvstrap/policy.toml";
pub const ADMIN_DROPINS: &str = "etc/kvstrap/policy.d";
pub const VENDOR_DROPINS: &str = "usr/lib/kvstrap/policy.d";

/// One policy file and its text.
pub type Source = (PathBuf, String);

/// The files of an explicit `--policy`: the file itself, or the `*.toml` of a directory.
pub fn explicit(path: &Path, diags: &mut Diags) -> Vec<Source> {
    if path.is_dir() {
        let files = toml_files(path, diags);
        if files.is_empty() && diags.is_empty() {
            diags.file_error(
                path,
                "the policy directory holds no *.toml file",
                Some("add a policy file such as policy.toml to it".into()),
            );
        }
        return read_all(&files, diags);
    }
    read_all(&[path.to_path_buf()], diags)
}

/// The files of the default locations below `root`, in merge order.
pub fn system(root: &Path, diags: &mut Diags) -> Vec<Source> {
    let main = root.join(MAIN_FILE);
    let mut files = Vec::new();
    if main.exists() {
        files.push(main.clone());
    }
    files.extend(dropins(
        &root.join(VENDOR_DROPINS),
        &root.join(ADMIN_DROPINS),
        diags,
    ));
    if files.is_empty() && diags.is_empty() {
        diags.file_error(
            &main,
            format!(
                "no policy found: none of {}, {}/*.toml, {}/*.toml exists",
                main.display(),
                root.join(ADMIN_DROPINS).display(),
                root.join(VENDOR_DROPINS).display()
            ),
            Some(
                "write a policy (see /usr/share/doc/kvstrap/example.toml) or pass --policy FILE"
                    .into(),
            ),
        );
    }
    read_all(&files, diags)
}

/// Drop-ins of both directories: /etc wins by file name; masked files are left out.
fn dropins(vendor: &Path, admin: &Path, diags: &mut Diags) -> Vec<PathBuf> {
    let mut by_name: std::collections::BTreeMap<std::ffi::OsString, PathBuf> = Default::default();
    for dir in [vendor, admin] {
        for file in toml_files(dir, diags) {
            if let Some(name) = file.file_name() {
                by_name.insert(name.to_os_string(), file);
            }
        }
    }
    by_name.into_values().filter(|f| !is_mask(f)).collect()
}

/// An empty file or a symlink to /dev/null: the systemd way to switch a vendor file off.
fn is_mask(path: &Path) -> bool {
    let to_null = std::fs::read_link(path).is_ok_and(|target| target == Path::new("/dev/null"));
    to_null || std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
}

/// `*.toml` files of a directory, sorted by name; a missing directory has none.
fn toml_files(dir: &Path, diags: &mut Diags) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            diags.file_error(dir, format!("cannot read the policy directory: {e}"), None);
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| !p.is_dir())
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    files
}

fn read_all(files: &[PathBuf], diags: &mut Diags) -> Vec<Source> {
    let mut out = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => out.push((file.clone(), text)),
            Err(e) => diags.file_error(file, format!("cannot read the policy file: {e}"), None),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    fn names(sources: &[Source], root: &Path) -> Vec<String> {
        sources
            .iter()
            .map(|(p, _)| {
                p.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn systemd_rules_order_override_and_mask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "usr/lib/kvstrap/policy.d/10-vendor.toml", "a = 1");
        write(root, "usr/lib/kvstrap/policy.d/20-masked.toml", "a = 2");
        write(root, "usr/lib/kvstrap/policy.d/30-replaced.toml", "a = 3");
        write(root, "usr/lib/kvstrap/policy.d/README", "not toml");
        write(root, "etc/kvstrap/policy.toml", "a = 0");
        write(root, "etc/kvstrap/policy.d/20-masked.toml", "");
        write(root, "etc/kvstrap/policy.d/30-replaced.toml", "a = 33");
        write(root, "etc/kvstrap/policy.d/15-admin.toml", "a = 15");
        std::fs::create_dir_all(root.join("etc/kvstrap/policy.d")).expect("mkdir");
        let mut diags = Diags::default();
        let sources = system(root, &mut diags);
        assert!(diags.is_empty());
        assert_eq!(
            names(&sources, root),
            [
                "etc/kvstrap/policy.toml",
                "usr/lib/kvstrap/policy.d/10-vendor.toml",
                "etc/kvstrap/policy.d/15-admin.toml",
                "etc/kvstrap/policy.d/30-replaced.toml",
            ]
        );
    }

    #[test]
    fn symlink_to_dev_null_masks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "usr/lib/kvstrap/policy.d/50-x.toml", "a = 1");
        std::fs::create_dir_all(root.join(ADMIN_DROPINS)).expect("mkdir");
        std::os::unix::fs::symlink("/dev/null", root.join(ADMIN_DROPINS).join("50-x.toml"))
            .expect("symlink");
        write(root, "etc/kvstrap/policy.toml", "");
        let mut diags = Diags::default();
        let sources = system(root, &mut diags);
        assert_eq!(names(&sources, root), ["etc/kvstrap/policy.toml"]);
    }

    #[test]
    fn nothing_found_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut diags = Diags::default();
        assert!(system(dir.path(), &mut diags).is_empty());
        let d = diags.into_diagnostics();
        assert_eq!(d.len(), 1);
        assert!(d[0].message.starts_with("no policy found"));
    }

    #[test]
    fn explicit_directory_takes_toml_files_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "b.toml", "");
        write(dir.path(), "a.toml", "");
        write(dir.path(), "c.conf", "");
        let mut diags = Diags::default();
        let sources = explicit(dir.path(), &mut diags);
        assert_eq!(names(&sources, dir.path()), ["a.toml", "b.toml"]);
    }
}
